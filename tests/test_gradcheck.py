"""``jax-lstm gradcheck``: passes on the real rule, fails on a broken one."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from jax_lstm import bptt, gradcheck
from jax_lstm.cli import main as cli_main


def test_gradcheck_passes_and_prints_table(capsys):
    # the command's smaller grid; the full grid's cases are tests/test_bptt.py's and tests/test_semantics.py's
    assert cli_main(["gradcheck", "--quick"]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out
    for name in ("W", "U", "b", "xs", "h0", "c0", "fd", "float32", "float64"):
        assert f" {name} " in out or f"{name}  " in out


def test_gradcheck_fails_on_a_wrong_gradient(monkeypatch, capsys):
    @jax.custom_vjp
    def scaled(x):
        return x

    scaled.defvjp(lambda x: (x, None), lambda _, g: (1.001 * g,))  # a 0.1% error in every gradient

    def broken(params, xs, state0=None, **kw):
        return bptt.lstm(params, scaled(xs), state0, **kw)

    monkeypatch.setattr(gradcheck, "lstm", broken)
    assert gradcheck.main(["--quick"]) == 1
    assert "FAIL" in capsys.readouterr().out


def test_fd_error_detects_a_wrong_gradient():
    p, xs, s0 = gradcheck.random_problem(0, 3, 2, 3, 4)
    assert gradcheck.fd_error(p, xs, s0) < 1e-6
    assert jnp.isfinite(gradcheck.fd_error(p, xs, s0, seq_lengths=jnp.array([3, 0], jnp.int32)))
