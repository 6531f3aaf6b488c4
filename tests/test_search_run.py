"""The search run (`jaxyolo.search.runner`): phases, log, best_hyp.yaml, plots, exact resume after a
real kill (synthetic fitness, no training), and one tiny real search through the CLI."""

from __future__ import annotations

import csv
import json
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from helpers import search_case as S
from helpers.train_runs import cli_main

from jaxyolo import hyp as H
from jaxyolo.errors import ConfigError
from jaxyolo.search.runner import run_search
from jaxyolo.search.space import SearchSpace


@pytest.fixture(scope="module")
def unbroken(tmp_path_factory):
    out = tmp_path_factory.mktemp("search") / "unbroken"
    ev = S.SyntheticEvaluator()
    return run_search(S.options(out), evaluate=ev), ev


def test_phases_log_and_best_hyp(unbroken):
    res, ev = unbroken
    # 4 generations of 8, then one grid population
    assert [c[0] for c in ev.calls] == ["evolve000", "evolve001", "evolve002", "evolve003", "grid000"]
    assert all(n == 8 for _, n in ev.calls[:4])
    assert len(res.trials) == sum(n for _, n in ev.calls)
    # the first member of the first generation is the start point; every later one differs
    space = SearchSpace.load(S.SPACE)
    first = res.trials[0]
    assert [first["params"][n] for n in space.names] == pytest.approx(space.start_vector().tolist())
    vectors = {tuple(t["params"][n] for n in space.names) for t in res.trials}
    assert len(vectors) == len(res.trials)  # nothing trained twice
    # frozen values never move, every value within bounds
    for t in res.trials:
        assert t["params"]["balance.1"] == 1.0 and t["params"]["balance.2"] == 0.4
        for n in space.names:
            assert space[n].low <= t["params"][n] <= space[n].high
    # the search improved on the start and best_hyp.yaml holds the best trial's hyps
    assert res.best["fitness"] == max(t["fitness"] for t in res.trials)
    assert res.best["fitness"] > S.fitness(space.hyp_from_vector(space.start_vector())) + 0.1
    loaded = H.load_hyp(res.out / "best_hyp.yaml")
    assert S.fitness(loaded) == pytest.approx(res.best["fitness"])
    # results.csv: one row per trial, the same numbers as the JSON log
    with (res.out / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(res.trials)
    assert [float(r["fitness"]) for r in rows] == [t["fitness"] for t in res.trials]
    assert float(rows[5]["lr0"]) == res.trials[5]["params"]["lr0"]
    log = json.loads((res.out / "results.json").read_text())
    assert log["trials"] == json.loads(json.dumps(res.trials))


def test_grid_follows_trends_and_loss_curves(unbroken):
    res, _ = unbroken
    info = json.loads((res.out / "grid.json").read_text())
    assert len(info["grid"]["params"]) <= 2
    # the synthetic curves: P3 and the box objective over-fit early, so their weights go down
    derived = info["loss_weights"]["derived"]
    assert derived["balance.0"][-1] < derived["balance.0"][0]
    assert derived["box"][-1] < derived["box"][0]
    grid = [t for t in res.trials if t["phase"] == "grid"]
    assert len(grid) == len(info["points"]) > 0
    for name in ("fitness.png", "params.png", "parallel.png", "trends.png", "loss_curves.png"):
        assert (res.out / name).stat().st_size > 1000, name


def test_resume_after_sigkill_equals_unbroken(unbroken, tmp_path):
    res, _ = unbroken
    out = tmp_path / "killed"
    helpers = str(Path(__file__).parent)
    code = (f"import sys; sys.path.insert(0, {helpers!r}); import runpy; sys.argv = ['x', {str(out)!r}]; "
            "runpy.run_module('helpers.search_case', run_name='__main__')")
    env = {**__import__("os").environ, "JAXYOLO_TEST_PAUSE_AFTER": "2"}
    proc = subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    seen = []
    try:
        for line in proc.stdout:
            seen.append(line.strip())
            if len(seen) == 2:
                proc.send_signal(signal.SIGKILL)
                break
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=60)
    assert seen == ["DONE evolve 0", "DONE evolve 1"], proc.stderr.read()[-2000:]
    assert len(json.loads((out / "results.json").read_text())["trials"]) == 16  # both generations kept

    ev = S.SyntheticEvaluator()
    resumed = run_search(S.options(out), resume=True, evaluate=ev)
    assert [c[0] for c in ev.calls] == ["evolve002", "evolve003", "grid000"]  # nothing finished redone
    assert json.loads(json.dumps(resumed.trials)) == json.loads(json.dumps(res.trials))
    assert (out / "best_hyp.yaml").read_text() == (res.out / "best_hyp.yaml").read_text()


