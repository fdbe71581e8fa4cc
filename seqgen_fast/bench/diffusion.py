"""Diffusion scheduler steps: seqgen_fast's fused step against diffusers' eager step and torch.compile, in one run.

Providers of a step case (one scheduler step of a batch of latents, anchor "diffusers"):
  ours           fast_scheduler(scheduler).step with a device timestep (guidance fused when on),
                 pred_original_sample not written;
  diffusers      the guidance done by hand (u + g (c - u)) then the diffusers scheduler's eager step;
  torch.compile  torch.compile of the same CFG + step math, its coefficients 0-d tensors of one
                 scalar timestep (DDIM, and flow-matching Euler on video latents with CFG).
Bytes are the minimal bytes of the step: read the sample and the model output (2B rows with
guidance) and write the previous sample (+ read and write the solver history; UniPC also its last
sample).

The loop case ("... 50-step loop (graph)", small latents) times 50 DDIM steps replayed from one
captured CUDA graph; per_step = 50 gives the time per step. Inputs are not rotated: a sampling loop
keeps its latents hot, and the large latents (67-134 MB) exceed the 50 MB L2 anyway.
"""
from __future__ import annotations

import torch

from . import Case

SHAPES = {"16x4x128x128": (16, 4, 128, 128), "8x16x16x128x128": (8, 16, 16, 128, 128),
          "2x16x21x60x104": (2, 16, 21, 60, 104)}  # Wan/HunyuanVideo-style video latents
TINY = {"2x4x8x8": (2, 4, 8, 8)}
DTYPES = [torch.float32, torch.float16]
KINDS = {"DDIM": "DDIMScheduler", "DDPM": "DDPMScheduler", "Euler": "EulerDiscreteScheduler",
         "DPM++2M": "DPMSolverMultistepScheduler", "UniPC-2": "UniPCMultistepScheduler",
         "FlowEuler": "FlowMatchEulerDiscreteScheduler"}
HISTORY = {"DPM++2M": 2, "UniPC-2": 4}  # extra streams of a second-order step (history in/out; UniPC: last in/out)
STEPS = 50
# Stable Diffusion's DDIM/DDPM settings; the other schedulers at their defaults
CONFIGS = {"DDIMScheduler": dict(clip_sample=False, set_alpha_to_one=False), "DDPMScheduler": dict(clip_sample=False)}


def _scheduler(cls: str, device: str):
    import diffusers

    s = getattr(diffusers, cls)(**CONFIGS.get(cls, {}))
    s.set_timesteps(STEPS, device=device)
    return s


def _ddim_compiled():
    """CFG + DDIM step (epsilon, eta 0, no clip) as one torch.compile'd function of 0-d coefficient tensors."""
    def step(x, mo, g, sqrt_ab, sqrt_1mab, sqrt_abp, sqrt_1mabp, cfg: bool):
        if cfg:
            u, c = mo.chunk(2)
            m = u + g * (c - u)
        else:
            m = mo
        x0 = (x - sqrt_1mab * m) / sqrt_ab
        return (sqrt_abp * x0 + sqrt_1mabp * m).to(x.dtype)

    return torch.compile(step, fullgraph=True)


def _flow_compiled():
    """CFG + flow-matching Euler step (x + dt * m) as one torch.compile'd function of a 0-d dt tensor."""
    def step(x, mo, g, dt):
        u, c = mo.chunk(2)
        return (x.float() + dt * (u + g * (c - u)).float()).to(x.dtype)

    return torch.compile(step, fullgraph=True)


def _ddim_coefs(s, t: int, device: str):
    T = s.config.num_train_timesteps
    ab = s.alphas_cumprod[t].double()
    prev = t - T // s.num_inference_steps
    abp = s.alphas_cumprod[prev].double() if prev >= 0 else s.final_alpha_cumprod.double()
    vals = [ab.sqrt(), (1 - ab).sqrt(), abp.sqrt(), (1 - abp).sqrt()]
    return [v.float().to(device) for v in vals]


