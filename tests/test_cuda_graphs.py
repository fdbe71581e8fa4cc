"""CUDA graphs: every op is capturable with ``torch.cuda.graph`` and replays correctly after its inputs
change in place (compared with an eager call on the new inputs), with no allocation outside the
graph's pool, no host sync and no autotuning inside the captured region; and
``torch.compile(mode="reduce-overhead")`` of an LSTM generator gives the tokens of eager mode (the
Llama-style decoder with ``attn_implementation="seqgen_fast"`` under reduce-overhead is
``tests/test_transformers.py::test_gpu_static_cache_reduce_overhead_matches_sdpa``).

On the CPU: the guards that keep host reads out of traced and captured code refuse as documented.
"""
import contextlib
import types

import pytest
import torch
from torch.utils._pytree import tree_leaves

from seqgen_fast import _debug, debug_checks, nn
from seqgen_fast import functional as F
from seqgen_fast.kernels import _tuning
from seqgen_fast.ops import attention as attention_ops
from support.utils import TOL, assert_close_rel

GPU = pytest.mark.gpu
CUDA_LIKE = types.SimpleNamespace(device=torch.device("cuda"))  # what the guards read of a CUDA tensor


# ----------------------------------------------------------------------------------------------
# CPU: the guards
# ----------------------------------------------------------------------------------------------
def test_host_reads_are_refused_while_compiling_and_capturing(monkeypatch):
    cpu = torch.zeros(3)
    capturing = [False]
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    assert _debug.host_reads_allowed(cpu) and _debug.host_reads_allowed(CUDA_LIKE)
    capturing[0] = True
    assert not _debug.host_reads_allowed(CUDA_LIKE)
    assert _debug.host_reads_allowed(cpu)  # a capture on the CUDA stream does not concern CPU tensors
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    assert not _debug.host_reads_allowed(cpu)


def test_varlen_offsets_are_checked_under_debug_checks_and_skipped_where_no_host_read_is_possible(monkeypatch):
    q = torch.randn(6, 2, 8)
    bad = torch.tensor([0, 4, 3, 6], dtype=torch.int32)  # decreasing: not prefix sums
    kw = {"cu_seqlens_q": bad, "cu_seqlens_k": bad, "max_seqlen_q": 4, "max_seqlen_k": 4}
    out = F.flash_attention(q, q, q, **kw)  # by default no host read: the kernels clamp every offset
    assert out.shape == q.shape
    with debug_checks():
        with pytest.raises(ValueError, match="cu_seqlens_q must be prefix sums"):
            F.flash_attention(q, q, q, **kw)
        monkeypatch.setattr(attention_ops._debug, "host_reads_allowed", lambda t: False)
        out = F.flash_attention(q, q, q, **kw)  # skipped where no host read is possible
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="give max_seqlen_q under torch.compile and CUDA-graph capture"):
        F.flash_attention(q, q, q, cu_seqlens_q=bad, cu_seqlens_k=bad)


def test_varlen_without_max_seqlen_under_fullgraph_compile_names_the_argument():
    q = torch.randn(6, 2, 8)
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    fn = torch.compile(lambda q, cu: F.flash_attention(q, q, q, cu_seqlens_q=cu, cu_seqlens_k=cu), fullgraph=True,
                       backend="aot_eager")
    torch._dynamo.reset()
    with pytest.raises(Exception, match="give max_seqlen_q"):
        fn(q, cu)


def test_no_autotuning_while_capturing(monkeypatch):
    capturing = [False]
    monkeypatch.setattr(_tuning, "interpret_mode", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: capturing[0])
    cuda = torch.device("cuda")
    assert _tuning.tuning_allowed(cuda, True)
    assert not _tuning.tuning_allowed(cuda, False)  # traced by torch.compile: the caller passes tune=False
    capturing[0] = True
    assert not _tuning.tuning_allowed(cuda, True)


