"""The settings of a training run: one tree of dataclasses, shared by `fit`, the search (each trial's
settings are a `TrainOptions`) and the pipeline (its `train:` mapping).

    TrainOptions
      model       ModelSettings       name, weights, options (the family's model options)
      data        DataSettings        source, splits, img_size, batch_size, max_boxes, subset, workers, cache_mb
      optim       OptimSettings       epochs, nominal_batch, schedule, max_nonfinite
      recipe      RecipeSettings      the hyp file's run-level keys, where this run sets them
      eval        EvalSettings        every, batch_size, conf_thres, iou_thres, plots
      checkpoint  CheckpointSettings  every, save_weights, snapshots, rewind
      distill     DistillSettings     teacher, features
      hyp, out, seed, init_seeds, mesh_pop

Three ways in, one per use: the dataclasses from Python; `TrainOptions.from_dict` from a nested
mapping (a YAML file, a saved `options.json`); `options.updated({"data.img_size": 96})` for dotted
overrides (`--set`). Names are dotted everywhere a setting is reported.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any, Mapping, Sequence

from jaxyolo.errors import ConfigError
from jaxyolo.validate import DEFAULT_IOU_TRAIN


@dataclasses.dataclass
class ModelSettings:
    name: str = "yolov4s"  # a built-in table or a YAML table path
    weights: str | None = None  # start from a jaxyolo checkpoint, a .pt or a .npz
    # the family's model options; unset ones take the family's defaults (YOLOv4,
    # `jaxyolo.models.yolo.ModelOptions`: head="implicit", kst=3, kst_draw="step", act="silu",
    # dtype=None; dtype "bfloat16" computes in bf16 with float32 master weights)
    options: dict = dataclasses.field(default_factory=dict)
    # "N:M" (e.g. "2:4"): fine-tune with fixed N:M magnitude masks computed from the starting
    # weights (`jaxyolo.sparsity`; start from trained `weights`)
    sparsity: str | None = None


@dataclasses.dataclass
class DataSettings:
    source: str = "synthetic"  # see jaxyolo.data.sources.open_dataset
    train_split: str = "train"
    val_split: str = "val"
    img_size: int = 640
    batch_size: int = 64  # images per iteration over all devices
    max_boxes: int = 100
    subset: int | None = None  # train on the first N images only (quick runs, multi-fidelity search)
    workers: int = 0
    cache_mb: int = 1024  # resized training images kept in memory (data.loader.ResizedCache); 0: off


@dataclasses.dataclass
class OptimSettings:
    epochs: int = 300
    nominal_batch: int = 64  # gradients accumulate to this many images per optimiser step
    schedule: str = "cosine"
    max_nonfinite: int = 10  # non-finite iterations in a row before the run stops


@dataclasses.dataclass
class RecipeSettings:
    """The hyp file's run-level keys (`jaxyolo.hyp.RECIPE_DEFAULTS`); None: the file's value."""

    min_warmup_iters: int | None = None
    gain_rule: str | None = None  # "per-class", "reference" or "yolov5" (jaxyolo.hyp.loss_gains)
    close_mosaic: int | None = None  # last epochs without mosaic
    autoanchor: bool | None = None  # refit anchors that cover the data badly (jaxyolo.anchors)


@dataclasses.dataclass
class EvalSettings:
    every: int = 1  # epochs; the last epoch is always evaluated
    batch_size: int = 16
    conf_thres: float = 0.001
    iou_thres: float = DEFAULT_IOU_TRAIN
    plots: bool = True  # results.png, PR_curve.png, val_predictions.jpg


@dataclasses.dataclass
class CheckpointSettings:
    every: int = 0  # iterations between training-state checkpoints (0: epoch ends only)
    save_weights: bool = True  # weights/{last,best} per member (search trials keep only their metrics)
    # iterations whose training state is kept as a named snapshot, snapshots/iter<k> (with the raw
    # weights as a detector, weights/iter<k>): rewind points
    snapshots: Sequence[int] = ()
    # start from a snapshot folder (snapshots/iter<k> of an earlier run with the same data, batch and
    # population): its whole training state, continuing at iteration k (lottery-ticket rewinding)
    rewind: str | None = None

    def __post_init__(self):
        if isinstance(self.snapshots, list):  # as read from YAML / JSON: equal trees compare equal
            self.snapshots = tuple(self.snapshots)


@dataclasses.dataclass
class DistillSettings:
    teacher: str | None = None  # distil from this jaxyolo checkpoint folder (its EMA / inference weights)
    features: bool = False  # feature imitation at P3-P5 through 1x1 adapters (hyp kd_feat)


@dataclasses.dataclass
class TrainOptions:
    model: ModelSettings = dataclasses.field(default_factory=ModelSettings)
    data: DataSettings = dataclasses.field(default_factory=DataSettings)
    optim: OptimSettings = dataclasses.field(default_factory=OptimSettings)
    recipe: RecipeSettings = dataclasses.field(default_factory=RecipeSettings)
    eval: EvalSettings = dataclasses.field(default_factory=EvalSettings)
    checkpoint: CheckpointSettings = dataclasses.field(default_factory=CheckpointSettings)
    distill: DistillSettings = dataclasses.field(default_factory=DistillSettings)
    # bundled name, path or mapping (reference key names), with its recipe keys; None: the model
    # family's default file (`Family.default_hyp`: YOLOv4 "default", gfl "gfl")
    hyp: Any = None
    out: str = "runs/train/exp"
    seed: int = 0
    # One initialisation seed per population member (repeated runs of one hyp set trained together:
    # the members share the data order of `seed`; weights, adapters, augmentation and KST draws differ).
    init_seeds: Sequence[int] | None = None
    mesh_pop: int | None = None  # devices along 'pop' (default: as many as divide P)

    def __post_init__(self):
        if isinstance(self.init_seeds, list):
            self.init_seeds = tuple(self.init_seeds)

    @classmethod
    def from_dict(cls, d: Mapping, where: str = "") -> TrainOptions:
        """From a nested mapping; an unknown name is an error giving its dotted path."""
        return _from_dict(cls, d, where)

    def to_dict(self) -> dict:
        """The nested settings as JSON values."""
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))

    def updated(self, changes: Mapping[str, Any]) -> TrainOptions:
        """A copy with dotted settings replaced: {"data.img_size": 96, "model.options.kst": 1}."""
        tree = dataclasses.asdict(self)
        for key, value in changes.items():
            node, parts = tree, key.split(".")
            for i, p in enumerate(parts[:-1]):
                node = node.get(p)
                if not isinstance(node, dict):
                    raise ConfigError(f"{key}: {'.'.join(parts[:i + 1])} is not a group of settings")
            node[parts[-1]] = value
        return _from_dict(type(self), tree, "")

    def check(self) -> None:
        for name in ("data.img_size", "data.batch_size", "optim.epochs", "data.max_boxes", "eval.every",
                     "eval.batch_size"):
            v = self.get(name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        if not isinstance(self.data.cache_mb, int) or self.data.cache_mb < 0:
            raise ConfigError(f"data.cache_mb: expected an integer >= 0, got {self.data.cache_mb!r}")
        if self.data.img_size % 32:
            raise ConfigError(f"data.img_size: must be a multiple of 32 (the largest stride), got {self.data.img_size}")
        if not isinstance(self.model.options, Mapping):
            raise ConfigError(f"model.options: expected a mapping of model options, got {self.model.options!r}")
        if self.init_seeds is not None:
            if not self.init_seeds or not all(isinstance(s, int) and s >= 0 for s in self.init_seeds):
                raise ConfigError(f"init_seeds: expected a non-empty list of integers >= 0, got {self.init_seeds!r}")
            if self.model.weights:
                raise ConfigError("init_seeds: the members would all start from `model.weights`; give one or the "
                                  "other")
        if not all(isinstance(k, int) and k >= 0 for k in self.checkpoint.snapshots):
            raise ConfigError(f"checkpoint.snapshots: expected iterations (integers >= 0), got "
                              f"{self.checkpoint.snapshots!r}")
        if self.checkpoint.rewind and (self.model.weights or self.init_seeds is not None):
            raise ConfigError("checkpoint.rewind: the run starts from the snapshot's state; `model.weights` and "
                              "`init_seeds` cannot be given with it")
        if self.model.sparsity is not None:
            from jaxyolo.sparsity import Pattern

            try:
                Pattern.parse(self.model.sparsity)
            except ConfigError as e:
                raise ConfigError(f"model.{e}") from None
        if self.distill.features and not self.distill.teacher:
            raise ConfigError("distill.features: feature imitation needs a teacher (distill.teacher, --teacher)")

    def get(self, dotted: str):
        node = self
        for p in dotted.split("."):
            node = node[p] if isinstance(node, Mapping) else getattr(node, p)
        return node


# what a run reports where and how often, not what it trains: a resumed run may change these
REPORTING = ("out", "data.workers", "data.cache_mb", "eval.every", "eval.batch_size", "eval.plots",
             "checkpoint.save_weights")


def parse_setting(text: str) -> tuple[str, Any]:
    """`KEY=VALUE` with the value read as YAML (`optim.epochs=2`, `model.options.kst=1`, `deploy.img=[64]`)."""
    import yaml

    if "=" not in text:
        raise ConfigError(f"--set {text!r}: expected KEY=VALUE")
    key, value = text.split("=", 1)
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {text!r}: the value is not valid YAML ({e})") from None


def flatten(tree: Mapping, prefix: str = "") -> dict:
    """{dotted name: leaf} of a nested mapping (`TrainOptions.to_dict()`); an empty mapping has none."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, Mapping):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


