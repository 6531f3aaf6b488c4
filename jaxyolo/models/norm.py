"""Training-mode BatchNorm followed by an activation, with a hand-written gradient.

Autodiff of `act((x - mean) * rsqrt(var + eps) * weight + bias)` produces a chain of a dozen
elementwise and reduction ops, and XLA's CPU backend runs each as its own pass over the activation
(at 8×160×160×32 the forward + backward took 4× PyTorch's fused kernel). The gradient in closed
form needs few passes over the activation: dz = act'(z)·dy, one reduction for Σ dz and Σ dz·x̂,
and one elementwise pass for dx (XLA computes dz once and keeps it; recomputing it in both passes
measured slower):

    x̂ = (x - μ)·r,  r = 1/√(σ² + ε),  z = x̂·γ + β
    dβ = Σ dz,  dγ = Σ dz·x̂,  dx = γ·r·(dz - dβ/n - x̂·dγ/n)

The statistics are those of the plain formula (two-pass mean and biased variance, as PyTorch
computes them); SiLU is computed as z / (1 + e^-z), equal to z·σ(z) within float32 rounding.
Narrow activations (fewer than `NARROW_C` channels) are processed on an (N·H, W·C) view, so the
sums run in another order there: equal within rounding.
The batch statistics are returned for the running averages and carry no gradient.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def _silu(z, one):
    return z / (one + jnp.exp(-z))


def _silu_grad(z, dy, one):
    s = one / (one + jnp.exp(-z))
    return dy * s * (one + z * (one - s))


# Activations written by hand, with the constant 1 passed in as a per-channel vector (see
# `_forward`); any other activation is applied as given and differentiated by autodiff.
_HAND_WRITTEN = {jax.nn.silu: (_silu, _silu_grad)}


def batch_stats(x):
    """Mean and biased variance over every axis but the last (the channels)."""
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    return mean, jnp.mean(jnp.square(x - mean), axes)


# Below this many channels an NHWC activation is processed as rows of W·C values, with every
# per-channel vector tiled W times: XLA's CPU kernels vectorise the last axis, and one of 4-16
# floats leaves most of each vector register empty (elementwise passes at 32×128×128×8 measured
# 5× faster on the (N·H, W·C) view; from 32 channels on, the same). Thresholds 32, 64, 128 and
# "every layer" gave the yolov4n step within its noise of each other; 64 leaves the wide layers on
# the layout the yolov4s step was tuned with.
NARROW_C = 64


def _lanes(x) -> int:
    """How many pixels of a row share the last axis of the view `batch_norm_act` works on."""
    return x.shape[-2] if x.ndim == 4 and x.shape[-1] < NARROW_C else 1


def _channel_sum(v, lanes: int, c: int):
    """Σ over the leading axes of a view whose last axis is `lanes` pixels × `c` channels → (c,)."""
    s = jnp.sum(v, tuple(range(v.ndim - 1)))
    return s.reshape(lanes, c).sum(0) if lanes > 1 else s


def norm_act_eval(x, mean, scale, bias, act):
    """act((x - mean) · scale + bias) with per-channel vectors: inference-mode BatchNorm, on the
    (N·H, W·C) row view when `x` is a narrow NHWC activation (as `batch_norm_act`; a yolov4n
    forward at 16 × 128² took 21.1 ms on the 4-D layout, 16.8 ms on the row view)."""
    lanes, c = _lanes(x), x.shape[-1]
    if lanes == 1:
        return act((x - mean) * scale + bias)
    v = x.reshape(-1, lanes * c)
    return act((v - jnp.tile(mean, lanes)) * jnp.tile(scale, lanes) + jnp.tile(bias, lanes)).reshape(x.shape)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_act(x, weight, bias, act, eps: float):
    """(act(BN_train(x)), batch mean, batch biased variance); x float32 (..., C)."""
    return _forward(x, weight, bias, act, eps)[0]


def _forward(x, weight, bias, act, eps):
    shape, c, lanes = x.shape, x.shape[-1], _lanes(x)
    if lanes > 1:
        v = x.reshape(-1, lanes * c)
        n = v.shape[0] * lanes
        mean = _channel_sum(v, lanes, c) / n
        var = _channel_sum(jnp.square(v - jnp.tile(mean, lanes)), lanes, c) / n
        tile = lambda p: jnp.tile(p, lanes)
    else:
        v = x
        mean, var = batch_stats(x)
        tile = lambda p: p
    r = lax.rsqrt(var + eps)
    z = (v - tile(mean)) * tile(weight * r) + tile(bias)
    if act in _HAND_WRITTEN:
        # `weight * 0 + 1`, which XLA does not fold: a scalar 1 broadcast to an activation's shape
        # would be one array shared by every fusion of that shape, which XLA's CPU backend
        # materialises (the yolov4s step measured 4 % slower)
        y = _HAND_WRITTEN[act][0](z, tile(weight * 0 + 1))
    else:
        y = act(z)
    return (y.reshape(shape), mean, var), (x, weight, bias, mean, r)


def _backward(act, eps, res, cts):
    dy = cts[0]  # the statistics' cotangents are dropped: they feed only the running averages
    x, weight, bias, mean, r = res
    shape, c, lanes = x.shape, x.shape[-1], _lanes(x)
    # views of another shape than the forward's: broadcasts of the per-channel vectors are then not
    # merged with the forward's by CSE. Merged, each would be shared by two fusions, and XLA's CPU
    # backend would materialise it as an activation-sized array (the train step measured 1.2×
    # slower; a 2-D (N·H·W, C) view made its reductions slow)
    if lanes > 1:
        view = (shape[0], -1, lanes * c)
    elif x.ndim == 4:
        view = (-1, shape[2], shape[3])
    else:
        view = shape
    x, dy = x.reshape(view), dy.reshape(view)
    n = x.size // c
    tile = (lambda p: jnp.tile(p, lanes)) if lanes > 1 else (lambda p: p)
    xhat = (x - tile(mean)) * tile(r)
    z = xhat * tile(weight) + tile(bias)
    if act in _HAND_WRITTEN:
        dz = _HAND_WRITTEN[act][1](z, dy, tile(weight * 0 + 1))
    else:
        dz = jax.vjp(act, z)[1](dy)[0]
    dbias, dweight = _channel_sum(dz, lanes, c), _channel_sum(dz * xhat, lanes, c)
    dx = tile(weight * r) * (dz - tile(dbias / n) - xhat * tile(dweight / n))
    return dx.reshape(shape), dweight, dbias


batch_norm_act.defvjp(_forward, _backward)
