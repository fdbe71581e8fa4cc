"""KV-cache attention: ``flash_attn_with_kvcache`` (flash-attn 2.x's contract) and ``decode_attention``.

Two ``torch.library`` ops share one implementation per backend (dispatch order triton, reference):
``seqgen_fast::kvcache_attention`` reads the cache; ``seqgen_fast::kvcache_attention_append`` also
writes the new keys/values into it (``mutates_args=("k_cache", "v_cache")``), so a compiled graph
without an append never sees a mutation. Both return ``(out, lse)``.

No host sync by default: the checks that need device values (lengths, batch and page indices in
range) run on the host only under ``seqgen_fast.debug_checks()`` or ``SEQGEN_FAST_DEBUG_CHECKS=1``
(skipped inside a CUDA-graph capture); otherwise the kernels clamp every value into range.
Shapes, dtypes and devices are always checked, and a bad one raises an error naming the argument.
Non-finite values follow the policy of ``seqgen_fast.ops.attention`` (cache rows past a sequence's
length are never read, whatever they hold).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .. import _debug
from .._backend import Capabilities, dispatcher
from ..reference import decode as reference
from ._library import custom_op
from .rotary import offset_reasons

KVCACHE = dispatcher("kvcache_attention", order=("triton", "reference"))
TRITON = Capabilities("triton", dtypes=(torch.float16, torch.bfloat16, torch.float32), head_dims=(16, 256))
_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


class KVCacheArgumentError(ValueError, RuntimeError):
    """A bad shape, layout or device of a KV-cache attention argument. A ValueError, and a
    RuntimeError too, as flash-attn's own checks raise."""


class KVCacheDtypeError(TypeError, RuntimeError):
    """A KV-cache attention argument of the wrong dtype (a TypeError, and a RuntimeError as in flash-attn)."""


# The implementation arguments, in order: q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin,
# cache_batch_idx, cache_leftpad, block_table, scale, causal, window_left, window_right, softcap,
# rotary_interleaved, alibi_slopes, key_mask, num_splits.
@KVCACHE.register("reference")
def _reference(*args):
    return reference.kvcache_attention(*args[:-1])


def _triton_supports(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
                     cache_leftpad, block_table, scale, causal, window_left, window_right, softcap,
                     rotary_interleaved, alibi_slopes, key_mask, num_splits) -> list[str]:
    return TRITON.reasons(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
                          cache_leftpad, block_table, alibi_slopes, key_mask, head_dims=(q.shape[-1],)) + \
        offset_reasons(q=q, k_cache=k_cache, v_cache=v_cache, k=k, v=v)


@KVCACHE.register("triton", supports=_triton_supports, caps=TRITON)
def _triton(*args):
    from ..kernels import decode as kernel

    return kernel.kvcache_attention(*args)


# ----------------------------------------------------------------------------------------------
# Host-side value checks (debug only)
# ----------------------------------------------------------------------------------------------
def _in_range(fn: str, name: str, values: Tensor, lo, hi, why: str) -> None:
    """Raise unless every element lies in [lo, hi] (lo/hi scalars or tensors like ``values``)."""
    bad = ((values < lo) | (values > hi)).flatten()
    if bool(bad.any()):
        i = int(bad.nonzero()[0, 0])
        got = values.flatten()[i]
        hi_i = hi.flatten()[i] if isinstance(hi, Tensor) else hi
        lo_i = lo.flatten()[i] if isinstance(lo, Tensor) else lo
        raise ValueError(f"{fn}: {name} must lie in [{int(lo_i)}, {int(hi_i)}] ({why}); got {int(got)} at index {i}")


