"""seqgen_fast inside torch.compile: every public module and function compiles with
``fullgraph=True`` (no graph break), in inference and in training, and a loop of 20 steps whose
offsets, seeds, timesteps and cache lengths change compiles at most twice (torch's first compile
and its one automatic-dynamic recompile).

On the CPU the compile backend is ``aot_eager`` (AOTAutograd traces forward and backward; what
inductor would get) behind a counter of compiled frames; ``-m gpu`` runs the same cases on CUDA
with inductor.
"""
import pytest
import torch
from torch._dynamo.testing import CompileCounterWithBackend

import seqgen_fast
from seqgen_fast import functional as F
from seqgen_fast import nn
from seqgen_fast.integrations import flash_attn

STEPS = 20
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _counter(device):
    return CompileCounterWithBackend("aot_eager" if device == "cpu" else "inductor")


def _run(fn, steps, device, train=False):
    """Compile ``fn(step) -> tensor`` with fullgraph; run it ``steps`` times; return the frame count.
    With ``train`` the result's sum is backpropagated each step."""
    counter = _counter(device)
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    torch._dynamo.reset()
    for step in range(steps):
        with torch.set_grad_enabled(train):
            out = compiled(step)
            if train:
                out.float().sum().backward()
    return counter.frame_count


# Each case builds its inputs on `device` and returns fn(step): one step of a loop whose inputs change.
def _lstm(device, train):
    m = nn.LSTM(8, 16, num_layers=2, batch_first=True).to(device)
    xs = torch.randn(STEPS, 3, 5, 8, device=device)
    return lambda step: m(xs[step])[0]


def _lstm_cell(device, train):
    cell = nn.LSTMCell(8, 16).to(device)
    x, state = torch.randn(STEPS, 2, 8, device=device), [torch.zeros(2, 16, device=device)] * 2

    def step(i):
        h, c = cell(x[i], tuple(state))
        state[:] = [h.detach(), c.detach()]
        return h
    return step


def _gru(device, train):
    m = nn.GRU(8, 16, num_layers=2, batch_first=True, bidirectional=True).to(device)
    xs = torch.randn(STEPS, 3, 5, 8, device=device)
    return lambda step: m(xs[step])[0]


def _gru_cell(device, train):
    cell = nn.GRUCell(8, 16).to(device)
    x, h = torch.randn(STEPS, 2, 8, device=device), [torch.zeros(2, 16, device=device)]

    def step(i):
        out = cell(x[i], h[0])
        h[0] = out.detach()  # the next step starts from this state (truncated backpropagation)
        return out
    return step


def _mha(device, train):
    m = nn.MultiheadAttention(16, 2, batch_first=True).to(device)
    x = torch.randn(STEPS, 2, 7, 16, device=device)
    mask = torch.ones(7, 7, dtype=torch.bool, device=device).triu(1)
    return lambda step: m(x[step], x[step], x[step], attn_mask=mask, need_weights=False)[0]


def _sdpa(device, train):
    q = torch.randn(STEPS, 2, 4, 9, 16, device=device, requires_grad=train)
    return lambda step: F.scaled_dot_product_attention(q[step], q[step], q[step], is_causal=True)


def _flash_varlen(device, train):
    q = torch.randn(12, 4, 16, device=device, requires_grad=train)
    # one tensor of offsets per step (indexing a Python list by the step would specialise on it)
    cus = torch.tensor([[0, 1 + s % 11, 12] for s in range(STEPS)], dtype=torch.int32, device=device)
    return lambda step: F.flash_attention(q, q, q, causal=True, cu_seqlens_q=cus[step], cu_seqlens_k=cus[step],
                                          max_seqlen_q=12, max_seqlen_k=12)


def _decode(device, train):
    q = torch.randn(2, 4, 16, device=device)
    k, v = torch.randn(2, 32, 2, 16, device=device), torch.randn(2, 32, 2, 16, device=device)
    new = torch.randn(STEPS, 2, 2, 16, device=device)

    def step(i):
        lens = torch.full((2,), i, dtype=torch.int32, device=device)
        return F.decode_attention(q, k, v, lens, k_new=new[i], v_new=new[i])
    return step


def _sample(device, train):
    # the default generator: dynamo cannot trace a torch.Generator argument (torch.multinomial's neither)
    logits = torch.randn(4, 50, device=device)
    return lambda step: F.sample_tokens(logits, top_k=5, top_p=0.9, errors="mark")[0]


def _rotary(device, train):
    q = torch.randn(STEPS, 2, 7, 4, 16, device=device, requires_grad=train)
    k = torch.randn(2, 7, 2, 16, device=device)
    angle = torch.arange(40, device=device)[:, None] * torch.rand(8, device=device)[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)
    pos = torch.arange(7, device=device) + torch.arange(STEPS, device=device)[:, None]  # the positions move on
    return lambda step: F.rotary_embedding(q[step], k, cos, sin, position_ids=pos[step])[0]


# seqgen_fast.integrations.flash_attn: flash-attn's functions, each over inputs that change per step
def _fa_dense(device, train):
    q = torch.randn(STEPS, 2, 9, 4, 16, device=device, requires_grad=train)
    return lambda step: flash_attn.flash_attn_func(q[step], q[step], q[step], causal=True)


