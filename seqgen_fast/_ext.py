"""The compiled CUDA extension ``seqgen_fast._C``, if it was built, and helpers to call it.

``C`` is the module or None; ``reason`` says why it is missing. Launchers pass raw pointers,
sizes, strides and the stream as integers (the extension knows nothing of libtorch).
"""
from __future__ import annotations

import torch

from ._contract import DTYPE_CODES

try:
    from . import _C as C  # type: ignore[attr-defined]

    reason: str | None = None
except ImportError as exc:  # not built: SEQGEN_FAST_SKIP_CUDA, no nvcc at install, or a broken build
    C = None
    reason = (f"seqgen_fast._C is not built ({exc}); reinstall with nvcc on PATH "
              "(pip install -e . --no-build-isolation) and SEQGEN_FAST_SKIP_CUDA unset")


def dtype_code(dtype: torch.dtype) -> int:
    """The storage dtype code of ``csrc/common.cuh`` (``enum DType``) for ``dtype``."""
    return DTYPE_CODES[dtype]


def device_index(t: torch.Tensor) -> int:
    """The CUDA device index of ``t`` (the current device for a bare ``cuda`` device)."""
    return t.device.index if t.device.index is not None else torch.cuda.current_device()


def ptr(t: torch.Tensor | None) -> int:
    """Device address of ``t`` (0 for None)."""
    return 0 if t is None else t.data_ptr()


_INFO: dict[int, dict] = {}


def device_info(device: torch.device | int | None = None) -> dict:
    """Cached ``cudaGetDeviceProperties`` facts for ``device`` (launch heuristics use these).

    Served by ``_C.device_info`` when the extension is built, else from torch's properties.
    """
    if device is None:
        device = torch.cuda.current_device()
    index = device if isinstance(device, int) else (device.index if device.index is not None else torch.cuda.current_device())
    if index not in _INFO:
        if C is not None:
            _INFO[index] = dict(C.device_info(index))
        else:
            p = torch.cuda.get_device_properties(index)
            _INFO[index] = {"name": p.name, "major": p.major, "minor": p.minor,
                            "multiprocessor_count": p.multi_processor_count,
                            "l2_cache_size": getattr(p, "L2_cache_size", 0)}
    return _INFO[index]
