"""Prefill attention: seqgen_fast's scaled_dot_product_attention against torch's SDPA backends.

Every provider runs on the same (B, H, S, D) bf16 tensors in one run: "ours" (our SDPA, the
Triton FA2 kernels), "sdpa-flash" (FA2 in torch), "sdpa-cudnn" (the anchor: torch's fastest on
H100), "sdpa-efficient" (xformers' kernel). Forward, and forward+backward (autograd.grad of q, k,
v with a fixed output gradient), causal and not, on the anchor shapes of
benchmarks/anchors/h100-2026-11-23.md. FLOPs: 4 B H S^2 D for the forward (half when causal), 3.5x
that for forward+backward (the backward does 2.5x the forward's matmul work), as the anchors count.
"""
from __future__ import annotations

import torch

from . import Case

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION"}
# (batch, heads, seq, head dim)
QUICK = [(4, 16, 4096, 128)]
FULL = QUICK + [(16, 16, 2048, 64), (1, 16, 16384, 128)]


def _setup(batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, causal: bool, backward: bool,
           device: str):
    def setup():
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from seqgen_fast.functional import scaled_dot_product_attention

        q, k, v = (torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, requires_grad=backward)
                   for _ in range(3))
        go = torch.randn_like(q)

        def timed(attn):
            if not backward:
                return lambda: attn(q, k, v, is_causal=causal)
            return lambda: torch.autograd.grad(attn(q, k, v, is_causal=causal), (q, k, v), go)

        def torch_backend(name):
            def attn(*args, **kwargs):
                with sdpa_kernel(getattr(SDPBackend, name)):
                    return F.scaled_dot_product_attention(*args, **kwargs)
            return attn

        fns = {"ours": timed(scaled_dot_product_attention)}
        if device == "cpu":  # the dry run: torch's math path is the one CPU anchor
            return {**fns, "sdpa-math": timed(torch_backend("MATH"))}
        fns.update({provider: timed(torch_backend(name)) for provider, name in SDPA_BACKENDS.items()})
        return fns

    return setup


def _case(batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, causal: bool, backward: bool,
          device: str = "cuda") -> Case:
    fwd_flops = 4 * batch * heads * seq * seq * dim / (2 if causal else 1)
    op = "sdpa " + ("fwd+bwd" if backward else "fwd") + (" causal" if causal else "")
    return Case("attention", op, f"B{batch} H{heads} S{seq} D{dim}", dtype,
                _setup(batch, heads, seq, dim, dtype, causal, backward, device),
                anchor="sdpa-math" if device == "cpu" else "sdpa-cudnn", flops=fwd_flops * (3.5 if backward else 1.0),
                device=device)


def cases(mode: str, device: str = "cuda"):
    if mode == "headline":
        yield _case(4, 16, 4096, 128, torch.bfloat16, causal=False, backward=False)
        return
    if mode == "tiny":
        yield _case(1, 2, 33, 16, torch.float32, causal=True, backward=False, device=device)
        return
    for batch, heads, seq, dim in (QUICK if mode == "quick" else FULL):
        for causal in (False, True):
            for backward in (False, True):
                yield _case(batch, heads, seq, dim, torch.bfloat16, causal, backward)
