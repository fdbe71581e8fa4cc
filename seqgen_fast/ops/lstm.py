"""LSTM ops: dispatch, torch.library ops with autograd, and the functional API.

Public functions (``seqgen_fast.functional``):

* :func:`lstm` -- multi-layer, optionally bidirectional LSTM over raw weights (torch's ``_VF.lstm``
  semantics), padded or packed input, projections, dropout between layers.
* :func:`lstm_cell` -- one step of an LSTM cell (``torch.nn.LSTMCell``'s math).

Ops (``torch.ops.seqgen_fast.*``; each takes the chosen backend as its ``backend`` argument):

* ``lstm_sequence(xg, w_hh, w_hr, h0, c0, batch_sizes, backend, train) -> (hs, h_n, c_n, cs, gates)``:
  the recurrence of one layer in one direction, forward in time, over the precomputed input
  projection ``xg = x W_ih^T + b_ih + b_hh`` [T, B, 4H]. ``cs``/``gates`` are the saved format (cell
  states and activated gates, see ``seqgen_fast.reference.lstm``), empty when ``train`` is False
  (inference saves nothing). Differentiable in xg, w_hh, w_hr, h0, c0; its backward is
* ``lstm_sequence_backward(...) -> (dxg, dw_hh, dw_hr, dh0, dc0)``: any backend can run it on the
  saved format; the forward's backend is preferred.
* ``lstm_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh, backend) -> (h1, c1)``: one inference step; on the
  ``cuda`` backend a single fused launch (both matrix-vector products and the cell update), on
  ``triton`` one launch for batches up to ``kernels.lstm.STEP_MAX_BATCH``. Eager (not compiling)
  ``lstm_cell`` calls its implementation directly: no autograd to attach, and the op's Python
  dispatch would cost more host time than the launch.

Backends, in automatic order: ``cuda`` (persistent kernels of ``seqgen_fast.kernels.lstm_cuda``:
W_hh resident on chip, the recurrent product on tensor cores, blocks handing h_t over through
release/acquire flags; no projections, no variable lengths), ``triton`` (per step: cuBLAS addmm +
the fused Triton cell), ``reference`` (plain PyTorch, any float dtype). A size or case a backend
cannot take goes to the next one, with its reason -- including a cuda grid that cannot be resident
on this context's SMs (MPS, green contexts), decided before anything is launched.

Non-finite values, the same on every backend (tests/test_fuzz_recurrent.py): NaN and +-inf propagate as
in ``torch.nn.LSTM`` / ``LSTMCell`` in the same dtype. A NaN in the input or the initial states reaches
exactly the elements torch's does (through the recurrent product, every unit of the following steps);
sigmoid(+-inf) = 1 / 0, tanh(+-inf) = +-1, and a saturated gate times an infinite cell state (0 * inf)
is NaN, as in torch. The gradients of the input, the initial states and every weight are NaN / +-inf
where torch's backward has them (in float64; or in the same dtype, where its saturation makes the two
differ): a NaN in one batch row leaves the other rows' gradients of x and h0/c0 finite, and the held
rows of a PackedSequence never enter the weight GEMMs. No NaN-dropping min/max is compiled into the
CUDA kernels (their SASS is checked, ``tests/support/sass.py``); the Triton cell uses none. The CUDA
kernels flush subnormal fp32 intermediates to zero (``--use_fast_math``): a difference from torch below
the dtype's smallest normal.

Under ``torch.compile`` the whole public API traces with ``fullgraph=True``: backend selection is
plain Python over shapes and dtypes (the device facts it needs are trace-time constants, see
``kernels.lstm_cuda.launch_plan``), each op is one opaque node, and nothing traced reads a cache
that the first call fills, so steps do not recompile.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import Capabilities, dispatcher
from ..kernels import lstm_cuda
from ..reference import lstm as ref
from . import _recurrence
from ._library import CUDNN_RNN_AUTOCAST, LOWER, RNN_CELL_AUTOCAST, autocast_as, custom_op

__all__ = ["lstm", "lstm_cell", "lstm_sequence", "lstm_sequence_backward", "lstm_cell_step", "SEQ", "SEQ_BWD", "CELL"]

ORDER = ("cuda", "triton", "reference")
SEQ = dispatcher("lstm_sequence", ORDER)
SEQ_BWD = dispatcher("lstm_sequence_backward", ORDER)
CELL = dispatcher("lstm_cell_step", ORDER)

# Autocast (torch's rules): nn.LSTM runs in float16 on CUDA (cuDNN's wrapper, whatever the autocast
# dtype) and in the autocast dtype on the CPU (mkldnn_rnn_layer, padded input only: torch's packed
# CPU path is not autocast); LSTMCell (lstm_cell) is on the CUDA list only.
SEQ_AUTOCAST = {**CUDNN_RNN_AUTOCAST, "cpu": LOWER}

TRITON = Capabilities("triton", dtypes=(torch.float32, torch.float16, torch.bfloat16))
REFERENCE = Capabilities("reference", dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))


# ----------------------------------------------------------------------------------------------
# Capabilities: each backend's reasons, checked once per call
# ----------------------------------------------------------------------------------------------
def _cuda_kernels():
    """The CUDA launchers (``seqgen_fast.kernels.lstm_cuda``; tests stand a double in for them)."""
    return lstm_cuda


_NO_PROJECTION = "projections (proj_size > 0) are not in the cuda kernel"
_NO_VARLEN = "variable lengths (PackedSequence) are not in the cuda kernel"


def _cuda_case_reasons(w_hr, batch_sizes) -> list[str]:
    return ([_NO_PROJECTION] if w_hr is not None else []) + ([_NO_VARLEN] if batch_sizes is not None else [])


def _seq_supports_cuda(xg, w_hh, w_hr, h0, c0, batch_sizes, train):
    return _cuda_case_reasons(w_hr, batch_sizes) or _cuda_kernels().supports_sequence(xg, w_hh, h0, c0, train=train)


def _bwd_supports_cuda(w_hh, w_hr, hs, cs, gates, h0, c0, batch_sizes):
    return _cuda_case_reasons(w_hr, batch_sizes) or _cuda_kernels().supports_sequence_backward(w_hh, hs, cs, gates,
                                                                                               h0, c0)


def _cell_supports_cuda(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return _cuda_kernels().supports_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)


def _seq_supports(caps: Capabilities):
    return lambda xg, w_hh, w_hr, h0, c0, batch_sizes, train: caps.reasons(xg, w_hh, w_hr, h0, c0)


def _bwd_supports(caps: Capabilities):
    # the backward follows the forward's backend, which already obeyed the device rule
    return lambda w_hh, w_hr, hs, cs, gates, h0, c0, batch_sizes: caps.reasons(gates, w_hh, w_hr, hs, cs, h0, c0)


def _cell_supports(caps: Capabilities):
    return lambda x, h, c, w_ih, w_hh, b_ih, b_hh: caps.reasons(x, h, c, w_ih, w_hh, b_ih, b_hh)


# ----------------------------------------------------------------------------------------------
# Backend implementations
# ----------------------------------------------------------------------------------------------
def _triton_cells():
    from ..kernels import lstm as tk

    return tk


@SEQ.register("cuda", supports=_seq_supports_cuda, caps=lstm_cuda.CAPS)
def _seq_cuda(xg, w_hh, w_hr, h0, c0, batch_sizes, train):
    return _cuda_kernels().sequence_forward(xg, w_hh, h0, c0, train=train)


@SEQ.register("triton", supports=_seq_supports(TRITON), caps=TRITON)
def _seq_triton(xg, w_hh, w_hr, h0, c0, batch_sizes, train):
    return _recurrence.recurrence_forward(xg, w_hh, w_hr, h0, c0, batch_sizes, train, cell=_triton_cells().cell_forward)


@SEQ.register("reference", supports=_seq_supports(REFERENCE), caps=REFERENCE)
def _seq_reference(xg, w_hh, w_hr, h0, c0, batch_sizes, train):
    return _recurrence.recurrence_forward(xg, w_hh, w_hr, h0, c0, batch_sizes, train, cell=ref.cell_forward)


@SEQ_BWD.register("cuda", supports=_bwd_supports_cuda, caps=lstm_cuda.CAPS)
def _bwd_cuda(w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n, batch_sizes):
    # grad_gates comes back in the layer dtype: what the blocks exchanged, and what the weight GEMMs read
    dG, dh0, dc0 = _cuda_kernels().sequence_backward(w_hh, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n)
    return dG, dh0, dc0, None


@SEQ_BWD.register("triton", supports=_bwd_supports(TRITON), caps=TRITON)
def _bwd_triton(w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n, batch_sizes):
    return _recurrence.recurrence_backward(w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n,
                                           batch_sizes, cell=_triton_cells().cell_backward)


@SEQ_BWD.register("reference", supports=_bwd_supports(REFERENCE), caps=REFERENCE)
def _bwd_reference(w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n, batch_sizes):
    return _recurrence.recurrence_backward(w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n,
                                           batch_sizes, cell=ref.cell_backward)


def _cell_step_loop(cell, x, h, c, w_ih, w_hh, b_ih, b_hh):
    """addmm for both products (cuBLAS), then the pointwise ``cell``."""
    pre = F.linear(x, w_ih, None if b_ih is None else b_ih + b_hh)
    pre.addmm_(h, w_hh.t())
    h1, c1 = torch.empty_like(c), torch.empty_like(c)
    cell(pre, c, h1, c1, None)
    return h1, c1


@CELL.register("cuda", supports=_cell_supports_cuda, caps=lstm_cuda.CAPS)
def _cell_cuda(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return _cuda_kernels().cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh)


@CELL.register("triton", supports=_cell_supports(TRITON), caps=TRITON)
def _cell_triton(x, h, c, w_ih, w_hh, b_ih, b_hh):
    tk = _triton_cells()
    if x.shape[0] <= tk.STEP_MAX_BATCH:
        return tk.cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh)
    return _cell_step_loop(tk.cell_forward, x, h, c, w_ih, w_hh, b_ih, b_hh)


@CELL.register("reference", supports=_cell_supports(REFERENCE), caps=REFERENCE)
def _cell_reference(x, h, c, w_ih, w_hh, b_ih, b_hh):
    return _cell_step_loop(ref.cell_forward, x, h, c, w_ih, w_hh, b_ih, b_hh)


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------
def _seq_fake(xg, w_hh, w_hr, h0, c0, batch_sizes, backend, train):
    T, B, G = xg.shape
    H, P = G // 4, w_hh.shape[1]
    saved = (xg.new_empty(T, B, H), xg.new_empty(T, B, G)) if train else (xg.new_empty(0), xg.new_empty(0))
    return xg.new_empty(T, B, P), h0.new_empty(B, P), c0.new_empty(B, H), *saved


def _seq_bwd_fake(w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n, batch_sizes, backend):
    return (torch.empty_like(gates), torch.empty_like(w_hh),
            torch.empty_like(w_hr) if w_hr is not None else w_hh.new_empty(0),
            torch.empty_like(h0), torch.empty_like(c0))


@custom_op("lstm_sequence_backward", fake=_seq_bwd_fake)
def lstm_sequence_backward(w_hh: Tensor, w_hr: Optional[Tensor], hs: Tensor, cs: Tensor, gates: Tensor, h0: Tensor,
                           c0: Tensor, grad_hs: Tensor, grad_h_n: Tensor, grad_c_n: Tensor,
                           batch_sizes: Optional[Tensor], backend: str
                           ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``lstm_sequence``: (dxg [T,B,4H], dw_hh, dw_hr (empty without projection), dh0, dc0).
    The recurrence runs on ``backend``; dW_hh = sum_t dG_t^T h_{t-1} and dW_hr are GEMMs after it."""
    dG, dh0, dc0, dH = SEQ_BWD.impl(backend)(w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs.contiguous(),
                                             grad_h_n.contiguous(), grad_c_n.contiguous(), batch_sizes)
    dw_hh, dw_hr = _recurrence.weight_grads(dG, dH, hs, cs, gates, h0, w_hh, w_hr, batch_sizes)
    return (dG.to(gates.dtype), dw_hh, dw_hr if dw_hr is not None else w_hh.new_empty(0),
            dh0.to(h0.dtype), dc0.to(c0.dtype))


