"""Contract constants shared by the kernels, the references and ``csrc/``: layouts and codes, no logic.

Both sides of a contract read these names, so a kernel and its reference cannot drift apart:

* ``DTYPE_CODES`` -- storage dtype codes of the CUDA extension (``csrc/common.cuh``, ``enum DType``).
* ``TIMESTEP_CODES`` -- timestep dtype codes that ``csrc/diffusion.cu`` reads.
* ``NONE``, ``TOP_LEFT``, ``BOTTOM_RIGHT`` -- the attention ops' causal modes: no mask; torch's
  ``is_causal`` (key ``j`` visible to query ``i`` iff ``j <= i``); flash-attn's ``causal``
  (``j <= i + S - L``).
* :func:`attention_output` -- the attention output's memory order (the same for every backend).
* ``COEF_NAMES``, ``NCOEF`` and the column indices ``X0X ... CPN`` -- the row layout of the fused
  diffusion step's coefficient table (see ``seqgen_fast.reference.diffusion`` for the math).
"""
from __future__ import annotations

import torch

DTYPE_CODES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}
TIMESTEP_CODES = {torch.float32: 0, torch.int64: 1, torch.int32: 2}

NONE, TOP_LEFT, BOTTOM_RIGHT = 0, 1, 2

COEF_NAMES = ("x0_x", "x0_m", "x", "x0", "m", "hist", "noise", "pre_noise")
NCOEF = len(COEF_NAMES)
X0X, X0M, AX, A0, AM, AH, AN, CPN = range(NCOEF)


def attention_output(q: torch.Tensor, ev: int, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Uninitialised (B, H, L, ev) attention output in q's memory order: (B, L, H, ev) storage when
    q's heads are its inner dim (the flash layout and packed varlen), else (B, H, L, ev) storage."""
    B, H, L, _ = q.shape
    dtype = dtype or q.dtype
    if q.stride(1) < q.stride(2):
        return q.new_empty(B, L, H, ev, dtype=dtype).transpose(1, 2)
    return q.new_empty(B, H, L, ev, dtype=dtype)
