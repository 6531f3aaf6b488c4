"""The benchmark suites of `jaxyolo bench` (see `jaxyolo.bench`).

Every suite returns a JSON-ready dict. Times are medians over repeated calls after warm-up; where
two implementations are compared they run in the same process, interleaved call by call, and the
comparison is a ratio (JAX / other: below 1 means JAX is faster).
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from jaxyolo.bench.measure import PeakRSS, interleaved, median, timed
from jaxyolo.errors import ConfigError
from jaxyolo.export.latency import has_module


def synthetic_batch(batch: int, size: int, *, num_classes: int = 80, max_boxes: int = 32, augment: bool = False,
                    seed: int = 0) -> dict:
    """A host batch as the data pipeline yields it: uint8 images and padded xyxy targets (pixels);
    with `augment`, the mosaic canvas the on-device augmentation also reads."""
    rng = np.random.default_rng(seed)
    boxes = np.zeros((batch, max_boxes, 4), np.float32)
    xy = rng.uniform(0, size * 0.7, (batch, max_boxes, 2))
    boxes[..., :2], boxes[..., 2:] = xy, np.minimum(xy + rng.uniform(8, size * 0.3, (batch, max_boxes, 2)), size)
    out = {"image": rng.integers(0, 255, (batch, size, size, 3), np.uint8), "boxes": boxes,
           "classes": rng.integers(0, num_classes, (batch, max_boxes)).astype(np.int32),
           "mask": np.ones((batch, max_boxes), bool)}
    if augment:
        out.update({"mosaic": rng.integers(0, 255, (batch, 2 * size, 2 * size, 3), np.uint8),
                    "mosaic_boxes": boxes * 2, "mosaic_classes": out["classes"], "mosaic_mask": out["mask"]})
    return out


class _StepRunner:
    """A compiled population step of `det` (P members, the real `jaxyolo.train_step.population_step` on
    a mesh of the local devices) and its state; each call runs one iteration and waits for it.
    `info`: trace and compile seconds and XLA's memory estimate."""

    def __init__(self, det, cfg, batch, *, pop: int = 1, augment_fn=None, hyps=None):
        from jaxyolo import hyp as H
        from jaxyolo import train_step as T

        n = jax.device_count()
        mesh_pop = max(d for d in range(1, n + 1) if n % d == 0 and pop % d == 0)
        step = T.population_step(T.make_train_step(det, cfg, augment_fn=augment_fn), T.make_mesh(mesh_pop, n // mesh_pop))
        self.state = T.replicate(T.init_state(det), pop)
        self.hyp = H.stack(hyps or [H.load_hyp()] * pop)
        self.batch, self.pop, self.calls = batch, pop, 0
        self.compiled, self.info = _compile(step, self.state, batch, self.hyp, self._keys())

    def _keys(self):
        return jax.random.split(jax.random.key(self.calls), self.pop)

    def __call__(self):
        self.calls += 1
        self.state, metrics = self.compiled(self.state, self.batch, self.hyp, self._keys())
        jax.block_until_ready(metrics["loss"])


def _compile(step, *args):
    t0 = time.perf_counter()
    lowered = step.lower(*args)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    mem = compiled.memory_analysis()
    memory = None
    if mem is not None:
        memory = {k: round(getattr(mem, k) / 2**30, 3) for k in
                  ("temp_size_in_bytes", "argument_size_in_bytes", "output_size_in_bytes")
                  if getattr(mem, k, None) is not None}
    return compiled, {"trace_s": round(t1 - t0, 2), "compile_s": round(t2 - t1, 2), "xla_memory_gib": memory}


def train(*, model: str = "yolov4s", batch: int = 8, img: int = 320, repeats: int = 10, warmup: int = 2,
          with_torch: bool = True, kst: int = 3) -> dict:
    """One training iteration of `model` (80 classes, implicit head with `kst` candidates) at
    `batch` × `img`², no augmentation: jaxyolo's jitted step (forward, loss, backward, grouped SGD,
    EMA; the population step with P = 1) against the PyTorch mirror with the same weights and the
    reference loss (`jaxyolo.bench.torch_train`), channels_last, eager, all cores."""
    import jaxyolo
    from jaxyolo import train_step as T

    det = jaxyolo.create_model(model, num_classes=80, kst=kst)
    cfg = T.TrainConfig(epochs=300, batches_per_epoch=100, batch_size=batch, img_size=img, augment=False)
    host = synthetic_batch(batch, img)
    jax_step = _StepRunner(det, cfg, host)

    contestants = {"jax": jax_step}
    out = {"model": model, "batch": batch, "img": img, "kst": kst, "params": det.num_params(), **jax_step.info}
    if with_torch and has_module("torch"):
        import torch

        from jaxyolo import hyp as H
        from jaxyolo.bench.torch_train import TorchTrainer, ragged_targets

        trainer = TorchTrainer(det, H.load_hyp(), img_size=img)
        targets = ragged_targets(host["boxes"], host["classes"], host["mask"], img)
        contestants["torch"] = lambda: trainer.step(host["image"], targets)
        out["torch"] = {"version": torch.__version__, "threads": torch.get_num_threads(),
                        "memory_format": "channels_last", "mode": "eager"}
    elif with_torch:
        out["torch"] = None
        out["torch_skipped"] = "torch is not installed (pip install 'jaxyolo[torch]')"
    peaks = {}
    for name, fn in contestants.items():  # warm-up, and each one's working memory on its own
        with PeakRSS() as peak:
            fn()
        peaks[name] = round(peak.extra_gib, 3)
    times = interleaved(contestants, repeats=repeats, warmup=warmup)
    for name, ts in times.items():
        out[f"{name}_step_s"] = round(median(ts), 4)
        out[f"{name}_images_per_s"] = round(batch / median(ts), 2)
        out[f"{name}_peak_extra_rss_gib"] = peaks[name]
    if "torch" in times:
        out["ratio_jax_to_torch"] = round(median(times["jax"]) / median(times["torch"]), 3)
    out["repeats"], out["warmup"] = repeats, warmup
    return out


def train_breakdown(*, model: str = "yolov4s", batch: int = 8, img: int = 320, repeats: int = 5) -> dict:
    """Where the JAX train step's time goes: separately jitted pieces of it (forward in train mode,
    forward + loss, loss + gradients) against the whole step, each a median after compilation."""
    from flax import nnx

    import jaxyolo
    from jaxyolo import hyp as H
    from jaxyolo import train_step as T

    det = jaxyolo.create_model(model, num_classes=80, kst=3)
    cfg = T.TrainConfig(epochs=300, batches_per_epoch=100, batch_size=batch, img_size=img, augment=False)
    core = T.StepCore(det, cfg)
    host = synthetic_batch(batch, img)
    hyp = {k: jnp.asarray(v) for k, v in H.load_hyp().items()}
    state = T.init_state(det)
    images = T.batch_images({"image": jnp.asarray(host["image"])})
    boxes, classes, mask = (jnp.asarray(host[k]) for k in ("boxes", "classes", "mask"))
    key = jax.random.key(0)

    def forward(params, stats):
        model = nnx.merge(core.graphdef, params, stats, copy=True)
        return model(images, train=True, key=key)

    def loss(params, stats):
        raw = forward(params, stats)
        return core.detection_loss(raw, boxes, classes, mask, hyp)[0]

    raw = jax.jit(forward)(state.params, state.stats)
    pieces = {
        "forward": (jax.jit(forward), (state.params, state.stats)),
        "loss_only": (jax.jit(lambda r: core.detection_loss(r, boxes, classes, mask, hyp)[0]), (raw,)),
        "forward_loss": (jax.jit(loss), (state.params, state.stats)),
        "value_and_grad": (jax.jit(jax.value_and_grad(loss)), (state.params, state.stats)),
    }
    out = {"model": model, "batch": batch, "img": img}
    for name, (fn, args) in pieces.items():
        compiled = fn.lower(*args).compile()
        jax.block_until_ready(compiled(*args))
        out[f"{name}_s"] = round(median([timed(lambda: jax.block_until_ready(compiled(*args)))
                                         for _ in range(repeats)]), 4)
    return out


def population(*, model: str = "yolov4n", batch: int = 8, img: int = 256, pops=(1, 2, 4, 8), repeats: int = 5,
               augment: bool = False) -> dict:
    """One vmapped train step for P members (each with its own lr0 and, with augmentation, its own
    brightness gain) against P × the one-member step: the population axis's efficiency."""
    import jaxyolo
    from jaxyolo import hyp as H
    from jaxyolo import train_step as T
    from jaxyolo.augment import augment_host_batch

    det = jaxyolo.create_model(model, num_classes=80, kst=3)
    cfg = T.TrainConfig(epochs=300, batches_per_epoch=100, batch_size=batch, img_size=img, augment=augment)
    host = synthetic_batch(batch, img, augment=augment)
    base = H.load_hyp()
    rows, single = [], None
    for p in sorted(set(int(x) for x in pops)):
        hyps = [H.load_hyp({**base, "lr0": base["lr0"] * (1 + 0.1 * i), "hsv_v": min(0.9, base["hsv_v"] + 0.05 * i)})
                for i in range(p)]
        run = _StepRunner(det, cfg, host, pop=p, augment_fn=augment_host_batch if augment else None, hyps=hyps)
        run()  # the first call also places the state on the mesh
        t = median([timed(run) for _ in range(repeats)])
        single = t if p == 1 else single
        row = {"pop": p, "step_s": round(t, 4), **run.info}
        if single:
            row["ratio_to_p_times_single"] = round(t / (p * single), 3)
        rows.append(row)
    return {"model": model, "batch": batch, "img": img, "augment": augment, "devices": jax.device_count(),
            "rows": rows}


def infer(*, model: str = "yolov4s", sizes=(416, 640), runs: int = 30, warmup: int = 5) -> dict:
    """Batch-1 latency of the same (folded) weights: JAX jit, ONNX Runtime (the parity-gated
    export), PyTorch eager (the exported mirror), with ratios (`jaxyolo.export.latency.profile`)."""
    import jaxyolo
    from jaxyolo.export.latency import profile

    if not has_module("onnxruntime"):
        raise ConfigError("bench infer: onnxruntime is not installed (pip install 'jaxyolo[export]')")
    det = jaxyolo.create_model(model, num_classes=80, kst=3)
    prof = profile(det, list(sizes), runs=runs, warmup=warmup)
    rows = []
    for r in prof["rows"]:
        row = {k: r[k] for k in ("img", "params", "gflops", "onnx_ms", "jax_ms", "torch_ms")}
        row["ratio_jax_to_onnx"] = round(r["jax_ms"] / r["onnx_ms"], 3)
        if r["torch_ms"]:
            row["ratio_jax_to_torch"] = round(r["jax_ms"] / r["torch_ms"], 3)
        rows.append({k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()})
    return {"model": model, "batch": 1, "runs": runs, "warmup": warmup, "threads": prof["threads"], "rows": rows}


def evaluation(*, images: int = 300, img: int = 416, batch: int = 16, num_classes: int = 80, seed: int = 0) -> dict:
    """The evaluation path after the network: decode + NMS (jitted, conf 0.001, IoU 0.65, the
    mAP settings) on a yolov4s-shaped head output per batch, then pycocotools over all `images`.

    The head outputs are random logits with the objectness shifted down so that a realistic share
    of candidates passes the 0.001 threshold; the ground truth is random boxes. What is measured is
    the cost of the path, not a detector's quality."""
    import jaxyolo
    from jaxyolo.evaluate import coco_evaluate, detections_to_coco, nms, split_detections

    if images < 1 or batch < 1:
        raise ConfigError(f"bench eval: images and batch must be >= 1, got {images} and {batch}")
    det = jaxyolo.create_model("yolov4s", num_classes=num_classes, abstract=True)
    spec = det.spec
    rng = np.random.default_rng(seed)

    def head_output(b):
        raw = []
        for s in spec.strides:
            r = rng.normal(0, 2, (b, 3, img // s, img // s, 5 + num_classes)).astype(np.float32)
            r[..., 4] -= 6.0  # a few hundred to thousands of boxes above conf 0.001 per image
            raw.append(jnp.asarray(r))
        return raw

    post = lambda raw: nms(det.decode(raw), conf_thres=0.001, iou_thres=0.65, max_det=300)
    jax.block_until_ready(post(head_output(batch)))  # compile
    per_image, found, t_post = [], 0, 0.0
    for start in range(0, images, batch):
        b = min(batch, images - start)
        raw = head_output(batch)  # a fixed batch shape: one compiled program
        t = time.perf_counter()
        dets = post(raw)
        jax.block_until_ready(dets)
        t_post += time.perf_counter() - t
        for bx, sc, cl in split_detections(dets)[:b]:
            per_image.append((bx, sc, cl))
            found += len(sc)
    gt = {"images": [], "annotations": [], "categories": [{"id": c + 1, "name": str(c)} for c in range(num_classes)]}
    for i in range(images):
        gt["images"].append({"id": i + 1, "width": img, "height": img, "file_name": f"{i}.jpg"})
        for _ in range(rng.integers(1, 15)):
            x, y = rng.uniform(0, img * 0.8, 2)
            w, h = rng.uniform(4, img * 0.3, 2)
            gt["annotations"].append({"id": len(gt["annotations"]) + 1, "image_id": i + 1,
                                      "category_id": int(rng.integers(1, num_classes + 1)),
                                      "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
    t = time.perf_counter()
    results = detections_to_coco([d[0] for d in per_image], [d[1] for d in per_image], [d[2] for d in per_image],
                                 list(range(1, images + 1)), list(range(1, num_classes + 1)))
    t_json = time.perf_counter() - t
    t = time.perf_counter()
    coco_evaluate(gt, results)
    t_coco = time.perf_counter() - t
    return {"images": images, "img": img, "batch": batch, "detections": found,
            "decode_nms_ms_per_image": round(1e3 * t_post / images, 3),
            "to_coco_json_s": round(t_json, 3), "pycocotools_s": round(t_coco, 3),
            "total_s": round(t_post + t_json + t_coco, 3)}


def _matmul_ceiling(dtype, n: int = 8192, repeats: int = 10) -> float:
    """Measured FLOP/s of one large square matmul in `dtype` on the default device."""
    a = jnp.ones((n, n), dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, a))
    t = median([timed(lambda: jax.block_until_ready(f(a, a))) for _ in range(repeats)])
    return 2 * n**3 / t


def gpu(*, model: str = "yolov4s", batch: int = 32, img: int = 640, repeats: int = 10, warmup: int = 3,
        allow_cpu: bool = False, matmul_n: int = 8192) -> dict:
    """Training throughput in bfloat16 on an accelerator: images/s of jaxyolo's step with bf16
    compute (`dtype=bfloat16`; params, BN and the loss stay float32), model-FLOPs utilisation
    against a measured bf16 matmul ceiling, and PyTorch AMP on the same device when torch sees it.

    Model FLOPs per image = 3 × the forward's (2 × conv MACs): forward, and backward's two
    convolutions per layer. `allow_cpu` runs it on the CPU (for tests; the figures mean nothing)."""
    import jaxyolo
    from jaxyolo import train_step as T

    backend = jax.default_backend()
    if backend == "cpu" and not allow_cpu:
        return {"skipped": "no accelerator: jax.default_backend() is 'cpu' (run on a GPU or TPU machine)"}
    det = jaxyolo.create_model(model, num_classes=80, kst=3, dtype="bfloat16")
    cfg = T.TrainConfig(epochs=300, batches_per_epoch=100, batch_size=batch, img_size=img, augment=False)
    host = synthetic_batch(batch, img)
    jax_step = _StepRunner(det, cfg, jax.device_put(host))

    for _ in range(warmup):
        jax_step()
    t = median([timed(jax_step) for _ in range(repeats)])
    flops_per_image = 3 * det.gflops(img) * 1e9
    ceiling = _matmul_ceiling(jnp.bfloat16, matmul_n)
    out = {"model": model, "batch": batch, "img": img, "device": jax.devices()[0].device_kind, "backend": backend,
           **jax_step.info, "jax_step_s": round(t, 4), "jax_images_per_s": round(batch / t, 1),
           "model_flops_per_image": flops_per_image, "model_flops_per_s": flops_per_image * batch / t,
           "bf16_matmul_flops_per_s": ceiling,
           "model_tflops_per_s": round(flops_per_image * batch / t / 1e12, 2),
           "bf16_matmul_ceiling_tflops": round(ceiling / 1e12, 1),
           "mfu": round(flops_per_image * batch / t / ceiling, 4)}
    out["torch_amp"] = _torch_amp(det, host, img, repeats, warmup) if has_module("torch") else None
    if out["torch_amp"] and "images_per_s" in out["torch_amp"]:
        out["ratio_jax_to_torch_images_per_s"] = round(out["jax_images_per_s"] / out["torch_amp"]["images_per_s"], 3)
    return out


def _torch_amp(det, host, img, repeats, warmup) -> dict:
    import torch

    if not torch.cuda.is_available():
        return {"skipped": f"torch {torch.__version__} sees no CUDA device"}
    import jaxyolo
    from jaxyolo import hyp as H
    from jaxyolo.bench.torch_train import TorchTrainer, ragged_targets, yolo_loss

    f32 = jaxyolo.create_model(det.spec.name, num_classes=80, kst=3)
    trainer = TorchTrainer(f32, H.load_hyp(), img_size=img)
    dev = torch.device("cuda")
    trainer.model.to(dev)
    targets = ragged_targets(host["boxes"], host["classes"], host["mask"], img).to(dev)
    images = torch.from_numpy(host["image"]).to(dev)
    scaler = torch.amp.GradScaler("cuda")

    def step():
        x = images.permute(0, 3, 1, 2).float().div(255).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            preds = trainer.model(x)
        total, _ = yolo_loss([p.float() for p in preds], targets, anchors=trainer.anchors,
                             strides=trainer.strides, hyp=trainer.hyp)
        scaler.scale(total).backward()
        scaler.step(trainer.opt)
        scaler.update()
        trainer.opt.zero_grad(set_to_none=True)
        torch.cuda.synchronize()

    for _ in range(warmup):
        step()
    t = median([timed(step) for _ in range(repeats)])
    return {"version": torch.__version__, "step_s": round(t, 4), "images_per_s": round(host["image"].shape[0] / t, 1)}


def learn(**kw) -> dict:
    from jaxyolo.bench.learn import learn as _learn

    return _learn(**kw)


SUITES = {"train": train, "population": population, "infer": infer, "eval": evaluation, "gpu": gpu, "learn": learn}


def machine() -> dict:
    from jaxyolo.export.latency import machine as _machine

    info = _machine()
    info["devices"] = [d.device_kind for d in jax.devices()]
    info["xla_flags"] = os.environ.get("XLA_FLAGS", "")
    return info
