"""Flax's own recurrent tests, ported: the same scenarios with jax_lstm's modules in place of Flax's.

The scenarios are those of Flax's ``tests/linen/linen_recurrent_test.py`` (``RNNTest``,
``BidirectionalTest``) and ``tests/nnx/nn/recurrent_test.py`` (``TestLSTMCell``, ``TestRNN``), with
``jax_lstm.linen.LSTM`` / ``jax_lstm.nnx.LSTM`` where Flax has ``nn.RNN`` / ``nnx.RNN`` over an LSTM
cell (and ``nn.Bidirectional`` / ``nnx.Bidirectional``), and the module's ``step`` where Flax calls the
cell alone. Where Flax's test steps its own cell as the reference, so does this port: Flax's
``OptimizedLSTMCell`` with our weights converted by ``jax_lstm.interop``. Inputs are random where Flax
uses ones, so that a wrong order of steps shows.

Not ported, by design (the README's list of differences): the ConvLSTM, GRU and custom-cell scenarios
(this is one LSTM cell, dense); Flax's variables tree (``params/cell/ii/kernel``, ...), read here through
``jax_lstm.interop.to_flax``. Where Flax leaves its cell's values at padded steps, ours are zero, and a
row of length 0 ends in its initial carry (Flax picks the carry at index -1): both are asserted below.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jax_lstm import LSTMState
from jax_lstm._modules import flip_sequences
from jax_lstm.interop import from_flax, to_flax

nn = pytest.importorskip("flax.linen")
nnx = pytest.importorskip("flax.nnx")

from jax_lstm import linen as jl  # noqa: E402
from jax_lstm import nnx as jn  # noqa: E402


def _normal(seed, shape, dtype=jnp.float32):
    return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), dtype)


def _linen(features, xs, **kw):
    """Our Linen module and its variables, initialised on ``xs``."""
    module = jl.LSTM(features, **kw)
    return module, module.init(jax.random.key(0), xs)


def _cell_params(variables):
    """The one layer's weights of our Linen variables as Flax cell variables (``to_flax``)."""
    return to_flax(jl.from_variables(variables)[0][0])


def _flax_steps(cell_vars, xs, carry):
    """Flax's OptimizedLSTMCell stepped over batch-major xs (B, T, D): outputs (B, T, H) and every carry."""
    H = cell_vars["params"]["hi"]["kernel"].shape[0]
    cell = nn.OptimizedLSTMCell(H)
    ys, carries = [], []
    for t in range(xs.shape[1]):
        carry, y = cell.apply(cell_vars, carry, xs[:, t])
        ys.append(y)
        carries.append(carry)
    return jnp.stack(ys, axis=1), carries


def _zeros_carry(B, H, dtype=jnp.float32):
    return jnp.zeros((B, H), dtype), jnp.zeros((B, H), dtype)


def _close(a, b, rtol=1e-5, atol=1e-6):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=rtol, atol=atol)


# --------------------------------------------------------------------------- linen: RNNTest


def _check_cell_shapes(variables, channels_in, channels_out):
    """Flax's check of ``variables['params']['cell']``, on our weights in Flax's tree (``to_flax``)."""
    stack = jl.from_variables(variables)
    assert stack[0][0].W.shape == (channels_out, 4 * channels_out)
    assert stack[0][0].U.shape == (channels_in, 4 * channels_out)
    for layer_params in _cell_params(variables)["params"].values():
        if "bias" in layer_params:
            assert layer_params["bias"].shape == (channels_out,)
        assert layer_params["kernel"].shape[0] in (channels_in, channels_out)
        assert layer_params["kernel"].shape[1] == channels_out


def test_rnn_basic_forward():
    batch_size, seq_len, channels_in, channels_out = 10, 40, 5, 15
    xs = jnp.ones((batch_size, seq_len, channels_in))
    rnn, variables = _linen(channels_out, xs, return_carry=True)
    carry, ys = rnn.apply(variables, xs)
    assert ys.shape == (batch_size, seq_len, channels_out)
    c, h = carry
    assert c.shape == h.shape == (batch_size, channels_out)
    _check_cell_shapes(variables, channels_in, channels_out)


