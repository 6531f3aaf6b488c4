"""Population scaling: one vmapped train step for P members against P x the one-member step.

    python benchmarks/population.py --model yolov4n --batch 8 --img 256 --pop 1 2 4 8 [--steps 5] [--augment]

Each P is the real `jaxyolo.train.population_step` (vmap over members, jit over a (pop, data)
mesh of the local devices), every member with its own hyper-parameters (different lr0 and, with
--augment, different augmentation strengths) on the same host batch. Prints one JSON line per P
(compile time, median step time, ratio to P x the P=1 median) and a summary line.
"""

from __future__ import annotations

import argparse
import json
import time

import jax
import numpy as np

import jaxyolo
from jaxyolo import hyp as H
from jaxyolo import train as T


def synthetic_batch(batch: int, size: int, augment: bool, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    m = 32
    boxes = np.zeros((batch, m, 4), np.float32)
    xy = rng.uniform(0, size * 0.7, (batch, m, 2))
    boxes[..., :2], boxes[..., 2:] = xy, xy + rng.uniform(8, size * 0.3, (batch, m, 2))
    out = {"image": rng.integers(0, 255, (batch, size, size, 3), np.uint8), "boxes": boxes,
           "classes": rng.integers(0, 80, (batch, m)).astype(np.int32), "mask": np.ones((batch, m), bool)}
    if augment:
        out.update({"mosaic": rng.integers(0, 255, (batch, 2 * size, 2 * size, 3), np.uint8),
                    "mosaic_boxes": boxes * 2, "mosaic_classes": out["classes"], "mosaic_mask": out["mask"]})
    return out


def member_hyps(pop: int) -> list[dict]:
    base = H.load_hyp()
    return [H.load_hyp({**base, "lr0": base["lr0"] * (1 + 0.1 * i), "hsv_v": min(0.9, base["hsv_v"] + 0.05 * i)})
            for i in range(pop)]


def time_population(det, cfg, pop: int, batch: dict, steps: int, augment_fn) -> dict:
    n = jax.device_count()
    mesh_pop = max(d for d in range(1, n + 1) if n % d == 0 and pop % d == 0)
    mesh = T.make_mesh(mesh_pop, n // mesh_pop)
    step = T.population_step(T.make_train_step(det, cfg, augment_fn=augment_fn), mesh)
    state = T.replicate(T.init_state(det), pop)
    hyp = H.stack(member_hyps(pop))
    keys = jax.random.split(jax.random.key(0), pop)
    t0 = time.perf_counter()
    compiled = step.lower(state, batch, hyp, keys).compile()
    compile_s = time.perf_counter() - t0
    times = []
    for i in range(steps + 1):  # the first call also moves the state onto the mesh
        t = time.perf_counter()
        state, metrics = compiled(state, batch, hyp, jax.random.split(jax.random.key(i + 1), pop))
        jax.block_until_ready(metrics["loss"])
        times.append(time.perf_counter() - t)
    return {"pop": pop, "compile_s": round(compile_s, 2), "step_s_median": float(np.median(times[1:])),
            "finite": bool(np.all(np.asarray(metrics["finite"])))}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="yolov4n")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--img", type=int, default=256)
    ap.add_argument("--pop", type=int, nargs="+", default=[1, 2, 4, 8])
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--augment", action="store_true")
    args = ap.parse_args()
    det = jaxyolo.create_model(args.model, num_classes=80, kst=3)
    cfg = T.TrainConfig(epochs=300, batches_per_epoch=100, batch_size=args.batch, img_size=args.img,
                        augment=args.augment)
    from jaxyolo.trainer import _augment

    batch = synthetic_batch(args.batch, args.img, args.augment)
    rows, single = [], None
    for p in sorted(set(args.pop)):
        r = time_population(det, cfg, p, batch, args.steps, _augment if args.augment else None)
        if p == 1:
            single = r["step_s_median"]
        if single:
            r["ratio_to_p_times_single"] = round(r["step_s_median"] / (p * single), 3)
        r.update({"model": args.model, "batch": args.batch, "img": args.img, "augment": args.augment,
                  "devices": jax.device_count(), "device": jax.devices()[0].device_kind, "jax": jax.__version__})
        r["step_s_median"] = round(r["step_s_median"], 4)
        print(json.dumps(r), flush=True)
        rows.append(r)
    print(json.dumps({"summary": {r["pop"]: r.get("ratio_to_p_times_single") for r in rows}}))


if __name__ == "__main__":
    main()
