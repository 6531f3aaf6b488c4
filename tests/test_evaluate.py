"""Evaluation: NMS against a plain-loop reference, letterbox inverse, COCO numbers against cocoapi's
published demo figures, VOC AP against a hand-worked case, and clear errors for bad json."""

from __future__ import annotations

import argparse
import json
import math
import re
from pathlib import Path
from typing import ClassVar

import numpy as np
import pytest

from jaxyolo import evaluate as E
from jaxyolo.data.dataset import DetectionDataset
from jaxyolo.errors import JaxyoloError
from jaxyolo.evaluate import (
    STAT_NAMES,
    COCO_ENGINES,
    coco_evaluate,
    detections_to_coco,
    evaluate_predictions,
    nms,
    nms_numpy,
    scale_boxes,
    split_detections,
    voc_map,
)
from jaxyolo.tools import evaluate_cmd

COCOAPI_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cocoapi-eval"
GT_JSON = COCOAPI_DIR / "instances_val2014_100.json"
RESULTS = {"bbox": "instances_val2014_fakebbox100_results.json", "segm": "instances_val2014_fakesegm100_results.json"}

# Full-precision stats asserted by faster_coco_eval's tests/test_cocoapi_fake_data.py (SOURCE.md there)
PUBLISHED = {
    "bbox": (0.5045806987249628, 0.6969727247299577, 0.5729816669904824, 0.5856257209410443,
             0.5193996948036719, 0.5013978986347466, 0.38681277964578054, 0.5936795762842003,
             0.595352982877607, 0.6398109626113442, 0.5664205978994309, 0.5642905982905982),
    "segm": (0.3195452758576433, 0.5622883972521636, 0.29892653412086784, 0.3873740315997838,
             0.31018272403369485, 0.3269339071005138, 0.2682297225711534, 0.41544868114906375,
             0.4168394992198818, 0.4694498622754236, 0.37675922666197265, 0.3814715099715099),
}

needs_cocoapi = pytest.mark.skipif(not GT_JSON.exists(), reason=f"{COCOAPI_DIR} not present")


def published_3dp(iou_type: str) -> list[float]:
    """The 12 numbers of one section of cocoapi's results/val2014_fake_eval_res.txt."""
    text = (COCOAPI_DIR / "val2014_fake_eval_res.txt").read_text()
    section = text.split(f"type={iou_type}")[1].split("type=")[0]
    return [float(v) for v in re.findall(r"\] = (\d\.\d{3})", section)]


# ------------------------------------------------------------------------------------------ COCO


@needs_cocoapi
@pytest.mark.parametrize("engine", COCO_ENGINES)
@pytest.mark.parametrize("iou_type", ["bbox", "segm"])
def test_coco_reproduces_cocoapi_demo(iou_type, engine):
    res = coco_evaluate(GT_JSON, COCOAPI_DIR / RESULTS[iou_type], iou_type=iou_type, engine=engine)
    got = [res[k] for k in STAT_NAMES]
    assert [round(v, 3) for v in got] == published_3dp(iou_type)
    np.testing.assert_allclose(got, PUBLISHED[iou_type], rtol=0, atol=1e-12)
    # per-class AP averages back to AP: every class with ground truth fills the same cells
    per_class = [v["AP"] for v in res["per_class"].values() if v["n_gt"] > 0]
    assert math.isclose(np.mean(per_class), res["AP"], abs_tol=1e-12)
    assert res["per_class"]["person"]["category_id"] == 1 and res["per_class"]["person"]["n_gt"] > 0
    assert res["summary"].count("\n") == 11 and f"= {published_3dp(iou_type)[0]:.3f}" in res["summary"]
    assert res["summary"] == pycocotools_printed(iou_type)  # line for line


def pycocotools_printed(iou_type: str) -> str:
    import contextlib
    import io

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        gt = COCO(str(GT_JSON))
        ev = COCOeval(gt, gt.loadRes(str(COCOAPI_DIR / RESULTS[iou_type])), iou_type)
        ev.evaluate()
        ev.accumulate()
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        ev.summarize()
    return out.getvalue().rstrip("\n")


