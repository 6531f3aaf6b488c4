"""The 2-D convolution of every layer, with a gradient that XLA's CPU backend runs fast.

The forward is the plain `lax.conv_general_dilated` (NHWC, HWIO, symmetric zero padding k//2), so
inference, export and the forward values are exactly those of a plain convolution. On the CPU the
backward pass of 1×1 and strided convolutions is written by hand: XLA lowers their weight gradient
(and the input gradient of a strided one) to slow generic code, up to 25× slower than the forward
for a 1×1 convolution. Both gradients are linear maps that can be written as matrix products over
the batch and spatial positions, which XLA runs with its fast matmul:

* weight gradient: dW[a, b] = Σ_{n,y,x} X_pad[n, s·y + a, s·x + b, :]ᵀ dY[n, y, x, :] — one matmul
  per kernel offset (a 1×1 kernel: one matmul), with dY transposed once for all offsets;
* input gradient of a 1×1 convolution: dY · Wᵀ; of a strided one: dCols = dY · Wᵀ (every offset's
  patch gradient in one matmul), then each offset's slice is scattered back with a strided pad
  and summed (col2im).

Stride-1 convolutions with larger kernels keep autodiff's transposed convolutions, which XLA runs
well, and so does every convolution on other backends (cuDNN and TPU convolutions have fast
gradients). `grad_mode("xla")` traces autodiff's form everywhere, so the benchmark can compare the
two and a test can check that both give the same gradients.
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax

GRAD_MODES = ("auto", "matmul", "xla")  # auto: matmul on the CPU, xla elsewhere
_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride: int):
    p = w.shape[0] // 2
    return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=_DN)


def _patches(x, k: int, s: int, ho: int, wo: int):
    """The input window of every kernel offset (a, b), row-major: k² arrays (N, Ho, Wo, C)."""
    p = k // 2
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0))) if p else x
    return [lax.slice(xp, (0, a, b, 0), (xp.shape[0], a + s * (ho - 1) + 1, b + s * (wo - 1) + 1, xp.shape[3]),
                      (1, s, s, 1)) for a in range(k) for b in range(k)]


def _matmul(a, b):
    """a (M, K) @ b (K, N), accumulated in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def weight_grad(x, dy, k: int, s: int):
    n, ho, wo, co = dy.shape
    ci = x.shape[-1]
    m = n * ho * wo
    if k == 1 and s == 1 and ci <= co:
        return _matmul(x.reshape(m, ci).T, dy.reshape(m, co))[None, None]
    # dY is transposed once, (D, M), and multiplied by each offset's window (M, C) as it lies: a
    # matmul contracting the long axis needs one operand transposed, and transposing dY once is far
    # cheaper than transposing k² windows (XLA's CPU transposes of tall, narrow arrays are slow)
    dyt = dy.reshape(m, co).T
    g = jnp.stack([_matmul(dyt, c.reshape(m, ci)) for c in _patches(x, k, s, ho, wo)])  # (k², D, C)
    return jnp.swapaxes(g, 1, 2).reshape(k, k, ci, co)


def input_grad(dy, w, x_shape, s: int):
    """dX of a 1×1 stride-1 or of a strided convolution (the cases `conv2d` hands to this file)."""
    k, _, ci, co = w.shape
    if k == 1 and s == 1:
        return lax.dot_general(dy, w[0, 0], (((3,), (1,)), ((), ())), preferred_element_type=jnp.float32)
    n, h, wd, _ = x_shape
    p = k // 2
    ho, wo = dy.shape[1:3]
    cols = lax.dot_general(dy, w.reshape(k * k * ci, co), (((3,), (1,)), ((), ())),
                           preferred_element_type=jnp.float32).reshape(n, ho, wo, k, k, ci)
    hp, wp = h + 2 * p, wd + 2 * p
    total = None
    for a in range(k):
        for b in range(k):
            part = lax.pad(cols[:, :, :, a, b], jnp.zeros((), cols.dtype),
                           ((0, 0, 0), (a, hp - a - s * (ho - 1) - 1, s - 1), (b, wp - b - s * (wo - 1) - 1, s - 1),
                            (0, 0, 0)))
            total = part if total is None else total + part
    return total[:, p:p + h, p:p + wd]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_matmul_grad(x, w, stride: int):
    return _conv(x, w, stride)


def _fwd(x, w, stride):
    return _conv(x, w, stride), (x, w)


def _bwd(stride, res, dy):
    x, w = res
    # materialise both operands first: otherwise XLA fuses their elementwise producers (BN, SiLU)
    # into the transposing copy the matmuls need, and that fused copy runs many times slower
    x, dy = lax.optimization_barrier((x, dy))
    dx = input_grad(dy, w, x.shape, stride).astype(x.dtype)
    dw = weight_grad(x, dy, w.shape[0], stride).astype(w.dtype)
    return dx, dw


_conv_matmul_grad.defvjp(_fwd, _bwd)


_mode = {"grad": "auto"}


@contextlib.contextmanager
def grad_mode(mode: str):
    """Trace convolutions with gradient formulation `mode` inside the block (for comparisons;
    functions jitted earlier keep what they were traced with)."""
    if mode not in GRAD_MODES:
        raise ValueError(f"grad_mode: expected one of {GRAD_MODES}, got {mode!r}")
    old, _mode["grad"] = _mode["grad"], mode
    try:
        yield
    finally:
        _mode["grad"] = old


def conv2d(x, w, stride: int = 1):
    """NHWC × HWIO convolution with zero padding k//2 (PyTorch's), odd square kernels."""
    mode = _mode["grad"]
    if mode == "auto":
        mode = "matmul" if jax.default_backend() == "cpu" else "xla"
    if mode == "xla" or (w.shape[0] > 1 and stride == 1):
        return _conv(x, w, stride)
    return _conv_matmul_grad(x, w, stride)
