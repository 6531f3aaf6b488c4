"""Shared fixtures: tiny detectors (the `yolov4p` table) with non-trivial weights."""

from __future__ import annotations

from pathlib import Path

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
