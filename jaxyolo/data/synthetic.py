"""Generated detection data with exactly known boxes: a dataset that needs no download.

`generate_dataset` writes one folder that both readers load:

  data.yaml                          ultralytics data YAML (no `path`: the YAML's folder is the root)
  train/images/000001.jpg ...        JPEG images; the stem is the COCO image id
  train/labels/000001.txt ...        YOLO labels, `cls cx cy w h` normalised
  val/images, val/labels             the same for the validation split
  annotations/instances_train.json   COCO json (category ids 0..nc-1, the YOLO reader's ids for a
  annotations/instances_val.json     non-COCO dataset, so the two readers agree id for id)

Each image: a textured background (a two-colour gradient, pixel noise, a few thin lines) and 1 to
`max_objects` shapes. The class is the shape (SHAPES) and also sets the hue, so a small model learns
it quickly. Sizes run log-uniformly from 8 px to 60 % of the shorter image side; every shape lies
inside the image. Later shapes are drawn over earlier ones; a box is the full extent of its shape
(amodal, exact to the pixel: taken from the drawn mask), and a shape more than 60 % hidden is
dropped from the labels (it stays in the image, as clutter).

Everything is a function of (seed, split, index): the same arguments give byte-identical files.
"""

from __future__ import annotations

import colorsys
import hashlib
import inspect
import json
import math
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageDraw

from jaxyolo.errors import ConfigError

SHAPES = ("rectangle", "ellipse", "triangle", "cross", "ring", "diamond", "star", "hexagon")
GENERATOR_VERSION = 1  # bump whenever output changes, so cached datasets are regenerated
MAX_HIDDEN = 0.6
MIN_SIDE = 8
MAX_FRACTION = 0.6
_SPLITS = {"train": 0, "val": 1}


# ----------------------------------------------------------------------------------------- drawing


