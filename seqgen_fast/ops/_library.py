"""The one registration pattern for seqgen_fast ops (every kernel family uses it).

An op is a typed Python function turned into ``torch.ops.seqgen_fast.<name>`` by
``torch.library.custom_op``, with a fake (meta) implementation for ``torch.compile`` and, when
differentiable, a backward registered with ``register_autograd``. The op is opaque to the
compiler and to CUDA-graph capture alike, so one call = one graph node.

Backend choice happens *before* the op, in Python (``seqgen_fast._backend.Dispatcher.select``),
and the chosen name travels into the op as its ``backend: str`` argument; the op body runs
``dispatcher.impl(backend)(...)``. That keeps the reasons-reporting dispatch out of traced code
and makes the backend part of the op's recorded arguments.

    @custom_op("lstm_cell_fwd", fake=_cell_fake, backward=_cell_bwd, setup_context=_cell_ctx)
    def lstm_cell_fwd(gates: Tensor, c: Tensor, backend: str) -> tuple[Tensor, Tensor]:
        return CELL.impl(backend)(gates, c)
"""
from __future__ import annotations

from typing import Callable, Iterable

import torch

NAMESPACE = "seqgen_fast"
_OPS: dict[str, object] = {}


def custom_op(name: str, *, mutates_args: Iterable[str] | str = (), fake: Callable | None = None,
              backward: Callable | None = None, setup_context: Callable | None = None):
    """Decorator: define ``torch.ops.seqgen_fast.<name>`` from ``fn`` and register its parts.

    ``fake(*args)`` returns empty tensors of the output shapes (needed by torch.compile and
    ``torch.library.opcheck``); ``backward``/``setup_context`` follow
    ``torch.library.register_autograd``.
    """
    if (backward is None) != (setup_context is None):
        raise ValueError(f"custom_op {name!r}: give both backward and setup_context, or neither")

    def deco(fn: Callable):
        op = torch.library.custom_op(f"{NAMESPACE}::{name}", mutates_args=mutates_args)(fn)
        if fake is not None:
            op.register_fake(fake)
        if backward is not None:
            op.register_autograd(backward, setup_context=setup_context)
        _OPS[name] = op
        return op

    return deco


def registered_ops() -> dict[str, object]:
    """Every op defined through :func:`custom_op` so far (for ``opcheck`` tests)."""
    return dict(_OPS)
