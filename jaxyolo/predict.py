"""Detections on image files: letterbox, forward, decode, NMS, boxes back in original pixels.

Images are decoded by the datasets' reader (`jaxyolo.data.yolo.read_rgb`: EXIF rotation, every PIL
mode to RGB with 16-bit greys scaled), so a picture is seen the same in training, evaluation and
prediction."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from jaxyolo.augment import to_unit
from jaxyolo.data.loader import letterbox, letterbox_offsets, unletterbox_boxes
from jaxyolo.errors import ConfigError
from jaxyolo.evaluate import nms, split_detections

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp")


def image_files(source: str | Path) -> list[Path]:
    """The images of a file or a folder (sorted), with a clear error when there are none."""
    src = Path(source)
    if src.is_dir():
        files = sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    elif src.is_file():
        files = [src]
    else:
        raise ConfigError(f"source {src}: no such file or folder")
    if not files:
        raise ConfigError(f"source {src}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return files


def predict(detector, image: np.ndarray, *, img_size: int = 640, conf_thres: float = 0.25, iou_thres: float = 0.45,
            max_det: int = 300):
    """(boxes xyxy in `image` pixels, scores, classes) for one uint8 RGB image."""
    h0, w0 = image.shape[:2]
    r = img_size / max(h0, w0)
    from PIL import Image

    resized = image if r == 1 else np.asarray(Image.fromarray(image).resize(
        (max(1, round(w0 * r)), max(1, round(h0 * r))), Image.BILINEAR))
    boxed, (gx, gy), (dw, dh) = letterbox(resized, img_size, auto=False, scaleup=False)
    left, top = letterbox_offsets(dw, dh)
    gain_x, gain_y = resized.shape[1] / w0 * gx, resized.shape[0] / h0 * gy
    x = to_unit(jnp.asarray(boxed[None], jnp.uint8))
    dets = nms(detector.predictions(x), conf_thres=conf_thres, iou_thres=iou_thres, max_det=max_det)
    boxes, scores, classes = split_detections(dets)[0]
    boxes = unletterbox_boxes(boxes, np.asarray([gain_x, gain_y, left, top]), (h0, w0))
    return boxes, scores, classes
