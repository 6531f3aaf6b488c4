"""The train step: schedule, optimiser, EMA, population vmap, device mesh, non-finite skip."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import train_case as case
from helpers.train_runs import run_on_eight_devices

from jaxyolo import hyp as H
from jaxyolo import train_step as T
from jaxyolo.models import norm


def test_schedule_matches_reference_formulas():
    cfg = T.TrainConfig(epochs=10, batches_per_epoch=100, batch_size=16, img_size=64, min_warmup_iters=50)
    hyp = H.as_arrays(H.load_hyp(overrides={"warmup_epochs": 2.0}))
    nw = 200  # max(round(2 * 100), 50)
    for ni in (0, 57, 199, 200, 201, 350, 999):
        epoch = ni // 100
        lf = ((1 + math.cos(math.pi * epoch / 10)) / 2) * (1 - 0.2) + 0.2
        if ni <= nw:
            f = ni / nw
            want = (0.1 + f * (0.01 * lf - 0.1), f * 0.01 * lf, 0.8 + f * (0.937 - 0.8),
                    max(1, round(1 + f * (64 / 16 - 1))))
        else:
            want = (0.01 * lf, 0.01 * lf, 0.937, 4)
        got = [float(x) for x in T.schedule(jnp.asarray(ni), hyp, cfg)]
        np.testing.assert_allclose(got, want, rtol=1e-5, err_msg=f"iteration {ni}")
    lin = T.lr_factor(5, 0.2, 10, "linear")
    assert abs(float(lin) - (0.5 * 0.8 + 0.2)) < 1e-6


def test_param_groups_follow_reference_names():
    det, _ = case.setup()
    groups = T.param_groups(det)
    names = [k for k in det.state_dict() if not k.endswith(("running_mean", "running_var", "num_batches_tracked",
                                                            "anchors", "anchor_grid"))]
    got = jax.tree.leaves(groups)
    assert len(got) == len(names)
    want = {}
    for k in names:
        if k.endswith("implicit") or (".bn." in k or k.split(".")[-2] == "bn") and k.endswith("weight"):
            want[k] = T.GROUP_NO_DECAY
        elif k.endswith("bias"):
            want[k] = T.GROUP_BIAS
        else:
            want[k] = T.GROUP_DECAY
    assert sorted(got) == sorted(want.values())
    assert sum(v == T.GROUP_NO_DECAY for v in got) == sum(1 for k in names if k.endswith("implicit")) + \
        sum(1 for k in names if k.endswith("bn.weight"))


def test_sgd_matches_torch_nesterov_groups():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    params = {"w": rng.normal(size=(3, 4)).astype(np.float32), "b": rng.normal(size=(4,)).astype(np.float32),
              "g": rng.normal(size=(4,)).astype(np.float32)}
    groups = {"w": T.GROUP_DECAY, "b": T.GROUP_BIAS, "g": T.GROUP_NO_DECAY}
    tp = {k: torch.nn.Parameter(torch.tensor(v)) for k, v in params.items()}
    topt = torch.optim.SGD([{"params": [tp["g"]]}, {"params": [tp["w"]], "weight_decay": 5e-3},
                            {"params": [tp["b"]]}], lr=0.1, momentum=0.9, nesterov=True)
    opt = T.yolo_sgd(groups)
    jp = {k: jnp.asarray(v) for k, v in params.items()}
    buf = opt.init(jp)
    for it, (lr_b, lr_o, mom) in enumerate([(0.1, 0.0, 0.8), (0.05, 0.02, 0.85), (0.01, 0.01, 0.937)]):
        grads = {k: rng.normal(size=v.shape).astype(np.float32) for k, v in params.items()}
        for i, grp in enumerate(topt.param_groups):
            grp["lr"] = lr_b if i == 2 else lr_o
            grp["momentum"] = mom
        for k in tp:
            tp[k].grad = torch.tensor(grads[k])
        topt.step()
        upd, buf = opt.update({k: jnp.asarray(v) for k, v in grads.items()}, buf, jp, lr_bias=lr_b, lr_other=lr_o,
                              momentum=jnp.float32(mom), weight_decay=jnp.float32(5e-3))
        jp = jax.tree.map(jnp.add, jp, upd)
        for k in tp:
            np.testing.assert_allclose(np.asarray(jp[k]), tp[k].detach().numpy(), rtol=1e-5, atol=1e-6,
                                       err_msg=f"{k} after step {it}")


def test_ema_decay_formula():
    for u in (1, 10, 2000, 100000):
        assert abs(float(T.ema_decay(jnp.float32(u))) - 0.9999 * (1 - math.exp(-u / 2000))) < 1e-6
        for tau in (50.0, 200.0):
            assert abs(float(T.ema_decay(jnp.float32(u), jnp.float32(tau))) - 0.9999 * (1 - math.exp(-u / tau))) < 1e-6


@pytest.fixture(scope="module")
def single():
    """The tiny case's step for one member, compiled once for this module."""
    det, cfg = case.setup()
    return det, jax.jit(T.make_train_step(det, cfg))


