"""Distillation (`jaxyolo.distill`): each term against NumPy, the step against the train step,
gradients that reach only the student, the population and the device mesh, the teacher-output
cache, and `jaxyolo train --teacher` end to end (student-only weights, kd columns, exact resume).

The student is the train case's `yolov4p`, the teacher a wider `yolov4n` (tests/helpers/distill_case.py);
the compiled steps are shared through module-scoped fixtures.
"""

from __future__ import annotations

import csv
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import yaml
from helpers import distill_case as dcase
from helpers import train_case as case
from helpers import train_runs as R
from helpers.state_files import saved_state
from test_train_step import assert_same_training

import jaxyolo
from jaxyolo import distill as D
from jaxyolo import hyp as H
from jaxyolo import train_step as T
from jaxyolo.errors import ConfigError
from jaxyolo.train_loop import fit
from jaxyolo.train_options import TrainOptions

# ------------------------------------------------------------------------ the terms against NumPy


def sig(x):
    return 1.0 / (1.0 + np.exp(-x))


def bce(x, y):
    return -(y * np.log(sig(x)) + (1 - y) * np.log(1 - sig(x)))


def box(r):
    y = sig(r[..., 0:4])
    return np.concatenate([2 * y[..., 0:2] - 0.5, (2 * y[..., 2:4]) ** 2], -1)


@pytest.fixture(scope="module")
def arrays():
    """Raw outputs of two levels (B=2, na=3, 4x4 and 2x2, nc=3) and features (C 5 -> 7)."""
    rng = np.random.default_rng(0)
    raw = lambda hw: rng.normal(0, 2, (2, 3, hw, hw, 8)).astype(np.float32)  # noqa: E731
    feat = lambda hw, c: rng.normal(0, 1, (2, hw, hw, c)).astype(np.float32)  # noqa: E731
    return {"s": [raw(4), raw(2)], "t": [raw(4), raw(2)], "fs": [feat(4, 5), feat(2, 5)],
            "ft": [feat(4, 7), feat(2, 7)],
            "adapters": {"P3": {"kernel": rng.normal(0, 0.5, (5, 7)).astype(np.float32),
                                "bias": rng.normal(0, 0.1, (7,)).astype(np.float32)},
                         "P4": {"kernel": rng.normal(0, 0.5, (5, 7)).astype(np.float32),
                                "bias": rng.normal(0, 0.1, (7,)).astype(np.float32)}}}


def f64(x):
    return np.asarray(x, np.float64)


def test_objectness_term_is_bce_to_the_teachers_probability(arrays):
    # by hand: logits 0 against a teacher at logit 0 (p = 1/2) cost log 2 per cell
    z = jnp.zeros((1, 1, 2, 2, 6))
    assert float(D.objectness_kd(z, z)) == pytest.approx(math.log(2), rel=1e-6)
    s, t = f64(arrays["s"][0]), f64(arrays["t"][0])
    want = np.mean(bce(s[..., 4], sig(t[..., 4])))
    assert float(D.objectness_kd(arrays["s"][0], arrays["t"][0])) == pytest.approx(want, rel=1e-5)


@pytest.mark.parametrize("temperature", [1.0, 3.0])
def test_class_term_is_objectness_scaled_and_tempered(arrays, temperature):
    s, t = f64(arrays["s"][0]), f64(arrays["t"][0])
    w = sig(t[..., 4])
    per_cell = np.mean(bce(s[..., 5:] / temperature, sig(t[..., 5:] / temperature)), -1)
    want = temperature ** 2 * np.sum(w * per_cell) / max(np.sum(w), 1.0)
    got = float(D.class_kd(arrays["s"][0], arrays["t"][0], jnp.float32(temperature)))
    assert got == pytest.approx(want, rel=1e-5)
    # the weights normalise by max(sum, 1): a teacher that sees nothing gives a small loss, not 0/0
    t_empty = arrays["t"][0].copy()
    t_empty[..., 4] = -30.0
    assert 0 < float(D.class_kd(arrays["s"][0], t_empty, jnp.float32(temperature))) < 1e-6


