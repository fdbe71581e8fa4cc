"""The fused diffusion step as a torch.library op, its backends, dispatch and memory layout.

``diffusion_step(...)`` (public; ``step(args)`` takes the op's argument tuple, the entry of
``seqgen_fast.diffusion``'s schedulers) runs the reduction passes that some options need, allocates
the outputs, plans how the kernels read the inputs, picks a backend (triton -> cuda -> reference)
and calls ``torch.ops.seqgen_fast.diffusion_step``:

* guidance rescale: per-sample std of the conditional and guided outputs (one extra read of the
  2B model output, in PyTorch on the device) -> a (B,) factor the kernel multiplies m by;
* dynamic thresholding: x0 is computed once (PyTorch on the device), its per-sample quantile of
  |x0| taken by a sort -> a (B,) scale s the kernel clamps and divides x0 by.

Neither pass syncs the host, and every backend takes their results as inputs. The op is not
differentiable (sampling needs no gradient). Under torch.compile the public function calls the op
(one opaque graph node); eagerly it runs the chosen backend directly, from a plan kept per call
signature (tensor dtypes, shapes, strides and devices, modes, forced backend): the backend choice,
output layout, geometry table and the kernel's launch plan are made on the first call of a
signature, so a step of a running loop only allocates its outputs and launches (the host cost of a
step on small latents is its Python). The row layout and the math are in
``seqgen_fast.reference.diffusion``.

Non-finite values, the same on every backend (tests/test_fuzz_diffusion.py): a NaN in the model output
or the sample gives NaN exactly where diffusers' step in that dtype gives it. x0 clipping and dynamic
thresholding clamp by comparison, so a NaN stays NaN (``torch.clamp``'s rule; the compiled kernels hold
no NaN-dropping min/max, checked in their SASS), and a NaN in a sample makes its threshold NaN as
``torch.quantile`` does. A term the scheduler's formula does not have (its coefficient -0.0 in the
table: ``diffusion.tables.mark_absent``) is not evaluated, so an inf does not become 0 * inf = NaN
there; a coefficient that is 0 in some rows only multiplies as diffusers does. Two divergences, by
design: with an infinite input, where diffusers forms inf - inf in an intermediate difference (Euler's
(x - x0) / sigma) the fused linear combination may give +-inf where diffusers gives NaN; and where
diffusers overflows a float16 intermediate, the step (float32 math) stays finite and accurate. The
CUDA kernel flushes subnormal intermediates to zero (``--use_fast_math``).

Memory layout: the outputs are allocated dense with the batch outermost, each sample's elements in
the memory order of ``sample`` (``channels_last`` stays ``channels_last``; a broadcast or
overlapping sample takes the model output's order, else the contiguous one). Inputs are never
copied: :func:`geometry` says whether every input can be read at the output's positions (the
common case) or through its strides, over at most four merged dims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .._backend import Capabilities, dispatcher, forced_backend, interpret_mode
from .._contract import CPN, X0M, X0X
from ..kernels import diffusion_cuda
from ..reference import diffusion as ref
from ._library import custom_op

# Triton leads: its kernel covers every scheduler and layout and is verified under the interpreter,
# while the CUDA twin (single-step schedulers, contiguous inputs) has not yet run on a GPU; it serves
# when forced or when Triton cannot take the input. Both are memory-bound one-pass kernels.
STEP = dispatcher("diffusion_step", order=("triton", "cuda", "reference"))
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
TRITON = Capabilities("triton", dtypes=_FLOATS)
REFERENCE = Capabilities("reference", dtypes=_FLOATS + (torch.float64,))
MAX_BATCH = 65535  # the kernels' grid axis 1
MAX_DIMS = 4       # merged dims of the strided read path
_READS = ("sample", "model_output", "cond", "variance", "last", "h1", "h2", "h3", "noise")
_geometries: dict[tuple, torch.Tensor] = {}


# ----------------------------------------------------------------------------------------------
# Layout
# ----------------------------------------------------------------------------------------------
def _order(t: torch.Tensor) -> list[int]:
    """The non-batch dims of ``t`` from outermost to innermost in memory (ties: logical order)."""
    return sorted(range(1, t.dim()), key=lambda d: (-t.stride(d), d))


def _dense(t: torch.Tensor) -> bool:
    """Whether ``t`` is non-overlapping and dense (no broadcast, no gaps) with the batch outermost."""
    if t.is_contiguous():
        return True
    if t.dim() and t.shape[0] > 1 and any(t.stride(0) < t.stride(d) for d in range(1, t.dim()) if t.shape[d] > 1):
        return False
    expected = 1
    for d in reversed([0] + _order(t)):
        if t.shape[d] != 1:
            if t.stride(d) != expected:
                return False
            expected *= t.shape[d]
    return True


def alloc_like(shape, source: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised dense tensor of ``shape``: batch outermost, the rest in ``source``'s memory order."""
    if source.is_contiguous():
        return torch.empty(shape, dtype=dtype, device=source.device)
    order = [0] + _order(source)
    t = torch.empty([shape[d] for d in order], dtype=dtype, device=source.device)
    return t.permute([order.index(d) for d in range(len(order))])


