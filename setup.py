"""Build of seqgen_fast._C: csrc/*.cu through nvcc, csrc/*.cpp through the host compiler with
pybind11, linked into one extension with cudart linked statically. No libtorch is involved, so
one build serves every torch version.

Environment:
  SEQGEN_FAST_CUDA_ARCHS  semicolon list of SM targets (default "80;90a"); PTX of the newest
                          plain target (no 'a' suffix) is embedded for GPUs newer than the list.
                          "native": only the GPUs nvidia-smi lists on this machine (compute
                          capability 9.0 -> 90a for Hopper's arch-specific features, 8.0 -> 80,
                          8.6 -> 86, ...); an error when nvidia-smi shows no GPU.
  SEQGEN_FAST_SKIP_CUDA=1 install without _C (also what happens when nvcc is not found).
  CUDA_HOME / nvcc on PATH  where the toolkit is.
  SEQGEN_FAST_BUILD_JOBS  CPUs the build uses (default: all this process may run on): that many
                          sources compile at a time, and each nvcc compiles its targets in
                          parallel on its share of them (--threads).
  SEQGEN_FAST_NVCC_THREADS  --threads of each nvcc instead of that share.
  SEQGEN_FAST_BUILD_CACHE directory of the build cache (default build/seqgen_fast_cache in the
                          source tree: pip builds in a new temporary directory each time).

Build cache: the linked extension is kept under <cache>/<key>/, the key hashing everything that
decides it -- the content of every file in csrc/, the nvcc flags with the arch list, nvcc's version,
the host compiler and its flags, pybind11's version, the Python ABI (EXT_SUFFIX) and setup.py itself.
A build whose key is there copies that extension and compiles nothing; any change to those inputs
misses. Old entries stay until the directory is removed.
"""
import copy
import hashlib
import json
import os
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()
CSRC = ROOT / "csrc"
SETUP = ROOT / "setup.py"


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


def arch_of_compute_cap(cap: str) -> str:
    """nvidia-smi's compute capability ("9.0", "8.6") as an SM target: Hopper (9.x) gets its 'a'
    variant (wgmma, setmaxnreg), as in the default list; every other GPU its plain target."""
    major, dot, minor = cap.strip().partition(".")
    if not (major.isdigit() and dot and minor.isdigit()):
        raise RuntimeError(f"SEQGEN_FAST_CUDA_ARCHS=native: cannot read compute capability {cap!r} from nvidia-smi")
    return f"{major}{minor}" + ("a" if major == "9" else "")


def native_archs() -> str:
    """The SM targets of the GPUs visible on this machine, from nvidia-smi, as an arch list."""
    cmd = ["nvidia-smi", "--query-gpu=compute_cap", "--format=csv,noheader"]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as e:
        raise RuntimeError(f"SEQGEN_FAST_CUDA_ARCHS=native needs a GPU that nvidia-smi shows ({' '.join(cmd)} "
                           f"failed: {e}); set an explicit list instead, e.g. SEQGEN_FAST_CUDA_ARCHS='80;90a'") from e
    caps = [line for line in out.splitlines() if line.strip()]
    if not caps:
        raise RuntimeError("SEQGEN_FAST_CUDA_ARCHS=native: nvidia-smi lists no GPU here; set an explicit list "
                           "instead, e.g. SEQGEN_FAST_CUDA_ARCHS='80;90a'")
    return ";".join(sorted({arch_of_compute_cap(c) for c in caps}))


def cuda_archs() -> str:
    """SEQGEN_FAST_CUDA_ARCHS with "native" resolved."""
    archs = os.environ.get("SEQGEN_FAST_CUDA_ARCHS", "80;90a")
    return native_archs() if archs.strip().lower() == "native" else archs


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


def nvcc_flags(archs: str):
    """nvcc's flags for every .cu file (without the file names and --threads, which do not change the
    object)."""
    return ["-O3", "-std=c++17", "--use_fast_math", "-Xcompiler", "-fPIC", "-lineinfo", f"-I{CSRC}",
            "--expt-relaxed-constexpr", *gencode_flags(archs)]


def build_jobs() -> int:
    """SEQGEN_FAST_BUILD_JOBS, else the CPUs this process may run on."""
    jobs = os.environ.get("SEQGEN_FAST_BUILD_JOBS", "")
    if jobs:
        if not jobs.isdigit() or int(jobs) < 1:
            raise ValueError(f"SEQGEN_FAST_BUILD_JOBS must be a positive integer (got {jobs!r})")
        return int(jobs)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def nvcc_version(nvcc: str) -> str:
    return subprocess.run([nvcc, "--version"], capture_output=True, text=True, check=True).stdout


def cache_key(csrc: Path, *inputs) -> str:
    """Hash of the content of every file under csrc and of `inputs` (JSON-able: flags, versions)."""
    files = [[p.relative_to(csrc).as_posix(), hashlib.sha256(p.read_bytes()).hexdigest()]
             for p in sorted(csrc.rglob("*")) if p.is_file()]
    return hashlib.sha256(json.dumps([files, *inputs]).encode()).hexdigest()[:24]


