"""A tiny deterministic training case of the gfl family, shared by tests/test_gfl.py and its
subprocesses (`python -m helpers.gfl_case OUT.npz POP DATA` trains it on a ('pop', 'data') mesh
and saves the final parameters), as `train_case` is for YOLOv4."""

from __future__ import annotations

import sys
from pathlib import Path

import jaxyolo
from jaxyolo import families
from jaxyolo import hyp as H
from jaxyolo import train_step as T
from helpers import train_case
from helpers.train_case import BATCH, IMG

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
    return train_case.run_mesh(pop, data, case_setup=setup, case_hyps=hyps)


if __name__ == "__main__":
    train_case.save_run(sys.argv[1:], case_setup=setup, case_hyps=hyps)
