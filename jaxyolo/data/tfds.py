"""TFDS datasets read without TensorFlow: COCO-style detection data stored as array_record.

`TfdsDataset(name, split, data_dir)` reads a prepared TFDS dataset through TFDS's NumPy-only data
source (`builder.as_data_source`, the machinery behind `tfds.data_source`), so neither reading nor
`prepare_coco_like` imports TensorFlow. Needs `pip install 'jaxyolo[tfds]'` (tensorflow-datasets and
array_record). The dataset must have been prepared as array_record (`--file_format=array_record`);
TFDS's default tfrecord files cannot be read without TensorFlow (a ConfigError says so).

Features read (those of TFDS's `coco/2017`; other layouts with image + objects/bbox + objects/label,
such as `voc`, take the same path, untested):
  image                 encoded image bytes, decoded here with PIL to uint8 RGB, as stored (no EXIF
                        rotation: TFDS's boxes are normalised to the stored image)
  objects/bbox          tfds BBox, normalised (ymin, xmin, ymax, xmax) -> xyxy pixels of the image
                        (float32 fractions: a box comes back within a float32 ulp, ~1e-5 px)
  objects/label         ClassLabel: its names are the class names, its index the class id
  objects/is_crowd      optional; crowd objects are skipped and counted ("crowd annotation")
  image/id              optional; the COCO image id, else the record index is the image id
  image/filename        optional; named in messages
Category ids (COCO ids for pycocotools): the `category_ids` a dataset written by `prepare_coco_like`
records in its metadata; else the official ids of the 80 COCO classes (`COCO80_CATEGORY_IDS`, 1..90
with gaps: TFDS's `coco/2017` and `coco/2014` label index k is the k-th category of the COCO json,
sorted by id) when the dataset is `coco` with 80 labels or its label names are the 80 COCO names;
else the class index. So detections evaluate against the official COCO json unchanged.

Records are read lazily: `labels(i)`, `image_size(i)` and `image_ids[i]` read record i (without
decoding its pixels) and cache what they parsed, so opening COCO train does not read 18 GB. Skips
(crowd objects, invalid boxes, labels out of range) are counted in `skipped` as records are first
read, in the process that reads them. A dataset pickles without its open files (grain workers
reopen them).

`prepare_coco_like(coco_json, image_dir, data_dir, name=...)` writes a COCO json and its images as
such a dataset (TFDS `GeneratorBasedBuilder`, `file_format='array_record'`; image bytes stored as
they are, so decoded pixels equal those of the original files). TFDS's own `coco/2017` builder
imports TensorFlow, so preparing that one (`tfds build coco/2017 --file_format=array_record`) needs
TensorFlow once; reading it afterwards does not.
"""

from __future__ import annotations

import io
import math
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

from jaxyolo.data.coco import checked_field, parse_categories, parse_images, read_coco_json
from jaxyolo.data.dataset import DetectionDataset, Sample, SkipReport, log
from jaxyolo.data.yolo import COCO80_CATEGORY_IDS, COCO80_NAMES, probe_image, to_rgb
from jaxyolo.errors import ConfigError

INSTALL_HINT = "pip install 'jaxyolo[tfds]'"
DEFAULT_NAME = "jaxyolo_coco_like"
DATA_DIR_ENV = "TFDS_DATA_DIR"
_VERSION = re.compile(r"\d+\.\d+\.\d+")
_NAME = re.compile(r"[a-z][a-z0-9_]*")
_SPLIT_ALIASES = {"val": ("validation", "valid"), "validation": ("val", "valid"), "valid": ("validation", "val")}


def import_tfds():
    """`tensorflow_datasets`, or a ConfigError saying what to install."""
    try:
        import array_record  # noqa: F401 - the array_record reader TFDS's data sources use
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ConfigError(f"TFDS datasets need tensorflow-datasets and array_record (not TensorFlow): "
                          f"{INSTALL_HINT} ({e})") from e
    return tfds


def default_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """`data_dir`, else $TFDS_DATA_DIR, else TFDS's default ~/tensorflow_datasets."""
    d = data_dir or os.environ.get(DATA_DIR_ENV) or "~/tensorflow_datasets"
    return Path(d).expanduser()


