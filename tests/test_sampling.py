"""sample_tokens: the reference against transformers' warpers, the Triton kernel (interpreter on the
CPU) against the reference distribution by chi-square tests, supports, ties, special values,
reproducibility, chunking, the two-stage top-k against the single stage, errors, opcheck,
torch.compile; `gpu` tests at V = 128256, B = 64 and a CUDA-graph replay."""
import math

import pytest
import torch

import seqgen_fast
from seqgen_fast.checks import run_checks
from seqgen_fast.functional import sample_tokens
from seqgen_fast.kernels import sampling as kernel
from seqgen_fast.ops.sampling import ERRORS
from seqgen_fast.reference import sampling as reference
from support.aot import compile_sm90, pointers

BACKENDS = ("reference", "triton")
Z_CRIT = 5.0  # one-sided normal quantile of the chi-square tests: a false alarm ~3e-7 per test


def chi2_critical(dof: int, z: float = Z_CRIT) -> float:
    """Upper quantile of chi-square(dof) (Wilson-Hilferty cube approximation)."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def assert_follows(tokens: torch.Tensor, probs: torch.Tensor, what: str) -> None:
    """tokens (N,) drawn from probs (V,): no token outside the support, and a chi-square test passes
    (cells expecting fewer than 5 draws pooled)."""
    n = tokens.numel()
    counts = torch.bincount(tokens.cpu(), minlength=probs.numel()).double()
    p = probs.double().cpu()
    outside = counts[p == 0].sum().item()
    assert outside == 0, f"{what}: {outside:.0f} draws fell outside the support"
    support = p > 0
    expected, observed = n * p[support], counts[support]
    rare = expected < 5  # pooled into one cell, where the chi-square approximation holds
    if rare.sum() > 1:
        expected = torch.cat([expected[~rare], expected[rare].sum()[None]])
        observed = torch.cat([observed[~rare], observed[rare].sum()[None]])
    stat = ((observed - expected) ** 2 / expected).sum().item()
    dof = expected.numel() - 1
    if dof > 0:
        assert stat < chi2_critical(dof), f"{what}: chi-square {stat:.1f} > {chi2_critical(dof):.1f} (dof {dof})"


def draw(backend: str, logits: torch.Tensor, **kw) -> torch.Tensor:
    with seqgen_fast.use_backend(backend):
        return sample_tokens(logits, **kw)


# ------------------------------------------------------------------------------------------
# The reference and its convention
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 5, None), (0.7, None, 0.8), (1.3, 20, 0.5),
                                                     (0.5, 3, 0.99)])
def test_reference_matches_transformers_warpers(temperature, top_k, top_p):
    from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                        TopPLogitsWarper)

    logits = torch.randn(6, 50) * 2
    scores = TemperatureLogitsWarper(temperature)(None, logits.clone())
    if top_k is not None:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p is not None:
        scores = TopPLogitsWarper(top_p)(None, scores)
    expected = torch.softmax(scores, -1)
    probs = reference.filtered_probs(logits, temperature=temperature, top_k=top_k, top_p=top_p)
    assert torch.equal(probs > 0, expected > 0), "kept tokens differ from transformers'"
    torch.testing.assert_close(probs, expected, rtol=1e-5, atol=1e-6)


def test_reference_keeps_tie_groups_whole():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    top2 = reference.filtered_probs(logits, top_k=2)
    assert torch.equal(top2[0] > 0, torch.tensor([True, True, True, True, False, False]))
    # p = (e^3, e^2, e^2, e^2, ...) / Z: the first token holds < 0.45, so the tie group of three joins.
    nucleus = reference.filtered_probs(logits, top_p=0.45)
    assert torch.equal(nucleus[0] > 0, torch.tensor([True, True, True, True, False, False]))
    assert torch.equal(reference.filtered_probs(logits, top_p=0.3)[0] > 0,
                       torch.tensor([True, False, False, False, False, False]))


# ------------------------------------------------------------------------------------------
# Distributions (chi-square), on both backends
# ------------------------------------------------------------------------------------------
CONFIGS = [dict(temperature=1.0), dict(temperature=0.5, top_k=4), dict(temperature=1.3, top_p=0.8),
           dict(temperature=0.8, top_k=6, top_p=0.7), dict(temperature=2.0, top_k=1)]


@pytest.mark.parametrize("backend", BACKENDS)
def test_distribution_matches_reference(backend):
    base = torch.randn(1, 11) * 1.5  # V = 11, not a power of two
    draws = 3000
    for cfg in CONFIGS:
        tokens = draw(backend, base.expand(draws, -1), **cfg)
        assert tokens.shape == (draws,) and tokens.dtype == torch.int64
        assert_follows(tokens, reference.filtered_probs(base, **cfg)[0], f"{backend} {cfg}")


def test_chunked_rows_follow_the_distribution():
    """V = 37 streamed in chunks of 16 (3 chunks, the last partial), several rows per program."""
    base = torch.randn(3, 37) * 2
    draws = 1500
    seed = torch.tensor([1234], dtype=torch.int64)
    for cfg in (dict(temperature=1.0, top_k=7, top_p=0.9), dict(temperature=0.9, top_p=0.6)):
        tokens = kernel.sample_tokens(base.repeat(draws, 1), seed, cfg["temperature"], cfg.get("top_k", 0),
                                      cfg["top_p"], block_v=16).view(draws, 3)
        probs = reference.filtered_probs(base, **cfg)
        for r in range(3):
            assert_follows(tokens[:, r], probs[r], f"row {r} {cfg}")


def test_temperature_sharpens_and_flattens():
    base = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    draws = 2000
    top_share = {}
    for t in (0.3, 3.0):
        tokens = draw("triton", base.expand(draws, -1), temperature=t)
        top_share[t] = (tokens == 0).double().mean().item()
        assert_follows(tokens, reference.filtered_probs(base, temperature=t)[0], f"T={t}")
    assert top_share[0.3] > 0.9 > 0.5 > top_share[3.0]


def test_rare_tokens_keep_their_share():
    """A 1% token wins when its exponential variate is tiny: the small-variate series must be right."""
    base = torch.tensor([[0.96, 0.02, 0.01, 0.01]]).log()
    tokens = draw("triton", base.expand(20000, -1))
    assert_follows(tokens, reference.filtered_probs(base)[0], "skewed")


# ------------------------------------------------------------------------------------------
# Two-stage top-k (segments, then the candidates): the same picks as one stage
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("top_p", [1.0, 0.8])
def test_two_stage_top_k_draws_what_one_stage_draws(top_p):
    """V = 100 in segments of 32 (the last holds 4 < k columns); same seed -> same uniforms."""
    logits = torch.randn(12, 100) * 2
    seed = torch.tensor([2024], dtype=torch.int64)
    two = kernel.sample_tokens(logits, seed, 0.8, 5, top_p, segment=32)
    one = kernel.sample_tokens(logits, seed, 0.8, 5, top_p, segment=0)
    assert (two != one).sum() <= 1  # only a float32 rounding tie at u * Z could split them
    kept = reference.filtered_probs(logits, temperature=0.8, top_k=5, top_p=top_p)
    assert (kept.gather(1, two[:, None]) > 0).all()


def test_segment_candidates_are_each_segments_top_k_with_ties():
    logits = torch.randn(3, 70)
    logits[0, 16:24] = 5.0 + torch.arange(8) / 8  # the row's top 8 all in segment 1
    logits[1, 40:46] = 3.0  # a tie group of 6 > CAP = 4 slots in segment 2
    logits[2, 5] = math.nan
    logits[0, 50:54] = torch.tensor([7.0, 7.0, 6.0, 6.0])  # k = 3 with a tie: exactly CAP kept in segment 3
    k, seg, cap = 3, 16, 4
    cand, idx, flags = kernel.segment_candidates(logits, 1.0, k, kernel._segments(70, k, seg))
    assert cand.shape == (3, 5 * cap) and flags.shape == (3, 5)
    for r in range(3):
        for p in range(5):
            part = logits[r, p * seg:(p + 1) * seg]
            want = (part >= torch.topk(part, min(k, part.numel())).values[-1]).nonzero().flatten() + p * seg
            flagged = bool(flags[r, p])
            assert flagged == (len(want) > cap or bool(part.isnan().any())), (r, p)
            if not flagged:
                n = len(want)
                assert idx[r, p * cap:p * cap + n].tolist() == want.tolist(), (r, p)
                assert torch.equal(cand[r, p * cap:p * cap + n], logits[r, want])
                assert (cand[r, p * cap + n:(p + 1) * cap] == -math.inf).all()


def test_two_stage_falls_back_to_the_full_row():
    """Ties overflowing a segment's slots, a NaN, all -inf: those rows read their full logits."""
    logits = torch.randn(5, 70)
    logits[0] = 0.0  # every column ties: each segment keeps 16 > 4 slots
    logits[1, 40] = math.nan
    logits[2] = -math.inf
    logits[3, 20:40] = 9.0  # a tie group of 20 at the top, 3 <= k
    seed = torch.tensor([5], dtype=torch.int64)
    two = kernel.sample_tokens(logits, seed, 1.0, 3, 1.0, segment=16)
    one = kernel.sample_tokens(logits, seed, 1.0, 3, 1.0, segment=0)
    assert torch.equal(two, one)
    assert two[1] == -1 and two[2] == -1 and 20 <= two[3] < 40


