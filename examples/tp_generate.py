"""Tensor-parallel greedy generation of a Llama-style decoder whose attention runs on seqgen_fast.

torch's DTensor tensor parallelism (``parallelize_module``) splits every layer over the ranks:
q/k/v and the MLP's gate/up projections column-wise (each rank holds some heads and some of the
MLP), o and down row-wise (one all-reduce each). Attention runs per rank on its own heads through
``seqgen_fast.functional.scaled_dot_product_attention`` (the prompt) and
``seqgen_fast.functional.decode_attention`` over a KV cache of the rank's heads (each new token).
Rank 0 also generates with the unsharded model and checks that the tokens are the same.

    torchrun --nproc-per-node 4 examples/tp_generate.py                  # nccl, one GPU per rank
    torchrun --nproc-per-node 2 examples/tp_generate.py --device cpu --tokens 8   # gloo on the CPU
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

from seqgen_fast.functional import decode_attention, scaled_dot_product_attention


class Layer(torch.nn.Module):
    """Pre-norm attention (GQA, causal, a KV cache) and a SwiGLU MLP; the head counts it uses are the
    local ones, read off the projections' widths, so the same code runs sharded and unsharded."""

    def __init__(self, dim: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.head_dim = dim // heads
        self.attn_norm, self.mlp_norm = torch.nn.RMSNorm(dim), torch.nn.RMSNorm(dim)
        self.q_proj = torch.nn.Linear(dim, heads * self.head_dim, bias=False)
        self.k_proj = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.v_proj = torch.nn.Linear(dim, kv_heads * self.head_dim, bias=False)
        self.o_proj = torch.nn.Linear(heads * self.head_dim, dim, bias=False)
        self.gate_proj = torch.nn.Linear(dim, ffn, bias=False)
        self.up_proj = torch.nn.Linear(dim, ffn, bias=False)
        self.down_proj = torch.nn.Linear(ffn, dim, bias=False)

    def forward(self, x: torch.Tensor, cache: dict, pos: int) -> torch.Tensor:
        B, L, _ = x.shape
        h = self.attn_norm(x)
        q, k, v = (p(h).view(B, L, -1, self.head_dim) for p in (self.q_proj, self.k_proj, self.v_proj))
        if "k" not in cache:  # (B, S_max, local kv heads, D), filled as tokens arrive
            cache["k"] = k.new_zeros(B, cache["max_len"], k.shape[2], self.head_dim)
            cache["v"] = torch.zeros_like(cache["k"])
        if L > 1:  # the prompt: causal attention over itself, then into the cache
            cache["k"][:, pos:pos + L], cache["v"][:, pos:pos + L] = k, v
            a = scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             is_causal=True, enable_gqa=True).transpose(1, 2)
        else:  # one new token: appended to the cache and attended with everything before it
            lens = torch.full((B,), pos, dtype=torch.int32, device=x.device)
            a = decode_attention(q[:, 0], cache["k"], cache["v"], lens, k_new=k[:, 0], v_new=v[:, 0])[:, None]
        x = x + self.o_proj(a.reshape(B, L, -1))
        h = self.mlp_norm(x)
        return x + self.down_proj(torch.nn.functional.silu(self.gate_proj(h)) * self.up_proj(h))


class Decoder(torch.nn.Module):
    def __init__(self, vocab: int, dim: int, layers: int, heads: int, kv_heads: int, ffn: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, dim)
        self.layers = torch.nn.ModuleList(Layer(dim, heads, kv_heads, ffn) for _ in range(layers))
        self.norm = torch.nn.RMSNorm(dim)
        self.head = torch.nn.Linear(dim, vocab, bias=False)

    @torch.no_grad()
    def generate(self, prompt: torch.Tensor, tokens: int) -> torch.Tensor:
        caches = [{"max_len": prompt.shape[1] + tokens} for _ in self.layers]
        out, x, pos = [], prompt, 0
        for _ in range(tokens):
            h = self.embed(x)
            for layer, cache in zip(self.layers, caches):
                h = layer(h, cache, pos)
            pos += x.shape[1]
            x = self.head(self.norm(h[:, -1:])).argmax(-1)  # greedy
            out.append(x)
        return torch.cat(out, 1)


def tensor_parallel(model: Decoder, mesh) -> Decoder:
    plan = {"q_proj": ColwiseParallel(), "k_proj": ColwiseParallel(), "v_proj": ColwiseParallel(),
            "o_proj": RowwiseParallel(), "gate_proj": ColwiseParallel(), "up_proj": ColwiseParallel(),
            "down_proj": RowwiseParallel()}
    for layer in model.layers:
        parallelize_module(layer, mesh, plan)
    return model


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (GPU default)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--dim", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--ffn", type=int, default=2816)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--tokens", type=int, default=32)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    if args.heads % world or args.kv_heads % world:
        raise SystemExit(f"--heads {args.heads} and --kv-heads {args.kv_heads} must divide by the {world} ranks")
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, args.dtype) if args.dtype else (torch.bfloat16 if cuda else torch.float32)

    def build() -> Decoder:
        torch.manual_seed(0)  # the same weights everywhere: each rank keeps its shard
        return Decoder(args.vocab, args.dim, args.layers, args.heads, args.kv_heads, args.ffn).to(device, dtype)

    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), generator=torch.Generator().manual_seed(1))
    prompt = prompt.to(device)
    mesh = init_device_mesh(device.type, (world,))
    sharded = tensor_parallel(build(), mesh)
    tokens = sharded.generate(prompt, args.tokens)
    same = True
    if rank == 0:
        same = torch.equal(tokens, build().generate(prompt, args.tokens))
        print(f"{world} ranks on {args.device} ({str(dtype).removeprefix('torch.')}): generated {tuple(tokens.shape)}")
        print("tokens match the unsharded model" if same else "TOKENS DIFFER FROM THE UNSHARDED MODEL")
    # the DTensor model and the mesh hold the group: drop them first, so that no destructor at interpreter
    # exit meets a destroyed gloo group (seen once in CI: a gloo thread left joinable, std::terminate)
    del sharded, mesh
    dist.barrier()  # every rank's collectives done (rank 0 also ran the unsharded model) before the group goes
    dist.destroy_process_group()
    return 0 if same else 1


if __name__ == "__main__":
    raise SystemExit(main())