def _backward_backend(preferred: str, *args) -> str:
    """The forward's backend when it can run the backward, else the dispatcher's choice."""
    return preferred if not SEQ_BWD.reasons(preferred, *args) else SEQ_BWD.select(*args)


def _seq_setup(ctx, inputs, output):
    xg, w_hh, w_hr, h0, c0, batch_sizes, backend, train = inputs
    hs, _, _, cs, gates = output
    ctx.save_for_backward(w_hh, w_hr, hs, cs, gates, h0, c0)
    ctx.batch_sizes, ctx.backend, ctx.train = batch_sizes, backend, train


def _seq_backward(ctx, grad_hs, grad_h_n, grad_c_n, _grad_cs, _grad_gates):
    if not ctx.train:
        raise RuntimeError("lstm_sequence: backward needs the saved gates, but the forward ran with train=False "
                           "(call it with grad enabled on an input that requires grad)")
    w_hh, w_hr, hs, cs, gates, h0, c0 = ctx.saved_tensors
    backend = _backward_backend(ctx.backend, w_hh, w_hr, hs, cs, gates, h0, c0, ctx.batch_sizes)
    dxg, dw_hh, dw_hr, dh0, dc0 = lstm_sequence_backward(w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs, grad_h_n,
                                                         grad_c_n, ctx.batch_sizes, backend)
    return dxg, dw_hh, dw_hr if w_hr is not None else None, dh0, dc0, None, None, None


