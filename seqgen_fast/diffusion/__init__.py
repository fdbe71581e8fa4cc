"""Fused diffusion scheduler steps: ``fast_scheduler(scheduler)`` wraps a diffusers scheduler,
``sample(...)`` runs a (CUDA-graph capturable) sampling loop (names from the family manifest)."""
from .._families import exports
from .._lazy import lazy_getattr

_EXPORTS = exports(__name__)
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
