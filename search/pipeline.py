"""The paper's whole system in one resumable run: stages A-F, the KST analysis and deployment.

Stages (each trained with `seeds` initialisations as one population, so a row is a mean ± std):

==========  ==================================================================================
``A``       the student (``student.model``, plain Detect head), the default hyps
``B``       the teacher (``teacher.model``), the default hyps
``jhs_l``   joint hyper-parameter search with the teacher on ``search_data``      -> JHS_l
``C``       the teacher trained with JHS_l (the distillation teacher: its seed-0 run)
``D``       A + KST: the student with the implicit head and K shift / K scale candidates
``jhs_s``   joint hyper-parameter search with the KST student on ``search_data``  -> JHS_s
``E``       D + JHS: the KST student trained with JHS_s
``F``       E + SKD: E distilled from C, hyps JHS_s + the ``distill`` weights
``F_l``     the same student distilled from C with JHS_l + the ``distill`` weights
``kst``     every K x K candidate pair and the centroid of D, one vmapped evaluation
``deploy``  F (seed 0) exported to a parity-gated ONNX file, params, GFLOPs and latency
==========  ==================================================================================

Every evaluation is the standalone protocol (conf 0.001, NMS IoU 0.65) of each seed's final EMA
weights on the ``val`` split of ``data``; the searches train and score trials on ``search_data``
only, so with a held-out ``val`` nothing the report shows was used to choose anything.

Caching: stage S keeps everything in ``out/stages/S/``; its ``result.json`` is written
(atomically) last, and a rerun skips every stage that has one. A killed stage resumes where it
was: training through the trainer's exact resume, a search through the search's own. The
resolved configuration is saved in ``out/pipeline.json``; a rerun with a different one is an
error rather than a mix of two experiments. `report.md` is rewritten after every stage.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import yaml

from jaxyolo import distributed as dist
from jaxyolo import hyp as H
from jaxyolo.errors import ConfigError
from jaxyolo.files import atomic_write_text, read_document
from jaxyolo.search.config_files import config_diff, resolve_data, train_settings
from jaxyolo.search.stages import DEPENDS, STAGES, UNITS
from jaxyolo.train_options import FLAT_NAMES, TrainOptions, flatten

log = logging.getLogger("jaxyolo.pipeline")

FORMAT = "jaxyolo-pipeline/2"  # 2: the training settings are the `train` tree; 1: copied at the top level
SEARCH_KEYS = ("space", "population", "generations", "trial_epochs", "grid_dims", "grid_step", "parent", "elite",
               "top_n", "mp", "sigma", "train")
DISTILL_KEYS = ("kd_obj", "kd_cls", "kd_box", "kd_feat", "kd_T", "kd_conf", "features")
# the training settings each stage sets itself (from `data`, `student`, `teacher`, `seeds`, `distill`)
STAGE_SETTINGS = ("model.name", "model.weights", "model.options.head", "model.options.kst", "data.source", "out",
                  "init_seeds", "eval.every", "eval.iou_thres", "distill.teacher", "distill.features")
TRIAL_SETTINGS = {"recipe.min_warmup_iters": 0}  # search trials: on top of `train`, under `search.train`


@dataclasses.dataclass
class ModelChoice:
    model: str
    kst: int = 3  # the implicit head's K (student stages D-F); ignored by a Detect head
    head: str = "detect"  # the head of the stages that do not add KST (A for the student, B, C)


@dataclasses.dataclass
class PipelineConfig:
    name: str
    data: str  # trains every stage; its `val` split is the held-out evaluation of the report
    student: ModelChoice
    teacher: ModelChoice
    # the settings every training stage starts from (`jaxyolo.train_options.TrainOptions`:
    # data.img_size, data.batch_size, optim.epochs, hyp, ...; the stages set STAGE_SETTINGS)
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
    teacher_epochs: int | None = None  # default: train.optim.epochs
    search_data: str | None = None  # default: data (then the report says the search saw val)
    seeds: int = 1
    # SearchOptions fields, and under `train` the trials' settings on top of the pipeline's `train`
    search: dict = dataclasses.field(default_factory=dict)
    distill: dict = dataclasses.field(default_factory=lambda: {"kd_obj": 1.0, "kd_cls": 1.0, "kd_box": 0.05})
    deploy: dict = dataclasses.field(default_factory=lambda: {"img": [416, 640], "runs": 50, "warmup": 10})

    def check(self) -> None:
        try:
            self.train.check()
        except ConfigError as e:
            raise ConfigError(f"train.{e}") from None
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ConfigError(f"seeds: expected a positive integer, got {self.seeds!r}")
        if self.teacher_epochs is not None and (not isinstance(self.teacher_epochs, int) or self.teacher_epochs < 1):
            raise ConfigError(f"teacher_epochs: expected a positive integer, got {self.teacher_epochs!r}")
        for who in ("student", "teacher"):
            m = getattr(self, who)
            if m.head not in ("detect", "implicit"):
                raise ConfigError(f"{who}.head: must be 'detect' or 'implicit', got {m.head!r}")
            if not isinstance(m.kst, int) or m.kst < 1:
                raise ConfigError(f"{who}.kst: expected a positive integer, got {m.kst!r}")
        bad = sorted(set(self.search) - set(SEARCH_KEYS))
        if bad:
            raise ConfigError(f"search: unknown key(s) {', '.join(bad)}; known: {', '.join(SEARCH_KEYS)}")
        bad = sorted(set(self.distill) - set(DISTILL_KEYS))
        if bad:
            raise ConfigError(f"distill: unknown key(s) {', '.join(bad)}; known: {', '.join(DISTILL_KEYS)}")
        H.load_hyp({**H.load_hyp(self.train.hyp), **self.kd_weights()})  # names and ranges of the kd weights
        bad = sorted(set(self.deploy) - {"img", "runs", "warmup", "threads"})
        if bad:
            raise ConfigError(f"deploy: unknown key(s) {', '.join(bad)}; known: img, runs, warmup, threads")
        imgs = self.deploy.get("img", [])
        if not imgs or any(not isinstance(s, int) or s % 32 for s in imgs):
            raise ConfigError(f"deploy.img: expected a list of multiples of 32, got {imgs!r}")

    def kd_weights(self) -> dict:
        return {k: float(v) for k, v in self.distill.items() if k != "features"}

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def bundled() -> list[str]:
    return sorted(p.stem for p in _bundled_dir().glob("*.yaml"))


def _bundled_dir() -> Path:
    from jaxyolo import configs

    return Path(configs.__file__).parent / "pipeline"


def load_config(source: str | Path, overrides: Mapping[str, Any] | None = None) -> PipelineConfig:
    """A pipeline config from a bundled name (`demo`, `coco128`, `coco`) or a YAML path, with
    `overrides` ({"epochs": 1, "student.model": "yolov4p", ...}) applied on top. Relative data
    paths are resolved against the YAML file's folder."""
    path = Path(source)
    if not path.suffix and not path.exists():
        path = _bundled_dir() / f"{source}.yaml"
        if not path.exists():
            raise ConfigError(f"config {source!r}: no such file and no bundled pipeline (bundled: "
                              f"{', '.join(bundled())})")
    try:
        raw = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"config {path}: cannot read it ({e})") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"config {path}: expected a mapping at the top level")
    raw.setdefault("name", path.stem)
    for key, value in (overrides or {}).items():
        _set_dotted(raw, key, value, path)
    if raw.get("kind", "paper") == "ablation":  # a table of rows (`jaxyolo.search.ablation`)
        from jaxyolo.search.ablation import from_raw

        return from_raw(raw, path)
    if raw.pop("kind", "paper") != "paper":
        raise ConfigError(f"config {path}: kind: 'paper' (stages A-F, the default) or 'ablation'")
    fields = {f.name for f in dataclasses.fields(PipelineConfig)}
    moved = {k: FLAT_NAMES.get(k, k) for k in raw if k not in fields and (k in FLAT_NAMES or k == "hyp")}
    if moved:
        raise ConfigError(f"config {path}: " + "; ".join(f"{k} is now train.{v}" for k, v in moved.items())
                          + " (the training settings are one `train:` tree)")
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    raw["train"] = train_settings(raw.get("train") or {}, "train", path, STAGE_SETTINGS)
    if isinstance(raw.get("search"), dict) and "train" in raw["search"]:
        train_settings(raw["search"]["train"] or {}, "search.train", path, STAGE_SETTINGS)  # checked here, applied per trial
    for req in ("data", "student", "teacher"):
        if req not in raw:
            raise ConfigError(f"config {path}: missing required key {req!r}")
    for who in ("student", "teacher"):
        m = raw[who]
        if isinstance(m, str):
            m = {"model": m}
        if not isinstance(m, dict) or "model" not in m:
            raise ConfigError(f"config {path}: {who}: expected a model name or {{model: NAME, kst: K, head: H}}")
        bad = sorted(set(m) - {"model", "kst", "head"})
        if bad:
            raise ConfigError(f"config {path}: {who}: unknown key(s) {', '.join(bad)}")
        raw[who] = ModelChoice(**m)
    for key in ("data", "search_data"):
        if isinstance(raw.get(key), str):
            raw[key] = resolve_data(raw[key], path.parent)
    for key in ("search", "distill", "deploy"):
        if raw.get(key) is None:
            raw.pop(key, None)
        elif not isinstance(raw[key], dict):
            raise ConfigError(f"config {path}: {key}: expected a mapping")
    if "deploy" in raw:
        raw["deploy"] = {"img": [416, 640], "runs": 50, "warmup": 10, **raw["deploy"]}
    cfg = PipelineConfig(**raw)
    try:
        cfg.check()
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None
    return cfg


