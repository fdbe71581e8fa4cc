"""fast_scheduler as a drop-in: the class, the state, the signature, the generator, diffusers' argument rules,
memory layouts, and the configurations of every supported scheduler against diffusers itself (CPU: reference
and Triton-interpreter backends)."""
import copy
import inspect
import pickle
import warnings

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from seqgen_fast.diffusion import fast_scheduler  # noqa: E402
from seqgen_fast.diffusion.schedulers import fast_class  # noqa: E402
from seqgen_fast.ops import diffusion as ops  # noqa: E402
from support.utils import assert_close_rel  # noqa: E402

warnings.filterwarnings("ignore", message="The `scale_model_input` function should be called")
warnings.filterwarnings("ignore", category=FutureWarning)
SHAPE = (3, 4, 6, 5)
TOL = 3e-6
ALL = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
       "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler", "FlowMatchEulerDiscreteScheduler"]


def gen(seed):
    return torch.Generator().manual_seed(seed)


def run_both(cls, config, steps=6, backend="reference", shape=SHAPE, mo_channels=None, set_steps=True, kw=None,
             dtype=torch.float32, mo_dtype=None, layout=None, seed=0):
    """Step diffusers' scheduler and the fused one side by side (same generator seeds); returns both sequences."""
    torch.manual_seed(seed)
    theirs = getattr(diffusers, cls)(**config)
    ours = fast_scheduler(getattr(diffusers, cls)(**config), backend=backend)
    if set_steps:
        theirs.set_timesteps(steps)
        ours.set_timesteps(steps)
    ts = list(theirs.timesteps[:steps])
    x = (3 * torch.randn(shape)).to(dtype)
    a, b = [], []
    xa = xb = x
    for i, t in enumerate(ts):
        mo_shape = (shape[0], mo_channels or shape[1], *shape[2:])
        mo = torch.randn(mo_shape).to(mo_dtype or dtype)
        extra = dict(kw or {})
        has_gen = "generator" in inspect.signature(theirs.step).parameters
        ya = theirs.step(mo, t, xa, **extra, **({"generator": gen(i)} if has_gen else {})).prev_sample
        xin = xb if layout is None else layout(xb)
        mo_in = mo if layout is None else layout(mo)
        yb = ours.step(mo_in, t, xin, **extra, **({"generator": gen(i)} if has_gen else {})).prev_sample
        a.append(ya)
        b.append(yb)
        xa, xb = ya, ya.clone()
    return a, b, theirs, ours


def assert_same_steps(a, b, tol=TOL, what=""):
    for i, (ya, yb) in enumerate(zip(a, b)):
        assert yb.dtype == ya.dtype, f"{what} step {i}: dtype {yb.dtype} != diffusers' {ya.dtype}"
        assert_close_rel(yb, ya, tol, f"{what} step {i}")


# ---------------------------------------------------------------------------------------------
# The class and its state
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ALL)
def test_instance_of_the_wrapped_class(cls, tmp_path):
    plain = getattr(diffusers, cls)()
    fast = fast_scheduler(plain)
    assert isinstance(fast, type(plain)) and type(fast).__name__ == cls and type(fast).__module__ == type(plain).__module__
    assert fast.config == plain.config
    assert [c.__name__ for c in fast.compatibles] == [c.__name__ for c in plain.compatibles]
    assert type(type(fast).from_config(fast.config)) is type(fast)
    fast.save_pretrained(tmp_path)
    again = type(fast).from_pretrained(tmp_path)
    assert type(again) is type(fast) and dict(again.config) == {k: v for k, v in fast.config.items()
                                                                if k != "_use_default_values"}
    assert type(getattr(diffusers, cls).from_pretrained(tmp_path)) is type(plain)  # the saved config is diffusers'
    for clone in (copy.deepcopy(fast), pickle.loads(pickle.dumps(fast))):
        assert type(clone) is type(fast) and clone.config == fast.config and clone.seed == fast.seed
    assert "does_not_exist" in str(pytest.raises(AttributeError, lambda: fast.does_not_exist).value)


