"""CUDA LSTM kernels (csrc/lstm.cu through seqgen_fast.kernels.lstm_cuda).

On the CPU: the extension exposes the lstm_* functions, the persistent kernel's plan (a pure host
computation) accepts the anchor sizes and refuses what does not fit on chip, the supports_*
functions give reasons, and the C++ launchers reject bad arguments before touching a device.
With `-m gpu`: forward, backward and the cell step against float64 loops/torch.nn.LSTMCell,
outputs poisoned with NaN beforehand, and the cell step replayed from a CUDA graph.
"""
import ctypes
import os
import shutil

import pytest
import torch

from seqgen_fast import _ext
from seqgen_fast.kernels import lstm_cuda
from support.emulation import build
from support.utils import TOL, assert_close_rel, poison

NVCC = shutil.which("nvcc") is not None
SKIPPED = os.environ.get("SEQGEN_FAST_SKIP_CUDA", "0") not in ("", "0")
needs_c = pytest.mark.skipif(_ext.C is None, reason="seqgen_fast._C not built")

# Device facts as _ext.device_info reports them: an H100 SXM and an A100.
H100 = {"multiprocessor_count": 132, "shared_memory_per_block_optin": 232448}
A100 = {"multiprocessor_count": 108, "shared_memory_per_block_optin": 166912}
F32, F16, BF16 = torch.float32, torch.float16, torch.bfloat16
CODE = {F32: 0, F16: 1, BF16: 2}


# ----------------------------------------------------------------------------------------------
# CPU: build, plan, reasons, argument validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NVCC or SKIPPED, reason="no nvcc here (or SEQGEN_FAST_SKIP_CUDA): _C is not expected")
def test_extension_exposes_lstm_functions():
    assert _ext.C is not None, _ext.reason
    assert "lstm" in _ext.C.families
    for name in ("lstm_sequence_plan", "lstm_sequence_forward", "lstm_sequence_backward", "lstm_cell_step"):
        assert callable(getattr(_ext.C, name)), name


@needs_c
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("hidden,batch", [(1024, 1), (1024, 64), (1024, 256), (512, 16), (256, 256), (33, 1),
                                          (97, 5)])
