"""Prefill attention: scaled_dot_product_attention (torch's semantics) and flash_attention.

CPU: the reference backend over a broad grid of torch's semantics against torch's own math
backend in float64 (masks, causal L != S, GQA, dropout, scale, batch dims, gradients); the Triton
kernels under the interpreter on a handful of tiny odd shapes (forward and backward, causal both
conventions, GQA, varlen, masks); opcheck of the ops; input errors. GPU (-m gpu): every head dim x
dtype x causal x GQA x varlen against float64 with the flash-attn rule, odd lengths, backward,
and peak memory O(S) at S = 16384.
"""
import re

import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from seqgen_fast import BackendError, debug_checks, use_backend
from seqgen_fast._contract import attention_output
from seqgen_fast.functional import flash_attention, scaled_dot_product_attention
from seqgen_fast.ops import attention as ops
from seqgen_fast.reference import attention as reference
from seqgen_fast.reference.attention import BOTTOM_RIGHT, TOP_LEFT, Features

FEATURES = Features()
from support.aot import compile_sm90, pointers
from support.utils import assert_close_rel, poison, rel_err

F64 = torch.float64


def torch_sdpa(*args, **kwargs):
    """torch's public SDPA on its math backend (the semantics we must reproduce)."""
    with sdpa_kernel(SDPBackend.MATH):
        return F.scaled_dot_product_attention(*args, **kwargs)


def rand(*shape, dtype=F64, device="cpu", grad=False):
    return torch.randn(*shape, dtype=dtype, device=device).requires_grad_(grad)


def grads_of(out, inputs, go):
    return torch.autograd.grad(out, [t for t in inputs if t.requires_grad], go, allow_unused=False)


def lowp_sdpa(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, scale=None):
    """Plain PyTorch attention in the input dtype (flash-attn's ``attention_ref(upcast=False)``):
    matmuls in the dtype, softmax in float32 rounded back to the dtype; (B, H, L, E) layout."""
    if enable_gqa:
        k = k.repeat_interleave(q.shape[-3] // k.shape[-3], dim=-3)
        v = v.repeat_interleave(q.shape[-3] // v.shape[-3], dim=-3)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.matmul(q, k.transpose(-2, -1)) * scale
    if is_causal:
        attn_mask = reference.causal_mask(q.shape[-2], k.shape[-2], TOP_LEFT, q.device)
    bias = 0.0 if attn_mask is None else reference._bias_from_mask(attn_mask, torch.float32)
    return torch.matmul(reference._safe_softmax(scores.float() + bias).to(q.dtype), v)


def flash_via(fn, q, k, v, causal, cu_q=None, cu_k=None):
    """flash_attention's result from an SDPA-like ``fn`` in (B, H, L, E) layout, one sequence at a
    time for varlen, with the bottom-right causal mask."""
    if cu_q is None:
        L, S = q.shape[1], k.shape[1]
        mask = reference.causal_mask(L, S, BOTTOM_RIGHT, q.device) if causal else None
        return fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=mask,
                  enable_gqa=True).transpose(1, 2)
    outs = []
    for b in range(cu_q.numel() - 1):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        outs.append(flash_via(fn, q[None, rq], k[None, rk], v[None, rk], causal)[0])
    return torch.cat(outs)


def assert_flash_rule(ours, low_ref, exact, what):
    """flash-attn's rule: error of ours <= 2x the error of plain PyTorch in the same dtype, plus (as
    flash-attn's dq/dk/dv atol) twice the error of merely rounding the exact result to the dtype;
    errors measured against a float64 result (absolute where that result is exactly 0)."""
    e_ours, e_ref = rel_err(ours, exact), rel_err(low_ref, exact)
    floor = 2 * rel_err(exact.to(ours.dtype), exact) + 1e-5  # + for exact zeros (L = 1: dq = 0 up to fp32 sums)
    assert e_ours == e_ours, f"{what}: NaN where the reference has none"
    assert e_ours <= 2 * e_ref + floor, f"{what}: error {e_ours:.2e} > 2 x plain PyTorch's {e_ref:.2e} + {floor:.1e}"


# ----------------------------------------------------------------------------------------------
# Reference path vs torch's math backend (float64)
# ----------------------------------------------------------------------------------------------
MASKS = ["none", "causal", "bool_ls", "bool_b1ls", "bool_full_row_masked", "float_1hls", "float_ls_grad"]


def make_mask(kind, B, H, L, S, dtype=F64):
    if kind == "bool_ls":
        return torch.rand(L, S) > 0.3
    if kind == "bool_b1ls":
        return torch.rand(B, 1, L, S) > 0.5
    if kind == "bool_full_row_masked":
        m = torch.rand(B, H, L, S) > 0.3
        m[..., L // 2, :] = False
        return m
    if kind == "float_1hls":
        return torch.randn(1, H, L, S, dtype=dtype).masked_fill(torch.rand(1, H, L, S) < 0.2, float("-inf"))
    if kind == "float_ls_grad":
        return torch.randn(L, S, dtype=dtype, requires_grad=True)
    return None


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("L,S", [(1, 1), (1, 33), (7, 33), (33, 7), (97, 97)])
def test_reference_matches_torch_math(mask_kind, L, S):
    B, H, E, Ev = 2, 3, 16, 24
    q, k, v = rand(B, H, L, E, grad=True), rand(B, H, S, E, grad=True), rand(B, H, S, Ev, grad=True)
    mask = make_mask(mask_kind, B, H, L, S)
    kw = dict(is_causal=True) if mask_kind == "causal" else dict(attn_mask=mask)
    ours = scaled_dot_product_attention(q, k, v, backend="reference", **kw)
    ref = torch_sdpa(q, k, v, **kw)
    assert_close_rel(ours, ref, 1e-12, "out")
    inputs = [q, k, v] + ([mask] if mask is not None and mask.requires_grad else [])
    go = torch.randn_like(ref)
    for name, a, b in zip("qkvm", grads_of(ours, inputs, go), grads_of(ref, inputs, go)):
        assert_close_rel(a, b, 1e-12, f"d{name}")


@pytest.mark.parametrize("case", ["gqa", "mqa_broadcast", "scale", "3d", "5d", "2d", "broadcast_batch", "ev_ne_e"])
def test_reference_shapes_and_options(case):
    kw = {}
    q, k, v = rand(2, 4, 7, 8), rand(2, 4, 9, 8), rand(2, 4, 9, 8)
    if case == "gqa":
        k, v, kw = rand(2, 2, 9, 8), rand(2, 2, 9, 8), dict(enable_gqa=True, is_causal=True)
    elif case == "mqa_broadcast":
        k, v = rand(2, 1, 9, 8), rand(2, 1, 9, 8)
    elif case == "scale":
        kw = dict(scale=0.37)
    elif case == "3d":
        q, k, v = rand(3, 7, 8), rand(3, 9, 8), rand(3, 9, 8)
        kw = dict(attn_mask=torch.rand(7, 9) > 0.5)
    elif case == "5d":
        q, k, v = rand(2, 3, 4, 7, 8), rand(2, 3, 4, 9, 8), rand(2, 3, 4, 9, 8)
        kw = dict(attn_mask=torch.rand(3, 1, 7, 9) > 0.5)
    elif case == "2d":
        q, k, v = rand(7, 8), rand(9, 8), rand(9, 8)
    elif case == "broadcast_batch":
        k, v = rand(1, 4, 9, 8), rand(4, 9, 8)
    elif case == "ev_ne_e":
        v = rand(2, 4, 9, 5)
    ours = scaled_dot_product_attention(q, k, v, backend="reference", **kw)
    assert_close_rel(ours, torch_sdpa(q, k, v, **kw), 1e-12, case)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_reference_low_precision_matches_torch(dtype):
    q, k, v = rand(2, 3, 33, 16, dtype=dtype), rand(2, 3, 7, 16, dtype=dtype), rand(2, 3, 7, 16, dtype=dtype)
    mask = torch.randn(33, 7, dtype=dtype)
    ours = scaled_dot_product_attention(q, k, v, attn_mask=mask, backend="reference")
    assert ours.dtype == dtype
    tol = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    assert_close_rel(ours, torch_sdpa(q, k, v, attn_mask=mask), tol)


def test_reference_dropout_matches_torch_with_the_same_seed():
    q, k, v = rand(2, 3, 7, 8, grad=True), rand(2, 3, 9, 8, grad=True), rand(2, 3, 9, 8, grad=True)
    torch.manual_seed(123)
    ours = scaled_dot_product_attention(q, k, v, dropout_p=0.3, backend="reference")
    torch.manual_seed(123)
    ref = torch_sdpa(q, k, v, dropout_p=0.3)
    assert_close_rel(ours, ref, 1e-12, "out with dropout")
    assert rel_err(ours, torch_sdpa(q, k, v)) > 1e-3, "dropout changed nothing"
    go = torch.randn_like(ref)
    for a, b in zip(grads_of(ours, [q, k, v], go), grads_of(ref, [q, k, v], go)):
        assert_close_rel(a, b, 1e-12, "grad with dropout")


def test_reference_dropout_mask_matches_aten():
    q, k, v = rand(2, 3, 7, 8), rand(2, 3, 9, 8), rand(2, 3, 9, 8)
    keep = torch.rand(2, 3, 7, 9) > 0.25
    ours = reference.sdpa(q, k, v, dropout_p=0.25, dropout_mask=keep)
    ref = torch.ops.aten._scaled_dot_product_attention_math(q, k, v, None, 0.25, False, keep)[0]
    assert_close_rel(ours, ref, 1e-12)
    # dropout statistics: the mean over many draws approaches the dropout-free output
    q1, k1, v1 = q[:1, :1], k[:1, :1], v[:1, :1]
    mean = torch.stack([scaled_dot_product_attention(q1, k1, v1, dropout_p=0.5) for _ in range(2000)]).mean(0)
    assert rel_err(mean, scaled_dot_product_attention(q1, k1, v1)) < 0.1


def test_cpu_automatic_dispatch_goes_to_reference_and_triton_says_why():
    q = rand(1, 2, 7, 32, dtype=torch.float16)
    args = (q, q, q, None, 0.0, False, None, False)
    assert ops.SDPA.select(*args) == "reference"
    assert ops.SDPA.select(*args[:4], 0.1, *args[5:], backend="reference") == "reference"
    with use_backend("triton"):  # dropout runs in the kernels
        assert ops.SDPA.select(*args[:4], 0.1, *args[5:]) == "triton"
    with pytest.raises(BackendError, match="float64"):
        scaled_dot_product_attention(q.double(), q.double(), q.double(), backend="triton")


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (tiny shapes; on the GPU these run compiled)
# ----------------------------------------------------------------------------------------------
def run_sdpa_both(q, k, v, go, **kw):
    """(out, grads) of ours (triton forced), of plain PyTorch in q's dtype, and in float64."""
    def run(fn, dtype, **extra):
        ins = [t.detach().to(dtype).requires_grad_() for t in (q, k, v)]
        mask = kw.get("attn_mask")
        if mask is not None and mask.is_floating_point():
            extra["attn_mask"] = mask.to(dtype)
        out = fn(*ins, **{**kw, **extra})
        return [out] + list(torch.autograd.grad(out, ins, go.to(dtype)))

    ours = run(scaled_dot_product_attention, q.dtype, backend="triton")
    low = run(lowp_sdpa, q.dtype)
    exact = run(torch_sdpa, F64)
    return ours, low, exact


SDPA_TRITON_CASES = {
    "plain_L7_S33_D32": dict(shape=(1, 2, 2, 7, 33, 32, 32), kw={}),
    "causal_topleft_L33_S7_D64": dict(shape=(1, 2, 2, 33, 7, 64, 64), kw=dict(is_causal=True)),
    "causal_topleft_L7_S33_gqa": dict(shape=(2, 4, 2, 7, 33, 32, 32), kw=dict(is_causal=True, enable_gqa=True)),
    "bool_mask_full_row_E24_Ev40": dict(shape=(1, 2, 2, 20, 33, 24, 40), kw="bool"),
    "additive_mask_mqa": dict(shape=(1, 4, 1, 17, 33, 32, 32), kw="float"),
}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.smoke) if n == "plain_L7_S33_D32" else n
                                  for n in SDPA_TRITON_CASES])
