"""A tiny deterministic training case of the gfl family, shared by tests/test_gfl.py and its
subprocesses (`python -m helpers.gfl_case OUT.npz POP DATA` trains it on a ('pop', 'data') mesh
and saves the final parameters), as `train_case` is for YOLOv4."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import numpy as np

import jaxyolo
from jaxyolo import families
from jaxyolo import hyp as H
from jaxyolo import train_step as T
from helpers.train_case import BATCH, IMG, STEPS, batch

TABLE = str(Path(__file__).with_name("gfl_tiny.yaml"))


def setup(dgqp: bool = True):
    det = jaxyolo.create_model(TABLE, num_classes=2, seed=0, dgqp=dgqp)
    cfg = T.TrainConfig(epochs=2, batches_per_epoch=4, batch_size=BATCH, img_size=IMG, nominal_batch=2 * BATCH,
                        min_warmup_iters=1, augment=False)
    return det, cfg


def hyps():
    """Two members that differ in optimiser and in the family's own loss keys (a low bias warm-up
    rate, as in `train_case`, keeps float rounding from being amplified past the comparison)."""
    family = families.get("gfl")
    a = H.load_hyp(overrides={"warmup_epochs": 0.0, "warmup_bias_lr": 0.01}, family=family)
    b = H.load_hyp(overrides={"warmup_epochs": 0.0, "warmup_bias_lr": 0.01, "lr0": 0.02, "momentum": 0.9,
                              "gfl_box": 1.0, "gfl_dfl": 0.5, "qfl_beta": 1.5}, family=family)
    return [a, b]


def run_mesh(pop: int, data: int):
    det, cfg = setup()
    step = T.population_step(T.make_train_step(det, cfg), T.make_mesh(pop, data))
    states = T.replicate(T.init_state(det), 2)
    hyp = H.stack(hyps())
    for s in range(STEPS):
        keys = jax.random.split(jax.random.key(s), 2)
        states, metrics = step(states, batch(s), hyp, keys)
    return jax.tree.map(np.asarray, states.params), np.asarray(metrics["loss"])


if __name__ == "__main__":
    out, pop, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    params, loss = run_mesh(pop, data)
    np.savez(out, loss=loss, **{f"p{i}": x for i, x in enumerate(jax.tree.leaves(params))})
