# %% [markdown]
# # Manual vs autodiff: the LSTM's backpropagation through time, rule by rule
#
# `jax_lstm.lstm` computes its gradient with a hand-written backward pass (BPTT, a `jax.custom_vjp`);
# `jax_lstm.lstm_ref` is a plain `lax.scan` over `jax_lstm.lstm_cell` differentiated by JAX. This notebook
#
# 1. recalls the forward equations and how the parameters are laid out;
# 2. turns every backward rule of the seed document (δ1…δ26, the LSTM-units page of the R package `rnn`)
#    into code for one time step, checks it against `jax.vjp` of `lstm_cell`, and lists the rules the seed
#    gets wrong, with the measured error of each literal rule;
# 3. compares the whole-sequence gradients of `lstm` and `lstm_ref` for every input, in float32 and float64,
#    and against finite differences;
# 4. goes beyond the seed: derives the extra terms of the rules for step masks, state resets and recurrent
#    dropout, checks them against autodiff, and shows what they do to the Jacobian d hs / d xs;
# 5. shows what BPTT does over time: how dL/dh_t and dL/dc_t shrink or grow going back in time;
# 6. measures speed and compiled memory of a manual and an autodiff train step;
# 7. trains a small model with both gradients and gets the same loss curve.
#
# The notebook imports `jax_lstm` and never re-implements its forward math; the only LSTM algebra written
# here is the seed's list of backward rules in section 2, since that list is what is being checked.
#
# Setting the environment variable `JAX_LSTM_NB_FAST=1` runs the same code on smaller shapes (the test suite
# does this); the stored outputs come from a full run.

# %%
import functools
import os
import time
from collections.abc import Callable
from typing import NamedTuple

import jax

jax.config.update("jax_enable_x64", True)  # float64 is used for every exact comparison below

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
import optax
from IPython.display import Markdown, display

import jax_lstm as jl
from jax_lstm import LSTMParams, LSTMState
from jax_lstm.cell import preactivations, split_gates

FAST = os.environ.get("JAX_LSTM_NB_FAST") == "1"
F32, F64 = jnp.float32, jnp.float64
GATES = ("f", "i", "g", "o")
print("jax", jax.__version__, "| backend", jax.default_backend(), "| fast mode" if FAST else "| full run")


def max_abs(a, b) -> float:
    """max |a - b| over all entries, computed in float64."""
    return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64)), initial=0.0))


def max_rel(a, b) -> float:
    """max |a - b| / max |b|: the error relative to the size of the reference b."""
    return max_abs(a, b) / max(float(np.max(np.abs(np.asarray(b, np.float64)), initial=0.0)), 1e-300)


def md_table(header, rows) -> Markdown:
    """A list of rows as a Markdown table."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return Markdown("\n".join(lines))


# %% [markdown]
# ## 1. Forward equations and parameter layout
#
# Row-vector convention, as in the seed: `W` multiplies the previous hidden state, `U` the input. The four
# gates share one matrix product, their blocks side by side in the order **f, i, g, o**:
#
# $$z_t = h_{t-1} W + x_t U + b \qquad (B \times 4H)$$
# $$f_t = \sigma(z_f),\quad i_t = \sigma(z_i),\quad g_t = \tanh(z_g),\quad o_t = \sigma(z_o)$$
# $$c_t = c_{t-1} \odot f_t + i_t \odot g_t, \qquad h_t = \tanh(c_t) \odot o_t$$
#
# Shapes: `W` (H, 4H), `U` (D, 4H), `b` (4H,), `x_t` (B, D), `h_t` and `c_t` (B, H). The seed writes the same
# equations without a bias; `init_params` sets the forget block of `b` to `forget_bias` (1.0 by default) and
# the rest to zero, so a fresh cell starts out remembering.

# %%
demo = jl.init_params(jax.random.PRNGKey(0), input_size=3, hidden_size=4, forget_bias=1.0, dtype=F64)
print({name: (a.shape, str(a.dtype)) for name, a in demo._asdict().items()})

fig, axes = plt.subplots(3, 1, figsize=(7, 5), gridspec_kw={"height_ratios": [4, 3, 1]}, layout="constrained")
H = demo.W.shape[0]
for ax, (name, a) in zip(
    axes,
    [("W  (H, 4H): multiplies h_{t-1}", demo.W), ("U  (D, 4H): multiplies x_t", demo.U), ("b  (4H,)", demo.b[None, :])],
    strict=True,
):
    im = ax.imshow(np.asarray(a), cmap="RdBu_r", vmin=-1.2, vmax=1.2, aspect="auto")
    for k in range(1, 4):
        ax.axvline(k * H - 0.5, color="k", lw=2)
    ax.set_yticks([])
    ax.set_xticks([k * H + (H - 1) / 2 for k in range(4)], [f"{gate} block" for gate in GATES])
    ax.set_title(name, fontsize=9, loc="left")
fig.colorbar(im, ax=axes, shrink=0.8)
plt.show()

# %% [markdown]
# Every gate's block is the same column range in `W`, `U` and `b`; `jax_lstm.cell.split_gates` cuts any
# (..., 4H) array into its f, i, g, o parts. One step of the cell has `lax.scan`'s body signature:

# %%
state = jl.zeros_state(batch_size=2, hidden_size=4, dtype=F64)
x_t = jnp.ones((2, 3), F64)
new_state, h_t = jl.lstm_cell(demo, state, x_t)
print("h_t", h_t.shape, h_t.dtype, "| c_t", new_state.c.shape, "| W_f", split_gates(demo.W)[0].shape)

# %% [markdown]
# ## 2. The seed's rules δ1…δ26, one time step
#
# The seed back-propagates one step as follows. Given three incoming errors,
#
# * δ1 = dL/dh_t from the layer above (here: the cell's output `h_t`),
# * δ2 = dL/dh_t from the future (the next step's δ25),
# * δ4 = dL/dc_t from the future (the next step's δ11),
#
# it computes the errors of every intermediate quantity, then δ11 = dL/dc_{t-1} and δ25 = dL/dh_{t-1} for the
# previous step, δ26 = dL/dx_t for the layer below, and the weight gradients. Its numbering follows a picture of
# the cell in which δk is the error at node k: node 5 is tanh(c_t), 6 is o_t, 9 is g_t, 10 is i_t, 11 is c_{t-1}
# and 12 is f_t. In `δ7 = δ5 · f'(5)` the seed means the derivative of the function that produced node 5.
#
# **What autodiff says each δ must be.** With random δ1, δ2, δ4 as cotangents, `jax.vjp` of `lstm_cell` gives
# the gradients at the cell's inputs: W, U, b, h_{t-1} (δ25), c_{t-1} (δ11) and x_t (δ26). The other δs
# are gradients at quantities inside the cell, and we reach them from autodiff too:
#
# * the pre-activation error dL/dz_t (δ13…δ16): run `lstm_cell` row by row under `jax.vmap`, each row with its
#   own copy of `b`; the gradient of row r's bias is row r of dL/dz_t;
# * the share of one gate in dL/dx_t (δ17, δ19, δ21, δ23) or in dL/dh_{t-1} (δ18, δ20, δ22, δ24): run the cell
#   with `U` (or `W`) zero outside that gate's block and feed the other blocks' `x_t U` (or `h_{t-1} W`) in
#   through the per-row bias as a constant; the forward pass is unchanged and the input gradient is that gate's
#   share;
# * dL/dc_t (δ8): c_{t-1} enters only through c_t = c_{t-1}·f_t + …, so δ8 = (dL/dc_{t-1}) / f_t; δ7, the part
#   that comes through h_t, is the same with δ4 = 0;
# * the errors of the activations (δ6, δ9, δ10, δ12) and of tanh(c_t) (δ5) follow from those by dividing by the
#   activation's derivative, taken with `jax.grad` of `jax.nn.sigmoid` / `jnp.tanh` at the pre-activation.
#
# We use D = H so that every literal rule can be evaluated at all (see δ23).

# %%
B, D, H = 5, 4, 4
keys = jax.random.split(jax.random.PRNGKey(42), 10)
params = jl.init_params(keys[0], D, H, dtype=F64)
# move the parameters away from their initial values so that every gate is exercised
params = LSTMParams(*(a + 0.5 * jax.random.normal(k, a.shape, F64) for a, k in zip(params, keys[1:4], strict=True)))
x = jax.random.normal(keys[4], (B, D), F64)
h_prev = jax.random.normal(keys[5], (B, H), F64)
c_prev = jax.random.normal(keys[6], (B, H), F64)
d1, d2, d4 = (jax.random.normal(k, (B, H), F64) for k in keys[7:10])
state_prev = LSTMState(h_prev, c_prev)

# the forward values of this step, from the library: gates f, i, g, o and c_t (lstm_trace), pre-activations z_t
trace = jl.lstm_trace(params, x[None], state_prev)
f, i, g, o, c = (a[0] for a in (trace.f, trace.i, trace.g, trace.o, trace.c))
z_f, z_i, z_g, z_o = split_gates(preactivations(params, h_prev, x, F64))
W_f, W_i, W_g, W_o = split_gates(params.W)
U_f, U_i, U_g, U_o = split_gates(params.U)

# derivative *functions* of the activations, by autodiff: sigmoid'(u) and tanh'(u) at any u
sigmoid_prime = jnp.vectorize(jax.grad(jax.nn.sigmoid))
tanh_prime = jnp.vectorize(jax.grad(jnp.tanh))

# %% [markdown]
# The reference values, all from `jax.vjp` of `lstm_cell`:

# %%
cotangent = (LSTMState(d2, d4), d1)  # on (new state (h_t, c_t), output h_t)
(_, _), cell_vjp = jax.vjp(jl.lstm_cell, params, state_prev, x)
g_params, g_state, g_x = cell_vjp(cotangent)


def cell_rows(W, U, b_rows, h_prev, c_prev, x):
    """lstm_cell on each batch row separately, row r with its own bias b_rows[r] (4H,); outputs as lstm_cell's."""

    def one(b_r, h_r, c_r, x_r):
        new, y = jl.lstm_cell(LSTMParams(W, U, b_r), LSTMState(h_r[None], c_r[None]), x_r[None])
        return LSTMState(new.h[0], new.c[0]), y[0]

    return jax.vmap(one)(b_rows, h_prev, c_prev, x)


