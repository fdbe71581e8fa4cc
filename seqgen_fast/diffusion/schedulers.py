"""``fast_scheduler(scheduler)``: the same diffusers scheduler, stepping with the fused kernels.

``fast_scheduler(s)`` returns an instance of a subclass of ``type(s)`` made at run time
(:func:`fast_class`; no diffusers import needed): it has the same class name, module, config,
``from_config``/``save_pretrained``/``from_pretrained`` and ``compatibles``, and it *shares* ``s``'s
attribute dictionary, so every attribute read and write (``_step_index``, ``lower_order_nums``,
``model_outputs``, ``timesteps``...) reaches the state diffusers' own methods use. Only ``step`` is
replaced: it has the wrapped ``step``'s exact signature plus the keyword-only extras
``guidance_scale`` and ``guidance_rescale`` (and ``variance_noise`` where the wrapped step has none),
and runs one fused kernel (two more small passes with dynamic thresholding or guidance rescale).
The fused subclass can also be constructed directly (``fast_class(DDIMScheduler)(**config)``).

The coefficient tables (``seqgen_fast.diffusion.tables``) are computed in float64 on the host from
the scheduler's schedule the first time a step needs them, and cached on the device. When the
schedule objects change (``set_timesteps``, a new ``alphas_cumprod``...), every table used so far is
rebuilt: ``set_timesteps`` rebuilds them at once, so that compiled steps find them. ``timestep`` may be a
(B,) tensor: each sample steps at its own timestep (DDPM/DDIM/LCM-style: the row of that timestep;
sigma schedules: the position of that timestep in ``timesteps``), and the step-index counter is
left alone. State updates (step index, solver history, ``lower_order_nums``, UniPC's
``last_sample``/``this_order``/``timestep_list``) are diffusers' own, in diffusers' attributes.

Noise: ``variance_noise=`` is used as given. A ``generator`` decides the noise: on the CPU (or for
CPU samples) it is drawn exactly as diffusers draws it (same values, the generator advanced alike);
a CUDA generator keys an in-kernel Philox stream from its (seed, offset) and is advanced as a draw
of that size advances it. Otherwise the noise is drawn in the kernel from (seed, offset), the seed
fixed at construction (``seed=``) and the offset advanced by one each noisy step: reproducible per
backend (the Triton, CUDA and reference streams differ) and per memory layout.

Inside ``torch.compile`` the step traces with ``fullgraph=True``: diffusers' int counters and the noise
offset are kept on the device, and the coefficient rows are chosen there (``seqgen_fast.diffusion.compiled``
says how, and what differs from an eager step).

A call the fused step does not take (a UniPC ``solver_p``, flow matching's ``per_token_timesteps``,
a combination diffusers itself rejects...) runs diffusers' own ``step`` with the same arguments
(guidance applied first), so its result and its errors are diffusers'; the reason is logged at
debug level on the ``seqgen_fast.diffusion`` logger.
"""
from __future__ import annotations

import functools
import inspect
import logging
import os
from dataclasses import dataclass, field

import numpy as np
import torch

from .. import _contract as C
from ..ops import diffusion as ops
from . import compiled, configs, tables

log = logging.getLogger("seqgen_fast.diffusion")


class Unfused(Exception):
    """This call is left to diffusers' own step (the message says why)."""


@dataclass
class _Table:
    rows: np.ndarray                       # (rows, NCOEF) float64 on the host
    coef: torch.Tensor                     # (rows, NCOEF) float32 on the device
    schedule: torch.Tensor | None = None   # (n,) float32 schedule timesteps for device lookups
    build: tuple = ()                      # (builder, its arguments after the scheduler): to rebuild it
    churn: bool = False                    # some row adds Euler's churn noise


@dataclass
class _State:
    """seqgen_fast's own per-wrapper state (never in the shared diffusers attributes)."""

    seed: int
    write_x0: bool = True
    backend: str | None = None
    offset: int = 0
    rng_offset: torch.Tensor | None = None   # device-side offset added to ``offset`` (graph capture)
    tables: dict = field(default_factory=dict)
    pending: dict = field(default_factory=dict)  # tables built while a step was traced (compiled.table_while_tracing)
    compiled_offset: torch.Tensor | None = None  # the device part of the noise offset of compiled steps
    source: tuple = (None,) * 9        # the schedule objects the tables were computed from (FastScheduler._source)
    source_ids: tuple = ()
    graphs: dict = field(default_factory=dict)  # sampling.sample's captured loops


def _new_seed() -> int:
    """A fresh stream seed from the OS (never from torch's generators: that would move the caller's draws)."""
    return int.from_bytes(os.urandom(8), "little") >> 2


def _promote(a: torch.dtype, b: torch.dtype) -> torch.dtype:
    return a if a is b else torch.promote_types(a, b)


