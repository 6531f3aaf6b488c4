"""The YOLO network assembled from a resolved model table.

`YOLO.model` is the list of layers (state_dict prefix ``model.<i>``); layer i reads the outputs of
the layers its table row names. The model returns raw per-level logits; `heads.decode` turns them
into boxes. `apply` is the pure-function form used by jitted and vmapped code.
"""

from __future__ import annotations

import dataclasses

import jax
from flax import nnx

from jaxyolo.errors import ConfigError
from jaxyolo.models import layers as L
from jaxyolo.models.config import ModelSpec
from jaxyolo.models.heads import KST_DRAWS, Detect, kst_weights

HEAD_KINDS = ("implicit", "detect")


@dataclasses.dataclass(frozen=True)
class ModelOptions:
    """How a table is instantiated. Hashable: part of the static graph definition."""

    head: str = "implicit"  # "implicit" (IDetect + KST) or "detect"
    kst: int = 3  # KST candidates per implicit vector; 1 is YOLOR's IDetect
    kst_draw: str = "step"  # what shares a training draw: "step", "level" or "image"
    act: str = "silu"
    fused: bool = False  # inference form: BN folded into convs (see fold.py)
    dtype: str | None = None  # compute dtype of the convolutions, e.g. "bfloat16"; params stay float32

    def __post_init__(self):
        if self.head not in HEAD_KINDS:
            raise ConfigError(f"head: must be one of {HEAD_KINDS}, got {self.head!r}")
        if self.kst_draw not in KST_DRAWS:
            raise ConfigError(f"kst_draw: must be one of {KST_DRAWS}, got {self.kst_draw!r}")
        if not isinstance(self.kst, int) or self.kst < 1:
            raise ConfigError(f"kst: must be an integer >= 1, got {self.kst!r}")
        L.activation(self.act)


class YOLO(nnx.Module):
    TORCH_ORDER = ("model",)

    def __init__(self, spec: ModelSpec, options: ModelOptions, *, rngs: nnx.Rngs):
        self.spec = spec
        self.options = options
        kw = dict(act=options.act, fused=options.fused, dtype=options.dtype, rngs=rngs)
        built = []
        for ls in spec.layers:
            if ls.module == "Conv":
                built.append(L.Conv(ls.c_in, ls.c_out, ls.kernel, ls.conv_stride, **kw))
            elif ls.module == "Bottleneck":
                built.append(L.Bottleneck(ls.c_in, ls.c_out, True, 0.5, **kw))
            elif ls.module == "BottleneckCSP":
                built.append(L.BottleneckCSP(ls.c_in, ls.c_out, ls.n, **kw))
            elif ls.module == "BottleneckCSP2":
                built.append(L.BottleneckCSP2(ls.c_in, ls.c_out, ls.n, **kw))
            elif ls.module == "SPPCSP":
                built.append(L.SPPCSP(ls.c_in, ls.c_out, **kw))
            elif ls.module == "Upsample":
                built.append(L.Upsample(2))
            elif ls.module == "Concat":
                built.append(L.Concat())
            else:  # the head (the table's last row)
                c_ins = tuple(spec.layers[j].c_out for j in ls.inputs)
                implicit = options.head == "implicit" and not options.fused
                built.append(
                    Detect(spec, c_ins, implicit=implicit, kst=options.kst, kst_draw=options.kst_draw,
                           dtype=options.dtype, rngs=rngs)
                )
        self.model = nnx.List(built)

    @property
    def head(self) -> Detect:
        return self.model[len(self.spec.layers) - 1]

    def __call__(self, x, *, train: bool = False, key=None, kst_index=None, return_features: bool = False):
        """Images (B, H, W, 3) in [0, 1] -> list of raw logits (B, na, H/s, W/s, nc+5) per level.

        `key` draws KST candidates (training); `kst_index` = (shift, scale) picks a pair; with
        neither the head uses the candidates' mean. `return_features=True` returns (raw, features):
        features are the head's inputs (B, H/s, W/s, C) per level (P3-P5), e.g. for feature
        imitation in distillation.
        """
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ConfigError(f"images: expected shape (batch, height, width, 3), got {tuple(x.shape)}")
        stride = max(self.spec.strides)
        if x.shape[1] % stride or x.shape[2] % stride:
            raise ConfigError(f"images: height and width must be multiples of {stride}, got {x.shape[1:3]}")
        head = self.head
        if head.kst > 1 and train and key is None and kst_index is None:
            raise ConfigError("training a KST head needs a `key` to draw candidates (or an explicit kst_index)")
        outputs: list = []
        y, features = x, None
        for ls, layer in zip(self.spec.layers, self.model):
            ins = [x if j == -1 else outputs[j] for j in ls.inputs]
            with jax.named_scope(f"layer{ls.index}"):
                if layer is head:
                    features = ins
                    kw = {}
                    if head.kst:
                        kw["kst_weights"] = kst_weights(
                            head.kst, head.nl, x.shape[0], key=key, index=kst_index, draw=head.kst_draw
                        )
                    y = head(ins, train=train, **kw)
                else:
                    y = layer(ins if ls.module == "Concat" else ins[0], train=train)
            outputs.append(y)
        return (y, features) if return_features else y


def apply(graphdef, state, images, *, train=False, key=None, kst_index=None):
    """Pure forward over split state: returns (raw outputs, updated state).

    In training mode the BatchNorm running statistics in the returned state are updated.
    """
    model = nnx.merge(graphdef, state, copy=True)
    raw = model(images, train=train, key=key, kst_index=kst_index)
    return raw, nnx.state(model)
