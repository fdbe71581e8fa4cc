"""Launcher of the CUDA diffusion step in ``csrc/diffusion.cu`` (``seqgen_fast._C.diffusion_step``),
and what that kernel takes.

The CUDA twin of the Triton step covers the single-step schedulers (DDPM, DDIM, Euler, Euler
ancestral, LCM, flow-matching Euler) on contiguous inputs of one dtype: a coefficient row per sample
from the host ``key`` or an integer timestep, classifier-free guidance over the two halves of one
(2B, ...) model output, x0 clipping or thresholding, given or in-kernel (Philox) noise. It has no
multistep history, no UniPC corrector, no learned variance, no search of a timestep in the schedule
and no strided reads: those stay with Triton. The math and the row layout are those of
``seqgen_fast.reference.diffusion``; arguments are the op's (``seqgen_fast.ops.diffusion``), in its
order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import _ext
from .._backend import Capabilities
from .._contract import TIMESTEP_CODES

CAPS = Capabilities("cuda", dtypes=(torch.float32, torch.float16, torch.bfloat16))


def supports(x, u, k, v, last, h1, h2, h3, noise, coef, key, timesteps, schedule_timesteps, guidance_scale, guidance,
             model_scale, x0_mode, clip_range, threshold, noise_mode, var_mode, seed, offset, rng_offset, out_dtype,
             aux_dtype, conv_dtype, xs_dtype, *, flat: bool) -> list[str]:
    """Reasons :func:`launch` cannot take this call."""
    if _ext.C is None:
        return [_ext.reason]
    why = CAPS.reasons(x, u, k, coef, timesteps, schedule_timesteps, guidance, model_scale, threshold, noise,
                       rng_offset)
    if why:
        return why
    if any(t is not None for t in (v, last, h1, h2, h3)) or conv_dtype is not None or xs_dtype is not None:
        why.append("multistep history, UniPC's corrector and learned variances are Triton-only (the cuda kernel "
                   "has the single-step schedulers)")
    if schedule_timesteps is not None:
        why.append("timesteps searched in a schedule (per-sample Euler/DPM/UniPC/LCM/flow steps) are Triton-only")
    if timesteps is not None and timesteps.dtype not in TIMESTEP_CODES:
        why.append(f"timesteps dtype {timesteps.dtype} (the cuda kernel reads {', '.join(map(str, TIMESTEP_CODES))})")
    if not (x.is_contiguous() and u.is_contiguous() and flat):
        why.append("non-contiguous inputs are read through their strides by the triton kernel only")
    if k is not None and (not k.is_contiguous() or k.data_ptr() != u.data_ptr() + u.numel() * u.element_size()):
        why.append("the cuda kernel reads guidance from the two halves of one contiguous (2B, ...) model output")
    if any(t is not None and t.dtype != x.dtype for t in (u, k)) or any(
            dt is not None and dt != x.dtype for dt in (out_dtype, aux_dtype)):
        why.append("mixed dtypes (model output, sample, result) are Triton-only")
    if noise is not None and (noise.dtype not in (torch.float32, x.dtype) or not noise.is_contiguous()):
        why.append(f"noise must be contiguous float32 or the sample's dtype for the cuda kernel, got {noise.dtype}")
    if noise_mode == 2 and offset >> 32:
        why.append("64-bit noise offsets (generator-keyed streams) are Triton-only (the cuda counter has 32 bits)")
    for name, t in (("guidance", guidance), ("model_scale", model_scale), ("threshold", threshold)):
        if t is not None and t.dtype != torch.float32:
            why.append(f"{name} must be float32 for the cuda kernel, got {t.dtype}")
    if x.dim() and x.shape[0] > 65535:
        why.append(f"batch {x.shape[0]} > 65535 (the kernel's grid axis 1)")
    return why


# The arguments of ``_C.diffusion_step`` in the binding's order (csrc/diffusion_bind.cpp): calls pass them
# by position, which pybind11 parses several times faster than keywords.
ARGS = ("sample", "model_output", "out", "x0", "noise", "coef", "timesteps", "ts_dtype", "ts_stride", "guidance",
        "model_scale", "threshold", "batch", "n", "rows", "key", "cfg", "guidance_scale", "x0_mode", "clip_range",
        "noise_mode", "seed", "offset", "rng_offset", "dtype", "noise_dtype", "device", "stream")


@dataclass(frozen=True)
class Launch:
    """The arguments of a step launch that stay fixed over a loop (the rest are pointers, key, guidance
    scale, seed, offset and stream)."""

    ts_dtype: int
    ts_stride: int
    batch: int
    n: int
    rows: int
    cfg: int
    x0_mode: int
    clip_range: float
    noise_mode: int
    dtype: int
    noise_dtype: int
    device: int


def plan(sample, coef, timesteps, noise, noise_mode, cfg, x0_mode, clip_range, *, device=None) -> Launch:
    """The fixed arguments of a launch (``device``: the sample's CUDA device unless given)."""
    B = sample.shape[0]
    ts_stride = 0 if timesteps is None or timesteps.numel() == 1 else timesteps.stride(0)
    return Launch(-1 if timesteps is None else TIMESTEP_CODES[timesteps.dtype], ts_stride, B,
                  sample.numel() // B if B else 0, coef.shape[0], int(cfg), x0_mode, float(clip_range), noise_mode,
                  _ext.dtype_code(sample.dtype), _ext.dtype_code(noise.dtype) if noise_mode == 1 else 0,
                  _ext.device_index(sample) if device is None else device)


def launch_args(p: Launch, sample, model_output, coef, key, timesteps, guidance, model_scale, threshold, noise,
                guidance_scale, seed, offset, rng_offset, out, x0, stream) -> tuple:
    """The positional arguments of ``_C.diffusion_step`` (``ARGS``; pointers as integers, see csrc/diffusion.h)."""
    ptr = _ext.ptr
    return (sample.data_ptr(), model_output.data_ptr(), out.data_ptr(), ptr(x0),
            noise.data_ptr() if p.noise_mode == 1 else 0, coef.data_ptr(), ptr(timesteps), p.ts_dtype, p.ts_stride,
            ptr(guidance), ptr(model_scale), ptr(threshold), p.batch, p.n, p.rows, key, p.cfg, float(guidance_scale),
            p.x0_mode, p.clip_range, p.noise_mode, seed % (2**63), offset % (2**32), ptr(rng_offset), p.dtype,
            p.noise_dtype, p.device, stream)


def plan_of(args: tuple) -> Launch:
    """:func:`plan` of a call with the op's arguments (``seqgen_fast.ops.diffusion``, in its order)."""
    return plan(args[0], args[9], args[11], args[8], args[19], args[2] is not None, args[16], args[17])


def launch(p: Launch, args: tuple, outputs: tuple) -> None:
    """One fused step on the CUDA kernel (op arguments ``args``) into ``outputs``; one launch, no host sync."""
    x, u = args[0], args[1]
    aux = outputs[1]
    _ext.C.diffusion_step(*launch_args(p, x, u, args[9], args[10], args[11], args[14], args[15], args[18], args[8],
                                       args[13], args[21], args[22], args[23], outputs[0],
                                       aux if aux.numel() else None, torch._C._cuda_getCurrentRawStream(p.device)))
