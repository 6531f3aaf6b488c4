"""Host pipeline: letterbox / mosaic geometry by hand, box padding, grain batching determinism."""

from __future__ import annotations

import numpy as np
import pytest

from jaxyolo.data.dataset import DetectionDataset, Sample, SkipReport
from jaxyolo.data.loader import (
    PAD_VALUE,
    ResizedCache,
    eval_batches,
    letterbox,
    load_resized,
    mosaic4,
    pad_boxes,
    train_batches,
    unletterbox_boxes,
)


class MemDataset(DetectionDataset):
    """Images and labels held in memory; counts `_load` calls (in this process)."""

    def __init__(self, images, boxes, classes):
        self.images, self.boxes, self.classes = list(images), list(boxes), list(classes)
        self.names, self.category_ids = ("a", "b", "c"), (1, 2, 3)
        self.image_ids = tuple(range(1000, 1000 + len(self.images)))
        self.skipped = SkipReport()
        self.loads = 0

    def _load(self, i: int) -> Sample:
        self.loads += 1
        return Sample(self.images[i], np.float32(self.boxes[i]).reshape(-1, 4), np.int32(self.classes[i]),
                      self.image_ids[i], f"mem:{i}")


def random_dataset(n: int, seed: int = 0, max_side: int = 96, nboxes: int = 3) -> MemDataset:
    rng = np.random.default_rng(seed)
    images, boxes, classes = [], [], []
    for _ in range(n):
        h, w = rng.integers(24, max_side + 1, 2)
        images.append(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))
        xy = rng.uniform(0, [w - 8, h - 8], (nboxes, 2))
        wh = rng.uniform(4, 8, (nboxes, 2))
        boxes.append(np.concatenate([xy, xy + wh], 1))
        classes.append(rng.integers(0, 3, nboxes))
    return MemDataset(images, boxes, classes)


def const(h, w, v=7):
    return np.full((h, w, 3), v, np.uint8)


def all_batches(batches):
    return [dict(b) for b in batches]


def assert_same(a, b):
    assert len(a) == len(b)
    for x, y in zip(a, b):
        assert x.keys() == y.keys()
        for k in x:
            np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------------------------- pure functions


def test_letterbox_hand_computed():
    # 30 high, 50 wide into 64: r = 64/50 = 1.28, resized to 64 x round(38.4) = 38, dh = 26 -> 13 / 13
    out, ratio, (dw, dh) = letterbox(const(30, 50), 64)
    assert out.shape == (64, 64, 3) and ratio == (1.28, 1.28) and (dw, dh) == (0, 13)
    assert (out[:13] == PAD_VALUE).all() and (out[13:51] == 7).all() and (out[51:] == PAD_VALUE).all()
    # odd pad: 35 x 50 -> 45 x 64, dh = 9.5 -> top round(9.4) = 9, bottom round(9.6) = 10
    out, _, (dw, dh) = letterbox(const(35, 50), 64)
    assert (dw, dh) == (0, 9.5)
    assert (out[:9] == PAD_VALUE).all() and (out[9:54] == 7).all() and (out[54:] == PAD_VALUE).all()
    # no upscaling: 30 x 50 stays, pads 7 left/right and 17 top/bottom
    out, ratio, (dw, dh) = letterbox(const(30, 50), 64, scaleup=False)
    assert ratio == (1.0, 1.0) and (dw, dh) == (7, 17)
    assert (out[17:47, 7:57] == 7).all() and (out[:17] == PAD_VALUE).all() and (out[:, :7] == PAD_VALUE).all()


def test_load_resized_long_side_and_boxes():
    s = Sample(const(30, 50), np.float32([[5, 3, 25, 15]]), np.int32([1]), 0, "x")
    img, boxes = load_resized(s, 64, augment=False)
    assert img.shape == (38, 64, 3)  # floor(30 * 64 / 50) = 38
    np.testing.assert_allclose(boxes, [[5 * 1.28, 3 * 38 / 30, 25 * 1.28, 15 * 38 / 30]], rtol=1e-6)
    img, _ = load_resized(Sample(const(96, 40), s.boxes, s.classes, 0, "x"), 64, augment=True)
    assert img.shape == (64, 26, 3)  # floor(40 * 64 / 96) = 26
    img, boxes = load_resized(Sample(const(64, 20), s.boxes, s.classes, 0, "x"), 64, augment=True)
    assert img.shape == (64, 20, 3) and (boxes == s.boxes).all()  # long side already s: untouched


