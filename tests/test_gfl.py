"""The gfl family: EfficientNet-Lite sizes against the published ones, the PAN's resampling, ATSS on
hand-built boxes, QFL / DFL / GIoU at hand-computed points, the GFLv2 quality branch, and the
family through the shared machinery (population, mesh)."""

from __future__ import annotations

import math
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxyolo
from jaxyolo import gfl_loss as G
from jaxyolo.errors import ConfigError
from jaxyolo.models import efficientnet_lite as effnet
from jaxyolo.models.gfl import downsample2, upsample2

TINY = str(Path(__file__).parent / "helpers" / "gfl_tiny.yaml")


# the ImageNet classifiers' published parameter counts (EfficientNet-Lite model cards), in millions
PUBLISHED_M = {"lite0": 4.65, "lite1": 5.42, "lite2": 6.09, "lite3": 8.20, "lite4": 13.01}


@pytest.mark.parametrize("variant", sorted(PUBLISHED_M))
def test_efficientnet_lite_tables_have_the_published_sizes(variant):
    spec = effnet.resolve({"variant": variant})
    assert round(effnet.classifier_params(spec) / 1e6, 2) == PUBLISHED_M[variant]


def test_the_built_backbone_holds_the_classifiers_parameters_but_its_head():
    from flax import nnx

    spec = effnet.resolve({"variant": "lite0"})
    model = effnet.EfficientNetLite(spec, act="relu6", rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    head = 320 * 1280 + 2 * 1280 + 1280 * 1000 + 1000  # 1x1 conv + BN to 1280, then the classifier
    assert n == effnet.classifier_params(spec) - head
    fused = effnet.resolve({"width": 0.5, "stages": [[1, 3, 1, 16, 1, 1], [6, 3, 2, 24, 2, 1], [6, 5, 2, 40, 1]],
                            "out_stages": [1, 2]})
    model = effnet.EfficientNetLite(fused, act="relu6", rngs=nnx.Rngs(0))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == effnet.classifier_params(fused) - (24 * 1280 + 2 * 1280 + 1280 * 1000 + 1000)
    # fused stages hold plain convolutions, the others depthwise ones
    assert model.stages[0][0].dw.conv.groups == model.stages[1][0].dw.conv.groups == 1
    assert model.stages[2][0].dw.conv.groups == model.stages[2][0].dw.conv.weight.shape[-1] > 1
    # Lite keeps the stem at 32 channels and the first and last stages at one block at every size
    big = effnet.resolve({"variant": "lite4"})
    assert big.stem == 32 and big.stages[0].repeats == 1 and big.stages[-1].repeats == 1
    assert big.out_strides == (8, 16, 32)


def test_bad_backbone_tables_are_named():
    with pytest.raises(ConfigError, match="backbone.variant"):
        effnet.resolve({"variant": "lite9"})
    with pytest.raises(ConfigError, match="stages"):
        effnet.resolve({"stages": [[6, 4, 2, 24, 1]]})  # an even kernel
    with pytest.raises(ConfigError, match="unknown key"):
        effnet.resolve({"widht": 1.0})


def test_pan_resampling_is_bilinear_with_half_pixel_centres():
    x = jnp.asarray([[0.0, 4.0], [8.0, 12.0]])[None, :, :, None]
    up = np.asarray(upsample2(x))[0, :, :, 0]
    row = lambda a, b: [a, 0.75 * a + 0.25 * b, 0.25 * a + 0.75 * b, b]  # noqa: E731
    top, bottom = row(0.0, 4.0), row(8.0, 12.0)
    want = np.asarray([row(t, b) for t, b in zip(top, bottom)]).T
    np.testing.assert_allclose(up, want)
    np.testing.assert_allclose(np.asarray(downsample2(up[None, :, :, None]))[0, :, :, 0],
                               [[np.mean(up[:2, :2]), np.mean(up[:2, 2:])], [np.mean(up[2:, :2]), np.mean(up[2:, 2:])]])


# ATSS on a 32 x 32 image, strides 8 and 16, anchors 2 x stride, top-2 per level. Points: level 0
# at 4, 12, 20, 28 (index = row * 4 + column), level 1 at 8, 24 (index 16 + row * 2 + column).
PTS, ST = G.points([(4, 4), (2, 2)], (8, 16))
A = [2, 2, 18, 12]  # centre (10, 7)
B = [5, 0, 18, 10]  # centre (11.5, 5)
PAD = [0, 0, 32, 32]


def _assign(boxes, mask):
    return G.atss_assign(PTS, ST, [16, 4], jnp.asarray(boxes, jnp.float32), jnp.asarray(mask), topk=2,
                         anchor_scale=2.0)


def test_atss_assigns_hand_computed_points():
    """Box A: candidates (by centre distance) points 1 (12, 4) and 5 (12, 12) on level 0, 16 (8, 8)
    and 17 (24, 8) on level 1; their anchors' IoUs with A are 140/276, 112/304, 160/1024 and
    100/1084; mean 0.28104 + std 0.19150 = 0.47254, which only point 1 (0.50725) reaches, and its
    centre lies inside A. A padded box, which would cover the image, takes nothing."""
    assigned, idx = _assign([A, PAD], [True, False])
    assert np.flatnonzero(np.asarray(assigned)).tolist() == [1]
    assert int(idx[1]) == 0
    ious = np.asarray(G.box_iou(jnp.asarray([A], jnp.float32),
                                jnp.asarray([[4, -4, 20, 12], [4, 4, 20, 20], [-8, -8, 24, 24], [8, -8, 40, 24]],
                                            jnp.float32)))[0]
    np.testing.assert_allclose(ious, [140 / 276, 112 / 304, 160 / 1024, 100 / 1084], rtol=1e-6)
    sd = np.std(ious, ddof=1)
    assert ious.mean() + sd == pytest.approx(0.47254, abs=1e-4)


def test_a_point_positive_for_two_boxes_takes_the_one_of_higher_iou():
    """Box B's candidates are the same four points; IoUs 130/256, 78/308, 130/1024, 100/1054, so its
    threshold is 0.43334 and point 1 is positive for B too: 0.50781 for B beats 0.50725 for A."""
    assigned, idx = _assign([A, B, PAD], [True, True, False])
    assert np.flatnonzero(np.asarray(assigned)).tolist() == [1]
    assert int(idx[1]) == 1


def test_quality_focal_loss_at_hand_computed_points():
    beta = 2.0
    # sigma(0) = 0.5 against a soft target 0.8: ln 2 x 0.3^2; sigma(ln 3) = 0.75 against 0: ln 4 x 0.75^2
    got = G.quality_focal_loss(jnp.asarray([0.0, math.log(3.0)]), jnp.asarray([0.8, 0.0]), beta)
    np.testing.assert_allclose(got, [math.log(2) * 0.09, math.log(4) * 0.5625], rtol=1e-6)
    got = G.quality_focal_loss_prob(jnp.asarray([0.5, 0.75]), jnp.asarray([0.8, 0.0]), beta)
    np.testing.assert_allclose(got, [math.log(2) * 0.09, math.log(4) * 0.5625], rtol=1e-5)
    # a perfect score costs nothing
    assert float(G.quality_focal_loss_prob(jnp.asarray(0.8), jnp.asarray(0.8), beta)) == pytest.approx(0, abs=1e-7)


def test_distribution_focal_loss_at_hand_computed_points():
    bins = 8
    flat = jnp.zeros((4 * bins,))  # uniform: -ln(1/8) whatever the target
    np.testing.assert_allclose(G.distribution_focal_loss(flat, jnp.full((4,), 2.3), bins), [math.log(8)] * 4, rtol=1e-6)
    logits = jnp.zeros((4, bins)).at[:, 2].set(math.log(3.0)).reshape(-1)  # p2 = 0.3, p3 = 0.1
    np.testing.assert_allclose(G.distribution_focal_loss(logits, jnp.full((4,), 2.25), bins),
                               [-(0.75 * math.log(0.3) + 0.25 * math.log(0.1))] * 4, rtol=1e-6)


def test_giou_and_the_expected_distance():
    a, b = jnp.asarray([0.0, 0, 2, 2]), jnp.asarray([1.0, 1, 3, 3])
    assert float(G.aligned_iou(a, b)) == pytest.approx(1 / 7, rel=1e-6)
    assert float(G.aligned_iou(a, b, giou=True)) == pytest.approx(1 / 7 - 2 / 9, rel=1e-5)
    logits = jnp.full((4, 8), -1e9).at[:, 3].set(0.0).reshape(-1)  # all mass on bin 3
    np.testing.assert_allclose(G.distances(logits, 8), [3.0] * 4)


def test_the_quality_branch_scales_the_class_scores():
    v1 = jaxyolo.create_model(TINY, num_classes=3, seed=0)
    v2 = jaxyolo.create_model(TINY, num_classes=3, seed=0, dgqp=True)
    x = jax.random.uniform(jax.random.key(1), (2, 64, 64, 3))
    r1, r2 = v1.model(x), v2.model(x)
    bins = v1.spec.bins
    assert [r.shape for r in r1] == [(2, 8, 8, 3 + 4 * bins), (2, 4, 4, 3 + 4 * bins), (2, 2, 2, 3 + 4 * bins)]
    assert [r.shape[-1] for r in r2] == [3 + 4 * bins + 1] * 3
    p1, p2 = v1.family.decode(r1, v1.spec), v2.family.decode(r2, v2.spec)
    assert p1.scores.shape == p2.scores.shape == (2, 84, 3)
    q = jax.nn.sigmoid(jnp.concatenate([r.reshape(2, -1, r.shape[-1])[..., -1:] for r in r2], 1))
    np.testing.assert_allclose(p2.scores, jax.nn.sigmoid(jnp.concatenate(
        [r.reshape(2, -1, r.shape[-1])[..., :3] for r in r2], 1)) * q, rtol=1e-6)


def test_the_loss_reports_each_term_per_level_and_is_finite_with_no_boxes():
    det = jaxyolo.create_model(TINY, num_classes=3, seed=0)
    raw = det.model(jax.random.uniform(jax.random.key(0), (2, 64, 64, 3)))
    hyp = {"gfl_cls": 1.0, "gfl_box": 2.0, "gfl_dfl": 0.25, "qfl_beta": 2.0}
    boxes = jnp.asarray([[[4, 4, 30, 40], [0, 0, 0, 0]], [[10, 20, 60, 50], [32, 32, 48, 60]]], jnp.float32)
    classes = jnp.asarray([[1, 0], [2, 0]])
    total, terms = det.family.loss(raw, boxes, classes, jnp.asarray([[True, False], [True, True]]), hyp,
                                   spec=det.spec, img_size=64, gain_rule="per-class")
    assert terms["local"].shape == (3, 3) and terms["global"].shape == (3,)
    np.testing.assert_allclose(terms["local"].sum(0), terms["global"], rtol=1e-6)
    assert float(total) == pytest.approx(2 * float(terms["global"].sum()), rel=1e-6) and float(total) > 0
    empty, t0 = det.family.loss(raw, boxes, classes, jnp.zeros((2, 2), bool), hyp, spec=det.spec, img_size=64,
                                gain_rule="per-class")
    assert np.isfinite(float(empty)) and float(t0["global"][1]) == 0.0 and float(t0["global"][2]) == 0.0
    grads = jax.grad(lambda r: det.family.loss(r, boxes, classes, jnp.zeros((2, 2), bool), hyp, spec=det.spec,
                                               img_size=64, gain_rule="per-class")[0])(raw)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in grads)


