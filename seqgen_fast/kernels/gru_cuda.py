"""Launchers of the CUDA GRU kernels in ``csrc/gru.cu`` (``seqgen_fast._C.gru_*``).

Gate order is torch's: r, z, n. All tensors of one call share one CUDA device and one dtype
(float32, float16 or bfloat16); accumulation and cell math are fp32. The kernels are the GRU policy
of the LSTM's machinery (``csrc/recurrence.cuh``), so what ``kernels.lstm_cuda`` says of the split,
the handoff and the products holds here with three gate rows per hidden unit:

* :func:`sequence_forward` -- the whole recurrence of one layer in one persistent cooperative launch.
  Each block keeps the three gate rows of ``W_hh`` of its hidden units in shared memory, computes
  ``hg = h_{t-1} W_hh^T + b_hh`` on tensor cores per step, applies the cell and writes ``h_t``; blocks
  hand ``h_t`` to each other through per-block release/acquire flags::

      r = sigmoid(xg^r + hg^r),  z = sigmoid(xg^z + hg^z),  n = tanh(xg^n + r * hg^n)
      h_t = n + z * (h_{t-1} - n)

  ``b_hh`` stays apart from ``xg = x W_ih^T + b_ih`` (b_hn sits inside ``r * (...)``); h_{t-1} is
  carried in fp32 on chip, ``h_t`` feeds the next step's product in the layer dtype. Training saves
  ``act`` [T, B, 4H] = (r, z, n, hg^n), the format every GRU backend's backward reads.
* :func:`sequence_backward` -- backward through time from hs, act and h0, with the columns of
  ``W_hh`` resident: writes dL/dxg and dL/dhg (in the layer dtype; the second is what the blocks
  exchange and what the caller's dW_hh / db_hh reductions read) and grad_h0.
* :func:`cell_step` -- one fused generation step (both products, kept apart for the n gate, and the
  cell) in one ordinary launch; CUDA-graph capturable.

The product follows the TF32 flags as the LSTM's does (``sequence_math``: cuDNN's
``torch.backends.cudnn.allow_tf32``; ``cell_math``: nn.GRUCell's ``torch.backends.cuda.matmul.allow_tf32``).
Each ``supports_*`` is the one capability check of a call (the dispatcher runs it; the launchers do
not repeat it): shapes, and for the persistent kernels the plan on this device, context and stream
(fits on chip, the cooperative grid resident), a trace-time constant under torch.compile.
"""
from __future__ import annotations

import torch

from .. import _ext
from . import _recurrence_cuda as _rc
from ._recurrence_cuda import CAPS, MATH_FFMA, MATH_MMA, cell_math, sequence_math

__all__ = ["supports_sequence", "sequence_forward", "supports_sequence_backward", "sequence_backward",
           "supports_cell", "cell_step", "sequence_plan", "sequence_math", "cell_math", "launch_plan",
           "MATH_MMA", "MATH_FFMA", "CAPS"]

_stream = _rc.current_stream  # the stream the kernels run on (module-level: the tests stand a double in)
_LAUNCH_PLANS: dict[tuple, dict] = {}


def sequence_plan(dtype: torch.dtype, hidden: int, batch: int, *, backward: bool, device_facts: dict,
                  math: int | None = None) -> dict:
    """How the persistent GRU kernel would split this problem on a device with ``device_facts``
    (pure host computation; the keys of ``kernels.lstm_cuda.sequence_plan``)."""
    return _rc.device_plan(_ext.C.gru_sequence_plan, dtype, hidden, batch, backward, device_facts, math)


@torch.compiler.assume_constant_result
def launch_plan(device: int, dtype_code: int, hidden: int, batch: int, backward: bool, math: int) -> dict:
    """The plan a launch on the current stream of CUDA device ``device`` runs (``_C.gru_sequence_check``),
    with ``reason`` non-empty when it cannot run there. Cached per (device, stream, sizes); a constant
    of the trace under torch.compile."""
    return _rc.cached_check(_LAUNCH_PLANS, _ext.C.gru_sequence_check, _stream(device), device, dtype_code, hidden,
                            batch, backward, math)


