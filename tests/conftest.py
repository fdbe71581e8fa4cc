"""Test harness shared by every family.

Without a CUDA device, Triton kernels run in Triton's CPU interpreter: TRITON_INTERPRET=1 is set
here, before anything imports Triton. Tests marked ``gpu`` need a CUDA device and are skipped
without one; on the GPU machine run ``pytest -m gpu``.

``--shard K/N`` keeps the K-th of N disjoint parts of the collected tests (by a stable hash of each
test's node id), so a long run splits over several calls: ``scripts/gpu_check.sh --full``.

Fixtures:
  device           -- "cuda" when available, else "cpu"
  kernel_backend   -- parametrized over the kernel backends usable here ("triton" always: on the
                      CPU through the interpreter; "cuda" when _C is built and a GPU exists)
"""
import os
import zlib

import torch
from hypothesis import HealthCheck, settings

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_CUDA = torch.cuda.is_available()

# The fuzz suite's profiles (tests/support/fuzz.py): "ci" by default, "long" with
# `pytest -m fuzz --hypothesis-profile long`.
_FUZZ = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("ci", max_examples=int(os.environ.get("SEQGEN_FAST_FUZZ_EXAMPLES", "30")),
                          derandomize=True, print_blob=True, **_FUZZ)
settings.register_profile("long", max_examples=2000, print_blob=True, **_FUZZ)
settings.load_profile("ci")


def pytest_addoption(parser):
    parser.addoption("--shard", metavar="K/N", help="run only the K-th of N disjoint parts of the tests (1 <= K <= N)")


def _shard(spec: str) -> tuple[int, int]:
    k, _, n = spec.partition("/")
    if not (k.isdigit() and n.isdigit() and 1 <= int(k) <= int(n)):
        raise pytest.UsageError(f"--shard expects K/N with 1 <= K <= N, got {spec!r}")
    return int(k), int(n)


def in_shard(nodeid: str, k: int, n: int) -> bool:
    """Whether test ``nodeid`` belongs to part ``k`` of ``n`` (crc32: the same on every machine and run)."""
    return zlib.crc32(nodeid.encode()) % n == k - 1


def pytest_collection_modifyitems(config, items):
    spec = config.getoption("--shard")
    if spec:
        k, n = _shard(spec)
        mine = [in_shard(item.nodeid, k, n) for item in items]
        config.hook.pytest_deselected(items=[item for item, m in zip(items, mine) if not m])
        items[:] = [item for item, m in zip(items, mine) if m]
    if HAS_CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA device (run `pytest -m gpu` on the GPU machine)")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_seed(request):
    """A different seed per test (fresh random inputs), printed on failure for replay."""
    seed = abs(hash(request.node.nodeid)) % (2**31)
    torch.manual_seed(seed)
    yield


@pytest.fixture
def device():
    return torch.device("cuda" if HAS_CUDA else "cpu")


def kernel_backends():
    """The kernel backends tests can drive on this machine."""
    from seqgen_fast import _ext

    names = ["triton"]
    if HAS_CUDA and _ext.C is not None:
        names.append("cuda")
    return names


@pytest.fixture(params=kernel_backends())
def kernel_backend(request):
    return request.param
