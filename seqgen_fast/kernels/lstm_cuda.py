"""Launchers of the CUDA LSTM kernels in ``csrc/lstm.cu`` (``seqgen_fast._C.lstm_*``).

Gate order is torch's: i, f, g, o. All tensors of one call share one CUDA device and one dtype
(float32, float16 or bfloat16); accumulation and cell math are fp32.

* :func:`sequence_forward` -- the whole recurrence of one layer in one persistent cooperative launch.
  Each block owns ``units`` hidden units with their four gate rows of ``W_hh`` resident in shared
  memory; per step it computes ``xg_t + h_{t-1} W_hh^T`` for its units on tensor cores, applies the
  cell update and writes ``h_t``; blocks hand ``h_t`` to each other through per-block release/acquire
  flags (no grid-wide barrier)::

      i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (xg_t + h_{t-1} W_hh^T)
      c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)

  The cell state is carried in fp32; ``h_t`` feeds the next step in the layer dtype.
* :func:`sequence_backward` -- backward through time from the saved ``cs`` and activated ``gates``,
  same scheme with the columns of ``W_hh`` resident: ``dh_{t-1} = grad_hs[t-1] + dG_t W_hh``.
  ``grad_gates`` is in the layer dtype (what the blocks exchange, and what the caller's
  weight-gradient GEMMs read).
* :func:`cell_step` -- one fused generation step (both products and the cell update) in one ordinary
  launch; CUDA-graph capturable (no allocation besides the outputs, no host sync).

The recurrent product (``math``): fp16/bf16 on tensor cores (mma.m16n8k16, fp32 accumulation);
float32 on TF32 tensor cores when ``torch.backends.cudnn.allow_tf32`` is True (torch's default, what
cuDNN's nn.LSTM does) and in exact fp32 FFMA when it is False. The cell step follows nn.LSTMCell's
cuBLAS GEMMs instead: TF32 for float32 only under ``torch.backends.cuda.matmul.allow_tf32``; tensor
cores from a batch of 8 (one mma n-tile) up.

Each ``supports_*`` returns the reasons the kernel cannot take the arguments (empty list: it can);
it is the one capability check of a call: the dispatcher runs it, and the launchers, called only
after it passed, do not repeat it (the C++ launchers still refuse null pointers and sizes out of
range with ``ValueError``). For the persistent kernels it includes what the launch will meet on the
device: the plan must fit on chip, and its cooperative grid must be resident on the SMs the current
context and stream may use (an MPS client's SM limit, a green context) at the planned kernel's
occupancy; otherwise the reason says so and dispatch moves on before anything is launched.

Under ``torch.compile`` those device queries run once per (device, stream, size) at trace time, as
constants of the trace (``torch.compiler.assume_constant_result``): nothing here calls into ``_C``
from traced code, and the caches never change what is traced.
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
    """How the persistent kernel would split this problem on a device with ``device_facts``
    (``_ext.device_info`` keys ``multiprocessor_count`` and ``shared_memory_per_block_optin``), a
    pure host computation: dict with ``reason`` ('' when it fits), ``math``, ``groups``, ``slices``,
    ``units`` per block, ``blocks``, ``threads``, ``rows``, ``cols``, ``kparts``, ``ngroups``, ``mt``,
    ``ntw``, ``bt``, ``smem_bytes``. ``math`` defaults to :func:`sequence_math` of ``dtype``."""
    return _rc.device_plan(_ext.C.lstm_sequence_plan, dtype, hidden, batch, backward, device_facts, math)


@torch.compiler.assume_constant_result
def launch_plan(device: int, dtype_code: int, hidden: int, batch: int, backward: bool, math: int) -> dict:
    """The plan a launch on the current stream of CUDA device ``device`` runs (``_C.lstm_sequence_check``:
    the SMs this context and stream may use, the opt-in shared memory, the planned kernel's
    occupancy), with ``reason`` non-empty when it cannot run there. Cached per (device, stream, sizes);
    a constant of the trace under torch.compile."""
    return _rc.cached_check(_LAUNCH_PLANS, _ext.C.lstm_sequence_check, _stream(device), device, dtype_code, hidden,
                            batch, backward, math)


def _plan_reasons(t: torch.Tensor, hidden: int, batch: int, backward: bool) -> list[str]:
    reason = launch_plan(*_rc.plan_key(t, hidden, batch, backward))["reason"]
    return [reason] if reason else []


def _flags(like: torch.Tensor, hidden: int, batch: int, backward: bool) -> torch.Tensor:
    return _rc.zeroed_flags(launch_plan(*_rc.plan_key(like, hidden, batch, backward)), like)


def supports_sequence(xg: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, *,
                      train: bool) -> list[str]:
    """Reasons :func:`sequence_forward` cannot take these arguments (empty: it can)."""
    reasons = _rc.basic_reasons({"xg": xg, "w_hh": w_hh, "h0": h0, "c0": c0})
    if xg.dim() != 3 or w_hh.dim() != 2:
        return reasons + [f"xg must be [T, B, 4H] and w_hh [4H, H] (got {tuple(xg.shape)}, {tuple(w_hh.shape)})"]
    T, B, H = xg.shape[0], xg.shape[1], w_hh.shape[1]
    reasons += _rc.shape_reason("w_hh", w_hh, (4 * H, H)) + _rc.shape_reason("xg", xg, (T, B, 4 * H))
    reasons += _rc.shape_reason("h0", h0, (B, H)) + _rc.shape_reason("c0", c0, (B, H))
    reasons += _rc.size_reasons({"seq_len": T, "batch": B})
    if not reasons and T > 0 and B > 0 and H > 0:  # no reason so far: CUDA tensors the kernel may take
        reasons += _plan_reasons(xg, H, B, False)
    return reasons


def supports_sequence_backward(w_hh: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor, gates: torch.Tensor,
                               h0: torch.Tensor, c0: torch.Tensor) -> list[str]:
    """Reasons :func:`sequence_backward` cannot take these saved tensors (empty: it can)."""
    reasons = _rc.basic_reasons({"w_hh": w_hh, "hs": hs, "cs": cs, "gates": gates, "h0": h0, "c0": c0})
    if hs.dim() != 3 or w_hh.dim() != 2:
        return reasons + [f"hs must be [T, B, H] and w_hh [4H, H] (got {tuple(hs.shape)}, {tuple(w_hh.shape)})"]
    T, B, H = hs.shape
    reasons += _rc.shape_reason("w_hh", w_hh, (4 * H, H)) + _rc.shape_reason("cs", cs, (T, B, H))
    reasons += _rc.shape_reason("gates", gates, (T, B, 4 * H))
    reasons += _rc.shape_reason("h0", h0, (B, H)) + _rc.shape_reason("c0", c0, (B, H))
    reasons += _rc.size_reasons({"seq_len": T, "batch": B})
    if not reasons and T > 0 and B > 0 and H > 0:
        reasons += _plan_reasons(hs, H, B, True)
    return reasons


def supports_cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor | None, b_hh: torch.Tensor | None) -> list[str]:
    """Reasons :func:`cell_step` cannot take these arguments (empty: it can)."""
    reasons = _rc.basic_reasons({"x": x, "h": h, "c": c, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh})
    if x.dim() != 2 or h.dim() != 2 or w_hh.dim() != 2:
        return reasons + [f"x must be [B, I], h [B, H], w_hh [4H, H] "
                          f"(got {tuple(x.shape)}, {tuple(h.shape)}, {tuple(w_hh.shape)})"]
    (B, I), H = x.shape, w_hh.shape[1]
    reasons += _rc.shape_reason("w_hh", w_hh, (4 * H, H)) + _rc.shape_reason("w_ih", w_ih, (4 * H, I))
    reasons += _rc.shape_reason("h", h, (B, H)) + _rc.shape_reason("c", c, (B, H))
    reasons += _rc.shape_reason("b_ih", b_ih, (4 * H,)) + _rc.shape_reason("b_hh", b_hh, (4 * H,))
    reasons += _rc.size_reasons({"batch": B, "input_size": I})
    if I == 0 and B * H > 0:
        reasons.append("input_size 0 is not supported")
    return reasons


def sequence_forward(xg: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, *, train: bool,
                     out: tuple[torch.Tensor, ...] | None = None):
    """One LSTM layer over a whole sequence in one persistent launch.

    xg [T, B, 4H] = x_t W_ih^T + b_ih + b_hh (all steps, precomputed), w_hh [4H, H], h0/c0 [B, H].
    Returns ``(hs, h_n, c_n, cs, gates)``: hs [T, B, H] = h_1..h_T, h_n/c_n [B, H]; when ``train``,
    cs [T, B, H] = c_1..c_T and gates [T, B, 4H] = (sigmoid i, sigmoid f, tanh g, sigmoid o), all in
    the layer dtype; without ``train`` cs and gates are empty. ``out`` may give preallocated
    ``(hs, h_n, c_n)`` or, when training, ``(hs, h_n, c_n, cs, gates)`` (contiguous, distinct).
    """
    what = "lstm_cuda.sequence_forward"
    T, B, H = xg.shape[0], xg.shape[1], w_hh.shape[1]
    shapes = [(T, B, H), (B, H), (B, H)] + ([(T, B, H), (T, B, 4 * H)] if train else [])
    if out is None:
        outs = [torch.empty(s, dtype=xg.dtype, device=xg.device) for s in shapes]
    else:
        if len(out) != len(shapes):
            raise ValueError(f"{what}: out must hold {len(shapes)} tensors (train={train}), got {len(out)}")
        names = ("hs", "h_n", "c_n", "cs", "gates")
        outs = [_rc.check_out(what, n, t, xg, s, xg.dtype) for n, t, s in zip(names, out, shapes)]
    hs, h_n, c_n = outs[:3]
    cs, gates = outs[3:] if train else (xg.new_empty(0), xg.new_empty(0))
    if T == 0 or B == 0 or H == 0:
        h_n.copy_(h0)
        c_n.copy_(c0)
        return hs, h_n, c_n, cs, gates
    xg, w_hh, h0, c0 = xg.contiguous(), w_hh.contiguous(), h0.contiguous(), c0.contiguous()
    flags = _flags(xg, H, B, False)
    _ext.C.lstm_sequence_forward(_ext.device_index(xg), _ext.dtype_code(xg.dtype), sequence_math(xg.dtype), T, B, H,
                                 _ext.ptr(xg), _ext.ptr(w_hh), _ext.ptr(h0), _ext.ptr(c0), _ext.ptr(hs), _ext.ptr(h_n),
                                 _ext.ptr(c_n), _ext.ptr(cs) if train else 0, _ext.ptr(gates) if train else 0,
                                 _ext.ptr(flags), flags.numel(), _stream(_ext.device_index(xg)))
    return hs, h_n, c_n, cs, gates


def sequence_backward(w_hh: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor, gates: torch.Tensor,
                      h0: torch.Tensor, c0: torch.Tensor, grad_hs: torch.Tensor | None,
                      grad_h_n: torch.Tensor | None, grad_c_n: torch.Tensor | None, *,
                      out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Backward through time of :func:`sequence_forward` (train=True) in one persistent launch.

    From the saved cs [T, B, H], activated gates [T, B, 4H], c0 and the upstream gradients
    grad_hs [T, B, H] (any strides, expanded zeros included), grad_h_n, grad_c_n [B, H] (each may be
    None: zeros), returns ``(grad_gates, grad_h0, grad_c0)``: grad_gates [T, B, 4H], the gradient
    w.r.t. the pre-activation gates (= the gradient of xg), and grad_h0/grad_c0 [B, H], all in the
    layer dtype (fp32 accumulation and cell math). Per step in reverse (dc starts at grad_c_n, dh at
    grad_h_n)::

        dh_t = grad_hs[t] + dh_rec,  dc = dc_{t+1} f_{t+1} + dh_t o (1 - tanh(c_t)^2)
        grad_gates_t = (dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dh_t tanh(c_t) o(1-o))
        dh_rec = grad_gates_t @ W_hh

    and finally grad_h0 = dh_rec after t = 0, grad_c0 = dc_0 f_0. The caller forms the weight
    gradients with GEMMs (dW_hh = sum_t grad_gates_t^T h_{t-1}). ``hs`` and ``h0`` are only checked
    (the recurrence needs cs and gates). ``out`` may give preallocated (grad_gates, grad_h0, grad_c0).
    """
    what = "lstm_cuda.sequence_backward"
    T, B, H = hs.shape
    grad_hs = _rc.grad_arg(what, grad_hs, "grad_hs", (T, B, H), hs)
    grad_h_n = _rc.grad_arg(what, grad_h_n, "grad_h_n", (B, H), hs)
    grad_c_n = _rc.grad_arg(what, grad_c_n, "grad_c_n", (B, H), hs)
    shapes = ((T, B, 4 * H), (B, H), (B, H))
    if out is None:
        grad_gates, grad_h0, grad_c0 = (torch.empty(s, dtype=hs.dtype, device=hs.device) for s in shapes)
    else:
        if len(out) != 3:
            raise ValueError(f"{what}: out must hold (grad_gates, grad_h0, grad_c0), got {len(out)} tensors")
        grad_gates, grad_h0, grad_c0 = (_rc.check_out(what, n, t, hs, s, hs.dtype) for n, t, s in
                                        zip(("grad_gates", "grad_h0", "grad_c0"), out, shapes))
    if T == 0 or B == 0 or H == 0:
        grad_gates.zero_()
        for dst, src in ((grad_h0, grad_h_n), (grad_c0, grad_c_n)):
            dst.copy_(src) if src is not None else dst.zero_()
        return grad_gates, grad_h0, grad_c0
    w_hh, cs, gates, c0 = w_hh.contiguous(), cs.contiguous(), gates.contiguous(), c0.contiguous()
    flags = _flags(hs, H, B, True)
    _ext.C.lstm_sequence_backward(_ext.device_index(hs), _ext.dtype_code(hs.dtype), sequence_math(hs.dtype), T, B, H,
                                  _ext.ptr(w_hh), _ext.ptr(cs), _ext.ptr(gates), _ext.ptr(c0), _ext.ptr(grad_hs),
                                  _ext.ptr(grad_h_n), _ext.ptr(grad_c_n), _ext.ptr(grad_gates), _ext.ptr(grad_h0),
                                  _ext.ptr(grad_c0), _ext.ptr(flags), flags.numel(), _stream(_ext.device_index(hs)))
    return grad_gates, grad_h0, grad_c0


