"""CUDA LSTM kernels (csrc/lstm.cu on csrc/recurrence.cuh and csrc/mma.cuh, through seqgen_fast.kernels.lstm_cuda).

On the CPU:
* the extension exposes the lstm_* functions; the persistent kernel's plan (a pure host computation)
  takes the anchor sizes and refuses what does not fit on chip; the supports_* functions give
  reasons; the C++ launchers reject bad arguments before touching a device;
* the SASS of the recurrent kernels for sm_90a (the built _C, or csrc/lstm.cu compiled alone) holds
  HMMA instructions, no local memory, and registers within the launch bounds;
* under the host emulation (tests/support/emulation.py): the mma / ldmatrix / tf32 primitives follow
  the PTX ISA's fragment layouts; the tensor-core and FFMA kernels, forward, backward and the cell
  step, match float64 in every dtype, with their blocks started in a fresh random order each run and
  handing h_t over through release/acquire flags on real host threads; launches that cannot be
  resident are refused with their reason before anything runs; and the whole cuda backend (ops,
  dispatch, launchers) runs nn.LSTM / nn.LSTMCell, eagerly and under torch.compile(fullgraph=True)
  without recompiles, on the emulated kernels.
With `-m gpu`: forward, backward and the cell step against float64, outputs poisoned with NaN
beforehand, TF32 on and off, the cell step replayed from a CUDA graph, torch.compile with inductor.
"""
import ctypes
import os
import shutil
from pathlib import Path

import pytest
import torch

import seqgen_fast
from seqgen_fast import _ext
from seqgen_fast.kernels import lstm_cuda
from seqgen_fast.nn import LSTM, LSTMCell
from seqgen_fast.ops import lstm as ops
from support import emulated_recurrence, sass
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
MMA, FFMA = lstm_cuda.MATH_MMA, lstm_cuda.MATH_FFMA


# ----------------------------------------------------------------------------------------------
# CPU: build, plan, reasons, argument validation
# ----------------------------------------------------------------------------------------------
@pytest.mark.skipif(not NVCC or SKIPPED, reason="no nvcc here (or SEQGEN_FAST_SKIP_CUDA): _C is not expected")
def test_extension_exposes_lstm_functions():
    assert _ext.C is not None, _ext.reason
    assert "lstm" in _ext.C.families
    for name in ("lstm_sequence_plan", "lstm_sequence_check", "lstm_sequence_forward", "lstm_sequence_backward",
                 "lstm_cell_step"):
        assert callable(getattr(_ext.C, name, None)), f"{name}: _C was built from an older csrc/; reinstall (pip install -e .)"
    assert (_ext.C.LSTM_MATH_MMA, _ext.C.LSTM_MATH_FFMA) == (MMA, FFMA)


ANCHORS = [(1024, 1), (1024, 64), (1024, 256), (512, 16), (512, 1), (256, 256), (33, 1), (97, 5)]


