"""Character-level LSTM text generator, swapped onto seqgen_fast.

Trains a small character LSTM briefly on examples/data/harbour_book.txt (plain PyTorch, cuDNN on a
GPU), then compares the same weights in two runs:

* plain torch: ``torch.nn.LSTM`` and a plain-PyTorch sampler (softmax, top-k, ``torch.multinomial``);
* seqgen_fast: ``seqgen_fast.swap_modules(model)`` (``nn.LSTM`` -> ``seqgen_fast.nn.LSTM``, same
  parameters) and ``seqgen_fast.functional.sample_tokens``.

Compared: a teacher-forced forward over batches of text (largest |logit difference|), greedy
generation (the same text is expected; a near-tie may make it diverge late) and sampled generation
with temperature and top-k (random, so only the speed is compared).

    python examples/char_lstm.py                    # GPU when available
    python examples/char_lstm.py --device cpu --steps 50 --tokens 100
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, base_parser, device_of, print_table, progress, synchronize, timed  # noqa: E402

import seqgen_fast  # noqa: E402
from seqgen_fast.functional import sample_tokens  # noqa: E402
from seqgen_fast.reference.sampling import sample_tokens as plain_sample_tokens  # noqa: E402

TEXT = Path(__file__).resolve().parent / "data" / "harbour_book.txt"
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest |fast - plain| logit difference allowed, relative to max(1, max |logit|): fp32 allows
# Triton's tf32 dot products; half precisions their rounding, accumulated over the recurrence.
RTOL = {torch.float32: 5e-3, torch.float16: 2e-2, torch.bfloat16: 6e-2}


class CharLSTM(torch.nn.Module):
    """Embedding -> torch.nn.LSTM (batch_first) -> Linear to the character vocabulary."""

    def __init__(self, vocab: int, hidden: int, layers: int):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, 64)
        self.lstm = torch.nn.LSTM(64, hidden, layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, vocab)

    def forward(self, tokens: torch.Tensor, state=None):
        out, state = self.lstm(self.embed(tokens), state)
        return self.head(out), state


def train(model: CharLSTM, data: torch.Tensor, steps: int, batch: int, seq: int, quiet: bool) -> float:
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    loss = torch.tensor(float("nan"))
    bar = progress(range(steps), "training", disable=quiet)
    for _ in bar:
        starts = torch.randint(0, data.numel() - seq - 1, (batch,))
        window = torch.stack([data[s:s + seq + 1] for s in starts.tolist()]).to(next(model.parameters()).device)
        logits, _ = model(window[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), window[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if hasattr(bar, "set_postfix"):
            bar.set_postfix(loss=f"{loss.item():.3f}")
    return loss.item()


@torch.no_grad()
def generate(model: CharLSTM, prompt: torch.Tensor, n: int, sampler, quiet: bool, desc: str) -> torch.Tensor:
    """Feed ``prompt`` (1, P), then ``n`` characters one at a time with the LSTM state carried over."""
    logits, state = model(prompt)
    token = sampler(logits[:, -1])
    out = [token]
    for _ in progress(range(n - 1), desc, disable=quiet):
        logits, state = model(token[:, None], state)
        token = sampler(logits[:, -1])
        out.append(token)
    return torch.stack(out, 1)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="training steps (default 300 on a GPU, 60 on the CPU)")
    parser.add_argument("--tokens", type=int, default=400, help="characters generated per run")
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--batch", type=int, default=8, help="rows of the teacher-forced forward")
    parser.add_argument("--seq", type=int, default=256, help="characters per row of the teacher-forced forward")
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=20)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="inference dtype")
    args = parser.parse_args(argv)
    device = device_of(args)
    dtype = DTYPES[args.dtype]
    steps = args.steps if args.steps is not None else (300 if device.type == "cuda" else 60)
    quiet = args.no_progress
    torch.manual_seed(args.seed)

    text = TEXT.read_text()
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    data = torch.tensor([index[c] for c in text], dtype=torch.long)
    decode = lambda ids: "".join(chars[i] for i in ids.tolist())  # noqa: E731

    model = CharLSTM(len(chars), args.hidden, args.layers).to(device)
    loss = train(model, data, steps, batch=32, seq=128, quiet=quiet)
    print(f"trained {steps} steps on {len(text)} characters ({len(chars)} symbols): loss {loss:.3f}")

    plain = model.to(dtype).eval()
    fast = seqgen_fast.swap_modules(copy.deepcopy(plain))
    assert isinstance(fast.lstm, seqgen_fast.nn.LSTM)

    # Teacher-forced forward over text windows: the numerical comparison.
    starts = torch.linspace(0, data.numel() - args.seq - 1, args.batch).long().tolist()
    windows = torch.stack([data[s:s + args.seq] for s in starts]).to(device)
    with torch.no_grad():
        t_plain, ref = timed(lambda: plain(windows)[0], device, args.repeats)
        t_fast, out = timed(lambda: fast(windows)[0], device, args.repeats)
    forward_diff = (out.float() - ref.float()).abs().max().item()
    tol = RTOL[dtype] * max(1.0, ref.float().abs().max().item())
    rows = [Row(f"forward {args.batch}x{args.seq} chars", t_plain, t_fast, args.batch * args.seq, "tok",
                forward_diff, tol)]

    prompt = torch.tensor([[index[c] for c in "The keeper "]], device=device)
    n = args.tokens

    def greedy(m, sampler):
        return lambda: generate(m, prompt, n, sampler, quiet, "greedy")

    t_plain, g_plain = timed(greedy(plain, lambda x: plain_sample_tokens(x, temperature=0)), device, args.repeats)
    t_fast, g_fast = timed(greedy(fast, lambda x: sample_tokens(x, temperature=0)), device, args.repeats)
    same = (g_plain == g_fast).all(0)
    diverge = n if bool(same.all()) else int((~same).nonzero()[0])
    rows.append(Row(f"generate {n} chars, greedy", t_plain, t_fast, n, "tok", None, None))

    kw = dict(temperature=args.temperature, top_k=args.top_k)
    gen_plain = torch.Generator(device=device).manual_seed(args.seed)
    gen_fast = torch.Generator(device=device).manual_seed(args.seed)
    plain_sampler = lambda x: plain_sample_tokens(x, generator=gen_plain, **kw)  # noqa: E731
    fast_sampler = lambda x: sample_tokens(x, generator=gen_fast, errors="mark", **kw)[0]  # no host sync  # noqa: E731
    t_plain, s_plain = timed(lambda: generate(plain, prompt, n, plain_sampler, quiet, "sampling"), device, args.repeats)
    t_fast, s_fast = timed(lambda: generate(fast, prompt, n, fast_sampler, quiet, "sampling"), device, args.repeats)
    rows.append(Row(f"generate {n} chars, T={args.temperature} k={args.top_k}", t_plain, t_fast, n, "tok", None, None))
    synchronize(device)

    print(f"\ngreedy, plain torch : The keeper {decode(g_plain[0])[:200]!r}")
    print(f"greedy, seqgen_fast : The keeper {decode(g_fast[0])[:200]!r}")
    print("greedy texts identical" if diverge == n else
          f"greedy texts diverge at character {diverge} of {n} (a near-tie in the logits flips one choice)")
    print(f"sampled, plain torch : The keeper {decode(s_plain[0])[:200]!r}")
    print(f"sampled, seqgen_fast : The keeper {decode(s_fast[0])[:200]!r}")
    ok = print_table(f"char-LSTM {args.layers}x{args.hidden} ({args.dtype})", rows, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
