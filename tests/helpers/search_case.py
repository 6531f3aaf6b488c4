"""A search on a synthetic fitness function (no training), shared by the search tests.

Run as a script (`python -m helpers.search_case OUT [--resume]`) it is the killable search: it
prints `DONE <phase> <generation>` (flushed) after each population is recorded, and sleeps after
`$JAXYOLO_TEST_PAUSE_AFTER` populations so a test can SIGKILL it at a known point.
"""

from __future__ import annotations

import math
import os
import sys
import time

import numpy as np

# four free hyper-parameters with a known optimum inside the bounds; the rest frozen
SPACE = {
    "lr0": {"start": 0.01, "low": 1e-4, "high": 0.1, "gain": 1.0, "scale": "log"},
    "momentum": {"start": 0.9, "low": 0.6, "high": 0.98, "gain": 0.3},
    "hsv_v": {"start": 0.4, "low": 0.0, "high": 0.9, "gain": 1.0},
    "mosaic": {"start": 1.0, "low": 0.0, "high": 1.0, "gain": 1.0},
    "balance.0": {"start": 4.0, "low": 0.4, "high": 40.0, "gain": 1.0, "scale": "log"},
    "balance.1": {"start": 1.0, "low": 0.1, "high": 10.0, "gain": 1.0, "scale": "log", "frozen": True},
    "balance.2": {"start": 0.4, "low": 0.04, "high": 4.0, "gain": 1.0, "scale": "log", "frozen": True},
    "box": {"start": 0.05, "low": 0.02, "high": 0.2, "gain": 1.0, "scale": "log"},
}
OPTIMUM = {"lr0": 0.003, "momentum": 0.85, "hsv_v": 0.6, "mosaic": 0.5}
EPOCHS = 8


def fitness(h: dict) -> float:
    d = ((math.log10(h["lr0"]) - math.log10(OPTIMUM["lr0"])) / 3) ** 2
    d += sum(((h[k] - OPTIMUM[k]) / w) ** 2 for k, w in (("momentum", 0.38), ("hsv_v", 0.9), ("mosaic", 1.0)))
    return math.exp(-d / 0.1)


def curves(h: dict, epochs: int) -> dict:
    """Validation losses per epoch: P3 (and the box objective) over-fit from epoch 2 on, the rest
    keep falling, so the loss-weight rule has something to derive."""
    e = np.arange(epochs, dtype=np.float64)
    falling = 1.0 / (1.0 + e)
    u_shape = 0.5 + 0.1 * (e - 2.0) ** 2
    local = np.stack([np.stack([u_shape, u_shape, falling], -1), np.stack([falling] * 3, -1),
                      np.stack([falling] * 3, -1)], 1) * h["balance"][0] / 4.0
    glob = np.stack([u_shape, falling, falling], -1)
    return {"local": local.tolist(), "global": glob.tolist()}


class SyntheticEvaluator:
    def __init__(self):
        self.calls: list[tuple[str, int]] = []

    def __call__(self, hyps, tag, epochs=None):
        self.calls.append((tag, len(hyps)))
        out = []
        for h in hyps:
            f = fitness(h)
            out.append({"fitness": f, "metrics": {"AP": 0.9 * f, "AP50": f, "AP75": 0.8 * f, "APs": 0.0,
                                                  "APm": 0.5 * f, "APl": f},
                        "curves": curves(h, epochs or EPOCHS)})
        return out


def options(out, train: dict | None = None, **kw):
    """SearchOptions for the tests: `kw` the search's own fields, `train` the trials' settings by
    dotted name (the trials train with the search's `seed`)."""
    from jaxyolo.search.runner import SearchOptions, trial_defaults

    kw = {"space": SPACE, "population": 8, "generations": 4, "trial_epochs": EPOCHS, "grid_dims": 2,
          "out": str(out), "seed": 3, **kw}
    trials = trial_defaults({"model.name": "yolov4p", "data.source": "synthetic", "seed": kw["seed"], **(train or {})})
    return SearchOptions(train=trials, **kw)


def _main(argv):
    from jaxyolo.search.runner import run_search

    out, resume = argv[0], "--resume" in argv
    pause = int(os.environ.get("JAXYOLO_TEST_PAUSE_AFTER", "-1"))
    count = [0]

    def progress(info):
        if info["event"] == "done":
            print(f"DONE {info['phase']} {info['generation']}", flush=True)
            count[0] += 1
            if count[0] == pause:
                time.sleep(3600)

    run_search(options(out), resume=resume, evaluate=SyntheticEvaluator(), progress=progress)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
