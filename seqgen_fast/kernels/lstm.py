"""Triton kernels of the LSTM cell and their launchers.

* ``cell_forward`` / ``cell_backward``: the pointwise cell, forward and backward. In sequences the
  GEMMs (x W_ih^T for all steps, h_{t-1} W_hh^T per step) run in cuBLAS through torch; these
  kernels fuse everything after them, one launch per step.
* ``cell_step``: a whole generation step for small batches (both matrix-vector products, biases
  and the cell update) in one launch. The launchers have the signatures of
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
def _sigmoid(x):
    """sigmoid in fp32 as csrc/recurrence.cuh's: s = e / (1 + e) = sigmoid(-|x|) with e = exp(-|x|), and
    1 - s for x >= 0. s keeps relative accuracy, so a saturated gate is (near) correctly rounded and the
    backward's i(1 - i) keeps the accuracy its saved i allows; tl.sigmoid's 1 / (1 + exp(-x)) rounds 1 + e
    first (1 - 2.4e-7 for 1 - 1.79e-7: 1 - i 33% off). A NaN fails the comparison: s = NaN."""
    e = tl.exp(-tl.abs(x))
    s = e / (1.0 + e)
    return tl.where(x >= 0, 1.0 - s, s)


@triton.jit
def _tanh(x):
    """tanh in fp32 with relative accuracy everywhere (csrc/recurrence.cuh's tanh_f32): |x| < 0.4 the odd
    Taylor polynomial through x^11 (below 1.1e-7 relative), else sign(x) (1 - 2 sigmoid(-2|x|)), which
    saturates to +-1 (near 1 within about half an ulp: 1 - g keeps what the format allows, as for
    _sigmoid). The sigmoid form alone loses relative accuracy near 0 by cancellation (1e-3 at
    |x| = 1e-4). A NaN fails both comparisons and takes the sigmoid form: NaN, as torch.tanh."""
    x2 = x * x
    p = x2 * (-1382.0 / 155925.0) + 62.0 / 2835.0
    p = p * x2 - 17.0 / 315.0
    p = p * x2 + 2.0 / 15.0
    p = p * x2 - 1.0 / 3.0
    t = 1.0 - 2.0 * _sigmoid(-2.0 * tl.abs(x))
    return tl.where(tl.abs(x) < 0.4, x + (x * x2) * p, tl.where(x < 0, -t, t))


@triton.jit
def _cell_fwd_kernel(pre_ptr, s_pre, cp_ptr, s_cp, m_ptr, s_m, c_ptr, s_c, act_ptr, s_act, H,
                     SAVE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)  # rows x row stride may pass 2^31
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < H
    p = pre_ptr + row * s_pre + cols
    i = _sigmoid(tl.load(p, mask=mask, other=0.0).to(tl.float32))
    f = _sigmoid(tl.load(p + H, mask=mask, other=0.0).to(tl.float32))
    g = _tanh(tl.load(p + 2 * H, mask=mask, other=0.0).to(tl.float32))
    o = _sigmoid(tl.load(p + 3 * H, mask=mask, other=0.0).to(tl.float32))
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
    row = tl.program_id(0).to(tl.int64)  # rows x row stride may pass 2^31
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


@triton.jit
def _gate_products(acc_i, acc_f, acc_g, acc_o, v_ptr, w_ptr, K, H, rows, rmask, units, umask,
                   BLOCK_K: tl.constexpr):
    """acc_q[b, u] += sum_k v[b, k] * W[q*H + u, k] for the four gate blocks q of W [4H, K]."""
    w_rows = w_ptr + units[:, None].to(tl.int64) * K  # 4H x K may pass 2^31 elements
    gate = (units[:, None].to(tl.int64) * 0 + H) * K  # elements between gate blocks, int64
    v_rows = v_ptr + rows[:, None].to(tl.int64) * K  # so may B x K (x [B, I] with I past 2^28)
    for k0 in range(0, K, BLOCK_K):
        ks = k0 + tl.arange(0, BLOCK_K)
        kmask = ks < K
        v = tl.load(v_rows + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
        v = v.to(tl.float32)[:, None, :]
        w = w_rows + ks[None, :]
        wmask = umask[:, None] & kmask[None, :]
        acc_i += tl.sum(v * tl.load(w, mask=wmask, other=0.0).to(tl.float32)[None, :, :], axis=2)
        acc_f += tl.sum(v * tl.load(w + gate, mask=wmask, other=0.0).to(tl.float32)[None, :, :], axis=2)
        acc_g += tl.sum(v * tl.load(w + 2 * gate, mask=wmask, other=0.0).to(tl.float32)[None, :, :], axis=2)
        acc_o += tl.sum(v * tl.load(w + 3 * gate, mask=wmask, other=0.0).to(tl.float32)[None, :, :], axis=2)
    return acc_i, acc_f, acc_g, acc_o


@triton.jit
def _cell_step_kernel(x_ptr, h_ptr, c_ptr, wih_ptr, whh_ptr, bih_ptr, bhh_ptr, h1_ptr, c1_ptr, B, I, H,
                      HAS_BIAS: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_K: tl.constexpr):
    rows = tl.arange(0, BLOCK_B)
    rmask = rows < B
    units = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    umask = units < H
    acc_i = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_f = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_g = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_o = tl.zeros([BLOCK_B, BLOCK_H], dtype=tl.float32)
    acc_i, acc_f, acc_g, acc_o = _gate_products(acc_i, acc_f, acc_g, acc_o, x_ptr, wih_ptr, I, H, rows, rmask,
                                                units, umask, BLOCK_K)
    acc_i, acc_f, acc_g, acc_o = _gate_products(acc_i, acc_f, acc_g, acc_o, h_ptr, whh_ptr, H, H, rows, rmask,
                                                units, umask, BLOCK_K)
    if HAS_BIAS:
        for q in tl.static_range(4):
            bias = (tl.load(bih_ptr + q * H + units, mask=umask, other=0.0).to(tl.float32)
                    + tl.load(bhh_ptr + q * H + units, mask=umask, other=0.0).to(tl.float32))[None, :]
            if q == 0:
                acc_i += bias
            elif q == 1:
                acc_f += bias
            elif q == 2:
                acc_g += bias
            else:
                acc_o += bias
    offs = rows[:, None] * H + units[None, :]
    mask = rmask[:, None] & umask[None, :]
    c_prev = tl.load(c_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    c = _sigmoid(acc_f) * c_prev + _sigmoid(acc_i) * _tanh(acc_g)
    tl.store(c1_ptr + offs, c.to(c1_ptr.dtype.element_ty), mask=mask)
    tl.store(h1_ptr + offs, (_sigmoid(acc_o) * _tanh(c)).to(h1_ptr.dtype.element_ty), mask=mask)


# Largest batch of the fused step kernel: it keeps a [B, units, K-tile] product in registers and
# re-reads its weight tile per K step; larger batches are GEMMs (cuBLAS addmm + cell kernel).
STEP_MAX_BATCH = 8


def step_config(B: int, H: int) -> tuple[int, int, int]:
    """(BLOCK_B, BLOCK_H, BLOCK_K) of ``_cell_step_kernel``: about 128 programs of BLOCK_H units, a
    [BLOCK_B, BLOCK_H, BLOCK_K] product of at most 4096 elements per K step."""
    block_b = max(2, triton.next_power_of_2(B))
    block_h = min(16, max(2, triton.next_power_of_2(triton.cdiv(H, 128))))
    return block_b, block_h, min(256, max(16, 4096 // (block_b * block_h)))


def cell_step(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor | None, b_hh: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """One LSTM step in one launch for B <= STEP_MAX_BATCH rows (generation):
    G = x W_ih^T + b_ih + h W_hh^T + b_hh; c1 = f c + i g; h1 = o tanh(c1) (i, f, o sigmoid, g tanh).

    x [B, I], h/c [B, H], w_ih [4H, I], w_hh [4H, H], biases [4H] or None. Grid: one program per
    BLOCK_H hidden units with all four gates, all B rows, K in tiles (fp32 accumulation); each
    weight element is read once. Returns new (h1, c1)."""
    B, I = x.shape
    H = h.shape[1]
    if B > STEP_MAX_BATCH:
        raise ValueError(f"lstm cell_step kernel: batch {B} > {STEP_MAX_BATCH}; use addmm + cell_forward")
    x, h, c, w_ih, w_hh = (t.contiguous() for t in (x, h, c, w_ih, w_hh))
    h1, c1 = torch.empty_like(c), torch.empty_like(c)
    if B == 0 or H == 0:
        return h1, c1
    BLOCK_B, BLOCK_H, BLOCK_K = step_config(B, H)
    has_bias = b_ih is not None
    _cell_step_kernel[(triton.cdiv(H, BLOCK_H),)](
        x, h, c, w_ih, w_hh, b_ih.contiguous() if has_bias else x, b_hh.contiguous() if has_bias else x, h1, c1,
        B, I, H, HAS_BIAS=has_bias, BLOCK_B=BLOCK_B, BLOCK_H=BLOCK_H, BLOCK_K=BLOCK_K)
    return h1, c1


def block(H: int) -> int:
    """Hidden units per program of the pointwise cell kernels."""
    return min(triton.next_power_of_2(H), 1024)


MAX_GRID_ROWS = 2 ** 31 - 1  # a grid's axis 0 (CUDA's limit)


def launch_rows(kernel, tensors: list[torch.Tensor], H: int, **meta) -> None:
    """Runs the pointwise cell ``kernel`` (its arguments: a pointer and a row stride per tensor of
    ``tensors``, each [n, *], then H; a program per row and BLOCK hidden units) over all n rows, in
    launches of at most :data:`MAX_GRID_ROWS` rows (views of the next rows), so a batch past a grid's
    axis 0 runs rather than failing to launch."""
    n = tensors[0].shape[0]
    parts = [tensors] if n <= MAX_GRID_ROWS else [[t[start:start + MAX_GRID_ROWS] for t in tensors]
                                                   for start in range(0, n, MAX_GRID_ROWS)]
    for rows in parts:  # one, but for batches past the grid (no views made per step otherwise)
        args = [a for t in rows for a in (t, t.stride(0))]
        kernel[(rows[0].shape[0], triton.cdiv(H, meta["BLOCK"]))](*args, H, **meta)


def check_rows(kernel: str, what: str, *tensors: torch.Tensor) -> None:
    """The pointwise cell kernels' layout: each of ``tensors`` (named by the words of ``what``) 2-D
    with a contiguous last dim (rows through their stride); ValueError naming ``kernel`` otherwise."""
    for name, t in zip(what.split(), tensors):
        if t.dim() != 2 or (t.shape[1] > 1 and t.stride(1) != 1):
            raise ValueError(f"{kernel} cell kernel: {name} must be a 2-D tensor with a contiguous last dim, "
                             f"got shape {tuple(t.shape)} strides {t.stride()}")


def cell_forward(pre: torch.Tensor, c_prev: torch.Tensor, m_out: torch.Tensor, c_out: torch.Tensor,
                 act_out: torch.Tensor | None) -> None:
    """Fused cell forward (one launch per 2^31 - 1 rows): see ``seqgen_fast.reference.lstm.cell_forward``."""
    n, H = c_prev.shape
    if n == 0:
        return
    check_rows("lstm", "pre c_prev m_out c_out", pre, c_prev, m_out, c_out)
    act = act_out if act_out is not None else pre  # placeholder pointer, never written when SAVE=False
    check_rows("lstm", "act_out", act)
    launch_rows(_cell_fwd_kernel, [pre, c_prev, m_out, c_out, act], H, SAVE=act_out is not None, BLOCK=block(H))


def cell_backward(dm: torch.Tensor, dc: torch.Tensor, act: torch.Tensor, c_prev: torch.Tensor, c: torch.Tensor,
                  dg_out: torch.Tensor) -> None:
    """Fused cell backward (one launch per 2^31 - 1 rows): see ``seqgen_fast.reference.lstm.cell_backward``."""
    n, H = c.shape
    if n == 0:
        return
    check_rows("lstm", "dm dc act c_prev c dg_out", dm, dc, act, c_prev, c, dg_out)
    launch_rows(_cell_bwd_kernel, [dm, dc, act, c_prev, c, dg_out], H, BLOCK=block(H))
