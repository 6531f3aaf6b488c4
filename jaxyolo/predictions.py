"""The family-neutral form of a detector's output, and the tensor layouts it is published in.

Every detector family decodes its raw outputs to `Predictions`: per candidate box its corners
(x1, y1, x2, y2 in pixels of the network input) and its score for each class in [0, 1]. NMS,
evaluation and prediction read only that.

An exported file publishes one tensor (B, N, C) in one of two layouts (`LAYOUTS`):

* ``"xywh-obj-cls"``: centre x, centre y, width, height, objectness, then nc class probabilities
  (the reference YOLO eval output); a class's score is objectness x class probability;
* ``"xyxy-scores"``: x1, y1, x2, y2, then nc class scores.

`from_tensor` reads either back into `Predictions`, with the same float32 arithmetic on the device
(jax.numpy) and on the host (numpy), so the ONNX parity gate's reference NMS sees what `nms` sees.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from jaxyolo.errors import ConfigError

LAYOUTS = ("xywh-obj-cls", "xyxy-scores")


class Predictions(NamedTuple):
    boxes: Any  # (B, N, 4) xyxy pixels of the network input
    scores: Any  # (B, N, nc) per-class scores in [0, 1]


def from_tensor(x, layout: str = "xywh-obj-cls", *, xp=None) -> Predictions:
    """A published tensor (B, N, C) -> Predictions (float32). `xp`: the array module (default:
    numpy for a numpy array, else jax.numpy).

    For ``"xywh-obj-cls"`` the score is objectness x class probability. The reference also requires
    objectness > conf on its own; with probabilities in [0, 1] that follows from the score
    exceeding conf (a float32 product of two numbers in [0, 1] never exceeds either), so
    thresholding the score alone selects the same pairs."""
    if xp is None:
        if isinstance(x, np.ndarray):
            xp = np
        else:
            import jax.numpy as xp
    x = xp.asarray(x).astype(xp.float32)
    if layout == "xywh-obj-cls":
        half = x[..., 2:4] / xp.float32(2)
        boxes = xp.concatenate([x[..., :2] - half, x[..., :2] + half], axis=-1)
        return Predictions(boxes, x[..., 5:] * x[..., 4:5])
    if layout == "xyxy-scores":
        return Predictions(x[..., :4], x[..., 4:])
    raise ConfigError(f"layout: expected one of {LAYOUTS}, got {layout!r}")


def to_tensor(pred: Predictions, *, xp=None):
    """Predictions -> one (B, N, 4 + nc) tensor in the ``"xyxy-scores"`` layout."""
    if xp is None:
        import jax.numpy as xp
    return xp.concatenate([pred.boxes, pred.scores], axis=-1)
