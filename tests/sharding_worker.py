"""Run ``lstm``, ``lstm_ref`` and ``lstm_stack`` sharded over 4 host devices and compare with one device.

Used by tests/test_sharding.py in a fresh process, since XLA_FLAGS (the number of
forced host devices) must be set before JAX starts. Every case runs forward and
gradient (random cotangents on hs and the final h and c) and is compared in
float64 with the same call on unsharded inputs. Prints one JSON line:
``{case: {"ok": bool, "err": float or None, "error": str or None, "seconds": float}}``.

Usage:
  XLA_FLAGS=--xla_force_host_platform_device_count=4 python tests/sharding_worker.py [CASE ...]
"""

from __future__ import annotations

import json
import sys
import time
import traceback

FNS = ("lstm", "lstm_ref", "stack")
TOL = 1e-12


def _names() -> list[str]:
    """Every function with and without state0, with and without mask/resets/lengths, in each setting."""
    layer_combos = [("none", "plain"), ("state0", "masked"), ("none", "masked"), ("state0", "plain")]
    names = []
    # shard_map (check_vma=True): the batch axis split over the mesh; gradient taken inside the shard_map
    names += [f"shard_map-lstm-{s}-{o}" for s, o in layer_combos]
    names += [f"shard_map-{fn}-{s}-{o}" for fn in ("lstm_ref", "stack") for s, o in layer_combos[:2]]
    # shard_map, gradient of a loss of the shard_map-ped function (its transpose sums the params' gradient)
    names.append("shard_map_outer_grad-lstm-none-masked")
    names.append("shard_map_auto_mesh-lstm-state0-masked")  # the Auto-axis mesh of jax_lstm.parallel
    # jit with batch-sharded inputs on an Explicit mesh, time-major and batch-major layouts
    names += [
        f"explicit-lstm-{layout}-{s}-{o}" for layout in ("time_major", "batch_major") for s, o in layer_combos[:2]
    ]
    names += [f"explicit-{fn}-time_major-none-plain" for fn in ("lstm_ref", "stack")]
    names += [f"explicit-{fn}-batch_major-state0-masked" for fn in ("lstm_ref", "stack")]
    names += [f"explicit-{fn}-time_major-state0-dropout" for fn in ("lstm", "stack")]
    names += ["explicit_default_mesh-lstm-time_major-state0-masked"]
    # the same under ``with jax.set_mesh(mesh)``, where arrays made inside the call are placed on the mesh
    names += ["explicit_set_mesh-lstm-batch_major-none-masked", "explicit_set_mesh-lstm_ref-time_major-state0-plain"]
    names += ["data_parallel_train_step-default_make_mesh"]
    return names


CASES = _names()


