"""Rotary position embedding (RoPE) in Triton: the fused prefill kernel, and the per-tile helpers the
KV-cache attention kernel (``kernels/decode.py``) rotates q and the new k with on load.

Math and table layouts: ``seqgen_fast.reference.rotary`` (full tables, transformers' convention:
column ``d`` multiplies dim ``d``; half tables, flash-attn's: column ``i`` serves both dims of pair
``i``). A rotated dim ``d < R`` becomes ``x[d] * cos[c(d)] + sign(d) * x[partner(d)] * sin[c(d)]``
in float32; dims ``d >= R`` pass through.

``_rotary_kernel`` rotates q and k in one launch: programs ``[0, PQ)`` take q, the rest k. Each
program owns ``BLOCK_R`` consecutive (token, head) rows of one tensor and all ``D`` dims. Both
tensors are (B, S, H, D) through their strides (a packed (T, H, D) tensor is B=1, S=T). A
token's position is ``position_ids[b, s]``, or ``s``, or (packed, with ``cu_seqlens``) its offset
in its segment, found by a binary search over ``cu_seqlens`` in the kernel (no host sync); the
table row is that position clamped into ``[0, S_ro - 1]``. Per-token tables (B or 1, S, W) are
read at the token itself. Reads each element of q and k once and writes it once (in place or to
new tensors): the memory floor of the op.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

# Elements of one tensor tile per program (rows x padded head dim).
TILE_ELEMENTS = 4096


@triton.jit
def rotary_columns(offs_d, ROTARY_DIM: tl.constexpr, INTERLEAVED: tl.constexpr, HALF_TABLE: tl.constexpr):
    """For head dims ``offs_d``: (partner dim, table column, sign of the partner term, rotated?)."""
    rot = offs_d < ROTARY_DIM
    if INTERLEAVED:
        partner = offs_d ^ 1
        sign = tl.where(offs_d % 2 == 0, -1.0, 1.0)
        if HALF_TABLE:
            col = offs_d // 2
        else:
            col = offs_d
    else:
        half: tl.constexpr = ROTARY_DIM // 2
        partner = tl.where(offs_d < half, offs_d + half, offs_d - half)
        sign = tl.where(offs_d < half, -1.0, 1.0)
        if HALF_TABLE:
            col = offs_d % half
        else:
            col = offs_d
    return tl.where(rot, partner, offs_d), tl.where(rot, col, 0), sign, rot


@triton.jit
def rotate_tile(x, x_partner, cos, sin, sign, rot):
    """``x * cos + sign * x_partner * sin`` on the rotated dims, ``x`` elsewhere; float32."""
    xf = x.to(tl.float32)
    y = xf * cos.to(tl.float32) + sign[None, :] * x_partner.to(tl.float32) * sin.to(tl.float32)
    return tl.where(rot[None, :], y, xf)


@triton.jit
def _segment_positions(s, CU, NUM_SEQS, SEARCH_STEPS: tl.constexpr):
    """Offset of packed token ``s`` within its ``cu_seqlens`` segment (binary search, clamped)."""
    lo = tl.zeros_like(s)
    hi = tl.zeros_like(s) + NUM_SEQS
    for _ in tl.static_range(SEARCH_STEPS):  # count of cu[1..NUM_SEQS] <= s
        active = lo < hi
        mid = (lo + hi) // 2
        ends = tl.load(CU + 1 + mid, mask=active, other=0)
        right = active & (ends <= s)
        lo = tl.where(right, mid + 1, lo)
        hi = tl.where(active & ~right, mid, hi)
    seq = tl.minimum(lo, NUM_SEQS - 1)
    return s - tl.load(CU + seq)


@triton.jit
def _rotate_rows(X, XO, COS, SIN, POS, CU, tile, n_rows, heads, seqlen, sxb, sxs, sxh, sxd, sob, sos, soh, sod,
                 scb, scs, scc, ssb, sss, ssc, spb, sps, s_ro, NUM_SEQS,
                 HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY_DIM: tl.constexpr,
                 INTERLEAVED: tl.constexpr, POSITIONS: tl.constexpr, PER_TOKEN: tl.constexpr,
                 SEARCH_STEPS: tl.constexpr):
    rows = tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    tok = rows // heads
    head = (rows % heads).to(tl.int64)
    b = (tok // seqlen).to(tl.int64)
    s = tok % seqlen
    offs_d = tl.arange(0, BLOCK_D)
    # interleaved: flash-attn's half tables; non-interleaved: transformers' full tables
    partner, col, sign, rot = rotary_columns(offs_d, ROTARY_DIM, INTERLEAVED, INTERLEAVED)
    ok = row_ok[:, None] & (offs_d < HEAD_DIM)[None, :]
    base = X + b * sxb + s.to(tl.int64) * sxs + head * sxh
    x = tl.load(base[:, None] + offs_d[None, :] * sxd, mask=ok, other=0.0)
    x_partner = tl.load(base[:, None] + partner[None, :] * sxd, mask=ok & rot[None, :], other=0.0)
    if PER_TOKEN:  # (B or 1, S, W) values of each token
        row_c = b * scb + s.to(tl.int64) * scs
        row_s = b * ssb + s.to(tl.int64) * sss
    else:  # a (S_ro, W) table at the token's position
        if POSITIONS == 1:  # position_ids
            pos = tl.load(POS + b * spb + s.to(tl.int64) * sps, mask=row_ok, other=0).to(tl.int32)
        elif POSITIONS == 2:  # offsets within cu_seqlens segments
            pos = _segment_positions(s, CU, NUM_SEQS, SEARCH_STEPS)
        else:
            pos = s
        pos = tl.minimum(tl.maximum(pos, 0), s_ro - 1).to(tl.int64)
        row_c = pos * scs
        row_s = pos * sss
    cs_ok = row_ok[:, None] & rot[None, :]
    cos = tl.load(COS + row_c[:, None] + col[None, :] * scc, mask=cs_ok, other=1.0)
    sin = tl.load(SIN + row_s[:, None] + col[None, :] * ssc, mask=cs_ok, other=0.0)
    y = rotate_tile(x, x_partner, cos, sin, sign, rot)
    out = XO + b * sob + s.to(tl.int64) * sos + head * soh
    tl.store(out[:, None] + offs_d[None, :] * sod, y.to(XO.dtype.element_ty), mask=ok)


@triton.jit
def _rotary_kernel(Q, K, QO, KO, COS, SIN, POS, CU, PQ, rows_q, rows_k, heads_q, heads_k, seqlen,
                   sqb, sqs, sqh, sqd, sqob, sqos, sqoh, sqod,
                   skb, sks, skh, skd, skob, skos, skoh, skod,
                   scb, scs, scc, ssb, sss, ssc, spb, sps, s_ro, NUM_SEQS,
                   HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr, ROTARY_DIM: tl.constexpr,
                   INTERLEAVED: tl.constexpr, POSITIONS: tl.constexpr, PER_TOKEN: tl.constexpr,
                   SEARCH_STEPS: tl.constexpr):
    pid = tl.program_id(0)
    if pid < PQ:
        _rotate_rows(Q, QO, COS, SIN, POS, CU, pid, rows_q, heads_q, seqlen, sqb, sqs, sqh, sqd, sqob, sqos, sqoh,
                     sqod, scb, scs, scc, ssb, sss, ssc, spb, sps, s_ro, NUM_SEQS, HEAD_DIM, BLOCK_R, BLOCK_D,
                     ROTARY_DIM, INTERLEAVED, POSITIONS, PER_TOKEN, SEARCH_STEPS)
    else:
        _rotate_rows(K, KO, COS, SIN, POS, CU, pid - PQ, rows_k, heads_k, seqlen, skb, sks, skh, skd, skob, skos,
                     skoh, skod, scb, scs, scc, ssb, sss, ssc, spb, sps, s_ro, NUM_SEQS, HEAD_DIM, BLOCK_R, BLOCK_D,
                     ROTARY_DIM, INTERLEAVED, POSITIONS, PER_TOKEN, SEARCH_STEPS)


def _as_bshd(t: torch.Tensor) -> tuple[int, ...]:
    """(B, S, H, D) strides of a (B, S, H, D) tensor or of a packed (T, H, D) one (B = 1, S = T)."""
    return tuple(t.stride()) if t.dim() == 4 else (0, *t.stride())


def _table_strides(t: torch.Tensor) -> tuple[int, int, int]:
    """(batch, row, column) strides of a (S_ro, W) table (batch 0) or of (B or 1, S, W) per-token values."""
    if t.dim() == 2:
        return (0, *t.stride())
    return (t.stride(0) if t.shape[0] > 1 else 0, t.stride(1), t.stride(2))


def rotary_embedding(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor,
                     position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None, interleaved: bool,
                     inplace: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Launch :func:`_rotary_kernel`; inputs are validated by ``seqgen_fast.ops.rotary``."""
    packed = q.dim() == 3
    seqlen = q.shape[0] if packed else q.shape[1]
    head_dim = q.shape[-1]
    qo = q if inplace else torch.empty_like(q)
    ko = None if k is None else (k if inplace else torch.empty_like(k))
    per_token = cos.dim() == 3
    rotary_dim = cos.shape[-1] * (2 if interleaved else 1)
    block_d = triton.next_power_of_2(head_dim)
    block_r = max(1, TILE_ELEMENTS // block_d)
    rows_q = q.numel() // head_dim
    rows_k = 0 if k is None else k.numel() // head_dim
    pq = triton.cdiv(rows_q, block_r)
    grid = (pq + triton.cdiv(rows_k, block_r),)
    if grid[0] == 0:
        return qo, ko
    kk, kko = (k, ko) if k is not None else (q, qo)  # placeholders: no k programs are launched
    table_strides = [_table_strides(t) for t in (cos, sin)]
    positions = 1 if position_ids is not None else (2 if cu_seqlens is not None else 0)
    pos = position_ids if position_ids is not None else q
    if position_ids is not None and position_ids.dim() == 2:
        spb = position_ids.stride(0) if position_ids.shape[0] > 1 else 0
        sps = position_ids.stride(1)
    else:
        spb, sps = 0, (position_ids.stride(0) if position_ids is not None else 0)
    cu = cu_seqlens if cu_seqlens is not None else q
    num_seqs = cu_seqlens.numel() - 1 if cu_seqlens is not None else 1
    _rotary_kernel[grid](
        q, kk, qo, kko, cos, sin, pos, cu, pq, rows_q, rows_k, q.shape[-2], kk.shape[-2], seqlen,
        *_as_bshd(q), *_as_bshd(qo), *_as_bshd(kk), *_as_bshd(kko),
        *table_strides[0], *table_strides[1], spb, sps, cos.shape[-2], num_seqs,
        HEAD_DIM=head_dim, BLOCK_R=block_r, BLOCK_D=block_d, ROTARY_DIM=rotary_dim, INTERLEAVED=interleaved,
        POSITIONS=positions, PER_TOKEN=per_token, SEARCH_STEPS=max(1, num_seqs.bit_length()), num_warps=4,
    )
    return qo, ko