@custom_op("lstm_sequence", fake=_seq_fake, backward=_seq_backward, setup_context=_seq_setup, autocast=SEQ_AUTOCAST)
def lstm_sequence(xg: Tensor, w_hh: Tensor, w_hr: Optional[Tensor], h0: Tensor, c0: Tensor,
                  batch_sizes: Optional[Tensor], backend: str, train: bool
                  ) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    """One LSTM layer, one direction, forward in time over ``xg`` [T, B, 4H] (see the module doc)."""
    return tuple(SEQ.impl(backend)(xg, w_hh, w_hr, h0, c0, batch_sizes, train))


def _cell_fake(x, h, c, w_ih, w_hh, b_ih, b_hh, backend):
    return torch.empty_like(c), torch.empty_like(c)


@custom_op("lstm_cell_step", fake=_cell_fake, autocast=RNN_CELL_AUTOCAST)
def lstm_cell_step(x: Tensor, h: Tensor, c: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor],
                   b_hh: Optional[Tensor], backend: str) -> tuple[Tensor, Tensor]:
    """One inference step of an LSTM cell (no autograd): (h1, c1), each [B, H]."""
    return tuple(CELL.impl(backend)(x, h, c, w_ih, w_hh, b_ih, b_hh))


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _check_like(fn: str, ref_name: str, ref_t: Tensor, named: dict) -> None:
    """Every tensor in ``named`` must share ``ref_t``'s dtype and device; the message names both."""
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.dtype != ref_t.dtype:
            raise ValueError(f"{fn}: {name} has dtype {t.dtype} but {ref_name} has dtype {ref_t.dtype}; "
                             f"convert one of them (e.g. {name}.to({ref_t.dtype}))")
        if t.device != ref_t.device:
            raise ValueError(f"{fn}: {name} is on {t.device} but {ref_name} is on {ref_t.device}; "
                             "move them to the same device")


