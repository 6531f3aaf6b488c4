"""Hyper-parameter files: bundled values against the spec's table, reference files, checks, stacking."""

from __future__ import annotations

import math

import numpy as np
import pytest
import yaml

from jaxyolo import hyp as H
from jaxyolo.errors import ConfigError

# docs/reference.md §9 "Hyper-parameter files (values)", first column (YRP
# data/hyp.scratch.s.yaml) and second column (SYC data/hyp.scratch.yaml 2021-05, YOLOv4-CSP), typed in
# from the table; balance from §8 ("balance = [4.0, 1.0, 0.4] for P3, P4, P5"), label_smoothing 0 (off).
SPEC_SCRATCH_S = {
    "lr0": 0.01, "lrf": 0.2, "momentum": 0.937, "weight_decay": 0.0005, "warmup_epochs": 3.0,
    "warmup_momentum": 0.8, "warmup_bias_lr": 0.1, "box": 0.05, "cls": 0.5, "cls_pw": 1.0, "obj": 1.0,
    "obj_pw": 1.0, "anchor_t": 4.0, "hsv_h": 0.015, "hsv_s": 0.7, "hsv_v": 0.4, "degrees": 0.0,
    "translate": 0.1, "scale": 0.5, "shear": 0.0, "perspective": 0.0, "flipud": 0.0, "fliplr": 0.5,
    "mosaic": 1.0, "mixup": 0.0, "balance": [4.0, 1.0, 0.4], "label_smoothing": 0.0,
    # jaxyolo's keys (not in the spec): no gradient clipping (the reference has none), the EMA tau
    # the reference hard-codes; distillation weights 0, i.e. plain training
    "clip_grad": 0.0, "ema_tau": 2000.0,
    "kd_obj": 0.0, "kd_cls": 0.0, "kd_box": 0.0, "kd_feat": 0.0, "kd_T": 1.0, "kd_conf": 0.5,
}
SPEC_SCRATCH_CSP = {**SPEC_SCRATCH_S, "cls": 0.3, "obj": 0.7, "scale": 0.9}
SPEC_FILE_ONLY = {"iou_t": 0.20, "fl_gamma": 0.0}  # in both columns; read but not used
# the bundled default's values that differ from reference-s (README, "Training recipe")
DEFAULT_CHANGES: dict = {"box": 0.2, "clip_grad": 50.0, "ema_tau": 200.0}
# a file without a key takes the bundled default's value: a reference file has neither key
MISSING_FROM_REFERENCE_FILES = {"clip_grad": 50.0, "ema_tau": 200.0}

# ultralytics/yolov5 v6.0 data/hyps/hyp.scratch.yaml (docs/reference.md §9: the first column with lrf 0.1, plus
# copy_paste), with the optional `anchors` key its comments describe
YOLOV5_FILE = """\
lr0: 0.01  # initial learning rate (SGD=1E-2, Adam=1E-3)
lrf: 0.1  # final OneCycleLR learning rate (lr0 * lrf)
momentum: 0.937  # SGD momentum/Adam beta1
weight_decay: 0.0005  # optimizer weight decay 5e-4
warmup_epochs: 3.0  # warmup epochs (fractions ok)
warmup_momentum: 0.8  # warmup initial momentum
warmup_bias_lr: 0.1  # warmup initial bias lr
box: 0.05  # box loss gain
cls: 0.5  # cls loss gain
cls_pw: 1.0  # cls BCELoss positive_weight
obj: 1.0  # obj loss gain (scale with pixels)
obj_pw: 1.0  # obj BCELoss positive_weight
iou_t: 0.20  # IoU training threshold
anchor_t: 4.0  # anchor-multiple threshold
anchors: 3  # anchors per output layer (0 to ignore)
fl_gamma: 0.0  # focal loss gamma (efficientDet default gamma=1.5)
hsv_h: 0.015  # image HSV-Hue augmentation (fraction)
hsv_s: 0.7  # image HSV-Saturation augmentation (fraction)
hsv_v: 0.4  # image HSV-Value augmentation (fraction)
degrees: 0.0  # image rotation (+/- deg)
translate: 0.1  # image translation (+/- fraction)
scale: 0.5  # image scale (+/- gain)
shear: 0.0  # image shear (+/- deg)
perspective: 0.0  # image perspective (+/- fraction), range 0-0.001
flipud: 0.0  # image flip up-down (probability)
fliplr: 0.5  # image flip left-right (probability)
mosaic: 1.0  # image mosaic (probability)
mixup: 0.0  # image mixup (probability)
copy_paste: 0.0  # segment copy-paste (probability)
"""

