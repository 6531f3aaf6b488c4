"""Knowledge distillation from a teacher detector (the paper's SKD, §4.4 and §5.3).

The paper distils its YOLOv4l teacher into the YOLOv4s student with the hyper-parameters searched
for the *student* (JHS_s): the teacher's knowledge is taken in the augmented data space and training
strategy that suit the student's capacity. Here that means: the student trains as usual (its own
hyp set, augmentation, schedule, loss), and the teacher, frozen, looks at the very same augmented
images and adds distillation terms to the student's loss. The paper does not spell the terms out;
these are the published formulations this module implements (each weight a hyp array leaf, so a
population or a search can vary them; all 0 by default):

* ``kd_obj`` — objectness distillation, Mehta & Ozturk 2018 ("Object detection at 200 frames per
  second", ECCV-W), eq. for L_obj: BCE(student objectness logit, σ(teacher objectness logit)) over
  all anchors and cells of a level (its mean), weighted per level by the detection loss's
  `balance`, like the objectness loss itself.
* ``kd_cls`` — objectness-scaled class distillation, Mehta & Ozturk 2018 (L_cl: the teacher's
  objectness scales each cell's class distillation, so background cells, where the teacher's class
  scores are noise, hardly count), with Hinton et al. 2015's temperature T = ``kd_T``:
  T² · BCE(student class logit / T, σ(teacher class logit / T)), mean over classes, summed over cells
  with weight σ(teacher objectness) and divided by max(Σ weights, 1). Off for a one-class model (its
  class logit is not trained either).
* ``kd_box`` — box distillation on the cells where the teacher is confident (σ(teacher objectness)
  > ``kd_conf``): Mehta & Ozturk 2018's L_reg term, whose soft objectness scaling is replaced by a
  hard threshold: the squared L2 distance between the student's and the teacher's boxes in the
  scaled-YOLOv4 decode, centre offset 2σ(t_xy) − 0.5 (cells) and size (2σ(t_wh))² (anchor units), summed
  over the 4 coordinates, averaged over the confident cells (divided by max(count, 1)).
* ``kd_feat`` — feature imitation at the head inputs (P3–P5), hint learning of Chen et al. 2017
  ("Learning efficient object detection models with knowledge distillation", NeurIPS): a 1×1
  adapter conv maps the student's features to the teacher's channels and the loss is the squared
  L2 distance to the teacher's features (mean over channels). With `feature_mask=True` (default)
  cells are weighted by the teacher's objectness (max over anchors), a soft, label-free variant of
  the imitation mask of Wang et al. 2019 ("Distilling object detectors with fine-grained feature
  imitation", CVPR), which imitates only near objects; normalised by max(Σ weights, 1). With
  `feature_mask=False` it is Chen et al.'s plain mean over all cells. The adapters (per level a
  kernel (C_student, C_teacher) and a bias, PyTorch's default conv init) are trained with the
  student (same SGD, schedule and groups: kernel decayed, bias not) in `TrainState.aux`, and are no
  part of the student's checkpoint.

Terms are combined like the detection loss: per level, times the hyp weight and 3 / levels,
summed, times the batch size. The metrics report them per level (`kd_local`, (levels, 4)) and in
total (`kd`, (4,): obj, cls, box, feat) after weights, per image, like `local` / `global`.

The teacher runs in inference mode (BatchNorm running statistics, the KST candidates' mean) on
the student's augmented images, inside `jax.lax.stop_gradient`: its gradients are zero by
construction. It must share the student's anchors, strides and classes; widths and depths may
differ (`yolov4l` → `yolov4s`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxyolo import train_step as T
from jaxyolo.errors import ConfigError
from jaxyolo.loss import bce_with_logits

KD_TERMS = ("obj", "cls", "box", "feat")
KD_KEYS = ("kd_obj", "kd_cls", "kd_box", "kd_feat")


# ---------------------------------------------------------------------------------- compatibility


def check_compatible(student, teacher) -> None:
    """Student and teacher must be detectors of one family, and that family must be able to distil
    between them (`Family.check_distill`: YOLOv4 needs the same classes, strides and anchors, the
    gfl family the same classes, strides and reg_max)."""
    if student.family.name != teacher.family.name:
        raise ConfigError(f"teacher {teacher.spec.name}: a {teacher.family.name} detector cannot teach the "
                          f"{student.family.name} student {student.spec.name} (their outputs differ; the "
                          f"distillation terms compare them one to one)")
    student.family.check_distill(student, teacher)


def check_yolo_pair(student, teacher) -> None:
    """The YOLOv4 terms read objectness and anchor-relative boxes: same classes, strides, anchors."""
    s, t = student.spec, teacher.spec
    where = f"teacher {t.name}"
    if s.nc != t.nc:
        raise ConfigError(f"{where}: {t.nc} classes, the student {s.name} has {s.nc} (they must be equal)")
    if tuple(s.strides) != tuple(t.strides):
        raise ConfigError(f"{where}: strides {tuple(t.strides)}, the student {s.name} has {tuple(s.strides)}")
    sa, ta = np.asarray(s.anchors, np.float64), np.asarray(t.anchors, np.float64)
    if sa.shape != ta.shape or not np.allclose(sa, ta, rtol=1e-6, atol=1e-6):
        raise ConfigError(f"{where}: anchors {_anchor_text(t.anchors)} differ from the student {s.name}'s "
                          f"{_anchor_text(s.anchors)} (they must be equal)")


def _anchor_text(anchors) -> str:
    return str([[float(v) for wh in lvl for v in wh] for lvl in anchors])


# --------------------------------------------------------------------------------- teacher state


def teacher_params(teacher) -> dict:
    """The teacher's frozen inference state as a pytree: {'params', 'stats'} (nnx.State). A
    detector from `jaxyolo.load` carries the EMA weights and their BatchNorm running statistics."""
    teacher.require_weights("teacher")
    _, params, stats = T.split_model(teacher.model)
    return {"params": params, "stats": stats}


def teacher_forward_fn(teacher, features: bool = False) -> Callable:
    """(teacher_params, images) -> (raw per level, head-input features per level or None), in
    inference mode and under `stop_gradient`; float32."""
    graphdef = T.split_model(teacher.model)[0]

    def forward(tparams, images):
        tparams = jax.lax.stop_gradient(tparams)
        model = nnx.merge(graphdef, tparams["params"], tparams["stats"], copy=True)
        raw, feats = model(images, train=False, return_features=True)
        raw = [jax.lax.stop_gradient(r.astype(jnp.float32)) for r in raw]
        if not features:
            return raw, None
        return raw, [jax.lax.stop_gradient(f.astype(jnp.float32)) for f in feats]

    return forward


def teacher_outputs(teacher, batches: Sequence[dict], *, features: bool = False, params=None) -> list[dict]:
    """The teacher-output cache for training without augmentation: each batch (with `image`,
    uint8 or float in [0, 1]) comes back with `teacher_raw` (per level, float32) and, with
    `features`, `teacher_features`, for `make_distill_step(..., cached_teacher=True)`, which then
    does not run the teacher. The teacher runs once per batch here, however many steps reuse it."""
    fwd = jax.jit(teacher_forward_fn(teacher, features))
    tparams = teacher_params(teacher) if params is None else params
    out = []
    for b in batches:
        raw, feats = fwd(tparams, T.batch_images(b))
        nb = dict(b)
        nb["teacher_raw"] = [np.asarray(r) for r in raw]
        if features:
            nb["teacher_features"] = [np.asarray(f) for f in feats]
        out.append(nb)
    return out


# -------------------------------------------------------------------------------------- adapters


def init_adapters(student, teacher, seed: int = 0) -> dict:
    """1×1 adapter convs student → teacher channels per level ({'P3': {'kernel', 'bias'}, ...}),
    initialised like PyTorch's Conv2d: U(±1/√C_student) for kernel and bias."""
    check_compatible(student, teacher)
    cs = student.family.feature_channels(student.spec)
    ct = teacher.family.feature_channels(teacher.spec)
    rng = np.random.default_rng([seed, 7331])
    out = {}
    for name, a, b in zip(student.family.level_names(student.spec), cs, ct):
        bound = 1.0 / math.sqrt(a)
        out[name] = {"kernel": rng.uniform(-bound, bound, (a, b)).astype(np.float32),
                     "bias": rng.uniform(-bound, bound, (b,)).astype(np.float32)}
    return jax.tree.map(jnp.asarray, out)


