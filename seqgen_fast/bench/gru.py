"""GRU benchmarks: seqgen_fast against cuDNN's nn.GRU and an nn.GRUCell loop, in one run.

Sequences (anchor "cudnn", the torch.nn.GRU module on CUDA) on the LSTM's anchor shapes
(``bench.lstm.SEQ_SHAPES``), input_size = hidden_size, in the LSTM benchmark's precisions
(``bench.lstm.PRECISIONS``: float32 with TF32 on -- cuDNN's default, both TF32 flags set -- and off,
float16, bfloat16), forward under torch.no_grad (ours then saves nothing for backward) and
forward+backward (output.backward of a fixed gradient, weight gradients included). Providers:
"ours" (``GRU.from_torch``: the same Parameters; automatic dispatch runs each layer on the cuda
backend's persistent kernels wherever they take the shape, the triton path elsewhere), "cudnn", and
"grucell-loop" (one torch.nn.GRUCell per layer on the same Parameters, stepped in a Python loop:
what a hand-written recurrence runs). FLOPs of the forward: 2 * T * B * 3H * (I + H) per layer;
forward+backward counts 3x that. ``per_step = T`` gives the time per recurrence step.

Generation (one step of B sequences, torch.no_grad, ``bench.lstm.GEN_SHAPES``): ours (GRUCell: one
fused launch of the cuda backend's step kernel), "grucell-loop" (torch.nn.GRUCell, the anchor: what
a generation loop calls) and "cudnn" (torch.nn.GRU on one step); eagerly, and replayed from a
captured CUDA graph.

The inputs are not rotated: a sequence's x is re-read once per call and W_hh dominates the traffic.
"""
from __future__ import annotations

from itertools import product

import torch

from . import Case
from .lstm import GEN_SHAPES, PRECISIONS, SEQ_SHAPES, _precision, _tf32


def _cell_loop(m: torch.nn.GRU):
    """fn(x [T, B, I]) -> output [T, B, H]: an eager loop of nn.GRUCell steps, one cell per layer
    holding ``m``'s Parameters of that layer (unidirectional ``m``)."""
    cells = []
    for layer in range(m.num_layers):
        cell = torch.nn.GRUCell(m.input_size if layer == 0 else m.hidden_size, m.hidden_size, bias=m.bias,
                                device="meta")
        for name in ("weight_ih", "weight_hh") + (("bias_ih", "bias_hh") if m.bias else ()):
            setattr(cell, name, getattr(m, f"{name}_l{layer}"))
        cells.append(cell)

    def run(x):
        for cell in cells:
            h = x.new_zeros(x.shape[1], m.hidden_size)
            outs = []
            for x_t in x:
                h = cell(x_t, h)
                outs.append(h)
            x = torch.stack(outs)
        return x

    return run


def _seq_case(B: int, H: int, T: int, L: int, dtype: torch.dtype, tf32: bool, backward: bool,
              device: str = "cuda") -> Case:
    def setup():
        from seqgen_fast.nn import GRU

        cudnn = torch.nn.GRU(H, H, num_layers=L, device=device, dtype=dtype)
        ours = GRU.from_torch(cudnn)
        loop = _cell_loop(cudnn)
        x = torch.randn(T, B, H, device=device, dtype=dtype, requires_grad=backward)
        grad = torch.randn(T, B, H, device=device, dtype=dtype)

        def runner(fn):
            def run():
                with _tf32(tf32):
                    if backward:
                        fn(x).backward(grad)
                        return None
                    with torch.no_grad():
                        return fn(x)
            return run

        return {"ours": runner(lambda v: ours(v)[0]), "cudnn": runner(lambda v: cudnn(v)[0]),
                "grucell-loop": runner(loop)}

    flops = 2.0 * T * B * 3 * H * (H + H) * L * (3 if backward else 1)
    op = f"gru {'fwd+bwd' if backward else 'fwd'} L{L}{_precision(dtype, tf32)}"
    return Case("gru", op, f"B{B} H{H} T{T}", dtype, setup, anchor="cudnn", flops=flops, per_step=T, device=device)


def _gen_case(B: int, H: int, dtype: torch.dtype, graph: bool) -> Case:
    def setup():
        from seqgen_fast.nn import GRUCell

        cell = torch.nn.GRUCell(H, H, device="cuda", dtype=dtype)
        ours = GRUCell.from_torch(cell)
        seq = torch.nn.GRU(H, H, device="cuda", dtype=dtype)
        x, h = torch.randn(B, H, device="cuda", dtype=dtype), torch.randn(B, H, device="cuda", dtype=dtype)

        def step(fn):
            def run():
                with torch.no_grad():
                    return fn()
            return run

        return {"ours": step(lambda: ours(x, h)), "grucell-loop": step(lambda: cell(x, h)),
                "cudnn": step(lambda: seq(x.unsqueeze(0), h.unsqueeze(0)))}

    flops = 2.0 * B * 3 * H * (H + H)
    op = "gru generation step" + (" (CUDA graph)" if graph else "")
    return Case("gru", op, f"B{B} H{H}", dtype, setup, anchor="grucell-loop", flops=flops, cuda_graph=graph)


def cases(mode: str, device: str = "cuda"):
    if mode == "headline":  # batch 1 in bf16: cuDNN's standard path, the largest target (8x)
        yield _seq_case(1, 1024, 256, 1, torch.bfloat16, True, backward=False)
    elif mode == "tiny":
        yield _seq_case(2, 16, 5, 1, torch.float32, True, backward=False, device=device)
    elif mode == "quick":  # the headline, cuDNN's fp16 persistent shape, a backward, the generation step
        yield _seq_case(1, 1024, 256, 1, torch.bfloat16, True, backward=False)
        yield _seq_case(64, 1024, 512, 1, torch.float16, True, backward=False)
        yield _seq_case(16, 512, 512, 1, torch.bfloat16, True, backward=True)
        yield from (_gen_case(1, 1024, torch.float16, graph) for graph in (False, True))
    else:
        for (dtype, tf32), shape, backward in product(PRECISIONS, SEQ_SHAPES, (False, True)):
            yield _seq_case(*shape, dtype, tf32, backward)
        for (dtype, _), (B, H), graph in product(PRECISIONS[1:], GEN_SHAPES, (False, True)):
            yield _gen_case(B, H, dtype, graph)
