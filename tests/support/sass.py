"""The sm_90a SASS of the CUDA kernels of ``csrc/``, read on a machine without a GPU.

* :func:`sm90_binary` -- a binary holding the sm_90a code of a ``csrc/*.cu`` file: the built
  ``seqgen_fast._C`` when it is newer than every file of ``csrc/`` (what an install of this tree
  builds), else that file compiled alone to a cubin with ``setup.py``'s nvcc flags for 90a;
* :func:`sass_functions` -- ``cuobjdump -sass`` / ``-res-usage`` of that binary split per kernel,
  keyed by demangled name, for the kernels whose names contain a given word (a cell policy's name:
  ``LstmCell``, ``GruCell``), so a test can assert on instructions and on registers and stack;
* :func:`check_recurrent_kernels` -- those assertions for the kernels of csrc/recurrence.cuh
  instantiated with one cell policy: HMMA (and, persistent, LDSM) in the tensor-core kernels, FFMA
  and no HMMA in the exact ones, no local memory, registers within the launch bounds, and no
  NaN-dropping float min/max (FMNMX without .NAN; the non-finite policy propagates NaN as torch).
"""
from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent


def cuobjdump() -> str | None:
    """cuobjdump of the CUDA toolkit, else the one Triton ships, else None."""
    found = shutil.which("cuobjdump")
    spec = importlib.util.find_spec("triton")
    if found is None and spec is not None:
        bundled = Path(spec.origin).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
        found = str(bundled) if bundled.exists() else None
    return found


def _setup_module():
    spec = importlib.util.spec_from_file_location("seqgen_fast_setup_for_sass", ROOT / "setup.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def sm90_binary(kernel: str, out_dir: Path, built: Path | None) -> str:
    """A binary with the sm_90a SASS of ``csrc/<kernel>``: ``built`` (the extension) when it is newer
    than every file of csrc/, else ``kernel`` compiled alone into ``out_dir`` (skips without nvcc)."""
    newest_source = max(p.stat().st_mtime for p in (ROOT / "csrc").iterdir())
    if built is not None and built.stat().st_mtime > newest_source:
        return str(built)
    setup = _setup_module()
    home = setup.find_cuda_home()
    if home is None:
        pytest.skip(f"no CUDA toolkit to compile csrc/{kernel} for sm_90a, and _C is older than csrc/")
    out = out_dir / (Path(kernel).stem + "_sm90a.cubin")
    cmd = [str(home / "bin" / "nvcc"), *setup.nvcc_flags("90a"), "-cubin", "-o", str(out), str(ROOT / "csrc" / kernel)]
    cmd = [a for a in cmd if not a.startswith("-gencode=arch=compute_90a,code=compute")] + ["-arch=sm_90a"]
    run = subprocess.run(cmd, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-3000:]
    return str(out)


def sass_functions(tool: str, binary: str, option: str, word: str) -> dict[str, str]:
    """{demangled kernel name: its section of `cuobjdump <option>`} for the sm_90a kernels of
    ``binary`` whose demangled names contain ``word``."""
    run = subprocess.run([tool, option, "-arch", "sm_90a", binary], capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    parts = re.split(r"\n\s*Function\s*:?\s*(\S+?):?\n", "\n" + run.stdout)
    names = subprocess.run(["c++filt"], input="\n".join(parts[1::2]), capture_output=True, text=True).stdout.split("\n")
    return {n: body for n, body in zip(names, parts[2::2]) if word in n}


def tools_or_skip() -> str:
    """The cuobjdump to use; skips the test without one or without c++filt."""
    tool = cuobjdump()
    if tool is None or shutil.which("c++filt") is None:
        pytest.skip("no cuobjdump (CUDA toolkit or triton's bundled one) or c++filt")
    return tool


# csrc/recurrence.cuh: the kernels (by name) and their launch bounds (threads, blocks per SM)
RECURRENT_KERNELS = {"forward_kernel": (512, 1), "backward_kernel": (512, 1), "step_kernel<": (256, 2),
                     "step_kernel_ffma": (256, 2)}
HMMA = {"float": "HMMA.1688.F32.TF32", "__half": "HMMA.16816.F32", "__nv_bfloat16": "HMMA.16816.F32.BF16"}


# A float min/max that drops a NaN operand: FMNMX without .NAN in SASS (fminf/fmaxf), min/max.f16/f32
# without .NaN in PTX (Triton's tl.minimum/maximum without propagate_nan). The non-finite policy of the
# kernels (NaN propagates as in the op replaced) allows none on a path a value can take.
NAN_DROPPING_SASS = re.compile(r"\bFMNMX(?!\.NAN)")
NAN_DROPPING_PTX = re.compile(r"\b(?:min|max)\.(?!NaN)[\w.]*f(?:16|32)\b")


def check_recurrent_kernels(binary: str, cell: str) -> dict[str, int]:
    """Asserts the SASS facts above for every recurrence.cuh kernel of ``binary`` instantiated with the
    cell policy ``cell`` (its C++ name); returns how many kernels of each kind there are."""
    tool = tools_or_skip()
    sass = sass_functions(tool, binary, "-sass", cell)
    usage = sass_functions(tool, binary, "-res-usage", cell)
    kinds = dict.fromkeys(RECURRENT_KERNELS, 0)
    for name, body in sass.items():
        kind = next(k for k in kinds if k in name)
        kinds[kind] += 1
        assert not re.search(r"\b(LDL|STL)\b", body), f"{name}: local memory (spills) in the SASS"
        assert not NAN_DROPPING_SASS.search(body), f"{name}: a NaN-dropping float min/max in the SASS"
        if "MmaProduct" in name or kind == "step_kernel<":
            elem = re.search(rf"(?:MmaProduct<|{cell}, )(float|__half|__nv_bfloat16)", name).group(1)
            assert HMMA[elem] in body, f"{name}: no {HMMA[elem]} in the SASS"
            assert kind == "step_kernel<" or "LDSM" in body, f"{name}: W_hh fragments are read through ldmatrix"
        else:
            assert "HMMA" not in body and "FFMA" in body, f"{name}: the exact path runs on FFMA"
        res = usage[name]
        regs, stack = int(re.search(r"REG:(\d+)", res).group(1)), int(re.search(r"STACK:(\d+)", res).group(1))
        threads, blocks = RECURRENT_KERNELS[kind]
        assert regs <= 65536 // (threads * blocks) and stack == 0, f"{name}: {regs} registers, stack {stack}"
    return kinds