def test_rnn_multiple_batch_dims():
    batch_dims, seq_len, channels_in, channels_out = (10, 11), 40, 5, 15
    xs = _normal(0, (*batch_dims, seq_len, channels_in))
    rnn, variables = _linen(channels_out, xs, return_carry=True)
    carry, ys = rnn.apply(variables, xs)
    assert ys.shape == (*batch_dims, seq_len, channels_out)
    assert jax.tree.map(jnp.shape, tuple(carry)) == ((*batch_dims, channels_out),) * 2
    _check_cell_shapes(variables, channels_in, channels_out)
    # the same values as Flax's RNN with the same weights
    ref = nn.RNN(nn.OptimizedLSTMCell(channels_out), return_carry=True)
    carry_r, ys_r = ref.apply({"params": {"cell": _cell_params(variables)["params"]}}, xs)
    _close(ys, ys_r)
    _close(carry.c, carry_r[0])
    _close(carry.h, carry_r[1])


def test_rnn_unroll():
    batch_size, seq_len, channels_in, channels_out = 10, 40, 5, 15
    xs = _normal(1, (batch_size, seq_len, channels_in))
    rnn, variables = _linen(channels_out, xs, unroll=10, return_carry=True)
    carry, ys = rnn.apply(variables, xs)
    assert ys.shape == (batch_size, seq_len, channels_out)
    _check_cell_shapes(variables, channels_in, channels_out)
    carry_1, ys_1 = jl.LSTM(channels_out, return_carry=True).apply(variables, xs)
    _close(ys, ys_1, rtol=1e-12, atol=1e-12)  # unroll changes speed, never values
    _close(carry, carry_1, rtol=1e-12, atol=1e-12)


def test_rnn_time_major():
    seq_len, batch_size, channels_in, channels_out = 40, 10, 5, 15
    xs = jnp.ones((seq_len, batch_size, channels_in))
    rnn, variables = _linen(channels_out, xs, time_major=True, return_carry=True)
    carry, ys = rnn.apply(variables, xs)
    for leaf in jax.tree.leaves(carry):  # the carry is not zeros after apply
        assert not np.allclose(leaf, jnp.zeros_like(leaf))
        assert leaf.shape == (batch_size, channels_out)
    assert ys.shape == (seq_len, batch_size, channels_out)
    _check_cell_shapes(variables, channels_in, channels_out)


def test_numerical_equivalence():
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = _normal(2, (batch_size, seq_len, channels_in))
    rnn = jl.LSTM(channels_out, return_carry=True)
    (carry, ys), variables = rnn.init_with_output(jax.random.key(0), xs)
    cell_carry = rnn.initialize_carry(jax.random.key(0), xs[:, 0].shape)
    ys_r, carries = _flax_steps(_cell_params(variables), xs, tuple(cell_carry))
    step_carry = cell_carry
    for i in range(seq_len):
        _close(ys_r[:, i], ys[:, i])
        step_carry, y = rnn.apply(variables, step_carry, xs[:, i], method="step")  # our own cell call
        _close(y, ys[:, i])
    _close(carries[-1], carry)
    _close(step_carry, carry)


def test_numerical_equivalence_with_mask():
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    seq_lengths = jax.random.randint(jax.random.key(0), (batch_size,), minval=1, maxval=seq_len + 1)
    xs = _normal(3, (batch_size, seq_len, channels_in))
    rnn = jl.LSTM(channels_out, return_carry=True)
    (carry, ys), variables = rnn.init_with_output(jax.random.key(0), xs, seq_lengths=seq_lengths)
    ys_r, carries = _flax_steps(_cell_params(variables), xs, _zeros_carry(batch_size, channels_out))
    valid = np.arange(seq_len)[None, :] < np.asarray(seq_lengths)[:, None]
    for i in range(seq_len):
        _close(ys[:, i][valid[:, i]], ys_r[:, i][valid[:, i]])
    assert np.all(np.asarray(ys)[~valid] == 0.0)  # difference: zero outputs at padded steps
    for b, length in enumerate(np.asarray(seq_lengths)):
        for carry_t, carry_ in zip(carries[length - 1], carry, strict=True):
            _close(carry_t[b], carry_[b])


def test_numerical_equivalence_single_batch():
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = _normal(4, (batch_size, seq_len, channels_in))
    rnn = jl.LSTM(channels_out, return_carry=True)
    (carry, ys), variables = rnn.init_with_output(jax.random.key(0), xs)
    cell_vars = _cell_params(variables)
    for b in range(batch_size):
        cell_carry = tuple(rnn.initialize_carry(jax.random.key(0), xs[:1, 0].shape))
        ys_b, carries = _flax_steps(cell_vars, xs[b : b + 1], cell_carry)
        _close(ys_b[0], ys[b], rtol=1e-6)
        _close(carries[-1], jax.tree.map(lambda x, b=b: x[b : b + 1], tuple(carry)), rtol=1e-6)


