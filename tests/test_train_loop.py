"""The training run (`jaxyolo.train_loop.fit`): exact resume after a real kill, results.csv, the
non-finite stop, and the checks that protect an existing run.

The runs are tiny (yolov4p, 16 synthetic training images of 64 px, batch 8: 2 iterations per epoch,
2 epochs) and shared through `helpers.train_runs`, so each program compiles once per session.
"""

from __future__ import annotations

import csv
import math
import os
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import train_runs as R
from helpers.state_files import saved_meta, saved_state

import jaxyolo
from jaxyolo import train_step as T
from jaxyolo.errors import CheckpointError, ConfigError
from jaxyolo.train_loop import TrainingError, fit
from jaxyolo.train_options import DataSettings, TrainOptions

TOTAL = R.EPOCHS * R.NB


def read_csv(path: Path) -> list[dict]:
    with path.open() as f:
        return list(csv.DictReader(f))


def state_steps(run: Path) -> list[int]:
    return sorted(int(p.name) for p in (run / "state").iterdir() if p.name.isdigit())


def assert_same_weights(a: Path, b: Path):
    sa, sb = jaxyolo.load(a).state_dict(), jaxyolo.load(b).state_dict()
    assert list(sa) == list(sb)
    different = [k for k in sa if not np.array_equal(sa[k], sb[k])]
    assert not different, f"{len(different)} of {len(sa)} tensors differ, e.g. {different[:5]}"


def lr_at(ni: int, epoch: int) -> float:
    """The lr of the weight groups at iteration ni (docs/reference.md §9; warm-up over max(round(3 * nb), 2)
    iterations: the reference floors it at 1000, these runs at min_warmup_iters = 2)."""
    lf = ((1 + math.cos(math.pi * epoch / R.EPOCHS)) / 2) * (1 - 0.2) + 0.2
    nw = max(round(3.0 * R.NB), 2)
    return (ni / nw if ni <= nw else 1.0) * 0.01 * lf


# ---------------------------------------------------------------------------------------- resume


def test_resume_after_sigkill_is_exact(killed, reference):
    info = killed.parent / "killed_info"
    # the kill came mid-epoch 2: the last checkpoint is the one after iteration NB (step NB + 1)
    assert (info / "state_steps.txt").read_text().split()[-1] == str(R.NB + 1)
    assert [r["epoch"] for r in read_csv(info / "results.csv")] == ["0"]
    assert f"resuming at iteration {R.NB + 1}" in (info / "resume_stdout.txt").read_text()

    # the EMA detector saved at the end is identical to the unbroken run's
    assert_same_weights(reference / "weights" / "last", killed / "weights" / "last")
    # ... and so is every array of the final training state (params, BN stats, SGD buffers,
    # accumulated gradients, EMA, counters)
    assert state_steps(reference) == state_steps(killed) == [TOTAL - 1, TOTAL]
    a, b = saved_state(reference, TOTAL), saved_state(killed, TOTAL)
    la, lb = jax.tree.leaves_with_path(a), jax.tree.leaves_with_path(b)
    assert [p for p, _ in la] == [p for p, _ in lb]
    different = [jax.tree_util.keystr(p) for (p, x), (_, y) in zip(la, lb) if not np.array_equal(x, y)]
    assert not different, different[:10]
    assert int(a["step"][0]) == TOTAL and int(a["ema_updates"][0]) > 0 and int(a["nonfinite_total"][0]) == 0
    ma, mb = saved_meta(reference, TOTAL), saved_meta(killed, TOTAL)
    assert ma["step"] == mb["step"] == TOTAL and ma["best_fitness"] == mb["best_fitness"]

    # the comparison means something: training moved the weights away from the initial ones
    init = jaxyolo.create_model("yolov4p", num_classes=5, kst=3, seed=0).state_dict()
    final = jaxyolo.load(reference / "weights" / "last").state_dict()
    moved = [k for k in init if k in final and not np.array_equal(init[k], final[k])]
    assert len(moved) > len(init) // 2


