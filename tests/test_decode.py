"""KV-cache attention: flash_attn_with_kvcache and decode_attention.

Ground truth: an oracle built here from plain torch -- gather the pages, rotate with complex
arithmetic, write the new keys, torch's SDPA per sequence -- in float64. The project's reference
(``seqgen_fast.reference.decode``) is checked against it over every argument; the Triton kernel is
checked against both, under the interpreter on the CPU (float32 and float16: Triton 3.9's
interpreter computes bfloat16 ``tl.dot`` wrongly) and compiled on a GPU (every dtype), in both its
lowerings (TMA tensor descriptors, which the interpreter runs too, and the portable pointer loads)
and both schedules (stream-K with the folded merge, one program per row). Ahead-of-time sm_90
compiles check what the interpreter cannot: TMA boxes and their pipeline depth, 16-byte loads,
spills, shared memory (``SEQGEN_FAST_AOT_PYTHON`` runs them under another Triton, e.g. 3.6).
"""
import math
import re

import pytest
import torch
import torch.nn.functional as F

import seqgen_fast
from seqgen_fast import use_backend
from seqgen_fast.functional import decode_attention
from seqgen_fast.integrations.flash_attn import flash_attn_with_kvcache
from seqgen_fast.kernels import decode as kernel
from seqgen_fast.ops import decode as ops
from seqgen_fast.reference import decode as reference
from support.aot import compile_sm90, pointers, sass_loops
from support.utils import TOL, assert_close_rel, poison, rel_err


@pytest.fixture(autouse=True)
def _debug_checks_off(monkeypatch):
    """The default under test: no host-side value checks (tests that want them turn them on)."""
    monkeypatch.delenv("SEQGEN_FAST_DEBUG_CHECKS", raising=False)


