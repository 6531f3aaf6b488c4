"""Generated images with exactly known boxes: data that needs no download."""

from __future__ import annotations

import numpy as np


def synthetic_image(size: int = 320, *, seed: int = 0, num_objects: int = 4):
    """A (size, size, 3) float32 image in [0, 1]: a smooth textured background with filled
    rectangles and discs. Returns (image, boxes) with boxes (n, 5) = class, x1, y1, x2, y2 in
    pixels (class 0 rectangle, 1 disc)."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
    base = rng.uniform(0.2, 0.8, 3).astype(np.float32)
    freq = rng.uniform(2, 6, 2)
    texture = 0.1 * np.sin(2 * np.pi * (freq[0] * xx + freq[1] * yy))
    img = np.clip(base[None, None, :] + texture[..., None], 0, 1)
    boxes = []
    for _ in range(num_objects):
        w, h = rng.uniform(0.08, 0.4, 2) * size
        x1, y1 = rng.uniform(0, size - w), rng.uniform(0, size - h)
        colour = rng.uniform(0, 1, 3).astype(np.float32)
        cls = int(rng.integers(0, 2))
        if cls == 0:
            mask = (xx * size >= x1) & (xx * size < x1 + w) & (yy * size >= y1) & (yy * size < y1 + h)
        else:
            cx, cy = x1 + w / 2, y1 + h / 2
            mask = ((xx * size - cx) / (w / 2)) ** 2 + ((yy * size - cy) / (h / 2)) ** 2 <= 1
        img[mask] = colour
        boxes.append([cls, x1, y1, x1 + w, y1 + h])
    return img.astype(np.float32), np.asarray(boxes, np.float32)
