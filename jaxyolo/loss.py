"""The YOLO loss of the reference (docs/reference.md §8), with fixed shapes so it jits and vmaps.

Targets are padded per image: `boxes` (B, M, 4) xyxy in pixels of the network input, `classes`
(B, M) int, `mask` (B, M) bool. Every (box, anchor, neighbour-cell) candidate of every level is
evaluated and weighted by its validity instead of being gathered into a ragged list, so the loss
has one compiled shape whatever the number of objects.

Returned terms: the total (already multiplied by the batch size, as the reference does) and the
**local** per-level (box, obj, cls) and **global** (box, obj, cls) terms after gains.
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp

# docs/reference.md §8: the cell itself, then left, up, right, down neighbours (offset g = 0.5)
_OFFSETS = ((0.0, 0.0), (0.5, 0.0), (0.0, 0.5), (-0.5, 0.0), (0.0, -0.5))


def bbox_ciou(b1, b2, eps: float = 1e-9):
    """CIoU of centre-xywh boxes (..., 4); the aspect term's alpha carries no gradient."""
    b1x1, b1x2 = b1[..., 0] - b1[..., 2] / 2, b1[..., 0] + b1[..., 2] / 2
    b1y1, b1y2 = b1[..., 1] - b1[..., 3] / 2, b1[..., 1] + b1[..., 3] / 2
    b2x1, b2x2 = b2[..., 0] - b2[..., 2] / 2, b2[..., 0] + b2[..., 2] / 2
    b2y1, b2y2 = b2[..., 1] - b2[..., 3] / 2, b2[..., 1] + b2[..., 3] / 2
    inter = jnp.clip(jnp.minimum(b1x2, b2x2) - jnp.maximum(b1x1, b2x1), 0) * \
        jnp.clip(jnp.minimum(b1y2, b2y2) - jnp.maximum(b1y1, b2y1), 0)
    w1, h1 = b1x2 - b1x1, b1y2 - b1y1 + eps
    w2, h2 = b2x2 - b2x1, b2y2 - b2y1 + eps
    union = w1 * h1 + w2 * h2 - inter + eps
    iou = inter / union
    cw = jnp.maximum(b1x2, b2x2) - jnp.minimum(b1x1, b2x1)
    ch = jnp.maximum(b1y2, b2y2) - jnp.minimum(b1y1, b2y1)
    c2 = cw**2 + ch**2 + eps
    rho2 = ((b2x1 + b2x2 - b1x1 - b1x2) ** 2 + (b2y1 + b2y2 - b1y1 - b1y2) ** 2) / 4
    v = (4 / math.pi**2) * jnp.square(jnp.arctan(w2 / h2) - jnp.arctan(w1 / h1))
    denom = v - iou + (1 + eps)  # 0 in float32 for identical boxes (v = 0, IoU = 1): alpha is then 0
    alpha = jax.lax.stop_gradient(jnp.where(denom > 0, v / jnp.where(denom > 0, denom, 1.0), 0.0))
    return iou - (rho2 / c2 + v * alpha)


def bce_with_logits(logits, targets, pos_weight=1.0):
    """PyTorch's BCEWithLogitsLoss (no reduction) with `pos_weight`, for soft targets too:
    −(pw · y · log σ(x) + (1 − y) · log(1 − σ(x)))."""
    log_p = jax.nn.log_sigmoid(logits)
    log_not_p = jax.nn.log_sigmoid(-logits)
    return -(pos_weight * targets * log_p + (1 - targets) * log_not_p)


