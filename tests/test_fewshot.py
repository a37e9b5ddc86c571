"""The few-shot ridge probe follows big_vision's fewshot_lsr protocol."""

import numpy as np
import pytest
import torch

from pipeline.evaluate.fewshot import (
    BIAS_CONSTANT,
    STD_EPS,
    best_shot_confusion,
    confusion_matrix,
    extract_features,
    fewshot_predictions,
    ridge_fewshot,
    ridge_predict,
    shot_indices,
)
from pipeline.model import create_model

L2 = 2.0**10


def reference_predict(train_x, train_y, test_x, num_classes, l2=L2):
    """Ridge by least squares on the augmented system [X; sqrt(l2) I] w = [Y; 0]."""
    mean, std = train_x.mean(0), train_x.std(0) + STD_EPS
    x = np.hstack([(train_x - mean) / std, np.full((len(train_x), 1), BIAS_CONSTANT)])
    t = np.hstack([(test_x - mean) / std, np.full((len(test_x), 1), BIAS_CONSTANT)])
    y = 2.0 * np.eye(num_classes)[train_y] - 1.0
    a = np.vstack([x, np.sqrt(l2) * np.eye(x.shape[1])])
    b = np.vstack([y, np.zeros((x.shape[1], num_classes))])
    w = np.linalg.lstsq(a, b, rcond=None)[0]
    return np.argmax(t @ w, axis=1)


def random_problem(n_train, n_test, dim, num_classes, seed=0):
    rng = np.random.default_rng(seed)
    return (
        rng.normal(size=(n_train, dim)).astype(np.float32) * rng.uniform(0.1, 5, dim) + rng.normal(size=dim),
        rng.integers(0, num_classes, n_train),
        rng.normal(size=(n_test, dim)).astype(np.float32),
        rng.integers(0, num_classes, n_test),
    )


@pytest.mark.parametrize("n_train,dim", [(200, 16), (30, 64)], ids=["more-points", "more-dims"])
def test_ridge_predictions_match_independent_least_squares(n_train, dim):
    train_x, train_y, test_x, _ = random_problem(n_train, 300, dim, num_classes=7)
    ours = ridge_predict(train_x, train_y, test_x, 7, L2)
    ref = reference_predict(train_x.astype(np.float64), train_y, test_x.astype(np.float64), 7)
    assert np.array_equal(ours, ref)


def test_ridge_predictions_match_sklearn_ridge_on_standardised_features():
    from sklearn.linear_model import Ridge

    train_x, train_y, test_x, _ = random_problem(120, 300, 24, num_classes=5, seed=1)
    mean, std = train_x.mean(0), train_x.std(0) + STD_EPS
    bias = lambda z: np.hstack([z, np.full((len(z), 1), BIAS_CONSTANT)])  # noqa: E731
    ridge = Ridge(alpha=L2, fit_intercept=False, solver="cholesky")
    ridge.fit(bias((train_x - mean) / std), 2.0 * np.eye(5)[train_y] - 1.0)
    ref = np.argmax(ridge.predict(bias((test_x - mean) / std)), axis=1)
    assert np.array_equal(ridge_predict(train_x, train_y, test_x, 5, L2), ref)


def test_each_shot_set_is_solved_with_its_own_statistics():
    train_x, train_y, test_x, test_y = random_problem(400, 200, 12, num_classes=4, seed=2)
    results = ridge_fewshot(train_x, train_y, test_x, test_y, shots=(1, 5), seeds=2)
    for k in (1, 5):
        for seed in range(2):
            idx = shot_indices(train_y, k, seed, 4)
            ref = reference_predict(train_x[idx].astype(np.float64), train_y[idx], test_x.astype(np.float64), 4)
            assert results[k]["per_seed"][seed] == pytest.approx(np.mean(ref == test_y))


def test_examples_outside_the_shot_set_do_not_change_the_result():
    train_x, train_y, test_x, test_y = random_problem(300, 200, 12, num_classes=5, seed=3)
    used = np.unique(np.concatenate([shot_indices(train_y, 10, s, 5) for s in range(3)]))
    skewed = train_x.copy()
    unused = np.setdiff1d(np.arange(len(train_x)), used)
    skewed[unused] = skewed[unused] * 100.0 + 1000.0
    assert ridge_fewshot(train_x, train_y, test_x, test_y, shots=(1, 10)) == ridge_fewshot(
        skewed, train_y, test_x, test_y, shots=(1, 10)
    )


def test_shot_sets_hold_k_per_class_and_grow_nested_with_k():
    labels = np.repeat(np.arange(6), 30)
    one, five = shot_indices(labels, 1, 0, 6), shot_indices(labels, 5, 0, 6)
    assert np.array_equal(np.bincount(labels[five]), np.full(6, 5))
    assert set(one) <= set(five)
    assert not np.array_equal(five, shot_indices(labels, 5, 1, 6))


