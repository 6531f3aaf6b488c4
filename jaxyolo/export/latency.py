"""The deployment profile (the paper's Table 5, on the machine at hand).

For each input size: parameters, GFLOPs (2 x conv multiply-accumulates, `Detector.gflops`), and
the batch-1 latency of the same weights three ways, each the median of `runs` calls after
`warmup` calls:

* ONNX: the parity-gated export (`export_onnx`, implicit layers and BN folded) in onnxruntime
  (CPU provider, `threads` intra-op threads, graph optimisations on) -- the deployment number,
  and its implied FPS;
* JAX: the folded detector's forward + decode under `jax.jit` (XLA's own thread pool: all cores);
* PyTorch: the exported mirror (`export_torch`, the same fold) in eager mode under
  `torch.inference_mode()` with `threads` threads, when torch is installed.

Latency excludes pre-processing and NMS. Random input images are used: latency does not depend on
the pixel values or on what the weights have learned.
"""

from __future__ import annotations

import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np


def median_ms(fn, *, runs: int, warmup: int) -> float:
    """Median wall time of `fn()` in milliseconds over `runs` calls after `warmup` calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * statistics.median(times)


def onnx_latency(path: str | Path, img_size: int, *, threads: int, runs: int, warmup: int) -> float:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    inp = sess.get_inputs()[0]
    dtype = np.float16 if "float16" in inp.type else np.float32
    x = np.random.default_rng(0).uniform(0, 1, (1, 3, img_size, img_size)).astype(dtype)
    return median_ms(lambda: sess.run(None, {inp.name: x}), runs=runs, warmup=warmup)


def jax_latency(folded, img_size: int, *, runs: int, warmup: int) -> float:
    """`folded`: the detector's inference form (`Family.inference_module`; YOLOv4: `Detector.fold()`)."""
    import jax

    x = jax.numpy.asarray(np.random.default_rng(0).uniform(0, 1, (1, img_size, img_size, 3)).astype(np.float32))
    return median_ms(lambda: jax.block_until_ready(folded(x)), runs=runs, warmup=warmup)


def torch_latency(folder: str | Path, img_size: int, *, threads: int, runs: int, warmup: int) -> float:
    import torch

    from jaxyolo.export.torch_export import import_mirror

    model = import_mirror(Path(folder) / "jaxyolo_torch.py").load(folder).eval()  # as a receiver loads it
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.from_numpy(np.random.default_rng(0).uniform(0, 1, (1, 3, img_size, img_size)).astype(np.float32))
        x = x.contiguous(memory_format=torch.channels_last)
        model = model.to(memory_format=torch.channels_last)

        def run():
            with torch.inference_mode():
                model(x)

        return median_ms(run, runs=runs, warmup=warmup)
    finally:
        torch.set_num_threads(old)


def has_module(module: str) -> bool:
    """Whether `module` can be imported (without importing it)."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


def profile(detector, img_sizes, *, runs: int = 50, warmup: int = 10, threads: int | None = None,
            with_torch: bool = True, with_jax: bool = True, workdir: str | Path | None = None, keep_onnx: str | Path | None = None) -> dict:
    """Table-5 rows for `detector` at each size in `img_sizes` (see the module docstring).
    `keep_onnx`: a folder to keep the timed ONNX files in (`model-<size>.onnx`)."""
    from jaxyolo.errors import ConfigError
    from jaxyolo.export.onnx_export import export_onnx

    if runs < 1 or warmup < 0:
        raise ConfigError(f"profile: runs must be >= 1 and warmup >= 0, got runs={runs}, warmup={warmup}")
    threads = threads or os.cpu_count() or 1
    with_torch = with_torch and has_module("torch")
    rows = []
    with tempfile.TemporaryDirectory(dir=workdir) as tmp:
        tmp = Path(tmp)
        torch_dir = None
        if with_torch:
            from jaxyolo.export.torch_export import export_torch

            torch_dir = tmp / "torch"
            export_torch(detector, torch_dir, img_sizes[0])
        # the family's deployable form (YOLOv4: implicit vectors and BatchNorms folded)
        folded = detector.with_model(detector.family.inference_module(detector.model)) if with_jax else None
        for s in img_sizes:
            onnx_path = (Path(keep_onnx) if keep_onnx else tmp) / f"model-{s}.onnx"
            report = export_onnx(detector, onnx_path, s)
            onnx_ms = onnx_latency(onnx_path, s, threads=threads, runs=runs, warmup=warmup)
            row = {"img": s, "params": detector.num_params(), "gflops": detector.gflops(s),
                   "onnx_ms": onnx_ms, "onnx_fps": 1e3 / onnx_ms,
                   "jax_ms": jax_latency(folded, s, runs=runs, warmup=warmup) if with_jax else None,
                   "torch_ms": torch_latency(torch_dir, s, threads=threads, runs=runs, warmup=warmup)
                   if torch_dir else None,
                   "onnx_parity_max_abs_diff": report.get("max_abs_diff"),
                   "onnx_file": str(onnx_path) if keep_onnx else None}
            rows.append(row)
    return {"model": detector.spec.name, "rows": rows, "runs": runs, "warmup": warmup, "threads": threads,
            "machine": machine()}


def machine() -> dict:
    import jax

    info = {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "jax": jax.__version__,
            "jax_backend": jax.default_backend()}
    for mod in ("onnxruntime", "torch"):
        if has_module(mod):
            info[mod] = __import__(mod).__version__
    return info
