"""`jaxyolo export` and `jaxyolo profile` end to end on the tiny table (checkpoint in, files out)."""

from __future__ import annotations

import json

import numpy as np
import pytest

pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")
torch = pytest.importorskip("torch")

from conftest import IMG  # noqa: E402
from helpers.train_runs import cli_main  # noqa: E402

from jaxyolo.export.torch_export import import_mirror  # noqa: E402


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A saved tiny detector with non-trivial BN / implicit values and class names."""
    from conftest import perturbed

    import jaxyolo

    det = perturbed(jaxyolo.create_model("yolov4p", num_classes=3, kst=3, seed=0))
    det.names = ("circle", "square", "triangle")
    return det, det.save(tmp_path_factory.mktemp("ckpt") / "best")


def test_export_onnx_and_torch_from_a_checkpoint(checkpoint, tmp_path):
    det, path = checkpoint
    out = tmp_path / "export"
    code, stdout, err = cli_main(["export", "--weights", str(path), "--format", "onnx,torch", "--img", str(IMG),
                                  "--dynamic-batch", "--out", str(out), "--json"])
    assert code == 0, err
    reports = json.loads(stdout)
    assert [r["format"] for r in reports] == ["onnx", "torch"]
    assert all(r["max_abs_diff"] is not None for r in reports)

    # the ONNX file: dynamic batch, class names in the metadata, outputs equal to the detector's
    onnx_file = out / f"yolov4p-{IMG}.onnx"
    sess = ort.InferenceSession(str(onnx_file), providers=["CPUExecutionProvider"])
    meta = sess.get_modelmeta().custom_metadata_map
    assert json.loads(meta["names"]) == ["circle", "square", "triangle"]
    x = np.random.default_rng(3).uniform(0, 1, (3, IMG, IMG, 3)).astype(np.float32)
    got = sess.run(None, {"images": x.transpose(0, 3, 1, 2)})[0]
    want = np.asarray(det(x))
    assert got.shape == want.shape
    d = np.abs(got - want)
    d[..., :4] /= IMG
    assert d.max() <= 1e-4

    # the PyTorch export loads through its own module file, as a receiver would
    mirror = import_mirror(out / "torch" / "jaxyolo_torch.py")
    model = mirror.load(out / "torch")
    with torch.no_grad():
        t = model(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()
    d = np.abs(t - want)
    d[..., :4] /= IMG
    assert d.max() <= 1e-4


def test_export_rejects_bad_options(checkpoint, tmp_path):
    _, path = checkpoint
    code, _, err = cli_main(["export", "--weights", str(path), "--format", "tflite", "--out", str(tmp_path / "x")])
    assert code == 2 and "--format" in err and "tflite" in err
    code, _, err = cli_main(["export", "--format", "onnx", "--out", str(tmp_path / "x")])
    assert code == 2 and "--weights" in err
    assert not (tmp_path / "x").exists()
    # one bad size among good ones: an error naming it before anything is written (not the 64 px file)
    code, _, err = cli_main(["export", "--weights", str(path), "--format", "onnx", "--img", str(IMG), "100",
                             "--out", str(tmp_path / "x")])
    assert code == 2 and "--img" in err and "; 100 is not" in err
    assert not (tmp_path / "x").exists()


def test_profile_reports_the_detectors_size_and_latencies(checkpoint):
    det, path = checkpoint
    code, stdout, err = cli_main(["profile", "--weights", str(path), "--img", str(IMG), "--runs", "3", "--warmup", "1",
                                  "--threads", "1", "--json"])
    assert code == 0, err
    res = json.loads(stdout)
    (row,) = res["rows"]
    assert row["img"] == IMG and row["params"] == det.num_params()
    assert row["gflops"] == pytest.approx(det.gflops(IMG))
    for k in ("onnx_ms", "jax_ms", "torch_ms"):
        assert row[k] > 0, k
    assert row["onnx_fps"] == pytest.approx(1e3 / row["onnx_ms"])
    assert res["threads"] == 1 and res["runs"] == 3 and res["machine"]["cpu_count"] >= 1
