"""Every error the public functions and modules of the attention, decode and rotary families raise: one
test per row of :data:`ERRORS` (the README's errors table is generated from it: ``python
tests/test_errors_attention.py``), each asserting the exception type and its message, raised before
any kernel runs (the same on every backend). Where the op we replace raises for the same input, a row
names it and the test asserts that torch raises too (its math SDPA backend, the semantics we follow;
torch's CPU flash backend does not check everything: a key / value length mismatch, a mask with
``is_causal``).
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import seqgen_fast
from seqgen_fast import nn as snn
from seqgen_fast.functional import decode_attention, flash_attention, rotary_embedding, scaled_dot_product_attention
from seqgen_fast.integrations import flash_attn as fa
from seqgen_fast.ops.decode import KVCacheArgumentError, KVCacheDtypeError


def t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape).to(dtype).to(device)


def i32(*values, device="cpu"):
    return torch.tensor(values, dtype=torch.int32, device=device)


KERNEL_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # where the triton backend runs
Q4 = (2, 5, 4, 16)   # flash layout (B, L, H, D)
K4 = (2, 7, 2, 16)
S4 = (2, 4, 5, 16)   # sdpa layout (B, H, L, E)


def fl(**kw):
    return flash_attention(t(*Q4), t(*K4), t(*K4), **kw)


def sd(**kw):
    return scaled_dot_product_attention(t(*S4), t(*S4), t(*S4), **kw)


def kv(q=None, k_cache=None, v_cache=None, **kw):
    """flash_attn_with_kvcache on a (2, 1, 4, 16) query over a (2, 8, 2, 16) cache."""
    q = t(2, 1, 4, 16) if q is None else q
    k_cache = t(2, 8, 2, 16) if k_cache is None else k_cache
    v_cache = t(*k_cache.shape, dtype=k_cache.dtype, device=k_cache.device) if v_cache is None else v_cache
    return fa.flash_attn_with_kvcache(q, k_cache, v_cache, **kw)


def dec(q=None, k_cache=None, v_cache=None, seqlens=None, **kw):
    """decode_attention of a (2, 4, 16) query over a (2, 8, 2, 16) cache."""
    q = t(2, 4, 16) if q is None else q
    k_cache = t(2, 8, 2, 16) if k_cache is None else k_cache
    v_cache = t(*k_cache.shape, dtype=k_cache.dtype, device=k_cache.device) if v_cache is None else v_cache
    seqlens = i32(3, 5, device=k_cache.device) if seqlens is None else seqlens
    return decode_attention(q, k_cache, v_cache, seqlens, **kw)


def rot(q=None, k=None, cos=None, sin=None, **kw):
    """rotary_embedding of (2, 6, 4, 16) q over a (8, 16) table (interleaved=False)."""
    q = t(2, 6, 4, 16) if q is None else q
    cos = t(8, 16) if cos is None else cos
    return rotary_embedding(q, k, cos, t(*cos.shape, device=cos.device) if sin is None else sin, **kw)


def debug(fn, **kw):
    """``fn(**kw)`` under ``seqgen_fast.debug_checks()``: the host-side value checks (one sync each)."""
    with seqgen_fast.debug_checks():
        return fn(**kw)


def on_sm75(fn, /, *args, **kw):
    """``fn(*args, **kw)`` with the device facts of an sm_75 GPU (Turing, below Triton's floor): the capability
    seam of the backends' device checks (``seqgen_fast._backend.device_capability``) stubbed, so the
    check a GPU below sm_80 reaches runs on any machine, CPU tensors under the interpreter included."""
    from unittest import mock

    from seqgen_fast import _backend

    with mock.patch.object(_backend, "device_capability", lambda device: (7, 5)):
        return fn(*args, **kw)


def on_triton(fn, /, **kw):
    """``fn(**kw)`` with the triton backend forced (``use_backend``: the flash-attn entries take no backend=)."""
    with seqgen_fast.use_backend("triton"):
        return fn(**kw)


def meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def mha_module(**kw):
    return snn.MultiheadAttention(16, 4, **kw)


def torch_mha(**kw):
    return torch.nn.MultiheadAttention(16, 4, **kw)


def mha(module, *args, **kw):
    return module(*args, need_weights=False, **kw)


ERRORS = [
    # (function, exception, message, call, torch's own call that raises too, or None)
    # ---- flash_attention (and every flash_attn_* integration entry point through it)
    ("flash_attention", TypeError, "flash_attention: q must be a tensor, got list",
     lambda: flash_attention([1.0], t(*K4), t(*K4)), None),
    ("flash_attention", TypeError, "flash_attention: q dtype must be floating point, got torch.int64",
     lambda: flash_attention(torch.ones(Q4, dtype=torch.int64), t(*K4), t(*K4)), None),
    ("flash_attention", TypeError, "flash_attention: k dtype torch.float16 differs from q dtype torch.float32",
     lambda: flash_attention(t(*Q4), t(*K4, dtype=torch.float16), t(*K4)), None),
    ("flash_attention", ValueError, "flash_attention: k is on meta, q on cpu",
     lambda: flash_attention(t(*Q4), t(*K4, device="meta"), t(*K4)), None),
    ("flash_attention", ValueError, "flash_attention: q must be (batch, seq, heads, dim), got shape (5, 4, 16)",
     lambda: flash_attention(t(5, 4, 16), t(*K4), t(*K4)), None),
    ("flash_attention", ValueError, "flash_attention: k head dim 8 != q head dim 16",
     lambda: flash_attention(t(*Q4), t(2, 7, 2, 8), t(*K4)), None),
    ("flash_attention", ValueError, "flash_attention: v shape (2, 6, 2, 16) must match k shape (2, 7, 2, 16) "
     "except the last dim", lambda: flash_attention(t(*Q4), t(*K4), t(2, 6, 2, 16)), None),
    ("flash_attention", ValueError, "flash_attention: q heads 4 must be a multiple of k heads 3 (GQA/MQA)",
     lambda: flash_attention(t(*Q4), t(2, 7, 3, 16), t(2, 7, 3, 16)), None),
    ("flash_attention", ValueError, "flash_attention: k batch 1 != q batch 2",
     lambda: flash_attention(t(*Q4), t(1, 7, 2, 16), t(1, 7, 2, 16)), None),
    ("flash_attention", ValueError, "flash_attention: give both cu_seqlens_q and cu_seqlens_k for varlen",
     lambda: flash_attention(t(9, 4, 16), t(9, 2, 16), t(9, 2, 16), cu_seqlens_q=i32(0, 9)), None),
    ("flash_attention", ValueError, "flash_attention: cu_seqlens_q must be a 1-D int32/int64 tensor of batch+1 "
     "offsets, got (1,)", lambda: flash_attention(t(9, 4, 16), t(9, 2, 16), t(9, 2, 16), cu_seqlens_q=i32(0),
                                                  cu_seqlens_k=i32(0, 9)), None),
    ("flash_attention", TypeError, "flash_attention: cu_seqlens_k dtype must be int32 or int64, got torch.float32",
     lambda: flash_attention(t(9, 4, 16), t(9, 2, 16), t(9, 2, 16), cu_seqlens_q=i32(0, 9),
                             cu_seqlens_k=torch.tensor([0.0, 9.0])), None),
    ("flash_attention", ValueError, "flash_attention: cu_seqlens_q is on meta, q on cpu",
     lambda: flash_attention(t(9, 4, 16), t(9, 2, 16), t(9, 2, 16), cu_seqlens_q=i32(0, 9, device="meta"),
                             cu_seqlens_k=i32(0, 9)), None),
    ("flash_attention", ValueError, "flash_attention: cu_seqlens_k has 3 offsets, cu_seqlens_q 2",
     lambda: flash_attention(t(9, 4, 16), t(9, 2, 16), t(9, 2, 16), cu_seqlens_q=i32(0, 9),
                             cu_seqlens_k=i32(0, 4, 9)), None),
    ("flash_attention", ValueError, "flash_attention: cu_seqlens_q must be prefix sums of the sequence lengths: "
     "start at 0, be non-decreasing and end at most at 9 (the packed rows), got [0, 5, 3]",
     lambda: debug(flash_attention, q=t(9, 4, 16), k=t(9, 2, 16), v=t(9, 2, 16), cu_seqlens_q=i32(0, 5, 3),
                   cu_seqlens_k=i32(0, 4, 9)), None),
    ("flash_attention", ValueError, "flash_attention: dropout_p must be a float in [0, 1], got 1.5",
     lambda: fl(dropout_p=1.5), None),
    ("flash_attention", ValueError, "flash_attention: window_size must be a pair (left, right) of ints >= -1 "
     "(-1 = unbounded), got (-2, 0)", lambda: fl(window_size=(-2, 0)), None),
    ("flash_attention", ValueError, "flash_attention: softcap must be a float >= 0 (0 = off), got -1.0",
     lambda: fl(softcap=-1.0), None),
    ("flash_attention", TypeError, "flash_attention: alibi_slopes must be a tensor or None, got list",
     lambda: fl(alibi_slopes=[0.5] * 4), None),
    ("flash_attention", TypeError, "flash_attention: alibi_slopes must be float32 (as flash-attn), got "
     "torch.float64", lambda: fl(alibi_slopes=torch.ones(4, dtype=torch.float64)), None),
    ("flash_attention", ValueError, "flash_attention: alibi_slopes must have shape (nheads,) = (4,) or (batch, "
     "nheads) = (2, 4), got (3,)", lambda: fl(alibi_slopes=torch.ones(3)), None),
    ("flash_attention", ValueError, "flash_attention: alibi_slopes is on meta, q on cpu",
     lambda: fl(alibi_slopes=torch.ones(4, device="meta")), None),
    ("flash_attention", seqgen_fast.BackendError, "attention: forced backend 'triton' cannot take these inputs: "
     "dtype float64 is not one of float16, bfloat16, float32 (float64 has no Triton dot; the reference computes it)",
     lambda: flash_attention(*(t(*sh, dtype=torch.float64, device=KERNEL_DEVICE) for sh in (Q4, K4, K4)),
                             backend="triton"), None),
    ("flash_attention", ValueError, "backend=: unknown backend 'nope'; expected one of cuda, triton, reference",
     lambda: fl(backend="nope"), None),
    ("flash_attn_qkvpacked_func", ValueError, "flash_attn_qkvpacked_func: qkv must be (batch, seqlen, 3, nheads, "
     "headdim) with 3 at dim 2, got (2, 5, 2, 4, 16)", lambda: fa.flash_attn_qkvpacked_func(t(2, 5, 2, 4, 16)),
     None),
    ("flash_attn_kvpacked_func", ValueError, "flash_attn_kvpacked_func: kv must be (batch, seqlen_k, 2, nheads_k, "
     "headdim) with 2 at dim 2, got (2, 7, 3, 2, 16)", lambda: fa.flash_attn_kvpacked_func(t(*Q4), t(2, 7, 3, 2, 16)),
     None),
    ("flash_attn_varlen_func", ValueError, "flash_attn_varlen_func: block_table (a paged KV cache) is not supported "
     "by the prefill kernels; use flash_attn_with_kvcache for paged decode",
     lambda: fa.flash_attn_varlen_func(t(9, 4, 16), t(9, 2, 16), t(9, 2, 16), i32(0, 9), i32(0, 9), 9, 9,
                                       block_table=i32(0)[None]), None),
    # ---- scaled_dot_product_attention (torch's own op raises for the same inputs)
    ("scaled_dot_product_attention", TypeError, "scaled_dot_product_attention: key dtype torch.float16 differs "
     "from query dtype torch.float32", lambda: scaled_dot_product_attention(t(*S4), t(*S4, dtype=torch.float16),
                                                                            t(*S4)),
     lambda: F.scaled_dot_product_attention(t(*S4), t(*S4, dtype=torch.float16), t(*S4))),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: query must be (..., seq, dim) with "
     "at least 2 dims, got shape (16,)", lambda: scaled_dot_product_attention(t(16), t(*S4), t(*S4)),
     lambda: F.scaled_dot_product_attention(t(16), t(*S4), t(*S4))),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: key head dim 8 != query head dim 16",
     lambda: scaled_dot_product_attention(t(*S4), t(2, 4, 5, 8), t(*S4)),
     lambda: F.scaled_dot_product_attention(t(*S4), t(2, 4, 5, 8), t(*S4))),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: value has 6 positions (dim -2), "
     "key has 5", lambda: scaled_dot_product_attention(t(*S4), t(*S4), t(2, 4, 6, 16)),
     lambda: F.scaled_dot_product_attention(t(*S4), t(*S4), t(2, 4, 6, 16))),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: enable_gqa: query heads (dim -3) "
     "must be a multiple of key heads, got query (2, 4, 5, 16), key (2, 3, 5, 16)",
     lambda: scaled_dot_product_attention(t(*S4), t(2, 3, 5, 16), t(2, 3, 5, 16), enable_gqa=True),
     lambda: F.scaled_dot_product_attention(t(*S4), t(2, 3, 5, 16), t(2, 3, 5, 16), enable_gqa=True)),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: key batch dims (3, 4) do not "
     "broadcast with query batch dims (2, 4)", lambda: scaled_dot_product_attention(t(*S4), t(3, 4, 5, 16),
                                                                                    t(3, 4, 5, 16)),
     lambda: F.scaled_dot_product_attention(t(*S4), t(3, 4, 5, 16), t(3, 4, 5, 16))),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: value batch dims (3, 4) do not "
     "broadcast with the scores' (2, 4)", lambda: scaled_dot_product_attention(t(*S4), t(*S4), t(3, 4, 5, 16)),
     lambda: F.scaled_dot_product_attention(t(*S4), t(*S4), t(3, 4, 5, 16))),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: dropout_p must lie in [0, 1], "
     "got 2.0", lambda: sd(dropout_p=2.0), None),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: attn_mask must be None when "
     "is_causal=True (torch raises the same)", lambda: sd(attn_mask=torch.ones(5, 5, dtype=torch.bool),
                                                          is_causal=True),
     lambda: F.scaled_dot_product_attention(t(*S4), t(*S4), t(*S4), attn_mask=torch.ones(5, 5, dtype=torch.bool),
                                            is_causal=True)),
    ("scaled_dot_product_attention", TypeError, "scaled_dot_product_attention: attn_mask must be a tensor or None, "
     "got list", lambda: sd(attn_mask=[[True]]),
     lambda: F.scaled_dot_product_attention(t(*S4), t(*S4), t(*S4), attn_mask=[[True]])),
    ("scaled_dot_product_attention", TypeError, "scaled_dot_product_attention: attn_mask dtype must be bool, "
     "float32 or the query dtype torch.float32, got torch.int64",
     lambda: sd(attn_mask=torch.ones(5, 5, dtype=torch.int64)),
     lambda: F.scaled_dot_product_attention(t(*S4), t(*S4), t(*S4), attn_mask=torch.ones(5, 5, dtype=torch.int64))),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: attn_mask is on meta, query on cpu",
     lambda: sd(attn_mask=torch.ones(5, 5, dtype=torch.bool, device="meta")), None),
    ("scaled_dot_product_attention", ValueError, "scaled_dot_product_attention: attn_mask shape (4, 5) does not "
     "broadcast to the attention weights' shape (2, 4, 5, 5)",
     lambda: sd(attn_mask=torch.ones(4, 5, dtype=torch.bool)),
     lambda: F.scaled_dot_product_attention(t(*S4), t(*S4), t(*S4), attn_mask=torch.ones(4, 5, dtype=torch.bool))),
    # ---- nn.MultiheadAttention (torch's messages where torch raises them)
    ("MultiheadAttention", RuntimeError, "Need attn_mask if specifying the is_causal hint.",
     lambda: mha(mha_module(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16), is_causal=True),
     lambda: mha(torch_mha(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16), is_causal=True)),
    ("MultiheadAttention", TypeError, "MultiheadAttention: only bool and floating types of key_padding_mask are "
     "supported, got torch.int64",
     lambda: mha(mha_module(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16),
                 key_padding_mask=torch.zeros(2, 5, dtype=torch.int64)),
     lambda: mha(torch_mha(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16),
                 key_padding_mask=torch.zeros(2, 5, dtype=torch.int64))),
    ("MultiheadAttention", RuntimeError, "The shape of the 2D attn_mask is (4, 5), but should be (5, 5).",
     lambda: mha(mha_module(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16), attn_mask=torch.zeros(4, 5)),
     lambda: mha(torch_mha(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16), attn_mask=torch.zeros(4, 5))),
    ("MultiheadAttention", RuntimeError, "The shape of the 3D attn_mask is (3, 5, 5), but should be (8, 5, 5).",
     lambda: mha(mha_module(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16), attn_mask=torch.zeros(3, 5, 5)),
     lambda: mha(torch_mha(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16), attn_mask=torch.zeros(3, 5, 5))),
    ("MultiheadAttention", ValueError, "MultiheadAttention: query embed dim 8 != embed_dim 16",
     lambda: mha(mha_module(), t(5, 2, 8), t(5, 2, 8), t(5, 2, 8)),
     lambda: mha(torch_mha(), t(5, 2, 8), t(5, 2, 8), t(5, 2, 8))),
    ("MultiheadAttention", RuntimeError, "expecting key_padding_mask shape of (2, 5), but got (2, 4)",
     lambda: mha(mha_module(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16), key_padding_mask=torch.zeros(2, 4).bool()),
     lambda: mha(torch_mha(), t(5, 2, 16), t(5, 2, 16), t(5, 2, 16), key_padding_mask=torch.zeros(2, 4).bool())),
    ("MultiheadAttention.from_torch", TypeError, "from_torch: module must be a torch.nn.MultiheadAttention, got "
     "Linear", lambda: snn.MultiheadAttention.from_torch(torch.nn.Linear(2, 2)), None),
    # ---- flash_attn_with_kvcache (flash-attn raises RuntimeError: ours are RuntimeError subclasses too)
    ("flash_attn_with_kvcache", KVCacheDtypeError, "flash_attn_with_kvcache: q must be a tensor, got list",
     lambda: kv(q=[1.0]), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: q must have 4 dims, got shape "
     "(2, 4, 16)", lambda: kv(q=t(2, 4, 16)), None),
    ("flash_attn_with_kvcache", KVCacheDtypeError, "flash_attn_with_kvcache: q must be float16, bfloat16, float32 "
     "or float64, got torch.int32", lambda: kv(q=torch.ones(2, 1, 4, 16, dtype=torch.int32)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: v_cache must have shape "
     "(2, 8, 2, 16), got (2, 9, 2, 16)", lambda: kv(v_cache=t(2, 9, 2, 16)), None),
    ("flash_attn_with_kvcache", KVCacheDtypeError, "flash_attn_with_kvcache: k_cache dtype torch.float16 must be "
     "q's dtype torch.float32", lambda: kv(k_cache=t(2, 8, 2, 16, dtype=torch.float16)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: k_cache head dim 8 != q head dim 16",
     lambda: kv(k_cache=t(2, 8, 2, 8)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: q heads 4 must be a multiple of "
     "k_cache heads 3 (GQA/MQA)", lambda: kv(k_cache=t(2, 8, 3, 16)), None),
    ("flash_attn_with_kvcache", KVCacheDtypeError, "flash_attn_with_kvcache: block_table must have dtype int32, "
     "got int64", lambda: kv(block_table=torch.zeros(2, 1, dtype=torch.int64)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: block_table must be (batch, "
     "max_pages) with batch 2, got (3, 1)", lambda: kv(block_table=torch.zeros(3, 1, dtype=torch.int32)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: block_table must have a contiguous "
     "last dimension", lambda: kv(block_table=torch.zeros(2, 2, 2, dtype=torch.int32)[..., 0]), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: block_table is 3 pages wide, more "
     "than the 2 pages of k_cache (num_pages, page_size, Hkv, D)",
     lambda: kv(block_table=torch.zeros(2, 3, dtype=torch.int32)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: a paged KV cache (block_table) does "
     "not take cache_batch_idx", lambda: kv(block_table=torch.zeros(2, 1, dtype=torch.int32),
                                            cache_batch_idx=i32(0, 1)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: k_cache has 1 sequences, fewer than "
     "q's batch 2 (pass cache_batch_idx to index a larger cache)", lambda: kv(k_cache=t(1, 8, 2, 16)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: k_cache holds no rows per sequence",
     lambda: kv(k_cache=t(2, 0, 2, 16)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: cache_leftpad must have shape (2,), "
     "got (3,)", lambda: kv(cache_leftpad=i32(0, 0, 0)), None),
    ("flash_attn_with_kvcache", KVCacheDtypeError, "flash_attn_with_kvcache: cache_seqlens must have dtype int32, "
     "got int64", lambda: kv(cache_seqlens=torch.tensor([1, 2])), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: give both k and v, or neither",
     lambda: kv(k=t(2, 1, 2, 16), cache_seqlens=i32(1, 2)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: v must have shape (2, 1, 2, 16), "
     "got (2, 2, 2, 16)", lambda: kv(k=t(2, 1, 2, 16), v=t(2, 2, 2, 16), cache_seqlens=i32(1, 2)), None),
    ("flash_attn_with_kvcache", KVCacheDtypeError, "flash_attn_with_kvcache: k dtype torch.float16 must be q's dtype "
     "torch.float32", lambda: kv(k=t(2, 1, 2, 16, dtype=torch.float16), v=t(2, 1, 2, 16), cache_seqlens=i32(1, 2)),
     None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: k and v are appended at "
     "cache_seqlens: pass cache_seqlens with them", lambda: kv(k=t(2, 1, 2, 16), v=t(2, 1, 2, 16)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: k has 9 new tokens, more than the "
     "cache's 8 rows per sequence", lambda: kv(k=t(2, 9, 2, 16), v=t(2, 9, 2, 16), cache_seqlens=i32(0, 0)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: give both rotary_cos and rotary_sin, "
     "or neither", lambda: kv(rotary_cos=t(8, 4)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: rotary_cos/rotary_sin rotate the new "
     "keys: pass k and v with them", lambda: kv(rotary_cos=t(8, 4), rotary_sin=t(8, 4)), None),
    ("flash_attn_with_kvcache", KVCacheDtypeError, "flash_attn_with_kvcache: rotary_cos must be a floating tensor, "
     "got torch.int32", lambda: kv(k=t(2, 1, 2, 16), v=t(2, 1, 2, 16), cache_seqlens=i32(1, 2),
                                   rotary_cos=torch.ones(8, 4, dtype=torch.int32),
                                   rotary_sin=torch.ones(8, 4, dtype=torch.int32)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: rotary_cos must be (seqlen_ro, "
     "rotary_dim / 2) with 0 < rotary_dim <= head dim 16, got (8, 9)",
     lambda: kv(k=t(2, 1, 2, 16), v=t(2, 1, 2, 16), cache_seqlens=i32(1, 2), rotary_cos=t(8, 9), rotary_sin=t(8, 9)),
     None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: rotary_cos/rotary_sin have 4 "
     "positions, fewer than the 8 rows of the KV cache per sequence",
     lambda: kv(k=t(2, 1, 2, 16), v=t(2, 1, 2, 16), cache_seqlens=i32(1, 2), rotary_cos=t(4, 4), rotary_sin=t(4, 4)),
     None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: alibi_slopes must be (4,) or (2, 4), "
     "got (3,)", lambda: kv(alibi_slopes=torch.ones(3)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: window_size must be a (left, right) "
     "pair of ints, got (1, 2, 3)", lambda: kv(window_size=(1, 2, 3)), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: softcap must be a float >= 0, "
     "got -1.0", lambda: kv(softcap=-1.0), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: num_splits must be an int >= 0, "
     "got -1", lambda: kv(num_splits=-1), None),
    ("flash_attn_with_kvcache", KVCacheArgumentError, "flash_attn_with_kvcache: cache_seqlens must be on q's device "
     "cpu, got meta", lambda: kv(cache_seqlens=i32(1, 2, device="meta")), None),
    ("flash_attn_with_kvcache", ValueError, "flash_attn_with_kvcache: cache_seqlens must lie in [0, 8] (of a cache "
     "of 8 rows per sequence); got 9 at index 1", lambda: debug(kv, cache_seqlens=i32(3, 9)), None),
    ("flash_attn_with_kvcache", ValueError, "flash_attn_with_kvcache: block_table must lie in [0, 1]",
     lambda: debug(kv, k_cache=t(2, 4, 2, 16), block_table=i32(0, 7).reshape(2, 1), cache_seqlens=i32(1, 1)), None),
    # ---- decode_attention
    ("decode_attention", ValueError, "decode_attention: q must be (B, H, D) or (B, 1, H, D), got shape (2, 16)",
     lambda: dec(q=t(2, 16)), None),
    ("decode_attention", ValueError, "decode_attention: give both k_new and v_new, or neither",
     lambda: dec(k_new=t(2, 2, 16)), None),
    ("decode_attention", TypeError, "decode_attention: cache_seqlens must be a tensor, got list",
     lambda: dec(seqlens=[3, 5]), None),
    ("decode_attention", ValueError, "decode_attention: k_cache must be (B, S_max, Hkv, D), got shape (2, 8, 16)",
     lambda: dec(k_cache=t(2, 8, 16), v_cache=t(2, 8, 16)), None),
    ("decode_attention", ValueError, "decode_attention: v_cache shape (2, 9, 2, 16) != k_cache shape (2, 8, 2, 16)",
     lambda: dec(v_cache=t(2, 9, 2, 16)), None),
    ("decode_attention", ValueError, "decode_attention: q batch 3 != k_cache batch 2", lambda: dec(q=t(3, 4, 16)),
     None),
    ("decode_attention", ValueError, "decode_attention: q head dim 8 != k_cache head dim 16",
     lambda: dec(q=t(2, 4, 8)), None),
    ("decode_attention", ValueError, "decode_attention: q heads 4 must be a multiple of k_cache heads 3 (GQA)",
     lambda: dec(k_cache=t(2, 8, 3, 16)), None),
    ("decode_attention", ValueError, "decode_attention: k_cache has S_max = 0 rows",
     lambda: dec(k_cache=t(2, 0, 2, 16)), None),
    ("decode_attention", TypeError, "decode_attention: q dtype torch.int32 is not a floating type this op takes",
     lambda: dec(q=torch.ones(2, 4, 16, dtype=torch.int32)), None),
    ("decode_attention", TypeError, "decode_attention: k_cache (torch.float16) and v_cache (torch.float16) must "
     "have q's dtype (torch.float32)", lambda: dec(k_cache=t(2, 8, 2, 16, dtype=torch.float16)), None),
    ("decode_attention", ValueError, "decode_attention: cache_seqlens must be a (2,) int32 or int64 tensor, got "
     "(2,) torch.float32", lambda: dec(seqlens=torch.tensor([3.0, 5.0])), None),
    ("decode_attention", ValueError, "decode_attention: k_new must be (B, Hkv, D) = (2, 2, 16) (or (B, 1, Hkv, D)), "
     "got (2, 3, 16)", lambda: dec(k_new=t(2, 3, 16), v_new=t(2, 3, 16)), None),
    ("decode_attention", TypeError, "decode_attention: k_new dtype torch.float16 != cache dtype torch.float32",
     lambda: dec(k_new=t(2, 2, 16, dtype=torch.float16), v_new=t(2, 2, 16)), None),
    ("decode_attention", ValueError, "decode_attention: q, k_cache, v_cache, cache_seqlens (and k_new, v_new) must "
     "be on one device, got ['cpu', 'meta']", lambda: dec(seqlens=i32(3, 5, device="meta")), None),
    ("decode_attention", ValueError, "decode_attention: num_splits must be >= 0, got -1",
     lambda: dec(num_splits=-1), None),
    ("decode_attention", ValueError, "decode_attention: cache_seqlens must lie in [0, 8] (of a cache of 8 rows per "
     "sequence); got -1 at index 0", lambda: debug(dec, seqlens=i32(-1, 5)), None),
    # ---- rotary_embedding
    ("rotary_embedding", TypeError, "rotary_embedding: cos must be a tensor, got list",
     lambda: rotary_embedding(t(2, 6, 4, 16), None, [1.0], t(8, 16)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: q must be (B, S, H, D) or packed (T, H, D), got shape (6, 16)",
     lambda: rot(q=t(6, 16)), None),
    ("rotary_embedding", TypeError, "rotary_embedding: q must be float16, bfloat16, float32 or float64, got "
     "torch.int64", lambda: rot(q=torch.ones(2, 6, 4, 16, dtype=torch.int64)), None),
    ("rotary_embedding", TypeError, "rotary_embedding: k must be a tensor or None, got list",
     lambda: rot(k=[1.0]), None),
    ("rotary_embedding", ValueError, "rotary_embedding: k must be (B, S, Hk, D) like q (2, 6, 4, 16), got "
     "(2, 5, 1, 16)", lambda: rot(k=t(2, 5, 1, 16)), None),
    ("rotary_embedding", TypeError, "rotary_embedding: k dtype torch.float16 must be q's dtype torch.float32",
     lambda: rot(k=t(2, 6, 1, 16, dtype=torch.float16)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: sin shape (8, 8) must be cos shape (8, 16)",
     lambda: rot(sin=t(8, 8)), None),
    ("rotary_embedding", TypeError, "rotary_embedding: cos must be a floating tensor, got torch.int64",
     lambda: rot(cos=torch.ones(8, 16, dtype=torch.int64), sin=torch.ones(8, 16, dtype=torch.int64)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: per-token cos/sin (B, S, W) need the padded (B, S, H, D) "
     "layout; give a packed q a (S_ro, W) table", lambda: rot(q=t(12, 4, 16), cos=t(1, 12, 16)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: per-token cos must be (B or 1, S, W) = (2 or 1, 6, W), got "
     "(2, 5, 16)", lambda: rot(cos=t(2, 5, 16)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: position_ids select rows of a (S_ro, W) table; per-token "
     "cos/sin (B, S, W) are already positioned", lambda: rot(cos=t(2, 6, 16), position_ids=torch.zeros(2, 6).long()),
     None),
    ("rotary_embedding", ValueError, "rotary_embedding: cos must be a table (S_ro, rotary_dim), transformers' "
     "convention for interleaved=False or per-token values (B, S, W), got shape (8,)", lambda: rot(cos=t(8)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: cos has 9 columns: the rotary dim 9 must be even and in "
     "2..16 (the head dim)", lambda: rot(cos=t(8, 9)), None),
    ("rotary_embedding", TypeError, "rotary_embedding: position_ids must be an int32 or int64 tensor",
     lambda: rot(position_ids=torch.zeros(2, 6)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: position_ids must have shape (2, 6) or (1, 6) or (6,), got "
     "(2, 5)", lambda: rot(position_ids=torch.zeros(2, 5, dtype=torch.int64)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: cu_seqlens needs packed q/k (T, H, D)",
     lambda: rot(cu_seqlens=i32(0, 6)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: cu_seqlens must be a (batch + 1,) int32 or int64 tensor of "
     "segment starts", lambda: rot(q=t(12, 4, 16), cu_seqlens=i32(0)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: cos/sin have 4 positions, fewer than the 6 tokens of each "
     "sequence", lambda: rot(cos=t(4, 16)), None),
    ("rotary_embedding", ValueError, "rotary_embedding: position_ids must be on q's device cpu",
     lambda: rot(position_ids=torch.zeros(2, 6, dtype=torch.int64, device="meta")), None),
    ("rotary_embedding", ValueError, "rotary_embedding: positions must lie in [0, 7] (the rows of cos/sin); got "
     "positions in [0, 9]", lambda: debug(rot, position_ids=torch.tensor([0, 1, 2, 3, 4, 9])), None),
    ("warmup", RuntimeError, "warmup: tuning times GPU kernels; cpu is not a CUDA device",
     lambda: seqgen_fast.warmup([(1, 64, 2, 64)], device="cpu"), None),
    ("rotary_embedding", ValueError, "rotary_embedding: cos/sin are constants of the op: they take no gradient "
     "(detach them)", lambda: rot(cos=t(8, 16).requires_grad_()), None),
    ("rotary_embedding", ValueError, "rotary_embedding: inplace=True is for inference: q/k require grad (use "
     "inplace=False to train)", lambda: rot(q=t(2, 6, 4, 16).requires_grad_(), inplace=True), None),
    # what the GPU kernels decline, with the reason (automatic dispatch takes the reference instead)
    ("flash_attention", seqgen_fast.BackendError, "attention: forced backend 'triton' cannot take these inputs: "
     "sm_75: the Triton kernels need compute capability 8.0 or newer",
     lambda: on_sm75(flash_attention, q=t(*Q4, device=KERNEL_DEVICE), k=t(*K4, device=KERNEL_DEVICE),
                     v=t(*K4, device=KERNEL_DEVICE), backend="triton"), None),
    ("scaled_dot_product_attention", seqgen_fast.BackendError, "scaled_dot_product_attention: forced backend "
     "'triton' cannot take these inputs: sm_75: the Triton kernels need compute capability 8.0 or newer",
     lambda: on_sm75(scaled_dot_product_attention, query=t(*S4, device=KERNEL_DEVICE),
                     key=t(*S4, device=KERNEL_DEVICE), value=t(*S4, device=KERNEL_DEVICE), backend="triton"), None),
    ("flash_attn_with_kvcache", seqgen_fast.BackendError, "kvcache_attention: forced backend 'triton' cannot take "
     "these inputs: sm_75: the Triton kernels need compute capability 8.0 or newer",
     lambda: on_sm75(on_triton, kv, q=t(2, 1, 4, 16, device=KERNEL_DEVICE),
                     k_cache=t(2, 8, 2, 16, device=KERNEL_DEVICE), v_cache=t(2, 8, 2, 16, device=KERNEL_DEVICE)), None),
    ("decode_attention", seqgen_fast.BackendError, "kvcache_attention: forced backend 'triton' cannot take these "
     "inputs: sm_75: the Triton kernels need compute capability 8.0 or newer",
     lambda: on_sm75(dec, q=t(2, 4, 16, device=KERNEL_DEVICE), k_cache=t(2, 8, 2, 16, device=KERNEL_DEVICE),
                     v_cache=t(2, 8, 2, 16, device=KERNEL_DEVICE), seqlens=i32(3, 5, device=KERNEL_DEVICE),
                     backend="triton"), None),
    ("rotary_embedding", seqgen_fast.BackendError, "rotary_embedding: forced backend 'triton' cannot take these "
     "inputs: sm_75: the Triton kernels need compute capability 8.0 or newer",
     lambda: on_sm75(rot, q=t(2, 6, 4, 16, device=KERNEL_DEVICE), cos=t(8, 16, device=KERNEL_DEVICE),
                     sin=t(8, 16, device=KERNEL_DEVICE), backend="triton"), None),
    ("flash_attention", seqgen_fast.BackendError, "attention: forced backend 'triton' cannot take these inputs: "
     "head dim 257 is outside 1..256",
     lambda: flash_attention(t(2, 5, 4, 257, device=KERNEL_DEVICE), t(2, 7, 2, 257, device=KERNEL_DEVICE),
                             t(2, 7, 2, 16, device=KERNEL_DEVICE), backend="triton"), None),
    ("scaled_dot_product_attention", seqgen_fast.BackendError, "scaled_dot_product_attention: forced backend "
     "'triton' cannot take these inputs: attn_mask requires grad (the kernels give no mask gradient)",
     lambda: sd(attn_mask=torch.zeros(5, 5).requires_grad_(), backend="triton"), None),
    ("flash_attn_with_kvcache", seqgen_fast.BackendError, "kvcache_attention: forced backend 'triton' cannot take "
     "these inputs: head dim 8 is outside 16..256",
     lambda: on_triton(kv, q=t(2, 1, 4, 8, device=KERNEL_DEVICE), k_cache=t(2, 8, 2, 8, device=KERNEL_DEVICE)), None),
    ("decode_attention", seqgen_fast.BackendError, "kvcache_attention: forced backend 'triton' cannot take these "
     "inputs: head dim 8 is outside 16..256",
     lambda: dec(q=t(2, 4, 8, device=KERNEL_DEVICE), k_cache=t(2, 8, 2, 8, device=KERNEL_DEVICE),
                 seqlens=i32(3, 5, device=KERNEL_DEVICE), backend="triton"), None),
    ("decode_attention", seqgen_fast.BackendError, "kvcache_attention: forced backend 'triton' cannot take these "
     "inputs: dtype float64 is not one of float16, bfloat16, float32",
     lambda: dec(q=t(2, 4, 16, dtype=torch.float64, device=KERNEL_DEVICE),
                 k_cache=t(2, 8, 2, 16, dtype=torch.float64, device=KERNEL_DEVICE),
                 seqlens=i32(3, 5, device=KERNEL_DEVICE), backend="triton"), None),
    ("rotary_embedding", seqgen_fast.BackendError, "rotary_embedding: forced backend 'triton' cannot take these "
     "inputs: dtype float64 is not one of float16, bfloat16, float32",
     lambda: rot(q=t(2, 6, 4, 16, dtype=torch.float64, device=KERNEL_DEVICE),
                 cos=t(8, 16, dtype=torch.float64, device=KERNEL_DEVICE),
                 sin=t(8, 16, dtype=torch.float64, device=KERNEL_DEVICE), backend="triton"), None),
    # past the kernels' 32-bit offsets (meta tensors: declined before anything is allocated)
    ("flash_attention", seqgen_fast.BackendError, "attention: forced backend 'triton' cannot take these inputs: "
     "tensors on meta; the triton backend needs CUDA tensors; query: one sequence spans 2147483776 elements, past "
     "the kernels' 32-bit offsets within a sequence",
     lambda: flash_attention(meta(1, 2**31 // 512 + 1, 4, 128), meta(1, 7, 4, 128), meta(1, 7, 4, 128),
                             backend="triton"), None),
    ("decode_attention", seqgen_fast.BackendError, "kvcache_attention: forced backend 'triton' cannot take these "
     "inputs: tensors on meta; the triton backend needs CUDA tensors; k_cache: its last dim spans 4261412865 "
     "elements (stride 33554432), past the kernels' 32-bit offsets within a row",
     lambda: decode_attention(meta(4, 16, 128), torch.empty_strided((4, 256, 8, 128), (1, 4, 1024, 2**25),
                                                                    device="meta", dtype=torch.bfloat16),
                              meta(4, 256, 8, 128), meta(4, dtype=torch.int32), backend="triton"), None),
    ("rotary_embedding", seqgen_fast.BackendError, "rotary_embedding: forced backend 'triton' cannot take these "
     "inputs: tensors on meta; the triton backend needs CUDA tensors; q: 2147483648 (token, head) rows, past the "
     "kernel's 32-bit row numbers",
     lambda: rotary_embedding(meta(1, 1, 1, 128).expand(2**16, 2**11, 16, 128), None, meta(2**11, 128),
                              meta(2**11, 128), backend="triton"), None),
]


@pytest.mark.parametrize("row", ERRORS, ids=[f"{r[0]}-{i}" for i, r in enumerate(ERRORS)])
def test_error(row):
    _, exc, message, call, theirs = row
    with pytest.raises(exc, match="^" + re.escape(message)):
        call()
    if theirs is not None:  # the op we replace (torch's math SDPA: its reference path) rejects the same input
        with pytest.raises((RuntimeError, ValueError, TypeError, IndexError, AssertionError)):
            with sdpa_kernel(SDPBackend.MATH):
                theirs()


def table() -> str:
    """The README's markdown table of :data:`ERRORS`."""
    lines = ["| function | exception | message | the op we replace |", "|---|---|---|---|"]
    for fn, exc, message, _, theirs in ERRORS:
        lines.append(f"| `{fn}` | `{exc.__name__}` | {message.replace('|', '/')} | "
                     f"{'raises too' if theirs is not None else ''} |")
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())


