"""`jaxyolo bench`: measure jaxyolo against PyTorch and ONNX Runtime on this machine.

    jaxyolo bench [--suite train,population,infer,eval,gpu,learn|all] [--json FILE] [--quick]
    jaxyolo bench --suite learn [--peer-python PEER_VENV/bin/python] [--train-images 1000] [--epochs 30]

Suites (`jaxyolo.bench.suites`): `train` (yolov4s step at batch 8, 320², JAX against the PyTorch
mirror, interleaved, with compile time and memory), `population` (one vmapped step for P members
against P single steps), `infer` (batch-1 latency, JAX / ONNX Runtime / PyTorch at 416 and 640),
`eval` (decode + NMS + pycocotools over 300 images), `gpu` (bf16 training throughput and model-FLOPs
utilisation; skipped without an accelerator), `learn` (held-out AP per epoch and wall time of a
model trained on a generated set, beside ultralytics and yolov5 on the same files when
`--peer-python` names a Python that has them; `jaxyolo.bench.learn`; minutes to hours, so not part
of `all`). `--quick` shrinks every suite to a tiny model and
sizes: a smoke run of the commands, not figures to quote.
"""

from __future__ import annotations

import datetime
import json

from jaxyolo.errors import ConfigError
from jaxyolo.files import atomic_write_text

ORDER = ("train", "population", "infer", "eval", "gpu", "learn")
ALL = ORDER[:-1]  # `all`: every suite but learn, which trains models for minutes to hours
QUICK = {
    "train": {"model": "yolov4p", "batch": 2, "img": 64, "repeats": 2, "warmup": 1},
    "population": {"model": "yolov4p", "batch": 2, "img": 64, "pops": (1, 2), "repeats": 2},
    "infer": {"model": "yolov4p", "sizes": (64,), "runs": 3, "warmup": 1},
    "eval": {"images": 20, "img": 64, "batch": 8},
    "gpu": {"model": "yolov4p", "batch": 2, "img": 64, "repeats": 2, "warmup": 1, "matmul_n": 256},
    "learn": {"model": "yolov4p", "train": 32, "val": 8, "epochs": 2, "img": 64, "batch": 8},
}


def add_parser(subparsers):
    p = subparsers.add_parser("bench", help="benchmarks: train step vs PyTorch, population, inference, evaluation, "
                                            "GPU, learning against peer libraries")
    p.add_argument("--suite", default="all",
                   help=f"comma-separated suites of {', '.join(ORDER)}, or 'all' ({', '.join(ALL)}; the default)")
    p.add_argument("--json", help="write the results (with machine, versions and date) to this JSON file")
    p.add_argument("--model", help="model of the train, infer and gpu suites (default yolov4s)")
    p.add_argument("--batch", type=int, help="batch of the train suite (default 8)")
    p.add_argument("--img", type=int, help="image size of the train suite (default 320)")
    p.add_argument("--repeats", type=int, help="timed calls per figure in the train suite (default 10)")
    p.add_argument("--breakdown", action="store_true",
                   help="train suite: also time the step's pieces (forward, loss, gradients) on their own")
    p.add_argument("--quick", action="store_true", help="tiny model and sizes: a smoke run, not figures to quote")
    learn = p.add_argument_group("learn suite (defaults: yolov4n, detect head, 1000/200 images, 30 epochs, 128 px, batch 32)")
    learn.add_argument("--peer-python", help="a Python with ultralytics and yolov5 (benchmarks/peers/README.md)")
    learn.add_argument("--train-images", type=int, help="generated training images (default 1000)")
    learn.add_argument("--val-images", type=int, help="generated held-out images (default 200)")
    learn.add_argument("--epochs", type=int, help="training epochs of every system (default 30)")
    learn.add_argument("--hyp", help="jaxyolo's hyp (default: the model family's default file)")
    learn.add_argument("--head", choices=("detect", "implicit"), help="jaxyolo's head, for a YOLOv4 model (default detect)")
    learn.add_argument("--out", help="run folder of the learn suite (default runs/bench/learn)")
    p.set_defaults(func=run)
    return p


def parse_suites(text: str) -> list[str]:
    names = [s.strip() for s in text.split(",") if s.strip()]
    if names == ["all"]:
        return list(ALL)
    unknown = [n for n in names if n not in ORDER]
    if unknown or not names:
        raise ConfigError(f"--suite: unknown suite(s) {', '.join(unknown) or '(none given)'}; "
                          f"choose from {', '.join(ORDER)} or 'all'")
    return [n for n in ORDER if n in names]


