"""Seconds per train step (after compilation), compile time and peak host memory.

    python benchmarks/train_step.py --model yolov4s --batch 8 --img 320 [--steps 10] [--augment]

The step is the real one (`jaxyolo.train.population_step` with P=1 on a 1×1 mesh): forward,
loss, backward, optimiser, EMA, plus on-device augmentation with --augment.
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import jax
import numpy as np
from population import synthetic_batch  # benchmarks/ is on sys.path when run as a script

import jaxyolo
from jaxyolo import hyp as H
from jaxyolo import train as T


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="yolov4s")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=320)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--augment", action="store_true")
    args = ap.parse_args()
    det = jaxyolo.create_model(args.model, num_classes=80, kst=3)
    cfg = T.TrainConfig(epochs=300, batches_per_epoch=100, batch_size=args.batch, img_size=args.img,
                        augment=args.augment)
    from jaxyolo.trainer import _augment

    step = T.population_step(T.make_train_step(det, cfg, augment_fn=_augment), T.make_mesh(1, 1))
    batch = synthetic_batch(args.batch, args.img, args.augment)
    state = T.replicate(T.init_state(det), 1)
    hyp = H.stack([H.load_hyp()])
    keys = jax.random.split(jax.random.key(0), 1)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, hyp, keys).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(args.steps + 1):
        t = time.perf_counter()
        state, metrics = compiled(state, batch, hyp, jax.random.split(jax.random.key(i), 1))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    out = {"model": args.model, "batch": args.batch, "img": args.img, "augment": args.augment,
           "compile_s": round(compile_s, 2), "step_s_median": round(float(np.median(times[1:])), 4),
           "step_s_min": round(float(np.min(times[1:])), 4), "steps": args.steps,
           "peak_rss_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
           "loss": float(metrics["loss"][0]), "device": jax.devices()[0].device_kind, "jax": jax.__version__}
    print(json.dumps(out))


if __name__ == "__main__":
    main()
