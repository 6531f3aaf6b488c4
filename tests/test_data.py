"""Dataset readers (YOLO txt, COCO json), the synthetic generator and `open_dataset`: every bad
input is either a ConfigError naming the file/key/path or a counted skip naming file:line."""

from __future__ import annotations

import json
import math
import pickle
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from jaxyolo.data.coco import CocoDataset
from jaxyolo.data.sources import open_dataset
from jaxyolo.data.synthetic import generate_dataset, make_sample, synthetic_dataset, synthetic_image
from jaxyolo.data.yolo import COCO80_CATEGORY_IDS, YoloDataset, read_rgb, to_rgb
from jaxyolo.errors import ConfigError

COCO128 = Path(__file__).resolve().parents[2] / "shared" / "data" / "coco128"
SYN = {"num_train": 10, "num_val": 4, "img_size": (48, 96), "seed": 3, "num_classes": 5, "max_objects": 6}
SAMPLE_KW = {k: v for k, v in SYN.items() if k not in ("num_train", "num_val")}  # make_sample's options

_COLOURS = {"RGB": (200, 30, 30), "L": 128, "CMYK": (0, 200, 200, 0), "RGBA": (200, 30, 30, 0), "P": 3}


def _image(path: Path, size=(40, 20), mode="RGB", **save) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, _COLOURS[mode]).save(path, **save)
    return path


def _yolo(root: Path, labels: dict, *, size=(40, 20), names=("a", "b"), ext=".jpg", **cfg) -> Path:
    """images/train/<stem><ext> for every stem, labels/train/<stem>.txt where the text is not None."""
    (root / "labels" / "train").mkdir(parents=True, exist_ok=True)
    (root / "images" / "train").mkdir(parents=True, exist_ok=True)
    for stem, text in labels.items():
        _image(root / "images" / "train" / f"{stem}{ext}", size)
        if text is not None:
            (root / "labels" / "train" / f"{stem}.txt").write_text(text)
    doc = {"path": str(root), "train": "images/train", "val": "images/train", "names": list(names) if names else None, **cfg}
    (root / "data.yaml").write_text(yaml.safe_dump({k: v for k, v in doc.items() if v is not None}))
    return root / "data.yaml"


def _skips(ds, reason: str) -> tuple[int, str]:
    return ds.skipped.counts[reason], " ".join(ds.skipped.examples.get(reason, []))


# ----------------------------------------------------------------------------------------- YOLO


def test_yolo_reads_pixel_boxes_without_decoding(tmp_path):
    y = _yolo(tmp_path, {"1": "0 0.5 0.5 0.5 0.5\n1 0.25 0.25 0.5 0.5\n", "2": None})
    ds = YoloDataset(y, "train")
    assert len(ds) == 2 and ds.image_ids == (1, 2) and ds.names == ("a", "b") and ds.category_ids == (0, 1)
    s = ds[0]
    assert s.image.shape == (20, 40, 3) and s.image.dtype == np.uint8 and s.image_id == 1
    np.testing.assert_array_equal(s.boxes, [[10, 5, 30, 15], [0, 0, 20, 10]])
    np.testing.assert_array_equal(s.classes, [0, 1])
    assert len(ds.labels(1)[0]) == 0 and not ds.skipped.counts  # image without label file: background
    ds = pickle.loads(pickle.dumps(ds))  # loader workers get a copy
    (tmp_path / "images" / "train" / "1.jpg").unlink()
    assert ds.image_size(0) == (20, 40) and len(ds.labels(0)[0]) == 2  # no image read


def test_yolo_corrupt_image_is_counted_skip(tmp_path):
    y = _yolo(tmp_path, {"1": "0 .5 .5 .2 .2\n", "2": "1 .5 .5 .2 .2\n"})
    (tmp_path / "images" / "train" / "2.jpg").write_bytes(b"not an image at all")
    ds = YoloDataset(y, "train")
    assert len(ds) == 1 and ds.image_ids == (1,)
    n, ex = _skips(ds, "corrupt image")
    assert n == 1 and "2.jpg" in ex


