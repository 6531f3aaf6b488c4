"""A second detector family for the tests: a single-level anchor-free detector.

It is added the way any family is (its own module and a model table, `toy.yaml` beside this
file), and nothing outside it knows it: training, validation, NMS, checkpoints and ONNX export
reach it through `jaxyolo.families.Family` only.

Network: three stride-2 Conv-BN-SiLU blocks (stride 8), then a 1x1 conv to 4 + nc channels per
cell. Decode: the cell centre minus/plus softplus distances (x stride) to the four sides, sigmoid
class scores. Assignment: the cell holding a box's centre is that box's positive (the later box
wins a shared cell). Loss: 1 - IoU at positives, BCE of the class logits over every cell, each
normalised by the positives; terms (box, cls), total summed over the batch. Its own hyp key
`toy_iou_power` (default 1) raises the IoU to a power in the box term.
"""

from __future__ import annotations

import dataclasses
from typing import ClassVar

import jax
import jax.numpy as jnp
from flax import nnx

from jaxyolo import families
from jaxyolo.families.base import Family
from jaxyolo.loss import bce_with_logits
from jaxyolo.models import layers as L
from jaxyolo.predictions import Predictions

TABLE = __file__.rsplit("/", 1)[0] + "/toy.yaml"
SPACE = __file__.rsplit("/", 1)[0] + "/toy_space.yaml"


@dataclasses.dataclass(frozen=True)
class ToySpec:
    family: ClassVar[str] = "toy"
    name: str
    nc: int
    width: int
    stride: int = 8

    @property
    def strides(self) -> tuple[int, ...]:
        return (self.stride,)


@dataclasses.dataclass(frozen=True)
class ToyOptions:
    act: str = "silu"


class ToyDetector(nnx.Module):
    def __init__(self, spec: ToySpec, options: ToyOptions, *, rngs: nnx.Rngs):
        self.spec, self.options = spec, options
        w = spec.width
        self.stem = nnx.List([L.Conv(3, w, 3, 2, act=options.act, rngs=rngs),
                              L.Conv(w, 2 * w, 3, 2, act=options.act, rngs=rngs),
                              L.Conv(2 * w, 2 * w, 3, 2, act=options.act, rngs=rngs)])
        self.head = L.Conv2d(2 * w, 4 + spec.nc, 1, bias=True, rngs=rngs)
        self.head.bias[...] = self.head.bias[...].at[4:].set(-4.0)  # a low class prior

    def __call__(self, x, *, train: bool = False, key=None):
        for block in self.stem:
            x = block(x, train=train)
        return self.head(x)  # (B, H/8, W/8, 4 + nc)


def _cell_boxes(raw, stride):
    """(B, H, W, 4) xyxy pixels from the distance logits."""
    _, h, w, _ = raw.shape
    gy, gx = jnp.meshgrid(jnp.arange(h, dtype=jnp.float32), jnp.arange(w, dtype=jnp.float32), indexing="ij")
    centre = (jnp.stack([gx, gy], -1) + 0.5) * stride
    dist = jax.nn.softplus(raw[..., :4].astype(jnp.float32)) * stride
    return jnp.concatenate([centre - dist[..., :2], centre + dist[..., 2:]], -1)


def _iou(a, b):
    wh = jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0)
    inter = wh[..., 0] * wh[..., 1]
    area = lambda z: (z[..., 2] - z[..., 0]) * (z[..., 3] - z[..., 1])  # noqa: E731
    return inter / (area(a) + area(b) - inter + 1e-9)


class Toy(Family):
    name: ClassVar[str] = "toy"
    term_names = ("box", "cls")
    hyp_keys = ("box", "cls", "toy_iou_power")
    hyp_defaults = {"toy_iou_power": (1.0, (0.5, 4.0))}  # box loss 1 - IoU ** p: a key of its own
    search_space = SPACE
    export_layout = "xyxy-scores"
    options_type = ToyOptions
    model_tables = {"toy-s": TABLE}  # a model name the family ships

    def resolve(self, table, *, name, nc=None):
        return ToySpec(name=name, nc=int(table.get("nc", 80) if nc is None else nc), width=int(table["width"]))

    def build(self, spec, options, *, rngs):
        return ToyDetector(spec, options, rngs=rngs)

    def decode(self, raw, spec):
        b = raw.shape[0]
        boxes = _cell_boxes(raw, spec.stride).reshape(b, -1, 4)
        return Predictions(boxes, jax.nn.sigmoid(raw[..., 4:].astype(jnp.float32)).reshape(b, -1, spec.nc))

    def loss(self, raw, boxes, classes, mask, hyp, *, spec, img_size, gain_rule):
        bsz, h, w, _ = raw.shape
        s = spec.stride
        centre = (boxes[..., :2] + boxes[..., 2:]) / 2
        cell = (jnp.clip(jnp.floor(centre[..., 1] / s), 0, h - 1) * w
                + jnp.clip(jnp.floor(centre[..., 0] / s), 0, w - 1)).astype(jnp.int32)
        cell = jnp.where(mask, cell, h * w)  # padding rows land out of range and are dropped
        owner = jax.vmap(lambda c: jnp.full((h * w,), -1, jnp.int32).at[c].set(
            jnp.arange(c.shape[0], dtype=jnp.int32), mode="drop"))(cell)  # (B, HW): box index or -1
        pos = owner >= 0
        idx = jnp.maximum(owner, 0)
        t_box = jnp.take_along_axis(boxes, idx[..., None], axis=1)
        t_cls = jnp.take_along_axis(classes, idx, axis=1)
        n_pos = jnp.maximum(jnp.sum(pos), 1.0)
        pred = _cell_boxes(raw, s).reshape(bsz, h * w, 4)
        lbox = jnp.sum(jnp.where(pos, 1.0 - jnp.maximum(_iou(pred, t_box), 1e-6) ** hyp["toy_iou_power"], 0.0)) / n_pos
        target = jnp.where(pos[..., None], jax.nn.one_hot(t_cls, spec.nc), 0.0)
        lcls = jnp.sum(bce_with_logits(raw[..., 4:].reshape(bsz, h * w, spec.nc), target)) / n_pos
        terms = jnp.stack([hyp["box"] * lbox, hyp["cls"] * lcls])
        return jnp.sum(terms) * bsz, {"local": terms[None], "global": terms}


FAMILY = families.register(Toy())
