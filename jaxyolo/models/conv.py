"""The 2-D convolution of every layer, with a gradient that XLA's CPU backend runs fast.

The forward is the plain `lax.conv_general_dilated` (NHWC, HWIO, symmetric zero padding k//2), so
inference, export and the forward values are exactly those of a plain convolution. On the CPU,
autodiff's gradients of two kinds of convolution are slow, so their backward pass is written here:

* 1×1, stride 1: XLA lowers the weight gradient to generic code up to 25× slower than the
  forward. Both gradients are matrix products over the batch and spatial positions, which XLA runs
  with its fast matmul: dW = Xᵀ·dY, dX = dY·Wᵀ.
* strided: the input gradient is a transposed convolution with a dilated input, 2-4× slower than
  a stride-1 one. A stride-s convolution equals a stride-1 convolution of the space-to-depth
  rearranged input (each s×s block one pixel of s²·C channels) with a regrouped, zero-padded
  kernel (`space_to_depth_conv`); the input gradient is taken through that form when it is faster
  (fewer than `S2D_MAX_CHANNELS` input channels), the weight gradient through the plain one.

Stride-1 convolutions with larger kernels keep autodiff, which XLA runs well, and so does every
convolution on other backends (cuDNN and TPU convolutions have fast gradients). Each gradient is
taken without recomputing the forward (`jax.linear_transpose`). Depthwise convolutions (groups =
channels) are computed on the CPU as sums of shifted views (`shifted_depthwise`), forward and
backward. `grad_mode("xla")` traces the plain convolutions and autodiff's form everywhere (ONNX
export uses it), so the benchmark can compare the two and a test can check that both
give the same gradients. (`jaxyolo bench --suite train` measures the step; docs/benchmarks.md
has the per-change figures.)
"""

from __future__ import annotations

import contextlib
import functools

import jax
import jax.numpy as jnp
from jax import lax

GRAD_MODES = ("auto", "cpu", "xla")  # auto: the CPU forms on the CPU, autodiff elsewhere
_DN = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, stride: int, groups: int = 1):
    p = w.shape[0] // 2
    return lax.conv_general_dilated(x, w, (stride, stride), ((p, p), (p, p)), dimension_numbers=_DN,
                                    feature_group_count=groups)


def _matmul(a, b):
    """a (M, K) @ b (K, N), accumulated in float32."""
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def weight_grad(x, dy):
    """dW of a 1×1 stride-1 convolution: Xᵀ · dY over every batch and spatial position."""
    ci, co = x.shape[-1], dy.shape[-1]
    m = x.size // ci
    if ci <= co:
        return _matmul(x.reshape(m, ci).T, dy.reshape(m, co))[None, None]
    # transpose the narrower operand: XLA's CPU transposes of tall, narrow arrays are slow
    return _matmul(dy.reshape(m, co).T, x.reshape(m, ci)).T[None, None]


