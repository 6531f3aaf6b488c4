"""One pure training step that a population shares, and the mesh that runs it.

`make_train_step(detector, config)` returns `train_step(state, batch, hyp, key) -> (state, metrics)`:
a pure function of pytrees, so

* `jax.vmap(train_step, in_axes=(0, None, 0, 0))` trains a population of P members (state, hyp and
  key carry a leading axis P; the host batch is shared and each member augments it its own way);
* `population_step(train_step, mesh)` jits that vmapped step over a `Mesh` with axes ('pop', 'data'):
  members are sharded over 'pop', the batch over 'data'. Under `jit` the program keeps global
  semantics, so BatchNorm statistics are those of the whole batch (synchronised BN) and the result
  does not depend on the number of devices.

The optimiser, schedule and EMA are the reference's (spec §9), written as array arithmetic on the
step counter so that every hyper-parameter can differ between members:

* SGD with Nesterov momentum, three parameter groups: BN weights and implicit vectors (no weight
  decay), conv weights (weight decay ×= batch·accumulate/64), biases (no weight decay);
* warm-up over max(round(warmup_epochs·nb), min_warmup_iters) iterations: bias lr from
  warmup_bias_lr down, other lrs from 0 up to lr0·lf(epoch), momentum from warmup_momentum up,
  accumulation from 1 up to nominal_batch / batch;
* lf(e) = cosine (or linear) from 1 to lrf, per epoch;
* an optimiser step when `step - last_opt_step >= accumulate` (gradients summed in between);
* EMA of parameters and BN statistics with decay 0.9999·(1 − exp(−updates/2000)).

A non-finite loss or gradient skips the whole iteration (no gradient, no BN statistics update)
and is counted in `state.nonfinite_run` / `state.nonfinite_total`; the loop stops after too many in
a row.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from jaxyolo.errors import ConfigError
from jaxyolo.loss import yolo_loss
from jaxyolo.models import layers as L

SCHEDULES = ("cosine", "linear")
GROUP_NO_DECAY, GROUP_DECAY, GROUP_BIAS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings: anything that changes shapes or the compiled program (hashable)."""

    epochs: int
    batches_per_epoch: int
    batch_size: int  # images per iteration, over all devices
    img_size: int
    nominal_batch: int = 64
    min_warmup_iters: int = 1000  # the reference's floor on warm-up iterations
    schedule: str = "cosine"
    augment: bool = True  # on-device augmentation (jaxyolo.augment) from the host's mosaic/single images

    def __post_init__(self):
        for name in ("epochs", "batches_per_epoch", "batch_size", "img_size", "nominal_batch"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: must be one of {SCHEDULES}, got {self.schedule!r}")

    @property
    def accumulate(self) -> int:
        return max(round(self.nominal_batch / self.batch_size), 1)

    @property
    def total_iters(self) -> int:
        return self.epochs * self.batches_per_epoch


@struct.dataclass
class TrainState:
    step: jax.Array  # iterations done (the reference's `ni`)
    params: Any  # nnx.State of Params (what the model is built from)
    stats: Any  # nnx.State of BatchStats
    momentum: jax.Array  # SGD buffers, flat (see `FlatLayout`)
    grads: jax.Array  # gradients summed since the last optimiser step, flat
    last_opt_step: jax.Array
    ema_params: jax.Array  # flat
    ema_stats: jax.Array  # flat
    ema_updates: jax.Array
    nonfinite_run: jax.Array  # non-finite iterations in a row
    nonfinite_total: jax.Array


def init_state(detector) -> TrainState:
    """The state of one member, from a detector's current weights (EMA starts as a copy)."""
    detector._require_values("train")
    _, params, stats = _split(detector.model)
    flat_p, flat_s = param_layout(detector).flat(params), FlatLayout(stats).flat(stats)
    zeros = jnp.zeros_like(flat_p)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    return TrainState(step=i32(0), params=params, stats=stats, momentum=zeros, grads=zeros,
                      last_opt_step=i32(-1), ema_params=flat_p, ema_stats=flat_s, ema_updates=i32(0),
                      nonfinite_run=i32(0), nonfinite_total=i32(0))


class FlatLayout:
    """Where each leaf of a parameter/statistics tree lives in one flat float32 vector.

    The optimiser, accumulation and EMA work on that vector: one fused update instead of one small
    kernel per leaf, which roughly halves the compile time of the step. With `groups`, leaves are
    ordered by optimiser group so that each group is one contiguous segment (`bounds`) and a
    per-element rate is a comparison with an iota, not a large constant.
    """

    def __init__(self, like, groups=None):
        leaves, self.treedef = jax.tree.flatten(like)
        self.shapes = [tuple(np.shape(x)) for x in leaves]
        self.dtypes = [x.dtype for x in leaves]
        g = [0] * len(leaves) if groups is None else [int(v) for v in jax.tree.leaves(groups)]
        self.order = sorted(range(len(leaves)), key=lambda i: (g[i], i))
        sizes = [int(np.prod(s)) for s in self.shapes]
        self.size = sum(sizes)
        self.bounds = tuple(int(sum(sizes[i] for i in self.order if g[i] <= k)) for k in range(3))
        self.offsets, off = {}, 0
        for i in self.order:
            self.offsets[i] = (off, sizes[i])
            off += sizes[i]

    def flat(self, tree) -> jax.Array:
        leaves = jax.tree.leaves(tree)
        return jnp.concatenate([jnp.ravel(leaves[i]).astype(jnp.float32) for i in self.order])

    def unflat(self, vector):
        out = []
        for i, (shape, dtype) in enumerate(zip(self.shapes, self.dtypes)):
            off, n = self.offsets[i]
            out.append(jnp.reshape(vector[..., off:off + n], vector.shape[:-1] + shape).astype(dtype))
        return jax.tree.unflatten(self.treedef, out)


def replicate(tree, population: int):
    """Give every leaf a leading population axis of size P (all members equal)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (population,) + jnp.shape(x)), tree)


def member(tree, i: int):
    """Member i of a population pytree."""
    return jax.tree.map(lambda x: x[i], tree)


def param_layout(detector) -> FlatLayout:
    """The flat layout of the params: optimiser groups as contiguous segments."""
    return FlatLayout(_split(detector.model)[1], param_groups(detector))


def param_groups(detector) -> Any:
    """A pytree like the params of Python ints: the reference's optimiser group of each leaf."""
    _, params, _ = _split(detector.model)
    bn_paths = {tuple(path) for path, node in nnx.iter_graph(detector.model) if isinstance(node, L.BatchNorm2d)}

    def group(path, _):
        names = tuple(getattr(p, "key", getattr(p, "idx", getattr(p, "name", None))) for p in path)
        names = tuple(n for n in names if n != "value")  # the Variable's own field
        leaf, parent = names[-1], names[:-1]
        if leaf == "implicit" or (parent in bn_paths and leaf == "weight"):
            return GROUP_NO_DECAY
        if leaf == "bias":
            return GROUP_BIAS
        return GROUP_DECAY

    return jax.tree_util.tree_map_with_path(group, params)


def lr_factor(epoch, lrf, epochs: int, schedule: str):
    """lf(e): cosine ((1 + cos(πe/E))/2)(1 − lrf) + lrf, or linear (1 − e/E)(1 − lrf) + lrf."""
    e = jnp.asarray(epoch, jnp.float32)
    if schedule == "cosine":
        return ((1 + jnp.cos(math.pi * e / epochs)) / 2) * (1 - lrf) + lrf
    return (1 - e / epochs) * (1 - lrf) + lrf


def schedule(step, hyp, config: TrainConfig):
    """(lr of the bias group, lr of the other groups, momentum, accumulate) at iteration `step`."""
    nb = config.batches_per_epoch
    lf = lr_factor(step // nb, hyp["lrf"], config.epochs, config.schedule)
    base = hyp["lr0"] * lf
    nw = jnp.maximum(jnp.round(hyp["warmup_epochs"] * nb), config.min_warmup_iters)
    frac = jnp.clip(step / nw, 0.0, 1.0)
    warm = step <= nw
    lr_bias = jnp.where(warm, hyp["warmup_bias_lr"] + frac * (base - hyp["warmup_bias_lr"]), base)
    lr_other = jnp.where(warm, frac * base, base)
    momentum = jnp.where(warm, hyp["warmup_momentum"] + frac * (hyp["momentum"] - hyp["warmup_momentum"]),
                         hyp["momentum"])
    ramp = jnp.maximum(1.0, jnp.round(1.0 + frac * (config.nominal_batch / config.batch_size - 1.0)))
    accumulate = jnp.where(warm, ramp, float(config.accumulate))
    return lr_bias, lr_other, momentum, accumulate


def yolo_sgd(layout: FlatLayout) -> optax.GradientTransformationExtraArgs:
    """The reference's grouped SGD as an optax transformation on flat vectors (see `FlatLayout`)
    whose rates arrive per call (arrays), so they follow a traced schedule and differ between
    members.

    update(grads, buffers, params, lr_bias=, lr_other=, momentum=, weight_decay=) follows
    torch.optim.SGD(nesterov=True, dampening=0): g += wd·p (decay group only); buf = μ·buf + g;
    step = −lr·(g + μ·buf).
    """
    end_no_decay, end_decay, _ = layout.bounds

    def init(params):
        return jnp.zeros((layout.size,), jnp.float32)

    def update(grads, buffers, params, *, lr_bias, lr_other, momentum, weight_decay):
        idx = jnp.arange(layout.size)
        in_decay = (idx >= end_no_decay) & (idx < end_decay)
        g = grads + jnp.where(in_decay, weight_decay, 0.0) * params
        buf = momentum * buffers + g
        lr = jnp.where(idx >= end_decay, lr_bias, lr_other)
        return -lr * (g + momentum * buf), buf

    return optax.GradientTransformationExtraArgs(init, update)


def ema_decay(updates):
    return 0.9999 * (1 - jnp.exp(-updates / 2000.0))


def make_train_step(detector, config: TrainConfig, *, augment_fn: Callable | None = None):
    """The pure step for `detector`'s architecture: (state, batch, hyp, key) -> (state, metrics).

    `batch` (numpy or device arrays): with `config.augment`, the host pipeline's mosaic and single
    versions (see `jaxyolo.data.pipeline`) which `augment_fn` (default `jaxyolo.augment.augment_batch`)
    turns into this member's images and targets; without, `image` (B, S, S, 3) uint8 or float in
    [0, 1] with `boxes`, `classes`, `mask`.
    """
    graphdef, _, _ = _split(detector.model)
    spec = detector.spec
    layout = param_layout(detector)
    stats_layout = FlatLayout(_split(detector.model)[2])
    opt = yolo_sgd(layout)
    nc = spec.nc
    if config.augment and augment_fn is None:
        from jaxyolo.augment import augment_batch as augment_fn
    wd_scale = config.batch_size * config.accumulate / config.nominal_batch

    def inputs(batch, hyp, key):
        if config.augment:
            return augment_fn(key, hyp, batch, out_size=config.img_size)
        img = batch["image"]
        img = img.astype(jnp.float32) / 255.0 if img.dtype == jnp.uint8 else img.astype(jnp.float32)
        return img, batch["boxes"], batch["classes"], batch["mask"]

    def loss_fn(params, stats, images, boxes, classes, mask, hyp, key):
        model = nnx.merge(graphdef, params, stats, copy=True)
        raw = model(images, train=True, key=key)
        loss_hyp = {**hyp, "cls": hyp["cls"] * (nc / 80.0)}  # spec §9: hyp['cls'] *= nc / 80
        total, terms = yolo_loss(raw, boxes, classes, mask, anchors=spec.anchors, strides=spec.strides,
                                 hyp=loss_hyp)
        return total, (terms, nnx.state(model, nnx.BatchStat))

    def train_step(state: TrainState, batch, hyp, key):
        k_aug, k_kst = jax.random.split(key)
        images, boxes, classes, mask = inputs(batch, hyp, k_aug)
        (total, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.stats, images, boxes, classes, mask, hyp, k_kst)
        grads = layout.flat(grads)
        finite = jnp.isfinite(total) & jnp.all(jnp.isfinite(grads))

        ni = state.step
        lr_bias, lr_other, momentum, accumulate = schedule(ni, hyp, config)
        acc = jnp.where(finite, state.grads + grads, state.grads)
        stats = jax.tree.map(lambda a, b: jnp.where(finite, a, b), new_stats, state.stats)
        do_opt = finite & ((ni - state.last_opt_step) >= accumulate)

        p = layout.flat(state.params)
        updates, buffers = opt.update(acc, state.momentum, p, lr_bias=lr_bias, lr_other=lr_other,
                                      momentum=momentum, weight_decay=hyp["weight_decay"] * wd_scale)
        p = jnp.where(do_opt, p + updates, p)
        ema_updates = state.ema_updates + do_opt.astype(jnp.int32)
        d = ema_decay(ema_updates.astype(jnp.float32))
        blend = lambda e, m: jnp.where(do_opt, d * e + (1 - d) * m, e)
        new = TrainState(
            step=ni + 1, params=layout.unflat(p), stats=stats,
            momentum=jnp.where(do_opt, buffers, state.momentum),
            grads=jnp.where(do_opt, 0.0, acc),
            last_opt_step=jnp.where(do_opt, ni, state.last_opt_step),
            ema_params=blend(state.ema_params, p),
            ema_stats=blend(state.ema_stats, stats_layout.flat(stats)),
            ema_updates=ema_updates,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
        )
        bsz = images.shape[0]
        metrics = {"loss": total / bsz, "local": terms["local"], "global": terms["global"],
                   "lr": lr_other, "lr_bias": lr_bias, "momentum": momentum, "finite": finite,
                   "optimizer_step": do_opt, "targets": jnp.sum(mask),
                   "nonfinite_run": new.nonfinite_run}
        return new, metrics

    return train_step


def make_mesh(pop: int = 1, data: int | None = None, devices=None) -> Mesh:
    """A ('pop', 'data') mesh over `devices` (default: all); `data` defaults to the rest."""
    devices = list(jax.devices() if devices is None else devices)
    if data is None:
        if len(devices) % pop:
            raise ConfigError(f"mesh: {len(devices)} devices cannot be split into pop={pop} groups")
        data = len(devices) // pop
    if pop * data > len(devices):
        raise ConfigError(f"mesh: pop={pop} × data={data} needs {pop * data} devices, have {len(devices)}")
    return Mesh(np.asarray(devices[: pop * data]).reshape(pop, data), ("pop", "data"))


def population_step(train_step, mesh: Mesh, *, donate: bool = True):
    """jit(vmap(train_step)) with the population over 'pop' and the batch over 'data'.

    Call as step(states, batch, hyps, keys): states/hyps/keys with a leading axis P (a multiple of
    the mesh's 'pop' size, see `pad_population`), batch leaves with a leading batch axis (a
    multiple of the 'data' size).

    The 'pop' axis is manual (`shard_map`): each device group runs the vmapped step on its own
    members. Letting the SPMD partitioner split the vmapped convolutions instead (they become
    grouped convolutions with one group per member) fails in XLA when the group count is divided.
    The 'data' axis stays automatic, so BatchNorm keeps whole-batch statistics.
    """
    vstep = jax.vmap(train_step, in_axes=(0, None, 0, 0))
    local = jax.shard_map(vstep, mesh=mesh, in_specs=(P("pop"), P(), P("pop"), P("pop")),
                          out_specs=(P("pop"), P("pop")), axis_names={"pop"}, check_vma=False)
    pop = NamedSharding(mesh, P("pop"))
    data = NamedSharding(mesh, P("data"))
    return jax.jit(local, in_shardings=(pop, data, pop, pop), out_shardings=(pop, pop),
                   donate_argnums=(0,) if donate else ())


def pad_population(tree, multiple: int):
    """Pad the leading axis to a multiple of `multiple` by repeating the last member (the padded
    members train like any other and are dropped by the caller). Returns (tree, original P)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    extra = -n % multiple
    if not extra:
        return tree, n
    return jax.tree.map(lambda x: jnp.concatenate([x, jnp.repeat(x[-1:], extra, 0)]), tree), n


def ema_detector(detector, state: TrainState, *, ema: bool = True):
    """A Detector carrying the (EMA) weights of one member's state."""
    from jaxyolo.api import Detector

    graphdef, _, like_s = _split(detector.model)
    if ema:
        params = param_layout(detector).unflat(jnp.asarray(state.ema_params))
        stats = FlatLayout(like_s).unflat(jnp.asarray(state.ema_stats))
    else:
        params = jax.tree.map(jnp.asarray, state.params)
        stats = jax.tree.map(jnp.asarray, state.stats)
    return Detector(nnx.merge(graphdef, params, stats), detector.table, detector.names)


def _split(model):
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ConfigError("model has state that is neither a parameter nor a BatchNorm statistic")
    return graphdef, params, stats


