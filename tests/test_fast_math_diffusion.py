"""Fast-math accounting of csrc/diffusion.cu: the Box-Muller noise (__logf, __sinf/__cosf, sqrt.approx
under --use_fast_math) swept over every uniform the kernel can feed it, each approximation at its
documented bound (PTX ISA: lg2.approx.f32 2^-22.6 absolute in log2, sin/cos.approx.f32 2^-20.5
absolute, sqrt.approx.f32 2^-23 relative), and the step's NaN handling in the compiled sm_90a SASS.

The figures asserted here are the ones diffusion.cu's comment states.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from seqgen_fast import _ext
from support import sass

LG2_ABS, SIN_ABS, SQRT_REL = 2.0 ** -22.6, 2.0 ** -20.5, 2.0 ** -23
FP32_TOL = 3e-5  # tests/support/fuzz.py REL_BAR[float32]


def uniforms(x: np.ndarray) -> np.ndarray:
    """diffusion.cu's to_uniform of non-negative 31-bit words, then its clamp at 1e-7."""
    u = (x.astype(np.float32) * np.float32(4.6566127342e-10)).astype(np.float32)
    return np.where(u < np.float32(1e-7), np.float32(1e-7), u)


def radius(u: np.ndarray, s_lg2: int, s_sqrt: int, clamp: bool = True) -> np.ndarray:
    """r = sqrt(-2 ln u) in fp32 as the kernel computes it, lg2 and sqrt at their bounds (signs given)."""
    lg2 = (np.log2(u.astype(np.float64)) + s_lg2 * LG2_ABS).astype(np.float32)
    lnu = (lg2 * np.float32(np.log(2))).astype(np.float32)
    v = (np.float32(-2) * lnu).astype(np.float32)
    if clamp:
        v = np.where(v < 0, np.float32(0), v)
    with np.errstate(invalid="ignore"):
        return (np.sqrt(v.astype(np.float64)) * (1 + s_sqrt * SQRT_REL)).astype(np.float32)


def normal_error(u: np.ndarray, s_lg2: int, s_sqrt: int) -> tuple[np.ndarray, np.ndarray]:
    """(worst |z - exact z| over both lanes, exact r): |dz| <= |dr| + (r + |dr|) * 2^-20.5."""
    exact = np.sqrt(-2 * np.log(u.astype(np.float64)))
    dr = np.abs(radius(u, s_lg2, s_sqrt) - exact)
    return dr + (exact + dr) * SIN_ABS, exact


CORNERS = [(a, b) for a in (-1, 1) for b in (-1, 1)]


def test_box_muller_at_documented_bounds():
    near_one = uniforms(np.arange(2 ** 31 - 2 ** 22, 2 ** 31, dtype=np.int64))  # every word where r < 3e-3
    spread = uniforms(np.arange(0, 2 ** 31, 1021, dtype=np.int64))  # uniform draws
    for corner in CORNERS:
        dz, r = normal_error(np.concatenate([near_one, spread]), *corner)
        assert np.isfinite(dz).all()
        assert dz[r >= 0.1].max() <= 5.0e-6
        assert dz.max() <= 3.5e-4  # r < 0.1 only: sqrt of the log's absolute bound
        dz_u, r_u = normal_error(spread, *corner)
        rel_norm = np.sqrt((dz_u ** 2).mean() / (r_u ** 2 / 2).mean())  # E z^2 = E r^2 / 2 per lane
        assert rel_norm <= 1.3e-6 < FP32_TOL


def test_box_muller_clamps_the_log_before_the_root():
    """Regression (issue 17): at lg2.approx's documented bound, -2 ln u can come out negative for u just
    below 1; sqrtf of it was a NaN normal. diffusion.cu clamps it at 0."""
    u = uniforms(np.arange(2 ** 31 - 2 ** 22, 2 ** 31, dtype=np.int64))
    assert np.isnan(radius(u, 1, 1, clamp=False)).any()
    assert not np.isnan(radius(u, 1, 1)).any()


@pytest.fixture(scope="module")
def diffusion_sm90(tmp_path_factory):
    return sass.sm90_binary("diffusion.cu", tmp_path_factory.mktemp("sass_diffusion"),
                            Path(_ext.C.__file__) if _ext.C is not None else None)


def test_diffusion_sass_has_no_nan_dropping_min_max(diffusion_sm90):
    """The compiled step clamps (x0 clip / threshold, the noise's) by comparison, which nvcc compiles to
    the NaN-propagating FMNMX.NAN: no NaN-dropping FMNMX anywhere, so a NaN in the sample or the model
    output reaches the outputs as in the reference (torch.clamp keeps NaN)."""
    tool = sass.tools_or_skip()
    kernels = sass.sass_functions(tool, diffusion_sm90, "-sass", "diffusion")
    assert kernels, "no diffusion kernels in the SASS"
    for name, body in kernels.items():
        assert not sass.NAN_DROPPING_SASS.search(body), f"{name}: a NaN-dropping float min/max in the SASS"
        assert "FMNMX.NAN" in body, f"{name}: the clamps compile to NaN-propagating min/max"
