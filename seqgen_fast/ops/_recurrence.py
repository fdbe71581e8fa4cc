"""The backend-neutral loop over a recurrent cell: what the non-persistent LSTM and GRU paths run.

One layer, one direction, forward in time (:func:`forward`) and its backward in reverse time
(:func:`backward`). Each step is one GEMM with W_hh (``addmm``, cuBLAS on a GPU) plus the pointwise
cell; everything else (bookkeeping, variable lengths, projections, the gradient carried between
steps) is shared. Weight gradients are GEMMs after the loop (:func:`recurrent_weight_grads`).

A cell is an object saying how its pointwise math sits in the loop (:class:`LSTMCell`,
:class:`GRUCell`), built from one backend's pointwise functions: the reference backend passes
``seqgen_fast.reference.<cell>``'s, the Triton backend its fused kernels of the same signatures.

* ``gates``: gate blocks of H rows in xg [T, B, gates*H] and W_hh [gates*H, P].
* ``saved``: the saved activations per step are [T, B, saved*H] (the cell's saved format).
* ``has_c``: it carries a cell state c [B, H] besides h (the LSTM).
* ``shared_grad``: dL/d(h W_hh^T) equals dL/dxg (the LSTM: one buffer), else the GRU's
  ``r * (W_hn h + b_hn)`` makes them differ in the n block.
* ``step(xg_t, h_prev, w_hh_t, b_hh, c_prev, m_out, c_out, act_out)``: one forward step: the GEMM
  with ``w_hh_t`` = W_hh^T, then the pointwise cell writing ``m_out`` (h_t, or m_t before a
  projection), ``c_out`` and, when training, ``act_out``.
* ``step_backward(dm, dcarry, act, h_prev, c_prev, c, dxg_out, dhg_out)``: the pointwise backward.
  ``dm`` = dL/dm_t through the W_hh GEMM of step t+1 and the outputs; ``dcarry`` (float32 for half
  types) is the gradient the cell carries from step t+1 without that GEMM (the LSTM's dc, the GRU's
  ``z * h`` term), updated in place for step t-1.

Variable lengths (PackedSequence): ``batch_sizes`` (int64 CPU tensor [T], non-increasing, as in a
PackedSequence) says that at step t only the first ``batch_sizes[t]`` rows are active: the states of
the other rows are held, and their outputs ``hs[t]`` are zero. ``h_n``/``c_n`` of a row are its
states after its last active step.

:func:`recurrence_forward`, :func:`recurrence_backward` and :func:`weight_grads` are the LSTM's
entry points (``seqgen_fast.ops.lstm``); the GRU's ops call :func:`forward` and :func:`backward`.
"""
from __future__ import annotations

import contextlib
from typing import Callable, Optional

import torch

from .._backend import use_backend
from ..reference.lstm import compute_dtype

Pointwise = Callable[..., None]


class Cell:
    """A kind of cell in the loop, on one backend's pointwise ``forward``/``backward`` pair (either
    may be omitted by a caller that runs one direction only); the members are in the module doc."""

    gates: int
    saved: int
    has_c: bool
    shared_grad: bool

    def __init__(self, forward: Pointwise | None = None, backward: Pointwise | None = None):
        self.forward, self.backward = forward, backward


class LSTMCell(Cell):
    """The LSTM in the loop (``seqgen_fast.reference.lstm``): b_ih + b_hh are folded into xg, so the
    step's GEMM adds h_{t-1} W_hh^T onto xg_t and the pointwise cell reads the sum; it carries c;
    saved: the activated gates i, f, g, o."""

    gates, saved, has_c, shared_grad = 4, 4, True, True

    def step(self, xg_t, h_prev, w_hh_t, b_hh, c_prev, m_out, c_out, act_out):
        self.forward(torch.addmm(xg_t, h_prev, w_hh_t), c_prev, m_out, c_out, act_out)

    def step_backward(self, dm, dcarry, act, h_prev, c_prev, c, dxg_out, dhg_out):
        self.backward(dm, dcarry, act, c_prev, c, dxg_out)


