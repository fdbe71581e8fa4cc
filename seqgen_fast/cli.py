"""``seqgen-fast`` (also ``python -m seqgen_fast``): info, check, bench.

* ``info``  -- versions, the device, each backend (available, or why not), and what each backend
  of each op takes.
* ``check`` -- runs every registered op check on fresh random inputs on the current device under
  every backend, against the project's float64 reference; prints a pass/fail table with relative
  error norms and what was verified on which backend; exits non-zero on any failure.
* ``bench`` -- runs the cases of ``seqgen_fast.bench`` (ours beside each anchor, in one run), prints
  the ratio table, writes JSON/CSV and optionally a PNG chart. Needs a GPU: without one it says so,
  and what ``check`` verified instead, and prints no timings (``--dry-run`` runs the pipeline at
  tiny shapes on the CPU, measuring nothing).
"""
from __future__ import annotations

import argparse
import datetime
import importlib
import importlib.metadata
import os
import platform
import subprocess
import sys

import torch

from . import __version__
from ._backend import BACKENDS, ENV_VAR, backend_unavailable, dispatchers, interpret_mode
from ._families import FAMILIES, NAMES

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16, "float64": torch.float64}


def _version(pkg: str) -> str:
    try:
        return importlib.metadata.version(pkg)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _device_line() -> str:
    if not torch.cuda.is_available():
        return "no CUDA device (CPU only: the reference backend serves every op; GPU timings need a GPU)"
    from . import _ext

    info = _ext.device_info(0)
    line = f"{info['name']} (sm_{info['major']}{info['minor']}, {info['multiprocessor_count']} SMs"
    if "l2_cache_size" in info:
        line += f", L2 {info['l2_cache_size'] / 2**20:.0f} MiB"
    return line + f"), {torch.cuda.device_count()} visible"


def _load_ops() -> None:
    """Import every family's ops module (registering its dispatchers), from the manifest."""
    for f in FAMILIES:
        importlib.import_module(f.ops)


def cmd_info(args) -> int:
    from . import _ext

    print(f"seqgen_fast {__version__}")
    print(f"python      {platform.python_version()} ({sys.platform})")
    print(f"torch       {torch.__version__} (CUDA {torch.version.cuda or 'none'})")
    for pkg in ("triton", "numpy", "diffusers", "transformers"):
        print(f"{pkg:11} {_version(pkg)}")
    if _ext.C is not None:
        rt = _ext.C.cuda_runtime_version
        print(f"_C          built (CUDA runtime {rt // 1000}.{rt % 1000 // 10}, families: {', '.join(_ext.C.families) or 'none'})")
    else:
        print(f"_C          not built: {_ext.reason}")
    print(f"device      {_device_line()}")
    print(f"interpreter TRITON_INTERPRET={'1' if interpret_mode() else '0'}")
    forced = os.environ.get(ENV_VAR, "")
    print(f"forced      {ENV_VAR}={forced}" if forced else f"forced      none ({ENV_VAR} unset)")
    print("backends:")
    for name in BACKENDS:
        why = backend_unavailable(name)
        print(f"  {name:10} {'available' if why is None else 'unavailable: ' + why}")
    _load_ops()
    print("ops (backends in dispatch order, and the dtypes each takes):")
    for op, d in sorted(dispatchers().items()):
        takes = "; ".join(f"{b} [{d.impls[b].caps.describe() if d.impls[b].caps else 'any'}]"
                          for b in d.order if b in d.impls)
        print(f"  {op:30} {takes}")
    print("families    " + ", ".join(NAMES))
    return 0


def _verified(rows, device: torch.device) -> str:
    """What a check run verified, per backend: how many outputs passed, or why none ran."""
    lines = []
    for backend in dict.fromkeys(r.backend for r in rows):
        mine = [r for r in rows if r.backend == backend]
        ran = [r for r in mine if r.status != "n/a"]
        if ran:
            where = " (Triton's CPU interpreter, not the compiled kernels)" if backend == "triton" and \
                device.type == "cpu" else ""
            lines.append(f"  {backend}: {sum(r.status == 'pass' for r in ran)} of {len(ran)} outputs passed on "
                         f"{device}{where}")
        else:
            lines.append(f"  {backend}: not run here ({backend_unavailable(backend) or mine[0].note})")
    return "\n".join(lines)


