"""The `jaxyolo` command: `jaxyolo info`, `jaxyolo demo`, ... (one sub-command per job)."""

from __future__ import annotations

import argparse
import json
import sys
import time

from jaxyolo.errors import JaxyoloError


def _fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Plain-text table; cols = (key, header, format)."""
    cells = [[h for _, h, _ in cols]] + [[format(r[k], f) if f else str(r[k]) for k, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i != 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def cmd_info(args) -> int:
    import jaxyolo

    det = jaxyolo.create_model(args.model, num_classes=args.num_classes, head=args.head, kst=args.kst,
                               act=args.act, abstract=True)
    rows = det.layer_table(args.img)
    params, gflops = sum(r["params"] for r in rows), sum(r["gflops"] for r in rows)
    if args.json:
        print(json.dumps({"model": det.spec.name, "img": args.img, "head": args.head, "kst": det.kst,
                          "num_classes": det.num_classes, "params": params, "gflops": round(gflops, 4),
                          "strides": list(det.spec.strides), "layers": rows}))
        return 0
    for r in rows:
        r["output"] = "x".join(map(str, r["output"])) if not isinstance(r["output"][0], list) else \
            " ".join("x".join(map(str, o)) for o in r["output"])
    cols = [("index", "idx", ""), ("source", "from", ""), ("n", "n", ""), ("params", "params", ",d"),
            ("module", "module", ""), ("args", "arguments", ""), ("output", f"output @{args.img}", ""),
            ("gflops", "GFLOPs", ".3f")]
    print(_fmt_table(rows, cols))
    print(f"\n{det.spec.name}: {len(rows)} layers, {params:,} parameters, {gflops:.2f} GFLOPs at "
          f"{args.img}x{args.img} (2 x conv multiply-accumulates), head={args.head}"
          + (f" K={det.kst}" if det.kst else ""))
    return 0


def cmd_demo(args) -> int:
    """What exists so far, end to end on an embedded default (no download, no data)."""
    import tempfile

    import jax
    import numpy as np

    import jaxyolo
    from jaxyolo.data.synthetic import synthetic_image

    print(f"jaxyolo {jaxyolo.__version__} on {jax.devices()[0].platform} ({jax.device_count()} device(s))\n")
    print("The model family (implicit head, K=3 KST candidates), counted on abstract shapes:")
    rows = []
    for name in ("yolov4p", "yolov4n", "yolov4s", "yolov4m", "yolov4l", "yolov4x"):
        det = jaxyolo.create_model(name, abstract=True)
        rows.append({"model": name, "params": det.num_params(), "gflops": det.gflops(640),
                     "depth": det.spec.depth_multiple, "width": det.spec.width_multiple})
    print(_fmt_table(rows, [("model", "model", ""), ("depth", "depth", ".2f"), ("width", "width", ".4f"),
                            ("params", "params", ",d"), ("gflops", "GFLOPs@640", ".2f")]))

    img, _ = synthetic_image(args.img, seed=0)
    det = jaxyolo.create_model(args.model, num_classes=80, kst=3)
    print(f"\n{det}")
    t0 = time.perf_counter()
    out = jax.block_until_ready(det(img[None]))  # forward_raw + decode, compiled on first use
    t1 = time.perf_counter()
    raw = jax.block_until_ready(det.forward_raw(img[None]))
    t2 = time.perf_counter()
    print(f"forward on a generated {args.img}x{args.img} image: raw levels "
          f"{[tuple(r.shape) for r in raw]} -> decoded {tuple(out.shape)}; "
          f"first call {t1 - t0:.2f} s (with compilation), then {1000 * (t2 - t1):.1f} ms per forward")

    table = det.forward_all_kst(img[None])
    means = [[float(np.asarray(table[0][i, j]).mean()) for j in range(det.kst)] for i in range(det.kst)]
    print(f"all {det.kst}x{det.kst} KST candidate pairs in one vmapped call; mean P3 logit per pair:")
    for i, row in enumerate(means):
        print("   shift %d: " % i + "  ".join(f"{v:+.4f}" for v in row))

    folded = det.fold()
    diff = max(float(np.abs(np.asarray(a) - np.asarray(b)).max()) for a, b in zip(raw, folded.forward_raw(img[None])))
    print(f"folded (KST mean + BatchNorm into convs): {folded.num_params():,} parameters, "
          f"max |difference| of raw outputs {diff:.2e}")

    with tempfile.TemporaryDirectory() as d:
        det.save(f"{d}/ckpt")
        back = jaxyolo.load(f"{d}/ckpt")
        same = all(np.array_equal(a, b) for a, b in zip(raw, back.forward_raw(img[None])))
        sd = det.state_dict()
        print(f"save -> load round trip identical: {same}; reference state_dict: {len(sd)} tensors")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxyolo", description="Lightweight YOLOv4 detectors in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, GFLOPs and a per-layer table of a model")
    info.add_argument("--model", default="yolov4s", help="built-in name or path to a YAML table")
    info.add_argument("--img", type=int, default=640, help="square input size for FLOPs and shapes")
    info.add_argument("--head", choices=("implicit", "detect"), default="implicit")
    info.add_argument("--kst", type=int, default=3, help="KST candidates of the implicit head")
    info.add_argument("--act", default="silu", choices=("silu", "mish", "leaky"))
    info.add_argument("--num-classes", type=int, default=80)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="show what jaxyolo does, on an embedded default")
    demo.add_argument("--model", default="yolov4n")
    demo.add_argument("--img", type=int, default=320)
    demo.set_defaults(func=cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except JaxyoloError as e:
        print(f"jaxyolo {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
