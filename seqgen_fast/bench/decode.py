"""KV-cache decode: ``flash_attn_with_kvcache`` against torch's SDPA backends and torch's paged path, with
the copy bandwidth of the same run.

One case per (shape, cache layout, seqlen_q), bf16, D=128, every cache full (S keys per sequence):

* ``ours`` -- ``flash_attn_with_kvcache`` over a contiguous (B, S, Hkv, D) cache or a paged one
  (pages of 16 or 256 rows, block table a random permutation), ``causal`` for seqlen_q > 1;
* ``ours-rope-append`` -- the same call appending seqlen_q new keys/values with the rotary
  embedding fused (the cache holds S - seqlen_q rows before the call): the rotary/append cost;
* ``ours-portable`` (quick and full modes, contiguous, seqlen_q 1) -- ``ours`` with the TMA loads
  turned off (``SEQGEN_FAST_DECODE_TMA=0``: the pointer loads of Ampere): the TMA path's gain;
* ``ours-tma16`` (quick and full modes, pages of 16, seqlen_q 1) -- ``ours`` with 16-row TMA boxes
  (``SEQGEN_FAST_DECODE_TMA=1``) instead of the default 64-key cp.async gathers: which is faster;
* ``sdpa-cudnn`` (the anchor), ``sdpa-flash``, ``sdpa-efficient`` -- torch's SDPA on a contiguous
  (B, Hkv, S, D) cache of the same size (SDPA has no paged layout), ``enable_gqa``; seqlen_q > 1
  with the bottom-right causal bias;
* ``torch-paged`` (paged cases, seqlen_q 1) -- torch's own paged path: ``PagedAttention`` with a
  compiled ``flex_attention`` over its (1, Hkv, pages * P, D) cache;
* ``copy`` -- a device-to-device copy of half the case's bytes (read + write = the case's bytes),
  so its TB/s column is the copy bandwidth measured in the same run, the ceiling ours is judged by.

Bytes = K and V read once + q + out (the minimal bytes); the floor is bytes / copy bandwidth.
Every provider is timed as CUDA-graph replays (decode loops are captured in practice).
"""
from __future__ import annotations

import math
import os
from unittest import mock

import torch

from . import Case

SDPA_BACKENDS = {"sdpa-cudnn": "CUDNN_ATTENTION", "sdpa-flash": "FLASH_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION"}
# (batch, Hq, Hkv, S): the anchor shapes of benchmarks/anchors/h100-2026-11-23.md
SHAPES = [(1, 32, 8, 32768), (32, 32, 8, 8192), (128, 32, 32, 2048)]
PAGES = (None, 16, 256)          # contiguous, then page sizes
SEQLEN_Q = (1, 4)
HEAD_DIM = 128


def _paged(k: torch.Tensor, v: torch.Tensor, page: int, gen: torch.Generator):
    """Paged copies of (B, S, Hkv, D) caches: (pages, page, Hkv, D) each, and a random (B, S / page) block table."""
    batch, s, hkv, d = k.shape
    per_seq = s // page
    table = torch.randperm(batch * per_seq, generator=gen).to(k.device, torch.int32).reshape(batch, per_seq)
    out = []
    for t in (k, v):
        pages = t.new_empty(batch * per_seq, page, hkv, d)
        pages[table.flatten().long()] = t.reshape(batch * per_seq, page, hkv, d)
        out.append(pages)
    return out[0], out[1], table


def _torch_paged(q, k_pages, v_pages, table, s: int, lq: int):
    """torch's PagedAttention + compiled flex_attention over the same pages (its cache layout)."""
    from torch.nn.attention.experimental._paged_attention import PagedAttention
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    n_pages, page, hkv, d = k_pages.shape
    batch = q.shape[0]
    paged = PagedAttention(n_pages, page, batch, device=str(q.device))
    paged.page_table[:, : table.shape[1]] = table.long()
    paged.physical_to_logical.zero_().sub_(1)
    rows = torch.arange(batch, device=q.device)[:, None].expand_as(table)
    paged.physical_to_logical[rows, table.long()] = torch.arange(table.shape[1], device=q.device).expand_as(table)
    paged.capacity.fill_(table.shape[1] * page)
    kf = k_pages.permute(2, 0, 1, 3).reshape(1, hkv, n_pages * page, d)
    vf = v_pages.permute(2, 0, 1, 3).reshape(1, hkv, n_pages * page, d)

    def causal(b, h, q_idx, kv_idx):
        return kv_idx <= q_idx + s - lq

    logical = create_block_mask(causal, batch, None, lq, s, device=str(q.device), BLOCK_SIZE=(128, page))
    mask = paged.convert_logical_block_mask(logical)
    attend = torch.compile(flex_attention, dynamic=False)
    qt = q.transpose(1, 2)
    return lambda: attend(qt, kf, vf, block_mask=mask, enable_gqa=True)