class FastScheduler:
    """The mixin of every fused scheduler class: ``fast_class(cls)`` is ``(FastScheduler, cls)``."""

    __slots__ = ()
    _base: type = None        # the diffusers class the step reproduces
    _kind: configs.Kind = None
    _params: tuple = ()       # the wrapped step's parameter names after ``self``
    _output: type = None      # the output dataclass of the wrapped step
    _fused = None             # the fused step of the kind (``_STEPS``)

    def __new__(cls, *args, **kwargs):
        obj = super().__new__(cls)
        obj._sf_state = _State(seed=_new_seed())
        return obj

    # -- seqgen_fast's own options -------------------------------------------------------------
    @property
    def _sf(self) -> _State:
        return self._sf_state

    seed = property(lambda self: self._sf.seed, lambda self, v: setattr(self._sf, "seed", int(v)),
                    doc="The seed of the in-kernel noise stream.")
    offset = property(lambda self: self._sf.offset, lambda self, v: setattr(self._sf, "offset", int(v)),
                      doc="The offset of the next in-kernel noise draw (advances by one per noisy step).")
    backend = property(lambda self: self._sf.backend, lambda self, v: setattr(self._sf, "backend", v),
                       doc="The forced backend (None: automatic dispatch).")

    def __reduce_ex__(self, protocol):
        sf = self._sf
        return _rebuild, (type(self).__mro__[2], self.__dict__, (sf.seed, sf.write_x0, sf.backend, sf.offset))

    def rewind(self) -> None:
        """Back to the first step of the current schedule (step index 0, no solver history), keeping the tables."""
        if hasattr(self, "set_begin_index"):
            self.set_begin_index(0)
            self._step_index = None
        order = self.config.get("solver_order")
        if self._kind.name in ("dpm", "unipc"):
            self.lower_order_nums = 0
            self.model_outputs = [None] * order
        if self._kind.name == "unipc":
            self.timestep_list = [None] * order
            self.last_sample = None

    def _keep_alive(self) -> list[torch.Tensor]:
        """The device buffers a captured graph reads (tables, geometry)."""
        out = [t.coef for t in self._sf.tables.values()]
        return out + [t.schedule for t in self._sf.tables.values() if t.schedule is not None]

    # -- tables ---------------------------------------------------------------------------------
    def _source(self) -> tuple:
        """The schedule objects the tables are computed from (compared by identity), and UniPC's
        ``disable_corrector`` (a list: compared by value)."""
        d = self.__dict__
        return (d.get("timesteps"), d.get("sigmas"), d.get("alphas_cumprod"), d.get("num_inference_steps"),
                d.get("custom_timesteps"), d.get("variance_type"), d.get("_internal_dict"),
                d.get("final_alpha_cumprod"), tuple(d.get("disable_corrector") or ()))

    def _table(self, device: torch.device, build, *args, schedule: bool = False) -> _Table:
        """The table ``build(self, *args)`` (``tables``; ``schedule``: with the schedule's timesteps) on ``device``."""
        sf = self._sf
        key = (build.__name__, *args, device)
        if torch.compiler.is_dynamo_compiling():
            tab = sf.tables.get(key)
            return tab if tab is not None else compiled.table_while_tracing(self, key, build, args, schedule)
        src = self._source()
        # identities: sf.source holds the previous objects, so their ids cannot have been reused
        if tuple(map(id, src[:-1])) != sf.source_ids or src[-1] != sf.source[-1]:
            self._refresh_tables()
        tab = sf.tables.get(key)
        if tab is None:
            if device.type == "cuda" and torch.cuda.is_current_stream_capturing():
                raise RuntimeError(f"{type(self).__name__}.step: a coefficient table is built inside a CUDA-graph "
                                   "capture; run the loop once eagerly first (seqgen_fast.diffusion.sample does)")
            tab = sf.tables[key] = sf.pending.pop(key, None) or self._build_table(device, build, args, schedule)
        return tab

    def _build_table(self, device: torch.device, build, args: tuple, schedule: bool) -> _Table:
        rows = tables.mark_absent(build(self, *args))
        sched = torch.as_tensor(tables.host(self.timesteps), dtype=torch.float32).to(device) if schedule else None
        return _Table(rows, torch.as_tensor(rows, dtype=torch.float32).to(device), sched, (build, args),
                      rows.shape[1] == C.NCOEF and bool((rows[:, C.CPN] > 0).any()))

    def _refresh_tables(self) -> None:
        """Every table used so far rebuilt from the current schedule (``set_timesteps``, a schedule object
        replaced). One whose builder now fails (a key the new schedule has no row for) is dropped: it is built
        again, with its error, when a step needs it."""
        sf = self._sf
        used = {**sf.pending, **sf.tables}
        sf.tables, sf.pending = {}, {}
        src = self._source()
        sf.source, sf.source_ids = src, tuple(map(id, src[:-1]))
        for key, tab in used.items():
            try:
                sf.tables[key] = self._build_table(key[-1], *tab.build, tab.schedule is not None)
            except (ValueError, IndexError, TypeError, ZeroDivisionError):
                pass

    # -- the step --------------------------------------------------------------------------------
    def _fused_step(self, opts: dict, guidance_scale, guidance_rescale, variance_noise):
        """The step: ``opts`` are the wrapped step's arguments by name (bound by the generated ``step``)."""
        traced = torch.compiler.is_dynamo_compiling()
        if not traced:
            compiled.to_host(self)
        call = _Call(self, opts, guidance_scale, guidance_rescale, variance_noise, traced)
        try:
            return self._fused(self, call)
        except Unfused as why:
            log.debug("%s.step runs diffusers' own step: %s", type(self).__name__, why)
            return call.diffusers_step()


def _rebuild(cls: type, state: dict, options: tuple):
    """Unpickle / copy a fused scheduler (``FastScheduler.__reduce_ex__``)."""
    made = fast_class(cls)
    obj = made.__new__(made)
    obj.__dict__.update(state)
    sf = obj._sf
    sf.seed, sf.write_x0, sf.backend, sf.offset = options
    return obj


