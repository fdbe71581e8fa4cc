"""The one registration pattern for seqgen_fast ops (every kernel family uses it).

An op is a typed Python function turned into ``torch.ops.seqgen_fast.<name>`` by
``torch.library.custom_op``, with a fake (meta) implementation for ``torch.compile`` and, when
differentiable, a backward registered with ``register_autograd``. The op is opaque to the
compiler and to CUDA-graph capture alike, so one call = one graph node.

Backend choice happens *before* the op, in Python (``seqgen_fast._backend.Dispatcher.select``),
and the chosen name travels into the op as its ``backend: str`` argument; the op body runs
``dispatcher.impl(backend)(...)``. That keeps the reasons-reporting dispatch out of traced code
and makes the backend part of the op's recorded arguments.

Autocast: each op states how it casts under ``torch.autocast`` (``autocast=``, one
:data:`AutocastPolicy`: the rule of the torch op it replaces, per device type), registered on the
op's ``Autocast<Device>`` dispatch keys; the public functions built on ops take the same policy
through :func:`autocast_as`, so they cast once on entry, before backend selection and the input
checks see the dtypes. The rules are torch's (``aten/src/ATen/autocast_mode.cpp``):

* :data:`LOWER` (torch's ``lower_precision_fp``): floating inputs other than float64 are cast to
  ``torch.get_autocast_dtype(device)``, read at each call;
* a ``torch.dtype``: cast to that dtype whatever the autocast dtype (the cuDNN RNN wrapper of
  ``aten/src/ATen/cudnn/AutocastRNN.cpp`` casts to float16 also under a bfloat16 autocast);
* :data:`KEEP` (ops torch does not autocast: the default): no cast.

In every case the body runs with autocast off, so the op computes in the dtypes it was given
(``torch.library.register_autocast`` does the same for a fixed dtype only; the ``LOWER`` rule needs
the dtype of the enclosing autocast region, hence a kernel of our own on the same keys).

    @custom_op("lstm_cell_fwd", fake=_cell_fake, backward=_cell_bwd, setup_context=_cell_ctx)
    def lstm_cell_fwd(gates: Tensor, c: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        return CELL.impl(backend)(gates, c)
"""
from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable, Mapping

import torch

NAMESPACE = "seqgen_fast"
_OPS: dict[str, object] = {}
_LIB = torch.library.Library(NAMESPACE, "IMPL")  # the autocast kernels' registrations (kept alive here)

LOWER = "lower_precision_fp"
KEEP = "keep"
AutocastPolicy = Mapping[str, str | torch.dtype]  # device type -> LOWER, KEEP or a dtype; absent: KEEP
AUTOCAST_DEVICES = ("cpu", "cuda")

# torch's rules for the ops ours replace (the lists of aten/src/ATen/autocast_mode.cpp)
SDPA_AUTOCAST: AutocastPolicy = {"cpu": LOWER, "cuda": LOWER}  # scaled_dot_product_attention: both lists
RNN_CELL_AUTOCAST: AutocastPolicy = {"cuda": LOWER}            # lstm_cell, gru_cell: the CUDA list only
CUDNN_RNN_AUTOCAST: AutocastPolicy = {"cuda": torch.float16}   # _cudnn_rnn's wrapper (AutocastRNN.cpp)


def autocast_target(policy: AutocastPolicy, device_type: str) -> torch.dtype | None:
    """The dtype ``policy`` casts floating inputs on ``device_type`` to now; None: no cast (autocast
    off for that device type, or the rule is :data:`KEEP`)."""
    if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
        return None
    rule = policy.get(device_type, KEEP)
    if rule == KEEP:
        return None
    return torch.get_autocast_dtype(device_type) if rule == LOWER else rule


def _cast(value, device_type: str, dtype: torch.dtype):
    """``value`` with every floating tensor on ``device_type`` except float64 cast to ``dtype``,
    through lists and tuples (torch's autocast eligibility rule)."""
    if isinstance(value, torch.Tensor):
        eligible = value.is_floating_point() and value.device.type == device_type and value.dtype != torch.float64
        return value.to(dtype) if eligible else value
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, device_type, dtype) for v in value)
    return value


