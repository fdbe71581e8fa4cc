"""Prefill attention forward and backward in Triton (no L x S buffer in memory): one set of ``tl``
kernels with two lowerings chosen per device (:func:`kernel_path`), and on Hopper a warp-specialised
Gluon forward (:mod:`seqgen_fast.kernels.attention_gluon`, :func:`forward_path`) whose twin is this
module's forward: the same math and tile helpers (:mod:`seqgen_fast.kernels.attention_tiles`).

Contract (shared with ``seqgen_fast.reference.attention``, whose docstring states it fully, with the
flash-attn features): ``q (B, H, L, E)``, ``k (B, Hk, S, E)``, ``v (B, Hk, S, Ev)``, any strides
(the flash layout ``(B, L, H, D)`` arrives as a transposed view, never copied); query head ``h``
reads kv head ``h // (H // Hk)``; optional ``mask`` broadcast to ``(B, H, L, S)`` through its
strides (bool True = attend, float added); packed varlen batches through ``cu_q``/``cu_k`` (int32,
then ``B == 1`` and the tiles run over the sequences). Per (query row i, key j), in the log2 domain::

    z = scale q.k;  s = softcap tanh(z / softcap) (softcap > 0) or z;  s -= slope |i + S - L - j| (ALiBi)
    s = -inf outside the band [i + shift - left, i + shift + right] (causal: right = min(right, 0))

Forward, per (query block, batch x head) tile: online softmax over the key blocks of the band,
keeping the running row max ``m``, sum ``l`` and unnormalised output ``acc``::

    m' = max(m, rowmax(s));  p = 2^(s - m');  l = l 2^(m - m') + rowsum(p);  acc = acc 2^(m - m') + (p keep / (1-p_drop)) v

then ``out = acc / l`` and ``lse = (m + log2 l) ln 2``; a row with no visible key gets ``out = 0``,
``lse = -inf``. ``max`` is NaN-keeping (``attention_tiles.nan_max`` / ``row_max``: ``max.NaN.f32``)
so compiled kernels follow the non-finite policy of ``seqgen_fast.ops.attention`` as the
interpreter does. The key range of a query block is split in three: blocks crossing the band's left
edge (masked), blocks wholly inside the band (no masking arithmetic), blocks crossing its right edge
or the key tail (masked); blocks outside the band are never visited, so a sliding window costs
time proportional to the window. Tiles run in a persistent loop ordered longest first (query
blocks from the last: under a causal band those see the most keys). Dropout keeps ``p`` where
``tl.rand(seed, offset + counter) >= p_drop`` (Philox, counter as in the reference), so the
backward regenerates the same mask from ``(seed, offset)`` alone. The ``tl`` forward runs the
blocks one after the other (scores, softmax, ``p v``); the Gluon forward overlaps each block's
softmax with the previous block's ``p v`` wgmma and the other consumer warpgroup's matmuls.

Backward: ``delta = rowsum(dO * O)``; one program per (key block, batch x kv head) holds K and V in
shared memory for its whole loop over every query block of every query head of its GQA group and
accumulates ``dV = sum Pd^T dO``, ``dK = scale sum dZ^T Q`` with ``P = 2^(s - lse)`` recomputed,
``dS = P (dP keep / (1-p) - delta)``, ``dZ = dS (1 - tanh^2)`` (softcap) or ``dS``. dQ either comes
from a separate pass (one program per query block, keys in a fixed order: bit-identical runs;
Hopper's default and every ``deterministic=True`` call) or is added by the dK/dV program into a
float32 buffer with atomics (``scale dZ K``; TMA bulk reductions on Hopper; Ampere's default):
:func:`fused_dq_default` says why. Extra memory: lse and delta (4 bytes per query row and head),
the float32 dQ buffer when fused: O(S).

Lowerings of the ``tl`` kernels (the ``TMA`` constexpr, chosen by :func:`kernel_path`):

* **hopper** (sm_90+, fp16/bf16, unit inner strides, 16-byte aligned rows): Q, K, V, O, dO move
  through TMA tensor descriptors made per sequence in the kernel (``tl.make_tensor_descriptor``:
  shape = the sequence, so its tail is zero-filled by the copy engine and stores are clipped),
  pipelined over ``num_stages`` mbarrier-tracked buffers; the forward's grid is persistent (one
  program per SM). Triton's own warp specialisation (``tl.range(warp_specialize=True)``) is not
  used: on sm_90 it needs 4 warps and a loop without loop-carried softmax state, and aborts in its
  data partitioning on this kernel's loop; the Gluon forward specialises warps explicitly.
* **portable** (Ampere and older, float32, other strides): pointer loads with masks (cp.async
  pipelining), one program per tile, the same math.

float32 inputs compute their dots in IEEE float32 (``input_precision="ieee"``, not TF32). Head dims
up to 256 (E and Ev independently) are padded to a power-of-two block and masked. Block sizes come
from :mod:`seqgen_fast.kernels._tuning` (keyed on the lowering, head dims, dtype, flags and
sequence-length buckets; never tuned inside a graph capture). Under ``TRITON_INTERPRET=1`` small
blocks run.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .._backend import interpret_mode
from .._contract import TOP_LEFT, attention_output
from . import attention_tuned
from ._tuning import Config, Tuner, seq_bucket
from .attention_tiles import (LOG2E, dropout_keep, nan_max, query_ranges, query_tile, row_max, sequence_of,
                              tile_scores)

MAX_HEAD_DIM = 256
# Under Triton's CPU interpreter (3.9): tl.dot returns garbage on bfloat16 operands, so they are
# widened to float32 first (exact: P is still rounded to the input dtype before); descriptors have no
# atomic_add, so the fused dQ adds through pointer atomics.
_INTERPRETED = tl.constexpr(interpret_mode())


def block_dim(d: int) -> int:
    """Power-of-two block covering head dim ``d`` (at least 16, tl.dot's smallest K)."""
    return max(16, triton.next_power_of_2(d))


# ----------------------------------------------------------------------------------------------
# Shared tile helpers
# ----------------------------------------------------------------------------------------------
@triton.jit
def _dot(a, b, IEEE: tl.constexpr):
    if IEEE:
        return tl.dot(a, b, input_precision="ieee")
    if _INTERPRETED:
        return tl.dot(a.to(tl.float32), b.to(tl.float32))
    return tl.dot(a, b)


@triton.jit
def _rows(base, n_rows, stride_r, NCOLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
          TMA: tl.constexpr):
    """The source of an (n_rows, NCOLS) row-major tile stream at ``base``: a TMA descriptor whose
    shape is exactly those rows (tails zero-filled, stores clipped), or the pointer itself."""
    if TMA:
        return tl.make_tensor_descriptor(base, shape=[n_rows, NCOLS], strides=[stride_r, 1],
                                         block_shape=[BLOCK_R, BLOCK_C])
    else:
        return base


@triton.jit
def _load(src, row0, n_rows, stride_r, stride_c, NCOLS: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
          TMA: tl.constexpr):
    """Rows [row0, row0 + BLOCK_R) of a :func:`_rows` source, 0 past ``n_rows`` and ``NCOLS``."""
    if TMA:
        return src.load([row0, 0])
    else:
        r = row0 + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        return tl.load(src + r[:, None] * stride_r + c[None, :] * stride_c,
                       mask=(r[:, None] < n_rows) & (c[None, :] < NCOLS), other=0.0)


@triton.jit
def _store(dst, row0, n_rows, value, stride_r, stride_c, NCOLS: tl.constexpr, BLOCK_R: tl.constexpr,
           BLOCK_C: tl.constexpr, TMA: tl.constexpr, ADD: tl.constexpr = False):
    """Write (or with ``ADD`` add, atomically per element) ``value`` into rows [row0, row0 +
    BLOCK_R) of a :func:`_rows` destination: TMA (a bulk reduction for ``ADD``: no per-element
    addresses in registers) or masked pointer stores / atomics."""
    if TMA:
        if ADD:
            dst.atomic_add([row0, 0], value)
        else:
            dst.store([row0, 0], value)
    else:
        r = row0 + tl.arange(0, BLOCK_R)
        c = tl.arange(0, BLOCK_C)
        inside = (r[:, None] < n_rows) & (c[None, :] < NCOLS)
        if ADD:
            tl.atomic_add(dst + r[:, None] * stride_r + c[None, :] * stride_c, value, mask=inside, sem="relaxed")
        else:
            tl.store(dst + r[:, None] * stride_r + c[None, :] * stride_c, value, mask=inside)


@triton.jit
def _philox_key(RNG, DROPOUT: tl.constexpr):
    """(seed, offset) of the dropout stream: the int64 pair at ``RNG`` (never read without dropout)."""
    seed = 0
    offset = 0
    if DROPOUT:
        seed = tl.load(RNG)
        offset = tl.load(RNG + 1)
    return seed, offset


# ----------------------------------------------------------------------------------------------
# Forward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _fwd_softmax(acc, l_i, m_i, qk, start_n, offs_m, q_len, k_len, shift, slope, mask_base, row_ids, seed, rng_offset,
                 seqlen_k, k_start, dropout_p, drop_scale, qk_scale, softcap_scale, softcap_mul, win_left, win_right,
                 stride_mm, stride_mn, BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr,
                 DROPOUT: tl.constexpr, MASKED: tl.constexpr):
    """The online-softmax step of key block ``start_n`` from its raw products ``qk``: (``acc``
    rescaled to the new row max, new row sum, new row max, the block's float32 probabilities with
    dropout applied, whose ``p v`` the caller adds)."""
    cols = start_n + tl.arange(0, BLOCK_N)
    s, _ = tile_scores(qk, offs_m[:, None], cols[None, :], q_len, k_len, shift, slope, mask_base, stride_mm,
                       stride_mn, qk_scale, softcap_scale, softcap_mul, win_left, win_right, HAS_MASK, MASK_BOOL,
                       SOFTCAP, ALIBI, BAND_LEFT, BAND_RIGHT, MASKED)
    m_new = nan_max(m_i, row_max(s, 1))  # NaN-keeping, as the interpreter: see attention_tiles
    m_use = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row masked so far stays at p = 0
    p = tl.math.exp2(s - m_use[:, None])
    alpha = tl.math.exp2(m_i - m_use)
    l_i = l_i * alpha + tl.sum(p, 1)
    if DROPOUT:
        keep = dropout_keep(seed, rng_offset, row_ids[:, None], k_start + cols[None, :], seqlen_k, dropout_p)
        p = tl.where(keep, p * drop_scale, 0.0)
    return acc * alpha[:, None], l_i, m_new, p


