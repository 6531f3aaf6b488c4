"""TFDS array_record datasets, written and read without TensorFlow (jaxyolo.data.tfds)."""

from __future__ import annotations

import importlib.util
import json
import pickle
import shutil
import sys

import numpy as np
import pytest

from jaxyolo.data.coco import CocoDataset
from jaxyolo.data.sources import open_dataset
from jaxyolo.data.synthetic import generate_dataset
from jaxyolo.data.yolo import COCO80_CATEGORY_IDS, COCO80_NAMES
from jaxyolo.errors import ConfigError

SPLITS = ("train", "val")
BOX_ATOL = 1e-4  # TFDS stores boxes as float32 fractions of the image size: back in pixels, within an ulp


@pytest.fixture(scope="module")
def tfds():
    pytest.importorskip("array_record")
    return pytest.importorskip("tensorflow_datasets")


@pytest.fixture(scope="module")
def coco_like(tfds, tmp_path_factory):
    """Synthetic COCO data (one annotation made a crowd) and the same prepared as TFDS array_record."""
    from jaxyolo.data.tfds import prepare_coco_like

    tmp = tmp_path_factory.mktemp("tfds")
    root = generate_dataset(tmp / "syn", num_train=8, num_val=4, img_size=(64, 96))
    js = {s: root / "annotations" / f"instances_{s}.json" for s in SPLITS}
    data = json.loads(js["train"].read_text())
    data["annotations"][0]["iscrowd"] = 1
    js["train"].write_text(json.dumps(data))
    out = prepare_coco_like(js, {s: root / s / "images" for s in SPLITS}, tmp / "tfds_data")
    return root, js, tmp / "tfds_data", out


def _same(tf_ds, coco: CocoDataset) -> None:
    """Image for image, box for box, by image id (TFDS stores records in its own order)."""
    assert len(tf_ds) == len(coco) and sorted(tf_ds.image_ids) == sorted(coco.image_ids)
    assert tf_ds.names == coco.names and tf_ds.category_ids == coco.category_ids
    where = {iid: k for k, iid in enumerate(coco.image_ids)}
    for i in range(len(tf_ds)):
        s = tf_ds[i]
        c = coco[where[s.image_id]]
        assert s.image.dtype == np.uint8 and s.image.shape == c.image.shape
        np.testing.assert_array_equal(s.image, c.image)  # the same JPEG bytes, decoded the same way
        np.testing.assert_allclose(s.boxes, c.boxes, rtol=0, atol=BOX_ATOL)
        np.testing.assert_array_equal(s.classes, c.classes)
        assert s.boxes.dtype == np.float32 and s.classes.dtype == np.int32
        assert tf_ds.image_size(i) == coco.image_size(where[s.image_id]) == s.image.shape[:2]
        assert s.image_id == tf_ds.image_ids[i]


@pytest.mark.parametrize("split", SPLITS)
def test_tfds_matches_coco(coco_like, split, monkeypatch):
    root, js, data_dir, out = coco_like
    assert out == data_dir / "jaxyolo_coco_like" / "1.0.0" and any(out.glob("*.array_record-*"))
    monkeypatch.setenv("TFDS_DATA_DIR", str(data_dir))
    ds = open_dataset("tfds:jaxyolo_coco_like", split)
    coco = CocoDataset(js[split], root / split / "images")
    _same(ds, coco)
    assert ds.skipped.counts == coco.skipped.counts  # the crowd annotation, in train
    assert ds.skipped.counts["crowd annotation"] == (split == "train")


def test_reads_without_tensorflow(coco_like):
    """Prepared (in the fixture) and read with no TensorFlow to import."""
    if importlib.util.find_spec("tensorflow") is not None:
        pytest.skip("TensorFlow is installed: this checks an environment without it")
    _, _, data_dir, _ = coco_like
    ds = open_dataset("tfds:jaxyolo_coco_like", "val", data_dir=data_dir)
    assert ds[0].image.ndim == 3 and "tensorflow" not in sys.modules