def parse_spec(spec: str) -> tuple[str, str | None, str | None]:
    """`tfds:NAME[:VERSION][:SPLIT]` -> (NAME, VERSION, SPLIT); NAME may hold a config (`coco/2017`),
    SPLIT TFDS slicing (`train[:10%]`)."""
    m = re.fullmatch(r"tfds:([^:\[\]]+?)(?::(\d+\.\d+\.\d+))?(?::(.+))?", spec.strip())
    if not m:
        raise ConfigError(f"dataset {spec!r}: expected tfds:NAME[:VERSION][:SPLIT], e.g. tfds:coco/2017 or "
                          f"tfds:coco/2017:validation")
    return m.group(1).strip("/"), m.group(2), m.group(3)


def open_tfds(spec: str, split: str = "train", data_dir: str | os.PathLike | None = None) -> TfdsDataset:
    """The dataset a `tfds:NAME[:VERSION][:SPLIT]` spec names; a SPLIT in the spec wins over `split`."""
    name, version, spec_split = parse_spec(spec)
    return TfdsDataset(name, spec_split or split, data_dir, version=version)


def _prepare_hint(name: str, data_dir: Path) -> str:
    if name.split("/")[0] == "coco":
        return (f"prepare it once with `tfds build {name} --data_dir={data_dir} --file_format=array_record` "
                f"(TFDS's coco builder needs TensorFlow and downloads about 25 GB; reading it does not)")
    return (f"write a COCO json and its images with jaxyolo.data.tfds.prepare_coco_like(json, image_dir, "
            f"'{data_dir}', name='{name}'), or build a TFDS catalog dataset with `tfds build {name} "
            f"--data_dir={data_dir} --file_format=array_record`")


def _versions(folder: Path) -> list[Path]:
    """Prepared version folders (x.y.z holding dataset_info.json) under `folder`."""
    if not folder.is_dir():
        return []
    return [d for d in folder.iterdir() if _VERSION.fullmatch(d.name) and (d / "dataset_info.json").is_file()]


def find_builder_dir(name: str, data_dir: Path, version: str | None = None) -> Path:
    """data_dir/NAME/VERSION (the newest prepared version when `version` is None), or a ConfigError
    saying where it looked and how to prepare the dataset."""
    base = data_dir / name
    where = f"tfds:{name}" + (f":{version}" if version else "")
    if version:
        if (base / version / "dataset_info.json").is_file():
            return base / version
        found = sorted(d.name for d in _versions(base))
        raise ConfigError(f"{where}: version {version} is not prepared in {data_dir} (no {base / version}/"
                          f"dataset_info.json; prepared versions: {', '.join(found) or 'none'}); "
                          + _prepare_hint(name, data_dir))
    found = _versions(base)
    if found:
        return max(found, key=lambda d: tuple(int(v) for v in d.name.split(".")))
    configs = sorted(d.name for d in base.iterdir() if d.is_dir() and _versions(d)) if base.is_dir() else []
    if configs:
        raise ConfigError(f"{where}: {base} holds configs {', '.join(configs)}; name one, e.g. "
                          f"tfds:{name}/{configs[0]}")
    incomplete = base.is_dir() and any(d.name.startswith("incomplete") for d in base.iterdir())
    raise ConfigError(f"{where} is not prepared in {data_dir} (looked for {base}/<version>/dataset_info.json"
                      + ("; found only an unfinished preparation" if incomplete else "")
                      + f"; the data_dir is data_dir=, else ${DATA_DIR_ENV}, else ~/tensorflow_datasets); "
                      + _prepare_hint(name, data_dir))


class _Meta(NamedTuple):
    image_id: int
    size: tuple[int, int]  # (height, width) of the stored image
    boxes: np.ndarray  # (M, 4) float32 xyxy pixels
    classes: np.ndarray  # (M,) int32
    where: str


class _LazyImageIds(Sequence):
    """`image_ids` of a TfdsDataset: element i reads record i once (cached)."""

    def __init__(self, dataset: TfdsDataset):
        self._dataset = dataset

    def __len__(self) -> int:
        return self._dataset._len

    def __getitem__(self, i):
        if isinstance(i, slice):
            return tuple(self[j] for j in range(*i.indices(len(self))))
        n = len(self)
        if not -n <= i < n:
            raise IndexError(i)
        return self._dataset._meta(int(i) % n).image_id

    def __repr__(self) -> str:
        return f"<image ids of {self._dataset.spec}: {len(self)} records, read lazily>"