def init_state(student, teacher=None, *, features: bool = False, seed: int = 0) -> T.TrainState:
    """The student's TrainState for `make_distill_step`; with `features`, the adapters live in
    `state.aux` (trained, checkpointed with the training state, not with the student)."""
    if features and teacher is None:
        raise ConfigError("feature imitation needs the teacher (its channels size the adapters)")
    return T.init_state(student, init_adapters(student, teacher, seed) if features else None)


# ------------------------------------------------------------------------------- the loss terms


def objectness_kd(s, t):
    """Mehta & Ozturk 2018 objectness distillation of one level: the mean over (B, na, H, W) of
    BCE(student objectness logit, σ(teacher objectness logit)). s, t: raw (B, na, H, W, 5 + nc)."""
    return jnp.mean(bce_with_logits(s[..., 4], jax.nn.sigmoid(t[..., 4])))


def class_kd(s, t, temperature):
    """Objectness-scaled class distillation (Mehta & Ozturk 2018) with temperature T (Hinton et al.
    2015) of one level: Σ_cells w · mean_c T² BCE(s_c / T, σ(t_c / T)) / max(Σ w, 1), w = σ(teacher
    objectness logit)."""
    w = jax.nn.sigmoid(t[..., 4])
    per_cell = jnp.mean(bce_with_logits(s[..., 5:] / temperature, jax.nn.sigmoid(t[..., 5:] / temperature)), -1)
    return jnp.square(temperature) * jnp.sum(w * per_cell) / jnp.maximum(jnp.sum(w), 1.0)


