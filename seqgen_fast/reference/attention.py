"""Plain-PyTorch attention: the ground truth and the CPU path.

Two entry points:

* :func:`sdpa` -- ``torch.nn.functional.scaled_dot_product_attention``'s semantics exactly (the
  math backend of torch 2.13), written with explicit matmul / softmax so that it never calls
  torch's SDPA (a user may have monkey-patched that to ours). Shapes ``query (..., L, E)``,
  ``key (..., S, E)``, ``value (..., S, Ev)``, batch dims broadcast as ``torch.matmul`` does::

      A   = softmax(scale * query @ key^T + bias)        bias: additive attn_mask, or 0 / -inf from
                                                           a boolean one (True = attend), or the
                                                           causal mask ones(L, S).tril() (top-left)
      out = dropout(A) @ value

  A row whose every entry is masked gives 0 (torch's ``_safe_softmax``), not NaN. NaN / inf in
  masked positions reach the row as in torch's math path (``nan + -inf``, ``0 * nan``). With
  ``enable_gqa`` the key/value heads (dim -3) repeat-interleave up to the query heads. Math runs
  in float64 for float64 inputs and in float32 otherwise (as torch's math path upcasts half
  precision); the output is cast back to the query dtype. Autograd flows through plain ops.

* :func:`attention_fwd` / :func:`attention_bwd` -- the contract of the ``seqgen_fast::attention_fwd``
  / ``attention_bwd`` ops, which the Triton kernels also implement (see
  ``seqgen_fast.kernels.attention``): ``q (B, H, L, E)``, ``k (B, Hk, S, E)``, ``v (B, Hk, S, Ev)``
  with ``H % Hk == 0`` (query head ``h`` reads kv head ``h // (H // Hk)``); optional ``mask``
  broadcastable to ``(B, H, L, S)`` (bool: True = attend; float: added); ``causal`` 0 (none),
  1 (top-left: key ``j`` visible to query ``i`` iff ``j <= i``) or 2 (bottom-right:
  ``j <= i + S - L``); packed variable-length batches when ``cu_q``/``cu_k`` (int32 prefix sums of
  the lengths) are given, then ``B == 1`` and sequence ``b`` is rows ``cu_q[b]:cu_q[b+1]`` of q and
  ``cu_k[b]:cu_k[b+1]`` of k/v. Returns ``out (B, H, L, Ev)`` in q's dtype and ``lse (B, H, L)``
  float32, the natural-log sum of exp of the scaled scores (``-inf`` for a fully masked row, NaN
  for a row with a +inf score, as its probabilities). The band and a boolean mask are applied by
  masking (a NaN score outside them never reaches its row, as in the kernels); a float mask is added.

  The flash-attn features, per sequence of L queries and S keys (:class:`Features`)::

      s[i, j] = scale * q[i] . k[j]
      s       = softcap * tanh(s / softcap)                       if softcap > 0
      s       = s - slope[b, h] * |i + S - L - j|                   if alibi (B, H) float32 slopes
      s[i, j] = -inf unless i + shift - left <= j <= i + shift + right  (the band)
      P       = softmax(s);  lse = logsumexp(s)
      out     = (P * keep / (1 - dropout_p)) @ v                    if dropout_p > 0

  where ``shift`` is 0 for ``causal == TOP_LEFT`` and ``S - L`` otherwise (flash-attn's windows are
  bottom-right aligned), ``left``/``right`` = ``window_left``/``window_right`` with -1 meaning
  unbounded, and any causal mode sets ``right`` to ``min(right, 0)``. ``keep[b, h, i, j] =
  u >= dropout_p`` with ``u`` the uniform float of Philox-4x32-10 (Triton's ``tl.rand``) keyed by
  ``rng = (seed, offset)`` at counter ``offset + ((b H + h) R_q + q_start + i) R_k + k_start + j``,
  ``R_q``/``R_k`` the row counts of q and k (``L``/``S``, or the packed totals): :func:`dropout_keep`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._contract import BOTTOM_RIGHT, NONE, TOP_LEFT, attention_output
from .._contract import AttentionFeatures as Features

__all__ = ["sdpa", "attention_fwd", "attention_bwd", "causal_mask", "band_mask", "dropout_keep", "philox_uniform",
           "Features", "BOTTOM_RIGHT", "NONE", "TOP_LEFT"]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _bias_from_mask(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Additive bias: a bool mask becomes 0 where True and -inf where False."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, float("-inf"))
    return mask.to(dtype)


def _safe_softmax(scores: torch.Tensor) -> torch.Tensor:
    """softmax over the last dim; a row of all -inf gives zeros (torch's _safe_softmax)."""
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    probs = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1)  # no NaN, in forward or backward
    return probs.masked_fill(dead, 0.0)


