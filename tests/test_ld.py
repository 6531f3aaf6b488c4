"""Localization distillation of the gfl family (`jaxyolo.ld`): its divergences at hand-computed
points, the main and valuable regions against a loop over points, zero for a student that equals
its teacher, each weight reaching the student's update through the shared distillation step, the
family checks, and `jaxyolo train --teacher` end to end on the tiny gfl model."""

from __future__ import annotations

import csv
import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from helpers import train_runs as R

import jaxyolo
from jaxyolo import distill as D
from jaxyolo import families
from jaxyolo import gfl_loss as G
from jaxyolo import hyp as H
from jaxyolo import ld
from jaxyolo import train_step as T
from jaxyolo.errors import ConfigError

TINY = str(Path(__file__).parent / "helpers" / "gfl_tiny.yaml")
GFL = families.get("gfl")


def test_box_kl_at_hand_computed_points():
    # one side with teacher probabilities (3/4, 1/4) (logits ln 3, 0) against a uniform student
    t = jnp.asarray([math.log(3.0), 0.0] * 4)
    s = jnp.zeros((8,))
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)
    np.testing.assert_allclose(float(ld.box_kl(s, t, 2, 1.0)), want, rtol=1e-6)
    # T = 2 softens the teacher to (√3, 1) / (√3 + 1); the KL is scaled by T²
    p = math.sqrt(3) / (math.sqrt(3) + 1)
    want2 = 4 * (p * math.log(p / 0.5) + (1 - p) * math.log((1 - p) / 0.5))
    np.testing.assert_allclose(float(ld.box_kl(s, t, 2, 2.0)), want2, rtol=1e-6)
    # the 4 sides are averaged: one disagreeing side of four gives a quarter
    t1 = jnp.asarray([math.log(3.0), 0.0] + [0.0, 0.0] * 3)
    np.testing.assert_allclose(float(ld.box_kl(s, t1, 2, 1.0)), want / 4, rtol=1e-6)


def test_binary_kl_at_hand_computed_points():
    want = 0.75 * math.log(0.75 / 0.5) + 0.25 * math.log(0.25 / 0.5)  # Bernoulli(3/4) ‖ Bernoulli(1/2)
    np.testing.assert_allclose(float(ld.binary_kl(jnp.zeros((1,)), jnp.asarray([math.log(3.0)]), 1.0)), want,
                               rtol=1e-6)
    np.testing.assert_allclose(float(ld.binary_kl(jnp.zeros((2,)), jnp.asarray([math.log(3.0)] * 2), 1.0)), 2 * want,
                               rtol=1e-6)  # summed over classes
    assert float(ld.binary_kl(jnp.asarray([1.5, -2.0]), jnp.asarray([1.5, -2.0]), 2.0)) == pytest.approx(0, abs=1e-6)


def test_diou_at_a_hand_computed_pair():
    # IoU 2/6; centres (1, 1) and (2, 1): d² = 1; the enclosing box [0, 0, 3, 2]: c² = 13
    d = ld.diou(jnp.asarray([[0.0, 0, 2, 2]]), jnp.asarray([[1.0, 0, 3, 2], [0.0, 0, 2, 2]]))
    np.testing.assert_allclose(np.asarray(d), [[1 / 3 - 1 / 13, 1.0]], rtol=1e-5)


def test_regions_are_the_positives_and_the_points_near_a_box():
    pts, st = G.points([(8, 8), (4, 4)], (8, 16))
    sizes = [64, 16]
    boxes = jnp.asarray([[10.0, 6.0, 40.0, 30.0], [36.0, 30.0, 60.0, 62.0], [0, 0, 0, 0]])
    mask = jnp.asarray([True, True, False])
    main, vlr = ld.regions(pts, st, sizes, boxes, mask, topk=5, anchor_scale=2.0, alpha=0.25)
    pos, _, thr, anchors = G.atss_regions(pts, st, sizes, boxes, mask, topk=5, anchor_scale=2.0)
    np.testing.assert_array_equal(np.asarray(main), np.asarray(pos).any(0))

    def diou(a, b):  # one pair, written out
        iw = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
        ih = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
        inter = iw * ih
        union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
        d2 = ((a[0] + a[2]) / 2 - (b[0] + b[2]) / 2) ** 2 + ((a[1] + a[3]) / 2 - (b[1] + b[3]) / 2) ** 2
        c2 = (max(a[2], b[2]) - min(a[0], b[0])) ** 2 + (max(a[3], b[3]) - min(a[1], b[1])) ** 2
        return inter / union - d2 / c2

    B, A, t = np.asarray(boxes, np.float64), np.asarray(anchors, np.float64), np.asarray(thr, np.float64)
    want = np.zeros(len(A), bool)
    for n in range(len(A)):
        for m in range(2):  # the padded third box never counts
            d = diou(B[m], A[n])
            want[n] |= 0.25 * t[m] - 1e-6 <= d <= t[m] + 1e-6
    want &= ~np.asarray(main)
    np.testing.assert_array_equal(np.asarray(vlr), want)
    assert 0 < want.sum() < len(A) and np.asarray(main).sum() > 0  # both regions are there, and not all points
    # α = 1 leaves only points at exactly the threshold: none here; α = 0 widens the region
    assert not np.asarray(ld.regions(pts, st, sizes, boxes, mask, topk=5, anchor_scale=2.0, alpha=1.0)[1]).any()
    wide = np.asarray(ld.regions(pts, st, sizes, boxes, mask, topk=5, anchor_scale=2.0, alpha=0.0)[1])
    assert wide.sum() > want.sum() and np.all(wide[want])


@pytest.fixture(scope="module")
def models():
    student = jaxyolo.create_model(TINY, num_classes=2, seed=0, dgqp=True)
    teacher = jaxyolo.create_model(TINY, num_classes=2, seed=1, dgqp=True)
    return student, teacher