def main(selected: list[str]) -> None:  # noqa: C901 (one flat list of cases)
    import jax

    jax.config.update("jax_enable_x64", True)
    jax.config.update("jax_numpy_rank_promotion", "raise")
    import jax.numpy as jnp
    import numpy as np
    import optax
    from jax.sharding import AxisType, NamedSharding
    from jax.sharding import PartitionSpec as P

    from jax_lstm import LSTMParams, LSTMState, init_stack, lstm, lstm_ref, lstm_stack, parallel

    assert len(jax.devices()) == 4, jax.devices()
    T, B, D, H = 4, 8, 2, 3
    rng = np.random.default_rng(0)
    params = LSTMParams(*(jnp.asarray(rng.normal(scale=0.6, size=s)) for s in ((H, 4 * H), (D, 4 * H), (4 * H,))))
    stack = init_stack(jax.random.PRNGKey(1), D, [H], bidirectional=True, dtype=jnp.float64)
    xs = jnp.asarray(rng.normal(size=(T, B, D)))
    mask = jnp.asarray(rng.random((T, B)) < 0.7).at[:, 1].set(False)
    resets = jnp.asarray(rng.random((T, B)) < 0.3)
    lengths = jnp.asarray(rng.integers(0, T + 1, size=B)).at[0].set(0).at[2].set(T)
    key = jax.random.PRNGKey(7)

    def rand_state(h):
        return LSTMState(jnp.asarray(rng.normal(size=(B, h))), jnp.asarray(rng.normal(size=(B, h))))

    s0_layer = rand_state(H)
    s0_stack = ((rand_state(H), rand_state(H)),)

    def pick(fn_name):
        if fn_name == "stack":
            return stack, s0_stack, lambda p, x, s, **kw: lstm_stack(p, x, s, **kw)
        fn = {"lstm": lstm, "lstm_ref": lstm_ref}[fn_name]
        return params, s0_layer, lambda p, x, s, **kw: fn(p, x, s, **kw)

    def options(opts, m, r, n):
        kw = {}
        if opts in ("masked", "dropout"):
            kw.update(mask=m, resets=r, seq_lengths=n)
        if opts == "dropout":
            kw.update(recurrent_dropout=0.25, key=key)
        return kw

    def cotangents(out):
        ct_rng = np.random.default_rng(3)
        return jax.tree.map(lambda a: jnp.asarray(ct_rng.normal(size=a.shape)), out)

    def loss(out, ct):
        return sum(jnp.sum(a * c) for a, c in zip(jax.tree.leaves(out), jax.tree.leaves(ct), strict=True))

    reference_cache = {}

    def reference(fn_name, state0, opts):
        """Unsharded time-major forward and gradients (params, xs, state0)."""
        k = (fn_name, state0, opts)
        if k not in reference_cache:
            p, s0, f = pick(fn_name)
            s0 = s0 if state0 == "state0" else None
            kw = options(opts, mask, resets, lengths)
            ct = cotangents(jax.eval_shape(lambda p_, x_, s_: f(p_, x_, s_, **kw), p, xs, s0))

            def whole(p_, x_, s_):
                def scalar(a, b, c):
                    out = f(a, b, c, **kw)
                    return loss(out, ct), out

                return jax.value_and_grad(scalar, argnums=(0, 1, 2), has_aux=True)(p_, x_, s_)

            (_, out), g = jax.jit(whole)(p, xs, s0)
            reference_cache[k] = (out, ct, g)
        return reference_cache[k]

    def max_rel(got, want):
        errs = []
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
            a, b = np.asarray(a), np.asarray(b)
            assert a.shape == b.shape and a.dtype == b.dtype, (a.shape, b.shape, a.dtype, b.dtype)
            errs.append(float(np.max(np.abs(a - b)) / max(float(np.max(np.abs(b))), 1e-300)) if a.size else 0.0)
        assert len(errs) == len(jax.tree.leaves(want)) and errs
        return max(errs)

    explicit = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Explicit,))
    default = jax.make_mesh((4,), ("data",))
    auto = parallel.make_mesh(4)
    assert default.axis_types == (AxisType.Explicit,), default.axis_types

    spec_tb, spec_b, spec_bt = P(None, "data"), P("data"), P("data", None)

    def run_shard_map(mesh, fn_name, state0, opts, outer):
        p, s0, f = pick(fn_name)
        out_r, ct, g_r = reference(fn_name, state0, opts)
        with_state = state0 == "state0"
        s_in = s0 if with_state else jax.tree.map(jnp.zeros_like, s0)  # a placeholder, unused without state0

        def local_out(p_, x_, s_, m_, r_, n_):
            return f(p_, x_, s_ if with_state else None, **options(opts, m_, r_, n_))

        specs = (P(), spec_tb, spec_bt, spec_tb, spec_tb, spec_b)
        out_specs = (spec_tb, spec_bt)
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
        p_in, x_in = jax.tree.map(lambda a: put(a, P()), p), put(xs, spec_tb)
        s_in = jax.tree.map(lambda a: put(a, spec_bt), s_in)
        rest_in = (put(mask, spec_tb), put(resets, spec_tb), put(lengths, spec_b))
        if outer:
            sm = jax.shard_map(local_out, mesh=mesh, in_specs=specs, out_specs=out_specs)

            def whole(p_, x_, s_):
                out = sm(p_, x_, s_, *rest_in)
                return loss(out, ct), out

            (_, out), g = jax.jit(jax.value_and_grad(whole, argnums=(0, 1, 2), has_aux=True))(p_in, x_in, s_in)
        else:

            def local(p_, x_, s_, m_, r_, n_, ct_):
                # the params enter unvarying, so their gradient comes out summed over the devices already
                out = local_out(p_, x_, s_, m_, r_, n_)
                g = jax.grad(lambda a, b, c: loss(local_out(a, b, c, m_, r_, n_), ct_), argnums=(0, 1, 2))(p_, x_, s_)
                return out, g

            sm = jax.shard_map(
                local, mesh=mesh, in_specs=(*specs, (spec_tb, spec_bt)), out_specs=(out_specs, (P(), spec_tb, spec_bt))
            )
            ct_in = (put(ct[0], spec_tb), jax.tree.map(lambda a: put(a, spec_bt), ct[1]))
            out, g = jax.jit(sm)(p_in, x_in, s_in, *rest_in, ct_in)
        if not with_state:
            g = (g[0], g[1], None)
        return max(max_rel(out, out_r), max_rel(g, g_r))

    def run_explicit(mesh, fn_name, layout, state0, opts, set_mesh=False):
        p, s0, f = pick(fn_name)
        out_r, ct, g_r = reference(fn_name, state0, opts)
        tm = layout == "time_major"
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))  # noqa: E731
        swap = (lambda a: a) if tm else (lambda a: jnp.swapaxes(a, 0, 1))
        step_spec = spec_tb if tm else spec_bt
        x_in = put(swap(xs), P(None, "data", None) if tm else P("data", None, None))
        m_in, r_in, n_in = put(swap(mask), step_spec), put(swap(resets), step_spec), put(lengths, spec_b)
        s_in = jax.tree.map(lambda a: put(a, spec_bt), s0) if state0 == "state0" else None
        p_in = jax.tree.map(lambda a: put(a, P()), p)
        ct_in = (put(swap(ct[0]), P(None, "data", None) if tm else P("data", None, None)),)
        ct_in += (jax.tree.map(lambda a: put(a, spec_bt), ct[1]),)
        k_in = put(key, P())

        def whole(p_, x_, s_, m_, r_, n_, k_, ct_):
            kw = options(opts, m_, r_, n_)
            if "key" in kw:
                kw["key"] = k_
            out = f(p_, x_, s_, time_major=tm, **kw)
            return loss(out, ct_), out

        run = jax.jit(jax.value_and_grad(whole, argnums=(0, 1, 2), has_aux=True))
        if set_mesh:
            with jax.set_mesh(mesh):
                (_, out), g = run(p_in, x_in, s_in, m_in, r_in, n_in, k_in, ct_in)
        else:
            (_, out), g = run(p_in, x_in, s_in, m_in, r_in, n_in, k_in, ct_in)
        out = (swap(out[0]), out[1])
        g = (g[0], swap(g[1]), g[2])
        return max(max_rel(out, out_r), max_rel(g, g_r))

    def run_train_step(mesh):
        """jax_lstm.parallel.data_parallel on ``mesh`` for 3 Adam steps equals the same steps on one device."""
        opt = optax.adam(0.05)
        w_out = jnp.asarray(rng.normal(size=(H, 1)))
        n_steps = 3
        batch = {
            "x": np.asarray(rng.normal(size=(B, T, D))),
            "y": np.asarray(rng.normal(size=(B, T, 1))),
            "mask": np.asarray(rng.random((B, T)) < 0.8),
            "resets": np.asarray(rng.random((B, T)) < 0.2),
        }
        batches = [batch] * n_steps

        def step(p, opt_state, batch):
            def f(p_):
                hs, _ = lstm(p_, batch["x"], mask=batch["mask"], resets=batch["resets"], time_major=False)
                err = (hs @ w_out - batch["y"]) * batch["mask"][..., None]
                return jnp.sum(err * err) / B

            value, grads = jax.value_and_grad(f)(p)
            updates, opt_state = opt.update(grads, opt_state, p)
            return optax.apply_updates(p, updates), opt_state, {"loss": value}

        def train(run, place, p, s):
            losses = []
            for batch in batches:
                p, s, m = run(p, s, place(batch))
                losses.append(float(np.asarray(m["loss"])))
            return p, losses

        p1, l1 = train(jax.jit(step), lambda b: b, params, opt.init(params))
        run = parallel.data_parallel(step, mesh, donate=False)
        p_rep, s_rep = parallel.replicate(mesh, params), parallel.replicate(mesh, opt.init(params))
        p4, l4 = train(run, lambda b: parallel.shard_batch(mesh, b), p_rep, s_rep)
        assert l1[-1] < l1[0], l1
        return max(max_rel(parallel.to_host(p4), p1), max_rel(np.asarray(l4), np.asarray(l1)))

    results = {}
    for name in selected:
        t0 = time.perf_counter()
        try:
            kind, fn_name, *rest = name.split("-")
            if kind == "shard_map":
                err = run_shard_map(explicit, fn_name, rest[0], rest[1], outer=False)
            elif kind == "shard_map_outer_grad":
                err = run_shard_map(explicit, fn_name, rest[0], rest[1], outer=True)
            elif kind == "shard_map_auto_mesh":
                err = run_shard_map(auto, fn_name, rest[0], rest[1], outer=False)
            elif kind == "explicit":
                err = run_explicit(explicit, fn_name, *rest)
            elif kind == "explicit_default_mesh":
                err = run_explicit(default, fn_name, *rest)
            elif kind == "explicit_set_mesh":
                err = run_explicit(explicit, fn_name, *rest, set_mesh=True)
            elif kind == "data_parallel_train_step":
                err = run_train_step(explicit if fn_name == "explicit_mesh" else default)
            else:
                raise ValueError(f"unknown case {name}")
            results[name] = {"ok": err <= TOL, "err": err, "error": None}
        except Exception as e:  # noqa: BLE001 (every failure is reported, per case)
            tb = traceback.format_exc().strip().splitlines()
            results[name] = {"ok": False, "err": None, "error": f"{type(e).__name__}: {e}"[:1500], "where": tb[-6:]}
        results[name]["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(results))


if __name__ == "__main__":
    main(sys.argv[1:] or CASES)
