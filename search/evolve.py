"""Genetic evolution of hyper-parameters: the reference's rule (docs/reference.md §10), population-ready.

The reference (YRP / yolov5 v5.0 `train.py --evolve`) trains one child per generation; here a
generation is `population` children trained together, each from its own parent selection and
mutation. Everything is host-side NumPy, deterministic given a `numpy.random.Generator` (no
global RNG, no time seed). A history is `vectors` (N, dim) in `SearchSpace.names` order with
`fitness` (N,); a trial whose fitness is NaN (failed run) is never a parent but counts as
evaluated.

Rules (each documented where it is implemented):

- selection: `select_parent` (the reference's top-n, single / weighted);
- mutation: `mutate` (the reference's factor rule by name; additive step where a value is 0;
  frozen never moves; the child always differs from its parent after clip and round);
- elitism: selection looks at the top n of the *whole* history, so the best vector is always a
  candidate parent; `elite` extra slots are mutations of the single best vector;
- no re-evaluation: a child equal (after clip and round) to a vector already in the history or
  earlier in the same generation is redrawn, because a trial is deterministic by its seed.
"""

from __future__ import annotations

import numpy as np

from jaxyolo.errors import ConfigError
from jaxyolo.validate import fitness  # noqa: F401 - the search's fitness is the trainer's

from .space import DECIMALS, SearchSpace

FACTOR_CLIP = (0.3, 3.0)  # the reference's clip of the mutation factor