def causal_mask(L: int, S: int, kind: int, device) -> torch.Tensor:
    """Boolean (L, S) mask: top-left ``j <= i`` or bottom-right ``j <= i + S - L``."""
    shift = S - L if kind == BOTTOM_RIGHT else 0
    return torch.ones(L, S, dtype=torch.bool, device=device).tril(diagonal=shift)


def sdpa(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, attn_mask: torch.Tensor | None = None,
         dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False,
         dropout_mask: torch.Tensor | None = None) -> torch.Tensor:
    """torch's scaled_dot_product_attention (math path) in plain ops; see the module docstring.

    ``dropout_mask`` (bool, broadcastable to the (..., L, S) weights; True = keep) replaces the
    random draw, as torch's ``_scaled_dot_product_attention_math`` allows, for tests.
    """
    acc = _acc_dtype(query.dtype)
    L, S = query.shape[-2], key.shape[-2]
    scale = query.shape[-1] ** -0.5 if scale is None else scale
    q, k, v = query.to(acc), key.to(acc), value.to(acc)
    if enable_gqa:
        k = _expand_heads(k, query.shape[-3])
        v = _expand_heads(v, query.shape[-3])
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        scores = scores + _bias_from_mask(causal_mask(L, S, TOP_LEFT, query.device), acc)
    elif attn_mask is not None:
        scores = scores + _bias_from_mask(attn_mask, acc)
    probs = _safe_softmax(scores)
    if dropout_p > 0.0:
        if dropout_mask is not None:
            probs = probs.masked_fill(~dropout_mask, 0.0) / (1.0 - dropout_p)
        else:
            probs = F.dropout(probs, dropout_p, training=True)
    return torch.matmul(probs, v).to(query.dtype)


_M32 = 0xFFFFFFFF


