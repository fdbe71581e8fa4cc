"""Ahead-of-time compiles of the Triton kernels for Hopper (sm_90) on a machine without a GPU.

The interpreter (``TRITON_INTERPRET=1``) runs kernels as numpy: it cannot see compile errors,
register or shared-memory limits, or how loads and dots lower. Triton's front end, its NVIDIA
backend and ptxas need no GPU, so each kernel family's tests also compile their kernels here, as
the JIT would specialise them (16-byte aligned pointers and the listed integers, unit strides as
constants), and assert facts about the PTX.

A compile runs in a subprocess (this file as a script, the spec as JSON on stdin): Triton cannot
compile while its interpreter is on in the test process. ``$SEQGEN_FAST_AOT_PYTHON`` names another
Python to run it with (one with another Triton installed: the GPU machine's 3.6, say), so the same
checks cover that version. Gluon kernels (``triton.experimental.gluon.jit``) compile the same way.
"""
from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys

import pytest


def pointers(dtype: str, *names: str) -> dict[str, str]:
    """Signature entries ``{name: "*dtype"}`` (Triton type names: fp32, fp16, bf16, i32, i64, i1)."""
    return {n: "*" + dtype for n in names}


def compile_sm90(module: str, kernel: str, *, types: dict[str, str], constexprs: dict, aligned: tuple = (),
                 unaligned: tuple = (), num_warps: int = 4, num_stages: int = 3) -> dict:
    """Compile ``module.kernel`` for sm_90; return ``{"ptx": str, "shared": bytes of shared memory,
    "registers": per thread, "spill_bytes": spill stores, "sass": the disassembly (empty without
    cuobjdump), "ptxas_warnings": ptxas's performance notes (such as wgmma serialisation),
    "triton": the Triton version that compiled it}`` (registers, spills, notes from ``ptxas -v``).

    ``types`` gives the Triton type of each runtime argument that is not ``i32`` (pointers as
    ``"*bf16"``...), ``constexprs`` the value of each constexpr (unit strides may be passed as
    constants too, as the JIT does), ``aligned`` the non-pointer integers the JIT would find
    divisible by 16, ``unaligned`` the pointers it would not find 16-byte aligned (every other
    pointer is). Skips when Triton's NVIDIA backend has no ptxas.
    """
    spec = dict(module=module, kernel=kernel, types=types, constexprs=constexprs, aligned=list(aligned),
                unaligned=list(unaligned), num_warps=num_warps, num_stages=num_stages)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [root, env.get("PYTHONPATH")]))
    python = os.environ.get("SEQGEN_FAST_AOT_PYTHON") or sys.executable
    run = subprocess.run([python, os.path.abspath(__file__)], input=json.dumps(spec), env=env,
                         capture_output=True, text=True, timeout=600)
    if run.returncode != 0 and "ptxas" in run.stderr and "not found" in run.stderr:
        pytest.skip("no ptxas for Triton's NVIDIA backend")
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(run.stdout.strip().splitlines()[-1])


def _compile(spec: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn = getattr(importlib.import_module(spec["module"]), spec["kernel"])
    while not isinstance(fn, triton.runtime.jit.JITFunction):  # unwrap autotuners / heuristics
        fn = fn.fn
    names = list(fn.arg_names)
    const, types = spec["constexprs"], spec["types"]
    unknown = (set(const) | set(types) | set(spec["aligned"]) | set(spec["unaligned"])) - set(names)
    if unknown:
        raise KeyError(f"{spec['kernel']} has no arguments {sorted(unknown)}")
    sig = {n: "constexpr" if n in const else types.get(n, "i32") for n in names}
    aligned = [n for n in names if n not in const and n not in spec["unaligned"]
               and (sig[n].startswith("*") or n in spec["aligned"])]
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned}
    source = ASTSource
    if getattr(fn, "is_gluon", lambda: False)():
        from triton.experimental.gluon._runtime import GluonASTSource as source
    compiled = triton.compile(source(fn, sig, const, attrs), target=GPUTarget("cuda", 90, 32),
                              options={"num_warps": spec["num_warps"], "num_stages": spec["num_stages"]})
    ptx = compiled.asm["ptx"]
    return {"ptx": ptx, "shared": compiled.metadata.shared, "triton": triton.__version__, **_ptxas_usage(ptx)}


def _ptxas_usage(ptx: str) -> dict:
    """Registers per thread, spill-store bytes and performance notes of ``ptx`` as ``ptxas -v``
    reports them, and the SASS (cuobjdump from Triton's NVIDIA backend, when it ships one)."""
    import re
    import tempfile

    from triton.backends.nvidia.compiler import get_ptxas

    arch = re.search(r"^\.target\s+(sm_\w+)", ptx, re.M).group(1)
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "kernel.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        ptxas = get_ptxas(90).path
        obj = os.path.join(tmp, "k.o")
        run = subprocess.run([ptxas, "-v", f"--gpu-name={arch}", src, "-o", obj], capture_output=True, text=True,
                             check=True)
        cuobjdump = os.path.join(os.path.dirname(ptxas), "cuobjdump")
        sass = subprocess.run([cuobjdump, "-sass", obj], capture_output=True, text=True,
                              check=True).stdout if os.path.exists(cuobjdump) else ""
    info = run.stdout + run.stderr
    return {"registers": int(re.search(r"Used (\d+) registers", info).group(1)),
            "spill_bytes": int(re.search(r"(\d+) bytes spill stores", info).group(1)),
            "ptxas_warnings": re.findall(r"Potential Performance Loss: [^\n]*", info), "sass": sass}


def float_max_forms(facts: dict) -> dict[str, int]:
    """Counts of the float32 max instructions of a compile: ``nan_ptx`` (``max.NaN.f32``: NaN if either
    operand is), ``drop_ptx`` (``max.f32`` / ``max.ftz.f32``: returns the other operand of a NaN),
    and their SASS forms ``nan_sass`` (``FMNMX.NAN``) and ``drop_sass`` (other ``FMNMX``; 0 without
    cuobjdump). Where a running max must keep a NaN, the dropping forms must be absent."""
    import re

    ptx, sass = facts["ptx"], facts.get("sass", "")
    return {"nan_ptx": len(re.findall(r"\bmax\.NaN\.f32\b", ptx)),
            "drop_ptx": len(re.findall(r"\bmax(?:\.ftz)?\.f32\b", ptx)),
            "nan_sass": len(re.findall(r"\bFMNMX\.NAN\b", sass)),
            "drop_sass": len(re.findall(r"\bFMNMX\b", sass)) - len(re.findall(r"\bFMNMX\.NAN\b", sass))}


def sass_loops(sass: str) -> list[tuple[int, int, str]]:
    """Every loop of a SASS listing (a backward branch to its head): (first line, last line, body)."""
    import re

    lines = sass.splitlines()
    at = [int(m.group(1), 16) if (m := re.search(r"/\*([0-9a-f]{4,})\*/", line)) else None for line in lines]
    loops = []
    for i, line in enumerate(lines):
        m = re.search(r"\bBRA\s+0x([0-9a-f]+)", line)
        if m and at[i] is not None and int(m.group(1), 16) < at[i]:
            head = next(k for k, a in enumerate(at) if a is not None and a >= int(m.group(1), 16))
            loops.append((head, i, "\n".join(lines[head:i + 1])))
    return loops


if __name__ == "__main__":
    print(json.dumps(_compile(json.load(sys.stdin))))