def test_numerical_equivalence_single_batch_nn_scan():
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = _normal(5, (batch_size, seq_len, channels_in))
    rnn = jl.LSTM(channels_out, return_carry=True)
    (carry, ys), variables = rnn.init_with_output(jax.random.key(0), xs)
    scanned = nn.scan(
        nn.OptimizedLSTMCell, in_axes=1, out_axes=1, variable_broadcast="params", split_rngs={"params": False}
    )(channels_out)
    carry_r, ys_r = scanned.apply(_cell_params(variables), _zeros_carry(batch_size, channels_out), xs)
    _close(ys, ys_r)
    _close(carry, carry_r)
    for b in range(batch_size):  # one row at a time, as Flax's test
        c_b, y_b = rnn.apply(variables, xs[b : b + 1])
        _close(y_b[0], ys_r[b])
        _close(c_b, jax.tree.map(lambda x, b=b: x[b : b + 1], carry_r))


def test_numerical_equivalence_single_batch_jax_scan():
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = jax.random.uniform(jax.random.key(0), (batch_size, seq_len, channels_in))
    rnn = jl.LSTM(channels_out, return_carry=True)
    (carry, ys), variables = rnn.init_with_output(jax.random.key(0), xs)
    cell, cell_vars = nn.OptimizedLSTMCell(channels_out), _cell_params(variables)

    def scan_fn(carry, x):
        return cell.apply(cell_vars, carry, x)

    carry_r, ys_r = jax.lax.scan(scan_fn, _zeros_carry(batch_size, channels_out, xs.dtype), xs.swapaxes(0, 1))
    _close(ys, ys_r.swapaxes(0, 1), rtol=1e-4)
    _close(carry, carry_r, rtol=1e-4)


@pytest.mark.parametrize("keep_order", [False, True])
def test_reverse(keep_order):
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = _normal(6, (batch_size, seq_len, channels_in))
    rnn = jl.LSTM(channels_out, return_carry=True, reverse=True, keep_order=keep_order)
    (carry, ys), variables = rnn.init_with_output(jax.random.key(0), xs)
    cell_vars = _cell_params(variables)
    for b in range(batch_size):
        cell_carry = tuple(rnn.initialize_carry(jax.random.key(0), xs[:1, 0].shape))
        ys_b, carries = _flax_steps(cell_vars, xs[b : b + 1, ::-1], cell_carry)  # step i reads x[T - 1 - i]
        want = ys_b[0, ::-1] if keep_order else ys_b[0]  # Flax: processing order unless keep_order
        _close(ys[b], want)
        _close(carries[-1], jax.tree.map(lambda x, b=b: x[b : b + 1], tuple(carry)))


@pytest.mark.parametrize("keep_order", [False, True])
def test_reverse_with_seq_lengths_matches_flax(keep_order):
    """Flax's RNN(reverse=True) flips each row within its length; so do we (valid steps compared)."""
    B, T, D, H = 3, 5, 4, 6
    xs = _normal(7, (B, T, D))
    lengths = jnp.array([5, 3, 1])
    rnn, variables = _linen(H, xs, return_carry=True, reverse=True, keep_order=keep_order)
    carry, ys = rnn.apply(variables, xs, seq_lengths=lengths)
    ref = nn.RNN(nn.OptimizedLSTMCell(H), return_carry=True, reverse=True, keep_order=keep_order)
    carry_r, ys_r = ref.apply({"params": {"cell": _cell_params(variables)["params"]}}, xs, seq_lengths=lengths)
    valid = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
    _close(ys * valid, ys_r * valid)
    assert float(jnp.max(jnp.abs(jnp.where(valid, 0.0, ys)))) == 0.0
    _close(carry, carry_r)


