"""CUDA GRU kernels (csrc/gru.cu: the GRU policy of csrc/recurrence.cuh, through seqgen_fast.kernels.gru_cuda).

On the CPU:
* the extension exposes the gru_* functions; the persistent kernels' plan (a pure host computation,
  three gate rows per unit) takes the anchor sizes and refuses what does not fit on chip; the
  supports_* functions give reasons; the C++ launchers reject bad arguments before touching a device;
* the SASS of the GRU's recurrent kernels for sm_90a (the built _C, or csrc/gru.cu compiled alone)
  holds HMMA instructions, no local memory, and registers within the launch bounds (the LSTM's check,
  support.sass);
* under the host emulation (support.emulation): the tensor-core and FFMA kernels, forward, backward
  and the cell step, match float64 in every dtype and product (fp32 as TF32 and exact), with their
  outputs poisoned beforehand and their blocks started in a fresh random order each run, handing h_t
  over through release/acquire flags on real host threads (and a ThreadSanitizer build of the same);
  launches that cannot be resident are refused with their reason before anything runs; and the whole
  cuda backend (ops, dispatch, launchers) runs nn.GRU / nn.GRUCell against torch in float64, eagerly
  and under torch.compile(fullgraph=True) without recompiles, on the emulated kernels.
With `-m gpu`: forward, backward and the cell step against float64 in every dtype, outputs poisoned
with NaN beforehand, TF32 on and off, graph replays, torch.compile with inductor.
"""
import os
import shutil
from pathlib import Path

import pytest
import torch

import seqgen_fast
from seqgen_fast import _ext
from seqgen_fast.kernels import gru_cuda, lstm_cuda
from seqgen_fast.nn import GRU, GRUCell
from seqgen_fast.ops import gru as ops
from support import emulated_recurrence, sass
from support.emulation import build
from support.utils import TOL, assert_close_rel, poison, rel_err

NVCC = shutil.which("nvcc") is not None
SKIPPED = os.environ.get("SEQGEN_FAST_SKIP_CUDA", "0") not in ("", "0")
needs_c = pytest.mark.skipif(_ext.C is None, reason="seqgen_fast._C not built")

H100 = {"multiprocessor_count": 132, "shared_memory_per_block_optin": 232448}
A100 = {"multiprocessor_count": 108, "shared_memory_per_block_optin": 166912}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CODE = {F32: 0, F16: 1, BF16: 2}
MMA, FFMA = gru_cuda.MATH_MMA, gru_cuda.MATH_FFMA
# Tolerances (relative error norms against float64): the layer dtype's TOL, except exact fp32 (FFMA),
# which must stay far below what TF32 would give. The backward reads the saved gates and h_{t-1} in the
# layer dtype and hands d_hg to the next step in it: a few roundings more than the forward.
FWD_TOL = {(F32, MMA): TOL[F32], (F32, FFMA): 1e-4, (F16, MMA): TOL[F16], (BF16, MMA): TOL[BF16]}
BWD_TOL = {(F32, MMA): TOL[F32], (F32, FFMA): 1e-4, (F16, MMA): 1e-2, (BF16, MMA): 5e-2}


def _math(dtype, tf32=True):
    return MMA if dtype != F32 or tf32 else FFMA


# ----------------------------------------------------------------------------------------------
# CPU: build, plan, reasons, argument validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NVCC or SKIPPED, reason="no nvcc here (or SEQGEN_FAST_SKIP_CUDA): _C is not expected")
def test_extension_exposes_gru_functions():
    assert _ext.C is not None, _ext.reason
    assert "gru" in _ext.C.families
    for name in ("gru_sequence_plan", "gru_sequence_check", "gru_sequence_forward", "gru_sequence_backward",
                 "gru_cell_step"):
        assert callable(getattr(_ext.C, name, None)), f"{name}: _C was built from an older csrc/; rebuild it"
    assert (_ext.C.GRU_MATH_MMA, _ext.C.GRU_MATH_FFMA) == (MMA, FFMA)


ANCHORS = [(1024, 1), (1024, 64), (1024, 256), (512, 16), (512, 1), (256, 256), (33, 1), (97, 5)]


@needs_c
@pytest.mark.parametrize("dtype,math", [(F32, MMA), (F16, MMA), (BF16, MMA), (F32, FFMA)])
@pytest.mark.parametrize("hidden,batch", ANCHORS)
@pytest.mark.parametrize("backward", [False, True])
def test_plan_fits_anchor_sizes_on_h100(dtype, math, hidden, batch, backward):
    p = gru_cuda.sequence_plan(dtype, hidden, batch, backward=backward, device_facts=H100, math=math)
    assert p["reason"] == "", p["reason"]
    assert p["math"] == math
    groups, slices, units = p["groups"], p["slices"], p["units"]
    assert p["blocks"] == groups * slices <= H100["multiprocessor_count"], "one resident block per SM"
    assert (slices - 1) * units < hidden <= slices * units, "every hidden unit owned by exactly one slice"
    assert groups == 1 or batch >= 8 * groups, "each batch group holds at least one 8-column n-tile"
    k, rows = (3 * hidden, units) if backward else (hidden, 3 * units)  # three gate rows per unit
    assert H100["shared_memory_per_block_optin"] >= p["smem_bytes"] >= rows * k * (4 if dtype == F32 else 2)
    assert p["rows"] >= rows and p["cols"] * units <= 2 * p["threads"]
    if math == MMA:
        assert p["rows"] == 16 * p["mt"] and p["mt"] in ((1,) if backward else (1, 2, 4))
        assert p["mt"] * p["ntw"] <= 8 and p["cols"] == p["ngroups"] * p["ntw"] * 8
        assert p["ngroups"] * p["kparts"] <= p["threads"] // 32
    else:
        assert p["bt"] == (4 if batch >= 4 else 1) and p["cols"] % p["bt"] == 0


@needs_c
def test_plan_of_three_gate_rows_differs_from_the_lstms():
    # B1 H1024 fp16: 8 units a block, 24 rows in two m-tiles (the LSTM's 32 rows fill two as well);
    # B64 H1024: two batch groups of 16 units, 48 rows in four m-tiles
    one = gru_cuda.sequence_plan(F16, 1024, 1, backward=False, device_facts=H100)
    assert (one["groups"], one["units"], one["mt"], one["rows"], one["blocks"]) == (1, 8, 2, 32, 128)
    big = gru_cuda.sequence_plan(F16, 1024, 64, backward=False, device_facts=H100)
    assert (big["groups"], big["units"], big["mt"], big["blocks"]) == (2, 16, 4, 128)
    # tf32 B64 H1024: one group of 8 units (24 rows; two groups of 16 units would need 196 KB of W_hh)
    f32 = gru_cuda.sequence_plan(F32, 1024, 64, backward=False, device_facts=H100)
    assert (f32["reason"], f32["groups"], f32["units"], f32["mt"], f32["cols"]) == ("", 1, 8, 2, 64)
    # a slice 3/4 of the LSTM's: tf32 H=1280 at batch 1 fits (30 rows of 1280 a block), the LSTM's does not
    assert gru_cuda.sequence_plan(F32, 1280, 1, backward=False, device_facts=H100)["reason"] == ""
    assert lstm_cuda.sequence_plan(F32, 1280, 1, backward=False, device_facts=H100)["reason"]