def small_gt() -> dict:
    return {
        "images": [{"id": 1, "height": 100, "width": 100}, {"id": 2, "height": 100, "width": 100}],
        "categories": [{"id": 5, "name": "cat"}, {"id": 7, "name": "dog"}],
        "annotations": [
            {"id": 1, "image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "area": 1600, "iscrowd": 0},
            {"id": 2, "image_id": 2, "category_id": 5, "bbox": [50, 50, 30, 20], "area": 600, "iscrowd": 0},
        ],
    }


@pytest.mark.parametrize("engine", COCO_ENGINES)
def test_coco_perfect_and_empty_detections(capsys, engine):
    gt = small_gt()
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    res = coco_evaluate(gt, perfect, engine=engine)
    assert res["AP"] == res["AP50"] == 1.0
    assert res["per_class"]["cat"]["AP"] == 1.0 and math.isnan(res["per_class"]["dog"]["AP"])
    empty = coco_evaluate(gt, [], engine=engine)
    assert all(empty[k] in (0.0, -1.0) for k in STAT_NAMES) and empty["AP"] == 0.0
    assert empty["per_class"]["cat"]["AP"] == 0.0
    assert capsys.readouterr().out == ""  # the engine's printing is captured
    assert gt == small_gt()  # cocoapi writes into annotations; ours are copies
    assert perfect[0] == {"image_id": 1, "category_id": 5, "bbox": [10, 10, 40, 40], "score": 0.9}


def write(tmp_path, name, obj) -> Path:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return p


@pytest.mark.parametrize("dets, message", [
    ({"image_id": 1}, "must be a JSON list"),
    ([{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1, 1]}], "detections[0] has no 'score'"),
    ([{"image_id": 9, "category_id": 5, "bbox": [0, 0, 1, 1], "score": 1}], "image id(s) not in the ground truth"),
    ([{"image_id": 1, "category_id": 6, "bbox": [0, 0, 1, 1], "score": 1}], "category id(s) not in the ground truth"),
    ([{"image_id": 1, "category_id": 5, "bbox": [0, 0, 1], "score": 1}], "must be [x, y, w, h]"),
    ("[{not json", "not valid JSON"),
])
def test_bad_detections_name_file_and_fault(tmp_path, dets, message):
    path = write(tmp_path, "dets.json", dets)
    with pytest.raises(JaxyoloError) as e:
        coco_evaluate(small_gt(), path)
    assert str(path) in str(e.value) and message in str(e.value)


def test_bad_ground_truth_names_file_and_fault(tmp_path):
    gt = small_gt()
    del gt["annotations"][1]["area"]
    path = write(tmp_path, "gt.json", gt)
    with pytest.raises(JaxyoloError, match=r"gt\.json: annotations\[1\] has no 'area'"):
        coco_evaluate(path, [])
    path = write(tmp_path, "gt2.json", [1, 2])
    with pytest.raises(JaxyoloError, match="gt2.json: ground truth must be a JSON object"):
        coco_evaluate(path, [])
    with pytest.raises(JaxyoloError, match="missing.json: cannot read"):
        coco_evaluate(tmp_path / "missing.json", [])
    with pytest.raises(JaxyoloError, match="image_ids not in the ground truth"):
        coco_evaluate(small_gt(), [], image_ids=[1, 3])


def test_detections_to_coco_rounds_like_the_reference():
    out = detections_to_coco([np.array([[1.23456, 2.0, 11.23456, 5.5]]), np.zeros((0, 4))],
                             [np.array([0.123456789]), np.zeros(0)], [np.array([1]), np.zeros(0, int)],
                             [42, 43], [5, 7])
    assert out == [{"image_id": 42, "category_id": 7, "bbox": [1.235, 2.0, 10.0, 3.5], "score": 0.12346}]
    with pytest.raises(JaxyoloError, match="one of each per image"):
        detections_to_coco([np.zeros((0, 4))], [], [], [1], [5])
    with pytest.raises(JaxyoloError, match="image 4 has class 2"):
        detections_to_coco([np.zeros((1, 4))], [np.ones(1)], [np.array([2])], [4], [5, 7])


# ------------------------------------------------------------------------------------------- CLI


