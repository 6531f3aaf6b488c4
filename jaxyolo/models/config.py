"""Model tables: read a reference-style YAML table and resolve it into concrete layer specs.

A table lists layers as ``[from, number, module, args]`` with full-scale channel counts and repeat
numbers; ``depth_multiple`` and ``width_multiple`` scale them (docs/reference.md §2 builder rules). Resolving a
table gives every layer its input/output channels, effective repeat count and output stride, so
the modules, the parameter count and the weight mapping all read from one place.
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import math
from pathlib import Path
from typing import Any, ClassVar

import yaml

from jaxyolo.errors import ConfigError

BLOCKS = ("Conv", "Bottleneck", "BottleneckCSP", "BottleneckCSP2", "SPPCSP", "Upsample", "Concat")
HEADS = ("Detect", "IDetect")
# Blocks whose yaml `number` is the count of inner bottlenecks rather than a layer repeat.
_REPEAT_INSIDE = ("BottleneckCSP", "BottleneckCSP2")


@dataclasses.dataclass(frozen=True)
class LayerSpec:
    index: int
    inputs: tuple[int, ...]  # absolute indices of the layers feeding this one; -1 is the image
    module: str
    n: int  # effective number of inner repeats (CSP blocks) after depth scaling
    c_in: int  # channels of the (concatenated) input
    c_out: int
    stride: int  # output stride relative to the image
    kernel: int = 1  # Conv only
    conv_stride: int = 1  # Conv only
    yaml_from: Any = -1
    yaml_n: int = 1
    yaml_args: tuple = ()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A resolved model table. Hashable, so it can be a static attribute of a jitted module."""

    family: ClassVar[str] = "yolov4"  # `jaxyolo.families`
    name: str
    nc: int
    depth_multiple: float
    width_multiple: float
    anchors: tuple[tuple[tuple[float, float], ...], ...]  # pixels, per level, (w, h) pairs
    layers: tuple[LayerSpec, ...]

    @property
    def head(self) -> LayerSpec:
        return self.layers[-1]

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(self.layers[i].stride for i in self.head.inputs)

    @property
    def num_anchors(self) -> int:
        return len(self.anchors[0])

    @property
    def num_outputs(self) -> int:
        """Values per anchor: box (4) + objectness (1) + classes."""
        return self.nc + 5


def make_divisible(x: float, divisor: int = 8) -> int:
    return int(math.ceil(x / divisor) * divisor)


def available_models() -> list[str]:
    root = importlib.resources.files("jaxyolo.configs") / "models"
    return sorted(p.name[: -len(".yaml")] for p in root.iterdir() if p.name.endswith(".yaml"))