@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_yolo_image_cut_short_is_counted_skip(tmp_path, ext):
    # a readable header and half the data: PIL opens it, decoding it would fail mid-epoch
    y = _yolo(tmp_path, {"1": "0 .5 .5 .2 .2\n", "2": "1 .5 .5 .2 .2\n"}, size=(64, 48), ext=ext)
    f = tmp_path / "images" / "train" / f"2{ext}"
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(f)
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with Image.open(f) as im:
        assert im.size == (64, 48)  # the header alone looks fine
    with pytest.raises(ConfigError, match="truncated"):
        read_rgb(f)
    ds = YoloDataset(y, "train")
    assert len(ds) == 1 and ds.image_ids == (1,)
    n, ex = _skips(ds, "corrupt image")
    assert n == 1 and f"2{ext}" in ex and "truncated" in ex
    assert ds[0].image.shape == (48, 64, 3)


def test_yolo_keeps_a_jpeg_with_data_after_its_end(tmp_path):
    # motion photos append a video after the JPEG's end marker: complete, and decoded whole
    y = _yolo(tmp_path, {"1": "0 .5 .5 .2 .2\n"}, size=(64, 48))
    f = tmp_path / "images" / "train" / "1.jpg"
    f.write_bytes(f.read_bytes() + np.random.default_rng(0).integers(0, 256, 20000, dtype=np.uint8).tobytes())
    ds = YoloDataset(y, "train")
    assert len(ds) == 1 and not ds.skipped.counts and ds[0].image.shape == (48, 64, 3)


@pytest.mark.parametrize("mode,ext", [("L", ".png"), ("CMYK", ".jpg"), ("RGBA", ".png"), ("P", ".png")])
def test_yolo_converts_image_modes_to_rgb(tmp_path, mode, ext):
    y = _yolo(tmp_path, {"1": "0 .5 .5 .2 .2\n"}, ext=ext)
    _image(tmp_path / "images" / "train" / f"1{ext}", (40, 20), mode)
    s = YoloDataset(y, "train")[0]
    assert s.image.shape == (20, 40, 3) and s.image.dtype == np.uint8
    if mode == "L":
        assert (s.image == 128).all()
    if mode == "RGBA":  # alpha dropped, as the reference: colour kept under a transparent pixel
        assert tuple(s.image[0, 0]) == (200, 30, 30)


