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


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def batch_norm_act(x, weight, bias, act, eps: float):
    """(act(BN_train(x)), batch mean, batch biased variance); x float32 (..., C)."""
    return _forward(x, weight, bias, act, eps)[0]


def _forward(x, weight, bias, act, eps):
    mean, var = batch_stats(x)
    r = lax.rsqrt(var + eps)
    z = (x - mean) * (weight * r) + bias
    if act in _HAND_WRITTEN:
        # `weight * 0 + 1`, which XLA does not fold: a scalar 1 broadcast to an activation's shape
        # would be one array shared by every fusion of that shape, which XLA's CPU backend
        # materialises (the yolov4s step measured 4 % slower)
        y = _HAND_WRITTEN[act][0](z, weight * 0 + 1)
    else:
        y = act(z)
    return (y, mean, var), (x, weight, bias, mean, r)


def _backward(act, eps, res, cts):
    dy = cts[0]  # the statistics' cotangents are dropped: they feed only the running averages
    x, weight, bias, mean, r = res
    shape = x.shape
    if x.ndim == 4:
        # on an (N·H, W, C) view: broadcasts of the per-channel vectors to another shape than the
        # forward's are not merged with the forward's by CSE. Merged, each would be shared by two
        # fusions, and XLA's CPU backend would materialise it as an activation-sized array (the
        # train step measured 1.2× slower; a 2-D (N·H·W, C) view made its reductions slow)
        x, dy = x.reshape(-1, shape[2], shape[3]), dy.reshape(-1, shape[2], shape[3])
    n = x.size // x.shape[-1]
    axes = tuple(range(x.ndim - 1))
    xhat = (x - mean) * r
    z = xhat * weight + bias
    if act in _HAND_WRITTEN:
        dz = _HAND_WRITTEN[act][1](z, dy, weight * 0 + 1)
    else:
        dz = jax.vjp(act, z)[1](dy)[0]
    dbias, dweight = jnp.sum(dz, axes), jnp.sum(dz * xhat, axes)
    dx = (weight * r) * (dz - dbias / n - xhat * (dweight / n))
    return dx.reshape(shape), dweight, dbias


batch_norm_act.defvjp(_forward, _backward)
