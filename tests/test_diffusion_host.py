"""The host path of a fused step, on the CPU: the pre-bound Triton launch and the per-signature plans.

On a GPU an eager step of small latents is bound by its Python. Two mechanisms keep that short, and
both are checked here without a GPU by replacing Triton's compiled kernel with a recorder (and, for
the pre-bound launch, its driver with two functions):

* a plan per call signature (``ops.diffusion._Plan``, ``kernels.diffusion.plan``) fixes the backend,
  the output layout, the read geometry and every kernel argument but the pointers, the row key, the
  noise seed/offset and the guidance scale: a steady-state step builds none of them again;
* the pre-bound launch (``kernels.diffusion.launch``) calls the kernel Triton's JIT compiled with the
  very arguments the JIT passes (pointers as integers), and goes back to the JIT for a new pointer
  alignment or when a launch hook is installed.

The steady-state test also counts the Python-level calls of one step (``sys.setprofile``): a budget,
not a timing, so the host path cannot regrow unnoticed.
"""
import sys

import pytest
import torch

diffusers = pytest.importorskip("diffusers")
triton = pytest.importorskip("triton")

from seqgen_fast.diffusion import fast_scheduler  # noqa: E402
from seqgen_fast.kernels import diffusion as kd  # noqa: E402
from seqgen_fast.ops import diffusion as ops  # noqa: E402

SHAPE = (3, 4, 6, 5)
STREAM, FUNCTION, METADATA = 77, "function-handle", ("packed", "metadata")
NAMES = list(kd._step_kernel.arg_names)  # the kernel's parameters (read before a test replaces the kernel)


class Kernel:
    """Stands in for ``_step_kernel``: records JIT launches (``kernel[grid](*args)``, returning itself as the
    compiled kernel) and direct launches of the compiled launcher (``kernel.run``)."""

    function, packed_metadata = FUNCTION, METADATA

    def __init__(self):
        self.jit, self.direct = [], []

    def __getitem__(self, grid):
        def jit_launch(*args, **options):
            self.jit.append((grid, args))
            return self
        return jit_launch

    def run(self, *args):
        self.direct.append(args)


@pytest.fixture
def kernel(monkeypatch):
    """A recorder for the kernel, fresh plans, and (``kernel.prebound()``) Triton's JIT mode with a fake driver."""
    rec = Kernel()
    monkeypatch.setattr(kd, "_step_kernel", rec)
    monkeypatch.setattr(ops, "_plans", {})

    def prebound():
        monkeypatch.setattr(kd, "_JIT", True)
        monkeypatch.setattr(kd, "_DRIVER", [lambda: None, lambda device: STREAM])  # CPU tensors: device None
    rec.prebound = prebound
    return rec


def _ddim(cfg=True):
    fs = fast_scheduler(diffusers.DDIMScheduler(), backend="triton", seed=3)
    fs.set_timesteps(10)
    x = torch.randn(SHAPE)
    mo = torch.randn((2 * SHAPE[0] if cfg else SHAPE[0], *SHAPE[1:]))
    return fs, x, mo


def _pointers(args):
    return tuple(a.data_ptr() if isinstance(a, torch.Tensor) else a for a in args)


def test_launch_arguments_are_the_kernel_parameters(kernel):
    """Every value lands on the kernel parameter of its name (the plan's argument order is the kernel's)."""
    fs, x, mo = _ddim()
    t = fs.timesteps[2]
    prev, x0 = fs.step(mo, t, x, guidance_scale=7.5, return_dict=False)
    (grid, args), = kernel.jit
    a = dict(zip(NAMES, args, strict=True))
    assert a["x_ptr"] is x and a["out_ptr"] is prev and a["aux_ptr"] is x0 and a["coef_ptr"].shape[0] == 1000
    assert a["u_ptr"].data_ptr() == mo.data_ptr() and a["k_ptr"].data_ptr() == mo[3:].data_ptr()
    dead = ("v_ptr", "l_ptr", "h1_ptr", "h2_ptr", "h3_ptr", "n_ptr", "conv_ptr", "xs_ptr", "ts_ptr", "sched_ptr",
            "g_ptr", "ms_ptr", "thr_ptr", "rng_ptr", "geo_ptr", "sv", "sl", "sh1", "sh2", "sh3", "sn")
    assert all(a[n] is None for n in dead), {n: a[n] for n in dead if a[n] is not None}
    N = x[0].numel()
    assert (a["key"], a["seed"], a["off_lo"], a["off_hi"], a["gscale"]) == (int(t), 3, 0, 0, 7.5)
    assert (a["sx"], a["su"], a["sk"], a["N"], a["B"], a["rows"], a["ts_stride"]) == (N, N, N, N, 3, 1000, 0)
    assert type(a["clip_range"]) is float and a["clip_range"] == 1.0
    assert (a["LOOKUP"], a["CFG"], a["NOISE"], a["AUX"], a["CONV"], a["STRIDED"]) == (0, True, 0, True, False, False)
    assert grid == (1, 3) and a["BLOCK_"] == kd.block_size(torch.float32)


