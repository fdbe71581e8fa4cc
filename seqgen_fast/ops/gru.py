"""GRU ops: dispatch, torch.library ops with autograd, and the functional API.

Public functions (``seqgen_fast.functional``):

* :func:`gru` -- multi-layer, optionally bidirectional GRU over raw weights (torch's ``_VF.gru``
  semantics), padded or packed input, dropout between layers.
* :func:`gru_cell` -- one step of a GRU cell (``torch.nn.GRUCell``'s math).

Ops (``torch.ops.seqgen_fast.*``; each takes the chosen backend as its ``backend`` argument):

* ``gru_sequence(xg, w_hh, b_hh, h0, batch_sizes, backend, train) -> (hs, h_n, act)``: the
  recurrence of one layer in one direction, forward in time, over the precomputed input projection
  ``xg = x W_ih^T + b_ih`` [T, B, 3H]; each step adds ``hg = h W_hh^T + b_hh`` (b_hh stays apart
  from xg: the n gate scales hg^n by r). ``act`` is the saved format (r, z, n, hg^n per step, see
  ``seqgen_fast.reference.gru``), empty when ``train`` is False. Differentiable in xg, w_hh, b_hh,
  h0; its backward is
* ``gru_sequence_backward(w_hh, hs, act, h0, grad_hs, grad_h_n, batch_sizes, bias, backend) ->
  (dxg, dw_hh, db_hh, dh0)``: any backend can run it on the saved format; the forward's backend is
  preferred.
* ``gru_cell_step(x, h, w_ih, w_hh, b_ih, b_hh, backend) -> h1``: one inference step; on the
  ``cuda`` backend a single fused launch (both matrix products and the cell), on ``triton`` one
  launch for batches up to ``kernels.gru.STEP_MAX_BATCH``. Eager (not compiling) ``gru_cell`` calls
  its implementation directly, as ``lstm_cell`` does.

Backends, in automatic order: ``cuda`` (the persistent kernels of ``seqgen_fast.kernels.gru_cuda``,
the GRU policy of the LSTM's machinery: W_hh resident on chip, the recurrent product on tensor cores,
blocks handing h_t over through release/acquire flags; no variable lengths), ``triton`` (per step:
cuBLAS addmm + the fused Triton cell), ``reference`` (plain PyTorch, any float dtype). The loop of the
last two is ``ops._recurrence`` over its ``GRUCell``. A size or case a backend cannot take goes to the
next one with its reason -- including a cuda grid that cannot be resident on this context's SMs (MPS,
green contexts), decided before anything is launched.

Non-finite values: the LSTM's policy (``seqgen_fast.ops.lstm``; tests/test_fuzz_recurrent.py) -- NaN
and +-inf propagate as in ``torch.nn.GRU`` / ``GRUCell`` in the same dtype, on every backend.
"""
from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .._backend import Capabilities, dispatcher
from ..kernels import gru_cuda
from ..reference import gru as ref
from . import _recurrence
from ._library import CUDNN_RNN_AUTOCAST, RNN_CELL_AUTOCAST, autocast_as, custom_op

__all__ = ["gru", "gru_cell", "gru_sequence", "gru_sequence_backward", "gru_cell_step", "SEQ", "SEQ_BWD", "CELL"]

ORDER = ("cuda", "triton", "reference")
SEQ = dispatcher("gru_sequence", ORDER)
SEQ_BWD = dispatcher("gru_sequence_backward", ORDER)
CELL = dispatcher("gru_cell_step", ORDER)

TRITON = Capabilities("triton", dtypes=(torch.float32, torch.float16, torch.bfloat16))
REFERENCE = Capabilities("reference", dtypes=(torch.float32, torch.float16, torch.bfloat16, torch.float64))


# ----------------------------------------------------------------------------------------------
# Backend implementations: the shared loop over each backend's GRU cell
# ----------------------------------------------------------------------------------------------
def _triton():
    from ..kernels import gru as tk

    return tk


