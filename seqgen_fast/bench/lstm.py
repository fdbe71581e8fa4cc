"""LSTM benchmarks: seqgen_fast against cuDNN's nn.LSTM and an nn.LSTMCell step, in one run.

Sequences (anchor "cudnn", the torch.nn.LSTM module on CUDA): the anchor shapes of
benchmarks/anchors/h100-2026-11-23.md, input_size = hidden_size, forward under torch.no_grad
(ours then saves nothing for backward) and forward+backward (output.backward of a fixed gradient,
weight gradients included). Both providers share the same weights (``LSTM.from_torch``).
FLOPs of the forward: 2 * T * B * 4H * (I + H) per layer (the W_hr-free LSTM); forward+backward
counts 3x that. ``per_step = T`` gives the time per recurrence step.

Generation (one step of B sequences, torch.no_grad): ours (LSTMCell: one fused launch on the cuda
backend), "lstmcell-loop" (torch.nn.LSTMCell, the anchor: what a generation loop calls), and
"cudnn" (torch.nn.LSTM on one step); eagerly, and replayed from a captured CUDA graph.

The inputs are not rotated: a sequence's x is re-read once per call and W_hh dominates the
traffic, which is what the kernels are built to keep on chip.
"""
from __future__ import annotations

import torch

from . import Case

# (batch, hidden, seq_len, layers) of the anchors
SEQ_SHAPES = [(1, 512, 256, 1), (1, 1024, 256, 1), (16, 512, 512, 1), (64, 1024, 512, 1), (256, 256, 256, 1),
              (64, 1024, 512, 2)]
GEN_SHAPES = [(1, 512), (1, 1024), (32, 1024)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _seq_case(B: int, H: int, T: int, L: int, dtype: torch.dtype, backward: bool, device: str = "cuda") -> Case:
    def setup():
        from seqgen_fast.nn import LSTM

        cudnn = torch.nn.LSTM(H, H, num_layers=L, device=device, dtype=dtype)
        ours = LSTM.from_torch(cudnn)
        x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=backward)
        grad = torch.randn(T, B, H, device=device, dtype=dtype)

        def runner(m):
            if backward:
                return lambda: m(x)[0].backward(grad)

            def fwd():
                with torch.no_grad():
                    return m(x)
            return fwd

        return {"ours": runner(ours), "cudnn": runner(cudnn)}

    flops = 2.0 * T * B * 4 * H * (H + H) * L * (3 if backward else 1)
    op = f"lstm {'fwd+bwd' if backward else 'fwd'} L{L}"
    return Case("lstm", op, f"B{B} H{H} T{T}", dtype, setup, anchor="cudnn", flops=flops, per_step=T, device=device)


def _gen_case(B: int, H: int, dtype: torch.dtype, graph: bool) -> Case:
    def setup():
        from seqgen_fast.nn import LSTMCell

        cell = torch.nn.LSTMCell(H, H, device="cuda", dtype=dtype)
        ours = LSTMCell.from_torch(cell)
        seq = torch.nn.LSTM(H, H, device="cuda", dtype=dtype)
        x = torch.randn(B, H, device="cuda", dtype=dtype)
        h, c = torch.randn(B, H, device="cuda", dtype=dtype), torch.randn(B, H, device="cuda", dtype=dtype)
        hx3 = (h.unsqueeze(0), c.unsqueeze(0))

        def step(fn):
            def run():
                with torch.no_grad():
                    return fn()
            return run

        return {"ours": step(lambda: ours(x, (h, c))), "lstmcell-loop": step(lambda: cell(x, (h, c))),
                "cudnn": step(lambda: seq(x.unsqueeze(0), hx3))}

    flops = 2.0 * B * 4 * H * (H + H)
    op = "lstm generation step" + (" (CUDA graph)" if graph else "")
    return Case("lstm", op, f"B{B} H{H}", dtype, setup, anchor="lstmcell-loop", flops=flops, cuda_graph=graph)


def cases(mode: str, device: str = "cuda"):
    if mode == "headline":  # cuDNN's persistent tensor-core case: the shape the FFMA product loses
        yield _seq_case(64, 1024, 512, 1, torch.float16, backward=False)
        return
    if mode == "tiny":
        yield _seq_case(2, 16, 5, 1, torch.float32, backward=False, device=device)
        return
    if mode == "quick":
        yield _seq_case(1, 512, 256, 1, torch.float16, backward=False)
        yield _seq_case(64, 1024, 512, 1, torch.bfloat16, backward=False)
        yield _seq_case(16, 512, 512, 1, torch.float32, backward=True)
        yield _gen_case(1, 1024, torch.float16, graph=False)
        yield _gen_case(1, 1024, torch.float16, graph=True)
        return
    for dtype in DTYPES:
        for B, H, T, L in SEQ_SHAPES:
            for backward in (False, True):
                yield _seq_case(B, H, T, L, dtype, backward)
        for B, H in GEN_SHAPES:
            for graph in (False, True):
                yield _gen_case(B, H, dtype, graph)
