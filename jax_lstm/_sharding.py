"""Sharding helpers: the varying axes of ``jax.shard_map`` and placement on a mesh with Explicit axes.

Nothing here is LSTM math. ``lstm``, ``lstm_ref`` and ``lstm_trace`` run the
same way on one device, inside ``shard_map`` and on an Explicit-axis mesh
(``jax.make_mesh``'s default); what differs is only that a loop carry must be
typed like its updates and that a contraction over a sharded batch must be
told where its result lives. Outside ``shard_map`` and off any mesh every
function here is the identity (or returns an empty set / False).
"""

from __future__ import annotations

import jax
from jax.sharding import NamedSharding, PartitionSpec

__all__ = ["varying_axes", "make_varying", "on_explicit_mesh", "onto_mesh_of", "sum_over_extra_axes", "weight_sharding"]


def varying_axes(*arrays) -> frozenset:
    """The manual mesh axes (inside ``jax.shard_map``) over which any of ``arrays`` varies."""
    axes: frozenset = frozenset()
    for a in arrays:
        if a is None:
            continue
        aval = jax.typeof(a)
        vma = getattr(aval, "vma", None)
        if vma is None:
            vma = getattr(getattr(aval, "mat", None), "varying", frozenset())
        axes = axes | frozenset(vma)
    return axes


def make_varying(a, axes: frozenset):
    """``a`` marked as varying over ``axes`` (a no-op outside ``shard_map``).

    A loop carry must have the same type on entry and exit: a carry that starts
    from zeros (unvarying) and is updated with per-shard data (varying) has to
    be declared varying before the loop.
    """
    missing = tuple(sorted(axes - varying_axes(a), key=str))
    return jax.lax.pcast(a, missing, to="varying") if missing else a


def sum_over_extra_axes(grad, primal):
    """Inside ``shard_map``: the gradient of an input that is the same on every shard (a replicated W)
    is the sum over shards of the per-shard gradients (the transpose of broadcasting it)."""
    extra = tuple(sorted(varying_axes(grad) - varying_axes(primal), key=str))
    return jax.lax.psum(grad, extra) if extra else grad


def on_explicit_mesh(a) -> bool:
    """Whether ``a`` is typed as sharded on a mesh with Explicit axes (``jax.make_mesh``'s default)."""
    mesh = getattr(jax.typeof(a).sharding, "mesh", None)
    return mesh is not None and not mesh.empty and jax.sharding.AxisType.Explicit in tuple(mesh.axis_types)


def onto_mesh_of(xs, params, state0):
    """Weights and state placed for ``xs`` sharded on a mesh with Explicit axes (else unchanged).

    With batch-sharded inputs on such a mesh every contraction over the batch
    (a weight's gradient) must know where its result lives, and a loop carry
    must keep one sharding: weights on no mesh are taken as replicated (as a
    data-parallel step has them), and the state is split over the batch as
    ``xs`` is (a zero state made here, or under ``jax.set_mesh``, is replicated).
    """
    if not on_explicit_mesh(xs):
        return params, state0
    sharding = jax.typeof(xs).sharding
    mesh, spec = sharding.mesh, tuple(sharding.spec)
    batch_spec = spec[1] if len(spec) > 1 else None

    def place(a):
        on = getattr(jax.typeof(a).sharding, "mesh", None)
        return jax.sharding.reshard(a, NamedSharding(mesh, PartitionSpec())) if on is None or on.empty else a

    rows = NamedSharding(mesh, PartitionSpec(batch_spec, None))
    return jax.tree.map(place, params), jax.tree.map(lambda a: jax.sharding.reshard(a, rows), state0)


def weight_sharding(like, rows_like) -> NamedSharding:
    """Where a weight's gradient lives on an Explicit mesh: as the weight ``like`` is, or replicated
    on the mesh of ``rows_like`` when the weight is on no mesh (what a data-parallel step sums into)."""
    mine = jax.typeof(like).sharding
    return mine if not mine.mesh.empty else NamedSharding(jax.typeof(rows_like).sharding.mesh, PartitionSpec())
