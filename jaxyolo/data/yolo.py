"""Ultralytics-style datasets: a data YAML plus `images/` folders with sibling `labels/` folders.

The data YAML (read with `yaml.safe_load` only) has
  path:  dataset root; relative to the YAML's folder, and the YAML's folder when absent
  train / val / test:  a folder of images, a .txt file listing images, or a list of either
  names: a list, or a dict {0: name, 1: name, ...}; and/or nc: the number of classes
A label file is found by the ultralytics rule: the image path's last `/images/` component becomes
`/labels/` and the extension `.txt`. Label lines are `cls cx cy w h`, normalised to [0, 1].

Policy (every skip goes to `self.skipped`, a SkipReport naming the file, and file:line for lines):
  image that PIL cannot open, or a JPEG / PNG cut short . skip the image ("corrupt image")
  greyscale / CMYK / palette / alpha image ............. converted to RGB (alpha dropped, as the reference)
  image without label file, or empty label file ........ kept as a background image (no boxes)
  label file without image (folder splits only) ........ reported ("label file without image")
  line with a column count other than 5 ................ skip the line ("wrong number of columns");
                                                         1 + 2k (k >= 3) columns is a polygon (ultralytics
                                                         segment labels) and becomes its bounding box
  non-number / non-finite field ........................ skip the line ("not a number")
  class not an integer in [0, nc) ...................... skip the line ("class out of range")
  w <= 0 or h <= 0 ..................................... skip the line ("non-positive box size")
  a field outside [-1e-3, 1 + 1e-3] .................... skip the line ("coordinates outside [0, 1]");
                                                         excursions within 1e-3 (rounding) are kept, and box
                                                         corners are clipped to the image
  exact duplicate row .................................. removed, as the reference ("duplicate label row")
  missing data YAML / key / image or labels folder ..... ConfigError naming the file, key or path
  `nc` disagreeing with `names`, or no images .......... ConfigError
EXIF orientation is applied (`ImageOps.exif_transpose`): labels are drawn on the image as viewers
show it, and the reference measures image sizes the same way (exif_size).
Category ids (for COCO-format ground truth and detections): the original COCO ids when `names` are
exactly the 80 COCO names (as the reference's coco80_to_coco91_class), else the class index.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import yaml
from PIL import Image, ImageOps

from jaxyolo.data.dataset import DetectionDataset, Sample, SkipReport, log
from jaxyolo.errors import ConfigError
from jaxyolo.files import read_document

IMAGE_SUFFIXES = (".bmp", ".jpeg", ".jpg", ".mpo", ".png", ".tif", ".tiff", ".webp")
EDGE_TOLERANCE = 1e-3  # label writers round to 6 decimals; anything beyond this is a wrong label
_EXIF_ORIENTATION = 0x0112
_TRANSPOSED_ORIENTATIONS = (5, 6, 7, 8)  # rotations by 90 degrees: width and height swap

# The 80 COCO classes the YOLO world uses, in contiguous order, and their original COCO ids
# (reference coco80_to_coco91_class). A YOLO dataset with exactly these names evaluates with COCO ids.
COCO80_NAMES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard",
    "cell phone", "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors",
    "teddy bear", "hair drier", "toothbrush",
)
COCO80_CATEGORY_IDS = (
    1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25, 27, 28, 31, 32, 33,
    34, 35, 36, 37, 38, 39, 40, 41, 42, 43, 44, 46, 47, 48, 49, 50, 51, 52, 53, 54, 55, 56, 57, 58, 59, 60, 61,
    62, 63, 64, 65, 67, 70, 72, 73, 74, 75, 76, 77, 78, 79, 80, 81, 82, 84, 85, 86, 87, 88, 89, 90,
)


# ----------------------------------------------------------------------------------------- images


# the marker that closes a complete file of a format, looked for in its last _TAIL bytes (some
# writers pad after it): a file cut short has a readable header but not its end
_END_MARKERS = {"JPEG": b"\xff\xd9", "MPO": b"\xff\xd9", "PNG": b"IEND"}
_TAIL = 4096


def _tail_holds(path, marker: bytes) -> bool:
    with open(path, "rb") as f:
        f.seek(max(0, os.path.getsize(path) - _TAIL))
        return marker in f.read()


def probe_image(path: str | os.PathLike) -> tuple[int, int, bool]:
    """(height, width, rotated) from the file header alone, so sizing a dataset never decodes pixels.
    (height, width) is the size as stored; `rotated` says EXIF orientation turns it by 90 degrees.
    A file that would fail to decode in the middle of an epoch (a cut download or copy) raises
    OSError here: a JPEG or PNG whose end marker is in its last bytes is complete; one without it
    (cut, or with data appended after the image, as motion photos have) and every other format
    (BMP, TIFF, WebP, ...: rare in detection datasets, and without such a marker) is decoded once."""
    with Image.open(path) as im:
        w, h = im.size
        rotated = im.getexif().get(_EXIF_ORIENTATION, 1) in _TRANSPOSED_ORIENTATIONS
        marker = _END_MARKERS.get(im.format or "")
        if marker is None or not _tail_holds(path, marker):
            try:
                im.load()
            except (OSError, SyntaxError, ValueError) as e:
                raise OSError(f"truncated or damaged {im.format} file ({e})") from None
    return h, w, rotated


def displayed_size(probe: tuple[int, int, bool]) -> tuple[int, int]:
    """(height, width) of the image as viewers show it (EXIF rotation applied)."""
    h, w, rotated = probe
    return (w, h) if rotated else (h, w)


def probe_images(paths: list[str]) -> list[tuple[int, int, bool] | Exception]:
    """`probe_image` over many files in threads (file opening dominates); failures are returned, not
    raised, so the caller can count them."""

    def one(p):
        try:
            return probe_image(p)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            return e

    if len(paths) < 32:
        return [one(p) for p in paths]
    with ThreadPoolExecutor(max_workers=min(16, (os.cpu_count() or 1) * 4)) as pool:
        return list(pool.map(one, paths))


def read_rgb(path: str | os.PathLike, *, exif: bool = True) -> np.ndarray:
    """Decode an image file to (H, W, 3) uint8 RGB whatever its mode (L, P, CMYK, RGBA, 16-bit)."""
    try:
        with Image.open(path) as im:
            if exif:
                im = ImageOps.exif_transpose(im)
            return to_rgb(im)
    except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "broken file"
        raise ConfigError(f"{path}: image cannot be decoded ({e}); the file is probably truncated") from e


def to_rgb(im: Image.Image) -> np.ndarray:
    """RGB uint8 array from any PIL mode (1, L, P, LA, RGB, RGBA, CMYK, YCbCr, I;16*, I, F).

    Alpha is dropped rather than composited, as the reference (cv2.imread) does. Greys wider than
    8 bits are scaled, never clipped to white: 16-bit values (I;16, or I up to 65535) by 1/256, wider
    integers by 255/max; float greys (F) in [0, 1] by 255, others as integers."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        a = np.nan_to_num(np.asarray(im).astype(np.float64), nan=0.0, posinf=0.0, neginf=0.0)
        top = float(a.max()) if a.size else 0.0
        if im.mode == "F" and top <= 1.0:
            a = a * 255.0
        elif top > 65535:
            a = a * (255.0 / top)
        elif top > 255:
            a = a / 256.0
        a = np.clip(np.round(a) if im.mode == "F" else a, 0, 255).astype(np.uint8)
        return np.repeat(a[..., None], 3, axis=-1)
    if im.mode == "P":
        im = im.convert("RGBA")  # palette transparency needs RGBA first, else PIL warns
    return np.asarray(im.convert("RGB"), dtype=np.uint8)


