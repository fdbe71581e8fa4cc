"""seqgen_fast.integrations.flash_attn: flash-attn 2.x's interface on our kernels.

CPU: the signatures are flash-attn's; every feature (sliding window with causal, softcap, ALiBi of
both shapes, dropout, lse, GQA, float32, the packed and varlen entry points, the Hopper lowering)
runs the Triton kernels under the interpreter against the float64 reference with flash-attn's rule
(our error <= 2x plain PyTorch's in the same dtype); dropout is reproducible from the seed and the
backward regenerates its mask; deterministic backward is bit-identical; bad input raises naming the
argument. GPU (-m gpu): the same features compiled, bit-identical deterministic gradients, no
tuning inside a CUDA-graph capture, and sliding-window time following the window.
"""
import inspect

import pytest
import torch

from seqgen_fast import debug_checks, use_backend
from seqgen_fast.integrations import flash_attn as fa
from seqgen_fast.ops import attention as ops
from seqgen_fast.reference import attention as reference
from seqgen_fast.reference.attention import BOTTOM_RIGHT, NONE, Features
from support.utils import assert_close_rel, poison, rel_err

F64 = torch.float64
COMMON = [("dropout_p", 0.0), ("softmax_scale", None), ("causal", False), ("window_size", (-1, -1)),
          ("softcap", 0.0), ("alibi_slopes", None), ("deterministic", False), ("return_attn_probs", False)]
SIGNATURES = {  # flash-attn 2.x, flash_attn/flash_attn_interface.py
    "flash_attn_func": ["q", "k", "v"],
    "flash_attn_qkvpacked_func": ["qkv"],
    "flash_attn_kvpacked_func": ["q", "kv"],
    "flash_attn_varlen_func": ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
    "flash_attn_varlen_qkvpacked_func": ["qkv", "cu_seqlens", "max_seqlen"],
    "flash_attn_varlen_kvpacked_func": ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k"],
}


@pytest.mark.parametrize("name", list(SIGNATURES))
def test_signatures_are_flash_attns(name):
    params = list(inspect.signature(getattr(fa, name)).parameters.values())
    required = SIGNATURES[name]
    assert [p.name for p in params[:len(required)]] == required
    assert all(p.default is inspect.Parameter.empty for p in params[:len(required)])
    rest = [(p.name, p.default) for p in params[len(required):]]
    expected = COMMON + ([("block_table", None)] if name == "flash_attn_varlen_func" else [])
    assert rest == expected


def test_module_lists_its_functions_and_serves_kvcache_lazily():
    for name in fa.__all__:
        assert name in fa.__doc__
    from seqgen_fast.ops import decode

    if hasattr(decode, "flash_attn_with_kvcache"):
        assert fa.flash_attn_with_kvcache is decode.flash_attn_with_kvcache
    else:  # the decode engineer's function has not landed yet: importing this module still works
        with pytest.raises(AttributeError, match="flash_attn_with_kvcache"):
            fa.flash_attn_with_kvcache  # noqa: B018


def rand(*shape, dtype=torch.float16, grad=False):
    return torch.randn(*shape, dtype=dtype).requires_grad_(grad)


def lowp_flash(q, k, v, cu=None, **kw):
    """Plain PyTorch in the inputs' dtype (flash-attn's attention_ref without upcast): the features
    applied in float32, the two matmuls in the dtype; flash layout."""
    q4, k4, v4 = (t.transpose(-3, -2) for t in (q, k, v))
    if cu is None:
        return _lowp_seq(q4, k4, v4, 0, **kw).transpose(-3, -2)
    outs = []
    for b in range(cu.numel() - 1):
        rows = slice(int(cu[b]), int(cu[b + 1]))
        outs.append(_lowp_seq(q4[:, rows], k4[:, rows], v4[:, rows], b, **kw).transpose(0, 1))
    return torch.cat(outs)