def test_mixed_precision_keeps_float32_weights_and_gradients():
    """dtype=bfloat16: the convolutions compute in bf16, the weights, raw outputs, loss and
    gradients stay float32, and the outputs follow the float32 model's to bf16 rounding."""
    from jaxyolo import families
    from jaxyolo import hyp as H
    from jaxyolo import train_step as T

    f32 = jaxyolo.create_model(TINY, num_classes=3, seed=0)
    bf16 = jaxyolo.create_model(TINY, num_classes=3, seed=0, dtype="bfloat16")
    params = T.split_model(bf16.model)[1]
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    x = jax.random.uniform(jax.random.key(0), (2, 64, 64, 3))
    a, b = f32.model(x), bf16.model(x)
    for ra, rb in zip(a, b):
        assert rb.dtype == jnp.float32
        scale = float(jnp.max(jnp.abs(ra)))
        assert float(jnp.max(jnp.abs(ra - rb))) < 0.05 * scale  # bf16 keeps 8 bits of mantissa
    cfg = T.TrainConfig(epochs=1, batches_per_epoch=2, batch_size=2, img_size=64, nominal_batch=2,
                        min_warmup_iters=1, augment=False)
    step = jax.jit(T.make_train_step(bf16, cfg))
    batch = {"image": np.asarray(x * 255, np.uint8), "boxes": np.asarray([[[4, 4, 30, 40]], [[10, 20, 60, 50]]], np.float32),
             "classes": np.asarray([[1], [2]]), "mask": np.asarray([[True], [True]])}
    hyp = H.as_arrays(H.load_hyp(family=families.get("gfl")))
    state, m = step(T.init_state(bf16), batch, hyp, jax.random.key(1))
    assert bool(m["finite"]) and all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.params))


