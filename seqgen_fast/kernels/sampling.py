"""Fused token sampling in Triton: temperature, top-k, top-p and the draw, fused, no sort.

Layout: ``logits`` (R, V) with unit stride along V (any row stride), float16/bfloat16/float32;
``out`` (R,) int64; ``seed`` a 1-element int64 device tensor. One program owns ``ROWS`` rows
(``ROWS = 1`` for large vocabularies) and streams each row in chunks of ``BLOCK_V`` (up to 2048)
columns; every per-row quantity below is a ``[ROWS]`` vector. All math is float32.

Per row, with ``s = x * float32(1/T)`` and the order-preserving integer key
``key(s) = bits(s) ^ ((bits(s) >> 31) & 0x7fffffff)`` (signed int32 order = float order):

1. statistics pass: ``m = max s``, ``Z = sum exp(s - m)`` (online rescaling), the smallest and
   largest key, and whether the row is invalid (a NaN or ``+inf``, or all ``-inf``: the row gets
   ``-1``, as in the reference).
2. top-k threshold without sorting: with ``f(t) = #{i : key_i >= t}``, find the largest key ``t``
   with ``f(t) >= k`` -- the key of the k-th largest value, ties kept like transformers' TopK. An
   ``NC``-way search on the key interval ``[lo, hi)`` (invariant ``f(lo) >= k > f(hi)``): one pass
   over the row evaluates ``f`` at ``NC`` evenly spaced keys, and the smallest and largest key inside
   the interval; the interval shrinks to the sub-interval where ``f`` crosses ``k``, clipped to the
   keys present. At most ``ceil(33 / log2 NC)`` passes (width 1 = one value); a row also stops as
   soon as ``f(lo) == k`` exactly (no tie at the threshold). Keys at or above ``hi`` count for every
   candidate alike (one sum), so only chunks holding a key inside ``[lo, hi)`` pay for the
   ``NC``-way compare: after the first pass or two almost none do.
3. ``Z = sum_{key_i >= t_k} exp(s_i - m)`` (one pass).
4. top-p threshold the same way with ``f(t) = sum_{key_i >= t} exp(s_i - m)`` and target
   ``top_p * Z``: the largest ``t`` whose kept mass is ``>= top_p`` -- the reference's "smallest set
   of the largest tokens with mass >= top_p", tie groups kept whole. Masses are float32 sums in
   chunk order, so a boundary token whose cumulative mass lies within float32 rounding (~1e-6) of
   ``top_p`` may fall on the other side than in the reference. The search's last pass also gives
   the nucleus' mass, the new ``Z``.
5. draw (one pass, inverse CDF in column order): one uniform ``u`` per row from in-kernel Philox
   (``tl.rand``: key = the seed, counter = the row); the token is the first kept ``i`` whose running
   sum of ``exp(s - m)`` (``tl.cumsum`` within a chunk, carried across chunks) exceeds ``u * Z``.
   float32 running sums: a token's probability is off by at most ~1e-6 of the row's mass.
   Greedy (``T = 0``) is one pass: the first index of ``max s``.

Two-stage top-k for long rows (``V >= 4 * SEG``, ``k <= 512``; see ``_segments``): one program per
row leaves most SMs idle at small batch, so stage 1 (``_segment_topk_kernel``, one program per
(row, segment of ``SEG`` columns)) runs step 2 on its segment alone and copies every token with
key >= the segment's k-th largest key (in column order) into ``CAP = next_pow2(k)`` slots of a
candidate buffer. The row's top-k tokens are all among the candidates (a segment's k-th largest is
at most the row's), so stage 2 (this kernel with ``COMPACT``) runs steps 1-5 on the
``NSEG * CAP`` candidates -- the same threshold, nucleus and, for the same seed, the same draw --
and maps the chosen slot back to its column. A segment whose ties overflow ``CAP``, or holding a
NaN/``+inf``, flags its row, which stage 2 then samples from its full logits.

Nothing reads back to the host: the seed arrives in device memory, so a captured CUDA graph
replays fresh draws when the generator advances the seed tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpret_mode

NUM_CANDIDATES = 16  # keys evaluated per search pass: log2(16) = 4 bits of the interval per pass
MAX_BLOCK_V = 2048  # widest chunk of a row per loop iteration (see _config)


@triton.jit
def _load_scaled(base, cols, row_ok, vlen, inv_temp):
    """s = x * inv_temp as float32 [ROWS, BLOCK_V]; valid marks in-range entries (cols < vlen, per row)."""
    valid = row_ok[:, None] & (cols[None, :] < vlen[:, None])
    x = tl.load(base[:, None] + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    return x * inv_temp, valid


@triton.jit
def _key(s):
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _search(base, row_ok, n_cols, vlen, inv_temp, m, lo, hi, target, active,
            MASS: tl.constexpr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr, NC: tl.constexpr):
    """Largest key t in [lo, hi) with f(t) >= target, and f(t) (see the module docstring); lo, hi int64."""
    j = tl.arange(0, NC)
    f_at = target
    while tl.max(active.to(tl.int32), axis=0) > 0:
        width = hi - lo
        cand = lo[:, None] + (width[:, None] * j[None, :]) // NC  # [ROWS, NC], cand[:, 0] = lo
        f = tl.zeros([ROWS, NC], dtype=tl.float32)  # f(cand) counted over keys inside [lo, hi) ...
        f_hi = tl.zeros([ROWS], dtype=tl.float32)  # ... plus f(hi), which every candidate includes
        kmin = tl.full([ROWS], 2147483647, tl.int64)
        kmax = tl.full([ROWS], -2147483648, tl.int64)
        for c0 in range(0, n_cols, BLOCK_V):
            s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), row_ok, vlen, inv_temp)
            key = _key(s).to(tl.int64)
            if MASS:
                w = tl.where(valid, tl.exp(s - m[:, None]), 0.0)
            else:
                w = valid.to(tl.float32)
            f_hi += tl.sum(tl.where(key >= hi[:, None], w, 0.0), axis=1)
            inside = valid & (key >= lo[:, None]) & (key < hi[:, None])
            if tl.sum(inside.to(tl.int32)) > 0:  # later passes: most chunks hold no key of [lo, hi)
                above = inside[:, None, :] & (key[:, None, :] >= cand[:, :, None])  # [ROWS, NC, BLOCK_V]
                f += tl.sum(tl.where(above, w[:, None, :], 0.0), axis=2)
                kmin = tl.minimum(kmin, tl.min(tl.where(inside, key, 2147483647), axis=1))
                kmax = tl.maximum(kmax, tl.max(tl.where(inside, key, -2147483648), axis=1))
        f += f_hi[:, None]
        ok = f >= target[:, None]
        n_ok = tl.maximum(tl.sum(ok.to(tl.int32), axis=1), 1)  # ok is a prefix in j (f falls with t)
        new_lo = tl.sum(tl.where(j[None, :] == (n_ok - 1)[:, None], cand, 0), axis=1)
        f_lo = tl.sum(tl.where(j[None, :] == (n_ok - 1)[:, None], f, 0.0), axis=1)
        upper = tl.sum(tl.where(j[None, :] == n_ok[:, None], cand, 0), axis=1)
        new_hi = tl.where(n_ok < NC, upper, hi)
        # No key of the row lies in [new_lo, kmin) nor in (kmax, new_hi): clip to the keys present.
        new_lo = tl.maximum(new_lo, kmin)
        new_hi = tl.minimum(new_hi, kmax + 1)
        lo = tl.where(active, new_lo, lo)
        f_at = tl.where(active, f_lo, f_at)
        hi = tl.where(active, tl.maximum(new_hi, new_lo + 1), hi)
        done = hi - lo <= 1
        if not MASS:
            done = done | (f_lo == target)  # exactly k keys >= lo: lo already selects the top k
        active = active & ~done
    return lo, f_at


@triton.jit
def _kept_mass(base, row_ok, n_cols, vlen, inv_temp, m, thr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum of exp(s - m) over the tokens with key >= thr."""
    z = tl.zeros([ROWS], dtype=tl.float32)
    for c0 in range(0, n_cols, BLOCK_V):
        s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), row_ok, vlen, inv_temp)
        keep = valid & (_key(s).to(tl.int64) >= thr[:, None])
        z += tl.sum(tl.where(keep, tl.exp(s - m[:, None]), 0.0), axis=1)
    return z