def test_resume_refuses_a_changed_search_and_out_is_protected(unbroken, tmp_path):
    res, _ = unbroken
    with pytest.raises(ConfigError, match="population"):
        run_search(S.options(res.out, population=4), resume=True, evaluate=S.SyntheticEvaluator())
    with pytest.raises(ConfigError, match="exists and is not empty"):
        run_search(S.options(res.out), evaluate=S.SyntheticEvaluator())
    with pytest.raises(ConfigError, match="parent"):
        run_search(S.options(tmp_path / "x", parent="best"), evaluate=S.SyntheticEvaluator())


def test_tiny_real_search_through_the_cli(data_env, tmp_path):
    """Two generations of two members of the tiny model, trained for real (the grid phase is
    covered above; here it would compile a program for another population size)."""
    out = tmp_path / "search"
    code, stdout, err = cli_main(["search", "--model", "yolov4p", "--data", "synthetic:num_train=16,num_val=8,"
                                  "img_size=64-96", "--img", "64", "--batch", "8", "--nominal-batch", "8",
                                  "--population", "2", "--generations", "2", "--trial-epochs", "2",
                                  "--grid-dims", "0", "--out", str(out), "--no-estimate"])
    assert code == 0, err[-3000:]
    log = json.loads((out / "results.json").read_text())
    trials = log["trials"]
    assert [(t["phase"], t["generation"]) for t in trials] == [("evolve", 0)] * 2 + [("evolve", 1)] * 2
    for t in trials:
        assert np.isfinite(t["fitness"]) and 0 <= t["metrics"]["AP50"] <= 1
        assert np.asarray(t["curves"]["local"]).shape == (2, 3, 3)  # 2 epochs x 3 levels x (box, obj, cls)
    # each member trained with its own hyps: the trial folder's population run has one row per member
    with (out / "trials" / "evolve000" / "results.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert sorted({r["member"] for r in rows}) == ["0", "1"]
    assert trials[0]["fitness"] == pytest.approx(float([r for r in rows if r["member"] == "0"][-1]["fitness"]))
    assert H.load_hyp(out / "best_hyp.yaml")
    assert "best:" in stdout and "fitness per member" in stdout


def test_time_estimate_counts_every_population(data_env):
    from jaxyolo.tools.search_cmd import estimate_seconds

    opts = S.options("unused", {"data.source": "synthetic:num_train=16,num_val=8,img_size=64-96",
                                "data.img_size": 64, "data.batch_size": 8},
                     trial_epochs=2, generations=3, grid_dims=1, population=2)
    est = estimate_seconds(opts)
    assert est["populations"] == 4 and est["iterations_per_epoch"] == 2
    assert est["forward_s"] > 0 and est["seconds"] >= 4 * est["per_population"] > 0


def test_trials_distil_from_a_teacher_and_keep_no_weights(monkeypatch, tmp_path):
    """`teacher` reaches every trial's training (so kd_* keys in a space are searched), and trials
    skip the per-member weights and figures nobody reads."""
    import jaxyolo.train_loop as trainer
    from jaxyolo.search.runner import train_evaluator

    seen = []

    def fake_fit(options, hyps=None, resume=False, progress=None):
        seen.append(options)
        raise RuntimeError("stop")

    monkeypatch.setattr(trainer, "fit", fake_fit)
    ev = train_evaluator(S.options(tmp_path / "s", {"distill.teacher": "runs/t/weights/last", "distill.features": True}))
    with pytest.raises(RuntimeError, match="stop"):
        ev([H.load_hyp({"kd_obj": 0.5})], "evolve000")
    (o,) = seen
    assert (o.distill.teacher, o.distill.features, o.checkpoint.save_weights, o.eval.plots) == \
        ("runs/t/weights/last", True, False, False)


def test_a_grid_with_nothing_new_trains_nothing(tmp_path):
    """Equal fitness everywhere (an untrained budget) gives flat trends, and flat loss curves give
    no new weights: the grid then holds no new point, and no population is trained for it."""
    calls = []

    def flat(hyps, tag, epochs=None):
        calls.append(tag)
        return [{"fitness": 0.0, "metrics": {k: 0.0 for k in ("AP", "AP50", "AP75", "APs", "APm", "APl")},
                 "curves": {"local": np.ones((2, 3, 3)).tolist(), "global": np.ones((2, 3)).tolist()}}
                for _ in hyps]

    res = run_search(S.options(tmp_path / "flat", generations=2, population=3), evaluate=flat)
    assert calls == ["evolve000", "evolve001"]
    assert {t["phase"] for t in res.trials} == {"evolve"}
    assert json.loads((tmp_path / "flat" / "grid.json").read_text())["points"] == []
    assert (tmp_path / "flat" / "best_hyp.yaml").exists()
