"""The paper's additions to the genetic search (JHS, §4.2-4.3, Figs. 6-7): a trend estimated from
the evolution history, a small grid along it, and loss weights derived from the loss curves.

- `estimate_trends`: slope of fitness against each free parameter, in normalised units
  (`SearchSpace.normalise`), by rank-weighted ridge regression.
- `trend_grid`: a full-factorial grid along the trend directions of the strongest parameters,
  around the best vector.
- `overfit_epoch` / `still_falling`: the over-fit rule on one validation loss curve.
- `loss_weight_grid` / `loss_grid_vectors`: candidate per-level `balance.i` weights from the
  local (per level) curves and `box` / `obj` / `cls` gains from the global curves: a term that
  over-fits early gets its weight lowered, one still falling at the end gets it raised.

Everything is host-side NumPy and deterministic (no randomness at all here).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import numpy as np

from jaxyolo import hyp as H
from jaxyolo.errors import ConfigError

from .space import DECIMALS, SearchSpace

OBJECTIVES = ("box", "obj", "cls")

# ---------------------------------------------------------------------------------------------
# trend


def _ranks(f: np.ndarray) -> np.ndarray:
    """0-based ascending ranks, ties get their average rank."""
    order = np.argsort(f, kind="stable")
    pos = np.empty(len(f))
    pos[order] = np.arange(len(f), dtype=np.float64)
    _, inv = np.unique(f, return_inverse=True)
    sums = np.bincount(inv, weights=pos)
    counts = np.bincount(inv)
    return (sums / counts)[inv]


def estimate_trends(vectors, fitness, space: SearchSpace, *, ridge: float = 1e-2,
                    min_trials: int = 3) -> dict[str, dict]:
    """Per free (non-frozen) parameter: {'slope', 'strength', 'direction'}.

    Estimator (weighted ridge regression of standardised fitness on centred normalised params):

    - rows with a finite fitness only; x = `space.normalise(vector)` of the free parameters;
    - weights rise with the fitness rank: w_i = (rank_i + 1) / n (worst 1/n, best 1; ties share
      their average rank), so the fit describes the neighbourhood of the good trials more than
      the far-off bad ones (fitness is not linear over the whole space);
    - x and fitness are centred by their w-weighted means, fitness is divided by its w-weighted
      standard deviation;
    - slope = argmin_b sum_i w_i (y_i - x_i·b)^2 + λ |b|^2, i.e. (XᵀWX + λI) b = XᵀWy, with
      λ = ridge · sum(w) · mean_j(weighted variance of x_j): the ridge is `ridge` (1 %) of the
      average parameter variance of the history, so it does not depend on how far the search
      has spread; it keeps the solve well-posed with fewer trials than parameters or collinear
      parameters, and a parameter that never varied gets slope exactly 0.

    `slope` is in standard deviations of fitness per unit of normalised parameter;
    `strength` = |slope|; `direction` = sign(slope) in {-1, 0, +1}. A degenerate history (fewer
    than `min_trials` finite rows, or all fitness values equal) gives zeros, never NaN.
    """
    names = [space.names[i] for i in space.free]
    zeros = {n: {"slope": 0.0, "strength": 0.0, "direction": 0} for n in names}
    if vectors is None or np.size(vectors) == 0 or not names:
        return zeros
    x = np.asarray(vectors, np.float64)
    f = np.asarray(fitness, np.float64).reshape(-1)
    if x.ndim != 2 or x.shape != (len(f), space.dim):
        raise ValueError(f"estimate_trends: vectors {x.shape} / fitness {f.shape} do not fit a {space.dim}-dim space")
    ok = np.isfinite(f) & np.all(np.isfinite(x), axis=1)
    x, f = x[ok], f[ok]
    n = len(f)
    if n < max(2, min_trials):
        return zeros
    u = space.normalise(x)[:, space.free]
    w = (_ranks(f) + 1.0) / n
    sw = w.sum()
    fm = (w * f).sum() / sw
    sd = np.sqrt((w * (f - fm) ** 2).sum() / sw)
    if not np.isfinite(sd) or sd <= 1e-12 * max(1.0, abs(fm)):
        return zeros
    y = (f - fm) / sd
    xc = u - (w[:, None] * u).sum(0) / sw
    a = xc.T @ (w[:, None] * xc)
    mean_var = float(np.trace(a)) / (sw * len(names))
    if mean_var <= 0:
        return zeros
    a += ridge * sw * mean_var * np.eye(len(names))
    b = xc.T @ (w * y)
    slope = np.linalg.solve(a, b)
    slope = np.where(np.isfinite(slope), slope, 0.0)
    return {nm: {"slope": float(s), "strength": float(abs(s)), "direction": int(np.sign(s))}
            for nm, s in zip(names, slope)}


def trend_grid(best_vector, trends: Mapping[str, Mapping], space: SearchSpace, *, dims: int = 4,
               step: float = 0.1, levels: Sequence[float] = (0, 1), exclude=None) -> tuple[np.ndarray, dict]:
    """A small full-factorial grid along the trend, around `best_vector`. Returns (vectors, description).

    - Parameters: the `dims` free parameters with the largest `strength` > 0, skipping one that
      already sits at the bound its direction points to (it cannot move that way).
    - Points: for every combination (l_1, ..., l_k) in `levels`^k, parameter j moves by
      l_j · step · direction_j in normalised units (`SearchSpace.normalise`), clipped to [0, 1];
      every other parameter keeps the best vector's value. With the default levels (0, 1) that
      is 2^k points, the best itself (all zeros) first; levels (-1, 0, 1) probe both sides (3^k).
    - Then `space.clip` (bounds, 5 decimals), duplicates removed (first kept, in
      `itertools.product` order) and vectors listed in `exclude` (e.g. the history) dropped.

    description: {'params', 'directions', 'strengths', 'step', 'levels', 'shape', 'points'
    (before dedup), 'unique' (returned), 'offsets' (normalised offsets of each returned vector,
    in 'params' order)}.
    """
    best = np.asarray(best_vector, np.float64)
    if best.shape != (space.dim,):
        raise ValueError(f"trend_grid: best_vector must have shape ({space.dim},), got {best.shape}")
    if dims < 0 or step <= 0:
        raise ConfigError(f"trend_grid: need dims >= 0 and step > 0, got dims={dims}, step={step}")
    u_best = space.normalise(best)
    ranked = sorted(((float(t.get("strength", 0.0)), n) for n, t in trends.items()
                     if n in space and not space[n].frozen), key=lambda p: -p[0])
    chosen = []
    for strength, name in ranked:
        if len(chosen) >= dims or strength <= 0:
            break
        i = space.index(name)
        d = int(np.sign(trends[name].get("direction", 0)) or np.sign(trends[name].get("slope", 0.0)))
        if d == 0 or (d > 0 and u_best[i] >= 1.0) or (d < 0 and u_best[i] <= 0.0):
            continue
        chosen.append((name, i, d, strength))
    levels = [float(v) for v in levels]
    excl = set()
    if exclude is not None and np.size(exclude):
        excl = {tuple(r) for r in space.clip(np.asarray(exclude, np.float64).reshape(-1, space.dim))}
    seen, out, offsets = set(), [], []
    combos = list(itertools.product(levels, repeat=len(chosen)))
    for combo in combos:
        u = u_best.copy()
        off = []
        for (name, i, d, _), lv in zip(chosen, combo):
            u[i] = np.clip(u_best[i] + lv * step * d, 0.0, 1.0)
            off.append(float(lv * step * d))
        v = best.copy()
        idx = [c[1] for c in chosen]
        if idx:
            v[idx] = space.denormalise(u)[idx]
        v = space.clip(v)
        key = tuple(v)
        if key in seen or key in excl:
            continue
        seen.add(key)
        out.append(v)
        offsets.append(off)
    desc = {"params": [c[0] for c in chosen], "directions": [c[2] for c in chosen],
            "strengths": [c[3] for c in chosen], "step": float(step), "levels": levels,
            "shape": [len(levels)] * len(chosen), "points": len(combos), "unique": len(out), "offsets": offsets}
    vectors = np.stack(out) if out else np.zeros((0, space.dim))
    return vectors, desc


# ---------------------------------------------------------------------------------------------
# loss curves (paper §4.3, Fig. 6)


def smooth(curve, window: int = 5) -> np.ndarray:
    """Centred moving average over `window` epochs (odd; an even one acts as window + 1); near the
    ends it averages only the points of the window that exist."""
    c = np.asarray(curve, np.float64)
    n, h = len(c), max(int(window), 1) // 2
    cs = np.concatenate([[0.0], np.cumsum(c)])
    lo = np.clip(np.arange(n) - h, 0, n)
    hi = np.clip(np.arange(n) + h + 1, 0, n)
    return (cs[hi] - cs[lo]) / (hi - lo)


def _curve(curve) -> np.ndarray:
    c = np.asarray(curve, np.float64)
    if c.ndim != 1:
        raise ValueError(f"a loss curve must be 1-D (one value per epoch), got shape {c.shape}")
    if not np.all(np.isfinite(c)):
        raise ValueError("a loss curve has non-finite values (a diverged run?)")
    return c


def _noise(c: np.ndarray, s: np.ndarray) -> float:
    """Robust noise level of the raw curve: 1.4826 · median |r - median r| of r = curve - smooth."""
    r = c - s
    return float(1.4826 * np.median(np.abs(r - np.median(r))))


def overfit_epoch(curve, *, window: int = 5, rel_tol: float = 0.02, noise_z: float = 3.0,
                  tail: float = 0.2) -> int | None:
    """The epoch (0-based index into `curve`) where a validation loss starts to over-fit, or None.

    Rule: s = `smooth(curve, window)`; m = argmin s; the end level is the mean of the last
    k = min(max(window, round(tail · E)), E - 1 - m) raw values (the ones after m). The curve
    over-fits from m when the end level lies clearly above the minimum:

        end - s[m] > max(rel_tol · |s[m]|, noise_z · noise · sqrt(1/window + 1/k))

    where noise is the robust noise level of the raw curve (MAD of its residual from s), so the
    second term is noise_z standard errors of the difference. A curve still falling (minimum at
    the end), flat, or only noisy gives None; so do curves shorter than 3 epochs.
    """
    c = _curve(curve)
    if len(c) < 3:
        return None
    s = smooth(c, window)
    m = int(np.argmin(s))
    k = min(max(int(window), int(round(tail * len(c)))), len(c) - 1 - m)
    if k < 1:
        return None
    rise = c[-k:].mean() - s[m]
    se = _noise(c, s) * math.sqrt(1 / max(int(window), 1) + 1 / k)
    return m if rise > max(rel_tol * abs(s[m]), noise_z * se) else None


def still_falling(curve, *, window: int = 5, rel_tol: float = 0.02, noise_z: float = 3.0,
                  tail: float = 0.2) -> bool:
    """True when the loss still drops clearly at the end of the run: with k = max(2, round(tail · E))
    (at most E // 2), the mean of the last k values lies below the mean of the k before by more
    than max(rel_tol · |last mean|, noise_z · noise · sqrt(2 / k)) (noise as in `overfit_epoch`)."""
    c = _curve(curve)
    if len(c) < 4:
        return False
    k = min(max(2, int(round(tail * len(c)))), len(c) // 2)
    last, before = c[-k:].mean(), c[-2 * k:-k].mean()
    se = _noise(c, smooth(c, window)) * math.sqrt(2 / k)
    return bool(before - last > max(rel_tol * abs(last), noise_z * se))


def _term(curve, run_length: int, kw: Mapping) -> dict:
    """Over-fit facts of one curve and its 'useful length' t (epochs)."""
    c = _curve(curve)
    if np.ptp(c) == 0:
        return {"overfit_epoch": None, "still_falling": False, "t": None, "state": "constant (term unused)"}
    m = overfit_epoch(c, **kw)
    if m is not None:
        return {"overfit_epoch": m, "still_falling": False, "t": float(m + 1), "state": f"over-fits from epoch {m}"}
    if still_falling(c, **kw):
        return {"overfit_epoch": None, "still_falling": True, "t": float(2 * run_length),
                "state": "still falling at the end"}
    return {"overfit_epoch": None, "still_falling": False, "t": float(run_length), "state": "levels off, no over-fit"}


def loss_weight_grid(local_curves, global_curves, base_hyp: Mapping, *, space: SearchSpace | None = None,
                     steps: Sequence[float] = (0.0, 0.5, 1.0), factor_clip: tuple[float, float] = (0.5, 2.0),
                     level_term: str = "total", window: int = 5, rel_tol: float = 0.02, noise_z: float = 3.0,
                     tail: float = 0.2, terms: Sequence[str] = OBJECTIVES, family=None
                     ) -> tuple[dict[str, list[float]], dict[str, dict]]:
    """Candidate loss weights from validation loss curves (paper §4.3, Fig. 6).

    local_curves (E, L, T): per level the validation loss of each of the family's `terms` (YOLOv4:
    box, obj, cls); global_curves (E, T). A term's gain is the hyp key of its name. Two groups:
    the levels (-> `balance.i`, from each level's `level_term` curve: 'total' = the sum of the
    level's terms, as in Fig. 6's per-pyramid loss, or 'obj', the only term `balance` weights in
    the YOLOv4 loss) and the objectives (-> the terms' gains, from the global curves).

    Rule, per term i of a group: its useful length t_i = m_i + 1 when it over-fits from epoch
    m_i (`overfit_epoch`), 2E when it is still falling at the end (`still_falling`; it would use
    a longer run), else E (it levels off). factor_i = clip(t_i / median_group(t), *factor_clip):
    a term that over-fits earlier than the group's median is weighted down, one that keeps
    improving longer is weighted up; a constant curve (an unused term, e.g. cls with one class)
    keeps factor 1 and is left out of the median. Candidates:
    value_i(a) = base_i · factor_i ** a for a in `steps` (a = 0 is the base, a = 1 the full
    factor), rounded to 5 decimals and clipped to the space's bounds (or hyp.RANGES without a
    space); a parameter frozen in (or missing from) a given space keeps [base] only.

    Returns (values, explanation): values {name: [candidates, aligned with steps]};
    explanation {name: {'curve', 'state', 'overfit_epoch', 'still_falling', 't', 't_median',
    'factor', 'base', 'candidates', 'reason'}} for the report.
    """
    terms = tuple(terms)
    nt = len(terms)
    loc = np.asarray(local_curves, np.float64)
    glo = np.asarray(global_curves, np.float64)
    if loc.ndim != 3 or loc.shape[2] != nt:
        raise ValueError(f"local_curves: expected (epochs, levels, {nt}), got {loc.shape}")
    if glo.ndim != 2 or glo.shape[1] != nt or glo.shape[0] != loc.shape[0]:
        raise ValueError(f"global_curves: expected ({loc.shape[0]}, {nt}), got {glo.shape}")
    if level_term != "total" and level_term not in terms:
        raise ConfigError(f"loss_weight_grid: level_term {level_term!r}: expected 'total' or one of {terms}")
    e, nl = loc.shape[:2]
    balance = list(base_hyp["balance"])
    if len(balance) != nl:
        raise ConfigError(f"loss_weight_grid: base_hyp has {len(balance)} balance weights, the curves {nl} levels")
    kw = {"window": window, "rel_tol": rel_tol, "noise_z": noise_z, "tail": tail}
    groups = [
        ([f"balance.{i}" for i in range(nl)],
         [loc[:, i].sum(-1) if level_term == "total" else loc[:, i, terms.index(level_term)] for i in range(nl)],
         [float(b) for b in balance], [f"P{i + 3} {level_term} loss" for i in range(nl)]),
        (list(terms), [glo[:, k] for k in range(nt)], [float(base_hyp[k]) for k in terms],
         [f"global {k} loss" for k in terms]),
    ]
    values: dict[str, list[float]] = {}
    explain: dict[str, dict] = {}
    for names, curves, bases, labels in groups:
        facts = [_term(c, e, kw) for c in curves]
        ts = [f["t"] for f in facts if f["t"] is not None]
        t_med = float(np.median(ts)) if ts else None
        for name, fact, base, label in zip(names, facts, bases, labels):
            factor = 1.0 if fact["t"] is None or not t_med else float(np.clip(fact["t"] / t_med, *factor_clip))
            lo, hi = H.ranges(family)[name.split(".")[0]]
            fixed = None
            if space is not None:
                if name not in space:
                    fixed = "not in the search space"
                elif space[name].frozen:
                    fixed = "frozen in the search space"
                else:
                    lo, hi = space[name].low, space[name].high
            cands = [base] if fixed else [float(np.clip(round(base * factor ** a, DECIMALS), lo, hi)) for a in steps]
            values[name] = cands
            if fixed:
                reason = f"{label}: {fact['state']}; kept at {base} ({fixed})"
            elif factor == 1.0:
                reason = f"{label}: {fact['state']}; weight kept (factor 1)"
            else:
                way = "lowered" if factor < 1 else "raised"
                reason = (f"{label}: {fact['state']} (useful length {fact['t']:g} vs group median {t_med:g} "
                          f"of {e} epochs); weight {way} x{factor:.3g}")
            explain[name] = {"curve": label, **fact, "t_median": t_med, "factor": factor, "base": base,
                             "candidates": cands, "reason": reason}
    return values, explain


def apply_loss_weights(hyp: Mapping, values: Mapping[str, Sequence[float]], step: int = -1, *,
                       family=None) -> dict:
    """A copy of `hyp` with the `loss_weight_grid` candidates at index `step` (default the last,
    i.e. the full factor with the default steps) written in: `balance.i` into `balance[i]`,
    `box` / `obj` / `cls` as they are. Checked by `jaxyolo.hyp.load_hyp`."""
    out = dict(hyp)
    balance = list(out["balance"])
    for name, cands in values.items():
        v = float(cands[step])
        if name.startswith("balance."):
            balance[int(name.split(".", 1)[1])] = v
        else:
            out[name] = v
    out["balance"] = balance
    return H.load_hyp(out, num_levels=len(balance), family=family)


def loss_grid_vectors(best_vector, values: Mapping[str, Sequence[float]], space: SearchSpace,
                      exclude=None) -> tuple[np.ndarray, dict]:
    """Vectors from `loss_weight_grid` candidates: the levels group (`balance.*`) and the
    objectives group (the loss terms' gains, e.g. `box`, `obj`, `cls`) each move together along their step index (index j
    of every candidate list = steps[j]); the grid is the full factorial over (level step, objective
    step), e.g. 3 x 3 = 9 points with the best (step 0, 0) first. Names not in the space are
    ignored; then `space.clip`, duplicates and `exclude` dropped. Returns (vectors, description)."""
    best = np.asarray(best_vector, np.float64)
    if best.shape != (space.dim,):
        raise ValueError(f"loss_grid_vectors: best_vector must have shape ({space.dim},), got {best.shape}")
    groups = [[n for n in values if n.startswith("balance.") and n in space],
              [n for n in values if not n.startswith("balance.") and n in space]]
    sizes = [max((len(values[n]) for n in g), default=1) for g in groups]
    excl = set()
    if exclude is not None and np.size(exclude):
        excl = {tuple(r) for r in space.clip(np.asarray(exclude, np.float64).reshape(-1, space.dim))}
    seen, out, index = set(), [], []
    for jl, jg in itertools.product(range(sizes[0]), range(sizes[1])):
        v = best.copy()
        for group, j in zip(groups, (jl, jg)):
            for n in group:
                c = values[n]
                v[space.index(n)] = c[min(j, len(c) - 1)]
        v = space.clip(v)
        if tuple(v) in seen or tuple(v) in excl:
            continue
        seen.add(tuple(v))
        out.append(v)
        index.append([jl, jg])
    desc = {"groups": groups, "shape": sizes, "points": sizes[0] * sizes[1], "unique": len(out), "step_index": index}
    return (np.stack(out) if out else np.zeros((0, space.dim))), desc
