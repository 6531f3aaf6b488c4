"""Ablation pipelines (`jaxyolo.search.ablation`, `kind: ablation` configs such as `gfl`): the
config checks, ANOVA and Tukey's HSD against a textbook example, and a tiny run end to end
(population rows, a 2:4 fine-tune per seed, a distilled row, the report, a cached rerun)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from helpers import train_runs as R

from jaxyolo.errors import ConfigError
from jaxyolo.search import ablation as A
from jaxyolo.search import pipeline as PL

TINY = str(Path(__file__).parent / "helpers" / "gfl_tiny.yaml")


def test_anova_and_tukey_match_the_textbook_example():
    # three groups of five (Hollander & Wolfe's example as scipy's tukey_hsd documents it): the
    # published Tukey p-values are 0.014 (0 vs 1), 0.980 (0 vs 2) and 0.020 (1 vs 2)
    g = {"0": [24.5, 23.5, 26.4, 27.1, 29.9], "1": [28.4, 34.2, 29.5, 32.2, 30.1], "2": [26.1, 28.3, 24.3, 26.2, 27.8]}
    res = A.anova(g)
    pairs = {(p["a"], p["b"]): p for p in res["pairs"]}
    assert pairs["0", "1"]["p"] == pytest.approx(0.014, abs=5e-4)
    assert pairs["0", "2"]["p"] == pytest.approx(0.980, abs=5e-4)
    assert pairs["1", "2"]["p"] == pytest.approx(0.020, abs=5e-4)
    assert pairs["0", "1"]["diff"] == pytest.approx(4.6) and pairs["1", "2"]["diff"] == pytest.approx(-4.34)
    assert pairs["0", "1"]["low"] < 4.6 < pairs["0", "1"]["high"]
    # F from the sums of squares, by hand
    allv = np.concatenate(list(g.values()))
    ssb = sum(len(v) * (np.mean(v) - allv.mean()) ** 2 for v in g.values())
    ssw = sum(((np.asarray(v) - np.mean(v)) ** 2).sum() for v in g.values())
    assert res["F"] == pytest.approx((ssb / 2) / (ssw / 12))
    assert A.anova({"a": [1.0, 2.0], "b": [math.nan]}) is None  # one usable group: no analysis


def _write(tmp_path, rows, **extra):
    cfg = {"kind": "ablation", "data": R.DATA, "seeds": 2,
           "train": {"data": {"img_size": 64, "batch_size": 8}, "optim": {"epochs": 1, "nominal_batch": 8},
                     "recipe": {"min_warmup_iters": 2}, "eval": {"plots": False}},
           "rows": rows, **extra}
    path = tmp_path / "abl.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_config_errors_name_the_row(tmp_path):
    row = {"name": "a", "set": {"model.name": TINY}}
    with pytest.raises(ConfigError, match=r"rows.b.start: no row named 'x'"):
        PL.load_config(_write(tmp_path, [row, {"name": "b", "start": "x"}]))
    with pytest.raises(ConfigError, match="rows.a.set: out"):
        PL.load_config(_write(tmp_path, [{"name": "a", "set": {"out": "elsewhere"}}]))
    with pytest.raises(ConfigError, match="unknown key"):
        PL.load_config(_write(tmp_path, [{"name": "a", "sett": {}}]))
    with pytest.raises(ConfigError, match="cycle"):
        PL.load_config(_write(tmp_path, [{"name": "a", "start": "b"}, {"name": "b", "teacher": "a"}]))
    with pytest.raises(ConfigError, match="distinct"):
        PL.load_config(_write(tmp_path, [row, row]))


def test_bundled_gfl_configs_load_and_their_first_row_trains(runs_root, tmp_path):
    cpu = PL.load_config("gfl")
    assert [r.name for r in cpu.rows] == ["1", "2", "3", "4d", "T", "4", "5"] and cpu.seeds >= 3
    coco = PL.load_config("gfl-coco")
    assert coco.data.endswith("configs/data/coco.yaml")
    five = {r.name: r for r in coco.rows}["5"]
    o = A.options(coco, five, tmp_path / "coco", 0)
    assert o.model.sparsity == "2:4" and o.distill.teacher.endswith("rows/T/train/weights/last")
    assert o.model.weights.endswith("rows/4d/train/weights/last") and o.data.img_size == 416
    # a few steps of the COCO table's first row (Lite0), on the tiny generated data
    from jaxyolo.train_loop import fit

    first = A.options(coco, coco.rows[0], tmp_path / "coco", None).updated(
        {"data.source": R.DATA, "data.img_size": 64, "data.batch_size": 8, "optim.epochs": 1,
         "optim.nominal_batch": 8, "recipe.min_warmup_iters": 2, "eval.plots": False})
    with R.data_cache(runs_root):
        res = fit(first)
    assert res.detectors[0].spec.name == "gfl-lite0" and math.isfinite(res.records[-1].train.total)


def test_a_tiny_ablation_runs_resumes_and_reports(runs_root, tmp_path):
    rows = [{"name": "a", "label": "dense", "published": 10.0, "set": {"model.name": TINY}},
            {"name": "b", "label": "silu", "set": {"model.name": TINY, "model.options": {"act": "silu"}}},
            {"name": "s", "label": "2:4", "start": "a", "set": {"model.name": TINY, "model.sparsity": "2:4"}},
            {"name": "d", "label": "2:4 + LD", "start": "a", "teacher": "b", "hyp": {"ld_main": 0.25, "ld_vlr": 0.25},
             "set": {"model.name": TINY, "model.sparsity": "2:4"}}]
    cfg = PL.load_config(_write(tmp_path, rows))
    out = tmp_path / "run"
    with R.data_cache(runs_root):
        results, report = A.run_ablation(cfg, out)
    assert set(results) == {"a", "b", "s", "d"}
    for r in results.values():
        assert [s["seed"] for s in r["seeds"]] == [0, 1] and all(0 <= s["AP"] <= 1 for s in r["seeds"])
    # the fine-tunes started from row a's weights of their own seed, pruned exactly 2:4
    for name in ("s", "d"):
        opts = json.loads((out / "rows" / name / "seed1" / "options.json").read_text())
        assert opts["model"]["weights"].endswith("rows/a/train/weights/member1/last")
        assert results[name]["sparsity"]["weights"][0]["exact"]
    opts = json.loads((out / "rows" / "d" / "seed0" / "options.json").read_text())
    assert opts["distill"]["teacher"].endswith("rows/b/train/weights/member0/last")
    text = report.read_text()
    assert "a → b" in text and "d → " not in text.split("Paired")[0]  # consecutive comparisons
    assert "ANOVA" in text and "Tukey" in text and "2:4 sparsity, exact True" in text
    tables = json.loads((out / "report.json").read_text())["tables"]
    assert [r[0] for r in tables["rows"]["rows"]] == ["a", "b", "s", "d"] and tables["rows"]["rows"][0][2] == "10.00"
    assert len(tables["paired"]["rows"]) == 3 and len(tables["tukey"]["rows"]) == 6
    # a rerun finds every row done; another configuration in the same folder is refused
    events = []
    A.run_ablation(cfg, out, progress=events.append)
    assert [e["status"] for e in events if e["event"] == "stage"] == ["cached"] * 4
    with pytest.raises(ConfigError, match="different configuration"):
        A.run_ablation(PL.load_config(_write(tmp_path, rows[:1])), out)