def test_results_csv_has_one_row_per_epoch(reference, killed):
    rows = read_csv(reference / "results.csv")
    header = list(rows[0])
    for col in ("epoch", "iterations", "time_s", "time/train_s", "time/val_s", "lr", "train/loss", "train/box", "train/obj", "train/cls",
                "train/clipped", "train/grad_norm", *(f"train/{lvl}/{t}" for lvl in ("P3", "P4", "P5") for t in ("box", "obj", "cls")),
                "val/loss", "val/P5/cls", "metrics/AP", "metrics/AP50", "metrics/AP75", "metrics/APs",
                "metrics/APm", "metrics/APl", "metrics/VOC_AP50_all", "fitness"):
        assert col in header, col
    assert "train/P6/box" not in header and "member" not in header  # 3 levels, one member
    assert [int(r["epoch"]) for r in rows] == list(range(R.EPOCHS))
    assert [int(r["iterations"]) for r in rows] == [(e + 1) * R.NB for e in range(R.EPOCHS)]
    for e, r in enumerate(rows):  # the lr of each epoch's last iteration, by the spec's formulas
        assert float(r["lr"]) == pytest.approx(lr_at((e + 1) * R.NB - 1, e), rel=1e-6)
        assert all(math.isfinite(float(r[c])) for c in header if c.startswith(("train/", "val/")))
        assert 0 <= float(r["metrics/AP50"]) <= 1
        assert float(r["train/grad_norm"]) > 0 and 0 <= float(r["train/clipped"]) <= 1
    # the resumed run: the same rows, none repeated; what it measured after the resume is the same
    resumed = read_csv(killed / "results.csv")
    assert list(resumed[0]) == header
    assert [(r["epoch"], r["iterations"]) for r in resumed] == [(r["epoch"], r["iterations"]) for r in rows]
    timed = lambda k: k == "time_s" or k.startswith("time/")
    assert {k: v for k, v in resumed[0].items() if not timed(k)} == {k: v for k, v in rows[0].items() if not timed(k)}
    for r in rows:  # the epoch's iterations and its validation, within the run's time
        train_s, val_s = float(r["time/train_s"]), float(r["time/val_s"])
        assert 0 < train_s and 0 < val_s and train_s + val_s <= float(r["time_s"])
    for c in header:
        if c.startswith(("val/", "metrics/", "fitness", "lr")):
            assert resumed[1][c] == rows[1][c], c


def test_results_csv_train_losses_survive_a_resume(reference, killed):
    rows, resumed = read_csv(reference / "results.csv"), read_csv(killed / "results.csv")
    for c in rows[1]:
        if c.startswith("train/"):
            assert resumed[1][c] == rows[1][c], c


# ------------------------------------------------------------------------------------- non-finite


def tiny_options(out: Path, changes: dict | None = None) -> TrainOptions:
    """The options `jaxyolo train` builds from `R.TRAIN_ARGS` (same numbers as the shared runs),
    with `changes` by dotted name."""
    base = {"model.name": "yolov4p", "data.source": R.DATA, "data.img_size": R.IMG, "data.batch_size": R.BATCH,
            "optim.nominal_batch": R.BATCH, "recipe.min_warmup_iters": 2, "optim.epochs": R.EPOCHS, "seed": 0}
    return TrainOptions().updated({**base, **(changes or {}), "out": str(out)})


def test_nonfinite_losses_stop_the_run_and_keep_the_checkpoint(request, data_env, tmp_path, monkeypatch):
    """From iteration NB on, every member's box gain is NaN (the step's hyp input: the same compiled
    program, a real non-finite loss on device); with max_nonfinite=2 the run stops at iteration NB + 1."""
    real = T.population_step
    seen = []

    def poisoned(train_step, mesh, **kw):
        step = real(train_step, mesh, **kw)

        def run(state, batch, hyp, keys):
            ni = len(seen)  # the run starts at iteration 0, one call per iteration
            seen.append(ni)
            if ni >= R.NB:
                hyp = {**hyp, "box": hyp["box"] * np.float32(np.nan)}
            return step(state, batch, hyp, keys)

        return run

    out = tmp_path / "run"
    opts = tiny_options(out, {"optim.max_nonfinite": 2})
    monkeypatch.setattr(T, "population_step", poisoned)
    events = []
    with pytest.raises(TrainingError, match=rf"iteration {R.NB + 1}: 2 non-finite losses in a row") as e:
        fit(opts, progress=events.append)
    assert str(out) in str(e.value)
    steps = [ev for ev in events if ev["event"] == "step"]
    assert [int(ev["step"]) for ev in steps] == list(range(R.NB + 2))
    assert [bool(ev["finite"][0]) for ev in steps] == [True] * R.NB + [False, False]
    assert seen == list(range(R.NB + 2))

    # what the first epoch left is intact: its checkpoint, results row and EMA detector
    assert state_steps(out) == [R.NB]
    st = saved_state(out, R.NB)
    assert int(st["step"][0]) == R.NB and int(st["nonfinite_total"][0]) == 0
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(st))
    assert [r["iterations"] for r in read_csv(out / "results.csv")] == [str(R.NB)]
    ema = jaxyolo.load(out / "weights" / "last")
    assert all(np.all(np.isfinite(v)) for v in ema.state_dict().values())

    # ... and it resumes to the very end of the unbroken run
    monkeypatch.setattr(T, "population_step", real)
    res = fit(tiny_options(out, {"optim.max_nonfinite": 2}), resume=True)
    assert [r["iterations"] for r in res.history] == [R.NB, TOTAL]
    reference = request.getfixturevalue("reference")  # only now: another worker may be building it meanwhile
    assert_same_weights(reference / "weights" / "last", out / "weights" / "last")


