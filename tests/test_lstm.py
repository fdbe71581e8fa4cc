"""seqgen_fast LSTM / LSTMCell against torch.nn.LSTM / LSTMCell.

CPU: the reference backend in float64 over the constructor-option grid (outputs, final states and
the gradients of input, h0, c0 and every weight), the Triton kernels under the interpreter in
float32 on a few small odd shapes. GPU (``-m gpu``): every kernel backend x dtype, backward
included, and a CUDA-graph captured LSTMCell generation loop.
"""
import contextlib
import itertools

import pytest
import torch
from torch.nn.utils.rnn import pack_sequence

import seqgen_fast
from seqgen_fast import BackendError, use_backend
from seqgen_fast.functional import lstm, lstm_cell
from seqgen_fast.nn import LSTM, LSTMCell
from seqgen_fast.ops import _recurrence
from seqgen_fast.ops import lstm as ops
from seqgen_fast.ops._library import registered_ops
from seqgen_fast.reference import lstm as ref_lstm

from support import sass
from support.aot import compile_sm90, pointers
from support.utils import TOL, assert_close_rel

# Half types on the GPU: rounding of h and c compounds along the recurrence and its backward. float32:
# the cuda backend's recurrent product runs on TF32 tensor cores under torch.backends.cudnn.allow_tf32
# (torch's default, as cuDNN does), 10-bit mantissas compounding the same way.
SEQ_TOL = {**TOL, torch.float32: 5e-3, torch.float16: 1e-2, torch.bfloat16: 6e-2}
I, H = 5, 7


def _states(m, B, dtype, device="cpu"):
    D = 2 if m.bidirectional else 1
    P = m.proj_size or m.hidden_size
    h0 = torch.randn(m.num_layers * D, B, P, dtype=dtype, device=device, requires_grad=True)
    c0 = torch.randn(m.num_layers * D, B, m.hidden_size, dtype=dtype, device=device, requires_grad=True)
    return h0, c0


def _run(module, x, hx, grad_out, backend=None):
    """[(name, tensor)]: output, final states, and the gradients of the input (when a leaf), h0,
    c0 and every parameter, for a loss touching output, h_n and c_n."""
    with use_backend(backend) if backend else contextlib.nullcontext():
        out, (h_n, c_n) = module(x, hx)
        data = out.data if hasattr(out, "batch_sizes") else out
        loss = (data * grad_out).sum() + (h_n * h_n.detach().cos()).sum() + (c_n * 0.5).sum()
        leaves = [("input", x)] if torch.is_tensor(x) and x.requires_grad else []
        leaves += [(f"hx[{k}]", t) for k, t in enumerate(hx or ()) if t.requires_grad]
        leaves += list(module.named_parameters())
        grads = torch.autograd.grad(loss, [t for _, t in leaves], retain_graph=True)
    return [("output", data), ("h_n", h_n), ("c_n", c_n)] + [(f"grad {n}", g) for (n, _), g in zip(leaves, grads)]


def _compare_modules(ref_m, ours_m, x, hx, tol, backend=None, x_ours=None, hx_ours=None):
    """ours (on ``backend``) vs torch: outputs, final states and every gradient. ``x_ours`` /
    ``hx_ours`` when ours runs on another device or dtype than the reference."""
    with torch.no_grad():
        out = ref_m(x, hx)[0]
    g = torch.randn_like(out.data if hasattr(out, "batch_sizes") else out)
    ref = _run(ref_m, x, hx, g)
    x_o = x if x_ours is None else x_ours
    hx_o = hx if hx_ours is None else hx_ours
    ours = _run(ours_m, x_o, hx_o, g.to(next(ours_m.parameters())), backend)
    assert [n for n, _ in ours] == [n for n, _ in ref]
    for (name, a), (_, b) in zip(ours, ref):
        assert_close_rel(a.cpu(), b.cpu(), tol, name)


def _pair(dtype=torch.float64, **kw):
    ref_m = torch.nn.LSTM(I, H, dtype=dtype, **kw)
    return ref_m, LSTM.from_torch(ref_m)


def _input(m, T, B, dtype):
    shape = (B, T, I) if m.batch_first else (T, B, I)
    return torch.randn(*shape, dtype=dtype, requires_grad=True)


# ----------------------------------------------------------------------------------------------
# Reference backend, float64: every constructor option
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_layers,bias,batch_first,bidirectional,proj_size",
                         list(itertools.product((1, 2), (True, False), (False, True), (False, True), (0, 3))))
def test_lstm_options_reference(num_layers, bias, batch_first, bidirectional, proj_size):
    ref_m, ours = _pair(num_layers=num_layers, bias=bias, batch_first=batch_first, bidirectional=bidirectional,
                        proj_size=proj_size)
    x = _input(ref_m, 6, 3, torch.float64)
    _compare_modules(ref_m, ours, x, _states(ref_m, 3, torch.float64), TOL[torch.float64], "reference")


