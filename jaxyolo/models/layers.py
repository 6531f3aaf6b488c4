"""Building blocks of the YOLOv4 family (docs/reference.md §2-§3), in Flax NNX.

Every module keeps the reference PyTorch attribute names (`conv`, `bn`, `cv1` ... `m`), so the
path of each variable *is* its PyTorch state_dict key (see `jaxyolo.models.state_dict`), and lists
the reference's registration order in `TORCH_ORDER` (NNX re-creates modules with their attributes
sorted, so attribute order cannot carry it). Activations are NHWC; conv weights HWIO.

`fused=True` builds the inference form: BatchNorm folded into the preceding convolution, which
then carries a bias (see `jaxyolo.models.fold`).
"""

from __future__ import annotations

import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxyolo.errors import ConfigError
from jaxyolo.models.conv import conv2d
from jaxyolo.models.norm import batch_norm_act, norm_act_eval

# BatchNorm settings of the reference after `initialize_weights` (docs/reference.md §2).
BN_EPS = 1e-3
BN_MOMENTUM = 0.03  # PyTorch convention: running <- (1 - m) * running + m * batch


def mish(x):
    return x * jnp.tanh(jax.nn.softplus(x))


ACTIVATIONS = {"silu": jax.nn.silu, "mish": mish, "leaky": lambda x: jax.nn.leaky_relu(x, 0.1), "relu6": jax.nn.relu6,
               "relu": jax.nn.relu, "linear": lambda x: x}


def activation(name: str):
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise ConfigError(f"act: unknown activation {name!r} (choose one of {', '.join(ACTIVATIONS)})") from None


def host_or_traced_rng(rngs: nnx.Rngs):
    """The next parameter key, as a numpy Generator when eager, else the traced key itself.

    Eager construction draws on the host, seeded from the NNX key: compiling one random kernel
    per tensor shape made building even the nano model take ~20 s. Under `nnx.eval_shape` (shapes
    only) the traced key is returned so nothing is drawn at all.
    """
    key = rngs.params()
    if isinstance(key, jax.core.Tracer):
        return key
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


def random_uniform(rngs: nnx.Rngs, shape, bound: float):
    rng = host_or_traced_rng(rngs)
    if isinstance(rng, np.random.Generator):
        return jnp.asarray(rng.uniform(-bound, bound, shape).astype(np.float32))
    return jax.random.uniform(rng, shape, jnp.float32, -bound, bound)


def random_normal(rngs: nnx.Rngs, shape, mean: float, std: float):
    rng = host_or_traced_rng(rngs)
    if isinstance(rng, np.random.Generator):
        return jnp.asarray(rng.normal(mean, std, shape).astype(np.float32))
    return mean + std * jax.random.normal(rng, shape, jnp.float32)