def _set_dotted(raw: dict, key: str, value, path: Path) -> None:
    parts = key.split(".")
    node = raw
    for p in parts[:-1]:
        if isinstance(node.get(p), str):  # `student: yolov4s` written short
            node[p] = {"model": node[p]}
        node = node.setdefault(p, {})
        if not isinstance(node, dict):
            raise ConfigError(f"config {path}: override {key}: {p} is not a mapping")
    node[parts[-1]] = value


# ------------------------------------------------------------------------------------------------


def plan(cfg: PipelineConfig, out: str | Path) -> dict[str, dict]:
    """What each unit runs, by unit name (see `UNITS`): train units carry TrainOptions (their `hyp`
    names the row hyp sets, resolved when the unit starts), search units SearchOptions."""
    from jaxyolo.search.runner import SearchOptions
    from jaxyolo.validate import DEFAULT_IOU_TEST

    out = Path(out)
    seeds = list(range(cfg.seeds))
    model = lambda who, head: {"model.name": who.model, "model.options.head": head,  # noqa: E731
                               "model.options.kst": who.kst}
    student_plain, student_kst = model(cfg.student, cfg.student.head), model(cfg.student, "implicit")
    teacher = model(cfg.teacher, cfg.teacher.head)

    def train(unit, model, rows, *, epochs=None, teacher_ckpt=None):
        epochs = epochs or cfg.train.optim.epochs
        t = cfg.train.updated({
            **model, "data.source": cfg.data, "optim.epochs": epochs, "out": str(out / "stages" / unit / "train"),
            "eval.every": epochs, "eval.iou_thres": DEFAULT_IOU_TEST, "eval.plots": False,
            "init_seeds": seeds * len(rows), "distill.teacher": teacher_ckpt,
            "distill.features": bool(cfg.distill.get("features", False)) and bool(teacher_ckpt)})
        return {"kind": "train", "rows": rows, "options": t}

    def search(unit, model):
        s = {"population": 8, "generations": 4, "trial_epochs": 3, "grid_dims": 2, **cfg.search}
        trial = cfg.train.updated({**TRIAL_SETTINGS, **flatten(s.pop("train", None) or {}), **model,
                                   "data.source": cfg.search_data or cfg.data, "seed": 0})
        o = SearchOptions(train=trial, out=str(out / "stages" / unit / "search"), seed=0, **s)
        o.check()
        return {"kind": "search", "rows": {unit: unit}, "options": o}

    t_epochs = cfg.teacher_epochs or cfg.train.optim.epochs
    # the distillation teacher: C's seed-0 member (members are row-major: B's seeds, then C's)
    teacher_ckpt = str(weights_folder(out / "stages" / "BC" / "train", cfg.seeds, 2 * cfg.seeds))
    return {
        "A": train("A", student_plain, {"A": "default"}),
        "jhs_l": search("jhs_l", teacher),
        "BC": train("BC", teacher, {"B": "default", "C": "JHS_l"}, epochs=t_epochs),
        "jhs_s": search("jhs_s", student_kst),
        "DE": train("DE", student_kst, {"D": "default", "E": "JHS_s"}),
        "F": train("F", student_kst, {"F": "JHS_s+kd", "F_l": "JHS_l+kd"}, teacher_ckpt=teacher_ckpt),
        "kst": {"kind": "kst", "rows": {"kst": "D"}},
        "deploy": {"kind": "deploy", "rows": {"deploy": "F"}, **cfg.deploy},
    }


