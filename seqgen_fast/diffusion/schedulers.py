"""``fast_scheduler(scheduler)``: a diffusers scheduler that steps with the fused kernels.

The wrapper holds the diffusers scheduler and delegates everything that is not a step to it
(``config``, ``timesteps``, ``sigmas``, ``init_noise_sigma``, ``add_noise``, ``set_begin_index``,
``step_index``, ``scale_model_input``...), so ``set_timesteps`` and the step-index bookkeeping are
diffusers' own. After each ``set_timesteps`` it precomputes, in float64 on the host and once, the
step's coefficient table (see ``seqgen_fast.reference.diffusion`` for the row layout) and moves it
to the device:

* DDPM, DDIM: one row per integer timestep t in [0, num_train_timesteps) (DDPM rows of timesteps
  outside the set schedule are NaN, as diffusers' ``previous_timestep`` cannot find them);
* Euler, Euler ancestral, DPM-Solver++: one row per step index of the schedule; a (B,) timestep
  tensor is looked up in the schedule's timesteps on the device (exact equality).

A step is one kernel launch (two more small passes with dynamic thresholding or guidance
rescale): no host sync when the timestep is a device tensor or the step index is known. The
DPM-Solver++ history (the previous step's x0) lives in a preallocated buffer, one per sample.

Noise: ``variance_noise=`` is used as given; with ``generator=`` it is drawn exactly as diffusers
draws it (so results match diffusers with the same generator); otherwise it is drawn in the
kernel from (seed, offset), the seed fixed at construction (``seed=``) and the offset advanced by
one each noisy step: reproducible per backend (the Triton, CUDA and reference streams differ).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import numpy as np
import torch

from . import configs
from .._contract import A0, AH, AM, AN, AX, CPN, NCOEF, X0M, X0X

_EXTRA = ("guidance_scale", "guidance_rescale", "variance_noise")


def _np(t) -> np.ndarray:
    return np.asarray(torch.as_tensor(t).detach().cpu().to(torch.float64).numpy(), dtype=np.float64)


def _x0_coefs(pred: str, alpha, sigma, rows: np.ndarray) -> None:
    """x0 = x0_x * x + x0_m * m for prediction type ``pred`` (x = alpha x0 + sigma eps)."""
    if pred == "epsilon":
        rows[:, X0X], rows[:, X0M] = 1.0 / alpha, -sigma / alpha
    elif pred in ("sample", "original_sample"):
        rows[:, X0X], rows[:, X0M] = 0.0, 1.0
    else:  # v_prediction
        rows[:, X0X], rows[:, X0M] = alpha, -sigma


def ddpm_table(s) -> np.ndarray:
    """DDPM rows per timestep t: diffusers' DDPMScheduler.step (formulas (7), (15) of Ho et al.)."""
    cfg = s.config
    T = cfg.num_train_timesteps
    acp = _np(s.alphas_cumprod)
    rows = np.full((T, NCOEF), np.nan)
    t = np.arange(T)
    if s.custom_timesteps or s.num_inference_steps:
        sched = _np(s.timesteps).astype(np.int64)
        prev = np.full(T, -2)
        prev[sched] = np.append(sched[1:], -1)
    else:
        prev = t - 1
    ok = prev > -2
    t, prev = t[ok], prev[ok]
    ab = acp[t]
    abp = np.where(prev >= 0, acp[np.maximum(prev, 0)], 1.0)
    beta = 1.0 - ab / abp
    r = np.zeros((len(t), NCOEF))
    _x0_coefs(cfg.prediction_type, np.sqrt(ab), np.sqrt(1.0 - ab), r)
    r[:, A0] = np.sqrt(abp) * beta / (1.0 - ab)
    r[:, AX] = np.sqrt(ab / abp) * (1.0 - abp) / (1.0 - ab)
    var = np.maximum((1.0 - abp) / (1.0 - ab) * beta, 1e-20)
    std = np.sqrt(beta) if cfg.variance_type == "fixed_large" else np.sqrt(var)
    r[:, AN] = np.where(t > 0, std, 0.0)
    rows[t] = r
    return rows


