"""Differential fuzzing of the attention, decode and rotary families (hypothesis; ``tests/support/fuzz.py``):
every backend here (reference; triton in the interpreter on the CPU, compiled on a GPU) against a float64
statement of the non-finite policy and torch's own ops, on drawn shapes, dtypes, layouts, options and values.

The policy (``seqgen_fast.ops.attention``'s docstring): a NaN or inf in q, or in a key / value that a
row *sees* (its causal band, window, mask, sequence), reaches that row as in torch's math attention over
the visible keys; a row that sees no key gives 0 (lse -inf). A non-finite k / v at a key *masked out*
of a row may also make that row NaN (torch's math path: always, by ``0 * nan`` and ``nan + -inf``; the
kernels: when the key shares a tile with visible keys), never anything else. :func:`_attend` is that
statement (``extra`` marks the rows where the additional NaN is allowed); ``_judge`` checks NaN
exactly outside ``extra`` and the finite rest under the error rule of ``fuzz.assert_matches``, whose
yardstick for float16 / bfloat16 is the same math in torch's precision for the dtype (float32 math on
rounded inputs, as torch's math SDPA upcasts half precision).

Values: ``huge`` q / k come with a softmax scale divided by their magnitude (scores stay O(1): the
kernels' products are huge, the softmax is well conditioned); everything else as drawn.
"""
import copy
import math

import pytest
import torch
from hypothesis import assume, given
from hypothesis import strategies as st

import seqgen_fast
from seqgen_fast import BackendError
from seqgen_fast._backend import interpret_mode
from seqgen_fast.functional import decode_attention, flash_attention, rotary_embedding, scaled_dot_product_attention
from seqgen_fast.integrations.flash_attn import flash_attn_with_kvcache
from seqgen_fast.reference import attention as ref_attention
from support import fuzz
from support.utils import TOL, assert_close_rel

pytestmark = pytest.mark.fuzz
BACKENDS = ("reference", "triton")  # triton on CUDA where there is a GPU, else in the interpreter
GPU = torch.cuda.is_available()
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAGNITUDE = {"huge": 1e4}


def _device(backend):
    return "cuda" if backend == "triton" and GPU else "cpu"


def _interpreter_artefact(backend, dtype, kinds, bf16_dot=False) -> bool:
    """Triton 3.9's interpreter converts bfloat16 subnormals to float32 wrongly, and computes bfloat16
    ``tl.dot`` wrongly (the decode kernel's dots, ``bf16_dot``; the attention kernels widen their
    operands under the interpreter); the GPU does both exactly: ``test_gpu_bfloat16_subnormals`` and
    test_decode.py's GPU cases cover them."""
    bf16 = backend == "triton" and interpret_mode() and dtype == torch.bfloat16
    return bf16 and ("denormal" in kinds or bf16_dot)