def _cell(backend: str) -> _recurrence.GRUCell:
    """The loop's GRU cell on ``backend``'s pointwise functions."""
    pointwise = _triton() if backend == "triton" else ref
    return _recurrence.GRUCell(pointwise.cell_forward, pointwise.cell_backward)


def _register(backend: str, caps: Capabilities) -> None:
    """The three ops on ``backend``: the shared loop over its cell, and the generation step."""

    def sequence(xg, w_hh, b_hh, h0, batch_sizes, train):
        hs, h_n, _, _, act = _recurrence.forward(_cell(backend), xg, w_hh, b_hh, None, h0, None, batch_sizes, train)
        return hs, h_n, act

    def sequence_backward(w_hh, hs, act, h0, grad_hs, grad_h_n, batch_sizes):
        dxg, dhg, dh, dcarry, _ = _recurrence.backward(_cell(backend), w_hh, None, hs, None, act, h0, None, grad_hs,
                                                       grad_h_n, None, batch_sizes)
        return dxg, dhg, dh + dcarry  # h_{t-1} reaches h_t through the GEMM and through z * h_{t-1}

    def step(x, h, w_ih, w_hh, b_ih, b_hh):
        if backend == "triton" and x.shape[0] <= _triton().STEP_MAX_BATCH:
            return _triton().cell_step(x, h, w_ih, w_hh, b_ih, b_hh)
        h1 = torch.empty_like(h)
        _cell(backend).forward(F.linear(x, w_ih, b_ih), F.linear(h, w_hh, b_hh), h, h1, None)
        return h1

    SEQ.register(backend, caps=caps, supports=lambda xg, w_hh, b_hh, h0, batch_sizes, train:
                 caps.reasons(xg, w_hh, b_hh, h0))(sequence)
    # the backward follows the forward's backend, which already obeyed the device rule
    SEQ_BWD.register(backend, caps=caps, supports=lambda w_hh, hs, act, h0, *grads_and_sizes:
                     caps.reasons(act, w_hh, hs, h0))(sequence_backward)
    CELL.register(backend, caps=caps, supports=lambda x, h, w_ih, w_hh, b_ih, b_hh:
                  caps.reasons(x, h, w_ih, w_hh, b_ih, b_hh))(step)


_register("triton", TRITON)
_register("reference", REFERENCE)


# ----------------------------------------------------------------------------------------------
# The cuda backend: the persistent kernels and the one-launch step of kernels.gru_cuda
# ----------------------------------------------------------------------------------------------
_NO_VARLEN = "variable lengths (PackedSequence) are not in the cuda kernel"


@SEQ.register("cuda", caps=gru_cuda.CAPS, supports=lambda xg, w_hh, b_hh, h0, batch_sizes, train:
              [_NO_VARLEN] if batch_sizes is not None else gru_cuda.supports_sequence(xg, w_hh, b_hh, h0))
def _seq_cuda(xg, w_hh, b_hh, h0, batch_sizes, train):
    return gru_cuda.sequence_forward(xg, w_hh, b_hh, h0, train=train)


@SEQ_BWD.register("cuda", caps=gru_cuda.CAPS, supports=lambda w_hh, hs, act, h0, grad_hs, grad_h_n, batch_sizes:
                  [_NO_VARLEN] if batch_sizes is not None else
                  gru_cuda.supports_sequence_backward(w_hh, hs, act, h0))
def _seq_bwd_cuda(w_hh, hs, act, h0, grad_hs, grad_h_n, batch_sizes):
    # dxg and dhg come back in the layer dtype: what the blocks exchanged, and what the weight GEMM reads
    return gru_cuda.sequence_backward(w_hh, hs, act, h0, grad_hs, grad_h_n)


@CELL.register("cuda", caps=gru_cuda.CAPS, supports=lambda x, h, w_ih, w_hh, b_ih, b_hh:
               gru_cuda.supports_cell(x, h, w_ih, w_hh, b_ih, b_hh))