@pytest.mark.parametrize("conf", [0.3, 0.9])
def test_box_term_is_l2_on_the_confident_cells(arrays, conf):
    s, t = f64(arrays["s"][0]), f64(arrays["t"][0])
    m = sig(t[..., 4]) > conf
    assert 0 < m.sum() < m.size
    want = np.sum(m * np.sum((box(s) - box(t)) ** 2, -1)) / max(m.sum(), 1)
    assert float(D.box_kd(arrays["s"][0], arrays["t"][0], jnp.float32(conf))) == pytest.approx(want, rel=1e-5)
    # by hand: one confident cell, student centre logit 0 (offset 0.5), teacher's large (offset 1.5)
    one_s, one_t = np.zeros((1, 1, 1, 1, 6), np.float32), np.zeros((1, 1, 1, 1, 6), np.float32)
    one_t[..., 0], one_t[..., 4] = 30.0, 30.0
    assert float(D.box_kd(one_s, one_t, jnp.float32(conf))) == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("masked", [False, True])
def test_feature_term_is_adapted_l2(arrays, masked):
    ad = arrays["adapters"]["P3"]
    a = f64(arrays["fs"][0]) @ f64(ad["kernel"]) + f64(ad["bias"])
    e = np.mean((a - f64(arrays["ft"][0])) ** 2, -1)
    w = np.max(sig(f64(arrays["t"][0])[..., 4]), axis=1) if masked else None
    want = np.sum(w * e) / max(np.sum(w), 1.0) if masked else np.mean(e)
    got = D.feature_kd(arrays["fs"][0], arrays["ft"][0], ad["kernel"], ad["bias"],
                       None if w is None else jnp.asarray(w, jnp.float32))
    assert float(got) == pytest.approx(want, rel=1e-5)


def test_distill_loss_weights_and_sums_the_levels(arrays):
    hyp = H.as_arrays(H.load_hyp(overrides={"kd_obj": 1.5, "kd_cls": 0.7, "kd_box": 0.2, "kd_feat": 0.3,
                                            "kd_T": 2.0, "kd_conf": 0.4, "balance": [4.0, 1.0, 0.4]}))
    total, terms = D.distill_loss(arrays["s"], arrays["t"], hyp, features=arrays["fs"],
                                  teacher_features=arrays["ft"], adapters=arrays["adapters"])
    want = []
    for lvl, name in enumerate(("P3", "P4")):
        s, t = f64(arrays["s"][lvl]), f64(arrays["t"][lvl])
        lo = np.mean(bce(s[..., 4], sig(t[..., 4]))) * [4.0, 1.0][lvl]
        w = sig(t[..., 4])
        lc = 4.0 * np.sum(w * np.mean(bce(s[..., 5:] / 2, sig(t[..., 5:] / 2)), -1)) / max(w.sum(), 1)
        m = sig(t[..., 4]) > 0.4
        lb = np.sum(m * np.sum((box(s) - box(t)) ** 2, -1)) / max(m.sum(), 1)
        ad = arrays["adapters"][name]
        e = np.mean((f64(arrays["fs"][lvl]) @ f64(ad["kernel"]) + f64(ad["bias"]) - f64(arrays["ft"][lvl])) ** 2, -1)
        wf = np.max(w, axis=1)
        lf = np.sum(wf * e) / max(wf.sum(), 1)
        want.append(np.asarray([lo, lc, lb, lf]) * np.asarray([1.5, 0.7, 0.2, 0.3]) * (3 / 2))
    want = np.stack(want)
    np.testing.assert_allclose(np.asarray(terms["kd_local"]), want, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(terms["kd"]), want.sum(0), rtol=1e-5)
    assert float(total) == pytest.approx(want.sum() * 2, rel=1e-5)  # × batch size, like the detection loss
    # a one-class model has no class term; without features no feature term
    one = [x[..., :6] for x in arrays["s"]], [x[..., :6] for x in arrays["t"]]
    _, terms1 = D.distill_loss(*one, hyp)
    assert np.asarray(terms1["kd"])[1] == 0 and np.asarray(terms1["kd"])[3] == 0 and np.asarray(terms1["kd"])[0] > 0


# ------------------------------------------------------------------------------------- the step


@pytest.fixture(scope="module")
def pair():
    """(student, teacher, config, jitted distill step with feature imitation, jitted train step)."""
    student, teacher, cfg = dcase.setup()
    distill = jax.jit(D.make_distill_step(student, teacher, cfg, features=True))
    train = jax.jit(T.make_train_step(student, cfg))
    return student, teacher, cfg, distill, train


def _run(step, state, hyp, n, *shared):
    for s in range(n):
        state, metrics = step(state, *shared, case.batch(s), hyp, jax.random.key(s))
    return state, metrics


def _fields(state):
    return {k: getattr(state, k) for k in ("step", "params", "stats", "momentum", "grads", "last_opt_step",
                                           "ema_params", "ema_stats", "ema_updates", "nonfinite_run")}