def _check_shape(fn: str, name: str, t: Tensor, shape: tuple) -> None:
    if tuple(t.shape) != tuple(shape):
        raise RuntimeError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(t.shape)}")


def _split_weights(weights: Sequence[Tensor], num_layers: int, directions: int, bias: bool):
    """torch's flat weight order -> per (layer, direction): (w_ih, w_hh, b_ih, b_hh, w_hr)."""
    n = num_layers * directions
    if n <= 0 or len(weights) % n:
        raise ValueError(f"lstm: weights has {len(weights)} tensors, not a multiple of num_layers * directions = {n}")
    per = len(weights) // n
    allowed = (4, 5) if bias else (2, 3)
    if per not in allowed:
        raise ValueError(f"lstm: expected {allowed[0]} (or {allowed[1]} with projections) weights per layer and "
                         f"direction with bias={bias}, got {per}")
    out = []
    for k in range(n):
        w = list(weights[k * per:(k + 1) * per])
        w_ih, w_hh = w[0], w[1]
        b_ih, b_hh = (w[2], w[3]) if bias else (None, None)
        w_hr = w[-1] if per in (3, 5) else None
        out.append((w_ih, w_hh, b_ih, b_hh, w_hr))
    return out


def _reverse_index(batch_sizes: Tensor, T: int, B: int, device) -> Tensor:
    """[T, B] time index reversing each row within its length (identity past the length)."""
    lengths = (batch_sizes.view(-1, 1) > torch.arange(B).view(1, -1)).sum(0)
    t = torch.arange(T).view(-1, 1)
    idx = torch.where(t < lengths.view(1, -1), lengths.view(1, -1) - 1 - t, t)
    return idx.to(device)


