"""Split-KV ("flash-decoding") attention of one query token over a KV cache, in Triton.

Layout: ``q`` (B, Hq, D); ``k_cache``/``v_cache`` (B, S_max, Hkv, D), any strides;
``cache_seqlens`` (B,) int32/int64; optional ``k_new``/``v_new`` (B, Hkv, D) of the cache dtype.

Math, per sequence ``b`` with ``L = cache_seqlens[b]`` clamped into ``[0, S_max]`` (``[0, S_max-1]``
when appending) and ``g = Hq // Hkv``::

    (append)  k_cache[b, L] = k_new[b];  v_cache[b, L] = v_new[b];  L = L + 1
    out[b, i] = sum_{n < L} softmax_n(scale * q[b, i] . k_cache[b, n, i // g]) v_cache[b, n, i // g]
    out[b, i] = 0 when L = 0

Two kernels:

1. ``_decode_split_kernel``, grid ``(B * Hkv, num_splits)``: program ``(b, h, s)`` loads the ``g``
   query heads that share kv head ``h`` (padded to 16 rows for ``tl.dot``), so each K/V tile is
   read from memory once for the whole GQA group, and runs the online softmax (base 2) over split
   ``s`` of ``[0, L)``: the sequence's ``ceil(L / BLOCK_N)`` tiles are cut into ``num_splits``
   equal runs. It writes the normalised partial output and its log-sum-exp (base 2, ``-inf`` for
   an empty split) to fp32 scratch. When appending, split 0 also scores the new token straight
   from ``k_new``/``v_new`` (seeding its softmax state) and stores them at row ``L`` of the cache;
   the other splits read only rows ``< L``, so no program reads a row another one writes.
   With ``num_splits == 1`` the program writes the final output directly and no scratch is used.
   The split count is a runtime argument (only "one split or several" is compiled in), so a cache
   that grows between calls does not recompile the kernel as the heuristic's choice moves.
2. ``_decode_combine_kernel``, grid ``(B * Hq,)``: ``out = sum_s 2^(lse_s - m) o_s / sum_s 2^(lse_s - m)``
   with ``m = max_s lse_s``; 0 where every split was empty.

Lengths are clamped in-kernel, so a bad ``cache_seqlens`` can never address memory outside the
cache (the host-side check with a clear error lives in ``seqgen_fast.ops.decode``).
"""
from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

# Resident programs per SM the split heuristic plans for. Compiled ahead of time for sm_90 with
# Triton 3.9, a bf16 D=128 program uses 70 KiB of shared memory (cp.async-pipelined K/V tiles):
# three fit in an H100 SM, two in an A100's. A plan, not a measurement.
PROGRAMS_PER_SM = 2
MAX_SPLITS = 128
# SM count assumed under the CPU interpreter (only the split count depends on it).
INTERPRETER_SMS = 4


@triton.jit
def _decode_split_kernel(
    Q, K, V, KNEW, VNEW, SEQLENS, O, OPART, LSE,
    stride_qb, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_knb, stride_knh, stride_knd,
    stride_vnb, stride_vnh, stride_vnd,
    stride_ob, stride_oh, stride_od,
    stride_len,
    HKV, S_MAX, NUM_SPLITS, qk_scale,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE_SPLIT: tl.constexpr, APPEND: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_bh = tl.program_id(0)
    split = tl.program_id(1)
    b = (pid_bh // HKV).to(tl.int64)
    h = pid_bh % HKV

    seqlen = tl.load(SEQLENS + b * stride_len).to(tl.int32)
    seqlen = tl.minimum(tl.maximum(seqlen, 0), S_MAX - APPEND)
    tiles_per_split = tl.cdiv(tl.cdiv(seqlen, BLOCK_N), NUM_SPLITS)
    lo = split * tiles_per_split * BLOCK_N
    hi = tl.minimum(lo + tiles_per_split * BLOCK_N, seqlen)

    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    heads = h * GROUP + offs_g
    g_mask = offs_g < GROUP
    if HEAD_DIM == BLOCK_D:  # a constant mask keeps the loads 16-byte vectors (and cp.async-pipelinable)
        d_mask = tl.full([BLOCK_D], 1, tl.int1)
    else:
        d_mask = offs_d < HEAD_DIM
    gd_mask = g_mask[:, None] & d_mask[None, :]
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd, mask=gd_mask, other=0.0)

    m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_G], tl.float32)
    acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
    k_base = K + b * stride_kb + h * stride_kh
    v_base = V + b * stride_vb + h * stride_vh
    if APPEND:
        if split == 0:
            k_row = tl.load(KNEW + b * stride_knb + h * stride_knh + offs_d * stride_knd, mask=d_mask, other=0.0)
            v_row = tl.load(VNEW + b * stride_vnb + h * stride_vnh + offs_d * stride_vnd, mask=d_mask, other=0.0)
            tl.store(k_base + seqlen.to(tl.int64) * stride_kn + offs_d * stride_kd, k_row, mask=d_mask)
            tl.store(v_base + seqlen.to(tl.int64) * stride_vn + offs_d * stride_vd, v_row, mask=d_mask)
            m_i = tl.sum(q.to(tl.float32) * k_row.to(tl.float32)[None, :], axis=1) * qk_scale
            l_i = tl.full([BLOCK_G], 1.0, tl.float32)
            acc = acc + v_row.to(tl.float32)[None, :]

    for start in range(lo, hi, BLOCK_N):
        rows = start + offs_n
        n_mask = rows < hi
        nd_mask = n_mask[:, None] & d_mask[None, :]
        rows64 = rows.to(tl.int64)
        k = tl.load(k_base + rows64[:, None] * stride_kn + offs_d[None, :] * stride_kd, mask=nd_mask, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, axis=1)
        v = tl.load(v_base + rows64[:, None] * stride_vn + offs_d[None, :] * stride_vd, mask=nd_mask, other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
        m_i = m_new

    out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]  # an empty run has acc = 0: writes 0
    if SINGLE_SPLIT:
        tl.store(O + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
                 out.to(O.dtype.element_ty), mask=gd_mask)
    else:
        part = (b * HKV * GROUP + heads) * NUM_SPLITS + split  # scratch (B, Hq, NUM_SPLITS, D), contiguous
        tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=gd_mask)
        tl.store(LSE + part, m_i + tl.log2(l_i), mask=g_mask)  # -inf + log2(0) = -inf when empty