def test_lstm_default_states_and_auto_dispatch_on_cpu():
    ref_m, ours = _pair(num_layers=2)
    x = _input(ref_m, 4, 2, torch.float64)
    _compare_modules(ref_m, ours, x, None, TOL[torch.float64])


@pytest.mark.parametrize("T,B", [(1, 1), (1, 4), (9, 1)])
def test_lstm_batch1_length1(T, B):
    ref_m, ours = _pair(bidirectional=True, proj_size=2)
    _compare_modules(ref_m, ours, _input(ref_m, T, B, torch.float64), _states(ref_m, B, torch.float64),
                     TOL[torch.float64], "reference")


def test_lstm_unbatched():
    ref_m, ours = _pair(num_layers=2, bidirectional=True)
    x = torch.randn(5, I, dtype=torch.float64, requires_grad=True)
    h0, c0 = (s[:, 0].detach().requires_grad_() for s in _states(ref_m, 1, torch.float64))
    _compare_modules(ref_m, ours, x, (h0, c0), TOL[torch.float64], "reference")
    out, (h_n, c_n) = ours(x)
    assert out.shape == (5, 2 * H) and h_n.shape == (4, H) and c_n.shape == (4, H)


@pytest.mark.parametrize("bidirectional,proj_size,num_layers", [(True, 0, 2), (False, 3, 1), (True, 3, 2)])
def test_lstm_packed_unsorted_reference(bidirectional, proj_size, num_layers):
    ref_m, ours = _pair(bidirectional=bidirectional, proj_size=proj_size, num_layers=num_layers)
    seqs = [torch.randn(n, I, dtype=torch.float64, requires_grad=True) for n in (3, 6, 1, 6, 4)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    hx = _states(ref_m, len(seqs), torch.float64)
    _compare_modules(ref_m, ours, packed, hx, TOL[torch.float64], "reference")
    seq_grads = torch.autograd.grad(ours(packed, hx)[0].data.sum(), seqs, retain_graph=True)
    ref_grads = torch.autograd.grad(ref_m(packed, hx)[0].data.sum(), seqs)
    for k, (a, b) in enumerate(zip(seq_grads, ref_grads)):
        assert_close_rel(a, b, TOL[torch.float64], f"grad of sequence {k}")


def test_lstm_packed_sorted_no_states():
    ref_m, ours = _pair(bidirectional=True)
    seqs = [torch.randn(n, I, dtype=torch.float64) for n in (5, 5, 2)]
    packed = pack_sequence(seqs)
    _compare_modules(ref_m, ours, packed, None, TOL[torch.float64], "reference")


def test_lstm_dropout_between_layers():
    ref_m, ours = _pair(num_layers=3, dropout=0.5)
    x = _input(ref_m, 5, 3, torch.float64)
    ref_m.eval()
    ours.eval()
    _compare_modules(ref_m, ours, x, None, TOL[torch.float64], "reference")  # eval: no dropout, as torch
    ours.train()
    ref_m.train()
    with torch.no_grad():
        out_train, (h_train, _) = ours(x)
        ours.eval()
        out_eval, (h_eval, _) = ours(x)
    assert not torch.allclose(out_train, out_eval), "training mode must apply dropout between layers"
    assert torch.equal(h_train[0], h_eval[0]), "the first layer's input is never dropped"
    # p = 1 drops everything between layers: deterministic, so comparable with torch exactly.
    ref_m, ours = _pair(num_layers=2, dropout=1.0)
    _compare_modules(ref_m, ours, x, None, TOL[torch.float64], "reference")


def test_functional_lstm_raw_weights():
    m = torch.nn.LSTM(I, H, num_layers=2, bidirectional=True, proj_size=4, dtype=torch.float64)
    x = torch.randn(4, 3, I, dtype=torch.float64)
    out, (h_n, c_n) = lstm(x, None, m._flat_weights, num_layers=2, bidirectional=True)
    ref_out, (ref_h, ref_c) = m(x)
    for name, a, b in (("output", out, ref_out), ("h_n", h_n, ref_h), ("c_n", c_n, ref_c)):
        assert_close_rel(a, b, TOL[torch.float64], name)


def test_autocast_casts_like_torch():
    ours = LSTM(I, H, num_layers=2)
    cell = LSTMCell(I, H)
    x = torch.randn(4, 3, I)
    with torch.no_grad():
        out32, (h32, _) = ours(x)
        cell32 = cell(x[0])[0]
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out16, (h16, _) = ours(x, (torch.zeros(2, 3, H), torch.zeros(2, 3, H)))
            cell16 = cell(x[0])[0]
    # as torch: CPU autocast runs nn.LSTM in bfloat16 but leaves nn.LSTMCell in float32
    assert out16.dtype == h16.dtype == torch.bfloat16 and cell16.dtype == torch.float32
    assert_close_rel(out16, out32, SEQ_TOL[torch.bfloat16], "output under autocast")
    assert_close_rel(h16, h32, SEQ_TOL[torch.bfloat16], "h_n under autocast")
    assert_close_rel(cell16, cell32, TOL[torch.float32], "LSTMCell h1 under autocast")


# ----------------------------------------------------------------------------------------------
# Triton kernels under the interpreter (float32, few small odd cases)
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kw", [dict(num_layers=2, bidirectional=True), dict(proj_size=3, batch_first=True)])
def test_lstm_triton_interpreter(kw):
    ref_m, ours = _pair(torch.float32, **kw)
    x = _input(ref_m, 5, 3, torch.float32)
    _compare_modules(ref_m, ours, x, _states(ref_m, 3, torch.float32), TOL[torch.float32], "triton")


def test_lstm_triton_packed_unsorted():
    ref_m, ours = _pair(torch.float32, bidirectional=True)
    packed = pack_sequence([torch.randn(n, I) for n in (2, 5, 1)], enforce_sorted=False)
    _compare_modules(ref_m, ours, packed, _states(ref_m, 3, torch.float32), TOL[torch.float32], "triton")


# B=9: above the fused step kernel's batch limit (addmm + cell kernel); input 300: several K tiles.
@pytest.mark.parametrize("B,inp,hidden,bias",
                         [pytest.param(3, I, 33, True, marks=pytest.mark.smoke), (1, I, 33, False), (9, I, 33, True), (5, 300, 17, True)])
def test_lstm_cell_triton_interpreter(B, inp, hidden, bias):
    ref_c = torch.nn.LSTMCell(inp, hidden, bias=bias)
    ours = LSTMCell.from_torch(ref_c)
    x, hx = torch.randn(B, inp, requires_grad=True), (torch.randn(B, hidden), torch.randn(B, hidden))
    with use_backend("triton"), torch.no_grad():
        h1, c1 = ours(x, hx)
    r1, rc1 = ref_c(x, hx)
    assert_close_rel(h1, r1, TOL[torch.float32], "h1 (inference step)")
    assert_close_rel(c1, rc1, TOL[torch.float32], "c1 (inference step)")
    with use_backend("triton"):
        h1, c1 = ours(x, hx)
        grads = torch.autograd.grad((h1 * 2 + c1).sum(), [x, *ours.parameters()])
    ref_grads = torch.autograd.grad((r1 * 2 + rc1).sum(), [x, *ref_c.parameters()])
    for name, a, b in zip(("x", "weight_ih", "weight_hh", "bias_ih", "bias_hh"), grads, ref_grads):
        assert_close_rel(a, b, TOL[torch.float32], f"grad {name}")


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["_cell_fwd_kernel", "_cell_bwd_kernel"])
def test_pointwise_cell_kernels_compile_for_sm90(name, dt):
    """The interpreter hides compile errors: compile for Hopper (no GPU needed); rows are read and
    written as 16-byte vectors, nothing spills."""
    from seqgen_fast.kernels import lstm as k

    names = getattr(k, name).arg_names
    const = dict(BLOCK=k.block(1024), **({"SAVE": True} if "SAVE" in names else {}))
    facts = compile_sm90("seqgen_fast.kernels.lstm", name,
                         types=pointers(dt, *(n for n in names if n.endswith("_ptr"))), constexprs=const,
                         aligned=[n for n in names if n.startswith("s_")] + ["H"])
    assert "ld.global.v4.b32" in facts["ptx"] and "st.global.v4.b32" in facts["ptx"]
    assert facts["spill_bytes"] == 0
    assert not sass.NAN_DROPPING_PTX.search(facts["ptx"]), "a NaN-dropping min/max: NaN would not propagate"


