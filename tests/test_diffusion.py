"""Fused diffusion steps against diffusers' own schedulers (CPU: reference and Triton-interpreter backends).

Every scheduler x prediction type x clip/threshold option is checked step by step against
diffusers given the same noise; per-sample timesteps against diffusers stepping each sample alone;
fused guidance against guidance done by hand; full 10-step loops; in-kernel noise statistics and
reproducibility; the wrapper's API; bad inputs. GPU cases are in tests/test_diffusion_cuda.py.
"""
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from seqgen_fast import _ext  # noqa: E402
from seqgen_fast._backend import use_backend  # noqa: E402
from seqgen_fast._contract import AN, NCOEF  # noqa: E402
from seqgen_fast.diffusion import fast_scheduler, sample, tables  # noqa: E402
from seqgen_fast.kernels import diffusion_cuda  # noqa: E402
from seqgen_fast.ops import diffusion as ops  # noqa: E402
from support import sass  # noqa: E402
from support.aot import compile_sm90  # noqa: E402
from support.utils import assert_close_rel  # noqa: E402

warnings.filterwarnings("ignore", message="The `scale_model_input` function should be called")

TOL32 = 2e-6  # float32 coefficients computed in float64 vs diffusers' float32 arithmetic
SHAPE = (3, 4, 6, 5)
# DDPM/DDIM steps run in float64: with x0 clipping at large t (epsilon prediction, alpha_bar ~ 1e-4) only
# the elements where x - sqrt(1 - alpha_bar) eps nearly cancels stay unclipped, and float32 rounding of
# that difference alone (either side) reaches the tolerance.
F64 = dict(dtype=torch.float64)


def pair(cls, steps=20, **config):
    theirs = getattr(diffusers, cls)(**config)
    ours = fast_scheduler(getattr(diffusers, cls)(**config), backend="reference")
    theirs.set_timesteps(steps)
    ours.set_timesteps(steps)
    return theirs, ours


def gen(seed):
    return torch.Generator().manual_seed(seed)


def check_outputs(got, want, what):
    assert type(got) is type(want), f"{what}: output class {type(got).__name__} != {type(want).__name__}"
    assert_close_rel(got.prev_sample, want.prev_sample, TOL32, f"{what} prev_sample")
    if getattr(want, "pred_original_sample", None) is not None:
        assert_close_rel(got.pred_original_sample, want.pred_original_sample, TOL32, f"{what} pred_original_sample")


X0_OPTIONS = {"plain": dict(clip_sample=False), "clip": dict(clip_sample=True, clip_sample_range=1.5),
              "threshold": dict(thresholding=True, sample_max_value=2.5, dynamic_thresholding_ratio=0.9)}


# ---------------------------------------------------------------------------------------------
# Single steps against diffusers, every option
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("x0opt", list(X0_OPTIONS))
def test_ddpm_step(pred, x0opt):
    theirs, ours = pair("DDPMScheduler", prediction_type=pred, **X0_OPTIONS[x0opt])
    x, mo = 2 * torch.randn(SHAPE, **F64), 2 * torch.randn(SHAPE, **F64)
    for t in (theirs.timesteps[0], theirs.timesteps[7], theirs.timesteps[-1]):
        check_outputs(ours.step(mo, t, x, generator=gen(3)), theirs.step(mo, t, x, generator=gen(3)), f"t={int(t)}")


@pytest.mark.parametrize("variance_type", ["fixed_small_log", "fixed_large"])
def test_ddpm_variance_types(variance_type):
    theirs, ours = pair("DDPMScheduler", variance_type=variance_type)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    t = theirs.timesteps[5]
    check_outputs(ours.step(mo, t, x, generator=gen(1)), theirs.step(mo, t, x, generator=gen(1)), variance_type)