def test_attribute_writes_reach_diffusers_state():
    plain = diffusers.DPMSolverMultistepScheduler()
    fast = fast_scheduler(plain)
    fast.set_timesteps(10)
    assert plain.num_inference_steps == 10 and plain.timesteps is fast.timesteps
    fast._step_index = 4
    fast.lower_order_nums = 0
    assert plain.step_index == 4 and plain.lower_order_nums == 0
    plain.model_outputs = [torch.ones(SHAPE), torch.ones(SHAPE)]
    assert fast.model_outputs is plain.model_outputs
    fast.step(torch.randn(SHAPE), fast.timesteps[4], torch.randn(SHAPE))
    assert plain.step_index == 5 and plain.lower_order_nums == 1 and plain.model_outputs[0] is not None


def test_subclasses():
    class Mine(diffusers.DDIMScheduler):
        pass

    fast = fast_scheduler(Mine(clip_sample=False))
    assert isinstance(fast, Mine) and type(fast).__name__ == "Mine"

    class Custom(diffusers.DDIMScheduler):
        def step(self, *args, **kwargs):
            return super().step(*args, **kwargs)

    with pytest.raises(TypeError, match="overrides DDIMScheduler.step"):
        fast_scheduler(Custom())
    with pytest.raises(TypeError, match="PNDMScheduler"):
        fast_scheduler(diffusers.PNDMScheduler())


@pytest.mark.parametrize("cls", ALL)
def test_step_signature_is_the_wrapped_one_plus_extras(cls):
    plain = getattr(diffusers, cls)()
    theirs = inspect.signature(plain.step).parameters
    ours = inspect.signature(fast_scheduler(plain).step).parameters
    assert list(ours)[:len(theirs)] == list(theirs)
    assert all(ours[n].default == p.default or ours[n].default is p.default for n, p in theirs.items())
    extra = {n: p for n, p in ours.items() if n not in theirs}
    assert set(extra) <= {"guidance_scale", "guidance_rescale", "variance_noise"} and "guidance_scale" in extra
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for p in extra.values())


@pytest.mark.parametrize("cls", ALL)
def test_step_binds_its_arguments_as_python_does(cls):
    """step is compiled from the wrapped signature: keyword and positional calls bind alike, and a bad call
    raises Python's own TypeError naming the step and the argument. The fused class also builds directly."""
    fast = fast_class(getattr(diffusers, cls))()
    fast.set_timesteps(4)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    t = fast.timesteps[0]
    fast.offset = 0
    names = list(inspect.signature(diffusers.__dict__[cls].step).parameters)[1:]
    kw = {"return_dict": False}
    ref = fast.step(mo, t, x, **kw)[0]
    fast.rewind()
    fast.offset = 0  # the same in-kernel noise draw
    assert torch.equal(fast.step(model_output=mo, timestep=t, sample=x, **kw)[0], ref)
    with pytest.raises(TypeError, match=rf"{cls}\.step\(\) got an unexpected keyword argument 'bogus'"):
        fast.step(mo, t, x, bogus=1)
    with pytest.raises(TypeError, match=rf"{cls}\.step\(\) missing 1 required positional argument: 'sample'"):
        fast.step(mo, t)
    with pytest.raises(TypeError, match=rf"{cls}\.step\(\) got multiple values for argument 'sample'"):
        fast.step(mo, t, x, sample=x)
    with pytest.raises(TypeError, match=rf"{cls}\.step\(\) takes"):
        fast.step(mo, t, x, *([None] * len(names)))


def test_pipeline_extra_step_kwargs_reach_the_step():
    """StableDiffusionPipeline builds step's kwargs from its signature: eta and the generator must get through."""
    from diffusers import StableDiffusionPipeline

    fake = type("P", (), {"scheduler": fast_scheduler(diffusers.DDIMScheduler())})()
    kwargs = StableDiffusionPipeline.prepare_extra_step_kwargs(fake, gen(0), 0.3)
    assert kwargs["eta"] == 0.3 and "generator" in kwargs