def weights_folder(train_out: Path, member: int, population: int) -> Path:
    """Where `fit` leaves a member's final EMA weights."""
    return train_out / "weights" / (f"member{member}" if population > 1 else "") / "last"


def units_for(stages: Sequence[str]) -> list[str]:
    """The units that produce `stages` (row or unit names) and every unit they need, in order."""
    unknown = sorted(set(stages) - set(STAGES) - set(UNITS))
    if unknown:
        raise ConfigError(f"stages: unknown {', '.join(unknown)}; known: {', '.join(STAGES)}")
    need: set[str] = set()

    def add(u):
        if u not in need:
            need.add(u)
            for d in DEPENDS.get(u, ()):
                add(d)

    for s in stages:
        add(s if s in UNITS else next(u for u, rows in UNITS.items() if s in rows))
    return [u for u in UNITS if u in need]


@dataclasses.dataclass
class PipelineResult:
    out: Path
    results: dict[str, dict]  # row or stage -> its result
    report: Path


def run_pipeline(cfg: PipelineConfig, out: str | Path, *, stages: Sequence[str] | None = None,
                 progress: Callable[[dict], None] | None = None) -> PipelineResult:
    """Run (or continue) the pipeline in `out`; see the module docstring. `progress` receives
    {"event": "stage", "stage": unit, "rows", "status": "start" | "cached" | "done", "seconds"} and
    the trainer's and the search's own events."""
    out = Path(out)
    emit = progress if progress is not None and dist.is_primary() else (lambda info: None)
    cfg.check()
    _check_saved_config(cfg, out)
    todo = units_for(stages or STAGES)
    steps = plan(cfg, out)
    results: dict[str, dict] = {}
    for unit in UNITS:
        results.update(_read_result(out, unit) or {})
    t_all = time.time()
    for unit in todo:
        rows = UNITS[unit]
        if all(r in results for r in rows):
            emit({"event": "stage", "stage": unit, "rows": list(rows), "status": "cached"})
            continue
        emit({"event": "stage", "stage": unit, "rows": list(rows), "status": "start", "kind": steps[unit]["kind"]})
        t0 = time.time()
        produced = _run_unit(steps[unit], cfg, results, out, emit)
        for r in produced.values():
            r["seconds"] = time.time() - t0
        atomic_write_text(out / "stages" / unit / "result.json", json.dumps(produced, indent=1))
        results.update(produced)
        _write_report(cfg, out, results)
        emit({"event": "stage", "stage": unit, "rows": list(rows), "status": "done", "seconds": time.time() - t0})
    report = _write_report(cfg, out, results)
    emit({"event": "end", "out": str(out), "seconds": time.time() - t_all, "report": str(report)})
    return PipelineResult(out=out, results=results, report=report)


