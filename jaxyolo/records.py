"""Typed results of a training run, turned into CSV and JSON only at the edge.

`fit` makes one `EpochRecord` per (epoch, member); `results.csv` holds their `row()`s (the flat
column names `train/P3/box`, `metrics/AP`, ...), and a resumed run reads them back with
`EpochRecord.from_row`. The search and the pipeline read records, not column names: a record's
losses carry the family's own term and level names (`Losses`).
"""

from __future__ import annotations

import dataclasses
import math
from typing import Mapping

import numpy as np

METRICS = ("AP", "AP50", "AP75", "APs", "APm", "APl", "VOC_AP50_all", "VOC_AP50_11")


@dataclasses.dataclass(frozen=True)
class Losses:
    """The loss terms of one pass, after gains, averaged over its batches: `local` (levels, terms),
    `overall` (terms,) over all levels, `total` the sum the run reports."""

    terms: tuple[str, ...]
    levels: tuple[str, ...]
    local: np.ndarray
    overall: np.ndarray
    total: float

    def term(self, name: str) -> float:
        return float(self.overall[self.terms.index(name)])

    @property
    def finite(self) -> bool:
        return bool(np.all(np.isfinite(self.local)))


@dataclasses.dataclass(frozen=True)
class EpochRecord:
    """One epoch of one member. `val` is None for an epoch that was not evaluated (its metrics and
    fitness are NaN); `train_extra` holds the optional training columns (clipped share, gradient
    norm, distillation terms) and `timing` the epoch's time columns, each under its column name."""

    epoch: int
    iterations: int
    time_s: float
    lr: float
    member: int | None  # None in a run of one member
    train: Losses
    val: Losses | None
    metrics: dict  # METRICS -> float (NaN when not evaluated)
    fitness: float
    train_extra: dict = dataclasses.field(default_factory=dict)
    timing: dict = dataclasses.field(default_factory=dict)

    @property
    def evaluated(self) -> bool:
        return self.val is not None

    def row(self) -> dict:
        """The results.csv row."""
        row: dict = {} if self.member is None else {"member": self.member}
        row.update({"epoch": self.epoch, "iterations": self.iterations, "time_s": self.time_s, "lr": self.lr})
        row.update(_loss_columns("train", self.train))
        row.update(self.train_extra)
        val = self.val or _nan_like(self.train)
        row.update(_loss_columns("val", val))
        row.update({f"metrics/{k}": float(self.metrics.get(k, math.nan)) for k in METRICS})
        row["fitness"] = self.fitness
        row.update(self.timing)
        return row

    @classmethod
    def from_row(cls, row: Mapping, *, terms, levels) -> "EpochRecord":
        """The record a results.csv row holds (`terms`, `levels`: the run's family's names)."""
        terms, levels = tuple(terms), tuple(levels)
        known = {"member", "epoch", "iterations", "time_s", "lr", "fitness"}

        def losses(pass_: str) -> Losses:
            local = np.array([[float(row[f"{pass_}/{lvl}/{t}"]) for t in terms] for lvl in levels])
            overall = np.array([float(row[f"{pass_}/{t}"]) for t in terms])
            known.update({f"{pass_}/loss", *(f"{pass_}/{t}" for t in terms),
                          *(f"{pass_}/{lvl}/{t}" for lvl in levels for t in terms)})
            return Losses(terms, levels, local, overall, float(row[f"{pass_}/loss"]))

        train, val = losses("train"), losses("val")
        metrics = {k: float(row[f"metrics/{k}"]) for k in METRICS if f"metrics/{k}" in row}
        known.update(f"metrics/{k}" for k in METRICS)
        return cls(epoch=int(row["epoch"]), iterations=int(row["iterations"]), time_s=float(row["time_s"]),
                   lr=float(row["lr"]), member=int(row["member"]) if "member" in row else None, train=train,
                   val=val if val.finite or math.isfinite(val.total) else None, metrics=metrics,
                   fitness=float(row["fitness"]),
                   train_extra={k: float(v) for k, v in row.items() if k not in known and k.startswith("train/")},
                   timing={k: float(v) for k, v in row.items() if k.startswith("time/")})


def _loss_columns(pass_: str, losses: Losses) -> dict:
    cols = {f"{pass_}/loss": float(losses.total)}
    cols.update({f"{pass_}/{t}": float(losses.overall[i]) for i, t in enumerate(losses.terms)})
    for j, lvl in enumerate(losses.levels):
        cols.update({f"{pass_}/{lvl}/{t}": float(losses.local[j, i]) for i, t in enumerate(losses.terms)})
    return cols


def _nan_like(losses: Losses) -> Losses:
    return Losses(losses.terms, losses.levels, np.full(losses.local.shape, math.nan),
                  np.full(losses.overall.shape, math.nan), math.nan)