def _host_checks(fn, k_cache, cache_seqlens, lk, cache_batch_idx, cache_leftpad, block_table) -> None:
    """The value checks the kernels replace by clamps (one device-to-host sync each)."""
    paged = block_table is not None
    cap = block_table.shape[1] * k_cache.shape[1] if paged else k_cache.shape[1]
    lens = None
    if cache_seqlens is not None and cache_seqlens.numel():
        lens = cache_seqlens.to(torch.int64)
        where = "the new keys are written at rows cache_seqlens[b] .. + k.shape[1] - 1 " if lk else ""
        _in_range(fn, "cache_seqlens", lens, 0, cap - lk,
                  f"{where}of a cache of {cap} rows per sequence".strip())
    if cache_leftpad is not None and cache_leftpad.numel():
        top = lens if lens is not None else cap
        _in_range(fn, "cache_leftpad", cache_leftpad.to(torch.int64), 0, top, "at most cache_seqlens[b]")
    if cache_batch_idx is not None and cache_batch_idx.numel():
        _in_range(fn, "cache_batch_idx", cache_batch_idx.to(torch.int64), 0, k_cache.shape[0] - 1,
                  f"rows of a k_cache of {k_cache.shape[0]} sequences")
    if paged and block_table.numel():
        used = torch.full((block_table.shape[0],), cap, device=block_table.device) if lens is None else lens + lk
        cols = torch.arange(block_table.shape[1], device=block_table.device)
        in_use = cols[None, :] * k_cache.shape[1] < used[:, None]
        pages = torch.where(in_use, block_table.to(torch.int64), 0)
        _in_range(fn, "block_table", pages, 0, k_cache.shape[0] - 1,
                  f"page indices of a k_cache of {k_cache.shape[0]} pages, where a sequence's rows are in use")


def _fake(q, *args):
    lse_dtype = torch.float64 if q.dtype == torch.float64 else torch.float32
    out = q.new_empty(q.shape)
    return out, q.new_empty((q.shape[0], q.shape[2], q.shape[1]), dtype=lse_dtype)


def _run(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table,
         alibi_slopes, key_mask, scale, causal, window_left, window_right, softcap, rotary_interleaved, num_splits,
         check, backend):
    if check and _debug.enabled() and _debug.host_reads_allowed(q):
        _host_checks(check, k_cache, cache_seqlens, 0 if k is None else k.shape[1], cache_batch_idx, cache_leftpad,
                     block_table)
    return KVCACHE.impl(backend)(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx,
                                 cache_leftpad, block_table, scale, causal, window_left, window_right, softcap,
                                 rotary_interleaved, alibi_slopes, key_mask, num_splits)


@custom_op("kvcache_attention", fake=_fake)
def _kvcache_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_seqlens: Tensor | None, rotary_cos: Tensor | None,
                rotary_sin: Tensor | None, cache_batch_idx: Tensor | None, cache_leftpad: Tensor | None,
                block_table: Tensor | None, alibi_slopes: Tensor | None, key_mask: Tensor | None, scale: float,
                causal: bool, window_left: int, window_right: int, softcap: float, rotary_interleaved: bool,
                num_splits: int, check: str, backend: str) -> tuple[Tensor, Tensor]:
    return _run(q, k_cache, v_cache, None, None, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad,
                block_table, alibi_slopes, key_mask, scale, causal, window_left, window_right, softcap,
                rotary_interleaved, num_splits, check, backend)


@custom_op("kvcache_attention_append", mutates_args=("k_cache", "v_cache"), fake=_fake)
def _kvcache_append_op(q: Tensor, k_cache: Tensor, v_cache: Tensor, k: Tensor, v: Tensor, cache_seqlens: Tensor | None,
                       rotary_cos: Tensor | None, rotary_sin: Tensor | None, cache_batch_idx: Tensor | None,
                       cache_leftpad: Tensor | None, block_table: Tensor | None, alibi_slopes: Tensor | None,
                       key_mask: Tensor | None, scale: float, causal: bool, window_left: int, window_right: int,
                       softcap: float, rotary_interleaved: bool, num_splits: int, check: str,
                       backend: str) -> tuple[Tensor, Tensor]:
    return _run(q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad,
                block_table, alibi_slopes, key_mask, scale, causal, window_left, window_right, softcap,
                rotary_interleaved, num_splits, check, backend)


# ----------------------------------------------------------------------------------------------
# Argument checks (shapes, dtypes, devices: no sync)
# ----------------------------------------------------------------------------------------------
def _fail(fn: str, msg: str, exc=KVCacheArgumentError):
    raise exc(f"{fn}: {msg}")