def _targets():
    boxes = jnp.asarray([[[4, 4, 30, 40], [30, 30, 60, 60]], [[10, 10, 50, 30], [0, 0, 0, 0]]], jnp.float32)
    return boxes, jnp.asarray([[0, 1], [1, 0]]), jnp.asarray([[True, True], [True, False]])


def _hyp(**kw):
    return H.as_arrays(H.load_hyp(overrides=kw, family=GFL))


def test_ld_is_zero_with_zero_gradient_when_the_student_is_its_teacher(models):
    student, teacher = models
    images = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
    raw, t_raw = student.model(images), teacher.model(images)
    boxes, classes, mask = _targets()
    hyp = _hyp(ld_main=1.0, ld_vlr=1.0, ld_cls=1.0)
    loss = lambda r, t: ld.ld_loss(r, t, boxes, classes, mask, hyp, spec=student.spec)  # noqa: E731
    total, terms = loss(raw, raw)
    assert float(total) == 0.0 and np.all(np.asarray(terms["kd"]) == 0)
    grads = jax.grad(lambda r: loss(r, raw)[0])(raw)
    assert max(float(jnp.max(jnp.abs(g))) for g in grads) < 1e-6
    total, terms = loss(raw, t_raw)
    kd = np.asarray(terms["kd"])
    assert float(total) > 0 and np.all(kd[:3] > 0) and kd[3] == 0  # no features given: no feat term
    assert np.asarray(terms["kd_local"]).shape == (len(student.spec.strides), 4)
    np.testing.assert_allclose(float(total), kd.sum() * 2, rtol=1e-6)  # × batch size
    # the teacher's outputs get no gradient
    tg = jax.grad(lambda t: loss(raw, t)[0])(t_raw)
    assert all(float(jnp.max(jnp.abs(g))) == 0 for g in tg)


def test_each_ld_weight_reaches_the_student_through_the_distillation_step(models):
    student, teacher = models
    cfg = T.TrainConfig(epochs=1, batches_per_epoch=4, batch_size=2, img_size=64, nominal_batch=2,
                        min_warmup_iters=1, augment=False)
    step = jax.jit(D.make_distill_step(student, teacher, cfg, features=True))
    boxes, classes, mask = _targets()
    images = np.asarray(jax.random.uniform(jax.random.key(3), (2, 64, 64, 3)) * 255, np.uint8)
    batch = {"image": images, "boxes": boxes, "classes": classes, "mask": mask}
    tparams = D.teacher_params(teacher)
    init = D.init_state(student, teacher, features=True)
    base = _hyp(warmup_epochs=0.0)
    ref, m0 = step(init, tparams, batch, base, jax.random.key(0))
    assert np.all(np.asarray(m0["kd"]) == 0)
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])  # noqa: E731
    for k in GFL.kd_keys:
        st, m = step(init, tparams, batch, {**base, k: jnp.float32(1.0)}, jax.random.key(0))
        assert bool(m["finite"]) and float(m["loss"]) > float(m0["loss"]), k
        assert not np.array_equal(flat(st.params), flat(ref.params)), k
        adapters_moved = not np.array_equal(flat(st.aux["params"]), flat(ref.aux["params"]))
        assert adapters_moved == (k == "ld_feat"), k


def test_distillation_checks_name_what_differs():
    student = jaxyolo.create_model(TINY, num_classes=2, abstract=True)
    D.check_compatible(student, jaxyolo.create_model("gfl-n", num_classes=2, abstract=True))  # widths may differ
    with pytest.raises(ConfigError, match="classes 3, the student gfl_tiny has 2"):
        D.check_compatible(student, jaxyolo.create_model(TINY, num_classes=3, abstract=True))
    table = yaml.safe_load(Path(TINY).read_text())
    table["head"] = {**table.get("head", {}), "reg_max": 5}
    other = GFL.resolve(table, name="gfl-r5", nc=2)
    with pytest.raises(ConfigError, match="reg_max"):
        GFL.check_distill(student, type("Det", (), {"spec": other})())
    with pytest.raises(ConfigError, match="cannot teach"):
        D.check_compatible(student, jaxyolo.create_model("yolov4p", num_classes=2, abstract=True))


NUM_CLASSES = 5  # R.DATA's synthetic classes
LD_HYP = {"ld_main": 0.25, "ld_vlr": 0.25, "ld_cls": 1.0, "ld_feat": 0.1}


def test_train_with_a_gfl_teacher(runs_root, tmp_path):
    """`jaxyolo train --model TINY --teacher T --kd-features`: every LD column is reported, the
    saved weights are the student's."""
    teacher_dir = jaxyolo.create_model("gfl-n", num_classes=NUM_CLASSES, seed=1).save(tmp_path / "teacher")
    hyp = tmp_path / "ld.yaml"
    hyp.write_text(yaml.safe_dump(LD_HYP))
    argv = list(R.TRAIN_ARGS)
    argv[argv.index("--model") + 1] = TINY
    argv[argv.index("--epochs") + 1] = "1"
    argv += ["--hyp", str(hyp), "--teacher", str(teacher_dir), "--kd-features", "--out", str(tmp_path / "run")]
    with R.data_cache(runs_root):
        code, out, err = R.cli_main(argv)
    assert code == 0, err[-3000:]
    with (tmp_path / "run" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    kd = [float(rows[0][f"train/kd_{t}"]) for t in GFL.kd_terms]
    assert all(math.isfinite(v) and v > 0 for v in kd), kd
    det = jaxyolo.load(tmp_path / "run" / "weights" / "last")
    assert det.family.name == "gfl" and det.num_params() == jaxyolo.create_model(TINY, num_classes=NUM_CLASSES).num_params()