def test_prebound_launch_passes_what_the_jit_passes(kernel):
    """The first step goes through the JIT; the same step again calls the compiled launcher with the same
    arguments (pointers as integers, the fresh outputs' addresses), on Triton's current stream."""
    kernel.prebound()
    fs, x, mo = _ddim()
    t = fs.timesteps[4]
    fs.step(mo, t, x, guidance_scale=5.0)
    prev, x0 = fs.step(mo, t, x, guidance_scale=5.0, return_dict=False)
    (grid, jit_args), = kernel.jit
    (direct,) = kernel.direct
    assert direct[:9] == (grid[0], grid[1], 1, STREAM, FUNCTION, METADATA, None, None, None)
    want = list(_pointers(jit_args))
    slot = {n: i for i, n in enumerate(kd.SLOTS)}
    want[slot["out"]], want[slot["aux"]] = prev.data_ptr(), x0.data_ptr()
    assert direct[9:] == tuple(want)
    assert len(direct[9:]) == len(NAMES)


def test_prebound_launch_goes_back_to_the_jit_for_a_new_alignment(kernel):
    """Triton specialises pointers on 16-byte alignment: a misaligned sample is a new kernel (JIT), and each
    alignment then keeps its own compiled launcher."""
    kernel.prebound()
    fs, x, mo = _ddim()
    buf = torch.empty(x.numel() + 1)
    odd = buf[1:].view(SHAPE).copy_(x)
    assert odd.data_ptr() % 16 != 0
    t = fs.timesteps[1]
    for sample, jit, direct in ((x, 1, 0), (x, 1, 1), (odd, 2, 1), (odd, 2, 2), (x, 2, 3)):
        fs.step(mo, t, sample, guidance_scale=2.0)
        assert (len(kernel.jit), len(kernel.direct)) == (jit, direct)
    assert kernel.jit[1][1][0] is odd
    (plan,) = [p for p in ops._plans.values() if p.backend == "triton"]
    assert len(plan.launch[1].bound) == 2


def test_launch_hooks_take_the_jit_path(kernel):
    """With a launch hook installed (a profiler), every launch goes through the JIT, which calls the hooks."""
    kernel.prebound()
    fs, x, mo = _ddim(cfg=False)
    t = fs.timesteps[1]
    fs.step(mo, t, x)
    hook = triton.knobs.runtime.launch_enter_hook
    calls = []
    hook.add(calls.append)
    try:
        fs.step(mo, t, x)
        fs.step(mo, t, x)
    finally:
        hook.remove(calls.append)
    fs.step(mo, t, x)
    assert (len(kernel.jit), len(kernel.direct)) == (3, 1)


STEADY = {  # scheduler, its config, guidance: the common pipeline steps
    "DDIM+CFG": (diffusers.DDIMScheduler, {}, 7.5),
    "Euler": (diffusers.EulerDiscreteScheduler, {}, None),
    "DPM-Solver++2M": (diffusers.DPMSolverMultistepScheduler, {}, None),
    "flow Euler": (diffusers.FlowMatchEulerDiscreteScheduler, {}, None),
}
BUILDERS = {("diffusion.py", "build"), ("diffusion.py", "plan"), ("diffusion.py", "geometry"),
            ("diffusion.py", "geometry_table"), ("_backend.py", "select"), ("_backend.py", "reasons"),
            ("tables.py", "host"), ("schedulers.py", "_step_function")}
# Python-level calls of one steady-state step on the pre-bound path (CPU tensors: add 4 for reading
# TRITON_INTERPRET, which CUDA tensors skip). Measured 45 / 49 / 54 / 43 when this test was written.
BUDGET = 60