def _plan_reasons(t: torch.Tensor, hidden: int, batch: int, backward: bool) -> list[str]:
    reason = launch_plan(*_rc.plan_key(t, hidden, batch, backward))["reason"]
    return [reason] if reason else []


def supports_sequence(xg: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None,
                      h0: torch.Tensor) -> list[str]:
    """Reasons :func:`sequence_forward` cannot take these arguments (empty: it can)."""
    reasons = _rc.basic_reasons({"xg": xg, "w_hh": w_hh, "b_hh": b_hh, "h0": h0})
    if xg.dim() != 3 or w_hh.dim() != 2:
        return reasons + [f"xg must be [T, B, 3H] and w_hh [3H, H] (got {tuple(xg.shape)}, {tuple(w_hh.shape)})"]
    T, B, H = xg.shape[0], xg.shape[1], w_hh.shape[1]
    reasons += _rc.shape_reason("w_hh", w_hh, (3 * H, H)) + _rc.shape_reason("xg", xg, (T, B, 3 * H))
    reasons += _rc.shape_reason("b_hh", b_hh, (3 * H,)) + _rc.shape_reason("h0", h0, (B, H))
    reasons += _rc.size_reasons({"seq_len": T, "batch": B})
    if not reasons and T > 0 and B > 0 and H > 0:  # no reason so far: CUDA tensors the kernel may take
        reasons += _plan_reasons(xg, H, B, False)
    return reasons


def supports_sequence_backward(w_hh: torch.Tensor, hs: torch.Tensor, act: torch.Tensor,
                               h0: torch.Tensor) -> list[str]:
    """Reasons :func:`sequence_backward` cannot take these saved tensors (empty: it can)."""
    reasons = _rc.basic_reasons({"w_hh": w_hh, "hs": hs, "act": act, "h0": h0})
    if hs.dim() != 3 or w_hh.dim() != 2:
        return reasons + [f"hs must be [T, B, H] and w_hh [3H, H] (got {tuple(hs.shape)}, {tuple(w_hh.shape)})"]
    T, B, H = hs.shape
    reasons += _rc.shape_reason("w_hh", w_hh, (3 * H, H)) + _rc.shape_reason("act", act, (T, B, 4 * H))
    reasons += _rc.shape_reason("h0", h0, (B, H))
    reasons += _rc.size_reasons({"seq_len": T, "batch": B})
    if not reasons and T > 0 and B > 0 and H > 0:
        reasons += _plan_reasons(hs, H, B, True)
    return reasons


def supports_cell(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor | None, b_hh: torch.Tensor | None) -> list[str]:
    """Reasons :func:`cell_step` cannot take these arguments (empty: it can)."""
    reasons = _rc.basic_reasons({"x": x, "h": h, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh})
    if x.dim() != 2 or h.dim() != 2 or w_hh.dim() != 2:
        return reasons + [f"x must be [B, I], h [B, H], w_hh [3H, H] "
                          f"(got {tuple(x.shape)}, {tuple(h.shape)}, {tuple(w_hh.shape)})"]
    (B, I), H = x.shape, w_hh.shape[1]
    reasons += _rc.shape_reason("w_hh", w_hh, (3 * H, H)) + _rc.shape_reason("w_ih", w_ih, (3 * H, I))
    reasons += _rc.shape_reason("h", h, (B, H))
    reasons += _rc.shape_reason("b_ih", b_ih, (3 * H,)) + _rc.shape_reason("b_hh", b_hh, (3 * H,))
    reasons += _rc.size_reasons({"batch": B, "input_size": I})
    if I == 0 and B * H > 0:
        reasons.append("input_size 0 is not supported")
    return reasons


