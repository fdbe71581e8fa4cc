"""Fused token sampling: ``seqgen_fast.functional.sample_tokens``.

One ``torch.library`` op, ``seqgen_fast::sample_tokens`` (not differentiable), dispatched in the
order triton, reference. The random stream enters the op as a 1-element int64 *device* tensor
drawn from the caller's generator (``torch.randint`` on the device: no host sync, and inside a
captured CUDA graph each replay draws a fresh seed). The triton kernel seeds its in-kernel Philox
with it; the reference seeds a ``torch.Generator`` with it (one host read) and calls
``torch.multinomial``. Either way the same generator state gives the same tokens on that backend.

Non-finite logits follow one policy on every backend (``errors=``). Both backends mark a row
without a distribution with the token ``-1`` on the device; the op then applies the policy:
``"raise"`` (torch's behaviour: ``torch.argmax`` for greedy rows, ``torch.multinomial``'s error for
sampled ones, which costs one host read of a flag) or ``"mark"`` (no host sync: -1 and a flag).
The op is opaque to ``torch.compile``, so either policy compiles without a graph break.
"""
from __future__ import annotations

import torch
from torch import Tensor

from .._backend import Capabilities, dispatcher
from ..reference import sampling as reference
from ._library import custom_op

SAMPLE = dispatcher("sample_tokens", order=("triton", "reference"))
TRITON = Capabilities("triton", dtypes=(torch.float16, torch.bfloat16, torch.float32))
_SEED_HIGH = 2**62


@SAMPLE.register("triton", supports=lambda logits, seed, *_: TRITON.reasons(logits, seed), caps=TRITON)
def _triton(logits, seed, temperature, top_k, top_p):
    from ..kernels import sampling as kernel

    return kernel.sample_tokens(logits, seed, temperature, top_k, top_p)


@SAMPLE.register("reference")
def _reference(logits, seed, temperature, top_k, top_p):
    generator = None
    if seed is not None:
        generator = torch.Generator(device=logits.device)
        generator.manual_seed(int(seed.item()))
    return reference.sample_tokens(logits, temperature=temperature, top_k=top_k or None,
                                   top_p=top_p if top_p < 1 else None, generator=generator)


ERRORS = ("raise", "mark")


def _apply_policy(tokens: Tensor, logits: Tensor, greedy: bool) -> Tensor:
    """``errors="raise"`` on the kernels' -1 marks: a greedy row holding NaN gets the index of its first
    NaN, as ``torch.argmax`` (NaN compares greater than everything there); a sampled row without a
    distribution raises ``torch.multinomial``'s error (one host read of a flag; impossible while a
    CUDA graph is captured)."""
    bad = tokens < 0
    if greedy:
        return torch.where(bad, torch.isnan(logits).to(torch.int8).argmax(-1), tokens)
    if logits.is_cuda and torch.cuda.is_current_stream_capturing():
        raise RuntimeError("sample_tokens: errors='raise' checks on the host for rows without a distribution, "
                           "which cannot happen inside a CUDA graph capture; pass errors='mark' there")
    if bad.any():
        rows = bad.nonzero().flatten().tolist()
        raise RuntimeError(f"sample_tokens: probability tensor contains either `inf`, `nan` or element < 0 "
                           f"(torch.multinomial's error): {len(rows)} row(s) have no distribution -- a NaN or +inf "
                           f"logit, or every logit -inf -- first row {rows[0]}; pass errors='mark' to get -1 and a "
                           "flag per row instead")
    return tokens


def _fake(logits, seed, temperature, top_k, top_p, errors, backend):
    return logits.new_empty(logits.shape[:1], dtype=torch.int64)


@custom_op("sample_tokens", fake=_fake)
def _sample_op(logits: Tensor, seed: Tensor | None, temperature: float, top_k: int, top_p: float, errors: str,
               backend: str) -> Tensor:
    tokens = SAMPLE.impl(backend)(logits, seed, temperature, top_k, top_p)
    return _apply_policy(tokens, logits, temperature == 0) if errors == "raise" else tokens


def draw_seed(device: torch.device, generator: torch.Generator | None) -> Tensor:
    """A (1,) int64 seed in ``[0, 2^62)`` drawn on ``device`` from ``generator`` (or the default one)."""
    if generator is not None:
        if not isinstance(generator, torch.Generator):
            raise TypeError(f"sample_tokens: generator must be a torch.Generator, got {type(generator).__name__}")
        if torch.device(generator.device).type != device.type:
            raise ValueError(f"sample_tokens: generator is on {generator.device} but logits are on {device}; "
                             "use a generator of the logits' device")
    return torch.randint(0, _SEED_HIGH, (1,), generator=generator, device=device, dtype=torch.int64)