def _mul32(a: torch.Tensor, b: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) 32-bit words of the 64-bit product of uint32 values ``a`` (int64 tensor) and ``b``,
    in int64 arithmetic without overflow (``b`` split in 16-bit halves)."""
    b_hi, b_lo = b >> 16, b & 0xFFFF
    x, y = a * b_hi, a * b_lo                   # < 2^48 each
    return (x + (y >> 16)) >> 16, ((x & 0xFFFF) << 16) + y & _M32


def philox_uniform(seed: int, counters: torch.Tensor) -> torch.Tensor:
    """Triton's ``tl.rand(seed, counters)`` for int64 ``counters``, bit for bit: Philox-4x32-10 with
    key (seed low, seed high word), counter (counter low, counter high, 0, 0), the first output word
    mapped to [0, 1) as ``uint_to_uniform_float`` does. float32."""
    c0, c1 = counters & _M32, (counters >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    k0, k1 = seed & _M32, (seed >> 32) & _M32
    for _ in range(10):
        hi_b, lo_b = _mul32(c2, 0xCD9E8D57)
        hi_a, lo_a = _mul32(c0, 0xD2511F53)
        c0, c2, c1, c3 = hi_b ^ c1 ^ k0, hi_a ^ c3 ^ k1, lo_b, lo_a
        k0, k1 = (k0 + 0x9E3779B9) & _M32, (k1 + 0xBB67AE85) & _M32
    x = torch.where(c0 >= 2**31, c0 - 2**32, c0)   # the word as int32
    x = torch.where(x < 0, -x - 1, x)
    return x.to(torch.float32) * torch.tensor(4.6566127342e-10, dtype=torch.float32)


def dropout_keep(rng: torch.Tensor, p: float, b: int, heads: int, rows_q: int, rows_k: int, q_rows: range,
                 k_rows: range, device) -> torch.Tensor:
    """Boolean keep mask (H, len(q_rows), len(k_rows)) of batch entry ``b`` (module docstring)."""
    seed, offset = (int(x) for x in rng.tolist())
    h = torch.arange(heads, dtype=torch.int64)[:, None, None]
    i = torch.arange(q_rows.start, q_rows.stop, dtype=torch.int64)[None, :, None]
    j = torch.arange(k_rows.start, k_rows.stop, dtype=torch.int64)[None, None, :]
    counters = offset + ((b * heads + h) * rows_q + i) * rows_k + j
    return (philox_uniform(seed, counters) >= p).to(device)


def band_mask(L: int, S: int, causal: int, left: int, right: int, device) -> torch.Tensor | None:
    """Boolean (L, S) mask of the visible band (module docstring), or None when nothing is masked."""
    if causal == NONE and left < 0 and right < 0:
        return None
    shift = 0 if causal == TOP_LEFT else S - L
    if causal != NONE:
        right = 0 if right < 0 else min(right, 0)
    i = torch.arange(L, device=device)[:, None] + shift
    j = torch.arange(S, device=device)[None, :]
    keep = torch.ones(L, S, dtype=torch.bool, device=device)
    if left >= 0:
        keep &= j >= i - left
    if right >= 0:
        keep &= j <= i + right
    return keep


def _scores(q, k, seq, mask, scale, causal, feat: Features):
    """Scores of one sequence (softcap, ALiBi, band and user mask applied): q (H, L, E), k (H, S, E)
    already head-expanded, acc dtype."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    L, S = q.shape[-2], k.shape[-2]
    if feat.softcap > 0:
        scores = torch.tanh(scores / feat.softcap) * feat.softcap
    if feat.alibi is not None:
        dist = (torch.arange(L, device=q.device)[:, None] + S - L - torch.arange(S, device=q.device)[None, :]).abs()
        scores = scores - feat.alibi[seq].to(scores.dtype)[:, None, None] * dist.to(scores.dtype)
    band = band_mask(L, S, causal, feat.window_left, feat.window_right, q.device)
    if band is not None:  # masked, not added: a NaN score outside the band stays out (as in the kernels)
        scores = scores.masked_fill(~band, float("-inf"))
    if mask is not None:
        bool_mask = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, float("-inf")) if bool_mask else scores + mask.to(scores.dtype)
    return scores


def _segment_probs(q, k, b, seq, rq: range, rk: range, rows: tuple[int, int], mask, scale, causal,
                   feat: Features):
    """(probs, lse, dropout factor ``keep / (1 - p)`` or None) of one sequence (see :func:`_scores`):
    ``b`` the batch index of the tensors, ``seq`` the sequence's (ALiBi's row), ``rq``/``rk`` its
    rows, ``rows`` the row counts of q and k."""
    scores = _scores(q, k, seq, mask, scale, causal, feat)
    drop = None
    if feat.dropout_p > 0:
        keep = dropout_keep(feat.rng, feat.dropout_p, b, q.shape[0], *rows, rq, rk, q.device)
        drop = keep.to(q.dtype) * (1.0 / (1.0 - feat.dropout_p) if feat.dropout_p < 1 else 0.0)
    lse = torch.logsumexp(scores, dim=-1).masked_fill(torch.isposinf(scores).any(-1), float("nan"))  # as its probs
    return _safe_softmax(scores), lse, drop