def _reverse(x: Tensor, rev_idx: Optional[Tensor]) -> Tensor:
    if rev_idx is None:
        return x.flip(0)
    return x.gather(0, rev_idx.unsqueeze(-1).expand_as(x))


def _layer_direction(x, weights, h0, c0, batch_sizes, rev_idx, reverse):
    w_ih, w_hh, b_ih, b_hh, w_hr = weights
    xg = F.linear(x, w_ih, None if b_ih is None else b_ih + b_hh)
    if reverse:
        xg = _reverse(xg, rev_idx)
    xg = xg.contiguous()
    h0, c0 = h0.contiguous(), c0.contiguous()
    train = _recurrence.needs_grad(xg, w_hh, w_hr, h0, c0)
    name = SEQ.select(xg, w_hh, w_hr, h0, c0, batch_sizes, train=train)
    hs, h_n, c_n, _, _ = lstm_sequence(xg, w_hh, w_hr, h0, c0, batch_sizes, name, train)
    return (_reverse(hs, rev_idx) if reverse else hs), h_n, c_n


def _cell_backend(x, h, c, w_ih, w_hh, b_ih, b_hh) -> str:
    """``CELL.select`` memoized on what the supports functions look at (device, dtype, shapes, bias, the
    TF32 flag of the cell's product; devices and dtypes were checked equal before): a generation loop
    pays the checks once. Traced, the plain selection (the memo would be a cache the trace guards on)."""
    if torch.compiler.is_compiling():
        return CELL.select(x, h, c, w_ih, w_hh, b_ih, b_hh)
    key = (x.device, x.dtype, tuple(x.shape), tuple(h.shape), tuple(w_ih.shape), b_ih is not None,
           lstm_cuda.cell_math(x.dtype))
    return CELL.select_cached(key, x, h, c, w_ih, w_hh, b_ih, b_hh)


def _lstm_autocast(*args, batch_sizes=None, **kwargs):
    return SEQ_AUTOCAST if batch_sizes is None else CUDNN_RNN_AUTOCAST


