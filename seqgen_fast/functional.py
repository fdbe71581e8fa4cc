"""Functional API: ``seqgen_fast.functional.<op>`` (each loads its family on first use).

* ``lstm``, ``lstm_cell``                 -- LSTM over raw weights (``seqgen_fast.ops.lstm``)
* ``scaled_dot_product_attention``        -- drop-in for torch's SDPA (``seqgen_fast.ops.attention``)
* ``flash_attention``                     -- (batch, seq, heads, dim) flash attention, varlen, GQA
* ``decode_attention``                    -- split-KV decode over a KV cache (``seqgen_fast.ops.decode``)
* ``sample_tokens``                       -- fused temperature / top-k / top-p sampling
"""
from ._lazy import lazy_getattr

_EXPORTS = {
    "lstm": "seqgen_fast.ops.lstm",
    "lstm_cell": "seqgen_fast.ops.lstm",
    "scaled_dot_product_attention": "seqgen_fast.ops.attention",
    "flash_attention": "seqgen_fast.ops.attention",
    "decode_attention": "seqgen_fast.ops.decode",
    "sample_tokens": "seqgen_fast.ops.sampling",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