class GRUCell(Cell):
    """The GRU in the loop (``seqgen_fast.reference.gru``): xg = x W_ih^T + b_ih, and the step's
    GEMM gives hg = h_{t-1} W_hh^T + b_hh apart from it (the n gate scales hg^n by r); no c; the
    state the cell carries is h itself; saved: r, z, n and hg^n."""

    gates, saved, has_c, shared_grad = 3, 4, False, False

    def step(self, xg_t, h_prev, w_hh_t, b_hh, c_prev, m_out, c_out, act_out):
        hg = torch.addmm(b_hh, h_prev, w_hh_t) if b_hh is not None else torch.mm(h_prev, w_hh_t)
        self.forward(xg_t, hg, h_prev, m_out, act_out)

    def step_backward(self, dm, dcarry, act, h_prev, c_prev, c, dxg_out, dhg_out):
        self.backward(dm, dcarry, act, h_prev, dxg_out, dhg_out)


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


def forward(cell: Cell, xg: torch.Tensor, w_hh: torch.Tensor, b_hh: torch.Tensor | None, w_hr: torch.Tensor | None,
            h0: torch.Tensor, c0: torch.Tensor | None, batch_sizes: torch.Tensor | None, train: bool):
    """One layer, one direction, forward in time over xg [T, B, gates*H].

    ``b_hh`` [gates*H] is added by the step's GEMM (GRU; None where it is folded into xg), ``w_hr``
    [P, H] is a projection h_t = m_t W_hr^T (LSTM; else None), h0 [B, P], c0 [B, H] for cells with
    a cell state (else None). Returns ``(hs, h_n, c_n, cs, act)``: hs [T, B, P]; h_n [B, P]; c_n
    [B, H] (None without a cell state); when ``train`` cs [T, B, H] (cells with a cell state) and
    act [T, B, saved*H] in the cell's saved format, else empty tensors.
    """
    T, B, G = xg.shape
    H = G // cell.gates
    P = w_hh.shape[1]
    rows = active_rows(batch_sizes, T, B)
    # Inactive rows are never written: zero them so every output is defined.
    alloc = torch.zeros if batch_sizes is not None else torch.empty
    hs = alloc(T, B, P, dtype=xg.dtype, device=xg.device)
    keep_c = train and cell.has_c
    cs = alloc(T, B, H, dtype=xg.dtype, device=xg.device) if keep_c else xg.new_empty(0)
    act = alloc(T, B, cell.saved * H, dtype=xg.dtype, device=xg.device) if train else xg.new_empty(0)
    c_state = c0.clone() if cell.has_c and not keep_c else None  # running cell state when cs is not kept
    m = xg.new_empty(B, H) if w_hr is not None else None
    w_hh_t = w_hh.t()
    for t, n in enumerate(rows):
        h_prev = hs[t - 1, :n] if t else h0[:n]
        if keep_c:
            c_prev, c_out = (cs[t - 1, :n] if t else c0[:n]), cs[t, :n]
        else:
            c_prev = c_out = c_state[:n] if c_state is not None else None
        m_out = m[:n] if m is not None else hs[t, :n]
        cell.step(xg[t, :n], h_prev, w_hh_t, b_hh, c_prev, m_out, c_out, act[t, :n] if train else None)
        if w_hr is not None:
            torch.mm(m_out, w_hr.t(), out=hs[t, :n])
    h_n = last_states(hs, batch_sizes)
    c_n = (last_states(cs, batch_sizes) if keep_c else c_state) if cell.has_c else None
    return hs, h_n, c_n, cs, act