def test_ddpm_without_set_timesteps():
    theirs, ours = diffusers.DDPMScheduler(), fast_scheduler(diffusers.DDPMScheduler(), backend="reference")
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    check_outputs(ours.step(mo, 517, x, generator=gen(0)), theirs.step(mo, 517, x, generator=gen(0)), "t=517")


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("x0opt", list(X0_OPTIONS))
@pytest.mark.parametrize("eta,clipped", [(0.0, False), (0.7, False), (0.7, True)])
def test_ddim_step(pred, x0opt, eta, clipped):
    theirs, ours = pair("DDIMScheduler", prediction_type=pred, **X0_OPTIONS[x0opt])
    x, mo = 2 * torch.randn(SHAPE, **F64), 2 * torch.randn(SHAPE, **F64)
    noise = torch.randn(SHAPE, **F64)
    for t in (theirs.timesteps[0], theirs.timesteps[11], theirs.timesteps[-1]):
        kw = dict(eta=eta, use_clipped_model_output=clipped, variance_noise=noise if eta else None)
        check_outputs(ours.step(mo, t, x, **kw), theirs.step(mo, t, x, **kw), f"t={int(t)}")


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("churn", [{}, dict(s_churn=0.8, s_tmin=0.5, s_tmax=10.0, s_noise=1.1)])
@pytest.mark.parametrize("spacing", ["linspace", "leading"])
def test_euler_step(pred, churn, spacing):
    theirs, ours = pair("EulerDiscreteScheduler", prediction_type=pred, timestep_spacing=spacing)
    x, mo = 5 * torch.randn(SHAPE), torch.randn(SHAPE)
    for i, t in enumerate(theirs.timesteps):
        want = theirs.step(mo, t, x, generator=gen(i), **churn)
        got = ours.step(mo, t, x, generator=gen(i), **churn)
        check_outputs(got, want, f"step {i}")
        assert ours.step_index == theirs.step_index


@pytest.mark.parametrize("pred", ["epsilon", "v_prediction"])
def test_euler_ancestral_step(pred):
    theirs, ours = pair("EulerAncestralDiscreteScheduler", prediction_type=pred, steps=8)
    x, mo = 5 * torch.randn(SHAPE), torch.randn(SHAPE)
    for i, t in enumerate(theirs.timesteps):
        check_outputs(ours.step(mo, t, x, generator=gen(i)), theirs.step(mo, t, x, generator=gen(i)), f"step {i}")


@pytest.mark.parametrize("pred", ["epsilon", "sample", "v_prediction"])
@pytest.mark.parametrize("algo,solver", [("dpmsolver++", "midpoint"), ("dpmsolver++", "heun"),
                                         ("sde-dpmsolver++", "midpoint"), ("sde-dpmsolver++", "heun")])
@pytest.mark.parametrize("extra", [{}, dict(thresholding=True, sample_max_value=2.0),
                                   dict(final_sigmas_type="sigma_min", lower_order_final=False)])
def test_dpmsolver_sequence(pred, algo, solver, extra):
    theirs, ours = pair("DPMSolverMultistepScheduler", steps=6, prediction_type=pred, algorithm_type=algo,
                        solver_type=solver, **extra)
    x = 3 * torch.randn(SHAPE)
    for i, t in enumerate(theirs.timesteps):
        mo, noise = torch.randn(SHAPE), torch.randn(SHAPE)
        kw = dict(variance_noise=noise) if algo.startswith("sde") else {}
        want = theirs.step(mo, t, x, **kw)
        got = ours.step(mo, t, x, **kw)
        check_outputs(got, want, f"step {i}")
        x = want.prev_sample


def test_dpmsolver_order_one():
    theirs, ours = pair("DPMSolverMultistepScheduler", steps=5, solver_order=1)
    x = torch.randn(SHAPE)
    for t in theirs.timesteps:
        mo = torch.randn(SHAPE)
        want = theirs.step(mo, t, x)
        check_outputs(ours.step(mo, t, x), want, "order 1")
        x = want.prev_sample


# ---------------------------------------------------------------------------------------------
# Per-sample timesteps, fused guidance
# ---------------------------------------------------------------------------------------------
PER_SAMPLE = [("DDIMScheduler", dict(clip_sample=False)), ("EulerDiscreteScheduler", {}),
              ("DPMSolverMultistepScheduler", {})]


@pytest.mark.parametrize("cls,config", PER_SAMPLE)
def test_per_sample_timesteps(cls, config):
    """Deterministic kinds: sample b equals diffusers stepping it alone at its own timestep."""
    _, ours = pair(cls, **config)
    idx = [2, 9, 17]
    ts = ours.timesteps[idx]
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    got = ours.step(mo, ts, x).prev_sample
    for b, i in enumerate(idx):
        theirs, _ = pair(cls, **config)
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(i)
        want = theirs.step(mo[b:b + 1], theirs.timesteps[i], x[b:b + 1]).prev_sample
        assert_close_rel(got[b:b + 1], want, TOL32, f"sample {b} at index {i}")