@pytest.mark.parametrize("dt", ["fp32", "bf16"])
@pytest.mark.parametrize("B,H", [(1, 512), (8, 1024), (8, 4096)])
def test_generation_step_kernel_compiles_for_sm90(B, H, dt):
    """The fused step at the block sizes its launcher picks: compiles for Hopper without spills,
    its weight rows read as vectors (it is bound by reading W_ih and W_hh once)."""
    from seqgen_fast.kernels import lstm as k

    block_b, block_h, block_k = k.step_config(B, H)
    names = k._cell_step_kernel.arg_names
    facts = compile_sm90("seqgen_fast.kernels.lstm", "_cell_step_kernel",
                         types=pointers(dt, *(n for n in names if n.endswith("_ptr"))),
                         constexprs=dict(HAS_BIAS=True, BLOCK_B=block_b, BLOCK_H=block_h, BLOCK_K=block_k),
                         aligned=("I", "H"))
    assert facts["spill_bytes"] == 0
    assert "ld.global.v4.b32" in facts["ptx"] or "ld.global.v2.b32" in facts["ptx"]
    assert not sass.NAN_DROPPING_PTX.search(facts["ptx"]), "a NaN-dropping min/max: NaN would not propagate"


# ----------------------------------------------------------------------------------------------
# LSTMCell, reference backend, float64
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bias,batched,with_hx", [(True, True, True), (False, True, True), (True, False, True),
                                                  (True, True, False)])
