"""seqgen_fast GRU / GRUCell against torch.nn.GRU / GRUCell.

CPU: the reference backend in float64 over the constructor-option grid (outputs, final states and
the gradients of input, h0 and every weight), PackedSequence with unsorted lengths, unbatched
input, batch 1, length 1, dropout under a shared seed, torch's own errors for bad input; the Triton
kernels under the interpreter in float32 on a few small odd shapes, and compiled for sm_90 ahead of
time. (The CUDA kernels run on the CPU under the host emulation in tests/test_gru_cuda.py.) GPU
(``-m gpu``): the modules on the cuda backend (automatic dispatch) and on triton x every dtype,
backward included, against float64, packed input routed past the cuda kernel, and a CUDA-graph
captured GRUCell generation loop on both backends.
"""
import contextlib
import itertools
import re

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import seqgen_fast
from seqgen_fast import BackendError, use_backend
from seqgen_fast.functional import gru, gru_cell
from seqgen_fast.nn import GRU, LSTM, GRUCell
from seqgen_fast.ops import gru as ops
from seqgen_fast.ops._library import registered_ops
from seqgen_fast.reference import gru as ref_gru

from support import sass
from support.aot import compile_sm90, pointers
from support.utils import TOL, assert_close_rel, poison, rel_err

# Half types on the GPU: rounding of h compounds along the recurrence and its backward (as the LSTM's).
SEQ_TOL = {**TOL, torch.float16: 1e-2, torch.bfloat16: 6e-2}
I, H = 5, 7


def _h0(m, B, dtype, device="cpu"):
    D = 2 if m.bidirectional else 1
    return torch.randn(m.num_layers * D, B, m.hidden_size, dtype=dtype, device=device, requires_grad=True)


def _run(module, x, hx, grad_out, backend=None):
    """[(name, tensor)]: output, h_n, and the gradients of the input (when a leaf), h0 and every
    parameter, for a loss touching output and h_n."""
    with use_backend(backend) if backend else contextlib.nullcontext():
        out, h_n = module(x, hx)
        data = out.data if hasattr(out, "batch_sizes") else out
        loss = (data * grad_out).sum() + (h_n * h_n.detach().cos()).sum()
        leaves = [("input", x)] if torch.is_tensor(x) and x.requires_grad else []
        leaves += [("h0", hx)] if hx is not None and hx.requires_grad else []
        leaves += list(module.named_parameters())
        grads = torch.autograd.grad(loss, [t for _, t in leaves], retain_graph=True)
    return [("output", data), ("h_n", h_n)] + [(f"grad {n}", g) for (n, _), g in zip(leaves, grads)]


def _compare(ref_m, ours_m, x, hx, tol, backend=None, x_ours=None, hx_ours=None):
    """ours (on ``backend``) vs torch: output, h_n and every gradient. ``x_ours``/``hx_ours`` when
    ours runs on another device or dtype than the reference."""
    with torch.no_grad():
        out = ref_m(x, hx)[0]
    g = torch.randn_like(out.data if hasattr(out, "batch_sizes") else out)
    ref = _run(ref_m, x, hx, g)
    ours = _run(ours_m, x if x_ours is None else x_ours, hx if hx_ours is None else hx_ours,
                g.to(next(ours_m.parameters())), backend)
    assert [n for n, _ in ours] == [n for n, _ in ref]
    for (name, a), (_, b) in zip(ours, ref):
        assert_close_rel(a.cpu(), b.cpu(), tol, name)


def _pair(dtype=torch.float64, input_size=I, hidden=H, **kw):
    ref_m = torch.nn.GRU(input_size, hidden, dtype=dtype, **kw)
    return ref_m, GRU.from_torch(ref_m)


def _input(m, T, B, dtype):
    shape = (B, T, m.input_size) if m.batch_first else (T, B, m.input_size)
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------------------------
# Reference backend, float64: every constructor option
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional",
                         list(itertools.product((1, 2), (True, False), (False, True), (False, True))))
def test_gru_options_reference(num_layers, bias, batch_first, bidirectional):
    ref_m, ours = _pair(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional)
    x = _input(ref_m, 6, 3, torch.float64)
    _compare(ref_m, ours, x, _h0(ref_m, 3, torch.float64), TOL[torch.float64], "reference")


@pytest.mark.smoke
def test_gru_default_state_and_auto_dispatch_on_cpu():
    ref_m, ours = _pair(num_layers=2)
    assert ops.SEQ.select(torch.randn(2, 1, 3 * H), torch.randn(3 * H, H), None, torch.randn(1, H), None,
                          train=False) == "reference"
    _compare(ref_m, ours, _input(ref_m, 4, 2, torch.float64), None, TOL[torch.float64])


@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (9, 1)])
def test_gru_batch1_length1(T, B):
    ref_m, ours = _pair(input_size=3, hidden=33, bidirectional=True)
    _compare(ref_m, ours, _input(ref_m, T, B, torch.float64), _h0(ref_m, B, torch.float64), TOL[torch.float64],
             "reference")


