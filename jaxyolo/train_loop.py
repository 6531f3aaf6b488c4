"""The training run: data, the population step, evaluation, checkpoints, results.

`fit(TrainOptions(...))` trains one detector, or a population of P hyper-parameter sets together
(`hyps=[...]`), on one dataset:

* the host pipeline (`jaxyolo.data.loader`) builds mosaic and single versions of each sample;
  every member augments them on device with its own hyper-parameters;
* one jitted, vmapped `train_step` per iteration over the ('pop', 'data') mesh; with a `teacher`
  checkpoint, the distillation step (`jaxyolo.distill`) instead: the students' loss gains the
  kd_* terms of their hyp sets, the teacher is replicated over the mesh, and what is saved as
  weights is the student alone;
* per epoch: validation of every member's EMA model, one row per member appended to
  `results.csv` (rewritten atomically), TensorBoard scalars, the EMA detector saved as
  `weights/last` and, when fitness improves, `weights/best` (loadable by `jaxyolo.load`);
* the full training state (Orbax) in `state/` every `save_every` iterations and at each epoch end,
  so `resume=True` continues exactly: batches, augmentation and KST draws are functions of
  (seed, epoch, iteration), never of how often the run was interrupted.

The library does not print: progress goes to the `progress` callback and `logging`.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import functools
import gc
import io
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Callable, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from jaxyolo import distill as D
from jaxyolo import distributed as dist
from jaxyolo import hyp as H
from jaxyolo import train_step as T
from jaxyolo.augment import augment_host_batch
from jaxyolo.data.loader import ResizedCache, train_batches
from jaxyolo.data.sources import open_dataset
from jaxyolo.errors import CheckpointError, ConfigError, JaxyoloError
from jaxyolo.files import atomic_write_text, crc32, quiet_logger, reason
from jaxyolo.records import EpochRecord, Losses
from jaxyolo.train_options import REPORTING, TrainOptions, flatten, from_flat_names
from jaxyolo.validate import validate_population

log = logging.getLogger("jaxyolo.train")
STATE_FORMAT = "jaxyolo-train-state/4"  # 4: TrainState.extras; 3: leaves packed per dtype (`_StateStore`)


class TrainingError(JaxyoloError):
    """A run that cannot go on (e.g. too many non-finite losses in a row)."""


@dataclasses.dataclass
class RunResult:
    out: Path
    records: list[EpochRecord]  # one per (epoch, member)
    best_fitness: list[float]
    detectors: list  # EMA detector per member at the end

    @property
    def history(self) -> list[dict]:
        """The records as results.csv rows."""
        return [r.row() for r in self.records]


def fit(options: TrainOptions, hyps: Sequence[Mapping] | None = None, *, resume: bool = False,
        progress: Callable[[dict], None] | None = None, hooks: T.StepHooks | None = None) -> RunResult:
    """Train (see the module docstring). `hyps`: a population of P hyp sets (default: one, from
    `options.hyp`). `progress` receives dicts with an "event" key: "start", "step", "epoch", "end".
    `hooks`: a training method's step transforms and extras (`jaxyolo.train_step.StepHooks`)."""
    options.check()
    out = Path(options.out)
    if options.model.sparsity:
        from jaxyolo import sparsity as S

        hooks = T.compose_hooks(hooks, S.hooks(options.model.sparsity))
        if not options.model.weights and not options.checkpoint.rewind:
            log.warning("sparsity %s: masks from freshly initialised weights (the recipe prunes trained ones: "
                        "give --weights)", options.model.sparsity)
    primary = dist.is_primary()  # with several processes, the one that writes what the run leaves
    emit = progress if progress is not None and primary else (lambda info: None)
    train_ds = open_dataset(options.data.source, options.data.train_split)
    val_ds = open_dataset(options.data.source, options.data.val_split)
    if options.data.subset:
        from jaxyolo.data.dataset import Subset

        train_ds = Subset(train_ds, range(min(options.data.subset, len(train_ds))))
    if train_ds.num_classes != val_ds.num_classes:
        raise ConfigError(f"data {options.data.source}: train has {train_ds.num_classes} classes, val {val_ds.num_classes}")
    det = _initial_detector(options, train_ds.num_classes)
    options = dataclasses.replace(options, hyp=H.for_family(options.hyp, det.family))  # none given: the family's
    recipe = run_recipe(options)
    teacher = _teacher(options)
    anchors, anchor_report = _run_anchors(options, recipe, det, teacher, train_ds)
    if anchors is not None:
        det = _initial_detector(options, train_ds.num_classes, anchors=anchors)
    if teacher is not None:
        D.check_compatible(det, teacher)
    det.names = tuple(train_ds.names)
    nl = len(det.spec.strides)
    hyp_list = [H.load_hyp(h, num_levels=nl, family=det.family) for h in (hyps or [options.hyp])]
    if teacher is not None and D.kd_weights_zero(hyp_list, det.family.kd_keys):
        log.warning("teacher %s: every distillation weight of the hyp set(s) is 0, so distillation adds "
                    "nothing (set %s in the hyp file)", options.distill.teacher, ", ".join(det.family.kd_keys))
    if options.init_seeds is not None and len(options.init_seeds) != len(hyp_list):
        if hyps is not None:
            raise ConfigError(f"init_seeds: {len(options.init_seeds)} seeds for {len(hyp_list)} hyp sets")
        hyp_list = hyp_list * len(options.init_seeds)  # one hyp set, repeated per seed
    pop = len(hyp_list)
    nb = len(train_ds) // options.data.batch_size
    if nb < 1:
        raise ConfigError(f"data {options.data.source}: {len(train_ds)} training images is fewer than one batch "
                          f"of {options.data.batch_size}")
    cfg = T.TrainConfig(epochs=options.optim.epochs, batches_per_epoch=nb, batch_size=options.data.batch_size,
                        img_size=options.data.img_size, nominal_batch=options.optim.nominal_batch,
                        min_warmup_iters=recipe["min_warmup_iters"], schedule=options.optim.schedule,
                        gain_rule=recipe["gain_rule"], augment=True)
    mesh = _mesh(pop, options)
    pop_sharding = NamedSharding(mesh, P("pop"))
    data_sharding = NamedSharding(mesh, P("data"))
    augment = functools.partial(augment_host_batch, mixup_rows=any(h["mixup"] > 0 for h in hyp_list),
                                axis_aligned=all(h[k] == 0 for h in hyp_list for k in AXIS_ALIGNED_KEYS))
    single_rows, mosaic_rows = _box_rows(train_ds, options.data.max_boxes)
    my_rows = dist.local_rows(data_sharding, options.data.batch_size)  # of every batch, what this process reads
    if teacher is None:
        member_step = T.make_train_step(det, cfg, augment_fn=augment, hooks=hooks)
        shared: tuple = ()
        init_one = lambda d, seed: T.with_run(T.init_state(d), cfg)
    else:
        member_step = D.make_distill_step(det, teacher, cfg, augment_fn=augment, features=options.distill.features,
                                          hooks=hooks)
        shared = (dist.place(D.teacher_params(teacher), NamedSharding(mesh, P())),)
        init_one = lambda d, seed: T.with_run(D.init_state(d, teacher, features=options.distill.features, seed=seed), cfg)
    use_mosaic = any(h["mosaic"] > 0 for h in hyp_list)
    hyp_arr = dist.place(H.stack(hyp_list), pop_sharding)
    # the last `close_mosaic` epochs train on single images (same arrays, same compiled step)
    hyp_closed = dist.place(H.stack([{**h, "mosaic": 0.0} for h in hyp_list]), pop_sharding)
    first_closed = options.optim.epochs - recipe["close_mosaic"]
    det.training = {"img_size": options.data.img_size, "recipe": recipe, "hyp": hyp_list[0], "data": str(options.data.source)}
    graphdef = nnx.split(det.model, nnx.Param, nnx.BatchStat)[0]

    writer = _Background()  # every checkpoint write of the run, in order, off the training thread
    store = _StateStore(out / "state", writer)
    meta = {"format": STATE_FORMAT, "options": options.to_dict(), "hyps": hyp_list,
            "batches_per_epoch": nb, "population": pop, "paths": _resolved_paths(options)}
    state = initial_population(options, det, pop, init_one)
    if options.checkpoint.rewind and not (resume and store.exists()):
        state = _rewound(options, state, meta, writer)
    dense = state
    if hooks is not None and hooks.init is not None:
        state = jax.vmap(hooks.init)(state)  # a resumed run's values replace these below
    history: list[EpochRecord] = []
    terms, levels = det.family.term_names, det.family.level_names(det.spec)
    resumed_sums, elapsed0 = None, 0.0
    best = [-1.0] * pop
    if resume and store.exists():
        state, saved = store.restore(state, check=lambda saved: _check_resumable(saved, meta))
        # rows written after the saved state (a kill between the two writes) are redone
        history = [EpochRecord.from_row(r, terms=terms, levels=levels) for r in _read_history(out / "results.csv")
                   if r["iterations"] <= int(saved["step"])]
        best = saved["best_fitness"]
        resumed_sums = saved.get("epoch_sums")
        elapsed0 = float(saved.get("elapsed", 0.0))
        log.info("resumed %s at iteration %d", out, int(saved["step"]))
    elif out.exists() and any(out.iterdir()) and not resume:
        raise ConfigError(f"out {out}: exists and is not empty (use --resume to continue, or another --out)")
    fresh = not out.exists() or not any(out.iterdir())  # nothing of an earlier run is at stake
    dist.barrier("fit: out checked")  # every process has looked at `out` before the first writes to it
    if primary:
        out.mkdir(parents=True, exist_ok=True)
        (out / "hyp.yaml").write_text(H.to_yaml(hyp_list[0]))
        (out / "options.json").write_text(json.dumps(meta["options"], indent=1))
    state = dist.place(state, pop_sharding)
    treedef = jax.tree.structure(state)
    # the loop holds the state as its flat leaves (`T.flat_state_step`: a cheaper dispatch)
    step_fn = T.population_step(T.flat_state_step(member_step, treedef), mesh, replicated=len(shared))
    step_program = None
    tb = _tensorboard(out) if primary else _NullWriter()

    step = int(dist.to_host(state.step)[0])
    emit({"event": "start", "iterations": cfg.total_iters, "step": step, "population": pop,
          "train_images": len(train_ds), "val_images": len(val_ds), "batches_per_epoch": nb,
          "anchors": anchor_report})
    if options.model.sparsity and not (out / "sparsity.json").exists():
        _sparsity_before(out, options, graphdef, det, dist.place(dense, pop_sharding), state, hyp_arr, val_ds,
                         recipe["gain_rule"], primary)
    del dense
    base_key = jax.random.key(options.seed)
    t_start = time.time() - elapsed0  # time_s counts the saved run's time up to its checkpoint

    saves = [0]

    def save(state, sums, count):
        saves[0] += 1
        epoch_sums = None if sums is None else {"count": count.tolist(),
                                                **{k: v.tolist() for k, v in sums.items()}}
        store.save(state, {**meta, "step": step, "best_fitness": best, "elapsed": time.time() - t_start,
                           "epoch_sums": epoch_sums})

    cache = ResizedCache(train_ds, options.data.img_size, options.data.cache_mb << 20) if options.data.cache_mb else None
    heap = _SettledHeap()
    snapshots = set(options.checkpoint.snapshots)

    def snapshot(state):
        _StateStore(out / "snapshots" / f"iter{step}", writer).save(state, {**meta, "step": step})
        for m in range(pop):
            folder = out / "weights" / (f"member{m}" if pop > 1 else "")
            writer.submit(_save_detector, T.ema_detector(det, _member(state, m), ema=False), folder / f"iter{step}")

    try:
        if step in snapshots and not (out / "snapshots" / f"iter{step}").exists():
            snapshot(state)  # iteration 0: the initial weights
        while step < cfg.total_iters:
            t_epoch = time.time()
            epoch, start_batch = divmod(step, nb)
            batches = train_batches(train_ds, img_size=options.data.img_size, batch_size=options.data.batch_size,
                                    max_boxes=single_rows, mosaic_max_boxes=mosaic_rows, seed=options.seed,
                                    epoch=epoch, mosaic=use_mosaic, start_batch=start_batch,
                                    num_workers=options.data.workers, cache=cache, rows=my_rows)
            sums, count, pending = None, 0, None
            if start_batch and resumed_sums:  # the epoch's running averages continue exactly
                count = np.asarray(resumed_sums["count"], np.int64)
                sums = {k: np.asarray(v, np.float32) for k, v in resumed_sums.items() if k != "count"}
            resumed_sums = None
            leaves = jax.tree.leaves(state)
            for batch in batches:
                batch = {k: v for k, v in batch.items() if k not in ("index", "overflow", "mosaic_overflow")}
                keys = jax.random.split(jax.random.fold_in(base_key, step), pop)
                hyp_now = hyp_closed if epoch >= first_closed else hyp_arr
                batch = dist.global_batch(batch, data_sharding, options.data.batch_size)
                args = (leaves, *shared, batch, hyp_now, dist.place_keys(keys, pop_sharding))
                if step_program is None:  # with several processes: compiled, then started in step
                    step_program = dist.compiled(step_fn, *args)
                leaves, metrics = step_program(*args)
                if pending is not None:  # read the previous step's metrics while this one runs
                    sums, count = _accumulate(sums, count, pending, options, step - 1, emit)
                pending = metrics
                step += 1
                if step in snapshots:
                    snapshot(jax.tree.unflatten(treedef, leaves))
                if options.checkpoint.every and step % options.checkpoint.every == 0 and step % nb:
                    events: list[dict] = []  # announced once the state that follows them is on disk
                    sums, count = _accumulate(sums, count, pending, options, step - 1, events.append)
                    pending = None
                    state = jax.tree.unflatten(treedef, leaves)
                    save(state, sums, count)
                    store.wait()  # the events promise a state on disk; epoch-end saves stay asynchronous
                    for event in events:
                        emit(event)
            sums, count = _accumulate(sums, count, pending, options, step - 1, emit)  # an epoch ends on a step
            timing = {"time/train_s": time.time() - t_epoch}  # its iterations (since a resume: the rest)
            state = jax.tree.unflatten(treedef, leaves)
            last_epoch = step >= cfg.total_iters
            t_val = time.time()
            if (epoch + 1) % options.eval.every == 0 or last_epoch:
                results = _evaluate(graphdef, det, state, hyp_arr, val_ds, options, recipe["gain_rule"])
                timing["time/val_s"] = time.time() - t_val
            else:
                results = [None] * pop
                timing["time/val_s"] = float("nan")
            records, lrs = [], dist.to_host(pending["lr"])
            for m in range(pop):
                rec = _record(epoch, step, time.time() - t_start, sums, count, m, results[m], pop,
                              float(lrs[m]), timing, terms=terms, levels=levels, kd_terms=det.family.kd_terms)
                records.append(rec)
                if results[m] is not None and options.checkpoint.save_weights:
                    # device-side slices: fresh buffers that the next step's donation cannot touch
                    member_det = T.ema_detector(det, _member(state, m))
                    folder = out / "weights" / (f"member{m}" if pop > 1 else "")
                    improved = rec.fitness > best[m]
                    best[m] = max(best[m], rec.fitness)
                    writer.submit(_save_weights, member_det, folder, improved)
            history.extend(records)
            rows = [r.row() for r in records]
            if primary:
                _write_csv(out / "results.csv", [r.row() for r in history])
            if results[0] is not None and options.eval.plots and primary:
                _eval_plots(out, results[0], val_ds)
            for row in rows:
                tb.scalars({k: v for k, v in row.items() if isinstance(v, float) and np.isfinite(v)},
                           step=epoch, prefix=f"member{row['member']}/" if pop > 1 else "")
            save(state, None, None)
            emit({"event": "epoch", "epoch": epoch, "epochs": options.optim.epochs, "rows": rows})
            heap.settle()
    except BaseException:
        if fresh and not saves[0] and primary:  # stopped before its first saved state: nothing to resume from
            with contextlib.suppress(Exception):  # the error being raised is the one to report
                writer.close()
                tb.close()
            for p in out.iterdir():
                shutil.rmtree(p) if p.is_dir() else p.unlink()
            log.warning("the run stopped before its first saved state; removed what it had written in %s", out)
        raise
    finally:  # a run that stops on an error still leaves its last state and weights complete
        heap.release()
        writer.close()
    tb.close()
    final = dist.to_host(state)
    dets = []
    for m in range(pop):
        dets.append(T.ema_detector(det, T.member(final, m)))
    if options.eval.plots and primary:
        _plots(out)
    if options.model.sparsity and primary:
        _sparsity_after(out, options, final, history, pop)
    emit({"event": "end", "out": str(out), "best_fitness": best})
    return RunResult(out=out, records=history, best_fitness=best, detectors=dets)