def test_zero_kd_weights_give_the_train_step_bit_exactly(pair):
    student, teacher, _, distill, train = pair
    # kd weights are 0 by default; temperature and threshold away from theirs so the terms are live
    hyp = H.as_arrays({**case.hyps()[0], "kd_T": 2.0, "kd_conf": 0.3})
    a, ma = _run(distill, D.init_state(student, teacher, features=True), hyp, 2, D.teacher_params(teacher))
    b, mb = _run(train, T.init_state(student), hyp, 2)
    assert bool(ma["optimizer_step"]) or int(a.ema_updates) > 0
    fa, fb = _fields(a), _fields(b)
    for k in fa:
        for x, y in zip(jax.tree.leaves(fa[k]), jax.tree.leaves(fb[k])):
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y), err_msg=k)
    for k in ("loss", "local", "global", "lr", "finite", "optimizer_step"):
        np.testing.assert_array_equal(np.asarray(ma[k]), np.asarray(mb[k]), err_msg=k)
    assert np.all(np.asarray(ma["kd"]) == 0)


def test_kd_gradient_reaches_only_the_student(pair):
    student, teacher, _, distill, _ = pair
    tparams = D.teacher_params(teacher)
    before = [np.array(x) for x in jax.tree.leaves(tparams)]
    base = H.as_arrays({**dcase.hyps()[0], **{k: 0.0 for k in D.KD_KEYS}})
    init = D.init_state(student, teacher, features=True)
    ref, m0 = distill(init, tparams, case.batch(0), base, jax.random.key(0))
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
    ref_p = flat(ref.params)
    for k in D.KD_KEYS:  # each weight on its own changes the student's update
        st, m = distill(init, tparams, case.batch(0), {**base, k: jnp.float32(0.5)}, jax.random.key(0))
        assert bool(m["finite"]) and float(m["loss"]) > float(m0["loss"]), k
        assert not np.array_equal(flat(st.params), ref_p), k
        adapters_moved = not all(np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
                                 zip(jax.tree.leaves(st.aux["params"]), jax.tree.leaves(ref.aux["params"])))
        assert adapters_moved == (k == "kd_feat"), k  # the adapters learn from the feature term only
    # the teacher's state is an input, never changed
    for x, y in zip(jax.tree.leaves(tparams), before):
        np.testing.assert_array_equal(np.asarray(x), y)

    # zero teacher gradients by construction (its forward runs under stop_gradient), while the
    # student's raw outputs, features and the adapters get gradients
    fwd = D.teacher_forward_fn(teacher, features=True)
    images = T.batch_images(case.batch(0))[:2]
    hyp = H.as_arrays(dcase.hyps()[0])
    adapters = init.aux["params"]
    rng = np.random.default_rng(1)
    s_raw = [jnp.asarray(rng.normal(0, 1, (2, 3, 64 // s, 64 // s, 7)), jnp.float32) for s in (8, 16, 32)]
    c_s = [student.spec.layers[j].c_out for j in student.spec.head.inputs]
    s_feat = [jnp.asarray(rng.normal(0, 1, (2, 64 // s, 64 // s, c)), jnp.float32) for s, c in zip((8, 16, 32), c_s)]

    def kd(s_raw, s_feat, adapters, tp):
        t_raw, t_feat = fwd(tp, images)
        return D.distill_loss(s_raw, t_raw, hyp, features=s_feat, teacher_features=t_feat, adapters=adapters)[0]

    g_raw, g_feat, g_ad, g_t = jax.jit(jax.grad(kd, argnums=(0, 1, 2, 3)))(s_raw, s_feat, adapters, tparams)
    assert all(not np.any(np.asarray(x)) for x in jax.tree.leaves(g_t))
    for g in (g_raw, g_feat, g_ad):
        assert all(np.any(np.asarray(x)) for x in jax.tree.leaves(g))


def _flat(tree, member=None):
    return np.concatenate([np.ravel(x if member is None else x[member]) for x in jax.tree.leaves(tree)])


@pytest.fixture(scope="module")
def one_device():
    """The population run of distill_case on a 1 × 1 mesh (params, adapters, loss, kd)."""
    return dcase.run_mesh(1, 1)


def test_population_of_students_equals_separate_runs(pair, one_device):
    student, teacher, _, distill, _ = pair
    params, adapters, loss, kd = one_device
    tparams = D.teacher_params(teacher)
    init = D.init_state(student, teacher, features=True)
    init_flat = _flat((init.params, init.aux["params"]))
    for m, hp in enumerate(dcase.hyps()):
        st = init
        for s in range(dcase.STEPS):
            st, metrics = distill(st, tparams, case.batch(s), H.as_arrays(hp), jax.random.split(jax.random.key(s), 2)[m])
        assert_same_training(_flat((params, adapters), m), _flat((st.params, st.aux["params"])), init_flat)
        np.testing.assert_allclose(np.asarray(metrics["kd"]), kd[m], rtol=1e-3, atol=1e-7)
        assert np.all(kd[m] > 0)
    moved = np.linalg.norm(_flat((params, adapters), 1) - init_flat)
    assert np.linalg.norm(_flat((params, adapters), 0) - _flat((params, adapters), 1)) > 0.1 * moved


def test_eight_fake_devices_equal_one(runs_root, one_device):
    """pop=2 × data=4 on 8 host devices against pop=1 × data=1 here: the same numbers."""
    eight = R.distill_on_eight_devices(runs_root)
    params, adapters, loss, kd = one_device
    np.testing.assert_allclose(eight["loss"], loss, rtol=1e-4)
    np.testing.assert_allclose(eight["kd"], kd, rtol=1e-3, atol=1e-7)
    student, teacher, _ = dcase.setup()
    init = D.init_state(student, teacher, features=True)
    init_flat = _flat((init.params, init.aux["params"]))
    n = len(jax.tree.leaves((params, adapters)))
    for m in range(2):
        got = np.concatenate([np.ravel(eight[f"p{i}"][m]) for i in range(n)])
        assert_same_training(got, _flat((params, adapters), m), init_flat)


def test_teacher_output_cache_gives_the_same_step(pair):
    student, teacher, cfg, distill, _ = pair
    batches = [case.batch(0), case.batch(1)]
    cached_batches = D.teacher_outputs(teacher, batches, features=True)
    assert [r.shape for r in cached_batches[0]["teacher_raw"]] == [(case.BATCH, 3, 64 // s, 64 // s, 7)
                                                                   for s in (8, 16, 32)]
    cached = jax.jit(D.make_distill_step(student, teacher, cfg, features=True, cached_teacher=True))
    hyp = H.as_arrays(dcase.hyps()[0])
    tparams = D.teacher_params(teacher)
    a = b = D.init_state(student, teacher, features=True)
    for s, (plain, with_t) in enumerate(zip(batches, cached_batches)):
        a, ma = distill(a, tparams, plain, hyp, jax.random.key(s))
        b, mb = cached(b, None, with_t, hyp, jax.random.key(s))
    for k in ("loss", "kd", "local"):
        np.testing.assert_allclose(np.asarray(mb[k]), np.asarray(ma[k]), rtol=1e-5, atol=1e-8, err_msg=k)
    init_flat = _flat((D.init_state(student, teacher, features=True).params,))
    assert_same_training(_flat((b.params,)), _flat((a.params,)), init_flat)
    with pytest.raises(ConfigError, match="augment"):
        D.make_distill_step(student, teacher, T.TrainConfig(epochs=1, batches_per_epoch=1, batch_size=8,
                                                            img_size=64), cached_teacher=True)


def test_teacher_must_share_anchors_strides_and_classes():
    cfg = case.setup()[1]
    student = jaxyolo.create_model("yolov4p", num_classes=2, abstract=True)
    wider = jaxyolo.create_model("yolov4n", num_classes=2, abstract=True)
    D.check_compatible(student, wider)  # widths and depths may differ
    other_nc = jaxyolo.create_model("yolov4n", num_classes=3, abstract=True)
    with pytest.raises(ConfigError, match=r"teacher yolov4n: 3 classes, the student yolov4p has 2"):
        D.make_distill_step(student, other_nc, cfg)
    anchors = [[10, 13, 16, 30, 33, 23], [30, 61, 62, 45, 59, 119], [116, 90, 156, 198, 373, 326]]
    other_anchors = jaxyolo.create_model("yolov4n", num_classes=2, anchors=anchors, abstract=True)
    with pytest.raises(ConfigError, match="anchors"):
        D.make_distill_step(student, other_anchors, cfg)


# ---------------------------------------------------------------------- jaxyolo train --teacher


NUM_CLASSES = 5  # R.DATA's synthetic classes
KD_HYP = {"kd_obj": 1.0, "kd_cls": 0.5, "kd_box": 0.05, "kd_feat": 0.1, "kd_T": 2.0, "kd_conf": 0.3}
EPOCHS = 1  # of R.NB iterations: enough for a resume mid-epoch, half the validation of R.EPOCHS


@pytest.fixture(scope="module")
def distill_run(runs_root, tmp_path_factory):
    """`jaxyolo train --teacher T --kd-features` on the shared tiny data, R's settings for 1 epoch."""
    root = tmp_path_factory.mktemp("distill")
    teacher_dir = dcase.teacher(NUM_CLASSES).save(root / "teacher")
    hyp = root / "kd.yaml"
    hyp.write_text(yaml.safe_dump({**H.load_hyp("reference-s"), **KD_HYP}))
    argv = list(R.TRAIN_ARGS)
    argv[argv.index("--epochs") + 1] = str(EPOCHS)
    argv += ["--hyp", str(hyp), "--teacher", str(teacher_dir), "--kd-features"]
    with R.data_cache(runs_root):
        code, out, err = R.cli_main(argv + ["--out", str(root / "run")])
    assert code == 0, err[-3000:]
    return root, argv, out


def test_train_with_teacher_saves_the_student(distill_run):
    root, _, stdout = distill_run
    run = root / "run"
    with (run / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    for r in rows:
        kd = [float(r[f"train/kd_{t}"]) for t in D.KD_TERMS]
        assert all(math.isfinite(v) and v > 0 for v in kd), kd
        assert all(math.isfinite(float(r[c])) for c in r if c.startswith(("train/", "val/")))
    assert "kd " in stdout  # the epoch line reports the distillation loss
    # the saved weights are the student's alone: loadable, the student's keys and size
    student = jaxyolo.create_model("yolov4p", num_classes=NUM_CLASSES, kst=3, seed=0)
    for name in ("last", "best"):
        det = jaxyolo.load(run / "weights" / name)
        assert det.spec.name == "yolov4p" and det.num_params() == student.num_params()
        assert list(det.state_dict()) == list(student.state_dict())
    # the adapters are part of the training state (so a resume is exact), not of the weights
    st = saved_state(run, EPOCHS * R.NB)
    assert sorted(st["aux"]["params"]) == ["P3", "P4", "P5"]
    assert st["aux"]["params"]["P3"]["kernel"].shape == (1, 16, 32)  # (members, yolov4p C, yolov4n C)
    assert json.loads((run / "options.json").read_text())["distill"]["features"] is True


class _Stop(Exception):
    pass


def test_distill_run_resumes_exactly(distill_run, runs_root, tmp_path):
    root, argv, _ = distill_run
    from jaxyolo.tools import cli, train_cmd

    out = tmp_path / "run"
    opts = train_cmd.options_from_args(cli.build_parser().parse_args(argv + ["--save-every", "1", "--out", str(out)]))
    stop_at = (EPOCHS - 1) * R.NB  # the last epoch's first iteration

    def stop(info):  # interrupt mid-epoch, once the state after iteration `stop_at` is on disk
        if info["event"] == "step" and info["step"] == stop_at:
            raise _Stop

    with R.data_cache(runs_root):
        with pytest.raises(_Stop):
            fit(opts, progress=stop)
        assert sorted(int(p.name) for p in (out / "state").iterdir() if p.name.isdigit()) == [stop_at + 1]
        fit(opts, resume=True)
    ref = root / "run"
    total = EPOCHS * R.NB
    a, b = saved_state(ref, total), saved_state(out, total)
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    different = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb) if not np.array_equal(x, y)]
    assert not different, different[:10]
    with (ref / "results.csv").open() as f, (out / "results.csv").open() as g:
        ra, rb = list(csv.DictReader(f)), list(csv.DictReader(g))
    untimed = lambda r: {k: v for k, v in r.items() if k != "time_s" and not k.startswith("time/")}
    assert [untimed(r) for r in ra] == [untimed(r) for r in rb]


def test_a_teacher_with_other_classes_is_refused(data_env, tmp_path):
    teacher_dir = jaxyolo.create_model("yolov4p", num_classes=3, seed=0).save(tmp_path / "teacher")
    out = tmp_path / "run"
    code, _, err = R.cli_main(R.TRAIN_ARGS + ["--teacher", str(teacher_dir), "--out", str(out)])
    assert code == 2 and "3 classes" in err and "5" in err, err[-2000:]
    assert not out.exists()
    with pytest.raises(ConfigError, match="needs a teacher"):
        fit(TrainOptions().updated({"model.name": "yolov4p", "data.source": R.DATA, "data.img_size": R.IMG,
                                    "data.batch_size": R.BATCH, "optim.epochs": 1, "out": str(tmp_path / "x"),
                                    "distill.features": True}))