def yolo_loss(
    raw: Sequence[jax.Array],
    boxes: jax.Array,
    classes: jax.Array,
    mask: jax.Array,
    *,
    anchors: Sequence[Sequence[Sequence[float]]],
    strides: Sequence[int],
    hyp: Mapping[str, jax.Array],
):
    """Loss of raw per-level logits (B, na, H, W, 5 + nc) against padded targets.

    `hyp` entries (arrays, so a vmapped population may differ): box, obj, cls, cls_pw, obj_pw,
    anchor_t, balance (one weight per level), label_smoothing. Returns (total, terms) where terms
    has 'local' (levels, 3) and 'global' (3,) for (box, obj, cls).
    """
    nl = len(raw)
    bsz = raw[0].shape[0]
    nc = raw[0].shape[-1] - 5
    eps_ls = hyp.get("label_smoothing", 0.0)
    cp, cn = 1.0 - 0.5 * eps_ls, 0.5 * eps_ls
    xy = (boxes[..., 0:2] + boxes[..., 2:4]) / 2
    wh = boxes[..., 2:4] - boxes[..., 0:2]
    local = []
    for lvl, (p, anc_px, s) in enumerate(zip(raw, anchors, strides)):
        _, na, h, w, _ = p.shape
        anc = jnp.asarray(anc_px, jnp.float32) / s  # (na, 2) grid units
        gxy, gwh = xy / s, wh / s  # (B, M, 2)
        ratio = gwh[:, :, None, :] / anc[None, None]  # (B, M, na, 2)
        shape_ok = jnp.max(jnp.maximum(ratio, 1 / ratio), -1) < hyp["anchor_t"]
        valid_bma = mask[:, :, None] & shape_ok  # (B, M, na)
        gain = jnp.asarray([w, h], jnp.float32)
        gxi = gain - gxy
        near = jnp.stack([
            jnp.ones(gxy.shape[:2], bool),
            (gxy[..., 0] % 1 < 0.5) & (gxy[..., 0] > 1),
            (gxy[..., 1] % 1 < 0.5) & (gxy[..., 1] > 1),
            (gxi[..., 0] % 1 < 0.5) & (gxi[..., 0] > 1),
            (gxi[..., 1] % 1 < 0.5) & (gxi[..., 1] > 1),
        ])  # (5, B, M)
        off = jnp.asarray(_OFFSETS, jnp.float32)[:, None, None, :]  # (5, 1, 1, 2)
        gij = jnp.floor(gxy[None] - off).astype(jnp.int32)  # (5, B, M, 2)
        gi = jnp.clip(gij[..., 0], 0, w - 1)
        gj = jnp.clip(gij[..., 1], 0, h - 1)
        txy = gxy[None] - jnp.stack([gi, gj], -1).astype(jnp.float32)  # from the clamped cell (docs/reference.md §8)
        # candidates (5, B, M, na)
        valid = near[..., None] & valid_bma[None]
        bidx = jnp.arange(bsz)[None, :, None, None]
        aidx = jnp.arange(na)[None, None, None, :]
        ps = p[bidx, aidx, gj[..., None], gi[..., None]]  # (5, B, M, na, no)
        ps = ps.astype(jnp.float32)
        pxy = jax.nn.sigmoid(ps[..., 0:2]) * 2 - 0.5
        pwh = jnp.square(jax.nn.sigmoid(ps[..., 2:4]) * 2) * anc
        tbox = jnp.concatenate([jnp.broadcast_to(txy[..., None, :], pxy.shape),
                                jnp.broadcast_to(gwh[None, :, :, None, :], pwh.shape)], -1)
        iou = bbox_ciou(jnp.concatenate([pxy, pwh], -1), tbox)
        vf = valid.astype(jnp.float32)
        n_assign = jnp.sum(vf)
        safe_n = jnp.maximum(n_assign, 1.0)
        lbox = jnp.sum((1.0 - iou) * vf) / safe_n
        # objectness target: clamped CIoU; for a cell hit several times the last assignment in the
        # reference's order (offset, anchor, box) wins
        m_boxes = boxes.shape[1]
        order = (jnp.arange(5)[:, None, None, None] * (na * m_boxes)
                 + aidx * m_boxes + jnp.arange(m_boxes)[None, None, :, None])
        order = jnp.broadcast_to(order, valid.shape)
        cell = ((bidx * na + aidx) * h + gj[..., None]) * w + gi[..., None]
        n_cells = bsz * na * h * w
        latest = jnp.full((n_cells,), -1, jnp.int32).at[cell.ravel()].max(jnp.where(valid, order, -1).ravel())
        winner = valid & (latest[cell] == order)
        score = jnp.clip(jax.lax.stop_gradient(iou), 0.0, None)
        tobj = jnp.zeros((n_cells,), jnp.float32).at[cell.ravel()].add(jnp.where(winner, score, 0.0).ravel())
        tobj = tobj.reshape(bsz, na, h, w)
        lobj = jnp.mean(bce_with_logits(p[..., 4].astype(jnp.float32), tobj, hyp["obj_pw"])) * hyp["balance"][lvl]
        if nc > 1:
            onehot = jax.nn.one_hot(classes, nc)[None, :, :, None, :]  # (1, B, M, 1, nc)
            tcls = jnp.broadcast_to(cn + (cp - cn) * onehot, ps[..., 5:].shape)
            lcls = jnp.sum(bce_with_logits(ps[..., 5:], tcls, hyp["cls_pw"]) * vf[..., None]) / (safe_n * nc)
        else:
            lcls = jnp.zeros((), jnp.float32)
        local.append(jnp.stack([lbox, lobj, lcls]))
    s_lv = 3.0 / nl
    gains = jnp.stack([hyp["box"] * s_lv, hyp["obj"] * s_lv * (1.4 if nl >= 4 else 1.0), hyp["cls"] * s_lv])
    local = jnp.stack(local) * gains[None]  # (levels, 3) after gains
    glob = jnp.sum(local, 0)
    return jnp.sum(glob) * bsz, {"local": local, "global": glob}