# ----------------------------------------------------------------------------------------------


def _sparsity_before(out, options, graphdef, det, dense, pruned, hyp_arr, val_ds, gain_rule, primary) -> None:
    """sparsity.json's first half: held-out metrics of the starting weights, dense and with the
    masks applied (before any fine-tuning), and the masks' zeros."""
    from jaxyolo import sparsity as S

    pattern = S.Pattern.parse(options.model.sparsity)
    report = {"pattern": str(pattern), "masks": S.check(T.member(dist.to_host(pruned.params), 0), pattern)}
    for name, st in (("dense", dense), ("pruned", pruned)):
        res = _evaluate(graphdef, det, st, hyp_arr, val_ds, options, gain_rule)
        report[name] = [{k: float(r["coco"].get(k, float("nan"))) for k in METRICS} for r in res]
    if primary:
        atomic_write_text(out / "sparsity.json", json.dumps(report, indent=1))
        log.info("sparsity %s: AP dense %s, pruned before fine-tuning %s", pattern,
                 [round(r["AP"], 4) for r in report["dense"]], [round(r["AP"], 4) for r in report["pruned"]])


def _sparsity_after(out, options, final, history, pop: int) -> None:
    """sparsity.json's second half: the last evaluated metrics of each member (after the fine-tune)
    and the exactness and zeros of its final EMA weights (what is saved and exported)."""
    from jaxyolo import sparsity as S

    path = out / "sparsity.json"
    report = json.loads(path.read_text()) if path.exists() else {"pattern": options.model.sparsity}
    pattern = S.Pattern.parse(report["pattern"])
    report["fine_tuned"] = [None] * pop
    for rec in history:
        if rec.val is not None:  # an evaluated epoch: the last one wins
            report["fine_tuned"][rec.member or 0] = {k: float(rec.metrics.get(k, float("nan"))) for k in METRICS}
    report["weights"] = [S.check(T.member(final.ema_params, m), pattern) for m in range(pop)]
    atomic_write_text(path, json.dumps(report, indent=1))