# ----------------------------------------------------------------------------------------------
# The policy in float64 (and in torch's working precision for the yardstick)
# ----------------------------------------------------------------------------------------------
def _attend(q, k, v, scale, visible, softcap=0.0, slopes=None, acc=torch.float64):
    """One sequence: q (H, L, E), k (Hk, S, E), v (Hk, S, Ev), ``visible`` (L, S) bool or None (all),
    slopes (H,) or None. Returns (out (H, L, Ev), lse (H, L), extra (H, L)) in ``acc``: keys outside a
    row's visible set never reach it in ``out``/``lse``; ``extra`` marks rows that may also be NaN."""
    H, L, S = q.shape[0], q.shape[1], k.shape[1]
    k, v = (t.to(acc).repeat_interleave(H // max(t.shape[0], 1), 0) for t in (k, v))
    q = q.to(acc)
    vis = torch.ones(L, S, dtype=torch.bool) if visible is None else visible.cpu()
    root = scale ** 0.5  # scaled on both sides: no overflow in a half-precision yardstick for huge q, k
    s = (q * root) @ (k * root).transpose(-1, -2)
    if softcap > 0:
        s = torch.tanh(s / softcap) * softcap
    if slopes is not None:
        dist = (torch.arange(L)[:, None] + S - L - torch.arange(S)[None, :]).abs().to(acc)
        s = s - slopes.to(acc)[:, None, None] * dist
    # torch's math path adds -inf to a masked score: non-finite there (or in v) gives its row NaN
    extra = (~vis[None] & (~torch.isfinite(s) | ~torch.isfinite(v).all(-1)[:, None, :])).any(-1)
    s = s.masked_fill(~vis, -math.inf)
    dead = torch.isneginf(s).all(-1)  # torch's _safe_softmax: a row of -inf scores (masked or not) gives 0
    probs = torch.softmax(s.masked_fill(dead[..., None], 0.0), -1).masked_fill(dead[..., None], 0.0)
    out = (probs[..., None] * v[:, None]).masked_fill(~vis[None, :, :, None], 0.0).sum(-2)
    lse = torch.logsumexp(s, -1).masked_fill(torch.isposinf(s).any(-1), math.nan)  # inf - inf, as out
    return out, lse, extra


def _judge(ours, lower, extra, theirs, what):
    """``ours`` against the policy's ``lower`` (float64): NaN where it is NaN, additionally only in the
    ``extra`` rows (broadcast over the trailing dims), the rest under ``fuzz.assert_matches`` (``theirs``:
    torch's precision for the dtype), or, for an lse (``theirs=None``), by absolute log-domain error."""
    ours, lower = ours.detach().cpu(), lower.detach().cpu()
    extra = extra.reshape(extra.shape + (1,) * (ours.dim() - extra.dim())).expand(ours.shape)
    nan_ours, nan_lower = torch.isnan(ours), torch.isnan(lower)
    assert not (nan_lower & ~nan_ours).any(), f"{what}: a NaN the policy propagates is missing"
    assert not (nan_ours & ~nan_lower & ~extra).any(), f"{what}: NaN where the policy has none"
    keep = ~extra
    if theirs is None:  # an lse (float32): absolute error in the log domain, inf / NaN where the policy has them
        ours, lower = ours[keep].double(), lower[keep]
        assert torch.equal(torch.isnan(ours), torch.isnan(lower)), f"{what}: NaN differ"
        inf = torch.isinf(lower)
        assert torch.equal(torch.isinf(ours), inf) and torch.equal(ours[inf], lower[inf]), f"{what}: infinities differ"
        fin = torch.isfinite(lower)
        err = (ours[fin] - lower[fin]).abs() / (1 + lower[fin].abs())  # float32 log-sum-exp of O(1) scores
        assert not len(err) or err.max() <= 3e-5, f"{what}: error {err.max():.3e} > 3e-5"
        return
    fuzz.assert_matches(ours[keep], lower[keep], theirs=theirs[keep].to(ours.dtype), what=what)


def _yardstick(x):
    """``x`` rounded to its dtype and widened to the precision torch's math path computes it in."""
    return x.to(torch.float32 if x.dtype != torch.float64 else torch.float64)


# ----------------------------------------------------------------------------------------------
# flash_attention: dense and varlen, GQA, causal, windows, softcap, ALiBi
# ----------------------------------------------------------------------------------------------
@st.composite
def flash_cases(draw, finite=False):
    """(q, k, v, options, q lengths, k lengths, value kinds); ``finite``: finite values, head dims <= 256."""
    varlen = draw(st.booleans())
    hk = draw(st.sampled_from([1, 2]))
    h = hk * draw(st.sampled_from([1, 2, 3]))
    e = draw(st.sampled_from([1, 8, 16, 40, 64] + ([] if finite else [257])))
    ev = draw(st.sampled_from([e, 16])) if e <= 256 else e
    dtype = draw(st.sampled_from(DTYPES))
    kinds = [draw(st.sampled_from(fuzz.FINITE_KINDS if finite else fuzz.KINDS)) for _ in range(3)]
    seed = draw(st.integers(0, 2**31))
    if varlen:
        n = draw(st.integers(1, 3))
        lq = [draw(fuzz.sizes(0, 17)) for _ in range(n)]
        lk = [draw(fuzz.sizes(0, 17)) for _ in range(n)]
        shapes = [(sum(lq), h, e), (sum(lk), hk, e), (sum(lk), hk, ev)]
        batch = n
    else:
        batch, L, S = draw(fuzz.sizes(0, 2)), draw(fuzz.sizes(1, 33)), draw(fuzz.sizes(1, 33))
        lq, lk = [L] * batch, [S] * batch
        shapes = [(batch, L, h, e), (batch, S, hk, e), (batch, S, hk, ev)]
    layouts = [draw(st.sampled_from(["contiguous", "transposed", "sliced", "expanded"])) for _ in range(3)]
    q, k, v = (fuzz.with_layout(fuzz.fill(sh, dtype, kind, seed + i), lay)
               for i, (sh, kind, lay) in enumerate(zip(shapes, kinds, layouts)))
    window = draw(st.sampled_from([(-1, -1), (-1, -1), (0, 0), (3, -1), (-1, 2), (5, 1)]))
    options = dict(causal=draw(st.booleans()), window_size=window, softcap=draw(st.sampled_from([0.0, 0.0, 3.0])),
                   scale=e ** -0.5 / (MAGNITUDE.get(kinds[0], 1.0) * MAGNITUDE.get(kinds[1], 1.0)))
    if draw(st.booleans()):
        g = torch.Generator().manual_seed(seed)
        options["alibi_slopes"] = torch.rand((h,) if draw(st.booleans()) else (batch, h), generator=g) * 0.5
    if varlen:
        options.update(cu_seqlens_q=torch.tensor([0, *torch.tensor(lq).cumsum(0).tolist()], dtype=torch.int32),
                       cu_seqlens_k=torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32))
    return q, k, v, options, lq, lk, kinds


def _flash_policy(q, k, v, options, lq, lk, acc):
    """(out, lse, extra) of the policy in flash_attention's layouts."""
    varlen = "cu_seqlens_q" in options
    left, right = options["window_size"]
    slopes = options.get("alibi_slopes")
    outs, lses, extras = [], [], []
    oq = ok = 0
    for b, (L, S) in enumerate(zip(lq, lk)):
        if varlen:
            qs, ks, vs = q[oq:oq + L].transpose(0, 1), k[ok:ok + S].transpose(0, 1), v[ok:ok + S].transpose(0, 1)
        else:
            qs, ks, vs = q[b].transpose(0, 1), k[b].transpose(0, 1), v[b].transpose(0, 1)
        band = ref_attention.band_mask(L, S, ref_attention.BOTTOM_RIGHT if options["causal"] else ref_attention.NONE,
                                       left, right, "cpu")
        sl = None if slopes is None else (slopes if slopes.dim() == 1 else slopes[b])
        out, lse, extra = _attend(qs, ks, vs, options["scale"], band, options["softcap"], sl, acc)
        outs.append(out.transpose(0, 1))
        lses.append(lse)
        extras.append(extra.transpose(0, 1))
        oq, ok = oq + L, ok + S
    if varlen:
        return torch.cat(outs), torch.cat(lses, 1), torch.cat(extras)
    H, Ev = q.shape[2], v.shape[-1]
    if not outs:
        return (torch.zeros(0, q.shape[1], H, Ev, dtype=acc), torch.zeros(0, H, q.shape[1], dtype=acc),
                torch.zeros(0, q.shape[1], H, dtype=torch.bool))
    return torch.stack(outs), torch.stack(lses), torch.stack(extras)


def _on(device, options):
    return {n: (t.to(device) if isinstance(t, torch.Tensor) else t) for n, t in options.items()}


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=flash_cases())
def test_flash_attention_matches_the_policy(backend, case):
    q, k, v, options, lq, lk, kinds = case
    assume(not _interpreter_artefact(backend, q.dtype, kinds))
    dev = _device(backend)
    args = [t.to(dev) for t in (q, k, v)]
    if backend == "triton" and q.shape[-1] > 256:  # declined before launch, with the reason
        with pytest.raises(BackendError, match="head dim 257 is outside 1..256"):
            flash_attention(*args, return_lse=True, backend=backend, **_on(dev, options))
        return
    out, lse = flash_attention(*args, return_lse=True, backend=backend, **_on(dev, options))
    lower, lower_lse, extra = _flash_policy(q, k, v, options, lq, lk, torch.float64)
    theirs, _, _ = _flash_policy(*(_yardstick(t) for t in (q, k, v)), options, lq, lk,
                                 torch.float64 if q.dtype == torch.float64 else torch.float32)
    _judge(out, lower, extra, theirs, "out")
    lse_extra = extra.transpose(-1, -2) if "cu_seqlens_q" not in options else extra.transpose(0, 1)
    _judge(lse.float(), lower_lse, lse_extra, None, "lse")


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=flash_cases(finite=True))
def test_flash_attention_gradients_match_the_policy(backend, case):
    """dq, dk, dv of ``sum(out * g)`` against float64 autograd through the policy, finite inputs (the
    gradient of a NaN row is NaN everywhere it reaches; the forward tests pin where NaN goes)."""
    q, k, v, options, lq, lk, kinds = case
    assume(not _interpreter_artefact(backend, q.dtype, kinds))
    dev = _device(backend)
    leaves = [t.detach().to(dev).requires_grad_() for t in (q, k, v)]
    out = flash_attention(*leaves, backend=backend, **_on(dev, options))
    g = fuzz.fill(tuple(out.shape), torch.float32, "normal", 99).to(q.dtype)
    grads = torch.autograd.grad(out, leaves, g.to(dev), allow_unused=True) if out.numel() else [None] * 3

    def policy(acc):  # the policy's gradients with every intermediate in ``acc``
        ins = [t.to(acc).detach().requires_grad_() for t in (q, k, v)]
        o, _, _ = _flash_policy(*ins, options, lq, lk, acc)
        return torch.autograd.grad(o, ins, g.to(acc), allow_unused=True) if o.numel() else [None] * 3

    # dq and dk vanish exactly (by cancellation: rows of dS sum to 0) where a sequence's keys or values do
    # not vary -- one key, equal rows, a broadcast view --: a relative error of rounding noise; dv only then
    varlen = "cu_seqlens_q" in options
    starts = [sum(lk[:b]) for b in range(len(lk))]
    seqs = [(k[s0:s0 + n], v[s0:s0 + n]) if varlen else (k[b], v[b]) for b, (s0, n) in enumerate(zip(starts, lk))]
    causal = ref_attention.BOTTOM_RIGHT if options["causal"] else ref_attention.NONE

    def sees(L, S):  # keys each query row sees
        band = ref_attention.band_mask(L, S, causal, *options["window_size"], "cpu")
        return torch.full((L,), S) if band is None else band.sum(-1)

    varies = all(n_q == 0 or (bool((sees(n_q, len(ks)) != 1).all()) and bool((ks != ks[:1]).any())
                              and bool((vs != vs[:1]).any())) for n_q, (ks, vs) in zip(lq, seqs))
    # the yardstick (flash-attn's test: its reference with upcast=False): the same math in the input dtype,
    # or in float32 where that overflows (huge q.k: the kernels accumulate in float32)
    for name, ours, ref, theirs, wide in zip("qkv", grads, policy(torch.float64), policy(q.dtype),
                                             policy(torch.float32)):
        if ours is None or ref is None or (name != "v" and not varies):
            continue
        over = torch.isinf(ref.to(q.dtype)) & torch.isfinite(ref)  # past the dtype's range: inf is its rounding
        ref = torch.where(over, ref.sign() * math.inf, ref)
        ulps = 1
        if (~torch.isfinite(theirs) & torch.isfinite(ref)).any():
            # float32 does not round O, P and dS to the dtype as the flash backward does: 4 epsilons
            theirs, ulps = wide, 4
        subnormal = ref.numel() and ref.abs().max() < torch.finfo(torch.float32).smallest_normal * 2**23
        if q.dtype == torch.float32 and subnormal:
            # gradients in float32's subnormal range hold fewer than 24 bits: torch's own float32 error is the bar
            err, bar = fuzz.rel_err(ours, ref), 2 * fuzz.rel_err(theirs, ref) + fuzz.EPS[torch.float32]
            assert err <= bar, f"d{name}: relative error {err:.3e} > {bar:.3e} (float32, subnormal gradients)"
            continue
        fuzz.assert_matches(ours, ref, theirs=theirs, what=f"d{name}", ulps=ulps)