def test_gru_unbatched():
    ref_m, ours = _pair(num_layers=2, bidirectional=True)
    x = torch.randn(5, I, dtype=torch.float64, requires_grad=True)
    h0 = _h0(ref_m, 1, torch.float64)[:, 0].detach().requires_grad_()
    _compare(ref_m, ours, x, h0, TOL[torch.float64], "reference")
    out, h_n = ours(x)
    ref_out, ref_h = ref_m(x)
    assert out.shape == ref_out.shape == (5, 2 * H) and h_n.shape == ref_h.shape == (4, H)
    assert_close_rel(out, ref_out, TOL[torch.float64], "unbatched output without h0")


def test_gru_non_contiguous_input_and_state():
    ref_m, ours = _pair(batch_first=True, bidirectional=True)
    x = torch.randn(6, 4, I, dtype=torch.float64).transpose(0, 1).requires_grad_()  # [B=4, T=6] as a view
    h0 = torch.randn(4, 2, H, dtype=torch.float64).transpose(0, 1).requires_grad_()  # [2, 4, H] strided
    assert not x.is_contiguous() and not h0.is_contiguous()
    _compare(ref_m, ours, x, h0, TOL[torch.float64], "reference")


@pytest.mark.parametrize("bidirectional,num_layers,with_h0", [(True, 2, True), (False, 1, True), (True, 1, False)])
def test_gru_packed_unsorted_reference(bidirectional, num_layers, with_h0):
    ref_m, ours = _pair(bidirectional=bidirectional, num_layers=num_layers)
    seqs = [torch.randn(n, I, dtype=torch.float64, requires_grad=True) for n in (3, 6, 1, 6, 4)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    hx = _h0(ref_m, len(seqs), torch.float64) if with_h0 else None
    _compare(ref_m, ours, packed, hx, TOL[torch.float64], "reference")
    seq_grads = torch.autograd.grad(ours(packed, hx)[0].data.sum(), seqs, retain_graph=True)
    ref_grads = torch.autograd.grad(ref_m(packed, hx)[0].data.sum(), seqs)
    for k, (a, b) in enumerate(zip(seq_grads, ref_grads)):
        assert_close_rel(a, b, TOL[torch.float64], f"grad of sequence {k}")


def test_gru_dropout_draws_as_torch_under_one_seed():
    """torch's GRU (CPU) applies at::dropout to each non-last layer's [T, B, D*H] output; ours calls
    the same op on the same shapes in the same order, so one seed gives both the same masks: outputs
    and gradients match, and another seed changes them (dropout really applies)."""
    ref_m, ours = _pair(num_layers=3, dropout=0.5, bidirectional=True, batch_first=True)
    x = _input(ref_m, 5, 3, torch.float64)
    g = torch.randn(3, 5, 2 * H, dtype=torch.float64)
    torch.manual_seed(7)
    ref = _run(ref_m, x, None, g)
    torch.manual_seed(7)
    mine = _run(ours, x, None, g, "reference")
    for (name, a), (_, b) in zip(mine, ref):
        assert_close_rel(a, b, TOL[torch.float64], f"{name} (dropout, same seed)")
    torch.manual_seed(8)
    other = _run(ours, x, None, g, "reference")
    assert rel_err(other[0][1], ref[0][1]) > 1e-2, "another seed must draw other dropout masks"
    ours.eval()
    ref_m.eval()
    _compare(ref_m, ours, x, None, TOL[torch.float64], "reference")  # eval: no dropout, as torch


def test_functional_gru_raw_weights_padded_and_packed():
    m = torch.nn.GRU(I, H, num_layers=2, bidirectional=True, dtype=torch.float64)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    out, h_n = gru(x, None, m._flat_weights, num_layers=2, bidirectional=True)
    ref_out, ref_h = m(x)
    assert_close_rel(out, ref_out, TOL[torch.float64], "output")
    assert_close_rel(h_n, ref_h, TOL[torch.float64], "h_n")
    packed = pack_sequence([torch.randn(n, I, dtype=torch.float64) for n in (4, 2, 2)])
    h0 = torch.randn(4, 3, H, dtype=torch.float64)
    out, h_n = gru(packed.data, h0, m._flat_weights, num_layers=2, bidirectional=True,
                   batch_sizes=packed.batch_sizes)
    ref_out, ref_h = m(packed, h0)
    assert_close_rel(out, ref_out.data, TOL[torch.float64], "packed output")
    assert_close_rel(h_n, ref_h, TOL[torch.float64], "packed h_n")


def test_gru_empty_batch():
    ref_m, ours = _pair(bidirectional=True)
    out, h_n = ours(torch.randn(4, 0, I, dtype=torch.float64))
    ref_out, ref_h = ref_m(torch.randn(4, 0, I, dtype=torch.float64))
    assert out.shape == ref_out.shape and h_n.shape == ref_h.shape


def test_nan_propagates_as_in_torch():
    ref_m, ours = _pair()
    x = torch.randn(3, 2, I, dtype=torch.float64)
    x[1, 0, 2] = float("nan")
    out, h_n = ours(x)
    ref_out, ref_h = ref_m(x)
    assert torch.equal(out.isnan(), ref_out.isnan()) and torch.equal(h_n.isnan(), ref_h.isnan())
    assert out.isnan().any() and not out[:, 1].isnan().any()


def test_autocast_on_the_cpu_keeps_the_dtype_like_torch():
    """torch's GRU and GRUCell keep float32 outputs under CPU autocast (their inner products round
    to bfloat16); ours too, computed in float32 throughout."""
    ref_m, ours = _pair(torch.float32, num_layers=2)
    ref_c = torch.nn.GRUCell(I, H)
    cell = GRUCell.from_torch(ref_c)
    x = torch.randn(4, 3, I)
    with torch.no_grad():
        exact = (ref_m(x)[0], ref_c(x[0]))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = (ours(x)[0], cell(x[0]))
            theirs = (ref_m(x)[0], ref_c(x[0]))
    for a, b, e in zip(got, theirs, exact):
        assert a.dtype == b.dtype == torch.float32
        assert_close_rel(a, e, TOL[torch.float32], "under CPU autocast vs float32")
        assert_close_rel(a, b, TOL[torch.bfloat16], "under CPU autocast vs torch's")


# ----------------------------------------------------------------------------------------------
# GRUCell, reference backend, float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias,batched,with_hx", [(True, True, True), (False, True, True), (True, False, True),
                                                  (True, True, False), (False, False, False)])
