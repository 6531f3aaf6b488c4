"""The gfl family: anchor-free detectors of EfficientNet-Lite + PAN + a Generalized Focal Loss head
with ATSS targets (`models.gfl`, `gfl_loss`), as in the NanoDet-style detector of the third paper.

Model tables (`family: gfl`) ship as jaxyolo's own names: gfl-lite0 ... gfl-lite4 (the published
backbones, 96-channel PAN and head) and gfl-n (scaled down for CPUs and tests). Options: `act`
(silu by default; relu6, mish, relu, leaky), `dgqp` (GFLv2's quality branch), `dtype` (mixed precision). Hyp keys of its
own: `gfl_cls`, `gfl_box`, `gfl_dfl` (the QFL, GIoU and DFL gains; published 1, 2, 0.25) and
`qfl_beta` (2).
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from jaxyolo import gfl_loss, ld
from jaxyolo.errors import ConfigError
from jaxyolo.families import register
from jaxyolo.families.base import Family
from jaxyolo.models import gfl as G


class GFL(Family):
    name: ClassVar[str] = "gfl"
    term_names = ("qfl", "box", "dfl")
    hyp_keys = ("gfl_cls", "gfl_box", "gfl_dfl", "qfl_beta")
    hyp_defaults = {"gfl_cls": (1.0, (0.0, 100.0)), "gfl_box": (2.0, (0.0, 100.0)), "gfl_dfl": (0.25, (0.0, 100.0)),
                    "qfl_beta": (2.0, (0.0, 8.0)),
                    # localization distillation (`jaxyolo.ld`; weights 0: plain training)
                    "ld_main": (0.0, (0.0, 1e3)), "ld_vlr": (0.0, (0.0, 1e3)), "ld_cls": (0.0, (0.0, 1e3)),
                    "ld_feat": (0.0, (0.0, 1e3)), "ld_T": (10.0, (0.1, 100.0)), "ld_cls_T": (2.0, (0.1, 100.0)),
                    "ld_alpha": (0.25, (0.0, 1.0))}
    kd_terms = ld.LD_TERMS
    kd_keys = ld.LD_KEYS
    search_space = "gfl"
    default_hyp = "gfl"
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

    def check_distill(self, student, teacher) -> None:
        s, t = student.spec, teacher.spec
        for field, what in (("nc", "classes"), ("strides", "strides"), ("reg_max", "reg_max (box distribution bins)")):
            if tuple(np.atleast_1d(getattr(s, field))) != tuple(np.atleast_1d(getattr(t, field))):
                raise ConfigError(f"teacher {t.name}: {what} {getattr(t, field)}, the student {s.name} has "
                                  f"{getattr(s, field)} (they must be equal)")

    def feature_channels(self, spec) -> list[int]:
        return [spec.neck_width] * len(spec.strides)

    def distill_loss(self, raw, teacher_raw, boxes, classes, mask, hyp, *, spec, features=None,
                     teacher_features=None, adapters=None, feature_mask=True):
        return ld.ld_loss(raw, teacher_raw, boxes, classes, mask, hyp, spec=spec, features=features,
                          teacher_features=teacher_features, adapters=adapters, feature_mask=feature_mask)

    def describe(self, spec, options) -> str:
        return f"GFLv{2 if options.dgqp else 1}, act={options.act}, reg_max={spec.reg_max}"

    def export_metadata(self, spec, options) -> dict:
        return {"reg_max": spec.reg_max, "strides": list(spec.strides), "gfl": 2 if options.dgqp else 1}

    def layer_table(self, model, img_size):
        from jaxyolo.models import profile

        return profile.gfl_layer_table(model, img_size)


FAMILY = register(GFL())