@needs_c
def test_plan_refuses_what_does_not_fit_and_names_the_sizes():
    p = gru_cuda.sequence_plan(F32, 2048, 1, backward=False, device_facts=H100)
    assert "shared memory" in p["reason"] and "hidden=2048" in p["reason"] and "float32" in p["reason"]
    assert "persistent GRU forward kernel" in p["reason"]
    assert "persistent GRU backward" in gru_cuda.sequence_plan(F16, 4096, 1, backward=True, device_facts=H100)["reason"]
    assert "batch=1000000" in gru_cuda.sequence_plan(F16, 1024, 10**6, backward=False, device_facts=H100)["reason"]
    assert gru_cuda.sequence_plan(F32, 1024, 1, backward=False, device_facts=A100)["reason"] == ""
    assert gru_cuda.sequence_plan(F32, 1536, 1, backward=False, device_facts=A100)["reason"]


@needs_c
def test_plan_checks_its_codes_with_the_shared_checks_naming_the_gru():
    # the checks themselves are csrc/recurrence_launch.cuh's, tested through the LSTM's plan as well
    with pytest.raises(ValueError, match="gru_sequence_plan: unsupported dtype code 3"):
        _ext.C.gru_sequence_plan(3, 64, 1, False, MMA, 132, 232448)
    with pytest.raises(ValueError, match="gru_sequence_plan: the FFMA product is for float32"):
        _ext.C.gru_sequence_plan(1, 64, 1, False, FFMA, 132, 232448)


def test_products_follow_the_tf32_flags_as_the_lstms():
    # one rule for both families (kernels/_recurrence_cuda.py), tested in tests/test_lstm_cuda.py
    assert (gru_cuda.sequence_math, gru_cuda.cell_math) == (lstm_cuda.sequence_math, lstm_cuda.cell_math)
    assert (gru_cuda.MATH_MMA, gru_cuda.MATH_FFMA, gru_cuda.CAPS) == (lstm_cuda.MATH_MMA, lstm_cuda.MATH_FFMA,
                                                                    lstm_cuda.CAPS)


def _seq_args(T=3, B=2, H=5, dtype=F32, bias=True):
    return (torch.randn(T, B, 3 * H, dtype=dtype), torch.randn(3 * H, H, dtype=dtype),
            torch.randn(3 * H, dtype=dtype) if bias else None, torch.randn(B, H, dtype=dtype))


@needs_c
def test_supports_give_reasons_for_cpu_tensors_dtypes_and_shapes():
    xg, w, b, h0 = _seq_args()
    assert any("CUDA" in r for r in gru_cuda.supports_sequence(xg, w, b, h0))
    assert any("float64" in r for r in gru_cuda.supports_sequence(xg.double(), w.double(), None, h0.double()))
    assert any("mixed dtypes" in r for r in gru_cuda.supports_sequence(xg, w, b.half(), h0))
    assert any("b_hh" in r for r in gru_cuda.supports_sequence(xg, w, b[:-1], h0))
    assert any("w_hh has shape" in r for r in gru_cuda.supports_sequence(xg, torch.randn(20, 5), b, h0))
    assert any("h0" in r for r in gru_cuda.supports_sequence(xg, w, b, h0[:, :4]))
    hs, act = torch.randn(3, 2, 5), torch.randn(3, 2, 20)
    assert any("CUDA" in r for r in gru_cuda.supports_sequence_backward(w, hs, act, h0))
    assert any("act" in r for r in gru_cuda.supports_sequence_backward(w, hs, act[..., :15], h0))
    x, h, w_ih = torch.randn(2, 3), torch.randn(2, 5), torch.randn(15, 3)
    meta = [t.to("meta") for t in (x, h, w_ih, w)]
    assert any("meta" in r for r in gru_cuda.supports_cell(*meta, None, None))
    assert any("w_ih" in r for r in gru_cuda.supports_cell(x, h, w_ih[:, :2], w, b, b))
    assert any("b_ih" in r for r in gru_cuda.supports_cell(x, h, w_ih, w, b[:7], b))
    assert any("bfloat16" in r for r in gru_cuda.supports_cell(x, h, w_ih, w, b, b.bfloat16()))


@needs_c
def test_csrc_launchers_validate_arguments_before_touching_a_device():
    C = _ext.C
    fwd = dict(device=0, dtype=0, math=MMA, seq_len=4, batch=2, hidden=8, xg=16, w_hh=16, b_hh=0, h0=16, hs=16,
               h_n=16, act=0, flags=16, flag_count=132, stream=0)
    with pytest.raises(ValueError, match="gru_sequence_forward: seq_len"):
        C.gru_sequence_forward(**{**fwd, "seq_len": 0})
    with pytest.raises(ValueError, match="hidden"):
        C.gru_sequence_forward(**{**fwd, "hidden": 2**31})
    with pytest.raises(ValueError, match="unsupported dtype code 3"):
        C.gru_sequence_forward(**{**fwd, "dtype": 3})
    with pytest.raises(ValueError, match="math code 5"):
        C.gru_sequence_forward(**{**fwd, "math": 5})
    with pytest.raises(ValueError, match="FFMA product is for float32"):
        C.gru_sequence_forward(**{**fwd, "dtype": 2, "math": FFMA})
    for name in ("xg", "w_hh", "h0", "hs", "h_n", "flags"):
        with pytest.raises(ValueError, match=f"{name} is a null pointer"):
            C.gru_sequence_forward(**{**fwd, name: 0})
    bwd = dict(device=0, dtype=1, math=MMA, seq_len=4, batch=2, hidden=8, w_hh=16, hs=16, act=16, h0=16, grad_hs=0,
               grad_h_n=0, d_xg=16, d_hg=16, grad_h0=16, flags=16, flag_count=132, stream=0)
    for name in ("w_hh", "hs", "act", "h0", "d_xg", "d_hg", "grad_h0"):
        with pytest.raises(ValueError, match=f"gru_sequence_backward: {name} is a null pointer"):
            C.gru_sequence_backward(**{**bwd, name: 0})
    with pytest.raises(ValueError, match="batch"):
        C.gru_sequence_backward(**{**bwd, "batch": -1})
    cell = dict(device=0, dtype=2, math=MMA, batch=1, input_size=4, hidden=8, x=16, h=16, w_ih=16, w_hh=16, b_ih=0,
                b_hh=0, h1=16, stream=0)
    with pytest.raises(ValueError, match="gru_cell_step: input_size"):
        C.gru_cell_step(**{**cell, "input_size": 0})
    with pytest.raises(ValueError, match="h1 is a null pointer"):
        C.gru_cell_step(**{**cell, "h1": 0})


