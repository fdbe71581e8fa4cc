"""Triton kernels of the LSTM pointwise cell, forward and backward, and their launchers.

The GEMMs (x W_ih^T for all steps, h_{t-1} W_hh^T per step) run in cuBLAS through torch; these
kernels fuse everything after them, one launch per step. The launchers have the signatures of
``seqgen_fast.reference.lstm.cell_forward`` / ``cell_backward`` so the shared recurrence loop in
``seqgen_fast.reference.lstm`` runs with them unchanged.

Layout: row r of ``pre``/``act``/``dg`` holds the four gate blocks i|f|g|o, each H wide; row r of
the [n, H] tensors is batch row r. Rows may be strided (slices of [T, B, *] buffers); the last dim
must be contiguous. Math in float32 whatever the storage dtype (fp32, fp16, bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _tanh(x):
    return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _cell_fwd_kernel(pre_ptr, s_pre, cp_ptr, s_cp, m_ptr, s_m, c_ptr, s_c, act_ptr, s_act, H,
                     SAVE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    p = pre_ptr + row * s_pre + cols
    i = tl.sigmoid(tl.load(p, mask=mask, other=0.0).to(tl.float32))
    f = tl.sigmoid(tl.load(p + H, mask=mask, other=0.0).to(tl.float32))
    g = _tanh(tl.load(p + 2 * H, mask=mask, other=0.0).to(tl.float32))
    o = tl.sigmoid(tl.load(p + 3 * H, mask=mask, other=0.0).to(tl.float32))
    c_prev = tl.load(cp_ptr + row * s_cp + cols, mask=mask, other=0.0).to(tl.float32)
    c = f * c_prev + i * g
    m = o * _tanh(c)
    tl.store(c_ptr + row * s_c + cols, c.to(c_ptr.dtype.element_ty), mask=mask)
    tl.store(m_ptr + row * s_m + cols, m.to(m_ptr.dtype.element_ty), mask=mask)
    if SAVE:
        a = act_ptr + row * s_act + cols
        ty = act_ptr.dtype.element_ty
        tl.store(a, i.to(ty), mask=mask)
        tl.store(a + H, f.to(ty), mask=mask)
        tl.store(a + 2 * H, g.to(ty), mask=mask)
        tl.store(a + 3 * H, o.to(ty), mask=mask)


@triton.jit
def _cell_bwd_kernel(dm_ptr, s_dm, dc_ptr, s_dc, act_ptr, s_act, cp_ptr, s_cp, c_ptr, s_c, dg_ptr, s_dg, H,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    a = act_ptr + row * s_act + cols
    i = tl.load(a, mask=mask, other=0.0).to(tl.float32)
    f = tl.load(a + H, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(a + 2 * H, mask=mask, other=0.0).to(tl.float32)
    o = tl.load(a + 3 * H, mask=mask, other=0.0).to(tl.float32)
    c = tl.load(c_ptr + row * s_c + cols, mask=mask, other=0.0).to(tl.float32)
    c_prev = tl.load(cp_ptr + row * s_cp + cols, mask=mask, other=0.0).to(tl.float32)
    dm = tl.load(dm_ptr + row * s_dm + cols, mask=mask, other=0.0).to(tl.float32)
    dc = tl.load(dc_ptr + row * s_dc + cols, mask=mask, other=0.0).to(tl.float32)
    tc = _tanh(c)
    dct = dc + dm * o * (1.0 - tc * tc)
    d = dg_ptr + row * s_dg + cols
    ty = dg_ptr.dtype.element_ty
    tl.store(d, (dct * g * i * (1.0 - i)).to(ty), mask=mask)
    tl.store(d + H, (dct * c_prev * f * (1.0 - f)).to(ty), mask=mask)
    tl.store(d + 2 * H, (dct * i * (1.0 - g * g)).to(ty), mask=mask)
    tl.store(d + 3 * H, (dm * tc * o * (1.0 - o)).to(ty), mask=mask)
    tl.store(dc_ptr + row * s_dc + cols, (dct * f).to(dc_ptr.dtype.element_ty), mask=mask)


def _block(H: int) -> int:
    return min(triton.next_power_of_2(H), 1024)


def _check_rows(what: str, *tensors: torch.Tensor) -> None:
    for name, t in zip(what.split(), tensors):
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"lstm cell kernel: {name} must be a 2-D tensor with a contiguous last dim, "
                             f"got shape {tuple(t.shape)} strides {t.stride()}")


def cell_forward(pre: torch.Tensor, c_prev: torch.Tensor, m_out: torch.Tensor, c_out: torch.Tensor,
                 act_out: torch.Tensor | None) -> None:
    """Fused cell forward (one launch): see ``seqgen_fast.reference.lstm.cell_forward``."""
    n, H = c_prev.shape
    if n == 0:
        return
    _check_rows("pre c_prev m_out c_out", pre, c_prev, m_out, c_out)
    act = act_out if act_out is not None else pre  # placeholder pointer, never written when SAVE=False
    _check_rows("act_out", act)
    BLOCK = _block(H)
    _cell_fwd_kernel[(n, triton.cdiv(H, BLOCK))](
        pre, pre.stride(0), c_prev, c_prev.stride(0), m_out, m_out.stride(0), c_out, c_out.stride(0),
        act, act.stride(0), H, SAVE=act_out is not None, BLOCK=BLOCK)


def cell_backward(dm: torch.Tensor, dc: torch.Tensor, act: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor,
                  dg_out: torch.Tensor) -> None:
    """Fused cell backward (one launch): see ``seqgen_fast.reference.lstm.cell_backward``."""
    n, H = c.shape
    if n == 0:
        return
    _check_rows("dm dc act c_prev c dg_out", dm, dc, act, c_prev, c, dg_out)
    BLOCK = _block(H)
    _cell_bwd_kernel[(n, triton.cdiv(H, BLOCK))](
        dm, dm.stride(0), dc, dc.stride(0), act, act.stride(0), c_prev, c_prev.stride(0), c, c.stride(0),
        dg_out, dg_out.stride(0), H, BLOCK=BLOCK)