def test_gru_cell_reference(bias, batched, with_hx):
    ref_c = torch.nn.GRUCell(I, H, bias=bias, dtype=torch.float64)
    ours = GRUCell.from_torch(ref_c)
    lead = (4,) if batched else ()
    x = torch.randn(*lead, I, dtype=torch.float64, requires_grad=True)
    hx = torch.randn(*lead, H, dtype=torch.float64, requires_grad=True) if with_hx else None
    leaves = [x, *([hx] if with_hx else []), *ref_c.parameters()]
    r = ref_c(x, hx)
    with use_backend("reference"):
        o = ours(x, hx)
        with torch.no_grad():
            o_inf = ours(x, hx)
        go = torch.autograd.grad((o * o * 3 + o).sum(), leaves)
    gr = torch.autograd.grad((r * r * 3 + r).sum(), leaves)
    assert_close_rel(o, r, TOL[torch.float64], "h1")
    assert_close_rel(o_inf, r, TOL[torch.float64], "h1 no_grad")
    for k, (a, b) in enumerate(zip(go, gr)):
        assert_close_rel(a, b, TOL[torch.float64], f"grad[{k}]")


def test_functional_gru_cell_and_empty_batch():
    ref_c = torch.nn.GRUCell(I, H, dtype=torch.float64)
    x, h = torch.randn(3, I, dtype=torch.float64), torch.randn(3, H, dtype=torch.float64)
    assert_close_rel(gru_cell(x, h, ref_c.weight_ih, ref_c.weight_hh, ref_c.bias_ih, ref_c.bias_hh,
                              backend="reference"), ref_c(x, h), TOL[torch.float64], "gru_cell")
    assert_close_rel(gru_cell(x, None, ref_c.weight_ih, ref_c.weight_hh), torch.gru_cell(
        x, torch.zeros(3, H, dtype=torch.float64), ref_c.weight_ih, ref_c.weight_hh), TOL[torch.float64], "no bias")
    assert GRUCell.from_torch(ref_c)(torch.randn(0, I, dtype=torch.float64)).shape == (0, H)


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (float32, few small odd cases)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(num_layers=2, bidirectional=True), dict(bias=False, batch_first=True)])
def test_gru_triton_interpreter(kw):
    ref_m, ours = _pair(torch.float32, hidden=33, **kw)
    _compare(ref_m, ours, _input(ref_m, 5, 3, torch.float32), _h0(ref_m, 3, torch.float32), TOL[torch.float32],
             "triton")


def test_gru_triton_packed_unsorted():
    ref_m, ours = _pair(torch.float32, bidirectional=True)
    packed = pack_sequence([torch.randn(n, I) for n in (2, 5, 1)], enforce_sorted=False)
    _compare(ref_m, ours, packed, _h0(ref_m, 3, torch.float32), TOL[torch.float32], "triton")


