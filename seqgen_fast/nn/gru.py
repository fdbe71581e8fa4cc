"""Drop-in ``torch.nn.GRU`` and ``torch.nn.GRUCell`` running on seqgen_fast's kernels.

Constructor, parameters (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``,
``*_reverse``, ...), state_dict keys, ``extra_repr`` and ``flatten_parameters`` are torch's own;
only ``forward`` is replaced, by ``seqgen_fast.functional.gru`` / ``gru_cell``. A state_dict moves
freely between the two. The backend is chosen per call (``seqgen_fast.use_backend`` or
``SEQGEN_FAST_BACKEND`` force one).

``GRUCell`` subclasses ``torch.nn.GRUCell``. ``GRU`` subclasses ``torch.nn.RNNBase`` in its "GRU"
mode, which is all ``torch.nn.GRU`` is, as ``seqgen_fast.nn.LSTM`` does for the LSTM: torch.compile
refuses to trace instances of ``torch.nn.RNN``/``GRU``/``LSTM`` (unless the global
``torch._dynamo.config.allow_rnn`` is set), while this module compiles with ``fullgraph=True``. So
``isinstance(m, torch.nn.GRU)`` is False for it; ``swap_modules`` and ``from_torch`` convert.
"""
from __future__ import annotations

import torch

from ..ops.gru import gru, gru_cell
from ._recurrent import SequenceInput, share_parameters

__all__ = ["GRU", "GRUCell"]


class GRU(torch.nn.RNNBase):
    """``torch.nn.GRU`` with seqgen_fast's forward (same constructor, parameters and outputs).

    Input: [T, B, I] (``batch_first``: [B, T, I]), unbatched [T, I], or a ``PackedSequence``
    (lengths in any order; ``sorted_indices``/``unsorted_indices`` handled as torch does).
    ``hx``: h0 [L*D, B, H] ([L*D, H] unbatched), or None. Returns ``(output, h_n)`` exactly shaped
    as torch's. Input checks are torch's own (``check_forward_args``), with its messages.
    """

    def __init__(self, *args, **kwargs):
        if "proj_size" in kwargs:
            raise ValueError("proj_size argument is only supported for LSTM, not RNN or GRU")
        super().__init__("GRU", *args, **kwargs)

    @classmethod
    def from_torch(cls, m: torch.nn.GRU) -> "GRU":
        """A seqgen_fast GRU sharing ``m``'s parameters (the same Parameter objects: no copy), with
        its configuration, device, dtype and training mode."""
        if not isinstance(m, torch.nn.GRU):
            raise TypeError(f"GRU.from_torch: expected a torch.nn.GRU, got {type(m).__name__}")
        new = cls(m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first, m.dropout, m.bidirectional,
                  device="meta", dtype=m.weight_ih_l0.dtype)
        share_parameters(new, m)
        new._init_flat_weights()
        return new

    def forward(self, input, hx=None):
        seq = SequenceInput.of(self, input)
        hx = seq.initial_states(self, hx, "hx")
        weights = [getattr(self, name) for name in self._flat_weights_names]  # the current Parameters
        output, h_n = gru(seq.data, hx, weights, num_layers=self.num_layers, bias=self.bias,
                          batch_first=self.batch_first, dropout=self.dropout, training=self.training,
                          bidirectional=self.bidirectional, batch_sizes=seq.batch_sizes)
        return seq.output(self, output, (h_n,))


class GRUCell(torch.nn.GRUCell):
    """``torch.nn.GRUCell`` with seqgen_fast's forward: under ``torch.no_grad`` on a GPU one fused
    launch per step for small batches (both matrix-vector products and the cell update),
    CUDA-graph capturable.

    Input [B, I] or unbatched [I]; ``hx`` [B, H] ([H] unbatched) or None. Returns h1.
    """

    @classmethod
    def from_torch(cls, m: torch.nn.GRUCell) -> "GRUCell":
        """A seqgen_fast GRUCell sharing ``m``'s parameters (no copy), device, dtype and mode."""
        if not isinstance(m, torch.nn.GRUCell):
            raise TypeError(f"GRUCell.from_torch: expected a torch.nn.GRUCell, got {type(m).__name__}")
        new = cls(m.input_size, m.hidden_size, m.bias, device="meta", dtype=m.weight_ih.dtype)
        share_parameters(new, m)
        return new

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None and hx.dim() not in (1, 2):
            raise ValueError(f"GRUCell: Expected hidden to be 1D or 2D, got {hx.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
            hx = hx.unsqueeze(0) if hx is not None else None
        h1 = gru_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        return h1 if is_batched else h1.squeeze(0)
