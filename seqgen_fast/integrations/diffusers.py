"""diffusers integration: which schedulers ``seqgen_fast.diffusion.fast_scheduler`` can step, and with which options.

diffusers is imported lazily (here and nowhere else). A scheduler maps to a step *kind* by its
class name; :func:`validate` raises ``NotImplementedError`` naming the first configuration option
whose value the fused kernels do not reproduce (never a silent difference from diffusers).
"""
from __future__ import annotations

import importlib

# class name -> (step kind, diffusers module, output class)
KINDS = {
    "DDPMScheduler": ("ddpm", "diffusers.schedulers.scheduling_ddpm", "DDPMSchedulerOutput"),
    "DDIMScheduler": ("ddim", "diffusers.schedulers.scheduling_ddim", "DDIMSchedulerOutput"),
    "EulerDiscreteScheduler": ("euler", "diffusers.schedulers.scheduling_euler_discrete",
                               "EulerDiscreteSchedulerOutput"),
    "EulerAncestralDiscreteScheduler": ("euler_ancestral", "diffusers.schedulers.scheduling_euler_ancestral_discrete",
                                        "EulerAncestralDiscreteSchedulerOutput"),
    "DPMSolverMultistepScheduler": ("dpmsolver++", "diffusers.schedulers.scheduling_dpmsolver_multistep",
                                    "SchedulerOutput"),
}

# kind -> {option: allowed values (a tuple) or a predicate}
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
    """The diffusers output dataclass that ``scheduler.step`` returns."""
    _, module, cls = KINDS[type(scheduler).__name__]
    return getattr(importlib.import_module(module), cls)


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


def randn_like_diffusers(shape, generator, device, dtype):
    """Noise exactly as diffusers draws it (``diffusers.utils.torch_utils.randn_tensor``)."""
    from diffusers.utils.torch_utils import randn_tensor

    return randn_tensor(shape, generator=generator, device=device, dtype=dtype)
