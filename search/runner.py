"""The joint hyper-parameter search (JHS) run: evolution, then a trend-guided grid.

One generation = P hyper-parameter sets trained *together* by `jaxyolo.train_loop.fit` (the vmapped
population step, members sharded over the mesh's `pop` axis) for `trial_epochs` epochs on an
optional subset, validated every epoch (the per-level and per-objective validation loss curves
feed the loss-weight rule), scored by the last epoch's fitness 0.1·AP50 + 0.9·AP.

Phases, in order, all recorded in `results.json` / `results.csv` after each finished population:

1. ``evolve``: `generations` generations. Generation g draws its children with the generator
   ``numpy.random.default_rng([seed, 1, g])`` from the history of all earlier trials
   (`evolve.next_generation`: the reference's parent selection and mutation, gains by name); the
   first is the start vector plus P − 1 mutations of it.
2. ``grid``: one population along the trends of the evolution history (`trend.estimate_trends`,
   `trend.trend_grid` over the `grid_dims` strongest hyper-parameters around the best trial), plus
   the best trial with the per-level balance weights and the box/obj/cls gains derived from its
   validation loss curves (`trend.loss_weight_grid`) and every grid point with those weights.
   When no point is new (flat trends and unchanged weights, e.g. every trial at fitness 0), the
   phase trains nothing.
3. ``final`` (optional, `final_epochs` > 0): the winner retrained for `final_epochs` epochs.

Resume: the log is rewritten atomically (temporary file + rename) after every population, every
generation's randomness is a function of (seed, generation) and the history read back from the log
(floats round-trip exactly through JSON), and an interrupted population resumes inside its trial
folder with the trainer's exact resume. So a search killed at any point and resumed with
``resume=True`` loses no finished generation and ends with the same result as an unbroken one.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any
from pathlib import Path

import numpy as np

from jaxyolo import distributed as dist
from jaxyolo import families
from jaxyolo import hyp as H
from jaxyolo.errors import ConfigError
from jaxyolo.files import atomic_write_text, read_document
from jaxyolo.search import evolve, trend
from jaxyolo.search.space import SearchSpace
from jaxyolo.train_options import REPORTING, TrainOptions, flatten

log = logging.getLogger("jaxyolo.search")

LOG_FORMAT = "jaxyolo-search/3"  # 3: the trials' settings by dotted name (`train.data.img_size`); 2: flat
PHASES = ("evolve", "grid", "final")
METRIC_KEYS = ("AP", "AP50", "AP75", "APs", "APm", "APl")


TRIAL_DEFAULTS = {"data.batch_size": 16, "recipe.min_warmup_iters": 0}


def trial_defaults(changes: Mapping[str, Any] | None = None) -> TrainOptions:
    """The trials' training settings where a search gives none: batch 16, and no floor on warm-up
    iterations (the reference floors it at 1000; in short trials that floor would hide the searched
    warmup_epochs entirely). `changes`: any other settings, by dotted name."""
    return TrainOptions().updated({**TRIAL_DEFAULTS, **(changes or {})})


@dataclasses.dataclass
class SearchOptions:
    """A search: its own settings, and by composition the training settings of its trials
    (`train`, a TrainOptions; the search sets each trial's `optim.epochs`, `out`, `eval.every`,
    `eval.plots` and `checkpoint.save_weights`). `seed` drives the evolution; the trials train with `train.seed`."""

    train: TrainOptions = dataclasses.field(default_factory=trial_defaults)
    space: str | None = None  # a bundled search space name or a YAML path (None: the model family's)
    population: int = 16
    generations: int = 10
    trial_epochs: int = 3
    grid_dims: int = 4
    grid_step: float = 0.1  # grid spacing in normalised units (fraction of each range)
    final_epochs: int = 0  # retrain the winner this long (0: no final run)
    out: str = "runs/search/exp"
    seed: int = 0
    parent: str = "single"  # "single" | "weighted" (the reference's parent selection)
    top_n: int = 5
    mp: float = 0.8  # per-hyp mutation probability
    sigma: float = 0.2
    elite: int = 0  # children that are mutations of the single best trial

    def check(self) -> None:
        if not isinstance(self.train, TrainOptions):
            raise ConfigError(f"train: expected TrainOptions, got {type(self.train).__name__}")
        self.train.check()
        for name in ("population", "generations", "trial_epochs"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.grid_dims < 0 or self.final_epochs < 0:
            raise ConfigError("grid_dims and final_epochs must be >= 0")
        if self.parent not in ("single", "weighted"):
            raise ConfigError(f"parent: must be 'single' or 'weighted', got {self.parent!r}")
        if not 0 <= self.elite <= self.population:
            raise ConfigError(f"elite: must be in [0, population], got {self.elite}")


@dataclasses.dataclass
class SearchResult:
    out: Path
    trials: list[dict]
    best: dict  # the best trial's record
    best_hyp: dict


# An evaluator trains a population: (hyps, tag, epochs or None for trial_epochs) -> one dict per
# member with "fitness", "metrics" ({AP, AP50, ...}) and "curves" ({"local": (E, L, T),
# "global": (E, T), "terms": the T loss terms' names (default box, obj, cls)} validation losses per epoch).
Evaluator = Callable[[Sequence[dict], str, "int | None"], list[dict]]


def train_evaluator(options: SearchOptions, progress: Callable[[dict], None] | None = None) -> Evaluator:
    """Train each population with `fit` in `out/trials/<tag>` (resumed exactly if interrupted)."""
    from jaxyolo.train_loop import fit

    def evaluate(hyps: Sequence[dict], tag: str, epochs: int | None = None) -> list[dict]:
        folder = Path(options.out) / "trials" / tag
        topts = options.train.updated({"optim.epochs": epochs or options.trial_epochs, "out": str(folder),
                                       "eval.every": 1, "eval.plots": False, "checkpoint.save_weights": False})
        resume = folder.exists() and any(folder.iterdir())
        # every phase trains a multiple of the evolution's population (the grid's smaller or odd
        # sizes repeat their last member): one compiled step serves all phases, and with the run
        # length traced (`train.with_run`) the full runs of that population size after the search
        padded = list(hyps) + [hyps[-1]] * (-len(hyps) % options.population)
        res = fit(topts, hyps=padded, resume=resume, progress=progress)
        return [_member_result(res.records, m) for m in range(len(hyps))]

    return evaluate


def _member_result(records, m: int) -> dict:
    """Member m's trial result from a run's records: its last evaluated epoch's fitness and
    metrics, and its validation loss curves under the family's term names."""
    rows = sorted((r for r in records if r.member in (None, m) and r.evaluated), key=lambda r: r.epoch)
    last = rows[-1]
    return {"fitness": last.fitness,
            "metrics": {k: float(last.metrics.get(k, float("nan"))) for k in METRIC_KEYS},
            "curves": {"local": [r.val.local.tolist() for r in rows], "global": [r.val.overall.tolist() for r in rows],
                       "terms": list(last.val.terms)}}