def ddim_table(s, eta: float, use_clipped_model_output: bool) -> np.ndarray:
    """DDIM rows per timestep t: diffusers' DDIMScheduler.step (formulas (12), (16) of Song et al.)."""
    cfg = s.config
    T = cfg.num_train_timesteps
    acp = _np(s.alphas_cumprod)
    t = np.arange(T)
    prev = t - T // s.num_inference_steps
    ab = acp
    abp = np.where(prev >= 0, acp[np.maximum(prev, 0)], float(s.final_alpha_cumprod))
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    rows = np.zeros((T, NCOEF))
    _x0_coefs(cfg.prediction_type, alpha, sigma, rows)
    std = eta * np.sqrt((1.0 - abp) / (1.0 - ab) * (1.0 - ab / abp))
    with np.errstate(invalid="ignore"):
        direction = np.sqrt(1.0 - abp - std**2)
    rows[:, A0] = np.sqrt(abp)
    if use_clipped_model_output:          # eps = (x - alpha x0c) / sigma
        rows[:, AX] = direction / sigma
        rows[:, A0] += -direction * alpha / sigma
    elif cfg.prediction_type == "epsilon":  # eps = m
        rows[:, AM] = direction
    elif cfg.prediction_type == "sample":   # eps = (x - alpha m) / sigma
        rows[:, AX] = direction / sigma
        rows[:, AM] = -direction * alpha / sigma
    else:                                   # v: eps = alpha m + sigma x
        rows[:, AX] = direction * sigma
        rows[:, AM] = direction * alpha
    rows[:, AN] = std
    return rows


