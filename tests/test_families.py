"""Detector families: a second family (tests/helpers/toy_family.py, a single-level anchor-free
detector known to nothing outside its own module and table) goes through the shared machinery:
the training step and the run loop, validation and NMS, checkpoints, and the ONNX export with
its parity gate."""

from __future__ import annotations

import dataclasses
import json
from typing import ClassVar

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import toy_family as toy
from helpers import train_runs as R
from helpers.train_case import batch as fixed_batch

import jaxyolo
from jaxyolo import families
from jaxyolo import hyp as H
from jaxyolo import train_step as T
from jaxyolo.errors import CheckpointError, ConfigError
from jaxyolo.evaluate import nms, nms_numpy
from jaxyolo.predictions import Predictions, from_tensor
from jaxyolo.train_loop import fit
from jaxyolo.train_options import TrainOptions


def test_a_table_names_its_family_and_old_tables_are_yolov4(tmp_path):
    det = jaxyolo.create_model(toy.TABLE, num_classes=2)
    assert det.family is families.get("toy") and det.spec.strides == (8,)
    assert jaxyolo.create_model("yolov4p", num_classes=2).family.name == "yolov4"
    bad = tmp_path / "bad.yaml"
    bad.write_text("family: nanodet-x\nnc: 2\n")
    with pytest.raises(ConfigError, match="nanodet-x"):
        jaxyolo.create_model(bad)
    with pytest.raises(ConfigError, match="kst"):  # a YOLOv4 option asked of another family
        jaxyolo.create_model(toy.TABLE, kst=3)


def test_a_familys_own_hyp_keys_load_with_it_and_only_with_it():
    toy_family = families.get("toy")
    h = H.load_hyp(None, num_levels=1, family=toy_family)
    assert h["toy_iou_power"] == 1.0 and H.as_arrays(h)["toy_iou_power"].shape == ()
    assert H.load_hyp({"toy_iou_power": 2.0}, num_levels=1, family=toy_family)["toy_iou_power"] == 2.0
    with pytest.raises(ConfigError, match="toy_iou_power"):
        H.load_hyp({"toy_iou_power": 2.0})  # not a YOLOv4 key
    with pytest.raises(ConfigError, match=r"toy_iou_power=9.0 is outside \[0.5, 4.0\]"):
        H.load_hyp({"toy_iou_power": 9.0}, num_levels=1, family=toy_family)
    assert "toy_iou_power" not in H.load_hyp(None)


def test_published_layouts_read_back_the_same_predictions():
    """A decode published as "xyxy-scores" and as the YOLO layout reads back to the same boxes and
    scores, on the device and on the host."""
    rng = np.random.default_rng(0)
    xywh = np.concatenate([rng.uniform(10, 50, (2, 7, 2)), rng.uniform(1, 20, (2, 7, 2))], -1).astype(np.float32)
    obj, cls = rng.uniform(0, 1, (2, 7, 1)).astype(np.float32), rng.uniform(0, 1, (2, 7, 3)).astype(np.float32)
    yolo = np.concatenate([xywh, obj, cls], -1)
    p = from_tensor(yolo, "xywh-obj-cls")
    np.testing.assert_allclose(p.boxes[..., :2], xywh[..., :2] - xywh[..., 2:] / 2, rtol=1e-6)
    np.testing.assert_allclose(p.scores, obj * cls, rtol=1e-6)
    q = from_tensor(np.concatenate([p.boxes, p.scores], -1), "xyxy-scores")
    np.testing.assert_array_equal(q.boxes, p.boxes)
    d = from_tensor(jnp.asarray(yolo), "xywh-obj-cls")
    np.testing.assert_array_equal(np.asarray(d.scores), p.scores)
    a = nms(jnp.asarray(yolo), conf_thres=0.1, iou_thres=0.5)
    b = nms(Predictions(jnp.asarray(p.boxes), jnp.asarray(p.scores)), conf_thres=0.1, iou_thres=0.5)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    want = nms_numpy(yolo, conf_thres=0.1, iou_thres=0.5)
    got = nms_numpy(np.concatenate([p.boxes, p.scores], -1), layout="xyxy-scores", conf_thres=0.1, iou_thres=0.5)
    for (wb, ws, wc), (gb, gs, gc) in zip(want, got):
        np.testing.assert_array_equal(wc, gc)
        np.testing.assert_array_equal(ws, gs)


