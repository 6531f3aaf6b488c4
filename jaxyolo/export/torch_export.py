"""Export a detector as a plain PyTorch model: the mirror module file, a JSON config, the weights.

``export_torch`` writes into ``out_dir``::

    jaxyolo_torch.py   a copy of the family's mirror (imports only torch + stdlib):
                       `jaxyolo.export.torch_mirror` (yolov4) or `jaxyolo.export.torch_mirror_gfl` (gfl)
    config.json        the resolved table (`torch_config`)
    model.pt           the state_dict (only tensors), saved with torch.save: yolov4, the reference
                       key names; gfl, the family's state_dict keys (dotted NNX paths) with
                       convolution weights in torch's (out, in, kh, kw) layout

A receiver runs it with ``import jaxyolo_torch; model = jaxyolo_torch.load(folder)``.

With ``fold_implicit=True`` the implicit head is folded (the mean of its KST candidates moves into
the head convs), so the state_dict is that of a plain ``Detect`` head; with ``fuse_bn=False`` it then
loads into the reference repositories' Detect models. ``fold_implicit=False`` keeps the weights as
they are (``ia``/``im`` keys, K candidates on their leading axis). Both options are YOLOv4's; a gfl
detector has no implicit layers, and ``fuse_bn=True`` is refused for it (its mirror keeps BatchNorms).

Parity gate. The folder is first written to a temporary sibling folder, loaded back with the
shipped module file (imported by path, as a receiver would), and run on seeded random images next
to the original (unfolded, float32) JAX detector. Only if the outputs agree is the folder renamed
into place; otherwise nothing is left and `ExportError` says by how much they differed.

The compared quantity: decoded outputs (B, N, 5 + nc) (gfl: (B, N, 4 + nc), boxes xyxy) with the
four box columns divided by the input size (x, w by the width; y, h by the height) and the scores
as they are; the gate requires max |torch - jax| <= tolerance on these. Pixel-valued boxes cannot
be held to 1e-4 in float32: widths reach 4x the largest anchor (~1800 px), where one float32 ulp
is 1.2e-4, and the convolutions of XLA and of torch round differently. Measured for yolov4s (K=3, perturbed BN and
implicit values, logits up to |7|; fp32, CPU, 2 images) at both 416 and 640: pixels 1.2e-4 (one
float32 ulp between 1024 and 2048; 2.4e-4 with fuse_bn=True), so 1e-4 in pixels fails on rounding
alone; normalised <= 5.9e-7; scores <= 1.4e-7; raw logits <= 8.1e-6. The report gives all of them:
``max_abs_diff`` (normalised, gated), ``max_abs_diff_px``, ``max_abs_diff_scores`` and
``raw_max_abs_diff`` (the per-level logits, not gated).
"""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import shutil
import sys
import tempfile
import time
from collections import OrderedDict
from pathlib import Path

import numpy as np

from jaxyolo.errors import ConfigError, ExportError

MIRROR_SOURCE = Path(__file__).with_name("torch_mirror.py")
GFL_MIRROR_SOURCE = Path(__file__).with_name("torch_mirror_gfl.py")
MODULE_FILE = "jaxyolo_torch.py"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.pt"
FORMAT = "jaxyolo-torch/1"
GFL_FORMAT = "jaxyolo-torch-gfl/1"
FAMILIES = ("yolov4", "gfl")  # the families with a PyTorch mirror
_OUR_FILES = {MODULE_FILE, CONFIG_FILE, WEIGHTS_FILE, "__pycache__"}


def _family(detector) -> str:
    name = detector.family.name
    if name not in FAMILIES:
        raise ExportError(f"export_torch: the {name} family has no PyTorch mirror (families with one: "
                          f"{', '.join(FAMILIES)})")
    return name


def torch_config(detector) -> dict:
    """The JSON config of the PyTorch mirror for `detector` (its resolved table and options)."""
    if _family(detector) == "gfl":
        return gfl_torch_config(detector)
    spec, opt = detector.spec, detector.options
    kst = detector.kst
    layers = []
    last = len(spec.layers) - 1
    for ls in spec.layers:
        module = ("IDetect" if kst else "Detect") if ls.index == last else ls.module
        layers.append({
            "index": ls.index,
            "from": list(ls.inputs),
            "module": module,
            "n": ls.n,
            "c_in": ls.c_in,
            "c_out": ls.c_out,
            "kernel": ls.kernel,
            "stride": ls.conv_stride,
            "out_stride": ls.stride,
        })
    return {
        "format": FORMAT,
        "name": spec.name,
        "nc": spec.nc,
        "act": opt.act,
        "head": "implicit" if kst else "detect",
        "kst": kst or 1,
        "kst_draw": opt.kst_draw,
        "fused": bool(opt.fused),
        "anchors": [[list(wh) for wh in level] for level in spec.anchors],
        "strides": list(spec.strides),
        "layers": layers,
        "names": list(detector.names),
    }