@needs_cocoapi
def test_eval_command_prints_cocoapi_table_and_json(capsys):
    parser = argparse.ArgumentParser()
    evaluate_cmd.add_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["eval", "--gt", str(GT_JSON), "--dets", str(COCOAPI_DIR / RESULTS["bbox"])])
    assert args.func(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [float(line.rsplit("=", 1)[1]) for line in lines] == published_3dp("bbox")
    assert lines[0].startswith(" Average Precision") and "maxDets=100 ] = 0.505" in lines[0]
    args = parser.parse_args(["eval", "--gt", str(GT_JSON), "--dets", str(COCOAPI_DIR / RESULTS["bbox"]), "--json"])
    assert evaluate_cmd.run(args) == 0
    obj = json.loads(capsys.readouterr().out)
    np.testing.assert_allclose([obj[k] for k in STAT_NAMES], PUBLISHED["bbox"], rtol=0, atol=1e-12)
    assert obj["per_class"]["person"]["category_id"] == 1


# ------------------------------------------------------------------------------------------- NMS


def random_decoded(rng, b, n, nc, levels=8):
    """Integer boxes (exact in float32, so JAX and NumPy see identical IoUs) and scores on a
    coarse grid, so that equal scores (ties) are common."""
    cxy = rng.integers(0, 120, (b, n, 2))
    wh = 2 * rng.integers(2, 30, (b, n, 2))
    obj = rng.integers(0, levels + 1, (b, n, 1)) / levels
    cls = rng.integers(0, levels + 1, (b, n, nc)) / levels
    return np.concatenate([cxy, wh, obj, cls], -1).astype(np.float32)


# Two static configurations only: each costs a compilation. Both use nc = 3 and one input shape;
# multi_label=False is the same code path as nc = 1.
MULTI = {"max_det": 300, "multi_label": True, "block_size": 16, "max_candidates": 60}  # blocks + pre-limit
SINGLE = {"max_det": 5, "multi_label": False, "block_size": 512}  # best class only, max_det truncation
SHAPE = (4, 120, 8)


@pytest.mark.parametrize("static", [MULTI, SINGLE], ids=["multi_label", "single_label"])
def test_nms_equals_numpy_greedy(static):
    rng = np.random.default_rng(static["max_det"])
    for trial in range(4):
        x = random_decoded(rng, *SHAPE[:2], SHAPE[2] - 5)
        x[1, :, 4] = 0.0  # no objectness anywhere: empty image
        x[2, :, 5:] = 0.05  # every score <= conf: all below threshold
        conf, iou = (0.1, 0.65) if trial % 2 else (0.3, 0.3 + 0.1 * trial)
        got = split_detections(nms(x, conf_thres=conf, iou_thres=iou, **static))
        ref = nms_numpy(x, conf_thres=conf, iou_thres=iou, **{k: v for k, v in static.items() if k != "block_size"})
        for i, (g, r) in enumerate(zip(got, ref)):
            for a, b in zip(g, r):
                np.testing.assert_array_equal(a, b, err_msg=f"trial {trial}, image {i}")
        assert len(got[1][0]) == len(got[2][0]) == 0
        assert max(len(g[0]) for g in got) > 0


def test_nms_short_candidate_list_equals_the_full_sort(monkeypatch):
    # with at most SHORT_LIST valid candidates in every image, the candidates are sorted by a
    # shorter top-k; the result must not change. A list of 24 makes both branches reachable on
    # small inputs: conf 0.9 leaves a few candidates per image, conf 0.1 leaves many.
    monkeypatch.setattr(E, "SHORT_LIST", 24)
    static = {"max_det": 299, "multi_label": True, "block_size": 16}  # its own compilation
    rng = np.random.default_rng(5)
    x = random_decoded(rng, *SHAPE[:2], SHAPE[2] - 5)
    x[0, :3, 4:] = 1.0  # image 0: 3 boxes x 3 classes certain, so the short list is never empty
    for conf in (0.9, 0.1):
        n_valid = ((x[..., 4:5] > conf) & (x[..., 5:] * x[..., 4:5] > conf)).sum((1, 2)).max()
        assert (n_valid <= 24) == (conf == 0.9)
        got = split_detections(nms(x, conf_thres=conf, iou_thres=0.5, **static))
        ref = nms_numpy(x, conf_thres=conf, iou_thres=0.5, max_det=299)
        for i, (g, r) in enumerate(zip(got, ref)):
            for a, b in zip(g, r):
                np.testing.assert_array_equal(a, b, err_msg=f"conf {conf}, image {i}")


def test_nms_class_aware_padding_and_ties():
    # three identical boxes: classes 0 and 1 survive each other, the second class-0 box is suppressed;
    # a far box with a tied score comes after the earlier row. Padded to SHAPE to reuse a compilation.
    rows = [[50, 50, 20, 20, 1.0, 0.8, 0.0, 0.0], [50, 50, 20, 20, 1.0, 0.0, 0.8, 0.0],
            [51, 50, 20, 20, 1.0, 0.6, 0.0, 0.0], [200, 200, 10, 10, 1.0, 0.8, 0.0, 0.0]]
    x = np.zeros(SHAPE, np.float32)
    x[0, :4] = rows
    dets = nms(x, **MULTI)
    assert dets.count.tolist() == [3, 0, 0, 0] and dets.valid[0, :4].tolist() == [True] * 3 + [False]
    np.testing.assert_array_equal(dets.classes[0, :4], [0, 1, 0, -1])
    np.testing.assert_allclose(dets.boxes[0, :3], [[40, 40, 60, 60], [40, 40, 60, 60], [195, 195, 205, 205]])
    np.testing.assert_allclose(dets.scores[0, :4], [0.8, 0.8, 0.8, 0])
    assert not dets.boxes[0, 3:].any() and not dets.scores[1:].any()


def test_nms_keeps_empty_boxes_apart():
    # Two zero-area boxes at one spot have IoU 0/0: NaN, which suppresses nothing (torchvision's
    # rule); a zero-area box inside a real one has IoU 0. So all four class-0 rows survive, in
    # score order. Padded to SHAPE to reuse a compilation.
    x = np.zeros(SHAPE, np.float32)
    x[0, :4] = [[30, 30, 0, 0, 1.0, 0.9, 0, 0], [30, 30, 0, 0, 1.0, 0.8, 0, 0],
                [30, 30, 10, 10, 1.0, 0.7, 0, 0], [30, 30, 0, 0, 1.0, 0.6, 0, 0]]
    dets = nms(x, conf_thres=0.1, iou_thres=0.5, **{k: v for k, v in MULTI.items()})
    assert dets.count.tolist() == [4, 0, 0, 0]
    np.testing.assert_allclose(dets.scores[0, :4], [0.9, 0.8, 0.7, 0.6])
    ref = nms_numpy(x, conf_thres=0.1, iou_thres=0.5, max_det=300)
    np.testing.assert_array_equal(split_detections(dets)[0][1], ref[0][1])


# --------------------------------------------------------------------------------------- letterbox


def test_scale_boxes_inverts_a_hand_letterbox():
    # A 300x500 (h, w) image letterboxed to 640x640: gain = min(640/300, 640/500) = 1.28, resized to
    # 384x640, pad (w, h) = (0, (640 - 384) / 2 = 128). Box [50, 30, 250, 130] -> x * 1.28 + 0,
    # y * 1.28 + 128 = [64, 166.4, 320, 294.4].
    np.testing.assert_allclose(scale_boxes([[64, 166.4, 320, 294.4]], (640, 640), (300, 500)), [[50, 30, 250, 130]])
    # The rect canvas (docs/reference.md §11) is 416x672 for the same image: gain 1.28, pad (16, 16), so the box
    # sits at [80, 54.4, 336, 182.4]. Inferring the gain from the shapes would give 1.344, so the
    # loader's ratio_pad must be passed.
    boxed = np.array([[[80, 54.4, 336, 182.4]]] * 2)  # any leading shape
    back = scale_boxes(boxed, (416, 672), (300, 500), ratio_pad=((1.28, 1.28), (16, 16)))
    np.testing.assert_allclose(back, [[[50, 30, 250, 130]]] * 2)
    assert not np.allclose(scale_boxes(boxed, (416, 672), (300, 500)), back)
    assert boxed[0, 0, 0] == 80  # input untouched
    # clipped to the original image
    np.testing.assert_allclose(scale_boxes([[-10, 100, 700, 700]], (640, 640), (300, 500)), [[0, 0, 500, 300]])


# ------------------------------------------------------------------------------------------- VOC


def voc_case():
    """Class 0: 3 ground truths (A: a1, a2; B: b1), 4 detections by score:
      d1 .9 on a1 -> TP;  d2 .8 on a1 again -> FP (duplicate);  d3 .7 on b1 -> TP;  d4 .6 nowhere -> FP.
    cumulative TP 1 1 2 2, FP 0 1 1 2 -> recall 1/3 1/3 2/3 2/3, precision 1 1/2 2/3 1/2.
    All-point: envelope 1 up to recall 1/3, 2/3 up to 2/3, then 0 -> 1/3 * 1 + 1/3 * 2/3 = 5/9.
    11-point: recall >= 0, .1, .2, .3 -> 1 (4 points); >= .4, .5, .6 -> 2/3 (3 points); .7 .. 1 -> 0
    -> (4 + 2) / 11 = 6/11.
    Class 1: one ground truth (plus a difficult one it would hit), no detections -> AP 0.
    Class 2: a detection but no ground truth -> NaN, left out of the mean."""
    a1, a2, b1 = [10, 10, 50, 50], [60, 60, 90, 90], [0, 0, 30, 30]
    dets = [
        (np.array([[11, 10, 50, 50], [10, 12, 50, 49], [0, 60, 9, 70], [20, 20, 40, 40]]),
         np.array([0.9, 0.8, 0.6, 0.5]), np.array([0, 0, 0, 2])),
        (np.array([[1, 1, 30, 30]]), np.array([0.7]), np.array([0])),
    ]
    gts = [
        (np.array([a1, a2, [0, 0, 5, 5]]), np.array([0, 0, 1])),
        (np.array([b1, [70, 70, 99, 99]]), np.array([0, 1]), np.array([False, True])),
    ]
    return dets, gts


def test_voc_map_hand_case():
    dets, gts = voc_case()
    res = voc_map(dets, gts, 3)
    assert res["n_gt"].tolist() == [3, 1, 0]
    np.testing.assert_allclose(res["AP50"][:2], [5 / 9, 0.0])
    np.testing.assert_allclose(res["AP50_11pt"][:2], [6 / 11, 0.0])
    assert math.isnan(res["AP50"][2]) and math.isnan(res["AP50_11pt"][2])
    assert math.isclose(res["mAP50"], 5 / 18) and math.isclose(res["mAP50_11pt"], 3 / 11)


def test_voc_difficult_hit_counts_as_neither():
    gts = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0, 0]), np.array([True, False]))]
    dets = [(np.array([[0, 0, 10, 10], [50, 50, 60, 60]]), np.array([0.9, 0.8]), np.array([0, 0]))]
    assert voc_map(dets, gts, 1)["AP50"][0] == 1.0  # the difficult hit is no false positive


