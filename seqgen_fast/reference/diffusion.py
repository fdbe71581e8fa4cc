"""Plain-PyTorch reference of the fused diffusion step (the ground truth and the CPU path).

Every supported scheduler step (DDPM, DDIM, Euler, Euler ancestral, DPM-Solver 1-3 in its four
algorithm types, UniPC bh1/bh2 with its corrector, LCM, flow-matching Euler) is one affine map of
its inputs with an optional clip of the predicted x0 in the middle. Per sample b, with the
coefficient row ``c = coef[key_b]`` (``NCOEF`` float32 values, layout ``COEF_NAMES`` of
``seqgen_fast._contract``)::

    m    = model_scale_b * (u + g_b * (k - u))      # classifier-free guidance (u, k: the two halves), else m = u
    x    = x + c.pre_noise * n                      # Euler's churn noise (0 elsewhere)
    x0   = c.x0_x * x + c.x0_m * m                  # predicted original sample
    x0c  = clamp(x0, -r, r)                         # clip_sample (x0_mode 1), or
         = clamp(x0, -s_b, s_b) / s_b               # dynamic thresholding (x0_mode 2; s_b from a separate pass)
    conv = c.conv_x * x + c.conv_x0 * x0c + c.conv_m * m          # the multistep solvers' converted output
    xs   = c.cur_x * x + c.cur_last * l + c.cur_h1 * h1 + c.cur_h2 * h2 + c.cur_h3 * h3 + c.cur_conv * conv
                                                    # the sample the step starts from (UniPC's corrector)
    out  = c.x * xs + c.x0 * x0c + c.m * m + c.conv * conv + c.h1 * h1 + c.h2 * h2 + c.noise * f(v) * n
    aux  = c.aux_x * xs + c.aux_x0 * x0c            # pred_original_sample (LCM: denoised)

with ``f(v) = 1``, ``sqrt(v)`` or ``exp(c.var_p + c.var_q * v)`` by ``var_mode`` (DDPM's fixed,
learned and learned_range variances; v is the model's variance channels). ``h1..h3`` are the
solver history (diffusers' ``model_outputs[-1], [-2], [-3]`` before the step), ``l`` UniPC's
``last_sample``. A term whose tensor is not given is absent.

Layout: every tensor argument is indexed like ``sample`` (B, ...): a broadcast model output is an
expanded view, any strides (channels_last, slices) are read as they are. ``key_b`` is a row of
``coef``: the host ``key`` for every sample (``key >= 0``), else ``timesteps[b]`` read as an integer
row (``schedule_timesteps`` None), else the position of ``timesteps[b]`` in ``schedule_timesteps``
(exact equality). A key outside the table gives a row of NaN, so the sample's output is NaN (never a
silently wrong value).
"""
from __future__ import annotations

import torch

from .._contract import (A0, AC, AH, AH2, AM, AN, AX, CM, CPN, CX, CX0, D0, DX, SC, SH1, SH2, SH3, SL, SX,
                         VAR_EXP, VAR_SQRT, VARP, VARQ, X0M, X0X)


def gather_rows(coef: torch.Tensor, batch: int, key: int, timesteps: torch.Tensor | None,
                schedule_timesteps: torch.Tensor | None) -> torch.Tensor:
    """The (B, NCOEF) coefficient rows of each sample (NaN rows for keys outside the table); no host sync."""
    rows = coef.shape[0]
    if key >= 0:
        idx = torch.full((batch,), key, dtype=torch.long, device=coef.device)
    else:
        t = timesteps.to(coef.device).reshape(-1)
        t = t.expand(batch) if t.numel() == 1 else t
        if schedule_timesteps is None:
            idx = t.to(torch.float64)
            idx = torch.where(idx == torch.floor(idx), idx, torch.full_like(idx, -1)).to(torch.long)
        else:
            eq = t.to(torch.float32)[:, None] == schedule_timesteps.to(torch.float32)[None, :]
            pos = torch.arange(eq.shape[1], device=coef.device).expand_as(eq)
            idx = torch.where(eq, pos, torch.full_like(pos, rows)).min(dim=1).values
    valid = (idx >= 0) & (idx < rows)
    out = coef[torch.where(valid, idx, torch.zeros_like(idx))]
    return torch.where(valid[:, None], out, torch.full_like(out, float("nan")))


def guided(u: torch.Tensor, k: torch.Tensor | None, guidance_scale: float, guidance: torch.Tensor | None,
           dtype: torch.dtype) -> torch.Tensor:
    """m = u + g (k - u) (per-sample g when ``guidance`` is given) when the conditional half k is given, else u."""
    m = u.to(dtype)
    if k is None:
        return m
    g = bcast(guidance.to(dtype), m.dim()) if guidance is not None else guidance_scale
    return m + g * (k.to(dtype) - m)