def test_results_are_deterministic_and_shaped_per_shot():
    train_x, train_y, test_x, test_y = random_problem(300, 100, 8, num_classes=3, seed=4)
    first = ridge_fewshot(train_x, train_y, test_x, test_y, shots=(1, 5, 10), seeds=3)
    assert first == ridge_fewshot(train_x, train_y, test_x, test_y, shots=(1, 5, 10), seeds=3)
    assert set(first) == {1, 5, 10}
    for r in first.values():
        assert len(r["per_seed"]) == 3
        assert r["mean"] == pytest.approx(np.mean(r["per_seed"]))
        assert r["std"] == pytest.approx(np.std(r["per_seed"]))


def test_well_separated_clusters_are_classified_perfectly():
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(10, 32)) * 10
    train_y, test_y = np.repeat(np.arange(10), 30), np.repeat(np.arange(10), 20)
    train_x = centres[train_y] + rng.normal(size=(300, 32))
    test_x = centres[test_y] + rng.normal(size=(200, 32))
    results = ridge_fewshot(train_x, train_y, test_x, test_y, shots=(1, 5))
    assert results[1]["mean"] >= 0.97
    assert results[5]["mean"] == 1.0


def test_random_labels_give_chance_accuracy():
    train_x, train_y, test_x, test_y = random_problem(2000, 2000, 32, num_classes=10, seed=6)
    results = ridge_fewshot(train_x, train_y, test_x, test_y, shots=(5, 25))
    for r in results.values():
        assert 0.06 <= r["mean"] <= 0.14


def test_classes_short_of_k_examples_use_what_they_have_and_are_listed():
    rng = np.random.default_rng(7)
    centres = 5 * np.eye(3, 8)
    train_y = np.concatenate([np.repeat([0, 1], 20), [2, 2]])
    train_x = rng.normal(size=(len(train_y), 8)) + centres[train_y]
    test_y = np.repeat([0, 1, 2], 10)
    test_x = rng.normal(size=(30, 8)) + centres[test_y]
    results = ridge_fewshot(train_x, train_y, test_x, test_y, shots=(1, 5), l2=1.0)
    assert results[1]["short_classes"] == [] and results[5]["short_classes"] == [2]
    assert len(shot_indices(train_y, 5, 0, 3)) == 12
    assert results[5]["mean"] > 0.9


def test_confusion_matrix_counts_true_rows_and_predicted_columns():
    cm = confusion_matrix(np.array([0, 0, 1, 2, 2]), np.array([0, 1, 1, 2, 0]), 3)
    assert cm.tolist() == [[1, 1, 0], [0, 1, 0], [1, 0, 1]]


def test_best_shot_confusion_uses_the_best_k():
    train_x, train_y, test_x, test_y = random_problem(300, 120, 8, num_classes=4, seed=8)
    results = {1: {"mean": 0.3}, 5: {"mean": 0.6}, 10: {"mean": 0.5}}
    k, cm = best_shot_confusion(results, train_x, train_y, test_x, test_y)
    preds = fewshot_predictions(train_x, train_y, test_x, 5, seed=0)
    assert k == 5 and cm.sum() == len(test_y)
    assert np.trace(cm) == np.sum(preds == test_y)


@pytest.fixture(scope="module")
def vit_demo():
    torch.manual_seed(0)
    return create_model("vit_demo", num_classes=10)


def image_batches(n=10, batch=4):
    g = torch.Generator().manual_seed(0)
    images = torch.rand(n, 3, 32, 32, generator=g) * 2 - 1
    labels = torch.arange(n) % 10
    return [(images[i : i + batch], labels[i : i + batch]) for i in range(0, n, batch)]


@pytest.mark.parametrize("training", [True, False], ids=["train-mode", "eval-mode"])
def test_extract_features_returns_pre_logits_and_restores_the_mode(vit_demo, training):
    vit_demo.train(training)
    feats, labels = extract_features(vit_demo, image_batches())
    assert vit_demo.training is training
    assert feats.shape == (10, vit_demo.num_features) and feats.dtype == np.float32
    assert labels.dtype == np.int64 and labels.tolist() == list(range(10))
    vit_demo.eval()
    with torch.no_grad():
        expected = torch.cat([vit_demo.forward_features(x) for x, _ in image_batches()])
    np.testing.assert_allclose(feats, expected.numpy(), rtol=1e-5, atol=1e-5)


def test_extract_features_in_bfloat16_is_close_to_float32(vit_demo):
    ref, _ = extract_features(vit_demo, image_batches())
    feats, _ = extract_features(vit_demo, image_batches(), dtype=torch.bfloat16)
    assert feats.dtype == np.float32
    assert np.abs(feats - ref).max() < 0.1 * np.abs(ref).max()
