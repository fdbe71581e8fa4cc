"""KV-cache attention (flash-decoding) in Triton: one launch per call, append, rotary and combine fused.

The math, the layouts and every clamp are those of ``seqgen_fast.reference.decode.kvcache_attention``
(flash-attn's ``flash_attn_with_kvcache``): ``q`` (B, Lq, Hq, D); a contiguous (B_cache, S, Hkv, D)
or paged (num_pages, P, Hkv, D) cache, any strides; new keys/values (B, Lk, Hkv, D) appended in
place at logical rows ``cache_seqlens[b] + j``; rotary tables (S_ro, R/2); causal (bottom-right) or
sliding-window masks, softcap, ALiBi, an optional (B, Lq or 1, S) key mask; ``out`` (B, Lq, Hq, D)
and ``lse`` (B, Hq, Lq) float32, natural log (``+inf`` for a row that sees no key). Non-finite
values: the policy of ``seqgen_fast.ops.attention``; the running maxima of the online softmax and of
the merge keep NaN when compiled (``attention_tiles.nan_max`` / ``row_max``).

**Rows.** A row is ``BLOCK_M`` query rows of one kv head ``h`` of one sequence ``b``: row ``r`` is
query token ``r // g`` of head ``h * g + r % g`` (``g = Hq / Hkv``), so the GQA group and the
speculative tokens share every K/V tile read from memory (padded to 16 rows for ``tl.dot``). Rows
are numbered ``(b, h, row block)``, sequence-major. Each row runs a base-2 online softmax over the
keys it can see.

**Work units and the schedule.** The cached keys some query of sequence ``b`` can see,
``[lo_b, hi_b)`` (its left pad and window), are cut into ``BLOCK_N``-key tiles aligned to multiples
of ``BLOCK_N`` (with TMA a divisor of the page size: a tile never crosses a page); every row of ``b`` has
``units_b = max(1, tiles)`` units, and the units of all rows, in row order, form one line. Two
schedules (``STREAM``):

* *stream* (stream-K): ``NUM_PROGRAMS`` programs, program ``p`` takes units
  ``[p * per, (p + 1) * per)`` of the line (``per = ceil(total / NUM_PROGRAMS)``), whatever rows
  they fall in: ragged lengths are balanced to one tile. Every program finds its first row by a
  prefix scan of the units of the batch (the lengths are read on the device: no host sync). A row
  whose units all fall to one program is written directly; a row cut between programs is not:
  each of its programs writes a normalised partial and its base-2 lse to scratch slot
  ``2 p + (row is not p's first)``, then takes a ticket from the row's counter (an acq_rel atomic
  after a CTA barrier); the program that draws the last ticket merges the row's partials
  ``out = sum_i 2^(lse_i - m) o_i / sum_i 2^(lse_i - m)`` (online over chunks of contributors, read
  through L2) and resets the counter to 0 for the next launch.
* *rows*: one program per row, every row written directly (``num_splits=1``).

**Tiles.** A program's units of a row are tiles of keys; the first and the last tile of a row's
visible range may be partial (a left pad, a window, a length that is not a multiple of
``BLOCK_N``): those two are read by masked pointer loads (rows outside read as 0, so NaN in unused
cache rows cannot leak in). The full tiles between them are read by ``USE_TMA``:

* TMA (Hopper; :func:`tma_reasons`): ``KD``/``VD`` are host-made tensor descriptors over the whole
  4-D cache with a ``[1, BLOCK_N, 1, BLOCK_D]`` box at ``(batch row or page, first row, h, 0)``; the
  page of a paged tile comes from the block table. Triton's pipeliner streams them through
  ``num_stages`` mbarrier-tracked shared buffers (``cp.async.bulk.tensor``) 2-4 tiles ahead;
  columns past ``D`` are zero-filled by the copy engine. Pages smaller than a tile take the
  portable loads by default (see :func:`tma_reasons`).
* portable: pointer loads of the same tiles, each row through the block table (paged: a tile may
  span pages) or the batch row (contiguous), clamped; cp.async-pipelined by Triton on Ampere and
  newer.

**Append and rotary** (Lk > 0): the program holding unit 0 of a row also scores the new keys
straight from ``k``/``v``, rotated in registers (``kernels/rotary.py`` helpers) and rounded to the
cache dtype; the one of row block 0 stores them at rows ``[L0, L0 + Lk)``. No program reads a row
another one writes (the cached tiles end at ``L0``). q is rotated on load the same way.

**No host sync**: every length, batch index, page index and rotary position is clamped on the
device, so a bad one gives a wrong row, never an access outside the cache. The schedule's program
count depends on shapes and the SM count only (:func:`choose_programs`), so a captured CUDA graph
keeps it while lengths change between replays.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .attention_tiles import nan_max, row_max
from .rotary import rotary_columns, rotate_tile

# Resident programs per SM the schedule plans for, by warps per program: a 4-warp program (16-bit,
# D <= 128) holds up to 104 KiB of shared memory and ~230 registers a thread (sm_90 compiles), so two
# fit an H100/H200 SM; an 8-warp one (D > 128, fp32) takes an SM's registers alone. A plan.
PROGRAMS_PER_SM = {4: 2, 8: 1}
# Upper bound of a forced split count (flash-attn's num_splits).
MAX_SPLITS = 128
# SM count assumed under the CPU interpreter (only the program count depends on it).
INTERPRETER_SMS = 4
# Bytes of K+V tiles the TMA programs of one SM keep in flight (2 to 4 tiles each): well beyond the
# ~40 KiB that HBM's latency x bandwidth per SM needs (1-1.5 us x 33 GB/s on an H200).
SM_BYTES_IN_FLIGHT = 192 * 1024
# Elements of one (contributors x head dim) fp32 tile the merge loads at once.
COMBINE_TILE = 4096
# Stages of the merge's loop: loads of two (query row, contributor chunk) tiles in flight.
_MERGE_STAGES = tl.constexpr(3)
# Sequences per step of the in-kernel prefix scan of the stream schedule.
_SCAN = tl.constexpr(128)
# SEQGEN_FAST_DECODE_TMA=0 forces the portable (pointer) loads on Hopper too (A/B measurements).
TMA_ENV = "SEQGEN_FAST_DECODE_TMA"
LOG2E = math.log2(math.e)
_LOG2E = tl.constexpr(LOG2E)
_LN2 = tl.constexpr(math.log(2.0))


@triton.jit
def _clamp(x, lo, hi):
    return tl.minimum(tl.maximum(x, lo), hi)


@triton.jit
def _lengths(SEQLENS, LEFTPAD, b, ok, stride_len, stride_lp, CAP, LK, HAS_SEQLENS: tl.constexpr,
             HAS_LEFTPAD: tl.constexpr):
    """(cached length L0, left pad lp) of sequences ``b`` where ``ok``, clamped: 0 <= lp <= L0 <= CAP - LK."""
    if HAS_SEQLENS:
        l0 = _clamp(tl.load(SEQLENS + b * stride_len, mask=ok, other=0).to(tl.int32), 0, CAP - LK)
    else:
        l0 = tl.zeros_like(b).to(tl.int32) + (CAP - LK)
    if HAS_LEFTPAD:
        lp = _clamp(tl.load(LEFTPAD + b * stride_lp, mask=ok, other=0).to(tl.int32), 0, l0)
    else:
        lp = tl.zeros_like(l0)
    return l0, lp


@triton.jit
def _key_span(l0, lp, LK, LQ, window_left, window_right, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
              BLOCK_N: tl.constexpr):
    """(first tile start, units >= 1) of the cached keys some query of the sequence can see."""
    total = l0 + LK
    lo = lp
    hi = l0
    if WINDOW_LEFT:
        lo = tl.maximum(lo, total - LQ - window_left)
    if WINDOW_RIGHT:
        hi = tl.minimum(hi, total + window_right)
    base = (lo // BLOCK_N) * BLOCK_N
    return base, tl.maximum(tl.cdiv(tl.maximum(hi - base, 0), BLOCK_N), 1)


@triton.jit
def _scan(u, SEQLENS, LEFTPAD, BATCH, stride_len, stride_lp, CAP, LK, LQ, RPS, window_left, window_right,
          HAS_SEQLENS: tl.constexpr, HAS_LEFTPAD: tl.constexpr, WINDOW_LEFT: tl.constexpr,
          WINDOW_RIGHT: tl.constexpr, BLOCK_N: tl.constexpr, SCAN: tl.constexpr):
    """Prefix scan of the units of the batch (``RPS`` rows per sequence): (the sequence holding global
    unit ``u``, its first unit, the total). int64 unit counts."""
    found = tl.full([], 0, tl.int32)
    first = tl.full([], 0, tl.int64)
    total = tl.full([], 0, tl.int64)
    for b0 in tl.range(0, BATCH, SCAN, num_stages=1):
        bs = b0 + tl.arange(0, SCAN)
        ok = bs < BATCH
        l0, lp = _lengths(SEQLENS, LEFTPAD, bs, ok, stride_len, stride_lp, CAP, LK, HAS_SEQLENS, HAS_LEFTPAD)
        _, units = _key_span(l0, lp, LK, LQ, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N)
        w = tl.where(ok, units.to(tl.int64) * RPS, 0)
        ends = total + tl.cumsum(w, 0)
        done = ok & (ends <= u)
        found += tl.sum(done.to(tl.int32), 0)
        first = tl.maximum(first, tl.max(tl.where(done, ends, 0), 0))
        total += tl.sum(w, 0)
    return found, first, total


@triton.jit
def _cache_rows(p, b, bc, BT, stride_btb, MAX_PAGES, N_CACHE, PAGE_SIZE: tl.constexpr):
    """(first, second) cache indices (int64) of logical rows ``p`` of sequence ``b``: the page and the
    row in it (paged), or the batch row ``bc`` and ``p`` (contiguous)."""
    if PAGE_SIZE > 0:
        col = tl.minimum(p // PAGE_SIZE, MAX_PAGES - 1)
        page = tl.load(BT + b * stride_btb + col)
        return _clamp(page, 0, N_CACHE - 1).to(tl.int64), (p % PAGE_SIZE).to(tl.int64)
    return bc + tl.zeros_like(p).to(tl.int64), p.to(tl.int64)


@triton.jit
def _rotary_rows(COS, SIN, pos, row_ok, col, rot, S_RO, stride_cr, stride_cc, stride_sr, stride_sc):
    """cos/sin of rows at positions ``pos`` (clamped into the table) for the head dims' table columns."""
    rows = _clamp(pos, 0, S_RO - 1).to(tl.int64)
    ok = row_ok[:, None] & rot[None, :]
    cos = tl.load(COS + rows[:, None] * stride_cr + col[None, :] * stride_cc, mask=ok, other=1.0)
    sin = tl.load(SIN + rows[:, None] * stride_sr + col[None, :] * stride_sc, mask=ok, other=0.0)
    return cos, sin


