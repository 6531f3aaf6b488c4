"""The benchmark's parts: the PyTorch reference trainer computes jaxyolo's loss, the hand-written
convolution gradients equal autodiff's, the measuring helpers measure, and the CLI runs."""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jaxyolo
from jaxyolo.bench import measure
from jaxyolo.loss import yolo_loss
from jaxyolo.models.conv import conv2d, grad_mode

ANCHORS = [[(10, 13), (16, 30), (33, 23)], [(30, 61), (62, 45), (59, 119)], [(116, 90), (156, 198), (373, 326)]]
STRIDES = [8, 16, 32]


def _targets(rng, batch, m, img, nc):
    xy = rng.uniform(2, img - 30, (batch, m, 2))
    wh = rng.uniform(3, 50, (batch, m, 2))
    boxes = np.concatenate([xy, np.minimum(xy + wh, img)], -1).astype(np.float32)
    boxes[0, 1] = boxes[0, 0]  # the same box twice: the same cells, where the last assignment must win
    boxes[1, 2] = [img - 8.0, img - 8.0, img, img]  # a centre near the far border (clamped cells)
    classes = rng.integers(0, nc, (batch, m)).astype(np.int32)
    mask = rng.uniform(size=(batch, m)) < 0.8
    mask[0, :2] = mask[1, 2] = True
    return boxes, classes, mask


@pytest.mark.parametrize("nc,smoothing", [(4, 0.1), (1, 0.0)])
def test_reference_loss_in_torch_equals_jaxyolo_loss(nc, smoothing):
    """The benchmark's PyTorch loss is written the reference's way (ragged targets, boolean
    fan-out); on the same logits and targets it must give jaxyolo's fixed-shape loss."""
    torch = pytest.importorskip("torch")
    from jaxyolo.bench import torch_train as TT

    rng = np.random.default_rng(0)
    img, batch = 128, 3
    raw = [rng.normal(0, 1.5, (batch, 3, img // s, img // s, 5 + nc)).astype(np.float32) for s in STRIDES]
    boxes, classes, mask = _targets(rng, batch, 7, img, nc)
    hyp = {"box": 0.05, "obj": 1.0, "cls": 0.5, "cls_pw": 1.3, "obj_pw": 0.8, "anchor_t": 4.0,
           "balance": [4.0, 1.0, 0.4], "label_smoothing": smoothing}
    total_j, terms = yolo_loss([jnp.asarray(r) for r in raw], jnp.asarray(boxes), jnp.asarray(classes),
                               jnp.asarray(mask), anchors=ANCHORS, strides=STRIDES,
                               hyp={k: jnp.asarray(v) for k, v in hyp.items()})
    total_t, local_t = TT.yolo_loss([torch.from_numpy(r) for r in raw], TT.ragged_targets(boxes, classes, mask, img),
                                    anchors=ANCHORS, strides=STRIDES, hyp=hyp)
    np.testing.assert_allclose(local_t.numpy(), np.asarray(terms["local"]), rtol=2e-5, atol=1e-7)
    np.testing.assert_allclose(float(total_t), float(total_j), rtol=2e-5)


def test_ragged_targets_are_the_reference_rows():
    pytest.importorskip("torch")
    from jaxyolo.bench.torch_train import ragged_targets

    boxes = np.zeros((2, 3, 4), np.float32)
    boxes[0, 0] = [0, 0, 32, 16]
    boxes[1, 2] = [16, 32, 64, 64]
    rows = ragged_targets(boxes, np.array([[5, 0, 0], [0, 0, 7]]), np.array([[1, 0, 0], [0, 0, 1]], bool), 64)
    # (image, class, centre x, centre y, w, h) normalised by the 64-pixel input, by hand
    np.testing.assert_allclose(rows.numpy(), [[0, 5, 0.25, 0.125, 0.5, 0.25], [1, 7, 0.625, 0.75, 0.75, 0.5]])


def test_torch_trainer_matches_the_jax_loss_at_the_same_weights():
    """The mirror in train mode (batch statistics) with the same weights and batch gives the loss
    of jaxyolo's model and loss: the two sides of the train benchmark compute the same thing."""
    pytest.importorskip("torch")
    from flax import nnx

    from jaxyolo import hyp as H
    from jaxyolo import train_step as T
    from jaxyolo.bench.suites import synthetic_batch
    from jaxyolo.bench.torch_train import TorchTrainer, ragged_targets

    det = jaxyolo.create_model("yolov4p", num_classes=80, head="detect", seed=3)
    img = 64
    host = synthetic_batch(2, img, max_boxes=6, seed=1)
    hyp = H.load_hyp()
    trainer = TorchTrainer(det, hyp, img_size=img)
    targets = ragged_targets(host["boxes"], host["classes"], host["mask"], img)
    total_t, _ = trainer.loss(trainer.images(host["image"]), targets)

    cfg = T.TrainConfig(epochs=1, batches_per_epoch=1, batch_size=2, img_size=img, augment=False)
    core = T.StepCore(det, cfg)
    _, params, stats = T.split_model(det.model)
    model = nnx.merge(core.graphdef, params, stats, copy=True)
    raw = model(T.batch_images({"image": jnp.asarray(host["image"])}), train=True, key=jax.random.key(0))
    total_j, _ = core.detection_loss(raw, jnp.asarray(host["boxes"]), jnp.asarray(host["classes"]),
                                     jnp.asarray(host["mask"]), {k: jnp.asarray(v) for k, v in hyp.items()})
    np.testing.assert_allclose(float(total_t.detach()), float(total_j), rtol=1e-4)


@pytest.mark.parametrize("k,s,h,w", [(1, 1, 9, 7), (3, 2, 12, 12), (3, 2, 13, 11), (1, 2, 10, 9), (5, 2, 11, 12), (3, 3, 14, 10)])
def test_cpu_conv_gradients_equal_autodiff(k, s, h, w):
    rng = np.random.default_rng(k * 10 + s)
    x = jnp.asarray(rng.normal(size=(2, h, w, 6)).astype(np.float32))
    wt = jnp.asarray(rng.normal(size=(k, k, 6, 5)).astype(np.float32))
    f = lambda x, wt: jnp.sum(jnp.sin(conv2d(x, wt, s)) * jnp.arange(5.0))
    with grad_mode("cpu"):
        y_m = conv2d(x, wt, s)
        g_m = jax.grad(f, (0, 1))(x, wt)
    with grad_mode("xla"):
        y_x = conv2d(x, wt, s)
        g_x = jax.grad(f, (0, 1))(x, wt)
    np.testing.assert_array_equal(np.asarray(y_m), np.asarray(y_x))  # the forward is untouched
    for a, b in zip(g_m, g_x):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-4)


def test_model_gradients_are_the_same_with_either_conv_gradient(tiny, images):
    from flax import nnx

    graphdef, params, rest = nnx.split(tiny.model, nnx.Param, ...)

    def loss(p):
        out = nnx.merge(graphdef, p, rest, copy=True)(jnp.asarray(images), train=True, key=jax.random.key(0))
        return sum(jnp.mean(jnp.square(o)) for o in out)

    with grad_mode("cpu"):
        g_m = jax.grad(loss)(params)
    with grad_mode("xla"):
        g_x = jax.grad(loss)(params)
    for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_x)):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-3, atol=1e-5)