def test_rejects_non_rgb_uint8():
    with pytest.raises(ValueError, match="uint8 RGB"):
        load_resized(Sample(np.zeros((8, 8), np.uint8), np.zeros((0, 4)), np.zeros(0), 0, "grey"), 16, False)
    with pytest.raises(ValueError, match="uint8 RGB"):
        letterbox(np.zeros((8, 8, 3), np.float32), 16)


def test_mosaic_placement_by_hand():
    s = 64
    rng = np.random.default_rng(0)
    shapes = [(48, 64), (64, 32), (64, 64), (64, 64)]  # long side = s: no resize, exact pixels
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in shapes]
    boxes = [
        [[30, 10, 50, 20], [0, 0, 10, 10]],  # 2nd falls left of the canvas -> empty -> dropped
        [[2, 4, 12, 30]],
        [[20, 50, 60, 63]],  # crosses the canvas bottom -> clipped
        [[10, 10, 20, 20]],
    ]
    ds = MemDataset(images, boxes, [[0, 1], [2], [1], [0]])
    canvas, b, c = mosaic4(ds, 0, s, rng, centre=(40, 70), indices=[1, 2, 3])
    assert canvas.shape == (128, 128, 3) and canvas.dtype == np.uint8
    # top-left: a = [0:40, 22:70], b = [24:64, 0:48] (x, y ranges)
    np.testing.assert_array_equal(canvas[22:70, 0:40], images[0][0:48, 24:64])
    # top-right: a = [40:72, 6:70], b = whole image 1
    np.testing.assert_array_equal(canvas[6:70, 40:72], images[1])
    # bottom-left: a = [0:40, 70:128], b = [24:64, 0:58]
    np.testing.assert_array_equal(canvas[70:128, 0:40], images[2][0:58, 24:64])
    # bottom-right: a = [40:104, 70:128], b = [0:64, 0:58]
    np.testing.assert_array_equal(canvas[70:128, 40:104], images[3][0:58, 0:64])
    for empty in (canvas[:22, :40], canvas[:6, 40:], canvas[6:70, 72:], canvas[70:, 104:]):
        assert (empty == PAD_VALUE).all()
    # boxes shifted by (padw, padh) = (-24, 22), (40, 6), (-24, 70), (40, 70), clipped to [0, 128]
    np.testing.assert_array_equal(b, [[6, 32, 26, 42], [42, 10, 52, 36], [0, 120, 36, 128], [50, 80, 60, 90]])
    np.testing.assert_array_equal(c, [0, 2, 1, 0])


def test_mosaic_random_centre_and_partners_follow_rng():
    ds = random_dataset(6)
    a = mosaic4(ds, 2, 64, np.random.default_rng(5))
    b = mosaic4(ds, 2, 64, np.random.default_rng(5))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)
    canvas, boxes, _ = a
    assert canvas.shape == (128, 128, 3)
    assert (boxes >= 0).all() and (boxes <= 128).all()
    assert ((boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])).all()


def test_pad_boxes_keeps_largest_and_counts_overflow():
    boxes = np.float32([[0, 0, 2, 2], [0, 0, 5, 5], [0, 0, 1, 1], [0, 0, 4, 4], [0, 0, 3, 3]])
    b, c, m, over = pad_boxes(boxes, np.arange(5), 3)
    assert over == 2 and m.all()
    np.testing.assert_array_equal(c, [1, 3, 4])  # the three largest, original order
    np.testing.assert_array_equal(b, boxes[[1, 3, 4]])
    b, c, m, over = pad_boxes(boxes[:2], [1, 2], 4)
    assert over == 0 and m.tolist() == [True, True, False, False]
    assert b.shape == (4, 4) and b.dtype == np.float32 and c.dtype == np.int32 and (b[2:] == 0).all()
    _, _, m, over = pad_boxes(np.zeros((0, 4)), np.zeros(0), 2)
    assert over == 0 and not m.any()


