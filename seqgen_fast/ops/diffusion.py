"""The fused diffusion step as a torch.library op, its backends, dispatch and self-checks.

``diffusion_step(...)`` (public, used by ``seqgen_fast.diffusion``) runs the reduction passes
that some options need, picks a backend (triton -> cuda -> reference) and calls
``torch.ops.seqgen_fast.diffusion_step``:

* guidance rescale: per-sample std of the conditional and guided outputs (one extra read of the
  2B model output, in PyTorch on the device) -> a (B,) factor the kernel multiplies m by;
* dynamic thresholding: x0 is computed once (PyTorch on the device), its per-sample quantile of
  |x0| taken by a sort -> a (B,) scale s the kernel clamps and divides x0 by.

Neither pass syncs the host. The op is not differentiable (sampling needs no gradient). Under
torch.compile the public function calls the op (one opaque graph node); eagerly it calls the chosen
backend's implementation directly (the same function the op runs), to keep the host cost of a
step low. The row
layout and the math are in ``seqgen_fast.reference.diffusion``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .. import _ext
from .._backend import device_reasons, dispatcher
from .._checks import register_check
from ..reference import diffusion as ref
from ._library import custom_op

# Triton leads: its kernel covers all five schedulers and is verified under the interpreter, while the
# CUDA twin (DDPM/DDIM-style steps) has not yet run on a GPU; it serves when forced or when Triton
# cannot take the input. Both are memory-bound one-pass kernels, so the order costs no speed.
STEP = dispatcher("diffusion_step", order=("triton", "cuda", "reference"))
_KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _common_reasons(backend, sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale,
                    guidance, model_scale, x0_mode, clip_range, threshold, history, read_history, noise, noise_mode,
                    seed, offset, rng_offset, write_x0) -> list[str]:
    tensors = (sample, model_output, coef, timesteps, schedule_timesteps, guidance, model_scale, threshold, history,
               noise, rng_offset)
    why = device_reasons(backend, *tensors)
    if why:
        return why
    if sample.dtype not in _KERNEL_DTYPES:
        why.append(f"dtype {sample.dtype} (kernels take float32, float16, bfloat16)")
    for name, t in (("sample", sample), ("model_output", model_output), ("history", history), ("noise", noise),
                    ("coef", coef), ("timesteps", timesteps), ("guidance", guidance), ("model_scale", model_scale),
                    ("threshold", threshold)):
        if t is not None and not t.is_contiguous():
            why.append(f"{name} is not contiguous")
    if rng_offset is not None and rng_offset.dtype != torch.int64:
        why.append(f"rng_offset dtype {rng_offset.dtype} (the kernels read one int64)")
    return why


@STEP.register("reference")
def _step_reference(*args):
    return ref.diffusion_step(*args)


def _triton_supports(*args) -> list[str]:
    return _common_reasons("triton", *args)


@STEP.register("triton", supports=_triton_supports)
def _step_triton(*args):
    from ..kernels import diffusion as k

    return k.diffusion_step(*args)


def _cuda_supports(*args) -> list[str]:
    why = _common_reasons("cuda", *args)
    schedule_timesteps, history = args[5], args[13]
    timesteps, noise = args[4], args[15]
    if timesteps is not None and timesteps.dtype not in _TS_CODES:
        why.append(f"timesteps dtype {timesteps.dtype} (the cuda kernel reads {', '.join(map(str, _TS_CODES))})")
    if noise is not None and noise.dtype not in (torch.float32, args[0].dtype):
        why.append(f"noise dtype {noise.dtype} (the cuda kernel reads float32 or the sample's dtype)")
    if args[1].dtype != args[0].dtype:
        why.append(f"model_output dtype {args[1].dtype} differs from sample dtype {args[0].dtype}")
    for name, t in (("guidance", args[8]), ("model_scale", args[9]), ("threshold", args[12])):
        if t is not None and t.dtype != torch.float32:
            why.append(f"{name} must be float32 for the cuda kernel, got {t.dtype}")
    if schedule_timesteps is not None:
        why.append("timesteps searched in a schedule (Euler/DPM per-sample steps) are Triton-only")
    if history is not None:
        why.append("the DPM-Solver history is Triton-only (the cuda backend has the DDPM/DDIM-style steps)")
    return why


def _cuda_args(sample, model_output, coef, key, timesteps, guidance, model_scale, threshold, noise, noise_mode, cfg,
               guidance_scale, x0_mode, clip_range, seed, offset, rng_offset, out, x0, device, stream) -> dict:
    """Keyword arguments of ``_C.diffusion_step`` (pointers as integers; see csrc/diffusion.h)."""
    B = sample.shape[0]
    return dict(
        sample=_ext.ptr(sample), model_output=_ext.ptr(model_output), out=_ext.ptr(out), x0=_ext.ptr(x0),
        noise=_ext.ptr(noise) if noise_mode == 1 else 0, coef=_ext.ptr(coef), timesteps=_ext.ptr(timesteps),
        ts_dtype=-1 if timesteps is None else _TS_CODES[timesteps.dtype],
        ts_stride=0 if timesteps is None or timesteps.numel() == 1 else 1, guidance=_ext.ptr(guidance),
        model_scale=_ext.ptr(model_scale), threshold=_ext.ptr(threshold), batch=B,
        n=sample.numel() // B if B else 0, rows=coef.shape[0], key=key, cfg=int(cfg),
        guidance_scale=float(guidance_scale), x0_mode=x0_mode, clip_range=float(clip_range), noise_mode=noise_mode,
        seed=seed % (2**63), offset=offset % (2**32), rng_offset=_ext.ptr(rng_offset), dtype=_ext.dtype_code(sample.dtype),
        noise_dtype=_ext.dtype_code(noise.dtype) if noise_mode == 1 else 0, device=device, stream=stream)


@STEP.register("cuda", supports=_cuda_supports)
def _step_cuda(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance,
               model_scale, x0_mode, clip_range, threshold, history, read_history, noise, noise_mode, seed, offset,
               rng_offset, write_x0):
    out = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if write_x0 else sample.new_empty(0)
    if sample.numel() == 0:
        return out, x0
    device = sample.device.index if sample.device.index is not None else torch.cuda.current_device()
    _ext.C.diffusion_step(**_cuda_args(sample, model_output, coef, key, timesteps, guidance, model_scale, threshold,
                                       noise, noise_mode, cfg, guidance_scale, x0_mode, clip_range, seed, offset,
                                       rng_offset, out, x0 if write_x0 else None, device, _ext.stream_of(sample)))
    return out, x0


# timestep dtypes the CUDA kernel reads (codes shared with csrc/diffusion.cu)
_TS_CODES = {torch.float32: 0, torch.int64: 1, torch.int32: 2, torch.float64: 3}


def _step_fake(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance,
               model_scale, x0_mode, clip_range, threshold, history, read_history, noise, noise_mode, seed, offset,
               rng_offset, write_x0, backend):
    return torch.empty_like(sample), (torch.empty_like(sample) if write_x0 else sample.new_empty(0))


@custom_op("diffusion_step", mutates_args=("history",), fake=_step_fake)
def _step_op(sample: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor, key: int,
             timesteps: Optional[torch.Tensor], schedule_timesteps: Optional[torch.Tensor], cfg: bool,
             guidance_scale: float, guidance: Optional[torch.Tensor], model_scale: Optional[torch.Tensor],
             x0_mode: int, clip_range: float, threshold: Optional[torch.Tensor], history: Optional[torch.Tensor],
             read_history: bool, noise: Optional[torch.Tensor], noise_mode: int, seed: int, offset: int,
             rng_offset: Optional[torch.Tensor], write_x0: bool, backend: str) -> tuple[torch.Tensor, torch.Tensor]:
    return STEP.impl(backend)(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale,
                              guidance, model_scale, x0_mode, clip_range, threshold, history, read_history, noise,
                              noise_mode, seed, offset, rng_offset, write_x0)


def _select(args: tuple, backend: str | None) -> str:
    """STEP.select, memoized on what the supports functions read (devices, dtypes, layouts, which inputs exist)."""
    tensors = (args[0], args[1], args[2], args[4], args[5], args[8], args[9], args[12], args[13], args[15], args[19])
    key = tuple(None if t is None else (t.device, t.dtype, t.is_contiguous()) for t in tensors)
    return STEP.select_cached(key, *args, backend=backend)


def diffusion_step(sample: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor, key: int,
                   timesteps: torch.Tensor | None, schedule_timesteps: torch.Tensor | None, *, cfg: bool = False,
                   guidance_scale: float = 0.0, guidance: torch.Tensor | None = None, guidance_rescale: float = 0.0,
                   x0_mode: int = 0, clip_range: float = 1.0, threshold_ratio: float = 0.995,
                   threshold_max: float = 1.0, history: torch.Tensor | None = None, read_history: bool = False,
                   noise: torch.Tensor | None = None, noise_mode: int = 0, seed: int = 0, offset: int = 0,
                   rng_offset: torch.Tensor | None = None, write_x0: bool = False,
                   backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One fused scheduler step for a batch of samples; returns (prev_sample, x0 or an empty tensor).

    Arguments as ``seqgen_fast.reference.diffusion.diffusion_step``, plus ``guidance_rescale`` (r of
    diffusers' ``rescale_noise_cfg``; 0 = off) and ``threshold_ratio``/``threshold_max`` (dynamic
    thresholding, x0_mode 2). ``coef`` is a (rows, 8) float32 table on the samples' device.
    ``rng_offset`` (a 1-element int64 tensor on the device, or None) is added to ``offset`` where the
    noise is drawn, on the device: the offset a captured CUDA graph reads at each replay.
    """
    B = sample.shape[0]
    if cfg and model_output.shape[0] != 2 * B:
        raise ValueError(f"model_output: guidance needs the (2B, ...) batch, "
                         f"got {model_output.shape[0]} rows for B={B}")
    model_scale = None
    if guidance_rescale:
        model_scale = ref.rescale_factor(model_output, B, guidance_scale, guidance, guidance_rescale)
    threshold = None
    if x0_mode == 2:
        pre = noise.to(torch.float32) if (noise_mode == 1) else None
        x0 = ref.predict_x0(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale,
                            guidance, model_scale, pre)
        threshold = ref.threshold_scale(x0, threshold_ratio, threshold_max)
    args = (sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance,
            model_scale, x0_mode, clip_range, threshold, history, read_history, noise, noise_mode, seed, offset,
            rng_offset, write_x0)
    chosen = _select(args, backend)
    if torch.compiler.is_compiling():
        return _step_op(*args, chosen)
    # Eager calls skip the torch.library dispatcher: its argument handling alone costs hundreds of
    # microseconds of host time for this 21-argument op, more than the step itself. Same function.
    return STEP.impl(chosen)(*args)


