"""attn_implementation="seqgen_fast" (and "seqgen_fast_flash2" for continuous batching) in tiny random
transformers models (built from configs, no downloads): the same logits and tokens as "sdpa"."""
import types

import pytest
import torch

transformers = pytest.importorskip("transformers")

from seqgen_fast import use_backend  # noqa: E402
from seqgen_fast.integrations import transformers as integration  # noqa: E402
from seqgen_fast.ops import attention as attention_ops  # noqa: E402
from seqgen_fast.ops import decode as decode_ops  # noqa: E402
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
    """Counts the calls that reach seqgen_fast's SDPA and KV-cache implementations (at run time, so
    compiled graphs count too)."""
    calls = {"scaled_dot_product_attention": 0, "kvcache": 0}

    def counted(key, real):
        def fn(*a, **k):
            calls[key] += 1
            return real(*a, **k)
        return fn

    monkeypatch.setattr(attention_ops, "scaled_dot_product_attention",
                        counted("scaled_dot_product_attention", attention_ops.scaled_dot_product_attention))
    for impl in decode_ops.KVCACHE.impls.values():
        monkeypatch.setattr(impl, "fn", counted("kvcache", impl.fn))
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
    ids = torch.randint(0, VOCAB, (2, 19))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding: the mask path
    with torch.no_grad():
        ref_plain = model(ids).logits
        ref_padded = model(ids, attention_mask=mask).logits
        model.set_attn_implementation("seqgen_fast")
        ours_plain = model(ids).logits
        ours_padded = model(ids, attention_mask=mask).logits
    assert spy["scaled_dot_product_attention"] == 2 * model.config.num_hidden_layers  # 19 > DECODE_MAX_QUERIES
    assert_close_rel(ours_plain, ref_plain, 1e-5, "logits, no mask")
    assert_close_rel(ours_padded[1, 3:], ref_padded[1, 3:], 1e-5, "logits, left-padded")
    assert_close_rel(ours_padded[0], ref_padded[0], 1e-5, "logits, unpadded row")


@pytest.mark.parametrize("mode", ["dynamic_cache", "static_cache", "left_padded", "static_left_padded"])
@pytest.mark.parametrize("build", [llama, gpt2])
def test_greedy_generation_matches_sdpa(build, mode, spy):
    model = model_pair(build)
    ids = torch.randint(1, VOCAB, (2, 6))
    kw = dict(max_new_tokens=6, do_sample=False, use_cache=True, pad_token_id=0, output_scores=True,
              return_dict_in_generate=True)
    if mode.startswith("static"):
        kw["cache_implementation"] = "static"
    if mode.endswith("left_padded"):
        ids[1, :2] = 0
        kw["attention_mask"] = (ids != 0).long()
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqgen_fast")
        ours = model.generate(ids, **kw)
    assert spy["kvcache"] >= 5 * model.config.num_hidden_layers, "cached steps run the KV-cache kernel"
    assert torch.equal(ours.sequences, ref.sequences)
    assert_close_rel(torch.stack(ours.scores), torch.stack(ref.scores), 1e-5, "step logits")


def test_speculative_queries_with_a_cache_match_sdpa(spy):
    """Several new tokens over a cache (speculative verification): the KV-cache kernel with the mask."""
    model = model_pair(llama)
    ids = torch.randint(1, VOCAB, (2, 9))
    with torch.no_grad():
        past = model(ids[:, :5], use_cache=True).past_key_values
        ref = model(ids[:, 5:], cache=past, use_cache=True).logits
        model.set_attn_implementation("seqgen_fast")
        past = model(ids[:, :5], use_cache=True).past_key_values
        ours = model(ids[:, 5:], cache=past, use_cache=True).logits
    assert spy["kvcache"] >= 2 * model.config.num_hidden_layers
    assert_close_rel(ours, ref, 1e-5)


def _compile_config(**kw):
    config = transformers.CompileConfig(fullgraph=True, dynamic=False, **kw)
    config._compile_all_devices = True  # transformers compiles the decode step on the CPU too (for tests)
    return config


@pytest.mark.parametrize("padded", [False, True])
def test_static_cache_compiled_fullgraph_matches_sdpa(padded, spy):
    """Generation over transformers' StaticCache with the decode step compiled (fullgraph: a graph break
    in our attention function would raise): the same tokens as "sdpa", one graph."""
    from torch._dynamo.utils import counters

    model = model_pair(llama)
    ids = torch.randint(1, VOCAB, (2, 6))
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0, cache_implementation="static")
    if padded:
        ids[1, :2] = 0
        kw["attention_mask"] = (ids != 0).long()
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqgen_fast")
        torch._dynamo.reset()
        counters.clear()
        ours = model.generate(ids, compile_config=_compile_config(backend="aot_eager", mode=None), **kw)
    assert torch.equal(ours, ref)
    assert not counters["graph_break"], dict(counters["graph_break"])
    assert counters["stats"]["unique_graphs"] >= 1
    assert spy["kvcache"] >= 5 * model.config.num_hidden_layers


