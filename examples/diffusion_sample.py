"""Diffusion sampling with classifier-free guidance on seqgen_fast's fused scheduler steps.

A small class-conditional DiT (written below, random weights) denoises latents in 50 steps with
guidance 5.0, twice from the same noise:

* plain torch: the diffusers loop -- ``scale_model_input``, the model on the [uncond; cond] batch,
  guidance in eager torch, ``scheduler.step`` (DDIM or DPM-Solver++);
* seqgen_fast: ``seqgen_fast.diffusion.sample(model_fn, fast_scheduler(scheduler), latents,
  guidance_scale=5.0, num_inference_steps=50, cuda_graph=True)``: guidance fused into one step
  kernel per step, and on a GPU the whole 50-step loop (model included) replayed from one CUDA graph.

Both samplers are deterministic (DDIM with eta = 0, DPM-Solver++ second order), so the final
latents are compared (largest |difference|).

    python examples/diffusion_sample.py             # GPU when available
    python examples/diffusion_sample.py --device cpu --size 16 --width 64 --depth 2 --steps 10
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, base_parser, device_of, print_table, progress, timed  # noqa: E402

from seqgen_fast.diffusion import fast_scheduler, sample  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest |fast - plain| final-latent difference allowed, relative to max(1, max |latent|): the two
# loops round the step arithmetic differently and the model carries that through 50 steps.
RTOL = {torch.float32: 1e-3, torch.float16: 3e-2, torch.bfloat16: 1e-1}


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal embedding of (N,) timesteps: [cos(t f_i), sin(t f_i)], f_i = 10000^(-i / (dim/2))."""
    freqs = torch.exp(-math.log(10000.0) * torch.arange(dim // 2, device=t.device, dtype=torch.float32) / (dim // 2))
    angles = t.float()[:, None] * freqs[None]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


class Block(nn.Module):
    """DiT block: adaLN-modulated self-attention and MLP, each with a gated residual."""

    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.norm2 = nn.LayerNorm(width, elementwise_affine=False)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(approximate="tanh"), nn.Linear(4 * width, width))
        self.ada = nn.Linear(width, 6 * width)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.ada(F.silu(cond))[:, None].chunk(6, dim=-1)
        h = self.norm1(x) * (1 + scale1) + shift1
        b, n, w = h.shape
        q, k, v = self.qkv(h).view(b, n, 3, self.heads, w // self.heads).permute(2, 0, 3, 1, 4)
        attn = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, w)
        x = x + gate1 * self.proj(attn)
        h = self.norm2(x) * (1 + scale2) + shift2
        return x + gate2 * self.mlp(h)


class TinyDiT(nn.Module):
    """Latents (N, C, S, S), timesteps (N,), labels (N,) -> predicted noise (N, C, S, S).

    Label ``classes`` is the unconditional (null) label used by classifier-free guidance.
    """

    def __init__(self, channels: int, size: int, width: int, depth: int, heads: int, classes: int, patch: int = 2):
        super().__init__()
        self.patch, self.channels, self.size = patch, channels, size
        self.embed = nn.Conv2d(channels, width, patch, stride=patch)
        self.pos = nn.Parameter(torch.randn(1, (size // patch) ** 2, width) * 0.02)
        self.t_mlp = nn.Sequential(nn.Linear(width, width), nn.SiLU(), nn.Linear(width, width))
        self.labels = nn.Embedding(classes + 1, width)
        self.blocks = nn.ModuleList(Block(width, heads) for _ in range(depth))
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.out = nn.Linear(width, patch * patch * channels)

    def forward(self, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        n, p, s = x.shape[0], self.patch, self.size
        h = self.embed(x).flatten(2).transpose(1, 2) + self.pos
        cond = self.t_mlp(timestep_embedding(t, h.shape[-1]).to(h.dtype)) + self.labels(labels)
        for block in self.blocks:
            h = block(h, cond)
        h = self.out(self.norm(h))  # (N, (S/p)^2, p*p*C)
        h = h.view(n, s // p, s // p, p, p, self.channels).permute(0, 5, 1, 3, 2, 4)
        return h.reshape(n, self.channels, s, s)


def make_scheduler(name: str):
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler

    common = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")
    if name == "ddim":
        return DDIMScheduler(**common, clip_sample=False, set_alpha_to_one=False, steps_offset=1)
    return DPMSolverMultistepScheduler(**common, algorithm_type="dpmsolver++", solver_order=2)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=50, help="denoising steps")
    parser.add_argument("--guidance", type=float, default=5.0)
    parser.add_argument("--scheduler", choices=("ddim", "dpm"), default="ddim", help="DDIM or DPM-Solver++")
    parser.add_argument("--batch", type=int, default=None, help="images (default 8 on a GPU, 2 on the CPU)")
    parser.add_argument("--size", type=int, default=32, help="latent height and width (4 channels)")
    parser.add_argument("--width", type=int, default=384)
    parser.add_argument("--depth", type=int, default=6)
    parser.add_argument("--heads", type=int, default=6)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="model dtype")
    args = parser.parse_args(argv)
    if args.width % args.heads:
        parser.error(f"--width {args.width} must be a multiple of --heads {args.heads}")
    device = device_of(args)
    dtype = DTYPES[args.dtype]
    quiet = args.no_progress
    args.batch = args.batch or (8 if device.type == "cuda" else 2)
    classes = 10
    torch.manual_seed(args.seed)
    model = TinyDiT(4, args.size, args.width, args.depth, args.heads, classes).to(device=device, dtype=dtype).eval()
    latents = torch.randn(args.batch, 4, args.size, args.size, device=device, dtype=dtype)
    labels = torch.randint(0, classes, (args.batch,), device=device)
    both_labels = torch.cat([torch.full_like(labels, classes), labels])  # [uncond; cond]

    @torch.no_grad()
    def model_fn(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Noise prediction for the (2B, ...) [uncond; cond] batch at timestep t (a 0-d device tensor)."""
        return model(x, torch.as_tensor(t, device=device).reshape(-1).expand(x.shape[0]), both_labels)

    plain_sched = make_scheduler(args.scheduler)
    fast_sched = fast_scheduler(make_scheduler(args.scheduler))
    g = args.guidance

    @torch.no_grad()
    def plain_run() -> torch.Tensor:
        plain_sched.set_timesteps(args.steps, device=device)
        x = latents * plain_sched.init_noise_sigma
        for t in progress(plain_sched.timesteps, "plain diffusers loop", disable=quiet):
            out = model_fn(plain_sched.scale_model_input(torch.cat([x, x]), t), t)
            uncond, cond = out.chunk(2)
            x = plain_sched.step(uncond + g * (cond - uncond), t, x).prev_sample
        return x

    graph = device.type == "cuda"

    @torch.no_grad()
    def fast_run() -> torch.Tensor:
        return sample(model_fn, fast_sched, latents, guidance_scale=g, num_inference_steps=args.steps, cuda_graph=graph)

    print(f"TinyDiT: {args.depth} blocks, width {args.width}, latents {args.batch}x4x{args.size}x{args.size} "
          f"({args.dtype}), {args.scheduler} {args.steps} steps, guidance {g}"
          + (", seqgen_fast loop in one CUDA graph" if graph else ""))
    t_plain, ref = timed(plain_run, device, args.repeats)
    t_fast, out = timed(fast_run, device, args.repeats)
    diff = (out.float() - ref.float()).abs().max().item()
    tol = RTOL[dtype] * max(1.0, ref.float().abs().max().item())
    rows = [Row(f"{args.scheduler} {args.steps} steps, CFG {g}", t_plain, t_fast, args.steps, "step", diff, tol)]
    ok = print_table("Diffusion sampling, diffusers loop vs seqgen_fast", rows, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
