"""EfficientNet-Lite backbones (Lite0-Lite4 and scaled-down variants) in Flax NNX.

EfficientNet-Lite is EfficientNet made friendly to integer and mobile accelerators: no
squeeze-excite, ReLU6 instead of swish, and the stem (32 channels) and head (1280 channels) kept
fixed while the width and depth multipliers scale the rest; the first and last stages keep their
repeat counts. The stages are MBConv blocks: a 1×1 expansion (ratio e), a k×k depthwise
convolution (stride s), a 1×1 projection without activation, and a residual when the shape is
unchanged. A stage may instead be *fused* (EfficientNetV2's Fused-MBConv): one k×k convolution
does the expansion and the stride, then the 1×1 projection; depthwise convolutions at high
resolution are slow on CPUs (docs/gfl.md), and the CPU-sized `gfl-n` fuses its first stages.

A table (the `backbone:` mapping of a gfl model table) gives the stage rows and the multipliers;
`BASE_STAGES` and `LITE` hold the published ones. `classifier_params` counts the parameters of
the ImageNet classifier a table describes, which is how the published sizes are stated.
"""

from __future__ import annotations

import dataclasses
import math

from flax import nnx

from jaxyolo.errors import ConfigError
from jaxyolo.models import layers as L

# (expand ratio, kernel, stride, output channels, repeats) of the seven stages at width and depth 1
BASE_STAGES = ((1, 3, 1, 16, 1), (6, 3, 2, 24, 2), (6, 5, 2, 40, 2), (6, 3, 2, 80, 3), (6, 5, 1, 112, 3),
               (6, 5, 2, 192, 4), (6, 3, 1, 320, 1))
# name: (width multiplier, depth multiplier, input resolution) as published for the classifiers
LITE = {"lite0": (1.0, 1.0, 224), "lite1": (1.0, 1.1, 240), "lite2": (1.1, 1.2, 260), "lite3": (1.2, 1.4, 280),
        "lite4": (1.4, 1.8, 300)}
STEM, HEAD = 32, 1280  # fixed in every Lite variant


