"""Several processes on JAX's multi-controller runtime, here on localhost: 2 processes of 4 fake
CPU devices each (gloo collectives), against one process of 8 (`helpers.multihost_case`).

Every launch has bounded ports and time; a test that cannot finish kills its processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

HELPERS = str(Path(__file__).resolve().parent)
TIMEOUT_S = 420


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start(mode: str, out: Path, nproc: int, ndev: int, slow: bool = False) -> list[subprocess.Popen]:
    out.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": HELPERS + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "MULTIHOST_STEP_PAUSE_S": "1" if slow else "0"}
    return [subprocess.Popen([sys.executable, "-m", "helpers.multihost_case", mode, str(out), str(i), str(nproc),
                              str(port), str(ndev)], env=env, cwd=HELPERS, stdout=open(out / f"{mode}.log{i}", "w"),
                             stderr=subprocess.STDOUT)
            for i in range(nproc)]


def _wait(procs: list[subprocess.Popen], timeout: float = TIMEOUT_S) -> list[int]:
    end = time.time() + timeout
    try:
        for p in procs:
            p.wait(timeout=max(end - time.time(), 1))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return [p.returncode for p in procs]


def _run(mode: str, out: Path, nproc: int, ndev: int) -> None:
    codes = _wait(_start(mode, out, nproc, ndev))
    logs = "\n".join((out / f"{mode}.log{i}").read_text()[-3000:] for i in range(nproc))
    assert codes == [0] * nproc, logs


def _weights(path: Path) -> dict:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The toy population trained by 2 processes x 4 devices and by 1 process x 8."""
    root = tmp_path_factory.mktemp("multihost")
    _run("fit", root / "two", 2, 4)
    _run("fit", root / "one", 1, 8)
    return root