def _voc_loop(detections, ground_truths, num_classes, iou_thres=0.5):
    """Per class, detections of every image pooled and visited in descending score (stable); each
    takes its image's best same-class ground truth (continuous-pixel IoU); written independently
    of voc_map's per-image vectorised matching. Returns per-class all-point AP."""
    ap = []
    for c in range(num_classes):
        dets = [(s, i, b) for i, (bx, sc, cl) in enumerate(detections) for b, s, k in zip(bx, sc, cl) if k == c]
        dets.sort(key=lambda t: -t[0])
        gt = [[(b, bool(d)) for b, k, d in zip(g[0], g[1], g[2]) if k == c] for g in ground_truths]
        n_gt = sum(not d for g in gt for _, d in g)
        taken = [[False] * len(g) for g in gt]
        tp, fp = [], []
        for _, i, b in dets:
            ious = []
            for g, _ in gt[i]:
                iw = max(min(b[2], g[2]) - max(b[0], g[0]), 0)
                ih = max(min(b[3], g[3]) - max(b[1], g[1]), 0)
                u = (b[2] - b[0]) * (b[3] - b[1]) + (g[2] - g[0]) * (g[3] - g[1]) - iw * ih
                ious.append(iw * ih / u)
            j = int(np.argmax(ious)) if ious else -1
            if j < 0 or not ious[j] > iou_thres:
                tp.append(0), fp.append(1)
            elif gt[i][j][1]:
                continue
            elif not taken[i][j]:
                taken[i][j] = True
                tp.append(1), fp.append(0)
            else:
                tp.append(0), fp.append(1)
        if n_gt == 0:
            ap.append(math.nan)
            continue
        tp, fp = np.cumsum(tp), np.cumsum(fp)
        rec, prec = tp / n_gt, tp / np.maximum(tp + fp, 1e-12)
        r = np.concatenate([[0.0], rec, [1.0]])
        p = np.concatenate([[0.0], prec, [0.0]])
        p = np.maximum.accumulate(p[::-1])[::-1]
        k = np.nonzero(r[1:] != r[:-1])[0]
        ap.append(float(np.sum((r[k + 1] - r[k]) * p[k + 1])))
    return np.array(ap)


