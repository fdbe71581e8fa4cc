"""Coefficient rows of every fused scheduler step, computed on the host in float64 from the scheduler's state.

Each function reads a diffusers scheduler's schedule (``alphas_cumprod``, ``timesteps``, ``sigmas``,
its config) and returns a float64 array of rows in the layout ``COEF_NAMES`` of
``seqgen_fast._contract`` (the math is in ``seqgen_fast.reference.diffusion``). The formulas are
diffusers' own, in the same order of operations, so degenerate cases (a zero final sigma, an
infinite log-SNR step) give the same inf/NaN diffusers gives; only the rounding is float64's.

Row keys: DDPM and DDIM one row per integer timestep; Euler, Euler ancestral, LCM and flow-matching
Euler one row per step index; DPM-Solver ``order_rows`` per (solver order, step index) and UniPC
per (predictor order, corrector order, step index).
"""
from __future__ import annotations

import numpy as np
import torch

from .._contract import (A0, AC, AH, AH2, AM, AN, AX, CM, CPN, CX, CX0, D0, DX, NCOEF, SC, SH1, SH2, SH3, SL, SX,
                         VARP, VARQ, X0M, X0X)


def host(t) -> np.ndarray:
    """A tensor or sequence as a float64 NumPy array (on the host)."""
    return np.asarray(torch.as_tensor(t).detach().cpu().to(torch.float64).numpy(), dtype=np.float64)


def mark_absent(rows: np.ndarray) -> np.ndarray:
    """``rows`` with the terms the scheduler's formula does not have marked: a column that is 0 in every
    row (NaN rows, timesteps off the schedule, aside) has its zeros made -0.0, every other zero +0.0.
    A (blocks, n, NCOEF) stack is marked block by block and returned flattened.
    The step skips a -0.0 term (``reference.diffusion.times``), so an inf in its value does not become
    0 * inf = NaN where diffusers never forms that product, while a +0.0 coefficient (a term diffusers
    computes, e.g. DDPM's sample term at t = 0) multiplies as in diffusers: 0 * inf is NaN there too."""
    if rows.ndim == 3:
        return np.concatenate([mark_absent(block) for block in rows])
    rows = rows + 0.0  # -0.0 -> +0.0
    zero = rows == 0
    absent = (zero | np.isnan(rows)).all(axis=0) & zero.any(axis=0)
    rows[zero & absent] = -0.0
    return rows


def blank(n: int) -> np.ndarray:
    """n rows of the identity step skeleton: the current sample is x, pred_original_sample is x0c."""
    rows = np.zeros((n, NCOEF))
    rows[:, SX] = 1.0
    rows[:, D0] = 1.0
    return rows


def x0_coefs(pred: str, alpha, sigma, rows: np.ndarray) -> None:
    """x0 = x0_x * x + x0_m * m for prediction type ``pred`` (x = alpha x0 + sigma eps)."""
    if pred == "epsilon":
        rows[:, X0X], rows[:, X0M] = 1.0 / alpha, -sigma / alpha
    elif pred in ("sample", "original_sample"):
        rows[:, X0X], rows[:, X0M] = 0.0, 1.0
    else:  # v_prediction
        rows[:, X0X], rows[:, X0M] = alpha, -sigma


# ---------------------------------------------------------------------------------------------
# DDPM, DDIM, LCM: alphas_cumprod schedules
# ---------------------------------------------------------------------------------------------
def ddpm_previous(s) -> np.ndarray:
    """diffusers' ``previous_timestep`` of every t in [0, T): the next timestep of the set schedule, -1
    after its last one, -2 for a t outside it; t - 1 when no schedule is set."""
    T = s.config.num_train_timesteps
    if s.custom_timesteps or s.num_inference_steps:
        sched = host(s.timesteps).astype(np.int64)
        prev = np.full(T, -2)
        prev[sched] = np.append(sched[1:], -1)
        return prev
    return np.arange(T) - 1