def test_pointwise_kernels_match_the_reference_on_strided_rows():
    """The fused cell forward and backward on [T, B, *] slices (row strides of the buffers), outputs
    poisoned first: every element written, equal to the reference cell."""
    from seqgen_fast.kernels import gru as tk

    n, hid = 7, 97
    xg, hg = (torch.randn(2, n, 3 * hid)[1] for _ in range(2))
    h_prev = torch.randn(n, 2 * hid)[:, :hid]  # a strided view
    outs = {}
    for name, cell in (("triton", tk), ("reference", ref_gru)):
        h_out, act = poison(torch.empty(n, hid)), poison(torch.empty(3, n, 4 * hid)[1])
        cell.cell_forward(xg, hg, h_prev, h_out, act)
        dm = torch.randn(n, hid, generator=torch.Generator().manual_seed(1))
        dh = torch.randn(n, hid, generator=torch.Generator().manual_seed(2))
        dxg, dhg = poison(torch.empty(n, 3 * hid)), poison(torch.empty(2, n, 3 * hid)[0])
        cell.cell_backward(dm, dh, act, h_prev, dxg, dhg)
        outs[name] = dict(h=h_out, act=act, dxg=dxg, dhg=dhg, dh=dh)
    for key, want in outs["reference"].items():
        assert_close_rel(outs["triton"][key], want, TOL[torch.float32], key)


# B=9: above the fused step kernel's batch limit (GEMMs + cell kernel); input 300: several K tiles.
@pytest.mark.parametrize("B,inp,hidden,bias",
                         [pytest.param(3, I, 33, True, marks=pytest.mark.smoke), (1, I, 33, False), (9, I, 33, True),
                          (5, 300, 17, True)])
def test_gru_cell_triton_interpreter(B, inp, hidden, bias):
    ref_c = torch.nn.GRUCell(inp, hidden, bias=bias)
    ours = GRUCell.from_torch(ref_c)
    x, hx = torch.randn(B, inp, requires_grad=True), torch.randn(B, hidden, requires_grad=True)
    with use_backend("triton"), torch.no_grad():
        h1 = ours(x, hx)
    r1 = ref_c(x, hx)
    assert_close_rel(h1, r1, TOL[torch.float32], "h1 (inference step)")
    with use_backend("triton"):
        grads = torch.autograd.grad((ours(x, hx) * r1.detach()).sum(), [x, hx, *ours.parameters()])
    ref_grads = torch.autograd.grad((r1 * r1.detach()).sum(), [x, hx, *ref_c.parameters()])
    for name, a, b in zip(("x", "hx", "weight_ih", "weight_hh", "bias_ih", "bias_hh"), grads, ref_grads):
        assert_close_rel(a, b, TOL[torch.float32], f"grad {name}")


# kernel, batch (step kernel), PTX it must hold: the pointwise kernels stream rows as 16-byte vectors;
# the step kernel reads its weight rows as vectors (v4, or v2 for 16-bit rows at B8's 128-wide K
# tiles): it is bound by reading W_ih and W_hh once.
SM90 = {"pointwise forward": ("_cell_fwd_kernel", 0, ("ld.global.v4.b32", "st.global.v4.b32")),
        "pointwise backward": ("_cell_bwd_kernel", 0, ("ld.global.v4.b32", "st.global.v4.b32")),
        "step B1": ("_cell_step_kernel", 1, ("ld.global.v4.b32",)),
        "step B8": ("_cell_step_kernel", 8, ("ld.global.v",))}


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("case", sorted(SM90))
def test_kernels_compile_for_sm90_without_spills(case, dt):
    """The interpreter hides compile errors, register pressure and how loads lower: compile each
    kernel for Hopper (no GPU needed) as its launcher specialises it at H = 1024."""
    from seqgen_fast.kernels import gru as k

    name, B, vectors = SM90[case]
    names = getattr(k, name).arg_names
    if name == "_cell_step_kernel":
        block_b, block_h, block_k = k.step_config(B, 1024)
        const, aligned = dict(HAS_BIAS=True, BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k), ("I", "H")
    else:
        const = dict(BLOCK=k.block(1024), **({"SAVE": True} if "SAVE" in names else {}))
        aligned = [n for n in names if n.startswith("s_")] + ["H"]
    facts = compile_sm90("seqgen_fast.kernels.gru", name, types=pointers(dt, *(n for n in names if n.endswith("_ptr"))),
                         constexprs=const, aligned=aligned)
    assert facts["spill_bytes"] == 0, facts["registers"]
    for v in vectors:
        assert v in facts["ptx"], v
    assert not sass.NAN_DROPPING_PTX.search(facts["ptx"]), "a NaN-dropping min/max: NaN would not propagate"


# ----------------------------------------------------------------------------------------------
# Module plumbing: state_dict, from_torch, swap_modules
# ----------------------------------------------------------------------------------------------
def test_state_dict_roundtrip():
    kw = dict(num_layers=2, bidirectional=True, batch_first=True, bias=False)
    theirs = torch.nn.GRU(I, H, **kw)
    ours = GRU(I, H, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    back = torch.nn.GRU(I, H, **kw)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, I)
    assert torch.equal(back(x)[0], theirs(x)[0])
    cell_t, cell_o = torch.nn.GRUCell(I, H), GRUCell(I, H)
    cell_o.load_state_dict(cell_t.state_dict())
    assert list(cell_o.state_dict()) == list(cell_t.state_dict())
    assert ours.extra_repr() == theirs.extra_repr() and cell_o.extra_repr() == cell_t.extra_repr()


