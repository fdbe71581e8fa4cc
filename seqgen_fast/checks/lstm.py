"""``seqgen-fast check`` cases of the LSTM family: the modules on fresh weights and inputs, against
the project's reference backend in float64 (outputs, final states and gradients)."""
from __future__ import annotations

import torch

from .._backend import use_backend
from ..nn.lstm import LSTM, LSTMCell
from . import register_check

# Half types: rounding of h and c compounds over the recurrence (and its backward), so the bar is
# a few units of the dtype's roundoff times the sequence length, not one.
_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _twin(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 CPU copy of ``module`` (same weights): the reference side."""
    ref = type(module)(*_args(module), dtype=torch.float64)
    ref.load_state_dict({k: v.detach().double().cpu() for k, v in module.state_dict().items()})
    return ref


def _args(m) -> tuple:
    if isinstance(m, LSTM):
        return m.input_size, m.hidden_size, m.num_layers, m.bias, m.batch_first, m.dropout, m.bidirectional
    return m.input_size, m.hidden_size, m.bias


@register_check("lstm", tol=_TOL)
def _check_lstm(device, dtype):
    ours = LSTM(10, 33, num_layers=2, bidirectional=True, device=device, dtype=dtype)
    ref = _twin(ours)
    x = torch.randn(7, 3, 10, device=device, dtype=dtype, requires_grad=True)
    x64 = x.detach().double().cpu().requires_grad_()
    out, (h_n, c_n) = ours(x)
    with use_backend("reference"):
        out64, (h64, c64) = ref(x64)
    g = torch.randn_like(out64)
    (out * g.to(device, dtype)).sum().backward()
    (out64 * g).sum().backward()
    return {"output": (out, out64), "h_n": (h_n, h64), "c_n": (c_n, c64), "grad_input": (x.grad, x64.grad),
            "grad_w_hh_l0": (ours.weight_hh_l0.grad, ref.weight_hh_l0.grad),
            "grad_w_ih_l1": (ours.weight_ih_l1.grad, ref.weight_ih_l1.grad)}


@register_check("lstm_cell", tol=_TOL)
def _check_lstm_cell(device, dtype):
    ours = LSTMCell(10, 33, device=device, dtype=dtype)
    ref = _twin(ours)
    x, h, c = (torch.randn(4, n, device=device, dtype=dtype) for n in (10, 33, 33))
    with torch.no_grad():
        h1, c1 = ours(x, (h, c))
        with use_backend("reference"):
            h64, c64 = ref(x.double().cpu(), (h.double().cpu(), c.double().cpu()))
    return {"h1": (h1, h64), "c1": (c1, c64)}