def sequence_forward(xg: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None, h0: torch.Tensor, *,
                     train: bool, out: tuple[torch.Tensor, ...] | None = None):
    """One GRU layer over a whole sequence in one persistent launch.

    xg [T, B, 3H] = x_t W_ih^T + b_ih (all steps, precomputed), w_hh [3H, H], b_hh [3H] or None,
    h0 [B, H]. Returns ``(hs, h_n, act)``: hs [T, B, H] = h_1..h_T, h_n [B, H] and, when ``train``,
    act [T, B, 4H] = (r, z, n, hg^n) per step (empty otherwise), all in the layer dtype. ``out`` may
    give preallocated ``(hs, h_n)`` or, when training, ``(hs, h_n, act)`` (contiguous, distinct).
    """
    what = "gru_cuda.sequence_forward"
    T, B, H = xg.shape[0], xg.shape[1], w_hh.shape[1]
    shapes = [(T, B, H), (B, H)] + ([(T, B, 4 * H)] if train else [])
    if out is None:
        outs = [torch.empty(s, dtype=xg.dtype, device=xg.device) for s in shapes]
    else:
        if len(out) != len(shapes):
            raise ValueError(f"{what}: out must hold {len(shapes)} tensors (train={train}), got {len(out)}")
        outs = [_rc.check_out(what, n, t, xg, s, xg.dtype) for n, t, s in zip(("hs", "h_n", "act"), out, shapes)]
    hs, h_n = outs[:2]
    act = outs[2] if train else xg.new_empty(0)
    if T == 0 or B == 0 or H == 0:
        h_n.copy_(h0)
        return hs, h_n, act
    xg, w_hh, h0 = xg.contiguous(), w_hh.contiguous(), h0.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    flags = _rc.zeroed_flags(launch_plan(*_rc.plan_key(xg, H, B, False)), xg)
    device = _ext.device_index(xg)
    _ext.C.gru_sequence_forward(device, _ext.dtype_code(xg.dtype), sequence_math(xg.dtype), T, B, H, _ext.ptr(xg),
                                _ext.ptr(w_hh), _ext.ptr(b_hh), _ext.ptr(h0), _ext.ptr(hs), _ext.ptr(h_n),
                                _ext.ptr(act) if train else 0, _ext.ptr(flags), flags.numel(), _stream(device))
    return hs, h_n, act