def _lowering(fn, tma: str):
    """``fn`` with ``SEQGEN_FAST_DECODE_TMA=tma``: "0" the portable loads, "1" TMA boxes for any page size."""
    from seqgen_fast.kernels.decode import TMA_ENV

    def run():
        with mock.patch.dict(os.environ, {TMA_ENV: tma}):
            return fn()
    return run


def _setup(batch: int, hq: int, hkv: int, s: int, page: int | None, lq: int, dtype: torch.dtype, device: str,
           lowerings: bool = False):
    def setup():
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel
        from torch.nn.attention.bias import causal_lower_right

        from seqgen_fast.ops.decode import flash_attn_with_kvcache

        gen = torch.Generator().manual_seed(0)
        q = torch.randn(batch, lq, hq, HEAD_DIM, device=device, dtype=dtype)
        k = torch.randn(batch, s, hkv, HEAD_DIM, device=device, dtype=dtype)
        v = torch.randn_like(k)
        full = torch.full((batch,), s, device=device, dtype=torch.int32)
        before = full - lq
        k_new, v_new = (torch.randn(batch, lq, hkv, HEAD_DIM, device=device, dtype=dtype) for _ in range(2))
        angle = torch.rand(s, HEAD_DIM // 2, device=device, dtype=torch.float32) * 2 * math.pi
        cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
        k_cache, v_cache, table = _paged(k, v, page, gen) if page else (k, v, None)
        causal = lq > 1
        fns = {"ours": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=full, block_table=table,
                                                       causal=causal),
               "ours-rope-append": lambda: flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new, rotary_cos=cos,
                                                                   rotary_sin=sin, cache_seqlens=before,
                                                                   block_table=table, causal=causal,
                                                                   rotary_interleaved=False)}
        kt, vt = k.transpose(1, 2).contiguous(), v.transpose(1, 2).contiguous()  # SDPA's (B, Hkv, S, D)
        del k, v
        qt = q.transpose(1, 2)
        bias = causal_lower_right(lq, s) if causal else None

        def sdpa(backend):
            def run():
                with sdpa_kernel(getattr(SDPBackend, backend)):
                    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=bias, enable_gqa=True)
            return run

        if device == "cpu":  # the dry run: torch's math path is the one CPU anchor
            return {**fns, "sdpa-math": sdpa("MATH")}
        if lowerings and page is None:
            fns["ours-portable"] = _lowering(fns["ours"], "0")
        elif lowerings and page == 16:
            fns["ours-tma16"] = _lowering(fns["ours"], "1")
        fns.update({name: sdpa(backend) for name, backend in SDPA_BACKENDS.items()})
        if page and lq == 1:  # one flex_attention compile per case: the one-token cases only
            fns["torch-paged"] = _torch_paged(q, k_cache, v_cache, table, s, lq)
        src = torch.empty(kt.numel() * 2, device=device, dtype=dtype)
        dst = torch.empty_like(src)
        fns["copy"] = lambda: dst.copy_(src)
        return fns

    return setup


def _case(batch: int, hq: int, hkv: int, s: int, page: int | None = None, lq: int = 1,
          dtype: torch.dtype = torch.bfloat16, device: str = "cuda", lowerings: bool = False) -> Case:
    elt = torch.finfo(dtype).bits // 8
    kv_bytes = 2 * batch * s * hkv * HEAD_DIM * elt
    qo_bytes = 2 * batch * lq * hq * HEAD_DIM * elt
    layout = f"page{page}" if page else "contiguous"
    return Case("decode", "flash_attn_with_kvcache", f"B{batch} Hq{hq} Hkv{hkv} S{s} Lq{lq} {layout}", dtype,
                _setup(batch, hq, hkv, s, page, lq, dtype, device, lowerings),
                anchor="sdpa-math" if device == "cpu" else "sdpa-cudnn", bytes=kv_bytes + qo_bytes, cuda_graph=True,
                device=device)


def cases(mode: str, device: str = "cuda"):
    if mode == "headline":
        yield _case(1, 32, 8, 32768)
        return
    if mode == "tiny":
        yield _case(2, 4, 2, 48, page=16, lq=2, dtype=torch.float32, device=device)
        return
    for batch, hq, hkv, s in SHAPES:
        for page in (PAGES if mode == "full" else (None, 16)):
            for lq in (SEQLEN_Q if mode == "full" else (1,)):
                yield _case(batch, hq, hkv, s, page, lq, lowerings=lq == 1)