# a population whose hyps all leave these at 0 warps separably (`augment.warp_image_axis_aligned`)
AXIS_ALIGNED_KEYS = ("degrees", "shear", "perspective")


def _box_rows(train_ds, cap: int) -> tuple[int, int]:
    """Padded box rows of single images and of mosaics: the most boxes an image of the training
    set has (four times that for a mosaic), at most `cap`. The loss's cost grows with the rows, and
    the default cap of 100 is many times what small datasets need."""
    per_image = max((len(train_ds.labels(i)[0]) for i in range(len(train_ds))), default=1)
    return max(1, min(cap, per_image)), max(1, min(cap, 4 * per_image))


def run_recipe(options: TrainOptions) -> dict:
    """The run-level settings of `options`: its hyp file's recipe keys, then the options that are set."""
    return H.load_recipe(options.hyp, overrides=dataclasses.asdict(options.recipe))


def _run_anchors(options: TrainOptions, recipe: dict, det, teacher, train_ds):
    """(anchors, report): the anchors a fresh model should take instead of its table's (None: keep
    them) and what was checked (None: nothing). With
    `autoanchor`, the teacher's when distilling (student and teacher must predict alike), else the
    table's refitted to the training boxes when they cover them badly (`jaxyolo.anchors`)."""
    if not recipe["autoanchor"] or options.model.weights or getattr(det.spec, "anchors", None) is None:
        return None, None
    if teacher is not None:
        return [[v for wh in lvl for v in wh] for lvl in teacher.spec.anchors], {"from": "teacher"}
    from jaxyolo.anchors import check_anchors

    anchor_t = float(H.load_hyp(options.hyp, num_levels=len(det.spec.strides))["anchor_t"])
    return check_anchors(train_ds, det.spec.anchors, options.data.img_size, anchor_t, seed=options.seed)