def integer_image_ids(paths: Iterable[str | os.PathLike]) -> tuple[int, ...]:
    """COCO-style ids: the file stem when every stem is all digits and no two collide (so detections
    line up with an official COCO json), else the index."""
    paths = list(paths)
    stems = [Path(p).stem for p in paths]
    if stems and all(s.isdigit() for s in stems):
        ids = tuple(int(s) for s in stems)
        if len(set(ids)) == len(ids):
            return ids
    return tuple(range(len(paths)))


# ----------------------------------------------------------------------------------------- the YAML


def read_data_yaml(path: Path) -> dict:
    """The data YAML as a dict (safe_load: a data file must never run code)."""
    cfg = read_document(path, what="data YAML")
    if not isinstance(cfg, dict):
        raise ConfigError(f"{path}: expected a mapping with 'train', 'val' and 'names', got {type(cfg).__name__}")
    return cfg


def class_names(cfg: dict, path: Path) -> tuple[str, ...]:
    """Names from `names` (list or {id: name} with ids 0..n-1) and/or `nc`; they must agree."""
    names, nc = cfg.get("names"), cfg.get("nc")
    if names is None and nc is None:
        raise ConfigError(f"{path}: missing key 'names' (or 'nc'): the class names")
    if nc is not None and (isinstance(nc, bool) or not isinstance(nc, int) or nc < 1):
        raise ConfigError(f"{path}: 'nc' must be a positive integer, got {nc!r}")
    if names is None:
        return tuple(f"class_{i}" for i in range(nc))
    if isinstance(names, dict):
        keys = sorted(names, key=lambda k: (not isinstance(k, int), k))
        if keys != list(range(len(names))):
            raise ConfigError(f"{path}: 'names' dict keys must be 0..{len(names) - 1}, got {keys}")
        names = [names[k] for k in keys]
    if not isinstance(names, list) or not names:
        raise ConfigError(f"{path}: 'names' must be a non-empty list or dict, got {names!r}")
    if nc is not None and nc != len(names):
        raise ConfigError(f"{path}: 'nc' is {nc} but 'names' has {len(names)} entries")
    return tuple(str(n) for n in names)


