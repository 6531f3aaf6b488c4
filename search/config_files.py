"""What the pipeline configs of both kinds (`search.pipeline`'s stages, `search.ablation`'s rows)
read alike: the `train` tree, data paths relative to the file, and how two saved configs differ."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from jaxyolo.errors import ConfigError
from jaxyolo.train_options import TrainOptions, flatten


def train_settings(raw, where: str, path: Path, reserved: Sequence[str] = ()) -> TrainOptions:
    """The `train` tree of a config (or a search's trial settings), refusing the `reserved`
    settings, which the pipeline sets itself."""
    if not isinstance(raw, Mapping):
        raise ConfigError(f"config {path}: {where}: expected a mapping of training settings")
    taken = sorted(set(flatten(raw)) & set(reserved))
    if taken:
        raise ConfigError(f"config {path}: {', '.join(f'{where}.{k}' for k in taken)}: set by each stage "
                          "or row (from data, the models, seeds, distill), not here")
    try:
        return TrainOptions.from_dict(raw)
    except ConfigError as e:
        raise ConfigError(f"config {path}: {where}.{e}") from None


def resolve_data(value: str, base: Path) -> str:
    """A data source as given, or made absolute when it names a file beside the config."""
    if value.startswith(("synthetic", "tfds:")) or Path(value).is_absolute():
        return value
    candidate = base / value
    return str(candidate.resolve()) if candidate.exists() else value


def config_diff(a: dict, b: dict, prefix: str = "") -> list[str]:
    """"field: old -> new" for every leaf that differs between two nested configs."""
    out = []
    for k in sorted(set(a) | set(b)):
        va, vb = a.get(k), b.get(k)
        if isinstance(va, dict) and isinstance(vb, dict):
            out += config_diff(va, vb, f"{prefix}{k}.")
        elif va != vb:
            out.append(f"{prefix}{k}: {va!r} -> {vb!r}")
    return out