class _Call:
    """One step call: the bound arguments, the model output split for guidance, noise and launch helpers."""

    __slots__ = ("s", "sf", "opts", "guidance_scale", "guidance_rescale", "variance_noise", "cfg", "u", "k",
                 "sample", "device", "traced", "index")

    def __init__(self, s: FastScheduler, opts: dict, guidance_scale, guidance_rescale, variance_noise, traced: bool):
        self.s, self.sf, self.opts = s, s._sf_state, opts
        self.traced = traced  # inside torch.compile: the state on the device (``compiled``)
        self.index = None     # traced: the step index, a (1,) device tensor
        mo, sample = opts["model_output"], opts["sample"]
        if not isinstance(sample, torch.Tensor) or not isinstance(mo, torch.Tensor):
            raise TypeError(f"{type(s).__name__}.step: sample and model_output must be tensors, got "
                            f"{type(sample).__name__} and {type(mo).__name__}")
        self.device = device = sample.device
        if mo.device != device:
            raise ValueError(f"{type(s).__name__}.step: model_output is on {mo.device}, sample on {device}")
        self.guidance_scale, self.guidance_rescale = guidance_scale, float(guidance_rescale or 0.0)
        self.variance_noise = variance_noise
        self.cfg = guidance_scale is not None
        if self.cfg:
            B = sample.shape[0]
            if mo.shape[0] != 2 * B:
                raise ValueError(f"{type(s).__name__}.step: model_output has {mo.shape[0]} rows, expected {2 * B} "
                                 f"(the [unconditional; conditional] batch of 2B for guidance_scale)")
            self.u, self.k = mo[:B], mo[B:]
        else:
            if self.guidance_rescale:
                raise ValueError(f"{type(s).__name__}.step: guidance_rescale needs guidance_scale (the fused CFG "
                                 "batch)")
            self.u, self.k = mo, None
        self.sample = sample

    # -- shapes and dtypes --
    def shape(self, u: torch.Tensor) -> torch.Size:
        if u.shape == self.sample.shape:
            return self.sample.shape
        try:
            return torch.broadcast_shapes(self.sample.shape, u.shape)
        except RuntimeError:
            raise ValueError(f"{type(self.s).__name__}.step: model_output of shape {tuple(u.shape)} does not "
                             f"broadcast with sample of shape {tuple(self.sample.shape)}") from None

    def guidance(self, B: int):
        """(scalar g, per-sample g tensor or None)."""
        g = self.guidance_scale
        if not self.cfg:
            return 0.0, None
        if isinstance(g, torch.Tensor):
            if g.dim() == 0:
                return 0.0, g.to(self.device, torch.float32).reshape(1).expand(B).contiguous()
            if tuple(g.shape) != (B,):
                raise ValueError(f"{type(self.s).__name__}.step: guidance_scale must be a float or a ({B},) tensor, "
                                 f"got shape {tuple(g.shape)}")
            return 0.0, g.to(self.device, torch.float32).contiguous()
        return float(g), None

    def guided(self) -> torch.Tensor:
        """The guided model output in torch (for diffusers' own step)."""
        if not self.cfg:
            return self.u
        from ..reference.diffusion import bcast, guided

        g, per = self.guidance(self.u.shape[0])
        m = guided(self.u, self.k, g, per, torch.float32)
        if self.guidance_rescale:
            m = m * bcast(ops.rescale_factor(self.u, self.k, g, per, self.guidance_rescale), m.dim())
        return m.to(self.u.dtype)

    def diffusers_step(self):
        opts = dict(self.opts)
        if isinstance(opts["timestep"], torch.Tensor) and opts["timestep"].dim() == 1 and opts["timestep"].numel() > 1:
            raise ValueError(f"{type(self.s).__name__}.step: per-sample timesteps need the fused step, which cannot "
                             "take this call")
        opts["model_output"] = self.guided()
        if self.variance_noise is not None and "variance_noise" not in self.s._params:
            raise ValueError(f"{type(self.s).__name__}.step: variance_noise needs the fused step, which cannot take "
                             "this call")
        return super(type(self.s), self.s).step(**opts)

    # -- noise --
    def noise(self, noisy: bool, shape, dtype, out_shape) -> tuple:
        """(noise_mode, noise tensor, seed, offset, device offset or None) of a step; diffusers draws ``shape``
        in ``dtype``."""
        sf = self.sf
        if not noisy:
            return 0, None, sf.seed, 0, None
        given = self.variance_noise
        gen = self.opts.get("generator")
        if given is not None:
            if not isinstance(given, torch.Tensor):
                raise TypeError(f"{type(self.s).__name__}.step: variance_noise must be a tensor")
            try:
                torch.broadcast_shapes(given.shape, out_shape)
            except RuntimeError:
                raise ValueError(f"{type(self.s).__name__}.step: variance_noise has shape {tuple(given.shape)}, "
                                 f"expected {tuple(out_shape)}") from None
            return 1, given.to(self.device), sf.seed, 0, None
        if gen is not None:
            cuda_gen = not isinstance(gen, list) and torch.device(gen.device).type == "cuda" and self.device.type == "cuda"
            if cuda_gen:
                seed, offset = configs.generator_key(gen, int(torch.Size(shape).numel()))
                return 2, None, seed, offset, None
            return 1, configs.randn_like_diffusers(shape, gen, self.device, dtype), sf.seed, 0, None
        if self.traced:
            return 2, None, sf.seed, sf.offset, compiled.noise_offset(sf, self.device)
        offset = sf.offset
        sf.offset += 1
        return 2, None, sf.seed, offset, sf.rng_offset

    # -- timesteps --
    def per_sample(self) -> torch.Tensor | None:
        t = self.opts["timestep"]
        if isinstance(t, torch.Tensor) and t.dim() == 1 and t.numel() > 1:
            return t
        return None

    def run(self, tab: _Table, key: int, ts, out_shape, *, u=None, k=None, x0_mode=0, noise=(0, None, 0, 0, None),
            var_mode=0, variance=None, last=None, history=(), out_dtype, aux_dtype=None, conv_dtype=None,
            xs_dtype=None, lookup="rows"):
        """The fused op on this call (``seqgen_fast.ops.diffusion.step``, its argument tuple built here)."""
        s, cfg = self.s, self.s.config
        u = self.u if u is None else u
        k = self.k if k is None and self.cfg else k
        B = out_shape[0]
        g = self.guidance_scale
        gscale, per_g = (0.0, None) if not self.cfg else (float(g), None) if isinstance(g, (int, float)) else \
            self.guidance(B)
        if ts is not None:
            if ts.device != self.device:
                ts = ts.to(self.device)
            if ts.numel() not in (1, B):
                raise ValueError(f"{type(s).__name__}.step: timestep must be a scalar or a ({B},) tensor, "
                                 f"got shape {tuple(ts.shape)}")
        mode, n, seed, offset, rng = noise
        sample = self.sample if self.sample.shape == out_shape else self.sample.expand(out_shape)
        h1, h2, h3 = (tuple(history) + (None, None, None))[:3]
        args = (sample, u, k, variance, last, h1, h2, h3, n if mode == 1 else None, tab.coef, key, ts,
                tab.schedule if (ts is not None and lookup == "schedule") else None, gscale, per_g, None, x0_mode,
                float(cfg.get("clip_sample_range", 1.0)), None, mode, var_mode, seed, offset % 2**64,
                rng, out_dtype, aux_dtype, conv_dtype, xs_dtype)
        return ops.step(args, self.guidance_rescale, cfg.get("dynamic_thresholding_ratio", 0.995),
                        cfg.get("sample_max_value", 1.0), self.sf.backend)

    def output(self, prev, aux=None):
        s = self.s
        aux_name = s._kind.aux
        if not self.opts.get("return_dict", True):
            return (prev,) if aux_name is None else (prev, aux)
        return s._output(prev_sample=prev) if aux_name is None else s._output(**{"prev_sample": prev, aux_name: aux})


