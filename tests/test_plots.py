"""Plots (results.csv curves, PR curves, detection drawings) and the TensorBoard event writer."""

from __future__ import annotations

import csv
import math
import re
import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from jaxyolo import plots, tboard

# ------------------------------------------------------------------------------------ results.csv

OBJ = ("box", "obj", "cls")
METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "VOC_AP50_all", "VOC_AP50_11")


def header(levels=("P3", "P4", "P5"), val=True):
    cols = ["epoch", "iterations", "time_s", "lr"]
    for split in ("train", "val") if val else ("train",):
        cols += [f"{split}/loss"] + [f"{split}/{o}" for o in OBJ]
        cols += [f"{split}/{lvl}/{o}" for lvl in levels for o in OBJ]
    return cols + [f"metrics/{m}" for m in METRICS] + ["fitness"]


def write_csv(path: Path, cols, n_rows, nan_row=None):
    rng = np.random.default_rng(0)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(cols)
        for r in range(n_rows):
            row = [r, (r + 1) * 10, 1.5 * r, 0.01] + list(rng.uniform(0, 1, len(cols) - 4))
            if r == nan_row:
                row[5], row[6], row[-1] = "nan", "", "NaN"  # a NaN, an empty cell, a NaN fitness
            w.writerow(row)


def png_size(path: Path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.load()
        return im.size


def no_temp_files(folder: Path):
    return not [p.name for p in folder.iterdir() if p.name.startswith(".") or p.suffix == ".tmp"]


@pytest.mark.parametrize("case", ["two_rows", "one_row_no_val", "nan_row_four_levels"])
def test_plot_results(tmp_path, case):
    levels = ("P3", "P4", "P5", "P6") if "four_levels" in case else ("P3", "P4", "P5")
    cols = header(levels, val="no_val" not in case)
    n_rows = {"two_rows": 2, "one_row_no_val": 1, "nan_row_four_levels": 3}[case]
    csv_path = tmp_path / "results.csv"
    write_csv(csv_path, cols, n_rows, nan_row=1 if "nan_row" in case else None)

    if case == "one_row_no_val":  # an explicit out_path, in a folder that does not exist yet
        out = plots.plot_results(csv_path, tmp_path / "sub" / "curves.png")
        assert out == tmp_path / "sub" / "curves.png" and no_temp_files(tmp_path / "sub")
    else:
        out = plots.plot_results(csv_path)
        assert out == tmp_path / "results.png"
    assert out.stat().st_size > 10_000 and no_temp_files(tmp_path)
    # 4 panel columns of 320 px; rows = max(1 + levels, 5 extra panels) of 260 px.
    rows = max(1 + len(levels), 5)
    assert png_size(out) == (1280, 260 * rows) == plots.results_figure_size(csv_path)


def test_read_results_csv_parses_header_and_blanks(tmp_path):
    p = tmp_path / "results.csv"
    p.write_text(" epoch , train/box ,val/box\n0,1.5,\n1, nan ,0.25\n\n")
    cols = plots.read_results_csv(p)
    assert list(cols) == ["epoch", "train/box", "val/box"]
    np.testing.assert_array_equal(cols["epoch"], [0, 1])
    assert cols["train/box"][0] == 1.5 and math.isnan(cols["train/box"][1])
    assert math.isnan(cols["val/box"][0]) and cols["val/box"][1] == 0.25
    # Only the header: an empty figure, still a valid PNG.
    q = tmp_path / "empty" / "results.csv"
    q.parent.mkdir()
    q.write_text(",".join(header()) + "\n")
    assert png_size(plots.plot_results(q)) == (1280, 1300)


# --------------------------------------------------------------------------------------- PR curve


def synthetic_precision(k=3, t=10, r=101, seed=0):
    rng = np.random.default_rng(seed)
    p = np.sort(rng.uniform(0, 1, (t, r, k, 4, 3)), axis=1)[:, ::-1]  # precision falls with recall
    p[:, 80:, 0] = 0.0  # class 0 reaches recall 0.8 only
    if k > 2:
        p[:, :, 2] = -1  # class 2 has no ground truth
    return p


def test_plot_pr_curves(tmp_path):
    p = synthetic_precision()
    out = plots.plot_pr_curves(p, ["person", "car", "dog"], tmp_path / "pr.png")
    assert png_size(out) == (700, 550) and no_temp_files(tmp_path)
    # Many classes (no per-class legend), a {k: name} mapping, another IoU, and a (R, K) slice.
    many = synthetic_precision(k=30, seed=1)
    plots.plot_pr_curves(many, {i: f"c{i}" for i in range(30)}, tmp_path / "pr30.png", iou_index=5)
    plots.plot_pr_curves(p[0, :, :, 0, -1], None, tmp_path / "pr2d.png")
    # No class with ground truth at all still draws.
    plots.plot_pr_curves(-np.ones((10, 101, 2, 4, 3)), ["a", "b"], tmp_path / "none.png")
    assert all(png_size(tmp_path / n) == (700, 550) for n in ("pr30.png", "pr2d.png", "none.png"))
    with pytest.raises(ValueError, match="2 names for 3 classes"):
        plots.plot_pr_curves(p, ["a", "b"], tmp_path / "bad.png")
    with pytest.raises(ValueError, match="shape"):
        plots.plot_pr_curves(np.zeros((3, 4, 5)), None, tmp_path / "bad.png")


# ------------------------------------------------------------------------------------- detections


def test_draw_detections_box_edges(tmp_path):
    image = np.zeros((100, 120, 3), np.uint8)
    x1, y1, x2, y2, lw = 20, 40, 90, 80, 3
    color = plots.class_color(3)
    drawn = plots.draw_detections(image, [[x1, y1, x2, y2]], [3], [0.87], ["a", "b", "c", "dog"],
                                  out_path=tmp_path / "det.png", line_width=lw)
    assert drawn.shape == image.shape and drawn.dtype == np.uint8
    assert not image.any()  # the input is untouched
    ymid, xmid = (y1 + y2) // 2, (x1 + x2) // 2
    for d in range(lw):  # the outline runs lw pixels inward from each edge
        assert tuple(drawn[ymid, x1 + d]) == color  # left
        assert tuple(drawn[ymid, x2 - d]) == color  # right
        assert tuple(drawn[y2 - d, xmid]) == color  # bottom
        assert tuple(drawn[y1 + d, x2 - 5]) == color  # top, right of the label
    assert not drawn[ymid, x1 + lw].any() and not drawn[ymid, x2 - lw].any()  # inside stays black
    assert not drawn[ymid, x1 - 1].any() and not drawn[y2 + 1, xmid].any()  # outside too
    # The label "dog 0.87" sits on a filled class-coloured band above the box.
    band = drawn[:y1, x1:x2]
    assert (band == color).all(axis=-1).sum() > 50 and not drawn[:y1, x2 + 1:].any()
    # Saved file equals the returned array; no temporary left behind.
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "det.png")), drawn)
    assert no_temp_files(tmp_path)


