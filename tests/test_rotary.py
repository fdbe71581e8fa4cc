"""rotary_embedding: the reference against transformers' apply_rotary_pos_emb and a complex-number
oracle (flash-attn's interleaved convention), the Triton kernel against the reference in float64
(interpreter on the CPU, compiled on a GPU), gradients, in-place use, errors, compile facts."""
import math

import pytest
import torch

import seqgen_fast
from seqgen_fast import use_backend
from seqgen_fast.functional import rotary_embedding
from seqgen_fast.reference import rotary as reference
from support.aot import compile_sm90, pointers
from support.utils import TOL, assert_close_rel, rel_err


def tables(rows, width, device="cpu", dtype=torch.float32, batch=None):
    """Random cos/sin of an angle: a (rows, width) table, or per-token (batch, rows, width) values."""
    shape = (rows, width) if batch is None else (batch, rows, width)
    angle = torch.rand(shape, dtype=torch.float64) * 2 * math.pi
    return angle.cos().to(device, dtype), angle.sin().to(device, dtype)


def complex_oracle(x, cos, sin, interleaved):
    """flash-attn's apply_rotary_emb from complex arithmetic: x (..., D) float64, half tables (..., R/2)."""
    rd = 2 * cos.shape[-1]
    head, tail = x[..., :rd], x[..., rd:]
    z = torch.view_as_complex(head.unflatten(-1, (rd // 2, 2)).contiguous()) if interleaved else \
        torch.complex(head[..., : rd // 2], head[..., rd // 2:])
    z = z * torch.complex(cos, sin)
    head = torch.view_as_real(z).flatten(-2) if interleaved else torch.cat([z.real, z.imag], -1)
    return torch.cat([head, tail], -1)


def test_reference_matches_transformers():
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    q, k = torch.randn(2, 4, 7, 32, dtype=torch.float64), torch.randn(2, 2, 7, 32, dtype=torch.float64)  # (B, H, S, D)
    cos, sin = (t.double() for t in tables(7, 32, batch=2))  # per token; halves differ: the general formula
    ref_q, ref_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours_q, ours_k = reference.rotary_embedding(q.transpose(1, 2), k.transpose(1, 2), cos, sin)
    assert_close_rel(ours_q.transpose(1, 2), ref_q, 1e-14)
    assert_close_rel(ours_k.transpose(1, 2), ref_k, 1e-14)
    assert transformers.__version__


@pytest.mark.parametrize("rotary_dim", [32, 16])
def test_reference_interleaved_matches_complex_oracle(rotary_dim):
    x = torch.randn(3, 5, 2, 32, dtype=torch.float64)
    cos, sin = (t.double() for t in tables(9, rotary_dim // 2))
    pos = torch.randint(0, 9, (3, 5))
    ours, _ = reference.rotary_embedding(x, None, cos, sin, position_ids=pos, interleaved=True)
    assert_close_rel(ours, complex_oracle(x, cos[pos][:, :, None], sin[pos][:, :, None], True), 1e-14)


def test_reference_full_table_equals_flash_attn_half_table_non_interleaved():
    x = torch.randn(2, 6, 3, 24, dtype=torch.float64)
    cos, sin = (t.double() for t in tables(6, 8))  # rotary dim 16 of 24: partial
    ours, _ = reference.rotary_embedding(x, None, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1))
    assert_close_rel(ours, complex_oracle(x, cos[None, :, None], sin[None, :, None], False), 1e-14)


def _inputs(device, dtype, *, packed=False, batch=2, seq=7, hq=3, hk=1, dim=32):
    if packed:
        return torch.randn(seq, hq, dim, device=device, dtype=dtype), torch.randn(seq, hk, dim, device=device,
                                                                                  dtype=dtype)
    return (torch.randn(batch, seq, hq, dim, device=device, dtype=dtype),
            torch.randn(batch, seq, hk, dim, device=device, dtype=dtype))


# (name, layout options): odd sizes, GQA k, partial rotary, every position source
KERNEL_CASES = {
    "neox_full": dict(),
    "neox_partial": dict(width=16),
    "interleaved": dict(interleaved=True, width=16),
    "interleaved_partial": dict(interleaved=True, width=8, dim=40),
    "position_ids": dict(positions="ids"),
    "position_ids_broadcast": dict(positions="ids1", interleaved=True, width=16),
    "per_token": dict(positions="per_token"),
    "per_token_broadcast": dict(positions="per_token1", interleaved=True, width=16),
    "packed_cu_seqlens": dict(packed=True, positions="cu"),
    "packed_position_ids": dict(packed=True, positions="ids", interleaved=True, width=16),
    "no_k": dict(no_k=True, seq=33),
    "transposed_views": dict(transposed=True, hq=4, hk=2),
}


def _case(device, dtype, width=32, interleaved=False, positions=None, packed=False, no_k=False, transposed=False,
          seq=7, hq=3, hk=1, dim=32):
    q, k = _inputs(device, dtype, packed=packed, seq=seq if not packed else 19, hq=hq, hk=hk, dim=dim)
    if transposed:  # transformers' (B, H, S, D) tensors, passed as (B, S, H, D) views
        q, k = q.transpose(1, 2).contiguous().transpose(1, 2), k.transpose(1, 2).contiguous().transpose(1, 2)
    kw = dict(interleaved=interleaved)
    tokens = q.shape[0] if packed else q.shape[1]
    if positions in ("per_token", "per_token1"):
        cos, sin = tables(tokens, width, device, dtype, batch=q.shape[0] if positions == "per_token" else 1)
    else:
        cos, sin = tables(tokens + 9, width, device, dtype)
    if positions == "ids":
        kw["position_ids"] = torch.randint(0, tokens + 9, q.shape[:1] if packed else q.shape[:2], device=device)
    elif positions == "ids1":
        kw["position_ids"] = torch.randint(0, tokens + 9, (tokens,), device=device, dtype=torch.int32)
    elif positions == "cu":
        kw["cu_seqlens"] = torch.tensor([0, 5, 5, 12, 19], device=device, dtype=torch.int32)
    return q, None if no_k else k, cos, sin, kw


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("name", sorted(KERNEL_CASES))
def test_triton_matches_reference(name, dtype, device):
    q, k, cos, sin, kw = _case(device, dtype, **KERNEL_CASES[name])
    with use_backend("triton"):
        out_q, out_k = rotary_embedding(q, k, cos, sin, **kw)
    ref_q, ref_k = reference.rotary_embedding(q.double(), None if k is None else k.double(), cos.double(),
                                              sin.double(), **kw)
    assert out_q.dtype == dtype and out_q.shape == q.shape
    assert_close_rel(out_q, ref_q, TOL[dtype], "q")
    if k is None:
        assert out_k is None
    else:
        assert_close_rel(out_k, ref_k, TOL[dtype], "k")


@pytest.mark.smoke
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_inplace_overwrites_and_returns_the_inputs(backend, device):
    q, k, cos, sin, kw = _case(device, torch.float32, positions="cu", packed=True)
    ref_q, ref_k = reference.rotary_embedding(q, k, cos, sin, **kw)
    q_in, k_in = q.clone(), k.clone()
    with use_backend(backend):
        out_q, out_k = rotary_embedding(q_in, k_in, cos, sin, inplace=True, **kw)
    assert out_q is q_in and out_k is k_in
    assert_close_rel(q_in, ref_q, TOL[torch.float32])
    assert_close_rel(k_in, ref_k, TOL[torch.float32])


@pytest.mark.parametrize("interleaved", [False, True])
@pytest.mark.parametrize("backend", ["triton", "reference"])
def test_gradients_are_the_inverse_rotation(interleaved, backend, device):
    """Gradients of q and k against autograd through the float64 reference (full tables whose halves
    differ: the backward must pair each dim with its partner's sin)."""
    width = 16 if interleaved else 32
    q, k, cos, sin, kw = _case(device, torch.float32, width=width, interleaved=interleaved, positions="ids")
    q.requires_grad_(), k.requires_grad_()
    with use_backend(backend):
        out_q, out_k = rotary_embedding(q, k, cos, sin, **kw)
    gq, gk = torch.randn_like(out_q), torch.randn_like(out_k)
    dq, dk = torch.autograd.grad((out_q * gq).sum() + (out_k * gk).sum(), (q, k))
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    r_q, r_k = reference.rotary_embedding(q64, k64, cos.double(), sin.double(), **kw)
    ref_dq, ref_dk = torch.autograd.grad((r_q * gq.double()).sum() + (r_k * gk.double()).sum(), (q64, k64))
    assert_close_rel(dq, ref_dq, TOL[torch.float32], "dq")
    assert_close_rel(dk, ref_dk, TOL[torch.float32], "dk")


def test_positions_are_clamped_and_checked_in_debug_mode():
    q, k, cos, sin, kw = _case("cpu", torch.float32, positions="ids")
    kw["position_ids"][0, 0] = 10 ** 6
    with use_backend("triton"):
        out, _ = rotary_embedding(q, k, cos, sin, **kw)
    clamped = dict(kw, position_ids=kw["position_ids"].clamp(max=cos.shape[0] - 1))
    assert_close_rel(out, reference.rotary_embedding(q, k, cos, sin, **clamped)[0], TOL[torch.float32])
    with seqgen_fast.debug_checks():
        with pytest.raises(ValueError, match=r"positions must lie in \[0, 15\]"):
            rotary_embedding(q, k, cos, sin, **kw)


BAD = [
    ("q_dims", lambda q, k, c, s: dict(q=q[0, 0]), "q must be"),
    ("q_dtype", lambda q, k, c, s: dict(q=q.long(), k=k.long()), "q must be float16"),
    ("k_shape", lambda q, k, c, s: dict(k=k[:, :3]), "k must be"),
    ("k_dtype", lambda q, k, c, s: dict(k=k.half()), "k dtype"),
    ("sin_shape", lambda q, k, c, s: dict(sin=s[:, :8]), "sin shape"),
    ("cos_dtype", lambda q, k, c, s: dict(cos=c.long(), sin=s.long()), "cos must be a floating"),
    ("odd_width", lambda q, k, c, s: dict(cos=c[:, :7], sin=s[:, :7]), "rotary dim 7 must be even"),
    ("too_wide", lambda q, k, c, s: dict(cos=torch.ones(16, 40), sin=torch.ones(16, 40)), "in 2..32"),
    ("short_table", lambda q, k, c, s: dict(cos=c[:6], sin=s[:6]), "6 positions, fewer than the 7 tokens"),
    ("ids_shape", lambda q, k, c, s: dict(position_ids=torch.zeros(3, 7, dtype=torch.long)), "position_ids must"),
    ("ids_dtype", lambda q, k, c, s: dict(position_ids=torch.zeros(2, 7)), "int32 or int64"),
    ("cu_padded", lambda q, k, c, s: dict(cu_seqlens=torch.tensor([0, 7])), "cu_seqlens needs packed"),
    ("per_token_ids", lambda q, k, c, s: dict(cos=c[None, :7], sin=s[None, :7],
                                              position_ids=torch.zeros(7, dtype=torch.long)), "already positioned"),
    ("per_token_shape", lambda q, k, c, s: dict(cos=c[None, :6], sin=s[None, :6]), "per-token cos must be"),
    ("device", lambda q, k, c, s: dict(cos=c.to("meta"), sin=s.to("meta")), "must be on q's device"),
]


@pytest.mark.parametrize("name,change,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_names_the_argument(name, change, match):
    q, k = _inputs("cpu", torch.float32)
    cos, sin = tables(16, 32)
    args = {**dict(q=q, k=k, cos=cos, sin=sin), **change(q, k, cos, sin)}
    with pytest.raises((ValueError, TypeError), match=match):
        rotary_embedding(args.pop("q"), args.pop("k"), args.pop("cos"), args.pop("sin"), **args)


def test_inplace_refuses_tensors_that_need_grad():
    q, k = _inputs("cpu", torch.float32)
    cos, sin = tables(7, 32)
    with pytest.raises(ValueError, match="inplace=True is for inference"):
        rotary_embedding(q.requires_grad_(), k, cos, sin, inplace=True)


@pytest.mark.parametrize("inplace", [False, True])
def test_opcheck(inplace):
    q, k, cos, sin, kw = _case("cpu", torch.float32, positions="ids")
    op = torch.ops.seqgen_fast.rotary_embedding_ if inplace else torch.ops.seqgen_fast.rotary_embedding
    torch.library.opcheck(op, (q, k, cos, sin, kw["position_ids"], None, False, "reference"))


def test_compiles_fullgraph():
    q, k, cos, sin, kw = _case("cpu", torch.float32, positions="per_token")
    expected = reference.rotary_embedding(q, k, cos, sin)

    def layer(q, k, cos, sin):
        return rotary_embedding(q, k, cos, sin)

    got = torch.compile(layer, fullgraph=True, backend="aot_eager")(q, k, cos, sin)
    assert_close_rel(got[0], expected[0], 1e-6)
    assert_close_rel(got[1], expected[1], 1e-6)


def test_kernel_compiles_for_sm90_with_vector_loads():
    """bf16 D=128, GQA, per-token tables: 16-byte vector loads of q/k and stores, no spills."""
    const = dict(HEAD_DIM=128, BLOCK_R=32, BLOCK_D=128, ROTARY_DIM=128, INTERLEAVED=False, POSITIONS=0,
                 PER_TOKEN=True, SEARCH_STEPS=1, sqd=1, sqod=1, skd=1, skod=1, scc=1, ssc=1)
    types = {**pointers("bf16", "Q", "K", "QO", "KO", "COS", "SIN"), **pointers("i32", "POS", "CU")}
    facts = compile_sm90("seqgen_fast.kernels.rotary", "_rotary_kernel", types=types, constexprs=const,
                         aligned=["sqb", "sqs", "sqh", "sqob", "sqos", "sqoh", "skb", "sks", "skh", "skob", "skos",
                                  "skoh", "scb", "scs", "ssb", "sss"], num_warps=4, num_stages=1)
    assert "ld.global.v4" in facts["ptx"] and "st.global.v4" in facts["ptx"]
    assert facts["spill_bytes"] == 0


def test_registered_check_passes():
    from seqgen_fast.checks import run_checks

    rows = run_checks(torch.device("cpu"), names=["rotary_embedding"], backends=("reference", "triton"))
    assert {r.backend for r in rows} == {"reference", "triton"}
    assert rows and all(r.status == "pass" for r in rows), rows


GPU_PARAMS = [pytest.param(n, d, marks=[pytest.mark.smoke] if n == "packed_cu_seqlens" else [], id=f"{n}-{str(d)[6:]}")
              for n in sorted(KERNEL_CASES) for d in (torch.bfloat16, torch.float16, torch.float32)]


@pytest.mark.gpu
@pytest.mark.parametrize("name,dtype", GPU_PARAMS)
def test_gpu_matches_float64(name, dtype):
    q, k, cos, sin, kw = _case("cuda", dtype, **KERNEL_CASES[name])
    out_q, out_k = rotary_embedding(q, k, cos, sin, **kw)
    ref_q, ref_k = reference.rotary_embedding(q.double(), None if k is None else k.double(), cos.double(),
                                              sin.double(), **kw)
    # transformers' math in the same dtype rounds after each op; ours rounds once (float32 inside)
    torch_q = reference.rotary_embedding(q.float(), None, cos.float(), sin.float(), **kw)[0].to(dtype)
    assert rel_err(out_q, ref_q) <= max(rel_err(torch_q, ref_q), 1e-6) * 2
    if k is not None:
        assert_close_rel(out_k, ref_k, TOL[dtype], "k")
