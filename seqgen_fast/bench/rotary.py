"""Rotary embedding for prefill: ``rotary_embedding`` against transformers' ``apply_rotary_pos_emb`` math
(eager torch, the op it replaces; the anchor) and its ``torch.compile`` (quick and full modes), in one run.

q (B, S, Hq, D) and k (B, S, Hkv, D) in bf16 rotated by per-token (B, S, D) cos/sin tables, as a
Llama layer does before attention. Bytes = q and k read and written once + the cos/sin tables
read once (the floor of an unfused op as of a fused one: the tables are the only extra).
"""
from __future__ import annotations

import torch

from . import Case

# (batch, seq, Hq, Hkv, head dim)
SHAPES = [(1, 8192, 32, 8, 128), (8, 2048, 32, 8, 128), (16, 1024, 32, 32, 128)]


def _rotate_half(x):
    x1, x2 = x[..., : x.shape[-1] // 2], x[..., x.shape[-1] // 2:]
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary_pos_emb(q, k, cos, sin):
    """transformers' Llama formula, on the (B, S, H, D) layout (cos/sin unsqueezed over the heads)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    return q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin


def _setup(batch, seq, hq, hkv, dim, dtype, device, compiled):
    def setup():
        from seqgen_fast.functional import rotary_embedding

        q = torch.randn(batch, seq, hq, dim, device=device, dtype=dtype)
        k = torch.randn(batch, seq, hkv, dim, device=device, dtype=dtype)
        freqs = torch.arange(seq, device=device, dtype=torch.float32)[:, None] * torch.rand(dim // 2, device=device)
        emb = torch.cat([freqs, freqs], dim=-1)[None].expand(batch, seq, dim)
        cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)
        fns = {"ours": lambda: rotary_embedding(q, k, cos, sin),
               "transformers": lambda: apply_rotary_pos_emb(q, k, cos, sin)}
        if compiled and device != "cpu":
            fused = torch.compile(apply_rotary_pos_emb)
            fns["torch.compile"] = lambda: fused(q, k, cos, sin)
        return fns

    return setup


def _case(batch, seq, hq, hkv, dim, dtype=torch.bfloat16, device="cuda", compiled=True) -> Case:
    elt = torch.finfo(dtype).bits // 8
    qk = batch * seq * (hq + hkv) * dim * elt
    tables = 2 * batch * seq * dim * elt
    return Case("rotary", "rotary_embedding", f"B{batch} S{seq} Hq{hq} Hkv{hkv} D{dim}", dtype,
                _setup(batch, seq, hq, hkv, dim, dtype, device, compiled), anchor="transformers", bytes=2 * qk + tables,
                device=device)


def cases(mode: str, device: str = "cuda"):
    if mode == "tiny":
        yield _case(2, 33, 4, 2, 32, torch.float32, device)
        return
    for shape in SHAPES[:1] if mode in ("headline", "quick") else SHAPES:
        yield _case(*shape, compiled=mode != "headline")  # the GPU routine's headline skips the compile
