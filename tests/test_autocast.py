"""seqgen_fast under ``torch.autocast``: every public module and function casts as the torch op it
replaces (torch's lists in ``aten/src/ATen/autocast_mode.cpp``; the rules, per op, in
``seqgen_fast.ops._library``), eagerly and inside ``torch.compile(fullgraph=True)``.

Each case runs ours and torch's under the same autocast region on the same inputs. The result dtypes
must be equal, and ours must be as close to a float64 run of torch's op as torch's own result is
(flash-attn's rule: at most twice torch's error, plus ``SLACK`` for float32 results, where both
errors are float32 rounding). On the CPU: bfloat16 and float16 autocast (torch's CPU autocast takes both);
``-m gpu``: the same cases under CUDA autocast.
"""
import copy
import warnings

import pytest
import torch
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils._pytree import tree_leaves

from seqgen_fast import functional as F
from seqgen_fast import nn
from support.utils import rel_err

GPU = pytest.mark.gpu
DTYPES = [torch.bfloat16, torch.float16]
SLACK = 1e-5


def _leaves(out):
    """The tensors of an output (tuples, lists, PackedSequence) in order; None left out."""
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor)]


def _double(value):
    if isinstance(value, torch.Tensor):
        return value.double() if value.is_floating_point() else value
    if isinstance(value, tuple) and hasattr(value, "_fields"):  # PackedSequence
        return type(value)(*map(_double, value))
    if isinstance(value, (tuple, list)):
        return type(value)(map(_double, value))
    return value


def _module(make, ours_cls, *inputs):
    """A case of a module: ours shares the parameters of torch's; the reference is torch's in float64."""
    theirs = make()
    return ours_cls.from_torch(theirs), theirs, copy.deepcopy(theirs).double(), inputs


def _function(ours, theirs, *inputs):
    return ours, theirs, theirs, inputs


def _no_autocast(fn):
    """``fn`` run with autocast off: the rule of ops torch does not autocast (inputs' dtypes)."""
    def run(*args):
        with torch.autocast("cpu", enabled=False), torch.autocast("cuda", enabled=False):
            return fn(*args)
    return run


# Each case: device -> (ours, theirs, reference, inputs); ours(*inputs) vs theirs(*inputs) under autocast.
def _lstm(d):
    return _module(lambda: torch.nn.LSTM(8, 16, num_layers=2, batch_first=True, bidirectional=True, device=d),
                   nn.LSTM, torch.randn(3, 7, 8, device=d))


def _lstm_packed(d):
    x = pack_padded_sequence(torch.randn(7, 3, 8, device=d), torch.tensor([7, 5, 2]))
    return _module(lambda: torch.nn.LSTM(8, 16, device=d), nn.LSTM, x)


def _lstm_cell(d):
    state = (torch.randn(3, 16, device=d), torch.randn(3, 16, device=d))
    return _module(lambda: torch.nn.LSTMCell(8, 16, device=d), nn.LSTMCell, torch.randn(3, 8, device=d), state)


def _gru(d):
    return _module(lambda: torch.nn.GRU(8, 16, num_layers=2, bidirectional=True, device=d), nn.GRU,
                   torch.randn(7, 3, 8, device=d))


def _gru_cell(d):
    return _module(lambda: torch.nn.GRUCell(8, 16, device=d), nn.GRUCell, torch.randn(3, 8, device=d),
                   torch.randn(3, 16, device=d))


class _Attend(torch.nn.Module):
    """``m(x, x, x, attn_mask=causal, need_weights=...)``: torch's MultiheadAttention call as a module."""

    def __init__(self, m, need_weights):
        super().__init__()
        self.m, self.need_weights = m, need_weights

    def forward(self, x, mask):
        return self.m(x, x, x, attn_mask=mask, need_weights=self.need_weights)


def _mha(d, need_weights=False):
    theirs = torch.nn.MultiheadAttention(16, 2, batch_first=True, device=d)
    mask = torch.ones(7, 7, dtype=torch.bool, device=d).triu(1)
    ours = nn.MultiheadAttention.from_torch(theirs)
    return (_Attend(ours, need_weights), _Attend(theirs, need_weights),
            _Attend(copy.deepcopy(theirs).double(), need_weights), (torch.randn(2, 7, 16, device=d), mask))


def _sdpa(d):
    q, k, v = (torch.randn(2, 3, 9, 16, device=d) for _ in range(3))
    bias = torch.randn(9, 9, device=d)
    return _function(F.scaled_dot_product_attention, torch.nn.functional.scaled_dot_product_attention, q, k, v, bias)


def _flash(d):
    q, k, v = (torch.randn(2, 9, 4, 16, device=d) for _ in range(3))

    def theirs(q, k, v):  # torch's op on the (B, H, L, E) layout; causal with L == S is the same corner
        out = torch.nn.functional.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v)), is_causal=True)
        return out.transpose(1, 2)
    return _function(lambda q, k, v: F.flash_attention(q, k, v, causal=True), theirs, q, k, v)


