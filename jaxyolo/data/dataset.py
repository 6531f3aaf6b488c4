"""The one interface every dataset source implements.

A dataset is an indexable collection of `Sample`s plus the facts the evaluator needs (class
names, COCO category ids, image ids). Sources (YOLO txt folders, COCO json, TFDS array_record,
the synthetic generator) differ only in how they find files and parse labels; everything after
`__getitem__` (letterbox, mosaic, batching, augmentation) is shared.

Conventions (ARCHITECTURE.md): images are uint8 RGB (H, W, 3) on the host; boxes are xyxy in
pixels of that image; class ids are 0..nc-1. COCO category ids appear only at the pycocotools
boundary (`category_ids[c]`).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
from collections import Counter
from typing import Sequence

import numpy as np

log = logging.getLogger("jaxyolo.data")


@dataclasses.dataclass(frozen=True)
class Sample:
    image: np.ndarray  # (H, W, 3) uint8 RGB
    boxes: np.ndarray  # (M, 4) float32 xyxy pixels
    classes: np.ndarray  # (M,) int32 in [0, nc)
    image_id: int  # the id used in COCO-format ground truth and detections
    path: str  # where the image came from (for messages)


@dataclasses.dataclass
class SkipReport:
    """Counted, logged skips: a dataset never silently drops data."""

    counts: Counter = dataclasses.field(default_factory=Counter)
    examples: dict = dataclasses.field(default_factory=dict)  # reason -> first few "file:line: detail"

    def add(self, reason: str, where: str) -> None:
        self.counts[reason] += 1
        ex = self.examples.setdefault(reason, [])
        if len(ex) < 3:
            ex.append(where)
        if self.counts[reason] <= 3:
            log.warning("skipped (%s): %s", reason, where)

    def summary(self) -> str:
        if not self.counts:
            return "nothing skipped"
        return "; ".join(f"{n} × {r} (e.g. {self.examples[r][0]})" for r, n in sorted(self.counts.items()))


class DetectionDataset:
    """Base class. Subclasses fill `names`, `category_ids`, `image_ids` and implement `_load`."""

    names: tuple[str, ...]
    category_ids: tuple[int, ...]  # class index -> COCO category id
    image_ids: tuple[int, ...]
    skipped: SkipReport

    @property
    def num_classes(self) -> int:
        return len(self.names)

    def __len__(self) -> int:
        return len(self.image_ids)

    def __getitem__(self, i: int) -> Sample:
        if not 0 <= i < len(self):
            raise IndexError(i)
        return self._load(int(i))

    def _load(self, i: int) -> Sample:  # pragma: no cover - interface
        raise NotImplementedError

    def labels(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(boxes, classes) of sample i without decoding its image (subclasses may override)."""
        s = self[i]
        return s.boxes, s.classes

    def image_size(self, i: int) -> tuple[int, int]:
        """(height, width) of sample i (subclasses may override to avoid decoding)."""
        return tuple(self[i].image.shape[:2])

    def coco_ground_truth(self) -> dict:
        """The dataset as a COCO-format ground-truth dict for pycocotools.

        Built once per dataset object (it reads every label and image size) and handed out as a
        copy, because pycocotools writes into the annotations it is given."""
        cached = self.__dict__.get("_coco_ground_truth")
        if cached is None:
            cached = self.__dict__["_coco_ground_truth"] = self._build_coco_ground_truth()
        return copy.deepcopy(cached)

    def _build_coco_ground_truth(self) -> dict:
        images, annotations = [], []
        for i, image_id in enumerate(self.image_ids):
            h, w = self.image_size(i)
            images.append({"id": int(image_id), "height": int(h), "width": int(w)})
            boxes, classes = self.labels(i)
            for b, c in zip(np.asarray(boxes, np.float64), np.asarray(classes)):
                bw, bh = b[2] - b[0], b[3] - b[1]
                annotations.append({
                    "id": len(annotations) + 1, "image_id": int(image_id),
                    "category_id": int(self.category_ids[int(c)]),
                    "bbox": [float(b[0]), float(b[1]), float(bw), float(bh)],
                    "area": float(bw * bh), "iscrowd": 0,
                })
        categories = [{"id": int(cid), "name": n} for cid, n in zip(self.category_ids, self.names)]
        return {"images": images, "annotations": annotations, "categories": categories}


class Subset(DetectionDataset):
    """A view of some indices of another dataset (multi-fidelity search, quick tests)."""

    def __init__(self, base: DetectionDataset, indices: Sequence[int]):
        self.base = base
        self.indices = tuple(int(i) for i in indices)
        self.names, self.category_ids = base.names, base.category_ids
        self.image_ids = tuple(base.image_ids[i] for i in self.indices)
        self.skipped = base.skipped

    def _load(self, i: int) -> Sample:
        return self.base[self.indices[i]]

    def labels(self, i: int):
        return self.base.labels(self.indices[i])

    def image_size(self, i: int):
        return self.base.image_size(self.indices[i])
