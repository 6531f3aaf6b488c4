"""The fused training BatchNorm + activation (`jaxyolo.models.norm`) and the space-to-depth form of
strided convolutions (`jaxyolo.models.conv`) against their plain formulas under autodiff."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jaxyolo.models.conv import _conv, space_to_depth_conv
from jaxyolo.models.layers import ACTIVATIONS
from jaxyolo.models.norm import NARROW_C, batch_norm_act

EPS = 1e-3


def plain(x, weight, bias, act):
    axes = tuple(range(x.ndim - 1))
    mean = jnp.mean(x, axes)
    var = jnp.mean(jnp.square(x - mean), axes)
    return act((x - mean) * (weight * jax.lax.rsqrt(var + EPS)) + bias), mean, var


@pytest.mark.parametrize("act", ["silu", "leaky", "mish", None])
@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (2, 3, 5, 64), (7, 6)])
def test_batch_norm_act_matches_autodiff_of_the_plain_formula(act, shape):
    fn = ACTIVATIONS[act] if act else (lambda v: v)
    rng = np.random.default_rng(len(shape))
    x = jnp.asarray(rng.normal(1.5, 2.0, shape).astype(np.float32))
    weight = jnp.asarray(rng.uniform(0.5, 1.5, shape[-1]).astype(np.float32))
    bias = jnp.asarray(rng.normal(0, 0.5, shape[-1]).astype(np.float32))
    probe = jnp.asarray(rng.normal(size=shape).astype(np.float32))  # a loss that weighs every output

    fused = batch_norm_act(x, weight, bias, fn, EPS)
    ref = plain(x, weight, bias, fn)
    # on the row view of narrow activations the sums run in another order: equal within rounding;
    # otherwise the same formula in the same order, so the same values, except silu (written
    # z / (1 + e^-z) there, z·σ(z) here)
    narrow = len(shape) == 4 and shape[-1] < NARROW_C
    for a, b in zip(fused[1:], ref[1:]):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6 if narrow else 0, atol=1e-7 if narrow else 0)
    tol = 1e-6 if narrow or act == "silu" else 0
    np.testing.assert_allclose(np.asarray(fused[0]), np.asarray(ref[0]), rtol=tol, atol=tol)

    loss = lambda f: (lambda x, w, b: jnp.sum(jnp.tanh(f(x, w, b, fn)[0]) * probe))
    g_fused = jax.grad(loss(lambda *a: batch_norm_act(*a, EPS)), (0, 1, 2))(x, weight, bias)
    g_ref = jax.grad(loss(plain), (0, 1, 2))(x, weight, bias)
    for a, b in zip(g_fused, g_ref):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-5)


def test_batch_norm_act_gradient_under_vmap_and_jit():
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(size=(3, 2, 4, 4, 5)).astype(np.float32))  # a population of 3
    w, b = jnp.ones((3, 5)), jnp.zeros((3, 5))
    f = lambda fn: jax.jit(jax.vmap(jax.grad(lambda x, w, b: jnp.sum(fn(x, w, b)[0] ** 3), (0, 1, 2))))
    got = f(lambda x, w, b: batch_norm_act(x, w, b, jax.nn.silu, EPS))(x, w, b)
    want = f(lambda x, w, b: plain(x, w, b, jax.nn.silu))(x, w, b)
    for a, c in zip(got, want):
        np.testing.assert_allclose(np.asarray(a), np.asarray(c), rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("k,s,h,w", [(3, 2, 12, 12), (3, 2, 13, 11), (1, 2, 9, 10), (5, 2, 11, 12),
                                     (3, 3, 14, 10), (5, 3, 16, 17)])
def test_space_to_depth_conv_is_the_strided_conv(k, s, h, w):
    rng = np.random.default_rng(k + s + h)
    x = jnp.asarray(rng.normal(size=(2, h, w, 3)).astype(np.float32))
    wt = jnp.asarray(rng.normal(size=(k, k, 3, 4)).astype(np.float32))
    want = _conv(x, wt, s)
    got = space_to_depth_conv(x, wt, s)
    assert got.shape == want.shape
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape", [(2, 5, 3, 4), (2, 3, 5, 64), (7, 6)])
def test_norm_act_eval_is_the_plain_formula(shape):
    from jaxyolo.models.norm import norm_act_eval

    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(size=shape).astype(np.float32))
    mean, scale, bias = (jnp.asarray(rng.normal(size=shape[-1]).astype(np.float32)) for _ in range(3))
    got = norm_act_eval(x, mean, scale, bias, jax.nn.silu)
    want = jax.nn.silu((x - mean) * scale + bias)
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))  # the same ops per element