@pytest.mark.parametrize("cls", ["DDPMScheduler", "EulerAncestralDiscreteScheduler"])
def test_per_sample_timesteps_noisy(cls):
    """Stochastic kinds: each sample equals diffusers' step at its own timestep with the same noise rows."""
    _, ours = pair(cls)
    idx = [1, 6, 12]
    ts = ours.timesteps[idx]
    x, mo, noise = torch.randn(SHAPE), torch.randn(SHAPE), torch.randn(SHAPE)
    got = ours.step(mo, ts, x, variance_noise=noise).prev_sample
    for b, i in enumerate(idx):
        theirs, _ = pair(cls)
        if hasattr(theirs, "set_begin_index"):
            theirs.set_begin_index(i)
        g = gen(100 + b)
        want = theirs.step(mo[b:b + 1], theirs.timesteps[i], x[b:b + 1], generator=g).prev_sample
        drawn = torch.randn(x[b:b + 1].shape, generator=gen(100 + b))
        _, single = pair(cls)
        if hasattr(single, "set_begin_index"):
            single.set_begin_index(i)
        ref = single.step(mo[b:b + 1], ts[b], x[b:b + 1], variance_noise=drawn).prev_sample
        assert_close_rel(ref, want, TOL32, f"{cls} sample {b}: fused step with diffusers' noise")
        _, single = pair(cls)
        if hasattr(single, "set_begin_index"):
            single.set_begin_index(i)
        mine = single.step(mo[b:b + 1], ts[b], x[b:b + 1], variance_noise=noise[b:b + 1]).prev_sample
        assert_close_rel(got[b:b + 1], mine, TOL32, f"{cls} sample {b}: batched vs alone")


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
@pytest.mark.parametrize("per_sample_scale", [False, True])
def test_fused_guidance(cls, per_sample_scale):
    theirs, ours = pair(cls)
    x = torch.randn(SHAPE)
    mo = torch.randn(2 * SHAPE[0], *SHAPE[1:])
    g = torch.tensor([1.0, 4.5, 7.5]) if per_sample_scale else 7.5
    u, c = mo.chunk(2)
    gb = g.reshape(-1, 1, 1, 1) if per_sample_scale else g
    for t in theirs.timesteps[:3]:
        want = theirs.step(u + gb * (c - u), t, x)
        got = ours.step(mo, t, x, guidance_scale=g)
        check_outputs(got, want, f"t={float(t)}")


def test_guidance_rescale():
    from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg

    theirs, ours = pair("DDIMScheduler")
    x = torch.randn(SHAPE)
    mo = torch.randn(2 * SHAPE[0], *SHAPE[1:])
    u, c = mo.chunk(2)
    t = theirs.timesteps[3]
    m = rescale_noise_cfg(u + 6.0 * (c - u), c, guidance_rescale=0.7)
    check_outputs(ours.step(mo, t, x, guidance_scale=6.0, guidance_rescale=0.7), theirs.step(m, t, x), "rescale")


# ---------------------------------------------------------------------------------------------
# Whole loops, API parity
# ---------------------------------------------------------------------------------------------
LOOP = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
        "DPMSolverMultistepScheduler"]


@pytest.mark.parametrize("cls", LOOP)
@pytest.mark.parametrize("guidance", [None, 3.0])
def test_ten_step_loop(cls, guidance):
    lat = torch.randn(2, 4, 8, 8)
    w = 0.1 * torch.randn(4, 4)

    def model(x, t):
        return torch.einsum("bchw,cd->bdhw", x, w) + 0.01 * t.float() * torch.arange(x.shape[0]).reshape(-1, 1, 1, 1)

    got = sample(model, fast_scheduler(getattr(diffusers, cls)(), backend="reference"), lat,
                 guidance_scale=guidance, num_inference_steps=10, generator=gen(1))
    s = getattr(diffusers, cls)()
    s.set_timesteps(10)
    g = gen(1)
    x = lat * s.init_noise_sigma
    for t in s.timesteps:
        inp = torch.cat([x, x]) if guidance is not None else x
        out = model(s.scale_model_input(inp, t), t)
        if guidance is not None:
            u, c = out.chunk(2)
            out = u + guidance * (c - u)
        x = s.step(out, t, x, **({} if cls == "DDIMScheduler" else {"generator": g})).prev_sample
    assert_close_rel(got, x, 1e-5, f"{cls} 10-step loop")


