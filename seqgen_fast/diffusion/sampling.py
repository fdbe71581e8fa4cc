"""``sample(...)``: a denoising loop over a fused scheduler, optionally replayed from one CUDA graph.

The loop is the one diffusers pipelines run::

    x = latents * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        inp = cat([x, x]) if guidance_scale is not None else x
        out = model_fn(scheduler.scale_model_input(inp, t), t)
        x = scheduler.step(out, t, x, guidance_scale=guidance_scale, generator=generator).prev_sample

With ``cuda_graph=True`` the *whole loop* -- model_fn calls and the fused steps -- is captured
into one CUDA graph, so ``model_fn`` must be capturable (no host syncs, no CPU tensors read back,
static shapes). The first call for a configuration runs the loop eagerly (that is its result and
also compiles every kernel specialization and builds the coefficient tables and the step plans, with
the device offset tensor the capture uses), then captures the loop: inside the capture each step's
Python runs once and records its fused-step kernel, building, compiling and copying nothing; a replay
runs no Python per step. Later calls with the same model_fn, scheduler, shapes, dtype, guidance and
step count copy the latents into the graph's input and replay it (the graphs live on the fast
scheduler: pass ``fast_scheduler(...)``, not a bare diffusers scheduler, to reuse them). The loop's
steps do not write pred_original_sample, which it does not read.

Noise in a graph is drawn in the kernel, as in an eager loop, and is fresh at every replay: the
captured steps read their Philox offset from a device tensor, and the graph's last node adds the
loop's number of noisy steps to it, so each replay advances the offset on the device by itself
(the scheduler's host ``offset`` follows; the device one is set from it again only when the two
differ, e.g. after an eager loop). Eager loops, the first call and every replay draw disjoint
streams, and a replay draws exactly what an eager loop starting at the same ``offset`` draws. A
``generator`` is not allowed with ``cuda_graph=True``.
"""
from __future__ import annotations

from typing import Callable

import torch

from .schedulers import FastScheduler, fast_scheduler


def _loop(model_fn, fs: FastScheduler, x: torch.Tensor, guidance_scale, generator) -> torch.Tensor:
    """The denoising loop; the steps skip pred_original_sample, which the loop does not read."""
    sf = fs._sf
    write_x0, sf.write_x0 = sf.write_x0, False
    try:
        x = x * fs.init_noise_sigma
        for t in fs.timesteps:
            inp = torch.cat([x, x]) if guidance_scale is not None else x
            out = model_fn(fs.scale_model_input(inp, t), t)
            x = fs.step(out, t, x, guidance_scale=guidance_scale, generator=generator, return_dict=False)[0]
    finally:
        sf.write_x0 = write_x0
    return x


def sample(model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], scheduler, latents: torch.Tensor, *,
           guidance_scale: float | None = None, num_inference_steps: int, generator: torch.Generator | None = None,
           cuda_graph: bool = False) -> torch.Tensor:
    """Denoise ``latents`` (B, ...) in ``num_inference_steps`` steps of ``scheduler`` (diffusers or fast).

    ``model_fn(model_input, t)`` returns the model output for the (B, ...) input, or for the
    (2B, ...) [unconditional; conditional] input when ``guidance_scale`` is given (guidance is
    fused into the step). ``latents`` is unit-variance noise; it is multiplied by
    ``init_noise_sigma`` first. Returns the final sample. See the module docstring for
    ``cuda_graph``.
    """
    fs = fast_scheduler(scheduler)
    if not isinstance(latents, torch.Tensor) or latents.dim() < 1:
        raise ValueError("latents: expected a (B, ...) tensor")
    if num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not cuda_graph:
        fs.set_timesteps(num_inference_steps, device=latents.device)
        fs.rewind()
        return _loop(model_fn, fs, latents, guidance_scale, generator)

    if latents.device.type != "cuda":
        raise ValueError("cuda_graph=True needs CUDA latents")
    if generator is not None:
        raise ValueError("generator: not allowed with cuda_graph=True (in-kernel noise is used)")
    key = (id(model_fn), tuple(latents.shape), latents.dtype, latents.device, num_inference_steps,
           guidance_scale if not isinstance(guidance_scale, torch.Tensor) else ("tensor", id(guidance_scale)))
    graphs = fs._sf.graphs
    entry = graphs.get(key)
    if entry is not None:
        graph, static_in, static_out, rng_offset, noisy_steps, _keep = entry
        static_in.copy_(latents)
        if entry[5][0] != fs.offset:  # the device offset is behind the host one (an eager loop ran)
            rng_offset.fill_(fs.offset)
        graph.replay()  # ends with rng_offset += noisy_steps, on the device
        fs.offset += noisy_steps
        entry[5][0] = fs.offset
        return static_out.clone()

    fs.set_timesteps(num_inference_steps, device=latents.device)
    fs.rewind()
    sf = fs._sf
    rng_offset = torch.zeros(1, dtype=torch.int64, device=latents.device)
    # The eager run is the result and the warm-up: with the device offset present (and 0) its steps build
    # the very plans, tables and compiled kernels the captured steps use, so the capture builds nothing.
    sf.rng_offset = rng_offset
    try:
        result = _loop(model_fn, fs, latents, guidance_scale, None)
    finally:
        sf.rng_offset = None
    torch.cuda.synchronize(latents.device)
    static_in = latents.clone()
    graph = torch.cuda.CUDAGraph()
    fs.rewind()
    offset, sf.offset, sf.rng_offset = sf.offset, 0, rng_offset  # captured offsets: relative to rng_offset
    try:
        with torch.cuda.graph(graph):
            static_out = _loop(model_fn, fs, static_in, guidance_scale, None)
            noisy_steps = sf.offset
            rng_offset.add_(noisy_steps)
    finally:
        sf.offset, sf.rng_offset = offset, None
    rng_offset.fill_(fs.offset)  # the capture ran nothing: the first replay starts at the host offset
    graphs[key] = (graph, static_in, static_out, rng_offset, noisy_steps, [fs.offset] + fs._keep_alive())
    return result