def _x0_mode(cfg, allow_clip: bool = True) -> int:
    """2 dynamic thresholding, 1 clip_sample, 0 none."""
    if cfg.get("thresholding", False):
        return 2
    return 1 if allow_clip and cfg.get("clip_sample", False) else 0


def _x0_dtype(cfg, s_dt, m_dt):
    return m_dt if cfg.prediction_type == "sample" else _promote(s_dt, m_dt)


def _integer_timestep(call: _Call, T: int, valid) -> tuple[int, torch.Tensor | None]:
    """(host row, device timesteps) of an integer-timestep kind; diffusers' own rejections, named. Traced
    (and for device timesteps), the timestep's row is found on the device: one off the schedule is a NaN row."""
    s = call.s
    t = call.opts["timestep"]
    vals = None
    if call.traced and not isinstance(t, torch.Tensor):
        t = torch.as_tensor(t)
    if isinstance(t, torch.Tensor):
        if not t.is_cpu or call.traced:
            if t.dim() > 1:
                raise ValueError(f"{type(s).__name__}.step: timestep must be a scalar or a (B,) tensor, got shape "
                                 f"{tuple(t.shape)}")
            return -1, t
        if t.dim() == 1 and t.numel() > 1:
            vals = t.tolist()
        else:
            t = t.item()
    if vals is None:
        if type(t) is not int:
            if float(t) != int(float(t)):
                raise ValueError(f"timestep: {type(s).__name__}.step takes an integer timestep, got {float(t)}")
            t = int(float(t))
        if valid(t):
            return t, None
        vals = [t]
    bad = [v for v in vals if not (v == int(v) and valid(int(v)))]
    if bad:
        raise ValueError(f"timestep: {bad[0]} is outside the schedule of {type(s).__name__} (integer timesteps in "
                         f"[0, {T})" + (", in scheduler.timesteps)" if s._kind.name == "ddpm" and (
                             s.custom_timesteps or s.num_inference_steps) else ")"))
    return -1, torch.tensor([int(v) for v in vals], dtype=torch.int64)


def _indexed(call: _Call, integer_ok: bool = False) -> tuple[int, torch.Tensor | None]:
    """(step index, None) from diffusers' own step-index bookkeeping, or (-1, per-sample timesteps); traced,
    (-1, the step index as a device tensor), also kept in ``call.index``."""
    s = call.s
    name = type(s).__name__
    t = call.opts["timestep"]
    if not integer_ok and isinstance(t, (int, torch.IntTensor, torch.LongTensor)) and not isinstance(t, bool):
        raise ValueError(f"timestep: passing integer indices (e.g. from `enumerate(timesteps)`) as timesteps to "
                         f"`{name}.step()` is not supported (as diffusers); pass one of `scheduler.timesteps`")
    per = call.per_sample()
    if per is not None:
        if per.device.type == "cpu" and not call.traced:
            known = set(tables.host(s.timesteps).astype(np.float32).tolist())
            bad = [v for v in per.to(torch.float32).tolist() if v not in known]
            if bad:
                raise ValueError(f"timestep: {bad[0]:g} is not one of {name}.timesteps")
        return -1, per
    if call.traced:
        call.index = compiled.step_index(s, t, call.device)
        return -1, call.index
    if s.step_index is None:
        s._init_step_index(t)
    return s.step_index, None