def _device_type(args, kwargs) -> str | None:
    """The device type of the first tensor among the arguments (through lists and tuples)."""
    for value in (*args, *kwargs.values()):
        if isinstance(value, torch.Tensor):
            return value.device.type
        if isinstance(value, (list, tuple)):
            found = _device_type(value, {})
            if found is not None:
                return found
    return None


def _autocast_call(fn: Callable, policy: AutocastPolicy, names: tuple[str, ...], keep: frozenset, device_type: str,
                   args: tuple, kwargs: dict):
    """``fn`` on the arguments cast by ``policy`` (all but those named in ``keep``; ``names``: the
    names of the positional parameters), with autocast off for ``device_type``."""
    dtype = autocast_target(policy, device_type)
    if dtype is not None:
        args = tuple(a if name in keep else _cast(a, device_type, dtype) for name, a in zip(names, args))
        kwargs = {k: v if k in keep else _cast(v, device_type, dtype) for k, v in kwargs.items()}
    with torch.autocast(device_type, enabled=False):
        return fn(*args, **kwargs)


def autocast_as(policy: AutocastPolicy | Callable[..., AutocastPolicy], *, keep: Iterable[str] = ()):
    """Decorator of a public function: under ``torch.autocast`` for the device of its first tensor
    argument, cast its arguments by ``policy`` (or by ``policy(*args, **kwargs)`` where the rule
    depends on them), except those named in ``keep``, and run it with autocast off; outside
    autocast, call it unchanged."""
    keep = frozenset(keep)

    def deco(fn: Callable):
        names = tuple(inspect.signature(fn).parameters)

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            device_type = _device_type(args, kwargs)
            if device_type not in AUTOCAST_DEVICES or not torch.is_autocast_enabled(device_type):
                return fn(*args, **kwargs)
            rule = policy(*args, **kwargs) if callable(policy) else policy
            return _autocast_call(fn, rule, names, keep, device_type, args, kwargs)

        return wrapper

    return deco


def _register_autocast(name: str, op, policy: AutocastPolicy, keep: frozenset) -> None:
    """``op``'s kernel on the ``Autocast<Device>`` keys: cast by ``policy``, then the op again with
    autocast off (so the dispatcher passes that key by)."""
    names = tuple(a.name for a in op._opoverload._schema.arguments)
    for device_type in AUTOCAST_DEVICES:
        def kernel(*args, device_type=device_type, **kwargs):
            return _autocast_call(op, policy, names, keep, device_type, args, kwargs)

        _LIB.impl(name, kernel, "Autocast" + torch._C._dispatch_key_for_device(device_type))


def custom_op(name: str, *, mutates_args: Iterable[str] | str = (), fake: Callable | None = None,
              backward: Callable | None = None, setup_context: Callable | None = None,
              autocast: AutocastPolicy | None = None, autocast_keep: Iterable[str] = ()):
    """Decorator: define ``torch.ops.seqgen_fast.<name>`` from ``fn`` and register its parts.

    ``fake(*args)`` returns empty tensors of the output shapes (needed by torch.compile and
    ``torch.library.opcheck``); ``backward``/``setup_context`` follow
    ``torch.library.register_autograd``; ``autocast`` is the op's rule under ``torch.autocast``
    (see the module docstring; default: :data:`KEEP` everywhere), ``autocast_keep`` the arguments
    it never casts (e.g. float32 by contract). Mutated arguments are never cast
    (a cast copy would take the writes), so a mutating op must keep :data:`KEEP`.
    """
    if (backward is None) != (setup_context is None):
        raise ValueError(f"custom_op {name!r}: give both backward and setup_context, or neither")
    if autocast and mutates_args and any(rule != KEEP for rule in autocast.values()):
        raise ValueError(f"custom_op {name!r}: an op that mutates its arguments cannot cast them under autocast")

    def deco(fn: Callable):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn)
        if fake is not None:
            op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        _register_autocast(name, op, autocast or {}, frozenset(autocast_keep))
        _OPS[name] = op
        return op

    return deco


def registered_ops() -> dict[str, object]:
    """Every op defined through :func:`custom_op` so far (for ``opcheck`` tests)."""
    return dict(_OPS)
