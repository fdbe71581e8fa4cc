"""``seqgen_fast.nn.MultiheadAttention``: torch's ``nn.MultiheadAttention`` with a fused attention core.

A subclass of ``torch.nn.MultiheadAttention``: the constructor, the parameters
(``in_proj_weight`` or ``q_proj_weight``/``k_proj_weight``/``v_proj_weight``, ``in_proj_bias``,
``bias_k``/``bias_v``, ``out_proj``), ``add_zero_attn``, ``kdim``/``vdim``, ``batch_first`` and the
state_dict are torch's own. ``forward`` keeps torch's signature and semantics:

* ``need_weights=True`` (torch's default) runs torch's own implementation, so the returned
  attention weights (averaged over heads or not) are exactly torch's; so do nested tensors.
* ``need_weights=False`` computes the projections with ``F.linear``, applies ``bias_k``/``bias_v``
  and ``add_zero_attn`` as torch does, merges the masks into one additive mask and calls
  ``seqgen_fast.functional.scaled_dot_product_attention`` on (N, H, L, E/H) heads::

      out = out_proj(concat_h softmax(q_h k_h^T / sqrt(E/H) + M) v_h)

  where ``M`` is ``attn_mask`` (bool: True = *not* allowed -> -inf; float: added; 2-D (L, S) or
  3-D (N*H, L, S)) plus ``key_padding_mask`` (N, S) (bool True = padding -> -inf; float: added).
  As in torch, ``is_causal=True`` needs an ``attn_mask`` and, without a ``key_padding_mask``,
  uses the causal structure in place of that mask (the hint); with one, the given mask is used.
  Dropout on the weights applies in training mode. Returns ``(attn_output, None)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops.attention import scaled_dot_product_attention



def _additive(mask: Tensor | None, name: str, dtype: torch.dtype) -> Tensor | None:
    """torch's mask canonicalisation: bool True -> -inf (blocked), float kept as an additive bias."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(mask, float("-inf"))
    if not torch.is_floating_point(mask):
        raise TypeError(f"MultiheadAttention: only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask


class MultiheadAttention(torch.nn.MultiheadAttention):
    """``torch.nn.MultiheadAttention`` whose ``need_weights=False`` path runs seqgen_fast's SDPA
    (see the module docstring for the masks and the fallbacks to torch's own forward)."""

    def forward(self, query: Tensor, key: Tensor, value: Tensor, key_padding_mask: Tensor | None = None,
                need_weights: bool = True, attn_mask: Tensor | None = None, average_attn_weights: bool = True,
                is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        if need_weights or query.is_nested or key.is_nested or value.is_nested:
            return super().forward(query, key, value, key_padding_mask=key_padding_mask, need_weights=need_weights,
                                   attn_mask=attn_mask, average_attn_weights=average_attn_weights,
                                   is_causal=is_causal)
        return self._attend(query, key, value, key_padding_mask, attn_mask, is_causal), None

    def _attend(self, query, key, value, key_padding_mask, attn_mask, is_causal) -> Tensor:
        batched = F._mha_shape_check(query, key, value, key_padding_mask, attn_mask, self.num_heads)
        if not batched:
            query, key, value = query.unsqueeze(1), key.unsqueeze(1), value.unsqueeze(1)
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif self.batch_first:
            query, key, value = query.transpose(0, 1), key.transpose(0, 1), value.transpose(0, 1)
        # now (L, N, E) as in torch's F.multi_head_attention_forward
        tgt_len, bsz, embed_dim = query.shape
        if embed_dim != self.embed_dim:
            raise ValueError(f"MultiheadAttention: query embed dim {embed_dim} != embed_dim {self.embed_dim}")
        heads, head_dim = self.num_heads, self.head_dim

        key_padding_mask = _additive(key_padding_mask, "key_padding_mask", query.dtype)
        if is_causal and attn_mask is None:
            raise RuntimeError("Need attn_mask if specifying the is_causal hint. You may use the Transformer "
                               "module method `generate_square_subsequent_mask` to create this mask.")
        if is_causal and key_padding_mask is None:
            attn_mask = None  # the hint: the causal structure replaces the mask
        else:
            attn_mask = _additive(attn_mask, "attn_mask", query.dtype)
            is_causal = False

        q, k, v = self._project(query, key, value)                  # (L|S, N, E)
        if self.bias_k is not None:
            k = torch.cat([k, self.bias_k.expand(1, bsz, -1)])
            v = torch.cat([v, self.bias_v.expand(1, bsz, -1)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        if self.add_zero_attn:
            k = torch.cat([k, k.new_zeros(1, bsz, embed_dim)])
            v = torch.cat([v, v.new_zeros(1, bsz, embed_dim)])
            attn_mask = None if attn_mask is None else F.pad(attn_mask, (0, 1))
            key_padding_mask = None if key_padding_mask is None else F.pad(key_padding_mask, (0, 1))
        src_len = k.shape[0]

        mask = self._merged_mask(attn_mask, key_padding_mask, bsz, tgt_len, src_len)
        q, k, v = (x.reshape(x.shape[0], bsz, heads, head_dim).permute(1, 2, 0, 3) for x in (q, k, v))
        out = scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=self.dropout if self.training else 0.0,
                                           is_causal=is_causal)
        out = out.permute(2, 0, 1, 3).reshape(tgt_len, bsz, embed_dim)  # (L, N, E)
        out = F.linear(out, self.out_proj.weight, self.out_proj.bias)
        if not batched:
            return out.squeeze(1)
        return out.transpose(0, 1) if self.batch_first else out

    def _project(self, query: Tensor, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The q/k/v input projections of torch's ``_in_projection_packed`` / ``_in_projection``."""
        b_q = b_k = b_v = None
        if self.in_proj_bias is not None:
            b_q, b_k, b_v = self.in_proj_bias.chunk(3)
        if not self._qkv_same_embed_dim:
            return (F.linear(query, self.q_proj_weight, b_q), F.linear(key, self.k_proj_weight, b_k),
                    F.linear(value, self.v_proj_weight, b_v))
        if query is key and key is value:  # self-attention: one GEMM
            return F.linear(query, self.in_proj_weight, self.in_proj_bias).chunk(3, dim=-1)
        w_q, w_k, w_v = self.in_proj_weight.chunk(3)
        return F.linear(query, w_q, b_q), F.linear(key, w_k, b_k), F.linear(value, w_v, b_v)

    def _merged_mask(self, attn_mask: Tensor | None, key_padding_mask: Tensor | None, bsz: int, tgt_len: int,
                     src_len: int) -> Tensor | None:
        """One additive mask broadcastable to (N, H, L, S), or None."""
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                if attn_mask.shape != (tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 2D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                       f"{(tgt_len, src_len)}.")
                attn_mask = attn_mask.view(1, 1, tgt_len, src_len)
            else:
                if attn_mask.shape != (bsz * self.num_heads, tgt_len, src_len):
                    raise RuntimeError(f"The shape of the 3D attn_mask is {tuple(attn_mask.shape)}, but should be "
                                       f"{(bsz * self.num_heads, tgt_len, src_len)}.")
                attn_mask = attn_mask.view(bsz, self.num_heads, tgt_len, src_len)
        if key_padding_mask is not None:
            if key_padding_mask.shape != (bsz, src_len):
                raise RuntimeError(f"expecting key_padding_mask shape of {(bsz, src_len)}, but got "
                                   f"{tuple(key_padding_mask.shape)}")
            key_padding_mask = key_padding_mask.view(bsz, 1, 1, src_len)
            attn_mask = key_padding_mask if attn_mask is None else attn_mask + key_padding_mask
        return attn_mask

    @classmethod
    def from_torch(cls, module: torch.nn.MultiheadAttention) -> "MultiheadAttention":
        """A seqgen_fast twin of ``module`` holding the very same Parameter objects (no copy)."""
        if not isinstance(module, torch.nn.MultiheadAttention):
            raise TypeError(f"from_torch: module must be a torch.nn.MultiheadAttention, got {type(module).__name__}")
        new = cls.__new__(cls)
        new.__dict__.update(module.__dict__)
        for registry in ("_parameters", "_buffers", "_modules"):
            new.__dict__[registry] = module.__dict__[registry].copy()
        return new
