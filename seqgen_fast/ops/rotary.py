"""Rotary position embedding for prefill: ``seqgen_fast.functional.rotary_embedding``.

Ops (dispatch order triton, reference): ``seqgen_fast::rotary_embedding`` returns new tensors and is
differentiable in q and k (the backward is the rotation by ``-sin``, i.e. the transpose);
``seqgen_fast::rotary_embedding_`` rotates in place (``mutates_args=("q", "k")``, inference only).
Decode does not need this op: ``flash_attn_with_kvcache`` rotates q and the new k on load.
Non-finite values propagate element-wise as in transformers' ``apply_rotary_pos_emb`` (a NaN / inf in
dim ``d`` reaches ``d`` and its partner; ``inf * 0`` at a zero sine is NaN, as in torch).
"""
from __future__ import annotations

import torch
from torch import Tensor

from .. import _debug
from .._backend import Capabilities, dispatcher
from ..reference import rotary as reference
from ._library import custom_op

ROTARY = dispatcher("rotary_embedding", order=("triton", "reference"))
TRITON = Capabilities("triton", dtypes=(torch.float16, torch.bfloat16, torch.float32))
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INDEX = (torch.int32, torch.int64)


@ROTARY.register("reference")
def _reference(q, k, cos, sin, position_ids, cu_seqlens, interleaved, inplace):
    q_out, k_out = reference.rotary_embedding(q, k, cos, sin, position_ids=position_ids, cu_seqlens=cu_seqlens,
                                              interleaved=interleaved)
    if inplace:
        q_out = q.copy_(q_out)
        k_out = None if k is None else k.copy_(k_out)
    return q_out, k_out


def offset_reasons(**named: Tensor | None) -> list[str]:
    """Why 32-bit index arithmetic of the rotary / decode kernels cannot address ``named`` tensors:
    their batch, token, head and page offsets are 64-bit, but a row's elements are ``d * stride(-1)``
    for ``d`` below the head dim (int32), and the rotary kernel numbers its (token, head) rows in int32."""
    why = []
    for name, t in named.items():
        if t is not None and t.dim() and (t.shape[-1] - 1) * abs(t.stride(-1)) >= 2**31:
            why.append(f"{name}: its last dim spans {(t.shape[-1] - 1) * abs(t.stride(-1)) + 1} elements (stride "
                       f"{t.stride(-1)}), past the kernels' 32-bit offsets within a row")
    return why


def _triton_supports(q, k, cos, sin, position_ids, cu_seqlens, *args) -> list[str]:
    why = TRITON.reasons(q, k, cos, sin, position_ids, cu_seqlens) + offset_reasons(q=q, k=k, cos=cos, sin=sin)
    for name, t in (("q", q), ("k", k)):
        rows = 0 if t is None or not t.shape[-1] else t.numel() // t.shape[-1]
        if rows >= 2**31:
            why.append(f"{name}: {rows} (token, head) rows, past the kernel's 32-bit row numbers")
    return why


@ROTARY.register("triton", supports=_triton_supports, caps=TRITON)
def _triton(*args):
    from ..kernels import rotary as kernel

    return kernel.rotary_embedding(*args)


def _inverse_sin(sin: Tensor, interleaved: bool) -> Tensor:
    """The sin table of the inverse rotation: ``-sin`` at each dim's partner column (for half tables
    and for full tables with equal halves that is just ``-sin``)."""
    if interleaved:  # half table: a pair shares its column
        return -sin
    half = sin.shape[-1] // 2
    return -torch.cat([sin[..., half:], sin[..., :half]], dim=-1)


def _host_checks(q, cos, position_ids, cu_seqlens) -> None:
    """Positions inside the table (one sync): only under seqgen_fast.debug_checks()."""
    if cos.dim() == 3 or q.numel() == 0 or not _debug.host_reads_allowed(q):
        return
    packed = q.dim() == 3
    pos = reference.positions(q.shape[0] if packed else q.shape[1], batch=None if packed else q.shape[0],
                              position_ids=position_ids, cu_seqlens=cu_seqlens, device=q.device)
    lo, hi = int(pos.min()), int(pos.max())
    if lo < 0 or hi >= cos.shape[0]:
        raise ValueError(f"rotary_embedding: positions must lie in [0, {cos.shape[0] - 1}] (the rows of cos/sin); "
                         f"got positions in [{lo}, {hi}]")


def _impl(q, k, cos, sin, position_ids, cu_seqlens, interleaved, inplace, backend):
    if _debug.enabled():
        _host_checks(q, cos, position_ids, cu_seqlens)
    return ROTARY.impl(backend)(q, k, cos, sin, position_ids, cu_seqlens, interleaved, inplace)