@triton.jit
def _decode_combine_kernel(
    OPART, LSE, O, stride_ob, stride_oh, stride_od, HQ, HEAD_DIM, NUM_SPLITS,
    BLOCK_S: tl.constexpr, BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)  # b * HQ + head
    b = pid // HQ
    head = pid % HQ
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    s_mask = offs_s < NUM_SPLITS
    d_mask = offs_d < HEAD_DIM
    lse = tl.load(LSE + pid * NUM_SPLITS + offs_s, mask=s_mask, other=float("-inf"))
    m = tl.max(lse, axis=0)
    w = tl.exp2(lse - tl.where(m == float("-inf"), 0.0, m))
    parts = tl.load(OPART + (pid * NUM_SPLITS + offs_s[:, None]) * HEAD_DIM + offs_d[None, :],
                    mask=s_mask[:, None] & d_mask[None, :], other=0.0)
    den = tl.sum(w, axis=0)
    out = tl.sum(w[:, None] * parts, axis=0) / tl.where(den > 0, den, 1.0)
    tl.store(O + b * stride_ob + head * stride_oh + offs_d * stride_od, out.to(O.dtype.element_ty), mask=d_mask)


def block_n(head_dim: int) -> int:
    """Keys per tile: 64 up to D=128, 32 above (keeps one K+V stage at 32 KiB in 16-bit)."""
    return 64 if head_dim <= 128 else 32


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    from .. import _ext

    return int(_ext.device_info(device)["multiprocessor_count"])


def choose_num_splits(batch_kv_heads: int, s_max: int, head_dim: int, sms: int) -> int:
    """flash-attn's split heuristic over ``sms * PROGRAMS_PER_SM`` program slots.

    No split when the (batch, kv head) programs already fill 80% of the slots; otherwise the
    smallest split count whose wave efficiency ``n / ceil(n)`` (``n`` = programs / slots) is
    within 85% of the best, at most one split per key tile and at most ``MAX_SPLITS``.
    Depends on shapes only, so a captured CUDA graph keeps it.
    """
    slots = sms * PROGRAMS_PER_SM
    if batch_kv_heads >= 0.8 * slots:
        return 1
    limit = max(1, min(MAX_SPLITS, math.ceil(s_max / block_n(head_dim))))

    def efficiency(splits: int) -> float:
        waves = batch_kv_heads * splits / slots
        return waves / math.ceil(waves)

    best = max(efficiency(s) for s in range(1, limit + 1))
    return next(s for s in range(1, limit + 1) if efficiency(s) >= 0.85 * best)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     k_new: torch.Tensor | None, v_new: torch.Tensor | None, scale: float,
                     num_splits: int = 0) -> torch.Tensor:
    """Launch the split and combine kernels; returns ``out`` (B, Hq, D) in ``q``'s dtype.

    Inputs are assumed validated (``seqgen_fast.ops.decode`` does it). ``num_splits`` 0 picks
    :func:`choose_num_splits`; a positive value is used as given (capped at ``MAX_SPLITS``).
    """
    batch, hq, head_dim = q.shape
    s_max, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    bn = block_n(head_dim)
    splits = num_splits or choose_num_splits(batch * hkv, s_max, head_dim, sm_count(q.device))
    splits = min(splits, MAX_SPLITS)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    if splits > 1:
        opart = torch.empty((batch, hq, splits, head_dim), device=q.device, dtype=torch.float32)
        lse = torch.empty((batch, hq, splits), device=q.device, dtype=torch.float32)
    else:
        opart = lse = out  # unused by the kernel when NUM_SPLITS == 1
    append = k_new is not None
    kn, vn = (k_new, v_new) if append else (k_cache, v_cache)  # placeholders, never read without APPEND
    kn_strides = (kn.stride(0), kn.stride(1), kn.stride(2)) if append else (0, 0, 0)
    vn_strides = (vn.stride(0), vn.stride(1), vn.stride(2)) if append else (0, 0, 0)
    block_d = max(16, triton.next_power_of_2(head_dim))
    _decode_split_kernel[(batch * hkv, splits)](
        q, k_cache, v_cache, kn, vn, cache_seqlens, out, opart, lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *kn_strides, *vn_strides, *out.stride(),
        cache_seqlens.stride(0),
        hkv, s_max, splits, scale * math.log2(math.e),
        HEAD_DIM=head_dim, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), BLOCK_N=bn, BLOCK_D=block_d,
        SINGLE_SPLIT=splits == 1, APPEND=int(append), DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=4, num_stages=3 if q.element_size() == 2 else 2,  # fp32: 2 stages keep smem near 100 KiB
    )
    if splits > 1:
        _decode_combine_kernel[(batch * hq,)](
            opart, lse, out, *out.stride(), hq, head_dim, splits,
            BLOCK_S=triton.next_power_of_2(splits), BLOCK_D=block_d, num_warps=4,
        )
    return out