@pytest.mark.parametrize("backward", [False, True])
def test_plan_fits_anchor_sizes_on_h100(dtype, hidden, batch, backward):
    p = lstm_cuda.sequence_plan(dtype, hidden, batch, backward=backward, device_facts=H100)
    assert p["reason"] == ""
    units, blocks = p["units"], p["blocks"]
    assert blocks <= H100["multiprocessor_count"], "a cooperative grid of one block per SM"
    assert (blocks - 1) * units < hidden <= blocks * units, "every hidden unit owned by exactly one block"
    assert 0 < p["smem_bytes"] <= H100["shared_memory_per_block_optin"]
    elem = 4 if dtype == F32 else 2
    rows = -(-units // 4) * 4 if backward else 4 * units
    assert p["smem_bytes"] >= rows * (4 if backward else 1) * hidden * elem, "the W_hh slice is resident"
    assert p["batch_step"] == (4 if batch >= 4 else 1) and p["batch_tile"] % p["batch_step"] == 0
    assert p["batch_tile"] <= max(batch, p["batch_step"]) + 3
    tiles = rows // 4 * (p["batch_tile"] // p["batch_step"])
    assert p["ksplit"] == (1 if tiles >= p["threads"] // 32 else p["threads"] // 32 // tiles)


@needs_c
def test_plan_refuses_what_does_not_fit_and_names_the_sizes():
    p = lstm_cuda.sequence_plan(F32, 2048, 1, backward=False, device_facts=H100)
    assert "shared memory" in p["reason"] and "hidden=2048" in p["reason"] and "float32" in p["reason"]
    assert lstm_cuda.sequence_plan(F16, 4096, 1, backward=True, device_facts=H100)["reason"]
    # the fp32 cell state of every batch row stays on chip: a huge batch cannot
    assert "batch=1000000" in lstm_cuda.sequence_plan(F16, 1024, 10**6, backward=False, device_facts=H100)["reason"]
    # the plan follows the device: fp32 H=1024 fits 132 SMs x 227 KiB, not 108 SMs x 163 KiB
    assert lstm_cuda.sequence_plan(F32, 1024, 1, backward=False, device_facts=H100)["reason"] == ""
    assert lstm_cuda.sequence_plan(F32, 1024, 1, backward=False, device_facts=A100)["reason"]
    assert lstm_cuda.sequence_plan(F16, 1024, 1, backward=False, device_facts=A100)["reason"] == ""


@needs_c
def test_plan_stages_the_batch_in_passes_when_shared_memory_is_short():
    # the configuration of the emulated test below: 4 SMs, 12000 bytes per block, H=40, B=17, fp32
    facts = {"multiprocessor_count": 4, "shared_memory_per_block_optin": 12000}
    fwd = lstm_cuda.sequence_plan(F32, 40, 17, backward=False, device_facts=facts)
    bwd = lstm_cuda.sequence_plan(F32, 40, 17, backward=True, device_facts=facts)
    assert (fwd["units"], fwd["blocks"], fwd["batch_tile"], fwd["ksplit"]) == (10, 4, 12, 1)
    assert (bwd["batch_tile"], bwd["ksplit"], bwd["k_pad"]) == (4, 5, 160)
    assert fwd["smem_bytes"] <= 12000 and bwd["smem_bytes"] <= 12000


@needs_c
def test_plan_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="dtype"):
        _ext.C.lstm_sequence_plan(3, 64, 1, False, 132, 232448)
    with pytest.raises(ValueError, match="hidden"):
        _ext.C.lstm_sequence_plan(0, 0, 1, False, 132, 232448)
    with pytest.raises(ValueError, match="sm_count"):
        _ext.C.lstm_sequence_plan(0, 64, 1, False, 0, 232448)


def _seq_args(T=3, B=2, H=5, dtype=F32, device="cpu"):
    return (torch.randn(T, B, 4 * H, dtype=dtype, device=device), torch.randn(4 * H, H, dtype=dtype, device=device),
            torch.randn(B, H, dtype=dtype, device=device), torch.randn(B, H, dtype=dtype, device=device))


def _cell_args(B=2, I=3, H=5, dtype=F32, device="cpu", bias=True):
    t = lambda *s: torch.randn(*s, dtype=dtype, device=device)  # noqa: E731
    return (t(B, I), t(B, H), t(B, H), t(4 * H, I), t(4 * H, H), t(4 * H) if bias else None, t(4 * H) if bias else None)


@needs_c
def test_supports_give_reasons_for_cpu_tensors_dtypes_and_shapes():
    xg, w, h0, c0 = _seq_args()
    assert any("CUDA" in r for r in lstm_cuda.supports_sequence(xg, w, h0, c0, train=True))
    assert any("float64" in r for r in lstm_cuda.supports_sequence(*(t.double() for t in (xg, w, h0, c0)), train=False))
    assert any("mixed dtypes" in r for r in lstm_cuda.supports_sequence(xg, w.half(), h0, c0, train=False))
    assert any("h0" in r for r in lstm_cuda.supports_sequence(xg, w, h0[:, :4], c0, train=False))
    assert any("xg" in r for r in lstm_cuda.supports_sequence(xg[..., :-1], w, h0, c0, train=False))
    hs = torch.randn(3, 2, 5)
    gates = torch.randn(3, 2, 20)
    assert any("CUDA" in r for r in lstm_cuda.supports_sequence_backward(w, hs, hs, gates, h0, c0))
    assert any("gates" in r for r in lstm_cuda.supports_sequence_backward(w, hs, hs, gates[..., :8], h0, c0))
    meta = [None if t is None else t.to("meta") for t in _cell_args(bias=False)]
    assert any("meta" in r for r in lstm_cuda.supports_cell(*meta))
    x, h, c, w_ih, w_hh, b_ih, b_hh = _cell_args()
    assert any("w_ih" in r for r in lstm_cuda.supports_cell(x, h, c, w_ih[:, :2], w_hh, b_ih, b_hh))
    assert any("b_hh" in r for r in lstm_cuda.supports_cell(x, h, c, w_ih, w_hh, b_ih, b_hh[:7]))
    assert any("bfloat16" in r for r in lstm_cuda.supports_cell(x, h, c, w_ih, w_hh, b_ih, b_hh.bfloat16()))


@needs_c
def test_csrc_launchers_validate_arguments_before_touching_a_device():
    C = _ext.C
    fwd = dict(device=0, dtype=0, seq_len=4, batch=2, hidden=8, xg=16, w_hh=16, h0=16, c0=16, hs=16, h_n=16,
               c_n=16, cs=0, gates=0, stream=0)
    with pytest.raises(ValueError, match="seq_len"):
        C.lstm_sequence_forward(**{**fwd, "seq_len": 0})
    with pytest.raises(ValueError, match="hidden"):
        C.lstm_sequence_forward(**{**fwd, "hidden": 2**31})
    with pytest.raises(ValueError, match="unsupported dtype code 3"):
        C.lstm_sequence_forward(**{**fwd, "dtype": 3})
    with pytest.raises(ValueError, match="w_hh is a null pointer"):
        C.lstm_sequence_forward(**{**fwd, "w_hh": 0})
    with pytest.raises(ValueError, match="cs and gates"):
        C.lstm_sequence_forward(**{**fwd, "cs": 16})
    bwd = dict(device=0, dtype=1, seq_len=4, batch=2, hidden=8, w_hh=16, cs=16, gates=16, c0=16, grad_hs=0,
               grad_h_n=0, grad_c_n=0, grad_gates=16, grad_h0=16, grad_c0=16, stream=0)
    with pytest.raises(ValueError, match="grad_gates is a null pointer"):
        C.lstm_sequence_backward(**{**bwd, "grad_gates": 0})
    with pytest.raises(ValueError, match="batch"):
        C.lstm_sequence_backward(**{**bwd, "batch": -1})
    cell = dict(device=0, dtype=2, batch=1, input_size=4, hidden=8, x=16, h=16, c=16, w_ih=16, w_hh=16, b_ih=0,
                b_hh=0, h1=16, c1=16, stream=0)
    with pytest.raises(ValueError, match="input_size"):
        C.lstm_cell_step(**{**cell, "input_size": 0})
    with pytest.raises(ValueError, match="c1 is a null pointer"):
        C.lstm_cell_step(**{**cell, "c1": 0})


# ----------------------------------------------------------------------------------------------
# References and inputs shared by the emulated and the GPU tests
# ----------------------------------------------------------------------------------------------
# Backward reads the activations saved in the layer dtype (gates, c_t) and multiplies up to four
# of them per gradient: a few roundings of 2^-11 (fp16) / 2^-8 (bf16) more than the forward.
BWD_TOL = {F32: TOL[F32], F16: 1e-2, BF16: 5e-2}


def _ref_loop(xg, w_hh, h0, c0):
    """The LSTM recurrence in plain PyTorch: (hs, h_n, c_n, cs, activated gates)."""
    h, c, hs, cs, acts = h0, c0, [], [], []
    for t in range(xg.shape[0]):
        i, f, g, o = (xg[t] + h @ w_hh.T).chunk(4, dim=-1)
        i, f, g, o = i.sigmoid(), f.sigmoid(), g.tanh(), o.sigmoid()
        c = f * c + i * g
        h = o * c.tanh()
        hs.append(h), cs.append(c), acts.append(torch.cat([i, f, g, o], dim=-1))
    return torch.stack(hs), h, c, torch.stack(cs), torch.stack(acts)


def _inputs_on(device, T, B, H, dtype):
    """torch.nn.LSTM-like scales: W_hh ~ U(-1/sqrt(H), 1/sqrt(H)), xg of a unit-variance input."""
    k = H ** -0.5
    w_hh = (torch.rand(4 * H, H, device=device) * 2 - 1).mul_(k).to(dtype)
    xg = torch.randn(T, B, 4 * H, device=device).to(dtype)
    h0 = (0.5 * torch.randn(B, H, device=device)).to(dtype)
    c0 = torch.randn(B, H, device=device).to(dtype)
    return xg, w_hh, h0, c0


def _inputs(T, B, H, dtype):
    return _inputs_on("cuda", T, B, H, dtype)


def _ref_cell(x, h, c, w_ih, w_hh, b_ih, b_hh):
    cell = torch.nn.LSTMCell(x.shape[1], h.shape[1], bias=b_ih is not None, dtype=torch.float64)
    with torch.no_grad():
        cell.weight_ih.copy_(w_ih.double().cpu())
        cell.weight_hh.copy_(w_hh.double().cpu())
        if b_ih is not None:
            cell.bias_ih.copy_(b_ih.double().cpu())
            cell.bias_hh.copy_(b_hh.double().cpu())
        return cell(x.double().cpu(), (h.double().cpu(), c.double().cpu()))


def _cell_inputs_on(device, B, I, H, dtype, bias):
    k = H ** -0.5
    u = lambda *s: ((torch.rand(*s, device=device) * 2 - 1) * k).to(dtype)  # noqa: E731
    return (torch.randn(B, I, device=device).to(dtype), (0.5 * torch.randn(B, H, device=device)).to(dtype),
            torch.randn(B, H, device=device).to(dtype), u(4 * H, I), u(4 * H, H),
            u(4 * H) if bias else None, u(4 * H) if bias else None)


def _cell_inputs(B, I, H, dtype, bias):
    return _cell_inputs_on("cuda", B, I, H, dtype, bias)


# ----------------------------------------------------------------------------------------------
# CPU: the kernels of csrc/lstm.cu run on the host under a SIMT emulation
# ----------------------------------------------------------------------------------------------
# g++ compiles csrc/lstm.cu as it is, against the stand-in CUDA headers of tests/support/emulation/
# (through csrc/common.cuh's seam): every CUDA thread is a host thread; __syncthreads, grid.sync and
# each warp shuffle are std::barrier waits. The kernels take any blockDim that is a multiple of 32, so
# blocks of 32/64 threads keep this fast. Shared memory is filled with NaN bytes before launch and
# checked for writes past the planned size afterwards; a grid larger than the (emulated) SM count fails
# like a cooperative launch would. This checks indexing, tiling, k-splits, staging and barriers; it
# cannot check L1/L2 coherence or timing.
_EMU_MAIN = r"""#include "seqgen_emulation_shim.h"
#include "lstm.h"
extern "C" int emu_forward(int dt, long T, long B, long H, uptr xg, uptr w, uptr h0, uptr c0, uptr hs, uptr hn,
                           uptr cn, uptr cs, uptr g) {
  EMU_CALL(seqgen::lstm::sequence_forward(0, dt, T, B, H, xg, w, h0, c0, hs, hn, cn, cs, g, 0))
}
extern "C" int emu_backward(int dt, long T, long B, long H, uptr w, uptr cs, uptr g, uptr c0, uptr ghs, uptr ghn,
                            uptr gcn, uptr gg, uptr gh0, uptr gc0) {
  EMU_CALL(seqgen::lstm::sequence_backward(0, dt, T, B, H, w, cs, g, c0, ghs, ghn, gcn, gg, gh0, gc0, 0))
}
extern "C" int emu_cell(int dt, long B, long I, long H, uptr x, uptr h, uptr c, uptr wih, uptr whh, uptr bih,
                        uptr bhh, uptr h1, uptr c1) {
  EMU_CALL(seqgen::lstm::cell_step(0, dt, B, I, H, x, h, c, wih, whh, bih, bhh, h1, c1, 0))
}
"""


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """csrc/lstm.cu built for the host under the emulation, loaded through ctypes."""
    h = build(str(tmp_path_factory.mktemp("lstm_emu")), "lstm.cu", _EMU_MAIN, "lstm_emu")
    for name, n in (("emu_forward", 9), ("emu_backward", 10), ("emu_cell", 9)):
        getattr(h, name).argtypes = [ctypes.c_int, ctypes.c_long, ctypes.c_long, ctypes.c_long] + [ctypes.c_size_t] * n

    def call(name, *args):
        if getattr(h, name)(*[a.data_ptr() if isinstance(a, torch.Tensor) else (0 if a is None else a) for a in args]):
            raise RuntimeError(h.emu_error_message().decode())
    call.config = h.emu_config
    return call


def _nan(*shape, dtype):
    return poison(torch.empty(*shape, dtype=dtype))


@pytest.mark.parametrize("T,B,H,dtype,sms,smem,threads,offset_h0", [
    (3, 1, 33, F16, 4, 232448, 64, False),   # partial last block, ksplit > 1, scalar staging (33 % 8)
    pytest.param(2, 6, 64, BF16, 3, 232448, 32, False,  # 4-row batch tiles, one warp looping over every tile
                 marks=pytest.mark.smoke),
    (2, 17, 40, F32, 4, 12000, 32, True),    # batch staged in passes (12 + 5 rows fwd, 4 at a time bwd);
])                                           # h0 misaligned: scalar staging at t=0, 16-byte loads after
def test_emulated_sequence_forward_backward_match_float64(emu, T, B, H, dtype, sms, smem, threads, offset_h0):
    emu.config(sms, smem, threads)
    xg, w_hh, h0, c0 = (t.cpu() for t in _inputs_on("cpu", T, B, H, dtype))
    if offset_h0:
        h0 = torch.cat([torch.zeros(1, dtype=dtype), h0.flatten()])[1:].view(B, H)
    hs, h_n, c_n, cs, gates = (_nan(T, B, H, dtype=dtype), _nan(B, H, dtype=dtype), _nan(B, H, dtype=dtype),
                               _nan(T, B, H, dtype=dtype), _nan(T, B, 4 * H, dtype=dtype))
    emu("emu_forward", CODE[dtype], T, B, H, xg, w_hh, h0, c0, hs, h_n, c_n, cs, gates)
    ref = _ref_loop(*(t.double() for t in (xg, w_hh, h0, c0)))
    for name, ours, want in zip(("hs", "h_n", "c_n", "cs", "gates"), (hs, h_n, c_n, cs, gates), ref):
        assert_close_rel(ours, want, TOL[dtype], f"emulated {name}")

    g_hs, g_hn, g_cn = (torch.randn(s).to(dtype) for s in ((T, B, H), (B, H), (B, H)))
    d_gates, d_h0, d_c0 = _nan(T, B, 4 * H, dtype=F32), _nan(B, H, dtype=dtype), _nan(B, H, dtype=dtype)
    emu("emu_backward", CODE[dtype], T, B, H, w_hh, cs, gates, c0, g_hs, g_hn, g_cn, d_gates, d_h0, d_c0)
    leaves = [t.double().requires_grad_() for t in (xg, h0, c0)]
    r_hs, r_hn, r_cn, _, _ = _ref_loop(leaves[0], w_hh.double(), leaves[1], leaves[2])
    loss = (r_hs * g_hs.double()).sum() + (r_hn * g_hn.double()).sum() + (r_cn * g_cn.double()).sum()
    for name, ours, want in zip(("grad_gates", "grad_h0", "grad_c0"), (d_gates, d_h0, d_c0),
                                torch.autograd.grad(loss, leaves)):
        assert_close_rel(ours, want, BWD_TOL[dtype], f"emulated {name}")


def test_emulated_launch_refuses_a_plan_that_does_not_fit(emu):
    emu.config(2, 4096, 32)
    xg, w_hh, h0, c0 = _inputs_on("cpu", 2, 1, 64, F32)
    out = [torch.empty(s) for s in ((2, 1, 64), (1, 64), (1, 64))]
    with pytest.raises(RuntimeError, match="shared memory per block"):
        emu("emu_forward", 0, 2, 1, 64, xg, w_hh, h0, c0, *out, None, None)


@pytest.mark.parametrize("B,I,H,dtype,sms,bias,offset_x", [
    (1, 7, 1, F32, 4, True, False),     # one unit: rows past H repeat the last unit
    pytest.param(5, 24, 48, BF16, 3, False, False,  # 16-byte weight loads, two batch tiles of 4, no bias
                 marks=pytest.mark.smoke),
    (3, 9, 33, F16, 2, True, True),      # unaligned rows (I = 9, x misaligned): scalar kernel
])
def test_emulated_cell_step_matches_float64_lstmcell(emu, B, I, H, dtype, sms, bias, offset_x):
    emu.config(sms, 232448, 64)
    args = list(_cell_inputs_on("cpu", B, I, H, dtype, bias))
    if offset_x:
        args[0] = torch.cat([torch.zeros(1, dtype=dtype), args[0].flatten()])[1:].view(B, I)
    h1, c1 = _nan(B, H, dtype=dtype), _nan(B, H, dtype=dtype)
    emu("emu_cell", CODE[dtype], B, I, H, *args, h1, c1)
    r_h1, r_c1 = _ref_cell(*args)
    assert_close_rel(h1, r_h1, TOL[dtype], "emulated h1")
    assert_close_rel(c1, r_c1, TOL[dtype], "emulated c1")


# ----------------------------------------------------------------------------------------------
# GPU: against float64 references
# ----------------------------------------------------------------------------------------------
def _skip_unless_fits(reasons):
    if any("shared memory" in r for r in reasons):
        pytest.skip("this GPU cannot hold the W_hh slices on chip: " + "; ".join(reasons))
    assert reasons == []


SEQ_SHAPES = [(1, 1, 33), (7, 1, 97), pytest.param(9, 3, 64, marks=pytest.mark.smoke), (6, 5, 97), (32, 16, 512),
              (8, 64, 1024), (5, 256, 256), (12, 1, 1024), (4, 256, 1024)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("T,B,H", SEQ_SHAPES)
@pytest.mark.parametrize("train", [False, True])
def test_sequence_forward_matches_float64_loop(dtype, T, B, H, train):
    xg, w_hh, h0, c0 = _inputs(T, B, H, dtype)
    _skip_unless_fits(lstm_cuda.supports_sequence(xg, w_hh, h0, c0, train=train))
    shapes = [(T, B, H), (B, H), (B, H)] + ([(T, B, H), (T, B, 4 * H)] if train else [])
    out = tuple(poison(torch.empty(s, dtype=dtype, device="cuda")) for s in shapes)
    res = lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=train, out=out)
    ref = _ref_loop(*(t.double() for t in (xg, w_hh, h0, c0)))
    names = ("hs", "h_n", "c_n", "cs", "gates")
    for name, ours, want in list(zip(names, res, ref))[: 5 if train else 3]:
        assert ours.dtype == dtype
        assert_close_rel(ours, want, TOL[dtype], f"{name} {dtype} T{T} B{B} H{H}")
    if not train:
        assert res[3].numel() == 0 and res[4].numel() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("T,B,H", SEQ_SHAPES)
def test_sequence_backward_matches_float64_autograd(dtype, T, B, H):
    xg, w_hh, h0, c0 = _inputs(T, B, H, dtype)
    hs, h_n, c_n, cs, gates = lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=True)
    _skip_unless_fits(lstm_cuda.supports_sequence_backward(w_hh, hs, cs, gates, h0, c0))
    g_hs, g_hn, g_cn = (torch.randn(s, device="cuda").to(dtype) for s in ((T, B, H), (B, H), (B, H)))
    out = (poison(torch.empty(T, B, 4 * H, device="cuda")), poison(torch.empty(B, H, dtype=dtype, device="cuda")),
           poison(torch.empty(B, H, dtype=dtype, device="cuda")))
    d_gates, d_h0, d_c0 = lstm_cuda.sequence_backward(w_hh, hs, cs, gates, h0, c0, g_hs, g_hn, g_cn, out=out)
    assert d_gates.dtype == torch.float32 and d_h0.dtype == dtype and d_c0.dtype == dtype

    leaves = [t.double().requires_grad_() for t in (xg, h0, c0)]
    r_hs, r_hn, r_cn, _, _ = _ref_loop(leaves[0], w_hh.double(), leaves[1], leaves[2])
    loss = (r_hs * g_hs.double()).sum() + (r_hn * g_hn.double()).sum() + (r_cn * g_cn.double()).sum()
    want = torch.autograd.grad(loss, leaves)
    for name, ours, ref in zip(("grad_gates", "grad_h0", "grad_c0"), (d_gates, d_h0, d_c0), want):
        assert_close_rel(ours, ref, BWD_TOL[dtype], f"{name} {dtype} T{T} B{B} H{H}")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_sequence_backward_takes_expanded_and_missing_gradients(dtype):
    T, B, H = 6, 4, 97
    xg, w_hh, h0, c0 = _inputs(T, B, H, dtype)
    hs, h_n, c_n, cs, gates = lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=True)
    g_last = torch.randn(B, H, device="cuda").to(dtype)
    g_hs = torch.zeros((), dtype=dtype, device="cuda").expand(T, B, H)  # zero-stride, as autograd may give
    ours = lstm_cuda.sequence_backward(w_hh, hs, cs, gates, h0, c0, g_hs, g_last, None)
    ours_none = lstm_cuda.sequence_backward(w_hh, hs, cs, gates, h0, c0, None, g_last, None)
    leaves = [t.double().requires_grad_() for t in (xg, h0, c0)]
    _, r_hn, _, _, _ = _ref_loop(leaves[0], w_hh.double(), leaves[1], leaves[2])
    want = torch.autograd.grad((r_hn * g_last.double()).sum(), leaves)
    for a, b, ref, name in zip(ours, ours_none, want, ("grad_gates", "grad_h0", "grad_c0")):
        assert_close_rel(a, ref, BWD_TOL[dtype], name)
        assert torch.equal(a, b), f"{name}: None and an expanded zero gradient must agree"


