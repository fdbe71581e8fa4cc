"""Token sampling: seqgen_fast.functional.sample_tokens vs the plain-torch sampler.

Provider "torch" is ``seqgen_fast.reference.sampling.sample_tokens`` on the GPU -- what
transformers' generate does per step: scale, ``torch.topk`` for top-k, a full ``torch.sort`` +
``cumsum`` for top-p, ``softmax`` and ``torch.multinomial`` (about ten eager kernels). "ours" is
one ``torch.randint`` for the seed plus the fused kernel (two kernels with the two-stage top-k,
which it picks for these vocabularies); "ours-1stage" forces the single-stage kernel, to tune that
choice. Bytes = the logits read once (the floor is bytes / 3.0 TB/s; ours reads the row several
times, from L2 after the first pass). Eager timing (no CUDA graph): each call draws from the
default CUDA generator. Inputs are not rotated: the largest case (B64 x 128256 fp32, 33 MB) fits
in the H100's 50 MB L2, as a fresh LM-head output does.
"""
from __future__ import annotations

import torch

from . import Case

# (label, keyword arguments): the usual chat setting, and nucleus alone (the sort-bound case in torch)
SETTINGS = [("top_k=50 top_p=0.9 T=0.8", dict(temperature=0.8, top_k=50, top_p=0.9)),
            ("top_p=0.9", dict(top_p=0.9))]
QUICK = [(1, 128256, torch.bfloat16), (64, 128256, torch.bfloat16)]
FULL = [(b, v, d) for d in (torch.float32, torch.bfloat16) for v in (32000, 128256) for b in (1, 64)]


def _setup(batch: int, vocab: int, dtype: torch.dtype, kwargs: dict, device: str):
    def setup():
        from seqgen_fast.functional import sample_tokens
        from seqgen_fast.reference import sampling as reference

        logits = (torch.randn(batch, vocab, device=device) * 3).to(dtype)
        # errors="mark": no host read of the invalid-row flag, as torch's CUDA multinomial reads none
        fns = {"ours": lambda: sample_tokens(logits, errors="mark", **kwargs),
               "torch": lambda: reference.sample_tokens(logits, **kwargs)}
        if "top_k" in kwargs and device == "cuda":  # ours picks the two-stage top-k here; time the single stage beside it
            from seqgen_fast.kernels import sampling as kernel
            from seqgen_fast.ops.sampling import draw_seed

            t, k, p = kwargs["temperature"], kwargs["top_k"], kwargs.get("top_p", 1.0)
            fns["ours-1stage"] = lambda: kernel.sample_tokens(logits, draw_seed(logits.device, None), t, k, p,
                                                              segment=0)
        return fns

    return setup


def _case(batch: int, vocab: int, dtype: torch.dtype, setting: tuple[str, dict], device: str = "cuda") -> Case:
    label, kwargs = setting
    return Case("sampling", f"sample_tokens {label}", f"B{batch} V{vocab}", dtype,
                _setup(batch, vocab, dtype, kwargs, device), anchor="torch",
                bytes=batch * vocab * torch.finfo(dtype).bits // 8, device=device)


def cases(mode: str, device: str = "cuda"):
    if mode == "headline":
        yield _case(64, 128256, torch.bfloat16, SETTINGS[0])
        return
    if mode == "tiny":
        yield _case(2, 97, torch.float32, SETTINGS[0], device=device)
        return
    settings = SETTINGS[:1] if mode == "quick" else SETTINGS
    for batch, vocab, dtype in (QUICK if mode == "quick" else FULL):
        for setting in settings:
            yield _case(batch, vocab, dtype, setting)
