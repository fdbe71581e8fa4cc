"""Plain-PyTorch KV-cache decode attention: the ground truth and the CPU path.

Layout (the same as the kernel's, see ``seqgen_fast.ops.decode.decode_attention``):

* ``q``             (B, Hq, D)        one query token per sequence;
* ``k_cache``       (B, S_max, Hkv, D) and ``v_cache`` the same shape; any strides;
* ``cache_seqlens`` (B,) integer      valid cached tokens per sequence, before appending;
* ``k_new``/``v_new`` (B, Hkv, D) or None: written at row ``cache_seqlens[b]``, which is then
  attended to as well.

With ``L_b`` the attended length and ``g = Hq // Hkv`` (query head ``i`` reads kv head
``i // g``)::

    out[b, i] = sum_{n < L_b} softmax_n(scale * q[b, i] . k[b, n, i // g]) v[b, n, i // g]

and ``out[b, i] = 0`` when ``L_b = 0`` (an empty key set; torch's SDPA would give NaN).
Lengths are clamped into ``[0, S_max]`` (``[0, S_max - 1]`` before an append), as the kernel
does, so this path is safe inside a CUDA graph too. Math runs in float32, or float64 for
float64 inputs.
"""
from __future__ import annotations

import torch


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, cache_seqlens: torch.Tensor,
                     k_new: torch.Tensor | None, v_new: torch.Tensor | None, scale: float) -> torch.Tensor:
    batch, s_max, hkv, _ = k_cache.shape
    group = q.shape[1] // hkv
    appending = k_new is not None
    lens = cache_seqlens.to(torch.int64).clamp(0, s_max - 1 if appending else s_max)
    if appending:
        rows = torch.arange(batch, device=k_cache.device)
        k_cache[rows, lens] = k_new.to(k_cache.dtype)
        v_cache[rows, lens] = v_new.to(v_cache.dtype)
        lens = lens + 1
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    qf = q.to(acc).unflatten(1, (hkv, group))                       # (B, Hkv, g, D)
    k = k_cache.to(acc)
    v = v_cache.to(acc)
    scores = torch.einsum("bhgd,bnhd->bhgn", qf, k) * scale           # (B, Hkv, g, S_max)
    valid = torch.arange(s_max, device=q.device)[None, :] < lens[:, None]  # (B, S_max)
    scores = scores.masked_fill(~valid[:, None, None, :], float("-inf"))
    probs = torch.where((lens > 0)[:, None, None, None], torch.softmax(scores, dim=-1), 0.0)  # empty: 0, not NaN
    out = torch.einsum("bhgn,bnhd->bhgd", probs, v)
    return out.flatten(1, 2).to(q.dtype)
