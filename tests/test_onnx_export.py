"""ONNX export: parity with the JAX model, dynamic batch, in-graph NMS, the parity gate, metadata."""

from __future__ import annotations

import collections

import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
pytest.importorskip("jax2onnx")

from conftest import IMG, perturbed  # noqa: E402

import jaxyolo  # noqa: E402
from jaxyolo.errors import ConfigError, ExportError  # noqa: E402
from jaxyolo.evaluate import nms as jax_nms  # noqa: E402
from jaxyolo.evaluate import nms_numpy, split_detections  # noqa: E402
from jaxyolo.export import onnx_export as ox  # noqa: E402

TOL = 1e-4  # normalised: box columns / input size, scores as they are


def _run(model, images_nhwc):
    """Run a file or serialised model on NHWC images (transposed to the graph's NCHW)."""
    sess = ort.InferenceSession(model if isinstance(model, bytes) else str(model), providers=["CPUExecutionProvider"])
    outs = sess.run(None, {"images": np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2))})
    return dict(zip([o.name for o in sess.get_outputs()], outs))


def _normalised_diff(got, want, size):
    d = np.abs(got.astype(np.float64) - want)
    d[..., :4] /= size
    return d.max()


def _ops(model) -> collections.Counter:
    return collections.Counter(n.op_type for n in model.graph.node)


@pytest.fixture(scope="module")
def export64(tiny, tmp_path_factory):
    """The tiny implicit-head model exported at 64 with a dynamic batch; also the converted proto."""
    captured = {}
    convert = ox._convert

    def capture(*args, **kwargs):
        model = convert(*args, **kwargs)
        captured["model"] = onnx.ModelProto()
        captured["model"].CopyFrom(model)
        return model

    path = tmp_path_factory.mktemp("onnx") / "tiny64.onnx"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ox, "_convert", capture)
        report = ox.export_onnx(tiny, path, IMG, dynamic_batch=True)
    return path, report, captured["model"]