def test_layer_table_still_attributes_flops_to_layers(tiny):
    """Convolutions behind the custom gradient sit in an inner jaxpr; the per-layer FLOPs must
    still land on their layers: layer 0 is a 3x3 conv 3 -> c at full resolution, by hand."""
    rows = tiny.layer_table(64)
    c0 = rows[0]["output"][-1]
    assert rows[0]["gflops"] == pytest.approx(2 * 64 * 64 * 9 * 3 * c0 / 1e9)
    assert sum(r["gflops"] for r in rows) == pytest.approx(tiny.gflops(64))


def test_xla_cpu_flag_respects_the_user(monkeypatch):
    from jaxyolo import xla_cpu

    monkeypatch.setattr(xla_cpu, "backend_started", lambda: False)
    monkeypatch.setenv("XLA_FLAGS", "--xla_foo=1")
    monkeypatch.delenv("JAXYOLO_XLA_DEFAULTS", raising=False)
    assert xla_cpu.apply_defaults() and os.environ["XLA_FLAGS"] == f"--xla_foo=1 {xla_cpu.FLAG}"
    assert not xla_cpu.apply_defaults()  # once is enough
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_DOT")
    assert not xla_cpu.apply_defaults() and "REDUCE" not in os.environ["XLA_FLAGS"]  # the user's choice
    monkeypatch.setenv("XLA_FLAGS", "")
    monkeypatch.setenv("JAXYOLO_XLA_DEFAULTS", "0")
    assert not xla_cpu.apply_defaults() and os.environ["XLA_FLAGS"] == ""
    monkeypatch.delenv("JAXYOLO_XLA_DEFAULTS")
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
    assert not xla_cpu.apply_defaults()  # several CPU devices: partitioned programs, no YNN fusions
    monkeypatch.setenv("XLA_FLAGS", f"--xla_foo=1 {xla_cpu.FLAG}")
    assert xla_cpu.withdraw() and os.environ["XLA_FLAGS"] == "--xla_foo=1"  # a multi-process run
    monkeypatch.setattr(xla_cpu, "backend_started", lambda: True)
    assert not xla_cpu.apply_defaults()  # too late: XLA has read its flags