def _segments(q, k, cu_q, cu_k):
    """(b, sequence index, q rows, k rows) per sequence: the batch entries, or the packed varlen
    segments (then b = 0, the one batch entry of the packed tensors)."""
    if cu_q is None:
        return [(b, b, range(q.shape[2]), range(k.shape[2])) for b in range(q.shape[0])]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(0, i, range(cq[i], cq[i + 1]), range(ck[i], ck[i + 1])) for i in range(len(cq) - 1)]


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[-3], dim=-3)


def attention_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat: Features = Features()):
    """The op contract's forward (module docstring): returns (out, lse)."""
    acc = _acc_dtype(q.dtype)
    B, H, L, _ = q.shape
    out = attention_output(q, v.shape[-1]).zero_()
    lse = torch.full((B, H, L), float("-inf"), dtype=torch.float32, device=q.device)
    for b, seq, rq, rk in _segments(q, k, cu_q, cu_k):
        sq, sk = slice(rq.start, rq.stop), slice(rk.start, rk.stop)
        qs, ks, vs = q[b, :, sq].to(acc), _expand_heads(k[b, :, sk].to(acc), H), _expand_heads(v[b, :, sk].to(acc), H)
        m = None if mask is None else mask.expand(B, H, L, k.shape[-2])[b, :, sq, sk]
        probs, lse_b, drop = _segment_probs(qs, ks, b, seq, rq, rk, (L, k.shape[2]), m, scale, causal, feat)
        out[b, :, sq] = torch.matmul(probs if drop is None else probs * drop, vs).to(q.dtype)
        lse[b, :, sq] = lse_b.float()
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, causal,
                  feat: Features = Features()):
    """The op contract's backward: (dq, dk, dv) from recomputed probabilities P (and the same dropout
    keep mask, ``Pd = P keep / (1 - p)``)::

        dV = Pd^T dO,  dP = (dO V^T) keep / (1 - p),  dS = P (dP - rowsum(P dP)),
        dZ = dS (1 - tanh^2(Z / softcap)) (softcap) or dS,  dQ = scale dZ K,  dK = scale dZ^T Q

    (Z the scaled scores before the softcap), with dK, dV summed over the query heads that share a
    kv head. Written out rather than by autograd: an op's body runs below the autograd key.
    """
    acc = _acc_dtype(q.dtype)
    B, H, L, _ = q.shape
    Hk = k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    for b, seq, rq, rk in _segments(q, k, cu_q, cu_k):
        sq, sk = slice(rq.start, rq.stop), slice(rk.start, rk.stop)
        qs, ks, vs = q[b, :, sq].to(acc), _expand_heads(k[b, :, sk].to(acc), H), _expand_heads(v[b, :, sk].to(acc), H)
        m = None if mask is None else mask.expand(B, H, L, k.shape[-2])[b, :, sq, sk]
        do = dout[b, :, sq].to(acc)
        probs, _, drop = _segment_probs(qs, ks, b, seq, rq, rk, (L, k.shape[2]), m, scale, causal, feat)
        dvs = torch.matmul((probs if drop is None else probs * drop).transpose(-2, -1), do)
        dp = torch.matmul(do, vs.transpose(-2, -1))
        if drop is not None:
            dp = dp * drop
        ds = probs * (dp - (probs * dp).sum(-1, keepdim=True))
        if feat.softcap > 0:
            t = torch.tanh(torch.matmul(qs, ks.transpose(-2, -1)) * scale / feat.softcap)
            ds = ds * (1 - t * t)
        dq[b, :, sq] = (scale * torch.matmul(ds, ks)).to(q.dtype)
        dks = scale * torch.matmul(ds.transpose(-2, -1), qs)
        dk[b, :, sk] = dks.unflatten(0, (Hk, H // Hk)).sum(1).to(k.dtype)
        dv[b, :, sk] = dvs.unflatten(0, (Hk, H // Hk)).sum(1).to(v.dtype)
    return dq, dk, dv