# ----------------------------------------------------------------------------------------------
# scaled_dot_product_attention: torch's own op (math backend, float64) is the upper bound
# ----------------------------------------------------------------------------------------------
@st.composite
def sdpa_cases(draw):
    hk = draw(st.sampled_from([1, 2]))
    gqa = draw(st.booleans())
    h = hk * (draw(st.sampled_from([2, 3])) if gqa else 1)
    batch, L, S = draw(fuzz.sizes(1, 2)), draw(fuzz.sizes(1, 33)), draw(fuzz.sizes(1, 33))
    e = draw(st.sampled_from([8, 16, 33]))
    dtype = draw(st.sampled_from(DTYPES))
    kinds = [draw(st.sampled_from(fuzz.KINDS)) for _ in range(3)]
    seed = draw(st.integers(0, 2**31))
    q = fuzz.with_layout(fuzz.fill((batch, h, L, e), dtype, kinds[0], seed), draw(st.sampled_from(fuzz.LAYOUTS)))
    k = fuzz.with_layout(fuzz.fill((batch, hk, S, e), dtype, kinds[1], seed + 1), draw(st.sampled_from(fuzz.LAYOUTS)))
    v = fuzz.with_layout(fuzz.fill((batch, hk, S, e), dtype, kinds[2], seed + 2), draw(st.sampled_from(fuzz.LAYOUTS)))
    mask_kind = draw(st.sampled_from(["none", "causal", "bool", "float"]))
    g = torch.Generator().manual_seed(seed)
    mask = None
    if mask_kind in ("bool", "float"):
        allowed = torch.rand(L, S, generator=g) < 0.7
        allowed[draw(st.integers(0, L - 1))] = False   # a fully masked row
        mask = allowed if mask_kind == "bool" else torch.zeros(L, S, dtype=dtype).masked_fill(~allowed, -math.inf)
    scale = e ** -0.5 / (MAGNITUDE.get(kinds[0], 1.0) * MAGNITUDE.get(kinds[1], 1.0))
    return q, k, v, mask, mask_kind == "causal", scale, gqa, kinds


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=sdpa_cases())
def test_sdpa_matches_torch_math_and_the_policy(backend, case):
    q, k, v, mask, causal, scale, gqa, kinds = case
    assume(not _interpreter_artefact(backend, q.dtype, kinds))
    dev = _device(backend)
    out = scaled_dot_product_attention(q.to(dev), k.to(dev), v.to(dev),
                                       attn_mask=None if mask is None else mask.to(dev), is_causal=causal,
                                       scale=scale, enable_gqa=gqa, backend=backend)
    visible = torch.ones(q.shape[-2], k.shape[-2], dtype=torch.bool).tril() if causal else (
        None if mask is None else (mask if mask.dtype == torch.bool else mask > -math.inf))
    lower, extra, theirs = [], [], []
    for b in range(q.shape[0]):
        lo, _, ex = _attend(q[b], k[b], v[b], scale, visible)
        th, _, _ = _attend(_yardstick(q[b]), _yardstick(k[b]), _yardstick(v[b]), scale, visible, acc=torch.float32)
        lower.append(lo), extra.append(ex), theirs.append(th)
    lower, extra, theirs = torch.stack(lower), torch.stack(extra), torch.stack(theirs)
    _judge(out, lower, extra, theirs, "out")
    # torch's own op is the upper bound: it is NaN wherever the policy allows an extra NaN
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.MATH):
        torch_out = torch.nn.functional.scaled_dot_product_attention(
            q.double(), k.double(), v.double(), attn_mask=None if mask is None else mask.to(torch.bool)
            if mask.dtype == torch.bool else mask.double(), is_causal=causal, scale=scale, enable_gqa=gqa)
    assert not (torch.isnan(out.cpu()) & ~torch.isnan(torch_out)).any(), "NaN where torch's math SDPA has none"