# ----------------------------------------------------------------------------------------------
# CPU: the SASS of the recurrent kernels (sm_90a)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sm90_binary(tmp_path_factory):
    return sass.sm90_binary("gru.cu", tmp_path_factory.mktemp("sass"),
                            Path(_ext.C.__file__) if _ext.C is not None else None)


def test_sass_of_the_recurrent_kernels(sm90_binary):
    kinds = sass.check_recurrent_kernels(sm90_binary, "GruCell")
    # the LSTM's instance set: forward 8 warp tiles x 3 dtypes + 2 FFMA, backward 3 x 3 + 2, steps 6 x 3, 4 x 3
    assert kinds == {"forward_kernel": 26, "backward_kernel": 11, "step_kernel<": 18, "step_kernel_ffma": 12}, kinds


# ----------------------------------------------------------------------------------------------
# References and inputs shared by the emulated and the GPU tests
# ----------------------------------------------------------------------------------------------
def _ref_loop(xg, w_hh, b_hh, h0):
    """The GRU recurrence in plain PyTorch: (hs, h_n, act = (r, z, n, hg^n)) and the list of hg_t."""
    h, hs, acts, hgs = h0, [], [], []
    for t in range(xg.shape[0]):
        hg = h @ w_hh.T + (b_hh if b_hh is not None else 0)
        hgs.append(hg)
        (xr, xz, xn), (hr, hz, hn) = xg[t].chunk(3, dim=-1), hg.chunk(3, dim=-1)
        r, z = (xr + hr).sigmoid(), (xz + hz).sigmoid()
        n = (xn + r * hn).tanh()
        h = n + z * (h - n)
        hs.append(h), acts.append(torch.cat([r, z, n, hn], dim=-1))
    return torch.stack(hs), h, torch.stack(acts), hgs


def _ref_grads(xg, w_hh, b_hh, h0, g_hs, g_hn):
    """float64 autograd of the loop: dL/dxg, dL/dhg, dL/dh0 of <hs, g_hs> + <h_n, g_hn>."""
    xg64, h064 = (t.detach().double().requires_grad_() for t in (xg, h0))
    hs, h_n, _, hgs = _ref_loop(xg64, w_hh.double(), None if b_hh is None else b_hh.double(), h064)
    for hg in hgs:
        hg.retain_grad()
    ((hs * g_hs.double()).sum() + (h_n * g_hn.double()).sum()).backward()
    return xg64.grad, torch.stack([hg.grad for hg in hgs]), h064.grad


def _inputs_on(device, T, B, H, dtype, bias=True):
    """torch.nn.GRU-like scales: W_hh, b_hh ~ U(-1/sqrt(H), 1/sqrt(H)), xg of a unit-variance input."""
    k = H ** -0.5
    u = lambda *s: ((torch.rand(*s, device=device) * 2 - 1) * k).to(dtype)  # noqa: E731
    return (torch.randn(T, B, 3 * H, device=device).to(dtype), u(3 * H, H), u(3 * H) if bias else None,
            (0.5 * torch.randn(B, H, device=device)).to(dtype))


def _ref_cell(x, h, w_ih, w_hh, b_ih, b_hh):
    cell = torch.nn.GRUCell(x.shape[1], h.shape[1], bias=b_ih is not None, dtype=torch.float64)
    with torch.no_grad():
        for name, t in (("weight_ih", w_ih), ("weight_hh", w_hh), ("bias_ih", b_ih), ("bias_hh", b_hh)):
            if t is not None:
                getattr(cell, name).copy_(t.double().cpu())
        return cell(x.double().cpu(), h.double().cpu())


def _cell_inputs_on(device, B, I, H, dtype, bias):
    k = H ** -0.5
    u = lambda *s: ((torch.rand(*s, device=device) * 2 - 1) * k).to(dtype)  # noqa: E731
    return (torch.randn(B, I, device=device).to(dtype), (0.5 * torch.randn(B, H, device=device)).to(dtype),
            u(3 * H, I), u(3 * H, H), u(3 * H) if bias else None, u(3 * H) if bias else None)


def _nan(*shape, dtype, device="cpu"):
    return poison(torch.empty(*shape, dtype=dtype, device=device))


# ----------------------------------------------------------------------------------------------
# CPU: the kernels of csrc/gru.cu run on the host under the SIMT emulation
# ----------------------------------------------------------------------------------------------
_EMU_MAIN = emulated_recurrence.shim("gru") + r"""
extern "C" int emu_forward(int dt, int math, long T, long B, long H, uptr xg, uptr w, uptr b, uptr h0, uptr hs,
                           uptr hn, uptr act, uptr flags, long nflags) {
  EMU_CALL(seqgen::gru::sequence_forward(0, dt, math, T, B, H, xg, w, b, h0, hs, hn, act, flags, nflags, 0))
}
extern "C" int emu_backward(int dt, int math, long T, long B, long H, uptr w, uptr hs, uptr act, uptr h0, uptr ghs,
                            uptr ghn, uptr dxg, uptr dhg, uptr gh0, uptr flags, long nflags) {
  EMU_CALL(seqgen::gru::sequence_backward(0, dt, math, T, B, H, w, hs, act, h0, ghs, ghn, dxg, dhg, gh0, flags,
                                          nflags, 0))
}
extern "C" int emu_cell(int dt, int math, long B, long I, long H, uptr x, uptr h, uptr wih, uptr whh, uptr bih,
                        uptr bhh, uptr h1) {
  EMU_CALL(seqgen::gru::cell_step(0, dt, math, B, I, H, x, h, wih, whh, bih, bhh, h1, 0))
}
"""