@pytest.mark.parametrize("cls", LOOP)
def test_api_parity(cls):
    theirs = getattr(diffusers, cls)()
    ours = fast_scheduler(getattr(diffusers, cls)(), backend="reference")
    assert ours.config == theirs.config and len(ours) == len(theirs)
    theirs.set_timesteps(12)
    ours.set_timesteps(12)
    assert torch.equal(ours.timesteps, theirs.timesteps)
    assert float(ours.init_noise_sigma) == float(theirs.init_noise_sigma)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    t = theirs.timesteps[0]
    assert torch.equal(ours.scale_model_input(x, t), theirs.scale_model_input(x, t))
    noise, ts = torch.randn(SHAPE), theirs.timesteps[[0, 3, 5]]
    assert torch.equal(ours.add_noise(x, noise, ts), theirs.add_noise(x, noise, ts))
    out = ours.step(mo, t, x, return_dict=False)
    want = theirs.step(mo, t, x, return_dict=False, **({} if cls == "DDIMScheduler" else {"generator": gen(0)}))
    assert isinstance(out, tuple) and len(out) == len(want)
    assert getattr(ours, "step_index", None) == getattr(theirs, "step_index", None)


def test_pred_original_sample_off():
    ours = fast_scheduler(diffusers.DDIMScheduler(), pred_original_sample=False, backend="reference")
    ours.set_timesteps(10)
    out = ours.step(torch.randn(SHAPE), ours.timesteps[0], torch.randn(SHAPE))
    assert out.pred_original_sample is None and out.prev_sample.shape == SHAPE


# ---------------------------------------------------------------------------------------------
# In-kernel noise; Triton under the interpreter
# ---------------------------------------------------------------------------------------------
def _noise_of(backend, seed, offset, shape=(2, 4, 32, 32), rng_offset=None):
    """The in-op noise of one DDPM step, recovered as (out - out_without_noise) / sigma; ``rng_offset``:
    the device-side offset a captured graph reads (``sample(cuda_graph=True)``)."""
    ours = fast_scheduler(diffusers.DDPMScheduler(clip_sample=False), seed=seed, backend=backend)
    ours.offset = offset
    if rng_offset is not None:
        ours._sf.rng_offset = torch.tensor([rng_offset])
    x, mo = torch.randn(shape), torch.randn(shape)
    t = 500
    noisy = ours.step(mo, t, x).prev_sample
    clean = ours.step(mo, t, x, variance_noise=torch.zeros(shape)).prev_sample
    sigma = float(tables.ddpm_rows(ours, "fixed_small")[t, AN])
    return (noisy - clean) / sigma


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_in_kernel_noise(backend):
    n = _noise_of(backend, seed=7, offset=3)
    assert abs(n.mean().item()) < 0.05 and abs(n.var().item() - 1.0) < 0.08, (n.mean().item(), n.var().item())
    assert abs(n[0].mean().item() - n[1].mean().item()) < 0.1  # samples get distinct streams, not copies
    assert not torch.allclose(n[0], n[1])
    torch.testing.assert_close(_noise_of(backend, seed=7, offset=3), n, rtol=0, atol=1e-5)
    assert not torch.allclose(_noise_of(backend, seed=7, offset=4), n)
    assert not torch.allclose(_noise_of(backend, seed=8, offset=3), n)
    torch.testing.assert_close(_noise_of(backend, seed=7, offset=1, rng_offset=2), n, rtol=0, atol=1e-5)


TRITON_CASES = [
    pytest.param("DDIMScheduler", dict(clip_sample=True), dict(guidance_scale=torch.tensor([2.0, 5.0, 0.5])), "per_sample",
                 marks=pytest.mark.smoke),
    ("DDPMScheduler", dict(thresholding=True, sample_max_value=2.0),
     dict(guidance_scale=3.0, guidance_rescale=0.5), "device_scalar"),
    ("EulerDiscreteScheduler", {}, dict(s_churn=1.0), "index"),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++"), {}, "per_sample"),
]


