"""Differential fuzzing of the fused diffusion steps (hypothesis; ``tests/support/fuzz.py``):
``fast_scheduler(s).step`` -- hence ``ops.diffusion.diffusion_step`` and its kernels -- on every backend
here, against diffusers' own scheduler stepping the same inputs in float64 (the reference) and in the
same dtype (the yardstick of the half-precision rule and of where non-finite values land).

Drawn: the scheduler kind and its config (prediction type, x0 clipping / dynamic thresholding, DDIM's
eta, Euler's churn, DPM-Solver's algorithm and order), the number of inference steps and two
consecutive steps (multistep history read on the second), the latent shape (1, primes, 2^k +- 1),
dtype, layout (channels_last, transposed, sliced), classifier-free guidance fused into the step, per-
sample timesteps (DDPM/DDIM), and values (normal, huge, tiny, denormal, all-equal, +-inf, NaN) for the
sample and the model output independently.

Noise: every step is given the same noise. diffusers' steps that take no ``variance_noise`` draw
through their module's ``randn_tensor``, which the test replaces by one returning that noise (in the
dtype asked), so the float64 reference sees the very values the dtype run does.

The non-finite policy under test: a NaN or inf in the model output or the sample propagates as in
diffusers' step in that dtype (the same elements NaN / +-inf); clamps keep NaN (torch.clamp's rule);
a NaN in a sample under dynamic thresholding makes that sample's quantile NaN (torch.quantile's rule).
"""
from __future__ import annotations

import contextlib
import sys
import warnings
from unittest import mock

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from seqgen_fast._backend import interpret_mode
from seqgen_fast.diffusion import fast_scheduler
from support import fuzz

diffusers = pytest.importorskip("diffusers")
warnings.filterwarnings("ignore", message="The `scale_model_input` function should be called")

pytestmark = pytest.mark.fuzz
BACKENDS = ("reference", "triton")
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
X0 = {"plain": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
      "threshold": dict(thresholding=True, sample_max_value=2.5, dynamic_thresholding_ratio=0.9)}


@st.composite
def schedulers(draw):
    """(class name, config, step kwargs, per-sample timesteps allowed)."""
    kind = draw(st.sampled_from(["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                 "EulerAncestralDiscreteScheduler", "DPMSolverMultistepScheduler",
                                 "UniPCMultistepScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler"]))
    pred = draw(st.sampled_from(["epsilon", "sample", "v_prediction"]))
    if kind in ("DDPMScheduler", "DDIMScheduler"):
        kw = dict(eta=draw(st.sampled_from([0.0, 0.7]))) if kind == "DDIMScheduler" else {}
        return kind, dict(prediction_type=pred, **X0[draw(st.sampled_from(list(X0)))]), kw, True
    if kind == "EulerDiscreteScheduler":
        churn = draw(st.booleans())
        return kind, dict(prediction_type=pred), dict(s_churn=0.8, s_tmin=0.0, s_tmax=1e4) if churn else {}, False
    if kind == "DPMSolverMultistepScheduler":
        algo = draw(st.sampled_from(["dpmsolver++", "sde-dpmsolver++", "dpmsolver"]))
        return kind, dict(prediction_type=pred, algorithm_type=algo, solver_order=draw(st.sampled_from([1, 2]))), {}, \
            False
    if kind == "UniPCMultistepScheduler":
        return kind, dict(prediction_type=pred), {}, False
    if kind == "LCMScheduler":
        return kind, dict(prediction_type=pred, **X0[draw(st.sampled_from(["plain", "clip"]))]), {}, False
    if kind == "EulerAncestralDiscreteScheduler":
        return kind, dict(prediction_type=pred), {}, False
    return kind, {}, {}, False


@st.composite
def cases(draw):
    kind, config, kw, per_sample_ok = draw(schedulers())
    B, C = draw(st.sampled_from([1, 2, 3])), draw(st.sampled_from([1, 3, 4]))
    shape = (B, C, draw(fuzz.sizes(1, 17)), draw(fuzz.sizes(1, 17)))
    return dict(kind=kind, config=config, kw=kw, shape=shape, dtype=draw(st.sampled_from(DTYPES)),
                steps=draw(st.sampled_from([4, 10])), start=draw(st.integers(0, 2)),
                layout=draw(st.sampled_from(["contiguous", "channels_last", "transposed", "sliced"])),
                x_kind=draw(st.sampled_from(fuzz.KINDS)), m_kind=draw(st.sampled_from(fuzz.KINDS)),
                guidance=draw(st.sampled_from([None, None, 4.5])),
                per_sample=per_sample_ok and B > 1 and draw(st.booleans()), seed=draw(st.integers(0, 2 ** 31)))


