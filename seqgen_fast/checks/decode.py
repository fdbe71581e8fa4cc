"""``seqgen-fast check`` case of the decode family: one query token per sequence over a cache of
random lengths, appending the new token, against the project's reference in float64."""
from __future__ import annotations

import torch

from ..ops.decode import decode_attention
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
