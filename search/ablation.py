"""Ablation pipelines: a paper's table of rows, each a training setting, as one resumable run with
a report (`kind: ablation` in a pipeline config; `jaxyolo pipeline gfl` runs the third paper's
Table 2).

A row is the pipeline's `train` settings with the row's own on top (`set`: dotted TrainOptions
settings such as ``model.name`` or ``data.img_size``; `hyp`: hyp keys over the `train.hyp` file),
trained once per seed and evaluated after its last epoch (unless it sets `eval.every`). A row
may also:

* ``start: ROW`` — start each seed from that row's final weights of the same seed (a fine-tune,
  e.g. ``set: {model.sparsity: "2:4"}`` after a dense row);
* ``teacher: ROW`` — distil from that row's seed-0 weights (the family's distillation terms,
  weighted by the row's `hyp`).

A row without `start` trains its seeds as one population (one compiled step); a fine-tune row
trains one run per seed (each from its own weights). Every evaluation is the held-out `val` split
of `data` with the final EMA weights. Rows run in dependency order; each keeps everything in
``out/rows/<name>/`` and writes its ``result.json`` last, so a rerun skips finished rows and a
killed row resumes where it was (the trainer's exact resume). The configuration is saved in
``out/pipeline.json``; a rerun with a different one is an error.

The report (``report.md``, ``report.json``): per row the mean ± std over seeds of the COCO metrics,
the parameters, and the published figure when the config gives one; a two-sided paired t-test
for each comparison (default: consecutive rows); and a one-way ANOVA over the rows with Tukey's
HSD (`scipy.stats.f_oneway`, `scipy.stats.tukey_hsd`) on the seeds' AP.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from jaxyolo import hyp as H
from jaxyolo.errors import ConfigError
from jaxyolo.files import atomic_write_text, read_document
from jaxyolo.search.config_files import config_diff, resolve_data, train_settings
from jaxyolo.search.report import cell, markdown_table, paired_test, seed_values
from jaxyolo.train_options import TrainOptions, flatten

log = logging.getLogger("jaxyolo.pipeline")

FORMAT = "jaxyolo-ablation/1"
ROW_KEYS = ("name", "label", "set", "hyp", "start", "teacher", "published")
ROW_SETTINGS = ("out", "init_seeds", "data.source", "model.weights", "distill.teacher", "seed")  # the runner's
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


@dataclasses.dataclass
class Row:
    name: str
    label: str = ""
    set: dict = dataclasses.field(default_factory=dict)
    hyp: dict = dataclasses.field(default_factory=dict)
    start: str | None = None
    teacher: str | None = None
    published: float | None = None  # the paper's figure for the row (AP, in percent)


@dataclasses.dataclass
class AblationConfig:
    name: str
    data: str
    rows: list[Row]
    train: TrainOptions = dataclasses.field(default_factory=TrainOptions)
    seeds: int = 3
    compare: list | None = None  # [[ROW_A, ROW_B], ...]; default: each row against the one before
    note: str = ""  # a line for the report (what the rows stand for)
    kind: str = "ablation"

    def check(self) -> None:
        try:
            self.train.check()
        except ConfigError as e:
            raise ConfigError(f"train.{e}") from None
        if not isinstance(self.seeds, int) or isinstance(self.seeds, bool) or self.seeds < 1:
            raise ConfigError(f"seeds: expected a positive integer, got {self.seeds!r}")
        names = [r.name for r in self.rows]
        if not names or len(set(names)) != len(names):
            raise ConfigError(f"rows: expected rows with distinct names, got {names}")
        for r in self.rows:
            for ref in ("start", "teacher"):
                v = getattr(r, ref)
                if v is not None and v not in names:
                    raise ConfigError(f"rows.{r.name}.{ref}: no row named {v!r} (rows: {', '.join(names)})")
            bad = sorted(set(r.set) & set(ROW_SETTINGS))
            if bad:
                raise ConfigError(f"rows.{r.name}.set: {', '.join(bad)} are set by the pipeline itself")
            options(self, r, Path("."), None if r.start is None else 0)  # the row's settings exist
        order(self.rows)
        for pair in self.comparisons():
            if len(pair) != 2 or not all(p in names for p in pair):
                raise ConfigError(f"compare: expected pairs of row names, got {pair!r}")

    def comparisons(self) -> list[list[str]]:
        if self.compare is not None:
            return [list(p) for p in self.compare]
        return [[a.name, b.name] for a, b in zip(self.rows, self.rows[1:])]

    def to_dict(self) -> dict:
        return json.loads(json.dumps(dataclasses.asdict(self), default=str))


def from_raw(raw: dict, path: Path) -> AblationConfig:
    """The config of a pipeline YAML with `kind: ablation` (`search.pipeline.load_config` reads
    the file and applies overrides first)."""
    fields = {f.name for f in dataclasses.fields(AblationConfig)}
    unknown = sorted(set(raw) - fields)
    if unknown:
        raise ConfigError(f"config {path}: unknown key(s) {', '.join(unknown)}; known: {', '.join(sorted(fields))}")
    for req in ("data", "rows"):
        if req not in raw:
            raise ConfigError(f"config {path}: missing required key {req!r}")
    raw = dict(raw)
    raw["train"] = train_settings(raw.get("train") or {}, "train", path, ROW_SETTINGS)
    raw["data"] = resolve_data(str(raw["data"]), path.parent)
    if not isinstance(raw["rows"], list):
        raise ConfigError(f"config {path}: rows: expected a list of rows")
    rows = []
    for i, r in enumerate(raw["rows"]):
        if not isinstance(r, dict) or "name" not in r:
            raise ConfigError(f"config {path}: rows[{i}]: expected a mapping with a `name`")
        bad = sorted(set(r) - set(ROW_KEYS))
        if bad:
            raise ConfigError(f"config {path}: rows.{r['name']}: unknown key(s) {', '.join(bad)}; "
                              f"known: {', '.join(ROW_KEYS)}")
        for key in ("set", "hyp"):
            if not isinstance(r.get(key) or {}, dict):
                raise ConfigError(f"config {path}: rows.{r['name']}.{key}: expected a mapping")
        rows.append(Row(**{**r, "name": str(r["name"]), "set": flatten(r.get("set") or {}),
                           "hyp": dict(r.get("hyp") or {})}))
    raw["rows"] = rows
    cfg = AblationConfig(**raw)
    try:
        cfg.check()
    except ConfigError as e:
        raise ConfigError(f"config {path}: {e}") from None
    return cfg


def order(rows: list[Row]) -> list[Row]:
    """The rows in an order where every row comes after the rows it starts from or learns from."""
    by_name = {r.name: r for r in rows}
    done: list[Row] = []
    visiting: set[str] = set()

    def visit(r: Row):
        if r in done:
            return
        if r.name in visiting:
            raise ConfigError(f"rows.{r.name}: start/teacher references form a cycle")
        visiting.add(r.name)
        for dep in (r.start, r.teacher):
            if dep is not None:
                visit(by_name[dep])
        visiting.discard(r.name)
        done.append(r)

    for r in rows:
        visit(r)
    return done


def row_folder(out: Path, row: Row) -> Path:
    return out / "rows" / row.name


def _weights(out: Path, row: Row, seed: int, seeds: int) -> Path:
    """Where a row leaves seed `seed`'s final EMA weights."""
    folder = row_folder(out, row)
    if row.start is None:  # one population of `seeds` members
        return folder / "train" / "weights" / (f"member{seed}" if seeds > 1 else "") / "last"
    return folder / f"seed{seed}" / "weights" / "last"