def dataset_root(cfg: dict, path: Path) -> Path:
    """`path`, relative to the YAML's folder; the YAML's folder when absent. (Ultralytics resolves a
    relative `path` against its global datasets folder; a file-relative root needs no global state.)"""
    root = cfg.get("path")
    if root is None:
        return path.parent
    if not isinstance(root, str):
        raise ConfigError(f"{path}: 'path' must be a string, got {root!r}")
    root = Path(os.path.expanduser(root))
    return root if root.is_absolute() else path.parent / root


def split_sources(cfg: dict, split: str, root: Path, path: Path) -> list[Path]:
    """The split's folders / list files, resolved against the root."""
    value = cfg.get(split)
    if value is None:
        raise ConfigError(f"{path}: missing key '{split}' (the {split} split's images)")
    values = value if isinstance(value, list) else [value]
    if not values or not all(isinstance(v, str) for v in values):
        raise ConfigError(f"{path}: '{split}' must be a path or a list of paths, got {value!r}")
    return [root / os.path.expanduser(v) for v in values]


def list_images(sources: list[Path], split: str, path: Path, report: SkipReport) -> tuple[list[str], bool]:
    """Sorted image files of the split, and whether all sources were folders (only then does a
    label without an image mean something: a list file may name a subset on purpose)."""
    files, folders_only = [], True
    for src in sources:
        if src.is_dir():
            files += [str(p) for p in src.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()]
        elif src.is_file() and src.suffix.lower() == ".txt":
            folders_only = False
            files += _read_image_list(src, report)
        elif src.is_file() and src.suffix.lower() in IMAGE_SUFFIXES:
            folders_only = False  # named images are a chosen subset too
            files.append(str(src))
        else:
            raise ConfigError(f"{path}: the '{split}' images path {src} does not exist")
    files = sorted(set(files))
    if not files:
        raise ConfigError(f"{path}: split '{split}' has no images (looked in {', '.join(map(str, sources))})")
    return files, folders_only


def _read_image_list(list_file: Path, report: SkipReport) -> list[str]:
    """Image paths from a list file; relative lines are relative to the list file's folder."""
    out = []
    for ln, line in enumerate(list_file.read_text().splitlines(), 1):
        line = line.strip()
        if not line:
            continue
        p = Path(os.path.expanduser(line))
        p = p if p.is_absolute() else list_file.parent / p
        if p.is_file():
            out.append(str(p))
        else:
            report.add("listed image missing", f"{list_file}:{ln}: {p}")
    return out


def label_path(image_path: str) -> str:
    """The ultralytics rule: last `/images/` -> `/labels/`, extension -> `.txt`."""
    sa, sb = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    head, sep, tail = image_path.rpartition(sa)
    p = head + sb + tail if sep else image_path
    return os.path.splitext(p)[0] + ".txt"


# ----------------------------------------------------------------------------------------- labels


def parse_label_file(path: str, nc: int, report: SkipReport) -> tuple[np.ndarray, np.ndarray]:
    """(classes (n,) int32, boxes (n, 4) float32 normalised xyxy) of one label file; bad lines are
    skipped and counted, exact duplicate rows removed and counted."""
    try:
        text = Path(path).read_text()
    except (OSError, UnicodeDecodeError) as e:
        report.add("unreadable label file", f"{path}: {e}")
        text = ""
    rows, seen = [], set()
    for ln, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        where = f"{path}:{ln}"
        row = parse_label_line(fields, nc, where, report)
        if row is None:
            continue
        key = tuple(float(f) for f in fields)
        if key in seen:
            report.add("duplicate label row", where)
            continue
        seen.add(key)
        rows.append(row)
    if not rows:
        return np.zeros((0,), np.int32), np.zeros((0, 4), np.float32)
    a = np.asarray(rows, np.float64)
    return a[:, 0].astype(np.int32), a[:, 1:].astype(np.float32)