@triton.jit
def _fwd_range(acc, l_i, m_i, q, k_src, v_src, offs_m, lo, hi, q_len, k_len, shift, slope, mask_base, row_ids, seed,
               rng_offset, seqlen_k, k_start, dropout_p, drop_scale, qk_scale, softcap_scale, softcap_mul, win_left,
               win_right, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
               D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
               BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SOFTCAP: tl.constexpr,
               ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
               IEEE: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr):
    """Key blocks [lo, hi) into (acc, l, m), one block after the other."""
    for start_n in range(lo, hi, BLOCK_N):
        qk = _dot(q, tl.trans(_load(k_src, start_n, k_len, stride_kn, stride_kd, D, BLOCK_N, BLOCK_D, TMA)), IEEE)
        acc, l_i, m_i, p = _fwd_softmax(acc, l_i, m_i, qk, start_n, offs_m, q_len, k_len, shift, slope, mask_base,
                                        row_ids, seed, rng_offset, seqlen_k, k_start, dropout_p, drop_scale, qk_scale,
                                        softcap_scale, softcap_mul, win_left, win_right, stride_mm, stride_mn, BLOCK_N,
                                        HAS_MASK, MASK_BOOL, SOFTCAP, ALIBI, BAND_LEFT, BAND_RIGHT, DROPOUT, MASKED)
        v = _load(v_src, start_n, k_len, stride_vn, stride_vd, DV, BLOCK_N, BLOCK_DV, TMA)
        acc += _dot(p.to(q.dtype), v, IEEE)
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(Q, K, V, O, LSE, MASK, CU_Q, CU_K, SLOPES, RNG,
              stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
              stride_vb, stride_vh, stride_vn, stride_vd, stride_ob, stride_oh, stride_om, stride_od,
              stride_lb, stride_lh, stride_lm, stride_mb, stride_mh, stride_mm, stride_mn, stride_ab, stride_ah,
              seqlen_q, seqlen_k, H, GROUP, n_bh, n_mblocks, qk_scale, softcap_scale, softcap_mul, win_left,
              win_right, dropout_p, drop_scale,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_VARLEN: tl.constexpr,
              SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr,
              DROPOUT: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr, BLOCK_M: tl.constexpr,
              BLOCK_N: tl.constexpr):
    seed, rng_offset = _philox_key(RNG, DROPOUT)
    for tile in range(tl.program_id(0), n_bh * n_mblocks, tl.num_programs(0)):  # persistent: grid <= tiles
        b, h, q_start, q_len, k_start, k_len, shift, m0, lo, a, bb, hi = query_tile(
            tile, n_bh, n_mblocks, H, CU_Q, CU_K, seqlen_q, seqlen_k, win_left, win_right, BOTTOM_RIGHT, IS_VARLEN,
            BAND_LEFT, BAND_RIGHT, BLOCK_M, BLOCK_N)
        if m0 < q_len:
            b64 = b.to(tl.int64)
            hk = (h // GROUP).to(tl.int64)
            q_src = _rows(Q + b64 * stride_qb + h.to(tl.int64) * stride_qh + q_start.to(tl.int64) * stride_qm, q_len,
                          stride_qm, D, BLOCK_M, BLOCK_D, TMA)
            k_src = _rows(K + b64 * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_kn, k_len, stride_kn,
                          D, BLOCK_N, BLOCK_D, TMA)
            v_src = _rows(V + b64 * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vn, k_len, stride_vn,
                          DV, BLOCK_N, BLOCK_DV, TMA)
            mask_base = MASK + b64 * stride_mb + h.to(tl.int64) * stride_mh
            slope = 0.0
            if ALIBI:
                slope = tl.load(SLOPES + b64 * stride_ab + h * stride_ah).to(tl.float32) * 1.4426950408889634
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ids = (b64 * (1 - IS_VARLEN) * H + h) * seqlen_q + q_start + offs_m
            q = _load(q_src, m0, q_len, stride_qm, stride_qd, D, BLOCK_M, BLOCK_D, TMA)
            m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
            l_i = tl.zeros([BLOCK_M], tl.float32)
            acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
            bounds = (lo, a, bb, hi)
            for r in tl.static_range(3):  # masked, unmasked, masked ranges
                acc, l_i, m_i = _fwd_range(acc, l_i, m_i, q, k_src, v_src, offs_m, bounds[r], bounds[r + 1], q_len,
                                           k_len, shift, slope, mask_base, row_ids, seed, rng_offset, seqlen_k,
                                           k_start, dropout_p, drop_scale, qk_scale, softcap_scale, softcap_mul,
                                           win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd,
                                           stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_MASK,
                                           MASK_BOOL, SOFTCAP, ALIBI, BAND_LEFT, BAND_RIGHT, DROPOUT, IEEE, TMA,
                                           r != 1)
            empty = l_i == 0.0
            l_safe = tl.where(empty, 1.0, l_i)
            acc = acc / l_safe[:, None]
            lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
            o_dst = _rows(O + b64 * stride_ob + h.to(tl.int64) * stride_oh + q_start.to(tl.int64) * stride_om, q_len,
                          stride_om, DV, BLOCK_M, BLOCK_DV, TMA)
            _store(o_dst, m0, q_len, acc.to(O.dtype.element_ty), stride_om, stride_od, DV, BLOCK_M, BLOCK_DV, TMA)
            l_base = LSE + b64 * stride_lb + h.to(tl.int64) * stride_lh + q_start.to(tl.int64) * stride_lm
            tl.store(l_base + offs_m * stride_lm, lse, mask=offs_m < q_len)


# ----------------------------------------------------------------------------------------------
# Backward
# ----------------------------------------------------------------------------------------------
@triton.jit
def _bwd_preprocess(O, DO, DELTA, stride_ob, stride_oh, stride_om, stride_od,
                    stride_db, stride_dh, stride_dm, stride_dd, stride_lb, stride_lh, stride_lm, L, H,
                    DV: tl.constexpr, BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr):
    """delta[b, h, m] = sum_d dO[b, h, m, d] O[b, h, m, d] (float32, with lse's strides)."""
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
    tl.store(DELTA + b * stride_lb + h * stride_lh + offs_m * stride_lm, tl.sum(o * do, 1), mask=offs_m < L)


@triton.jit
def _grad_scores(qk, dp, rows, cols, lse, delta, q_len, k_len, shift, slope, mask_base, row_ids, seed, rng_offset,
                 seqlen_k, k_start, dropout_p, drop_scale, qk_scale, softcap_scale, softcap_mul, win_left, win_right,
                 stride_mm, stride_mn, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SOFTCAP: tl.constexpr,
                 ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
                 MASKED: tl.constexpr):
    """(Pd = P keep / (1 - p), dZ) of one tile from its products ``qk`` and ``dp = dO . v``, in
    either orientation (``rows``/``cols``/``lse``/``delta``/``row_ids`` broadcast to the tile)."""
    s, t = tile_scores(qk, rows, cols, q_len, k_len, shift, slope, mask_base, stride_mm, stride_mn, qk_scale,
                   softcap_scale, softcap_mul, win_left, win_right, HAS_MASK, MASK_BOOL, SOFTCAP, ALIBI, BAND_LEFT,
                   BAND_RIGHT, MASKED)
    p = tl.math.exp2(s - lse)
    pd = p
    if DROPOUT:
        keep = dropout_keep(seed, rng_offset, row_ids, k_start + cols, seqlen_k, dropout_p)
        pd = tl.where(keep, p * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = p * (dp - delta)
    if SOFTCAP:
        ds = ds * (1.0 - t * t)
    return pd, ds


@triton.jit
def _dkdv_range(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_dst, mask_base, offs_n, lo, hi, q_len, k_len,
                shift, slope, row0, seed, rng_offset, seqlen_k, k_start, dropout_p, drop_scale, sm_scale, qk_scale,
                softcap_scale, softcap_mul, win_left, win_right, stride_qm, stride_qd, stride_dom, stride_dod,
                stride_lm, stride_dqm, stride_dqd, stride_mm, stride_mn,
                D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                BLOCK_M: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SOFTCAP: tl.constexpr,
                ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
                IEEE: tl.constexpr, TMA: tl.constexpr, FUSED_DQ: tl.constexpr, MASKED: tl.constexpr):
    """Query blocks [lo, hi) of one query head into (dK, dV) of a key block; with ``FUSED_DQ`` their
    dQ share goes to the float32 buffer by atomics."""
    for start_m in range(lo, hi, BLOCK_M):
        offs_m = start_m + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        q = _load(q_src, start_m, q_len, stride_qm, stride_qd, D, BLOCK_M, BLOCK_D, TMA)
        do = _load(do_src, start_m, q_len, stride_dom, stride_dod, DV, BLOCK_M, BLOCK_DV, TMA)
        # rows past the end or with no visible key: lse = +inf makes their P exactly 0
        lse = tl.load(lse_base + offs_m * stride_lm, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(delta_base + offs_m * stride_lm, mask=row_ok, other=0.0)
        qk_t = _dot(k, tl.trans(q), IEEE)  # (BLOCK_N, BLOCK_M): scores transposed
        dp_t = _dot(v, tl.trans(do), IEEE)
        pd_t, ds_t = _grad_scores(qk_t, dp_t, offs_m[None, :], offs_n[:, None], lse[None, :], delta[None, :], q_len,
                                  k_len, shift, slope, mask_base, (row0 + offs_m)[None, :], seed, rng_offset,
                                  seqlen_k, k_start, dropout_p, drop_scale, qk_scale, softcap_scale, softcap_mul,
                                  win_left, win_right, stride_mm, stride_mn, HAS_MASK, MASK_BOOL, SOFTCAP, ALIBI,
                                  BAND_LEFT, BAND_RIGHT, DROPOUT, MASKED)
        if start_m + BLOCK_M > q_len:  # the last block's rows past q_len: their zero q / dO times an inf /
            pd_t = tl.where(row_ok[None, :], pd_t, 0.0)  # NaN k or v are NaN, which must not reach dK / dV
            ds_t = tl.where(row_ok[None, :], ds_t, 0.0)
        dv += _dot(pd_t.to(do.dtype), do, IEEE)
        dk += _dot(ds_t.to(q.dtype), q, IEEE)
        if FUSED_DQ:  # key rows past k_len (unmasked query ranges skip the key bound): 0 * inf in q is NaN
            ds_q = tl.where((offs_n < k_len)[:, None], ds_t, 0.0)
            dq = _dot(tl.trans(ds_q).to(k.dtype), k, IEEE) * sm_scale
            _store(dq_dst, start_m, q_len, dq, stride_dqm, stride_dqd, D, BLOCK_M, BLOCK_D, TMA and not _INTERPRETED,
                   True)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(Q, K, V, DO, DK, DVT, DQ, LSE, DELTA, MASK, CU_Q, CU_K, SLOPES, RNG,
                   stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                   stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                   stride_dkb, stride_dkh, stride_dkn, stride_dkd, stride_dvb, stride_dvh, stride_dvn, stride_dvd,
                   stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                   stride_lb, stride_lh, stride_lm, stride_mb, stride_mh, stride_mm, stride_mn, stride_ab, stride_ah,
                   seqlen_q, seqlen_k, HK, GROUP, n_bh, sm_scale, qk_scale, softcap_scale, softcap_mul, win_left,
                   win_right, dropout_p, drop_scale,
                   D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                   BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr,
                   IS_VARLEN: tl.constexpr, SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr,
                   BAND_RIGHT: tl.constexpr, DROPOUT: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
                   FUSED_DQ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    tile = tl.program_id(0)  # key block major: under a causal band the first key blocks see the most rows
    b, hk, q_start, q_len, k_start, k_len, shift = sequence_of(tile % n_bh, HK, CU_Q, CU_K, seqlen_q, seqlen_k,
                                                             BOTTOM_RIGHT, IS_VARLEN)
    n0 = (tile // n_bh) * BLOCK_N
    if n0 < k_len:
        seed, rng_offset = _philox_key(RNG, DROPOUT)
        b64 = b.to(tl.int64)
        hk64 = hk.to(tl.int64)
        k_row0 = k_start.to(tl.int64)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        k_src = _rows(K + b64 * stride_kb + hk64 * stride_kh + k_row0 * stride_kn, k_len, stride_kn, D, BLOCK_N,
                      BLOCK_D, TMA)
        v_src = _rows(V + b64 * stride_vb + hk64 * stride_vh + k_row0 * stride_vn, k_len, stride_vn, DV, BLOCK_N,
                      BLOCK_DV, TMA)
        k = _load(k_src, n0, k_len, stride_kn, stride_kd, D, BLOCK_N, BLOCK_D, TMA)   # on chip for the whole loop
        v = _load(v_src, n0, k_len, stride_vn, stride_vd, DV, BLOCK_N, BLOCK_DV, TMA)
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        lo, a, bb, hi = query_ranges(n0, q_len, k_len, shift, win_left, win_right, BAND_LEFT, BAND_RIGHT,
                                      BLOCK_M, BLOCK_N)
        q_row0 = q_start.to(tl.int64)
        for g in range(GROUP):
            h = hk64 * GROUP + g
            q_src = _rows(Q + b64 * stride_qb + h * stride_qh + q_row0 * stride_qm, q_len, stride_qm, D, BLOCK_M,
                          BLOCK_D, TMA)
            do_src = _rows(DO + b64 * stride_dob + h * stride_doh + q_row0 * stride_dom, q_len, stride_dom, DV,
                           BLOCK_M, BLOCK_DV, TMA)
            lse_base = LSE + b64 * stride_lb + h * stride_lh + q_row0 * stride_lm
            delta_base = DELTA + b64 * stride_lb + h * stride_lh + q_row0 * stride_lm
            dq_dst = _rows(DQ + b64 * stride_dqb + h * stride_dqh + q_row0 * stride_dqm, q_len, stride_dqm, D,
                           BLOCK_M, BLOCK_D, TMA and FUSED_DQ and not _INTERPRETED)
            mask_base = MASK + b64 * stride_mb + h * stride_mh
            slope = 0.0
            if ALIBI:
                slope = tl.load(SLOPES + b64 * stride_ab + h * stride_ah).to(tl.float32) * 1.4426950408889634
            row0 = (b64 * (1 - IS_VARLEN) * (HK * GROUP) + h) * seqlen_q + q_start
            bounds = (lo, a, bb, hi)
            for r in tl.static_range(3):  # masked, unmasked, masked ranges
                dk, dv = _dkdv_range(dk, dv, k, v, q_src, do_src, lse_base, delta_base, dq_dst, mask_base, offs_n,
                                     bounds[r], bounds[r + 1],
                                     q_len, k_len, shift, slope, row0, seed, rng_offset, seqlen_k, k_start, dropout_p,
                                     drop_scale, sm_scale, qk_scale, softcap_scale, softcap_mul, win_left, win_right,
                                     stride_qm, stride_qd, stride_dom, stride_dod, stride_lm, stride_dqm, stride_dqd,
                                     stride_mm, stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_M, HAS_MASK, MASK_BOOL,
                                     SOFTCAP, ALIBI, BAND_LEFT, BAND_RIGHT, DROPOUT, IEEE, TMA, FUSED_DQ, r != 1)
        dk_dst = _rows(DK + b64 * stride_dkb + hk64 * stride_dkh + k_row0 * stride_dkn, k_len, stride_dkn, D, BLOCK_N,
                       BLOCK_D, TMA)
        dv_dst = _rows(DVT + b64 * stride_dvb + hk64 * stride_dvh + k_row0 * stride_dvn, k_len, stride_dvn, DV,
                       BLOCK_N, BLOCK_DV, TMA)
        _store(dk_dst, n0, k_len, (dk * sm_scale).to(DK.dtype.element_ty), stride_dkn, stride_dkd, D, BLOCK_N,
               BLOCK_D, TMA)
        _store(dv_dst, n0, k_len, dv.to(DVT.dtype.element_ty), stride_dvn, stride_dvd, DV, BLOCK_N, BLOCK_DV, TMA)


@triton.jit
def _dq_range(dq, q, do, lse, delta, k_src, v_src, offs_m, lo, hi, q_len, k_len, shift, slope, mask_base, row_ids,
              seed, rng_offset, seqlen_k, k_start, dropout_p, drop_scale, qk_scale, softcap_scale, softcap_mul,
              win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm, stride_mn,
              D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
              BLOCK_N: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SOFTCAP: tl.constexpr,
              ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr, DROPOUT: tl.constexpr,
              IEEE: tl.constexpr, TMA: tl.constexpr, MASKED: tl.constexpr):
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load(k_src, start_n, k_len, stride_kn, stride_kd, D, BLOCK_N, BLOCK_D, TMA)
        v = _load(v_src, start_n, k_len, stride_vn, stride_vd, DV, BLOCK_N, BLOCK_DV, TMA)
        qk = _dot(q, tl.trans(k), IEEE)
        dp = _dot(do, tl.trans(v), IEEE)
        _, ds = _grad_scores(qk, dp, offs_m[:, None], offs_n[None, :], lse[:, None], delta[:, None], q_len, k_len,
                             shift, slope, mask_base, row_ids[:, None], seed, rng_offset, seqlen_k, k_start, dropout_p,
                             drop_scale, qk_scale, softcap_scale, softcap_mul, win_left, win_right, stride_mm,
                             stride_mn, HAS_MASK, MASK_BOOL, SOFTCAP, ALIBI, BAND_LEFT, BAND_RIGHT, DROPOUT, MASKED)
        dq += _dot(ds.to(k.dtype), k, IEEE)
    return dq


@triton.jit
def _attn_bwd_dq(Q, K, V, DO, DQ, LSE, DELTA, MASK, CU_Q, CU_K, SLOPES, RNG,
                 stride_qb, stride_qh, stride_qm, stride_qd, stride_kb, stride_kh, stride_kn, stride_kd,
                 stride_vb, stride_vh, stride_vn, stride_vd, stride_dob, stride_doh, stride_dom, stride_dod,
                 stride_dqb, stride_dqh, stride_dqm, stride_dqd,
                 stride_lb, stride_lh, stride_lm, stride_mb, stride_mh, stride_mm, stride_mn, stride_ab, stride_ah,
                 seqlen_q, seqlen_k, H, GROUP, n_bh, n_mblocks, sm_scale, qk_scale, softcap_scale, softcap_mul,
                 win_left, win_right, dropout_p, drop_scale,
                 D: tl.constexpr, DV: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_DV: tl.constexpr,
                 BOTTOM_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, IS_VARLEN: tl.constexpr,
                 SOFTCAP: tl.constexpr, ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr,
                 DROPOUT: tl.constexpr, IEEE: tl.constexpr, TMA: tl.constexpr,
                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The separate dQ pass: one program per (query block, batch x head), keys in a fixed order, dQ
    written once in DQ's dtype."""
    b, h, q_start, q_len, k_start, k_len, shift, m0, lo, a, bb, hi = query_tile(
        tl.program_id(0), n_bh, n_mblocks, H, CU_Q, CU_K, seqlen_q, seqlen_k, win_left, win_right, BOTTOM_RIGHT,
        IS_VARLEN, BAND_LEFT, BAND_RIGHT, BLOCK_M, BLOCK_N)
    if m0 < q_len:
        seed, rng_offset = _philox_key(RNG, DROPOUT)
        b64 = b.to(tl.int64)
        h64 = h.to(tl.int64)
        hk = (h // GROUP).to(tl.int64)
        q_row0 = q_start.to(tl.int64)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        row_ok = offs_m < q_len
        q_src = _rows(Q + b64 * stride_qb + h64 * stride_qh + q_row0 * stride_qm, q_len, stride_qm, D, BLOCK_M,
                      BLOCK_D, TMA)
        do_src = _rows(DO + b64 * stride_dob + h64 * stride_doh + q_row0 * stride_dom, q_len, stride_dom, DV, BLOCK_M,
                       BLOCK_DV, TMA)
        k_src = _rows(K + b64 * stride_kb + hk * stride_kh + k_start.to(tl.int64) * stride_kn, k_len, stride_kn, D,
                      BLOCK_N, BLOCK_D, TMA)
        v_src = _rows(V + b64 * stride_vb + hk * stride_vh + k_start.to(tl.int64) * stride_vn, k_len, stride_vn, DV,
                      BLOCK_N, BLOCK_DV, TMA)
        l_off = b64 * stride_lb + h64 * stride_lh + q_row0 * stride_lm
        mask_base = MASK + b64 * stride_mb + h64 * stride_mh
        slope = 0.0
        if ALIBI:
            slope = tl.load(SLOPES + b64 * stride_ab + h * stride_ah).to(tl.float32) * 1.4426950408889634
        row_ids = (b64 * (1 - IS_VARLEN) * H + h) * seqlen_q + q_start + offs_m
        q = _load(q_src, m0, q_len, stride_qm, stride_qd, D, BLOCK_M, BLOCK_D, TMA)
        do = _load(do_src, m0, q_len, stride_dom, stride_dod, DV, BLOCK_M, BLOCK_DV, TMA)
        lse = tl.load(LSE + l_off + offs_m * stride_lm, mask=row_ok, other=float("inf")) * 1.4426950408889634
        lse = tl.where(lse == float("-inf"), float("inf"), lse)
        delta = tl.load(DELTA + l_off + offs_m * stride_lm, mask=row_ok, other=0.0)
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        bounds = (lo, a, bb, hi)
        for r in tl.static_range(3):  # masked, unmasked, masked ranges
            dq = _dq_range(dq, q, do, lse, delta, k_src, v_src, offs_m, bounds[r], bounds[r + 1], q_len, k_len, shift,
                           slope, mask_base,
                           row_ids, seed, rng_offset, seqlen_k, k_start, dropout_p, drop_scale, qk_scale, softcap_scale,
                           softcap_mul, win_left, win_right, stride_kn, stride_kd, stride_vn, stride_vd, stride_mm,
                           stride_mn, D, DV, BLOCK_D, BLOCK_DV, BLOCK_N, HAS_MASK, MASK_BOOL, SOFTCAP, ALIBI,
                           BAND_LEFT, BAND_RIGHT, DROPOUT, IEEE, TMA, r != 1)
        dq_base = DQ + b64 * stride_dqb + h64 * stride_dqh + q_row0 * stride_dqm
        offs_d = tl.arange(0, BLOCK_D)
        tl.store(dq_base + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd, dq * sm_scale,
                 mask=row_ok[:, None] & (offs_d[None, :] < D))


# ----------------------------------------------------------------------------------------------
# Lowering choice, configs, launchers
# ----------------------------------------------------------------------------------------------
HOPPER, PORTABLE = "hopper", "portable"
WARP_SPECIALIZED = "hopper-ws"  # the forward's Gluon kernel (attention_gluon)
try:
    from . import attention_gluon
except ImportError as e:  # a Triton without the Gluon Hopper dialect (before 3.5)
    attention_gluon, _NO_GLUON = None, f"triton {triton.__version__} has no Gluon Hopper dialect ({e})"
else:
    _NO_GLUON = ""


def _tma_reasons(*tensors: torch.Tensor) -> list[str]:
    """Why TMA descriptors cannot stream these (B, H, rows, dim) tensors."""
    why = []
    for t in tensors:
        if t.stride(-1) != 1:
            why.append(f"inner stride {t.stride(-1)} (TMA needs unit-stride rows)")
        elif any((s * t.element_size()) % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            why.append("rows not 16-byte aligned (TMA needs 16-byte aligned rows and base)")
    return why


def kernel_path(device: torch.device, dtype: torch.dtype, *tensors: torch.Tensor) -> tuple[str, str]:
    """(lowering, reason) of the ``tl`` kernels for inputs on ``device``: :data:`HOPPER` (TMA,
    persistent forward) on sm_90+ for fp16/bf16 rows TMA can stream, else :data:`PORTABLE`."""
    if device.type != "cuda":
        return PORTABLE, f"{device.type} tensors (the Hopper lowering needs a CUDA device of sm_90 or newer)"
    major, minor = torch.cuda.get_device_capability(device)
    if major < 9:
        return PORTABLE, f"sm_{major}{minor} has no TMA or wgmma (the Hopper lowering needs sm_90 or newer)"
    if not hasattr(tl, "make_tensor_descriptor"):
        return PORTABLE, f"triton {triton.__version__} has no tl.make_tensor_descriptor"
    if dtype == torch.float32:
        return PORTABLE, "float32 runs IEEE float32 dots, which wgmma does not do"
    why = _tma_reasons(*tensors)
    if why:
        return PORTABLE, why[0]
    return HOPPER, f"sm_{major}{minor}: TMA descriptors, persistent longest-first grid"


def forward_path(device: torch.device, dtype: torch.dtype, q, k, v, has_mask: bool, dropout: bool) -> tuple[str, str]:
    """(lowering, reason) of the forward: :data:`WARP_SPECIALIZED` (the Gluon kernel: a TMA
    producer warp, two consumer warpgroups, softmax overlapped with wgmma) where :func:`kernel_path`
    gives :data:`HOPPER` and the call has no user mask or dropout, equal q/k and v head dims <= 128;
    otherwise :func:`kernel_path`'s choice, with the reason."""
    path, why = kernel_path(device, dtype, q, k, v)
    if path != HOPPER:
        return path, why
    no = [_NO_GLUON] if _NO_GLUON else attention_gluon.reasons(has_mask, dropout, q.shape[-1], v.shape[-1])
    if no:
        return HOPPER, f"{why}; not warp-specialised: {no[0]}"
    return WARP_SPECIALIZED, (f"{why}; warp-specialised (Gluon): TMA producer warp, two consumer warpgroups, "
                              "softmax overlapped with wgmma")


def describe_path(device: torch.device | None = None) -> str:
    """What the Triton attention runs on ``device`` (the current CUDA device by default), with the
    reason, for ``seqgen-fast info``."""
    if device is None:
        if not torch.cuda.is_available():
            return f"{PORTABLE} (no CUDA device)"
        device = torch.device("cuda", torch.cuda.current_device())
    probe = torch.empty(1, 1, 1, 128, dtype=torch.bfloat16, device=device)
    fwd, why = forward_path(device, torch.bfloat16, probe, probe, probe, False, False)
    bwd = kernel_path(device, torch.bfloat16, probe)[0]
    return f"forward {fwd}, backward {bwd} ({why})"


_ALLOCATOR: list[bool] = []


def _ensure_allocator() -> None:
    """In-kernel TMA descriptors need a global scratch allocator; install a torch one unless the
    application set its own."""
    if _ALLOCATOR:
        return
    from triton.runtime import _allocation

    current = getattr(_allocation, "_allocator", None)
    current = current.get() if hasattr(current, "get") else current
    if current is None or isinstance(current, getattr(_allocation, "NullAllocator", ())):
        triton.set_allocator(lambda size, align, stream: torch.empty(size, dtype=torch.int8, device="cuda"))
    _ALLOCATOR.append(True)


_INTERPRETER = {"fwd": Config(32, 16, 4, 1), "dkdv": Config(16, 32, 4, 1), "dq": Config(32, 16, 4, 1)}
# (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and lowering, for head dims up to 128; above,
# only tiles of at most 64 x 64 with <= 2 stages fit shared memory. The Hopper entries are checked by
# ahead-of-time sm_90a compiles under Triton 3.6 and 3.9 (tests/test_attention.py, benchmarks/NOTES.md):
# :func:`_preferred` (the default) is spill-free for its feature class, the others are what tuning tries.
_CANDIDATES = {
    ("fwd", PORTABLE): [(128, 64, 8, 3), (128, 64, 4, 3), (128, 128, 8, 3), (128, 32, 4, 4), (64, 64, 4, 3),
                        (64, 64, 8, 2), (128, 32, 8, 2), (64, 32, 4, 2)],
    ("fwd", HOPPER): [(128, 64, 8, 3), (128, 128, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2), (128, 16, 8, 2),
                      (64, 64, 8, 2)],
    ("dkdv", PORTABLE): [(16, 128, 8, 2), (32, 128, 8, 2), (64, 64, 8, 2), (32, 64, 8, 2), (32, 64, 4, 2),
                         (16, 64, 8, 2), (32, 32, 8, 2)],
    ("dkdv", HOPPER): [(16, 64, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2), (16, 128, 8, 2), (64, 64, 8, 2)],
    ("dq", PORTABLE): [(128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 32, 4, 2),
                       (64, 16, 4, 2)],
    ("dq", HOPPER): [(128, 64, 8, 2), (128, 32, 8, 2), (64, 32, 8, 2), (64, 64, 4, 3)],
}
_SMALL = [(64, 64, 4, 2), (64, 32, 4, 2), (32, 64, 4, 2), (32, 32, 4, 2), (16, 32, 4, 2)]
# The Gluon forward: (128 rows, BLOCK_N, 4 warps per consumer warpgroup, ring STAGES) per head-dim block;
# the first is the default of calls without a left band edge, softcap, ALiBi or varlen offsets,
# :data:`_WS_BANDED` of those (fewer registers per key block: the consumers sit at their 240).
_WS_CANDIDATES = {32: [(128, 128, 4, 3), (128, 128, 4, 4), (128, 64, 4, 4)],
                  64: [(128, 128, 4, 3), (128, 128, 4, 2), (128, 64, 4, 4)],
                  128: [(128, 128, 4, 2), (128, 64, 4, 3), (128, 64, 4, 2)]}
_WS_BANDED = {32: (128, 64, 4, 4), 64: (128, 64, 4, 4), 128: (128, 64, 4, 3)}


def _preferred(kind: str, path: str, block_d: int, flags: dict, fused: bool) -> tuple | None:
    """The default of a Hopper ``tl`` kernel for a feature class, spill-free under Triton 3.6 and 3.9
    where one was found (benchmarks/NOTES.md lists the classes without); None: the table's first."""
    if path != HOPPER:
        return None
    heavy = bool(flags.get("HAS_MASK") or flags.get("DROPOUT"))  # the mask tile's or Philox's registers
    if kind == "fwd":
        if block_d > 128:
            return (64, 64, 8, 2)
        if block_d > 64 and flags.get("MASK_BOOL") and flags.get("BAND_RIGHT"):
            return (128, 16, 8, 2)  # causal + bool mask at D128: 128x32 sits at 255 registers and spills 8 B
        return (128, 32, 8, 2) if heavy else (128, 64, 8, 3)
    if kind == "dkdv" and not fused:
        return (32, 128, 8, 2) if block_d <= 64 and not heavy else (16, 64, 8, 2) if block_d <= 128 else None
    if kind == "dq":
        return (64, 32, 8, 2) if heavy or block_d > 128 else (128, 64, 8, 2)
    return None


def _candidates(key: tuple) -> list[Config]:
    kind, path, _, block_d, block_dv, flags = key[:6]
    flags = dict(flags)
    if path == WARP_SPECIALIZED:
        table = _WS_CANDIDATES[max(block_d, 32)]
        if any(flags.get(f) for f in ("BAND_LEFT", "SOFTCAP", "ALIBI", "IS_VARLEN")):
            first = _WS_BANDED[max(block_d, 32)]
            table = [first] + [c for c in table if c != first]
        return [Config(*c) for c in table]
    table = _CANDIDATES[(kind, path)] if max(block_d, block_dv) <= 128 else _SMALL
    first = _preferred(kind, path, max(block_d, block_dv), flags, key[-1] == "fused")
    if first is not None:
        table = [first] + [c for c in table if c != first]
    elif flags.get("DROPOUT"):  # Philox's registers: narrower key blocks first (the default)
        table = sorted(table, key=lambda c: c[1])
    return [Config(*c) for c in table]


def _default(key: tuple) -> Config:
    return _INTERPRETER[key[0]] if interpret_mode() else _candidates(key)[0]


_TUNERS = {kind: Tuner(f"attention_{kind}", _candidates, _default, attention_tuned.TABLE.get(kind, {}))
           for kind in ("fwd", "dkdv", "dq")}


def _batch_strides(t: torch.Tensor, varlen: bool):
    """Strides (b, h, row, d); the batch stride is 0 for packed varlen (rows are global)."""
    s = t.stride()
    return (0 if varlen else s[0], s[1], s[2], s[3])


@dataclass(frozen=True)
class _Call:
    """What every kernel of one call shares: grid extents, the optional tensors, the scalars and
    the constexpr flags."""

    n_seq: int
    grid_lens: tuple[int, int]
    extra: tuple            # MASK, CU_Q, CU_K, ALIBI, RNG (placeholders where absent: never read)
    mstrides: tuple
    astrides: tuple
    lens: tuple[int, int]   # the kernels' row counts: sequence lengths (dense) or packed totals (varlen)
    scalars: tuple          # qk_scale, softcap_scale, softcap_mul, win_left, win_right, dropout_p, drop_scale
    flags: dict
    path: str

    def key(self, kind: str, dtype: torch.dtype) -> tuple:
        f = self.flags
        named = tuple(sorted((k, v) for k, v in f.items() if k not in ("D", "DV", "BLOCK_D", "BLOCK_DV")))
        return (kind, self.path, str(dtype).removeprefix("torch."), f["BLOCK_D"], f["BLOCK_DV"], named,
                seq_bucket(self.grid_lens[0]), seq_bucket(self.grid_lens[1]))


def _prepare(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, path, *more) -> _Call:
    varlen = cu_q is not None
    n_seq = cu_q.numel() - 1 if varlen else q.shape[0]
    grid_lens = (max_q, max_k) if varlen else (q.shape[2], k.shape[2])  # rows of the longest sequence
    if mask is None:
        mask_arg, mstrides = q, (0, 0, 0, 0)
    else:
        mask_arg = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
        mstrides = mask_arg.stride()
    alibi = feat.alibi
    astrides = (0, 0) if alibi is None else alibi.stride()
    left, right = feat.window_left, feat.window_right
    if causal != 0:
        right = 0 if right < 0 else min(right, 0)
    p = float(feat.dropout_p)
    softcap = float(feat.softcap)
    if path is None:
        path = kernel_path(q.device, q.dtype, q, k, v, *more)[0]
    flags = dict(D=q.shape[-1], DV=v.shape[-1], BLOCK_D=block_dim(q.shape[-1]), BLOCK_DV=block_dim(v.shape[-1]),
                 BOTTOM_RIGHT=causal != TOP_LEFT, HAS_MASK=mask is not None,
                 MASK_BOOL=mask is not None and mask.dtype == torch.bool, IS_VARLEN=varlen, SOFTCAP=softcap > 0,
                 ALIBI=alibi is not None, BAND_LEFT=left >= 0, BAND_RIGHT=right >= 0, DROPOUT=p > 0,
                 IEEE=q.dtype == torch.float32, TMA=path in (HOPPER, WARP_SPECIALIZED))
    scalars = (scale * LOG2E, scale / softcap if softcap > 0 else 0.0, softcap * LOG2E, max(left, 0), max(right, 0),
               p, 1.0 / (1.0 - p) if p < 1 else 0.0)
    extra = (mask_arg, *((cu_q, cu_k) if varlen else (q, q)), q if alibi is None else alibi,
             q if feat.rng is None else feat.rng)
    return _Call(n_seq, grid_lens, extra, mstrides, astrides, (q.shape[2], k.shape[2]), scalars, flags, path)


def _launch(kernel, grid, cfg: Config, *args, **kwargs):
    """Launch ``kernel`` with ``cfg`` on its tensors' device (Triton launches on the current one)."""
    device = args[0].device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        kernel[grid](*args, **kwargs, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps,
                     num_stages=cfg.num_stages)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def ws_arguments(q, k, v, out, lse, c: _Call, cfg: Config) -> tuple[tuple, dict]:
    """(runtime arguments, constexprs) of the Gluon forward ``attention_gluon.attn_fwd_ws`` for one
    call (its launch and its CPU emulation in the tests share this)."""
    varlen = c.flags["IS_VARLEN"]
    H = q.shape[1]
    n_m = triton.cdiv(c.grid_lens[0], cfg.block_m)
    lstr = (0 if varlen else lse.stride(0), lse.stride(1), lse.stride(2))
    f = c.flags
    args = (q, k, v, out, lse, *c.extra[1:4], *_batch_strides(q, varlen)[:3], *_batch_strides(k, varlen)[:3],
            *_batch_strides(v, varlen)[:3], *_batch_strides(out, varlen)[:3], *lstr, *c.astrides, *c.lens, H,
            H // k.shape[1], c.n_seq * H, n_m, *c.scalars[:5])
    consts = dict(D=f["D"], BLOCK_D=max(f["BLOCK_D"], 32), BOTTOM_RIGHT=f["BOTTOM_RIGHT"], IS_VARLEN=varlen,
                  SOFTCAP=f["SOFTCAP"], ALIBI=f["ALIBI"], BAND_LEFT=f["BAND_LEFT"], BAND_RIGHT=f["BAND_RIGHT"],
                  BLOCK_N=cfg.block_n, STAGES=cfg.num_stages)
    return args, consts


def attention_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, *, tune=True, config=None,
                  path=None):
    """Forward of the op contract: (out (B, H, L, Ev) in q's memory order, lse (B, H, L) float32).

    ``config``: a fixed :class:`Config` instead of the tuned one; ``path``: force a lowering."""
    B, H, L, _ = q.shape
    if path is None:
        path = forward_path(q.device, q.dtype, q, k, v, mask is not None, feat.dropout_p > 0)[0]
    c = _prepare(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, path)
    varlen = cu_q is not None
    if c.path != PORTABLE:
        _ensure_allocator()

    def run(cfg: Config, out=None, lse=None):
        out = attention_output(q, v.shape[-1]) if out is None else out
        lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device) if lse is None else lse
        n_m = triton.cdiv(c.grid_lens[0], cfg.block_m)
        n_tiles = n_m * c.n_seq * H
        grid = (min(n_tiles, _num_sms(q.device)) if c.path != PORTABLE else n_tiles,)
        if c.path == WARP_SPECIALIZED:
            args, consts = ws_arguments(q, k, v, out, lse, c, cfg)
            with torch.cuda.device(q.device):
                attention_gluon.attn_fwd_ws[grid](*args, **consts, num_warps=cfg.num_warps)
            return out, lse
        lstr = (0 if varlen else lse.stride(0), lse.stride(1), lse.stride(2))
        _launch(_attn_fwd, grid, cfg, q, k, v, out, lse, *c.extra,
                *_batch_strides(q, varlen), *_batch_strides(k, varlen), *_batch_strides(v, varlen),
                *_batch_strides(out, varlen), *lstr, *c.mstrides, *c.astrides, *c.lens, H, H // k.shape[1],
                c.n_seq * H, n_m, *c.scalars, **c.flags)
        return out, lse

    cfg = config or _TUNERS["fwd"].config(q.device, c.key("fwd", q.dtype), run, tune)
    out = attention_output(q, v.shape[-1])
    lse = torch.empty(B, H, L, dtype=torch.float32, device=q.device)
    if varlen:  # packed rows past cu_q[-1] belong to no sequence: 0 (as the reference), not garbage
        out.zero_()
        lse.fill_(float("-inf"))
    return run(cfg, out, lse)


def fused_dq_default(path: str, deterministic: bool) -> bool:
    """Whether the backward adds dQ by atomics inside the dK/dV pass (5 matmuls per block pair) or
    runs a separate dQ pass (7; no atomics, so bit-identical runs). The separate pass is Hopper's
    default: fused, the dK/dV kernel's fifth matmul spills at D128 in every tile tried under Triton
    3.6 and 3.9 and falls to mma.sync below 64 query rows (benchmarks/NOTES.md); Ampere fuses
    (FlashAttention-2's choice) unless ``deterministic``."""
    return not deterministic and path == PORTABLE


def attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, deterministic,
                  *, tune=True, config=None, path=None, fused_dq=None):
    """Backward of the op contract: (dq, dk, dv) in the memory order of q, k, v.

    ``config``: fixed {"dkdv": Config, "dq": Config}; ``path``: force a lowering; ``fused_dq``:
    force the dQ strategy (:func:`fused_dq_default` otherwise; not with ``deterministic``)."""
    B, H, L, _ = q.shape
    Hk = k.shape[1]
    varlen = cu_q is not None
    c = _prepare(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, path, dout)
    if fused_dq is None:
        fused_dq = fused_dq_default(c.path, deterministic)
    elif fused_dq and deterministic:
        raise ValueError("attention_bwd: fused_dq=True adds dQ by atomics, which deterministic=True excludes")
    if c.path == HOPPER:
        _ensure_allocator()
    delta = torch.empty_like(lse)
    pre_block = 16 if interpret_mode() else 64
    lstr = (0 if varlen else lse.stride(0), lse.stride(1), lse.stride(2))
    _launch(_bwd_preprocess, (triton.cdiv(L, pre_block), B * H), Config(pre_block, 0, 4, 1), out, dout, delta,
            *out.stride(), *dout.stride(), *lse.stride(), L, H, DV=v.shape[-1], BLOCK_DV=c.flags["BLOCK_DV"])
    qkv_do = (*_batch_strides(q, varlen), *_batch_strides(k, varlen), *_batch_strides(v, varlen),
              *_batch_strides(dout, varlen))
    common = (*c.mstrides, *c.astrides, *c.lens)
    alloc = torch.zeros_like if varlen else torch.empty_like  # varlen: rows outside every sequence get 0

    def run_dkdv(cfg: Config, dk=None, dv=None, dq_acc=None):
        dk = torch.empty_like(k) if dk is None else dk
        dv = torch.empty_like(v) if dv is None else dv
        if dq_acc is None:  # the float32 dQ accumulator (fused), or a placeholder the kernel never touches
            dq_acc = torch.zeros(B, H, L, q.shape[-1], dtype=torch.float32, device=q.device) if fused_dq else q
        n_tiles = triton.cdiv(c.grid_lens[1], cfg.block_n) * c.n_seq * Hk
        _launch(_attn_bwd_dkdv, (n_tiles,), cfg, q, k, v, dout, dk, dv, dq_acc, lse, delta, *c.extra, *qkv_do,
                *_batch_strides(dk, varlen), *_batch_strides(dv, varlen), *_batch_strides(dq_acc, varlen), *lstr,
                *common, Hk, H // Hk, c.n_seq * Hk, scale, *c.scalars, **c.flags, FUSED_DQ=fused_dq)

    def run_dq(cfg: Config, dq=None):
        dq = torch.empty_like(q) if dq is None else dq
        n_m = triton.cdiv(c.grid_lens[0], cfg.block_m)
        _launch(_attn_bwd_dq, (n_m * c.n_seq * H,), cfg, q, k, v, dout, dq, lse, delta, *c.extra, *qkv_do,
                *_batch_strides(dq, varlen), *lstr, *common, H, H // Hk, c.n_seq * H, n_m, scale, *c.scalars,
                **c.flags)

    key_flags = ("fused",) if fused_dq else ("det",)
    cfg_kv = (config or {}).get("dkdv") or _TUNERS["dkdv"].config(q.device, c.key("dkdv", q.dtype) + key_flags,
                                                                   run_dkdv, tune)
    dk, dv = alloc(k), alloc(v)
    if fused_dq:
        dq_acc = torch.zeros(B, H, L, q.shape[-1], dtype=torch.float32, device=q.device)
        run_dkdv(cfg_kv, dk, dv, dq_acc)
        dq = torch.empty_like(q)
        dq.copy_(dq_acc)
        return dq, dk, dv
    run_dkdv(cfg_kv, dk, dv)
    dq = alloc(q)
    cfg_q = (config or {}).get("dq") or _TUNERS["dq"].config(q.device, c.key("dq", q.dtype), run_dq, tune)
    run_dq(cfg_q, dq)
    return dq, dk, dv


def warm_keys() -> dict[str, Tuner]:
    """The tuners of this family's kernels (``seqgen_fast.warmup`` reports what they hold)."""
    return dict(_TUNERS)


__all__ = ["attention_fwd", "attention_bwd", "block_dim", "kernel_path", "describe_path", "MAX_HEAD_DIM",
           "HOPPER", "PORTABLE", "Config"]