def layout_source(*tensors: torch.Tensor | None) -> torch.Tensor:
    """The first dense tensor of ``tensors`` (its memory order is the outputs'), else the first one."""
    return next((t for t in tensors if t is not None and _dense(t)), tensors[0])


def geometry(out: torch.Tensor, reads: tuple) -> tuple | None:
    """How the kernels read ``reads`` (tensors shaped like ``out``, or None) at out's positions.

    None: flat (each input's per-sample strides equal out's). Else ``(key, sizes, strides)``: the
    non-batch dims in out's memory order, merged where every tensor is contiguous across them, padded
    to ``MAX_DIMS`` (sizes) and one row of strides per input; ``key`` is None when more than
    ``MAX_DIMS`` dims remain (the kernels cannot take it).
    """
    if out.is_contiguous() and all(t is None or t.is_contiguous() for t in reads):
        return None  # every tensor has out's shape: contiguous ones have out's strides
    dims = [d for d in _order(out) if out.shape[d] != 1]
    flat = [t is None or all(t.stride(d) == out.stride(d) for d in dims) for t in reads]
    if all(flat):
        return None
    tensors = [out] + [t for t in reads if t is not None]
    merged = [[d] for d in dims[:1]]
    for d in dims[1:]:
        prev = merged[-1][-1]
        if all(t.stride(prev) == t.stride(d) * t.shape[d] for t in tensors):
            merged[-1].append(d)
        else:
            merged.append([d])
    if len(merged) > MAX_DIMS:
        return (None, (), ())
    merged = [[]] * (MAX_DIMS - len(merged)) + merged
    sizes = tuple(int(torch.Size([out.shape[d] for d in g]).numel()) for g in merged)
    strides = tuple(tuple(t.stride(g[-1]) if (t is not None and g) else 0 for g in merged) for t in reads)
    return ((sizes, strides), sizes, strides)


def geometry_table(geo: tuple | None, device: torch.device) -> torch.Tensor | None:
    """The int64 device table [sizes; strides of each input] of ``geo`` (cached per geometry and device)."""
    if geo is None:
        return None
    key = (geo[0], str(device))
    table = _geometries.get(key)
    if table is None:
        if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
            raise RuntimeError("diffusion_step: a new input layout inside a CUDA-graph capture; run the loop once "
                               "eagerly first (seqgen_fast.diffusion.sample does)")
        values = list(geo[1]) + [s for row in geo[2] for s in row]
        table = torch.tensor(values, dtype=torch.int64).to(device)
        if len(_geometries) >= 64:
            _geometries.clear()
        _geometries[key] = table
    return table


# ----------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------
def _tensors(args) -> tuple:
    """The tensor arguments of a call, the sample first (what Capabilities.reasons reads)."""
    return tuple(args[i] for i in (0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 11, 12, 14, 15, 18, 23))


def _triton_supports(*args, geo=None) -> list[str]:
    x = args[0]
    why = TRITON.reasons(*_tensors(args))
    for name, t in zip(_READS, args[:9]):
        if t is not None and t.dtype not in _FLOATS:
            why.append(f"{name} dtype {t.dtype} (the triton kernel reads {', '.join(map(str, _FLOATS))})")
    for name, dt in zip(("out", "aux", "conv", "xs"), args[24:28]):
        if dt is not None and dt not in _FLOATS:
            why.append(f"{name} dtype {dt} (the triton kernel writes {', '.join(map(str, _FLOATS))})")
    if x.dim() and x.shape[0] > MAX_BATCH:
        why.append(f"batch {x.shape[0]} > {MAX_BATCH} (the kernel's grid axis 1)")
    if geo is not None and geo[0] is None:
        why.append(f"an input's strides leave more than {MAX_DIMS} dims to walk (the kernel reads at most "
                   f"{MAX_DIMS}; the reference backend reads any strides)")
    if args[23] is not None and args[23].dtype != torch.int64:
        why.append(f"rng_offset dtype {args[23].dtype} (the kernels read one int64)")
    return why