class TfdsDataset(DetectionDataset):
    """A prepared TFDS detection dataset (COCO-style features, see the module docstring), read from
    array_record files without TensorFlow."""

    def __init__(self, name: str, split: str = "train", data_dir: str | os.PathLike | None = None, *,
                 version: str | None = None):
        tfds = import_tfds()
        self.name = name.strip("/")
        self.data_dir = default_data_dir(data_dir)
        self.builder_dir = find_builder_dir(self.name, self.data_dir, version)
        builder = tfds.builder_from_directory(self.builder_dir)
        self.spec = f"tfds:{self.name}:{self.builder_dir.name}"
        features = builder.info.features
        self._objects = self._check_features(features)
        label = features[self._objects]["label"]
        self.names = tuple(str(n) for n in label.names)
        self.category_ids = self._category_ids(builder)
        self.split = self._resolve_split(split, builder)
        self._has_id = "image/id" in features
        self._has_filename = "image/filename" in features
        self._source = None
        self._cache: dict[int, _Meta] = {}
        self._lock = threading.Lock()
        self.skipped = SkipReport()
        self._len = len(self._data_source())
        if self._len == 0:
            raise ConfigError(f"{self.spec}: split {self.split!r} has no examples ({self.builder_dir})")
        self.image_ids = _LazyImageIds(self) if self._has_id else tuple(range(self._len))
        log.info("%s split %s: %d records, %d classes (labels read lazily)", self.spec, self.split, self._len,
                 len(self.names))

    # ---------------------------------------------------------------------------------- opening

    def _check_features(self, features) -> str:
        """The key of the objects Sequence, after checking the features this reader needs."""
        have = sorted(features.keys())
        objects = "objects" if "objects" in features else None
        need = "image, objects/bbox, objects/label (and optionally objects/is_crowd, image/id, image/filename)"
        if "image" not in features or objects is None:
            raise ConfigError(f"{self.spec}: not a detection dataset of the coco/2017 layout ({self.builder_dir}"
                              f"/features.json has {', '.join(have)}; needs {need})")
        inner = features[objects]
        present = set(inner.keys())
        for key in ("bbox", "label"):
            if key not in present:
                raise ConfigError(f"{self.spec}: feature objects/{key} missing ({self.builder_dir}/features.json; "
                                  f"needs {need})")
        if not hasattr(inner["label"], "names"):
            raise ConfigError(f"{self.spec}: objects/label is not a ClassLabel ({self.builder_dir}/features.json)")
        return objects

    def _category_ids(self, builder) -> tuple[int, ...]:
        nc = len(self.names)
        recorded = (builder.info.metadata or {}).get("category_ids")
        if recorded is not None:
            if len(recorded) != nc or not all(isinstance(c, int) for c in recorded):
                raise ConfigError(f"{self.spec}: {self.builder_dir}/metadata.json: 'category_ids' must be {nc} "
                                  f"integers (one per label), got {recorded!r}")
            return tuple(int(c) for c in recorded)
        if self.names == COCO80_NAMES or (builder.info.name == "coco" and nc == len(COCO80_CATEGORY_IDS)):
            return COCO80_CATEGORY_IDS
        return tuple(range(nc))

    def _resolve_split(self, split: str, builder) -> str:
        splits = list(builder.info.splits)
        base, bracket, rest = str(split).partition("[")
        if base in splits:
            return str(split)
        for alias in _SPLIT_ALIASES.get(base, ()):
            if alias in splits:
                return alias + bracket + rest
        raise ConfigError(f"{self.spec}: no split {split!r}; its splits: {', '.join(splits)} "
                          f"({self.builder_dir}/dataset_info.json)")

    def _data_source(self):
        if self._source is None:
            tfds = import_tfds()
            builder = tfds.builder_from_directory(self.builder_dir)
            try:
                self._source = builder.as_data_source(split=self.split,
                                                      decoders={"image": tfds.decode.SkipDecoding()})
            except NotImplementedError as e:
                raise ConfigError(
                    f"{self.spec}: prepared as {getattr(builder.info.file_format, 'value', builder.info.file_format)} "
                    f"({self.builder_dir}); reading without "
                    f"TensorFlow needs a random-access format: prepare it again with --file_format=array_record"
                    f" (or convert it with `tfds convert_format --out_file_format=array_record`, which needs "
                    f"TensorFlow)") from e
            except ValueError as e:
                raise ConfigError(f"{self.spec}: cannot open split {self.split!r}: {e}") from e
        return self._source

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_source"] = None
        state.pop("_lock", None)
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # ---------------------------------------------------------------------------------- records

    def _record(self, i: int) -> dict:
        try:
            return self._data_source()[i]
        except ConfigError:
            raise
        except Exception as e:  # array_record / proto errors: name the record
            raise ConfigError(f"{self.spec} {self.split}[{i}] ({self.builder_dir}): record unreadable: {e}") from e

    def _meta(self, i: int, record: dict | None = None) -> _Meta:
        meta = self._cache.get(i)
        if meta is not None:
            return meta
        meta, skips = self._parse(i, self._record(i) if record is None else record)
        with self._lock:
            if i not in self._cache:
                self._cache[i] = meta
                for reason, where in skips:
                    self.skipped.add(reason, where)
        return self._cache[i]

    def _parse(self, i: int, rec: dict) -> tuple[_Meta, list]:
        where = f"{self.spec} {self.split}[{i}]"
        if self._has_filename:
            fn = rec["image/filename"]
            where += f" ({fn.decode(errors='replace') if isinstance(fn, bytes) else fn})"
        image_id = int(rec["image/id"]) if self._has_id else i
        h, w = self._header_size(rec["image"], where)
        objs = rec[self._objects]
        bbox = np.asarray(objs["bbox"], np.float64).reshape(-1, 4)
        label = np.asarray(objs["label"], np.int64).reshape(-1)
        crowd = np.asarray(objs.get("is_crowd", np.zeros(len(label), bool)), bool).reshape(-1)
        ids = objs.get("id")
        skips, kept_boxes, kept_classes = [], [], []
        nc = len(self.names)
        for k in range(len(label)):
            what = f"{where}: object {k}" + (f" (annotation id {int(ids[k])})" if ids is not None else "")
            if crowd[k]:
                skips.append(("crowd annotation", what))
                continue
            if not 0 <= label[k] < nc:
                skips.append(("class out of range", f"{what}: label {int(label[k])}, {nc} classes"))
                continue
            ymin, xmin, ymax, xmax = bbox[k]
            x1, y1, x2, y2 = xmin * w, ymin * h, xmax * w, ymax * h
            if not all(math.isfinite(v) for v in (x1, y1, x2, y2)) or x2 <= x1 or y2 <= y1:
                skips.append(("invalid box", f"{what}: bbox (ymin, xmin, ymax, xmax) {bbox[k].tolist()}"))
                continue
            x1, y1, x2, y2 = max(x1, 0.0), max(y1, 0.0), min(x2, w), min(y2, h)
            if x2 <= x1 or y2 <= y1:
                skips.append(("box outside image", f"{what}: bbox {bbox[k].tolist()} in a {w}x{h} image"))
                continue
            kept_boxes.append((x1, y1, x2, y2))
            kept_classes.append(int(label[k]))
        meta = _Meta(image_id, (h, w), np.asarray(kept_boxes, np.float32).reshape(-1, 4),
                     np.asarray(kept_classes, np.int32), where)
        return meta, skips

    @staticmethod
    def _header_size(data: bytes, where: str) -> tuple[int, int]:
        try:
            with Image.open(io.BytesIO(data)) as im:
                w, h = im.size
                return h, w
        except (OSError, SyntaxError, ValueError) as e:
            raise ConfigError(f"{where}: image cannot be decoded ({e})") from e

    @staticmethod
    def _decode(data: bytes, where: str) -> np.ndarray:
        try:
            with Image.open(io.BytesIO(data)) as im:
                return to_rgb(im)
        except (OSError, SyntaxError, ValueError) as e:  # PIL's ways of saying "broken file"
            raise ConfigError(f"{where}: image cannot be decoded ({e}); the stored bytes are probably truncated"
                              ) from e

    # ---------------------------------------------------------------------------------- interface

    def __len__(self) -> int:
        return self._len

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        m = self._meta(int(i))
        return m.boxes, m.classes

    def image_size(self, i: int) -> tuple[int, int]:
        return self._meta(int(i)).size

    def _load(self, i: int) -> Sample:
        rec = self._record(i)
        meta = self._meta(i, rec)
        image = self._decode(rec["image"], meta.where)
        if image.shape[:2] != meta.size:
            raise ConfigError(f"{meta.where}: decoded size {image.shape[:2]} differs from its header {meta.size}")
        return Sample(image=image, boxes=meta.boxes, classes=meta.classes, image_id=meta.image_id, path=meta.where)


