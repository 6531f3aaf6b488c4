"""`jaxyolo train`: train a detector (or a population of hyp sets) on a dataset.

    jaxyolo train --model yolov4s --data DATA --hyp HYP --img 640 --batch 64 --epochs 300 \
        --out runs/train/NAME [--resume] [--weights W] [--teacher T [--kd-features]]

DATA: a data YAML, a COCO json, `tfds:NAME` or `synthetic[:key=value,...]`. HYP: a bundled name
(`default`; `reference-s`, `reference-csp`: the reference's recipes exactly) or a YAML file with the
reference key names. The hyp file's run-level keys (gain_rule, min_warmup_iters, close_mosaic,
autoanchor) can be overridden by the flags of the same names. `--config FILE` reads the whole
settings tree (`jaxyolo.train_options`) from YAML; the flags given and `--set KEY=VALUE` go on top. `--teacher T` distils a
trained jaxyolo checkpoint (same anchors, strides and classes) into the student with the hyp's
kd_* weights (`jaxyolo.distill`); the saved weights are the student's.
"""

from __future__ import annotations

import argparse
import logging
import math

from tqdm import tqdm


# flag -> the setting it sets (a flag that is not given leaves the setting as the config has it)
FLAG_SETTINGS = {
    "model": "model.name", "weights": "model.weights", "head": "model.options.head", "kst": "model.options.kst",
    "act": "model.options.act", "data": "data.source", "img": "data.img_size", "batch": "data.batch_size",
    "max_boxes": "data.max_boxes", "subset": "data.subset", "workers": "data.workers", "cache_mb": "data.cache_mb",
    "epochs": "optim.epochs", "nominal_batch": "optim.nominal_batch", "schedule": "optim.schedule",
    "min_warmup_iters": "recipe.min_warmup_iters", "gain_rule": "recipe.gain_rule",
    "close_mosaic": "recipe.close_mosaic", "autoanchor": "recipe.autoanchor", "eval_every": "eval.every",
    "save_every": "checkpoint.every", "snapshot": "checkpoint.snapshots", "rewind": "checkpoint.rewind",
    "teacher": "distill.teacher", "kd_features": "distill.features", "hyp": "hyp", "out": "out", "seed": "seed",
    "sparsity": "model.sparsity",
}


def add_parser(subparsers):
    # no defaults: a flag that is not given leaves the setting to --config (else TrainOptions' default)
    p = subparsers.add_parser("train", help="train a detector on a dataset", argument_default=argparse.SUPPRESS)
    p.add_argument("--config", help="a YAML file of training settings (the TrainOptions tree: model, data, optim, "
                   "recipe, eval, checkpoint, distill, hyp, out, seed, ...); flags and --set go on top")
    p.add_argument("--set", dest="overrides", action="append", metavar="KEY=VALUE",
                   help="one setting by dotted name, the value read as YAML (optim.schedule=linear, "
                        "model.options.kst_draw=image); repeatable")
    p.add_argument("--model", help="built-in model name or a YAML table (default yolov4s)")
    p.add_argument("--data", help="data YAML, COCO json, tfds:NAME or synthetic[:k=v,...] (default synthetic)")
    p.add_argument("--hyp", help="bundled hyp name (default, gfl, reference-s, reference-csp) or a hyp YAML "
                                 "(reference key names); default: the model family's (YOLOv4 default, gfl gfl)")
    p.add_argument("--img", type=int, help="square training and validation size (default 640)")
    p.add_argument("--batch", type=int, help="images per iteration over all devices (default 64)")
    p.add_argument("--epochs", type=int, help="default 300")
    p.add_argument("--out", help="default runs/train/exp")
    p.add_argument("--resume", action="store_true", default=False,
                   help="continue the run in --out exactly where it stopped")
    p.add_argument("--weights", help="initial weights: a jaxyolo checkpoint folder, .pt or .npz")
    p.add_argument("--seed", type=int)
    p.add_argument("--head", choices=("implicit", "detect"), help="YOLOv4 head (default implicit)")
    p.add_argument("--kst", type=int, help="KST candidates of the implicit head (1: IDetect; default 3)")
    p.add_argument("--act", choices=("silu", "mish", "leaky"), help="YOLOv4 activation (default silu)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 compute, float32 master weights")
    p.add_argument("--workers", type=int, help="data loader processes (0, the default: threads in this process)")
    p.add_argument("--cache-mb", type=int,
                   help="MiB of resized training images kept in memory across epochs (0: read every epoch; "
                        "default 1024)")
    p.add_argument("--min-warmup-iters", type=int,
                   help="floor on warm-up iterations (default: the hyp file's, else 100; reference-s: 1000)")
    p.add_argument("--gain-rule", choices=("per-class", "reference", "yolov5"),
                   help="loss gains against classes and image size (default: the hyp file's, else per-class)")
    p.add_argument("--close-mosaic", type=int, help="train the last N epochs without mosaic")
    p.add_argument("--autoanchor", action=argparse.BooleanOptionalAction,
                   help="refit the anchors when they cover the training boxes badly (best possible recall < 0.98)")
    p.add_argument("--schedule", choices=("cosine", "linear"), help="default cosine")
    p.add_argument("--nominal-batch", type=int, help="gradients are accumulated up to this batch (default 64)")
    p.add_argument("--eval-every", type=int, help="validate every N epochs (and after the last; default 1)")
    p.add_argument("--save-every", type=int, help="save the training state every N iterations too")
    p.add_argument("--max-boxes", type=int, help="default 100")
    p.add_argument("--subset", type=int, help="train on the first N training images only")
    p.add_argument("--teacher", help="distil from this jaxyolo checkpoint folder (weights from the hyp's kd_* keys)")
    p.add_argument("--kd-features", action="store_true",
                   help="with --teacher: feature imitation at P3-P5 through 1x1 adapters (hyp kd_feat)")
    p.add_argument("--sparsity", metavar="N:M",
                   help="fine-tune with fixed N:M magnitude masks (e.g. 2:4) computed from the starting weights "
                        "(give --weights of a dense run); sparsity.json reports the zeros and AP before and after")
    p.add_argument("--snapshot", type=int, action="append", metavar="K",
                   help="keep the training state of iteration K as snapshots/iterK (and weights/iterK); repeatable")
    p.add_argument("--rewind", metavar="SNAPSHOT",
                   help="start from a snapshot folder (OUT/snapshots/iterK of an earlier run) at its iteration K")
    p.set_defaults(func=run)
    return p


def options_from_args(args):
    """The run's settings: --config (else the defaults), then the flags given, then --set."""
    from jaxyolo.errors import ConfigError
    from jaxyolo.files import read_document
    from jaxyolo.train_options import TrainOptions, parse_setting

    given = vars(args)
    options = TrainOptions()
    if given.get("config"):
        try:
            options = TrainOptions.from_dict(read_document(given["config"], what="training config") or {})
        except ConfigError as e:
            raise ConfigError(f"training config {given['config']}: {e}") from None
    changes = {FLAG_SETTINGS[k]: v for k, v in given.items() if k in FLAG_SETTINGS}
    if given.get("bf16"):
        changes["model.options.dtype"] = "bfloat16"
    changes.update(parse_setting(text) for text in given.get("overrides") or ())
    return options.updated(changes)


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