def test_peak_rss_sees_an_allocation():
    with measure.PeakRSS() as peak:
        block = np.ones(64 * 2**20 // 8)  # 64 MiB, touched
        block.sum()
    del block
    assert 0.05 <= peak.extra_gib < 0.5


def test_interleaved_alternates_and_drops_warmup():
    calls = []
    times = measure.interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")},
                                repeats=3, warmup=1)
    assert calls == ["a", "b"] * 4
    assert [len(v) for v in times.values()] == [3, 3]


def test_bench_cli_quick_eval_and_gpu(tmp_path, capsys):
    from jaxyolo.tools import bench_cmd
    from jaxyolo.tools.cli import main

    out = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--suite", "eval,gpu", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    ev = res["suites"]["eval"]
    assert ev["images"] == 20 and 0 < ev["detections"] <= 20 * 300  # max_det per image
    assert res["suites"]["gpu"]["skipped"].startswith("no accelerator")
    assert res["machine"]["jax"] == jax.__version__
    assert "decode + NMS" in capsys.readouterr().out
    with pytest.raises(jaxyolo.ConfigError, match="unknown suite"):
        bench_cmd.parse_suites("train,speed")
    assert bench_cmd.parse_suites("all") == list(bench_cmd.ORDER[:-1])  # all but the long learn suite
    assert bench_cmd.parse_suites("learn,train") == ["train", "learn"]


def test_gpu_suite_code_path_on_cpu():
    """The GPU suite's arithmetic on a tiny model run on the CPU: MFU is achieved model FLOP/s over
    the measured matmul ceiling (the figures themselves mean nothing here)."""
    from jaxyolo.bench.suites import gpu

    r = gpu(**{"model": "yolov4p", "batch": 2, "img": 64, "repeats": 1, "warmup": 1, "matmul_n": 128},
            allow_cpu=True)
    det = jaxyolo.create_model("yolov4p", abstract=True)
    assert r["model_flops_per_image"] == pytest.approx(3 * det.gflops(64) * 1e9)
    assert r["model_flops_per_s"] == pytest.approx(2 * r["model_flops_per_image"] / r["jax_step_s"], rel=1e-3)
    assert r["mfu"] == pytest.approx(r["model_flops_per_s"] / r["bf16_matmul_flops_per_s"], abs=1e-4)



def test_bench_learn_quick_scores_jaxyolo_and_reports_a_missing_peer(tmp_path, capsys):
    """The learn suite end to end on a tiny generated set: jaxyolo's row is scored by pycocotools
    on the held-out json, with a per-epoch curve; a peer Python without the peer libraries (this
    one) gives a 'skipped' row naming its log, not a crash."""
    import sys

    from jaxyolo.tools.cli import main

    out = tmp_path / "learn.json"
    assert main(["bench", "--quick", "--suite", "learn", "--json", str(out), "--out", str(tmp_path / "runs"),
                 "--peer-python", sys.executable]) == 0
    res = json.loads(out.read_text())["suites"]["learn"]
    rows = {r["system"].split()[0]: r for r in res["rows"]}
    assert set(rows) == {"jaxyolo", "ultralytics", "yolov5"}
    j = rows["jaxyolo"]
    assert 0.0 <= j["AP50"] <= 1.0 and 0.0 <= j["AP"] <= j["AP50"]
    assert [c["epoch"] for c in j["curve"]] == [0, 1] and j["wall_s"] > 0 and j["params"] == jaxyolo.create_model(
        "yolov4p", num_classes=5, head="detect", abstract=True).num_params()
    for lib in ("ultralytics", "yolov5"):
        assert "train.log" in rows[lib]["skipped"]
        assert (tmp_path / "runs" / lib / "train.log").exists()
    printed = capsys.readouterr().out
    assert "| jaxyolo |" in printed and "skipped" in printed