def test_sdpa_triton_interpreter(name, dtype, device):
    B, H, Hk, L, S, E, Ev = SDPA_TRITON_CASES[name]["shape"]
    kw = SDPA_TRITON_CASES[name]["kw"]
    if kw == "bool":
        mask = torch.rand(B, 1, L, S, device=device) > 0.4
        mask[:, :, 3] = False
        kw = dict(attn_mask=mask)
    elif kw == "float":
        kw = dict(attn_mask=torch.randn(L, S, device=device, dtype=dtype))
    q = rand(B, H, L, E, dtype=dtype, device=device)
    k, v = rand(B, Hk, S, E, dtype=dtype, device=device), rand(B, Hk, S, Ev, dtype=dtype, device=device)
    go = rand(B, H, L, Ev, dtype=dtype, device=device)
    ours, low, exact = run_sdpa_both(q, k, v, go, **kw)
    for what, a, b, c in zip(["out", "dq", "dk", "dv"], ours, low, exact):
        assert a.dtype == dtype and a.shape == c.shape
        assert_flash_rule(a, b, c, what)
    if "full_row" in name:
        assert torch.all(ours[0][:, :, 3] == 0), "a fully masked row must give 0 (torch's math path)"


def test_sdpa_triton_3d_and_strided_inputs(device):
    """(N, L, E) inputs and a transposed (B, L, H, E) storage go through the kernels without copies."""
    q = rand(3, 7, 32, dtype=torch.float16, device=device)
    k = rand(3, 33, 32, dtype=torch.float16, device=device)
    out = scaled_dot_product_attention(q, k, k, backend="triton")
    assert_close_rel(out, torch_sdpa(q.double(), k.double(), k.double()), 2e-3)
    qs = rand(1, 7, 2, 32, dtype=torch.float16, device=device).transpose(1, 2)
    out = scaled_dot_product_attention(qs, qs, qs, is_causal=True, backend="triton")
    assert_close_rel(out, torch_sdpa(qs.double(), qs.double(), qs.double(), is_causal=True), 2e-3)


@pytest.mark.parametrize("shape_q,shape_kv,ev", [((2, 2, 3, 7, 256), (2, 2, 3, 33, 256), 8),
                                                  ((7, 8), (33, 8), 24)])
