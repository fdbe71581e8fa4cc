"""``seqgen-fast check`` case of the sampling family: greedy and top-1 against argmax, and the
frequencies of many draws against the reference's filtered distribution."""
from __future__ import annotations

import torch

from ..ops.sampling import sample_tokens
from ..reference import sampling as reference
from . import register_check


def _peaked_logits(device, dtype, rows: int, vocab: int) -> torch.Tensor:
    """Distinct, well-separated logits (exact in bfloat16): a random permutation of 0, 1/4, 2/4, ..."""
    return torch.stack([torch.randperm(vocab, device=device) for _ in range(rows)]).to(dtype) / 4


@register_check("sample_tokens", tol={torch.float32: 0.1, torch.float16: 0.1, torch.bfloat16: 0.1})
def _check_sample(device, dtype):
    """Greedy and top-k = 1 must equal argmax exactly; draws must follow the reference distribution.

    ``frequencies`` compares the empirical frequencies of N draws per row with the reference
    probabilities (top-k 8, top-p 0.9, T 0.7 over 24 tokens): the expected relative error is about
    ``sqrt((1 - sum p^2) / (N sum p^2))`` ~ 0.02 at the CPU's N = 4096 (0.005 at 65536 on a GPU), so
    the 0.1 tolerance sits more than 4x above the statistical noise.
    """
    base = _peaked_logits(device, dtype, 2, 24)
    greedy_ref = reference.greedy(base).to(torch.float64)
    greedy = sample_tokens(base, temperature=0).to(torch.float64)
    top1 = sample_tokens(base, top_k=1).to(torch.float64)
    draws = 4096 if device.type == "cpu" else 65536
    tokens = sample_tokens(base.repeat(draws, 1), temperature=0.7, top_k=8, top_p=0.9).view(draws, 2)
    freq = torch.stack([torch.bincount(tokens[:, r], minlength=base.shape[1]) for r in range(2)]) / draws
    probs = reference.filtered_probs(base, temperature=0.7, top_k=8, top_p=0.9)
    return {"greedy": (greedy, greedy_ref), "top_k=1": (top1, greedy_ref),
            "frequencies": (freq.to(torch.float64), probs.to(torch.float64))}