def _cell_cuda(x, h, w_ih, w_hh, b_ih, b_hh):
    return gru_cuda.cell_step(x, h, w_ih, w_hh, b_ih, b_hh)


# ----------------------------------------------------------------------------------------------
# Ops
# ----------------------------------------------------------------------------------------------
def _seq_fake(xg, w_hh, b_hh, h0, batch_sizes, backend, train):
    T, B, G = xg.shape
    H = G // 3
    act = xg.new_empty(T, B, 4 * H) if train else xg.new_empty(0)
    return xg.new_empty(T, B, H), h0.new_empty(B, H), act


def _seq_bwd_fake(w_hh, hs, act, h0, grad_hs, grad_h_n, batch_sizes, bias, backend):
    T, B, H = hs.shape
    return (act.new_empty(T, B, 3 * H), torch.empty_like(w_hh), w_hh.new_empty(3 * H if bias else 0),
            torch.empty_like(h0))


@custom_op("gru_sequence_backward", fake=_seq_bwd_fake)
def gru_sequence_backward(w_hh: Tensor, hs: Tensor, act: Tensor, h0: Tensor, grad_hs: Tensor, grad_h_n: Tensor,
                          batch_sizes: Optional[Tensor], bias: bool, backend: str
                          ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients of ``gru_sequence``: (dxg [T,B,3H], dw_hh, db_hh (empty without bias), dh0). The
    recurrence runs on ``backend``; dW_hh = sum_t dhg_t^T h_{t-1} and db_hh = sum_t dhg_t after it."""
    dxg, dhg, dh0 = SEQ_BWD.impl(backend)(w_hh, hs, act, h0, grad_hs.contiguous(), grad_h_n.contiguous(),
                                          batch_sizes)
    dw_hh, db_hh = _recurrence.recurrent_weight_grads(dhg, hs, h0, w_hh, bias=bias, batch_sizes=batch_sizes)
    return dxg, dw_hh, db_hh if bias else w_hh.new_empty(0), dh0.to(h0.dtype)


def _seq_setup(ctx, inputs, output):
    xg, w_hh, b_hh, h0, batch_sizes, backend, train = inputs
    hs, _, act = output
    ctx.save_for_backward(w_hh, hs, act, h0)
    ctx.batch_sizes, ctx.backend, ctx.train, ctx.bias = batch_sizes, backend, train, b_hh is not None


def _seq_backward(ctx, grad_hs, grad_h_n, _grad_act):
    if not ctx.train:
        raise RuntimeError("gru_sequence: backward needs the saved gates, but the forward ran with train=False "
                           "(call it with grad enabled on an input that requires grad)")
    w_hh, hs, act, h0 = ctx.saved_tensors
    preferred = ctx.backend
    args = (w_hh, hs, act, h0, grad_hs, grad_h_n, ctx.batch_sizes)
    backend = preferred if not SEQ_BWD.reasons(preferred, *args) else SEQ_BWD.select(*args)
    dxg, dw_hh, db_hh, dh0 = gru_sequence_backward(*args, ctx.bias, backend)
    return dxg, dw_hh, db_hh if ctx.bias else None, dh0, None, None, None


@custom_op("gru_sequence", fake=_seq_fake, backward=_seq_backward, setup_context=_seq_setup,
           autocast=CUDNN_RNN_AUTOCAST)
def gru_sequence(xg: Tensor, w_hh: Tensor, b_hh: Optional[Tensor], h0: Tensor, batch_sizes: Optional[Tensor],
                 backend: str, train: bool) -> tuple[Tensor, Tensor, Tensor]:
    """One GRU layer, one direction, forward in time over ``xg`` [T, B, 3H] (see the module doc)."""
    return tuple(SEQ.impl(backend)(xg, w_hh, b_hh, h0, batch_sizes, train))


def _cell_fake(x, h, w_ih, w_hh, b_ih, b_hh, backend):
    return torch.empty_like(h)


@custom_op("gru_cell_step", fake=_cell_fake, autocast=RNN_CELL_AUTOCAST)
def gru_cell_step(x: Tensor, h: Tensor, w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor], b_hh: Optional[Tensor],
                  backend: str) -> Tensor:
    """One inference step of a GRU cell (no autograd): h1 [B, H]."""
    return CELL.impl(backend)(x, h, w_ih, w_hh, b_ih, b_hh)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------
def _same_dtype_device(fn: str, ref_name: str, ref_t: Tensor, named: dict, place: Optional[str] = None) -> None:
    """torch's errors (RuntimeError) for tensors in ``named`` that do not share ``ref_t``'s device
    (with ``place``, the wording of torch's RNNs: "Input and <place> tensors ...") or dtype."""
    for name, t in named.items():
        if t is None:
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{fn}: {name} must be a Tensor, got {type(t).__name__}")
        if t.device != ref_t.device:
            raise RuntimeError(f"Input and {place} tensors are not at the same device, found input tensor at "
                               f"{ref_t.device} and {place} tensor at {t.device}" if place else
                               f"Expected all tensors to be on the same device, but found at least two devices, "
                               f"{ref_t.device} and {t.device}! ({fn}: {ref_name} and {name})")
        if t.dtype != ref_t.dtype:
            raise RuntimeError(f"{fn}: {name} and {ref_name} must have the same dtype, but got {t.dtype} and "
                               f"{ref_t.dtype}")


def _split_weights(weights: Sequence[Tensor], num_layers: int, directions: int, bias: bool):
    """torch's flat weight order -> per (layer, direction): (w_ih, w_hh, b_ih, b_hh)."""
    n = num_layers * directions
    per = 4 if bias else 2
    if len(weights) != n * per:
        raise ValueError(f"gru: weights has {len(weights)} tensors; expected num_layers * directions * "
                         f"{per} = {n * per} with bias={bias} (w_ih, w_hh{', b_ih, b_hh' if bias else ''} each)")
    out = []
    for k in range(n):
        w = list(weights[k * per:(k + 1) * per])
        out.append((w[0], w[1], *(w[2:] if bias else (None, None))))
    return out


def _layer_direction(x, weights, h0, batch_sizes, rev_idx, reverse):
    """One layer in one direction over x [T, B, I]: (hs [T, B, H] in input time order, h_n [B, H])."""
    w_ih, w_hh, b_ih, b_hh = weights
    xg = F.linear(x, w_ih, b_ih)
    if reverse:
        xg = _recurrence.reverse(xg, rev_idx)
    xg, h0 = xg.contiguous(), h0.contiguous()
    train = _recurrence.needs_grad(xg, w_hh, b_hh, h0)
    name = SEQ.select(xg, w_hh, b_hh, h0, batch_sizes, train=train)
    hs, h_n, _ = gru_sequence(xg, w_hh, b_hh, h0, batch_sizes, name, train)
    return (_recurrence.reverse(hs, rev_idx) if reverse else hs), h_n


@autocast_as(CUDNN_RNN_AUTOCAST)
def gru(input: Tensor, hx: Optional[Tensor], weights: Sequence[Tensor], *, num_layers: int = 1, bias: bool = True,
        batch_first: bool = False, dropout: float = 0.0, training: bool = False, bidirectional: bool = False,
        batch_sizes: Optional[Tensor] = None, backend: Optional[str] = None) -> tuple[Tensor, Tensor]:
    """Multi-layer GRU over raw weights, with the semantics of ``torch._VF.gru`` / ``torch.nn.GRU``.

    Args:
        input: [T, B, I] (or [B, T, I] with ``batch_first``); or, with ``batch_sizes``, the packed
            data [sum(batch_sizes), I] of a ``PackedSequence`` (sorted order, as ``.data``).
        hx: h0 [L*D, B, H] (D = 2 if bidirectional; for packed input, rows in sorted order), or None
            for zeros.
        weights: the flat list in ``torch.nn.GRU._flat_weights`` order: per layer, per direction
            (forward then reverse): ``w_ih`` [3H, I_l], ``w_hh`` [3H, H], then ``b_ih``, ``b_hh``
            [3H] if ``bias``.
        dropout, training: dropout with probability ``dropout`` on the output of every layer but
            the last, only when ``training`` (``ops._recurrence.inter_layer_dropout``: on the CPU the
            same draws as torch's own GRU under one seed, padded or packed; cuDNN draws its own).
        batch_sizes: int64 CPU tensor [T] of a PackedSequence (non-increasing), or None.
        backend: force "cuda", "triton" or "reference" (default: automatic).

    Returns ``(output, h_n)``: output [T, B, D*H] (``batch_first``: [B, T, D*H]; packed:
    [sum(batch_sizes), D*H]); h_n [L*D, B, H]. Gate order r, z, n;
    h_t = (1 - z) n + z h_{t-1}, n = tanh(x W_in^T + b_in + r (h_{t-1} W_hn^T + b_hn)).
    The reverse direction of a packed batch runs over each sequence reversed within its length.
    """
    fn = "gru"
    if not isinstance(input, Tensor):
        raise TypeError(f"{fn}: input must be a Tensor, got {type(input).__name__}")
    directions = 2 if bidirectional else 1
    per_ld = _split_weights(weights, num_layers, directions, bias)
    w_ih0, w_hh0 = per_ld[0][:2]
    H = w_hh0.shape[1]
    want_dim = 2 if batch_sizes is not None else 3
    if input.dim() != want_dim:
        raise RuntimeError(f"input must have {want_dim} dimensions, got {input.dim()}")
    if input.shape[-1] != w_ih0.shape[1]:
        raise RuntimeError(f"input.size(-1) must be equal to input_size. Expected {w_ih0.shape[1]}, "
                           f"got {input.shape[-1]}")
    _same_dtype_device(fn, "input", input, {f"weights[{k}]": w for k, w in enumerate(weights)}, "parameter")
    if batch_sizes is None and input.shape[1 if batch_first else 0] == 0:
        raise RuntimeError("Expected sequence length to be larger than 0 in RNN")
    x, lengths = _recurrence.padded(input, batch_sizes, batch_first)
    B = x.shape[1]
    if hx is None:
        h0 = input.new_zeros(num_layers * directions, B, H)
    else:
        h0 = hx
        _same_dtype_device(fn, "input", input, {"hx": h0}, "hidden")
        if tuple(h0.shape) != (num_layers * directions, B, H):
            raise RuntimeError(f"Expected hidden size {(num_layers * directions, B, H)}, got {list(h0.shape)}")
    rev_idx = _recurrence.reverse_index(batch_sizes, x.shape[0], B, x.device) if bidirectional else None
    with _recurrence.forcing(backend):
        x, finals = _recurrence.layers(
            x, lambda inp, k, reverse: _layer_direction(inp, per_ld[k], h0[k], batch_sizes, rev_idx, reverse),
            num_layers, directions, dropout if training else 0.0, batch_sizes)
    return _recurrence.unpadded(x, lengths, batch_first), torch.stack(finals)


def _cell_backend(x, h, w_ih, w_hh, b_ih, b_hh) -> str:
    """``CELL.select`` memoized on what the supports functions look at (device, dtype, shapes, bias;
    devices and dtypes were checked equal before): a generation loop pays the checks once. Traced,
    the plain selection (the memo would be a cache the trace guards on)."""
    if torch.compiler.is_compiling():
        return CELL.select(x, h, w_ih, w_hh, b_ih, b_hh)
    key = (x.device, x.dtype, tuple(x.shape), tuple(h.shape), tuple(w_ih.shape), b_ih is not None)
    return CELL.select_cached(key, x, h, w_ih, w_hh, b_ih, b_hh)


@autocast_as(RNN_CELL_AUTOCAST)
def gru_cell(x: Tensor, h: Optional[Tensor], w_ih: Tensor, w_hh: Tensor, b_ih: Optional[Tensor] = None,
             b_hh: Optional[Tensor] = None, *, backend: Optional[str] = None) -> Tensor:
    """One GRU cell step (``torch.nn.GRUCell``'s math, gate order r, z, n).

    ``x`` [B, I], ``h`` [B, H] (None: zeros), ``w_ih`` [3H, I], ``w_hh`` [3H, H], ``b_ih``/``b_hh``
    [3H] or None. Returns h1 [B, H]: r, z = sigmoid(x W_i{r,z}^T + b_i{r,z} + h W_h{r,z}^T + b_h{r,z}),
    n = tanh(x W_in^T + b_in + r (h W_hn^T + b_hn)), h1 = (1 - z) n + z h.

    Without autograd (``torch.no_grad`` or nothing requires grad) this is one ``gru_cell_step`` op
    (cuda: one fused launch; Triton: one fused launch for small batches; both CUDA-graph
    capturable). With autograd it is the input GEMM plus a one-step ``gru_sequence``,
    differentiable in every argument.
    """
    fn = "gru_cell"
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"{fn}: x must be a 2-D tensor [batch, input_size], got "
                         f"{f'{x.dim()}-D' if isinstance(x, Tensor) else type(x).__name__}")
    if w_hh.dim() != 2 or w_hh.shape[0] != 3 * w_hh.shape[1]:
        raise ValueError(f"{fn}: w_hh must have shape (3*hidden_size, hidden_size), got {tuple(w_hh.shape)}")
    H = w_hh.shape[1]
    if w_ih.dim() != 2 or w_ih.shape[0] != 3 * H:
        raise ValueError(f"{fn}: w_ih must have shape (3*hidden_size, input_size) = ({3 * H}, input_size), "
                         f"got {tuple(w_ih.shape)}")
    if x.shape[1] != w_ih.shape[1]:
        raise RuntimeError(f"input has inconsistent input_size: got {x.shape[1]} expected {w_ih.shape[1]}")
    if (b_ih is None) != (b_hh is None):
        raise ValueError(f"{fn}: give both b_ih and b_hh, or neither")
    _same_dtype_device(fn, "x", x, {"w_ih": w_ih, "w_hh": w_hh, "b_ih": b_ih, "b_hh": b_hh, "h": h})
    B = x.shape[0]
    if h is None:
        h = x.new_zeros(B, H)
    else:
        if h.dim() != 2:
            raise ValueError(f"{fn}: h must be a 2-D tensor [batch, hidden_size], got {h.dim()}-D")
        if h.shape[0] != B:
            raise RuntimeError(f"Input batch size {B} doesn't match hidden0 batch size {h.shape[0]}")
        if h.shape[1] != H:
            raise RuntimeError(f"hidden0 has inconsistent hidden_size: got {h.shape[1]}, expected {H}")
    for name, b in (("b_ih", b_ih), ("b_hh", b_hh)):
        if b is not None and tuple(b.shape) != (3 * H,):
            raise RuntimeError(f"{fn}: {name} must have shape {(3 * H,)}, got {tuple(b.shape)}")
    h = h.contiguous()
    with _recurrence.forcing(backend):
        if not _recurrence.needs_grad(x, h, w_ih, w_hh, b_ih, b_hh):
            x = x.contiguous()
            name = _cell_backend(x, h, w_ih, w_hh, b_ih, b_hh)
            if torch.compiler.is_compiling():
                return gru_cell_step(x, h, w_ih, w_hh, b_ih, b_hh, name)
            # Eager generation loops: the op's Python dispatch would cost more host time than the
            # fused launch; with no autograd to attach, call the implementation directly.
            return CELL.impl(name)(x, h, w_ih, w_hh, b_ih, b_hh)
        xg = F.linear(x, w_ih, b_ih).unsqueeze(0).contiguous()
        name = SEQ.select(xg, w_hh, b_hh, h, None, train=True)
        return gru_sequence(xg, w_hh, b_hh, h, None, name, True)[1]