def test_sdpa_triton_head_dims_and_ranks(shape_q, shape_kv, ev, device):
    """Head dims at both ends (256 and 8, padded to power-of-two blocks), 5-D and 2-D inputs."""
    q = rand(*shape_q, dtype=torch.float16, device=device, grad=True)
    k = rand(*shape_kv, dtype=torch.float16, device=device, grad=True)
    v = rand(*shape_kv[:-1], ev, dtype=torch.float16, device=device, grad=True)
    out = scaled_dot_product_attention(q, k, v, is_causal=True, backend="triton")
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = torch_sdpa(*ins, is_causal=True)
    go = torch.randn_like(out)
    assert_close_rel(out, ref, 2e-3, "out")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, ins, go.double())):
        assert_close_rel(a, b, 3e-3, f"d{name}")


def flash_exact(q, k, v, causal, cu_q=None, cu_k=None):
    """float64 flash_attention reference (bottom-right causal) through the reference op path."""
    return flash_attention(q.double(), k.double(), v.double(), causal=causal, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k,
                           backend="reference")


@pytest.mark.parametrize("L,S,causal", [(7, 33, True), (33, 7, True), (33, 33, False)])
def test_flash_attention_triton_dense(L, S, causal, device):
    dtype = torch.bfloat16
    q = rand(2, L, 4, 32, dtype=dtype, device=device, grad=True)
    k = rand(2, S, 2, 32, dtype=dtype, device=device, grad=True)
    v = rand(2, S, 2, 64, dtype=dtype, device=device, grad=True)
    out = flash_attention(q, k, v, causal=causal, backend="triton")
    assert out.shape == (2, L, 4, 64) and out.is_contiguous()
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = flash_exact(*ins, causal)
    go = torch.randn_like(out)
    assert_close_rel(out, ref, 2e-2, "out")
    for name, a, b in zip("qkv", torch.autograd.grad(out, (q, k, v), go), torch.autograd.grad(ref, ins, go.double())):
        assert_close_rel(a, b, 2e-2, f"d{name}")
    if causal and L > S:  # bottom-right: the first L - S query rows see no key
        assert torch.all(out[:, : L - S] == 0)
    # the float64 path is torch's own math with the bottom-right mask
    mask = reference.causal_mask(L, S, BOTTOM_RIGHT if causal else TOP_LEFT, device) if causal else None
    torch_ref = torch_sdpa(ins[0].transpose(1, 2), ins[1].transpose(1, 2), ins[2].transpose(1, 2),
                           attn_mask=mask, enable_gqa=True).transpose(1, 2)
    assert_close_rel(ref, torch_ref, 1e-12, "reference flash vs torch")


def test_flash_attention_triton_varlen_gqa_backward(device):
    dtype = torch.float16
    lens_q, lens_k = [7, 1, 20], [9, 33, 20]
    cu_q = torch.tensor([0, 7, 8, 28], device=device, dtype=torch.int32)
    cu_k = torch.tensor([0, 9, 42, 62], device=device)  # int64 offsets are accepted too
    q = rand(28, 4, 32, dtype=dtype, device=device, grad=True)
    k = rand(62, 2, 32, dtype=dtype, device=device, grad=True)
    v = rand(62, 2, 32, dtype=dtype, device=device, grad=True)
    out = flash_attention(q, k, v, causal=True, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend="triton")
    go = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), go)
    ins = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = flash_exact(*ins, True, cu_q, cu_k)
    ref_grads = torch.autograd.grad(ref, ins, go.double())
    assert_close_rel(out, ref, 2e-3, "out")
    for name, a, b in zip("qkv", grads, ref_grads):
        assert_close_rel(a, b, 2e-3, f"d{name}")
    # the reference varlen path equals torch's math, one sequence at a time
    for b, (lq, lk) in enumerate(zip(lens_q, lens_k)):
        qs = ins[0][cu_q[b]:cu_q[b] + lq].transpose(0, 1)
        ks, vs = (t[cu_k[b]:cu_k[b] + lk].transpose(0, 1) for t in ins[1:])
        seq = torch_sdpa(qs, ks, vs, attn_mask=reference.causal_mask(lq, lk, BOTTOM_RIGHT, device), enable_gqa=True)
        assert_close_rel(ref[cu_q[b]:cu_q[b] + lq], seq.transpose(0, 1), 1e-12, f"sequence {b}")


@pytest.mark.parametrize("blocks", [(16, 16), (16, 32), (32, 16), (64, 16)])
@pytest.mark.parametrize("causal", [TOP_LEFT, BOTTOM_RIGHT])
def test_kernel_block_shapes_causal_skipping(blocks, causal, device):
    """The causal block skipping (fully-visible blocks unmasked, invisible ones never visited) for
    every ratio of query to key block sizes, L < S and L > S, dense and varlen, against float64."""
    from seqgen_fast.kernels import attention as kernel

    torch.manual_seed(0)
    h = torch.float16
    cases = [(rand(1, 2, 37, 32, dtype=h, device=device), rand(1, 1, 71, 32, dtype=h, device=device), None),
             (rand(1, 2, 71, 32, dtype=h, device=device), rand(1, 1, 37, 32, dtype=h, device=device), None)]
    cu_q = torch.tensor([0, 19, 20, 60], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 40, 57, 70], dtype=torch.int32, device=device)
    cases.append((rand(60, 2, 32, dtype=h, device=device).transpose(0, 1)[None],
                  rand(70, 1, 32, dtype=h, device=device).transpose(0, 1)[None], (cu_q, cu_k, 40, 40)))
    cfg = kernel.Config(*blocks, 4, 1)
    fixed = {"dkdv": kernel.Config(*blocks[::-1], 4, 1), "dq": cfg}
    for (q, k, varlen), deterministic in zip(cases, (False, True, False)):
        v = k
        cu = varlen or (None, None, 0, 0)
        out, lse = kernel.attention_fwd(q, k, v, None, *cu, 0.3, causal, FEATURES, config=cfg)
        go = torch.randn_like(out)
        grads = kernel.attention_bwd(go, q, k, v, out, lse, None, *cu, 0.3, causal, FEATURES, deterministic,
                                     config=fixed)
        ref, ref_lse = reference.attention_fwd(q.double(), k.double(), v.double(), None, *cu, 0.3, causal)
        ref_grads = reference.attention_bwd(go.double(), q.double(), k.double(), v.double(), ref, ref_lse, None,
                                            *cu, 0.3, causal)
        assert_close_rel(out, ref, 2e-3, "out")
        assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "fully masked rows"
        assert_close_rel(lse, ref_lse, 1e-5, "lse")
        for name, a, b in zip("qkv", grads, ref_grads):
            assert_close_rel(a, b, 3e-3, f"d{name}")


