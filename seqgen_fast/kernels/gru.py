"""Triton kernels of the GRU cell and their launchers.

* ``cell_forward`` / ``cell_backward``: the pointwise cell, forward and backward, with the
  signatures of ``seqgen_fast.reference.gru.cell_forward`` / ``cell_backward`` (the math is stated
  there), so the shared recurrence loop (``seqgen_fast.ops._recurrence.GRUCell``) runs them
  unchanged. In sequences the GEMMs (x W_ih^T + b_ih for all steps, h_{t-1} W_hh^T + b_hh per step)
  run in cuBLAS through torch; these kernels fuse everything after them, one launch per step.
* ``cell_step``: a whole generation step for small batches (both matrix-vector products, biases and
  the cell update) in one launch, tiled as the LSTM's step kernel (four [BLOCK_B, BLOCK_H] fp32
  accumulators there as here: r and z take both products, the n gate keeps x W_in^T and h W_hn^T
  apart; at most 4 units a program, see :func:`step_config`).

Layout: row r of ``xg``/``hg``/``dxg``/``dhg`` holds the three gate blocks r|z|n, each H wide; row r
of ``act`` holds r|z|n|hg^n; row r of the [n, H] tensors is batch row r. Rows may be strided
(slices of [T, B, *] buffers); the last dim must be contiguous. Math in float32 whatever the storage
dtype (fp32, fp16, bf16).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import lstm
from .lstm import STEP_MAX_BATCH, _sigmoid, _tanh, block, check_rows, launch_rows

__all__ = ["cell_forward", "cell_backward", "cell_step", "STEP_MAX_BATCH"]


@triton.jit
def _row_tile(H, BLOCK: tl.constexpr):
    """This program's row (int64: rows x row stride may pass 2^31) and its BLOCK columns of an
    H-wide gate block, with their mask."""
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    return tl.program_id(0).to(tl.int64), cols, cols < H


@triton.jit
def _ld(ptr, mask):
    """A float32 tile from any storage dtype (masked lanes read 0)."""
    return tl.load(ptr, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _st(ptr, value, mask):
    tl.store(ptr, value.to(ptr.dtype.element_ty), mask=mask)


@triton.jit
def _cell_fwd_kernel(xg_ptr, s_xg, hg_ptr, s_hg, hp_ptr, s_hp, h_ptr, s_h, act_ptr, s_act, H,
                     SAVE: tl.constexpr, BLOCK: tl.constexpr):
    row, cols, mask = _row_tile(H, BLOCK)
    x = xg_ptr + row * s_xg + cols
    g = hg_ptr + row * s_hg + cols
    r = _sigmoid(_ld(x, mask) + _ld(g, mask))
    z = _sigmoid(_ld(x + H, mask) + _ld(g + H, mask))
    hn = _ld(g + 2 * H, mask)
    n = _tanh(_ld(x + 2 * H, mask) + r * hn)
    h_prev = _ld(hp_ptr + row * s_hp + cols, mask)
    _st(h_ptr + row * s_h + cols, n + z * (h_prev - n), mask)
    if SAVE:  # the saved format: r | z | n | hg^n
        a = act_ptr + row * s_act + cols
        _st(a, r, mask)
        _st(a + H, z, mask)
        _st(a + 2 * H, n, mask)
        _st(a + 3 * H, hn, mask)


@triton.jit
def _cell_bwd_kernel(dm_ptr, s_dm, dh_ptr, s_dh, act_ptr, s_act, hp_ptr, s_hp, dx_ptr, s_dx, dhg_ptr, s_dhg, H,
                     BLOCK: tl.constexpr):
    row, cols, mask = _row_tile(H, BLOCK)
    a = act_ptr + row * s_act + cols
    r, z, n, hn = _ld(a, mask), _ld(a + H, mask), _ld(a + 2 * H, mask), _ld(a + 3 * H, mask)
    h_prev = _ld(hp_ptr + row * s_hp + cols, mask)
    d = dh_ptr + row * s_dh + cols
    dht = _ld(dm_ptr + row * s_dm + cols, mask) + _ld(d, mask)
    dn = dht * (1.0 - z) * (1.0 - n * n)
    dz = dht * (h_prev - n) * z * (1.0 - z)
    dr = dn * hn * r * (1.0 - r)
    x = dx_ptr + row * s_dx + cols
    g = dhg_ptr + row * s_dhg + cols
    _st(x, dr, mask)
    _st(x + H, dz, mask)
    _st(x + 2 * H, dn, mask)
    _st(g, dr, mask)
    _st(g + H, dz, mask)
    _st(g + 2 * H, dn * r, mask)
    _st(d, dht * z, mask)


@triton.jit
def _dot(v, w_ptrs, wmask):
    """[BLOCK_B, BLOCK_H] = sum_k v[b, 0, k] * W[u, k] over one K tile of weight rows ``w_ptrs``."""
    return tl.sum(v * _ld(w_ptrs, wmask)[None, :, :], axis=2)


@triton.jit
def _gate_products(acc_r, acc_z, acc_n, v_ptr, w_ptr, K, H, rows, rmask, units, umask, BLOCK_K: tl.constexpr):
    """acc_q[b, u] += sum_k v[b, k] * W[q*H + u, k] for the three gate blocks r, z, n of W [3H, K]."""
    w_rows = w_ptr + units[:, None].to(tl.int64) * K  # 3H x K may pass 2^31 elements
    gate = (units[:, None].to(tl.int64) * 0 + H) * K  # elements between gate blocks, int64
    v_rows = v_ptr + rows[:, None].to(tl.int64) * K  # so may B x K (x [B, I] with I past 2^28)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        v = _ld(v_rows + ks[None, :], rmask[:, None] & kmask[None, :])[:, None, :]
        w = w_rows + ks[None, :]
        wmask = umask[:, None] & kmask[None, :]
        acc_r += _dot(v, w, wmask)
        acc_z += _dot(v, w + gate, wmask)
        acc_n += _dot(v, w + 2 * gate, wmask)
    return acc_r, acc_z, acc_n


@triton.jit
def _bias(ptr, gate, H, units, umask):
    return _ld(ptr + gate * H + units, umask)[None, :]


@triton.jit
def _cell_step_kernel(x_ptr, h_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, h1_ptr, B, I, H,
                      HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    units = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    umask = units < H
    acc_r = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_z = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_xn = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)  # x W_in^T
    acc_hn = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)  # h W_hn^T, scaled by r
    acc_r, acc_z, acc_xn = _gate_products(acc_r, acc_z, acc_xn, x_ptr, wih_ptr, I, H, rows, rmask, units, umask,
                                          BLOCK_K)
    acc_r, acc_z, acc_hn = _gate_products(acc_r, acc_z, acc_hn, h_ptr, whh_ptr, H, H, rows, rmask, units, umask,
                                          BLOCK_K)
    if HAS_BIAS:
        acc_r += _bias(bih_ptr, 0, H, units, umask) + _bias(bhh_ptr, 0, H, units, umask)
        acc_z += _bias(bih_ptr, 1, H, units, umask) + _bias(bhh_ptr, 1, H, units, umask)
        acc_xn += _bias(bih_ptr, 2, H, units, umask)
        acc_hn += _bias(bhh_ptr, 2, H, units, umask)
    offs = rows[:, None] * H + units[None, :]
    mask = rmask[:, None] & umask[None, :]
    h_prev = _ld(h_ptr + offs, mask)
    r = _sigmoid(acc_r)
    z = _sigmoid(acc_z)
    n = _tanh(acc_xn + r * acc_hn)
    _st(h1_ptr + offs, n + z * (h_prev - n), mask)


def step_config(B: int, H: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K) of ``_cell_step_kernel``: the LSTM step's rule
    (``kernels.lstm.step_config``: a [BLOCK_B, BLOCK_H, BLOCK_K] product of at most 4096 elements
    per K step) as for at most 512 hidden units, i.e. at most 4 units a program (H/4 programs): the
    8-unit tiles it picks from H = 1024 spill here (ptxas of Triton 3.6 at B1 fp32, of Triton 3.9 at
    B8 bf16), the 4-unit tiles under neither."""
    return lstm.step_config(B, min(H, 512))


