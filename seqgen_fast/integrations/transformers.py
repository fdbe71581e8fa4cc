"""seqgen_fast's kernels behind Hugging Face transformers' attention interface.

:func:`register` adds two attention implementations (idempotent; transformers is imported here only):

* ``"seqgen_fast"`` -- for ``model.generate`` with a ``DynamicCache`` or a ``StaticCache``, also under
  ``torch.compile(mode="reduce-overhead")`` (no graph break in the attention function), with
  transformers' SDPA masks::

      seqgen_fast.integrations.transformers.register()
      model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="seqgen_fast")
      # or, on a loaded model: model.set_attn_implementation("seqgen_fast")

* ``"seqgen_fast_flash2"`` (:data:`PAGED_NAME`) -- for continuous batching (``model.generate_batch``,
  its ``PagedAttentionCache``): prefill runs the varlen flash kernel over the packed sequences, and
  the decode fast path calls ``flash_attn_with_kvcache`` with transformers' block table, so the new
  keys/values are appended to the pages inside the kernel. transformers admits only names that
  contain "flash" (and "2" or "3" for the block-table path) to continuous batching, and resolves
  the kvcache function of such a name through its flash-attn loader: :func:`register` seeds that
  loader (``transformers.modeling_flash_attention_utils``'s module state, not a public API) with
  seqgen_fast's flash-attn functions. Using another flash implementation in the same process
  replaces them: call :func:`register` again before switching back.
"""
from __future__ import annotations

import torch

NAME = "seqgen_fast"
PAGED_NAME = "seqgen_fast_flash2"
# Queries per sequence up to which the KV-cache kernel serves a call (decode, speculative tokens):
# its programs hold every query row of a GQA group; longer prefills go to the flash prefill kernel.
DECODE_MAX_QUERIES = 16


