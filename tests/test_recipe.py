"""The training recipe: gains against image size and classes, the run-level keys of hyp files,
fitted anchors, and the training description a checkpoint carries."""

from __future__ import annotations

import numpy as np
import pytest
import yaml

import jaxyolo
from jaxyolo import anchors as A
from jaxyolo import hyp as H
from jaxyolo.errors import CheckpointError, ConfigError

BASE = {"box": 0.05, "obj": 1.0, "cls": 0.5}


@pytest.mark.parametrize("rule, nc, img, want_obj, want_cls", [
    # per-class: the gains as given, whatever the classes and size
    ("per-class", 5, 128, 1.0, 0.5),
    ("per-class", 80, 640, 1.0, 0.5),
    # reference (docs/reference.md §9): cls x nc / 80, obj untouched whatever the size
    ("reference", 80, 640, 1.0, 0.5),
    ("reference", 5, 128, 1.0, 0.5 * 5 / 80),
    # yolov5: obj x (img / 640)^2 too; at 128 px (1/5 of 640) that is 1/25
    ("yolov5", 80, 640, 1.0, 0.5),
    ("yolov5", 5, 128, 1.0 / 25, 0.5 * 5 / 80),
    ("yolov5", 20, 320, 0.25, 0.5 * 20 / 80),
    ("yolov5", 1, 1280, 4.0, 0.5 / 80),
])
def test_loss_gains_by_hand(rule, nc, img, want_obj, want_cls):
    got = H.loss_gains(BASE, nc=nc, img_size=img, rule=rule)
    assert got["box"] == BASE["box"]  # box is a mean over assigned boxes: no size or class factor
    assert got["obj"] == pytest.approx(want_obj, rel=1e-12)
    assert got["cls"] == pytest.approx(want_cls, rel=1e-12)
    assert BASE == {"box": 0.05, "obj": 1.0, "cls": 0.5}  # not modified in place


def test_unknown_gain_rule_is_an_error():
    with pytest.raises(ConfigError, match="gain_rule"):
        H.loss_gains(BASE, nc=5, img_size=128, rule="scaled")