def _background(rng: np.random.Generator, w: int, h: int) -> Image.Image:
    """Muted gradient + noise + lines: texture a detector must learn to ignore."""
    c0, c1 = (np.asarray(colorsys.hsv_to_rgb(rng.uniform(), rng.uniform(0, 0.25), rng.uniform(0.25, 0.65)),
                         np.float32) * 255 for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    t = (np.arange(w, dtype=np.float32) * math.cos(angle))[None, :] + \
        (np.arange(h, dtype=np.float32) * math.sin(angle))[:, None]
    t = (t - t.min()) / max(float(t.max() - t.min()), 1.0)
    img = c0 + (c1 - c0) * t[..., None]
    img += rng.standard_normal((h, w, 1), dtype=np.float32) * np.float32(rng.uniform(4, 12))
    im = Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(im)
    for _ in range(int(rng.integers(2, 7))):
        shade = tuple(int(v) for v in np.clip((c0 + c1) / 2 + rng.uniform(-50, 50, 3), 0, 255))
        draw.line([tuple(rng.uniform(0, [w, h])), tuple(rng.uniform(0, [w, h]))], fill=shade,
                  width=int(rng.integers(1, 3)))
    return im


def _polygon(points: np.ndarray, w: int, h: int, rng: np.random.Generator) -> list[tuple[float, float]]:
    """Unit-shape points, randomly rotated, then stretched to fill the w x h canvas."""
    a = rng.uniform(0, 2 * math.pi)
    p = points @ np.asarray([[math.cos(a), math.sin(a)], [-math.sin(a), math.cos(a)]])
    p = (p - p.min(0)) / np.maximum(p.max(0) - p.min(0), 1e-9) * [w - 1, h - 1]
    return [tuple(q) for q in p]


def _regular(n: int, inner: float | None = None) -> np.ndarray:
    """A regular n-gon (or 2n-point star when `inner` is the inner radius)."""
    k = 2 * n if inner else n
    r = np.where(np.arange(k) % 2, inner, 1.0) if inner else np.ones(k)
    ang = np.arange(k) * 2 * math.pi / k
    return np.stack([r * np.cos(ang), r * np.sin(ang)], 1)


def _shape_mask(kind: str, w: int, h: int, rng: np.random.Generator) -> np.ndarray:
    """(h, w) bool mask of one shape filling (most of) its w x h canvas."""
    m = Image.new("L", (w, h), 0)
    d = ImageDraw.Draw(m)
    if kind == "rectangle":
        d.rectangle([0, 0, w - 1, h - 1], fill=255)
    elif kind == "ellipse":
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
    elif kind == "ring":
        t = max(2.0, rng.uniform(0.15, 0.3) * min(w, h))
        d.ellipse([0, 0, w - 1, h - 1], fill=255)
        d.ellipse([t, t, w - 1 - t, h - 1 - t], fill=0)
    elif kind == "cross":
        tx, ty = max(2.0, rng.uniform(0.25, 0.4) * w), max(2.0, rng.uniform(0.25, 0.4) * h)
        d.rectangle([0, (h - ty) / 2, w - 1, (h + ty) / 2], fill=255)
        d.rectangle([(w - tx) / 2, 0, (w + tx) / 2, h - 1], fill=255)
    else:
        unit = {"triangle": _regular(3), "diamond": _regular(4), "hexagon": _regular(6),
                "star": _regular(5, inner=0.45)}[kind]
        d.polygon(_polygon(unit, w, h, rng), fill=255)
    return np.asarray(m) > 127


def _class_colour(c: int, num_classes: int, rng: np.random.Generator) -> tuple[int, int, int]:
    """Saturated and bright, hue set by class (with jitter): contrast against the muted background."""
    hue = (c / num_classes + rng.uniform(-0.03, 0.03)) % 1.0
    rgb = colorsys.hsv_to_rgb(hue, rng.uniform(0.7, 1.0), rng.uniform(0.75, 1.0))
    return tuple(round(255 * v) for v in rgb)


def render(rng: np.random.Generator, w: int, h: int, *, num_classes: int, num_objects: int,
           min_fraction: float = 0.0):
    """One image: (uint8 (h, w, 3), boxes (n, 4) float32 xyxy pixel edges, classes (n,) int32).
    Object sizes run log-uniformly from max(MIN_SIDE, min_fraction x the shorter side) px up."""
    img = np.array(_background(rng, w, h))
    placed = []  # (class, x0, y0, mask)
    hi = max(MIN_SIDE + 1.0, MAX_FRACTION * min(w, h))
    lo = min(max(float(MIN_SIDE), min_fraction * min(w, h)), hi)
    for _ in range(num_objects):
        c = int(rng.integers(num_classes))
        size = math.exp(rng.uniform(math.log(lo), math.log(hi)))
        aspect = math.exp(rng.uniform(math.log(0.6), math.log(1.6)))
        sw = int(np.clip(round(size * math.sqrt(aspect)), MIN_SIDE, min(w, hi)))
        sh = int(np.clip(round(size / math.sqrt(aspect)), MIN_SIDE, min(h, hi)))
        x0, y0 = int(rng.integers(0, w - sw + 1)), int(rng.integers(0, h - sh + 1))
        mask = _shape_mask(SHAPES[c], sw, sh, rng)
        img[y0:y0 + sh, x0:x0 + sw][mask] = _class_colour(c, num_classes, rng)
        placed.append((c, x0, y0, mask))
    return img, *_visible_boxes(placed, w, h)


def _visible_boxes(placed: list, w: int, h: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact boxes of the shapes at most MAX_HIDDEN covered by later ones, in drawing order."""
    covered = np.zeros((h, w), bool)
    keep = []
    for c, x0, y0, mask in reversed(placed):
        region = covered[y0:y0 + mask.shape[0], x0:x0 + mask.shape[1]]
        area = int(mask.sum())
        if area and (mask & ~region).sum() >= (1 - MAX_HIDDEN) * area:
            ys, xs = np.nonzero(mask)
            keep.append((c, x0 + xs.min(), y0 + ys.min(), x0 + xs.max() + 1, y0 + ys.max() + 1))
        region |= mask
    keep.reverse()
    if not keep:
        return np.zeros((0, 4), np.float32), np.zeros((0,), np.int32)
    a = np.asarray(keep, np.float64)
    return a[:, 1:].astype(np.float32), a[:, 0].astype(np.int32)


def synthetic_image(size: int = 320, *, seed: int = 0, num_objects: int = 4):
    """A (size, size, 3) float32 image in [0, 1] and its boxes (n, 5) = class, x1, y1, x2, y2 in
    pixels (class 0 rectangle, 1 ellipse). Heavily occluded shapes have no box."""
    img, boxes, classes = render(np.random.default_rng(seed), size, size, num_classes=2, num_objects=num_objects)
    return img.astype(np.float32) / 255, np.concatenate([classes[:, None].astype(np.float32), boxes], 1)


# ----------------------------------------------------------------------------------------- datasets


def make_sample(split: str, index: int, *, seed: int = 0, img_size=(128, 256), num_classes: int = 5,
                max_objects: int = 8, min_fraction: float = 0.0):
    """Image `index` of `split`, as `generate_dataset` writes it: (image, boxes, classes)."""
    rng = np.random.default_rng([seed, _SPLITS[split], index])
    lo, hi = _size_range(img_size)
    w, h = (int(v) for v in rng.integers(lo, hi + 1, 2))
    return render(rng, w, h, num_classes=num_classes, num_objects=int(rng.integers(1, max_objects + 1)),
                  min_fraction=min_fraction)


def _size_range(img_size) -> tuple[int, int]:
    lo, hi = (img_size, img_size) if isinstance(img_size, int) else tuple(img_size)
    if not (isinstance(lo, int) and isinstance(hi, int) and 2 * MIN_SIDE <= lo <= hi):
        raise ConfigError(f"synthetic img_size must be an int or (lo, hi) with {2 * MIN_SIDE} <= lo <= hi, "
                          f"got {img_size!r}")
    return lo, hi


def generate_dataset(out_dir: str | os.PathLike, *, num_train: int = 160, num_val: int = 40, img_size=(128, 256),
                     seed: int = 0, num_classes: int = 5, max_objects: int = 8, quality: int = 90,
                     min_fraction: float = 0.0) -> Path:
    """Write the dataset described in the module docstring into `out_dir` (new or empty, so no stale
    file joins the dataset); returns it as a Path. `img_size` is a side for square images or (lo, hi):
    width and height each drawn from [lo, hi]. `min_fraction` > 0 makes an easier set: no object
    smaller than that fraction of the image's shorter side."""
    _size_range(img_size)
    out = Path(out_dir)
    if out.exists() and any(out.iterdir()):
        raise ConfigError(f"synthetic dataset: {out} is not empty; generate into a new folder")
    if not 1 <= num_classes <= len(SHAPES):
        raise ConfigError(f"synthetic num_classes must be in 1..{len(SHAPES)}, got {num_classes}")
    if num_train < 0 or num_val < 0 or num_train + num_val == 0 or max_objects < 1:
        raise ConfigError(f"synthetic dataset needs num_train + num_val > 0 and max_objects >= 1, got "
                          f"{num_train}, {num_val}, {max_objects}")
    names = list(SHAPES[:num_classes])
    if not 0.0 <= min_fraction <= MAX_FRACTION:
        raise ConfigError(f"synthetic min_fraction must be in [0, {MAX_FRACTION}], got {min_fraction}")
    for split, n in (("train", num_train), ("val", num_val)):
        _write_split(out, split, n, names, quality,
                     {"seed": seed, "img_size": img_size, "num_classes": num_classes, "max_objects": max_objects,
                      "min_fraction": float(min_fraction)})
    (out / "data.yaml").write_text(yaml.safe_dump(
        {"train": "train/images", "val": "val/images", "nc": num_classes, "names": names}, sort_keys=False))
    return out


def _write_split(out: Path, split: str, n: int, names: list[str], quality: int, kw: dict) -> None:
    (out / split / "images").mkdir(parents=True, exist_ok=True)
    (out / split / "labels").mkdir(parents=True, exist_ok=True)
    (out / "annotations").mkdir(exist_ok=True)
    images, annotations = [], []
    for i in range(n):
        img, boxes, classes = make_sample(split, i, **kw)
        image_id, (h, w) = i + 1, img.shape[:2]
        stem = f"{image_id:06d}"
        Image.fromarray(img).save(out / split / "images" / f"{stem}.jpg", "JPEG", quality=quality)
        lines = [f"{c} {(b[0] + b[2]) / 2 / w:.6f} {(b[1] + b[3]) / 2 / h:.6f} {(b[2] - b[0]) / w:.6f} "
                 f"{(b[3] - b[1]) / h:.6f}" for b, c in zip(boxes.tolist(), classes.tolist())]
        (out / split / "labels" / f"{stem}.txt").write_text("".join(line + "\n" for line in lines))
        images.append({"id": image_id, "file_name": f"{stem}.jpg", "width": w, "height": h})
        for b, c in zip(boxes.tolist(), classes.tolist()):
            bw, bh = b[2] - b[0], b[3] - b[1]
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": c,
                                "bbox": [b[0], b[1], bw, bh], "area": bw * bh, "iscrowd": 0})
    categories = [{"id": c, "name": name, "supercategory": "shape"} for c, name in enumerate(names)]
    doc = {"info": {"description": f"jaxyolo synthetic shapes v{GENERATOR_VERSION}"}, "images": images,
           "annotations": annotations, "categories": categories}
    (out / "annotations" / f"instances_{split}.json").write_text(json.dumps(doc, separators=(",", ":")))