@pytest.mark.parametrize("name", list(STEADY))
def test_steady_state_step_reuses_its_plan(kernel, name):
    """A step of a running loop builds no plan, table, geometry or capability check, launches the compiled
    kernel directly, and stays within a budget of Python-level calls."""
    import os

    kernel.prebound()
    cls, config, g = STEADY[name]
    fs = fast_scheduler(cls(**config), backend="triton")
    fs.set_timesteps(20)
    x = torch.randn(SHAPE)
    mo = torch.randn((2 * SHAPE[0] if g else SHAPE[0], *SHAPE[1:]))
    ts = list(fs.timesteps)
    for t in ts[:4]:
        x = fs.step(mo, t, x, guidance_scale=g, return_dict=False)[0]
    calls, launches = [], (len(kernel.jit), len(kernel.direct))

    def profile(frame, event, arg):
        if event == "call":
            calls.append((os.path.basename(frame.f_code.co_filename), frame.f_code.co_name))

    sys.setprofile(profile)
    try:
        fs.step(mo, ts[4], x, guidance_scale=g, return_dict=False)
    finally:
        sys.setprofile(None)
    assert not BUILDERS & set(calls), sorted(BUILDERS & set(calls))
    assert (len(kernel.jit), len(kernel.direct)) == (launches[0], launches[1] + 1)  # one direct launch
    assert len(calls) <= BUDGET, f"{len(calls)} Python calls per step (budget {BUDGET}): {calls}"


_BINDER_CHECK = r"""
import json, sys
import torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import compute_cache_key


class Driver:  # what JITFunction.run and create_binder ask of the driver, for a Hopper target
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)


driver.set_active(Driver())
from seqgen_fast.kernels import diffusion as kd

_, key_cache, _, _, binder = kd._step_kernel.device_caches[0]
options = dict(num_warps=kd.NUM_WARPS, debug=False, instrumentation_mode=triton.knobs.compilation.instrumentation_mode)
if hasattr(triton.knobs.compilation, "fpsan_homomorphic_casts"):
    options["fpsan_homomorphic_casts"] = triton.knobs.compilation.fpsan_homomorphic_casts


def call(hist, strided, offset_elems=0):
    shape = (2, 4, 16, 16)
    fresh = lambda: torch.randn(shape, dtype=torch.float16)
    buf = torch.empty(fresh().numel() + offset_elems, dtype=torch.float16)[offset_elems:]
    x = buf.view(2, 16, 16, 4).permute(0, 3, 1, 2) if strided else buf.view(shape)  # channels_last or contiguous
    mo = torch.randn(4, *shape[1:], dtype=torch.float16)
    h = [fresh() for _ in range(hist)] + [None] * (3 - hist)
    outs = (torch.empty(shape, dtype=torch.float16), x.new_empty(0), torch.empty(shape, dtype=torch.float16) if hist
            else x.new_empty(0), x.new_empty(0))
    args = (x, mo[:2], mo[2:], None, None, *h, None, torch.zeros(9, 24), -1, torch.zeros((), dtype=torch.int64),
            None, 5.0, None, None, 0, 1.0, None, 2, 0, 7, 0, None, torch.float16, None,
            torch.float16 if hist else None, None)
    p = kd.plan(*args, outputs=outs, strided=strided)
    geo = torch.zeros(40, dtype=torch.int64) if strided else None
    slots = kd.slots(args, outs, geo)
    return p, tuple(slots[i] if i in p.live else None for i in range(len(kd.SLOTS)))


facts = {}
for hist, strided in ((0, False), (2, False), (0, True)):
    keys, specs = set(), set()
    for key, seed, offset in ((0, 5, 9), (1, 1, 1), (999, 2**62 + 7, 2**40 + 3), (16, 2**31, 2**64 - 1)):
        p, slots = call(hist, strided)
        scalars = (key, seed % 2**63, offset % 2**32, (offset >> 32) % 2**32, 5.0)
        _, spec, opts = binder(*slots, *scalars, *p.static, **options)
        keys.add(compute_cache_key(key_cache, spec, opts))
    p, slots = call(hist, strided, offset_elems=1)
    _, spec, opts = binder(*slots, *scalars, *p.static, **options)
    facts[f"{hist},{strided}"] = [len(keys), compute_cache_key(key_cache, spec, opts) in keys]
print(json.dumps(facts))
"""


def test_triton_specialises_a_plan_on_pointer_alignment_only():
    """Triton's own binder (the installed Triton, a Hopper target, no GPU): over the launches of one plan --
    fresh tensors, any key, seed and 64-bit offset -- it picks one compiled kernel, and another for a
    misaligned pointer. That is what makes (device, alignment) the pre-bound launch's key."""
    import json
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _BINDER_CHECK], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = json.loads(run.stdout.strip().splitlines()[-1])
    assert facts == {"0,False": [1, False], "2,False": [1, False], "0,True": [1, False]}, facts
