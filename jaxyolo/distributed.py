"""Many processes, one run: JAX's multi-controller runtime (`jax.distributed`).

The same command is started once per host (TPU VMs, SLURM, or by hand with `--coordinator
HOST:PORT --num-processes N --process-id I`); every process runs the whole program, and the
jitted steps span the devices of all of them. This module holds what differs from one process:

* `initialize`: joins the runtime when asked, or when the environment says the job has several
  processes (`JAX_COORDINATOR_ADDRESS`, SLURM with more than one task, Open MPI with more than one
  rank, a TPU slice with more than one worker); otherwise it does nothing;
* `is_primary`: the process that writes results, plots, logs, reports and exports (process 0);
* `local_rows`: the rows of a global batch this process must supply for a sharding, and
  `global_array` / `global_batch`: the global arrays built from them; `place`: a value every
  process holds, placed over the whole mesh;
* `to_host`: a global array's value in every process (an all-gather: every process must call it).

With one process each of these is the plain single-process call, so nothing changes there.
"""

from __future__ import annotations

import itertools
import logging
import os

import jax
import numpy as np

from jaxyolo.errors import ConfigError

log = logging.getLogger("jaxyolo.distributed")

HEARTBEAT_S = 10  # a process silent this long is dead: the others stop (JAX aborts them) instead of waiting
SHUTDOWN_S = 120  # how long a process that has finished waits for the others to finish too
INIT_S = 120  # how long a process waits for the others to join
BARRIER_S = 3600  # how long a process waits at a barrier for the others (compilation included)
_COMPILED: dict = {}  # `compiled` programs by function and argument signature
_BARRIERS = itertools.count()  # every process calls the barriers in the same order: the same keys


def environment_processes() -> int:
    """How many processes the environment says the job has (1: nothing says more)."""
    if os.environ.get("JAX_COORDINATOR_ADDRESS"):
        return int(os.environ.get("JAX_NUM_PROCESSES", "2") or 2)
    for var in ("SLURM_STEP_NUM_TASKS", "SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE"):
        if os.environ.get(var, "").isdigit() and int(os.environ[var]) > 1:
            return int(os.environ[var])
    hosts = [h for h in os.environ.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]
    return max(len(hosts), 1)


def initialize(coordinator: str | None = None, num_processes: int | None = None, process_id: int | None = None,
               *, heartbeat_s: int = HEARTBEAT_S) -> bool:
    """Join the multi-process runtime; True when this process is one of several.

    With no argument it joins only when `environment_processes()` finds more than one, and JAX
    reads the rest from the environment. Call it before anything starts a JAX backend.
    """
    if jax.distributed.is_initialized():
        return jax.process_count() > 1
    asked = coordinator is not None or num_processes is not None or process_id is not None
    if not asked and environment_processes() <= 1:
        return False
    if asked and (coordinator is None or num_processes is None or process_id is None):
        raise ConfigError("--coordinator, --num-processes and --process-id go together (or none of them, where "
                          "the environment describes the job: SLURM, Open MPI, a TPU slice)")
    if asked and not 0 <= process_id < num_processes:
        raise ConfigError(f"--process-id {process_id}: expected 0 .. {num_processes - 1}")
    from jaxyolo import xla_cpu

    if xla_cpu.backend_started():
        raise ConfigError("the multi-process runtime must start before anything uses JAX in this process")
    xla_cpu.withdraw()
    # CPU devices reach each other through gloo (without it a computation over several processes fails)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator, num_processes, process_id, initialization_timeout=INIT_S,
                               heartbeat_timeout_seconds=heartbeat_s, shutdown_timeout_seconds=SHUTDOWN_S)
    # Orbax's barriers between processes through the runtime's key-value store, not device
    # collectives: a checkpoint written from a background thread would otherwise interleave its
    # collectives with the training step's in a different order on each process, and hang
    import orbax.checkpoint  # noqa: F401  (defines the flag)
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    flags.FLAGS.experimental_orbax_use_distributed_barrier = True
    jax.devices()  # the first device use waits for every process: here, not inside the first step
    log.info("process %d of %d, %d of %d devices here", jax.process_index(), jax.process_count(),
             jax.local_device_count(), jax.device_count())
    return jax.process_count() > 1


def is_primary() -> bool:
    """Whether this process writes what a run leaves (results, plots, logs, reports, exports)."""
    return not jax.distributed.is_initialized() or jax.process_index() == 0


def multi_process() -> bool:
    """Whether this process is one of several (never starts a JAX backend to find out)."""
    return jax.distributed.is_initialized() and jax.process_count() > 1


def local_rows(sharding, n: int) -> slice:
    """The rows [start, stop) of an n-row global array (sharded on its first axis by `sharding`)
    that this process's devices hold."""
    idx = sharding.addressable_devices_indices_map((n,)).values()
    start = min(i[0].start or 0 for i in idx)
    stop = max(n if i[0].stop is None else i[0].stop for i in idx)
    return slice(start, stop)


def global_array(local: np.ndarray, sharding, n: int):
    """The n-row global array whose rows `local_rows(sharding, n)` are `local` (this process's)."""
    if not multi_process():
        return jax.device_put(local, sharding)
    return jax.make_array_from_process_local_data(sharding, np.asarray(local), (n, *np.shape(local)[1:]))