def _lowp_seq(q, k, v, b, causal=False, window=(-1, -1), softcap=0.0, alibi=None, scale=None):
    g = q.shape[-3] // k.shape[-3]
    k, v = k.repeat_interleave(g, dim=-3), v.repeat_interleave(g, dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    s = torch.matmul(q, k.transpose(-2, -1)).float()
    z = s * scale
    if softcap > 0:
        z = torch.tanh(z / softcap) * softcap
    L, S = q.shape[-2], k.shape[-2]
    if alibi is not None:
        dist = (torch.arange(L)[:, None] + S - L - torch.arange(S)[None, :]).abs()
        z = z - (alibi if alibi.dim() == 1 else alibi[b])[:, None, None] * dist
    band = reference.band_mask(L, S, BOTTOM_RIGHT if causal else NONE, *window, q.device)
    if band is not None:
        z = z.masked_fill(~band, float("-inf"))
    return torch.matmul(reference._safe_softmax(z).to(q.dtype), v)


def exact_flash(q, k, v, cu=None, dropout_p=0.0, rng=None, causal=False, window=(-1, -1), softcap=0.0, alibi=None,
                scale=None):
    """The float64 reference through the op contract, flash layout (the reference's own tests
    compare it with torch's math path)."""
    varlen = cu is not None
    q4, k4, v4 = ((t.transpose(0, 1)[None] if varlen else t.transpose(1, 2)) for t in (q, k, v))
    batch = cu.numel() - 1 if varlen else q.shape[0]
    feat = Features(*window, softcap, None if alibi is None else alibi.expand(batch, q.shape[-2]), dropout_p, rng)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    out, lse = reference.attention_fwd(q4, k4, v4, None, cu, cu, 0, 0, scale, BOTTOM_RIGHT if causal else NONE, feat)
    return (out[0].transpose(0, 1) if varlen else out.transpose(1, 2)), (lse[0] if varlen else lse)


def flash_rule(ours, low, exact, what):
    e_ours, e_low = rel_err(ours, exact), rel_err(low, exact)
    floor = 2 * rel_err(exact.to(ours.dtype), exact) + 1e-5
    assert e_ours <= 2 * e_low + floor, f"{what}: error {e_ours:.2e} > 2 x plain PyTorch's {e_low:.2e} + {floor:.1e}"


FEATURE_CASES = {
    "causal_window": dict(causal=True, window=(5, 0)),
    "window_both_sides_L_gt_S": dict(window=(3, 6), L=33, S=20),
    "softcap": dict(softcap=1.5),
    "alibi_h": dict(alibi="h", causal=True),
    "alibi_bh_softcap_window": dict(alibi="bh", softcap=3.0, window=(9, 2)),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.smoke) if n == "causal_window" else n
                                  for n in FEATURE_CASES])
def test_flash_attn_func_features_interpreter(name, dtype):
    """Forward and backward of every feature, GQA, against float64 by flash-attn's rule."""
    case = dict(FEATURE_CASES[name])
    L, S = case.pop("L", 20), case.pop("S", 33)
    q, k, v = rand(2, L, 4, 32, dtype=dtype), rand(2, S, 2, 32, dtype=dtype), rand(2, S, 2, 32, dtype=dtype)
    kind = case.pop("alibi", None)
    alibi = None if kind is None else (torch.rand(4) if kind == "h" else torch.rand(2, 4))
    kw = dict(causal=case.get("causal", False), window_size=case.get("window", (-1, -1)),
              softcap=case.get("softcap", 0.0), alibi_slopes=alibi)
    go = torch.randn(2, L, 4, 32, dtype=dtype)

    def grads(fn, dtype_, **extra):
        ins = [t.detach().to(dtype_).requires_grad_() for t in (q, k, v)]
        out = fn(*ins, **extra)
        out = out[0] if isinstance(out, tuple) else out
        return [out, *torch.autograd.grad(out, ins, go.to(dtype_))]

    with use_backend("triton"):
        ours = grads(fa.flash_attn_func, dtype, **kw)
    low = grads(lowp_flash, dtype, **case, alibi=alibi)
    exact = grads(exact_flash, F64, **case, alibi=alibi)
    for what, a, b, c in zip(("out", "dq", "dk", "dv"), ours, low, exact):
        assert a.dtype == dtype and a.shape == c.shape
        flash_rule(a, b, c, f"{name} {what}")