# ----------------------------------------------------------------------------------------------
# nn.MultiheadAttention (need_weights=False: our SDPA) against torch's module
# ----------------------------------------------------------------------------------------------
@st.composite
def mha_cases(draw):
    embed, heads = draw(st.sampled_from([(16, 4), (12, 3), (8, 1), (32, 2)]))
    n, L = draw(fuzz.sizes(1, 3)), draw(fuzz.sizes(1, 17))
    self_attn = draw(st.booleans())
    S = L if self_attn else draw(fuzz.sizes(1, 17))
    options = dict(batch_first=draw(st.booleans()), bias=draw(st.booleans()), add_bias_kv=draw(st.booleans()),
                   add_zero_attn=draw(st.booleans()))
    if not self_attn and draw(st.booleans()):
        options.update(kdim=7, vdim=5)
    # finite values: the projections spread a NaN over its token, the attention tests cover non-finite
    # values; "huge" inputs through the projections make an ill-conditioned softmax no scale can undo
    kind = draw(st.sampled_from(["normal", "tiny", "denormal", "equal"]))
    return (embed, heads, n, L, S, self_attn, options, draw(st.sampled_from(DTYPES)), kind,
            draw(st.sampled_from(["none", "bool", "float", "causal"])), draw(st.booleans()),
            draw(st.integers(0, 2**31)))


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=mha_cases())
def test_multihead_attention_matches_torch(backend, case):
    embed, heads, n, L, S, self_attn, options, dtype, kind, mask_kind, padding, seed = case
    assume(not _interpreter_artefact(backend, dtype, [kind]))
    torch.manual_seed(seed % 2**16)
    theirs = torch.nn.MultiheadAttention(embed, heads, **options).eval()
    for p in theirs.parameters():  # biases too: torch initialises them to 0
        torch.nn.init.normal_(p, std=embed ** -0.5)
    ref64 = copy.deepcopy(theirs).double()
    theirs = theirs.to(dtype)
    dev = _device(backend)
    ours = seqgen_fast.nn.MultiheadAttention.from_torch(copy.deepcopy(theirs).to(dev))
    lead = (n, L) if options["batch_first"] else (L, n)
    lead_k = (n, S) if options["batch_first"] else (S, n)
    query = fuzz.fill((*lead, embed), dtype, kind, seed)
    key = query if self_attn else fuzz.fill((*lead_k, options.get("kdim", embed)), dtype, kind, seed + 1)
    value = query if self_attn else fuzz.fill((*lead_k, options.get("vdim", embed)), dtype, kind, seed + 2)
    g = torch.Generator().manual_seed(seed)
    kw = {}
    if mask_kind == "causal":
        kw.update(attn_mask=torch.ones(L, S, dtype=torch.bool).triu(1), is_causal=L == S)
    elif mask_kind != "none":
        blocked = torch.rand(L, S, generator=g) < 0.3
        additive = torch.zeros(L, S).masked_fill(blocked, -math.inf).to(dtype)
        kw["attn_mask"] = blocked if mask_kind == "bool" else additive
    if padding:
        kw["key_padding_mask"] = torch.rand(n, S, generator=g) < 0.3
    with torch.no_grad():
        with seqgen_fast.use_backend(backend):
            out, _ = ours(*(x.to(dev) for x in (query, key, value)), need_weights=False, **_on(dev, kw))
        ref, _ = ref64(query.double(), key.double(), value.double(), need_weights=False,
                       **{k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                          for k, v in kw.items()})
        own, _ = theirs(query, key, value, need_weights=False, **kw)
    fuzz.assert_matches(out, ref, theirs=own)


