"""The fused diffusion step as a torch.library op, its backends and dispatch.

``diffusion_step(...)`` (public, used by ``seqgen_fast.diffusion``) runs the reduction passes
that some options need, picks a backend (triton -> cuda -> reference) and calls
``torch.ops.seqgen_fast.diffusion_step``:

* guidance rescale: per-sample std of the conditional and guided outputs (one extra read of the
  2B model output, in PyTorch on the device) -> a (B,) factor the kernel multiplies m by;
* dynamic thresholding: x0 is computed once (PyTorch on the device), its per-sample quantile of
  |x0| taken by a sort -> a (B,) scale s the kernel clamps and divides x0 by.

Neither pass syncs the host, and every backend takes their results as inputs. The op is not
differentiable (sampling needs no gradient). Under torch.compile the public function calls the op
(one opaque graph node); eagerly it calls the chosen backend's implementation directly (the same
function the op runs), to keep the host cost of a step low. The row layout and the math are in
``seqgen_fast.reference.diffusion``.
"""
from __future__ import annotations

from typing import Optional

import torch

from .._backend import Capabilities, dispatcher
from .._contract import CPN, X0M, X0X
from ..kernels import diffusion_cuda
from ..reference import diffusion as ref
from ._library import custom_op

# Triton leads: its kernel covers all five schedulers and is verified under the interpreter, while the
# CUDA twin (DDPM/DDIM-style steps) has not yet run on a GPU; it serves when forced or when Triton
# cannot take the input. Both are memory-bound one-pass kernels, so the order costs no speed.
STEP = dispatcher("diffusion_step", order=("triton", "cuda", "reference"))
TRITON = Capabilities("triton", dtypes=(torch.float32, torch.float16, torch.bfloat16))
REFERENCE = Capabilities("reference", dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))

_LAYOUT = ("sample", "model_output", "coef", "timesteps", "guidance", "model_scale", "threshold", "history", "noise")


def _layout_reasons(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance,
                    model_scale, x0_mode, clip_range, threshold, history, read_history, noise, noise_mode, seed,
                    offset, rng_offset, write_x0) -> list[str]:
    """What both kernels need of the layout: contiguous tensors and an int64 ``rng_offset``."""
    tensors = (sample, model_output, coef, timesteps, guidance, model_scale, threshold, history, noise)
    why = [f"{name} is not contiguous" for name, t in zip(_LAYOUT, tensors) if t is not None and not t.is_contiguous()]
    if rng_offset is not None and rng_offset.dtype != torch.int64:
        why.append(f"rng_offset dtype {rng_offset.dtype} (the kernels read one int64)")
    return why


def _tensors(args) -> tuple:
    """The tensor arguments of a call, the sample first (what Capabilities.reasons reads)."""
    return tuple(args[i] for i in (0, 1, 2, 4, 5, 8, 9, 12, 13, 15, 19))


def _triton_supports(*args) -> list[str]:
    return TRITON.reasons(*_tensors(args)) or _layout_reasons(*args)


def _cuda_supports(*args) -> list[str]:
    return diffusion_cuda.supports(*args) or _layout_reasons(*args)


@STEP.register("triton", supports=_triton_supports, caps=TRITON)
def _step_triton(*args):
    from ..kernels import diffusion as k

    return k.diffusion_step(*args)


STEP.register("cuda", supports=_cuda_supports, caps=diffusion_cuda.CAPS)(diffusion_cuda.step)
STEP.register("reference", supports=lambda *args: REFERENCE.reasons(args[0]), caps=REFERENCE)(ref.diffusion_step)


# ----------------------------------------------------------------------------------------------
# Reduction passes (backend-neutral, in PyTorch on the samples' device, no host sync)
# ----------------------------------------------------------------------------------------------
def rescale_factor(model_output: torch.Tensor, batch: int, guidance_scale: float, guidance: torch.Tensor | None,
                   guidance_rescale: float) -> torch.Tensor:
    """Per-sample factor f of diffusers' ``rescale_noise_cfg``: rescaled m = f * m (a reduction pass).

    f_b = r * std(c_b) / std(m_b) + (1 - r), std over all non-batch dims (unbiased), computed in float32.
    """
    m = ref.guided(model_output, batch, True, guidance_scale, guidance, torch.float32)
    dims = list(range(1, m.dim()))
    std_text = model_output[batch:].float().std(dim=dims)
    std_cfg = m.std(dim=dims)
    return guidance_rescale * std_text / std_cfg + (1.0 - guidance_rescale)


def threshold_scale(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic-thresholding scale s_b = clamp(quantile(|x0_b|, ratio), 1, max_value), a (B,) float32 tensor.

    The quantile is torch.quantile's linear interpolation, written as a sort and a gather so it has
    no size limit and no host sync.
    """
    a = x0.float().reshape(x0.shape[0], -1).abs().sort(dim=1).values
    n = a.shape[1]
    pos = ratio * (n - 1)
    lo = int(pos)
    hi = min(lo + 1, n - 1)
    frac = pos - lo
    s = torch.lerp(a[:, lo], a[:, hi], torch.full_like(a[:, lo], frac))
    return s.clamp(min=1.0, max=max_value)


def predict_x0(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance,
               model_scale, noise_pre: torch.Tensor | None) -> torch.Tensor:
    """x0 before clipping (the input of the thresholding pass), in float32 (float64 for float64 inputs)."""
    dt = torch.float64 if sample.dtype == torch.float64 else torch.float32
    B = sample.shape[0]
    c = ref.gather_rows(coef, B, key, timesteps, schedule_timesteps).to(dt)
    m = ref.guided(model_output, B, cfg, guidance_scale, guidance, dt)
    if model_scale is not None:
        m = m * ref.bcast(model_scale.to(dt), m.dim())
    x = sample.to(dt)
    if noise_pre is not None:
        x = x + ref.bcast(c[:, CPN], x.dim()) * noise_pre.to(dt)
    return ref.bcast(c[:, X0X], x.dim()) * x + ref.bcast(c[:, X0M], x.dim()) * m


# ----------------------------------------------------------------------------------------------
# The op and the public step
# ----------------------------------------------------------------------------------------------
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
    key = tuple(None if t is None else (t.device, t.dtype, t.is_contiguous()) for t in _tensors(args))
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
        model_scale = rescale_factor(model_output, B, guidance_scale, guidance, guidance_rescale)
    threshold = None
    if x0_mode == 2:
        pre = noise.to(torch.float32) if (noise_mode == 1) else None
        x0 = predict_x0(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale,
                            guidance, model_scale, pre)
        threshold = threshold_scale(x0, threshold_ratio, threshold_max)
    args = (sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance,
            model_scale, x0_mode, clip_range, threshold, history, read_history, noise, noise_mode, seed, offset,
            rng_offset, write_x0)
    chosen = _select(args, backend)
    if torch.compiler.is_compiling():
        return _step_op(*args, chosen)
    # Eager calls skip the torch.library dispatcher: its argument handling alone costs hundreds of
    # microseconds of host time for this 21-argument op, more than the step itself. Same function.
    return STEP.impl(chosen)(*args)
