"""``seqgen-fast check`` cases of the GRU family: the modules on fresh weights and inputs, against
the project's reference backend in float64 (outputs, final states and gradients)."""
from __future__ import annotations

import copy

import torch

from .._backend import use_backend
from ..nn.gru import GRU, GRUCell
from . import register_check

# Half types: rounding of h compounds over the recurrence (and its backward), so the bar is a few
# units of the dtype's roundoff times the sequence length, not one (as for the LSTM).
_TOL = {torch.float16: 1e-2, torch.bfloat16: 6e-2}


def _twin(module: torch.nn.Module) -> torch.nn.Module:
    """A float64 CPU copy of ``module`` (same weights, own Parameters): the reference side."""
    return copy.deepcopy(module).to("cpu", torch.float64)


@register_check("gru", tol=_TOL)
def _check_gru(device, dtype):
    ours = GRU(10, 33, num_layers=2, bidirectional=True, device=device, dtype=dtype)
    ref = _twin(ours)
    x = torch.randn(7, 3, 10, device=device, dtype=dtype, requires_grad=True)
    h0 = torch.randn(4, 3, 33, device=device, dtype=dtype, requires_grad=True)
    x64, h64_0 = (t.detach().double().cpu().requires_grad_() for t in (x, h0))
    out, h_n = ours(x, h0)
    with use_backend("reference"):
        out64, h64 = ref(x64, h64_0)
    g = torch.randn_like(out64)
    (out * g.to(device, dtype)).sum().backward()
    (out64 * g).sum().backward()
    return {"output": (out, out64), "h_n": (h_n, h64), "grad_input": (x.grad, x64.grad), "grad_h0": (h0.grad, h64_0.grad),
            "grad_w_hh_l0": (ours.weight_hh_l0.grad, ref.weight_hh_l0.grad),
            "grad_b_hh_rev": (ours.bias_hh_l0_reverse.grad, ref.bias_hh_l0_reverse.grad),
            "grad_w_ih_l1": (ours.weight_ih_l1.grad, ref.weight_ih_l1.grad)}


@register_check("gru_cell", tol=_TOL)
def _check_gru_cell(device, dtype):
    ours = GRUCell(10, 33, device=device, dtype=dtype)
    ref = _twin(ours)
    x, h = (torch.randn(4, n, device=device, dtype=dtype) for n in (10, 33))
    with torch.no_grad():
        h1 = ours(x, h)
        with use_backend("reference"):
            h64 = ref(x.double().cpu(), h.double().cpu())
    return {"h1": (h1, h64)}