def input_grad(dy, w):
    """dX of a 1×1 stride-1 convolution: dY · Wᵀ."""
    return lax.dot_general(dy, w[0, 0], (((3,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def space_to_depth_conv(x, w, s: int):
    """The stride-`s` convolution as a stride-1 one: each s×s block of the (padded) input becomes
    one pixel with s²·C channels, and the kernel is zero-padded to a multiple of s and regrouped the
    same way (⌈k/s⌉² taps). Same values as `_conv(x, w, s)`; its input gradient is a stride-1
    transposed convolution, which XLA's CPU backend runs far faster than the strided one."""
    k, _, c, co = w.shape
    n, h, wd, _ = x.shape
    p, kk = k // 2, -(-k // s)
    ho, wo = (h + 2 * p - k) // s + 1, (wd + 2 * p - k) // s + 1
    hz, wz = ho + kk - 1, wo + kk - 1  # the blocks the output reads
    xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (p, s * hz - h - p, 0), (p, s * wz - wd - p, 0), (0, 0, 0)))
    z = xp.reshape(n, hz, s, wz, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, hz, wz, s * s * c)
    w2 = jnp.pad(w, ((0, s * kk - k), (0, s * kk - k), (0, 0), (0, 0)))
    w2 = w2.reshape(kk, s, kk, s, c, co).transpose(0, 2, 1, 3, 4, 5).reshape(kk, kk, s * s * c, co)
    return lax.conv_general_dilated(z, w2, (1, 1), "VALID", dimension_numbers=_DN)


def _transpose(f, primal, dy):
    """The transpose of the linear map `f` at `dy`: a gradient without recomputing the forward."""
    return jax.linear_transpose(f, jax.ShapeDtypeStruct(primal.shape, primal.dtype))(dy)[0]


# Below this many input channels the space-to-depth form's input gradient is the faster one (at
# 16-64 channels 2-3× faster than XLA's strided transposed convolution; at 128-256 slower).
S2D_MAX_CHANNELS = 128


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_cpu_grad(x, w, stride: int):
    return _conv(x, w, stride)


def _fwd(x, w, stride):
    return _conv(x, w, stride), (x, w)


def _bwd(stride, res, dy):
    x, w = res
    if w.shape[0] == 1 and stride == 1:
        # materialise both operands first: otherwise XLA fuses their elementwise producers (BN,
        # SiLU) into the transposing copy the matmuls need, and that fused copy runs many times slower
        x, dy = lax.optimization_barrier((x, dy))
        return input_grad(dy, w).astype(x.dtype), weight_grad(x, dy).astype(w.dtype)
    strided = space_to_depth_conv if x.shape[-1] < S2D_MAX_CHANNELS else _conv
    dx = _transpose(lambda v: strided(v, w, stride), x, dy)
    dw = _transpose(lambda v: _conv(x, v, stride), w, dy)
    return dx, dw


_conv_cpu_grad.defvjp(_fwd, _bwd)


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


def conv2d(x, w, stride: int = 1, groups: int = 1):
    """NHWC × HWIO convolution with zero padding k//2 (PyTorch's), odd square kernels; `groups`
    independent channel groups (w (k, k, C / groups, C_out))."""
    if groups != 1:
        return grouped_conv2d(x, w, stride, groups)
    mode = _mode["grad"]
    if mode == "auto":
        mode = "cpu" if jax.default_backend() == "cpu" else "xla"
    if mode == "xla" or (w.shape[0] > 1 and stride == 1):
        return _conv(x, w, stride)
    return _conv_cpu_grad(x, w, stride)


def shifted_depthwise(x, w, stride: int):
    """A depthwise convolution (w (k, k, 1, C)) as a sum of k² shifted, strided views of the padded
    input, each times its tap: elementwise work that XLA's CPU backend fuses into a few passes, and
    whose transposes (for the gradients) are pads and strided slices of the same kind."""
    k, c = w.shape[0], x.shape[-1]
    p = k // 2
    n, h, wd, _ = x.shape
    ho, wo = (h + 2 * p - k) // stride + 1, (wd + 2 * p - k) // stride + 1
    xp = jnp.pad(x, ((0, 0), (p, p), (p, p), (0, 0)))
    out = None
    for i in range(k):
        for j in range(k):
            view = lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
                             (1, stride, stride, 1))
            term = view * w[i, j, 0]
            out = term if out is None else out + term
    return out


def grouped_conv2d(x, w, stride: int, groups: int):
    """A grouped convolution (w (k, k, C / groups, C_out)). On the CPU a depthwise one (groups = C
    = C_out) is computed as `shifted_depthwise`, forward and gradients: XLA's CPU grouped
    convolution measured 3-15× slower forward and 3-6× slower with its gradients (32 images,
    16²-64² pixels, 48-480 channels; docs/benchmarks.md). `grad_mode("xla")` keeps the plain
    convolution (an exported graph holds one Conv per layer)."""
    mode = _mode["grad"]
    if mode == "auto":
        mode = "cpu" if jax.default_backend() == "cpu" else "xla"
    depthwise = groups == x.shape[-1] == w.shape[-1] and w.shape[2] == 1
    if mode == "xla" or not depthwise:
        return _conv(x, w, stride, groups)
    return shifted_depthwise(x, w, stride)