b_rows = jnp.broadcast_to(params.b, (B, 4 * H))
dz = jax.vjp(lambda b_r: cell_rows(params.W, params.U, b_r, h_prev, c_prev, x), b_rows)[1](cotangent)[0]
dz_f, dz_i, dz_g, dz_o = split_gates(dz)


def gate_share(gate: int, wrt: str):
    """One gate's share of dL/dx_t (wrt="x") or of dL/dh_{t-1} (wrt="h"), by autodiff of lstm_cell."""
    keep = (jnp.arange(4 * H) // H == gate)[None, :]  # (1, 4H): the columns of this gate's block
    if wrt == "x":
        U_only = jnp.where(keep, params.U, 0.0)
        bias = params.b[None, :] + x @ (params.U - U_only)  # the other blocks' x_t U, as a constant
        return jax.vjp(lambda x_: cell_rows(params.W, U_only, bias, h_prev, c_prev, x_), x)[1](cotangent)[0]
    W_only = jnp.where(keep, params.W, 0.0)
    bias = params.b[None, :] + h_prev @ (params.W - W_only)
    return jax.vjp(lambda h_: cell_rows(W_only, params.U, bias, h_, c_prev, x), h_prev)[1](cotangent)[0]


# δ7 is dL/dc_t through h_t only: the same VJP with no error coming from the future cell (δ4 = 0)
g_state_no_d4 = cell_vjp((LSTMState(d2, jnp.zeros_like(d4)), d1))[1]
dW, dU = split_gates(g_params.W), split_gates(g_params.U)

ref = {1: d1, 2: d2, 4: d4}
ref[3] = d1 + d2  # dL/dh_t: h_t is both the output and the next state, so its two cotangents add
ref[8] = g_state.c / f  # dL/dc_t
ref[7] = g_state_no_d4.c / f  # dL/dc_t through h_t only
ref[5] = ref[7] / tanh_prime(c)  # dL/dtanh(c_t)
ref[6] = dz_o / sigmoid_prime(z_o)  # dL/do_t
ref[9] = dz_g / tanh_prime(z_g)  # dL/dg_t
ref[10] = dz_i / sigmoid_prime(z_i)  # dL/di_t
ref[11] = g_state.c  # dL/dc_{t-1}
ref[12] = dz_f / sigmoid_prime(z_f)  # dL/df_t
ref[13], ref[14], ref[15], ref[16] = dz_o, dz_g, dz_i, dz_f  # dL/dz for the o, g, i, f blocks
ref[17], ref[19], ref[21], ref[23] = (gate_share(k, "x") for k in (3, 2, 1, 0))  # shares of dL/dx_t
ref[18], ref[20], ref[22], ref[24] = (gate_share(k, "h") for k in (3, 2, 1, 0))  # shares of dL/dh_{t-1}
ref[25] = g_state.h  # dL/dh_{t-1}
ref[26] = g_x  # dL/dx_t
ref.update({f"W_{n}": w for n, w in zip(GATES, dW, strict=True)})
ref.update({f"U_{n}": u for n, u in zip(GATES, dU, strict=True)})
ref["b"] = g_params.b

# δ3 as autodiff sees it: δ1 on the output plus δ2 on the state is the same as δ3 on the state alone
alt = cell_vjp((LSTMState(d1 + d2, d4), jnp.zeros_like(d1)))
print(
    "δ3 check, max |difference| over all gradients:",
    max(max_abs(a, b) for a, b in zip(jax.tree.leaves(alt), jax.tree.leaves((g_params, g_state, g_x)), strict=True)),
)
print(
    "the per-gate shares add up to the input gradients:",
    max_abs(ref[17] + ref[19] + ref[21] + ref[23], g_x),
    max_abs(ref[18] + ref[20] + ref[22] + ref[24], g_state.h),
)

# %% [markdown]
# ### The rules as code
#
# Each rule below is written twice: `seed`, exactly as the seed writes it, and `fix`, the correct form (the same
# function when the seed is right). `d` holds the δs computed so far. The seed's `*` is a matrix product and `·`
# an element-wise product; rows are batch entries, so `δ13 * U_o^T` is `d[13] @ U_o.T`.
#
# The literal reading of `tanh'(tanh(c_t))` and `sigmoid'(o_t)` applies the derivative function to the
# activation: `tanh_prime(jnp.tanh(c))`, `sigmoid_prime(o)`.


# %%
class Rule(NamedTuple):
    name: int | str  # the δ number, or the weight a gradient rule is for
    seed_text: str  # the rule as the seed writes it
    fix_text: str  # the correct form
    seed: Callable  # the seed's rule as code: d -> value
    fix: Callable  # the correct rule as code


RULES: list[Rule] = []


def rule(name, seed_text, fix_text, seed, fix=None):
    """Add a rule; ``fix_text=None`` and ``fix=None`` mean the seed's rule is kept as it is."""
    RULES.append(Rule(name, seed_text, fix_text or seed_text, seed, fix or seed))


rule(3, "δ1 + δ2", None, lambda d: d[1] + d[2])
rule(5, "δ3 · o_t", None, lambda d: d[3] * o)
rule(6, "δ3 · tanh(c_t)", None, lambda d: d[3] * jnp.tanh(c))
rule(
    7,
    "δ5 · tanh'(tanh(c_t))",
    "δ5 · (1 − tanh²(c_t))",
    lambda d: d[5] * tanh_prime(jnp.tanh(c)),
    lambda d: d[5] * (1 - jnp.tanh(c) ** 2),
)
rule(8, "δ7 · δ4", "δ7 + δ4", lambda d: d[7] * d[4], lambda d: d[7] + d[4])
rule(9, "δ8 · i_t", None, lambda d: d[8] * i)
rule(10, "δ8 · g_t", None, lambda d: d[8] * g)
rule(11, "δ8 · f_t", None, lambda d: d[8] * f)
rule(12, "δ8 · c_{t-1}", None, lambda d: d[8] * c_prev)
rule(13, "δ6 · sigmoid'(o_t)", "δ6 · o_t(1 − o_t)", lambda d: d[6] * sigmoid_prime(o), lambda d: d[6] * o * (1 - o))
rule(14, "δ9 · tanh'(g_t)", "δ9 · (1 − g_t²)", lambda d: d[9] * tanh_prime(g), lambda d: d[9] * (1 - g**2))
rule(15, "δ10 · sigmoid'(i_t)", "δ10 · i_t(1 − i_t)", lambda d: d[10] * sigmoid_prime(i), lambda d: d[10] * i * (1 - i))
rule(16, "δ12 · sigmoid'(f_t)", "δ12 · f_t(1 − f_t)", lambda d: d[12] * sigmoid_prime(f), lambda d: d[12] * f * (1 - f))
rule(17, "δ13 * U_o^T", None, lambda d: d[13] @ U_o.T)
rule(19, "δ14 * U_g^T", None, lambda d: d[14] @ U_g.T)
rule(21, "δ15 * U_i^T", None, lambda d: d[15] @ U_i.T)
rule(23, "δ16 * W_f^T", "δ16 * U_f^T", lambda d: d[16] @ W_f.T, lambda d: d[16] @ U_f.T)
rule(18, "δ13 * W_o^T", None, lambda d: d[13] @ W_o.T)
rule(20, "δ14 * W_g^T", None, lambda d: d[14] @ W_g.T)
rule(22, "δ16 * W_i^T", "δ15 * W_i^T", lambda d: d[16] @ W_i.T, lambda d: d[15] @ W_i.T)
rule(24, "δ16 * W_f^T", None, lambda d: d[16] @ W_f.T)
rule(25, "δ18 + δ20 + δ22 + δ24", None, lambda d: d[18] + d[20] + d[22] + d[24])
rule(26, "δ17 + δ19 + δ21 + δ23", None, lambda d: d[17] + d[19] + d[21] + d[23])
for gate, k in zip(GATES, (16, 15, 14, 13), strict=True):  # δW_f += h_{t-1}^T * δ16, δU_f += x_t^T * δ16, ...
    rule(f"W_{gate}", f"δW_{gate} + h_(t-1)^T * δ{k}", None, lambda d, k=k: h_prev.T @ d[k])
    rule(f"U_{gate}", f"δU_{gate} + x_t^T * δ{k}", None, lambda d, k=k: x.T @ d[k])
rule(
    "b",
    "(no bias)",
    "Σ_batch [δ16 δ15 δ14 δ13]",
    lambda d: jnp.zeros_like(params.b),
    lambda d: jnp.concatenate([d[16], d[15], d[14], d[13]], axis=-1).sum(axis=0),
)


def run_rules(version: str) -> dict:
    """Every rule in the seed's order, starting from δ1, δ2, δ4 alone; version "seed" or "fix"."""
    d = {1: d1, 2: d2, 4: d4}
    for r in RULES:
        d[r.name] = getattr(r, version)(d)
    return d


seed_chain, fixed_chain = run_rules("seed"), run_rules("fix")

# %% [markdown]
# Three errors per rule, each the max absolute difference from the autodiff value (entries are O(1), the
# last column gives the scale):
#
# * **seed rule alone**: the seed's rule applied to the correct δs it depends on: is the rule itself right?
# * **seed list end to end**: the seed's whole list run from δ1, δ2, δ4: what an implementation of the list
#   computes, errors of earlier rules included;
# * **fixed**: the corrected list run end to end.

# %%
rows, wrong = [], []
for name, seed_text, fix_text, seed, _ in RULES:
    own = max_abs(seed(ref), ref[name])
    chained = max_abs(seed_chain[name], ref[name])
    fixed = max_abs(fixed_chain[name], ref[name])
    right = own < 1e-10  # the references carry rounding errors up to ~1e-13 (they divide by small derivatives)
    if not right:
        wrong.append(name)
    scale = float(jnp.max(jnp.abs(ref[name])))
    rows.append(
        [
            f"δ{name}" if right else f"**δ{name}**",
            f"`{seed_text}`",
            f"`{fix_text}`",
            "yes" if right else "**no**",
            f"{own:.1e}",
            f"{chained:.1e}",
            f"{fixed:.1e}",
            f"{scale:.2f}",
        ]
    )

display(
    md_table(
        [
            "rule",
            "seed",
            "correct",
            "seed right?",
            "seed rule alone",
            "seed list end to end",
            "fixed",
            "max abs(autodiff)",
        ],
        [["δ1, δ2, δ4", "inputs", "random cotangents on h_t, h_t, c_t", "", "", "", "", ""]] + rows,
    )
)
wrong = sorted(n for n in wrong if isinstance(n, int)) + [n for n in wrong if not isinstance(n, int)]
print("rules the seed gets wrong:", ", ".join(f"δ{n}" for n in wrong))
assert max(max_abs(fixed_chain[r.name], ref[r.name]) for r in RULES) < 1e-12, "a fixed rule disagrees with autodiff"

# %% [markdown]
# ### Why those rules are wrong
#
# * **δ7 and δ13–δ16: the derivative of the activation is taken at the wrong point.** By the chain rule,
#   dL/dc_t through h_t is δ5 · tanh'(c_t), with tanh' evaluated at the *input* of the tanh; likewise
#   dL/dz_o = δ6 · sigmoid'(z_o). The seed's general form, δ7 = δ5 · f'(5) ("the derivative of the function
#   that made node 5"), is fine if f' is written through the node's value y: tanh' = 1 − y², sigmoid' =
#   y(1 − y). But the seed then spells it out as tanh'(tanh(c_t)) and sigmoid'(o_t), which, read as written,
#   put the activation's *output* into the derivative: 1 − tanh²(tanh(c_t)) applies tanh twice. Read that
#   way, the five rules are off by as much as the gradient itself (table above); read with the
#   output convention they are right (next cell).
# * **δ8: a product where a sum belongs.** c_t reaches the loss along two paths, through h_t (δ7) and
#   through c_{t+1} (δ4); the errors of the two paths add: δ8 = δ7 + δ4. The seed's δ7 · δ4 is a different
#   quantity altogether (it is even zero at the last step, where δ4 = 0), and every rule after it inherits
#   the error: in the end-to-end column, all of δ9…δ26 and the weight gradients are wrong.
# * **δ22: the wrong gate's error.** The input gate's share of dL/dh_{t-1} is δ15 · W_i^T, the input gate's
#   pre-activation error times its own weights; the seed multiplies the *forget* gate's δ16 by W_i^T. δ25
#   (dL/dh_{t-1}, passed to the previous step as its δ2) is wrong with it.
# * **δ23: the wrong matrix.** The forget gate's share of dL/dx_t goes through the input weights U_f, as for
#   the three other gates (δ17, δ19, δ21); the seed writes W_f^T, copying δ24. With D ≠ H the literal rule
#   does not even have the right shape; here D = H, so it evaluates, to the wrong numbers. δ26
#   (dL/dx_t, passed to the layer below) is wrong with it.
# * **No bias.** The seed's forward pass has no bias, so its list has no bias gradient; `lstm_cell` has one,
#   and its gradient is the pre-activation error summed over the batch (and over time, in a sequence):
#   db = Σ [δ16 δ15 δ14 δ13]. Leaving it out is an error of the size of db itself.
#
# Everything else is right: δ3, δ5, δ6, δ9–δ12, δ17–δ21, δ24–δ26 as formulas, and the weight updates
# δW += h_{t-1}^T δ, δU += x_t^T δ. The seed also says δ11, δ25 and δ26 are "used for the next layers";
# δ26 goes to the layer below, while δ11 and δ25 go to the previous time step as its δ4 and δ2.

# %%
readings = {
    "δ7 with tanh'(y) = 1 − y²": (ref[5] * (1 - jnp.tanh(c) ** 2), ref[7]),
    "δ13 with sigmoid'(y) = y(1 − y)": (ref[6] * o * (1 - o), ref[13]),
    "δ14 with tanh'(y) = 1 − y²": (ref[9] * (1 - g**2), ref[14]),
    "δ15 with sigmoid'(y) = y(1 − y)": (ref[10] * i * (1 - i), ref[15]),
    "δ16 with sigmoid'(y) = y(1 − y)": (ref[12] * f * (1 - f), ref[16]),
}
for text, (value, target) in readings.items():
    print(f"{text:34s} max |error| {max_abs(value, target):.1e}")

# %% [markdown]
# The corrected list is what `jax_lstm/bptt.py` implements for a whole sequence, each line naming the seed rule
# it stands for. There the four pre-activation errors δ16, δ15, δ14, δ13 form one (B, 4H) array dz_t, so
# δ25 = dz_t W^T and δ26 = dz_t U^T are single matrix products, and dW, dU, db are summed over all time
# steps at once after the backward scan.

# %% [markdown]
# ## 3. The whole sequence: `lstm` (manual) vs `lstm_ref` (autodiff)
#
# Random cotangents on every output (`hs`, and the final `h` and `c`), so that every path of the backward pass
# is used; the gradient of every input: `W`, `U`, `b`, `xs`, `h0`, `c0`.

# %%
T, B, D, H = (12, 3, 3, 5) if FAST else (40, 4, 3, 8)


def problem(dtype, seed=0):
    """Params moved off their init, inputs and initial state, all in ``dtype``."""
    ks = jax.random.split(jax.random.PRNGKey(seed), 7)
    p = jl.init_params(ks[0], D, H, dtype=dtype)
    p = LSTMParams(*(a + 0.3 * jax.random.normal(k, a.shape, dtype) for a, k in zip(p, ks[1:4], strict=True)))
    xs = jax.random.normal(ks[4], (T, B, D), dtype)
    s0 = LSTMState(*(jax.random.normal(k, (B, H), dtype) for k in ks[5:7]))
    return p, xs, s0


def vjp_all(fn, p, xs, s0, seed=1):
    """Outputs of fn and its VJP for one random cotangent on (hs, h_T, c_T)."""
    out, vjp = jax.vjp(lambda p_, xs_, s_: fn(p_, xs_, s_), p, xs, s0)
    ks = jax.random.split(jax.random.PRNGKey(seed), 3)
    ct = (
        jax.random.normal(ks[0], out[0].shape, out[0].dtype),
        LSTMState(*(jax.random.normal(k, out[1].h.shape, out[1].h.dtype) for k in ks[1:])),
    )
    (gp, gxs, gs) = vjp(ct)
    return out, {"W": gp.W, "U": gp.U, "b": gp.b, "xs": gxs, "h0": gs.h, "c0": gs.c}


rows = []
for dtype in (F32, F64):
    p, xs, s0 = problem(dtype)
    out_m, grads_m = vjp_all(jax.jit(jl.lstm), p, xs, s0)
    out_r, grads_r = vjp_all(jax.jit(jl.lstm_ref), p, xs, s0)
    rows.append([jnp.dtype(dtype).name, "values (hs, h_T, c_T)", f"{max(map(max_abs, out_m, out_r)):.1e}", ""])
    for name in grads_m:
        assert grads_m[name].dtype == dtype
        rows.append(
            [
                jnp.dtype(dtype).name,
                f"d{name} {tuple(grads_m[name].shape)}",
                f"{max_abs(grads_m[name], grads_r[name]):.1e}",
                f"{max_rel(grads_m[name], grads_r[name]):.1e}",
            ]
        )
        assert max_rel(grads_m[name], grads_r[name]) < (1e-5 if dtype == F32 else 1e-10), name
display(md_table(["dtype", "quantity", "max abs error", "max rel error"], rows))

# %% [markdown]
# The relative error is max |manual − autodiff| / max |autodiff|: about 1e-16 in float64 and 1e-7 in float32,
# the rounding of the dtype. The two sides compute the same sums in a different order (the manual pass
# collects dW, dU, db in one matrix product over all steps, autodiff step by step), so they cannot agree to
# the last bit.
#
# **Finite differences**, independent of both: along a few random directions v in the space of all inputs
# (params, xs, state0), the central difference (L(θ + εv) − L(θ − εv)) / 2ε of L = ⟨cotangent, outputs⟩ against
# the directional derivative ⟨∇L, v⟩ from the manual gradient, in float64, for unit vectors v and ε = 1e-4.

# %%
p, xs, s0 = problem(F64)
theta = (p, xs, s0)
ct_keys = jax.random.split(jax.random.PRNGKey(7), 3)
ct = (
    jax.random.normal(ct_keys[0], (T, B, H), F64),
    LSTMState(*(jax.random.normal(k, (B, H), F64) for k in ct_keys[1:])),
)


@jax.jit
def scalar_loss(theta):
    """L(θ) = ⟨ct, lstm(θ)⟩ over hs and the final state."""
    out = jl.lstm(*theta)
    return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ct), strict=True))


