"""Data parallelism with ``jax.sharding``: one mesh axis, ``"data"``, over every device.

The batch axis (the leading axis of every array in a batch) is split over the
devices; params and optimizer state are replicated. The train step itself is
unchanged: ``jax.jit`` with these shardings makes XLA insert the gradient
all-reduce, and the hand-written BPTT (a ``custom_vjp``) runs per shard as it
does on one device.

Multi-host: call ``initialize`` in every process before anything else touches
JAX devices; each process then feeds its own slice of the global batch
(``shard_batch`` with ``process_local=True``), and every process sees the
same replicated params after each step.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

__all__ = ["initialize", "make_mesh", "replicate", "shard_batch", "data_parallel", "describe", "to_host"]

AXIS = "data"


def initialize(coordinator_address: str, num_processes: int, process_id: int) -> None:
    """Join a multi-process run through ``jax.distributed`` (CPU collectives over gloo).

    Args:
      coordinator_address: ``host:port`` of process 0's coordinator.
      num_processes: how many processes take part.
      process_id: this process's rank, 0 <= process_id < num_processes.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm import parallel
      >>> parallel.initialize("127.0.0.1:23456", num_processes=2, process_id=0)  # doctest: +SKIP
    """
    if not 0 <= process_id < num_processes:
        raise ValueError(f"process_id must be in [0, {num_processes}), got {process_id}")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # only read by the CPU backend
    jax.distributed.initialize(
        coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )


def make_mesh(devices: Sequence[jax.Device] | int | None = None) -> Mesh:
    """A 1-D mesh with axis ``"data"`` over ``devices`` (all of them by default, or the first n).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm import parallel
      >>> mesh = parallel.make_mesh()                               # every device
      >>> mesh.axis_names
      ('data',)
    """
    all_devices = jax.devices()
    if devices is None:
        devices = all_devices
    elif isinstance(devices, int):
        if not 1 <= devices <= len(all_devices):
            raise ValueError(f"devices must be between 1 and {len(all_devices)} (jax.devices()), got {devices}")
        devices = all_devices[:devices]
    return Mesh(np.asarray(devices), (AXIS,))


def mesh_for(devices: int | None, batch_size: int) -> Mesh | None:
    """The mesh a run of ``batch_size`` on ``devices`` trains over, or None for one device (one process, no
    ``devices``); ValueError if ``devices`` or the batch does not fit."""
    if devices is None and jax.process_count() == 1:
        return None
    mesh = make_mesh(devices)
    n = mesh.devices.size
    if batch_size % n:
        raise ValueError(
            f"batch_size {batch_size} does not divide over {n} devices; use a batch size that is a multiple of {n}"
        )
    return mesh


def replicate(mesh: Mesh, tree):
    """Place every leaf of ``tree`` on all devices of ``mesh`` (params, optimizer state, keys).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm import parallel
      >>> mesh = parallel.make_mesh()
      >>> params = parallel.replicate(mesh, {"w": jnp.ones((3, 4))})  # a full copy on every device
    """
    sharding = NamedSharding(mesh, PartitionSpec())
    if jax.process_count() == 1:
        return jax.tree.map(lambda a: jax.device_put(a, sharding, may_alias=False), tree)
    # every process holds the full value: assemble one global, replicated array from them
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a), np.shape(a)), tree)


def _batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec(AXIS, *([None] * (ndim - 1))))


def shard_batch(mesh: Mesh, batch, *, process_local: bool = False):
    """Split the leading (batch) axis of every array in ``batch`` over the mesh.

    Args:
      mesh: from ``make_mesh``.
      batch: a pytree of arrays whose leading axis is the batch.
      process_local: each process passes only its own rows (multi-host); the
        global batch is their concatenation in process order.

    Raises:
      ValueError: if the (global) batch does not divide evenly over the devices;
        rows are never dropped silently.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm import parallel
      >>> mesh = parallel.make_mesh()
      >>> batch = parallel.shard_batch(mesh, {"x": jnp.ones((2 * mesh.size, 5))})   # rows split over "data"
      >>> batch["x"].shape                                          # the global shape
      (2, 5)
    """
    n_dev = mesh.devices.size
    n_proc = jax.process_count() if process_local else 1

    def put(a):
        a = np.asarray(a) if not isinstance(a, jax.Array) else a
        rows = a.shape[0] * n_proc
        if rows % n_dev:
            raise ValueError(
                f"batch size {rows} (leading axis of an array of shape {tuple(a.shape)}"
                f"{f' times {n_proc} processes' if n_proc > 1 else ''}) does not divide over {n_dev} devices; "
                f"use a batch size that is a multiple of {n_dev}"
            )
        sharding = _batch_sharding(mesh, a.ndim)
        if process_local:
            return jax.make_array_from_process_local_data(sharding, np.asarray(a))
        if jax.process_count() > 1:  # every process holds the whole batch: each takes its own rows
            return jax.make_array_from_callback(a.shape, sharding, lambda index: np.asarray(a[index]))
        return jax.device_put(a, sharding)

    return jax.tree.map(put, batch)


def data_parallel(step: Callable, mesh: Mesh, *, donate: bool = True) -> Callable:
    """Jit ``step(params, opt_state, batch, *rest) -> (params, opt_state, metrics)`` over ``mesh``.

    params, opt_state and every extra argument are replicated, ``batch`` is split
    along its leading axis, and the outputs come back replicated. With
    ``donate`` the old params and optimizer state buffers are reused.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm import parallel
      >>> def step(params, opt_state, batch):                       # a pure train step
      ...     return params, opt_state, {"loss": jnp.mean((batch["x"] @ params["w"]) ** 2)}
      >>> mesh = parallel.make_mesh()
      >>> run = parallel.data_parallel(step, mesh)
      >>> params, opt_state, metrics = run({"w": jnp.ones((5, 1))}, (), {"x": jnp.ones((4, 5))})
      >>> float(metrics["loss"])
      25.0
    """
    rep = NamedSharding(mesh, PartitionSpec())

    def batch_shardings(batch):
        return jax.tree.map(lambda a: _batch_sharding(mesh, np.ndim(a)), batch)

    compiled: dict = {}

    def run(params, opt_state, batch, *rest):
        key = jax.tree.structure((batch, rest)), tuple(np.ndim(a) for a in jax.tree.leaves(batch))
        if key not in compiled:
            compiled[key] = jax.jit(
                step,
                in_shardings=(rep, rep, batch_shardings(batch), *([rep] * len(rest))),
                out_shardings=rep,
                donate_argnums=(0, 1) if donate else (),
            )
        return compiled[key](params, opt_state, batch, *rest)

    return run


def to_host(tree):
    """NumPy copies of the leaves of a replicated tree, readable in every process (for saving, evaluation).

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm import parallel
      >>> host = parallel.to_host({"w": jnp.ones(3)})             # NumPy arrays, for a checkpoint
      >>> type(host["w"]).__name__
      'ndarray'
    """
    return jax.tree.map(lambda a: np.asarray(a.addressable_data(0)) if isinstance(a, jax.Array) else a, tree)


def describe(mesh: Mesh, global_batch: int) -> str:
    """One line: devices, processes, and per-device / per-process / global batch size.

    Examples:
      >>> import jax, jax.numpy as jnp
      >>> from jax_lstm import parallel
      >>> text = parallel.describe(parallel.make_mesh(), global_batch=32)   # the line a run prints at its start
    """
    n_dev, n_proc = mesh.devices.size, jax.process_count()
    return (
        f"data parallel: {n_dev} device(s) ({mesh.devices.flat[0].platform}) in {n_proc} process(es); "
        f"batch {global_batch} global, {global_batch // max(n_proc, 1)} per process, {global_batch // n_dev} per device"
    )