def _initial_detector(options: TrainOptions, nc: int, anchors=None):
    import jaxyolo

    if options.model.weights:
        w = Path(options.model.weights)
        det = jaxyolo.load_torch(options.model.name, w, num_classes=nc) if w.suffix in (".pt", ".pth", ".npz") \
            else jaxyolo.load(w)
        if det.num_classes != nc:
            raise ConfigError(f"weights {w}: {det.num_classes} classes, the data has {nc}")
        return det
    return jaxyolo.create_model(options.model.name, num_classes=nc, anchors=anchors, seed=options.seed,
                                **options.model.options)


def initial_population(options: TrainOptions, det, pop: int, init_one=None) -> T.TrainState:
    """The P members' starting TrainState: `det`'s weights for all, or with `init_seeds` member m
    built from seed init_seeds[m]. `init_one(detector, seed)` makes one member's state."""
    init_one = init_one or (lambda d, seed: T.init_state(d))
    if options.init_seeds is None:
        return T.replicate(init_one(det, options.seed), pop)
    made = {options.seed: det}  # one detector per distinct seed
    for s in options.init_seeds:
        if s not in made:
            made[s] = _initial_detector(dataclasses.replace(options, seed=s), det.num_classes,
                                        anchors=det.family.checkpoint_fields(det.spec).get("anchors"))
    members = [init_one(made[s], s) for s in options.init_seeds]
    return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def _member(state, m: int):
    """Member m of the population's state: device-side slices (fresh buffers that the next step's
    donation cannot touch); with several processes, its value in every process."""
    return dist.to_host(state, row=m) if dist.multi_process() else T.member(state, m)


def _teacher(options: TrainOptions):
    """The teacher detector of a distillation run (None without one)."""
    if not options.distill.teacher:
        return None
    import jaxyolo

    return jaxyolo.load(Path(options.distill.teacher))


def _mesh(pop: int, options: TrainOptions):
    n = jax.device_count()
    if options.mesh_pop is not None:
        mp = options.mesh_pop
    else:  # as many devices on 'pop' as divide both P and the device count; the rest on 'data'
        mp = max(d for d in range(1, n + 1) if n % d == 0 and pop % d == 0)
    data = n // mp
    while data > 1 and options.data.batch_size % data:
        data -= 1
    mesh = T.make_mesh(mp, data)
    dist.check_mesh_covers_processes(mesh)
    return mesh