grad_theta = jax.jit(jax.grad(scalar_loss))(theta)
along = lambda theta, v, s: jax.tree.map(lambda a, b: a + s * b, theta, v)  # θ + s v
leaves, treedef = jax.tree.flatten(theta)
eps = 1e-4
for n in range(3):
    dkeys = jax.random.split(jax.random.PRNGKey(100 + n), len(leaves))
    v_leaves = [jax.random.normal(k, a.shape, F64) for k, a in zip(dkeys, leaves, strict=True)]
    norm = jnp.sqrt(sum(jnp.sum(a**2) for a in v_leaves))
    v = jax.tree.unflatten(treedef, [a / norm for a in v_leaves])  # a random unit direction
    fd = (scalar_loss(along(theta, v, eps)) - scalar_loss(along(theta, v, -eps))) / (2 * eps)
    exact = sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(grad_theta), jax.tree.leaves(v), strict=True))
    rel = abs(float(fd - exact)) / abs(float(exact))
    print(f"direction {n}: finite difference {float(fd):+.12f}  manual {float(exact):+.12f}  rel error {rel:.1e}")
    assert rel < 1e-6

# %% [markdown]
# Agreement to 1e-9 or better, which is about what central differences resolve in float64: the truncation
# error grows like ε² and the rounding error like 1e-16 · (size of the terms of L) / ε; ε = 1e-4 balances
# the two for this problem.

