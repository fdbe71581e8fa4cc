"""Plain-PyTorch KV-cache attention (flash-attn's ``flash_attn_with_kvcache``): the ground truth and the CPU path.

Layouts (the public contract is ``seqgen_fast.ops.decode.flash_attn_with_kvcache``):

* ``q``             (B, Lq, Hq, D)       the new query tokens of each sequence;
* ``k_cache``       (B_cache, S, Hkv, D) contiguous per sequence, or (num_pages, P, Hkv, D) with a
  ``block_table`` (B, max_pages) int: logical row ``p`` of sequence ``b`` lives at
  ``k_cache[block_table[b, p // P], p % P]``; ``v_cache`` the same;
* ``k``/``v``       (B, Lk, Hkv, D) or None: new keys/values, written in place at logical rows
  ``cache_seqlens[b] + j`` (after the rotary embedding, for ``k``) and attended to;
* ``cache_seqlens`` (B,) or None (every sequence is the whole cache); ``cache_batch_idx`` (B,): the cache
  row of sequence ``b`` (contiguous layout only); ``cache_leftpad`` (B,): keys below it are not attended;
* ``rotary_cos``/``rotary_sin`` (S_ro, R/2): half tables (``seqgen_fast.reference.rotary``); k is rotated
  at positions ``cache_seqlens + j``, q at ``cache_seqlens + i`` when causal or local, else at
  ``cache_seqlens``;
* ``alibi_slopes`` (Hq,) or (B, Hq) float32; ``key_mask`` (B, Lq or 1, C) bool or None (an extra mask,
  not part of flash-attn's API: transformers' attention masks).

With capacity ``C`` (S, or max_pages * P), ``L0 = clamp(cache_seqlens, 0, C - Lk)``, ``L = L0 + Lk``,
``lp = clamp(cache_leftpad, 0, L0)`` and the query row ``i`` at position ``q_i = L - Lq + i``,
key ``p`` is visible to row ``i`` when ``lp <= p < L``, ``p <= q_i + right`` (``right = 0`` when causal),
``p >= q_i - left`` (for a window side that is not -1), and ``key_mask`` allows it. Scores::

    s = scale * q_i . k_p;   s = softcap * tanh(s / softcap) if softcap > 0;   s -= slope * |q_i - p|
    out_i = sum_p softmax_p(s) v_p;  lse_i = logsumexp_p(s)

A row that sees no key (or only -inf scores) gets ``out = 0`` and ``lse = +inf`` (flash-attn's
convention). Non-finite
values follow ``seqgen_fast.ops.decode``'s policy: a NaN/inf in q or in a visible key/value reaches
its row as in torch's math attention over the visible keys; cache rows outside ``[lp, L)`` are never
read (their contents, NaN included, cannot reach any output). Every index
is clamped into range (lengths as above, batch indices into ``[0, B_cache)``, pages into
``[0, num_pages)``, rotary positions into ``[0, S_ro)``), exactly as the kernel clamps them. Math
runs in float32 (float64 for float64 inputs).
"""
from __future__ import annotations

import torch

from . import rotary


