"""Helpers shared by the examples: device choice, progress bars, timing, the comparison table."""
from __future__ import annotations

import argparse
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Iterable

import torch

CPU_NOTE = "speed needs a GPU: on the CPU seqgen_fast runs its reference path"


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cuda or cpu (default: cuda when available)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="timed runs per variant, median reported (default 3 on a GPU, 1 on the CPU)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def device_of(args) -> torch.device:
    """The device asked for (checked), filling in the device-dependent default of ``--repeats``."""
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is available (use --device cpu)")
    if args.repeats is None:
        args.repeats = 3 if device.type == "cuda" else 1
    return device


def progress(iterable: Iterable, desc: str, total: int | None = None, disable: bool = False):
    """tqdm when it is installed; otherwise a line every ~10% of the way."""
    if disable:
        return iterable
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _printed_progress(iterable, desc, total if total is not None else len(iterable))
    return tqdm(iterable, desc=desc, total=total, leave=False)


def _printed_progress(iterable: Iterable, desc: str, total: int):
    step = max(1, total // 10)
    for i, item in enumerate(iterable):
        if i % step == 0:
            print(f"  {desc}: {i}/{total}", flush=True)
        yield item


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn: Callable[[], object], device: torch.device, repeats: int) -> tuple[float, object]:
    """Median wall time in seconds of ``repeats`` calls of ``fn`` (after one warm-up call), and
    the last call's result. The warm-up compiles kernels and captures graphs."""
    result = fn()
    synchronize(device)
    times = []
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        result = fn()
        synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), result


@dataclass
class Row:
    what: str
    plain_s: float
    fast_s: float
    units: float  # tokens or steps done in one timed run
    unit_name: str  # "tok" or "step"
    max_diff: float | None  # largest |fast - plain| of the compared output (None: not comparable)
    tol: float | None


def print_table(title: str, rows: list[Row], device: torch.device) -> bool:
    """Print the plain-torch vs seqgen_fast table; returns whether every difference is within tolerance."""
    print(f"\n{title} on {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""))
    head = (f"{'':34} {'plain torch':>12} {'seqgen_fast':>12} {'speedup':>8} {'plain rate':>16} {'fast rate':>16}"
            f" {'max |diff|':>11} {'tolerance':>10}")
    print(head)
    print("-" * len(head))
    ok = True
    for r in rows:
        diff = "n/a" if r.max_diff is None else f"{r.max_diff:.2e}"
        tol = "" if r.tol is None else f"{r.tol:.1e}"
        if r.max_diff is not None and r.tol is not None and not r.max_diff <= r.tol:
            ok = False
            tol += " FAIL"
        plain_rate = f"{r.units / r.plain_s:.1f} {r.unit_name}/s"
        fast_rate = f"{r.units / r.fast_s:.1f} {r.unit_name}/s"
        print(f"{r.what[:34]:34} {r.plain_s * 1e3:10.1f}ms {r.fast_s * 1e3:10.1f}ms {r.plain_s / r.fast_s:7.2f}x "
              f"{plain_rate:>16} {fast_rate:>16} {diff:>11} {tol:>10}")
    print("(times: medians after a warm-up run)")
    if device.type == "cpu":
        print(f"note: {CPU_NOTE}")
    print("outputs within tolerance" if ok else "OUTPUTS DIFFER BEYOND TOLERANCE")
    return ok
