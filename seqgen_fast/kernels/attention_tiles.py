"""Tile helpers shared by the attention kernels of both dialects: the Triton (``tl``) kernels of
:mod:`seqgen_fast.kernels.attention` and the Gluon Hopper forward of
:mod:`seqgen_fast.kernels.attention_gluon` (a ``gluon.jit`` function may call these ``triton.jit``
ones: they use only layout-free element-wise and scalar operations).

Index math (which sequence a tile belongs to, which key / query blocks a tile visits and which of
them need masking), the score transform of one tile (scale or softcap, ALiBi, user mask, band) and
the dropout keep mask; the formulas are stated in :mod:`seqgen_fast.kernels.attention`. The
running maxima of the online softmax go through :func:`nan_max` / :func:`row_max`, which keep a NaN
when compiled (``tl.maximum`` / ``tl.max`` lower to NaN-dropping instructions on NVIDIA GPUs; the
interpreter's numpy maximum keeps it), so compiled and interpreted kernels agree on non-finite rows.
"""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


@triton.jit
def nan_max(a, b):
    """max(a, b) that returns NaN when either is NaN: PTX ``max.NaN.f32``, SASS ``FMNMX.NAN`` -- the
    instruction ``tl.maximum`` lowers to by default (``max.f32``/``FMNMX``, which returns the other
    operand of a NaN) with its NaN modifier."""
    return tl.maximum(a, b, propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def row_max(x, axis):
    """max of ``x`` along ``axis`` that is NaN where any element is (``tl.max`` drops NaN on GPUs)."""
    return tl.reduce(x, axis, nan_max)


@triton.jit
def sequence_of(bh, HEADS, CU_Q, CU_K, seqlen_q, seqlen_k, BOTTOM_RIGHT: tl.constexpr, IS_VARLEN: tl.constexpr):
    """Of a batch x HEADS index: (b, head, first row of q, q length, first row of k, k length, band
    shift: the band of query row i is centred on key i + shift). Varlen: offsets are clamped into
    the packed rows (``seqlen_q``/``seqlen_k`` = total rows), so bad cu_seqlens can give wrong
    sequences but never an access outside q, k, v."""
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
def _tanh(x):
    """tanh through exp2 (exact to float32 rounding in absolute terms, saturating at +-1)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def tile_scores(qk, rows, cols, q_len, k_len, shift, slope, mask_base, stride_mm, stride_mn, qk_scale, softcap_scale,
            softcap_mul, win_left, win_right, HAS_MASK: tl.constexpr, MASK_BOOL: tl.constexpr, SOFTCAP: tl.constexpr,
            ALIBI: tl.constexpr, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr, MASKED: tl.constexpr):
    """(scores s in the log2 domain, tanh t of the softcap or s) of the raw products ``qk``.

    ``rows``/``cols`` are the query / key indices broadcast to ``qk``'s shape ([:, None] and
    [None, :] for a (query, key) tile; the other way round for the transposed tile of dK/dV).
    ``MASKED`` applies the key bound and the band (blocks inside both skip it); the user mask is
    always applied.
    """
    if SOFTCAP:
        t = _tanh(qk * softcap_scale)
        s = t * softcap_mul
    else:
        s = qk * qk_scale
        t = s
    if ALIBI:
        s -= slope * tl.abs(rows + (k_len - q_len) - cols).to(tl.float32)
    if HAS_MASK:
        mv = tl.load(mask_base + rows.to(tl.int64) * stride_mm + cols * stride_mn,  # L x S can pass 2^31
                     mask=(rows < q_len) & (cols < k_len), other=0)
        if MASK_BOOL:
            s = tl.where(mv != 0, s, float("-inf"))
        else:
            s = s + mv.to(tl.float32) * 1.4426950408889634
    if MASKED:
        keep = cols < k_len
        if BAND_LEFT:
            keep = keep & (cols >= rows + shift - win_left)
        if BAND_RIGHT:
            keep = keep & (cols <= rows + shift + win_right)
        s = tl.where(keep, s, float("-inf"))
    return s, t


@triton.jit
def dropout_keep(seed, offset, row_ids, cols, seqlen_k, dropout_p):
    """Dropout keep mask of (packed query row id, key row) pairs: Philox uniform >= dropout_p."""
    return tl.rand(seed, offset + row_ids.to(tl.int64) * seqlen_k + cols) >= dropout_p


@triton.jit
def key_ranges(m0, q_len, k_len, shift, win_left, win_right, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr,
                BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Key ranges of query rows [m0, m0 + BLOCK_M): [lo, a) and [b, hi) need masking, [a, b) does
    not; keys outside [lo, hi) are invisible to every row of the block."""
    last = tl.minimum(m0 + BLOCK_M, q_len) - 1
    lo = m0 * 0
    hi = k_len + m0 * 0
    if BAND_LEFT:
        lo = (tl.maximum(m0 + shift - win_left, 0) // BLOCK_N) * BLOCK_N
    if BAND_RIGHT:
        hi = tl.minimum(last + shift + win_right + 1, k_len)
    hi = tl.maximum(hi, lo)
    a = lo
    if BAND_LEFT:
        a = tl.cdiv(tl.maximum(last + shift - win_left, 0), BLOCK_N) * BLOCK_N
    a = tl.minimum(tl.maximum(a, lo), hi)
    b = (k_len // BLOCK_N) * BLOCK_N
    if BAND_RIGHT:
        b = tl.minimum(b, (tl.maximum(m0 + shift + win_right + 1, 0) // BLOCK_N) * BLOCK_N)
    b = tl.minimum(tl.maximum(b, a), hi)
    return lo, a, b, hi


@triton.jit
def query_tile(tile, n_bh, n_mblocks, HEADS, CU_Q, CU_K, seqlen_q, seqlen_k, win_left, win_right,
               BOTTOM_RIGHT: tl.constexpr, IS_VARLEN: tl.constexpr, BAND_LEFT: tl.constexpr,
               BAND_RIGHT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Tile ``tile`` of a (query block, batch x head) grid ordered longest first (query blocks from
    the last: under a causal band those see the most keys): (:func:`sequence_of`'s seven values,
    the tile's first query row, its :func:`key_ranges`)."""
    b, head, q_start, q_len, k_start, k_len, shift = sequence_of(tile % n_bh, HEADS, CU_Q, CU_K, seqlen_q, seqlen_k,
                                                                 BOTTOM_RIGHT, IS_VARLEN)
    m0 = (n_mblocks - 1 - tile // n_bh) * BLOCK_M
    lo, a, bb, hi = key_ranges(m0, q_len, k_len, shift, win_left, win_right, BAND_LEFT, BAND_RIGHT, BLOCK_M, BLOCK_N)
    return b, head, q_start, q_len, k_start, k_len, shift, m0, lo, a, bb, hi


@triton.jit
def query_ranges(n0, q_len, k_len, shift, win_left, win_right, BAND_LEFT: tl.constexpr, BAND_RIGHT: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Query ranges of key rows [n0, n0 + BLOCK_N), as :func:`key_ranges` the other way round.
    Query rows past ``q_len`` are not masked here: their lse is +inf, so their P is 0 unless a
    non-finite k / v makes their zero products NaN, which the dK / dV loop zeroes in the last block."""
    last = tl.minimum(n0 + BLOCK_N, k_len) - 1
    lo = n0 * 0
    hi = q_len + n0 * 0
    if BAND_RIGHT:
        lo = (tl.maximum(n0 - shift - win_right, 0) // BLOCK_M) * BLOCK_M
    if BAND_LEFT:
        hi = tl.minimum(last - shift + win_left + 1, q_len)
    hi = tl.maximum(hi, lo)
    a = lo
    if BAND_RIGHT:
        a = tl.cdiv(tl.maximum(last - shift - win_right, 0), BLOCK_M) * BLOCK_M
    a = tl.minimum(tl.maximum(a, lo), hi)
    b = hi
    if BAND_LEFT:
        b = tl.minimum(b, (tl.maximum(n0 - shift + win_left + 1, 0) // BLOCK_M) * BLOCK_M)
    b = tl.minimum(tl.maximum(b, a), hi)
    return lo, a, b, hi