# ---------------------------------------------------------------------------------------------
# The generator decides the noise
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_generator_decides_the_noise(backend):
    fast = fast_scheduler(diffusers.DDPMScheduler(clip_sample=False), backend=backend)
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    g = gen(7)
    a = fast.step(mo, 500, x, generator=g).prev_sample
    after = g.get_state()
    ref_gen = gen(7)
    torch.randn(SHAPE, generator=ref_gen)  # the draw diffusers makes
    assert torch.equal(after, ref_gen.get_state()), "the generator advances as diffusers' draw advances it"
    assert torch.equal(fast.step(mo, 500, x, generator=gen(7)).prev_sample, a)
    assert not torch.allclose(fast.step(mo, 500, x, generator=g).prev_sample, a)  # another state, other noise
    plain = diffusers.DDPMScheduler(clip_sample=False).step(mo, 500, x, generator=gen(7)).prev_sample
    assert_close_rel(a, plain, TOL, "same generator, same result as diffusers")


def test_cuda_generator_key_is_derived_from_its_state():
    """A CUDA generator keys the in-kernel stream by (seed, offset) and moves by what a draw consumes (no GPU:
    the rule is checked with a stand-in generator)."""
    from seqgen_fast.diffusion import configs

    class FakeGen:
        device = torch.device("cuda")

        def __init__(self, seed, offset):
            self.seed, self.off = seed, offset

        def initial_seed(self):
            return self.seed

        def get_offset(self):
            return self.off

        def set_offset(self, v):
            self.off = v

    props = type("P", (), {"multi_processor_count": 132, "max_threads_per_multi_processor": 2048})()
    real = torch.cuda.get_device_properties
    torch.cuda.get_device_properties = lambda device: props
    try:
        g = FakeGen(5, 8)
        assert configs.generator_key(g, 1000) == (5, configs.GENERATOR_STREAM | 8) and g.off == 12
        assert configs.cuda_normal_increment(132 * 8 * 256 * 4 + 1, "cuda") == 8
    finally:
        torch.cuda.get_device_properties = real


# ---------------------------------------------------------------------------------------------
# diffusers' argument rules
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler", "DDPMScheduler",
                                 "FlowMatchEulerDiscreteScheduler"])
def test_step_before_set_timesteps(cls):
    theirs = getattr(diffusers, cls)()
    ours = fast_scheduler(getattr(diffusers, cls)(), backend="reference")
    x, mo = torch.randn(SHAPE), torch.randn(SHAPE)
    t = theirs.timesteps[3]
    assert_close_rel(ours.step(mo, t, x, generator=gen(1)).prev_sample, theirs.step(mo, t, x, generator=gen(1)).prev_sample,
                     TOL, cls)


@pytest.mark.parametrize("cls", ["DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler",
                                 "LCMScheduler"])
def test_set_timesteps_first_where_diffusers_needs_it(cls):
    x = torch.randn(SHAPE)
    for s in (getattr(diffusers, cls)(), fast_scheduler(getattr(diffusers, cls)())):
        with pytest.raises(ValueError, match="set_timesteps"):
            s.step(x, 10, x)


@pytest.mark.parametrize("cls", ["EulerDiscreteScheduler", "FlowMatchEulerDiscreteScheduler"])
def test_integer_indices_rejected_as_diffusers(cls):
    fast = fast_scheduler(getattr(diffusers, cls)())
    fast.set_timesteps(5)
    with pytest.raises(ValueError, match="timestep"):
        fast.step(torch.randn(SHAPE), 3, torch.randn(SHAPE))


@pytest.mark.parametrize("cls", ALL)
@pytest.mark.parametrize("dtypes", [(torch.float32, torch.float16), (torch.float16, torch.float32)])
def test_mixed_dtypes_give_diffusers_result_dtype(cls, dtypes):
    s_dt, m_dt = dtypes
    if s_dt == torch.float16 and cls in ("DDPMScheduler", "DDIMScheduler", "LCMScheduler"):
        pytest.skip("diffusers' CPU half clamp/threshold paths are not what is under test")
    config = {"clip_sample": False} if cls in ("DDPMScheduler", "DDIMScheduler", "LCMScheduler") else {}
    a, b, _, _ = run_both(cls, config, steps=3, dtype=s_dt, mo_dtype=m_dt)
    assert_same_steps(a, b, tol=2e-3, what=f"{cls} {dtypes}")