def _advance(s, call: _Call, key: int) -> None:
    """diffusers' step index moved on (not for per-sample timesteps)."""
    if key >= 0:
        s._step_index += 1
    elif call.index is not None:
        compiled.store(s, "_step_index", call.index + 1)


def _lookup(call: _Call) -> str:
    """How the kernel finds a step's row from ``ts``: the step index traced, else the timestep's position."""
    return "rows" if call.index is not None else "schedule"


def _need_steps(s):
    if s.num_inference_steps is None:
        raise ValueError("Number of inference steps is 'None', you need to run 'set_timesteps' after creating the "
                         f"scheduler ({type(s).__name__}.step)")


def _check_index(s, k: int, rows: int):
    if not 0 <= k < rows:
        raise ValueError(f"timestep: step index {k} is past the end of the schedule of {type(s).__name__} "
                         f"({rows} steps); call set_timesteps again")


# ---------------------------------------------------------------------------------------------
# The steps, one per kind
# ---------------------------------------------------------------------------------------------
def _step_ddpm(s: FastScheduler, call: _Call):
    cfg = s.config
    vt = s.variance_type
    if vt != cfg.variance_type:
        raise Unfused(f"variance_type attribute {vt!r} differs from the config's {cfg.variance_type!r}")
    sample = call.sample
    u, k, variance = call.u, call.k, None
    if u.shape[1:2] == torch.Size([2 * sample.shape[1]]) and vt in ("learned", "learned_range"):
        C_ = sample.shape[1]
        variance = (k if k is not None else u)[:, C_:]
        u, k = u[:, :C_], (k[:, :C_] if k is not None else None)
    elif vt in ("learned", "learned_range"):
        raise Unfused(f"variance_type {vt!r} with a model output that carries no variance channels")
    out_shape = call.shape(u)
    T = cfg.num_train_timesteps
    tab = s._table(call.device, tables.ddpm_rows, vt)
    key, ts = _integer_timestep(call, T, lambda t: 0 <= t < T and not np.isnan(tab.rows[t, C.AX]))
    noisy = key != 0
    m_dt = u.dtype
    noise = call.noise(noisy, u.shape, m_dt, out_shape)
    var_mode = {"learned": C.VAR_SQRT, "learned_range": C.VAR_EXP}.get(vt, C.VAR_NONE) if variance is not None else 0
    x0_dt = _x0_dtype(cfg, sample.dtype, m_dt)
    prev, x0, _, _ = call.run(tab, key, ts, out_shape, u=u, k=k, x0_mode=_x0_mode(cfg), noise=noise,
                              var_mode=var_mode, variance=variance, out_dtype=_promote(sample.dtype, m_dt),
                              aux_dtype=x0_dt if call.sf.write_x0 else None)
    return call.output(prev, x0 if call.sf.write_x0 else None)


def _step_ddim(s: FastScheduler, call: _Call):
    _need_steps(s)
    cfg = s.config
    eta, clipped = float(call.opts["eta"]), bool(call.opts["use_clipped_model_output"])
    if eta < 0:
        raise ValueError(f"{type(s).__name__}.step: eta must be >= 0, got {eta}")
    if eta > 0 and call.variance_noise is not None and call.opts.get("generator") is not None:
        raise ValueError("Cannot pass both generator and variance_noise. Please make sure that either `generator` or"
                         " `variance_noise` stays `None`.")
    T = cfg.num_train_timesteps
    out_shape = call.shape(call.u)
    tab = s._table(call.device, tables.ddim_rows, eta, clipped)
    key, ts = _integer_timestep(call, T, lambda t: 0 <= t < T)
    noise = call.noise(eta > 0, call.u.shape, call.u.dtype, out_shape)
    m_dt = call.u.dtype
    prev, x0, _, _ = call.run(tab, key, ts, out_shape, x0_mode=_x0_mode(cfg), noise=noise,
                              out_dtype=_promote(call.sample.dtype, m_dt),
                              aux_dtype=_x0_dtype(cfg, call.sample.dtype, m_dt) if call.sf.write_x0 else None)
    return call.output(prev, x0 if call.sf.write_x0 else None)


def _step_euler(s: FastScheduler, call: _Call):
    o = call.opts
    ancestral = s._kind.name == "euler_ancestral"
    if ancestral and s.config.prediction_type == "sample":
        raise NotImplementedError("prediction_type not implemented yet: sample (EulerAncestralDiscreteScheduler, "
                                  "as diffusers)")
    key, ts = _indexed(call)
    if ancestral:
        tab = s._table(call.device, tables.euler_ancestral_rows, schedule=True)
    else:
        churn = tuple(float(o[n]) for n in ("s_churn", "s_tmin", "s_tmax", "s_noise"))
        tab = s._table(call.device, tables.euler_rows, *churn, schedule=True)
    if key >= 0:
        _check_index(s, key, tab.rows.shape[0])
    out_shape = call.shape(call.u)
    m_dt = call.u.dtype
    if ancestral:
        noisy = True
    else:
        noisy = bool(tab.rows[key, C.CPN] > 0) if key >= 0 else tab.churn
    noise = call.noise(noisy, call.u.shape, m_dt, out_shape)
    x0_dt = m_dt if s.config.prediction_type in ("sample", "original_sample") else _promote(torch.float32, m_dt)
    prev, x0, _, _ = call.run(tab, key, ts, out_shape, noise=noise, out_dtype=m_dt,
                              aux_dtype=x0_dt if call.sf.write_x0 else None, lookup=_lookup(call))
    _advance(s, call, key)
    return call.output(prev, x0 if call.sf.write_x0 else None)


