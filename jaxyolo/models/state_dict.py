"""The one mapping between jaxyolo variables and the reference PyTorch state_dict.

Every jaxyolo module uses the reference's attribute names and lists the reference's registration
order in `TORCH_ORDER`, so a variable's path joined by dots *is* its state_dict key. Only
layouts differ: conv weights are HWIO here and OIHW there; KST candidates are (K, C) here and
(K, C, 1, 1) there (K = 1 is exactly YOLOR's IDetect `implicit` tensor). Three kinds of reference
entries have no variable here and are derived: BatchNorm `num_batches_tracked` (written 0: it is
unused by the reference because its BN momentum is set), and the head's `anchors` (grid units)
and `anchor_grid` (pixels) buffers, which come from the model's anchors.

Order follows nn.Module.state_dict: a module's own parameters, then its buffers, then its children.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from typing import Callable, Iterator, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from jaxyolo.errors import CheckpointError
from jaxyolo.models import layers as L
from jaxyolo.models.heads import Detect, Implicit


@dataclasses.dataclass(frozen=True)
class Entry:
    key: str
    shape: tuple[int, ...]  # reference (PyTorch) shape
    variable: nnx.Variable | None  # None: derived entry (num_batches_tracked, anchors)
    to_torch: Callable[[np.ndarray], np.ndarray]
    from_torch: Callable[[np.ndarray], np.ndarray]
    derived: Callable[[], np.ndarray] | None = None


def _same(a):
    return a


def _hwio_to_oihw(a):
    return np.transpose(a, (3, 2, 0, 1))


def _oihw_to_hwio(a):
    return np.transpose(a, (2, 3, 1, 0))


def entries(model) -> list[Entry]:
    """Every reference state_dict entry of `model`, in registration order."""
    return list(_walk(model, ""))


def _walk(module, prefix: str) -> Iterator[Entry]:
    if isinstance(module, Detect):
        yield from _anchor_entries(module, prefix)
    for name in getattr(type(module), "TORCH_ORDER", ()):  # parameter-free layers have none
        value = getattr(module, name)
        if value is None:  # e.g. the BN of a fused block, the implicit lists of a plain head
            continue
        if isinstance(value, nnx.Variable):
            yield _variable_entry(module, prefix + name, value)
        elif isinstance(value, nnx.List):
            for i, child in enumerate(value):
                yield from _walk(child, f"{prefix}{name}.{i}.")
        else:
            yield from _walk(value, f"{prefix}{name}.")
    if isinstance(module, L.BatchNorm2d):
        yield Entry(prefix + "num_batches_tracked", (), None, _same, _same, lambda: np.array(0, np.int64))


def _variable_entry(module, key: str, var: nnx.Variable) -> Entry:
    shape = tuple(var.get_value().shape)
    if isinstance(module, L.Conv2d) and key.endswith("weight"):
        return Entry(key, (shape[3], shape[2], shape[0], shape[1]), var, _hwio_to_oihw, _oihw_to_hwio)
    if isinstance(module, Implicit):
        return Entry(key, shape + (1, 1), var, lambda a: a[:, :, None, None], lambda a: a[:, :, 0, 0])
    return Entry(key, shape, var, _same, _same)


def _anchor_entries(head: Detect, prefix: str) -> Iterator[Entry]:
    px = np.asarray(head.anchors, np.float32)  # (nl, na, 2)
    grid = px / np.asarray(head.strides, np.float32)[:, None, None]
    nl, na = px.shape[:2]
    yield Entry(prefix + "anchors", grid.shape, None, _same, _same, lambda: grid)
    yield Entry(prefix + "anchor_grid", (nl, 1, na, 1, 1, 2), None, _same, _same,
                lambda: px.reshape(nl, 1, na, 1, 1, 2))


def expected_shapes(model) -> "OrderedDict[str, tuple[int, ...]]":
    return OrderedDict((e.key, e.shape) for e in entries(model))


def to_state_dict(model) -> "OrderedDict[str, np.ndarray]":
    """The model's reference state_dict: numpy arrays keyed by PyTorch names, in order (for an
    abstract model, `jax.ShapeDtypeStruct`s of the reference shapes)."""
    out = OrderedDict()
    for e in entries(model):
        if e.variable is not None and isinstance(e.variable.get_value(), jax.ShapeDtypeStruct):
            out[e.key] = jax.ShapeDtypeStruct(e.shape, e.variable.get_value().dtype)  # abstract model: shapes only
            continue
        value = e.derived() if e.variable is None else e.to_torch(np.asarray(e.variable.get_value()))
        out[e.key] = np.array(value, order="C")  # (ascontiguousarray would turn 0-d into 1-d)
    return out


def load_state_dict(model, state: Mapping[str, np.ndarray], *, source: str = "state_dict") -> None:
    """Set the model's variables from a reference state_dict, in place; exact for float32 input.

    Missing keys, unexpected keys and shape mismatches are reported by name (all of them at once).
    Derived entries (num_batches_tracked, anchors) may be absent; when present their shapes are
    checked and their values ignored (anchors are read by the caller before the model is built).
    """
    todo = entries(model)
    expected = {e.key for e in todo}
    missing = [e.key for e in todo if e.variable is not None and e.key not in state]
    unexpected = [k for k in state if k not in expected]
    bad_shape = [
        f"{e.key}: file {tuple(np.shape(state[e.key]))} vs model {e.shape}"
        for e in todo
        if e.key in state and tuple(np.shape(state[e.key])) != e.shape
    ]
    if len(bad_shape) > len(todo) // 2:
        raise CheckpointError(
            f"{source}: {len(bad_shape)} of {len(todo)} tensors have other shapes than the model's, probably a "
            f"different model scale or table (first: {bad_shape[0]})"
        )
    problems = []
    if missing:
        problems.append(f"missing keys: {_names(missing)}")
    if unexpected:
        problems.append(f"unexpected keys: {_names(unexpected)}")
    if bad_shape:
        problems.append(f"shape mismatch: {_names(bad_shape)}")
    if problems:
        raise CheckpointError(f"{source}: does not fit the model: " + "; ".join(problems))
    for e in todo:
        if e.variable is None:
            continue
        value = np.asarray(state[e.key])
        if not np.issubdtype(value.dtype, np.floating):
            raise CheckpointError(f"{source}: {e.key} has dtype {value.dtype}, expected floating point")
        e.variable.set_value(jnp.asarray(e.from_torch(value), jnp.float32))


def _names(items: list[str], limit: int = 12) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")
