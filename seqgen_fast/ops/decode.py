"""KV-cache decode attention: ``seqgen_fast.functional.decode_attention``.

Two ``torch.library`` ops share one implementation per backend (dispatch order triton,
reference): ``seqgen_fast::decode_attention`` reads the cache, ``seqgen_fast::decode_attention_append``
also writes the new token into it (``mutates_args=("k_cache", "v_cache")``), so a compiled
graph without an append never sees a mutation.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .._backend import Capabilities, dispatcher
from ..reference import decode as reference
from ._library import custom_op

DECODE = dispatcher("decode_attention", order=("triton", "reference"))
TRITON = Capabilities("triton", dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(16, 256))


@DECODE.register("reference")
def _reference(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits):
    return reference.decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)


def _triton_supports(q, k_cache, v_cache, cache_seqlens, k_new, v_new, *args, **kwargs) -> list[str]:
    return TRITON.reasons(q, k_cache, v_cache, cache_seqlens, k_new, v_new, head_dims=(q.shape[-1],))


@DECODE.register("triton", supports=_triton_supports, caps=TRITON)
def _triton(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits):
    from ..kernels import decode as kernel

    return kernel.decode_attention(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits)


def _capturing(t: Tensor) -> bool:
    return t.device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def _check_seqlens(cache_seqlens: Tensor, s_max: int, appending: bool, check: bool) -> None:
    """Host-side range check (one device-to-host sync); skipped while a CUDA graph is captured."""
    if not check or _capturing(cache_seqlens) or cache_seqlens.numel() == 0:
        return
    limit = s_max - 1 if appending else s_max
    lo, hi = torch.aminmax(cache_seqlens)
    lo, hi = int(lo), int(hi)
    if lo < 0 or hi > limit:
        raise ValueError(f"decode_attention: cache_seqlens must lie in [0, {limit}] "
                         f"({'S_max - 1: the new token is written at row cache_seqlens[b]' if appending else 'S_max'}"
                         f" for a cache of S_max={s_max} rows); got values in [{lo}, {hi}]")


def _fake(q, k_cache, v_cache, cache_seqlens, *args):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@custom_op("decode_attention", fake=_fake)
def _decode_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, scale: float, num_splits: int,
               check: bool, backend: str) -> Tensor:
    _check_seqlens(cache_seqlens, k_cache.shape[1], False, check)
    return DECODE.impl(backend)(q, k_cache, v_cache, cache_seqlens, None, None, scale, num_splits)


@custom_op("decode_attention_append", mutates_args=("k_cache", "v_cache"), fake=_fake)
def _decode_append_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, k_new: Tensor,
                      v_new: Tensor, scale: float, num_splits: int, check: bool, backend: str) -> Tensor:
    _check_seqlens(cache_seqlens, k_cache.shape[1], True, check)
    return DECODE.impl(backend)(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, num_splits)


def _one_token(t: Tensor, name: str) -> Tensor:
    """(B, H, D) as is; (B, 1, H, D) -> (B, H, D) (a view)."""
    if t.dim() == 4 and t.shape[1] == 1:
        return t[:, 0]
    if t.dim() != 3:
        raise ValueError(f"decode_attention: {name} must be (B, H, D) or (B, 1, H, D), got shape {tuple(t.shape)}")
    return t


def _validate(q, k_cache, v_cache, cache_seqlens, k_new, v_new) -> None:
    for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("cache_seqlens", cache_seqlens)):
        if not isinstance(t, Tensor):
            raise TypeError(f"decode_attention: {name} must be a tensor, got {type(t).__name__}")
    if k_cache.dim() != 4:
        raise ValueError(f"decode_attention: k_cache must be (B, S_max, Hkv, D), got shape {tuple(k_cache.shape)}")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"decode_attention: v_cache shape {tuple(v_cache.shape)} != k_cache shape {tuple(k_cache.shape)}")
    batch, s_max, hkv, head_dim = k_cache.shape
    if q.shape[0] != batch:
        raise ValueError(f"decode_attention: q batch {q.shape[0]} != k_cache batch {batch}")
    if q.shape[2] != head_dim:
        raise ValueError(f"decode_attention: q head dim {q.shape[2]} != k_cache head dim {head_dim}")
    if hkv == 0 or q.shape[1] % hkv != 0:
        raise ValueError(f"decode_attention: q heads {q.shape[1]} must be a multiple of k_cache heads {hkv} (GQA)")
    if s_max == 0:
        raise ValueError("decode_attention: k_cache has S_max = 0 rows")
    if q.dtype not in TRITON.dtypes + (torch.float64,):
        raise TypeError(f"decode_attention: q dtype {q.dtype} is not a floating type this op takes")
    if k_cache.dtype != q.dtype or v_cache.dtype != q.dtype:
        raise TypeError(f"decode_attention: k_cache ({k_cache.dtype}) and v_cache ({v_cache.dtype}) must have "
                        f"q's dtype ({q.dtype})")
    if cache_seqlens.shape != (batch,) or cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode_attention: cache_seqlens must be a ({batch},) int32 or int64 tensor, got "
                         f"{tuple(cache_seqlens.shape)} {cache_seqlens.dtype}")
    for name, t in (("k_new", k_new), ("v_new", v_new)):
        if t is None:
            continue
        if t.shape != (batch, hkv, head_dim):
            raise ValueError(f"decode_attention: {name} must be (B, Hkv, D) = {(batch, hkv, head_dim)} "
                             f"(or (B, 1, Hkv, D)), got {tuple(t.shape)}")
        if t.dtype != k_cache.dtype:
            raise TypeError(f"decode_attention: {name} dtype {t.dtype} != cache dtype {k_cache.dtype}")
    devices = {t.device for t in (q, k_cache, v_cache, cache_seqlens, k_new, v_new) if t is not None}
    if len(devices) > 1:
        raise ValueError("decode_attention: q, k_cache, v_cache, cache_seqlens (and k_new, v_new) must be on one "
                         f"device, got {sorted(map(str, devices))}")


def decode_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor, *,
                     k_new: Tensor | None = None, v_new: Tensor | None = None, scale: float | None = None,
                     num_splits: int = 0, check_seqlens: bool = True, backend: str | None = None) -> Tensor:
    """Attention of one new query token per sequence over a preallocated KV cache (flash-decoding).

    Layout (flash-attn's ``flash_attn_with_kvcache`` with one query token):

    * ``q``: (B, Hq, D), or (B, 1, Hq, D) -- the output has the same shape and dtype as ``q``;
    * ``k_cache``, ``v_cache``: (B, S_max, Hkv, D), any strides (views of a larger cache work);
      ``Hq`` a multiple of ``Hkv`` (GQA/MQA: query head ``i`` reads kv head ``i // (Hq // Hkv)``);
    * ``cache_seqlens``: (B,) int32 (or int64) on the cache's device, the number of valid tokens of
      each sequence *before* this step's append;
    * ``k_new``, ``v_new``: optional (B, Hkv, D) or (B, 1, Hkv, D), the cache's dtype: written in
      place at row ``cache_seqlens[b]`` of ``k_cache``/``v_cache``, and attended to as well.
      ``cache_seqlens`` itself is **not** incremented (as in flash-attn): add 1 after the call.

    With ``L_b = cache_seqlens[b] (+1 when appending)``::

        out[b, i] = sum_{n < L_b} softmax_n(scale * q[b, i] . k_cache[b, n, i // g]) v_cache[b, n, i // g]

    ``scale`` defaults to ``1 / sqrt(D)``. A sequence that attends to no token (``L_b = 0``) gets
    ``out[b] = 0`` (torch's SDPA over an empty key set would give NaN).

    Lengths: ``0 <= cache_seqlens[b] <= S_max`` (``<= S_max - 1`` when appending). Outside a CUDA
    graph capture this is checked on the host (one device-to-host sync; ``check_seqlens=False``
    skips it) and raises ``ValueError``. While a CUDA graph is being captured no check can run on
    the host: the kernel clamps each length into that range, so a bad length gives a wrong
    result for that sequence, never an access outside the cache.

    ``num_splits``: 0 picks the split count from the shapes and the SM count; a positive value
    forces it (the reference backend ignores it). Not differentiable (inference op).
    Backends: triton (CUDA), reference (plain PyTorch, float64 too).
    """
    q3 = _one_token(q, "q") if isinstance(q, Tensor) else q
    k3 = _one_token(k_new, "k_new") if isinstance(k_new, Tensor) else k_new
    v3 = _one_token(v_new, "v_new") if isinstance(v_new, Tensor) else v_new
    if (k_new is None) != (v_new is None):
        raise ValueError("decode_attention: give both k_new and v_new, or neither")
    _validate(q3, k_cache, v_cache, cache_seqlens, k3, v3)
    if num_splits < 0:
        raise ValueError(f"decode_attention: num_splits must be >= 0, got {num_splits}")
    scale = 1.0 / math.sqrt(q3.shape[-1]) if scale is None else float(scale)
    chosen = DECODE.select(q3, k_cache, v_cache, cache_seqlens, k3, v3, scale, num_splits, backend=backend)
    if k3 is None:
        out = _decode_op(q3, k_cache, v_cache, cache_seqlens, scale, num_splits, check_seqlens, chosen)
    else:
        out = _decode_append_op(q3, k_cache, v_cache, cache_seqlens, k3, v3, scale, num_splits, check_seqlens, chosen)
    return out.unsqueeze(1) if q.dim() == 4 else out
