"""`jaxyolo predict --weights W --source PATH --out DIR`: images with their detections drawn.

Each image's drawing is written as soon as it is done, and its record is appended to
`detections.jsonl` (one JSON object per line, flushed), so a run that is stopped keeps what it
finished; `detections.json` (the whole list) is written at the end. A file that cannot be decoded is
skipped, named on stderr and counted; the run goes on with the next one.
"""

from __future__ import annotations

import json
import sys
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
    from jaxyolo.data.yolo import read_rgb
    from jaxyolo.errors import ConfigError
    from jaxyolo.files import atomic_write_text
    from jaxyolo.plots import draw_detections
    from jaxyolo.predict import image_files, predict

    det = jaxyolo.load(args.weights)
    img_size = args.img or det.img_size or 640
    files = image_files(args.source)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    records, skipped = [], []
    with open(out / "detections.jsonl", "w") as lines:
        for f in tqdm(files, desc="predict", unit="img", disable=None):  # disable=None: no bar in a log file
            try:
                img = read_rgb(f)
            except ConfigError as e:
                skipped.append(f.name)
                print(f"jaxyolo predict: skipped {e}", file=sys.stderr)
                continue
            boxes, scores, classes = predict(det, img, img_size=img_size, conf_thres=args.conf, iou_thres=args.iou)
            draw_detections(img, boxes, classes, scores, det.names, out_path=out / f"{f.stem}.jpg")
            record = {"file": f.name, "detections": [
                {"box": [round(float(v), 2) for v in b], "score": round(float(s), 4), "class": det.names[int(c)]}
                for b, s, c in zip(boxes, scores, classes)]}
            records.append(record)
            lines.write(json.dumps(record) + "\n")
            lines.flush()
    atomic_write_text(out / "detections.json", json.dumps(records, indent=1))
    n = sum(len(r["detections"]) for r in records)
    print(f"{len(records)} image(s), {n} detection(s) -> {out}")
    if skipped:
        print(f"jaxyolo predict: {len(skipped)} of {len(files)} file(s) could not be decoded and were skipped: "
              f"{', '.join(skipped[:10])}{' ...' if len(skipped) > 10 else ''}", file=sys.stderr)
    if not records:
        raise ConfigError(f"source {args.source}: none of the {len(files)} file(s) could be decoded")
    return 0
