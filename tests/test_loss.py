"""The YOLO loss against a NumPy re-derivation written as plain loops over docs/reference.md §8."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
import pytest

from jaxyolo.loss import bbox_ciou, yolo_loss

ANCHORS = (((12, 16), (19, 36), (40, 28)), ((36, 75), (76, 55), (72, 146)), ((142, 110), (192, 243), (459, 401)))
STRIDES = (8, 16, 32)
HYP = dict(box=0.05, obj=1.0, cls=0.5, cls_pw=1.0, obj_pw=1.0, anchor_t=4.0, balance=[4.0, 1.0, 0.4],
           label_smoothing=0.0)


def _sig(x):
    return 1 / (1 + np.exp(-x))


def _bce(x, y, pw=1.0):
    return -(pw * y * np.log(_sig(x)) + (1 - y) * np.log(1 - _sig(x)))


def _ciou(b1, b2, eps=1e-9):
    (x1, y1, w1, h1), (x2, y2, w2, h2) = b1, b2
    ix = max(0.0, min(x1 + w1 / 2, x2 + w2 / 2) - max(x1 - w1 / 2, x2 - w2 / 2))
    iy = max(0.0, min(y1 + h1 / 2, y2 + h2 / 2) - max(y1 - h1 / 2, y2 - h2 / 2))
    inter = ix * iy
    union = w1 * (h1 + eps) + w2 * (h2 + eps) - inter + eps
    iou = inter / union
    cw = max(x1 + w1 / 2, x2 + w2 / 2) - min(x1 - w1 / 2, x2 - w2 / 2)
    ch = max(y1 + h1 / 2, y2 + h2 / 2) - min(y1 - h1 / 2, y2 - h2 / 2)
    rho2 = (x2 - x1) ** 2 + (y2 - y1) ** 2
    v = 4 / math.pi**2 * (math.atan(w2 / (h2 + eps)) - math.atan(w1 / (h1 + eps))) ** 2
    alpha = v / (v - iou + 1 + eps)
    return iou - (rho2 / (cw**2 + ch**2 + eps) + v * alpha)


def reference_loss(raw, targets, hyp, nc):
    """targets: list of (image, class, x1, y1, x2, y2) in pixels, in batch order."""
    bsz = raw[0].shape[0]
    local = []
    for lvl, (p, anc_px, s) in enumerate(zip(raw, ANCHORS, STRIDES)):
        _, na, h, w, _ = p.shape
        assigned = []  # reference order: offset, anchor, target
        for o, (ox, oy) in enumerate([(0, 0), (0.5, 0), (0, 0.5), (-0.5, 0), (0, -0.5)]):
            for a in range(na):
                for (b, c, x1, y1, x2, y2) in targets:
                    gx, gy, gw, gh = (x1 + x2) / 2 / s, (y1 + y2) / 2 / s, (x2 - x1) / s, (y2 - y1) / s
                    aw, ah = anc_px[a][0] / s, anc_px[a][1] / s
                    if max(gw / aw, aw / gw, gh / ah, ah / gh) >= hyp["anchor_t"]:
                        continue
                    conds = [True, gx % 1 < 0.5 and gx > 1, gy % 1 < 0.5 and gy > 1,
                             (w - gx) % 1 < 0.5 and (w - gx) > 1, (h - gy) % 1 < 0.5 and (h - gy) > 1]
                    if not conds[o]:
                        continue
                    gi = min(max(int(math.floor(gx - ox)), 0), w - 1)
                    gj = min(max(int(math.floor(gy - oy)), 0), h - 1)
                    assigned.append((b, a, gj, gi, (gx - gi, gy - gj, gw, gh), c, (aw, ah)))
        tobj = np.zeros((bsz, na, h, w))
        lbox = lcls = 0.0
        for (b, a, gj, gi, tb, c, (aw, ah)) in assigned:
            ps = p[b, a, gj, gi].astype(np.float64)
            pb = (2 * _sig(ps[0]) - 0.5, 2 * _sig(ps[1]) - 0.5, (2 * _sig(ps[2])) ** 2 * aw, (2 * _sig(ps[3])) ** 2 * ah)
            iou = _ciou(pb, tb)
            lbox += (1 - iou) / len(assigned)
            tobj[b, a, gj, gi] = max(iou, 0.0)  # last write wins
            t = np.full(nc, 0.5 * hyp["label_smoothing"])
            t[c] = 1 - 0.5 * hyp["label_smoothing"]
            lcls += _bce(ps[5:], t, hyp["cls_pw"]).sum() / (len(assigned) * nc)
        lobj = _bce(p[..., 4].astype(np.float64), tobj, hyp["obj_pw"]).mean() * hyp["balance"][lvl]
        local.append([lbox * hyp["box"], lobj * hyp["obj"], lcls * hyp["cls"]])
    local = np.array(local)
    return local.sum() * bsz, local


def _case(seed=0, nc=3, img=64):
    rng = np.random.default_rng(seed)
    raw = [rng.normal(0, 1.5, (2, 3, img // s, img // s, 5 + nc)).astype(np.float32) for s in STRIDES]
    targets = [
        (0, 1, 10.0, 12.0, 30.0, 40.0),
        (0, 2, 11.0, 13.0, 29.0, 41.0),   # nearly the same box: duplicate cells, last write wins
        (0, 0, 40.0, 30.0, 63.9, 63.9),   # on the far border: clamped cells
        (0, 2, 2.0, 50.0, 9.0, 58.0),     # tiny box near the left edge
    ]
    m = 6
    boxes = np.zeros((2, m, 4), np.float32)
    classes = np.zeros((2, m), np.int32)
    mask = np.zeros((2, m), bool)
    for i, (b, c, *xyxy) in enumerate(targets):
        boxes[b, i], classes[b, i], mask[b, i] = xyxy, c, True
    boxes[0, 5] = [5, 5, 20, 20]  # padding row with coordinates but mask False: must be ignored
    return raw, targets, boxes, classes, mask


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_loss_matches_the_loop_reference(smoothing):
    raw, targets, boxes, classes, mask = _case()
    hyp = dict(HYP, label_smoothing=smoothing)
    total, terms = yolo_loss([jnp.asarray(r) for r in raw], jnp.asarray(boxes), jnp.asarray(classes),
                             jnp.asarray(mask), anchors=ANCHORS, strides=STRIDES,
                             hyp={k: jnp.asarray(v, jnp.float32) for k, v in hyp.items()})
    ref_total, ref_local = reference_loss(raw, targets, hyp, nc=3)
    np.testing.assert_allclose(np.asarray(terms["local"]), ref_local, rtol=2e-5, atol=1e-6)
    np.testing.assert_allclose(float(total), ref_total, rtol=2e-5)
    assert (ref_local[:, 0] > 0).sum() == 2  # P3 and P4 get assignments; P5 anchors are too large here


def test_empty_images_give_only_objectness_loss():
    raw, _, boxes, classes, _ = _case()
    mask = np.zeros_like(boxes[..., 0], bool)
    total, terms = yolo_loss([jnp.asarray(r) for r in raw], jnp.asarray(boxes), jnp.asarray(classes),
                             jnp.asarray(mask), anchors=ANCHORS, strides=STRIDES,
                             hyp={k: jnp.asarray(v, jnp.float32) for k, v in HYP.items()})
    ref_total, ref_local = reference_loss(raw, [], HYP, nc=3)
    assert np.all(np.asarray(terms["local"])[:, [0, 2]] == 0)
    np.testing.assert_allclose(float(total), ref_total, rtol=2e-5)


def test_ciou_hand_values():
    # identical boxes: CIoU 1; disjoint equal squares side by side: IoU 0, rho²/c² = 1/4 ... computed here
    assert float(bbox_ciou(jnp.array([1.0, 1, 2, 2]), jnp.array([1.0, 1, 2, 2]))) == pytest.approx(1.0, abs=1e-6)
    # centres 2 apart, 2x2 squares touching: enclosing box 4x2 -> c² = 20, rho² = 4, v = 0
    assert float(bbox_ciou(jnp.array([1.0, 1, 2, 2]), jnp.array([3.0, 1, 2, 2]))) == pytest.approx(-0.2, abs=1e-6)