def test_voc_map_equals_a_pooled_loop_on_random_scenes():
    rng = np.random.default_rng(11)
    dets, gts = [], []
    for _ in range(30):
        m = int(rng.integers(0, 6))
        g = rng.integers(0, 80, (m, 2)).astype(float)
        g = np.concatenate([g, g + rng.integers(8, 40, (m, 2))], 1)
        gc, gd = rng.integers(0, 3, m), rng.random(m) < 0.2
        n = int(rng.integers(0, 12))
        src = rng.integers(0, max(m, 1), n)  # detections near a ground truth (duplicates) or anywhere
        b = g[src] + rng.normal(0, 4, (n, 4)) if m else rng.integers(0, 80, (n, 4)).astype(float)
        b[:, 2:] = np.maximum(b[:, 2:], b[:, :2] + 1)
        dets.append((b, rng.integers(1, 6, n) / 5, np.where(rng.random(n) < 0.8, gc[src] if m else 0, rng.integers(0, 3, n))))
        gts.append((g.reshape(-1, 4), gc, gd))
    got = voc_map(dets, gts, 3)["AP50"]
    np.testing.assert_allclose(got, _voc_loop(dets, gts, 3), rtol=0, atol=1e-12)
    assert np.all(np.isfinite(got)) and 0 < got.min() < got.max() < 1  # a case with hits and misses