@pytest.mark.parametrize("time_major", [False, True])
@pytest.mark.parametrize("features", [(), (3,)])
def test_flip_sequence(time_major, features):
    """Flax's four flip_sequences tests: each row's first L_b steps reversed, the padding kept at the end."""
    seq_lengths = jnp.array([4, 2])
    x = jnp.arange(2 * 5 * int(np.prod(features))).reshape((5, 2, *features) if time_major else (2, 5, *features))
    x_tm = x if time_major else jnp.swapaxes(x, 0, 1)
    flipped = flip_sequences(x_tm, seq_lengths)  # ours is time-major
    assert flipped.shape == x_tm.shape
    np.testing.assert_array_equal(flipped[:4, 0], x_tm[:4, 0][::-1])
    np.testing.assert_array_equal(flipped[:2, 1], x_tm[:2, 1][::-1])
    from flax.linen.recurrent import flip_sequences as flax_flip

    theirs = flax_flip(x, seq_lengths, num_batch_dims=1, time_major=time_major)
    np.testing.assert_array_equal(flipped, theirs if time_major else jnp.swapaxes(theirs, 0, 1))
    np.testing.assert_array_equal(flip_sequences(flipped, seq_lengths), x_tm)  # an involution


def test_basic_seq_lengths():
    x = jnp.ones((2, 10, 6))
    lstm, variables = _linen(265, x)
    y = lstm.apply(variables, x, seq_lengths=jnp.array([5, 5]))
    assert y.shape == (2, 10, 265)
    assert np.all(np.asarray(y)[:, 5:] == 0.0)


def test_length_zero_row_keeps_its_initial_carry():
    """Difference: Flax returns the carry at index -1 (the last padded step) for a row of length 0."""
    B, T, D, H = 2, 4, 3, 5
    xs = _normal(8, (B, T, D))
    rnn, variables = _linen(H, xs, return_carry=True)
    init = (_normal(9, (B, H)), _normal(10, (B, H)))  # Flax's (c, h)
    carry, ys = rnn.apply(variables, xs, initial_carry=init, seq_lengths=jnp.array([T, 0]))
    _close(carry.c[1], init[0][1], rtol=0, atol=0)
    _close(carry.h[1], init[1][1], rtol=0, atol=0)
    assert np.all(np.asarray(ys[1]) == 0.0)


# --------------------------------------------------------------------------- linen: BidirectionalTest


def _bidirectional_ref(variables, channels_out, **kw):
    """nn.Bidirectional over two nn.RNN(OptimizedLSTMCell) holding our two directions' weights."""
    stack = jl.from_variables(variables)
    ref = nn.Bidirectional(nn.RNN(nn.OptimizedLSTMCell(channels_out)), nn.RNN(nn.OptimizedLSTMCell(channels_out)), **kw)
    params = {
        "forward_rnn": {"cell": to_flax(stack[0][0])["params"]},
        "backward_rnn": {"cell": to_flax(stack[0][1])["params"]},
    }
    return ref, {"params": params}


def test_bidirectional():
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = _normal(11, (batch_size, seq_len, channels_in))
    bidirectional = jl.LSTM(channels_out, bidirectional=True)
    ys, variables = bidirectional.init_with_output(jax.random.key(0), xs)
    assert ys.shape == (batch_size, seq_len, channels_out * 2)
    ref, ref_vars = _bidirectional_ref(variables, channels_out)
    _close(ys, ref.apply(ref_vars, xs))


def test_shared_cell():
    """One cell for both directions: our stack holds the same weights twice (tied at construction only)."""
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = _normal(12, (batch_size, seq_len, channels_in))
    cell = nn.OptimizedLSTMCell(channels_out)
    ref = nn.Bidirectional(nn.RNN(cell), nn.RNN(cell))
    ys_r, ref_vars = ref.init_with_output(jax.random.key(0), xs)
    shared = from_flax(ref_vars["params"]["forward_rnn"]["cell"])
    ys = jl.LSTM(channels_out, bidirectional=True).apply(jl.to_variables(((shared, shared),)), xs)
    assert ys.shape == (batch_size, seq_len, channels_out * 2)
    _close(ys, ys_r)


def test_custom_merge_fn():
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = _normal(13, (batch_size, seq_len, channels_in))
    bidirectional = jl.LSTM(channels_out, bidirectional=True, merge_fn=lambda x, y: x + y)
    ys, variables = bidirectional.init_with_output(jax.random.key(0), xs)
    assert ys.shape == (batch_size, seq_len, channels_out)
    ref, ref_vars = _bidirectional_ref(variables, channels_out, merge_fn=lambda x, y: x + y)
    _close(ys, ref.apply(ref_vars, xs))


