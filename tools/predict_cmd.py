"""`jaxyolo predict --weights W --source PATH --out DIR`: images with their detections drawn."""

from __future__ import annotations

import json
from pathlib import Path

from tqdm import tqdm


def add_parser(subparsers):
    p = subparsers.add_parser("predict", help="detect objects in image files and draw them")
    p.add_argument("--weights", required=True, help="a jaxyolo checkpoint folder")
    p.add_argument("--source", required=True, help="an image file or a folder of images")
    p.add_argument("--out", default="runs/predict/exp")
    p.add_argument("--img", type=int, default=None,
                   help="square input size (default: the size the weights were trained at, else 640)")
    p.add_argument("--conf", type=float, default=0.25, help="confidence threshold for drawing")
    p.add_argument("--iou", type=float, default=0.45, help="NMS IoU threshold")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    import jaxyolo
    from jaxyolo.plots import draw_detections
    from jaxyolo.predict import image_files, predict, read_rgb

    det = jaxyolo.load(args.weights)
    img_size = args.img or det.img_size or 640
    files = image_files(args.source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records = []
    for f in tqdm(files, desc="predict", unit="img", disable=None):  # disable=None: no bar in a log file
        img = read_rgb(f)
        boxes, scores, classes = predict(det, img, img_size=img_size, conf_thres=args.conf, iou_thres=args.iou)
        draw_detections(img, boxes, classes, scores, det.names, out_path=out / f"{f.stem}.jpg")
        records.append({"file": f.name, "detections": [
            {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "class": det.names[int(c)]}
            for b, s, c in zip(boxes, scores, classes)]})
    (out / "detections.json").write_text(json.dumps(records, indent=1))
    n = sum(len(r["detections"]) for r in records)
    print(f"{len(files)} image(s), {n} detection(s) -> {out}")
    return 0
