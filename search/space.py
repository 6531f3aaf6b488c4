"""The search space of the joint hyper-parameter search: bounds, gains and scales per hyp.

A search vector is a 1-D float64 array in `SearchSpace.names` order. Names are the reference hyp
keys (`jaxyolo.hyp.KEYS`), except that the per-level list `balance` is searched element-wise as
`balance.0`, `balance.1`, ... (P3, P4, ...). Space files are YAML mappings

    name: {start: S, low: L, high: H, gain: G, scale: linear|log, frozen: false}

(`configs/search/default.yaml` is the bundled one; `start` defaults to the bundled default hyp's
value, `gain` to 1, `scale` to linear, `frozen` to false; `low` and `high` are required).

Normalised units: u = (v - low) / (high - low) in linear scale and
u = (ln v - ln low) / (ln high - ln low) in log scale, so u lies in [0, 1] inside the bounds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import yaml

from jaxyolo import hyp as H
from jaxyolo.errors import ConfigError
from jaxyolo.files import read_document

DECIMALS = 5  # the reference rounds every evolved hyp to 5 decimals
SCALES = ("linear", "log")
FIELDS = ("start", "low", "high", "gain", "scale", "frozen")
DEFAULT_SPACE = "default"


@dataclass(frozen=True)
class Param:
    """One searchable hyper-parameter. `name` is a hyp key or `balance.<level>`."""

    name: str
    start: float
    low: float
    high: float
    gain: float = 1.0
    scale: str = "linear"
    frozen: bool = False

    @property
    def key(self) -> str:
        """The hyp key this parameter sets (`balance` for `balance.i`)."""
        return self.name.split(".", 1)[0]

    @property
    def level(self) -> int | None:
        """The level index of a `balance.i` parameter, else None."""
        return int(self.name.split(".", 1)[1]) if "." in self.name else None


def available() -> list[str]:
    """Names of the bundled search spaces."""
    return sorted(p.name[:-5] for p in resources.files("jaxyolo.configs").joinpath("search").iterdir()
                  if p.name.endswith(".yaml"))


class SearchSpace:
    """An ordered set of `Param`s with the conversions between vectors, hyp dicts and [0, 1]."""

    def __init__(self, params: Sequence[Param], where: str = "search space", *, family=None):
        self.where = where
        self.family = family  # whose own hyp keys (`Family.hyp_defaults`) the space may hold
        known = H.ranges(family)
        self.params: tuple[Param, ...] = tuple(params)
        if not self.params:
            raise ConfigError(f"{where}: the search space is empty")
        seen = set()
        for p in self.params:
            _check_param(p, where, known)
            if p.name in seen:
                raise ConfigError(f"{where}: {p.name}: listed twice")
            seen.add(p.name)
        self._index = {p.name: i for i, p in enumerate(self.params)}
        f64 = np.float64
        self.lows = np.array([p.low for p in self.params], f64)
        self.highs = np.array([p.high for p in self.params], f64)
        self.gains = np.array([p.gain for p in self.params], f64)
        self.frozen = np.array([p.frozen for p in self.params], bool)
        self.log = np.array([p.scale == "log" for p in self.params], bool)
        for a in (self.lows, self.highs, self.gains, self.frozen, self.log):
            a.setflags(write=False)

    # ---- construction -----------------------------------------------------------------------

    @classmethod
    def load(cls, source: str | Path | Mapping | SearchSpace = DEFAULT_SPACE, *, family=None) -> SearchSpace:
        """A bundled space name ("default"), a YAML path, a dict {name: fields}, or a space.
        `family`: a detector family whose own hyp keys the space may hold."""
        if isinstance(source, SearchSpace):
            return source
        if isinstance(source, Mapping):
            raw, where = dict(source), "search space dict"
        else:
            raw, where = _read(source)
        if not isinstance(raw, Mapping) or not raw:
            raise ConfigError(f"{where}: expected a non-empty mapping of hyper-parameter -> fields")
        defaults = H.load_hyp(None, family=family, num_levels=3)
        params = []
        for name, fields in raw.items():
            params.append(_param(str(name), fields, defaults, where))
        return cls(params, where, family=family)

    # ---- basic properties -------------------------------------------------------------------

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(p.name for p in self.params)

    @property
    def dim(self) -> int:
        return len(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __contains__(self, name: object) -> bool:
        return name in self._index

    def __getitem__(self, name: str) -> Param:
        return self.params[self.index(name)]

    def index(self, name: str) -> int:
        try:
            return self._index[name]
        except KeyError:
            raise ConfigError(f"{self.where}: {name!r} is not in the search space; names: {list(self.names)}") from None

    @property
    def free(self) -> np.ndarray:
        """Indices of the non-frozen parameters."""
        return np.flatnonzero(~self.frozen)

    @property
    def num_levels(self) -> int:
        """1 + the highest `balance.i` level in the space (0 without balance entries)."""
        return max((p.level + 1 for p in self.params if p.level is not None), default=0)

    def __repr__(self) -> str:
        return f"SearchSpace({self.where}: {self.dim} params, {len(self.free)} free)"

    # ---- vectors ----------------------------------------------------------------------------

    def start_vector(self) -> np.ndarray:
        return np.array([p.start for p in self.params], np.float64)

    def vector_from_hyp(self, hyp: Mapping) -> np.ndarray:
        """The space's values read from a hyp dict (`balance` as a list); a key the dict lacks
        takes the bundled default. Values are not clipped."""
        defaults = H.load_hyp(None, num_levels=max(self.num_levels, 3), family=self.family)
        out = []
        for p in self.params:
            v = hyp.get(p.key, defaults.get(p.key))
            if p.level is not None:
                try:
                    v = v[p.level]
                except (TypeError, IndexError):
                    raise ConfigError(f"hyp dict: balance: no value for level {p.level} ({p.name})") from None
            try:
                out.append(float(v))
            except (TypeError, ValueError):
                raise ConfigError(f"hyp dict: {p.name}: expected a number, got {v!r}") from None
        return np.array(out, np.float64)

    def hyp_from_vector(self, vector, base: Mapping | str | Path | None = None, *, family=None) -> dict:
        """A full hyp dict (checked by `jaxyolo.hyp.load_hyp`, with `family`'s own keys) with the
        space's values from `vector` and every other key from `base` (a hyp dict, a bundled name or
        a path; default: the bundled default hyp). `balance` is reassembled into a list."""
        v = self._as_vector(vector)
        num_levels = None
        if isinstance(base, Mapping) and isinstance(base.get("balance"), (list, tuple)):
            num_levels = len(base["balance"])
        num_levels = max(num_levels or 3, self.num_levels)
        hyp = dict(H.load_hyp(base, num_levels=num_levels, family=family))
        balance = list(hyp["balance"])
        for p, x in zip(self.params, v):
            if p.level is not None:
                balance[p.level] = float(x)
            else:
                hyp[p.key] = float(x)
        hyp["balance"] = balance
        return H.load_hyp(hyp, num_levels=len(balance), family=family)

    def normalise(self, v) -> np.ndarray:
        """Values -> [0, 1] per dimension (log-aware); works on (..., dim) arrays. A dimension with
        low == high (allowed only when frozen) maps to 0."""
        v = np.asarray(v, np.float64)
        self._check_shape(v)
        lo, hi = self._t(self.lows), self._t(self.highs)
        x = self._t(np.where(self.log, np.maximum(v, 1e-300), v))  # log of a value <= 0: very negative
        width = hi - lo
        return np.where(width > 0, (x - lo) / np.where(width > 0, width, 1.0), 0.0)

    def denormalise(self, u) -> np.ndarray:
        """[0, 1] -> values (inverse of `normalise`); works on (..., dim) arrays."""
        u = np.asarray(u, np.float64)
        self._check_shape(u)
        lo, hi = self._t(self.lows), self._t(self.highs)
        x = lo + u * (hi - lo)
        return np.where(self.log, np.exp(x), x)

    def clip(self, v) -> np.ndarray:
        """Clip to [low, high] and round to 5 decimals (the reference's last step); a bound that is
        not a 5-decimal number stays exact (clip again after rounding)."""
        v = np.asarray(v, np.float64)
        self._check_shape(v)
        return np.clip(np.round(np.clip(v, self.lows, self.highs), DECIMALS), self.lows, self.highs)

    def to_dict(self) -> dict:
        """{name: {start, low, high, gain, scale, frozen}}: `SearchSpace.load` reads it back."""
        return {p.name: {"start": float(p.start), "low": float(p.low), "high": float(p.high),
                         "gain": float(p.gain), "scale": p.scale, "frozen": bool(p.frozen)} for p in self.params}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def describe(self, vector) -> dict[str, float]:
        """{name: value} of a vector (for logs and reports)."""
        return {n: float(x) for n, x in zip(self.names, self._as_vector(vector))}

    # ---- helpers ----------------------------------------------------------------------------

    def _t(self, x):
        """Transform to the working scale: ln for log dimensions (values are > 0 there)."""
        x = np.asarray(x, np.float64)
        return np.where(self.log, np.log(np.where(self.log, x, 1.0)), x)

    def _check_shape(self, v: np.ndarray) -> None:
        if v.ndim == 0 or v.shape[-1] != self.dim:
            raise ValueError(f"expected (..., {self.dim}) values in {list(self.names)} order, got shape {v.shape}")

    def _as_vector(self, vector) -> np.ndarray:
        v = np.asarray(vector, np.float64)
        if v.shape != (self.dim,):
            raise ValueError(f"expected a vector of shape ({self.dim},), got {v.shape}")
        return v


# ---------------------------------------------------------------------------------------------


def _read(source: str | Path) -> tuple[dict, str]:
    path = Path(source)
    if not path.suffix and not path.exists():
        path = Path(str(resources.files("jaxyolo.configs").joinpath("search", f"{source}.yaml")))
        if not path.exists():
            raise ConfigError(f"search space {source!r}: no such file; bundled: {available()}")
    return read_document(path, what="search space file"), str(path)


def _number(where: str, name: str, field: str, value) -> float:
    if isinstance(value, bool):
        raise ConfigError(f"{where}: {name}.{field}: expected a number, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {name}.{field}: expected a number, got {value!r}") from None
    if not math.isfinite(x):
        raise ConfigError(f"{where}: {name}.{field}: expected a finite number, got {value!r}")
    return x


def _param(name: str, fields, defaults: Mapping, where: str) -> Param:
    key, _, level = name.partition(".")
    if key in H.IGNORED or key in ("fl_gamma", "giou"):
        why = H.IGNORED.get(key, "only 0 is supported" if key == "fl_gamma" else "use the name 'box'")
        raise ConfigError(f"{where}: {name}: not searchable in jaxyolo ({why}); remove it from the space")
    if key not in defaults:
        raise ConfigError(f"{where}: {name}: unknown hyper-parameter; known: {sorted(defaults)}")
    if key == "balance" and not (level.isdigit() and str(int(level)) == level):
        raise ConfigError(f"{where}: {name}: search `balance` per level as balance.0, balance.1, ...")
    if key != "balance" and level:
        raise ConfigError(f"{where}: {name}: unknown hyper-parameter; only balance has per-level entries")
    if not isinstance(fields, Mapping):
        raise ConfigError(f"{where}: {name}: expected a mapping of {list(FIELDS)}, got {fields!r}")
    unknown = sorted(set(map(str, fields)) - set(FIELDS))
    if unknown:
        raise ConfigError(f"{where}: {name}: unknown field(s) {unknown}; known: {list(FIELDS)}")
    for f in ("low", "high"):
        if f not in fields:
            raise ConfigError(f"{where}: {name}: missing field '{f}'")
    if "start" in fields:
        start = fields["start"]
    elif key == "balance":
        bal = defaults["balance"]
        if int(level) >= len(bal):
            raise ConfigError(f"{where}: {name}: missing field 'start' (the default balance has {len(bal)} levels)")
        start = bal[int(level)]
    else:
        start = defaults[key]
    scale = fields.get("scale", "linear")
    if scale not in SCALES:
        raise ConfigError(f"{where}: {name}.scale: {scale!r} is not one of {list(SCALES)}")
    frozen = fields.get("frozen", False)
    if not isinstance(frozen, bool):
        raise ConfigError(f"{where}: {name}.frozen: expected true or false, got {frozen!r}")
    return Param(name=name, start=_number(where, name, "start", start), low=_number(where, name, "low", fields["low"]),
                 high=_number(where, name, "high", fields["high"]),
                 gain=_number(where, name, "gain", fields.get("gain", 1.0)), scale=scale, frozen=frozen)


def _check_param(p: Param, where: str, known: Mapping) -> None:
    """Every rule a Param must meet; each failure names the parameter."""
    n = p.name
    key, _, level = p.name.partition(".")
    if key not in known:
        raise ConfigError(f"{where}: {n}: unknown hyper-parameter; known: {sorted(known)}")
    if key == "balance" and not (level.isdigit() and str(int(level)) == level):
        raise ConfigError(f"{where}: {n}: search `balance` per level as balance.0, balance.1, ...")
    if key != "balance" and level:
        raise ConfigError(f"{where}: {n}: unknown hyper-parameter; only balance has per-level entries")
    for field in ("start", "low", "high", "gain"):
        x = getattr(p, field)
        if isinstance(x, bool) or not isinstance(x, (int, float, np.floating, np.integer)) or not math.isfinite(x):
            raise ConfigError(f"{where}: {n}.{field}: expected a finite number, got {x!r}")
    if p.scale not in SCALES:
        raise ConfigError(f"{where}: {n}.scale: {p.scale!r} is not one of {list(SCALES)}")
    if p.low > p.high:
        raise ConfigError(f"{where}: {n}: low {p.low} > high {p.high}")
    if p.low == p.high and not p.frozen:
        raise ConfigError(f"{where}: {n}: low == high ({p.low}) leaves nothing to search; set frozen: true")
    if not p.low <= p.start <= p.high:
        raise ConfigError(f"{where}: {n}.start: {p.start} is outside [low, high] = [{p.low}, {p.high}]")
    if p.scale == "log" and p.low <= 0:
        raise ConfigError(f"{where}: {n}: log scale needs low > 0, got low = {p.low}")
    if p.gain < 0:
        raise ConfigError(f"{where}: {n}.gain: must be >= 0, got {p.gain}")
    lo, hi = known[key]
    if p.low < lo or p.high > hi:
        raise ConfigError(f"{where}: {n}: bounds [{p.low}, {p.high}] leave the valid range [{lo}, {hi}] "
                          f"of jaxyolo.hyp.RANGES")