# %% [markdown]
# ## 4. Beyond the seed: step masks, resets and recurrent dropout
#
# The seed's rules are for a step that always runs, always starts from the state the previous step left and
# multiplies W by h_{t-1} as it is. `lstm` (and `lstm_ref`, with the same meaning) takes three keyword options
# that change each of these, per time step and per batch row:
#
# * `mask` (T, B) bool, written $m_t \in \{0, 1\}$: where it is 0 step t is **skipped**;
# * `resets` (T, B) bool, $r_t$: where it is 1 the state is set to `reset_state` $= (h_r, c_r)$ (zeros when
#   not given) just before step t is visited, whether step t then runs or is skipped. `state0` $= (h_0, c_0)$
#   is only the state before the first visited step;
# * `recurrent_dropout` p with `key`: one keep mask $k \in \{0, 1\}^{B \times H}$ per sequence, drawn as
#   `jax.random.bernoulli(key, 1 - p, (B, H))`, scaled to $\kappa = k / (1 - p)$, the same at every step and
#   for all four gates. It applies to h_{t-1} in $h_{t-1} W$ only; the carried state and the output are not
#   dropped.
#
# $m_t$ and $r_t$ act on each row separately ((B, 1) columns below, broadcast over the H units). "Step t − 1"
# is the step visited before step t: step t + 1 with `reverse=True`; before the first step the state is
# $(h_{-1}, c_{-1}) = (h_0, c_0)$. With the section-1 cell written as $\mathrm{cell}(z_t, c) \to (\hat c_t, \hat h_t)$,
# one step is
#
# $$\bar h_{t-1} = r_t\, h_r + (1 - r_t)\, h_{t-1}, \qquad \bar c_{t-1} = r_t\, c_r + (1 - r_t)\, c_{t-1}
#   \qquad \text{(the state entering step t)}$$
# $$z_t = (\bar h_{t-1} \odot \kappa)\, W + x_t U + b, \qquad (\hat c_t, \hat h_t) = \mathrm{cell}(z_t, \bar c_{t-1})$$
# $$c_t = m_t\, \hat c_t + (1 - m_t)\, \bar c_{t-1}, \qquad h_t = m_t\, \hat h_t + (1 - m_t)\, \bar h_{t-1},
#   \qquad y_t = m_t\, \hat h_t$$
#
# where $y_t$ is the output `hs[t]` and $(h_t, c_t)$ the state carried on. Going backwards, step t receives
# $\delta h_t = \partial L / \partial h_t$ and $\delta c_t = \partial L / \partial c_t$ from the step after it
# (the cotangents of the final state at the last step) and $dy_t$, the cotangent of `hs[t]`. It must produce
# the errors of the entering state, $\partial L / \partial \bar h_{t-1}$ and $\partial L / \partial \bar c_{t-1}$,
# its pre-activation error $dz_t$ and its shares of dW, dU, db, dx_t.
#
# **Step mask.** At a step that runs ($m_t = 1$) the (corrected) rules of section 2 apply unchanged, with
# δ1 = $dy_t$, δ2 = $\delta h_t$, δ4 = $\delta c_t$. At a skipped step ($m_t = 0$) the output is the constant 0,
# so its cotangent $dy_t$ is dropped; nothing of the cell is used, so $dz_t = 0$ and the step adds nothing to
# dW, dU, db, and its input's gradient $dx_t = dz_t U^\top$ is zero; the state passes through, and so does its
# error:
#
# $$\frac{\partial L}{\partial \bar h_{t-1}} = m_t \big[(dz_t W^\top) \odot \kappa\big] + (1 - m_t)\, \delta h_t,
#   \qquad \frac{\partial L}{\partial \bar c_{t-1}} = m_t\, (\delta_8 \odot f_t) + (1 - m_t)\, \delta c_t,
#   \qquad dz_t = m_t\, dz_t^{\text{cell}},$$
#
# with $\delta_8 = \delta c_t + (dy_t + \delta h_t) \odot o_t \odot (1 - \tanh^2 c_t)$ the corrected δ8 and
# $dz_t^{\text{cell}}$ the corrected δ16, δ15, δ14, δ13 side by side. `bptt.py` gets the second equation
# without a branch: at a skipped step the forward stores zero gate coefficients and $f_t = 1$ for it, so
# δ11 = δ8 · f_t is $\delta c_t$ itself.
#
# **Resets.** $\bar h_{t-1}$ depends on $h_{t-1}$ with the factor $1 - r_t$ and on $h_r$ with the factor $r_t$,
# so the error reaching the entering state goes either to step t − 1 or to `reset_state`, never to both:
#
# $$\delta h_{t-1} = (1 - r_t)\, \frac{\partial L}{\partial \bar h_{t-1}}, \qquad
#   \frac{\partial L}{\partial h_r} = \sum_t r_t\, \frac{\partial L}{\partial \bar h_{t-1}}, \qquad
#   \frac{\partial L}{\partial h_0} = \delta h_{-1} \text{ (what is left at the start)},$$
#
# and the same for $c$. No gradient crosses a reset; the gradient of `reset_state` is a sum over every reset of
# the row, and `state0` gets only what reaches the start (nothing, in a row that resets before its first
# visited step). A reset at a skipped step hands $\delta h_t$, which passed through the skipped step, to
# `reset_state`. With `reset_state=state0` the two gradients add up in `state0`: that is what resets did before
# they restored a state of their own.
#
# **Recurrent dropout.** At a step that runs, $\bar h_{t-1}$ enters only through $z_t$, as
# $\bar h_{t-1} \odot \kappa$, and κ is a constant (no gradient reaches the key). So the seed's δ25 is multiplied
# by κ, and W's gradient uses the vector W actually multiplied:
#
# $$\frac{\partial L}{\partial \bar h_{t-1}} = (dz_t W^\top) \odot \kappa, \qquad
#   dW = \sum_t (\bar h_{t-1} \odot \kappa)^\top dz_t .$$
#
# **Which h_{t-1} goes into dW.** Without options $\bar h_{t-1}$ is `hs[t-1]`. With a mask it is not: a skipped
# step's output is 0, while the state it carries is the output of the last step that *ran* before t. So
# $\bar h_{t-1}$ is that output, or $h_0$ when no step has run since the start or since the latest reset.
# (Skipped steps have $dz_t = 0$ and contribute nothing whatever $\bar h_{t-1}$ is.) `bptt.py` finds it for all
# t at once (`_entering.py`: a running maximum, over the visit order, of the position of
# the latest step that ran or reset); the backward loop reads it row by row and writes it over the residual row it has just used.
#
# | term | seed (corrected), plain step | with mask $m_t$, reset $r_t$, dropout κ |
# |---|---|---|
# | $dy_t$ (δ1) | cotangent of `hs[t]` | $m_t\, dy_t$ |
# | $dz_t$ (δ16, δ15, δ14, δ13) | from δ3, δ8 | $m_t\, dz_t^{\text{cell}}$ |
# | error of the entering h | δ25 $= dz_t W^\top$ | $m_t\, (dz_t W^\top) \odot \kappa + (1 - m_t)\, \delta h_t$ |
# | error of the entering c | δ11 $= \delta_8 \odot f_t$ | $m_t\, \delta_8 \odot f_t + (1 - m_t)\, \delta c_t$ |
# | $\delta h_{t-1}$, $\delta c_{t-1}$ | the two above | $(1 - r_t)$ times the two above |
# | $dh_0$, $dc_0$ | at the first step | what is left at the start |
# | $dh_r$, $dc_r$ (`reset_state`) | — | $\sum_t r_t$ times the errors of the entering h, c |
# | $dW$ | $\sum_t h_{t-1}^\top dz_t$ | $\sum_t (\bar h_{t-1} \odot \kappa)^\top dz_t$, $\bar h_{t-1}$ as carried |
# | $dU$, $db$, $dx_t$ | $\sum_t x_t^\top dz_t$, $\sum_t dz_t$, $dz_t U^\top$ | the same ($dz_t = 0$ at skipped steps) |
#
# **Check against autodiff.** `lstm` implements the right column, `lstm_ref` is a plain scan over the cell with
# the three options written into its forward (a `where` per step, the state replaced by `reset_state`, h multiplied
# by κ) and differentiated by JAX. Random cotangents on `hs`, $h_T$ and $c_T$, float64, a few random patterns:

# %%
TM, BM, DM, HM = 9, 4, 2, 3
km = jax.random.split(jax.random.PRNGKey(11), 8)
pm = jl.init_params(km[0], DM, HM, dtype=F64)
pm = LSTMParams(*(a + 0.3 * jax.random.normal(k, a.shape, F64) for a, k in zip(pm, km[1:4], strict=True)))
xsm = jax.random.normal(km[4], (TM, BM, DM), F64)
s0m = LSTMState(*(jax.random.normal(k, (BM, HM), F64) for k in km[5:7]))
# patterns with a skipped first step, runs of skipped steps, a reset at a skipped step and a row with no event
mask_m = jax.random.bernoulli(km[7], 0.6, (TM, BM)).at[0, 0].set(False).at[:, 3].set(True)
resets_m = jnp.zeros((TM, BM), bool).at[4, 0].set(True).at[2, 1].set(True).at[6, 1].set(True).at[5, 2].set(True)
mask_m = mask_m.at[5, 2].set(False)  # row 2: the reset at step 5 falls on a skipped step
print("mask (rows = batch, 1 = step runs):\n", np.asarray(mask_m.T, int))
print("resets (rows = batch):\n", np.asarray(resets_m.T, int))

dropout = {"recurrent_dropout": 0.4, "key": jax.random.PRNGKey(12)}
options = {
    "mask": {"mask": mask_m},
    "resets": {"resets": resets_m},
    "recurrent dropout p=0.4": dropout,
    "all three": {"mask": mask_m, "resets": resets_m, **dropout},
    "all three, reverse": {"mask": mask_m, "resets": resets_m, "reverse": True, **dropout},
}
srm = LSTMState(*(0.5 * jax.random.normal(k, (BM, HM), F64) for k in jax.random.split(jax.random.PRNGKey(14), 2)))
options["all three, to a reset state"] = {**options["all three"], "reset_state": srm}
names = {"W": "W", "U": "U", "b": "b", "xs": "xs", "h0": "state0.h", "c0": "state0.c"}
rows = []
for label, opts in options.items():
    out_m, grads_m = vjp_all(jax.jit(functools.partial(jl.lstm, **opts)), pm, xsm, s0m, seed=13)
    out_r, grads_r = vjp_all(jax.jit(functools.partial(jl.lstm_ref, **opts)), pm, xsm, s0m, seed=13)
    errors = {name: max_rel(grads_m[name], grads_r[name]) for name in names}
    rows.append([label, f"{max(map(max_abs, out_m, out_r)):.1e}", *(f"{e:.1e}" for e in errors.values())])
    print(f"{label:24s} max rel error: " + "  ".join(f"{names[n]} {e:.1e}" for n, e in errors.items()))
    assert max(map(max_abs, out_m, out_r)) < 1e-12, label
    assert max(errors.values()) < 1e-10, (label, errors)
display(md_table(["options", "values, max abs error", *(f"d {n}, max rel error" for n in names.values())], rows))


def reset_state_grad(fn):
    """d⟨cotangent, outputs⟩ / d reset_state, with all three options."""
    ct = jax.random.normal(jax.random.PRNGKey(15), (TM, BM, HM), F64)
    run = lambda r: jnp.vdot(fn(pm, xsm, s0m, reset_state=r, **options["all three"])[0], ct)  # noqa: E731
    return jax.jit(jax.grad(run))(srm)


g_rm, g_rr = reset_state_grad(jl.lstm), reset_state_grad(jl.lstm_ref)
print("d reset_state, max rel error:", max(max_rel(a, b) for a, b in zip(g_rm, g_rr, strict=True)))
assert max(max_rel(a, b) for a, b in zip(g_rm, g_rr, strict=True)) < 1e-10

# %% [markdown]
# Every gradient agrees to the rounding of float64, for each option alone and for all three together, in
# both directions of travel, `reset_state`'s included.
#
# ### What the extra terms do
#
# Four consequences of the rules, measured on `lstm`'s own gradient (no autodiff of the forward involved):
#
# * **No gradient crosses a reset.** With a reset at step r, `hs[t]` for t ≥ r does not depend on `xs[s]` for
#   s < r, so the Jacobian block d hs[t>=r] / d xs[s<r] must be exactly zero, not merely small: the backward
#   multiplies the error entering step r by $1 - r_t = 0$.
# * **A skipped step passes everything through and takes nothing.** Its row of the Jacobian (its output is the
#   constant 0) and its column (its input is never read) are exactly zero, while the steps on either side of it
#   stay connected.
# * **A reset to `state0` is a cut.** With `reset_state=state0`, cutting the sequence at the reset into
#   segments that each start from `state0` gives the same outputs, and the gradient of `state0` is the sum of
#   the segments' gradients.
# * **Dropout removes units from W's input.** For one sequence (B = 1), $(h \odot \kappa) W = h\,(\mathrm{diag}(\kappa) W)$:
#   the rows of dW that belong to dropped units are exactly zero.

# %%
TJ, DJ, HJ, RJ = 10, 1, 3, 6  # one sequence, one input feature, reset at step RJ
kj = jax.random.split(jax.random.PRNGKey(21), 5)
pj = jl.init_params(kj[0], DJ, HJ, dtype=F64)
pj = LSTMParams(*(a + 0.5 * jax.random.normal(k, a.shape, F64) for a, k in zip(pj, kj[1:4], strict=True)))
xsj = jax.random.normal(kj[4], (TJ, 1, DJ), F64)
skipped = (3, 4)
cases = {
    "no options": {},
    f"steps {skipped[0]}, {skipped[1]} skipped": {"mask": jnp.ones((TJ, 1), bool).at[skipped, 0].set(False)},
    f"reset at step {RJ}": {"resets": jnp.zeros((TJ, 1), bool).at[RJ, 0].set(True)},
}


def step_jacobian(opts):
    """|d hs[t] / d xs[s]| (T, T), summed over units and features, from lstm's hand-written backward."""
    jac = jax.jit(jax.jacrev(lambda xs: jl.lstm(pj, xs, **opts)[0]))(xsj)  # (T, 1, H, T, 1, D)
    return np.abs(np.asarray(jac)).sum(axis=(1, 2, 4, 5))


jacs = {label: step_jacobian(opts) for label, opts in cases.items()}
fig, axes = plt.subplots(1, 3, figsize=(12, 3.8), layout="constrained")
for ax, (label, jac) in zip(axes, jacs.items(), strict=True):
    shown = np.where(jac > 0, jac, np.nan)  # exact zeros blank
    im = ax.imshow(np.log10(shown), cmap="viridis", vmin=-3, vmax=0.5, origin="upper")
    ax.set_title(label, fontsize=10)
    ax.set_xlabel("s (input xs[s])")
    ax.set_ylabel("t (output hs[t])")
fig.colorbar(im, ax=axes, shrink=0.8, label="log10 |d hs[t] / d xs[s]| (blank: exactly 0)")
plt.show()

jac_plain, jac_mask, jac_reset = jacs.values()
print("no options, d hs[t] / d xs[s] for s > t (the future):", jac_plain[np.triu_indices(TJ, 1)].max())
print(f"reset at {RJ}: max |d hs[t>={RJ}] / d xs[s<{RJ}]| =", jac_reset[RJ:, :RJ].max())
print(f"     without the reset the same block reaches {jac_plain[RJ:, :RJ].max():.2e}")
across = jac_mask[skipped[1] + 1, skipped[0] - 1]  # output after the skipped steps, input before them
print(f"skipped steps: their rows {jac_mask[list(skipped)].max()}, their columns {jac_mask[:, list(skipped)].max()}")
print(f"     across them: |d hs[{skipped[1] + 1}] / d xs[{skipped[0] - 1}]| = {across:.2e}")
assert jac_reset[RJ:, :RJ].max() == 0.0 and jac_plain[RJ:, :RJ].min() > 0.0
assert jac_mask[list(skipped)].max() == 0.0 and jac_mask[:, list(skipped)].max() == 0.0
assert across > 0.0

# with reset_state=state0, state0's gradient sums over the start and the reset: two segments from state0
s0j = LSTMState(*(jax.random.normal(k, (1, HJ), F64) for k in jax.random.split(jax.random.PRNGKey(22), 2)))
cts = (jax.random.normal(jax.random.PRNGKey(23), (TJ, 1, HJ), F64),)
cts += tuple(jax.random.normal(k, (1, HJ), F64) for k in jax.random.split(jax.random.PRNGKey(24), 2))


def pairing(outputs):
    """⟨cotangent, (hs, h_T, c_T)⟩."""
    hs, (h, c) = outputs
    return sum(jnp.vdot(a, b) for a, b in zip((hs, h, c), cts, strict=True))