def decoded_box(r):
    """The scaled-YOLOv4 decode without grid and anchor: centre offset 2σ − 0.5 (cells) and size
    (2σ)² (anchor units), (..., 4)."""
    y = jax.nn.sigmoid(r[..., 0:4])
    return jnp.concatenate([y[..., 0:2] * 2 - 0.5, jnp.square(y[..., 2:4] * 2)], -1)


def box_kd(s, t, conf):
    """Box distillation of one level (Mehta & Ozturk 2018's regression term, hard-thresholded):
    Σ_cells m · ‖box_s − box_t‖² / max(Σ m, 1) with m = [σ(teacher objectness) > conf] and boxes from
    `decoded_box`."""
    m = (jax.nn.sigmoid(t[..., 4]) > conf).astype(jnp.float32)
    d2 = jnp.sum(jnp.square(decoded_box(s) - decoded_box(t)), -1)
    return jnp.sum(m * d2) / jnp.maximum(jnp.sum(m), 1.0)


def feature_kd(s_feat, t_feat, kernel, bias, weight=None):
    """Hint learning (Chen et al. 2017) of one level: a = s_feat @ kernel + bias (a 1×1 conv),
    e = mean over channels of (a − t_feat)², then the mean of e over (B, H, W), or with `weight`
    (B, H, W) Σ w·e / max(Σ w, 1) (the teacher-objectness imitation mask, after Wang et al. 2019)."""
    a = jnp.einsum("bhwc,cd->bhwd", s_feat.astype(jnp.float32), kernel) + bias
    e = jnp.mean(jnp.square(a - t_feat), -1)
    if weight is None:
        return jnp.mean(e)
    return jnp.sum(weight * e) / jnp.maximum(jnp.sum(weight), 1.0)


def distill_loss(raw, teacher_raw, hyp, *, features=None, teacher_features=None, adapters=None,
                 feature_mask: bool = True):
    """All distillation terms of a batch: (total × batch size, {'kd_local': (levels, 4), 'kd': (4,)})
    for (obj, cls, box, feat) after the weights kd_obj, kd_cls, kd_box, kd_feat and 3 / levels (the
    objectness term also × the level's `balance`). `features` / `teacher_features` / `adapters`
    (all or none): the feature-imitation inputs; without them the feat term is 0."""
    nl = len(raw)
    bsz = raw[0].shape[0]
    nc = raw[0].shape[-1] - 5
    zero = jnp.zeros((), jnp.float32)
    use_feat = features is not None
    if use_feat and (teacher_features is None or adapters is None):
        raise ConfigError("feature imitation needs the student's and teacher's features and the adapters")
    adapter_list = [adapters[k] for k in sorted(adapters, key=lambda n: int(n[1:]))] if use_feat else None
    local = []
    for lvl in range(nl):
        s, t = raw[lvl].astype(jnp.float32), teacher_raw[lvl].astype(jnp.float32)
        lo = objectness_kd(s, t) * hyp["balance"][lvl]
        lc = class_kd(s, t, hyp["kd_T"]) if nc > 1 else zero
        lb = box_kd(s, t, hyp["kd_conf"])
        if use_feat:
            w = jnp.max(jax.nn.sigmoid(t[..., 4]), axis=1) if feature_mask else None
            ad = adapter_list[lvl]
            lf = feature_kd(features[lvl], teacher_features[lvl], ad["kernel"], ad["bias"], w)
        else:
            lf = zero
        local.append(jnp.stack([lo, lc, lb, lf]))
    gains = jnp.stack([hyp[k] for k in KD_KEYS]) * (3.0 / nl)
    local = jnp.stack(local) * gains[None]
    glob = jnp.sum(local, 0)
    return jnp.sum(glob) * bsz, {"kd_local": local, "kd": glob}


