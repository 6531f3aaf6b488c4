"""One pure training step that a population shares, and the mesh that runs it.

`make_train_step(detector, config)` returns `train_step(state, batch, hyp, key) -> (state, metrics)`:
a pure function of pytrees, so

* `jax.vmap(train_step, in_axes=(0, None, 0, 0))` trains a population of P members (state, hyp and
  key carry a leading axis P; the host batch is shared and each member augments it its own way);
* `population_step(train_step, mesh)` jits that vmapped step over a `Mesh` with axes ('pop', 'data'):
  members are sharded over 'pop', the batch over 'data'. Under `jit` the program keeps global
  semantics, so BatchNorm statistics are those of the whole batch (synchronised BN) and the result
  does not depend on the number of devices. A step with shared arguments between the state and the
  batch (the distillation step's teacher, `jaxyolo.distill`) gets them replicated, not vmapped.

`StepCore` is what every step shares: inputs (on-device augmentation), the detection loss, and
`update` (schedule, SGD, accumulation, EMA, non-finite skip) from a loss and its gradients; the
train step here and the distillation step are thin functions around it.

The optimiser, schedule and EMA are the reference's (docs/reference.md §9), written as array arithmetic on the
step counter so that every hyper-parameter can differ between members:

* SGD with Nesterov momentum, three parameter groups: BN weights and implicit vectors (no weight
  decay), conv weights (weight decay ×= batch·accumulate/64), biases (no weight decay);
* warm-up over max(round(warmup_epochs·nb), min_warmup_iters) iterations: bias lr from
  warmup_bias_lr down, other lrs from 0 up to lr0·lf(epoch), momentum from warmup_momentum up,
  accumulation from 1 up to nominal_batch / batch;
* lf(e) = cosine (or linear) from 1 to lrf, per epoch;
* an optimiser step when `step - last_opt_step >= accumulate` (gradients summed in between);
* (not the reference's) the summed gradients scaled to a global norm of at most
  `clip_grad`·images/64 before the step, where images = batch × iterations summed (with the nominal
  batch of 64: `clip_grad`, as ultralytics clips; 0: off, the reference recipes' value);
* EMA of parameters and BN statistics with decay 0.9999·(1 − exp(−updates/ema_tau)) (the
  reference's tau is 2000 optimiser steps, so a run of a few hundred steps ends with a decay
  near 0.2: its EMA is hardly an average; the hyp key `ema_tau` sets it per member).

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

from jaxyolo.augment import to_unit
from jaxyolo.errors import ConfigError
from jaxyolo.hyp import GAIN_RULES
from jaxyolo.models import layers as L

SCHEDULES = ("cosine", "linear")
CLIP_IMAGES = 64  # `clip_grad` limits the gradient norm of an optimiser step per this many summed images
GROUP_NO_DECAY, GROUP_DECAY, GROUP_BIAS = 0, 1, 2


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Static settings: anything that changes shapes or the compiled program (hashable)."""

    epochs: int
    batches_per_epoch: int
    batch_size: int  # images per iteration, over all devices
    img_size: int
    nominal_batch: int = 64
    min_warmup_iters: int = 100  # floor on warm-up iterations (the reference's: 1000)
    schedule: str = "cosine"
    gain_rule: str = "per-class"  # how loss gains follow classes and image size (`jaxyolo.hyp.loss_gains`)
    augment: bool = True  # on-device augmentation (jaxyolo.augment) from the host's mosaic/single images

    def __post_init__(self):
        for name in ("epochs", "batches_per_epoch", "batch_size", "img_size", "nominal_batch"):
            v = getattr(self, name)
            if not isinstance(v, (int, np.integer)) or v < 1:
                raise ConfigError(f"{name}: expected a positive integer, got {v!r}")
        if self.schedule not in SCHEDULES:
            raise ConfigError(f"schedule: must be one of {SCHEDULES}, got {self.schedule!r}")
        if self.gain_rule not in GAIN_RULES:
            raise ConfigError(f"gain_rule: must be one of {GAIN_RULES}, got {self.gain_rule!r}")

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
    momentum: Any  # SGD buffers, like params
    grads: Any  # gradients summed since the last optimiser step, like params
    last_opt_step: jax.Array
    ema_params: Any  # like params
    ema_stats: Any  # like stats
    ema_updates: jax.Array
    nonfinite_run: jax.Array  # non-finite iterations in a row
    nonfinite_total: jax.Array
    # extra parameters trained beside the model but not part of it (distillation adapters):
    # None, or {"params": pytree, "momentum": like params, "grads": like params} (see `aux_groups`)
    aux: Any = None
    # the run's length as arrays (`with_run`), or None: the step reads the TrainConfig's constants
    run: Any = None
    # what training methods keep beside the optimiser (masks, mask scores, counters): any pytree of
    # arrays, or None; `StepHooks` read and update it, checkpoints save and restore it
    extras: Any = None


