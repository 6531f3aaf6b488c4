"""`report.md` of a pipeline run: the paper's Tables 1-5, seed statistics and paired tests.

Numbers are COCO metrics in percent on the held-out split. With S seeds per row a cell is the
mean ± the sample standard deviation (ddof 1) over the seeds; a metric that is undefined for a
seed (pycocotools' −1: no object of that size) is left out of its mean. Consecutive rows are
compared by a two-sided paired t-test over the seeds (seed s of one row against seed s of the
next: the same initialisation seed and data order), `scipy.stats.ttest_rel`. `report.json` holds
the same tables for programs.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np

from jaxyolo.search.stages import STAGES, UNITS

log = logging.getLogger("jaxyolo.pipeline")

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl")
HEADER = ("AP", "AP50", "AP75", "APS", "APM", "APL")
# (from, to, what the step adds): the comparisons of the significance table
COMPARISONS = (("A", "D", "KST"), ("D", "E", "JHS_s"), ("E", "F", "SKD"), ("F_l", "F", "JHS_s vs JHS_l for SKD"),
               ("B", "C", "JHS_l on the teacher"), ("A", "F", "all three"))


def seed_values(result: dict | None, metric: str) -> list[float]:
    """The metric of every seed of a train stage, in seed order (NaN where undefined)."""
    if not result:
        return []
    return [v if (v := float(s[metric])) >= 0 else math.nan for s in result["seeds"]]


def summarize(values: list[float]) -> dict:
    v = np.asarray([x for x in values if not math.isnan(x)], np.float64)
    if not len(v):
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(v.mean()), "std": float(v.std(ddof=1)) if len(v) > 1 else None, "n": int(len(v))}


def paired_test(a: list[float], b: list[float]) -> dict:
    """Two-sided paired t-test of b − a over the seeds both rows have (NaN pairs dropped)."""
    pairs = [(x, y) for x, y in zip(a, b) if not (math.isnan(x) or math.isnan(y))]
    d = np.asarray([y - x for x, y in pairs], np.float64)
    out = {"n": int(len(d)), "mean_diff": float(d.mean()) if len(d) else None,
           "std_diff": float(d.std(ddof=1)) if len(d) > 1 else None, "t": None, "p": None}
    if len(d) > 1 and d.std(ddof=1) > 1e-9:  # equal differences (to rounding): t is undefined
        from scipy import stats

        r = stats.ttest_rel([y for _, y in pairs], [x for x, _ in pairs])
        out["t"], out["p"] = float(r.statistic), float(r.pvalue)
    return out


def cell(values: list[float]) -> str:
    s = summarize(values)
    if s["mean"] is None:
        return "–"
    text = f"{100 * s['mean']:.2f}"
    return text + (f" ± {100 * s['std']:.2f}" if s["std"] is not None else "")


def _metric_row(result: dict | None) -> list[str]:
    if not result:
        return ["pending"] + [""] * (len(METRICS) - 1)
    return [cell(seed_values(result, m)) for m in METRICS]


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def tables(cfg, results: dict) -> dict:
    """The report's tables as data: {name: {"header": [...], "rows": [[...], ...]}}."""
    s, t = cfg.student.model, cfg.teacher.model
    r = results.get
    out = {
        "table1": {"header": ["Model", *HEADER], "rows": [
            [f"A: {s}", *_metric_row(r("A"))], [f"B: {t}", *_metric_row(r("B"))],
            [f"C: {t} + JHS_l", *_metric_row(r("C"))]]},
        "table2": {"header": ["Teacher", "hyper-p.", "student", *HEADER], "rows": [
            ["no", "init", f"A: {s}", *_metric_row(r("A"))],
            ["no", "init", "D: A + KST", *_metric_row(r("D"))],
            ["no", "JHS_s", "E: D + JHS", *_metric_row(r("E"))],
            ["C", "JHS_s", "F: E + SKD", *_metric_row(r("F"))],
            ["C", "JHS_l", "F_l", *_metric_row(r("F_l"))]]},
        "table3": {"header": ["Model", *HEADER], "rows": [
            [f"A: {s}", *_metric_row(r("A"))], ["D: A + KST", *_metric_row(r("D"))],
            ["E: D + JHS", *_metric_row(r("E"))], ["F: E + SKD", *_metric_row(r("F"))]]},
    }
    sig = []
    for a, b, what in COMPARISONS:
        if not (r(a) and r(b)):
            sig.append([f"{a} → {b}", what, "pending", "", "", "", ""])
            continue
        row = [f"{a} → {b}", what]
        for m in ("AP", "AP50"):
            pt = paired_test(seed_values(r(a), m), seed_values(r(b), m))
            diff = "–" if pt["mean_diff"] is None else f"{100 * pt['mean_diff']:+.2f}" + (
                f" ± {100 * pt['std_diff']:.2f}" if pt["std_diff"] is not None else "")
            row += [diff, "–" if pt["t"] is None else f"t={pt['t']:.2f}, p={pt['p']:.3f}"]
        row.append(str(len(r(b)["seeds"])))
        sig.append(row)
    out["significance"] = {"header": ["rows", "adds", "ΔAP", "test (AP)", "ΔAP50", "test (AP50)", "seeds"],
                           "rows": sig}
    kst = r("kst")
    if kst:
        groups: dict = {}
        for row in kst["rows"]:
            groups.setdefault((row["shift"], row["scale"]), []).append(row)
        rows = [[str(sh), str(sc), *[cell([x[m] if x[m] >= 0 else math.nan for x in g]) for m in METRICS]]
                for (sh, sc), g in groups.items()]
        out["table4"] = {"header": ["ID_shift", "ID_scale", *HEADER], "rows": rows}
    dep = r("deploy")
    if dep:
        out["table5"] = {"header": ["Device", "Size", "FPS", "latency (ms)", "#param.", "GFLOPs"], "rows": [
            [f"this machine: ONNX Runtime, {dep['threads']} thread(s)", str(x["img"]), f"{x['onnx_fps']:.1f}",
             f"{x['onnx_ms']:.1f}", f"{x['params'] / 1e6:.2f}M", f"{x['gflops']:.2f}"] for x in dep["rows"]]}
    return out