@contextlib.contextmanager
def fixed_noise(scheduler, noise: torch.Tensor):
    """diffusers' ``randn_tensor`` in ``scheduler``'s module returns ``noise`` (in the dtype asked)."""
    module = sys.modules[type(scheduler).__module__]
    if not hasattr(module, "randn_tensor"):
        yield
        return
    fake = lambda shape, generator=None, device=None, dtype=None, layout=None: \
        noise.to(device=device or noise.device, dtype=dtype or noise.dtype)
    with mock.patch.object(module, "randn_tensor", fake):
        yield


def _step_all(s, c, xs, ms, noise, ours: bool):
    """Two consecutive steps of scheduler ``s`` from timestep index c['start'] (per-sample timesteps:
    sample b at index start + b); model outputs ``ms``, samples ``xs`` (each step's own, so that a NaN
    in one does not decide the next step's input). Returns [(prev_sample, pred_original_sample, where the
    solver state the step read was non-finite)]."""
    outs = []
    if hasattr(s, "set_begin_index"):
        s.set_begin_index(c["start"])
    for step in range(2):
        i = c["start"] + step
        last = len(s.timesteps) - 1
        t = s.timesteps[[min(i + b, last) for b in range(c["shape"][0])]] if c["per_sample"] else s.timesteps[i]
        m, x = ms[step], xs[step]
        state = _nonfinite_state(s, x.shape)
        kw = dict(c["kw"])
        if c["guidance"] is not None:
            if ours:
                kw["guidance_scale"] = c["guidance"]
            else:
                u, cond = m.chunk(2)
                m = u + c["guidance"] * (cond - u)
        if ours or c["kind"] in ("DDIMScheduler", "DPMSolverMultistepScheduler"):  # those take variance_noise
            kw["variance_noise"] = noise.to(x.dtype)
        if c["per_sample"] and not ours:  # diffusers steps each sample alone
            prev, x0 = [], []
            for b in range(c["shape"][0]):
                kb = {k: (v[b:b + 1] if isinstance(v, torch.Tensor) and v.dim() else v) for k, v in kw.items()}
                with fixed_noise(s, noise[b:b + 1].to(x.dtype)):
                    o = s.step(m[b:b + 1], t[b], x[b:b + 1], **kb)
                prev.append(o.prev_sample)
                x0.append(getattr(o, "pred_original_sample", None))
            outs.append((torch.cat(prev), None if x0[0] is None else torch.cat(x0), state))
            continue
        with fixed_noise(s, noise.to(x.dtype)):
            o = s.step(m, t, x, **kw)
        outs.append((o.prev_sample, getattr(o, "pred_original_sample", None) if not hasattr(o, "denoised")
                     else o.denoised, state))
    return outs


def _nonfinite_state(s, shape) -> torch.Tensor:
    """Where a multistep solver's state (its history, UniPC's last_sample) holds inf or NaN, over ``shape``."""
    held = [h for h in list(getattr(s, "model_outputs", ())) + [getattr(s, "last_sample", None)]
            if isinstance(h, torch.Tensor)]
    mask = torch.zeros(shape, dtype=torch.bool)
    for h in held:
        mask |= ~torch.isfinite(h.detach().cpu()).expand(shape)
    return mask