def suite_options(name: str, args) -> dict:
    opts = dict(QUICK[name]) if args.quick else {}
    if name in ("train", "infer", "gpu") and args.model:
        opts["model"] = args.model
    if name == "train":
        for key in ("batch", "img", "repeats"):
            if getattr(args, key) is not None:
                opts[key] = getattr(args, key)
    if name == "learn":
        for key, arg in (("model", "model"), ("batch", "batch"), ("img", "img"), ("train", "train_images"),
                         ("val", "val_images"), ("epochs", "epochs"), ("hyp", "hyp"), ("head", "head"),
                         ("peer_python", "peer_python"), ("out", "out")):
            if getattr(args, arg, None) is not None:
                opts[key] = getattr(args, arg)
    return opts


def run(args) -> int:
    from jaxyolo.bench import suites as S

    names = parse_suites(args.suite)
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "machine": S.machine(), "quick": bool(args.quick), "suites": {}}
    for name in names:
        opts = suite_options(name, args)
        print(f"== {name} {json.dumps(opts) if opts else ''}", flush=True)
        out = S.SUITES[name](**opts)
        if name == "train" and args.breakdown:
            keep = {k: opts[k] for k in ("model", "batch", "img") if k in opts}
            out["breakdown"] = S.train_breakdown(**keep)
        results["suites"][name] = out
        print(summary(name, out), flush=True)
        if args.json:  # after every suite, so a killed run keeps what it measured
            write(args.json, results)
    if args.json:
        print(f"results: {args.json}")
    return 0


def write(path: str, results: dict) -> None:
    atomic_write_text(path, json.dumps(results, indent=1) + "\n")


def summary(name: str, r: dict) -> str:
    """A few human lines per suite."""
    if "skipped" in r:
        return f"  skipped: {r['skipped']}"
    if name == "train":
        line = (f"  {r['model']} batch {r['batch']} @ {r['img']}: JAX {r['jax_step_s']:.3f} s/step "
                f"(compile {r['compile_s']:.1f} s, +{r['jax_peak_extra_rss_gib']:.2f} GiB)")
        if r.get("torch_step_s"):
            line += (f", PyTorch {r['torch_step_s']:.3f} s/step (+{r['torch_peak_extra_rss_gib']:.2f} GiB); "
                     f"JAX / PyTorch = {r['ratio_jax_to_torch']:.2f}")
        if "breakdown" in r:
            b = r["breakdown"]
            line += (f"\n  pieces: forward {b['forward_s']:.3f} s, loss {b['loss_only_s']:.4f} s, "
                     f"forward + loss {b['forward_loss_s']:.3f} s, with gradients {b['value_and_grad_s']:.3f} s")
        return line
    if name == "population":
        return "\n".join(f"  P={row['pop']}: {row['step_s']:.3f} s/step, {row.get('ratio_to_p_times_single', '-')} "
                         f"of P single steps (compile {row['compile_s']:.1f} s)" for row in r["rows"])
    if name == "infer":
        return "\n".join(f"  {r['model']} @ {row['img']}: JAX {row['jax_ms']:.1f} ms, ONNX Runtime {row['onnx_ms']:.1f} ms"
                         + (f", PyTorch {row['torch_ms']:.1f} ms" if row.get("torch_ms") else "")
                         + f"; JAX / ONNX = {row['ratio_jax_to_onnx']:.2f}"
                         + (f", JAX / PyTorch = {row['ratio_jax_to_torch']:.2f}" if row.get("ratio_jax_to_torch") else "")
                         for row in r["rows"])
    if name == "eval":
        return (f"  {r['images']} images @ {r['img']}: decode + NMS {r['decode_nms_ms_per_image']:.2f} ms/image, "
                f"COCO json {r['to_coco_json_s']:.2f} s, pycocotools {r['pycocotools_s']:.2f} s "
                f"({r['detections']} detections)")
    if name == "learn":
        from jaxyolo.bench.learn import table

        return table(r)
    if name == "gpu":
        line = (f"  {r['model']} batch {r['batch']} @ {r['img']} bf16 on {r['device']}: {r['jax_images_per_s']} "
                f"images/s, {r['model_tflops_per_s']} model TFLOP/s, MFU {r['mfu']:.1%} of a "
                f"{r['bf16_matmul_ceiling_tflops']} TFLOP/s matmul")
        t = r.get("torch_amp") or {}
        line += f"; PyTorch AMP {t['images_per_s']} images/s" if "images_per_s" in t else \
            f"; PyTorch AMP: {t.get('skipped', 'torch not installed')}"
        return line
    return json.dumps(r)
