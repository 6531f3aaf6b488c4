"""The `jaxyolo` command: `jaxyolo info`, `jaxyolo demo`, ... (one sub-command per job)."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from jaxyolo.errors import JaxyoloError


def _fmt_table(rows: list[dict], cols: list[tuple[str, str, str]]) -> str:
    """Plain-text table; cols = (key, header, format)."""
    cells = [[h for _, h, _ in cols]] + [[format(r[k], f) if f else str(r[k]) for k, _, f in cols] for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(cols))]
    lines = ["  ".join(c.rjust(w) if i != 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths))) for row in cells]
    return "\n".join(lines)


def cmd_info(args) -> int:
    import jaxyolo

    # only the options given: --head and --kst are YOLOv4's, and another family refuses them by name
    options = {k: v for k, v in (("head", args.head), ("kst", args.kst), ("act", args.act)) if v is not None}
    det = jaxyolo.create_model(args.model, num_classes=args.num_classes, abstract=True, **options)
    rows = det.layer_table(args.img)
    params, gflops = sum(r["params"] for r in rows), sum(r["gflops"] for r in rows)
    if args.json:
        print(json.dumps({"model": det.spec.name, "img": args.img, "head": getattr(det.options, "head", None),
                          "kst": det.kst,
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
          f"{args.img}x{args.img} (2 x conv multiply-accumulates), {det.family.describe(det.spec, det.options)}")
    return 0


def cmd_demo(args) -> int:
    """The main job on an embedded default: the model family, then the demo pipeline (every stage
    of the paper's system in miniature on generated data, with its report)."""
    import jaxyolo
    from jaxyolo.tools import pipeline_cmd

    # XLA's full optimisation: the demo's students train 320 iterations each, and the lowest level
    # (--fast-compile) saved about 4 s per compiled step but cost 20 % more per iteration
    pipeline_cmd.setup_compilation(str(pipeline_cmd.DEFAULT_CACHE), fast=False)
    print(f"jaxyolo {jaxyolo.__version__}\n\nThe model family (implicit head, K=3 KST candidates), counted on "
          "abstract shapes:")
    rows = []
    for name in ("yolov4p", "yolov4n", "yolov4s", "yolov4m", "yolov4l", "yolov4x"):
        det = jaxyolo.create_model(name, abstract=True)
        rows.append({"model": name, "params": det.num_params(), "gflops": det.gflops(640),
                     "depth": det.spec.depth_multiple, "width": det.spec.width_multiple})
    print(_fmt_table(rows, [("model", "model", ""), ("depth", "depth", ".2f"), ("width", "width", ".4f"),
                            ("params", "params", ",d"), ("gflops", "GFLOPs@640", ".2f")]))
    print(flush=True)
    out = Path(args.out)
    # the demo owns its folder: start again when told to, or when it holds anything but this demo's run
    if out.exists() and (args.fresh or not _same_pipeline(out, args.set)):
        shutil.rmtree(out)
    argv = ["--config", "demo", "--out", str(out), *sum((["--set", s] for s in args.set), [])]
    return pipeline_cmd.run(pipeline_cmd.add_parser(argparse.ArgumentParser().add_subparsers()).parse_args(argv))


def _same_pipeline(out: Path, overrides: list[str]) -> bool:
    """Whether `out` holds a run of the demo pipeline as configured now (then it resumes)."""
    from jaxyolo.search import pipeline as PL
    from jaxyolo.train_options import parse_setting

    try:
        cfg = PL.load_config("demo", dict(parse_setting(o) for o in overrides))
        return PL.config_changes(cfg, out) == []
    except (OSError, JaxyoloError):
        return False


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jaxyolo", description="Lightweight YOLOv4 detectors in JAX/Flax.")
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="parameters, GFLOPs and a per-layer table of a model")
    info.add_argument("--model", default="yolov4s", help="built-in name or path to a YAML table")
    info.add_argument("--img", type=int, default=640, help="square input size for FLOPs and shapes")
    info.add_argument("--head", choices=("implicit", "detect"), help="YOLOv4 head (default implicit)")
    info.add_argument("--kst", type=int, help="KST candidates of the YOLOv4 implicit head (default 3)")
    info.add_argument("--act", choices=("silu", "mish", "leaky", "relu6", "relu"),
                      help="activation (default: the family's, YOLOv4 silu, gfl relu6)")
    info.add_argument("--num-classes", type=int, default=80)
    info.add_argument("--json", action="store_true", help="print one JSON object")
    info.set_defaults(func=cmd_info)

    demo = sub.add_parser("demo", help="the paper's whole pipeline in miniature on generated data (no download)")
    demo.add_argument("--out", default="runs/demo")
    demo.add_argument("--fresh", action="store_true", help="start again instead of resuming a demo run in --out")
    demo.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a demo.yaml field")
    demo.set_defaults(func=cmd_demo)

    from jaxyolo.tools import bench_cmd, evaluate_cmd, export_cmd, pipeline_cmd, predict_cmd, search_cmd, train_cmd

    train_cmd.add_parser(sub)
    evaluate_cmd.add_parser(sub)
    predict_cmd.add_parser(sub)
    export_cmd.add_parser(sub)
    search_cmd.add_parser(sub)
    pipeline_cmd.add_parser(sub)
    bench_cmd.add_parser(sub)
    for name in MULTI_PROCESS_COMMANDS:
        _add_process_args(sub.choices[name])
    return p


MULTI_PROCESS_COMMANDS = ("train", "search", "pipeline", "eval")


def _add_process_args(p) -> None:
    g = p.add_argument_group("many processes (one per host; see the README's 'Many hosts')")
    g.add_argument("--coordinator", default=None, metavar="HOST:PORT",
                   help="process 0's address; with --num-processes and --process-id (default: what the "
                        "environment says: SLURM, Open MPI, a TPU slice, JAX_COORDINATOR_ADDRESS; else one process)")
    g.add_argument("--num-processes", type=int, default=None)
    g.add_argument("--process-id", type=int, default=None)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command in MULTI_PROCESS_COMMANDS:
            from jaxyolo import distributed

            distributed.initialize(args.coordinator, args.num_processes, args.process_id)
        return args.func(args)
    except JaxyoloError as e:
        print(f"jaxyolo {args.command}: error: {e}", file=sys.stderr)
        _leave_the_others(2)
        return 2
    except BaseException:
        from jaxyolo import distributed

        if distributed.multi_process():
            import traceback

            traceback.print_exc()
            _leave_the_others(1)
        raise


def _leave_the_others(code: int) -> None:
    """In a multi-process run, a process that stops on an error exits at once: the others then
    miss its heartbeats and stop within seconds, instead of waiting in a collective for it."""
    from jaxyolo import distributed

    if distributed.multi_process():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