# ----------------------------------------------------------------------------------------------
# Self-checks against diffusers' own step (CPU and GPU)
# ----------------------------------------------------------------------------------------------
def _check_against_diffusers(cls_name: str, config: dict, device, dtype, cfg=False, index=4):
    import diffusers

    from ..diffusion.schedulers import fast_scheduler

    theirs = getattr(diffusers, cls_name)(**config)
    ours = fast_scheduler(getattr(diffusers, cls_name)(**config))
    theirs.set_timesteps(20)
    ours.set_timesteps(20)
    x = torch.randn(3, 4, 8, 8, device=device, dtype=dtype)
    mo = torch.randn((6 if cfg else 3), 4, 8, 8, device=device, dtype=dtype)
    t = theirs.timesteps[index]
    if hasattr(theirs, "set_begin_index"):
        theirs.set_begin_index(index)
        ours.set_begin_index(index)
    theirs.scale_model_input(x, t)  # as a pipeline does (Euler asks for it before step)
    ours.scale_model_input(x, t)
    g = 5.0
    guided = (mo[:3] + g * (mo[3:] - mo[:3])) if cfg else mo
    want = theirs.step(guided.double(), t, x.double()).prev_sample
    got = ours.step(mo, t, x, guidance_scale=g if cfg else None).prev_sample
    return {"prev_sample": (got, want)}


@register_check("diffusion_ddim_cfg", dtypes=(torch.float32, torch.float16))
def _check_ddim(device, dtype):
    return _check_against_diffusers("DDIMScheduler", {}, device, dtype, cfg=True)


@register_check("diffusion_ddpm", dtypes=(torch.float32, torch.float16))
def _check_ddpm(device, dtype):
    # the last step (t = 0) draws no noise, so diffusers' result is deterministic
    return _check_against_diffusers("DDPMScheduler", {"prediction_type": "v_prediction"}, device, dtype, index=19)


@register_check("diffusion_euler", dtypes=(torch.float32, torch.float16))
def _check_euler(device, dtype):
    return _check_against_diffusers("EulerDiscreteScheduler", {}, device, dtype)


@register_check("diffusion_dpmsolver", dtypes=(torch.float32, torch.float16))
def _check_dpm(device, dtype):
    return _check_against_diffusers("DPMSolverMultistepScheduler", {}, device, dtype, cfg=True)
