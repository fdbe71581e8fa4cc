"""Prefill attention: ``seqgen_fast.functional.scaled_dot_product_attention`` and ``flash_attention``.

Layers:

* ``seqgen_fast::attention_fwd`` / ``seqgen_fast::attention_bwd`` -- the ``torch.library`` ops (fake
  and autograd registered) over the (B, H, L, E) contract of ``seqgen_fast.reference.attention``;
  their body runs the backend chosen by the ``attention`` dispatcher (triton, reference).
* :func:`flash_attention` -- (batch, seq, heads, dim) layout, packed varlen, GQA; always the op.
* :func:`scaled_dot_product_attention` -- torch's signature and semantics; its own dispatcher
  (triton, reference) sends what the kernels take through the op (dropout included) and
  everything else (broadcast batch dims, a mask that needs a gradient, float64) to the plain-PyTorch
  reference, which follows torch's math path.

Input checks run before dispatch, so every backend raises the same errors, each naming the
argument at fault.

Non-finite values (the policy of the attention, decode and rotary families, the same on every
backend, compiled or interpreted; ``tests/test_fuzz_attention.py`` checks it):

* a NaN or inf in q, or in a key / value a query row *sees* (its causal band, window, mask,
  sequence, cache length), reaches that row as in torch's math attention over the keys it sees: a
  NaN score or value makes the row NaN; a +inf score makes it NaN (``inf - inf``, as torch's
  softmax) and its lse NaN; a -inf score is a masked key; an inf value with weight > 0 gives inf;
* a row that sees no key, or only -inf scores, outputs 0 (torch's ``_safe_softmax``; flash-attn's
  convention) with lse -inf (decode: +inf, flash-attn's ``flash_attn_with_kvcache``);
* a NaN / inf in k at a key masked out of a row never reaches it; in v it *may* make the row NaN
  (torch's math path: always, as ``0 * nan``; the kernels: when the key shares a tile with keys the
  row sees), nothing else. Rows outside a varlen sequence or past ``cache_seqlens`` are never read;
* the kernels' running maxima keep NaN when compiled (``max.NaN.f32``, not ``tl.maximum``'s
  NaN-dropping ``max.f32``); rotary is element-wise: a NaN / inf reaches its dim and its partner dim;
* gradients: what a row sees reaches the gradients it feeds (its dq; dk, dv of the keys it sees) as
  in torch's math SDPA. Past that torch's pattern is implementation-defined (its softmax of a NaN row
  is NaN at masked keys too, so its dk / dv are NaN at keys the row never saw); ours lies between:
  NaN wherever the float64 gradient of the policy above is, non-finite only where torch's math SDPA
  in float64 is.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from dataclasses import dataclass

from .. import _debug
from .._backend import Capabilities, dispatcher
from ..reference import attention as reference
from .._contract import BOTTOM_RIGHT, NONE, TOP_LEFT, AttentionFeatures, attention_output
from ._library import SDPA_AUTOCAST, autocast_as, custom_op

ATTN = dispatcher("attention", order=("triton", "reference"))
SDPA = dispatcher("scaled_dot_product_attention", order=("triton", "reference"))


@dataclass(frozen=True)
class _TritonCaps(Capabilities):
    """The Triton backend's declaration, with the lowering this device gets (``seqgen-fast info``)."""

    def describe(self) -> str:
        from ..kernels.attention import describe_path

        return f"{super().describe()}; kernels: {describe_path()}"


TRITON = _TritonCaps("triton", dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(1, 256),
                     dtype_note="float64 has no Triton dot; the reference computes it")


