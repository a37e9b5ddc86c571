"""The pre-training loss: sigmoid or softmax cross-entropy, with optional label smoothing."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.config import ConfigError, load_config
from pipeline.engine import loss_fn


def test_softmax_label_smoothing_is_torchs():
    torch.manual_seed(0)
    logits, labels = torch.randn(6, 10), torch.randint(0, 10, (6,))
    onehot = F.one_hot(labels, 10).float()
    assert torch.allclose(loss_fn(logits, onehot, "softmax"), F.cross_entropy(logits, labels))
    assert torch.allclose(loss_fn(logits, onehot, "softmax", 0.1), F.cross_entropy(logits, labels, label_smoothing=0.1))


def test_sigmoid_label_smoothing_moves_each_target_toward_one_over_k():
    torch.manual_seed(0)
    logits, targets = torch.randn(4, 8), (torch.rand(4, 8) > 0.7).float()
    want = F.binary_cross_entropy_with_logits(logits, targets * 0.8 + 0.2 / 8, reduction="none").sum(-1).mean()
    assert torch.allclose(loss_fn(logits, targets, "sigmoid", 0.2), want)
    assert not torch.allclose(loss_fn(logits, targets, "sigmoid", 0.2), loss_fn(logits, targets, "sigmoid"))


def test_label_smoothing_defaults_to_off_and_is_validated():
    assert load_config("configs/experiment/demo.yaml").train.label_smoothing == 0.0
    with pytest.raises(ConfigError, match="train.label_smoothing"):
        load_config("configs/experiment/demo.yaml", ["train.label_smoothing=1.5"])