def options(cfg: AblationConfig, row: Row, out: Path, seed: int | None) -> TrainOptions:
    """The TrainOptions of a row: a population of every seed (`seed` None) or one seed's fine-tune."""
    by_name = {r.name: r for r in cfg.rows}
    hyp = cfg.train.hyp
    if row.hyp:
        from jaxyolo import families

        family = families.of_model(row.set.get("model.name", cfg.train.model.name))
        hyp = H.for_family(hyp, family)
        base = dict(hyp) if isinstance(hyp, Mapping) else H._read(hyp)
        hyp = {**base, **row.hyp}
    changes: dict[str, Any] = {**row.set, "data.source": cfg.data, "hyp": hyp}
    if "eval.every" not in row.set:
        # the report reads the final weights only: evaluate at the end unless the row asks otherwise
        changes["eval.every"] = row.set.get("optim.epochs", cfg.train.optim.epochs)
    if row.teacher is not None:
        changes["distill.teacher"] = str(_weights(out, by_name[row.teacher], 0, cfg.seeds))
    if row.start is None:
        changes.update({"init_seeds": list(range(cfg.seeds)), "out": str(row_folder(out, row) / "train")})
        if seed is not None:
            raise AssertionError("a row without `start` trains every seed at once")
    else:
        s = seed or 0
        changes.update({"model.weights": str(_weights(out, by_name[row.start], s, cfg.seeds)), "seed": s,
                        "out": str(row_folder(out, row) / f"seed{s}")})
    try:
        return cfg.train.updated(changes)
    except ConfigError as e:
        raise ConfigError(f"rows.{row.name}.set: {e}") from None


