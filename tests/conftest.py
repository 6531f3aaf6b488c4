"""Shared fixtures: tiny detectors (the `yolov4p` table) with non-trivial weights."""

from __future__ import annotations

import os
from pathlib import Path

# Tests run tiny models, where XLA's compile time dominates: a lower backend optimisation level
# halves it, and a persistent cache shared by the xdist workers and subprocesses compiles each
# program once per session. Both are test-only settings (set before JAX starts its backend).
TEST_XLA_FLAGS = "--xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + TEST_XLA_FLAGS).strip()
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      str(Path(__file__).resolve().parents[1] / ".pytest_cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import numpy as np
import pytest

import jaxyolo

SPEC_DIR = Path(__file__).resolve().parents[2] / "shared" / "spec"
IMG = 64  # smallest multiple of the largest stride that keeps every level non-trivial


def perturbed(det: jaxyolo.Detector, seed: int = 1) -> jaxyolo.Detector:
    """Give BatchNorms and implicit vectors values away from their init, so that folding and
    mapping tests cannot pass by accident on identity BNs or equal candidates."""
    rng = np.random.default_rng(seed)
    sd = det.state_dict()
    for k, v in sd.items():
        if k.endswith(("bn.weight", "bn.running_var")):
            sd[k] = rng.uniform(0.5, 1.5, v.shape).astype(np.float32)
        elif k.endswith(("bn.bias", "bn.running_mean")):
            sd[k] = rng.normal(0, 0.2, v.shape).astype(np.float32)
        elif k.endswith("implicit"):
            sd[k] = (v + rng.normal(0, 0.2, v.shape)).astype(np.float32)
    return det.load_state_dict(sd)


@pytest.fixture(scope="session")
def tiny():
    return perturbed(jaxyolo.create_model("yolov4p", num_classes=3, kst=3, seed=0))


@pytest.fixture(scope="session")
def images():
    return np.random.default_rng(0).uniform(0, 1, (2, IMG, IMG, 3)).astype(np.float32)


# ----------------------------------------------------------------- shared tiny training runs


@pytest.fixture(scope="session")
def runs_root(tmp_path_factory):
    """Where the shared tiny runs of `helpers.train_runs` live (one folder for all xdist workers)."""
    from helpers import train_runs as R

    return R.shared_root(tmp_path_factory)


@pytest.fixture(scope="session")
def reference(runs_root):
    """An unbroken tiny `jaxyolo train` run (read-only: copy it to modify it)."""
    from helpers import train_runs as R

    return R.reference_run(runs_root)


@pytest.fixture(scope="session")
def killed(runs_root):
    """The same run killed with SIGKILL mid-epoch and resumed (read-only)."""
    from helpers import train_runs as R

    return R.killed_and_resumed_run(runs_root)


@pytest.fixture
def data_env(runs_root, monkeypatch):
    """Synthetic datasets from the shared runs' cache, not the user's."""
    monkeypatch.setenv("JAXYOLO_CACHE", str(runs_root / "data"))
