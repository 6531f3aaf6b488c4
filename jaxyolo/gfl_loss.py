"""Targets, loss and decoding of the gfl family (anchor-free, one point per feature cell).

* **Points**: level l with stride s has a point at the centre of each cell, ((j + ½)s, (i + ½)s).
* **ATSS** (`atss_assign`): each point carries a square anchor of side `octave_base_scale`·s.
  For every ground-truth box, per level the `topk` points nearest its centre are candidates; the
  IoU threshold is the mean plus the standard deviation (unbiased) of the candidates' anchor IoUs;
  a candidate is positive when its IoU reaches the threshold and its point lies inside the box. A
  point positive for several boxes takes the one of highest IoU.
* **Quality focal loss** on the class scores: the target of a positive point's class is the IoU
  of its predicted box with its box (no gradient), 0 elsewhere; BCE(σ, y)·|y − σ|^β, summed over
  every point and class, over the number of positives. With GFLv2's quality branch the score is
  σ(class)·σ(quality), and the loss is taken on that probability.
* **GIoU** and **distribution focal loss** at the positives, each weighted by the point's highest
  class score (no gradient) and divided by those weights' sum. DFL: the target distance (in
  strides, clipped below `reg_max`) y between bins ⌊y⌋ and ⌊y⌋ + 1; the cross-entropy of each, by
  the other's distance to y.

Everything has fixed shapes: targets padded to M boxes with a mask, every point of every image
evaluated, so one compiled step serves any image and, vmapped, a population.
Terms (qfl, box, dfl) are reported per level and summed; the total is multiplied by the batch
size, as the YOLO family's loss is, so the same SGD recipe drives both.
"""

from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo.predictions import Predictions

EPS = 1e-9


def points(shapes: Sequence[tuple[int, int]], strides: Sequence[int]):
    """(N, 2) cell-centre points and (N,) strides of levels of (H, W) cells, level by level."""
    pts, st = [], []
    for (h, w), s in zip(shapes, strides):
        gy, gx = np.meshgrid(np.arange(h, dtype=np.float32), np.arange(w, dtype=np.float32), indexing="ij")
        pts.append((np.stack([gx, gy], -1).reshape(-1, 2) + 0.5) * s)
        st.append(np.full((h * w,), s, np.float32))
    return jnp.asarray(np.concatenate(pts)), jnp.asarray(np.concatenate(st))


def box_iou(a, b):
    """IoU of every box of a (..., M, 4) with every box of b (..., N, 4), xyxy: (..., M, N)."""
    lt = jnp.maximum(a[..., :, None, :2], b[..., None, :, :2])
    rb = jnp.minimum(a[..., :, None, 2:], b[..., None, :, 2:])
    wh = jnp.clip(rb - lt, 0)
    inter = wh[..., 0] * wh[..., 1]
    area_a = jnp.prod(jnp.clip(a[..., 2:] - a[..., :2], 0), -1)
    area_b = jnp.prod(jnp.clip(b[..., 2:] - b[..., :2], 0), -1)
    return inter / (area_a[..., :, None] + area_b[..., None, :] - inter + EPS)


def aligned_iou(a, b, giou: bool = False):
    """IoU (or GIoU) of a[i] with b[i], xyxy boxes (..., 4) -> (...)."""
    wh = jnp.clip(jnp.minimum(a[..., 2:], b[..., 2:]) - jnp.maximum(a[..., :2], b[..., :2]), 0)
    inter = wh[..., 0] * wh[..., 1]
    union = (jnp.prod(jnp.clip(a[..., 2:] - a[..., :2], 0), -1) + jnp.prod(jnp.clip(b[..., 2:] - b[..., :2], 0), -1)
             - inter + EPS)
    iou = inter / union
    if not giou:
        return iou
    hull = jnp.prod(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), -1) + EPS
    return iou - (hull - union) / hull