def cell_step(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, *,
              out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One fused LSTM step: ``gates = x W_ih^T + b_ih + h W_hh^T + b_hh`` (i, f, g, o),
    ``c1 = sigmoid(f) c + sigmoid(i) tanh(g)``, ``h1 = sigmoid(o) tanh(c1)``.

    x [B, I], h/c [B, H], w_ih [4H, I], w_hh [4H, H], biases [4H] or None. Returns ``(h1, c1)``
    [B, H], written into ``out`` when given (contiguous, not overlapping any input). One launch,
    no allocation besides the outputs and no host sync: capturable in a CUDA graph. Tensor cores
    (:func:`cell_math`) from B = 8; below, fp32 FFMA tiles.
    """
    what = "lstm_cuda.cell_step"
    (B, I), H = x.shape, w_hh.shape[1]
    if out is None:
        h1, c1 = torch.empty(B, H, dtype=x.dtype, device=x.device), torch.empty(B, H, dtype=x.dtype, device=x.device)
    else:
        h1, c1 = (_rc.check_out(what, n, t, x, (B, H), x.dtype) for n, t in zip(("h1", "c1"), out))
    x, h, c, w_ih, w_hh = x.contiguous(), h.contiguous(), c.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    b_ih = None if b_ih is None else b_ih.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    if out is not None:  # (fresh outputs overlap nothing: a generation loop's hot path skips these checks)
        _rc.refuse_overlaps(what, {"h1": h1, "c1": c1}, {"x": x, "h": h, "c": c, "w_ih": w_ih, "w_hh": w_hh,
                                                         "b_ih": b_ih, "b_hh": b_hh})
    if B == 0 or H == 0:
        return h1, c1
    _ext.C.lstm_cell_step(_ext.device_index(x), _ext.dtype_code(x.dtype), cell_math(x.dtype), B, I, H, _ext.ptr(x),
                          _ext.ptr(h), _ext.ptr(c), _ext.ptr(w_ih), _ext.ptr(w_hh), _ext.ptr(b_ih), _ext.ptr(b_hh),
                          _ext.ptr(h1), _ext.ptr(c1), _stream(_ext.device_index(x)))
    return h1, c1
