"""The CUDA extension: built wherever nvcc was present at install, importable without a GPU; and
setup.py's build logic (build cache, native arch list) with compiling and linking mocked."""
import importlib.util
import itertools
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from setuptools import Distribution, Extension

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


# ---- setup.py's build logic, without compiling (nvcc, the host compiler and the link are mocked) ----
ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def setup_py(monkeypatch):
    """setup.py as a module (it calls setup() only as __main__), with a stand-in pybind11: the build
    environment has one, the test environment need not."""
    monkeypatch.setitem(sys.modules, "pybind11",
                        types.SimpleNamespace(__version__="3.0.0", get_include=lambda: "/pybind11/include"))
    spec = importlib.util.spec_from_file_location("seqgen_fast_setup", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_build_cache_key_follows_csrc_content_and_flags(setup_py, tmp_path):
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    lstm = csrc / "lstm.cu"

    def key(archs="80;90a"):
        return setup_py.cache_key(csrc, setup_py.nvcc_flags(archs), "nvcc 13.0", ["g++", "-O3"])

    base = key()
    os.utime(lstm, (0, 0))
    assert key() == base, "time stamps are not content"
    original = lstm.read_bytes()
    lstm.write_bytes(original + b"\n")
    assert key() != base
    lstm.write_bytes(original)
    assert key() == base
    (csrc / "new.cuh").write_text("#pragma once\n")
    assert key() != base
    (csrc / "new.cuh").unlink()
    assert key("80") != base and key("90a") != base and key("80;90a") == base


@pytest.fixture
def build(setup_py, tmp_path, monkeypatch):
    """build() runs setup.py's BuildExt on seqgen_fast._C with a fake toolkit, a fresh build_ext and
    output dir each time, and returns the built file; build.compiled lists the source lists compiled,
    build.linked the extensions linked (compiling and linking are mocked)."""
    cuda = tmp_path / "cuda"
    (cuda / "lib64").mkdir(parents=True)
    monkeypatch.setattr(setup_py, "find_cuda_home", lambda: cuda)
    monkeypatch.setattr(setup_py, "nvcc_version", lambda nvcc: "Cuda compilation tools, release 13.0")
    monkeypatch.setenv("SEQGEN_FAST_BUILD_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SEQGEN_FAST_CUDA_ARCHS", raising=False)

    def compile_sources(self, sources, nvcc, ext):
        run.compiled.append(list(sources))
        return [str(Path(self.build_temp) / (Path(s).name + ".o")) for s in sources]

    def link(self, ext):
        run.linked.append(ext)
        out = Path(self.get_ext_fullpath(ext.name))
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"extension %d" % len(run.linked))

    monkeypatch.setattr(setup_py.BuildExt, "compile_sources", compile_sources)
    monkeypatch.setattr(setup_py.build_ext, "build_extension", link)

    runs = itertools.count()

    def run():
        out_dir = tmp_path / f"build{next(runs)}"
        ext = Extension("seqgen_fast._C", sources=["csrc/bindings.cpp", "csrc/lstm.cu"], language="c++")
        cmd = setup_py.BuildExt(Distribution({"name": "seqgen_fast", "ext_modules": [ext]}))
        cmd.build_lib, cmd.build_temp = str(out_dir / "lib"), str(out_dir / "tmp")
        cmd.ensure_finalized()
        cmd.run()
        return Path(cmd.get_ext_fullpath(ext.name))
    run.compiled, run.linked = [], []
    return run


def test_build_cache_hit_compiles_and_links_nothing(build, capsys):
    assert build().read_bytes() == b"extension 1"
    assert len(build.compiled) == len(build.linked) == 1
    assert build().read_bytes() == b"extension 1", "the cached extension"
    assert len(build.compiled) == len(build.linked) == 1, "an unchanged build comes from the cache"
    assert "copied from the build cache" in capsys.readouterr().out


def test_build_cache_misses_on_another_arch_list_or_changed_csrc(build, setup_py, tmp_path, monkeypatch):
    build()
    monkeypatch.setenv("SEQGEN_FAST_CUDA_ARCHS", "90a")
    build()
    assert len(build.compiled) == 2, "another arch list is another build"
    csrc = tmp_path / "csrc"
    shutil.copytree(ROOT / "csrc", csrc)
    monkeypatch.setattr(setup_py, "CSRC", csrc)
    (csrc / "common.cuh").write_text((csrc / "common.cuh").read_text() + "// changed\n")
    build()
    assert len(build.compiled) == 3, "changed csrc is another build"
    build()
    assert len(build.compiled) == 3


def test_build_links_the_compiled_objects_with_static_cudart(build):
    build()
    assert build.compiled == [["csrc/bindings.cpp", "csrc/lstm.cu"]]
    (ext,) = build.linked
    assert ext.sources == [] and "cudart_static" in ext.libraries
    assert sorted(Path(o).name for o in ext.extra_objects) == ["bindings.cpp.o", "lstm.cu.o"]


def _nvidia_smi(monkeypatch, stdout=None, error=None):
    """subprocess.run answers the nvidia-smi query with `stdout` or raises `error`."""
    real_run = subprocess.run

    def run(cmd, *args, **kwargs):
        if cmd[0] != "nvidia-smi":
            return real_run(cmd, *args, **kwargs)
        assert cmd[1:] == ["--query-gpu=compute_cap", "--format=csv,noheader"]
        if error is not None:
            raise error
        return subprocess.CompletedProcess(cmd, 0, stdout=stdout, stderr="")
    monkeypatch.setattr(subprocess, "run", run)


@pytest.mark.parametrize("caps,archs", [("9.0\n", "90a"), ("9.0\n9.0\n", "90a"), ("8.0\n", "80"),
                                        ("8.6\n8.0\n", "80;86"), ("8.9\n9.0\n", "89;90a"), ("12.0\n", "120")])
def test_native_archs_are_the_visible_gpus(setup_py, monkeypatch, caps, archs):
    _nvidia_smi(monkeypatch, stdout=caps)
    monkeypatch.setenv("SEQGEN_FAST_CUDA_ARCHS", "native")
    assert setup_py.cuda_archs() == archs
    monkeypatch.setenv("SEQGEN_FAST_CUDA_ARCHS", "80;90a")
    assert setup_py.cuda_archs() == "80;90a"


def test_hopper_only_arch_list_builds_sm_90a_alone(setup_py):
    assert setup_py.gencode_flags("90a") == ["-gencode=arch=compute_90a,code=sm_90a"]


@pytest.mark.parametrize("answer,match", [
    (dict(error=FileNotFoundError("nvidia-smi")), "needs a GPU that nvidia-smi shows"),
    (dict(error=subprocess.CalledProcessError(9, "nvidia-smi")), "needs a GPU that nvidia-smi shows"),
    (dict(stdout=""), "lists no GPU"),
    (dict(stdout="[N/A]\n"), "cannot read compute capability"),
])
def test_native_archs_without_a_visible_gpu_is_a_clear_error(setup_py, monkeypatch, answer, match):
    _nvidia_smi(monkeypatch, **answer)
    monkeypatch.setenv("SEQGEN_FAST_CUDA_ARCHS", "native")
    with pytest.raises(RuntimeError, match=match):
        setup_py.cuda_archs()