def test_from_torch_shares_parameters_and_mode():
    m = torch.nn.GRU(I, H, num_layers=2, bidirectional=True, dtype=torch.float64).eval()
    ours = GRU.from_torch(m)
    assert isinstance(ours, GRU) and not ours.training
    assert [p is q for p, q in zip(ours.parameters(), m.parameters())] == [True] * len(list(m.parameters()))
    assert ours.weight_hh_l1_reverse.dtype == torch.float64 and ours.weight_hh_l1_reverse.device.type == "cpu"
    c = torch.nn.GRUCell(I, H, bias=False)
    oc = GRUCell.from_torch(c)
    assert oc.weight_ih is c.weight_ih and oc.bias_ih is None and oc.training
    with pytest.raises(TypeError, match="torch.nn.GRU"):
        GRU.from_torch(c)
    with pytest.raises(TypeError, match="torch.nn.GRUCell"):
        GRUCell.from_torch(m)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.GRU(I, H, batch_first=True, dtype=torch.float64)
        self.mix = torch.nn.LSTM(H, H, batch_first=True, dtype=torch.float64)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(H, I, dtype=torch.float64)])
        self.dec = torch.nn.GRUCell(I, H, dtype=torch.float64)

    def forward(self, x):
        out, h = self.enc(x)
        out, _ = self.mix(out)
        return self.dec(self.blocks[0](out[:, -1]), h[0])


def test_swap_modules():
    model = _Model()
    x = torch.randn(2, 5, I, dtype=torch.float64)
    before = model(x)
    params = list(model.parameters())
    assert seqgen_fast.swap_modules(model) is model
    assert type(model.enc) is GRU and type(model.dec) is GRUCell and type(model.mix) is LSTM
    assert all(p is q for p, q in zip(model.parameters(), params))
    assert_close_rel(model(x), before, TOL[torch.float64], "swapped model output")
    assert type(seqgen_fast.swap_modules(torch.nn.GRU(I, H))) is GRU


def test_modules_compile_fullgraph_without_recompiles():
    """torch.compile(fullgraph=True) traces GRU (forward and backward) and a GRUCell generation loop,
    and later calls of the same shapes do not recompile."""
    ref_m, ours = _pair(torch.float32, num_layers=2, bidirectional=True)
    ref_c = torch.nn.GRUCell(I, H)
    cell = GRUCell.from_torch(ref_c)
    x = torch.randn(4, 3, I, requires_grad=True)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(error_on_recompile=True):
        out = torch.compile(ours, fullgraph=True)(x)[0]
        grad = torch.autograd.grad(out.sum(), x)[0]
        assert_close_rel(out, ref_m(x)[0], TOL[torch.float32], "compiled GRU output")
        assert_close_rel(grad, torch.autograd.grad(ref_m(x)[0].sum(), x)[0], TOL[torch.float32], "compiled GRU grad")
        step = torch.compile(cell, fullgraph=True)
        with torch.no_grad():
            h = h_ref = torch.randn(3, H)
            for t in range(4):
                h, h_ref = step(x[t], h), ref_c(x[t], h_ref)
        assert_close_rel(h, h_ref, TOL[torch.float32], "compiled GRUCell loop")
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# Ops: opcheck, no-grad path, dispatch
# ----------------------------------------------------------------------------------------------
def _seq_args(T=4, B=3, bias=True, packed=False, dtype=torch.float64, requires_grad=True):
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    batch_sizes = torch.tensor([3, 3, 2, 1][:T]) if packed else None
    return [mk(T, B, 3 * H), mk(3 * H, H), mk(3 * H) if bias else None, mk(B, H), batch_sizes]


@pytest.mark.parametrize("bias,packed,train,backend",
                         [(True, False, True, "reference"), (False, True, True, "reference"),
                          (True, True, False, "reference"), (True, True, True, "triton")])
