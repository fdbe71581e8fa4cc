"""Fused token sampling in Triton: temperature, top-k, top-p and the draw in one kernel, no sort.

Layout: ``logits`` (R, V) with unit stride along V (any row stride), float16/bfloat16/float32;
``out`` (R,) int64; ``seed`` a 1-element int64 device tensor. One program owns ``ROWS`` rows
(``ROWS = 1`` for large vocabularies) and streams each row in chunks of ``BLOCK_V`` columns; every
per-row quantity below is a ``[ROWS]`` vector. All math is float32.

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

Nothing reads back to the host: the seed arrives in device memory, so a captured CUDA graph
replays fresh draws when the generator advances the seed tensor.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._backend import interpret_mode

NUM_CANDIDATES = 16  # keys evaluated per search pass: log2(16) = 4 bits of the interval per pass


@triton.jit
def _load_scaled(base, cols, row_ok, V, inv_temp):
    """s = x * inv_temp as float32 [ROWS, BLOCK_V]; valid marks in-range entries."""
    valid = row_ok[:, None] & (cols[None, :] < V)
    x = tl.load(base[:, None] + cols[None, :], mask=valid, other=0.0).to(tl.float32)
    return x * inv_temp, valid


@triton.jit
def _key(s):
    bits = s.to(tl.int32, bitcast=True)
    return bits ^ ((bits >> 31) & 0x7FFFFFFF)


@triton.jit
def _search(base, row_ok, V, inv_temp, m, lo, hi, target, active,
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
        for c0 in range(0, V, BLOCK_V):
            s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), row_ok, V, inv_temp)
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
def _kept_mass(base, row_ok, V, inv_temp, m, thr, ROWS: tl.constexpr, BLOCK_V: tl.constexpr):
    """sum of exp(s - m) over the tokens with key >= thr."""
    z = tl.zeros([ROWS], dtype=tl.float32)
    for c0 in range(0, V, BLOCK_V):
        s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), row_ok, V, inv_temp)
        keep = valid & (_key(s).to(tl.int64) >= thr[:, None])
        z += tl.sum(tl.where(keep, tl.exp(s - m[:, None]), 0.0), axis=1)
    return z


@triton.jit
def _sample_kernel(logits_ptr, out_ptr, seed_ptr, R, V, stride_r, inv_temp, top_k, top_p,
                   GREEDY: tl.constexpr, TOP_K: tl.constexpr, TOP_P: tl.constexpr,
                   ROWS: tl.constexpr, BLOCK_V: tl.constexpr, NC: tl.constexpr):
    rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
    row_ok = rows < R
    base = logits_ptr + rows.to(tl.int64) * stride_r
    neg_inf = float("-inf")

    bad = tl.zeros([ROWS], dtype=tl.int1)  # a NaN (and, sampling, +inf) logit in the row
    if GREEDY:
        best = tl.full([ROWS], neg_inf, tl.float32)
        best_idx = tl.zeros([ROWS], dtype=tl.int64)
        for c0 in range(0, V, BLOCK_V):
            s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), row_ok, V, inv_temp)
            bad = bad | (tl.max((valid & (s != s)).to(tl.int32), axis=1) > 0)
            score = tl.where(valid, s, neg_inf)
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
        for c0 in range(0, V, BLOCK_V):
            s, valid = _load_scaled(base, c0 + tl.arange(0, BLOCK_V), row_ok, V, inv_temp)
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
            thr, _ = _search(base, row_ok, V, inv_temp, m, thr, kmax + 1, target, search, False, ROWS, BLOCK_V, NC)
            z = _kept_mass(base, row_ok, V, inv_temp, m, thr, ROWS, BLOCK_V)
        if TOP_P:
            thr, z = _search(base, row_ok, V, inv_temp, m, thr, kmax + 1, top_p * z, search, True, ROWS, BLOCK_V, NC)
        # 5. inverse CDF: the first kept token whose running mass exceeds u * z
        u = tl.minimum(tl.rand(tl.load(seed_ptr), rows), 0.99999994)
        target = u * z
        acc = tl.zeros([ROWS], dtype=tl.float32)
        choice = tl.full([ROWS], -1, tl.int64)
        last = tl.full([ROWS], -1, tl.int64)  # the last kept token: the pick if rounding never crosses
        for c0 in range(0, V, BLOCK_V):
            cols = c0 + tl.arange(0, BLOCK_V)
            s, valid = _load_scaled(base, cols, row_ok, V, inv_temp)
            keep = valid & (_key(s).to(tl.int64) >= thr[:, None])
            w = tl.where(keep, tl.exp(s - m[:, None]), 0.0)
            run = tl.cumsum(w, axis=1) + acc[:, None]
            first = tl.min(tl.where(keep & (run > target[:, None]), cols[None, :], 2147483647), axis=1)
            choice = tl.where((choice < 0) & (first < 2147483647), first.to(tl.int64), choice)
            last = tl.maximum(last, tl.max(tl.where(keep, cols[None, :], -1), axis=1).to(tl.int64))
            acc += tl.sum(w, axis=1)
        choice = tl.where(choice < 0, last, choice)
        out = tl.where(bad | (last < 0), -1, choice)
    tl.store(out_ptr + rows, out, mask=row_ok)


def _config(R: int, V: int, block_v: int | None) -> tuple[int, int, int]:
    """(ROWS, BLOCK_V, num_warps): one row per program for big V; several rows share one for small V.

    The search holds a [ROWS, NC, BLOCK_V] compare tile; it is capped at 16K elements on a GPU.
    The interpreter runs one program at a time, so there every row of a small problem shares one.
    """
    block = block_v or min(triton.next_power_of_2(V), 1024)
    if interpret_mode():
        rows = min(triton.next_power_of_2(R), max(1, 8192 // block))
    else:
        rows = min(triton.next_power_of_2(R), max(1, 1024 // block), 16)
    return rows, block, 8 if rows * block >= 1024 else 4


def sample_tokens(logits: torch.Tensor, seed: torch.Tensor | None, temperature: float, top_k: int, top_p: float,
                  out: torch.Tensor | None = None, block_v: int | None = None) -> torch.Tensor:
    """Launch the sampler on ``logits`` (R, V): returns ``out`` (R,) int64 (see the module docstring).

    ``temperature == 0`` is greedy (``seed`` may be None); ``top_k`` of 0 or ``>= V`` and
    ``top_p >= 1`` disable those filters. ``block_v`` (a power of two) overrides the chunk width.
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
    rows, block, warps = _config(R, V, block_v)
    seed_arg = out if seed is None else seed  # greedy never reads it; any int64 pointer will do
    _sample_kernel[(triton.cdiv(R, rows),)](
        logits, out, seed_arg, R, V, logits.stride(0), 1.0 / temperature if not greedy else 1.0,
        top_k, float(top_p), GREEDY=greedy, TOP_K=use_k, TOP_P=use_p, ROWS=rows, BLOCK_V=block,
        NC=NUM_CANDIDATES, num_warps=warps)
    return out
