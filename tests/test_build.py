"""The CUDA extension: built wherever nvcc was present at install, importable without a GPU."""
import os
import shutil
import subprocess
import sys

import pytest
import torch

from seqgen_fast import _ext

NVCC = shutil.which("nvcc") is not None
SKIPPED = os.environ.get("SEQGEN_FAST_SKIP_CUDA", "0") not in ("", "0")


@pytest.mark.skipif(not NVCC or SKIPPED, reason="no nvcc here (or SEQGEN_FAST_SKIP_CUDA): _C is not expected")
def test_extension_built_and_importable():
    assert _ext.C is not None, _ext.reason
    out = subprocess.run([sys.executable, "-c", "import seqgen_fast._C as C; print(C.cuda_runtime_version)"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert int(out.stdout) >= 11000


@pytest.mark.skipif(_ext.C is None, reason="_C not built")
def test_extension_registers_every_family_with_cuda_kernels():
    # Families with CUDA kernels (csrc/<family>.cu) must register their bindings.
    csrc = os.path.join(os.path.dirname(__file__), "..", "csrc")
    families = {f[:-3] for f in os.listdir(csrc) if f.endswith(".cu")}
    assert families <= set(_ext.C.families), (families, _ext.C.families)


@pytest.mark.skipif(_ext.C is None, reason="_C not built")
def test_device_count_without_gpu_is_an_answer_not_a_crash():
    n = _ext.C.device_count()
    assert n == (torch.cuda.device_count() if torch.cuda.is_available() else 0)


@pytest.mark.skipif(_ext.C is None or torch.cuda.is_available(), reason="needs _C and no GPU")
def test_cuda_errors_become_python_exceptions():
    # No device: the CUDA error string comes back as an exception, never an abort.
    with pytest.raises((RuntimeError, IndexError)) as exc:
        _ext.C.device_info(0)
    assert "device" in str(exc.value).lower() or "cuda" in str(exc.value).lower()


@pytest.mark.gpu
def test_device_info_matches_torch():
    info = _ext.device_info(0)
    props = torch.cuda.get_device_properties(0)
    assert info["name"] == props.name
    assert (info["major"], info["minor"]) == (props.major, props.minor)
    assert info["multiprocessor_count"] == props.multi_processor_count
    assert info["l2_cache_size"] > 0 and info["shared_memory_per_multiprocessor"] > 0
    with pytest.raises(IndexError):
        _ext.C.device_info(torch.cuda.device_count())


@pytest.mark.skipif(not NVCC, reason="needs nvcc")
def test_install_without_cuda_says_so(tmp_path):
    # SEQGEN_FAST_SKIP_CUDA=1: setup builds no extension and says why.
    env = dict(os.environ, SEQGEN_FAST_SKIP_CUDA="1")
    root = os.path.join(os.path.dirname(__file__), "..")
    out = subprocess.run([sys.executable, "setup.py", "--name"], cwd=root, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "SEQGEN_FAST_SKIP_CUDA" in out.stderr and "without seqgen_fast._C" in out.stderr
