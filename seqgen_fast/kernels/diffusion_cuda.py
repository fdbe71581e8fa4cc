"""Launcher of the CUDA diffusion step in ``csrc/diffusion.cu`` (``seqgen_fast._C.diffusion_step``),
and what that kernel takes.

The CUDA twin of the Triton step covers the DDPM- and DDIM-style steps: a coefficient row per
sample from the host ``key`` or an integer timestep, classifier-free guidance, x0 clipping or
thresholding, given or in-kernel (Philox) noise. It has no multistep history and no search of a
timestep in the schedule (Euler, DPM-Solver per-sample steps): those stay with Triton. The math
and the row layout are those of ``seqgen_fast.reference.diffusion``; arguments are the op's
(``seqgen_fast.ops.diffusion``), in its order.
"""
from __future__ import annotations

import torch

from .. import _ext
from .._backend import Capabilities
from .._contract import TIMESTEP_CODES

CAPS = Capabilities("cuda", dtypes=(torch.float32, torch.float16, torch.bfloat16))


def supports(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance,
             model_scale, x0_mode, clip_range, threshold, history, read_history, noise, noise_mode, seed, offset,
             rng_offset, write_x0) -> list[str]:
    """Reasons :func:`step` cannot take this call (the layout rules shared with Triton are the op's)."""
    if _ext.C is None:
        return [_ext.reason]
    why = CAPS.reasons(sample, model_output, coef, timesteps, schedule_timesteps, guidance, model_scale, threshold,
                       history, noise, rng_offset)
    if why:
        return why
    if timesteps is not None and timesteps.dtype not in TIMESTEP_CODES:
        why.append(f"timesteps dtype {timesteps.dtype} (the cuda kernel reads {', '.join(map(str, TIMESTEP_CODES))})")
    if noise is not None and noise.dtype not in (torch.float32, sample.dtype):
        why.append(f"noise dtype {noise.dtype} (the cuda kernel reads float32 or the sample's dtype)")
    if model_output.dtype != sample.dtype:
        why.append(f"model_output dtype {model_output.dtype} differs from sample dtype {sample.dtype}")
    for name, t in (("guidance", guidance), ("model_scale", model_scale), ("threshold", threshold)):
        if t is not None and t.dtype != torch.float32:
            why.append(f"{name} must be float32 for the cuda kernel, got {t.dtype}")
    if schedule_timesteps is not None:
        why.append("timesteps searched in a schedule (Euler/DPM per-sample steps) are Triton-only")
    if history is not None:
        why.append("the DPM-Solver history is Triton-only (the cuda backend has the DDPM/DDIM-style steps)")
    return why


def launch_args(sample, model_output, coef, key, timesteps, guidance, model_scale, threshold, noise, noise_mode, cfg,
                guidance_scale, x0_mode, clip_range, seed, offset, rng_offset, out, x0, device, stream) -> dict:
    """Keyword arguments of ``_C.diffusion_step`` (pointers as integers; see csrc/diffusion.h)."""
    B = sample.shape[0]
    return dict(
        sample=_ext.ptr(sample), model_output=_ext.ptr(model_output), out=_ext.ptr(out), x0=_ext.ptr(x0),
        noise=_ext.ptr(noise) if noise_mode == 1 else 0, coef=_ext.ptr(coef), timesteps=_ext.ptr(timesteps),
        ts_dtype=-1 if timesteps is None else TIMESTEP_CODES[timesteps.dtype],
        ts_stride=0 if timesteps is None or timesteps.numel() == 1 else 1, guidance=_ext.ptr(guidance),
        model_scale=_ext.ptr(model_scale), threshold=_ext.ptr(threshold), batch=B,
        n=sample.numel() // B if B else 0, rows=coef.shape[0], key=key, cfg=int(cfg),
        guidance_scale=float(guidance_scale), x0_mode=x0_mode, clip_range=float(clip_range), noise_mode=noise_mode,
        seed=seed % (2**63), offset=offset % (2**32), rng_offset=_ext.ptr(rng_offset),
        dtype=_ext.dtype_code(sample.dtype), noise_dtype=_ext.dtype_code(noise.dtype) if noise_mode == 1 else 0,
        device=device, stream=stream)


def step(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance, model_scale,
         x0_mode, clip_range, threshold, history, read_history, noise, noise_mode, seed, offset, rng_offset,
         write_x0):
    """One fused step on the CUDA kernel: ``(prev_sample, x0 or an empty tensor)``. The caller has
    checked :func:`supports`; one launch, no host sync."""
    out = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if write_x0 else sample.new_empty(0)
    if sample.numel() == 0:
        return out, x0
    _ext.C.diffusion_step(**launch_args(sample, model_output, coef, key, timesteps, guidance, model_scale, threshold,
                                        noise, noise_mode, cfg, guidance_scale, x0_mode, clip_range, seed, offset,
                                        rng_offset, out, x0 if write_x0 else None, _ext.device_index(sample),
                                        _ext.stream_of(sample)))
    return out, x0