def test_return_carry():
    batch_size, seq_len, channels_in, channels_out = 3, 4, 5, 6
    xs = _normal(14, (batch_size, seq_len, channels_in))
    bidirectional = jl.LSTM(channels_out, bidirectional=True, return_carry=True)
    (carry, ys), variables = bidirectional.init_with_output(jax.random.key(0), xs)
    carry_forward, carry_backward = carry
    assert ys.shape == (batch_size, seq_len, channels_out * 2)
    assert jax.tree.map(jnp.shape, carry_forward) == ((batch_size, channels_out), (batch_size, channels_out))
    assert jax.tree.map(jnp.shape, carry_backward) == ((batch_size, channels_out), (batch_size, channels_out))
    ref, ref_vars = _bidirectional_ref(variables, channels_out, return_carry=True)
    lengths = jnp.array([4, 2, 3])
    carry, _ = bidirectional.apply(variables, xs, seq_lengths=lengths)
    carry_r, _ = ref.apply(ref_vars, xs, seq_lengths=lengths)
    _close(jax.tree.leaves(carry), jax.tree.leaves(carry_r))  # ((c, h), (c, h)) leaf for leaf


# --------------------------------------------------------------------------- nnx: TestLSTMCell, through step


def _nnx(in_features=3, hidden_features=4, seed=0, **kw):
    return jn.LSTM(in_features, hidden_features, rngs=nnx.Rngs(seed), **kw)


def test_nnx_cell_basic():
    module = _nnx()
    x = jnp.ones((2, 3))
    carry = module.initialize_carry(x.shape, nnx.Rngs(0))
    new_carry, y = module.step(carry, x)
    assert y.shape == (2, 4)
    c, h = new_carry
    _close(h, y, rtol=0, atol=0)


def test_nnx_cell_lstm_sequence():
    module = _nnx()
    x = jax.random.normal(jax.random.key(1), (5, 2, 3))  # seq_len, batch, feature
    carry = module.initialize_carry(x.shape[1:], nnx.Rngs(0))
    outputs = []
    for t in range(x.shape[0]):
        carry, y = module.step(carry, x[t])
        outputs.append(y)
    outputs = jnp.stack(outputs)
    assert outputs.shape == (5, 2, 4)
    carry_seq, ys = module(x, time_major=True, return_carry=True)
    _close(outputs, ys)
    _close(carry, carry_seq)


def test_nnx_cell_with_different_dtypes():
    module = _nnx(dtype=jnp.bfloat16, param_dtype=jnp.bfloat16)
    x = jnp.ones((2, 3), dtype=jnp.bfloat16)
    carry = module.initialize_carry(x.shape, nnx.Rngs(0))
    new_carry, y = module.step(carry, x)
    assert y.dtype == jnp.bfloat16
    assert y.shape == (2, 4)
    assert module.to_params()[0][0].W.dtype == jnp.bfloat16


def test_nnx_cell_with_custom_activations():
    """Flax's relu / elu cell: our step and sequence call with the same activations and weights."""
    ref = nnx.OptimizedLSTMCell(3, 4, gate_fn=jax.nn.relu, activation_fn=jax.nn.elu, rngs=nnx.Rngs(0))
    ref.dense_h.bias[...] = _normal(15, (16,))
    module = jn.LSTM.from_params(((from_flax(nnx.state(ref)),),), gate_fn=jax.nn.relu, activation_fn=jax.nn.elu)
    x = _normal(16, (1, 3))
    carry = module.initialize_carry(x.shape, nnx.Rngs(0))
    new_carry, y = module.step(carry, x)
    assert y.shape == (1, 4)
    carry_r, y_r = ref(tuple(carry), x)
    _close(y, y_r)
    _close(new_carry, carry_r)
    xs = _normal(17, (2, 5, 3))
    ys = module(xs)
    ys_r = nnx.RNN(ref)(xs)
    _close(ys, ys_r)


def test_nnx_cell_initialize_carry():
    module = _nnx()
    carry = module.initialize_carry((1, 3), nnx.Rngs(0), carry_init=nnx.initializers.ones)
    c, h = carry
    assert jnp.all(c == 1.0) and jnp.all(h == 1.0)
    assert c.shape == h.shape == (1, 4)
    assert carry.c is c and carry.h is h


