"""Host input pipeline: resize, letterbox, 4-image mosaic, fixed-size boxes, grain batching.

The host does only the geometric assembly that needs variable-size images; everything random that
a hyper-parameter search may change (affine, HSV, flips, mixup) runs on device per population
member (`jaxyolo.augment`). So every training batch carries BOTH

- ``mosaic``: the 2s×2s four-image canvas of yolov5's ``load_mosaic`` (before ``random_perspective``,
  which the device applies with ``border = -s/2``), and
- ``image``: the single image as in yolov5's non-mosaic branch (``load_image`` + square
  ``letterbox`` to s×s),

and the device picks one per member from that member's ``mosaic`` probability.

Reference (docs/reference.md §9/§11; yolov5 / YOLOR ``utils/datasets.py``): ``load_image``, ``load_mosaic``,
``letterbox``. Deviations, all deliberate:

- Resizing uses PIL, not OpenCV. Shrinking for evaluation (``augment=False``) uses ``Image.BOX``
  (area averaging, the equivalent of ``cv2.INTER_AREA``); every other resize uses
  ``Image.BILINEAR``. Enlarging with PIL bilinear matches ``cv2.INTER_LINEAR`` up to rounding;
  shrinking with PIL bilinear is anti-aliased (its kernel widens with the scale) whereas
  ``cv2.INTER_LINEAR`` samples only 2×2 neighbours, so training images are slightly smoother
  than the reference's.
- ``load_resized`` computes the short side as ``floor(short * s / long)`` in integers (the
  reference's ``int(w0 * r)`` in floats, which can land one pixel short on the long side too).
- Labels of a letterboxed image are shifted by the integer offsets actually used to place the
  pixels (``round(dw - 0.1)``, ``round(dh - 0.1)``); the reference shifts them by the float half
  pad ``dw``, ``dh`` (up to 0.5 px off from the pixels when the pad is odd). Evaluation's
  ``ratio_pad`` likewise holds the exact per-axis gain and integer offsets (the reference's
  ``scale_coords`` uses one gain, ``h/h0``, for both axes and the float half pad).
- Mosaic boxes that become empty (zero width or height) after clipping to [0, 2s] are dropped:
  they lie wholly outside the canvas (the reference keeps them until ``box_candidates`` removes
  them after the affine, which it always does unless the affine rotates).
- Boxes are padded to a fixed count with a mask. If a sample has more boxes than fit, the largest
  (by area) are kept and the number dropped is reported per sample (``overflow`` /
  ``mosaic_overflow`` in the batch), totalled on the iterator (`Batches.overflow`) and logged —
  never dropped silently. The reference has no such limit.
- Evaluation uses a square s×s letterbox (long side = s, no up-scaling) instead of the
  reference's aspect-ratio-sorted rect batches (whose canvas long side is s + 32 with a
  half-stride grey border); rect batches may come later.

Randomness: an epoch's order is a permutation drawn from (seed, epoch); a sample's mosaic centre
and partner images come from a generator seeded with (seed, epoch, dataset index). So a batch
depends only on (seed, epoch, batch number), never on the number of worker processes or threads,
and ``start_batch`` resumes exactly without decoding the skipped samples.
"""

from __future__ import annotations

import logging
import math
import threading
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from PIL import Image

from jaxyolo.data.dataset import DetectionDataset, Sample

log = logging.getLogger("jaxyolo.data")

PAD_VALUE = 114  # grey border / mosaic fill, as in the reference
_TAG_ORDER, _TAG_SAMPLE = 0x5EED0, 0x5EED1  # keep the two random streams apart


# ----------------------------------------------------------------------------------------------
# pure numpy pieces


def _check_image(img: np.ndarray, where: str = "") -> None:
    if img.dtype != np.uint8 or img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"expected a (H, W, 3) uint8 RGB image{where}, got {img.dtype} {img.shape}")


def _resize(img: np.ndarray, w: int, h: int, resample: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), resample=resample))


