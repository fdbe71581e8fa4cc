"""Sizes past 2^31 elements (and 2^31 bytes) for the recurrent and diffusion kernels.

Every kernel of these families addresses with 64-bit offsets (csrc/recurrence.cuh: rows t*B + b and
their products with H / G*H in int64_t, weights (g*H + j)*K in int64_t; csrc/diffusion.cu: int64
sample sizes and bases; the Triton kernels: program rows and chunk starts cast to int64), so none
declines a tensor for its size; what they decline is said before launch: the recurrent kernels a
hidden size whose W_hh does not fit on chip (the plan's reason), the diffusion kernels a batch past
65535 (the grid's axis 1). The CPU tests assert those plans without allocating; the -m gpu tests run
one real case past 2^31 elements per kernel against the reference.
"""
from __future__ import annotations

import pytest
import torch

from seqgen_fast import _ext
from seqgen_fast.kernels import gru_cuda, lstm_cuda

H100 = {"multiprocessor_count": 132, "shared_memory_per_block_optin": 232448}
BIG = 2 ** 31


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


@pytest.mark.skipif(_ext.C is None, reason="seqgen_fast._C is not built")
def test_diffusion_cuda_plan_past_2_31_elements_and_its_batch_limit(monkeypatch):
    """The cuda twin's checks on meta tensors (nothing allocated; the device check is stubbed, the rest
    of ``supports`` is the real shape logic): a sample of 2^31 + elements is taken, a batch past the
    grid's axis 1 is declined with that reason."""
    from seqgen_fast.kernels import diffusion_cuda

    class AnyDevice:
        def reasons(self, *tensors):
            return []
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