# ------------------------------------------------------------------------------------------------


class SearchLog:
    """results.json (every trial, full detail) and results.csv (one row per trial), both atomic."""

    def __init__(self, out: Path, space: SearchSpace):
        self.out, self.space = out, space

    def read(self) -> dict | None:
        path = self.out / "results.json"
        if not path.exists():
            return None
        data = read_document(path, what="search log", fmt="json")
        if not isinstance(data, dict) or data.get("format") != LOG_FORMAT:
            raise ConfigError(f"{path}: search log format {data.get('format')!r}, this jaxyolo reads {LOG_FORMAT!r} "
                              "(a search written by another version: continue it with that version, or start "
                              "this one in a new --out)")
        return data

    def write(self, meta: dict, trials: list[dict]) -> None:
        atomic_write_text(self.out / "results.json", json.dumps({"format": LOG_FORMAT, **meta, "trials": trials},
                                                            indent=1))
        cols = ["phase", "generation", "member", "fitness", *(f"metrics/{k}" for k in METRIC_KEYS),
                *self.space.names]
        lines = [",".join(cols)]
        for t in trials:
            vals = [t["phase"], t["generation"], t["member"], t["fitness"], *(t["metrics"][k] for k in METRIC_KEYS),
                    *(t["params"][n] for n in self.space.names)]
            lines.append(",".join(str(v) for v in vals))
        atomic_write_text(self.out / "results.csv", "\n".join(lines) + "\n")


def _meta(options: SearchOptions, space: SearchSpace) -> dict:
    o = dataclasses.asdict(options)
    o.pop("out")
    o.pop("train")
    train = flatten(options.train.to_dict())
    o.update({f"train.{k}": v for k, v in train.items() if k not in REPORTING})  # one level: a difference names it
    return {"options": o, "space": space.to_dict()}


