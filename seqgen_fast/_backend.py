"""Backends and dispatch.

Three backends compute every op:

* ``cuda``      -- kernels in ``csrc/`` bound through the pybind11 module ``seqgen_fast._C``;
* ``triton``    -- Triton kernels in ``seqgen_fast/kernels/``;
* ``reference`` -- plain PyTorch, the ground truth and the CPU path.

Each op owns a :class:`Dispatcher` that holds, per backend, an implementation and a
``supports(*args, **kwargs)`` function returning the reasons that backend cannot take these
inputs (an empty list when it can). Dispatch takes the first capable backend in the op's fixed
order; when none can, :class:`BackendError` lists every backend's reasons.

A backend is forced, in this order of precedence, by a ``backend=`` argument, by
``with seqgen_fast.use_backend(name):``, or by the environment variable
``SEQGEN_FAST_BACKEND`` (read at each call). A forced backend that cannot take an input raises
with its reasons; it is never silently replaced.
"""
from __future__ import annotations

import contextlib
import importlib.util
import os
import threading
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

BACKENDS = ("cuda", "triton", "reference")
ENV_VAR = "SEQGEN_FAST_BACKEND"

# Backends forced by `use_backend` blocks, innermost last, per thread. (A thread-local list rather than
# a ContextVar: torch.compile traces and guards thread-local reads, so public functions compile
# with fullgraph=True; under compilation the choice is made once at trace time.)
_local = threading.local()


def _stack() -> list[str]:
    if not hasattr(_local, "stack"):
        _local.stack = []
    return _local.stack


class BackendError(RuntimeError):
    """No backend (or not the forced one) can take these inputs; the message says why.

    ``reasons`` maps each backend tried to its list of reasons.
    """

    def __init__(self, message: str, reasons: dict[str, list[str]]):
        super().__init__(message)
        self.reasons = reasons


def _check_name(name: str, what: str) -> str:
    if name not in BACKENDS:
        raise ValueError(f"{what}: unknown backend {name!r}; expected one of {', '.join(BACKENDS)}")
    return name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Force backend ``name`` for every op called inside the ``with`` block."""
    stack = _stack()
    stack.append(_check_name(name, "use_backend"))
    try:
        yield
    finally:
        stack.pop()


def forced_backend(backend: str | None = None) -> str | None:
    """The backend forced for this call, if any: argument, then context manager, then env var."""
    if backend is not None:
        return _check_name(backend, "backend=")
    stack = getattr(_local, "stack", None)
    if stack:
        return stack[-1]
    env = os.environ.get(ENV_VAR, "").strip()
    return _check_name(env, ENV_VAR) if env else None


def interpret_mode() -> bool:
    """True when Triton kernels run in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# ----------------------------------------------------------------------------------------------
# Backend availability (the whole backend, independent of any input)
# ----------------------------------------------------------------------------------------------
_TRITON_PROBE: list[str | None] = []  # filled once (a plain cache: torch.compile traces it without warnings)


def _triton_import_error() -> str | None:
    if not _TRITON_PROBE:
        if importlib.util.find_spec("triton") is None:
            _TRITON_PROBE.append("the triton package is not installed")
        else:
            try:
                import triton.language  # noqa: F401
                _TRITON_PROBE.append(None)
            except Exception as exc:  # an import failure is a reason to report, not to crash on
                _TRITON_PROBE.append(f"importing triton failed: {exc}")
    return _TRITON_PROBE[0]


@torch.compiler.assume_constant_result
def _probe_backends() -> bool:
    """Runs every backend's availability probe (the triton import check fills a cache on first use),
    as a constant of the trace (see :meth:`Dispatcher.select`)."""
    for name in BACKENDS:
        backend_unavailable(name)
    return True


def backend_unavailable(name: str) -> str | None:
    """Why backend ``name`` cannot run at all on this machine, or None when it can."""
    if name == "reference":
        return None
    if name == "triton":
        err = _triton_import_error()
        if err:
            return err
        if not torch.cuda.is_available() and not interpret_mode():
            return "no CUDA device (set TRITON_INTERPRET=1 to run Triton kernels on the CPU interpreter)"
        return None
    if name == "cuda":
        from . import _ext

        if _ext.C is None:
            return _ext.reason
        if not torch.cuda.is_available():
            return "no CUDA device visible to torch"
        return None
    raise ValueError(name)


