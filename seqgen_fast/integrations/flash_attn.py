"""flash-attn 2.x's Python interface on seqgen_fast's kernels: change the import, keep the calls.

Code that does ``from flash_attn import flash_attn_func`` switches by changing the import only::

    from seqgen_fast.integrations.flash_attn import flash_attn_func, flash_attn_varlen_func

Functions, with flash-attn 2.x's exact signatures, defaults, argument order and return conventions:

* prefill: :func:`flash_attn_func`, :func:`flash_attn_varlen_func`, :func:`flash_attn_qkvpacked_func`,
  :func:`flash_attn_kvpacked_func`, :func:`flash_attn_varlen_qkvpacked_func`,
  :func:`flash_attn_varlen_kvpacked_func` (this module; they run
  ``seqgen_fast.ops.attention.flash_attention``);
* decode: ``flash_attn_with_kvcache`` (defined in ``seqgen_fast.ops.decode``, served lazily here).

Semantics as flash-attn's: ``causal`` is bottom-right aligned; ``window_size=(left, right)``, -1
unbounded, keeps keys ``[i + S - L - left, i + S - L + right]``; ``softcap > 0`` caps the scaled scores
with ``softcap * tanh(s / softcap)``; ``alibi_slopes`` (nheads,) or (batch, nheads) float32 adds
``-slope * |i + S - L - j|``; ``dropout_p`` is applied as given (set it to 0 in evaluation, as
flash-attn asks); ``deterministic=True`` gives a bit-identical backward. ``return_attn_probs=True``
returns ``(out, softmax_lse, S_dmask)``: ``softmax_lse`` (batch, nheads, seqlen), or (nheads,
total_q) for varlen, float32; ``S_dmask`` is None (flash-attn returns it, for testing only, when
dropout is on; the kernels never form the S x S matrix). Head dims up to 256; fp16, bf16 and float32.
Packed inputs are read in place (views, no copies); their gradients flow back through the views.
``block_table`` (a paged KV cache) is for decode: pass it to ``flash_attn_with_kvcache``.
"""
from __future__ import annotations

from .._lazy import lazy_getattr
from ..ops.attention import flash_attention

__all__ = ["flash_attn_func", "flash_attn_varlen_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func",
           "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func", "flash_attn_with_kvcache"]

__getattr__ = lazy_getattr(__name__, {"flash_attn_with_kvcache": "seqgen_fast.ops.decode"})


def _result(out_lse, return_attn_probs: bool):
    out, lse = out_lse
    return (out, lse, None) if return_attn_probs else out


def _unpack(fn: str, packed, dim: int, n: int, layout: str):
    if not hasattr(packed, "dim") or packed.dim() != len(layout.split(",")) or packed.shape[dim] != n:
        shape = tuple(packed.shape) if hasattr(packed, "shape") else type(packed).__name__
        raise ValueError(f"{fn}: {('qkv', 'kv')[n == 2]} must be ({layout}) with {n} at dim {dim}, got {shape}")
    return packed.unbind(dim)


def flash_attn_func(q, k, v, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), k/v (batch, seqlen_k, nheads_k, headdim) -> out
    (batch, seqlen_q, nheads, headdim); see the module docstring."""
    return _result(flash_attention(q, k, v, causal=causal, scale=softmax_scale, dropout_p=dropout_p,
                                   window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
                                   deterministic=deterministic, return_lse=True), return_attn_probs)


def flash_attn_qkvpacked_func(qkv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                              softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """qkv (batch, seqlen, 3, nheads, headdim) -> out (batch, seqlen, nheads, headdim)."""
    q, k, v = _unpack("flash_attn_qkvpacked_func", qkv, 2, 3, "batch, seqlen, 3, nheads, headdim")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_kvpacked_func(q, kv, dropout_p=0.0, softmax_scale=None, causal=False, window_size=(-1, -1),
                             softcap=0.0, alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (batch, seqlen_q, nheads, headdim), kv (batch, seqlen_k, 2, nheads_k, headdim)."""
    k, v = _unpack("flash_attn_kvpacked_func", kv, 2, 2, "batch, seqlen_k, 2, nheads_k, headdim")
    return flash_attn_func(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
                           deterministic, return_attn_probs)


def flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                           softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0, alibi_slopes=None,
                           deterministic=False, return_attn_probs=False, block_table=None):
    """q (total_q, nheads, headdim), k/v (total_k, nheads_k, headdim), cu_seqlens_* (batch + 1,)
    int32 prefix sums, max_seqlen_* the longest lengths -> out (total_q, nheads, headdim)."""
    if block_table is not None:
        raise ValueError("flash_attn_varlen_func: block_table (a paged KV cache) is not supported by the prefill "
                         "kernels; use flash_attn_with_kvcache for paged decode")
    return _result(flash_attention(q, k, v, causal=causal, scale=softmax_scale, cu_seqlens_q=cu_seqlens_q,
                                   cu_seqlens_k=cu_seqlens_k, max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k,
                                   dropout_p=dropout_p, window_size=window_size, softcap=softcap,
                                   alibi_slopes=alibi_slopes, deterministic=deterministic, return_lse=True),
                   return_attn_probs)


def flash_attn_varlen_qkvpacked_func(qkv, cu_seqlens, max_seqlen, dropout_p=0.0, softmax_scale=None, causal=False,
                                     window_size=(-1, -1), softcap=0.0, alibi_slopes=None, deterministic=False,
                                     return_attn_probs=False):
    """qkv (total, 3, nheads, headdim), cu_seqlens (batch + 1,), max_seqlen -> out (total, nheads, headdim)."""
    q, k, v = _unpack("flash_attn_varlen_qkvpacked_func", qkv, 1, 3, "total, 3, nheads, headdim")
    return flash_attn_varlen_func(q, k, v, cu_seqlens, cu_seqlens, max_seqlen, max_seqlen, dropout_p, softmax_scale,
                                  causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_varlen_kvpacked_func(q, kv, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
                                    softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
                                    alibi_slopes=None, deterministic=False, return_attn_probs=False):
    """q (total_q, nheads, headdim), kv (total_k, 2, nheads_k, headdim)."""
    k, v = _unpack("flash_attn_varlen_kvpacked_func", kv, 1, 2, "total_k, 2, nheads_k, headdim")
    return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
                                  softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
                                  return_attn_probs)