def gfl_torch_config(detector) -> dict:
    """The config of `torch_mirror_gfl` for a gfl detector: the resolved backbone rows (after the
    width and depth multipliers, so the mirror needs no rounding rules of its own), neck and head."""
    spec, opt = detector.spec, detector.options
    bb = spec.backbone
    return {
        "format": GFL_FORMAT,
        "name": spec.name,
        "nc": spec.nc,
        "act": opt.act,
        "dgqp": bool(opt.dgqp),
        "reg_max": spec.reg_max,
        "strides": list(spec.strides),
        "backbone": {"stem": bb.stem,
                     "stages": [[st.expand, st.kernel, st.stride, st.c_out, st.repeats, int(st.fused)]
                                for st in bb.stages],
                     "out_stages": list(bb.out_stages)},
        "neck": {"width": spec.neck_width},
        "head": {"width": spec.head_width, "stacked_convs": spec.stacked_convs, "share_levels": spec.share_levels,
                 "dgqp_topk": spec.dgqp_topk, "dgqp_width": spec.dgqp_width},
        "names": list(detector.names),
    }


def _export_state(detector) -> "OrderedDict[str, np.ndarray]":
    """The state_dict written to model.pt (a seam for tests). YOLOv4's is already in the
    reference's layout; gfl's default one holds jaxyolo's HWIO convolution weights, which torch
    wants as OIHW (the mirror's `from_jaxyolo` does the same for a receiver)."""
    state = detector.state_dict()
    if detector.family.name == "gfl":
        state = OrderedDict((k, np.transpose(v, (3, 2, 0, 1)) if np.ndim(v) == 4 else v) for k, v in state.items())
    return state


def _image_hw(img_size, stride: int) -> tuple[int, int]:
    hw = (img_size, img_size) if isinstance(img_size, (int, np.integer)) else tuple(img_size)
    if len(hw) != 2 or not all(isinstance(v, (int, np.integer)) and v > 0 for v in hw):
        raise ConfigError(f"img_size: expected a positive integer or (height, width), got {img_size!r}")
    if hw[0] % stride or hw[1] % stride:
        raise ConfigError(f"img_size: height and width must be multiples of {stride}, got {img_size!r}")
    return int(hw[0]), int(hw[1])


def import_mirror(path: str | Path, name: str | None = None):
    """Import an exported `jaxyolo_torch.py` by path (not via sys.path), as a receiver would."""
    name = name or f"_jaxyolo_torch_{secrets.token_hex(4)}"
    spec = importlib.util.spec_from_file_location(name, str(path))
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # dataclasses and pickling look modules up here while executing
    try:
        spec.loader.exec_module(module)
    finally:
        sys.modules.pop(name, None)
    return module


def _compare(detector, mirror, images: np.ndarray) -> dict:
    import torch

    x = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    with torch.no_grad():
        raw_t = [r.numpy() for r in mirror.forward_raw(x)]
        out_t = mirror.decode([torch.from_numpy(r) for r in raw_t]).numpy()
    raw_j = [np.asarray(r) for r in detector.forward_raw(images)]
    out_j = np.asarray(detector.decode(raw_j))
    if out_t.shape != out_j.shape or [r.shape for r in raw_t] != [r.shape for r in raw_j]:
        raise ExportError(f"torch parity: output shapes differ: torch {out_t.shape} vs jax {out_j.shape}")
    h, w = images.shape[1:3]
    norm = np.ones(out_j.shape[-1], np.float64)
    norm[:4] = [w, h, w, h]
    diff_px = np.abs(out_t.astype(np.float64) - out_j.astype(np.float64))
    raw_diff = max(float(np.max(np.abs(a.astype(np.float64) - b))) for a, b in zip(raw_t, raw_j))
    return {
        "max_abs_diff": float(np.max(diff_px / norm)),
        "max_abs_diff_px": float(np.max(diff_px)),
        "max_abs_diff_scores": float(np.max(diff_px[..., 4:])),
        "raw_max_abs_diff": raw_diff,
        "finite": bool(np.isfinite(out_t).all()),
    }


