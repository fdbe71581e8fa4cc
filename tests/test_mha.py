"""seqgen_fast.nn.MultiheadAttention against torch.nn.MultiheadAttention (same parameters)."""
import copy
import importlib

import pytest
import torch

import seqgen_fast
from seqgen_fast import use_backend
from seqgen_fast.nn import MultiheadAttention
from support.utils import TOL, assert_close_rel, rel_err

CONFIGS = {
    "self_batch_first": dict(embed_dim=16, num_heads=2, batch_first=True),
    "no_bias_seq_first": dict(embed_dim=12, num_heads=3, bias=False),
    "bias_kv_zero_attn": dict(embed_dim=16, num_heads=4, add_bias_kv=True, add_zero_attn=True, batch_first=True),
    "kdim_vdim": dict(embed_dim=16, num_heads=2, kdim=10, vdim=6),
}
MASKS = ["none", "kpm_bool", "attn_bool_2d", "attn_float_3d_kpm_float", "causal_hint", "causal_kpm"]


def pair(**cfg):
    torch_mha = torch.nn.MultiheadAttention(**cfg)
    with torch.no_grad():  # bias_k / bias_v / in_proj_bias start at 0: give them values
        for p in torch_mha.parameters():
            p.normal_()
    return torch_mha, MultiheadAttention.from_torch(torch_mha)


def inputs(mha, batch=3, tgt=5, src=7, self_attn=False):
    def seq(n, dim):
        shape = (batch, n, dim) if mha.batch_first else (n, batch, dim)
        return torch.randn(shape)

    if self_attn:
        x = seq(tgt, mha.embed_dim)
        return x, x, x
    return seq(tgt, mha.embed_dim), seq(src, mha.kdim), seq(src, mha.vdim)


def masks(kind, mha, batch, tgt, src):
    kpm = torch.rand(batch, src) < 0.3
    kpm[:, 0] = False  # every query keeps a key (a fully masked row is NaN in torch's kernels)
    if kind == "none":
        return {}
    if kind == "kpm_bool":
        return dict(key_padding_mask=kpm)
    if kind == "attn_bool_2d":
        m = torch.rand(tgt, src) < 0.3
        m[:, 0] = False
        return dict(attn_mask=m)
    if kind == "attn_float_3d_kpm_float":
        return dict(attn_mask=torch.randn(batch * mha.num_heads, tgt, src),
                    key_padding_mask=torch.zeros(batch, src).masked_fill(kpm, -1e4))
    causal = torch.ones(tgt, src, dtype=torch.bool).triu(1)
    if kind == "causal_hint":
        return dict(attn_mask=causal, is_causal=True)
    return dict(attn_mask=causal, is_causal=True, key_padding_mask=kpm)


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("config", list(CONFIGS))
def test_forward_matches_torch(config, mask):
    torch_mha, ours = pair(**CONFIGS[config])
    q, k, v = inputs(ours, self_attn=config != "kdim_vdim" and mask.startswith("causal"))
    kw = masks(mask, ours, 3, q.shape[1 if ours.batch_first else 0], k.shape[1 if ours.batch_first else 0])
    expected, _ = torch_mha(q, k, v, need_weights=False, **kw)
    got, weights = ours(q, k, v, need_weights=False, **kw)
    assert weights is None
    assert_close_rel(got, expected, 1e-5)


def test_gradients_match_torch():
    cfg = dict(embed_dim=16, num_heads=4, add_bias_kv=True, batch_first=True)
    torch_mha, _ = pair(**cfg)
    ours = MultiheadAttention(**cfg)
    ours.load_state_dict(torch_mha.state_dict())
    q, k, v = inputs(ours)
    kpm = torch.rand(3, 7) < 0.3
    kpm[:, 0] = False
    grads = []
    for m in (torch_mha, ours):
        x = q.clone().requires_grad_()
        out, _ = m(x, k, v, key_padding_mask=kpm, need_weights=False)
        out.square().sum().backward()
        grads.append([x.grad] + [p.grad for p in m.parameters()])
    names = ["query"] + [n for n, _ in ours.named_parameters()]
    for name, g_t, g_o in zip(names, *grads):
        assert_close_rel(g_o, g_t, 1e-5, f"grad of {name}")


def test_unbatched_input():
    torch_mha, ours = pair(embed_dim=8, num_heads=2)
    q, k = torch.randn(4, 8), torch.randn(6, 8)
    kpm = torch.tensor([False, True, False, False, True, False])
    expected, _ = torch_mha(q, k, k, key_padding_mask=kpm, need_weights=False)
    got, _ = ours(q, k, k, key_padding_mask=kpm, need_weights=False)
    assert got.shape == expected.shape == (4, 8)
    assert_close_rel(got, expected, 1e-5)