def test_the_toy_family_learns_a_fixed_batch():
    """Its own loss through the shared step (StepCore: schedule, SGD, EMA): 100 steps on one batch
    of 8 synthetic images cut the loss to a tenth, and the trained weights find the batch's objects
    far better than the initial ones (VOC AP50 on those images; measured 0.05 -> 0.92)."""
    det = jaxyolo.create_model(toy.TABLE, num_classes=5, seed=0)
    cfg = T.TrainConfig(epochs=1, batches_per_epoch=100, batch_size=8, img_size=64, nominal_batch=8,
                        min_warmup_iters=2, augment=False)
    step = jax.jit(T.make_train_step(det, cfg))
    hyp = H.as_arrays(H.load_hyp({"lr0": 0.02, "lrf": 1.0, "box": 1.0, "cls": 1.0, "warmup_epochs": 0}, num_levels=1,
                                 family=det.family))
    batch = {k: jnp.asarray(v) for k, v in fixed_batch(seed=3, size=64, n=8, max_boxes=4).items()}
    state = T.with_run(T.init_state(det), cfg)
    losses = []
    for i in range(100):
        state, m = step(state, batch, hyp, jax.random.key(i))
        losses.append(float(m["loss"]))
    assert losses[-1] < 0.1 * losses[0], losses[::20]

    def ap50(d):
        dets = nms(d.predictions(jnp.asarray(batch["image"], jnp.float32) / 255), conf_thres=0.01, iou_thres=0.5)
        return _ap50(dets, batch)

    trained = T.ema_detector(det, state, ema=False)
    assert ap50(trained) > ap50(det) + 0.5, (ap50(det), ap50(trained))


def _ap50(dets, batch):
    from jaxyolo.evaluate import split_detections, voc_map

    preds = split_detections(dets)
    gts = [(np.asarray(b)[np.asarray(m)], np.asarray(c)[np.asarray(m)])
           for b, c, m in zip(batch["boxes"], batch["classes"], batch["mask"])]
    return voc_map(preds, gts, num_classes=5)["mAP50"]


def test_the_toy_family_runs_through_fit_checkpoint_and_onnx(data_env, tmp_path):
    """`fit` trains it (rows named by its terms and level), saves weights that `jaxyolo.load`
    rebuilds as a toy detector, and `export_onnx` writes it with in-graph NMS through the shared
    parity gate."""
    pytest.importorskip("onnxruntime")
    from jaxyolo.export.onnx_export import read_metadata

    out = tmp_path / "run"
    opts = TrainOptions().updated({"model.name": toy.TABLE, "data.source": R.DATA, "data.img_size": R.IMG,
                                   "data.batch_size": R.BATCH, "optim.nominal_batch": R.BATCH,
                                   "recipe.min_warmup_iters": 2, "optim.epochs": 2, "out": str(out),
                                   "eval.plots": False})
    run = fit(opts)
    row = run.history[-1]
    assert {"train/box", "train/cls", "train/P3/box", "train/P3/cls", "val/P3/cls"} <= set(row)
    assert "train/obj" not in row and np.isfinite(row["val/loss"]) and 0 <= row["metrics/AP50"] <= 1
    det = jaxyolo.load(out / "weights" / "last")
    assert det.family.name == "toy" and det.img_size == R.IMG
    x = jax.random.uniform(jax.random.key(0), (2, R.IMG, R.IMG, 3))
    np.testing.assert_array_equal(np.asarray(det(x)), np.asarray(run.detectors[0](x)))

    report = det.export_onnx(tmp_path / "toy.onnx", img_size=R.IMG, nms=True, dynamic_batch=True, conf_thres=0.001)
    assert report["max_abs_diff"]["decoded"]["normalised"] <= report["tolerance"]
    assert report["max_abs_diff"]["nms"]["detections"] > 0 and not report["max_abs_diff"]["nms"]["mismatch"]
    meta = read_metadata(tmp_path / "toy.onnx")
    assert (meta["family"], meta["layout"], meta["strides"]) == ("toy", "xyxy-scores", [8])
    assert "anchors" not in meta


def test_a_yolov4_only_operation_names_the_family():
    det = jaxyolo.create_model(toy.TABLE, num_classes=2)
    with pytest.raises(ConfigError, match="toy"):
        det.fold()
    with pytest.raises(ConfigError, match="toy"):
        det.layer_table(64)


def test_a_checkpoint_of_an_unknown_family_is_refused_by_name(tmp_path):
    det = jaxyolo.create_model(toy.TABLE, num_classes=2)
    det.save(tmp_path / "ck")
    from jaxyolo.families import _REGISTRY

    saved = _REGISTRY.pop("toy")
    try:
        with pytest.raises((CheckpointError, ConfigError), match="toy"):
            jaxyolo.load(tmp_path / "ck")
    finally:
        families.register(saved)
    assert jaxyolo.load(tmp_path / "ck").family.name == "toy"


def test_the_search_reads_a_familys_own_loss_terms():
    """A run's records name the toy family's terms (box, cls on one level P3); the search's member
    result carries those curves under their names, and the loss-curve rule derives their gains:
    the term that keeps falling (box) is weighted up against the one that levels off (cls)."""
    from jaxyolo.records import EpochRecord, Losses
    from jaxyolo.search import trend
    from jaxyolo.search.runner import _member_result

    epochs = 8
    box = [1.0 / (1 + e) for e in range(epochs)]  # still falling at the end
    cls = [0.5] * 2 + [0.3] * (epochs - 2)  # levels off after two epochs

    def record(e):
        val = Losses(("box", "cls"), ("P3",), np.array([[box[e], cls[e]]]), np.array([box[e], cls[e]]), box[e] + cls[e])
        return EpochRecord(epoch=e, iterations=e, time_s=0.0, lr=0.01, member=None, train=val, val=val,
                           metrics={"AP": 0.0, "AP50": 0.0}, fitness=0.1 * e)

    curves = _member_result([record(e) for e in range(epochs)], 0)["curves"]
    assert curves["terms"] == ["box", "cls"] and np.shape(curves["local"]) == (epochs, 1, 2)
    hyp = H.load_hyp(None, num_levels=1)
    values, why = trend.loss_weight_grid(curves["local"], curves["global"], hyp, terms=curves["terms"])
    assert set(values) == {"balance.0", "box", "cls"}
    assert values["box"][-1] > hyp["box"] and values["cls"][-1] < hyp["cls"], why


