"""FlashAttention-2 forward and backward in Triton (no L x S buffer in memory).

Contract (shared with ``seqgen_fast.reference.attention``, whose docstring states it fully):
``q (B, H, L, E)``, ``k (B, Hk, S, E)``, ``v (B, Hk, S, Ev)``, any strides (the flash layout
``(B, L, H, D)`` arrives as a transposed view, never copied); query head ``h`` reads kv head
``h // (H // Hk)`` (GQA/MQA by index mapping); optional ``mask`` broadcast to ``(B, H, L, S)``
through its strides (stride 0 on broadcast dims; bool True = attend, float added to the scores);
``causal`` 0 none, 1 top-left (``j <= i``), 2 bottom-right (``j <= i + S - L``); packed varlen
batches through ``cu_q``/``cu_k`` (int32, then ``B == 1`` and the grid runs over the sequences).

Forward, per (query block, batch*head) program, with scores in the log2 domain
(``s = q.k * scale * log2 e``): online softmax over key blocks, keeping the running row max
``m``, the running sum ``l`` and the unnormalised output ``acc``::

    m' = max(m, rowmax(s));  p = 2^(s - m');  l = l 2^(m - m') + rowsum(p);  acc = acc 2^(m - m') + p v

then ``out = acc / l`` and ``lse = (m + log2 l) ln 2`` (natural log). A row whose scores are all
``-inf`` (fully masked) keeps ``l = 0`` and gets ``out = 0``, ``lse = -inf`` (torch's safe
softmax). Key blocks wholly outside the causal band are never visited; blocks wholly inside it
skip the masking arithmetic (the loop runs in two phases).

Backward (FA2): ``delta = rowsum(dO * O)`` (preprocess kernel); one program per (key block,
batch*kv-head) accumulates ``dV = sum P^T dO`` and ``dK = scale sum dS^T Q`` over every query block
and every query head of its group, with ``P = 2^(s - lse log2 e)`` recomputed and
``dS = P (dO V^T - delta)`` (no atomics, no dK/dV per query head); one program per (query block,
batch*head) accumulates ``dQ = scale sum dS K``.

Head dims up to 256 (E and Ev independently) are padded to a power-of-two block and masked.
Inputs fp16/bf16 with fp32 accumulation. Block sizes are autotuned on the GPU, keyed on the padded
head dims and the causal / mask / varlen flags (not on sequence lengths, so new lengths never
re-tune); the first call of each key benchmarks its candidates, so make it before any CUDA-graph
capture. Under ``TRITON_INTERPRET=1`` a single small configuration runs.
"""
from __future__ import annotations

import contextlib

import torch
import triton
import triton.language as tl

from .._backend import interpret_mode
from .._contract import BOTTOM_RIGHT, NONE, attention_output

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256
# Triton's CPU interpreter (3.9) returns garbage from tl.dot on bfloat16 operands; there the
# operands are widened to float32 first (exact: P is still rounded to the input dtype before).
_WIDEN_DOTS = tl.constexpr(interpret_mode())


