"""COCO-format datasets: an `instances_*.json` plus the folder its `file_name`s are relative to.

Class indices are the json's category ids in sorted order (`category_ids[c]` maps back), so the
80 COCO categories become the usual 0..79. Boxes become xyxy pixels.

Policy (every skip goes to `self.skipped`, naming the json and annotation id, or the image file):
  malformed json / missing key / wrong type ............ ConfigError naming the file and key
  image folder missing, or every image missing ......... ConfigError naming the folder
  image listed in the json but not on disk ............. skip the image ("image file missing")
  image PIL cannot open, or a JPEG / PNG cut short ... skip the image ("corrupt image")
  json width/height matching neither the file nor
    its EXIF-rotated size .............................. skip the image ("size differs from json")
  iscrowd annotation ................................... not a training target ("crowd annotation")
  w <= 0, h <= 0 or non-finite bbox .................... skip the box ("invalid box")
  box entirely outside the image ....................... skip the box ("box outside image"); partial
                                                         excursions are clipped to the image
  unknown category or image id ......................... skip the box ("unknown category id" /
                                                         "annotation of unknown image")
Images without annotations are kept as background images. EXIF rotation is applied only when the
json's size is the rotated one: COCO's own json measures images as stored.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import numpy as np

from jaxyolo.data.dataset import DetectionDataset, Sample, SkipReport, log
from jaxyolo.data.yolo import displayed_size, probe_images, read_rgb
from jaxyolo.errors import ConfigError
from jaxyolo.files import read_document


def read_coco_json(path: Path) -> dict:
    """The parsed json, with a one-line ConfigError for anything unreadable."""
    data = read_document(path, what="COCO json", fmt="json")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected an object with 'images' and 'categories', got {type(data).__name__}")
    return data


def checked_field(obj, key: str, where: str, path: Path, types: type | tuple):
    """obj[key], checked: the error names the file, the entry and the key."""
    if not isinstance(obj, dict) or key not in obj:
        raise ConfigError(f"{path}: {where} has no '{key}'")
    value = obj[key]
    if not isinstance(value, types) or isinstance(value, bool):
        raise ConfigError(f"{path}: {where}['{key}'] has the wrong type ({type(value).__name__}: {value!r})")
    return value


def _list(data: dict, key: str, path: Path, required: bool = True) -> list:
    if key not in data and not required:
        return []
    return checked_field(data, key, "the top level", path, list)


def parse_categories(data: dict, path: Path) -> tuple[tuple[int, ...], tuple[str, ...]]:
    """(category ids sorted, names in that order)."""
    cats = {}
    for k, c in enumerate(_list(data, "categories", path)):
        cid = checked_field(c, "id", f"categories[{k}]", path, int)
        if cid in cats:
            raise ConfigError(f"{path}: categories[{k}] repeats id {cid}")
        cats[cid] = str(checked_field(c, "name", f"categories[{k}]", path, str))
    if not cats:
        raise ConfigError(f"{path}: 'categories' is empty")
    ids = tuple(sorted(cats))
    return ids, tuple(cats[i] for i in ids)


def parse_images(data: dict, path: Path) -> list[dict]:
    """[{id, file_name, width?, height?}] in json order; repeated ids are an error."""
    out, seen = [], set()
    for k, im in enumerate(_list(data, "images", path)):
        where = f"images[{k}]"
        iid = checked_field(im, "id", where, path, int)
        if iid in seen:
            raise ConfigError(f"{path}: {where} repeats image id {iid}")
        seen.add(iid)
        entry = {"id": iid, "file_name": checked_field(im, "file_name", where, path, str)}
        if "width" in im or "height" in im:
            entry["width"] = int(checked_field(im, "width", where, path, (int, float)))
            entry["height"] = int(checked_field(im, "height", where, path, (int, float)))
        out.append(entry)
    return out


class CocoDataset(DetectionDataset):
    """A COCO json and its image folder. Annotations are parsed and image headers read at
    construction, so `labels(i)` and `image_size(i)` never decode an image."""

    def __init__(self, annotation_json: str | os.PathLike, image_dir: str | os.PathLike):
        self.json_path = path = Path(annotation_json)
        self.image_dir = Path(image_dir)
        self.skipped = SkipReport()
        data = read_coco_json(path)
        self.category_ids, self.names = parse_categories(data, path)
        images = parse_images(data, path)
        if not self.image_dir.is_dir():
            raise ConfigError(f"{path}: image folder {self.image_dir} does not exist")
        listed = {im["id"] for im in images}
        images = self._keep_present(images)
        boxes = self._parse_annotations(data, {im["id"]: im for im in images}, listed)
        self._files = [str(self.image_dir / im["file_name"]) for im in images]
        self._sizes = [(im["height"], im["width"]) for im in images]
        self._exif = [im["exif"] for im in images]
        self._boxes = [np.asarray([b[1:] for b in boxes[im["id"]]], np.float32).reshape(-1, 4) for im in images]
        self._classes = [np.asarray([b[0] for b in boxes[im["id"]]], np.int32) for im in images]
        self.image_ids = tuple(im["id"] for im in images)
        log.info("%s: %d images, %d boxes, %d classes; %s", path, len(images), sum(map(len, self._classes)),
                 len(self.names), self.skipped.summary())

    def _keep_present(self, images: list[dict]) -> list[dict]:
        """Drop (counted) images missing on disk, unreadable, or of another size than the json says."""
        present = []
        for im in images:
            f = self.image_dir / im["file_name"]
            if f.is_file():
                present.append(im)
            else:
                self.skipped.add("image file missing", f"{self.json_path}: image id {im['id']}: {f}")
        if images and not present:
            raise ConfigError(f"{self.json_path}: none of its {len(images)} images is in {self.image_dir} "
                              f"(e.g. {self.image_dir / images[0]['file_name']})")
        files = [str(self.image_dir / im["file_name"]) for im in present]
        kept = []
        for im, f, probe in zip(present, files, probe_images(files)):
            if isinstance(probe, Exception):
                self.skipped.add("corrupt image", f"{f}: {probe}")
                continue
            r, t = probe[:2], displayed_size(probe)
            want = (im.get("height", t[0]), im.get("width", t[1]))
            if want not in (r, t):
                self.skipped.add("size differs from json", f"{f}: file {r[1]}x{r[0]}, json {want[1]}x{want[0]}")
                continue
            kept.append({**im, "height": want[0], "width": want[1], "exif": want != r})
        if not kept:
            raise ConfigError(f"{self.json_path}: no usable images in {self.image_dir} ({self.skipped.summary()})")
        return kept

    def _parse_annotations(self, data: dict, images: dict[int, dict], listed: set[int]) -> dict[int, list]:
        """image id -> [(class, x1, y1, x2, y2)] in pixels, clipped to the image, for the kept images;
        `listed` are all the json's image ids (annotations of skipped images are not counted twice)."""
        index = {cid: c for c, cid in enumerate(self.category_ids)}
        out = {iid: [] for iid in images}
        for k, a in enumerate(_list(data, "annotations", self.json_path, required=False)):
            where = f"annotations[{k}]"
            iid = checked_field(a, "image_id", where, self.json_path, int)
            cid = checked_field(a, "category_id", where, self.json_path, int)
            bbox = checked_field(a, "bbox", where, self.json_path, list)
            name = f"{self.json_path}: annotation id {a.get('id', '?')} ({where})"
            if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
                raise ConfigError(f"{name}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
            if iid not in listed:
                self.skipped.add("annotation of unknown image", f"{name}: image id {iid}")
                continue
            if iid not in images:
                continue  # its image was skipped, and counted, already
            if cid not in index:
                self.skipped.add("unknown category id", f"{name}: category id {cid}")
                continue
            if a.get("iscrowd", 0):
                self.skipped.add("crowd annotation", name)
                continue
            box = self._box(bbox, images[iid], name)
            if box is not None:
                out[iid].append((index[cid], *box))
        return out

    def _box(self, bbox: list, image: dict, name: str):
        x, y, w, h = (float(v) for v in bbox)
        if not all(math.isfinite(v) for v in (x, y, w, h)) or w <= 0 or h <= 0:
            self.skipped.add("invalid box", f"{name}: bbox {bbox}")
            return None
        W, H = image["width"], image["height"]
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, W), min(y + h, H)
        if x2 <= x1 or y2 <= y1:
            self.skipped.add("box outside image", f"{name}: bbox {bbox} in a {W}x{H} image")
            return None
        return x1, y1, x2, y2

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        return self._boxes[i], self._classes[i]

    def image_size(self, i: int) -> tuple[int, int]:
        return self._sizes[i]

    def image_path(self, i: int) -> str:
        return self._files[i]

    def _load(self, i: int) -> Sample:
        image = read_rgb(self._files[i], exif=self._exif[i])
        if image.shape[:2] != tuple(self._sizes[i]):
            raise ConfigError(f"{self._files[i]}: decoded size {image.shape[:2]} differs from its header "
                              f"{self._sizes[i]}")
        return Sample(image=image, boxes=self._boxes[i], classes=self._classes[i], image_id=self.image_ids[i],
                      path=self._files[i])