def _cuda_supports(*args, geo=None) -> list[str]:
    return diffusion_cuda.supports(*args, flat=geo is None)


# Each backend runs a call from its plan (built once per call signature by ``_Plan.build``, see below).
def _plan_triton(args: tuple, outputs: tuple, geo) -> tuple:
    from ..kernels import diffusion as k

    return k, k.plan(*args, outputs=outputs, strided=geo is not None), geometry_table(geo, args[0].device)


@STEP.register("triton", supports=_triton_supports, caps=TRITON)
def _step_triton(*args, outputs, geo, plan):
    k, launch, table = plan
    if launch is not None:
        k.launch(launch, k.slots(args, outputs, table), args[10], args[21], args[22], args[13])
    return outputs


@STEP.register("cuda", supports=_cuda_supports, caps=diffusion_cuda.CAPS)
def _step_cuda(*args, outputs, geo, plan):
    diffusion_cuda.launch(plan, args, outputs)
    return outputs


@STEP.register("reference", supports=lambda *args, geo=None: REFERENCE.reasons(args[0]), caps=REFERENCE)
def _step_reference(*args, outputs, geo, plan):
    results = ref.diffusion_step(*args)
    for dst, src in zip(outputs, results):
        if dst.numel():
            dst.copy_(src)
    return outputs


_PLANNERS = {"triton": _plan_triton, "cuda": lambda args, outputs, geo: diffusion_cuda.plan_of(args),
             "reference": lambda args, outputs, geo: None}


# ----------------------------------------------------------------------------------------------
# Reduction passes (backend-neutral, in PyTorch on the samples' device, no host sync)
# ----------------------------------------------------------------------------------------------
def rescale_factor(u: torch.Tensor, k: torch.Tensor, guidance_scale: float, guidance: torch.Tensor | None,
                   guidance_rescale: float) -> torch.Tensor:
    """Per-sample factor f of diffusers' ``rescale_noise_cfg``: rescaled m = f * m (a reduction pass).

    f_b = r * std(k_b) / std(m_b) + (1 - r), std over all non-batch dims (unbiased), computed in float32.
    """
    m = ref.guided(u, k, guidance_scale, guidance, torch.float32)
    dims = list(range(1, m.dim()))
    return guidance_rescale * k.float().std(dim=dims) / m.std(dim=dims) + (1.0 - guidance_rescale)


@torch._dynamo.assume_constant_result
def _quantile_rank(ratio: float, n: int) -> tuple[int, int, float]:
    """(floor, ceiling, fraction) of torch.quantile's rank ratio * (n - 1) of n float32 values, computed in
    float32 as torch does (a host computation: constant under torch.compile)."""
    pos = np.float32(ratio) * np.float32(n - 1)
    lo = int(np.floor(pos))
    return lo, min(int(np.ceil(pos)), n - 1), float(pos - lo)


def threshold_scale(x0: torch.Tensor, ratio: float, max_value: float) -> torch.Tensor:
    """Dynamic-thresholding scale s_b = clamp(quantile(|x0_b|, ratio), 1, max_value), a (B,) float32 tensor.

    The quantile is torch.quantile's linear interpolation, written as a sort and a gather so it has
    no size limit and no host sync. As torch.quantile, the rank ratio * (n - 1) is computed in the
    values' dtype, and it interpolates between its floor and its ceiling: a rank that lands on an
    element takes that element alone, with no 0 * inf from an infinite neighbour. A sample holding a
    NaN gets a NaN scale, as torch.quantile gives (the sort puts NaN last, where the interpolation
    alone would not see it).
    """
    a = x0.float().reshape(x0.shape[0], -1).abs().sort(dim=1).values
    lo, hi, w = _quantile_rank(float(ratio), a.shape[1])
    s = torch.lerp(a[:, lo], a[:, hi], torch.full_like(a[:, lo], w))
    s = torch.where(a[:, -1].isnan(), a[:, -1], s)
    return s.clamp(min=1.0, max=max_value)