@pytest.mark.parametrize("cls", ALL)
def test_batch_one_model_output_broadcasts(cls):
    theirs = getattr(diffusers, cls)()
    ours = fast_scheduler(getattr(diffusers, cls)(), backend="reference")
    theirs.set_timesteps(5)
    ours.set_timesteps(5)
    x, mo = torch.randn(SHAPE), torch.randn(1, *SHAPE[1:])
    t = theirs.timesteps[1]
    for s in (theirs, ours):
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(1)
    want = theirs.step(mo, t, x, generator=gen(2)) if "generator" in inspect.signature(theirs.step).parameters \
        else theirs.step(mo, t, x)
    got = ours.step(mo, t, x, generator=gen(2)) if "generator" in inspect.signature(theirs.step).parameters \
        else ours.step(mo, t, x)
    assert_close_rel(got.prev_sample, want.prev_sample, TOL, cls)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("layout", ["channels_last", "sliced", "transposed"])
@pytest.mark.parametrize("cls", ["DDIMScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"])
def test_memory_layouts_are_read_in_place(backend, layout, cls):
    views = {"channels_last": lambda t: t.contiguous(memory_format=torch.channels_last),
             "sliced": lambda t: torch.stack([t, t], dim=-1).flatten(-2)[..., ::2],
             "transposed": lambda t: t.transpose(2, 3).contiguous().transpose(2, 3)}
    a, b, _, ours = run_both(cls, {}, steps=4, backend=backend, shape=(3, 4, 6, 6), layout=views[layout])
    assert_same_steps(a, b, what=f"{cls} {layout}")
    if layout == "channels_last":
        assert b[-1].is_contiguous(memory_format=torch.channels_last), "the output keeps the sample's layout"
        if cls != "DDIMScheduler":
            assert ours.model_outputs[-1].is_contiguous(memory_format=torch.channels_last), "history inherits it"


def test_geometry_reads_layouts_without_copies():
    x = torch.randn(2, 4, 6, 6).contiguous(memory_format=torch.channels_last)
    out = ops.alloc_like(x.shape, x, x.dtype)
    assert out.stride() == x.stride()
    assert ops.geometry(out, (x, x[:, :], None)) is None  # same order: the flat path
    sliced = torch.randn(2, 4, 6, 12)[..., ::2]
    geo = ops.geometry(torch.empty(2, 4, 6, 6), (sliced,))
    assert geo is not None and geo[0] is not None and 2 in geo[2][0]  # read through its stride of 2


# ---------------------------------------------------------------------------------------------
# Configurations
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("variance_type", ["fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log",
                                           "learned", "learned_range"])
def test_ddpm_variance_types(variance_type):
    learned = variance_type.startswith("learned")
    theirs = diffusers.DDPMScheduler(variance_type=variance_type)
    ours = fast_scheduler(diffusers.DDPMScheduler(variance_type=variance_type), backend="reference")
    # diffusers' step in float64 (its float32 1 - alpha_bar near t = 0 is off by ~5e-5): the ground truth
    theirs.alphas_cumprod, theirs.one = theirs.alphas_cumprod.double(), theirs.one.double()
    x = torch.randn(SHAPE, dtype=torch.float64)
    mo = torch.randn(SHAPE[0], 2 * SHAPE[1] if learned else SHAPE[1], *SHAPE[2:], dtype=torch.float64)
    if variance_type == "learned":
        mo[:, SHAPE[1]:] = mo[:, SHAPE[1]:].abs() * 0.01  # a variance
    for t in (999, 500, 1, 0):
        want = theirs.step(mo, t, x, generator=gen(t))
        got = ours.step(mo, t, x, generator=gen(t))
        if variance_type == "fixed_large_log" and t > 0:  # diffusers takes sqrt(log(beta)): NaN
            assert torch.isnan(want.prev_sample).all() and torch.isnan(got.prev_sample).all()
            continue
        assert_close_rel(got.prev_sample, want.prev_sample, TOL, f"{variance_type} t={t}")
        assert_close_rel(got.pred_original_sample, want.pred_original_sample, TOL, f"{variance_type} x0 t={t}")


