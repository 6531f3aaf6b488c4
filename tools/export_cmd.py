"""`jaxyolo export` (ONNX / PyTorch, parity-gated) and `jaxyolo profile` (the Table-5 view)."""

from __future__ import annotations

import json
from pathlib import Path

FORMATS = ("onnx", "torch")


def _weights_args(p):
    p.add_argument("--weights", help="a jaxyolo checkpoint folder, or a reference .pt / .npz state_dict "
                                     "(then --model names its table)")
    p.add_argument("--model", help="model table for a .pt/.npz file; alone: freshly initialised weights "
                                   "(enough for latency, not for accuracy)")
    p.add_argument("--num-classes", type=int, default=80, help="classes of a freshly initialised --model")


def add_parser(subparsers):
    p = subparsers.add_parser("export", help="export a detector to ONNX and/or PyTorch (parity-gated)")
    _weights_args(p)
    p.add_argument("--format", default="onnx", help="comma-separated: onnx, torch")
    p.add_argument("--img", type=int, nargs="+", default=[640], help="input size(s); one ONNX file per size")
    p.add_argument("--dynamic-batch", action="store_true", help="ONNX: a symbolic batch dimension")
    p.add_argument("--nms", action="store_true", help="ONNX: NMS inside the graph (end-to-end outputs)")
    p.add_argument("--conf", type=float, default=0.25, help="in-graph NMS confidence threshold")
    p.add_argument("--iou", type=float, default=0.45, help="in-graph NMS IoU threshold")
    p.add_argument("--max-det", type=int, default=100, help="in-graph NMS detections per image")
    p.add_argument("--half", action="store_true", help="ONNX: float16 weights and compute")
    p.add_argument("--opset", type=int, default=17)
    p.add_argument("--fuse-bn", action="store_true",
                   help="torch: also fold BatchNorm into the convs (the state_dict then has no bn.* keys)")
    p.add_argument("--out", default="runs/export/exp")
    p.add_argument("--json", action="store_true", help="print the export reports as JSON")
    p.set_defaults(func=run_export)

    q = subparsers.add_parser("profile", help="parameters, GFLOPs and ONNX / JAX / PyTorch latency at batch 1")
    _weights_args(q)
    q.add_argument("--img", type=int, nargs="+", default=[416, 640])
    q.add_argument("--runs", type=int, default=50, help="timed runs per figure (median reported)")
    q.add_argument("--warmup", type=int, default=10)
    q.add_argument("--threads", type=int, default=None, help="onnxruntime / torch threads (default: all cores)")
    q.add_argument("--no-torch", action="store_true", help="skip the PyTorch eager column")
    q.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    q.set_defaults(func=run_profile)
    return p


def load_detector(args):
    import jaxyolo
    from jaxyolo.errors import ConfigError

    if args.weights:
        w = Path(args.weights)
        if w.suffix in (".pt", ".pth", ".npz"):
            if not args.model:
                raise ConfigError(f"--weights {w}: a reference state_dict needs --model to name its table")
            return jaxyolo.load_torch(args.model, w), str(w)
        return jaxyolo.load(w), str(w)
    if not args.model:
        raise ConfigError("give --weights (a checkpoint) or --model (freshly initialised weights)")
    return jaxyolo.create_model(args.model, num_classes=args.num_classes), f"{args.model} (initial weights)"


def run_export(args) -> int:
    from jaxyolo.errors import ConfigError

    formats = [f.strip() for f in args.format.split(",") if f.strip()]
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise ConfigError(f"--format: expected a comma-separated subset of {FORMATS}, got {args.format!r}")
    if args.half and "onnx" not in formats:
        raise ConfigError("--half applies to the ONNX export only")
    det, source = load_detector(args)
    stride = max(det.spec.strides)
    bad_img = [s for s in args.img if s <= 0 or s % stride]
    if bad_img:  # every size is checked before the first file is written
        raise ConfigError(f"--img: sizes must be positive multiples of {stride} (the largest stride); "
                          f"{', '.join(map(str, bad_img))} {'is' if len(bad_img) == 1 else 'are'} not")
    out = Path(args.out)
    reports = []
    if "onnx" in formats:
        from jaxyolo.export.onnx_export import export_onnx

        for s in args.img:
            name = f"{det.spec.name}-{s}" + ("-nms" if args.nms else "") + ("-fp16" if args.half else "") + ".onnx"
            r = export_onnx(det, out / name, s, dynamic_batch=args.dynamic_batch, nms=args.nms, half=args.half,
                            opset=args.opset, conf_thres=args.conf, iou_thres=args.iou, max_det=args.max_det)
            reports.append({"format": "onnx", "img": s, **r})
    if "torch" in formats:
        from jaxyolo.export.torch_export import export_torch

        r = export_torch(det, out / "torch", args.img[0], fuse_bn=args.fuse_bn)
        reports.append({"format": "torch", "img": args.img[0], **r})
    if args.json:
        print(json.dumps(reports, default=str, indent=1))
    else:
        print(f"exported {source} -> {out}")
        for r in reports:
            what = r.get("path") or r.get("out_dir")
            print(f"  {r['format']:5s} @{r['img']}: {what}   parity max |diff| {_fmt_diff(r.get('max_abs_diff'))} "
                  f"(tolerance {r.get('tolerance')}, boxes / input size)")
    return 0


def _fmt_diff(d) -> str:
    """The gated (normalised) difference of each compared output, e.g. `output 4.8e-07`."""
    if isinstance(d, dict):
        parts = []
        for k, v in d.items():
            v = v.get("normalised") if isinstance(v, dict) else v
            if isinstance(v, (int, float)):
                parts.append(f"{k} {v:.1e}")
        return ", ".join(parts)
    return f"{d:.1e}" if isinstance(d, (int, float)) else str(d)


def run_profile(args) -> int:
    from jaxyolo.export.latency import profile

    det, source = load_detector(args)
    res = profile(det, args.img, runs=args.runs, warmup=args.warmup, threads=args.threads,
                  with_torch=not args.no_torch)
    res["weights"] = source
    if args.json:
        print(json.dumps(res, default=str))
        return 0
    m = res["machine"]
    print(f"{res['model']} ({source}); batch 1, median of {res['runs']} runs after {res['warmup']} warm-up; "
          f"onnxruntime/torch threads {res['threads']}; {m['processor']}, {m['cpu_count']} cores")
    head = f"{'img':>5} {'params':>11} {'GFLOPs':>8} {'ONNX ms':>9} {'ONNX FPS':>9} {'JAX ms':>8} {'torch ms':>9}"
    print(head)
    for r in res["rows"]:
        t = f"{r['torch_ms']:9.1f}" if r["torch_ms"] is not None else f"{'-':>9}"
        print(f"{r['img']:>5} {r['params']:>11,} {r['gflops']:>8.2f} {r['onnx_ms']:>9.1f} {r['onnx_fps']:>9.1f} "
              f"{r['jax_ms']:>8.1f} {t}")
    return 0
