"""The plain PyTorch mirror (`jaxyolo.export.torch_mirror`) and `export_torch`."""

from __future__ import annotations

import functools
import json
import os

import pytest
from helpers.torch_receiver import images as _images
from helpers.torch_receiver import nchw as _nchw
from helpers.torch_receiver import normalised_diff as _normalised_diff
from helpers.torch_receiver import outside_imports, receiver_output

torch = pytest.importorskip("torch")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from conftest import IMG, SPEC_DIR, perturbed  # noqa: E402
from flax import nnx  # noqa: E402

import jaxyolo  # noqa: E402
from jaxyolo.errors import ConfigError, ExportError  # noqa: E402
from jaxyolo.export import torch_export as TE  # noqa: E402
from jaxyolo.export import torch_mirror as M  # noqa: E402
from jaxyolo.models.state_dict import expected_shapes  # noqa: E402
from jaxyolo.models.yolo import apply  # noqa: E402

SIZES = (IMG, 96)
TOL = 1e-4


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    """Tiny convs are far slower with torch's thread pool fighting other processes for the cores."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _tsv(name: str) -> list[tuple[str, tuple[int, ...]]]:
    path = SPEC_DIR / f"{name}_state_dict.tsv"
    if not path.is_file():
        pytest.skip(f"{path} not available")
    rows = []
    for line in path.read_text().splitlines()[1:]:
        key, shape = line.split("\t")
        rows.append((key, () if shape == "scalar" else tuple(int(v) for v in shape.split("x"))))
    return rows


def _meta_mirror(detector):
    with torch.device("meta"):
        return M.build_model(TE.torch_config(detector))


def _shapes(sd) -> list[tuple[str, tuple[int, ...]]]:
    return [(k, tuple(v.shape)) for k, v in sd.items()]


@functools.lru_cache(maxsize=None)
def _tiny(head: str):
    return perturbed(jaxyolo.create_model("yolov4p", num_classes=3, kst=3, head=head, seed=0))


# --- state_dict layout --------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["yolov4s", "yolov4l"])
def test_state_dict_equals_reference_tsv(name):
    rows = _tsv(name)
    mirror = _meta_mirror(jaxyolo.create_model(name, kst=1, head="implicit", abstract=True))
    assert _shapes(mirror.state_dict()) == rows
    # A plain Detect head: the reference's Detect checkpoint rows (the same minus the six implicit ones).
    plain = _meta_mirror(jaxyolo.create_model(name, head="detect", abstract=True))
    assert _shapes(plain.state_dict()) == [r for r in rows if ".ia." not in r[0] and ".im." not in r[0]]


@pytest.mark.parametrize("head", ["implicit", "detect"])
def test_state_dict_equals_detector_state_dict(head):
    det = jaxyolo.create_model("yolov4p", num_classes=3, kst=3, head=head, abstract=True)
    want = list(expected_shapes(det.model).items())  # (det.state_dict() needs values)
    assert _shapes(_meta_mirror(det).state_dict()) == want
    if head == "implicit":
        assert ("model.31.ia.0.implicit", (3, 16, 1, 1)) in want


@pytest.mark.parametrize("bn", [False, True])
def test_folded_state_dict_equals_detector_state_dict(bn):
    folded = _tiny("implicit").fold(bn=bn)
    mirror = M.build_model(TE.torch_config(folded))
    assert _shapes(mirror.state_dict()) == [(k, tuple(np.shape(v))) for k, v in folded.state_dict().items()]


def test_fresh_mirror_init_follows_the_reference():
    mirror = M.build_model(TE.torch_config(jaxyolo.create_model("yolov4p", num_classes=3, kst=3, abstract=True)))
    head = mirror.detect
    assert head.ia[0].implicit.shape == (3, 16, 1, 1) and abs(float(head.im[1].implicit.detach().mean()) - 1) < 0.01
    bias = head.m[0].bias.detach().view(3, -1)
    assert float(bias[:, 4].mean()) < -6  # objectness prior ln(8 / 80²) = -6.68 at stride 8
    bn = mirror.model[0].bn
    assert (bn.eps, bn.momentum) == (1e-3, 0.03)
    assert mirror.training  # a fresh model is for training: raw per-level logits
    assert [tuple(r.shape) for r in mirror(torch.rand(2, 3, IMG, IMG))] == [(2, 3, 8, 8, 8), (2, 3, 4, 4, 8),
                                                                             (2, 3, 2, 2, 8)]
    with torch.no_grad():
        assert tuple(mirror.eval()(torch.rand(1, 3, IMG, IMG)).shape) == (1, 3 * (64 + 16 + 4), 8)


# --- parity -------------------------------------------------------------------------------------

MODES = [("implicit", False, False), ("implicit", True, False), ("implicit", True, True),
         ("detect", False, False), ("detect", True, True)]


@pytest.mark.parametrize("head,fold_implicit,fuse_bn", MODES)
def test_export_parity(tmp_path, head, fold_implicit, fuse_bn):
    det = _tiny(head)
    out = tmp_path / "export"
    report = TE.export_torch(det, out, IMG, fold_implicit=fold_implicit, fuse_bn=fuse_bn, tolerance=TOL)
    assert sorted(os.listdir(out)) == ["config.json", "jaxyolo_torch.py", "model.pt"]
    assert report["max_abs_diff"] <= TOL and report["checked"]
    assert report["keys"] == len(torch.load(out / "model.pt", weights_only=True))
    sd = torch.load(out / "model.pt", weights_only=True)
    assert any(".ia." in k for k in sd) == (head == "implicit" and not fold_implicit)
    assert any("running_var" in k for k in sd) == (not fuse_bn)

    mirror = TE.import_mirror(out / "jaxyolo_torch.py").load(out)
    assert not mirror.training
    for size in SIZES:  # the gate's size and another one, independently of the gate
        images = _images(size)
        with torch.no_grad():
            raw_t = mirror.forward_raw(_nchw(images))
            out_t = mirror(_nchw(images))
        raw_j = det.forward_raw(images)
        for a, b in zip(raw_t, raw_j):
            assert a.shape == b.shape
            np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=0, atol=TOL)
        assert _normalised_diff(out_t.numpy(), det(images), size) <= TOL


def test_kst_index_parity(tmp_path):
    det = _tiny("implicit")
    out = tmp_path / "export"
    TE.export_torch(det, out, IMG, fold_implicit=False, check=False)
    mirror = M.load(out)
    images = _images(IMG)
    with torch.no_grad():
        raw_t = mirror.forward_raw(_nchw(images), kst_index=(1, 2))
    for a, b in zip(raw_t, det.forward_raw(images, kst_index=(1, 2))):
        np.testing.assert_allclose(a.numpy(), np.asarray(b), rtol=0, atol=TOL)
    with pytest.raises(ValueError, match="kst_index"):
        mirror.forward_raw(_nchw(images), kst_index=(3, 0))


def test_train_mode_matches_jax_train_step(tmp_path):
    """BatchNorm batch statistics, running-stat updates and an explicit KST pair, as in JAX."""
    det = _tiny("implicit")
    out = tmp_path / "export"
    TE.export_torch(det, out, IMG, fold_implicit=False, check=False)
    mirror = M.load(out).train()
    images = _images(IMG)
    raw_t = mirror(_nchw(images), kst_index=(2, 0))
    assert isinstance(raw_t, list) and raw_t[0].requires_grad
    graphdef, state = nnx.split(det.model)
    step = jax.jit(functools.partial(apply, train=True), static_argnums=0)
    raw_j, new_state = step(graphdef, state, jnp.asarray(images), kst_index=(2, 0))
    for a, b in zip(raw_t, raw_j):
        np.testing.assert_allclose(a.detach().numpy(), np.asarray(b), rtol=0, atol=1e-3)
    before = det.state_dict()
    new_det = jaxyolo.Detector(nnx.merge(graphdef, new_state), det.table, det.names)
    sd_t = mirror.state_dict()
    for key, value in new_det.state_dict().items():
        if key.endswith(("running_mean", "running_var")):
            assert not np.array_equal(value, before[key]), key
            np.testing.assert_allclose(sd_t[key].numpy(), value, rtol=1e-4, atol=1e-5, err_msg=key)
    # Without an index a K=3 head draws a random pair per step: outputs vary between steps.
    torch.manual_seed(0)
    draws = {tuple(mirror.detect._draws(2, "cpu")[:, 0, 0].tolist()) for _ in range(20)}
    assert len(draws) > 1
    loss = sum(r.float().square().mean() for r in mirror(_nchw(images)))
    loss.backward()
    assert mirror.detect.ia[0].implicit.grad is not None


# --- round trip and receiver --------------------------------------------------------------------


def test_round_trip_of_official_format_is_bit_exact(tmp_path):
    det = perturbed(jaxyolo.create_model("yolov4p", kst=1, seed=4), seed=5)
    original = det.state_dict()
    src = tmp_path / "official.pt"
    torch.save({k: torch.from_numpy(v) for k, v in original.items()}, src)
    loaded = jaxyolo.load_torch("yolov4p", src)
    assert loaded.kst == 1
    TE.export_torch(loaded, tmp_path / "export", IMG, fold_implicit=False)
    back = torch.load(tmp_path / "export" / "model.pt", weights_only=True)
    assert list(back) == list(original)
    for key, want in original.items():
        got = back[key]
        assert got.dtype == torch.from_numpy(want).dtype, key
        assert torch.equal(got, torch.from_numpy(want)), key
        if want.dtype == np.float32:
            assert got.numpy().tobytes() == want.tobytes(), key


def test_receiver_without_jax_or_jaxyolo(tmp_path):
    det = _tiny("implicit")
    out = tmp_path / "export"
    TE.export_torch(det, out, IMG)
    images = _images(IMG, n=1, seed=7)
    y = receiver_output(out, _nchw(images), tmp_path).numpy()
    assert _normalised_diff(y, det(images), IMG) <= TOL


def test_mirror_imports_only_torch_and_the_standard_library():
    assert not outside_imports(TE.MIRROR_SOURCE)


# --- failures -----------------------------------------------------------------------------------


def test_corrupted_weight_fails_the_gate_and_writes_nothing(tmp_path, monkeypatch):
    real = TE._export_state

    def corrupt(detector):
        sd = real(detector)
        sd["model.30.conv.weight"] = sd["model.30.conv.weight"] + np.float32(0.05)
        return sd

    monkeypatch.setattr(TE, "_export_state", corrupt)
    out = tmp_path / "export"
    with pytest.raises(ExportError, match=r"differs from the JAX model by [0-9.e-]+ .*> tolerance 0.0001"):
        TE.export_torch(_tiny("implicit"), out, IMG)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []  # no temporary folder left behind either


def test_existing_folders(tmp_path):
    det = _tiny("detect")
    out = tmp_path / "export"
    TE.export_torch(det, out, IMG, check=False)
    first = (out / "model.pt").read_bytes()
    TE.export_torch(det, out, IMG, check=False)  # a previous export is replaced
    assert (out / "model.pt").read_bytes() == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    other = tmp_path / "mine"
    other.mkdir()
    (other / "notes.txt").write_text("keep me")
    with pytest.raises(ExportError, match="not a previous torch export"):
        TE.export_torch(det, other, IMG, check=False)
    assert (other / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="img_size"):
        TE.export_torch(det, tmp_path / "x", 50)
    with pytest.raises(ConfigError, match="fuse_bn"):
        TE.export_torch(_tiny("implicit"), tmp_path / "x", IMG, fold_implicit=False, fuse_bn=True)


def test_bad_folder_is_named(tmp_path):
    out = tmp_path / "export"
    TE.export_torch(_tiny("detect"), out, IMG, check=False)
    mod = TE.import_mirror(out / "jaxyolo_torch.py")

    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=r"empty/config\.json: no such file"):
        mod.load(empty)

    cfg_text = (out / "config.json").read_text()
    (out / "config.json").write_text(cfg_text[: len(cfg_text) // 2])
    with pytest.raises(mod.ConfigError, match=r"export/config\.json: not valid JSON"):
        mod.load(out)

    cfg = json.loads(cfg_text)
    del cfg["anchors"]
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mod.ConfigError, match=r"config\.json: config: missing field 'anchors'"):
        mod.load(out)

    cfg = json.loads(cfg_text)
    cfg["layers"][4]["c_in"] = 999
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mod.ConfigError, match=r"layers\[4\]: c_in 999"):
        mod.load(out)

    cfg = json.loads(cfg_text)
    cfg["nc"] = 7  # the weights no longer fit
    (out / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(mod.ConfigError, match=r"model\.pt: does not fit config\.json: shape mismatch"):
        mod.load(out)

    (out / "config.json").write_text(cfg_text)
    (out / "model.pt").write_bytes(b"garbage")
    with pytest.raises(mod.ConfigError, match=r"model\.pt: not a readable torch weights file"):
        mod.load(out)
    (out / "model.pt").unlink()
    with pytest.raises(FileNotFoundError, match=r"model\.pt: no such file"):
        mod.load(out)

    with pytest.raises(ValueError, match="multiples of 32"):
        M.build_model(cfg)(torch.zeros(1, 3, 50, 64))
    with pytest.raises(ValueError, match="NCHW"):
        M.build_model(cfg)(torch.zeros(1, 64, 64, 3))


def test_peer_flop_counter_matches_hand_count_and_gflops():
    """The learn suite's FLOP counter for peer torch models (`peer_train.conv_gflops`): a 3x3 stride-2
    conv counted by hand, and jaxyolo's own `Detector.gflops` on the torch mirror of the same model."""
    from jaxyolo.bench.peer_train import conv_gflops

    conv = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, 2, 1), torch.nn.Conv2d(8, 8, 3, 1, 1, groups=4))
    # 64 px in, 32x32 out: 2 * (3 * 9) * 8 * 32² and 2 * (8/4 * 9) * 8 * 32²
    assert conv_gflops(conv, 64) * 1e9 == 2 * 27 * 8 * 32 * 32 + 2 * 18 * 8 * 32 * 32
    det = jaxyolo.create_model("yolov4p", num_classes=5, head="detect", seed=0)
    mirror = M.build_model(TE.torch_config(det))
    assert conv_gflops(mirror, 96) == pytest.approx(det.gflops(96), rel=1e-6)
