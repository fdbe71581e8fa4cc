"""Sizes past 2^31 elements (and bytes) in the attention, decode and rotary kernels.

The kernels form batch, head, sequence-start, page and token offsets in 64 bits, and offsets *within*
one sequence (attention: rows x row stride + dim x dim stride), one row (decode, rotary: dim x dim
stride) or one mask row (key x key stride) in 32 bits; the rotary kernel numbers its (token, head)
rows in 32 bits. Inputs past those limits are declined before launch with the reason (the dispatcher
then routes to the reference backend, or a forced ``backend="triton"`` raises it). On the CPU these
tests assert the plans on meta tensors and expanded views (nothing of that size is allocated); under
``-m gpu`` one real case per kernel runs past 2^31 elements with 64-bit offsets.
"""
import pytest
import torch

from seqgen_fast.functional import decode_attention, flash_attention, rotary_embedding
from seqgen_fast.ops import attention as attn_ops
from seqgen_fast.ops import decode as decode_ops
from seqgen_fast.ops import rotary as rotary_ops
from support.utils import assert_close_rel

TOO_FAR = "past the kernels' 32-bit"


def _meta(*shape, dtype=torch.bfloat16):
    return torch.empty(*shape, device="meta", dtype=dtype)


def _kvcache_reasons(q, k_cache, v_cache, k=None, v=None):
    seqlens = torch.empty(q.shape[0], device="meta", dtype=torch.int32)
    return decode_ops._triton_supports(q, k_cache, v_cache, k, v, seqlens, None, None, None, None, None, 1.0, False,
                                       -1, -1, 0.0, False, None, None, 0)


def test_varlen_packed_totals_past_32_bits_are_declined():
    """Packed varlen sequences are seen as one (1, H, total, E) batch entry: a packed total whose rows
    span 2^31 elements is declined (the kernels' within-sequence offsets are 32-bit), a smaller one
    of the same heads is not, whatever the number of sequences."""
    H, E = 32, 128
    rows = 2**31 // (H * E) + 1
    packed = _meta(rows, H, E).transpose(0, 1).unsqueeze(0)
    cu = torch.empty(5, device="meta", dtype=torch.int32)
    why = attn_ops._kernel_reasons(packed, packed, packed, None, cu)
    assert any(r.startswith("query: one sequence spans") and TOO_FAR in r for r in why), why
    fits = _meta(rows - 2, H, E).transpose(0, 1).unsqueeze(0)
    assert not [r for r in attn_ops._kernel_reasons(fits, fits, fits, None, cu) if TOO_FAR in r]


def test_masks_whose_rows_span_past_32_bits_are_declined():
    """A key-major (column-major) attn_mask of 2^16 x 2^15 keys: key index x stride passes 2^31."""
    q = _meta(1, 1, 2**16, 64)
    k = _meta(1, 1, 2**15 + 1, 64)
    mask = torch.empty(2**15 + 1, 2**16, device="meta", dtype=torch.bool).t()
    why = attn_ops._kernel_reasons(q, k, k, mask, None)
    assert any(r.startswith("attn_mask: a row spans") for r in why), why
    assert not [r for r in attn_ops._kernel_reasons(q, k, k, mask.contiguous(), None) if r.startswith("attn_mask")]


def test_large_batches_of_short_sequences_stay_on_the_kernels():
    """2^31 + 2^21 elements in 1025 sequences of 1024 rows: every offset past 32 bits is a batch offset
    (64-bit in the kernels), so nothing is declined for size (on a GPU these run: the gpu test below)."""
    q = _meta(1025, 1024, 16, 128).transpose(1, 2)
    assert q.numel() > 2**31
    assert not [r for r in attn_ops._kernel_reasons(q, q, q, None, None) if TOO_FAR in r]


