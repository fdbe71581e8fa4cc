"""Gather one ``scripts/gpu_check.sh`` run into RESULTS_DIR/results.json, results.md and bench.png.

Reads what the steps left in RESULTS_DIR -- steps.tsv (each step's status, exit code, seconds, limit,
log and note), pytest.xml (junit), info.log, check.log, memcheck.log and racecheck.log
(compute-sanitizer), bench.json -- and adds the environment (GPU, driver, CUDA, torch, triton, git
sha, date). A dry run says so in every file it writes: it ran on a CPU and measures nothing.
``scripts/record_results.py`` copies a GPU run into benchmarks/results/ and puts the same table in
the README.

Usage: python scripts/gpu_report.py RESULTS_DIR --mode default|dry-run|full [--part K/N]
The git sha comes from ``git`` in the checkout, or from GPU_CHECK_GIT_SHA where the copy has no .git.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DRY_RUN_NOTICE = ("CPU DRY RUN: the GPU routine's pipeline on a CPU (Triton interpreter, tiny shapes, no "
                  "sanitizer). It measures nothing: the times are CPU times of fallback paths.")
NO_GPU = "none (CPU dry run)"


def _run(*cmd: str) -> str:
    """stdout of ``cmd`` ('' when it is missing or fails)."""
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30, cwd=ROOT)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def _git_sha() -> str:
    """GPU_CHECK_GIT_SHA, else the checkout's short sha (+ "-dirty" with uncommitted changes to tracked files)."""
    if os.environ.get("GPU_CHECK_GIT_SHA"):
        return os.environ["GPU_CHECK_GIT_SHA"]
    sha = _run("git", "rev-parse", "--short", "HEAD")
    if not sha:
        return "unknown (no git checkout; set GPU_CHECK_GIT_SHA)"
    return sha + ("-dirty" if _run("git", "status", "--porcelain", "--untracked-files=no") else "")


def environment(dry_run: bool) -> dict:
    """GPU, driver, CUDA, torch, triton, git sha, date, host facts of this run."""
    import torch
    import triton

    gpu, driver = (NO_GPU if dry_run else "none"), "none"
    smi = "" if dry_run else _run("nvidia-smi", "--query-gpu=name,driver_version", "--format=csv,noheader")
    if smi:
        gpu, _, driver = smi.splitlines()[0].partition(", ")
    nvcc = re.search(r"release ([\d.]+)", _run("nvcc", "--version"))
    return {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%MZ"), "git_sha": _git_sha(),
            "gpu": gpu.strip(), "driver": driver.strip(), "cuda": torch.version.cuda or "none",
            "nvcc": nvcc.group(1) if nvcc else "none", "torch": torch.__version__, "triton": triton.__version__,
            "python": platform.python_version(), "cpu_cores": os.cpu_count()}


def read_steps(d: Path) -> list[dict]:
    """steps.tsv: one line per step, as gpu_check.sh wrote it."""
    steps = []
    path = d / "steps.tsv"
    for line in path.read_text().splitlines() if path.exists() else []:
        name, status, rc, secs, limit, log, note = line.split("\t")
        steps.append({"name": name, "status": status, "rc": int(rc) if rc else None, "seconds": int(secs),
                      "limit": int(limit) if limit else None, "log": log or None, "note": note})
    return steps