@triton.jit
def _sample_kernel(logits_ptr, out_ptr, seed_ptr, cand_ptr, cand_idx_ptr, flag_ptr, R, V, stride_r, inv_temp,
                   top_k, top_p, NCAND, NSEG,
                   GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr, COMPACT: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_V: tl.constexpr, NC: tl.constexpr, SEG_P2: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    base = logits_ptr + rows.to(tl.int64) * stride_r
    vlen = tl.zeros([ROWS], dtype=tl.int32) + V
    neg_inf = float("-inf")
    if COMPACT:  # a row whose segments all kept <= CAP tokens and no NaN/+inf reads its candidates
        seg = tl.arange(0, SEG_P2)
        flags = tl.load(flag_ptr + rows[:, None] * NSEG + seg[None, :], mask=row_ok[:, None] & (seg[None, :] < NSEG),
                        other=0)
        use_cand = tl.max(flags, axis=1) == 0
        base = tl.where(use_cand, cand_ptr + rows.to(tl.int64) * NCAND, base)
        vlen = tl.where(use_cand, NCAND, vlen)
    n_cols = tl.max(tl.where(row_ok, vlen, 0), axis=0)

    bad = tl.zeros([ROWS], dtype=tl.int1)  # a NaN (and, sampling, +inf) logit in the row
    if GREEDY:
        best = tl.full([ROWS], neg_inf, tl.float32)
        best_idx = tl.zeros([ROWS], dtype=tl.int64)
        for c0 in range(0, n_cols, BLOCK_V):
            s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), row_ok, vlen, inv_temp)
            nan = valid & (s != s)
            bad = bad | (tl.max(nan.to(tl.int32), axis=1) > 0)
            score = tl.where(valid & ~nan, s, neg_inf)  # NaN rows give -1: keep NaN out of the max and argmax
            c_best = tl.max(score, axis=1)
            c_idx = tl.argmax(score, axis=1).to(tl.int64) + c0
            best_idx = tl.where(c_best > best, c_idx, best_idx)  # strict: the first maximum wins
            best = tl.maximum(best, c_best)
        out = tl.where(bad, -1, best_idx)
    else:
        # 1. statistics: max, sum of exp (online rescaling), key range, invalid rows
        m = tl.full([ROWS], neg_inf, tl.float32)
        z = tl.zeros([ROWS], dtype=tl.float32)
        kmin = tl.full([ROWS], 2147483647, tl.int64)
        kmax = tl.full([ROWS], -2147483648, tl.int64)
        for c0 in range(0, n_cols, BLOCK_V):
            s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), row_ok, vlen, inv_temp)
            bad = bad | (tl.max((valid & ((s != s) | (s == float("inf")))).to(tl.int32), axis=1) > 0)
            m_new = tl.maximum(m, tl.max(tl.where(valid, s, neg_inf), axis=1))
            m_safe = tl.where(m_new == neg_inf, 0.0, m_new)
            z = z * tl.exp(m - m_safe) + tl.sum(tl.where(valid, tl.exp(s - m_safe[:, None]), 0.0), axis=1)
            m = m_new
            key = _key(s).to(tl.int64)
            kmin = tl.minimum(kmin, tl.min(tl.where(valid, key, 2147483647), axis=1))
            kmax = tl.maximum(kmax, tl.max(tl.where(valid, key, -2147483648), axis=1))
        bad = bad | (m == neg_inf)
        search = row_ok & ~bad
        thr = kmin  # keep key >= thr: everything
        # 2-4. thresholds; z becomes the mass of the kept tokens
        if TOP_K:
            target = tl.zeros([ROWS], dtype=tl.float32) + top_k
            thr, _ = _search(base, row_ok, n_cols, vlen, inv_temp, m, thr, kmax + 1, target, search, False,
                             ROWS, BLOCK_V, NC)
            z = _kept_mass(base, row_ok, n_cols, vlen, inv_temp, m, thr, ROWS, BLOCK_V)
        if TOP_P:
            thr, z = _search(base, row_ok, n_cols, vlen, inv_temp, m, thr, kmax + 1, top_p * z, search, True,
                             ROWS, BLOCK_V, NC)
        # 5. inverse CDF: the first kept token whose running mass exceeds u * z
        u = tl.minimum(tl.rand(tl.load(seed_ptr), rows), 0.99999994)
        target = u * z
        acc = tl.zeros([ROWS], dtype=tl.float32)
        choice = tl.full([ROWS], -1, tl.int64)
        last = tl.full([ROWS], -1, tl.int64)  # the last kept token: the pick if rounding never crosses
        for c0 in range(0, n_cols, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            s, valid = _load_scaled(base, cols, row_ok, vlen, inv_temp)
            keep = valid & (_key(s).to(tl.int64) >= thr[:, None])
            w = tl.where(keep, tl.exp(s - m[:, None]), 0.0)
            run = tl.cumsum(w, axis=1) + acc[:, None]
            first = tl.min(tl.where(keep & (run > target[:, None]), cols[None, :], 2147483647), axis=1)
            choice = tl.where((choice < 0) & (first < 2147483647), first.to(tl.int64), choice)
            last = tl.maximum(last, tl.max(tl.where(keep, cols[None, :], -1), axis=1).to(tl.int64))
            acc += tl.sum(w, axis=1)
        choice = tl.where(choice < 0, last, choice)
        if COMPACT:  # a position among the candidates -> the column in the row
            mapped = tl.load(cand_idx_ptr + rows.to(tl.int64) * NCAND + choice,
                             mask=row_ok & use_cand & (choice >= 0), other=0)
            choice = tl.where(use_cand, mapped.to(tl.int64), choice)
        out = tl.where(bad | (last < 0), -1, choice)
    tl.store(out_ptr + rows, out, mask=row_ok)


@triton.jit
def _segment_topk_kernel(logits_ptr, cand_ptr, cand_idx_ptr, flag_ptr, V, stride_r, inv_temp, top_k, SEG, NCAND,
                         CAP: tl.constexpr, BLOCK_V: tl.constexpr, NC: tl.constexpr):
    """Stage 1 of top-k for big V: program (row, p) copies the tokens of columns [p*SEG, (p+1)*SEG)
    with key >= that segment's k-th largest key -- a superset of the row's top-k there -- into CAP
    slots of the row's candidate buffer (column order kept; -inf pads), their columns into
    cand_idx, and sets flag[row, p] = 1 when they do not fit (ties) or the segment holds a NaN/+inf:
    such a row is then sampled from its full logits."""
    r = tl.program_id(0)
    p = tl.program_id(1)
    ok = tl.full([1], 1, tl.int1)
    start = p * SEG
    base = logits_ptr + r.to(tl.int64) * stride_r + start + tl.zeros([1], dtype=tl.int64)
    vlen = tl.zeros([1], dtype=tl.int32) + tl.minimum(SEG, V - start)
    bad = tl.zeros([1], dtype=tl.int1)
    kmin = tl.full([1], 2147483647, tl.int64)
    kmax = tl.full([1], -2147483648, tl.int64)
    for c0 in range(0, SEG, BLOCK_V):
        s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), ok, vlen, inv_temp)
        bad = bad | (tl.max((valid & ((s != s) | (s == float("inf")))).to(tl.int32), axis=1) > 0)
        key = _key(s).to(tl.int64)
        kmin = tl.minimum(kmin, tl.min(tl.where(valid, key, 2147483647), axis=1))
        kmax = tl.maximum(kmax, tl.max(tl.where(valid, key, -2147483648), axis=1))
    search = ~bad & (vlen > top_k)
    target = tl.zeros([1], dtype=tl.float32) + top_k
    thr, count = _search(base, ok, SEG, vlen, inv_temp, target, kmin, kmax + 1, target, search, False,
                         1, BLOCK_V, NC)
    n_keep = tl.where(search, count.to(tl.int32), vlen)
    tl.store(flag_ptr + r * tl.num_programs(1) + p + tl.zeros([1], dtype=tl.int32),
             (bad | (n_keep > CAP)).to(tl.int32))
    out = cand_ptr + r.to(tl.int64) * NCAND + p * CAP
    out_idx = cand_idx_ptr + r.to(tl.int64) * NCAND + p * CAP
    written = tl.zeros([1], dtype=tl.int32)
    for c0 in range(0, SEG, BLOCK_V):
        cols = c0 + tl.arange(0, BLOCK_V)
        valid = cols[None, :] < vlen[:, None]
        x = tl.load(base[:, None] + cols[None, :], mask=valid, other=0.0)
        keep = valid & (_key(x.to(tl.float32) * inv_temp).to(tl.int64) >= thr[:, None])
        pos = written[:, None] + tl.cumsum(keep.to(tl.int32), axis=1) - 1
        tl.store(out + pos, x, mask=keep & (pos < CAP))
        tl.store(out_idx + pos, start + cols[None, :], mask=keep & (pos < CAP))
        written += tl.sum(keep.to(tl.int32), axis=1)
    slot = tl.arange(0, CAP)
    pad = slot[None, :] >= written[:, None]
    tl.store(out + slot[None, :], tl.full([1, CAP], float("-inf"), cand_ptr.dtype.element_ty), mask=pad)
    tl.store(out_idx + slot[None, :], tl.zeros([1, CAP], dtype=tl.int32), mask=pad)