# ------------------------------------------------------------------------------------------
# Supports: exactly the top-k / the nucleus, tie groups, -inf
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["reference", pytest.param("triton", marks=pytest.mark.smoke)])
def test_top_k_support_is_exactly_the_k_largest(backend):
    logits = torch.randn(4, 37)
    draws = 400
    tokens = draw(backend, logits.repeat(draws, 1), temperature=50.0, top_k=5).view(draws, 4)
    for r in range(4):
        want = set(torch.topk(logits[r], 5).indices.tolist())
        assert set(tokens[:, r].tolist()) == want


@pytest.mark.parametrize("backend", BACKENDS)
def test_top_p_support_is_exactly_the_nucleus(backend):
    # Flat-ish probabilities (0.30, 0.25, 0.20, 0.15, 0.10): nucleus 0.6 = the first three.
    probs = torch.tensor([0.30, 0.25, 0.20, 0.15, 0.10])
    logits = probs.log()[torch.randperm(5)]
    order = torch.argsort(logits, descending=True)
    tokens = draw(backend, logits.expand(600, -1), top_p=0.6)
    assert set(tokens.tolist()) == set(order[:3].tolist())


@pytest.mark.parametrize("backend", BACKENDS)
def test_ties_at_the_threshold_are_kept_together(backend):
    logits = torch.tensor([0.0, 2.0, 1.0, 2.0, 3.0, 2.0, -1.0])
    tokens = draw(backend, logits.expand(600, -1), temperature=5.0, top_k=2)
    assert set(tokens.tolist()) == {1, 3, 4, 5}
    tokens = draw(backend, logits.expand(600, -1), temperature=5.0, top_p=0.3)
    assert set(tokens.tolist()) == {1, 3, 4, 5}