def _accumulate_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _physical_rows(b_rows: torch.Tensor, p: torch.Tensor, k_cache: torch.Tensor, cache_batch_idx, block_table):
    """(first index, second index) into the cache for logical rows ``p`` of sequences ``b_rows``."""
    if block_table is not None:
        page_size = k_cache.shape[1]
        col = (p // page_size).clamp(0, block_table.shape[1] - 1)
        page = block_table.to(torch.int64)[b_rows, col].clamp(0, k_cache.shape[0] - 1)
        return page, p % page_size
    if cache_batch_idx is not None:
        b_rows = cache_batch_idx.to(torch.int64)[b_rows].clamp(0, k_cache.shape[0] - 1)
    return b_rows, p


def logical_cache(cache: torch.Tensor, cache_batch_idx, block_table) -> torch.Tensor:
    """Every sequence's cache as (B, C, Hkv, D) (a gather: pages or batch rows)."""
    if block_table is not None:
        pages = block_table.to(torch.int64).clamp(0, cache.shape[0] - 1)
        return cache[pages].flatten(1, 2)
    if cache_batch_idx is not None:
        return cache[cache_batch_idx.to(torch.int64).clamp(0, cache.shape[0] - 1)]
    return cache


def kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
                      cache_leftpad, block_table, scale, causal, window_left, window_right, softcap,
                      rotary_interleaved, alibi_slopes, key_mask=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns ``(out (B, Lq, Hq, D) in q's dtype, lse (B, Hq, Lq))``; appends ``k``/``v`` in place."""
    batch, lq, hq, head_dim = q.shape
    hkv = k_cache.shape[2]
    group = hq // hkv
    lk = 0 if k is None else k.shape[1]
    cap = block_table.shape[1] * k_cache.shape[1] if block_table is not None else k_cache.shape[1]
    dev = q.device
    acc = _accumulate_dtype(q)
    if cache_seqlens is None:
        lens = torch.full((batch,), cap, dtype=torch.int64, device=dev)
    else:
        lens = cache_seqlens.to(torch.int64).clamp(0, cap - lk)
    if cache_leftpad is None:
        left = torch.zeros_like(lens)
    else:
        left = torch.minimum(cache_leftpad.to(torch.int64).clamp(min=0), lens)
    if causal:
        window_right = 0
    rotate = rotary_cos is not None

    def rotated(x, pos):  # x (B, n, H, D) at positions pos (B, n)
        pos = pos.clamp(0, rotary_cos.shape[0] - 1)
        c, s = rotary_cos[pos][:, :, None], rotary_sin[pos][:, :, None]
        return rotary.rotate(x, c, s, interleaved=rotary_interleaved, half_table=True)

    if lk:
        new_pos = lens[:, None] + torch.arange(lk, device=dev)  # (B, Lk)
        k_new = rotated(k, new_pos) if rotate else k
        rows = torch.arange(batch, device=dev)[:, None].expand(batch, lk)
        first, second = _physical_rows(rows, new_pos, k_cache, cache_batch_idx, block_table)
        k_cache[first, second] = k_new.to(k_cache.dtype)
        v_cache[first, second] = v.to(v_cache.dtype)
    if rotate:
        q_pos = lens[:, None] + (torch.arange(lq, device=dev) if causal or window_left >= 0 or window_right >= 0
                                 else torch.zeros(lq, dtype=torch.int64, device=dev))
        q = rotated(q, q_pos)

    keys = logical_cache(k_cache, cache_batch_idx, block_table).to(acc)   # (B, C, Hkv, D)
    values = logical_cache(v_cache, cache_batch_idx, block_table).to(acc)
    qf = q.to(acc).unflatten(2, (hkv, group))                                   # (B, Lq, Hkv, g, D)
    scores = torch.einsum("bihgd,bphd->bhgip", qf, keys) * scale               # (B, Hkv, g, Lq, C)
    if softcap > 0:
        scores = torch.tanh(scores / softcap) * softcap
    total = lens + lk
    q_at = (total[:, None] - lq + torch.arange(lq, device=dev))[:, None, None, :, None]  # (B, 1, 1, Lq, 1)
    p = torch.arange(cap, device=dev)
    if alibi_slopes is not None:
        slopes = alibi_slopes.to(acc).reshape(-1, hkv, group)[:, :, :, None, None]   # (B or 1, Hkv, g, 1, 1)
        scores = scores - slopes * (q_at - p).abs().to(acc)
    visible = (p >= left[:, None, None, None, None]) & (p < total[:, None, None, None, None])
    if window_right >= 0:
        visible = visible & (p <= q_at + window_right)
    if window_left >= 0:
        visible = visible & (p >= q_at - window_left)
    if key_mask is not None:
        visible = visible & key_mask.to(torch.bool)[:, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)                                        # (B, Hkv, g, Lq)
    lse = lse.masked_fill(torch.isposinf(scores).any(-1), float("nan"))  # inf - inf, as the probs (and kernel)
    empty = torch.isneginf(scores).all(dim=-1)  # no visible key, or only -inf scores: 0 (as the kernel)
    probs = torch.where(empty[..., None], 0.0, torch.softmax(scores, dim=-1))
    # rows outside [lp, L) are unused storage (often torch.empty garbage): never read, as by the kernel
    values = values.masked_fill(~((p >= left[:, None]) & (p < total[:, None]))[:, :, None, None], 0.0)
    out = torch.einsum("bhgip,bphd->bihgd", probs, values).flatten(2, 3)
    lse = torch.where(empty, float("inf"), lse).flatten(1, 2)                    # (B, Hq, Lq)
    return out.to(q.dtype), lse.to(acc)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     k_new: torch.Tensor | None, v_new: torch.Tensor | None, scale: float) -> torch.Tensor:
    """One query token per sequence: ``q`` (B, Hq, D), ``k_new``/``v_new`` (B, Hkv, D) or None, over a
    contiguous (B, S, Hkv, D) cache; ``out`` (B, Hq, D). :func:`kvcache_attention` with ``Lq = Lk = 1``."""
    k = None if k_new is None else k_new[:, None]
    v = None if v_new is None else v_new[:, None]
    out, _ = kvcache_attention(q[:, None], k_cache, v_cache, k, v, cache_seqlens, None, None, None, None, None,
                               scale, False, -1, -1, 0.0, True, None)
    return out[:, 0]
