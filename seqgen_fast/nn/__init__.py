"""Drop-in modules with the exact constructor, parameters, state_dict and forward of torch's."""
from .._lazy import lazy_getattr

_EXPORTS = {
    "LSTM": "seqgen_fast.nn.lstm",
    "LSTMCell": "seqgen_fast.nn.lstm",
    "MultiheadAttention": "seqgen_fast.nn.attention",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