# a grey ramp and the RGB colours of a 3 x 4 picture; each PIL mode the reader claims is built from
# them by hand, so the expected RGB of every pixel is known
_GREY = np.arange(0, 240, 20, dtype=np.uint8).reshape(3, 4)
_RGB = np.stack([_GREY, 255 - _GREY, _GREY // 2], -1)


def _mode_case(mode):
    """(PIL image in `mode`, the RGB uint8 the reader must give)."""
    grey3 = np.repeat(_GREY[..., None], 3, -1)
    if mode == "1":
        return Image.fromarray(_GREY > 100), np.repeat((_GREY > 100)[..., None] * np.uint8(255), 3, -1)
    if mode == "L":
        return Image.fromarray(_GREY), grey3
    if mode == "P":  # a palette with colour k at index k
        im = Image.fromarray(np.arange(12, dtype=np.uint8).reshape(3, 4), "P")
        im.putpalette(_RGB.reshape(-1).tolist())
        return im, _RGB
    if mode == "LA":
        return Image.merge("LA", [Image.fromarray(_GREY), Image.fromarray(np.zeros_like(_GREY))]), grey3
    if mode == "RGBA":  # alpha dropped, colour kept under transparent pixels
        return Image.fromarray(np.concatenate([_RGB, np.zeros_like(_GREY)[..., None]], -1), "RGBA"), _RGB
    if mode == "CMYK":  # no black: C, M, Y = 255 - R, G, B
        return Image.fromarray(np.concatenate([255 - _RGB, np.zeros_like(_GREY)[..., None]], -1), "CMYK"), _RGB
    if mode == "I;16":  # 16-bit grey: the top byte
        return Image.fromarray(_GREY.astype(np.uint16) * 256 + 255), grey3
    if mode == "I":
        return Image.fromarray(_GREY.astype(np.int32) * 256), grey3
    if mode == "F":  # float grey in [0, 1]
        return Image.fromarray(_GREY.astype(np.float32) / 255), grey3
    raise AssertionError(mode)


@pytest.mark.parametrize("mode", ["1", "L", "P", "LA", "RGBA", "CMYK", "I;16", "I", "F"])
def test_reader_gives_rgb_for_every_pil_mode(mode):
    im, want = _mode_case(mode)
    assert im.mode == mode
    got = to_rgb(im)
    assert got.dtype == np.uint8 and got.shape == (3, 4, 3)
    np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("mode,ext", [("I;16", ".png"), ("LA", ".png"), ("CMYK", ".jpg"), ("P", ".png"),
                                      ("1", ".png"), ("I", ".tif"), ("F", ".tif")])
def test_reader_reads_each_mode_back_from_a_file(tmp_path, mode, ext):
    im, want = _mode_case(mode)
    im.save(tmp_path / f"x{ext}", **({"quality": 100} if ext == ".jpg" else {}))
    got = read_rgb(tmp_path / f"x{ext}")
    tol = 12 if ext == ".jpg" else 0  # JPEG is lossy (chroma subsampling on a 3 x 4 picture)
    assert got.shape == (3, 4, 3) and np.abs(got.astype(int) - want).max() <= tol


def test_yolo_wrong_column_count_skips_line(tmp_path):
    y = _yolo(tmp_path, {"1": "0 0.5 0.5 0.2\n0 0.5 0.5 0.2 0.2\n0 .5 .5 .2 .2 .9\n"})
    ds = YoloDataset(y, "train")
    n, ex = _skips(ds, "wrong number of columns")
    assert len(ds.labels(0)[1]) == 1 and n == 2 and "1.txt:1: 4 columns" in ex and "1.txt:3" in ex


def test_yolo_polygon_row_becomes_its_box(tmp_path):
    y = _yolo(tmp_path, {"1": "1 0.1 0.2 0.5 0.2 0.3 0.6\n"})
    boxes, classes = YoloDataset(y, "train").labels(0)
    np.testing.assert_allclose(boxes, [[4, 4, 20, 12]], atol=1e-5)
    assert classes.tolist() == [1]


def test_yolo_class_out_of_range_skips_line(tmp_path):
    y = _yolo(tmp_path, {"1": "0 .5 .5 .2 .2\n2 .5 .5 .2 .2\n-1 .5 .5 .2 .2\n0.5 .5 .5 .2 .2\n"})
    ds = YoloDataset(y, "train")
    n, ex = _skips(ds, "class out of range")
    assert len(ds.labels(0)[1]) == 1 and n == 3 and "1.txt:2: class 2 not in 0..1" in ex


def test_yolo_coordinates_outside_unit_square(tmp_path):
    y = _yolo(tmp_path, {"1": "0 1.0005 0.5 0.2 0.2\n0 1.2 0.5 0.2 0.2\n0 .5 .5 .2 nan\n"})
    ds = YoloDataset(y, "train")
    boxes, _ = ds.labels(0)
    np.testing.assert_allclose(boxes, [[0.9005 * 40, 8, 40, 12]], atol=1e-4)  # within tolerance: clipped
    n, ex = _skips(ds, "coordinates outside [0, 1]")
    assert n == 1 and "1.txt:2" in ex
    assert _skips(ds, "not a number")[0] == 1


def test_yolo_non_positive_size_skips_line(tmp_path):
    y = _yolo(tmp_path, {"1": "0 .5 .5 0 .2\n0 .5 .5 -0.1 .2\n1 .5 .5 .1 .1\n"})
    ds = YoloDataset(y, "train")
    n, ex = _skips(ds, "non-positive box size")
    assert ds.labels(0)[1].tolist() == [1] and n == 2 and "1.txt:1" in ex and "1.txt:2" in ex


def test_yolo_empty_label_file_is_background(tmp_path):
    ds = YoloDataset(_yolo(tmp_path, {"1": "", "2": "\n\n"}), "train")
    assert len(ds) == 2 and all(len(ds.labels(i)[1]) == 0 for i in range(2)) and not ds.skipped.counts


def test_yolo_exact_duplicate_rows_removed_and_counted(tmp_path):
    y = _yolo(tmp_path, {"1": "0 .5 .5 .2 .2\n0 0.5 0.5 0.2 0.2\n1 .5 .5 .2 .2\n"})
    ds = YoloDataset(y, "train")
    n, ex = _skips(ds, "duplicate label row")
    assert ds.labels(0)[1].tolist() == [0, 1] and n == 1 and "1.txt:2" in ex


def test_yolo_label_without_image_is_reported(tmp_path):
    y = _yolo(tmp_path, {"1": "0 .5 .5 .2 .2\n"})
    (tmp_path / "labels" / "train" / "9.txt").write_text("0 .5 .5 .2 .2\n")
    ds = YoloDataset(y, "train")
    n, ex = _skips(ds, "label file without image")
    assert len(ds) == 1 and n == 1 and "9.txt" in ex
    # a split that names its images is a chosen subset: the other labels are not orphans
    cfg = yaml.safe_load(y.read_text())
    cfg["train"] = ["images/train/1.jpg"]
    y.write_text(yaml.safe_dump(cfg))
    ds = YoloDataset(y, "train")
    assert len(ds) == 1 and "label file without image" not in ds.skipped.counts


def test_yolo_exif_orientation_applied(tmp_path):
    y = _yolo(tmp_path, {"1": "0 0.5 0.25 0.5 0.5\n"})
    exif = Image.Exif()
    exif[0x0112] = 6  # stored 40x20, shown rotated by 90 degrees: 20 wide, 40 high
    _image(tmp_path / "images" / "train" / "1.jpg", (40, 20), exif=exif)
    ds = YoloDataset(y, "train")
    assert ds.image_size(0) == (40, 20) and ds[0].image.shape == (40, 20, 3)
    np.testing.assert_allclose(ds.labels(0)[0], [[5, 0, 15, 20]])


def test_yolo_list_file_names_dict_and_index_ids(tmp_path):
    y = _yolo(tmp_path, {"cat": "1 .5 .5 .2 .2\n", "dog": None}, names=None, nc=2,
              train="train.txt")
    (tmp_path / "train.txt").write_text("images/train/cat.jpg\n./images/train/dog.jpg\nimages/train/gone.jpg\n")
    cfg = yaml.safe_load(y.read_text())
    y.write_text(yaml.safe_dump({**cfg, "names": {0: "x", 1: "y"}}))
    ds = YoloDataset(y, "train")
    assert ds.names == ("x", "y") and ds.image_ids == (0, 1) and ds.labels(0)[1].tolist() == [1]
    n, ex = _skips(ds, "listed image missing")
    assert n == 1 and "train.txt:3" in ex


def test_yolo_missing_image_folder(tmp_path):
    y = _yolo(tmp_path, {"1": ""}, train="images/nothere")
    with pytest.raises(ConfigError, match="images/nothere does not exist"):
        YoloDataset(y, "train")


def test_yolo_missing_labels_folder(tmp_path):
    y = _yolo(tmp_path, {"1": None})
    (tmp_path / "labels" / "train").rmdir()
    with pytest.raises(ConfigError, match=r"labels folder .*labels/train does not exist"):
        YoloDataset(y, "train")


@pytest.mark.parametrize("key", ["val", "names"])
def test_yolo_yaml_missing_key(tmp_path, key):
    y = _yolo(tmp_path, {"1": ""}, **{key: None})
    with pytest.raises(ConfigError, match=f"data.yaml: missing key '{key}'"):
        YoloDataset(y, "val")


def test_yolo_nc_and_names_disagree(tmp_path):
    with pytest.raises(ConfigError, match="'nc' is 3 but 'names' has 2"):
        YoloDataset(_yolo(tmp_path, {"1": ""}, nc=3), "train")


def test_yolo_empty_split(tmp_path):
    with pytest.raises(ConfigError, match="split 'train' has no images"):
        YoloDataset(_yolo(tmp_path, {}), "train")


def test_yolo_missing_or_unsafe_yaml(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        YoloDataset(tmp_path / "none.yaml", "train")
    (tmp_path / "bad.yaml").write_text("train: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(ConfigError, match="bad.yaml: not valid YAML"):
        YoloDataset(tmp_path / "bad.yaml", "train")


# ----------------------------------------------------------------------------------------- COCO


def _coco(root: Path, annotations: list, *, images=((1, "a.jpg", 40, 20), (2, "b.jpg", 40, 20)),
          categories=((7, "seven"), (3, "three")), write=True) -> Path:
    for _, name, w, h in images:
        if write:
            _image(root / "img" / name, (w, h))
    doc = {"images": [{"id": i, "file_name": n, "width": w, "height": h} for i, n, w, h in images],
           "annotations": [{"id": k + 1, "iscrowd": 0, **a} for k, a in enumerate(annotations)],
           "categories": [{"id": i, "name": n} for i, n in categories]}
    (root / "img").mkdir(exist_ok=True)
    (root / "instances.json").write_text(json.dumps(doc))
    return root / "instances.json"


def test_coco_maps_categories_boxes_and_crowd(tmp_path):
    js = _coco(tmp_path, [{"image_id": 1, "category_id": 7, "bbox": [2, 3, 10, 5]},
                          {"image_id": 1, "category_id": 3, "bbox": [0, 0, 4, 4]},
                          {"image_id": 1, "category_id": 3, "bbox": [0, 0, 40, 20], "iscrowd": 1}])
    ds = CocoDataset(js, tmp_path / "img")
    assert ds.category_ids == (3, 7) and ds.names == ("three", "seven") and ds.image_ids == (1, 2)
    s = ds[0]
    np.testing.assert_array_equal(s.boxes, [[2, 3, 12, 8], [0, 0, 4, 4]])
    assert s.classes.tolist() == [1, 0] and s.image.shape == (20, 40, 3)
    assert len(ds.labels(1)[1]) == 0  # no annotations: background
    assert _skips(ds, "crowd annotation")[0] == 1


def test_coco_invalid_boxes_counted(tmp_path):
    js = _coco(tmp_path, [{"image_id": 1, "category_id": 3, "bbox": [2, 3, 0, 5]},
                          {"image_id": 1, "category_id": 3, "bbox": [2, 3, 5, -1]},
                          {"image_id": 1, "category_id": 3, "bbox": [50, 3, 5, 5]},
                          {"image_id": 1, "category_id": 3, "bbox": [35, 15, 10, 10]},
                          {"image_id": 1, "category_id": 4, "bbox": [1, 1, 5, 5]},
                          {"image_id": 9, "category_id": 3, "bbox": [1, 1, 5, 5]}])
    ds = CocoDataset(js, tmp_path / "img")
    np.testing.assert_array_equal(ds.labels(0)[0], [[35, 15, 40, 20]])  # partly outside: clipped
    assert _skips(ds, "invalid box")[0] == 2 and "annotation id 1 " in _skips(ds, "invalid box")[1]
    assert _skips(ds, "box outside image")[0] == 1
    assert _skips(ds, "unknown category id")[0] == 1
    assert _skips(ds, "annotation of unknown image")[0] == 1


def test_coco_missing_images(tmp_path):
    js = _coco(tmp_path, [{"image_id": 2, "category_id": 3, "bbox": [1, 1, 5, 5]}])
    (tmp_path / "img" / "b.jpg").unlink()
    ds = CocoDataset(js, tmp_path / "img")
    n, ex = _skips(ds, "image file missing")
    assert ds.image_ids == (1,) and n == 1 and "b.jpg" in ex
    (tmp_path / "img" / "a.jpg").unlink()
    with pytest.raises(ConfigError, match="none of its 2 images"):
        CocoDataset(js, tmp_path / "img")
    with pytest.raises(ConfigError, match="image folder .*nowhere does not exist"):
        CocoDataset(js, tmp_path / "nowhere")


def test_coco_size_differs_from_json(tmp_path):
    js = _coco(tmp_path, [], images=((1, "a.jpg", 40, 20), (2, "b.jpg", 40, 20)))
    _image(tmp_path / "img" / "b.jpg", (30, 30))
    ds = CocoDataset(js, tmp_path / "img")
    assert ds.image_ids == (1,) and _skips(ds, "size differs from json")[0] == 1


@pytest.mark.parametrize("doc,match", [
    ("{not json", "not valid JSON"),
    ({"categories": [{"id": 1, "name": "a"}]}, "the top level has no 'images'"),
    ({"images": [], "categories": [{"id": 1}]}, r"categories\[0\] has no 'name'"),
    ({"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],
      "annotations": [{"image_id": 1, "category_id": 1}]}, r"annotations\[0\] has no 'bbox'"),
])
def test_coco_malformed_json_names_file_and_key(tmp_path, doc, match):
    (tmp_path / "img").mkdir()
    _image(tmp_path / "img" / "a.jpg")
    (tmp_path / "bad.json").write_text(doc if isinstance(doc, str) else json.dumps(doc))
    with pytest.raises(ConfigError, match=f"bad.json: {match}"):
        CocoDataset(tmp_path / "bad.json", tmp_path / "img")


# ----------------------------------------------------------------------------------------- synthetic


@pytest.fixture(scope="module")
def syn(tmp_path_factory) -> Path:
    return generate_dataset(tmp_path_factory.mktemp("syn") / "ds", **SYN)


def _files(root: Path) -> dict:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_synthetic_is_deterministic_by_seed(tmp_path):
    kw = dict(SYN, num_train=3, num_val=1)
    a, b = _files(generate_dataset(tmp_path / "a", **kw)), _files(generate_dataset(tmp_path / "b", **kw))
    assert a == b and len(a) == 4 * 2 + 2 + 1
    c = _files(generate_dataset(tmp_path / "c", **dict(kw, seed=4)))
    assert c.keys() == a.keys() and c["train/images/000001.jpg"] != a["train/images/000001.jpg"]
    with pytest.raises(ConfigError, match="not empty"):
        generate_dataset(tmp_path / "a", **kw)


@pytest.mark.parametrize("split", ["train", "val"])
def test_synthetic_readers_agree_with_generator(syn, split):
    yolo = YoloDataset(syn / "data.yaml", split)
    coco = CocoDataset(syn / "annotations" / f"instances_{split}.json", syn / split / "images")
    n = SYN[f"num_{split}"]
    assert len(yolo) == len(coco) == n and yolo.image_ids == coco.image_ids == tuple(range(1, n + 1))
    assert yolo.names == coco.names and yolo.category_ids == coco.category_ids
    for i in range(n):
        image, boxes, classes = make_sample(split, i, **SAMPLE_KW)
        assert len(boxes) >= 1 and yolo.image_size(i) == coco.image_size(i) == image.shape[:2]
        np.testing.assert_array_equal(coco.labels(i)[0], boxes)
        np.testing.assert_allclose(yolo.labels(i)[0], boxes, atol=1e-3)
        assert coco.labels(i)[1].tolist() == yolo.labels(i)[1].tolist() == classes.tolist()
    assert yolo[0].image.shape == coco[0].image.shape and not yolo.skipped.counts and not coco.skipped.counts


def test_synthetic_boxes_are_exact_and_sized(syn):
    _, boxes, _ = make_sample("train", 0, **SAMPLE_KW)
    assert (boxes == np.round(boxes)).all() and (boxes[:, 2:] > boxes[:, :2]).all()
    coco = CocoDataset(syn / "annotations" / "instances_train.json", syn / "train" / "images")
    sides = np.concatenate([np.diff(coco.labels(i)[0].reshape(-1, 2, 2), axis=1).reshape(-1) for i in range(10)])
    assert sides.min() >= 6 and sides.max() <= 0.6 * 96 + 1


def test_coco_ground_truth_round_trip(syn, tmp_path):
    yolo = YoloDataset(syn / "data.yaml", "val")
    gt = yolo.coco_ground_truth()
    for im in gt["images"]:
        im["file_name"] = f"{im['id']:06d}.jpg"
    (tmp_path / "gt.json").write_text(json.dumps(gt))
    back = CocoDataset(tmp_path / "gt.json", syn / "val" / "images")
    assert back.image_ids == yolo.image_ids and back.category_ids == yolo.category_ids
    for i in range(len(yolo)):
        assert back.image_size(i) == yolo.image_size(i)
        np.testing.assert_array_equal(back.labels(i)[0], yolo.labels(i)[0])
        np.testing.assert_array_equal(back.labels(i)[1], yolo.labels(i)[1])
    # built once per dataset, handed out as a copy: the edits above (and pycocotools') do not leak
    again = yolo.coco_ground_truth()
    assert "file_name" not in again["images"][0]
    assert again == YoloDataset(syn / "data.yaml", "val").coco_ground_truth()


def test_synthetic_dataset_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("JAXYOLO_CACHE", str(tmp_path))
    p = synthetic_dataset(num_train=2, num_val=1, img_size=32)
    assert p.parent == tmp_path and p.name.startswith("synthetic-") and (p / "data.yaml").is_file()
    stamp = (p / "options.json").stat().st_mtime_ns
    assert synthetic_dataset(num_train=2, num_val=1, img_size=(32, 32)) == p
    assert (p / "options.json").stat().st_mtime_ns == stamp
    assert [q.name for q in tmp_path.iterdir()] == [p.name]  # no temporary folder left
    with pytest.raises(ConfigError, match="synthetic dataset"):
        synthetic_dataset(num_pictures=3)


def test_synthetic_image_keeps_its_signature():
    img, boxes = synthetic_image(64, seed=0, num_objects=3)
    assert img.shape == (64, 64, 3) and img.dtype == np.float32 and 0 <= img.min() and img.max() <= 1
    assert boxes.shape[1] == 5 and set(boxes[:, 0].tolist()) <= {0.0, 1.0}


# ----------------------------------------------------------------------------------------- sources


def test_open_dataset_forms(syn, tmp_path):
    assert isinstance(open_dataset(str(syn / "data.yaml"), "val"), YoloDataset)
    assert isinstance(open_dataset(str(syn), "val"), YoloDataset)
    coco = open_dataset(str(syn / "annotations" / "instances_val.json"))  # images by the layout convention
    assert isinstance(coco, CocoDataset) and coco.image_dir == syn / "val" / "images"
    ds = open_dataset("synthetic:num_train=2,num_val=1,img_size=32-48,seed=1", "val", root=tmp_path)
    assert isinstance(ds, CocoDataset) and len(ds) == 1 and 32 <= min(ds.image_size(0))
    with pytest.raises(ConfigError, match=r"not prepared|jaxyolo\[tfds\]"):
        open_dataset("tfds:coco/2017", "val", data_dir=tmp_path)
    with pytest.raises(ConfigError, match="accepted: a data YAML"):
        open_dataset(str(tmp_path / "nothing-here"), "val")
    (tmp_path / "c").mkdir()
    js = _coco(tmp_path / "c", [], write=False)
    with pytest.raises(ConfigError, match="pass images="):
        open_dataset(str(js))


# ----------------------------------------------------------------------------------------- coco128


needs_coco128 = pytest.mark.skipif(not COCO128.is_dir(), reason="shared/data/coco128 not present")


@pytest.fixture(scope="module")
def coco128_yaml(tmp_path_factory) -> Path:
    cats = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())["categories"]
    y = tmp_path_factory.mktemp("c128") / "coco128.yaml"
    y.write_text(yaml.safe_dump({"path": str(COCO128), "train": "images/train2017", "val": "images/val2017",
                                 "names": [c["name"] for c in sorted(cats, key=lambda c: c["id"])]}))
    return y


@needs_coco128
@pytest.mark.parametrize("split", ["train2017", "val2017"])
def test_coco128_yolo_counts(coco128_yaml, split):
    images = {p.stem for p in (COCO128 / "images" / split).glob("*.jpg")}
    labels = {p.stem: p for p in (COCO128 / "labels" / split).glob("*.txt")}
    rows = sum(len({tuple(line.split()) for line in labels[s].read_text().splitlines() if line.strip()})
               for s in images & labels.keys())
    ds = YoloDataset(coco128_yaml, split.removesuffix("2017"))
    assert len(ds) == len(images) == 128 and ds.category_ids == COCO80_CATEGORY_IDS
    assert sum(len(ds.labels(i)[1]) for i in range(len(ds))) == rows
    assert ds.skipped.counts["label file without image"] == len(labels.keys() - images)
    assert set(ds.image_ids) == {int(s) for s in images}


@needs_coco128
def test_coco128_readers_agree(coco128_yaml):
    doc = json.loads((COCO128 / "annotations" / "instances_train2017.json").read_text())
    coco = CocoDataset(COCO128 / "annotations" / "instances_train2017.json", COCO128 / "images" / "train2017")
    crowd = sum(bool(a["iscrowd"]) for a in doc["annotations"])
    assert len(coco) == len(doc["images"]) and coco.skipped.counts["crowd annotation"] == crowd
    assert sum(len(coco.labels(i)[1]) for i in range(len(coco))) == len(doc["annotations"]) - crowd
    yolo = YoloDataset(coco128_yaml, "train")
    assert yolo.names == coco.names and yolo.category_ids == coco.category_ids
    where = {iid: i for i, iid in enumerate(yolo.image_ids)}
    for i, iid in enumerate(coco.image_ids):
        j = where[iid]
        assert coco.image_size(i) == yolo.image_size(j)
        (bc, cc), (by, cy) = coco.labels(i), yolo.labels(j)
        assert len(bc) == len(by)
        unused = np.ones(len(by), bool)
        for b, c in zip(bc, cc):  # match box-for-box: same class, within 0.01 px
            d = np.where(unused & (cy == c), np.abs(by - b).max(1), math.inf)
            assert d.size and d.min() < 0.01, (iid, b, c)
            unused[d.argmin()] = False
