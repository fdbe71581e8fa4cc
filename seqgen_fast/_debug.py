"""Host-side debug checks: off by default, so no op syncs the host on its hot path.

Checks that need the *values* of device tensors (lengths, page indices, batch indices in range)
cost a device-to-host copy and cannot run inside a CUDA-graph capture. By default the kernels
instead clamp every such value on the device (a bad value gives a wrong row, never an access
outside a buffer). Turn the host checks on to get a clear ``ValueError`` instead:

    seqgen_fast.debug_checks()            # on from now on (debug_checks(False): off again)
    with seqgen_fast.debug_checks():      # on inside the block, the previous state after it
        ...

or set the environment variable ``SEQGEN_FAST_DEBUG_CHECKS=1`` (read at each call). They are
skipped while a CUDA graph is being captured. Shapes, dtypes and devices are always checked
(that needs no sync). :func:`host_reads_allowed` is the one test of "may this code read a
tensor's values on the host now", for these checks and for the few eager-mode ones that run
always (varlen offsets).
"""
from __future__ import annotations

import os

import torch

ENV_VAR = "SEQGEN_FAST_DEBUG_CHECKS"
_STATE = [False]  # the switch of debug_checks() (a list: one mutable cell, no global statement)


class _Restore:
    """What ``debug_checks()`` returns: leaving its ``with`` block restores the previous state."""

    def __init__(self, previous: bool):
        self._previous = previous

    def __enter__(self) -> "_Restore":
        return self

    def __exit__(self, *exc) -> None:
        _STATE[0] = self._previous


def debug_checks(enabled: bool = True) -> _Restore:
    """Turn the host-side value checks on (or off with ``enabled=False``); usable as a ``with`` block."""
    previous = _STATE[0]
    _STATE[0] = bool(enabled)
    return _Restore(previous)


def enabled() -> bool:
    """Whether host-side value checks run: :func:`debug_checks` or ``SEQGEN_FAST_DEBUG_CHECKS``."""
    return _STATE[0] or os.environ.get(ENV_VAR, "").strip() not in ("", "0")


def host_reads_allowed(t: torch.Tensor) -> bool:
    """Whether reading ``t``'s values on the host (``.tolist()``, ``.item()``, ``bool(t.any())``) is
    possible here: not while ``torch.compile`` traces (the read would break the graph, and the
    value would be baked into it) and not while a CUDA graph is being captured on the current
    stream (a device-to-host copy is illegal there)."""
    if torch.compiler.is_compiling():
        return False
    return not (t.device.type == "cuda" and torch.cuda.is_current_stream_capturing())