def with_reset(s0):
    return pairing(jl.lstm(pj, xsj, s0, resets=cases[f"reset at step {RJ}"]["resets"], reset_state=s0))


def as_segments(s0_first, s0_second):
    hs1, _ = jl.lstm(pj, xsj[:RJ], s0_first)
    hs2, final = jl.lstm(pj, xsj[RJ:], s0_second)
    return pairing((jnp.concatenate([hs1, hs2]), final))


g_reset = jax.jit(jax.grad(with_reset))(s0j)
g_first, g_second = jax.jit(jax.grad(as_segments, argnums=(0, 1)))(s0j, s0j)
print(f"L with the reset {float(with_reset(s0j)):+.12f} | as two segments {float(as_segments(s0j, s0j)):+.12f}")
gap = max(max_abs(a, b1 + b2) for a, b1, b2 in zip(g_reset, g_first, g_second, strict=True))
print(f"max |d state0 with the reset − (d state0 of segment 1 + d state0 of segment 2)| = {gap:.1e}")
assert gap < 1e-12

# recurrent dropout, B = 1: the rows of dW of dropped units are exactly zero
keep_j = jax.random.bernoulli(jax.random.PRNGKey(25), 1 - 0.5, (1, HJ))


def dropped_loss(p):
    return pairing(jl.lstm(p, xsj, s0j, recurrent_dropout=0.5, key=jax.random.PRNGKey(25)))


dW_drop = jax.jit(jax.grad(dropped_loss))(pj).W
print("keep mask:", np.asarray(keep_j[0], int), "| max |dW| per row (unit):", np.abs(np.asarray(dW_drop)).max(axis=1))
assert np.all((np.abs(np.asarray(dW_drop)).max(axis=1) == 0) == ~np.asarray(keep_j[0]))

# %% [markdown]
# The blank upper triangle of the first panel is causality; the other two show the new terms at work. Across a
# reset the block below the diagonal is blank: the gradient is not small there but exactly zero, because the
# backward hands everything that reaches the entering state at the reset to `reset_state`. Around the skipped steps,
# their rows and columns are blank, yet the output after them still depends on the input before them: the state
# and its error pass through a skipped step untouched. The last two checks come out exact as well: a run with a
# reset to `state0` is, gradient of `state0` included, the sum of the runs between resets; and a unit that
# dropout removes from h_{t-1} contributes nothing to dW (with B > 1 its row of dW collects only the sequences
# that kept it).

# %% [markdown]
# ### Other activations
#
# Flax's cells take `gate_fn` (σ, on f, i, o) and `activation_fn` (φ, on g and on c_t in $h_t = o_t\,\varphi(c_t)$);
# so do `lstm`, `lstm_ref` and the stacks. Nothing in the rules above used more of sigmoid and tanh than their
# derivatives at the pre-activations, so the corrected rules hold with σ′ and φ′ in place of $a(1 - a)$ and
# $1 - a^2$:
#
# $$\delta_7 = \delta_5\, \varphi'(c_t), \quad \delta_{13} = \delta_6\, \sigma'(z_o), \quad
#   \delta_{14} = \delta_9\, \varphi'(z_g), \quad \delta_{15} = \delta_{10}\, \sigma'(z_i), \quad
#   \delta_{16} = \delta_{12}\, \sigma'(z_f), \qquad \delta_6 = \delta_3\, \varphi(c_t).$$
#
# The forward evaluates σ′ and φ′ where it evaluates σ and φ (for other functions than sigmoid and tanh, by
# forward mode along a tangent of ones: exact for element-wise functions) and stores the same six coefficient
# blocks as before, so a custom activation costs no residual memory. Checked against autodiff for
# `hard_sigmoid` with `soft_sign`, and for a user function:

# %%
activations = {
    "hard_sigmoid, soft_sign": {"gate_fn": jax.nn.hard_sigmoid, "activation_fn": jax.nn.soft_sign},
    "user functions": {"gate_fn": lambda z: 0.5 + 0.5 * z / jnp.sqrt(1 + z * z), "activation_fn": jnp.sin},
}
rows = []
for label, fns in activations.items():
    opts = {**options["all three"], **fns}
    out_m, grads_m = vjp_all(jax.jit(functools.partial(jl.lstm, **opts)), pm, xsm, s0m, seed=16)
    out_r, grads_r = vjp_all(jax.jit(functools.partial(jl.lstm_ref, **opts)), pm, xsm, s0m, seed=16)
    errors = {name: max_rel(grads_m[name], grads_r[name]) for name in names}
    rows.append([label, f"{max(map(max_abs, out_m, out_r)):.1e}", *(f"{e:.1e}" for e in errors.values())])
    assert max(map(max_abs, out_m, out_r)) < 1e-12, label
    assert max(errors.values()) < 1e-10, (label, errors)
display(md_table(["activations (with all three options)", "values", *(f"d {n}" for n in names.values())], rows))

# %% [markdown]
# ## 5. What BPTT does over time
#
# Going from step t+1 back to step t, the backward pass carries two errors: δ2 = dL/dh_t (the δ25 of step t+1)
# and δ4 = dL/dc_t through c_{t+1} (the δ11 of step t+1). To watch them, put a loss on the last hidden state
# only, L = ⟨w, h_{T-1}⟩, and take the gradient with respect to zero perturbations added to h_t and c_t after
# each step t of a `lax.scan` over `lstm_cell` (the scan of `lstm_ref`). The gradient at the h perturbation is
# dL/dh_t (δ3 of step t); the one at the c perturbation, added after h_t is computed, is δ4 of step t.
#
# The forget gate decides: δ11 = δ8 · f_t, so every step back multiplies the cell error by f_t (plus what comes
# through the gates and W). With a negative forget bias (f ≈ 0.1) the error dies out within a few steps; with a
# large one (f ≈ 0.95) it is carried a long way and can even grow.

# %%
T4, B4, D4, H4 = (30, 4, 4, 8) if FAST else (80, 8, 4, 16)
k4 = jax.random.split(jax.random.PRNGKey(3), 3)
xs4 = jax.random.normal(k4[1], (T4, B4, D4), F64)
w4 = jax.random.normal(k4[2], (B4, H4), F64)


def loss_with_probes(params, eh, ec):
    """⟨w, h_{T-1}⟩ when eh[t], ec[t] (T, B, H) are added to h_t, c_t after step t."""

    def step(state, inp):
        x_t, e_h, e_c = inp
        new, _ = jl.lstm_cell(params, state, x_t)
        new = LSTMState(new.h + e_h, new.c + e_c)
        return new, None

    final, _ = jax.lax.scan(step, jl.zeros_state(B4, H4, F64), (xs4, eh, ec))
    return jnp.vdot(w4, final.h)


@jax.jit
def error_norms(params):
    """||dL/dh_t|| and ||dL/dc_t|| for t = 0..T-1 (Frobenius norm over batch and units)."""
    zero = jnp.zeros((T4, B4, H4), F64)
    dh, dc = jax.grad(loss_with_probes, argnums=(1, 2))(params, zero, zero)
    return jnp.linalg.norm(dh.reshape(T4, -1), axis=1), jnp.linalg.norm(dc.reshape(T4, -1), axis=1)


biases = (-2.0, 3.0)
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
for fb, color in zip(biases, ("tab:red", "tab:blue"), strict=True):
    p4 = jl.init_params(k4[0], D4, H4, forget_bias=fb, dtype=F64)
    nh, nc = error_norms(p4)
    mean_f = float(jl.lstm_trace(p4, xs4).f.mean())
    for ax, n in zip(axes[:2], (nh, nc), strict=True):
        n = np.where(np.asarray(n) > 0, np.asarray(n), np.nan)  # dL/dc_(T-1) via c_T is 0: nothing comes after
        ax.semilogy(np.arange(T4), n, color=color, label=f"forget_bias = {fb:+.0f} (mean f = {mean_f:.2f})")
        ax.set_xlabel("t")
    print(
        f"forget_bias {fb:+.0f}: ||dL/dh_t|| at t = T-1, T-10, 0: "
        f"{float(nh[-1]):.2e}, {float(nh[-10]):.2e}, {float(nh[0]):.2e}"
    )
axes[2].plot(np.arange(T4), np.asarray(nh), color=color, label="||dL/dh_t||")
axes[2].plot(np.arange(T4 - 1), np.asarray(nc[:-1]), color=color, ls="--", label="||dL/dc_t||")
axes[2].set_xlabel("t")
axes[0].set_title("||dL/dh_t||  (δ3 of step t), log scale", fontsize=10)
axes[1].set_title("||dL/dc_t|| through c_(t+1)  (δ4 of step t)", fontsize=10)
axes[2].set_title(f"forget_bias = {biases[-1]:+.0f}, linear scale", fontsize=10)
axes[0].legend(fontsize=8)
axes[2].legend(fontsize=8)
for ax in axes:
    ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# With forget bias −2 the error falls by many orders of magnitude within the sequence: the loss at the end
# cannot teach the early steps anything (vanishing gradient). With forget bias +3 the cell state carries the
# error back nearly undamped and, through the recurrent weights, it grows on the way (right panel: an
# exploding gradient, mild here). This is why `init_params` defaults to a positive forget bias, and why training loops clip
# gradient norms.