def test_draw_detections_gt_and_edge_cases():
    image = np.full((64, 64, 3), 0, np.uint8)
    drawn = plots.draw_detections(image, np.zeros((0, 4)), [], [], None,
                                  gt_boxes=[[10, 10, 30, 30]], line_width=2)
    assert tuple(drawn[20, 10]) == (255, 255, 255) and not drawn[20, 11].any()  # 1 px GT outline
    # Boxes past the border are clipped, a NaN box skipped, no scores / names is fine,
    # and float [0, 1] or grayscale input is accepted.
    out = plots.draw_detections(np.zeros((64, 64), np.float32), [[-10, 5, 100, 50], [np.nan, 0, 1, 1]], [25, 1],
                                None, None, line_width=2)
    assert out.shape == (64, 64, 3) and tuple(out[30, 0]) == plots.class_color(25)
    with pytest.raises(ValueError, match="lengths differ"):
        plots.draw_detections(image, [[0, 0, 5, 5]], [0, 1], None, None)


def test_save_grid(tmp_path):
    ims = [np.full((20, 30, 3), i * 40, np.uint8) for i in range(5)] + [np.full((10, 10, 3), 255, np.uint8)]
    out = plots.save_grid(ims, tmp_path / "val_batch.jpg", cols=4, pad=2)
    assert out.exists() and no_temp_files(tmp_path)
    with Image.open(out) as im:
        assert im.size == (4 * 30 + 5 * 2, 2 * 20 + 3 * 2)
    png = np.asarray(Image.open(plots.save_grid(ims, tmp_path / "g.png", cols=4, pad=2)))
    assert tuple(png[2, 2 + 30 + 2]) == (40, 40, 40)  # second cell's top-left pixel
    assert tuple(png[2 + 20 + 2, 2 + 30 + 2]) == (255, 255, 255)  # the 10x10 image in row 2, col 2


