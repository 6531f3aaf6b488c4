"""Reading a run's saved training state in tests without the trainer's own reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import orbax.checkpoint as ocp


def saved_meta(run: Path, step: int) -> dict:
    return json.loads((run / "state" / str(step) / "meta" / "metadata").read_text())


def saved_state(run: Path, step: int) -> dict:
    """The training state written at `step`: Orbax arrays of one flat vector per dtype, cut into
    the leaves its metadata lists (path, shape, dtype) in order, as nested dicts."""
    packed = ocp.StandardCheckpointer().restore((run / "state" / str(step) / "state").absolute())
    out, offsets = {}, dict.fromkeys(packed, 0)
    for path, shape, dtype in saved_meta(run, step)["layout"]:
        n = int(np.prod(shape))
        leaf = np.asarray(packed[dtype][offsets[dtype]:offsets[dtype] + n]).reshape(shape)
        assert leaf.dtype == np.dtype(dtype)
        offsets[dtype] += n
        node = out
        for k in path[:-1]:
            node = node.setdefault(k, {})
        node[path[-1]] = leaf
    assert offsets == {k: v.size for k, v in packed.items()}  # every value belongs to one leaf
    return out
