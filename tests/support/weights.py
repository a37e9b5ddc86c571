"""Random parameters under the names and shapes that vit_jax and big_vision save."""

from __future__ import annotations

import numpy as np

D, HEADS, MLP, DEPTH, PATCH, GRID, CLASSES, REP = 48, 4, 64, 2, 4, 4, 5, 24


def flax_params(rng: np.random.Generator, big_vision: bool = False, token: bool = True) -> dict[str, np.ndarray]:
    """Random parameters under the names and shapes vit_jax (or big_vision) saves."""

    def r(*shape, scale=0.2):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    hd = D // HEADS
    mha, mlp, ln2 = (
        ("MultiHeadDotProductAttention_0", "MlpBlock_0", "LayerNorm_1")
        if big_vision
        else ("MultiHeadDotProductAttention_1", "MlpBlock_3", "LayerNorm_2")
    )
    p = {
        "embedding/kernel": r(PATCH, PATCH, 3, D),
        "embedding/bias": r(D),
        "Transformer/encoder_norm/scale": 1 + r(D),
        "Transformer/encoder_norm/bias": r(D),
        "pre_logits/kernel": r(D, REP),
        "pre_logits/bias": r(REP),
        "head/kernel": r(REP, CLASSES),
        "head/bias": r(CLASSES),
    }
    if token:
        p["cls"] = r(1, 1, D)
    tokens = GRID * GRID + (token and not big_vision)
    p["pos_embedding" if big_vision else "Transformer/posembed_input/pos_embedding"] = r(1, tokens, D)
    for i in range(DEPTH):
        b = f"Transformer/encoderblock_{i}/"
        p.update(
            {
                b + "LayerNorm_0/scale": 1 + r(D),
                b + "LayerNorm_0/bias": r(D),
                b + f"{ln2}/scale": 1 + r(D),
                b + f"{ln2}/bias": r(D),
                b + f"{mha}/out/kernel": r(HEADS, hd, D),
                b + f"{mha}/out/bias": r(D),
                b + f"{mlp}/Dense_0/kernel": r(D, MLP),
                b + f"{mlp}/Dense_0/bias": r(MLP),
                b + f"{mlp}/Dense_1/kernel": r(MLP, D),
                b + f"{mlp}/Dense_1/bias": r(D),
            }
        )
        for n in ("query", "key", "value"):
            p[b + f"{mha}/{n}/kernel"], p[b + f"{mha}/{n}/bias"] = r(D, HEADS, hd), r(HEADS, hd)
    return p