def test_nnx_cell_with_variable_sequence_length():
    module = _nnx()
    x = jnp.array(  # integers, promoted as Flax promotes them
        [
            [[1, 2, 3], [4, 5, 6], [0, 0, 0]],  # length 2
            [[7, 8, 9], [10, 11, 12], [13, 14, 15]],  # length 3
        ]
    )
    seq_lengths = jnp.array([2, 3])
    batch_size, max_seq_length = x.shape[:2]
    carry = module.initialize_carry((batch_size, 3), nnx.Rngs(0))
    outputs = []
    for t in range(max_seq_length):
        carry, y = module.step(carry, x[:, t, :])
        outputs.append(y)
    outputs = jnp.stack(outputs, axis=1)
    mask = jnp.arange(max_seq_length)[None, :] < seq_lengths[:, None]
    outputs = outputs * mask[:, :, None]
    assert outputs.shape == (2, 3, 4)
    _close(outputs, module(x, seq_lengths=seq_lengths))


def test_nnx_cell_stateful():
    module = _nnx(in_features=3, hidden_features=4)
    x1 = jnp.ones((1, 3))
    x2 = jnp.ones((1, 3)) * 2
    carry = module.initialize_carry(x1.shape, nnx.Rngs(0))
    carry, y1 = module.step(carry, x1)
    carry, y2 = module.step(carry, x2)
    assert y1.shape == y2.shape == (1, 4)
    _close(jnp.stack([y1, y2], axis=1), module(jnp.stack([x1, x2], axis=1)))


def test_nnx_cell_equivalence_with_flax_linen():
    """Our NNX step and our Linen step with the same weights; both as Flax's own cell."""
    x = jax.random.normal(jax.random.key(42), (1, 3))
    module_nnx = _nnx()
    stack = module_nnx.to_params()
    module_linen = jl.LSTM(4)
    variables = jl.to_variables(stack)
    carry = module_nnx.initialize_carry(x.shape, nnx.Rngs(0))
    carry_nnx, y_nnx = module_nnx.step(carry, x)
    carry_linen, y_linen = module_linen.apply(
        variables, module_linen.initialize_carry(jax.random.key(0), x.shape), x, method="step"
    )
    _close(y_nnx, y_linen, atol=1e-5)
    for a, b in zip(carry_nnx, carry_linen, strict=True):
        _close(a, b, atol=1e-5)
    carry_r, y_r = nn.OptimizedLSTMCell(4).apply(to_flax(stack[0][0]), tuple(carry), x)
    _close(y_nnx, y_r)
    _close(carry_nnx, carry_r)


# --------------------------------------------------------------------------- nnx: TestRNN


def _nnx_pair(seed, **kw):
    """Flax's nnx.RNN over an OptimizedLSTMCell (random bias) and our module with its weights."""
    cell = nnx.OptimizedLSTMCell(3, 4, rngs=nnx.Rngs(seed))
    cell.dense_h.bias[...] = _normal(seed, (16,))
    return nnx.RNN(cell, **kw), jn.LSTM.from_params(((from_flax(nnx.state(cell)),),), **kw)


def test_nnx_rnn_with_lstm_cell():
    rnn = _nnx(seed=0)
    x = jnp.ones((2, 5, 3))
    carry = rnn.initialize_carry((2, 3), nnx.Rngs(0))
    outputs = rnn(x, initial_carry=carry)
    assert outputs.shape == (2, 5, 4)


def test_nnx_rnn_time_major():
    ref, rnn = _nnx_pair(2, time_major=True)
    x = _normal(20, (5, 2, 3))
    carry = rnn.initialize_carry(x.shape[1:2] + x.shape[2:], nnx.Rngs(2))
    outputs = rnn(x, initial_carry=carry)
    assert outputs.shape == (5, 2, 4)
    _close(outputs, ref(x))


def test_nnx_rnn_reverse():
    ref, rnn = _nnx_pair(3, reverse=True)
    x = jnp.tile(jnp.arange(5), (2, 1)).reshape(2, 5, 1)  # distinct values to see the reversal
    x = jnp.concatenate([x, x, x], axis=-1)
    outputs = rnn(x)
    assert outputs.shape == (2, 5, 4)
    assert outputs[:, ::-1, :].shape == (2, 5, 4)
    _close(outputs, ref(x))  # in processing order, as Flax's


