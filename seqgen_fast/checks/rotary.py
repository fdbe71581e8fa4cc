"""``seqgen-fast check`` case of the rotary family: q and k (GQA) of two sequences rotated at
arbitrary positions, partial rotary dim, both conventions, against the reference in float64."""
from __future__ import annotations

import math

import torch

from ..ops.rotary import rotary_embedding
from ..reference import rotary as reference
from . import register_check


@register_check("rotary_embedding")
def _check_rotary(device, dtype):
    batch, seqlen, hq, hk, head_dim, rotary_dim = 2, 37, 4, 2, 64, 48
    q = torch.randn(batch, seqlen, hq, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, seqlen, hk, head_dim, device=device, dtype=dtype)
    positions = torch.randint(0, 100, (batch, seqlen), device=device)
    out = {}
    for interleaved in (False, True):
        width = rotary_dim // 2 if interleaved else rotary_dim
        angle = torch.rand(100, width, device=device, dtype=torch.float64) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        ref_q, ref_k = reference.rotary_embedding(q.double(), k.double(), cos.double(), sin.double(),
                                                  position_ids=positions, interleaved=interleaved)
        q_rot, k_rot = rotary_embedding(q, k, cos, sin, position_ids=positions, interleaved=interleaved)
        name = "interleaved" if interleaved else "neox"
        out[f"q ({name})"], out[f"k ({name})"] = (q_rot, ref_q), (k_rot, ref_k)
    return out