@pytest.mark.parametrize("average", [True, False])
def test_need_weights_returns_torchs_weights(average):
    torch_mha, ours = pair(embed_dim=16, num_heads=4, batch_first=True)
    q, k, v = inputs(ours)
    kpm = torch.rand(3, 7) < 0.3
    kpm[:, 0] = False
    out_t, w_t = torch_mha(q, k, v, key_padding_mask=kpm, average_attn_weights=average)
    out_o, w_o = ours(q, k, v, key_padding_mask=kpm, average_attn_weights=average)
    assert torch.equal(w_o, w_t) and torch.equal(out_o, out_t)


def test_parameters_and_state_dict_are_torchs():
    cfg = dict(embed_dim=16, num_heads=2, kdim=10, vdim=6, add_bias_kv=True, batch_first=True)
    torch_mha, ours = pair(**cfg)
    assert isinstance(ours, torch.nn.MultiheadAttention)
    assert list(ours.state_dict()) == list(torch_mha.state_dict())
    assert all(a is b for a, b in zip(ours.parameters(), torch_mha.parameters()))
    fresh = MultiheadAttention(**cfg)
    fresh.load_state_dict(torch_mha.state_dict())
    q, k, v = inputs(fresh)
    assert_close_rel(fresh(q, k, v, need_weights=False)[0], torch_mha(q, k, v, need_weights=False)[0], 1e-5)
    with pytest.raises(TypeError, match="module must be"):
        MultiheadAttention.from_torch(torch.nn.Linear(2, 2))


def test_swap_modules_in_transformer_runs_our_attention(monkeypatch):
    nn_attention = importlib.import_module("seqgen_fast.nn.attention")
    layer = torch.nn.TransformerEncoderLayer(d_model=16, nhead=4, dim_feedforward=32, dropout=0.0, batch_first=True)
    model = torch.nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False).eval()
    x = torch.randn(2, 9, 16)
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[1, 6:] = True
    expected = model(x, src_key_padding_mask=kpm)  # grad enabled: torch's own slow path, no fused encoder
    calls = []
    real = nn_attention.scaled_dot_product_attention
    monkeypatch.setattr(nn_attention, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    seqgen_fast.swap_modules(model)
    assert all(type(m.self_attn) is MultiheadAttention for m in model.layers)
    got = model(x, src_key_padding_mask=kpm)
    assert len(calls) == 2
    assert_close_rel(got, expected, 1e-5)


def test_bad_masks():
    _, ours = pair(embed_dim=8, num_heads=2)
    q = torch.randn(4, 3, 8)
    with pytest.raises(RuntimeError, match="Need attn_mask"):
        ours(q, q, q, need_weights=False, is_causal=True)
    with pytest.raises(RuntimeError, match="2D attn_mask"):
        ours(q, q, q, need_weights=False, attn_mask=torch.zeros(4, 5))
    with pytest.raises(TypeError, match="key_padding_mask"):
        ours(q, q, q, need_weights=False, key_padding_mask=torch.zeros(3, 4, dtype=torch.int32))


@pytest.mark.smoke
def test_triton_backend_under_interpreter():
    """float16 (the Triton attention kernels take 16-bit inputs), by flash-attn's rule: against torch's
    MHA in float64 on the same float16 weights and inputs, our error is at most twice torch's own
    float16 error."""
    torch_mha, _ = pair(embed_dim=32, num_heads=2, batch_first=True)
    torch_mha.half()
    ours = MultiheadAttention.from_torch(copy.deepcopy(torch_mha))
    q, k, v = (t.half() for t in inputs(ours, batch=2, tgt=7, src=9))
    kpm = torch.zeros(2, 9, dtype=torch.bool)
    kpm[0, 5:] = True
    with use_backend("triton"):
        got, _ = ours(q, k, v, key_padding_mask=kpm, need_weights=False)
    theirs, _ = torch_mha(q, k, v, key_padding_mask=kpm, need_weights=False)
    ref, _ = torch_mha.double()(q.double(), k.double(), v.double(), key_padding_mask=kpm, need_weights=False)
    assert got.dtype == torch.float16
    assert rel_err(got, ref) <= 2 * rel_err(theirs, ref) + 1e-6


@pytest.mark.gpu
@pytest.mark.smoke
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_gpu_matches_torch_in_float32(dtype):
    torch_mha, ours = pair(embed_dim=256, num_heads=4, batch_first=True)
    torch_mha.cuda()
    q, k, v = (t.cuda() for t in inputs(ours, batch=4, tgt=300, src=300, self_attn=True))
    causal = torch.ones(300, 300, dtype=torch.bool, device="cuda").triu(1)
    expected, _ = torch_mha(q, k, v, attn_mask=causal, is_causal=True, need_weights=False)
    ours_lp = MultiheadAttention.from_torch(torch_mha).to(dtype)
    got, _ = ours_lp(q.to(dtype), k.to(dtype), v.to(dtype), attn_mask=causal, is_causal=True, need_weights=False)
    assert_close_rel(got, expected, TOL[dtype])