AOT_VARIANTS = [
    # kernel, D, DV, (BLOCK_M, BLOCK_N, warps, stages), flags
    ("_attn_fwd", 128, 128, (128, 64, 8, 3), dict(BAND_RIGHT=True)),
    ("_attn_fwd", 96, 64, (128, 64, 8, 3), dict(BAND_RIGHT=True, IS_VARLEN=True, SOFTCAP=True, ALIBI=True)),
    ("_attn_bwd_dkdv", 128, 128, (16, 128, 8, 2), dict(HAS_MASK=True, MASK_BOOL=True, FUSED_DQ=True)),
    ("_attn_bwd_dq", 256, 256, (64, 32, 4, 2), dict(HAS_MASK=True, BAND_RIGHT=True)),
]
def compile_variant(name, d, dv, blocks, flags, tma):
    """Facts of one kernel variant compiled ahead of time for sm_90a (bf16, no GPU needed)."""
    from seqgen_fast.kernels import attention as kernel

    bm, bn, warps, stages = blocks
    const = dict(D=d, DV=dv, BLOCK_D=kernel.block_dim(d), BLOCK_DV=kernel.block_dim(dv), BOTTOM_RIGHT=True,
                 HAS_MASK=False, MASK_BOOL=False, IS_VARLEN=False, SOFTCAP=False, ALIBI=False, BAND_LEFT=False,
                 BAND_RIGHT=False, DROPOUT=False, IEEE=False, TMA=tma, BLOCK_M=bm, BLOCK_N=bn)
    names = getattr(kernel, name).arg_names
    const.update({n: False for n in ("FUSED_DQ",) if n in names})
    const.update(flags)
    const.update({n: 1 for n in names if n.startswith("stride_") and n.endswith("d") and n != "stride_mb"})
    types = {**pointers("bf16", *({"Q", "K", "V", "O", "DO", "DK", "DVT"} & set(names))),
             **pointers("fp32", *({"LSE", "DELTA", "DQ", "SLOPES"} & set(names))), **pointers("i32", "CU_Q", "CU_K"),
             **pointers("i64", "RNG"), "MASK": "*i1" if const["MASK_BOOL"] else "*bf16",
             **{n: "fp32" for n in ("qk_scale", "sm_scale", "softcap_scale", "softcap_mul", "dropout_p", "drop_scale")
                if n in names}}
    aligned = [n for n in names if n.startswith("stride_") and not n.startswith("stride_m") and n not in const]
    return compile_sm90("seqgen_fast.kernels.attention", name, types=types, constexprs=const, aligned=aligned,
                        unaligned=("MASK",), num_warps=warps, num_stages=stages)


@pytest.mark.parametrize("index", range(len(AOT_VARIANTS)))
def test_kernels_compile_for_sm90_with_wgmma(index):
    """The portable lowering compiles for Hopper, its dots on wgmma, its tiles streamed through
    cp.async, within the 227 KiB of shared memory a block can have."""
    facts = compile_variant(*AOT_VARIANTS[index], tma=False)
    assert "wgmma.mma_async" in facts["ptx"], "dots did not lower to Hopper's wgmma"
    assert "cp.async" in facts["ptx"], "tiles are not loaded asynchronously"
    assert facts["shared"] <= 227 * 1024


def _key(kind, path, d, flags, fused=False):
    """The tuning key of a bf16 call with head dims ``d`` and constexpr ``flags`` (as ``_Call.key``)."""
    from seqgen_fast.kernels import attention as kernel

    names = {**dict(ALIBI=False, BAND_LEFT=False, BAND_RIGHT=False, BOTTOM_RIGHT=True, DROPOUT=False, HAS_MASK=False,
                    IEEE=False, IS_VARLEN=False, MASK_BOOL=False, SOFTCAP=False, TMA=True), **flags}
    key = (kind, path, "bfloat16", kernel.block_dim(d), kernel.block_dim(d), tuple(sorted(names.items())), 4096, 4096)
    return key + (("fused" if fused else "det"),) if kind == "dkdv" else key


def _shipped_classes():
    """(kind, path, head dim, flags, config) of the shipped table: per kind, path, head dim and
    config the entry with the most features (a window's band costs the most registers)."""
    import ast

    from seqgen_fast.kernels import attention_tuned

    heaviest = {}
    for kind, table in attention_tuned.TABLE.items():
        for text, cfg in table["NVIDIA H100"].items():
            _, _, path, _, d, _, flags = text.split("|")[:7]
            named = tuple(sorted((k, v) for k, v in ast.literal_eval(flags) if v and k not in ("TMA", "BOTTOM_RIGHT")))
            at = (kind, path, int(d), tuple(cfg))
            if len(named) >= len(heaviest.get(at, ())):
                heaviest[at] = named
    return [(kind, path, d, flags, cfg) for (kind, path, d, cfg), flags in heaviest.items()]


# Feature classes beyond the shipped (anchor) ones whose Hopper defaults must compile spill-free too
HOPPER_CLASSES = [
    ("fwd", 128, dict(HAS_MASK=True, MASK_BOOL=True, BAND_RIGHT=True)),
    ("fwd", 256, dict(BAND_RIGHT=True, SOFTCAP=True)),
    ("dkdv", 128, dict(BAND_LEFT=True, BAND_RIGHT=True, SOFTCAP=True, ALIBI=True)),
    ("dq", 128, dict(DROPOUT=True, HAS_MASK=True, BAND_RIGHT=True)),
]
_KERNEL = {"fwd": "_attn_fwd", "dkdv": "_attn_bwd_dkdv", "dq": "_attn_bwd_dq"}


def _hopper_cases():
    from seqgen_fast.kernels import attention as kernel

    cases = [(kind, d, dict(flags), cfg) for kind, path, d, flags, cfg in _shipped_classes() if path == kernel.HOPPER]
    return cases + [(kind, d, flags, tuple(kernel._candidates(_key(kind, kernel.HOPPER, d, flags))[0].as_list()))
                    for kind, d, flags in HOPPER_CLASSES]


@pytest.mark.parametrize("case", _hopper_cases(), ids=lambda c: f"{c[0]}-D{c[1]}-{'-'.join(c[2]) or 'plain'}")
def test_hopper_default_configs_use_tma_and_wgmma_without_spills(case):
    """The ``tl`` kernels' Hopper lowering in its shipped and default configs: tiles move by TMA
    (cp.async.bulk.tensor), dots run on wgmma that ptxas keeps pipelined (no "serialized" note), no
    register spills, shared memory fits. ``SEQGEN_FAST_AOT_PYTHON`` reruns it with another Triton."""
    kind, d, flags, cfg = case
    facts = compile_variant(_KERNEL[kind], d, d, cfg, dict(flags), tma=True)
    ptx = facts["ptx"]
    assert "cp.async.bulk.tensor" in ptx, "tiles are not moved by TMA"
    assert "wgmma.mma_async" in ptx, "dots did not lower to wgmma"
    assert facts["spill_bytes"] == 0, f"{facts['spill_bytes']} bytes spilled under triton {facts['triton']}"
    assert not [w for w in facts["ptxas_warnings"] if "serialized" in w], facts["ptxas_warnings"]
    assert facts["shared"] <= 227 * 1024


def test_fused_dq_adds_through_a_tma_reduction():
    """The dK/dV pass with fused dQ (Ampere's default, forced with fused_dq=True on Hopper) adds its
    dQ tiles with TMA bulk reductions (no per-element addresses in registers) on the Hopper lowering.
    Its spills are recorded in benchmarks/NOTES.md: why the separate dQ pass is Hopper's default."""
    facts = compile_variant("_attn_bwd_dkdv", 128, 128, (64, 64, 8, 2), dict(FUSED_DQ=True, BAND_RIGHT=True), tma=True)
    assert "cp.reduce.async.bulk.tensor" in facts["ptx"] and "wgmma.mma_async" in facts["ptx"]
    assert "red.global.add" not in facts["ptx"] and "atom.global" not in facts["ptx"]