def _check_plan(p, dtype, hidden, batch, backward, facts):
    assert p["reason"] == "", p["reason"]
    groups, slices, units, blocks = p["groups"], p["slices"], p["units"], p["blocks"]
    assert blocks == groups * slices <= facts["multiprocessor_count"], "one resident block per SM"
    assert (slices - 1) * units < hidden <= slices * units, "every hidden unit owned by exactly one slice"
    assert groups == 1 or batch >= 8 * groups, "each batch group holds at least one 8-column n-tile"
    assert 0 < p["smem_bytes"] <= facts["shared_memory_per_block_optin"]
    k, rows = (4 * hidden, units) if backward else (hidden, 4 * units)
    elem = 4 if dtype == F32 else 2
    assert p["smem_bytes"] >= rows * k * elem, "the W_hh slice is resident"
    assert p["rows"] >= (units if backward else 4 * units)
    per_group = -(-batch // groups)
    assert p["cols"] * units <= 2 * p["threads"], "every item of a pass prefetched by one of its threads"
    if p["math"] == MMA:
        assert p["rows"] == 16 * p["mt"] and p["mt"] in ((1,) if backward else (1, 2, 4))
        assert p["mt"] * p["ntw"] <= 8 and p["cols"] == p["ngroups"] * p["ntw"] * 8
        assert p["ngroups"] * p["kparts"] <= p["threads"] // 32
        assert p["cols"] >= min(per_group, 8)
    else:
        assert p["bt"] == (4 if batch >= 4 else 1) and p["cols"] % p["bt"] == 0


@needs_c
@pytest.mark.parametrize("dtype,math", [(F32, MMA), (F16, MMA), (BF16, MMA), (F32, FFMA)])
@pytest.mark.parametrize("hidden,batch", ANCHORS)
@pytest.mark.parametrize("backward", [False, True])
def test_plan_fits_anchor_sizes_on_h100(dtype, math, hidden, batch, backward):
    p = lstm_cuda.sequence_plan(dtype, hidden, batch, backward=backward, device_facts=H100, math=math)
    assert p["math"] == math
    _check_plan(p, dtype, hidden, batch, backward, H100)


@needs_c
def test_plan_splits_large_batches_into_groups():
    # B64 H1024 fp16: two batch groups of 32 rows, 16 units each (4 m-tiles): every block reads half of h_{t-1}
    fwd = lstm_cuda.sequence_plan(F16, 1024, 64, backward=False, device_facts=H100)
    assert (fwd["groups"], fwd["units"], fwd["mt"], fwd["blocks"]) == (2, 16, 4, 128)
    bwd = lstm_cuda.sequence_plan(F16, 1024, 64, backward=True, device_facts=H100)
    assert (bwd["groups"], bwd["units"], bwd["rows"]) == (2, 16, 16), "16 units fill the backward's m-tile"
    one = lstm_cuda.sequence_plan(F16, 1024, 1, backward=False, device_facts=H100)
    assert (one["groups"], one["units"], one["cols"], one["kparts"]) == (1, 8, 8, 16)


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
    # FFMA (fp32 exact) on 4 SMs with 12000 bytes per block, H=40, B=17: the batch in passes
    facts = {"multiprocessor_count": 4, "shared_memory_per_block_optin": 12000}
    fwd = lstm_cuda.sequence_plan(F32, 40, 17, backward=False, device_facts=facts, math=FFMA)
    bwd = lstm_cuda.sequence_plan(F32, 40, 17, backward=True, device_facts=facts, math=FFMA)
    assert (fwd["units"], fwd["blocks"], fwd["bt"]) == (10, 4, 4) and fwd["cols"] < 17
    assert bwd["cols"] < fwd["cols"] and fwd["smem_bytes"] <= 12000 and bwd["smem_bytes"] <= 12000


@needs_c
def test_plan_rejects_invalid_arguments():
    with pytest.raises(ValueError, match="dtype"):
        _ext.C.lstm_sequence_plan(3, 64, 1, False, MMA, 132, 232448)
    with pytest.raises(ValueError, match="hidden"):
        _ext.C.lstm_sequence_plan(0, 0, 1, False, MMA, 132, 232448)
    with pytest.raises(ValueError, match="sm_count"):
        _ext.C.lstm_sequence_plan(0, 64, 1, False, MMA, 0, 232448)
    with pytest.raises(ValueError, match="math code 2"):
        _ext.C.lstm_sequence_plan(0, 64, 1, False, 2, 132, 232448)
    with pytest.raises(ValueError, match="FFMA product is for float32"):
        _ext.C.lstm_sequence_plan(1, 64, 1, False, FFMA, 132, 232448)


def test_products_follow_the_tf32_flags(monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    assert [lstm_cuda.sequence_math(d) for d in (F32, F16, BF16)] == [MMA, MMA, MMA]
    assert [lstm_cuda.cell_math(d) for d in (F32, F16, BF16)] == [FFMA, MMA, MMA]
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", False)
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    assert [lstm_cuda.sequence_math(d) for d in (F32, F16, BF16)] == [FFMA, MMA, MMA]
    assert lstm_cuda.cell_math(F32) == MMA


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
    fwd = dict(device=0, dtype=0, math=MMA, seq_len=4, batch=2, hidden=8, xg=16, w_hh=16, h0=16, c0=16, hs=16,
               h_n=16, c_n=16, cs=0, gates=0, flags=16, flag_count=132, stream=0)
    with pytest.raises(ValueError, match="seq_len"):
        C.lstm_sequence_forward(**{**fwd, "seq_len": 0})
    with pytest.raises(ValueError, match="hidden"):
        C.lstm_sequence_forward(**{**fwd, "hidden": 2**31})
    with pytest.raises(ValueError, match="unsupported dtype code 3"):
        C.lstm_sequence_forward(**{**fwd, "dtype": 3})
    with pytest.raises(ValueError, match="math code 5"):
        C.lstm_sequence_forward(**{**fwd, "math": 5})
    with pytest.raises(ValueError, match="FFMA product is for float32"):
        C.lstm_sequence_forward(**{**fwd, "dtype": 1, "math": FFMA})
    with pytest.raises(ValueError, match="w_hh is a null pointer"):
        C.lstm_sequence_forward(**{**fwd, "w_hh": 0})
    with pytest.raises(ValueError, match="flags is a null pointer"):
        C.lstm_sequence_forward(**{**fwd, "flags": 0})
    with pytest.raises(ValueError, match="cs and gates"):
        C.lstm_sequence_forward(**{**fwd, "cs": 16})
    bwd = dict(device=0, dtype=1, math=MMA, seq_len=4, batch=2, hidden=8, w_hh=16, cs=16, gates=16, c0=16, grad_hs=0,
               grad_h_n=0, grad_c_n=0, grad_gates=16, grad_h0=16, grad_c0=16, flags=16, flag_count=132, stream=0)
    with pytest.raises(ValueError, match="grad_gates is a null pointer"):
        C.lstm_sequence_backward(**{**bwd, "grad_gates": 0})
    with pytest.raises(ValueError, match="batch"):
        C.lstm_sequence_backward(**{**bwd, "batch": -1})
    cell = dict(device=0, dtype=2, math=MMA, batch=1, input_size=4, hidden=8, x=16, h=16, c=16, w_ih=16, w_hh=16,
                b_ih=0, b_hh=0, h1=16, c1=16, stream=0)
    with pytest.raises(ValueError, match="input_size"):
        C.lstm_cell_step(**{**cell, "input_size": 0})
    with pytest.raises(ValueError, match="c1 is a null pointer"):
        C.lstm_cell_step(**{**cell, "c1": 0})


# ----------------------------------------------------------------------------------------------
# CPU: the SASS of the recurrent kernels (sm_90a)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sm90_binary(tmp_path_factory):
    """A binary with the sm_90a SASS of csrc/lstm.cu (support.sass.sm90_binary: the built _C when it is
    newer than csrc/, else lstm.cu compiled alone)."""
    return sass.sm90_binary("lstm.cu", tmp_path_factory.mktemp("sass"),
                            Path(_ext.C.__file__) if _ext.C is not None else None)


def test_sass_of_the_recurrent_kernels(sm90_binary):
    kinds = sass.check_recurrent_kernels(sm90_binary, "LstmCell")
    assert kinds == {"forward_kernel": 26, "backward_kernel": 11, "step_kernel<": 18, "step_kernel_ffma": 12}, kinds


# ----------------------------------------------------------------------------------------------
# References and inputs shared by the emulated and the GPU tests
# ----------------------------------------------------------------------------------------------
# Backward reads the activations saved in the layer dtype (gates, c_t), multiplies up to four of them
# per gradient, and hands grad_gates to the next step in the layer dtype: a few roundings of 2^-11
# (fp16) / 2^-8 (bf16) more than the forward.
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


def _ref_grads(xg, w_hh, h0, c0, g_hs, g_hn, g_cn):
    """float64 autograd of the loop: d(xg), d(h0), d(c0) of <hs, g_hs> + <h_n, g_hn> + <c_n, g_cn>."""
    leaves = [t.detach().double().requires_grad_() for t in (xg, h0, c0)]
    r_hs, r_hn, r_cn, _, _ = _ref_loop(leaves[0], w_hh.double(), leaves[1], leaves[2])
    loss = (r_hs * g_hs.double()).sum() + (r_hn * g_hn.double()).sum() + (r_cn * g_cn.double()).sum()
    return torch.autograd.grad(loss, leaves)


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
# (through csrc/common.cuh's seam): every CUDA thread is a host thread; barriers, warp collectives
# (shuffles, mma, ldmatrix) are std::barrier waits; the handoff flags are std::atomic release/acquire
# operations; a cooperative launch starts its blocks in the order drawn from emu_schedule's seed.
# The kernels take any blockDim that is a multiple of 32, so blocks of 32/64 threads keep this fast.
_EMU_MAIN = emulated_recurrence.shim("lstm") + r"""
namespace {
// One warp: lane l's fragments a[4l..], b[2l..], accumulators d[4l..] in and out.
__global__ void mma_probe(int kind, const uint32_t* a, const uint32_t* b, float* d) {
  const int l = threadIdx.x;
  uint32_t fa[4] = {a[4 * l], a[4 * l + 1], a[4 * l + 2], a[4 * l + 3]}, fb[2] = {b[2 * l], b[2 * l + 1]};
  float acc[4] = {d[4 * l], d[4 * l + 1], d[4 * l + 2], d[4 * l + 3]};
  if (kind == 0) seqgen::mma_m16n8k16(seqgen::MmaF16{}, acc, fa, fb);
  if (kind == 1) seqgen::mma_m16n8k16(seqgen::MmaBF16{}, acc, fa, fb);
  if (kind == 2) seqgen::mma_m16n8k8_tf32(acc, fa, fb);
  for (int i = 0; i < 4; ++i) d[4 * l + i] = acc[i];
}
// One warp: 32 rows of 16 bytes into shared memory; lane l names row row_of_lane[l]; out[4l..] its registers.
__global__ void ldmatrix_probe(const uint32_t* rows, const int* row_of_lane, uint32_t* out) {
  unsigned char* smem = SEQGEN_DYNAMIC_SMEM();
  const int l = threadIdx.x;
  for (int i = 0; i < 4; ++i) reinterpret_cast<uint32_t*>(smem)[4 * l + i] = rows[4 * l + i];
  __syncthreads();
  uint32_t r[4];
  seqgen::ldmatrix_x4(r, smem + 16 * row_of_lane[l]);
  for (int i = 0; i < 4; ++i) out[4 * l + i] = r[i];
}
}  // namespace

extern "C" int emu_mma(int kind, uptr a, uptr b, uptr d) {
  EMU_CALL(const auto k = mma_probe; SEQGEN_LAUNCH(k, dim3(1), dim3(32), 0, nullptr, kind,
           reinterpret_cast<const uint32_t*>(a), reinterpret_cast<const uint32_t*>(b), reinterpret_cast<float*>(d)))
}
extern "C" int emu_ldmatrix(uptr rows, uptr row_of_lane, uptr out) {
  EMU_CALL(const auto k = ldmatrix_probe; SEQGEN_LAUNCH(k, dim3(1), dim3(32), 512, nullptr,
           reinterpret_cast<const uint32_t*>(rows), reinterpret_cast<const int*>(row_of_lane),
           reinterpret_cast<uint32_t*>(out)))
}
extern "C" unsigned emu_to_tf32_bits(float x) { return seqgen::to_tf32(x); }
extern "C" int emu_forward(int dt, int math, long T, long B, long H, uptr xg, uptr w, uptr h0, uptr c0, uptr hs,
                           uptr hn, uptr cn, uptr cs, uptr g, uptr flags, long nflags) {
  EMU_CALL(seqgen::lstm::sequence_forward(0, dt, math, T, B, H, xg, w, h0, c0, hs, hn, cn, cs, g, flags, nflags, 0))
}
extern "C" int emu_backward(int dt, int math, long T, long B, long H, uptr w, uptr cs, uptr g, uptr c0, uptr ghs,
                            uptr ghn, uptr gcn, uptr gg, uptr gh0, uptr gc0, uptr flags, long nflags) {
  EMU_CALL(seqgen::lstm::sequence_backward(0, dt, math, T, B, H, w, cs, g, c0, ghs, ghn, gcn, gg, gh0, gc0, flags,
                                           nflags, 0))
}
extern "C" int emu_cell(int dt, int math, long B, long I, long H, uptr x, uptr h, uptr c, uptr wih, uptr whh,
                        uptr bih, uptr bhh, uptr h1, uptr c1) {
  EMU_CALL(seqgen::lstm::cell_step(0, dt, math, B, I, H, x, h, c, wih, whh, bih, bhh, h1, c1, 0))
}
"""
class EmulatedC(emulated_recurrence.EmulatedRecurrence):
    """``seqgen_fast._C``'s LSTM functions (same names, arguments and exceptions) over the host-emulated
    build of csrc/lstm.cu: tensors are CPU tensors, pointers their host addresses, device and stream 0."""

    LSTM_MATH_MMA, LSTM_MATH_FFMA = MMA, FFMA
    lstm_sequence_plan = emulated_recurrence.EmulatedRecurrence.sequence_plan
    lstm_sequence_check = emulated_recurrence.EmulatedRecurrence.sequence_check
    lstm_sequence_forward = emulated_recurrence.EmulatedRecurrence.sequence_forward
    lstm_sequence_backward = emulated_recurrence.EmulatedRecurrence.sequence_backward
    lstm_cell_step = emulated_recurrence.EmulatedRecurrence.cell_step

    def __init__(self, lib):
        super().__init__(lib, forward_ptrs=10, backward_ptrs=11, cell_ptrs=9)
        I, P = ctypes.c_int, ctypes.c_size_t
        lib.emu_mma.argtypes = [I, P, P, P]
        lib.emu_ldmatrix.argtypes = [P, P, P]
        lib.emu_to_tf32_bits.argtypes, lib.emu_to_tf32_bits.restype = [ctypes.c_float], ctypes.c_uint


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    """csrc/lstm.cu built for the host under the emulation, behind the EmulatedC adapter."""
    return EmulatedC(build(str(tmp_path_factory.mktemp("lstm_emu")), "lstm.cu", _EMU_MAIN, "lstm_emu"))


_seed = emulated_recurrence.seed


def _nan(*shape, dtype):
    return poison(torch.empty(*shape, dtype=dtype))


# ---- the PTX primitives of common.cuh's seam --------------------------------------------------------
def _pack16(lo: torch.Tensor, hi: torch.Tensor) -> int:
    bits = lambda v: int(v.view(torch.int16).item()) & 0xFFFF  # noqa: E731
    return bits(lo) | bits(hi) << 16


def _fragments(A, B, kind):
    """Lane-major fragments of A (16 x K) and B (K x 8) per the PTX ISA tables, written out here
    independently of the emulation: g = lane / 4, q = lane % 4."""
    a, b = torch.zeros(32, 4, dtype=torch.int64), torch.zeros(32, 2, dtype=torch.int64)
    for lane in range(32):
        g, q = lane // 4, lane % 4
        if kind < 2:  # m16n8k16: two 16-bit elements per register, the lower k in the low half
            for i, (r, k) in enumerate([(g, 2 * q), (g + 8, 2 * q), (g, 2 * q + 8), (g + 8, 2 * q + 8)]):
                a[lane, i] = _pack16(A[r, k], A[r, k + 1])
            for i, k in enumerate([2 * q, 2 * q + 8]):
                b[lane, i] = _pack16(B[k, g], B[k + 1, g])
        else:  # m16n8k8 tf32: one element per register
            for i, (r, k) in enumerate([(g, q), (g + 8, q), (g, q + 4), (g + 8, q + 4)]):
                a[lane, i] = int(A[r, k].view(torch.int32).item()) & 0xFFFFFFFF
            for i, k in enumerate([q, q + 4]):
                b[lane, i] = int(B[k, g].view(torch.int32).item()) & 0xFFFFFFFF
    return a.to(torch.int32), b.to(torch.int32)


@pytest.mark.parametrize("kind,dtype,K", [(0, F16, 16), (1, BF16, 16), (2, F32, 8)])
def test_emulated_mma_fragments_follow_the_ptx_layouts(emu, kind, dtype, K):
    # small integers and halves: every product and sum is exact in fp32, so the check is exact
    A = (torch.randint(-8, 9, (16, K)) / 2).to(dtype)
    B = (torch.randint(-8, 9, (K, 8)) / 2).to(dtype)
    C = torch.randint(-4, 5, (16, 8)).float()
    a, b = _fragments(A, B, kind)
    d = torch.zeros(32, 4)
    for lane in range(32):
        g, q = lane // 4, lane % 4
        d[lane] = torch.stack([C[g, 2 * q], C[g, 2 * q + 1], C[g + 8, 2 * q], C[g + 8, 2 * q + 1]])
    emu.call("emu_mma", kind, a, b, d)
    want = C + A.float() @ B.float()
    got = torch.zeros(16, 8)
    for lane in range(32):
        g, q = lane // 4, lane % 4
        got[g, 2 * q], got[g, 2 * q + 1], got[g + 8, 2 * q], got[g + 8, 2 * q + 1] = d[lane]
    assert torch.equal(got, want)


def test_emulated_ldmatrix_hands_out_rows_as_the_ptx_isa_says(emu):
    rows = torch.randint(-2**15, 2**15, (32, 8), dtype=torch.int16)  # 32 rows of eight 16-bit elements
    row_of_lane = torch.randperm(32).to(torch.int32)  # lanes 8i..8i+7 name the rows of matrix i
    out = torch.zeros(32, 4, dtype=torch.int32)
    emu.call("emu_ldmatrix", rows, row_of_lane, out)
    for lane in range(32):
        for i in range(4):
            src = rows[int(row_of_lane[8 * i + lane // 4])]
            want = _pack16(src[2 * (lane % 4)], src[2 * (lane % 4) + 1])
            assert int(out[lane, i]) & 0xFFFFFFFF == want, (lane, i)


def test_emulated_to_tf32_rounds_to_nearest_ties_away(emu):
    tf32 = lambda x: emu.lib.emu_to_tf32_bits(x)  # noqa: E731
    bits = lambda x: int(torch.tensor(x, dtype=torch.float32).view(torch.int32)) & 0xFFFFFFFF  # noqa: E731
    one, ulp = bits(1.0), 2.0 ** -10  # tf32 keeps 10 mantissa bits
    assert tf32(1.0 + ulp / 2) == bits(1.0 + ulp), "a tie rounds away from zero"
    assert tf32(-(1.0 + ulp / 2)) == bits(-(1.0 + ulp))
    assert tf32(1.0 + ulp / 2 - 2.0 ** -23) == one
    assert tf32(float("inf")) == bits(float("inf")) and tf32(3.0) == bits(3.0)


# ---- the persistent kernels -------------------------------------------------------------------------
# (T, B, H, dtype, math, sms, smem, threads, offset_h0): what each configuration exercises.
EMU_SEQ = [
    (3, 1, 33, F16, MMA, 4, 232448, 64, False),     # odd H: 16-bit pair loads; 9 units: 36 rows in 4 m-tiles;
    pytest.param(2, 6, 64, BF16, MMA, 4, 232448, 32, False,  # the backward's k-ranges wrap from gate to gate
                 marks=pytest.mark.smoke),          # one warp doing every work item of a pass
    (3, 17, 40, F32, MMA, 4, 232448, 64, True),     # tf32; 17 columns: 3 n-tiles, the last partial; h0 misaligned
    (2, 24, 24, F16, MMA, 8, 232448, 32, False),    # two batch groups of 12 rows over 8 SMs
    (2, 72, 16, BF16, MMA, 1, 232448, 32, False),   # one block: the batch in passes (items per pass bounded)
    (2, 17, 40, F32, FFMA, 4, 12000, 32, True),     # exact fp32: staged k chunks, batch passes (FFMA tiles of 4)
    (3, 2, 9, F32, FFMA, 3, 232448, 64, False),     # exact fp32, B < 4: tiles of one batch row
]


def _emulated_sequence(emu, T, B, H, dtype, math, offset_h0):
    xg, w_hh, h0, c0 = _inputs_on("cpu", T, B, H, dtype)
    if offset_h0:
        h0 = torch.cat([torch.zeros(1, dtype=dtype), h0.flatten()])[1:].view(B, H)
    plan = emu.lstm_sequence_check(0, CODE[dtype], H, B, False, math, 0)
    assert plan["reason"] == "", plan["reason"]
    hs, h_n, c_n, cs, gates = (_nan(T, B, H, dtype=dtype), _nan(B, H, dtype=dtype), _nan(B, H, dtype=dtype),
                               _nan(T, B, H, dtype=dtype), _nan(T, B, 4 * H, dtype=dtype))
    flags = torch.zeros(plan["blocks"], dtype=torch.int32)
    emu.call("emu_forward", CODE[dtype], math, T, B, H, xg, w_hh, h0, c0, hs, h_n, c_n, cs, gates, flags,
             flags.numel())
    assert torch.equal(flags, torch.full_like(flags, T)), "every block published every step"
    return (xg, w_hh, h0, c0), (hs, h_n, c_n, cs, gates), plan


@pytest.mark.parametrize("T,B,H,dtype,math,sms,smem,threads,offset_h0", EMU_SEQ)
def test_emulated_sequence_forward_backward_match_float64(emu, T, B, H, dtype, math, sms, smem, threads, offset_h0):
    seed = _seed()
    emu.configure(sms, smem, threads, seed)
    (xg, w_hh, h0, c0), outs, plan = _emulated_sequence(emu, T, B, H, dtype, math, offset_h0)
    ref = _ref_loop(*(t.double() for t in (xg, w_hh, h0, c0)))
    for name, ours, want in zip(("hs", "h_n", "c_n", "cs", "gates"), outs, ref):
        assert_close_rel(ours, want, TOL[dtype], f"emulated {name} (schedule seed {seed}, plan {plan})")

    hs, _, _, cs, gates = outs
    g_hs, g_hn, g_cn = (torch.randn(s).to(dtype) for s in ((T, B, H), (B, H), (B, H)))
    bplan = emu.lstm_sequence_check(0, CODE[dtype], H, B, True, math, 0)
    d_gates, d_h0, d_c0 = _nan(T, B, 4 * H, dtype=dtype), _nan(B, H, dtype=dtype), _nan(B, H, dtype=dtype)
    flags = torch.zeros(bplan["blocks"], dtype=torch.int32)
    emu.call("emu_backward", CODE[dtype], math, T, B, H, w_hh, cs, gates, c0, g_hs, g_hn, g_cn, d_gates, d_h0, d_c0,
             flags, flags.numel())
    for name, ours, want in zip(("grad_gates", "grad_h0", "grad_c0"), (d_gates, d_h0, d_c0),
                                _ref_grads(xg, w_hh, h0, c0, g_hs, g_hn, g_cn)):
        assert_close_rel(ours, want, BWD_TOL[dtype], f"emulated {name} (schedule seed {seed}, plan {bplan})")


def test_emulated_schedules_do_not_change_the_results(emu):
    """The handoff leaves nothing to the schedule: two block orders give identical bits."""
    results = []
    for seed in (_seed(), _seed()):
        emu.configure(4, 232448, 32, seed)
        torch.manual_seed(7)
        results.append(_emulated_sequence(emu, 4, 9, 40, F16, MMA, False)[1])
    for a, b in zip(*results):
        assert torch.equal(a, b)


# A program driving the persistent kernels (forward, then backward) over several schedules, built with
# ThreadSanitizer: every read of another block's h_t or grad_gates must be ordered after its write by
# the flags' release/acquire edges (and the block barriers), else TSan reports a data race.
_TSAN_MAIN = emulated_recurrence.tsan_program("lstm", r"""
template <typename T>
int run(int dtype, int math, int T_len, int B, int H, int sms, unsigned seed) {
  seqgen::recurrence::SequencePlan plan, bplan;
  if (!plans(dtype, math, B, H, sms, seed, plan, bplan)) return 1;
  auto xg = values<T>(size_t(T_len) * B * 4 * H, 0.05f), w = values<T>(size_t(4) * H * H, 0.01f);
  auto h0 = values<T>(size_t(B) * H, 0.02f), c0 = values<T>(size_t(B) * H, 0.03f), hn = values<T>(size_t(B) * H, 0);
  auto hs = values<T>(size_t(T_len) * B * H, 0), cn = hn, cs = hs, gates = xg, gg = xg, gh0 = hn, gc0 = hn;
  auto ghs = values<T>(size_t(T_len) * B * H, 0.04f);
  std::vector<unsigned> flags(plan.blocks, 0u), bflags(bplan.blocks, 0u);
  seqgen::lstm::sequence_forward(0, dtype, math, T_len, B, H, ptr(xg), ptr(w), ptr(h0), ptr(c0), ptr(hs), ptr(hn),
                                 ptr(cn), ptr(cs), ptr(gates), ptr(flags), plan.blocks, 0);
  seqgen::lstm::sequence_backward(0, dtype, math, T_len, B, H, ptr(w), ptr(cs), ptr(gates), ptr(c0), ptr(ghs),
                                  ptr(hn), ptr(cn), ptr(gg), ptr(gh0), ptr(gc0), ptr(bflags), bplan.blocks, 0);
  return 0;
}

int main() {
  int rc = 0;
  for (unsigned seed = 1; seed <= 2; ++seed) {
    rc |= run<__half>(1, 0, 3, 9, 40, 4, seed);          // tensor cores, 4 blocks
    rc |= run<__nv_bfloat16>(2, 0, 2, 24, 24, 8, seed);  // two batch groups
    rc |= run<float>(0, 1, 2, 5, 20, 3, seed);           // exact fp32: staged k chunks
  }
  return rc;
}
""")


def test_emulated_handoff_is_race_free_under_thread_sanitizer(tmp_path):
    emulated_recurrence.assert_race_free(tmp_path, "lstm.cu", _TSAN_MAIN, "lstm_tsan")


@needs_c
@pytest.mark.parametrize("dtype,math", [(F16, MMA), (F32, MMA), (F32, FFMA)])
@pytest.mark.parametrize("hidden,batch,backward", [(1024, 64, False), (512, 16, True), (97, 5, False)])
def test_emulated_build_plans_as_the_extension(emu, dtype, math, hidden, batch, backward):
    args = (CODE[dtype], hidden, batch, backward, math, 132, 232448)
    assert emu.lstm_sequence_plan(*args) == dict(_ext.C.lstm_sequence_plan(*args))


def test_emulated_launch_refuses_a_plan_that_does_not_fit(emu):
    emu.configure(4, 4096, 32)
    xg, w_hh, h0, c0 = _inputs_on("cpu", 2, 1, 64, F32)
    out = [torch.empty(s) for s in ((2, 1, 64), (1, 64), (1, 64))]
    flags = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="shared memory per block"):
        emu.call("emu_forward", 0, MMA, 2, 1, 64, xg, w_hh, h0, c0, *out, None, None, flags, 4)
    emu.configure(2, 232448, 32)  # 2 SMs: 32 units per block, more rows than the tensor-core kernels take
    with pytest.raises(RuntimeError, match="32 units per block need 128 rows"):
        emu.call("emu_forward", 0, MMA, 2, 1, 64, xg, w_hh, h0, c0, *out, None, None, flags, 4)


def test_emulated_grid_follows_the_sms_the_context_may_use(emu):
    # an MPS client limit or a green context: 3 of 8 SMs -> the plan spreads H over 3 blocks
    emu.configure(8, 232448, 32, _seed(), context_sms=3)
    plan = emu.lstm_sequence_check(0, CODE[F16], 48, 2, False, MMA, 0)
    assert plan["reason"] == "" and plan["blocks"] == 3 and plan["units"] == 16
    torch.manual_seed(3)
    (xg, w_hh, h0, c0), outs, _ = _emulated_sequence(emu, 2, 2, 48, F16, MMA, False)
    assert_close_rel(outs[0], _ref_loop(*(t.double() for t in (xg, w_hh, h0, c0)))[0], TOL[F16], "hs")


def test_emulated_launch_refuses_a_grid_that_cannot_be_resident(emu):
    emu.configure(4, 232448, 32, blocks_per_sm=0)  # the occupancy query finds no room for a block
    plan = emu.lstm_sequence_check(0, CODE[F16], 64, 2, False, MMA, 0)
    assert "cannot all be resident: 0 per SM x 4 SMs" in plan["reason"]
    xg, w_hh, h0, c0 = _inputs_on("cpu", 2, 2, 64, F16)
    out = [torch.empty(s, dtype=F16) for s in ((2, 2, 64), (2, 64), (2, 64))]
    flags = torch.zeros(4, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="cannot all be resident"):
        emu.call("emu_forward", 1, MMA, 2, 2, 64, xg, w_hh, h0, c0, *out, None, None, flags, 4)


def test_emulated_launch_needs_a_flag_per_block(emu):
    emu.configure(4, 232448, 32)
    xg, w_hh, h0, c0 = _inputs_on("cpu", 2, 2, 64, F16)
    out = [torch.empty(s, dtype=F16) for s in ((2, 2, 64), (2, 64), (2, 64))]
    with pytest.raises(ValueError, match="flags holds 2 words; the 4 blocks"):
        emu.call("emu_forward", 1, MMA, 2, 2, 64, xg, w_hh, h0, c0, *out, None, None, torch.zeros(2, dtype=torch.int32),
                 2)


# ---- the one-launch cell step -----------------------------------------------------------------------
@pytest.mark.parametrize("B,I,H,dtype,math,sms,bias,offset_x", [
    (1, 7, 1, F32, FFMA, 4, True, False),     # one unit: rows past H repeat the block's first row
    pytest.param(5, 24, 48, BF16, MMA, 3, False, False,  # B < 8: FFMA tiles, 16-byte weight loads, no bias
                 marks=pytest.mark.smoke),
    (3, 9, 33, F16, MMA, 2, True, True),      # unaligned rows (I = 9, x misaligned): scalar FFMA kernel
    (8, 24, 40, F16, MMA, 4, True, False),    # B = 8: tensor cores, one n-tile; 8 units: 2 m-tiles
    (19, 9, 33, BF16, MMA, 3, True, True),    # tensor cores, odd sizes: 16-bit pair loads, 3 n-tiles
    (12, 16, 24, F32, MMA, 2, False, False),  # tf32 tensor cores
    (12, 16, 24, F32, FFMA, 2, True, False),  # exact fp32 at B >= 8
])
def test_emulated_cell_step_matches_float64_lstmcell(emu, B, I, H, dtype, math, sms, bias, offset_x):
    emu.configure(sms, 232448, 64)
    args = list(_cell_inputs_on("cpu", B, I, H, dtype, bias))
    if offset_x:
        args[0] = torch.cat([torch.zeros(1, dtype=dtype), args[0].flatten()])[1:].view(B, I)
    h1, c1 = _nan(B, H, dtype=dtype), _nan(B, H, dtype=dtype)
    emu.call("emu_cell", CODE[dtype], math, B, I, H, *args, h1, c1)
    r_h1, r_c1 = _ref_cell(*args)
    assert_close_rel(h1, r_h1, TOL[dtype], "emulated h1")
    assert_close_rel(c1, r_c1, TOL[dtype], "emulated c1")


# ---- the whole cuda backend on the emulated kernels -------------------------------------------------
@pytest.fixture
def emulated_cuda(emu, monkeypatch):
    """The cuda backend of seqgen_fast running the emulated kernels on CPU tensors: _C is the EmulatedC
    adapter, CPU tensors count as the device's, device and stream are 0. Everything above the
    C launchers -- dispatch, supports, launch plans, flags, ops, autograd -- is the real code."""
    emu.configure(4, 232448, 32, _seed())
    emulated_recurrence.emulate_cuda_backend(monkeypatch, emu, lstm_cuda, (ops.SEQ, ops.SEQ_BWD, ops.CELL))
    return emu


def _compare_with_torch(ours, ref, x, backward=True):
    """ours(x) against torch's float64 module on the same weights: output, states, gradients."""
    out, (h_n, c_n) = ours(x)
    x64 = x.detach().double().requires_grad_()
    r_out, (r_h, r_c) = ref(x64)
    tol = {F32: 1e-3, F16: 1e-2, BF16: 6e-2}[x.dtype]
    for name, a, b in (("output", out, r_out), ("h_n", h_n, r_h), ("c_n", c_n, r_c)):
        assert_close_rel(a, b, tol, name)
    if backward:
        g = torch.randn_like(r_out)
        (out * g.to(out.dtype)).sum().backward()
        (r_out * g).sum().backward()
        assert_close_rel(x.grad, x64.grad, tol, "grad input")
        for (name, p), (_, q) in zip(ours.named_parameters(), ref.named_parameters()):
            assert_close_rel(p.grad, q.grad, tol, f"grad {name}")


@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_emulated_cuda_backend_runs_nn_lstm(emulated_cuda, dtype):
    ref = torch.nn.LSTM(6, 20, num_layers=2, bidirectional=True, dtype=torch.float64)
    ours = LSTM(6, 20, num_layers=2, bidirectional=True, dtype=dtype)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(5, 3, 6).to(dtype).requires_grad_()
    xg, w, h0, c0 = _seq_args(5, 3, 20, dtype)
    assert ops.SEQ.select(xg, w, None, h0, c0, None, train=True) == "cuda"
    with seqgen_fast.use_backend("cuda"):
        _compare_with_torch(ours, ref, x)


def test_emulated_cuda_backend_routes_on_when_the_grid_cannot_be_resident(emulated_cuda):
    emulated_cuda.configure(4, 232448, 32, blocks_per_sm=0)
    xg, w_hh, h0, c0 = _seq_args(3, 2, 16, F16)
    why = ops.SEQ.reasons("cuda", xg, w_hh, None, h0, c0, None, train=False)
    assert any("cannot all be resident" in r for r in why), why
    assert ops.SEQ.select(xg, w_hh, None, h0, c0, None, train=False) == "reference"
    with pytest.raises(seqgen_fast.BackendError, match="cannot all be resident"):
        ops.SEQ.select(xg, w_hh, None, h0, c0, None, train=False, backend="cuda")


def test_emulated_cuda_backend_compiles_fullgraph_without_recompiles(emulated_cuda, monkeypatch):
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    ref = torch.nn.LSTM(6, 16, dtype=torch.float64)
    ours = LSTM(6, 16, dtype=F16)
    ours.load_state_dict(ref.state_dict())
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    calls = []
    real = lstm_cuda.sequence_forward
    monkeypatch.setattr(lstm_cuda, "sequence_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):  # fresh data each call: no recompile, the cuda kernels every time
        _compare_with_torch(compiled, ref, torch.randn(4, 3, 6).to(F16).requires_grad_())
        for p in list(ours.parameters()) + list(ref.parameters()):
            p.grad = None
    assert len(calls) == 3, "the compiled module runs the cuda backend's kernel"

    cell_ref = torch.nn.LSTMCell(6, 16, dtype=torch.float64)
    cell = LSTMCell(6, 16, dtype=F16)
    cell.load_state_dict(cell_ref.state_dict())

    @torch.compile(backend="aot_eager", fullgraph=True)
    def step(x, h, c):
        return cell(x, (h, c))

    h, c = torch.zeros(9, 16, dtype=F16), torch.zeros(9, 16, dtype=F16)  # distinct: `h is c` would be a guard
    rh, rc = torch.zeros(9, 16, dtype=torch.float64), torch.zeros(9, 16, dtype=torch.float64)
    with torch.no_grad():
        for _ in range(4):  # a generation loop: one graph, every step
            x = torch.randn(9, 6)
            h, c = step(x.to(F16), h, c)
            rh, rc = cell_ref(x.double(), (rh, rc))
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
# fp32 twice: TF32 tensor cores (cuDNN's default) and exact FFMA
PRODUCTS = [(F32, True), (F32, False), (F16, True), (BF16, True)]


@pytest.fixture
def tf32(request, monkeypatch):
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", request.param)
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32", PRODUCTS, indirect=["tf32"])
@pytest.mark.parametrize("T,B,H", SEQ_SHAPES)
@pytest.mark.parametrize("train", [False, True])
def test_sequence_forward_matches_float64_loop(dtype, tf32, T, B, H, train):
    xg, w_hh, h0, c0 = _inputs(T, B, H, dtype)
    _skip_unless_fits(lstm_cuda.supports_sequence(xg, w_hh, h0, c0, train=train))
    shapes = [(T, B, H), (B, H), (B, H)] + ([(T, B, H), (T, B, 4 * H)] if train else [])
    out = tuple(poison(torch.empty(s, dtype=dtype, device="cuda")) for s in shapes)
    res = lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=train, out=out)
    ref = _ref_loop(*(t.double() for t in (xg, w_hh, h0, c0)))
    names = ("hs", "h_n", "c_n", "cs", "gates")
    for name, ours, want in list(zip(names, res, ref))[: 5 if train else 3]:
        assert ours.dtype == dtype
        assert_close_rel(ours, want, TOL[dtype], f"{name} {dtype} tf32={tf32} T{T} B{B} H{H}")
    if not train:
        assert res[3].numel() == 0 and res[4].numel() == 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32", PRODUCTS, indirect=["tf32"])
@pytest.mark.parametrize("T,B,H", SEQ_SHAPES)
def test_sequence_backward_matches_float64_autograd(dtype, tf32, T, B, H):
    xg, w_hh, h0, c0 = _inputs(T, B, H, dtype)
    hs, h_n, c_n, cs, gates = lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=True)
    _skip_unless_fits(lstm_cuda.supports_sequence_backward(w_hh, hs, cs, gates, h0, c0))
    g_hs, g_hn, g_cn = (torch.randn(s, device="cuda").to(dtype) for s in ((T, B, H), (B, H), (B, H)))
    out = tuple(poison(torch.empty(s, dtype=dtype, device="cuda")) for s in ((T, B, 4 * H), (B, H), (B, H)))
    d_gates, d_h0, d_c0 = lstm_cuda.sequence_backward(w_hh, hs, cs, gates, h0, c0, g_hs, g_hn, g_cn, out=out)
    assert d_gates.dtype == d_h0.dtype == d_c0.dtype == dtype
    want = _ref_grads(xg, w_hh, h0, c0, g_hs, g_hn, g_cn)
    for name, ours, ref in zip(("grad_gates", "grad_h0", "grad_c0"), (d_gates, d_h0, d_c0), want):
        assert_close_rel(ours, ref, BWD_TOL[dtype], f"{name} {dtype} tf32={tf32} T{T} B{B} H{H}")


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
    zeros = torch.zeros(B, H, device="cuda")
    want = _ref_grads(xg, w_hh, h0, c0, torch.zeros(T, B, H, device="cuda"), g_last, zeros)
    for a, b, ref, name in zip(ours, ours_none, want, ("grad_gates", "grad_h0", "grad_c0")):
        assert_close_rel(a, ref, BWD_TOL[dtype], name)
        assert torch.equal(a, b), f"{name}: None and an expanded zero gradient must agree"


@pytest.mark.gpu
def test_sequence_forward_refuses_what_does_not_fit():
    xg, w_hh, h0, c0 = _inputs(2, 1, 4096, F32)
    reasons = lstm_cuda.supports_sequence(xg, w_hh, h0, c0, train=False)
    assert any("shared memory" in r for r in reasons)
    with pytest.raises(RuntimeError, match="shared memory"):
        lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=False)


@pytest.mark.gpu
def test_launch_plan_is_resident_on_this_gpu():
    for dtype, B, H in ((F16, 64, 1024), (BF16, 1, 1024), (F32, 16, 512)):
        plan = lstm_cuda.launch_plan(torch.cuda.current_device(), CODE[dtype], H, B, False, MMA)
        assert plan["reason"] == "" and plan["blocks"] <= torch.cuda.get_device_properties(0).multi_processor_count


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [F16, F32])
def test_sequence_forward_replays_from_a_cuda_graph(dtype):
    """The cooperative launch, its zeroed flags and the cached plan inside a stream capture."""
    T, B, H = 6, 16, 256
    xg, w_hh, h0, c0 = _inputs(T, B, H, dtype)
    out = tuple(torch.empty(s, dtype=dtype, device="cuda") for s in ((T, B, H), (B, H), (B, H)))
    lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=False, out=out)  # warm-up outside capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=False, out=out)
    for _ in range(2):
        xg.copy_(_inputs(T, B, H, dtype)[0])
        poison(out[0])
        graph.replay()
        torch.cuda.synchronize()
        assert_close_rel(out[0], _ref_loop(*(t.double() for t in (xg, w_hh, h0, c0)))[0], TOL[dtype], "replayed hs")