def block_dim(d: int) -> int:
    """Power-of-two block covering head dim ``d`` (at least 16, tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(d))


def _configs(kind: str):
    """Autotune candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel kind."""
    if interpret_mode():  # unequal blocks, shaped like the GPU's, exercise the causal block logic
        m, n = {"fwd": (32, 16), "dkdv": (16, 32), "dq": (32, 16)}[kind]
        return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=4, num_stages=1)]
    # Candidates checked by an ahead-of-time sm_90 compile (Triton 3.9, bf16): all use wgmma; the
    # 8-warp dK/dV shapes are the ones that keep dK, dV, K and V in registers without spilling at
    # D=128 (benchmarks/NOTES.md, attention). The autotuner skips any that fail to compile.
    table = {
        "fwd": [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
        "dkdv": [(32, 128, 8, 3), (16, 128, 8, 3), (32, 128, 8, 2), (64, 64, 8, 3), (32, 64, 8, 3),
                 (32, 64, 4, 2), (16, 64, 8, 2), (32, 32, 8, 2)],
        "dq": [(128, 64, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2), (64, 16, 4, 2)],
    }
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in table[kind]]


def _prune(configs, named_args, **kwargs):
    """Drop candidates whose tiles cannot fit shared memory at large head dims."""
    meta = {**named_args, **kwargs}  # constexprs passed by keyword arrive in kwargs
    d = max(meta["BLOCK_D"], meta["BLOCK_DV"])
    if d <= 128:
        return configs
    kept = [c for c in configs if c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] <= 64 * 64 and c.num_stages <= 2]
    return kept or configs[-1:]


_KEY = ["BLOCK_D", "BLOCK_DV", "CAUSAL", "HAS_MASK", "IS_VARLEN"]


@triton.jit
def _dot(a, b):
    if _WIDEN_DOTS:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _sequence(bh, HEADS, CU_Q, CU_K, seqlen_q, seqlen_k, BOTTOM_RIGHT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Of program axis 1 = batch x HEADS: (b, head, first row of q, q length, first row of k, k length,
    causal shift: key j is visible from query row i iff j <= i + shift) of sequence b. Varlen:
    offsets are clamped into the packed rows (``seqlen_q``/``seqlen_k`` = total rows), so bad
    cu_seqlens can give wrong sequences but never an access outside q, k, v."""
    b = bh // HEADS
    head = bh % HEADS
    if IS_VARLEN:
        q_start = tl.minimum(tl.maximum(tl.load(CU_Q + b), 0), seqlen_q)
        q_len = tl.minimum(tl.maximum(tl.load(CU_Q + b + 1), q_start), seqlen_q) - q_start
        k_start = tl.minimum(tl.maximum(tl.load(CU_K + b), 0), seqlen_k)
        k_len = tl.minimum(tl.maximum(tl.load(CU_K + b + 1), k_start), seqlen_k) - k_start
    else:
        q_start = b * 0
        q_len = seqlen_q + b * 0
        k_start = b * 0
        k_len = seqlen_k + b * 0
    shift = k_len - q_len if BOTTOM_RIGHT else q_len * 0
    return b, head, q_start, q_len, k_start, k_len, shift


@triton.jit
def _kv_bases(K, V, b64, hk, k_start, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh, stride_vn):
    """Pointers to row 0 of sequence b64's keys and values (or their gradients) in kv head ``hk``
    (64-bit offsets)."""
    k_base = K + b64 * stride_kb + hk.to(tl.int64) * stride_kh + k_start.to(tl.int64) * stride_kn
    v_base = V + b64 * stride_vb + hk.to(tl.int64) * stride_vh + k_start.to(tl.int64) * stride_vn
    return k_base, v_base


@triton.jit
def _apply_masks(s, rows, cols, q_len, k_len, shift, mask_base, stride_mm, stride_mn,
                 HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, BOUNDARY: tl.constexpr, CAUSAL: tl.constexpr):
    """Scores ``s`` (log2 domain) with the user mask, key bound and causal band applied.

    ``rows``/``cols`` are the query / key indices broadcast to ``s``'s shape ([:, None] and
    [None, :] for a (query, key) tile; the other way round for the transposed tile of dK/dV).
    """
    if HAS_MASK:
        mv = tl.load(mask_base + rows.to(tl.int64) * stride_mm + cols * stride_mn,  # L x S can pass 2^31
                     mask=(rows < q_len) & (cols < k_len), other=0)
        if MASK_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    if BOUNDARY:
        keep = cols < k_len
        if CAUSAL:
            keep = keep & (cols <= rows + shift)
        s = tl.where(keep, s, float("-inf"))
    return s