def compile_ws(d, block_n, stages, flags):
    """Facts of the Gluon warp-specialised forward compiled ahead of time for sm_90a (bf16)."""
    from seqgen_fast.kernels import attention as kernel, attention_gluon

    names = attention_gluon.attn_fwd_ws.arg_names
    const = {**dict(D=d, BLOCK_D=max(kernel.block_dim(d), 32), BOTTOM_RIGHT=True, IS_VARLEN=False, SOFTCAP=False,
                    ALIBI=False, BAND_LEFT=False, BAND_RIGHT=False, BLOCK_N=block_n, STAGES=stages), **flags}
    types = {**pointers("bf16", "Q", "K", "V", "O"), **pointers("fp32", "LSE", "SLOPES"),
             **pointers("i32", "CU_Q", "CU_K"), **{n: "fp32" for n in ("qk_scale", "softcap_scale", "softcap_mul")}}
    aligned = [n for n in names if n.startswith("stride_") and n[-1] in "bhmn" and n[7] != "a" and n != "stride_lm"]
    return compile_sm90("seqgen_fast.kernels.attention_gluon", "attn_fwd_ws", types=types, constexprs=const,
                        aligned=aligned, num_warps=4, num_stages=1)


def _trace(text: str, sass: bool) -> str:
    """The order of a kernel's wgmma issues (W), waits (w0/w1: at most 0/1 groups pending) and
    exponentials (e) in its PTX or SASS text, one letter per instruction."""
    out = []
    for line in text.splitlines():
        op = line.split("*/")[1] if sass and "*/" in line else line
        op = op.split(";")[0].strip()
        op = op.split(None, 1)[-1] if op.startswith("@") else op
        if op.startswith(("wgmma.mma_async", "HGMMA")):
            out.append("W")
        elif op.startswith(("wgmma.wait_group", "WARPGROUP.DEPBAR")):
            out.append("w" + op.rstrip(" ;")[-1])
        elif op.startswith(("ex2.approx", "MUFU.EX2")):
            out.append("e")
    return "".join(out)


WS_CASES = {  # the shipped (anchor) classes, then the heaviest feature class
    "D128-causal": (128, dict(BAND_RIGHT=True)),
    "D64": (64, {}),
    "D128-window": (128, dict(BAND_LEFT=True, BAND_RIGHT=True)),
    "D96-band-softcap-alibi-varlen": (96, dict(BAND_LEFT=True, BAND_RIGHT=True, SOFTCAP=True, ALIBI=True,
                                               IS_VARLEN=True)),
}
# Spill bytes per Triton version where no config of the class compiled spill-free under both
# versions (the consumers sit at their 240 registers; benchmarks/NOTES.md); 0 everywhere else
WS_SPILLS = {("D128-window", "3.9"): 20, ("D96-band-softcap-alibi-varlen", "3.6"): 44}