def backward(cell: Cell, w_hh: torch.Tensor, w_hr: torch.Tensor | None, hs: torch.Tensor, cs: torch.Tensor | None,
             act: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor | None, grad_hs: torch.Tensor,
             grad_h_n: torch.Tensor, grad_carry: torch.Tensor | None, batch_sizes: torch.Tensor | None):
    """Backward of :func:`forward` in reverse time, on its saved ``hs``, ``cs`` and ``act``.

    ``grad_carry`` is the gradient of the carried state at the end (the LSTM's grad of c_n; None:
    zeros). Returns ``(dxg, dhg, dh, dcarry, dH)``: dxg [T, B, gates*H] = dL/dxg and dhg = dL/d(h
    W_hh^T + b_hh) (the same tensor when ``cell.shared_grad``), both zero on inactive rows and in the
    layer dtype; dh [B, P] (layer dtype) and dcarry [B, H] (compute dtype) = the two parts of the
    gradient at step 0 (the LSTM's dh0 and dc0; the GRU's dh0 is their sum); dH [T, B, P] = the total
    dL/dh_t (only with ``w_hr``, for dW_hr; else None). Held (inactive) rows pass their gradients
    through unchanged.
    """
    T, B, _ = act.shape
    G = w_hh.shape[0]
    rows = active_rows(batch_sizes, T, B)
    dtype = act.dtype
    dxg = torch.zeros(T, B, G, dtype=dtype, device=act.device)
    dhg = dxg if cell.shared_grad else torch.zeros_like(dxg)
    dH = torch.zeros(T, B, hs.shape[2], dtype=dtype, device=act.device) if w_hr is not None else None
    dh = grad_h_n.to(dtype).clone()
    H = G // cell.gates
    cd = compute_dtype(dtype)
    dcarry = (grad_carry.to(cd).clone() if grad_carry is not None
              else torch.zeros(B, H, dtype=cd, device=act.device))
    for t in range(T - 1, -1, -1):
        n = rows[t]
        dh_t = dh[:n] + grad_hs[t, :n]
        if w_hr is not None:
            dH[t, :n] = dh_t
            dm = dh_t @ w_hr
        else:
            dm = dh_t
        h_prev = hs[t - 1, :n] if t else h0[:n]
        c_prev = (cs[t - 1, :n] if t else c0[:n]) if cell.has_c else None
        c_t = cs[t, :n] if cell.has_c else None
        cell.step_backward(dm, dcarry[:n], act[t, :n], h_prev, c_prev, c_t, dxg[t, :n], dhg[t, :n])
        torch.mm(dhg[t, :n], w_hh, out=dh[:n])
    return dxg, dhg, dh, dcarry, dH


def recurrent_weight_grads(dhg: torch.Tensor, hs: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor,
                           bias: bool = False, batch_sizes: torch.Tensor | None = None):
    """dW_hh = sum_t dhg_t^T h_{t-1}, one GEMM over all T*B rows, and with ``bias`` db_hh =
    sum_t dhg_t. Returns ``(dW_hh, db_hh or None)``. With ``batch_sizes`` the held (inactive) rows
    are left out, as torch's packed RNNs never multiply them: dhg is 0 there, but the h_{t-1} a
    row holds after its last step may be NaN or inf (0 * inf would be NaN in dW_hh)."""
    T, B, G = dhg.shape
    h_prev = torch.cat([h0.unsqueeze(0), hs[:-1]], 0).reshape(T * B, h0.shape[-1])  # B may be 0
    if batch_sizes is not None:
        held = (torch.arange(B) >= batch_sizes.view(-1, 1)).view(T * B, 1).to(h_prev.device)
        h_prev = h_prev.masked_fill(held, 0)
    dhg2 = dhg.reshape(T * B, G).to(w_hh.dtype)
    return dhg2.t() @ h_prev.to(w_hh.dtype), dhg2.sum(0) if bias else None