# the 2020 ScaledYOLOv4 hyp (docs/reference.md §9 third column): the box gain is named `giou`
SCALED_2020_FILE = """\
lr0: 0.01
momentum: 0.937
weight_decay: 0.0005
giou: 0.0296
cls: 0.243
cls_pw: 0.631
obj: 0.301
obj_pw: 0.911
iou_t: 0.2
anchor_t: 2.91
fl_gamma: 0.0
hsv_h: 0.0138
hsv_s: 0.664
hsv_v: 0.464
degrees: 0.373
translate: 0.245
scale: 0.898
shear: 0.602
perspective: 0.0
flipud: 0.00856
fliplr: 0.5
mixup: 0.243
"""


def assert_hyp_equal(got: dict, want: dict):
    assert sorted(got) == sorted(H.KEYS)
    for k in H.KEYS:
        if k == "balance":
            assert list(got[k]) == pytest.approx(want[k], abs=0), k
        else:
            assert isinstance(got[k], float), k
            assert got[k] == pytest.approx(want[k], rel=1e-12, abs=0), k


@pytest.mark.parametrize("name, want", [("reference-s", SPEC_SCRATCH_S), ("reference-csp", SPEC_SCRATCH_CSP)])
def test_bundled_files_equal_the_spec_table(name, want):
    assert {"reference-s", "reference-csp"} <= set(H.available())
    assert_hyp_equal(H.load_hyp(name), want)
    raw = H._read(name)  # the file itself also carries the reference's unused keys, with its values
    for k, v in SPEC_FILE_ONLY.items():
        assert raw[k] == v, k
    assert set(raw) == set(H.KEYS) | set(SPEC_FILE_ONLY) | set(H.RECIPE_DEFAULTS)


def test_default_is_reference_s_with_the_documented_changes_and_missing_keys_take_it():
    default = H.load_hyp()
    assert_hyp_equal(default, {**SPEC_SCRATCH_S, **DEFAULT_CHANGES})
    assert_hyp_equal(H.load_hyp("default"), default)
    assert_hyp_equal(H.load_hyp({"lr0": 0.02, "balance": [3, 1, 0.5]}),
                     {**default, "lr0": 0.02, "balance": [3.0, 1.0, 0.5]})
    assert_hyp_equal(H.load_hyp("reference-csp", overrides={"mixup": 0.1}), {**SPEC_SCRATCH_CSP, "mixup": 0.1})


def test_yolov5_file_with_extra_keys_loads(tmp_path):
    path = tmp_path / "hyp.scratch.yaml"
    path.write_text(YOLOV5_FILE)
    want = {**SPEC_SCRATCH_S, "lrf": 0.1, **MISSING_FROM_REFERENCE_FILES}
    assert_hyp_equal(H.load_hyp(path), want)
    assert_hyp_equal(H.load_hyp(str(path)), want)


def test_2020_file_with_giou_loads(tmp_path):
    path = tmp_path / "hyp.finetune.yaml"
    path.write_text(SCALED_2020_FILE)
    file = yaml.safe_load(SCALED_2020_FILE)
    want = {**SPEC_SCRATCH_S, **{k: v for k, v in file.items() if k in H.KEYS}, "box": 0.0296,
            **MISSING_FROM_REFERENCE_FILES}
    assert_hyp_equal(H.load_hyp(path), want)
    # the same keys in a dict
    assert H.load_hyp({"giou": 0.07})["box"] == 0.07


def test_unknown_key_is_an_error_naming_it():
    with pytest.raises(ConfigError, match="lr_zero"):
        H.load_hyp({"lr0": 0.01, "lr_zero": 0.01})
    with pytest.raises(ConfigError, match="mosiac"):
        H.load_hyp(overrides={"mosiac": 1.0})


@pytest.mark.parametrize("key, value", [("momentum", 1.5), ("lr0", -0.01), ("anchor_t", 0.5), ("translate", 1.5),
                                        ("box", math.nan), ("obj", math.inf), ("balance", [4.0, -1.0, 0.4])])