def test_lstm_cell_reference(bias, batched, with_hx):
    ref_c = torch.nn.LSTMCell(I, H, bias=bias, dtype=torch.float64)
    ours = LSTMCell.from_torch(ref_c)
    lead = (4,) if batched else ()
    x = torch.randn(*lead, I, dtype=torch.float64, requires_grad=True)
    hx = tuple(torch.randn(*lead, H, dtype=torch.float64, requires_grad=True) for _ in range(2)) if with_hx else None
    leaves = [x, *(hx or ()), *ref_c.parameters()]
    r = ref_c(x, hx)
    with use_backend("reference"):
        o = ours(x, hx)
        with torch.no_grad():
            o_inf = ours(x, hx)
        go = torch.autograd.grad((o[0] * 3 + o[1] * o[1]).sum(), leaves)
    gr = torch.autograd.grad((r[0] * 3 + r[1] * r[1]).sum(), leaves)
    for name, a, b in zip(("h1", "c1", "h1 no_grad", "c1 no_grad"), (*o, *o_inf), (*r, *r)):
        assert_close_rel(a, b, TOL[torch.float64], name)
    for k, (a, b) in enumerate(zip(go, gr)):
        assert_close_rel(a, b, TOL[torch.float64], f"grad[{k}]")


# ----------------------------------------------------------------------------------------------
# Module plumbing: state_dict, from_torch, swap_modules
# ----------------------------------------------------------------------------------------------
def test_state_dict_roundtrip():
    kw = dict(num_layers=2, bidirectional=True, proj_size=3, batch_first=True)
    theirs = torch.nn.LSTM(I, H, **kw)
    ours = LSTM(I, H, **kw)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(ours.state_dict()[k], v), k
    back = torch.nn.LSTM(I, H, **kw)
    back.load_state_dict(ours.state_dict())
    x = torch.randn(2, 4, I)
    assert torch.equal(back(x)[0], theirs(x)[0])
    cell_t, cell_o = torch.nn.LSTMCell(I, H), LSTMCell(I, H)
    cell_o.load_state_dict(cell_t.state_dict())
    assert list(cell_o.state_dict()) == list(cell_t.state_dict())


def test_from_torch_shares_parameters_and_mode():
    m = torch.nn.LSTM(I, H, num_layers=2, proj_size=2, dtype=torch.float64).eval()
    ours = LSTM.from_torch(m)
    assert isinstance(ours, LSTM) and not ours.training
    assert [p is q for p, q in zip(ours.parameters(), m.parameters())] == [True] * len(list(m.parameters()))
    assert ours.weight_hr_l1.dtype == torch.float64 and ours.weight_hr_l1.device.type == "cpu"
    assert ours.extra_repr() == m.extra_repr()
    c = torch.nn.LSTMCell(I, H, bias=False)
    oc = LSTMCell.from_torch(c)
    assert oc.weight_ih is c.weight_ih and oc.bias_ih is None and oc.training
    with pytest.raises(TypeError, match="torch.nn.LSTM"):
        LSTM.from_torch(c)


class _Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.enc = torch.nn.LSTM(I, H, batch_first=True, dtype=torch.float64)
        self.blocks = torch.nn.ModuleList([torch.nn.Linear(H, I, dtype=torch.float64)])
        self.dec = torch.nn.LSTMCell(I, H, dtype=torch.float64)

    def forward(self, x):
        out, (h, c) = self.enc(x)
        return self.dec(self.blocks[0](out[:, -1]), (h[0], c[0]))


def test_swap_modules():
    model = _Model()
    x = torch.randn(2, 5, I, dtype=torch.float64)
    before = model(x)
    params = list(model.parameters())
    assert seqgen_fast.swap_modules(model) is model
    assert type(model.enc) is LSTM and type(model.dec) is LSTMCell
    assert all(p is q for p, q in zip(model.parameters(), params))
    after = model(x)
    for a, b in zip(after, before):
        assert_close_rel(a, b, TOL[torch.float64], "swapped model output")
    swapped_root = seqgen_fast.swap_modules(torch.nn.LSTM(I, H))
    assert type(swapped_root) is LSTM