def _accumulate(sums, count, metrics, options, step, emit):
    m = dist.to_host(metrics)
    if not bool(np.all(m["finite"])):
        bad = np.flatnonzero(~np.asarray(m["finite"])).tolist()
        log.warning("iteration %d: non-finite loss for member(s) %s; update skipped", step, bad)
    run = np.asarray(m.get("nonfinite_run", 0))
    vals = {"loss": np.asarray(m["loss"]), "local": np.asarray(m["local"]), "global": np.asarray(m["global"])}
    if "kd" in m:  # distillation terms (the family's kd_terms) after weights
        vals["kd"] = np.asarray(m["kd"])
    if "clip_scale" in m:  # optimiser steps whose gradients were clipped (clip_grad), and their norms
        opt = np.asarray(m["optimizer_step"])
        vals["clipped"] = (opt & (np.asarray(m["clip_scale"]) < 1)).astype(np.float32)
        vals["opt_steps"] = opt.astype(np.float32)
        vals["grad_norm"] = np.where(opt, np.asarray(m["grad_norm"]), 0.0).astype(np.float32)
    finite = np.asarray(m["finite"])
    if sums is None:
        sums = {k: np.zeros_like(v) for k, v in vals.items()}
        count = np.zeros_like(finite, np.int64)
    for k, v in vals.items():
        w = finite.reshape(finite.shape + (1,) * (v.ndim - 1))
        sums[k] = sums.get(k, np.zeros_like(v)) + np.where(w, v, 0)  # (a key a resumed epoch lacks starts at 0)
    count = count + finite
    emit({"event": "step", "step": step, "loss": vals["loss"], "lr": np.asarray(m["lr"]), "finite": finite})
    if np.any(run >= options.optim.max_nonfinite):
        raise TrainingError(f"iteration {step}: {options.optim.max_nonfinite} non-finite losses in a row; stopped. "
                            f"The last checkpoint in {options.out} is intact (lower lr0, check the data).")
    return sums, count


def _evaluate(graphdef, det, state, hyp_arr, val_ds, options, gain_rule):
    return validate_population(graphdef, det.spec, state.ema_params, state.ema_stats, hyp_arr, val_ds,
                               img_size=options.data.img_size, gain_rule=gain_rule,
                               batch_size=options.eval.batch_size, conf_thres=options.eval.conf_thres,
                               iou_thres=options.eval.iou_thres, max_boxes=options.data.max_boxes)


METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")  # the COCO stats a record keeps


def _record(epoch, step, elapsed, sums, count, m, res, pop, lr, timing, *, terms, levels,
            kd_terms=()) -> EpochRecord:
    """Member m's record of this epoch: its training sums over `count` finite iterations, and
    `res`, its validation (None when the epoch was not evaluated)."""
    n = max(int(count[m]), 1)
    train = Losses(terms, levels, sums["local"][m] / n, sums["global"][m] / n, float(sums["loss"][m] / n))
    extra = {}
    if "clipped" in sums:  # the share of this epoch's iterations that made a clipped optimiser step
        extra["train/clipped"] = float(sums["clipped"][m] / n)
    if "grad_norm" in sums:  # the mean global norm of the summed gradients at this epoch's optimiser steps
        steps = float(sums["opt_steps"][m])
        extra["train/grad_norm"] = float(sums["grad_norm"][m] / steps) if steps else float("nan")
    if "kd" in sums:
        kd = sums["kd"][m] / n
        extra.update({f"train/kd_{t}": float(kd[i]) for i, t in enumerate(kd_terms)})
    val, metrics, fitness = None, {}, float("nan")
    if res:
        vl = res["loss"]["local"]
        val = Losses(terms, levels, vl, np.sum(vl, axis=0), float(np.sum(vl)))
        metrics = {k: float(res["coco"].get(k, float("nan"))) for k in METRICS}
        voc = res["voc"] or {}
        metrics["VOC_AP50_all"] = float(voc.get("mAP50", float("nan")))
        metrics["VOC_AP50_11"] = float(voc.get("mAP50_11pt", float("nan")))
        fitness = float(res["fitness"])
    return EpochRecord(epoch=epoch, iterations=step, time_s=round(elapsed, 2), lr=lr, member=m if pop > 1 else None,
                       train=train, val=val, metrics=metrics, fitness=fitness, train_extra=extra,
                       timing={k: round(v, 3) for k, v in timing.items()})


def _write_csv(path: Path, rows: list[dict]) -> None:
    """Rewrite the whole file through a temporary one: a kill never leaves half a row."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0].keys()))
    w.writeheader()
    w.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _read_history(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with path.open() as f:
        rows = list(csv.DictReader(f))
    out = []
    for r in rows:
        out.append({k: (int(v) if k in ("epoch", "iterations", "member") else float(v)) for k, v in r.items()})
    return out


def _save_detector(det, path: Path) -> None:
    """`det` saved at `path` atomically. Every process calls it (Orbax's save is collective);
    the files are moved by the primary alone."""
    tmp = path.with_name(path.name + ".tmp")
    primary = dist.is_primary()
    if primary:
        shutil.rmtree(tmp, ignore_errors=True)
    det.save(tmp)
    if primary:
        shutil.rmtree(path, ignore_errors=True)
        os.replace(tmp, path)


def _save_weights(det, folder: Path, improved: bool) -> None:
    """weights/last, and weights/best as a copy of it when the epoch improved the fitness."""
    _save_detector(det, folder / "last")
    if improved and dist.is_primary():
        tmp = folder / "best.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.copytree(folder / "last", tmp)
        shutil.rmtree(folder / "best", ignore_errors=True)
        os.replace(tmp, folder / "best")


class _SettledHeap:
    """Keeps Python's cyclic garbage collector off the objects that live for the whole run.

    After the first epoch (the model, the compiled programs, the data and the run's own state all
    exist by then) one collection clears what that epoch left and `gc.freeze` moves the survivors
    out of the collector's view: full collections, which otherwise traverse them every other epoch
    or so (0.3 s each for a small model in a 2-core run: 4 % of its epoch), then look only at the
    objects made since. `release` hands them back when the run ends. A process that had already
    frozen objects keeps its own arrangement."""

    def __init__(self):
        self._frozen = False

    def settle(self) -> None:
        if not self._frozen and gc.isenabled() and gc.get_freeze_count() == 0:
            gc.collect()
            gc.freeze()
            self._frozen = True

    def release(self) -> None:
        if self._frozen:
            gc.unfreeze()
            self._frozen = False


class _Background:
    """One writer thread, so that an epoch's weights are written while the next epoch trains.
    Jobs run in order, one at a time; an error in one is raised by the next submit or wait.

    With several processes the jobs run at once, on the calling thread: Orbax's saves take part
    in collectives of their own, and on a writer thread they interleaved with the training
    step's in a different order on each process (a run hung under load)."""

    def __init__(self):
        from concurrent.futures import ThreadPoolExecutor

        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="jaxyolo-weights")
        self._pending = []

    def submit(self, fn, *args) -> None:
        if dist.multi_process():
            fn(*args)
            return
        for f in self._pending:
            if f.done():
                f.result()  # a failed write stops the run here
        self._pending = [f for f in self._pending if not f.done()]
        self._pending.append(self._pool.submit(fn, *args))

    def wait(self) -> None:
        pending, self._pending = self._pending, []
        for f in pending:
            f.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