def test_two_processes_train_the_population_as_one_process_does(runs):
    """A population of 4 spread over both processes (each holds 2 members) ends where one
    process with the same 8 devices ends, to the last digits a reduction's order moves; both
    processes return the same detectors."""
    two0, two1 = _weights(runs / "two" / "weights.p0.npz"), _weights(runs / "two" / "weights.p1.npz")
    one = _weights(runs / "one" / "weights.p0.npz")
    assert two0.keys() == one.keys() and len(one) > 4
    for k in one:
        np.testing.assert_array_equal(two0[k], two1[k])
        np.testing.assert_allclose(two0[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)
    a = [r.split(",")[:6] for r in (runs / "two" / "run" / "results.csv").read_text().splitlines()]
    b = [r.split(",")[:6] for r in (runs / "one" / "run" / "results.csv").read_text().splitlines()]
    assert len(a) == len(b) == 1 + 2 * 4  # a header, then 2 epochs x 4 members


def test_only_process_zero_writes_the_results(runs):
    p0 = json.loads((runs / "two" / "writes.p0.json").read_text())
    p1 = json.loads((runs / "two" / "writes.p1.json").read_text())
    assert p0["primary"] and not p1["primary"]
    assert p1["written"] == []
    assert any(w.endswith("results.csv") for w in p0["written"])
    events = list((runs / "two" / "run" / "tensorboard").glob("events.*"))
    assert len(events) == 1  # one writer of the event file
    for m in range(4):
        assert (runs / "two" / "run" / "weights" / f"member{m}" / "last").is_dir()


def test_a_distillation_step_over_two_processes_equals_one_process(tmp_path, runs_root):
    from helpers.train_runs import distill_on_eight_devices

    _run("distill", tmp_path, 2, 4)
    one = distill_on_eight_devices(runs_root)
    with np.load(tmp_path / "distill.p0.npz") as two:
        for k in one.files:
            np.testing.assert_allclose(two[k], one[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_validation_is_split_over_the_processes_and_gathered(tmp_path):
    """One detector held whole by each process: each reads half of every val batch (the mesh's
    'data' axis spans both), and the gathered detections are the one-process ones."""
    _run("eval", tmp_path / "two", 2, 4)
    _run("eval", tmp_path / "one", 1, 8)
    two = [json.loads((tmp_path / "two" / f"eval.p{i}.json").read_text()) for i in (0, 1)]
    one = json.loads((tmp_path / "one" / "eval.p0.json").read_text())
    assert two[0] == two[1] and len(one["detections"]) == len(two[0]["detections"]) > 0
    for a, b in zip(two[0]["detections"], one["detections"]):
        assert (a["image_id"], a["category_id"]) == (b["image_id"], b["category_id"])
        np.testing.assert_allclose(a["bbox"] + [a["score"]], b["bbox"] + [b["score"]], rtol=1e-4, atol=1e-3)
    assert two[0]["AP50"] == pytest.approx(one["AP50"], abs=1e-6)


def test_a_dead_process_stops_the_other_and_both_resume_exactly(runs, tmp_path):
    """Process 1 killed mid-run: process 0 exits by itself, with the runtime's message, well
    within the time limit (a pause after each step keeps the run going until the kill). Both
    restarted with resume end with the unbroken two-process run's weights; one process of 8
    devices resuming the same state ends there too, to float rounding."""
    out = tmp_path / "killed"
    procs = _start("fit", out, 2, 4, slow=True)
    state = out / "run" / "state"
    end = time.time() + TIMEOUT_S
    while time.time() < end and not any(p.name.isdigit() and int(p.name) >= 2 for p in state.glob("*")):
        assert all(p.poll() is None for p in procs), (out / "fit.log0").read_text()[-3000:]
        time.sleep(0.2)
    procs[1].send_signal(signal.SIGKILL)
    t_kill = time.time()
    codes = _wait(procs, timeout=60)
    waited = time.time() - t_kill
    log0 = (out / "fit.log0").read_text()
    assert codes[0] != 0 and waited < 60, log0[-3000:]
    assert "another task died" in log0 or "unhealthy" in log0 or "Connection closed" in log0, log0[-3000:]
    other = tmp_path / "other-count"
    shutil.copytree(out, other)
    _run("resume", out, 2, 4)
    resumed, unbroken = _weights(out / "weights.p0.npz"), _weights(runs / "two" / "weights.p0.npz")
    for k in unbroken:
        if k != "fitness":
            np.testing.assert_array_equal(resumed[k], unbroken[k], err_msg=k)
    # the same saved state resumed by one process of 8 devices: the same run, to float rounding
    _run("resume", other, 1, 8)
    resumed = _weights(other / "weights.p0.npz")
    for k in unbroken:
        if k != "fitness":
            np.testing.assert_allclose(resumed[k], unbroken[k], rtol=1e-4, atol=1e-5, err_msg=k)


def test_the_runtime_starts_only_when_asked_or_when_the_environment_says_so(monkeypatch):
    from jaxyolo import distributed as dist
    from jaxyolo.errors import ConfigError
    from jaxyolo.tools.cli import main

    for var in ("JAX_COORDINATOR_ADDRESS", "SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE",
                "TPU_WORKER_HOSTNAMES"):
        monkeypatch.delenv(var, raising=False)
    assert dist.environment_processes() == 1 and dist.initialize() is False  # one process: nothing to join
    monkeypatch.setenv("SLURM_NTASKS", "1")
    assert dist.environment_processes() == 1
    monkeypatch.setenv("SLURM_NTASKS", "4")
    assert dist.environment_processes() == 4
    monkeypatch.delenv("SLURM_NTASKS")
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", "t0,t1")
    assert dist.environment_processes() == 2
    monkeypatch.delenv("TPU_WORKER_HOSTNAMES")
    with pytest.raises(ConfigError, match="go together"):
        dist.initialize("127.0.0.1:1", None, None)
    with pytest.raises(ConfigError, match="expected 0 .. 1"):
        dist.initialize("127.0.0.1:1", 2, 5)
    assert main(["train", "--coordinator", "127.0.0.1:1", "--epochs", "1"]) == 2  # named, not a traceback
    assert dist.is_primary() and not dist.multi_process()
    assert dist.local_rows(_rows_sharding(), 8) == slice(0, 8)


def _rows_sharding():
    import jax
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    return NamedSharding(Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("pop", "data")), P("data"))


def test_a_process_builds_its_rows_of_every_batch_as_the_whole_batch_has_them(data_env):
    from helpers import train_runs as R

    from jaxyolo.data.loader import eval_batches, train_batches
    from jaxyolo.data.sources import open_dataset

    ds = open_dataset(R.DATA, "train")
    whole = list(train_batches(ds, img_size=64, batch_size=8, seed=3, epoch=1, max_boxes=20))
    part = list(train_batches(ds, img_size=64, batch_size=8, seed=3, epoch=1, max_boxes=20, rows=slice(4, 8)))
    assert len(part) == len(whole) == 2
    for w, p in zip(whole, part):
        assert w.keys() == p.keys()
        for k in w:
            np.testing.assert_array_equal(p[k], w[k][4:8], err_msg=k)
    val = open_dataset(R.DATA, "val")
    full = list(eval_batches(val, img_size=64, batch_size=3))
    half = list(eval_batches(val, img_size=64, batch_size=3, rows=slice(1, 3)))
    assert [b["index"][1:3].tolist() for b in full] == [b["index"].tolist() for b in half]
    np.testing.assert_array_equal(np.concatenate([b["image"][1:3] for b in full]),
                                  np.concatenate([b["image"] for b in half]))