class EmulatedC(emulated_recurrence.EmulatedRecurrence):
    """``seqgen_fast._C``'s GRU functions (same names, arguments and exceptions) over the host-emulated
    build of csrc/gru.cu: tensors are CPU tensors, pointers their host addresses, device and stream 0."""

    GRU_MATH_MMA, GRU_MATH_FFMA = MMA, FFMA
    gru_sequence_plan = emulated_recurrence.EmulatedRecurrence.sequence_plan
    gru_sequence_check = emulated_recurrence.EmulatedRecurrence.sequence_check
    gru_sequence_forward = emulated_recurrence.EmulatedRecurrence.sequence_forward
    gru_sequence_backward = emulated_recurrence.EmulatedRecurrence.sequence_backward
    gru_cell_step = emulated_recurrence.EmulatedRecurrence.cell_step


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """csrc/gru.cu built for the host under the emulation, behind the EmulatedC adapter."""
    lib = build(str(tmp_path_factory.mktemp("gru_emu")), "gru.cu", _EMU_MAIN, "gru_emu")
    return EmulatedC(lib, forward_ptrs=8, backward_ptrs=10, cell_ptrs=7)


_seed = emulated_recurrence.seed


# ---- the persistent kernels -------------------------------------------------------------------------
# (T, B, H, dtype, math, sms, smem, threads, bias, offset_h0): what each configuration exercises.
EMU_SEQ = [
    (3, 1, 33, F16, MMA, 4, 232448, 64, True, False),    # odd H: 16-bit pair loads (3H odd in the backward);
                                                         # 9 units: 27 rows in 2 m-tiles, k-ranges wrapping gates
    pytest.param(2, 6, 64, BF16, MMA, 4, 232448, 32, False, False,  # 16 units: 48 rows in 4 m-tiles; no b_hh
                 marks=pytest.mark.smoke),
    (3, 17, 40, F32, MMA, 4, 232448, 64, True, True),    # tf32; 17 columns: 3 n-tiles, the last partial; h0 misaligned
    (2, 24, 24, F16, MMA, 8, 232448, 32, True, False),   # two batch groups of 12 rows over 8 SMs
    (2, 72, 16, BF16, MMA, 1, 232448, 32, True, False),  # one block: the batch in passes (items per pass bounded)
    (2, 17, 40, F32, FFMA, 4, 12000, 32, True, True),    # exact fp32: staged k chunks, batch passes (tiles of 4)
    (3, 2, 9, F32, FFMA, 3, 232448, 64, False, False),   # exact fp32, B < 4: tiles of one batch row
]


def _emulated_forward(emu, T, B, H, dtype, math, bias, offset_h0, train=True):
    xg, w_hh, b_hh, h0 = _inputs_on("cpu", T, B, H, dtype, bias)
    if offset_h0:
        h0 = torch.cat([torch.zeros(1, dtype=dtype), h0.flatten()])[1:].view(B, H)
    plan = emu.gru_sequence_check(0, CODE[dtype], H, B, False, math, 0)
    assert plan["reason"] == "", plan["reason"]
    hs, h_n, act = _nan(T, B, H, dtype=dtype), _nan(B, H, dtype=dtype), _nan(T, B, 4 * H, dtype=dtype)
    flags = torch.zeros(plan["blocks"], dtype=torch.int32)
    emu.call("emu_forward", CODE[dtype], math, T, B, H, xg, w_hh, b_hh, h0, hs, h_n, act if train else None, flags,
             flags.numel())
    assert torch.equal(flags, torch.full_like(flags, T)), "every block published every step"
    return (xg, w_hh, b_hh, h0), (hs, h_n, act), plan


@pytest.mark.parametrize("T,B,H,dtype,math,sms,smem,threads,bias,offset_h0", EMU_SEQ)
def test_emulated_sequence_forward_backward_match_float64(emu, T, B, H, dtype, math, sms, smem, threads, bias,
                                                          offset_h0):
    seed = _seed()
    emu.configure(sms, smem, threads, seed)
    (xg, w_hh, b_hh, h0), outs, plan = _emulated_forward(emu, T, B, H, dtype, math, bias, offset_h0)
    ref = _ref_loop(*(None if t is None else t.double() for t in (xg, w_hh, b_hh, h0)))
    for name, ours, want in zip(("hs", "h_n", "act"), outs, ref):
        assert_close_rel(ours, want, FWD_TOL[dtype, math], f"emulated {name} (schedule seed {seed}, plan {plan})")

    hs, _, act = outs
    g_hs, g_hn = torch.randn(T, B, H).to(dtype), torch.randn(B, H).to(dtype)
    bplan = emu.gru_sequence_check(0, CODE[dtype], H, B, True, math, 0)
    d_xg, d_hg, d_h0 = _nan(T, B, 3 * H, dtype=dtype), _nan(T, B, 3 * H, dtype=dtype), _nan(B, H, dtype=dtype)
    flags = torch.zeros(bplan["blocks"], dtype=torch.int32)
    emu.call("emu_backward", CODE[dtype], math, T, B, H, w_hh, hs, act, h0, g_hs, g_hn, d_xg, d_hg, d_h0, flags,
             flags.numel())
    for name, ours, want in zip(("d_xg", "d_hg", "grad_h0"), (d_xg, d_hg, d_h0),
                                _ref_grads(xg, w_hh, b_hh, h0, g_hs, g_hn)):
        assert_close_rel(ours, want, BWD_TOL[dtype, math], f"emulated {name} (schedule seed {seed}, plan {bplan})")


def test_emulated_inference_saves_nothing_and_gives_the_same_states(emu):
    emu.configure(4, 232448, 32, _seed())
    torch.manual_seed(5)
    _, (hs_train, hn_train, _), _ = _emulated_forward(emu, 3, 9, 40, BF16, MMA, True, False)
    torch.manual_seed(5)
    _, (hs, h_n, act), _ = _emulated_forward(emu, 3, 9, 40, BF16, MMA, True, False, train=False)
    assert torch.equal(hs, hs_train) and torch.equal(h_n, hn_train)
    assert act.isnan().all(), "act was not given: nothing written there"