def test_out_of_range_value_is_an_error_naming_the_key(key, value):
    with pytest.raises(ConfigError, match=rf"\b{key}\b"):
        H.load_hyp({key: value})


def test_non_numbers_and_bad_files_are_errors(tmp_path):
    with pytest.raises(ConfigError, match="hsv_h"):
        H.load_hyp({"hsv_h": "a lot"})
    with pytest.raises(ConfigError, match="balance"):
        H.load_hyp({"balance": 4.0})
    with pytest.raises(ConfigError, match="no-such-hyp"):
        H.load_hyp("no-such-hyp")
    with pytest.raises(ConfigError, match="does not exist"):
        H.load_hyp(tmp_path / "missing.yaml")
    bad = tmp_path / "list.yaml"
    bad.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="mapping"):
        H.load_hyp(bad)
    broken = tmp_path / "broken.yaml"
    broken.write_text("lr0: [0.01\n")
    with pytest.raises(ConfigError, match="YAML"):
        H.load_hyp(broken)


def test_focal_loss_gamma_is_refused():
    assert H.load_hyp({"fl_gamma": 0.0}) == H.load_hyp()
    with pytest.raises(ConfigError, match="fl_gamma"):
        H.load_hyp({"fl_gamma": 1.5})


def test_balance_length_must_match_the_levels():
    with pytest.raises(ConfigError, match="balance"):
        H.load_hyp({"balance": [4.0, 1.0]})
    with pytest.raises(ConfigError, match="balance"):
        H.load_hyp({"balance": [4.0, 1.0, 0.4, 0.1]}, num_levels=3)
    assert H.load_hyp({"balance": [4.0, 1.0, 0.4, 0.1]}, num_levels=4)["balance"] == [4.0, 1.0, 0.4, 0.1]
    # docs/reference.md §8: a three-value balance on a P6 model becomes the reference's [4.0, 1.0, 0.4, 0.1]
    assert H.load_hyp(num_levels=4)["balance"] == [4.0, 1.0, 0.4, 0.1]


def test_stack_gives_a_leading_population_axis():
    a = H.load_hyp()
    b = H.load_hyp("reference-csp", overrides={"lr0": 0.02, "balance": [3.0, 1.0, 0.5]})
    c = H.load_hyp(overrides={"momentum": 0.9})
    s = H.stack([a, b, c])
    assert sorted(s) == sorted(H.KEYS)
    for k in H.KEYS:
        want = np.asarray([a[k], b[k], c[k]], np.float32)
        assert s[k].dtype == np.float32 and s[k].shape == want.shape, k
        np.testing.assert_array_equal(np.asarray(s[k]), want, err_msg=k)
    assert s["balance"].shape == (3, 3) and s["lr0"].shape == (3,)
    one = H.as_arrays(b)
    for k in H.KEYS:
        np.testing.assert_array_equal(np.asarray(one[k]), np.asarray(s[k][1]), err_msg=k)
    with pytest.raises(ConfigError, match="at least one"):
        H.stack([])


def test_to_yaml_round_trip(tmp_path):
    h = H.load_hyp("reference-csp", overrides={"lr0": 0.0123456789, "balance": [3.5, 1.25, 0.3]})
    text = H.to_yaml(h)
    assert yaml.safe_load(text) == h
    path = tmp_path / "hyp.yaml"
    path.write_text(text)
    assert H.load_hyp(path) == h
    assert list(yaml.safe_load(text)) == list(H.KEYS)  # the keys in the documented order


def test_a_run_without_a_hyp_file_takes_its_familys_default():
    from jaxyolo import families

    gfl, yolo = families.get("gfl"), families.get("yolov4")
    assert H.for_family(None, gfl) == "gfl" and H.for_family(None, yolo) == "default"
    assert H.for_family("default", gfl) == "default"  # asked for by name: the shared file
    assert H.load_recipe("gfl")["close_mosaic"] == 10 and H.load_recipe("default")["close_mosaic"] == 0
    assert H.load_hyp("gfl", family=gfl)["gfl_box"] == 2.0
    with pytest.raises(ConfigError, match="unknown hyper-parameter"):
        H.load_hyp("gfl")  # its loss keys belong to the gfl family