@dataclasses.dataclass(frozen=True)
class StepHooks:
    """What a training method (pruning, sparsity, frozen layers) installs in the step. Each hook is
    a pure function traced into the vmapped, jitted step, so every member of a population applies
    it to its own state; a hook left None costs nothing.

    * `grads(grads, params, extras, hyp) -> grads`: this iteration's parameter gradients, before
      they are summed (e.g. no gradient for pruned weights);
    * `params(new, old, extras, hyp) -> params`: the parameters after an optimiser step, given
      those before it (e.g. multiply by masks, project to 2:4 sparsity, keep a frozen layer's `old`);
    * `extras(extras, state, hyp) -> extras`: the extras after each iteration, from the new state;
    * `init(state) -> state`: one member's starting state (fresh, or rewound to a snapshot; not a
      resumed one), e.g. set the extras and apply masks to the weights.
    """

    grads: Callable | None = None
    params: Callable | None = None
    extras: Callable | None = None
    init: Callable | None = None


def compose_hooks(*hooks: StepHooks | None) -> StepHooks | None:
    """One StepHooks applying each of `hooks` in turn (None ones skipped; none left: None)."""
    hs = [h for h in hooks if h is not None]
    if len(hs) <= 1:
        return hs[0] if hs else None

    def chain(name, call):
        fs = [getattr(h, name) for h in hs if getattr(h, name) is not None]
        if not fs:
            return None

        def run(x, *rest):
            for f in fs:
                x = call(f, x, *rest)
            return x
        return run

    return StepHooks(grads=chain("grads", lambda f, g, p, e, h: f(g, p, e, h)),
                     params=chain("params", lambda f, new, old, e, h: f(new, old, e, h)),
                     extras=chain("extras", lambda f, e, s, h: f(e, s, h)),
                     init=chain("init", lambda f, s: f(s)))


def init_state(detector, aux_params=None) -> TrainState:
    """The state of one member, from a detector's current weights (EMA starts as a copy).
    `aux_params`: extra trainable parameters (a pytree of arrays) that the step updates with the
    same optimiser but that are no part of the detector (e.g. distillation adapters)."""
    detector.require_weights("train")
    _, params, stats = split_model(detector.model)
    copy = lambda tree: jax.tree.map(lambda x: jnp.array(x, jnp.float32), tree)
    i32 = lambda v: jnp.asarray(v, jnp.int32)
    aux = None
    if aux_params is not None:
        aux_params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), aux_params)
        aux = {"params": aux_params, "momentum": _zeros_f32(aux_params), "grads": _zeros_f32(aux_params)}
    return TrainState(step=i32(0), params=params, stats=stats, momentum=_zeros_f32(params), grads=_zeros_f32(params),
                      last_opt_step=i32(-1), ema_params=copy(params), ema_stats=copy(stats), ema_updates=i32(0),
                      nonfinite_run=i32(0), nonfinite_total=i32(0), aux=aux)


RUN_KEYS = ("epochs", "batches_per_epoch", "min_warmup_iters")


def with_run(state: TrainState, config: TrainConfig) -> TrainState:
    """`state` carrying `config`'s run length (epochs, batches per epoch, warm-up floor) as int32
    arrays, which the step's schedule then reads instead of constants: one compiled step serves
    runs of any length on the same shapes (a search's trials and the full runs after it; with the
    persistent compilation cache, across processes too)."""
    return state.replace(run={k: jnp.asarray(getattr(config, k), jnp.int32) for k in RUN_KEYS})


