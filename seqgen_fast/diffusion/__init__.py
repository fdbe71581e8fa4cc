"""Fused diffusion scheduler steps: ``fast_scheduler(scheduler)`` wraps a diffusers scheduler,
``sample(...)`` runs a (CUDA-graph capturable) sampling loop."""
from .._lazy import lazy_getattr

_EXPORTS = {
    "fast_scheduler": "seqgen_fast.diffusion.schedulers",
    "sample": "seqgen_fast.diffusion.sampling",
}
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
