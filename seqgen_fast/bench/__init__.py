"""The benchmark runner behind ``seqgen-fast bench`` and ``pytest benchmarks/ --benchmark-only``.

Each kernel family's ``seqgen_fast.bench.<family>`` module (the family manifest names them) defines
``cases(mode, device)`` yielding :class:`Case` objects for a mode:

* ``"headline"`` -- the one case that tells the family's story (the GPU routine times these);
* ``"quick"`` -- a few key shapes; ``"full"`` -- every anchor shape;
* ``"tiny"`` -- the headline case at a tiny shape, so the whole pipeline runs on a CPU (the GPU
  routine's dry run). Tiny timings are CPU timings of the fallback paths and say nothing of a GPU.

A case builds its inputs once (``setup()``), returns one zero-arg callable per provider ("ours",
"cudnn", "sdpa-cudnn", "diffusers", "torch.compile", ...), and names the anchor provider its ratio
is taken against. Every provider of a case is timed in the same run, on the same inputs:
``triton.testing.do_bench`` medians on CUDA, ``time.perf_counter`` medians on the CPU.

One :class:`Row` per measurement (a single schema for JSON and CSV): op, provider, shape, dtype,
device, median_us, the figure (TFLOP/s or TB/s), ratio = anchor time / this provider's time
(>1 means faster than the anchor), on CUDA the peak memory one call allocates (``peak_mib``: for a
training step the activations kept for backward, the gradients and the workspaces), plus package
version and git sha.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib
import json
import statistics
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

from .._families import NAMES

MODES = ("headline", "quick", "full", "tiny")


@dataclass
class Case:
    """One shape of one op, timed for several providers side by side.

    setup() -> {provider: fn} where fn() runs one timed iteration on prebuilt inputs.
    flops / bytes: work of one iteration (for TFLOP/s or TB/s); per_step: divide time by this
    many steps for a per-step figure (LSTM recurrences); 0 or None where not meaningful.
    """

    family: str
    op: str
    shape: str
    dtype: torch.dtype
    setup: Callable[[], dict[str, Callable[[], object]]]
    anchor: str
    flops: float = 0.0
    bytes: float = 0.0
    per_step: int = 0
    cuda_graph: bool = False  # time replays of a captured graph of fn instead of eager calls
    device: str = "cuda"


@dataclass
class Row:
    family: str
    op: str
    provider: str
    shape: str
    dtype: str
    device: str
    median_us: float | None
    tflops: float | None = None
    tbps: float | None = None
    us_per_step: float | None = None
    ratio_to_anchor: float | None = None
    peak_mib: float | None = None
    anchor: str = ""
    note: str = ""
    version: str = ""
    git_sha: str = ""


def git_sha() -> str:
    """The short git sha of the checkout the package runs from ('' outside a checkout)."""
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=Path(__file__).resolve().parent,
                              capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def all_cases(mode: str, families: Iterable[str] = NAMES, device: str = "cuda") -> Iterator[Case]:
    """Every case of ``mode`` of ``families`` (names from the family manifest)."""
    if mode not in MODES:
        raise ValueError(f"unknown bench mode {mode!r}; expected one of {', '.join(MODES)}")
    for family in families:
        yield from importlib.import_module(f"{__name__}.{family}").cases(mode, device)


def _cpu_time_us(fn: Callable[[], object], reps: int = 5) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1e6 * statistics.median(times)


def time_us(fn: Callable[[], object], cuda_graph: bool = False, device: str = "cuda") -> float:
    """Median time of ``fn`` in microseconds (CUDA events through triton.testing.do_bench on CUDA,
    wall time on the CPU)."""
    if device == "cpu":
        return _cpu_time_us(fn)
    import triton.testing

    if cuda_graph:
        stream = torch.cuda.Stream()
        with torch.cuda.stream(stream):
            fn()  # warm up (compilation, allocator) outside the capture
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, stream=stream):
                fn()
        torch.cuda.synchronize()
        fn = graph.replay
    return 1000.0 * triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def peak_memory(fn: Callable[[], object], device: str = "cuda") -> int:
    """Bytes one (warm) call of ``fn`` allocates at its peak beyond what was allocated before it."""
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def _device_name(device: str) -> str:
    return torch.cuda.get_device_name() if device == "cuda" else "cpu (dry run: not a GPU measurement)"


def run_case(case: Case, version: str, sha: str) -> list[Row]:
    """Time every provider of ``case`` in one run; ratios against ``case.anchor``. A case whose
    setup fails (a missing optional package, say) is one row saying why."""
    device = _device_name(case.device)
    dtype = str(case.dtype).removeprefix("torch.")
    try:
        fns = case.setup()
    except Exception as exc:  # reported as a row, so one broken case does not hide the others
        return [Row(case.family, case.op, "ours", case.shape, dtype, device, None, anchor=case.anchor,
                    note=f"setup failed: {type(exc).__name__}: {str(exc)[:200]}", version=version, git_sha=sha)]
    times: dict[str, float | None] = {}
    peaks: dict[str, float] = {}
    notes: dict[str, str] = {}
    for provider, fn in fns.items():
        try:
            times[provider] = time_us(fn, case.cuda_graph and case.device == "cuda", case.device)
            if case.device == "cuda":
                peaks[provider] = peak_memory(fn) / 2**20
        except Exception as exc:  # a provider that cannot run this shape is a row with a note
            times[provider], notes[provider] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        if case.device == "cuda":
            torch.cuda.synchronize()
    anchor_us = times.get(case.anchor)
    rows = []
    for provider, us in times.items():
        row = Row(case.family, case.op, provider, case.shape, dtype, device, us, anchor=case.anchor,
                  peak_mib=peaks.get(provider), note=notes.get(provider, ""), version=version, git_sha=sha)
        if us:
            row.tflops = case.flops / us / 1e6 if case.flops else None
            row.tbps = case.bytes / us / 1e6 if case.bytes else None
            row.us_per_step = us / case.per_step if case.per_step else None
            row.ratio_to_anchor = anchor_us / us if anchor_us else None
        rows.append(row)
    return rows


def write_rows(rows: list[Row], json_path: str | None = None, csv_path: str | None = None, meta: dict | None = None) -> None:
    dicts = [dataclasses.asdict(r) for r in rows]
    if json_path:
        Path(json_path).write_text(json.dumps({"meta": meta or {}, "rows": dicts}, indent=1))
    if csv_path:
        with open(csv_path, "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=[fl.name for fl in dataclasses.fields(Row)])
            w.writeheader()
            w.writerows(dicts)


def format_table(rows: list[Row]) -> str:
    """Plain-text table: one line per row, ours first within each case."""
    head = (f"{'op':34} {'provider':14} {'shape':26} {'dtype':9} {'us':>10} {'figure':>14} {'vs anchor':>10} "
            f"{'peak MiB':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        fig = (f"{r.tflops:.1f} TFLOP/s" if r.tflops else f"{r.tbps:.3f} TB/s" if r.tbps else
               f"{r.us_per_step:.2f} us/step" if r.us_per_step else "")
        us = f"{r.median_us:.1f}" if r.median_us else "n/a"
        ratio = f"{r.ratio_to_anchor:.2f}x" if r.ratio_to_anchor else ""
        peak = f"{r.peak_mib:.1f}" if r.peak_mib is not None else ""
        lines.append(f"{r.op[:34]:34} {r.provider[:14]:14} {r.shape[:26]:26} {r.dtype:9} {us:>10} {fig:>14} {ratio:>10} "
                     f"{peak:>9}" + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def plot(rows: list[Row], path: str) -> None:
    """Bar chart: per case, each anchor's time relative to ours (above 1: ours faster)."""
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
    if providers:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


__all__ = ["Case", "Row", "MODES", "all_cases", "run_case", "time_us", "peak_memory", "write_rows", "format_table",
           "plot", "git_sha"]