# ----------------------------------------------------------------------------------------------
# Ops: opcheck, no-grad path
# ----------------------------------------------------------------------------------------------
def _seq_args(T=4, B=3, proj=False, packed=False, dtype=torch.float64, requires_grad=True):
    P = 3 if proj else H
    mk = lambda *s: torch.randn(*s, dtype=dtype, requires_grad=requires_grad)  # noqa: E731
    batch_sizes = torch.tensor([3, 3, 2, 1][:T]) if packed else None
    return [mk(T, B, 4 * H), mk(4 * H, P), mk(P, H) if proj else None, mk(B, P), mk(B, H), batch_sizes]


@pytest.mark.parametrize("proj,packed,train,backend",
                         [(False, False, True, "reference"), (True, True, True, "reference"),
                          (False, False, False, "reference"), (True, True, True, "triton")])
def test_opcheck_lstm_sequence(proj, packed, train, backend):
    dtype = torch.float64 if backend == "reference" else torch.float32
    args = _seq_args(proj=proj, packed=packed, dtype=dtype, requires_grad=train)
    torch.library.opcheck(registered_ops()["lstm_sequence"], (*args, backend, train))


def test_opcheck_cell_step_and_backward():
    x, h, c = torch.randn(2, I), torch.randn(2, H), torch.randn(2, H)
    w_ih, w_hh, b_ih, b_hh = torch.randn(4 * H, I), torch.randn(4 * H, H), torch.randn(4 * H), torch.randn(4 * H)
    for backend in ("reference", "triton"):
        torch.library.opcheck(registered_ops()["lstm_cell_step"], (x, h, c, w_ih, w_hh, b_ih, b_hh, backend))
    xg, w_hh2, w_hr, h0, c0, bs = _seq_args(proj=True, packed=True, requires_grad=False)
    hs, h_n, c_n, cs, gates = ops.lstm_sequence(xg, w_hh2, w_hr, h0, c0, bs, "reference", True)
    grads = (torch.randn_like(hs), torch.randn_like(h_n), torch.randn_like(c_n))
    torch.library.opcheck(registered_ops()["lstm_sequence_backward"],
                          (w_hh2, w_hr, hs, cs, gates, h0, c0, *grads, bs, "reference"))


def test_no_grad_saves_nothing():
    xg, w_hh, _, h0, c0, _ = _seq_args(requires_grad=False)
    _, _, _, cs, gates = ops.lstm_sequence(xg, w_hh, None, h0, c0, None, "reference", False)
    assert cs.numel() == 0 and gates.numel() == 0


# ----------------------------------------------------------------------------------------------
# Backend selection and bad input
# ----------------------------------------------------------------------------------------------
def test_backend_selection_on_cpu():
    xg, w_hh, w_hr, h0, c0, bs = _seq_args(proj=True, packed=True)
    cuda_why = " ".join(ops.SEQ.reasons("cuda", xg, w_hh, w_hr, h0, c0, bs, train=True))
    assert "cuda" in cuda_why.lower()
    if seqgen_fast._backend.backend_unavailable("cuda") is None:  # only reachable with a GPU and _C
        assert "projections" in cuda_why and "variable lengths" in cuda_why
    assert ops.SEQ.select(xg, w_hh, w_hr, h0, c0, bs, train=True) == "reference"
    with use_backend("triton"):
        f32 = [t.float() for t in (xg, w_hh, w_hr, h0, c0)]
        assert ops.SEQ.select(*f32, bs, train=True) == "triton"
        with pytest.raises(BackendError, match="float64"):
            ops.SEQ.select(xg, w_hh, w_hr, h0, c0, bs, train=True)
    m = LSTM(I, H, dtype=torch.float64)
    with pytest.raises(BackendError, match="forced backend 'cuda'"):
        lstm(torch.randn(3, 2, I, dtype=torch.float64), None, m._flat_weights, backend="cuda")


class _ContractDouble:
    """Stands in for seqgen_fast.kernels.lstm_cuda on the CPU, following its documented contract
    (activated gates + cell states saved, grad_gates in the layer dtype), to test the cuda backend's glue."""

    @staticmethod
    def sequence_forward(xg, w_hh, h0, c0, *, train):
        return _recurrence.recurrence_forward(xg, w_hh, None, h0, c0, None, train, cell=ref_lstm.cell_forward)

    @staticmethod
    def sequence_backward(w_hh, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n):
        dG, dh0, dc0, _ = _recurrence.recurrence_backward(w_hh, None, hs, cs, gates, h0, c0, grad_hs, grad_h_n, grad_c_n,
                                                          None, cell=ref_lstm.cell_backward)
        return dG, dh0, dc0

    @staticmethod
    def cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh):
        return torch.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh)


