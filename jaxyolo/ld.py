"""Localization distillation for the gfl family (Zheng et al., "Localization Distillation for Dense
Object Detection", CVPR 2022): the student's box distributions learn the teacher's.

A gfl head predicts each side of a box as a distribution over `reg_max + 1` bins, so the teacher's
localisation knowledge (which sides it is unsure of, and how) can be distilled like class logits:
the KL divergence between the teacher's and the student's distributions, softened by a
temperature T and scaled by T². Where it is taken matters:

* **main region**: the points the ATSS assignment makes positive (where the detection loss
  trains boxes). Each point weighted by the student's highest class score (no gradient), the
  weight the GIoU and DFL terms use, and divided by those weights' sum;
* **valuable localization region** (VLR): points that are not positive but whose anchor's DIoU
  with a ground-truth box lies in [α·t, t], t being that box's ATSS threshold (mean + std of
  its candidates' IoUs) and α = `ld_alpha` (0.25 as published). A mean over those points.

Two terms after the same recipe: class distillation on the main region (T_c² · Σ_classes of the
binary KL between σ(t/T_c) and σ(s/T_c), mean over positives; T_c = `ld_cls_T`), and feature imitation at the
head inputs (the PAN outputs) through 1×1 adapters (`jaxyolo.distill.feature_kd`), masked by
the teacher's highest score.

Hyp keys (weights 0 by default: plain training): `ld_main`, `ld_vlr`, `ld_cls`, `ld_feat`, and
`ld_T` (10), `ld_cls_T` (2), `ld_alpha` (0.25). The published recipe weights the two LD terms
0.25 each at T = 10. Terms are reported per level and summed, after their weights, like the
detection loss's; the total is multiplied by the batch size.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jaxyolo import gfl_loss as G
from jaxyolo.errors import ConfigError

LD_TERMS = ("ld", "vlr", "cls", "feat")
LD_KEYS = ("ld_main", "ld_vlr", "ld_cls", "ld_feat")


def box_kl(s_logits, t_logits, bins: int, temperature):
    """T² · KL(softmax(t/T) ‖ softmax(s/T)) per side, averaged over the 4 sides: (..., 4·bins) -> (...)."""
    shape = (*s_logits.shape[:-1], 4, bins)
    log_s = jax.nn.log_softmax(s_logits.reshape(shape) / temperature, -1)
    log_t = jax.nn.log_softmax(t_logits.reshape(shape) / temperature, -1)
    kl = jnp.sum(jnp.exp(log_t) * (log_t - log_s), -1)
    return jnp.square(temperature) * kl.mean(-1)


def binary_kl(s_logits, t_logits, temperature):
    """T² · Σ_classes KL(Bernoulli(σ(t/T)) ‖ Bernoulli(σ(s/T))): (..., C) -> (...). The BCE of the
    soft targets less their entropy: the same gradient, and 0 when student and teacher agree."""
    x, z = s_logits / temperature, t_logits / temperature
    y = jax.nn.sigmoid(z)
    softplus = lambda v: jnp.maximum(v, 0) + jnp.log1p(jnp.exp(-jnp.abs(v)))  # noqa: E731
    # BCE(x, y) − BCE(z, y) = (softplus(x) − x·y) − (softplus(z) − z·y)
    kl = softplus(x) - softplus(z) - (x - z) * y
    return jnp.square(temperature) * kl.sum(-1)


def diou(a, b):
    """DIoU of every box of a (M, 4) with every box of b (N, 4), xyxy: IoU − d²/c² (d: centre
    distance, c: diagonal of the smallest box holding both) -> (M, N)."""
    iou = G.box_iou(a, b)
    ca, cb = (a[:, :2] + a[:, 2:]) / 2, (b[:, :2] + b[:, 2:]) / 2
    d2 = jnp.sum(jnp.square(ca[:, None] - cb[None]), -1)
    lt = jnp.minimum(a[:, None, :2], b[None, :, :2])
    rb = jnp.maximum(a[:, None, 2:], b[None, :, 2:])
    c2 = jnp.sum(jnp.square(rb - lt), -1) + G.EPS
    return iou - d2 / c2


def regions(pts, strides, sizes, boxes, mask, *, topk: int, anchor_scale: float, alpha):
    """One image's (main (N,) bool, vlr (N,) bool): the ATSS positives, and the points outside them
    whose anchor has DIoU in [alpha·t, t] with some box (t: that box's ATSS threshold)."""
    pos, _, thr, anchors = G.atss_regions(pts, strides, sizes, boxes, mask, topk=topk, anchor_scale=anchor_scale)
    main = jnp.any(pos, 0)
    d = diou(boxes, anchors)
    near = (d >= alpha * thr[:, None]) & (d <= thr[:, None]) & mask[:, None]
    return main, jnp.any(near, 0) & ~main


def ld_loss(raw, teacher_raw, boxes, classes, mask, hyp, *, spec, features=None, teacher_features=None,
            adapters=None, feature_mask: bool = True):
    """(total × batch size, {'kd_local': (levels, 4), 'kd': (4,)}) of terms (ld, vlr, cls, feat)
    after the weights ld_main, ld_vlr, ld_cls, ld_feat. raw / teacher_raw: the student's and
    teacher's raw levels (same classes and reg_max); targets padded: boxes (B, M, 4) xyxy pixels,
    classes (B, M), mask (B, M). `features` / `teacher_features` / `adapters` (all or none): the
    feature-imitation inputs; without them the feat term is 0."""
    from jaxyolo.distill import feature_kd  # the hint-learning term both families share

    flat, pts, st = G.flat_levels(raw, spec)
    t_flat, _, _ = G.flat_levels(teacher_raw, spec)
    t_flat = jax.lax.stop_gradient(t_flat)
    bsz, n, _ = flat.shape
    nc, bins = spec.nc, spec.bins
    sizes = [r.shape[1] * r.shape[2] for r in raw]
    main, vlr = jax.vmap(lambda b, m: regions(pts, st, sizes, b, m, topk=spec.atss_topk,
                                              anchor_scale=spec.octave_base_scale, alpha=hyp["ld_alpha"]))(boxes, mask)
    box_s, box_t = flat[..., nc:nc + 4 * bins], t_flat[..., nc:nc + 4 * bins]
    kl = box_kl(box_s, box_t, bins, hyp["ld_T"])  # (B, N)
    weight = jnp.where(main, jax.lax.stop_gradient(jax.nn.sigmoid(flat[..., :nc]).max(-1)), 0.0)
    l_main = weight * kl / jnp.maximum(jnp.sum(weight), G.EPS)
    l_vlr = jnp.where(vlr, kl, 0.0) / jnp.maximum(jnp.sum(vlr), 1.0)
    n_pos = jnp.maximum(jnp.sum(main), 1.0)
    l_cls = (jnp.where(main, binary_kl(flat[..., :nc], t_flat[..., :nc], hyp["ld_cls_T"]), 0.0) / n_pos
             if nc > 1 else jnp.zeros_like(kl))
    per_point = jnp.stack([l_main * hyp["ld_main"], l_vlr * hyp["ld_vlr"], l_cls * hyp["ld_cls"]], -1).sum(0)
    local = G.level_sums(per_point, sizes)  # (levels, 3)
    feat = jnp.zeros((len(raw),), jnp.float32)
    if features is not None:
        if teacher_features is None or adapters is None:
            raise ConfigError("feature imitation needs the student's and teacher's features and the adapters")
        names = sorted(adapters, key=lambda k: int(k[1:]))
        feat = []
        for lvl, t in enumerate(teacher_raw):
            w = None
            if feature_mask:
                w = jax.nn.sigmoid(t[..., :nc].astype(jnp.float32)).max(-1)
                if t.shape[-1] > nc + 4 * bins:  # GFLv2: the joint score
                    w = w * jax.nn.sigmoid(t[..., -1].astype(jnp.float32))
                w = jax.lax.stop_gradient(w)
            ad = adapters[names[lvl]]
            feat.append(feature_kd(features[lvl], teacher_features[lvl], ad["kernel"], ad["bias"], w))
        feat = jnp.stack(feat) * hyp["ld_feat"]
    local = jnp.concatenate([local, feat[:, None]], -1)
    glob = local.sum(0)
    return jnp.sum(glob) * bsz, {"kd_local": local, "kd": glob}


__all__ = ["LD_TERMS", "LD_KEYS", "box_kl", "binary_kl", "diou", "regions", "ld_loss"]
