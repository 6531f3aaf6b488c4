"""Run records: a record's results.csv row reads back into the same record, and the row holds
the columns the run writes, named by the family's terms and levels."""

from __future__ import annotations

import math

import numpy as np

from jaxyolo.records import METRICS, EpochRecord, Losses


def _record(member, evaluated: bool) -> EpochRecord:
    rng = np.random.default_rng(0)
    terms, levels = ("box", "obj", "cls"), ("P3", "P4", "P5")
    local = rng.uniform(0, 1, (3, 3)).astype(np.float32)
    train = Losses(terms, levels, local, local.sum(0) * 1.001, float(local.sum()) * 0.9)
    val = Losses(terms, levels, local * 2, (local * 2).sum(0), float((local * 2).sum())) if evaluated else None
    return EpochRecord(epoch=4, iterations=40, time_s=12.34, lr=0.0031, member=member, train=train, val=val,
                       metrics={k: 0.1 * i for i, k in enumerate(METRICS)} if evaluated else {},
                       fitness=0.37 if evaluated else math.nan,
                       train_extra={"train/clipped": 0.25, "train/kd_obj": 0.1},
                       timing={"time/train_s": 8.5, "time/val_s": 1.25 if evaluated else math.nan})


def _same(a: dict, b: dict) -> bool:
    return list(a) == list(b) and all(x == y or (isinstance(x, float) and math.isnan(x) and math.isnan(y))
                                      for x, y in zip(a.values(), b.values()))


def test_a_row_reads_back_into_the_same_record():
    for member in (None, 2):
        for evaluated in (True, False):
            rec = _record(member, evaluated)
            row = rec.row()
            back = EpochRecord.from_row(row, terms=rec.train.terms, levels=rec.train.levels)
            assert _same(back.row(), row)
            assert back.evaluated == evaluated and back.member == member
            assert ("member" in row) == (member is not None) and list(row)[0] == ("member" if member else "epoch")


def test_the_row_names_every_term_of_every_level():
    rec = _record(None, True)
    row = rec.row()
    for lvl, i in zip(rec.train.levels, range(3)):
        for t, j in zip(rec.train.terms, range(3)):
            assert row[f"train/{lvl}/{t}"] == float(rec.train.local[i, j])
            assert row[f"val/{lvl}/{t}"] == float(rec.val.local[i, j])
    assert row["val/obj"] == rec.val.term("obj") and row["metrics/AP50"] == rec.metrics["AP50"]
    assert row["fitness"] == 0.37 and row["train/kd_obj"] == 0.1