def test_train_step_uses_the_rule_s_gains():
    """The step's loss at 128 px with 5 classes equals yolo_loss with gains scaled by hand."""
    import jax.numpy as jnp

    from jaxyolo import train_step as T
    from jaxyolo.loss import yolo_loss

    det = jaxyolo.create_model("yolov4p", num_classes=5, head="detect", seed=0)
    rng = np.random.default_rng(0)
    raw = [jnp.asarray(rng.normal(0, 1, (2, 3, 128 // s, 128 // s, 10)).astype(np.float32)) for s in det.spec.strides]
    boxes = jnp.asarray([[[10, 10, 50, 60], [60, 70, 120, 100]]] * 2, jnp.float32)
    classes = jnp.asarray([[1, 3]] * 2, jnp.int32)
    mask = jnp.ones((2, 2), bool)
    hyp = H.as_arrays(H.load_hyp("reference-s"))
    for rule, obj, cls in (("yolov5", 1.0 / 25, 0.5 * 5 / 80), ("reference", 1.0, 0.5 * 5 / 80),
                           ("per-class", 1.0, 0.5)):
        cfg = T.TrainConfig(epochs=1, batches_per_epoch=1, batch_size=2, img_size=128, gain_rule=rule, augment=False)
        got, _ = T.StepCore(det, cfg).detection_loss(raw, boxes, classes, mask, hyp)
        by_hand = {**hyp, "obj": jnp.float32(obj), "cls": jnp.float32(cls)}
        want, _ = yolo_loss(raw, boxes, classes, mask, anchors=det.spec.anchors, strides=det.spec.strides, hyp=by_hand)
        np.testing.assert_allclose(float(got), float(want), rtol=1e-6)


def test_recipe_keys_of_the_bundled_files():
    assert H.load_recipe("reference-s") == {"gain_rule": "reference", "min_warmup_iters": 1000, "close_mosaic": 0,
                                            "autoanchor": False}
    assert H.load_recipe("reference-csp")["gain_rule"] == "reference"
    default = H.load_recipe()
    assert default == H.load_recipe("default")
    assert default["gain_rule"] == "per-class" and default["min_warmup_iters"] < 1000 and default["autoanchor"]
    # a file without recipe keys (a yolov5 hyp file) gets the defaults; flags override
    assert H.load_recipe({"lr0": 0.01}) == H.RECIPE_DEFAULTS
    assert H.load_recipe("reference-s", overrides={"min_warmup_iters": 5, "gain_rule": None})["min_warmup_iters"] == 5
    # recipe keys do not enter the numeric hyp pytree
    assert set(H.load_hyp("reference-s")) == set(H.KEYS)


@pytest.mark.parametrize("key, value, match", [
    ("gain_rule", "scaled", "gain_rule"), ("min_warmup_iters", -1, "min_warmup_iters"),
    ("close_mosaic", 1.5, "close_mosaic"), ("autoanchor", "yes", "autoanchor"),
])
def test_bad_recipe_values_name_the_key(tmp_path, key, value, match):
    path = tmp_path / "hyp.yaml"
    path.write_text(yaml.safe_dump({"lr0": 0.01, key: value}))
    with pytest.raises(ConfigError, match=match) as e:
        H.load_recipe(path)
    assert str(path) in str(e.value)


def test_old_bundled_names_say_what_they_are_called_now():
    with pytest.raises(ConfigError, match="reference-s"):
        H.load_hyp("scratch-s")


# ------------------------------------------------------------------------------------------ anchors


def test_bpr_by_hand():
    anchors = np.asarray([[10.0, 10.0], [40.0, 20.0]])
    wh = np.asarray([[10, 10], [20, 20], [45, 5], [80, 40], [2, 2]], float)
    # best worst-side ratios: 1; 1/2 (both anchors); 5/20 = 1/4 (anchor 2: 45/40 and 5/20); 1/2; 1/5
    np.testing.assert_allclose(A.ratio_fit(wh, anchors), [1.0, 0.5, 0.25, 0.5, 0.2])
    assert A.bpr(wh, anchors, anchor_t=4.0) == pytest.approx(3 / 5)  # > 1/4 strictly: 1, 0.5, 0.5
    assert A.bpr(wh, anchors, anchor_t=5.0) == pytest.approx(4 / 5)


def test_fit_anchors_covers_data_the_defaults_miss():
    rng = np.random.default_rng(0)
    # three tight size clusters far from the default anchors' ratios: tall, wide, tiny
    wh = np.concatenate([rng.normal([8, 60], [1, 4], (200, 2)), rng.normal([70, 9], [4, 1], (200, 2)),
                         rng.normal([4, 4], [0.3, 0.3], (200, 2))]).clip(2)
    default = np.asarray([[116, 90], [156, 198], [373, 326]], float)
    assert A.bpr(wh, default, 4.0) < 0.1
    k = A.fit_anchors(wh, 3, 4.0, seed=0)
    assert k.shape == (3, 2) and np.all(np.diff(k.prod(1)) >= 0)  # sorted by area
    assert A.bpr(wh, k, 4.0) == 1.0


class _Boxes:
    """A dataset stand-in: labels and image sizes only (what anchor checking reads)."""

    def __init__(self, wh, size=(200, 100)):
        self.wh, self.size = wh, size

    def __len__(self):
        return len(self.wh)

    def labels(self, i):
        w, h = self.wh[i]
        return np.asarray([[5, 5, 5 + w, 5 + h]], np.float32), np.asarray([0])

    def image_size(self, i):
        return self.size


def test_check_anchors_keeps_good_anchors_and_refits_bad_ones():
    anchors = [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]]
    # boxes at a 200 px long side, trained at 100 px: sizes halve
    good = _Boxes([(40, 52), (120, 180), (64, 46)] * 20)
    rows, report = A.check_anchors(good, anchors, 100, 4.0)
    assert rows is None and report["bpr"] == 1.0 and report["boxes"] == 60 and not report["refitted"]
    bad = _Boxes([(4, 120), (120, 4), (6, 150)] * 20)  # needle-thin at 2 x 60 px etc.: no default fits
    rows, report = A.check_anchors(bad, anchors, 100, 4.0)
    assert report["bpr"] < 0.98 and report["new_bpr"] > report["bpr"]
    assert len(rows) == 3 and all(len(r) == 6 for r in rows)
    flat = np.asarray(rows, float).reshape(-1, 2)
    assert A.bpr(np.asarray([(2, 60), (60, 2), (3, 75)], float), flat, 4.0) == 1.0


# ----------------------------------------------------------------------------------- checkpoint


def test_checkpoint_carries_the_training_description(tmp_path):
    det = jaxyolo.create_model("yolov4p", num_classes=3, head="detect", seed=0)
    assert det.training is None and det.img_size is None
    det.training = {"img_size": 96, "recipe": H.load_recipe(), "hyp": H.load_hyp(), "data": "synthetic"}
    det.names = ("a", "b", "c")
    back = jaxyolo.load(det.save(tmp_path / "ckpt"))
    assert back.training == det.training and back.img_size == 96 and back.names == ("a", "b", "c")
    assert back.fold().img_size == 96  # the inference form keeps it


def test_malformed_training_description_is_a_checkpoint_error(tmp_path):
    det = jaxyolo.create_model("yolov4p", num_classes=1, head="detect", seed=0)
    det.training = {"img_size": "big"}
    path = det.save(tmp_path / "ckpt")
    with pytest.raises(CheckpointError, match="training"):
        jaxyolo.load(path)


def test_validate_defaults_to_the_training_size(tmp_path, monkeypatch):
    from jaxyolo import validate as V

    seen = {}

    def fake(*args, img_size, gain_rule, **kw):
        seen.update(img_size=img_size, gain_rule=gain_rule)
        return [{}]

    monkeypatch.setattr(V, "validate_population", fake)
    det = jaxyolo.create_model("yolov4p", num_classes=1, head="detect", seed=0)
    V.validate(det, dataset=None)
    assert seen == {"img_size": 640, "gain_rule": "per-class"}  # nothing known: 640 and the default rule
    det.training = {"img_size": 96, "recipe": H.load_recipe("reference-s"), "hyp": H.load_hyp("reference-s")}
    V.validate(det, dataset=None)
    assert seen == {"img_size": 96, "gain_rule": "reference"}
    V.validate(det, dataset=None, img_size=160)
    assert seen["img_size"] == 160


def test_a_run_takes_refitted_anchors_or_the_teacher_s():
    """fit's anchor choice: the table's when they cover the data, refitted when they do not, the
    teacher's when distilling (student and teacher must predict alike), none with `autoanchor` off
    or with starting weights (they carry their anchors)."""
    from jaxyolo.train_loop import _run_anchors
    from jaxyolo.train_options import DataSettings, ModelSettings, TrainOptions

    det = jaxyolo.create_model("yolov4p", num_classes=1, head="detect", abstract=True)
    teacher = jaxyolo.create_model("yolov4p", num_classes=1, head="detect", abstract=True,
                                   anchors=[[5, 5, 6, 6, 7, 7], [8, 8, 9, 9, 10, 10], [11, 11, 12, 12, 13, 13]])
    bad = _Boxes([(6, 120), (120, 6), (8, 150)] * 20)  # x 96 / 200 at 96 px
    good = _Boxes([(40, 52), (120, 180), (64, 46)] * 20)
    opts = TrainOptions(data=DataSettings(img_size=96))
    on = H.load_recipe()
    rows, report = _run_anchors(opts, on, det, None, good)
    assert rows is None and report["bpr"] == 1.0 and not report["refitted"]
    rows, report = _run_anchors(opts, on, det, None, bad)
    assert report["refitted"] and report["new_bpr"] > report["bpr"]
    assert rows is not None and A.bpr(np.asarray([(2.88, 57.6), (57.6, 2.88), (3.84, 72)]), rows, 4.0) == 1.0
    assert _run_anchors(opts, on, det, teacher, bad)[0] == [[5, 5, 6, 6, 7, 7], [8, 8, 9, 9, 10, 10],
                                                             [11, 11, 12, 12, 13, 13]]
    assert _run_anchors(opts, {**on, "autoanchor": False}, det, None, bad) == (None, None)
    assert _run_anchors(TrainOptions(data=DataSettings(img_size=96), model=ModelSettings(weights="w.npz")), on, det, None, bad) == (None, None)