@pytest.mark.gpu
def test_sequence_forward_refuses_what_does_not_fit():
    xg, w_hh, h0, c0 = _inputs(2, 1, 4096, F32)
    reasons = lstm_cuda.supports_sequence(xg, w_hh, h0, c0, train=False)
    assert any("shared memory" in r for r in reasons)
    with pytest.raises(ValueError, match="shared memory"):
        lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=False)


@pytest.mark.gpu
def test_sequence_empty_sizes_launch_nothing():
    xg, w_hh, h0, c0 = _inputs(0, 3, 16, F16)
    hs, h_n, c_n, cs, gates = lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=True)
    assert hs.shape == (0, 3, 16) and torch.equal(h_n, h0) and torch.equal(c_n, c0)
    d_gates, d_h0, d_c0 = lstm_cuda.sequence_backward(w_hh, hs, cs, gates, h0, c0, None, h0, None)
    assert d_gates.shape == (0, 3, 64) and torch.equal(d_h0, h0) and not d_c0.any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
@pytest.mark.parametrize("B,I,H", [(1, 7, 1), pytest.param(1, 33, 97, marks=pytest.mark.smoke), (3, 64, 512),
                                   (5, 256, 1024), (32, 1024, 1024), (64, 40, 200), (100, 16, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_step_matches_float64_lstmcell(dtype, B, I, H, bias):
    args = _cell_inputs(B, I, H, dtype, bias)
    assert lstm_cuda.supports_cell(*args) == []
    out = (poison(torch.empty(B, H, dtype=dtype, device="cuda")), poison(torch.empty(B, H, dtype=dtype, device="cuda")))
    h1, c1 = lstm_cuda.cell_step(*args, out=out)
    r_h1, r_c1 = _ref_cell(*args)
    assert_close_rel(h1, r_h1, TOL[dtype], f"h1 {dtype} B{B} I{I} H{H}")
    assert_close_rel(c1, r_c1, TOL[dtype], f"c1 {dtype} B{B} I{I} H{H}")


@pytest.mark.gpu
def test_cell_step_unaligned_rows_take_the_scalar_path():
    # I = 9 (x a column slice, copied contiguous by the launcher) is not a whole number of 16-byte
    # chunks in fp16: the unvectorised kernel runs.
    args = list(_cell_inputs(4, 10, 64, F16, True))
    args[0] = args[0][:, 1:]
    args[3] = args[3][:, 1:].contiguous()
    h1, c1 = lstm_cuda.cell_step(*args)
    r_h1, r_c1 = _ref_cell(*args)
    assert_close_rel(h1, r_h1, TOL[F16], "h1")
    assert_close_rel(c1, r_c1, TOL[F16], "c1")


@pytest.mark.gpu
def test_cell_step_refuses_outputs_overlapping_inputs():
    args = _cell_inputs(2, 8, 16, F32, True)
    with pytest.raises(ValueError, match="overlaps input h"):
        lstm_cuda.cell_step(*args, out=(args[1], torch.empty_like(args[2])))


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [F32, BF16])
def test_cell_step_replays_from_a_cuda_graph(dtype):
    B, I, H = 2, 96, 256
    x, h, c, w_ih, w_hh, b_ih, b_hh = _cell_inputs(B, I, H, dtype, True)
    h1, c1 = torch.empty_like(h), torch.empty_like(c)
    lstm_cuda.cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh, out=(h1, c1))  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lstm_cuda.cell_step(x, h, c, w_ih, w_hh, b_ih, b_hh, out=(h1, c1))
    for _ in range(3):
        fresh = _cell_inputs(B, I, H, dtype, False)
        x.copy_(fresh[0]), h.copy_(fresh[1]), c.copy_(fresh[2])
        poison(h1), poison(c1)
        graph.replay()
        torch.cuda.synchronize()
        r_h1, r_c1 = _ref_cell(x, h, c, w_ih, w_hh, b_ih, b_hh)
        assert_close_rel(h1, r_h1, TOL[dtype], "replayed h1")
        assert_close_rel(c1, r_c1, TOL[dtype], "replayed c1")