@pytest.mark.gpu
def test_gpu_grid_follows_the_sms_of_a_green_context():
    """A stream of a green context holding 16 SMs: the plan spreads the layer over at most those (the
    deployment limit a cooperative grid must fit), and the results stay right."""
    gc = pytest.importorskip("torch.cuda.green_contexts")
    try:
        ctx = gc.GreenContext.create(num_sms=16, device_id=0)
        stream = ctx.Stream()
    except (RuntimeError, TypeError, AttributeError) as exc:  # torch without green contexts, or another API
        pytest.skip(f"no torch green context here: {exc}")
    T, B, H = 5, 4, 256
    xg, w_hh, h0, c0 = _inputs(T, B, H, F16)
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        plan = lstm_cuda.launch_plan(torch.cuda.current_device(), CODE[F16], H, B, False, MMA)
        assert plan["reason"] == "", plan["reason"]
        assert plan["blocks"] < torch.cuda.get_device_properties(0).multi_processor_count
        hs = lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=False)[0]
        stream.synchronize()
    assert_close_rel(hs, _ref_loop(*(t.double() for t in (xg, w_hh, h0, c0)))[0], TOL[F16], "hs on 16 SMs")


@pytest.mark.gpu
def test_sequence_empty_sizes_launch_nothing():
    xg, w_hh, h0, c0 = _inputs(0, 3, 16, F16)
    hs, h_n, c_n, cs, gates = lstm_cuda.sequence_forward(xg, w_hh, h0, c0, train=True)
    assert hs.shape == (0, 3, 16) and torch.equal(h_n, h0) and torch.equal(c_n, c0)
    d_gates, d_h0, d_c0 = lstm_cuda.sequence_backward(w_hh, hs, cs, gates, h0, c0, None, h0, None)
    assert d_gates.shape == (0, 3, 64) and torch.equal(d_h0, h0) and not d_c0.any()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tf32", [(F32, False), (F32, True), (F16, True), (BF16, True)])
