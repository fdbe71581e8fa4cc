"""The differential fuzz suite's vocabulary: hypothesis strategies for shapes, dtypes, layouts and
values, and the per-dtype error rule every fuzz test judges by (``tests/test_fuzz_*.py``, marker ``fuzz``).

Profiles (registered by ``tests/conftest.py``): ``ci``, the default, runs a fixed budget of
examples per test, derandomised so CI is repeatable; ``long`` (``pytest -m fuzz --hypothesis-profile
long``) runs many more, fresh each time. A failure shrinks to a minimal case; each one found becomes
a named regression test next to the fuzz test that found it.

Values (:data:`KINDS`): ``normal`` N(0, 1); ``huge`` about 1e4 times that (1e30 in float32/64
would overflow every exp, which is its own kind); ``tiny`` about 1e-4; ``denormal`` subnormal
numbers of the dtype; ``equal`` every element the same; ``posinf``/``neginf``/``nan`` a normal
tensor with some elements replaced by that value. Layouts (:data:`LAYOUTS`): contiguous, a
transposed copy seen through a transpose, a slice of a larger tensor, a broadcast (stride 0) view,
channels_last (4-d).

The error rule (:func:`assert_matches`): non-finite values sit where the reference's do (NaN where
NaN, infinities with their sign); the finite rest is compared by relative error norm against the
float64 reference, under the dtype's bar. For float16/bfloat16 the bar is flash-attn's: at most
twice the error of torch's own op in the same dtype (plus the dtype's epsilon, for ops torch
computes exactly), because half precision cannot be held to a fixed bar independent of the op's
conditioning. Two allowances join that bar, each for what no implementation can avoid: the
rounding of subnormal results to the dtype's grid (:func:`grid_floor`), and, where a test passes it,
twice how far the float64 result moves when the inputs move by an epsilon (:func:`sensitivity`: a
few-element case cancelling where torch's rounding happened to be lucky).

Gradients of non-finite inputs (:func:`assert_gradient_matches`): NaN and +-inf where torch's float64
op has them (the oracle) -- or, element by element, where torch's op in the same dtype does, where the
dtype's saturation makes that differ from float64 -- and the finite rest as above.
"""
from __future__ import annotations

import math

import torch
from hypothesis import strategies as st

# 0, 1, primes and powers of two +- 1 (tile edges), up to the CPU interpreter's comfort
SIZES = (0, 1, 2, 3, 5, 7, 8, 13, 15, 16, 17, 31, 32, 33, 63, 64, 65, 97, 127, 128, 129)
KINDS = ("normal", "huge", "tiny", "denormal", "equal", "posinf", "neginf", "nan")
FINITE_KINDS = KINDS[:5]
LAYOUTS = ("contiguous", "transposed", "sliced", "expanded", "channels_last")
# relative-norm bars against float64 where torch's own op in that dtype is not the yardstick
REL_BAR = {torch.float64: 1e-10, torch.float32: 3e-5}
EPS = {torch.float16: 2.0 ** -10, torch.bfloat16: 2.0 ** -7, torch.float32: 2.0 ** -23, torch.float64: 2.0 ** -52}


def sizes(lo: int = 0, hi: int = 129) -> st.SearchStrategy[int]:
    return st.sampled_from([s for s in SIZES if lo <= s <= hi])