def run_search(options: SearchOptions, *, resume: bool = False, evaluate: Evaluator | None = None,
               progress: Callable[[dict], None] | None = None) -> SearchResult:
    """Run (or with `resume`, continue) the search described in the module docstring.

    `evaluate` replaces training (tests use synthetic fitness functions); `progress` receives
    dicts with an "event" key: "population" (before), "done" (after each population), "end".
    """
    options.check()
    family = families.of_model(options.train.model.name)
    space = SearchSpace.load(options.space or family.search_space, family=family)
    levels = _levels(options.train.model.name, family)
    base = H.load_hyp(H.for_family(options.train.hyp, family), family=family, num_levels=levels)
    out = Path(options.out)
    store = SearchLog(out, space)
    meta = _meta(options, space)
    saved = store.read() if resume else None
    if saved is not None:
        old = {k: v for k, v in saved["options"].items() if k not in ("generations", "final_epochs")}
        new = {k: v for k, v in json.loads(json.dumps(meta["options"])).items()
               if k not in ("generations", "final_epochs")}
        diff = sorted(k for k in new if old.get(k) != new[k])
        if diff or saved["space"] != json.loads(json.dumps(meta["space"])):
            raise ConfigError(f"resume {out}: the saved search differs in {', '.join(diff) or 'its space'}")
        trials = saved["trials"]
        log.info("resuming %s with %d finished trials", out, len(trials))
    else:
        if out.exists() and any(out.iterdir()) and not resume:
            raise ConfigError(f"out {out}: exists and is not empty (use --resume to continue, or another --out)")
        trials = []
    dist.barrier("search: out checked")  # every process has looked before the first write
    out.mkdir(parents=True, exist_ok=True)
    emit = progress if progress is not None and dist.is_primary() else (lambda info: None)
    evaluate = evaluate or train_evaluator(options)
    start_vec = space.start_vector()  # the space's `start` values; `options.train.hyp` fills the other keys

    def done(phase: str, generation: int) -> bool:
        return any(t["phase"] == phase and t["generation"] == generation for t in trials)

    def record(phase, generation, vectors, results, t0):
        for m, (v, r) in enumerate(zip(vectors, results)):
            trials.append({"phase": phase, "generation": generation, "member": m,
                           "params": dict(zip(space.names, (float(x) for x in v))),
                           "hyp": space.hyp_from_vector(v, base=base, family=family), "fitness": _finite(r["fitness"]),
                           "metrics": {k: _finite(r["metrics"].get(k)) for k in METRIC_KEYS},
                           "curves": r.get("curves"), "seed": options.seed})
        store.write(meta, trials)
        best = max(trials, key=lambda t: t["fitness"])
        emit({"event": "done", "phase": phase, "generation": generation, "seconds": time.time() - t0,
              "fitness": [_finite(r["fitness"]) for r in results], "best": best["fitness"]})

    def population(phase, generation, vectors):
        t0 = time.time()
        emit({"event": "population", "phase": phase, "generation": generation, "size": len(vectors)})
        hyps = [space.hyp_from_vector(v, base=base, family=family) for v in vectors]
        results = evaluate(hyps, f"{phase}{generation:03d}", None)
        record(phase, generation, vectors, results, t0)

    # 1. evolution
    for g in range(options.generations):
        if done("evolve", g):
            continue
        rng = np.random.default_rng([options.seed, 1, g])
        vecs, fit = _history(trials, space)
        if not len(fit):
            children = np.stack([start_vec] + [evolve.mutate(start_vec, space, rng, mp=options.mp,
                                                             sigma=options.sigma)
                                               for _ in range(options.population - 1)])
        else:
            children = evolve.next_generation(vecs, fit, space, options.population, rng, mode=options.parent,
                                              top_n=options.top_n, mp=options.mp, sigma=options.sigma,
                                              elite=options.elite)
        population("evolve", g, children)

    # 2. the trend-guided grid with the loss-curve derived weights
    if options.grid_dims > 0 and not done("grid", 0):
        grid, info = grid_population(trials, space, base, options, family=family)
        atomic_write_text(out / "grid.json", json.dumps(info, indent=1, default=_jsonable))
        if len(grid):
            population("grid", 0, grid)
        else:  # flat trends and no loss-curve weights: nothing new to try, so nothing is trained
            log.info("grid: no point differs from the trials already run (flat trends); the grid is skipped")

    best = max(trials, key=lambda t: t["fitness"])
    best_hyp = H.load_hyp(best["hyp"], family=family, num_levels=levels)
    atomic_write_text(out / "best_hyp.yaml", _best_yaml(best, best_hyp))

    # 3. the winner, trained for longer
    if options.final_epochs and not done("final", 0):
        t0 = time.time()
        emit({"event": "population", "phase": "final", "generation": 0, "size": 1})
        results = evaluate([best_hyp], "final000", options.final_epochs)
        record("final", 0, [space.vector_from_hyp(best_hyp)], results, t0)

    _plots(out, trials, space)
    emit({"event": "end", "out": str(out), "best": best["fitness"]})
    return SearchResult(out=out, trials=trials, best=best, best_hyp=best_hyp)