def _config(R: int, V: int, block_v: int | None, interpret: bool | None = None) -> tuple[int, int, int]:
    """(ROWS, BLOCK_V, num_warps): one row per program in chunks of up to 2048 for big V; several
    rows share a program for small V; eight elements of the [ROWS, BLOCK_V] chunk per thread (one
    16-byte vector of bf16).

    The search holds a [ROWS, NC, BLOCK_V] compare tile. ptxas for sm_90 keeps it in registers at
    eight elements a thread, and spills at sixteen (4096 over 16 warps: over 1 KB per thread in
    bf16 with Triton 3.6's ptxas), see ``tests/test_sampling.py``. Not tuned on a GPU yet. The
    interpreter runs one program at a time, so there (``interpret``, default: whether it is on)
    every row of a small problem shares one.
    """
    block = block_v or min(triton.next_power_of_2(V), MAX_BLOCK_V)
    if interpret_mode() if interpret is None else interpret:
        rows = min(triton.next_power_of_2(R), max(1, 8192 // block))
    else:
        rows = min(triton.next_power_of_2(R), max(1, 1024 // block), 16)
    return rows, block, max(1, min(8, rows * block // 256))


def sample_tokens(logits: torch.Tensor, seed: torch.Tensor | None, temperature: float, top_k: int, top_p: float,
                  out: torch.Tensor | None = None, block_v: int | None = None,
                  segment: int | None = None) -> torch.Tensor:
    """Launch the sampler on ``logits`` (R, V): returns ``out`` (R,) int64 (see the module docstring).

    ``temperature == 0`` is greedy (``seed`` may be None); ``top_k`` of 0 or ``>= V`` and
    ``top_p >= 1`` disable those filters. ``block_v`` (a power of two) overrides the chunk width;
    ``segment`` the two-stage top-k plan (see ``_segments``).
    """
    if logits.dim() != 2:
        raise ValueError(f"sample_tokens kernel: logits must be (R, V), got shape {tuple(logits.shape)}")
    if logits.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"sample_tokens kernel: logits dtype {logits.dtype} is not float16, bfloat16 or float32")
    if block_v is not None and (block_v < 1 or block_v & (block_v - 1)):
        raise ValueError(f"sample_tokens kernel: block_v must be a power of two, got {block_v}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    R, V = logits.shape
    greedy = temperature == 0
    if not greedy and (seed is None or seed.numel() != 1 or seed.dtype != torch.int64):
        raise ValueError("sample_tokens kernel: seed must be a 1-element int64 tensor when temperature > 0")
    if out is None:
        out = torch.empty(R, dtype=torch.int64, device=logits.device)
    if R == 0:
        return out
    use_k = not greedy and 0 < top_k < V
    use_p = not greedy and top_p < 1.0
    seed_arg = out if seed is None else seed  # greedy never reads it; any int64 pointer will do
    inv_temp = 1.0 / temperature if not greedy else 1.0
    plan = _segments(V, top_k, segment) if use_k else None
    if plan is None:
        cand, cand_idx, flags, ncand, nseg = logits, out, out, 0, 0
        rows, block, warps = _config(R, V, block_v)
    else:
        cand, cand_idx, flags = segment_candidates(logits, inv_temp, top_k, plan)
        ncand, nseg = cand.shape[1], flags.shape[1]
        rows, block, warps = _config(R, min(V, ncand) if block_v is None else V, block_v)
    _sample_kernel[(triton.cdiv(R, rows),)](
        logits, out, seed_arg, cand, cand_idx, flags, R, V, logits.stride(0), inv_temp, top_k, float(top_p),
        ncand, nseg, GREEDY=greedy, TOP_K=use_k, TOP_P=use_p, COMPACT=plan is not None, ROWS=rows,
        BLOCK_V=block, NC=NUM_CANDIDATES, SEG_P2=triton.next_power_of_2(max(nseg, 1)), num_warps=warps)
    return out


def segment_candidates(logits: torch.Tensor, inv_temp: float, top_k: int, plan: tuple[int, int, int]):
    """Stage 1 of the two-stage top-k on contiguous-row ``logits`` (R, V), ``plan`` from ``_segments``:
    returns ``cand`` (R, NSEG * CAP) in the logits' dtype, ``cand_idx`` (R, NSEG * CAP) int32 columns
    and ``flags`` (R, NSEG) int32 (see ``_segment_topk_kernel``)."""
    seg, nseg, cap = plan
    R, V = logits.shape
    cand = torch.empty(R, nseg * cap, dtype=logits.dtype, device=logits.device)
    cand_idx = torch.empty(R, nseg * cap, dtype=torch.int32, device=logits.device)
    flags = torch.empty(R, nseg, dtype=torch.int32, device=logits.device)
    _, block, warps = _config(1, seg, None)
    _segment_topk_kernel[(R, nseg)](
        logits, cand, cand_idx, flags, V, logits.stride(0), inv_temp, top_k, seg, nseg * cap,
        CAP=cap, BLOCK_V=block, NC=NUM_CANDIDATES, num_warps=warps)
    return cand, cand_idx, flags


def _segments(V: int, top_k: int, segment: int | None) -> tuple[int, int, int] | None:
    """(segment length, segments, CAP) of the two-stage top-k, or None to run one stage.

    Two stages pay when a row is long against k: stage 1 spreads each row over V / SEG programs
    (all SMs busy even at batch 1) and leaves stage 2 about SEG / CAP times fewer columns.
    ``segment=0`` disables it; a positive ``segment`` forces that length (tests).
    """
    cap = triton.next_power_of_2(top_k)
    if segment == 0 or cap > 512:
        return None
    seg = segment or max(2048, 8 * cap)
    if seg < cap or (segment is None and V < 4 * seg):
        return None
    return seg, triton.cdiv(V, seg), cap
