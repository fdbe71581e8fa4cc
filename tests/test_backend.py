"""Backend dispatch: order, forcing (argument, context manager, env var), reasons in errors."""
import pytest
import torch

import seqgen_fast
from seqgen_fast import _backend
from seqgen_fast._backend import BackendError, Dispatcher, device_reasons, forced_backend, use_backend


def make_toy():
    """A dispatcher whose triton/cuda impls decline odd sizes, so reasons are observable."""
    d = Dispatcher("toy_op")
    calls = []

    def odd_reason(x):
        return [f"size {x.numel()} is odd"] if x.numel() % 2 else []

    for name in ("cuda", "triton"):
        d.register(name, supports=lambda x, _n=name: device_reasons(_n, x) + odd_reason(x))(
            lambda x, _n=name: calls.append(_n) or x * 2)
    d.register("reference")(lambda x: calls.append("reference") or x * 2)
    return d, calls


def test_cpu_tensors_go_to_reference_with_reasons_for_the_others(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    d, calls = make_toy()
    x = torch.randn(4)
    assert d.select(x) == "reference"
    torch.testing.assert_close(d.impl(d.select(x))(x), x * 2)
    assert calls == ["reference"]
    cuda_why = d.reasons("cuda", x)
    assert cuda_why and ("CUDA" in cuda_why[0] or "_C" in cuda_why[0])


def test_forcing_order_argument_then_context_then_env(monkeypatch):
    monkeypatch.setenv(_backend.ENV_VAR, "triton")
    assert forced_backend() == "triton"
    with use_backend("reference"):
        assert forced_backend() == "reference"
        assert forced_backend("cuda") == "cuda"
    assert forced_backend() == "triton"
    monkeypatch.setenv(_backend.ENV_VAR, "")
    assert forced_backend() is None


def test_env_var_is_read_at_each_call(monkeypatch):
    d, _ = make_toy()
    x = torch.randn(4)
    monkeypatch.setenv(_backend.ENV_VAR, "reference")
    assert d.select(x) == "reference"
    monkeypatch.setenv(_backend.ENV_VAR, "cuda")
    with pytest.raises(BackendError, match="forced backend 'cuda'"):
        d.select(x)


def test_forced_backend_that_cannot_take_input_raises_with_its_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d, calls = make_toy()
    x = torch.randn(3)
    with pytest.raises(BackendError, match="size 3 is odd"):
        d.select(x, backend="triton")
    assert calls == []


def test_unknown_backend_names_are_rejected(monkeypatch):
    with pytest.raises(ValueError, match="unknown backend 'cudnn'"):
        with use_backend("cudnn"):
            pass
    monkeypatch.setenv(_backend.ENV_VAR, "fast")
    with pytest.raises(ValueError, match="SEQGEN_FAST_BACKEND"):
        forced_backend()


def test_no_capable_backend_lists_every_reason(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    d = Dispatcher("picky")
    for name in ("cuda", "triton", "reference"):
        d.register(name, supports=lambda *a, _n=name: [f"{_n} says no"])(lambda *a: None)
    with pytest.raises(BackendError) as exc:
        d.select(torch.randn(2))
    msg = str(exc.value)
    assert "picky" in msg and "reference: reference says no" in msg
    assert "cuda:" in msg and "triton:" in msg


def test_missing_implementation_is_a_reason():
    d = Dispatcher("ref_only", order=("triton", "reference"))
    d.register("reference")(lambda x: x)
    assert d.reasons("triton", torch.randn(1)) == ["ref_only has no triton implementation"]


def test_mixed_devices_are_a_reason():
    a, b = torch.randn(2), torch.randn(2, device="meta")
    assert "different devices" in device_reasons("triton", a, b)[0]


def test_public_namespace():
    assert seqgen_fast.use_backend is use_backend
    assert set(seqgen_fast.BACKENDS) == {"cuda", "triton", "reference"}
    with pytest.raises(AttributeError):
        seqgen_fast.functional.not_an_op


def test_select_cached_memoizes_but_sees_forcing(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    d, _ = make_toy()
    calls = []
    inner = d.impls["reference"].supports
    d.impls["reference"].supports = lambda x: calls.append(1) or inner(x)
    x = torch.randn(4)
    assert d.select_cached(("k",), x) == "reference"
    assert d.select_cached(("k",), x) == "reference"
    assert len(calls) == 1  # the second call was served from the memo
    assert d.select_cached(("k",), x, backend="triton") == "triton"  # forcing is part of the key
    with use_backend("triton"):
        assert d.select_cached(("k",), x) == "triton"


def test_capabilities_are_data_that_give_reasons():
    caps = _backend.Capabilities("reference", dtypes=(torch.float16,), head_dims=(16, 64), dtype_note="why not")
    x = torch.randn(2, 8)
    assert caps.reasons(x.half(), head_dims=(16, 64)) == []
    assert caps.reasons(x, head_dims=(8,)) == ["dtype float32 is not one of float16 (why not)",
                                               "head dim 8 is outside 16..64"]
    assert caps.describe() == "float16; head dims 16..64"
    assert "CUDA" in _backend.Capabilities("cuda", dtypes=(torch.float32,)).reasons(x)[0]
