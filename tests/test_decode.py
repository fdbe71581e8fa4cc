"""KV-cache decode attention: reference vs torch's SDPA, Triton kernel vs float64 reference.

The CPU runs the Triton kernel under the interpreter in float32 and float16 only: Triton 3.9's
interpreter computes ``tl.dot`` of bfloat16 operands wrongly (errors of 1e10 on a 16x16 product),
so bfloat16 is covered by the ``gpu`` tests.
"""
import math

import pytest
import torch
import torch.nn.functional as F

from seqgen_fast import use_backend
from seqgen_fast.functional import decode_attention
from seqgen_fast.kernels import decode as kernel
from seqgen_fast.reference import decode as reference
from support.aot import compile_sm90, pointers
from support.utils import TOL, assert_close_rel


def make(batch, hq, hkv, s_max, head_dim, dtype, device="cpu"):
    q = torch.randn(batch, hq, head_dim, device=device, dtype=dtype)
    k = torch.randn(batch, s_max, hkv, head_dim, device=device, dtype=dtype)
    v = torch.randn_like(k)
    k_new = torch.randn(batch, hkv, head_dim, device=device, dtype=dtype)
    v_new = torch.randn_like(k_new)
    return q, k, v, k_new, v_new


def sdpa_per_sequence(q, k, v, lens, scale):
    """torch's SDPA (enable_gqa) on each sequence's valid prefix: an independent ground truth."""
    outs = []
    for b, n in enumerate(lens.tolist()):
        qb = q[b][None, :, None, :]                          # (1, Hq, 1, D)
        kb = k[b, :n].transpose(0, 1)[None]                  # (1, Hkv, n, D)
        vb = v[b, :n].transpose(0, 1)[None]
        outs.append(F.scaled_dot_product_attention(qb, kb, vb, scale=scale, enable_gqa=True)[0, :, 0])
    return torch.stack(outs)


@pytest.mark.parametrize("append", [False, True])
def test_reference_matches_torch_sdpa(append):
    q, k, v, k_new, v_new = make(4, 6, 2, 40, 16, torch.float64)
    lens = torch.tensor([1, 17, 39, 40 - append], dtype=torch.int32)
    scale = 0.3
    k_ref, v_ref = k.clone(), v.clone()
    out = reference.decode_attention(q, k, v, lens, k_new if append else None, v_new if append else None, scale)
    if append:
        k_ref[torch.arange(4), lens.long()] = k_new
        v_ref[torch.arange(4), lens.long()] = v_new
        assert torch.equal(k, k_ref) and torch.equal(v, v_ref)
    assert_close_rel(out, sdpa_per_sequence(q, k_ref, v_ref, lens + append, scale), 1e-12)


# (batch, Hq, Hkv, S_max, D, dtype, num_splits): odd sizes, GQA 1/2/3/4, non-power-of-2 head dims,
# one split, forced splits (some of them empty) and the heuristic.
INTERP_CASES = [
    pytest.param(3, 4, 2, 97, 64, torch.float32, 0, marks=pytest.mark.smoke),
    (2, 3, 1, 33, 80, torch.float32, 3),
    (3, 2, 2, 97, 32, torch.float16, 1),
    (1, 8, 2, 130, 128, torch.float16, 5),
    (2, 2, 1, 70, 256, torch.float32, 2),  # D > 128: 32-key tiles
]


