"""Sizes past 2^31 elements (and 2^31 bytes) for the recurrent and diffusion kernels.

Every kernel of these families addresses with 64-bit offsets, so none declines a tensor for its size:

* csrc/recurrence.cuh, the persistent sequence kernels: rows t*B + b and their products with H / G*H
  in int64_t, weights (g*H + j)*K in int64_t;
* csrc/recurrence.cuh, the one-launch cell step (LSTMCell/GRUCell under no_grad on ``cuda``, its
  tensor-core ``step_kernel`` from a batch of 8 and its FFMA ``step_kernel_ffma`` below): weight rows
  through ``gate_row`` ((g*H + j) * K in int64_t), x/h rows as ``v + int64_t(c0) * K`` (MMA:
  ``tile_product``'s ``x + c * ldx`` with an int64_t ldx; FFMA: ``int64_t(b) * K``), outputs and
  states at ``int64_t(b) * H + j``; the remaining int offsets (k < K, g*H + j of a bias) are below a
  size the launcher already bounds to 2^31 (``require_size``);
* the Triton kernels of ``kernels/lstm.py`` / ``kernels/gru.py``: the pointwise cells' program row
  cast to int64 before it meets the row stride, and batches past a grid's axis 0 (2^31 - 1 rows)
  launched in parts, the step kernels' weight rows and x/h rows cast to
  int64 before they meet K (x [B, I] passes 2^31 elements from I = 2^28 at B = 8);
* csrc/diffusion.cu: int64 sample sizes and bases; the Triton diffusion kernels: program rows and
  chunk starts cast to int64.

What they decline is said before launch: the recurrent kernels a hidden size whose W_hh does not fit
on chip (the plan's reason), the diffusion kernels a batch past 65535 (the grid's axis 1). The CPU
tests assert those plans and reasons without allocating, and run the Triton pointwise cells under the
interpreter on rows whose offsets pass 2^31 (views into a reservation of address space: only the rows
touched get memory); the -m gpu tests run one real case past 2^31 elements per kernel against torch.
"""
from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys

import pytest
import torch

from seqgen_fast import _ext
from seqgen_fast.kernels import _recurrence_cuda, gru_cuda, lstm_cuda

H100 = {"multiprocessor_count": 132, "shared_memory_per_block_optin": 232448}
BIG = 2 ** 31


class AnyDevice:
    """A stand-in for a family's ``CAPS``: every tensor is on a device the kernel takes (the meta
    tensors below), so ``supports_*`` is left with its shape and size logic."""

    def reasons(self, *tensors):
        return []


@pytest.mark.skipif(_ext.C is None, reason="seqgen_fast._C is not built")
@pytest.mark.parametrize("kernels,gates", [(lstm_cuda, 4), (gru_cuda, 3)])
@pytest.mark.parametrize("backward", [False, True])
def test_sequence_plans_take_sizes_past_2_31(kernels, gates, backward):
    """The persistent kernels' plan depends on (H, B) only: T steps of [B, G*H] rows pass 2^31 elements
    (and 2^31 bytes) with no reason to decline, while a hidden size whose W_hh cannot stay on chip is
    declined with its reason, before anything is launched."""
    B, H = 64, 512
    T = BIG // (B * gates * H) + 1  # xg / d_rec [T, B, G*H] past 2^31 elements
    assert T * B * gates * H > BIG
    plan = kernels.sequence_plan(torch.bfloat16, H, B, backward=backward, device_facts=H100)
    assert plan["reason"] == "", plan["reason"]
    too_big = kernels.sequence_plan(torch.bfloat16, 1 << 14, B, backward=backward, device_facts=H100)
    assert too_big["reason"], "a W_hh of 2^14 hidden units cannot be resident: the plan must say why"


def _meta(*shape):
    return torch.empty(shape, device="meta", dtype=torch.bfloat16)