def predict_x0(x, u, k, coef, key, timesteps, schedule_timesteps, guidance_scale, guidance, model_scale,
               noise_pre: torch.Tensor | None) -> torch.Tensor:
    """x0 before clipping (the input of the thresholding pass), in float32 (float64 for float64 inputs)."""
    dt = torch.float64 if x.dtype == torch.float64 else torch.float32
    c = ref.gather_rows(coef, x.shape[0], key, timesteps, schedule_timesteps).to(dt)
    m = ref.guided(u, k, guidance_scale, guidance, dt)
    if model_scale is not None:
        m = m * ref.bcast(model_scale.to(dt), m.dim())
    xf = x.to(dt)
    col = lambda i: ref.bcast(c[:, i], xf.dim())  # noqa: E731
    if noise_pre is not None:
        xf = xf + ref.times(col(CPN), noise_pre.to(dt))
    return ref.times(col(X0X), xf) + ref.times(col(X0M), m)  # the step's terms, absent ones skipped


# ----------------------------------------------------------------------------------------------
# The op and the public step
# ----------------------------------------------------------------------------------------------
def _outputs(x, u, out_dtype, aux_dtype, conv_dtype, xs_dtype) -> tuple:
    src = layout_source(x, u)
    return tuple(alloc_like(x.shape, src, dt) if dt is not None else x.new_empty(0)
                 for dt in (out_dtype, aux_dtype, conv_dtype, xs_dtype))


def _step_fake(x, u, k, v, last, h1, h2, h3, noise, coef, key, timesteps, schedule_timesteps, guidance_scale,
               guidance, model_scale, x0_mode, clip_range, threshold, noise_mode, var_mode, seed, offset, rng_offset,
               out_dtype, aux_dtype, conv_dtype, xs_dtype, backend):
    return _outputs(x, u, out_dtype, aux_dtype, conv_dtype, xs_dtype)


