"""Token sampling in plain PyTorch: the ground truth of ``seqgen_fast.functional.sample_tokens``.

For a row of logits ``x`` (V,) the distribution sampled from is built in float32, as transformers'
``TemperatureLogitsWarper -> TopKLogitsWarper -> TopPLogitsWarper`` do:

1. temperature: ``s = x * (1 / T)`` (``1 / T`` rounded to float32 first, the same product the kernel
   forms); ``T = 0`` means greedy: the first index of the largest logit, no randomness.
2. top-k: keep ``s_i >= s_(k)``, the k-th largest value (transformers' convention: every token tied
   with the k-th largest is kept, so more than k may survive on ties).
3. top-p (nucleus), on ``p = softmax(s)`` over the survivors: keep the smallest set of the largest
   tokens whose total probability is ``>= top_p``: token ``i`` is kept iff the probability of the
   tokens strictly larger than it is ``< top_p``. This is transformers' rule (``cumsum`` over the
   ascending sort, drop where ``<= 1 - top_p``) with ties resolved as a group: tokens with equal
   logits are kept or dropped together. The largest token is always kept.
4. draw one index from ``softmax`` over the kept tokens (``torch.multinomial`` with ``generator``).

A row with no valid distribution -- a NaN or ``+inf`` logit, or every logit ``-inf`` -- gives ``-1``
(a greedy row: ``-1`` only for NaN). The kernel returns the same without a host sync; an index of
``-1`` fails loudly at the next embedding lookup instead of sampling garbage.
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import Tensor

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_args(logits: Tensor, temperature: float, top_k: int | None, top_p: float | None) -> None:
    """Raise ``TypeError``/``ValueError`` naming the argument that ``sample_tokens`` cannot take."""
    if not isinstance(logits, Tensor):
        raise TypeError(f"sample_tokens: logits must be a tensor, got {type(logits).__name__}")
    if logits.dtype not in FLOAT_DTYPES:
        raise TypeError(f"sample_tokens: logits dtype {logits.dtype} is not a floating type (float16, bfloat16, "
                        "float32, float64)")
    if logits.dim() == 0 or logits.shape[-1] == 0:
        raise ValueError(f"sample_tokens: logits must be (..., V) with V >= 1, got shape {tuple(logits.shape)}")
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real) or not math.isfinite(temperature) \
            or temperature < 0:
        raise ValueError(f"sample_tokens: temperature must be a finite number >= 0 (0 = greedy), got {temperature!r}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 1):
        raise ValueError(f"sample_tokens: top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1):
        raise ValueError(f"sample_tokens: top_p must be None or a number in (0, 1], got {top_p!r}")


def scaled_logits(logits: Tensor, temperature: float) -> Tensor:
    """(R, V) float32 ``logits * float32(1 / temperature)`` (step 1; ``temperature > 0``)."""
    inv = torch.tensor(1.0 / temperature, dtype=torch.float32, device=logits.device)
    return logits.reshape(-1, logits.shape[-1]).to(torch.float32) * inv


def invalid_rows(s: Tensor) -> Tensor:
    """(R,) bool: rows of ``s`` with a NaN or ``+inf``, or with every entry ``-inf``."""
    return torch.isnan(s).any(-1) | (s == math.inf).any(-1) | (s == -math.inf).all(-1)


def filtered_probs(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> Tensor:
    """(R, V) float32 probabilities sampled from (steps 1-3), ``R = logits[..., 0].numel()``.

    Rows without a valid distribution (see the module docstring) hold NaN.
    """
    check_args(logits, temperature, top_k, top_p)
    if temperature == 0:
        raise ValueError("sample_tokens: temperature 0 is greedy decoding; it has no distribution")
    s = scaled_logits(logits, temperature)
    bad = invalid_rows(s)
    s = torch.where(bad[:, None], torch.zeros_like(s), s)
    vocab = s.shape[-1]
    if top_k is not None and top_k < vocab:
        kth = torch.topk(s, top_k, dim=-1).values[:, -1:]
        s = s.masked_fill(s < kth, -math.inf)
    if top_p is not None and top_p < 1:
        sorted_s, _ = torch.sort(s, dim=-1, descending=True)
        sorted_p = torch.softmax(sorted_s, dim=-1)
        cum = torch.cumsum(sorted_p, dim=-1)
        before = torch.cat([torch.zeros_like(cum[:, :1]), cum[:, :-1]], dim=-1)  # mass of the larger tokens
        n_keep = (before < top_p).sum(-1, keepdim=True)  # a prefix; >= 1 since before[:, 0] = 0
        threshold = sorted_s.gather(-1, n_keep - 1)
        s = s.masked_fill(s < threshold, -math.inf)
    probs = torch.softmax(s, dim=-1)
    return probs.masked_fill(bad[:, None], math.nan)


def greedy(logits: Tensor) -> Tensor:
    """(R,) int64 first index of each row's maximum; ``-1`` for a row holding a NaN."""
    x = logits.reshape(-1, logits.shape[-1])
    idx = x.argmax(-1)
    return idx.masked_fill(torch.isnan(x).any(-1), -1)


def sample_tokens(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None) -> Tensor:
    """Draw one token per row of ``logits`` (..., V); returns int64 of shape ``logits.shape[:-1]``.

    Steps 1-4 of the module docstring; ``generator`` must live on ``logits``' device.
    """
    check_args(logits, temperature, top_k, top_p)
    if temperature == 0:
        return greedy(logits).reshape(logits.shape[:-1])
    probs = filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    bad = torch.isnan(probs[:, 0])
    probs = torch.where(bad[:, None], torch.ones_like(probs), probs)
    idx = torch.multinomial(probs, 1, generator=generator).squeeze(-1)
    return idx.masked_fill(bad, -1).reshape(logits.shape[:-1])