# ------------------------------------------------------------------------------------------------ run


def run_ablation(cfg: AblationConfig, out: str | Path, *, rows: list[str] | None = None,
                 progress: Callable[[dict], None] | None = None):
    """Run (or continue) the rows in `out` (all, or `rows` and what they need); returns
    (results by row name, the report's path)."""
    from jaxyolo import distributed as dist

    out = Path(out)
    emit = progress if progress is not None and dist.is_primary() else (lambda info: None)
    cfg.check()
    _check_saved(cfg, out)
    want = set(rows or [r.name for r in cfg.rows])
    unknown = sorted(want - {r.name for r in cfg.rows})
    if unknown:
        raise ConfigError(f"rows: unknown {', '.join(unknown)}; known: {', '.join(r.name for r in cfg.rows)}")
    by_name = {r.name: r for r in cfg.rows}
    need: set[str] = set()

    def add(name):
        if name not in need:
            need.add(name)
            for dep in (by_name[name].start, by_name[name].teacher):
                if dep is not None:
                    add(dep)

    for name in want:
        add(name)
    results = {r.name: res for r in cfg.rows if (res := _read_result(out, r)) is not None}
    t_all = time.time()
    for row in order(cfg.rows):
        if row.name not in need:
            continue
        if row.name in results:
            emit({"event": "stage", "stage": row.name, "rows": [row.name], "status": "cached"})
            continue
        emit({"event": "stage", "stage": row.name, "rows": [row.name], "status": "start", "kind": "train"})
        t0 = time.time()
        res = _train_row(cfg, row, out, emit)
        res["seconds"] = time.time() - t0
        atomic_write_text(row_folder(out, row) / "result.json", json.dumps(res, indent=1))
        results[row.name] = res
        write_report(cfg, out, results)
        emit({"event": "stage", "stage": row.name, "rows": [row.name], "status": "done", "seconds": res["seconds"]})
    report = write_report(cfg, out, results)
    emit({"event": "end", "out": str(out), "seconds": time.time() - t_all, "report": str(report)})
    return results, report


