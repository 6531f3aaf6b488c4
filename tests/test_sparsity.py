"""N:M structured sparsity (`jaxyolo.sparsity`): masks against hand-computed ones, the rule of
which kernels are pruned, masks that stay fixed and exact through training (weights and EMA),
an exported ONNX file whose every group of 4 input channels holds 2 zeros, and
`jaxyolo train --sparsity 2:4` end to end with its report."""

from __future__ import annotations

import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import train_runs as R

import jaxyolo
from jaxyolo import families
from jaxyolo import hyp as H
from jaxyolo import sparsity as S
from jaxyolo import train_step as T
from jaxyolo.errors import ConfigError

TINY = str(Path(__file__).parent / "helpers" / "gfl_tiny.yaml")


def _kernel(groups):
    """A (1, 1, 4·len(groups), 1) kernel from groups of 4 input-channel weights."""
    return jnp.asarray(np.concatenate(groups), jnp.float32).reshape(1, 1, -1, 1)


def test_masks_keep_the_largest_magnitudes_of_each_group():
    w = _kernel([[0.1, -3.0, 2.0, 0.5], [4.0, 0.0, -0.2, 0.3]])
    np.testing.assert_array_equal(np.ravel(S.nm_mask(w)), [0, 1, 1, 0, 1, 0, 0, 1])
    # equal magnitudes: the lower channels win, so the mask is still exactly 2 of 4
    np.testing.assert_array_equal(np.ravel(S.nm_mask(_kernel([[1.0, -1.0, 1.0, 1.0]]))), [1, 1, 0, 0])
    # 1:4 keeps one; groups run along the input channels of every (kh, kw, cout) separately
    np.testing.assert_array_equal(np.ravel(S.nm_mask(_kernel([[0.1, -3.0, 2.0, 0.5]]), S.Pattern(1, 4))), [0, 1, 0, 0])
    w3 = jnp.stack([_kernel([[1.0, 2.0, 3.0, 4.0]])[..., 0], _kernel([[4.0, 3.0, 2.0, 1.0]])[..., 0]], -1)
    m3 = np.asarray(S.nm_mask(w3))
    np.testing.assert_array_equal(m3[0, 0, :, 0], [0, 0, 1, 1])
    np.testing.assert_array_equal(m3[0, 0, :, 1], [1, 1, 0, 0])


def test_pattern_parse():
    assert S.Pattern.parse("2:4") == S.Pattern(2, 4) and str(S.Pattern.parse(" 1:8 ")) == "1:8"
    for bad in ("4:2", "2-4", "0:4", "4:4"):
        with pytest.raises(ConfigError, match="sparsity"):
            S.Pattern.parse(bad)


def test_which_kernels_are_pruned():
    det = jaxyolo.create_model(TINY, num_classes=2, seed=0)
    rows = {r["name"]: r for r in S.layer_report(T.split_model(det.model)[1])}
    stem = [r for n, r in rows.items() if n.startswith("backbone.stem")]
    assert stem and not any(r["prunable"] for r in stem)  # 3 input channels
    depthwise = [r for r in rows.values() if r["shape"][2] == 1]
    assert depthwise and not any(r["prunable"] for r in depthwise)  # one input channel per group
    pruned = [r for r in rows.values() if r["prunable"]]
    assert pruned and all(r["shape"][2] % 4 == 0 for r in pruned)
    assert all(r["prunable"] for r in rows.values() if r["shape"][2] % 4 == 0)


def _batch(seed):
    rng = np.random.default_rng(seed)
    boxes = np.asarray([[[4, 4, 30, 40], [30, 30, 60, 60]], [[10, 10, 50, 30], [0, 0, 0, 0]]], np.float32)
    return {"image": rng.integers(0, 255, (2, 64, 64, 3), np.uint8), "boxes": boxes,
            "classes": np.asarray([[0, 1], [1, 0]]), "mask": np.asarray([[True, True], [True, False]])}


