"""The benchmark runner shared by ``seqgen-fast bench`` and ``pytest benchmarks/ --benchmark-only``.

A family's ``benchmarks/bench_<family>.py`` defines ``cases(mode)`` (mode "quick" or "full")
yielding :class:`Case` objects. A case builds its inputs once (``setup()``), returns one zero-arg
callable per provider ("ours", "cudnn", "sdpa-flash", "diffusers", "torch.compile", ...), and
names the anchor provider its ratio is taken against. Every provider of a case is timed in the
same run, on the same inputs, with ``triton.testing.do_bench`` medians.

One :class:`Row` per measurement (a single schema for JSON and CSV): op, provider, shape, dtype,
device, median_us, the figure (TFLOP/s or TB/s) and ratio = anchor time / this provider's time
(>1 means faster than the anchor), plus package version and git sha.
"""
from __future__ import annotations

import csv
import dataclasses
import importlib.util
import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator

import torch

HERE = Path(__file__).resolve().parent
FAMILIES = ("lstm", "attention", "diffusion", "sampling")


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
    anchor: str = ""
    note: str = ""
    version: str = ""
    git_sha: str = ""


def git_sha() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                              text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def load_family(family: str):
    """Import ``benchmarks/bench_<family>.py`` as a module (the folder is not a package)."""
    path = HERE / f"bench_{family}.py"
    spec = importlib.util.spec_from_file_location(f"seqgen_bench_{family}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(HERE))
    try:
        spec.loader.exec_module(mod)
    finally:
        sys.path.remove(str(HERE))
    return mod


def all_cases(mode: str, families: Iterable[str] = FAMILIES) -> Iterator[Case]:
    for family in families:
        yield from load_family(family).cases(mode)


def time_us(fn: Callable[[], object], cuda_graph: bool = False) -> float:
    """Median time of ``fn`` in microseconds (CUDA events through triton.testing.do_bench)."""
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


def run_case(case: Case, version: str, sha: str) -> list[Row]:
    """Time every provider of ``case`` in one run; ratios against ``case.anchor``."""
    device = torch.cuda.get_device_name()
    dtype = str(case.dtype).removeprefix("torch.")
    fns = case.setup()
    times: dict[str, float | None] = {}
    notes: dict[str, str] = {}
    for provider, fn in fns.items():
        try:
            times[provider] = time_us(fn, case.cuda_graph)
        except Exception as exc:  # a provider that cannot run this shape is a row with a note
            times[provider], notes[provider] = None, f"{type(exc).__name__}: {str(exc)[:200]}"
        torch.cuda.synchronize()
    anchor_us = times.get(case.anchor)
    rows = []
    for provider, us in times.items():
        row = Row(case.family, case.op, provider, case.shape, dtype, device, us, anchor=case.anchor,
                  note=notes.get(provider, ""), version=version, git_sha=sha)
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
    head = f"{'op':34} {'provider':14} {'shape':26} {'dtype':9} {'us':>10} {'figure':>14} {'vs anchor':>10}"
    lines = [head, "-" * len(head)]
    for r in rows:
        fig = (f"{r.tflops:.1f} TFLOP/s" if r.tflops else f"{r.tbps:.3f} TB/s" if r.tbps else
               f"{r.us_per_step:.2f} us/step" if r.us_per_step else "")
        us = f"{r.median_us:.1f}" if r.median_us else "n/a"
        ratio = f"{r.ratio_to_anchor:.2f}x" if r.ratio_to_anchor else ""
        lines.append(f"{r.op[:34]:34} {r.provider[:14]:14} {r.shape[:26]:26} {r.dtype:9} {us:>10} {fig:>14} {ratio:>10}"
                     + (f"  ({r.note})" if r.note else ""))
    return "\n".join(lines)


def anchor_figures() -> list[dict]:
    """The committed H100 anchor figures (benchmarks/anchors/), for reference beside a run."""
    out = []
    for p in sorted((HERE / "anchors").glob("*.json")):
        data = json.loads(p.read_text())
        out.extend(data if isinstance(data, list) else data.get("rows", []))
    return out


__all__ = ["Case", "Row", "all_cases", "run_case", "time_us", "write_rows", "format_table", "git_sha",
           "anchor_figures"]
