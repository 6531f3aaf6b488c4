"""Steps per second of one training run on the same 8 devices as 1 process and as 2 processes
(`jax.distributed` on localhost, 4 fake CPU devices each, gloo collectives).

    python benchmarks/multihost_overhead.py [--model yolov4p] [--pop 4] [--batch 16] [--img 64] \
        [--epochs 3] [--json OUT.json]

Each configuration runs `fit` on generated data; the rate counts the iterations after the first
epoch (compilation and start-up excluded), timed by process 0's progress events. A process of
the run is started by this script itself (`--worker`).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = "synthetic:num_train=64,num_val=16,img_size=64-96,seed=0"


def worker(a) -> None:
    os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={a.devices}"
    os.environ["JAX_PLATFORMS"] = "cpu"
    from jaxyolo import distributed as dist

    if a.processes > 1:
        dist.initialize(f"127.0.0.1:{a.port}", a.processes, a.process_id)
    from jaxyolo import hyp as H
    from jaxyolo.train_loop import fit
    from jaxyolo.train_options import TrainOptions

    options = TrainOptions().updated({
        "model.name": a.model, "data.source": DATA, "data.img_size": a.img, "data.batch_size": a.batch,
        "optim.nominal_batch": a.batch, "recipe.min_warmup_iters": 0, "optim.epochs": a.epochs,
        "eval.every": a.epochs, "eval.plots": False, "checkpoint.save_weights": False, "out": a.out})
    times = []
    fit(options, hyps=[H.load_hyp(overrides={"lr0": 0.01 * (m + 1)}) for m in range(a.pop)],
        progress=lambda info: times.append((info["step"], time.perf_counter())) if info["event"] == "step" else None)
    if dist.is_primary():
        Path(a.out + ".times.json").write_text(json.dumps(times))


def measure(a, processes: int) -> dict:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = f"/tmp/jaxyolo-multihost-bench-{processes}"
    subprocess.run(["rm", "-rf", out, out + ".times.json"], check=True)
    t0 = time.time()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", "--processes", str(processes), "--process-id",
                               str(i), "--port", str(port), "--devices", str(8 // processes), "--out", out,
                               "--model", a.model, "--pop", str(a.pop), "--batch", str(a.batch), "--img", str(a.img),
                               "--epochs", str(a.epochs)]) for i in range(processes)]
    codes = [p.wait(timeout=3600) for p in procs]
    if any(codes):
        raise SystemExit(f"{processes} process(es): exit codes {codes}")
    times = json.loads(Path(out + ".times.json").read_text())
    per_epoch = 64 // a.batch
    later = [t for step, t in times if step >= per_epoch]  # after the first epoch
    gaps = [b - a for a, b in zip(later, later[1:])]
    return {"processes": processes, "devices_per_process": 8 // processes, "steps_timed": len(gaps),
            "median_s_per_step": round(statistics.median(gaps), 4), "steps_per_s": round(1 / statistics.median(gaps), 3),
            "wall_s": round(time.time() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--worker", action="store_true")
    ap.add_argument("--processes", type=int, default=1)
    ap.add_argument("--process-id", type=int, default=0)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--devices", type=int, default=8)
    ap.add_argument("--out", default="/tmp/jaxyolo-multihost-bench")
    ap.add_argument("--model", default="yolov4p")
    ap.add_argument("--pop", type=int, default=4)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--img", type=int, default=64)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--json")
    a = ap.parse_args()
    if a.worker:
        return worker(a)
    rows = [measure(a, 1), measure(a, 2)]
    report = {"model": a.model, "population": a.pop, "batch": a.batch, "img": a.img, "rows": rows,
              "overhead": round(rows[0]["steps_per_s"] / rows[1]["steps_per_s"], 3)}
    print(json.dumps(report, indent=1))
    if a.json:
        Path(a.json).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
