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

  A row whose every entry is masked gives 0 (torch's ``_safe_softmax``), not NaN. With
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
  float32, the natural-log sum of exp of the scaled scores (``-inf`` for a fully masked row).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .._contract import BOTTOM_RIGHT, NONE, TOP_LEFT, attention_output

__all__ = ["sdpa", "attention_fwd", "attention_bwd", "causal_mask", "BOTTOM_RIGHT", "NONE", "TOP_LEFT"]


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


def _segments(q, cu_q, cu_k):
    """(b, q rows, k rows) per sequence: the batch entries, or the packed varlen segments."""
    if cu_q is None:
        return [(b, slice(None), slice(None)) for b in range(q.shape[0])]
    cq, ck = cu_q.tolist(), cu_k.tolist()
    return [(0, slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])) for i in range(len(cq) - 1)]


def _probs(q, k, mask, scale, causal):
    """(probs, lse) of one sequence: q (H, L, E), k (H, S, E) already head-expanded, acc dtype."""
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if causal != NONE:
        scores = scores + _bias_from_mask(causal_mask(q.shape[-2], k.shape[-2], causal, q.device), scores.dtype)
    if mask is not None:
        scores = scores + _bias_from_mask(mask, scores.dtype)
    return _safe_softmax(scores), torch.logsumexp(scores, dim=-1)


def _expand_heads(t: torch.Tensor, heads: int) -> torch.Tensor:
    return t.repeat_interleave(heads // t.shape[-3], dim=-3)


def attention_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal):
    """The op contract's forward (module docstring): returns (out, lse)."""
    acc = _acc_dtype(q.dtype)
    B, H, L, _ = q.shape
    out = attention_output(q, v.shape[-1]).zero_()
    lse = torch.full((B, H, L), float("-inf"), dtype=torch.float32, device=q.device)
    full_mask = None if mask is None else mask.expand(B, H, L, k.shape[-2])
    for b, rq, rk in _segments(q, cu_q, cu_k):
        qs = q[b, :, rq].to(acc)
        ks = _expand_heads(k[b, :, rk].to(acc), H)
        vs = _expand_heads(v[b, :, rk].to(acc), H)
        probs, lse_b = _probs(qs, ks, None if full_mask is None else full_mask[b, :, rq, rk], scale, causal)
        out[b, :, rq] = torch.matmul(probs, vs).to(q.dtype)
        lse[b, :, rq] = lse_b.float()
    return out, lse


def attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, causal):
    """The op contract's backward: (dq, dk, dv) from recomputed probabilities P::

        dV = P^T dO,  dP = dO V^T,  dS = P * (dP - rowsum(dO * O)),  dQ = scale dS K,  dK = scale dS^T Q

    with dK, dV summed over the query heads that share a kv head.
    """
    acc = _acc_dtype(q.dtype)
    B, H, L, _ = q.shape
    Hk = k.shape[1]
    dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    full_mask = None if mask is None else mask.expand(B, H, L, k.shape[-2])
    for b, rq, rk in _segments(q, cu_q, cu_k):
        qs = q[b, :, rq].to(acc)
        ks = _expand_heads(k[b, :, rk].to(acc), H)
        vs = _expand_heads(v[b, :, rk].to(acc), H)
        do = dout[b, :, rq].to(acc)
        probs, _ = _probs(qs, ks, None if full_mask is None else full_mask[b, :, rq, rk], scale, causal)
        delta = (do * out[b, :, rq].to(acc)).sum(-1, keepdim=True)
        dvs = torch.matmul(probs.transpose(-2, -1), do)
        ds = probs * (torch.matmul(do, vs.transpose(-2, -1)) - delta)
        dq[b, :, rq] = (scale * torch.matmul(ds, ks)).to(q.dtype)
        dks = scale * torch.matmul(ds.transpose(-2, -1), qs)
        dk[b, :, rk] = dks.unflatten(0, (Hk, H // Hk)).sum(1).to(k.dtype)
        dv[b, :, rk] = dvs.unflatten(0, (Hk, H // Hk)).sum(1).to(v.dtype)
    return dq, dk, dv
