"""The pipeline (`jaxyolo.search.pipeline`) and its report: configs, plan, statistics, and one
minimal run of every stage that is interrupted mid-way and resumed."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

import jaxyolo
from jaxyolo.errors import ConfigError
from jaxyolo.search import pipeline as PL
from jaxyolo.search import report as R
from jaxyolo.train_options import parse_setting

SHARED = Path(__file__).resolve().parents[2] / "shared"

# ------------------------------------------------------------------------------ statistics


def test_paired_t_test_matches_the_closed_form():
    a, b = [0.10, 0.20, 0.30], [0.15, 0.22, 0.38]  # differences 0.05, 0.02, 0.08
    pt = R.paired_test(a, b)
    sd = math.sqrt((0.0**2 + 0.03**2 + 0.03**2) / 2)
    t = 0.05 / (sd / math.sqrt(3))
    p = 1 - t / math.sqrt(2 + t * t)  # two-sided p of Student's t with 2 degrees of freedom
    assert pt["n"] == 3 and pt["mean_diff"] == pytest.approx(0.05) and pt["std_diff"] == pytest.approx(sd)
    assert pt["t"] == pytest.approx(t, rel=1e-9) and pt["p"] == pytest.approx(p, rel=1e-9)
    assert R.paired_test([0.1, 0.2], [0.2, 0.3])["t"] is None  # identical differences: no test
    assert R.paired_test([0.1], [0.2])["std_diff"] is None


def test_undefined_metrics_are_left_out_of_the_mean():
    res = {"seeds": [{"AP": 0.2, "APl": -1.0}, {"AP": 0.4, "APl": 0.3}]}
    assert R.summarize(R.seed_values(res, "AP")) == pytest.approx({"mean": 0.3, "std": math.sqrt(0.02), "n": 2})
    assert R.summarize(R.seed_values(res, "APl")) == {"mean": 0.3, "std": None, "n": 1}


def _row(*aps):
    return {"seeds": [{"seed": i, **{k: ap for k in R.METRICS}} for i, ap in enumerate(aps)]}


def test_tables_show_means_pending_rows_and_tests(tmp_path):
    cfg = PL.load_config("demo")
    results = {"A": _row(0.10, 0.12), "D": _row(0.11, 0.15),
               "kst": {"rows": [{"seed": s, "shift": sh, "scale": sc, **{k: 0.1 * (s + 1) for k in R.METRICS}}
                                for s in (0, 1) for sh, sc in (("centroid", "centroid"), (0, 0))]}}
    tabs = R.tables(cfg, results)
    a_row = tabs["table3"]["rows"][0]
    assert a_row[1] == f"{11.0:.2f} ± {100 * np.std([0.10, 0.12], ddof=1):.2f}"
    assert tabs["table3"]["rows"][2][1] == "pending"  # E has not run
    sig = {r[0]: r for r in tabs["significance"]["rows"]}
    assert sig["A → D"][2] == f"{100 * 0.02:+.2f} ± {100 * np.std([0.01, 0.03], ddof=1):.2f}"
    assert sig["A → D"][3].startswith("t=2.00")  # mean 0.02 / (0.01414 / sqrt 2)
    assert sig["D → E"][2] == "pending"
    assert [r[:2] for r in tabs["table4"]["rows"]] == [["centroid", "centroid"], ["0", "0"]]
    assert tabs["table4"]["rows"][0][2] == f"{15.0:.2f} ± {100 * np.std([0.1, 0.2], ddof=1):.2f}"
    path = R.write(cfg, tmp_path, results)
    text = path.read_text()
    assert "Table 1" in text and "Pending stages: B, jhs_l, C, jhs_s, E, F, F_l, deploy." in text
    assert json.loads((tmp_path / "report.json").read_text())["tables"]["table3"] == tabs["table3"]


# ------------------------------------------------------------------------------ configs and plan


def test_bundled_configs_load_and_the_coco_plan_is_the_papers(tmp_path):
    assert {"demo", "coco128", "coco"} <= set(PL.bundled())
    cfg = PL.load_config("coco")
    steps = PL.plan(cfg, tmp_path)
    de, bc, f = steps["DE"]["options"], steps["BC"]["options"], steps["F"]["options"]
    # spec: YOLOv4s student with 3 shift and 3 scale candidates, YOLOv4l teacher, 300 epochs at 640
    assert (de.model.name, de.model.options, de.optim.epochs, de.data.img_size) == \
        ("yolov4s", {"head": "implicit", "kst": 3}, 300, 640)
    assert de.hyp == "reference-s" and de.recipe.min_warmup_iters == 1000
    assert steps["A"]["options"].model.options["head"] == "detect"
    assert (bc.model.name, bc.model.options["head"]) == ("yolov4l", "detect")
    assert steps["DE"]["rows"] == {"D": "default", "E": "JHS_s"}
    # the teacher of F is C's seed-0 member: B's members come first in the BC population
    assert f.distill.teacher == str(PL.weights_folder(Path(bc.out), cfg.seeds, 2 * cfg.seeds))
    jhs_s, jhs_l = steps["jhs_s"]["options"].train, steps["jhs_l"]["options"].train
    assert (jhs_s.model.name, jhs_l.model.name) == ("yolov4s", "yolov4l")
    # the trials: the pipeline's settings, their own subset, and no warm-up floor
    assert (jhs_s.data.subset, jhs_s.recipe.min_warmup_iters, jhs_s.data.img_size, jhs_s.hyp) == \
        (20000, 0, 640, "reference-s")
    assert de.data.subset is None
    assert Path(cfg.data).is_absolute() and cfg.data.endswith("configs/data/coco.yaml")


def test_overrides_and_config_errors(tmp_path):
    cfg = PL.load_config("demo", {"train.optim.epochs": 2, "student.model": "yolov4n", "search.population": 2})
    assert (cfg.train.optim.epochs, cfg.student.model, cfg.search["population"]) == (2, "yolov4n", 2)
    assert parse_setting("deploy.img=[64, 96]") == ("deploy.img", [64, 96])
    with pytest.raises(ConfigError, match="epochs is now train.optim.epochs"):
        PL.load_config("demo", {"epochs": 2})  # the settings before they were one tree
    with pytest.raises(ConfigError, match=r"train.data.imgsize: unknown setting.*img_size"):
        PL.load_config("demo", {"train.data.imgsize": 64})
    with pytest.raises(ConfigError, match=r"train.data.source: set by each stage"):
        PL.load_config("demo", {"train.data.source": "synthetic"})
    with pytest.raises(ConfigError, match=r"search.train.optim.epochz: unknown setting"):
        PL.load_config("demo", {"search.train.optim.epochz": 3})
    with pytest.raises(ConfigError, match=r"train.data.img_size: must be a multiple of 32"):
        PL.load_config("demo", {"train.data.img_size": 100})
    bad = tmp_path / "bad.yaml"
    bad.write_text("data: synthetic\nstudent: yolov4p\nteacher: yolov4n\nepochz: 3\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key\(s\) epochz"):
        PL.load_config(bad)
    with pytest.raises(ConfigError, match="search: unknown key"):
        PL.load_config("demo", {"search.populashun": 2})
    with pytest.raises(ConfigError, match="student.head"):
        PL.load_config("demo", {"student.head": "fancy"})
    with pytest.raises(ConfigError, match="kd_obj"):
        PL.load_config("demo", {"distill.kd_obj": -1})
    with pytest.raises(ConfigError, match="no bundled pipeline"):
        PL.load_config("nope")


def test_units_pull_in_their_dependencies():
    assert PL.units_for(["A"]) == ["A"]
    assert PL.units_for(["F_l"]) == ["jhs_l", "BC", "jhs_s", "F"]
    assert PL.units_for(["kst", "C"]) == ["jhs_l", "BC", "jhs_s", "DE", "kst"]
    assert PL.units_for(PL.STAGES) == list(PL.UNITS)
    with pytest.raises(ConfigError, match="unknown G"):
        PL.units_for(["G"])


def test_init_seeds_give_each_member_its_own_initialisation():
    from jaxyolo import train_step as T
    from jaxyolo.train_loop import initial_population
    from jaxyolo.train_options import ModelSettings, TrainOptions

    opts = TrainOptions(model=ModelSettings("yolov4p", options={"kst": 2}), init_seeds=[3, 5, 3])
    det = jaxyolo.create_model("yolov4p", num_classes=80, kst=2, seed=0)
    state = initial_population(opts, det, 3)
    for m, s in enumerate((3, 5, 3)):
        want = T.init_state(jaxyolo.create_model("yolov4p", num_classes=80, kst=2, seed=s)).params
        got = T.member(state, m).params
        assert all(np.array_equal(a, b) for a, b in zip(jax_leaves(want), jax_leaves(got)))
    with pytest.raises(ConfigError, match="init_seeds"):
        TrainOptions(init_seeds=[0, -1]).check()


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


# ------------------------------------------------------------------------------ a whole run


MINIMAL = """
data: synthetic:num_train=16,num_val=8,img_size=64-96,seed=0
search_data: synthetic:num_train=16,num_val=8,img_size=64-96,seed=1
student: {model: yolov4p, kst: 2}
teacher: {model: yolov4p}
train:
  data: {img_size: 64, batch_size: 8}
  optim: {epochs: 1, nominal_batch: 8}
  recipe: {min_warmup_iters: 0}