def _history(s, n: int, out_shape) -> tuple:
    """The solver history h1..hn (diffusers' model_outputs[-1], [-2]... before the step's shift)."""
    hist = []
    for i in range(1, n + 1):
        h = s.model_outputs[-i] if i <= len(s.model_outputs) else None
        if h is None:
            raise Unfused(f"model_outputs[-{i}] is None where the solver needs it")
        if not isinstance(h, torch.Tensor):
            raise Unfused(f"model_outputs[-{i}] is not a tensor")
        hist.append(h)
    return tuple(hist)


def _shift(s, conv, timestep=None):
    """diffusers' history shift: model_outputs (and UniPC's timestep_list) move down one, the new entry last."""
    order = s.config.solver_order
    for i in range(order - 1):
        s.model_outputs[i] = s.model_outputs[i + 1]
        if timestep is not None:
            s.timestep_list[i] = s.timestep_list[i + 1]
    s.model_outputs[-1] = conv
    if timestep is not None:
        s.timestep_list[-1] = timestep


def _warm_up(s, call: _Call, order: int) -> None:
    """diffusers' lower_order_nums moved on, up to ``order`` (solver_order; traced: on the device)."""
    if call.index is not None:
        lower = compiled.counter(s, "lower_order_nums", call.device)
        compiled.store(s, "lower_order_nums", torch.clamp(lower + 1, max=order))
    elif s.lower_order_nums < order:
        s.lower_order_nums += 1


def _conv_dtype(cfg, x0_form: bool, s_dt, m_dt, thresholding: bool):
    if x0_form:
        return _x0_dtype(cfg, s_dt, m_dt)
    if cfg.prediction_type == "epsilon" and not thresholding:
        return m_dt
    return _promote(s_dt, m_dt)


def _step_dpm(s: FastScheduler, call: _Call):
    _need_steps(s)
    cfg = s.config
    algo = cfg.algorithm_type
    x0_form = algo in ("dpmsolver++", "sde-dpmsolver++")
    if cfg.prediction_type == "flow_prediction" and not x0_form:
        raise Unfused("flow_prediction with an eps-form algorithm (diffusers rejects it)")
    key, ts = _indexed(call, integer_ok=True)
    u, k = call.u, call.k
    if cfg.variance_type in ("learned", "learned_range") and cfg.prediction_type == "epsilon":
        u, k = u[:, :3], (k[:, :3] if k is not None else None)
    out_shape = call.shape(u)
    thresholding = bool(cfg.thresholding)
    conv_dt = _conv_dtype(cfg, x0_form, call.sample.dtype, u.dtype, thresholding)
    if call.index is not None:  # traced: the order min(its rule, lower_order_nums + 1) chosen on the device
        order = cfg.solver_order
        if order == 3 and algo == "sde-dpmsolver":
            raise NotImplementedError(f"{type(s).__name__}.step under torch.compile: sde-dpmsolver at solver_order "
                                      "3 (diffusers has no third-order update for it; eagerly its own step runs)")
        lower = compiled.counter(s, "lower_order_nums", call.device)
        rule = s._table(call.device, tables.dpm_max_orders).coef
        ts = compiled.row(torch.minimum(compiled.at(rule, call.index), lower + 1) - 1, call.index, len(s.timesteps))
        tab = s._table(call.device, tables.dpm_stacked_rows, schedule=True)
        compiled.fill_history(s, out_shape, conv_dt, call.device)
    elif key >= 0:
        _check_index(s, key, len(s.timesteps))
        order = tables.dpm_order(s, key, s.lower_order_nums)
        if order == 3 and algo == "sde-dpmsolver":
            raise Unfused("sde-dpmsolver has no third-order update in diffusers")
        tab = s._table(call.device, tables.dpm_rows, order, schedule=True)
    else:  # per sample: each index at the order a run from index 0 takes there, capped by the history there is
        order = max(1, min(cfg.solver_order, s.lower_order_nums + 1))
        tab = s._table(call.device, tables.dpm_sequence_rows, order, schedule=True)
    history = _history(s, order - 1, out_shape)
    noise = call.noise(algo.startswith("sde"), u.shape, torch.float32, out_shape)
    if noise[0] == 1:
        noise = (1, noise[1].to(torch.float32)) + noise[2:]
    prev, _, conv, _ = call.run(tab, key, ts, out_shape, u=u, k=k, x0_mode=2 if thresholding else 0, noise=noise,
                                history=history, out_dtype=conv_dt, conv_dtype=conv_dt, lookup=_lookup(call))
    _shift(s, conv)
    _warm_up(s, call, cfg.solver_order)
    _advance(s, call, key)
    return call.output(prev)


