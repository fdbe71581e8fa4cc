"""Which diffusers schedulers ``fast_scheduler`` steps, and diffusers' noise draw.

This is data about diffusers' classes; nothing here imports diffusers (the user's scheduler object
brings its classes along). A scheduler class maps to a step *kind* through the first class of its
MRO that is one of diffusers' own supported classes (so subclasses are accepted); a subclass that
overrides the step's math (``step`` or a helper it calls) is refused, naming the method, since the
fused kernels reproduce diffusers' math only.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Kind:
    name: str          # the step kind
    output: str        # the output dataclass in the scheduler's module
    aux: str | None    # the output field of the step's second result (pred_original_sample, denoised)
    math: tuple[str, ...] = ()  # methods whose override changes the math (besides step)


KINDS = {
    "DDPMScheduler": Kind("ddpm", "DDPMSchedulerOutput", "pred_original_sample",
                          ("_get_variance", "_threshold_sample", "previous_timestep")),
    "DDIMScheduler": Kind("ddim", "DDIMSchedulerOutput", "pred_original_sample", ("_get_variance", "_threshold_sample")),
    "EulerDiscreteScheduler": Kind("euler", "EulerDiscreteSchedulerOutput", "pred_original_sample"),
    "EulerAncestralDiscreteScheduler": Kind("euler_ancestral", "EulerAncestralDiscreteSchedulerOutput",
                                            "pred_original_sample"),
    "DPMSolverMultistepScheduler": Kind("dpm", "SchedulerOutput", None, (
        "convert_model_output", "dpm_solver_first_order_update", "multistep_dpm_solver_second_order_update",
        "multistep_dpm_solver_third_order_update", "_sigma_to_alpha_sigma_t", "_threshold_sample")),
    "UniPCMultistepScheduler": Kind("unipc", "SchedulerOutput", None, (
        "convert_model_output", "multistep_uni_p_bh_update", "multistep_uni_c_bh_update", "_sigma_to_alpha_sigma_t",
        "_threshold_sample")),
    "LCMScheduler": Kind("lcm", "LCMSchedulerOutput", "denoised",
                         ("get_scalings_for_boundary_condition_discrete", "_threshold_sample")),
    "FlowMatchEulerDiscreteScheduler": Kind("flow", "FlowMatchEulerDiscreteSchedulerOutput", None),
}


def base_class(cls: type) -> type:
    """The diffusers class of ``KINDS`` that ``cls`` is (or derives from); TypeError naming ``cls`` otherwise,
    or naming the overridden method when a subclass changes the step's math."""
    base = next((c for c in cls.__mro__ if c.__name__ in KINDS and c.__module__.startswith("diffusers.")), None)
    if base is None:
        raise TypeError(f"fast_scheduler: scheduler {cls.__name__} is not supported by seqgen_fast.diffusion; "
                        f"supported: {', '.join(KINDS)} and their subclasses")
    for name in ("step",) + KINDS[base.__name__].math:
        if getattr(cls, name, None) is not getattr(base, name, None):
            raise TypeError(f"fast_scheduler: {cls.__name__} overrides {base.__name__}.{name}; the fused step "
                            "reproduces diffusers' own math only")
    return base


def kind_of(base: type) -> Kind:
    return KINDS[base.__name__]


def output_class(base: type):
    """The diffusers output dataclass that ``base.step`` returns (from the scheduler's own module)."""
    return getattr(sys.modules[base.__module__], KINDS[base.__name__].output)


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


GENERATOR_STREAM = 1 << 63  # the offset bit of streams keyed by a caller's CUDA generator


def cuda_normal_increment(numel: int, device: torch.device) -> int:
    """How far ``torch.randn`` of ``numel`` float32 elements advances a CUDA generator's Philox offset
    (ATen's ``calc_execution_policy``: 256-thread blocks, at most one wave of them, 4 normals per
    curand call and 4 engine calls)."""
    if numel <= 0:
        return 0
    props = torch.cuda.get_device_properties(device)
    block = 256
    grid = min(props.multi_processor_count * (props.max_threads_per_multi_processor // block), -(-numel // block))
    return ((numel - 1) // (block * grid * 4) + 1) * 4


def generator_key(generator: torch.Generator, numel: int) -> tuple[int, int]:
    """(seed, offset) of an in-kernel Philox stream keyed by a CUDA ``generator``'s state, advancing the
    generator as a draw of ``numel`` normals would: the same state gives the same noise, another
    state other noise, and the generator moves on."""
    seed, offset = generator.initial_seed(), generator.get_offset()
    generator.set_offset(offset + cuda_normal_increment(numel, generator.device))
    return seed, GENERATOR_STREAM | offset
