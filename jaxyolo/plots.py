"""Training plots and detection drawings: results.csv curves, PR curves, boxes on images.

Everything here draws on its own `matplotlib.figure.Figure` with the Agg canvas and never touches
pyplot, so it neither opens windows nor disturbs a notebook's or another thread's figures. Every
file is written atomically: to a hidden temporary file in the destination folder, then
`os.replace`d over the target, so a reader (or a killed run) never sees half a PNG.
"""

from __future__ import annotations

import contextlib
import csv
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from jaxyolo.files import atomic_write as _atomic_write

# Results figure geometry: a fixed pixel size per panel, so the PNG's size depends only on the
# number of panel rows (see `results_figure_size`).
PANEL_W_IN, PANEL_H_IN, RESULTS_DPI, RESULTS_COLS = 3.2, 2.6, 100, 4

# 20 distinct colours (the Ultralytics palette); class c gets PALETTE[c % 20].
_HEX = ("FF3838", "FF9D97", "FF701F", "FFB21D", "CFD231", "48F90A", "92CC17", "3DDB86", "1A9334", "00D4BB",
        "2C99A8", "00C2FF", "344593", "6473FF", "0018EC", "8438FF", "520085", "CB38FF", "FF95C8", "FF37C7")
PALETTE: tuple[tuple[int, int, int], ...] = tuple(tuple(int(h[i:i + 2], 16) for i in (0, 2, 4)) for h in _HEX)


def class_color(c: int) -> tuple[int, int, int]:
    """RGB colour of class id c."""
    return PALETTE[int(c) % len(PALETTE)]


# ------------------------------------------------------------------------------------- file output


def _new_figure(width_in: float, height_in: float, dpi: int):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=dpi)
    FigureCanvasAgg(fig)
    return fig


def _save_figure(fig, out_path, dpi: int) -> Path:
    # No bbox_inches="tight": the PNG keeps exactly figsize * dpi pixels.
    return _atomic_write(out_path, lambda f: fig.savefig(f, format="png", dpi=dpi))


def _pil_format(path: Path) -> str:
    from PIL import Image

    fmt = Image.registered_extensions().get(path.suffix.lower())
    if fmt is None:
        raise ValueError(f"{path}: unknown image extension {path.suffix!r}")
    return fmt


def _save_image(array: np.ndarray, out_path) -> Path:
    from PIL import Image

    out = Path(out_path)
    fmt = _pil_format(out)
    img = Image.fromarray(array)
    return _atomic_write(out, lambda f: img.save(f, format=fmt))


# ------------------------------------------------------------------------------------- results.csv

_LEVEL_COL = re.compile(r"^(train|val)/(P\d+)/([^/]+)$")
_OBJ_COL = re.compile(r"^(train|val)/([^/]+)$")


def read_results_csv(csv_path) -> dict[str, np.ndarray]:
    """Columns of a results.csv as float arrays (empty or unparsable cells are NaN), header order."""
    with open(csv_path, newline="") as f:
        rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    if not rows:
        raise ValueError(f"{csv_path}: empty csv (no header)")
    header = [h.strip() for h in rows[0]]
    data = np.full((len(rows) - 1, len(header)), np.nan)
    for i, row in enumerate(rows[1:]):
        for j, cell in enumerate(row[:len(header)]):
            try:
                data[i, j] = float(cell)
            except ValueError:
                pass
    return {h: data[:, j] for j, h in enumerate(header) if h}


def _layout(columns: Mapping[str, np.ndarray]):
    """(objectives, levels, extra panels) found in the header."""
    objectives, levels = [], []
    for name in columns:
        if m := _LEVEL_COL.match(name):
            if m[2] not in levels:
                levels.append(m[2])
            if m[3] not in objectives:
                objectives.append(m[3])
        elif (m := _OBJ_COL.match(name)) and m[2] != "loss" and m[2] not in objectives:
            objectives.append(m[2])
    if not objectives:
        objectives = ["box", "obj", "cls"]
    levels.sort(key=lambda p: int(p[1:]))
    extras = [("total loss", [("train/loss", "train"), ("val/loss", "val")]),
              ("COCO mAP", [(f"metrics/{k}", k) for k in ("AP", "AP50", "AP75")]),
              ("COCO AP by size", [(f"metrics/{k}", k) for k in ("APs", "APm", "APl")]),
              ("VOC mAP@0.5, fitness", [("metrics/VOC_AP50_all", "VOC AP50"), ("metrics/VOC_AP50_11", "VOC AP50 11pt"),
                                        ("fitness", "fitness")]),
              ("learning rate", [("lr", "lr")])]
    extras = [(t, [(c, lab) for c, lab in series if c in columns]) for t, series in extras]
    extras = [(t, s) for t, s in extras if s]
    return objectives, levels, extras


