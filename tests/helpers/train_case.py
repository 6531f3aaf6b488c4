"""A tiny deterministic training case shared by the train tests and their subprocesses.

Run as a script (`python -m tests.helpers.train_case OUT.npz POP DATA`) it trains the case on a
('pop', 'data') mesh and saves the final parameters, so a test can compare device layouts.
"""

from __future__ import annotations

import sys

import jax
import numpy as np

import jaxyolo
from jaxyolo import hyp as H
from jaxyolo import train_step as T
from jaxyolo.data.synthetic import synthetic_image

IMG, BATCH, STEPS = 64, 8, 3


def batch(seed: int = 0, size: int = IMG, n: int = BATCH, max_boxes: int = 6):
    imgs = np.zeros((n, size, size, 3), np.uint8)
    boxes = np.zeros((n, max_boxes, 4), np.float32)
    classes = np.zeros((n, max_boxes), np.int32)
    mask = np.zeros((n, max_boxes), bool)
    for i in range(n):
        im, bx = synthetic_image(size, seed=seed * 1000 + i, num_objects=1 + i % 4)
        imgs[i] = np.round(im * 255).astype(np.uint8)
        k = len(bx)
        boxes[i, :k], classes[i, :k], mask[i, :k] = bx[:, 1:], bx[:, 0], True
    return {"image": imgs, "boxes": boxes, "classes": classes, "mask": mask}


def hyps():
    """Two members that differ in optimiser, loss and schedule values. The bias warm-up rate is
    lowered from 0.1: on a tiny batch its large first steps amplify float rounding differences
    (the order of sums under vmap or sharding) past what a comparison can tell from a bug. The box
    gain is the reference's 0.05 for the same reason: the default's 4x larger one amplifies those
    differences (measured 2e-3 of the distance moved on an AVX-512 CPU, against a 1e-3 tolerance)."""
    a = H.load_hyp(overrides={"warmup_epochs": 0.0, "warmup_bias_lr": 0.01, "box": 0.05})
    b = H.load_hyp(overrides={"warmup_epochs": 0.0, "warmup_bias_lr": 0.01, "lr0": 0.02, "momentum": 0.9, "box": 0.08,
                              "balance": [3.0, 1.0, 0.5], "weight_decay": 0.001})
    return [a, b]


def setup():
    det = jaxyolo.create_model("yolov4p", num_classes=2, kst=3, seed=0)
    # the reference's gains (cls x 2/80): the comparisons of layouts here measure float reordering
    # against how far three steps move the weights, which the 40x larger class gain of "per-class"
    # on 2 classes amplifies past the tolerance
    cfg = T.TrainConfig(epochs=2, batches_per_epoch=4, batch_size=BATCH, img_size=IMG, nominal_batch=2 * BATCH,
                        min_warmup_iters=1, augment=False, gain_rule="reference")
    return det, cfg


def run_mesh(pop: int, data: int, *, case_setup=setup, case_hyps=hyps):
    """Two members (`case_hyps()`) of the detector `case_setup()` gives, trained STEPS steps on a
    (pop, data) mesh (default: this case)."""
    det, cfg = case_setup()
    step = T.population_step(T.make_train_step(det, cfg), T.make_mesh(pop, data))
    states = T.replicate(T.init_state(det), 2)
    hyp = H.stack(case_hyps())
    for s in range(STEPS):
        keys = jax.random.split(jax.random.key(s), 2)
        states, metrics = step(states, batch(s), hyp, keys)
    return jax.tree.map(np.asarray, states.params), np.asarray(metrics["loss"])


def save_run(argv, **case) -> None:
    """`OUT POP DATA`: `run_mesh` on that mesh (`case`: its case_setup / case_hyps), the loss and
    the parameters saved to OUT (.npz)."""
    out, pop, data = argv[0], int(argv[1]), int(argv[2])
    params, loss = run_mesh(pop, data, **case)
    np.savez(out, loss=loss, **{f"p{i}": x for i, x in enumerate(jax.tree.leaves(params))})


if __name__ == "__main__":
    save_run(sys.argv[1:])