def test_onnx_export_of_a_gfl_detector_matches_it(tmp_path):
    """Depthwise convolutions, the PAN's resampling, the quality branch's top-k and the decode all
    convert; the exported file's decoded boxes and in-graph NMS agree with the detector's."""
    from jaxyolo.export.onnx_export import read_metadata

    det = jaxyolo.create_model(TINY, num_classes=3, seed=0, dgqp=True)
    report = det.export_onnx(tmp_path / "gfl.onnx", img_size=64, nms=True, dynamic_batch=True, conf_thres=0.001)
    assert report["checked"] and report["max_abs_diff"]["decoded"]["normalised"] <= report["tolerance"]
    assert report["max_abs_diff"]["nms"]["mismatch"] == [] and report["max_abs_diff"]["nms"]["detections"] > 0
    meta = read_metadata(tmp_path / "gfl.onnx")
    assert (meta["family"], meta["layout"], int(meta["gfl"]), int(meta["reg_max"])) == ("gfl", "xyxy-scores", 2, 7)


def _flat(tree, member=None):
    return np.concatenate([np.ravel(x if member is None else x[member]) for x in jax.tree.leaves(tree)])


def test_a_gfl_population_vmapped_equals_separate_runs_and_eight_devices_equal_one(tmp_path):
    """Two members (different optimiser and loss keys, GFLv2 head) trained in one vmapped step equal
    the same two trained one by one; on a (pop 2, data 4) mesh of 8 fake devices, the same again."""
    from helpers import gfl_case as case
    from helpers.train_case import batch
    from helpers.train_runs import run_on_eight_devices
    from test_train_step import assert_same_training

    from jaxyolo import hyp as H
    from jaxyolo import train_step as T

    det, cfg = case.setup()
    step = jax.jit(T.make_train_step(det, cfg))
    separate = []
    for m, hp in enumerate(case.hyps()):
        st = T.init_state(det)
        for s in range(3):
            st, _ = step(st, batch(s), H.as_arrays(hp), jax.random.split(jax.random.key(s), 2)[m])
        separate.append(st)
    params, loss = case.run_mesh(1, 1)
    init = _flat(T.init_state(det).params)
    for m in range(2):
        assert_same_training(_flat(params, m), _flat(separate[m].params), init)
    assert np.linalg.norm(_flat(params, 0) - _flat(params, 1)) > 0.1 * np.linalg.norm(_flat(params, 1) - init)
    eight = run_on_eight_devices("gfl_case", tmp_path / "eight.npz", 2, 4)
    np.testing.assert_allclose(eight["loss"], loss, rtol=1e-4)
    # how far a mere reordering of the BatchNorm sums moves this case (as the batch split over 4
    # devices reorders them): every BatchNorm on its 4-D view
    from jaxyolo.models import norm

    old, norm.NARROW_C = norm.NARROW_C, 0
    try:
        reordered, _ = case.run_mesh(1, 1)
    finally:
        norm.NARROW_C = old
    leaves = jax.tree.leaves(params)
    for m in range(2):
        got = np.concatenate([np.ravel(eight[f"p{i}"][m]) for i in range(len(leaves))])
        noise = np.linalg.norm(_flat(reordered, m) - _flat(params, m))
        assert_same_training(got, _flat(params, m), init, rounding=noise)