def cache_root(root: str | os.PathLike | None = None) -> Path:
    """`root`, else $JAXYOLO_CACHE, else ~/.cache/jaxyolo."""
    return Path(root or os.environ.get("JAXYOLO_CACHE") or Path.home() / ".cache" / "jaxyolo")


def synthetic_dataset(root: str | os.PathLike | None = None, **kw) -> Path:
    """The folder of a generated dataset with these `generate_dataset` options, generating it on first
    use under `cache_root(root)/synthetic-<hash of the options>`. Generation goes into a temporary
    folder renamed into place at the end, so a killed run never leaves a half dataset behind."""
    try:
        bound = inspect.signature(generate_dataset).bind(None, **kw)
    except TypeError as e:
        raise ConfigError(f"synthetic dataset: {e} (options: num_train, num_val, img_size, seed, num_classes, "
                          f"max_objects, quality, min_fraction)") from e
    bound.apply_defaults()
    params = {k: v for k, v in bound.arguments.items() if k != "out_dir"}
    params["img_size"] = list(_size_range(params["img_size"]))
    # an option at its default stays out of the key, so datasets cached before it existed are reused
    key_params = {k: v for k, v in params.items() if not (k == "min_fraction" and v == 0.0)}
    key = json.dumps({**key_params, "version": GENERATOR_VERSION}, sort_keys=True)
    cache = cache_root(root)
    final = cache / f"synthetic-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if final.is_dir():
        return final
    cache.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}-", dir=cache))
    try:
        generate_dataset(tmp, **{**params, "img_size": tuple(params["img_size"])})
        (tmp / "options.json").write_text(key + "\n")
        os.rename(tmp, final)
    except OSError:
        if not final.is_dir():  # not a concurrent generator winning the rename: a real failure
            raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final