def pytest_summary(xml: Path) -> dict | None:
    """Counts from pytest's junit report, and the failed tests' ids (None: no complete report)."""
    try:
        root = ET.parse(xml).getroot()
    except (OSError, ET.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    count = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = [f"{c.get('classname')}::{c.get('name')}" for c in root.iter("testcase")
              if c.find("failure") is not None or c.find("error") is not None]
    return {"tests": count["tests"], "passed": count["tests"] - count["failures"] - count["errors"] - count["skipped"],
            "failed": count["failures"], "errors": count["errors"], "skipped": count["skipped"],
            "seconds": round(sum(float(s.get("time", 0)) for s in suites), 1), "failed_tests": failed}


def check_summary(log: Path) -> dict | None:
    """`seqgen-fast check`'s totals and its "verified, by backend" lines."""
    text = log.read_text(errors="replace") if log.exists() else ""
    m = re.search(r"^(\d+) passed, (\d+) failed, (\d+) not applicable$", text, re.M)
    if not m:
        return None
    verified = text.split("verified, by backend:", 1)[-1].splitlines()[1:]
    return {"passed": int(m[1]), "failed": int(m[2]), "not_applicable": int(m[3]),
            "verified": [v.strip() for v in verified if v.startswith("  ")]}


def sanitizer_summary(log: Path) -> dict | None:
    """compute-sanitizer's error count (None: it printed no summary, so it did not finish)."""
    if not log.exists():
        return None
    text = log.read_text(errors="replace")
    errors = re.findall(r"ERROR SUMMARY: (\d+) error", text)
    races = re.findall(r"RACECHECK SUMMARY: \d+ hazards? displayed \((\d+) errors?, (\d+) warnings?\)", text)
    return {"errors": int(errors[-1]) if errors else None, "race_warnings": int(races[-1][1]) if races else None}


def built_line(log: Path) -> str:
    """The `_C` line of `seqgen-fast info`: what was built."""
    text = log.read_text(errors="replace") if log.exists() else ""
    m = re.search(r"^_C\s+(.*)$", text, re.M)
    return f"_C {m[1]}" if m else ""


def last_words(log: Path) -> str:
    """The last line a failed step printed (its error, usually), without gpu_check.sh's own markers."""
    lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()] if log.exists() else []
    said = [ln for ln in lines if not ln.startswith("== ")]
    return said[-1][:200].replace("|", "/") if said else ""


def collect(d: Path, mode: str, part: str | None) -> dict:
    """Everything one run left in ``d``, as one dict (results.json)."""
    dry = mode == "dry-run"
    bench = d / "bench.json"
    results = {"dry_run": dry, "mode": mode, "part": part, "env": environment(dry), "steps": read_steps(d),
               "built": built_line(d / "info.log"), "pytest": pytest_summary(d / "pytest.xml"),
               "check": check_summary(d / "check.log"),
               "sanitizer": {t: sanitizer_summary(d / f"{t}.log") for t in ("memcheck", "racecheck")},
               "bench": json.loads(bench.read_text()) if bench.exists() else None}
    for step in results["steps"]:
        words = last_words(d / step["log"]) if step["status"] in ("fail", "timeout") and step["log"] else ""
        step["details"] = "; ".join(filter(None, [step_details(results, step), words and f"last words: {words}"]))
    if dry:
        results["notice"] = DRY_RUN_NOTICE
    return results


def step_details(results: dict, step: dict) -> str:
    """One line on what a step found: test counts, check totals, sanitizer errors, bench rows."""
    name, parts = step["name"], []
    p, c, s = results["pytest"], results["check"], results["sanitizer"].get(name)
    if name == "info" and results.get("built"):
        parts.append(results["built"])
    elif name == "pytest" and p:
        parts.append(f"{p['passed']} passed, {p['failed']} failed, {p['errors']} errors, {p['skipped']} skipped")
    elif name == "check" and c:
        parts.append(f"{c['passed']} passed, {c['failed']} failed, {c['not_applicable']} not applicable")
    elif name in ("memcheck", "racecheck") and step["status"] != "skipped":
        if not s or s["errors"] is None:
            parts.append("no summary (did not finish)")
        else:
            warnings = f", {s['race_warnings']} race warnings" if s["race_warnings"] is not None else ""
            parts.append(f"{s['errors']} errors{warnings}")
    elif name == "bench" and results["bench"]:
        parts.append(f"{len(results['bench']['rows'])} rows")
    if step["note"]:
        parts.append(step["note"])
    return "; ".join(parts)


def _us(row: dict) -> str:
    """A row's median in us, with its note (why it has none) made safe for a table cell."""
    us = f"{row['median_us']:.1f}" if row.get("median_us") else "n/a"
    return us + (" (" + row["note"].replace("|", "/").replace("\n", " ") + ")" if row.get("note") else "")


def _figure(row: dict) -> str:
    for key, unit in (("tflops", "TFLOP/s"), ("tbps", "TB/s"), ("us_per_step", "us/step")):
        if row.get(key):
            return f"{row[key]:.3g} {unit}"
    return ""


