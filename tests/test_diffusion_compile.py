"""The fused scheduler steps inside ``torch.compile(fullgraph=True)`` (``seqgen_fast.diffusion.compiled``).

A compiled loop gives the eager fused loop's samples (and so diffusers'), noise included, and leaves
diffusers' state as the eager loop leaves it. It compiles at most twice per loop, and new schedules add
a bounded number of frames. An eager step after compiled ones continues the same loop. The device
counters it leaves behave as ints for diffusers' own methods. On the CPU the compile backend is
``aot_eager``; ``test_compose.py`` runs the same steps with inductor under ``-m gpu``.
"""
import copy
import math
import pickle
import warnings

import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

diffusers = pytest.importorskip("diffusers")

from seqgen_fast.diffusion import fast_scheduler  # noqa: E402
from seqgen_fast.diffusion.compiled import DeviceCounter  # noqa: E402

warnings.filterwarnings("ignore", category=FutureWarning)
warnings.filterwarnings("ignore", message="The `scale_model_input` function should be called")
SHAPE = (2, 3, 4, 5)
STEPS = 8

# (class, config, step keywords): every kind, its noisy variants, and the multistep solvers' orders
CASES = [
    ("DDPMScheduler", {}, {}),
    ("DDPMScheduler", {"thresholding": True, "sample_max_value": 2.5}, {}),  # the quantile pass
    ("DDIMScheduler", {}, {}),
    ("DDIMScheduler", {}, {"eta": 0.7}),
    ("EulerDiscreteScheduler", {}, {}),
    ("EulerDiscreteScheduler", {}, {"s_churn": 1.0, "s_tmin": 0.0, "s_tmax": math.inf}),  # churn on every row
    ("EulerAncestralDiscreteScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {}, {}),
    ("DPMSolverMultistepScheduler", {"solver_order": 3}, {}),
    ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++"}, {}),
    ("DPMSolverMultistepScheduler", {"final_sigmas_type": "sigma_min", "lower_order_final": False}, {}),
    ("UniPCMultistepScheduler", {}, {}),
    ("UniPCMultistepScheduler", {"solver_order": 3, "disable_corrector": [2]}, {}),
    ("UniPCMultistepScheduler", {"predict_x0": False, "solver_type": "bh1", "final_sigmas_type": "sigma_min"}, {}),
    ("LCMScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {}, {}),
    ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, {}),
]
IDS = [f"{c}-{'-'.join(f'{k}={v}' for k, v in {**cfg, **kw}.items()) or 'default'}" for c, cfg, kw in CASES]


def pair(cls, config, seed=1234, backend="reference"):
    """An eager and a to-be-compiled fused scheduler on equal diffusers schedulers, with the same noise seed."""
    return [fast_scheduler(getattr(diffusers, cls)(**config), seed=seed, backend=backend) for _ in range(2)]


def compiled_step(fs, kw, counter):
    def step(mo, i, x):
        return fs.step(mo, fs.timesteps[i], x, **kw).prev_sample
    return torch.compile(step, backend=counter, fullgraph=True)


def loop(eager, fs, kw, counter, compiled_steps, steps=STEPS, seed=0, device="cpu"):
    """Both schedulers through ``steps`` steps from one sample: ``eager`` always eagerly; ``fs`` compiled for its
    first ``compiled_steps`` steps, eagerly after. Each step's samples are compared."""
    g = torch.Generator().manual_seed(seed)
    x = 3 * torch.randn(SHAPE, generator=g).to(device)
    xe = xc = x
    step = compiled_step(fs, kw, counter)
    for i in range(steps):
        mo = torch.randn(SHAPE, generator=g).to(device)
        xe = eager.step(mo, eager.timesteps[i], xe, **kw).prev_sample
        xc = step(mo, i, xc) if i < compiled_steps else fs.step(mo, fs.timesteps[i], xc, **kw).prev_sample
        assert torch.isfinite(xe).all()
        torch.testing.assert_close(xc, xe, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {i}: {m}")
    return xe, xc


def assert_same_state(eager, fs):
    for name in ("step_index", "lower_order_nums", "this_order"):
        if hasattr(eager, name):
            mine, theirs = getattr(fs, name), getattr(eager, name)
            assert (None if mine is None else int(mine)) == theirs, name
    for mine, theirs in zip(getattr(fs, "model_outputs", ()), getattr(eager, "model_outputs", ())):
        if theirs is not None:  # the compiled loop fills diffusers' unused slots with zeros
            torch.testing.assert_close(mine, theirs, rtol=1e-5, atol=1e-5)
    if getattr(eager, "last_sample", None) is not None:
        torch.testing.assert_close(fs.last_sample, eager.last_sample, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls,config,kw", CASES, ids=IDS)
def test_compiled_loop_matches_the_eager_loop(cls, config, kw):
    eager, fs = pair(cls, config)
    eager.set_timesteps(STEPS)
    fs.set_timesteps(STEPS)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    loop(eager, fs, kw, counter, compiled_steps=STEPS)
    assert counter.frame_count <= 2, f"{counter.frame_count} compiled frames over {STEPS} steps"
    assert_same_state(eager, fs)


@pytest.mark.parametrize("cls,config,kw", CASES[::2], ids=IDS[::2])
def test_eager_steps_continue_a_compiled_loop(cls, config, kw):
    """The counters come back to ints and the compiled steps' noise offsets are carried on: the loop is the
    all-eager one, noise included."""
    eager, fs = pair(cls, config)
    eager.set_timesteps(STEPS)
    fs.set_timesteps(STEPS)
    torch._dynamo.reset()
    loop(eager, fs, kw, CompileCounterWithBackend("aot_eager"), compiled_steps=STEPS // 2)
    assert_same_state(eager, fs)
    assert all(type(fs.__dict__.get(n)) is not DeviceCounter for n in ("_step_index", "lower_order_nums"))


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                 "DDIMScheduler"])
def test_new_schedules_add_a_bounded_number_of_frames(cls):
    """set_timesteps rebuilds the tables the loop used: the first schedule compiles twice (tables built while
    tracing), the second twice more (tables present), and later ones reuse those graphs, at any length."""
    eager, fs = pair(cls, {})
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    frames = []
    for n, seed in [(STEPS, 0), (STEPS + 3, 1), (STEPS, 2), (STEPS - 2, 3)]:
        eager.set_timesteps(n)
        fs.set_timesteps(n)
        loop(eager, fs, {}, counter, compiled_steps=n, steps=n, seed=seed)
        frames.append(counter.frame_count)
    assert frames[0] <= 2 and frames[-1] <= 6 and frames[-1] == frames[-2], frames


def test_diffusers_own_methods_read_the_device_counters():
    eager, fs = pair("EulerDiscreteScheduler", {})
    eager.set_timesteps(STEPS)
    fs.set_timesteps(STEPS)
    torch._dynamo.reset()
    loop(eager, fs, {}, CompileCounterWithBackend("aot_eager"), compiled_steps=3, steps=3)
    assert type(fs.step_index) is DeviceCounter
    x = torch.randn(SHAPE)
    t = fs.timesteps[3]
    torch.testing.assert_close(fs.scale_model_input(x, t), eager.scale_model_input(x, t))
    assert fs.step_index == 3 and fs.step_index < 4 and fs.step_index + 1 == 4 and [0, 1, 2, 3][fs.step_index] == 3
    assert copy.deepcopy(fs).step_index == 3 and type(pickle.loads(pickle.dumps(fs)).step_index) is int


def test_a_compiled_step_past_the_schedule_gives_nan():
    """Eagerly an error; compiled, where the check would need a host sync, a NaN sample."""
    _, fs = pair("EulerDiscreteScheduler", {})
    fs.set_timesteps(3)
    fs.set_begin_index(0)  # the step index, not the timestep passed, says where the loop is
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    step = torch.compile(lambda mo, x: fs.step(mo, fs.timesteps[0], x).prev_sample, backend=counter, fullgraph=True)
    x = torch.randn(SHAPE)
    for _ in range(3):
        assert torch.isfinite(step(torch.randn(SHAPE), x)).all()
    assert torch.isnan(step(torch.randn(SHAPE), x)).all()
    with pytest.raises(ValueError, match="past the end of the schedule"):
        fs.step(torch.randn(SHAPE), fs.timesteps[-1], x)


def test_classifier_free_guidance_compiles():
    eager, fs = pair("DPMSolverMultistepScheduler", {})
    for s in (eager, fs):
        s.set_timesteps(STEPS)
    counter = CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    step = torch.compile(lambda mo, i, x: fs.step(mo, fs.timesteps[i], x, guidance_scale=4.5).prev_sample,
                         backend=counter, fullgraph=True)
    x = xe = torch.randn(SHAPE)
    for i in range(STEPS):
        mo = torch.randn(2 * SHAPE[0], *SHAPE[1:])
        x, xe = step(mo, i, x), eager.step(mo, eager.timesteps[i], xe, guidance_scale=4.5).prev_sample
        torch.testing.assert_close(x, xe, rtol=1e-5, atol=1e-5)
    assert counter.frame_count <= 2


def test_a_compiled_lcm_step_off_its_timestep_gives_nan():
    """LCM computes with the timestep passed: eagerly one off ``timesteps[step_index]`` gets a row of its own;
    compiled, where finding it would need a host sync, the sample is NaN rather than silently the index's row."""
    eager, fs = pair("LCMScheduler", {})
    for s in (eager, fs):
        s.set_timesteps(4)
    torch._dynamo.reset()
    step = torch.compile(lambda mo, t, x: fs.step(mo, t, x).prev_sample, backend="aot_eager", fullgraph=True)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    torch.testing.assert_close(step(mo, fs.timesteps[0], x), eager.step(mo, eager.timesteps[0], x).prev_sample)
    assert torch.isnan(step(mo, fs.timesteps[0] - 7, x)).all()
    assert torch.isfinite(eager.step(mo, eager.timesteps[1] - 7, x).prev_sample).all()


@pytest.mark.gpu
@pytest.mark.parametrize("cls,config,kw", CASES, ids=IDS)
def test_gpu_compiled_loop_matches_the_eager_loop(cls, config, kw):
    """inductor on CUDA, the automatic backend (the CUDA or Triton kernels) in both loops."""
    eager, fs = pair(cls, config, backend=None)
    eager.set_timesteps(STEPS, device="cuda")
    fs.set_timesteps(STEPS, device="cuda")
    counter = CompileCounterWithBackend("inductor")
    torch._dynamo.reset()
    loop(eager, fs, kw, counter, compiled_steps=STEPS, device="cuda")
    assert counter.frame_count <= 2, f"{counter.frame_count} compiled frames over {STEPS} steps"
    assert_same_state(eager, fs)