def test_nnx_rnn_with_seq_lengths():
    ref, rnn = _nnx_pair(4, return_carry=True)
    x = jnp.array(
        [
            [[1, 1, 1], [2, 2, 2], [3, 3, 3], [0, 0, 0], [0, 0, 0]],  # length 3
            [[4, 4, 4], [5, 5, 5], [6, 6, 6], [7, 7, 7], [8, 8, 8]],  # length 5
        ]
    )
    seq_lengths = jnp.array([3, 5])
    carry = rnn.initialize_carry((2, 3), nnx.Rngs(4))
    final_carry, outputs = rnn(x, initial_carry=carry, seq_lengths=seq_lengths)
    assert outputs.shape == (2, 5, 4)
    assert final_carry[0].shape == (2, 4)  # c
    assert final_carry[1].shape == (2, 4)  # h
    carry_r, outputs_r = ref(x, initial_carry=tuple(carry), seq_lengths=seq_lengths)
    valid = (jnp.arange(5)[None, :] < seq_lengths[:, None])[..., None]
    _close(outputs, outputs_r * valid)
    _close(final_carry, carry_r)


def test_nnx_rnn_with_keep_order():
    ref, rnn = _nnx_pair(5, reverse=True, keep_order=True)
    x = jnp.tile(jnp.arange(5), (2, 1)).reshape(2, 5, 1)
    x = jnp.concatenate([x, x, x], axis=-1)
    carry = rnn.initialize_carry((2, 3), nnx.Rngs(5))
    outputs = rnn(x, initial_carry=carry)
    assert outputs.shape == (2, 5, 4)
    _close(outputs, ref(x, initial_carry=tuple(carry)))
    _close(outputs, _nnx_pair(5, reverse=True)[1](x)[:, ::-1])  # keep_order flips processing order back


def test_nnx_rnn_equivalence_with_flax_linen():
    """Our NNX and Linen modules with the same weights give the same outputs, and Flax's."""
    x = jax.random.normal(jax.random.key(42), (2, 5, 3), jnp.float32)
    rnn_nnx = _nnx()
    rnn_linen = jl.LSTM(4)
    variables = jl.to_variables(rnn_nnx.to_params())
    carry = rnn_nnx.initialize_carry((2, 3), nnx.Rngs(0))
    outputs_nnx = rnn_nnx(x, initial_carry=carry)
    outputs_linen = rnn_linen.apply(variables, x, initial_carry=rnn_linen.initialize_carry(jax.random.key(0), (2, 3)))
    _close(outputs_nnx, outputs_linen, atol=1e-5)
    ref = nn.RNN(nn.OptimizedLSTMCell(4))
    _close(outputs_linen, ref.apply({"params": {"cell": _cell_params(variables)["params"]}}, x))


def test_nnx_rnn_with_unroll():
    ref, rnn = _nnx_pair(6, unroll=2)
    x = _normal(21, (2, 6, 3))
    carry = rnn.initialize_carry((2, 3), nnx.Rngs(6))
    outputs = rnn(x, initial_carry=carry)
    assert outputs.shape == (2, 6, 4)
    _close(outputs, ref(x))


def test_nnx_rnn_with_different_dtypes():
    rnn = _nnx(seed=8, dtype=jnp.float16, param_dtype=jnp.float16)
    x = jnp.ones((2, 5, 3), dtype=jnp.float16)
    carry = rnn.initialize_carry((2, 3), nnx.Rngs(8))
    outputs = rnn(x, initial_carry=carry)
    assert outputs.dtype == jnp.float16
    assert outputs.shape == (2, 5, 4)


def test_nnx_rnn_with_variable_batch_size():
    rnn = _nnx(seed=9)
    for batch_size in (1, 2, 5):
        x = jnp.ones((batch_size, 5, 3))
        carry = rnn.initialize_carry((batch_size, 3), nnx.Rngs(9))
        assert rnn(x, initial_carry=carry).shape == (batch_size, 5, 4)


