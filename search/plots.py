"""Search plots, written next to the search log (matplotlib, Agg backend):

- ``fitness.png``: every trial's fitness per generation (grid and final runs at the end) and the
  best so far;
- ``params.png``: each searched hyper-parameter against fitness (colour: generation);
- ``parallel.png``: parallel coordinates of the normalised hyper-parameters, coloured by fitness;
- ``trends.png``: the trend strength and direction per hyper-parameter and the grid's values
  (from ``grid.json``);
- ``loss_curves.png``: the best evolution trial's validation losses per level (local) and per
  objective (global) with the epoch each starts to over-fit (the loss-weight rule's input).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _free_names(space) -> list[str]:
    return [space.names[i] for i in space.free]


def _order(trials):
    """x position per trial: evolution generation g -> g, then the grid, then the final run."""
    gens = [t["generation"] for t in trials if t["phase"] == "evolve"]
    last = max(gens) if gens else -1
    return [t["generation"] if t["phase"] == "evolve" else last + 1 + (t["phase"] == "final") for t in trials]


def plot_fitness(path: Path, trials: list[dict]) -> None:
    plt = _plt()
    x = np.array(_order(trials))
    f = np.array([t["fitness"] for t in trials])
    fig, ax = plt.subplots(figsize=(7, 4))
    colors = {"evolve": "tab:blue", "grid": "tab:orange", "final": "tab:green"}
    for phase, c in colors.items():
        sel = [i for i, t in enumerate(trials) if t["phase"] == phase]
        if sel:
            ax.scatter(x[sel], f[sel], s=14, color=c, alpha=0.7, label=phase)
    steps = sorted(set(x.tolist()))
    best = np.maximum.accumulate([f[x == s].max() for s in steps])
    ax.step(steps, best, where="post", color="k", lw=1.5, label="best so far")
    ax.set_xlabel("generation (then grid, final)")
    ax.set_ylabel("fitness = 0.1 AP50 + 0.9 AP")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_params(path: Path, trials: list[dict], space) -> None:
    plt = _plt()
    names = _free_names(space)
    n = max(len(names), 1)
    cols = min(6, n)
    rows = int(np.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.2 * rows), squeeze=False)
    f = np.array([t["fitness"] for t in trials])
    g = np.array(_order(trials))
    for ax, name in zip(axes.flat, names):
        v = np.array([t["params"][name] for t in trials])
        ax.scatter(v, f, c=g, s=8, cmap="viridis")
        i = int(np.argmax(f))
        ax.scatter([v[i]], [f[i]], marker="*", s=80, color="r")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    for ax in list(axes.flat)[len(names):]:
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_parallel(path: Path, trials: list[dict], space) -> None:
    plt = _plt()
    names = _free_names(space)
    if not names:
        return
    idx = list(space.free)
    u = np.array([space.normalise(np.array([t["params"][m] for m in space.names]))[idx] for t in trials])
    f = np.array([t["fitness"] for t in trials])
    norm = (f - f.min()) / (np.ptp(f) or 1.0)
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(names)), 4))
    cmap = plt.get_cmap("plasma")
    for k in np.argsort(f):  # best drawn last, on top
        ax.plot(range(len(names)), u[k], color=cmap(norm[k]), alpha=0.5, lw=0.8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    ax.set_ylabel("normalised value (0 = low bound, 1 = high)")
    fig.colorbar(plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(f.min(), f.max())), ax=ax, label="fitness")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_trends(path: Path, grid_info: dict) -> None:
    plt = _plt()
    trends = grid_info.get("trends") or {}
    if not trends:
        return
    names = sorted(trends, key=lambda n: -abs(float(trends[n].get("slope", 0.0))))
    slopes = [float(trends[n].get("slope", 0.0)) for n in names]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4), gridspec_kw={"width_ratios": [2, 1]})
    a1.bar(range(len(names)), slopes, color=["tab:green" if s > 0 else "tab:red" for s in slopes])
    a1.set_xticks(range(len(names)))
    a1.set_xticklabels(names, rotation=60, ha="right", fontsize=7)
    a1.set_ylabel("fitness slope (normalised units)")
    a1.set_title("trends of the evolution history")
    pts = grid_info.get("points") or []
    chosen = names[: min(4, len(names))]
    for j, n in enumerate(chosen):
        vals = [p[n] for p in pts if n in p]
        a2.scatter([j] * len(vals), vals, s=15)
    a2.set_xticks(range(len(chosen)))
    a2.set_xticklabels(chosen, rotation=30, ha="right", fontsize=7)
    a2.set_title("grid values of the strongest trends")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_loss_curves(path: Path, trial: dict, overfit_epoch=None) -> None:
    curves = trial.get("curves")
    if not curves or not curves.get("global"):
        return
    plt = _plt()
    local, glob = np.asarray(curves["local"]), np.asarray(curves["global"])
    terms = ("box", "obj", "cls")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.6))
    e = np.arange(len(glob))
    for lvl in range(local.shape[1]):
        y = local[:, lvl].sum(-1)
        axes[0].plot(e, y, marker="o", ms=3, label=f"P{lvl + 3}")
        _mark(axes[0], y, overfit_epoch)
    axes[0].set_title("local: validation loss per level")
    for k, t in enumerate(terms):
        axes[1].plot(e, glob[:, k], marker="o", ms=3, label=t)
        _mark(axes[1], glob[:, k], overfit_epoch)
    axes[1].set_title("global: validation loss per objective")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle(f"best trial: {trial['phase']} {trial['generation']} member {trial['member']} (x: over-fit start)",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _mark(ax, y, overfit_epoch):
    if overfit_epoch is None:
        return
    t = overfit_epoch(np.asarray(y))
    if t is not None:
        ax.scatter([t], [y[t]], marker="x", s=60, color="k", zorder=5)


def plot_search(out: Path, trials: list[dict], space) -> None:
    """Every plot of the module docstring that the data allows."""
    out = Path(out)
    if not trials:
        return
    plot_fitness(out / "fitness.png", trials)
    plot_params(out / "params.png", trials, space)
    plot_parallel(out / "parallel.png", trials, space)
    grid_file = out / "grid.json"
    if grid_file.exists():
        plot_trends(out / "trends.png", json.loads(grid_file.read_text()))
    ev = [t for t in trials if t["phase"] == "evolve"]
    if ev:
        from jaxyolo.search.trend import overfit_epoch

        plot_loss_curves(out / "loss_curves.png", max(ev, key=lambda t: t["fitness"]), overfit_epoch)
