"""Launchers of the CUDA LSTM kernels in ``csrc/lstm.cu`` (``seqgen_fast._C.lstm_*``).

Gate order is torch's: i, f, g, o. All tensors of one call share one CUDA device and one dtype
(float32, float16 or bfloat16); accumulation and cell math are fp32.

* :func:`sequence_forward` -- the whole recurrence of one layer in one persistent cooperative launch.
  Each block owns ``units`` hidden units with their four gate rows of ``W_hh`` resident in shared
  memory; per step it computes ``xg_t + h_{t-1} W_hh^T`` for its units, applies the cell update,
  writes ``h_t`` and meets the other blocks at a grid-wide barrier::

      i, f, g, o = sigmoid, sigmoid, tanh, sigmoid of (xg_t + h_{t-1} W_hh^T)
      c_t = f * c_{t-1} + i * g,   h_t = o * tanh(c_t)

  The cell state is carried in fp32; ``h_t`` feeds the next step in the layer dtype.
* :func:`sequence_backward` -- backward through time from the saved ``cs`` and activated ``gates``,
  same scheme with the columns of ``W_hh`` resident: ``dh_{t-1} = grad_hs[t-1] + dG_t W_hh``.
  ``grad_gates`` is **float32** (it feeds the caller's weight-gradient GEMMs).
* :func:`cell_step` -- one fused generation step (both GEMVs and the cell update) in one ordinary
  launch; CUDA-graph capturable (no allocation besides the outputs, no host sync).

Each ``supports_*`` returns the reasons the kernel cannot take the arguments (empty list: it can);
it is cheap (no device sync) and it is the one capability check of a call: the dispatcher runs it,
and the launchers, called only after it passed, do not repeat it (the C++ launchers still refuse
null pointers and sizes out of range with ``ValueError``).
"""
from __future__ import annotations

import functools

import torch

from .. import _ext
from .._backend import Capabilities

__all__ = ["supports_sequence", "sequence_forward", "supports_sequence_backward", "sequence_backward",
           "supports_cell", "cell_step", "sequence_plan"]

CAPS = Capabilities("cuda", dtypes=(torch.float32, torch.float16, torch.bfloat16))


def _basic_reasons(tensors: dict[str, torch.Tensor | None]) -> list[str]:
    """Extension, device and dtype reasons shared by every kernel (None entries are skipped)."""
    present = {k: t for k, t in tensors.items() if t is not None}
    if _ext.C is None:
        return [_ext.reason]
    reasons = CAPS.reasons(*present.values())
    if len({t.dtype for t in present.values()}) > 1:
        reasons.append("mixed dtypes: " + ", ".join(f"{k} {t.dtype}" for k, t in present.items()))
    return reasons


def _shape_reason(name: str, t: torch.Tensor, shape: tuple[int, ...]) -> list[str]:
    return [] if tuple(t.shape) == tuple(shape) else [f"{name} has shape {tuple(t.shape)}, expected {tuple(shape)}"]


@functools.lru_cache(maxsize=256)
def _plan(dtype_code: int, hidden: int, batch: int, backward: bool, sm_count: int, smem: int) -> dict:
    return dict(_ext.C.lstm_sequence_plan(dtype_code, hidden, batch, backward, sm_count, smem))


def sequence_plan(dtype: torch.dtype, hidden: int, batch: int, *, backward: bool, device_facts: dict) -> dict:
    """How the persistent kernel would split this problem on a device with ``device_facts``
    (``_ext.device_info`` keys ``multiprocessor_count`` and ``shared_memory_per_block_optin``):
    dict with ``reason`` ('' when it fits), ``units`` per block, ``blocks``, ``threads``,
    ``batch_tile``, ``batch_step``, ``ksplit``, ``k_pad``, ``smem_bytes``."""
    return _plan(_ext.dtype_code(dtype), int(hidden), int(batch), bool(backward),
                 int(device_facts["multiprocessor_count"]), int(device_facts["shared_memory_per_block_optin"]))


