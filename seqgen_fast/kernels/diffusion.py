"""Triton kernel of the fused diffusion step (math: ``seqgen_fast.reference.diffusion``).

One pass over memory: each program owns one sample b (grid axis 1) and one chunk of BLOCK
elements of it (grid axis 0). It finds the sample's coefficient row once (host key, the integer
timestep, or a search of the timestep in the schedule), loads the row, reads x_t, the model output
(both CFG halves), the solver history and UniPC's last sample when the step needs them, draws its
Gaussian noise in-kernel when asked, and writes x_{t-1} (and x0 / the converted model output /
the corrected sample when asked) once. Math in float32, 64-bit element offsets.

Layout. The outputs are dense, batch outermost, each sample's elements in the memory order of
``out`` (position p = 0..N-1). Every input is read through its own strides: with ``STRIDED`` 0
(the common case: the input's per-sample strides equal ``out``'s, e.g. all contiguous, all
channels_last, CFG halves, a broadcast model output) element p of sample b is at
``ptr + b * batch_stride + p``; with ``STRIDED`` 1 p is decomposed over up to four dims (sizes and
per-input strides in a small int64 table, ``geometry``) and read through the strides.

Launch. ``plan`` fixes, once per loop configuration, every argument but the data pointers, the row
key, the noise seed and offset and the guidance scale; ``launch`` then calls Triton's compiled launcher
directly with those (a pre-bound launch: Triton's JIT binding and specialisation of the 57 arguments
cost more host time than the step on small latents). Pointers the step does not touch are passed as
None (constexpr), the per-call integers are typed int64, so a plan's compiled kernel depends only on the
device and the 16-byte alignment of the live pointers, which each launch checks.

In-kernel noise (Philox4x32-10, ``tl.philox``): the chunk is processed as four contiguous quarters
of Q = BLOCK/4 positions; position j of quarter q takes word q of philox(seed, counter =
(chunk*Q + j, b, offset_lo, offset_hi)), turned into a normal by Box-Muller on word pairs (0,1) and
(2,3). Reproducible for a given (seed, offset, dtype, memory order of out) -- BLOCK depends on the
dtype (``block_size``: 16-byte accesses per thread). ``rng_offset`` (a 1-element int64 device
tensor), when given, is added to offset_lo on the device: a captured CUDA graph reads it at every
replay.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import torch
import triton
import triton.language as tl

from .. import _contract as C

NUM_WARPS = 4
MAX_DIMS = 4  # dims of the strided read path (after merging dims contiguous in every tensor)
READS = ("x", "u", "k", "v", "last", "h1", "h2", "h3", "noise")  # the order of the geometry table's rows

# column indices as compile-time constants (Triton kernels read no plain globals)
_X0X, _X0M, _AX, _A0, _AM = tl.constexpr(C.X0X), tl.constexpr(C.X0M), tl.constexpr(C.AX), tl.constexpr(C.A0), tl.constexpr(C.AM)
_AH, _AN, _CPN, _AC, _AH2 = tl.constexpr(C.AH), tl.constexpr(C.AN), tl.constexpr(C.CPN), tl.constexpr(C.AC), tl.constexpr(C.AH2)
_CX, _CX0, _CM = tl.constexpr(C.CX), tl.constexpr(C.CX0), tl.constexpr(C.CM)
_SX, _SL, _SH1, _SH2, _SH3, _SC = (tl.constexpr(C.SX), tl.constexpr(C.SL), tl.constexpr(C.SH1), tl.constexpr(C.SH2),
                                   tl.constexpr(C.SH3), tl.constexpr(C.SC))
_DX, _D0, _VARP, _VARQ = tl.constexpr(C.DX), tl.constexpr(C.D0), tl.constexpr(C.VARP), tl.constexpr(C.VARQ)
_NCOEF = tl.constexpr(C.NCOEF)


def block_size(dtype: torch.dtype) -> int:
    """Elements per program: four quarters of one 16-byte vector per thread (2048 fp32, 4096 fp16/bf16)."""
    return 4 * 32 * NUM_WARPS * (16 // dtype.itemsize)


@triton.jit
def _normals(seed, c0, c1, c2, c3):
    """Four standard normals per counter (Philox4x32-10, then Box-Muller on word pairs)."""
    zero = c0 * 0
    r0, r1, r2, r3 = tl.philox(seed, c0, c1 + zero, c2 + zero, c3 + zero)
    n0, n1 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r0), tl.random.uint_to_uniform_float(r1))
    n2, n3 = tl.random.pair_uniform_to_normal(tl.random.uint_to_uniform_float(r2), tl.random.uint_to_uniform_float(r3))
    return n0, n1, n2, n3


@triton.jit
def _offset(geo_ptr, row: tl.constexpr, base, p, STRIDED: tl.constexpr):
    """Element offset of position p for input ``row`` of the geometry table (FLAT: base + p)."""
    if STRIDED:
        d3 = tl.load(geo_ptr + 3)
        d2 = tl.load(geo_ptr + 2)
        d1 = tl.load(geo_ptr + 1)
        s = geo_ptr + 4 + row * 4
        i3 = p % d3
        r = p // d3
        i2 = r % d2
        r = r // d2
        i1 = r % d1
        i0 = r // d1
        return base + i0 * tl.load(s) + i1 * tl.load(s + 1) + i2 * tl.load(s + 2) + i3 * tl.load(s + 3)
    else:
        return base + p


@triton.jit
def _ld(ptr, off, mask):
    return tl.load(ptr + off, mask=mask, other=0.0).to(tl.float32)


@triton.jit
def _term(c, v):
    """c v, but 0 where the coefficient is -0.0, a term the scheduler's formula does not have
    (``reference.diffusion.times``: the same rule)."""
    return tl.where((c == 0) & (c.to(tl.int32, bitcast=True) < 0), 0.0, c * v)


@triton.jit
def _quarter(x_ptr, u_ptr, k_ptr, v_ptr, l_ptr, h1_ptr, h2_ptr, h3_ptr, n_ptr, out_ptr, aux_ptr, conv_ptr, xs_ptr,
             geo_ptr, b64, sx, su, sk, sv, sl, sh1, sh2, sh3, sn, N, p, nq, cf, g, ms, thr, clip_range,
             CFG: tl.constexpr, X0_MODE: tl.constexpr, NOISE: tl.constexpr, VAR: tl.constexpr,
             NHIST: tl.constexpr, LAST: tl.constexpr, CONV: tl.constexpr, AUX: tl.constexpr, XS: tl.constexpr,
             STRIDED: tl.constexpr):
    mask = p < N
    x = _ld(x_ptr, _offset(geo_ptr, 0, b64 * sx, p, STRIDED), mask)
    m = _ld(u_ptr, _offset(geo_ptr, 1, b64 * su, p, STRIDED), mask)
    if CFG:
        m = m + g * (_ld(k_ptr, _offset(geo_ptr, 2, b64 * sk, p, STRIDED), mask) - m)
    m = m * ms
    if NOISE == 1:
        n = _ld(n_ptr, _offset(geo_ptr, 8, b64 * sn, p, STRIDED), mask)
    else:
        n = nq
    if NOISE == 1:  # a given noise may hold an inf; the in-kernel normals are finite (plain products)
        x = x + _term(cf[_CPN], n)
    elif NOISE == 2:
        x = x + cf[_CPN] * n
    x0 = _term(cf[_X0X], x) + _term(cf[_X0M], m)
    # clamps by comparison, so a NaN x0 stays NaN as in the reference (tl.minimum/maximum drop NaN on GPUs)
    if X0_MODE == 1:
        x0 = tl.where(x0 < -clip_range, -clip_range, tl.where(x0 > clip_range, clip_range, x0))
    elif X0_MODE == 2:
        x0 = tl.where(x0 < -thr, -thr, tl.where(x0 > thr, thr, x0)) / thr
    h1 = 0.0
    h2 = 0.0
    h3 = 0.0
    if NHIST >= 1:
        h1 = _ld(h1_ptr, _offset(geo_ptr, 5, b64 * sh1, p, STRIDED), mask)
    if NHIST >= 2:
        h2 = _ld(h2_ptr, _offset(geo_ptr, 6, b64 * sh2, p, STRIDED), mask)
    if NHIST >= 3:
        h3 = _ld(h3_ptr, _offset(geo_ptr, 7, b64 * sh3, p, STRIDED), mask)
    conv = 0.0
    if CONV:
        conv = _term(cf[_CX], x) + _term(cf[_CX0], x0) + _term(cf[_CM], m)
    xs = x
    if LAST:
        last = _ld(l_ptr, _offset(geo_ptr, 4, b64 * sl, p, STRIDED), mask)
        xs = _term(cf[_SX], x) + _term(cf[_SL], last) + _term(cf[_SC], conv)
        if NHIST >= 1:
            xs += _term(cf[_SH1], h1)
        if NHIST >= 2:
            xs += _term(cf[_SH2], h2)
        if NHIST >= 3:
            xs += _term(cf[_SH3], h3)
    o = b64 * N + p
    if AUX:  # stored before out is formed: its value is not live across out's terms
        tl.store(aux_ptr + o, (_term(cf[_DX], xs) + _term(cf[_D0], x0)).to(aux_ptr.dtype.element_ty), mask=mask)
    out = _term(cf[_AX], xs) + _term(cf[_A0], x0) + _term(cf[_AM], m)
    if CONV:
        out += _term(cf[_AC], conv)
    if NHIST >= 1:
        out += _term(cf[_AH], h1)
    if NHIST >= 2:
        out += _term(cf[_AH2], h2)
    if NOISE != 0:
        an = cf[_AN]
        if VAR == 1:
            an = tl.where(an != 0, an * tl.sqrt(_ld(v_ptr, _offset(geo_ptr, 3, b64 * sv, p, STRIDED), mask)), 0.0)
        elif VAR == 2:
            an = tl.where(an != 0, an * tl.exp(cf[_VARP] + cf[_VARQ] * _ld(v_ptr, _offset(geo_ptr, 3, b64 * sv, p,
                                                                                           STRIDED), mask)), 0.0)
        out += _term(an, n) if NOISE == 1 else an * n
    tl.store(out_ptr + o, out.to(out_ptr.dtype.element_ty), mask=mask)
    if CONV:
        tl.store(conv_ptr + o, conv.to(conv_ptr.dtype.element_ty), mask=mask)
    if XS:
        tl.store(xs_ptr + o, xs.to(xs_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _coefficient(cbase, i: tl.constexpr, valid):
    return tl.where(valid, tl.load(cbase + i), float("nan"))


# Integer arguments that may equal 1 must not become compile-time constants (offset 1 would lose .to()).
# The per-call integers (key, seed, offsets) are typed int64 whatever their value, so their values never
# change the specialisation: a compiled kernel keeps serving a loop (the pre-bound launch of ``launch``).
@triton.jit(do_not_specialize=["key", "seed", "off_lo", "off_hi", "B", "rows", "n_sched", "ts_stride"])
def _step_kernel(x_ptr, u_ptr, k_ptr, v_ptr, l_ptr, h1_ptr, h2_ptr, h3_ptr, n_ptr, out_ptr, aux_ptr, conv_ptr, xs_ptr,
                 coef_ptr, ts_ptr, sched_ptr, g_ptr, ms_ptr, thr_ptr, rng_ptr, geo_ptr,
                 key: tl.int64, seed: tl.int64, off_lo: tl.int64, off_hi: tl.int64, gscale,
                 sx, su, sk, sv, sl, sh1, sh2, sh3, sn, N, B, rows, n_sched, ts_stride, clip_range,
                 LOOKUP: tl.constexpr, SCHED_BLOCK: tl.constexpr, CFG: tl.constexpr, PER_SAMPLE_G: tl.constexpr,
                 MSCALE: tl.constexpr, X0_MODE: tl.constexpr, NOISE: tl.constexpr, RNG_OFFSET: tl.constexpr,
                 VAR: tl.constexpr, NHIST: tl.constexpr, LAST: tl.constexpr, CONV: tl.constexpr, AUX: tl.constexpr,
                 XS: tl.constexpr, STRIDED: tl.constexpr, BLOCK_: tl.constexpr):
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
        kk = tl.arange(0, SCHED_BLOCK)
        sched = tl.load(sched_ptr + kk, mask=kk < n_sched, other=float("nan"))
        row = tl.min(tl.where(sched == t, kk, SCHED_BLOCK), axis=0)
        valid = row < n_sched
    row = tl.where(valid, row, 0)
    cbase = coef_ptr + row * _NCOEF
    cf = (_coefficient(cbase, 0, valid), _coefficient(cbase, 1, valid), _coefficient(cbase, 2, valid),
          _coefficient(cbase, 3, valid), _coefficient(cbase, 4, valid), _coefficient(cbase, 5, valid),
          _coefficient(cbase, 6, valid), _coefficient(cbase, 7, valid), _coefficient(cbase, 8, valid),
          _coefficient(cbase, 9, valid), _coefficient(cbase, 10, valid), _coefficient(cbase, 11, valid),
          _coefficient(cbase, 12, valid), _coefficient(cbase, 13, valid), _coefficient(cbase, 14, valid),
          _coefficient(cbase, 15, valid), _coefficient(cbase, 16, valid), _coefficient(cbase, 17, valid),
          _coefficient(cbase, 18, valid), _coefficient(cbase, 19, valid), _coefficient(cbase, 20, valid),
          _coefficient(cbase, 21, valid), _coefficient(cbase, 22, valid))
    g = gscale
    if PER_SAMPLE_G:
        g = tl.load(g_ptr + b)
    ms = 1.0
    if MSCALE:
        ms = tl.load(ms_ptr + b)
    thr = 1.0
    if X0_MODE == 2:
        thr = tl.load(thr_ptr + b)
    # -- this chunk: four contiguous quarters --
    Q: tl.constexpr = BLOCK_ // 4
    j = tl.arange(0, Q)
    b64 = b.to(tl.int64)
    start = chunk.to(tl.int64) * BLOCK_
    if NOISE == 2:
        if RNG_OFFSET:
            off_lo = off_lo + tl.load(rng_ptr)  # int64: wraps to the 32-bit counter word below
        normals = _normals(seed, (chunk * Q + j).to(tl.uint32), b.to(tl.uint32), off_lo.to(tl.uint32),
                           off_hi.to(tl.uint32))
    else:
        zero = tl.zeros((Q,), tl.float32)
        normals = (zero, zero, zero, zero)
    for q in tl.static_range(4):
        _quarter(x_ptr, u_ptr, k_ptr, v_ptr, l_ptr, h1_ptr, h2_ptr, h3_ptr, n_ptr, out_ptr, aux_ptr, conv_ptr, xs_ptr,
                 geo_ptr, b64, sx, su, sk, sv, sl, sh1, sh2, sh3, sn, N, start + q * Q + j, normals[q], cf, g, ms,
                 thr, clip_range, CFG, X0_MODE, NOISE, VAR, NHIST, LAST, CONV, AUX, XS, STRIDED)


# ----------------------------------------------------------------------------------------------
# Launch: a plan per loop configuration, then one cheap launch per step
# ----------------------------------------------------------------------------------------------
SLOTS = READS + ("out", "aux", "conv", "xs", "coef", "timesteps", "schedule", "guidance", "model_scale", "threshold",
                 "rng_offset", "geometry")  # the kernel's 21 pointer arguments, in its order
_JIT = isinstance(_step_kernel, triton.runtime.jit.JITFunction)  # False under TRITON_INTERPRET=1
_DRIVER: list = []  # (get_current_device, get_current_stream) of Triton's active driver, once a kernel ran


@dataclass(eq=False)
class Launch:
    """Every argument of a step launch that stays fixed over a loop, and the compiled kernels that serve it.

    ``live``: the pointer slots (``SLOTS`` indices) the step reads or writes (the others are passed as
    None: compile-time constants the kernel never touches); ``static``: the kernel's arguments after the
    per-call ones (strides, sizes, ``clip_range``, the constexprs). ``bound`` maps (device, pointer
    alignment) to the compiled kernel's launcher, function handle and metadata: a launch that finds its
    key there calls Triton's compiled launcher directly (``CompiledKernel.run``, the call Triton's JIT
    makes after it has bound the arguments), skipping the JIT's argument binding and specialisation, whose
    every input but the data pointers' 16-byte alignment is fixed by the plan.
    """

    grid: tuple[int, int]
    live: tuple[int, ...]
    static: tuple
    device: int | None
    bound: dict = field(default_factory=dict)


def plan(x, u, k, v, last, h1, h2, h3, noise, coef, key, timesteps, schedule_timesteps, guidance_scale, guidance,
         model_scale, x0_mode, clip_range, threshold, noise_mode, var_mode, seed, offset, rng_offset, out_dtype,
         aux_dtype, conv_dtype, xs_dtype, *, outputs, strided: bool) -> Launch | None:
    """The launch of one step configuration (arguments as ``seqgen_fast.reference.diffusion.diffusion_step``;
    None: nothing to compute). ``outputs``: the (out, aux, conv, xs) tensors (empty when not written);
    ``strided``: the inputs are read through the geometry table (``ops.diffusion.geometry``)."""
    out, aux, conv, xs = outputs
    B = x.shape[0]
    N = out.numel() // B if B else 0
    if B == 0 or N == 0:
        return None
    if key >= 0:
        lookup, ts_stride = 0, 0
    else:
        lookup = 1 if schedule_timesteps is None else 2
        ts_stride = 0 if timesteps.numel() == 1 else timesteps.stride(0)
    n_sched = schedule_timesteps.numel() if schedule_timesteps is not None else 1
    nhist = 3 if h3 is not None else 2 if h2 is not None else 1 if h1 is not None else 0
    flags = dict(LOOKUP=lookup, SCHED_BLOCK=triton.next_power_of_2(max(n_sched, 16)), CFG=k is not None,
                 PER_SAMPLE_G=guidance is not None, MSCALE=model_scale is not None, X0_MODE=x0_mode, NOISE=noise_mode,
                 RNG_OFFSET=noise_mode == 2 and rng_offset is not None, VAR=var_mode if noise_mode else 0,
                 NHIST=nhist, LAST=last is not None, CONV=conv.numel() > 0, AUX=aux.numel() > 0, XS=xs.numel() > 0,
                 STRIDED=bool(strided), BLOCK_=block_size(out.dtype))
    used = (True, True, k is not None, flags["VAR"] > 0, last is not None, nhist >= 1, nhist >= 2, nhist >= 3,
            noise_mode == 1, True, flags["AUX"], flags["CONV"], flags["XS"], True, lookup > 0, lookup == 2,
            guidance is not None, model_scale is not None, x0_mode == 2, flags["RNG_OFFSET"], flags["STRIDED"])
    reads = (x, u, k, v, last, h1, h2, h3, noise)
    strides = tuple(t.stride(0) if live else None for t, live in zip(reads, used))
    static = strides + (N, B, coef.shape[0], n_sched, ts_stride, float(clip_range)) + tuple(flags.values())
    return Launch((triton.cdiv(N, flags["BLOCK_"]), B), tuple(i for i, live in enumerate(used) if live), static,
                  x.device.index if x.device.type == "cuda" else None)


def launch(p: Launch, slots: tuple, key: int, seed: int, offset: int, guidance_scale: float) -> None:
    """One step: ``slots`` holds a tensor (or anything, where not live) for each of ``SLOTS``.

    The first launch of a (device, pointer alignment) goes through Triton's JIT (which compiles the kernel
    the first time); later ones call the compiled launcher it returned with the same arguments, pointers
    as integers. With a launch hook installed (profilers), or a current device other than the tensors',
    every launch takes the JIT path.
    """
    scalars = (key, seed % 2**63, offset % 2**32, (offset >> 32) % 2**32, guidance_scale)
    if _JIT and _DRIVER:
        ptrs = [None] * len(SLOTS)
        bits = 0
        for i in p.live:
            ptrs[i] = addr = slots[i].data_ptr()
            bits |= addr
        get_device, get_stream = _DRIVER
        device = get_device()
        bound = p.bound.get((device, _alignment(bits, ptrs, p.live)))
        if bound is not None and device == p.device and _hooks_idle():
            run, function, metadata = bound
            run(p.grid[0], p.grid[1], 1, get_stream(device), function, metadata, None, None, None, *ptrs, *scalars,
                *p.static)
            return
    args = tuple(slots[i] if i in p.live else None for i in range(len(SLOTS))) + scalars + p.static
    if not _JIT:  # the interpreter
        _step_kernel[p.grid](*args, num_warps=NUM_WARPS)
        return
    with torch.cuda.device(p.device) if p.device is not None else contextlib.nullcontext():
        kernel = _step_kernel[p.grid](*args, num_warps=NUM_WARPS)
    if not _DRIVER:
        drv = triton.runtime.driver.active
        _DRIVER[:] = [drv.get_current_device, drv.get_current_stream]
    ptrs = [None if t is None else t.data_ptr() for t in args[:len(SLOTS)]]
    bits = 0
    for i in p.live:
        bits |= ptrs[i]
    p.bound[(p.device, _alignment(bits, ptrs, p.live))] = (kernel.run, kernel.function, kernel.packed_metadata)


def _alignment(bits: int, ptrs: list, live: tuple):
    """What Triton specialises the pointers on: 0 when every live one is 16-byte aligned, else which are."""
    return 0 if not bits & 15 else tuple(ptrs[i] & 15 == 0 for i in live)


def _hooks_idle() -> bool:
    """No launch hook is installed (Triton's launch_enter/exit hooks: profilers such as proton)."""
    r = triton.knobs.runtime
    enter, exit_ = r.launch_enter_hook, r.launch_exit_hook
    return (enter is None or not getattr(enter, "calls", True)) and (exit_ is None or not getattr(exit_, "calls", True))


def slots(args: tuple, outputs: tuple, geometry) -> tuple:
    """The ``SLOTS`` of a call: the op's arguments ``args`` (``seqgen_fast.ops.diffusion``, in its order), the
    (out, aux, conv, xs) outputs and the geometry table (None: flat reads)."""
    return args[:9] + tuple(outputs) + (args[9], args[11], args[12], args[14], args[15], args[18], args[23], geometry)
