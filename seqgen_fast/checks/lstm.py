"""``seqgen-fast check`` cases of the LSTM family: the modules on fresh weights and inputs, against
the project's reference backend in float64 (outputs, final states and gradients)."""
from __future__ import annotations

import torch

from .._backend import use_backend
from ..nn.lstm import LSTM, LSTMCell
from . import register_check

# Half types: rounding of h and c compounds over the recurrence (and its backward), so the bar is
# a few units of the dtype's roundoff times the sequence length, not one. float32: the cuda backend's
# recurrent product runs on TF32 tensor cores under torch.backends.cudnn.allow_tf32 (torch's default,
# as cuDNN's), 10-bit mantissas compounding the same way.
_TOL = {torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}


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
    """Batches of 4 and 9: on the cuda backend, the FFMA step kernel and the tensor-core one (from 8 rows)."""
    ours = LSTMCell(10, 33, device=device, dtype=dtype)
    ref = _twin(ours)
    results = {}
    for batch in (4, 9):
        x, h, c = (torch.randn(batch, n, device=device, dtype=dtype) for n in (10, 33, 33))
        with torch.no_grad():
            h1, c1 = ours(x, (h, c))
            with use_backend("reference"):
                h64, c64 = ref(x.double().cpu(), (h.double().cpu(), c.double().cpu()))
        results.update({f"h1 B{batch}": (h1, h64), f"c1 B{batch}": (c1, c64)})
    return results
