"""Joint hyper-parameter search (JHS, paper §4.2-4.3), installed as `jaxyolo.search`.

Host-side NumPy, deterministic given a `numpy.random.Generator`:

- `space`: `Param`, `SearchSpace` (bounds, gains, linear/log scales; vectors <-> hyp dicts);
  the bundled space is `configs/search/default.yaml` (the reference's evolution meta table
  plus the per-level balance weights).
- `evolve`: the reference's genetic evolution (parent selection, mutation), one population
  per generation (`next_generation`).
- `trend`: the paper's trend estimate and grid, and the loss-curve rule for loss weights.
"""

from .evolve import best, fitness, mutate, next_generation, select_parent
from .space import Param, SearchSpace
from .trend import (
    apply_loss_weights,
    estimate_trends,
    loss_grid_vectors,
    loss_weight_grid,
    overfit_epoch,
    still_falling,
    trend_grid,
)

__all__ = [
    "Param",
    "SearchSpace",
    "best",
    "fitness",
    "mutate",
    "next_generation",
    "select_parent",
    "estimate_trends",
    "trend_grid",
    "overfit_epoch",
    "still_falling",
    "loss_weight_grid",
    "loss_grid_vectors",
    "apply_loss_weights",
]
