"""Build of seqgen_fast._C: csrc/*.cu through nvcc, csrc/*.cpp through the host compiler with
pybind11, linked into one extension with cudart linked statically. No libtorch is involved, so
one build serves every torch version.

Environment:
  SEQGEN_FAST_CUDA_ARCHS  semicolon list of SM targets (default "80;90a"); PTX of the newest
                          plain target (no 'a' suffix) is embedded for GPUs newer than the list.
  SEQGEN_FAST_SKIP_CUDA=1 install without _C (also what happens when nvcc is not found).
  CUDA_HOME / nvcc on PATH  where the toolkit is.
  SEQGEN_FAST_NVCC_THREADS  parallel nvcc compilation threads per file (default 2).
"""
import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"


def find_cuda_home():
    """The CUDA toolkit root: CUDA_HOME/CUDA_PATH, nvcc's toolkit, or /usr/local/cuda; it must hold
    bin/nvcc and include/cuda_runtime.h (a wrapper script named nvcc on PATH is looked through)."""
    candidates = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    nvcc = shutil.which("nvcc")
    if nvcc:
        candidates.append(Path(nvcc).resolve().parent.parent)
    candidates.append("/usr/local/cuda")
    for home in candidates:
        if home and (Path(home) / "bin" / "nvcc").exists() and (Path(home) / "include" / "cuda_runtime.h").exists():
            return Path(home)
    return None


def gencode_flags(archs: str):
    flags, plain = [], []
    for a in [x.strip() for x in archs.replace(",", ";").split(";") if x.strip()]:
        a = a.lower().removeprefix("sm_").replace(".", "")
        flags.append(f"-gencode=arch=compute_{a},code=sm_{a}")
        if a.isdigit():
            plain.append(a)
    if plain:
        newest = max(plain, key=int)
        flags.append(f"-gencode=arch=compute_{newest},code=compute_{newest}")
    return flags


class BuildExt(build_ext):
    """build_ext that compiles .cu sources with nvcc and links them with the .cpp objects."""

    def build_extension(self, ext):
        cuda_home = find_cuda_home()
        nvcc = str(cuda_home / "bin" / "nvcc")
        archs = os.environ.get("SEQGEN_FAST_CUDA_ARCHS", "80;90a")
        cu = [s for s in ext.sources if s.endswith(".cu")]
        ext.sources = [s for s in ext.sources if not s.endswith(".cu")]
        obj_dir = Path(self.build_temp) / "cu"
        obj_dir.mkdir(parents=True, exist_ok=True)
        threads = os.environ.get("SEQGEN_FAST_NVCC_THREADS", "2")
        for src in cu:
            obj = obj_dir / (Path(src).stem + ".o")
            cmd = [nvcc, "-c", src, "-o", str(obj), "-O3", "-std=c++17", "--use_fast_math",
                   "-Xcompiler", "-fPIC", "-lineinfo", f"--threads={threads}",
                   f"-I{CSRC}", "--expt-relaxed-constexpr", *gencode_flags(archs)]
            print(" ".join(cmd), flush=True)
            subprocess.check_call(cmd)
            ext.extra_objects.append(str(obj))
        ext.include_dirs += [str(cuda_home / "include"), str(CSRC)]
        libdir = cuda_home / "lib64"
        if not libdir.exists():
            libdir = cuda_home / "lib"
        ext.library_dirs.append(str(libdir))
        ext.libraries += ["cudart_static", "dl", "rt", "pthread"]
        super().build_extension(ext)


def extensions():
    if os.environ.get("SEQGEN_FAST_SKIP_CUDA", "0") not in ("", "0"):
        print("seqgen_fast: SEQGEN_FAST_SKIP_CUDA set; installing without seqgen_fast._C", file=sys.stderr)
        return []
    if find_cuda_home() is None:
        print("seqgen_fast: nvcc not found; installing without seqgen_fast._C "
              "(the cuda backend will report it as unavailable)", file=sys.stderr)
        return []
    import pybind11

    sources = sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cpp")) + \
        sorted(str(p.relative_to(ROOT)) for p in CSRC.glob("*.cu"))
    return [Extension("seqgen_fast._C", sources=sources, include_dirs=[pybind11.get_include()],
                      extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden"], language="c++")]


setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
