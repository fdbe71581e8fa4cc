"""``seqgen-fast check`` cases of the diffusion family.

* ``diffusion.step`` and ``diffusion.multistep``: the fused step on a random coefficient table
  against the project's reference step in float64 (no optional package): per-sample timesteps,
  guidance, x0 clipping, given noise, x0 output; then a timestep searched in a schedule, three
  history tensors, UniPC's corrected sample, dynamic thresholding and guidance rescale.
* ``diffusion.diffusers_*``: ``fast_scheduler`` against diffusers' own scheduler step, in float64
  on diffusers' side; they need diffusers (rows are "n/a" with the install hint without it).
"""
from __future__ import annotations

import torch

from .._contract import NCOEF
from ..ops.diffusion import diffusion_step
from . import register_check

_ROWS = 11
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _table(device) -> torch.Tensor:
    """A random (rows, NCOEF) coefficient table: every term of the step's affine map is exercised."""
    return (torch.rand(_ROWS, NCOEF, device=device) * 2.4 - 1.2).float()


def _run(tensors: dict, dtype, options: dict, outputs: dict):
    """The step on ``tensors`` (the data in ``dtype``, ``history`` a tuple) under the forced backend, and on
    float64 copies on the reference backend; returns {output name: (ours, reference)}."""
    data = ("sample", "model_output", "cond", "last", "noise")
    results = []
    for dt, backend in ((dtype, None), (torch.float64, "reference")):
        args = {k: (v.to(dt, copy=True) if k in data else v) for k, v in tensors.items()}
        if "history" in args:
            args["history"] = tuple(h.to(dt, copy=True) for h in args["history"])
        dts = {f"{name}_dtype": dt for name in outputs.values() if name != "out"}
        results.append(diffusion_step(**args, **options, **dts, backend=backend))
    index = {"out": 0, "aux": 1, "conv": 2, "xs": 3}
    return {label: (results[0][index[name]], results[1][index[name]]) for label, name in outputs.items()}


@register_check("diffusion.step", dtypes=_DTYPES)
def _check_step(device, dtype):
    B = 3
    mo = torch.randn(2 * B, 4, 9, 9, device=device)
    tensors = dict(sample=torch.randn(B, 4, 9, 9, device=device), model_output=mo[:B], cond=mo[B:],
                   coef=_table(device), timesteps=torch.tensor([2, 7, 10], device=device),
                   guidance=torch.tensor([1.0, 4.5, 7.5], device=device), noise=torch.randn(B, 4, 9, 9, device=device))
    options = dict(key=-1, schedule_timesteps=None, x0_mode=1, clip_range=1.5, noise_mode=1)
    return _run(tensors, dtype, options, {"prev_sample": "out", "x0": "aux"})


@register_check("diffusion.multistep", dtypes=_DTYPES)
def _check_multistep(device, dtype):
    B = 2
    schedule = torch.tensor([999.0, 850.0, 700.5, 500.0, 300.0, 120.0, 0.0], device=device)
    mo = torch.randn(2 * B, 3, 17, device=device)
    shape = (B, 3, 17)
    tensors = dict(sample=torch.randn(shape, device=device), model_output=mo[:B], cond=mo[B:],
                   coef=_table(device)[: len(schedule)], timesteps=schedule[[2, 5]], schedule_timesteps=schedule,
                   last=torch.randn(shape, device=device),
                   history=tuple(torch.randn(shape, device=device) for _ in range(3)))
    options = dict(key=-1, guidance_scale=6.0, guidance_rescale=0.7, x0_mode=2, threshold_ratio=0.9,
                   threshold_max=2.5)
    return _run(tensors, dtype, options, {"prev_sample": "out", "history": "conv", "last_sample": "xs"})


def _against_diffusers(cls_name: str, config: dict, device, dtype, cfg=False, index=4):
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
    if hasattr(theirs, "scale_model_input"):  # as a pipeline does (Euler asks for it before step)
        theirs.scale_model_input(x, t)
        ours.scale_model_input(x, t)
    g = 5.0
    guided = (mo[:3] + g * (mo[3:] - mo[:3])) if cfg else mo
    want = theirs.step(guided.double(), t, x.double()).prev_sample
    got = ours.step(mo, t, x, guidance_scale=g if cfg else None).prev_sample
    return {"prev_sample": (got, want)}


_DIFFUSERS = dict(dtypes=(torch.float32, torch.float16), requires=("diffusers",))


@register_check("diffusion.diffusers_ddim_cfg", **_DIFFUSERS)
def _check_ddim(device, dtype):
    return _against_diffusers("DDIMScheduler", {}, device, dtype, cfg=True)


@register_check("diffusion.diffusers_ddpm", **_DIFFUSERS)
def _check_ddpm(device, dtype):
    # the last step (t = 0) draws no noise, so diffusers' result is deterministic
    return _against_diffusers("DDPMScheduler", {"prediction_type": "v_prediction"}, device, dtype, index=19)


@register_check("diffusion.diffusers_euler", **_DIFFUSERS)
def _check_euler(device, dtype):
    return _against_diffusers("EulerDiscreteScheduler", {}, device, dtype)


@register_check("diffusion.diffusers_dpmsolver", **_DIFFUSERS)
def _check_dpm(device, dtype):
    return _against_diffusers("DPMSolverMultistepScheduler", {}, device, dtype, cfg=True)


@register_check("diffusion.diffusers_unipc", **_DIFFUSERS)
def _check_unipc(device, dtype):
    return _against_diffusers("UniPCMultistepScheduler", {}, device, dtype, cfg=True, index=0)


@register_check("diffusion.diffusers_flow", **_DIFFUSERS)
def _check_flow(device, dtype):
    return _against_diffusers("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, device, dtype, cfg=True)