def atss_regions(pts, strides, sizes: Sequence[int], boxes, mask, *, topk: int, anchor_scale: float):
    """One image's ATSS candidates: (positive (M, N) bool per box and point, anchor IoUs (M, N),
    IoU thresholds (M,), anchors (N, 4)) for N points and M boxes.

    pts (N, 2), strides (N,), `sizes` the points per level (static); boxes (M, 4) xyxy, mask (M,)."""
    half = (anchor_scale * strides / 2)[:, None]
    anchors = jnp.concatenate([pts - half, pts + half], -1)
    centres = (boxes[:, :2] + boxes[:, 2:]) / 2
    dist = jnp.sqrt(jnp.sum(jnp.square(centres[:, None] - pts[None]), -1))  # (M, N)
    cand, off = [], 0
    for n in sizes:
        _, idx = jax.lax.top_k(-dist[:, off:off + n], min(topk, n))
        cand.append(idx + off)
        off += n
    cand = jnp.concatenate(cand, 1)  # (M, K)
    ious = box_iou(boxes, anchors)  # (M, N)
    cand_iou = jnp.take_along_axis(ious, cand, 1)
    k = cand.shape[1]
    mean = cand_iou.mean(1, keepdims=True)
    thr = mean + jnp.sqrt(jnp.sum(jnp.square(cand_iou - mean), 1, keepdims=True) / max(k - 1, 1))
    p = pts[cand]  # (M, K, 2)
    inside = jnp.min(jnp.concatenate([p - boxes[:, None, :2], boxes[:, None, 2:] - p], -1), -1) > 0.01
    ok = (cand_iou >= thr) & inside & mask[:, None]
    pos = jnp.zeros(ious.shape, bool).at[jnp.arange(boxes.shape[0])[:, None], cand].set(ok)
    return pos, ious, thr[:, 0], anchors


def atss_assign(pts, strides, sizes: Sequence[int], boxes, mask, *, topk: int, anchor_scale: float):
    """One image's ATSS assignment: (assigned (N,) bool, box index (N,) int) for N points.

    pts (N, 2), strides (N,), `sizes` the points per level (static); boxes (M, 4) xyxy, mask (M,)."""
    pos, ious, _, _ = atss_regions(pts, strides, sizes, boxes, mask, topk=topk, anchor_scale=anchor_scale)
    return jnp.any(pos, 0), jnp.argmax(jnp.where(pos, ious, -1.0), 0)


def distances(box_logits, bins: int):
    """Expected distance per side (in strides) of (..., 4 * bins) logits -> (..., 4)."""
    prob = jax.nn.softmax(box_logits.reshape(*box_logits.shape[:-1], 4, bins), -1)
    return prob @ jnp.arange(bins, dtype=prob.dtype)


def flat_levels(raw, spec):
    """Raw levels -> (B, N, C) and the static points."""
    b = raw[0].shape[0]
    flat = jnp.concatenate([r.reshape(b, -1, r.shape[-1]).astype(jnp.float32) for r in raw], 1)
    pts, st = points([r.shape[1:3] for r in raw], spec.strides)
    return flat, pts, st


def level_sums(per_point, sizes: Sequence[int]):
    """(N, T) per-point terms -> (levels, T) sums over each level's points."""
    bounds = np.cumsum([0] + list(sizes))
    return jnp.stack([per_point[a:b].sum(0) for a, b in zip(bounds[:-1], bounds[1:])])


def _boxes(pts, st, dist):
    d = dist * st[:, None]
    return jnp.concatenate([pts - d[..., :2], pts + d[..., 2:]], -1)


def decode(raw, spec, dgqp: bool) -> Predictions:
    flat, pts, st = flat_levels(raw, spec)
    nc = spec.nc
    scores = jax.nn.sigmoid(flat[..., :nc])
    if dgqp:
        scores = scores * jax.nn.sigmoid(flat[..., -1:])
    return Predictions(_boxes(pts, st, distances(flat[..., nc:nc + 4 * spec.bins], spec.bins)), scores)


