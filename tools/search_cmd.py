"""`jaxyolo search`: joint hyper-parameter search (evolution of a vmapped population, then a grid).

    jaxyolo search --model M --data DATA --space SPACE --population 16 --generations 10 \
        --trial-epochs 3 --grid-dims 4 --out runs/search/NAME [--resume]
"""

from __future__ import annotations

import logging
import time

from jaxyolo.tools.train_cmd import ProgressPrinter


def add_parser(subparsers):
    p = subparsers.add_parser("search", help="joint hyper-parameter search: evolution, then a trend-guided grid")
    p.add_argument("--model", default="yolov4s")
    p.add_argument("--data", default="synthetic", help="data YAML, COCO json, tfds:NAME or synthetic[:k=v,...]")
    p.add_argument("--space", default="default", help="bundled search space name or a YAML file")
    p.add_argument("--hyp", default=None, help="base hyp for keys outside the space (default: the model family's default file)")
    p.add_argument("--weights", help="start every trial from these weights (checkpoint folder, .pt or .npz)")
    p.add_argument("--teacher", help="distil every trial from this checkpoint folder (put kd_* keys in the space)")
    p.add_argument("--kd-features", action="store_true", help="with --teacher: feature imitation at P3-P5")
    p.add_argument("--population", type=int, default=16, help="hyp sets trained together per generation")
    p.add_argument("--generations", type=int, default=10)
    p.add_argument("--trial-epochs", type=int, default=3, help="epochs per trial")
    p.add_argument("--subset", type=int, help="train each trial on the first N training images")
    p.add_argument("--grid-dims", type=int, default=4, help="hyper-parameters the final grid follows (0: none)")
    p.add_argument("--grid-step", type=float, default=0.1, help="grid spacing, fraction of each range")
    p.add_argument("--final-epochs", type=int, default=0, help="retrain the winner this many epochs (0: skip)")
    p.add_argument("--img", type=int, default=640)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--kst", type=int, help="KST candidates of a YOLOv4 implicit head (default 3)")
    p.add_argument("--parent", choices=("single", "weighted"), default="single")
    p.add_argument("--elite", type=int, default=0, help="children that are mutations of the best trial")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--nominal-batch", type=int, default=64)
    p.add_argument("--min-warmup-iters", type=int, default=0,
                   help="floor on warm-up iterations per trial (reference training: 1000)")
    p.add_argument("--out", default="runs/search/exp")
    p.add_argument("--resume", action="store_true", help="continue the search in --out")
    p.add_argument("--no-estimate", action="store_true", help="skip the time estimate before starting")
    p.set_defaults(func=run)
    return p


def options_from_args(args):
    from jaxyolo.search.runner import SearchOptions, trial_defaults

    train = trial_defaults({
        "model.name": args.model, "model.weights": args.weights, "data.source": args.data, "hyp": args.hyp,
        "distill.teacher": args.teacher, "distill.features": args.kd_features, "data.subset": args.subset,
        "data.img_size": args.img, "data.batch_size": args.batch, "seed": args.seed, "data.workers": args.workers,
        "optim.nominal_batch": args.nominal_batch, "recipe.min_warmup_iters": args.min_warmup_iters,
        **({"model.options.kst": args.kst} if args.kst is not None else {})})
    return SearchOptions(train=train, space=args.space, population=args.population, generations=args.generations,
                         trial_epochs=args.trial_epochs, grid_dims=args.grid_dims, grid_step=args.grid_step,
                         final_epochs=args.final_epochs, parent=args.parent, elite=args.elite, seed=args.seed,
                         out=args.out)


