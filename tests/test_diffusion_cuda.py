"""Fused diffusion steps on the GPU (marker ``gpu``): the Triton and CUDA kernels against the float64
reference, in-kernel noise statistics, no host sync in a step, and CUDA-graph capture of sample()."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from seqgen_fast.diffusion import fast_scheduler, sample  # noqa: E402
from support.utils import assert_close_rel  # noqa: E402

pytestmark = pytest.mark.gpu

TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _run(cls, config, backend, dtype, shape, steps_kw, n_steps=2, per_sample=False, cfg=None, seed=0):
    """Two steps of `cls` on fixed inputs; float64 inputs when backend is reference (the ground truth)."""
    g = torch.Generator(device="cuda").manual_seed(seed)
    B = shape[0]
    x = torch.randn(shape, device="cuda", generator=g)
    mos = [torch.randn((2 * B if cfg is not None else B), *shape[1:], device="cuda", generator=g)
           for _ in range(n_steps)]
    noises = [torch.randn(shape, device="cuda", generator=g) for _ in range(n_steps)]
    store = torch.float64 if backend == "reference" else dtype
    # quantize inputs to the kernel dtype first, so both sides see the same values
    x = x.to(dtype).to(store)
    mos = [m.to(dtype).to(store) for m in mos]
    fs = fast_scheduler(getattr(diffusers, cls)(**config), backend=backend)
    fs.set_timesteps(10, device="cuda")
    outs = []
    for i in range(n_steps):
        t = fs.timesteps[torch.arange(B, device="cuda") % 4 + i] if per_sample else fs.timesteps[i]
        o = fs.step(mos[i], t, x, guidance_scale=cfg, variance_noise=noises[i].to(store), **steps_kw)
        outs.append(o.prev_sample)
    return outs


CASES = [
    ("DDPMScheduler", dict(clip_sample=True), {}),
    ("DDPMScheduler", dict(thresholding=True, sample_max_value=2.0, prediction_type="v_prediction"), {}),
    pytest.param("DDIMScheduler", dict(clip_sample=False), dict(eta=0.5), marks=pytest.mark.smoke),
    ("DDIMScheduler", dict(prediction_type="sample"), dict(eta=0.0, use_clipped_model_output=True)),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,config,kw", CASES)
@pytest.mark.parametrize("per_sample", [False, True])
@pytest.mark.parametrize("cfg", [None, 7.5])
@pytest.mark.parametrize("shape", [(4, 4, 32, 32), (3, 5, 7, 9)])  # vectorized and element-wise paths
def test_ddpm_ddim_kernels(kernel_backend, dtype, cls, config, kw, per_sample, cfg, shape):
    got = _run(cls, config, kernel_backend, dtype, shape, kw, per_sample=per_sample, cfg=cfg)
    want = _run(cls, config, "reference", dtype, shape, kw, per_sample=per_sample, cfg=cfg)
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == dtype
        assert_close_rel(a, b, TOL[dtype], f"{kernel_backend} {cls} step {i}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("cls,config,kw", [
    ("EulerDiscreteScheduler", {}, dict(s_churn=0.5)),
    ("EulerAncestralDiscreteScheduler", dict(prediction_type="v_prediction"), {}),
    ("DPMSolverMultistepScheduler", dict(thresholding=True, sample_max_value=3.0), {}),
    ("DPMSolverMultistepScheduler", dict(algorithm_type="sde-dpmsolver++", solver_type="heun"), {}),
])
@pytest.mark.parametrize("per_sample", [pytest.param(False, marks=pytest.mark.smoke), True])
def test_euler_dpm_kernels(kernel_backend, dtype, cls, config, kw, per_sample):
    """Triton takes every Euler/DPM step; the cuda kernel the Euler steps at a host step index (auto dispatch
    sends those to it) and declines the rest (schedule search, DPM history)."""
    if kernel_backend == "cuda" and (per_sample or cls.startswith("DPM")):
        pytest.skip("Triton-only: timestep search / DPM-Solver history")
    shape = (4, 4, 24, 24)
    got = _run(cls, config, kernel_backend, dtype, shape, kw, n_steps=3, per_sample=per_sample, cfg=5.0)
    want = _run(cls, config, "reference", dtype, shape, kw, n_steps=3, per_sample=per_sample, cfg=5.0)
    for i, (a, b) in enumerate(zip(got, want)):
        assert_close_rel(a, b, TOL[dtype] * 2, f"{kernel_backend} {cls} step {i}")


def _noise(backend, seed, offset, dtype=torch.float32):
    fs = fast_scheduler(diffusers.DDPMScheduler(clip_sample=False), seed=seed, backend=backend)
    fs.offset = offset
    shape = (4, 8, 64, 64)
    x = torch.randn(shape, device="cuda").to(dtype)
    mo = torch.randn(shape, device="cuda").to(dtype)
    noisy = fs.step(mo, 500, x).prev_sample.float()
    clean = fs.step(mo, 500, x, variance_noise=torch.zeros_like(x)).prev_sample.float()
    return (noisy - clean) / float(fs._table(x.device, {}).rows[500, 6])


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_in_kernel_noise(kernel_backend, dtype):
    n = _noise(kernel_backend, 11, 2, dtype)
    tol = 0.02 if dtype == torch.float32 else 0.05
    assert abs(n.mean().item()) < tol and abs(n.std().item() - 1.0) < tol
    # normal tails: about 0.27% beyond 3 sigma
    assert 0.0015 < (n.abs() > 3).float().mean().item() < 0.004
    assert torch.equal(_noise(kernel_backend, 11, 2, dtype), n)
    assert not torch.equal(_noise(kernel_backend, 11, 3, dtype), n)
    assert abs(torch.corrcoef(torch.stack([n[0].flatten(), n[1].flatten()]))[0, 1].item()) < 0.02


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DPMSolverMultistepScheduler"])
def test_step_does_not_sync(cls):
    fs = fast_scheduler(getattr(diffusers, cls)(), backend="triton")
    fs.set_timesteps(10, device="cuda")
    fs.rewind()
    x = torch.randn(2, 4, 16, 16, device="cuda")
    mo = torch.randn(4, 4, 16, 16, device="cuda")
    per_sample_t = fs.timesteps[torch.tensor([2, 3], device="cuda")]
    per_sample_g = torch.tensor([1.0, 2.0], device="cuda")
    for i in range(2):  # compile, and build the tables (first and second order) outside the check
        fs.step(mo, fs.timesteps[i], x, guidance_scale=5.0)
    if cls == "DDIMScheduler":
        fs.step(mo, per_sample_t, x, guidance_scale=per_sample_g)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        fs.step(mo, fs.timesteps[2], x, guidance_scale=5.0)
        if cls == "DDIMScheduler":
            fs.step(mo, per_sample_t, x, guidance_scale=per_sample_g)
    finally:
        torch.cuda.set_sync_debug_mode(0)


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DPMSolverMultistepScheduler", "EulerDiscreteScheduler"])
def test_sample_cuda_graph(cls):
    w = torch.randn(4, 4, device="cuda") * 0.1

    def model(x, t):
        return torch.einsum("bchw,cd->bdhw", x, w) + 1e-3 * t.float()

    lat = torch.randn(2, 4, 32, 32, device="cuda")
    fs = fast_scheduler(getattr(diffusers, cls)())
    eager = sample(model, fs, lat, guidance_scale=4.0, num_inference_steps=12)
    first = sample(model, fs, lat, guidance_scale=4.0, num_inference_steps=12, cuda_graph=True)
    replay = sample(model, fs, lat, guidance_scale=4.0, num_inference_steps=12, cuda_graph=True)
    assert_close_rel(first, eager, 1e-6, "first graph call (eager warm-up)")
    assert_close_rel(replay, eager, 1e-5, "graph replay")
    lat2 = torch.randn_like(lat)
    assert_close_rel(sample(model, fs, lat2, guidance_scale=4.0, num_inference_steps=12, cuda_graph=True),
                     sample(model, fs, lat2, guidance_scale=4.0, num_inference_steps=12), 1e-5, "new latents")


def test_sample_cuda_graph_replays_draw_fresh_noise():
    """DDPM draws noise every step: each replay must draw a new stream -- exactly the one an eager
    loop starting at the same scheduler offset draws -- not the noise baked in at capture."""
    w = torch.randn(4, 4, device="cuda") * 0.1

    def model(x, t):
        return torch.einsum("bchw,cd->bdhw", x, w) + 1e-3 * t.float()

    lat = torch.randn(2, 4, 16, 16, device="cuda")
    fs = fast_scheduler(diffusers.DDPMScheduler(), seed=5)
    first = sample(model, fs, lat, num_inference_steps=10, cuda_graph=True)  # eager run (offset 0) + capture
    per_loop = fs.offset
    assert per_loop > 0
    replays = [sample(model, fs, lat, num_inference_steps=10, cuda_graph=True) for _ in range(2)]
    assert fs.offset == 3 * per_loop  # each replay advances the offset as an eager loop does
    assert not torch.allclose(replays[0], replays[1]) and not torch.allclose(replays[0], first)
    fs.offset = 2 * per_loop
    assert_close_rel(replays[1], sample(model, fs, lat, num_inference_steps=10), 1e-5, "second replay vs eager")