def test_decode_steps_run_the_triton_kernel_under_the_interpreter(spy):
    """The integration through the Triton kernel itself (interpreter): a static cache, left padding."""
    model = model_pair(llama)
    ids = torch.randint(1, VOCAB, (2, 5))
    ids[0, :1] = 0
    kw = dict(max_new_tokens=3, do_sample=False, pad_token_id=0, cache_implementation="static",
              attention_mask=(ids != 0).long(), output_scores=True, return_dict_in_generate=True)
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqgen_fast")
        with use_backend("triton"):
            ours = model.generate(ids, **kw)
    assert spy["kvcache"] >= 2 * model.config.num_hidden_layers
    assert torch.equal(ours.sequences, ref.sequences)
    assert_close_rel(torch.stack(ours.scores), torch.stack(ref.scores), 2e-3, "step logits")


class _CudaAvailable:
    """A stand-in for the ``torch`` module of transformers' batching initializer that reports a CUDA
    device, so its decode fast path (the block table) runs on the CPU in this test."""

    def __init__(self):
        self.cuda = types.SimpleNamespace(is_available=lambda: True)

    def __getattr__(self, name):
        return getattr(torch, name)


@pytest.mark.parametrize("fast_path", [False, True], ids=["varlen", "block_table"])
def test_continuous_batching_matches_sdpa(fast_path, spy, monkeypatch):
    """generate_batch (transformers' continuous batching, PagedAttentionCache, pages of 16) under
    PAGED_NAME: prefill through the varlen flash kernel, decode through flash_attn_with_kvcache over
    the block table when the fast path is on. The same tokens as "sdpa"."""
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = model_pair(llama)
    prompts = [[1, 2, 3, 4], [5, 6, 7], [9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]
    generation = GenerationConfig(max_new_tokens=5, do_sample=False, eos_token_id=-1, pad_token_id=0)

    def run():
        batching = ContinuousBatchingConfig(num_blocks=16, max_batch_tokens=64, page_size=16, use_cuda_graph=False)
        with torch.no_grad():
            out = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=batching,
                                       warmup=False)
        return [out[f"req_{i}"].generated_tokens for i in range(len(prompts))]

    ref = run()
    kvcache_calls = []
    real = decode_ops.flash_attn_with_kvcache
    monkeypatch.setattr(decode_ops, "flash_attn_with_kvcache", lambda *a, **k: kvcache_calls.append(1) or real(*a, **k))
    if fast_path:
        from transformers.generation.continuous_batching import initialization

        monkeypatch.setattr(initialization, "torch", _CudaAvailable())
    model.set_attn_implementation(integration.PAGED_NAME)
    assert run() == ref
    if fast_path:
        assert len(kvcache_calls) >= 3 * model.config.num_hidden_layers, "decode steps use the block table"
    else:
        assert not kvcache_calls


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


@pytest.mark.gpu
def test_gpu_static_cache_reduce_overhead_matches_sdpa():
    """torch.compile(mode="reduce-overhead") (inductor + CUDA graphs) over the StaticCache, fullgraph:
    the same greedy tokens as "sdpa" in float32."""
    model = model_pair(llama).to("cuda")
    ids = torch.randint(1, VOCAB, (2, 6), device="cuda")
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, cache_implementation="static")
    with torch.no_grad():
        ref = model.generate(ids, **kw)
        model.set_attn_implementation("seqgen_fast")
        torch._dynamo.reset()
        ours = model.generate(ids, compile_config=_compile_config(mode="reduce-overhead"), **kw)
    assert torch.equal(ours, ref)


@pytest.mark.gpu
def test_gpu_continuous_batching_block_table_matches_sdpa():
    from transformers import GenerationConfig
    from transformers.generation.configuration_utils import ContinuousBatchingConfig

    model = model_pair(llama).to("cuda")
    prompts = [[1, 2, 3, 4], [5, 6, 7], list(range(9, 40))]
    generation = GenerationConfig(max_new_tokens=8, do_sample=False, eos_token_id=-1, pad_token_id=0)
    batching = ContinuousBatchingConfig(num_blocks=64, max_batch_tokens=128, page_size=16)
    with torch.no_grad():
        ref = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=batching)
        model.set_attn_implementation(integration.PAGED_NAME)
        ours = model.generate_batch(prompts, generation_config=generation, continuous_batching_config=batching)
    assert [ours[k].generated_tokens for k in sorted(ours)] == [ref[k].generated_tokens for k in sorted(ref)]