def _fake(q, k, *args):
    return [torch.empty_like(q)] + ([] if k is None else [torch.empty_like(k)])


def _setup(ctx, inputs, output):
    q, k, cos, sin, position_ids, cu_seqlens, interleaved, backend = inputs
    ctx.save_for_backward(cos, sin, position_ids, cu_seqlens)
    ctx.interleaved, ctx.backend, ctx.has_k = interleaved, backend, k is not None


def _backward(ctx, grads):
    """The rotation is orthogonal: its gradient is the inverse rotation of the output gradients."""
    cos, sin, position_ids, cu_seqlens = ctx.saved_tensors
    out = _rotary_op(grads[0], grads[1] if ctx.has_k else None, cos, _inverse_sin(sin, ctx.interleaved), position_ids,
                     cu_seqlens, ctx.interleaved, ctx.backend)
    return out[0], (out[1] if ctx.has_k else None), None, None, None, None, None, None


@custom_op("rotary_embedding", fake=_fake, backward=_backward, setup_context=_setup)
def _rotary_op(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
               cu_seqlens: Tensor | None, interleaved: bool, backend: str) -> list[Tensor]:
    q_out, k_out = _impl(q, k, cos, sin, position_ids, cu_seqlens, interleaved, False, backend)
    return [q_out] + ([] if k_out is None else [k_out])


@custom_op("rotary_embedding_", mutates_args=("q", "k"))
def _rotary_inplace_op(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, position_ids: Tensor | None,
                       cu_seqlens: Tensor | None, interleaved: bool, backend: str) -> None:
    _impl(q, k, cos, sin, position_ids, cu_seqlens, interleaved, True, backend)


def _fail(msg: str, exc=ValueError):
    raise exc(f"rotary_embedding: {msg}")