@autocast_as(_lstm_autocast)
def lstm(input: Tensor, hx: Optional[tuple[Tensor, Tensor]], weights: Sequence[Tensor], *, num_layers: int = 1,
         bias: bool = True, batch_first: bool = False, dropout: float = 0.0, training: bool = False,
         bidirectional: bool = False, batch_sizes: Optional[Tensor] = None,
         backend: Optional[str] = None) -> tuple[Tensor, tuple[Tensor, Tensor]]:
    """Multi-layer LSTM over raw weights, with the semantics of ``torch._VF.lstm`` / ``torch.nn.LSTM``.

    Args:
        input: [T, B, I] (or [B, T, I] with ``batch_first``); or, with ``batch_sizes``, the packed
            data [sum(batch_sizes), I] of a ``PackedSequence`` (sorted order, as ``.data``).
        hx: ``(h0, c0)`` with h0 [L*D, B, P] and c0 [L*D, B, H] (D = 2 if bidirectional, P = proj
            size or H; for packed input, rows in sorted order), or None for zeros.
        weights: the flat list in ``torch.nn.LSTM._flat_weights`` order: per layer, per direction
            (forward then reverse): ``w_ih`` [4H, I_l], ``w_hh`` [4H, P], then ``b_ih``, ``b_hh``
            [4H] if ``bias``, then ``w_hr`` [P, H] when projecting (inferred from the count).
        dropout, training: dropout with probability ``dropout`` on the output of every layer but
            the last, only when ``training`` (``ops._recurrence.inter_layer_dropout``: on the CPU the
            same draws as torch's own LSTM under one seed, padded or packed; cuDNN draws its own).
        batch_sizes: int64 CPU tensor [T] of a PackedSequence (non-increasing), or None.
        backend: force "cuda", "triton" or "reference" (default: automatic).

    Returns ``(output, (h_n, c_n))``: output [T, B, D*P] (``batch_first``: [B, T, D*P]; packed:
    [sum(batch_sizes), D*P]); h_n [L*D, B, P], c_n [L*D, B, H]. Gate order i, f, g, o.
    The reverse direction of a packed batch runs over each sequence reversed within its length.
    """
    fn = "lstm"
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    directions = 2 if bidirectional else 1
    per_ld = _split_weights(weights, num_layers, directions, bias)
    w_ih0, w_hh0, _, _, w_hr0 = per_ld[0]
    H = w_hh0.shape[0] // 4
    P = w_hr0.shape[0] if w_hr0 is not None else H
    want_dim = 2 if batch_sizes is not None else 3
    if input.dim() != want_dim:
        raise RuntimeError(f"{fn}: input must have {want_dim} dimensions"
                           f"{' (packed data)' if batch_sizes is not None else ''}, got {input.dim()}")
    if input.shape[-1] != w_ih0.shape[1]:
        raise RuntimeError(f"{fn}: input.size(-1) must be equal to input_size. Expected {w_ih0.shape[1]}, "
                           f"got {input.shape[-1]}")
    _check_like(fn, "input", input, {f"weights[{k}]": w for k, w in enumerate(weights)})
    if batch_sizes is not None:
        from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

        x, lengths = pad_packed_sequence(PackedSequence(input, batch_sizes))
        B = int(batch_sizes[0])
    else:
        x = input.transpose(0, 1) if batch_first else input
        B = x.shape[1]
    if hx is None:
        h0 = input.new_zeros(num_layers * directions, B, P)
        c0 = input.new_zeros(num_layers * directions, B, H)
    else:
        h0, c0 = hx
        _check_like(fn, "input", input, {"hx[0]": h0, "hx[1]": c0})
        _check_shape(fn, "hx[0]", h0, (num_layers * directions, B, P))
        _check_shape(fn, "hx[1]", c0, (num_layers * directions, B, H))
    T = x.shape[0]
    if T == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    rev_idx = _reverse_index(batch_sizes, T, B, x.device) if (batch_sizes is not None and bidirectional) else None
    h_n, c_n = [], []
    with _recurrence.forcing(backend):
        for layer in range(num_layers):
            outs = []
            for d in range(directions):
                k = layer * directions + d
                hs, hk, ck = _layer_direction(x, per_ld[k], h0[k], c0[k], batch_sizes, rev_idx, reverse=d == 1)
                outs.append(hs)
                h_n.append(hk)
                c_n.append(ck)
            x = torch.cat(outs, -1) if directions == 2 else outs[0]
            if training and dropout != 0 and layer < num_layers - 1:
                x = _recurrence.inter_layer_dropout(x, dropout, batch_sizes)
    if batch_sizes is not None:
        from torch.nn.utils.rnn import pack_padded_sequence

        output = pack_padded_sequence(x, lengths).data
    else:
        output = x.transpose(0, 1) if batch_first else x
    return output, (torch.stack(h_n), torch.stack(c_n))


