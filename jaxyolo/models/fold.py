"""Fold a trained model into its inference form (docs/reference.md §5).

1. Implicit head: with the chosen shift a and scale m of each level (the candidates' mean, or one
   candidate pair), out = m ⊙ (W(x + a) + b) = (m ⊙ W) x + m ⊙ (b + W a), so the head becomes a
   plain Detect conv.
2. BatchNorm after a conv: W' = W·γ/√(var+eps) per output channel, b' = β − γ·mean/√(var+eps).
   The BN that CSP blocks apply to cat(main, side) becomes its affine map (see layers.Affine).

The fold works on the reference-named state_dict, so it is the same arithmetic whichever side of
the PyTorch boundary the weights come from, and its result loads into the fused model through the
one mapping in `jaxyolo.models.state_dict`.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Mapping

import numpy as np
from flax import nnx

from jaxyolo.models.state_dict import load_state_dict, to_state_dict
from jaxyolo.models.layers import BN_EPS
from jaxyolo.models.yolo import YOLO


def fold_state_dict(
    state: Mapping[str, np.ndarray], *, head_prefix: str, kst_index=None, bn: bool = True
) -> "OrderedDict[str, np.ndarray]":
    """Fold implicit vectors (and, if `bn`, BatchNorms) of a reference state_dict."""
    sd = OrderedDict((k, np.asarray(v, np.float64) if np.issubdtype(np.asarray(v).dtype, np.floating) else v)
                     for k, v in state.items())
    _fold_implicit(sd, head_prefix, kst_index)
    if bn:
        _fold_batchnorms(sd)
    return OrderedDict((k, v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in sd.items())


def _select(cands: np.ndarray, index) -> np.ndarray:
    """(K, C, 1, 1) candidates -> (C,) vector: the mean, or candidate `index`."""
    flat = cands[:, :, 0, 0]
    return flat.mean(0) if index is None else flat[int(index)]


def _fold_implicit(sd, p: str, kst_index) -> None:
    level = 0
    while f"{p}ia.{level}.implicit" in sd:
        a = _select(sd.pop(f"{p}ia.{level}.implicit"), None if kst_index is None else kst_index[0])
        m = _select(sd.pop(f"{p}im.{level}.implicit"), None if kst_index is None else kst_index[1])
        w = sd[f"{p}m.{level}.weight"]  # (na*no, C, 1, 1)
        b = sd[f"{p}m.{level}.bias"]
        sd[f"{p}m.{level}.bias"] = m * (b + w[:, :, 0, 0] @ a)
        sd[f"{p}m.{level}.weight"] = w * m[:, None, None, None]
        level += 1


def _fold_batchnorms(sd) -> None:
    for key in [k for k in sd if k.endswith("bn.running_var")]:
        p = key[: -len("bn.running_var")]
        gamma, beta = sd[p + "bn.weight"], sd[p + "bn.bias"]
        mean, var = sd.pop(p + "bn.running_mean"), sd.pop(p + "bn.running_var")
        sd.pop(p + "bn.num_batches_tracked", None)
        scale = gamma / np.sqrt(var + BN_EPS)
        shift = beta - mean * scale
        if p + "conv.weight" in sd:  # Conv block: into the conv, which gains a bias
            del sd[p + "bn.weight"], sd[p + "bn.bias"]
            sd[p + "conv.weight"] = sd[p + "conv.weight"] * scale[:, None, None, None]
            sd[p + "conv.bias"] = shift
        else:  # BN over a CSP concatenation: keep its affine map
            sd[p + "bn.weight"], sd[p + "bn.bias"] = scale, shift


def fold(model, *, kst_index=None, bn: bool = True):
    """A new YOLO module in inference form whose eval outputs equal `model`'s.

    `kst_index=None` folds the candidates' mean (the model's inference default); a (shift, scale)
    pair folds that candidate pair. `bn=False` keeps BatchNorms (a plain Detect model with the
    reference's Detect keys, loadable by the reference code).
    """
    head_prefix = f"model.{len(model.spec.layers) - 1}."
    folded = fold_state_dict(to_state_dict(model), head_prefix=head_prefix, kst_index=kst_index,
                             bn=bn and not model.options.fused)
    options = dataclasses.replace(model.options, head="detect", fused=model.options.fused or bn)
    new = nnx.eval_shape(lambda: YOLO(model.spec, options, rngs=nnx.Rngs(0)))
    load_state_dict(new, folded, source="fold")
    return new