def test_nnx_recurrent_dropout():
    """Flax's model (LSTM with recurrent dropout -> dropout -> last step -> dense) with ours as the LSTM."""

    class RNNWithRecurrentDropout(nnx.Module):
        def __init__(self, *, rngs, in_features, hidden_features=32, dropout_rate=0.5, recurrent_dropout_rate=0.25):
            self.lstm = jn.LSTM(in_features, hidden_features, recurrent_dropout=recurrent_dropout_rate, rngs=rngs)
            self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)
            self.dense = nnx.Linear(hidden_features, 1, rngs=rngs)

        def __call__(self, x):
            x = self.lstm(x)
            x = self.dropout(x)
            return self.dense(x[:, -1, :])  # the final hidden state only

    model = RNNWithRecurrentDropout(
        in_features=32, hidden_features=64, dropout_rate=0.2, recurrent_dropout_rate=0.1, rngs=nnx.Rngs(0, dropout=1)
    )
    x = jnp.ones((8, 10, 32))
    assert model.lstm.rngs.count[...] == 0
    y = model(x)
    assert y.shape == (8, 1)
    assert model.lstm.rngs.count[...] == 1  # one key per call
    assert not np.allclose(model.lstm(x), model.lstm(x))  # a new mask per call
    model.eval()
    np.testing.assert_array_equal(model.lstm(x), model.lstm(x))


# --------------------------------------------------------------------------- our additions, Flax-side


def test_gate_fn_and_activation_fn_match_flax_linen():
    """Custom activations: values and gradients (hand-written backward) against Flax's cell with the same ones."""
    B, T, D, H = 2, 4, 3, 5
    xs = _normal(30, (B, T, D), jnp.float64)
    lengths = jnp.array([4, 2])
    valid = (jnp.arange(T)[None, :] < lengths[:, None])[..., None]
    ct = _normal(31, (B, T, H), jnp.float64) * valid
    fns = dict(gate_fn=jax.nn.hard_sigmoid, activation_fn=jax.nn.soft_sign)
    rnn, variables = _linen(H, xs, return_carry=True, param_dtype=jnp.float64, **fns)
    ref = nn.RNN(nn.OptimizedLSTMCell(H, param_dtype=jnp.float64, **fns), return_carry=True)
    ref_vars = {"params": {"cell": _cell_params(variables)["params"]}}

    @jax.jit
    def run(v, v_r, xs):
        (carry, ys), pull = jax.vjp(lambda v, x: rnn.apply(v, x, seq_lengths=lengths), v, xs)
        (carry_r, ys_r), pull_r = jax.vjp(lambda v, x: ref.apply(v, x, seq_lengths=lengths), v_r, xs)
        zero = jax.tree.map(jnp.zeros_like, (carry, carry_r))
        return carry, ys, carry_r, ys_r, pull((zero[0], ct)), pull_r((zero[1], ct))

    carry, ys, carry_r, ys_r, (g_v, g_x), (g_vr, g_xr) = run(variables, ref_vars, xs)
    _close(ys, ys_r * valid, rtol=1e-12, atol=1e-12)
    _close(carry, carry_r, rtol=1e-12, atol=1e-12)
    _close(g_x, g_xr, rtol=1e-10, atol=1e-12)
    g_ours = jl.from_variables(g_v)[0][0]
    g_theirs = from_flax(g_vr["params"]["cell"])
    for a, b in zip(g_ours, g_theirs, strict=True):
        _close(a, b, rtol=1e-10, atol=1e-12)


def test_reset_carry_and_zero_resets():
    """Resets restore reset_carry, zeros by default: the same as two calls split at the reset."""
    B, T, D, H = 2, 6, 3, 4
    xs = _normal(31, (B, T, D))
    rnn, variables = _linen(H, xs, return_carry=True)
    init = LSTMState(h=_normal(32, (B, H)), c=_normal(33, (B, H)))
    reset = LSTMState(h=_normal(34, (B, H)), c=_normal(35, (B, H)))
    resets = jnp.zeros((B, T), bool).at[:, 3].set(True)

    def by_parts(after):
        """The run up to step 3 from init, then a fresh run from ``after`` over steps 3.."""
        _, head = rnn.apply(variables, xs[:, :3], initial_carry=init)
        carry, tail = rnn.apply(variables, xs[:, 3:], initial_carry=after)
        return carry, jnp.concatenate([head, tail], axis=1)

    carry, ys = rnn.apply(variables, xs, initial_carry=init, resets=resets, reset_carry=reset)
    carry_r, ys_r = by_parts(reset)
    _close(ys, ys_r, rtol=1e-12, atol=1e-12)
    _close(carry, carry_r, rtol=1e-12, atol=1e-12)
    carry, ys = rnn.apply(variables, xs, initial_carry=init, resets=resets)  # zeros by default
    carry_r, ys_r = by_parts(None)
    _close(ys, ys_r, rtol=1e-12, atol=1e-12)
    _close(carry, carry_r, rtol=1e-12, atol=1e-12)
