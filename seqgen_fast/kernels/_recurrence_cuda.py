"""What the ``_C`` launchers of the recurrent families share (``kernels.lstm_cuda``, ``kernels.gru_cuda``):
both run csrc/recurrence.cuh's persistent kernels and one-launch step, so they pick the product the
same way, declare the same capabilities, check arguments alike and plan a launch through the same
``_C.<family>_sequence_check``.

* The product (``math``, csrc/recurrence.h): :func:`sequence_math` for the persistent kernels
  (tensor cores; float32 on TF32 under ``torch.backends.cudnn.allow_tf32``, what cuDNN's RNNs
  follow, else exact FFMA), :func:`cell_math` for the one-launch step (float32 on TF32 only under
  ``torch.backends.cuda.matmul.allow_tf32``, as nn.LSTMCell / nn.GRUCell's cuBLAS GEMMs).
* :func:`cached_check`: the plan a launch on a stream meets, one ``_C`` query per (device, stream,
  sizes) -- each family wraps it in its own ``launch_plan`` under
  ``torch.compiler.assume_constant_result`` (a constant of the trace, never a guard).
* Reasons (:func:`basic_reasons`, :func:`shape_reason`, :func:`size_reasons`) for the ``supports_*``
  functions, and the launchers' checks of preallocated outputs, upstream gradients and overlaps.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch

from .. import _ext
from .._backend import Capabilities

__all__ = ["CAPS", "MATH_MMA", "MATH_FFMA", "sequence_math", "cell_math", "basic_reasons", "shape_reason",
           "size_reasons", "device_plan", "current_stream", "cached_check", "plan_key", "zeroed_flags", "check_out",
           "overlaps", "refuse_overlaps", "grad_arg"]

CAPS = Capabilities("cuda", dtypes=(torch.float32, torch.float16, torch.bfloat16))
MATH_MMA, MATH_FFMA = 0, 1  # csrc/recurrence.h enum Math


def sequence_math(dtype: torch.dtype) -> int:
    """The persistent kernels' product for ``dtype``: exact fp32 FFMA for float32 when
    ``torch.backends.cudnn.allow_tf32`` is False, else tensor cores (TF32 for float32)."""
    return MATH_FFMA if dtype == torch.float32 and not torch.backends.cudnn.allow_tf32 else MATH_MMA


def cell_math(dtype: torch.dtype) -> int:
    """The cell step's product for ``dtype``: as the cell modules' GEMMs, TF32 for float32 only when
    ``torch.backends.cuda.matmul.allow_tf32``; tensor cores for the half types."""
    return MATH_FFMA if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32 else MATH_MMA


def basic_reasons(tensors: dict[str, torch.Tensor | None]) -> list[str]:
    """Extension, device and dtype reasons shared by every kernel (None entries are skipped)."""
    present = {k: t for k, t in tensors.items() if t is not None}
    if _ext.C is None:
        return [_ext.reason]
    reasons = CAPS.reasons(*present.values())
    if len({t.dtype for t in present.values()}) > 1:
        reasons.append("mixed dtypes: " + ", ".join(f"{k} {t.dtype}" for k, t in present.items()))
    return reasons


def shape_reason(name: str, t: torch.Tensor | None, shape: tuple[int, ...]) -> list[str]:
    """[] when ``t`` (None: absent, nothing to check) has ``shape``, else the reason naming it."""
    if t is None or tuple(t.shape) == tuple(shape):
        return []
    return [f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}"]


def size_reasons(sizes: dict[str, int]) -> list[str]:
    """[] when every size fits the kernels' int sizes (csrc's ``require_size``: each below 2^31; the
    offsets built from them are 64-bit), else a reason naming each one that does not."""
    return [f"{name} = {v} is past the cuda kernels' 32-bit sizes (at most 2^31 - 1)"
            for name, v in sizes.items() if v >= 2 ** 31]


def device_plan(plan: Callable[..., dict], dtype: torch.dtype, hidden: int, batch: int, backward: bool,
                device_facts: dict, math: int | None) -> dict:
    """``plan`` (a ``_C.<family>_sequence_plan``, a pure host computation) for a device with
    ``device_facts`` (``_ext.device_info`` keys ``multiprocessor_count`` and
    ``shared_memory_per_block_optin``) as a dict; ``math`` defaults to :func:`sequence_math` of ``dtype``."""
    math = sequence_math(dtype) if math is None else math
    return dict(plan(_ext.dtype_code(dtype), int(hidden), int(batch), bool(backward), math,
                     int(device_facts["multiprocessor_count"]), int(device_facts["shared_memory_per_block_optin"])))


def current_stream(device: int) -> int:
    """The current torch stream of CUDA device ``device`` as an integer handle (what the kernels run on)."""
    return torch.cuda.current_stream(device).cuda_stream


def cached_check(cache: dict, check: Callable[..., dict], stream: int, device: int, dtype_code: int, hidden: int,
                 batch: int, backward: bool, math: int) -> dict:
    """``check(device, dtype_code, hidden, batch, backward, math, stream)`` (a ``_C.<family>_sequence_check``)
    as a dict, memoized in ``cache`` per (device, stream, sizes); the cache is cleared past 1024 entries."""
    key = (device, stream, dtype_code, hidden, batch, backward, math)
    plan = cache.get(key)
    if plan is None:
        if len(cache) >= 1024:
            cache.clear()
        plan = cache[key] = dict(check(device, dtype_code, hidden, batch, backward, math, stream))
    return plan


def plan_key(t: torch.Tensor, hidden: int, batch: int, backward: bool) -> tuple[int, int, int, int, bool, int]:
    """A family ``launch_plan``'s arguments for a layer of ``t``'s device and dtype. ``operator.index``:
    shapes become Python ints (a symbolic size is specialised, a guard, not a graph break)."""
    return (_ext.device_index(t), _ext.dtype_code(t.dtype), operator.index(hidden), operator.index(batch), backward,
            sequence_math(t.dtype))


def zeroed_flags(plan: dict, like: torch.Tensor) -> torch.Tensor:
    """The zeroed handoff flags of one launch of ``plan`` (one uint32 word per block)."""
    return torch.zeros(plan["blocks"], dtype=torch.int32, device=like.device)


def check_out(what: str, name: str, t: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...],
              dtype: torch.dtype) -> torch.Tensor:
    """``t`` when it can be the output ``name`` (contiguous, of ``shape`` and ``dtype`` on ``like``'s
    device), else ValueError."""
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"{what}: out {name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on "
                         f"{like.device} (got {t.dtype} {tuple(t.shape)} on {t.device})")
    return t


def overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the (contiguous) storage spans of ``a`` and ``b`` intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


def refuse_overlaps(what: str, outs: dict[str, torch.Tensor], inputs: dict[str, torch.Tensor | None]) -> None:
    """ValueError when an output overlaps an input or another output: a kernel that reads all its
    inputs while writing needs separate buffers."""
    for name, o in outs.items():
        for iname, i in inputs.items():
            if i is not None and overlaps(o, i):
                raise ValueError(f"{what}: out {name} overlaps input {iname}; the kernel reads all inputs while "
                                 "writing, so outputs must be separate buffers")
    names = list(outs)
    for k, a in enumerate(names):
        for b in names[k + 1:]:
            if overlaps(outs[a], outs[b]):
                raise ValueError(f"{what}: out {a} and {b} overlap")


def grad_arg(what: str, g: torch.Tensor | None, name: str, shape: tuple[int, ...],
             like: torch.Tensor) -> torch.Tensor | None:
    """An upstream gradient as a contiguous tensor in ``like``'s dtype (None stays None: zeros)."""
    if g is None:
        return None
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"{what}: {name} has shape {tuple(g.shape)}, expected {tuple(shape)}")
    if g.device != like.device:
        raise ValueError(f"{what}: {name} is on {g.device}, expected {like.device}")
    return g.to(like.dtype).contiguous()