# ----------------------------------------------------------------------------------------------
# Around the loop: padding, reversed directions, stacked layers (cell-neutral)
# ----------------------------------------------------------------------------------------------
def padded(input: torch.Tensor, batch_sizes: torch.Tensor | None, batch_first: bool):
    """Time-major [T, B, I] view of ``input`` and the lengths to repack it with: a PackedSequence's
    data (``batch_sizes`` given) padded in its sorted order, else ``input`` ([B, T, I] when
    ``batch_first``). Returns ``(x, lengths or None)``."""
    if batch_sizes is None:
        return (input.transpose(0, 1) if batch_first else input), None
    from torch.nn.utils.rnn import PackedSequence, pad_packed_sequence

    return pad_packed_sequence(PackedSequence(input, batch_sizes))


def unpadded(x: torch.Tensor, lengths: torch.Tensor | None, batch_first: bool) -> torch.Tensor:
    """The inverse of :func:`padded` for an output x [T, B, *]."""
    if lengths is None:
        return x.transpose(0, 1) if batch_first else x
    from torch.nn.utils.rnn import pack_padded_sequence

    return pack_padded_sequence(x, lengths).data


def reverse_index(batch_sizes: torch.Tensor | None, T: int, B: int, device) -> torch.Tensor | None:
    """[T, B] time index reversing each row within its length (identity past it); None for equal
    lengths (a plain flip)."""
    if batch_sizes is None:
        return None
    lengths = (batch_sizes.view(-1, 1) > torch.arange(B).view(1, -1)).sum(0)
    t = torch.arange(T).view(-1, 1)
    return torch.where(t < lengths.view(1, -1), lengths.view(1, -1) - 1 - t, t).to(device)


def reverse(x: torch.Tensor, rev_idx: torch.Tensor | None) -> torch.Tensor:
    """x [T, B, *] reversed in time (within each row's length, with :func:`reverse_index`'s index)."""
    if rev_idx is None:
        return x.flip(0)
    return x.gather(0, rev_idx.unsqueeze(-1).expand_as(x))


def layers(x: torch.Tensor, run: Callable, num_layers: int, directions: int, dropout: float,
           batch_sizes: torch.Tensor | None):
    """Stacked layers over x [T, B, I]: ``run(x, k, reverse) -> (hs [T, B, *], final)`` runs layer
    and direction k = layer * directions + d (d = 1 reversed in time); both directions' hs are
    concatenated along the last dim, and :func:`inter_layer_dropout` with probability ``dropout``
    (0: none) applies to the output of every layer but the last. Returns ``(output [T, B, *], [final
    of each k])``."""
    finals = []
    for layer in range(num_layers):
        outs = []
        for d in range(directions):
            hs, final = run(x, layer * directions + d, d == 1)
            outs.append(hs)
            finals.append(final)
        x = torch.cat(outs, -1) if directions == 2 else outs[0]
        if dropout != 0 and layer < num_layers - 1:
            x = inter_layer_dropout(x, dropout, batch_sizes)
    return x, finals


def inter_layer_dropout(x: torch.Tensor, p: float, batch_sizes: torch.Tensor | None) -> torch.Tensor:
    """Dropout with probability ``p`` of a layer's padded output x [T, B, F], as torch's RNNs apply it
    between layers in training (aten's RNN.cpp: ``dropout`` of the layer output): over the packed rows
    of a PackedSequence (``batch_sizes``; the padding is left as it is, no layer reads it) and over all
    of x otherwise, so the draws are torch's own under one seed on the CPU (cuDNN draws its own,
    with the same distribution). Kept entries are scaled by 1 / (1 - p); p = 1 zeroes all.
    RuntimeError with torch's message for ``p`` outside [0, 1] (NaN included)."""
    p = float(p)
    if not 0.0 <= p <= 1.0:
        raise RuntimeError(f"dropout probability has to be between 0 and 1, but got {p}")
    if batch_sizes is None:
        return torch.nn.functional.dropout(x, p, training=True)
    T, B = x.shape[:2]
    rows = (torch.arange(B) < batch_sizes.view(-1, 1)).view(-1).nonzero().squeeze(1).to(x.device)  # t * B + b
    flat = x.reshape(T * B, -1)
    dropped = torch.nn.functional.dropout(flat.index_select(0, rows), p, training=True)
    return flat.index_copy(0, rows, dropped).view(x.shape)


