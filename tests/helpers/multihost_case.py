"""One process of a multi-process run on this machine, for tests/test_multihost.py.

    python -m helpers.multihost_case MODE OUT PROCESS_ID NUM_PROCESSES PORT DEVICES

joins a `jax.distributed` run of NUM_PROCESSES processes on 127.0.0.1:PORT (no runtime with one
process) with DEVICES fake CPU devices here, and runs MODE:

* ``fit`` / ``resume``: the toy family, a population of 4 hyp sets (different lr0), 2 epochs of 2
  iterations, a training state saved every iteration, in OUT/run; saves the final EMA weights
  of every member to OUT/weights.p<id>.npz and the paths this process wrote through
  `jaxyolo.files.atomic_write` to OUT/writes.p<id>.json. ``resume`` continues OUT/run.
* ``eval``: `jaxyolo.validate.validate` of a fresh toy detector on the val split (with several
  processes each reads its rows of every batch), saved to OUT/eval.p<id>.json;
* ``distill``: `helpers.distill_case.run_mesh(2, 4)` (2 students on a (2, 4) mesh), saved to
  OUT/distill.p<id>.npz.
"""

from __future__ import annotations

import faulthandler
import json
import os
import signal
import sys
import time
from pathlib import Path

DATA = "synthetic:num_train=16,num_val=8,img_size=64-96,seed=0"
POP = 4


def main(argv: list[str]) -> int:
    mode, out, pid, nproc, port, ndev = argv[0], Path(argv[1]), int(argv[2]), int(argv[3]), int(argv[4]), int(argv[5])
    faulthandler.register(signal.SIGUSR1, all_threads=True)  # `kill -USR1 PID`: every thread's stack to the log
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={ndev}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jaxyolo import distributed as dist

    if nproc > 1:
        dist.initialize(f"127.0.0.1:{port}", nproc, pid, heartbeat_s=5)
    import jax
    import numpy as np

    if mode == "distill":
        from helpers import distill_case

        params, adapters, loss, kd = distill_case.run_mesh(2, 4)
        leaves = jax.tree.leaves((params, adapters))
        np.savez(out / f"distill.p{pid}.npz", loss=loss, kd=kd, **{f"p{i}": x for i, x in enumerate(leaves)})
        return 0

    from flax import nnx
    from helpers import toy_family as toy

    if mode == "eval":
        import jaxyolo
        from jaxyolo.data.sources import open_dataset
        from jaxyolo.validate import validate

        det = jaxyolo.create_model(toy.TABLE, num_classes=5, seed=0)
        res = validate(det, open_dataset(DATA, "val"), img_size=64, batch_size=4, keep_detections=True)
        dets = sorted(res["detections"], key=lambda d: (d["image_id"], -d["score"], d["category_id"]))
        (out / f"eval.p{pid}.json").write_text(json.dumps({"detections": dets, "AP50": res["coco"]["AP50"]}))
        return 0

    from jaxyolo import files
    from jaxyolo import hyp as H
    from jaxyolo.train_loop import fit
    from jaxyolo.train_options import TrainOptions

    written = []
    plain = files.atomic_write

    def recording(path, write):
        written.append(str(path))
        return plain(path, write)

    files.atomic_write = recording
    options = TrainOptions().updated({
        "model.name": toy.TABLE, "data.source": DATA, "data.img_size": 64, "data.batch_size": 8,
        "optim.nominal_batch": 8, "recipe.min_warmup_iters": 0, "optim.epochs": 2, "checkpoint.every": 1,
        "out": str(out / "run"), "eval.plots": False})
    hyps = [H.load_hyp(overrides={"lr0": 0.01 * (m + 1)}, family=toy.FAMILY) for m in range(POP)]
    pause = float(os.environ.get("MULTIHOST_STEP_PAUSE_S", "0"))  # the primary's pause holds every process
    res = fit(options, hyps=hyps, resume=mode == "resume",
              progress=lambda info: time.sleep(pause) if info["event"] == "step" else None)
    weights = {f"m{m}_{i}": np.asarray(x) for m, d in enumerate(res.detectors)
               for i, x in enumerate(jax.tree.leaves(nnx.state(d.model)))}
    np.savez(out / f"weights.p{pid}.npz", fitness=np.asarray([r.fitness for r in res.records]), **weights)
    (out / f"writes.p{pid}.json").write_text(json.dumps({"written": written, "primary": dist.is_primary()}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