def test_masks_stay_fixed_and_exact_through_training():
    det = jaxyolo.create_model(TINY, num_classes=2, seed=0)
    cfg = T.TrainConfig(epochs=1, batches_per_epoch=4, batch_size=2, img_size=64, nominal_batch=2,
                        min_warmup_iters=1, augment=False)
    hooks = S.hooks("2:4")
    step = jax.jit(T.make_train_step(det, cfg, hooks=hooks))
    hyp = H.as_arrays(H.load_hyp(overrides={"warmup_epochs": 0.0}, family=families.get("gfl")))
    start = hooks.init(T.init_state(det))
    want = S.masks(T.init_state(det).params)  # from the starting weights
    for a, b in zip(jax.tree.leaves(start.extras["sparsity"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    state = start
    for i in range(4):
        state, m = step(state, _batch(i), hyp, jax.random.key(i))
        assert bool(m["finite"])
    for tree in (state.params, state.ema_params):
        report = S.check(tree)
        assert report["exact"] and report["prunable_zeros"] >= report["prunable_weights"] // 2
    # the masks did not move, the kept weights did
    for a, b in zip(jax.tree.leaves(state.extras["sparsity"]), jax.tree.leaves(want)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    moved = [not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in
             zip(jax.tree.leaves(state.params), jax.tree.leaves(start.params))]
    assert sum(moved) > len(moved) // 2


def onnx_groups(path):
    """(groups checked, groups with more than 2 non-zeros) over the ONNX file's convolution weights
    (OIHW) whose input channels per group are a multiple of 4."""
    onnx = pytest.importorskip("onnx")
    from onnx import numpy_helper

    model = onnx.load(str(path))
    weights = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    for node in model.graph.node:  # constants, and the layout transposes of constant kernels
        if node.op_type == "Constant":
            weights[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
        elif node.op_type == "Transpose" and node.input[0] in weights:
            weights[node.output[0]] = np.transpose(weights[node.input[0]], list(node.attribute[0].ints))
    checked = bad = 0
    for node in model.graph.node:
        if node.op_type != "Conv" or node.input[1] not in weights:
            continue
        w = weights[node.input[1]]
        o, i, kh, kw = w.shape
        if i % 4:
            continue
        nz = (w.reshape(o, i // 4, 4, kh, kw) != 0).sum(2)
        checked += nz.size
        bad += int(np.sum(nz > 2))
    return checked, bad


def test_train_with_sparsity_reports_and_exports_exact_2_4(runs_root, tmp_path):
    """`jaxyolo train --weights DENSE --sparsity 2:4`: sparsity.json holds AP dense, pruned and
    fine-tuned and exact final weights; the saved weights and their ONNX export are 2:4."""
    dense = jaxyolo.create_model(TINY, num_classes=5, seed=3).save(tmp_path / "dense")
    argv = list(R.TRAIN_ARGS)
    argv[argv.index("--model") + 1] = TINY
    argv[argv.index("--epochs") + 1] = "1"
    argv += ["--weights", str(dense), "--sparsity", "2:4", "--out", str(tmp_path / "run")]
    with R.data_cache(runs_root):
        code, out, err = R.cli_main(argv)
    assert code == 0, err[-3000:]
    # no --hyp: the gfl family's default recipe file
    assert json.loads((tmp_path / "run" / "options.json").read_text())["hyp"] == "gfl"
    report = json.loads((tmp_path / "run" / "sparsity.json").read_text())
    assert report["pattern"] == "2:4" and report["masks"]["exact"] and report["weights"][0]["exact"]
    for stage in ("dense", "pruned", "fine_tuned"):
        assert 0.0 <= report[stage][0]["AP"] <= 1.0, stage
    det = jaxyolo.load(tmp_path / "run" / "weights" / "last")
    params = T.split_model(det.model)[1]
    assert S.check(params)["exact"]
    det.export_onnx(tmp_path / "sparse.onnx", img_size=64)
    checked, bad = onnx_groups(tmp_path / "sparse.onnx")
    assert checked > 0 and bad == 0
    # the same count finds a dense export not 2:4
    jaxyolo.load(dense).export_onnx(tmp_path / "dense.onnx", img_size=64)
    assert onnx_groups(tmp_path / "dense.onnx")[1] > 0
