"""Detection heads: the plain `Detect` head and the implicit head with KST candidates (docs/reference.md §5).

Implicit head ("IDetect" with K candidates). Per level i the head keeps K shift vectors
(`ia.i.implicit`, K x C_in) and K scale vectors (`im.i.implicit`, K x na*no) and computes

    out = scale ⊙ conv1x1(x + shift)

where `shift` and `scale` are convex combinations of the candidates given by weights of shape
(levels, batch, K). K = 1 is exactly YOLOR's IDetect. The weights are:

- training: one-hot draws from a `jax.random` key. `kst_draw` decides what shares a draw:
  ``"step"`` (default) one (shift, scale) pair for the whole step, shared by every level and image,
  so each step trains one of the K x K coherent sub-models that the paper's Table 4 evaluates;
  ``"level"`` an independent pair per level; ``"image"`` an independent pair per level and image.
- inference: the mean of the candidates (uniform weights 1/K), or an explicit (shift, scale)
  index pair, which may be a traced array so all K x K pairs can be evaluated under one `vmap`.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from jaxyolo.errors import ConfigError
from jaxyolo.models.config import ModelSpec
from jaxyolo.models.layers import Conv2d, random_normal

KST_DRAWS = ("step", "level", "image")


class Implicit(nnx.Module):
    """K candidate vectors of one implicit layer, initialised N(mean, 0.02) like YOLOR's."""

    TORCH_ORDER = ("implicit",)

    def __init__(self, k: int, c: int, mean: float, *, rngs: nnx.Rngs):
        self.implicit = nnx.Param(random_normal(rngs, (k, c), mean, 0.02))


class Detect(nnx.Module):
    """Per-level 1x1 conv with bias to na*(nc+5) channels; implicit shift/scale when `implicit`."""

    TORCH_ORDER = ("m", "ia", "im")  # after the derived anchors / anchor_grid buffers

    def __init__(
        self,
        spec: ModelSpec,
        c_ins: tuple[int, ...],
        *,
        implicit: bool,
        kst: int = 1,
        kst_draw: str = "step",
        dtype=None,
        rngs: nnx.Rngs,
    ):
        if kst < 1:
            raise ConfigError(f"kst: the number of KST candidates must be >= 1, got {kst}")
        if kst_draw not in KST_DRAWS:
            raise ConfigError(f"kst_draw: must be one of {KST_DRAWS}, got {kst_draw!r}")
        self.nl, self.na, self.no = len(c_ins), spec.num_anchors, spec.num_outputs
        self.strides = spec.strides
        self.anchors = spec.anchors
        self.kst = kst if implicit else 0
        self.kst_draw = kst_draw
        self.m = nnx.List([Conv2d(c, self.na * self.no, 1, bias=True, dtype=dtype, rngs=rngs) for c in c_ins])
        for conv, s in zip(self.m, self.strides):
            conv.bias[...] = conv.bias[...] + prior_bias(spec.nc, self.na, s)
        if implicit:
            self.ia = nnx.List([Implicit(kst, c, 0.0, rngs=rngs) for c in c_ins])
            self.im = nnx.List([Implicit(kst, self.na * self.no, 1.0, rngs=rngs) for _ in c_ins])
        else:
            self.ia = self.im = None

    def __call__(self, xs, *, train=False, kst_weights=None):
        out = []
        for i, (x, conv) in enumerate(zip(xs, self.m)):
            if self.ia is not None:
                sw, mw = kst_weights
                shift = jnp.einsum("bk,kc->bc", sw[i], self.ia[i].implicit[...])
                x = x + shift[:, None, None, :].astype(x.dtype)
            y = conv(x)
            if self.im is not None:
                scale = jnp.einsum("bk,kc->bc", mw[i], self.im[i].implicit[...])
                y = y * scale[:, None, None, :].astype(y.dtype)
            b, h, w, _ = y.shape
            # channel index = anchor * no + field (anchor-major), as the reference's view/permute
            out.append(y.reshape(b, h, w, self.na, self.no).transpose(0, 3, 1, 2, 4))
        return out


def prior_bias(nc: int, na: int, stride: int):
    """Bias offsets of docs/reference.md §5: objectness prior of 8 objects per 640² image, class prior 0.6/(nc-0.99)."""
    per_anchor = [0.0] * 4 + [math.log(8 / (640 / stride) ** 2)] + [math.log(0.6 / (nc - 0.99))] * nc
    return jnp.asarray(per_anchor * na, jnp.float32)


def kst_weights(
    k: int,
    levels: int,
    batch: int,
    *,
    key=None,
    index=None,
    draw: str = "step",
):
    """Candidate weights (shift_w, scale_w), each (levels, batch, k), for the implicit head.

    `index` = (shift_index, scale_index) picks one candidate pair everywhere (ints or traced
    arrays); else `key` draws one-hot weights per `draw`; else uniform weights (the mean).
    """
    shape = (2, levels, batch)
    if index is not None:
        idx = jnp.broadcast_to(jnp.stack([jnp.asarray(index[0]), jnp.asarray(index[1])])[:, None, None], shape)
        w = jax.nn.one_hot(idx, k, dtype=jnp.float32)
    elif key is not None:
        draw_shape = {"step": (2, 1, 1), "level": (2, levels, 1), "image": shape}[draw]
        idx = jnp.broadcast_to(jax.random.randint(key, draw_shape, 0, k), shape)
        w = jax.nn.one_hot(idx, k, dtype=jnp.float32)
    else:
        w = jnp.full(shape + (k,), 1.0 / k, jnp.float32)
    return w[0], w[1]


def decode(raw, anchors, strides):
    """Raw per-level logits (B, na, H, W, no) -> (B, N, no) in the reference's eval layout.

    Sigmoid on every channel; centre = (2σ(t_xy) - 0.5 + cell) * stride, size = (2σ(t_wh))² * anchor
    (pixels); rows ordered level -> anchor -> y -> x.
    """
    outs = []
    for p, anc, s in zip(raw, anchors, strides):
        b, na, h, w, no = p.shape
        y = jax.nn.sigmoid(p.astype(jnp.float32))
        gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
        grid = jnp.stack([gx, gy], axis=-1)[None, None]
        xy = (y[..., 0:2] * 2.0 - 0.5 + grid) * s
        wh = jnp.square(y[..., 2:4] * 2.0) * jnp.asarray(anc, jnp.float32)[None, :, None, None, :]
        outs.append(jnp.concatenate([xy, wh, y[..., 4:]], axis=-1).reshape(b, na * h * w, no))
    return jnp.concatenate(outs, axis=1)