def parse_label_line(fields: list[str], nc: int, where: str, report: SkipReport):
    """(cls, x1, y1, x2, y2) normalised and clipped to [0, 1], or None (counted) for a bad line."""
    n = len(fields)
    if n != 5 and not (n >= 7 and n % 2 == 1):
        report.add("wrong number of columns", f"{where}: {n} columns, expected 5 (cls cx cy w h)")
        return None
    try:
        v = [float(f) for f in fields]
    except ValueError:
        v = [math.nan]
    if not all(math.isfinite(x) for x in v):
        report.add("not a number", f"{where}: {' '.join(fields)}")
        return None
    c = v[0]
    if c != int(c) or not 0 <= c < nc:
        report.add("class out of range", f"{where}: class {fields[0]} not in 0..{nc - 1}")
        return None
    if n == 5:
        cx, cy, w, h = v[1:]
        if w <= 0 or h <= 0:
            report.add("non-positive box size", f"{where}: w={fields[3]} h={fields[4]}")
            return None
        x1, y1, x2, y2 = cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2
    else:
        xs, ys = v[1::2], v[2::2]
        x1, y1, x2, y2 = min(xs), min(ys), max(xs), max(ys)
    if any(x < -EDGE_TOLERANCE or x > 1 + EDGE_TOLERANCE for x in v[1:]):
        report.add("coordinates outside [0, 1]", f"{where}: {' '.join(fields[1:])}")
        return None
    x1, y1, x2, y2 = (min(max(x, 0.0), 1.0) for x in (x1, y1, x2, y2))
    if x2 <= x1 or y2 <= y1:
        report.add("non-positive box size", f"{where}: empty after clipping to the image")
        return None
    return int(c), x1, y1, x2, y2


# ----------------------------------------------------------------------------------------- dataset


class YoloDataset(DetectionDataset):
    """One split of an ultralytics-style dataset. Label files are parsed and image headers read at
    construction (no pixels decoded), so `labels(i)` and `image_size(i)` are free."""

    def __init__(self, data_yaml: str | os.PathLike, split: str = "train"):
        self.yaml_path = path = Path(data_yaml)
        self.split = split
        self.skipped = SkipReport()
        cfg = read_data_yaml(path)
        self.names = class_names(cfg, path)
        self.category_ids = (COCO80_CATEGORY_IDS if self.names == COCO80_NAMES
                             else tuple(range(len(self.names))))
        sources = split_sources(cfg, split, dataset_root(cfg, path), path)
        files, folders_only = list_images(sources, split, path, self.skipped)
        files = self._drop_unreadable(files)
        if not files:
            raise ConfigError(f"{path}: split '{split}' has no readable images ({self.skipped.summary()})")
        labels = [label_path(f) for f in files]
        self._check_label_folders(labels, files)
        if folders_only:
            self._report_orphan_labels(labels)
        self._files = files
        self._classes, self._boxes = [], []
        for lp in labels:
            cls, box = (parse_label_file(lp, self.num_classes, self.skipped) if os.path.isfile(lp)
                        else (np.zeros((0,), np.int32), np.zeros((0, 4), np.float32)))
            self._classes.append(cls)
            self._boxes.append(box)
        self.image_ids = integer_image_ids(files)
        found = sum(os.path.isfile(lp) for lp in labels)
        log.info("%s[%s]: %d images (%d with label files, %d background), %d boxes; %s", path, split,
                 len(files), found, len(files) - found, sum(len(c) for c in self._classes),
                 self.skipped.summary())

    def _drop_unreadable(self, files: list[str]) -> list[str]:
        """Header-check every image now (cheap), so a broken file is a counted skip rather than a
        crash in the middle of an epoch."""
        kept, self._sizes = [], []
        for f, size in zip(files, probe_images(files)):
            if isinstance(size, Exception):
                self.skipped.add("corrupt image", f"{f}: {size}")
            else:
                kept.append(f)
                self._sizes.append(displayed_size(size))
        return kept

    def _check_label_folders(self, labels: list[str], files: list[str]) -> None:
        folders = sorted({os.path.dirname(lp) for lp in labels})
        if not any(os.path.isdir(d) for d in folders):
            raise ConfigError(f"{self.yaml_path}: labels folder {folders[0]} does not exist (labels of "
                              f"{files[0]} are looked for with the image path's last /images/ -> /labels/)")

    def _report_orphan_labels(self, labels: list[str]) -> None:
        expected = set(labels)
        for d in sorted({os.path.dirname(lp) for lp in labels}):
            if os.path.isdir(d):
                for f in sorted(os.listdir(d)):
                    p = os.path.join(d, f)
                    if f.endswith(".txt") and p not in expected:
                        self.skipped.add("label file without image", p)

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        h, w = self._sizes[i]
        return self._boxes[i] * np.asarray([w, h, w, h], np.float32), self._classes[i]

    def image_size(self, i: int) -> tuple[int, int]:
        return self._sizes[i]

    def image_path(self, i: int) -> str:
        return self._files[i]

    def _load(self, i: int) -> Sample:
        image = read_rgb(self._files[i])
        if image.shape[:2] != tuple(self._sizes[i]):
            raise ConfigError(f"{self._files[i]}: decoded size {image.shape[:2]} differs from its header "
                              f"{self._sizes[i]}")
        boxes, classes = self.labels(i)
        return Sample(image=image, boxes=boxes, classes=classes, image_id=self.image_ids[i], path=self._files[i])