# ----------------------------------------------------------------------------------------------
# The op contract: q (B, H, L, E), k (B, Hk, S, E), v (B, Hk, S, Ev), see reference.attention
# ----------------------------------------------------------------------------------------------
def _kernel_reasons(q, k, v, mask, cu_q) -> list[str]:
    """Why the Triton kernels cannot take contract-shaped inputs (device reasons included)."""
    reasons = TRITON.reasons(q, k, v, mask, cu_q, head_dims=(q.shape[-1], v.shape[-1]))
    # the kernels form offsets within one sequence (rows x row stride) in 32 bits
    Ev = v.shape[-1]
    spans = [(name, (t.shape[-2] - 1) * abs(t.stride(-2)) + (t.shape[-1] - 1) * abs(t.stride(-1)) + 1)
             for name, t in (("query", q), ("key", k), ("value", v)) if t.dim() >= 2]
    if q.dim() >= 2:  # the output is allocated in q's memory order (_contract.attention_output)
        heads_inner = q.dim() >= 3 and q.stride(-3) < q.stride(-2)
        spans.append(("output", (q.shape[-2] - 1) * (q.shape[-3] * Ev if heads_inner else Ev) + Ev))
    for name, span in spans:
        if span >= 2**31:
            reasons.append(f"{name}: one sequence spans {span} elements, past the kernels' 32-bit offsets "
                           "within a sequence")
    if mask is not None:
        if mask.dim() and (mask.shape[-1] - 1) * abs(mask.stride(-1)) >= 2**31:  # key index x stride, int32
            reasons.append(f"attn_mask: a row spans {(mask.shape[-1] - 1) * abs(mask.stride(-1)) + 1} elements, "
                           "past the kernels' 32-bit offsets within a mask row")
        if cu_q is not None:
            reasons.append("attn_mask with packed varlen sequences is not supported")
        if mask.requires_grad and torch.is_grad_enabled():
            reasons.append("attn_mask requires grad (the kernels give no mask gradient)")
    return reasons


def _features(window_left, window_right, softcap, alibi, dropout_p, rng) -> AttentionFeatures:
    return AttentionFeatures(window_left, window_right, softcap, alibi, dropout_p, rng)


@ATTN.register("triton", supports=lambda q, k, v, mask, cu_q, *rest: _kernel_reasons(q, k, v, mask, cu_q),
               caps=TRITON)
def _attn_triton(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, tune):
    from ..kernels import attention as kernel

    return kernel.attention_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, tune=tune)


@ATTN.register("reference")
def _attn_reference(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, tune):
    return reference.attention_fwd(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat)


def _fwd_fake(q, k, v, mask, cu_q, cu_k, alibi, rng, max_q, max_k, scale, causal, window_left, window_right,
              softcap, dropout_p, deterministic, backend, tune):
    return attention_output(q, v.shape[-1]), q.new_empty(q.shape[:-1], dtype=torch.float32)


def _bwd_fake(dout, q, k, v, out, lse, mask, cu_q, cu_k, alibi, rng, max_q, max_k, scale, causal, window_left,
              window_right, softcap, dropout_p, deterministic, backend, tune):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


@custom_op("attention_bwd", fake=_bwd_fake)
def _attention_bwd(dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor, mask: Tensor | None,
                   cu_q: Tensor | None, cu_k: Tensor | None, alibi: Tensor | None, rng: Tensor | None, max_q: int,
                   max_k: int, scale: float, causal: int, window_left: int, window_right: int, softcap: float,
                   dropout_p: float, deterministic: bool, backend: str, tune: bool) -> tuple[Tensor, Tensor, Tensor]:
    feat = _features(window_left, window_right, softcap, alibi, dropout_p, rng)
    if backend == "triton":
        from ..kernels import attention as kernel

        return kernel.attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat,
                                    deterministic, tune=tune)
    return reference.attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat)


def _setup(ctx, inputs, output):
    q, k, v, mask, cu_q, cu_k, alibi, rng = inputs[:8]
    ctx.save_for_backward(q, k, v, output[0], output[1], mask, cu_q, cu_k, alibi, rng)
    ctx.args = inputs[8:]


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, mask, cu_q, cu_k, alibi, rng = ctx.saved_tensors
    dq, dk, dv = _attention_bwd(dout, q, k, v, out, lse, mask, cu_q, cu_k, alibi, rng, *ctx.args)
    return (dq, dk, dv) + (None,) * 16


@custom_op("attention_fwd", fake=_fwd_fake, backward=_backward, setup_context=_setup, autocast=SDPA_AUTOCAST,
           autocast_keep=("alibi",))
def _attention_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, cu_q: Tensor | None, cu_k: Tensor | None,
                   alibi: Tensor | None, rng: Tensor | None, max_q: int, max_k: int, scale: float, causal: int,
                   window_left: int, window_right: int, softcap: float, dropout_p: float, deterministic: bool,
                   backend: str, tune: bool) -> tuple[Tensor, Tensor]:
    feat = _features(window_left, window_right, softcap, alibi, dropout_p, rng)
    return ATTN.impl(backend)(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, tune)


