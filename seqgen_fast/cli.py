"""``seqgen-fast`` (also ``python -m seqgen_fast``): info, check, bench.

* ``info``  -- versions, the device, and each backend: available, or why not.
* ``check`` -- runs every registered op check on fresh random inputs on the current device under
  every backend, against its reference; prints a pass/fail table with relative error norms; exits
  non-zero on any failure.
* ``bench`` -- runs ``benchmarks/bench_*.py`` (ours beside each anchor, in one run), prints the
  ratio table, writes JSON/CSV and optionally a PNG chart. Needs a GPU: without one it says so and
  prints no timings.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import platform
import sys
from pathlib import Path

import torch

from . import __version__
from ._backend import BACKENDS, ENV_VAR, backend_unavailable, interpret_mode

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
    return 0


def cmd_check(args) -> int:
    from ._checks import run_checks
    from .ops import load_all

    load_all()
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtypes = [DTYPES[d] for d in args.dtype] if args.dtype else None
    backends = tuple(args.backend) if args.backend else BACKENDS
    rows = run_checks(device, names=args.op, backends=backends, dtypes=dtypes)
    head = f"{'check':28} {'backend':10} {'dtype':9} {'output':12} {'rel err':>10} {'tol':>8}  status"
    print(f"seqgen-fast check on {device} ({_device_line() if device.type == 'cuda' else 'cpu'})")
    print(head)
    print("-" * len(head))
    for r in rows:
        err = f"{r.rel_err:.2e}" if r.rel_err is not None else "-"
        tol = f"{r.tol:.0e}" if r.tol is not None else "-"
        note = f"  {r.note}" if r.note else ""
        print(f"{r.check:28} {r.backend:10} {r.dtype:9} {r.output:12} {err:>10} {tol:>8}  {r.status}{note}")
    failed = sum(r.status == "FAIL" for r in rows)
    passed = sum(r.status == "pass" for r in rows)
    print(f"{passed} passed, {failed} failed, {sum(r.status == 'n/a' for r in rows)} not applicable")
    if not rows:
        print("no checks registered", file=sys.stderr)
        return 1
    return 1 if failed else 0


def _benchmarks_dir(arg: str | None) -> Path:
    if arg:
        return Path(arg)
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    return here


def _plot(rows, path: str) -> None:
    """Bar chart: per case, each anchor's speed relative to ours (ours = 1)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cases: dict[tuple, dict[str, float]] = {}
    for r in rows:
        if r.median_us:
            cases.setdefault((r.op, r.shape, r.dtype), {})[r.provider] = r.median_us
    keys = [k for k, times in cases.items() if "ours" in times]
    providers = sorted({p for k in keys for p in cases[k] if p != "ours"})
    fig, ax = plt.subplots(figsize=(max(8, 0.6 * len(keys)), 6))
    width = 0.8 / max(1, len(providers))
    for i, provider in enumerate(providers):
        pts = [(j + i * width, cases[k][provider] / cases[k]["ours"]) for j, k in enumerate(keys) if provider in cases[k]]
        ax.bar([x for x, _ in pts], [y for _, y in pts], width, label=provider)
    labels = [f"{op}\n{shape} {dtype}" for op, shape, dtype in keys]
    ax.axhline(1.0, color="k", lw=0.8)
    ax.set_yscale("log")
    ax.set_ylabel("anchor time / our time (above 1: ours faster)")
    ax.set_xticks([j + 0.4 for j in range(len(labels))], labels, rotation=90, fontsize=6)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)


def cmd_bench(args) -> int:
    if not torch.cuda.is_available():
        print("seqgen-fast bench: no CUDA device here. GPU timings need a GPU, so none are printed "
              "(CPU times of GPU kernels would mislead). Run it on a CUDA machine; "
              "`seqgen-fast check` proves correctness here.")
        return 0
    bench_dir = _benchmarks_dir(args.dir)
    if not (bench_dir / "common.py").exists():
        print(f"seqgen-fast bench: benchmarks not found in {bench_dir}; pass --dir path/to/benchmarks "
              "(they ship with the source checkout)", file=sys.stderr)
        return 2
    sys.path.insert(0, str(bench_dir))
    import common  # noqa: E402  (benchmarks/common.py)

    mode = "full" if args.full else "quick"
    families = args.family or list(common.FAMILIES)
    cases = list(common.all_cases(mode, families))
    sha = common.git_sha()
    rows = []
    for i, case in enumerate(cases, 1):
        print(f"[{i}/{len(cases)}] {case.family} {case.op} {case.shape} {str(case.dtype).removeprefix('torch.')}",
              file=sys.stderr, flush=True)
        rows.extend(common.run_case(case, __version__, sha))
    print(common.format_table(rows))
    meta = {"date": datetime.date.today().isoformat(), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "triton": _version("triton"),
            "driver": _driver_version(), "mode": mode, "git_sha": sha, "seqgen_fast": __version__}
    common.write_rows(rows, args.json, args.csv, meta)
    if args.plot:
        _plot(rows, args.plot)
    return 0


def _driver_version() -> str:
    try:
        import subprocess

        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown"
    except (OSError, IndexError):
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="seqgen-fast", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, device, and each backend's state").set_defaults(fn=cmd_info)

    c = sub.add_parser("check", help="run every op against its reference on fresh random inputs")
    c.add_argument("--device", help="cuda or cpu (default: cuda when available)")
    c.add_argument("--backend", action="append", choices=BACKENDS, help="limit to this backend (repeatable)")
    c.add_argument("--dtype", action="append", choices=sorted(DTYPES), help="limit to this dtype (repeatable)")
    c.add_argument("--op", action="append", help="limit to this check name (repeatable)")
    c.set_defaults(fn=cmd_check)

    b = sub.add_parser("bench", help="time ours beside the anchors (GPU only)")
    size = b.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="a few key shapes per family (default)")
    size.add_argument("--full", action="store_true", help="every anchor shape")
    b.add_argument("--family", action="append", help="limit to a family: lstm, attention, diffusion, sampling")
    b.add_argument("--json", help="write rows and metadata as JSON here")
    b.add_argument("--csv", help="write rows as CSV here")
    b.add_argument("--plot", help="write a PNG chart of ours against each anchor here")
    b.add_argument("--dir", help="the benchmarks/ folder (default: beside the package in a source checkout)")
    b.set_defaults(fn=cmd_bench)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