def _zeros_f32(tree):
    """Float32 zeros shaped like each leaf of `tree` (optimiser buffers, summed gradients)."""
    return jax.tree.map(lambda x: jnp.zeros(jnp.shape(x), jnp.float32), tree)


def aux_groups(aux_params) -> Any:
    """The optimiser groups of extra trainable parameters: leaves named `bias` in the bias group
    (no weight decay), all others in the decay group (like conv weights)."""

    def group(path, _):
        last = path[-1]
        name = getattr(last, "key", getattr(last, "name", None))
        return GROUP_BIAS if name == "bias" else GROUP_DECAY

    return jax.tree_util.tree_map_with_path(group, aux_params)


def replicate(tree, population: int):
    """Give every leaf a leading population axis of size P (all members equal)."""
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (population,) + jnp.shape(x)), tree)


def member(tree, i: int):
    """Member i of a population pytree."""
    return jax.tree.map(lambda x: x[i], tree)


def param_groups(detector) -> Any:
    """A pytree like the params of Python ints: the reference's optimiser group of each leaf."""
    _, params, _ = split_model(detector.model)
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


def schedule(step, hyp, config: TrainConfig, run=None):
    """(lr of the bias group, lr of the other groups, momentum, accumulate) at iteration `step`.
    `run`: the run length as arrays (`with_run`); None takes `config`'s."""
    run = run or {k: getattr(config, k) for k in RUN_KEYS}
    nb = run["batches_per_epoch"]
    lf = lr_factor(step // nb, hyp["lrf"], run["epochs"], config.schedule)
    base = hyp["lr0"] * lf
    nw = jnp.maximum(jnp.round(hyp["warmup_epochs"] * nb), run["min_warmup_iters"])
    frac = jnp.clip(step / nw, 0.0, 1.0)
    warm = step <= nw
    lr_bias = jnp.where(warm, hyp["warmup_bias_lr"] + frac * (base - hyp["warmup_bias_lr"]), base)
    lr_other = jnp.where(warm, frac * base, base)
    momentum = jnp.where(warm, hyp["warmup_momentum"] + frac * (hyp["momentum"] - hyp["warmup_momentum"]),
                         hyp["momentum"])
    ramp = jnp.maximum(1.0, jnp.round(1.0 + frac * (config.nominal_batch / config.batch_size - 1.0)))
    accumulate = jnp.where(warm, ramp, float(config.accumulate))
    return lr_bias, lr_other, momentum, accumulate


def yolo_sgd(groups) -> optax.GradientTransformationExtraArgs:
    """The reference's grouped SGD as an optax transformation on trees shaped like `groups` (a
    tree of `GROUP_*` ints, see `param_groups`) whose rates arrive per call (arrays), so they follow
    a traced schedule and differ between members.

    update(grads, buffers, params, lr_bias=, lr_other=, momentum=, weight_decay=) follows
    torch.optim.SGD(nesterov=True, dampening=0): g += wd·p (decay group only); buf = μ·buf + g;
    step = −lr·(g + μ·buf).

    It works leaf by leaf: XLA fuses each leaf's update into one loop, while one flat vector of all
    parameters needs a concatenation per step and per-element group rates (measured 3× slower on the
    CPU for yolov4s).
    """

    def init(params):
        return _zeros_f32(params)

    def update(grads, buffers, params, *, lr_bias, lr_other, momentum, weight_decay):
        def leaf(group, g, buf, p):
            if group == GROUP_DECAY:
                g = g + weight_decay * p
            buf = momentum * buf + g
            lr = lr_bias if group == GROUP_BIAS else lr_other
            return -lr * (g + momentum * buf), buf

        out = jax.tree.map(leaf, groups, grads, buffers, params)
        is_pair = lambda x: isinstance(x, tuple)
        return (jax.tree.map(lambda o: o[0], out, is_leaf=is_pair),
                jax.tree.map(lambda o: o[1], out, is_leaf=is_pair))

    return optax.GradientTransformationExtraArgs(init, update)


def clip_scale(norm, max_norm):
    """The factor that brings gradients of global norm `norm` down to `max_norm` (torch's
    clip_grad_norm_: max_norm / (norm + 1e-6), at most 1); 1 when `max_norm` is 0 (no clipping)."""
    factor = jnp.minimum(1.0, max_norm / (norm + 1e-6))
    return jnp.where(max_norm > 0, factor, 1.0)


def ema_decay(updates, tau=2000.0):
    """The EMA's decay after `updates` optimiser steps: 0.9999·(1 − exp(−updates/tau)); the
    reference's tau is 2000, the hyp key `ema_tau`."""
    return 0.9999 * (1 - jnp.exp(-updates / tau))


class StepCore:
    """What every training step shares (the train step here, the distillation step in
    `jaxyolo.distill`): the batch's images and targets, the detection loss, and everything after the
    gradients (schedule, grouped SGD, accumulation, EMA, non-finite skip) in `update`.

    A step computes its loss and gradients its own way, then hands them to `update`, so train_step
    and distill_step run one implementation of the optimiser.
    """

    def __init__(self, detector, config: TrainConfig, augment_fn: Callable | None = None,
                 hooks: StepHooks | None = None):
        self.graphdef = split_model(detector.model)[0]
        self.hooks = hooks or StepHooks()
        self.spec = detector.spec
        self.family = detector.family
        self.config = config
        self.opt = yolo_sgd(param_groups(detector))
        if config.augment and augment_fn is None:
            from jaxyolo.augment import augment_host_batch as augment_fn
        self.augment_fn = augment_fn
        self.wd_scale = config.batch_size * config.accumulate / config.nominal_batch

    def inputs(self, batch, hyp, key):
        """(images float32 in [0, 1], boxes, classes, mask) of this member: augmented on device with
        `config.augment`, else the batch's own."""
        if self.config.augment:
            return self.augment_fn(key, hyp, batch, out_size=self.config.img_size)
        return batch_images(batch), batch["boxes"], batch["classes"], batch["mask"]

    def detection_loss(self, raw, boxes, classes, mask, hyp):
        """The family's loss (YOLOv4: `jaxyolo.loss.yolo_loss` with the gains of `config.gain_rule`)."""
        return self.family.loss(raw, boxes, classes, mask, hyp, spec=self.spec, img_size=self.config.img_size,
                                gain_rule=self.config.gain_rule)

    def update(self, state: TrainState, total, grads, new_stats, hyp, aux_grads=None):
        """One iteration's bookkeeping from the loss `total` and the gradients of the params (a tree
        like `state.params`) and, if `state.aux` holds extra trainable parameters, of those
        (`aux_grads`, like `state.aux['params']`; same schedule, groups by `aux_groups`, no EMA).

        Returns (new state, metrics: lr, lr_bias, momentum, finite, clip_scale, grad_norm (of the summed
        gradients, before clipping), optimizer_step, nonfinite_run).
        """
        config, hooks = self.config, self.hooks
        leaves_finite = lambda tree: [jnp.all(jnp.isfinite(g)) for g in jax.tree.leaves(tree)]
        finite = jnp.stack([jnp.isfinite(total)] + leaves_finite(grads) + leaves_finite(aux_grads)).all()
        if hooks.grads is not None:
            grads = hooks.grads(grads, state.params, state.extras, hyp)

        ni = state.step
        lr_bias, lr_other, momentum, accumulate = schedule(ni, hyp, config, state.run)
        do_opt = finite & ((ni - state.last_opt_step) >= accumulate)
        rates = dict(lr_bias=lr_bias, lr_other=lr_other, momentum=momentum,
                     weight_decay=hyp["weight_decay"] * self.wd_scale)
        where = lambda c, a, b: jax.tree.map(lambda x, y: jnp.where(c, x, y), a, b)

        summed = lambda acc_grads, new_grads: where(finite, jax.tree.map(jnp.add, acc_grads, new_grads), acc_grads)
        acc = summed(state.grads, grads)
        aux_acc = summed(state.aux["grads"], aux_grads) if aux_grads is not None else None
        # one norm over everything the optimiser steps (model and extra parameters), as
        # torch.nn.utils.clip_grad_norm_ over all parameters does
        grad_norm = optax.tree.norm((acc, aux_acc))
        # the limit is per 64 summed images: the loss is summed over the batch and the gradients over
        # the accumulated iterations, so their norm grows with the images in the step
        images = (ni - state.last_opt_step).astype(jnp.float32) * config.batch_size
        scale = clip_scale(grad_norm, hyp["clip_grad"] * images / CLIP_IMAGES)

        def sgd(opt, params, acc, buffers, hook=None):
            """(params, momentum, summed grads) after this iteration: stepped if `do_opt`, else kept."""
            clipped = jax.tree.map(lambda a: a * scale, acc)
            updates, new_buffers = opt.update(clipped, buffers, params, **rates)
            stepped = jax.tree.map(lambda p, u: (p + u).astype(p.dtype), params, updates)
            if hook is not None:
                stepped = hook(stepped, params, state.extras, hyp)
            return (where(do_opt, stepped, params), where(do_opt, new_buffers, buffers),
                    jax.tree.map(lambda a: jnp.where(do_opt, 0.0, a), acc))

        params, buffers, acc = sgd(self.opt, state.params, acc, state.momentum, hooks.params)
        stats = where(finite, new_stats, state.stats)
        ema_updates = state.ema_updates + do_opt.astype(jnp.int32)
        d = ema_decay(ema_updates.astype(jnp.float32), hyp["ema_tau"])
        blend = lambda e, m: where(do_opt, jax.tree.map(lambda a, b: d * a + (1 - d) * b, e, m), e)
        aux = state.aux
        if aux_grads is not None:
            a_params, a_buffers, a_acc = sgd(yolo_sgd(aux_groups(aux["params"])), aux["params"], aux_acc,
                                             aux["momentum"])
            aux = {"params": a_params, "momentum": a_buffers, "grads": a_acc}
        new = TrainState(
            step=ni + 1, params=params, stats=stats, momentum=buffers, grads=acc,
            last_opt_step=jnp.where(do_opt, ni, state.last_opt_step),
            ema_params=blend(state.ema_params, params),
            ema_stats=blend(state.ema_stats, stats),
            ema_updates=ema_updates,
            nonfinite_run=jnp.where(finite, 0, state.nonfinite_run + 1),
            nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32),
            aux=aux, run=state.run, extras=state.extras,
        )
        if hooks.extras is not None:
            new = new.replace(extras=hooks.extras(state.extras, new, hyp))
        metrics = {"lr": lr_other, "lr_bias": lr_bias, "momentum": momentum, "finite": finite, "clip_scale": scale,
                   "grad_norm": grad_norm, "optimizer_step": do_opt, "nonfinite_run": new.nonfinite_run}
        return new, metrics