def attention(q4: Tensor, k4: Tensor, v4: Tensor, mask: Tensor | None = None, cu_q: Tensor | None = None,
              cu_k: Tensor | None = None, max_q: int = 0, max_k: int = 0, *, scale: float, causal: int,
              window: tuple[int, int] = (-1, -1), softcap: float = 0.0, alibi: Tensor | None = None,
              dropout_p: float = 0.0, deterministic: bool = False, backend: str | None = None) -> tuple[Tensor, Tensor]:
    """The op on contract-shaped tensors, after dispatch: (out, lse). Draws the dropout ``rng``
    (seed, offset) from torch's generator of q's device (CUDA-graph safe, reproducible under
    ``torch.manual_seed``); autotunes only when not traced by ``torch.compile``."""
    rng = None
    if dropout_p > 0:
        rng = torch.randint(0, 2**62, (2,), device=q4.device, dtype=torch.int64)
    chosen = ATTN.select(q4, k4, v4, mask, cu_q, cu_k, max_q, max_k, scale, causal, backend=backend)
    return _attention_fwd(q4, k4, v4, mask, cu_q, cu_k, alibi, rng, max_q, max_k, scale, causal, window[0], window[1],
                          softcap, dropout_p, deterministic, chosen, not torch.compiler.is_compiling())


# ----------------------------------------------------------------------------------------------
# flash_attention: (batch, seq, heads, dim), varlen
# ----------------------------------------------------------------------------------------------
def _fail(fn: str, msg: str, exc=ValueError):
    raise exc(f"{fn}: {msg}")


def _check_qkv_common(fn, q, k, v, names=("q", "k", "v")):
    for name, t in zip(names, (q, k, v)):
        if not isinstance(t, Tensor):
            _fail(fn, f"{name} must be a tensor, got {type(t).__name__}", TypeError)
        if not t.is_floating_point():
            _fail(fn, f"{name} dtype must be floating point, got {t.dtype}", TypeError)
    for name, t in zip(names[1:], (k, v)):
        if t.dtype != q.dtype:
            _fail(fn, f"{name} dtype {t.dtype} differs from {names[0]} dtype {q.dtype}", TypeError)
        if t.device != q.device:
            _fail(fn, f"{name} is on {t.device}, {names[0]} on {q.device}")


def _check_cu(fn, name, cu, q):
    if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 2:
        _fail(fn, f"{name} must be a 1-D int32/int64 tensor of batch+1 offsets, got "
                  f"{tuple(cu.shape) if isinstance(cu, Tensor) else type(cu).__name__}")
    if cu.dtype not in (torch.int32, torch.int64):
        _fail(fn, f"{name} dtype must be int32 or int64, got {cu.dtype}", TypeError)
    if cu.device != q.device:
        _fail(fn, f"{name} is on {cu.device}, q on {q.device}")


def _check_offsets(fn, name, cu, rows) -> None:
    """cu_seqlens must be prefix sums: start at 0, never decrease, end within the packed rows. The
    check reads them on the host (a device-to-host copy), so it runs only under
    ``seqgen_fast.debug_checks()`` and never while a CUDA graph is captured or torch.compile traces;
    otherwise the kernels' clamping keeps every access inside q, k, v (as for decode's lengths)."""
    if not (_debug.enabled() and _debug.host_reads_allowed(cu)):
        return
    c = cu.tolist()
    if c[0] != 0 or any(b < a for a, b in zip(c, c[1:])) or c[-1] > rows:
        _fail(fn, f"{name} must be prefix sums of the sequence lengths: start at 0, be non-decreasing and end "
                  f"at most at {rows} (the packed rows), got {c}")


def _longest(fn, name, cu) -> int:
    """Longest sequence of offsets ``cu`` (one device-to-host read); ``name`` is the argument that
    would have spared it, asked for where the read is impossible."""
    if not _debug.host_reads_allowed(cu):
        _fail(fn, f"give {name} under torch.compile and CUDA-graph capture: reading it from the offsets "
                  "needs a device-to-host copy")
    c = cu.tolist()
    return max(b - a for a, b in zip(c, c[1:]))


