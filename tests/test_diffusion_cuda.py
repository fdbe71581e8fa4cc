"""Fused diffusion steps on the GPU (marker ``gpu``): the Triton and CUDA kernels against the float64
reference, in-kernel noise statistics, no host sync in a step, the pre-bound launch, and CUDA-graph capture of
sample() (nothing built inside the capture)."""
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from seqgen_fast._contract import AN  # noqa: E402
from seqgen_fast.diffusion import fast_scheduler, sample, tables  # noqa: E402
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
    return (noisy - clean) / float(tables.ddpm_rows(fs, "fixed_small")[500, AN])


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


def test_cuda_generator_keys_the_noise_and_advances_like_a_draw():
    fs = fast_scheduler(diffusers.DDPMScheduler(clip_sample=False), backend="triton")
    x = torch.randn(4, 4, 32, 32, device="cuda")
    mo = torch.randn_like(x)
    g = torch.Generator(device="cuda").manual_seed(3)
    a = fs.step(mo, 500, x, generator=g).prev_sample
    probe = torch.Generator(device="cuda").manual_seed(3)
    torch.randn(x.shape, device="cuda", generator=probe)
    assert g.get_offset() == probe.get_offset(), "the generator advances as torch.randn of that size advances it"
    assert torch.equal(fs.step(mo, 500, x, generator=torch.Generator(device="cuda").manual_seed(3)).prev_sample, a)
    assert not torch.allclose(fs.step(mo, 500, x, generator=g).prev_sample, a)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["channels_last", "sliced"])
@pytest.mark.parametrize("cls", ["DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_strided_layouts_on_the_kernel(dtype, layout, cls):
    view = {"channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
            "sliced": lambda t: torch.stack([t, t], dim=-1).flatten(-2)[..., ::2]}[layout]
    outs = {}
    for backend in ("triton", "reference"):
        torch.manual_seed(0)
        fs = fast_scheduler(getattr(diffusers, cls)(), backend=backend)
        fs.set_timesteps(6, device="cuda")
        x = torch.randn(3, 4, 24, 24, device="cuda").to(dtype)
        res = []
        for t in fs.timesteps[:3]:
            mo = torch.randn(6, 4, 24, 24, device="cuda").to(dtype)
            x = fs.step(view(mo), t, view(x), guidance_scale=4.0).prev_sample
            res.append(x.float())
        outs[backend] = res
    for i, (a, b) in enumerate(zip(outs["triton"], outs["reference"])):
        assert_close_rel(a, b, TOL[dtype] * 4, f"{cls} {layout} step {i}")


@pytest.mark.smoke
def test_flow_matching_video_latents_bf16_cfg():
    fs = fast_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=5.0), backend="triton")
    fs.set_timesteps(50, device="cuda")
    x = torch.randn(2, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    mo = torch.randn(4, 16, 21, 60, 104, device="cuda", dtype=torch.bfloat16)
    t = fs.timesteps[7]
    fs.set_begin_index(7)
    got = fs.step(mo, t, x, guidance_scale=5.0).prev_sample
    u, c = mo.double().chunk(2)
    dt = float(fs.sigmas[8]) - float(fs.sigmas[7])
    want = x.double() + dt * (u + 5.0 * (c - u))
    assert got.dtype == torch.bfloat16
    assert_close_rel(got.double(), want, TOL[torch.bfloat16], "flow Euler CFG bf16")


@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_prebound_launch_matches_the_jit_launch(dtype):
    """The second step of a plan calls Triton's compiled launcher directly (kernels.diffusion.launch): its
    result is the JIT launch's, bit for bit, for aligned and misaligned inputs and with a launch hook
    (which sends every launch through the JIT)."""
    import triton

    from seqgen_fast.kernels import diffusion as kd
    from seqgen_fast.ops import diffusion as ops

    fs = fast_scheduler(diffusers.DDIMScheduler(), backend="triton")
    fs.set_timesteps(10, device="cuda")
    x = torch.randn(3, 4, 24, 24, device="cuda").to(dtype)
    mo = torch.randn(6, 4, 24, 24, device="cuda").to(dtype)
    odd = torch.empty(x.numel() + 1, device="cuda", dtype=dtype)[1:].view(x.shape).copy_(x)
    t = fs.timesteps[3]
    for xin in (x, odd):
        first = fs.step(mo, t, xin, guidance_scale=6.0).prev_sample
        again = fs.step(mo, t, xin, guidance_scale=6.0).prev_sample
        assert torch.equal(first, again)
    plans = [p for p in ops._plans.values() if p.backend == "triton" and p.launch[1] is not None]
    assert any(len(p.launch[1].bound) == 2 for p in plans), "aligned and misaligned inputs: two compiled kernels"
    hook = triton.knobs.runtime.launch_enter_hook
    seen = []
    hook.add(seen.append)
    try:
        hooked = fs.step(mo, t, x, guidance_scale=6.0).prev_sample
    finally:
        hook.remove(seen.append)
    assert seen and torch.equal(hooked, fs.step(mo, t, x, guidance_scale=6.0).prev_sample)
    assert kd._DRIVER, "the pre-bound path is armed after the first JIT launch"


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DDPMScheduler", "DPMSolverMultistepScheduler"])
def test_sample_capture_builds_nothing(cls, monkeypatch):
    """Inside the capture of sample(cuda_graph=True) each step makes one launch, and no plan, table or launch
    configuration is built and no launch goes through Triton's JIT: the eager warm-up (with the capture's
    device offset) built them all."""
    from seqgen_fast.diffusion import schedulers
    from seqgen_fast.kernels import diffusion as kd
    from seqgen_fast.ops import diffusion as ops

    during = []

    def spy(name, fn):
        def wrapped(*args, **kwargs):
            during.append((name, torch.cuda.is_current_stream_capturing()))
            return fn(*args, **kwargs)
        return wrapped

    monkeypatch.setattr(ops, "_plans", {})
    monkeypatch.setattr(ops._Plan, "build", classmethod(spy("plan", ops._Plan.build.__func__)))
    monkeypatch.setattr(kd, "plan", spy("launch plan", kd.plan))
    kernel = kd._step_kernel
    monkeypatch.setattr(kd, "_step_kernel", type("K", (), {"__getitem__": lambda self, grid: spy(
        "jit", kernel[grid])})())
    monkeypatch.setattr(schedulers.tables, "host", spy("table", schedulers.tables.host))
    monkeypatch.setattr(kd, "launch", spy("launch", kd.launch))
    w = torch.randn(4, 4, device="cuda") * 0.1
    lat = torch.randn(2, 4, 16, 16, device="cuda")
    sample(lambda x, t: torch.einsum("bchw,cd->bdhw", x, w), fast_scheduler(getattr(diffusers, cls)()), lat,
           guidance_scale=3.0, num_inference_steps=8, cuda_graph=True)
    captured = [name for name, capturing in during if capturing]
    assert captured == ["launch"] * 8, during  # one fused-step launch per captured step, and nothing built