def test_return_attn_probs_gives_lse_and_rows_without_keys():
    q, k, v = rand(2, 9, 2, 16), rand(2, 5, 2, 16), rand(2, 5, 2, 16)
    with use_backend("triton"):
        out, lse, dmask = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert dmask is None and lse.shape == (2, 2, 9) and lse.dtype == torch.float32
    ref_out, ref_lse = exact_flash(q.double(), k.double(), v.double(), causal=True)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))  # the first 4 rows see no key
    assert torch.all(out[:, :4] == 0)
    live = torch.isfinite(ref_lse)
    assert_close_rel(lse[live], ref_lse[live], 1e-5, "lse")
    assert_close_rel(out, ref_out, 2e-3, "out")


def test_packed_and_varlen_entry_points():
    """The packed variants equal flash_attn_func on their parts (forward and gradients through the
    packed tensor); varlen equals per-sequence attention; varlen lse is (nheads, total_q)."""
    qkv = rand(2, 17, 3, 2, 16, grad=True)
    with use_backend("triton"):
        packed = fa.flash_attn_qkvpacked_func(qkv, causal=True, window_size=(4, -1))
        split = fa.flash_attn_func(*qkv.unbind(2), causal=True, window_size=(4, -1))
        assert torch.equal(packed, split)
        (g_packed,) = torch.autograd.grad(packed.sum(), qkv)
        assert g_packed.shape == qkv.shape and g_packed[:, :, 1].abs().sum() > 0
        q = rand(2, 17, 4, 16)
        kv = rand(2, 23, 2, 2, 16)
        assert torch.equal(fa.flash_attn_kvpacked_func(q, kv, softcap=2.0),
                           fa.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], softcap=2.0))
        lens = [5, 1, 11]
        cu = torch.tensor([0, 5, 6, 17], dtype=torch.int32)
        qkv_v = rand(17, 3, 2, 16)
        out, lse, _ = fa.flash_attn_varlen_qkvpacked_func(qkv_v, cu, max(lens), causal=True, return_attn_probs=True)
        assert lse.shape == (2, 17)
        q_v, kv_v = rand(17, 4, 16), rand(17, 2, 2, 16)
        out_kv = fa.flash_attn_varlen_kvpacked_func(q_v, kv_v, cu, cu, 11, 11, alibi_slopes=torch.rand(3, 4))
        assert out_kv.shape == (17, 4, 16)
    for b, n in enumerate(lens):
        rows = slice(int(cu[b]), int(cu[b]) + n)
        seq = exact_flash(*(t[None, rows].double() for t in qkv_v.unbind(1)), causal=True)[0][0]
        assert_close_rel(out[rows], seq, 3e-3, f"sequence {b}")


def _dropout_inputs(dtype):
    return [rand(1, n, 2, 32, dtype=dtype, grad=True) for n in (21, 37, 37)]


def _dropout_run(ins, seed, deterministic=False, p=0.3):
    torch.manual_seed(seed)
    with use_backend("triton"):
        out = fa.flash_attn_func(*ins, dropout_p=p, causal=True, deterministic=deterministic)
    go = torch.ones_like(out)
    return out, torch.autograd.grad(out, ins, go), go


@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_dropout_reproducible_and_regenerated_in_backward(dtype):
    ins = _dropout_inputs(dtype)
    out, grads, go = _dropout_run(ins, seed=11)
    out2, grads2, _ = _dropout_run(ins, seed=11)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2)), "not reproducible"
    torch.manual_seed(11)  # the op draws (seed, offset) with torch's generator: the same draw here
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    q4, k4, v4 = (t.detach().double().transpose(1, 2) for t in ins)
    feat = Features(-1, 0, 0.0, None, 0.3, rng)
    ref, lse = reference.attention_fwd(q4, k4, v4, None, None, None, 0, 0, 32 ** -0.5, BOTTOM_RIGHT, feat)
    ref_grads = reference.attention_bwd(go.double().transpose(1, 2), q4, k4, v4, ref, lse, None, None, None, 0, 0,
                                        32 ** -0.5, BOTTOM_RIGHT, feat)
    tol = 3e-3 if dtype == torch.float16 else 1e-5
    assert_close_rel(out, ref.transpose(1, 2), tol, "out with dropout")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close_rel(a, b.transpose(1, 2), tol, f"d{name} with dropout")
    no_drop = exact_flash(*(t.detach().double() for t in ins), causal=True)[0]
    assert rel_err(out, no_drop) > 0.05, "dropout changed nothing"