def global_batch(batch: dict, sharding, n: int) -> dict:
    return {k: global_array(v, sharding, n) for k, v in batch.items()}


def place(tree, sharding):
    """`tree` (the same value in every process) placed with `sharding` over the whole mesh."""
    if not multi_process():
        return jax.device_put(tree, sharding)

    def put(x):
        if jax.dtypes.issubdtype(getattr(x, "dtype", None), jax.dtypes.prng_key):
            return jax.random.wrap_key_data(put(jax.random.key_data(x)), impl=jax.random.key_impl(x))
        x = np.asarray(x)
        return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

    return jax.tree.map(put, tree)


def place_keys(keys, sharding):
    """Random keys made in this process (the same in every process), placed for a step."""
    return place(keys, sharding) if multi_process() else keys


def gather_rows(tree):
    """This process's rows of a batch (NumPy), joined with every other process's in process order:
    the whole batch, where each process holds a contiguous part of it in that order."""
    if not multi_process():
        return tree
    from jax.experimental import multihost_utils

    barrier("gather_rows")
    return jax.tree.map(lambda x: np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True)), tree)


def barrier(name: str) -> None:
    """Wait until every process gets here (nothing with one process). A barrier of the runtime's
    key-value store, not a device collective: gloo gives the processes 30 s to meet in a new
    collective, and a process may lag more than that behind another (compiling on a busy host);
    this one waits `BARRIER_S`, and a process that dies is caught by the heartbeats meanwhile."""
    if multi_process():
        from orbax.checkpoint import multihost

        multihost.get_barrier_sync_fn()(key=f"jaxyolo-{next(_BARRIERS)}-{name}", timeout_ms=BARRIER_S * 1000)


def compiled(fn, *args):
    """`fn` (a jitted function) compiled for `args` in every process, then a barrier: a program
    whose collectives span processes starts in step everywhere (see `barrier`). With one
    process, `fn` itself."""
    if not multi_process():
        return fn
    leaves, treedef = jax.tree.flatten(args)
    key = (fn, treedef, tuple((np.shape(x), str(getattr(x, "dtype", type(x))), getattr(x, "sharding", None))
                              for x in leaves))
    if key not in _COMPILED:  # compiled once per signature (every epoch's validation reuses it)
        _COMPILED[key] = fn.lower(*args).compile()
        barrier("compiled")
    return _COMPILED[key]


def to_host(tree, row: int | None = None):
    """The value of every leaf as NumPy, in every process; `row`: only that row of every leaf
    (e.g. one member of a population). With several processes every process must call it, in the
    same order: the leaves that span processes are gathered by one compiled program (`compiled`:
    the processes meet before it runs), not one eager gather per leaf, whose many small
    collectives could start in different orders in different processes and hang under load."""
    if not multi_process():
        return jax.device_get(tree if row is None else jax.tree.map(lambda x: x[row], tree))
    leaves, treedef = jax.tree.flatten(tree)
    spans = [i for i, x in enumerate(leaves) if isinstance(x, jax.Array) and not x.is_fully_addressable]
    by_mesh: dict = {}
    for i in spans:
        mesh = getattr(leaves[i].sharding, "mesh", None)
        if mesh is None:
            raise ConfigError(f"to_host: an array sharded by {leaves[i].sharding} (not on a mesh) spans processes")
        by_mesh.setdefault(mesh, []).append(i)
    for mesh, idx in by_mesh.items():
        args = (np.int32(row or 0), *[leaves[i] for i in idx])
        for i, x in zip(idx, compiled(_replicator(mesh, len(idx), row is not None), *args)(*args)):
            leaves[i] = x
    out = [np.asarray(x.addressable_data(0)) if isinstance(x, jax.Array) else np.asarray(x) for x in leaves]
    if row is not None:
        out = [x if i in spans else x[row] for i, x in enumerate(out)]
    return treedef.unflatten(out)


_REPLICATORS: dict = {}


def _replicator(mesh, n: int, take_row: bool):
    """A jitted function (row, *arrays) -> the arrays (or that row of each), replicated on `mesh`."""
    key = (mesh, n, take_row)
    if key not in _REPLICATORS:
        from jax.sharding import NamedSharding, PartitionSpec

        rep = NamedSharding(mesh, PartitionSpec())
        _REPLICATORS[key] = jax.jit(lambda i, *xs: tuple(jax.lax.dynamic_index_in_dim(x, i, 0, keepdims=False)
                                                         if take_row else x for x in xs),
                                    out_shardings=tuple(rep for _ in range(n)))
    return _REPLICATORS[key]


def check_mesh_covers_processes(mesh) -> None:
    """A mesh must give every process some devices (a process without any could not take part)."""
    if not multi_process():
        return
    owners = {d.process_index for d in np.asarray(mesh.devices).ravel()}
    if len(owners) != jax.process_count():
        raise ConfigError(f"mesh {dict(mesh.shape)}: uses the devices of {len(owners)} of {jax.process_count()} "
                          "processes; choose a population and batch size the device count divides")
