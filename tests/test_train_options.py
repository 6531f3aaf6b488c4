"""The settings tree: construction from mappings and dotted overrides, errors that name the
setting, the train command's --config / flags / --set order, and reading runs saved under the
flat names the settings had before they were grouped."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from jaxyolo.errors import ConfigError
from jaxyolo.train_options import FLAT_NAMES, DataSettings, TrainOptions, flatten, from_flat_names, parse_setting

# The fields TrainOptions had while it was flat (format jaxyolo-train-state/4 runs written then).
OLD_FIELDS = ("model", "data", "hyp", "img_size", "batch_size", "epochs", "out", "weights", "seed", "head", "kst",
              "kst_draw", "act", "dtype", "max_boxes", "workers", "cache_mb", "nominal_batch", "min_warmup_iters",
              "gain_rule", "close_mosaic", "autoanchor", "schedule", "eval_every", "eval_batch_size", "conf_thres",
              "iou_thres", "save_every", "max_nonfinite", "train_split", "val_split", "mesh_pop", "subset",
              "teacher", "kd_features", "init_seeds", "plots", "save_weights", "snapshots", "rewind")


def test_a_tree_round_trips_through_a_mapping_and_yaml():
    o = TrainOptions().updated({"model.name": "yolov4n", "model.options.kst": 1, "data.img_size": 128,
                                "optim.epochs": 7, "checkpoint.snapshots": [0, 5], "init_seeds": [1, 2]})
    back = TrainOptions.from_dict(yaml.safe_load(yaml.safe_dump(o.to_dict())))
    assert back == o
    assert (back.model.options, back.data.img_size, back.optim.epochs) == ({"kst": 1}, 128, 7)
    assert back.data.batch_size == DataSettings().batch_size == 64  # untouched settings keep their defaults
    assert flatten(o.to_dict())["model.options.kst"] == 1 and "model.options" not in flatten(TrainOptions().to_dict())


def test_unknown_or_misplaced_settings_are_named_by_their_dotted_path():
    with pytest.raises(ConfigError, match=r"data\.imgsize: unknown setting.*data\. has source, train_split"):
        TrainOptions().updated({"data.imgsize": 64})
    with pytest.raises(ConfigError, match=r"optim\.epochs\.x: optim\.epochs is not a group"):
        TrainOptions().updated({"optim.epochs.x": 1})
    with pytest.raises(ConfigError, match=r"^img_size: unknown setting"):
        TrainOptions.from_dict({"img_size": 64})
    with pytest.raises(ConfigError, match=r"eval: expected a mapping"):
        TrainOptions.from_dict({"eval": 3})
    for change, message in [({"data.img_size": 100}, r"data\.img_size: must be a multiple of 32"),
                            ({"optim.epochs": 0}, r"optim\.epochs: expected a positive integer"),
                            ({"data.cache_mb": -1}, r"data\.cache_mb"),
                            ({"checkpoint.snapshots": [-1]}, r"checkpoint\.snapshots"),
                            ({"distill.features": True}, r"distill\.features: feature imitation needs a teacher")]:
        with pytest.raises(ConfigError, match=message):
            TrainOptions().updated(change).check()


def test_the_flat_names_of_old_runs_map_to_settings():
    """Every field of the flat TrainOptions has a place in the tree, and no two share one."""
    dotted = [FLAT_NAMES.get(k, k) for k in OLD_FIELDS]
    assert len(set(dotted)) == len(OLD_FIELDS)
    leaves = set(flatten(TrainOptions().to_dict()))
    model_options = {f"model.options.{f}" for f in ("head", "kst", "kst_draw", "act", "dtype")}
    newer = {"model.sparsity"}  # settings added after the flat names were retired
    assert set(dotted) - model_options == leaves - newer
    old = {"model": "yolov4p", "img_size": 96, "kd_features": False, "head": "detect", "eval_every": 2}
    o = TrainOptions().updated(from_flat_names(old))
    assert (o.model.name, o.data.img_size, o.model.options, o.eval.every) == ("yolov4p", 96, {"head": "detect"}, 2)


def test_a_resumed_run_compares_settings_by_name_whatever_layout_it_was_saved_in():
    from jaxyolo.train_loop import STATE_FORMAT, _check_resumable

    new = TrainOptions().updated({"model.name": "yolov4p", "data.img_size": 96, "model.options.head": "detect"})
    meta = {"format": STATE_FORMAT, "batches_per_epoch": 2, "population": 1, "hyps": [], "options": new.to_dict()}
    flat_saved = {"model": "yolov4p", "img_size": 96, "head": "detect", "kst": 3, "act": "silu", "kst_draw": "step",
                  "dtype": None, "eval_every": 5, "plots": False}  # the family defaults, written out
    _check_resumable({**meta, "options": flat_saved}, meta)
    _check_resumable({**meta, "options": new.updated({"model.options.kst": 3, "eval.every": 4}).to_dict()}, meta)
    with pytest.raises(ConfigError, match=r"options differ.*data\.img_size: saved 128, given 96"):
        _check_resumable({**meta, "options": {**flat_saved, "img_size": 128}}, meta)
    with pytest.raises(ConfigError, match=r"model\.options\.kst: saved 2, given None"):
        _check_resumable({**meta, "options": new.updated({"model.options.kst": 2}).to_dict()}, meta)


def _train_args(*argv):
    from jaxyolo.tools.cli import build_parser
    from jaxyolo.tools.train_cmd import options_from_args

    return options_from_args(build_parser().parse_args(["train", *argv]))


def test_the_train_command_reads_a_config_then_flags_then_set(tmp_path):
    assert _train_args() == TrainOptions()  # no flag: the defaults, no model option fixed
    cfg = tmp_path / "train.yaml"
    cfg.write_text(yaml.safe_dump({"model": {"name": "yolov4n", "options": {"act": "mish"}},
                                   "data": {"img_size": 128, "batch_size": 8}, "optim": {"epochs": 5}}))
    o = _train_args("--config", str(cfg), "--img", "160", "--kst", "1", "--bf16", "--set", "optim.epochs=9",
                    "--set", "optim.schedule=linear", "--snapshot", "3", "--snapshot", "7")
    assert (o.model.name, o.data.img_size, o.data.batch_size, o.optim.epochs, o.optim.schedule) == \
        ("yolov4n", 160, 8, 9, "linear")
    assert o.model.options == {"act": "mish", "kst": 1, "dtype": "bfloat16"}
    assert list(o.checkpoint.snapshots) == [3, 7]
    cfg.write_text("data: {imgsize: 3}\n")
    with pytest.raises(ConfigError, match=r"training config .*train.yaml: data\.imgsize: unknown setting"):
        _train_args("--config", str(cfg))
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        parse_setting("optim.epochs")


def test_search_trials_compose_the_training_tree():
    from jaxyolo.search.runner import SearchOptions, trial_defaults

    t = trial_defaults({"data.img_size": 128})
    assert (t.data.batch_size, t.recipe.min_warmup_iters, t.data.img_size) == (16, 0, 128)
    assert dataclasses.replace(TrainOptions(), data=t.data, recipe=t.recipe) == t
    with pytest.raises(ConfigError, match="train: expected TrainOptions"):
        SearchOptions(train={"data": {}}).check()
