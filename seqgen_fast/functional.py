"""Functional API: ``seqgen_fast.functional.<op>``, one entry per op of every kernel family.

The names come from the family manifest (``seqgen_fast._families``); each loads its family's
``ops`` module on first use. Today: ``lstm``, ``lstm_cell``, ``scaled_dot_product_attention``
(drop-in for torch's), ``flash_attention`` ((batch, seq, heads, dim), varlen, GQA),
``decode_attention`` (split-KV decode over a KV cache) and ``sample_tokens`` (fused temperature /
top-k / top-p sampling).
"""
from ._families import exports
from ._lazy import lazy_getattr

_EXPORTS = exports(__name__)
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