DPM = [dict(algorithm_type=a, solver_order=o, solver_type=st, final_sigmas_type="sigma_min")
       for a in ("dpmsolver++", "sde-dpmsolver++", "dpmsolver", "sde-dpmsolver") for o in (1, 2, 3)
       for st in ("midpoint", "heun") if not (a == "sde-dpmsolver" and o == 3)]


@pytest.mark.parametrize("config", DPM, ids=lambda c: f"{c['algorithm_type']}-{c['solver_order']}-{c['solver_type']}")
def test_dpmsolver_algorithms_and_orders(config):
    a, b, _, _ = run_both("DPMSolverMultistepScheduler", config, steps=7)
    assert_same_steps(a, b, tol=1e-5, what=str(config))


@pytest.mark.parametrize("extra", [dict(final_sigmas_type="zero"), dict(use_karras_sigmas=True),
                                   dict(prediction_type="v_prediction", thresholding=True, sample_max_value=2.0,
                                        solver_order=3),
                                   dict(variance_type="learned_range"), dict(lower_order_final=False,
                                                                             euler_at_final=True)])
def test_dpmsolver_options(extra):
    a, b, _, _ = run_both("DPMSolverMultistepScheduler", extra, steps=8,
                          mo_channels=6 if "variance_type" in extra else None, shape=(3, 3, 6, 5))
    assert_same_steps(a, b, tol=1e-5, what=str(extra))


@pytest.mark.parametrize("order", [1, 2, 3])
@pytest.mark.parametrize("solver_type", ["bh1", "bh2"])
@pytest.mark.parametrize("predict_x0", [True, False])
def test_unipc(order, solver_type, predict_x0):
    config = dict(solver_order=order, solver_type=solver_type, predict_x0=predict_x0, final_sigmas_type="sigma_min")
    a, b, theirs, ours = run_both("UniPCMultistepScheduler", config, steps=8)
    assert_same_steps(a, b, tol=3e-5, what=str(config))
    assert theirs.this_order == ours.this_order and theirs.lower_order_nums == ours.lower_order_nums
    assert_close_rel(ours.last_sample, theirs.last_sample, 3e-5, "last_sample (the corrected sample)")


def test_unipc_thresholding_and_disabled_corrector():
    config = dict(thresholding=True, sample_max_value=1.5, solver_order=3, disable_corrector=[1, 3])
    a, b, _, _ = run_both("UniPCMultistepScheduler", config, steps=7)
    assert_same_steps(a, b, tol=3e-5, what="thresholding")


@pytest.mark.parametrize("config", [{}, dict(prediction_type="v_prediction", clip_sample=True),
                                    dict(thresholding=True, sample_max_value=2.0)])
def test_lcm(config):
    theirs = diffusers.LCMScheduler(**config)
    ours = fast_scheduler(diffusers.LCMScheduler(**config), backend="reference")
    theirs.set_timesteps(4)
    ours.set_timesteps(4)
    x = torch.randn(SHAPE)
    for i, t in enumerate(theirs.timesteps):
        mo = torch.randn(SHAPE)
        want = theirs.step(mo, t, x, generator=gen(i))
        got = ours.step(mo, t, x, generator=gen(i))
        assert_close_rel(got.prev_sample, want.prev_sample, TOL, f"step {i}")
        assert_close_rel(got.denoised, want.denoised, TOL, f"denoised {i}")
        x = want.prev_sample


