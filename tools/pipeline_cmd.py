"""`jaxyolo pipeline`: the paper's whole system (stages A-F, KST analysis, deployment) and its report,
or an ablation table of rows (a config with `kind: ablation`, e.g. `gfl`; `--stages` then names rows).

    jaxyolo pipeline --config demo|coco128|coco|gfl|gfl-coco|FILE.yaml [--seeds 3] [--set KEY=VALUE ...] \
        [--stages A,D] [--dry-run] --out runs/pipeline/NAME
"""

from __future__ import annotations

import functools
import logging
import os
import time
from pathlib import Path

from jaxyolo.tools.search_cmd import SearchProgress


# what `--dry-run` shows of each training unit (and, but for the length and seeds, of a search's trials)
DRY_RUN_SETTINGS = ("model.name", "model.options", "data.source", "data.img_size", "data.batch_size", "data.subset",
                    "optim.epochs", "distill.teacher", "init_seeds")


def add_parser(subparsers):
    p = subparsers.add_parser("pipeline", help="the whole system: baseline, teacher, JHS, KST, SKD, report, export")
    p.add_argument("--config", default="demo", help="bundled pipeline (demo, coco128, coco) or a YAML file")
    p.add_argument("--seeds", type=int, help="initialisation seeds per row (overrides the config's `seeds`)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config field, e.g. --set train.optim.epochs=5 --set student.model=yolov4n")
    p.add_argument("--stages", help="comma-separated stages to run (their dependencies run too); default all")
    p.add_argument("--dry-run", action="store_true", help="print what every stage would run, then stop")
    p.add_argument("--out", help="run folder (default runs/pipeline/<config name>); rerun to resume")
    p.add_argument("--compile-cache", default=str(DEFAULT_CACHE),
                   help="persistent XLA compilation cache shared by the stages and later runs ('none': off)")
    p.add_argument("--fast-compile", action="store_true",
                   help="XLA backend optimisation level 0: for very short runs of small models (yolov4p at "
                        "96 px on 2 CPU cores: about 4 s less per compiled step, 20%% slower iterations)")
    p.set_defaults(func=run)
    return p


DEFAULT_CACHE = Path.home() / ".cache" / "jaxyolo" / "xla"


def setup_compilation(cache: str | None, fast: bool) -> None:
    """The persistent compilation cache (rows of a unit and units with the same model and
    population size compile once) and, with `fast`, XLA's lowest backend optimisation level.
    An existing JAX_COMPILATION_CACHE_DIR wins over `cache`."""
    import jax

    fast_flag = "--xla_backend_optimization_level=0"
    if fast and fast_flag not in os.environ.get("XLA_FLAGS", ""):  # already set by an earlier call: done
        from jaxyolo.xla_cpu import backend_started

        if backend_started():
            logging.getLogger("jaxyolo").warning("--fast-compile: the XLA backend is already running; ignored")
        else:
            os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {fast_flag}".strip()
    if cache and cache.lower() != "none" and not os.environ.get("JAX_COMPILATION_CACHE_DIR"):
        Path(cache).mkdir(parents=True, exist_ok=True)
        jax.config.update("jax_compilation_cache_dir", str(cache))
        jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)


class PipelineProgress:
    """A header per stage and the trainer's / search's own progress lines inside it."""

    def __init__(self, echo=functools.partial(print, flush=True)):
        self.echo = echo
        self.inner = SearchProgress(0, echo=echo)

    def __call__(self, info: dict) -> None:
        ev = info.get("event")
        if ev == "stage":
            st = info["status"]
            if st == "start":
                self.echo(f"\n=== stage {info['stage']} ({info['kind']})")
                self.inner = SearchProgress(0, echo=self.echo)
            elif st == "cached":
                self.echo(f"=== stage {info['stage']}: done in an earlier run (cached)")
            else:
                self.echo(f"=== stage {info['stage']} finished in {info['seconds'] / 60:.1f} min")
        elif ev == "end" and "report" in info:
            self.echo(f"\npipeline finished in {info['seconds'] / 60:.1f} min: {info['report']}")
        elif ev == "end" and "best" in info:
            self.echo(f"search finished: best fitness {info['best']:.4f}")
        elif ev == "population":
            self.echo(f"--- {info['phase']} {info['generation']}: {info['size']} member(s)")
        elif ev == "done" and "phase" in info:
            fit = " ".join(f"{f:.4f}" for f in info["fitness"])
            self.echo(f"    fitness per member: {fit}; best so far {info['best']:.4f}; {info['seconds'] / 60:.1f} min")
        else:
            self.inner.train(info)