# ----------------------------------------------------------------------------------------------
# Decode: decode_attention (contiguous, append) and flash_attn_with_kvcache (paged), NaN in unused rows
# ----------------------------------------------------------------------------------------------
@st.composite
def decode_cases(draw):
    hkv = draw(st.sampled_from([1, 2]))
    hq = hkv * draw(st.sampled_from([1, 2, 4]))
    batch, d = draw(fuzz.sizes(1, 3)), draw(st.sampled_from([8, 16, 40, 64]))
    paged = draw(st.booleans())
    page = 16
    cap = draw(st.sampled_from([16, 32])) if paged else draw(fuzz.sizes(1, 33))
    lq = draw(st.sampled_from([1, 1, 2, 3])) if paged else 1
    append = not paged and draw(st.booleans())
    limit = cap - (1 if append else 0)
    lens = [draw(st.integers(0, limit)) for _ in range(batch)]
    dtype = draw(st.sampled_from(DTYPES))
    kinds = [draw(st.sampled_from(fuzz.KINDS)) for _ in range(3)]
    seed = draw(st.integers(0, 2**31))
    window = draw(st.sampled_from([(-1, -1), (-1, -1), (2, -1), (4, 0), (-1, 1)])) if paged else (-1, -1)
    return dict(hkv=hkv, hq=hq, batch=batch, d=d, paged=paged, page=page, cap=cap, lq=lq, append=append,
                lens=lens, dtype=dtype, kinds=kinds, seed=seed, causal=draw(st.booleans()),
                layout=draw(st.sampled_from(["contiguous", "sliced"])), window=window,
                softcap=draw(st.sampled_from([0.0, 0.0, 2.0])) if paged else 0.0,
                alibi=paged and draw(st.booleans()))