def _history(vectors, fitness_values, dim: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(N, dim) float64 vectors and (N,) fitness as arrays; None or empty -> (0, dim) and (0,)."""
    if vectors is None or (np.size(vectors) == 0 and (fitness_values is None or np.size(fitness_values) == 0)):
        return np.zeros((0, dim or 0)), np.zeros((0,))
    x = np.asarray(vectors, np.float64)
    f = np.asarray(fitness_values, np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != f.shape[0]:
        raise ValueError(f"history: vectors {x.shape} and fitness {f.shape} do not match (want (N, dim) and (N,))")
    if dim is not None and x.shape[1] != dim:
        raise ValueError(f"history: vectors have {x.shape[1]} columns, the search space has {dim}")
    return x, f


def top_rows(vectors, fitness_values, top_n: int = 5) -> tuple[np.ndarray, np.ndarray]:
    """The top n = min(top_n, finite rows) rows by fitness, best first (stable for ties)."""
    x, f = _history(vectors, fitness_values)
    ok = np.isfinite(f)
    x, f = x[ok], f[ok]
    if len(f) == 0:
        raise ValueError("no trial with a finite fitness to select a parent from")
    order = np.argsort(-f, kind="stable")[: max(1, min(int(top_n), len(f)))]
    return x[order], f[order]


def best(vectors, fitness_values) -> tuple[np.ndarray, float]:
    """The best (vector, fitness) of a history (finite fitness only)."""
    x, f = top_rows(vectors, fitness_values, 1)
    return x[0].copy(), float(f[0])


def selection_weights(fitness_top) -> np.ndarray:
    """The reference's parent weights w = fitness - min(fitness) + 1e-6 (yolov5 v6 adds the 1e-6
    so that equal fitness values do not give all-zero weights)."""
    f = np.asarray(fitness_top, np.float64)
    return f - f.min() + 1e-6


def select_parent(vectors, fitness_values, rng: np.random.Generator, *, mode: str = "single",
                  top_n: int = 5) -> np.ndarray:
    """A parent from the top n = min(top_n, rows) rows of the history (reference, docs/reference.md §10 step 1).

    'single': one of the n rows at random with probability proportional to w;
    'weighted': the weighted average of the n rows with weights w (w = `selection_weights`).
    Rows with a non-finite fitness are ignored. Returns a new (dim,) array.
    """
    x, f = top_rows(vectors, fitness_values, top_n)
    w = selection_weights(f)
    if mode == "single":
        return x[rng.choice(len(w), p=w / w.sum())].copy()
    if mode == "weighted":
        return (x * w[:, None]).sum(0) / w.sum()
    raise ConfigError(f"parent selection mode {mode!r}: expected 'single' or 'weighted'")


def mutation_factors(space: SearchSpace, rng: np.random.Generator, *, mp: float = 0.8,
                     sigma: float = 0.2) -> np.ndarray:
    """One draw of the reference's factors, gains looked up by name through the space:

        factor_k = clip(1 + gain_k · [U_k < mp] · N_k · r · sigma, 0.3, 3.0)

    with U_k ~ U(0, 1), N_k ~ N(0, 1) per parameter and ONE r ~ U(0, 1) shared by all parameters
    of this child. Frozen parameters get factor 1. Draw order (fixed, for determinism): r, U, N,
    each over all `space.dim` parameters.
    """
    r = rng.random()
    u = rng.random(space.dim)
    n = rng.standard_normal(space.dim)
    f = np.clip(1.0 + space.gains * (u < mp) * n * r * sigma, *FACTOR_CLIP)
    return np.where(space.frozen, 1.0, f)


def mutate(parent, space: SearchSpace, rng: np.random.Generator, *, mp: float = 0.8, sigma: float = 0.2,
           max_tries: int = 1000) -> np.ndarray:
    """A child of `parent` by the reference's rule (docs/reference.md §10 steps 2-3), redrawn until it differs.

    1. factors by `mutation_factors` (gains by name, frozen -> 1); redraw while all are 1.
    2. child_k = parent_k · factor_k (multiplicative, in linear and log scale alike: a factor is
       already a step in log space, and the log scale of the space only matters for the trend
       and grid).
    3. **Zero rule.** The multiplicative rule cannot move a value at 0. Where a parameter drew a
       factor != 1 but the product rounds (5 decimals) to the parent's rounded value (always at
       0, and for values so small that the change is lost in rounding), the same draw is applied
       additively over the parameter's range instead:
           child_k = parent_k + (factor_k - 1) · (high_k - low_k)  = parent_k + gain·N·r·sigma·(high - low)
       (factor clip included). At a bound of 0 a negative step clips back to 0, so a zero
       parameter moves in about half of the children that draw it. Log-scale parameters cannot be
       0 (low > 0), so they always take the multiplicative step.
    4. clip to [low, high] and round to 5 decimals (`SearchSpace.clip`); frozen parameters keep
       the parent's (clipped) value.
    5. if the child equals the clipped parent, redraw from 1 (at most `max_tries` draws).
    """
    p = np.asarray(parent, np.float64)
    if p.shape != (space.dim,):
        raise ValueError(f"parent: expected shape ({space.dim},), got {p.shape}")
    movable = ~space.frozen & (space.gains > 0)
    if not movable.any():
        raise ConfigError(f"{space.where}: every parameter is frozen or has gain 0: nothing to mutate")
    if not 0.0 < mp <= 1.0 or sigma <= 0:
        raise ConfigError(f"mutation: need 0 < mp <= 1 and sigma > 0, got mp={mp}, sigma={sigma}")
    anchor = space.clip(p)
    width = space.highs - space.lows
    for _ in range(max_tries):
        f = mutation_factors(space, rng, mp=mp, sigma=sigma)
        if np.all(f == 1.0):
            continue
        child = p * f
        lost = (f != 1.0) & (np.round(child, DECIMALS) == np.round(p, DECIMALS))
        child = np.where(lost, p + (f - 1.0) * width, child)
        child = np.where(space.frozen, anchor, space.clip(child))
        if np.any(child != anchor):
            return child
    raise RuntimeError(f"mutate: no child different from the parent in {max_tries} draws "
                       f"(mp={mp}, sigma={sigma}); is every movable parameter pinned at a bound?")


def next_generation(vectors, fitness_values, space: SearchSpace, population: int, rng: np.random.Generator, *,
                    mode: str = "single", top_n: int = 5, mp: float = 0.8, sigma: float = 0.2, elite: int = 0,
                    max_tries: int = 1000) -> np.ndarray:
    """The next `population` children, (population, dim) float64, clipped and rounded.

    - Empty history (or no finite fitness yet): the start vector plus population - 1 mutations
      of it (the start vector is left out if it was already evaluated).
    - Otherwise: the first `elite` children are mutations of the single best vector of the whole
      history; every other child is `mutate(select_parent(history, mode, top_n))`, one selection
      per child. Since selection draws from the top n of the entire history, the best vector is
      always available as a parent (elitist by construction); `elite` guarantees it offspring.
    - A child that equals (after clip and round) a vector of the history or an earlier child of
      this generation is redrawn (new selection and mutation): a trial is deterministic by its
      seed, so re-evaluating it would waste a slot.
    """
    if population < 1:
        raise ConfigError(f"population must be >= 1, got {population}")
    if elite < 0:
        raise ConfigError(f"elite must be >= 0, got {elite}")
    x, f = _history(vectors, fitness_values, space.dim)
    seen = {tuple(row) for row in space.clip(x)} if len(x) else set()
    children: list[np.ndarray] = []

    def add(make_child) -> None:
        for _ in range(max_tries):
            c = make_child()
            key = tuple(c)
            if key not in seen:
                seen.add(key)
                children.append(c)
                return
        raise RuntimeError(f"next_generation: no new child in {max_tries} draws (the space may be exhausted)")

    kw = dict(mp=mp, sigma=sigma, max_tries=max_tries)
    if not np.isfinite(f).any():
        start = space.clip(space.start_vector())
        if tuple(start) not in seen:
            seen.add(tuple(start))
            children.append(start)
        while len(children) < population:
            add(lambda: mutate(start, space, rng, **kw))
        return np.stack(children)

    best_vec, _ = best(x, f)
    for i in range(population):
        if i < elite:
            add(lambda: mutate(best_vec, space, rng, **kw))
        else:
            add(lambda: mutate(select_parent(x, f, rng, mode=mode, top_n=top_n), space, rng, **kw))
    return np.stack(children)
