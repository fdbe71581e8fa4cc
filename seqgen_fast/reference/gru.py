"""The GRU cell in plain PyTorch: the ground truth of the cell math, and the reference backend's cell.

Math (gate order r, z, n, as torch.nn.GRU):

    xg_t = x_t W_ih^T + b_ih                   (one GEMM for all t)
    hg_t = h_{t-1} W_hh^T + b_hh               (one GEMM per step)
    r = sigmoid(xg^r + hg^r),  z = sigmoid(xg^z + hg^z)
    n = tanh(xg^n + r * hg^n)                  (b_hn sits inside r * (...): hg reaches the cell apart from xg)
    h_t = (1 - z) * n + z * h_{t-1}  =  n + z * (h_{t-1} - n)

Layouts: ``xg``/``hg`` [n, 3H] (gate blocks r|z|n along the last dim), ``w_ih`` [3H, I], ``w_hh``
[3H, H], ``h`` [n, H].

Saved format for backward (shared by every backend): ``act`` [T, B, 4H] per step, the activated
gates r, z, n followed by ``hg^n`` (the recurrent n pre-activation, b_hn included, which dL/dr
needs), in the layer dtype. The states h_t themselves are the layer's output sequence.

:func:`cell_forward` and :func:`cell_backward` are the pointwise cell; the backend-neutral loop over
the sequence that runs them (and the Triton kernels of the same signatures) is
``seqgen_fast.ops._recurrence`` (its ``GRUCell``).
"""
from __future__ import annotations

import torch

from .lstm import compute_dtype, sigmoid

__all__ = ["cell_forward", "cell_backward"]


def cell_forward(xg: torch.Tensor, hg: torch.Tensor, h_prev: torch.Tensor, h_out: torch.Tensor,
                 act_out: torch.Tensor | None) -> None:
    """Pointwise GRU cell: ``xg``/``hg`` [n, 3H] and ``h_prev`` [n, H] -> writes ``h_out`` [n, H]
    and, when given, ``act_out`` [n, 4H] = (r, z, n, hg^n). ``h_out`` may not alias ``h_prev``."""
    cd = compute_dtype(xg.dtype)
    H = h_prev.shape[-1]
    x, g = xg.to(cd), hg.to(cd)
    r = sigmoid(x[:, :H] + g[:, :H])
    z = sigmoid(x[:, H:2 * H] + g[:, H:2 * H])
    hn = g[:, 2 * H:]
    n = torch.tanh(x[:, 2 * H:] + r * hn)
    h_out.copy_(n + z * (h_prev.to(cd) - n))
    if act_out is not None:
        act_out.copy_(torch.cat([r, z, n, hn], dim=1))


def cell_backward(dm: torch.Tensor, dh: torch.Tensor, act: torch.Tensor, h_prev: torch.Tensor,
                  dxg_out: torch.Tensor, dhg_out: torch.Tensor) -> None:
    """Backward of :func:`cell_forward`.

    ``dm`` [n, H] = dL/dh_t arriving through the recurrent GEMM of step t+1 and the output, ``dh``
    [n, H] (float32; float64 for float64) = dL/dh_t arriving directly through step t+1's
    ``z * h_t`` term (read, then overwritten in place with that term for h_{t-1}), ``act`` [n, 4H]
    the saved (r, z, n, hg^n), ``h_prev`` [n, H]. Writes the pre-activation gradients
    ``dxg_out`` = dL/dxg_t and ``dhg_out`` = dL/dhg_t, each [n, 3H]:

        dh_t = dm + dh;  dn' = dh_t (1 - z)(1 - n^2);  dz' = dh_t (h_prev - n) z (1 - z)
        dr' = dn' hg^n r (1 - r)
        dxg = (dr', dz', dn'),  dhg = (dr', dz', dn' r),  dh <- dh_t z
    """
    cd = compute_dtype(act.dtype)
    H = h_prev.shape[-1]
    a = act.to(cd)
    r, z, n, hn = a[:, :H], a[:, H:2 * H], a[:, 2 * H:3 * H], a[:, 3 * H:]
    dht = dm.to(cd) + dh.to(cd)
    dn = dht * (1 - z) * (1 - n * n)
    dz = dht * (h_prev.to(cd) - n) * z * (1 - z)
    dr = dn * hn * r * (1 - r)
    dxg_out.copy_(torch.cat([dr, dz, dn], dim=1))
    dhg_out.copy_(torch.cat([dr, dz, dn * r], dim=1))
    dh.copy_(dht * z)
