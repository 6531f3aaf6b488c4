"""The `jaxyolo` command's train / eval / predict sub-commands, on the shared tiny run.

The train run is `jaxyolo train` called through `cli.main` (see `helpers.train_runs`); eval and
predict read its saved detectors and are checked against the library called directly and against
the dataset's own annotation files.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from collections import Counter

import numpy as np
from helpers import train_runs as R
from PIL import Image

import jaxyolo
from jaxyolo import hyp as H
from jaxyolo.data.sources import open_dataset
from jaxyolo.evaluate import STAT_NAMES
from jaxyolo.tools.cli import build_parser
from jaxyolo.tools.train_cmd import options_from_args
from jaxyolo.train_options import TrainOptions
from jaxyolo.validate import validate


def val_dataset():
    return open_dataset(R.DATA, "val")


def test_train_command_trains_and_saves(reference, data_env):
    log = (reference.parent / "reference.log").read_text()
    assert "16 training / 8 validation images, 2 iterations per epoch, population 1" in log
    assert f"epoch 1/{R.EPOCHS}  train loss" in log and f"epoch {R.EPOCHS}/{R.EPOCHS}  train loss" in log
    assert f"done: {reference}" in log
    for name in ("results.csv", "hyp.yaml", "options.json", "weights/last", "weights/best", "state"):
        assert (reference / name).exists(), name
    opts = json.loads((reference / "options.json").read_text())  # the settings tree as the flags set it
    assert (opts["model"], opts["data"]["source"], opts["data"]["img_size"], opts["data"]["batch_size"]) == \
        ({"name": "yolov4p", "weights": None, "options": {}, "sparsity": None}, R.DATA, R.IMG, R.BATCH)
    assert (opts["optim"]["nominal_batch"], opts["optim"]["epochs"], opts["recipe"]["min_warmup_iters"],
            opts["checkpoint"]["every"], opts["seed"]) == (R.BATCH, R.EPOCHS, 2, 1, 0)
    # without --hyp the run records the file it read: its family's default
    parsed = options_from_args(build_parser().parse_args(R.TRAIN_ARGS + ["--save-every", "1", "--out", str(reference)]))
    assert parsed.hyp is None and opts["hyp"] == "default"
    assert TrainOptions.from_dict(opts) == dataclasses.replace(parsed, hyp="default")
    assert H.load_hyp(reference / "hyp.yaml") == H.load_hyp("default")
    det = jaxyolo.load(reference / "weights" / "best")
    ds = val_dataset()
    assert det.spec.name == "yolov4p" and det.num_classes == ds.num_classes == 5
    assert list(det.names) == list(ds.names)


def test_train_command_errors_exit_2(tmp_path):
    code, _, err = R.cli_main(R.TRAIN_ARGS[:3] + ["--data", str(tmp_path / "none.yaml"), "--out",
                                                  str(tmp_path / "run")])
    assert code == 2 and err.startswith("jaxyolo train: error:") and "none.yaml" in err
    code, _, err = R.cli_main(R.TRAIN_ARGS + ["--img", "100", "--out", str(tmp_path / "run")])
    assert code == 2 and "img_size" in err and "multiple of 32" in err
    assert not (tmp_path / "run").exists()


def test_eval_of_a_checkpoint_matches_the_library(reference, data_env, tmp_path):
    weights = reference / "weights" / "best"
    saved = tmp_path / "dets.json"
    code, out, err = R.cli_main(["eval", "--weights", str(weights), "--data", R.DATA, "--img", str(R.IMG), "--json",
                                 "--save-dets", str(saved)])
    assert code == 0, err
    got = json.loads(out)

    ds = val_dataset()
    res = validate(jaxyolo.load(weights), ds, img_size=R.IMG, batch_size=16, conf_thres=0.001, iou_thres=0.65,
                   keep_detections=True)
    assert {k: got[k] for k in STAT_NAMES} == {k: res["coco"][k] for k in STAT_NAMES}
    assert got["VOC_AP50_all"] == res["voc"]["mAP50"] and got["fitness"] == res["fitness"]
    assert got["images"] == len(ds) == 8
    assert json.loads(saved.read_text()) == json.loads(json.dumps(res["detections"]))
    assert len(res["detections"]) > 0  # conf 0.001: even an untrained detector reports boxes

    # the ground-truth counts per class, from the annotation file itself
    ann = json.loads((ds_root() / "annotations" / "instances_val.json").read_text())
    counts = Counter(a["category_id"] for a in ann["annotations"])
    names = {c["id"]: c["name"] for c in ann["categories"]}
    assert [(r["class"], r["n_gt"]) for r in got["per_class"]] == [(names[c], counts.get(c, 0)) for c in
                                                                    sorted(names)]

    # the saved detections scored by the --gt/--dets path give the same numbers
    code, out, err = R.cli_main(["eval", "--gt", str(ds_root() / "annotations" / "instances_val.json"),
                                 "--dets", str(saved), "--json"])
    assert code == 0, err
    again = json.loads(out)
    assert {k: again[k] for k in STAT_NAMES} == {k: got[k] for k in STAT_NAMES}


def ds_root():
    """The synthetic dataset's folder (<root>/annotations/instances_val.json)."""
    from jaxyolo.data.sources import parse_options
    from jaxyolo.data.synthetic import synthetic_dataset

    return synthetic_dataset(**parse_options(R.DATA.partition(":")[2]))