@pytest.mark.parametrize("cls,config,kw,mode", TRITON_CASES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(cls, config, kw, mode, dtype):
    shape = (3, 3, 7, 5)  # 105 elements per sample: a partial block
    res = {}
    x = torch.randn(shape).to(dtype)
    cfg = "guidance_scale" in kw
    mos = [torch.randn((6 if cfg else 3), *shape[1:]).to(dtype) for _ in range(2)]
    noise = torch.randn(shape)
    for backend in ("reference", "triton"):
        s = getattr(diffusers, cls)(**config)
        ours = fast_scheduler(s, backend=backend)
        ours.set_timesteps(10)
        outs = []
        for step in range(2):  # two steps: the DPM history is read on the second
            if mode == "per_sample":
                t = ours.timesteps[[step, step + 3, step + 5]]
            elif mode == "device_scalar":
                t = ours.timesteps[step]
            else:
                t = ours.timesteps[step]
            o = ours.step(mos[step], t, x, variance_noise=noise if cls != "EulerDiscreteScheduler" else None,
                          generator=gen(4) if cls == "EulerDiscreteScheduler" else None, **kw)
            outs.append(o.prev_sample)
        res[backend] = outs
    tol = 1e-5 if dtype == torch.float32 else 2e-3
    for step in range(2):
        assert_close_rel(res["triton"][step], res["reference"][step], tol, f"step {step}")


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_device_timestep_outside_table_gives_nan(backend):
    ours = fast_scheduler(diffusers.DDIMScheduler(), backend=backend)
    ours.set_timesteps(10)
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # a CPU tensor is checked on the host; the in-kernel path is what a device tensor takes
    coef = torch.as_tensor(tables.ddim_rows(ours, 0.0, False), dtype=torch.float32)
    out = ops.diffusion_step(x, mo, coef, -1, torch.tensor([1000.0, 5.5]), None, backend=backend)[0]
    assert torch.isnan(out).all()
    out = ops.diffusion_step(x, mo, coef, -1, torch.tensor([999, 0]), None, backend=backend)[0]
    assert not torch.isnan(out).any()


# ---------------------------------------------------------------------------------------------
# The op, the CUDA extension, bad inputs
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_opcheck(backend):
    ours = fast_scheduler(diffusers.DPMSolverMultistepScheduler())
    ours.set_timesteps(10)
    x, mo = torch.randn(2, 3, 4, 4), torch.randn(4, 3, 4, 4)
    coef = torch.as_tensor(tables.dpm_rows(ours, 2), dtype=torch.float32)
    hist = torch.randn_like(x)
    args = (x, mo[:2], mo[2:], None, None, hist, None, None, None, coef, 2, None, None, 3.0, None, None, 0, 1.0,
            None, 2, 0, 5, 1, torch.tensor([3]), torch.float32, None, torch.float16, None, backend)
    with use_backend(backend):
        torch.library.opcheck(torch.ops.seqgen_fast.diffusion_step.default, args,
                              test_utils=("test_schema", "test_faketensor"))


def test_cuda_extension_exposes_step():
    if _ext.C is None:
        pytest.skip(_ext.reason)
    assert "diffusion" in _ext.C.families and hasattr(_ext.C, "diffusion_step")


def test_cuda_backend_declines_cpu_and_dpm():
    x = torch.randn(2, 3)
    args = (x, x, None, None, None, torch.zeros_like(x), None, None, None, torch.zeros(4, NCOEF), 0, None, None, 0.0,
            None, None, 0, 1.0, None, 0, 0, 0, 0, None, x.dtype, None, x.dtype, None)
    why = ops.STEP.reasons("cuda", *args)
    assert why and any("CUDA" in w or "_C" in w or "history" in w for w in why)


def test_bad_inputs():
    ours = fast_scheduler(diffusers.DDPMScheduler(), backend="reference")
    ours.set_timesteps(10)
    x = torch.randn(SHAPE)
    t = ours.timesteps[0]
    with pytest.raises(ValueError, match="model_output"):
        ours.step(torch.randn(2, 4, 6, 5), t, x)
    with pytest.raises(ValueError, match="2B"):
        ours.step(torch.randn(SHAPE), t, x, guidance_scale=5.0)
    with pytest.raises(ValueError, match="timestep"):
        ours.step(torch.randn(SHAPE), 3, x)  # not in the 10-step schedule
    with pytest.raises(ValueError, match="timestep"):
        ours.step(torch.randn(SHAPE), 1000, x)
    with pytest.raises(ValueError, match="guidance_scale"):
        ours.step(torch.randn(6, 4, 6, 5), t, x, guidance_scale=torch.ones(4))
    eul = fast_scheduler(diffusers.EulerDiscreteScheduler(), backend="reference")
    eul.set_timesteps(10)
    with pytest.raises(ValueError, match="timestep"):
        eul.step(torch.randn(SHAPE), torch.tensor([1.0, 2.0, 3.0]), x)
    ddim = fast_scheduler(diffusers.DDIMScheduler(), backend="reference")
    with pytest.raises(ValueError, match="set_timesteps"):
        ddim.step(torch.randn(SHAPE), 10, x)


@pytest.mark.parametrize("cls,config,error", [
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="sample"), NotImplementedError),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver", solver_order=3,
                                         final_sigmas_type="sigma_min"), UnboundLocalError),
])
def test_what_diffusers_rejects_at_step_we_reject(cls, config, error):
    """Configurations diffusers builds but cannot step: the fused scheduler builds them and raises at step too."""
    for s in (getattr(diffusers, cls)(**config), fast_scheduler(getattr(diffusers, cls)(**config), backend="reference")):
        s.set_timesteps(6)
        mo, x = torch.randn(SHAPE), torch.randn(SHAPE)
        with pytest.raises(error):
            for t in s.timesteps:
                x = s.step(mo, t, x, generator=gen(0)).prev_sample


