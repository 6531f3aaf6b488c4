"""Digests of the training states three step kinds produce, recorded before a refactor, so that
the refactor can be shown to leave them bit for bit the same.

Cases (each a few iterations on fixed inputs):
- `train`: a yolov4s train step with the on-device augmentation (mosaic and single images);
- `distill`: the distillation case's two students (yolov4p KST), feature imitation on;
- `population`: the train case's two hyp sets, yolov4p KST, as one vmapped population.

A digest holds, per state leaf, the start of the SHA-256 of its bytes and its float64 sum and
absolute sum.
XLA's CPU kernels differ between instruction sets, so the bytes are only comparable on a machine
like the one that recorded them (`machine()`: jax version, backend, CPU model and flags, XLA
flags);
elsewhere the sums are compared with a tolerance.

Record (deliberately, before changing what a step computes), under the test suite's XLA flags:
    .venv/bin/python tests/helpers/golden.py tests/golden/steps.json
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from pathlib import Path

import numpy as np

CASES = ("train", "distill", "population")


def machine() -> dict:
    """What decides the bytes a step computes: jax, the backend, the CPU (model name and every
    instruction-set flag, as XLA compiles for the host) and the XLA flags."""
    import jax

    import jaxyolo  # noqa: F401 - its CPU flag is part of what compiled the steps

    cpu = ""
    if sys.platform.startswith("linux"):
        try:
            info = Path("/proc/cpuinfo").read_text().splitlines()
        except OSError:
            info = []
        fields = {line.split(":", 1)[0].strip(): line.split(":", 1)[1].strip() for line in info if ":" in line}
        flags = " ".join(sorted(fields.get("flags", "").split()))
        cpu = hashlib.sha256(f"{fields.get('model name', '')}|{flags}".encode()).hexdigest()[:16]
    return {"jax": jax.__version__, "backend": jax.default_backend(), "cpu": cpu,
            "xla_flags": sorted(os.environ.get("XLA_FLAGS", "").split())}


def digest(tree) -> dict:
    import jax

    out = {}
    for path, leaf in jax.tree.leaves_with_path(tree):
        a = np.ascontiguousarray(np.asarray(leaf))
        key = jax.tree_util.keystr(path)
        f = a.astype(np.float64)
        out[key] = [hashlib.sha256(a.tobytes()).hexdigest()[:20], float(f.sum()), float(np.abs(f).sum())]
    return out


def differences(want: dict, got: dict, *, exact: bool) -> list[str]:
    """What differs between a recorded digest and a new one: leaves missing or added, and leaves
    whose bytes (`exact`) or whose sums (within 1e-3 of the absolute sum) differ."""
    out = [f"{k}: not in the new state" for k in want if k not in got]
    out += [f"{k}: not in the recorded state" for k in got if k not in want]
    for k in sorted(set(want) & set(got)):
        (h0, s0, a0), (h1, s1, _) = want[k], got[k]
        if exact and h0 != h1:
            out.append(f"{k}: bytes differ (sum {s1!r} against {s0!r})")
        elif not exact and not abs(s1 - s0) <= 1e-3 * a0 + 1e-6:
            out.append(f"{k}: sum {s1!r} against the recorded {s0!r}")
    return out


def run(case: str):
    """The final state of one case (a TrainState with a leading population axis)."""
    import jax
    from helpers import distill_case, train_case

    import jaxyolo
    from jaxyolo import distill as D
    from jaxyolo import hyp as H
    from jaxyolo import train_step as T
    from jaxyolo.bench.suites import synthetic_batch

    if case == "train":
        det = jaxyolo.create_model("yolov4s", num_classes=3, seed=0)
        cfg = T.TrainConfig(epochs=2, batches_per_epoch=3, batch_size=2, img_size=64, nominal_batch=4,
                            min_warmup_iters=1, augment=True)
        step = T.population_step(T.make_train_step(det, cfg), T.make_mesh(1, 1))
        states = T.replicate(T.init_state(det), 1)
        # the train case's gentler first steps (its hyps say why), with mixup and rotation on
        hyp = H.stack([{**train_case.hyps()[0], "mixup": 0.5, "degrees": 5.0}])
        for s in range(3):
            batch = synthetic_batch(2, 64, num_classes=3, max_boxes=4, augment=True, seed=s)
            states, _ = step(states, batch, hyp, jax.random.split(jax.random.key(s), 1))
        return states
    if case == "distill":
        student, teacher, cfg = distill_case.setup()
        step = T.population_step(D.make_distill_step(student, teacher, cfg, features=True), T.make_mesh(1, 1))
        states = T.replicate(D.init_state(student, teacher, features=True), 2)
        tparams, hyp = D.teacher_params(teacher), H.stack(distill_case.hyps())
        for s in range(distill_case.STEPS):
            states, _ = step(states, tparams, train_case.batch(s), hyp, jax.random.split(jax.random.key(s), 2))
        return states
    if case == "population":
        det, cfg = train_case.setup()
        step = T.population_step(T.make_train_step(det, cfg), T.make_mesh(1, 1))
        states = T.replicate(T.init_state(det), 2)
        hyp = H.stack(train_case.hyps())
        for s in range(train_case.STEPS):
            states, _ = step(states, train_case.batch(s), hyp, jax.random.split(jax.random.key(s), 2))
        return states
    raise ValueError(f"unknown case {case!r}, expected one of {CASES}")


def write(record: dict, target: Path) -> None:
    """The record as JSON, one line per leaf (reviewable diffs, a third of the indented size)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    cases = ",\n".join(f"{json.dumps(c)}: {{\n" + ",\n".join(f"  {json.dumps(k)}: {json.dumps(v)}"
                                                              for k, v in sorted(leaves.items())) + "\n}"
                       for c, leaves in sorted(record["cases"].items()))
    target.write_text(f'{{"machine": {json.dumps(record["machine"])},\n"cases": {{\n{cases}\n}}}}\n')


if __name__ == "__main__":
    tests = Path(__file__).resolve().parents[1]
    sys.path.insert(0, str(tests))  # `helpers` as the tests import it
    import conftest  # noqa: F401 - the suite's XLA flags, set before JAX starts
    target = Path(sys.argv[1])
    record = {"machine": machine(), "cases": {c: digest(run(c)) for c in CASES}}
    write(record, target)
    print(f"wrote {target}: {', '.join(f'{c} {len(v)} leaves' for c, v in record['cases'].items())}")
