"""One string names a dataset: `open_dataset(spec, split)` picks the reader.

Accepted forms:
  path/to/data.yaml (or .yml)     ultralytics data YAML -> YoloDataset
  path/to/folder                  a folder holding data.yaml -> YoloDataset; else a folder holding
                                  annotations/instances_<split>.json -> CocoDataset
  path/to/instances_x.json        COCO json -> CocoDataset; images from `images=` or, for
                                  <root>/annotations/instances_<x>.json, the first folder of
                                  <root>/<x>/images, <root>/images/<x>, <root>/<x> that exists
                                  (<x> from the file name, else `split`)
  synthetic                       the generated shapes dataset (jaxyolo.data.synthetic), cached;
  synthetic:key=val,...           options of generate_dataset, e.g. synthetic:num_train=64,img_size=96-160
  tfds:NAME[:VERSION][:SPLIT]     a prepared TFDS dataset of the coco/2017 layout, read from array_record
                                  without TensorFlow (jaxyolo.data.tfds; pip install 'jaxyolo[tfds]'), e.g.
                                  tfds:coco/2017 (split val -> validation); from `data_dir=`, else
                                  $TFDS_DATA_DIR, else ~/tensorflow_datasets
"""

from __future__ import annotations

import re
from pathlib import Path

from jaxyolo.data.coco import CocoDataset
from jaxyolo.data.dataset import DetectionDataset
from jaxyolo.data.synthetic import synthetic_dataset
from jaxyolo.data.yolo import YoloDataset
from jaxyolo.errors import ConfigError

FORMS = ("a data YAML (*.yaml, *.yml)", "a COCO json (*.json, with images= or the <root>/annotations layout)",
         "a folder holding data.yaml or annotations/instances_<split>.json", "synthetic[:key=val,...]",
         "tfds:NAME[:VERSION][:SPLIT]")


def open_dataset(spec: str, split: str = "train", **kw) -> DetectionDataset:
    """The dataset `spec` names (see the module docstring), split `split`. Keywords: `images=` (image
    folder of a COCO json), `root=` (cache folder of a synthetic dataset), `data_dir=` (TFDS data dir)."""
    spec = str(spec)
    unknown = set(kw) - {"images", "root", "data_dir"}
    if unknown:
        raise ConfigError(f"open_dataset: unknown option(s) {sorted(unknown)}; accepted: images, root, data_dir")
    if spec == "synthetic" or spec.startswith("synthetic:"):
        root = synthetic_dataset(kw.get("root"), **parse_options(spec.partition(":")[2]))
        return _coco_split(root, split, spec)
    if spec.startswith("tfds:"):
        from jaxyolo.data.tfds import open_tfds  # TFDS is optional: imported only for tfds: specs

        return open_tfds(spec, split, data_dir=kw.get("data_dir"))
    path = Path(spec).expanduser()
    suffix = path.suffix.lower()
    if suffix in (".yaml", ".yml"):
        return YoloDataset(path, split)
    if suffix == ".json":
        return CocoDataset(path, kw.get("images") or coco_image_dir(path, split))
    if path.is_dir():
        if (path / "data.yaml").is_file():
            return YoloDataset(path / "data.yaml", split)
        if (path / "annotations" / f"instances_{split}.json").is_file():
            return _coco_split(path, split, spec)
        raise ConfigError(f"folder {path} holds neither data.yaml nor annotations/instances_{split}.json")
    raise ConfigError(f"dataset {spec!r} is not a file or folder that exists, nor a known form; accepted: "
                      + "; ".join(FORMS))


def _coco_split(root: Path, split: str, spec: str) -> CocoDataset:
    js = root / "annotations" / f"instances_{split}.json"
    if not js.is_file():
        raise ConfigError(f"dataset {spec!r} has no split {split!r} ({js} does not exist)")
    return CocoDataset(js, coco_image_dir(js, split))


def coco_image_dir(json_path: Path, split: str) -> Path:
    """The image folder of <root>/annotations/instances_<x>.json by the usual layouts."""
    m = re.fullmatch(r"instances_(.+)\.json", json_path.name)
    name = m.group(1) if m else split
    root = json_path.parent.parent if json_path.parent.name == "annotations" else json_path.parent
    candidates = [root / name / "images", root / "images" / name, root / name]
    for c in candidates:
        if c.is_dir():
            return c
    raise ConfigError(f"{json_path}: no image folder found (tried {', '.join(map(str, candidates))}); "
                      f"pass images=<folder>")


def parse_options(text: str) -> dict:
    """`key=val,key=val` -> dict; values are ints, floats, `lo-hi` int ranges (img_size) or strings."""
    out = {}
    for item in filter(None, (s.strip() for s in text.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"synthetic option {item!r} is not key=value")
        out[key.strip()] = _value(value.strip())
    return out


def _value(v: str):
    if re.fullmatch(r"\d+-\d+", v):
        lo, hi = v.split("-")
        return int(lo), int(hi)
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return v