# ------------------------------------------------------------------------------------ end to end


class TinyDataset(DetectionDataset):
    names, category_ids, image_ids = ("cat", "dog"), (3, 8), (10, 11)
    _labels: ClassVar = {0: ([[10, 10, 50, 40], [60, 5, 90, 30]], [0, 1]), 1: ([[20, 30, 70, 90]], [0])}

    def labels(self, i):
        b, c = self._labels[i]
        return np.array(b, np.float32), np.array(c, np.int32)

    def image_size(self, i):
        return 100, 120


def test_evaluate_predictions_perfect_boxes():
    ds = TinyDataset()
    preds = [(b, np.full(len(c), 0.9), c) for b, c in (ds.labels(i) for i in range(len(ds)))]
    preds[1] = (np.vstack([preds[1][0], [[0, 0, 5, 5]]]), np.array([0.9, 0.1]), np.array([0, 1]))  # low-score FP
    res = evaluate_predictions(preds, ds)
    assert res["coco"]["AP"] == 1.0 and res["voc"]["mAP50"] == 1.0
    assert [(r["class"], r["category_id"], r["n_gt"], r["voc_AP50"]) for r in res["per_class"]] == \
        [("cat", 3, 2, 1.0), ("dog", 8, 1, 1.0)]
    np.testing.assert_allclose([r["AP"] for r in res["per_class"]], 1.0)
    with pytest.raises(JaxyoloError, match="1 predictions for 2 images"):
        evaluate_predictions(preds[:1], ds)


@pytest.mark.parametrize("engine", COCO_ENGINES)
def test_in_memory_scoring_equals_the_results_file(engine, tmp_path):
    """`evaluate_predictions` builds its result set without the JSON form; the same predictions
    written by `detections_to_coco` and scored from the file by `coco_evaluate` give every stat."""
    from jaxyolo.evaluate import _coco_evaluate_predictions

    ds = TinyDataset()
    rng = np.random.default_rng(0)
    preds = []
    for i in range(len(ds)):
        gt, _ = ds.labels(i)
        n = 40  # jittered copies of the ground truth and random boxes, some scores tied after rounding
        base = np.concatenate([gt, rng.uniform(0, 60, (n - len(gt), 2)).repeat(2, 1) + [0, 0, 20, 25]])
        boxes = base + rng.normal(0, 3, base.shape)
        boxes[:, 2:] = np.maximum(boxes[:, 2:], boxes[:, :2] + 1)
        preds.append((boxes, rng.uniform(0, 1, n).round(6), rng.integers(0, 2, n)))
    path = tmp_path / "results.json"
    path.write_text(json.dumps(detections_to_coco(*([p[j] for p in preds] for j in range(3)), ds.image_ids,
                                                  ds.category_ids)))
    from_file = coco_evaluate(ds.coco_ground_truth(), path, engine=engine)
    in_memory = _coco_evaluate_predictions(ds.coco_ground_truth(), preds, ds.image_ids, ds.category_ids, engine=engine)
    assert 0 < from_file["AP"] < 1
    assert {k: in_memory[k] for k in STAT_NAMES} == {k: from_file[k] for k in STAT_NAMES}
    np.testing.assert_array_equal(in_memory["precision"], from_file["precision"])