def results_figure_size(csv_path) -> tuple[int, int]:
    """(width, height) in pixels of the PNG that plot_results draws for this csv."""
    objectives, levels, extras = _layout(read_results_csv(csv_path))
    rows, cols = _grid(objectives, levels, extras)
    return round(cols * PANEL_W_IN * RESULTS_DPI), round(rows * PANEL_H_IN * RESULTS_DPI)


def _grid(objectives, levels, extras) -> tuple[int, int]:
    cols = max(RESULTS_COLS, len(objectives) + 1)
    return max(1 + len(levels), len(extras), 1), cols


def _plot_series(ax, x, columns, series, title, legend_loc):
    from matplotlib.ticker import MaxNLocator

    drawn = False
    for col, label in series:
        y = columns.get(col)
        if y is None or not np.isfinite(y).any():
            continue
        ok = np.isfinite(x) & np.isfinite(y)
        # Markers while there are few points, so that a single epoch (or a point between NaNs) shows.
        ax.plot(x[ok], y[ok], marker="." if ok.sum() <= 50 else None, markersize=4, linewidth=1.5, label=label)
        drawn = True
    # A plain text rather than set_title: title placement measures every tick label (slow).
    ax.text(0.5, 1.02, title, ha="center", va="bottom", transform=ax.transAxes, fontsize=9)
    ax.tick_params(labelsize=7)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=5, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=5))  # fewer ticks: tick artists are most of the cost
    ax.grid(alpha=0.3)
    if drawn:
        ax.legend(fontsize=6, loc=legend_loc)
    else:
        ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes, fontsize=8, color="gray")


def plot_results(csv_path, out_path=None) -> Path:
    """Draw results.csv as one PNG (default: results.png beside the csv) and return its path.

    Row 0: train vs val loss per objective (box/obj/cls); rows 1..L: the same per level
    (P3, P4, P5[, P6]); the last column: total loss, COCO AP/AP50/AP75, APs/APm/APl, VOC AP50 and
    fitness, learning rate. Levels and objectives come from the header; a missing column, NaN or
    empty cell, or a single row just draws less. x is the `epoch` column (row index if absent).
    The PNG is `results_figure_size(csv_path)` pixels: 320 x 260 per panel, no tight cropping.
    """
    csv_path = Path(csv_path)
    out_path = csv_path.with_name("results.png") if out_path is None else Path(out_path)
    columns = read_results_csv(csv_path)
    objectives, levels, extras = _layout(columns)
    rows, cols = _grid(objectives, levels, extras)
    n = len(next(iter(columns.values()))) if columns else 0
    x = columns.get("epoch")
    if x is None or not np.isfinite(x).any():
        x = np.arange(n, dtype=float)

    panels = []  # (row, col, series, title, legend location)
    for j, o in enumerate(objectives):
        panels.append((0, j, [(f"train/{o}", "train"), (f"val/{o}", "val")], f"{o} loss", "upper right"))
        for i, lvl in enumerate(levels, start=1):
            panels.append((i, j, [(f"train/{lvl}/{o}", "train"), (f"val/{lvl}/{o}", "val")], f"{lvl} {o} loss",
                           "upper right"))
    for i, (title, series) in enumerate(extras):
        panels.append((i, cols - 1, series, title, "upper right" if "loss" in title or "rate" in title else "lower right"))

    width, height = cols * PANEL_W_IN, rows * PANEL_H_IN
    fig = _new_figure(width, height, RESULTS_DPI)
    # Fixed margins in inches rather than tight_layout, which costs more than the drawing itself.
    grid = fig.add_gridspec(rows, cols, left=0.45 / width, right=1 - 0.15 / width, bottom=0.45 / height,
                            top=1 - 0.6 / height, wspace=0.5 * cols / width, hspace=0.55 * rows / height)
    last_row = {}
    for i, j, series, title, loc in panels:
        ax = fig.add_subplot(grid[i, j])
        _plot_series(ax, x, columns, series, title, loc)
        if i >= last_row.get(j, (-1, None))[0]:
            last_row[j] = (i, ax)
    for _, ax in last_row.values():
        ax.set_xlabel("epoch", fontsize=8)
    fig.text(0.5, 1 - 0.08 / height, f"{csv_path.parent.name or csv_path.name}: {n} epoch{'s' if n != 1 else ''}",
             ha="center", va="top", fontsize=10)
    return _save_figure(fig, out_path, RESULTS_DPI)


