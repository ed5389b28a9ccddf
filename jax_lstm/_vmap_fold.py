"""Folding a ``jax.vmap``-ped axis into the batch rows of the LSTM's loops.

Under ``jax.vmap`` over examples, N independent (T, B) problems with the same
weights are one (T, N * B) problem: the same loops run once, every matmul is
N * B rows tall, and the weight gradients come out of single matmuls. JAX's
own batching of a ``custom_vjp`` would instead run the loops over an (N, ...)
stack of small problems and form one weight gradient per example. Two places
fold:

* ``fold_before``: before the custom_vjp, when the vmap is the innermost
  transformation (``jax.grad(jax.vmap(f))``, the Equinox idiom, or ``vmap``
  alone). The weight gradients are then summed over examples by the matmuls.
* ``Foldable``: the kernels inside the custom_vjp, when autodiff runs inside
  the vmap (``jax.vmap(jax.grad(f))``, per-example gradients). Each example's
  weight gradient is the result, so the backward kernel is built per group
  of rows (``make(groups)``).

Every argument and output is a ``WEIGHT`` (never folded) or ``rows(axis)``, a
row array with its batch axis at ``axis`` (xs: 1, h0: 0, ...). With a weight
mapped (an ensemble), an empty mapped axis or an Explicit-axis mesh, the
function is vmapped as it is: correct, at the speed of XLA's batched loops.

The one probe of JAX internals is ``mapped_by_innermost_vmap``: tested on JAX
0.10 (``jax._src.core.trace_ctx`` and ``jax._src.interpreters.batching``). If
those internals move, it answers False, and every vmap takes the second path
(folding in the kernels): still correct, only the weight gradients are then
formed per example and summed.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jax_lstm._sharding import on_explicit_mesh

__all__ = ["WEIGHT", "rows", "mapped_by_innermost_vmap", "fold_before", "Foldable"]

WEIGHT = "weight"


def rows(axis: int) -> tuple[str, int]:
    """The kind of a row array whose batch axis is ``axis``."""
    return ("rows", axis)


def _is_kind(k) -> bool:
    return k == WEIGHT or (isinstance(k, tuple) and len(k) == 2 and k[0] == "rows")


def mapped_by_innermost_vmap(args) -> bool:
    """Whether the innermost transformation tracing this call is a vmap that maps one of ``args``.

    Only then is a ``custom_vmap`` rule reached before any autodiff sees the
    call (grad of vmap, vmap alone); with autodiff innermost (vmap of grad)
    the custom_vjp's own batching applies.
    """
    try:
        from jax._src import core as jax_core
        from jax._src.interpreters import batching

        trace = jax_core.trace_ctx.trace
        if not isinstance(trace, batching.BatchTrace):
            return False
        return any(
            isinstance(a, batching.BatchTracer) and a._trace is trace and a.batch_dim is not None
            for a in jax.tree.leaves(args)
        )
    except (ImportError, AttributeError):  # pragma: no cover - other JAX internals: the kernels fold instead
        return False


def _fold(a, kind, batched, n):
    """One argument of an (N-mapped) call, as an argument of the N * B-row call."""
    if a is None or kind == WEIGHT:
        return a
    _, axis = kind
    if not batched:
        a = jnp.broadcast_to(a[None], (n, *a.shape))
    a = jnp.moveaxis(a, 0, axis)  # (..., N, B, ...)
    return a.reshape(*a.shape[:axis], n * a.shape[axis + 1], *a.shape[axis + 2 :])


def _unfold(a, kind, n, groups):
    """One output of the N * B-row call, as the output of the N-mapped call (batched at axis 0)."""
    if kind == WEIGHT:  # per-group weight gradients (n * groups, ...) -> (n, [groups,] ...)
        return a.reshape(n, *(() if groups is None else (groups,)), *a.shape[1:])
    _, axis = kind
    split = (*a.shape[:axis], n, a.shape[axis] // n, *a.shape[axis + 1 :])
    return jnp.moveaxis(a.reshape(split), axis, 0)


def _cannot_fold(n, in_batched, in_kinds, args) -> bool:
    weights_mapped = any(b for b, k in zip(in_batched, in_kinds, strict=True) if k == WEIGHT)
    return n == 0 or weights_mapped or any(on_explicit_mesh(a) for a in args if a is not None)


def _rule(fn, folded_for, in_kinds, out_kinds, groups):
    """The custom_vmap rule: ``folded_for(n)`` on the N * B-row arguments, or ``fn`` vmapped as it is."""

    def rule(n, in_batched, *args):
        if _cannot_fold(n, in_batched, in_kinds, args):
            out = jax.vmap(fn, in_axes=[0 if b else None for b in in_batched])(*args)
            return out, jax.tree.map(lambda _: True, out)
        out = folded_for(n)(*(_fold(a, k, b, n) for a, k, b in zip(args, in_kinds, in_batched, strict=True)))
        flat, tree = jax.tree.flatten(out)
        kinds = jax.tree.leaves(out_kinds, is_leaf=_is_kind)
        flat = [_unfold(a, k, n, groups) for a, k in zip(flat, kinds, strict=True)]
        return jax.tree.unflatten(tree, flat), jax.tree.unflatten(tree, [True] * len(flat))

    return rule


def fold_before(fn, in_kinds, out_kinds):
    """``fn`` (a custom_vjp) as a function whose innermost vmap over examples folds into its rows."""

    @functools.cache
    def folding():
        core = jax.custom_batching.custom_vmap(fn)
        core.def_vmap(_rule(fn, lambda n: run, in_kinds, out_kinds, None))
        return core

    def run(*args):
        return folding()(*args) if mapped_by_innermost_vmap(args) else fn(*args)

    return run


class Foldable:
    """A kernel (a plain function of arrays) whose ``jax.vmap`` folds the mapped axis into its rows.

    ``make(groups)`` builds the kernel: with ``groups=None`` the plain one,
    with an int the one whose rows are ``groups`` problems stacked, which
    returns its ``WEIGHT`` outputs per group, (groups, ...). Nested vmaps
    multiply the groups. Differentiating a kernel (grad of grad does) is plain
    autodiff of it, to any order.
    """

    def __init__(self, make, in_kinds, out_kinds):
        self._make, self._in, self._out = make, in_kinds, out_kinds
        self._at = functools.cache(self._build)

    def __call__(self, *args):
        return self._at(None)(*args)

    def _build(self, groups):
        raw = self._make(groups)
        fast = jax.custom_batching.custom_vmap(raw)
        fast.def_vmap(_rule(raw, lambda n: self._at((groups or 1) * n), self._in, self._out, groups))

        # custom_vmap has no autodiff rule of its own: its derivative is that of ``raw``, and a
        # custom_jvp (unlike a custom_vjp) can itself be differentiated again, to any order.
        @jax.custom_jvp
        def kernel(*args):
            return fast(*args)

        @kernel.defjvp
        def kernel_jvp(primals, tangents):
            return jax.jvp(raw, primals, tangents)

        return kernel