def test_dropout_keep_rate_and_philox_match_triton():
    """The reference's Philox is Triton's tl.rand bit for bit, and about 1 - p of the weights survive."""
    import triton
    import triton.language as tl

    @triton.jit
    def draw(rng, out, N: tl.constexpr):
        offs = tl.load(rng + 1) + tl.arange(0, N).to(tl.int64) * 2654435761
        tl.store(out + tl.arange(0, N), tl.rand(tl.load(rng), offs))

    rng = torch.tensor([2**40 + 12345, 2**33 + 7], dtype=torch.int64)
    got = torch.empty(256)
    draw[(1,)](rng, got, N=256)
    ref = reference.philox_uniform(int(rng[0]), int(rng[1]) + torch.arange(256, dtype=torch.int64) * 2654435761)
    assert torch.equal(got, ref)
    keep = reference.dropout_keep(rng, 0.3, 0, 4, 64, 64, range(64), range(64), "cpu")
    assert abs(keep.float().mean().item() - 0.7) < 0.02


def test_deterministic_backward_is_bit_identical_and_matches_the_atomic_one():
    ins = _dropout_inputs(torch.float16)
    runs = [_dropout_run(ins, seed=3, deterministic=True, p=0.0) for _ in range(2)]
    assert all(torch.equal(a, b) for a, b in zip(runs[0][1], runs[1][1]))
    _, atomic, _ = _dropout_run(ins, seed=3, deterministic=False, p=0.0)
    for a, b in zip(runs[0][1], atomic):
        assert_close_rel(a, b, 2e-3, "deterministic vs atomic dQ")


def test_float32_is_exact_not_tf32():
    """float32 goes to the kernels with IEEE dots: the error is float32 rounding (TF32's 10-bit
    mantissa would be ~1e-3), with O(S) memory (no S x S scores)."""
    q, k, v = (rand(2, n, 2, 32, dtype=torch.float32, grad=True) for n in (19, 41, 41))
    with use_backend("triton"):
        out = fa.flash_attn_func(q, k, v, causal=True, softcap=4.0, window_size=(11, -1))
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = exact_flash(*ins, causal=True, softcap=4.0, window=(11, -1))[0]
    assert_close_rel(out, ref, 2e-6, "out")
    for name, a, b in zip("qkv", grads, torch.autograd.grad(ref, ins, go.double())):
        assert_close_rel(a, b, 1e-5, f"d{name}")
    assert ops.ATTN.select(*(t.transpose(1, 2) for t in (q, k, v)), None, None, None, 0, 0, 1.0, BOTTOM_RIGHT,
                           backend="triton") == "triton"


@pytest.mark.parametrize("fused_dq", [False, True], ids=["dq-pass", "dq-atomics"])
def test_hopper_lowering_under_the_interpreter(fused_dq):
    """The TMA-descriptor lowering (tensor descriptors per sequence) computes the same as the
    reference, varlen with a window, ALiBi and dropout, forward and backward, with either dQ
    strategy: the separate dQ pass (Hopper's default) or the dK/dV pass's TMA reduce-add."""
    from seqgen_fast.kernels import attention as kernel

    cu = torch.tensor([0, 7, 40, 41], dtype=torch.int32)
    q = rand(41, 4, 32).transpose(0, 1)[None]
    k, v = (rand(41, 2, 32).transpose(0, 1)[None] for _ in range(2))
    feat = Features(6, -1, 0.0, torch.rand(3, 4), 0.25, torch.tensor([99, 1000]))
    out, lse = kernel.attention_fwd(q, k, v, None, cu, cu, 33, 33, 0.2, BOTTOM_RIGHT, feat, path=kernel.HOPPER)
    go = torch.randn_like(out)
    grads = kernel.attention_bwd(go, q, k, v, out, lse, None, cu, cu, 33, 33, 0.2, BOTTOM_RIGHT, feat, False,
                                 path=kernel.HOPPER, fused_dq=fused_dq)
    with pytest.raises(ValueError, match="fused_dq=True adds dQ by atomics"):
        kernel.attention_bwd(go, q, k, v, out, lse, None, cu, cu, 33, 33, 0.2, BOTTOM_RIGHT, feat, True,
                             path=kernel.HOPPER, fused_dq=True)
    r = [t.double() for t in (q, k, v)]
    ref, ref_lse = reference.attention_fwd(*r, None, cu, cu, 33, 33, 0.2, BOTTOM_RIGHT, feat)
    ref_grads = reference.attention_bwd(go.double(), *r, ref, ref_lse, None, cu, cu, 33, 33, 0.2, BOTTOM_RIGHT, feat)
    assert_close_rel(out, ref, 3e-3, "out")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close_rel(a, b, 3e-3, f"d{name}")


