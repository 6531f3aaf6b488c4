"""Model family: parameter counts and FLOPs against the spec, blocks against PyTorch, KST semantics."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import IMG, perturbed
from flax import nnx

import jaxyolo
from jaxyolo.models import config as mcfg
from jaxyolo.models import layers as L
from jaxyolo.models.yolo import apply


# Spec §6 (measured on the reference code).
@pytest.mark.parametrize(
    "name, head, kst, params",
    [
        ("yolov4s", "detect", 1, 9_329_581),
        ("yolov4s", "implicit", 1, 9_331_242),
        ("yolov4s", "implicit", 3, 9_334_564),
        ("yolov4l", "detect", 1, 52_924_765),
        ("yolov4l", "implicit", 1, 52_927_322),
    ],
)
def test_parameter_counts_match_the_reference(name, head, kst, params):
    det = jaxyolo.create_model(name, head=head, kst=kst, abstract=True)
    assert det.num_params() == params


@pytest.mark.parametrize("name, gflops", [("yolov4s", 21.17), ("yolov4l", 120.24)])
def test_gflops_at_640_within_one_percent(name, gflops):
    got = jaxyolo.create_model(name, abstract=True).gflops(640)
    assert abs(got - gflops) / gflops < 0.01


def test_layer_table_sums_and_spec_rows():
    det = jaxyolo.create_model("yolov4s", head="detect", abstract=True)
    rows = det.layer_table(640)
    assert sum(r["params"] for r in rows) == det.num_params()
    assert sum(r["gflops"] for r in rows) == pytest.approx(det.gflops(640))
    # docs/reference.md §4 per-layer parameters for YOLOv4s: layers 6, 11, 16 and the Detect head
    by_index = {r["index"]: r for r in rows}
    assert by_index[6]["params"] == 161_152
    assert by_index[11]["params"] == 1_904_640
    assert by_index[16]["params"] == 247_296
    assert by_index[31]["params"] == 229_245
    # layer 22 of YOLOv4s: 3x3 stride-1 conv 64 -> 128 channels on the 80x80 grid
    assert by_index[22]["gflops"] == pytest.approx(2 * 80 * 80 * 128 * 64 * 9 / 1e9)


def test_output_shapes_and_decode_layout(tiny, images):
    raw = tiny.forward_raw(images)
    assert [r.shape for r in raw] == [(2, 3, IMG // s, IMG // s, 8) for s in (8, 16, 32)]
    out = np.asarray(tiny.decode(raw))
    assert out.shape == (2, 3 * sum((IMG // s) ** 2 for s in (8, 16, 32)), 8)
    # hand-decode one prediction: level P4, anchor 2, cell (y=3, x=1)
    p = np.asarray(raw[1])[1, 2, 3, 1]
    sig = 1 / (1 + np.exp(-p.astype(np.float64)))
    xy = (2 * sig[:2] - 0.5 + np.array([1, 3])) * 16
    wh = (2 * sig[2:4]) ** 2 * np.array([72, 146])
    row = 3 * (IMG // 8) ** 2 + 2 * (IMG // 16) ** 2 + 3 * (IMG // 16) + 1
    np.testing.assert_allclose(out[1, row], np.concatenate([xy, wh, sig[4:]]), rtol=1e-5, atol=1e-4)


def test_detect_bias_prior():
    det = jaxyolo.create_model("yolov4p", head="detect", num_classes=80)
    sd = det.state_dict()
    bound = 1 / np.sqrt(sd["model.31.m.0.weight"].shape[1])  # default init U(-bound, bound) underneath
    for i, s in enumerate((8, 16, 32)):
        b = sd[f"model.31.m.{i}.bias"].reshape(3, 85)
        obj = np.log(8 / (640 / s) ** 2)
        assert np.all(np.abs(b[:, 4] - obj) <= bound)
        assert np.all(np.abs(b[:, 5:] - np.log(0.6 / (80 - 0.99))) <= bound)
        assert np.all(np.abs(b[:, :4]) <= bound)
    assert np.log(8 / (640 / 8) ** 2) == pytest.approx(-6.6846, abs=1e-4)  # docs/reference.md §5 value


def test_builder_rules_for_small_scale():
    _, table = mcfg.load_table("yolov4s")
    spec = mcfg.resolve(table)
    # docs/reference.md §2: 8 -> round(2.64) = 3 inner bottlenecks, 4 -> round(1.32) = 1, 2 -> round(0.66) = 1
    assert [spec.layers[i].n for i in (4, 6, 8, 10, 16)] == [1, 3, 3, 1, 1]
    assert spec.strides == (8, 16, 32)
    assert [spec.layers[i].c_out for i in (22, 26, 30)] == [128, 256, 512]


# --- blocks against PyTorch (the reference framework), where torch is installed ---------------------

def test_stride2_conv_padding_matches_torch():
    torch = pytest.importorskip("torch")
    conv = L.Conv2d(4, 6, 3, 2, bias=True, rngs=nnx.Rngs(0))
    x = np.random.default_rng(0).normal(size=(2, 10, 10, 4)).astype(np.float32)
    ours = np.asarray(conv(jnp.asarray(x)))
    w = torch.from_numpy(np.transpose(np.asarray(conv.weight[...]), (3, 2, 0, 1)).copy())
    b = torch.from_numpy(np.array(conv.bias[...]))
    ref = torch.nn.functional.conv2d(torch.from_numpy(x).permute(0, 3, 1, 2), w, b, stride=2, padding=1)
    np.testing.assert_allclose(ours, ref.permute(0, 2, 3, 1).numpy(), atol=1e-5)


def test_max_pool_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(1, 11, 11, 3)).astype(np.float32) - 5  # negative: pads must be -inf
    for k in (5, 9, 13):
        ours = np.asarray(L.max_pool_same(jnp.asarray(x), k))
        ref = torch.nn.functional.max_pool2d(torch.from_numpy(x).permute(0, 3, 1, 2), k, 1, k // 2)
        np.testing.assert_array_equal(ours, ref.permute(0, 2, 3, 1).numpy())


def test_batchnorm_train_step_matches_torch():
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(2, 3, size=(4, 5, 5, 6)).astype(np.float32)
    bn = L.BatchNorm2d(6)
    ours = np.asarray(bn(jnp.asarray(x), train=True))
    tbn = torch.nn.BatchNorm2d(6, eps=1e-3, momentum=0.03).train()
    ref = tbn(torch.from_numpy(x).permute(0, 3, 1, 2)).permute(0, 2, 3, 1).detach().numpy()
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.running_mean[...]), tbn.running_mean.numpy(), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(bn.running_var[...]), tbn.running_var.numpy(), rtol=1e-5)


def test_mish_and_silu():
    x = np.linspace(-5, 5, 11)
    np.testing.assert_allclose(np.asarray(L.mish(jnp.asarray(x))), x * np.tanh(np.log1p(np.exp(x))), rtol=1e-5)
    np.testing.assert_allclose(np.asarray(L.activation("silu")(jnp.asarray(x))), x / (1 + np.exp(-x)), rtol=1e-5)


# --- KST --------------------------------------------------------------------------------------------

def test_kst_inference_equals_model_with_mean_candidates(tiny, images):
    """Independent truth: a K=1 implicit model whose vectors are the candidates' mean."""
    sd = tiny.state_dict()
    for k in [k for k in sd if k.endswith("implicit")]:
        sd[k] = sd[k].mean(axis=0, keepdims=True)
    k1 = jaxyolo.create_model("yolov4p", num_classes=3, kst=1).load_state_dict(sd)
    for a, b in zip(tiny.forward_raw(images), k1.forward_raw(images)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)


