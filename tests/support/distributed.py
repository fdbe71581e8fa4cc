"""torch.distributed on the CPU for the tests: gloo process groups on loopback, started by the test.

:func:`launch` runs ``fn(rank, world, out_dir, *args)`` in ``world`` spawned processes, each inside an
initialised gloo process group, and returns what each rank saved with :func:`save` (one file per
rank in a temporary directory). The models and the training loop every test shares are here too, so
the single-process reference and the distributed runs cannot drift apart.
"""
from __future__ import annotations

import os
import socket
import tempfile
import traceback
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world: int, port: int, out_dir: str, fn: Callable, args: tuple) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        fn(rank, world, out_dir, *args)
        dist.barrier()  # every rank's collectives done before the group goes (gloo aborts on a pending one)
    except Exception:  # the parent re-raises it with the rank's traceback
        Path(out_dir, f"error-{rank}.txt").write_text(traceback.format_exc())
        raise
    finally:
        dist.destroy_process_group()


def launch(fn: Callable, world: int, *args) -> list:
    """Run ``fn(rank, world, out_dir, *args)`` on ``world`` gloo ranks; each rank's saved result, by rank."""
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(_entry, args=(world, _free_port(), out_dir, fn, args), nprocs=world, join=True)
        except Exception as exc:
            errors = sorted(Path(out_dir).glob("error-*.txt"))
            raise AssertionError("\n".join(p.read_text() for p in errors) or str(exc)) from exc
        return [torch.load(Path(out_dir, f"rank-{r}.pt"), weights_only=False) for r in range(world)]


def save(out_dir: str, rank: int, result) -> None:
    torch.save(result, Path(out_dir, f"rank-{rank}.pt"))


# ----------------------------------------------------------------------------------------------
# The shared model, data and training loop
# ----------------------------------------------------------------------------------------------
VOCAB, EMBED, HIDDEN, HEADS, BATCH, SEQ, STEPS, LR = 29, 12, 16, 2, 4, 7, 3, 0.2


class TinyLM(torch.nn.Module):
    """Embedding -> torch.nn.LSTM -> torch.nn.GRU -> torch.nn.MultiheadAttention (self, causal) -> Linear;
    ``seqgen_fast.swap_modules`` replaces every recurrent and attention module a family replaces."""

    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, EMBED)
        self.lstm = torch.nn.LSTM(EMBED, HIDDEN, batch_first=True)
        self.gru = torch.nn.GRU(HIDDEN, HIDDEN, batch_first=True)
        self.attn = torch.nn.MultiheadAttention(HIDDEN, HEADS, batch_first=True)
        self.head = torch.nn.Linear(HIDDEN, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x, _ = self.lstm(self.embed(tokens))
        x, _ = self.gru(x)
        causal = torch.ones(tokens.shape[1], tokens.shape[1], dtype=torch.bool).triu(1)
        a, _ = self.attn(x, x, x, attn_mask=causal, need_weights=False)
        return self.head(x + a)


def tiny_lm(swapped: bool = True) -> torch.nn.Module:
    """The same float64 TinyLM on every rank (seed 0), swapped onto seqgen_fast when ``swapped``."""
    import seqgen_fast

    torch.manual_seed(0)
    model = TinyLM().double()
    return seqgen_fast.swap_modules(model) if swapped else model


def batch(step: int) -> torch.Tensor:
    """The (BATCH, SEQ + 1) token batch of ``step``: the same on every rank and in the reference."""
    g = torch.Generator().manual_seed(1000 + step)
    return torch.randint(0, VOCAB, (BATCH, SEQ + 1), generator=g)


def lm_loss(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    logits = model(tokens[:, :-1])
    return torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))


def train(model: torch.nn.Module, rows: slice = slice(None), reduce: bool = False) -> list[float]:
    """STEPS of SGD on ``rows`` of each batch; the losses (averaged over ranks when ``reduce``)."""
    opt = torch.optim.SGD(model.parameters(), lr=LR)
    losses = []
    for step in range(STEPS):
        opt.zero_grad()
        loss = lm_loss(model, batch(step)[rows])
        loss.backward()
        opt.step()
        value = loss.detach().clone()
        if reduce:
            dist.all_reduce(value)
            value /= dist.get_world_size()
        losses.append(value.item())
    return losses


def rank_rows(rank: int, world: int) -> slice:
    per = BATCH // world
    return slice(rank * per, (rank + 1) * per)