@pytest.mark.parametrize("tau", [2000.0, 3.0])
def test_accumulation_and_ema_follow_the_step_counter(single, tau):
    det, step = single
    # warm-up 0 epochs -> the 1-iteration floor; nominal batch = 2 x batch; the EMA's tau is the
    # reference's 2000, or 3 optimiser steps (where the decay's ramp shows within these steps)
    hyp = {**H.as_arrays(case.hyps()[0]), "ema_tau": jnp.float32(tau)}
    st = T.init_state(det)
    flat = lambda tree: np.concatenate([np.ravel(np.asarray(x)) for x in jax.tree.leaves(tree)])
    did = []
    for i in range(5):
        before, ema_before = flat(st.params), flat(st.ema_params)
        st, m = step(st, case.batch(0), hyp, jax.random.key(i))
        did.append(bool(m["optimizer_step"]))
        changed = not np.array_equal(before, flat(st.params))
        assert changed == did[-1]
        if did[-1]:  # ema <- d ema + (1 - d) weights, d = 0.9999 (1 - exp(-updates / tau))
            d = 0.9999 * (1 - math.exp(-int(st.ema_updates) / tau))
            want = d * ema_before + (1 - d) * flat(st.params)
            np.testing.assert_allclose(flat(st.ema_params), want, rtol=1e-5, atol=1e-7)
        else:
            np.testing.assert_array_equal(flat(st.ema_params), ema_before)
    # accumulate = round(1 + frac) is 1 at ni=0 and 2 from ni=1 (end of warm-up) on; a step happens
    # when ni - last_opt_step >= accumulate
    assert did == [True, False, True, False, True]
    assert int(st.ema_updates) == 3


def test_population_vmap_equals_separate_runs(single):
    det, step = single
    hyps = case.hyps()
    separate = []
    for m, hp in enumerate(hyps):
        st = T.init_state(det)
        for s in range(case.STEPS):
            st, _ = step(st, case.batch(s), H.as_arrays(hp), jax.random.split(jax.random.key(s), 2)[m])
        separate.append(st)
    params, _ = case.run_mesh(1, 1)
    init = _flat(T.init_state(det).params)
    for m in range(2):
        assert_same_training(_flat(params, m), _flat(separate[m].params), init)
    # the members really differ
    moved = np.linalg.norm(_flat(params, 1) - init)
    assert np.linalg.norm(_flat(params, 0) - _flat(params, 1)) > 0.1 * moved


def _flat(tree, member=None):
    return np.concatenate([np.ravel(x if member is None else x[member]) for x in jax.tree.leaves(tree)])


def assert_same_training(a, b, init, rounding: float = 0.0):
    """Two runs of the same training agree when their difference is tiny against how far training
    moved the weights: float sums over a batch are reordered by vmap and by sharding (relative
    gradient differences ~1e-5), and three SGD steps carry those on. `rounding`: the difference
    a mere reordering of sums gave this case, of which 3× is also accepted."""
    moved = np.linalg.norm(b - init)
    assert moved > 0
    assert np.linalg.norm(a - b) < max(1e-3 * moved, 3 * rounding), (np.linalg.norm(a - b), moved, rounding)


