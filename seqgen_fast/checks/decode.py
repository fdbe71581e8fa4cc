"""``seqgen-fast check`` cases of the decode family, against the project's reference in float64:

* ``decode_attention``: one query token per sequence over a contiguous cache of random lengths,
  appending the new token;
* ``flash_attn_with_kvcache``: a paged cache (page size 16), two speculative query tokens appended
  with the rotary embedding, bottom-right causal, GQA, ragged lengths including an empty cache.
"""
from __future__ import annotations

import math

import torch

from ..ops.decode import decode_attention, flash_attn_with_kvcache
from ..reference import decode as reference
from . import register_check


@register_check("decode_attention")
def _check_decode(device, dtype):
    batch, hq, hkv, s_max, head_dim = 3, 4, 2, 97, 64
    q = torch.randn(batch, hq, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, s_max, hkv, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    lens = torch.randint(0, s_max, (batch,), device=device, dtype=torch.int32)
    k_new = torch.randn(batch, hkv, head_dim, device=device, dtype=dtype)
    v_new = torch.randn_like(k_new)
    ref_k, ref_v = k.double(), v.double()
    ref = reference.decode_attention(q.double(), ref_k, ref_v, lens, k_new.double(), v_new.double(), head_dim ** -0.5)
    out = decode_attention(q, k, v, lens, k_new=k_new, v_new=v_new)
    return {"out": (out, ref), "k_cache": (k, ref_k)}


@register_check("flash_attn_with_kvcache")
def _check_kvcache(device, dtype):
    batch, lq, hq, hkv, head_dim, page, per_seq = 3, 2, 8, 2, 64, 16, 4
    pages = batch * per_seq + 2
    q = torch.randn(batch, lq, hq, head_dim, device=device, dtype=dtype)
    k_cache = torch.randn(pages, page, hkv, head_dim, device=device, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    k, v = (torch.randn(batch, lq, hkv, head_dim, device=device, dtype=dtype) for _ in range(2))
    table = torch.randperm(pages, device=device)[: batch * per_seq].reshape(batch, per_seq).to(torch.int32)
    lens = torch.tensor([0, 37, per_seq * page - lq], device=device, dtype=torch.int32)
    angle = torch.rand(per_seq * page, head_dim // 2, device=device, dtype=torch.float64) * 2 * math.pi
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    ref_k, ref_v = k_cache.double(), v_cache.double()
    ref, ref_lse = reference.kvcache_attention(q.double(), ref_k, ref_v, k.double(), v.double(), lens, cos.double(),
                                               sin.double(), None, None, table, head_dim ** -0.5, True, -1, -1, 0.0,
                                               False, None)
    out, lse = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin,
                                       cache_seqlens=lens, block_table=table, causal=True, rotary_interleaved=False,
                                       return_softmax_lse=True)
    return {"out": (out, ref), "lse": (lse, ref_lse), "k_cache": (k_cache, ref_k)}
