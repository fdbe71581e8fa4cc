"""A host SIMT emulation of CUDA kernels, shared by the tests (no GPU needed).

g++ compiles a csrc/*.cu file as it is, with ``-DSEQGEN_HOST_EMULATION``: csrc/common.cuh then
includes ``emulation/seqgen_emulation.h`` instead of the CUDA headers and its seam macros
(``SEQGEN_DYNAMIC_SMEM``, ``SEQGEN_LAUNCH``) expand to the emulation's. Every CUDA thread is a host
thread; __syncthreads, grid.sync and each warp shuffle are std::barrier waits. What a launch checks
(shared memory poisoned with NaN bytes and guarded past its planned size, cooperative grids no larger
than the SM count, block and grid limits) is stated at the top of that header. This checks indexing,
tiling, vector/scalar paths, staging and barriers; it cannot check L1/L2 coherence, memory-model
races or timing.

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


def build(d, kernel: str, shim: str, name: str) -> ctypes.CDLL:
    """Compiles csrc/``kernel`` (a .cu file, as C++), the shim source text ``shim`` and the emulation's
    entry points into ``d``/lib``name``.so and loads it, with emu_error_message and emu_config typed."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation of the CUDA kernels")
    shim_path = os.path.join(d, f"{name}_shim.cpp")
    with open(shim_path, "w") as f:
        f.write(shim)
    lib = os.path.join(d, f"lib{name}.so")
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-DSEQGEN_HOST_EMULATION", f"-I{HEADERS}", f"-I{CSRC}",
           "-x", "c++", os.path.join(CSRC, kernel), "-x", "none", shim_path,
           os.path.join(HEADERS, "seqgen_emulation.cpp"), "-o", lib, "-lpthread"]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"{' '.join(cmd)}\n{res.stderr[-4000:]}"
    h = ctypes.CDLL(lib)
    h.emu_error_message.restype = ctypes.c_char_p
    h.emu_config.argtypes = [ctypes.c_int] * 3
    return h