@custom_op("diffusion_step", fake=_step_fake)
def _step_op(x: torch.Tensor, u: torch.Tensor, k: Optional[torch.Tensor], v: Optional[torch.Tensor],
             last: Optional[torch.Tensor], h1: Optional[torch.Tensor], h2: Optional[torch.Tensor],
             h3: Optional[torch.Tensor], noise: Optional[torch.Tensor], coef: torch.Tensor, key: int,
             timesteps: Optional[torch.Tensor], schedule_timesteps: Optional[torch.Tensor], guidance_scale: float,
             guidance: Optional[torch.Tensor], model_scale: Optional[torch.Tensor], x0_mode: int, clip_range: float,
             threshold: Optional[torch.Tensor], noise_mode: int, var_mode: int, seed: int, offset: int,
             rng_offset: Optional[torch.Tensor], out_dtype: torch.dtype, aux_dtype: Optional[torch.dtype],
             conv_dtype: Optional[torch.dtype], xs_dtype: Optional[torch.dtype],
             backend: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    args = (x, u, k, v, last, h1, h2, h3, noise, coef, key, timesteps, schedule_timesteps, guidance_scale, guidance,
            model_scale, x0_mode, clip_range, threshold, noise_mode, var_mode, seed, offset, rng_offset, out_dtype,
            aux_dtype, conv_dtype, xs_dtype)
    plan = _plan(args, backend)
    return plan.impl(*args, outputs=_outputs(x, u, out_dtype, aux_dtype, conv_dtype, xs_dtype), geo=plan.geo,
                     plan=plan.launch)


# ----------------------------------------------------------------------------------------------
# A plan per call signature (eager calls, and the op's own runs under torch.compile)
# ----------------------------------------------------------------------------------------------
def _signature(t: torch.Tensor | None):
    return None if t is None else (t.dtype, t.shape, t.stride(), t.device)


def _plan_key(args: tuple, backend: str | None) -> tuple:
    """Everything the backend choice, the output layout, the read geometry and the launch plan depend on:
    each tensor's dtype, shape (the reads have x's: see :func:`step`), strides and device, the modes, the
    output dtypes, whether the step looks its row up on the device, whether the guidance halves are
    adjacent (the cuda kernel reads them as one tensor), the 64-bit noise offset bit, the forced backend
    and (for CPU tensors) the interpreter switch."""
    x, u, k, v, last, h1, h2, h3, noise, coef, key, ts, sched, _, g, ms, x0_mode, _, thr, nm, vm, _, off, rng = \
        args[:24]
    sig = _signature
    rare = None  # the inputs most steps do not have
    if not (v is None and last is None and h2 is None and h3 is None and noise is None and sched is None and g is None
            and ms is None and thr is None and rng is None):
        rare = (sig(v), sig(last), sig(h2), sig(h3), sig(noise), sig(sched), sig(g), sig(ms), sig(thr), sig(rng))
    return (forced_backend(backend), None if x.is_cuda else interpret_mode(),
            x.dtype, x.shape, x.stride(), x.device, u.dtype, u.stride(), u.device, coef.dtype, coef.shape,
            coef.stride(), coef.device, None if k is None else (
                k.dtype, k.stride(), k.device, k.data_ptr() == u.data_ptr() + u.numel() * u.element_size()),
            sig(h1), sig(ts), rare, key < 0, x0_mode, nm, vm, off >> 32 != 0, args[24:28])


@dataclass(eq=False)
class _Plan:
    """What the calls of one signature share: the backend and its implementation, how the outputs are
    allocated, the read geometry and the backend's launch plan (built once, from the first call)."""

    backend: str
    impl: object       # STEP.impl(backend)
    alloc: tuple       # the (out, aux, conv, xs) dtypes, None for an output not written
    like: bool         # every output is empty_like(the layout source) (else alloc_like builds the layout)
    source: int        # the layout source of the outputs: 0 sample, 1 model output
    empty: torch.Tensor
    geo: tuple | None
    launch: object = None

    @classmethod
    def build(cls, args: tuple, backend: str | None) -> "_Plan":
        x, u = args[0], args[1]
        outputs = _outputs(x, u, *args[24:28])
        src = layout_source(x, u)
        like = x.shape == src.shape and all(
            dt is None or out.stride() == torch.empty_like(src, dtype=dt).stride()
            for dt, out in zip(args[24:28], outputs))
        geo = geometry(outputs[0], args[:9])
        chosen = STEP.select(*args, backend=backend, geo=geo)
        return cls(chosen, STEP.impl(chosen), args[24:28], like, 0 if src is x else 1, x.new_empty(0), geo,
                   _PLANNERS[chosen](args, outputs, geo))

    def outputs(self, args: tuple) -> tuple:
        """Fresh outputs in the plan's layout (``empty`` for those not written)."""
        src, e = args[self.source], self.empty
        if not self.like:
            return tuple(e if dt is None else alloc_like(args[0].shape, src, dt) for dt in self.alloc)
        out, aux, conv, xs = self.alloc
        new = torch.empty_like
        return (new(src, dtype=out), e if aux is None else new(src, dtype=aux), e if conv is None else
                new(src, dtype=conv), e if xs is None else new(src, dtype=xs))


_plans: dict[tuple, _Plan] = {}


def _plan(args: tuple, backend: str | None) -> _Plan:
    """The plan of the call signature of ``args`` (the op's arguments), built on its first call."""
    key = _plan_key(args, backend)
    plan = _plans.get(key)
    if plan is None:
        if len(_plans) >= 256:
            _plans.clear()
        plan = _plans[key] = _Plan.build(args, backend)
    return plan


def diffusion_step(sample: torch.Tensor, model_output: torch.Tensor, coef: torch.Tensor, key: int,
                   timesteps: torch.Tensor | None = None, schedule_timesteps: torch.Tensor | None = None, *,
                   cond: torch.Tensor | None = None, variance: torch.Tensor | None = None,
                   last: torch.Tensor | None = None, history: tuple = (), guidance_scale: float = 0.0,
                   guidance: torch.Tensor | None = None, guidance_rescale: float = 0.0, x0_mode: int = 0,
                   clip_range: float = 1.0, threshold_ratio: float = 0.995, threshold_max: float = 1.0,
                   noise: torch.Tensor | None = None, noise_mode: int = 0, var_mode: int = 0, seed: int = 0,
                   offset: int = 0, rng_offset: torch.Tensor | None = None, out_dtype: torch.dtype | None = None,
                   aux_dtype: torch.dtype | None = None, conv_dtype: torch.dtype | None = None,
                   xs_dtype: torch.dtype | None = None, backend: str | None = None) -> tuple:
    """One fused scheduler step for a batch of samples; returns ``(out, aux, conv, xs)`` (empty when not asked).

    ``sample`` (B, ...) sets the shape; every other tensor is broadcast to it (views, no copy):
    ``model_output`` (its unconditional half when ``cond`` is given), ``cond``, ``variance``,
    ``last``, ``history`` (up to three tensors: h1, h2, h3) and ``noise``. The other arguments are
    those of ``seqgen_fast.reference.diffusion.diffusion_step``, plus ``guidance_rescale`` (r of
    diffusers' ``rescale_noise_cfg``; 0 = off) and ``threshold_ratio``/``threshold_max`` (dynamic
    thresholding, x0_mode 2). ``coef`` is a (rows, NCOEF) float32 table on the samples' device.
    ``offset`` is a 64-bit stream offset; ``rng_offset`` (a 1-element int64 device tensor, or None) is
    added to it where the noise is drawn, on the device: the offset a captured CUDA graph reads at
    each replay. ``out_dtype`` defaults to the sample's dtype.
    """
    hist = tuple(history) + (None,) * (3 - len(history))
    return step((sample, model_output, cond, variance, last, *hist, noise if noise_mode == 1 else None, coef, int(key),
                 timesteps, schedule_timesteps, float(guidance_scale), guidance, None, x0_mode, float(clip_range),
                 None, noise_mode, var_mode, int(seed), int(offset) % 2**64, rng_offset, out_dtype or sample.dtype,
                 aux_dtype, conv_dtype, xs_dtype), float(guidance_rescale), threshold_ratio, threshold_max, backend)


def step(args: tuple, guidance_rescale: float = 0.0, threshold_ratio: float = 0.995, threshold_max: float = 1.0,
         backend: str | None = None) -> tuple:
    """:func:`diffusion_step` with the op's arguments as one tuple, in the op's order and types (``key``,
    ``seed`` and ``offset`` Python ints, the offset in [0, 2^64), ``guidance_scale`` and ``clip_range``
    floats, ``out_dtype`` set); the ``model_scale`` and ``threshold`` slots are filled here from
    ``guidance_rescale`` and the threshold options. The entry of ``seqgen_fast.diffusion``'s schedulers,
    which build the tuple themselves."""
    x, u, k, v, last, h1, h2, h3, noise = args[:9]
    shape = x.shape
    if (u.shape != shape or k is not None and k.shape != shape or v is not None and v.shape != shape
            or last is not None and last.shape != shape or h1 is not None and h1.shape != shape
            or h2 is not None and h2.shape != shape or h3 is not None and h3.shape != shape
            or noise is not None and noise.shape != shape):  # broadcast inputs: views of x's shape
        args = (x, *(t if t is None or t.shape == shape else t.expand(shape) for t in args[1:9]), *args[9:])
        u, k = args[1], args[2]
    x0_mode = args[16]
    if guidance_rescale or x0_mode == 2:
        model_scale = threshold = None
        if guidance_rescale:
            model_scale = rescale_factor(u, k, args[13], args[14], guidance_rescale)
        if x0_mode == 2:
            x0 = predict_x0(x, u, k, args[9], args[10], args[11], args[12], args[13], args[14], model_scale,
                            args[8] if args[19] == 1 else None)
            threshold = threshold_scale(x0, threshold_ratio, threshold_max)
        args = (*args[:15], model_scale, x0_mode, args[17], threshold, *args[19:])
    if x.numel() == 0:
        return _outputs(x, u, *args[24:28])
    if torch.compiler.is_compiling():
        outputs = _outputs(x, u, *args[24:28])
        return _step_op(*args, STEP.select(*args, backend=backend, geo=geometry(outputs[0], args[:9])))
    # Eager calls skip the torch.library dispatcher (its argument handling alone costs more host time than
    # the step) and run from the plan of their call signature: backend, output layout, geometry, launch.
    # (Outputs not written share one empty tensor here; the op returns distinct ones.)
    plan = _plan(args, backend)
    return plan.impl(*args, outputs=plan.outputs(args), geo=plan.geo, plan=plan.launch)
