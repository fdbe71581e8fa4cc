"""KV-cache decode attention: seqgen_fast.functional.decode_attention vs torch's SDPA backends.

One query token per sequence over a full cache of S tokens (bf16, D=128). The cache is one
contiguous (B, Hkv, S, D) tensor per K and V: SDPA reads it in its native layout
(q (B, Hq, 1, D), enable_gqa), ours reads the (B, S, Hkv, D) view of the same memory (the kernel
takes any strides). Bytes = K and V read once + q + out; the floor is bytes / 3.0 TB/s.
Timed as CUDA-graph replays for every provider (decode loops are captured in practice; inside a
capture ours skips its host-side length check).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import Case

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION", "sdpa-math": "MATH"}
# (batch, Hq, Hkv, S): the anchor shapes of benchmarks/anchors/h100-2026-11-23.md
QUICK = [(1, 32, 8, 32768), (32, 32, 8, 8192)]
FULL = QUICK + [(128, 32, 32, 2048)]
HEAD_DIM = 128


def _setup(batch: int, hq: int, hkv: int, s: int, dtype: torch.dtype, device: str):
    def setup():
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from seqgen_fast.functional import decode_attention

        q = torch.randn(batch, hq, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(batch, hkv, s, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        lens = torch.full((batch,), s, device=device, dtype=torch.int32)
        k_view, v_view = k.transpose(1, 2), v.transpose(1, 2)  # (B, S, Hkv, D)
        q4 = q[:, :, None]

        def sdpa(backend):
            def run():
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    return F.scaled_dot_product_attention(q4, k, v, enable_gqa=True)
            return run

        fns = {"ours": lambda: decode_attention(q, k_view, v_view, lens)}
        if device == "cpu":  # the dry run: torch's math path is the one CPU anchor
            return {**fns, "sdpa-math": sdpa("MATH")}
        fns.update({name: sdpa(backend) for name, backend in SDPA_BACKENDS.items()})
        return fns

    return setup


def _case(batch: int, hq: int, hkv: int, s: int, dtype: torch.dtype = torch.bfloat16, device: str = "cuda") -> Case:
    elt = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * batch * s * hkv * HEAD_DIM * elt
    qo_bytes = 2 * batch * hq * HEAD_DIM * elt
    return Case("decode", "decode_attention", f"B{batch} Hq{hq} Hkv{hkv} S{s} D{HEAD_DIM}", dtype,
                _setup(batch, hq, hkv, s, dtype, device), anchor="sdpa-math" if device == "cpu" else "sdpa-cudnn",
                bytes=kv_bytes + qo_bytes, cuda_graph=True, device=device)


def cases(mode: str, device: str = "cuda"):
    if mode == "headline":
        yield _case(1, 32, 8, 32768)
        return
    if mode == "tiny":
        yield _case(2, 4, 2, 40, torch.float32, device=device)
        return
    for batch, hq, hkv, s in (QUICK if mode == "quick" else FULL):
        yield _case(batch, hq, hkv, s)