def test_eight_fake_devices_equal_one(tmp_path):
    """pop=2 × data=4 on 8 host devices against pop=1 × data=1 here: the same numbers, within the
    spread that reordering float sums alone gives this case (its second member's rate amplifies
    rounding: BatchNorm summed in another order on one device moves its weights by ~6e-3 of the
    distance trained)."""
    out = tmp_path / "eight.npz"
    eight = run_on_eight_devices("train_case", out, 2, 4)
    params, loss = case.run_mesh(1, 1)
    np.testing.assert_allclose(eight["loss"], loss, rtol=1e-4)
    old, norm.NARROW_C = norm.NARROW_C, 0  # every BatchNorm on the 4-D view: sums in another order
    try:
        reordered, _ = case.run_mesh(1, 1)
    finally:
        norm.NARROW_C = old
    leaves = jax.tree.leaves(params)
    init = _flat(T.init_state(case.setup()[0]).params)
    for m in range(2):
        got = np.concatenate([np.ravel(eight[f"p{i}"][m]) for i in range(len(leaves))])
        noise = np.linalg.norm(_flat(reordered, m) - _flat(params, m))
        assert_same_training(got, _flat(params, m), init, rounding=noise)


def test_nonfinite_loss_skips_and_counts(single):
    det, step = single
    hyp = H.as_arrays(case.hyps()[0])
    st0 = T.init_state(det)
    st, m = step(st0, case.batch(0), {**hyp, "box": jnp.float32(np.nan)}, jax.random.key(0))
    assert not bool(m["finite"]) and not bool(m["optimizer_step"])
    assert int(st.nonfinite_run) == 1 and int(st.nonfinite_total) == 1 and int(st.step) == 1
    for a, b in zip(jax.tree.leaves((st.params, st.stats, st.grads, st.momentum)),
                    jax.tree.leaves((st0.params, st0.stats, st0.grads, st0.momentum))):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    st, m = step(st, case.batch(0), hyp, jax.random.key(1))
    assert bool(m["finite"]) and int(st.nonfinite_run) == 0 and int(st.nonfinite_total) == 1