def cmd_check(args) -> int:
    from .checks import run_checks

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else None
    backends = tuple(args.backend) if args.backend else BACKENDS
    rows = run_checks(device, names=args.op, backends=backends, dtypes=dtypes, families=args.family)
    head = f"{'check':32} {'backend':10} {'dtype':9} {'output':12} {'rel err':>10} {'tol':>8}  status"
    print(f"seqgen-fast check on {device} ({_device_line() if device.type == 'cuda' else 'cpu'})")
    print(head)
    print("-" * len(head))
    for r in rows:
        err = f"{r.rel_err:.2e}" if r.rel_err is not None else "-"
        tol = f"{r.tol:.0e}" if r.tol is not None else "-"
        note = f"  {r.note}" if r.note else ""
        print(f"{r.check:32} {r.backend:10} {r.dtype:9} {r.output:12} {err:>10} {tol:>8}  {r.status}{note}")
    if not rows:
        print("no checks registered", file=sys.stderr)
        return 1
    failed = sum(r.status == "FAIL" for r in rows)
    passed = sum(r.status == "pass" for r in rows)
    print(f"{passed} passed, {failed} failed, {sum(r.status == 'n/a' for r in rows)} not applicable")
    print("verified, by backend:")
    print(_verified(rows, device))
    return 1 if failed else 0


def _no_gpu_message() -> str:
    interp = interpret_mode()
    return ("seqgen-fast bench: no CUDA device here, so nothing is timed: GPU timings need a GPU, and CPU times "
            "of GPU kernels would mislead.\n"
            "What `seqgen-fast check` verifies on this machine: every op on the reference backend (plain "
            "PyTorch on the CPU) against the float64 reference"
            + (", and the Triton kernels in Triton's CPU interpreter" if interp else "")
            + ". The compiled CUDA and Triton kernels have not run here"
            + ("" if interp else " (TRITON_INTERPRET=1 runs the Triton kernels in the interpreter)")
            + ". Run `seqgen-fast check` and `seqgen-fast bench` on a CUDA machine to verify and time them.")


def cmd_bench(args) -> int:
    from . import bench

    if args.dry_run:
        mode, device = "tiny", "cpu"
    elif not torch.cuda.is_available():
        print(_no_gpu_message())
        return 0
    else:
        mode, device = ("full" if args.full else "headline" if args.headline else "quick"), "cuda"
    cases = list(bench.all_cases(mode, args.family or NAMES, device))
    sha = bench.git_sha()
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.family} {case.op} {case.shape} {str(case.dtype).removeprefix('torch.')}",
              file=sys.stderr, flush=True)
        rows.extend(bench.run_case(case, __version__, sha))
    print(bench.format_table(rows))
    meta = {"date": datetime.date.today().isoformat(), "mode": mode, "git_sha": sha, "seqgen_fast": __version__,
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "device": torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: not a measurement)",
            "driver": _driver_version() if device == "cuda" else "none"}
    bench.write_rows(rows, args.json, args.csv, meta)
    if args.plot:
        bench.plot(rows, args.plot)
    return 0


def bench_script(family: str, argv: list[str]) -> int:
    """``python benchmarks/bench_<family>.py [--quick|--headline|--dry-run] [--json F] [--csv F] [--plot F]``:
    ``seqgen-fast bench`` of one family, every case (``--full``) unless a mode is given."""
    modes = {"--quick", "--headline", "--full", "--dry-run"}
    return main(["bench", "--family", family, *([] if modes & set(argv) else ["--full"]), *argv])


def _driver_version() -> str:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqgen-fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and each backend's state").set_defaults(fn=cmd_info)

    c = sub.add_parser("check", help="run every op against its reference on fresh random inputs")
    c.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    c.add_argument("--backend", action="append", choices=BACKENDS, help="limit to this backend (repeatable)")
    c.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="limit to this dtype (repeatable)")
    c.add_argument("--family", action="append", choices=NAMES, help="limit to this kernel family (repeatable)")
    c.add_argument("--op", action="append", help="limit to this check name (repeatable)")
    c.set_defaults(fn=cmd_check)

    b = sub.add_parser("bench", help="time ours beside the anchors (GPU only)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few key shapes per family (default)")
    size.add_argument("--headline", action="store_true", help="one headline case per family")
    size.add_argument("--full", action="store_true", help="every anchor shape")
    size.add_argument("--dry-run", action="store_true",
                      help="the headline cases at tiny shapes on the CPU: proves the pipeline, measures nothing")
    b.add_argument("--family", action="append", choices=NAMES, help="limit to this kernel family (repeatable)")
    b.add_argument("--json", help="write rows and metadata as JSON here")
    b.add_argument("--csv", help="write rows as CSV here")
    b.add_argument("--plot", help="write a PNG chart of ours against each anchor here")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
