"""The YOLOv4 family: scaled-YOLOv4 CSP tables (`models.config`), the anchor-based Detect head or
the implicit head with KST candidates (`models.heads`), the reference loss (`loss.yolo_loss`) and
the reference's PyTorch names for the weights (`export.state_dict`)."""

from __future__ import annotations

from typing import ClassVar

from flax import nnx

from jaxyolo.families import register
from jaxyolo.families.base import Family
from jaxyolo.hyp import loss_gains
from jaxyolo.loss import yolo_loss
from jaxyolo.models import config as mcfg
from jaxyolo.models.heads import decode as decode_raw
from jaxyolo.models.yolo import YOLO, ModelOptions
from jaxyolo.predictions import from_tensor


class YOLOv4(Family):
    name: ClassVar[str] = "yolov4"
    term_names = ("box", "obj", "cls")
    hyp_keys = ("box", "obj", "cls", "cls_pw", "obj_pw", "anchor_t", "label_smoothing", "balance")
    search_space = "default"
    export_layout = "xywh-obj-cls"
    options_type = ModelOptions

    def resolve(self, table, *, name, nc=None, anchors=None, head=None):
        return mcfg.resolve(table, name=name, nc=nc, anchors=anchors, head=head)

    def build(self, spec, options, *, rngs):
        return YOLO(spec, options, rngs=rngs)

    def checkpoint_fields(self, spec) -> dict:
        return {"anchors": anchors_flat(spec)}

    def loss(self, raw, boxes, classes, mask, hyp, *, spec, img_size, gain_rule):
        gains = loss_gains(hyp, nc=spec.nc, img_size=img_size, rule=gain_rule)
        return yolo_loss(raw, boxes, classes, mask, anchors=spec.anchors, strides=spec.strides, hyp=gains)

    def decode(self, raw, spec):
        return from_tensor(self.export_tensor(raw, spec), self.export_layout)

    def export_tensor(self, raw, spec):
        """The reference's eval output (B, N, 5 + nc): centre, size (pixels), objectness, class
        probabilities, all after sigmoid."""
        return decode_raw(raw, spec.anchors, spec.strides)

    def inference_module(self, model) -> nnx.Module:
        from jaxyolo.models.fold import fold

        return fold(model)

    def fold_description(self, model) -> str:
        k = model.head.kst
        return ((f"implicit head: the mean of {k} KST candidates folded into the head convs; " if k else "")
                + "BatchNorms folded into the convs")

    def kst(self, model) -> int:
        return model.head.kst

    def export_metadata(self, spec, options) -> dict:
        return {"anchors": [[[float(a) for a in wh] for wh in level] for level in spec.anchors]}

    def describe(self, spec, options) -> str:
        head = f"implicit K={options.kst}" if options.head == "implicit" and not options.fused else "detect"
        return f"head={head}, act={options.act}, fused={options.fused}"

    def layer_table(self, model, img_size):
        from jaxyolo.models import profile

        return profile.layer_table(model, img_size)

    kd_terms = ("obj", "cls", "box", "feat")  # jaxyolo.distill.KD_TERMS
    kd_keys = ("kd_obj", "kd_cls", "kd_box", "kd_feat")

    def check_distill(self, student, teacher) -> None:
        from jaxyolo.distill import check_yolo_pair

        check_yolo_pair(student, teacher)

    def feature_channels(self, spec) -> list[int]:
        return [spec.layers[j].c_out for j in spec.head.inputs]

    def distill_loss(self, raw, teacher_raw, boxes, classes, mask, hyp, *, spec, features=None,
                     teacher_features=None, adapters=None, feature_mask=True):
        from jaxyolo.distill import distill_loss

        return distill_loss(raw, teacher_raw, hyp, features=features, teacher_features=teacher_features,
                            adapters=adapters, feature_mask=feature_mask)

    def state_dict(self, model):
        from jaxyolo.models import state_dict as sdmap

        return sdmap.to_state_dict(model)

    def load_state_dict(self, model, state, *, source="state_dict"):
        from jaxyolo.models import state_dict as sdmap

        sdmap.load_state_dict(model, state, source=source)


def anchors_flat(spec) -> list[list[float]]:
    """A spec's anchors as table rows: per level [w1, h1, w2, h2, ...] in pixels."""
    return [[v for wh in lvl for v in wh] for lvl in spec.anchors]


FAMILY = register(YOLOv4())