# ---------------------------------------------------------------------------------------- PR curve


def _name_of(names, c: int) -> str:
    if names is None:
        return str(c)
    if isinstance(names, Mapping):
        return str(names.get(c, c))
    return str(names[c]) if 0 <= c < len(names) else str(c)


def plot_pr_curves(precision, names, out_path, iou_index: int = 0, *, area_index: int = 0,
                   maxdet_index: int = -1, max_legend: int = 20) -> Path:
    """Per-class precision-recall curves (thin) and their mean (thick) as a PNG; returns its path.

    precision: pycocotools' `COCOeval.eval["precision"]`, shape (T, R, K, A, M) = (IoU thresholds
    .50:.05:.95, 101 recall points, classes, areas all/s/m/l, maxDets 1/10/100); -1 marks a class
    without ground truth, which is left out. iou_index 0 is IoU 0.5. A (R, K) array (one IoU, area,
    maxDets slice) is accepted too. names: K class names (sequence or {k: name}). The legend lists
    AP per class when there are at most `max_legend` classes; the mean's label is the mAP.
    """
    p = np.asarray(precision, dtype=float)
    if p.ndim == 5:
        iou = 0.5 + 0.05 * iou_index if p.shape[0] == 10 else None
        p = p[iou_index, :, :, area_index, maxdet_index]
    elif p.ndim == 2:
        iou = 0.5 if iou_index == 0 else None
    else:
        raise ValueError(f"precision must be (T, R, K, A, M) or (R, K), got shape {p.shape}")
    n_rec, k = p.shape
    if names is not None and not isinstance(names, Mapping) and len(names) != k:
        raise ValueError(f"{len(names)} names for {k} classes in the precision array")
    recall = np.linspace(0, 1, n_rec)
    defined = [c for c in range(k) if (p[:, c] > -1).all()]

    fig = _new_figure(7, 5.5, 100)
    ax = fig.subplots()
    legend = len(defined) <= max_legend
    for c in defined:
        ap = p[:, c].mean()
        ax.plot(recall, p[:, c], linewidth=1, alpha=0.8 if legend else 0.4,
                color=tuple(v / 255 for v in class_color(c)), label=f"{_name_of(names, c)} {ap:.3f}" if legend else None)
    if defined:
        mean = p[:, defined].mean(axis=1)
        ax.plot(recall, mean, linewidth=3, color="#1f4e9c", label=f"all classes {mean.mean():.3f} mAP" + (f"@{iou:.2f}" if iou is not None else ""))
    else:
        ax.text(0.5, 0.5, "no class with ground truth", ha="center", va="center", transform=ax.transAxes)
    ax.set(xlim=(0, 1), ylim=(0, 1.01), xlabel="Recall", ylabel="Precision")
    ax.set_title("Precision-Recall" + (f" @ IoU {iou:.2f}" if iou is not None else ""), fontsize=10)
    ax.grid(alpha=0.3)
    if defined:
        if legend:
            ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
        else:
            ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    return _save_figure(fig, out_path, 100)


# -------------------------------------------------------------------------------------- detections


def _as_rgb_uint8(image) -> np.ndarray:
    img = np.asarray(image)
    if img.ndim == 3 and img.shape[0] in (1, 3) and img.shape[-1] not in (1, 3):
        img = np.moveaxis(img, 0, -1)  # CHW
    if img.ndim == 3 and img.shape[-1] == 1:
        img = img[..., 0]
    if img.ndim == 2:
        img = np.repeat(img[..., None], 3, axis=-1)
    if img.ndim != 3 or img.shape[-1] not in (3, 4):
        raise ValueError(f"image must be HxWx3 (or HxW), got shape {img.shape}")
    img = img[..., :3]
    if img.dtype != np.uint8:
        img = img.astype(np.float64)
        if img.size and np.nanmax(img) <= 1.0:
            img = img * 255.0
        img = np.clip(np.nan_to_num(img), 0, 255).round().astype(np.uint8)
    return np.ascontiguousarray(img)


def _font(size: int):
    from PIL import ImageFont

    with contextlib.suppress(TypeError, OSError, AttributeError):
        return ImageFont.load_default(size=size)  # Pillow >= 10.1
    return ImageFont.load_default()