@pytest.mark.parametrize("name", list(WS_CASES))
def test_warp_specialized_forward_overlaps_softmax_with_wgmma(name):
    """The Gluon forward's default config: TMA loads, wgmma, warp specialisation with register
    reallocation (consumers raised to 240, the producer lowered to 24), no spills, and in every key
    loop the intra-warpgroup pipeline: two wgmma groups issued (S_j, then O += P_{j-1} V_{j-1}),
    wait_group 1, the block's exponentials, wait_group 0, in the PTX and in ptxas's SASS order."""
    from seqgen_fast.kernels import attention as kernel

    d, flags = WS_CASES[name]
    cfg = kernel._candidates(_key("fwd", kernel.WARP_SPECIALIZED, d, flags))[0]
    facts = compile_ws(d, cfg.block_n, cfg.num_stages, flags)
    ptx = facts["ptx"]
    assert "cp.async.bulk.tensor" in ptx and "wgmma.mma_async" in ptx
    assert "setmaxnreg.inc.sync.aligned.u32 \t240" in ptx and "setmaxnreg.dec.sync.aligned.u32 \t24" in ptx
    budget = WS_SPILLS.get((name, facts["triton"][:3]), 0)
    assert facts["spill_bytes"] <= budget, f"{facts['spill_bytes']} bytes spilled under triton {facts['triton']}"
    assert not [w for w in facts["ptxas_warnings"] if "serialized" in w], facts["ptxas_warnings"]
    assert facts["shared"] <= 227 * 1024
    # each thread's share of a 64 x BLOCK_N score tile is BLOCK_N / 2 exponentials; each consumer
    # warpgroup has two or three key loops (a range the band makes empty is folded away)
    pipelined = re.compile(r"W{2,}w1e{%d,}w0" % (cfg.block_n // 2))
    assert len(pipelined.findall(_trace(ptx, sass=False))) >= 4, "no key loop waits for S only, then exp2"
    if facts["sass"]:  # ptxas keeps the exponentials between the two waits (behind the branch)
        assert len(pipelined.findall(_trace(facts["sass"], sass=True))) >= 4, "ptxas moved the wait for P V up"


def _emulated_forward(q, k, v, cu, scale, causal, feat, cfg, programs):
    """The Gluon forward run by tests/support/gluon_emulation on the launch arguments the kernel
    module builds for it; outputs poisoned first."""
    from seqgen_fast.kernels import attention as kernel, attention_gluon
    from support import gluon_emulation

    c = kernel._prepare(q, k, v, None, *cu, scale, causal, feat, kernel.WARP_SPECIALIZED)
    out = poison(attention_output(q, v.shape[-1]))
    lse = torch.full(q.shape[:3], float("nan"))
    if cu[0] is not None:  # as attention_fwd: packed rows past the last sequence are 0 / -inf
        out.zero_()
        lse.fill_(float("-inf"))
    args, consts = kernel.ws_arguments(q, k, v, out, lse, c, cfg)
    gluon_emulation.launch(attention_gluon.attn_fwd_ws, programs, *args, **consts)
    return out, lse


WS_EMULATED = {
    "dense_L200_S300_gqa": dict(B=1, H=4, Hk=2, L=200, S=300, D=64, causal=0, feat={}),
    "causal_bottom_right_L300_S100": dict(B=1, H=2, Hk=1, L=300, S=100, D=64, causal=BOTTOM_RIGHT, feat={}),
    "causal_top_left_D32_two_batches": dict(B=2, H=2, Hk=1, L=130, S=257, D=32, causal=TOP_LEFT, feat={}),
    "window_D96_padded": dict(B=1, H=2, Hk=2, L=257, S=600, D=96, causal=0, feat=dict(window_left=100,
                                                                                        window_right=30)),
    "softcap_alibi_causal": dict(B=1, H=2, Hk=2, L=200, S=200, D=64, causal=BOTTOM_RIGHT,
                                 feat=dict(softcap=2.5, alibi=True)),
    "varlen_window_fp16": dict(B=0, H=2, Hk=1, L=0, S=0, D=64, causal=BOTTOM_RIGHT, feat=dict(window_left=20),
                               varlen=True, dtype=torch.float16),
    "single_row": dict(B=1, H=1, Hk=1, L=1, S=1, D=128, causal=BOTTOM_RIGHT, feat={}),
}


@pytest.mark.parametrize("name", list(WS_EMULATED))
def test_warp_specialized_forward_emulated(name):
    """The Gluon forward, run on the CPU by the Gluon emulation (partitions as threads, mbarrier
    phases and TMA transaction bytes, async wgmma read at their wait: deadlocks, buffers released
    early and results used before their wait fail), against the float64 reference: dense and
    varlen, GQA, both causal conventions, windows, softcap, ALiBi, padded head dims, rows that see
    no key, more tiles than programs (the persistent loop)."""
    from seqgen_fast.kernels import attention as kernel

    case = WS_EMULATED[name]
    dtype = case.get("dtype", torch.bfloat16)
    torch.manual_seed(0)
    feat = dict(case["feat"])
    if feat.pop("alibi", False):
        feat["alibi"] = torch.rand(max(case["B"], 1), case["H"])
    feat = Features(**feat)
    if case.get("varlen"):
        cu_q = torch.tensor([0, 50, 51, 300], dtype=torch.int32)
        cu_k = torch.tensor([0, 70, 200, 410], dtype=torch.int32)
        cu = (cu_q, cu_k, 249, 210)
        q = rand(300, case["H"], case["D"], dtype=dtype).transpose(0, 1)[None]
        k, v = (rand(410, case["Hk"], case["D"], dtype=dtype).transpose(0, 1)[None] for _ in range(2))
    else:
        cu = (None, None, 0, 0)
        q = rand(case["B"], case["L"], case["H"], case["D"], dtype=dtype).transpose(1, 2)
        k, v = (rand(case["B"], case["S"], case["Hk"], case["D"], dtype=dtype).transpose(1, 2) for _ in range(2))
    out, lse = _emulated_forward(q, k, v, cu, 0.3, case["causal"], feat, kernel.Config(128, 64, 4, 2), programs=3)
    ref, ref_lse = reference.attention_fwd(q.double(), k.double(), v.double(), None, *cu, 0.3, case["causal"], feat)
    assert_close_rel(out, ref, 1e-2 if dtype == torch.bfloat16 else 2e-3, "out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), "rows without a visible key"
    assert_close_rel(lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0), 1e-5, "lse")


def test_varlen_rows_outside_every_sequence_are_zero(device):
    q = rand(9, 2, 32, dtype=torch.float16, device=device, grad=True)
    k = rand(12, 2, 32, dtype=torch.float16, device=device, grad=True)
    cu_q = torch.tensor([0, 3, 7], dtype=torch.int32, device=device)  # rows 7, 8 of q: no sequence
    cu_k = torch.tensor([0, 5, 10], dtype=torch.int32, device=device)  # rows 10, 11 of k: no sequence
    for backend in ("triton", "reference"):
        out = flash_attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, backend=backend)
        dq, dk = torch.autograd.grad(out, (q, k), torch.ones_like(out))
        assert torch.all(out[7:] == 0) and torch.all(dq[7:] == 0) and torch.all(dk[10:] == 0), backend
        assert out[:7].abs().sum() > 0


def test_sequences_past_32_bit_offsets_go_to_another_backend():
    """One sequence of 2^18 + 1 rows x 64 heads x 128 in the flash layout spans 2^31 + 128 elements: the
    kernels' 32-bit offsets within a sequence cannot address it, so the dispatcher must say so (meta
    tensors: nothing is allocated). 2^18 rows fit; so does the (B, H, L, D) layout of either size."""
    L = 2**18 + 1
    flash = torch.empty(1, L, 64, 128, device="meta", dtype=torch.bfloat16).transpose(1, 2)
    why = ops._kernel_reasons(flash, flash, flash, None, None)
    for name in ("query", "key", "value", "output"):
        assert any(r.startswith(f"{name}: one sequence spans 2147483776 elements") for r in why), why
    fits = flash[:, :, :-1]
    assert not [r for r in ops._kernel_reasons(fits, fits, fits, None, None) if "32-bit" in r]
    heads_outer = torch.empty(1, 64, L, 128, device="meta", dtype=torch.bfloat16)
    assert not [r for r in ops._kernel_reasons(heads_outer, heads_outer, heads_outer, None, None) if "32-bit" in r]


def test_varlen_offsets_past_the_end_are_clamped(device):
    """flash_attention rejects offsets that are not prefix sums of the packed rows under
    debug_checks(); otherwise (the default: no host read) the kernel clamps them (no access outside
    k/v), matching the reference's slicing."""
    q = rand(9, 2, 32, dtype=torch.float16, device=device)
    k = rand(12, 2, 32, dtype=torch.float16, device=device)
    cu_q = torch.tensor([0, 3, 9], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 9, 40], dtype=torch.int32, device=device)
    with debug_checks(), pytest.raises(ValueError, match="cu_seqlens_k must be prefix sums"):
        flash_attention(q, k, k, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, max_seqlen_q=6, max_seqlen_k=31)
    q4, k4 = (t.transpose(0, 1)[None] for t in (q, k))
    out = ops.attention(q4, k4, k4, None, cu_q, cu_k, 6, 31, scale=0.2, causal=BOTTOM_RIGHT, backend="triton")[0]
    ref = ops.attention(q4.double(), k4.double(), k4.double(), None, cu_q, cu_k, 6, 31, scale=0.2,
                        causal=BOTTOM_RIGHT, backend="reference")[0]
    assert_close_rel(out, ref, 2e-3)


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_torch_compile_fullgraph(backend, device):
    """Both public functions trace into one graph (backend choice happens at trace time)."""
    q = rand(1, 7, 2, 32, dtype=torch.float16, device=device)

    def fn(x):
        a = flash_attention(x, x, x, causal=True, backend=backend)
        b = scaled_dot_product_attention(x.transpose(1, 2), x.transpose(1, 2), x.transpose(1, 2), is_causal=True,
                                         backend=backend)
        return a + b.transpose(1, 2)

    torch._dynamo.reset()
    assert_close_rel(torch.compile(fn, fullgraph=True)(q), fn(q), 1e-3)


# ----------------------------------------------------------------------------------------------
# opcheck of the ops (fake, autograd registration, schema)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_opcheck(backend, device):
    # the reference computes in float32 and rounds; float64 keeps eager and AOT gradients bit-close
    dtype = torch.float16 if backend == "triton" else F64
    q = rand(1, 2, 7, 32, dtype=dtype, device=device, grad=True)
    k = rand(1, 2, 33, 32, dtype=dtype, device=device, grad=True)
    v = rand(1, 2, 33, 32, dtype=dtype, device=device, grad=True)
    mask = torch.rand(7, 33, device=device) > 0.3
    feats = (-1, -1, 0.0, 0.0, False, backend, False)  # window, softcap, dropout, deterministic, backend, tune
    with use_backend(backend):
        torch.library.opcheck(ops._attention_fwd, (q, k, v, mask, None, None, None, None, 0, 0, 0.2, TOP_LEFT,
                                                   *feats))
        out, lse = ops._attention_fwd(q, k, v, None, None, None, None, None, 0, 0, 0.2, BOTTOM_RIGHT, *feats)
        args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), out.detach(), lse, None, None, None,
                None, None, 0, 0, 0.2, BOTTOM_RIGHT, *feats)
        torch.library.opcheck(ops._attention_bwd, args, test_utils=("test_schema", "test_faketensor"))
        # distinct q, k, v: one tensor in three roles would sum three fp16 gradients in an order
        # eager and AOT autograd need not share
        qv, kv, vv = (rand(12, 2, 32, dtype=dtype, device=device).transpose(0, 1)[None].requires_grad_()
                      for _ in range(3))
        cu = torch.tensor([0, 5, 12], dtype=torch.int32, device=device)
        slopes = torch.rand(2, 2, device=device)  # ALiBi and a window through the op too
        torch.library.opcheck(ops._attention_fwd, (qv, kv, vv, None, cu, cu, slopes, None, 7, 7, 0.2, BOTTOM_RIGHT,
                                                   3, -1, 0.0, 0.0, False, backend, False))