def bcast(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (B,) per-sample value shaped to broadcast over (B, ...) tensors of ``ndim`` dims."""
    return v.reshape(v.shape[0], *([1] * (ndim - 1)))


def draw_noise(shape, device, seed: int, offset: int) -> torch.Tensor:
    """The reference backend's in-op noise: torch's generator seeded from (seed, offset); float32."""
    gen = torch.Generator(device=device)
    gen.manual_seed((seed * 0x9E3779B97F4A7C15 + offset) % (2**63))
    return torch.randn(shape, generator=gen, device=device, dtype=torch.float32)


def times(c: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """c v, but 0 where the coefficient is -0.0: a term the scheduler's formula does not have
    (``diffusion.tables.mark_absent``), so an inf in v does not become 0 * inf = NaN where diffusers
    never forms that product. A +0.0 coefficient multiplies (0 * inf = NaN, as diffusers computes it);
    a NaN coefficient (a key outside the table) gives NaN."""
    return torch.where((c == 0) & torch.signbit(c), 0.0, c * v)


def diffusion_step(x, u, k, v, last, h1, h2, h3, noise, coef, key, timesteps, schedule_timesteps, guidance_scale,
                   guidance, model_scale, x0_mode, clip_range, threshold, noise_mode, var_mode, seed, offset,
                   rng_offset, out_dtype, aux_dtype, conv_dtype, xs_dtype):
    """One fused step (see the module docstring); returns ``(out, aux, conv, xs)``.

    ``u``/``k``: the model output (k None) or its unconditional/conditional halves; ``v``: variance
    channels or None; ``last``, ``h1..h3``: the solver state or None. noise_mode: 0 none, 1 the given
    ``noise``, 2 drawn in-op from (seed, offset + rng_offset), ``rng_offset`` a 1-element int64 tensor
    or None; this backend reads it on the host, so it cannot run inside a CUDA-graph capture. Math in
    float32 (float64 when ``x`` is float64). ``out`` is written in ``out_dtype``; ``aux``, ``conv``,
    ``xs`` in their dtypes, or returned empty when their dtype is None.
    """
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    B, nd = x.shape[0], x.dim()
    c = gather_rows(coef, B, key, timesteps, schedule_timesteps).to(dt)
    col = lambda i: bcast(c[:, i], nd)  # noqa: E731
    term = lambda i, v: times(col(i), v)  # noqa: E731
    m = guided(u, k, guidance_scale, guidance, dt)
    if model_scale is not None:
        m = m * bcast(model_scale.to(dt), nd)
    xf = x.to(dt)
    n = None
    if noise_mode == 1:
        n = noise.to(dt)
    elif noise_mode == 2:
        if rng_offset is not None:
            if x.is_cuda and torch.cuda.is_current_stream_capturing():
                raise RuntimeError("diffusion_step: the reference backend reads rng_offset on the host and cannot "
                                   "be captured in a CUDA graph (use the triton or cuda backend)")
            offset = (offset + int(rng_offset.reshape(-1)[0])) % 2**64
        n = draw_noise(x.shape, x.device, seed, offset).to(dt)
    if n is not None:
        xf = xf + term(CPN, n)
    x0 = term(X0X, xf) + term(X0M, m)
    if x0_mode == 1:
        x0 = x0.clamp(-clip_range, clip_range)
    elif x0_mode == 2:
        s = bcast(threshold.to(dt), nd)
        x0 = torch.maximum(torch.minimum(x0, s), -s) / s
    hist = [(h.to(dt) if h is not None else None) for h in (h1, h2, h3)]
    conv = term(CX, xf) + term(CX0, x0) + term(CM, m) if conv_dtype is not None else None
    xs = xf
    if last is not None:  # UniPC's corrected sample
        xs = term(SX, xf) + term(SL, last.to(dt)) + term(SC, conv)
        for col_i, h in zip((SH1, SH2, SH3), hist):
            if h is not None:
                xs = xs + term(col_i, h)
    out = term(AX, xs) + term(A0, x0) + term(AM, m)
    if conv is not None:
        out = out + term(AC, conv)
    for col_i, h in zip((AH, AH2), hist):
        if h is not None:
            out = out + term(col_i, h)
    if n is not None:
        an = col(AN)
        if var_mode == VAR_SQRT:
            an = torch.where(an != 0, an * v.to(dt).sqrt(), 0.0)
        elif var_mode == VAR_EXP:
            an = torch.where(an != 0, an * torch.exp(col(VARP) + col(VARQ) * v.to(dt)), 0.0)
        out = out + times(an, n)
    empty = x.new_empty(0)
    aux = (term(DX, xs) + term(D0, x0)).to(aux_dtype) if aux_dtype is not None else empty
    return (out.to(out_dtype), aux, conv.to(conv_dtype) if conv is not None else empty,
            xs.to(xs_dtype) if xs_dtype is not None else empty)
