"""Data-parallel training of a character LSTM language model on seqgen_fast, with torch's DDP.

Multi-GPU is torch's engine (``torch.distributed``); seqgen_fast's part is that the swapped
``nn.LSTM`` trains unchanged inside it. Each rank draws its own batches of
examples/data/harbour_book.txt; DDP averages the gradients, so the replicas stay identical (checked
at the end).

    torchrun --nproc-per-node 8 examples/train_lstm_ddp.py                 # one process per GPU (nccl)
    torchrun --nproc-per-node 2 examples/train_lstm_ddp.py --device cpu --steps 20   # gloo on the CPU
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel

import seqgen_fast

TEXT = Path(__file__).resolve().parent / "data" / "harbour_book.txt"


class CharLSTM(torch.nn.Module):
    """Embedding -> torch.nn.LSTM (batch_first) -> Linear to the character vocabulary."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 64)
        self.lstm = torch.nn.LSTM(64, hidden, layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.lstm(self.embed(tokens))[0])


def parse(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=32, help="sequences per rank and step")
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--lr", type=float, default=3e-3)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    cuda = args.device == "cuda"
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)

    text = TEXT.read_text(encoding="utf-8")
    chars = sorted(set(text))
    data = torch.tensor([chars.index(c) for c in text], dtype=torch.long)
    torch.manual_seed(0)  # the same initial weights on every rank (DDP also broadcasts rank 0's)
    model = seqgen_fast.swap_modules(CharLSTM(len(chars), args.hidden, args.layers)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if cuda else None)
    opt = torch.optim.Adam(ddp.parameters(), lr=args.lr)
    batches = torch.Generator().manual_seed(1 + rank)  # each rank its own batches

    start = time.perf_counter()
    for step in range(args.steps):
        starts = torch.randint(0, data.numel() - args.seq - 1, (args.batch,), generator=batches)
        window = torch.stack([data[s:s + args.seq + 1] for s in starts.tolist()]).to(device)
        logits = ddp(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, len(chars)), window[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % max(1, args.steps // 10) == 0 or step == args.steps - 1:
            mean = loss.detach().clone()
            dist.all_reduce(mean)
            if rank == 0:
                print(f"step {step:5d}  loss {mean.item() / world:.4f}", flush=True)
    elapsed = time.perf_counter() - start

    # every replica holds the same weights: DDP's gradient averaging kept them in step
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    spread = flat.clone()
    dist.all_reduce(spread, op=dist.ReduceOp.MAX)
    dist.all_reduce(flat, op=dist.ReduceOp.MIN)
    in_sync = bool(torch.equal(spread, flat))
    if rank == 0:
        tokens = world * args.batch * args.seq * args.steps
        print(f"{world} ranks on {args.device}: {args.steps} steps in {elapsed:.1f}s ({tokens / elapsed:.0f} tok/s)")
        print("replicas in sync" if in_sync else "REPLICAS DIFFER")
    # DDP's reducer holds the process group: free it while the group is still registered (its last
    # reference going later, from a destructor holding the GIL, can deadlock gloo's worker thread)
    del ddp, opt
    dist.barrier()  # every rank's collectives done before the group goes
    dist.destroy_process_group()
    return 0 if in_sync else 1


if __name__ == "__main__":
    raise SystemExit(main())