TRITON_MIN_CAPABILITY = (8, 0)  # Triton's NVIDIA floor (compute capability 8.0+)


@torch._dynamo.assume_constant_result
def device_capability(device: torch.device) -> tuple[int, int] | None:
    """(major, minor) of a CUDA device (``_ext.device_info``, cached; a constant under torch.compile), None
    for any other device: the one place the supports checks read it."""
    if device.type != "cuda":
        return None
    from . import _ext

    info = _ext.device_info(device)
    return int(info["major"]), int(info["minor"])


def device_reasons(name: str, *tensors: torch.Tensor | None) -> list[str]:
    """Reasons backend ``name`` cannot take tensors on their devices (an empty list when it can).

    ``cuda`` needs CUDA tensors. ``triton`` needs CUDA tensors of a GPU of compute capability 8.0 or
    newer (Triton's floor), or CPU tensors when it is forced under ``TRITON_INTERPRET=1``: in automatic
    dispatch CPU tensors go to ``reference``, since the interpreter is for tests, not speed.
    """
    if name == "reference":
        return []
    devices = {t.device.type for t in tensors if t is not None}
    if not devices:
        return []
    if len({t.device for t in tensors if t is not None}) > 1:
        return ["tensors are on different devices: " + ", ".join(sorted({str(t.device) for t in tensors if t is not None}))]
    dev = devices.pop()
    if name == "triton" and (dev == "cuda" or dev == "cpu" and interpret_mode() and forced_backend() == "triton"):
        cap = device_capability(next(t for t in tensors if t is not None).device)
        if cap is None or cap >= TRITON_MIN_CAPABILITY:
            return []
        return [f"sm_{cap[0]}{cap[1]}: the Triton kernels need compute capability "
                f"{TRITON_MIN_CAPABILITY[0]}.{TRITON_MIN_CAPABILITY[1]} or newer"]
    if dev == "cuda":
        return []
    if name == "triton" and dev == "cpu":
        return ["CPU tensors: the triton backend takes them only when forced, under TRITON_INTERPRET=1 "
                "(the interpreter is for tests; reference is the CPU path)"]
    return [f"tensors on {dev}; the {name} backend needs CUDA tensors"]


def _dtype_names(dtypes) -> str:
    return ", ".join(str(d).removeprefix("torch.") for d in dtypes)


@dataclass(frozen=True)
class Capabilities:
    """What one backend of one op takes, declared as data (``seqgen-fast info`` prints it).

    ``backend`` fixes the device rule (:func:`device_reasons`); ``dtypes`` are the storage dtypes
    of the op's compute tensor (its first tensor argument); ``head_dims`` is an inclusive
    ``(low, high)`` range for ops with attention heads; ``dtype_note`` says why a dtype is left
    out, when that is not obvious. :meth:`reasons` turns the declaration into the reasons a call
    cannot be taken; a family's ``supports`` function adds what only it knows (shapes, on-chip
    capacity).
    """

    backend: str
    dtypes: tuple[torch.dtype, ...]
    head_dims: tuple[int, int] | None = None
    dtype_note: str = ""

    def reasons(self, *tensors: torch.Tensor | None, head_dims: tuple[int, ...] = ()) -> list[str]:
        """Device, dtype and head-dim reasons for ``tensors`` (the first non-None one sets the dtype)."""
        why = device_reasons(self.backend, *tensors)
        first = next((t for t in tensors if t is not None), None)
        if first is not None and first.dtype not in self.dtypes:
            note = f" ({self.dtype_note})" if self.dtype_note else ""
            why.append(f"dtype {str(first.dtype).removeprefix('torch.')} is not one of {_dtype_names(self.dtypes)}"
                       + note)
        if self.head_dims is not None:
            lo, hi = self.head_dims
            why += [f"head dim {d} is outside {lo}..{hi}" for d in head_dims if not lo <= d <= hi]
        return why

    def describe(self) -> str:
        text = _dtype_names(self.dtypes)
        if self.head_dims is not None:
            text += f"; head dims {self.head_dims[0]}..{self.head_dims[1]}"
        return text


