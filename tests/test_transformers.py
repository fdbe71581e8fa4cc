"""attn_implementation="seqgen_fast" in tiny random transformers models (built from configs, no downloads)."""
import importlib

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqgen_fast.integrations import transformers as integration  # noqa: E402
from support.utils import assert_close_rel  # noqa: E402

VOCAB = 97


def llama():
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                   num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return transformers.LlamaForCausalLM(cfg)


def gpt2():
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=64)
    return transformers.GPT2LMHeadModel(cfg)


@pytest.fixture
def spy(monkeypatch):
    """Counts calls of seqgen_fast's SDPA and decode ops made through the integration."""
    calls = {"scaled_dot_product_attention": 0, "decode_attention": 0}
    for name, module in (("scaled_dot_product_attention", "seqgen_fast.ops.attention"),
                         ("decode_attention", "seqgen_fast.ops.decode")):
        mod = importlib.import_module(module)
        real = getattr(mod, name)

        def counted(*a, _real=real, _name=name, **k):
            calls[_name] += 1
            return _real(*a, **k)

        monkeypatch.setattr(mod, name, counted)
    return calls


def model_pair(build):
    integration.register()
    integration.register()  # idempotent
    torch.manual_seed(0)
    model = build().eval()
    model.set_attn_implementation("sdpa")
    return model


@pytest.mark.parametrize("build", [llama, gpt2])
def test_prefill_logits_match_sdpa(build, spy):
    model = model_pair(build)
    ids = torch.randint(0, VOCAB, (2, 11))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask path
    with torch.no_grad():
        ref_plain = model(ids).logits
        ref_padded = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("seqgen_fast")
        ours_plain = model(ids).logits
        ours_padded = model(ids, attention_mask=mask).logits
    assert spy["scaled_dot_product_attention"] == 2 * model.config.num_hidden_layers
    assert_close_rel(ours_plain, ref_plain, 1e-5, "logits, no mask")
    assert_close_rel(ours_padded[1, 3:], ref_padded[1, 3:], 1e-5, "logits, left-padded")
    assert_close_rel(ours_padded[0], ref_padded[0], 1e-5, "logits, unpadded row")


@pytest.mark.parametrize("mode", ["dynamic_cache", "static_cache", "left_padded"])
@pytest.mark.parametrize("build", [llama, gpt2])
def test_greedy_generation_matches_sdpa(build, mode, spy):
    model = model_pair(build)
    ids = torch.randint(1, VOCAB, (2, 6))
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    if mode == "static_cache":
        kw["cache_implementation"] = "static"
    if mode == "left_padded":
        ids[1, :2] = 0
        kw["attention_mask"] = (ids != 0).long()
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqgen_fast")
        ours = model.generate(ids, **kw)
    if mode == "dynamic_cache":
        assert spy["decode_attention"] > 0, "cached steps without a mask should use the decode kernel"
    assert spy["scaled_dot_product_attention"] > 0
    assert torch.equal(ours.sequences, ref.sequences)
    assert_close_rel(torch.stack(ours.scores), torch.stack(ref.scores), 1e-5, "step logits")


@pytest.mark.gpu
@pytest.mark.parametrize("build", [pytest.param(llama, marks=pytest.mark.smoke), gpt2])
def test_gpu_bf16_generation_close_to_sdpa(build):
    model = model_pair(build).to("cuda", torch.bfloat16)
    ids = torch.randint(0, VOCAB, (4, 16), device="cuda")
    kw = dict(max_new_tokens=8, do_sample=False, use_cache=True, pad_token_id=0,
              output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqgen_fast")
        ours = model.generate(ids, **kw)
    # greedy tokens may flip on near-ties in bf16; the first step's logits come from the same prefix
    assert_close_rel(ours.scores[0], ref.scores[0], 3e-2, "first-step logits")