def _device_reasons(device: torch.device, dtype: torch.dtype, hidden: int, batch: int, backward: bool) -> list[str]:
    """Cooperative launch and on-chip capacity of ``device`` for this size (CUDA tensors only)."""
    if hidden == 0 or batch == 0:
        return []  # nothing is launched
    info = _ext.device_info(device)
    if not info.get("cooperative_launch", False):
        return [f"{info['name']} does not support cooperative launches"]
    reason = sequence_plan(dtype, hidden, batch, backward=backward, device_facts=info)["reason"]
    return [reason] if reason else []


def supports_sequence(xg: torch.Tensor, w_hh: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, *,
                      train: bool) -> list[str]:
    """Reasons :func:`sequence_forward` cannot take these arguments (empty: it can)."""
    reasons = _basic_reasons({"xg": xg, "w_hh": w_hh, "h0": h0, "c0": c0})
    if xg.dim() != 3 or w_hh.dim() != 2:
        return reasons + [f"xg must be [T, B, 4H] and w_hh [4H, H] (got {tuple(xg.shape)}, {tuple(w_hh.shape)})"]
    T, B, H = xg.shape[0], xg.shape[1], w_hh.shape[1]
    reasons += _shape_reason("w_hh", w_hh, (4 * H, H)) + _shape_reason("xg", xg, (T, B, 4 * H))
    reasons += _shape_reason("h0", h0, (B, H)) + _shape_reason("c0", c0, (B, H))
    if not reasons and xg.is_cuda and T > 0:
        reasons += _device_reasons(xg.device, xg.dtype, H, B, False)
    return reasons


def supports_sequence_backward(w_hh: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor, gates: torch.Tensor,
                               h0: torch.Tensor, c0: torch.Tensor) -> list[str]:
    """Reasons :func:`sequence_backward` cannot take these saved tensors (empty: it can)."""
    reasons = _basic_reasons({"w_hh": w_hh, "hs": hs, "cs": cs, "gates": gates, "h0": h0, "c0": c0})
    if hs.dim() != 3 or w_hh.dim() != 2:
        return reasons + [f"hs must be [T, B, H] and w_hh [4H, H] (got {tuple(hs.shape)}, {tuple(w_hh.shape)})"]
    T, B, H = hs.shape
    reasons += _shape_reason("w_hh", w_hh, (4 * H, H)) + _shape_reason("cs", cs, (T, B, H))
    reasons += _shape_reason("gates", gates, (T, B, 4 * H))
    reasons += _shape_reason("h0", h0, (B, H)) + _shape_reason("c0", c0, (B, H))
    if not reasons and hs.is_cuda and T > 0:
        reasons += _device_reasons(hs.device, hs.dtype, H, B, True)
    return reasons