def euler_table(s, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> np.ndarray:
    """Euler rows per step index k: diffusers' EulerDiscreteScheduler.step (Karras et al. Alg. 2)."""
    sig = _np(s.sigmas)
    n = len(sig) - 1
    sigma, nxt = sig[:n], sig[1:]
    gamma = np.where((s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / (len(sig) - 1), 2**0.5 - 1), 0.0)
    sh = sigma * (gamma + 1.0)
    rows = np.zeros((n, NCOEF))
    rows[:, CPN] = np.where(gamma > 0, s_noise * np.sqrt(np.maximum(sh**2 - sigma**2, 0.0)), 0.0)
    pred = s.config.prediction_type
    if pred == "epsilon":
        rows[:, X0X], rows[:, X0M] = 1.0, -sh
    elif pred in ("sample", "original_sample"):
        rows[:, X0X], rows[:, X0M] = 0.0, 1.0
    else:
        rows[:, X0X], rows[:, X0M] = 1.0 / (sigma**2 + 1.0), -sigma / np.sqrt(sigma**2 + 1.0)
    dt = nxt - sh
    rows[:, AX] = 1.0 + dt / sh
    rows[:, A0] = -dt / sh
    return rows


def euler_ancestral_table(s) -> np.ndarray:
    """Euler ancestral rows per step index k: diffusers' EulerAncestralDiscreteScheduler.step."""
    sig = _np(s.sigmas)
    n = len(sig) - 1
    sf, st = sig[:n], sig[1:]
    up = np.sqrt(st**2 * (sf**2 - st**2) / sf**2)
    down = np.sqrt(np.maximum(st**2 - up**2, 0.0))
    rows = np.zeros((n, NCOEF))
    if s.config.prediction_type == "epsilon":
        rows[:, X0X], rows[:, X0M] = 1.0, -sf
    else:
        rows[:, X0X], rows[:, X0M] = 1.0 / (sf**2 + 1.0), -sf / np.sqrt(sf**2 + 1.0)
    dt = down - sf
    rows[:, AX] = 1.0 + dt / sf
    rows[:, A0] = -dt / sf
    rows[:, AN] = up
    return rows


def dpm_tables(s) -> tuple[np.ndarray, np.ndarray]:
    """DPM-Solver++ rows per step index k: (first order everywhere, diffusers' order rule).

    diffusers' order rule for a run from index 0: first order at k = 0 and at the final step when
    ``euler_at_final``, ``lower_order_final`` with fewer than 15 steps, or ``final_sigmas_type ==
    'zero'``; second order elsewhere (solver_order 2). Second order (D0 = x0_k, D1 = (x0_k - h)/r0)
    is written as x0 * (c0 + c1 / r0) - h * c1 / r0.
    """
    cfg = s.config
    sig = _np(s.sigmas)
    n = len(s.timesteps)
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    sigma = sig * alpha
    with np.errstate(divide="ignore", invalid="ignore"):
        lam = np.log(alpha) - np.log(sigma)
        k = np.arange(n)
        h = lam[k + 1] - lam[k]
        sde = cfg.algorithm_type == "sde-dpmsolver++"
        first = np.zeros((n, NCOEF))
        _x0_coefs(cfg.prediction_type, alpha[k], sigma[k], first)
        a_t, s_t, s_s = alpha[k + 1], sigma[k + 1], sigma[k]
        if sde:
            first[:, AX] = s_t / s_s * np.exp(-h)
            c0 = a_t * (1.0 - np.exp(-2.0 * h))
            first[:, AN] = s_t * np.sqrt(1.0 - np.exp(-2.0 * h))
        else:
            first[:, AX] = s_t / s_s
            c0 = -a_t * (np.exp(-h) - 1.0)
        first[:, A0] = c0
        second = first.copy()
        h0 = np.concatenate([[np.nan], lam[k[1:]] - lam[k[1:] - 1]])
        r0 = h0 / h
        if cfg.solver_type == "midpoint":
            c1 = 0.5 * c0
        elif sde:
            c1 = a_t * ((1.0 - np.exp(-2.0 * h)) / (-2.0 * h) + 1.0)
        else:
            c1 = a_t * ((np.exp(-h) - 1.0) / h + 1.0)
        second[:, A0] = c0 + c1 / r0
        second[:, AH] = -c1 / r0
    final_first = cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero"
    use_first = (k == 0) | ((k == n - 1) & final_first) | (cfg.solver_order == 1)
    seq = np.where(use_first[:, None], first, second)
    return first, seq


@dataclass
class _Tables:
    rows: np.ndarray                         # (rows, NCOEF) float64 on the host
    coef: torch.Tensor                       # (rows, NCOEF) float32 on the device
    schedule: torch.Tensor | None            # (n,) float32 schedule timesteps for device lookup (indexed kinds)


class FastScheduler:
    """A diffusers scheduler whose ``step`` runs the fused kernel (see the module docstring).

    ``step(model_output, timestep, sample, *diffusers_args, guidance_scale=None,
    guidance_rescale=0.0, variance_noise=None, **diffusers_kwargs)`` takes the diffusers
    arguments of the wrapped class, plus:

    * ``timestep`` a (B,) tensor: each sample steps at its own timestep (DDPM/DDIM: the row of that
      timestep; Euler/DPM: the position of that timestep in ``timesteps``; the step-index counter
      is then left alone; DPM-Solver++ reads each sample's history buffer as the x0 of that
      sample's previous step, and the first step after ``set_timesteps`` is first order for all);
    * ``guidance_scale`` (float or (B,) tensor): ``model_output`` is the (2B, ...) batch
      [unconditional; conditional] and guidance is fused; ``guidance_rescale`` as diffusers'
      ``rescale_noise_cfg`` (one extra reduction pass).

    ``pred_original_sample=False`` at construction skips writing x0 (the output field is then None).
    """

    def __init__(self, scheduler, *, seed: int | None = None, pred_original_sample: bool = True,
                 backend: str | None = None):
        self.kind = configs.validate(scheduler)
        self.scheduler = scheduler
        self.write_x0 = pred_original_sample
        self.backend = backend
        self.seed = int(torch.randint(0, 2**62, (1,)).item()) if seed is None else int(seed)
        self.offset = 0
        self._rng_offset: torch.Tensor | None = None  # device-side offset added to self.offset (graph capture)
        self._output_cls = configs.output_class(scheduler)
        params = list(inspect.signature(type(scheduler).step).parameters.values())[1:]
        self._step_params = [p.name for p in params]
        self._step_defaults = {p.name: p.default for p in params if p.default is not inspect.Parameter.empty}
        self._tables: dict[tuple, _Tables] = {}
        self._history: torch.Tensor | None = None
        self._host_schedule: np.ndarray | None = None
        self._graphs: dict = {}   # sampling.sample's captured loops
        self._name = type(scheduler).__name__
        cfg = scheduler.config
        # the x0 clip of the step: 2 dynamic thresholding, 1 clip_sample, 0 none (config is frozen)
        self._x0_mode = 2 if cfg.get("thresholding", False) else (1 if cfg.get("clip_sample", False) else 0)
        self._x0_args = dict(clip_range=float(cfg.get("clip_sample_range", 1.0)),
                             threshold_ratio=float(cfg.get("dynamic_thresholding_ratio", 0.995)),
                             threshold_max=float(cfg.get("sample_max_value", 1.0)))
        self._reset()

    # -- delegation -------------------------------------------------------------------------
    def __getattr__(self, name):
        if name == "scheduler":
            raise AttributeError(name)
        return getattr(self.scheduler, name)

    def __len__(self) -> int:
        return len(self.scheduler)

    def set_timesteps(self, *args, **kwargs):
        """diffusers' ``set_timesteps``; the coefficient tables are rebuilt (lazily, on the first step's device)."""
        out = self.scheduler.set_timesteps(*args, **kwargs)
        self._reset()
        return out

    def rewind(self) -> None:
        """Back to the first step of the current schedule (step index 0, no solver history), keeping the tables."""
        s = self.scheduler
        if hasattr(s, "set_begin_index"):
            s.set_begin_index(0)
            s._step_index = None
        if self.kind == "dpmsolver++":
            s.lower_order_nums = 0

    def _keep_alive(self) -> list[torch.Tensor]:
        """The device buffers a captured graph reads (tables, history)."""
        bufs = [t.coef for t in self._tables.values()]
        bufs += [t.schedule for t in self._tables.values() if t.schedule is not None]
        return bufs + ([self._history] if self._history is not None else [])

    def _reset(self) -> None:
        self._tables.clear()
        self._history = None
        self._host_schedule = _np(self.scheduler.timesteps)
        s = self.scheduler
        # DDPM steps only to timesteps of the set schedule (diffusers' previous_timestep), or any t without one
        ddpm_any = self.kind == "ddpm" and not (s.custom_timesteps or s.num_inference_steps)
        T = s.config.num_train_timesteps
        self._host_set = frozenset() if self.kind != "ddpm" else frozenset(
            range(T) if ddpm_any else self._host_schedule.astype(np.int64).tolist())

    # -- tables -----------------------------------------------------------------------------
    def _table(self, device: torch.device, opts: dict, first_order: bool = False) -> _Tables:
        k = self.kind
        if k == "ddpm":
            key = (k,)
        elif k == "ddim":
            key = (k, float(opts["eta"]), bool(opts["use_clipped_model_output"]))
        elif k == "euler":
            key = (k, float(opts["s_churn"]), float(opts["s_tmin"]), float(opts["s_tmax"]), float(opts["s_noise"]))
        else:
            key = (k, first_order)
        key = key + (str(device),)
        if key not in self._tables:
            s = self.scheduler
            if k in ("ddim", "euler", "euler_ancestral", "dpmsolver++") and s.num_inference_steps is None:
                raise ValueError(f"{type(s).__name__}: call set_timesteps before step (num_inference_steps is None)")
            if k == "ddpm":
                rows = ddpm_table(s)
            elif k == "ddim":
                rows = ddim_table(s, key[1], key[2])
            elif k == "euler":
                rows = euler_table(s, *key[1:5])
            elif k == "euler_ancestral":
                rows = euler_ancestral_table(s)
            else:
                rows = dpm_tables(s)[0 if first_order else 1]
            sched = None
            if k in ("euler", "euler_ancestral", "dpmsolver++"):
                sched = torch.as_tensor(self._host_schedule, dtype=torch.float32).to(device)
            self._tables[key] = _Tables(rows, torch.as_tensor(rows, dtype=torch.float32).to(device), sched)
        return self._tables[key]

    # -- argument handling ------------------------------------------------------------------
    def _bind(self, model_output, timestep, sample, args, kwargs) -> dict:
        """The wrapped class's step arguments by name, defaults filled in (inspect.Signature.bind, faster)."""
        name = self._name
        names = self._step_params
        if len(args) > len(names) - 3:
            raise TypeError(f"{name}.step: takes {len(names)} arguments, got {len(args) + 3}")
        opts = dict(self._step_defaults)
        opts.update(zip(names[3:], args))
        for k, v in kwargs.items():
            if k not in self._step_defaults:
                raise TypeError(f"{name}.step: unexpected keyword argument {k!r}")
            if k in names[3:3 + len(args)]:
                raise TypeError(f"{name}.step: got multiple values for argument {k!r}")
            opts[k] = v
        opts[names[0]], opts[names[1]], opts[names[2]] = model_output, timestep, sample
        return opts

    def _host_key(self, timestep, batch: int) -> tuple[int, torch.Tensor | None]:
        """(key, device timesteps) for DDPM/DDIM: a host-checked row, or -1 and the tensor to read in-kernel."""
        T = self.scheduler.config.num_train_timesteps
        if isinstance(timestep, torch.Tensor) and timestep.device.type != "cpu":
            if timestep.dim() > 1 or (timestep.dim() == 1 and timestep.numel() not in (1, batch)):
                raise ValueError(f"timestep: expected a scalar or a ({batch},) tensor, "
                                 f"got shape {tuple(timestep.shape)}")
            return -1, timestep
        if isinstance(timestep, (int, float)) and 0 <= timestep < T and timestep == int(timestep) and (
                self.kind == "ddim" or int(timestep) in self._host_set):
            return int(timestep), None  # the common host case, checked without torch
        t = torch.as_tensor(timestep).detach().to(torch.float64).reshape(-1)
        if t.numel() not in (1, batch):
            raise ValueError(f"timestep: expected a scalar or a ({batch},) tensor, got {t.numel()} values")
        vals = t.numpy()
        bad = [v for v in vals if not (0 <= v < T and v == int(v))]
        if self.kind == "ddpm":
            bad += [v for v in vals if v not in self._host_set]
        if bad:
            where = ", in scheduler.timesteps)" if self.kind == "ddpm" else ")"
            raise ValueError(f"timestep: {bad[0]:g} is outside the schedule of {type(self.scheduler).__name__} "
                             f"(integer timesteps in [0, {T}){where}")
        if t.numel() == 1:
            return int(vals[0]), None
        return -1, t.to(torch.int64)

    def _indexed_key(self, timestep, batch: int) -> tuple[int, torch.Tensor | None]:
        """(key, timesteps) for Euler/DPM: diffusers' step index (scalar), or -1 and a (B,) tensor to look up."""
        s = self.scheduler
        per_sample = isinstance(timestep, torch.Tensor) and timestep.dim() == 1
        if self.kind != "dpmsolver++" and isinstance(timestep, (int, torch.IntTensor, torch.LongTensor)):
            raise ValueError(f"timestep: {type(s).__name__}.step takes one of scheduler.timesteps, not an integer "
                             "index (as diffusers)")
        if not per_sample:
            if s.step_index is None:
                s._init_step_index(timestep)
            if not 0 <= s.step_index < len(s.timesteps):
                raise ValueError(f"timestep: step index {s.step_index} is past the end of the schedule "
                                 f"({len(s.timesteps)} steps); call set_timesteps again")
            return s.step_index, None
        if timestep.numel() != batch:
            raise ValueError(f"timestep: expected a scalar or a ({batch},) tensor, got shape {tuple(timestep.shape)}")
        if timestep.device.type == "cpu":
            known = set(self._host_schedule.astype(np.float32).tolist())
            bad = [v for v in timestep.to(torch.float32).tolist() if v not in known]
            if bad:
                raise ValueError(f"timestep: {bad[0]:g} is not one of {type(s).__name__}.timesteps")
        return -1, timestep

    # -- the step ---------------------------------------------------------------------------
    def step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, *args, guidance_scale=None,
             guidance_rescale: float = 0.0, variance_noise: torch.Tensor | None = None, **kwargs):
        """diffusers' ``step`` of the wrapped class, fused (see the class docstring); same output class."""
        from ..ops.diffusion import diffusion_step

        name = self._name
        if "variance_noise" in self._step_defaults:
            kwargs["variance_noise"] = variance_noise
        opts = self._bind(model_output, timestep, sample, args, kwargs)
        opts["variance_noise"] = variance_noise
        if self.kind == "ddim" and opts["eta"] < 0:
            raise ValueError(f"{name}.step: eta must be >= 0, got {opts['eta']}")
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError(f"{name}.step: sample and model_output must be tensors")
        B = sample.shape[0]
        cfg = guidance_scale is not None
        want = (2 * B, *sample.shape[1:]) if cfg else tuple(sample.shape)
        if tuple(model_output.shape) != want:
            raise ValueError(f"{name}.step: model_output has shape {tuple(model_output.shape)}, expected {want}"
                             + (" (the [unconditional; conditional] batch of 2B for guidance_scale)" if cfg else ""))
        if model_output.dtype != sample.dtype:
            raise TypeError(f"{name}.step: model_output dtype {model_output.dtype} != sample dtype {sample.dtype}")
        if model_output.device != sample.device:
            raise ValueError(f"{name}.step: model_output is on {model_output.device}, sample on {sample.device}")

        s = self.scheduler
        first_order = False
        if self.kind in ("ddpm", "ddim"):
            key, ts = self._host_key(timestep, B)
            sched = None
        else:
            key, ts = self._indexed_key(timestep, B)
            if self.kind == "dpmsolver++":
                first_order = s.lower_order_nums < 1
        tab = self._table(sample.device, opts, first_order)
        if self.kind in ("euler", "euler_ancestral", "dpmsolver++"):
            sched = tab.schedule if key < 0 else None
        if ts is not None:
            ts = ts.to(sample.device).contiguous()

        # noise: given, drawn as diffusers draws it (generator), or in-kernel
        noisy = self._noisy(tab, key, opts)
        noise, noise_mode = None, 0
        if noisy:
            given = opts.get("variance_noise")
            gen = opts.get("generator")
            if given is not None and gen is not None:
                raise ValueError(f"{name}.step: pass either generator or variance_noise, not both")
            if given is not None:
                if tuple(given.shape) != tuple(sample.shape):
                    raise ValueError(f"{name}.step: variance_noise has shape {tuple(given.shape)}, "
                                     f"expected {tuple(sample.shape)}")
                noise, noise_mode = given.to(sample.device), 1
            elif gen is not None:
                ndt = torch.float32 if self.kind == "dpmsolver++" else model_output.dtype
                noise, noise_mode = configs.randn_like_diffusers(sample.shape, gen, sample.device, ndt), 1
            else:
                noise_mode = 2

        guidance = None
        gscale = 0.0
        if cfg:
            if isinstance(guidance_scale, torch.Tensor):
                if guidance_scale.dim() == 0:
                    guidance = guidance_scale.to(sample.device, torch.float32).contiguous().reshape(1).repeat(B)
                elif tuple(guidance_scale.shape) != (B,):
                    raise ValueError(f"{name}.step: guidance_scale must be a float or a ({B},) tensor, "
                                     f"got shape {tuple(guidance_scale.shape)}")
                else:
                    guidance = guidance_scale.to(sample.device, torch.float32).contiguous()
            else:
                gscale = float(guidance_scale)
        elif guidance_rescale:
            raise ValueError(f"{name}.step: guidance_rescale needs guidance_scale (the fused CFG batch)")

        history, read_history = None, False
        if self.kind == "dpmsolver++":
            if self._history is None or self._history.shape != sample.shape or self._history.dtype != sample.dtype \
                    or self._history.device != sample.device:
                self._history = torch.zeros_like(sample)
            history, read_history = self._history, not first_order

        prev, x0 = diffusion_step(
            sample, model_output, tab.coef, key, ts, sched, cfg=cfg, guidance_scale=gscale, guidance=guidance,
            guidance_rescale=float(guidance_rescale), x0_mode=self._x0_mode, **self._x0_args,
            history=history, read_history=read_history, noise=noise, noise_mode=noise_mode, seed=self.seed,
            offset=self.offset, rng_offset=self._rng_offset if noise_mode == 2 else None,
            write_x0=self.write_x0 and self.kind != "dpmsolver++", backend=self.backend)
        if noise_mode == 2:
            self.offset += 1
        if self.kind in ("euler", "euler_ancestral", "dpmsolver++") and key >= 0:
            s._step_index += 1
        if self.kind == "dpmsolver++":
            s.lower_order_nums = min(s.lower_order_nums + 1, s.config.solver_order)
        x0 = x0 if self.write_x0 else None
        if self.kind == "dpmsolver++":
            return self._output_cls(prev_sample=prev) if opts["return_dict"] else (prev,)
        if not opts["return_dict"]:
            return prev, x0
        return self._output_cls(prev_sample=prev, pred_original_sample=x0)

    def _noisy(self, tab: _Tables, key: int, opts: dict) -> bool:
        """Whether this step draws noise (as diffusers would), known on the host without reading the device."""
        k = self.kind
        if k == "ddpm":
            return key != 0
        if k == "ddim":
            return opts["eta"] > 0
        if k == "euler":
            return bool((tab.rows[key, CPN] > 0) if key >= 0 else (tab.rows[:, CPN] > 0).any())
        if k == "euler_ancestral":
            return True
        return self.scheduler.config.algorithm_type == "sde-dpmsolver++"


def fast_scheduler(scheduler, *, seed: int | None = None, pred_original_sample: bool = True,
                   backend: str | None = None) -> FastScheduler:
    """Wrap a diffusers DDPM, DDIM, EulerDiscrete, EulerAncestralDiscrete or DPMSolverMultistep scheduler.

    The result behaves as ``scheduler`` (config, set_timesteps, timesteps, scale_model_input,
    add_noise, step with the same arguments and output class, return_dict) but steps with one
    fused kernel. Raises ``TypeError`` for other classes and ``NotImplementedError`` naming the
    option for unsupported configurations. ``backend`` forces "cuda", "triton" or "reference".
    """
    if isinstance(scheduler, FastScheduler):
        return scheduler
    return FastScheduler(scheduler, seed=seed, pred_original_sample=pred_original_sample, backend=backend)


__all__ = ["fast_scheduler", "FastScheduler", "ddpm_table", "ddim_table", "euler_table", "euler_ancestral_table",
           "dpm_tables"]