# ------------------------------------------------------------------------------- batching


def test_train_batch_keys_shapes_and_boxes():
    ds = random_dataset(5)
    batches = train_batches(ds, img_size=64, batch_size=2, max_boxes=4, mosaic_max_boxes=6, seed=3, epoch=0,
                            num_threads=0)
    assert len(batches) == 2 and batches.num_batches == 2
    out = all_batches(batches)
    assert len(out) == 2
    expect = {"image": ((2, 64, 64, 3), np.uint8), "boxes": ((2, 4, 4), np.float32), "classes": ((2, 4), np.int32),
              "mask": ((2, 4), bool), "overflow": ((2,), np.int32), "index": ((2,), np.int32),
              "mosaic": ((2, 128, 128, 3), np.uint8), "mosaic_boxes": ((2, 6, 4), np.float32),
              "mosaic_classes": ((2, 6), np.int32), "mosaic_mask": ((2, 6), bool), "mosaic_overflow": ((2,), np.int32)}
    for b in out:
        assert {k: (v.shape, v.dtype) for k, v in b.items()} == expect
    # the single image and its boxes are load_resized + letterbox of the sample
    i = int(out[0]["index"][0])
    img, boxes = load_resized(ds[i], 64, augment=True)
    lb, (r, _), (dw, dh) = letterbox(img, 64)
    left, top = round(dw - 0.1), round(dh - 0.1)
    np.testing.assert_array_equal(out[0]["image"][0], lb)
    np.testing.assert_allclose(out[0]["boxes"][0][:3], boxes * r + [left, top, left, top], rtol=1e-6)
    assert out[0]["mask"][0].tolist() == [True] * 3 + [False]
    # mosaic off: no canvases built, no mosaic keys
    off = next(iter(train_batches(ds, img_size=64, batch_size=2, seed=3, epoch=0, mosaic=False, num_threads=0)))
    assert not any(k.startswith("mosaic") for k in off)
    np.testing.assert_array_equal(off["image"], out[0]["image"])


def test_overflow_is_counted_not_silent():
    ds = random_dataset(4, nboxes=5)
    batches = train_batches(ds, img_size=64, batch_size=2, max_boxes=3, seed=0, epoch=0, num_threads=0)
    out = all_batches(batches)
    assert sum(int(b["overflow"].sum()) for b in out) == 4 * 2 == batches.overflow["image"]
    assert batches.overflow["mosaic"] == sum(int(b["mosaic_overflow"].sum()) for b in out) > 0


def test_epoch_is_permutation_deterministic_per_seed_and_epoch():
    ds = random_dataset(7)
    kw = {"img_size": 64, "batch_size": 3, "max_boxes": 4, "num_threads": 0}
    a = all_batches(train_batches(ds, seed=1, epoch=0, drop_remainder=False, **kw))
    assert sorted(np.concatenate([b["index"] for b in a]).tolist()) == list(range(7))
    assert [len(b["index"]) for b in a] == [3, 3, 1]
    assert_same(a, all_batches(train_batches(ds, seed=1, epoch=0, drop_remainder=False, num_threads=0,
                                             img_size=64, batch_size=3, max_boxes=4)))
    e1 = all_batches(train_batches(ds, seed=1, epoch=1, **kw))
    assert len(e1) == 2  # drop_remainder
    assert np.concatenate([b["index"] for b in e1]).tolist() != np.concatenate([b["index"] for b in a[:2]]).tolist()


def test_resume_with_start_batch_skips_without_loading():
    ds = random_dataset(10)
    kw = {"img_size": 64, "batch_size": 2, "max_boxes": 4, "seed": 4, "epoch": 2, "num_threads": 0}
    full = all_batches(train_batches(ds, **kw))
    resumed = train_batches(ds, start_batch=3, **kw)
    assert len(resumed) == 2 and resumed.num_batches == 5
    assert_same(all_batches(resumed), full[3:])
    ds.loads = 0
    all_batches(train_batches(ds, start_batch=3, mosaic=False, **kw))
    assert ds.loads == 4  # only the 2 remaining batches of 2 samples were decoded
    with pytest.raises(ValueError):
        train_batches(ds, start_batch=6, **kw)