def write(cfg, out: Path, results: dict) -> Path:
    """Write out/report.md, out/report.json and out/report_ap.png; returns the report's path."""
    tabs = tables(cfg, results)
    seeds = cfg.seeds
    lines = [f"# Pipeline report: {cfg.name}", ""]
    searched_on = cfg.search_data or cfg.data
    data, epochs = cfg.train.data, cfg.train.optim.epochs
    lines += [f"Student `{cfg.student.model}` (KST K={cfg.student.kst}), teacher `{cfg.teacher.model}`; "
              f"{data.img_size}×{data.img_size}, batch {data.batch_size}, {epochs} epochs "
              f"(teacher {cfg.teacher_epochs or epochs})"
              + (f", first {data.subset} training images" if data.subset else "")
              + f"; {seeds} seed(s) per row.",
              f"Trained on `{cfg.data}` (train split), evaluated on its `val` split: final EMA weights, "
              "conf 0.001, NMS IoU 0.65, COCO metrics in %.",
              f"Searches (JHS) trained and scored on `{searched_on}`"
              + (" — the evaluation split, so the JHS rows are tuned on what they are scored on."
                 if not cfg.search_data else ", never on the evaluation split."),
              "Cells: mean ± sample std over seeds (one seed: the value)." if seeds > 1 else
              "One seed per row: single values, no significance tests (rerun with `--seeds 3`).", ""]
    sections = [("table1", "Table 1. Student and teacher"),
                ("table2", "Table 2. Knowledge distillation (the distilled students carry KST)"),
                ("table3", "Table 3. Ablation"),
                ("significance", "Paired t-tests between rows (two-sided, over seeds; Δ in AP points)"),
                ("table4", "Table 4. KST: every shift × scale candidate pair of D and the centroid (their mean, "
                           "the inference form)"),
                ("table5", "Table 5. The final student (F, seed 0) deployed")]
    for key, title in sections:
        if key not in tabs:
            continue
        lines += [f"## {title}", "", markdown_table(tabs[key]["header"], tabs[key]["rows"]), ""]
    dep = results.get("deploy")
    if dep:
        lines += [f"ONNX model(s): {', '.join(f'`{p}`' for p in dep['onnx'])} (parity-gated against the JAX model); checkpoint: `{dep['checkpoint']}`. "
                  f"Machine: {dep['machine'].get('processor')}, {dep['machine'].get('cpu_count')} CPUs, "
                  f"onnxruntime {dep['machine'].get('onnxruntime')}; median of {dep['runs']} runs, batch 1.", ""]
        if dep.get("picture"):
            lines += [f"Its detections on the first held-out images (labelled boxes in white): `{dep['picture']}`", "",
                      f"![detections of the deployed student]({dep['picture']})", ""]
    for stage, who in (("jhs_l", "JHS_l (teacher)"), ("jhs_s", "JHS_s (student)")):
        res = results.get(stage)
        if res:
            lines += [f"## {who}", "",
                      f"{res['trials']} trials; fitness of the start point {res['start_fitness']:.3g}, of the best "
                      f"{res['best']['fitness']:.3g} ({res['best']['phase']} {res['best']['generation']}, "
                      f"member {res['best']['member']}). Log and plots: `stages/{stage}/search/`.", ""]
    if _plot(out, results):
        lines += ["## AP per stage", "", "![AP per stage and seed](report_ap.png)", ""]
    times = [(" + ".join(rows), results[rows[0]]["seconds"]) for rows in UNITS.values()
             if "seconds" in results.get(rows[0], {})]
    if times:
        lines += ["## Time per unit (rows that share a model train together)", "",
                  markdown_table(["unit", "minutes"], [[u, f"{t / 60:.1f}"] for u, t in times]), ""]

    pending = [s for s in STAGES if s not in results]
    if pending:
        lines += [f"Pending stages: {', '.join(pending)}.", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    (out / "report.json").write_text(json.dumps({"config": cfg.to_dict(), "tables": tabs,
                                                 "stages": sorted(results)}, indent=1))
    return path


def _plot(out: Path, results: dict) -> bool:
    stages = [s for s in ("A", "D", "E", "F", "F_l", "B", "C") if results.get(s)]
    if not stages:
        return False
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.2))
        for i, s in enumerate(stages):
            v = np.asarray(seed_values(results[s], "AP")) * 100
            ax.bar(i, np.nanmean(v) if np.isfinite(v).any() else 0.0, color="#9ecae1" if s in "BC" else "#3182bd")
            ax.scatter(np.full(len(v), i), v, color="k", s=10, zorder=3)
        ax.set_xticks(range(len(stages)), stages)
        ax.set_ylabel("AP (%)")
        ax.set_title("AP on the held-out split (bars: mean; dots: seeds)")
        fig.tight_layout()
        fig.savefig(out / "report_ap.png", dpi=110)
        plt.close(fig)
        return True
    except Exception as e:  # noqa: BLE001 - a plot must never lose a finished stage
        log.warning("could not draw %s: %s", out / "report_ap.png", e)
        return False