@pytest.mark.parametrize("k,stride", [(3, 1), (3, 2), (5, 1), (5, 2)])
def test_depthwise_convolution_and_its_cpu_gradient(k, stride):
    """A depthwise convolution equals one convolution per channel; the CPU gradient (through
    shifted views) equals autodiff's of the plain grouped convolution."""
    from jaxyolo.models import conv

    x = jax.random.normal(jax.random.key(0), (2, 9, 10, 3))
    w = jax.random.normal(jax.random.key(1), (k, k, 1, 3))
    y = conv.conv2d(x, w, stride, groups=3)
    per_channel = jnp.concatenate([conv.conv2d(x[..., c:c + 1], w[..., c:c + 1], stride) for c in range(3)], -1)
    np.testing.assert_allclose(y, per_channel, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(conv.shifted_depthwise(x, w, stride), y, rtol=1e-5, atol=1e-5)

    def loss(x, w):
        return jnp.sum(jnp.sin(conv.conv2d(x, w, stride, groups=3)))

    with conv.grad_mode("cpu"):
        got = jax.grad(loss, argnums=(0, 1))(x, w)
    with conv.grad_mode("xla"):
        want = jax.grad(loss, argnums=(0, 1))(x, w)
    for g, r in zip(got, want):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-5)


def test_a_saved_gfl_detector_loads_with_its_options_and_weights(tmp_path):
    det = jaxyolo.create_model(TINY, num_classes=3, seed=0, dgqp=True, act="silu")
    det.save(tmp_path / "ck")
    back = jaxyolo.load(tmp_path / "ck")
    assert back.family.name == "gfl" and back.options == det.options and back.spec == det.spec
    a, b = det.family.state_dict(det.model), back.family.state_dict(back.model)
    assert a.keys() == b.keys() and len(a) > 50
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_bad_gfl_tables_and_options_are_named(tmp_path):
    table = tmp_path / "bad.yaml"
    table.write_text("family: gfl\nnc: 3\nhead: {widht: 8}\n")
    with pytest.raises(ConfigError, match="bad.*head"):
        jaxyolo.create_model(str(table))
    with pytest.raises(ConfigError, match="act"):
        jaxyolo.create_model(TINY, act="gelu")
    with pytest.raises(ConfigError, match="kst"):
        jaxyolo.create_model(TINY, kst=3)
