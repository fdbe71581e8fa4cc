"""Plain-PyTorch reference of the fused diffusion step (the ground truth and the CPU path).

Every supported scheduler step (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver++ 1M/2M) is one
affine map with an optional clip of the predicted x0. Per sample b, with the coefficient row
``c = coef[key_b]`` (``NCOEF`` = 8 float32 values, layout ``COEF_NAMES`` of ``seqgen_fast._contract``)::

    m   = model_scale_b * (u + g_b * (c - u))   # classifier-free guidance, when cfg (else m = model_output)
    x'  = x + c.pre_noise * n                    # Euler's churn noise (0 elsewhere)
    x0  = c.x0_x * x' + c.x0_m * m               # predicted original sample
    x0c = clamp(x0, -r, r)                       # clip_sample (x0_mode 1), or
        = clamp(x0, -s_b, s_b) / s_b             # dynamic thresholding (x0_mode 2; s_b from a separate pass)
    out = c.x * x' + c.x0 * x0c + c.m * m + c.hist * h + c.noise * n
    h  <- x0c                                    # DPM-Solver history (when history is given)

Layout: ``sample`` (B, ...), ``model_output`` (B, ...) or (2B, ...) with the unconditional half
first when ``cfg``; ``history`` shaped like ``sample``; ``noise`` shaped like ``sample``.
``key_b`` is a row of ``coef``: the host ``key`` for every sample (``key >= 0``), else
``timesteps[b]`` read as an integer row (``schedule_timesteps`` None), else the position of
``timesteps[b]`` in ``schedule_timesteps`` (exact equality). A key outside the table gives a row
of NaN, so the sample's output is NaN (never a silently wrong value).
"""
from __future__ import annotations

import torch

from .._contract import A0, AH, AM, AN, AX, CPN, X0M, X0X


def gather_rows(coef: torch.Tensor, batch: int, key: int, timesteps: torch.Tensor | None,
                schedule_timesteps: torch.Tensor | None) -> torch.Tensor:
    """The (B, NCOEF) coefficient rows of each sample (NaN rows for keys outside the table); no host sync."""
    rows = coef.shape[0]
    if key >= 0:
        idx = torch.full((batch,), key, dtype=torch.long, device=coef.device)
    elif schedule_timesteps is None:
        t = timesteps.to(coef.device).reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.to(coef.device)
        idx = t.to(torch.float64)
        whole = idx == torch.floor(idx)
        idx = torch.where(whole, idx, torch.full_like(idx, -1)).to(torch.long)
    else:
        t = timesteps.to(coef.device).reshape(-1).expand(batch) if timesteps.numel() == 1 else timesteps.to(coef.device)
        eq = t.to(torch.float32)[:, None] == schedule_timesteps.to(torch.float32)[None, :]
        pos = torch.arange(eq.shape[1], device=coef.device).expand_as(eq)
        idx = torch.where(eq, pos, torch.full_like(pos, rows)).min(dim=1).values
    valid = (idx >= 0) & (idx < rows)
    safe = torch.where(valid, idx, torch.zeros_like(idx))
    out = coef[safe]
    return torch.where(valid[:, None], out, torch.full_like(out, float("nan")))


def guided(model_output: torch.Tensor, batch: int, cfg: bool, guidance_scale: float,
           guidance: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """m = u + g (c - u) from the (2B, ...) CFG batch (per-sample g when ``guidance`` is given), else the output."""
    m = model_output.to(dtype)
    if not cfg:
        return m
    u, c = m[:batch], m[batch:]
    g = guidance.to(dtype).reshape(batch, *([1] * (m.dim() - 1))) if guidance is not None else guidance_scale
    return u + g * (c - u)


def bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (B,) per-sample value shaped to broadcast over (B, ...) tensors of ``ndim`` dims."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def draw_noise(shape, device, seed: int, offset: int) -> torch.Tensor:
    """The reference backend's in-op noise: torch's generator seeded from (seed, offset); float32."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % (2**63))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def diffusion_step(sample: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor, key: int,
                   timesteps: torch.Tensor | None, schedule_timesteps: torch.Tensor | None, cfg: bool,
                   guidance_scale: float, guidance: torch.Tensor | None, model_scale: torch.Tensor | None,
                   x0_mode: int, clip_range: float, threshold: torch.Tensor | None, history: torch.Tensor | None,
                   read_history: bool, noise: torch.Tensor | None, noise_mode: int, seed: int, offset: int,
                   rng_offset: torch.Tensor | None, write_x0: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused step (see the module docstring); returns (prev_sample, x0c or an empty tensor).

    noise_mode: 0 none, 1 the given ``noise``, 2 drawn in-op from (seed, offset + rng_offset), where
    ``rng_offset`` is a 1-element int64 tensor or None (0); this backend reads it on the host, so
    it cannot run inside a CUDA-graph capture. Math in float32 (float64 for float64 inputs); outputs
    in ``sample``'s dtype; ``history`` updated in place.
    """
    dt = torch.float64 if sample.dtype == torch.float64 else torch.float32
    B, nd = sample.shape[0], sample.dim()
    c = gather_rows(coef, B, key, timesteps, schedule_timesteps).to(dt)
    col = lambda i: bcast(c[:, i], nd)  # noqa: E731
    m = guided(model_output, B, cfg, guidance_scale, guidance, dt)
    if model_scale is not None:
        m = m * bcast(model_scale.to(dt), nd)
    x = sample.to(dt)
    n = None
    if noise_mode == 1:
        n = noise.to(dt)
    elif noise_mode == 2:
        if rng_offset is not None:
            if sample.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("diffusion_step: the reference backend reads rng_offset on the host and cannot "
                                   "be captured in a CUDA graph (use the triton or cuda backend)")
            offset = (offset + int(rng_offset.reshape(-1)[0])) % 2**32
        n = draw_noise(sample.shape, sample.device, seed, offset).to(dt)
    if n is not None:
        x = x + col(CPN) * n
    x0 = col(X0X) * x + col(X0M) * m
    if x0_mode == 1:
        x0 = x0.clamp(-clip_range, clip_range)
    elif x0_mode == 2:
        s = bcast(threshold.to(dt), nd)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    out = col(AX) * x + col(A0) * x0 + col(AM) * m
    if history is not None:
        if read_history:
            out = out + col(AH) * history.to(dt)
        history.copy_(x0.to(history.dtype))
    if n is not None:
        out = out + col(AN) * n
    x0_out = x0.to(sample.dtype) if write_x0 else sample.new_empty(0)
    return out.to(sample.dtype), x0_out