# %% [markdown]
# ## 6. Speed and memory of a train step
#
# A train step's gradient, `jax.value_and_grad` of a mean-squared loss on all outputs, with the manual BPTT
# (`lstm`) and with autodiff (`lstm_ref`), float32, jit-compiled. Time is the median of several calls after a
# warm-up call, the two versions called in turn; memory is the compiled temporary buffer size from XLA's `memory_analysis()`. The machine may be
# shared with other work, so timings are indicative; `jax-lstm bench` is the thorough harness.

# %%
shapes = [(20, 4, 8, 16)] if FAST else [(100, 32, 64, 128), (200, 16, 32, 64)]
repeats = 3 if FAST else 15


def train_grad(fn):
    """value_and_grad of the MSE between fn's hs and a target, w.r.t. the params."""
    return jax.jit(jax.value_and_grad(lambda p, xs, ys: jnp.mean((fn(p, xs)[0] - ys) ** 2)))


def interleaved_medians(fns, args, repeats: int) -> list[float]:
    """Median seconds of each fn(*args) after one warm-up call; calls alternate, so all see the same load."""
    for fn in fns:
        jax.block_until_ready(fn(*args))
    times = [[] for _ in fns]
    for _ in range(repeats):
        for fn, ts in zip(fns, times, strict=True):
            t0 = time.perf_counter()
            jax.block_until_ready(fn(*args))
            ts.append(time.perf_counter() - t0)
    return [float(np.median(ts)) for ts in times]


results = {}
for T5, B5, D5, H5 in shapes:
    k5 = jax.random.split(jax.random.PRNGKey(5), 3)
    p5 = jl.init_params(k5[0], D5, H5, dtype=F32)
    xs5 = jax.random.normal(k5[1], (T5, B5, D5), F32)
    ys5 = jax.random.normal(k5[2], (T5, B5, H5), F32)
    compiled = {}
    for label, fn in (("manual (lstm)", jl.lstm), ("autodiff (lstm_ref)", jl.lstm_ref)):
        t0 = time.perf_counter()
        compiled[label] = train_grad(fn).lower(p5, xs5, ys5).compile()
        compile_s = time.perf_counter() - t0
        results[(T5, B5, D5, H5), label] = [compiled[label].memory_analysis().temp_size_in_bytes, compile_s]
    medians = interleaved_medians(list(compiled.values()), (p5, xs5, ys5), repeats)
    for label, t in zip(compiled, medians, strict=True):
        results[(T5, B5, D5, H5), label].insert(0, t)

rows = []
for shape in shapes:
    t_m, m_m, _ = results[shape, "manual (lstm)"]
    t_a, m_a, _ = results[shape, "autodiff (lstm_ref)"]
    for label in ("manual (lstm)", "autodiff (lstm_ref)"):
        t, m, comp = results[shape, label]
        rows.append([str(shape), label, f"{1e3 * t:.2f}", f"{m / 2**20:.2f}", f"{comp:.2f}"])
    rows.append([str(shape), "**autodiff / manual**", f"**{t_a / t_m:.2f}×**", f"**{m_a / m_m:.2f}×**", ""])
display(md_table(["(T, B, D, H)", "gradient", "time (ms)", "temp memory (MiB)", "compile (s)"], rows))

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
xpos = np.arange(len(shapes))
for k, (label, color) in enumerate((("manual (lstm)", "tab:green"), ("autodiff (lstm_ref)", "tab:gray"))):
    axes[0].bar(xpos + 0.4 * k, [1e3 * results[s, label][0] for s in shapes], 0.4, label=label, color=color)
    axes[1].bar(xpos + 0.4 * k, [results[s, label][1] / 2**20 for s in shapes], 0.4, label=label, color=color)
for ax, title in zip(axes, ("train-step gradient, median time (ms)", "compiled temporary memory (MiB)"), strict=True):
    ax.set_xticks(xpos + 0.2, [f"T={s[0]} B={s[1]}\nD={s[2]} H={s[3]}" for s in shapes], fontsize=8)
    ax.set_title(title, fontsize=10)
axes[0].legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 7. Training with both gradients
#
# A toy sequence task: the target at step t is the first input feature three steps earlier,
# y_t = x_{t-3}[0] (zero for t < 3), read out from h_t by a linear head. The same model is trained with Adam
# for 30 steps in float64, once with `lstm` and once with `lstm_ref`; only the gradient differs.

# %%
T6, B6, D6, H6 = (16, 8, 2, 8) if FAST else (24, 32, 2, 16)
DELAY, STEPS = 3, 30
k6 = jax.random.split(jax.random.PRNGKey(6), 3)
xs6 = jax.random.normal(k6[1], (T6, B6, D6), F64)
ys6 = jnp.concatenate([jnp.zeros((DELAY, B6), F64), xs6[:-DELAY, :, 0]], axis=0)  # (T, B)
model0 = {
    "lstm": jl.init_params(k6[0], D6, H6, dtype=F64),
    "head": (0.1 * jax.random.normal(k6[2], (H6,), F64), jnp.zeros((), F64)),
}
opt = optax.adam(3e-2)


def make_step(fn):
    def loss(model):
        hs, _ = fn(model["lstm"], xs6)
        v, c0 = model["head"]
        return jnp.mean((hs @ v + c0 - ys6) ** 2)

    @jax.jit
    def step(model, opt_state):
        value, grads = jax.value_and_grad(loss)(model)
        updates, opt_state = opt.update(grads, opt_state, model)
        return optax.apply_updates(model, updates), opt_state, value

    return step


curves, finals = {}, {}
for label, fn in (("manual (lstm)", jl.lstm), ("autodiff (lstm_ref)", jl.lstm_ref)):
    step, model, opt_state, losses = make_step(fn), model0, opt.init(model0), []
    for _ in range(STEPS):
        model, opt_state, value = step(model, opt_state)
        losses.append(float(value))
    curves[label], finals[label] = np.array(losses), model

diff = np.abs(curves["manual (lstm)"] - curves["autodiff (lstm_ref)"])
param_diff = max(
    max_abs(a, b)
    for a, b in zip(
        jax.tree.leaves(finals["manual (lstm)"]), jax.tree.leaves(finals["autodiff (lstm_ref)"]), strict=True
    )
)
print(f"loss: {curves['manual (lstm)'][0]:.4f} -> {curves['manual (lstm)'][-1]:.4f} in {STEPS} steps")
print(
    f"max |loss difference| over {STEPS} steps: {diff.max():.1e}; max |parameter difference| at the end: {param_diff:.1e}"
)
assert diff.max() < 1e-10

fig, axes = plt.subplots(1, 2, figsize=(10, 3.2))
axes[0].plot(curves["manual (lstm)"], "-", color="tab:green", lw=3, alpha=0.6, label="manual (lstm)")
axes[0].plot(curves["autodiff (lstm_ref)"], "--", color="k", lw=1, label="autodiff (lstm_ref)")
axes[0].set_xlabel("step")
axes[0].set_title("training loss (float64)", fontsize=10)
axes[0].legend(fontsize=8)
axes[1].plot(diff / np.finfo(np.float64).eps, "o", ms=4)
axes[1].set_xlabel("step")
axes[1].set_title("|loss(manual) − loss(autodiff)|, in units of float64 eps", fontsize=10)
plt.tight_layout()
plt.show()

# %% [markdown]
# The two curves lie on top of each other: the difference stays at the level of float64 rounding, which Adam
# carries forward without amplifying it noticeably over 30 steps. The manual BPTT is a drop-in replacement
# for autodiff in training.

# %% [markdown]
# ## 8. The LSTM family: projection, peepholes and layer norm
#
# Three variants change the step; each is an optional field of `LSTMParams`, and they combine. With
# $\sigma$ the gate function, $\phi$ = tanh, and $n_t$ the cell as it enters $\phi$:
#
# * **projection** (`W_proj` (H, P)): $m_t = o_t \odot \phi(n_t)$, $h_t = m_t W_{proj}$, so h is (B, P);
# * **peepholes** (`peephole` (3, H), rows f, i, o): $z_f \mathrel{+}= c_{t-1} \odot p_f$,
#   $z_i \mathrel{+}= c_{t-1} \odot p_i$, $z_o \mathrel{+}= c_t \odot p_o$ (o sees the new cell);
# * **layer norm** (`norm`): $z_t = \mathrm{LN}(x_t U)\,\gamma_x + \mathrm{LN}(h_{t-1} W)\,\gamma_h + b$ and
#   $n_t = \mathrm{LN}(c_t)\,\gamma_c + \beta_c$, with $\mathrm{LN}(a) = (a - \bar a)\, r$,
#   $r = 1 / \sqrt{\mathrm{var}(a) + 10^{-5}}$ over the last axis.
#
# Each adds terms to the rules of section 2. Write $\delta h_t$ for the total error of $h_t$ (δ3).
#
# **Projection.** The seed's δ3 now reaches $m_t$ through $W_{proj}$, and $W_{proj}$ gets its own sum:
#
# $$\delta m_t = \delta h_t\, W_{proj}^\top, \qquad dW_{proj} = \sum_t m_t^\top \delta h_t,$$
#
# and $\delta m_t$ takes the place of δ3 in δ5, δ6: $dz_o = \delta m_t \odot \phi(n_t)\, \sigma'(z_o)$,
# $\delta n_t = \delta m_t \odot o_t\, \phi'(n_t)$.
#
# **Peepholes.** $c_t$ also feeds $z_o$, and $c_{t-1}$ feeds $z_f$, $z_i$:
#
# $$\delta c_t = \delta c_{t+1}\text{-part} + \delta n_t\text{-part} + dz_o \odot p_o, \qquad
#   \delta c_{t-1} = \delta c_t \odot f_t + dz_f \odot p_f + dz_i \odot p_i,$$
# $$dp_f = \sum_t dz_f \odot c_{t-1}, \quad dp_i = \sum_t dz_i \odot c_{t-1}, \quad dp_o = \sum_t dz_o \odot c_t.$$
#
# **Layer norm.** Through $y = \mathrm{LN}(a)$, an error $\delta y$ becomes
#
# $$\delta a = r \left(\delta y - \overline{\delta y} - y\, \overline{\delta y \odot y}\right)$$
#
# (the bar: the mean over the normalised axis). It is used three times: for the cell,
# $\delta c_t \mathrel{+}= \mathrm{LN}'(\delta n_t \odot \gamma_c)$ with $d\gamma_c = \sum \delta n_t \odot \mathrm{LN}(c_t)$,
# $d\beta_c = \sum \delta n_t$; for the two products, $d(h_{t-1} W) = \mathrm{LN}'(dz_t \odot \gamma_h)$, which
# replaces $dz_t$ in δ25 and in dW, and $d(x_t U) = \mathrm{LN}'(dz_t \odot \gamma_x)$, which replaces it in δ26 and
# dU, with $d\gamma_h = \sum dz_t \odot \mathrm{LN}(h_{t-1} W)$, $d\gamma_x = \sum dz_t \odot \mathrm{LN}(x_t U)$.
# The bias still gets $\sum_t dz_t$.
#
# Each rule is checked below on one step in float64 against autodiff of that step, then the whole sequence:
# `lstm` against `lstm_ref` for every variant and their combination.