def ddpm_rows(s, variance_type: str) -> np.ndarray:
    """DDPM rows per timestep t (formulas (7), (15) of Ho et al.; diffusers' ``_get_variance``).

    The noise std: fixed_small (and any other name, as diffusers) sqrt(v), fixed_small_log
    exp(log(v) / 2), fixed_large sqrt(beta), fixed_large_log sqrt(log(beta)) (NaN, as diffusers),
    learned sqrt(model variance) (``VAR_SQRT``), learned_range exp((frac log beta + (1 - frac) log v) / 2)
    with frac = (model variance + 1) / 2 (``VAR_EXP``: var_p + var_q * model variance). Rows of
    timesteps outside the set schedule are NaN.
    """
    T = s.config.num_train_timesteps
    acp = host(s.alphas_cumprod)
    prev = ddpm_previous(s)
    rows = np.full((T, NCOEF), np.nan)
    t = np.arange(T)[prev > -2]
    p = prev[prev > -2]
    ab = acp[t]
    abp = np.where(p >= 0, acp[np.maximum(p, 0)], 1.0)
    beta = 1.0 - ab / abp
    r = blank(len(t))
    x0_coefs(s.config.prediction_type, np.sqrt(ab), np.sqrt(1.0 - ab), r)
    r[:, A0] = np.sqrt(abp) * beta / (1.0 - ab)
    r[:, AX] = np.sqrt(ab / abp) * (1.0 - abp) / (1.0 - ab)
    var = np.maximum((1.0 - abp) / (1.0 - ab) * beta, 1e-20)
    with np.errstate(invalid="ignore", divide="ignore"):
        if variance_type == "fixed_large":
            std = np.sqrt(beta)
        elif variance_type == "fixed_large_log":
            std = np.sqrt(np.log(beta))
        elif variance_type in ("learned", "learned_range"):
            std = np.ones_like(var)
            lo, hi = np.log(var), np.log(beta)
            r[:, VARP], r[:, VARQ] = 0.5 * lo + 0.25 * (hi - lo), 0.25 * (hi - lo)
        else:
            std = np.sqrt(var)
    r[:, AN] = np.where(t > 0, std, 0.0)
    rows[t] = r
    return rows


def ddim_rows(s, eta: float, use_clipped_model_output: bool) -> np.ndarray:
    """DDIM rows per timestep t (formulas (12), (16) of Song et al.)."""
    cfg = s.config
    T = cfg.num_train_timesteps
    acp = host(s.alphas_cumprod)
    t = np.arange(T)
    prev = t - T // s.num_inference_steps
    ab = acp
    abp = np.where(prev >= 0, acp[np.maximum(prev, 0)], float(s.final_alpha_cumprod))
    alpha, sigma = np.sqrt(ab), np.sqrt(1.0 - ab)
    rows = blank(T)
    x0_coefs(cfg.prediction_type, alpha, sigma, rows)
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


def lcm_row(s, t: float, k: int, noisy: bool) -> np.ndarray:
    """The LCM row of a step at timestep t and step index k (diffusers' LCMScheduler.step)."""
    acp = host(s.alphas_cumprod)
    ts = host(s.timesteps)
    prev_t = ts[k + 1] if k + 1 < len(ts) else t
    ab = acp[int(t)]
    abp = acp[int(prev_t)] if prev_t >= 0 else np.float64(s.final_alpha_cumprod)
    scaled = np.float64(t) * s.config.timestep_scaling
    c_skip = 0.25 / (scaled**2 + 0.25)
    c_out = scaled / (scaled**2 + 0.25) ** 0.5
    row = blank(1)
    with np.errstate(divide="ignore", invalid="ignore"):
        x0_coefs(s.config.prediction_type, np.sqrt(ab), np.sqrt(1.0 - ab), row)
        row[0, DX], row[0, D0] = c_skip, c_out
        scale = np.sqrt(abp) if noisy else 1.0
        row[0, AX], row[0, A0] = scale * c_skip, scale * c_out
        row[0, AN] = np.sqrt(1.0 - abp) if noisy else 0.0
    return row[0]


def lcm_rows(s) -> np.ndarray:
    """LCM rows per step index k at t = timesteps[k]; noise everywhere but at index num_inference_steps - 1."""
    ts = host(s.timesteps)
    return np.stack([lcm_row(s, ts[k], k, k != s.num_inference_steps - 1) for k in range(len(ts))])