def grid_population(trials: list[dict], space: SearchSpace, base: dict, options: SearchOptions, *, family=None):
    """The grid of phase 2: `trend_grid` points around the best evolution trial, then the best
    trial and every grid point again with the per-level balance weights and the box/obj/cls gains
    that `loss_weight_grid` derives from the best trial's validation loss curves (the full factor).
    Vectors already trained are left out. Returns (vectors, description for grid.json)."""
    vecs, fit = _history(trials, space)
    best_i = int(np.argmax(fit))
    best = [t for t in trials if t["phase"] == "evolve"][best_i]
    trends = trend.estimate_trends(vecs, fit, space)
    points, grid_info = trend.trend_grid(vecs[best_i], trends, space, dims=options.grid_dims,
                                         step=options.grid_step, exclude=vecs)
    points = [np.asarray(p, np.float64) for p in points]
    derived, why = {}, {}
    curves = best.get("curves")
    if curves and len(curves["global"]) >= 2:
        derived, why = trend.loss_weight_grid(np.asarray(curves["local"]), np.asarray(curves["global"]),
                                              best["hyp"], space=space,
                                              terms=curves.get("terms", trend.OBJECTIVES), family=family)
    with_weights = []
    if derived:
        for p in [vecs[best_i]] + points:
            h = trend.apply_loss_weights(space.hyp_from_vector(p, base=base, family=family), derived, family=family)
            with_weights.append(space.clip(space.vector_from_hyp(h)))
    all_points, seen = [], {tuple(np.round(v, 5)) for v in vecs}
    for p in points + with_weights:
        key = tuple(np.round(p, 5))
        if key not in seen:
            seen.add(key)
            all_points.append(p)
    info = {"best_trial": {k: best[k] for k in ("phase", "generation", "member", "fitness")},
            "trends": trends, "grid": grid_info, "loss_weights": {"derived": derived, "rule": why},
            "points": [dict(zip(space.names, map(float, p))) for p in all_points]}
    return np.asarray(all_points, np.float64).reshape(-1, len(space.names)), info


def _levels(model: str, family) -> int:
    """The output levels of `model` (its `balance` has one weight per level), from its table."""
    name, table = families.load_model_table(model)
    return len(family.resolve(table, name=name).strides)


def _history(trials: list[dict], space: SearchSpace) -> tuple[np.ndarray, np.ndarray]:
    ev = [t for t in trials if t["phase"] == "evolve"]
    if not ev:
        return np.zeros((0, len(space.names))), np.zeros((0,))
    vecs = np.array([[t["params"][n] for n in space.names] for t in ev], np.float64)
    return vecs, np.array([t["fitness"] for t in ev], np.float64)


def _finite(x) -> float:
    x = float("nan") if x is None else float(x)
    return x if math.isfinite(x) else -1.0  # a diverged trial ranks last, and JSON stays valid


def _jsonable(x):
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return str(x)


def _best_yaml(best: dict, hyp: dict) -> str:
    head = (f"# Best hyper-parameters of a jaxyolo search: {best['phase']} generation {best['generation']} "
            f"member {best['member']},\n# fitness {best['fitness']:.6f} (0.1 AP50 + 0.9 AP). "
            "Load with `jaxyolo train --hyp THIS_FILE`.\n")
    return head + H.to_yaml(hyp)


def _plots(out: Path, trials: list[dict], space: SearchSpace) -> None:
    try:
        from jaxyolo.search import plots
    except ImportError:
        return
    if not dist.is_primary():
        return
    try:
        plots.plot_search(out, trials, space)
    except Exception as e:  # noqa: BLE001 - a plot must never lose a finished search
        log.warning("could not draw the search plots in %s: %s", out, e)