# ------------------------------------------------------------------------------------------ writing


def coco_features(tfds, names: Sequence[str], encoding_format: str | None = "jpeg"):
    """The features of TFDS's `coco/2017` (objects: id, area, bbox, label, is_crowd)."""
    return tfds.features.FeaturesDict({
        "image": tfds.features.Image(encoding_format=encoding_format),
        "image/filename": tfds.features.Text(),
        "image/id": np.int64,
        "objects": tfds.features.Sequence({
            "id": np.int64,
            "area": np.int64,
            "bbox": tfds.features.BBoxFeature(),
            "label": tfds.features.ClassLabel(names=list(names)),
            "is_crowd": np.bool_,
        }),
    })


def _coco_examples(tfds, json_path: Path, image_dir: Path, skipped: SkipReport):
    """(category ids, names, [(key, example)]) of one COCO json, as TFDS's coco builder makes them:
    images sorted by id, boxes normalised by the stored image size, crowd objects kept (flagged)."""
    data = read_coco_json(json_path)
    cat_ids, names = parse_categories(data, json_path)
    index = {cid: c for c, cid in enumerate(cat_ids)}
    images = {im["id"]: im for im in parse_images(data, json_path)}
    anns: dict[int, list] = {iid: [] for iid in images}
    for k, a in enumerate(data.get("annotations", [])):
        where = f"annotations[{k}]"
        iid = checked_field(a, "image_id", where, json_path, int)
        cid = checked_field(a, "category_id", where, json_path, int)
        bbox = checked_field(a, "bbox", where, json_path, list)
        name = f"{json_path}: annotation id {a.get('id', '?')} ({where})"
        if len(bbox) != 4 or not all(isinstance(v, (int, float)) for v in bbox):
            raise ConfigError(f"{name}: 'bbox' must be 4 numbers [x, y, w, h], got {bbox!r}")
        if iid not in anns:
            skipped.add("annotation of unknown image", f"{name}: image id {iid}")
        elif cid not in index:
            skipped.add("unknown category id", f"{name}: category id {cid}")
        else:
            anns[iid].append((k, a))
    if not image_dir.is_dir():
        raise ConfigError(f"{json_path}: image folder {image_dir} does not exist")
    examples = []
    for iid in sorted(images):
        im = images[iid]
        path = image_dir / im["file_name"]
        if not path.is_file():
            skipped.add("image file missing", f"{json_path}: image id {iid}: {path}")
            continue
        try:
            h, w, _ = probe_image(path)
        except Exception as e:  # noqa: BLE001 - PIL raises many types for broken files
            skipped.add("corrupt image", f"{path}: {e}")
            continue
        if (im.get("height", h), im.get("width", w)) != (h, w):
            skipped.add("size differs from json", f"{path}: file {w}x{h}, json {im['width']}x{im['height']}")
            continue
        objects = []
        for k, a in anns[iid]:
            x, y, bw, bh = (float(v) for v in a["bbox"])
            name = f"{json_path}: annotation id {a.get('id', '?')} (annotations[{k}])"
            if not all(math.isfinite(v) for v in (x, y, bw, bh)) or bw <= 0 or bh <= 0:
                skipped.add("invalid box", f"{name}: bbox {a['bbox']}")
                continue
            x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + bw, w), min(y + bh, h)
            if x2 <= x1 or y2 <= y1:
                skipped.add("box outside image", f"{name}: bbox {a['bbox']} in a {w}x{h} image")
                continue
            objects.append({
                "id": int(a.get("id", k)),
                "area": round(float(a.get("area", bw * bh))),
                "bbox": tfds.features.BBox(ymin=y1 / h, xmin=x1 / w, ymax=y2 / h, xmax=x2 / w),
                "label": index[a["category_id"]],
                "is_crowd": bool(a.get("iscrowd", 0)),
            })
        examples.append((iid, {"image": str(path), "image/filename": im["file_name"], "image/id": iid,
                               "objects": objects}))
    if not examples:
        raise ConfigError(f"{json_path}: no usable images in {image_dir} ({skipped.summary()})")
    return cat_ids, names, examples