# ----------------------------------------------------------------------------------------------
# GPU: capture, change the inputs in place, replay, compare with eager
# ----------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _no_tuning_or_sync(monkeypatch):
    """Inside: a benchmark of the tuner fails the test, and so does any synchronizing CUDA call."""
    def refuse(self, key, run):
        raise AssertionError(f"{self.kernel}: autotuning inside a CUDA-graph capture (key {key})")

    monkeypatch.setattr(_tuning.Tuner, "_benchmark", refuse)
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode("default")
        monkeypatch.undo()


def _tensors(out):
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _capture_and_replay(monkeypatch, fn, inputs, refresh, tol):
    """Warm ``fn(*inputs)`` up eagerly (compiled kernels, tuned configs, plan caches), capture one call,
    ``refresh(inputs)`` in place, replay, and compare the graph's outputs with an eager call."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn(*inputs)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph), _no_tuning_or_sync(monkeypatch):
        static = _tensors(fn(*inputs))
    for _ in range(2):  # a changed input is read by the replay; the replay allocates nothing
        with torch.no_grad():
            refresh(inputs)
        before = [t.clone() for t in static]
        allocated = torch.cuda.memory_allocated()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.cuda.memory_allocated() == allocated, "the replay allocated memory"
        want = _tensors(fn(*inputs))
        assert any(not torch.equal(a, b) for a, b in zip(static, before)), "the replay did not recompute"
        for i, (got, ref) in enumerate(zip(static, want)):
            if got.is_floating_point():
                assert_close_rel(got.float(), ref.float(), tol, f"output {i} after replay")
            else:
                assert torch.equal(got, ref), f"output {i} after replay"


def _randn_(*tensors):
    def refresh(inputs):
        for t in tensors:
            t.copy_(torch.randn_like(t))
    return refresh


def _sdpa():
    q, k, v = (torch.randn(2, 4, 97, 64, device="cuda", dtype=torch.float16) for _ in range(3))
    return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True), (q, k, v), _randn_(q, k, v)


def _flash_backward():
    q, k, v = (torch.randn(2, 97, 4, 64, device="cuda", dtype=torch.float16, requires_grad=True) for _ in range(3))
    dout = torch.randn(2, 97, 4, 64, device="cuda", dtype=torch.float16)

    def fn(q, k, v, dout):
        out = F.flash_attention(q, k, v, causal=True)
        return (out, *torch.autograd.grad(out, (q, k, v), dout))
    return fn, (q, k, v, dout), _randn_(q, k, v, dout)


def _flash_varlen():
    q = torch.randn(97, 4, 64, device="cuda", dtype=torch.float16)
    cu = torch.tensor([0, 30, 97], dtype=torch.int32, device="cuda")

    def refresh(inputs):
        _randn_(q)(inputs)
        cu[1] = int(torch.randint(1, 96, ()))  # new lengths, the same packed rows (max_seqlen bounds them)
    return (lambda q, cu: F.flash_attention(q, q, q, causal=True, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=97,
                                            max_seqlen_k=97)), (q, cu), refresh


def _decode_append():
    q = torch.randn(3, 8, 64, device="cuda", dtype=torch.float16)
    k_cache, v_cache = (torch.randn(3, 128, 2, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    k_new, v_new = (torch.randn(3, 2, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    lens = torch.tensor([5, 77, 0], dtype=torch.int32, device="cuda")

    def refresh(inputs):
        _randn_(q, k_new, v_new)(inputs)
        lens.copy_(torch.randint(0, 127, (3,), dtype=torch.int32, device="cuda"))
    return (lambda *a: F.decode_attention(*a[:4], k_new=a[4], v_new=a[5])), (q, k_cache, v_cache, lens, k_new, v_new), \
        refresh


def _kvcache_paged():
    from seqgen_fast.integrations.flash_attn import flash_attn_with_kvcache

    q = torch.randn(2, 1, 8, 64, device="cuda", dtype=torch.float16)
    k_cache, v_cache = (torch.randn(12, 16, 2, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    k, v = (torch.randn(2, 1, 2, 64, device="cuda", dtype=torch.float16) for _ in range(2))
    table = torch.randperm(12, device="cuda", dtype=torch.int32)[:8].reshape(2, 4)
    lens = torch.tensor([3, 40], dtype=torch.int32, device="cuda")

    def refresh(inputs):
        _randn_(q, k, v)(inputs)
        lens.copy_(torch.randint(0, 63, (2,), dtype=torch.int32, device="cuda"))
        table.copy_(torch.randperm(12, device="cuda", dtype=torch.int32)[:8].reshape(2, 4))
    return (lambda q, kc, vc, k, v, lens, table: flash_attn_with_kvcache(q, kc, vc, k, v, cache_seqlens=lens,
                                                                        block_table=table, causal=True)), \
        (q, k_cache, v_cache, k, v, lens, table), refresh


def _rotary():
    q, k = torch.randn(2, 33, 4, 64, device="cuda", dtype=torch.float16), torch.randn(2, 33, 2, 64, device="cuda",
                                                                                       dtype=torch.float16)
    angle = torch.arange(128, device="cuda")[:, None] * torch.rand(32, device="cuda")[None, :]
    cos, sin = (torch.cat([f(angle)] * 2, -1).half() for f in (torch.cos, torch.sin))
    pos = torch.randint(0, 128, (2, 33), device="cuda")

    def refresh(inputs):
        _randn_(q, k)(inputs)
        pos.copy_(torch.randint(0, 128, (2, 33), device="cuda"))
    return (lambda q, k, pos: F.rotary_embedding(q, k, cos, sin, position_ids=pos)), (q, k, pos), refresh


def _sample_greedy():
    logits = torch.randn(64, 32000, device="cuda", dtype=torch.float16)
    return (lambda x: F.sample_tokens(x, top_k=1, errors="mark")), (logits,), _randn_(logits)


def _module(m, *inputs):
    return (lambda *a: m(*a)), inputs, _randn_(*inputs)


def _lstm():
    m = nn.LSTM(64, 128, num_layers=2, batch_first=True, device="cuda", dtype=torch.float16)
    x = torch.randn(4, 33, 64, device="cuda", dtype=torch.float16)
    state = tuple(torch.randn(2, 4, 128, device="cuda", dtype=torch.float16) for _ in range(2))
    return (lambda x, h, c: m(x, (h, c))), (x, *state), _randn_(x, *state)


def _gru():
    m = nn.GRU(64, 128, num_layers=2, device="cuda", dtype=torch.float16)
    return _module(m, torch.randn(33, 4, 64, device="cuda", dtype=torch.float16),
                   torch.randn(2, 4, 128, device="cuda", dtype=torch.float16))


def _lstm_cell():
    m = nn.LSTMCell(64, 128, device="cuda", dtype=torch.float16)
    x, h, c = (torch.randn(4, n, device="cuda", dtype=torch.float16) for n in (64, 128, 128))
    return (lambda x, h, c: m(x, (h, c))), (x, h, c), _randn_(x, h, c)


def _gru_cell():
    m = nn.GRUCell(64, 128, device="cuda", dtype=torch.float16)
    return _module(m, torch.randn(4, 64, device="cuda", dtype=torch.float16),
                   torch.randn(4, 128, device="cuda", dtype=torch.float16))


def _mha():
    m = nn.MultiheadAttention(128, 4, batch_first=True, device="cuda", dtype=torch.float16)
    x = torch.randn(2, 33, 128, device="cuda", dtype=torch.float16)
    mask = torch.ones(33, 33, dtype=torch.bool, device="cuda").triu(1)
    return (lambda x: m(x, x, x, need_weights=False, attn_mask=mask)[0]), (x,), _randn_(x)


CASES = {"scaled_dot_product_attention": _sdpa, "flash_attention fwd+bwd": _flash_backward,
         "flash_attention varlen": _flash_varlen, "decode_attention append": _decode_append,
         "flash_attn_with_kvcache paged": _kvcache_paged, "rotary_embedding": _rotary,
         "sample_tokens": _sample_greedy, "LSTM": _lstm, "GRU": _gru, "LSTMCell": _lstm_cell, "GRUCell": _gru_cell,
         "MultiheadAttention": _mha}


@GPU
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_op_is_capturable_and_replays_on_changed_inputs(name, monkeypatch):
    torch.manual_seed(0)
    fn, inputs, refresh = CASES[name]()
    grad = torch.enable_grad() if name.endswith("bwd") else torch.no_grad()
    with grad:
        _capture_and_replay(monkeypatch, fn, inputs, refresh, TOL[torch.float16])


SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
              "FlowMatchEulerDiscreteScheduler"]


@GPU
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_gpu_captured_scheduler_loop_replays_on_new_latents(cls):
    """Every kind of fused scheduler step inside a captured sampling loop (``diffusion.sample``,
    ``cuda_graph=True``): a replay on new latents gives the eager loop started at the same noise
    offset (in-kernel Philox; tests/test_diffusion_cuda.py covers guidance and the offsets)."""
    diffusers = pytest.importorskip("diffusers")
    from seqgen_fast.diffusion import fast_scheduler, sample

    weight = torch.randn(4, 4, device="cuda") / 4

    def model_fn(x, t):
        return torch.einsum("bchw,cd->bdhw", x, weight) + 1e-3 * t.float()

    fs = fast_scheduler(getattr(diffusers, cls)(), seed=7)
    sample(model_fn, fs, torch.randn(2, 4, 8, 8, device="cuda"), num_inference_steps=6, cuda_graph=True)  # + capture
    latents, start = torch.randn(2, 4, 8, 8, device="cuda"), fs.offset
    got = sample(model_fn, fs, latents, num_inference_steps=6, cuda_graph=True)  # a replay
    fs.offset = start
    want = sample(model_fn, fs, latents, num_inference_steps=6)
    assert_close_rel(got, want, 1e-5, f"{cls}: replay of the captured loop vs eager")


# ----------------------------------------------------------------------------------------------
# torch.compile(mode="reduce-overhead"): inductor + CUDA graphs
# ----------------------------------------------------------------------------------------------
class _CharLSTM(torch.nn.Module):
    """examples/char_lstm.py's model: embedding -> LSTM -> linear head; one step returns the next token."""

    def __init__(self, vocab=97, hidden=128):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 64)
        self.lstm = nn.LSTM(64, hidden, 2, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, token, h, c):
        out, (h, c) = self.lstm(self.embed(token), (h, c))
        return F.sample_tokens(self.head(out[:, -1]), temperature=0), h, c


def _generate(step, token, h, c, n, mark_steps):
    tokens = []
    for _ in range(n):
        if mark_steps:
            torch.compiler.cudagraph_mark_step_begin()
        token, h, c = step(token[:, None], h, c)
        token, h, c = token.clone(), h.clone(), c.clone()  # the graph's outputs are overwritten next replay
        tokens.append(token)
    return torch.stack(tokens, 1)


@GPU
@pytest.mark.smoke
def test_gpu_reduce_overhead_lstm_generator_gives_eager_tokens():
    torch.manual_seed(0)
    model = _CharLSTM().cuda().eval()
    token = torch.randint(0, 97, (4,), device="cuda")
    h = c = torch.zeros(2, 4, 128, device="cuda")
    with torch.no_grad():
        want = _generate(model, token, h, c, 24, mark_steps=False)
        torch._dynamo.reset()
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        got = _generate(compiled, token, h, c, 24, mark_steps=True)
    assert torch.equal(got, want)