def _key_bounds(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(first, last + 1) visible key of each sequence under a (B, L, S) bool mask, on the device: the
    kernel skips the keys outside (they are masked anyway), e.g. a static cache's unused tail."""
    seen = mask.any(dim=1)                                              # (B, S)
    any_key = seen.any(dim=-1)
    first = seen.int().argmax(dim=-1)
    end = seen.shape[-1] - seen.flip(-1).int().argmax(dim=-1)
    return torch.where(any_key, end, 0), torch.where(any_key, first, 0)


def _decode(module, query, key, value, attention_mask, scaling, causal: bool, window=(-1, -1), softcap=0.0):
    """The KV-cache kernel over transformers' (B, Hkv, S, D) keys/values (strided views, no copy):
    every key, or the keys a bool (B, 1, L, S) mask allows. Returns (B, L, H, D)."""
    from ..ops import decode

    q = query.transpose(1, 2)
    k_view, v_view = key.transpose(1, 2), value.transpose(1, 2)
    lens = leftpad = key_mask = None
    if attention_mask is not None:
        key_mask = attention_mask[:, 0].expand(query.shape[0], query.shape[2], key.shape[2])
        lens, leftpad = _key_bounds(key_mask)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    out, _ = decode.kvcache_attention(q, k_view, v_view, cache_seqlens=lens, cache_leftpad=leftpad, key_mask=key_mask,
                                      scale=scale, causal=causal, window=window, softcap=softcap)
    return out


def _decode_fits(query, key, value, attention_mask, dropout) -> bool:
    """Whether the KV-cache kernel computes this call exactly: few queries, no dropout, equal head dims,
    and no mask or a bool mask shared by the heads."""
    if query.shape[2] > DECODE_MAX_QUERIES or dropout != 0.0 or key.shape[0] != query.shape[0]:
        return False
    if not key.shape[-1] == value.shape[-1] == query.shape[-1]:
        return False
    return attention_mask is None or (attention_mask.dtype == torch.bool and attention_mask.dim() == 4
                                      and attention_mask.shape[1] == 1)


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by seqgen_fast (``"seqgen_fast"``).

    ``query`` (B, H, L, D); ``key``/``value`` (B, Hkv, S, D), the cache already updated by the
    model (query head ``h`` reads kv head ``h // (H // Hkv)``); ``attention_mask`` None or the
    SDPA-style mask built by transformers (bool True = attend, or additive float), broadcastable
    to (B, H, L, S). Returns ``(out (B, L, H, D), None)`` -- no attention weights.

    Causality follows transformers' SDPA path: ``is_causal`` (default ``module.is_causal``)
    applies only when ``L > 1`` and there is no mask (the mask carries it otherwise). Up to
    ``DECODE_MAX_QUERIES`` queries with no mask or a bool mask shared by the heads (cached
    generation: a dynamic cache, a static cache with its mask, speculative tokens) run
    ``flash_attn_with_kvcache``'s kernel over the cache in place, restricted to the keys the mask
    allows; everything else runs ``seqgen_fast.functional.scaled_dot_product_attention``.
    """
    from .. import functional

    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='seqgen_fast' does not support `softcap`")
    position_bias = kwargs.get("position_bias")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and bool(is_causal)
    if position_bias is None and _decode_fits(query, key, value, attention_mask, dropout) \
            and (not is_causal or kv_len == q_len):  # without a mask transformers only skips it when S == L
        return _decode(module, query, key, value, attention_mask, scaling, is_causal), None
    if is_causal and kv_len > q_len:
        # top-left causal alignment never reaches keys past q_len (an empty static cache's tail)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = None if position_bias is None else position_bias[..., :q_len]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False
    out = functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                  is_causal=is_causal, scale=scaling,
                                                  enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def paged_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                            attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                            is_causal: bool | None = None, sliding_window: int | None = None,
                            softcap: float | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' flash attention-function contract (``PAGED_NAME``), for continuous batching.

    * decode fast path (``block_table``, ``k_cache``, ``v_cache``, ``cu_seq_lens_k`` in kwargs): one new
      token per sequence, ``query``/``key``/``value`` (1, H or Hkv, T, D) for T sequences; the new key
      and value are appended to the pages by ``flash_attn_with_kvcache`` at
      ``cache_seqlens = diff(cu_seq_lens_k) - 1`` (a padding sequence's -1 is clamped on the device);
    * varlen path (``cu_seq_lens_q``/``cu_seq_lens_k``/``max_length_q``/``max_length_k``): the packed
      sequences through ``seqgen_fast.functional.flash_attention`` (bottom-right causal);
    * otherwise (``model.generate`` with this name): a 2D padding mask or None, as transformers'
      flash mask gives, becomes a bool mask for :func:`attention_forward`.

    ``sliding_window`` and ``softcap`` are passed as flash-attn takes them. Returns ``(out (B, L, H, D), None)``.
    """
    from .. import functional
    from ..ops.decode import flash_attn_with_kvcache

    causal = bool(module.is_causal if is_causal is None else is_causal)
    window = (-1, -1)
    if sliding_window is not None and key.shape[2] > sliding_window:
        window = (sliding_window - 1, sliding_window - 1)
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    table, k_cache, v_cache = kwargs.get("block_table"), kwargs.get("k_cache"), kwargs.get("v_cache")
    if table is not None and k_cache is not None and cu_k is not None:
        q, k, v = (t.transpose(1, 2).reshape(-1, 1, t.shape[1], t.shape[-1]) for t in (query, key, value))
        n = k.shape[0]
        lens = (cu_k[1:n + 1] - cu_k[:n] - 1).to(torch.int32)
        table = table[:, : k_cache.shape[0]].to(torch.int32)  # no sequence holds more pages than the cache has
        out = flash_attn_with_kvcache(q, k_cache, v_cache, k, v, cache_seqlens=lens, block_table=table,
                                      softmax_scale=scaling, causal=causal, window_size=window, softcap=softcap or 0.0)
        return out.view(query.shape[0], -1, *out.shape[-2:]), None
    if cu_q is not None and cu_k is not None:
        q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # (total, heads, dim)
        out = functional.flash_attention(q, k, v, causal=causal, scale=scaling, cu_seqlens_q=cu_q.to(torch.int32),
                                         cu_seqlens_k=cu_k.to(torch.int32), max_seqlen_q=int(kwargs["max_length_q"]),
                                         max_seqlen_k=int(kwargs["max_length_k"]), window_size=window,
                                         softcap=softcap or 0.0)
        return out[None], None
    if attention_mask is not None and attention_mask.dim() == 2:  # (B, S) padding: causal, bottom-right
        q_len, kv_len = query.shape[2], key.shape[2]
        rows = torch.arange(q_len, device=query.device)[:, None] + kv_len - q_len
        visible = torch.arange(kv_len, device=query.device)[None, :] <= rows
        attention_mask = attention_mask.bool()[:, None, None, :] & visible
    return attention_forward(module, query, key, value, attention_mask, dropout, scaling, is_causal, **kwargs)


def _seed_flash_loader() -> None:
    """Make transformers' flash loader resolve :data:`PAGED_NAME` to seqgen_fast's flash-attn functions."""
    from transformers import modeling_flash_attention_utils as flash_utils

    from . import flash_attn

    flash_utils._flash_fn = flash_attn.flash_attn_func
    flash_utils._flash_varlen_fn = flash_attn.flash_attn_varlen_func
    flash_utils._flash_with_kvcache_fn = flash_attn.flash_attn_with_kvcache
    flash_utils._pad_fn, flash_utils._unpad_fn = flash_utils._pad_input, flash_utils._unpad_input
    flash_utils._process_flash_kwargs_fn = flash_utils._lazy_define_process_function(flash_attn.flash_attn_varlen_func)
    flash_utils._process_with_kvcache_kwargs_fn = flash_utils._lazy_define_process_function(
        flash_attn.flash_attn_with_kvcache)
    flash_utils._loaded_implementation = PAGED_NAME


def register() -> None:
    """Register ``"seqgen_fast"`` and :data:`PAGED_NAME` with transformers' attention and mask interfaces
    (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, flash_attention_mask, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    AttentionInterface.register(PAGED_NAME, paged_attention_forward)
    AttentionMaskInterface.register(PAGED_NAME, flash_attention_mask)
    _seed_flash_loader()