def _fa_qkvpacked(device, train):
    qkv = torch.randn(STEPS, 2, 9, 3, 4, 16, device=device, requires_grad=train)
    return lambda step: flash_attn.flash_attn_qkvpacked_func(qkv[step], causal=True)


def _fa_kvpacked(device, train):
    q = torch.randn(STEPS, 2, 9, 4, 16, device=device, requires_grad=train)
    kv = torch.randn(2, 11, 2, 2, 16, device=device)
    return lambda step: flash_attn.flash_attn_kvpacked_func(q[step], kv)


def _offsets(device):
    return torch.tensor([[0, 1 + s % 11, 12] for s in range(STEPS)], dtype=torch.int32, device=device)


def _fa_varlen(device, train):
    q, cus = torch.randn(12, 4, 16, device=device, requires_grad=train), _offsets(device)
    return lambda step: flash_attn.flash_attn_varlen_func(q, q, q, cus[step], cus[step], 12, 12, causal=True)


def _fa_varlen_qkvpacked(device, train):
    qkv, cus = torch.randn(12, 3, 4, 16, device=device, requires_grad=train), _offsets(device)
    return lambda step: flash_attn.flash_attn_varlen_qkvpacked_func(qkv, cus[step], 12, causal=True)


def _fa_varlen_kvpacked(device, train):
    q, kv, cus = torch.randn(12, 4, 16, device=device, requires_grad=train), torch.randn(12, 2, 2, 16, device=device), \
        _offsets(device)
    return lambda step: flash_attn.flash_attn_varlen_kvpacked_func(q, kv, cus[step], cus[step], 12, 12)


def _kvcache_paged(device, train):
    """flash_attn_with_kvcache over a paged cache: one new token appended per step, the lengths growing."""
    q, new = torch.randn(STEPS, 2, 1, 4, 16, device=device), torch.randn(STEPS, 2, 1, 2, 16, device=device)
    k_cache, v_cache = torch.randn(12, 8, 2, 16, device=device), torch.randn(12, 8, 2, 16, device=device)
    table = torch.randperm(12, device=device, dtype=torch.int32)[:8].reshape(2, 4)
    lens = torch.tensor([[s, 2 * s % 31] for s in range(STEPS)], dtype=torch.int32, device=device)
    return lambda step: flash_attn.flash_attn_with_kvcache(q[step], k_cache, v_cache, new[step], new[step],
                                                           cache_seqlens=lens[step], block_table=table, causal=True)


CASES = {"lstm": _lstm, "lstm_cell": _lstm_cell, "gru": _gru, "gru_cell": _gru_cell, "mha": _mha, "sdpa": _sdpa,
         "flash_varlen": _flash_varlen, "decode": _decode, "sample_tokens": _sample, "rotary_embedding": _rotary,
         "flash_attn_func": _fa_dense, "flash_attn_qkvpacked_func": _fa_qkvpacked,
         "flash_attn_kvpacked_func": _fa_kvpacked, "flash_attn_varlen_func": _fa_varlen,
         "flash_attn_varlen_qkvpacked_func": _fa_varlen_qkvpacked,
         "flash_attn_varlen_kvpacked_func": _fa_varlen_kvpacked, "flash_attn_with_kvcache paged": _kvcache_paged}
TRAINABLE = {"lstm", "lstm_cell", "gru", "gru_cell", "mha", "sdpa", "flash_varlen", "rotary_embedding",
             "flash_attn_func", "flash_attn_qkvpacked_func", "flash_attn_kvpacked_func", "flash_attn_varlen_func",
             "flash_attn_varlen_qkvpacked_func", "flash_attn_varlen_kvpacked_func"}


def _available(name):
    if name.startswith("gru") and "GRU" not in nn.__all__:
        pytest.skip("seqgen_fast.nn has no GRU")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("name", sorted(CASES))
def test_compiles_fullgraph_without_recompiling(name, train, device):
    if train and name not in TRAINABLE:
        pytest.skip(f"{name} is an inference op")
    _available(name)
    frames = _run(CASES[name](device, train), STEPS, device, train=train)
    assert frames <= 2, f"{name}: {frames} compiled frames over {STEPS} steps"


def test_the_backend_choice_is_made_at_trace_time_and_honours_forcing():
    q = torch.randn(1, 2, 5, 8)
    with seqgen_fast.use_backend("reference"):
        got = torch.compile(lambda x: F.scaled_dot_product_attention(x, x, x), fullgraph=True, backend="aot_eager")(q)
    torch.testing.assert_close(got, torch.nn.functional.scaled_dot_product_attention(q, q, q))


SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
              "FlowMatchEulerDiscreteScheduler"]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_fused_scheduler_step_compiles_fullgraph_without_recompiling(cls, device):
    diffusers = pytest.importorskip("diffusers")
    from seqgen_fast.diffusion import fast_scheduler

    fs = fast_scheduler(getattr(diffusers, cls)())
    fs.set_timesteps(STEPS, device=device)
    x = torch.randn(2, 4, 5, 3, device=device)
    mo = torch.randn(STEPS, 2, 4, 5, 3, device=device)
    frames = _run(lambda step: fs.step(mo[step], fs.timesteps[step], x).prev_sample, STEPS, device)
    assert frames <= 2, f"{cls}: {frames} compiled frames over {STEPS} steps"