def test_atomic_write_failure_leaves_target_and_no_temp(tmp_path):
    target = tmp_path / "results.png"
    target.write_bytes(b"old")

    def boom(f):
        f.write(b"partial")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        plots._atomic_write(target, boom)
    assert target.read_bytes() == b"old" and [p.name for p in tmp_path.iterdir()] == ["results.png"]
    with pytest.raises(ValueError, match="extension"):
        plots.save_grid([np.zeros((4, 4, 3), np.uint8)], tmp_path / "grid.unknownext")
    assert [p.name for p in tmp_path.iterdir()] == ["results.png"]


# -------------------------------------------------------------------------------------- tensorboard


def crc32c_bitwise(data: bytes) -> int:
    """CRC-32C bit by bit, independent of the module's table."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc ^= byte
        for _ in range(8):
            crc = (crc >> 1) ^ (0x82F63B78 & -(crc & 1))
    return crc ^ 0xFFFFFFFF


def unmask(masked: int) -> int:
    rot = (masked - 0xA282EAD8) & 0xFFFFFFFF
    return ((rot << 15) | (rot >> 17)) & 0xFFFFFFFF


def read_records(path: Path) -> list[bytes]:
    buf = path.read_bytes()
    out, i = [], 0
    while i < len(buf):
        (n,) = struct.unpack_from("<Q", buf, i)
        (len_crc,) = struct.unpack_from("<I", buf, i + 8)
        assert unmask(len_crc) == crc32c_bitwise(buf[i:i + 8])
        data = buf[i + 12:i + 12 + n]
        (data_crc,) = struct.unpack_from("<I", buf, i + 12 + n)
        assert len(data) == n and unmask(data_crc) == crc32c_bitwise(data)
        out.append(data)
        i += 16 + n
    assert i == len(buf)
    return out


def parse_proto(buf: bytes) -> list[tuple[int, int, object]]:
    """(field, wire_type, value) of every field; varints as unsigned ints, fixed as raw bytes."""
    fields, i = [], 0

    def varint():
        nonlocal i
        shift = result = 0
        while True:
            b = buf[i]
            i += 1
            result |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                return result

    while i < len(buf):
        key = varint()
        field, wt = key >> 3, key & 7
        if wt == 0:
            fields.append((field, wt, varint()))
        elif wt == 1:
            fields.append((field, wt, buf[i:i + 8]))
            i += 8
        elif wt == 5:
            fields.append((field, wt, buf[i:i + 4]))
            i += 4
        elif wt == 2:
            n = varint()
            fields.append((field, wt, buf[i:i + n]))
            i += n
        else:
            raise AssertionError(f"unexpected wire type {wt}")
    assert i == len(buf)
    return fields


def decode_event(data: bytes) -> dict:
    ev = {"step": 0, "values": {}}
    for field, wt, v in parse_proto(data):
        if (field, wt) == (1, 1):
            ev["wall_time"] = struct.unpack("<d", v)[0]
        elif (field, wt) == (2, 0):
            ev["step"] = v - (1 << 64) if v >> 63 else v
        elif (field, wt) == (3, 2):
            ev["file_version"] = v.decode()
        elif (field, wt) == (5, 2):
            for f2, w2, value in parse_proto(v):
                assert (f2, w2) == (1, 2)
                parts = {f: val for f, _, val in parse_proto(value)}
                ev["values"][parts[1].decode()] = struct.unpack("<f", parts[2])[0]
        else:
            raise AssertionError(f"unexpected Event field {field}")
    return ev


def test_crc32c_vectors():
    assert tboard.crc32c(b"123456789") == 0xE3069283 == crc32c_bitwise(b"123456789")
    assert tboard.crc32c(b"") == 0
    data = np.random.default_rng(0).integers(0, 256, 1000, dtype=np.uint8).tobytes()
    assert tboard.crc32c(data) == crc32c_bitwise(data)
    assert tboard.crc32c(data[500:], tboard.crc32c(data[:500])) == tboard.crc32c(data)  # continuation
    c = crc32c_bitwise(b"abc")
    assert tboard.masked_crc32c(b"abc") == (((c >> 15) | (c << 17)) + 0xA282EAD8) % 2**32


def test_summary_writer_roundtrip(tmp_path):
    w = tboard.SummaryWriter(tmp_path / "tb")
    assert re.fullmatch(r"events\.out\.tfevents\.\d{10}\.[^/]+\.jaxyolo", w.path.name)
    w.scalar("train/loss", 1.25, 0)
    w.scalar("train/loss", np.float32(0.5), 1)
    w.scalars({"metrics/AP": 0.125, "metrics/AP50": np.array(0.25), "lr": 1e-3}, step=7, wall_time=123.5)
    w.add_scalar("neg", float("nan"), -3)
    # Not closed yet (as after a kill): everything logged so far is already on disk.
    events = [decode_event(r) for r in read_records(w.path)]
    w.close()
    w.close()  # idempotent
    assert events[0]["file_version"] == "brain.Event:2" and not events[0]["values"]
    assert events[1]["values"] == {"train/loss": 1.25} and events[1]["step"] == 0
    assert events[2]["values"] == {"train/loss": 0.5} and events[2]["step"] == 1
    assert events[3]["step"] == 7 and events[3]["wall_time"] == 123.5
    assert events[3]["values"] == pytest.approx({"metrics/AP": 0.125, "metrics/AP50": 0.25, "lr": 1e-3})
    assert events[4]["step"] == -3 and math.isnan(events[4]["values"]["neg"])
    assert all(abs(e["wall_time"] - events[0]["wall_time"]) < 60 for e in events if e["step"] != 7)
    with pytest.raises(ValueError, match="closed"):
        w.scalar("x", 1.0, 0)

    # A second writer in the same folder (same second) gets its own file.
    with tboard.SummaryWriter(tmp_path / "tb") as w2, tboard.SummaryWriter(tmp_path / "tb") as w3:
        w2.scalar("a", 1.0, 0)
        w3.scalar("b", 2.0, 0)
        w3.flush()
    assert len({w.path, w2.path, w3.path}) == 3 and w2.closed and w3.closed
    assert decode_event(read_records(w3.path)[1])["values"] == {"b": 2.0}


def test_summary_writer_read_by_tensorboard(tmp_path):
    ea_mod = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    with tboard.SummaryWriter(tmp_path) as w:
        for step in range(3):
            w.scalars({"train/loss": 1.0 / (step + 1), "metrics/AP": step / 10}, step)
    ea = ea_mod.EventAccumulator(str(tmp_path))
    ea.Reload()
    assert set(ea.Tags()["scalars"]) == {"train/loss", "metrics/AP"}
    got = [(e.step, e.value) for e in ea.Scalars("train/loss")]
    assert got == pytest.approx([(0, 1.0), (1, 0.5), (2, 1 / 3)])