def _tensor(fn: str, name: str, t, dims: int | None = None, shape: tuple | None = None, dtypes=None):
    if not isinstance(t, Tensor):
        _fail(fn, f"{name} must be a tensor, got {type(t).__name__}", KVCacheDtypeError)
    if dims is not None and t.dim() != dims:
        _fail(fn, f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if shape is not None and tuple(t.shape) != tuple(shape):
        _fail(fn, f"{name} must have shape {tuple(shape)}, got {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        names = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        _fail(fn, f"{name} must have dtype {names}, got {str(t.dtype).removeprefix('torch.')}", KVCacheDtypeError)
    return t


def _check_kvcache(fn, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx, cache_leftpad,
                   block_table, alibi_slopes, window_size, softcap, num_splits, int32_only: bool) -> int:
    """Every shape, dtype and device check of :func:`flash_attn_with_kvcache`; returns the capacity per sequence."""
    _tensor(fn, "q", q, dims=4)
    batch, lq, hq, head_dim = q.shape
    if q.dtype not in _FLOATS:
        _fail(fn, f"q must be float16, bfloat16, float32 or float64, got {q.dtype}", KVCacheDtypeError)
    _tensor(fn, "k_cache", k_cache, dims=4)
    _tensor(fn, "v_cache", v_cache, dims=4, shape=k_cache.shape)
    for name, t in (("k_cache", k_cache), ("v_cache", v_cache)):
        if t.dtype != q.dtype:
            _fail(fn, f"{name} dtype {t.dtype} must be q's dtype {q.dtype}", KVCacheDtypeError)
    hkv = k_cache.shape[2]
    if k_cache.shape[3] != head_dim:
        _fail(fn, f"k_cache head dim {k_cache.shape[3]} != q head dim {head_dim}")
    if hkv == 0 or hq % hkv != 0:
        _fail(fn, f"q heads {hq} must be a multiple of k_cache heads {hkv} (GQA/MQA)")
    index = (torch.int32,) if int32_only else (torch.int32, torch.int64)
    if block_table is not None:
        _tensor(fn, "block_table", block_table, dims=2, dtypes=(torch.int32,))
        if block_table.shape[0] != batch:
            _fail(fn, f"block_table must be (batch, max_pages) with batch {batch}, got {tuple(block_table.shape)}")
        if block_table.shape[1] > 0 and block_table.stride(1) != 1:
            _fail(fn, "block_table must have a contiguous last dimension")
        if block_table.shape[1] > k_cache.shape[0]:
            _fail(fn, f"block_table is {block_table.shape[1]} pages wide, more than the {k_cache.shape[0]} pages of "
                      "k_cache (num_pages, page_size, Hkv, D)")
        if cache_batch_idx is not None:
            _fail(fn, "a paged KV cache (block_table) does not take cache_batch_idx")
        cap = block_table.shape[1] * k_cache.shape[1]
    else:
        if cache_batch_idx is None and k_cache.shape[0] < batch:
            _fail(fn, f"k_cache has {k_cache.shape[0]} sequences, fewer than q's batch {batch} (pass cache_batch_idx "
                      "to index a larger cache)")
        cap = k_cache.shape[1]
    if cap == 0:
        _fail(fn, "k_cache holds no rows per sequence")
    for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
        if t is not None:
            _tensor(fn, name, t, shape=(batch,), dtypes=(torch.int32,))
    if cache_seqlens is not None:
        _tensor(fn, "cache_seqlens", cache_seqlens, shape=(batch,), dtypes=index)
    if (k is None) != (v is None):
        _fail(fn, "give both k and v, or neither")
    lk = 0
    if k is not None:
        _tensor(fn, "k", k, dims=4)
        lk = k.shape[1]
        for name, t in (("k", k), ("v", v)):
            _tensor(fn, name, t, shape=(batch, lk, hkv, head_dim))
            if t.dtype != q.dtype:
                _fail(fn, f"{name} dtype {t.dtype} must be q's dtype {q.dtype}", KVCacheDtypeError)
        if cache_seqlens is None:
            _fail(fn, "k and v are appended at cache_seqlens: pass cache_seqlens with them")
        if lk > cap:
            _fail(fn, f"k has {lk} new tokens, more than the cache's {cap} rows per sequence")
    if (rotary_cos is None) != (rotary_sin is None):
        _fail(fn, "give both rotary_cos and rotary_sin, or neither")
    if rotary_cos is not None:
        if k is None:
            _fail(fn, "rotary_cos/rotary_sin rotate the new keys: pass k and v with them")
        _tensor(fn, "rotary_cos", rotary_cos, dims=2)
        _tensor(fn, "rotary_sin", rotary_sin, shape=rotary_cos.shape)
        for name, t in (("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin)):
            if not t.dtype.is_floating_point:
                _fail(fn, f"{name} must be a floating tensor, got {t.dtype}", KVCacheDtypeError)
        rotary_dim = 2 * rotary_cos.shape[1]
        if rotary_dim == 0 or rotary_dim > head_dim:
            _fail(fn, f"rotary_cos must be (seqlen_ro, rotary_dim / 2) with 0 < rotary_dim <= head dim {head_dim}, "
                      f"got {tuple(rotary_cos.shape)}")
        if rotary_cos.shape[0] < cap:
            _fail(fn, f"rotary_cos/rotary_sin have {rotary_cos.shape[0]} positions, fewer than the {cap} rows of the "
                      "KV cache per sequence")
    if alibi_slopes is not None:
        _tensor(fn, "alibi_slopes", alibi_slopes, dtypes=(torch.float32,))
        if tuple(alibi_slopes.shape) not in ((hq,), (batch, hq)):
            _fail(fn, f"alibi_slopes must be ({hq},) or ({batch}, {hq}), got {tuple(alibi_slopes.shape)}")
    if not (isinstance(window_size, (tuple, list, Tensor)) and len(window_size) == 2
            and all(hasattr(w, "__index__") and not isinstance(w, bool) for w in window_size)):
        _fail(fn, f"window_size must be a (left, right) pair of ints, got {window_size!r}")
    if not isinstance(softcap, (int, float)) or softcap < 0:
        _fail(fn, f"softcap must be a float >= 0, got {softcap!r}")
    if not isinstance(num_splits, int) or num_splits < 0:
        _fail(fn, f"num_splits must be an int >= 0, got {num_splits!r}")
    tensors = {name: t for name, t in (("q", q), ("k_cache", k_cache), ("v_cache", v_cache), ("k", k), ("v", v),
                                       ("rotary_cos", rotary_cos), ("rotary_sin", rotary_sin),
                                       ("cache_seqlens", cache_seqlens), ("cache_batch_idx", cache_batch_idx),
                                       ("cache_leftpad", cache_leftpad), ("block_table", block_table),
                                       ("alibi_slopes", alibi_slopes)) if t is not None}
    off = [name for name, t in tensors.items() if t.device != q.device]
    if off:
        _fail(fn, f"{', '.join(off)} must be on q's device {q.device}, got "
                  + ", ".join(str(tensors[name].device) for name in off))
    return cap


def kvcache_attention(q, k_cache, v_cache, k=None, v=None, *, cache_seqlens=None, rotary_cos=None, rotary_sin=None,
                      cache_batch_idx=None, cache_leftpad=None, block_table=None, alibi_slopes=None, key_mask=None,
                      scale, causal=False, window=(-1, -1), softcap=0.0, rotary_interleaved=True, num_splits=0,
                      check="", backend=None) -> tuple[Tensor, Tensor]:
    """Dispatch and run one validated call (flash-attn's conventions already applied); ``(out, lse)``.

    ``key_mask`` (B, Lq or 1, S) bool, contiguous caches only, is an extra mask beyond flash-attn's
    API (transformers' attention masks); ``check`` names the calling function in the debug checks'
    errors ("" skips them).
    """
    window_left, window_right = (int(w) for w in window)
    args = (q, k_cache, v_cache, k, v, cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad,
            block_table, float(scale), bool(causal), window_left, window_right, float(softcap),
            bool(rotary_interleaved), alibi_slopes, key_mask, int(num_splits))
    chosen = KVCACHE.select(*args, backend=backend)
    tail = (cache_seqlens, rotary_cos, rotary_sin, cache_batch_idx, cache_leftpad, block_table, alibi_slopes, key_mask,
            *args[11:17], int(num_splits), check, chosen)
    if k is None:
        return _kvcache_op(q, k_cache, v_cache, *tail)
    return _kvcache_append_op(q, k_cache, v_cache, k, v, *tail)


def flash_attn_with_kvcache(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
                            cache_batch_idx=None, cache_leftpad=None, block_table=None, softmax_scale=None,
                            causal=False, window_size=(-1, -1), softcap=0.0, rotary_interleaved=True,
                            alibi_slopes=None, num_splits=0, return_softmax_lse=False):
    """flash-attn 2.x's ``flash_attn_with_kvcache`` on seqgen_fast's kernels (same signature, defaults,
    in-place append and return convention).

    Shapes:

    * ``q`` (batch, seqlen_q, nheads, headdim);
    * ``k_cache``/``v_cache`` (batch_cache, seqlen_cache, nheads_k, headdim), or with a ``block_table``
      (num_pages, page_size, nheads_k, headdim), any page size; ``nheads`` a multiple of ``nheads_k``
      (query head ``i`` reads kv head ``i // (nheads / nheads_k)``);
    * ``k``/``v`` (batch, seqlen_new, nheads_k, headdim) or None: written **in place** into the cache
      at rows ``cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1`` (``k`` after the rotary
      embedding) and attended to; ``cache_seqlens`` is not incremented;
    * ``rotary_cos``/``rotary_sin`` (seqlen_ro, rotary_dim / 2), ``seqlen_ro`` at least the cache's
      rows per sequence: k is rotated at positions ``cache_seqlens + j``; q at ``cache_seqlens + i``
      when causal or local, else every query token at ``cache_seqlens``. ``rotary_interleaved=True``
      pairs dims (0, 1), (2, 3), ... (GPT-J); False pairs ``i`` and ``i + rotary_dim / 2`` (GPT-NeoX).
      Dims past ``rotary_dim`` are not rotated. Only with ``k``/``v``;
    * ``cache_seqlens`` int or (batch,) int32: valid tokens per sequence before the append (None: the
      whole cache); ``cache_batch_idx`` (batch,) int32: the cache row of each sequence (no paging);
      ``cache_leftpad`` (batch,) int32: keys below it are not attended; ``block_table`` (batch,
      max_pages) int32: row ``p`` of sequence ``b`` is ``k_cache[block_table[b, p // page_size], p % page_size]``.

    ``causal=True`` is aligned bottom-right (query ``i`` sees keys ``<= i + seqlen_k - seqlen_q``,
    ``seqlen_k = cache_seqlens + seqlen_new``), which makes it the mask of speculative decoding and
    chunked prefill; with ``seqlen_q == 1`` (and no ALiBi) it changes nothing. ``window_size=(left,
    right)`` (-1 unbounded) keeps keys in ``[i + seqlen_k - seqlen_q - left, i + seqlen_k - seqlen_q +
    right]``. ``softcap > 0``: scores become ``softcap * tanh(scores / softcap)``. ``alibi_slopes``
    (nheads,) or (batch, nheads) float32 add ``-slope * |i + seqlen_k - seqlen_q - j|``. A query row
    that sees no key outputs 0 (its lse is ``+inf``).

    Returns ``out`` (batch, seqlen_q, nheads, headdim) in q's dtype, and with ``return_softmax_lse``
    also ``softmax_lse`` (batch, nheads, seqlen_q) float32 (natural log).

    Beyond flash-attn 2.x: any page size (flash-attn needs a multiple of 256), any even rotary dim
    (it needs a multiple of 16), paging together with ``cache_leftpad``, any strides, float32 inputs
    (and float64 on the reference path). Not differentiable (as in flash-attn). Errors name the
    argument; they are ``ValueError``/``TypeError`` and, as flash-attn's, ``RuntimeError``. Values on
    the device (lengths, indices) are clamped, not checked, unless ``seqgen_fast.debug_checks()`` is on.

    ``num_splits``: 0 (default) balances the work over the GPU (a stream-K schedule over 1-2 programs
    per SM, whatever the mix of lengths); 1 runs one program per (sequence, kv head) row block
    without splitting; ``n > 1`` splits each row block's keys over about ``n`` programs (at most 128).
    The reference backend ignores it. Backends: triton (CUDA), reference (plain PyTorch).
    """
    fn = "flash_attn_with_kvcache"
    if isinstance(cache_seqlens, int) and not isinstance(cache_seqlens, bool):
        if not isinstance(q, Tensor):
            _tensor(fn, "q", q)
        cache_seqlens = torch.full((q.shape[0],), cache_seqlens, dtype=torch.int32, device=q.device)
    _check_kvcache(fn, q, k_cache, v_cache, k, v, rotary_cos, rotary_sin, cache_seqlens, cache_batch_idx,
                   cache_leftpad, block_table, alibi_slopes, window_size, softcap, num_splits, int32_only=True)
    scale = q.shape[-1] ** -0.5 if softmax_scale is None else float(softmax_scale)
    if q.shape[1] == 1 and alibi_slopes is None:
        causal = False  # one query token sees every key either way
    out, lse = kvcache_attention(q, k_cache, v_cache, k, v, cache_seqlens=cache_seqlens, rotary_cos=rotary_cos,
                                 rotary_sin=rotary_sin, cache_batch_idx=cache_batch_idx, cache_leftpad=cache_leftpad,
                                 block_table=block_table, alibi_slopes=alibi_slopes, scale=scale, causal=causal,
                                 window=window_size, softcap=float(softcap),
                                 rotary_interleaved=rotary_interleaved, num_splits=num_splits, check=fn)
    return (out, lse) if return_softmax_lse else out


# ----------------------------------------------------------------------------------------------
# decode_attention: the compact one-token entry over the same ops
# ----------------------------------------------------------------------------------------------
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
        raise ValueError(f"decode_attention: v_cache shape {tuple(v_cache.shape)} != k_cache shape "
                         f"{tuple(k_cache.shape)}")
    batch, s_max, hkv, head_dim = k_cache.shape
    if q.shape[0] != batch:
        raise ValueError(f"decode_attention: q batch {q.shape[0]} != k_cache batch {batch}")
    if q.shape[2] != head_dim:
        raise ValueError(f"decode_attention: q head dim {q.shape[2]} != k_cache head dim {head_dim}")
    if hkv == 0 or q.shape[1] % hkv != 0:
        raise ValueError(f"decode_attention: q heads {q.shape[1]} must be a multiple of k_cache heads {hkv} (GQA)")
    if s_max == 0:
        raise ValueError("decode_attention: k_cache has S_max = 0 rows")
    if q.dtype not in _FLOATS:
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
    """Attention of one new query token per sequence over a preallocated KV cache (flash-decoding):
    :func:`flash_attn_with_kvcache` with one query token, a contiguous cache and no rotary, on the
    same kernels.

    Layout:

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

    Lengths: ``0 <= cache_seqlens[b] <= S_max`` (``<= S_max - 1`` when appending). No host sync by
    default: the kernel clamps each length into that range, so a bad length gives a wrong result
    for that sequence, never an access outside the cache. Under ``seqgen_fast.debug_checks()`` (or
    ``SEQGEN_FAST_DEBUG_CHECKS=1``) the range is checked on the host and raises ``ValueError``,
    unless ``check_seqlens=False``; the check is skipped inside a CUDA-graph capture.

    ``num_splits``: as :func:`flash_attn_with_kvcache` (0: balanced over the GPU from the shapes and the
    SM count; 1: no split; ``n``: about ``n`` programs per row block). Not differentiable (inference op).
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
    out, _ = kvcache_attention(q3[:, None], k_cache, v_cache, None if k3 is None else k3[:, None],
                               None if v3 is None else v3[:, None], cache_seqlens=cache_seqlens, scale=scale,
                               num_splits=num_splits, check="decode_attention" if check_seqlens else "",
                               backend=backend)
    return out if q.dim() == 4 else out[:, 0]