# ----------------------------------------------------------------------------------------------
# Bad input: a clear exception naming the argument (checked before any backend runs)
# ----------------------------------------------------------------------------------------------
def _sdpa_bad(name):
    q, k, v = rand(2, 4, 7, 8), rand(2, 4, 9, 8), rand(2, 4, 9, 8)
    return {
        "key_head_dim": ((q, rand(2, 4, 9, 6), v), {}, "key head dim"),
        "value_len": ((q, k, rand(2, 4, 8, 8)), {}, "value has 8"),
        "key_batch": ((q, rand(3, 4, 9, 8), rand(3, 4, 9, 8)), {}, "key batch dims"),
        "gqa_heads": ((q, rand(2, 3, 9, 8), rand(2, 3, 9, 8)), dict(enable_gqa=True), "key heads"),
        "mask_shape": ((q, k, v), dict(attn_mask=torch.ones(7, 8, dtype=torch.bool)), "attn_mask shape"),
        "mask_dtype": ((q, k, v), dict(attn_mask=torch.ones(7, 9, dtype=torch.int32)), "attn_mask dtype"),
        "mask_and_causal": ((q, k, v), dict(attn_mask=torch.ones(7, 9, dtype=torch.bool), is_causal=True),
                            "attn_mask must be None"),
        "key_dtype": ((q, k.float(), v), {}, "key dtype"),
        "int_query": ((q.long(), k.long(), v.long()), {}, "query dtype"),
        "one_dim": ((q[0, 0, 0], k, v), {}, "query must be"),
        "dropout": ((q, k, v), dict(dropout_p=1.5), "dropout_p"),
    }[name]


@pytest.mark.parametrize("name", ["key_head_dim", "value_len", "key_batch", "gqa_heads", "mask_shape", "mask_dtype",
                                  "mask_and_causal", "key_dtype", "int_query", "one_dim", "dropout"])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_sdpa_bad_input(name, backend):
    args, kw, words = _sdpa_bad(name)
    with pytest.raises((ValueError, TypeError), match=words):
        scaled_dot_product_attention(*args, **kw, backend=backend)


@pytest.mark.parametrize("name,words", [
    ("batch", "k batch"), ("heads", "multiple of k heads"), ("head_dim", "k head dim"), ("v_shape", "v shape"),
    ("layout", "q must be"), ("cu_missing", "both cu_seqlens"), ("cu_dtype", "cu_seqlens_q dtype"),
    ("cu_values", "cu_seqlens_k must be prefix sums"), ("cu_count", "cu_seqlens_k has"), ("dtype", "k dtype"),
])
def test_flash_attention_bad_input(name, words):
    h = torch.float16
    q, k, v = rand(2, 7, 4, 32, dtype=h), rand(2, 9, 2, 32, dtype=h), rand(2, 9, 2, 32, dtype=h)
    qp, kp = rand(10, 4, 32, dtype=h), rand(12, 2, 32, dtype=h)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32)
    cases = {
        "batch": ((q, rand(3, 9, 2, 32, dtype=h), rand(3, 9, 2, 32, dtype=h)), {}),
        "heads": ((q, rand(2, 9, 3, 32, dtype=h), rand(2, 9, 3, 32, dtype=h)), {}),
        "head_dim": ((q, rand(2, 9, 2, 16, dtype=h), v), {}),
        "v_shape": ((q, k, rand(2, 8, 2, 32, dtype=h)), {}),
        "layout": ((q[0], k[0], v[0]), {}),
        "cu_missing": ((qp, kp, kp), dict(cu_seqlens_q=cu)),
        "cu_dtype": ((qp, kp, kp), dict(cu_seqlens_q=cu.float(), cu_seqlens_k=cu)),
        "cu_values": ((qp, kp, kp), dict(cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 9, 20]))),
        "cu_count": ((qp, kp, kp), dict(cu_seqlens_q=cu, cu_seqlens_k=torch.tensor([0, 12]))),
        "dtype": ((q, k.float(), v), {}),
    }
    args, kw = cases[name]
    with debug_checks(), pytest.raises((ValueError, TypeError), match=words):  # cu_values: a host-read check
        flash_attention(*args, **kw)


# ----------------------------------------------------------------------------------------------
# GPU: every head dim x dtype x causal x GQA x varlen, odd lengths, backward, memory
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("gqa", [1, 4])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("head_dim", [32, pytest.param(64, marks=pytest.mark.smoke), 96, 128, 256])
def test_gpu_flash_attention_grid(head_dim, dtype, causal, gqa, varlen):
    dev = "cuda"
    hk = 2
    h = hk * gqa
    if varlen:
        lens_q, lens_k = [1, 97, 1025, 7], [7, 97, 1000, 1025]
        cu_q = torch.tensor([0] + torch.tensor(lens_q).cumsum(0).tolist(), device=dev, dtype=torch.int32)
        cu_k = torch.tensor([0] + torch.tensor(lens_k).cumsum(0).tolist(), device=dev, dtype=torch.int32)
        shapes = ((sum(lens_q), h, head_dim), (sum(lens_k), hk, head_dim))
        kw, cu = dict(cu_seqlens_q=cu_q, cu_seqlens_k=cu_k), (cu_q, cu_k)
    else:
        shapes = ((2, 97, h, head_dim), (2, 1025, hk, head_dim))
        kw, cu = {}, ()
    q = rand(*shapes[0], dtype=dtype, device=dev, grad=True)
    k, v = rand(*shapes[1], dtype=dtype, device=dev, grad=True), rand(*shapes[1], dtype=dtype, device=dev, grad=True)
    out = flash_attention(q, k, v, causal=causal, **kw)
    go = torch.randn_like(out)
    ours = [out, *torch.autograd.grad(out, (q, k, v), go)]

    def run(fn, dtype_):
        ins = [t.detach().to(dtype_).requires_grad_() for t in (q, k, v)]
        o = flash_via(fn, *ins, causal, *cu)
        return [o, *torch.autograd.grad(o, ins, go.to(dtype_))]

    low, exact = run(lowp_sdpa, dtype), run(torch_sdpa, F64)
    for what, a, b, c in zip(["out", "dq", "dk", "dv"], ours, low, exact):
        assert_flash_rule(a, b, c, f"{what} D{head_dim} {dtype} causal={causal} gqa={gqa} varlen={varlen}")


