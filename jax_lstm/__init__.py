"""jax_lstm: an LSTM for JAX whose backpropagation through time is written by hand."""

from jax_lstm.bptt import lstm
from jax_lstm.cell import LayerNormParams, LSTMParams, LSTMState, init_params, lstm_cell, zeros_state
from jax_lstm.layers import gate_trace_stack, init_stack, lstm_stack
from jax_lstm.reference import LayerNormTrace, LSTMTrace, lstm_ref, lstm_trace

__all__ = [
    "LayerNormParams",
    "LayerNormTrace",
    "LSTMParams",
    "LSTMState",
    "LSTMTrace",
    "gate_trace_stack",
    "init_stack",
    "lstm_stack",
    "init_params",
    "lstm",
    "lstm_cell",
    "lstm_ref",
    "lstm_trace",
    "zeros_state",
]
__version__ = "0.2.0"