def test_opcheck_gru_sequence(bias, packed, train, backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    args = _seq_args(bias=bias, packed=packed, dtype=dtype, requires_grad=train)
    torch.library.opcheck(registered_ops()["gru_sequence"], (*args, backend, train))


def test_opcheck_cell_step_and_backward():
    x, h = torch.randn(2, I), torch.randn(2, H)
    w_ih, w_hh, b_ih, b_hh = torch.randn(3 * H, I), torch.randn(3 * H, H), torch.randn(3 * H), torch.randn(3 * H)
    for backend in ("reference", "triton"):
        torch.library.opcheck(registered_ops()["gru_cell_step"], (x, h, w_ih, w_hh, b_ih, b_hh, backend))
    xg, w_hh2, b_hh2, h0, bs = _seq_args(packed=True, requires_grad=False)
    hs, h_n, act = ops.gru_sequence(xg, w_hh2, b_hh2, h0, bs, "reference", True)
    grads = (torch.randn_like(hs), torch.randn_like(h_n))
    torch.library.opcheck(registered_ops()["gru_sequence_backward"], (w_hh2, hs, act, h0, *grads, bs, True, "reference"))


def test_no_grad_saves_nothing_and_backward_says_why():
    xg, w_hh, b_hh, h0, _ = _seq_args(requires_grad=False)
    _, _, act = ops.gru_sequence(xg, w_hh, b_hh, h0, None, "reference", False)
    assert act.numel() == 0
    xg.requires_grad_()
    hs, _, _ = ops.gru_sequence(xg, w_hh, b_hh, h0, None, "reference", False)
    with pytest.raises(RuntimeError, match="train=False"):
        hs.sum().backward()


def test_backend_selection_on_cpu():
    xg, w_hh, b_hh, h0, bs = _seq_args(packed=True)
    assert ops.SEQ.select(xg, w_hh, b_hh, h0, bs, train=True) == "reference"
    assert ops.SEQ.order == ("cuda", "triton", "reference")
    assert ops.SEQ.reasons("cuda", xg, w_hh, b_hh, h0, bs, train=True), "no CUDA device here: cuda declines"
    with use_backend("triton"):
        f32 = [t.float() for t in (xg, w_hh, b_hh, h0)]
        assert ops.SEQ.select(*f32, bs, train=True) == "triton"
        with pytest.raises(BackendError, match="float64"):
            ops.SEQ.select(xg, w_hh, b_hh, h0, bs, train=True)
    m = GRU(I, H, dtype=torch.float64)
    with pytest.raises(BackendError, match="forced backend 'cuda'"):
        gru(torch.randn(3, 2, I, dtype=torch.float64), None, m._flat_weights, backend="cuda")


# ----------------------------------------------------------------------------------------------
# Bad input: torch's own errors
# ----------------------------------------------------------------------------------------------
def _raised(fn) -> Exception:
    with pytest.raises(Exception) as info:
        fn()
    return info.value


_X = (4, 3, I)
SAME_MESSAGE = {  # torch's exception type and message, to the letter
    "input size": lambda m, c: m(torch.randn(4, 3, I + 1)),
    "input dtype": lambda m, c: m(torch.randn(*_X, dtype=torch.float64)),
    "input dims": lambda m, c: m(torch.randn(1, *_X)),
    "h0 shape": lambda m, c: m(torch.randn(*_X), torch.zeros(2, 2, H)),
    "h0 dims batched": lambda m, c: m(torch.randn(*_X), torch.zeros(3, H)),
    "h0 dims unbatched": lambda m, c: m(torch.randn(4, I), torch.zeros(2, 1, H)),
    "h0 device": lambda m, c: m(torch.randn(*_X), torch.zeros(2, 3, H, device="meta")),
    "input device": lambda m, c: m(torch.randn(*_X, device="meta")),
    "zero-length sequence": lambda m, c: m(torch.randn(0, 3, I)),
    "packed h0 batch": lambda m, c: m(pack_sequence([torch.randn(3, I), torch.randn(2, I)]), torch.zeros(2, 3, H)),
    "cell input size": lambda m, c: c(torch.randn(2, I - 1)),
    "cell h batch": lambda m, c: c(torch.randn(2, I), torch.zeros(3, H)),
    "cell h size": lambda m, c: c(torch.randn(2, I), torch.zeros(2, H + 1)),
    "cell input dims": lambda m, c: c(torch.randn(1, 2, I)),
    "cell h dims": lambda m, c: c(torch.randn(2, I), torch.zeros(1, 2, H)),
}
SAME_TYPE = {  # torch raises from deep inside (a matmul); ours names the argument, same exception type
    "h0 dtype": (lambda m, c: m(torch.randn(*_X), torch.zeros(2, 3, H, dtype=torch.float64)),
                 r"gru: hx and input must have the same dtype, but got torch.float64 and torch.float32"),
    "cell h dtype": (lambda m, c: c(torch.randn(2, I), torch.zeros(2, H, dtype=torch.float64)),
                     r"gru_cell: h and x must have the same dtype, but got torch.float64 and torch.float32"),
    "cell input device": (lambda m, c: c(torch.randn(2, I, device="meta")),
                          r"same device, but found at least two devices, meta and cpu"),
}


def _modules(theirs: bool):
    """(GRU, GRUCell): torch's or ours."""
    if theirs:
        return torch.nn.GRU(I, H, num_layers=2), torch.nn.GRUCell(I, H)
    return GRU(I, H, num_layers=2), GRUCell(I, H)


@pytest.mark.parametrize("case", sorted(SAME_MESSAGE))
def test_bad_input_raises_torchs_error(case):
    theirs = _raised(lambda: SAME_MESSAGE[case](*_modules(True)))
    ours = _raised(lambda: SAME_MESSAGE[case](*_modules(False)))
    assert type(ours) is type(theirs) and str(ours) == str(theirs), (case, ours, theirs)


@pytest.mark.parametrize("case", sorted(SAME_TYPE))
def test_bad_input_raises_torchs_type_naming_the_argument(case):
    fn, message = SAME_TYPE[case]
    theirs = _raised(lambda: fn(*_modules(True)))
    ours = _raised(lambda: fn(*_modules(False)))
    assert type(ours) is type(theirs) and re.search(message, str(ours)), (case, ours, theirs)


def test_bad_raw_weights():
    m = GRU(I, H, num_layers=2)
    with pytest.raises(ValueError, match="weights has 7 tensors; expected .* = 8 with bias=True"):
        gru(torch.randn(*_X), None, m._flat_weights[:-1], num_layers=2)
    with pytest.raises(ValueError, match=r"w_hh must have shape \(3\*hidden_size, hidden_size\)"):
        gru_cell(torch.randn(2, I), None, torch.randn(3 * H, I), torch.randn(4 * H, H))
    with pytest.raises(ValueError, match="give both b_ih and b_hh"):
        gru_cell(torch.randn(2, I), None, torch.randn(3 * H, I), torch.randn(3 * H, H), torch.randn(3 * H))


# ----------------------------------------------------------------------------------------------
# GPU: the Triton kernels x every dtype, backward included
# ----------------------------------------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gpu_triton_ready():
    why = seqgen_fast._backend.backend_unavailable("triton")
    assert why is None, f"triton unavailable on the GPU machine: {why}"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", [None, "triton"])  # None: automatic dispatch, the cuda kernels
@pytest.mark.parametrize("kw,T,B,hidden", [(dict(), 33, 4, 128), (dict(num_layers=2, bidirectional=True), 17, 1, 256),
                                           (dict(bias=False), 12, 64, 1024),
                                           pytest.param(dict(batch_first=True), 9, 16, 64, marks=pytest.mark.smoke)])
def test_gpu_gru(dtype, backend, kw, T, B, hidden, monkeypatch):
    """Forward and backward on the cuda backend (persistent kernels, chosen automatically) and on triton
    (fused cell kernels) against torch in float64."""
    _gpu_triton_ready()
    ref_m = torch.nn.GRU(24, hidden, dtype=torch.float64, **kw)
    ours = GRU(24, hidden, device="cuda", dtype=dtype, **kw)
    ours.load_state_dict(ref_m.state_dict())
    x = _input(ref_m, T, B, torch.float64)
    hx = _h0(ref_m, B, torch.float64)
    chosen = []
    real = ops.SEQ.select
    monkeypatch.setattr(ops.SEQ, "select", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    _compare(ref_m, ours, x, hx, SEQ_TOL[dtype], backend, x.detach().to("cuda", dtype).requires_grad_(),
             hx.detach().to("cuda", dtype).requires_grad_())
    assert set(chosen) == {backend or "cuda"}, chosen


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", [None, "triton"])  # None: automatic dispatch on CUDA tensors
def test_gpu_gru_inference_and_packed(dtype, backend):
    ref_m = torch.nn.GRU(24, 64, bidirectional=True, num_layers=2, dtype=torch.float64)
    ours = GRU(24, 64, bidirectional=True, num_layers=2, device="cuda", dtype=dtype)
    ours.load_state_dict(ref_m.state_dict())
    seqs = [torch.randn(n, 24, dtype=torch.float64) for n in (7, 19, 3, 19)]
    hx = _h0(ref_m, 4, torch.float64).detach()
    with torch.no_grad(), use_backend(backend) if backend else contextlib.nullcontext():
        out, h_n = ours(pack_sequence([s.to("cuda", dtype) for s in seqs], enforce_sorted=False), hx.to("cuda", dtype))
        ref_out, ref_h = ref_m(pack_sequence(seqs, enforce_sorted=False), hx)
    assert_close_rel(out.data.cpu(), ref_out.data, SEQ_TOL[dtype], "packed output (no_grad)")
    assert_close_rel(h_n.cpu(), ref_h, SEQ_TOL[dtype], "h_n (no_grad)")
    xg, h0 = torch.randn(3, 2, 3 * 64, device="cuda", dtype=dtype), torch.zeros(2, 64, device="cuda", dtype=dtype)
    assert ops.SEQ.select(xg, ours.weight_hh_l0, ours.bias_hh_l0, h0, None, train=False) == "cuda"
    assert ops.SEQ.select(xg, ours.weight_hh_l0, ours.bias_hh_l0, h0, torch.tensor([2, 2, 1]), train=False) == "triton"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
# B1: cuda's FFMA step, triton's fused step; B9: cuda's tensor-core step, triton's GEMMs + cell kernel
@pytest.mark.parametrize("B", [pytest.param(1, marks=pytest.mark.smoke), 9])
def test_gpu_gru_cell(dtype, backend, B):
    """GRUCell without autograd (the generation step) and with it (a one-step gru_sequence)."""
    _gpu_triton_ready()
    ref_c = torch.nn.GRUCell(40, 128, dtype=torch.float64)
    ours = GRUCell(40, 128, device="cuda", dtype=dtype)
    ours.load_state_dict(ref_c.state_dict())
    x, h = (torch.randn(B, n, dtype=torch.float64, requires_grad=True) for n in (40, 128))
    mine = [t.detach().to("cuda", dtype).requires_grad_() for t in (x, h)]
    r = ref_c(x, h)
    with use_backend(backend):
        with torch.no_grad():
            o_inf = ours(*mine)
        o = ours(*mine)
        go = torch.autograd.grad((o * r.detach().to(o)).sum(), [*mine, *ours.parameters()])
    gr = torch.autograd.grad((r * r.detach()).sum(), [x, h, *ref_c.parameters()])
    assert_close_rel(o_inf.cpu(), r, SEQ_TOL[dtype], "h1 (generation step)")
    names = ["h1", "grad x", "grad h", "grad weight_ih", "grad weight_hh", "grad bias_ih", "grad bias_hh"]
    for name, a, b in zip(names, (o, *go), (r, *gr)):
        assert_close_rel(a.cpu(), b, SEQ_TOL[dtype], name)


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_pointwise_kernels_poisoned(dtype):
    """The fused cell forward and backward in every dtype, outputs poisoned first, against the
    reference cell in float64 on the same (rounded) inputs."""
    from seqgen_fast.kernels import gru as tk

    n, hid = 33, 1000  # H not a multiple of the block: masked tail
    xg, hg = (torch.randn(n, 3 * hid, device="cuda").to(dtype) for _ in range(2))
    h_prev = torch.randn(n, hid, device="cuda").to(dtype)
    h_out, act = poison(torch.empty(n, hid, device="cuda", dtype=dtype)), poison(
        torch.empty(n, 4 * hid, device="cuda", dtype=dtype))
    tk.cell_forward(xg, hg, h_prev, h_out, act)
    h64, act64 = torch.empty(n, hid, dtype=torch.float64), torch.empty(n, 4 * hid, dtype=torch.float64)
    ref_gru.cell_forward(xg.double().cpu(), hg.double().cpu(), h_prev.double().cpu(), h64, act64)
    assert_close_rel(h_out.cpu(), h64, TOL[dtype], "h")
    assert_close_rel(act.cpu(), act64, TOL[dtype], "saved gates")
    dm = torch.randn(n, hid, device="cuda").to(dtype)
    dh = torch.randn(n, hid, device="cuda")
    dh64 = dh.double().cpu()
    dxg, dhg = (poison(torch.empty(n, 3 * hid, device="cuda", dtype=dtype)) for _ in range(2))
    tk.cell_backward(dm, dh, act, h_prev, dxg, dhg)
    dxg64, dhg64 = torch.empty(n, 3 * hid, dtype=torch.float64), torch.empty(n, 3 * hid, dtype=torch.float64)
    ref_gru.cell_backward(dm.double().cpu(), dh64, act.double().cpu(), h_prev.double().cpu(), dxg64, dhg64)
    for name, a, b in (("dxg", dxg, dxg64), ("dhg", dhg, dhg64), ("dh carried", dh, dh64)):
        assert_close_rel(a.cpu(), b, TOL[dtype], name)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_autocast_casts_like_torch(dtype):
    ref_m = torch.nn.GRU(24, 64, device="cuda")
    ours = GRU.from_torch(ref_m)
    ref_c = torch.nn.GRUCell(24, 64, device="cuda")
    cell = GRUCell.from_torch(ref_c)
    x = torch.randn(5, 3, 24, device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=dtype):
        got, want = (ours(x)[0], cell(x[0])), (ref_m(x)[0], ref_c(x[0]))
    for a, b in zip(got, want):
        assert a.dtype == b.dtype
        assert_close_rel(a.float(), b.float(), SEQ_TOL[dtype], "under CUDA autocast")


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_gru_cell_graph_generation(dtype, backend):
    """A 16-step generation loop of GRUCell captured in one CUDA graph, replayed, against torch's
    eager GRUCell loop in float64."""
    _gpu_triton_ready()
    steps, B, hidden = 16, 2, 512
    ref_c = torch.nn.GRUCell(hidden, hidden, dtype=torch.float64)
    ours = GRUCell(hidden, hidden, device="cuda", dtype=dtype)
    ours.load_state_dict(ref_c.state_dict())
    x0 = torch.randn(B, hidden, dtype=torch.float64)
    h, x, ref_hs = torch.zeros(B, hidden, dtype=torch.float64), x0, []
    with torch.no_grad():
        for _ in range(steps):
            h = ref_c(x, h)
            ref_hs.append(h)
            x = h
    static_x = x0.to("cuda", dtype)
    static_h = torch.zeros(B, hidden, device="cuda", dtype=dtype)
    outs = torch.empty(steps, B, hidden, device="cuda", dtype=dtype)

    def loop():
        h, x = static_h, static_x
        for t in range(steps):
            h = ours(x, h)
            outs[t].copy_(h)
            x = h

    with use_backend(backend), torch.no_grad():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            loop()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                loop()
        poison(outs)
        graph.replay()
        torch.cuda.synchronize()
    assert_close_rel(outs.cpu(), torch.stack(ref_hs), SEQ_TOL[dtype], "generated h_t")