def test_a_search_runs_on_the_toy_family(data_env, tmp_path):
    """The search trains the toy family's trials (two generations of two, then the grid) in the
    family's own space (tests/helpers/toy_space.yaml, with the family's own hyp key), and reads
    their loss curves under the family's term names."""
    from jaxyolo.search.runner import SearchOptions, run_search, trial_defaults

    train = trial_defaults({"model.name": toy.TABLE, "data.source": R.DATA, "data.img_size": R.IMG,
                            "data.batch_size": R.BATCH, "optim.nominal_batch": R.BATCH})
    res = run_search(SearchOptions(train=train, population=2, generations=2, trial_epochs=2, grid_dims=1,
                                   out=str(tmp_path / "search")))
    assert all(t["curves"]["terms"] == ["box", "cls"] for t in res.trials)
    assert 0.5 <= res.best_hyp["toy_iou_power"] <= 4.0 and len(res.trials) >= 4
    assert len({t["hyp"]["toy_iou_power"] for t in res.trials}) > 1  # its own key is searched
    grid = json.loads((tmp_path / "search" / "grid.json").read_text())
    assert set(grid.get("loss_weights", {}).get("values", {})) <= {"balance.0", "box", "cls"}


def test_distillation_refuses_another_family_by_name():
    from jaxyolo import distill as D

    toy_det = jaxyolo.create_model(toy.TABLE, num_classes=2)
    yolo = jaxyolo.create_model("yolov4p", num_classes=2, abstract=True)
    with pytest.raises(ConfigError, match="a yolov4 detector cannot teach the toy student"):
        D.check_compatible(toy_det, yolo)
    # a family without distillation terms refuses a teacher of its own kind too
    with pytest.raises(ConfigError, match="the toy family has no distillation terms"):
        D.check_compatible(toy_det, jaxyolo.create_model(toy.TABLE, num_classes=2))


@dataclasses.dataclass(frozen=True)
class _PluginSpec(toy.ToySpec):
    family: ClassVar[str] = "plugin-toy"


class _PluginToy(toy.Toy):
    name = "plugin-toy"

    def resolve(self, table, *, name, nc=None):
        return _PluginSpec(**dataclasses.asdict(super().resolve(table, name=name, nc=nc)))


PLUGIN = _PluginToy()


def test_a_family_from_another_package_is_found_by_its_entry_point(monkeypatch, tmp_path):
    """A table naming a family nobody imported: the `jaxyolo.families` entry point of that name is
    loaded on first use (here one pointing at this module's PLUGIN); a broken one is an error
    naming it."""
    import importlib.metadata as md

    from jaxyolo.families import _REGISTRY

    eps = [md.EntryPoint("plugin-toy", "test_families:PLUGIN", "jaxyolo.families"),
           md.EntryPoint("broken-toy", "no_such_module_here:X", "jaxyolo.families")]
    monkeypatch.setattr(md, "entry_points", lambda group=None, name=None: [e for e in eps if e.group == group
                                                                           and e.name == name])
    monkeypatch.delitem(_REGISTRY, "plugin-toy", raising=False)
    table = tmp_path / "plugin.yaml"
    table.write_text("family: plugin-toy\nnc: 2\nwidth: 8\n")
    det = jaxyolo.create_model(table)
    assert det.family is PLUGIN and det(jnp.zeros((1, 32, 32, 3))).shape == (1, 16, 4 + 80)
    monkeypatch.delitem(_REGISTRY, "plugin-toy")
    table.write_text("family: broken-toy\nnc: 2\nwidth: 8\n")
    with pytest.raises(ConfigError, match="no_such_module_here"):
        jaxyolo.create_model(table)


def test_a_family_ships_model_names(data_env):
    """`Family.model_tables` names models the way jaxyolo's own tables are named: `create_model`,
    the model list and `jaxyolo train --model NAME` find them; an unknown name lists them."""
    from jaxyolo.families import model_names
    from jaxyolo.tools.cli import build_parser
    from jaxyolo.tools.train_cmd import options_from_args

    det = jaxyolo.create_model("toy-s", num_classes=3)
    assert det.family is toy.FAMILY and det.spec.name == "toy-s"
    assert {"toy-s", "yolov4s"} <= set(model_names())
    opts = options_from_args(build_parser().parse_args(["train", "--model", "toy-s"]))
    assert (opts.model.name, opts.model.options) == ("toy-s", {})  # no YOLOv4 option is forced on it
    with pytest.raises(ConfigError, match="unknown model 'toy-m'.*toy-s"):
        jaxyolo.create_model("toy-m")