@pytest.mark.parametrize("B,I,H", [(1, 7, 1), pytest.param(1, 33, 97, marks=pytest.mark.smoke), (3, 64, 512),
                                   (5, 256, 1024), pytest.param(8, 64, 256, marks=pytest.mark.smoke), (32, 1024, 1024),
                                   (64, 40, 200), (100, 16, 33)])
@pytest.mark.parametrize("bias", [True, False])
def test_cell_step_matches_float64_lstmcell(dtype, tf32, B, I, H, bias, monkeypatch):
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", tf32)
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
@pytest.mark.parametrize("dtype,B", [(F32, 2), (BF16, 2), (F16, 16)])
def test_cell_step_replays_from_a_cuda_graph(dtype, B):
    I, H = 96, 256
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


@pytest.mark.gpu
def test_gpu_compiled_lstm_and_cell_run_the_cuda_kernels_without_recompiles(monkeypatch):
    """torch.compile (inductor, fullgraph) of nn.LSTM training steps and an nn.LSTMCell generation
    loop: one graph each, no recompile across calls, the cuda backend's kernels inside."""
    monkeypatch.setattr(torch._dynamo.config, "error_on_recompile", True)
    torch._dynamo.reset()
    ref = torch.nn.LSTM(32, 256, dtype=torch.float64)
    ours = LSTM(32, 256, device="cuda", dtype=F16)
    ours.load_state_dict(ref.state_dict())
    compiled = torch.compile(ours, fullgraph=True)
    calls = []
    real = lstm_cuda.sequence_forward
    monkeypatch.setattr(lstm_cuda, "sequence_forward", lambda *a, **k: calls.append(1) or real(*a, **k))
    for _ in range(3):
        x = torch.randn(16, 8, 32, device="cuda", dtype=F16, requires_grad=True)
        out, _ = compiled(x)
        out.float().sum().backward()
        r_out, _ = ref(x.detach().double().cpu())
        assert_close_rel(out.cpu(), r_out, 1e-2, "compiled output")
    assert len(calls) == 3
    cell = LSTMCell(256, 256, device="cuda", dtype=F16)
    step = torch.compile(lambda x, h, c: cell(x, (h, c)), fullgraph=True)
    h, c = torch.zeros(16, 256, device="cuda", dtype=F16), torch.zeros(16, 256, device="cuda", dtype=F16)
    with torch.no_grad():
        for _ in range(8):
            h, c = step(h, h, c)
    assert torch.isfinite(h).all()
    torch._dynamo.reset()