def test_eval_argument_errors_exit_2(reference, data_env, tmp_path):
    code, out, err = R.cli_main(["eval", "--gt", str(tmp_path / "gt.json")])
    assert code == 2 and out == ""
    assert err.startswith("jaxyolo eval: error:") and "--dets" in err
    code, out, err = R.cli_main(["eval", "--weights", str(reference / "weights" / "last")])
    assert code == 2 and "--data" in err
    other = "synthetic:num_train=0,num_val=2,img_size=64,num_classes=3"
    code, out, err = R.cli_main(["eval", "--weights", str(reference / "weights" / "last"), "--data", other])
    assert code == 2 and "has 5 classes" in err and f"{other} has 3" in err


def test_predict_draws_every_image(reference, data_env, tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    images = sorted((ds_root() / "val" / "images").glob("*.jpg"))[:3]
    for f in images:
        shutil.copy(f, src / f.name)
    (src / "notes.txt").write_text("not an image")
    out = tmp_path / "out"
    weights = reference / "weights" / "last"
    code, stdout, err = R.cli_main(["predict", "--weights", str(weights), "--source", str(src), "--out", str(out),
                                    "--img", str(R.IMG), "--conf", "0.001"])
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == sorted([f.stem + ".jpg" for f in images]
                                                           + ["detections.json", "detections.jsonl"])
    for f in images:  # drawn on the original image, at its size
        with Image.open(out / (f.stem + ".jpg")) as a, Image.open(f) as b:
            assert a.size == b.size
    records = json.loads((out / "detections.json").read_text())
    assert [r["file"] for r in records] == [f.name for f in images]
    assert f"{len(images)} image(s), {sum(len(r['detections']) for r in records)} detection(s)" in stdout

    from jaxyolo.data.yolo import read_rgb
    from jaxyolo.predict import predict

    det = jaxyolo.load(weights)
    for f, rec in zip(images, records):
        img = read_rgb(f)
        boxes, scores, classes = predict(det, img, img_size=R.IMG, conf_thres=0.001, iou_thres=0.45)
        assert len(rec["detections"]) == len(scores) > 0
        h, w = img.shape[:2]
        for d, b, s, c in zip(rec["detections"], boxes, scores, classes):
            assert d["class"] == det.names[int(c)] and d["score"] == round(float(s), 4) >= 0.001 - 5e-5
            np.testing.assert_allclose(d["box"], np.round(np.asarray(b, np.float64), 2), atol=0.0051)
            x0, y0, x1, y1 = d["box"]
            assert 0 <= x0 <= x1 <= w and 0 <= y0 <= y1 <= h


def test_predict_skips_bad_files_and_reads_every_mode_like_training(reference, data_env, tmp_path):
    """A zero-byte and a cut-short JPEG among good files are skipped and named; the images after them
    are done; a 16-bit grey PNG is seen as the datasets see it (not white); every record is in
    detections.jsonl line by line and in detections.json."""
    from jaxyolo.data.yolo import read_rgb

    src = tmp_path / "src"
    src.mkdir()
    good = sorted((ds_root() / "val" / "images").glob("*.jpg"))[:2]
    shutil.copy(good[0], src / "a.jpg")
    (src / "b_empty.jpg").write_bytes(b"")
    data = good[1].read_bytes()
    (src / "c_cut.jpg").write_bytes(data[: len(data) // 2])
    grey = np.asarray(Image.open(good[1]).convert("L"), np.uint16)
    Image.fromarray(grey * 256 + 128).save(src / "d_grey16.png")
    assert Image.open(src / "d_grey16.png").mode == "I;16"
    shutil.copy(good[1], src / "e.jpg")
    out = tmp_path / "out"
    code, stdout, err = R.cli_main(["predict", "--weights", str(reference / "weights" / "last"), "--source",
                                    str(src), "--out", str(out), "--img", str(R.IMG), "--conf", "0.999"])
    assert code == 0, err
    assert "b_empty.jpg" in err and "c_cut.jpg" in err and "2 of 5 file(s)" in err
    records = json.loads((out / "detections.json").read_text())
    assert [r["file"] for r in records] == ["a.jpg", "d_grey16.png", "e.jpg"]
    lines = [json.loads(x) for x in (out / "detections.jsonl").read_text().splitlines()]
    assert lines == records and "3 image(s)" in stdout
    drawn = np.asarray(Image.open(out / "d_grey16.jpg").convert("L"), float)  # nothing above conf 0.999
    want = read_rgb(src / "d_grey16.png")[..., 0].astype(float)
    # the drawing is a JPEG: a few levels of noise; a white image would be 100+ levels off
    assert np.abs(drawn - want).mean() < 8 and abs(drawn.mean() - grey.mean()) < 3 and drawn.mean() < 200
    # nothing readable at all: an error, not an empty success
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "x.jpg").write_bytes(b"")
    code, _, err = R.cli_main(["predict", "--weights", str(reference / "weights" / "last"), "--source", str(bad),
                               "--out", str(tmp_path / "out2")])
    assert code == 2 and "none of the 1 file(s) could be decoded" in err


def test_fast_compile_set_once_is_not_reported_as_ignored(monkeypatch, caplog):
    """A caller that applies --fast-compile before the XLA backend starts: the pipeline's second
    call must neither warn that it was ignored nor add the flag again."""
    from jaxyolo.tools import pipeline_cmd

    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1 --xla_backend_optimization_level=0")
    with caplog.at_level("WARNING", logger="jaxyolo"):
        pipeline_cmd.setup_compilation(None, True)
    assert "ignored" not in caplog.text
    assert os.environ["XLA_FLAGS"] == "--xla_foo=1 --xla_backend_optimization_level=0"


def test_epoch_line_shows_the_epoch_times():
    from jaxyolo.tools.train_cmd import format_row

    row = {"epoch": 2, "train/loss": 1.5, "train/box": 0.5, "train/obj": 0.5, "train/cls": 0.5,
           "val/loss": float("nan"), "metrics/AP50": float("nan"), "metrics/AP": float("nan"),
           "time/train_s": 12.34, "time/val_s": float("nan")}
    line = format_row(row, 10)
    assert line.startswith("epoch 3/10  train loss 1.5000") and line.endswith("(12.3 s + val - s)")