def test_export_matches_jax_with_dynamic_batch(tiny, export64):
    path, report, _ = export64
    assert report["inputs"] == [{"name": "images", "shape": ["batch", 3, IMG, IMG], "dtype": "float32"}]
    n = tiny.spec.num_anchors * sum((IMG // s) ** 2 for s in tiny.spec.strides)
    assert report["outputs"] == [{"name": "output", "shape": ["batch", n, 5 + tiny.num_classes], "dtype": "float32"}]
    assert report["opset"] == 17 and report["parity_images"] >= 2
    assert report["max_abs_diff"]["output"]["normalised"] <= TOL and report["file_size"] == path.stat().st_size
    images = np.random.default_rng(5).uniform(0, 1, (3, IMG, IMG, 3)).astype(np.float32)
    for batch in (images[:1], images):
        got = _run(path, batch)["output"]
        assert got.shape == (len(batch), n, 5 + tiny.num_classes)
        assert _normalised_diff(got, np.asarray(tiny(batch), np.float64), IMG) <= TOL


def test_checker_and_metadata(tiny, export64):
    path, _, _ = export64
    model = onnx.load(str(path))
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version >= 17
    meta = ox.read_metadata(path)
    assert meta["names"] == list(tiny.names)
    assert meta["strides"] == list(tiny.spec.strides)
    assert meta["anchors"] == [[list(wh) for wh in level] for level in tiny.spec.anchors]
    assert meta["imgsz"] == [IMG, IMG] and meta["nms"] is False and meta["dynamic_batch"] is True
    assert meta["normalisation"] == "RGB, NCHW, float32 in [0,1], letterboxed with pad 114"
    assert meta["jaxyolo_version"] == jaxyolo.__version__ and "output" in meta["output_layout"]


def test_graph_has_no_implicit_ops(tiny, export64, tmp_path):
    """The folded implicit head exports to exactly the ops of a plain Detect-head model."""
    _, _, model = export64
    plain = jaxyolo.create_model("yolov4p", num_classes=tiny.num_classes, head="detect", seed=0)
    ox.export_onnx(plain, tmp_path / "plain.onnx", IMG, dynamic_batch=True, check=False)
    assert _ops(model) == _ops(onnx.load(str(tmp_path / "plain.onnx")))
    convs = [k for k, v in tiny.fold().state_dict().items() if k.endswith("weight") and np.ndim(v) == 4]
    assert _ops(model)["Conv"] == len(convs)


def test_corrupted_weight_is_caught(tiny, export64, tmp_path, monkeypatch):
    _, _, converted = export64

    def corrupted(*args, **kwargs):
        model = onnx.ModelProto()
        model.CopyFrom(converted)
        # a head conv's bias (the only float vectors of na * (5 + nc) values): a change deep in
        # the tiny random-init network barely reaches its outputs, a logit change does
        n_out = tiny.spec.num_anchors * (5 + tiny.num_classes)
        init = next(t for t in model.graph.initializer if t.data_type == onnx.TensorProto.FLOAT
                    and t.dims and t.dims[-1] == n_out and np.prod(t.dims) == n_out)
        init.CopyFrom(onnx.numpy_helper.from_array(onnx.numpy_helper.to_array(init) + np.float32(1e-2), init.name))
        return model

    monkeypatch.setattr(ox, "_convert", corrupted)
    path = tmp_path / "bad.onnx"
    with pytest.raises(ExportError, match=r"differ .* by up to .*tolerance 0\.0001"):
        ox.export_onnx(tiny, path, IMG, dynamic_batch=True)
    assert not path.exists() and list(tmp_path.iterdir()) == []


@pytest.fixture(scope="module")
def busy():
    """A tiny model biased towards many overlapping detections (objectness and class logits up)."""
    det = perturbed(jaxyolo.create_model("yolov4p", num_classes=3, kst=3, seed=0), seed=2)
    sd = det.state_dict()
    head = f"model.{len(det.spec.layers) - 1}.m."
    for i in range(len(det.spec.strides)):
        b = sd[f"{head}{i}.bias"].reshape(det.spec.num_anchors, -1).copy()
        b[:, 4] += 6.0
        b[:, 5:] += np.array([2.0, 1.5, 1.0], np.float32)
        sd[f"{head}{i}.bias"] = b.reshape(-1)
    return det.load_state_dict(sd)


def test_nms_in_graph_equals_project_nms(busy, tmp_path, monkeypatch):
    """At a second input size (96, static batch 2): the in-graph NMS keeps the detections that the
    project's NMS (NumPy reference and JAX) keeps from the same decoded tensor.

    The decoded tensor is taken out of the graph for this: on this busy model many candidates tie
    in score, and the ~1e-7 float differences between onnxruntime's and XLA's decoded outputs
    reorder those ties and so change a few greedy NMS decisions whichever NMS runs; the decoded
    tensors themselves are compared with the JAX model by the parity gate.
    """
    size, conf, iou, max_det = 96, 0.25, 0.45, 300
    path = tmp_path / "nms.onnx"
    converted = []
    convert = ox._convert

    def capture(*args, **kwargs):
        converted.append(convert(*args, **kwargs))
        copy = onnx.ModelProto()
        copy.CopyFrom(converted[-1])
        return copy

    monkeypatch.setattr(ox, "_convert", capture)
    report = ox.export_onnx(busy, path, size, batch_size=2, nms=True, conf_thres=conf, iou_thres=iou,
                            max_det=max_det)
    assert report["max_abs_diff"]["decoded"]["normalised"] <= TOL and not report["max_abs_diff"]["nms"]["mismatch"]
    assert [o["name"] for o in report["outputs"]] == ["num_dets", "boxes", "scores", "classes"]
    assert ox.read_metadata(path)["nms"] is True
    model = onnx.load(str(path))
    model.graph.output.extend([onnx.helper.make_tensor_value_info("decoded", onnx.TensorProto.FLOAT, None)])
    images = np.random.default_rng(7).uniform(0, 1, (2, size, size, 3)).astype(np.float32)
    got = _run(model.SerializeToString(), images)
    assert got["num_dets"].shape == (2, 1) and got["num_dets"].dtype == np.int64
    assert got["boxes"].shape == (2, max_det, 4) and got["classes"].dtype == np.int64
    decoded = got["decoded"]
    assert _normalised_diff(decoded, np.asarray(busy(images), np.float64), size) <= TOL
    counts = got["num_dets"][:, 0]
    n_candidates = ((decoded[..., 5:] * decoded[..., 4:5]) > conf).sum(axis=(1, 2))
    assert (counts > 100).all() and (counts < max_det).all() and (n_candidates > 2 * counts).all()
    assert set(got["classes"].ravel().tolist()) == {0, 1, 2}
    refs = {"numpy": nms_numpy(decoded, conf_thres=conf, iou_thres=iou, max_det=max_det),
            "jax": split_detections(jax_nms(decoded, conf_thres=conf, iou_thres=iou, max_det=max_det))}
    for name, ref in refs.items():
        for i, (boxes, scores, classes) in enumerate(ref):
            c = counts[i]
            assert c == len(scores), name
            np.testing.assert_array_equal(got["classes"][i, :c], classes, err_msg=name)
            np.testing.assert_allclose(got["scores"][i, :c], scores, atol=1e-4, err_msg=name)
            np.testing.assert_allclose(got["boxes"][i, :c] / size, boxes / size, atol=1e-4, err_msg=name)
            assert not got["boxes"][i, c:].any() and not got["scores"][i, c:].any() and not got["classes"][i, c:].any()
    # max_det < the kept detections: the best max_det over all classes (checked by the gate against
    # the NumPy NMS); the graph before the NMS does not depend on max_det, so it is reused here
    monkeypatch.setattr(ox, "_convert", lambda *a, **k: converted[0])
    few = ox.export_onnx(busy, tmp_path / "few.onnx", size, batch_size=2, nms=True, conf_thres=conf,
                         iou_thres=iou, max_det=100)
    assert few["max_abs_diff"]["nms"] == {"normalised": 0.0, "raw": 0.0, "detections": 200, "mismatch": []}
    assert few["outputs"][1]["shape"] == [2, 100, 4]


def test_half_export(tiny, tmp_path):
    path = tmp_path / "half.onnx"
    report = ox.export_onnx(tiny, path, IMG, half=True)
    assert report["precision"] == "fp16" and report["tolerance"] == ox.TOLERANCE_FP16
    assert 0 < report["max_abs_diff"]["output"]["normalised"] <= ox.TOLERANCE_FP16
    model = onnx.load(str(path))
    convs = [t for t in model.graph.initializer if len(t.dims) == 4]
    assert convs and all(t.data_type == onnx.TensorProto.FLOAT16 for t in convs)
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert ox.read_metadata(path)["precision"] == "fp16"


@pytest.mark.parametrize("kw,match", [
    (dict(img_size=60), "multiples of 32"),
    (dict(img_size=64, opset=13), "opset"),
    (dict(img_size=64, batch_size=0), "batch_size"),
    (dict(img_size=64, conf_thres=-0.1), "conf_thres"),
])
def test_bad_arguments(tiny, tmp_path, kw, match):
    with pytest.raises(ConfigError, match=match):
        ox.export_onnx(tiny, tmp_path / "x.onnx", **kw)
    assert not (tmp_path / "x.onnx").exists()
