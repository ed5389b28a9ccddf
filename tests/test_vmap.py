"""jax.vmap of lstm and lstm_stack: over examples, over a leading axis and over params, against unmapped calls.

Under vmap over examples the mapped axis is folded into the batch rows, so the unmapped call on the
whole batch is the reference: same values and gradients. The fold must also be the path taken.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import pytest

import jax_lstm as jl
from jax_lstm import LSTMState
from jax_lstm.gradcheck import rel_err as _rel  # max over the leaves of max |a - b| / max |b|

T, B, D, H = 5, 4, 2, 3


@pytest.fixture(scope="module")
def problem():
    k = jax.random.split(jax.random.PRNGKey(7), 8)
    p = jl.init_params(k[0], D, H, dtype=jnp.float64)
    xs = jax.random.normal(k[1], (T, B, D), jnp.float64)
    s0 = LSTMState(*jax.random.normal(k[2], (2, B, H), jnp.float64))
    mask = jax.random.bernoulli(k[3], 0.7, (T, B))
    resets = jax.random.bernoulli(k[4], 0.2, (T, B))
    w = jax.random.normal(k[5], (T, B, H), jnp.float64)
    w2 = jax.random.normal(k[6], (2, B, H), jnp.float64)
    return p, xs, s0, mask, resets, w, w2


def _loss_batched(fn, p, xs, s0, mask, resets, w, w2, **kw):
    hs, (h, c) = fn(p, xs, s0, mask=mask, resets=resets, **kw)
    return jnp.sum(hs * w) + jnp.sum(h * w2[0]) + jnp.sum(c * w2[1])


def _loss_per_example(fn, p, x, s, m, r, wt, wh, wc, **kw):
    """One example: x (T, 1, D), as an equinox module calls lstm."""
    hs, (h, c) = fn(p, x, s, mask=m, resets=r, **kw)
    return jnp.sum(hs * wt) + jnp.sum(h * wh) + jnp.sum(c * wc)


def _examples(xs, s0, mask, resets, w, w2):
    """Split the batch into B examples of batch size 1, mapped axis first."""
    ex = lambda a, axis: jnp.expand_dims(jnp.moveaxis(a, axis, 0), axis + 1)  # noqa: E731
    s = LSTMState(ex(s0.h, 0), ex(s0.c, 0))
    return ex(xs, 1), s, ex(mask, 1), ex(resets, 1), ex(w, 1), ex(w2[0], 0), ex(w2[1], 0)


@pytest.mark.parametrize("rd", [0.0, 0.4])
def test_grad_of_vmap_over_examples_equals_the_batched_call(problem, rd):
    p, xs, s0, mask, resets, w, w2 = problem
    kw = {}
    if rd:  # a per-example mask draws per example; compare with the same draws made by hand
        kw = dict(recurrent_dropout=rd, key=jax.random.PRNGKey(3))
    args = _examples(xs, s0, mask, resets, w, w2)

    def mapped(p, xs_e):
        per = lambda x, s, m, r, wt, wh, wc: _loss_per_example(jl.lstm, p, x, s, m, r, wt, wh, wc, **kw)  # noqa: E731
        return jnp.sum(jax.vmap(per)(xs_e, *args[1:]))

    def mapped_ref(p, xs_e):
        per = lambda x, s, m, r, wt, wh, wc: _loss_per_example(jl.lstm_ref, p, x, s, m, r, wt, wh, wc, **kw)  # noqa: E731
        return jnp.sum(jax.vmap(per)(xs_e, *args[1:]))

    g = jax.jit(jax.grad(mapped, argnums=(0, 1)))(p, args[0])
    g_ref = jax.jit(jax.grad(mapped_ref, argnums=(0, 1)))(p, args[0])
    assert _rel(g, g_ref) < 1e-10
    if not rd:
        g_batched = jax.jit(jax.grad(_loss_batched, argnums=(1, 2)), static_argnums=0)(
            jl.lstm, p, xs, s0, mask, resets, w, w2
        )
        assert _rel(g[0], g_batched[0]) < 1e-10
        assert _rel(jnp.moveaxis(g[1][:, :, 0], 0, 1), g_batched[1]) < 1e-10


def test_vmap_of_grad_gives_per_example_gradients(problem):
    p, xs, s0, mask, resets, w, w2 = problem
    args = _examples(xs, s0, mask, resets, w, w2)
    per = lambda fn: (
        lambda x, s, m, r, wt, wh, wc: jax.grad(_loss_per_example, argnums=(1, 2, 3))(  # noqa: E731
            fn, p, x, s, m, r, wt, wh, wc
        )
    )
    g = jax.vmap(per(jl.lstm))(*args)
    g_ref = jax.vmap(per(jl.lstm_ref))(*args)
    assert g[0].W.shape == (B, H, 4 * H)  # one weight gradient per example
    assert _rel(g, g_ref) < 1e-10
    # and they sum to the batched call's gradient
    g_batched = jax.grad(_loss_batched, argnums=1)(jl.lstm, p, xs, s0, mask, resets, w, w2)
    assert _rel(jax.tree.map(lambda a: a.sum(0), g[0]), g_batched) < 1e-10


def test_vmap_over_a_leading_axis_and_nested(problem):
    p, xs, s0, mask, resets, w, w2 = problem
    N = 3
    xs_n = jnp.stack([xs, 2 * xs, -xs])
    f = lambda fn: lambda p, x: _loss_batched(fn, p, x, s0, mask, resets, w, w2, reverse=True)  # noqa: E731
    g, g_ref = (
        jax.jit(jax.grad(lambda p, x, fn=fn: jnp.sum(jax.vmap(lambda x_: f(fn)(p, x_))(x)), argnums=(0, 1)))(p, xs_n)
        for fn in (jl.lstm, jl.lstm_ref)
    )
    assert _rel(g, g_ref) < 1e-10
    nested = jax.vmap(jax.vmap(lambda x_: jl.lstm(p, x_, s0, mask=mask)[0]))(xs_n.reshape(1, N, T, B, D))
    unmapped = jnp.stack([jl.lstm(p, x_, s0, mask=mask)[0] for x_ in xs_n])
    assert _rel(nested[0], unmapped) < 1e-12


def test_vmap_over_params_an_ensemble(problem):
    _, xs, s0, mask, resets, w, w2 = problem
    ps = jax.vmap(lambda k: jl.init_params(k, D, H, dtype=jnp.float64))(jax.random.split(jax.random.PRNGKey(1), 3))
    f = lambda fn: lambda p: _loss_batched(fn, p, xs, s0, mask, resets, w, w2)  # noqa: E731
    g = jax.jit(jax.vmap(jax.grad(f(jl.lstm))))(ps)
    g_ref = jax.jit(jax.vmap(jax.grad(f(jl.lstm_ref))))(ps)
    assert _rel(g, g_ref) < 1e-10
    g2 = jax.jit(jax.grad(lambda ps: jnp.sum(jax.vmap(f(jl.lstm))(ps))))(ps)
    assert _rel(g2, g_ref) < 1e-10


def test_lstm_stack_under_vmap_over_examples():
    params = jl.init_stack(jax.random.PRNGKey(0), D, [3, 2], bidirectional=True, dtype=jnp.float64)
    xs = jax.random.normal(jax.random.PRNGKey(1), (B, T, D), jnp.float64)  # examples first
    lengths = jnp.array([5, 3, 0, 1])

    def per(fn):
        def f(p, x, n):
            hs, finals = jl.lstm_stack(p, x[:, None], seq_lengths=n[None], impl=fn)
            return jnp.sum(jnp.sin(hs)) + sum(jnp.sum(jnp.cos(a)) for a in jax.tree.leaves(finals))

        return f

    g, g_ref = (
        jax.jit(jax.grad(lambda p, i=impl: jnp.sum(jax.vmap(per(i), in_axes=(None, 0, 0))(p, xs, lengths))))(params)
        for impl in ("manual", "autodiff")
    )
    assert _rel(g, g_ref) < 1e-10


def test_examples_are_folded_into_the_rows_before_the_custom_vjp(problem):
    """grad of vmap must not form one weight gradient per example (an (N, H, 4H) array)."""
    p, xs, s0, mask, resets, w, w2 = problem
    args = _examples(xs, s0, mask, resets, w, w2)

    def mapped(p):
        per = lambda x, s, m, r, wt, wh, wc: _loss_per_example(jl.lstm, p, x, s, m, r, wt, wh, wc)  # noqa: E731
        return jnp.sum(jax.vmap(per)(*args))

    text = str(jax.make_jaxpr(jax.grad(mapped))(p))
    assert f"f64[{B},{H},{4 * H}]" not in text
    assert f"f64[{T},{B},{4 * H}]" in text  # the loops run on the folded (T, N * 1, 4H) rows


def test_per_example_gradients_of_one_example_and_of_none(problem):
    p, xs, s0, *_ = problem
    one = xs[None, :, :1]  # a mapped axis of size 1, each example (T, 1, D)
    f = lambda fn: jax.vmap(jax.grad(lambda p_, x: jnp.sum(jnp.sin(fn(p_, x)[0]))), (None, 0))  # noqa: E731
    assert _rel(f(jl.lstm)(p, one), f(jl.lstm_ref)(p, one)) < 1e-10
    empty = jnp.zeros((0, T, 1, D))
    assert jax.vmap(lambda x: jl.lstm(p, x)[0])(empty).shape == (0, T, 1, H)
    g = jax.grad(lambda p_: jnp.sum(jax.vmap(lambda x: jl.lstm(p_, x)[0])(empty)))(p)
    assert all(float(jnp.abs(a).max()) == 0.0 for a in jax.tree.leaves(g))


def test_second_order_gradients_under_vmap(problem):
    p, xs, s0, mask, *_ = problem
    ex = jnp.moveaxis(xs, 1, 0)[:, :, None]  # (B, T, 1, D)

    def inner(fn):
        def f(p_, x):
            g = jax.grad(lambda x_: jnp.sum(fn(p_, x_, mask=mask[:, :1])[0] ** 2))(x)
            return jnp.sum(g**2)

        return f

    for argnum in (0, 1):
        got = jax.jit(jax.vmap(jax.grad(inner(jl.lstm), argnums=argnum), (None, 0)))(p, ex)
        want = jax.jit(jax.vmap(jax.grad(inner(jl.lstm_ref), argnums=argnum), (None, 0)))(p, ex)
        assert _rel(got, want) < 1e-10
    total = lambda fn: jax.jit(jax.grad(lambda p_: jnp.sum(jax.vmap(inner(fn), (None, 0))(p_, ex))))  # noqa: E731
    assert _rel(total(jl.lstm)(p), total(jl.lstm_ref)(p)) < 1e-10