def test_unsupported_scheduler_class():
    with pytest.raises(TypeError, match="PNDMScheduler"):
        fast_scheduler(diffusers.PNDMScheduler())


def test_cuda_binding_accepts_the_launcher_arguments():
    """The launcher passes _C.diffusion_step its arguments by position: ARGS is the binding's own order (read from
    its pybind11 signature), and a call by those names with a zero batch returns before any CUDA call."""
    import re

    if _ext.C is None:
        pytest.skip(_ext.reason)
    declared = re.findall(r"(\w+): ", _ext.C.diffusion_step.__doc__.split("->")[0])
    assert tuple(declared) == diffusion_cuda.ARGS
    x = torch.randn(0, 4)
    p = diffusion_cuda.plan(x, torch.zeros(3, 8), torch.zeros(0, dtype=torch.int64), x, 1, True, 2, 1.0, device=0)
    values = diffusion_cuda.launch_args(p, x, x, torch.zeros(3, 8), -1, torch.zeros(0, dtype=torch.int64), None,
                                        None, None, x, 7.5, 2**62 + 5, 2**32 + 1, torch.zeros(1, dtype=torch.int64),
                                        x, None, 0)
    assert len(values) == len(diffusion_cuda.ARGS)
    assert _ext.C.diffusion_step(**dict(zip(diffusion_cuda.ARGS, values))) is None
    assert _ext.C.diffusion_step(*values) is None


def test_euler_rejects_integer_index():
    ours = fast_scheduler(diffusers.EulerDiscreteScheduler(), backend="reference")
    ours.set_timesteps(5)
    with pytest.raises(ValueError, match="timestep"):
        ours.step(torch.randn(SHAPE), 3, torch.randn(SHAPE))


def test_sample_bad_arguments():
    s = diffusers.DDIMScheduler()
    with pytest.raises(ValueError, match="cuda_graph"):
        sample(lambda x, t: x, s, torch.randn(2, 3), num_inference_steps=4, cuda_graph=True)
    with pytest.raises(ValueError, match="num_inference_steps"):
        sample(lambda x, t: x, s, torch.randn(2, 3), num_inference_steps=0)


