"""Llama-style transformer decoding with attn_implementation="seqgen_fast".

A transformers ``LlamaForCausalLM`` built from a config with random weights (no download), run
twice with the same weights:

* plain torch: ``attn_implementation="sdpa"`` and a plain-PyTorch sampler (softmax, top-k,
  sort + cumsum for top-p, ``torch.multinomial``: the convention of transformers' warpers);
* seqgen_fast: ``seqgen_fast.integrations.transformers.register()`` then
  ``attn_implementation="seqgen_fast"`` (flash attention for the prompt, split-KV decode over the
  KV cache for each new token) and ``seqgen_fast.functional.sample_tokens``.

Compared: the prefill (prompt) logits, greedy ``model.generate`` with a KV cache (the same tokens
are expected; random weights give near-ties, so a late divergence can happen), and sampling in a
manual loop over ``past_key_values`` (random, so only the speed is compared).

    python examples/llama_generate.py               # GPU when available
    python examples/llama_generate.py --device cpu --prompt 32 --tokens 16
"""
from __future__ import annotations

import copy
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import Row, base_parser, device_of, print_table, progress, timed  # noqa: E402

from seqgen_fast.functional import sample_tokens  # noqa: E402
from seqgen_fast.integrations import transformers as sf_transformers  # noqa: E402
from seqgen_fast.reference.sampling import sample_tokens as plain_sample_tokens  # noqa: E402

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# Largest |fast - plain| logit difference allowed, relative to max(1, max |logit|) (per dtype: the
# attention outputs differ by their rounding, carried through the layers).
RTOL = {torch.float32: 2e-3, torch.float16: 2e-2, torch.bfloat16: 5e-2}


def build(args, dtype: torch.dtype, device: torch.device):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.hidden * 8 // 3,
                         num_hidden_layers=args.layers, num_attention_heads=args.heads,
                         num_key_value_heads=args.kv_heads, max_position_embeddings=args.prompt + args.tokens + 8,
                         attn_implementation="sdpa")
    torch.manual_seed(args.seed)
    plain = LlamaForCausalLM(config).to(device=device, dtype=dtype).eval()
    sf_transformers.register()
    fast = copy.deepcopy(plain)
    fast.set_attn_implementation("seqgen_fast")
    return plain, fast


@torch.no_grad()
def sample_loop(model, prompt: torch.Tensor, n: int, sampler, quiet: bool) -> torch.Tensor:
    """Prefill ``prompt`` (B, P), then ``n`` tokens one at a time over the model's KV cache."""
    out = model(prompt, use_cache=True)
    token = sampler(out.logits[:, -1])
    tokens = [token]
    for _ in progress(range(n - 1), "sampling", disable=quiet):
        out = model(token[:, None], past_key_values=out.past_key_values, use_cache=True)
        token = sampler(out.logits[:, -1])
        tokens.append(token)
    return torch.stack(tokens, 1)


@torch.no_grad()
def greedy(model, prompt: torch.Tensor, n: int):
    """model.generate with a KV cache, greedy; returns (tokens (B, n), per-step logits (n, B, V))."""
    out = model.generate(prompt, attention_mask=torch.ones_like(prompt), do_sample=False, max_new_tokens=n,
                         min_new_tokens=n, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    return out.sequences[:, prompt.shape[1]:], torch.stack(out.logits)


def main(argv=None) -> int:
    parser = base_parser(__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--prompt", type=int, default=256, help="prompt tokens per sequence")
    parser.add_argument("--tokens", type=int, default=128, help="new tokens per sequence")
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=8)
    parser.add_argument("--kv-heads", type=int, default=2)
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=50)
    parser.add_argument("--top-p", type=float, default=0.9)
    parser.add_argument("--dtype", choices=sorted(DTYPES), default=None,
                        help="model dtype (default bfloat16 on a GPU, float32 on the CPU)")
    args = parser.parse_args(argv)
    device = device_of(args)
    dtype = DTYPES[args.dtype or ("bfloat16" if device.type == "cuda" else "float32")]
    quiet = args.no_progress
    plain, fast = build(args, dtype, device)
    print(f"Llama config: {args.layers} layers, hidden {args.hidden}, {args.heads} heads / {args.kv_heads} kv heads, "
          f"vocab {args.vocab}, random weights, {str(dtype)[6:]}; batch {args.batch}, prompt {args.prompt}, "
          f"{args.tokens} new tokens")
    gen = torch.Generator(device=device).manual_seed(args.seed)
    prompt = torch.randint(0, args.vocab, (args.batch, args.prompt), device=device, generator=gen)
    n = args.tokens

    with torch.no_grad():
        t_plain, ref = timed(lambda: plain(prompt).logits, device, args.repeats)
        t_fast, out = timed(lambda: fast(prompt).logits, device, args.repeats)
    scale = max(1.0, ref.float().abs().max().item())
    rows = [Row(f"prefill {args.batch}x{args.prompt}", t_plain, t_fast, args.batch * args.prompt, "tok",
                (out.float() - ref.float()).abs().max().item(), RTOL[dtype] * scale)]

    t_plain, (g_plain, l_plain) = timed(lambda: greedy(plain, prompt, n), device, args.repeats)
    t_fast, (g_fast, l_fast) = timed(lambda: greedy(fast, prompt, n), device, args.repeats)
    same = (g_plain == g_fast).all(0)
    agree = n if bool(same.all()) else int((~same).nonzero()[0])
    # Logits are comparable up to and including the first step whose tokens differ.
    step_diff = (l_fast[:agree + 1].float() - l_plain[:agree + 1].float()).abs().max().item()
    rows.append(Row(f"generate {n} greedy (KV cache)", t_plain, t_fast, args.batch * n, "tok", step_diff,
                    RTOL[dtype] * max(1.0, l_plain.float().abs().max().item())))

    kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    g1 = torch.Generator(device=device).manual_seed(args.seed)
    g2 = torch.Generator(device=device).manual_seed(args.seed)
    t_plain, s_plain = timed(lambda: sample_loop(plain, prompt, n, lambda x: plain_sample_tokens(x, generator=g1, **kw),
                                                 quiet), device, args.repeats)
    t_fast, s_fast = timed(lambda: sample_loop(fast, prompt, n, lambda x: sample_tokens(x, generator=g2, **kw), quiet),
                           device, args.repeats)
    assert ((s_fast >= 0) & (s_fast < args.vocab)).all() and ((s_plain >= 0) & (s_plain < args.vocab)).all()
    rows.append(Row(f"sample {n} T={args.temperature} k={args.top_k} p={args.top_p}", t_plain, t_fast,
                    args.batch * n, "tok", None, None))

    print("greedy tokens identical" if agree == n else
          f"greedy tokens diverge at step {agree} of {n} (random weights: the top two logits nearly tie)")
    print(f"sampled, plain torch : {s_plain[0, :16].tolist()}")
    print(f"sampled, seqgen_fast : {s_fast[0, :16].tolist()}")
    ok = print_table("Llama decoding, sdpa vs seqgen_fast", rows, device)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