# ------------------------------------------------------------------------------------------------
# Inputs and the independent oracle
# ------------------------------------------------------------------------------------------------
def make_case(device="cpu", dtype=torch.float32, *, batch=3, lq=1, hq=4, hkv=2, d=32, cap=40, lk=0, page=None,
              rotary=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None, batch_idx=False, leftpad=False,
              seqlens="ragged", num_splits=0, lens=None):
    """Keyword arguments of flash_attn_with_kvcache for one case (fresh random values).

    ``cap``: rows per sequence (rounded up to whole pages when paged); ``rotary``: None,
    "interleaved", "neox" (rotary dim = d) or "partial" (rotary dim d/2, non-interleaved);
    ``seqlens``: "ragged" (lengths include 0 and a full cache), "int" or "none"; ``alibi``:
    None, "heads" (Hq,) or "batch" (B, Hq).
    """
    g = torch.Generator().manual_seed(torch.randint(0, 2**31, ()).item())
    rnd = lambda *s: torch.randn(*s, generator=g).to(device=device, dtype=dtype)  # noqa: E731
    args = dict(q=rnd(batch, lq, hq, d), causal=causal, window_size=window, softcap=softcap, num_splits=num_splits)
    if page:
        per_seq = math.ceil(cap / page)
        cap = per_seq * page
        pages = per_seq * batch + 3
        args["k_cache"], args["v_cache"] = rnd(pages, page, hkv, d), rnd(pages, page, hkv, d)
        args["block_table"] = torch.randperm(pages, generator=g)[: per_seq * batch].reshape(batch, per_seq).to(
            device=device, dtype=torch.int32)
    else:
        rows = batch + 2 if batch_idx else batch
        args["k_cache"], args["v_cache"] = rnd(rows, cap, hkv, d), rnd(rows, cap, hkv, d)
        if batch_idx:
            args["cache_batch_idx"] = torch.randperm(rows, generator=g)[:batch].to(device=device, dtype=torch.int32)
    if lk:
        args["k"], args["v"] = rnd(batch, lk, hkv, d), rnd(batch, lk, hkv, d)
    if lens is None:
        lens = torch.randint(0, cap - lk + 1, (batch,), generator=g)
        lens[0] = cap - lk                       # a full cache
        if batch > 1:
            lens[1] = 0                           # an empty one
    lens = torch.as_tensor(lens).to(device=device, dtype=torch.int32)
    if seqlens == "ragged":
        args["cache_seqlens"] = lens
    elif seqlens == "int":
        args["cache_seqlens"] = int(lens[0])
    if leftpad:
        args["cache_leftpad"] = (torch.rand(batch, generator=g) * lens.cpu().float()).to(device=device,
                                                                                         dtype=torch.int32)
    if rotary:
        rd = d // 2 if rotary == "partial" else d
        angle = torch.rand(cap + 3, rd // 2, generator=g, dtype=torch.float64) * 2 * math.pi
        args["rotary_cos"], args["rotary_sin"] = angle.cos().to(device, dtype), angle.sin().to(device, dtype)
        args["rotary_interleaved"] = rotary == "interleaved"
    if alibi:
        shape = (hq,) if alibi == "heads" else (batch, hq)
        args["alibi_slopes"] = (torch.rand(shape, generator=g) * 0.3).to(device)
    return args


def as64(args):
    return {n: (t.double() if isinstance(t, torch.Tensor) and t.is_floating_point() and n != "alibi_slopes" else
                t.clone() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}


def _rotate_complex(x, cos, sin, interleaved):
    """Rotate the first 2 * cos.shape[-1] dims of x (..., D) as complex numbers, in float64."""
    rd = 2 * cos.shape[-1]
    x = x.double()
    head, tail = x[..., :rd], x[..., rd:]
    if interleaved:
        z = torch.view_as_complex(head.reshape(*head.shape[:-1], rd // 2, 2).contiguous())
    else:
        z = torch.complex(head[..., : rd // 2], head[..., rd // 2:])
    z = z * torch.complex(cos.double(), sin.double())
    head = torch.view_as_real(z).flatten(-2) if interleaved else torch.cat([z.real, z.imag], dim=-1)
    return torch.cat([head, tail], dim=-1)


def oracle(q, k_cache, v_cache, k=None, v=None, rotary_cos=None, rotary_sin=None, cache_seqlens=None,
           cache_batch_idx=None, cache_leftpad=None, block_table=None, causal=False, window_size=(-1, -1),
           softcap=0.0, rotary_interleaved=True, alibi_slopes=None, num_splits=0, softmax_scale=None):
    """flash_attn_with_kvcache's semantics from plain torch, one sequence at a time: gather the
    sequence's rows (pages or batch row), rotate (complex float64 arithmetic, then q's dtype),
    append into k_cache/v_cache in place, then torch's SDPA (softmax for softcap) in q's dtype.
    Returns (out, lse)."""
    batch, lq, hq, d = q.shape
    dev, dt = q.device, q.dtype
    hkv = k_cache.shape[2]
    lk = 0 if k is None else k.shape[1]
    paged = block_table is not None
    page = k_cache.shape[1]
    cap = block_table.shape[1] * page if paged else page
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    if isinstance(cache_seqlens, int):
        cache_seqlens = torch.full((batch,), cache_seqlens)
    if lq == 1 and alibi_slopes is None:
        causal = False
    left, right = (int(w) for w in window_size)
    right = 0 if causal else right
    out = torch.zeros(batch, lq, hq, d, dtype=dt, device=dev)
    lse = torch.full((batch, hq, lq), float("inf"), dtype=torch.float64, device=dev)
    p_all = torch.arange(cap, device=dev)
    for b in range(batch):
        n0 = cap if cache_seqlens is None else int(cache_seqlens[b])
        if paged:
            first, second = block_table[b].long()[p_all // page], p_all % page
        else:
            first = torch.full_like(p_all, b if cache_batch_idx is None else int(cache_batch_idx[b]))
            second = p_all
        qb = q[b]
        if rotary_cos is not None:
            pos = [n0 + i if (causal or left >= 0 or right >= 0) else n0 for i in range(lq)]
            qb = _rotate_complex(qb, rotary_cos[pos][:, None], rotary_sin[pos][:, None], rotary_interleaved).to(dt)
        if lk:
            kb = k[b]
            if rotary_cos is not None:
                kb = _rotate_complex(kb, rotary_cos[n0:n0 + lk][:, None], rotary_sin[n0:n0 + lk][:, None],
                                     rotary_interleaved)
            k_cache[first[n0:n0 + lk], second[n0:n0 + lk]] = kb.to(k_cache.dtype)
            v_cache[first[n0:n0 + lk], second[n0:n0 + lk]] = v[b]
        total = n0 + lk
        lp = 0 if cache_leftpad is None else int(cache_leftpad[b])
        keys = k_cache[first[lp:total], second[lp:total]].to(dt)          # (n, Hkv, D)
        vals = v_cache[first[lp:total], second[lp:total]].to(dt)
        p = p_all[lp:total]
        q_at = torch.arange(lq, device=dev)[:, None] + total - lq
        visible = torch.ones(lq, total - lp, dtype=torch.bool, device=dev)
        if right >= 0:
            visible &= p[None, :] <= q_at + right
        if left >= 0:
            visible &= p[None, :] >= q_at - left
        bias = torch.zeros(hq, lq, total - lp, dtype=dt, device=dev)
        if alibi_slopes is not None:
            slopes = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            bias = (-slopes.double()[:, None, None] * (q_at - p[None, :]).abs()).to(dt)
        bias = bias.masked_fill(~visible, float("-inf"))
        qh = qb.transpose(0, 1)[None]                                      # (1, Hq, Lq, D)
        kh = keys.transpose(0, 1)[None].repeat_interleave(hq // hkv, 1)    # (1, Hq, n, D)
        vh = vals.transpose(0, 1)[None].repeat_interleave(hq // hkv, 1)
        scores = (qh @ kh.transpose(-1, -2))[0] * scale
        if softcap > 0:
            scores = softcap * torch.tanh(scores / softcap)
        scores = scores + bias
        seen = visible.any(-1)                                             # (Lq,)
        if softcap > 0:
            o = torch.softmax(scores, -1) @ vh[0]
        else:
            o = F.scaled_dot_product_attention(qh, kh, vh, attn_mask=bias[None], scale=scale)[0]
        out[b] = torch.where(seen[None, :, None], o, 0.0).transpose(0, 1)
        lse[b] = torch.where(seen[None, :], torch.logsumexp(scores.double(), -1), float("inf"))
    return out, lse


def check_lse(lse, ref, tol):
    assert torch.equal(torch.isinf(lse), torch.isinf(ref)), "rows that see no key must have lse = +inf"
    finite = torch.isfinite(ref)
    if finite.any():
        assert_close_rel(lse[finite].double(), ref[finite].double(), tol, "lse")


# Every argument of flash_attn_with_kvcache, alone and in combinations: page sizes 16 and 256,
# ragged lengths with 0 and full caches, seqlen_q 1..8, GQA/MQA/MHA, odd head dims.
CASES = {
    "plain": dict(),
    "splits": dict(num_splits=3),
    "append1": dict(lk=1),
    "append1_splits": dict(lk=1, num_splits=4),
    "mqa_d40": dict(hq=3, hkv=1, d=40, lk=1),
    "mha": dict(hq=2, hkv=2, lk=1, num_splits=2),
    "page16": dict(page=16, cap=70, num_splits=3),
    "page16_append": dict(page=16, cap=50, lk=1, num_splits=2),
    "page256": dict(page=256, cap=300, lk=1, batch=2),
    "page256_spec4": dict(page=256, cap=256, lq=4, lk=4, causal=True, batch=2, rotary="neox"),
    "rotary_interleaved": dict(lk=1, rotary="interleaved"),
    "rotary_neox": dict(lk=1, rotary="neox", num_splits=2),
    "rotary_partial": dict(lk=2, lq=2, rotary="partial", causal=True),
    "rotary_noncausal_q": dict(lk=2, lq=2, rotary="interleaved"),
    "spec2_causal": dict(lq=2, lk=2, causal=True),
    "spec4_causal_splits": dict(lq=4, lk=4, causal=True, num_splits=3),
    "spec7_causal_g4": dict(lq=7, lk=7, hq=8, hkv=2, causal=True, cap=60),
    "spec8_noncausal": dict(lq=8, lk=8, cap=60),
    "spec4_fewer_new": dict(lq=4, lk=2, causal=True),
    "chunk_no_append": dict(lq=5, causal=True),
    "window": dict(lq=3, window=(5, 2), num_splits=2),
    "window_left_causal": dict(lq=3, lk=3, window=(4, -1), causal=True, rotary="neox"),
    "window_right_only": dict(lq=2, window=(-1, 1)),
    "softcap": dict(softcap=5.0, lk=1),
    "alibi_heads": dict(alibi="heads", num_splits=2),
    "alibi_batch_causal": dict(alibi="batch", lq=3, lk=3, causal=True),
    "alibi_decode_causal": dict(alibi="heads", causal=True, lk=1),
    "batch_idx": dict(batch_idx=True, lk=1, num_splits=2),
    "leftpad": dict(leftpad=True, lk=1, num_splits=3),
    "leftpad_paged_rotary": dict(leftpad=True, page=16, cap=48, lk=2, lq=2, causal=True, rotary="interleaved"),
    "batch_idx_leftpad_spec": dict(batch_idx=True, leftpad=True, lq=3, lk=3, causal=True, softcap=8.0),
    "seqlens_int": dict(seqlens="int", lk=1),
    "seqlens_none": dict(seqlens="none"),
    "seqlens_none_paged": dict(seqlens="none", page=16, cap=32),
    "d64_everything": dict(d=64, lq=4, lk=4, page=16, cap=64, causal=True, rotary="partial", alibi="heads",
                           softcap=20.0, num_splits=2, leftpad=True),
    # the schedule: programs spanning rows and sequences, idle programs, one program per row
    "stream_ragged_b7": dict(batch=7, hq=4, hkv=1, cap=97, lk=1),
    "many_splits": dict(num_splits=64, lk=1, page=16, cap=40),
    "rows_schedule": dict(num_splits=1, page=16, cap=40, lk=1, leftpad=True),
    "window_paged_splits": dict(page=16, cap=80, lq=2, lk=2, window=(20, -1), causal=True, num_splits=4),
    "d36_portable": dict(hq=2, hkv=1, d=36, lk=1, rotary="neox"),  # 72-byte rows: no TMA
}
FP16_CASES = ["append1_splits", "page16_append", "spec4_causal_splits", "rotary_partial", "leftpad_paged_rotary"]


@pytest.mark.parametrize("name", sorted(CASES))
def test_reference_matches_sdpa_oracle(name):
    args = make_case(**CASES[name])
    a64, b64 = as64(args), as64(args)
    out, lse = reference_call(a64)
    ref_out, ref_lse = oracle(**b64)
    assert_close_rel(out, ref_out, 1e-12, "out")
    check_lse(lse, ref_lse, 1e-12)
    assert_close_rel(a64["k_cache"], b64["k_cache"], 1e-12, "k_cache after the append")
    assert torch.equal(a64["v_cache"], b64["v_cache"]), "v_cache after the append"


def reference_call(args):
    with use_backend("reference"):
        return flash_attn_with_kvcache(**args, return_softmax_lse=True)


def run_triton(args):
    with use_backend("triton"):
        return flash_attn_with_kvcache(**args, return_softmax_lse=True)


# Under the interpreter: every case in float32, a representative subset in float16 (slow); on a GPU every
# case in every dtype.
KERNEL_PARAMS = [(n, d) for n in sorted(CASES) for d in (torch.float32, torch.float16, torch.bfloat16)
                 if torch.cuda.is_available() or d == torch.float32 or (d == torch.float16 and n in FP16_CASES)]


def check_kernel(args, dtype):
    """The Triton kernel's (out, lse, appended cache) against the reference in float64."""
    a64 = as64(args)
    out, lse = run_triton(args)
    ref_out, ref_lse = reference_call(a64)
    assert out.dtype == dtype and out.shape == args["q"].shape and lse.dtype == torch.float32
    assert_close_rel(out, ref_out, TOL[dtype], "out")
    check_lse(lse, ref_lse, TOL[dtype])
    assert_close_rel(args["k_cache"].double(), a64["k_cache"], TOL[dtype], "k_cache after the append")
    assert torch.equal(args["v_cache"].double(), a64["v_cache"]), "v_cache after the append"


@pytest.mark.parametrize("name,dtype", KERNEL_PARAMS, ids=[f"{n}-{str(d)[6:]}" for n, d in KERNEL_PARAMS])
def test_triton_matches_reference(name, dtype, device):
    """Full tiles through TMA descriptors where the layout allows (the interpreter runs them on the
    CPU as Hopper does), pointer loads otherwise."""
    check_kernel(make_case(device, dtype, **CASES[name]), dtype)


PORTABLE_CASES = ["page16_append", "spec4_causal_splits", "leftpad_paged_rotary", "d64_everything", "window",
                  "batch_idx", "stream_ragged_b7", "page256_spec4"]


@pytest.mark.parametrize("name", PORTABLE_CASES)
def test_portable_loads_match_reference(name, device, monkeypatch):
    """The portable lowering (pointer loads for every tile: Ampere, unaligned caches), forced."""
    monkeypatch.setenv(kernel.TMA_ENV, "0")
    args = make_case(device, **CASES[name])
    assert not _plan(args).tma
    check_kernel(args, torch.float32)


def _plan(args):
    paged = "block_table" in args
    return kernel.plan(args["q"], args["k_cache"], args["v_cache"], args["k_cache"].shape[1] if paged else 0, 100, 0)


@pytest.mark.parametrize("name", ["page16_append", "leftpad_paged_rotary", "window_paged_splits"])
def test_page_sized_tma_boxes_match_reference(name, device, monkeypatch):
    """SEQGEN_FAST_DECODE_TMA=1: 16-row pages through 16-row TMA boxes (in 16-bit they default to
    64-key gathers)."""
    args = make_case(device, torch.float16, **CASES[name])
    assert not _plan(args).tma
    monkeypatch.setenv(kernel.TMA_ENV, "1")
    assert _plan(args).tma and _plan(args).block_n == 16
    check_kernel(args, torch.float16)


def test_tma_plan_follows_the_layout(monkeypatch):
    q = torch.randn(2, 1, 4, 64, dtype=torch.float16)
    cache = torch.randn(2, 40, 2, 64, dtype=torch.float16)
    assert kernel.tma_reasons(q, cache, cache, 0) == [] and kernel.plan(q, cache, cache, 0, 40, 0).tma
    odd = torch.randn(2, 40, 2, 36, dtype=torch.float16)  # 72-byte rows
    assert kernel.tma_reasons(q[..., :36], odd, odd, 0) == ["cache rows not unit-stride and 16-byte aligned"]
    shifted = torch.randn(2 * 40 * 2 * 64 + 1, dtype=torch.float16)[1:].view(2, 40, 2, 64)  # base 2 bytes past 16
    assert kernel.tma_reasons(q, shifted, shifted, 0) and not kernel.plan(q, shifted, shifted, 0, 40, 0).tma
    pages = {p: torch.randn(9, p, 2, 64, dtype=torch.float16) for p in (16, 48, 256)}
    assert [bool(kernel.tma_reasons(q, c, c, p)) for p, c in pages.items()] == [True, True, False]
    assert kernel.plan(q, pages[256], pages[256], 256, 512, 0).block_n == 64
    assert kernel.plan(q.float(), pages[16].float(), pages[16].float(), 16, 48, 0).tma  # fp32: 16-key tiles
    monkeypatch.setenv(kernel.TMA_ENV, "1")
    assert [kernel.plan(q, c, c, p, 9 * p, 0).block_n for p, c in pages.items()] == [16, 16, 64]
    monkeypatch.setenv(kernel.TMA_ENV, "0")
    assert kernel.tma_reasons(q, cache, cache, 0) == [f"{kernel.TMA_ENV}=0"]


@pytest.mark.parametrize("tma", ["1", "0"])
@pytest.mark.parametrize("page", [None, 16])
def test_unused_cache_rows_never_leak(tma, page, device, monkeypatch):
    """Cache rows outside every sequence's visible keys (past its length, below its left pad, pages no
    table uses) hold NaN, as a fresh ``torch.empty`` cache may: the output is still right. The edge
    tiles are masked loads; a full tile holds visible rows only."""
    monkeypatch.setenv(kernel.TMA_ENV, tma)
    args = make_case(device, batch=4, lq=2, lk=2, causal=True, page=page, cap=70, leftpad=True, num_splits=3,
                     lens=[68, 0, 37, 5], rotary="neox")
    a64 = as64(args)
    lens, pad = args["cache_seqlens"].tolist(), args["cache_leftpad"].tolist()
    used = torch.zeros(args["k_cache"].shape[:2], dtype=torch.bool)
    for b in range(4):
        p = torch.arange(pad[b], lens[b])
        if page:
            used[args["block_table"][b].long().cpu()[p // page], p % page] = True
        else:
            used[b, p] = True
    for cache in (args["k_cache"], args["v_cache"]):
        cache[~used.to(device)] = float("nan")
    out, lse = run_triton(args)
    ref_out, ref_lse = reference_call(a64)
    assert_close_rel(out, ref_out, TOL[torch.float32], "out")
    check_lse(lse, ref_lse, TOL[torch.float32])


@pytest.mark.smoke
def test_smoke_paged_rotary_speculative(device):
    """One quick case of the whole kernel (paged, rotary, 4 speculative tokens, splits)."""
    args = make_case(device, lq=4, lk=4, page=16, cap=40, causal=True, rotary="neox", num_splits=2)
    a64 = as64(args)
    out, lse = run_triton(args)
    ref_out, ref_lse = oracle(**a64)
    assert_close_rel(out, ref_out, TOL[torch.float32])
    check_lse(lse, ref_lse, TOL[torch.float32])



@pytest.mark.parametrize("splits", [1, 3])
def test_every_output_element_is_written(splits, device):
    """Poisoned (NaN) outputs, passed to the launcher: every row of out and lse is overwritten."""
    args = make_case(device, lq=3, lk=3, causal=True, page=16, cap=40)
    a64 = as64(args)
    out = poison(torch.empty_like(args["q"]))
    lse = poison(torch.empty(args["q"].shape[0], args["q"].shape[2], args["q"].shape[1], device=device))
    kernel.kvcache_attention(args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], args["cache_seqlens"],
                             None, None, None, None, args["block_table"], 32 ** -0.5, True, -1, -1, 0.0, True, None,
                             None, splits, out=out, lse=lse)
    ref_out, ref_lse = oracle(**a64)
    assert not out.isnan().any() and not lse.isnan().any()
    assert_close_rel(out, ref_out, TOL[torch.float32])
    check_lse(lse, ref_lse, TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_rows_that_see_no_key(backend, device):
    """An empty cache without an append, and queries before the first key (seqlen_q > seqlen_k):
    out = 0 and lse = +inf, as flash-attn."""
    args = make_case(device, batch=2, lq=4, cap=20, causal=True, lens=[2, 0])
    with use_backend(backend):
        out, lse = flash_attn_with_kvcache(**args, return_softmax_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and torch.isinf(lse[1]).all()
    assert torch.equal(out[0, :2], torch.zeros_like(out[0, :2])) and torch.isinf(lse[0, :, :2]).all()
    assert torch.isfinite(lse[0, :, 2:]).all() and out[0, 2:].abs().sum() > 0


# ------------------------------------------------------------------------------------------------
# No host sync by default; debug checks
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_bad_values_are_clamped_on_the_device(backend, device):
    """Lengths, leftpads, batch and page indices out of range: clamped (never read outside a buffer)."""
    args = make_case(device, batch=3, lk=1, page=16, cap=32, lens=[0, 5, 9])  # 9 pages: 1..6 in use
    args["block_table"] = torch.arange(1, 7, dtype=torch.int32, device=device).reshape(3, 2)
    bad = dict(args, cache_seqlens=torch.tensor([-7, 5, 1000], dtype=torch.int32, device=device))
    bad["block_table"] = args["block_table"].clone()
    bad["block_table"][0, 0] = -3       # -> page 0 and
    bad["block_table"][2, 1] = 10 ** 6  # -> page 8: pages no other sequence reads
    good = dict(as64(args), cache_seqlens=torch.tensor([0, 5, 31], dtype=torch.int32, device=device))
    good["block_table"] = bad["block_table"].clamp(0, args["k_cache"].shape[0] - 1)
    with use_backend(backend):
        out = flash_attn_with_kvcache(**bad)
    ref = reference_call(good)[0]
    assert_close_rel(out, ref, TOL[torch.float32])


def test_debug_checks_raise_on_bad_values(monkeypatch):
    args = make_case(batch=2, lk=1, cap=16, lens=[3, 4])
    bad = dict(args, cache_seqlens=torch.tensor([3, 16], dtype=torch.int32))
    flash_attn_with_kvcache(**dict(bad, k_cache=bad["k_cache"].clone(), v_cache=bad["v_cache"].clone()))  # off
    with seqgen_fast.debug_checks():
        with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 15\].*got 16 at index 1"):
            flash_attn_with_kvcache(**bad)
        with pytest.raises(ValueError, match=r"cache_leftpad must lie in \[0, 3\]"):
            flash_attn_with_kvcache(**dict(args, cache_leftpad=torch.tensor([4, 0], dtype=torch.int32)))
        with pytest.raises(ValueError, match="cache_batch_idx must lie in"):
            flash_attn_with_kvcache(**dict(args, cache_batch_idx=torch.tensor([0, 2], dtype=torch.int32)))
    assert not seqgen_fast._debug.enabled()
    paged = make_case(batch=2, page=16, cap=32, lens=[20, 3])
    paged["block_table"][0, 1] = 99  # in use (row 16..19 of sequence 0)
    paged["block_table"][1, 1] = -1  # not in use: transformers fills unused entries with -1
    monkeypatch.setenv("SEQGEN_FAST_DEBUG_CHECKS", "1")
    with pytest.raises(ValueError, match=r"block_table must lie in \[0, 6\].*got 99 at index 1"):
        flash_attn_with_kvcache(**paged)
    paged["block_table"][0, 1] = 0
    flash_attn_with_kvcache(**paged)


def test_decode_attention_checks_only_in_debug_mode():
    q, k, v = torch.randn(2, 4, 32), torch.randn(2, 16, 2, 32), torch.randn(2, 16, 2, 32)
    bad = torch.tensor([3, 17], dtype=torch.int32)
    out = decode_attention(q, k, v, bad)  # default: no sync, clamped
    assert_close_rel(out, reference.decode_attention(q, k, v, bad.clamp(0, 16), None, None, 32 ** -0.5), 1e-5)
    with seqgen_fast.debug_checks():
        with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 16\]"):
            decode_attention(q, k, v, bad)
        with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 15\]"):
            decode_attention(q, k, v, torch.tensor([16, 0], dtype=torch.int32), k_new=k[:, 0], v_new=v[:, 0])
        decode_attention(q, k, v, bad, check_seqlens=False)  # the argument still turns it off
    with seqgen_fast.debug_checks():
        with seqgen_fast.debug_checks(False):
            decode_attention(q, k, v, bad)
        assert seqgen_fast._debug.enabled()


# ------------------------------------------------------------------------------------------------
# Bad input: a clear error naming the argument, from shapes and dtypes alone
# ------------------------------------------------------------------------------------------------
def _bad(args, **change):
    out = dict(args)
    for name, value in change.items():
        out[name] = value(args) if callable(value) else value
    return out


BAD = [
    ("q_dims", dict(q=lambda a: a["q"][0]), "q must have 4 dims"),
    ("q_dtype", dict(q=lambda a: a["q"].to(torch.int32)), "q must be float16"),
    ("v_cache_shape", dict(v_cache=lambda a: a["v_cache"][:, :8]), "v_cache must have shape"),
    ("cache_dtype", dict(k_cache=lambda a: a["k_cache"].half()), "k_cache dtype"),
    ("gqa", dict(q=lambda a: a["q"][:, :, :3]), "multiple of k_cache heads"),
    ("head_dim", dict(q=lambda a: a["q"][..., :16]), "k_cache head dim 32 != q head dim 16"),
    ("seqlens_dtype", dict(cache_seqlens=lambda a: a["cache_seqlens"].long()), "cache_seqlens must have dtype int32"),
    ("seqlens_shape", dict(cache_seqlens=lambda a: a["cache_seqlens"][:1]), "cache_seqlens must have shape"),
    ("k_without_v", dict(v=None), "give both k and v"),
    ("k_shape", dict(k=lambda a: a["k"][:, :, :1], v=lambda a: a["v"][:, :, :1]), "k must have shape"),
    ("k_dtype", dict(k=lambda a: a["k"].half(), v=lambda a: a["v"].half()), "k dtype"),
    ("k_without_seqlens", dict(cache_seqlens=None), "pass cache_seqlens"),
    ("k_too_long", dict(k=lambda a: torch.randn(3, 41, 2, 32), v=lambda a: torch.randn(3, 41, 2, 32)),
     "more than the cache's 40 rows"),
    ("rotary_without_sin", dict(rotary_cos=lambda a: torch.ones(40, 16)), "give both rotary_cos and rotary_sin"),
    ("rotary_short", dict(rotary_cos=lambda a: torch.ones(39, 16), rotary_sin=lambda a: torch.zeros(39, 16)),
     "39 positions, fewer than the 40 rows"),
    ("rotary_wide", dict(rotary_cos=lambda a: torch.ones(40, 17), rotary_sin=lambda a: torch.zeros(40, 17)),
     "rotary_dim <= head dim"),
    ("rotary_dtype", dict(rotary_cos=lambda a: torch.ones(40, 16, dtype=torch.int64),
                          rotary_sin=lambda a: torch.ones(40, 16, dtype=torch.int64)), "rotary_cos must be a floating"),
    ("rotary_without_k", dict(k=None, v=None, rotary_cos=lambda a: torch.ones(40, 16),
                              rotary_sin=lambda a: torch.zeros(40, 16)), "pass k and v with them"),
    ("batch_idx_dtype", dict(cache_batch_idx=lambda a: torch.arange(3)), "cache_batch_idx must have dtype int32"),
    ("leftpad_shape", dict(cache_leftpad=lambda a: torch.zeros(2, dtype=torch.int32)), "cache_leftpad must have shape"),
    ("alibi_dtype", dict(alibi_slopes=lambda a: torch.ones(4, dtype=torch.float64)), "alibi_slopes must have dtype"),
    ("alibi_shape", dict(alibi_slopes=lambda a: torch.ones(3)), "alibi_slopes must be"),
    ("window", dict(window_size=(1, 2, 3)), "window_size must be a"),
    ("softcap", dict(softcap=-1.0), "softcap must be"),
    ("num_splits", dict(num_splits=-1), "num_splits must be"),
    ("cache_too_small", dict(k_cache=lambda a: a["k_cache"][:2], v_cache=lambda a: a["v_cache"][:2]),
     "fewer than q's batch"),
    ("device", dict(cache_seqlens=lambda a: a["cache_seqlens"].to("meta")), "must be on q's device"),
]
BAD_PAGED = [
    ("table_dtype", dict(block_table=lambda a: a["block_table"].long()), "block_table must have dtype int32"),
    ("table_wide", dict(block_table=lambda a: torch.zeros(3, 20, dtype=torch.int32)), "20 pages wide, more than"),
    ("table_batch", dict(block_table=lambda a: a["block_table"][:2]), "block_table must be \\(batch, max_pages\\)"),
    ("table_strided", dict(block_table=lambda a: a["block_table"].t().contiguous().t()), "contiguous last"),
    ("paged_batch_idx", dict(cache_batch_idx=lambda a: torch.zeros(3, dtype=torch.int32)), "does not take"),
]


@pytest.mark.parametrize("name,change,match", BAD + BAD_PAGED, ids=[b[0] for b in BAD + BAD_PAGED])
def test_bad_input_names_the_argument(name, change, match):
    paged = (name, change, match) in BAD_PAGED
    args = make_case(batch=3, lk=1, page=16 if paged else None, cap=40)
    with pytest.raises((ValueError, TypeError), match=match) as info:
        flash_attn_with_kvcache(**_bad(args, **change))
    assert isinstance(info.value, RuntimeError), "flash-attn raises RuntimeError: so do we"


def test_decode_attention_bad_input_names_the_argument():
    q, k, v = torch.randn(2, 4, 32), torch.randn(2, 16, 2, 32), torch.randn(2, 16, 2, 32)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    for call, match in [(lambda: decode_attention(q[:1], k, v, lens), "q batch"),
                        (lambda: decode_attention(q[:, :3], k, v, lens), "multiple of k_cache heads"),
                        (lambda: decode_attention(q[..., :16], k, v, lens), "q head dim"),
                        (lambda: decode_attention(q, k, v[:, :8], lens), "v_cache shape"),
                        (lambda: decode_attention(q, k, v, lens.float()), "cache_seqlens must be a"),
                        (lambda: decode_attention(q, k, v, lens, k_new=k[:, 0, :1], v_new=v[:, 0]), "k_new must be"),
                        (lambda: decode_attention(q, k, v, lens, k_new=k[:, 0]), "both k_new and v_new"),
                        (lambda: decode_attention(q, k.half(), v.half(), lens), "must have q's dtype")]:
        with pytest.raises((ValueError, TypeError), match=match):
            call()


# ------------------------------------------------------------------------------------------------
# decode_attention: the compact entry over the same ops
# ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_decode_attention_matches_flash_attn_with_kvcache(append, backend, device):
    args = make_case(device, lk=int(append), hq=6, hkv=2, d=48, cap=33)
    fa, da = as64(args), {n: (t.clone() if isinstance(t, torch.Tensor) else t) for n, t in args.items()}
    ref = reference_call(fa)[0][:, 0]
    kw = dict(k_new=da["k"][:, 0], v_new=da["v"][:, 0]) if append else {}
    with use_backend(backend):
        out = decode_attention(da["q"][:, 0], da["k_cache"], da["v_cache"], da["cache_seqlens"], **kw)
        out4 = decode_attention(da["q"], da["k_cache"].clone(), da["v_cache"].clone(), da["cache_seqlens"],
                                **{n: t[:, None] for n, t in kw.items()})
    assert_close_rel(out, ref, TOL[torch.float32])
    assert out4.shape == da["q"].shape and torch.equal(out4[:, 0], out)
    assert_close_rel(da["k_cache"].double(), fa["k_cache"], 1e-12, "k_cache after the append")


def test_decode_attention_reads_strided_views(device):
    """A (B, S, Hkv, D) view of a transposed (B, Hkv, S, D) cache is read through its strides."""
    q = torch.randn(2, 4, 32, device=device)
    k_bhsd, v_bhsd = torch.randn(2, 2, 37, 32, device=device), torch.randn(2, 2, 37, 32, device=device)
    lens = torch.tensor([37, 20], dtype=torch.int32, device=device)
    with use_backend("triton"):
        out = decode_attention(q, k_bhsd.transpose(1, 2), v_bhsd.transpose(1, 2), lens)
    ref = reference.decode_attention(q.double(), k_bhsd.transpose(1, 2).double(), v_bhsd.transpose(1, 2).double(),
                                     lens, None, None, 32 ** -0.5)
    assert_close_rel(out, ref, TOL[torch.float32])


def test_int64_lengths_and_seqlens_not_incremented():
    q, k, v = torch.randn(2, 4, 32), torch.randn(2, 16, 2, 32), torch.randn(2, 16, 2, 32)
    lens = torch.tensor([3, 9])
    out = decode_attention(q, k, v, lens, k_new=k[:, 0].clone(), v_new=v[:, 0].clone())
    assert out.shape == q.shape and lens.tolist() == [3, 9]


# ------------------------------------------------------------------------------------------------
# Split heuristic, compile facts, ops
# ------------------------------------------------------------------------------------------------
def test_schedule_from_shapes_and_sm_count():
    """Stream schedule over 2 programs per SM by default (never more programs than units), one program
    per row for num_splits=1, rows x num_splits programs when forced; tiles never cross a page."""
    slots = 132 * kernel.PROGRAMS_PER_SM[4]
    assert kernel.choose_programs(8, 32768 // 64 + 1, slots) == (slots, True)        # B1 Hkv8 S32768
    assert kernel.choose_programs(128 * 32, 2048 // 64 + 1, slots) == (slots, True)  # B128 Hkv32: still balanced
    assert kernel.choose_programs(3, 1, slots) == (3, True)                          # 3 units: 3 programs
    assert kernel.choose_programs(6, 40, slots, num_splits=1) == (6, False)
    assert kernel.choose_programs(6, 40, slots, num_splits=3) == (18, True)
    assert kernel.choose_programs(6, 40, slots, num_splits=10 ** 6) == (6 * 40, True)
    assert kernel.block_m(4 * 4, 128) == 16 and kernel.block_m(8 * 8, 128) == 64 and kernel.block_m(80, 256) == 16
    assert kernel.block_m(64, 128, 4) == 16
    assert [kernel.tma_block_n(128, 2, p) for p in (0, 16, 48, 32, 256)] == [64, 16, 16, 32, 64]


def stream_schedule(units, rps, programs):
    """Host model of the stream schedule: each program's (row, first unit, end unit) segments."""
    line = [(b * rps + j, n) for b, n in enumerate(units) for j in range(rps)]
    starts = [0]
    for _, n in line:
        starts.append(starts[-1] + n)
    per = -(-starts[-1] // programs)
    segs = {p: [] for p in range(programs)}
    for (row, n), r0 in zip(line, starts):
        for p in range(r0 // per, (r0 + n - 1) // per + 1):
            segs[p].append((row, max(p * per, r0) - r0, min((p + 1) * per, r0 + n) - r0))
    return per, segs


def test_stream_schedule_balances_ragged_lengths():
    """A batch with one long and many short sequences: every program gets at most ceil(total /
    programs) tiles (the split-per-sequence schedule gave the long one's programs all the work), and
    each program has at most two partial rows (scratch slots 2p and 2p + 1)."""
    units = [512] + [4] * 31   # B32: one 32k sequence, 31 of 256 keys, 64-key tiles
    per, segs = stream_schedule(units, rps=8, programs=264)
    assert max(sum(e - s for _, s, e in v) for v in segs.values()) == per == -(-sum(units) * 8 // 264)
    for v in segs.values():
        partial = [row for row, s, e in v if e - s < units[row // 8]]
        assert len(partial) <= 2 and all(row in (v[0][0], v[-1][0]) for row in partial)


def _sm90_facts(page_size: int, dtype: str = "bf16", head_dim: int = 128, group: int = 4, rows: int = 4,
                append: bool = True, rotary: int = 128, tma: bool | None = None, stream: bool = True, **flags):
    """Compile the kernel for sm_90 as the launcher would configure it (tiles, warps, stages and, unless
    ``tma`` forces one, the lowering: TMA unless a page holds no whole tile)."""
    elt = 4 if dtype == "fp32" else 2
    if tma is None:
        tma = page_size % kernel.block_n(head_dim, elt) == 0
    block_d = max(16, triton_next_pow2(head_dim))
    bn = kernel.tma_block_n(head_dim, elt, page_size) if tma else kernel.block_n(head_dim, elt)
    const = dict(HEAD_DIM=head_dim, GROUP=group, BLOCK_M=kernel.block_m(rows, head_dim, elt), BLOCK_N=bn,
                 BLOCK_D=block_d, BLOCK_NEW=16 if append else 0, PAGE_SIZE=page_size, HAS_SEQLENS=True,
                 HAS_BATCH_IDX=False, HAS_LEFTPAD=False, ROTARY_DIM=rotary, INTERLEAVED=False,
                 ROTATE_Q_PER_TOKEN=False, WINDOW_LEFT=False, WINDOW_RIGHT=False, HAS_SOFTCAP=False, HAS_ALIBI=False,
                 HAS_MASK=False, STREAM=stream, USE_TMA=tma, CHUNK_C=kernel.COMBINE_TILE // block_d,
                 DOT_PRECISION="ieee" if elt == 4 else "tf32", stride_qd=1, stride_kd=1, stride_vd=1, stride_knd=1,
                 stride_vnd=1, stride_od=1, stride_cc=1, stride_sc=1)
    const.update(flags)
    desc = f"tensordesc<{dtype}[1,{bn},1,{block_d}]>" if tma else "*" + dtype
    types = {**pointers(dtype, "Q", "K", "V", "KNEW", "VNEW", "O", "COS", "SIN"), "KD": desc, "VD": desc,
             **pointers("fp32", "OPART", "LPART", "LSE", "ALIBI"),
             **pointers("i32", "SEQLENS", "BATCH_IDX", "LEFTPAD", "BT", "COUNTER"), **pointers("i8", "MASK"),
             "qk_scale": "fp32", "softcap_scale": "fp32", "softcap": "fp32"}
    strides = ("stride_q", "stride_k0", "stride_k1", "stride_kh", "stride_v0", "stride_v1", "stride_vh",
               "stride_kn", "stride_vn", "stride_o", "stride_cr", "stride_sr")
    aligned = [n for n in kernel._kvcache_kernel.arg_names if n.startswith(strides) and n not in const]
    tile_bytes = 2 * bn * block_d * elt
    warps, stages = kernel.launch_config(elt, head_dim, page_size > 0, tma, tile_bytes)
    facts = compile_sm90("seqgen_fast.kernels.decode", "_kvcache_kernel", types=types, constexprs=const,
                         aligned=aligned, num_warps=warps, num_stages=stages)
    per_sm = kernel.PROGRAMS_PER_SM[warps]
    return dict(facts, tile_bytes=tile_bytes, warps=warps, per_sm=per_sm,
                ahead=kernel.tma_tiles_in_flight(tile_bytes, per_sm) if tma else None)


def triton_next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def key_loop(sass: str) -> str:
    """The SASS of the kernel's key loop: the innermost loop (a backward branch) with tensor-core
    (HMMA) or FMA (fp32) dots that waits on a TMA mbarrier (SYNCS.PHASECHK) or on cp.async groups
    (LDGSTS + DEPBAR)."""
    loops = [body for _, _, body in sass_loops(sass)
             if ("SYNCS.PHASECHK" in body or ("LDGSTS" in body and "DEPBAR" in body))
             and re.search(r"\b(HMMA|FFMA)", body)]
    return min(loops, key=len)


def _fits_per_sm(facts):
    """At most a few words of spill and none in the key loop, and the planned programs per SM fit one
    H100/H200 SM: 228 KiB of shared memory (1 KiB reserved per program), 64 K registers."""
    per_sm = facts["per_sm"]
    assert facts["spill_bytes"] <= 64, facts["spill_bytes"]  # some ptxas versions spill a word to stay at 168
    if facts["sass"]:
        loop = key_loop(facts["sass"])
        assert "LDL" not in loop and "STL" not in loop, "spill traffic in the key loop"
    assert per_sm * (facts["shared"] + 1024) <= 228 * 1024, (per_sm, facts["shared"])
    assert facts["registers"] * 32 * facts["warps"] * per_sm <= 65536, (per_sm, facts["registers"])


@pytest.mark.parametrize("page_size", [0, 16, 256])
def test_kernel_streams_full_tiles_through_tma_for_sm90(page_size):
    """The bf16 D=128 GQA-4 kernel (append, rotary, stream schedule) as Hopper runs it: full K/V tiles
    are TMA boxes (cp.async.bulk.tensor, UTMALDG in the SASS) pipelined ``ahead`` tiles deep -- the
    prologue issues ``ahead`` K+V boxes and the loop one more (2 (ahead + 1) copies in the PTX), into
    ``ahead`` shared buffers --, contiguous, paged by 256 (64-key boxes) or by 16 (16-row boxes, as
    SEQGEN_FAST_DECODE_TMA=1 runs them); the edge tiles and q are 16-byte vector loads; no spills; two
    programs per SM; the folded merge's ticket and L2 reads."""
    facts = _sm90_facts(page_size, tma=True)
    ptx, ahead = facts["ptx"], facts["ahead"]
    assert ahead == (4 if page_size == 16 else 3)
    assert len(re.findall(r"cp\.async\.bulk\.tensor\.4d\.shared::\w+\.global\.mbarrier", ptx)) == 2 * (ahead + 1)
    assert "mbarrier.try_wait.parity" in ptx
    assert facts["shared"] >= ahead * facts["tile_bytes"], facts["shared"]
    assert "ld.global.v4.b32" in ptx  # 16 bytes per thread and load
    if facts["sass"]:  # one K and one V box per tile in the key loop; q and the edge tiles as 16-byte loads
        loop = key_loop(facts["sass"])
        assert loop.count("UTMALDG") == 2 and "LDG.E.128" in facts["sass"]
        assert loop.count("LDGSTS") == (1 if page_size else 0)  # paged: the block-table entry, prefetched
    _fits_per_sm(facts)
    # the folded merge: one acq_rel ticket; the partials read through L2 by cp.async.cg, two tiles ahead
    assert "atom.global.gpu.acq_rel.add" in ptx and "cp.async.cg.shared.global" in ptx


@pytest.mark.parametrize("page_size", [0, 16])
def test_portable_kernel_compiles_for_sm90_with_pipelined_vector_loads(page_size):
    """The portable lowering (Ampere, unaligned caches, and 16-bit pages of 16 rows by default),
    compiled for sm_90: 16-byte cp.async copies with two 64-key K+V tiles in flight, no spills."""
    facts = _sm90_facts(page_size, tma=False)
    assert "cp.async.bulk.tensor" not in facts["ptx"] and "cp.async.wait_group" in facts["ptx"]
    assert re.search(r"cp\.async\.cg\.shared\.global \[[^]]+\], \[[^]]+\], (16|0x10)\b", facts["ptx"])
    assert facts["shared"] >= 2 * 2 * 64 * 128 * 2, facts["shared"]
    if facts["sass"]:  # 128-bit cp.async copies in the key loop
        assert re.search(r"LDGSTS\.E\S*\.128", key_loop(facts["sass"]))
    _fits_per_sm(facts)


@pytest.mark.parametrize("variant", [
    dict(page_size=16, head_dim=256, rows=32, rotary=64),                       # D=256: 16-row blocks, 8 warps
    dict(page_size=0, head_dim=256, rows=32, rotary=0, append=False),
    dict(page_size=16, head_dim=64, group=8, rows=64, rotary=64, WINDOW_RIGHT=True, ROTATE_Q_PER_TOKEN=True),
    dict(page_size=16, dtype="fp32", rotary=64),                                 # the exact path
    dict(page_size=0, dtype="fp32", rotary=64),
    dict(page_size=0, head_dim=40, append=False, rotary=0, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_MASK=True,
         WINDOW_LEFT=True, HAS_LEFTPAD=True, HAS_BATCH_IDX=True),
    dict(page_size=256, rows=16, HAS_SOFTCAP=True, HAS_ALIBI=True, HAS_LEFTPAD=True, WINDOW_LEFT=True,
         WINDOW_RIGHT=True, ROTATE_Q_PER_TOKEN=True),
    dict(page_size=0, stream=False, append=False, rotary=0),                     # num_splits=1
    # the benchmark's plain calls: contiguous, paged by 256, 4 causal speculative tokens, MHA
    dict(page_size=0, append=False, rotary=0),
    dict(page_size=256, append=False, rotary=0),
    dict(page_size=0, rows=16, append=False, rotary=0, WINDOW_RIGHT=True, ROTATE_Q_PER_TOKEN=True),
    dict(page_size=0, group=1, rows=1, append=False, rotary=0),
], ids=["d256_paged", "d256", "g8_spec8_window", "fp32_paged", "fp32", "d40_every_flag", "spec4_every_flag_paged",
        "rows_schedule", "bench_plain", "bench_page256", "bench_spec4", "bench_mha"])
def test_kernel_variants_compile_for_sm90_without_spills(variant):
    """Shapes the interpreter cannot vouch for (loop-carried types, shared memory, registers), in the
    lowering the launcher picks (TMA, or the portable gathers for pages smaller than a tile)."""
    facts = _sm90_facts(**variant)
    assert ("cp.async.bulk.tensor" in facts["ptx"]) == (facts["ahead"] is not None)
    _fits_per_sm(facts)


@pytest.mark.parametrize("append", [False, True])
def test_opcheck(append):
    args = make_case(batch=2, lq=2, lk=2 * append, page=16, cap=32, causal=True, rotary="neox" if append else None)
    common = (args["cache_seqlens"], args.get("rotary_cos"), args.get("rotary_sin"), None, None, args["block_table"],
              None, None, 0.2, True, -1, -1, 0.0, False, 0, "", "reference")
    if append:
        op, inputs = torch.ops.seqgen_fast.kvcache_attention_append, (args["k"], args["v"])
    else:
        op, inputs = torch.ops.seqgen_fast.kvcache_attention, ()
    torch.library.opcheck(op, (args["q"], args["k_cache"], args["v_cache"], *inputs, *common))


def test_flash_attn_with_kvcache_compiles_fullgraph():
    """The public function traces with fullgraph=True (no graph break): argument checks and dispatch at
    trace time, one opaque op with its declared cache mutation."""
    args = make_case(batch=2, lq=2, lk=2, page=16, cap=32, causal=True, rotary="interleaved", lens=[5, 9])
    eager = as64(args)
    expected = reference_call(eager)[0] + 1

    def step(q, k_cache, v_cache, k, v, cos, sin, lens, table):
        return flash_attn_with_kvcache(q, k_cache, v_cache, k, v, rotary_cos=cos, rotary_sin=sin, cache_seqlens=lens,
                                       block_table=table, causal=True) + 1

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(
        args["q"], args["k_cache"], args["v_cache"], args["k"], args["v"], args["rotary_cos"], args["rotary_sin"],
        args["cache_seqlens"], args["block_table"])
    assert_close_rel(got, expected, 1e-5)
    assert_close_rel(args["k_cache"].double(), eager["k_cache"], 1e-6, "k_cache after the compiled append")


def test_registered_check_passes():
    from seqgen_fast.checks import run_checks

    rows = run_checks(torch.device("cpu"), names=["decode_attention", "flash_attn_with_kvcache"],
                      backends=("reference", "triton"))
    assert {r.backend for r in rows} == {"reference", "triton"}
    assert rows and all(r.status == "pass" for r in rows), rows


def test_flash_attn_module_serves_this_function():
    from seqgen_fast.integrations import flash_attn

    assert flash_attn.flash_attn_with_kvcache is ops.flash_attn_with_kvcache


# ------------------------------------------------------------------------------------------------
# GPU: every dtype, the flash-attn error rule, CUDA graphs, no sync
# ------------------------------------------------------------------------------------------------
def clone_args(args, device=None):
    """A deep copy of flash_attn_with_kvcache arguments (optionally moved to ``device``)."""
    return {n: (t.clone().to(device or t.device) if isinstance(t, torch.Tensor) else t) for n, t in args.items()}


GPU_CASES = {
    "decode_b5_s3000": dict(batch=5, lk=1, hq=32, hkv=8, d=128, cap=3000),
    "paged16_rotary": dict(batch=4, lk=1, hq=32, hkv=8, d=128, cap=2000, page=16, rotary="neox"),
    "paged256_spec4": dict(batch=4, lq=4, lk=4, hq=32, hkv=8, d=128, cap=2048, page=256, causal=True,
                           rotary="interleaved"),
    "spec8_g4": dict(batch=3, lq=8, lk=8, hq=16, hkv=4, d=64, cap=1000, causal=True),
    "d256_mqa": dict(batch=3, lk=1, hq=8, hkv=1, d=256, cap=700),
    "everything": dict(batch=3, lq=3, lk=3, hq=8, hkv=2, d=96, cap=900, page=16, causal=True, rotary="partial",
                       alibi="batch", softcap=30.0, leftpad=True, window=(300, -1)),
}


# one smoke case per dtype (the GPU routine's quick tier): paged, rotary, speculative tokens
GPU_PARAMS = [pytest.param(n, d, marks=[pytest.mark.smoke] if n == "paged256_spec4" else [], id=f"{n}-{str(d)[6:]}")
              for n in sorted(GPU_CASES) for d in (torch.bfloat16, torch.float16, torch.float32)]


def check_gpu_case(name, dtype):
    """flash-attn's rule on the GPU: our error against float64 at most 2x torch's own in ``dtype``."""
    args = make_case("cuda", dtype, **GPU_CASES[name])
    torch_args = clone_args(args)           # torch's own math in the same dtype (SDPA on the GPU)
    a64 = clone_args(as64(args), "cpu")
    out, lse = flash_attn_with_kvcache(**args, return_softmax_lse=True)
    ref_out, ref_lse = reference_call(a64)
    ours = rel_err(out.cpu(), ref_out)
    theirs = rel_err(oracle(**torch_args)[0].cpu(), ref_out)
    assert ours <= max(2 * theirs, 1e-5), f"our error {ours:.2e} > 2x torch's {theirs:.2e} in {dtype}"
    check_lse(lse.cpu(), ref_lse, TOL[dtype])
    assert_close_rel(args["k_cache"].cpu().double(), a64["k_cache"], TOL[dtype], "k_cache after the append")


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", GPU_PARAMS)
def test_gpu_matches_float64_within_twice_torch_error(name, dtype):
    """The default lowering of the device (TMA on Hopper where the layout allows)."""
    check_gpu_case(name, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("tma", ["0", "1"], ids=["portable", "tma_any_page"])
@pytest.mark.parametrize("name", ["decode_b5_s3000", "paged16_rotary", "paged256_spec4", "everything"])
def test_gpu_other_lowerings_match_float64(name, tma, monkeypatch):
    """The portable loads (SEQGEN_FAST_DECODE_TMA=0) and page-sized TMA boxes (=1), bf16."""
    monkeypatch.setenv(kernel.TMA_ENV, tma)
    check_gpu_case(name, torch.bfloat16)


@pytest.mark.gpu
@pytest.mark.parametrize("paged", [False, True])
def test_gpu_cuda_graph_replay_without_host_sync(paged):
    """Capture one decode step (paged or not, rotary, append), replay it with new inputs and longer
    lengths: matches the reference every time; sync debug mode "error" proves no host sync."""
    args = make_case("cuda", torch.float16, batch=4, lk=1, hq=16, hkv=4, d=128, cap=512, page=16 if paged else None,
                     rotary="neox", lens=[0, 10, 100, 300])
    flash_attn_with_kvcache(**clone_args(args))  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.cuda.graph(graph):
            out = flash_attn_with_kvcache(**args)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    for step in range(3):
        for name in ("q", "k", "v"):
            args[name].copy_(torch.randn_like(args[name]))
        a64 = clone_args(as64(args), "cpu")
        torch.cuda.set_sync_debug_mode("error")
        try:
            graph.replay()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        ref = reference_call(a64)[0]
        assert_close_rel(out.cpu(), ref, TOL[torch.float16], f"step {step}")
        args["cache_seqlens"] += 1 + 37 * step  # lengths change between replays, inside the graph's memory


@pytest.mark.gpu
@pytest.mark.parametrize("batch,hq,hkv,s", [(1, 32, 8, 32768), (32, 32, 8, 8192), (128, 32, 32, 2048)])
@pytest.mark.parametrize("page", [None, 16, 256])
def test_gpu_bench_shapes(batch, hq, hkv, s, page):
    args = make_case("cuda", torch.bfloat16, batch=batch, hq=hq, hkv=hkv, d=128, cap=s, page=page,
                     lens=[s] * batch)
    out = flash_attn_with_kvcache(**args)
    with use_backend("reference"):
        ref = flash_attn_with_kvcache(**{n: (t.float() if isinstance(t, torch.Tensor) and t.is_floating_point() else t)
                                         for n, t in args.items()})
    assert_close_rel(out, ref, TOL[torch.bfloat16])



VARIANTS_NAN = [dict(page_size=256), dict(page_size=16), dict(page_size=0, dtype="fp32", rotary=64)]


@pytest.mark.parametrize("variant", VARIANTS_NAN, ids=["tma_paged", "portable_paged", "fp32"])
def test_compiled_running_max_keeps_nan(variant):
    """The non-finite policy when compiled: the key loop's online softmax and the split merge take their
    float maxima with the NaN-keeping ``max.NaN.f32`` (SASS ``FMNMX.NAN``), never the NaN-dropping
    ``max.f32`` that ``tl.maximum``/``tl.max`` lower to by default."""
    from support.aot import float_max_forms

    forms = float_max_forms(_sm90_facts(**variant))
    assert forms["nan_ptx"] > 0 and forms["drop_ptx"] == 0, forms
    assert forms["drop_sass"] == 0, forms