@autocast_as(RNN_CELL_AUTOCAST)
def lstm_cell(input: Tensor, hx: Optional[tuple[Tensor, Tensor]], w_ih: Tensor, w_hh: Tensor,
              b_ih: Optional[Tensor] = None, b_hh: Optional[Tensor] = None, *,
              backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """One LSTM cell step (``torch.nn.LSTMCell``'s math, gate order i, f, g, o).

    ``input`` [B, I], ``hx = (h, c)`` each [B, H] (None: zeros), ``w_ih`` [4H, I], ``w_hh`` [4H, H],
    ``b_ih``/``b_hh`` [4H] or None. Returns ``(h1, c1)``, each [B, H]:
    G = x W_ih^T + b_ih + h W_hh^T + b_hh; c1 = f c + i g; h1 = o tanh(c1).

    Without autograd (``torch.no_grad`` or nothing requires grad) this is one ``lstm_cell_step``
    op: on the cuda backend a single fused launch, CUDA-graph capturable. With autograd it is the
    input GEMM plus a one-step ``lstm_sequence``, differentiable in every argument.
    """
    fn = "lstm_cell"
    if not isinstance(input, Tensor) or input.dim() != 2:
        raise ValueError(f"{fn}: input must be a 2-D tensor [batch, input_size], got "
                         f"{input.dim() if isinstance(input, Tensor) else type(input).__name__}"
                         f"{'-D' if isinstance(input, Tensor) else ''}")
    if w_hh.dim() != 2 or w_hh.shape[0] % 4 or w_hh.shape[0] != 4 * w_hh.shape[1]:
        raise ValueError(f"{fn}: w_hh must have shape (4*hidden_size, hidden_size), got {tuple(w_hh.shape)}")
    H = w_hh.shape[1]
    if w_ih.dim() != 2 or w_ih.shape[0] != 4 * H:
        raise ValueError(f"{fn}: w_ih must have shape (4*hidden_size, input_size) = ({4 * H}, input_size), "
                         f"got {tuple(w_ih.shape)}")
    if input.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"{fn}: input has inconsistent input_size: got {input.shape[1]} expected {w_ih.shape[1]}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{fn}: give both b_ih and b_hh, or neither")
    _check_like(fn, "input", input, {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh})
    B = input.shape[0]
    if hx is None:
        h = c = input.new_zeros(B, H)
    else:
        h, c = hx
        _check_like(fn, "input", input, {"hx[0]": h, "hx[1]": c})
        _check_shape(fn, "hx[0]", h, (B, H))
        _check_shape(fn, "hx[1]", c, (B, H))
    if b_ih is not None:
        _check_shape(fn, "b_ih", b_ih, (4 * H,))
        _check_shape(fn, "b_hh", b_hh, (4 * H,))
    h, c = h.contiguous(), c.contiguous()
    with _recurrence.forcing(backend):
        if not _recurrence.needs_grad(input, h, c, w_ih, w_hh, b_ih, b_hh):
            x = input.contiguous()
            name = _cell_backend(x, h, c, w_ih, w_hh, b_ih, b_hh)
            if torch.compiler.is_compiling():
                return lstm_cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh, name)
            # Eager generation loops: the op's Python dispatch would cost more host time than the
            # fused launch; with no autograd to attach, call the implementation directly.
            return tuple(CELL.impl(name)(x, h, c, w_ih, w_hh, b_ih, b_hh))
        xg = F.linear(input, w_ih, None if b_ih is None else b_ih + b_hh).unsqueeze(0).contiguous()
        name = SEQ.select(xg, w_hh, None, h, c, None, train=True)
        _, h1, c1, _, _ = lstm_sequence(xg, w_hh, None, h, c, None, name, True)
        return h1, c1
