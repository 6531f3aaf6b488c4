"""The gfl family's PyTorch mirror (`jaxyolo.export.torch_mirror_gfl`, exported by `export_torch`)
and its layer table (`Detector.layer_table`, `profile.gfl_layer_table`)."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import numpy as np
import pytest
from helpers.torch_receiver import images as _images
from helpers.torch_receiver import nchw as _nchw
from helpers.torch_receiver import normalised_diff as _normalised_diff
from helpers.torch_receiver import outside_imports, receiver_output

import jaxyolo
from jaxyolo.errors import ConfigError, ExportError
from jaxyolo.export import torch_export as TE
from jaxyolo.models import layers as L

TINY = str(Path(__file__).parent / "helpers" / "gfl_tiny.yaml")
IMG = 64
TOL = 1e-4  # the gate's default, as the YOLOv4 export tests use

# Beyond the tiny table: fused stages (expansion 1 with a residual, and 4), a plain stage of
# expansion 1, towers of two convolutions per level (not shared), other reg_max and DGQP sizes.
VARIANT = """\
family: gfl
nc: 3
img_size: 64
backbone:
  width: 0.25
  depth: 0.34
  scale_stem: true
  stages: [[1, 3, 1, 16, 1, 1], [4, 3, 2, 24, 1, 1], [4, 3, 2, 40, 1], [4, 3, 2, 80, 1], [4, 5, 1, 112, 1],
           [4, 3, 2, 192, 1], [1, 3, 1, 320, 1]]
neck: {width: 16}
head: {width: 16, stacked_convs: 2, share_levels: false, reg_max: 5, dgqp_topk: 3, dgqp_width: 8}
"""


@pytest.fixture(scope="module")
def torch():
    """torch, or the test is skipped (the layer-table tests run without it). One thread: tiny
    convs are far slower with torch's thread pool fighting other processes for the cores."""
    torch = pytest.importorskip("torch")
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield torch
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def G(torch):
    from jaxyolo.export import torch_mirror_gfl

    return torch_mirror_gfl