def _rewound(options: TrainOptions, template, meta: dict, writer) -> T.TrainState:
    """The population's state from the snapshot `options.checkpoint.rewind`, with this run's length. A snapshot
    of a run with extras does not fit the template (which has none) and is refused, naming them;
    the run's `StepHooks.init` sets its own."""
    folder = Path(options.checkpoint.rewind)
    store = _StateStore(folder, writer)
    if not folder.is_dir() or not store.exists():
        raise ConfigError(f"rewind {folder}: no snapshot there (a snapshots/iter<k> folder of an earlier run)")

    def check(saved: dict) -> None:
        if saved.get("format") != STATE_FORMAT:
            raise ConfigError(f"rewind {folder}: the snapshot has format {saved.get('format')!r}, this jaxyolo "
                              f"reads {STATE_FORMAT!r}")
        for key in ("batches_per_epoch", "population"):
            if saved.get(key) != meta[key]:
                raise ConfigError(f"rewind {folder}: the snapshot's run has {key}={saved.get(key)}, this one "
                                  f"{meta[key]} (same data, batch size and population needed)")

    try:
        state, saved = store.restore(template, check=check)
    except ConfigError as e:
        raise ConfigError(str(e).replace("resume:", f"rewind {folder}:")) from None
    log.info("rewound to iteration %d of %s", int(saved["step"]), folder)
    return state.replace(run=template.run)


def _check_resumable(saved: dict, meta: dict) -> None:
    if saved.get("format") != STATE_FORMAT:
        raise ConfigError(f"resume: the saved training state has format {saved.get('format')!r}, this jaxyolo "
                          f"reads {STATE_FORMAT!r} (written by another version): start the run in a new "
                          "output directory")
    for key in ("batches_per_epoch", "population"):
        if saved.get(key) != meta[key]:
            raise ConfigError(f"resume: the saved run has {key}={saved.get(key)}, this one {meta[key]} "
                              "(same data, batch size and population needed)")
    # a key the saved run did not know yet (a hyp or an option added since) reads as its default
    try:
        saved_hyps = [H.load_hyp(h, num_levels=len(h["balance"])) for h in saved.get("hyps") or []]
    except (ConfigError, KeyError, TypeError):
        saved_hyps = saved.get("hyps")
    if json.loads(json.dumps(saved_hyps)) != json.loads(json.dumps(meta["hyps"])):
        raise ConfigError("resume: the hyper-parameters differ from the saved run's (see its hyp.yaml)")
    a = _without_default_model_options({**flatten(TrainOptions().to_dict()), **_saved_options(saved["options"])})
    b = _without_default_model_options(flatten(meta["options"]))
    # a file setting names the same file however it was typed (relative to another folder, absolute)
    a_paths, b_paths = from_flat_names(saved.get("paths") or {}), meta.get("paths") or {}
    same = lambda k: (a_paths[k] == b_paths[k]) if k in a_paths and k in b_paths else a.get(k) == b.get(k)  # noqa: E731
    diff = [k for k in sorted(set(a) | set(b)) if k not in REPORTING and not same(k)]
    if diff:
        shown = "; ".join(f"{k}: saved {a.get(k)!r}, given {b.get(k)!r}" for k in diff)
        raise ConfigError(f"resume: options differ from the saved run ({shown})")


PATH_OPTIONS = ("data.source", "hyp", "model.weights", "distill.teacher", "checkpoint.rewind")


def _saved_options(saved: dict) -> dict:
    """A saved run's settings by dotted name, whether saved nested or under the flat names of
    runs written before the settings were grouped."""
    if isinstance(saved.get("model"), dict):
        return flatten(saved)
    return flatten(TrainOptions().updated(from_flat_names(saved)).to_dict())


def _without_default_model_options(flat: dict) -> dict:
    """`flat` less the model options that equal their family's defaults (set or not, the same model)."""
    from jaxyolo import families

    try:
        family = families.of_model(flat["model.name"])
    except JaxyoloError:  # a table that is gone: compare as written
        return flat
    defaults = {f"model.options.{f.name}": f.default for f in dataclasses.fields(family.options_type)}
    return {k: v for k, v in flat.items() if k not in defaults or v != defaults[k]}


def _resolved_paths(options: TrainOptions) -> dict:
    """{setting: absolute real path} for the file settings that name an existing file or folder."""
    out = {}
    for k in PATH_OPTIONS:
        v = options.get(k)
        if isinstance(v, (str, os.PathLike)) and os.path.exists(v):
            out[k] = os.path.realpath(v)
    return out


def _jsonable(d: dict) -> dict:
    return json.loads(json.dumps(d, default=str))


