"""ONNX export of a detector, built from the JAX model itself, with a parity gate.

`export_onnx(detector, path, img_size)` writes one `.onnx` file:

- **The graph** is converted by jax2onnx from the JAX forward of `detector.fold()`: the implicit
  vectors (the KST candidates' mean) and the BatchNorms are folded into the convolutions first, so
  the graph holds plain Conv / activation / MaxPool / shape ops and no implicit-layer op. Its
  op-type histogram is the same as that of a plain `head="detect"` model of the same table.
  jax2onnx wraps each NHWC convolution in Transposes to ONNX's NCHW (onnxruntime's optimiser
  removes them at load); SPPCSP's max-pools are separable rank-3 pools (`layers.max_pool_same`),
  since jax2onnx turns a `reduce_window` into a MaxPool over every axis and onnxruntime pools at
  most 3; the nearest upsampling is `jnp.repeat` (Reshape/Expand), which keeps a dynamic batch.
- **Input** ``images``: (B, 3, H, W) float32, RGB, NCHW, values in [0, 1], the image letterboxed
  onto the H x W canvas with grey 114 padding (the ONNX convention; the JAX API itself is NHWC).
  B is fixed (`batch_size`) or, with `dynamic_batch=True`, the symbolic dimension ``batch``.
- **Output without NMS** ``output``: (B, N, 5 + nc) float32, exactly `Detector.__call__`'s
  decoded tensor: centre x, centre y, width, height in pixels of the network input, objectness,
  nc class probabilities (all after sigmoid); rows level -> anchor -> y -> x.
- **Outputs with NMS in the graph** (`nms=True`), end-to-end: ``num_dets`` (B, 1) int64, ``boxes``
  (B, max_det, 4) float32 xyxy pixels, ``scores`` (B, max_det) float32, ``classes`` (B, max_det)
  int64, best first, rows at and past num_dets are zeros. Semantics are the project's
  (`jaxyolo.evaluate.nms`, multi-label and class-aware): score = objectness x class probability;
  a (box, class) pair is a candidate when objectness > conf_thres and score > conf_thres; greedy
  NMS per class suppresses IoU > iou_thres; then the max_det best pairs over all classes are kept.
  Construction: standard ONNX ops appended to the converted graph with `onnx.helper` (opset >= 17):
  Slice/Mul/Greater/Where build the (B, nc, N) score tensor (zero where objectness fails),
  Sub/Add/Concat the xyxy boxes (x1 = cx - w/2 as the project computes them), then
  ``NonMaxSuppression`` (per class, max_output_boxes_per_class = max_det, score_threshold =
  conf_thres, strict ``>`` in both thresholds as in the project); the selected scores are scattered
  (``ScatterND``) into a zero (B, nc, N) tensor, laid out box-major (B, N * nc) and ``TopK`` keeps
  the max_det best per image (ties: the lower box-major index first, i.e. the project's candidate
  order); ``GatherND`` (batch_dims=1) fetches the boxes; ``Where`` zeroes the padding. Differences
  from the project's JAX NMS: IoU is computed per class in float32 on the boxes themselves rather
  than on boxes offset by class x 4096 px (the offset is the reference's trick; in float32 it costs
  precision, so the ONNX graph is if anything closer to the exact float64 answer of
  `jaxyolo.evaluate.nms_numpy`); there is no 30000-candidate pre-limit. conf_thres must be >= 0 (a
  kept pair's score is then > 0, which marks it valid after the TopK).
- **Metadata** (``metadata_props``, strings; lists and dicts as JSON): model, family, layout (of the
  published tensor, `jaxyolo.predictions.LAYOUTS`), names, nc, strides, the family's own entries
  (YOLOv4: anchors, pixels, per level [w, h] pairs), imgsz [H, W], input, normalisation,
  output_layout, nms (and conf_thres / iou_thres / max_det when true), precision, dynamic_batch,
  batch, fold, jaxyolo_version, converter. `read_metadata(path)` gives them back decoded.
- **Other families** publish their own tensor through the same path (`Family.export_tensor`):
  ``"xyxy-scores"`` is (B, N, 4 + nc), corners then class scores, and the NMS graph reads its
  boxes and scores directly.
- **half=True**: weights and all network compute in float16 (the initializers are stored
  float16, the file is half the size); the interface stays float32: ``images`` is cast to float16
  inside the graph, the head's logits are cast back to float32 before the decode (the decode's
  pixel arithmetic is float32 as in the fp32 model), so every output keeps its fp32 dtype.

Parity gate (`check=True`, the default): after the graph is written to a temporary file next to
the destination and passes `onnx.checker.check_model(full_check=True)`, onnxruntime runs it on
`PARITY_IMAGES` seeded uniform-random images (at least one full batch) and the result is compared
with the *unfolded* detector's `__call__` (the real JAX model; a detector built with a reduced
compute dtype is compared with the same weights computed in float32).

- Metric: max |ONNX - JAX| over the decoded tensor, **normalised**: the four box columns divided by
  the input size (width for x and w, height for y and h), the objectness and class columns as they
  are. Raw pixels cannot meet 1e-4: decoded widths and heights are hundreds of pixels at any input
  size (up to 4x the largest anchor, 459 x 401 px by default; ~460 px on random images already),
  where one float32 ulp is 3e-5 to 6e-5, and the JAX fold alone already moves raw pixels by 1.2e-4
  (see the measured figures below). The raw pixel
  difference is reported too.
- Bound: `TOLERANCE_FP32` = 1e-4 (normalised); `TOLERANCE_FP16` = 1e-2 (normalised) for half;
  `tolerance=` overrides either.
- With NMS in the graph the decoded tensor is also taken out of the graph (as an extra output of
  the checking session only) and compared as above, and the in-graph NMS outputs are compared with
  a float64 NumPy implementation of the same NMS applied to that same decoded tensor: the counts
  and classes must be equal and boxes (normalised) / scores within the bound.
- If anything fails, nothing is written (the temporary file is removed; an existing file at `path`
  is left untouched) and `ExportError` says by how much the outputs differed and the bound.
- The report's `max_abs_diff` holds, per compared output, the ``normalised`` and ``raw`` maxima:
  ``output`` (without NMS) or ``decoded`` and ``nms`` (with NMS; ``nms`` also lists the images
  whose detections differ, which fails the gate, and the number of detections compared).

Measured (`export_onnx` on yolov4s, 80 classes, K=3, BatchNorms
and implicit vectors perturbed away from their init so that the fold matters; 2 seeded random
images; CPU onnxruntime 1.31, jax2onnx 0.17.1; a 2-core machine shared with a training run):

=========  =========  =================  ===================  ==========================
img_size   precision  max diff raw (px)  max diff normalised  file size
=========  =========  =================  ===================  ==========================
416        fp32       1.2e-4             2.9e-7               37.4 MB
640        fp32       1.2e-4             1.9e-7               37.4 MB
640 + NMS  fp32       1.5e-4             2.4e-7               37.4 MB (dynamic batch, 2)
416        fp16       2.3e-2             6.3e-5               18.7 MB
640        fp16       2.3e-2             6.3e-5               18.7 MB
=========  =========  =================  ===================  ==========================

The tiny test model (yolov4p) gives 1.9e-6 normalised in fp32 and 3.3e-4 in fp16. The fp16 error
is set by float16's 11-bit significand on the activations (relative 5e-4); a trained model's larger
logits scale it up, hence the bound 1e-2, well above the measured values. The fp32 bound has
a 50x (tiny) to 300x (yolov4s) margin. The gate catches what moves the outputs beyond the bound (a wrong op, layout or head
weight does by orders of magnitude); a small error deep inside a network whose outputs barely
depend on it (adding 1e-2 to one mid-network conv of the random-init tiny model moves its scores
by 1e-7) can pass unseen, as it would in any output comparison. Export of yolov4s takes 3-6 s of
conversion (plus ~15 s the first time in a process: jax2onnx imports all its plugins) and 2-11 s of
parity check (mostly compiling the JAX reference).
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo.errors import ConfigError, ExportError
from jaxyolo.evaluate import nms_numpy
from jaxyolo.files import quiet_logger

TOLERANCE_FP32 = 1e-4
TOLERANCE_FP16 = 1e-2
PARITY_IMAGES = 2
MIN_OPSET = 17
INPUT_NAME = "images"
OUTPUT_NAME = "output"
NMS_OUTPUTS = ("num_dets", "boxes", "scores", "classes")
NORMALISATION = "RGB, NCHW, float32 in [0,1], letterboxed with pad 114"
_DYNAMIC_DIM = "batch"
_JSON_KEYS = ("names", "strides", "anchors", "imgsz", "nms", "dynamic_batch", "batch", "nc", "conf_thres",
              "iou_thres", "max_det")


# ------------------------------------------------------------------------------------------- API


def export_onnx(
    detector,
    path,
    img_size,
    *,
    dynamic_batch: bool = False,
    batch_size: int = 1,
    nms: bool = False,
    half: bool = False,
    opset: int = MIN_OPSET,
    conf_thres: float = 0.25,
    iou_thres: float = 0.45,
    max_det: int = 100,
    check: bool = True,
    tolerance: float | None = None,
    seed: int = 0,
) -> dict:
    """Export `detector` to an ONNX file at `path` for `img_size` (an int or (height, width)).

    Returns a report: path, inputs and outputs (name, shape, dtype), opset, precision, nms,
    max_abs_diff (per compared output: normalised and raw), tolerance, metric, parity_images,
    seconds (total and per stage), file_size (bytes). See the module docstring for the graph's
    interface, the NMS construction and the parity gate. Raises ConfigError on a bad argument and
    ExportError when the export cannot be built or fails its gate (then nothing is written).
    """
    t_start = time.perf_counter()
    h, w = _check_args(detector, img_size, batch_size, opset, conf_thres, iou_thres, max_det, tolerance)
    onnx = _require("onnx")
    _require("jax2onnx")
    if check:
        _require("onnxruntime")
    path = Path(path)
    tol = float(tolerance) if tolerance is not None else (TOLERANCE_FP16 if half else TOLERANCE_FP32)
    spec, family = detector.spec, detector.family
    batch = _DYNAMIC_DIM if dynamic_batch else int(batch_size)

    seconds = {}
    t = time.perf_counter()
    module = _inference_module(detector, half=half)
    try:
        model = _convert(module, family, spec, (h, w), batch=batch, half=half, opset=opset,
                         output_name="decoded" if nms else OUTPUT_NAME)
    except ExportError:
        raise
    except Exception as e:  # jax2onnx raises many kinds on an unsupported primitive
        raise ExportError(f"export_onnx: jax2onnx could not convert {spec.name} ({type(e).__name__}: {e})") from e
    n_boxes = model.graph.output[0].type.tensor_type.shape.dim[1].dim_value  # the published tensor's N
    if nms:
        _append_nms(model, "decoded", layout=family.export_layout, nc=spec.nc, n_boxes=n_boxes,
                    conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
    seconds["convert"] = time.perf_counter() - t

    del model.graph.value_info[:]  # jax2onnx's intermediate shapes; onnxruntime infers its own
    meta = _metadata(detector, (h, w), n_boxes, batch=batch, nms=nms, half=half, conf_thres=conf_thres,
                     iou_thres=iou_thres, max_det=max_det)
    onnx.helper.set_model_props(model, {k: v if isinstance(v, str) else json.dumps(v) for k, v in meta.items()})
    model.producer_name, model.producer_version = "jaxyolo", meta["jaxyolo_version"]
    model.doc_string = f"{spec.name} exported by jaxyolo: input {INPUT_NAME} ({NORMALISATION}); {meta['output_layout']}"
    t = time.perf_counter()
    try:
        onnx.checker.check_model(model, full_check=True)
    except Exception as e:
        raise ExportError(f"export_onnx: the converted graph fails onnx.checker (full_check): {e}") from e
    seconds["checker"] = time.perf_counter() - t

    report = {"path": str(path), "model": spec.name, "opset": int(opset), "precision": "fp16" if half else "fp32",
              "nms": bool(nms), "dynamic_batch": bool(dynamic_batch),
              "inputs": _io_report(model.graph.input), "outputs": _io_report(model.graph.output),
              "tolerance": tol, "metric": "max |onnx - jax|; box columns / input size, scores as they are",
              "max_abs_diff": {}, "parity_images": 0, "checked": bool(check)}
    with _staging(path) as tmp:
        data = model.SerializeToString()
        tmp.write_bytes(data)
        if check:
            t = time.perf_counter()
            diffs, n_img = _parity(detector, model, tmp, (h, w), batch=batch, nms=nms, conf_thres=conf_thres,
                                   iou_thres=iou_thres, max_det=max_det, seed=seed)
            seconds["parity"] = time.perf_counter() - t
            report["max_abs_diff"], report["parity_images"] = diffs, n_img
            worst = max(d["normalised"] for d in diffs.values())
            if not worst <= tol or any(d.get("mismatch") for d in diffs.values()):
                detail = "; ".join(f"{k}: {_fmt_diff(d)}" for k, d in diffs.items())
                raise ExportError(
                    f"export_onnx: parity gate failed for {spec.name} at {h}x{w} ({report['precision']}): the "
                    f"ONNX outputs differ from the JAX model by up to {worst:.3g} (normalised: boxes / input size), "
                    f"tolerance {tol:.3g} [{detail}]; nothing was written to {path}")
    seconds["total"] = time.perf_counter() - t_start
    report["seconds"] = seconds
    report["file_size"] = path.stat().st_size
    return report


def read_metadata(path_or_model) -> dict:
    """The metadata of an exported file (or ModelProto), JSON values decoded."""
    onnx = _require("onnx")
    model = path_or_model if isinstance(path_or_model, onnx.ModelProto) else onnx.load(str(path_or_model),
                                                                                        load_external_data=False)
    out = {}
    for p in model.metadata_props:
        out[p.key] = json.loads(p.value) if p.key in _JSON_KEYS else p.value
    return out


# ---------------------------------------------------------------------------------- conversion


def _convert(module, family, spec, hw, *, batch, half: bool, opset: int, output_name: str):
    """The inference module -> ONNX ModelProto: NCHW float32 `images` -> the family's published
    tensor (B, N, C) (YOLOv4: decoded (B, N, 5 + nc))."""
    from jax2onnx import to_onnx

    h, w = hw

    def forward(images):
        x = jnp.transpose(images, (0, 2, 3, 1))  # NCHW -> the model's NHWC
        if half:
            x = x.astype(jnp.float16)
        return family.export_tensor(module(x), spec)  # the decodes compute in float32

    from jaxyolo.models.conv import grad_mode

    # the plain convolutions (one Conv node per layer), not the CPU forms training uses
    with quiet_logger("onnx_ir", logging.ERROR), grad_mode("xla"):
        return to_onnx(forward, [(batch, 3, h, w)], opset=opset, model_name=spec.name,
                       input_names=[INPUT_NAME], output_names=[output_name])


def _inference_module(detector, *, half: bool):
    """The family's inference module (YOLOv4: folded) computing in float32 (float16 weights and
    compute if `half`)."""
    from flax import nnx

    folded = detector.family.inference_module(detector.as_float32().model)
    if not half:
        return folded
    graphdef, state = nnx.split(folded)
    state = jax.tree.map(lambda a: a.astype(jnp.float16) if jnp.issubdtype(a.dtype, jnp.floating) else a, state)
    return nnx.merge(graphdef, state)


# ----------------------------------------------------------------------------------- NMS graph


def _append_nms(model, decoded: str, *, layout: str, nc: int, n_boxes: int, conf_thres: float, iou_thres: float,
                max_det: int) -> None:
    """Append the end-to-end NMS (module docstring) after tensor `decoded`, a tensor in `layout`
    (`jaxyolo.predictions.LAYOUTS`); replace the outputs."""
    from onnx import TensorProto, helper, numpy_helper

    g = model.graph
    p = "nms/"
    no = 5 + nc
    k = min(max_det, n_boxes * nc)
    inits = {
        "i2": np.array([2], np.int64), "i4": np.array([4], np.int64), "i5": np.array([5], np.int64),
        "i0": np.array([0], np.int64), "ino": np.array([no], np.int64), "i1": np.array([1], np.int64),
        "conf": np.array([conf_thres], np.float32), "iou": np.array([iou_thres], np.float32),
        "max_out": np.array([max_det], np.int64), "k": np.array([k], np.int64), "zero": np.array(0, np.float32),
        "two": np.array(2, np.float32), "flat": np.array([-1, n_boxes * nc], np.int64),
        "nc": np.array(nc, np.int64), "last_box": np.array(n_boxes - 1, np.int64), "zero_i": np.array(0, np.int64),
        "inc4": np.array([4 + nc], np.int64),
    }
    if k < max_det:
        inits["pads"] = np.array([0, 0, 0, max_det - k], np.int64)
    g.initializer.extend(numpy_helper.from_array(v, p + n) for n, v in inits.items())

    def node(op, ins, outs, **attrs):
        g.node.append(helper.make_node(op, [i if i.startswith(p) or i == decoded else p + i for i in ins],
                                       [p + o if not o.startswith(p) and o not in NMS_OUTPUTS else o for o in outs],
                                       name=p + outs[0], **attrs))

    if layout == "xywh-obj-cls":
        # scores (B, nc, N): objectness x class probability, zero where objectness <= conf_thres
        node("Slice", [decoded, "i0", "i2", "i2"], ["xy"])
        node("Slice", [decoded, "i2", "i4", "i2"], ["wh"])
        node("Slice", [decoded, "i4", "i5", "i2"], ["obj"])
        node("Slice", [decoded, "i5", "ino", "i2"], ["cls"])
        node("Mul", ["cls", "obj"], ["score"])
        node("Greater", ["obj", "conf"], ["obj_ok"])
        node("Where", ["obj_ok", "score", "zero"], ["score_ok"])
        node("Transpose", ["score_ok"], ["scores_cn"], perm=[0, 2, 1])
        # boxes (B, N, 4) xyxy: centre -/+ size / 2
        node("Div", ["wh", "two"], ["half_wh"])
        node("Sub", ["xy", "half_wh"], ["x1y1"])
        node("Add", ["xy", "half_wh"], ["x2y2"])
        node("Concat", ["x1y1", "x2y2"], ["xyxy"], axis=2)
    elif layout == "xyxy-scores":
        node("Slice", [decoded, "i0", "i4", "i2"], ["xyxy"])
        node("Slice", [decoded, "i4", "inc4", "i2"], ["score_ok"])
        node("Transpose", ["score_ok"], ["scores_cn"], perm=[0, 2, 1])
    else:
        raise ExportError(f"export_onnx: no NMS graph for the output layout {layout!r}")
    # per-class greedy NMS; IoU is symmetric in x and y, so xyxy serves for ONNX's yxyx corners
    node("NonMaxSuppression", ["xyxy", "scores_cn", "max_out", "iou", "conf"], ["selected"], center_point_box=0)
    node("GatherND", ["scores_cn", "selected"], ["selected_scores"])
    node("Shape", ["scores_cn"], ["scores_shape"])
    node("ConstantOfShape", ["scores_shape"], ["zeros"],
         value=helper.make_tensor("value", TensorProto.FLOAT, [1], [0.0]))
    node("ScatterND", ["zeros", "selected", "selected_scores"], ["kept_cn"])
    # the max_det best (box, class) pairs per image, box-major order as the project's candidates
    node("Transpose", ["kept_cn"], ["kept_nc"], perm=[0, 2, 1])
    node("Reshape", ["kept_nc", "flat"], ["kept_flat"])
    node("TopK", ["kept_flat", "k"], ["top_k_scores", "top_k_index"], axis=-1, largest=1, sorted=1)
    if k < max_det:  # fewer (box, class) pairs than max_det: pad with zero scores
        node("Pad", ["top_k_scores", "pads"], ["top_scores"])
        node("Pad", ["top_k_index", "pads"], ["top_index"])
    else:
        node("Identity", ["top_k_scores"], ["top_scores"])
        node("Identity", ["top_k_index"], ["top_index"])
    node("Greater", ["top_scores", "zero"], ["valid"])
    node("Cast", ["valid"], ["valid_i"], to=TensorProto.INT64)
    node("ReduceSum", ["valid_i", "i1"], ["num_dets"], keepdims=1)
    node("Div", ["top_index", "nc"], ["box_index_raw"])
    node("Min", ["box_index_raw", "last_box"], ["box_index"])
    node("Mod", ["top_index", "nc"], ["class_index"])
    node("Unsqueeze", ["box_index", "i2"], ["box_index3"])
    node("GatherND", ["xyxy", "box_index3"], ["top_boxes"], batch_dims=1)
    node("Unsqueeze", ["valid", "i2"], ["valid3"])
    node("Where", ["valid3", "top_boxes", "zero"], ["boxes"])
    node("Where", ["valid", "top_scores", "zero"], ["scores"])
    node("Where", ["valid", "class_index", "zero_i"], ["classes"])

    b = g.output[0].type.tensor_type.shape.dim[0]
    bdim = b.dim_param if b.HasField("dim_param") else b.dim_value
    del g.output[:]
    g.output.extend([
        helper.make_tensor_value_info("num_dets", TensorProto.INT64, [bdim, 1]),
        helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [bdim, max_det, 4]),
        helper.make_tensor_value_info("scores", TensorProto.FLOAT, [bdim, max_det]),
        helper.make_tensor_value_info("classes", TensorProto.INT64, [bdim, max_det]),
    ])


# -------------------------------------------------------------------------------- parity gate


def _parity(detector, model, file: Path, hw, *, batch, nms, conf_thres, iou_thres, max_det, seed):
    """Run `file` in onnxruntime on seeded random images; differences to the JAX model per output."""
    import onnxruntime as ort

    h, w = hw
    b = PARITY_IMAGES if batch == _DYNAMIC_DIM else int(batch)
    n_img = b * max(1, math.ceil(PARITY_IMAGES / b))
    images = np.random.default_rng(seed).uniform(0, 1, (n_img, 3, h, w)).astype(np.float32)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    try:
        if nms:  # expose the decoded tensor too: a copy of the graph with one more output
            import onnx

            probe = onnx.load(str(file))
            probe.graph.output.extend([onnx.helper.make_tensor_value_info("decoded", onnx.TensorProto.FLOAT, None)])
            sess = ort.InferenceSession(probe.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        else:
            sess = ort.InferenceSession(str(file), opts, providers=["CPUExecutionProvider"])
        names = [o.name for o in sess.get_outputs()]
        runs = [dict(zip(names, sess.run(None, {INPUT_NAME: images[i:i + b]}))) for i in range(0, n_img, b)]
    except Exception as e:
        raise ExportError(f"export_onnx: onnxruntime cannot run the exported graph ({type(e).__name__}: {e})") from e
    got = {k: np.concatenate([r[k] for r in runs]) for k in names}

    reference = detector.as_float32()
    want = np.concatenate([np.asarray(reference(images[i:i + b].transpose(0, 2, 3, 1))) for i in range(0, n_img, b)])
    decoded = got["decoded" if nms else OUTPUT_NAME]
    scale = np.array([w, h, w, h], np.float32)
    diffs = {"decoded" if nms else OUTPUT_NAME: _diff(decoded, want, scale)}
    if nms:
        ref = nms_numpy(decoded, layout=detector.family.export_layout, conf_thres=conf_thres, iou_thres=iou_thres,
                        max_det=max_det)
        counts = got["num_dets"][:, 0]
        mismatch = [i for i, r in enumerate(ref) if counts[i] != len(r[1]) or
                    not np.array_equal(got["classes"][i, :counts[i]], r[2])]
        rb = np.zeros_like(got["boxes"])
        rs = np.zeros_like(got["scores"])
        for i, (bx, sc, _) in enumerate(ref):
            if i not in mismatch:
                rb[i, :len(sc)], rs[i, :len(sc)] = bx, sc
        box_d = _diff(got["boxes"], rb, None, box_scale=scale)
        diffs["nms"] = {"normalised": max(box_d["normalised"], float(np.abs(got["scores"] - rs).max(initial=0))),
                        "raw": max(box_d["raw"], float(np.abs(got["scores"] - rs).max(initial=0))),
                        "detections": int(counts.sum()),
                        "mismatch": [int(i) for i in mismatch]}
    return diffs, n_img


def _diff(got, want, scale, *, box_scale=None):
    """Max abs difference, raw and with box columns divided by the input size."""
    d = np.abs(got.astype(np.float64) - want.astype(np.float64))
    if d.size == 0:
        return {"normalised": 0.0, "raw": 0.0}
    s = scale if scale is not None else box_scale
    norm = d.copy()
    norm[..., :4] /= s
    return {"normalised": float(norm.max()), "raw": float(d.max())}


def _fmt_diff(d: dict) -> str:
    s = f"normalised {d['normalised']:.3g}, raw {d['raw']:.3g}"
    if d.get("mismatch"):
        s += f", detections differ in images {d['mismatch']}"
    return s


# ---------------------------------------------------------------------------------------- misc


def _check_args(detector, img_size, batch_size, opset, conf_thres, iou_thres, max_det, tolerance):
    detector.require_weights("export_onnx")
    if isinstance(img_size, (int, np.integer)):
        h = w = int(img_size)
    else:
        try:
            h, w = (int(v) for v in img_size)
        except (TypeError, ValueError):
            raise ConfigError(f"img_size: expected an int or (height, width), got {img_size!r}") from None
    stride = max(detector.spec.strides)
    if h <= 0 or w <= 0 or h % stride or w % stride:
        raise ConfigError(f"img_size: height and width must be positive multiples of {stride}, got {h}x{w}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ConfigError(f"batch_size: must be an integer >= 1, got {batch_size!r}")
    if not isinstance(opset, (int, np.integer)) or opset < MIN_OPSET:
        raise ConfigError(f"opset: must be an integer >= {MIN_OPSET}, got {opset!r}")
    if not 0 <= conf_thres < 1:
        raise ConfigError(f"conf_thres: must be in [0, 1), got {conf_thres!r}")
    if not 0 <= iou_thres <= 1:
        raise ConfigError(f"iou_thres: must be in [0, 1], got {iou_thres!r}")
    if not isinstance(max_det, (int, np.integer)) or max_det < 1:
        raise ConfigError(f"max_det: must be an integer >= 1, got {max_det!r}")
    if tolerance is not None and not tolerance > 0:
        raise ConfigError(f"tolerance: must be > 0, got {tolerance!r}")
    return h, w


def _require(module: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ExportError(f"export_onnx needs the '{module}' package: pip install 'jaxyolo[export]'") from None


def _metadata(detector, hw, n_boxes: int, *, batch, nms, half, conf_thres, iou_thres, max_det) -> dict:
    from importlib.metadata import PackageNotFoundError, version

    import jaxyolo

    try:
        converter = f"jax2onnx {version('jax2onnx')}"
    except PackageNotFoundError:
        converter = "jax2onnx"

    spec, family = detector.spec, detector.family
    nc = spec.nc
    yolo = family.export_layout == "xywh-obj-cls"
    if nms:
        score = "objectness x class probability" if yolo else "class score"
        layout = (f"num_dets (B, 1) int64; boxes (B, {max_det}, 4) float32 xyxy pixels of the network input; "
                  f"scores (B, {max_det}) float32 {score}; classes (B, {max_det}) int64; "
                  "best first, zeros past num_dets; multi-label class-aware NMS")
    elif yolo:
        layout = (f"output (B, {n_boxes}, {5 + nc}) float32: centre x, centre y, width, height (pixels of the "
                  f"network input), objectness, {nc} class probabilities, all after sigmoid; rows level -> anchor "
                  "-> y -> x")
    else:
        layout = (f"output (B, {n_boxes}, {4 + nc}) float32: x1, y1, x2, y2 (pixels of the network input), "
                  f"{nc} class scores")
    meta = {
        "model": spec.name,
        "family": family.name,
        "layout": family.export_layout,
        "names": list(detector.names),
        "nc": nc,
        "strides": [int(s) for s in spec.strides],
        **family.export_metadata(spec, detector.options),
        "imgsz": [int(hw[0]), int(hw[1])],
        "input": INPUT_NAME,
        "normalisation": NORMALISATION,
        "output_layout": layout,
        "nms": bool(nms),
        "precision": "fp16" if half else "fp32",
        "dynamic_batch": batch == _DYNAMIC_DIM,
        "batch": None if batch == _DYNAMIC_DIM else int(batch),
        "fold": family.fold_description(detector.model),
        "jaxyolo_version": jaxyolo.__version__,
        "converter": converter,
    }
    if nms:
        meta.update(conf_thres=float(conf_thres), iou_thres=float(iou_thres), max_det=int(max_det))
    return meta


def _io_report(values) -> list[dict]:
    from onnx import helper

    out = []
    for v in values:
        t = v.type.tensor_type
        shape = [d.dim_param if d.HasField("dim_param") else int(d.dim_value) for d in t.shape.dim]
        out.append({"name": v.name, "shape": shape, "dtype": helper.tensor_dtype_to_np_dtype(t.elem_type).name})
    return out


@contextmanager
def _staging(path: Path):
    """A temporary file for `path`: moved onto `path` when the block succeeds, else removed."""
    parent = path.parent if path.parent.is_dir() else None
    tmpdir = None if parent is not None else tempfile.mkdtemp(prefix="jaxyolo-onnx-")
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=parent or tmpdir)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        path.parent.mkdir(parents=True, exist_ok=True)
        if parent is not None:
            os.replace(tmp, path)
        else:
            shutil.move(str(tmp), str(path))
    finally:
        tmp.unlink(missing_ok=True)
        if tmpdir is not None:
            shutil.rmtree(tmpdir, ignore_errors=True)
