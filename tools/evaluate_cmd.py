"""`jaxyolo eval --gt GT.json --dets DETS.json [--json]`: COCO metrics of a results file.

The same numbers as pycocotools' own demo (`jaxyolo.evaluate.coco_evaluate`), printed in cocoapi's
layout or as one JSON object, so a results file from any detector can be scored the way the
paper's AP is.
"""

from __future__ import annotations

import json
import math

from jaxyolo.errors import JaxyoloError


def add_parser(subparsers):
    """Register the `eval` sub-command on an argparse subparsers object."""
    p = subparsers.add_parser("eval", help="COCO AP of a detections json against a ground-truth json")
    p.add_argument("--gt", help="COCO ground-truth json (instances_*.json)")
    p.add_argument("--dets", help="COCO results json: a list of {image_id, category_id, bbox, score}")
    p.add_argument("--iou-type", choices=("bbox", "segm"), default="bbox")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.set_defaults(func=run)
    return p


def _finite_or_none(v: float):
    # JSON has no NaN: an undefined per-class AP (no ground truth of that class) becomes null
    return None if isinstance(v, float) and math.isnan(v) else v


def run(args) -> int:
    """Evaluate and print; errors in the inputs raise JaxyoloError (the CLI prints them)."""
    from jaxyolo.evaluate import STAT_NAMES, coco_evaluate

    if not (args.gt and args.dets):
        raise JaxyoloError("eval needs both --gt GT.json and --dets DETS.json")
    res = coco_evaluate(args.gt, args.dets, iou_type=args.iou_type)
    if args.json:
        per_class = {name: {k: _finite_or_none(v) for k, v in row.items()} for name, row in res["per_class"].items()}
        print(json.dumps({"iou_type": args.iou_type, **{k: res[k] for k in STAT_NAMES}, "per_class": per_class}))
    else:
        print(res["summary"])
    return 0
