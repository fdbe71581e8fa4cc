"""Helpers for tests: relative error norms against float64 references, output poisoning."""
import torch

from seqgen_fast.checks import DEFAULT_TOL as TOL  # relative-norm tolerances per dtype, with their reasons
from seqgen_fast.checks import rel_err

__all__ = ["rel_err", "assert_close_rel", "poison", "TOL"]


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """Fail unless ``||ours - ref|| / ||ref|| <= tol`` (NaN/Inf must sit where the reference's do)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(ours, ref)
    assert err == err and err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floating) so an element the kernel fails to write is caught."""
    return t.fill_(float("nan"))


def raised(call) -> BaseException:
    """The exception ``call()`` raises (for tables of error messages); AssertionError if none."""
    try:
        call()
    except Exception as e:  # noqa: BLE001 - whatever the call raises is the answer
        return e
    raise AssertionError("the call raised nothing")
