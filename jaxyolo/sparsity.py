"""N:M structured sparsity (2:4 by default): in every group of M consecutive weights along a
convolution's input channels, N are kept and the rest are zero, the pattern sparse tensor cores
run at twice the dense rate (NVIDIA Ampere and later, through cuSPARSELt / TensorRT).

The recipe is the usual one: train dense, compute magnitude masks once (per group, keep the N
weights of largest |w|), then fine-tune with the masks fixed. Here the masks are the training
state's `extras` and three `jaxyolo.train_step.StepHooks` keep them:

* `init`: the masks from the starting weights (fresh or rewound; a resumed run keeps its saved
  masks), applied to the weights and to their EMA;
* `grads`: pruned weights get no gradient;
* `params`: after each optimiser step the weights are multiplied by the masks again (weight decay
  and momentum would otherwise move the zeros).

The EMA of masked weights stays masked, so the saved and exported weights are exactly N:M
(`check`). Which weights: every convolution kernel (HWIO) whose input channels per group are a
multiple of M — depthwise kernels (one input channel per group) and the 3-channel stem are
dense, as in NVIDIA's automatic sparsity tooling. Everything is a pytree op on the member's state,
so a vmapped population prunes each member by its own weights.
"""

from __future__ import annotations

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo.errors import ConfigError

PATTERN = re.compile(r"^(\d+):(\d+)$")


@dataclasses.dataclass(frozen=True)
class Pattern:
    keep: int = 2  # N: weights kept per group
    group: int = 4  # M: consecutive input channels per group

    @classmethod
    def parse(cls, text: str) -> "Pattern":
        m = PATTERN.match(str(text).strip())
        if not m or not 0 < int(m.group(1)) < int(m.group(2)):
            raise ConfigError(f"sparsity: expected N:M with 0 < N < M (e.g. 2:4), got {text!r}")
        return cls(int(m.group(1)), int(m.group(2)))

    def __str__(self) -> str:
        return f"{self.keep}:{self.group}"


def _name(path) -> str:
    return ".".join(str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k)))) for k in path
                    if getattr(k, "name", None) != "value")


def prunable(path, leaf, pattern: Pattern = Pattern()) -> bool:
    """A convolution kernel (HWIO, named `weight`) with a multiple of M input channels per group."""
    names = _name(path).split(".")
    return names[-1] == "weight" and np.ndim(leaf) == 4 and np.shape(leaf)[-2] % pattern.group == 0


def nm_mask(w, pattern: Pattern = Pattern()):
    """The magnitude mask of a kernel (kh, kw, cin, cout): in each group of M input channels the N
    weights of largest |w| are 1 (ties: the lower channel wins), the others 0."""
    kh, kw, cin, cout = w.shape
    m = pattern.group
    g = jnp.abs(w).reshape(kh, kw, cin // m, m, cout)
    # rank within the group: how many of the group beat each weight (a stable order for ties)
    idx = jnp.arange(m)
    beats = (g[:, :, :, None, :, :] > g[:, :, :, :, None, :]) | (
        (g[:, :, :, None, :, :] == g[:, :, :, :, None, :]) & (idx[None, :, None] < idx[:, None, None]))
    rank = beats.sum(4)  # (kh, kw, cin/m, m, cout): for each weight, the group members that beat it
    return (rank < pattern.keep).astype(w.dtype).reshape(w.shape)


def masks(params, pattern: Pattern = Pattern()):
    """A tree like `params`: the N:M mask of every prunable kernel, a scalar 1 elsewhere."""
    return jax.tree_util.tree_map_with_path(
        lambda p, x: nm_mask(x, pattern) if prunable(p, x, pattern) else jnp.ones((), x.dtype), params)


def apply(params, mask_tree):
    return jax.tree.map(lambda x, m: x * m, params, mask_tree)


def hooks(pattern: Pattern | str = Pattern()):
    """The `StepHooks` of a fixed-mask N:M fine-tune (the masks live in `state.extras['sparsity']`)."""
    from jaxyolo.train_step import StepHooks

    pattern = Pattern.parse(pattern) if isinstance(pattern, str) else pattern

    def init(state):
        mk = masks(state.params, pattern)
        extras = dict(state.extras or {})
        extras["sparsity"] = mk
        return state.replace(params=apply(state.params, mk), ema_params=apply(state.ema_params, mk), extras=extras)

    return StepHooks(init=init,
                     grads=lambda g, params, extras, hyp: apply(g, extras["sparsity"]),
                     params=lambda new, old, extras, hyp: apply(new, extras["sparsity"]))


def layer_report(params, pattern: Pattern = Pattern()) -> list[dict]:
    """Per kernel: name, shape, weights, zeros, whether it is prunable and whether it is exactly
    N:M (every group of M input channels has at least M − N zeros)."""
    rows = []
    for path, x in jax.tree_util.tree_leaves_with_path(params):
        if np.ndim(x) != 4:
            continue
        a = np.asarray(x)
        row = {"name": _name(path), "shape": list(a.shape), "weights": int(a.size), "zeros": int(np.sum(a == 0)),
               "prunable": prunable(path, a, pattern)}
        row["n_m"] = bool(row["prunable"] and _is_nm(a, pattern))
        rows.append(row)
    return rows


def _is_nm(a: np.ndarray, pattern: Pattern) -> bool:
    kh, kw, cin, cout = a.shape
    nonzero = (a.reshape(kh, kw, cin // pattern.group, pattern.group, cout) != 0).sum(3)
    return bool(np.all(nonzero <= pattern.keep))


def check(params, pattern: Pattern = Pattern()) -> dict:
    """{'pattern', 'prunable_weights', 'prunable_zeros', 'all_weights', 'all_zeros', 'exact'}:
    whether every prunable kernel is exactly N:M, and the zero fractions."""
    rows = layer_report(params, pattern)
    total = sum(int(np.size(x)) for x in jax.tree.leaves(params))
    zeros = sum(int(np.sum(np.asarray(x) == 0)) for x in jax.tree.leaves(params))
    pr = [r for r in rows if r["prunable"]]
    return {"pattern": str(pattern), "prunable_kernels": len(pr), "prunable_weights": sum(r["weights"] for r in pr),
            "prunable_zeros": sum(r["zeros"] for r in pr), "all_weights": total, "all_zeros": zeros,
            "exact": all(r["n_m"] for r in pr)}


__all__ = ["Pattern", "prunable", "nm_mask", "masks", "apply", "hooks", "layer_report", "check"]
