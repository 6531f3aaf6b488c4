"""The gfl family: anchor-free detectors of EfficientNet-Lite + PAN + a Generalized Focal Loss head
with ATSS targets (`models.gfl`, `gfl_loss`), as in the NanoDet-style detector of the third paper.

Model tables (`family: gfl`) ship as jaxyolo's own names: gfl-lite0 ... gfl-lite4 (the published
backbones, 96-channel PAN and head) and gfl-n (scaled down for CPUs and tests). Options: `act`
(relu6, silu, mish), `dgqp` (GFLv2's quality branch), `dtype` (mixed precision). Hyp keys of its
own: `gfl_cls`, `gfl_box`, `gfl_dfl` (the QFL, GIoU and DFL gains; published 1, 2, 0.25) and
`qfl_beta` (2).
"""

from __future__ import annotations

from typing import ClassVar

from jaxyolo import gfl_loss
from jaxyolo.families import register
from jaxyolo.families.base import Family
from jaxyolo.models import gfl as G


class GFL(Family):
    name: ClassVar[str] = "gfl"
    term_names = ("qfl", "box", "dfl")
    hyp_keys = ("gfl_cls", "gfl_box", "gfl_dfl", "qfl_beta")
    hyp_defaults = {"gfl_cls": (1.0, (0.0, 100.0)), "gfl_box": (2.0, (0.0, 100.0)), "gfl_dfl": (0.25, (0.0, 100.0)),
                    "qfl_beta": (2.0, (0.0, 8.0))}
    search_space = "gfl"
    export_layout = "xyxy-scores"
    options_type = G.GFLOptions

    def resolve(self, table, *, name, nc=None):
        return G.resolve(table, name=name, nc=nc)

    def build(self, spec, options, *, rngs):
        return G.GFLDetector(spec, options, rngs=rngs)

    def loss(self, raw, boxes, classes, mask, hyp, *, spec, img_size, gain_rule):
        return gfl_loss.gfl_loss(raw, boxes, classes, mask, hyp, spec=spec, dgqp=raw[0].shape[-1] > spec.nc + 4 * spec.bins)

    def decode(self, raw, spec):
        return gfl_loss.decode(raw, spec, dgqp=raw[0].shape[-1] > spec.nc + 4 * spec.bins)

    def describe(self, spec, options) -> str:
        return f"GFLv{2 if options.dgqp else 1}, act={options.act}, reg_max={spec.reg_max}"

    def export_metadata(self, spec, options) -> dict:
        return {"reg_max": spec.reg_max, "strides": list(spec.strides), "gfl": 2 if options.dgqp else 1}


FAMILY = register(GFL())
