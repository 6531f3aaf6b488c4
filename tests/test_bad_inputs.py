"""Property tests over broken inputs: whatever the bytes of a label file, of a cut image or of a cut
checkpoint, the library either reads them correctly or raises its own error (JaxyoloError), never
another exception from deep inside PIL, NumPy, Orbax or json.

The truths: a label file read back must hold only boxes inside the image with classes in range
(whatever was skipped is counted); a cut image must decode to its full size or be refused; a cut
checkpoint must load bit-identical weights or be refused."""

from __future__ import annotations

import io
import shutil
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import jaxyolo  # noqa: E402
from jaxyolo.data.yolo import YoloDataset, read_rgb  # noqa: E402
from jaxyolo.errors import CheckpointError, JaxyoloError  # noqa: E402

W, H, NC = 40, 30, 3
SETTINGS = dict(deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

# label-file text made of the pieces real files get wrong: numbers in every form, signs, exponents,
# non-finite words, separators, stray punctuation and non-ASCII
_TOKENS = st.sampled_from(["0", "1", "2", "3", "-1", "0.5", ".25", "1e-3", "1e9", "-0.0", "nan", "inf", "-inf",
                           "0x10", "1,5", "½", "é", "", " ", "\t", "0.9999", "1.0005", "2.5", "abc", "#"])
_LINE = st.lists(_TOKENS, min_size=0, max_size=11).map(" ".join)
_TEXT = st.lists(_LINE, max_size=6).map("\n".join)


@pytest.fixture(scope="module")
def yolo_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("yolo")
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (W, H), (90, 120, 150)).save(root / "images" / "train" / "1.jpg")
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/train",
                                                    "val": "images/train", "names": ["a", "b", "c"]}))
    return root


def _check_labels(root: Path) -> None:
    try:
        ds = YoloDataset(root / "data.yaml", "train")
    except JaxyoloError:
        return
    boxes, classes = ds.labels(0)
    assert boxes.shape == (len(classes), 4) and np.isfinite(boxes).all()
    assert ((boxes[:, [0, 2]] >= 0) & (boxes[:, [0, 2]] <= W)).all()
    assert ((boxes[:, [1, 3]] >= 0) & (boxes[:, [1, 3]] <= H)).all()
    assert (boxes[:, 2] > boxes[:, 0]).all() and (boxes[:, 3] > boxes[:, 1]).all()
    assert ((classes >= 0) & (classes < NC)).all()


@settings(max_examples=150, **SETTINGS)
@given(text=_TEXT)
def test_any_label_text_is_read_or_skipped_never_crashes(yolo_root, text):
    (yolo_root / "labels" / "train" / "1.txt").write_text(text, encoding="utf-8")
    _check_labels(yolo_root)


@settings(max_examples=40, **SETTINGS)
@given(data=st.binary(max_size=200))
def test_any_label_bytes_are_read_or_skipped_never_crash(yolo_root, data):
    (yolo_root / "labels" / "train" / "1.txt").write_bytes(data)
    _check_labels(yolo_root)


def _encoded(fmt: str) -> bytes:
    rng = np.random.default_rng(0)
    b = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (48, 64, 3), dtype=np.uint8)).save(b, fmt)
    return b.getvalue()


_IMAGES = {fmt: _encoded(fmt) for fmt in ("JPEG", "PNG", "BMP")}


@settings(max_examples=60, **SETTINGS)
@given(fmt=st.sampled_from(sorted(_IMAGES)), cut=st.floats(0.0, 1.0))
def test_a_cut_image_is_skipped_or_read_whole(tmp_path_factory, fmt, cut):
    data = _IMAGES[fmt]
    n = int(len(data) * cut)
    root = tmp_path_factory.mktemp("cut")
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    Image.new("RGB", (W, H)).save(root / "images" / "train" / "a.png")  # one good image keeps the split non-empty
    (root / "images" / "train" / f"b.{fmt.lower()}").write_bytes(data[:n])
    (root / "data.yaml").write_text(yaml.safe_dump({"path": str(root), "train": "images/train",
                                                    "val": "images/train", "names": ["a"]}))
    try:
        img = read_rgb(root / "images" / "train" / f"b.{fmt.lower()}")
        assert img.shape == (48, 64, 3)
    except JaxyoloError:
        pass
    ds = YoloDataset(root / "data.yaml", "train")
    if len(ds) == 2:  # kept: it must decode whole (a cut that kept the file complete)
        assert ds[1].image.shape == (48, 64, 3)
    else:
        assert ds.skipped.counts["corrupt image"] == 1
    shutil.rmtree(root)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    det = jaxyolo.create_model("yolov4p", num_classes=NC, head="detect", seed=0)
    path = det.save(tmp_path_factory.mktemp("ckpt") / "det")
    files = sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())
    return path, det.state_dict(), files


@settings(max_examples=12, **SETTINGS)
@given(pick=st.floats(0.0, 1.0, exclude_max=True), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_a_cut_checkpoint_loads_identically_or_is_refused(checkpoint, tmp_path_factory, pick, cut):
    path, want, files = checkpoint
    copy = tmp_path_factory.mktemp("cut") / "det"
    shutil.copytree(path, copy)
    f = copy / files[int(pick * len(files))]
    data = f.read_bytes()
    f.write_bytes(data[: int(len(data) * cut)])
    try:
        got = jaxyolo.load(copy).state_dict()
    except CheckpointError:
        return
    finally:
        shutil.rmtree(copy.parent)
    assert list(got) == list(want) and all(np.array_equal(got[k], want[k]) for k in want)