def test_kst_index_selects_that_candidate_pair(tiny, images):
    i, j = 2, 0
    sd = tiny.state_dict()
    for k in [k for k in sd if k.endswith("implicit")]:
        sd[k] = sd[k][[i if ".ia." in k else j]]
    k1 = jaxyolo.create_model("yolov4p", num_classes=3, kst=1).load_state_dict(sd)
    for a, b in zip(tiny.forward_raw(images, kst_index=(i, j)), k1.forward_raw(images)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5, rtol=1e-5)


def test_all_kst_pairs_in_one_vmapped_call_equal_a_loop(tiny, images):
    table = tiny.forward_all_kst(images)
    assert table[0].shape[:2] == (3, 3)
    for i in range(3):
        for j in range(3):
            for lvl, ref in enumerate(tiny.forward_raw(images, kst_index=(i, j))):
                np.testing.assert_allclose(np.asarray(table[lvl][i, j]), np.asarray(ref), atol=1e-5, rtol=1e-5)
    assert not np.allclose(np.asarray(table[0][0, 0]), np.asarray(table[0][2, 1]))  # candidates differ


@pytest.mark.parametrize("draw", ["step", "level", "image"])
def test_training_draws_follow_the_sharing_option(draw, images):
    det = perturbed(jaxyolo.create_model("yolov4p", num_classes=3, kst=3, kst_draw=draw))
    graphdef, state = nnx.split(det.model)
    x = jnp.asarray(images)
    by_pair = jax.jit(jax.vmap(lambda idx: apply(graphdef, state, x, train=True, kst_index=idx)[0]))
    by_key = jax.jit(jax.vmap(lambda key: apply(graphdef, state, x, train=True, key=key)[0]))
    pairs_list = [(i, j) for i in range(3) for j in range(3)]
    pair_out = [np.asarray(o) for o in by_pair(jnp.array(pairs_list))]
    combos = {p: [o[n] for o in pair_out] for n, p in enumerate(pairs_list)}
    key_out = [np.asarray(o) for o in by_key(jax.random.split(jax.random.key(0), 12))]
    seen = set()
    for seed in range(12):
        out = [o[seed] for o in key_out]
        # which pair explains each (level, image)?
        pairs = {(lvl, b): [p for p, ref in combos.items() if np.allclose(out[lvl][b], ref[lvl][b], atol=1e-5)]
                 for lvl in range(3) for b in range(2)}
        assert all(len(v) == 1 for v in pairs.values())  # every slice is exactly one candidate pair
        chosen = {k: v[0] for k, v in pairs.items()}
        if draw == "step":
            assert len(set(chosen.values())) == 1
        elif draw == "level":
            assert all(chosen[(lvl, 0)] == chosen[(lvl, 1)] for lvl in range(3))
        seen |= set(chosen.values())
    assert len(seen) >= 5  # the draws really vary across keys