def _validate(q, k, cos, sin, position_ids, cu_seqlens, interleaved) -> None:
    for name, t in (("q", q), ("cos", cos), ("sin", sin)):
        if not isinstance(t, Tensor):
            _fail(f"{name} must be a tensor, got {type(t).__name__}", TypeError)
    if q.dim() not in (3, 4):
        _fail(f"q must be (B, S, H, D) or packed (T, H, D), got shape {tuple(q.shape)}")
    if q.dtype not in _FLOATS:
        _fail(f"q must be float16, bfloat16, float32 or float64, got {q.dtype}", TypeError)
    packed = q.dim() == 3
    lead = q.shape[:1] if packed else q.shape[:2]
    head_dim = q.shape[-1]
    if k is not None:
        if not isinstance(k, Tensor):
            _fail(f"k must be a tensor or None, got {type(k).__name__}", TypeError)
        if k.dim() != q.dim() or k.shape[:-2] != lead or k.shape[-1] != head_dim:
            _fail(f"k must be {('(T, Hk, D)' if packed else '(B, S, Hk, D)')} like q {tuple(q.shape)}, "
                  f"got {tuple(k.shape)}")
        if k.dtype != q.dtype:
            _fail(f"k dtype {k.dtype} must be q's dtype {q.dtype}", TypeError)
    if sin.shape != cos.shape:
        _fail(f"sin shape {tuple(sin.shape)} must be cos shape {tuple(cos.shape)}")
    for name, t in (("cos", cos), ("sin", sin)):
        if not t.dtype.is_floating_point:
            _fail(f"{name} must be a floating tensor, got {t.dtype}", TypeError)
    width = cos.shape[-1] if cos.dim() in (2, 3) else 0
    rotary_dim = 2 * width if interleaved else width
    table = ("(S_ro, rotary_dim / 2), flash-attn's convention for interleaved=True" if interleaved
             else "(S_ro, rotary_dim), transformers' convention for interleaved=False")
    if cos.dim() == 3:
        if packed:
            _fail("per-token cos/sin (B, S, W) need the padded (B, S, H, D) layout; give a packed q a (S_ro, W) table")
        if cos.shape[0] not in (1, lead[0]) or cos.shape[1] != lead[1]:
            _fail(f"per-token cos must be (B or 1, S, W) = ({lead[0]} or 1, {lead[1]}, W), got {tuple(cos.shape)}")
        if position_ids is not None:
            _fail("position_ids select rows of a (S_ro, W) table; per-token cos/sin (B, S, W) are already positioned")
    elif cos.dim() != 2:
        _fail(f"cos must be a table {table} or per-token values (B, S, W), got shape {tuple(cos.shape)}")
    if rotary_dim == 0 or rotary_dim % 2 or rotary_dim > head_dim:
        _fail(f"cos has {width} columns: the rotary dim {rotary_dim} must be even and in 2..{head_dim} (the head dim); "
              f"tables are {table}")
    if position_ids is not None:
        if not isinstance(position_ids, Tensor) or position_ids.dtype not in _INDEX:
            _fail("position_ids must be an int32 or int64 tensor", TypeError)
        shapes = [(lead[0],)] if packed else [(lead[0], lead[1]), (1, lead[1]), (lead[1],)]
        if tuple(position_ids.shape) not in shapes:
            _fail(f"position_ids must have shape {' or '.join(map(str, shapes))}, got {tuple(position_ids.shape)}")
    if cu_seqlens is not None:
        if not packed:
            _fail("cu_seqlens needs packed q/k (T, H, D)")
        if not isinstance(cu_seqlens, Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 \
                or cu_seqlens.dtype not in _INDEX:
            _fail("cu_seqlens must be a (batch + 1,) int32 or int64 tensor of segment starts")
    if cos.dim() == 2 and position_ids is None and cu_seqlens is None and cos.shape[0] < lead[-1]:
        _fail(f"cos/sin have {cos.shape[0]} positions, fewer than the {lead[-1]} tokens of each sequence")
    tensors = {n: t for n, t in (("q", q), ("k", k), ("cos", cos), ("sin", sin), ("position_ids", position_ids),
                                 ("cu_seqlens", cu_seqlens)) if t is not None}
    off = [n for n, t in tensors.items() if t.device != q.device]
    if off:
        _fail(f"{', '.join(off)} must be on q's device {q.device}")


def rotary_embedding(q: Tensor, k: Tensor | None, cos: Tensor, sin: Tensor, *, position_ids: Tensor | None = None,
                     cu_seqlens: Tensor | None = None, interleaved: bool = False, inplace: bool = False,
                     backend: str | None = None) -> tuple[Tensor, Tensor | None]:
    """Rotary position embedding of q and k in one fused pass (reads and writes each element once).

    Layouts: ``q`` (B, S, H, D) and ``k`` (B, S, Hk, D) -- the flash-attn layout; pass transformers'
    (B, H, S, D) tensors as ``q.transpose(1, 2)`` (a view, any strides are read) -- or packed
    ``(T, H, D)``/``(T, Hk, D)`` sequences with ``cu_seqlens`` (batch + 1,) segment starts. ``k`` may be
    None. The first ``rotary_dim`` dims are rotated, the rest pass through (partial rotary).

    Conventions (``seqgen_fast.reference.rotary`` has the math):

    * ``interleaved=False`` -- transformers' ``apply_rotary_pos_emb``: ``x * cos + rotate_half(x) * sin``,
      dim ``i`` paired with ``i + rotary_dim / 2`` (GPT-NeoX); ``cos``/``sin`` hold ``rotary_dim`` columns
      (transformers' rotary embeddings return ``cat(freqs, freqs)``).
    * ``interleaved=True`` -- flash-attn's ``apply_rotary_emb(interleaved=True)``: dims ``2i, 2i + 1``
      paired (GPT-J); ``cos``/``sin`` hold ``rotary_dim / 2`` columns.

    ``cos``/``sin``: a (S_ro, W) table read at each token's position -- ``position_ids`` ((B, S),
    (1, S) or (S,); packed: (T,)), else ``0 .. S-1`` per sequence, else (packed) the offset in its
    ``cu_seqlens`` segment -- or per-token values (B or 1, S, W) as transformers' rotary embedding
    returns them (then no ``position_ids``). Device positions are clamped into the table (checked
    on the host only under ``seqgen_fast.debug_checks()``).

    Returns ``(q_rot, k_rot)`` in q's dtype (math in float32); with ``inplace=True`` q and k are
    overwritten and returned (inference only: not differentiable). Otherwise differentiable in
    q and k (cos/sin are constants). Backends: triton (CUDA), reference (plain PyTorch).
    """
    _validate(q, k, cos, sin, position_ids, cu_seqlens, interleaved)
    if any(t is not None and t.requires_grad for t in (cos, sin)) and torch.is_grad_enabled():
        _fail("cos/sin are constants of the op: they take no gradient (detach them)")
    interleaved = bool(interleaved)
    chosen = ROTARY.select(q, k, cos, sin, position_ids, cu_seqlens, interleaved, bool(inplace), backend=backend)
    if inplace:
        if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k)):
            _fail("inplace=True is for inference: q/k require grad (use inplace=False to train)")
        _rotary_inplace_op(q, k, cos, sin, position_ids, cu_seqlens, interleaved, chosen)
        return q, k
    out = _rotary_op(q, k, cos, sin, position_ids, cu_seqlens, interleaved, chosen)
    return out[0], (out[1] if k is not None else None)