def sample_tokens(logits: Tensor, *, temperature: float = 1.0, top_k: int | None = None, top_p: float | None = None,
                  generator: torch.Generator | None = None, errors: str = "raise",
                  backend: str | None = None) -> Tensor | tuple[Tensor, Tensor]:
    """Draw one token per row of ``logits``: temperature, top-k and top-p filtering and the draw, fused.

    ``logits``: (..., V) float16/bfloat16/float32 (float64 on the reference backend); returns int64
    indices of shape ``logits.shape[:-1]`` -- (B,) for (B, V), a 0-d tensor for (V,).

    The distribution (float32 math) is ``softmax(logits / temperature)`` restricted to the top-k
    tokens (every token tied with the k-th largest kept, as transformers' ``TopKLogitsWarper``),
    then to the nucleus: the smallest set of the largest tokens whose probability (renormalized after
    top-k) is ``>= top_p`` -- token ``i`` is kept iff the tokens strictly larger than it hold
    ``< top_p`` of the mass (transformers' ``TopPLogitsWarper`` convention; equal logits are kept or
    dropped together; the largest token is always kept). See ``seqgen_fast.reference.sampling``.

    * ``temperature``: ``> 0``, or ``0`` for greedy decoding (first index of the maximum; draws no
      random numbers and ignores ``top_k``/``top_p``).
    * ``top_k``: None (off) or an int ``>= 1``; ``top_k >= V`` keeps everything.
    * ``top_p``: None (off) or a number in ``(0, 1]``; ``1`` keeps everything.
    * ``generator``: a ``torch.Generator`` on the logits' device, or None for the default one. One
      int64 seed is drawn from it on the device per call, so the same generator state gives the same
      tokens (on the same backend), and a captured CUDA graph draws fresh tokens on each replay.
      Under ``torch.compile`` pass None: dynamo cannot trace a ``torch.Generator`` argument (a graph
      break, as for ``torch.multinomial``'s), while the default generator compiles.
    * ``errors``: what a row without a distribution gives -- one holding a NaN or ``+inf``, or all
      ``-inf`` (for greedy: one holding a NaN).

      - ``"raise"`` (default): the behaviour of the ops replaced. Greedy rows follow ``torch.argmax``
        (a NaN row gives the index of its first NaN; +inf and all -inf rows have ordinary maxima);
        a sampled row without a distribution raises ``RuntimeError``, as ``torch.multinomial`` does on
        the CPU (on CUDA it would trip a device-side assert). Checking costs one host read of a flag
        per sampled call, and cannot run inside a CUDA graph capture.
      - ``"mark"``: never raises and never syncs: returns ``(tokens, invalid)``, ``invalid`` a bool
        tensor of the tokens' shape flagging those rows, whose token is ``-1`` (CUDA-graph
        capturable; check the flags when convenient).

    Backends: triton (CUDA; no sort of the vocabulary: the top-k and top-p thresholds are found by
    a 16-way search over the values' order-preserving integer keys, then an inverse-CDF draw with
    in-kernel Philox; long rows with top-k first reduce each 2048-column segment to its top-k
    candidates in parallel -- see ``seqgen_fast.kernels.sampling``), reference (softmax,
    ``torch.topk``/``torch.sort``, ``torch.multinomial``; one host read of the seed). The two
    backends draw different tokens from the same distribution. Not differentiable.
    """
    reference.check_args(logits, temperature, top_k, top_p)
    if errors not in ERRORS:
        raise ValueError(f"sample_tokens: errors must be 'raise' or 'mark', got {errors!r}")
    rows = logits.reshape(-1, logits.shape[-1])
    temperature = float(temperature)
    seed = None if temperature == 0 else draw_seed(logits.device, generator)
    k = 0 if top_k is None else int(top_k)
    p = 1.0 if top_p is None else float(top_p)
    chosen = SAMPLE.select(rows, seed, temperature, k, p, backend=backend)
    tokens = _sample_op(rows, seed, temperature, k, p, errors, chosen).reshape(logits.shape[:-1])
    return tokens if errors == "raise" else (tokens, tokens < 0)


__all__ = ["sample_tokens", "draw_seed"]
