"""A host SIMT emulation of CUDA kernels, shared by the tests (no GPU needed).

g++ compiles a csrc/*.cu file as it is, with ``-DSEQGEN_HOST_EMULATION``: csrc/common.cuh then
includes ``emulation/seqgen_emulation.h`` instead of the CUDA headers and its seam macros
(``SEQGEN_DYNAMIC_SMEM``, ``SEQGEN_LAUNCH``) and PTX-level primitives (mma, ldmatrix, tf32
rounding, release/acquire flags) become the emulation's. Every CUDA thread is a host thread;
__syncthreads, __syncwarp, grid.sync and each warp collective are std::barrier waits; inter-block
flags are std::atomic release/acquire operations, and cooperative launches start their blocks in a
seeded random order. What a launch checks (shared memory poisoned with NaN bytes and guarded past its
planned size, cooperative grids no larger than the SMs the context may use, block and grid limits,
ldmatrix addresses) is stated at the top of that header. This checks indexing, tiling, fragment
layouts, vector/scalar paths, staging, barriers and the handoff protocol (a ThreadSanitizer build,
:func:`build_program` with ``sanitize="thread"``, checks its happens-before edges); it cannot check
L1/L2 behaviour or timing.

A test writes a shim: ``#include "seqgen_emulation_shim.h"``, its launcher header, then
``extern "C"`` functions wrapping the launcher in ``EMU_CALL``; :func:`build` compiles it with the
kernel file into a ``ctypes.CDLL`` (or skips the test when g++ is missing).
"""
from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
CSRC = os.path.normpath(os.path.join(HERE, "..", "..", "csrc"))
HEADERS = os.path.join(HERE, "emulation")


def _compile(d: str, kernel: str | None, source: str, name: str, output: str,
             flags: list[str]) -> subprocess.CompletedProcess:
    """g++ of csrc/``kernel`` (as C++; None: the source alone, e.g. a shim of csrc/ device helpers), the
    source text ``source`` (saved as ``d``/``name``.cpp) and the emulation's entry points into
    ``output``; skips the test when g++ is missing."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation of the CUDA kernels")
    path = os.path.join(d, f"{name}.cpp")
    with open(path, "w") as f:
        f.write(source)
    kernel_source = ["-x", "c++", os.path.join(CSRC, kernel), "-x", "none"] if kernel else []
    cmd = [cxx, "-std=c++20", *flags, "-DSEQGEN_HOST_EMULATION", f"-I{HEADERS}", f"-I{CSRC}", *kernel_source,
           path, os.path.join(HEADERS, "seqgen_emulation.cpp"), "-o", output, "-lpthread"]
    return subprocess.run(cmd, capture_output=True, text=True)


def build(d, kernel: str | None, shim: str, name: str) -> ctypes.CDLL:
    """Compiles csrc/``kernel`` (a .cu file, as C++; None: the shim alone), the shim source text ``shim``
    and the emulation's entry points into ``d``/lib``name``.so and loads it, with emu_error_message and
    emu_config typed."""
    lib = os.path.join(d, f"lib{name}.so")
    res = _compile(d, kernel, shim, f"{name}_shim", lib, ["-O1", "-fPIC", "-shared"])
    assert res.returncode == 0, f"{' '.join(res.args)}\n{res.stderr[-4000:]}"
    h = ctypes.CDLL(lib)
    h.emu_error_message.restype = ctypes.c_char_p
    h.emu_config.argtypes = [ctypes.c_int] * 3
    return h


def build_program(d, kernel: str, main: str, name: str, sanitize: str | None = None) -> str:
    """Like :func:`build`, but an executable with ``main`` (a C++ source with a main function), built
    with ``-fsanitize=<sanitize>`` when given (a sanitizer runtime cannot be loaded into Python through
    ctypes). Returns its path; skips the test when the toolchain has no such sanitizer."""
    exe = os.path.join(d, name)
    flags = ["-O1", "-g"] + ([f"-fsanitize={sanitize}"] if sanitize else [])
    res = _compile(d, kernel, main, f"{name}_main", exe, flags)
    if res.returncode != 0 and sanitize and ("-ltsan" in res.stderr or "-lasan" in res.stderr or "sanitize" in res.stderr):
        pytest.skip(f"g++ cannot build with -fsanitize={sanitize} here: {res.stderr[-300:]}")
    assert res.returncode == 0, f"{' '.join(res.args)}\n{res.stderr[-4000:]}"
    return exe