def _step_unipc(s: FastScheduler, call: _Call):
    _need_steps(s)
    cfg = s.config
    if s.solver_p is not None:
        raise Unfused("a solver_p predictor scheduler is set")
    if cfg.solver_type not in ("bh1", "bh2"):
        raise Unfused(f"solver_type {cfg.solver_type!r}")
    if call.per_sample() is not None:
        raise ValueError(f"{type(s).__name__}.step: per-sample timesteps are not supported for UniPC (its corrector "
                         "reads one shared last_sample)")
    key, ts = _indexed(call, integer_ok=True)
    out_shape = call.shape(call.u)
    x0_form = bool(cfg.predict_x0)
    thresholding = bool(cfg.thresholding) and x0_form
    conv_dt = _conv_dtype(cfg, x0_form, call.sample.dtype, call.u.dtype, False)
    if call.index is not None:  # traced: the predictor and corrector orders chosen on the device
        order, i = cfg.solver_order, call.index
        lower = compiled.counter(s, "lower_order_nums", call.device)
        select = s._table(call.device, tables.unipc_selectors).coef
        p = torch.minimum(compiled.at(select, i, 0), lower + 1)
        last = s.last_sample
        c = torch.zeros_like(p) if last is None else \
            torch.where(compiled.at(select, i, 1) > 0, compiled.counter(s, "this_order", call.device), 0)
        ts = compiled.row((p - 1) * (order + 1) + c, i, len(s.timesteps))
        tab = s._table(call.device, tables.unipc_stacked_rows, schedule=True)
        compiled.fill_history(s, out_shape, conv_dt, call.device, call.opts["timestep"])
        history = _history(s, order, out_shape)
    else:
        _check_index(s, key, len(s.timesteps))
        p, c, this = tables.unipc_orders(s, key, s.lower_order_nums, s.last_sample is not None)
        tab = s._table(call.device, tables.unipc_rows, p, c, schedule=True)
        history = _history(s, max(c, p - 1), out_shape)
        last = s.last_sample if c else None
    cur_dt = call.sample.dtype if last is None else last.dtype
    # traced, the state never holds an input tensor or a view of one (each would be a graph input aliasing
    # another at the next step): last_sample is the kernel's copy of the sample, timestep_list a copy of t
    keep_xs = last is not None or call.traced
    prev, _, conv, xs = call.run(tab, key, ts, out_shape, x0_mode=2 if thresholding else 0, history=history,
                                 last=last, out_dtype=cur_dt, conv_dtype=conv_dt,
                                 xs_dtype=cur_dt if keep_xs else None, lookup="rows")
    t = call.opts["timestep"]
    _shift(s, conv, torch.as_tensor(t).clone() if call.traced else t)
    s.last_sample = xs if keep_xs else call.sample
    if call.index is not None:
        compiled.store(s, "this_order", p)
    else:
        s.this_order = this
    _warm_up(s, call, cfg.solver_order)
    _advance(s, call, key)
    return call.output(prev)


def _step_lcm(s: FastScheduler, call: _Call):
    _need_steps(s)
    cfg = s.config
    key, ts = _indexed(call, integer_ok=True)
    out_shape = call.shape(call.u)
    tab = s._table(call.device, tables.lcm_rows, schedule=True)
    if key >= 0:
        _check_index(s, key, tab.rows.shape[0])
        noisy = key != s.num_inference_steps - 1
        t = call.opts["timestep"]
        t_host = None if isinstance(t, torch.Tensor) and t.device.type != "cpu" else float(t)
        if t_host is not None and t_host != float(tables.host(s.timesteps)[key]):  # a timestep off its index
            tab = s._table(call.device, tables.lcm_single_row, t_host, key, noisy)
            key = 0
    else:
        noisy = True
        if call.index is not None:  # traced: a timestep off its index (a row of its own eagerly) is a NaN row
            schedule = s.timesteps.to(call.device)
            here = schedule.index_select(0, call.index.clamp(0, schedule.shape[0] - 1))
            ts = torch.where(here == torch.as_tensor(call.opts["timestep"], device=call.device).to(here.dtype), ts, -1)
    m_dt = call.u.dtype
    x0_dt = _x0_dtype(cfg, call.sample.dtype, m_dt)
    den_dt = _promote(x0_dt, call.sample.dtype)
    noise = call.noise(noisy, call.u.shape, den_dt, out_shape)
    prev, den, _, _ = call.run(tab, key, ts, out_shape, x0_mode=_x0_mode(cfg), noise=noise, out_dtype=den_dt,
                               aux_dtype=den_dt, lookup=_lookup(call))
    _advance(s, call, key)
    return call.output(prev, den)


def _step_flow(s: FastScheduler, call: _Call):
    if call.opts.get("per_token_timesteps") is not None:
        raise Unfused("per_token_timesteps")
    key, ts = _indexed(call)
    tab = s._table(call.device, tables.flow_rows, schedule=True)
    if key >= 0:
        _check_index(s, key, tab.rows.shape[0])
    out_shape = call.shape(call.u)
    noise = call.noise(bool(s.config.stochastic_sampling), call.sample.shape, torch.float32, out_shape)
    prev, _, _, _ = call.run(tab, key, ts, out_shape, noise=noise, out_dtype=call.u.dtype, lookup=_lookup(call))
    _advance(s, call, key)
    return call.output(prev)


_STEPS = {"ddpm": _step_ddpm, "ddim": _step_ddim, "euler": _step_euler, "euler_ancestral": _step_euler,
          "dpm": _step_dpm, "unipc": _step_unipc, "lcm": _step_lcm, "flow": _step_flow}


# ---------------------------------------------------------------------------------------------
# The classes
# ---------------------------------------------------------------------------------------------
_CLASSES: dict[type, type] = {}