def test_sdpa_dropout_runs_in_the_kernels():
    q, k, v = (rand(1, 2, n, 32) for n in (9, 17, 17))
    torch.manual_seed(4)
    out = ops.scaled_dot_product_attention(q, k, v, dropout_p=0.4, is_causal=True, backend="triton")
    torch.manual_seed(4)
    rng = torch.randint(0, 2**62, (2,), dtype=torch.int64)
    ref, _ = reference.attention_fwd(q.double(), k.double(), v.double(), None, None, None, 0, 0, 32 ** -0.5, 1,
                                     Features(dropout_p=0.4, rng=rng))
    assert_close_rel(out, ref, 3e-3)


@pytest.mark.parametrize("kwargs,words", [
    (dict(window_size=(4,)), "window_size must be a pair"),
    (dict(window_size=(-2, 0)), "window_size must be a pair"),
    (dict(window_size=(1.5, 0)), "window_size must be a pair"),
    (dict(softcap=-1.0), "softcap must be a float >= 0"),
    (dict(dropout_p=1.5), "dropout_p must be a float in"),
    (dict(alibi_slopes=torch.rand(3)), r"alibi_slopes must have shape \(nheads,\)"),
    (dict(alibi_slopes=torch.rand(2, 4).double()), "alibi_slopes must be float32"),
])
def test_bad_input_names_the_argument(kwargs, words):
    q = rand(2, 5, 4, 16)
    with pytest.raises((ValueError, TypeError), match=words):
        fa.flash_attn_func(q, q[:, :, :2], q[:, :, :2], **kwargs)


def test_bad_varlen_input():
    q = rand(10, 2, 16)
    with debug_checks(), pytest.raises(ValueError, match="cu_seqlens_q must be prefix sums"):
        fa.flash_attn_varlen_func(q, q, q, torch.tensor([0, 6, 4, 10], dtype=torch.int32),
                                  torch.tensor([0, 4, 6, 10], dtype=torch.int32), 6, 6)
    with pytest.raises(ValueError, match="block_table"):
        fa.flash_attn_varlen_func(q, q, q, torch.tensor([0, 10], dtype=torch.int32),
                                  torch.tensor([0, 10], dtype=torch.int32), 10, 10, block_table=torch.zeros(1, 1))
    with pytest.raises(ValueError, match="qkv must be"):
        fa.flash_attn_qkvpacked_func(rand(2, 5, 2, 2, 16))


def test_tuning_keys_bucket_lengths_and_never_tune_in_a_capture(monkeypatch, tmp_path):
    from seqgen_fast.kernels import _tuning

    assert _tuning.seq_bucket(1) == 64 and _tuning.seq_bucket(4096) == 4096 and _tuning.seq_bucket(4097) == 8192
    monkeypatch.setenv("SEQGEN_FAST_TUNING_CACHE", str(tmp_path))
    cfgs = [_tuning.Config(64, 32, 4, 2), _tuning.Config(32, 32, 4, 2)]
    shipped = {"FakeGPU": {"test_kernel|1": [16, 16, 4, 1]}}
    tuner = _tuning.Tuner("test_kernel", lambda key: cfgs, lambda key: cfgs[0], shipped)
    assert not _tuning.tuning_allowed(torch.device("cpu"), True)
    assert not _tuning.tuning_allowed(torch.device("cuda"), False)  # traced by torch.compile: never
    assert tuner._remembered("FakeGPU H100", "test_kernel|1") == _tuning.Config(16, 16, 4, 1)  # the shipped table
    tuner._persist("FakeGPU H100", "test_kernel|1", cfgs[1])                                  # disk beats the table
    assert tuner._remembered("FakeGPU H100", "test_kernel|1") == cfgs[1]
    assert list(tmp_path.iterdir())[0].name.startswith("FakeGPU_H100-triton")