def _run_ablation(cfg, out: Path, rows, dry_run: bool) -> int:
    from jaxyolo.search import ablation as A

    if dry_run:
        for row in A.order(cfg.rows):
            if rows and row.name not in rows:
                continue
            seeds = range(cfg.seeds) if row.start is not None else [None]
            o = A.options(cfg, row, out, next(iter(seeds)))
            shown = {k: o.get(k) for k in DRY_RUN_SETTINGS + ("model.sparsity",)}
            extra = (f"; fine-tune of {row.start}, one run per seed" if row.start else "") + (
                f"; teacher {row.teacher}" if row.teacher else "")
            print(f"{row.name:7s} {row.label}: " + ", ".join(f"{k}={v}" for k, v in shown.items()
                                                              if v not in (None, {})) + extra)
        return 0
    t0 = time.perf_counter()
    print(f"pipeline {cfg.name}: {len(cfg.rows)} rows, {cfg.seeds} seed(s) -> {out}")
    _, report = A.run_ablation(cfg, out, rows=rows, progress=PipelineProgress())
    print()
    print(report.read_text())
    print(f"total {time.perf_counter() - t0:.0f} s; report: {report}")
    return 0


def run(args) -> int:
    from jaxyolo.search import pipeline as PL
    from jaxyolo.train_options import parse_setting

    setup_compilation(args.compile_cache, args.fast_compile)
    logging.getLogger("absl").setLevel(logging.WARNING)
    overrides = dict(parse_setting(o) for o in args.overrides)
    if args.seeds is not None:
        overrides["seeds"] = args.seeds
    cfg = PL.load_config(args.config, overrides)
    out = Path(args.out or f"runs/pipeline/{cfg.name}")
    stages = [s.strip() for s in args.stages.split(",") if s.strip()] if args.stages else None
    if getattr(cfg, "kind", None) == "ablation":
        return _run_ablation(cfg, out, stages, args.dry_run)
    todo = PL.units_for(stages or PL.STAGES)
    if args.dry_run:
        steps = PL.plan(cfg, out)
        for s in todo:
            step = steps[s]
            o = step.get("options")
            rows = ", ".join(f"{r}={h}" for r, h in step["rows"].items())
            if o is None:
                extra = ", ".join(f"{k}={v}" for k, v in step.items() if k not in ("kind", "rows"))
                print(f"{s:7s} {step['kind']}: {rows}" + (f"; {extra}" if extra else ""))
                continue
            if step["kind"] == "train":
                shown = {k: o.get(k) for k in DRY_RUN_SETTINGS}
            else:  # a search: its own sizes, then its trials' settings
                shown = {k: getattr(o, k) for k in ("population", "generations", "trial_epochs")}
                shown.update({f"train.{k}": o.train.get(k) for k in DRY_RUN_SETTINGS
                              if k not in ("optim.epochs", "init_seeds")})
            print(f"{s:7s} {step['kind']}: {rows}; " + ", ".join(f"{k}={v}" for k, v in shown.items() if v is not None))
        return 0
    t0 = time.perf_counter()
    print(f"pipeline {cfg.name}: student {cfg.student.model}, teacher {cfg.teacher.model}, {cfg.seeds} seed(s), "
          f"stages {', '.join(todo)} -> {out}")
    res = PL.run_pipeline(cfg, out, stages=stages, progress=PipelineProgress())
    print()
    print(res.report.read_text())
    print(f"total {time.perf_counter() - t0:.0f} s; report: {res.report}")
    picture = (res.results.get("deploy") or {}).get("picture")
    if picture:
        print(f"detections of the deployed student: {out / picture}")
    return 0