@triton.jit
def _causal_range(start_m, q_len, k_len, shift, CAUSAL: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key range of query block ``start_m``: [0, full) needs no masking, [full, hi) does."""
    k_full = (k_len // BLOCK_N) * BLOCK_N
    if CAUSAL:
        first = tl.maximum(start_m * BLOCK_M + shift + 1, 0)  # keys every row of the block sees
        full = tl.minimum((first // BLOCK_N) * BLOCK_N, k_full)
        hi = tl.maximum(tl.minimum(k_len, tl.minimum(q_len, (start_m + 1) * BLOCK_M) + shift), full)
    else:
        full = k_full
        hi = k_len
    return full, hi


@triton.jit
def _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, lo, hi, q_len, k_len, shift, qk_scale,
               stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
               BOUNDARY: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=(offs_n[None, :] < k_len) & (offs_d[:, None] < D), other=0.0)
        s = _dot(q, kt) * qk_scale
        s = _apply_masks(s, offs_m[:, None], offs_n[None, :], q_len, k_len, shift, mask_base, stride_mm, stride_mn,
                         HAS_MASK, MASK_BOOL, BOUNDARY, CAUSAL)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far stays at p = 0
        p = tl.math.exp2(s - m_use[:, None])
        alpha = tl.math.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                    mask=(offs_n[:, None] < k_len) & (offs_dv[None, :] < DV), other=0.0)
        acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v)
        m_i = m_new
    return acc, l_i, m_i


@triton.autotune(configs=_configs("fwd"), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_fwd(Q, K, V, O, LSE, MASK, CU_Q, CU_K,
              stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
              stride_lb, stride_lh, stride_lm, stride_mb, stride_mh, stride_mm, stride_mn,
              seqlen_q, seqlen_k, H, GROUP, qk_scale,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
              IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal rows start first
    b, h, q_start, q_len, k_start, k_len, shift = _sequence(tl.program_id(1), H, CU_Q, CU_K, seqlen_q, seqlen_k,
                                                            BOTTOM_RIGHT, IS_VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    b64 = b.to(tl.int64)
    q_base = Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm
    k_base, v_base = _kv_bases(K, V, b64, h // GROUP, k_start, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                               stride_vn)
    mask_base = MASK + b64 * stride_mb + h.to(tl.int64) * stride_mh

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=(offs_m[:, None] < q_len) & (offs_d[None, :] < D), other=0.0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    full, hi = _causal_range(pid_m, q_len, k_len, shift, CAUSAL, BLOCK_M, BLOCK_N)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, 0, full, q_len, k_len, shift,
                               qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, MASK_BOOL, False)
    acc, l_i, m_i = _fwd_inner(acc, l_i, m_i, q, k_base, v_base, mask_base, offs_m, full, hi, q_len, k_len, shift,
                               qk_scale, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                               D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, MASK_BOOL, True)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om
    tl.store(o_base + offs_m[:, None] * stride_om + offs_dv[None, :] * stride_od, acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < q_len) & (offs_dv[None, :] < DV))
    l_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_lm
    tl.store(l_base + offs_m * stride_lm, lse, mask=offs_m < q_len)


@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                    stride_db, stride_dh, stride_dm, stride_dd, L, H,
                    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, m] = sum_d dO[b, h, m, d] O[b, h, m, d] (float32, contiguous (B, H, L))."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = (bh // H).to(tl.int64)
    h = (bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_DV)
    inside = (offs_m[:, None] < L) & (offs_d[None, :] < DV)
    o = tl.load(O + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od,
                mask=inside, other=0.0).to(tl.float32)
    do = tl.load(DO + b * stride_db + h * stride_dh + offs_m[:, None] * stride_dm + offs_d[None, :] * stride_dd,
                 mask=inside, other=0.0).to(tl.float32)
    tl.store(DELTA + bh.to(tl.int64) * L + offs_m, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, offs_n, lo, hi, q_len, k_len, shift,
                qk_scale, stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_mm, stride_mn,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                BOUNDARY: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        qt = tl.load(q_base + offs_m[None, :] * stride_qm + offs_d[:, None] * stride_qd,
                     mask=row_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        # rows past the end or fully masked: lse = +inf makes their P exactly 0
        lse = tl.load(lse_base + offs_m * stride_lm, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        st = _dot(k, qt) * qk_scale  # (BLOCK_N, BLOCK_M): scores transposed
        st = _apply_masks(st, offs_m[None, :], offs_n[:, None], q_len, k_len, shift, mask_base, stride_mm, stride_mn,
                          HAS_MASK, MASK_BOOL, BOUNDARY, CAUSAL)
        pt = tl.math.exp2(st - lse[None, :])
        do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                     mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
        dv += _dot(pt.to(do.dtype), do)
        delta = tl.load(delta_base + offs_m, mask=row_ok, other=0.0)
        dpt = _dot(v, tl.trans(do))
        dst = pt * (dpt - delta[None, :])
        dk += _dot(dst.to(qt.dtype), tl.trans(qt))
    return dk, dv


@triton.autotune(configs=_configs("dkdv"), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DVT, LSE, DELTA, MASK, CU_Q, CU_K,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_lb, stride_lh, stride_lm, stride_mb, stride_mh, stride_mm, stride_mn,
                   seqlen_q, seqlen_k, HK, GROUP, sm_scale, qk_scale,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                   IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    b, hk, q_start, q_len, k_start, k_len, shift = _sequence(tl.program_id(1), HK, CU_Q, CU_K, seqlen_q, seqlen_k,
                                                             BOTTOM_RIGHT, IS_VARLEN)
    start_n = tl.program_id(0) * BLOCK_N
    if start_n >= k_len:
        return
    b64 = b.to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    col_ok = offs_n < k_len
    k_base, v_base = _kv_bases(K, V, b64, hk, k_start, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                               stride_vn)
    k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :] * stride_kd,
                mask=col_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
                mask=col_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    q_end = tl.cdiv(q_len, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # query rows i see key j iff j <= i + shift: rows below start_n - shift see none of this
        # block, rows from start_n + BLOCK_N - 1 - shift on see all of it
        lo = (tl.maximum(start_n - shift, 0) // BLOCK_M) * BLOCK_M
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), q_end)
    else:
        lo = q_len * 0
        mid = lo
    for g in range(GROUP):
        h = (hk * GROUP + g).to(tl.int64)
        q_base = Q + b64 * stride_qb + h * stride_qh + q_start.to(tl.int64) * stride_qm
        do_base = DO + b64 * stride_dob + h * stride_doh + q_start.to(tl.int64) * stride_dom
        lse_base = LSE + b64 * stride_lb + h * stride_lh + q_start.to(tl.int64) * stride_lm
        delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_start.to(tl.int64) * stride_lm
        mask_base = MASK + b64 * stride_mb + h * stride_mh
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, offs_n, lo, mid,
                             q_len, k_len, shift, qk_scale, stride_qm, stride_qd, stride_dom, stride_dod, stride_lm,
                             stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, HAS_MASK, MASK_BOOL,
                             True)
        dk, dv = _dkdv_inner(dk, dv, k, v, q_base, do_base, lse_base, delta_base, mask_base, offs_n, mid, q_end,
                             q_len, k_len, shift, qk_scale, stride_qm, stride_qd, stride_dom, stride_dod, stride_lm,
                             stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, CAUSAL, HAS_MASK, MASK_BOOL,
                             False)
    dk = dk * sm_scale
    dk_base, dv_base = _kv_bases(DK, DVT, b64, hk, k_start, stride_dkb, stride_dkh, stride_dkn, stride_dvb,
                                 stride_dvh, stride_dvn)
    tl.store(dk_base + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd, dk.to(DK.dtype.element_ty),
             mask=col_ok[:, None] & (offs_d[None, :] < D))
    tl.store(dv_base + offs_n[:, None] * stride_dvn + offs_dv[None, :] * stride_dvd, dv.to(DVT.dtype.element_ty),
             mask=col_ok[:, None] & (offs_dv[None, :] < DV))


@triton.jit
def _dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, offs_m, lo, hi, q_len, k_len, shift, qk_scale,
              stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
              BOUNDARY: tl.constexpr):
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        col_ok = offs_n < k_len
        kt = tl.load(k_base + offs_n[None, :] * stride_kn + offs_d[:, None] * stride_kd,
                     mask=col_ok[None, :] & (offs_d[:, None] < D), other=0.0)
        vt = tl.load(v_base + offs_n[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                     mask=col_ok[None, :] & (offs_dv[:, None] < DV), other=0.0)
        s = _dot(q, kt) * qk_scale
        s = _apply_masks(s, offs_m[:, None], offs_n[None, :], q_len, k_len, shift, mask_base, stride_mm, stride_mn,
                         HAS_MASK, MASK_BOOL, BOUNDARY, CAUSAL)
        p = tl.math.exp2(s - lse[:, None])
        dp = _dot(do, vt)
        ds = p * (dp - delta[:, None])
        dq += _dot(ds.to(kt.dtype), tl.trans(kt))
    return dq


@triton.autotune(configs=_configs("dq"), key=_KEY, prune_configs_by={"early_config_prune": _prune})
@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, MASK, CU_Q, CU_K,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 stride_lb, stride_lh, stride_lm, stride_mb, stride_mh, stride_mm, stride_mn,
                 seqlen_q, seqlen_k, H, GROUP, sm_scale, qk_scale,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 CAUSAL: tl.constexpr, BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                 IS_VARLEN: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # the longest causal rows start first
    b, h, q_start, q_len, k_start, k_len, shift = _sequence(tl.program_id(1), H, CU_Q, CU_K, seqlen_q, seqlen_k,
                                                            BOTTOM_RIGHT, IS_VARLEN)
    if pid_m * BLOCK_M >= q_len:
        return
    b64 = b.to(tl.int64)
    h64 = h.to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    row_ok = offs_m < q_len
    q_base = Q + b64 * stride_qb + h64 * stride_qh + q_start.to(tl.int64) * stride_qm
    do_base = DO + b64 * stride_dob + h64 * stride_doh + q_start.to(tl.int64) * stride_dom
    k_base, v_base = _kv_bases(K, V, b64, h // GROUP, k_start, stride_kb, stride_kh, stride_kn, stride_vb, stride_vh,
                               stride_vn)
    l_off = b64 * stride_lb + h64 * stride_lh + q_start.to(tl.int64) * stride_lm
    mask_base = MASK + b64 * stride_mb + h64 * stride_mh
    q = tl.load(q_base + offs_m[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                mask=row_ok[:, None] & (offs_d[None, :] < D), other=0.0)
    do = tl.load(do_base + offs_m[:, None] * stride_dom + offs_dv[None, :] * stride_dod,
                 mask=row_ok[:, None] & (offs_dv[None, :] < DV), other=0.0)
    lse = tl.load(LSE + l_off + offs_m * stride_lm, mask=row_ok, other=float("inf")) * 1.4426950408889634
    lse = tl.where(lse == float("-inf"), float("inf"), lse)
    delta = tl.load(DELTA + l_off + offs_m * stride_lm, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    full, hi = _causal_range(pid_m, q_len, k_len, shift, CAUSAL, BLOCK_M, BLOCK_N)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, offs_m, 0, full, q_len, k_len, shift, qk_scale,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                   D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, MASK_BOOL, False)
    dq = _dq_inner(dq, q, do, lse, delta, k_base, v_base, mask_base, offs_m, full, hi, q_len, k_len, shift, qk_scale,
                   stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
                   D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, CAUSAL, HAS_MASK, MASK_BOOL, True)
    dq = dq * sm_scale
    dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + q_start.to(tl.int64) * stride_dqm
    tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq.to(DQ.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------
def _batch_strides(t: torch.Tensor, varlen: bool):
    """Strides (b, h, row, d); the batch stride is 0 for packed varlen (rows are global)."""
    s = t.stride()
    return (0 if varlen else s[0], s[1], s[2], s[3])


def _common(q, k, v, mask, cu_q, cu_k, max_q, max_k, causal):
    """Grid extents and the arguments every kernel shares: the mask (broadcast by strides), the
    cu_seqlens pointers, the row counts and the constexpr flags."""
    varlen = cu_q is not None
    n_seq = cu_q.numel() - 1 if varlen else q.shape[0]
    grid_lens = (max_q, max_k) if varlen else (q.shape[2], k.shape[2])  # rows of the longest sequence
    if mask is None:
        mask_arg, mstrides = q, (0, 0, 0, 0)  # never read (HAS_MASK=False)
    else:
        mask_arg = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        mstrides = mask_arg.stride()
    cu = (cu_q, cu_k) if varlen else (q, q)  # never read when dense (IS_VARLEN=False)
    flags = dict(D=q.shape[-1], DV=v.shape[-1], BLOCK_D=block_dim(q.shape[-1]), BLOCK_DV=block_dim(v.shape[-1]),
                 CAUSAL=causal != NONE, BOTTOM_RIGHT=causal == BOTTOM_RIGHT, HAS_MASK=mask is not None,
                 MASK_BOOL=mask is not None and mask.dtype == torch.bool, IS_VARLEN=varlen)
    # the kernels' row counts: the sequence length (dense) or the packed total (varlen)
    return n_seq, grid_lens, (mask_arg, *cu), mstrides, (q.shape[2], k.shape[2]), flags


def _launch(kernel, grid, blocks, *args, **kwargs):
    """Launch an autotuned kernel on its tensors' device (Triton launches on the current one), or
    with fixed ``blocks = (BLOCK_M, BLOCK_N)`` (tests, tuning)."""
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        if blocks is None:
            kernel[grid](*args, **kwargs)
        else:
            kernel.fn[grid](*args, **kwargs, BLOCK_M=blocks[0], BLOCK_N=blocks[1], num_warps=4, num_stages=2)


def attention_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, blocks=None):
    """Forward of the op contract: returns (out (B, H, L, Ev) in q's memory order, lse (B, H, L) float32).

    ``blocks``: fixed (BLOCK_M, BLOCK_N) instead of the autotuned choice."""
    B, H, L, _ = q.shape
    varlen = cu_q is not None
    n_seq, grid_lens, extra, mstr, lens, flags = _common(q, k, v, mask, cu_q, cu_k, max_q, max_k, causal)
    out = attention_output(q, v.shape[-1])
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if varlen:  # packed rows past cu_q[-1] belong to no sequence: 0 (as the reference), not garbage
        out.zero_()
        lse.fill_(float("-inf"))
    lstr = (0 if varlen else lse.stride(0), lse.stride(1), lse.stride(2))

    def grid(meta):
        return (triton.cdiv(grid_lens[0], meta["BLOCK_M"]), n_seq * H)

    _launch(_attn_fwd, grid, blocks, q, k, v, out, lse, *extra,
            *_batch_strides(q, varlen), *_batch_strides(k, varlen), *_batch_strides(v, varlen),
            *_batch_strides(out, varlen), *lstr, *mstr, *lens, H, H // k.shape[1], scale * LOG2E, **flags)
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, causal, blocks=None):
    """Backward of the op contract: (dq, dk, dv) in the memory order of q, k, v.

    ``blocks``: fixed {"dkdv": (BLOCK_M, BLOCK_N), "dq": (BLOCK_M, BLOCK_N)} instead of autotuning."""
    B, H, L, _ = q.shape
    Hk = k.shape[1]
    varlen = cu_q is not None
    n_seq, grid_lens, extra, mstr, lens, flags = _common(q, k, v, mask, cu_q, cu_k, max_q, max_k, causal)
    delta = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    pre_block = 16 if interpret_mode() else 64
    _launch(_bwd_preprocess, (triton.cdiv(L, pre_block), B * H), None, out, dout, delta, *out.stride(),
            *dout.stride(), L, H, DV=v.shape[-1], BLOCK_DV=flags["BLOCK_DV"], BLOCK_M=pre_block)
    alloc = torch.zeros_like if varlen else torch.empty_like  # varlen: rows outside every sequence get 0
    dq, dk, dv = alloc(q), alloc(k), alloc(v)
    lstr = (0 if varlen else lse.stride(0), lse.stride(1), lse.stride(2))
    qkv_do = (*_batch_strides(q, varlen), *_batch_strides(k, varlen), *_batch_strides(v, varlen),
              *_batch_strides(dout, varlen))

    def grid_kv(meta):
        return (triton.cdiv(grid_lens[1], meta["BLOCK_N"]), n_seq * Hk)

    _launch(_attn_bwd_dkdv, grid_kv, blocks and blocks["dkdv"], q, k, v, dout, dk, dv, lse, delta, *extra, *qkv_do,
            *_batch_strides(dk, varlen), *_batch_strides(dv, varlen), *lstr, *mstr, *lens, Hk, H // Hk,
            scale, scale * LOG2E, **flags)

    def grid_q(meta):
        return (triton.cdiv(grid_lens[0], meta["BLOCK_M"]), n_seq * H)

    _launch(_attn_bwd_dq, grid_q, blocks and blocks["dq"], q, k, v, dout, dq, lse, delta, *extra, *qkv_do,
            *_batch_strides(dq, varlen), *lstr, *mstr, *lens, H, H // Hk, scale, scale * LOG2E, **flags)
    return dq, dk, dv


__all__ = ["attention_fwd", "attention_bwd", "block_dim", "MAX_HEAD_DIM"]
