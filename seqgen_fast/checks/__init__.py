"""Numerical self-checks of every op, run by ``seqgen-fast check`` and the test suites.

Each kernel family's ``seqgen_fast.checks.<family>`` module (the family manifest names them)
registers its checks with :func:`register_check`: a function ``fn(device, dtype)`` that draws fresh
random inputs, runs the public op (whatever backend is forced around it) and returns
``{output_name: (ours, reference)}``, the reference computed by the project's own plain-PyTorch
reference in float64, so no optional package is needed. A check that compares with an optional
package as well (diffusers' own scheduler step, say) declares it in ``requires``; where that
package is missing its rows are "n/a" with the install hint.

:func:`run_checks` runs each check under each backend that can take it and reports the relative
error norm ``||ours - ref|| / ||ref||`` of each output against the per-dtype tolerance.

This package is the top floor of seqgen_fast: it may import anything, and nothing but the CLI and
the tests imports it.
"""
from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import Callable

import torch

from .._backend import BACKENDS, BackendError, use_backend
from .._families import FAMILIES

# Relative-norm tolerances per storage dtype. float32: Triton's dots use tf32 (~3e-4 error);
# float16 has a 2^-11 unit roundoff; bfloat16 2^-8, accumulated over a reduction.
DEFAULT_TOL = {torch.float64: 1e-10, torch.float32: 2e-3, torch.float16: 5e-3, torch.bfloat16: 3e-2}


@dataclass
class Check:
    name: str
    family: str  # the manifest family whose checks module registered it
    fn: Callable[[torch.device, torch.dtype], dict[str, tuple[torch.Tensor, torch.Tensor]]]
    dtypes: tuple[torch.dtype, ...]
    tol: dict[torch.dtype, float]
    cpu_dtypes: tuple[torch.dtype, ...]
    requires: tuple[str, ...]


@dataclass
class CheckRow:
    check: str
    backend: str
    dtype: str
    output: str
    rel_err: float | None
    tol: float | None
    status: str  # "pass", "FAIL", or "n/a" (backend cannot take it; the reason is in `note`)
    note: str = ""


_CHECKS: dict[str, Check] = {}


def register_check(name: str, *, dtypes=(torch.float32, torch.float16, torch.bfloat16), tol=None,
                   cpu_dtypes=(torch.float32,), requires: tuple[str, ...] = ()):
    """Register ``fn(device, dtype) -> {output: (ours, ref)}`` as check ``name``.

    ``cpu_dtypes`` limits the dtypes tried on the CPU (half-precision CPU kernels are slow and
    not what users run there). ``requires`` names optional packages (pip extras of seqgen_fast)
    the check imports.
    """
    def deco(fn):
        _CHECKS[name] = Check(name, fn.__module__.rpartition(".")[2], fn, tuple(dtypes), {**DEFAULT_TOL, **(tol or {})}, tuple(cpu_dtypes),
                              tuple(requires))
        return fn

    return deco


def load_all(families=None) -> dict[str, Check]:
    """Import the checks of ``families`` (names; default every family of the manifest)."""
    for f in FAMILIES:
        if families is None or f.name in families:
            importlib.import_module(f"{__name__}.{f.name}")
    return dict(_CHECKS)


def all_checks() -> dict[str, Check]:
    return dict(_CHECKS)


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """``||ours - ref|| / ||ref||`` in float64; NaN where either holds a NaN the other does not."""
    a, b = ours.detach().to(torch.float64).cpu(), ref.detach().to(torch.float64).cpu()
    if a.shape != b.shape:
        raise ValueError(f"shape mismatch: ours {tuple(a.shape)} vs reference {tuple(b.shape)}")
    if not torch.equal(torch.isnan(a), torch.isnan(b)):
        return float("nan")
    finite = torch.isfinite(b)
    if not torch.equal(a[~finite], b[~finite]):
        return float("nan")
    a, b = a[finite], b[finite]
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def _missing(packages: tuple[str, ...]) -> str:
    """The "needs ..." note for the optional packages that are not installed ('' when all are)."""
    absent = [p for p in packages if importlib.util.find_spec(p) is None]
    if not absent:
        return ""
    return "; ".join(f"needs {p}, not installed (pip install 'seqgen_fast[{p}]')" for p in absent)


def run_checks(device: torch.device, names=None, backends=BACKENDS, dtypes=None, families=None) -> list[CheckRow]:
    """Run the checks of ``families`` (default: every family, imported here) on ``device`` under every
    backend; one row per output. ``names`` and ``dtypes`` limit the run when given."""
    load_all(families)
    rows: list[CheckRow] = []
    for check in _CHECKS.values():
        if (names and check.name not in names) or (families and check.family not in families):
            continue
        want = check.dtypes if device.type == "cuda" else check.cpu_dtypes
        missing = _missing(check.requires)
        for dtype in (d for d in want if dtypes is None or d in dtypes):
            dname = str(dtype).removeprefix("torch.")
            for backend in backends:
                if missing:
                    rows.append(CheckRow(check.name, backend, dname, "-", None, None, "n/a", missing))
                    continue
                try:
                    with use_backend(backend):
                        outs = check.fn(device, dtype)
                except BackendError as exc:
                    note = "; ".join(r for why in exc.reasons.values() for r in why)
                    rows.append(CheckRow(check.name, backend, dname, "-", None, None, "n/a", note))
                    continue
                except Exception as exc:  # a crash is a failure to report, with what it said
                    rows.append(CheckRow(check.name, backend, dname, "-", None, None, "FAIL", f"{type(exc).__name__}: {exc}"))
                    continue
                for out_name, (ours, ref) in outs.items():
                    err = rel_err(ours, ref)
                    tol = check.tol[dtype]
                    ok = err == err and err <= tol
                    rows.append(CheckRow(check.name, backend, dname, out_name, err, tol, "pass" if ok else "FAIL"))
    return rows