def supports_cell(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
                  b_ih: torch.Tensor | None, b_hh: torch.Tensor | None) -> list[str]:
    """Reasons :func:`cell_step` cannot take these arguments (empty: it can)."""
    reasons = _basic_reasons({"x": x, "h": h, "c": c, "w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh})
    if x.dim() != 2 or h.dim() != 2 or w_hh.dim() != 2:
        return reasons + [f"x must be [B, I], h [B, H], w_hh [4H, H] "
                          f"(got {tuple(x.shape)}, {tuple(h.shape)}, {tuple(w_hh.shape)})"]
    (B, I), H = x.shape, w_hh.shape[1]
    reasons += _shape_reason("w_hh", w_hh, (4 * H, H)) + _shape_reason("w_ih", w_ih, (4 * H, I))
    reasons += _shape_reason("h", h, (B, H)) + _shape_reason("c", c, (B, H))
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None:
            reasons += _shape_reason(name, b, (4 * H,))
    if I == 0 and B * H > 0:
        reasons.append("input_size 0 is not supported")
    return reasons


def _check_out(what: str, name: str, t: torch.Tensor, like: torch.Tensor, shape: tuple[int, ...],
               dtype: torch.dtype) -> torch.Tensor:
    if tuple(t.shape) != tuple(shape) or t.dtype != dtype or t.device != like.device or not t.is_contiguous():
        raise ValueError(f"{what}: out {name} must be a contiguous {dtype} tensor of shape {tuple(shape)} on "
                         f"{like.device} (got {t.dtype} {tuple(t.shape)} on {t.device})")
    return t


def _overlaps(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True when the (contiguous) storage spans of ``a`` and ``b`` intersect."""
    if a.numel() == 0 or b.numel() == 0:
        return False
    a0, b0 = a.data_ptr(), b.data_ptr()
    return a0 < b0 + b.numel() * b.element_size() and b0 < a0 + a.numel() * a.element_size()


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
        outs = [_check_out(what, n, t, xg, s, xg.dtype) for n, t, s in zip(names, out, shapes)]
    hs, h_n, c_n = outs[:3]
    cs, gates = outs[3:] if train else (xg.new_empty(0), xg.new_empty(0))
    if T == 0 or B == 0 or H == 0:
        h_n.copy_(h0)
        c_n.copy_(c0)
        return hs, h_n, c_n, cs, gates
    xg, w_hh, h0, c0 = xg.contiguous(), w_hh.contiguous(), h0.contiguous(), c0.contiguous()
    _ext.C.lstm_sequence_forward(_ext.device_index(xg), _ext.dtype_code(xg.dtype), T, B, H, _ext.ptr(xg), _ext.ptr(w_hh),
                                 _ext.ptr(h0), _ext.ptr(c0), _ext.ptr(hs), _ext.ptr(h_n), _ext.ptr(c_n),
                                 _ext.ptr(cs) if train else 0, _ext.ptr(gates) if train else 0, _ext.stream_of(xg))
    return hs, h_n, c_n, cs, gates


def _grad_arg(g: torch.Tensor | None, name: str, shape: tuple[int, ...], like: torch.Tensor) -> torch.Tensor | None:
    """An upstream gradient as a contiguous tensor in the layer dtype (None stays None: zeros)."""
    if g is None:
        return None
    if tuple(g.shape) != tuple(shape):
        raise ValueError(f"lstm_cuda.sequence_backward: {name} has shape {tuple(g.shape)}, expected {tuple(shape)}")
    if g.device != like.device:
        raise ValueError(f"lstm_cuda.sequence_backward: {name} is on {g.device}, expected {like.device}")
    return g.to(like.dtype).contiguous()


def sequence_backward(w_hh: torch.Tensor, hs: torch.Tensor, cs: torch.Tensor, gates: torch.Tensor,
                      h0: torch.Tensor, c0: torch.Tensor, grad_hs: torch.Tensor | None,
                      grad_h_n: torch.Tensor | None, grad_c_n: torch.Tensor | None, *,
                      out: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None):
    """Backward through time of :func:`sequence_forward` (train=True) in one persistent launch.

    From the saved cs [T, B, H], activated gates [T, B, 4H], c0 and the upstream gradients
    grad_hs [T, B, H] (any strides, expanded zeros included), grad_h_n, grad_c_n [B, H] (each may be
    None: zeros), returns ``(grad_gates, grad_h0, grad_c0)``: grad_gates [T, B, 4H] **float32**,
    the gradient w.r.t. the pre-activation gates (= the gradient of xg), and grad_h0/grad_c0 [B, H]
    in the layer dtype. Per step in reverse (dc starts at grad_c_n, dh at grad_h_n)::

        dh_t = grad_hs[t] + dh_rec,  dc = dc_{t+1} f_{t+1} + dh_t o (1 - tanh(c_t)^2)
        grad_gates_t = (dc g i(1-i), dc c_{t-1} f(1-f), dc i (1-g^2), dh_t tanh(c_t) o(1-o))
        dh_rec = grad_gates_t @ W_hh

    and finally grad_h0 = dh_rec after t = 0, grad_c0 = dc_0 f_0. The caller forms the weight
    gradients with GEMMs (dW_hh = sum_t grad_gates_t^T h_{t-1}). ``hs`` and ``h0`` are only checked
    (the recurrence needs cs and gates). ``out`` may give preallocated (grad_gates, grad_h0, grad_c0).
    """
    what = "lstm_cuda.sequence_backward"
    T, B, H = hs.shape
    grad_hs = _grad_arg(grad_hs, "grad_hs", (T, B, H), hs)
    grad_h_n = _grad_arg(grad_h_n, "grad_h_n", (B, H), hs)
    grad_c_n = _grad_arg(grad_c_n, "grad_c_n", (B, H), hs)
    shapes = ((T, B, 4 * H), (B, H), (B, H))
    dtypes = (torch.float32, hs.dtype, hs.dtype)
    if out is None:
        grad_gates, grad_h0, grad_c0 = (torch.empty(s, dtype=d, device=hs.device) for s, d in zip(shapes, dtypes))
    else:
        if len(out) != 3:
            raise ValueError(f"{what}: out must hold (grad_gates, grad_h0, grad_c0), got {len(out)} tensors")
        grad_gates, grad_h0, grad_c0 = (_check_out(what, n, t, hs, s, d) for n, t, s, d in
                                        zip(("grad_gates", "grad_h0", "grad_c0"), out, shapes, dtypes))
    if T == 0 or B == 0 or H == 0:
        grad_gates.zero_()
        for dst, src in ((grad_h0, grad_h_n), (grad_c0, grad_c_n)):
            dst.copy_(src) if src is not None else dst.zero_()
        return grad_gates, grad_h0, grad_c0
    w_hh, cs, gates, c0 = w_hh.contiguous(), cs.contiguous(), gates.contiguous(), c0.contiguous()
    _ext.C.lstm_sequence_backward(_ext.device_index(hs), _ext.dtype_code(hs.dtype), T, B, H, _ext.ptr(w_hh), _ext.ptr(cs),
                                  _ext.ptr(gates), _ext.ptr(c0), _ext.ptr(grad_hs), _ext.ptr(grad_h_n),
                                  _ext.ptr(grad_c_n), _ext.ptr(grad_gates), _ext.ptr(grad_h0), _ext.ptr(grad_c0),
                                  _ext.stream_of(hs))
    return grad_gates, grad_h0, grad_c0


def cell_step(x: torch.Tensor, h: torch.Tensor, c: torch.Tensor, w_ih: torch.Tensor, w_hh: torch.Tensor,
              b_ih: torch.Tensor | None, b_hh: torch.Tensor | None, *,
              out: tuple[torch.Tensor, torch.Tensor] | None = None):
    """One fused LSTM step: ``gates = x W_ih^T + b_ih + h W_hh^T + b_hh`` (i, f, g, o),
    ``c1 = sigmoid(f) c + sigmoid(i) tanh(g)``, ``h1 = sigmoid(o) tanh(c1)``.

    x [B, I], h/c [B, H], w_ih [4H, I], w_hh [4H, H], biases [4H] or None. Returns ``(h1, c1)``
    [B, H], written into ``out`` when given (contiguous, not overlapping any input). One launch,
    no allocation besides the outputs and no host sync: capturable in a CUDA graph.
    """
    what = "lstm_cuda.cell_step"
    (B, I), H = x.shape, w_hh.shape[1]
    if out is None:
        h1, c1 = torch.empty(B, H, dtype=x.dtype, device=x.device), torch.empty(B, H, dtype=x.dtype, device=x.device)
    else:
        h1, c1 = (_check_out(what, n, t, x, (B, H), x.dtype) for n, t in zip(("h1", "c1"), out))
    x, h, c, w_ih, w_hh = x.contiguous(), h.contiguous(), c.contiguous(), w_ih.contiguous(), w_hh.contiguous()
    b_ih = None if b_ih is None else b_ih.contiguous()
    b_hh = None if b_hh is None else b_hh.contiguous()
    for name, o in (("h1", h1), ("c1", c1)):
        for iname, i in (("x", x), ("h", h), ("c", c), ("w_ih", w_ih), ("w_hh", w_hh), ("b_ih", b_ih), ("b_hh", b_hh)):
            if i is not None and _overlaps(o, i):
                raise ValueError(f"{what}: out {name} overlaps input {iname}; the kernel reads all inputs while "
                                 "writing, so outputs must be separate buffers")
    if _overlaps(h1, c1):
        raise ValueError(f"{what}: out h1 and c1 overlap")
    if B == 0 or H == 0:
        return h1, c1
    _ext.C.lstm_cell_step(_ext.device_index(x), _ext.dtype_code(x.dtype), B, I, H, _ext.ptr(x), _ext.ptr(h), _ext.ptr(c),
                          _ext.ptr(w_ih), _ext.ptr(w_hh), _ext.ptr(b_ih), _ext.ptr(b_hh), _ext.ptr(h1), _ext.ptr(c1),
                          _ext.stream_of(x))
    return h1, c1