@pytest.mark.gpu
@pytest.mark.parametrize("L,S", [(1, 1), (1, 1025), (7, 97), (97, 7), (1025, 1025), (1025, 97)])
@pytest.mark.parametrize("mask", ["none", "causal", "bool", "float"])
@pytest.mark.parametrize("head_dim", [pytest.param(64, marks=pytest.mark.smoke), 128])
def test_gpu_sdpa_odd_lengths(L, S, mask, head_dim):
    dev, dtype = "cuda", torch.bfloat16
    kw = {}
    if mask == "causal":
        kw = dict(is_causal=True)
    elif mask == "bool":
        kw = dict(attn_mask=torch.rand(2, 1, L, S, device=dev) > 0.3)
    elif mask == "float":
        kw = dict(attn_mask=torch.randn(L, S, device=dev, dtype=dtype))
    q = rand(2, 4, L, head_dim, dtype=dtype, device=dev)
    k, v = rand(2, 4, S, head_dim, dtype=dtype, device=dev), rand(2, 4, S, head_dim, dtype=dtype, device=dev)
    assert ops.SDPA.select(q, k, v, kw.get("attn_mask"), 0.0, kw.get("is_causal", False), None, False) == "triton"
    ours, low, exact = run_sdpa_both(q, k, v, rand(2, 4, L, head_dim, dtype=dtype, device=dev), **kw)
    for what, a, b, c in zip(["out", "dq", "dk", "dv"], ours, low, exact):
        assert_flash_rule(a, b, c, f"{what} L{L} S{S} {mask} D{head_dim}")


@pytest.mark.gpu
def test_gpu_peak_memory_is_linear_in_seq_len():
    """At S = 16384 an L x S score matrix would be 1 GiB per head in fp32; ours must stay O(S)."""
    dev, dtype, S, H, D = "cuda", torch.bfloat16, 16384, 4, 64
    q, k, v = (rand(1, S, H, D, dtype=dtype, device=dev, grad=True) for _ in range(3))
    flash_attention(q, k, v, causal=True).sum().backward()  # compile / autotune outside the measurement
    q.grad = k.grad = v.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = flash_attention(q, k, v, causal=True)
    out.backward(torch.ones_like(out))
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    tensor_bytes = q.numel() * q.element_size()
    assert extra < 16 * tensor_bytes, f"peak extra memory {extra / 2**20:.1f} MiB is not O(S)"


def test_forward_path_reasons_without_a_hopper_gpu():
    """What the Gluon forward declines, with the reason that routes the call to the ``tl`` kernels."""
    from seqgen_fast.kernels import attention as kernel, attention_gluon

    q = rand(1, 2, 7, 64, dtype=torch.bfloat16)
    assert kernel.forward_path(q.device, q.dtype, q, q, q, False, False)[0] == kernel.PORTABLE
    assert attention_gluon.reasons(False, False, 128, 128) == []
    why = attention_gluon.reasons(True, True, 256, 64)
    assert [w.split(" ")[0] for w in why] == ["an", "dropout", "head", "head"], why


@pytest.mark.gpu
@pytest.mark.parametrize("case", [pytest.param("D128-causal", marks=pytest.mark.smoke), "D64-window-softcap-alibi",
                                  "D96-varlen-gqa"])
def test_gpu_warp_specialized_forward_matches_the_twin_and_float64(case):
    """On sm_90 the Gluon forward runs (forward_path) and agrees with its ``tl`` twin on the Hopper
    lowering and with float64: odd lengths, more tiles than SMs, the features it takes."""
    from seqgen_fast.kernels import attention as kernel

    dev, dtype = "cuda", torch.bfloat16
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the warp-specialised forward is Hopper's")
    d = {"D128-causal": 128, "D64-window-softcap-alibi": 64, "D96-varlen-gqa": 96}[case]
    h, hk = (8, 2) if "gqa" in case else (4, 4)
    feat = Features()
    if "window" in case:
        feat = Features(window_left=300, window_right=40, softcap=30.0, alibi=torch.rand(2, h, device=dev))
    cu = (None, None, 0, 0)
    if "varlen" in case:
        lens = [1, 700, 1333, 64]
        cu_t = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=dev)
        cu = (cu_t, cu_t, max(lens), max(lens))
        q = rand(sum(lens), h, d, dtype=dtype, device=dev).transpose(0, 1)[None]
        k, v = (rand(sum(lens), hk, d, dtype=dtype, device=dev).transpose(0, 1)[None] for _ in range(2))
    else:
        q = rand(2, 2049, h, d, dtype=dtype, device=dev).transpose(1, 2)
        k, v = (rand(2, 3001, hk, d, dtype=dtype, device=dev).transpose(1, 2) for _ in range(2))
    causal = BOTTOM_RIGHT if "causal" in case or "varlen" in case else 0
    assert kernel.forward_path(q.device, q.dtype, q, k, v, False, False)[0] == kernel.WARP_SPECIALIZED
    ours, lse = kernel.attention_fwd(q, k, v, None, *cu, 0.1, causal, feat)
    twin, twin_lse = kernel.attention_fwd(q, k, v, None, *cu, 0.1, causal, feat, path=kernel.HOPPER)
    ref, ref_lse = reference.attention_fwd(q.double(), k.double(), v.double(), None, *cu, 0.1, causal, feat)
    for name, out in (("warp-specialised", ours), ("twin", twin)):
        assert_close_rel(out, ref, 1e-2, f"{name} out")
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)) and torch.equal(torch.isneginf(twin_lse),
                                                                                       torch.isneginf(ref_lse))
    assert_close_rel(lse.nan_to_num(neginf=0.0), ref_lse.nan_to_num(neginf=0.0), 1e-5, "lse")
    assert_close_rel(ours, twin, 1e-2, "warp-specialised vs twin")


NAN_VARIANTS = [  # the default Hopper forward (TMA), the portable one (Ampere, float32, odd strides), features
    ("_attn_fwd", 128, 128, (128, 64, 8, 3), dict(BAND_RIGHT=True), True),
    ("_attn_fwd", 64, 64, (64, 64, 4, 2), {}, False),
    ("_attn_fwd", 96, 64, (128, 64, 8, 3), dict(BAND_LEFT=True, BAND_RIGHT=True, SOFTCAP=True, ALIBI=True), True),
]


@pytest.mark.parametrize("variant", NAN_VARIANTS, ids=["hopper", "portable", "hopper-features"])
def test_compiled_forward_running_max_keeps_nan(variant):
    """The non-finite policy when compiled (not only under the interpreter, whose numpy max keeps NaN):
    every float max of the forward -- the online softmax's row max and running max -- is the
    NaN-keeping ``max.NaN.f32`` (SASS ``FMNMX.NAN``), never ``tl.maximum``/``tl.max``'s default
    NaN-dropping ``max.f32``."""
    from support.aot import float_max_forms

    name, d, dv, blocks, flags, tma = variant
    forms = float_max_forms(compile_variant(name, d, dv, blocks, flags, tma=tma))
    assert forms["nan_ptx"] > 0 and forms["drop_ptx"] == 0, forms
    assert forms["drop_sass"] == 0, forms


def test_compiled_gluon_forward_running_max_keeps_nan():
    """As test_compiled_forward_running_max_keeps_nan, for the Gluon warp-specialised Hopper forward."""
    from support.aot import float_max_forms

    forms = float_max_forms(compile_ws(128, 128, 2, {}))
    assert forms["nan_ptx"] > 0 and forms["drop_ptx"] == 0, forms
    assert forms["drop_sass"] == 0, forms
