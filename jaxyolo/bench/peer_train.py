"""Train a peer library on a generated dataset and write its held-out detections (the learn suite).

Runs under the *peer* Python (a separate venv with ultralytics and yolov5; see
benchmarks/peers/README.md), so it imports nothing from jaxyolo:

    PEER_PY peer_train.py --lib ultralytics|yolov5 --data DIR --epochs 30 --img 128 --batch 32 \
        --width 0.125 --out OUT

DIR is a jaxyolo generated dataset (data.yaml, train/ and val/ images with YOLO labels). It writes
into OUT:
* `epochs.csv`: epoch, cumulative wall seconds (training and the library's own validation), and
  the library's own mAP@0.5 and mAP@0.5:0.95 on the val split;
* `detections.json`: COCO results on every val image (confidence >= 0.001, NMS IoU 0.6, at most
  300 per image; `image_id` is the file stem, `category_id` the class index) that the learn suite
  scores with pycocotools beside jaxyolo's, so all libraries are judged by one metric;
* `summary.json`: wall time, epochs, parameters, GFLOPs at the training size (`conv_gflops`) and
  the library version.
Both libraries train from scratch with SGD, lr0 0.01, their default augmentation and schedule.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import sys
import tempfile
import time
from pathlib import Path

CONF, IOU, MAX_DET = 0.001, 0.6, 300


def _data_yaml(data: Path, out: Path) -> Path:
    """A copy of the dataset's YAML with an absolute `path`, as both libraries want."""
    import yaml

    cfg = yaml.safe_load((data / "data.yaml").read_text())
    cfg["path"] = str(data.absolute())
    p = out / "data.yaml"
    p.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return p


def _val_images(data: Path) -> list[Path]:
    return sorted(p for p in (data / "val" / "images").iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))


def _record(dets: list, stem: str, xyxy, scores, classes) -> None:
    image_id = int(stem) if stem.isdigit() else stem
    for (x1, y1, x2, y2), s, c in zip(xyxy, scores, classes):
        dets.append({"image_id": image_id, "category_id": int(c), "score": round(float(s), 5),
                     "bbox": [round(float(v), 3) for v in (x1, y1, x2 - x1, y2 - y1)]})


def conv_gflops(module, img: int) -> float:
    """2 x the multiply-accumulates of every Conv2d for one img x img image, in 1e9: the convention
    of jaxyolo's `Detector.gflops`, counted here with forward hooks on the peer's torch model."""
    import torch

    total = [0]

    def hook(conv, _inputs, output):
        k = conv.kernel_size[0] * conv.kernel_size[1]
        total[0] += 2 * (conv.in_channels // conv.groups) * k * output.numel()

    handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, torch.nn.Conv2d)]
    try:
        with torch.no_grad():
            module.eval()(torch.zeros(1, 3, img, img))
    finally:
        for h in handles:
            h.remove()
    return total[0] / 1e9


def run_ultralytics(args, out: Path) -> dict:
    import yaml
    from ultralytics import YOLO, __version__

    cfg_src = Path(__import__("ultralytics").__file__).parent / "cfg" / "models" / "v8" / "yolov8.yaml"
    cfg = yaml.safe_load(cfg_src.read_text())
    cfg["scales"] = {"n": [0.33, args.width, 1024]}
    model_yaml = out / "yolov8n-peer.yaml"
    model_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))
    model = YOLO(str(model_yaml))
    t0 = time.time()
    model.train(data=str(_data_yaml(Path(args.data), out)), epochs=args.epochs, imgsz=args.img, batch=args.batch,
                optimizer="SGD", lr0=0.01, device="cpu", workers=args.workers, plots=False, project=str(out),
                name="train", exist_ok=True, pretrained=False, amp=False, seed=args.seed, verbose=False)
    wall = time.time() - t0
    rows = []
    with open(out / "train" / "results.csv") as f:
        for r in csv.DictReader(f):
            r = {k.strip(): v for k, v in r.items()}
            rows.append({"epoch": int(float(r["epoch"])), "time_s": float(r.get("time", "nan")),
                         "AP50": float(r["metrics/mAP50(B)"]), "AP": float(r["metrics/mAP50-95(B)"])})
    best = YOLO(str(out / "train" / "weights" / "last.pt"))
    dets: list = []
    for p in _val_images(Path(args.data)):
        res = best.predict(str(p), imgsz=args.img, conf=CONF, iou=IOU, max_det=MAX_DET, device="cpu",
                           verbose=False)[0]
        b = res.boxes
        _record(dets, p.stem, b.xyxy.numpy(), b.conf.numpy(), b.cls.numpy())
    n_params = sum(p.numel() for p in best.model.parameters())
    return {"lib": "ultralytics", "version": __version__, "wall_s": wall, "rows": rows, "dets": dets,
            "params": n_params, "gflops": conv_gflops(best.model, args.img)}