@pytest.fixture(scope="module")
def variant_table(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("gfl_table") / "gfl_variant.yaml"
    path.write_text(VARIANT)
    return str(path)


def perturbed(det, seed: int = 1):
    """Weights away from their init: BatchNorms that are not identities, predictions and quality
    weights large enough that class scores, box distributions and quality logits all vary."""
    rng = np.random.default_rng(seed)
    sd = det.state_dict()
    for k, v in sd.items():
        bn = ".bn." in k or k.startswith("head.norms.")
        if k.endswith("running_var") or (bn and k.endswith("weight")):
            sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        elif k.endswith("running_mean") or (bn and k.endswith("bias")):
            sd[k] = rng.normal(0, 0.2, v.shape).astype(np.float32)
        elif k.startswith("head.preds"):
            sd[k] = rng.normal(0, 0.05 if k.endswith("weight") else 1.0, v.shape).astype(np.float32)
        elif k.startswith("head.quality"):
            sd[k] = rng.normal(0, 0.3, v.shape).astype(np.float32)
        elif k == "head.scales":
            sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
    return det.load_state_dict(sd)


@functools.lru_cache(maxsize=None)
def _det(table: str, act: str, dgqp: bool):
    return perturbed(jaxyolo.create_model(table, num_classes=3, seed=0, act=act, dgqp=dgqp))


def _check_mirror(det, out, sizes=(IMG,)):
    """The exported folder, loaded by its own module file, against the JAX detector."""
    import torch

    mirror = TE.import_mirror(out / "jaxyolo_torch.py").load(out)
    assert not mirror.training
    for size in sizes:
        images = _images(size)
        with torch.no_grad():
            raw_t = mirror.forward_raw(_nchw(images))
            out_t = mirror(_nchw(images)).numpy()
        raw_j = det.forward_raw(images)
        assert len(raw_t) == len(raw_j) == 3
        for a, b in zip(raw_t, raw_j):
            assert a.shape == b.shape
            np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=0, atol=TOL)
        out_j = np.asarray(det(images))
        assert out_t.shape == out_j.shape == (2, sum((size // s) ** 2 for s in (8, 16, 32)), 4 + det.num_classes)
        assert _normalised_diff(out_t, out_j, size) <= TOL
        # not a vacuous comparison: scores spread, boxes of several sizes
        assert out_j[..., 4:].std() > 0.05 and np.ptp(out_j[..., 2] - out_j[..., 0]) > 4
    return mirror


# --- parity -------------------------------------------------------------------------------------


@pytest.mark.parametrize("act, dgqp", [("relu6", False), ("relu6", True), ("silu", False), ("silu", True)])
def test_export_parity(torch, G, tmp_path, act, dgqp):
    det = _det(TINY, act, dgqp)
    out = tmp_path / "export"
    report = TE.export_torch(det, out, IMG)
    assert sorted(os.listdir(out)) == ["config.json", "jaxyolo_torch.py", "model.pt"]
    assert report["checked"] and report["family"] == "gfl" and report["max_abs_diff"] <= TOL
    assert (out / "jaxyolo_torch.py").read_bytes() == TE.GFL_MIRROR_SOURCE.read_bytes()
    config = json.loads((out / "config.json").read_text())
    assert (config["format"], config["act"], config["dgqp"], config["img_size"]) == (G.FORMAT, act, dgqp, [IMG, IMG])
    assert report["params"] == det.num_params()
    mirror = _check_mirror(det, out, sizes=(IMG, 96) if dgqp and act == "silu" else (IMG,))
    assert (mirror.head.quality is not None) == dgqp


@pytest.mark.parametrize("act", ["mish", "leaky"])
def test_fused_stages_and_unshared_towers(torch, tmp_path, variant_table, act):
    det = _det(variant_table, act, True)
    spec = det.spec
    assert [st.fused for st in spec.backbone.stages][:2] == [True, True] and not spec.share_levels
    out = tmp_path / "export"
    assert TE.export_torch(det, out, IMG)["max_abs_diff"] <= TOL
    mirror = _check_mirror(det, out)
    first = mirror.backbone.stages[0][0]
    assert first.expand is None and first.project is None and first.residual  # fused, expansion 1
    assert len(mirror.head.convs) == 3 and len(mirror.head.convs[0]) == 2


def test_receiver_without_jax_or_jaxyolo(torch, tmp_path):
    det = _det(TINY, "relu6", True)
    out = tmp_path / "export"
    TE.export_torch(det, out, IMG)
    images = _images(IMG, n=1, seed=7)
    y = receiver_output(out, _nchw(images), tmp_path, block_numpy=True).numpy()
    assert _normalised_diff(y, det(images), IMG) <= TOL


def test_mirror_imports_only_torch_and_the_standard_library():
    assert not outside_imports(TE.GFL_MIRROR_SOURCE)


# --- state_dict ---------------------------------------------------------------------------------


@pytest.mark.parametrize("dgqp", [False, True])
def test_state_dict_round_trip(G, dgqp, variant_table):
    for table in (TINY, variant_table):
        det = _det(table, "relu6", dgqp)
        sd = det.state_dict()
        mirror = G.build_model(TE.torch_config(det))
        assert set(mirror.state_dict()) == set(sd)  # the family's dotted NNX paths, nothing more
        mirror.load_state_dict(G.from_jaxyolo(sd), strict=True)
        back = mirror.state_dict()
        for key, want in sd.items():
            got = back[key].numpy()
            got = got.transpose(2, 3, 1, 0) if got.ndim == 4 else got
            assert got.tobytes() == np.ascontiguousarray(want).tobytes(), key
        assert any(k.startswith("head.quality.") for k in sd) == dgqp


def test_exported_weights_are_the_state_dict_in_torch_layout(torch, G, tmp_path):
    det = _det(TINY, "relu6", False)
    TE.export_torch(det, tmp_path / "export", IMG, check=False)
    saved = torch.load(tmp_path / "export" / "model.pt", weights_only=True)
    sd = det.state_dict()
    assert list(saved) == list(sd)
    for key, want in G.from_jaxyolo(sd).items():
        assert torch.equal(saved[key], want), key
    assert tuple(saved["backbone.stages.1.0.dw.conv.weight"].shape)[1:] == (1, 3, 3)  # depthwise: groups = channels


def test_batchnorm_settings_and_fresh_init(torch, G):
    assert (G.BN_EPS, G.BN_MOMENTUM) == (L.BN_EPS, L.BN_MOMENTUM)
    det = jaxyolo.create_model(TINY, num_classes=3, dgqp=True, abstract=True)
    mirror = G.build_model(TE.torch_config(det))
    norms = [m for m in mirror.modules() if isinstance(m, G.BatchNorm2d)]
    assert norms and all((m.eps, m.momentum) == (1e-3, 0.03) for m in norms)
    assert not any("num_batches_tracked" in k for k in mirror.state_dict())
    bias = mirror.head.preds[0].bias.detach()
    assert float(bias[:3].mean()) == pytest.approx(-np.log(99), rel=1e-6) and float(bias[3:].abs().max()) == 0
    assert mirror.training  # a fresh model is for training: raw per-level outputs
    raw = mirror(torch.rand(2, 3, IMG, IMG))
    assert [tuple(r.shape) for r in raw] == [(2, 8, 8, 3 + 32 + 1), (2, 4, 4, 36), (2, 2, 2, 36)]


# --- failures -----------------------------------------------------------------------------------


def test_corrupted_weight_fails_the_gate_and_writes_nothing(torch, tmp_path, monkeypatch):
    real = TE._export_state

    def corrupt(detector):
        sd = real(detector)
        sd["head.preds.0.weight"] = sd["head.preds.0.weight"] + np.float32(0.05)
        return sd

    monkeypatch.setattr(TE, "_export_state", corrupt)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"differs from the JAX model by [0-9.e-]+ .*> tolerance 0.0001"):
        TE.export_torch(_det(TINY, "relu6", False), out, IMG)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one


def test_refusals_name_the_cause(torch, tmp_path):
    from helpers import toy_family as toy

    det = _det(TINY, "relu6", False)
    with pytest.raises(ConfigError, match="fuse_bn: the gfl family"):
        TE.export_torch(det, tmp_path / "x", IMG, fuse_bn=True)
    with pytest.raises(ExportError, match="the toy family has no PyTorch mirror"):
        TE.export_torch(jaxyolo.create_model(toy.TABLE, num_classes=2), tmp_path / "x", IMG)
    assert not (tmp_path / "x").exists()


def test_bad_config_is_named(torch, G, tmp_path):
    det = _det(TINY, "relu6", False)
    out = tmp_path / "export"
    TE.export_torch(det, out, IMG, check=False)
    mod = TE.import_mirror(out / "jaxyolo_torch.py")
    good = json.loads((out / "config.json").read_text())

    def refused(change, match):
        cfg = json.loads(json.dumps(good))
        change(cfg)
        (out / "config.json").write_text(json.dumps(cfg))
        with pytest.raises(mod.ConfigError, match=match):
            mod.load(out)

    refused(lambda c: c.pop("backbone"), r"config\.json: config: missing field 'backbone'")
    refused(lambda c: c.update(act="gelu"), r"config: act must be one of relu6, .*'gelu'")
    refused(lambda c: c["backbone"]["stages"][2].__setitem__(1, 4), r"backbone\.stages\[2\] must be .*odd kernel")
    refused(lambda c: c.update(strides=[8, 16, 64]), r"strides \[8, 16, 64\] do not match .* \[8, 16, 32\]")
    refused(lambda c: c["head"].update(share_levels=1), r"head\.share_levels must be true or false")
    refused(lambda c: c.update(format="jaxyolo-torch/1"), r"format 'jaxyolo-torch/1' is not supported")
    refused(lambda c: c.update(nc=7), r"model\.pt: does not fit config\.json: shape mismatch: head\.preds\.0")
    refused(lambda c: c.update(dgqp=True), r"missing keys: head\.quality\.0\.weight")
    # each mirror names the other's format instead of guessing
    from jaxyolo.export import torch_mirror

    with pytest.raises(torch_mirror.ConfigError, match="format 'jaxyolo-torch-gfl/1' is not supported"):
        torch_mirror.validate_config(good)
    with pytest.raises(ValueError, match="multiples of 32"):
        G.build_model(good)(torch.zeros(1, 3, 48, 64))


# --- layer table --------------------------------------------------------------------------------


@pytest.mark.parametrize("dgqp", [False, True])
def test_layer_table_sums_to_params_and_gflops(dgqp, variant_table):
    for table in (TINY, variant_table):
        det = jaxyolo.create_model(table, num_classes=3, dgqp=dgqp, abstract=True)
        rows = det.layer_table(IMG)
        assert sum(r["params"] for r in rows) == det.num_params()
        assert sum(r["gflops"] for r in rows) == pytest.approx(det.gflops(IMG), rel=1e-12)
        assert {"index", "source", "n", "params", "module", "args", "output", "gflops"} <= set(rows[0])
        spec = det.spec
        blocks = sum(st.repeats for st in spec.backbone.stages)
        assert len(rows) == 1 + blocks + 3 + 1 + spec.stacked_convs + 1 + dgqp
        assert [r["module"] for r in rows[-(2 + dgqp):]] == ["Conv", "GFLPred"] + ["DGQP"] * dgqp
        assert rows[-1]["output"] == [[IMG // s, IMG // s, spec.nc + 4 * spec.bins + dgqp] for s in (8, 16, 32)]


def test_layer_table_rows_by_hand():
    det = jaxyolo.create_model(TINY, num_classes=3, abstract=True)
    rows = {r["name"]: r for r in det.layer_table(IMG)}
    c0 = det.spec.backbone.stem
    stem = rows["backbone.stem"]
    assert stem["output"] == [32, 32, c0] and stem["params"] == 27 * c0 + 2 * c0
    assert stem["gflops"] * 1e9 == pytest.approx(2 * 32 * 32 * 27 * c0)
    # stage 1 (expansion 6, 3x3 stride 2): 1x1 expand at 32², depthwise and 1x1 project at 16²
    blk, st = rows["backbone.stages.1.0"], det.spec.backbone.stages[1]
    c1, hid = det.spec.backbone.stages[0].c_out, det.spec.backbone.stages[0].c_out * st.expand
    macs = 32 * 32 * c1 * hid + 16 * 16 * 9 * hid + 16 * 16 * hid * st.c_out
    assert blk["module"] == "MBConv" and blk["gflops"] * 1e9 == pytest.approx(2 * macs)  # depthwise counted
    assert blk["params"] == c1 * hid + 2 * hid + 9 * hid + 2 * hid + hid * st.c_out + 2 * st.c_out
    w = det.spec.head_width
    tower = rows["head.convs.*.0, head.norms.*.0"]
    assert tower["params"] == 9 * w * w + 3 * 2 * w  # one shared conv, a BatchNorm per level
    assert tower["gflops"] * 1e9 == pytest.approx(2 * 9 * w * w * (8 * 8 + 4 * 4 + 2 * 2))
    assert rows["neck"]["params"] == 0 and rows["neck"]["gflops"] == 0


def test_peer_flop_counter_agrees_on_the_mirror(G):
    """The learn suite counts a torch model's FLOPs with hooks on its Conv2d layers; on the mirror of
    a gfl detector it must give `Detector.gflops`, depthwise convolutions included on every backend."""
    from jaxyolo.bench.peer_train import conv_gflops

    det = jaxyolo.create_model(TINY, num_classes=3, dgqp=True, abstract=True)
    mirror = G.build_model(TE.torch_config(det))
    assert conv_gflops(mirror, IMG) == pytest.approx(det.gflops(IMG), rel=1e-9)


def test_cli_info_prints_a_gfl_table(capsys):
    from tools import cli

    assert cli.main(["info", "--model", TINY, "--img", str(IMG), "--num-classes", "3", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    det = jaxyolo.create_model(TINY, num_classes=3, abstract=True)
    assert out["params"] == det.num_params() and out["head"] is None and out["layers"][0]["module"] == "Conv"
    assert cli.main(["info", "--model", TINY, "--img", str(IMG), "--act", "silu"]) == 0
    assert "GFLv1, act=silu" in capsys.readouterr().out


def test_profile_times_the_deployable_forms(torch, tmp_path):
    """`jaxyolo profile` (Table 5's shape) for a gfl detector: ONNX, JAX and torch latencies, and
    the parity of the timed ONNX file."""
    from jaxyolo.export.latency import profile

    det = _det(TINY, "relu6", True)
    res = profile(det, [IMG], runs=2, warmup=1, threads=1, workdir=tmp_path)
    (row,) = res["rows"]
    assert row["params"] == det.num_params() and row["gflops"] == pytest.approx(det.gflops(IMG))
    assert all(row[k] > 0 for k in ("onnx_ms", "jax_ms", "torch_ms"))
    assert row["onnx_parity_max_abs_diff"]["output"]["normalised"] <= TOL