def config_changes(cfg: PipelineConfig, out: Path) -> list[str] | None:
    """How `cfg` differs from the run saved in `out` ("field: old -> new" each; [] when equal),
    or None when `out` holds no pipeline run."""
    saved_path = Path(out) / "pipeline.json"
    if not saved_path.exists():
        return None
    saved = read_document(saved_path, what="pipeline record", fmt="json")
    if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ConfigError(f"{saved_path}: pipeline format {saved.get('format')!r}, this jaxyolo reads {FORMAT!r} "
                          "(a run of another version: use another --out)")
    return config_diff(saved["config"], cfg.to_dict())


def _check_saved_config(cfg: PipelineConfig, out: Path) -> None:
    diff = config_changes(cfg, out)
    if diff:
        raise ConfigError(f"out {out}: holds a pipeline run with a different configuration "
                          f"({', '.join(diff)}); use another --out")
    if diff is not None:
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out {out}: exists, is not empty and holds no pipeline run; use another --out")
    dist.barrier("pipeline: out checked")  # every process has looked before the first write
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "pipeline.json", json.dumps({"format": FORMAT, "config": cfg.to_dict()}, indent=1))


def _read_result(out: Path, unit: str) -> dict | None:
    p = out / "stages" / unit / "result.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        log.warning("%s: unreadable; unit %s runs again", p, unit)
        return None