def draw_detections(image_uint8, boxes_xyxy, classes, scores=None, names=None, out_path=None, gt_boxes=None, *,
                    line_width: int | None = None, gt_color=(255, 255, 255)) -> np.ndarray:
    """Draw detections on a copy of an image and return it (H, W, 3) uint8; save it if out_path.

    boxes_xyxy: (N, 4) pixels; classes (N,) ids; scores (N,) or None; names: sequence or
    {id: name} (None: the id). Each box is outlined in `class_color(class)`, `line_width` pixels
    wide inward from its edge (default scales with the image), with a filled label "name 0.87"
    above it (inside when there is no room above). gt_boxes (M, 4), if given, are drawn first,
    1 pixel wide in gt_color, so the detections sit on top.
    """
    from PIL import Image, ImageDraw

    img = Image.fromarray(_as_rgb_uint8(image_uint8))
    w, h = img.size
    lw = line_width or max(round((w + h) / 2 * 0.003), 2)
    draw = ImageDraw.Draw(img)
    font = _font(max(round(lw * 5), 10))

    if gt_boxes is not None:
        for b in np.asarray(gt_boxes, dtype=float).reshape(-1, 4):
            if np.isfinite(b).all():
                draw.rectangle(_clip_box(b, w, h), outline=tuple(gt_color), width=1)

    boxes = np.asarray(boxes_xyxy, dtype=float).reshape(-1, 4)
    classes = np.asarray(classes).reshape(-1).astype(int) if classes is not None else np.zeros(len(boxes), int)
    scores = None if scores is None else np.asarray(scores, dtype=float).reshape(-1)
    if len(classes) != len(boxes) or (scores is not None and len(scores) != len(boxes)):
        raise ValueError(f"{len(boxes)} boxes, {len(classes)} classes, "
                         f"{'no' if scores is None else len(scores)} scores: lengths differ")
    for i, b in enumerate(boxes):
        if not np.isfinite(b).all():
            continue
        c = int(classes[i])
        color = class_color(c)
        x1, y1, x2, y2 = _clip_box(b, w, h)
        draw.rectangle((x1, y1, x2, y2), outline=color, width=lw)
        label = _name_of(names, c) + ("" if scores is None else f" {scores[i]:.2f}")
        l, t, r, btm = draw.textbbox((0, 0), label, font=font)
        tw, th = r - l, btm - t
        pad = max(lw // 2, 1)
        outside = y1 - th - 2 * pad >= 0
        ty = y1 - th - 2 * pad if outside else y1
        draw.rectangle((x1, ty, x1 + tw + 2 * pad, ty + th + 2 * pad), fill=color)
        text_color = (0, 0, 0) if sum(color) > 382 else (255, 255, 255)
        draw.text((x1 + pad - l, ty + pad - t), label, fill=text_color, font=font)

    out = np.asarray(img).copy()
    if out_path is not None:
        _save_image(out, out_path)
    return out


def _clip_box(b, w: int, h: int) -> tuple[int, int, int, int]:
    x1, y1, x2, y2 = (round(float(v)) for v in b)
    x1, x2 = sorted((min(max(x1, 0), w - 1), min(max(x2, 0), w - 1)))
    y1, y2 = sorted((min(max(y1, 0), h - 1), min(max(y2, 0), h - 1)))
    return x1, y1, x2, y2


def save_grid(images: Sequence, out_path, cols: int = 4, *, pad: int = 4, background=(114, 114, 114)) -> Path:
    """Tile images (each HxWx3 uint8, sizes may differ) row-major into one image file.

    Each cell is as large as the largest image; images sit at their cell's top-left corner with
    `pad` pixels of `background` between cells. Returns the path written (format by extension).
    """
    imgs = [_as_rgb_uint8(im) for im in images]
    if not imgs:
        raise ValueError("save_grid: no images")
    cols = max(1, min(int(cols), len(imgs)))
    rows = math.ceil(len(imgs) / cols)
    ch = max(im.shape[0] for im in imgs)
    cw = max(im.shape[1] for im in imgs)
    grid = np.empty((rows * ch + (rows + 1) * pad, cols * cw + (cols + 1) * pad, 3), np.uint8)
    grid[:] = np.asarray(background, np.uint8)
    for n, im in enumerate(imgs):
        r, c = divmod(n, cols)
        y, x = pad + r * (ch + pad), pad + c * (cw + pad)
        grid[y:y + im.shape[0], x:x + im.shape[1]] = im
    return _save_image(grid, out_path)