@pytest.mark.parametrize("config,set_kw", [
    (dict(shift=3.0), {}),
    (dict(use_dynamic_shifting=True), dict(mu=0.8)),
    (dict(stochastic_sampling=True), {}),
    (dict(shift=2.0), dict(sigmas=[1.0, 0.8, 0.55, 0.3, 0.1])),
])
def test_flow_matching(config, set_kw):
    theirs = diffusers.FlowMatchEulerDiscreteScheduler(**config)
    ours = fast_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(**config), backend="reference")
    n = None if "sigmas" in set_kw else 6
    theirs.set_timesteps(n, **set_kw)
    ours.set_timesteps(n, **set_kw)
    x = torch.randn(SHAPE)
    for i, t in enumerate(theirs.timesteps):
        mo = torch.randn(SHAPE)
        want = theirs.step(mo, t, x, generator=gen(i)).prev_sample
        assert_close_rel(ours.step(mo, t, x, generator=gen(i)).prev_sample, want, TOL, f"step {i}")
        x = want


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_flow_matching_per_sample_timesteps_and_guidance(backend):
    ours = fast_scheduler(diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0), backend=backend)
    ours.set_timesteps(8)
    idx = [1, 4, 6]
    x, mo = torch.randn(SHAPE), torch.randn(2 * SHAPE[0], *SHAPE[1:])
    got = ours.step(mo, ours.timesteps[idx], x, guidance_scale=4.0).prev_sample
    u, c = mo.chunk(2)
    for b, i in enumerate(idx):
        s = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
        s.set_timesteps(8)
        s.set_begin_index(i)
        want = s.step((u + 4.0 * (c - u))[b:b + 1], s.timesteps[i], x[b:b + 1]).prev_sample
        assert_close_rel(got[b:b + 1], want, 1e-5, f"sample {b}")


def test_unfused_calls_run_diffusers_step():
    """flow matching's per_token_timesteps is left to diffusers' own step: the same result, state kept."""
    theirs = diffusers.FlowMatchEulerDiscreteScheduler()
    ours = fast_scheduler(diffusers.FlowMatchEulerDiscreteScheduler())
    for s in (theirs, ours):
        s.set_timesteps(5)
    x, mo = torch.randn(2, 7, 4), torch.randn(2, 7, 4)
    tok = torch.full((2, 7), float(theirs.timesteps[1]))
    want = theirs.step(mo, theirs.timesteps[0], x, per_token_timesteps=tok).prev_sample
    got = ours.step(mo, ours.timesteps[0], x, per_token_timesteps=tok).prev_sample
    assert torch.equal(got, want) and ours.step_index == theirs.step_index


@pytest.mark.parametrize("cls,config", [
    ("UniPCMultistepScheduler", dict(solver_order=3)),
    ("DPMSolverMultistepScheduler", dict(solver_order=3, algorithm_type="dpmsolver", final_sigmas_type="sigma_min")),
    ("DDPMScheduler", dict(variance_type="learned_range")),
    ("LCMScheduler", {}),
    ("FlowMatchEulerDiscreteScheduler", dict(stochastic_sampling=True)),
])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_matches_reference(cls, config, dtype):
    shape = (3, 3, 7, 5)  # 105 elements per sample: a partial block
    learned = config.get("variance_type") == "learned_range"
    outs = {}
    for backend in ("reference", "triton"):
        _, b, _, _ = run_both(cls, config, steps=4, backend=backend, shape=shape, dtype=dtype,
                              mo_channels=6 if learned else None)
        outs[backend] = b
    for i, (r, t) in enumerate(zip(outs["reference"], outs["triton"])):
        assert_close_rel(t.float(), r.float(), 1e-5 if dtype == torch.float32 else 2e-3, f"{cls} step {i}")


def test_published_full_loops():
    """Means of 10-step loops that diffusers' own suite publishes for its dummy model and sample (facts)."""
    n = 4 * 3 * 8 * 8
    start = (torch.arange(n).reshape(3, 8, 8, 4) / n).permute(3, 0, 1, 2)
    expect = {"DPMSolverMultistepScheduler": (0.3301, dict(lower_order_final=False)),
              "UniPCMultistepScheduler": (0.2464, {})}
    for cls, (mean, config) in expect.items():
        s = fast_scheduler(getattr(diffusers, cls)(beta_start=0.0001, beta_end=0.02, final_sigmas_type="sigma_min",
                                                   **config), backend="reference")
        s.set_timesteps(10)
        x = start
        for t in s.timesteps:
            x = s.step(x * t / (t + 1), t, x).prev_sample
        assert abs(x.abs().mean().item() - mean) < 1e-3, (cls, x.abs().mean().item())