def test_the_capability_seam_reads_the_device_facts(monkeypatch):
    """The check behind the sm_75 rows: a CUDA device's (major, minor) come from ``_ext.device_info``
    (stubbed here: no GPU needed); below sm_80 the Triton supports checks give the reason, from sm_80
    on none, and a device that is not CUDA has no capability to check."""
    from seqgen_fast import _backend, _ext

    facts = {"major": 7, "minor": 5}
    monkeypatch.setattr(_ext, "device_info", lambda device: facts)
    assert _backend.device_capability(torch.device("cuda", 0)) == (7, 5)
    assert _backend.device_capability(torch.device("cpu")) is None
    with seqgen_fast.use_backend("triton"):  # CPU tensors reach the check only when triton is forced
        assert _backend.device_reasons("triton", torch.empty(1)) == []
        facts.update(major=8, minor=0)
        assert _backend.device_capability(torch.device("cuda", 0)) == (8, 0)
        monkeypatch.setattr(_backend, "device_capability", lambda device: (8, 0))
        assert _backend.device_reasons("triton", torch.empty(1)) == []
        monkeypatch.setattr(_backend, "device_capability", lambda device: (7, 0))
        assert _backend.device_reasons("triton", torch.empty(1)) == [
            "sm_70: the Triton kernels need compute capability 8.0 or newer"]


