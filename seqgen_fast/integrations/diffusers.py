"""diffusers pipelines on seqgen_fast: :func:`accelerate` gives a pipeline the fused scheduler steps.

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(...)
    seqgen_fast.integrations.diffusers.accelerate(pipe)

diffusers itself is not imported here: the pipeline brings it.
"""
from __future__ import annotations


def accelerate(pipe, **options):
    """Replace ``pipe.scheduler`` by ``seqgen_fast.diffusion.fast_scheduler(pipe.scheduler, **options)``
    (in place) and return ``pipe``. A scheduler that is already fused is left as it is; an
    unsupported scheduler class or option raises as ``fast_scheduler`` does, naming it."""
    from ..diffusion.schedulers import fast_scheduler

    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise TypeError(f"accelerate: {type(pipe).__name__} has no scheduler attribute (expected a diffusers "
                        "pipeline)")
    pipe.scheduler = fast_scheduler(scheduler, **options)
    return pipe
