"""Train several hyp sets together (one population, same data, seed and starting weights) and print
each member's last validation metrics: the fair way to compare a search's winner with the defaults.

    python benchmarks/compare_hyps.py --model yolov4n --data configs/data/coco128.yaml \
        --weights runs/pre/weights/last --img 256 --batch 16 --epochs 8 \
        --out runs/compare reference-s runs/search/NAME/best_hyp.yaml
"""

from __future__ import annotations

import argparse
import json

from jaxyolo import hyp as H
from jaxyolo.train_loop import fit
from jaxyolo.train_options import TrainOptions


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("hyps", nargs="+", help="bundled hyp names or hyp YAML files")
    ap.add_argument("--model", default="yolov4n")
    ap.add_argument("--data", required=True)
    ap.add_argument("--weights")
    ap.add_argument("--img", type=int, default=256)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--nominal-batch", type=int, default=16)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    opts = TrainOptions().updated({
        "model.name": args.model, "model.weights": args.weights, "data.source": args.data, "data.img_size": args.img,
        "data.batch_size": args.batch, "optim.nominal_batch": args.nominal_batch, "recipe.min_warmup_iters": 0,
        "optim.epochs": args.epochs, "eval.every": args.epochs, "seed": args.seed, "out": args.out})
    res = fit(opts, hyps=[H.load_hyp(h) for h in args.hyps])
    last = {r["member"] if "member" in r else 0: r for r in res.history}
    for m, h in enumerate(args.hyps):
        r = last[m]
        print(json.dumps({"hyp": h, "fitness": r["fitness"], "AP50": r["metrics/AP50"], "AP": r["metrics/AP"]}))


if __name__ == "__main__":
    main()
