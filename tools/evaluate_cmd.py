"""`jaxyolo eval`: COCO metrics of a detections file, or of a detector on a dataset.

    jaxyolo eval --gt GT.json --dets DETS.json [--json]
    jaxyolo eval --weights W --data DATA [--split val] [--img 640] [--json] [--save-dets D.json]

The same numbers as cocoapi's own demo (`jaxyolo.evaluate.coco_evaluate`; `--engine pycocotools`
runs pycocotools itself instead of faster-coco-eval's port of it), printed in cocoapi's
layout or as one JSON object, so a results file from any detector can be scored the way the
paper's AP is.
"""

from __future__ import annotations

import json
import math

from jaxyolo.errors import JaxyoloError


def add_parser(subparsers):
    """Register the `eval` sub-command on an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="COCO AP of a detections json, or of a detector on a dataset")
    p.add_argument("--gt", help="COCO ground-truth json (instances_*.json)")
    p.add_argument("--dets", help="COCO results json: a list of {image_id, category_id, bbox, score}")
    p.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--engine", choices=("faster-coco-eval", "pycocotools"), default="faster-coco-eval",
                   help="implementation of cocoapi's evaluation (the same numbers; faster-coco-eval is 3-4x faster)")
    p.add_argument("--weights", help="a jaxyolo checkpoint folder (e.g. runs/train/NAME/weights/best)")
    p.add_argument("--data", help="data YAML, COCO json, tfds:NAME or synthetic[:k=v,...]")
    p.add_argument("--split", default="val")
    p.add_argument("--img", type=int, default=None,
                   help="square input size (default: the size the weights were trained at, else 640)")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--conf", type=float, default=0.001, help="confidence threshold (spec: 0.001)")
    p.add_argument("--iou", type=float, default=0.65, help="NMS IoU threshold (spec: 0.65 for the test)")
    p.add_argument("--save-dets", help="also write the detections as a COCO results json")
    p.set_defaults(func=run)
    return p


def _finite_or_none(v: float):
    # JSON has no NaN: an undefined per-class AP (no ground truth of that class) becomes null
    return None if isinstance(v, float) and math.isnan(v) else v


def run(args) -> int:
    """Evaluate and print; errors in the inputs raise JaxyoloError (the CLI prints them)."""
    from jaxyolo.evaluate import STAT_NAMES, coco_evaluate

    if args.weights or args.data:
        return run_model(args)
    if not (args.gt and args.dets):
        raise JaxyoloError("eval needs --gt GT.json and --dets DETS.json, or --weights W and --data DATA")
    res = coco_evaluate(args.gt, args.dets, iou_type=args.iou_type, engine=args.engine)
    if args.json:
        per_class = {name: {k: _finite_or_none(v) for k, v in row.items()} for name, row in res["per_class"].items()}
        print(json.dumps({"iou_type": args.iou_type, **{k: res[k] for k in STAT_NAMES}, "per_class": per_class}))
    else:
        print(res["summary"])
    return 0


def run_model(args) -> int:
    """Evaluate a saved detector on a dataset split."""
    import jaxyolo
    from jaxyolo.data.sources import open_dataset
    from jaxyolo.evaluate import STAT_NAMES
    from jaxyolo.validate import validate

    if not (args.weights and args.data):
        raise JaxyoloError("eval needs both --weights W and --data DATA")
    det = jaxyolo.load(args.weights)
    ds = open_dataset(args.data, args.split)
    if ds.num_classes != det.num_classes:
        raise JaxyoloError(f"--weights {args.weights} has {det.num_classes} classes, --data {args.data} "
                           f"has {ds.num_classes}")
    res = validate(det, ds, img_size=args.img, batch_size=args.batch, conf_thres=args.conf, iou_thres=args.iou,
                   keep_detections=bool(args.save_dets))
    from jaxyolo import distributed

    if not distributed.is_primary():  # with several processes, process 0 reports (the same numbers)
        return 0
    if args.save_dets:
        from pathlib import Path

        Path(args.save_dets).write_text(json.dumps(res["detections"]))
    coco = res["coco"]
    if args.json:
        out = {k: coco[k] for k in STAT_NAMES}
        out.update({"VOC_AP50_all": res["voc"]["mAP50"], "VOC_AP50_11pt": res["voc"]["mAP50_11pt"],
                    "fitness": res["fitness"], "images": len(ds),
                    "per_class": [{k: _finite_or_none(v) for k, v in row.items()} for row in res["per_class"]]})
        print(json.dumps(out))
        return 0
    print(coco["summary"])
    print(f"VOC mAP@0.5: {res['voc']['mAP50']:.4f} (all-point), {res['voc']['mAP50_11pt']:.4f} (11-point)")
    print(f"{'class':>20} {'n_gt':>6} {'AP':>7} {'AP50':>7}")
    for row in res["per_class"]:
        print(f"{row['class']:>20} {row['n_gt']:>6} {row['AP']:7.4f} {row['AP50']:7.4f}")
    return 0