def test_clip_grad_scales_the_step_to_the_max_norm(single):
    """With weight decay 0 the first step is linear in the gradient g, so clipping to c = |g| / 4
    moves every weight by exactly a quarter of the unclipped step, and a max above |g| changes
    nothing. |g| comes from the same iteration run without an optimiser step (summed only), and
    is the `grad_norm` the step reports whatever the clipping. `clip_grad` is a limit per 64 summed
    images: the limit of a step that sums one iteration of B images is clip_grad·B/64, of one that
    sums two iterations twice that."""
    det, step = single
    hyp = {**H.as_arrays(case.hyps()[0]), "weight_decay": jnp.float32(0.0)}
    st0 = T.init_state(det)
    key, batch = jax.random.key(3), case.batch(0)
    per_64 = T.CLIP_IMAGES / batch["image"].shape[0]  # clip_grad for a limit of 1 on one iteration
    summed, m = step(st0.replace(last_opt_step=jnp.int32(0)), batch, {**hyp, "clip_grad": jnp.float32(0.0)}, key)
    assert not bool(m["optimizer_step"])
    norm = float(np.linalg.norm(_flat(summed.grads)))
    assert norm > 0
    start = _flat(st0.params)
    moved = {}
    for c in (0.0, norm / 4, norm * 10):
        st, m = step(st0, batch, {**hyp, "clip_grad": jnp.float32(c * per_64)}, key)
        assert bool(m["optimizer_step"])
        moved[c] = _flat(st.params) - start
        want_scale = 1.0 if c in (0.0, norm * 10) else 0.25
        np.testing.assert_allclose(float(m["clip_scale"]), want_scale, rtol=1e-4)
        np.testing.assert_allclose(float(m["grad_norm"]), norm, rtol=1e-5)  # reported before clipping
    # (a moved weight is new - old in float32: about 1e-7 of the weight's own size is rounding)
    np.testing.assert_allclose(moved[norm / 4], moved[0.0] / 4, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(moved[norm * 10], moved[0.0])
    # the same clip_grad on a step summing two iterations' images (the gradients are this one's):
    # a limit twice as high
    _, m = step(st0.replace(last_opt_step=jnp.int32(-2)), batch, {**hyp, "clip_grad": jnp.float32(norm / 4 * per_64)},
                key)
    assert bool(m["optimizer_step"])
    np.testing.assert_allclose(float(m["clip_scale"]), 0.5, rtol=1e-4)


def test_one_compiled_step_serves_runs_of_any_length():
    """With the run length in the state (`with_run`), runs of other epochs, batches per epoch and
    warm-up floors reuse one compiled step, and each follows its own schedule: the lr the step
    reports equals `schedule` computed from that run's TrainConfig constants."""
    det, base = case.setup()
    step = jax.jit(T.make_train_step(det, base))
    hyp = H.as_arrays(case.hyps()[0])
    import dataclasses

    runs = [base, dataclasses.replace(base, epochs=7, batches_per_epoch=3, min_warmup_iters=5)]
    for cfg in runs:
        st = T.with_run(T.init_state(det), cfg)
        for ni in range(3):
            st, m = step(st, case.batch(ni), hyp, jax.random.key(ni))
            want = T.schedule(jnp.asarray(ni), hyp, cfg)  # the constants' schedule
            np.testing.assert_allclose(float(m["lr"]), float(want[1]), rtol=1e-6)
    assert step._cache_size() == 1
    # the two runs really have different schedules at those iterations
    assert float(T.schedule(jnp.asarray(2), hyp, runs[0])[1]) != float(T.schedule(jnp.asarray(2), hyp, runs[1])[1])


def test_reference_recipes_keep_the_reference_optimiser_and_the_default_guards_it():
    for name in ("reference-s", "reference-csp"):
        assert H.load_hyp(name)["clip_grad"] == 0.0 and H.load_hyp(name)["ema_tau"] == 2000.0
    assert H.load_hyp("default")["clip_grad"] == 50.0 and H.load_hyp("default")["ema_tau"] == 200.0
    # a yolov5-style file without the keys gets the default's
    assert H.load_hyp({})["clip_grad"] == 50.0 and H.load_hyp({})["ema_tau"] == 200.0
    assert float(T.clip_scale(jnp.float32(20.0), jnp.float32(10.0))) == pytest.approx(10 / (20 + 1e-6))


def test_pad_population_repeats_last_member():
    tree = {"a": jnp.arange(3.0)}
    padded, n = T.pad_population(tree, 4)
    assert n == 3 and padded["a"].tolist() == [0.0, 1.0, 2.0, 2.0]
    assert T.pad_population(tree, 3)[0]["a"].shape == (3,)


def test_default_augmentation_reads_the_host_batch():
    """TrainConfig(augment=True) without an augment_fn augments the host batch dict itself
    (`augment.augment_host_batch`): with every augmentation gain at 0 it is the identity, so one
    step equals the un-augmented step on the same batch."""
    import dataclasses

    det, cfg = case.setup()
    hyp = H.as_arrays({**case.hyps()[0], **{k: 0.0 for k in ("hsv_h", "hsv_s", "hsv_v", "degrees", "translate",
                                                                 "scale", "shear", "perspective", "flipud",
                                                                 "fliplr", "mosaic", "mixup")}})
    plain = jax.jit(T.make_train_step(det, cfg))
    augmented = jax.jit(T.make_train_step(det, dataclasses.replace(cfg, augment=True)))
    a, ma = plain(T.init_state(det), case.batch(0), hyp, jax.random.key(0))
    b, mb = augmented(T.init_state(det), case.batch(0), hyp, jax.random.key(0))
    for k in ma:
        np.testing.assert_allclose(np.asarray(mb[k]), np.asarray(ma[k]), rtol=1e-4, atol=1e-6, err_msg=k)
    for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
        np.testing.assert_allclose(np.asarray(y), np.asarray(x), rtol=1e-4, atol=1e-6)