def prepare_coco_like(coco_json: str | os.PathLike | Mapping[str, str | os.PathLike],
                      image_dir: str | os.PathLike | Mapping[str, str | os.PathLike],
                      data_dir: str | os.PathLike | None = None, *, name: str = DEFAULT_NAME, split: str = "train",
                      version: str = "1.0.0", overwrite: bool = False) -> Path:
    """Write COCO-format data as the TFDS array_record dataset `name` (features of `coco/2017`) in
    `data_dir` (else $TFDS_DATA_DIR, else ~/tensorflow_datasets), without TensorFlow. One split
    `split` from `coco_json` and `image_dir`, or several: {split: json} and {split: image folder}.
    The json's category ids are kept in the dataset's metadata (TfdsDataset's `category_ids`).
    Skips follow the CocoDataset policy and are logged. Returns the version folder written; it is
    read back with TfdsDataset(name, split, data_dir) or open_dataset('tfds:NAME', split)."""
    tfds = import_tfds()
    if not _NAME.fullmatch(name):
        raise ConfigError(f"prepare_coco_like: name {name!r} must be snake_case ([a-z][a-z0-9_]*), as TFDS names are")
    if not _VERSION.fullmatch(version):
        raise ConfigError(f"prepare_coco_like: version {version!r} must be x.y.z")
    jsons = dict(coco_json) if isinstance(coco_json, Mapping) else {split: coco_json}
    dirs = dict(image_dir) if isinstance(image_dir, Mapping) else {s: image_dir for s in jsons}
    if set(jsons) != set(dirs):
        raise ConfigError(f"prepare_coco_like: splits of coco_json {sorted(jsons)} and image_dir {sorted(dirs)} differ")
    data_dir = default_data_dir(data_dir)
    out = data_dir / name / version
    if out.exists():
        if not overwrite:
            raise ConfigError(f"prepare_coco_like: {out} exists already; pass overwrite=True to replace it")
        shutil.rmtree(out)

    skipped = SkipReport()
    splits, categories = {}, None
    for s, js in jsons.items():
        cat_ids, names, examples = _coco_examples(tfds, Path(js), Path(dirs[s]), skipped)
        if categories is None:
            categories = (cat_ids, names, Path(js))
        elif (cat_ids, names) != categories[:2]:
            raise ConfigError(f"prepare_coco_like: {js} has other categories than {categories[2]}; all splits "
                              f"must share them")
        splits[s] = examples
    cat_ids, names, _ = categories
    jpeg = all(Path(ex["image"]).suffix.lower() in (".jpg", ".jpeg") for exs in splits.values() for _, ex in exs)
    features = coco_features(tfds, names, "jpeg" if jpeg else None)

    class CocoLike(tfds.core.GeneratorBasedBuilder, skip_registration=True):
        VERSION = tfds.core.Version(version)
        # No code folder (checksums file): TFDS would look it up through `importlib_resources`, which
        # tensorflow-datasets 4.9.10 uses on Python >= 3.9 without requiring it (tensorflow/datasets#11212).
        code_path = None

        def _info(self):
            return tfds.core.DatasetInfo(
                builder=self, features=features,
                description=f"COCO-format data written by jaxyolo.data.tfds.prepare_coco_like from "
                            f"{', '.join(f'{k}: {v}' for k, v in jsons.items())}",
                metadata=tfds.core.MetadataDict(category_ids=list(cat_ids), source="jaxyolo.prepare_coco_like"))

        def _split_generators(self, dl_manager):
            return {s: self._generate_examples(ex) for s, ex in splits.items()}

        def _generate_examples(self, examples):
            yield from examples

    CocoLike.name = name
    with tempfile.TemporaryDirectory(prefix="jaxyolo-tfds-") as downloads:
        builder = CocoLike(data_dir=str(data_dir), file_format="array_record")
        builder.download_and_prepare(download_dir=downloads)
    log.info("prepared %s: %s; %s", out, ", ".join(f"{s} {len(e)} images" for s, e in splits.items()),
             skipped.summary())
    return out