class Conv2d(nnx.Module):
    """A 2-D convolution with symmetric zero padding k//2 (PyTorch's), weight HWIO.

    Initialised like PyTorch's default: weight and bias ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)).
    `groups` splits the channels into that many independent convolutions (weight (k, k, c1 /
    groups, c2)); groups = c1 = c2 is a depthwise convolution.
    """

    TORCH_ORDER = ("weight", "bias")

    def __init__(self, c1: int, c2: int, k: int = 1, s: int = 1, *, bias: bool = False, groups: int = 1, dtype=None,
                 rngs: nnx.Rngs):
        if c1 % groups or c2 % groups:
            raise ConfigError(f"Conv2d: channels {c1} -> {c2} are not divisible into {groups} groups")
        bound = 1.0 / math.sqrt(c1 // groups * k * k)
        self.weight = nnx.Param(random_uniform(rngs, (k, k, c1 // groups, c2), bound))
        self.bias = nnx.Param(random_uniform(rngs, (c2,), bound)) if bias else None
        self.stride = s
        self.groups = groups
        self.dtype = dtype

    def __call__(self, x):
        w = self.weight[...]
        if self.dtype is not None:
            x, w = x.astype(self.dtype), w.astype(self.dtype)
        y = conv2d(x, w, self.stride, self.groups)
        if self.bias is not None:
            y = y + self.bias[...].astype(y.dtype)
        return y


class BatchNorm2d(nnx.Module):
    """BatchNorm over the channel (last) axis with PyTorch's semantics.

    Training normalises with the biased batch variance and updates the running variance with the
    unbiased one, as torch does, so BN statistics match the reference within float32 rounding.
    """

    TORCH_ORDER = ('weight', 'bias', 'running_mean', 'running_var')

    def __init__(self, c: int, *, rngs: nnx.Rngs | None = None):
        del rngs
        self.weight = nnx.Param(jnp.ones((c,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))
        self.running_mean = nnx.BatchStat(jnp.zeros((c,), jnp.float32))
        self.running_var = nnx.BatchStat(jnp.ones((c,), jnp.float32))

    def __call__(self, x, *, train: bool, act=None):
        """Normalise `x`, then apply `act` if given (fused with the normalisation's gradient)."""
        xf = x.astype(jnp.float32)
        act = act or _identity
        if not train:
            scale = self.weight[...] * jax.lax.rsqrt(self.running_var[...] + BN_EPS)
            return norm_act_eval(xf, self.running_mean[...], scale, self.bias[...], act).astype(x.dtype)
        y, mean, var = batch_norm_act(xf, self.weight[...], self.bias[...], act, BN_EPS)
        n = math.prod(x.shape[:-1])
        m = BN_MOMENTUM
        self.running_mean[...] = (1 - m) * self.running_mean[...] + m * jax.lax.stop_gradient(mean)
        unbiased = var * (n / max(n - 1, 1))
        self.running_var[...] = (1 - m) * self.running_var[...] + m * jax.lax.stop_gradient(unbiased)
        return y.astype(x.dtype)


def _identity(x):
    return x


class Affine(nnx.Module):
    """Per-channel scale and shift: a BatchNorm in inference form (used by fused CSP blocks)."""

    TORCH_ORDER = ("weight", "bias")

    def __init__(self, c: int):
        self.weight = nnx.Param(jnp.ones((c,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((c,), jnp.float32))

    def __call__(self, x, *, train=False, act=None):
        y = x * self.weight[...].astype(x.dtype) + self.bias[...].astype(x.dtype)
        return act(y) if act else y


class Conv(nnx.Module):
    """Conv (no bias) -> BatchNorm -> activation; fused: conv with bias -> activation."""

    TORCH_ORDER = ('conv', 'bn')

    def __init__(self, c1, c2, k=1, s=1, *, act="silu", fused=False, groups=1, dtype=None, rngs):
        self.conv = Conv2d(c1, c2, k, s, bias=fused, groups=groups, dtype=dtype, rngs=rngs)
        self.bn = None if fused else BatchNorm2d(c2)
        self.act = act
        activation(act)  # fail early on an unknown name

    def __call__(self, x, *, train=False):
        y = self.conv(x)
        if self.bn is not None:
            return self.bn(y, train=train, act=activation(self.act))
        return activation(self.act)(y)


class Bottleneck(nnx.Module):
    """1x1 Conv to c2*e channels, 3x3 Conv back to c2; residual if `shortcut` and c1 == c2."""

    TORCH_ORDER = ('cv1', 'cv2')

    def __init__(self, c1, c2, shortcut=True, e=0.5, **kw):
        h = int(c2 * e)
        self.cv1 = Conv(c1, h, 1, 1, **kw)
        self.cv2 = Conv(h, c2, 3, 1, **kw)
        self.add = bool(shortcut and c1 == c2)

    def __call__(self, x, *, train=False):
        y = self.cv2(self.cv1(x, train=train), train=train)
        return x + y if self.add else y


class _CSPBase(nnx.Module):
    """Shared tail of the CSP blocks: BN over cat(main, side) then activation.

    In the fused form the BN becomes its inference-time affine map (`Affine`): the main branch of
    BottleneckCSP2 and SPPCSP ends in an activation, so that BN cannot move into a convolution.
    """

    def _merge(self, main, side, train):
        y = jnp.concatenate([main, side], axis=-1)
        return self.bn(y, train=train, act=activation(self.act))


class BottleneckCSP(_CSPBase):
    """Backbone CSP block: main = cv3(m(cv1(x))), side = cv2(x), n residual Bottlenecks."""

    TORCH_ORDER = ('cv1', 'cv2', 'cv3', 'cv4', 'bn', 'm')

    def __init__(self, c1, c2, n=1, shortcut=True, *, act="silu", fused=False, dtype=None, rngs):
        kw = dict(act=act, fused=fused, dtype=dtype, rngs=rngs)
        c = int(c2 * 0.5)
        self.cv1 = Conv(c1, c, 1, 1, **kw)
        self.cv2 = Conv2d(c1, c, 1, 1, dtype=dtype, rngs=rngs)
        self.cv3 = Conv2d(c, c, 1, 1, dtype=dtype, rngs=rngs)
        self.cv4 = Conv(2 * c, c2, 1, 1, **kw)
        self.bn = Affine(2 * c) if fused else BatchNorm2d(2 * c)
        self.act = act
        self.m = nnx.List([Bottleneck(c, c, shortcut, 1.0, **kw) for _ in range(n)])

    def __call__(self, x, *, train=False):
        y = self.cv1(x, train=train)
        for b in self.m:
            y = b(y, train=train)
        return self.cv4(self._merge(self.cv3(y), self.cv2(x), train), train=train)


class BottleneckCSP2(_CSPBase):
    """Neck CSP block ("rCSP"): x1 = cv1(x); main = m(x1) without residuals, side = cv2(x1)."""

    TORCH_ORDER = ('cv1', 'cv2', 'cv3', 'bn', 'm')

    def __init__(self, c1, c2, n=1, *, act="silu", fused=False, dtype=None, rngs):
        kw = dict(act=act, fused=fused, dtype=dtype, rngs=rngs)
        c = int(c2)
        self.cv1 = Conv(c1, c, 1, 1, **kw)
        self.cv2 = Conv2d(c, c, 1, 1, dtype=dtype, rngs=rngs)
        self.cv3 = Conv(2 * c, c2, 1, 1, **kw)
        self.bn = Affine(2 * c) if fused else BatchNorm2d(2 * c)
        self.act = act
        self.m = nnx.List([Bottleneck(c, c, False, 1.0, **kw) for _ in range(n)])

    def __call__(self, x, *, train=False):
        x1 = self.cv1(x, train=train)
        y = x1
        for b in self.m:
            y = b(y, train=train)
        return self.cv3(self._merge(y, self.cv2(x1), train), train=train)


def max_pool_same(x, k: int):
    """k x k max-pool, stride 1, padding k//2 with -inf (PyTorch's MaxPool2d), on NHWC.

    Computed separably, a 1-D max over k rows then over k columns, each as a `reduce_window` on
    a rank-3 view: the k x k maximum is exactly the maximum of the row maxima, so the values are
    identical to the 2-D pool (max is exact), and XLA does O(2k) instead of O(k^2) work. The
    rank-3 form matters for ONNX export: jax2onnx lowers a `reduce_window` max to a MaxPool over
    *every* axis of its operand, and onnxruntime's MaxPool takes at most 3 spatial axes.
    """
    p = k // 2
    b, h, w, c = x.shape

    def pool_axis1(v):  # (N, L, M) -> max over a window of k along L
        return jax.lax.reduce_window(v, -jnp.inf, jax.lax.max, (1, k, 1), (1, 1, 1), ((0, 0), (p, p), (0, 0)))

    y = pool_axis1(x.reshape(b, h, w * c)).reshape(b, h, w, c)  # along H
    return pool_axis1(y.reshape(-1, w, c)).reshape(b, h, w, c)  # along W


class SPPCSP(_CSPBase):
    """CSP spatial pyramid pooling: max-pools 5/9/13 on the main branch, plain 1x1 side branch."""

    TORCH_ORDER = ('cv1', 'cv2', 'cv3', 'cv4', 'cv5', 'cv6', 'bn', 'cv7')

    def __init__(self, c1, c2, k: Sequence[int] = (5, 9, 13), *, act="silu", fused=False, dtype=None, rngs):
        kw = dict(act=act, fused=fused, dtype=dtype, rngs=rngs)
        c = int(c2)
        self.cv1 = Conv(c1, c, 1, 1, **kw)
        self.cv2 = Conv2d(c1, c, 1, 1, dtype=dtype, rngs=rngs)
        self.cv3 = Conv(c, c, 3, 1, **kw)
        self.cv4 = Conv(c, c, 1, 1, **kw)
        self.pools = tuple(int(v) for v in k)
        self.cv5 = Conv(4 * c, c, 1, 1, **kw)
        self.cv6 = Conv(c, c, 3, 1, **kw)
        self.bn = Affine(2 * c) if fused else BatchNorm2d(2 * c)
        self.act = act
        self.cv7 = Conv(2 * c, c2, 1, 1, **kw)

    def __call__(self, x, *, train=False):
        x1 = self.cv4(self.cv3(self.cv1(x, train=train), train=train), train=train)
        pooled = jnp.concatenate([x1] + [max_pool_same(x1, k) for k in self.pools], axis=-1)
        y1 = self.cv6(self.cv5(pooled, train=train), train=train)
        return self.cv7(self._merge(y1, self.cv2(x), train), train=train)


class Upsample(nnx.Module):
    """Nearest-neighbour upsampling by repetition (exact, and exports with a dynamic batch)."""

    def __init__(self, scale: int = 2):
        self.scale = int(scale)

    def __call__(self, x, *, train=False):
        return jnp.repeat(jnp.repeat(x, self.scale, axis=1), self.scale, axis=2)


class Concat(nnx.Module):
    """Channel concatenation, inputs in the order the table lists them."""

    def __call__(self, xs, *, train=False):
        return jnp.concatenate(xs, axis=-1)