seeds: 2
search: {population: 2, generations: 1, trial_epochs: 1, grid_dims: 1}
distill: {kd_obj: 1.0, kd_cls: 1.0, kd_box: 0.05}
deploy: {img: [64], runs: 2, warmup: 1}
"""


class Interrupt(Exception):
    pass


def _plain(info: dict) -> dict:
    return {k: v for k, v in info.items() if isinstance(v, (str, int, float, bool, list)) or v is None}


@pytest.fixture(scope="session")
def minimal_run(runs_root):
    """The minimal config run with an interruption inside unit F (after its training state is
    saved), then rerun; built once per session for all xdist workers. Returns (config, out,
    events of the first run, events of the rerun, the rerun's result)."""
    from helpers.train_runs import build_once, data_cache

    def build(root):
        root.mkdir(parents=True)
        (root / "minimal.yaml").write_text(MINIMAL)
        cfg = PL.load_config(root / "minimal.yaml")
        first, second, unit = [], [], {"now": None}

        def interrupting(info):
            first.append(_plain(info))
            if info.get("event") == "stage":
                unit["now"] = info["stage"]
            if unit["now"] == "F" and info.get("event") == "epoch":
                raise Interrupt

        with data_cache(runs_root):
            with pytest.raises(Interrupt):
                PL.run_pipeline(cfg, root / "run", progress=interrupting)
            PL.run_pipeline(cfg, root / "run", progress=lambda info: second.append(_plain(info)))
        (root / "events.json").write_text(json.dumps({"first": first, "second": second}))

    root = build_once(runs_root / "pipeline", build)
    cfg = PL.load_config(root / "minimal.yaml")
    events = json.loads((root / "events.json").read_text())
    with data_cache(runs_root):
        res = PL.run_pipeline(cfg, root / "run")  # everything cached: reads the results back
    return cfg, root / "run", events["first"], events["second"], res


def test_a_minimal_pipeline_runs_every_stage_and_resumes(minimal_run):
    cfg, out, first, second, res = minimal_run
    started = [e["stage"] for e in first if e.get("event") == "stage" and e["status"] == "start"]
    assert started == ["A", "jhs_l", "BC", "jhs_s", "DE", "F"]
    status = {e["stage"]: e["status"] for e in second if e.get("event") == "stage"}
    assert status == {**{u: "cached" for u in ("A", "jhs_l", "BC", "jhs_s", "DE")},
                      "F": "done", "kst": "done", "deploy": "done"}
    f_start = next(e for e in second if e.get("event") == "start")  # the trainer's, inside F
    assert f_start["step"] == f_start["iterations"] > 0  # F resumed from its saved state, not retrained
    assert set(res.results) == set(PL.STAGES)
    for row in ("A", "B", "C", "D", "E", "F", "F_l"):
        assert [s["seed"] for s in res.results[row]["seeds"]] == [0, 1]
    # the two seeds are two initialisations
    w = [jaxyolo.load(s["weights"]).state_dict() for s in res.results["A"]["seeds"]]
    assert any(not np.array_equal(w[0][k], w[1][k]) for k in w[0])
    # F distils from C's seed 0 with JHS_s + the kd weights; F_l with JHS_l
    assert res.results["F"]["teacher"] == res.results["C"]["seeds"][0]["weights"]
    assert res.results["F"]["hyp"]["kd_obj"] == 1.0 and res.results["F_l"]["hyp_name"] == "JHS_l+kd"
    assert {k: v for k, v in res.results["E"]["hyp"].items()} == res.results["jhs_s"]["best_hyp"]


def test_the_report_has_every_table(minimal_run):
    cfg, out, *_ , res = minimal_run
    tabs = json.loads((out / "report.json").read_text())["tables"]
    assert set(tabs) == {"table1", "table2", "table3", "significance", "table4", "table5"}
    for name in ("table1", "table2", "table3"):
        assert all("±" in r[-6] or r[-6] == "–" for r in tabs[name]["rows"])  # 2 seeds: mean ± std
    assert len(tabs["table4"]["rows"]) == 1 + 2 * 2  # centroid + K x K
    # Table 4's centroid row is D itself (the fold of the KST mean is D's inference form)
    d_ap = R.summarize(R.seed_values(res.results["D"], "AP"))["mean"]
    centroid = [r for r in res.results["kst"]["rows"] if r["shift"] == "centroid"]
    assert np.mean([r["AP"] for r in centroid]) == pytest.approx(d_ap, abs=1e-6)
    text = (out / "report.md").read_text()
    for title in ("Table 1.", "Table 2.", "Table 3.", "Table 4.", "Table 5.", "Paired t-tests"):
        assert title in text
    assert "Pending" not in text


def test_the_final_student_is_exported_and_loadable(minimal_run):
    cfg, out, *_, res = minimal_run
    dep = res.results["deploy"]
    assert [(out / p).exists() for p in dep["onnx"]] == [True] and dep["rows"][0]["img"] == 64
    final = jaxyolo.load(out / dep["checkpoint"])
    f0 = jaxyolo.load(res.results["F"]["seeds"][0]["weights"])
    a, b = final.state_dict(), f0.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    # the picture of its detections: one tile per held-out image (8 here), named in the report
    from PIL import Image

    assert dep["picture"] == "final/detections.jpg"
    with Image.open(out / dep["picture"]) as im:
        w, h = im.size
    assert w > 4 * 64 and h > 2 * 64  # a 4 x 2 grid of images at least 64 px each
    assert "final/detections.jpg" in (out / "report.md").read_text()


def test_a_rerun_is_cached_and_a_changed_config_is_refused(minimal_run, runs_root):
    from helpers.train_runs import data_cache

    cfg, out, *_ = minimal_run
    events = []
    with data_cache(runs_root):
        PL.run_pipeline(cfg, out, progress=events.append)
    assert {e["status"] for e in events if e.get("event") == "stage"} == {"cached"}
    import dataclasses

    with pytest.raises(ConfigError, match="epochs: 1 -> 2"):
        PL.run_pipeline(dataclasses.replace(cfg, train=cfg.train.updated({"optim.epochs": 2})), out)


@pytest.mark.skipif(not (SHARED / "data" / "coco128").exists(), reason="needs ../shared/data/coco128")
def test_the_coco_config_trains_a_few_steps(tmp_path):
    """The paper's configuration, stage A, on a tiny slice of real photographs (coco128 in the COCO
    layout): 2 steps of yolov4s at 64x64, evaluated on the held-out photos."""
    data = str(Path(__file__).resolve().parents[1] / "configs" / "data" / "coco128.yaml")
    cfg = PL.load_config("coco", {"data": data, "train.data.subset": 8, "train.optim.epochs": 1,
                                  "train.data.img_size": 64, "train.data.batch_size": 4,
                                  "train.optim.nominal_batch": 4, "train.recipe.min_warmup_iters": 0})
    res = PL.run_pipeline(cfg, tmp_path / "coco", stages=["A"])
    a = res.results["A"]
    assert a["model"] == "yolov4s" and a["head"] == "detect" and len(a["seeds"]) == 1
    assert 0.0 <= a["seeds"][0]["AP50"] <= 1.0
    assert "pending" in (tmp_path / "coco" / "report.md").read_text()


def test_the_demo_resumes_only_its_own_configuration(tmp_path):
    """`jaxyolo demo` resumes a demo run made with today's demo.yaml and starts any other afresh."""
    from jaxyolo.tools.cli import _same_pipeline

    out = tmp_path / "demo"
    out.mkdir()
    assert not _same_pipeline(out, [])  # no pipeline run in it
    (out / "pipeline.json").write_text(json.dumps({"format": PL.FORMAT, "config": PL.load_config("demo").to_dict()}))
    assert _same_pipeline(out, [])
    assert not _same_pipeline(out, ["train.optim.epochs=1"])  # an older or overridden demo


def test_a_pipeline_run_of_the_flat_layout_is_refused_by_format(tmp_path):
    (tmp_path / "pipeline.json").write_text(json.dumps({"format": "jaxyolo-pipeline/1", "config": {"epochs": 1}}))
    with pytest.raises(ConfigError, match="'jaxyolo-pipeline/1', this jaxyolo reads 'jaxyolo-pipeline/2'"):
        PL.config_changes(PL.load_config("demo"), tmp_path)