def fill(shape: tuple[int, ...], dtype: torch.dtype, kind: str, seed: int) -> torch.Tensor:
    """A fresh tensor of ``kind`` values (see the module docstring), drawn from ``seed``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    if kind == "huge":
        x = x * 1e4
    elif kind == "tiny":
        x = x * 1e-4
    elif kind == "denormal":
        x = x * torch.finfo(dtype).smallest_normal / 4
    elif kind == "equal":
        x = torch.full(shape, float(x.reshape(-1)[0]) if x.numel() else 0.5, dtype=torch.float64)
    elif kind in ("posinf", "neginf", "nan"):
        special = {"posinf": math.inf, "neginf": -math.inf, "nan": math.nan}[kind]
        hit = torch.rand(shape, generator=g) < 0.1
        if x.numel():
            hit.reshape(-1)[torch.randint(0, x.numel(), (1,), generator=g)] = True  # at least one
        x = x.masked_fill(hit, special)
    return x.to(dtype)


def with_layout(x: torch.Tensor, layout: str) -> torch.Tensor:
    """``x`` seen through ``layout``: a view of fresh storage, never ``x`` itself. ``expanded``
    broadcasts x's first row over dim 0 (stride 0), so its values are that row's: compute references
    from the returned tensor."""
    if layout == "transposed" and x.dim() >= 2:
        return x.transpose(-1, -2).contiguous().transpose(-1, -2)
    if layout == "sliced" and x.dim() >= 1:
        big = x.new_empty(*x.shape[:-1], 2 * x.shape[-1] + 1).fill_(float("nan"))
        big[..., 1::2] = x
        return big[..., 1::2]
    if layout == "expanded" and x.dim() >= 1 and x.shape[0] >= 1:
        return x[:1].clone().expand_as(x)
    if layout == "channels_last" and x.dim() == 4:
        return x.contiguous(memory_format=torch.channels_last)
    return x.clone()


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """||ours - ref|| / ||ref|| over the finite elements, in float64 (0 when both are empty)."""
    a, b = ours.detach().double().cpu(), ref.detach().double().cpu()
    finite = torch.isfinite(b)
    a, b = a[finite], b[finite]
    den = b.norm().item()
    num = (a - b).norm().item()
    return num / den if den > 0 else num


def grid_floor(ref64: torch.Tensor, dtype: torch.dtype) -> float:
    """The relative error norm of rounding ``ref64`` to ``dtype``'s subnormal grid alone: half a step
    (smallest normal x epsilon) per finite element, over the reference's norm. Below the smallest
    normal number a half-precision result holds fewer bits than epsilon says (a float16 gradient of
    3.5e-6 is 58 steps of 6e-8: 0.9% relative), so no rule of epsilons judges it."""
    b = ref64.detach().double().cpu()
    b = b[torch.isfinite(b)]
    den = b.norm().item()
    step = torch.finfo(dtype).smallest_normal * EPS[dtype]
    return 0.5 * step * math.sqrt(b.numel()) / den if den > 0 else 0.0


def sensitivity(fn, tensors: list[torch.Tensor | None], dtype: torch.dtype, samples: int = 3, seed: int = 0) -> list[float]:
    """How far ``fn``'s float64 outputs move when every element of ``tensors`` moves by up to one
    ``dtype`` epsilon, relatively (uniform, ``samples`` draws): for each output, the largest relative
    error norm of a perturbed run against the unperturbed one. A backward-stable kernel's rounding is
    such a perturbation of its inputs (a dot product in the dtype is the exact one of inputs perturbed
    by a few epsilons), so this estimates what the op's conditioning lets any implementation lose;
    torch's own error in the dtype is one sample of it, and on a few elements a lucky one (seen: an
    LSTM cell's c = f c_prev + i g cancelling 8-fold, torch 0.28% off, an equally valid rounding order
    1.1%). ``fn`` takes ``tensors`` (float64, None passed through) and returns a sequence of tensors
    or Nones."""
    base = fn(*tensors)
    g = torch.Generator().manual_seed(seed)
    spread = [0.0] * len(base)
    for _ in range(samples):
        moved = [t if t is None or not t.is_floating_point()
                 else t * (1 + EPS[dtype] * (2 * torch.rand(t.shape, generator=g, dtype=t.dtype) - 1)) for t in tensors]
        for k, (o, b) in enumerate(zip(fn(*moved), base)):
            if o is not None and b is not None:
                o, b = o.detach().double().cpu(), b.detach().double().cpu()
                both = torch.isfinite(o) & torch.isfinite(b)  # an element moved past overflow is not a spread
                spread[k] = max(spread[k], rel_err(o[both], b[both]))
    return spread


def assert_matches(ours: torch.Tensor, ref64: torch.Tensor, *, theirs: torch.Tensor | None = None,
                   what: str = "output", ulps: float = 1, floor: float = 0.0) -> None:
    """``ours`` (any dtype) against the float64 reference ``ref64`` under the error rule of the module
    docstring; ``theirs`` is torch's own op in ``ours``' dtype (the yardstick for half precision).
    ``ulps``: the epsilons of the half-precision bar (1; a caller that states why it rounds once more
    than torch's op, e.g. a backward reading saved half-precision activations, may pass 2). ``floor``:
    a relative error the case's conditioning allows any implementation (twice :func:`sensitivity`),
    added to the bar; half precision also adds :func:`grid_floor`."""
    assert ours.shape == ref64.shape, f"{what}: shape {tuple(ours.shape)} != reference {tuple(ref64.shape)}"
    a, b = ours.detach().double().cpu(), ref64.detach().double().cpu()
    assert torch.equal(torch.isnan(a), torch.isnan(b)), f"{what}: NaN at other places than the reference's"
    inf_a, inf_b = torch.isinf(a), torch.isinf(b)
    assert torch.equal(inf_a, inf_b) and torch.equal(a[inf_a], b[inf_b]), f"{what}: infinities differ"
    err = rel_err(a, b)
    if ours.dtype in REL_BAR:
        bar = REL_BAR[ours.dtype] + floor
    else:
        assert theirs is not None, f"{what}: a {ours.dtype} comparison needs torch's own result in that dtype"
        # torch's error where torch gives a number: a NaN / inf of its own at an element float64 has finite
        # is no yardstick (seen: float16 nn.MultiheadAttention's fast path gives NaN for a fully padded row,
        # where float32 and float64 give the output projection's bias, as ours)
        t = theirs.detach().double().cpu()
        told = torch.isfinite(t)
        bar = 2 * rel_err(t[told], b[told]) + ulps * EPS[ours.dtype] + floor + grid_floor(b, ours.dtype)
    assert err <= bar, f"{what}: relative error {err:.3e} > {bar:.3e} ({ours.dtype})"


def assert_matches_torch(ours: torch.Tensor, ref64: torch.Tensor, theirs: torch.Tensor, *, what: str = "output",
                         ulps: float = 1, flush_subnormals: bool = False, floor: float = 0.0) -> None:
    """The error rule for an op that replaces torch's ``theirs`` (its result in ``ours``' dtype):

    * non-finite values sit where torch's own op in that dtype puts them (NaN where NaN, infinities
      with their sign), not where the float64 reference does: which saturated value overflows or
      underflows to 0 (sigmoid(-100) is 0 in float32, 4e-44 in float64, and 0 * inf is NaN) depends
      on the dtype, and the op replaced is torch's in that dtype;
    * the elements finite in all three are judged by :func:`assert_matches` against ``ref64``, with the
      bar raised to twice torch's own error where that exceeds the fixed bar (flash-attn's rule with the
      fixed bar as its floor: an ill-conditioned case, or values the dtype cannot hold such as
      derivatives of saturated gates around 1e-300, is judged against what torch achieves);
    * ``flush_subnormals``: where any of the three is below the dtype's smallest normal number, all
      three count as 0 (for ops whose kernels flush subnormals, --use_fast_math's FTZ, and whose CPU
      half-precision GEMMs may; differences of subnormal size are then no error). Flushing each alone
      would turn a value just above the threshold against one just below it into an error of the
      value's whole size;
    * ``floor``: as :func:`assert_matches`'.
    """
    a, b, t = (v.detach().double().cpu() for v in (ours, ref64, theirs))
    if flush_subnormals and ours.dtype.is_floating_point:
        tiny = torch.finfo(ours.dtype).smallest_normal
        sub = (a.abs() < tiny) | (b.abs() < tiny) | (t.abs() < tiny)
        a, b, t = (v.masked_fill(sub, 0.0) for v in (a, b, t))
    assert a.shape == b.shape == t.shape, f"{what}: shapes {tuple(a.shape)}, {tuple(b.shape)}, {tuple(t.shape)}"
    assert torch.equal(torch.isnan(a), torch.isnan(t)), f"{what}: NaN at other places than torch's"
    inf_a, inf_t = torch.isinf(a), torch.isinf(t)
    assert torch.equal(inf_a, inf_t) and torch.equal(a[inf_a], t[inf_t]), f"{what}: infinities differ from torch's"
    keep = torch.isfinite(a) & torch.isfinite(b) & torch.isfinite(t)
    a, b, t = a[keep], b[keep], t[keep]
    if ours.dtype in REL_BAR and 2 * rel_err(t, b) > REL_BAR[ours.dtype]:
        err, bar = rel_err(a, b), 2 * rel_err(t, b) + floor
        assert err <= bar, f"{what}: relative error {err:.3e} > twice torch's + floor {bar:.3e} ({ours.dtype})"
        return
    assert_matches(a.to(ours.dtype), b, theirs=t.to(ours.dtype), what=what, ulps=ulps, floor=floor)


def value_classes(x: torch.Tensor) -> torch.Tensor:
    """Per element: 0 finite, 1 NaN, 2 +inf, 3 -inf (in float64 on the CPU)."""
    x = x.detach().double().cpu()
    return (torch.isnan(x) * 1 + torch.isposinf(x) * 2 + torch.isneginf(x) * 3).to(torch.int8)


def assert_gradient_matches(ours: torch.Tensor, ref64: torch.Tensor, theirs: torch.Tensor, *,
                            what: str = "grad", ulps: float = 1, floor: float = 0.0) -> None:
    """The error rule for gradients of non-finite inputs. Each element is NaN, +inf, -inf or finite as
    in torch's own float64 op (``ref64``, the oracle), or as in torch's op in ours' dtype (``theirs``)
    where that differs from float64: a gate that saturates to exactly 0 or 1 in float32 but not in
    float64 meets an inf as 0 * inf = NaN in one and +-inf in the other, which is the dtype's, not an
    error (seen: dW_ih of a huge input with an infinite c0). The elements finite in all three are
    judged by :func:`assert_matches_torch`'s rule."""
    a, b, t = (v.detach().double().cpu() for v in (ours, ref64, theirs))
    assert a.shape == b.shape == t.shape, f"{what}: shapes {tuple(a.shape)}, {tuple(b.shape)}, {tuple(t.shape)}"
    ca, cb, ct = value_classes(a), value_classes(b), value_classes(t)
    wrong = (ca != cb) & (ca != ct)
    if wrong.any():
        names = ("finite", "NaN", "+inf", "-inf")
        k = int(wrong.reshape(-1).nonzero()[0])
        raise AssertionError(f"{what}: {int(wrong.sum())} of {a.numel()} elements are not NaN/inf/finite as in torch's "
                             f"(the first, flat index {k}: ours {names[ca.reshape(-1)[k]]}, float64 torch "
                             f"{names[cb.reshape(-1)[k]]}, torch in {ours.dtype} {names[ct.reshape(-1)[k]]})")
    keep = (ca == 0) & (cb == 0) & (ct == 0)
    assert_matches_torch(a[keep].to(ours.dtype), b[keep], t[keep].to(ours.dtype), what=what, ulps=ulps,
                         flush_subnormals=True, floor=floor)
