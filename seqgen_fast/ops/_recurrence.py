"""The backend-neutral loop over a recurrent cell: what the non-persistent LSTM paths run.

One layer, one direction, forward in time (:func:`recurrence_forward`) and its backward in reverse
time (:func:`recurrence_backward`); each step is one GEMM (``addmm``, cuBLAS on a GPU) plus the
pointwise cell, given as a pair of functions with the signatures of
``seqgen_fast.reference.lstm.cell_forward`` / ``cell_backward``: the reference backend passes those,
the Triton backend its fused kernels, and everything else (GEMMs, bookkeeping, variable lengths,
projections) is shared. Weight gradients are GEMMs after the loop (:func:`weight_grads`). Layouts
and the saved format are those of ``seqgen_fast.reference.lstm``.

Variable lengths (PackedSequence): ``batch_sizes`` (int64 CPU tensor [T], non-increasing, as in a
PackedSequence) says that at step t only the first ``batch_sizes[t]`` rows are active: the states of
the other rows are held, and their outputs ``hs[t]`` are zero. ``h_n``/``c_n`` of a row are its
states after its last active step.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..reference.lstm import compute_dtype

CellForward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None], None]
CellBackward = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], None]


def active_rows(batch_sizes: torch.Tensor | None, T: int, B: int) -> list[int]:
    """Rows active at each step: ``batch_sizes`` as a list, or B at every step."""
    return [B] * T if batch_sizes is None else [int(n) for n in batch_sizes.tolist()]


def last_states(hs: torch.Tensor, batch_sizes: torch.Tensor | None) -> torch.Tensor:
    """Row b of ``hs`` [T, B, *] at its last active step (a new tensor)."""
    if batch_sizes is None:
        return hs[-1].clone()
    B = hs.shape[1]
    lengths = (batch_sizes.view(-1, 1) > torch.arange(B).view(1, -1)).sum(0)
    return hs[(lengths - 1).to(hs.device), torch.arange(B, device=hs.device)]


def recurrence_forward(xg: torch.Tensor, w_hh: torch.Tensor, w_hr: torch.Tensor | None, h0: torch.Tensor,
                       c0: torch.Tensor, batch_sizes: torch.Tensor | None, train: bool,
                       cell: CellForward):
    """One layer, one direction, forward in time. Returns ``(hs, h_n, c_n, cs, gates)``:
    hs [T, B, P]; h_n [B, P]; c_n [B, H]; when ``train`` cs [T, B, H] and gates [T, B, 4H] in the
    saved format, else empty tensors. Each step is one GEMM (``addmm``) plus ``cell``."""
    T, B, G = xg.shape
    H = G // 4
    P = w_hh.shape[1]
    rows = active_rows(batch_sizes, T, B)
    # Inactive rows are never written: zero them so every output is defined.
    alloc = torch.zeros if batch_sizes is not None else torch.empty
    hs = alloc(T, B, P, dtype=xg.dtype, device=xg.device)
    cs = alloc(T, B, H, dtype=xg.dtype, device=xg.device) if train else xg.new_empty(0)
    gates = alloc(T, B, G, dtype=xg.dtype, device=xg.device) if train else xg.new_empty(0)
    c_state = c0.clone()  # running cell state when cs is not kept
    m = xg.new_empty(B, H) if w_hr is not None else None
    w_hh_t = w_hh.t()
    for t, n in enumerate(rows):
        h_prev = hs[t - 1, :n] if t else h0[:n]
        pre = torch.addmm(xg[t, :n], h_prev, w_hh_t)
        c_prev = (cs[t - 1, :n] if t else c0[:n]) if train else c_state[:n]
        c_out = cs[t, :n] if train else c_state[:n]
        m_out = m[:n] if m is not None else hs[t, :n]
        cell(pre, c_prev, m_out, c_out, gates[t, :n] if train else None)
        if w_hr is not None:
            torch.mm(m_out, w_hr.t(), out=hs[t, :n])
    h_n = last_states(hs, batch_sizes)
    c_n = last_states(cs, batch_sizes) if train else c_state
    return hs, h_n, c_n, cs, gates


def recurrence_backward(w_hh: torch.Tensor, w_hr: torch.Tensor | None, hs: torch.Tensor, cs: torch.Tensor,
                        gates: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, grad_hs: torch.Tensor,
                        grad_h_n: torch.Tensor, grad_c_n: torch.Tensor, batch_sizes: torch.Tensor | None,
                        cell: CellBackward):
    """Backward of :func:`recurrence_forward` in reverse time.

    Returns ``(dG, dh0, dc0, dH)``: dG [T, B, 4H] = dL/dxg (pre-activation gate gradients, zero on
    inactive rows), dh0 [B, P], dc0 [B, H], and dH [T, B, P] = the total dL/dh_t (only when
    ``w_hr`` is given, for dW_hr; else None). Held (inactive) rows pass their state gradients
    through unchanged. Weight gradients are GEMMs done by the caller (:func:`weight_grads`).
    """
    T, B, G = gates.shape
    rows = active_rows(batch_sizes, T, B)
    dtype = gates.dtype
    dG = torch.zeros(T, B, G, dtype=dtype, device=gates.device)
    dH = torch.zeros(T, B, hs.shape[2], dtype=dtype, device=gates.device) if w_hr is not None else None
    dh = grad_h_n.to(dtype).clone()
    dc = grad_c_n.to(compute_dtype(dtype)).clone()
    for t in range(T - 1, -1, -1):
        n = rows[t]
        dh_t = dh[:n] + grad_hs[t, :n]
        if w_hr is not None:
            dH[t, :n] = dh_t
            dm = dh_t @ w_hr
        else:
            dm = dh_t
        c_prev = cs[t - 1, :n] if t else c0[:n]
        cell(dm, dc[:n], gates[t, :n], c_prev, cs[t, :n], dG[t, :n])
        torch.mm(dG[t, :n], w_hh, out=dh[:n])
    return dG, dh, dc.to(c0.dtype), dH


def weight_grads(dG: torch.Tensor, dH: torch.Tensor | None, hs: torch.Tensor, cs: torch.Tensor,
                 gates: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, w_hr: torch.Tensor | None):
    """dW_hh = sum_t dG_t^T h_{t-1} and, with a projection, dW_hr = sum_t dH_t^T m_t where
    m_t = o_t * tanh(c_t): one GEMM each over all T*B rows. Returns ``(dW_hh, dW_hr or None)``."""
    T, B, G = dG.shape
    h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]], 0).reshape(T * B, -1)
    dw_hh = (dG.reshape(T * B, G).t().to(w_hh.dtype) @ h_prev.to(w_hh.dtype))
    if w_hr is None:
        return dw_hh, None
    H = G // 4
    m = gates[..., 3 * H:] * torch.tanh(cs)
    dw_hr = dH.reshape(T * B, -1).t().to(w_hr.dtype) @ m.reshape(T * B, H).to(w_hr.dtype)
    return dw_hh, dw_hr