def cache_root() -> Path:
    return Path(os.environ.get("SEQGEN_FAST_BUILD_CACHE") or ROOT / "build" / "seqgen_fast_cache")


class BuildExt(build_ext):
    """build_ext that compiles every source at once (.cu with nvcc, .cpp with the host compiler),
    links them with cudart, and reuses the extension of an identical earlier build (the cache above)."""

    def build_extension(self, ext):
        cuda_home = find_cuda_home()
        nvcc = [str(cuda_home / "bin" / "nvcc"), *nvcc_flags(cuda_archs())]
        libdir = cuda_home / "lib64" if (cuda_home / "lib64").exists() else cuda_home / "lib"
        link = copy.copy(ext)  # what setuptools links: the objects and cudart; no sources left to compile
        link.sources = []
        link.include_dirs = [*ext.include_dirs, str(cuda_home / "include"), str(CSRC)]
        link.library_dirs = [*ext.library_dirs, str(libdir)]
        link.libraries = [*ext.libraries, "cudart_static", "dl", "rt", "pthread"]

        out = Path(self.get_ext_fullpath(ext.name))
        cached = cache_root() / self.key_of(link, nvcc) / out.name
        if cached.is_file():
            out.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(cached, out)
            print(f"seqgen_fast: csrc/ and the build flags unchanged: {ext.name} copied from the build cache "
                  f"{cached.parent}, nothing compiled", flush=True)
            return
        link.extra_objects = [*self.compile_sources(ext.sources, nvcc, link), *ext.extra_objects]
        link.depends = [*ext.depends, *link.extra_objects]  # objects newer than an old output: link again
        super().build_extension(link)
        cached.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(out, cached.with_suffix(".tmp"))
        os.replace(cached.with_suffix(".tmp"), cached)  # a whole file or none, even if interrupted

    def key_of(self, ext, nvcc):
        """The cache key of building `ext` with the `nvcc` command: csrc/, nvcc's flags and version, the
        host compiler's and linker's commands with the extension's flags, pybind11, the Python ABI, and
        this file (its build logic)."""
        import pybind11

        tools = [getattr(self.compiler, name, []) for name in ("compiler_so", "compiler_so_cxx", "linker_so",
                                                                "linker_so_cxx")]
        host = [*(arg for tool in tools for arg in tool), *ext.extra_compile_args, *ext.extra_link_args,
                *ext.include_dirs, *ext.library_dirs, *ext.libraries, *(f"-D{k}={v}" for k, v in ext.define_macros)]
        # pip's build isolation puts pybind11 under a new temporary path each time: its version stands for it
        host = [arg.replace(pybind11.get_include(), "<pybind11>") for arg in host]
        return cache_key(CSRC, nvcc[1:], nvcc_version(nvcc[0]), host, pybind11.__version__,
                         sysconfig.get_config_var("EXT_SUFFIX"), hashlib.sha256(SETUP.read_bytes()).hexdigest())

    def compile_sources(self, sources, nvcc, ext):
        """Object files of `sources`, build_jobs() compiles at a time: .cu with the nvcc command
        (--threads from the CPUs left per compile), the rest with the host compiler as setuptools would."""
        jobs = build_jobs()
        workers = min(jobs, len(sources))
        threads = os.environ.get("SEQGEN_FAST_NVCC_THREADS") or str(max(1, jobs // workers))
        obj_dir = Path(self.build_temp)
        obj_dir.mkdir(parents=True, exist_ok=True)

        def compile_one(src):
            if src.endswith(".cu"):
                obj = obj_dir / (Path(src).stem + ".cu.o")
                cmd = [nvcc[0], "-c", src, "-o", str(obj), *nvcc[1:], f"--threads={threads}"]
                print(" ".join(cmd), flush=True)
                subprocess.check_call(cmd)
                return str(obj)
            return self.compiler.compile([src], output_dir=str(obj_dir), macros=ext.define_macros,
                                         include_dirs=ext.include_dirs, debug=self.debug,
                                         extra_postargs=ext.extra_compile_args, depends=ext.depends)[0]

        # the .cu files first: they take longest
        ordered = sorted(sources, key=lambda s: not s.endswith(".cu"))
        with ThreadPoolExecutor(workers) as pool:
            return list(pool.map(compile_one, ordered))


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
    # -g0 over Python's default -g: debug info of the pybind11 templates would take a third of the
    # host compile time and 90% of the extension's size (the device code keeps -lineinfo)
    return [Extension("seqgen_fast._C", sources=sources, include_dirs=[pybind11.get_include()],
                      extra_compile_args=["-O3", "-std=c++17", "-fvisibility=hidden", "-g0"], language="c++")]


if __name__ == "__main__":  # importable by tests/test_build.py without building
    setup(ext_modules=extensions(), cmdclass={"build_ext": BuildExt})