def test_cuda_backend_glue_follows_the_kernel_contract(monkeypatch):
    monkeypatch.setattr(ops, "_cuda_kernels", lambda: _ContractDouble)
    xg, w_hh, _, h0, c0, _ = _seq_args(requires_grad=False)
    ref_out = ops.lstm_sequence(xg, w_hh, None, h0, c0, None, "reference", True)
    cuda_out = ops.lstm_sequence(xg, w_hh, None, h0, c0, None, "cuda", True)
    for k, (a, b) in enumerate(zip(cuda_out, ref_out)):
        assert_close_rel(a, b, TOL[torch.float64], f"forward output {k}")
    hs, h_n, c_n, cs, gates = ref_out
    grads = (torch.randn_like(hs), torch.randn_like(h_n), torch.randn_like(c_n))
    ref_g = ops.lstm_sequence_backward(w_hh, None, hs, cs, gates, h0, c0, *grads, None, "reference")
    cuda_g = ops.lstm_sequence_backward(w_hh, None, hs, cs, gates, h0, c0, *grads, None, "cuda")
    for name, a, b in zip(("dxg", "dw_hh", "dw_hr", "dh0", "dc0"), cuda_g, ref_g):
        assert a.dtype == b.dtype, name
        if b.numel():
            assert_close_rel(a, b, TOL[torch.float64], name)
    x, w_ih, b = (torch.randn(*s, dtype=torch.float64) for s in ((3, I), (4 * H, I), (4 * H,)))
    for a, r in zip(ops.lstm_cell_step(x, h0, c0, w_ih, w_hh, b, b, "cuda"),
                    ops.lstm_cell_step(x, h0, c0, w_ih, w_hh, b, b, "reference")):
        assert_close_rel(a, r, TOL[torch.float64], "cell step")


def test_bad_input_errors():
    m = LSTM(I, H, num_layers=2)
    x = torch.randn(4, 3, I)
    with pytest.raises(RuntimeError, match="input_size. Expected 5, got 6"):
        m(torch.randn(4, 3, 6))
    with pytest.raises(ValueError, match="input dtype"):
        m(x.double())
    with pytest.raises(RuntimeError, match=r"Expected hidden\[0\] size \(2, 3, 7\), got \[2, 2, 7\]"):
        m(x, (torch.zeros(2, 2, H), torch.zeros(2, 3, H)))
    with pytest.raises(ValueError, match=r"hx\[1\] has dtype torch.float64"):
        m(x, (torch.zeros(2, 3, H), torch.zeros(2, 3, H, dtype=torch.float64)))
    with pytest.raises(ValueError, match=r"hx\[0\] is on meta"):
        m(x, (torch.zeros(2, 3, H, device="meta"), torch.zeros(2, 3, H)))
    with pytest.raises(RuntimeError, match="Input and parameter tensors are not at the same device, found input "
                                           "tensor at meta and parameter tensor at cpu"):  # torch's message
        m(x.to("meta"))
    with pytest.raises(ValueError, match="Expected input to be 2D or 3D"):
        m(torch.randn(1, 4, 3, I))
    with pytest.raises(RuntimeError, match=r"hx\[1\] must have shape \(2, 3, 7\)"):
        lstm(x, (torch.zeros(2, 3, H), torch.zeros(2, 3, H + 1)), m._flat_weights, num_layers=2)
    with pytest.raises(ValueError, match="weights per layer"):
        lstm(x, None, m._flat_weights[:-1], num_layers=1)
    cell = LSTMCell(I, H)
    with pytest.raises(RuntimeError, match="inconsistent input_size: got 4 expected 5"):
        cell(torch.randn(2, 4))
    with pytest.raises(RuntimeError, match=r"hx\[0\] must have shape \(2, 7\)"):
        cell(torch.randn(2, I), (torch.zeros(3, H), torch.zeros(2, H)))
    with pytest.raises(ValueError, match=r"w_hh has dtype torch.float64"):
        lstm_cell(torch.randn(2, I), None, cell.weight_ih, cell.weight_hh.double())
    with pytest.raises(ValueError, match="Expected input to be 1D or 2D"):
        cell(torch.randn(1, 2, I))


def test_zero_length_sequences_get_torchs_message():
    m = LSTM(I, H)
    for call in (lambda: m(torch.randn(0, 3, I)), lambda: lstm(torch.randn(0, 3, I), None, m._flat_weights),
                 lambda: torch.nn.LSTM(I, H)(torch.randn(0, 3, I))):
        with pytest.raises(RuntimeError, match="Expected sequence length to be larger than 0 in RNN"):
            call()
    out, (h_n, c_n) = m(torch.randn(4, 0, I))  # an empty batch is fine, as in torch
    assert out.shape == (4, 0, H) and h_n.shape == (1, 0, H) and c_n.shape == (1, 0, H)


