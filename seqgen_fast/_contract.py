"""Contract constants shared by the kernels, the references and ``csrc/``: layouts and codes, no logic.

Both sides of a contract read these names, so a kernel and its reference cannot drift apart:

* ``DTYPE_CODES`` -- storage dtype codes of the CUDA extension (``csrc/common.cuh``, ``enum DType``).
* ``TIMESTEP_CODES`` -- timestep dtype codes that ``csrc/diffusion.cu`` reads.
* ``NONE``, ``TOP_LEFT``, ``BOTTOM_RIGHT`` -- the attention ops' causal modes: no mask; torch's
  ``is_causal`` (key ``j`` visible to query ``i`` iff ``j <= i``); flash-attn's ``causal``
  (``j <= i + S - L``).
* :func:`attention_output` -- the attention output's memory order (the same for every backend).
* :class:`AttentionFeatures` -- the flash-attn options of one attention call (window, softcap,
  ALiBi, dropout), read by the attention kernels and their reference alike.
* ``COEF_NAMES``, ``NCOEF`` and the column indices ``X0X ... VARQ`` -- the row layout of the fused
  diffusion step's coefficient table (see ``seqgen_fast.reference.diffusion`` for the math); the
  first eight columns are the single-step terms the CUDA twin reads (``csrc/diffusion.h``).
* ``VAR_*`` -- how the noise term is scaled per element (DDPM's learned variances).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TIMESTEP_CODES = {torch.float32: 0, torch.int64: 1, torch.int32: 2}

NONE, TOP_LEFT, BOTTOM_RIGHT = 0, 1, 2

COEF_NAMES = ("x0_x", "x0_m", "x", "x0", "m", "h1", "noise", "pre_noise",
              "conv", "h2", "conv_x", "conv_x0", "conv_m",
              "cur_x", "cur_last", "cur_h1", "cur_h2", "cur_h3", "cur_conv",
              "aux_x", "aux_x0", "var_p", "var_q", "unused")
NCOEF = len(COEF_NAMES)
(X0X, X0M, AX, A0, AM, AH, AN, CPN, AC, AH2, CX, CX0, CM,
 SX, SL, SH1, SH2, SH3, SC, DX, D0, VARP, VARQ, _UNUSED) = range(NCOEF)
VAR_NONE, VAR_SQRT, VAR_EXP = 0, 1, 2  # noise std = c.noise * (1, sqrt(v), exp(c.var_p + c.var_q v))


def attention_output(q: torch.Tensor, ev: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised (B, H, L, ev) attention output in q's memory order: (B, L, H, ev) storage when
    q's heads are its inner dim (the flash layout and packed varlen), else (B, H, L, ev) storage."""
    B, H, L, _ = q.shape
    dtype = dtype or q.dtype
    if q.stride(1) < q.stride(2):
        return q.new_empty(B, L, H, ev, dtype=dtype).transpose(1, 2)
    return q.new_empty(B, H, L, ev, dtype=dtype)


@dataclass(frozen=True)
class AttentionFeatures:
    """Band edges (-1 = unbounded; aligned as ``seqgen_fast.reference.attention`` states), softcap
    (0 = off), ALiBi slopes (B, H) float32 or None, dropout probability and its Philox
    ``rng = (seed, offset)`` int64 tensor of 2 elements (None without dropout)."""

    window_left: int = -1
    window_right: int = -1
    softcap: float = 0.0
    alibi: torch.Tensor | None = None
    dropout_p: float = 0.0
    rng: torch.Tensor | None = None