def run_yolov5(args, out: Path) -> dict:
    import yaml
    import yolov5
    from yolov5 import train as y5train

    root = Path(yolov5.__file__).parent
    cfg = yaml.safe_load((root / "models" / "yolov5n.yaml").read_text())
    cfg["width_multiple"] = args.width
    model_yaml = out / "yolov5n-peer.yaml"
    model_yaml.write_text(yaml.safe_dump(cfg, sort_keys=False))
    hyp = root / "data" / "hyps" / "hyp.scratch-low.yaml"
    t0 = time.time()
    y5train.run(data=str(_data_yaml(Path(args.data), out)), cfg=str(model_yaml), weights="", hyp=str(hyp),
                epochs=args.epochs, batch_size=args.batch, imgsz=args.img, device="cpu", workers=args.workers,
                project=str(out), name="train", exist_ok=True, noplots=True, seed=args.seed, optimizer="SGD")
    wall = time.time() - t0
    rows = []
    with open(out / "train" / "results.csv") as f:
        for r in csv.DictReader(f):
            r = {k.strip(): v.strip() for k, v in r.items()}
            rows.append({"epoch": int(float(r["epoch"])), "time_s": float("nan"),
                         "AP50": float(r["metrics/mAP_0.5"]), "AP": float(r["metrics/mAP_0.5:0.95"])})
    model = yolov5.load(str(out / "train" / "weights" / "last.pt"), device="cpu")
    model.conf, model.iou, model.max_det = CONF, IOU, MAX_DET
    dets: list = []
    for p in _val_images(Path(args.data)):
        pred = model(str(p), size=args.img).xyxy[0].numpy()
        _record(dets, p.stem, pred[:, :4], pred[:, 4], pred[:, 5])
    n_params = sum(p.numel() for p in model.parameters())
    return {"lib": "yolov5", "version": getattr(yolov5, "__version__", "?"), "wall_s": wall, "rows": rows,
            "dets": dets, "params": n_params, "gflops": conv_gflops(model.model, args.img)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", choices=("ultralytics", "yolov5"), required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--img", type=int, default=128)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--width", type=float, default=0.125)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    os.environ.setdefault("YOLO_OFFLINE", "1")
    os.environ.setdefault("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")  # both libraries pickle whole models
    out = Path(args.out).absolute()
    out.mkdir(parents=True, exist_ok=True)
    tempfile.tempdir = str(out)
    res = (run_ultralytics if args.lib == "ultralytics" else run_yolov5)(args, out)
    with open(out / "epochs.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["epoch", "time_s", "AP50", "AP"])
        w.writeheader()
        w.writerows(res["rows"])
    (out / "detections.json").write_text(json.dumps(res["dets"]))
    summary = {k: res[k] for k in ("lib", "version", "wall_s", "params", "gflops")}
    summary.update(epochs=args.epochs, img=args.img, batch=args.batch, width=args.width)
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