@pytest.mark.parametrize("append", [False, True])
@pytest.mark.parametrize("batch,hq,hkv,s_max,head_dim,dtype,splits", INTERP_CASES)
def test_triton_matches_reference(batch, hq, hkv, s_max, head_dim, dtype, splits, append):
    q, k, v, k_new, v_new = make(batch, hq, hkv, s_max, head_dim, dtype)
    lens = torch.randint(0, s_max - append, (batch,), dtype=torch.int32)
    lens[0] = s_max - append  # a full cache
    k64, v64 = k.double(), v.double()
    kw = dict(k_new=k_new, v_new=v_new) if append else {}
    with use_backend("triton"):
        out = decode_attention(q, k, v, lens, num_splits=splits, **kw)
    ref = reference.decode_attention(q.double(), k64, v64, lens, k_new.double() if append else None,
                                     v_new.double() if append else None, head_dim ** -0.5)
    assert out.dtype == dtype and out.shape == q.shape
    assert_close_rel(out, ref, TOL[dtype], "out")
    assert torch.equal(k.double(), k64) and torch.equal(v.double(), v64), "cache contents after the append"


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_empty_sequence_gives_zeros(backend):
    q, k, v, k_new, v_new = make(2, 4, 2, 20, 32, torch.float32)
    lens = torch.tensor([0, 5], dtype=torch.int32)
    with use_backend(backend):
        out = decode_attention(q, k, v, lens, num_splits=2)
        appended = decode_attention(q, k, v, lens, k_new=k_new, v_new=v_new)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert out[1].abs().sum() > 0
    # one token attended: the output is exactly its value row (softmax over one key is 1)
    group = q.shape[1] // k.shape[2]
    assert_close_rel(appended[0], v_new[0].repeat_interleave(group, dim=0), 1e-6)


def test_four_dim_layout_and_seqlens_not_incremented():
    q, k, v, k_new, v_new = make(2, 4, 2, 16, 32, torch.float32)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    out4 = decode_attention(q[:, None], k.clone(), v.clone(), lens, k_new=k_new[:, None], v_new=v_new[:, None])
    out3 = decode_attention(q, k, v, lens, k_new=k_new, v_new=v_new)
    assert out4.shape == (2, 1, 4, 32)
    assert torch.equal(out4[:, 0], out3)
    assert lens.tolist() == [3, 9]


def test_strided_cache_view():
    """A (B, S, Hkv, D) view of a transposed (B, Hkv, S, D) cache is read through its strides."""
    q, _, _, _, _ = make(2, 4, 2, 1, 32, torch.float32)
    k_bhsd = torch.randn(2, 2, 37, 32)
    v_bhsd = torch.randn(2, 2, 37, 32)
    lens = torch.tensor([37, 20], dtype=torch.int32)
    with use_backend("triton"):
        out = decode_attention(q, k_bhsd.transpose(1, 2), v_bhsd.transpose(1, 2), lens)
    ref = sdpa_per_sequence(q.double(), k_bhsd.transpose(1, 2).double(), v_bhsd.transpose(1, 2).double(), lens,
                            32 ** -0.5)
    assert_close_rel(out, ref, TOL[torch.float32])


@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_unchecked_lengths_are_clamped(backend):
    """With the host check off (as inside a CUDA graph) bad lengths are clamped, never read past the cache."""
    q, k, v, k_new, v_new = make(3, 2, 1, 24, 32, torch.float32)
    bad = torch.tensor([-5, 7, 1000], dtype=torch.int32)
    clamped = bad.clamp(0, 24)
    with use_backend(backend):
        out = decode_attention(q, k, v, bad, check_seqlens=False)
        k2, v2 = k.clone(), v.clone()
        out_app = decode_attention(q, k2, v2, bad, k_new=k_new, v_new=v_new, check_seqlens=False)
    assert_close_rel(out, reference.decode_attention(q, k, v, clamped, None, None, 32 ** -0.5), 1e-5)
    assert torch.equal(k2[2, 23], k_new[2]) and torch.equal(k2[0, 0], k_new[0])
    # the appended token lands at the clamped position and is attended over with the tokens before it
    appended = torch.tensor([1, 8, 24], dtype=torch.int32)
    assert_close_rel(out_app, reference.decode_attention(q, k2, v2, appended, None, None, 32 ** -0.5), 1e-5)