def _step_case(kind: str, shape_name: str, dtype: torch.dtype, guidance: bool, device: str = "cuda") -> Case:
    cls = KINDS[kind]
    shape = {**SHAPES, **TINY}[shape_name]
    B = shape[0]
    n = torch.Size(shape).numel()
    esize = torch.tensor([], dtype=dtype).element_size()
    hist = HISTORY.get(kind, 0)
    nbytes = esize * n * (1 + (2 if guidance else 1) + 1 + hist)

    def setup():
        from seqgen_fast.diffusion import fast_scheduler

        x = torch.randn(shape, device=device, dtype=dtype)
        mo = torch.randn((2 * B if guidance else B, *shape[1:]), device=device, dtype=dtype)
        g = 7.5 if guidance else None
        k = 10
        theirs = _scheduler(cls, device)
        ours = fast_scheduler(_scheduler(cls, device), pred_original_sample=False)
        t_dev = ours.timesteps[k]
        t_int = int(theirs.timesteps[k]) if kind in ("DDIM", "DDPM") else None

        def place(s):  # step index k, and second order for the multistep solvers (as in a running loop)
            if hasattr(s, "set_begin_index"):
                s._step_index = k
            if kind in HISTORY:
                s.lower_order_nums = 1
                if any(m is None for m in s.model_outputs):  # diffusers shifts this list before using [-2]
                    s.model_outputs = [torch.randn_like(x), torch.randn_like(x)]
            if kind == "UniPC-2":
                s.this_order, s.last_sample = 1, torch.randn_like(x)

        place(ours)
        ours.step(mo, t_dev, x, guidance_scale=g)  # builds the tables and the DPM history buffer

        def run_ours():
            place(ours)
            return ours.step(mo, t_dev, x, guidance_scale=g, return_dict=False)[0]  # as pipelines call it

        def run_diffusers():
            place(theirs)
            m = mo
            if guidance:
                u, c = mo.chunk(2)
                m = u + g * (c - u)
            tt = t_int if kind in ("DDIM", "DDPM") else theirs.timesteps[k]
            return theirs.step(m, tt, x, return_dict=False)[0]

        fns = {"ours": run_ours, "diffusers": run_diffusers}
        if kind == "DDIM":
            compiled = _ddim_compiled()
            coefs = _ddim_coefs(theirs, t_int, device)
            gt = torch.tensor(7.5, device=device)
            fns["torch.compile"] = lambda: compiled(x, mo, gt, *coefs, guidance)
        if kind == "FlowEuler" and guidance:
            flow = _flow_compiled()
            dt = (theirs.sigmas[k + 1] - theirs.sigmas[k]).float().to(device)
            gt = torch.tensor(7.5, device=device)
            fns["torch.compile"] = lambda: flow(x, mo, gt, dt)
        return fns

    op = f"{'CFG+' if guidance else ''}{kind} step"
    return Case("diffusion", op, shape_name, dtype, setup, anchor="diffusers", bytes=nbytes, device=device)


def _loop_case(dtype: torch.dtype, device: str = "cuda") -> Case:
    """50 DDIM steps with guidance on small latents, replayed from one CUDA graph (the model output is fixed)."""
    shape = SHAPES["16x4x128x128"]
    B = shape[0]
    n = torch.Size(shape).numel()
    esize = torch.tensor([], dtype=dtype).element_size()

    def setup():
        from seqgen_fast.diffusion import fast_scheduler

        x0 = torch.randn(shape, device=device, dtype=dtype)
        mo = torch.randn((2 * B, *shape[1:]), device=device, dtype=dtype)
        ours = fast_scheduler(_scheduler("DDIMScheduler", device), pred_original_sample=False)
        ts = list(ours.timesteps)

        def run_ours():
            x = x0
            for t in ts:
                x = ours.step(mo, t, x, guidance_scale=7.5, return_dict=False)[0]
            return x

        compiled = _ddim_compiled()
        coefs = [_ddim_coefs(ours, int(t), device) for t in ours.timesteps]
        gt = torch.tensor(7.5, device=device)

        def run_compiled():
            x = x0
            for c in coefs:
                x = compiled(x, mo, gt, *c, True)
            return x

        theirs = _scheduler("DDIMScheduler", device)
        t_ints = [int(t) for t in theirs.timesteps]

        def run_diffusers():
            x = x0
            u, c = mo.chunk(2)
            for t in t_ints:
                x = theirs.step(u + 7.5 * (c - u), t, x, return_dict=False)[0]
            return x

        return {"ours": run_ours, "torch.compile": run_compiled, "diffusers": run_diffusers}

    return Case("diffusion", f"CFG+DDIM {STEPS}-step loop (graph)", "16x4x128x128", dtype, setup,
                anchor="diffusers", bytes=STEPS * esize * n * 4, per_step=STEPS, cuda_graph=True, device=device)


def cases(mode: str, device: str = "cuda"):
    if mode == "headline":
        yield _step_case("DDIM", "8x16x16x128x128", torch.float16, True)
        return
    if mode == "tiny":
        yield _step_case("DDIM", "2x4x8x8", torch.float32, True, device=device)
        return
    if mode == "quick":
        yield _step_case("DDIM", "8x16x16x128x128", torch.float16, True)
        yield _step_case("DDIM", "16x4x128x128", torch.float16, True)
        yield _step_case("FlowEuler", "2x16x21x60x104", torch.bfloat16, True)
        yield _loop_case(torch.float16)
        return
    for shape_name in ("16x4x128x128", "8x16x16x128x128"):
        for dtype in DTYPES:
            for guidance in (False, True):
                yield _step_case("DDIM", shape_name, dtype, guidance)
            for kind in ("DDPM", "Euler", "DPM++2M", "UniPC-2"):
                yield _step_case(kind, shape_name, dtype, False)
    yield _step_case("FlowEuler", "2x16x21x60x104", torch.bfloat16, True)
    for dtype in DTYPES:
        yield _loop_case(dtype)
