"""What a detector family is: the one interface the shared machinery (training step, validation,
NMS, checkpoints, ONNX export, the search) uses to reach a kind of detector.

A family is a `Family` subclass in its own module under `jaxyolo.families`, registered by name
(`jaxyolo.families.register`). A model table names its family in a `family:` field (tables without
one are YOLOv4's). The family owns everything that depends on how its head is laid out:

* `resolve` a table into its spec (hashable; at least `name`, `nc`, `strides` and the class
  attribute `family`, the registered name) and `build` the NNX module from it. The module is
  called as ``module(images, *, train=False, key=None)`` (images (B, H, W, 3) in [0, 1]; `key`
  draws whatever a training forward draws) and returns its raw outputs, a pytree the family's loss
  and decode read; it carries `spec` and `options` attributes;
* `loss`: its target assignment and loss from padded targets, returning (total, terms) with terms
  {"local": (levels, T), "global": (T,)} named by `term_names`;
* `decode` to `jaxyolo.predictions.Predictions` (boxes xyxy, per-class scores): what NMS and
  evaluation read;
* for export: `inference_module` (the deployable form, e.g. folded), `export_tensor` (one
  (B, N, C) tensor in `export_layout`) and `export_metadata`;
* for checkpoints: `options_to_dict` / `options_from_dict` and `checkpoint_fields` (what
  rebuilds the spec beyond the table);
* `state_dict` / `load_state_dict`: the weights under the names of the family's reference code
  (the default: NNX paths joined with dots);
* `model_tables`: the model names it ships (`--model NAME` finds them);
* for distillation (`jaxyolo.distill`): `kd_terms` and `kd_keys` (its terms and the hyp weights
  of each), `check_distill` (can this teacher teach this student?), `feature_channels` (of the
  head inputs, for feature-imitation adapters) and `distill_loss`;
* `hyp_keys` (the hyp keys its loss reads), `hyp_defaults` (keys of its own beyond the shared
  table, with defaults and ranges) and `search_space` (the bundled space file a search of this
  family starts from).
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Any, ClassVar, Mapping

import numpy as np
from flax import nnx

from jaxyolo.errors import CheckpointError, ConfigError
from jaxyolo.predictions import Predictions


class Family:
    name: ClassVar[str]
    term_names: ClassVar[tuple[str, ...]]  # the loss terms, in the order of the terms' last axis
    hyp_keys: ClassVar[tuple[str, ...]] = ()  # the hyp keys the family's loss reads
    # keys its loss reads beyond the shared table (`jaxyolo.hyp.KEYS`): {key: (default, (low, high))};
    # `jaxyolo.hyp.load_hyp(..., family=)` accepts and fills them
    hyp_defaults: ClassVar[dict] = {}
    search_space: ClassVar[str] = "default"  # a bundled search space name (configs/search/<name>.yaml) or a path
    # the bundled hyp file (configs/hyp/<name>.yaml) that `hyp: default` means for this family
    default_hyp: ClassVar[str] = "default"
    export_layout: ClassVar[str] = "xyxy-scores"  # `jaxyolo.predictions.LAYOUTS`
    options_type: ClassVar[type]  # a frozen dataclass: how a table is instantiated
    # the model names the family ships, {name: path of its YAML table}: `create_model(NAME)`,
    # `--model NAME` (built-in YOLOv4 names are jaxyolo's own tables)
    model_tables: ClassVar[Mapping[str, str]] = {}

    # -- models ---------------------------------------------------------------------------------
    def resolve(self, table: dict, *, name: str, nc: int | None = None, **fields) -> Any:
        """The spec of a raw table; `fields` are the family's `checkpoint_fields` (overrides)."""
        raise NotImplementedError

    def build(self, spec, options, *, rngs: nnx.Rngs) -> nnx.Module:
        raise NotImplementedError

    def make_options(self, **kw):
        """The options dataclass from keyword settings; unknown names are an error naming them."""
        known = {f.name for f in dataclasses.fields(self.options_type)}
        unknown = sorted(set(kw) - known)
        if unknown:
            raise ConfigError(f"model options {unknown} do not apply to the {self.name} family "
                              f"(it takes {sorted(known)})")
        return self.options_type(**kw)

    def options_to_dict(self, options) -> dict:
        return dataclasses.asdict(options)

    def options_from_dict(self, d: Mapping) -> Any:
        return self.make_options(**d)

    def checkpoint_fields(self, spec) -> dict:
        """JSON-able values that, passed to `resolve`, rebuild `spec` from its table."""
        return {}

    def level_names(self, spec) -> tuple[str, ...]:
        """Names of the output levels: P<k> for stride 2**k."""
        return tuple(f"P{int(np.log2(s))}" for s in spec.strides)

    # -- training and inference -------------------------------------------------------------------
    def loss(self, raw, boxes, classes, mask, hyp, *, spec, img_size: int, gain_rule: str):
        """(total summed over the batch, {"local": (levels, T), "global": (T,)}) from the raw
        outputs and padded targets: boxes (B, M, 4) xyxy pixels, classes (B, M), mask (B, M)."""
        raise NotImplementedError

    def decode(self, raw, spec) -> Predictions:
        raise NotImplementedError

    # -- deployment -----------------------------------------------------------------------------
    def inference_module(self, model) -> nnx.Module:
        """The deployable module whose raw outputs equal `model`'s in eval mode (default: itself)."""
        return model

    def export_tensor(self, raw, spec):
        """The one tensor (B, N, C) an exported file publishes, in `export_layout` (default: the
        decode in ``"xyxy-scores"``)."""
        from jaxyolo.predictions import to_tensor

        return to_tensor(self.decode(raw, spec))

    def fold_description(self, model) -> str:
        """What `inference_module` changed, for an exported file's metadata."""
        return "none"

    def export_metadata(self, spec, options) -> dict:
        """Family-specific entries of an exported file's metadata (JSON-able)."""
        return {}

    def describe(self, spec, options) -> str:
        """A few words for `repr(detector)`."""
        return self.name

    def kst(self, model) -> int:
        """KST candidates per implicit vector of the head (0: none)."""
        return 0

    def layer_table(self, model, img_size: int) -> list[dict]:
        raise ConfigError(f"layer_table: not available for the {self.name} family")

    # -- distillation ---------------------------------------------------------------------------
    kd_terms: ClassVar[tuple[str, ...]] = ()  # the distillation terms, in the order of metrics["kd"]
    kd_keys: ClassVar[tuple[str, ...]] = ()  # the hyp weight of each term (all 0: distillation adds nothing)

    def check_distill(self, student, teacher) -> None:
        """Raise ConfigError naming what differs when `teacher` cannot teach `student` (detectors
        of this family)."""
        raise ConfigError(f"student {student.spec.name}: the {self.name} family has no distillation terms")

    def feature_channels(self, spec) -> list[int]:
        """Channels of the features at the head inputs, level by level (what the model returns
        with `return_features=True`)."""
        raise ConfigError(f"{spec.name}: the {self.name} family has no feature imitation")

    def distill_loss(self, raw, teacher_raw, boxes, classes, mask, hyp, *, spec, features=None,
                     teacher_features=None, adapters=None, feature_mask: bool = True):
        """(total summed over the batch, {"kd_local": (levels, K), "kd": (K,)}) for K = `kd_terms`,
        after their weights; the teacher's outputs carry no gradient."""
        raise ConfigError(f"{spec.name}: the {self.name} family has no distillation terms")

    # -- weights --------------------------------------------------------------------------------
    def state_dict(self, model) -> "OrderedDict[str, np.ndarray]":
        """The weights as numpy arrays keyed by dotted NNX paths (a family with a reference
        implementation maps them to that code's names instead)."""
        return OrderedDict((k, np.asarray(v)) for k, v in _flatten(nnx.to_pure_dict(nnx.state(model))))

    def load_state_dict(self, model, state: Mapping[str, np.ndarray], *, source: str = "state_dict") -> None:
        graphdef, current = nnx.split(model)
        pure = nnx.to_pure_dict(current)
        want = dict(_flatten(pure))
        missing, extra = sorted(set(want) - set(state)), sorted(set(state) - set(want))
        if missing or extra:
            raise CheckpointError(f"{source}: keys do not match the {self.name} model "
                                  f"(missing {missing[:8]}, unexpected {extra[:8]})")
        for key, old in want.items():
            if np.shape(state[key]) != tuple(old.shape):
                raise CheckpointError(f"{source}: {key} has shape {np.shape(state[key])}, the model wants "
                                      f"{tuple(old.shape)}")
        new = _unflatten({k: np.asarray(state[k], old.dtype) for k, old in want.items()})
        nnx.replace_by_pure_dict(current, new)
        nnx.update(model, current)


def _flatten(tree: Mapping, prefix: str = ""):
    for k, v in tree.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            yield from _flatten(v, key + ".")
        else:
            yield key, v


def _unflatten(flat: Mapping) -> dict:
    out: dict = {}
    for key, v in flat.items():
        *parents, leaf = key.split(".")
        node = out
        for p in parents:
            node = node.setdefault(int(p) if p.isdigit() else p, {})
        node[int(leaf) if leaf.isdigit() else leaf] = v
    return out