# ----------------------------------------------------------------------------------------------
# Per-op dispatch
# ----------------------------------------------------------------------------------------------
Supports = Callable[..., list[str]]


@dataclass
class _Impl:
    fn: Callable
    supports: Supports
    caps: Capabilities | None


@dataclass
class Dispatcher:
    """Chooses a backend for one op.

    ``order`` is the fixed preference order for automatic dispatch. Implementations register
    with :meth:`register`; their ``supports`` functions receive the op's arguments and return a
    list of reasons (strings) why they cannot take them.
    """

    name: str
    order: tuple[str, ...] = BACKENDS
    impls: dict[str, _Impl] = field(default_factory=dict)
    _memo: dict[tuple, str] = field(default_factory=dict, repr=False)

    def register(self, backend: str, supports: Supports | None = None,
                 caps: Capabilities | None = None) -> Callable[[Callable], Callable]:
        """Decorator: ``fn`` runs this op on ``backend``. ``supports(*args, **kwargs)`` returns the
        reasons it cannot take a call (none: it takes everything); ``caps`` is the declaration
        those reasons come from, kept for ``seqgen-fast info``."""
        _check_name(backend, f"{self.name}.register")

        def deco(fn: Callable) -> Callable:
            self.impls[backend] = _Impl(fn, supports or (lambda *a, **k: []), caps)
            return fn

        return deco

    def reasons(self, backend: str, *args, **kwargs) -> list[str]:
        """Every reason ``backend`` cannot run this op on these arguments."""
        if backend not in self.impls:
            return [f"{self.name} has no {backend} implementation"]
        why = backend_unavailable(backend)
        if why:
            return [why]
        return list(self.impls[backend].supports(*args, **kwargs))

    def select(self, *args, backend: str | None = None, **kwargs) -> str:
        """Name of the backend that will run this call (forced, or the first capable). Traced by
        torch.compile, the choice is a trace-time constant: the backend probes' caches are filled
        first, so what the trace guards on is already final."""
        if torch.compiler.is_compiling():
            _probe_backends()
        forced = forced_backend(backend)
        if forced is not None:
            stack = _stack()
            stack.append(forced)  # supports() functions see a backend= argument as forced too
            try:
                why = self.reasons(forced, *args, **kwargs)
            finally:
                stack.pop()
            if why:
                raise BackendError(f"{self.name}: forced backend {forced!r} cannot take these inputs: "
                                   + "; ".join(why), {forced: why})
            return forced
        report = {}
        for name in self.order:
            why = self.reasons(name, *args, **kwargs)
            if not why:
                return name
            report[name] = why
        raise BackendError(f"{self.name}: no backend can take these inputs:\n"
                           + "\n".join(f"  {name}: " + "; ".join(why) for name, why in report.items()), report)

    def select_cached(self, key: tuple, *args, backend: str | None = None, **kwargs) -> str:
        """:meth:`select` memoized on ``key``, the caller's summary of everything its supports
        functions read (devices, dtypes, shapes, which inputs exist). The forced backend and the
        interpreter mode join the key, so a hot loop (a generation step, a scheduler step) pays the
        capability checks once."""
        full = (forced_backend(backend), interpret_mode(), key)
        name = self._memo.get(full)
        if name is None:
            name = self.select(*args, backend=backend, **kwargs)
            if len(self._memo) >= 256:
                self._memo.clear()
            self._memo[full] = name
        return name

    def impl(self, backend: str) -> Callable:
        return self.impls[backend].fn


_DISPATCHERS: dict[str, Dispatcher] = {}


def dispatcher(name: str, order: tuple[str, ...] = BACKENDS) -> Dispatcher:
    """The dispatcher of op ``name``, created on first use with backend preference ``order``."""
    if name not in _DISPATCHERS:
        for b in order:
            _check_name(b, f"dispatcher {name!r} order")
        _DISPATCHERS[name] = Dispatcher(name, tuple(order))
    return _DISPATCHERS[name]


def dispatchers() -> dict[str, Dispatcher]:
    """Every op's dispatcher created so far (``seqgen-fast info`` lists their capabilities)."""
    return dict(_DISPATCHERS)
