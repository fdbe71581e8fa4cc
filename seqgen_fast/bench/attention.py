"""Prefill attention: ours against torch's SDPA backends (cuDNN, flash = FA2, efficient) in one run.

Every provider runs on the same (B, H, S, D) tensors: "ours" (our SDPA: the Triton kernels, the
Hopper lowering on sm_90), "sdpa-flash" (FA2 in torch), "sdpa-cudnn" (the anchor: torch's fastest
on H100), "sdpa-efficient" (xformers' kernel). Forward, and forward+backward (autograd.grad of q,
k, v with a fixed output gradient), causal and not, bf16 and fp16, on the anchor shapes of
benchmarks/anchors/h100-2026-11-23.md. FLOPs as the anchors count them: 4 B H S^2 D for the
forward (half when causal), 3.5x that for forward+backward.

The sliding-window case (flash layout, causal, window 4096 at S 16384): ours with the window,
ours without it, and sdpa-cudnn full causal (what runs without window support); FLOPs of the band,
4 B H S W D less the triangle at the start, so the window's TFLOP/s compares with the full case's.
"""
from __future__ import annotations

import torch

from . import Case

SDPA_BACKENDS = {"sdpa-flash": "FLASH_ATTENTION", "sdpa-cudnn": "CUDNN_ATTENTION",
                 "sdpa-efficient": "EFFICIENT_ATTENTION"}
# (batch, heads, seq, head dim)
QUICK = [(4, 16, 4096, 128)]
FULL = QUICK + [(16, 16, 2048, 64), (1, 16, 16384, 128)]
WINDOW = (1, 16, 16384, 128, 4096)


def _timed(attn, q, k, v, go, backward, **kw):
    if not backward:
        return lambda: attn(q, k, v, **kw)
    return lambda: torch.autograd.grad(attn(q, k, v, **kw), (q, k, v), go)


def _setup(batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, causal: bool, backward: bool,
           device: str):
    def setup():
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from seqgen_fast.functional import scaled_dot_product_attention

        q, k, v = (torch.randn(batch, heads, seq, dim, device=device, dtype=dtype, requires_grad=backward)
                   for _ in range(3))
        go = torch.randn_like(q)

        def torch_backend(name):
            def attn(*args, **kwargs):
                with sdpa_kernel(getattr(SDPBackend, name)):
                    return F.scaled_dot_product_attention(*args, **kwargs)
            return attn

        fns = {"ours": _timed(scaled_dot_product_attention, q, k, v, go, backward, is_causal=causal)}
        if device == "cpu":  # the dry run: torch's math path is the one CPU anchor
            return {**fns, "sdpa-math": _timed(torch_backend("MATH"), q, k, v, go, backward, is_causal=causal)}
        fns.update({p: _timed(torch_backend(n), q, k, v, go, backward, is_causal=causal)
                    for p, n in SDPA_BACKENDS.items()})
        return fns

    return setup


def _window_setup(batch, heads, seq, dim, window, dtype, backward):
    def setup():
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        from seqgen_fast.functional import flash_attention

        q, k, v = (torch.randn(batch, seq, heads, dim, device="cuda", dtype=dtype, requires_grad=backward)
                   for _ in range(3))
        go = torch.randn_like(q)

        def cudnn(q_, k_, v_):
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q_, k_, v_)), is_causal=True)

        return {"ours": _timed(flash_attention, q, k, v, go, backward, causal=True, window_size=(window, 0)),
                "ours-full": _timed(flash_attention, q, k, v, go, backward, causal=True),
                "sdpa-cudnn": lambda: (cudnn(q, k, v) if not backward else
                                       torch.autograd.grad(cudnn(q, k, v), (q, k, v), go.transpose(1, 2)))}

    return setup


def _case(batch: int, heads: int, seq: int, dim: int, dtype: torch.dtype, causal: bool, backward: bool,
          device: str = "cuda") -> Case:
    fwd_flops = 4 * batch * heads * seq * seq * dim / (2 if causal else 1)
    op = "sdpa " + ("fwd+bwd" if backward else "fwd") + (" causal" if causal else "")
    return Case("attention", op, f"B{batch} H{heads} S{seq} D{dim}", dtype,
                _setup(batch, heads, seq, dim, dtype, causal, backward, device),
                anchor="sdpa-math" if device == "cpu" else "sdpa-cudnn", flops=fwd_flops * (3.5 if backward else 1.0),
                device=device)


def _window_case(dtype: torch.dtype, backward: bool) -> Case:
    batch, heads, seq, dim, window = WINDOW
    band = seq * (window + 1) - window * (window + 1) // 2  # visible (i, j) pairs per head
    flops = 4 * batch * heads * band * dim * (3.5 if backward else 1.0)
    op = "flash " + ("fwd+bwd" if backward else "fwd") + f" causal window {window}"
    return Case("attention", op, f"B{batch} H{heads} S{seq} D{dim}", dtype,
                _window_setup(batch, heads, seq, dim, window, dtype, backward), anchor="sdpa-cudnn", flops=flops)


def cases(mode: str, device: str = "cuda"):
    if mode == "headline":
        yield _case(4, 16, 4096, 128, torch.bfloat16, causal=False, backward=False)
        return
    if mode == "tiny":
        yield _case(1, 2, 33, 16, torch.float32, causal=True, backward=False, device=device)
        return
    dtypes = (torch.bfloat16,) if mode == "quick" else (torch.bfloat16, torch.float16)
    for dtype in dtypes:
        for batch, heads, seq, dim in (QUICK if mode == "quick" else FULL):
            for causal in (False, True):
                for backward in (False, True):
                    yield _case(batch, heads, seq, dim, dtype, causal, backward)
        if mode == "full":
            for backward in (False, True):
                yield _window_case(dtype, backward)