def assert_step_matches(ours, ref64, theirs, *, inf_inputs: bool, subnormal_inputs: bool, what: str,
                        unjudged: torch.Tensor | None = None, ulps: float = 1) -> None:
    """The step's error rule, element by element against diffusers in the dtype (``theirs``), but for the
    ``unjudged`` elements: those whose solver state is finite in ours and not in diffusers' or the other
    way round (a float16 history value at the overflow boundary, which diffusers' float16 arithmetic
    rounds to 65504 and our float32 value rounded once makes inf, or the reverse; found by the long
    profile). The elements judged:

    * NaN where diffusers gives NaN -- except that with an infinite input ours may give +-inf there:
      the fused step evaluates the scheduler's linear combination simplified, where diffusers forms
      intermediate differences such as Euler's (x - x0) / sigma that are inf - inf for an infinite x;
    * +-inf where diffusers gives it -- except that with an infinite input ours may give NaN there,
      the same simplification the other way round: a multistep solver's float16 history that
      overflowed to inf meets the combination as c1 * inf + c2 * inf with opposite signs, where
      diffusers' order of operations adds the inf once (UniPC, found by the long profile);
    * either exception: where diffusers overflowed its dtype in an intermediate (inf, or NaN from
      inf - inf: float16 guidance of huge outputs) and the float64 reference is finite, ours (float32
      math) must be finite and within 8 epsilons of float64, at the scale of the element plus the
      sample's root mean square (a multistep solver's history is stored in the dtype, as diffusers
      stores it, so an element formed by cancelling terms of the sample's size carries their rounding);
    * finite where diffusers is finite -- except +-inf where float64's value rounds to it in the dtype
      (an LCM x0 of -65529.3, past float16's range: diffusers' float16 arithmetic gave -65504, ours
      -inf, found by the long profile); those, and the rest finite everywhere, by the dtype's rule
      (``fuzz.assert_matches_torch``, subnormals flushed) -- or, when an input is subnormal, element
      by element within 8 epsilons (float32: its 3e-5 bar) of the largest |value| plus 1e3 times the
      dtype's smallest normal (the coefficients, up to
      1/sqrt(alpha_bar) ~ 160, scale the subnormals into normal numbers that diffusers' half-precision
      arithmetic and ours, in float32, round differently; the CUDA kernel flushes them).
    """
    if unjudged is not None and unjudged.any():
        judged = ~unjudged.expand(ours.shape)
        ours, ref64, theirs = (v.detach().cpu()[judged] for v in (ours, ref64, theirs))
    a, b, t = (v.detach().double().cpu() for v in (ours, ref64, theirs))
    nan_t, inf_t, fin_t = torch.isnan(t), torch.isinf(t), torch.isfinite(t)
    # diffusers overflowed its dtype in an intermediate (inf, or NaN from inf - inf) where float64 is
    # finite: ours, in float32, must be finite and close to float64 there
    finite_b = b[torch.isfinite(b)]
    rms = finite_b.square().mean().sqrt() if finite_b.numel() else 0.0
    close = torch.isfinite(b) & ((a - b).abs() <= 8 * fuzz.EPS[ours.dtype] * (b.abs() + rms))
    ok_nan = torch.isnan(a) | close | (torch.isinf(a) if inf_inputs else torch.zeros_like(nan_t))
    assert ok_nan[nan_t].all(), f"{what}: finite where diffusers gives NaN"
    same_inf = inf_t & (a == t)
    ok_inf = same_inf | close | (torch.isnan(a) if inf_inputs else torch.zeros_like(inf_t))
    assert ok_inf[inf_t].all(), f"{what}: infinities differ from diffusers'"
    # float64's value past the dtype's range rounds to inf, which ours (float32 math rounded once) gives,
    # where diffusers' half-precision arithmetic may stop at the largest finite number
    over = fin_t & torch.isinf(a) & (a == b.to(ours.dtype).double())
    assert (torch.isfinite(a) | over)[fin_t].all(), f"{what}: non-finite where diffusers' is finite"
    keep = fin_t & torch.isfinite(b) & ~over
    if subnormal_inputs:  # judged absolutely, at the scale the coefficients give subnormal inputs
        floor = 1e3 * torch.finfo(ours.dtype).smallest_normal
        rel = max(8 * fuzz.EPS[ours.dtype], fuzz.REL_BAR.get(ours.dtype, 0.0))
        scale = b.abs()[keep].max() if keep.any() else 0.0
        assert ((a - b).abs()[keep] <= floor + rel * scale).all(), what
        return
    fuzz.assert_matches_torch(ours.detach().cpu()[keep], ref64.detach().cpu()[keep], theirs.detach().cpu()[keep],
                              what=what, flush_subnormals=True, ulps=ulps)