class _StateStore:
    """The training state as Orbax checkpoints (the last `KEEP`), each with its JSON description.

    The state's leaves (about 1,200 for a small model: params, stats, momentum, summed gradients,
    EMA) are packed into one flat vector per dtype before the write, in the state's flatten order:
    Orbax's cost is per array, and one array per leaf made every epoch-end save cost about a second
    of the writer thread's CPU, taken from training on a 2-core machine (measured 1.5 -> 2.6 s per
    16-iteration epoch of yolov4p at 96 px). `restore` unpacks against the template and names a
    layout that does not match.

    Saves are asynchronous: the state is copied to host memory first (the step donates its
    buffers), then written by the run's writer thread (`_Background`, which also writes the
    weights: Orbax saves must not overlap) while training goes on. Orbax commits a step only once
    it is complete, so a kill mid-write leaves the previous state as the latest.

    Each description holds the CRC-32 of every packed vector. `restore` takes the newest state that
    reads back whole and matches its checksums; a damaged one is moved aside to `damaged-<step>`
    (kept for inspection, out of Orbax's way) with a warning naming it and the iteration resumed
    from. With none intact it raises CheckpointError naming the folder."""

    KEEP = 2

    def __init__(self, path: Path, writer: "_Background"):
        import orbax.checkpoint as ocp

        self.path = path.absolute()
        self._ocp = ocp
        self._mgr = None
        self._writer = writer

    def _manager(self):
        if self._mgr is None:
            ocp = self._ocp
            self._mgr = ocp.CheckpointManager(self.path, options=ocp.CheckpointManagerOptions(
                max_to_keep=self.KEEP, enable_async_checkpointing=False), item_names=("state", "meta"))
        return self._mgr

    def exists(self) -> bool:
        return self.path.exists() and bool(self._steps())

    def _steps(self) -> list[int]:
        try:
            return sorted(self._manager().all_steps(), reverse=True)
        except Exception as e:  # noqa: BLE001 - Orbax's own error types for a folder it cannot list
            raise CheckpointError(f"{self.path}: the training states cannot be listed ({reason(e)})") from None

    def save(self, state, meta: dict) -> None:
        pure = _to_pure(state)
        # packed on the device into new buffers, which the next step's donation cannot touch; the
        # copy to the host happens on the writer thread (on the main thread it took 130-160 ms of
        # each yolov4n epoch, most of it per-leaf transfers). With several processes the packed
        # vectors are gathered here, in step with the others (a collective); every process then
        # takes part in Orbax's save of them, which the primary writes
        packed = _pack(pure)
        if dist.multi_process():
            packed = dist.to_host(packed)
        self._writer.submit(self._write, packed, _jsonable({**meta, "layout": _pack_layout(pure)}))

    def _write(self, packed, meta: dict) -> None:
        ocp = self._ocp
        packed = jax.device_get(packed)
        meta = {**meta, "crc32": {k: crc32(v) for k, v in packed.items()}}  # on the writer thread, off the step's
        self._manager().save(int(meta["step"]), args=ocp.args.Composite(
            state=ocp.args.StandardSave(packed), meta=ocp.args.JsonSave(meta)), force=True)

    def restore(self, template, check):
        """(state like `template`, saved meta) of the newest intact step; `check(saved meta)` runs
        first (it refuses a run saved with other options, naming them)."""
        pure = _to_pure(template)
        want = json.loads(json.dumps(_pack_layout(pure)))
        damaged = []
        for step in self._steps():
            try:
                meta = self._read(step, "meta", self._ocp.args.JsonRestore())
                if not isinstance(meta, dict) or "layout" not in meta:
                    raise _Damaged("its description is incomplete")
            except _Damaged as e:
                damaged.append((step, str(e)))
                continue
            check(meta)
            diff = _layout_difference(meta["layout"], want)
            if diff:
                raise ConfigError(f"resume: the training state in {self.path} does not fit this run's model "
                                  f"({diff}); start in a new output directory")
            try:
                packed = self._read(step, "state", self._ocp.args.StandardRestore(_packed_abstract(want)))
                sums = meta.get("crc32")
                if sums is not None and {k: crc32(v) for k, v in packed.items()} != sums:
                    raise _Damaged("its arrays differ from the checksums saved with them")
            except _Damaged as e:
                damaged.append((step, str(e)))
                continue
            if damaged:
                self._set_aside(damaged, step)
            leaves = _unpack(packed, want)
            return _from_pure(jax.tree.unflatten(jax.tree.structure(pure), leaves), template), meta
        shown = "; ".join(f"step {s}: {r}" for s, r in damaged)
        raise CheckpointError(f"{self.path}: no intact training state to resume from ({shown}); start in a new "
                              "output directory, or from weights/last with --weights")

    def _read(self, step: int, item: str, args):
        try:
            with quiet_logger("asyncio"):
                return self._manager().restore(step, args=self._ocp.args.Composite(**{item: args}))[item]
        except Exception as e:  # Orbax, TensorStore and json each raise their own types for a damaged file
            raise _Damaged(f"its {item} cannot be read ({reason(e)})") from None

    def _set_aside(self, damaged: list, resumed: int) -> None:
        for step, why in damaged:
            aside = self.path / f"damaged-{step}"
            shutil.rmtree(aside, ignore_errors=True)
            os.replace(self.path / str(step), aside)
            log.warning("the training state of iteration %d in %s is damaged (%s): moved to %s; resuming from "
                        "iteration %d, the newest intact one", step, self.path, why, aside, resumed)
        self._mgr = None  # the manager lists its steps once

    def wait(self):
        self._writer.wait()


class _Damaged(Exception):
    """A saved training state that does not read back whole (`_StateStore.restore` tries the one
    before it)."""


def _path_keys(path) -> list:
    return [getattr(k, "key", getattr(k, "idx", getattr(k, "name", None))) for k in path]


def _pack_layout(tree) -> list:
    """[[path keys, shape, dtype name], ...] of every leaf of `tree` in flatten order: enough to
    unpack a packed state without a template (`read_state`) and to name what differs on resume."""
    return [[_path_keys(p), list(np.shape(x)), np.dtype(x.dtype).name] for p, x in jax.tree.leaves_with_path(tree)]