@pytest.mark.gpu
def test_gpu_below_sm80_dispatch_falls_back_to_the_reference():
    """On a GPU reported as sm_75 (stubbed facts, real CUDA tensors), automatic dispatch of every entry
    takes the reference backend (plain PyTorch on the GPU) and gives its result, while a forced
    triton raises the rows above."""
    from unittest import mock

    from seqgen_fast import _backend

    q, k, v = (t(*sh, device="cuda") for sh in (Q4, K4, K4))
    qd, lens = t(2, 4, 16, device="cuda"), i32(3, 5, device="cuda")
    cos, sin = t(8, 16, device="cuda"), t(8, 16, device="cuda")
    with mock.patch.object(_backend, "device_capability", lambda device: (7, 5)):
        out = flash_attention(q, k, v, causal=True)
        dec_out = dec(q=qd, k_cache=k, v_cache=v, seqlens=lens)
        qr, _ = rot(q=q, cos=cos, sin=sin)
    assert torch.equal(out, flash_attention(q, k, v, causal=True, backend="reference"))
    assert torch.equal(dec_out, dec(q=qd, k_cache=k, v_cache=v, seqlens=lens, backend="reference"))
    assert torch.equal(qr, rot(q=q, cos=cos, sin=sin, backend="reference")[0])
