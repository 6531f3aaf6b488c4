"""The anchor-free GFL detector of the gfl family: EfficientNet-Lite backbone, PAN neck, GFL head.

* Neck (`PAN`): a 1×1 lateral convolution per backbone level to one width, a top-down pass
  (each level plus its upper neighbour upsampled ×2, bilinear), then a bottom-up pass (each level
  plus its lower neighbour downsampled ×½, bilinear: the mean of each 2×2 block). Additions only,
  as NanoDet's PAN.
* Head (`GFLHead`): per level a tower of `stacked_convs` 3×3 Conv-BN-act (weights shared across
  levels when `share_levels`, BatchNorm per level), then one 3×3 convolution to nc class logits
  and 4·(reg_max + 1) box logits: each side's distance to the cell centre as a discrete
  distribution over reg_max + 1 bins (in strides), scaled per level by a learnt scalar. With
  `dgqp` (GFLv2) a small MLP reads the top-k probabilities and the mean of each side's
  distribution and predicts a quality logit; the class probabilities are multiplied by it.

The raw outputs are one array per level, (B, H/s, W/s, nc + 4·(reg_max + 1) [+ 1 quality logit]).
`jaxyolo.gfl_loss` assigns targets and decodes them.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxyolo.errors import ConfigError
from jaxyolo.models import efficientnet_lite as effnet
from jaxyolo.models import layers as L

ACTS = ("relu6", "silu", "mish", "relu", "leaky")
PRIOR_PROB = 0.01  # initial class probability: the class bias starts at -log((1 - p) / p)


@dataclasses.dataclass(frozen=True)
class GFLSpec:
    family: ClassVar[str] = "gfl"
    name: str
    nc: int
    backbone: effnet.BackboneSpec
    neck_width: int
    head_width: int
    stacked_convs: int
    share_levels: bool
    reg_max: int
    octave_base_scale: float  # ATSS anchor side = octave_base_scale x stride
    atss_topk: int
    dgqp_topk: int
    dgqp_width: int
    strides: tuple[int, ...]
    img_size: int  # the table's nominal input size (the published resolution)

    @property
    def bins(self) -> int:
        return self.reg_max + 1


@dataclasses.dataclass(frozen=True)
class GFLOptions:
    """How a table is instantiated (hashable: part of the static graph definition)."""

    # silu (Table 2's rows 3-5; it learns better on the learn benchmark), relu6 (EfficientNet-Lite's
    # own, quantisation-friendly: row 1), mish (row 2), relu, leaky
    act: str = "silu"
    dgqp: bool = False  # GFLv2: the distribution-guided quality predictor
    dtype: str | None = None  # compute dtype of the convolutions, e.g. "bfloat16"; params stay float32

    def __post_init__(self):
        if self.act not in ACTS:
            raise ConfigError(f"act: the gfl family takes one of {ACTS}, got {self.act!r}")
        if not isinstance(self.dgqp, bool):
            raise ConfigError(f"dgqp: expected true or false, got {self.dgqp!r}")


def _int(table: dict, key: str, default, where: str, low: int = 1) -> int:
    v = table.get(key, default)
    if isinstance(v, bool) or not isinstance(v, int) or v < low:
        raise ConfigError(f"{where}.{key}: expected an integer >= {low}, got {v!r}")
    return v


def resolve(table: dict, *, name: str, nc: int | None = None) -> GFLSpec:
    """A gfl model table -> GFLSpec (every key checked, errors name the table and the key)."""
    where = f"model {name!r}"
    known = {"family", "nc", "backbone", "neck", "head", "img_size"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; a gfl table has {sorted(known)}")
    bb = effnet.resolve(table.get("backbone", {"variant": "lite0"}), f"{where}.backbone")
    neck, head = table.get("neck", {}) or {}, table.get("head", {}) or {}
    for part, d, keys in (("neck", neck, {"width"}),
                          ("head", head, {"width", "stacked_convs", "share_levels", "reg_max", "octave_base_scale",
                                          "atss_topk", "dgqp_topk", "dgqp_width"})):
        if not isinstance(d, dict) or set(d) - keys:
            raise ConfigError(f"{where}.{part}: expected a mapping with keys from {sorted(keys)}, got {d!r}")
    nc = int(table.get("nc", 80) if nc is None else nc)
    if nc < 1:
        raise ConfigError(f"{where}: nc must be >= 1, got {nc}")
    neck_width = _int(neck, "width", 96, f"{where}.neck")
    scale = head.get("octave_base_scale", 5)
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or scale <= 0:
        raise ConfigError(f"{where}.head.octave_base_scale: expected a number > 0, got {scale!r}")
    return GFLSpec(
        name=name, nc=nc, backbone=bb, neck_width=neck_width, head_width=_int(head, "width", neck_width, f"{where}.head"),
        stacked_convs=_int(head, "stacked_convs", 2, f"{where}.head", low=0),
        share_levels=bool(head.get("share_levels", True)), reg_max=_int(head, "reg_max", 7, f"{where}.head"),
        octave_base_scale=float(scale), atss_topk=_int(head, "atss_topk", 9, f"{where}.head"),
        dgqp_topk=_int(head, "dgqp_topk", 4, f"{where}.head"), dgqp_width=_int(head, "dgqp_width", 64, f"{where}.head"),
        strides=bb.out_strides, img_size=_int(table, "img_size", 320, where, low=32))


def upsample2(x):
    """×2 bilinear upsampling with half-pixel centres and clamped edges (PyTorch's
    `interpolate(scale_factor=2, mode="bilinear", align_corners=False)`): each output pixel is
    3/4 of its source pixel and 1/4 of the neighbour on its side."""
    def axis(v, ax):
        n = v.shape[ax]
        prev = jnp.concatenate([jax.lax.slice_in_dim(v, 0, 1, axis=ax), jax.lax.slice_in_dim(v, 0, n - 1, axis=ax)], ax)
        nxt = jnp.concatenate([jax.lax.slice_in_dim(v, 1, n, axis=ax), jax.lax.slice_in_dim(v, n - 1, n, axis=ax)], ax)
        even, odd = 0.75 * v + 0.25 * prev, 0.75 * v + 0.25 * nxt
        shape = list(v.shape)
        shape[ax] = 2 * n
        return jnp.stack([even, odd], ax + 1).reshape(shape)

    return axis(axis(x, 1), 2)


def downsample2(x):
    """×½ bilinear downsampling with half-pixel centres: the mean of each 2×2 block."""
    b, h, w, c = x.shape
    return x.reshape(b, h // 2, 2, w // 2, 2, c).mean(axis=(2, 4))


class PAN(nnx.Module):
    def __init__(self, c_ins, width: int, *, dtype=None, rngs: nnx.Rngs):
        self.lateral = nnx.List([L.Conv2d(c, width, 1, bias=True, dtype=dtype, rngs=rngs) for c in c_ins])

    def __call__(self, feats, *, train=False):
        lat = [conv(f) for conv, f in zip(self.lateral, feats)]
        for i in range(len(lat) - 1, 0, -1):  # top-down
            lat[i - 1] = lat[i - 1] + upsample2(lat[i])
        for i in range(len(lat) - 1):  # bottom-up
            lat[i + 1] = lat[i + 1] + downsample2(lat[i])
        return lat


class GFLHead(nnx.Module):
    def __init__(self, spec: GFLSpec, options: GFLOptions, *, rngs: nnx.Rngs):
        self.spec, self.dgqp = spec, options.dgqp
        levels, w, dt = len(spec.strides), spec.head_width, options.dtype
        towers = 1 if spec.share_levels else levels
        self.convs = nnx.List([nnx.List([L.Conv2d(spec.neck_width if j == 0 else w, w, 3, dtype=dt, rngs=rngs)
                                         for j in range(spec.stacked_convs)]) for _ in range(towers)])
        self.norms = nnx.List([nnx.List([L.BatchNorm2d(w) for _ in range(spec.stacked_convs)]) for _ in range(levels)])
        c_in = w if spec.stacked_convs else spec.neck_width
        self.preds = nnx.List([L.Conv2d(c_in, spec.nc + 4 * spec.bins, 3, bias=True, dtype=dt, rngs=rngs)
                               for _ in range(towers)])
        for p in self.preds:  # small weights, a low class prior (as GFL initialises)
            p.weight[...] = L.random_normal(rngs, p.weight.shape, 0.0, 0.01)
            p.bias[...] = jnp.concatenate([jnp.full((spec.nc,), -jnp.log((1 - PRIOR_PROB) / PRIOR_PROB)),
                                           jnp.zeros((4 * spec.bins,))])
        self.scales = nnx.Param(jnp.ones((levels,), jnp.float32))
        self.act = options.act
        if options.dgqp:
            d = 4 * (spec.dgqp_topk + 1)
            self.quality = nnx.List([L.Conv2d(d, spec.dgqp_width, 1, bias=True, rngs=rngs),
                                     L.Conv2d(spec.dgqp_width, 1, 1, bias=True, rngs=rngs)])
            self.quality[0].weight[...] = L.random_normal(rngs, (1, 1, d, spec.dgqp_width), 0.0, 0.01)
            self.quality[0].bias[...] = jnp.zeros((spec.dgqp_width,))
            self.quality[1].weight[...] = L.random_normal(rngs, (1, 1, spec.dgqp_width, 1), 0.0, 0.01)
            self.quality[1].bias[...] = jnp.zeros((1,))

    def __call__(self, feats, *, train=False):
        act = L.activation(self.act)
        outs = []
        for lvl, x in enumerate(feats):
            t = 0 if self.spec.share_levels else lvl
            for conv, bn in zip(self.convs[t], self.norms[lvl]):
                x = bn(conv(x), train=train, act=act)
            y = self.preds[t](x).astype(jnp.float32)
            nc = self.spec.nc
            y = jnp.concatenate([y[..., :nc], y[..., nc:] * self.scales[lvl]], -1)
            if self.dgqp:
                y = jnp.concatenate([y, self._quality(y[..., nc:])], -1)
            outs.append(y)
        return outs

    def _quality(self, box_logits):
        """GFLv2's quality logit from the box distributions: per side the top-k probabilities
        and their mean, through a two-layer MLP (1×1 convolutions)."""
        *lead, _ = box_logits.shape
        prob = jax.nn.softmax(box_logits.reshape(*lead, 4, self.spec.bins), -1)
        top = jax.lax.top_k(prob, self.spec.dgqp_topk)[0]
        stat = jnp.concatenate([top, top.mean(-1, keepdims=True)], -1).reshape(*lead, -1)
        return self.quality[1](jax.nn.relu(self.quality[0](stat)))


class GFLDetector(nnx.Module):
    def __init__(self, spec: GFLSpec, options: GFLOptions, *, rngs: nnx.Rngs):
        self.spec, self.options = spec, options
        self.backbone = effnet.EfficientNetLite(spec.backbone, act=options.act, dtype=options.dtype, rngs=rngs)
        self.neck = PAN(spec.backbone.out_channels, spec.neck_width, dtype=options.dtype, rngs=rngs)
        self.head = GFLHead(spec, options, rngs=rngs)

    def __call__(self, x, *, train: bool = False, key=None, return_features: bool = False):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ConfigError(f"images: expected shape (batch, height, width, 3), got {tuple(x.shape)}")
        s = max(self.spec.strides)
        if x.shape[1] % s or x.shape[2] % s:
            raise ConfigError(f"images: height and width must be multiples of {s}, got {x.shape[1:3]}")
        feats = self.neck(self.backbone(x, train=train), train=train)
        raw = self.head(feats, train=train)
        return (raw, feats) if return_features else raw