def _sm90_specialisation(fp, lookup, noise, hist, strided):
    """(types, constexprs, aligned) of the kernel as Triton's JIT specialises a launch of ``kernels.diffusion.plan``
    (dead pointers and strides None, i.e. constexpr; integers i32 or i64 by value, D when divisible by 16; the
    per-call key, seed and offsets int64 by annotation)."""
    from seqgen_fast._contract import NCOEF
    from seqgen_fast.kernels import diffusion as kd

    B, shape = 2, (2, 4, 64, 64)
    x = torch.randn(shape).to(fp)
    mo = torch.randn((2 * B, *shape[1:])).to(fp)
    if strided:
        x = x.contiguous(memory_format=torch.channels_last)
    u, k = mo[:B], mo[B:]
    h = [torch.randn(shape).to(fp) for _ in range(hist)] + [None] * (3 - hist)
    f32 = torch.zeros(B)
    ts = torch.zeros(B, dtype=torch.int64) if lookup else None
    outs = (torch.empty(shape, dtype=fp), torch.empty(shape, dtype=fp) if hist == 0 else x.new_empty(0),
            torch.empty(shape, dtype=fp) if hist else x.new_empty(0), torch.empty(shape, dtype=fp) if hist == 3
            else x.new_empty(0))
    args = (x, u, k, torch.randn(shape).to(fp) if noise else None, h[0] if hist == 3 else None, *h,
            torch.randn(shape).to(fp) if noise == 1 else None, torch.zeros(50, NCOEF), -1 if lookup else 3, ts,
            torch.zeros(50) if lookup == 2 else None, 7.5, f32 if lookup else None, f32 if lookup else None,
            lookup, 1.0, f32 if lookup == 2 else None, noise, 2 if noise else 0, 5, 9,
            torch.zeros(1, dtype=torch.int64) if noise == 2 else None, fp, *(t.dtype if t.numel() else None
                                                                             for t in outs[1:]))
    p = kd.plan(*args, outputs=outs, strided=strided)
    geo = torch.zeros(4 + 4 * 9, dtype=torch.int64) if strided else None
    names = kd._step_kernel.arg_names
    values = dict(zip(names, kd.slots(args, outs, geo) + (3, 5, 9, 0, 7.5) + p.static, strict=True))
    flags = names[names.index("LOOKUP"):]
    const = {n: None if i < len(kd.SLOTS) and i not in p.live else values[n] for i, n in enumerate(names)
             if n in flags or values[n] is None or i < len(kd.SLOTS) and i not in p.live}
    tname = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.int64: "i64"}
    types = {n: "*" + tname[v.dtype] if isinstance(v, torch.Tensor) else "fp32" if isinstance(v, float) else
             "i64" if n in ("key", "seed", "off_lo", "off_hi") or not -2**31 <= v < 2**31 else "i32"
             for n, v in values.items() if n not in const}
    aligned = tuple(n for n, v in values.items() if n not in const and type(v) is int and v % 16 == 0
                    and n not in ("key", "seed", "off_lo", "off_hi", "B", "rows", "n_sched", "ts_stride"))
    return types, const, aligned


@pytest.mark.parametrize("dt,lookup,noise,hist,strided", [("fp16", 0, 0, 0, 0), ("fp32", 1, 2, 0, 1),
                                                            ("bf16", 2, 1, 3, 0)])
def test_triton_kernel_compiles_for_sm90(dt, lookup, noise, hist, strided):
    """The interpreter hides compile errors: compile the kernel for sm_90 (ptxas, no GPU needed) as the JIT
    specialises the launches of ``kernels.diffusion.plan``, and check that its element accesses are 16-byte
    vectors on the flat path and that nothing spills."""
    import re

    from seqgen_fast.kernels import diffusion as kd

    fp = {"fp16": torch.float16, "fp32": torch.float32, "bf16": torch.bfloat16}[dt]
    types, const, aligned = _sm90_specialisation(fp, lookup, noise, hist, strided)
    facts = compile_sm90("seqgen_fast.kernels.diffusion", "_step_kernel", types=types, constexprs=const,
                         aligned=aligned, num_warps=kd.NUM_WARPS)
    accesses = set(re.findall(r"(?:ld|st)\.global[.\w]*", facts["ptx"]))
    assert "st.global.v4.b32" in accesses, accesses
    if not strided:
        assert "ld.global.v4.b32" in accesses, accesses
    assert facts["spill_bytes"] == 0, facts["spill_bytes"]
    # the non-finite policy, compiled: no NaN-dropping float min/max (tl.minimum/maximum without
    # propagate_nan) on a value path; the in-kernel noise's max.f32 is tl.random's clamp of uniforms
    # drawn from bits, which cannot be NaN
    assert noise == 2 or not sass.NAN_DROPPING_PTX.search(facts["ptx"])
