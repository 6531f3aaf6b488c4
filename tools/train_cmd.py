"""`jaxyolo train`: train a detector (or a population of hyp sets) on a dataset.

    jaxyolo train --model yolov4s --data DATA --hyp HYP --img 640 --batch 64 --epochs 300 \
        --out runs/train/NAME [--resume] [--weights W] [--teacher T [--kd-features]]

DATA: a data YAML, a COCO json, `tfds:NAME` or `synthetic[:key=value,...]`. HYP: a bundled name
(`default`; `reference-s`, `reference-csp`: the reference's recipes exactly) or a YAML file with the
reference key names. The hyp file's run-level keys (gain_rule, min_warmup_iters, close_mosaic,
autoanchor) can be overridden by the flags of the same names. `--teacher T` distils a
trained jaxyolo checkpoint (same anchors, strides and classes) into the student with the hyp's
kd_* weights (`jaxyolo.distill`); the saved weights are the student's.
"""

from __future__ import annotations

import argparse
import logging
import math

from tqdm import tqdm


def add_parser(subparsers):
    p = subparsers.add_parser("train", help="train a detector on a dataset")
    p.add_argument("--model", default="yolov4s", help="built-in model name or a YAML table")
    p.add_argument("--data", default="synthetic", help="data YAML, COCO json, tfds:NAME or synthetic[:k=v,...]")
    p.add_argument("--hyp", default="default",
                   help="bundled hyp name (default, reference-s, reference-csp) or a hyp YAML (reference key names)")
    p.add_argument("--img", type=int, default=640, help="square training and validation size")
    p.add_argument("--batch", type=int, default=64, help="images per iteration over all devices")
    p.add_argument("--epochs", type=int, default=300)
    p.add_argument("--out", default="runs/train/exp")
    p.add_argument("--resume", action="store_true", help="continue the run in --out exactly where it stopped")
    p.add_argument("--weights", help="initial weights: a jaxyolo checkpoint folder, .pt or .npz")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--head", choices=("implicit", "detect"), default="implicit")
    p.add_argument("--kst", type=int, default=3, help="KST candidates of the implicit head (1: IDetect)")
    p.add_argument("--act", default="silu", choices=("silu", "mish", "leaky"))
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights")
    p.add_argument("--workers", type=int, default=0, help="data loader processes (0: threads in this process)")
    p.add_argument("--cache-mb", type=int, default=1024,
                   help="MiB of resized training images kept in memory across epochs (0: read every epoch)")
    p.add_argument("--min-warmup-iters", type=int, default=None,
                   help="floor on warm-up iterations (default: the hyp file's, else 100; reference-s: 1000)")
    p.add_argument("--gain-rule", choices=("per-class", "reference", "yolov5"), default=None,
                   help="loss gains against classes and image size (default: the hyp file's, else per-class)")
    p.add_argument("--close-mosaic", type=int, default=None, help="train the last N epochs without mosaic")
    p.add_argument("--autoanchor", action=argparse.BooleanOptionalAction, default=None,
                   help="refit the anchors when they cover the training boxes badly (best possible recall < 0.98)")
    p.add_argument("--schedule", choices=("cosine", "linear"), default="cosine")
    p.add_argument("--nominal-batch", type=int, default=64, help="gradients are accumulated up to this batch")
    p.add_argument("--eval-every", type=int, default=1, help="validate every N epochs (and after the last)")
    p.add_argument("--save-every", type=int, default=0, help="save the training state every N iterations too")
    p.add_argument("--max-boxes", type=int, default=100)
    p.add_argument("--subset", type=int, help="train on the first N training images only")
    p.add_argument("--teacher", help="distil from this jaxyolo checkpoint folder (weights from the hyp's kd_* keys)")
    p.add_argument("--kd-features", action="store_true",
                   help="with --teacher: feature imitation at P3-P5 through 1x1 adapters (hyp kd_feat)")
    p.add_argument("--snapshot", type=int, action="append", default=[], metavar="K",
                   help="keep the training state of iteration K as snapshots/iterK (and weights/iterK); repeatable")
    p.add_argument("--rewind", metavar="SNAPSHOT",
                   help="start from a snapshot folder (OUT/snapshots/iterK of an earlier run) at its iteration K")
    p.set_defaults(func=run)
    return p