# %%
BV, DV, HV, PV = 3, 4, 6, 3
kv = jax.random.split(jax.random.PRNGKey(31), 8)
pv = jl.init_params(kv[0], DV, HV, proj_size=PV, peephole=True, layer_norm=True, dtype=F64)
pv = jax.tree.map(lambda a, k: a + 0.5 * jax.random.normal(k, a.shape, F64), pv,
                  jax.tree.unflatten(jax.tree.structure(pv), list(jax.random.split(kv[1], len(jax.tree.leaves(pv))))))  # fmt: skip
x_v = jax.random.normal(kv[2], (BV, DV), F64)
h_v, c_v = jax.random.normal(kv[3], (BV, PV), F64), jax.random.normal(kv[4], (BV, HV), F64)
dh_v, dc_v = jax.random.normal(kv[5], (BV, PV), F64), jax.random.normal(kv[6], (BV, HV), F64)
sig, tanh = jax.nn.sigmoid, jnp.tanh


def ln(a):
    """LN over the last axis and its r = 1 / sqrt(var + eps)."""
    d = a - a.mean(-1, keepdims=True)
    r = 1 / jnp.sqrt((d * d).mean(-1, keepdims=True) + 1e-5)
    return d * r, r


def ln_back(dy, y, r):
    """δa = r (δy − mean δy − y mean(δy y))."""
    return r * (dy - dy.mean(-1, keepdims=True) - y * (dy * y).mean(-1, keepdims=True))


def step(p, h, c, x):
    """One step of the full family, written out: returns (h_t, c_t)."""
    gx, gh, gc, bc = p.norm
    z = ln(x @ p.U)[0] * gx + ln(h @ p.W)[0] * gh + p.b
    zf, zi, zg, zo = jnp.split(z, 4, axis=-1)
    f, i, g = sig(zf + c * p.peephole[0]), sig(zi + c * p.peephole[1]), tanh(zg)
    c_new = c * f + i * g
    o = sig(zo + c_new * p.peephole[2])
    return (o * tanh(ln(c_new)[0] * gc + bc)) @ p.W_proj, c_new


# autodiff of the step
(_, _), vjp_v = jax.vjp(step, pv, h_v, c_v, x_v)
auto_p, auto_h, auto_c, auto_x = vjp_v((dh_v, dc_v))

# the rules by hand
gx, gh, gc, bc = pv.norm
xhat, rx = ln(x_v @ pv.U)
hhat, rh = ln(h_v @ pv.W)
zf, zi, zg, zo = jnp.split(xhat * gx + hhat * gh + pv.b, 4, axis=-1)
f, i, g = sig(zf + c_v * pv.peephole[0]), sig(zi + c_v * pv.peephole[1]), tanh(zg)
c_new = c_v * f + i * g
o = sig(zo + c_new * pv.peephole[2])
chat, rc = ln(c_new)
n = chat * gc + bc
m = o * tanh(n)
dm = dh_v @ pv.W_proj.T  # projection: δm = δh W_projᵀ
dWp = m.T @ dh_v  # dW_proj = mᵀ δh
dz_o = dm * tanh(n) * o * (1 - o)  # δ13 with δm for δ3
dn = dm * o * (1 - tanh(n) ** 2)  # δ5, δ7 with δm, n
dgc, dbc = (dn * chat).sum(0), dn.sum(0)
dc = dc_v + ln_back(dn * gc, chat, rc) + dz_o * pv.peephole[2]  # δ8 + the cell's LN + the o peephole
dz_f, dz_i, dz_g = dc * c_v * f * (1 - f), dc * g * i * (1 - i), dc * i * (1 - g**2)  # δ16, δ15, δ14
dc_prev = dc * f + dz_f * pv.peephole[0] + dz_i * pv.peephole[1]  # δ11 + the f, i peepholes
dpeep = jnp.stack([(dz_f * c_v).sum(0), (dz_i * c_v).sum(0), (dz_o * c_new).sum(0)])
dz = jnp.concatenate([dz_f, dz_i, dz_g, dz_o], axis=-1)
da_h, da_x = ln_back(dz * gh, hhat, rh), ln_back(dz * gx, xhat, rx)  # d(h W), d(x U) through their LN
rules = {
    "δm, dW_proj (projection)": (dWp, auto_p.W_proj),
    "dc_{t-1} (peepholes f, i; forget)": (dc_prev, auto_c),
    "dp_f, dp_i, dp_o (peepholes)": (dpeep, auto_p.peephole),
    "dγ_c, dβ_c (LN of the cell)": (jnp.concatenate([dgc, dbc]), jnp.concatenate([auto_p.norm.gamma_c, auto_p.norm.beta_c])),
    "dγ_h, dγ_x (LN of the products)": (
        jnp.concatenate([(dz * hhat).sum(0), (dz * xhat).sum(0)]),
        jnp.concatenate([auto_p.norm.gamma_h, auto_p.norm.gamma_x]),
    ),
    "δ25 = d(hW) Wᵀ, dW = hᵀ d(hW)": (jnp.concatenate([(da_h @ pv.W.T).ravel(), (h_v.T @ da_h).ravel()]),
                                      jnp.concatenate([auto_h.ravel(), auto_p.W.ravel()])),
    "δ26 = d(xU) Uᵀ, dU = xᵀ d(xU), db": (jnp.concatenate([(da_x @ pv.U.T).ravel(), (x_v.T @ da_x).ravel(), dz.sum(0)]),
                                         jnp.concatenate([auto_x.ravel(), auto_p.U.ravel(), auto_p.b])),
}  # fmt: skip
display(md_table(["rule", "max rel. error vs autodiff"], [(k, f"{max_rel(a, b):.1e}") for k, (a, b) in rules.items()]))
assert all(max_rel(a, b) < 1e-12 for a, b in rules.values())

# %%
TV = 12 if FAST else 40
xs_v = jax.random.normal(kv[7], (TV, BV, DV), F64)
rows = []
for name, opts in {
    "projection": dict(proj_size=PV),
    "peepholes": dict(peephole=True),
    "layer norm": dict(layer_norm=True),
    "all three": dict(proj_size=PV, peephole=True, layer_norm=True),
}.items():
    q = jl.init_params(kv[0], DV, HV, dtype=F64, **opts)
    q = jax.tree.map(lambda a: a + 0.3 * jnp.sin(jnp.arange(a.size, dtype=F64).reshape(a.shape)), q)
    out = jax.eval_shape(lambda q=q: jl.lstm(q, xs_v, seq_lengths=jnp.array([TV, TV // 2, 1])))
    w = jax.tree.map(lambda a: jnp.cos(jnp.arange(a.size, dtype=F64).reshape(a.shape)), out)

    def seq_loss(q_, fn, w=w):
        res = fn(q_, xs_v, seq_lengths=jnp.array([TV, TV // 2, 1]))
        return sum(jnp.vdot(a, b) for a, b in zip(jax.tree.leaves(res), jax.tree.leaves(w), strict=True))

    g_m = jax.jit(jax.grad(lambda q_: seq_loss(q_, jl.lstm)))(q)
    g_r = jax.jit(jax.grad(lambda q_: seq_loss(q_, jl.lstm_ref)))(q)
    err = max(max_rel(a, b) for a, b in zip(jax.tree.leaves(g_m), jax.tree.leaves(g_r), strict=True))
    rows.append((name, ", ".join(f for f in ("W_proj", "peephole", "norm") if getattr(q, f) is not None), f"{err:.1e}"))
    assert err < 1e-10
display(md_table(["variant", "extra fields", "max rel. error of every gradient, lstm vs lstm_ref"], rows))

# %% [markdown]
# Every new rule agrees with autodiff to float64 rounding, and so does the whole sequence, where the rules meet
# the padding of `seq_lengths`. In `bptt.py` the same terms appear in the family's own backward, each named
# where it enters; layer norm costs two more matmuls per step there (x_t U and h_{t-1} W are formed again
# rather than stored), so its residuals are those of the plain LSTM plus c_t.