# ------------------------------------------------------------------------------------- the step


def make_distill_step(student, teacher, config: T.TrainConfig, *, augment_fn: Callable | None = None,
                      features: bool = False, feature_mask: bool = True, cached_teacher: bool = False,
                      hooks: T.StepHooks | None = None):
    """The pure distillation step: (student_state, teacher_params, batch, hyp, key) -> (state,
    metrics), shaped like `jaxyolo.train_step.make_train_step`'s step (and sharing its optimiser,
    schedule, accumulation, EMA and non-finite handling: `jaxyolo.train_step.StepCore`).

    `student_state`: `init_state(student, teacher, features=...)` (a plain `train.init_state` when
    `features` is off); `teacher_params`: `teacher_params(teacher)`, frozen; the loss is the
    student's detection loss plus `distill_loss`. `jaxyolo.train_step.population_step(step, mesh)` runs
    P students against one replicated teacher.

    `cached_teacher=True` (needs `config.augment=False`): the teacher's outputs come from the batch
    (`teacher_outputs`) instead of a teacher forward pass; `teacher_params` is then unused (None).
    `hooks`: a training method's transforms of the student's step (`jaxyolo.train_step.StepHooks`).
    """
    check_compatible(student, teacher)
    if cached_teacher and config.augment:
        raise ConfigError("cached_teacher: teacher outputs can be cached only without augmentation "
                          "(config.augment=False): augmented images differ every step")
    core = T.StepCore(student, config, augment_fn, hooks)
    t_forward = teacher_forward_fn(teacher, features)

    def loss_fn(params, stats, aux_params, images, boxes, classes, mask, hyp, key, t_raw, t_feats):
        model = nnx.merge(core.graphdef, params, stats, copy=True)
        if features:
            raw, feats = model(images, train=True, key=key, return_features=True)
        else:
            raw, feats = model(images, train=True, key=key), None
        total, terms = core.detection_loss(raw, boxes, classes, mask, hyp)
        kd_total, kd_terms = core.family.distill_loss(raw, t_raw, boxes, classes, mask, hyp, spec=core.spec,
                                                      features=feats, teacher_features=t_feats,
                                                      adapters=aux_params, feature_mask=feature_mask)
        return total + kd_total, (terms, kd_terms, nnx.state(model, nnx.BatchStat))

    def distill_step(state: T.TrainState, teacher_params, batch, hyp, key):
        if features and state.aux is None:
            raise ConfigError("features=True: the student state has no adapters; build it with "
                              "jaxyolo.distill.init_state(student, teacher, features=True)")
        k_aug, k_kst = jax.random.split(key)
        images, boxes, classes, mask = core.inputs(batch, hyp, k_aug)
        if cached_teacher:
            t_raw = [jnp.asarray(r, jnp.float32) for r in batch["teacher_raw"]]
            t_feats = [jnp.asarray(f, jnp.float32) for f in batch["teacher_features"]] if features else None
        else:
            t_raw, t_feats = t_forward(teacher_params, images)
        aux_params = state.aux["params"] if features else None
        grad_fn = jax.value_and_grad(loss_fn, argnums=(0, 2) if features else 0, has_aux=True)
        (total, (terms, kd_terms, new_stats)), grads = grad_fn(
            state.params, state.stats, aux_params, images, boxes, classes, mask, hyp, k_kst, t_raw, t_feats)
        grads, aux_grads = grads if features else (grads, None)
        new, info = core.update(state, total, grads, new_stats, hyp, aux_grads=aux_grads)
        bsz = images.shape[0]
        metrics = {"loss": total / bsz, "local": terms["local"], "global": terms["global"], **info,
                   "targets": jnp.sum(mask), "kd": kd_terms["kd"], "kd_local": kd_terms["kd_local"]}
        return new, metrics

    return distill_step


def kd_weights_zero(hyps: Sequence[dict], keys: Sequence[str] = KD_KEYS) -> bool:
    """True when every hyp set has all distillation weights `keys` (a family's `kd_keys`) 0:
    distillation would do nothing."""
    return all(float(np.sum(np.abs(np.asarray(h[k], np.float64)))) == 0.0 for h in hyps for k in keys)


__all__ = ["KD_TERMS", "KD_KEYS", "check_compatible", "check_yolo_pair", "teacher_params", "teacher_forward_fn",
                      "teacher_outputs", "init_adapters", "init_state", "objectness_kd", "class_kd", "box_kd",
                      "feature_kd", "decoded_box", "distill_loss", "make_distill_step", "kd_weights_zero"]
