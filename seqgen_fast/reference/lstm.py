"""The LSTM cell in plain PyTorch: the ground truth of the cell math, and the reference backend's cell.

Math (gate order i, f, g, o, as torch.nn.LSTM):

    G_t  = xg_t + h_{t-1} W_hh^T               xg_t = x_t W_ih^T + b_ih + b_hh   (one GEMM for all t)
    i, f, g, o = sigmoid(G^i), sigmoid(G^f), tanh(G^g), sigmoid(G^o)
    c_t  = f * c_{t-1} + i * g
    m_t  = o * tanh(c_t)
    h_t  = m_t W_hr^T   (proj_size > 0)   or   h_t = m_t

Layouts: ``xg`` [T, B, 4H] (gate blocks i|f|g|o along the last dim), ``w_hh`` [4H, P] with P = proj
size or H, ``w_hr`` [P, H], ``h0`` [B, P], ``c0`` [B, H].

Saved format for backward (shared by every backend): ``cs`` [T, B, H] the cell states c_1..c_T and
``gates`` [T, B, 4H] the *activated* gates (i, f, g, o after their nonlinearity), both in the layer
dtype.

:func:`cell_forward` and :func:`cell_backward` are the pointwise cell; the backend-neutral loop over
the sequence that runs them (and the Triton kernels of the same signatures) is
``seqgen_fast.ops._recurrence``.
"""
from __future__ import annotations

import torch


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Pointwise math runs in float32 for half types, else in the tensor's own dtype."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def sigmoid(x: torch.Tensor) -> torch.Tensor:
    """sigmoid(x), near 1 as accurate as the dtype allows, as the kernels' fp32 sigmoid: s = sigmoid(-|x|)
    (relative accuracy), and 1 - s for x >= 0. torch.sigmoid's 1 / (1 + exp(-x)) may be an ulp off below
    1 (1 - 2.4e-7 in float32 for 1 - 1.79e-7), so the backward's i(1 - i), with 1 - i exact from the
    saved i, would be 33% off there. A NaN fails the comparison: s = NaN."""
    s = torch.sigmoid(-x.abs())
    return torch.where(x >= 0, 1 - s, s)


def cell_forward(pre: torch.Tensor, c_prev: torch.Tensor, m_out: torch.Tensor, c_out: torch.Tensor,
                 act_out: torch.Tensor | None) -> None:
    """Pointwise LSTM cell: pre-activations ``pre`` [n, 4H] and ``c_prev`` [n, H] -> writes
    ``m_out`` = o*tanh(c) [n, H], ``c_out`` = c [n, H] and, when given, ``act_out`` [n, 4H] = the
    activated gates (i, f, g, o). ``c_out`` may be ``c_prev`` itself (in-place update)."""
    cd = compute_dtype(pre.dtype)
    p = pre.to(cd)
    H = c_prev.shape[-1]
    i, f, o = sigmoid(p[:, :H]), sigmoid(p[:, H:2 * H]), sigmoid(p[:, 3 * H:])
    g = torch.tanh(p[:, 2 * H:3 * H])
    c = f * c_prev.to(cd) + i * g
    m_out.copy_(o * torch.tanh(c))
    c_out.copy_(c)
    if act_out is not None:
        act_out.copy_(torch.cat([i, f, g, o], dim=1))


def cell_backward(dm: torch.Tensor, dc: torch.Tensor, act: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor,
                  dg_out: torch.Tensor) -> None:
    """Backward of :func:`cell_forward`.

    ``dm`` [n, H] = dL/dm_t, ``dc`` [n, H] (float32; float64 for float64) = dL/dc_t from later
    steps (overwritten in place with dL/dc_{t-1}), ``act`` [n, 4H] activated gates,
    ``c_prev``/``c`` [n, H]. Writes ``dg_out`` [n, 4H] = dL/dG_t (pre-activation gate gradients):

        dc_t' = dc + dm * o * (1 - tanh(c)^2)
        dG^i = dc_t' g i (1 - i),  dG^f = dc_t' c_prev f (1 - f),  dG^g = dc_t' i (1 - g^2),
        dG^o = dm tanh(c) o (1 - o),  dc_{t-1} = dc_t' f
    """
    cd = compute_dtype(act.dtype)
    H = c.shape[-1]
    a = act.to(cd)
    i, f, g, o = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
    tc = torch.tanh(c.to(cd))
    dm = dm.to(cd)
    dct = dc.to(cd) + dm * o * (1 - tc * tc)
    dg_out.copy_(torch.cat([dct * g * i * (1 - i), dct * c_prev.to(cd) * f * (1 - f),
                            dct * i * (1 - g * g), dm * tc * o * (1 - o)], dim=1))
    dc.copy_(dct * f)