def test_decode_caches_past_32_bits():
    """Decode: a 2^32-element paged cache (64-bit page and row offsets) is taken; a cache whose head
    dim is its outermost dim (stride 2^25: dim x stride passes 2^31) is declined with the reason."""
    q = _meta(4, 1, 16, 128)
    big = _meta(2**14, 256, 8, 128)
    assert big.numel() == 2**32
    assert not [r for r in _kvcache_reasons(q, big, big) if TOO_FAR in r]
    outer = torch.empty_strided((4, 256, 8, 128), (1, 4, 1024, 2**25), device="meta", dtype=torch.bfloat16)
    why = _kvcache_reasons(q, outer, big)
    assert any(r.startswith("k_cache: its last dim spans") and TOO_FAR in r for r in why), why


def test_rotary_rows_and_strides_past_32_bits():
    """Rotary: 2^31 (token, head) rows pass the kernel's 32-bit row numbers (an expanded view: no
    memory), a dim stride of 2^25 passes its in-row offsets; 2^31 - 1 contiguous rows do not."""
    cos = torch.empty(16, 64, device="meta")
    rows = torch.zeros(1, 1, 1, 128).expand(2**16, 2**11, 16, 128)
    why = rotary_ops._triton_supports(rows, None, cos, cos, None, None)
    assert any(r.startswith("q: 2147483648 (token, head) rows") for r in why), why
    below = _meta(2**31 - 1, 1, 128)
    assert not [r for r in rotary_ops._triton_supports(below, None, cos, cos, None, None) if TOO_FAR in r]
    outer = torch.empty_strided((2, 16, 4, 128), (64, 4, 1, 2**25), device="meta", dtype=torch.bfloat16)
    why = rotary_ops._triton_supports(_meta(2, 16, 4, 128), outer, cos, cos, None, None)
    assert any(r.startswith("k: its last dim spans") for r in why), why


# ----------------------------------------------------------------------------------------------
# Real cases past 2^31 elements on the GPU (64-bit offsets in the kernels)
# ----------------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_attention_past_2_31_elements():
    """1025 x 1024 x 16 x 128 bf16 (2^31 + 2^21 elements, 4.3 GB per tensor): the last sequences start
    past element 2^31; they match the float64 reference."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(1025, 1024, 16, 128, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    out = flash_attention(q, k, v, causal=True, backend="triton")
    for b in (0, 1024):
        ref = flash_attention(q[b:b + 1].double(), k[b:b + 1].double(), v[b:b + 1].double(), causal=True,
                              backend="reference")
        assert_close_rel(out[b:b + 1], ref, 2e-2, f"sequence {b}")


@pytest.mark.gpu
def test_gpu_decode_past_2_31_elements():
    """A (64, 65536, 8, 128) bf16 cache (2^32 elements, 8.6 GB): the last sequences' rows lie past
    element 2^31; with and without splits they match the float64 reference."""
    torch.manual_seed(0)
    kc, vc = (torch.randn(64, 65536, 8, 128, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    q = torch.randn(64, 32, 128, device="cuda", dtype=torch.bfloat16)
    lens = torch.full((64,), 65536, device="cuda", dtype=torch.int32)
    lens[-1] = 40000
    for splits in (0, 1):
        out = decode_attention(q, kc, vc, lens, num_splits=splits, backend="triton")
        for b in (0, 63):
            ref = decode_attention(q[b:b + 1].double(), kc[b:b + 1].double(), vc[b:b + 1].double(), lens[b:b + 1],
                                   backend="reference")
            assert_close_rel(out[b:b + 1], ref, 2e-2, f"sequence {b}, num_splits={splits}")


@pytest.mark.gpu
def test_gpu_rotary_past_2_31_elements():
    """(9, 16384, 128, 128) bf16 q (2.4e9 elements): the last batch entry lies past element 2^31."""
    torch.manual_seed(0)
    q = torch.randn(9, 16384, 128, 128, device="cuda", dtype=torch.bfloat16)
    cos, sin = (torch.randn(16384, 64, device="cuda") for _ in range(2))
    out, _ = rotary_embedding(q, None, cos.bfloat16(), sin.bfloat16(), interleaved=True, backend="triton")
    ref, _ = rotary_embedding(q[-1:].double(), None, cos.bfloat16().double(), sin.bfloat16().double(),
                              interleaved=True, backend="reference")
    assert_close_rel(out[-1:], ref, 1e-2, "last batch entry")
