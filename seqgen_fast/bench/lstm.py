"""LSTM benchmarks: seqgen_fast against cuDNN's nn.LSTM and nn.LSTMCell loops, in one run.

Sequences (anchor "cudnn", the torch.nn.LSTM module on CUDA): the anchor shapes of
benchmarks/anchors/h100-2026-11-23.md (B1 H512/H1024 T256, B16 H512 T512, B64 H1024 T512, B256 H256
T256, two layers) plus a bidirectional layer, input_size = hidden_size, in float32 with TF32 on
(cuDNN's default, ``torch.backends.cudnn.allow_tf32``, under which nn.LSTM also runs its own GEMMs on
TF32: both that flag and ``torch.backends.cuda.matmul.allow_tf32``, which our cuBLAS GEMMs follow,
are set) and off (exact fp32: both flags off), float16 and bfloat16;
forward under torch.no_grad (ours then saves nothing for backward) and forward+backward
(output.backward of a fixed gradient, weight gradients included). Providers: "ours"
(seqgen_fast.nn.LSTM), "cudnn" (the same weights: ``LSTM.from_torch``), "lstmcell-loop" (a Python
loop of torch.nn.LSTMCell over the steps, one layer, what a hand-written recurrence runs) and
"lstmcell-graph" (that loop captured once in a CUDA graph and replayed). FLOPs of the forward:
2 * T * B * 4H * (I + H) per layer and direction; forward+backward counts 3x that. ``per_step = T``
gives the time per recurrence step; the runner reports each provider's peak memory beside its time.

Generation (one step of B sequences, torch.no_grad): ours (LSTMCell: one fused launch on the cuda
backend), "lstmcell-loop" (torch.nn.LSTMCell, the anchor: what a generation loop calls), and
"cudnn" (torch.nn.LSTM on one step); eagerly, and replayed from a captured CUDA graph.

The inputs are not rotated: a sequence's x is re-read once per call and W_hh dominates the
traffic, which is what the kernels are built to keep on chip.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch

from . import Case

# (batch, hidden, seq_len, layers) of the anchors (bench.gru runs them too), and of a bidirectional layer
SEQ_SHAPES = [(1, 512, 256, 1), (1, 1024, 256, 1), (16, 512, 512, 1), (64, 1024, 512, 1), (256, 256, 256, 1),
              (64, 1024, 512, 2)]
BIDIRECTIONAL_SHAPES = [(16, 512, 512, 1)]
GEN_SHAPES = [(1, 512), (1, 1024), (32, 1024)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# (dtype, TF32 for float32): cuDNN's default float32 (TF32 tensor cores), exact float32, the half types
PRECISIONS = [(torch.float32, True), (torch.float32, False), (torch.float16, True), (torch.bfloat16, True)]


@contextlib.contextmanager
def _tf32(enabled: bool):
    """TF32 on or off for the block, everywhere: torch.backends.cudnn.allow_tf32 (what nn.LSTM, its own
    GEMMs included, and our persistent kernels follow) and torch.backends.cuda.matmul.allow_tf32 (what
    our input-projection and weight-gradient GEMMs, cuBLAS through torch, follow)."""
    before = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = before


def _precision(dtype: torch.dtype, tf32: bool) -> str:
    return "" if dtype != torch.float32 else (" tf32" if tf32 else " exact-fp32")


def _cell_loop(cell: torch.nn.LSTMCell, x: torch.Tensor, H: int) -> Callable[[], torch.Tensor]:
    """One layer's recurrence as a Python loop of nn.LSTMCell over x [T, B, I]: the stacked h_t."""
    B = x.shape[1]

    def run():
        h = c = x.new_zeros(B, H)
        hs = []
        for t in range(x.shape[0]):
            h, c = cell(x[t], (h, c))
            hs.append(h)
        return torch.stack(hs)
    return run


def _graphed(fn: Callable[[], object], device: str) -> Callable[[], None]:
    """Replays of ``fn`` captured in a CUDA graph (after a warm-up on a side stream) at the first call:
    a capture that fails is that provider's row note, not the case's."""
    graph: list[torch.cuda.CUDAGraph] = []

    def replay():
        if not graph:
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):
                fn()
                graph.append(torch.cuda.CUDAGraph())
                with torch.cuda.graph(graph[0], stream=stream):
                    fn()
            torch.cuda.current_stream(device).wait_stream(stream)
        graph[0].replay()
    return replay


def _seq_case(B: int, H: int, T: int, L: int, dtype: torch.dtype, tf32: bool, backward: bool,
              bidirectional: bool = False, device: str = "cuda") -> Case:
    def setup():
        from seqgen_fast.nn import LSTM

        cudnn = torch.nn.LSTM(H, H, num_layers=L, bidirectional=bidirectional, device=device, dtype=dtype)
        ours = LSTM.from_torch(cudnn)
        x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=backward)
        D = 2 if bidirectional else 1
        grad = torch.randn(T, B, D * H, device=device, dtype=dtype)

        def runner(fn, out_grad):
            def run():
                with _tf32(tf32):
                    if backward:
                        fn().backward(out_grad)
                        return None
                    with torch.no_grad():
                        return fn()
            return run

        fns = {"ours": runner(lambda: ours(x)[0], grad), "cudnn": runner(lambda: cudnn(x)[0], grad)}
        if L == 1 and not bidirectional:
            cell = torch.nn.LSTMCell(H, H, device=device, dtype=dtype)
            loop = runner(_cell_loop(cell, x, H), grad)
            fns["lstmcell-loop"] = loop
            if device == "cuda":
                fns["lstmcell-graph"] = _graphed(loop, device)
        return fns

    flops = 2.0 * T * B * 4 * H * (H + H) * L * (2 if bidirectional else 1) * (3 if backward else 1)
    op = (f"lstm {'fwd+bwd' if backward else 'fwd'} L{L}{' bidir' if bidirectional else ''}"
          f"{_precision(dtype, tf32)}")
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
    if mode == "headline":  # cuDNN's persistent tensor-core case
        yield _seq_case(64, 1024, 512, 1, torch.float16, True, backward=False)
        return
    if mode == "tiny":
        yield _seq_case(2, 16, 5, 1, torch.float32, True, backward=False, device=device)
        return
    if mode == "quick":
        yield _seq_case(1, 512, 256, 1, torch.float16, True, backward=False)
        yield _seq_case(64, 1024, 512, 1, torch.bfloat16, True, backward=False)
        yield _seq_case(16, 512, 512, 1, torch.float32, True, backward=True)
        yield _gen_case(1, 1024, torch.float16, graph=False)
        yield _gen_case(1, 1024, torch.float16, graph=True)
        return
    for dtype, tf32 in PRECISIONS:
        for shape, bidirectional in [(s, False) for s in SEQ_SHAPES] + [(s, True) for s in BIDIRECTIONAL_SHAPES]:
            for backward in (False, True):
                yield _seq_case(*shape, dtype, tf32, backward, bidirectional)
    for dtype, _ in PRECISIONS[1:]:
        for B, H in GEN_SHAPES:
            for graph in (False, True):
                yield _gen_case(B, H, dtype, graph)