@triton.jit
def _scores(qk, p, col_ok, q_at, slope, mask_rows, stride_mp, qk_scale, softcap_scale, softcap, window_left,
            window_right, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, WINDOW_LEFT: tl.constexpr,
            WINDOW_RIGHT: tl.constexpr, HAS_MASK: tl.constexpr):
    """Base-2 scores of rows at positions ``q_at`` for keys ``p``: scale, softcap, ALiBi, then -inf where
    the key is out of the run (``col_ok``), outside the window or masked."""
    if HAS_SOFTCAP:  # softcap * tanh(scale * qk / softcap), tanh through exp2 (no libdevice needed)
        x = qk * softcap_scale
        t = tl.exp2(tl.abs(x) * (-2.0 * _LOG2E))
        th = (1.0 - t) / (1.0 + t)
        s = tl.where(x < 0, -th, th) * (softcap * _LOG2E)
    else:
        s = qk * qk_scale
    if HAS_ALIBI:
        s -= (slope * _LOG2E)[:, None] * tl.abs(q_at[:, None] - p[None, :]).to(tl.float32)
    ok = col_ok[None, :]
    if WINDOW_RIGHT:
        ok = ok & (p[None, :] <= q_at[:, None] + window_right)
    if WINDOW_LEFT:
        ok = ok & (p[None, :] >= q_at[:, None] - window_left)
    if HAS_MASK:
        ok = ok & (tl.load(mask_rows[:, None] + p[None, :].to(tl.int64) * stride_mp, mask=ok, other=0) != 0)
    return tl.where(ok, s, float("-inf"))


