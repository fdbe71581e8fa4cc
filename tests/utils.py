"""Helpers for tests: relative error norms against float64 references, output poisoning."""
import torch

from seqgen_fast._checks import rel_err

__all__ = ["rel_err", "assert_close_rel", "poison", "TOL"]

# Relative-norm tolerances per dtype (see seqgen_fast._checks.DEFAULT_TOL for the reasons).
from seqgen_fast._checks import DEFAULT_TOL as TOL  # noqa: E402


def assert_close_rel(ours: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "output") -> None:
    """Fail unless ``||ours - ref|| / ||ref|| <= tol`` (NaN/Inf must sit where the reference's do)."""
    assert ours.shape == ref.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref.shape)}"
    err = rel_err(ours, ref)
    assert err == err and err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def poison(t: torch.Tensor) -> torch.Tensor:
    """Fill ``t`` with NaN (floating) so an element the kernel fails to write is caught."""
    return t.fill_(float("nan"))
