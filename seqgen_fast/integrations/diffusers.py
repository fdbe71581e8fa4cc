"""diffusers pipelines on seqgen_fast: :func:`accelerate` gives a pipeline the fused scheduler steps and,
optionally, CUDA-graph replays of its denoiser.

    pipe = diffusers.StableDiffusionPipeline.from_pretrained(...)
    seqgen_fast.integrations.diffusers.accelerate(pipe, cuda_graph=True)

diffusers itself is not imported here: the pipeline brings it. The whole denoising loop in one CUDA
graph (model and steps) is ``seqgen_fast.diffusion.sample(..., cuda_graph=True)``; a pipeline's own
loop runs host code between its model calls (callbacks, progress bars, guidance), so here each
denoiser call is replayed from a graph and each step is one fused kernel without a host sync.
"""
from __future__ import annotations

import logging

import torch
from torch.utils import _pytree as pytree

log = logging.getLogger("seqgen_fast.integrations.diffusers")
DENOISERS = ("unet", "transformer", "prior")


def accelerate(pipe, *, cuda_graph: bool = False, **options):
    """Replace ``pipe.scheduler`` by ``seqgen_fast.diffusion.fast_scheduler(pipe.scheduler, **options)``
    (in place) and return ``pipe``; with ``cuda_graph=True`` also replay the denoiser (``pipe.unet`` or
    ``pipe.transformer``) from CUDA graphs (:func:`graph_denoiser`). A scheduler that is already fused
    keeps its state; an unsupported scheduler class raises as ``fast_scheduler`` does, naming it."""
    from ..diffusion.schedulers import fast_scheduler

    scheduler = getattr(pipe, "scheduler", None)
    if scheduler is None:
        raise TypeError(f"accelerate: {type(pipe).__name__} has no scheduler attribute (expected a diffusers "
                        "pipeline)")
    pipe.scheduler = fast_scheduler(scheduler, **options)
    if cuda_graph:
        model = next((getattr(pipe, n) for n in DENOISERS if getattr(pipe, n, None) is not None), None)
        if model is None:
            raise TypeError(f"accelerate: {type(pipe).__name__} has no denoiser ({', '.join(DENOISERS)}) to graph")
        graph_denoiser(model)
    return pipe


def _signature(args, kwargs):
    """The cache key of a call: tensors by (shape, dtype, device, strides), the rest by value; None when a
    value cannot be a key (the call then runs eagerly)."""
    leaves, spec = pytree.tree_flatten((args, kwargs))
    key = []
    for leaf in leaves:
        if isinstance(leaf, torch.Tensor):
            key.append(("T", tuple(leaf.shape), leaf.dtype, leaf.device, leaf.stride()))
        else:
            try:
                hash(leaf)
            except TypeError:
                return None
            key.append(leaf)
    return (str(spec), tuple(key))


def graph_denoiser(model: torch.nn.Module) -> torch.nn.Module:
    """Make ``model``'s forward replay from a CUDA graph per call signature (in place; returns ``model``).

    The first call of a signature runs eagerly on a side stream (its result is returned), then the
    forward is captured with static copies of the tensor arguments; later calls copy their tensors
    in, replay, and return a copy of the outputs. A call on CPU tensors, one whose arguments cannot key
    a cache, or one whose capture fails (a host sync in the model, say) runs eagerly; the reason is
    kept in ``model.forward.reasons`` and logged once.
    """
    if getattr(model.forward, "graphed", False):
        return model
    eager = model.forward
    graphs: dict = {}
    reasons: dict = {}

    def forward(*args, **kwargs):
        key = _signature(args, kwargs)
        tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
        why = ("arguments that cannot key a graph cache" if key is None else
               "not CUDA tensors" if not tensors or any(t.device.type != "cuda" for t in tensors) else
               reasons.get(key))
        if why:
            if key not in reasons:
                reasons[key] = why
                log.info("graph_denoiser: %s runs eagerly (%s)", type(model).__name__, why)
            return eager(*args, **kwargs)
        entry = graphs.get(key)
        if entry is None:
            return _capture(key, args, kwargs)
        graph, static_args, static_kwargs, static_out = entry
        for dst, src in zip(pytree.tree_leaves((static_args, static_kwargs)), pytree.tree_leaves((args, kwargs))):
            if isinstance(dst, torch.Tensor):
                dst.copy_(src)
        graph.replay()
        return pytree.tree_map(lambda t: t.clone() if isinstance(t, torch.Tensor) else t, static_out)

    def _capture(key, args, kwargs):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            result = eager(*args, **kwargs)  # the warm-up, and this call's result
        torch.cuda.current_stream().wait_stream(side)
        static_args, static_kwargs = pytree.tree_map(
            lambda t: t.clone() if isinstance(t, torch.Tensor) else t, (args, kwargs))
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph):
                static_out = eager(*static_args, **static_kwargs)
        except Exception as exc:  # a model that cannot be captured keeps running eagerly, with the reason
            reasons[key] = f"capture failed: {type(exc).__name__}: {exc}"
            log.info("graph_denoiser: %s runs eagerly (%s)", type(model).__name__, reasons[key])
            torch.cuda.synchronize()
            return result
        graphs[key] = (graph, static_args, static_kwargs, static_out)
        return result

    forward.graphed = True
    forward.reasons = reasons
    forward.eager = eager
    model.forward = forward
    return model
