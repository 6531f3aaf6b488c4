"""Post-processing and evaluation: NMS, letterbox inverse, COCO json, COCO and VOC metrics (docs/reference.md §11).

The pieces follow the reference's `test.py` so that a number measured here means what the paper's
numbers mean: confidence 0.001, multi-label class-aware NMS at IoU 0.65 keeping 300 boxes per image,
boxes mapped back to the original image and clipped, json rounded to 3 / 5 decimals, AP from
cocoapi's algorithm: faster-coco-eval's C++ port by default (3-4x faster on a few hundred images,
the same 12 stats and precision array; tests/test_evaluate.py checks both against cocoapi's
published numbers), pycocotools itself with `engine="pycocotools"`. `nms` runs on device with fixed shapes; everything after it runs on the host in NumPy.

Conventions: boxes are xyxy pixels; class ids are 0..nc-1; COCO category ids appear only in the
json (`category_ids[c]`). A per-class number that is undefined (no ground truth of that class) is
NaN; the 12 COCO stats keep cocoapi's own -1 for an undefined entry so that they equal cocoapi.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import gc
import io
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo.errors import JaxyoloError
from jaxyolo.predictions import Predictions, from_tensor

MAX_WH = 4096  # class offset of class-aware NMS (reference `max_wh`): no two classes' boxes overlap
STAT_NAMES = ("AP", "AP50", "AP75", "APs", "APm", "APl", "AR1", "AR10", "AR100", "ARs", "ARm", "ARl")


class EvaluationError(JaxyoloError, ValueError):
    """A ground-truth or detections file (or object) is malformed or does not fit the other."""


@contextlib.contextmanager
def _no_cyclic_gc():
    """Pause the cyclic garbage collector while scoring builds tens of thousands of small, acyclic
    dicts: their allocations set off collections that traverse the whole heap (a trainer's model
    and compiled programs), which took 0.15 s of a 0.35 s scoring of 200 images."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


# --------------------------------------------------------------------------------------------- NMS


class Detections(NamedTuple):
    """Padded per-image detections; rows at and past `count[b]` are padding (zeros, class -1)."""

    boxes: jax.Array  # (B, max_det, 4) xyxy in network-input pixels
    scores: jax.Array  # (B, max_det) the kept class score
    classes: jax.Array  # (B, max_det) int32
    count: jax.Array  # (B,) int32

    @property
    def valid(self) -> jax.Array:
        """(B, max_det) bool mask of real rows."""
        return jnp.arange(self.scores.shape[-1])[None, :] < self.count[:, None]


def _suppresses(a, b, iou_thres):
    """(n, m) float32: 1.0 where IoU(a_i, b_j) > iou_thres, else 0.0. Two empty boxes have IoU NaN,
    which suppresses nothing, as in torchvision.

    Float 0/1 rather than bool on purpose: the greedy passes consume it in matrix-vector products,
    and on the CPU a boolean (n, m) result does not vectorise (4M pairs: 46 ms as bool from
    stacked corners, 6 ms as float from split coordinates)."""
    ax1, ay1, ax2, ay2 = (a[:, i] for i in range(4))
    bx1, by1, bx2, by2 = (b[:, i] for i in range(4))
    iw = jnp.maximum(jnp.minimum(ax2[:, None], bx2[None]) - jnp.maximum(ax1[:, None], bx1[None]), 0.0)
    ih = jnp.maximum(jnp.minimum(ay2[:, None], by2[None]) - jnp.maximum(ay1[:, None], by1[None]), 0.0)
    inter = iw * ih
    union = ((ax2 - ax1) * (ay2 - ay1))[:, None] + ((bx2 - bx1) * (by2 - by1))[None] - inter
    return jnp.where(inter / union > iou_thres, 1.0, 0.0)


def _greedy_in_block(alive, suppresses):
    """Exact greedy NMS inside one score-sorted block, as a fixed-point iteration.

    keep[j] = alive[j] and no kept i < j suppresses j (`suppresses[i, j]` is 1.0, zero on and
    below the diagonal). That recursion has exactly one solution (the greedy one), and iterating
    it from keep = alive fixes one more leading box per step, so the loop stops on the greedy
    answer, usually after a handful of steps instead of one per box. Each step is one
    vector-matrix product over float 0/1 values.
    """
    alive = jnp.where(alive, 1.0, 0.0)

    def step(state):
        keep, _ = state
        new = jnp.where(keep @ suppresses > 0, 0.0, alive)
        return new, jnp.any(new != keep)

    keep, _ = jax.lax.while_loop(lambda s: s[1], step, (alive, jnp.array(True)))
    return keep > 0