def test_bad_input_names_the_argument():
    q, k, v, k_new, v_new = make(2, 4, 2, 16, 32, torch.float32)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    with pytest.raises(ValueError, match="q batch"):
        decode_attention(q[:1], k, v, lens)
    with pytest.raises(ValueError, match="multiple of k_cache heads"):
        decode_attention(q[:, :3], k, v, lens)
    with pytest.raises(ValueError, match="q head dim"):
        decode_attention(q[..., :16], k, v, lens)
    with pytest.raises(ValueError, match="v_cache shape"):
        decode_attention(q, k, v[:, :8], lens)
    with pytest.raises(ValueError, match="cache_seqlens must be a"):
        decode_attention(q, k, v, lens.float())
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 16\]"):
        decode_attention(q, k, v, torch.tensor([3, 17], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cache_seqlens must lie in \[0, 15\]"):
        decode_attention(q, k, v, torch.tensor([16, 0], dtype=torch.int32), k_new=k_new, v_new=v_new)
    with pytest.raises(ValueError, match="k_new must be"):
        decode_attention(q, k, v, lens, k_new=k_new[:, :1], v_new=v_new)
    with pytest.raises(ValueError, match="both k_new and v_new"):
        decode_attention(q, k, v, lens, k_new=k_new)
    with pytest.raises(TypeError, match="k_cache .* must have q's dtype"):
        decode_attention(q, k.half(), v.half(), lens)


def test_num_splits_heuristic():
    # B1 Hkv8 S32768 on 132 SMs: 8 programs alone would leave the GPU idle -> split the sequence.
    splits = kernel.choose_num_splits(8, 32768, 128, 132)
    assert 8 <= splits <= kernel.MAX_SPLITS
    waves = 8 * splits / (132 * kernel.PROGRAMS_PER_SM)
    assert waves / math.ceil(waves) >= 0.85
    assert kernel.choose_num_splits(128 * 32, 2048, 128, 132) == 1   # B128 Hkv32: already many programs
    assert kernel.choose_num_splits(1, 40, 128, 132) == 1            # one key tile: nothing to split


def test_kernel_compiles_for_sm90_with_pipelined_vector_loads():
    """The bf16 D=128 GQA-4 split kernel, compiled for Hopper: K/V tiles must load as 16-byte vectors
    through cp.async (software-pipelined, two or more K+V stages in shared memory), else the kernel
    cannot approach HBM rate."""
    const = dict(HEAD_DIM=128, GROUP=4, BLOCK_G=16, BLOCK_N=64, BLOCK_D=128, SINGLE_SPLIT=False, APPEND=1,
                 DOT_PRECISION="tf32", stride_qd=1, stride_kd=1, stride_vd=1, stride_knd=1, stride_vnd=1, stride_od=1)
    names = kernel._decode_split_kernel.arg_names
    types = {**pointers("bf16", "Q", "K", "V", "KNEW", "VNEW", "O"), **pointers("fp32", "OPART", "LSE"),
             **pointers("i32", "SEQLENS"), "qk_scale": "fp32"}
    aligned = [n for n in names if n.startswith("stride_") and n not in const and n != "stride_len"]
    facts = compile_sm90("seqgen_fast.kernels.decode", "_decode_split_kernel", types=types, constexprs=const,
                         aligned=aligned, num_warps=4, num_stages=3)
    assert "cp.async.cg.shared.global" in facts["ptx"] and "cp.async.wait_group" in facts["ptx"]
    assert facts["shared"] >= 2 * 2 * 64 * 128 * 2


@pytest.mark.parametrize("append", [False, True])
def test_opcheck(append):
    q, k, v, k_new, v_new = make(2, 4, 2, 16, 32, torch.float32)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    if append:
        args = (q, k, v, lens, k_new, v_new, 0.2, 0, True, "reference")
        op = torch.ops.seqgen_fast.decode_attention_append
    else:
        args = (q, k, v, lens, 0.2, 0, True, "reference")
        op = torch.ops.seqgen_fast.decode_attention
    torch.library.opcheck(op, args)


def test_registered_check_passes():
    from seqgen_fast.checks import run_checks

    rows = run_checks(torch.device("cpu"), names=["decode_attention"], backends=("reference", "triton"))
    assert {r.backend for r in rows} == {"reference", "triton"}
    assert rows and all(r.status == "pass" for r in rows), rows


# ------------------------------------------------------------------------------------------------
# GPU
# ------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("head_dim", [32, pytest.param(64, marks=pytest.mark.smoke), 96, 128, 256])
@pytest.mark.parametrize("hq,hkv", [(32, 8), (8, 8), (16, 1)])
@pytest.mark.parametrize("append", [False, True])
def test_gpu_matches_float64(dtype, head_dim, hq, hkv, append):
    batch, s_max = 5, 3000
    q, k, v, k_new, v_new = make(batch, hq, hkv, s_max, head_dim, dtype, "cuda")
    lens = torch.tensor([0, 1, 777, 2999, s_max - append], dtype=torch.int32, device="cuda")
    k64, v64 = k.double(), v.double()
    kw = dict(k_new=k_new, v_new=v_new) if append else {}
    out = decode_attention(q, k, v, lens, **kw)
    ref = reference.decode_attention(q.double(), k64, v64, lens, k_new.double() if append else None,
                                     v_new.double() if append else None, head_dim ** -0.5)
    assert_close_rel(out, ref, TOL[dtype], "out")
    assert torch.equal(k.double(), k64) and torch.equal(v.double(), v64)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,hq,hkv,s_max", [(1, 32, 8, 32768), (32, 32, 8, 1024), (128, 32, 32, 256)])
def test_gpu_bench_shapes(batch, hq, hkv, s_max):
    q, k, v, _, _ = make(batch, hq, hkv, s_max, 128, torch.bfloat16, "cuda")
    lens = torch.full((batch,), s_max, dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, lens)
    ref = F.scaled_dot_product_attention(q[:, :, None].float(), k.transpose(1, 2).float(), v.transpose(1, 2).float(),
                                         enable_gqa=True)[:, :, 0]
    assert_close_rel(out, ref, TOL[torch.bfloat16])


@pytest.mark.gpu
def test_gpu_cuda_graph_replay_with_changing_lengths():
    batch, hq, hkv, s_max, head_dim = 4, 16, 4, 512, 128
    q, k, v, k_new, v_new = make(batch, hq, hkv, s_max, head_dim, torch.float16, "cuda")
    lens = torch.tensor([0, 10, 100, 300], dtype=torch.int32, device="cuda")
    out = decode_attention(q, k, v, lens, k_new=k_new, v_new=v_new)  # warm up (compile) outside capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = decode_attention(q, k, v, lens, k_new=k_new, v_new=v_new)
    k64, v64 = k.double(), v.double()
    for step in range(3):
        q.copy_(torch.randn_like(q))
        k_new.copy_(torch.randn_like(k_new))
        v_new.copy_(torch.randn_like(v_new))
        k64[torch.arange(batch), lens.long()] = k_new.double()
        v64[torch.arange(batch), lens.long()] = v_new.double()
        ref = reference.decode_attention(q.double(), k64, v64, lens + 1, None, None, head_dim ** -0.5)
        graph.replay()
        assert_close_rel(out, ref, TOL[torch.float16], f"step {step}")
        assert torch.equal(k.double(), k64)
        lens += 1 + step * 37  # lengths change between replays, inside the graph's memory


def test_backend_argument_forces_triton_on_cpu_interpreter():
    q, k, v, _, _ = make(1, 2, 1, 9, 32, torch.float32)
    lens = torch.tensor([9], dtype=torch.int32)
    out = decode_attention(q, k, v, lens, backend="triton")
    assert_close_rel(out, reference.decode_attention(q, k, v, lens, None, None, 32 ** -0.5), TOL[torch.float32])


def test_append_op_compiles_fullgraph():
    """The op (not the Python dispatch around it) traces: fake impl + declared cache mutation."""
    q, k, v, k_new, v_new = make(2, 4, 2, 16, 32, torch.float32)
    lens = torch.tensor([3, 9], dtype=torch.int32)
    expected = reference.decode_attention(q, k.clone(), v.clone(), lens, k_new, v_new, 0.2) + 1

    def step(q, k, v, lens, k_new, v_new):
        return torch.ops.seqgen_fast.decode_attention_append(q, k, v, lens, k_new, v_new, 0.2, 0, True,
                                                             "reference") + 1

    got = torch.compile(step, fullgraph=True, backend="aot_eager")(q, k, v, lens, k_new, v_new)
    assert_close_rel(got, expected, 1e-6)
    assert torch.equal(k[1, 9], k_new[1]) and torch.equal(v[0, 3], v_new[0])