@pytest.mark.parametrize("backend", BACKENDS)
def test_minus_inf_logits_are_never_drawn(backend):
    logits = torch.randn(2, 13)
    logits[:, ::2] = -math.inf
    for cfg in (dict(), dict(top_k=3), dict(top_p=0.9), dict(top_k=10)):
        tokens = draw(backend, logits.repeat(300, 1), **cfg)
        assert (tokens % 2 == 1).all(), cfg


NON_FINITE = [[0.0, math.nan, 1.0], [-math.inf, -math.inf, -math.inf], [1.0, math.inf, 0.0], [1.0, 3.0, 2.0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_mark_gives_minus_one_and_a_flag_per_row_without_a_distribution(backend):
    logits = torch.tensor(NON_FINITE)
    for cfg in (dict(), dict(top_k=2), dict(top_p=0.5)):
        tokens, invalid = draw(backend, logits, errors="mark", **cfg)
        assert tokens[:3].tolist() == [-1, -1, -1] and invalid.tolist() == [True, True, True, False], cfg
        assert 0 <= tokens[3] <= 2
    tokens, invalid = draw(backend, logits, temperature=0, errors="mark")
    assert tokens.tolist() == [-1, 0, 1, 1] and invalid.tolist() == [True, False, False, False]


@pytest.mark.parametrize("backend", BACKENDS)
def test_errors_raise_follows_torch_argmax_and_multinomial(backend):
    logits = torch.tensor(NON_FINITE)
    assert torch.equal(draw(backend, logits, temperature=0), torch.argmax(logits, -1))  # NaN as the maximum
    for row in range(3):
        with pytest.raises(RuntimeError, match="probability tensor contains"):
            torch.multinomial(torch.softmax(logits[row:row + 1], -1), 1)  # what torch does
        with pytest.raises(RuntimeError, match="probability tensor contains.*first row 0"):
            draw(backend, logits[row:row + 1])
    assert 0 <= draw(backend, logits[3:]) <= 2


def test_errors_must_be_raise_or_mark():
    with pytest.raises(ValueError, match="errors must be 'raise' or 'mark'"):
        sample_tokens(torch.randn(2, 5), errors="ignore")


# ------------------------------------------------------------------------------------------
# Greedy, dtypes, shapes, reproducibility
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_greedy_and_top1_are_argmax(dtype):
    logits = torch.stack([torch.randperm(97) for _ in range(5)]).to(dtype) / 4  # no ties, exact in bf16
    want = logits.float().argmax(-1)
    assert torch.equal(draw("triton", logits, temperature=0), want)
    assert torch.equal(draw("triton", logits, top_k=1), want)
    assert torch.equal(draw("triton", logits, temperature=1e-3, top_p=0.5), want)
    assert torch.equal(draw("reference", logits, temperature=0), want)


def test_greedy_takes_the_first_of_tied_maxima_across_chunks():
    logits = torch.zeros(2, 40)
    logits[0, [20, 35]] = 1.0
    logits[1, [3, 30]] = 1.0
    out = kernel.sample_tokens(logits, None, 0.0, 0, 1.0, block_v=16)
    assert out.tolist() == [20, 3]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_logits_sample_the_same_distribution(dtype):
    base = (torch.randn(1, 9) * 2).to(dtype)
    tokens = draw("triton", base.expand(2000, -1), temperature=0.9, top_k=5, top_p=0.9)
    assert_follows(tokens, reference.filtered_probs(base, temperature=0.9, top_k=5, top_p=0.9)[0], str(dtype))


@pytest.mark.parametrize("backend", BACKENDS)
def test_output_shapes(backend):
    assert draw(backend, torch.randn(7)).shape == ()
    assert draw(backend, torch.randn(2, 3, 7), top_k=2).shape == (2, 3)
    assert draw(backend, torch.randn(0, 7)).shape == (0,)
    strided = torch.randn(7, 4).t()  # rows with a column stride of 4
    assert draw(backend, strided, temperature=0).tolist() == strided.argmax(-1).tolist()


@pytest.mark.parametrize("backend", BACKENDS)
def test_same_generator_state_same_tokens(backend):
    logits = torch.randn(64, 29)
    a = draw(backend, logits, top_p=0.9, generator=torch.Generator().manual_seed(7))
    b = draw(backend, logits, top_p=0.9, generator=torch.Generator().manual_seed(7))
    g = torch.Generator().manual_seed(7)
    c1 = draw(backend, logits, top_p=0.9, generator=g)
    c2 = draw(backend, logits, top_p=0.9, generator=g)  # the generator advanced
    assert torch.equal(a, b) and torch.equal(a, c1)
    assert not torch.equal(c1, c2)


def test_rows_draw_independently():
    """Identical rows in one call must not share their random numbers (Philox key = seed + row)."""
    tokens = draw("triton", torch.zeros(400, 8))
    pairs = tokens.view(200, 2)
    assert (pairs[:, 0] == pairs[:, 1]).double().mean() < 0.3  # 1/8 expected when independent


# ------------------------------------------------------------------------------------------
# Errors, op registration, the check registry
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,match", [
    (dict(temperature=-1.0), "temperature"), (dict(temperature=math.nan), "temperature"),
    (dict(top_k=0), "top_k"), (dict(top_k=2.5), "top_k"), (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"), (dict(generator="seed"), "generator"),
])
def test_bad_arguments_name_themselves(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        sample_tokens(torch.randn(2, 5), **kwargs)


def test_bad_logits():
    with pytest.raises(TypeError, match="logits"):
        sample_tokens(torch.arange(5))
    with pytest.raises(ValueError, match="logits"):
        sample_tokens(torch.randn(3, 0))
    with pytest.raises(ValueError, match="block_v"):
        kernel.sample_tokens(torch.randn(2, 5), None, 0.0, 0, 1.0, block_v=12)


def test_cpu_dispatch_goes_to_reference_unless_triton_is_forced():
    from seqgen_fast.ops.sampling import SAMPLE

    x = torch.randn(2, 5)
    assert SAMPLE.select(x, None, 1.0, 0, 1.0) == "reference"
    assert SAMPLE.select(x, None, 1.0, 0, 1.0, backend="triton") == "triton"
    seed_state = torch.Generator().manual_seed(3)
    ours = sample_tokens(x.repeat(50, 1), backend="triton", generator=seed_state)
    with seqgen_fast.use_backend("triton"):
        again = sample_tokens(x.repeat(50, 1), generator=torch.Generator().manual_seed(3))
    assert torch.equal(ours, again)


@pytest.mark.parametrize("backend", BACKENDS)
def test_opcheck(backend):
    args = (torch.randn(3, 10), torch.tensor([3], dtype=torch.int64), 0.8, 3, 0.9, "raise", backend)
    with seqgen_fast.use_backend(backend):
        torch.library.opcheck(torch.ops.seqgen_fast.sample_tokens.default, args)


@pytest.mark.parametrize("errors", ERRORS)
def test_compiles_into_one_graph(errors):
    """torch.compile(fullgraph=True): the seed draw and the op trace without a graph break, with
    either non-finite policy (its host check runs inside the opaque op)."""
    logits = torch.randn(4, 50)
    sample = torch.compile(lambda x: sample_tokens(x, top_k=5, top_p=0.9, errors=errors), fullgraph=True)
    first, second = sample(logits), sample(logits)
    top5 = torch.topk(logits, 5).indices
    for out in (first, second):
        tokens = out if errors == "raise" else out[0]
        assert tokens.shape == (4,) and (top5 == tokens[:, None]).any(-1).all()


def test_registered_check_passes():
    rows = run_checks(torch.device("cpu"), names=["sample_tokens"], backends=BACKENDS)
    assert rows and all(r.status == "pass" for r in rows), [r for r in rows if r.status != "pass"]


# What the launchers choose, compiled for sm_90: one stage at a Llama-3 vocabulary (top-p alone and
# top-k + top-p), the compact second stage of two (63 segments x 64 slots), several small rows per
# program, greedy, temperature only.
AOT_SAMPLERS = [(1, 128256, "P"), (1, 128256, "KP"), (64, 63 * 64, "KPC"), (256, 512, "KP"), (64, 32000, "G"),
                (64, 32000, "")]


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("R,V,flags", AOT_SAMPLERS)
def test_sampler_compiles_for_sm90_without_spills(dt, R, V, flags):
    """The search's [ROWS, NC, BLOCK_V] compare tile must stay in registers: at 16 elements a thread
    it spilled over 1 KB per thread (bf16, Triton 3.6's ptxas); a few words of spill, which some
    ptxas versions show when they cap the compact stage at 128 registers, pass. Loads are 16-byte."""

    rows, block, warps = kernel._config(R, V, None, interpret=False)
    const = dict(GREEDY="G" in flags, TOP_K="K" in flags, TOP_P="P" in flags, COMPACT="C" in flags, ROWS=rows,
                 BLOCK_V=block, NC=kernel.NUM_CANDIDATES, SEG_P2=64)
    types = {**pointers(dt, "logits_ptr", "cand_ptr"), **pointers("i64", "out_ptr", "seed_ptr"),
             **pointers("i32", "cand_idx_ptr", "flag_ptr"), "inv_temp": "fp32", "top_p": "fp32"}
    facts = compile_sm90("seqgen_fast.kernels.sampling", "_sample_kernel", types=types, constexprs=const,
                         aligned=("V", "stride_r"), num_warps=warps)
    assert facts["spill_bytes"] <= 64, facts["spill_bytes"]
    if "C" not in flags:  # the compact stage gathers candidates; every other row is read as vectors
        assert "ld.global.v4.b32" in facts["ptx"] or "ld.global.v2.b32" in facts["ptx"]


@pytest.mark.parametrize("top_k", [50, 512])
def test_segment_kernel_compiles_for_sm90_without_spills(top_k):
    seg, _, cap = kernel._segments(128256, top_k, None)
    _, block, warps = kernel._config(1, seg, None, interpret=False)
    types = {**pointers("bf16", "logits_ptr", "cand_ptr"), **pointers("i32", "cand_idx_ptr", "flag_ptr"),
             "inv_temp": "fp32"}
    facts = compile_sm90("seqgen_fast.kernels.sampling", "_segment_topk_kernel", types=types,
                         constexprs=dict(CAP=cap, BLOCK_V=block, NC=kernel.NUM_CANDIDATES),
                         aligned=("V", "stride_r", "SEG", "NCAND"), num_warps=warps)
    assert facts["spill_bytes"] <= 64, facts["spill_bytes"]


# ------------------------------------------------------------------------------------------
# GPU: a Llama-3 vocabulary, 64 rows
# ------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gpu_large_vocab(dtype):
    vocab, batch = 128256, 64
    logits = (torch.randn(batch, vocab, device="cuda") * 3).to(dtype)
    assert torch.equal(sample_tokens(logits, temperature=0), logits.float().argmax(-1))
    cfg = dict(temperature=0.8, top_k=50, top_p=0.9)
    probs = reference.filtered_probs(logits, **cfg)
    draws = torch.stack([sample_tokens(logits, **cfg) for _ in range(200)])  # (200, 64)
    assert ((draws >= 0) & (draws < vocab)).all()
    assert (probs.gather(1, draws.t()) > 0).all(), "a draw fell outside the reference's kept set"
    for r in range(4):
        assert_follows(draws[:, r], probs[r], f"row {r}")
    # Many draws of one row: the empirical law against the reference (chi-square).
    one = sample_tokens(logits[:1].expand(100000, -1), **cfg)
    assert_follows(one, probs[0], "100000 draws of row 0")
    # The two-stage top-k (used above) and the single stage agree draw for draw.
    seed = torch.tensor([77], dtype=torch.int64, device="cuda")
    two = kernel.sample_tokens(logits, seed, 0.8, 50, 0.9)
    single = kernel.sample_tokens(logits, seed, 0.8, 50, 0.9, segment=0)
    assert (two != single).sum() <= 1


@pytest.mark.gpu
def test_gpu_top_p_only_large_vocab():
    logits = torch.randn(64, 128256, device="cuda", dtype=torch.bfloat16) * 4
    probs = reference.filtered_probs(logits, top_p=0.9)
    tokens = torch.stack([sample_tokens(logits, top_p=0.9) for _ in range(50)])
    assert (probs.gather(1, tokens.t()) > 0).all()


@pytest.mark.gpu
def test_gpu_cuda_graph_replays_draw_fresh_tokens():
    logits = torch.randn(64, 32000, device="cuda")
    sample_tokens(logits, top_k=50)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out, _ = sample_tokens(logits, top_k=50, errors="mark")
    graph.replay()
    first = out.clone()
    graph.replay()
    top = torch.topk(logits, 50).indices
    for tokens in (first, out):
        assert (top == tokens[:, None]).any(-1).all()
    assert not torch.equal(first, out)