def load_resized(sample: Sample, size: int, augment: bool) -> tuple[np.ndarray, np.ndarray]:
    """yolov5 ``load_image``: resize so the long side is ``size`` (up or down), keeping the aspect.

    Returns (image (h, w, 3) uint8, boxes (M, 4) float32 xyxy scaled by (w/w0, h/h0)). Shrinking
    without augmentation uses area averaging (BOX), everything else bilinear (module docstring).
    """
    img = sample.image
    _check_image(img, f" ({sample.path})")
    h0, w0 = img.shape[:2]
    long = max(h0, w0)
    boxes = np.asarray(sample.boxes, np.float32).reshape(-1, 4)
    if long == size:
        return img, boxes.copy()
    if w0 >= h0:
        w, h = size, max(1, h0 * size // w0)
    else:
        w, h = max(1, w0 * size // h0), size
    resample = Image.BOX if (size < long and not augment) else Image.BILINEAR
    out = _resize(img, w, h, resample)
    scale = np.array([w / w0, h / h0, w / w0, h / h0], np.float32)
    return out, boxes * scale


def letterbox(
    img: np.ndarray,
    new_shape: int | tuple[int, int] = 640,
    color: int = PAD_VALUE,
    auto: bool = False,
    scaleup: bool = True,
    stride: int = 32,
) -> tuple[np.ndarray, tuple[float, float], tuple[float, float]]:
    """yolov5 ``letterbox``: scale to fit ``new_shape`` (h, w), pad evenly with ``color``.

    Returns (image, (r, r), (dw, dh)) with dw, dh the float half pads; the image sits at
    ``letterbox_offsets(dw, dh)`` = (round(dw - 0.1), round(dh - 0.1)). ``auto`` pads only to a
    multiple of ``stride``.
    """
    _check_image(img)
    if isinstance(new_shape, int):
        new_shape = (new_shape, new_shape)
    h, w = img.shape[:2]
    r = min(new_shape[0] / h, new_shape[1] / w)
    if not scaleup:
        r = min(r, 1.0)
    new_w, new_h = round(w * r), round(h * r)
    dw, dh = new_shape[1] - new_w, new_shape[0] - new_h
    if auto:
        dw, dh = dw % stride, dh % stride
    dw, dh = dw / 2, dh / 2
    if (w, h) != (new_w, new_h):
        img = _resize(img, new_w, new_h, Image.BILINEAR)
    top, bottom = round(dh - 0.1), round(dh + 0.1)
    left, right = round(dw - 0.1), round(dw + 0.1)
    out = np.full((new_h + top + bottom, new_w + left + right, 3), color, np.uint8)
    out[top:top + new_h, left:left + new_w] = img
    return out, (r, r), (dw, dh)


def letterbox_offsets(dw: float, dh: float) -> tuple[int, int]:
    """(left, top) pixel offsets at which `letterbox` placed the image."""
    return round(dw - 0.1), round(dh - 0.1)


def mosaic4(
    dataset: DetectionDataset,
    index: int,
    size: int,
    rng: np.random.Generator,
    *,
    centre: tuple[int, int] | None = None,
    indices: Sequence[int] | None = None,
    first: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
    load: Callable[[int], tuple[np.ndarray, np.ndarray, np.ndarray]] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """yolov5 ``load_mosaic`` without its final ``random_perspective``.

    A (2s, 2s, 3) uint8 canvas filled with 114; centre ``(xc, yc)`` each ``int(uniform(s/2, 3s/2))``
    (``yc`` drawn first, as the reference); images ``index`` and three uniformly drawn indices
    (resized by `load_resized` with ``augment=True``) placed top-left, top-right, bottom-left,
    bottom-right of the centre. Boxes shifted by (padw, padh), clipped to [0, 2s], empty ones
    dropped. ``centre`` (xc, yc) / ``indices`` (the 3 partners) override the draws (tests);
    ``first`` = (image, boxes, classes) reuses an already resized image ``index``; ``load(k)``
    gives image k's (resized image, boxes, classes) (default: `load_resized` of ``dataset[k]``,
    e.g. a `ResizedCache`'s ``get``).

    Returns (canvas, boxes (N, 4) float32 xyxy, classes (N,) int32).
    """
    s = int(size)
    if centre is None:
        yc = int(rng.uniform(s / 2, 3 * s / 2))
        xc = int(rng.uniform(s / 2, 3 * s / 2))
    else:
        xc, yc = (int(v) for v in centre)
    if indices is None:
        indices = rng.integers(0, len(dataset), 3)
    all_indices = [int(index), *(int(i) for i in indices)]
    canvas = np.full((2 * s, 2 * s, 3), PAD_VALUE, np.uint8)
    out_boxes, out_classes = [], []
    for i, k in enumerate(all_indices):
        if i == 0 and first is not None:
            img, boxes, classes = first
        elif load is not None:
            img, boxes, classes = load(k)
        else:
            sample = dataset[k]
            img, boxes = load_resized(sample, s, augment=True)
            classes = sample.classes
        h, w = img.shape[:2]
        if i == 0:  # top left
            x1a, y1a, x2a, y2a = max(xc - w, 0), max(yc - h, 0), xc, yc
            x1b, y1b, x2b, y2b = w - (x2a - x1a), h - (y2a - y1a), w, h
        elif i == 1:  # top right
            x1a, y1a, x2a, y2a = xc, max(yc - h, 0), min(xc + w, 2 * s), yc
            x1b, y1b, x2b, y2b = 0, h - (y2a - y1a), min(w, x2a - x1a), h
        elif i == 2:  # bottom left
            x1a, y1a, x2a, y2a = max(xc - w, 0), yc, xc, min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = w - (x2a - x1a), 0, w, min(y2a - y1a, h)
        else:  # bottom right
            x1a, y1a, x2a, y2a = xc, yc, min(xc + w, 2 * s), min(2 * s, yc + h)
            x1b, y1b, x2b, y2b = 0, 0, min(w, x2a - x1a), min(y2a - y1a, h)
        canvas[y1a:y2a, x1a:x2a] = img[y1b:y2b, x1b:x2b]
        padw, padh = x1a - x1b, y1a - y1b
        out_boxes.append(np.asarray(boxes, np.float32).reshape(-1, 4) + np.float32([padw, padh, padw, padh]))
        out_classes.append(np.asarray(classes, np.int32).reshape(-1))
    boxes = np.clip(np.concatenate(out_boxes), 0, 2 * s)
    classes = np.concatenate(out_classes)
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    return canvas, boxes[keep], classes[keep]


def pad_boxes(
    boxes: np.ndarray, classes: np.ndarray, max_boxes: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Pad to ``max_boxes`` rows: (boxes (M, 4) f32, classes (M,) i32, mask (M,) bool, overflow).

    With more than ``max_boxes`` boxes the largest by area are kept (in their original order) and
    ``overflow`` says how many were dropped; the caller must count or report it.
    """
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    classes = np.asarray(classes, np.int32).reshape(-1)
    n = len(boxes)
    overflow = max(0, n - max_boxes)
    if overflow:
        area = (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])
        keep = np.sort(np.argsort(-area, kind="stable")[:max_boxes])
        boxes, classes, n = boxes[keep], classes[keep], max_boxes
    out_b = np.zeros((max_boxes, 4), np.float32)
    out_c = np.zeros((max_boxes,), np.int32)
    mask = np.zeros((max_boxes,), bool)
    out_b[:n], out_c[:n], mask[:n] = boxes, classes, True
    return out_b, out_c, mask, overflow


def unletterbox_boxes(boxes: np.ndarray, ratio_pad: np.ndarray, orig_shape: Sequence[int]) -> np.ndarray:
    """Map xyxy boxes of an `eval_batches` image back to its original pixels (and clip there).

    ``ratio_pad`` = (gain_x, gain_y, pad_x, pad_y) and ``orig_shape`` = (h0, w0) of that image.
    """
    gx, gy, px, py = (float(v) for v in ratio_pad)
    b = np.asarray(boxes, np.float32).copy()
    b[..., [0, 2]] = (b[..., [0, 2]] - px) / gx
    b[..., [1, 3]] = (b[..., [1, 3]] - py) / gy
    h0, w0 = int(orig_shape[0]), int(orig_shape[1])
    b[..., [0, 2]] = b[..., [0, 2]].clip(0, w0)
    b[..., [1, 3]] = b[..., [1, 3]].clip(0, h0)
    return b


# ----------------------------------------------------------------------------------------------
# per-sample transforms (top-level classes: they are pickled into grain's worker processes)

_overflow_warnings = 0


def _warn_overflow(kind: str, index: int, n: int, max_boxes: int) -> None:
    global _overflow_warnings
    _overflow_warnings += 1
    if _overflow_warnings <= 3:
        log.warning("%s of sample %d has %d boxes more than max_boxes=%d; kept the largest",
                    kind, index, n, max_boxes)


def sample_rng(seed: int, epoch: int, index: int) -> np.random.Generator:
    """The generator of one training sample (mosaic centre and partners)."""
    return np.random.default_rng([_TAG_SAMPLE, int(seed), int(epoch), int(index)])


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The dataset indices of one epoch, in order: a permutation drawn from (seed, epoch)."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([_TAG_ORDER, int(seed), int(epoch)]).permutation(n)


class ResizedCache:
    """The training images decoded and resized (`load_resized`, augment=True) once per run and kept
    in memory, up to ``max_bytes`` of pixels; images past the budget are read from their files as
    before. A mosaic reads 5 images per sample, so without it a 1000-image epoch decodes and
    resizes 5000 images on the CPU that trains. Shared by the epochs of a run and the threads of
    a loader (a loader process keeps its own copy). The arrays are read-only: the batch builders
    copy out of them."""

    def __init__(self, dataset: DetectionDataset, size: int, max_bytes: int):
        self.dataset, self.size, self.max_bytes = dataset, int(size), int(max_bytes)
        self.nbytes = 0
        self._items: dict[int, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._items)

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(resized image (h, w, 3) uint8, boxes (M, 4) xyxy in its pixels, classes (M,))."""
        index = int(index)
        item = self._items.get(index)
        if item is not None:
            return item
        sample = self.dataset[index]
        img, boxes = load_resized(sample, self.size, augment=True)
        item = (img, boxes, np.asarray(sample.classes))
        for a in item:
            a.setflags(write=False)
        with self._lock:
            if index not in self._items and self.nbytes + img.nbytes <= self.max_bytes:
                self._items[index] = item
                self.nbytes += img.nbytes
        return item


class _TrainSample:
    def __init__(self, dataset, size, max_boxes, mosaic_max_boxes, seed, epoch, mosaic, cache=None):
        self.dataset, self.size, self.max_boxes = dataset, size, max_boxes
        self.mosaic_max_boxes, self.seed, self.epoch, self.mosaic = mosaic_max_boxes, seed, epoch, mosaic
        self.cache = cache

    def _load(self, index):
        if self.cache is not None:
            return self.cache.get(index)
        sample = self.dataset[index]
        img, boxes = load_resized(sample, self.size, augment=True)
        return img, boxes, sample.classes

    def __call__(self, index) -> dict:
        index = int(index)
        s = self.size
        img, boxes, classes = self._load(index)
        lb, (r, _), (dw, dh) = letterbox(img, s, auto=False, scaleup=True)
        left, top = letterbox_offsets(dw, dh)
        lb_boxes = boxes * np.float32(r) + np.float32([left, top, left, top])
        b, c, m, over = pad_boxes(lb_boxes, classes, self.max_boxes)
        if over:
            _warn_overflow("image", index, over, self.max_boxes)
        out = {"image": lb, "boxes": b, "classes": c, "mask": m, "overflow": np.int32(over),
               "index": np.int32(index)}
        if self.mosaic:
            canvas, mb, mc = mosaic4(self.dataset, index, s, sample_rng(self.seed, self.epoch, index),
                                     first=(img, boxes, classes), load=self._load)
            mb, mc, mm, mover = pad_boxes(mb, mc, self.mosaic_max_boxes)
            if mover:
                _warn_overflow("mosaic", index, mover, self.mosaic_max_boxes)
            out.update(mosaic=canvas, mosaic_boxes=mb, mosaic_classes=mc, mosaic_mask=mm,
                       mosaic_overflow=np.int32(mover))
        return out


class _EvalSample:
    def __init__(self, dataset, size):
        self.dataset, self.size = dataset, size

    def __call__(self, index) -> dict:
        index, s = int(index), self.size
        if index < 0:  # padding of the last batch
            return {"image": np.full((s, s, 3), PAD_VALUE, np.uint8), "index": np.int32(-1),
                    "image_id": np.int64(-1), "ratio_pad": np.float32([1, 1, 0, 0]),
                    "orig_shape": np.int32([s, s]), "valid": np.bool_(False)}
        sample = self.dataset[index]
        h0, w0 = sample.image.shape[:2]
        img, _ = load_resized(sample, s, augment=False)
        h, w = img.shape[:2]
        lb, (r, _), (dw, dh) = letterbox(img, s, auto=False, scaleup=False)
        left, top = letterbox_offsets(dw, dh)
        return {"image": lb, "index": np.int32(index), "image_id": np.int64(self.dataset.image_ids[index]),
                "ratio_pad": np.float32([w / w0 * r, h / h0 * r, left, top]),
                "orig_shape": np.int32([h0, w0]), "valid": np.bool_(True)}


# ----------------------------------------------------------------------------------------------
# batching with grain


class Batches:
    """An iterable of batches (dicts of numpy arrays) with a length, re-iterable.

    ``len(batches)`` is the number of batches one iteration yields (``num_batches - start_batch``),
    ``num_batches`` the batches of a whole epoch. ``overflow`` totals the boxes dropped by
    `pad_boxes` in what the current (or last) iteration has yielded (keys ``overflow`` /
    ``mosaic_overflow``); the first drop is logged as a warning.
    """

    def __init__(self, indices: list[int], transform: Callable, *, batch_size: int, drop_remainder: bool,
                 num_batches: int, start_batch: int, num_workers: int, num_threads: int):
        self._indices, self._transform = indices, transform
        self.batch_size, self.drop_remainder = batch_size, drop_remainder
        self.num_batches, self.start_batch = num_batches, start_batch
        self.num_workers, self.num_threads = num_workers, num_threads
        self.overflow = {"image": 0, "mosaic": 0}

    def __len__(self) -> int:
        return self.num_batches - self.start_batch

    def dataset(self):
        """The grain pipeline (an ``IterDataset``) behind this iterable."""
        import grain.python as gp

        ds = gp.MapDataset.source(self._indices[self.start_batch * self.batch_size:])
        ds = ds.map(self._transform).batch(self.batch_size, drop_remainder=self.drop_remainder)
        ds = ds.to_iter_dataset(gp.ReadOptions(num_threads=self.num_threads,
                                               prefetch_buffer_size=max(2, 2 * self.num_threads)))
        if self.num_workers > 0:
            _absl_flags_parsed()
            ds = ds.mp_prefetch(gp.MultiprocessingOptions(num_workers=self.num_workers))
        return ds

    def __iter__(self) -> Iterator[dict]:
        self.overflow = {"image": 0, "mosaic": 0}
        it = iter(self.dataset())
        try:
            for batch in it:
                if self.num_workers > 0:
                    # grain hands worker output over in shared memory; copy it into ordinary arrays so
                    # the segments are released now, not whenever (or after shutdown) a batch dies.
                    # A "leaked shared_memory objects" warning at interpreter exit remains: it is
                    # grain's own and harmless (google/grain#398; /dev/shm is left clean).
                    batch = {k: np.array(v) for k, v in batch.items()}
                for key, kind in (("overflow", "image"), ("mosaic_overflow", "mosaic")):
                    if key in batch:
                        n = int(batch[key].sum())
                        if n and not self.overflow[kind]:
                            log.warning("%s boxes beyond max_boxes dropped (largest kept); "
                                        "counted in Batches.overflow", kind)
                        self.overflow[kind] += n
                yield batch
        finally:
            close = getattr(it, "close", None)
            if close is not None:
                close()


def _absl_flags_parsed() -> None:
    """grain's mp_prefetch reads an absl flag, which raises in programs that never parse absl flags
    once JAX is imported (google/grain#1355, fixed upstream by #1361/#1362); mark them parsed (with
    their defaults) there, as the issue suggests. Programs run through ``absl.app`` are unaffected."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def _batch_rows(indices: list[int], batch_size: int, num_batches: int, rows: slice | None):
    """(indices, batch size) of the batches cut to `rows` of each (unchanged for None or all)."""
    if rows is None or rows == slice(0, batch_size):
        return indices, batch_size
    cut = [i for b in range(num_batches) for i in indices[b * batch_size:(b + 1) * batch_size][rows]]
    return cut, len(range(batch_size)[rows])


def _num_batches(n: int, batch_size: int, drop_remainder: bool) -> int:
    return n // batch_size if drop_remainder else math.ceil(n / batch_size)


def train_batches(
    dataset: DetectionDataset,
    *,
    img_size: int,
    batch_size: int,
    max_boxes: int = 100,
    seed: int,
    epoch: int,
    mosaic: bool = True,
    mosaic_max_boxes: int | None = None,
    start_batch: int = 0,
    num_workers: int = 0,
    num_threads: int = 2,
    shuffle: bool = True,
    drop_remainder: bool = True,
    cache: ResizedCache | None = None,
    rows: slice | None = None,
) -> Batches:
    """One epoch of training batches, a dict of numpy arrays each (s = ``img_size``, B, M):

    ======================  ==============  =====================================================
    ``image``               (B, s, s, 3) u8 single image, ``load_resized`` + square letterbox
    ``boxes``               (B, M, 4) f32   xyxy pixels of ``image``, M = ``max_boxes``
    ``classes``             (B, M) i32
    ``mask``                (B, M) bool     real boxes
    ``overflow``            (B,) i32        boxes dropped by `pad_boxes` (largest kept)
    ``index``               (B,) i32        dataset index
    ``mosaic``              (B, 2s, 2s, 3)  four-image canvas (only with ``mosaic=True``)
    ``mosaic_boxes``        (B, Mm, 4) f32  Mm = ``mosaic_max_boxes`` (default ``max_boxes``)
    ``mosaic_classes``      (B, Mm) i32
    ``mosaic_mask``         (B, Mm) bool
    ``mosaic_overflow``     (B,) i32
    ======================  ==============  =====================================================

    ``mosaic=False`` (e.g. when every population member's mosaic probability is 0) skips building
    the canvases — about four times less host work — and the ``mosaic*`` keys are absent.
    The batches depend only on (seed, epoch) — not on ``num_workers`` (grain processes, each
    building whole batches) or ``num_threads`` (grain threads per process). ``start_batch`` skips
    that many batches without loading them (exact resume). ``cache`` (a `ResizedCache` of this
    dataset at ``img_size``, kept by the caller across epochs) serves the resized images; the
    batches are the same with or without it. ``rows`` (a slice of ``range(batch_size)``) builds
    those rows of every batch only: a process's part of a global batch, the same rows as in the
    whole batch.
    """
    n = len(dataset)
    if cache is not None and (cache.dataset is not dataset or cache.size != int(img_size)):
        raise ValueError(f"cache: built for another dataset or size ({cache.size}), not this one at {img_size}")
    if n == 0:
        raise ValueError("empty dataset")
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got {seed}, {epoch}")
    if batch_size < 1 or max_boxes < 1:
        raise ValueError(f"batch_size and max_boxes must be >= 1, got {batch_size}, {max_boxes}")
    num_batches = _num_batches(n, batch_size, drop_remainder)
    if not 0 <= start_batch <= num_batches:
        raise ValueError(f"start_batch {start_batch} outside [0, {num_batches}]")
    transform = _TrainSample(dataset, int(img_size), int(max_boxes), int(mosaic_max_boxes or max_boxes),
                             int(seed), int(epoch), bool(mosaic), cache)
    indices = [int(i) for i in epoch_order(n, seed, epoch, shuffle)[: num_batches * batch_size]]
    if rows is not None and not drop_remainder:
        raise ValueError("rows: needs whole batches (drop_remainder=True)")
    indices, batch_size = _batch_rows(indices, batch_size, num_batches, rows)
    return Batches(indices, transform, batch_size=batch_size, drop_remainder=drop_remainder,
                   num_batches=num_batches, start_batch=start_batch, num_workers=num_workers,
                   num_threads=num_threads)


def eval_batches(
    dataset: DetectionDataset,
    *,
    img_size: int,
    batch_size: int,
    num_workers: int = 0,
    num_threads: int = 2,
    rows: slice | None = None,
) -> Batches:
    """Evaluation batches in dataset order, every batch full (one shape for jit):

    ==============  ==============  ===============================================================
    ``image``       (B, s, s, 3) u8 long side resized to s (area shrink), square letterbox, no upscale
    ``index``       (B,) i32        dataset index, -1 for padding
    ``image_id``    (B,) i64        ``dataset.image_ids[index]``, -1 for padding
    ``ratio_pad``   (B, 4) f32      (gain_x, gain_y, pad_x, pad_y): x0 = (x - pad_x) / gain_x
    ``orig_shape``  (B, 2) i32      (h0, w0)
    ``valid``       (B,) bool       False for the entries padding the last batch
    ==============  ==============  ===============================================================

    See `unletterbox_boxes`. Square letterbox instead of the reference's rect batches (module doc).
    ``rows`` builds only those rows of every batch (a process's part), as `train_batches`.
    """
    n = len(dataset)
    if n == 0 or batch_size < 1:
        raise ValueError(f"need a non-empty dataset and batch_size >= 1, got {n} samples, batch {batch_size}")
    num_batches = math.ceil(n / batch_size)
    indices = list(range(n)) + [-1] * (num_batches * batch_size - n)
    indices, batch_size = _batch_rows(indices, batch_size, num_batches, rows)
    return Batches(indices, _EvalSample(dataset, int(img_size)), batch_size=batch_size, drop_remainder=True,
                   num_batches=num_batches, start_batch=0, num_workers=num_workers, num_threads=num_threads)
