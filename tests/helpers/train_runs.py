"""Tiny training runs shared by the trainer and CLI tests, built once per test session.

Each new program compiles for tens of seconds on a small machine, so the runs are shared: across
test modules and across pytest-xdist workers (the first worker that needs a run builds it under a
file lock in the session's shared temporary folder; the others wait and reuse it). Tests must
treat a shared run as read-only (copy it to modify it).

Run as a script it is the "killable" trainer: the `jaxyolo train` arguments after the script name
are parsed by the real CLI parser and trained with `fit`, printing `STEP n` (flushed) after each
iteration's metrics are read; with `$JAXYOLO_TEST_PAUSE_AT=n` it sleeps after printing `STEP n`,
so a test can SIGKILL it at a known point of the run.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

DATA = "synthetic:num_train=16,num_val=8,img_size=64-96"
IMG, BATCH, EPOCHS = 64, 8, 2
NB = 16 // BATCH  # iterations per epoch
TRAIN_ARGS = ["train", "--model", "yolov4p", "--data", DATA, "--img", str(IMG), "--batch", str(BATCH),
              "--nominal-batch", str(BATCH), "--min-warmup-iters", "2", "--epochs", str(EPOCHS), "--seed", "0"]
PAUSE_ENV = "JAXYOLO_TEST_PAUSE_AT"
# "STEP:DELAY": SIGKILL the process DELAY seconds after the writer thread starts saving the training
# state of iteration STEP (inside Orbax's write)
KILL_IN_SAVE_ENV = "JAXYOLO_TEST_KILL_IN_SAVE"


def shared_root(tmp_path_factory) -> Path:
    """A folder all xdist workers of this session share (the session's own folder without xdist)."""
    base = tmp_path_factory.getbasetemp()
    root = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "jaxyolo-shared-runs"
    root.mkdir(parents=True, exist_ok=True)
    return root


@contextlib.contextmanager
def data_cache(root: Path):
    """Synthetic datasets generated under `root` (not the user's cache) while inside."""
    old = os.environ.get("JAXYOLO_CACHE")
    os.environ["JAXYOLO_CACHE"] = str(root / "data")
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("JAXYOLO_CACHE", None)
        else:
            os.environ["JAXYOLO_CACHE"] = old


def build_once(path: Path, build) -> Path:
    """`build(path)` once per session (all workers): later callers wait for it and get `path`."""
    with open(path.with_name(path.name + ".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        done, failed = path.with_name(path.name + ".done"), path.with_name(path.name + ".failed")
        if done.exists():
            return path
        if failed.exists():
            raise RuntimeError(f"building the shared run {path.name} failed earlier: {failed.read_text()}")
        try:
            shutil.rmtree(path, ignore_errors=True)
            build(path)
        except BaseException as e:
            failed.write_text(f"{type(e).__name__}: {e}")
            raise
        done.touch()
    return path


def cli_main(argv) -> tuple[int, str, str]:
    """`jaxyolo ARGV` in this process: (exit code, stdout, stderr)."""
    from jaxyolo.tools import cli

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = cli.main(list(argv))
    return code, out.getvalue(), err.getvalue()


def reference_run(root: Path) -> Path:
    """The unbroken run: `jaxyolo train ... --save-every 1` in this process."""

    def build(path):
        with data_cache(root):
            code, out, err = cli_main(TRAIN_ARGS + ["--save-every", "1", "--out", str(path)])
        (path.parent / "reference.log").write_text(out + "\n---- stderr\n" + err)
        assert code == 0, err[-3000:]

    return build_once(root / "reference", build)


def killed_and_resumed_run(root: Path) -> Path:
    """The same run SIGKILLed in a subprocess mid-epoch 2 (after iteration NB's checkpoint), then
    `jaxyolo train ... --resume` in this process. `killed_info/` keeps what the kill left behind."""

    def build(path):
        info = path.parent / "killed_info"
        shutil.rmtree(info, ignore_errors=True)
        info.mkdir()
        argv = TRAIN_ARGS + ["--save-every", "1", "--out", str(path)]
        # killed once iteration NB's metrics are read: the state after it is saved
        seen = killable(argv, {"JAXYOLO_CACHE": str(root / "data"), PAUSE_ENV: str(NB)}, info, until=f"STEP {NB}")
        assert seen and seen[-1] == f"STEP {NB}", seen
        # what the kill left: the checkpoints and results present now
        (info / "state_steps.txt").write_text(" ".join(sorted(p.name for p in (path / "state").iterdir()
                                                             if p.name.isdigit())))
        shutil.copy(path / "results.csv", info / "results.csv")
        with data_cache(root):
            code, out, err = cli_main(TRAIN_ARGS + ["--save-every", "1", "--out", str(path), "--resume"])
        (info / "resume_stdout.txt").write_text(out)
        assert code == 0, err[-3000:]

    return build_once(root / "killed", build)


def killable(argv: list[str], env: dict, info: Path, until: str | None = None) -> list[str]:
    """Run the killable trainer on `jaxyolo train` arguments `argv` in a subprocess with `env`
    added; SIGKILL it once it prints the line `until` (else wait for it to die or end). Returns
    its stdout lines; its stderr goes to info/stderr.txt."""
    code = (f"import sys; sys.path.insert(0, {str(Path(__file__).parents[1])!r}); import runpy; "
            f"sys.argv = ['x'] + {argv[1:]!r}; runpy.run_module('helpers.train_runs', run_name='__main__')")
    seen = []
    with open(info / "stderr.txt", "w") as err:
        proc = subprocess.Popen([sys.executable, "-c", code], env=dict(os.environ, **env), stdout=subprocess.PIPE,
                                stderr=err, text=True)
        hung = []
        watchdog = threading.Timer(420, lambda: (hung.append(True), proc.kill()))  # ends the read loop (EOF)
        watchdog.start()
        try:
            for line in proc.stdout:
                seen.append(line.strip())
                if seen[-1] == until:
                    os.kill(proc.pid, signal.SIGKILL)
                    break
        finally:
            watchdog.cancel()
            if proc.poll() is None and until is not None:
                proc.kill()
            proc.wait(timeout=60)
    (info / "stdout.txt").write_text("\n".join(seen))
    assert not hung and proc.returncode == -signal.SIGKILL, (
        proc.returncode, seen[-5:], (info / "stderr.txt").read_text()[-3000:])
    return seen


def _drive(argv: list[str]) -> int:
    from jaxyolo.tools import cli, train_cmd
    from jaxyolo.train_loop import fit

    args = cli.build_parser().parse_args(["train"] + argv)
    pause = int(os.environ.get(PAUSE_ENV, "-1"))
    if os.environ.get(KILL_IN_SAVE_ENV):
        from jaxyolo import train_loop

        kill_step, delay = os.environ[KILL_IN_SAVE_ENV].split(":")
        write = train_loop._StateStore._write

        def killing_write(self, packed, meta):
            if int(meta["step"]) == int(kill_step):
                print(f"SAVING {kill_step}", flush=True)
                threading.Timer(float(delay), os.kill, (os.getpid(), signal.SIGKILL)).start()
            write(self, packed, meta)

        train_loop._StateStore._write = killing_write

    def progress(info):
        if info["event"] == "step":
            print(f"STEP {info['step']}", flush=True)
            if info["step"] == pause:
                time.sleep(3600)

    fit(train_cmd.options_from_args(args), resume=args.resume, progress=progress)
    return 0


if __name__ == "__main__":
    sys.exit(_drive(sys.argv[1:]))


def run_on_eight_devices(module: str, out: Path, pop: int, data: int):
    """Run `helpers.<module>` as a script (`OUT POP DATA`) in a subprocess with 8 fake host
    devices, and return its saved arrays."""
    import subprocess
    import sys

    import numpy as np

    helpers = str(Path(__file__).resolve().parents[1])
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               XLA_FLAGS=os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
    code = (f"import sys; sys.path.insert(0, {helpers!r}); import runpy; "
            f"sys.argv = ['x', {str(out)!r}, '{pop}', '{data}']; "
            f"runpy.run_module('helpers.{module}', run_name='__main__')")
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return np.load(out)


def distill_on_eight_devices(root: Path):
    """`helpers.distill_case` on a (pop 2, data 4) mesh of 8 fake devices in one process, run once
    per session (the reference of more than one test)."""
    import numpy as np

    def build(path):
        path.mkdir(parents=True)
        run_on_eight_devices("distill_case", path / "eight.npz", 2, 4)

    return np.load(build_once(root / "distill-eight", build) / "eight.npz")
