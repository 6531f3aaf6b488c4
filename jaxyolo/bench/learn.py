"""The learn suite: held-out AP per epoch and wall time on a generated set, beside the peers.

`learn(...)` writes a generated shapes dataset (`jaxyolo.data.synthetic`; its size a parameter),
trains jaxyolo on it with `jaxyolo.train_loop.fit` and, given a peer Python (`peer_python`, a venv
with ultralytics and yolov5, see benchmarks/peers/README.md), trains ultralytics' YOLOv8 and
yolov5 on the same files with the same epochs, image size and batch (`peer_train.py`, run in that
Python). Every system's final weights predict the held-out split (confidence >= 0.001, NMS IoU
0.6, at most 300 per image) and one scorer, pycocotools on the split's COCO json, gives the AP
and AP50 of the table, so the libraries are judged alike. Per-epoch curves are each library's
own validation (jaxyolo's is pycocotools too).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

PEERS = ("ultralytics", "yolov5")
CONF, IOU = 0.001, 0.6


def learn(*, model: str = "yolov4n", head: str = "detect", hyp: str | None = None, train: int = 1000, val: int = 200,
          epochs: int = 30, img: int = 128, batch: int = 32, classes: int = 5, peer_python: str | None = None,
          peer_width: float = 0.125, out: str = "runs/bench/learn", seed: int = 0, timeout_s: float = 7200,
          log=print) -> dict:
    from jaxyolo.data.synthetic import synthetic_dataset

    out_dir = Path(out).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    data = synthetic_dataset(num_train=train, num_val=val, img_size=(img, img * 3 // 2), num_classes=classes,
                             seed=seed)
    gt = data / "annotations" / "instances_val.json"
    rows = [_jaxyolo(data, gt, out_dir / "jaxyolo", model=model, head=head, hyp=hyp, epochs=epochs, img=img,
                     batch=batch, seed=seed, log=log)]
    if peer_python:
        for lib in PEERS:
            rows.append(_peer(lib, peer_python, data, gt, out_dir / lib, epochs=epochs, img=img, batch=batch,
                              width=peer_width, seed=seed, timeout_s=timeout_s, log=log))
    return {"data": str(data), "train_images": train, "val_images": val, "classes": classes, "epochs": epochs,
            "img": img, "batch": batch, "rows": rows}


def _score(gt: Path, dets) -> dict:
    from jaxyolo.evaluate import coco_evaluate

    if not dets:
        return {"AP": 0.0, "AP50": 0.0}
    res = coco_evaluate(str(gt), dets)
    return {"AP": round(float(res["AP"]), 4), "AP50": round(float(res["AP50"]), 4)}


def _epoch_s(times: list[float]) -> float | None:
    """Median seconds per epoch after the first (which carries compilation / start-up)."""
    d = [b - a for a, b in zip(times, times[1:])]
    return round(statistics.median(d), 2) if d else None


def _jaxyolo(data: Path, gt: Path, out: Path, *, model, head, hyp, epochs, img, batch, seed, log) -> dict:
    import shutil

    from jaxyolo.data.sources import open_dataset
    from jaxyolo.train_loop import fit
    from jaxyolo.train_options import DataSettings, EvalSettings, ModelSettings, OptimSettings, TrainOptions
    from jaxyolo.validate import validate

    shutil.rmtree(out, ignore_errors=True)
    from jaxyolo import families

    yolo = families.of_model(model).name == "yolov4"  # the head choice is a YOLOv4 model option
    opts = TrainOptions(model=ModelSettings(model, options={"head": head} if yolo else {}), hyp=hyp, out=str(out),
                        seed=seed,
                        data=DataSettings(str(data), img_size=img, batch_size=batch),
                        optim=OptimSettings(epochs=epochs), eval=EvalSettings(plots=False))

    def progress(info):
        if info["event"] == "epoch":
            r = info["rows"][0]
            log(f"  jaxyolo epoch {r['epoch'] + 1}/{epochs}: AP {r['metrics/AP']:.4f} AP50 {r['metrics/AP50']:.4f} "
                f"({r['time_s']:.0f} s)")

    t0 = time.time()
    res = fit(opts, progress=progress)
    wall = time.time() - t0
    det = res.detectors[0]
    final = validate(det, open_dataset(str(data), "val"), img_size=img, conf_thres=CONF, iou_thres=IOU,
                     keep_detections=True)
    curve = [{"epoch": r["epoch"], "time_s": r["time_s"], "AP": round(r["metrics/AP"], 4),
              "AP50": round(r["metrics/AP50"], 4)} for r in res.history]
    return {"system": "jaxyolo", "model": f"{model} ({head})" if yolo else model, "params": det.num_params(),
            "gflops": round(det.gflops(img), 3), **_score(gt, final["detections"]), "wall_s": round(wall, 1),
            "epoch_s": _epoch_s([r["time_s"] for r in res.history]), "curve": curve}


def _peer(lib: str, python: str, data: Path, gt: Path, out: Path, *, epochs, img, batch, width, seed, timeout_s,
          log) -> dict:
    import csv
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    script = Path(__file__).with_name("peer_train.py")
    cmd = [python, str(script), "--lib", lib, "--data", str(data), "--epochs", str(epochs), "--img", str(img),
           "--batch", str(batch), "--width", str(width), "--seed", str(seed), "--out", str(out)]
    env = {**os.environ, "YOLO_OFFLINE": "1", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1"}
    env.pop("XLA_FLAGS", None)
    log(f"  {lib}: {' '.join(cmd)}")
    with open(out / "train.log", "w") as f:
        try:
            rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=timeout_s).returncode
        except (OSError, subprocess.TimeoutExpired) as e:
            return {"system": lib, "skipped": f"{type(e).__name__}: {e}"}
    if rc != 0 or not (out / "summary.json").exists():
        return {"system": lib, "skipped": f"exit {rc}; see {out / 'train.log'}"}
    summary = json.loads((out / "summary.json").read_text())
    with open(out / "epochs.csv") as f:
        curve = [{"epoch": int(r["epoch"]), "time_s": float(r["time_s"]), "AP": round(float(r["AP"]), 4),
                  "AP50": round(float(r["AP50"]), 4)} for r in csv.DictReader(f)]
    times = [c["time_s"] for c in curve]
    epoch_s = _epoch_s(times) if times and all(t == t for t in times) else round(summary["wall_s"] / epochs, 2)
    dets = json.loads((out / "detections.json").read_text())
    name = "yolov8 (scale n, width %g)" % width if lib == "ultralytics" else "yolov5n (width %g)" % width
    return {"system": f"{lib} {summary['version']}", "model": name, "params": summary["params"],
            "gflops": summary.get("gflops"), **_score(gt, dets), "wall_s": round(summary["wall_s"], 1),
            "epoch_s": epoch_s, "curve": curve}


def table(result: dict) -> str:
    lines = ["| system | model | params | GFLOPs | held-out AP | AP50 | train wall s | s/epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "skipped" in r:
            lines.append(f"| {r['system']} | skipped: {r['skipped']} | | | | | | |")
            continue
        flops = "?" if r.get("gflops") is None else f"{r['gflops']:.3f}"
        lines.append(f"| {r['system']} | {r['model']} | {r['params']:,} | {flops} | {r['AP']:.3f} | {r['AP50']:.3f} | "
                     f"{r['wall_s']:.0f} | {r['epoch_s']} |")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a convenience for running the suite alone
    print(table(learn(peer_python=sys.argv[1] if len(sys.argv) > 1 else None)))