def _decode_inputs(c):
    """(q (B, Lq, Hq, D), logical k / v caches (B, cap, Hkv, D) with NaN in every unused row, new k / v)."""
    B, cap, d = c["batch"], c["cap"], c["d"]
    q = fuzz.fill((B, c["lq"], c["hq"], d), c["dtype"], c["kinds"][0], c["seed"])
    k = fuzz.fill((B, cap, c["hkv"], d), c["dtype"], c["kinds"][1], c["seed"] + 1)
    v = fuzz.fill((B, cap, c["hkv"], d), c["dtype"], c["kinds"][2], c["seed"] + 2)
    for b, n in enumerate(c["lens"]):  # storage past the sequence: garbage, never to be read
        k[b, n:], v[b, n:] = math.nan, math.nan
    new = None
    if c["append"]:
        new = tuple(fuzz.fill((B, 1, c["hkv"], d), c["dtype"], "normal", c["seed"] + 3 + i) for i in range(2))
    return q, k, v, new


@pytest.mark.parametrize("backend", BACKENDS)
@given(c=decode_cases())
def test_decode_matches_the_policy(backend, c):
    assume(not _interpreter_artefact(backend, c["dtype"], c["kinds"], bf16_dot=True))
    q, k, v, new = _decode_inputs(c)
    dev = _device(backend)
    if backend == "triton" and c["d"] < 16:  # declined before launch, with the reason
        with pytest.raises(BackendError, match=f"head dim {c['d']} is outside 16..256"):
            decode_attention(q[:, 0].to(dev), k.to(dev), v.to(dev), torch.tensor(c["lens"], dtype=torch.int32).to(dev),
                             backend=backend)
        return
    scale = c["d"] ** -0.5 / (MAGNITUDE.get(c["kinds"][0], 1.0) * MAGNITUDE.get(c["kinds"][1], 1.0))
    seqlens = torch.tensor(c["lens"], dtype=torch.int32)
    slopes = torch.rand(c["hq"], generator=torch.Generator().manual_seed(c["seed"])) * 0.5 if c["alibi"] else None
    if c["paged"]:
        pages = c["cap"] // c["page"]
        perm = torch.randperm(c["batch"] * pages, generator=torch.Generator().manual_seed(c["seed"]))
        table = perm.reshape(c["batch"], pages).to(torch.int32)
        kc = torch.empty(c["batch"] * pages, c["page"], c["hkv"], c["d"], dtype=c["dtype"])
        vc = torch.empty_like(kc)
        kc[table.flatten().long()] = k.reshape(-1, c["page"], c["hkv"], c["d"])
        vc[table.flatten().long()] = v.reshape(-1, c["page"], c["hkv"], c["d"])
        with seqgen_fast.use_backend(backend):
            out, lse = flash_attn_with_kvcache(q.to(dev), fuzz.with_layout(kc, c["layout"]).to(dev),
                                               fuzz.with_layout(vc, c["layout"]).to(dev), cache_seqlens=seqlens.to(dev),
                                               block_table=table.to(dev), softmax_scale=scale, causal=c["causal"],
                                               window_size=c["window"], softcap=c["softcap"],
                                               alibi_slopes=None if slopes is None else slopes.to(dev),
                                               return_softmax_lse=True)
    else:
        kc, vc = (fuzz.with_layout(t, c["layout"]).to(dev) for t in (k, v))
        extra = {} if new is None else dict(k_new=new[0][:, 0].to(dev), v_new=new[1][:, 0].to(dev))
        out = decode_attention(q[:, 0].to(dev), kc, vc, seqlens.to(dev), scale=scale, backend=backend, **extra)[:, None]
        if new is not None:  # the appended row is now part of the cache (for the policy below)
            for b, n in enumerate(c["lens"]):
                k[b, n], v[b, n] = new[0][b, 0], new[1][b, 0]
    total = [n + c["append"] for n in c["lens"]]
    lower, extra, theirs, lses = [], [], [], []
    for b, n in enumerate(total):
        pos = torch.arange(n)
        q_at = n - c["lq"] + torch.arange(c["lq"])
        left, right = c["window"]
        right = 0 if c["causal"] else right
        visible = torch.ones(c["lq"], n, dtype=torch.bool)
        if right >= 0:
            visible &= pos[None, :] <= q_at[:, None] + right
        if left >= 0:
            visible &= pos[None, :] >= q_at[:, None] - left
        qs, ks, vs = q[b].transpose(0, 1), k[b, :n].transpose(0, 1), v[b, :n].transpose(0, 1)
        lo, lse_b, ex = _attend(qs, ks, vs, scale, visible, c["softcap"], slopes)
        th, _, _ = _attend(*(_yardstick(t) for t in (qs, ks, vs)), scale, visible, c["softcap"], slopes,
                           acc=torch.float32)
        lower.append(lo.transpose(0, 1)), extra.append(ex.transpose(0, 1)), theirs.append(th.transpose(0, 1))
        lses.append(lse_b.masked_fill(torch.isneginf(lse_b), math.inf))  # decode: +inf for a row without keys
    extra = torch.stack(extra)
    _judge(out, torch.stack(lower), extra, torch.stack(theirs), "out")
    if c["paged"]:
        lses = torch.stack(lses)
        _judge(lse.float(), lses, extra.transpose(1, 2), None, "lse")