def _train_row(cfg: AblationConfig, row: Row, out: Path, emit) -> dict:
    import jaxyolo
    from jaxyolo.train_loop import fit

    def run(o: TrainOptions):
        folder = Path(o.out)
        return fit(o, resume=folder.exists() and any(folder.iterdir()), progress=emit)

    def last_metrics(records, member):
        rec = [r for r in records if (r.member or 0) == member and r.evaluated][-1]
        return {k: float(rec.metrics[k]) for k in METRICS}

    seeds = []
    if row.start is None:
        o = options(cfg, row, out, None)
        res = run(o)
        for s in range(cfg.seeds):
            seeds.append({"seed": s, **last_metrics(res.records, s), "weights": str(_weights(out, row, s, cfg.seeds))})
    else:
        for s in range(cfg.seeds):
            o = options(cfg, row, out, s)
            res = run(o)
            seeds.append({"seed": s, **last_metrics(res.records, 0), "weights": str(_weights(out, row, s, cfg.seeds))})
    det = jaxyolo.load(seeds[0]["weights"])
    info = {"kind": "train", "row": row.name, "label": row.label, "model": det.spec.name,
            "params": int(det.num_params()), "img_size": o.data.img_size, "epochs": o.optim.epochs,
            "options": {k: v for k, v in flatten(o.to_dict()).items() if k.startswith("model.")},
            "start": row.start, "teacher": row.teacher, "seeds": seeds}
    sparsity = Path(o.out) / "sparsity.json"
    if sparsity.exists():
        info["sparsity"] = json.loads(sparsity.read_text())
    return info


def _check_saved(cfg: AblationConfig, out: Path) -> None:
    saved_path = out / "pipeline.json"
    if saved_path.exists():
        saved = read_document(saved_path, what="pipeline record", fmt="json")
        if not isinstance(saved, dict) or saved.get("format") != FORMAT:
            raise ConfigError(f"{saved_path}: format {saved.get('format')!r}, not an ablation run of this "
                              f"jaxyolo ({FORMAT!r}); use another --out")
        diff = config_diff(saved["config"], cfg.to_dict())
        if diff:
            raise ConfigError(f"out {out}: holds an ablation run with a different configuration "
                              f"({', '.join(diff)}); use another --out")
        return
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"out {out}: exists, is not empty and holds no pipeline run; use another --out")
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(saved_path, json.dumps({"format": FORMAT, "config": cfg.to_dict()}, indent=1))


def _read_result(out: Path, row: Row) -> dict | None:
    p = row_folder(out, row) / "result.json"
    if not p.exists():
        return None
    try:
        return json.loads(p.read_text())
    except json.JSONDecodeError:
        log.warning("%s: unreadable; row %s runs again", p, row.name)
        return None


# ------------------------------------------------------------------------------------------------ report


def anova(groups: dict[str, list[float]]) -> dict | None:
    """One-way ANOVA over the groups and Tukey's HSD between every pair (groups of ≥ 2 values;
    at least 2 groups). {'F', 'p', 'groups', 'pairs': [{'a', 'b', 'diff', 'p', 'low', 'high'}]}."""
    from scipy import stats

    g = {k: [x for x in v if not math.isnan(x)] for k, v in groups.items()}
    g = {k: v for k, v in g.items() if len(v) >= 2}
    if len(g) < 2 or all(np.std(v) == 0 for v in g.values()):
        return None
    names = list(g)
    f = stats.f_oneway(*g.values())
    tk = stats.tukey_hsd(*g.values())
    ci = tk.confidence_interval(0.95)
    pairs = [{"a": names[i], "b": names[j], "diff": float(np.mean(g[names[j]]) - np.mean(g[names[i]])),
              "p": float(tk.pvalue[i, j]), "low": float(-ci.high[i, j]), "high": float(-ci.low[i, j])}
             for i in range(len(names)) for j in range(i + 1, len(names))]
    return {"F": float(f.statistic), "p": float(f.pvalue), "groups": names, "pairs": pairs}