# The flat names of the settings before they were grouped (`options.json` of runs written then).
FLAT_NAMES = {
    "model": "model.name", "weights": "model.weights", "data": "data.source", "img_size": "data.img_size",
    "batch_size": "data.batch_size", "max_boxes": "data.max_boxes", "workers": "data.workers",
    "cache_mb": "data.cache_mb", "subset": "data.subset", "train_split": "data.train_split",
    "val_split": "data.val_split", "epochs": "optim.epochs", "nominal_batch": "optim.nominal_batch",
    "schedule": "optim.schedule", "max_nonfinite": "optim.max_nonfinite",
    "min_warmup_iters": "recipe.min_warmup_iters", "gain_rule": "recipe.gain_rule",
    "close_mosaic": "recipe.close_mosaic", "autoanchor": "recipe.autoanchor", "eval_every": "eval.every",
    "eval_batch_size": "eval.batch_size", "conf_thres": "eval.conf_thres", "iou_thres": "eval.iou_thres",
    "plots": "eval.plots", "save_every": "checkpoint.every", "save_weights": "checkpoint.save_weights",
    "snapshots": "checkpoint.snapshots", "rewind": "checkpoint.rewind", "teacher": "distill.teacher",
    "kd_features": "distill.features", "head": "model.options.head", "kst": "model.options.kst",
    "kst_draw": "model.options.kst_draw", "act": "model.options.act", "dtype": "model.options.dtype",
}


def from_flat_names(d: Mapping) -> dict:
    """{dotted name: value} of settings saved under their flat names."""
    return {FLAT_NAMES.get(k, k): v for k, v in d.items()}


def _from_dict(cls, d, where: str):
    if isinstance(d, cls):
        return d
    if not isinstance(d, Mapping):
        raise ConfigError(f"{where.rstrip('.') or 'options'}: expected a mapping of settings, got {d!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ConfigError(f"{', '.join(where + k for k in unknown)}: unknown setting(s); {where or 'the top level'} "
                          f"has {', '.join(fields)}")
    kw = {}
    for k, v in d.items():
        group = _group_type(fields[k])
        kw[k] = _from_dict(group, v, f"{where}{k}.") if group is not None else v
    return cls(**kw)


def _group_type(f: dataclasses.Field):
    if f.default_factory is dataclasses.MISSING:
        return None
    made = f.default_factory()
    return type(made) if dataclasses.is_dataclass(made) else None