def test_emulated_schedules_do_not_change_the_results(emu):
    """The handoff leaves nothing to the schedule: two block orders give identical bits."""
    results = []
    for seed in (_seed(), _seed()):
        emu.configure(4, 232448, 32, seed)
        torch.manual_seed(7)
        results.append(_emulated_forward(emu, 4, 9, 40, F16, MMA, True, False)[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# The persistent kernels (forward, then backward) over a few schedules, built with ThreadSanitizer: every
# read of another block's h_t or d_hg must be ordered after its write by the flags' release/acquire edges.
_TSAN_MAIN = emulated_recurrence.tsan_program("gru", r"""
template <typename T>
int run(int dtype, int math, int T_len, int B, int H, int sms, unsigned seed) {
  seqgen::recurrence::SequencePlan plan, bplan;
  if (!plans(dtype, math, B, H, sms, seed, plan, bplan)) return 1;
  auto xg = values<T>(size_t(T_len) * B * 3 * H, 0.05f), w = values<T>(size_t(3) * H * H, 0.01f);
  auto b = values<T>(size_t(3) * H, 0.02f), h0 = values<T>(size_t(B) * H, 0.02f), hn = values<T>(size_t(B) * H, 0);
  auto hs = values<T>(size_t(T_len) * B * H, 0), ghs = values<T>(size_t(T_len) * B * H, 0.04f);
  auto act = values<T>(size_t(T_len) * B * 4 * H, 0), dxg = xg, dhg = xg, gh0 = hn;
  std::vector<unsigned> flags(plan.blocks, 0u), bflags(bplan.blocks, 0u);
  seqgen::gru::sequence_forward(0, dtype, math, T_len, B, H, ptr(xg), ptr(w), ptr(b), ptr(h0), ptr(hs), ptr(hn),
                                ptr(act), ptr(flags), plan.blocks, 0);
  seqgen::gru::sequence_backward(0, dtype, math, T_len, B, H, ptr(w), ptr(hs), ptr(act), ptr(h0), ptr(ghs), ptr(hn),
                                 ptr(dxg), ptr(dhg), ptr(gh0), ptr(bflags), bplan.blocks, 0);
  return 0;
}

int main() {
  int rc = 0;
  rc |= run<__half>(1, 0, 3, 9, 40, 4, 1);          // tensor cores, 4 blocks
  rc |= run<__nv_bfloat16>(2, 0, 2, 24, 24, 8, 2);  // two batch groups
  rc |= run<float>(0, 1, 2, 5, 20, 3, 3);           // exact fp32: staged k chunks
  return rc;
}
""")


def test_emulated_handoff_is_race_free_under_thread_sanitizer(tmp_path):
    emulated_recurrence.assert_race_free(tmp_path, "gru.cu", _TSAN_MAIN, "gru_tsan")


@needs_c
@pytest.mark.parametrize("dtype,math", [(BF16, MMA), (F32, MMA), (F32, FFMA)])
@pytest.mark.parametrize("hidden,batch,backward", [(1024, 64, False), (512, 16, True), (97, 5, False)])
def test_emulated_build_plans_as_the_extension(emu, dtype, math, hidden, batch, backward):
    args = (CODE[dtype], hidden, batch, backward, math, 132, 232448)
    assert emu.gru_sequence_plan(*args) == dict(_ext.C.gru_sequence_plan(*args))


def test_emulated_launch_refuses_what_cannot_run(emu):
    xg, w_hh, b_hh, h0 = _inputs_on("cpu", 2, 2, 64, F16)
    out = [torch.empty(s, dtype=F16) for s in ((2, 2, 64), (2, 64))]
    emu.configure(4, 4096, 32)
    with pytest.raises(RuntimeError, match="gru_sequence_forward: the persistent GRU forward .* shared memory per"):
        emu.call("emu_forward", 1, MMA, 2, 2, 64, xg, w_hh, b_hh, h0, *out, None, torch.zeros(4, dtype=torch.int32), 4)
    emu.configure(2, 232448, 32)  # 2 SMs: 32 units per block, 96 rows: more than the tensor-core kernels take
    with pytest.raises(RuntimeError, match="32 units per block need 96 rows"):
        emu.call("emu_forward", 1, MMA, 2, 2, 64, xg, w_hh, b_hh, h0, *out, None, torch.zeros(4, dtype=torch.int32), 4)
    emu.configure(4, 232448, 32, blocks_per_sm=0)  # the occupancy query finds no room for a block
    assert "cannot all be resident: 0 per SM x 4 SMs" in emu.gru_sequence_check(0, 1, 64, 2, False, MMA, 0)["reason"]
    with pytest.raises(RuntimeError, match="persistent GRU kernel's cooperative grid .* cannot all be resident"):
        emu.call("emu_forward", 1, MMA, 2, 2, 64, xg, w_hh, b_hh, h0, *out, None, torch.zeros(4, dtype=torch.int32), 4)
    emu.configure(4, 232448, 32)
    with pytest.raises(ValueError, match="flags holds 2 words; the 4 blocks"):
        emu.call("emu_forward", 1, MMA, 2, 2, 64, xg, w_hh, b_hh, h0, *out, None, torch.zeros(2, dtype=torch.int32), 2)


def test_emulated_grid_follows_the_sms_the_context_may_use(emu):
    # an MPS client limit or a green context: 3 of 8 SMs -> the plan spreads H over 3 blocks
    emu.configure(8, 232448, 32, _seed(), context_sms=3)
    plan = emu.gru_sequence_check(0, CODE[F16], 48, 2, False, MMA, 0)
    assert plan["reason"] == "" and plan["blocks"] == 3 and plan["units"] == 16
    torch.manual_seed(3)
    (xg, w_hh, b_hh, h0), outs, _ = _emulated_forward(emu, 2, 2, 48, F16, MMA, True, False)
    assert_close_rel(outs[0], _ref_loop(*(t.double() for t in (xg, w_hh, b_hh, h0)))[0], TOL[F16], "hs")


# ---- the one-launch cell step -----------------------------------------------------------------------
@pytest.mark.parametrize("B,I,H,dtype,math,sms,bias,offset_x", [
    (1, 7, 1, F32, FFMA, 4, True, False),     # one unit: rows past H repeat the block's first row
    pytest.param(5, 24, 48, BF16, MMA, 3, False, False,  # B < 8: FFMA tiles, 16-byte weight loads, no bias
                 marks=pytest.mark.smoke),
    (3, 9, 33, F16, MMA, 2, True, True),      # unaligned rows (I = 9, x misaligned): scalar FFMA kernel
    (8, 24, 40, F16, MMA, 4, True, False),    # B = 8: tensor cores, one n-tile; 10 units: 30 rows in 2 m-tiles
    (19, 9, 33, BF16, MMA, 3, True, True),    # tensor cores, odd sizes: 16-bit pair loads, 3 n-tiles
    (12, 16, 24, F32, MMA, 2, False, False),  # tf32 tensor cores
    (12, 16, 24, F32, FFMA, 2, True, False),  # exact fp32 at B >= 8
])
def test_emulated_cell_step_matches_float64_grucell(emu, B, I, H, dtype, math, sms, bias, offset_x):
    emu.configure(sms, 232448, 64)
    args = list(_cell_inputs_on("cpu", B, I, H, dtype, bias))
    if offset_x:
        args[0] = torch.cat([torch.zeros(1, dtype=dtype), args[0].flatten()])[1:].view(B, I)
    h1 = _nan(B, H, dtype=dtype)
    emu.call("emu_cell", CODE[dtype], math, B, I, H, *args, h1)
    assert_close_rel(h1, _ref_cell(*args), FWD_TOL[dtype, math], "emulated h1")


# ---- the whole cuda backend on the emulated kernels -------------------------------------------------
@pytest.fixture
def emulated_cuda(emu, monkeypatch):
    """The cuda backend of seqgen_fast running the emulated GRU kernels on CPU tensors
    (support.emulated_recurrence.emulate_cuda_backend)."""
    emu.configure(4, 232448, 32, _seed())
    emulated_recurrence.emulate_cuda_backend(monkeypatch, emu, gru_cuda, (ops.SEQ, ops.SEQ_BWD, ops.CELL))
    return emu


def _compare_with_torch(ours, ref, x, tol):
    """ours(x) against torch's float64 module on the same weights: output, h_n, every gradient."""
    out, h_n = ours(x)
    x64 = x.detach().double().requires_grad_()
    r_out, r_h = ref(x64)
    assert_close_rel(out, r_out, tol, "output")
    assert_close_rel(h_n, r_h, tol, "h_n")
    g = torch.randn_like(r_out)
    (out * g.to(out.dtype)).sum().backward()
    (r_out * g).sum().backward()
    assert_close_rel(x.grad, x64.grad, tol, "grad input")
    for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
        assert_close_rel(p.grad, q.grad, tol, f"grad {name}")


MODULE_TOL = {F32: 1e-3, F16: 1e-2, BF16: 6e-2}


@pytest.mark.parametrize("dtype,tf32,bias", [(F32, True, True), (F32, False, False), (F16, True, True),
                                             (BF16, True, False)])
def test_emulated_cuda_backend_runs_nn_gru(emulated_cuda, monkeypatch, dtype, tf32, bias):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", tf32)
    ref = torch.nn.GRU(6, 20, num_layers=2, bidirectional=True, bias=bias, dtype=torch.float64)
    ours = GRU(6, 20, num_layers=2, bidirectional=True, bias=bias, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    xg, w, b, h0 = _seq_args(5, 3, 20, dtype, bias)
    assert ops.SEQ.select(xg, w, b, h0, None, train=True) == "cuda"
    calls = []
    for name in ("sequence_forward", "sequence_backward"):
        real = getattr(gru_cuda, name)
        monkeypatch.setattr(gru_cuda, name, lambda *a, _real=real, _name=name, **k: calls.append(_name) or
                            _real(*a, **k))
    with seqgen_fast.use_backend("cuda"):
        _compare_with_torch(ours, ref, torch.randn(5, 3, 6).to(dtype).requires_grad_(), MODULE_TOL[dtype])
    assert calls.count("sequence_forward") == 4 and calls.count("sequence_backward") == 4, calls


def test_emulated_cuda_forward_hands_its_saved_format_to_another_backward(emulated_cuda, monkeypatch):
    """A layer whose forward fits on chip and whose backward does not (3968 bytes of shared memory on 4
    SMs at H=20): cuda runs the forward, the reference backend the backward on cuda's saved act."""
    emulated_cuda.configure(4, 3968, 32, _seed())
    ref = torch.nn.GRU(6, 20, dtype=torch.float64)
    ours = GRU(6, 20, dtype=F16)
    ours.load_state_dict(ref.state_dict())
    chosen = {}
    for d in (ops.SEQ, ops.SEQ_BWD):
        real = d.select
        monkeypatch.setattr(d, "select", lambda *a, _real=real, _d=d, **k: chosen.setdefault(_d.name, _real(*a, **k)))
    _compare_with_torch(ours, ref, torch.randn(5, 3, 6).to(F16).requires_grad_(), MODULE_TOL[F16])
    assert chosen == {"gru_sequence": "cuda", "gru_sequence_backward": "reference"}, chosen


def test_emulated_cuda_backend_routes_on_with_its_reasons(emulated_cuda):
    xg, w_hh, b_hh, h0 = _seq_args(3, 2, 16, F16)
    packed = torch.tensor([2, 2, 1])
    assert ops.SEQ.reasons("cuda", xg, w_hh, b_hh, h0, packed, train=False) == [ops._NO_VARLEN]
    assert ops.SEQ.select(xg, w_hh, b_hh, h0, packed, train=False) == "reference"
    emulated_cuda.configure(4, 232448, 32, blocks_per_sm=0)
    why = ops.SEQ.reasons("cuda", xg, w_hh, b_hh, h0, None, train=False)
    assert any("cannot all be resident" in r for r in why), why
    assert ops.SEQ.select(xg, w_hh, b_hh, h0, None, train=False) == "reference"
    with pytest.raises(seqgen_fast.BackendError, match="cannot all be resident"):
        ops.SEQ.select(xg, w_hh, b_hh, h0, None, train=False, backend="cuda")


def test_emulated_cuda_backend_runs_packed_input_on_the_next_backend(emulated_cuda, monkeypatch):
    ref = torch.nn.GRU(6, 16, dtype=torch.float64)
    ours = GRU(6, 16)
    ours.load_state_dict(ref.state_dict())
    seqs = [torch.randn(n, 6) for n in (4, 2, 4)]
    chosen = []
    real = ops.SEQ.select
    monkeypatch.setattr(ops.SEQ, "select", lambda *a, **k: chosen.append(real(*a, **k)) or chosen[-1])
    out, h_n = ours(torch.nn.utils.rnn.pack_sequence(seqs, enforce_sorted=False))
    assert chosen == ["reference"], "unequal lengths: the cuda kernel declines, the CPU path takes them"
    r_out, r_h = ref(torch.nn.utils.rnn.pack_sequence([s.double() for s in seqs], enforce_sorted=False))
    assert_close_rel(out.data, r_out.data, TOL[F32], "packed output")
    assert_close_rel(h_n, r_h, TOL[F32], "packed h_n")
    padded = torch.stack([s[:2] for s in seqs], 1)  # equal lengths, the same float32 module: the cuda kernels
    out, _ = ours(padded)
    assert chosen[-1] == "cuda"
    assert_close_rel(out, ref(padded.double())[0], TOL[F32], "padded output on the cuda backend")


def test_emulated_cuda_backend_compiles_fullgraph_without_recompiles(emulated_cuda, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    ref = torch.nn.GRU(6, 16, dtype=torch.float64)
    ours = GRU(6, 16, dtype=F16)
    ours.load_state_dict(ref.state_dict())
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    calls = []
    real = gru_cuda.sequence_forward
    monkeypatch.setattr(gru_cuda, "sequence_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):  # fresh data each call: no recompile, the cuda kernels every time
        _compare_with_torch(compiled, ref, torch.randn(4, 3, 6).to(F16).requires_grad_(), MODULE_TOL[F16])
        for p in list(ours.parameters()) + list(ref.parameters()):
            p.grad = None
    assert len(calls) == 3, "the compiled module runs the cuda backend's kernel"

    cell_ref = torch.nn.GRUCell(6, 16, dtype=torch.float64)
    cell = GRUCell(6, 16, dtype=F16)
    cell.load_state_dict(cell_ref.state_dict())
    steps = []
    real_step = gru_cuda.cell_step
    monkeypatch.setattr(gru_cuda, "cell_step", lambda *a, **k: steps.append(1) or real_step(*a, **k))
    step = torch.compile(lambda x, h: cell(x, h), backend="aot_eager", fullgraph=True)
    h, rh = torch.zeros(9, 16, dtype=F16), torch.zeros(9, 16, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(4):  # a generation loop: one graph, every step on the fused cuda step
            x = torch.randn(9, 6)
            h = step(x.to(F16), h)
            rh = cell_ref(x.double(), rh)
    assert len(steps) == 4
    assert_close_rel(h, rh, 1e-2, "generated h")
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------
# GPU: against float64 references
# ----------------------------------------------------------------------------------------------
def _skip_unless_fits(reasons):
    if any("shared memory" in r for r in reasons):
        pytest.skip("this GPU cannot hold the W_hh slices on chip: " + "; ".join(reasons))
    assert reasons == []


SEQ_SHAPES = [(1, 1, 33), (7, 1, 97), pytest.param(9, 3, 64, marks=pytest.mark.smoke), (6, 5, 97), (32, 16, 512),
              (8, 64, 1024), (5, 256, 256), (12, 1, 1024), (4, 256, 1024)]
PRODUCTS = [(F32, True), (F32, False), (F16, True), (BF16, True)]  # fp32: TF32 tensor cores and exact FFMA


@pytest.fixture
def tf32(request, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", request.param)
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32", PRODUCTS, indirect=["tf32"])
@pytest.mark.parametrize("T,B,H", SEQ_SHAPES)
@pytest.mark.parametrize("train,bias", [(False, True), (True, True), (True, False)])
def test_sequence_forward_matches_float64_loop(dtype, tf32, T, B, H, train, bias):
    xg, w_hh, b_hh, h0 = _inputs_on("cuda", T, B, H, dtype, bias)
    _skip_unless_fits(gru_cuda.supports_sequence(xg, w_hh, b_hh, h0))
    shapes = [(T, B, H), (B, H)] + ([(T, B, 4 * H)] if train else [])
    out = tuple(_nan(*s, dtype=dtype, device="cuda") for s in shapes)
    res = gru_cuda.sequence_forward(xg, w_hh, b_hh, h0, train=train, out=out)
    ref = _ref_loop(*(None if t is None else t.double() for t in (xg, w_hh, b_hh, h0)))
    for name, ours, want in list(zip(("hs", "h_n", "act"), res, ref))[: 3 if train else 2]:
        assert ours.dtype == dtype
        assert_close_rel(ours, want, FWD_TOL[dtype, _math(dtype, tf32)], f"{name} {dtype} tf32={tf32} T{T} B{B} H{H}")
    if not train:
        assert res[2].numel() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32", PRODUCTS, indirect=["tf32"])
@pytest.mark.parametrize("T,B,H", SEQ_SHAPES)
def test_sequence_backward_matches_float64_autograd(dtype, tf32, T, B, H):
    xg, w_hh, b_hh, h0 = _inputs_on("cuda", T, B, H, dtype)
    hs, h_n, act = gru_cuda.sequence_forward(xg, w_hh, b_hh, h0, train=True)
    _skip_unless_fits(gru_cuda.supports_sequence_backward(w_hh, hs, act, h0))
    g_hs, g_hn = torch.randn(T, B, H, device="cuda").to(dtype), torch.randn(B, H, device="cuda").to(dtype)
    out = tuple(_nan(*s, dtype=dtype, device="cuda") for s in ((T, B, 3 * H), (T, B, 3 * H), (B, H)))
    res = gru_cuda.sequence_backward(w_hh, hs, act, h0, g_hs, g_hn, out=out)
    for name, ours, want in zip(("d_xg", "d_hg", "grad_h0"), res, _ref_grads(xg, w_hh, b_hh, h0, g_hs, g_hn)):
        assert ours.dtype == dtype
        assert_close_rel(ours, want, BWD_TOL[dtype, _math(dtype, tf32)], f"{name} {dtype} tf32={tf32} T{T} B{B} H{H}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_sequence_backward_takes_expanded_and_missing_gradients(dtype):
    T, B, H = 6, 4, 97
    xg, w_hh, b_hh, h0 = _inputs_on("cuda", T, B, H, dtype)
    hs, h_n, act = gru_cuda.sequence_forward(xg, w_hh, b_hh, h0, train=True)
    g_last = torch.randn(B, H, device="cuda").to(dtype)
    g_hs = torch.zeros((), dtype=dtype, device="cuda").expand(T, B, H)  # zero-stride, as autograd may give
    ours = gru_cuda.sequence_backward(w_hh, hs, act, h0, g_hs, g_last)
    ours_none = gru_cuda.sequence_backward(w_hh, hs, act, h0, None, g_last)
    want = _ref_grads(xg, w_hh, b_hh, h0, torch.zeros(T, B, H, device="cuda"), g_last)
    for a, b, ref, name in zip(ours, ours_none, want, ("d_xg", "d_hg", "grad_h0")):
        assert_close_rel(a, ref, BWD_TOL[dtype, MMA], name)
        assert torch.equal(a, b), f"{name}: None and an expanded zero gradient must agree"


@pytest.mark.gpu
def test_sequence_forward_refuses_what_does_not_fit():
    xg, w_hh, b_hh, h0 = _inputs_on("cuda", 2, 1, 4096, F32)
    assert any("shared memory" in r for r in gru_cuda.supports_sequence(xg, w_hh, b_hh, h0))
    with pytest.raises(RuntimeError, match="shared memory"):
        gru_cuda.sequence_forward(xg, w_hh, b_hh, h0, train=False)


@pytest.mark.gpu
def test_sequence_empty_sizes_launch_nothing():
    xg, w_hh, b_hh, h0 = _inputs_on("cuda", 0, 3, 16, F16)
    hs, h_n, act = gru_cuda.sequence_forward(xg, w_hh, b_hh, h0, train=True)
    assert hs.shape == (0, 3, 16) and act.shape == (0, 3, 64) and torch.equal(h_n, h0)
    d_xg, d_hg, d_h0 = gru_cuda.sequence_backward(w_hh, hs, act, h0, None, h0)
    assert d_xg.shape == d_hg.shape == (0, 3, 48) and torch.equal(d_h0, h0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
def test_sequence_forward_replays_from_a_cuda_graph(dtype):
    """The cooperative launch, its zeroed flags and the cached plan inside a stream capture."""
    T, B, H = 6, 16, 256
    xg, w_hh, b_hh, h0 = _inputs_on("cuda", T, B, H, dtype)
    out = tuple(torch.empty(s, dtype=dtype, device="cuda") for s in ((T, B, H), (B, H)))
    gru_cuda.sequence_forward(xg, w_hh, b_hh, h0, train=False, out=out)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gru_cuda.sequence_forward(xg, w_hh, b_hh, h0, train=False, out=out)
    for _ in range(2):
        xg.copy_(_inputs_on("cuda", T, B, H, dtype)[0])
        poison(out[0])
        graph.replay()
        torch.cuda.synchronize()
        want = _ref_loop(*(t.double() for t in (xg, w_hh, b_hh, h0)))[0]
        assert_close_rel(out[0], want, TOL[dtype], "replayed hs")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32", PRODUCTS)
@pytest.mark.parametrize("B,I,H", [(1, 7, 1), pytest.param(1, 33, 97, marks=pytest.mark.smoke), (3, 64, 512),
                                   (5, 256, 1024), pytest.param(8, 64, 256, marks=pytest.mark.smoke), (32, 1024, 1024),
                                   (64, 40, 200), (100, 16, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_step_matches_float64_grucell(dtype, tf32, B, I, H, bias, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
    args = _cell_inputs_on("cuda", B, I, H, dtype, bias)
    assert gru_cuda.supports_cell(*args) == []
    h1 = gru_cuda.cell_step(*args, out=_nan(B, H, dtype=dtype, device="cuda"))
    assert_close_rel(h1.cpu(), _ref_cell(*args), FWD_TOL[dtype, _math(dtype, tf32)], f"h1 {dtype} B{B} I{I} H{H}")


@pytest.mark.gpu
def test_cell_step_refuses_an_output_overlapping_its_inputs():
    args = _cell_inputs_on("cuda", 2, 8, 16, F32, True)
    with pytest.raises(ValueError, match="overlaps input h"):
        gru_cuda.cell_step(*args, out=args[1])


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("dtype,B", [(F32, 2), (BF16, 2), (F16, 16)])
def test_cell_step_replays_from_a_cuda_graph(dtype, B):
    I, H = 96, 256
    x, h, w_ih, w_hh, b_ih, b_hh = _cell_inputs_on("cuda", B, I, H, dtype, True)
    h1 = torch.empty_like(h)
    gru_cuda.cell_step(x, h, w_ih, w_hh, b_ih, b_hh, out=h1)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        gru_cuda.cell_step(x, h, w_ih, w_hh, b_ih, b_hh, out=h1)
    for _ in range(3):
        fresh = _cell_inputs_on("cuda", B, I, H, dtype, False)
        x.copy_(fresh[0]), h.copy_(fresh[1])
        poison(h1)
        graph.replay()
        torch.cuda.synchronize()
        assert_close_rel(h1.cpu(), _ref_cell(x, h, w_ih, w_hh, b_ih, b_hh), TOL[dtype], "replayed h1")


@pytest.mark.gpu
def test_gpu_compiled_gru_and_cell_run_the_cuda_kernels_without_recompiles(monkeypatch):
    """torch.compile (inductor, fullgraph) of nn.GRU training steps and an nn.GRUCell generation loop:
    one graph each, no recompile across calls, the cuda backend's kernels inside."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    ref = torch.nn.GRU(32, 256, dtype=torch.float64)
    ours = GRU(32, 256, device="cuda", dtype=F16)
    ours.load_state_dict(ref.state_dict())
    compiled = torch.compile(ours, fullgraph=True)
    calls = []
    real = gru_cuda.sequence_forward
    monkeypatch.setattr(gru_cuda, "sequence_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        x = torch.randn(16, 8, 32, device="cuda", dtype=F16, requires_grad=True)
        out, _ = compiled(x)
        out.float().sum().backward()
        r_out, _ = ref(x.detach().double().cpu())
        assert_close_rel(out.cpu(), r_out, 1e-2, "compiled output")
    assert len(calls) == 3
    cell = GRUCell(256, 256, device="cuda", dtype=F16)
    step = torch.compile(lambda x, h: cell(x, h), fullgraph=True)
    h = torch.zeros(16, 256, device="cuda", dtype=F16)
    with torch.no_grad():
        for _ in range(8):
            h = step(h, h)
    assert torch.isfinite(h).all()
    torch._dynamo.reset()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("T,B,H", [(64, 1, 1024), (32, 16, 512)])
def test_gpu_error_is_at_most_twice_cudnns(dtype, T, B, H):
    """flash-attn's rule for low precision: against float64, the cuda backend's output, h_n and
    gradients of the input and W_hh err at most 2x what cuDNN's nn.GRU errs in the same dtype."""
    ref = torch.nn.GRU(H, H, dtype=torch.float64)
    cudnn = torch.nn.GRU(H, H, device="cuda", dtype=dtype)
    cudnn.load_state_dict(ref.state_dict())
    ours = GRU.from_torch(cudnn)
    x64 = torch.randn(T, B, H, dtype=torch.float64)
    g = torch.randn(T, B, H, dtype=torch.float64)

    def run(m, x):
        x = x.detach().requires_grad_()
        out, h_n = m(x)
        gx, gw = torch.autograd.grad((out * g.to(out)).sum(), [x, m.weight_hh_l0])
        return [t.detach().double().cpu() for t in (out, h_n, gx, gw)]

    want = run(ref, x64)
    theirs = run(cudnn, x64.to("cuda", dtype))
    with seqgen_fast.use_backend("cuda"):
        mine = run(ours, x64.to("cuda", dtype))
    for name, a, b, w in zip(("output", "h_n", "grad input", "grad weight_hh"), mine, theirs, want):
        err, cudnn_err = rel_err(a, w), rel_err(b, w)
        assert err <= 2 * cudnn_err + 1e-6, f"{name} {dtype}: ours {err:.2e} > 2 x cuDNN's {cudnn_err:.2e}"