def _cell_supports(kernels, gates: int, B: int, I: int, H: int) -> list[str]:
    x, h, w_ih, w_hh, b = _meta(B, I), _meta(B, H), _meta(gates * H, I), _meta(gates * H, H), _meta(gates * H)
    if kernels is lstm_cuda:
        return kernels.supports_cell(x, h, _meta(B, H), w_ih, w_hh, b, b)
    return kernels.supports_cell(x, h, w_ih, w_hh, b, b)


@pytest.mark.skipif(_ext.C is None, reason="seqgen_fast._C is not built")
@pytest.mark.parametrize("kernels,gates", [(lstm_cuda, 4), (gru_cuda, 3)])
def test_cell_step_takes_operands_past_2_31_and_declines_32_bit_sizes(kernels, gates, monkeypatch):
    """The one-launch step (LSTMCell/GRUCell under no_grad on ``cuda``) on meta tensors (nothing
    allocated; the device check stubbed, the rest of ``supports_cell`` real): x [8, 2^28 + 1] (past 2^31
    elements, the tensor-core step) and x [2, 2^30 + 1] with W_ih [G, 2^30 + 1] (both past 2^31, the FFMA
    step) are taken -- their offsets are 64-bit (module doc); a batch or input size of 2^31 itself, past
    the kernel's int sizes, is declined with that reason before launch (dispatch moves on to triton)
    instead of being refused by the C++ launcher after dispatch chose it."""
    monkeypatch.setattr(_recurrence_cuda, "CAPS", AnyDevice())
    assert _cell_supports(kernels, gates, 8, BIG // 8 + 1, 3) == []
    assert _cell_supports(kernels, gates, 2, BIG // 2 + 1, 1) == []
    assert any("input_size = 2147483648" in r for r in _cell_supports(kernels, gates, 1, BIG, 1))
    assert any("batch = 2147483648" in r for r in _cell_supports(kernels, gates, BIG, 1, 1))


@pytest.mark.skipif(_ext.C is None, reason="seqgen_fast._C is not built")
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_sequence_declines_32_bit_sizes_before_planning(family, monkeypatch):
    """A sequence of 2^31 steps, or a batch of 2^31 rows, is past the persistent kernels' int sizes:
    ``supports_sequence`` / ``supports_sequence_backward`` say so (on meta tensors) instead of the
    launcher refusing it after dispatch -- and without asking the device for a plan."""
    monkeypatch.setattr(_recurrence_cuda, "CAPS", AnyDevice())
    gates, H = (4, 2) if family == "lstm" else (3, 2)
    for T, B in ((BIG, 1), (1, BIG)):
        xg, w_hh, state, hs = _meta(T, B, gates * H), _meta(gates * H, H), _meta(B, H), _meta(T, B, H)
        if family == "lstm":
            fwd = lstm_cuda.supports_sequence(xg, w_hh, state, state, train=True)
            bwd = lstm_cuda.supports_sequence_backward(w_hh, hs, hs, xg, state, state)
        else:
            fwd = gru_cuda.supports_sequence(xg, w_hh, _meta(gates * H), state)
            bwd = gru_cuda.supports_sequence_backward(w_hh, hs, _meta(T, B, 4 * H), state)
        name = "seq_len" if T == BIG else "batch"
        for reasons in (fwd, bwd):
            assert any(f"{name} = {BIG} is past" in r for r in reasons), reasons


# ---- the Triton pointwise cells on rows past 2^31 elements, under the interpreter ------------------
ROW_STRIDE = 2 ** 30  # row 2 of every view below begins 2^31 elements into the buffer
# (launcher, reference, the operands' widths in units of H, which operands the cell writes)
POINTWISE = {
    "lstm_forward": ("cell_forward", (4, 1, 1, 1, 4), (2, 3, 4)),
    "lstm_backward": ("cell_backward", (1, 1, 4, 1, 1, 4), (1, 5)),
    "gru_forward": ("cell_forward", (3, 3, 1, 1, 4), (3, 4)),
    "gru_backward": ("cell_backward", (1, 1, 4, 1, 3, 3), (1, 4, 5)),
}


def check_pointwise_rows_past_2_31(case: str) -> None:
    """The Triton launcher of ``case`` on [3, w] views at row stride 2^30 of one float16 buffer (side by
    side in the columns), so that row 2 of each starts past 2^31 elements, against the reference cell
    on contiguous copies. The buffer is a reservation of address space: the kernels and this check touch
    three rows of it. With a 32-bit row offset, row 2 would wrap to a negative offset (a crash: hence
    a subprocess) or, read back, to another row."""
    import importlib

    from support.fuzz import rel_err

    family, _ = case.split("_")
    name, widths, written = POINTWISE[case]
    kernel = getattr(importlib.import_module(f"seqgen_fast.kernels.{family}"), name)
    reference = getattr(importlib.import_module(f"seqgen_fast.reference.{family}"), name)
    H = 5
    buf = torch.empty(2 * ROW_STRIDE + 4096, dtype=torch.float16)
    views, offset = [], 0
    g = torch.Generator().manual_seed(0)
    for k, w in enumerate(widths):
        v = buf.as_strided((3, w * H), (ROW_STRIDE, 1), offset)
        offset += w * H
        if k in written and k != 1:  # pure outputs: poisoned; dc / dh (operand 1) are read and written
            v.fill_(float("nan"))
        else:
            v.copy_(torch.rand(3, w * H, generator=g) * 0.9 + 0.05)  # activations' range (0, 1)
        views.append(v)
    copies = [v.clone() for v in views]
    kernel(*views)
    reference(*copies)
    for k in written:
        assert views[k].storage_offset() + 2 * ROW_STRIDE >= BIG
        assert not views[k].isnan().any(), f"{case}: operand {k} not written in every row"
        assert rel_err(views[k], copies[k]) < 2e-3, f"{case}: operand {k} differs from the reference"


def test_triton_pointwise_cells_address_rows_past_2_31():
    """Every case of :data:`POINTWISE` in one subprocess (one import of torch and Triton; a crash there
    fails this test, naming the case it was in)."""
    tests = os.path.dirname(os.path.abspath(__file__))
    env = {**os.environ, "TRITON_INTERPRET": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")]))}
    code = ("import test_sizes_recurrent_diffusion as t\n"
            "for case in t.POINTWISE:\n    print(case, flush=True)\n    t.check_pointwise_rows_past_2_31(case)")
    run = subprocess.run([sys.executable, "-c", code], env=env, cwd=tests, capture_output=True, text=True,
                         timeout=600, check=False)
    last = run.stdout.split()[-1] if run.stdout.split() else "(before the first case)"
    assert run.returncode == 0, f"{last} (exit {run.returncode}): {run.stderr[-2000:]}"


@pytest.mark.parametrize("case", POINTWISE)
def test_triton_pointwise_cells_launch_batches_past_a_grid_axis_in_parts(case, monkeypatch):
    """A batch of 2^31 rows or more does not fit a grid's axis 0 (2^31 - 1): the pointwise launchers
    run such batches in parts (kernels.lstm.launch_rows). Here the limit is 2 rows, so 5 rows take three
    launches: every row is written (outputs poisoned) and equals the reference cell's, rows past the
    first part included."""
    import importlib

    from seqgen_fast.kernels import lstm as kl
    from support.fuzz import rel_err

    family, _ = case.split("_")
    name, widths, written = POINTWISE[case]
    kernels = importlib.import_module(f"seqgen_fast.kernels.{family}")
    reference = getattr(importlib.import_module(f"seqgen_fast.reference.{family}"), name)
    grids = []

    class Spy:  # the kernel, recording each launch's grid
        def __init__(self, kernel):
            self.kernel = kernel

        def __getitem__(self, grid):
            grids.append(grid)
            return self.kernel[grid]

    launch = kl.launch_rows
    monkeypatch.setattr(kl, "MAX_GRID_ROWS", 2)
    monkeypatch.setattr(kernels, "launch_rows", lambda kernel, *args, **meta: launch(Spy(kernel), *args, **meta))
    H, n = 3, 5
    g = torch.Generator().manual_seed(1)
    ours = [torch.full((n, w * H), float("nan")) if k in written and k != 1
            else torch.rand(n, w * H, generator=g) * 0.9 + 0.05 for k, w in enumerate(widths)]
    theirs = [t.clone() for t in ours]
    getattr(kernels, name)(*ours)
    reference(*theirs)
    assert [grid[0] for grid in grids] == [2, 2, 1]
    for k in written:
        assert not ours[k].isnan().any(), f"{case}: operand {k} not written in every row"
        assert rel_err(ours[k], theirs[k]) < 1e-6, f"{case}: operand {k} differs from the reference"


@pytest.mark.skipif(_ext.C is None, reason="seqgen_fast._C is not built")
def test_diffusion_cuda_plan_past_2_31_elements_and_its_batch_limit(monkeypatch):
    """The cuda twin's checks on meta tensors (nothing allocated; the device check is stubbed, the rest
    of ``supports`` is the real shape logic): a sample of 2^31 + elements is taken, a batch past the
    grid's axis 1 is declined with that reason."""
    from seqgen_fast.kernels import diffusion_cuda

    monkeypatch.setattr(diffusion_cuda, "CAPS", AnyDevice())

    def why(shape):
        x = torch.empty(shape, device="meta", dtype=torch.float16)
        coef = torch.empty(1000, 24, device="meta")
        return diffusion_cuda.supports(x, x, None, None, None, None, None, None, None, coef, 3, None, None, 1.0,
                                       None, None, 0, 1.0, None, 0, 0, 0, 0, None, torch.float16, torch.float16,
                                       None, None, flat=True)
    assert why((1, 4, 32768, BIG // (4 * 32768) + 1)) == []
    assert any("65535" in w for w in why((65536, 1, 1, 1)))


# ---- one real case past 2^31 elements per kernel, on the GPU ----------------------------------------
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_sequence_past_2_31_elements(family, backend):
    """xg [T, B, G*H] of 2^31 + elements in bfloat16 (4.3 GB): the last steps and h_n against torch's
    own module in float32 on the same weights (cuDNN), at bfloat16's tolerance -- an offset computed in
    32 bits would read or write other rows there."""
    import seqgen_fast
    from seqgen_fast.nn import GRU, LSTM

    torch.manual_seed(0)
    gates = 4 if family == "lstm" else 3
    B, H, I = 64, 512, 8
    T = BIG // (B * gates * H) + 1
    theirs = (torch.nn.LSTM if family == "lstm" else torch.nn.GRU)(I, H, device="cuda")
    ours = (LSTM if family == "lstm" else GRU).from_torch(
        (torch.nn.LSTM if family == "lstm" else torch.nn.GRU)(I, H, device="cuda", dtype=torch.bfloat16))
    ours.load_state_dict({k: v.to(torch.bfloat16) for k, v in theirs.state_dict().items()})
    theirs.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in theirs.state_dict().items()})
    x = torch.randn(T, B, I, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), seqgen_fast.use_backend(backend):
        out, states = ours(x)
    with torch.no_grad():
        r_out, r_states = theirs(x.float())
    h_n = states[0] if isinstance(states, tuple) else states
    r_h = r_states[0] if isinstance(r_states, tuple) else r_states
    assert _rel(out[-8:], r_out[-8:]) < 3e-2 and _rel(h_n, r_h) < 3e-2
    assert _rel(out[:8], r_out[:8]) < 3e-2


@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_triton_step_kernels_form_x_row_offsets_in_64_bits(family):
    """The Triton step kernel (LSTMCell/GRUCell under no_grad, batches up to 8) compiled for sm_90
    (tests/support/aot.py): no 32-bit multiply takes the input size I, so x's row offsets b * I --
    past 2^31 from I = 2^28 at B = 8 -- are formed in 64 bits (before the fix: ``mul.lo.s32`` of I and
    the row). The h rows' b * H cannot pass 2^31 (W_hh [G*H, H] would hold 2^58 elements), nor can the
    epilogue's; test_gpu_cell_step_past_2_31_elements runs the large case itself."""
    from support.aot import compile_sm90, pointers

    module = f"seqgen_fast.kernels.{family}"
    kernels = importlib.import_module(module)
    block_b, block_h, block_k = kernels.step_config(8, 1024)
    consts = {"HAS_BIAS": True, "BLOCK_B": block_b, "BLOCK_H": block_h, "BLOCK_K": block_k}
    names = kernels._cell_step_kernel.arg_names
    ptx = compile_sm90(module, "_cell_step_kernel", types=pointers("bf16", *(n for n in names if n.endswith("_ptr"))),
                       constexprs=consts, aligned=("I", "H"))["ptx"]
    param = [n for n in names if n not in consts].index("I")
    reg = re.search(rf"ld\.param\.b32\s+(%r\d+), \[_cell_step_kernel_param_{param}\]", ptx).group(1)
    narrow = re.findall(rf"^\s*(?:mul|mad)\.lo\.s32\s[^;]*{re.escape(reg)}(?!\d)[^;]*;", ptx, re.MULTILINE)
    assert not narrow, f"32-bit products of I ({reg}): {narrow}"
    assert re.search(rf"mul\.wide\.s32\s[^;]*{re.escape(reg)}(?!\d)|cvt\.s64\.s32\s[^;]*{re.escape(reg)}(?!\d)", ptx), \
        "I should reach a 64-bit product"


def first(out):
    """A cell's h1: LSTMCell returns (h1, c1), GRUCell h1."""
    return out[0] if isinstance(out, tuple) else out


def _cell_fp32(family: str, xw, h, c, w_hh, b_ih, b_hh):
    """The cell's math in float32 from the input product ``xw`` = x W_ih^T (torch's gate order):
    LSTM (h1, c1), GRU h1."""
    rec = h.float() @ w_hh.float().t() + b_hh.float()
    if family == "lstm":
        i, f, g, o = (xw + b_ih.float() + rec).chunk(4, 1)
        c1 = torch.sigmoid(f) * c.float() + torch.sigmoid(i) * torch.tanh(g)
        return torch.sigmoid(o) * torch.tanh(c1), c1
    xr, xz, xn = (xw + b_ih.float()).chunk(3, 1)
    hr, hz, hn = rec.chunk(3, 1)
    r, z = torch.sigmoid(xr + hr), torch.sigmoid(xz + hz)
    n = torch.tanh(xn + r * hn)
    return ((1 - z) * n + z * h.float(),)


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
@pytest.mark.parametrize("B", [2, 8])  # cuda: the FFMA step below a batch of 8, tensor cores from 8
def test_gpu_cell_step_past_2_31_elements(family, backend, B):
    """The one-launch step on x [B, 2^31/B + 1] (past 2^31 elements; at B = 2 W_ih [G, I] too) in
    bfloat16 against the cell's math in float32 (the input product accumulated in chunks), at
    bfloat16's tolerance: the last row's tail lies past 2^31 elements, where a 32-bit offset would read
    other elements."""
    import seqgen_fast
    from seqgen_fast import functional as F

    torch.manual_seed(0)
    gates, H, I = (4 if family == "lstm" else 3), 1, BIG // B + 1
    bf = {"device": "cuda", "dtype": torch.bfloat16}
    x, w_ih = torch.randn(B, I, **bf), torch.randn(gates * H, I, **bf) * I ** -0.5
    w_hh, b_ih, b_hh = torch.randn(gates * H, H, **bf), torch.randn(gates * H, **bf), torch.randn(gates * H, **bf)
    h, c = torch.randn(B, H, **bf), torch.randn(B, H, **bf)
    assert x.numel() > BIG
    with torch.no_grad(), seqgen_fast.use_backend(backend):
        ours = (F.lstm_cell(x, (h, c), w_ih, w_hh, b_ih, b_hh) if family == "lstm"
                else (F.gru_cell(x, h, w_ih, w_hh, b_ih, b_hh),))
    chunk = 1 << 26
    xw = sum(x[:, k:k + chunk].float() @ w_ih[:, k:k + chunk].float().t() for k in range(0, I, chunk))
    for a, b in zip(ours, _cell_fp32(family, xw, h, c, w_hh, b_ih, b_hh)):
        assert _rel(a, b) < 3e-2


def _cells(family: str):
    """(seqgen_fast's cell in bfloat16, torch's in float32 on the same bfloat16-rounded weights), H 512, I 8."""
    from seqgen_fast.nn import GRUCell, LSTMCell

    torch.manual_seed(0)
    theirs_cls = torch.nn.LSTMCell if family == "lstm" else torch.nn.GRUCell
    theirs = theirs_cls(8, 512, device="cuda")
    ours = (LSTMCell if family == "lstm" else GRUCell).from_torch(theirs_cls(8, 512, device="cuda",
                                                                             dtype=torch.bfloat16))
    ours.load_state_dict({k: v.to(torch.bfloat16) for k, v in theirs.state_dict().items()})
    theirs.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in theirs.state_dict().items()})
    return ours, theirs


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["lstm", "gru"])
@pytest.mark.parametrize("backend", ["cuda", "triton"])
def test_gpu_cell_rows_past_2_31_elements(family, backend):
    """A cell module under no_grad over 2^31 / H + 1 rows, so that its states [B, H] pass 2^31 elements
    (and the gates [B, G*H] 2^33): cuda's one-launch step (tensor cores), or the GEMMs and Triton's
    pointwise cell; in bfloat16, its first and last rows against torch's own cell in float32 on the
    same weights (each row is independent: the reference runs on those rows only)."""
    import seqgen_fast

    ours, theirs = _cells(family)
    x = torch.randn(BIG // 512 + 1, 8, device="cuda", dtype=torch.bfloat16)
    with torch.no_grad(), seqgen_fast.use_backend(backend):
        got = first(ours(x))
    assert got.numel() > BIG
    with torch.no_grad():
        for rows in (slice(0, 4096), slice(-4096, None)):
            assert _rel(got[rows], first(theirs(x[rows].float()))) < 3e-2


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["lstm", "gru"])
def test_gpu_cell_training_rows_past_2_31_elements(family):
    """With gradients, over 2^31 / (G*H) + 1 rows: the one-step sequence on triton (the persistent
    kernels' plan declines a million rows), so the pointwise Triton cells forward (saving the
    activations) and backward run on gates [B, G*H] of 2^31 + elements; the input's gradient (first
    and last rows) and every parameter's against torch's float32 cell."""
    import seqgen_fast

    ours, theirs = _cells(family)
    gates = 4 if family == "lstm" else 3
    x = torch.randn(BIG // (gates * 512) + 1, 8, device="cuda", dtype=torch.bfloat16).requires_grad_()
    x32 = x.detach().float().requires_grad_()
    w = torch.randn(x.shape[0], 512, device="cuda")
    with seqgen_fast.use_backend("triton"):
        (first(ours(x)).float() * w).sum().backward()
    (first(theirs(x32)) * w).sum().backward()
    for rows in (slice(0, 4096), slice(-4096, None)):
        assert _rel(x.grad[rows], x32.grad[rows]) < 3e-2
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        assert _rel(p.grad, q.grad) < 3e-2, name


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_gpu_diffusion_step_past_2_31_elements(backend):
    """A DDIM step on a float16 sample of 2^31 + elements (4.3 GB per tensor) against the reference
    backend in float32: every position, the last ones included."""
    diffusers = pytest.importorskip("diffusers")
    from seqgen_fast.diffusion import fast_scheduler

    shape = (1, 4, 32768, BIG // (4 * 32768) + 1)
    x = torch.randn(shape, device="cuda", dtype=torch.float16)
    m = torch.randn(shape, device="cuda", dtype=torch.float16)
    ours = fast_scheduler(diffusers.DDIMScheduler(), backend=backend)
    ref = fast_scheduler(diffusers.DDIMScheduler(), backend="reference")
    for s in (ours, ref):
        s.set_timesteps(10)
    t = ours.timesteps[3]
    got = ours.step(m, t, x).prev_sample
    want = ref.step(m.float(), t, x.float()).prev_sample
    assert got.numel() > BIG
    assert _rel(got[..., -64:], want[..., -64:]) < 2e-3 and _rel(got[..., :64], want[..., :64]) < 2e-3