# ----------------------------------------------------------------------------------------------
# GPU
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("dtype", [pytest.param(torch.bfloat16, marks=pytest.mark.smoke), torch.float16,
                                   torch.float32])
@pytest.mark.parametrize("name", list(FEATURE_CASES))
def test_gpu_features(name, dtype, varlen):
    dev = "cuda"
    case = dict(FEATURE_CASES[name])
    L, S = case.pop("L", 300), case.pop("S", 1025)
    kind = case.pop("alibi", None)
    alibi = None if kind is None else (torch.rand(8, device=dev) if kind == "h" else torch.rand(2, 8, device=dev))
    kw = dict(causal=case.get("causal", False), window_size=case.get("window", (-1, -1)),
              softcap=case.get("softcap", 0.0), alibi_slopes=alibi)
    q, k, v = (torch.randn(2, n, h, 128, device=dev, dtype=dtype, requires_grad=True)
               for n, h in ((L, 8), (S, 2), (S, 2)))
    go = torch.randn(2, L, 8, 128, device=dev, dtype=dtype)
    out = fa.flash_attn_func(q, k, v, **kw)
    ours = [out, *torch.autograd.grad(out, (q, k, v), go)]
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = exact_flash(*ins, **case, alibi=alibi)[0]
    exact = [ref, *torch.autograd.grad(ref, ins, go.double())]
    lins = [t.detach().requires_grad_() for t in (q, k, v)]
    lref = lowp_flash(*lins, **case, alibi=alibi)
    low = [lref, *torch.autograd.grad(lref, lins, go)]
    for what, a, b, c in zip(("out", "dq", "dk", "dv"), ours, low, exact):
        flash_rule(a, b, c, f"{name} {dtype} {what}")


@pytest.mark.gpu
@pytest.mark.smoke
def test_gpu_deterministic_is_bit_identical():
    q, k, v = (torch.randn(2, 1024, 8, 128, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    go = torch.randn_like(q)
    runs = []
    for _ in range(3):
        out = fa.flash_attn_func(q, k, v, causal=True, deterministic=True)
        runs.append(torch.autograd.grad(out, (q, k, v), go))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))


@pytest.mark.gpu
def test_gpu_cuda_graph_capture_never_tunes(monkeypatch, tmp_path):
    """A first call inside a capture (nothing tuned or cached for its key) takes the default config
    and captures; the replay equals an eager call."""
    monkeypatch.setenv("SEQGEN_FAST_TUNING_CACHE", str(tmp_path))
    q = torch.randn(1, 3001, 4, 64, device="cuda", dtype=torch.bfloat16)
    out = poison(torch.empty_like(q))
    graph = torch.cuda.CUDAGraph()
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        out.copy_(fa.flash_attn_func(q, q, q, causal=True, window_size=(333, 0)))
    graph.replay()
    torch.cuda.synchronize()
    assert_close_rel(out, fa.flash_attn_func(q, q, q, causal=True, window_size=(333, 0)), 1e-6)


@pytest.mark.gpu
def test_gpu_sliding_window_time_follows_the_window():
    from triton.testing import do_bench

    times = []
    for seq in (4096, 16384):
        q = torch.randn(1, seq, 16, 128, device="cuda", dtype=torch.bfloat16)
        times.append(do_bench(lambda: fa.flash_attn_func(q, q, q, causal=True, window_size=(512, 0))) / seq)
    assert times[1] < 1.5 * times[0], f"per-row time grew with S: {times}"