def test_spec_forms_labels_and_pickle(coco_like):
    root, js, data_dir, _ = coco_like
    ds = open_dataset("tfds:jaxyolo_coco_like:1.0.0:validation", "train", data_dir=data_dir)  # alias, spec wins
    assert ds.split == "val" and len(ds) == 4
    half = open_dataset("tfds:jaxyolo_coco_like:train[:50%]", data_dir=data_dir)
    assert len(half) == 4
    coco = CocoDataset(js["val"], root / "val" / "images")
    gt, ref = ds.coco_ground_truth(), coco.coco_ground_truth()  # labels without decoding an image
    assert sorted(gt["images"], key=lambda im: im["id"]) == sorted(ref["images"], key=lambda im: im["id"])
    assert gt["categories"] == ref["categories"] and len(gt["annotations"]) == len(ref["annotations"])
    again = pickle.loads(pickle.dumps(ds))  # grain workers get the dataset pickled, files reopened
    assert again.image_ids[-1] == ds.image_ids[-1] and again._source is None
    np.testing.assert_array_equal(again[3].image, ds[3].image)


def test_coco80_category_ids(tfds, coco_like, tmp_path):
    """80 COCO categories: detections use the official ids, from the recorded metadata or, for a
    dataset without it (TFDS's own coco/2017), from the 80 COCO names."""
    from jaxyolo.data.tfds import TfdsDataset, prepare_coco_like

    root, js, _, _ = coco_like
    data = json.loads(js["val"].read_text())
    data["categories"] = [{"id": i, "name": n} for i, n in zip(COCO80_CATEGORY_IDS, COCO80_NAMES)]
    for a in data["annotations"]:
        a["category_id"] = COCO80_CATEGORY_IDS[a["category_id"]]
    (tmp_path / "coco80.json").write_text(json.dumps(data))
    out = prepare_coco_like(tmp_path / "coco80.json", root / "val" / "images", tmp_path, name="coco80_like",
                            split="validation")
    ds = TfdsDataset("coco80_like", "val", tmp_path)
    assert ds.names == COCO80_NAMES and ds.category_ids == COCO80_CATEGORY_IDS
    _same(ds, CocoDataset(tmp_path / "coco80.json", root / "val" / "images"))
    (out / "metadata.json").unlink()
    assert TfdsDataset("coco80_like", "validation", tmp_path).category_ids == COCO80_CATEGORY_IDS
    with pytest.raises(ConfigError, match="exists already; pass overwrite=True"):
        prepare_coco_like(tmp_path / "coco80.json", root / "val" / "images", tmp_path, name="coco80_like")


def test_not_prepared(tfds, coco_like, tmp_path, monkeypatch):
    monkeypatch.setenv("TFDS_DATA_DIR", str(tmp_path))
    with pytest.raises(ConfigError, match=r"tfds:coco/2017 is not prepared in .*coco/2017/<version>/dataset_info"
                                          r".*tfds build coco/2017 .*--file_format=array_record"):
        open_dataset("tfds:coco/2017", "val")
    with pytest.raises(ConfigError, match=r"not prepared in .*prepare_coco_like"):
        open_dataset("tfds:mine", "val")
    _, _, data_dir, out = coco_like
    with pytest.raises(ConfigError, match=r"version 9\.9\.9 is not prepared .*prepared versions: 1\.0\.0"):
        open_dataset("tfds:jaxyolo_coco_like:9.9.9", data_dir=data_dir)
    with pytest.raises(ConfigError, match=r"no split 'test'; its splits: train, val"):
        open_dataset("tfds:jaxyolo_coco_like", "test", data_dir=data_dir)
    (tmp_path / "multi" / "cfg").mkdir(parents=True)
    (tmp_path / "multi" / "cfg" / "1.0.0").symlink_to(out, target_is_directory=True)
    with pytest.raises(ConfigError, match=r"holds configs cfg; name one, e.g. tfds:multi/cfg"):
        open_dataset("tfds:multi", "val")
    with pytest.raises(ConfigError, match="expected tfds:NAME"):
        open_dataset("tfds:", "val")


def test_tfrecord_needs_tensorflow(tfds, coco_like, tmp_path):
    _, _, _, out = coco_like
    shutil.copytree(out, tmp_path / "fake" / "1.0.0")
    info = tmp_path / "fake" / "1.0.0" / "dataset_info.json"
    info.write_text(info.read_text().replace('"array_record"', '"tfrecord"'))
    with pytest.raises(ConfigError, match=r"prepared as tfrecord .*--file_format=array_record"):
        open_dataset("tfds:fake", data_dir=tmp_path)


def test_not_installed(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # `import tensorflow_datasets` fails
    with pytest.raises(ConfigError, match=r"tensorflow-datasets and array_record .*pip install 'jaxyolo\[tfds\]'"):
        open_dataset("tfds:coco/2017", "val")
    from jaxyolo.data.tfds import prepare_coco_like

    with pytest.raises(ConfigError, match=r"jaxyolo\[tfds\]"):
        prepare_coco_like("x.json", "images", "data")