def _pack(tree) -> dict:
    """Tree -> {dtype name: one flat vector of every leaf of that dtype, in order}, computed where
    the leaves are (one jitted program on the device)."""
    return _pack_leaves(jax.tree.leaves(tree))


@jax.jit
def _pack_leaves(leaves: list) -> dict:
    groups: dict[str, list] = {}
    for x in leaves:
        groups.setdefault(np.dtype(x.dtype).name, []).append(jnp.ravel(x))
    return {k: jnp.concatenate(v) for k, v in groups.items()}


def _unpack(packed: dict, layout: list) -> list:
    """The leaves `_pack` packed, in order, as numpy arrays shaped by `layout`."""
    offsets = dict.fromkeys(packed, 0)
    out = []
    for _, shape, dtype in layout:
        n = int(np.prod(shape, dtype=np.int64))
        out.append(np.asarray(packed[dtype][offsets[dtype]:offsets[dtype] + n]).reshape(shape))
        offsets[dtype] += n
    return out


def _layout_difference(saved: list, want: list) -> str:
    for (sp, ss, sd), (wp, ws, wd) in zip(saved, want):
        if (sp, ss, sd) != (wp, ws, wd):
            return f"{'/'.join(map(str, wp))}: saved {'/'.join(map(str, sp))} {sd}{ss}, this run {wd}{ws}"
    if len(saved) != len(want):
        rest, where = (saved[len(want):], "the saved state") if len(saved) > len(want) else (want[len(saved):],
                                                                                            "this run")
        return (f"{len(saved)} arrays saved, this run has {len(want)}; "
                f"{', '.join('/'.join(map(str, p)) for p, _, _ in rest[:3])} only in {where}")
    return ""


def read_state(folder: str | Path, step: int | None = None) -> dict:
    """A saved training state (`out/state`) as nested dicts of numpy arrays, without building the
    model: the latest step, or `step`."""
    import orbax.checkpoint as ocp

    folder = Path(folder).absolute()
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such training-state folder")
    try:
        with quiet_logger("asyncio"), ocp.CheckpointManager(folder, item_names=("state", "meta")) as mgr:
            step = mgr.latest_step() if step is None else step
            if step is None:
                raise CheckpointError(f"{folder}: holds no training state")
            meta = mgr.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
            layout = meta["layout"]
            abstract = _packed_abstract(layout)
            packed = mgr.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract)))["state"]
    except CheckpointError:
        raise
    except Exception as e:  # Orbax, TensorStore and json each raise their own types for a damaged file
        raise CheckpointError(f"{folder}: the training state of step {step} cannot be read ({reason(e)})") from None
    out: dict = {}
    for (path, _, _), leaf in zip(layout, _unpack(packed, layout)):
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    return out


def _packed_abstract(layout: list) -> dict:
    sizes: dict[str, int] = {}
    for _, shape, dtype in layout:
        sizes[dtype] = sizes.get(dtype, 0) + int(np.prod(shape, dtype=np.int64))
    return {k: jax.ShapeDtypeStruct((n,), np.dtype(k)) for k, n in sizes.items()}


# the TrainState fields that are nnx.State trees (like the params or the stats)
_STATE_TREES = ("params", "stats", "momentum", "grads", "ema_params", "ema_stats")


def _to_pure(state: T.TrainState) -> dict:
    d = {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}
    for k in _STATE_TREES:
        d[k] = nnx.to_pure_dict(d[k])
    for k in ("aux", "run", "extras"):  # optional parts (adapters, the run length, methods' extras): absent when None
        if d[k] is None:
            del d[k]
    return d


def _from_pure(d: dict, template: T.TrainState) -> T.TrainState:
    trees = {}
    for k in _STATE_TREES:
        tree = jax.tree.map(lambda x: x, getattr(template, k))
        nnx.replace_by_pure_dict(tree, d[k])
        trees[k] = tree
    optional = {k: None if getattr(template, k) is None else jax.tree.map(jnp.asarray, d[k])
                for k in ("aux", "run", "extras")}
    rest = {k: jnp.asarray(v) for k, v in d.items() if k not in _STATE_TREES + ("aux", "run", "extras")}
    return template.replace(**rest, **trees, **optional)


class _NullWriter:
    def scalars(self, values, step, prefix=""):
        pass

    def close(self):
        pass


def _tensorboard(out: Path):
    try:
        from jaxyolo.tboard import SummaryWriter
    except ImportError:
        return _NullWriter()

    writer = SummaryWriter(out / "tensorboard")

    class _Prefixed:
        def scalars(self, values, step, prefix=""):
            writer.scalars({prefix + k: v for k, v in values.items()}, step)

        def close(self):
            writer.close()

    return _Prefixed()


def _eval_plots(out: Path, res: dict, val_ds, n_images: int = 8) -> None:
    """PR curves and a few validation images with the (first) member's predictions."""
    try:
        from jaxyolo import plots

        order = [res["coco"]["category_ids"].index(int(c)) for c in val_ds.category_ids]
        plots.plot_pr_curves(res["coco"]["precision"][:, :, order], val_ds.names, out / "PR_curve.png")
        drawn = []
        for i in range(min(n_images, len(val_ds))):
            boxes, scores, classes = res["predictions"][i]
            keep = scores >= 0.25
            gt_boxes, _ = val_ds.labels(i)
            drawn.append(plots.draw_detections(val_ds[i].image, boxes[keep], classes[keep], scores[keep],
                                               val_ds.names, gt_boxes=gt_boxes))
        plots.save_grid(drawn, out / "val_predictions.jpg", cols=4)
    except Exception as e:  # a plot must never lose a finished run
        log.warning("could not draw evaluation plots in %s: %s", out, e)


def _plots(out: Path) -> None:
    try:
        from jaxyolo.plots import plot_results
    except ImportError:
        return
    try:
        plot_results(out / "results.csv")
    except Exception as e:  # a plot must never lose a finished run
        log.warning("could not plot %s: %s", out / "results.csv", e)