def options_from_args(args):
    from jaxyolo.train_loop import TrainOptions

    return TrainOptions(model=args.model, data=args.data, hyp=args.hyp, img_size=args.img, batch_size=args.batch,
                        epochs=args.epochs, out=args.out, weights=args.weights, seed=args.seed, head=args.head,
                        kst=args.kst, act=args.act, dtype="bfloat16" if args.bf16 else None, workers=args.workers,
                        cache_mb=args.cache_mb,
                        nominal_batch=args.nominal_batch, min_warmup_iters=args.min_warmup_iters,
                        gain_rule=args.gain_rule, close_mosaic=args.close_mosaic, autoanchor=args.autoanchor,
                        schedule=args.schedule, eval_every=args.eval_every, save_every=args.save_every,
                        max_boxes=args.max_boxes, subset=args.subset, teacher=args.teacher,
                        kd_features=args.kd_features, snapshots=tuple(args.snapshot), rewind=args.rewind)


class ProgressPrinter:
    """A progress bar per epoch and one line per epoch with the losses and mAP."""

    def __init__(self, echo=print):
        self.bar = None
        self.echo = echo
        self.header_done = False

    def __call__(self, info: dict) -> None:
        ev = info["event"]
        if ev == "start":
            self.nb = info["batches_per_epoch"]
            self.total = info["iterations"]
            self.echo(f"{info['train_images']} training / {info['val_images']} validation images, "
                      f"{self.nb} iterations per epoch, population {info['population']}"
                      + (f"; resuming at iteration {info['step']}" if info["step"] else ""))
            rep = info.get("anchors")
            if rep and "bpr" in rep:
                self.echo(f"anchors: best possible recall {rep['bpr']:.4f} over {rep['boxes']} training boxes"
                          + (f"; refitted to the data: {rep['new_bpr']:.4f}" if rep.get("refitted") else "; kept"))
            elif rep:
                self.echo("anchors: the teacher's")
        elif ev == "step":
            step = info["step"]
            if self.bar is None:
                epoch = step // self.nb
                self.bar = tqdm(total=self.nb, initial=step % self.nb, desc=f"epoch {epoch}", leave=False,
                                unit="it", dynamic_ncols=True, disable=None)  # no bar in a log file
            self.bar.update(1)
            loss = info["loss"]
            self.bar.set_postfix(loss=f"{float(loss.mean()):.4f}", lr=f"{float(info['lr'].mean()):.2e}")
        elif ev == "epoch":
            if self.bar is not None:
                self.bar.close()
                self.bar = None
            for row in info["rows"]:
                self.echo(format_row(row, info["epochs"]))
        elif ev == "end":
            self.echo(f"done: {info['out']} (best fitness {', '.join(f'{b:.4f}' for b in info['best_fitness'])})")


def _f(v, spec=".4f"):
    return "-" if v is None or (isinstance(v, float) and math.isnan(v)) else format(v, spec)


def format_row(row: dict, epochs: int) -> str:
    who = f"member {row['member']} " if "member" in row else ""
    kd = sum(v for k, v in row.items() if k.startswith("train/kd_"))
    kd = f"kd {_f(kd)}  " if "train/kd_obj" in row else ""
    terms = [k for k in row if k.count("/") == 1 and k.startswith("train/") and not k.startswith("train/kd_")
             and k not in ("train/loss", "train/clipped", "train/grad_norm")]  # the family's loss terms
    detail = " ".join(f"{k[len('train/'):]} {_f(row[k])}" for k in terms)
    return (f"{who}epoch {row['epoch'] + 1}/{epochs}  train loss {_f(row['train/loss'])} ({detail})  {kd}"
            f"val loss {_f(row['val/loss'])}  mAP@0.5 {_f(row['metrics/AP50'])}  "
            f"mAP@0.5:0.95 {_f(row['metrics/AP'])}  ({_f(row.get('time/train_s'), '.1f')} s + val "
            f"{_f(row.get('time/val_s'), '.1f')} s)")


def run(args) -> int:
    from jaxyolo.train_loop import fit

    logging.getLogger("absl").setLevel(logging.WARNING)  # Orbax reports every save at INFO
    fit(options_from_args(args), resume=args.resume, progress=ProgressPrinter())
    return 0