def _step_function(cls: type, base: type):
    """``cls.step`` for the fused class: ``base.step``'s exact signature (names, kinds, defaults, order) plus the
    keyword-only extras, compiled from source so that Python itself binds the arguments (and raises its own
    TypeError naming the argument for a bad call). Returns (function, the wrapped step's parameter names)."""
    P = inspect.Parameter
    sig = inspect.signature(base.step)
    params = list(sig.parameters.values())
    if any(p.kind is P.VAR_POSITIONAL for p in params):
        raise TypeError(f"fast_scheduler: {base.__name__}.step takes *args, which the fused step cannot bind")
    names = [p.name for p in params[1:] if p.kind is not P.VAR_KEYWORD]
    extras = [P("guidance_scale", P.KEYWORD_ONLY, default=None), P("guidance_rescale", P.KEYWORD_ONLY, default=0.0)]
    if "variance_noise" not in names:
        extras.append(P("variance_noise", P.KEYWORD_ONLY, default=None))
    var_kw = [p for p in params if p.kind is P.VAR_KEYWORD]
    full = sig.replace(parameters=[p for p in params if p.kind is not P.VAR_KEYWORD] + extras + var_kw)
    text, defaults, kind = [], {}, None
    for p in full.parameters.values():
        if kind is P.POSITIONAL_ONLY and p.kind is not P.POSITIONAL_ONLY:
            text.append("/")
        if p.kind is P.KEYWORD_ONLY and kind is not P.KEYWORD_ONLY:
            text.append("*")
        kind = p.kind
        if p.kind is P.VAR_KEYWORD:
            text.append(f"**{p.name}")
        elif p.default is P.empty:
            text.append(p.name)
        else:
            defaults[f"_d_{p.name}"] = p.default
            text.append(f"{p.name}=_d_{p.name}")
    opts = ", ".join([f"{n!r}: {n}" for n in names] + [f"**{p.name}" for p in var_kw])
    source = (f"def step({', '.join(text)}):\n    return {params[0].name}._fused_step("
              f"{{{opts}}}, guidance_scale, guidance_rescale, variance_noise)\n")
    namespace = dict(defaults)
    exec(compile(source, f"<seqgen_fast fused {cls.__name__}.step>", "exec"), namespace)
    step = namespace["step"]
    step.__signature__ = full
    step.__qualname__ = f"{cls.__qualname__}.step"
    step.__module__ = __name__
    return step, tuple(names)


def _set_timesteps_function(cls: type):
    """``cls.set_timesteps`` (its signature: pipelines inspect it), then every table used so far rebuilt for the
    new schedule, so that compiled steps find them (``compiled``)."""
    inner = cls.set_timesteps

    @functools.wraps(inner)
    def set_timesteps(self, *args, **kwargs):
        out = inner(self, *args, **kwargs)
        if self._sf.tables or self._sf.pending:
            self._refresh_tables()
        return out
    return set_timesteps


def fast_class(cls: type) -> type:
    """The fused subclass of diffusers scheduler class ``cls`` (made once per class, cached).

    It has ``cls``'s name, qualified name, module and docstring, so diffusers' config, save/load
    and pipeline machinery treat it as ``cls``; its ``step`` has ``cls.step``'s signature plus the
    keyword-only ``guidance_scale``, ``guidance_rescale`` (and ``variance_noise``).
    """
    if issubclass(cls, FastScheduler):
        return cls
    made = _CLASSES.get(cls)
    if made is not None:
        return made
    base = configs.base_class(cls)
    step, names = _step_function(cls, base)
    step.__doc__ = (base.step.__doc__ or "") + (
        "\n        seqgen_fast: one fused kernel. Keyword-only extras: ``guidance_scale`` (float or (B,) tensor:\n"
        "        model_output is the (2B, ...) [unconditional; conditional] batch and guidance is fused),\n"
        "        ``guidance_rescale`` (diffusers' rescale_noise_cfg), ``variance_noise``; ``timestep`` may be a\n"
        "        (B,) tensor of per-sample timesteps.\n")
    kind = configs.kind_of(base)
    made = type(cls.__name__, (FastScheduler, cls), {
        "__slots__": ("_sf_state",), "__module__": cls.__module__, "__qualname__": cls.__qualname__,
        "__doc__": cls.__doc__, "step": step, "set_timesteps": _set_timesteps_function(cls), "_base": base, "_kind": kind, "_params": names,
        "_output": configs.output_class(base), "_fused": staticmethod(_STEPS[kind.name])})
    _CLASSES[cls] = made
    return made


def fast_scheduler(scheduler, *, seed: int | None = None, pred_original_sample: bool = True,
                   backend: str | None = None):
    """``scheduler`` (a diffusers DDPM, DDIM, EulerDiscrete, EulerAncestralDiscrete, DPMSolverMultistep,
    UniPCMultistep, LCM or FlowMatchEulerDiscrete scheduler, or a subclass) stepping with the fused kernels.

    The result is an instance of ``type(scheduler)`` that shares ``scheduler``'s state (see the module
    docstring). Raises ``TypeError`` for other classes and for subclasses that override the step's
    math. ``pred_original_sample=False`` skips writing x0 (the output field is then None; LCM's
    ``denoised`` is always written). ``backend`` forces "cuda", "triton" or "reference". A scheduler
    that is already fused is returned as it is (with the options given applied).
    """
    if isinstance(scheduler, FastScheduler):
        fast = scheduler
    else:
        cls = fast_class(type(scheduler))
        fast = cls.__new__(cls)
        fast.__dict__ = scheduler.__dict__
    sf = fast._sf
    if seed is not None:
        sf.seed = int(seed)
    sf.write_x0 = pred_original_sample
    if backend is not None or not isinstance(scheduler, FastScheduler):
        sf.backend = backend
    return fast


__all__ = ["fast_scheduler", "fast_class", "FastScheduler"]
