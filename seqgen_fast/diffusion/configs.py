"""Which diffusers schedulers ``fast_scheduler`` steps, with which options, and diffusers' noise draw.

This is data about diffusers' classes; nothing here imports diffusers (the user's scheduler object
brings its classes along). A scheduler maps to a step *kind* by its class name;
:func:`validate` raises ``NotImplementedError`` naming the first configuration option whose value
the fused kernels do not reproduce (never a silent difference from diffusers).
"""
from __future__ import annotations

import sys

import torch

# class name -> (step kind, name of the output dataclass in the scheduler's module)
KINDS = {
    "DDPMScheduler": ("ddpm", "DDPMSchedulerOutput"),
    "DDIMScheduler": ("ddim", "DDIMSchedulerOutput"),
    "EulerDiscreteScheduler": ("euler", "EulerDiscreteSchedulerOutput"),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", "EulerAncestralDiscreteSchedulerOutput"),
    "DPMSolverMultistepScheduler": ("dpmsolver++", "SchedulerOutput"),
}

# kind -> {option: allowed values}
_ALLOWED = {
    "ddpm": {"prediction_type": ("epsilon", "sample", "v_prediction"),
             "variance_type": ("fixed_small", "fixed_small_log", "fixed_large")},
    "ddim": {"prediction_type": ("epsilon", "sample", "v_prediction")},
    "euler": {"prediction_type": ("epsilon", "sample", "original_sample", "v_prediction")},
    "euler_ancestral": {"prediction_type": ("epsilon", "v_prediction")},
    "dpmsolver++": {"prediction_type": ("epsilon", "sample", "v_prediction"),
                    "algorithm_type": ("dpmsolver++", "sde-dpmsolver++"),
                    "solver_order": (1, 2),
                    "solver_type": ("midpoint", "heun"),
                    "variance_type": (None,),
                    "use_flow_sigmas": (False,)},
}


def step_kind(scheduler) -> str:
    """The step kind of a diffusers scheduler instance, or TypeError naming the class."""
    name = type(scheduler).__name__
    if name not in KINDS:
        raise TypeError(f"fast_scheduler: scheduler {name} is not supported by seqgen_fast.diffusion; "
                        f"supported: {', '.join(KINDS)}")
    return KINDS[name][0]


def output_class(scheduler):
    """The diffusers output dataclass that ``scheduler.step`` returns (from the scheduler's own module)."""
    return getattr(sys.modules[type(scheduler).__module__], KINDS[type(scheduler).__name__][1])


def validate(scheduler) -> str:
    """Raise ``NotImplementedError`` naming the unsupported option of ``scheduler``'s config; return its kind."""
    kind = step_kind(scheduler)
    cfg = scheduler.config
    for option, allowed in _ALLOWED[kind].items():
        value = cfg.get(option, allowed[0])
        if value not in allowed:
            raise NotImplementedError(
                f"{type(scheduler).__name__}({option}={value!r}) is not supported by seqgen_fast.diffusion: "
                f"option {option} (supported values: {', '.join(map(repr, allowed))})")
    return kind


def randn_like_diffusers(shape, generator, device, dtype) -> torch.Tensor:
    """Noise exactly as diffusers' ``randn_tensor`` draws it: on the generator's device (a CPU
    generator for CUDA samples draws on the CPU, then moves), one draw per sample from each
    generator of a list, and a CUDA generator for CPU samples refused."""
    device = torch.device(device)
    gens = generator if isinstance(generator, list) else [generator]
    gen_device = torch.device(gens[0].device)
    if gen_device.type != device.type and gen_device.type == "cuda":
        raise ValueError(f"generator: a {gen_device} generator cannot draw noise for {device} samples; "
                         "pass a generator on the samples' device or the CPU")
    rand_device = gen_device if gen_device.type != device.type else device
    if len(gens) == 1:
        return torch.randn(shape, generator=gens[0], device=rand_device, dtype=dtype).to(device)
    per = (1, *tuple(shape)[1:])
    return torch.cat([torch.randn(per, generator=gens[b], device=rand_device, dtype=dtype)
                      for b in range(shape[0])]).to(device)