@triton.jit
def _online_softmax(s, v, m_i, l_i, acc, DOT_PRECISION: tl.constexpr):
    """One tile of the base-2 online softmax; a row with no visible key so far keeps m = -inf, l = 0."""
    m_new = nan_max(m_i, row_max(s, 1))  # NaN-keeping when compiled (see attention_tiles)
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_safe)
    p = tl.exp2(s - m_safe[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return m_new, l_i, acc


@triton.jit
def _kv_tile(K, V, KD, VD, BT, b, bc, h, start, x0, x1, stride_k0, stride_k1, stride_kh, stride_kd, stride_v0,
             stride_v1, stride_vh, stride_vd, stride_btb, MAX_PAGES, N_CACHE, offs_n, offs_d, d_ok,
             PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, TMA_TILE: tl.constexpr):
    """K and V of cached keys ``[start, start + BLOCK_N)``: a TMA box (``TMA_TILE``: a full tile, never
    crossing a page) or pointer loads of the keys in ``[x0, x1)`` (0 elsewhere)."""
    if TMA_TILE:
        if PAGE_SIZE > 0:
            col = tl.minimum(start // PAGE_SIZE, MAX_PAGES - 1)
            first = _clamp(tl.load(BT + b * stride_btb + col), 0, N_CACHE - 1)
            second = start % PAGE_SIZE
        else:
            first = bc.to(tl.int32)
            second = start
        k = KD.load([first, second, h, 0]).reshape(BLOCK_N, BLOCK_D)
        v = VD.load([first, second, h, 0]).reshape(BLOCK_N, BLOCK_D)
    else:
        p = start + offs_n
        nd_ok = ((p >= x0) & (p < x1))[:, None] & d_ok[None, :]
        first, second = _cache_rows(p, b, bc, BT, stride_btb, MAX_PAGES, N_CACHE, PAGE_SIZE)
        k_rows = K + first * stride_k0 + second * stride_k1 + h.to(tl.int64) * stride_kh
        v_rows = V + first * stride_v0 + second * stride_v1 + h.to(tl.int64) * stride_vh
        k = tl.load(k_rows[:, None] + offs_d[None, :] * stride_kd, mask=nd_ok, other=0.0)
        v = tl.load(v_rows[:, None] + offs_d[None, :] * stride_vd, mask=nd_ok, other=0.0)
    return k, v


@triton.jit
def _store_rows(O, LSE, b, tok, heads, ok, out, lse2, offs_d, d_ok, stride_ob, stride_os, stride_oh, stride_od,
                stride_lb, stride_lh, stride_ls):
    """Write output rows (token ``tok``, head ``heads``) and their lse (base 2 in, natural out; a row
    that saw no key, ``lse2 = -inf``, gets +inf)."""
    out_rows = O + b * stride_ob + tok.to(tl.int64) * stride_os + heads.to(tl.int64) * stride_oh
    tl.store(out_rows[:, None] + offs_d[None, :] * stride_od, out.to(O.dtype.element_ty),
             mask=ok[:, None] & d_ok[None, :])
    lse_rows = LSE + b * stride_lb + heads.to(tl.int64) * stride_lh + tok.to(tl.int64) * stride_ls
    tl.store(lse_rows, tl.where(lse2 == float("-inf"), float("inf"), lse2 * _LN2), mask=ok)


@triton.jit
def _kvcache_kernel(
    Q, K, V, KD, VD, KNEW, VNEW, SEQLENS, BATCH_IDX, LEFTPAD, BT, COS, SIN, ALIBI, MASK,
    O, LSE, OPART, LPART, COUNTER,
    stride_qb, stride_qs, stride_qh, stride_qd,
    stride_k0, stride_k1, stride_kh, stride_kd,
    stride_v0, stride_v1, stride_vh, stride_vd,
    stride_knb, stride_kns, stride_knh, stride_knd,
    stride_vnb, stride_vns, stride_vnh, stride_vnd,
    stride_ob, stride_os, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ls,
    stride_len, stride_bi, stride_lp, stride_btb, stride_cr, stride_cc, stride_sr, stride_sc,
    stride_ab, stride_ah, stride_mb, stride_mi, stride_mp,
    BATCH, HKV, LQ, LK, CAP, N_CACHE, MAX_PAGES, S_RO, NUM_MBLOCKS, NUM_PROGRAMS,
    qk_scale, softcap_scale, softcap, window_left, window_right,
    HEAD_DIM: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_NEW: tl.constexpr, PAGE_SIZE: tl.constexpr,
    HAS_SEQLENS: tl.constexpr, HAS_BATCH_IDX: tl.constexpr, HAS_LEFTPAD: tl.constexpr,
    ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, ROTATE_Q_PER_TOKEN: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    HAS_MASK: tl.constexpr, STREAM: tl.constexpr, USE_TMA: tl.constexpr, CHUNK_C: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    rps = HKV * NUM_MBLOCKS  # rows per sequence
    n_rows = LQ * GROUP
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    if HEAD_DIM == BLOCK_D:  # a constant mask keeps the loads 16-byte vectors (and cp.async-pipelinable)
        d_ok = tl.full([BLOCK_D], 1, tl.int1)
    else:
        d_ok = offs_d < HEAD_DIM

    # ---- this program's units [u, u_end) of the line, and the sequence b the first one is in ----
    if STREAM:
        _, _, total_units = _scan(-1, SEQLENS, LEFTPAD, BATCH, stride_len, stride_lp, CAP, LK, LQ, rps, window_left,
                                  window_right, HAS_SEQLENS, HAS_LEFTPAD, WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N,
                                  SCAN=_SCAN)
        per = tl.cdiv(total_units, NUM_PROGRAMS)
        u = pid.to(tl.int64) * per
        u_end = tl.minimum(u + per, total_units)
        b, row0, _ = _scan(u, SEQLENS, LEFTPAD, BATCH, stride_len, stride_lp, CAP, LK, LQ, rps, window_left,
                           window_right, HAS_SEQLENS, HAS_LEFTPAD, WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N, SCAN=_SCAN)
    else:  # one program per row: the loop below runs once, over the whole row pid % rps of b
        per = tl.full([], 1, tl.int64)
        u = tl.full([], 0, tl.int64)
        b = pid // rps
    u_begin = u
    l0, lp = _lengths(SEQLENS, LEFTPAD, b, b < BATCH, stride_len, stride_lp, CAP, LK, HAS_SEQLENS, HAS_LEFTPAD)
    base, units = _key_span(l0, lp, LK, LQ, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT, BLOCK_N)
    if not STREAM:
        row0 = -(pid % rps).to(tl.int64) * units
        u_end = u + units

    while u < u_end:
        # ---- the row holding unit u, and this program's units [seg_lo, seg_hi) of it ----
        j = ((u - row0) // units).to(tl.int32)
        r_start = row0 + j.to(tl.int64) * units
        seg_lo = (u - r_start).to(tl.int32)
        seg_hi = tl.minimum(u_end - r_start, units).to(tl.int32)
        mblock = j % NUM_MBLOCKS
        h = j // NUM_MBLOCKS
        bb = b.to(tl.int64)
        total = l0 + LK
        if HAS_BATCH_IDX:
            bc = _clamp(tl.load(BATCH_IDX + bb * stride_bi).to(tl.int64), 0, N_CACHE - 1)
        else:
            bc = bb

        # ---- the row's queries: token r // GROUP of head h * GROUP + r % GROUP ----
        rows = mblock * BLOCK_M + offs_m
        row_ok = rows < n_rows
        tok = rows // GROUP
        heads = h * GROUP + rows % GROUP
        q_at = total - LQ + tok  # each row's position among the keys (bottom-right alignment)
        q_rows = Q + bb * stride_qb + tok.to(tl.int64) * stride_qs + heads.to(tl.int64) * stride_qh
        q_ok = row_ok[:, None] & d_ok[None, :]
        q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd, mask=q_ok, other=0.0)
        if ROTARY_DIM > 0:
            partner, col, sign, rot = rotary_columns(offs_d, ROTARY_DIM, INTERLEAVED, True)
            q_partner = tl.load(q_rows[:, None] + partner[None, :] * stride_qd, mask=q_ok & rot[None, :], other=0.0)
            if ROTATE_Q_PER_TOKEN:
                q_pos = l0 + tok
            else:
                q_pos = l0 + tl.zeros_like(tok)
            cos, sin = _rotary_rows(COS, SIN, q_pos, row_ok, col, rot, S_RO, stride_cr, stride_cc, stride_sr,
                                    stride_sc)
            q = rotate_tile(q, q_partner, cos, sin, sign, rot).to(Q.dtype.element_ty)
        if HAS_ALIBI:
            slope = tl.load(ALIBI + bb * stride_ab + heads * stride_ah, mask=row_ok, other=0.0).to(tl.float32)
        else:
            slope = tl.zeros([BLOCK_M], tl.float32)
        mask_rows = MASK + bb * stride_mb + tl.minimum(tok, LQ - 1).to(tl.int64) * stride_mi

        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)

        # ---- the keys these rows can see: [lo_k, hi_k); cached ones below l0, new ones above ----
        lo_k = lp
        hi_k = total
        if WINDOW_LEFT:
            lo_k = tl.maximum(lo_k, total - LQ + (mblock * BLOCK_M) // GROUP - window_left)
        if WINDOW_RIGHT:
            last_tok = (tl.minimum(mblock * BLOCK_M + BLOCK_M, n_rows) - 1) // GROUP
            hi_k = tl.minimum(hi_k, total - LQ + last_tok + window_right + 1)

        if BLOCK_NEW > 0:  # append: unit 0's program scores the new keys from registers; row block 0 stores them
            if seg_lo == 0:
                offs_j = tl.arange(0, BLOCK_NEW)
                for j0 in tl.range(0, LK, BLOCK_NEW, num_stages=1):
                    jj = j0 + offs_j
                    j_ok = jj < LK
                    jd_ok = j_ok[:, None] & d_ok[None, :]
                    kn_rows = KNEW + bb * stride_knb + jj.to(tl.int64) * stride_kns + h.to(tl.int64) * stride_knh
                    kn = tl.load(kn_rows[:, None] + offs_d[None, :] * stride_knd, mask=jd_ok, other=0.0)
                    p = l0 + jj
                    if ROTARY_DIM > 0:
                        kn_partner = tl.load(kn_rows[:, None] + partner[None, :] * stride_knd,
                                             mask=jd_ok & rot[None, :], other=0.0)
                        k_cos, k_sin = _rotary_rows(COS, SIN, p, j_ok, col, rot, S_RO, stride_cr, stride_cc,
                                                    stride_sr, stride_sc)
                        kn = rotate_tile(kn, kn_partner, k_cos, k_sin, sign, rot)
                    kn = kn.to(K.dtype.element_ty)
                    vn_rows = VNEW + bb * stride_vnb + jj.to(tl.int64) * stride_vns + h.to(tl.int64) * stride_vnh
                    vn = tl.load(vn_rows[:, None] + offs_d[None, :] * stride_vnd, mask=jd_ok, other=0.0)
                    vn = vn.to(V.dtype.element_ty)
                    if mblock == 0:
                        first, second = _cache_rows(p, bb, bc, BT, stride_btb, MAX_PAGES, N_CACHE, PAGE_SIZE)
                        k_rows = K + first * stride_k0 + second * stride_k1 + h.to(tl.int64) * stride_kh
                        v_rows = V + first * stride_v0 + second * stride_v1 + h.to(tl.int64) * stride_vh
                        tl.store(k_rows[:, None] + offs_d[None, :] * stride_kd, kn, mask=jd_ok)
                        tl.store(v_rows[:, None] + offs_d[None, :] * stride_vd, vn, mask=jd_ok)
                    s = tl.dot(q, tl.trans(kn), input_precision=DOT_PRECISION)
                    s = _scores(s, p, j_ok & (p >= lo_k) & (p < hi_k), q_at, slope, mask_rows, stride_mp, qk_scale,
                                softcap_scale, softcap, window_left, window_right, HAS_SOFTCAP, HAS_ALIBI,
                                WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK)
                    m_i, l_i, acc = _online_softmax(s, vn, m_i, l_i, acc, DOT_PRECISION)

        # ---- cached keys of units [seg_lo, seg_hi): [x0, x1); full tiles, then the partial edge tiles ----
        x0 = tl.maximum(base + seg_lo * BLOCK_N, lo_k)
        x1 = tl.maximum(tl.minimum(base + seg_hi * BLOCK_N, tl.minimum(hi_k, l0)), x0)
        full_lo = tl.cdiv(x0, BLOCK_N) * BLOCK_N
        full_hi = tl.maximum((x1 // BLOCK_N) * BLOCK_N, full_lo)
        for start in range(full_lo, full_hi, BLOCK_N):
            k, v = _kv_tile(K, V, KD, VD, BT, bb, bc, h, start, x0, x1, stride_k0, stride_k1, stride_kh, stride_kd,
                            stride_v0, stride_v1, stride_vh, stride_vd, stride_btb, MAX_PAGES, N_CACHE, offs_n,
                            offs_d, d_ok, PAGE_SIZE, BLOCK_N, BLOCK_D, USE_TMA)
            p = start + offs_n
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
            s = _scores(s, p, p < x1, q_at, slope, mask_rows, stride_mp, qk_scale, softcap_scale, softcap,
                        window_left, window_right, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, WINDOW_RIGHT, HAS_MASK)
            m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, DOT_PRECISION)
        # edge 0: the tile holding an unaligned x0; edge 1: the one holding an unaligned x1 (if another tile)
        for edge in tl.range(0, 2, num_stages=1):
            start = tl.where(edge == 0, full_lo - BLOCK_N, full_hi)
            if tl.where(edge == 0, (full_lo > x0) & (x1 > x0), full_hi < x1):
                k, v = _kv_tile(K, V, KD, VD, BT, bb, bc, h, start, x0, x1, stride_k0, stride_k1, stride_kh,
                                stride_kd, stride_v0, stride_v1, stride_vh, stride_vd, stride_btb, MAX_PAGES, N_CACHE,
                                offs_n, offs_d, d_ok, PAGE_SIZE, BLOCK_N, BLOCK_D, False)
                p = start + offs_n
                s = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
                s = _scores(s, p, (p >= x0) & (p < x1), q_at, slope, mask_rows, stride_mp, qk_scale, softcap_scale,
                            softcap, window_left, window_right, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, WINDOW_RIGHT,
                            HAS_MASK)
                m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, DOT_PRECISION)

        # ---- output: directly (the whole row is here), or a partial + the last contributor's merge ----
        seen = l_i != 0  # NaN (a NaN score or value) is seen: its lse stays NaN
        out = acc / tl.where(seen, l_i, 1.0)[:, None]  # a row that saw no key has acc = 0: writes 0
        lse2 = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        if (seg_lo == 0) & (seg_hi == units):
            _store_rows(O, LSE, bb, tok, heads, row_ok, out, lse2, offs_d, d_ok, stride_ob, stride_os, stride_oh,
                        stride_od, stride_lb, stride_lh, stride_ls)
        elif STREAM:
            slot = (2 * pid + (u_begin < r_start).to(tl.int32)).to(tl.int64)  # scratch (2 programs, BLOCK_M, D)
            part = slot * BLOCK_M + offs_m
            tl.store(OPART + part[:, None] * HEAD_DIM + offs_d[None, :], out, mask=q_ok)
            tl.store(LPART + part, lse2, mask=row_ok)
            tl.debug_barrier()  # every thread's partial stores precede the ticket (released by the atomic)
            row_id = bb * rps + j
            ticket = tl.atomic_add(COUNTER + row_id, 1, sem="acq_rel")
            p_first = r_start // per
            n_parts = (r_start + units - 1) // per - p_first + 1
            if ticket == n_parts - 1:
                _merge(OPART, LPART, O, LSE, bb, h, mblock, n_rows, p_first, n_parts, r_start, per, offs_d, d_ok,
                       stride_ob, stride_os, stride_oh, stride_od, stride_lb, stride_lh, stride_ls, HEAD_DIM, GROUP,
                       BLOCK_M, CHUNK_C, _MERGE_STAGES)
                tl.atomic_xchg(COUNTER + row_id, 0)  # zero again for the next launch (and the next graph replay)

        # ---- the next row (of the next sequence after the last row of this one) ----
        u = r_start + units
        if STREAM:
            if j == rps - 1:
                b += 1
                row0 = u
                l0, lp = _lengths(SEQLENS, LEFTPAD, b, b < BATCH, stride_len, stride_lp, CAP, LK, HAS_SEQLENS,
                                  HAS_LEFTPAD)
                base, units = _key_span(l0, lp, LK, LQ, window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT,
                                        BLOCK_N)


@triton.jit
def _merge(OPART, LPART, O, LSE, b, h, mblock, n_rows, p_first, n_parts, r_start, per, offs_d, d_ok, stride_ob,
           stride_os, stride_oh, stride_od, stride_lb, stride_lh, stride_ls, HEAD_DIM: tl.constexpr,
           GROUP: tl.constexpr, BLOCK_M: tl.constexpr, CHUNK_C: tl.constexpr, MERGE_STAGES: tl.constexpr):
    """Merge the partials of a row written by programs ``p_first .. p_first + n_parts - 1`` (slot
    ``2 p + (row is not p's first)``; read through L2: other SMs wrote them), online in the max.

    One flat loop over (query row, chunk of ``CHUNK_C`` contributors): its loads depend on the
    iteration only, so Triton's pipeliner keeps ``MERGE_STAGES - 1`` of them in flight (cp.async)
    while one is reduced -- the merge's time is then its bytes, not one L2 round trip per row."""
    offs_c = tl.arange(0, CHUNK_C)
    chunks = tl.cdiv(n_parts, CHUNK_C)
    m = tl.full([], float("-inf"), tl.float32)
    den = tl.full([], 0.0, tl.float32)
    o = tl.zeros_like(offs_d).to(tl.float32)
    for it in tl.range(0, tl.minimum(BLOCK_M, n_rows - mblock * BLOCK_M) * chunks, num_stages=MERGE_STAGES):
        r = it // chunks
        c = (it % chunks) * CHUNK_C + offs_c
        prog = p_first + c
        idx = (2 * prog + (prog * per < r_start).to(tl.int64)) * BLOCK_M + r
        ok = c < n_parts
        lse = tl.load(LPART + idx, mask=ok, other=float("-inf"), cache_modifier=".cg")
        parts = tl.load(OPART + idx[:, None] * HEAD_DIM + offs_d[None, :], mask=ok[:, None] & d_ok[None, :],
                        other=0.0, cache_modifier=".cg")
        k = it - r * chunks  # the chunk's index in its row: the first one starts the row's merge afresh
        m = tl.where(k == 0, float("-inf"), m)
        den = tl.where(k == 0, 0.0, den)
        o = tl.where(k == 0, 0.0, o)
        m_new = nan_max(m, row_max(lse, 0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        scale = tl.exp2(m - m_safe)
        w = tl.exp2(lse - m_safe)
        den = den * scale + tl.sum(w, axis=0)
        o = o * scale + tl.sum(w[:, None] * parts, axis=0)
        m = m_new
        row = mblock * BLOCK_M + r + tl.zeros([1], tl.int32)  # one-row vectors for _store_rows
        seen = den != 0
        lse2 = tl.where(seen, m + tl.log2(tl.where(seen, den, 1.0)), float("-inf")) + tl.zeros([1], tl.float32)
        last = tl.full([1], 1, tl.int1) & (k == chunks - 1)  # the row's last chunk: write the row
        _store_rows(O, LSE, b, row // GROUP, h * GROUP + row % GROUP, last, (o / tl.where(seen, den, 1.0))[None, :],
                    lse2, offs_d, d_ok, stride_ob, stride_os, stride_oh, stride_od, stride_lb, stride_lh, stride_ls)


# ----------------------------------------------------------------------------------------------
# Launch plan
# ----------------------------------------------------------------------------------------------
def block_n(head_dim: int, element_size: int = 2) -> int:
    """Keys per portable tile: 64 up to D=128 in 16-bit, 32 above (a K+V tile of 32 KiB); 16 in fp32,
    whose IEEE dots run on FMA units with both operands in registers (32 spills at D=128)."""
    if element_size == 4:
        return 16
    return 64 if head_dim <= 128 else 32


def block_m(rows: int, head_dim: int, element_size: int = 2) -> int:
    """Query rows per program (the GQA group x speculative tokens), padded to 16 for ``tl.dot``;
    at most 64, and 16 above D=128 and in fp32 (32 spill there: sm_90 compiles, Triton 3.6)."""
    cap = 64 if head_dim <= 128 and element_size == 2 else 16
    return max(16, min(triton.next_power_of_2(max(rows, 1)), cap))


def tma_block_n(head_dim: int, element_size: int, page_size: int) -> int:
    """Keys per TMA tile: :func:`block_n`, cut to the largest power of two dividing the page size
    (a multiple of 16) so that an aligned tile never crosses a page: 16 for pages of 16 or 48 rows."""
    bn = block_n(head_dim, element_size)
    return min(bn, page_size & -page_size) if page_size else bn


def tma_tiles_in_flight(tile_bytes: int, per_sm: int) -> int:
    """K+V tiles a TMA program keeps in flight: its share of :data:`SM_BYTES_IN_FLIGHT`, 2 to 4 tiles
    (3 for a 32 KiB bf16 D=128 tile at two programs per SM, 4 for the 8 KiB tiles of 16-row pages)."""
    return max(2, min(4, SM_BYTES_IN_FLIGHT // (per_sm * tile_bytes)))


def launch_config(element_size: int, head_dim: int, paged: bool, tma: bool = False, tile_bytes: int = 0
                  ) -> tuple[int, int]:
    """(num_warps, num_stages), from sm_90 ahead-of-time compiles (Triton 3.9 and 3.6, ptxas).

    4 warps; 8 above D=128 and in fp32 (IEEE dots on FMA units), where 4 spill. TMA:
    :func:`tma_tiles_in_flight` tiles ahead, which Triton's pipeliner gives ``ahead + 1`` stages
    contiguous and ``2 ahead + 1`` paged (the block-table load that feeds a box's coordinates takes
    as many stages of its own). Portable (Ampere, unaligned caches): two tiles in flight in 16-bit
    (3 stages, 5 paged), one in fp32.
    """
    warps = 4 if head_dim <= 128 and element_size == 2 else 8
    if tma:
        ahead = tma_tiles_in_flight(tile_bytes, PROGRAMS_PER_SM[warps])
        return warps, (2 * ahead + 1) if paged else ahead + 1
    if element_size == 2:
        return warps, 3 + (2 if paged else 0)
    return warps, 2 + (1 if paged and head_dim <= 128 else 0)


def sm_count(device: torch.device) -> int:
    if device.type != "cuda":
        return INTERPRETER_SMS
    from .. import _ext

    return int(_ext.device_info(device)["multiprocessor_count"])


def choose_programs(rows: int, max_units: int, slots: int, num_splits: int = 0) -> tuple[int, bool]:
    """(programs, stream) of a launch over ``rows`` rows of at most ``max_units`` units each.

    ``num_splits`` 0 (the default): the stream schedule over ``slots`` programs (the resident
    programs of the GPU: SMs x :data:`PROGRAMS_PER_SM`; never more than there are units), which
    balances any mix of lengths to one tile; 1: one program per row (flash-attn's "no split");
    ``n > 1``: the stream schedule over ``rows * n`` programs (flash-attn's forced split count, at
    most :data:`MAX_SPLITS`). Shapes and the SM count only, so a captured CUDA graph keeps the
    schedule while the lengths change.
    """
    if num_splits == 1:
        return rows, False
    target = rows * min(num_splits, MAX_SPLITS) if num_splits else slots
    return max(1, min(target, rows * max_units)), True


def tma_reasons(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int) -> list[str]:
    """Why the full tiles cannot stream through TMA descriptors (empty: they can).

    Needs Hopper or newer (or the CPU interpreter, which runs the same tl code), unit-stride 16-byte
    aligned cache rows and, paged, whole tiles in a page. By default (``SEQGEN_FAST_DECODE_TMA``
    unset) pages smaller than a tile (16, 32 or 48 rows at 64-key tiles) take the portable gathers:
    sm_90 compiles give a 16-row TMA box ~270 PTX instructions and 11 CTA barriers per 8 KiB of K+V
    against ~630 and 8 per 32 KiB for a 64-key cp.async gather through the block table (3x the
    instructions per byte, a serial chain that caps a program's rate), pending a measurement.
    ``SEQGEN_FAST_DECODE_TMA=1`` takes TMA boxes for any page of a multiple of 16 rows (page-sized
    tiles), ``=0`` never.
    """
    why = []
    mode = os.environ.get(TMA_ENV, "").strip()
    if mode == "0":
        why.append(f"{TMA_ENV}=0")
    if q.device.type == "cuda" and torch.cuda.get_device_capability(q.device)[0] < 9:
        why.append("no TMA before sm_90")
    if not hasattr(tl, "make_tensor_descriptor"):
        why.append(f"triton {triton.__version__} has no tensor descriptors")
    if page_size % 16:
        why.append(f"page size {page_size} is not a multiple of 16")
    elif page_size % block_n(q.shape[-1], q.element_size()) and mode != "1":
        why.append(f"pages of {page_size} rows hold no whole {block_n(q.shape[-1], q.element_size())}-key tile "
                   f"(cp.async gathers; {TMA_ENV}=1 for page-sized TMA boxes)")
    for t in (k_cache, v_cache):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any((s * t.element_size()) % 16 for s in t.stride()[:-1]):
            why.append("cache rows not unit-stride and 16-byte aligned")
            break
    return why


@dataclass(frozen=True)
class Plan:
    """How one call runs: tile sizes, schedule, lowering and launch configuration."""
    block_m: int
    block_n: int
    m_blocks: int
    rows: int
    programs: int
    stream: bool
    tma: bool
    num_warps: int
    num_stages: int


def plan(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, page_size: int, cap: int,
         num_splits: int) -> Plan:
    """The :class:`Plan` of a call (shapes, dtypes, strides and the SM count only)."""
    batch, lq, hq, head_dim = q.shape
    hkv = k_cache.shape[2]
    bm = block_m(lq * (hq // hkv), head_dim, q.element_size())
    m_blocks = max(1, triton.cdiv(lq * (hq // hkv), bm))
    rows = batch * hkv * m_blocks
    elt = q.element_size()
    tma = not tma_reasons(q, k_cache, v_cache, page_size)
    bn = tma_block_n(head_dim, elt, page_size) if tma else block_n(head_dim, elt)
    block_d = max(16, triton.next_power_of_2(head_dim))
    warps, stages = launch_config(elt, head_dim, page_size > 0, tma, 2 * bn * block_d * elt)
    programs, stream = choose_programs(rows, triton.cdiv(cap, bn) + 1, sm_count(q.device) * PROGRAMS_PER_SM[warps],
                                       num_splits)
    return Plan(bm, bn, m_blocks, rows, programs, stream, tma, warps, stages)


# Ticket counters of the folded merge, per (device, stream): zero between launches. A buffer
# outgrown by a larger launch stays alive, since a captured CUDA graph may still point at it.
_COUNTERS: dict[tuple, torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []


def _counters(device: torch.device, n: int) -> torch.Tensor:
    stream = torch.cuda.current_stream(device).cuda_stream if device.type == "cuda" else 0
    key = (str(device), stream)
    buf = _COUNTERS.get(key)
    if buf is None or buf.numel() < n:
        if buf is not None:
            _RETIRED.append(buf)
        buf = torch.zeros(max(n, 2 * (0 if buf is None else buf.numel()), 1024), dtype=torch.int32, device=device)
        _COUNTERS[key] = buf
    return buf


def _strides(t: torch.Tensor | None, n: int) -> tuple[int, ...]:
    return tuple(t.stride()) if t is not None else (0,) * n


def _descriptor(cache: torch.Tensor, bn: int, block_d: int):
    """A host TMA descriptor over the whole 4-D cache with a ``[1, bn, 1, block_d]`` box (passed as a
    kernel argument: no in-kernel descriptor creation, no scratch allocator)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    return TensorDescriptor(cache, list(cache.shape), list(cache.stride()), [1, bn, 1, block_d])


def kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
                      cache_leftpad, block_table, scale, causal, window_left, window_right, softcap,
                      rotary_interleaved, alibi_slopes, key_mask, num_splits, *, out=None,
                      lse=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch :func:`_kvcache_kernel`; returns ``(out, lse)`` (allocated unless given, contiguous).
    Inputs are validated by ``seqgen_fast.ops.decode``; ``num_splits`` as :func:`choose_programs`."""
    batch, lq, hq, head_dim = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    lk = 0 if k is None else k.shape[1]
    paged = block_table is not None
    page_size = k_cache.shape[1] if paged else 0
    max_pages = block_table.shape[1] if paged else 1
    cap = max_pages * page_size if paged else k_cache.shape[1]
    out = torch.empty((batch, lq, hq, head_dim), device=q.device, dtype=q.dtype) if out is None else out
    lse = torch.empty((batch, hq, lq), device=q.device, dtype=torch.float32) if lse is None else lse
    if batch * hkv == 0:
        return out, lse
    pl = plan(q, k_cache, v_cache, page_size, cap, num_splits)
    block_d = max(16, triton.next_power_of_2(head_dim))
    if pl.stream:
        opart = torch.empty((2 * pl.programs * pl.block_m, head_dim), device=q.device, dtype=torch.float32)
        lpart = torch.empty((2 * pl.programs * pl.block_m,), device=q.device, dtype=torch.float32)
        counter = _counters(q.device, pl.rows)
    else:
        opart = lpart = counter = lse  # unused by the kernel with one program per row
    if pl.tma:
        kd, vd = _descriptor(k_cache, pl.block_n, block_d), _descriptor(v_cache, pl.block_n, block_d)
    else:
        kd, vd = k_cache, v_cache  # unused (the portable loads read the pointers)
    if causal:
        window_right = 0
    if key_mask is not None:
        key_mask = key_mask.view(torch.uint8) if key_mask.dtype == torch.bool else key_mask
        mask_strides = (key_mask.stride(0), key_mask.stride(1) if key_mask.shape[1] > 1 else 0, key_mask.stride(2))
    else:
        mask_strides = (0, 0, 0)
    alibi = alibi_slopes
    if alibi is not None:
        alibi_strides = (alibi.stride(0), alibi.stride(1)) if alibi.dim() == 2 else (0, alibi.stride(0))
    else:
        alibi_strides = (0, 0)
    rotary_dim = 0 if rotary_cos is None else 2 * rotary_cos.shape[1]
    placeholder = q  # pointer arguments of absent inputs: never read (their flags are compiled out)
    _kvcache_kernel[(pl.programs,)](
        q, k_cache, v_cache, kd, vd, k if k is not None else placeholder, v if v is not None else placeholder,
        *(t if t is not None else placeholder for t in (cache_seqlens, cache_batch_idx, cache_leftpad, block_table,
                                                         rotary_cos, rotary_sin, alibi, key_mask)),
        out, lse, opart, lpart, counter,
        *q.stride(), *k_cache.stride(), *v_cache.stride(), *_strides(k, 4), *_strides(v, 4), *out.stride(),
        *lse.stride(),
        *(t.stride(0) if t is not None else 0 for t in (cache_seqlens, cache_batch_idx, cache_leftpad, block_table)),
        *_strides(rotary_cos, 2), *_strides(rotary_sin, 2), *alibi_strides, *mask_strides,
        batch, hkv, lq, lk, cap, k_cache.shape[0], max_pages, 1 if rotary_cos is None else rotary_cos.shape[0],
        pl.m_blocks, pl.programs, scale * LOG2E, scale / softcap if softcap > 0 else 0.0, softcap, window_left,
        window_right,
        HEAD_DIM=head_dim, GROUP=group, BLOCK_M=pl.block_m, BLOCK_N=pl.block_n, BLOCK_D=block_d,
        BLOCK_NEW=max(16, triton.next_power_of_2(min(lk, pl.block_n))) if lk else 0, PAGE_SIZE=page_size,
        HAS_SEQLENS=cache_seqlens is not None, HAS_BATCH_IDX=cache_batch_idx is not None,
        HAS_LEFTPAD=cache_leftpad is not None, ROTARY_DIM=rotary_dim, INTERLEAVED=bool(rotary_interleaved),
        ROTATE_Q_PER_TOKEN=causal or window_left >= 0 or window_right >= 0,
        WINDOW_LEFT=window_left >= 0, WINDOW_RIGHT=window_right >= 0, HAS_SOFTCAP=softcap > 0,
        HAS_ALIBI=alibi is not None, HAS_MASK=key_mask is not None, STREAM=pl.stream, USE_TMA=pl.tma,
        CHUNK_C=COMBINE_TILE // block_d,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=pl.num_warps,
        num_stages=pl.num_stages,
    )
    return out, lse