def _decode(d):
    """flash_attn_with_kvcache (what decode_attention replaces) is not autocast: q's dtype decides."""
    q, k, v = torch.randn(3, 4, 16, device=d), torch.randn(3, 11, 2, 16, device=d), torch.randn(3, 11, 2, 16, device=d)
    lens = torch.tensor([11, 4, 1], dtype=torch.int32, device=d)

    def theirs(q, k, v, lens):
        valid = torch.arange(k.shape[1], device=k.device)[None, :] < lens[:, None]  # (B, S)
        kk, vv = (t.repeat_interleave(2, dim=2).transpose(1, 2) for t in (k, v))  # (B, H, S, E)
        mask = valid[:, None, None, :]
        return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], kk, vv, attn_mask=mask)[:, :, 0]
    return _function(F.decode_attention, _no_autocast(theirs), q, k, v, lens)


def _rotary(d):
    """transformers' apply_rotary_pos_emb (elementwise: not autocast) is what rotary_embedding replaces."""
    q, k = torch.randn(2, 7, 4, 16, device=d), torch.randn(2, 7, 2, 16, device=d)
    angle = torch.arange(7, device=d)[:, None] * torch.rand(8, device=d)[None, :]
    cos, sin = torch.cat([angle.cos()] * 2, -1), torch.cat([angle.sin()] * 2, -1)

    def theirs(q, k, cos, sin):
        def rot(x):
            half = x.shape[-1] // 2
            return torch.cat([-x[..., half:], x[..., :half]], -1)
        c, s = cos[None, :, None], sin[None, :, None]
        return q * c + rot(q) * s, k * c + rot(k) * s
    return _function(F.rotary_embedding, theirs, q, k, cos, sin)


def _sample(d):
    """top_k=1 draws the maximum: torch.argmax (int64 under any autocast)."""
    return _function(lambda x: F.sample_tokens(x, top_k=1), lambda x: torch.argmax(x, -1), torch.randn(5, 97, device=d))


CASES = {"LSTM": _lstm, "LSTM packed": _lstm_packed, "LSTMCell": _lstm_cell, "GRU": _gru, "GRUCell": _gru_cell,
         "MultiheadAttention": _mha, "MultiheadAttention need_weights": lambda d: _mha(d, need_weights=True),
         "scaled_dot_product_attention": _sdpa, "flash_attention": _flash, "decode_attention": _decode,
         "rotary_embedding": _rotary, "sample_tokens": _sample}
COMPILED = ["LSTM", "GRUCell", "MultiheadAttention", "scaled_dot_product_attention", "flash_attention"]


def _check(name, device, dtype, compile_=False):
    torch.manual_seed(0)
    ours, theirs, ref, inputs = CASES[name](device)
    if compile_:
        torch._dynamo.reset()
        ours = torch.compile(ours, backend="aot_eager", fullgraph=True)
    with torch.no_grad():
        want = _leaves(ref(*_double(inputs)))
        with torch.autocast(device, dtype=dtype):
            got, theirs_out = _leaves(ours(*inputs)), _leaves(theirs(*inputs))
    assert [t.dtype for t in got] == [t.dtype for t in theirs_out], f"{name}: result dtypes differ from torch's"
    for i, (a, b, r) in enumerate(zip(got, theirs_out, want)):
        if not a.is_floating_point():
            assert torch.equal(a, b), f"{name} output {i}: differs from torch's"
            continue
        bound = 2 * rel_err(b, r) + SLACK
        err = rel_err(a, r)
        assert err <= bound, f"{name} output {i} ({a.dtype}): error {err:.2e} vs float64 > {bound:.2e} (2x torch's)"


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_cpu_autocast_casts_as_torch(name, dtype):
    _check(name, "cpu", dtype)


@pytest.mark.parametrize("name", COMPILED)
def test_cpu_autocast_inside_compile(name):
    _check(name, "cpu", torch.bfloat16, compile_=True)


@GPU
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", sorted(CASES))
def test_gpu_autocast_casts_as_torch(name, dtype):
    _check(name, "cuda", dtype)


@GPU
@pytest.mark.smoke
@pytest.mark.parametrize("name", COMPILED)
def test_gpu_autocast_inside_compile(name):
    _check(name, "cuda", torch.float16, compile_=True)


