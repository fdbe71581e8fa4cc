"""Drop-in modules with the exact constructor, parameters, state_dict and forward of torch's
(names from the family manifest, ``seqgen_fast._families``; each loads on first use)."""
from .._families import exports
from .._lazy import lazy_getattr

_EXPORTS = exports(__name__)
__all__ = sorted(_EXPORTS)
__getattr__ = lazy_getattr(__name__, _EXPORTS)
