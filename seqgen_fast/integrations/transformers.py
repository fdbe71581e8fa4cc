"""``attn_implementation="seqgen_fast"`` for Hugging Face transformers models.

:func:`register` adds :func:`attention_forward` to ``transformers.AttentionInterface`` and
transformers' SDPA mask builder to its ``AttentionMaskInterface`` under the name
``"seqgen_fast"``; models that accept an attention backend (Llama-, GPT-2-style and most others
built on ``ALL_ATTENTION_FUNCTIONS``) then run with::

    seqgen_fast.integrations.transformers.register()
    model = AutoModelForCausalLM.from_pretrained(..., attn_implementation="seqgen_fast")
    # or, on a loaded model: model.set_attn_implementation("seqgen_fast")

transformers is imported inside :func:`register` only.
"""
from __future__ import annotations

import torch

NAME = "seqgen_fast"


def attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                      attention_mask: torch.Tensor | None, dropout: float = 0.0, scaling: float | None = None,
                      is_causal: bool | None = None, **kwargs) -> tuple[torch.Tensor, None]:
    """transformers' attention-function contract, computed by seqgen_fast.

    ``query`` (B, H, L, D); ``key``/``value`` (B, Hkv, S, D), the cache already updated by the
    model (query head ``h`` reads kv head ``h // (H // Hkv)``); ``attention_mask`` None or the
    SDPA-style mask built by transformers (bool True = attend, or additive float), broadcastable
    to (B, H, L, S). Returns ``(out (B, L, H, D), None)`` -- no attention weights.

    Causality follows transformers' SDPA path: ``is_causal`` (default ``module.is_causal``)
    applies only when ``L > 1`` and there is no mask (the mask carries it otherwise). One new
    token without a mask (cached generation, no padding) runs
    ``seqgen_fast.functional.decode_attention`` over all ``S`` cached keys (a strided view of
    transformers' (B, Hkv, S, D) cache, no copy); everything else runs
    ``seqgen_fast.functional.scaled_dot_product_attention`` with ``enable_gqa``.
    """
    from .. import functional

    if kwargs.get("softcap") is not None:
        raise ValueError("attn_implementation='seqgen_fast' does not support `softcap`")
    if kwargs.get("cache") is not None:
        raise ValueError("attn_implementation='seqgen_fast' does not support paged caches (continuous batching)")
    position_bias = kwargs.get("position_bias")
    q_len, kv_len = query.shape[2], key.shape[2]
    is_causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    is_causal = q_len > 1 and attention_mask is None and bool(is_causal)
    if is_causal and kv_len > q_len:
        # top-left causal alignment never reaches keys past q_len (an empty static cache's tail)
        key, value = key[:, :, :q_len], value[:, :, :q_len]
        position_bias = None if position_bias is None else position_bias[..., :q_len]
    if position_bias is not None:
        from transformers.integrations.sdpa_attention import create_position_bias_mask

        attention_mask = create_position_bias_mask(position_bias, attention_mask, is_causal, query, key)
        is_causal = False

    same_dims = key.shape[-1] == value.shape[-1] == query.shape[-1] and key.shape[0] == query.shape[0]
    if q_len == 1 and attention_mask is None and dropout == 0.0 and same_dims:
        lens = torch.full((query.shape[0],), kv_len, dtype=torch.int32, device=query.device)
        out = functional.decode_attention(query[:, :, 0], key.transpose(1, 2), value.transpose(1, 2), lens,
                                          scale=scaling, check_seqlens=False)  # lens == S by construction
        return out[:, None], None
    out = functional.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=dropout,
                                                  is_causal=is_causal, scale=scaling,
                                                  enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def register() -> None:
    """Register ``"seqgen_fast"`` with transformers' attention and mask interfaces (idempotent)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