def test_worker_and_thread_count_do_not_change_batches():
    ds = random_dataset(10)
    kw = {"img_size": 64, "batch_size": 2, "max_boxes": 4, "seed": 7, "epoch": 1}
    ref = all_batches(train_batches(ds, num_workers=0, num_threads=0, **kw))
    assert_same(ref, all_batches(train_batches(ds, num_workers=0, num_threads=3, **kw)))
    assert_same(ref, all_batches(train_batches(ds, num_workers=2, num_threads=1, **kw)))


def test_resized_cache_serves_the_same_batches_and_decodes_each_image_once():
    ds = random_dataset(10)
    kw = {"img_size": 64, "batch_size": 2, "max_boxes": 4, "seed": 3, "num_threads": 0}
    ref = [all_batches(train_batches(ds, epoch=e, **kw)) for e in (0, 1)]
    cache = ResizedCache(ds, 64, max_bytes=1 << 30)
    ds.loads = 0
    for e in (0, 1):
        assert_same(ref[e], all_batches(train_batches(ds, epoch=e, cache=cache, **kw)))
    # every image decoded at most once over both epochs (a mosaic reads 5 per sample without it)
    assert ds.loads == len(cache) <= 10
    threaded = ResizedCache(ds, 64, max_bytes=1 << 30)  # loader threads share one cache
    assert_same(ref[1], all_batches(train_batches(ds, epoch=1, cache=threaded, **{**kw, "num_threads": 3})))
    img = cache.get(0)[0]
    assert not img.flags.writeable and max(img.shape[:2]) == 64
    with pytest.raises(ValueError, match="cache"):
        train_batches(ds, epoch=0, cache=ResizedCache(ds, 32, 1 << 30), **kw)


def test_resized_cache_keeps_to_its_budget():
    ds = random_dataset(10)
    one = load_resized(ds[0], 64, augment=True)[0].nbytes
    cache = ResizedCache(ds, 64, max_bytes=3 * one)
    kw = {"img_size": 64, "batch_size": 2, "max_boxes": 4, "seed": 3, "epoch": 0, "num_threads": 0}
    assert_same(all_batches(train_batches(ds, **kw)), all_batches(train_batches(ds, cache=cache, **kw)))
    assert 0 < cache.nbytes <= 3 * one and len(cache) < 10


def test_eval_batches_pad_last_batch_and_map_back():
    ds = random_dataset(5)
    batches = eval_batches(ds, img_size=64, batch_size=2, num_threads=0)
    out = all_batches(batches)
    assert len(batches) == len(out) == 3
    assert all(b["image"].shape == (2, 64, 64, 3) and b["image"].dtype == np.uint8 for b in out)
    assert np.concatenate([b["index"] for b in out]).tolist() == [0, 1, 2, 3, 4, -1]
    assert np.concatenate([b["valid"] for b in out]).tolist() == [True] * 5 + [False]
    assert out[2]["image_id"].tolist() == [1004, -1] and (out[2]["image"][1] == PAD_VALUE).all()
    for b in out:
        for j in np.flatnonzero(b["valid"]):
            i = int(b["index"][j])
            h0, w0 = ds.images[i].shape[:2]
            assert b["orig_shape"][j].tolist() == [h0, w0]
            gx, gy, px, py = b["ratio_pad"][j]
            gt = np.float32(ds.boxes[i])
            fwd = gt * [gx, gy, gx, gy] + [px, py, px, py]
            np.testing.assert_allclose(unletterbox_boxes(fwd, b["ratio_pad"][j], (h0, w0)), gt, atol=1e-4)
            # the image content sits inside the pad offsets
            img, _ = load_resized(ds[i], 64, augment=False)
            h, w = img.shape[:2]
            np.testing.assert_array_equal(b["image"][j][int(py):int(py) + h, int(px):int(px) + w], img)
