"""Seconds per training step of any model (any family) on this machine: the real population step
(P = 1, no augmentation) at a batch and image size, median of 7 calls after two warm-up calls.

    python benchmarks/step_time.py MODEL [MODEL ...] [--batch 32] [--img 128] [--classes 5] \
        [--option dtype=bfloat16 --option act=silu ...]

MODEL: a model name or a path to a table; `--option` sets a model option of every MODEL. Used for
the gfl-n variants and the mixed-precision figures of docs/gfl.md.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time


def step_seconds(model: str, *, batch: int, img: int, classes: int, options: dict | None = None
                 ) -> tuple[float, int, float]:
    import jaxyolo
    from jaxyolo import hyp as H
    from jaxyolo import train_step as T
    from jaxyolo.bench.suites import _StepRunner, synthetic_batch

    base = {"head": "detect"} if jaxyolo.families.of_model(model).name == "yolov4" else {}
    det = jaxyolo.create_model(model, num_classes=classes, **{**base, **(options or {})})
    cfg = T.TrainConfig(epochs=300, batches_per_epoch=100, batch_size=batch, img_size=img, augment=False)
    run = _StepRunner(det, cfg, synthetic_batch(batch, img), hyps=[H.load_hyp(family=det.family)])
    run()
    run()
    times = []
    for _ in range(7):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
    return statistics.median(times), det.num_params(), det.gflops(img)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("models", nargs="+")
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--img", type=int, default=128)
    p.add_argument("--classes", type=int, default=5)
    p.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="a model option")
    a = p.parse_args()
    import yaml

    options = {k: yaml.safe_load(v) for k, v in (o.split("=", 1) for o in a.option)}
    print(f"{platform.processor() or platform.machine()}, batch {a.batch}, {a.img} px, {a.classes} classes"
          + (f", options {options}" if options else ""))
    for m in a.models:
        s, params, gflops = step_seconds(m, batch=a.batch, img=a.img, classes=a.classes, options=options)
        print(f"{m}: {params:,} parameters, {gflops:.3f} GFLOPs, {s:.3f} s/step")


if __name__ == "__main__":
    main()
