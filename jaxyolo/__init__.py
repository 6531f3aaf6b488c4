"""jaxyolo: lightweight YOLOv4 detectors in JAX/Flax.

    import jaxyolo
    det = jaxyolo.create_model("yolov4s", num_classes=80, kst=3)
    raw = det.forward_raw(images)          # images: (B, H, W, 3) float32 in [0, 1]
    boxes = det.decode(raw)                # (B, N, 5 + classes)
"""

from jaxyolo import xla_cpu

xla_cpu.apply_defaults()  # before anything starts a JAX backend (see jaxyolo.xla_cpu)

from jaxyolo.api import Detector, create_model, load, load_torch
from jaxyolo.errors import CheckpointError, ConfigError, JaxyoloError
from jaxyolo.families import model_names as available_models

__version__ = "0.1.0"

__all__ = [
    "Detector",
    "create_model",
    "load",
    "load_torch",
    "available_models",
    "JaxyoloError",
    "ConfigError",
    "CheckpointError",
]