# ----------------------------------------------------------------------------------------------
# The LSTM's entry points (seqgen_fast.ops.lstm), over LSTMCell
# ----------------------------------------------------------------------------------------------
def recurrence_forward(xg: torch.Tensor, w_hh: torch.Tensor, w_hr: torch.Tensor | None, h0: torch.Tensor,
                       c0: torch.Tensor, batch_sizes: torch.Tensor | None, train: bool, cell: Pointwise):
    """One LSTM layer, one direction, with the pointwise ``cell`` (signature of
    ``seqgen_fast.reference.lstm.cell_forward``). Returns ``(hs, h_n, c_n, cs, gates)``: hs [T, B,
    P]; h_n [B, P]; c_n [B, H]; when ``train`` cs [T, B, H] and gates [T, B, 4H] in the saved format
    of ``seqgen_fast.reference.lstm``, else empty tensors."""
    return forward(LSTMCell(forward=cell), xg, w_hh, None, w_hr, h0, c0, batch_sizes, train)


def recurrence_backward(w_hh: torch.Tensor, w_hr: torch.Tensor | None, hs: torch.Tensor, cs: torch.Tensor,
                        gates: torch.Tensor, h0: torch.Tensor, c0: torch.Tensor, grad_hs: torch.Tensor,
                        grad_h_n: torch.Tensor, grad_c_n: torch.Tensor, batch_sizes: torch.Tensor | None,
                        cell: Pointwise):
    """Backward of :func:`recurrence_forward` with the pointwise ``cell`` (signature of
    ``seqgen_fast.reference.lstm.cell_backward``). Returns ``(dG, dh0, dc0, dH)``: dG [T, B, 4H] =
    dL/dxg, dh0 [B, P], dc0 [B, H], dH (with ``w_hr``, else None); see :func:`backward`."""
    dG, _, dh, dc, dH = backward(LSTMCell(backward=cell), w_hh, w_hr, hs, cs, gates, h0, c0, grad_hs, grad_h_n,
                                 grad_c_n, batch_sizes)
    return dG, dh, dc.to(c0.dtype), dH


def weight_grads(dG: torch.Tensor, dH: torch.Tensor | None, hs: torch.Tensor, cs: torch.Tensor,
                 gates: torch.Tensor, h0: torch.Tensor, w_hh: torch.Tensor, w_hr: torch.Tensor | None,
                 batch_sizes: torch.Tensor | None = None):
    """The LSTM's dW_hh (:func:`recurrent_weight_grads`, held rows of ``batch_sizes`` left out) and,
    with a projection, dW_hr = sum_t dH_t^T m_t where m_t = o_t * tanh(c_t): one GEMM over all T*B
    rows (held rows' gates and cell states are zero). Returns ``(dW_hh, dW_hr or None)``."""
    dw_hh, _ = recurrent_weight_grads(dG, hs, h0, w_hh, batch_sizes=batch_sizes)
    if w_hr is None:
        return dw_hh, None
    T, B, G = dG.shape
    H = G // 4
    m = gates[..., 3 * H:] * torch.tanh(cs)
    dw_hr = dH.reshape(T * B, dH.shape[-1]).t().to(w_hr.dtype) @ m.reshape(T * B, H).to(w_hr.dtype)
    return dw_hh, dw_hr


def forcing(backend: Optional[str]):
    """``backend`` forced for a whole public call (the dispatch of every layer and step) when given."""
    return use_backend(backend) if backend is not None else contextlib.nullcontext()


def needs_grad(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd will record a call on ``tensors`` (None entries are absent arguments)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