# ------------------------------------------------------------------------------- protecting runs


def test_refuses_to_overwrite_a_run(data_env, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    code, _, err = R.cli_main(R.TRAIN_ARGS + ["--out", str(out)])
    assert code == 2
    assert "jaxyolo train: error:" in err and "exists and is not empty" in err and "--resume" in err
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    with pytest.raises(ConfigError, match="not empty"):
        fit(tiny_options(out))


def test_resume_with_other_options_is_refused(reference, data_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    code, _, err = R.cli_main(R.TRAIN_ARGS[:-2] + ["--seed", "1", "--img", "96", "--save-every", "1",
                                                  "--out", str(run), "--resume"])
    assert code == 2 and "options differ" in err
    # each differing option with the saved and the given value
    assert f"img_size: saved {R.IMG}, given 96" in err and "seed: saved 0, given 1" in err
    assert "save_every" not in err and "data:" not in err
    with pytest.raises(ConfigError, match=r"options differ from the saved run \(checkpoint.every: saved 1, given 0\)"):
        fit(tiny_options(run), resume=True)  # save_every 0 here, 1 in the saved run
    after = {p.relative_to(run): p.read_bytes() for p in run.rglob("*") if p.is_file()}
    assert after == before


def test_resume_compares_file_options_by_resolved_path(data_env, tmp_path, monkeypatch):
    """A run started with a relative data path resumes with the same folder given absolutely (from
    another working directory); a different folder is refused with both values shown."""
    from jaxyolo.data.sources import parse_options
    from jaxyolo.data.synthetic import synthetic_dataset

    root = synthetic_dataset(None, **parse_options(R.DATA.partition(":")[2]))
    other = tmp_path / "copy of data é"
    shutil.copytree(root, other)
    start = tmp_path / "start"
    start.mkdir()
    monkeypatch.chdir(start)
    run = tmp_path / "run"
    rel = os.path.relpath(root, start)
    fit(tiny_options(run, {"data.source": rel, "optim.epochs": 1, "eval.plots": False}))
    monkeypatch.chdir(tmp_path)
    done = fit(tiny_options(run, {"data.source": str(root.resolve()), "optim.epochs": 1, "eval.plots": False}), resume=True)
    assert [r["epoch"] for r in done.history] == [0]
    with pytest.raises(ConfigError, match="data.source: saved") as e:
        fit(tiny_options(run, {"data.source": str(other), "optim.epochs": 1, "eval.plots": False}), resume=True)
    assert repr(rel) in str(e.value) and repr(str(other)) in str(e.value)


def _cut(folder: Path) -> Path:
    """Halve the largest array data file under `folder` (a copy's), as a cut copy or full disk does."""
    data = max((p for p in folder.rglob("*") if p.is_file() and p.parent.name == "d"), key=lambda p: p.stat().st_size)
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    return data


def test_resume_skips_a_damaged_state_to_the_newest_intact_one(reference, data_env, tmp_path, caplog):
    """The newest state cut in half: resume warns, names it and the iteration it resumes from,
    moves it aside, and still ends on the unbroken run's weights (the lost iteration is redone)."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    assert state_steps(run) == [TOTAL - 1, TOTAL]  # the last two states are kept
    _cut(run / "state" / str(TOTAL))
    with caplog.at_level("WARNING", logger="jaxyolo"):
        code, _, err = R.cli_main(R.TRAIN_ARGS + ["--save-every", "1", "--out", str(run), "--resume"])
    assert code == 0, err
    assert f"training state of iteration {TOTAL}" in caplog.text and "damaged" in caplog.text
    assert f"resuming from iteration {TOTAL - 1}" in caplog.text
    assert (run / "state" / f"damaged-{TOTAL}").is_dir() and state_steps(run) == [TOTAL - 1, TOTAL]
    assert_same_weights(run / "weights" / "last", reference / "weights" / "last")


def test_resume_with_every_state_damaged_is_one_clear_error(reference, data_env, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    _cut(run / "state" / str(TOTAL))
    meta = run / "state" / str(TOTAL - 1) / "meta" / "metadata"
    meta.write_bytes(meta.read_bytes()[:40])  # a cut JSON description
    code, out, err = R.cli_main(R.TRAIN_ARGS + ["--save-every", "1", "--out", str(run), "--resume"])
    assert code == 2 and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert "no intact training state" in err and str(run / "state") in err
    assert f"step {TOTAL}: its state cannot be read" in err and f"step {TOTAL - 1}: its meta cannot be read" in err


@pytest.mark.parametrize("delay", [0.0, 0.02])
def test_a_kill_inside_the_state_save_never_leaves_a_state_resume_fails_on(reference, data_env, runs_root, tmp_path,
                                                                           delay):
    """SIGKILL from a timer started as Orbax begins writing iteration NB + 1's state (the kill lands
    before, inside or just after the write): the resumed run ends on the unbroken run's weights."""
    run, info = tmp_path / "run", tmp_path / "info"
    info.mkdir()
    argv = R.TRAIN_ARGS + ["--save-every", "1", "--out", str(run)]
    seen = R.killable(argv, {R.KILL_IN_SAVE_ENV: f"{R.NB + 1}:{delay}", "JAXYOLO_CACHE": str(runs_root / "data")},
                      info)
    assert f"SAVING {R.NB + 1}" in seen
    left = sorted(p.name for p in (run / "state").iterdir())
    code, _, err = R.cli_main(argv + ["--resume"])
    assert code == 0, (left, err[-2000:])
    assert_same_weights(run / "weights" / "last", reference / "weights" / "last")


def test_a_damaged_weights_folder_is_one_clear_error(reference, data_env, tmp_path):
    weights = tmp_path / "last"
    shutil.copytree(reference / "weights" / "last", weights)
    _cut(weights / "state")
    with pytest.raises(CheckpointError, match="damaged checkpoint, its state cannot be read"):
        jaxyolo.load(weights)
    code, out, err = R.cli_main(["eval", "--weights", str(weights), "--data", R.DATA])
    assert code == 2 and "Traceback" not in err and "damaged checkpoint" in err and str(weights) in err


def test_a_run_that_fails_before_its_first_state_leaves_no_half_made_folder(data_env, tmp_path, monkeypatch,
                                                                             caplog):
    """The first batch fails to load (any loader error): the error reaches the caller, and the
    folder the run made is emptied, with a warning saying so."""
    import jaxyolo.train_loop as trainer

    def broken(*a, **kw):
        raise ConfigError("img.jpg: image cannot be decoded (broken data stream)")

    real = trainer.train_batches
    monkeypatch.setattr(trainer, "train_batches", broken)
    out = tmp_path / "run"
    with caplog.at_level("WARNING", logger="jaxyolo"), pytest.raises(ConfigError, match="img.jpg"):
        fit(tiny_options(out, {"eval.plots": False}))
    assert out.is_dir() and not any(out.iterdir())
    assert "removed what it had written" in caplog.text and str(out) in caplog.text
    monkeypatch.setattr(trainer, "train_batches", real)  # the folder is free for a new start
    assert [r["epoch"] for r in fit(tiny_options(out, {"eval.plots": False, "optim.epochs": 1})).history] == [0]


def test_saved_state_is_packed_and_read_back_by_path(reference):
    """The state is saved as one vector per dtype; `read_state` (the trainer's reader) and the
    independent reader here give the same named arrays, and the vectors hold nothing else."""
    from jaxyolo.train_loop import read_state

    mine, theirs = read_state(reference / "state"), saved_state(reference, TOTAL)
    la, lb = jax.tree.leaves_with_path(mine), jax.tree.leaves_with_path(theirs)
    assert [p for p, _ in la] == [p for p, _ in lb] and len(la) > 100
    assert all(np.array_equal(x, y) and x.dtype == y.dtype for (_, x), (_, y) in zip(la, lb))
    assert sorted(ocp_items(reference / "state" / str(TOTAL) / "state")) == ["float32", "int32"]


def ocp_items(folder: Path) -> list[str]:
    import orbax.checkpoint as ocp

    return list(ocp.StandardCheckpointer().restore(folder.absolute()))


def test_cache_budget_must_be_a_non_negative_integer():
    for bad in (-1, 1.5, "1024"):
        with pytest.raises(ConfigError, match="cache_mb"):
            TrainOptions(data=DataSettings(cache_mb=bad)).check()
    TrainOptions(data=DataSettings(cache_mb=0)).check()  # 0 turns the cache off
