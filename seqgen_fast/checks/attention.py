"""``seqgen-fast check`` cases of the attention family: SDPA (causal GQA with gradients, a bool mask
with a fully masked row) and varlen causal flash attention, against the project's reference
(``seqgen_fast.reference.attention``) in float64."""
from __future__ import annotations

import torch

from .._contract import BOTTOM_RIGHT
from ..ops.attention import flash_attention, scaled_dot_product_attention
from ..reference import attention as reference
from . import register_check

_DTYPES = dict(dtypes=(torch.float16, torch.bfloat16), cpu_dtypes=(torch.float16,))


def _float64(*tensors: torch.Tensor, grad: bool = False) -> list[torch.Tensor]:
    return [t.detach().double().requires_grad_(grad) for t in tensors]


@register_check("attention.sdpa_causal_gqa", **_DTYPES)
def _check_sdpa_causal_gqa(device, dtype):
    q = torch.randn(2, 4, 65, 64, device=device, dtype=dtype, requires_grad=True)
    k = torch.randn(2, 2, 97, 64, device=device, dtype=dtype, requires_grad=True)
    v = torch.randn(2, 2, 97, 64, device=device, dtype=dtype, requires_grad=True)
    out = scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ref_in = _float64(q, k, v, grad=True)
    ref = reference.sdpa(*ref_in, is_causal=True, enable_gqa=True)
    ref_grads = torch.autograd.grad(ref, ref_in, go.double())
    return {"out": (out, ref), **{f"d{n}": (g, r) for n, g, r in zip("qkv", grads, ref_grads)}}


@register_check("attention.sdpa_bool_mask", **_DTYPES)
def _check_sdpa_mask(device, dtype):
    q = torch.randn(2, 3, 33, 64, device=device, dtype=dtype)
    k = torch.randn(2, 3, 47, 64, device=device, dtype=dtype)
    v = torch.randn(2, 3, 47, 32, device=device, dtype=dtype)
    mask = torch.rand(2, 1, 33, 47, device=device) > 0.4
    mask[:, :, 5] = False  # a fully masked row: 0, as torch's math path
    out = scaled_dot_product_attention(q, k, v, attn_mask=mask)
    return {"out": (out, reference.sdpa(*_float64(q, k, v), attn_mask=mask))}


@register_check("attention.flash_varlen_causal", **_DTYPES)
def _check_varlen(device, dtype):
    lens_q, lens_k = [7, 33, 1], [40, 33, 5]
    cu_q = torch.tensor([0, 7, 40, 41], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 40, 73, 78], device=device, dtype=torch.int32)
    q = torch.randn(41, 4, 64, device=device, dtype=dtype)
    k = torch.randn(78, 2, 64, device=device, dtype=dtype)
    v = torch.randn(78, 2, 64, device=device, dtype=dtype)
    out = flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=33,
                          max_seqlen_k=40)
    refs = []
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qs, ks, vs = (t[c[b]:c[b] + n].transpose(0, 1).double() for t, c, n in
                      ((q, cu_q, lq), (k, cu_k, lk), (v, cu_k, lk)))
        mask = reference.causal_mask(lq, lk, BOTTOM_RIGHT, device)
        refs.append(reference.sdpa(qs, ks, vs, attn_mask=mask, enable_gqa=True).transpose(0, 1))
    return {"out": (out, torch.cat(refs))}