# ---------------------------------------------------------------------------------------------
# Euler, Euler ancestral, flow matching: sigma schedules
# ---------------------------------------------------------------------------------------------
def euler_rows(s, s_churn: float, s_tmin: float, s_tmax: float, s_noise: float) -> np.ndarray:
    """Euler rows per step index k (Karras et al. Alg. 2, diffusers' EulerDiscreteScheduler.step)."""
    sig = host(s.sigmas)
    n = len(sig) - 1
    sigma, nxt = sig[:n], sig[1:]
    gamma = np.where((s_tmin <= sigma) & (sigma <= s_tmax), min(s_churn / (len(sig) - 1), 2**0.5 - 1), 0.0)
    sh = sigma * (gamma + 1.0)
    rows = blank(n)
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


def euler_ancestral_rows(s) -> np.ndarray:
    """Euler ancestral rows per step index k (diffusers' EulerAncestralDiscreteScheduler.step)."""
    sig = host(s.sigmas)
    n = len(sig) - 1
    sf, st = sig[:n], sig[1:]
    up = np.sqrt(st**2 * (sf**2 - st**2) / sf**2)
    down = np.sqrt(np.maximum(st**2 - up**2, 0.0))
    rows = blank(n)
    if s.config.prediction_type == "epsilon":
        rows[:, X0X], rows[:, X0M] = 1.0, -sf
    else:
        rows[:, X0X], rows[:, X0M] = 1.0 / (sf**2 + 1.0), -sf / np.sqrt(sf**2 + 1.0)
    dt = down - sf
    rows[:, AX] = 1.0 + dt / sf
    rows[:, A0] = -dt / sf
    rows[:, AN] = up
    return rows


def flow_rows(s) -> np.ndarray:
    """Flow-matching Euler rows per step index k: x + (sigma_{k+1} - sigma_k) m, or with
    ``stochastic_sampling`` (1 - sigma_{k+1}) (x - sigma_k m) + sigma_{k+1} n."""
    sig = host(s.sigmas)
    n = len(sig) - 1
    sigma, nxt = sig[:n], sig[1:]
    rows = blank(n)
    rows[:, X0X], rows[:, X0M] = 1.0, -sigma
    if s.config.stochastic_sampling:
        rows[:, A0], rows[:, AN] = 1.0 - nxt, nxt
    else:
        rows[:, AX], rows[:, AM] = 1.0, nxt - sigma
    return rows