# ------------------------------------------------------------------------------------------------ units


def row_hyp(name: str, cfg: PipelineConfig, results: dict) -> dict:
    """A row's hyp set by name: "default" (the config's `hyp`), "JHS_s" / "JHS_l" (a search's best),
    with "+kd" the config's distillation weights on top."""
    base, kd = name.split("+") if "+" in name else (name, None)
    hyp = results[f"jhs_{base[-1]}"]["best_hyp"] if base.startswith("JHS_") else H.load_hyp(cfg.train.hyp)
    return H.load_hyp({**hyp, **(cfg.kd_weights() if kd else {})})


def _run_unit(step: dict, cfg: PipelineConfig, results: dict, out: Path, emit) -> dict[str, dict]:
    kind = step["kind"]
    if kind == "train":
        return _train_unit(step["options"], {r: row_hyp(h, cfg, results) for r, h in step["rows"].items()},
                           step["rows"], emit)
    if kind == "search":
        return {next(iter(step["rows"])): _search_stage(step["options"], emit)}
    if kind == "kst":
        return {"kst": _kst_stage(cfg, results)}
    if kind == "deploy":
        if not dist.is_primary():  # the export, its parity check and the latency table: process 0's job
            return {"deploy": {"kind": "deploy", "skipped": "not process 0"}}
        return {"deploy": _deploy_stage(step, cfg, results, out)}
    raise AssertionError(kind)


