"""Hyper-parameters as a pytree of arrays.

Every value that a search may change enters the jitted step as an array leaf, so one compiled
step serves every member of a population (a leading axis P on every leaf). Files use the
reference key names (docs/reference.md §9), so yolov5 / ScaledYOLOv4 / YOLOR hyp files load unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from importlib import resources
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import yaml

from jaxyolo.errors import ConfigError
from jaxyolo.files import read_document

DEFAULT_FILE = "default"
# bundled names of earlier releases: a clear message instead of "no such file"
RENAMED = {"scratch-s": "reference-s", "scratch-csp": "reference-csp"}

# keys the train step reads; each is a float scalar except `balance` (one weight per level)
KEYS = (
    "lr0", "lrf", "momentum", "weight_decay", "warmup_epochs", "warmup_momentum", "warmup_bias_lr",
    "box", "cls", "cls_pw", "obj", "obj_pw", "anchor_t", "label_smoothing", "balance",
    "hsv_h", "hsv_s", "hsv_v", "degrees", "translate", "scale", "shear", "perspective",
    "flipud", "fliplr", "mosaic", "mixup",
    # optimiser additions: max global norm of an optimiser step's gradients per 64 summed images
    # (0: no clipping); the EMA's warm-up constant in optimiser steps (the reference's fixed 2000)
    "clip_grad", "ema_tau",
    # distillation (jaxyolo.distill; all weights 0 by default: plain training)
    "kd_obj", "kd_cls", "kd_box", "kd_feat", "kd_T", "kd_conf",
)
# keys reference files carry that do not change this implementation (accepted, not used)
IGNORED = {"iou_t": "unused by the loss", "anchors": "anchors come from the model table",
           "copy_paste": "copy-paste augmentation needs segments", "paste_in": "needs segments"}

# Settings of a recipe that shape the whole run rather than one member's step: a hyp file may
# carry them, they hold for a whole population and are not searchable (`load_recipe`). A file
# without them (a yolov5 / ScaledYOLOv4 one) gets these defaults, the ones that learn on small
# data at small image sizes; `reference-s` sets the reference's values.
RECIPE_DEFAULTS = {
    "gain_rule": "per-class",  # see `loss_gains`
    "min_warmup_iters": 100,  # floor on warm-up iterations (the reference: 1000)
    "close_mosaic": 0,  # epochs at the end trained without mosaic
    "autoanchor": True,  # refit the anchors to the data when they cover it badly (`jaxyolo.anchors`)
}
GAIN_RULES = ("per-class", "reference", "yolov5")
RANGES = {  # (low, high) sanity bounds; a value outside is an error naming the key
    # (translate up to 1: the reference evolution meta table allows 0.9, and the warp handles any
    # value, an image moved out of the frame just loses its boxes)
    "lr0": (0, 1), "lrf": (0, 1), "momentum": (0, 1), "weight_decay": (0, 1), "warmup_epochs": (0, 1e4),
    "warmup_momentum": (0, 1), "warmup_bias_lr": (0, 1), "box": (0, 1e3), "cls": (0, 1e3), "cls_pw": (0, 1e3),
    "obj": (0, 1e3), "obj_pw": (0, 1e3), "anchor_t": (1, 1e3), "label_smoothing": (0, 1), "hsv_h": (0, 1),
    "hsv_s": (0, 1), "hsv_v": (0, 1), "degrees": (0, 180), "translate": (0, 1), "scale": (0, 1),
    "shear": (0, 90), "perspective": (0, 0.01), "flipud": (0, 1), "fliplr": (0, 1), "mosaic": (0, 1),
    "mixup": (0, 1), "balance": (0, 1e3), "clip_grad": (0, 1e6),
    "ema_tau": (1, 1e7),
    "kd_obj": (0, 1e3), "kd_cls": (0, 1e3), "kd_box": (0, 1e3), "kd_feat": (0, 1e3), "kd_T": (0.1, 100),
    "kd_conf": (0, 1),
}


def available() -> list[str]:
    return sorted(p.name[:-5] for p in resources.files("jaxyolo.configs").joinpath("hyp").iterdir()
                  if p.name.endswith(".yaml"))


def for_family(source, family):
    """The hyp source a run of `family` reads: None (no hyp given) is the family's own default file
    (`Family.default_hyp`: YOLOv4 "default", gfl "gfl"); anything else as given."""
    if source is None:
        return getattr(family, "default_hyp", "default") if family is not None else "default"
    return source


def load_hyp(source: str | Path | Mapping | None = None, *, num_levels: int = 3,
             overrides: Mapping | None = None, family=None) -> dict[str, float | list]:
    """Read a hyp file (a bundled name such as 'default', a path, or a dict) into plain Python
    values, checked: missing keys take the bundled default, unknown keys are an error naming
    them, out-of-range values are an error naming the key. `family` (a `jaxyolo.families.Family`)
    adds the keys its loss reads beyond these (`Family.hyp_defaults`), with their defaults."""
    extra = dict(getattr(family, "hyp_defaults", None) or {})
    defaults = _read(DEFAULT_FILE)
    if source is None:
        raw, where = {}, "defaults"
    elif isinstance(source, Mapping):
        raw, where = dict(source), "hyp dict"
    else:
        raw, where = _read(source), str(source)
    raw = {**raw, **(overrides or {})}
    if "giou" in raw and "box" not in raw:  # the 2020 name of the box gain
        raw["box"] = raw.pop("giou")
    unknown = sorted(set(raw) - set(KEYS) - set(extra) - set(IGNORED) - set(RECIPE_DEFAULTS) - {"fl_gamma", "giou"})
    if unknown:
        raise ConfigError(f"{where}: unknown hyper-parameter(s) {unknown}; known: {sorted(KEYS) + sorted(extra)}")
    if float(raw.get("fl_gamma", 0.0) or 0.0) != 0.0:
        raise ConfigError(f"{where}: fl_gamma={raw['fl_gamma']}: focal loss is not supported (use 0.0)")
    out: dict = {}
    for k in KEYS:
        v = raw.get(k, defaults[k])
        if k == "balance":
            v = _balance(v, num_levels, where)
        else:
            try:
                v = float(v)
            except (TypeError, ValueError):
                raise ConfigError(f"{where}: {k}: expected a number, got {v!r}") from None
        lo, hi = RANGES[k]
        vals = v if isinstance(v, list) else [v]
        if not all(np.isfinite(x) and lo <= x <= hi for x in vals):
            raise ConfigError(f"{where}: {k}={v} is outside [{lo}, {hi}]")
        out[k] = v
    for k, (default, (lo, hi)) in extra.items():
        try:
            v = float(raw.get(k, default))
        except (TypeError, ValueError):
            raise ConfigError(f"{where}: {k}: expected a number, got {raw.get(k)!r}") from None
        if not (np.isfinite(v) and lo <= v <= hi):
            raise ConfigError(f"{where}: {k}={v} is outside [{lo}, {hi}]")
        out[k] = v
    return out


def _balance(v, num_levels: int, where: str) -> list[float]:
    if not isinstance(v, (list, tuple)):
        raise ConfigError(f"{where}: balance: expected a list of {num_levels} numbers, got {v!r}")
    v = [float(x) for x in v]
    if len(v) != num_levels:
        if v == [4.0, 1.0, 0.4] and num_levels == 4:  # the default, extended as the reference does for P6
            return [4.0, 1.0, 0.4, 0.1]
        if v == [4.0, 1.0, 0.4] and num_levels < 3:  # the default, for a model with fewer levels
            return [1.0] * num_levels
        raise ConfigError(f"{where}: balance: {len(v)} values for a model with {num_levels} levels")
    return v


def load_recipe(source: str | Path | Mapping | None = None, *, overrides: Mapping | None = None) -> dict:
    """The run-level settings (`RECIPE_DEFAULTS` keys) of a hyp file, a bundled name or a dict,
    each checked; `overrides` (e.g. command-line flags) win where not None."""
    if source is None:
        raw, where = _read(DEFAULT_FILE), DEFAULT_FILE
    elif isinstance(source, Mapping):
        raw, where = dict(source), "hyp dict"
    else:
        raw, where = _read(source), str(source)
    out = dict(RECIPE_DEFAULTS)
    out.update({k: raw[k] for k in RECIPE_DEFAULTS if k in raw})
    out.update({k: v for k, v in (overrides or {}).items() if v is not None})
    if out["gain_rule"] not in GAIN_RULES:
        raise ConfigError(f"{where}: gain_rule={out['gain_rule']!r}: expected one of {GAIN_RULES}")
    for k in ("min_warmup_iters", "close_mosaic"):
        v = out[k]
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0:
            raise ConfigError(f"{where}: {k}: expected an integer >= 0, got {v!r}")
        out[k] = int(v)
    if not isinstance(out["autoanchor"], bool):
        raise ConfigError(f"{where}: autoanchor: expected true or false, got {out['autoanchor']!r}")
    return out


def loss_gains(hyp: Mapping, *, nc: int, img_size: int, rule: str) -> dict:
    """`hyp` with the box/obj/cls gains the loss should use for `nc` classes at `img_size`.

    The loss (`jaxyolo.loss.yolo_loss`) averages the class term over the classes of the assigned
    boxes and objectness over every cell, then scales all three by 3 / levels. Rules:

    * "per-class" (the default): gains as given. The class term's weight per assigned box is then
      the same for 5 classes as for 80.
    * "reference" (docs/reference.md §9): cls × nc / 80, which keeps each class logit's gradient at its 80-class
      value: with 5 classes the class term weighs 1/16 of "per-class", and the class head of a
      small dataset barely learns (docs/training.md, "Training recipe").
    * "yolov5": the reference's, and obj × (img_size / 640)² as yolov5 / ultralytics scale it.
    """
    if rule not in GAIN_RULES:
        raise ConfigError(f"gain_rule={rule!r}: expected one of {GAIN_RULES}")
    if rule == "per-class":
        return dict(hyp)
    out = {**hyp, "cls": hyp["cls"] * (nc / 80.0)}
    if rule == "yolov5":
        out["obj"] = hyp["obj"] * (img_size / 640.0) ** 2
    return out


def _read(source: str | Path) -> dict:
    path = Path(source)
    if not path.suffix and not path.exists():
        path = Path(str(resources.files("jaxyolo.configs").joinpath("hyp", f"{source}.yaml")))
        if not path.exists():
            if str(source) in RENAMED:
                raise ConfigError(f"hyp {source!r} is now called {RENAMED[str(source)]!r}; bundled: {available()}")
            raise ConfigError(f"hyp {source!r}: no such file; bundled: {available()}")
    data = read_document(path, what="hyp file")
    if not isinstance(data, dict):
        raise ConfigError(f"hyp file {path}: expected a mapping of hyper-parameters")
    return data


def as_arrays(hyp: Mapping) -> dict:
    """Plain values -> the pytree the train step takes (float32 scalars, balance (levels,))."""
    return {k: jnp.asarray(hyp[k], jnp.float32) for k in _keys(hyp)}


def stack(hyps: Sequence[Mapping]) -> dict:
    """A population: P hyp sets -> one pytree with a leading axis P."""
    if not hyps:
        raise ConfigError("a population needs at least one hyp set")
    return {k: jnp.asarray(np.stack([np.asarray(h[k], np.float32) for h in hyps])) for k in _keys(hyps[0])}


def ranges(family=None) -> dict[str, tuple[float, float]]:
    """The sanity bounds of every key: the shared `RANGES` and those of `family`'s own keys."""
    own = getattr(family, "hyp_defaults", None) or {}
    return {**RANGES, **{k: bounds for k, (_, bounds) in own.items()}}


def _keys(hyp: Mapping) -> tuple[str, ...]:
    """The step's keys of a loaded hyp set: the shared ones, then those its family added."""
    return KEYS + tuple(k for k in hyp if k not in KEYS)


def to_yaml(hyp: Mapping) -> str:
    plain = {k: (np.asarray(v).tolist() if np.ndim(v) else float(v)) for k, v in hyp.items()}
    return yaml.safe_dump(plain, sort_keys=False)
