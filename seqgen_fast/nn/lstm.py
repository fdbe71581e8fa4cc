"""Drop-in ``torch.nn.LSTM`` and ``torch.nn.LSTMCell`` running on seqgen_fast's kernels.

Constructor, parameters (``weight_ih_l0``, ``weight_hh_l0``, ``bias_ih_l0``, ``bias_hh_l0``,
``*_reverse``, ``weight_hr_l0``, ...), state_dict keys, ``extra_repr`` and ``flatten_parameters``
are torch's own; only ``forward`` is replaced, by ``seqgen_fast.functional.lstm`` / ``lstm_cell``.
A state_dict moves freely between the two. The backend is chosen per call
(``seqgen_fast.use_backend`` or ``SEQGEN_FAST_BACKEND`` force one).

``LSTMCell`` subclasses ``torch.nn.LSTMCell``. ``LSTM`` subclasses ``torch.nn.RNNBase`` in its
"LSTM" mode, which is what ``torch.nn.LSTM`` is made of, and not ``torch.nn.LSTM`` itself:
torch.compile refuses to trace instances of ``torch.nn.RNN``/``GRU``/``LSTM`` (it graph-breaks on
them unless the global ``torch._dynamo.config.allow_rnn`` is set), while this module compiles with
``fullgraph=True``. So ``isinstance(m, torch.nn.LSTM)`` is False for it; ``swap_modules`` and
``from_torch`` convert between the two.
"""
from __future__ import annotations

import torch

from ..ops.lstm import lstm, lstm_cell
from ._recurrent import SequenceInput, share_parameters

__all__ = ["LSTM", "LSTMCell"]


class LSTM(torch.nn.RNNBase):
    """``torch.nn.LSTM`` with seqgen_fast's forward (same constructor, parameters and outputs).

    Input: [T, B, I] (``batch_first``: [B, T, I]), unbatched [T, I], or a ``PackedSequence``
    (lengths in any order; ``sorted_indices``/``unsorted_indices`` handled as torch does).
    ``hx = (h0, c0)``: [L*D, B, P] and [L*D, B, H] ([L*D, P] / [L*D, H] unbatched), or None.
    Returns ``(output, (h_n, c_n))`` exactly shaped as torch's.
    """

    def __init__(self, *args, **kwargs):
        super().__init__("LSTM", *args, **kwargs)

    def get_expected_cell_size(self, input: torch.Tensor, batch_sizes: torch.Tensor | None) -> tuple[int, int, int]:
        """(num_layers * directions, batch, hidden_size): the shape of c0 (h0's is ``get_expected_hidden_size``)."""
        batch = int(batch_sizes[0]) if batch_sizes is not None else input.size(0 if self.batch_first else 1)
        return self.num_layers * (2 if self.bidirectional else 1), batch, self.hidden_size

    def check_forward_args(self, input: torch.Tensor, hidden: tuple[torch.Tensor, torch.Tensor],
                           batch_sizes: torch.Tensor | None) -> None:
        """torch.nn.LSTM's checks of ``input`` and both states, with its messages."""
        self.check_input(input, batch_sizes)
        self.check_hidden_size(hidden[0], self.get_expected_hidden_size(input, batch_sizes),
                               "Expected hidden[0] size {}, got {}")
        self.check_hidden_size(hidden[1], self.get_expected_cell_size(input, batch_sizes),
                               "Expected hidden[1] size {}, got {}")

    def permute_hidden(self, hx, permutation: torch.Tensor | None):  # type: ignore[override]
        """Both states reordered along the batch dim by ``permutation`` (a PackedSequence's order)."""
        if permutation is None:
            return hx
        return hx[0].index_select(1, permutation), hx[1].index_select(1, permutation)

    @classmethod
    def from_torch(cls, m: torch.nn.LSTM) -> "LSTM":
        """A seqgen_fast LSTM sharing ``m``'s parameters (the same Parameter objects: no copy),
        with its configuration, device, dtype and training mode."""
        if not isinstance(m, torch.nn.LSTM):
            raise TypeError(f"LSTM.from_torch: expected a torch.nn.LSTM, got {type(m).__name__}")
        new = cls(m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first, m.dropout, m.bidirectional,
                  m.proj_size, device="meta", dtype=m.weight_ih_l0.dtype)
        share_parameters(new, m)
        new._init_flat_weights()
        return new

    def forward(self, input, hx=None):
        seq = SequenceInput.of(self, input)
        hx = seq.initial_states(self, hx, "hx and cx")
        weights = [getattr(self, name) for name in self._flat_weights_names]  # the current Parameters
        output, hidden = lstm(seq.data, hx, weights, num_layers=self.num_layers, bias=self.bias,
                              batch_first=self.batch_first, dropout=self.dropout, training=self.training,
                              bidirectional=self.bidirectional, batch_sizes=seq.batch_sizes)
        return seq.output(self, output, tuple(hidden))


class LSTMCell(torch.nn.LSTMCell):
    """``torch.nn.LSTMCell`` with seqgen_fast's forward: under ``torch.no_grad`` on a GPU one fused
    launch per step (both matrix-vector products and the cell update), CUDA-graph capturable.

    Input [B, I] or unbatched [I]; ``hx = (h, c)`` [B, H] each ([H] unbatched) or None.
    Returns ``(h1, c1)``.
    """

    @classmethod
    def from_torch(cls, m: torch.nn.LSTMCell) -> "LSTMCell":
        """A seqgen_fast LSTMCell sharing ``m``'s parameters (no copy), device, dtype and mode."""
        if not isinstance(m, torch.nn.LSTMCell):
            raise TypeError(f"LSTMCell.from_torch: expected a torch.nn.LSTMCell, got {type(m).__name__}")
        new = cls(m.input_size, m.hidden_size, m.bias, device="meta", dtype=m.weight_ih.dtype)
        share_parameters(new, m)
        return new

    def forward(self, input, hx=None):
        if input.dim() not in (1, 2):
            raise ValueError(f"LSTMCell: Expected input to be 1D or 2D, got {input.dim()}D instead")
        if hx is not None:
            for idx, value in enumerate(hx):
                if value.dim() not in (1, 2):
                    raise ValueError(f"LSTMCell: Expected hx[{idx}] to be 1D or 2D, got {value.dim()}D instead")
        is_batched = input.dim() == 2
        if not is_batched:
            input = input.unsqueeze(0)
            if hx is not None:
                hx = (hx[0].unsqueeze(0), hx[1].unsqueeze(0))
        h1, c1 = lstm_cell(input, hx, self.weight_ih, self.weight_hh, self.bias_ih, self.bias_hh)
        if not is_batched:
            return h1.squeeze(0), c1.squeeze(0)
        return h1, c1