def test_training_under_autocast_gives_torch_grad_dtypes():
    """The backward of a swapped LSTM under autocast: the parameters' gradients in their own dtype."""
    torch.manual_seed(0)
    ours, theirs, _, (x,) = _lstm("cpu")
    for m in (ours, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = m(x)[0]
        out.float().square().sum().backward()
    for (name, a), b in zip(ours.named_parameters(), theirs.parameters()):
        assert a.grad.dtype == b.grad.dtype == torch.float32, name


# ----------------------------------------------------------------------------------------------
# Fused scheduler steps: diffusers' steps are elementwise (not autocast): the model output's and
# the sample's dtypes decide, under autocast as outside it
# ----------------------------------------------------------------------------------------------
SCHEDULERS = ["DDPMScheduler", "DDIMScheduler", "EulerDiscreteScheduler", "EulerAncestralDiscreteScheduler",
              "DPMSolverMultistepScheduler", "UniPCMultistepScheduler", "LCMScheduler",
              "FlowMatchEulerDiscreteScheduler"]


def _scheduler_steps(cls, device, dtype):
    diffusers = pytest.importorskip("diffusers")
    from seqgen_fast.diffusion import fast_scheduler

    theirs = getattr(diffusers, cls)()
    ours = fast_scheduler(getattr(diffusers, cls)())
    for s in (theirs, ours):
        s.set_timesteps(4)
    x = 3 * torch.randn(2, 4, 5, 3, device=device)
    for i, t in enumerate(theirs.timesteps[:3]):
        mo = torch.randn_like(x)
        kw = {}
        if "generator" in theirs.step.__code__.co_varnames:
            kw = {"generator": torch.Generator(device).manual_seed(i)}
        with torch.autocast(device, dtype=dtype), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            a = theirs.step(mo, t, x, **kw).prev_sample
            if kw:
                kw["generator"].manual_seed(i)
            b = ours.step(mo, t, x, **kw).prev_sample
        assert b.dtype == a.dtype, f"{cls} step {i}: dtype {b.dtype} != diffusers' {a.dtype}"
        err = rel_err(b, a)
        assert err <= 2e-5, f"{cls} step {i}: relative difference {err:.2e} from diffusers' step"
        x = a


@pytest.mark.parametrize("cls", SCHEDULERS)
def test_cpu_autocast_keeps_fused_scheduler_steps_in_their_dtype(cls):
    _scheduler_steps(cls, "cpu", torch.bfloat16)


@GPU
@pytest.mark.parametrize("cls", SCHEDULERS)
def test_gpu_autocast_keeps_fused_scheduler_steps_in_their_dtype(cls):
    _scheduler_steps(cls, "cuda", torch.float16)


# ----------------------------------------------------------------------------------------------
# The registration itself (seqgen_fast.ops._library): the ops called directly under autocast
# ----------------------------------------------------------------------------------------------
def test_ops_called_directly_cast_by_their_registered_rule(monkeypatch):
    from seqgen_fast.ops import attention as attention_ops
    from seqgen_fast.ops import lstm as lstm_ops

    q, k, v = (torch.randn(1, 2, 7, 16) for _ in range(3))
    slopes = torch.rand(1, 2)
    seen = {}
    real = attention_ops.ATTN.impls["reference"].fn

    def spy(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, tune):
        seen.update(q=q.dtype, alibi=feat.alibi.dtype, autocast=torch.is_autocast_enabled("cpu"))
        return real(q, k, v, mask, cu_q, cu_k, max_q, max_k, scale, causal, feat, tune)

    monkeypatch.setattr(attention_ops.ATTN.impls["reference"], "fn", spy)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, lse = torch.ops.seqgen_fast.attention_fwd(q, k, v, None, None, None, slopes, None, 0, 0, 0.25, 0, -1, -1,
                                                       0.0, 0.0, False, "reference", False)
    # scaled_dot_product_attention's rule; alibi stays float32 (its contract); the body runs without autocast
    assert seen == {"q": torch.bfloat16, "alibi": torch.float32, "autocast": False}
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    x, h, c = torch.randn(3, 8), torch.randn(3, 16), torch.randn(3, 16)
    w_ih, w_hh = torch.randn(64, 8), torch.randn(64, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # lstm_cell is on CUDA's autocast list only
        h1, c1 = torch.ops.seqgen_fast.lstm_cell_step(x, h, c, w_ih, w_hh, None, None, "reference")
    assert h1.dtype == c1.dtype == torch.float32
    assert lstm_ops.SEQ_AUTOCAST == {"cpu": "lower_precision_fp", "cuda": torch.float16}


def test_flash_attention_keeps_alibi_slopes_float32_under_autocast():
    """flash-attn's contract: alibi_slopes is float32 whatever q's dtype; autocast casts q, k, v only."""
    q = torch.randn(2, 9, 4, 16)
    slopes = torch.rand(4)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = F.flash_attention(q, q, q, causal=True, alibi_slopes=slopes)
    want = F.flash_attention(q.bfloat16(), q.bfloat16(), q.bfloat16(), causal=True, alibi_slopes=slopes)
    assert out.dtype == torch.bfloat16
    assert torch.equal(out, want)


def test_a_mutating_op_cannot_take_a_casting_rule():
    from seqgen_fast.ops._library import LOWER, custom_op

    with pytest.raises(ValueError, match="mutates its arguments cannot cast"):
        custom_op("never_defined", mutates_args=("x",), autocast={"cpu": LOWER})


@pytest.mark.smoke
def test_autocast_entered_inside_the_compiled_function():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 9, 16)

    def fn(q):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return F.scaled_dot_product_attention(q, q, q, is_causal=True)

    torch._dynamo.reset()
    got = torch.compile(fn, backend="aot_eager", fullgraph=True)(q)
    want = fn(q)
    assert got.dtype == want.dtype == torch.bfloat16
    assert torch.equal(got, want)
