"""Plain-PyTorch rotary position embedding (RoPE): the ground truth of the rotary family and of the
rotary step fused into ``flash_attn_with_kvcache``.

A rotation acts on the first ``R`` (the rotary dim) of a head's ``D`` dims and passes the rest
through. With per-position tables ``cos``, ``sin`` expanded to ``R`` columns::

    out[:R] = x[:R] * cos + partner(x)[:R] * sin        out[R:] = x[R:]

* non-interleaved (GPT-NeoX, transformers' ``rotate_half``): ``partner(x) = cat(-x[R/2:R], x[:R/2])``,
  pairing dim ``i`` with ``i + R/2``;
* interleaved (GPT-J, flash-attn's ``interleaved=True``): ``partner(x)[2i] = -x[2i+1]``,
  ``partner(x)[2i+1] = x[2i]``, pairing dims ``2i`` and ``2i+1``.

Two table layouts, ``W`` columns each:

* a *full* table (transformers' convention: ``cos = cat(freqs, freqs).cos()``): ``R = W`` and
  column ``d`` multiplies dim ``d`` (the two halves may even differ);
* a *half* table (flash-attn's convention, ``(seqlen, rotary_dim / 2)``): ``R = 2 W``; column ``i``
  serves both dims of pair ``i`` (``2i, 2i+1`` interleaved; ``i, i + R/2`` otherwise).

Math runs in float32 (float64 for float64 inputs); results are cast back to the input's dtype.
"""
from __future__ import annotations

import torch


def expand_table(t: torch.Tensor, *, interleaved: bool, half_table: bool) -> torch.Tensor:
    """A table's ``W`` columns as the ``R`` per-dim factors of the rotation."""
    if not half_table:
        return t
    return t.repeat_interleave(2, dim=-1) if interleaved else torch.cat([t, t], dim=-1)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, *, interleaved: bool,
           half_table: bool) -> torch.Tensor:
    """Rotate the first R dims of ``x`` (..., D) by ``cos``/``sin`` (broadcastable to (..., W)).

    Returns ``x``'s dtype; computes in float32 (float64 for float64 ``x``).
    """
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    cos = expand_table(cos.to(acc), interleaved=interleaved, half_table=half_table)
    sin = expand_table(sin.to(acc), interleaved=interleaved, half_table=half_table)
    r = cos.shape[-1]
    xf = x.to(acc)
    head, tail = xf[..., :r], xf[..., r:]
    if interleaved:
        even, odd = head[..., 0::2], head[..., 1::2]
        partner = torch.stack([-odd, even], dim=-1).flatten(-2)
    else:
        lo, hi = head[..., : r // 2], head[..., r // 2:]
        partner = torch.cat([-hi, lo], dim=-1)
    return torch.cat([head * cos + partner * sin, tail], dim=-1).to(x.dtype)


def positions(tokens: int, *, batch: int | None, position_ids: torch.Tensor | None, cu_seqlens: torch.Tensor | None,
              device: torch.device) -> torch.Tensor:
    """Position of every token: (batch, tokens) for the padded layout, (tokens,) for the packed one.

    Default: ``0 .. S-1`` per sequence (padded), or the offset within each ``cu_seqlens`` segment.
    ``position_ids`` (B or 1, S) / (S,) (padded) or (T,) (packed) replaces it.
    """
    if position_ids is not None:
        pos = position_ids.to(torch.int64)
        return pos if batch is None else pos.reshape(-1, tokens).expand(batch, tokens)
    t = torch.arange(tokens, device=device)
    if batch is not None:
        return t.expand(batch, tokens)
    if cu_seqlens is None:
        return t
    starts = cu_seqlens.to(torch.int64)
    seq = torch.searchsorted(starts[1:], t, right=True).clamp(max=starts.numel() - 2)
    return t - starts[seq]


def rotary_embedding(q: torch.Tensor, k: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, *,
                     position_ids: torch.Tensor | None = None, cu_seqlens: torch.Tensor | None = None,
                     interleaved: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The reference of ``seqgen_fast.functional.rotary_embedding`` (layouts documented there).

    ``q``/``k``: (B, S, H, D) or packed (T, H, D). ``cos``/``sin``: a (S_ro, W) table looked up at
    the token positions (clamped into ``[0, S_ro - 1]``, as the kernel does), or (B or 1, S, W)
    per-token values. Non-interleaved uses full tables, interleaved half tables.
    """
    packed = q.dim() == 3
    tokens = q.shape[0] if packed else q.shape[1]
    batch = None if packed else q.shape[0]
    if cos.dim() == 3:
        c, s = cos[:, :, None], sin[:, :, None]  # (B|1, S, 1, W): broadcast over heads
    else:
        pos = positions(tokens, batch=batch, position_ids=position_ids, cu_seqlens=cu_seqlens, device=q.device)
        pos = pos.clamp(0, cos.shape[0] - 1)
        c, s = cos[pos][..., None, :], sin[pos][..., None, :]
    out = tuple(None if x is None else rotate(x, c, s, interleaved=interleaved, half_table=interleaved)
                for x in (q, k))
    return out[0], out[1]