# ---------------------------------------------------------------------------------------------
# DPM-Solver multistep, UniPC: log-SNR schedules with a history of converted model outputs
# ---------------------------------------------------------------------------------------------
def alpha_sigma(s) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(sigmas, alpha_t, sigma_t) of the schedule (``_sigma_to_alpha_sigma_t``; flow sigmas too)."""
    sig = host(s.sigmas)
    if s.config.get("use_flow_sigmas", False):
        return sig, 1.0 - sig, sig
    alpha = 1.0 / np.sqrt(sig**2 + 1.0)
    return sig, alpha, sig * alpha


def conversion(s, rows: np.ndarray, k: np.ndarray, predict_x0: bool, eps_from_x0: bool = False) -> None:
    """x0 and the converted model output (conv: x0 when ``predict_x0``, else eps) at step indices k.

    diffusers' ``convert_model_output``: thresholding clips x0; ``eps_from_x0`` (DPM-Solver's eps
    forms with thresholding) re-derives eps from the clipped x0; flow_prediction's x0 = x - sigma m.
    """
    cfg = s.config
    sig, alpha, sigma = alpha_sigma(s)
    a, sg = alpha[k], sigma[k]
    pred = cfg.prediction_type
    if pred == "flow_prediction":
        rows[:, X0X], rows[:, X0M] = 1.0, -sig[k]
    else:
        x0_coefs(pred, a, sg, rows)
    if predict_x0:
        rows[:, CX0] = 1.0
    elif eps_from_x0:  # eps = (x - alpha x0c) / sigma
        rows[:, CX], rows[:, CX0] = 1.0 / sg, -a / sg
    elif pred == "epsilon":
        rows[:, CM] = 1.0
    elif pred == "sample":
        rows[:, CX], rows[:, CM] = 1.0 / sg, -a / sg
    else:  # v_prediction
        rows[:, CX], rows[:, CM] = sg, a


def _lam(alpha, sigma):
    with np.errstate(divide="ignore"):
        return np.log(alpha) - np.log(sigma)


def dpm_rows(s, order: int) -> np.ndarray:
    """DPM-Solver multistep rows of ``order`` (1-3) per step index k, in diffusers' formulas.

    With m0 the converted output of this step and m1, m2 = history h1, h2 (diffusers'
    ``model_outputs[-2]``, ``[-3]`` after its shift): D0 = m0, D1 = (m0 - m1) / r0 (order 2) or
    D1_0 + r0 / (r0 + r1) (D1_0 - D1_1), D2 = (D1_0 - D1_1) / (r0 + r1) (order 3), folded into the
    coefficients of m0 (``conv``), h1 and h2. The SDE variants add sigma_t sqrt(1 - e^{-2h}) n
    (sde-dpmsolver++) or sigma_t sqrt(e^{2h} - 1) n (sde-dpmsolver).
    """
    cfg = s.config
    algo, solver = cfg.algorithm_type, cfg.solver_type
    n = len(s.timesteps)
    k = np.arange(n)
    sig, alpha, sigma = alpha_sigma(s)
    rows = blank(n)
    x0_form = algo in ("dpmsolver++", "sde-dpmsolver++")
    conversion(s, rows, k, x0_form, eps_from_x0=not x0_form and cfg.thresholding)
    rows[:, D0] = 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = _lam(alpha, sigma)
        at, st, as0, ss0 = alpha[k + 1], sigma[k + 1], alpha[k], sigma[k]
        h = lam[k + 1] - lam[k]
        em, ep = np.exp(-h), np.exp(h)
        if algo == "dpmsolver++":
            cx, c0, c1, c2 = st / ss0, -(at * (em - 1.0)), at * ((em - 1.0) / h + 1.0), -(at * ((em - 1.0 + h) / h**2 - 0.5))
            c1_mid = -0.5 * (at * (em - 1.0))
        elif algo == "dpmsolver":
            cx, c0, c1, c2 = at / as0, -(st * (ep - 1.0)), -(st * ((ep - 1.0) / h - 1.0)), -(st * ((ep - 1.0 - h) / h**2 - 0.5))
            c1_mid = -0.5 * (st * (ep - 1.0))
        elif algo == "sde-dpmsolver++":
            e2 = np.exp(-2.0 * h)
            cx, c0 = st / ss0 * em, at * (1.0 - e2)
            c1, c2 = at * ((1.0 - e2) / (-2.0 * h) + 1.0), at * ((1.0 - e2 - 2.0 * h) / (2.0 * h) ** 2 - 0.5)
            c1_mid = 0.5 * (at * (1.0 - e2))
            rows[:, AN] = st * np.sqrt(1.0 - np.exp(-2 * h))
        else:  # sde-dpmsolver
            cx, c0 = at / as0, -2.0 * (st * (ep - 1.0))
            c1, c2 = -2.0 * (st * ((ep - 1.0) / h - 1.0)), np.full(n, np.nan)  # diffusers has no third order here
            c1_mid = -(st * (ep - 1.0))
            rows[:, AN] = st * np.sqrt(np.exp(2 * h) - 1.0)
        rows[:, AX] = cx
        if order == 1:
            rows[:, AC] = c0
            return rows
        h0 = lam[k] - lam[k - 1]
        r0 = h0 / h
        if order == 2:
            d1 = c1_mid if solver == "midpoint" else c1
            rows[:, AC] = c0 + d1 / r0
            rows[:, AH] = -d1 / r0
            return rows
        r1 = (lam[k - 1] - lam[k - 2]) / h
        # D1_0 = (m0 - m1) / r0, D1_1 = (m1 - m2) / r1; D1 = D1_0 (1 + w) - w D1_1, w = r0 / (r0 + r1)
        w = r0 / (r0 + r1)
        d10 = c1 * (1.0 + w) + c2 / (r0 + r1)   # coefficient of D1_0
        d11 = -c1 * w - c2 / (r0 + r1)          # coefficient of D1_1
        rows[:, AC] = c0 + d10 / r0
        rows[:, AH] = -d10 / r0 + d11 / r1
        rows[:, AH2] = -d11 / r1
    return rows


def dpm_sequence_rows(s, order: int) -> np.ndarray:
    """DPM rows per step index k at the order a run from index 0 takes there, capped at ``order`` (per-sample
    timesteps: each sample's row is found by its timestep)."""
    per = [dpm_rows(s, o) for o in range(1, order + 1)]
    return np.stack([per[min(dpm_order(s, k, k), order) - 1][k] for k in range(len(s.timesteps))])


def dpm_stacked_rows(s) -> np.ndarray:
    """(solver_order, n, NCOEF): ``dpm_rows`` of orders 1..solver_order, one block each (row (o - 1) * n + k of
    the flattened table is order o at step index k; the compiled step chooses it on the device with
    ``dpm_max_orders``)."""
    return np.stack([dpm_rows(s, o) for o in range(1, s.config.solver_order + 1)])


def dpm_max_orders(s) -> np.ndarray:
    """(n, 1): the order diffusers takes at step index k once the warm-up is over; the order of a step is
    min(this, lower_order_nums + 1)."""
    return np.array([[dpm_order(s, k, s.config.solver_order)] for k in range(len(s.timesteps))], dtype=np.float64)


def dpm_order(s, k: int, lower_order_nums: int) -> int:
    """The order diffusers' DPMSolverMultistepScheduler.step takes at step index k."""
    cfg = s.config
    n = len(s.timesteps)
    final = k == n - 1 and (cfg.euler_at_final or (cfg.lower_order_final and n < 15) or cfg.final_sigmas_type == "zero")
    second = k == n - 2 and cfg.lower_order_final and n < 15
    if cfg.solver_order == 1 or lower_order_nums < 1 or final:
        return 1
    if cfg.solver_order == 2 or lower_order_nums < 2 or second:
        return 2
    return 3


def _unipc_b(hh: np.ndarray, order: int, bh1: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(h_phi_1, B_h, b[order]) of UniPC's bh1/bh2 update, per step (diffusers' loop over factorials)."""
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    B_h = hh if bh1 else np.expm1(hh)
    b, fact = [], 1
    for i in range(1, order + 1):
        b.append(h_phi_k * fact / B_h)
        fact *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / fact
    return h_phi_1, B_h, np.stack(b, axis=-1)


def _unipc_rhos(rks: list[np.ndarray], b: np.ndarray, corrector: bool) -> np.ndarray:
    """rhos_c (corrector: solve R b, 0.5 at order 1) or rhos_p (predictor: solve the leading block, 0.5 at order 2)."""
    order = b.shape[-1]
    n = b.shape[0]
    if (corrector and order == 1) or (not corrector and order == 2):
        return np.full((n, 1), 0.5)
    rk = np.stack(rks + [np.ones(n)], axis=-1)                       # (n, order)
    R = np.stack([rk ** (i - 1) for i in range(1, order + 1)], axis=1)  # (n, order, order): R[i] = rks^i
    if not corrector:
        R, b = R[:, :-1, :-1], b[:, :-1]
    out = np.full(b.shape, np.nan)
    ok = np.isfinite(R).all(axis=(1, 2)) & np.isfinite(b).all(axis=1)
    for i in np.flatnonzero(ok):  # per step: a singular system (an index the order never reaches) stays NaN
        try:
            out[i] = np.linalg.solve(R[i], b[i])
        except np.linalg.LinAlgError:
            pass
    return out


def unipc_rows(s, p: int, c: int) -> np.ndarray:
    """UniPC rows (bh1/bh2) per step index k for predictor order p (1-3) and corrector order c (0 = none).

    The corrector (UniC) rebuilds the current sample from diffusers' ``last_sample`` l, the history
    h1 = m0 (the previous step's converted output), h2, h3 and this step's converted output (conv):
    xs = cur_last l + cur_h* h* + cur_conv conv. The predictor (UniP) then steps from xs with conv
    as its m0 and h1, h2 as its older outputs.
    """
    cfg = s.config
    n = len(s.timesteps)
    k = np.arange(n)
    predict_x0 = cfg.predict_x0
    bh1 = cfg.solver_type == "bh1"
    sig, alpha, sigma = alpha_sigma(s)
    rows = blank(n)
    conversion(s, rows, k, predict_x0)
    rows[:, D0] = 0.0
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        lam = _lam(alpha, sigma)
        if c:
            at, st, as0, ss0 = alpha[k], sigma[k], alpha[k - 1], sigma[k - 1]
            h = lam[k] - lam[k - 1]
            hh = -h if predict_x0 else h
            rks = [(lam[k - (i + 1)] - lam[k - 1]) / h for i in range(1, c)]
            h_phi_1, B_h, b = _unipc_b(hh, c, bh1)
            rho = _unipc_rhos(rks, b, corrector=True)
            scale, K = (at, at * B_h) if predict_x0 else (st, st * B_h)
            rows[:, SX] = 0.0
            rows[:, SL] = st / ss0 if predict_x0 else at / as0
            rows[:, SC] = -K * rho[:, -1]
            rows[:, SH1] = -scale * h_phi_1 + K * rho[:, -1] + sum(K * rho[:, i - 1] / rks[i - 1] for i in range(1, c))
            for i, col in zip(range(1, c), (SH2, SH3)):
                rows[:, col] = -K * rho[:, i - 1] / rks[i - 1]
        at, st, as0, ss0 = alpha[k + 1], sigma[k + 1], alpha[k], sigma[k]
        h = lam[k + 1] - lam[k]
        hh = -h if predict_x0 else h
        rks = [(lam[k - i] - lam[k]) / h for i in range(1, p)]
        h_phi_1, B_h, b = _unipc_b(hh, p, bh1)
        scale, K = (at, at * B_h) if predict_x0 else (st, st * B_h)
        rows[:, AX] = st / ss0 if predict_x0 else at / as0
        if p == 1:  # diffusers' pred_res is the integer 0: K * 0 keeps its inf/NaN
            rows[:, AC] = -scale * h_phi_1 - K * 0.0
        else:
            rho = _unipc_rhos(rks, b, corrector=False)
            rows[:, AC] = -scale * h_phi_1 + sum(K * rho[:, i - 1] / rks[i - 1] for i in range(1, p))
            for i, col in zip(range(1, p), (AH, AH2)):
                rows[:, col] = -K * rho[:, i - 1] / rks[i - 1]
    return rows


def unipc_orders(s, k: int, lower_order_nums: int, last_sample_set: bool) -> tuple[int, int, int]:
    """(predictor order, corrector order or 0, the new ``this_order``) of UniPC's step at index k."""
    cfg = s.config
    use_corrector = k > 0 and (k - 1) not in s.disable_corrector and last_sample_set
    this = min(cfg.solver_order, len(s.timesteps) - k) if cfg.lower_order_final else cfg.solver_order
    this = min(this, lower_order_nums + 1)
    return this, (s.this_order if use_corrector else 0), this


def unipc_stacked_rows(s) -> np.ndarray:
    """(order * (order + 1), n, NCOEF): ``unipc_rows`` of every (predictor p, corrector c) pair, one block each
    (row ((p - 1) * (order + 1) + c) * n + k of the flattened table; the compiled step chooses it on the device
    with ``unipc_selectors``)."""
    order = s.config.solver_order
    return np.stack([unipc_rows(s, p, c) for p in range(1, order + 1) for c in range(order + 1)])


def unipc_selectors(s) -> np.ndarray:
    """(n, 2) per step index k: the predictor order once the warm-up is over (min with lower_order_nums + 1
    on the device), and 1 where the corrector may run (k > 0, k - 1 not in disable_corrector)."""
    n, order = len(s.timesteps), s.config.solver_order
    k = np.arange(n)
    p = np.minimum(order, n - k) if s.config.lower_order_final else np.full(n, order)
    corr = (k > 0) & ~np.isin(k - 1, list(s.disable_corrector))
    return np.stack([p, corr], axis=1).astype(np.float64)


def lcm_single_row(s, t: float, k: int, noisy: bool) -> np.ndarray:
    """(1, NCOEF): the LCM row of a timestep off its step index (``lcm_row``)."""
    return lcm_row(s, t, k, noisy)[None]