def cell_step(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None,
              b_hh: torch.Tensor | None) -> torch.Tensor:
    """One GRU step in one launch for B <= STEP_MAX_BATCH rows (generation), the math of
    ``seqgen_fast.reference.gru``: r, z = sigmoid(x W_i{r,z}^T + b_i{r,z} + h W_h{r,z}^T + b_h{r,z}),
    n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)), h1 = n + z (h - n).

    x [B, I], h [B, H], w_ih [3H, I], w_hh [3H, H], biases [3H] or None. Grid: one program per
    BLOCK_H hidden units with all three gates, all B rows, K in tiles (fp32 accumulation); each
    weight element is read once. Returns a new h1 [B, H]."""
    B, I = x.shape
    H = h.shape[1]
    if B > STEP_MAX_BATCH:
        raise ValueError(f"gru cell_step kernel: batch {B} > {STEP_MAX_BATCH}; use the GEMMs + cell_forward")
    x, h, w_ih, w_hh = (t.contiguous() for t in (x, h, w_ih, w_hh))
    h1 = torch.empty_like(h)
    if B == 0 or H == 0:
        return h1
    BLOCK_B, BLOCK_H, BLOCK_K = step_config(B, H)
    has_bias = b_ih is not None
    _cell_step_kernel[(triton.cdiv(H, BLOCK_H),)](
        x, h, w_ih, w_hh, b_ih.contiguous() if has_bias else x, b_hh.contiguous() if has_bias else x, h1, B, I, H,
        HAS_BIAS=has_bias, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
    return h1


def cell_forward(xg: torch.Tensor, hg: torch.Tensor, h_prev: torch.Tensor, h_out: torch.Tensor,
                 act_out: torch.Tensor | None) -> None:
    """Fused cell forward (one launch per 2^31 - 1 rows): see ``seqgen_fast.reference.gru.cell_forward``."""
    n, H = h_prev.shape
    if n == 0 or H == 0:
        return
    act = act_out if act_out is not None else h_out  # placeholder pointer, never written when SAVE=False
    check_rows("gru", "xg hg h_prev h_out act_out", xg, hg, h_prev, h_out, act)
    launch_rows(_cell_fwd_kernel, [xg, hg, h_prev, h_out, act], H, SAVE=act_out is not None, BLOCK=block(H))


def cell_backward(dm: torch.Tensor, dh: torch.Tensor, act: torch.Tensor, h_prev: torch.Tensor,
                  dxg_out: torch.Tensor, dhg_out: torch.Tensor) -> None:
    """Fused cell backward (one launch per 2^31 - 1 rows): see ``seqgen_fast.reference.gru.cell_backward``."""
    n, H = h_prev.shape
    if n == 0 or H == 0:
        return
    check_rows("gru", "dm dh act h_prev dxg_out dhg_out", dm, dh, act, h_prev, dxg_out, dhg_out)
    launch_rows(_cell_bwd_kernel, [dm, dh, act, h_prev, dxg_out, dhg_out], H, BLOCK=block(H))