# ----------------------------------------------------------------------------------------------
# Rotary: transformers' apply_rotary_pos_emb (and its interleaved twin) in float64
# ----------------------------------------------------------------------------------------------
def _rotate_like_transformers(x, cos, sin, interleaved):
    """x (B, S, H, D) float64 with per-token cos / sin (B or 1, S, rd) at full width: the first rd dims rotated."""
    rd = cos.shape[-1]
    x1, rest = x[..., :rd], x[..., rd:]
    if interleaved:
        pairs = x1.unflatten(-1, (rd // 2, 2))
        rot = torch.stack((-pairs[..., 1], pairs[..., 0]), -1).flatten(-2)
    else:
        rot = torch.cat((-x1[..., rd // 2:], x1[..., :rd // 2]), -1)
    return torch.cat((x1 * cos[:, :, None] + rot * sin[:, :, None], rest), -1)


@st.composite
def rotary_cases(draw):
    batch, seq, h = draw(fuzz.sizes(0, 3)), draw(fuzz.sizes(1, 33)), draw(st.sampled_from([1, 2, 3]))
    d = draw(st.sampled_from([8, 16, 40, 64]))
    rd = draw(st.sampled_from([r for r in (2, 8, 16, d) if r <= d]))
    dtype = draw(st.sampled_from(DTYPES))
    kind = draw(st.sampled_from(fuzz.KINDS))
    seed = draw(st.integers(0, 2**31))
    x = fuzz.with_layout(fuzz.fill((batch, seq, h, d), dtype, kind, seed), draw(st.sampled_from(fuzz.LAYOUTS)))
    kinds = [kind, draw(st.sampled_from(fuzz.FINITE_KINDS))]
    k = fuzz.fill((batch, seq, 1, d), dtype, kinds[1], seed + 1)
    offset = draw(st.sampled_from([0, 5]))
    return x, k, rd, draw(st.booleans()), offset, kinds


@pytest.mark.parametrize("backend", BACKENDS)
@given(case=rotary_cases())
def test_rotary_matches_transformers(backend, case):
    x, k, rd, interleaved, offset, kinds = case
    assume(not _interpreter_artefact(backend, x.dtype, kinds))
    B, S = x.shape[:2]
    inv = 1.0 / 10000 ** (torch.arange(0, rd, 2, dtype=torch.float64) / rd)
    freqs = torch.arange(S + offset, dtype=torch.float64)[:, None] * inv                 # (S_ro, rd/2)
    table = freqs if interleaved else torch.cat((freqs, freqs), -1)
    cos, sin = table.cos(), table.sin()
    positions = (torch.arange(S) + offset).expand(B, S)
    dev = _device(backend)
    qr, kr = rotary_embedding(x.to(dev), k.to(dev), cos.to(x.dtype).to(dev), sin.to(x.dtype).to(dev),
                              position_ids=positions.to(dev), interleaved=interleaved, backend=backend)
    full = (lambda t: t.repeat_interleave(2, -1)) if interleaved else (lambda t: t)
    for name, ours, inp in (("q", qr, x), ("k", kr, k)):
        c, s = (full(t.to(x.dtype).double()[positions]) for t in (cos, sin))
        ref = _rotate_like_transformers(inp.double(), c, s, interleaved)
        theirs = _rotate_like_transformers(inp.to(x.dtype), c.to(x.dtype), s.to(x.dtype), interleaved)
        fuzz.assert_matches(ours, ref, theirs=theirs, what=name)


# ----------------------------------------------------------------------------------------------
# Regression tests of what the suite found
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", BACKENDS)
def test_decode_never_reads_cache_rows_past_the_sequence(backend):
    """Found by test_decode_matches_the_policy: the reference backend (the CPU path) multiplied the
    zero weights of unused cache rows by their contents, so a NaN there (torch.empty storage) made
    every row NaN; the kernels never read them. Now no backend does."""
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(s, generator=g) for s in ((3, 4, 16), (3, 9, 2, 16), (3, 9, 2, 16)))
    lens = torch.tensor([0, 5, 7], dtype=torch.int32)
    for b, n in enumerate(lens.tolist()):
        k[b, n:], v[b, n:] = math.nan, math.nan
    dev = _device(backend)
    out = decode_attention(q.to(dev), k.to(dev), v.to(dev), lens.to(dev), backend=backend).cpu()
    assert torch.isfinite(out).all()
    assert torch.equal(out[0], torch.zeros_like(out[0]))  # no key: 0
    ref = decode_attention(q.double(), k.double().nan_to_num(), v.double().nan_to_num(), lens, backend="reference")
    fuzz.assert_matches(out, ref)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_reaches_exactly_the_rows_that_see_it(backend, where):
    """A NaN in q row 4, or at key 4 of k / v, under a causal band over 33 keys (blocks of the
    interpreter's 16, and 64 compiled): query rows that see key 4 are NaN, rows before it are not when
    the NaN is in k (its score is masked to -inf before any max or sum), and every backend agrees."""
    g = torch.Generator().manual_seed(5)
    q, k, v = (torch.randn(1, 33, 2, 16, generator=g) for _ in range(3))
    {"q": q, "k": k, "v": v}[where][0, 4, 1, 3] = math.nan
    dev = _device(backend)
    out = flash_attention(q.to(dev), k.to(dev), v.to(dev), causal=True, backend=backend).cpu()
    rows = torch.isnan(out[0, :, 1]).any(-1)
    expect = torch.zeros(33, dtype=torch.bool)
    if where == "q":
        expect[4] = True
    else:
        expect[4:] = True
    if where == "v":  # a masked-out key sharing a tile may also reach a row (policy): rows 4.. at least
        assert rows[4:].all()
    else:
        assert torch.equal(rows, expect)
    assert not torch.isnan(out[0, :, 0]).any(), "a NaN crossed into another head"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_compiled_kernels_follow_the_nan_policy(dtype):
    """Compiled on the GPU (max.NaN.f32): NaN in q / k / v propagates through the portable or Hopper
    forward, the Gluon forward, decode with and without splits, as the float64 policy says."""
    g = torch.Generator().manual_seed(7)
    for where in "qkv":
        q, k, v = (torch.randn(2, 300, 4, 128, generator=g).to(dtype) for _ in range(3))
        {"q": q, "k": k, "v": v}[where][1, 17, 2, 5] = math.nan
        for causal in (False, True):
            out = flash_attention(q.cuda(), k.cuda(), v.cuda(), causal=causal, backend="triton").cpu()
            ref = flash_attention(q[:1].double(), k[:1].double(), v[:1].double(), causal=causal, backend="reference")
            assert_close_rel(out[:1], ref, TOL[dtype], "the clean sequence")
            rows = torch.isnan(out[1, :, 2]).any(-1)  # the NaN's (sequence, head)
            sees = torch.arange(300) >= 17 if causal else torch.ones(300, dtype=torch.bool)
            if where == "q":
                assert torch.equal(rows, torch.arange(300) == 17)
            elif where == "k":
                assert torch.equal(rows, sees)
            else:  # v: at least the rows that see it (others may share its tile)
                assert rows[sees].all()
            assert not torch.isnan(out[1][:, [0, 1, 3]]).any(), "a NaN crossed into another head"
    for splits in (1, 0, 8):
        qd = torch.randn(4, 8, 128, generator=g).to(dtype)
        kc, vc = (torch.randn(4, 4096, 2, 128, generator=g).to(dtype) for _ in range(2))
        lens = torch.tensor([4096, 100, 0, 3000], dtype=torch.int32)
        kc[0, 2000, 1, 7] = math.nan
        kc[1, 200:] = math.nan  # unused rows
        out = decode_attention(qd.cuda(), kc.cuda(), vc.cuda(), lens.cuda(), num_splits=splits, backend="triton").cpu()
        assert torch.isnan(out[0, 4:]).all() and not torch.isnan(out[0, :4]).any()
        assert torch.isfinite(out[1:]).all() and torch.equal(out[2], torch.zeros_like(out[2]))
        ref = decode_attention(qd[1:].double(), kc[1:].double(), vc[1:].double(), lens[1:], backend="reference")
        assert_close_rel(out[1:], ref, TOL[dtype], f"num_splits={splits}")


@pytest.mark.gpu
def test_gpu_bfloat16_subnormals():
    """What the interpreter cannot run (its bfloat16 subnormal conversion): subnormal q / k / v in
    bfloat16 through every family's kernel, under the policy's error rule."""
    g = torch.Generator().manual_seed(11)
    q, k, v = (fuzz.fill((1, 65, 2, 64), torch.bfloat16, "denormal", s) for s in (1, 2, 3))
    out = flash_attention(q.cuda(), k.cuda(), v.cuda(), causal=True, backend="triton")
    lower, _, extra = _flash_policy(q, k, v, dict(causal=True, window_size=(-1, -1), softcap=0.0, scale=64 ** -0.5),
                                    [65], [65], torch.float64)
    theirs, _, _ = _flash_policy(*(_yardstick(t) for t in (q, k, v)),
                                 dict(causal=True, window_size=(-1, -1), softcap=0.0, scale=64 ** -0.5), [65], [65],
                                 torch.float32)
    _judge(out, lower, extra, theirs, "out")
    x = fuzz.fill((2, 33, 2, 64), torch.bfloat16, "denormal", 4)
    cos, sin = torch.randn(33, 32, generator=g).to(torch.bfloat16), torch.randn(33, 32, generator=g).to(torch.bfloat16)
    ours, _ = rotary_embedding(x.cuda(), None, cos.cuda(), sin.cuda(), interleaved=True, backend="triton")
    ref, _ = rotary_embedding(x.double(), None, cos.double(), sin.double(), interleaved=True, backend="reference")
    theirs, _ = rotary_embedding(x, None, cos, sin, interleaved=True, backend="reference")
    fuzz.assert_matches(ours, ref, theirs=theirs)
