"""What the drop-in recurrent modules (``nn.LSTM``, ``nn.GRU``) share around their functional call.

torch's RNN modules take a ``[T, B, I]`` tensor (``batch_first``: ``[B, T, I]``), an unbatched
``[T, I]`` one, or a ``PackedSequence``; :class:`SequenceInput` turns each into the batched tensor
the functional ops take (plus the packing facts), and back again for the outputs. States
(``h``, or LSTM's ``(h, c)``) are tuples here, whatever the module's own convention.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.nn.utils.rnn import PackedSequence


def share_parameters(new: torch.nn.Module, old: torch.nn.Module) -> None:
    """Make ``new`` hold ``old``'s Parameter objects (shared storage, optimizers keep working)."""
    for name, param in old.named_parameters(recurse=False):
        setattr(new, name, param)
    new.train(old.training)


@dataclass
class SequenceInput:
    """One forward's input of an RNNBase module, batched: ``data`` [T, B, I] / [B, T, I] (or the
    packed rows), with ``batch_sizes``/``sorted_indices``/``unsorted_indices`` of a PackedSequence
    (None otherwise) and whether the caller's tensor was batched."""

    data: torch.Tensor
    packed: bool
    is_batched: bool
    batch_dim: int
    batch_sizes: torch.Tensor | None = None
    sorted_indices: torch.Tensor | None = None
    unsorted_indices: torch.Tensor | None = None

    @classmethod
    def of(cls, module: torch.nn.RNNBase, input) -> "SequenceInput":
        """``input`` of ``module``'s forward, with torch's dimension and device checks and messages."""
        batch_dim = 0 if module.batch_first else 1
        if isinstance(input, PackedSequence):
            data, batch_sizes, sorted_indices, unsorted_indices = input
            seq = cls(data, True, True, batch_dim, batch_sizes, sorted_indices, unsorted_indices)
        else:
            if input.dim() not in (2, 3):
                raise ValueError(f"{module.mode}: Expected input to be 2D or 3D, got {input.dim()}D instead")
            is_batched = input.dim() == 3
            seq = cls(input if is_batched else input.unsqueeze(batch_dim), False, is_batched, batch_dim)
        if seq.data.device != module.weight_ih_l0.device:
            raise RuntimeError(f"Input and parameter tensors are not at the same device, found input tensor at "
                               f"{seq.data.device} and parameter tensor at {module.weight_ih_l0.device}")
        return seq

    def initial_states(self, module: torch.nn.RNNBase, hx, names: str):
        """The caller's ``hx`` (None, a tensor, or LSTM's pair) checked as torch's module checks it
        (with its messages; ``names`` as torch's dimension message calls them), batched, and put in
        a PackedSequence's sorted order."""
        if hx is None:
            module.check_input(self.data, self.batch_sizes)
            return None
        states = self.batched_states(tuple(hx) if isinstance(hx, (tuple, list)) else (hx,), names)
        hx = states if len(states) > 1 else states[0]
        module.check_forward_args(self.data, hx, self.batch_sizes)
        return module.permute_hidden(hx, self.sorted_indices)

    def batched_states(self, states: tuple[torch.Tensor, ...], names: str) -> tuple[torch.Tensor, ...]:
        """The caller's states with the batch dim the input implies: each must be 3-D for batched
        input and 2-D for unbatched (torch's RuntimeError, naming ``names``, otherwise)."""
        want = 3 if self.is_batched else 2
        if any(s.dim() != want for s in states):
            dims = ", ".join(f"{s.dim()}-D" for s in states)
            got = f"({dims}) tensors" if len(states) > 1 else f"{dims} tensor"
            raise RuntimeError(f"For {'batched 3-D' if self.is_batched else 'unbatched 2-D'} input, {names} "
                               f"should also be {want}-D but got {got}")
        return states if self.is_batched else tuple(s.unsqueeze(1) for s in states)

    def output(self, module: torch.nn.RNNBase, output: torch.Tensor, states: tuple[torch.Tensor, ...]):
        """``(output, states)`` shaped as the caller's input: re-packed (states in the caller's
        order) or squeezed back to unbatched."""
        if self.packed:
            return (PackedSequence(output, self.batch_sizes, self.sorted_indices, self.unsorted_indices),
                    module.permute_hidden(states if len(states) > 1 else states[0], self.unsorted_indices))
        if not self.is_batched:
            output = output.squeeze(self.batch_dim)
            states = tuple(s.squeeze(1) for s in states)
        return output, states if len(states) > 1 else states[0]