def check_features(fn: str, dropout_p, window_size, softcap, alibi_slopes, q: Tensor, batch: int, heads: int):
    """Validate the flash-attn options; return (window, softcap, alibi as (batch, heads) float32 or
    None). Errors name the argument and what was expected."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)) or not 0.0 <= dropout_p <= 1.0:
        _fail(fn, f"dropout_p must be a float in [0, 1], got {dropout_p!r}")
    if (not isinstance(window_size, (tuple, list)) or len(window_size) != 2
            or not all(isinstance(w, int) and not isinstance(w, bool) and w >= -1 for w in window_size)):
        _fail(fn, f"window_size must be a pair (left, right) of ints >= -1 (-1 = unbounded), got {window_size!r}")
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or softcap != softcap or softcap < 0:
        _fail(fn, f"softcap must be a float >= 0 (0 = off), got {softcap!r}")
    alibi = None
    if alibi_slopes is not None:
        if not isinstance(alibi_slopes, Tensor):
            _fail(fn, f"alibi_slopes must be a tensor or None, got {type(alibi_slopes).__name__}", TypeError)
        if alibi_slopes.dtype != torch.float32:
            _fail(fn, f"alibi_slopes must be float32 (as flash-attn), got {alibi_slopes.dtype}", TypeError)
        if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
            _fail(fn, f"alibi_slopes must have shape (nheads,) = ({heads},) or (batch, nheads) = ({batch}, {heads}), "
                      f"got {tuple(alibi_slopes.shape)}")
        if alibi_slopes.device != q.device:
            _fail(fn, f"alibi_slopes is on {alibi_slopes.device}, q on {q.device}")
        alibi = alibi_slopes.expand(batch, heads)
    return (int(window_size[0]), int(window_size[1])), float(softcap), alibi


@autocast_as(SDPA_AUTOCAST, keep=("alibi_slopes",))
def flash_attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False, scale: float | None = None,
                    cu_seqlens_q: Tensor | None = None, cu_seqlens_k: Tensor | None = None,
                    max_seqlen_q: int | None = None, max_seqlen_k: int | None = None, dropout_p: float = 0.0,
                    window_size: tuple[int, int] = (-1, -1), softcap: float = 0.0,
                    alibi_slopes: Tensor | None = None, deterministic: bool = False, return_lse: bool = False,
                    backend: str | None = None):
    """Flash attention (Triton) in the flash-attn layout; no L x S buffer is ever allocated.

    Dense: ``q (B, L, H, E)``, ``k (B, S, Hk, E)``, ``v (B, S, Hk, Ev)`` -> ``out (B, L, H, Ev)``.
    Varlen (``cu_seqlens_q``/``cu_seqlens_k`` given): sequences packed along the first dim,
    ``q (total_q, H, E)``, ``k (total_k, Hk, E)``, ``v (total_k, Hk, Ev)`` -> ``out (total_q, H, Ev)``;
    sequence ``b`` is rows ``cu_seqlens_q[b]:cu_seqlens_q[b+1]`` of q and likewise for k/v
    (``cu_seqlens_*``: (batch+1,) int32/int64 prefix sums starting at 0, checked on the host under
    ``seqgen_fast.debug_checks()``). ``max_seqlen_*`` size the grid; when omitted they are read from ``cu_seqlens_*``
    (a device-to-host read, not possible inside a CUDA-graph capture or a fullgraph compile). When
    given (flash-attn's contract) they must be the longest lengths: a smaller value leaves rows
    uncomputed. The kernels clamp every offset into the packed rows.

    Per sequence and head, with query head ``h`` reading kv head ``h // (H // Hk)`` (GQA/MQA)::

        s[i, j] = scale q[i] . k[j]                       scale = 1/sqrt(E) by default
        s = softcap tanh(s / softcap)                      softcap > 0
        s = s - slope[b, h] |i + S - L - j|                alibi_slopes (H,) or (B, H) float32
        out[i] = sum_j dropout(softmax_j(s))[i, j] v[j]    over the keys of the band of row i

    ``causal=True`` uses the **bottom-right** convention of flash-attn: query ``i`` sees keys
    ``j <= i + S - L``; for L > S the first L - S query rows see no key and output 0.
    ``window_size=(left, right)`` keeps keys ``i + S - L - left <= j <= i + S - L + right`` (-1 =
    unbounded; with ``causal`` the right edge is ``min(right, 0)``); key blocks outside the band
    are skipped, so the time follows the window, not S. ``dropout_p`` drops attention weights
    with in-kernel Philox (seed and offset drawn from torch's generator of q's device, so
    ``torch.manual_seed`` reproduces it, and the backward regenerates the same mask).
    ``deterministic=True`` makes the backward bit-identical across runs (a separate dQ pass
    instead of float32 atomics). ``return_lse=True`` also returns the natural-log sum of exp of
    each row's scores: ``(B, H, L)`` dense, ``(H, total_q)`` varlen (flash-attn's shapes), float32.

    Inputs: float16, bfloat16 or float32 (IEEE float32 dots, not TF32) on CUDA for the Triton
    kernels (the reference backend also takes float64, on any device), any strides, head dims up to
    256 (E may differ from Ev). Differentiable in q, k, v. Under ``torch.autocast`` q, k, v are cast
    as torch's SDPA casts its inputs (to the autocast dtype; ``alibi_slopes`` stays float32).
    """
    fn = "flash_attention"
    _check_qkv_common(fn, q, k, v)
    varlen = cu_seqlens_q is not None or cu_seqlens_k is not None
    want = 3 if varlen else 4
    layout = "(total, heads, dim)" if varlen else "(batch, seq, heads, dim)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            _fail(fn, f"{name} must be {layout}, got shape {tuple(t.shape)}")
    if k.shape[-1] != q.shape[-1]:
        _fail(fn, f"k head dim {k.shape[-1]} != q head dim {q.shape[-1]}")
    if v.shape[:-1] != k.shape[:-1]:
        _fail(fn, f"v shape {tuple(v.shape)} must match k shape {tuple(k.shape)} except the last dim")
    hq, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or hq % hk != 0:
        _fail(fn, f"q heads {hq} must be a multiple of k heads {hk} (GQA/MQA)")
    if varlen:
        if cu_seqlens_q is None or cu_seqlens_k is None:
            _fail(fn, "give both cu_seqlens_q and cu_seqlens_k for varlen")
        _check_cu(fn, "cu_seqlens_q", cu_seqlens_q, q)
        _check_cu(fn, "cu_seqlens_k", cu_seqlens_k, q)
        if cu_seqlens_k.numel() != cu_seqlens_q.numel():
            _fail(fn, f"cu_seqlens_k has {cu_seqlens_k.numel()} offsets, cu_seqlens_q {cu_seqlens_q.numel()}")
        cu_q, cu_k = cu_seqlens_q.to(torch.int32), cu_seqlens_k.to(torch.int32)
        _check_offsets(fn, "cu_seqlens_q", cu_q, q.shape[0])
        _check_offsets(fn, "cu_seqlens_k", cu_k, k.shape[0])
        max_q = _longest(fn, "max_seqlen_q", cu_q) if max_seqlen_q is None else int(max_seqlen_q)
        max_k = _longest(fn, "max_seqlen_k", cu_k) if max_seqlen_k is None else int(max_seqlen_k)
        q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        batch = cu_q.numel() - 1
    else:
        if k.shape[0] != q.shape[0]:
            _fail(fn, f"k batch {k.shape[0]} != q batch {q.shape[0]}")
        cu_q = cu_k = None
        max_q = max_k = 0
        q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))
        batch = q.shape[0]
    window, softcap, alibi = check_features(fn, dropout_p, window_size, softcap, alibi_slopes, q, batch, hq)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    out4, lse = attention(q4, k4, v4, None, cu_q, cu_k, max_q, max_k, scale=scale,
                          causal=BOTTOM_RIGHT if causal else NONE, window=window, softcap=softcap, alibi=alibi,
                          dropout_p=float(dropout_p), deterministic=bool(deterministic), backend=backend)
    out = out4[0].transpose(0, 1) if varlen else out4.transpose(1, 2)
    if not return_lse:
        return out
    return out, (lse[0] if varlen else lse)


# ----------------------------------------------------------------------------------------------
# scaled_dot_product_attention: torch's semantics
# ----------------------------------------------------------------------------------------------
def _score_batch(query: Tensor, key: Tensor, enable_gqa: bool) -> tuple[int, ...]:
    """Batch dims of the (..., L, S) score matrix: query's and key's broadcast (GQA: query heads)."""
    fn = "scaled_dot_product_attention"
    kb = list(key.shape[:-2])
    if enable_gqa:
        kb[-1] = query.shape[-3]
    try:
        return tuple(torch.broadcast_shapes(query.shape[:-2], tuple(kb)))
    except RuntimeError:
        _fail(fn, f"key batch dims {tuple(key.shape[:-2])} do not broadcast with query batch dims "
                  f"{tuple(query.shape[:-2])}")


def _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> None:
    fn = "scaled_dot_product_attention"
    _check_qkv_common(fn, query, key, value, ("query", "key", "value"))
    for name, t in (("query", query), ("key", key), ("value", value)):
        if t.dim() < 2:
            _fail(fn, f"{name} must be (..., seq, dim) with at least 2 dims, got shape {tuple(t.shape)}")
    if key.shape[-1] != query.shape[-1]:
        _fail(fn, f"key head dim {key.shape[-1]} != query head dim {query.shape[-1]}")
    if value.shape[-2] != key.shape[-2]:
        _fail(fn, f"value has {value.shape[-2]} positions (dim -2), key has {key.shape[-2]}")
    if enable_gqa:
        for name, t in (("key", key), ("value", value)):
            if t.dim() < 3 or query.dim() < 3 or t.shape[-3] == 0 or query.shape[-3] % t.shape[-3] != 0:
                _fail(fn, f"enable_gqa: query heads (dim -3) must be a multiple of {name} heads, got query "
                          f"{tuple(query.shape)}, {name} {tuple(t.shape)}")
    batch = _score_batch(query, key, enable_gqa)
    vb = list(value.shape[:-2])
    if enable_gqa:
        vb[-1] = query.shape[-3]
    try:
        torch.broadcast_shapes(batch, tuple(vb))
    except RuntimeError:
        _fail(fn, f"value batch dims {tuple(value.shape[:-2])} do not broadcast with the scores' {batch}")
    if not 0.0 <= dropout_p <= 1.0:
        _fail(fn, f"dropout_p must lie in [0, 1], got {dropout_p}")
    if attn_mask is not None:
        if is_causal:
            _fail(fn, "attn_mask must be None when is_causal=True (torch raises the same)")
        if not isinstance(attn_mask, Tensor):
            _fail(fn, f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}", TypeError)
        if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
            _fail(fn, f"attn_mask dtype must be bool, float32 or the query dtype {query.dtype}, got {attn_mask.dtype}",
                  TypeError)
        if attn_mask.device != query.device:
            _fail(fn, f"attn_mask is on {attn_mask.device}, query on {query.device}")
        scores = batch + (query.shape[-2], key.shape[-2])
        try:
            ok = tuple(torch.broadcast_shapes(attn_mask.shape, scores)) == scores
        except RuntimeError:
            ok = False
        if not ok:
            _fail(fn, f"attn_mask shape {tuple(attn_mask.shape)} does not broadcast to the attention weights' "
                      f"shape {scores}")


def _as4d(t: Tensor) -> Tensor:
    """(..., H, L, E) -> (B, H, L, E): a view for 2-4 dims, a reshape (view when strides allow) above."""
    if t.dim() == 4:
        return t
    if t.dim() < 4:
        return t.reshape((1,) * (4 - t.dim()) + tuple(t.shape))
    return t.reshape(-1, *t.shape[-3:])


def _sdpa_triton_reasons(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa) -> list[str]:
    reasons = []
    if not (query.dim() == key.dim() == value.dim() and query.shape[:-3] == key.shape[:-3] == value.shape[:-3]):
        reasons.append("query/key/value batch dims differ (broadcast batch dims go to reference)")
    hq = query.shape[-3] if query.dim() >= 3 else 1
    hk = key.shape[-3] if key.dim() >= 3 else 1
    hv = value.shape[-3] if value.dim() >= 3 else 1
    if hk != hv or not (hk == hq or hk == 1 or (enable_gqa and hq % hk == 0)):
        reasons.append(f"head counts query {hq}, key {hk}, value {hv} are not equal, GQA or broadcast")
    return reasons + _kernel_reasons(query, key, value, attn_mask, None)


@SDPA.register("triton", supports=_sdpa_triton_reasons, caps=TRITON)
def _sdpa_triton(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa):
    q4, k4, v4 = _as4d(query), _as4d(key), _as4d(value)
    mask4 = None
    if attn_mask is not None:
        mask4 = _as4d(attn_mask.expand(*query.shape[:-1], key.shape[-2]))
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else float(scale)
    out4, _ = attention(q4, k4, v4, mask4, scale=scale, causal=TOP_LEFT if is_causal else NONE,
                        dropout_p=float(dropout_p), backend="triton")
    return out4.reshape(*query.shape[:-1], value.shape[-1])


SDPA.register("reference")(reference.sdpa)


@autocast_as(SDPA_AUTOCAST)
def scaled_dot_product_attention(query: Tensor, key: Tensor, value: Tensor, attn_mask: Tensor | None = None,
                                 dropout_p: float = 0.0, is_causal: bool = False, scale: float | None = None,
                                 enable_gqa: bool = False, *, backend: str | None = None) -> Tensor:
    """Drop-in for ``torch.nn.functional.scaled_dot_product_attention`` (same signature and result).

    ``query (..., L, E)``, ``key (..., S, E)``, ``value (..., S, Ev)`` -> ``(..., L, Ev)``::

        out = dropout(softmax(scale * query @ key^T + bias)) @ value,   scale = 1/sqrt(E) by default

    ``attn_mask`` broadcasts to the (..., L, S) weights: bool (True = take part) or additive float
    (float32 or the query dtype). ``is_causal`` applies torch's **top-left** causal mask
    ``ones(L, S).tril()`` (query ``i`` sees keys ``j <= i``, whatever L and S). A row with every
    key masked gives 0 (as torch >= 2.5's math path), not NaN. ``enable_gqa``: key/value heads
    (dim -3) divide the query heads; query head ``h`` reads kv head ``h // (Hq // Hk)``.

    Backends: ``triton`` (fp16/bf16/float32 CUDA tensors, equal batch dims, equal heads or GQA or
    one broadcast kv head, head dims <= 256, bool or float masks without gradient, dropout in the
    kernels: ``seqgen_fast.kernels.attention``, no L x S buffer; on Hopper the forward without a
    mask or dropout is the warp-specialised Gluon kernel) and ``reference`` (everything else,
    torch's math path in plain ops). ``backend=`` forces one (also ``seqgen_fast.use_backend``).
    Under ``torch.autocast`` the inputs (the float mask included) are cast as torch's: to the
    autocast dtype on CPU and CUDA alike (float64 is left alone).
    """
    _check_sdpa(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)
    chosen = SDPA.select(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa, backend=backend)
    return SDPA.impl(chosen)(query, key, value, attn_mask, dropout_p, is_causal, scale, enable_gqa)


# ----------------------------------------------------------------------------------------------
# Tuning ahead of time
# ----------------------------------------------------------------------------------------------
def warmup(shapes, *, dtypes=(torch.bfloat16,), causal=(False, True), backward: bool = True,
           device: torch.device | str | None = None) -> int:
    """Tune the attention kernels ahead of time (before any CUDA-graph capture or compile), so
    that later calls, captured or compiled ones included, find a measured config for their key.

    ``shapes``: ``(batch, seq, heads, head_dim)`` or ``(batch, seqlen_q, seqlen_k, heads, heads_k,
    head_dim)`` tuples; each runs once per dtype and causal flag, forward (and backward). The
    winners persist on disk per GPU and Triton version (``seqgen_fast.kernels._tuning``), so a
    later process reuses them. Returns the number of calls made."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        raise RuntimeError(f"warmup: tuning times GPU kernels; {dev} is not a CUDA device")
    calls = 0
    for shape in shapes:
        if len(shape) == 4:
            b, s, h, d = shape
            shape = (b, s, s, h, h, d)
        if len(shape) != 6:
            raise ValueError(f"warmup: a shape is (batch, seq, heads, head_dim) or (batch, seqlen_q, seqlen_k, heads, "
                             f"heads_k, head_dim), got {shape!r}")
        b, lq, lk, h, hk, d = (int(x) for x in shape)
        for dtype in dtypes:
            for c in causal:
                q = torch.randn(b, lq, h, d, device=dev, dtype=dtype, requires_grad=backward)
                k, v = (torch.randn(b, lk, hk, d, device=dev, dtype=dtype, requires_grad=backward) for _ in range(2))
                out = flash_attention(q, k, v, causal=c)
                if backward:
                    torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
                calls += 1
    torch.cuda.synchronize(dev)
    return calls