def batch_images(batch):
    """A batch's `image` as float32 in [0, 1] (uint8 is divided by 255)."""
    return to_unit(batch["image"])


def make_train_step(detector, config: TrainConfig, *, augment_fn: Callable | None = None,
                    hooks: StepHooks | None = None):
    """The pure step for `detector`'s architecture: (state, batch, hyp, key) -> (state, metrics).

    `batch` (numpy or device arrays): with `config.augment`, the host pipeline's mosaic and single
    versions (see `jaxyolo.data.loader`) which `augment_fn` (default `jaxyolo.augment.augment_host_batch`)
    turns into this member's images and targets; without, `image` (B, S, S, 3) uint8 or float in
    [0, 1] with `boxes`, `classes`, `mask`. `hooks`: a training method's transforms (`StepHooks`).
    """
    core = StepCore(detector, config, augment_fn, hooks)

    def loss_fn(params, stats, images, boxes, classes, mask, hyp, key):
        model = nnx.merge(core.graphdef, params, stats, copy=True)
        raw = model(images, train=True, key=key)
        total, terms = core.detection_loss(raw, boxes, classes, mask, hyp)
        return total, (terms, nnx.state(model, nnx.BatchStat))

    def train_step(state: TrainState, batch, hyp, key):
        k_aug, k_kst = jax.random.split(key)
        images, boxes, classes, mask = core.inputs(batch, hyp, k_aug)
        (total, (terms, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, state.stats, images, boxes, classes, mask, hyp, k_kst)
        new, info = core.update(state, total, grads, new_stats, hyp)
        bsz = images.shape[0]
        metrics = {"loss": total / bsz, "local": terms["local"], "global": terms["global"], **info,
                   "targets": jnp.sum(mask)}
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


def population_step(train_step, mesh: Mesh, *, donate: bool = True, replicated: int | None = None):
    """jit(vmap(train_step)) with the population over 'pop' and the batch over 'data'.

    Call as step(states, batch, hyps, keys): states/hyps/keys with a leading axis P (a multiple of
    the mesh's 'pop' size, see `pad_population`), batch leaves with a leading batch axis (a
    multiple of the 'data' size). A step with more arguments, step(state, *shared, batch, hyp, key)
    (the distillation step: state, teacher_params, batch, hyp, key), takes the arguments between
    the state and the batch as shared by every member: not vmapped (`in_axes=None`) and replicated
    over the mesh. Their count `replicated` defaults to what the step's signature says.

    The 'pop' axis is manual (`shard_map`): each device group runs the vmapped step on its own
    members. Letting the SPMD partitioner split the vmapped convolutions instead (they become
    grouped convolutions with one group per member) fails in XLA when the group count is divided.
    The 'data' axis stays automatic, so BatchNorm keeps whole-batch statistics.
    """
    if replicated is None:
        replicated = _positional_count(train_step) - 4
    if replicated < 0:
        raise ConfigError("population_step: the step must take (state, [shared...], batch, hyp, key)")
    shared = (None,) * replicated
    vstep = jax.vmap(train_step, in_axes=(0, *shared, None, 0, 0))
    local = jax.shard_map(vstep, mesh=mesh, in_specs=(P("pop"), *(P() for _ in shared), P(), P("pop"), P("pop")),
                          out_specs=(P("pop"), P("pop")), axis_names={"pop"}, check_vma=False)
    pop = NamedSharding(mesh, P("pop"))
    data = NamedSharding(mesh, P("data"))
    rep = NamedSharding(mesh, P())
    return jax.jit(local, in_shardings=(pop, *(rep for _ in shared), data, pop, pop), out_shardings=(pop, pop),
                   donate_argnums=(0,) if donate else ())


def flat_state_step(train_step, treedef):
    """`train_step` with its state as the flat list of leaves of `treedef` (in and out); give
    `population_step` its `replicated` count (the wrapper's signature no longer tells it).
    Dispatching a jitted call flattens and rebuilds its pytrees in Python: for the TrainState of
    nested `nnx.State`s (about 1,200 leaves for yolov4p) that cost 15-20 ms a step on the CPU, a
    list of arrays about a third of it. A loop keeps the
    leaves between steps and rebuilds the state (`jax.tree.unflatten`) only where it reads it."""

    def step(leaves, *rest):
        new, metrics = train_step(jax.tree.unflatten(treedef, leaves), *rest)
        return jax.tree.leaves(new), metrics

    return step


def _positional_count(fn) -> int:
    import inspect

    params = inspect.signature(fn).parameters.values()
    if any(p.kind is p.VAR_POSITIONAL for p in params):
        return 4
    return sum(p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in params)


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

    graphdef = split_model(detector.model)[0]
    if ema:
        params = jax.tree.map(lambda e, p: jnp.asarray(e, p.dtype), state.ema_params, state.params)
        stats = jax.tree.map(lambda e, s: jnp.asarray(e, s.dtype), state.ema_stats, state.stats)
    else:
        params = jax.tree.map(jnp.asarray, state.params)
        stats = jax.tree.map(jnp.asarray, state.stats)
    return detector.with_model(nnx.merge(graphdef, params, stats))


def split_model(model):
    """(graphdef, params, stats) of a detector's module: the two kinds of state a step trains and
    updates. Other variables are refused (a method's own arrays live in `TrainState.extras`)."""
    graphdef, params, stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
    if jax.tree.leaves(rest):
        raise ConfigError("model has state that is neither a parameter nor a BatchNorm statistic")
    return graphdef, params, stats


