"""Anchors fitted to a dataset: best possible recall, k-means and a genetic refinement.

A ground-truth box can be assigned to an anchor when neither side ratio exceeds `anchor_t` (the
loss's shape test, `jaxyolo.loss.yolo_loss`). For a set of anchors:

* `ratio_fit(wh, anchors)` is, per box, the best anchor's worst side ratio min(r, 1/r) in (0, 1];
* the best possible recall (BPR) is the fraction of boxes whose best fit beats 1 / anchor_t: the
  share of the training boxes the loss can assign at all;
* the fitness of a set is the mean best fit over the boxes that pass, 0 for the rest.

`fit_anchors` clusters the boxes' (w, h) with k-means (scipy) on whitened sizes, then mutates the
anchors for a few hundred generations keeping a mutation only when the fitness rises, as
yolov5's autoanchor does. `check_anchors` decides: the model's anchors stay unless their BPR is
below `min_bpr` and the fitted set does better.

Sizes are in pixels of the network input: each image's boxes scaled by img_size / its long side,
as the letterbox does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

log = logging.getLogger("jaxyolo.anchors")
MIN_BPR = 0.98


def label_sizes(dataset, img_size: int, *, min_side: float = 2.0) -> np.ndarray:
    """(N, 2) widths and heights of every training box at `img_size`, boxes under `min_side`
    pixels left out (they fit no anchor and would pull the clusters)."""
    out = []
    for i in range(len(dataset)):
        boxes, _ = dataset.labels(i)
        if len(boxes) == 0:
            continue
        h, w = dataset.image_size(i)
        wh = (np.asarray(boxes, np.float64)[:, 2:4] - np.asarray(boxes, np.float64)[:, 0:2]) * (img_size / max(h, w))
        out.append(wh)
    wh = np.concatenate(out) if out else np.zeros((0, 2))
    return wh[(wh >= min_side).all(1)]


def ratio_fit(wh: np.ndarray, anchors: np.ndarray) -> np.ndarray:
    """Per box, the best anchor's worst side ratio min(r, 1/r), in (0, 1]."""
    r = wh[:, None, :] / anchors[None, :, :]
    worst = np.minimum(r, 1 / r).min(2)
    return worst.max(1)


def bpr(wh: np.ndarray, anchors, anchor_t: float) -> float:
    """Best possible recall: the share of boxes some anchor can take."""
    if len(wh) == 0:
        return 1.0
    return float((ratio_fit(wh, _flat(anchors)) > 1 / anchor_t).mean())


def _fitness(wh: np.ndarray, anchors: np.ndarray, anchor_t: float) -> float:
    best = ratio_fit(wh, anchors)
    return float((best * (best > 1 / anchor_t)).mean())


def _flat(anchors) -> np.ndarray:
    return np.asarray(anchors, np.float64).reshape(-1, 2)


def fit_anchors(wh: np.ndarray, n: int, anchor_t: float, *, generations: int = 300, seed: int = 0) -> np.ndarray:
    """`n` anchors (n, 2) for the sizes `wh`, sorted by area: k-means, then genetic refinement."""
    from scipy.cluster.vq import kmeans

    if len(wh) < n:
        raise ValueError(f"fit_anchors: {len(wh)} boxes for {n} anchors")
    rng = np.random.default_rng(seed)
    std = wh.std(0)
    std[std == 0] = 1.0
    centres, _ = kmeans(wh / std, n, iter=30, seed=seed)
    k = centres * std
    if len(k) < n:  # k-means can merge clusters on tiny or repetitive data: fill from the boxes
        k = np.concatenate([k, wh[rng.choice(len(wh), n - len(k), replace=False)]])
    best = _fitness(wh, k, anchor_t)
    for _ in range(generations):
        v = np.ones_like(k)
        while (v == 1).all():  # mutate until something changes
            v = ((rng.random(k.shape) < 0.9) * rng.random() * rng.standard_normal(k.shape) * 0.1 + 1).clip(0.3, 3.0)
        cand = (k * v).clip(2.0)
        f = _fitness(wh, cand, anchor_t)
        if f > best:
            best, k = f, cand
    return k[np.argsort(k.prod(1))]


def check_anchors(dataset, anchors: Sequence, img_size: int, anchor_t: float, *, min_bpr: float = MIN_BPR,
                  seed: int = 0) -> tuple[list | None, dict]:
    """Refitted anchors (per level, [w1, h1, ...] rows as model tables give them) when `anchors`
    cover `dataset` at `img_size` worse than `min_bpr` and the fit does better, else None; and a
    report {boxes, bpr, new_bpr (None when no fit was tried), refitted}."""
    wh = label_sizes(dataset, img_size)
    levels = [np.asarray(lvl, np.float64).reshape(-1, 2) for lvl in anchors]
    na = sum(len(lvl) for lvl in levels)
    old = bpr(wh, np.concatenate(levels), anchor_t)
    report = {"boxes": int(len(wh)), "bpr": old, "new_bpr": None, "refitted": False}
    log.info("anchors: best possible recall %.4f over %d boxes at %d px", old, len(wh), img_size)
    if old >= min_bpr or len(wh) < na:
        return None, report
    k = fit_anchors(wh, na, anchor_t, seed=seed)
    new = bpr(wh, k, anchor_t)
    report["new_bpr"] = new
    if new <= old:
        log.info("anchors: the fitted set (BPR %.4f) is no better; keeping the model's", new)
        return None, report
    per = len(levels[0])
    rows = [[round(float(v), 1) for v in k[i * per:(i + 1) * per].ravel()] for i in range(len(levels))]
    log.info("anchors: refitted to the data, best possible recall %.4f -> %.4f: %s", old, new, rows)
    report["refitted"] = True
    return rows, report
