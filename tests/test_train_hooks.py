"""The open training state: `TrainState.extras`, the step hooks a method installs (`StepHooks`),
named snapshots of the training state and `fit` rewinding to one. Runs on the tests' toy family
(tests/helpers/toy_family.py: a model that compiles in seconds)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import toy_family as toy
from helpers import train_runs as R
from helpers.train_case import batch as fixed_batch

import jaxyolo
from jaxyolo import hyp as H
from jaxyolo import train_step as T
from jaxyolo.errors import ConfigError
from jaxyolo.train_loop import fit, read_state
from jaxyolo.train_options import TrainOptions

CFG = T.TrainConfig(epochs=1, batches_per_epoch=6, batch_size=8, img_size=64, nominal_batch=8, min_warmup_iters=1,
                    augment=False)


def _setup(pop: int):
    det = jaxyolo.create_model(toy.TABLE, num_classes=5, seed=0)
    hyp = H.stack([H.load_hyp({"lr0": 0.05, "warmup_epochs": 0}, num_levels=1, family=det.family)] * pop)
    batch = {k: jnp.asarray(v) for k, v in fixed_batch(seed=1, size=64, n=8, max_boxes=4).items()}
    return det, hyp, batch


def _run(det, hooks, states, hyp, batch, steps: int = 5):
    step = T.population_step(T.make_train_step(det, CFG, hooks=hooks), T.make_mesh(1, 1), donate=False)
    for i in range(steps):
        states, _ = step(states, batch, hyp, jax.random.split(jax.random.key(i), hyp["lr0"].shape[0]))
    return states


def _masking_hooks():
    """Weights under a per-member 0/1 mask (held in extras): pruned weights get no gradient and are
    put back to zero after every optimiser step, as a pruning method does."""
    mul = lambda tree, m: jax.tree.map(lambda a, b: a * b, tree, m)  # noqa: E731
    return T.StepHooks(grads=lambda g, p, e, h: mul(g, e["mask"]), params=lambda new, old, e, h: mul(new, e["mask"]))


def test_masks_in_extras_hold_through_the_population_step():
    det, hyp, batch = _setup(2)
    start = T.init_state(det)
    masks = []
    for m in range(2):  # each member prunes a different random half of every leaf
        keys = iter(jax.random.split(jax.random.key(10 + m), len(jax.tree.leaves(start.params))))
        masks.append(jax.tree.map(lambda p: jax.random.bernoulli(next(keys), 0.5, p.shape).astype(p.dtype),
                                  start.params))
    members = [T.with_run(start.replace(params=jax.tree.map(jnp.multiply, start.params, mk),
                                        extras={"mask": mk}), CFG) for mk in masks]
    states = jax.tree.map(lambda *xs: jnp.stack(xs), *members)
    out = _run(det, _masking_hooks(), states, hyp, batch)
    for m in range(2):
        p, mk, p0 = T.member(out.params, m), masks[m], T.member(states.params, m)
        pruned = [np.asarray(a)[np.asarray(b) == 0] for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(mk))]
        assert all(np.all(x == 0) for x in pruned)
        moved = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(p), jax.tree.leaves(p0)))
        assert moved > 0
        np.testing.assert_array_equal(np.asarray(jax.tree.leaves(T.member(out.extras, m))[0]),
                                      np.asarray(jax.tree.leaves(mk)[0]))


def test_a_params_hook_keeps_a_frozen_layer_bit_for_bit():
    det, hyp, batch = _setup(1)

    def in_stem0(path):
        keys = [getattr(k, "key", getattr(k, "idx", None)) for k in path]
        return keys[:2] == ["stem", 0]

    def keep_stem0(new, old, extras, hyp):
        return jax.tree_util.tree_map_with_path(lambda path, n, o: o if in_stem0(path) else n, new, old)

    start = T.replicate(T.with_run(T.init_state(det), CFG), 1)
    out = _run(det, T.StepHooks(params=keep_stem0), start, hyp, batch)
    frozen = zip(jax.tree.leaves(out.params["stem"][0]), jax.tree.leaves(start.params["stem"][0]))
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in frozen)
    assert not np.array_equal(np.asarray(jax.tree.leaves(out.params["head"])[0]),
                              np.asarray(jax.tree.leaves(start.params["head"])[0]))


def _options(out, changes: dict | None = None):
    base = {"model.name": toy.TABLE, "data.source": R.DATA, "data.img_size": R.IMG, "data.batch_size": R.BATCH,
            "optim.nominal_batch": R.BATCH, "recipe.min_warmup_iters": 2, "optim.epochs": 2, "seed": 0,
            "eval.plots": False}
    return TrainOptions().updated({**base, **(changes or {}), "out": str(out)})


COUNTING = T.StepHooks(init=lambda s: s.replace(extras={"iterations": jnp.zeros((), jnp.int32)}),
                       extras=lambda e, s, h: {"iterations": e["iterations"] + 1})


class _Stop(Exception):
    pass


def test_extras_are_saved_and_resumed_with_the_state(data_env, tmp_path):
    full = fit(_options(tmp_path / "full"), hooks=COUNTING)
    assert int(read_state(tmp_path / "full" / "state")["extras"]["iterations"][0]) == 2 * R.NB

    def stop_after_first_epoch(event):
        if event["event"] == "epoch":
            raise _Stop

    with pytest.raises(_Stop):
        fit(_options(tmp_path / "cut"), hooks=COUNTING, progress=stop_after_first_epoch)
    fit(_options(tmp_path / "cut"), hooks=COUNTING, resume=True)
    a, b = read_state(tmp_path / "full" / "state"), read_state(tmp_path / "cut" / "state")
    assert int(b["extras"]["iterations"][0]) == 2 * R.NB
    for x, y in zip(jax.tree.leaves(a["params"]), jax.tree.leaves(b["params"])):
        np.testing.assert_array_equal(x, y)
    assert full.history[-1]["iterations"] == 2 * R.NB


def test_a_snapshot_rewinds_a_run_to_its_iteration(data_env, tmp_path):
    """`snapshots=(k,)` keeps the training state of iteration k (and its weights as a detector);
    a run rewound to it continues from iteration k and ends where the original run ended."""
    k = 1
    fit(_options(tmp_path / "a", {"checkpoint.snapshots": (k,)}))
    snap = tmp_path / "a" / "snapshots" / f"iter{k}"
    assert snap.is_dir() and jaxyolo.load(tmp_path / "a" / "weights" / f"iter{k}").family.name == "toy"
    assert int(read_state(snap)["step"][0]) == k
    events = []
    run = fit(_options(tmp_path / "b", {"checkpoint.rewind": str(snap)}), progress=events.append)
    assert [e for e in events if e["event"] == "start"][0]["step"] == k
    a, b = read_state(tmp_path / "a" / "state"), read_state(tmp_path / "b" / "state")
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(x, y)
    assert run.history[-1]["iterations"] == 2 * R.NB


def test_rewinding_to_a_snapshot_of_another_shape_is_refused(data_env, tmp_path):
    fit(_options(tmp_path / "a", {"checkpoint.snapshots": (1,)}))
    with pytest.raises(ConfigError, match="rewind"):
        fit(_options(tmp_path / "b", {"checkpoint.rewind": str(tmp_path / "a" / "snapshots" / "iter1"),
                                      "data.batch_size": 4, "optim.nominal_batch": 4}))
    with pytest.raises(ConfigError, match="rewind"):
        fit(_options(tmp_path / "c", {"checkpoint.rewind": str(tmp_path / "nowhere")}))
    fit(_options(tmp_path / "d", {"checkpoint.snapshots": (1,)}), hooks=COUNTING)  # a snapshot holding a method's extras
    with pytest.raises(ConfigError, match="rewind .*extras"):
        fit(_options(tmp_path / "e", {"checkpoint.rewind": str(tmp_path / "d" / "snapshots" / "iter1")}))