def tables(cfg: AblationConfig, results: dict) -> dict:

    main = []
    for row in cfg.rows:
        r = results.get(row.name)
        pub = "–" if row.published is None else f"{row.published:.2f}"
        if not r:
            main.append([row.name, row.label, pub, "pending"] + [""] * (len(METRICS) - 1) + [""])
            continue
        main.append([row.name, row.label, pub, *[cell(seed_values(r, m)) for m in METRICS],
                     f"{r['params'] / 1e6:.3f}M"])
    sig = []
    for a, b in cfg.comparisons():
        if not (results.get(a) and results.get(b)):
            sig.append([f"{a} → {b}", "pending", "", "", ""])
            continue
        row = [f"{a} → {b}"]
        for m in ("AP", "AP50"):
            pt = paired_test(seed_values(results[a], m), seed_values(results[b], m))
            diff = "–" if pt["mean_diff"] is None else f"{100 * pt['mean_diff']:+.2f}" + (
                f" ± {100 * pt['std_diff']:.2f}" if pt["std_diff"] is not None else "")
            row += [diff, "–" if pt["t"] is None else f"t={pt['t']:.2f}, p={pt['p']:.3f}"]
        sig.append(row)
    out = {"rows": {"header": ["row", "setting", "published AP", "AP", "AP50", "AP75", "APS", "APM", "APL", "params"],
                    "rows": main},
           "paired": {"header": ["rows", "ΔAP", "test (AP)", "ΔAP50", "test (AP50)"], "rows": sig}}
    an = anova({name: seed_values(r, "AP") for name, r in results.items()})
    if an:
        out["anova"] = {"F": an["F"], "p": an["p"], "groups": an["groups"]}
        out["tukey"] = {"header": ["rows", "ΔAP", "95 % CI", "p (Tukey HSD)"], "rows": [
            [f"{p['a']} → {p['b']}", f"{100 * p['diff']:+.2f}", f"[{100 * p['low']:+.2f}, {100 * p['high']:+.2f}]",
             f"{p['p']:.3f}"] for p in an["pairs"]]}
    return out


def write_report(cfg: AblationConfig, out: Path, results: dict) -> Path:
    tabs = tables(cfg, results)
    t = cfg.train
    lines = [f"# Ablation report: {cfg.name}", ""]
    if cfg.note:
        lines += [cfg.note, ""]
    lines += [f"Trained on `{cfg.data}` (train split), evaluated on its `val` split (final EMA weights); "
              f"batch {t.data.batch_size}, {t.optim.epochs} epochs unless a row sets its own; "
              f"{cfg.seeds} seed(s) per row. Metrics in percent, mean ± std over the seeds.", "",
              markdown_table(tabs["rows"]["header"], tabs["rows"]["rows"]), "",
              "Paired t-tests over the seeds (`scipy.stats.ttest_rel`):", "",
              markdown_table(tabs["paired"]["header"], tabs["paired"]["rows"]), ""]
    if "anova" in tabs:
        a = tabs["anova"]
        lines += [f"One-way ANOVA of AP over rows {', '.join(a['groups'])} (`scipy.stats.f_oneway`): "
                  f"F = {a['F']:.2f}, p = {a['p']:.3g}. Tukey's HSD (`scipy.stats.tukey_hsd`):", "",
                  markdown_table(tabs["tukey"]["header"], tabs["tukey"]["rows"]), ""]
    sparse = [(n, r["sparsity"]) for n, r in results.items() if r.get("sparsity")]
    for name, sp in sparse:
        w = sp.get("weights", [{}])[0]
        frac = w.get("prunable_zeros", 0) / max(w.get("prunable_weights", 1), 1)
        ap = lambda k: sp[k][0]["AP"] * 100 if sp.get(k) and sp[k][0] else float("nan")  # noqa: E731
        lines.append(f"Row {name}: {sp['pattern']} sparsity, exact {w.get('exact')}, {100 * frac:.1f} % of the "
                     f"prunable weights zero ({w.get('all_zeros', 0) / max(w.get('all_weights', 1), 1) * 100:.1f} % "
                     f"of all); seed-0 AP dense {ap('dense'):.2f}, pruned {ap('pruned'):.2f}, "
                     f"fine-tuned {ap('fine_tuned'):.2f}.")
    if sparse:
        lines.append("")
    atomic_write_text(out / "report.md", "\n".join(lines))
    atomic_write_text(out / "report.json", json.dumps({"config": cfg.to_dict(), "results": results,
                                                       "tables": tabs}, indent=1))
    return out / "report.md"