def _greedy_nms(boxes, valid, iou_thres, max_det: int, block: int):
    """Greedy NMS of one image's candidates, sorted by descending score with the valid ones first.

    Returns (indices of kept candidates padded with -1, count). A candidate's fate depends only on
    the kept boxes before it, and at most `max_det` are kept, so each block is checked against a
    (max_det, 4) buffer of kept boxes plus itself: memory O(block * (block + max_det)) instead of
    O(K^2), and the loop ends as soon as max_det boxes are kept or the valid candidates run out.
    """
    k = boxes.shape[0]
    nblk = -(-k // block)
    pad = nblk * block - k
    boxes = jnp.pad(boxes, ((0, pad), (0, 0)))
    valid = jnp.pad(valid, (0, pad))
    n_valid = jnp.sum(valid)
    later = jnp.triu(jnp.ones((block, block), bool), k=1)  # later[i, j]: i comes before j

    def cond(state):
        blk, count, _, _ = state
        return (blk < nblk) & (blk * block < n_valid) & (count < max_det)

    def body(state):
        blk, count, kept_idx, kept_boxes = state
        start = blk * block
        bb = jax.lax.dynamic_slice_in_dim(boxes, start, block)
        bv = jax.lax.dynamic_slice_in_dim(valid, start, block)
        used = jnp.where(jnp.arange(max_det) < count, 1.0, 0.0)
        hit_prev = _suppresses(bb, kept_boxes, iou_thres) @ used > 0
        keep = _greedy_in_block(bv & ~hit_prev, jnp.where(later, _suppresses(bb, bb, iou_thres), 0.0))
        pos = jnp.where(keep, count + jnp.cumsum(keep) - 1, max_det)  # out of range -> dropped
        kept_idx = kept_idx.at[pos].set(start + jnp.arange(block, dtype=jnp.int32), mode="drop")
        kept_boxes = kept_boxes.at[pos].set(bb, mode="drop")
        count = jnp.minimum(count + jnp.sum(keep, dtype=jnp.int32), max_det)
        return blk + 1, count, kept_idx, kept_boxes

    init = (jnp.int32(0), jnp.int32(0), jnp.full((max_det,), -1, jnp.int32), jnp.zeros((max_det, 4), boxes.dtype))
    _, count, kept_idx, _ = jax.lax.while_loop(cond, body, init)
    return kept_idx, count


# The candidates are sorted by a top-k as long as the whole candidate list (16 x 5040 at 128 px with
# 5 classes: 13 ms of a 17 ms NMS on the CPU). When no image of the batch has more valid
# candidates than this, a top-k of this many (5 ms there), padded with invalid rows, gives the same
# sorted list. (A trained yolov4n there has 1,100-1,600 in the fullest image of a batch.)
SHORT_LIST = 2048


def _sorted(s, k: int):
    """(scores, indices) of the k best entries of each row of s (B, M), best first; ties keep the
    lower index first. Invalid entries are -inf."""
    short = min(SHORT_LIST, k)
    if short == k:
        return jax.lax.top_k(s, k)

    def few():
        top_s, top_i = jax.lax.top_k(s, short)
        return (jnp.pad(top_s, ((0, 0), (0, k - short)), constant_values=-jnp.inf),
                jnp.pad(top_i, ((0, 0), (0, k - short))))

    n_valid = jnp.max(jnp.sum(s > -jnp.inf, axis=1))
    return jax.lax.cond(n_valid <= short, few, lambda: tuple(jax.lax.top_k(s, k)))


def _candidates(scores, conf_thres, multi_label: bool, k: int):
    """Per-class scores (B, N, nc) -> the best k candidates: score (invalid -> -inf), box index and
    class, sorted.

    Multi-label pairs are laid out box-major (torch `nonzero` order) and top_k puts the lower index
    first among equal scores, so ties keep the reference's candidate order.
    """
    b, n, nc = scores.shape
    if multi_label and nc > 1:
        top_s, top_i = _sorted(jnp.where(scores > conf_thres, scores, -jnp.inf).reshape(b, n * nc), k)
        return top_s, top_i // nc, (top_i % nc).astype(jnp.int32)
    best = jnp.max(scores, axis=-1)
    cls = jnp.argmax(scores, axis=-1).astype(jnp.int32)
    top_s, top_i = _sorted(jnp.where(best > conf_thres, best, -jnp.inf), k)
    return top_s, top_i, jnp.take_along_axis(cls, top_i, axis=1)


def nms(
    predictions,
    *,
    layout: str = "xywh-obj-cls",
    conf_thres: float = 0.001,
    iou_thres: float = 0.65,
    max_det: int = 300,
    multi_label: bool = True,
    max_candidates: int = 30000,
    block_size: int = 128,
) -> Detections:
    """Batched class-aware NMS, the reference's non_max_suppression, of a family's `Predictions`
    (boxes xyxy, per-class scores) or of a published tensor in `layout` (`jaxyolo.predictions`;
    the default is the YOLO eval output (B, N, 5 + nc), score = objectness x class probability).

    With nc > 1 and multi_label every (box, class) pair scoring > conf_thres is a candidate, else
    each box's best class; boxes are offset by class * 4096 px so classes never suppress each other; greedy NMS
    suppresses IoU > iou_thres; at most max_det kept per image, best first.

    Fixed shapes: only the best `max_candidates` candidates per image enter NMS (30000, as the
    later yolov5 `max_nms` pre-limit; the reference itself has none, so results equal it whenever
    an image has fewer candidates). Ties in score keep candidate order (box, then class). The greedy
    pass is exact, in blocks of `block_size` sorted candidates. Measured on a 2-core CPU (13 batches
    of 16 images, 128 px, 5 classes): 0.22 s at 32-128, 0.26 s at 256, 0.42 s at 512 for a trained
    model (570 candidates per image); 0.14-0.17 s at 32-256 and 0.21 s at 512 untrained. At 416 px
    with 80 classes the pre-limit's top-k dominates and the block size does not matter.
    """
    if not isinstance(predictions, Predictions):
        predictions = _from_tensor(predictions, layout)
    # thresholds always go in as traced arguments: jit would compile separately for a left-out default
    return _nms(predictions, jnp.float32(conf_thres), jnp.float32(iou_thres), max_det=max_det, multi_label=multi_label,
                max_candidates=max_candidates, block_size=block_size)


@functools.partial(jax.jit, static_argnames=("layout",))
def _from_tensor(x, layout):
    return from_tensor(x, layout, xp=jnp)


@functools.partial(jax.jit, static_argnames=("max_det", "multi_label", "max_candidates", "block_size"))
def _nms(predictions, conf_thres, iou_thres, *, max_det, multi_label, max_candidates, block_size) -> Detections:
    boxes, scores = (a.astype(jnp.float32) for a in predictions)
    _, n, nc = scores.shape
    k = min(max_candidates, n * nc if multi_label and nc > 1 else n)
    top_s, cand_box_idx, cand_cls = _candidates(scores, conf_thres, multi_label, k)
    cand_boxes = jnp.take_along_axis(boxes, cand_box_idx[..., None], axis=1)
    offset = (cand_cls * MAX_WH).astype(jnp.float32)[..., None]
    kept, count = jax.vmap(_greedy_nms, in_axes=(0, 0, None, None, None))(
        cand_boxes + offset, top_s > -jnp.inf, iou_thres, max_det, min(block_size, k)
    )
    valid = kept >= 0
    safe = jnp.maximum(kept, 0)
    out_boxes = jnp.where(valid[..., None], jnp.take_along_axis(cand_boxes, safe[..., None], axis=1), 0.0)
    out_scores = jnp.where(valid, jnp.take_along_axis(top_s, safe, axis=1), 0.0)
    out_cls = jnp.where(valid, jnp.take_along_axis(cand_cls, safe, axis=1), -1)
    return Detections(out_boxes, out_scores, out_cls, count)


def split_detections(dets: Detections) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Padded `nms` output -> per-image host (boxes, scores, classes) without the padding."""
    boxes, scores, classes, count = (np.asarray(a) for a in dets)
    return [(boxes[i, :c], scores[i, :c], classes[i, :c]) for i, c in enumerate(count.tolist())]


def nms_numpy(
    predictions,
    *,
    layout: str = "xywh-obj-cls",
    conf_thres: float = 0.001,
    iou_thres: float = 0.65,
    max_det: int = 300,
    multi_label: bool = True,
    max_candidates: int | None = None,
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """NumPy reference of `nms`, written independently of the JAX code (the tests and the ONNX
    export's parity gate check against it): per image (boxes xyxy float32, scores float32,
    classes int32). Takes `Predictions` or a tensor in `layout`, as `nms` does.

    Candidates and scores in float32 as `nms` forms them, sorted by score with ties in box-major
    candidate order (`max_candidates` keeps that many); greedy per class, which is class-aware NMS
    (boxes of different classes never suppress each other), with IoU in float64 (two empty boxes:
    NaN, no suppression); then the max_det best kept, ties again in candidate order.
    """
    if not isinstance(predictions, Predictions):
        predictions = from_tensor(np.asarray(predictions, np.float32), layout, xp=np)
    out = []
    for xyxy, scores in zip(np.asarray(predictions.boxes, np.float32), np.asarray(predictions.scores, np.float32)):
        nc = scores.shape[1]
        conf = np.float32(conf_thres)
        if multi_label and nc > 1:
            box, cls = np.nonzero(scores > conf)  # box-major
        else:
            best = np.argmax(scores, axis=1)
            box = np.nonzero(scores[np.arange(len(scores)), best] > conf)[0]
            cls = best[box]
        score = scores[box, cls]
        order = np.argsort(-score, kind="stable")[:max_candidates]
        box, cls, score = box[order], cls[order], score[order]
        kept = []  # positions in the sorted candidate list
        for c in np.unique(cls):
            idx = np.nonzero(cls == c)[0]
            b = xyxy[box[idx]].astype(np.float64)
            alive = np.ones(len(idx), bool)
            n_kept = 0
            for j in range(len(idx)):
                if not alive[j]:
                    continue
                kept.append(idx[j])
                n_kept += 1
                if n_kept == max_det:  # no later box of this class can be among the max_det best
                    break
                rest = np.nonzero(alive[j + 1:])[0] + j + 1
                alive[rest[_iou_matrix_np(b[j:j + 1], b[rest])[0] > iou_thres]] = False
        kept = np.sort(np.asarray(kept, np.int64))[:max_det]  # sorted positions: score order, ties by candidate
        out.append((xyxy[box[kept]].reshape(-1, 4), score[kept].astype(np.float32), cls[kept].astype(np.int32)))
    return out


# ------------------------------------------------------------------------------------ coordinates


def scale_boxes(boxes, from_shape, to_shape, ratio_pad=None) -> np.ndarray:
    """xyxy boxes on a letterboxed canvas of `from_shape` (h, w) -> pixels of the original image
    of `to_shape` (h0, w0), clipped to it; the reference's scale_coords.

    Without `ratio_pad` the gain and centred padding are inferred from the two shapes, which is
    only right for a plain letterbox. Rect batches pad more than that (docs/reference.md §11: half a stride
    on each side), so evaluation passes the loader's ((gain_h, gain_w), (pad_w, pad_h)); as in
    the reference only gain_h is used.
    """
    b = np.array(boxes, dtype=np.float64)  # a copy: the caller's array is left alone
    if ratio_pad is None:
        gain = min(from_shape[0] / to_shape[0], from_shape[1] / to_shape[1])
        pad = ((from_shape[1] - to_shape[1] * gain) / 2, (from_shape[0] - to_shape[0] * gain) / 2)
    else:
        gain, pad = ratio_pad[0][0], ratio_pad[1]
    b[..., [0, 2]] -= pad[0]
    b[..., [1, 3]] -= pad[1]
    b[..., :4] /= gain
    b[..., [0, 2]] = b[..., [0, 2]].clip(0, to_shape[1])
    b[..., [1, 3]] = b[..., [1, 3]].clip(0, to_shape[0])
    return b


def _result_columns(boxes, scores, classes, image_ids, category_ids, caller: str):
    """Per-image xyxy detections -> flat lists (image ids, category ids, [x, y, w, h] rounded to
    3 decimals, scores rounded to 5), as the reference writes its results json."""
    if not len(boxes) == len(scores) == len(classes) == len(image_ids):
        raise EvaluationError(
            f"{caller}: {len(boxes)} box arrays, {len(scores)} score arrays, "
            f"{len(classes)} class arrays and {len(image_ids)} image ids; need one of each per image"
        )
    boxes = [np.asarray(b, np.float64).reshape(-1, 4) for b in boxes]
    classes = [np.asarray(c).reshape(-1).astype(np.int64) for c in classes]
    for c, image_id in zip(classes, image_ids):
        if c.size and not (0 <= c.min() and c.max() < len(category_ids)):
            raise EvaluationError(f"{caller}: image {image_id} has class {c.max()} or {c.min()}, "
                                  f"outside 0..{len(category_ids) - 1} (the category_ids given)")
    n = [len(b) for b in boxes]
    if not sum(n):
        return [], [], [], []
    b = np.concatenate(boxes)
    xywh = np.round(np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], 1), 3)
    score = np.round(np.concatenate([np.asarray(s, np.float64).reshape(-1) for s in scores]), 5)
    ids = np.repeat(np.asarray(image_ids, np.int64), n)
    cats = np.asarray(category_ids, np.int64)[np.concatenate(classes)]
    return ids.tolist(), cats.tolist(), xywh.tolist(), score.tolist()


def detections_to_coco(boxes, scores, classes, image_ids, category_ids) -> list[dict]:
    """Per-image xyxy detections (original pixels) -> COCO results json list.

    bbox is [x_min, y_min, w, h] rounded to 3 decimals and score to 5, as the reference writes it;
    `category_ids[c]` maps class index c to the COCO id (e.g. 80 -> 91-id COCO).
    """
    cols = _result_columns(boxes, scores, classes, image_ids, category_ids, "detections_to_coco")
    return [{"image_id": i, "category_id": c, "bbox": b, "score": sc} for i, c, b, sc in zip(*cols)]


# ------------------------------------------------------------------------------------------ COCO


def _load_json(src, what: str) -> tuple[Any, str]:
    """(parsed object, name for messages) from a path or an already-parsed object."""
    if isinstance(src, (str, os.PathLike)):
        path = Path(src)
        try:
            text = path.read_text()
        except OSError as e:
            raise EvaluationError(f"{path}: cannot read the {what} file: {e.strerror or e}") from None
        try:
            return json.loads(text), str(path)
        except json.JSONDecodeError as e:
            raise EvaluationError(f"{path}: not valid JSON ({e.msg} at line {e.lineno} column {e.colno})") from None
    return src, f"<{what}>"


def _require(items, key: str, fields: Sequence[str], name: str) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise EvaluationError(f"{name}: {key}[{i}] is a {type(item).__name__}, not an object")
        missing = [f for f in fields if f not in item]
        if missing:
            raise EvaluationError(f"{name}: {key}[{i}] has no {', '.join(repr(f) for f in missing)}")


def _check_ground_truth(gt, name: str) -> None:
    if not isinstance(gt, dict):
        raise EvaluationError(f"{name}: ground truth must be a JSON object, got a {type(gt).__name__}")
    for key in ("images", "annotations", "categories"):
        if not isinstance(gt.get(key), list):
            raise EvaluationError(f"{name}: ground truth needs a list {key!r}" + ("" if key in gt else " (missing)"))
    _require(gt["images"], "images", ("id",), name)
    _require(gt["categories"], "categories", ("id",), name)
    _require(gt["annotations"], "annotations", ("id", "image_id", "category_id", "bbox", "area"), name)
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, a in enumerate(gt["annotations"]):
        if a["image_id"] not in image_ids:
            raise EvaluationError(f"{name}: annotations[{i}] has image_id {a['image_id']} not in 'images'")
        if a["category_id"] not in cat_ids:
            raise EvaluationError(f"{name}: annotations[{i}] has category_id {a['category_id']} not in 'categories'")


def _check_detections(dets, name: str, gt: dict, iou_type: str) -> None:
    if not isinstance(dets, list):
        raise EvaluationError(f"{name}: detections must be a JSON list of objects, got a {type(dets).__name__}")
    geometry = "bbox" if iou_type == "bbox" else "segmentation"
    _require(dets, "detections", ("image_id", "category_id", "score", geometry), name)
    image_ids = {im["id"] for im in gt["images"]}
    cat_ids = {c["id"] for c in gt["categories"]}
    for i, d in enumerate(dets):
        if iou_type == "bbox" and not (isinstance(d["bbox"], list) and len(d["bbox"]) == 4):
            raise EvaluationError(f"{name}: detections[{i}]['bbox'] must be [x, y, w, h], got {d['bbox']!r}")
    unknown = sorted({d["image_id"] for d in dets} - image_ids, key=str)
    if unknown:
        raise EvaluationError(
            f"{name}: {len(unknown)} image id(s) not in the ground truth, e.g. {unknown[:5]}"
        )
    unknown = sorted({d["category_id"] for d in dets} - cat_ids, key=str)
    if unknown:
        raise EvaluationError(f"{name}: category id(s) not in the ground truth: {unknown[:10]}")


COCO_ENGINES = ("faster-coco-eval", "pycocotools")


def _engine(name: str):
    """(COCO, COCOeval) classes of an engine; both implement cocoapi's algorithm."""
    if name == "pycocotools":
        from pycocotools.coco import COCO
        from pycocotools.cocoeval import COCOeval

        return COCO, COCOeval
    if name == "faster-coco-eval":
        from faster_coco_eval import COCO, COCOeval_faster

        return COCO, COCOeval_faster
    raise EvaluationError(f"engine must be one of {COCO_ENGINES}, got {name!r}")


def _coco_objects(gt: dict, dets: list, coco_cls, complete: bool = False):
    """COCO objects for gt and results, built from dicts. cocoapi writes keys into each annotation
    dict (area, id, ignore, segmentation), never into their values: a copy of every dict keeps the
    caller's untouched at a fraction of a deep copy's cost. An empty result list gets an empty
    result set, which loadRes cannot make."""
    coco_gt = coco_cls()
    coco_gt.dataset = {**gt, "annotations": [dict(a) for a in gt["annotations"]]}
    coco_gt.createIndex()
    if dets and not complete:
        return coco_gt, coco_gt.loadRes([dict(d) for d in dets])
    coco_dt = coco_cls()  # `complete` results already carry what loadRes adds (area, id, iscrowd)
    coco_dt.dataset = {"images": list(gt["images"]), "categories": copy.deepcopy(gt["categories"]),
                       "annotations": list(dets) if complete else []}
    coco_dt.createIndex()
    return coco_gt, coco_dt


def _per_class(cocoeval, gt: dict, image_ids) -> dict:
    """AP (IoU .50:.95) and AP50 per category from the accumulated precision array
    [iou, recall, class, area, maxDets], area 'all' and maxDets 100, as summarize() averages it."""
    precision = cocoeval.eval["precision"]
    names = {c["id"]: str(c.get("name", c["id"])) for c in gt["categories"]}
    seen = list(names.values())
    names = {i: n if seen.count(n) == 1 else f"{n} ({i})" for i, n in names.items()}  # keys stay unique
    wanted = set(image_ids)
    n_gt = {}
    for a in gt["annotations"]:
        if a["image_id"] in wanted and not a.get("iscrowd", 0):
            n_gt[a["category_id"]] = n_gt.get(a["category_id"], 0) + 1

    def mean_defined(p):
        p = p[p > -1]
        return float(p.mean()) if p.size else math.nan

    out = {}
    for k, cat_id in enumerate(cocoeval.params.catIds):
        out[names[cat_id]] = {
            "category_id": int(cat_id),
            "n_gt": n_gt.get(cat_id, 0),
            "AP": mean_defined(precision[:, :, k, 0, -1]),
            "AP50": mean_defined(precision[0, :, k, 0, -1]),
        }
    return out


# (AP or AR, IoU, area, maxDets) of each of the 12 stats, in cocoapi's order
_STAT_ROWS = ([(1, "0.50:0.95", "all", 100), (1, "0.50", "all", 100), (1, "0.75", "all", 100)]
              + [(1, "0.50:0.95", a, 100) for a in ("small", "medium", "large")]
              + [(0, "0.50:0.95", "all", m) for m in (1, 10, 100)]
              + [(0, "0.50:0.95", a, 100) for a in ("small", "medium", "large")])


def summary_text(stats) -> str:
    """The 12 stats as cocoapi's summarize() prints them (tests compare it with pycocotools')."""
    lines = []
    for (ap, iou, area, max_det), v in zip(_STAT_ROWS, stats):
        title, kind = ("Average Precision", "(AP)") if ap else ("Average Recall", "(AR)")
        lines.append(f" {title:<18} {kind} @[ IoU={iou:<9} | area={area:>6s} | maxDets={max_det:>3d} ] = {v:0.3f}")
    return "\n".join(lines)


def coco_evaluate(gt, dets, *, iou_type: str = "bbox", image_ids=None, engine: str = "faster-coco-eval") -> dict:
    """COCO metrics of detections against ground truth by cocoapi's algorithm (the reference's AP);
    `engine` is "faster-coco-eval" (default) or "pycocotools".

    gt: COCO ground-truth dict or json path; dets: results list or json path. image_ids limits
    the evaluation to those images (default: every ground-truth image). Returns the 12 stats under
    STAT_NAMES, `per_class` {name: {category_id, n_gt, AP, AP50}}, and `summary`, cocoapi's own
    printed table. The engine's printing is captured, never shown.
    """
    coco_cls, eval_cls = _engine(engine)
    if iou_type not in ("bbox", "segm"):
        raise EvaluationError(f"iou_type must be 'bbox' or 'segm', got {iou_type!r}")
    gt, gt_name = _load_json(gt, "ground truth")
    _check_ground_truth(gt, gt_name)
    dets, dets_name = _load_json(dets, "detections")
    _check_detections(dets, dets_name, gt, iou_type)
    all_ids = sorted(im["id"] for im in gt["images"])
    if image_ids is None:
        image_ids = all_ids
    else:
        image_ids = sorted({int(i) for i in image_ids})
        unknown = sorted(set(image_ids) - set(all_ids))
        if unknown:
            raise EvaluationError(f"{gt_name}: image_ids not in the ground truth, e.g. {unknown[:5]}")

    with _no_cyclic_gc():
        with contextlib.redirect_stdout(io.StringIO()):
            coco_gt, coco_dt = _coco_objects(gt, dets, coco_cls)
        return _run_cocoeval(eval_cls, coco_gt, coco_dt, gt, image_ids, iou_type)


def _run_cocoeval(eval_cls, coco_gt, coco_dt, gt: dict, image_ids, iou_type: str = "bbox") -> dict:
    with contextlib.redirect_stdout(io.StringIO()):
        cocoeval = eval_cls(coco_gt, coco_dt, iou_type)
        cocoeval.params.imgIds = image_ids
        cocoeval.evaluate()
        cocoeval.accumulate()
    with contextlib.redirect_stdout(io.StringIO()):
        cocoeval.summarize()
    result = {name: float(v) for name, v in zip(STAT_NAMES, cocoeval.stats)}
    result["per_class"] = _per_class(cocoeval, gt, image_ids)
    result["summary"] = summary_text(cocoeval.stats)
    # (T IoU thresholds, R recall points, K categories in `category_ids` order, A areas, M maxDets)
    result["precision"] = cocoeval.eval["precision"]
    result["category_ids"] = [int(c) for c in cocoeval.params.catIds]
    return result


def _prediction_results(predictions, image_ids, category_ids) -> list[dict]:
    """Per-image (xyxy boxes, scores, classes) -> the annotations of a COCO result set: the values
    `detections_to_coco` writes, completed as loadRes completes them (area, id, iscrowd). Scoring
    in memory skips loadRes' per-annotation pass, its copies and the json checks."""
    cols = _result_columns(*([p[j] for p in predictions] for j in range(3)), image_ids, category_ids,
                           "evaluate_predictions")
    return [{"image_id": i, "category_id": c, "bbox": b, "score": sc, "area": b[2] * b[3], "id": k + 1, "iscrowd": 0}
            for k, (i, c, b, sc) in enumerate(zip(*cols))]


def _coco_evaluate_predictions(gt: dict, predictions, image_ids, category_ids, engine: str = "faster-coco-eval"):
    """`coco_evaluate` of in-memory predictions on a ground truth this library built: the result
    set is made directly from `_prediction_results` (no loadRes pass)."""
    coco_cls, eval_cls = _engine(engine)
    anns = _prediction_results(predictions, image_ids, category_ids)
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt, coco_dt = _coco_objects(gt, anns, coco_cls, complete=True)
    return _run_cocoeval(eval_cls, coco_gt, coco_dt, gt, sorted(int(i) for i in image_ids))


# ------------------------------------------------------------------------------------------- VOC


def _iou_matrix_np(a, b) -> np.ndarray:
    lt = np.maximum(a[:, None, :2], b[None, :, :2])
    rb = np.minimum(a[:, None, 2:], b[None, :, 2:])
    inter = np.prod(np.clip(rb - lt, 0, None), axis=-1)
    area_a = np.prod(a[:, 2:] - a[:, :2], axis=-1)
    area_b = np.prod(b[:, 2:] - b[:, :2], axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        return inter / (area_a[:, None] + area_b[None, :] - inter)


def _match_image(det_boxes, det_scores, det_classes, gt_boxes, gt_classes, difficult, iou_thres):
    """VOC matching inside one image, every class at once: each detection takes the
    best-overlapping ground truth of its class; the first detection by descending score to take
    one with IoU > iou_thres is a true positive, a later one a false positive (duplicate), one with
    a lower best overlap a false positive, and a hit on a difficult one counts as neither.
    Returns (tp, fp) flags in the given detection order."""
    n = len(det_scores)
    if not len(gt_boxes):
        return np.zeros(n), np.ones(n)
    iou = np.where(det_classes[:, None] == gt_classes[None, :], _iou_matrix_np(det_boxes, gt_boxes), -1.0)
    j = np.argmax(iou, axis=1)
    hit = iou[np.arange(n), j] > iou_thres
    claim = hit & ~difficult[j]
    rank = np.empty(n, np.int64)
    rank[np.argsort(-det_scores, kind="stable")] = np.arange(n)
    first = np.full(len(gt_boxes), n, np.int64)  # the best rank among the detections claiming each
    np.minimum.at(first, j[claim], rank[claim])
    tp = claim & (rank == first[j])
    return tp.astype(np.float64), (~hit | (claim & ~tp)).astype(np.float64)


def _ap_all_point(rec, prec) -> float:
    """Area under the precision envelope (VOC2010+)."""
    mrec = np.concatenate([[0.0], rec, [1.0]])
    mpre = np.concatenate([[0.0], prec, [0.0]])
    mpre = np.maximum.accumulate(mpre[::-1])[::-1]
    i = np.nonzero(mrec[1:] != mrec[:-1])[0]
    return float(np.sum((mrec[i + 1] - mrec[i]) * mpre[i + 1]))


def _ap_11_point(rec, prec) -> float:
    """Mean of the best precision at recall >= 0, .1, ..., 1 (VOC2007)."""
    return float(np.mean([prec[rec >= t].max() if np.any(rec >= t) else 0.0 for t in np.arange(11) / 10]))


def voc_map(detections, ground_truths, num_classes: int, *, iou_thres: float = 0.5) -> dict:
    """Pascal VOC AP per class at IoU > iou_thres, all-point and 11-point, and their means.

    detections[i] = (boxes (n, 4) xyxy, scores (n,), classes (n,)) and ground_truths[i] =
    (boxes (m, 4), classes (m,)[, difficult (m,)]) for image i. Boxes are continuous pixel
    coordinates (no VOC devkit "+1"). Classes without ground truth get NaN and are left out of
    the means. Returns mAP50, mAP50_11pt and per-class arrays AP50, AP50_11pt, n_gt.
    """
    if len(detections) != len(ground_truths):
        raise EvaluationError(f"voc_map: {len(detections)} images of detections but {len(ground_truths)} of ground truth")
    scores = [[] for _ in range(num_classes)]
    tps = [[] for _ in range(num_classes)]
    fps = [[] for _ in range(num_classes)]
    n_gt = np.zeros(num_classes, np.int64)
    for det, gt in zip(detections, ground_truths):
        db, ds, dc = (np.asarray(a) for a in det[:3])
        gb, gc = np.asarray(gt[0], np.float64).reshape(-1, 4), np.asarray(gt[1]).reshape(-1)
        gd = np.asarray(gt[2], bool) if len(gt) > 2 else np.zeros(len(gc), bool)
        db, ds, dc = db.reshape(-1, 4).astype(np.float64), ds.reshape(-1).astype(np.float64), dc.reshape(-1)
        n_gt += np.bincount(gc[~gd].astype(np.int64), minlength=num_classes)[:num_classes]
        if not len(ds):
            continue
        tp, fp = _match_image(db, ds, dc, gb, gc, gd, iou_thres)
        for c in np.unique(dc).tolist():
            if not 0 <= c < num_classes:
                continue
            d = dc == c
            scores[c].append(ds[d])
            tps[c].append(tp[d])
            fps[c].append(fp[d])
    ap = np.full(num_classes, np.nan)
    ap11 = np.full(num_classes, np.nan)
    for c in range(num_classes):
        if n_gt[c] == 0:
            continue
        s = np.concatenate(scores[c]) if scores[c] else np.zeros(0)
        order = np.argsort(-s, kind="stable")
        tp = np.cumsum(np.concatenate(tps[c])[order]) if tps[c] else np.zeros(0)
        fp = np.cumsum(np.concatenate(fps[c])[order]) if fps[c] else np.zeros(0)
        rec = tp / n_gt[c]
        prec = tp / np.maximum(tp + fp, np.finfo(np.float64).eps)
        ap[c], ap11[c] = _ap_all_point(rec, prec), _ap_11_point(rec, prec)
    has_gt = n_gt > 0
    return {
        "mAP50": float(ap[has_gt].mean()) if has_gt.any() else math.nan,
        "mAP50_11pt": float(ap11[has_gt].mean()) if has_gt.any() else math.nan,
        "AP50": ap,
        "AP50_11pt": ap11,
        "n_gt": n_gt,
    }


# ------------------------------------------------------------------------------------ everything


def evaluate_predictions(predictions, dataset) -> dict:
    """COCO and VOC metrics of per-image predictions on a DetectionDataset.

    predictions[i] = (boxes xyxy in original-image pixels, scores, classes) for dataset[i].
    Returns {"coco": coco_evaluate(...), "voc": voc_map(...), "per_class": [rows]} where each row
    holds class, category_id, n_gt, AP, AP50 (COCO) and voc_AP50, voc_AP50_11pt.
    """
    if len(predictions) != len(dataset):
        raise EvaluationError(f"evaluate_predictions: {len(predictions)} predictions for {len(dataset)} images")
    with _no_cyclic_gc():
        coco = _coco_evaluate_predictions(dataset.coco_ground_truth(), predictions, dataset.image_ids,
                                          dataset.category_ids)
        voc = voc_map(predictions, [dataset.labels(i) for i in range(len(dataset))], dataset.num_classes)
    by_id = {v["category_id"]: v for v in coco["per_class"].values()}
    table = []
    for c, (name, cat_id) in enumerate(zip(dataset.names, dataset.category_ids)):
        row = by_id[int(cat_id)]
        table.append({
            "class": name, "category_id": int(cat_id), "n_gt": row["n_gt"], "AP": row["AP"], "AP50": row["AP50"],
            "voc_AP50": float(voc["AP50"][c]), "voc_AP50_11pt": float(voc["AP50_11pt"][c]),
        })
    return {"coco": coco, "voc": voc, "per_class": table}