def load_table(name_or_path: str | Path) -> tuple[str, dict]:
    """Return (name, raw table dict) for a built-in model name or a path to a YAML table."""
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise ConfigError(f"{path}: model table not found")
        text, name = path.read_text(), path.stem
    else:
        res = importlib.resources.files("jaxyolo.configs") / "models" / f"{name_or_path}.yaml"
        if not res.is_file():
            raise ConfigError(
                f"unknown model {str(name_or_path)!r}: choose one of {', '.join(available_models())} "
                "or give a path to a .yaml table"
            )
        text, name = res.read_text(), str(name_or_path)
    try:
        table = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{name_or_path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(table, dict):
        raise ConfigError(f"{name_or_path}: a model table must be a mapping, got {type(table).__name__}")
    return name, table


def resolve(
    table: dict,
    *,
    name: str = "custom",
    nc: int | None = None,
    anchors: Any = None,
    head: str | None = None,
) -> ModelSpec:
    """Resolve a raw table into a ModelSpec. `nc`, `anchors` and `head` override the table's."""
    where = f"model table {name!r}"
    for key in ("depth_multiple", "width_multiple", "anchors", "backbone", "head"):
        if key not in table:
            raise ConfigError(f"{where}: missing field {key!r}")
    nc = int(table.get("nc", 80) if nc is None else nc)
    if nc < 1:
        raise ConfigError(f"{where}: nc must be >= 1, got {nc}")
    gd, gw = float(table["depth_multiple"]), float(table["width_multiple"])
    anchors_px = _parse_anchors(table["anchors"] if anchors is None else anchors, where)

    rows = list(table["backbone"]) + list(table["head"])
    layers: list[LayerSpec] = []
    for i, row in enumerate(rows):
        if not isinstance(row, (list, tuple)) or len(row) != 4:
            raise ConfigError(f"{where}: layer {i} must be [from, number, module, args], got {row!r}")
        f, n, module, args = row
        args = tuple(args or ())
        if i == len(rows) - 1:
            if module not in HEADS:
                raise ConfigError(f"{where}: the last layer must be one of {HEADS}, got {module!r}")
            module = head or module
        elif module not in BLOCKS:
            raise ConfigError(f"{where}: layer {i}: unknown module {module!r} (known: {', '.join(BLOCKS)})")
        inputs = _resolve_from(f, i, where)
        if not isinstance(n, int) or n < 1:
            raise ConfigError(f"{where}: layer {i}: number must be a positive integer, got {n!r}")
        n_eff = max(round(n * gd), 1) if n > 1 else n
        c_ins = [3 if j == -1 else layers[j].c_out for j in inputs]
        strides = [1 if j == -1 else layers[j].stride for j in inputs]
        kernel, conv_stride = 1, 1
        if module == "Concat":
            c_out, stride = sum(c_ins), strides[0]
            if len(set(strides)) != 1:
                raise ConfigError(f"{where}: layer {i}: Concat of layers with strides {strides}")
        elif module == "Upsample":
            c_out, stride = c_ins[0], strides[0] // 2
        elif module in HEADS:
            c_out, stride = 0, 0
        else:
            if len(inputs) != 1:
                raise ConfigError(f"{where}: layer {i}: {module} takes one input, got from={f!r}")
            if not args:
                raise ConfigError(f"{where}: layer {i}: {module} needs its output channels in args")
            c_out = make_divisible(float(args[0]) * gw, 8)
            stride = strides[0]
            if module == "Conv":
                kernel = int(args[1]) if len(args) > 1 else 1
                conv_stride = int(args[2]) if len(args) > 2 else 1
                stride *= conv_stride
        layers.append(
            LayerSpec(
                index=i,
                inputs=inputs,
                module=module,
                n=n_eff if module in _REPEAT_INSIDE else 1,
                c_in=sum(c_ins),
                c_out=c_out,
                stride=stride,
                kernel=kernel,
                conv_stride=conv_stride,
                yaml_from=_freeze(f),
                yaml_n=n,
                yaml_args=_freeze(args),
            )
        )
    spec = ModelSpec(name, nc, gd, gw, anchors_px, tuple(layers))
    if len(spec.head.inputs) != len(anchors_px):
        raise ConfigError(
            f"{where}: the head reads {len(spec.head.inputs)} levels but anchors has {len(anchors_px)} rows"
        )
    return spec


def _resolve_from(f: Any, i: int, where: str) -> tuple[int, ...]:
    items = f if isinstance(f, (list, tuple)) else [f]
    out = []
    for j in items:
        if not isinstance(j, int):
            raise ConfigError(f"{where}: layer {i}: 'from' entries must be integers, got {f!r}")
        k = i + j if j < 0 else j
        if i == 0 and j == -1:
            k = -1
        elif not 0 <= k < i:
            raise ConfigError(f"{where}: layer {i}: 'from' {j} does not point to an earlier layer")
        out.append(k)
    return tuple(out)


def _parse_anchors(anchors: Any, where: str) -> tuple[tuple[tuple[float, float], ...], ...]:
    try:
        levels = []
        for row in anchors:
            vals = [float(v) for v in row]
            if len(vals) % 2 or not vals:
                raise ValueError
            levels.append(tuple((vals[k], vals[k + 1]) for k in range(0, len(vals), 2)))
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: anchors must be a list of [w1, h1, w2, h2, ...] rows, got {anchors!r}") from None
    if len({len(r) for r in levels}) != 1:
        raise ConfigError(f"{where}: every level needs the same number of anchors, got {anchors!r}")
    return tuple(levels)


def _freeze(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return tuple(_freeze(v) for v in x)
    return x