def quality_focal_loss(logits, target, beta):
    """QFL on logits: BCE(σ(x), y)·|y − σ(x)|^β, elementwise."""
    p = jax.nn.sigmoid(logits)
    bce = jnp.maximum(logits, 0) - logits * target + jnp.log1p(jnp.exp(-jnp.abs(logits)))
    return bce * jnp.abs(target - p) ** beta


def quality_focal_loss_prob(p, target, beta):
    """QFL on probabilities (GFLv2's joint score)."""
    p = jnp.clip(p, 1e-6, 1 - 1e-6)
    bce = -(target * jnp.log(p) + (1 - target) * jnp.log1p(-p))
    return bce * jnp.abs(target - p) ** beta


def distribution_focal_loss(box_logits, target, bins: int):
    """DFL per side: box_logits (..., 4 * bins), target distances (..., 4) in [0, bins - 1)."""
    logp = jax.nn.log_softmax(box_logits.reshape(*box_logits.shape[:-1], 4, bins), -1)
    left = jnp.floor(target)
    li = left.astype(jnp.int32)
    lp = jnp.take_along_axis(logp, li[..., None], -1)[..., 0]
    rp = jnp.take_along_axis(logp, jnp.minimum(li + 1, bins - 1)[..., None], -1)[..., 0]
    return -(lp * (left + 1 - target) + rp * (target - left))


def gfl_loss(raw, boxes, classes, mask, hyp, *, spec, dgqp: bool):
    """(total, {"local": (levels, 3), "global": (3,)}) of terms (qfl, box, dfl) after their gains
    `gfl_cls`, `gfl_box`, `gfl_dfl`; QFL's β is `qfl_beta`. Targets padded: boxes (B, M, 4) xyxy
    pixels, classes (B, M), mask (B, M)."""
    flat, pts, st = flat_levels(raw, spec)
    bsz, n, _ = flat.shape
    nc, bins = spec.nc, spec.bins
    sizes = [r.shape[1] * r.shape[2] for r in raw]
    assigned, idx = jax.vmap(lambda b, m: atss_assign(pts, st, sizes, b, m, topk=spec.atss_topk,
                                                      anchor_scale=spec.octave_base_scale))(boxes, mask)
    t_box = jnp.take_along_axis(boxes, idx[..., None], 1)  # (B, N, 4)
    t_cls = jnp.take_along_axis(classes, idx, 1)
    cls_logits, box_logits = flat[..., :nc], flat[..., nc:nc + 4 * bins]
    pred = _boxes(pts, st, distances(box_logits, bins))
    iou = jnp.where(assigned, jax.lax.stop_gradient(aligned_iou(pred, t_box)), 0.0)
    target = jax.nn.one_hot(t_cls, nc) * iou[..., None]
    if dgqp:
        score = jax.nn.sigmoid(cls_logits) * jax.nn.sigmoid(flat[..., -1:])
        qfl = quality_focal_loss_prob(score, target, hyp["qfl_beta"]).sum(-1)
    else:
        score = jax.nn.sigmoid(cls_logits)
        qfl = quality_focal_loss(cls_logits, target, hyp["qfl_beta"]).sum(-1)
    weight = jnp.where(assigned, jax.lax.stop_gradient(score.max(-1)), 0.0)  # (B, N)
    lbox = weight * (1.0 - aligned_iou(pred, t_box, giou=True))
    ltrb = jnp.concatenate([pts - t_box[..., :2], t_box[..., 2:] - pts], -1) / st[:, None]
    ldfl = weight * distribution_focal_loss(box_logits, jnp.clip(ltrb, 0.0, bins - 1 - 0.01), bins).mean(-1)
    n_pos = jnp.maximum(jnp.sum(assigned), 1.0)
    w_sum = jnp.maximum(jnp.sum(weight), EPS)
    per_point = jnp.stack([qfl / n_pos * hyp["gfl_cls"], lbox / w_sum * hyp["gfl_box"],
                           ldfl / w_sum * hyp["gfl_dfl"]], -1).sum(0)  # (N, 3)
    local = level_sums(per_point, sizes)
    glob = local.sum(0)
    return jnp.sum(glob) * bsz, {"local": local, "global": glob}