def sequence_backward(w_hh: torch.Tensor, hs: torch.Tensor, act: torch.Tensor, h0: torch.Tensor,
                      grad_hs: torch.Tensor | None, grad_h_n: torch.Tensor | None, *,
                      out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Backward through time of :func:`sequence_forward` (train=True) in one persistent launch.

    From hs [T, B, H], the saved act [T, B, 4H], h0 [B, H] and the upstream gradients grad_hs
    [T, B, H] (any strides, expanded zeros included) and grad_h_n [B, H] (each may be None: zeros),
    returns ``(d_xg, d_hg, grad_h0)``: d_xg = dL/dxg and d_hg = dL/d(h W_hh^T + b_hh), each
    [T, B, 3H], and grad_h0 [B, H], all in the layer dtype (fp32 math). Per step in reverse (dh_rec
    starts at grad_h_n, the carried term at 0)::

        dh = grad_hs[t] + dh_rec + carry
        dn = dh (1 - z)(1 - n^2),  dz = dh (h_{t-1} - n) z (1 - z),  dr = dn hg^n r (1 - r)
        d_xg_t = (dr, dz, dn),  d_hg_t = (dr, dz, dn r),  carry = dh z,  dh_rec = d_hg_t @ W_hh

    and finally grad_h0 = dh_rec + carry after t = 0. The caller forms dW_hh = sum_t d_hg_t^T h_{t-1}
    and db_hh = sum_t d_hg_t. ``out`` may give preallocated (d_xg, d_hg, grad_h0).
    """
    what = "gru_cuda.sequence_backward"
    T, B, H = hs.shape
    grad_hs = _rc.grad_arg(what, grad_hs, "grad_hs", (T, B, H), hs)
    grad_h_n = _rc.grad_arg(what, grad_h_n, "grad_h_n", (B, H), hs)
    shapes = ((T, B, 3 * H), (T, B, 3 * H), (B, H))
    names = ("d_xg", "d_hg", "grad_h0")
    if out is None:
        d_xg, d_hg, grad_h0 = (torch.empty(s, dtype=hs.dtype, device=hs.device) for s in shapes)
    else:
        if len(out) != 3:
            raise ValueError(f"{what}: out must hold (d_xg, d_hg, grad_h0), got {len(out)} tensors")
        d_xg, d_hg, grad_h0 = (_rc.check_out(what, n, t, hs, s, hs.dtype) for n, t, s in zip(names, out, shapes))
    if T == 0 or B == 0 or H == 0:
        d_xg.zero_(), d_hg.zero_()
        grad_h0.copy_(grad_h_n) if grad_h_n is not None else grad_h0.zero_()
        return d_xg, d_hg, grad_h0
    w_hh, hs, act, h0 = w_hh.contiguous(), hs.contiguous(), act.contiguous(), h0.contiguous()
    flags = _rc.zeroed_flags(launch_plan(*_rc.plan_key(hs, H, B, True)), hs)
    device = _ext.device_index(hs)
    _ext.C.gru_sequence_backward(device, _ext.dtype_code(hs.dtype), sequence_math(hs.dtype), T, B, H, _ext.ptr(w_hh),
                                 _ext.ptr(hs), _ext.ptr(act), _ext.ptr(h0), _ext.ptr(grad_hs), _ext.ptr(grad_h_n),
                                 _ext.ptr(d_xg), _ext.ptr(d_hg), _ext.ptr(grad_h0), _ext.ptr(flags), flags.numel(),
                                 _stream(device))
    return d_xg, d_hg, grad_h0


def cell_step(x: torch.Tensor, h: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor, b_ih: torch.Tensor | None,
              b_hh: torch.Tensor | None, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """One fused GRU step: ``xg = x W_ih^T + b_ih`` and ``hg = h W_hh^T + b_hh`` (r, z, n blocks),
    ``r, z = sigmoid(xg + hg)``, ``n = tanh(xg^n + r hg^n)``, ``h1 = n + z (h - n)``.

    x [B, I], h [B, H], w_ih [3H, I], w_hh [3H, H], biases [3H] or None. Returns h1 [B, H], written
    into ``out`` when given (contiguous, not overlapping any input). One launch, no allocation besides
    the output and no host sync: capturable in a CUDA graph. Tensor cores (:func:`cell_math`) from
    B = 8; below, fp32 FFMA tiles.
    """
    what = "gru_cuda.cell_step"
    (B, I), H = x.shape, w_hh.shape[1]
    h1 = torch.empty(B, H, dtype=x.dtype, device=x.device) if out is None else \
        _rc.check_out(what, "h1", out, x, (B, H), x.dtype)
    x, h, w_ih, w_hh = x.contiguous(), h.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    b_ih = None if b_ih is None else b_ih.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    if out is not None:  # (a fresh output overlaps nothing: a generation loop's hot path skips the check)
        _rc.refuse_overlaps(what, {"h1": h1}, {"x": x, "h": h, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh})
    if B == 0 or H == 0:
        return h1
    device = _ext.device_index(x)
    _ext.C.gru_cell_step(device, _ext.dtype_code(x.dtype), cell_math(x.dtype), B, I, H, _ext.ptr(x), _ext.ptr(h),
                         _ext.ptr(w_ih), _ext.ptr(w_hh), _ext.ptr(b_ih), _ext.ptr(b_hh), _ext.ptr(h1), _stream(device))
    return h1