def _train_unit(options, hyps: dict[str, dict], names: dict[str, str], emit) -> dict[str, dict]:
    """One population: every row's hyp set once per seed (row-major), trained by one `fit`."""
    from jaxyolo.search.runner import METRIC_KEYS
    from jaxyolo.train_loop import fit

    seeds = options.init_seeds[: len(options.init_seeds) // len(hyps)]
    population = [h for h in hyps.values() for _ in seeds]
    folder = Path(options.out)
    resume = folder.exists() and any(folder.iterdir())
    res = fit(options, hyps=population, resume=resume, progress=emit)
    pop = len(population)
    last = {}
    for rec in res.records:  # the last evaluated record of each member
        if rec.evaluated:
            last[rec.member or 0] = rec
    out = {}
    for r, (row_name, hyp) in enumerate(hyps.items()):
        per_seed = []
        for i, seed in enumerate(seeds):
            m = r * len(seeds) + i
            per_seed.append({"seed": seed, "member": m, **{k: float(last[m].metrics[k]) for k in METRIC_KEYS},
                             "weights": str(weights_folder(folder, m, pop))})
        out[row_name] = {"kind": "train", "model": options.model.name, "head": options.model.options["head"],
                         "kst": options.model.options["kst"], "teacher": options.distill.teacher,
                         "hyp_name": names[row_name], "hyp": hyp, "epochs": options.optim.epochs, "seeds": per_seed}
    return out


def _search_stage(options, emit) -> dict:
    from jaxyolo.search.runner import run_search, train_evaluator

    folder = Path(options.out)
    resume = folder.exists() and any(folder.iterdir())
    res = run_search(options, resume=resume, evaluate=train_evaluator(options, progress=emit), progress=emit)
    b = res.best
    return {"kind": "search", "model": options.train.model.name, "trials": len(res.trials), "best_hyp": res.best_hyp,
            "best": {k: b[k] for k in ("phase", "generation", "member", "fitness", "metrics")},
            "start_fitness": res.trials[0]["fitness"], "folder": str(folder)}


def _kst_stage(cfg: PipelineConfig, results: dict) -> dict:
    """Every (shift, scale) candidate pair of each D seed and the centroid (their mean), folded into
    plain heads of one graph and evaluated together by one vmapped validation pass."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    import jaxyolo
    from jaxyolo.data.sources import open_dataset
    from jaxyolo.search.runner import METRIC_KEYS
    from jaxyolo.validate import DEFAULT_IOU_TEST, validate_population

    val = open_dataset(cfg.data, "val")
    variants, labels = [], []
    for s in results["D"]["seeds"]:
        det = jaxyolo.load(s["weights"])
        k = det.kst
        pairs = [None] + [(i, j) for i in range(k) for j in range(k)]
        for pair in pairs:
            variants.append(det.fold(kst_index=pair, bn=False))
            labels.append({"seed": s["seed"], "shift": "centroid" if pair is None else pair[0],
                           "scale": "centroid" if pair is None else pair[1]})
    graphdef = nnx.split(variants[0].model, nnx.Param, nnx.BatchStat)[0]
    splits = [nnx.split(v.model, nnx.Param, nnx.BatchStat) for v in variants]
    stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)  # noqa: E731
    params, stats = stack([s[1] for s in splits]), stack([s[2] for s in splits])
    hyp = H.stack([H.load_hyp(cfg.train.hyp)] * len(variants))
    res = validate_population(graphdef, variants[0].spec, params, stats, hyp, val, img_size=cfg.train.data.img_size,
                              iou_thres=DEFAULT_IOU_TEST)
    rows = [{**lab, **{k: float(r["coco"][k]) for k in METRIC_KEYS}} for lab, r in zip(labels, res)]
    return {"kind": "kst", "source": "D", "k": k, "rows": rows}


def _detections_picture(det, cfg: PipelineConfig, path: Path, n: int = 8) -> Path | None:
    """The deployed student's detections (conf >= 0.25) on the first `n` held-out images, drawn
    over their labelled boxes (white), as one grid; None (logged) when it cannot be drawn."""
    from jaxyolo import plots
    from jaxyolo.data.sources import open_dataset
    from jaxyolo.predict import predict

    try:
        val = open_dataset(cfg.data, "val")
        drawn = []
        for i in range(min(n, len(val))):
            sample = val[i]
            boxes, scores, classes = predict(det, sample.image, img_size=cfg.train.data.img_size, conf_thres=0.25)
            drawn.append(plots.draw_detections(sample.image, boxes, classes, scores, val.names,
                                               gt_boxes=val.labels(i)[0]))
        return plots.save_grid(drawn, path, cols=4) if drawn else None
    except Exception as e:  # a picture must never lose a finished stage
        log.warning("could not draw the detections picture %s: %s", path, e)
        return None


def _deploy_stage(step: dict, cfg: PipelineConfig, results: dict, out: Path) -> dict:
    import jaxyolo
    from jaxyolo.export.latency import profile

    source = step["rows"]["deploy"]
    det = jaxyolo.load(results[source]["seeds"][0]["weights"])
    final = out / "final"
    if (final / "student").exists():  # a deploy stage killed after saving
        shutil.rmtree(final / "student")
    final.mkdir(parents=True, exist_ok=True)
    det.save(final / "student")
    prof = profile(det, step["img"], runs=step["runs"], warmup=step["warmup"], threads=step.get("threads"),
                   with_torch=False, with_jax=False, keep_onnx=final)  # the timed files are the parity-gated exports
    picture = _detections_picture(det, cfg, final / "detections.jpg")
    return {"kind": "deploy", "source": source, "onnx": [f"final/model-{s}.onnx" for s in step["img"]],
            "picture": None if picture is None else "final/detections.jpg",
            "onnx_max_abs_diff": [r["onnx_parity_max_abs_diff"] for r in prof["rows"]], "checkpoint": "final/student",
            "rows": prof["rows"], "machine": prof["machine"], "runs": prof["runs"], "threads": prof["threads"]}


def _write_report(cfg: PipelineConfig, out: Path, results: dict) -> Path:
    from jaxyolo.search import report

    if not dist.is_primary():
        return out / "report.md"
    return report.write(cfg, out, results)