def bench_table(results: dict) -> str:
    """Markdown: one line per case and anchor (ratio = anchor time / our time: above 1, ours is faster)."""
    env, rows = results["env"], (results.get("bench") or {}).get("rows", [])
    cases: dict[tuple, list[dict]] = {}
    for r in rows:
        cases.setdefault((r["op"], r["shape"], r["dtype"]), []).append(r)
    head = ["op", "shape", "dtype", "ours (us)", "figure", "anchor", "anchor (us)", "ratio", "GPU", "driver", "torch",
            "triton"]
    lines = ["| " + " | ".join(head) + " |", "|---" * len(head) + "|"]
    tail = f"{env['gpu']} | {env['driver']} | {env['torch']} | {env['triton']}"
    for (op, shape, dtype), group in cases.items():
        ours = next((r for r in group if r["provider"] == "ours"), {})
        for a in [r for r in group if r["provider"] != "ours"] or [{}]:
            ratio = (f"{a['median_us'] / ours['median_us']:.2f}x" if a.get("median_us") and ours.get("median_us")
                     else "n/a")
            lines.append(f"| {op} | {shape} | {dtype} | {_us(ours)} | {_figure(ours)} | {a.get('provider', '-')} | "
                         f"{_us(a) if a else '-'} | {ratio} | {tail} |")
    return "\n".join(lines) if rows else "No benchmark rows (the bench step wrote no bench.json)."


def markdown(results: dict) -> str:
    """results.md: the run's facts, each step's outcome, then the benchmark table."""
    env = results["env"]
    title = "CPU DRY RUN (measures nothing)" if results["dry_run"] else f"{env['gpu']}, {env['date'][:10]}"
    out = [f"# seqgen_fast GPU check: {title}", ""]
    if results["dry_run"]:
        out += [f"> **{results['notice']}**", ""]
    part = f" (part {results['part']})" if results.get("part") else ""
    driver = f" (driver {env['driver']})" if env["driver"] != "none" else ""
    out += [f"- GPU: {env['gpu']}{driver}; CUDA {env['cuda']} (torch), nvcc {env['nvcc']}",
            f"- torch {env['torch']}, triton {env['triton']}, python {env['python']}, {env['cpu_cores']} CPU cores",
            f"- git {env['git_sha']}, {env['date']}, `scripts/gpu_check.sh` mode {results['mode']}{part}", "",
            "## Steps", "", "| step | status | seconds | limit | details |", "|---|---|---|---|---|"]
    for s in results["steps"]:
        out.append(f"| {s['name']} | {s['status']} | {s['seconds']} | {s['limit'] or '-'} | {s['details']} |")
    failed = (results.get("pytest") or {}).get("failed_tests", [])
    if failed:
        out += ["", f"Failed tests ({len(failed)}):", *[f"- `{t}`" for t in failed[:50]]]
    out += ["", "## Benchmarks" + (" (CPU dry run: not measurements)" if results["dry_run"] else ""), "",
            bench_table(results), ""]
    return "\n".join(out)


def plot(results: dict, path: Path) -> None:
    """bench.png through seqgen_fast.bench.plot; the PNG's Title names the GPU, or says dry run."""
    from PIL import Image, PngImagePlugin

    from seqgen_fast import bench

    fields = set(bench.Row.__dataclass_fields__)
    rows = [bench.Row(**{k: v for k, v in r.items() if k in fields}) for r in results["bench"]["rows"]]
    if results["dry_run"]:  # visible on the chart itself: every label says it
        for r in rows:
            r.op = f"DRY RUN {r.op}"
    bench.plot(rows, str(path))
    info = PngImagePlugin.PngInfo()
    info.add_text("Title", "seqgen_fast bench: " + ("CPU dry run, measures nothing" if results["dry_run"] else
                                                    f"{results['env']['gpu']}, {results['env']['date']}"))
    with Image.open(path) as img:
        img.load()
    img.save(path, pnginfo=info)


def write_outputs(results: dict, d: Path) -> None:
    """results.json, results.md and (with bench rows) bench.png in ``d``."""
    (d / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    (d / "results.md").write_text(markdown(results))
    png = d / "bench.png"
    if png.exists():
        png.unlink()
    if results.get("bench") and results["bench"]["rows"]:
        try:
            plot(results, png)
        except ImportError as e:  # matplotlib is an extra; record_results.py draws the chart from results.json
            print(f"gpu_report: no bench.png here ({e}); scripts/record_results.py draws it from results.json")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results_dir", type=Path)
    ap.add_argument("--mode", choices=("default", "dry-run", "full"), required=True)
    ap.add_argument("--part", help="K/N of a --full run")
    args = ap.parse_args(argv)
    results = collect(args.results_dir, args.mode, args.part)
    write_outputs(results, args.results_dir)
    print(markdown(results).split("## Benchmarks")[0].rstrip())
    print(f"\nwrote results.json, results.md{', bench.png' if (args.results_dir / 'bench.png').exists() else ''} "
          f"in {args.results_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