def test_lstm_is_an_rnnbase_that_torch_compile_traces():
    """Not a torch.nn.LSTM instance: dynamo refuses to trace those without its global allow_rnn flag."""
    m = LSTM(I, H, num_layers=2)
    assert isinstance(m, torch.nn.RNNBase) and m.mode == "LSTM" and not isinstance(m, torch.nn.LSTM)
    theirs = torch.nn.LSTM(I, H, num_layers=2)
    assert m.extra_repr() == theirs.extra_repr() and list(m.state_dict()) == list(theirs.state_dict())


# ----------------------------------------------------------------------------------------------
# torch.compile: fullgraph, no recompile per call or step (CPU, reference backend; the cuda backend
# under the host emulation in tests/test_lstm_cuda.py, with inductor on a GPU there too)
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def no_recompiles(monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compiled_lstm_fullgraph_without_recompiles(no_recompiles, backend):
    ref_m, ours = _pair(num_layers=2, bidirectional=True)
    ours.compile(backend=backend, fullgraph=True)  # in place: the parameters keep their names
    for _ in range(3):  # fresh data at every call: one graph
        x = _input(ref_m, 5, 3, torch.float64)
        hx = _states(ref_m, 3, torch.float64)
        _compare_modules(ref_m, ours, x, hx, TOL[torch.float64])


def test_compiled_lstm_cell_generation_loop_fullgraph_without_recompiles(no_recompiles):
    ref_c = torch.nn.LSTMCell(I, H, dtype=torch.float64)
    ours = LSTMCell.from_torch(ref_c)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x, h, c):
        return ours(x, (h, c))

    h, c = torch.zeros(2, H, dtype=torch.float64), torch.zeros(2, H, dtype=torch.float64)
    rh, rc = h.clone(), c.clone()
    with torch.no_grad():
        for _ in range(6):  # a generation loop: the same graph at every step
            x = torch.randn(2, I, dtype=torch.float64)
            h, c = step(x, h, c)
            rh, rc = ref_c(x, (rh, rc))
    assert_close_rel(h, rh, TOL[torch.float64], "generated h")
    x = torch.randn(2, I, dtype=torch.float64, requires_grad=True)  # with autograd: a one-step sequence
    h1, c1 = torch.compile(lambda x, h, c: ours(x, (h, c)), backend="aot_eager", fullgraph=True)(x, h, c)
    (gx,) = torch.autograd.grad((h1 + c1).sum(), x)
    r1, rc1 = ref_c(x, (h, c))
    assert_close_rel(gx, torch.autograd.grad((r1 + rc1).sum(), x)[0], TOL[torch.float64], "grad x")


# ----------------------------------------------------------------------------------------------
# GPU: every kernel backend x dtype, backward included
# ----------------------------------------------------------------------------------------------
GPU_BACKENDS = ["triton", "cuda"]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _gpu_backend_ready(backend):
    why = seqgen_fast._backend.backend_unavailable(backend)
    assert why is None, f"{backend} unavailable on the GPU machine: {why}"


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kw,T,B,hidden", [(dict(), 33, 4, 128), (dict(num_layers=2, bidirectional=True), 17, 1, 256),
                                           pytest.param(dict(batch_first=True), 9, 16, 64, marks=pytest.mark.smoke)])
def test_gpu_lstm(backend, dtype, kw, T, B, hidden):
    _gpu_backend_ready(backend)
    ref_m = torch.nn.LSTM(24, hidden, dtype=torch.float64, **kw)
    ours = LSTM(24, hidden, device="cuda", dtype=dtype, **kw)
    ours.load_state_dict(ref_m.state_dict())
    x = torch.randn(*((B, T, 24) if ref_m.batch_first else (T, B, 24)), dtype=torch.float64, requires_grad=True)
    hx = _states(ref_m, B, torch.float64)
    x_o = x.detach().to("cuda", dtype).requires_grad_()
    hx_o = tuple(s.detach().to("cuda", dtype).requires_grad_() for s in hx)
    _compare_modules(ref_m, ours, x, hx, SEQ_TOL[dtype], backend, x_o, hx_o)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("B", [pytest.param(1, marks=pytest.mark.smoke), 7])
