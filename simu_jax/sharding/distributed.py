"""Several JAX processes: start-up, which process does what, and host <-> device placement.

Every process runs the same deterministic data iterators (same seeds, same positions), so
each one holds the whole global batch on the host. :func:`place_batch` turns such a host
batch into global arrays laid out by :func:`~simu_jax.sharding.mesh.batch_sharding`
(rows over the batch axes of the mesh): each process hands its own devices only the rows
they hold. With one process it is a ``jax.device_put``.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import numpy as np

from simu_jax.sharding.mesh import DEFAULT_RULES, batch_sharding

__all__ = [
    "initialize_distributed",
    "is_main_process",
    "process_slice",
    "process_index_slice",
    "place_batch",
    "to_host",
    "place_like",
    "any_process",
    "sync_processes",
    "check_same_on_all_processes",
    "SHUTDOWN_TIMEOUT_ENV",
]

# Seconds a finished process waits at JAX's shutdown barrier for the others
# (``jax.distributed.initialize(shutdown_timeout_seconds=...)``, JAX's default 300). The run
# loops end with every process at one barrier (:func:`sync_processes`), so the processes reach
# shutdown together whatever the length of the final phase; this only bounds how long a
# process waits for one that failed. Tests set it small.
SHUTDOWN_TIMEOUT_ENV = "SIMU_SHUTDOWN_TIMEOUT_S"


def _env_int(*names: str) -> int | None:
    for n in names:
        v = os.environ.get(n)
        if v not in (None, ""):
            return int(v)
    return None


def _cluster_detected() -> bool:
    """A multi-process launcher JAX can auto-detect (SLURM, Open MPI, TPU pod slice)."""
    env = os.environ
    if env.get("SLURM_JOB_ID") and (_env_int("SLURM_NTASKS", "SLURM_NPROCS") or 1) > 1:
        return True
    if (_env_int("OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return True
    hosts = env.get("TPU_WORKER_HOSTNAMES", "")
    return "," in hosts


def initialize_distributed(coordinator: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, *, local_device_ids: Sequence[int] | None = None,
                           auto: bool | None = None, shutdown_timeout_s: int | None = None) -> bool:
    """``jax.distributed.initialize`` from arguments, environment, or cluster auto-detection.

    Call it first, before anything touches a device. Arguments default to the environment:
    ``JAX_COORDINATOR_ADDRESS`` (host:port of process 0), ``JAX_NUM_PROCESSES``,
    ``JAX_PROCESS_ID``. With none of them, JAX's own cluster detection is used when a
    multi-process launcher is visible (SLURM with more than one task, Open MPI, a
    multi-host TPU slice) or when ``auto=True`` / ``SIMU_DISTRIBUTED=1``. A single process
    (``num_processes == 1``, or nothing detected) is a no-op. Returns whether JAX now runs
    as several processes (True also when it was already initialized).

    ``shutdown_timeout_s`` (default ``$SIMU_SHUTDOWN_TIMEOUT_S``, else JAX's 300 s): how long a
    process that has finished waits at JAX's shutdown barrier for the others before every
    process aborts (exit 134); ``jax.distributed.initialize``'s ``shutdown_timeout_seconds``
    (jax/_src/distributed.py). The run loops meet at :func:`sync_processes` before they
    return, so a long final phase (save, evaluation) does not run into it.
    """
    if jax.distributed.is_initialized():
        return True
    coordinator = coordinator or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
    if num_processes is None:
        num_processes = _env_int("JAX_NUM_PROCESSES")
    if process_id is None:
        process_id = _env_int("JAX_PROCESS_ID")
    if auto is None:
        auto = os.environ.get("SIMU_DISTRIBUTED", "") in ("1", "true", "auto")
    if num_processes == 1:
        return False
    kwargs = {}
    if local_device_ids is not None:
        kwargs["local_device_ids"] = local_device_ids
    if shutdown_timeout_s is None:
        shutdown_timeout_s = _env_int(SHUTDOWN_TIMEOUT_ENV)
    if shutdown_timeout_s is not None:
        if shutdown_timeout_s < 1:
            raise ValueError(f"shutdown timeout {shutdown_timeout_s} s (shutdown_timeout_s or {SHUTDOWN_TIMEOUT_ENV}): "
                             "the shutdown timeout must be >= 1 second")
        kwargs["shutdown_timeout_seconds"] = int(shutdown_timeout_s)
    if coordinator is not None or num_processes is not None or process_id is not None:
        jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes,
                                   process_id=process_id, **kwargs)
        return True
    if auto or _cluster_detected():
        jax.distributed.initialize(**kwargs)
        return True
    return False


def is_main_process() -> bool:
    """Process 0 writes logs, reports and metrics files (orbax coordinates checkpoints itself)."""
    return jax.process_index() == 0


def process_slice(n_items: int, *, process_index: int | None = None, process_count: int | None = None,
                  drop_remainder: bool = False) -> slice:
    """This process's contiguous share of ``n_items`` (e.g. ``records[process_slice(len(records))]``).

    Shares differ by at most one item (the first ``n % P`` processes get one more); with
    ``drop_remainder`` every process gets ``n // P`` (SPMD steps need equal local batches).
    """
    p = jax.process_index() if process_index is None else process_index
    n_proc = jax.process_count() if process_count is None else process_count
    if not 0 <= p < n_proc:
        raise ValueError(f"process_index {p} out of range for {n_proc} processes")
    base, extra = divmod(n_items, n_proc)
    if drop_remainder:
        return slice(p * base, (p + 1) * base)
    start = p * base + min(p, extra)
    return slice(start, start + base + (1 if p < extra else 0))


def process_index_slice(sharding: jax.sharding.Sharding, global_shape: Sequence[int], axis: int = 0) -> slice:
    """The range of ``axis`` that this process's devices hold of an array of ``global_shape``
    laid out by ``sharding``: the rows a process must supply to
    ``jax.make_array_from_process_local_data`` (``slice(0, n)`` when the axis is replicated).

    Read from the sharding itself (``addressable_devices_indices_map``), so it is right
    whatever order the mesh puts the processes' devices in; in the usual layout (each
    process's devices adjacent along the batch axes) it equals
    ``process_slice(n, drop_remainder=True)``. Raises ``ValueError`` if the process's part is
    not one contiguous range.
    """
    global_shape = tuple(int(d) for d in global_shape)
    n = global_shape[axis]
    blocks = set()
    for index in sharding.addressable_devices_indices_map(global_shape).values():
        s = index[axis] if index is not None and axis < len(index) else slice(None)
        start, stop, _ = s.indices(n)
        blocks.add((start, stop))
    if not blocks:
        raise ValueError("this process holds no device of the sharding")
    blocks = sorted(blocks)
    start, stop = blocks[0]
    for a, b in blocks[1:]:
        if a > stop:
            raise ValueError(f"this process's part of axis {axis} is not contiguous: {blocks}")
        stop = max(stop, b)
    return slice(start, stop)


def _is_global(x) -> bool:
    """A ``jax.Array`` spanning devices of other processes (built by ``make_array_from_process_local_data``)."""
    return isinstance(x, jax.Array) and not x.is_fully_addressable


def _rows_index(ndim: int, axis: int, rows: slice) -> tuple:
    return tuple(rows if d == axis else slice(None) for d in range(ndim))


def place_batch(host_batch, mesh: jax.sharding.Mesh, *, axis: int = 0,
                rules: Mapping[str, Any] = DEFAULT_RULES):
    """The global batch ``host_batch`` (a dict, or any pytree, of arrays with the rows along
    ``axis``: 0 for ``[B, T]``, 1 for ``[A, B, T]``), placed on ``mesh`` as global arrays.

    Each leaf gets :func:`~simu_jax.sharding.mesh.batch_sharding` (the rows over the batch
    axes, the longest prefix of ``(data, fsdp)`` whose size divides the row count;
    replicated when none does, so any row count works).

    * One process: ``jax.device_put`` of the leaf.
    * Several processes: every process must pass the same whole global batch (the data
      iterators are deterministic and identical on every process). Each one gives its
      devices only their rows: the range of ``axis`` they hold is read from the sharding
      itself (:func:`process_index_slice`) and handed to
      ``jax.make_array_from_process_local_data``; should that range not be contiguous (an
      unusual device order), the whole host array is handed over and JAX picks each
      device's rows from it.
    * A leaf that already is a global array (spanning other processes' devices) is
      resharded to the batch layout if it is not in it already.
    """

    def one(x):
        sharding = batch_sharding(np.shape(x), mesh, axis=axis, rules=rules)
        if _is_global(x) or jax.process_count() == 1:
            return jax.device_put(x, sharding)
        x = np.asarray(x)
        local = x
        if x.ndim > axis:
            try:
                local = x[_rows_index(x.ndim, axis, process_index_slice(sharding, x.shape, axis))]
            except ValueError:  # this process's rows are not one range: JAX slices the whole array
                pass
        return jax.make_array_from_process_local_data(sharding, local, x.shape)

    return jax.tree.map(one, host_batch)


def to_host(tree):
    """numpy copies of the leaves of ``tree`` (arrays sharded over a mesh included). With
    several processes this is an all-gather every process must call (each gets the whole
    arrays: fine for what is written at the end of a run, not for a model larger than a
    host's memory)."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        return jax.tree.map(np.asarray, multihost_utils.process_allgather(tree, tiled=True))
    return jax.tree.map(np.asarray, tree)


def place_like(host_tree, like):
    """Host arrays back onto the devices and shardings of ``like`` (same tree): each process
    places only the shards its devices hold (``jax.make_array_from_callback``), so it works
    with several processes as long as every process has the same host arrays."""

    def one(h, ref):
        sharding = getattr(ref, "sharding", None)
        if sharding is None:
            return h
        h = np.asarray(h)
        return jax.make_array_from_callback(h.shape, sharding, lambda index: h[index])

    return jax.tree.map(one, host_tree, like)


def any_process(flag: bool) -> bool:
    """True if ``flag`` is true on any process (an all-gather of one int with several
    processes; every process must call it). Used to agree on stopping after a signal, which
    may reach the processes at different steps."""
    if jax.process_count() == 1:
        return bool(flag)
    from jax.experimental import multihost_utils

    return bool(np.asarray(multihost_utils.process_allgather(np.int32(bool(flag)))).any())



def sync_processes(name: str) -> None:
    """A barrier of all processes (``multihost_utils.sync_global_devices``; a no-op with one
    process). Every process must call it with the same ``name``."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def check_same_on_all_processes(digest: str, what: str) -> None:
    """Raise ``ValueError`` (one line) unless every process passes the same ``digest`` (a hex
    or other ASCII string, e.g. a sha256 of what each process computed). A no-op with one
    process; with several, an all-gather every process must call. Each process's value is
    checked against all the others', so all of them raise together: none is left waiting in
    a later collective."""
    if jax.process_count() == 1:
        return
    from jax.experimental import multihost_utils

    data = np.frombuffer(digest.encode("ascii"), np.uint8)
    lengths = np.asarray(multihost_utils.process_allgather(np.int32(data.size))).reshape(-1)
    width = int(lengths.max())
    padded = np.zeros(width, np.uint8)
    padded[: data.size] = data
    rows = np.asarray(multihost_utils.process_allgather(padded)).reshape(len(lengths), width)
    values = [bytes(r[:n]).decode("ascii") for r, n in zip(rows, lengths)]
    if len(set(values)) > 1:
        shown = ", ".join(f"process {i}: {v if len(v) <= 40 else v[:40] + '...'}" for i, v in enumerate(values))
        raise ValueError(f"{what} differs between the processes ({shown}); every process must compute the same")
