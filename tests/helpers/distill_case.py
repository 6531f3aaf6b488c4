"""A tiny deterministic distillation case: the train case's `yolov4p` student and a wider
`yolov4n` teacher, shared by tests/test_distill.py and its subprocesses.

Run as a script (`OUT.npz POP DATA`) it distils 2 students on a ('pop', 'data') mesh and saves the
final parameters (students and adapters), so a test can compare device layouts.
"""

from __future__ import annotations

import sys

import jax
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from helpers import train_case as case

import jaxyolo
from jaxyolo import distill as D
from jaxyolo import distributed as dist
from jaxyolo import hyp as H
from jaxyolo import train_step as T

STEPS = case.STEPS


def confident(det, shift: float = 6.0):
    """Raise the head's objectness biases by `shift`: a randomly initialised teacher then has
    objectness around 0.5 (not the 8-objects-per-image prior), so every distillation term,
    the thresholded box term included, sees cells on both sides."""
    sd = det.state_dict()
    last = len(det.spec.layers) - 1
    na, no = det.spec.num_anchors, det.spec.num_outputs
    for i in range(len(det.spec.strides)):
        key = f"model.{last}.m.{i}.bias"
        b = sd[key].reshape(na, no).copy()
        b[:, 4] += shift
        sd[key] = b.reshape(-1)
    return det.load_state_dict(sd)


def teacher(num_classes: int = 2):
    return confident(jaxyolo.create_model("yolov4n", num_classes=num_classes, kst=3, seed=1))


def hyps():
    """The train case's two members with different distillation weights, all terms on."""
    a, b = case.hyps()
    a = {**a, "kd_obj": 1.0, "kd_cls": 0.5, "kd_box": 0.05, "kd_feat": 0.1, "kd_T": 2.0, "kd_conf": 0.3}
    b = {**b, "kd_obj": 0.5, "kd_cls": 1.0, "kd_box": 0.1, "kd_feat": 0.05, "kd_T": 1.0, "kd_conf": 0.5}
    return [a, b]


def setup():
    student, cfg = case.setup()
    return student, teacher(), cfg


def run_mesh(pop: int, data: int):
    """2 students, `STEPS` steps of the feature-imitation distill step on a (pop, data) mesh."""
    student, tdet, cfg = setup()
    mesh = T.make_mesh(pop, data)
    members, everywhere, rows = (NamedSharding(mesh, P(*axes)) for axes in (("pop",), (), ("data",)))
    step = T.population_step(D.make_distill_step(student, tdet, cfg, features=True), mesh)
    # placed through jaxyolo.distributed: the same calls with one process or several
    states = dist.place(T.replicate(D.init_state(student, tdet, features=True), 2), members)
    tparams = dist.place(D.teacher_params(tdet), everywhere)
    hyp = dist.place(H.stack(hyps()), members)
    for s in range(STEPS):
        keys = dist.place_keys(jax.random.split(jax.random.key(s), 2), members)
        batch = case.batch(s)
        n = len(batch["image"])
        mine = {k: v[dist.local_rows(rows, n)] for k, v in batch.items()}
        states, metrics = step(states, tparams, dist.global_batch(mine, rows, n), hyp, keys)
    return dist.to_host((states.params, states.aux["params"], metrics["loss"], metrics["kd"]))


if __name__ == "__main__":
    out, pop, data = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    params, adapters, loss, kd = run_mesh(pop, data)
    leaves = jax.tree.leaves((params, adapters))
    np.savez(out, loss=loss, kd=kd, **{f"p{i}": x for i, x in enumerate(leaves)})
