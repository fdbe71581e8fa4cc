"""Triton kernel of the fused diffusion step (math and layout: ``seqgen_fast.reference.diffusion``).

One pass over memory: each program owns one sample b (grid axis 1) and one chunk of BLOCK
elements of it (grid axis 0). It finds the sample's coefficient row once (host key, the integer
timestep, or a search of the timestep in the schedule), loads the 8 coefficients, reads x_t and
the model output (both CFG halves), draws its Gaussian noise in-kernel when asked, and writes
x_{t-1} (and x0 / the DPM history when asked) once. Math in float32, 64-bit element offsets.

In-kernel noise (Philox4x32-10, ``tl.philox``): the chunk is processed as four contiguous
quarters of Q = BLOCK/4 elements; element j of quarter q takes word q of
philox(seed, counter = (chunk*Q + j, b, offset, 0)), turned into a normal by Box-Muller on word
pairs (0,1) and (2,3). Reproducible for a given (seed, offset, dtype) -- BLOCK depends on the dtype
(``block_size``: 16-byte accesses per thread) -- and not the CUDA backend's stream. ``rng_offset``
(a 1-element int64 device tensor), when given, is added to ``offset`` on the device: a captured
CUDA graph reads it at every replay.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._contract import NCOEF

NUM_WARPS = 4


def block_size(dtype: torch.dtype) -> int:
    """Elements per program: four quarters of one 16-byte vector per thread (2048 fp32, 4096 fp16/bf16)."""
    return 4 * 32 * NUM_WARPS * (16 // torch.tensor([], dtype=dtype).element_size())


@triton.jit
def _normals(seed, c0, c1, c2):
    """Four standard normals per counter (Philox4x32-10, then Box-Muller on word pairs)."""
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1 + zero, c2 + zero, zero)
    u0 = tl.random.uint_to_uniform_float(r0)
    u1 = tl.random.uint_to_uniform_float(r1)
    u2 = tl.random.uint_to_uniform_float(r2)
    u3 = tl.random.uint_to_uniform_float(r3)
    n0, n1 = tl.random.pair_uniform_to_normal(u0, u1)
    n2, n3 = tl.random.pair_uniform_to_normal(u2, u3)
    return n0, n1, n2, n3


@triton.jit
def _quarter(x_ptr, m_ptr, out_ptr, x0_ptr, h_ptr, n_ptr, base, mbase_u, mbase_c, idx, mask, nq,
             cx, cm, ax, a0, am, ah, an, cpn, g, ms, thr, clip_range,
             CFG: tl.constexpr, X0_MODE: tl.constexpr, NOISE: tl.constexpr, HIST: tl.constexpr,
             WRITE_X0: tl.constexpr):
    x = tl.load(x_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    if CFG:
        u = tl.load(m_ptr + mbase_u + idx, mask=mask, other=0.0).to(tl.float32)
        c = tl.load(m_ptr + mbase_c + idx, mask=mask, other=0.0).to(tl.float32)
        m = (u + g * (c - u)) * ms
    else:
        m = tl.load(m_ptr + mbase_u + idx, mask=mask, other=0.0).to(tl.float32) * ms
    if NOISE == 1:
        n = tl.load(n_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    else:
        n = nq
    if NOISE != 0:
        x = x + cpn * n
    x0 = cx * x + cm * m
    # clamps by comparison, so a NaN x0 stays NaN as in the reference (tl.minimum/maximum drop NaN on GPUs)
    if X0_MODE == 1:
        x0 = tl.where(x0 < -clip_range, -clip_range, tl.where(x0 > clip_range, clip_range, x0))
    elif X0_MODE == 2:
        x0 = tl.where(x0 < -thr, -thr, tl.where(x0 > thr, thr, x0)) / thr
    out = ax * x + a0 * x0 + am * m
    if HIST == 2:
        out += ah * tl.load(h_ptr + base + idx, mask=mask, other=0.0).to(tl.float32)
    if HIST != 0:
        tl.store(h_ptr + base + idx, x0.to(h_ptr.dtype.element_ty), mask=mask)
    if NOISE != 0:
        out += an * n
    tl.store(out_ptr + base + idx, out.to(out_ptr.dtype.element_ty), mask=mask)
    if WRITE_X0:
        tl.store(x0_ptr + base + idx, x0.to(x0_ptr.dtype.element_ty), mask=mask)


# Integer arguments that may equal 1 must not become compile-time constants (offset 1 would lose .to()).
@triton.jit(do_not_specialize=["B", "rows", "n_sched", "key", "ts_stride", "seed", "offset"])
def _step_kernel(x_ptr, m_ptr, out_ptr, x0_ptr, h_ptr, n_ptr, coef_ptr, ts_ptr, sched_ptr, g_ptr, ms_ptr, thr_ptr,
                 rng_ptr, N, B, rows, n_sched, key, ts_stride, seed, offset, gscale, clip_range,
                 LOOKUP: tl.constexpr, SCHED_BLOCK: tl.constexpr, CFG: tl.constexpr, PER_SAMPLE_G: tl.constexpr,
                 MSCALE: tl.constexpr, X0_MODE: tl.constexpr, NOISE: tl.constexpr, RNG_OFFSET: tl.constexpr,
                 HIST: tl.constexpr, WRITE_X0: tl.constexpr, NCOEF_: tl.constexpr, BLOCK_: tl.constexpr):
    chunk = tl.program_id(0)
    b = tl.program_id(1)
    # -- the sample's coefficient row (once per program) --
    if LOOKUP == 0:
        row = key
        valid = row >= 0
    elif LOOKUP == 1:
        t = tl.load(ts_ptr + b * ts_stride).to(tl.float32)
        row = t.to(tl.int32)
        valid = (row.to(tl.float32) == t) & (row >= 0) & (row < rows)
    else:
        t = tl.load(ts_ptr + b * ts_stride).to(tl.float32)
        k = tl.arange(0, SCHED_BLOCK)
        sched = tl.load(sched_ptr + k, mask=k < n_sched, other=float("nan"))
        row = tl.min(tl.where(sched == t, k, SCHED_BLOCK), axis=0)
        valid = row < n_sched
    row = tl.where(valid, row, 0)
    nan = float("nan")
    cbase = coef_ptr + row * NCOEF_
    cx = tl.where(valid, tl.load(cbase + 0), nan)
    cm = tl.where(valid, tl.load(cbase + 1), nan)
    ax = tl.where(valid, tl.load(cbase + 2), nan)
    a0 = tl.where(valid, tl.load(cbase + 3), nan)
    am = tl.where(valid, tl.load(cbase + 4), nan)
    ah = tl.where(valid, tl.load(cbase + 5), nan)
    an = tl.where(valid, tl.load(cbase + 6), nan)
    cpn = tl.where(valid, tl.load(cbase + 7), nan)
    if PER_SAMPLE_G:
        g = tl.load(g_ptr + b)
    else:
        g = gscale
    if MSCALE:
        ms = tl.load(ms_ptr + b)
    else:
        ms = 1.0
    if X0_MODE == 2:
        thr = tl.load(thr_ptr + b)
    else:
        thr = 1.0
    # -- this chunk: four contiguous quarters --
    Q: tl.constexpr = BLOCK_ // 4
    j = tl.arange(0, Q)
    base = b.to(tl.int64) * N
    mbase_u = base
    mbase_c = (b + B).to(tl.int64) * N
    start = chunk.to(tl.int64) * BLOCK_
    if NOISE == 2:
        if RNG_OFFSET:
            offset = offset + tl.load(rng_ptr)  # int64: wraps to the 32-bit counter word below
        normals = _normals(seed, (chunk * Q + j).to(tl.uint32), b.to(tl.uint32), offset.to(tl.uint32))
    else:
        zero = tl.zeros((Q,), tl.float32)
        normals = (zero, zero, zero, zero)
    for q in tl.static_range(4):
        i = start + q * Q + j
        _quarter(x_ptr, m_ptr, out_ptr, x0_ptr, h_ptr, n_ptr, base, mbase_u, mbase_c, i, i < N, normals[q],
                 cx, cm, ax, a0, am, ah, an, cpn, g, ms, thr, clip_range, CFG, X0_MODE, NOISE, HIST, WRITE_X0)

def diffusion_step(sample, model_output, coef, key, timesteps, schedule_timesteps, cfg, guidance_scale, guidance,
                   model_scale, x0_mode, clip_range, threshold, history, read_history, noise, noise_mode, seed,
                   offset, rng_offset, write_x0):
    """Launch the fused step (arguments as ``seqgen_fast.reference.diffusion.diffusion_step``)."""
    B = sample.shape[0]
    N = sample.numel() // B if B else 0
    out = torch.empty_like(sample)
    x0 = torch.empty_like(sample) if write_x0 else sample.new_empty(0)
    if B == 0 or N == 0:
        return out, x0
    if key >= 0:
        lookup, ts, ts_stride = 0, coef, 0
    else:
        lookup = 1 if schedule_timesteps is None else 2
        ts, ts_stride = timesteps, (0 if timesteps.numel() == 1 else 1)
    sched = schedule_timesteps if schedule_timesteps is not None else coef
    n_sched = schedule_timesteps.numel() if schedule_timesteps is not None else 1
    hist = 0 if history is None else (2 if read_history else 1)
    block = block_size(sample.dtype)
    grid = (triton.cdiv(N, block), B)
    _step_kernel[grid](
        sample, model_output, out, x0 if write_x0 else out, history if history is not None else out,
        noise if noise_mode == 1 else sample, coef, ts, sched,
        guidance if guidance is not None else coef, model_scale if model_scale is not None else coef,
        threshold if threshold is not None else coef, rng_offset if rng_offset is not None else ts,
        N, B, coef.shape[0], n_sched, key, ts_stride, seed % (2**63), offset % (2**32), float(guidance_scale),
        float(clip_range),
        LOOKUP=lookup, SCHED_BLOCK=triton.next_power_of_2(max(n_sched, 16)), CFG=cfg,
        PER_SAMPLE_G=guidance is not None, MSCALE=model_scale is not None, X0_MODE=x0_mode, NOISE=noise_mode,
        RNG_OFFSET=rng_offset is not None, HIST=hist, WRITE_X0=write_x0, NCOEF_=NCOEF, BLOCK_=block,
        num_warps=NUM_WARPS)
    return out, x0