def test_training_a_kst_head_without_key_is_an_error(tiny, images):
    graphdef, state = nnx.split(tiny.model)
    with pytest.raises(jaxyolo.ConfigError, match="key"):
        apply(graphdef, state, jnp.asarray(images), train=True)


# --- fold -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kst_index", [None, (1, 2)])
def test_fold_keeps_outputs(tiny, images, kst_index):
    folded = tiny.fold(kst_index=kst_index)
    assert folded.kst == 0 and folded.options.fused
    sd = folded.state_dict()
    assert not any("running" in k or "implicit" in k for k in sd)
    ref = tiny.forward_raw(images, kst_index=kst_index)
    for a, b in zip(ref, folded.forward_raw(images)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)
    assert folded.num_params() < tiny.num_params()


def test_fold_implicit_only_gives_reference_detect_keys(tiny, images):
    plain = tiny.fold(bn=False)
    keys = list(plain.state_dict())
    assert keys == [k for k in tiny.state_dict() if ".ia." not in k and ".im." not in k]
    for a, b in zip(tiny.forward_raw(images), plain.forward_raw(images)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4, rtol=1e-4)


def test_bad_inputs_are_named():
    with pytest.raises(jaxyolo.ConfigError, match="unknown model"):
        jaxyolo.create_model("yolov9z")
    with pytest.raises(jaxyolo.ConfigError, match="head"):
        jaxyolo.create_model("yolov4p", head="anchorfree")
    with pytest.raises(jaxyolo.ConfigError, match="kst"):
        jaxyolo.create_model("yolov4p", kst=0)
    with pytest.raises(jaxyolo.ConfigError, match="act"):
        jaxyolo.create_model("yolov4p", act="gelu9")
    with pytest.raises(jaxyolo.ConfigError, match="abstract=True"):
        jaxyolo.create_model("yolov4p", abstract=True).forward_raw(np.zeros((1, 64, 64, 3), np.float32))
    det = jaxyolo.create_model("yolov4p", num_classes=2)
    with pytest.raises(jaxyolo.ConfigError, match="multiples of 32"):
        det.forward_raw(np.zeros((1, 50, 64, 3), np.float32))
    with pytest.raises(jaxyolo.ConfigError, match="NHWC"):
        det.forward_raw(np.zeros((1, 3, 64, 64), np.float32))


def test_bad_model_table_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("depth_multiple: 1\nwidth_multiple: 1\nanchors: [[1,2]]\n"
                   "backbone: [[-1, 1, Foo, [8]]]\nhead: [[[0], 1, Detect, [nc, anchors]]]\n")
    with pytest.raises(jaxyolo.ConfigError, match="layer 0: unknown module 'Foo'"):
        jaxyolo.create_model(bad)
    bad.write_text("depth_multiple: 1\nbackbone: []\n")
    with pytest.raises(jaxyolo.ConfigError, match="missing field 'width_multiple'"):
        jaxyolo.create_model(bad)