def export_torch(
    detector,
    out_dir: str | Path,
    img_size=640,
    *,
    fold_implicit: bool = True,
    fuse_bn: bool = False,
    check: bool = True,
    tolerance: float = 1e-4,
    seed: int = 0,
) -> dict:
    """Write `detector` as a plain PyTorch model into `out_dir` (see the module docstring).

    `img_size` (an int or (height, width)) sizes the parity images. `check` runs the parity gate:
    max abs difference of the decoded outputs, box columns divided by the input size, must be
    <= `tolerance`. An existing `out_dir` is replaced only if it holds nothing but a previous
    export. Returns a report: paths, keys, max_abs_diff (gated), max_abs_diff_px,
    raw_max_abs_diff, tolerance, seconds.
    """
    t0 = time.perf_counter()
    family = _family(detector)
    try:
        import torch
    except ImportError:
        raise ExportError("export_torch needs PyTorch: pip install 'jaxyolo[torch]'") from None
    detector.require_weights("export_torch")
    hw = _image_hw(img_size, max(detector.spec.strides))
    if not (isinstance(tolerance, (int, float)) and tolerance > 0):
        raise ConfigError(f"tolerance: must be a positive number, got {tolerance!r}")
    out_dir = Path(out_dir).absolute()
    if out_dir.exists():
        if not out_dir.is_dir() or not set(os.listdir(out_dir)) <= _OUR_FILES:
            raise ExportError(f"{out_dir}: exists and is not a previous torch export; choose another folder")
    if fuse_bn and family == "gfl":
        raise ConfigError("fuse_bn: the gfl family's PyTorch mirror keeps its BatchNorms (it has no folded form); "
                          "export with fuse_bn=False")
    if fuse_bn and not fold_implicit and detector.kst:
        raise ConfigError("fuse_bn=True needs fold_implicit=True for an implicit head (the folded BN form has "
                          "no implicit layers)")

    exported = detector
    if (fold_implicit and detector.kst) or (fuse_bn and not detector.options.fused):
        exported = detector.fold(bn=fuse_bn)
    config = torch_config(exported)
    config["img_size"] = list(hw)
    state = _export_state(exported)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        shutil.copyfile(GFL_MIRROR_SOURCE if family == "gfl" else MIRROR_SOURCE, tmp / MODULE_FILE)
        (tmp / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        tensors = OrderedDict((k, torch.from_numpy(np.array(v, order="C"))) for k, v in state.items())
        torch.save(tensors, tmp / WEIGHTS_FILE)

        report = {"out_dir": str(out_dir), "module": str(out_dir / MODULE_FILE),
                  "config": str(out_dir / CONFIG_FILE), "weights": str(out_dir / WEIGHTS_FILE),
                  "keys": len(state), "params": int(sum(np.size(v) for k, v in state.items()
                                                        if not k.endswith(("running_mean", "running_var",
                                                                           "num_batches_tracked", "anchors",
                                                                           "anchor_grid")))),
                  "folded_implicit": exported is not detector and bool(detector.kst),
                  "fused_bn": bool(config.get("fused", False)),
                  "family": family, "img_size": list(hw), "tolerance": float(tolerance), "checked": bool(check),
                  "metric": "decoded outputs, box columns / input size, scores as is"}
        if check:
            mod = import_mirror(tmp / MODULE_FILE)
            try:
                mirror = mod.load(tmp)
            except (ValueError, OSError) as e:
                raise ExportError(f"torch parity: the exported folder does not load: {e}") from None
            images = np.random.default_rng(seed).uniform(0, 1, (2, *hw, 3)).astype(np.float32)
            diffs = _compare(detector.as_float32(), mirror, images)
            report.update(diffs)
            if not diffs["finite"] or not diffs["max_abs_diff"] <= tolerance:
                raise ExportError(
                    f"torch parity: the exported model differs from the JAX model by {diffs['max_abs_diff']:.3g} "
                    f"(boxes / input size; {diffs['max_abs_diff_px']:.3g} in pixels, raw logits "
                    f"{diffs['raw_max_abs_diff']:.3g}) > tolerance {tolerance:g} at {hw[0]}x{hw[1]}; nothing written"
                )
        shutil.rmtree(tmp / "__pycache__", ignore_errors=True)
        _move_into_place(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report["seconds"] = time.perf_counter() - t0
    return report


def _move_into_place(tmp: Path, out_dir: Path) -> None:
    """Rename `tmp` to `out_dir`, replacing a previous export there."""
    if not out_dir.exists():
        os.rename(tmp, out_dir)
        return
    old = out_dir.with_name(f".{out_dir.name}.old-{secrets.token_hex(4)}")
    os.rename(out_dir, old)
    try:
        os.rename(tmp, out_dir)
    except OSError:
        os.rename(old, out_dir)
        raise
    shutil.rmtree(old, ignore_errors=True)