def estimate_seconds(options) -> dict:
    """A rough total before starting: a measured jitted forward pass at the training batch, times
    ~3.5 for forward + backward + optimiser, times P, per iteration; plus validation passes."""
    import jax
    import numpy as np

    import jaxyolo
    from jaxyolo.data.sources import open_dataset

    tr = options.train
    train, val = open_dataset(tr.data.source, "train"), open_dataset(tr.data.source, "val")
    n_train = min(len(train), tr.data.subset or len(train))
    batch, img = tr.data.batch_size, tr.data.img_size
    nb = max(n_train // batch, 1)
    det = jaxyolo.create_model(tr.model.name, num_classes=train.num_classes, anchors=None, seed=0,
                               **tr.model.options)
    x = np.random.default_rng(0).uniform(0, 1, (batch, img, img, 3))
    x = jax.numpy.asarray(x, jax.numpy.float32)
    t = time.perf_counter()
    jax.block_until_ready(det(x))
    compile_fwd = time.perf_counter() - t
    t = time.perf_counter()
    jax.block_until_ready(det(x))
    fwd = time.perf_counter() - t
    per_image = fwd / batch
    populations = options.generations + (1 if options.grid_dims else 0)
    per_pop = options.trial_epochs * (nb * 3.5 * fwd * options.population
                                      + len(val) * per_image * options.population) + 4 * compile_fwd
    total = populations * per_pop + options.final_epochs * (nb * 3.5 * fwd + len(val) * per_image)
    return {"seconds": total, "per_population": per_pop, "forward_s": fwd, "iterations_per_epoch": nb,
            "populations": populations}


class SearchProgress:
    """A line per population (with the time it took and an ETA) around the trainer's progress."""

    def __init__(self, total_populations: int, echo=print):
        self.echo, self.total, self.done, self.spent, self.timed = echo, total_populations, 0, 0.0, 0
        self.train = ProgressPrinter(echo=echo)

    def __call__(self, info: dict) -> None:
        ev = info.get("event")
        if ev == "population":
            self.echo(f"--- {info['phase']} {info['generation']}: {info['size']} member(s) "
                      f"({self.done + 1}/{self.total})")
        elif ev == "done":
            self.done += 1
            self.timed += 1
            self.spent += info["seconds"]
            left = max(self.total - self.done, 0) * self.spent / self.timed
            fit = " ".join(f"{f:.4f}" for f in info["fitness"])
            self.echo(f"    fitness per member: {fit}\n    best so far {info['best']:.4f}; "
                      f"{info['seconds'] / 60:.1f} min; about {left / 60:.0f} min left")
        elif ev == "end":
            self.echo(f"search finished: best fitness {info['best']:.4f}; {info['out']}/best_hyp.yaml")
        else:
            self.train(info)


def run(args) -> int:
    from jaxyolo.search.runner import run_search, train_evaluator

    logging.getLogger("absl").setLevel(logging.WARNING)
    options = options_from_args(args)
    options.check()
    total = options.generations + (1 if options.grid_dims else 0) + (1 if options.final_epochs else 0)
    if not args.no_estimate and not args.resume:
        est = estimate_seconds(options)
        print(f"estimate: about {est['seconds'] / 60:.0f} min for {est['populations']} population(s) of "
              f"{options.population} x {options.trial_epochs} epoch(s) x {est['iterations_per_epoch']} iterations "
              f"(from a measured forward pass of {est['forward_s']:.2f} s; refined after each generation)")
    progress = SearchProgress(total)
    if args.resume:  # populations the saved log already holds count as done (for the ETA)
        import json
        from pathlib import Path

        log = Path(options.out) / "results.json"
        if log.exists():
            trials = json.loads(log.read_text()).get("trials", [])
            progress.done = len({(t["phase"], t["generation"]) for t in trials})
    res = run_search(options, resume=args.resume, evaluate=train_evaluator(options, progress=progress.train),
                     progress=progress)
    b = res.best
    print(f"best: {b['phase']} {b['generation']} member {b['member']}, fitness {b['fitness']:.4f} "
          f"(AP50 {b['metrics']['AP50']:.4f}, AP {b['metrics']['AP']:.4f})")
    return 0