def test_gpu_lstm_inference(backend, dtype, B):
    """torch.no_grad: the path that saves nothing (train=False in the kernels)."""
    _gpu_backend_ready(backend)
    ref_m = torch.nn.LSTM(24, 128, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = LSTM(24, 128, num_layers=2, bidirectional=True, device="cuda", dtype=dtype)
    ours.load_state_dict(ref_m.state_dict())
    x = torch.randn(21, B, 24, dtype=torch.float64)
    hx = tuple(s.detach() for s in _states(ref_m, B, torch.float64))
    with torch.no_grad(), use_backend(backend):
        out, (h_n, c_n) = ours(x.to("cuda", dtype), tuple(s.to("cuda", dtype) for s in hx))
        ref_out, (ref_h, ref_c) = ref_m(x, hx)
    for name, a, b in (("output", out, ref_out), ("h_n", h_n, ref_h), ("c_n", c_n, ref_c)):
        assert_close_rel(a.cpu(), b, SEQ_TOL[dtype], name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_lstm_cell_training(backend, dtype):
    """LSTMCell with autograd (a one-step lstm_sequence): h1, c1 and every gradient."""
    _gpu_backend_ready(backend)
    ref_c = torch.nn.LSTMCell(40, 128, dtype=torch.float64)
    ours = LSTMCell(40, 128, device="cuda", dtype=dtype)
    ours.load_state_dict(ref_c.state_dict())
    x, h, c = (torch.randn(6, n, dtype=torch.float64, requires_grad=True) for n in (40, 128, 128))
    mine = [t.detach().to("cuda", dtype).requires_grad_() for t in (x, h, c)]
    r = ref_c(x, (h, c))
    with use_backend(backend):
        o = ours(mine[0], (mine[1], mine[2]))
        go = torch.autograd.grad((o[0] * 2 + o[1]).sum(), [*mine, *ours.parameters()])
    gr = torch.autograd.grad((r[0] * 2 + r[1]).sum(), [x, h, c, *ref_c.parameters()])
    names = ["h1", "c1", "grad x", "grad h", "grad c", "grad weight_ih", "grad weight_hh", "grad bias_ih",
             "grad bias_hh"]
    for name, a, b in zip(names, (*o, *go), (*r, *gr)):
        assert_close_rel(a.cpu(), b, SEQ_TOL[dtype], name)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", [None, "triton"])  # None: automatic (cuda declines, triton takes it)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_lstm_packed_and_proj(backend, dtype):
    ref_m = torch.nn.LSTM(24, 64, bidirectional=True, proj_size=32, dtype=torch.float64)
    ours = LSTM(24, 64, bidirectional=True, proj_size=32, device="cuda", dtype=dtype)
    ours.load_state_dict(ref_m.state_dict())
    seqs = [torch.randn(n, 24, dtype=torch.float64) for n in (7, 19, 3, 19)]
    packed = pack_sequence(seqs, enforce_sorted=False)
    packed_o = pack_sequence([s.to("cuda", dtype) for s in seqs], enforce_sorted=False)
    hx = _states(ref_m, 4, torch.float64)
    hx_o = tuple(s.detach().to("cuda", dtype).requires_grad_() for s in hx)
    _compare_modules(ref_m, ours, packed, hx, SEQ_TOL[dtype], backend, packed_o, hx_o)


@pytest.mark.gpu
def test_gpu_auto_dispatch_prefers_cuda():
    _gpu_backend_ready("cuda")
    xg = torch.randn(8, 2, 4 * 128, device="cuda", dtype=torch.float16)
    w_hh = torch.randn(4 * 128, 128, device="cuda", dtype=torch.float16)
    h0 = c0 = torch.zeros(2, 128, device="cuda", dtype=torch.float16)
    assert ops.SEQ.select(xg, w_hh, None, h0, c0, None, train=False) == "cuda"
    proj_why = ops.SEQ.reasons("cuda", xg, w_hh, torch.randn(64, 128, device="cuda", dtype=torch.float16),
                               h0, c0, None, train=False)
    assert any("projections" in r for r in proj_why)


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_lstm_cell_graph_generation(backend, dtype):
    """A 16-step generation loop of LSTMCell captured in one CUDA graph, replayed, against torch's
    eager LSTMCell loop in float64."""
    _gpu_backend_ready(backend)
    steps, B, hidden = 16, 2, 512
    ref_c = torch.nn.LSTMCell(hidden, hidden, dtype=torch.float64)
    ours = LSTMCell(hidden, hidden, device="cuda", dtype=dtype)
    ours.load_state_dict(ref_c.state_dict())
    x0 = torch.randn(B, hidden, dtype=torch.float64)
    h = c = torch.zeros(B, hidden, dtype=torch.float64)
    x, ref_hs = x0, []
    with torch.no_grad():
        for _ in range(steps):
            h, c = ref_c(x, (h, c))
            ref_hs.append(h)
            x = h
    static_x = x0.to("cuda", dtype)
    static_h = torch.zeros(B, hidden, device="cuda", dtype=dtype)
    static_c = torch.zeros_like(static_h)
    outs = torch.empty(steps, B, hidden, device="cuda", dtype=dtype)

    def loop():
        h, c, x = static_h, static_c, static_x
        for t in range(steps):
            h, c = ours(x, (h, c))
            outs[t].copy_(h)
            x = h

    with use_backend(backend), torch.no_grad():
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            loop()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                loop()
        outs.zero_()
        graph.replay()
        torch.cuda.synchronize()
    assert_close_rel(outs.cpu(), torch.stack(ref_hs), SEQ_TOL[dtype], "generated h_t")
