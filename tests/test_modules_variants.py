"""The three modules with the LSTM family's options: ``proj_size=``, ``peephole=``, ``layer_norm=``.

Each module's values and gradients (random cotangents on the outputs and on
every field of the final carry) are compared with ``lstm_stack(impl="autodiff")``
(``lstm_ref``, autodiff) on the module's own weights; carries have c: (*batch, H)
and h: (*batch, P); the options survive ``from_params``, and ``step`` is the
sequence call with one step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lstm import LSTMState
from jax_lstm.gradcheck import rel_err
from jax_lstm.layers import lstm_stack

T, B, D, H, P = 5, 3, 4, 6, 3
LENGTHS = jnp.asarray([5, 3, 1])
# (options, hidden sizes, bidirectional): the projection (it changes the carry's shapes) alone, and all three
# in a bidirectional stack; each option's math against lstm_ref and the NumPy oracle is tests/test_variants.py's
CASES = [
    ({"proj_size": P}, (H,), False),
    ({"proj_size": P, "peephole": True, "layer_norm": True}, (H, 5), True),
]
IDS = ["proj", "all-2-layer-bi"]


def _h_size(opts, h):
    return opts.get("proj_size") or h


def _flat_carry(carry):
    """Every (c, h) array of a module carry, in order (Flax LSTMCarry or Equinox LSTMState nestings)."""
    return jax.tree.leaves(carry)


def _check_against_oracle(run_module, stack, xs_tm, opts, sizes, n_dir, tol=1e-10):
    """Values and gradients of ``run_module(stack, xs_tm) -> (hs_tm, carry leaves)`` against lstm_stack(autodiff)."""

    def oracle(stack, xs):
        hs, finals = lstm_stack(stack, xs, seq_lengths=LENGTHS, impl="autodiff")
        return hs, [a for layer in finals for s in layer for a in (s.c, s.h)]

    hs_m, carry_m = jax.jit(run_module)(stack, xs_tm)
    hs_o, carry_o = jax.jit(oracle)(stack, xs_tm)
    assert hs_m.shape == (T, B, n_dir * _h_size(opts, sizes[-1]))
    assert rel_err(hs_m, hs_o) < tol
    assert len(carry_m) == len(carry_o)
    for a, b in zip(carry_m, carry_o, strict=True):
        assert a.shape == b.shape and rel_err(a, b) < tol
    rng = np.random.default_rng(7)
    cts = (jnp.asarray(rng.standard_normal(hs_o.shape)), [jnp.asarray(rng.standard_normal(a.shape)) for a in carry_o])

    def loss(fn):
        def f(stack, xs):
            hs, carry = fn(stack, xs)
            return jnp.sum(hs * cts[0]) + sum(jnp.sum(a * w) for a, w in zip(carry, cts[1], strict=True))

        return jax.jit(jax.grad(f, argnums=(0, 1)))(stack, xs_tm)

    g_m, g_o = loss(run_module), loss(oracle)
    leaves_m, leaves_o = jax.tree.leaves(g_m), jax.tree.leaves(g_o)
    assert len(leaves_m) == len(leaves_o) > 3
    for a, b in zip(leaves_m, leaves_o, strict=True):
        assert rel_err(a, b) < tol


@pytest.mark.parametrize(("opts", "sizes", "bidirectional"), CASES, ids=IDS)
def test_nnx_variants_match_the_oracle(opts, sizes, bidirectional):
    nnx = pytest.importorskip("flax.nnx")
    import jax_lstm.nnx as jnnx

    with jax.enable_x64(True):
        model = jnnx.LSTM(
            D, sizes, bidirectional=bidirectional, param_dtype=jnp.float64, return_carry=True, rngs=nnx.Rngs(0), **opts
        )
        stack = model.to_params()
        p0 = stack[0][0]
        assert (p0.W_proj is not None) == ("proj_size" in opts)
        assert (p0.peephole is not None) == ("peephole" in opts)
        assert (p0.norm is not None) == ("layer_norm" in opts)
        assert model.proj_size == opts.get("proj_size", 0)
        xs = jnp.asarray(np.random.default_rng(0).standard_normal((T, B, D)))
        n_dir = 2 if bidirectional else 1

        def run(stack, xs):
            m = jnnx.LSTM.from_params(stack, return_carry=True, time_major=True)
            carry, hs = m(xs, seq_lengths=LENGTHS)
            return hs, _flat_carry(carry)

        _check_against_oracle(run, stack, xs, opts, sizes, n_dir)
        # the carry from initialize_carry has c: (B, H), h: (B, P), and feeds back in
        carry0 = model.initialize_carry((B, D))
        layers = (carry0,) if len(sizes) == 1 else carry0
        for l, layer in enumerate(layers):
            for s in layer if bidirectional else (layer,):
                assert s.c.shape == (B, sizes[l]) and s.h.shape == (B, _h_size(opts, sizes[l]))
        carry, _ = model(jnp.swapaxes(xs, 0, 1), initial_carry=carry0)
        assert jax.tree.map(jnp.shape, carry) == jax.tree.map(jnp.shape, carry0)
        # from_params keeps the options
        again = jnnx.LSTM.from_params(stack)
        assert (again.proj_size, again.peephole, again.layer_norm) == (
            model.proj_size,
            model.peephole,
            model.layer_norm,
        )


@pytest.mark.parametrize(("opts", "sizes", "bidirectional"), CASES, ids=IDS)
def test_linen_variants_match_the_oracle(opts, sizes, bidirectional):
    pytest.importorskip("flax.linen")
    import jax_lstm.linen as jlinen

    with jax.enable_x64(True):
        feats = sizes if len(sizes) > 1 else sizes[0]
        rnn = jlinen.LSTM(
            feats, bidirectional=bidirectional, param_dtype=jnp.float64, return_carry=True, time_major=True, **opts
        )
        xs = jnp.asarray(np.random.default_rng(1).standard_normal((T, B, D)))
        variables = rnn.init(jax.random.key(0), xs)
        stack = jlinen.from_variables(variables)
        n_dir = 2 if bidirectional else 1

        def run(stack, xs):
            carry, hs = rnn.apply(jlinen.to_variables(stack), xs, seq_lengths=LENGTHS)
            return hs, _flat_carry(carry)

        _check_against_oracle(run, stack, xs, opts, sizes, n_dir)
        carry0 = rnn.initialize_carry(jax.random.key(1), (B, D))
        carry_m, _ = rnn.apply(variables, xs, initial_carry=carry0)
        assert jax.tree.map(jnp.shape, carry_m) == jax.tree.map(jnp.shape, carry0)
        for l, layer in enumerate((carry0,) if len(sizes) == 1 else carry0):
            for s in layer if bidirectional else (layer,):
                assert s.c.shape == (B, sizes[l]) and s.h.shape == (B, _h_size(opts, sizes[l]))
        if not bidirectional:  # step is the sequence call with one step
            c1, y1 = rnn.apply(variables, carry0, xs[0], method="step")
            c_seq, ys = rnn.apply(variables, xs[:1], initial_carry=carry0)
            assert rel_err(y1, ys[0]) < 1e-12
            assert all(rel_err(a, b) < 1e-12 for a, b in zip(jax.tree.leaves(c1), jax.tree.leaves(c_seq), strict=True))


@pytest.mark.parametrize(("opts", "sizes", "bidirectional"), CASES, ids=IDS)
def test_eqx_variants_match_the_oracle(opts, sizes, bidirectional):
    pytest.importorskip("equinox")
    import jax_lstm.eqx as jeqx

    with jax.enable_x64(True):
        model = jeqx.LSTM(D, sizes, bidirectional=bidirectional, dtype=jnp.float64, key=jax.random.PRNGKey(0), **opts)
        xs = jnp.asarray(np.random.default_rng(2).standard_normal((T, B, D)))
        n_dir = 2 if bidirectional else 1

        def run(stack, xs):
            m = jeqx.LSTM.from_params(stack)
            hs, final = jax.vmap(lambda x, n: m(x, seq_length=n), in_axes=(1, 0), out_axes=(1, 0))(xs, LENGTHS)
            return hs, _eqx_leaves(final)

        _check_against_oracle(run, model.to_params(), xs, opts, sizes, n_dir)
        if not bidirectional:
            state = model.step(xs[0, 0])
            assert state.c.shape == (H,) and state.h.shape == (_h_size(opts, H),)
            hs, final = model(xs[:2, 0])
            assert rel_err(model.step(xs[1, 0], state).h, hs[1]) < 1e-12


def _eqx_leaves(final):
    """(c, h) of every layer and direction of an Equinox final state, in the oracle's order."""
    nested = ((final,),) if isinstance(final, LSTMState) else final
    return [a for layer in nested for s in layer for a in (s.c, s.h)]


def test_projected_carry_shapes_are_checked():
    nnx = pytest.importorskip("flax.nnx")
    import jax_lstm.nnx as jnnx

    model = jnnx.LSTM(D, H, proj_size=P, rngs=nnx.Rngs(0))
    xs = jnp.ones((B, T, D))
    good = model.initialize_carry((B, D))
    model(xs, initial_carry=good)
    bad = good._replace(h=jnp.zeros((B, H)))
    with pytest.raises(ValueError, match=r"initial_carry\.h has shape \(3, 6\).*\(\*batch, P\) = \(3, 3\).*projection"):
        model(xs, initial_carry=bad)
    with pytest.raises(ValueError, match="proj_size"):
        jnnx.LSTM(D, H, proj_size=H, rngs=nnx.Rngs(0))