def check_case(c, backend: str, device: str = DEVICE) -> None:
    dtype, shape = c["dtype"], c["shape"]
    assume(not (backend == "triton" and interpret_mode() and dtype == torch.bfloat16
                and "denormal" in (c["x_kind"], c["m_kind"])))  # the interpreter's bf16 subnormals (test_fuzz_sampling)
    mshape = (2 * shape[0],) + shape[1:] if c["guidance"] is not None else shape
    xs = [fuzz.with_layout(fuzz.fill(shape, dtype, c["x_kind"], c["seed"] + k), c["layout"]) for k in (0, 1)]
    ms = [fuzz.with_layout(fuzz.fill(mshape, dtype, c["m_kind"], c["seed"] + 2 + k), c["layout"]) for k in (0, 1)]
    noise = fuzz.fill(shape, dtype, "normal", c["seed"] + 4)

    def make():
        s = getattr(diffusers, c["kind"])(**c["config"])
        s.set_timesteps(c["steps"])
        return s

    try:
        ours = fast_scheduler(make(), backend=backend)
    except ValueError:  # a config diffusers rejects at construction (not a step's case)
        assume(False)
    try:
        theirs = _step_all(make(), c, xs, ms, noise, False)
    except (ValueError, NotImplementedError) as e:  # a combination diffusers rejects: ours rejects it alike
        with pytest.raises(type(e)):
            _step_all(ours, c, [x.to(device) for x in xs], [m.to(device) for m in ms], noise.to(device), True)
        return
    got = _step_all(ours, c, [x.to(device) for x in xs], [m.to(device) for m in ms], noise.to(device), True)
    ref = _step_all(make(), c, [x.double() for x in xs], [m.double() for m in ms], noise.double(), False)
    # the Triton interpreter converts float32 to bfloat16 by truncation (test_fuzz_recurrent's
    # test_interpreter_rounds_float32_to_bfloat16_by_truncation): up to one ulp where compiled kernels
    # and torch round to nearest, half an ulp; a solver's bfloat16 history carries it into the next step
    ulps = 2 if backend == "triton" and interpret_mode() and dtype == torch.bfloat16 else 1
    inf_inputs = bool({c["x_kind"], c["m_kind"]} & {"posinf", "neginf"}) or (
        dtype == torch.float16 and "huge" in (c["x_kind"], c["m_kind"]))  # 1e4 N(0,1) overflows float16
    for step, (g, t, r) in enumerate(zip(got, theirs, ref)):
        for name, a, b, tt in (("prev_sample", g[0], r[0], t[0]), ("x0", g[1], r[1], t[1])):
            if b is None or a is None:
                continue
            assert a.dtype == tt.dtype, f"{name}: dtype {a.dtype} != diffusers' {tt.dtype}"
            assert_step_matches(a, b, tt, inf_inputs=inf_inputs, what=f"{backend} {c['kind']} step {step} {name}",
                                subnormal_inputs="denormal" in (c["x_kind"], c["m_kind"]), unjudged=g[2] ^ t[2],
                                ulps=ulps)


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=cases())
def test_fast_scheduler_steps_match_diffusers(backend, case):
    check_case(case, backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ("triton", "cuda", "reference"))
@settings(deadline=None)
@given(case=cases())
def test_gpu_fast_scheduler_steps_match_diffusers(backend, case):
    # the cuda twin takes single-step schedulers on contiguous inputs; forcing it elsewhere raises
    assume(backend != "cuda" or (case["kind"] in ("DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler",
                                                   "EulerAncestralDiscreteScheduler", "LCMScheduler")
                                 and case["layout"] == "contiguous"))
    check_case(case, backend, "cuda")