def round_channels(c: float, divisor: int = 8) -> int:
    """Channels scaled by a width multiplier, rounded to a multiple of `divisor`, never more than
    10 % below the exact value (EfficientNet's rule)."""
    out = max(divisor, int(c + divisor / 2) // divisor * divisor)
    return out + divisor if out < 0.9 * c else out


@dataclasses.dataclass(frozen=True)
class StageSpec:
    expand: int
    kernel: int
    stride: int
    c_out: int
    repeats: int
    fused: bool = False


@dataclasses.dataclass(frozen=True)
class BackboneSpec:
    stem: int
    stages: tuple[StageSpec, ...]
    out_stages: tuple[int, ...]  # stage indices whose outputs feed the neck

    @property
    def out_channels(self) -> tuple[int, ...]:
        return tuple(self.stages[i].c_out for i in self.out_stages)

    @property
    def out_strides(self) -> tuple[int, ...]:
        s, out = 2, {}
        for i, st in enumerate(self.stages):
            s *= st.stride
            out[i] = s
        return tuple(out[i] for i in self.out_stages)


def resolve(table: dict, where: str = "backbone") -> BackboneSpec:
    """A `backbone:` mapping -> BackboneSpec. Keys: `variant` (lite0..lite4: the published width and
    depth) or `width`/`depth`; optional `stages` (rows of [expand, kernel, stride, channels,
    repeats] at width and depth 1, and optionally a sixth entry, 1 for a fused stage), `stem`
    (default 32, fixed as in Lite; `scale_stem: true` scales it with the width), `fix_first_last` (default true: the first and last stages keep their
    repeats) and `out_stages` (default [2, 4, 6]: strides 8, 16, 32)."""
    if not isinstance(table, dict):
        raise ConfigError(f"{where}: expected a mapping, got {table!r}")
    known = {"type", "variant", "width", "depth", "stages", "stem", "scale_stem", "fix_first_last", "out_stages"}
    unknown = sorted(set(table) - known)
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {unknown}; known: {sorted(known)}")
    if table.get("type", "efficientnet-lite") != "efficientnet-lite":
        raise ConfigError(f"{where}.type: only 'efficientnet-lite' is available, got {table['type']!r}")
    variant = table.get("variant")
    if variant is not None:
        if variant not in LITE:
            raise ConfigError(f"{where}.variant: expected one of {sorted(LITE)}, got {variant!r}")
        width, depth, _ = LITE[variant]
    else:
        width, depth = 1.0, 1.0
    width, depth = float(table.get("width", width)), float(table.get("depth", depth))
    if not (0 < width <= 4 and 0 < depth <= 4):
        raise ConfigError(f"{where}: width and depth must be in (0, 4], got {width}, {depth}")
    rows = table.get("stages", BASE_STAGES)
    try:
        rows = [tuple(int(v) for v in r) + (0,) * (6 - len(r)) for r in rows]
        assert all(len(r) == 6 and r[0] >= 1 and r[1] % 2 == 1 and r[2] in (1, 2) and r[3] > 0 and r[4] >= 1
                   and r[5] in (0, 1) for r in rows)
    except (TypeError, ValueError, AssertionError):
        raise ConfigError(f"{where}.stages: expected rows [expand >= 1, odd kernel, stride 1|2, channels, "
                          f"repeats >= 1, optional fused 0|1], got {table.get('stages')!r}") from None
    fix = bool(table.get("fix_first_last", True))
    stages = tuple(StageSpec(e, k, s, round_channels(c * width),
                             n if fix and i in (0, len(rows) - 1) else int(math.ceil(n * depth)), bool(f))
                   for i, (e, k, s, c, n, f) in enumerate(rows))
    stem = int(table.get("stem", STEM))
    if table.get("scale_stem", False):
        stem = round_channels(stem * width)
    try:
        out = tuple(int(i) for i in table.get("out_stages", (2, 4, 6)))
    except (TypeError, ValueError):
        out = ()
    if not out or any(not 0 <= i < len(stages) for i in out) or list(out) != sorted(set(out)):
        raise ConfigError(f"{where}.out_stages: expected increasing stage indices in 0..{len(stages) - 1}, "
                          f"got {table.get('out_stages')!r}")
    return BackboneSpec(stem, stages, out)


class MBConv(nnx.Module):
    """Inverted residual without squeeze-excite: [1×1 expand] -> k×k depthwise -> 1×1 project.
    Fused: k×k convolution (expand and stride) -> 1×1 project; with expand 1 the k×k convolution
    alone (to c2, with its activation)."""

    def __init__(self, c1: int, c2: int, expand: int, k: int, s: int, *, act: str, fused: bool = False, dtype=None,
                 rngs: nnx.Rngs):
        hidden = c1 * expand
        kw = dict(dtype=dtype, rngs=rngs)
        if fused:
            self.expand = None
            self.dw = L.Conv(c1, hidden if expand != 1 else c2, k, s, act=act, **kw)
            self.project = L.Conv(hidden, c2, 1, 1, act="linear", **kw) if expand != 1 else None
        else:
            self.expand = L.Conv(c1, hidden, 1, 1, act=act, **kw) if expand != 1 else None
            self.dw = L.Conv(hidden, hidden, k, s, groups=hidden, act=act, **kw)
            self.project = L.Conv(hidden, c2, 1, 1, act="linear", **kw)
        self.residual = s == 1 and c1 == c2

    def __call__(self, x, *, train=False):
        y = x if self.expand is None else self.expand(x, train=train)
        y = self.dw(y, train=train)
        if self.project is not None:
            y = self.project(y, train=train)
        return x + y if self.residual else y


class EfficientNetLite(nnx.Module):
    """The backbone: stem conv (stride 2), the stages; returns the `out_stages` feature maps."""

    def __init__(self, spec: BackboneSpec, *, act: str, dtype=None, rngs: nnx.Rngs):
        self.spec = spec
        self.stem = L.Conv(3, spec.stem, 3, 2, act=act, dtype=dtype, rngs=rngs)
        blocks, c = [], spec.stem
        for st in spec.stages:
            stage = []
            for j in range(st.repeats):
                stage.append(MBConv(c, st.c_out, st.expand, st.kernel, st.stride if j == 0 else 1, act=act,
                                    fused=st.fused, dtype=dtype, rngs=rngs))
                c = st.c_out
            blocks.append(nnx.List(stage))
        self.stages = nnx.List(blocks)

    def __call__(self, x, *, train=False):
        x = self.stem(x, train=train)
        outs = []
        for i, stage in enumerate(self.stages):
            for block in stage:
                x = block(x, train=train)
            if i in self.spec.out_stages:
                outs.append(x)
        return outs


def classifier_params(spec: BackboneSpec, classes: int = 1000) -> int:
    """Parameters of the ImageNet classifier `spec` belongs to (the published size): the stem,
    the stages, the 1×1 head conv to 1280 channels with its BatchNorm, and the linear classifier.
    BatchNorm running statistics are buffers, not parameters."""
    def conv_bn(c1, c2, k, groups=1):
        return k * k * (c1 // groups) * c2 + 2 * c2

    n, c = conv_bn(3, spec.stem, 3), spec.stem
    for st in spec.stages:
        for _ in range(st.repeats):
            h = c * st.expand
            if st.fused:
                n += conv_bn(c, st.c_out, st.kernel) if st.expand == 1 else \
                    conv_bn(c, h, st.kernel) + conv_bn(h, st.c_out, 1)
            else:
                n += (conv_bn(c, h, 1) if st.expand != 1 else 0) + conv_bn(h, h, st.kernel, h) + conv_bn(h, st.c_out, 1)
            c = st.c_out
    return n + conv_bn(c, HEAD, 1) + HEAD * classes + classes