# ---- regressions found by the fuzz suite ------------------------------------------------------------
def _pair(cls: str, steps: int, backend: str, **config):
    """diffusers' scheduler and the fused one on ``backend``, both with ``steps`` inference steps."""
    theirs, ours = getattr(diffusers, cls)(**config), fast_scheduler(getattr(diffusers, cls)(**config), backend=backend)
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    return theirs, ours


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_nan_sample_under_dynamic_thresholding(backend):
    """Found by the fuzz suite: the sort-based quantile of dynamic thresholding skipped a NaN (sorted
    last), so one NaN element stayed one NaN where diffusers (torch.quantile: NaN) makes the whole
    sample's x0 and prev_sample NaN."""
    config = dict(thresholding=True, sample_max_value=2.5, dynamic_thresholding_ratio=0.9)
    x, m = torch.randn(2, 3, 5, 7), torch.randn(2, 3, 5, 7)
    x[0, 1, 2, 3] = float("nan")
    theirs, ours = _pair("DDIMScheduler", 10, backend, **config)
    t = theirs.timesteps[2]
    want, got = theirs.step(m, t, x), ours.step(m, t, x)
    assert torch.isnan(want.prev_sample[0]).all() and torch.isfinite(want.prev_sample[1]).all()
    assert torch.equal(torch.isnan(got.prev_sample), torch.isnan(want.prev_sample))
    assert torch.equal(torch.isnan(got.pred_original_sample), torch.isnan(want.pred_original_sample))


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_zero_coefficient_times_inf(backend):
    """Found by the fuzz suite: DDPM's fused row has no model-output term (coefficient exactly 0) in
    prev_sample, but 0 * inf made an infinite model output NaN where diffusers gives -inf."""
    theirs, ours = _pair("DDPMScheduler", 4, backend, clip_sample=False)
    x, m, noise = torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3), torch.randn(1, 1, 3, 3)
    m[0, 0, 1, 1] = float("inf")
    t = theirs.timesteps[0]
    with fixed_noise(theirs, noise):
        want = theirs.step(m, t, x).prev_sample
    got = ours.step(m, t, x, variance_noise=noise).prev_sample
    assert torch.isinf(want[0, 0, 1, 1]) and torch.equal(got[0, 0, 1, 1], want[0, 0, 1, 1])
    assert torch.isfinite(got).sum() == 8


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_zero_coefficient_of_one_row_multiplies(backend):
    """Found by the fuzz suite (after the fix above skipped every zero coefficient): at DDPM's last step
    (t = 0) the sample's coefficient is 0 but diffusers still forms 0 * x, so an infinite sample gives
    NaN there; only terms zero in every row are skipped (tables.mark_absent)."""
    theirs, ours = _pair("DDPMScheduler", 4, backend, clip_sample=False)
    x, m = torch.randn(1, 1, 2, 2), torch.randn(1, 1, 2, 2)
    x[0, 0, 0, 1] = float("inf")
    t = theirs.timesteps[-1]
    want, got = theirs.step(m, t, x).prev_sample, ours.step(m, t, x).prev_sample
    assert torch.isnan(want[0, 0, 0, 1])
    assert torch.equal(torch.isnan(got), torch.isnan(want)) and torch.isfinite(got).sum() == 3


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_thresholding_pass_skips_absent_terms(backend):
    """Found by the fuzz suite: the dynamic-thresholding pass formed x0 = 0 * x + m for a "sample"
    prediction, so an infinite sample made the quantile, then x0 and prev_sample, NaN where diffusers
    gives x0 = m and prev_sample = inf."""
    config = dict(prediction_type="sample", thresholding=True, sample_max_value=2.5, dynamic_thresholding_ratio=0.9)
    theirs, ours = _pair("DDPMScheduler", 4, backend, **config)
    x, m, noise = torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3), torch.randn(1, 2, 3, 3)
    x[0, 1, 2, 2] = float("inf")
    t = theirs.timesteps[0]
    with fixed_noise(theirs, noise):
        want = theirs.step(m, t, x)
    got = ours.step(m, t, x, variance_noise=noise)
    assert torch.isfinite(want.pred_original_sample).all()
    assert torch.allclose(got.pred_original_sample, want.pred_original_sample, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.isinf(got.prev_sample), torch.isinf(want.prev_sample))


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_thresholding_quantile_rank_on_an_element(backend):
    """Found by the long profile: dynamic thresholding's quantile interpolated between ranks floor and
    floor + 1 where torch.quantile takes floor and ceiling. Over 21 values at ratio 0.9 the rank is 18
    exactly, so torch takes element 18 alone; ours formed v18 + 0 * (inf - v18) = NaN with two infinite
    x0 values above it, where diffusers' x0 and prev_sample are finite."""
    config = dict(prediction_type="epsilon", thresholding=True, sample_max_value=2.5, dynamic_thresholding_ratio=0.9)
    theirs, ours = _pair("DDPMScheduler", 4, backend, **config)
    x, m, noise = torch.randn(1, 1, 3, 7), torch.randn(1, 1, 3, 7), torch.randn(1, 1, 3, 7)
    m[0, 0, 0, 5] = m[0, 0, 1, 5] = float("inf")
    t = theirs.timesteps[0]
    with fixed_noise(theirs, noise):
        want = theirs.step(m, t, x)
    got = ours.step(m, t, x, variance_noise=noise)
    assert torch.isfinite(want.prev_sample).all() and torch.isfinite(want.pred_original_sample).all()
    assert torch.allclose(got.pred_original_sample, want.pred_original_sample, rtol=1e-5, atol=1e-6)
    assert torch.allclose(got.prev_sample, want.prev_sample, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_tiny_float16_values_at_the_subnormal_threshold(backend):
    """Found by the long profile, in the error rule rather than the step: with outputs around float16's
    smallest normal, flushing subnormals in ours, diffusers' and the float64 result each alone turned
    6.2e-5 against a flushed 6.0e-5 into an error of the value's whole size (1.7e-2 where the unflushed
    error is 2e-4, below diffusers' own). Where any of the three is subnormal, all three now count as 0."""
    check_case({"kind": "FlowMatchEulerDiscreteScheduler", "config": {}, "kw": {}, "shape": (1, 3, 7, 15),
                "dtype": torch.float16, "steps": 4, "start": 0, "layout": "contiguous", "x_kind": "tiny",
                "m_kind": "tiny", "guidance": 4.5, "per_sample": False, "seed": 1642135}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_float16_multistep_history_that_overflowed(backend):
    """Found by the long profile, in the error rule: UniPC in float16 with huge guided outputs stores an
    overflowed (inf) history value at step 0, as diffusers does. At step 1 diffusers adds it once (inf);
    the fused combination meets it with opposite signs (NaN). Elsewhere ours, from that float16 history,
    is within float16's rounding of the sample's size of float64, not of each element's own size."""
    check_case({"kind": "UniPCMultistepScheduler", "config": {"prediction_type": "sample"}, "kw": {},
                "shape": (1, 4, 8, 13), "dtype": torch.float16, "steps": 4, "start": 0, "layout": "contiguous",
                "x_kind": "normal", "m_kind": "huge", "guidance": 4.5, "per_sample": False, "seed": 0}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_float16_history_at_the_overflow_boundary(backend):
    """Found by the long profile, in the error rule: a float16 UniPC history value near 65504 is 65504 in
    diffusers (its float16 arithmetic) and inf in ours (our float32 value rounded once), or the reverse,
    so the next step differs in finiteness at exactly the elements whose state differs. Those elements
    are not judged (``assert_step_matches``' ``unjudged``); every other one is."""
    check_case({"kind": "UniPCMultistepScheduler", "config": {"prediction_type": "epsilon"}, "kw": {},
                "shape": (2, 4, 13, 15), "dtype": torch.float16, "steps": 4, "start": 2, "layout": "contiguous",
                "x_kind": "huge", "m_kind": "huge", "guidance": None, "per_sample": False, "seed": 208}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_float16_x0_past_the_overflow_threshold(backend):
    """Found by the long profile: LCM, float16, huge model outputs: one element of x0 is -65529.3 in
    float64, past float16's range (it rounds to -inf), and ours gives -inf; diffusers' float16
    arithmetic gives -65504. The rule took that for a non-finite value where diffusers is finite; it
    now accepts float64's value rounded to the dtype there."""
    check_case({"kind": "LCMScheduler", "config": {"prediction_type": "epsilon", "clip_sample": False}, "kw": {},
                "shape": (1, 4, 7, 7), "dtype": torch.float16, "steps": 4, "start": 0, "layout": "sliced",
                "x_kind": "normal", "m_kind": "huge", "guidance": None, "per_sample": False, "seed": 17}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_regression_bfloat16_history_rounded_by_truncation(backend):
    """Found by the long profile: on the Triton interpreter the bfloat16 history of an SDE DPM-Solver++ step
    is truncated, not rounded, and the next step's error passed the one-ulp bar (1.24e-2 against 1.06e-2).
    Under the interpreter bfloat16 Triton results are judged at two ulps; compiled, at one (-m gpu)."""
    check_case({"kind": "DPMSolverMultistepScheduler",
                "config": {"prediction_type": "epsilon", "algorithm_type": "sde-dpmsolver++", "solver_order": 2},
                "kw": {}, "shape": (1, 1, 1, 16), "dtype": torch.bfloat16, "steps": 10, "start": 2,
                "layout": "contiguous", "x_kind": "equal", "m_kind": "equal", "guidance": None, "per_sample": False,
                "seed": 2}, backend)
