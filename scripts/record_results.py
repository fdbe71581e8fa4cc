"""Record a GPU run of ``scripts/gpu_check.sh``: copy it into benchmarks/results/<date>-<gpu>/ and regenerate
the README's results table (between the ``<!-- gpu-results:begin -->`` and ``<!-- gpu-results:end -->`` markers).

Usage: python scripts/record_results.py RESULTS_DIR [RESULTS_DIR ...] [--results-root DIR] [--readme FILE]

Several RESULTS_DIRs (the parts of a ``--full`` run, and a default run beside them) merge into one record:
each one's files go to part-<K>/ (or default/) and the merged results.json, results.md and bench.png to the top. A CPU
dry run, or a run without a GPU, is refused: it measures nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
from pathlib import Path

import gpu_report

ROOT = gpu_report.ROOT
BEGIN, END = "<!-- gpu-results:begin -->", "<!-- gpu-results:end -->"


class Refused(Exception):
    """A run that must not be recorded, with the reason."""


def load(d: Path) -> dict:
    """results.json of a GPU run in ``d``; Refused for a dry run, a run without a GPU, or no results."""
    path = d / "results.json"
    if not path.exists():
        raise Refused(f"{d} has no results.json (run `bash scripts/gpu_check.sh {d}` on the GPU machine first)")
    results = json.loads(path.read_text())
    if results["dry_run"]:
        raise Refused(f"{d} is a CPU dry run (scripts/gpu_check.sh --dry-run): it measures nothing and is never "
                      "recorded as a result")
    if results["env"]["gpu"].startswith("none"):
        raise Refused(f"{d} ran without a GPU (nvidia-smi saw none): nothing to record")
    return results


def merge(runs: list[dict]) -> dict:
    """One record of several runs on the same GPU: steps named by part, test counts summed, rows joined."""
    if len(runs) == 1:
        return runs[0]
    gpus = {r["env"]["gpu"] for r in runs}
    if len(gpus) > 1:
        raise Refused(f"the runs are from different GPUs ({', '.join(sorted(gpus))}); record them separately")
    merged = dict(runs[0], mode="+".join(dict.fromkeys(r["mode"] for r in runs)),
                  part=", ".join(r["part"] or r["mode"] for r in runs))
    merged["steps"] = [dict(s, name=f"{s['name']} ({r['part'] or r['mode']})") for r in runs for s in r["steps"]]
    tests = [r["pytest"] for r in runs if r["pytest"]]
    merged["pytest"] = None
    if tests:
        merged["pytest"] = {k: sum(t[k] for t in tests) for k in ("tests", "passed", "failed", "errors", "skipped",
                                                                  "seconds")}
        merged["pytest"]["failed_tests"] = [f for t in tests for f in t["failed_tests"]]
    merged["check"] = next((r["check"] for r in runs if r["check"]), None)
    merged["sanitizer"] = {t: next((r["sanitizer"][t] for r in runs if r["sanitizer"][t]), None)
                           for t in ("memcheck", "racecheck")}
    benches = [r["bench"] for r in runs if r["bench"]]
    merged["bench"] = {"meta": benches[0]["meta"], "rows": [row for b in benches for row in b["rows"]]} if benches \
        else None
    return merged


def slug(gpu: str) -> str:
    """'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    return re.sub(r"[^a-z0-9]+", "-", gpu.lower()).strip("-").removeprefix("nvidia-") or "gpu"


def readme_section(results: dict, target: Path, readme: Path) -> str:
    """The generated text between the README's markers: where the run is, its facts and steps, the table."""
    env = results["env"]
    where = os.path.relpath(target, readme.parent)
    status = [s["status"] for s in results["steps"]]
    bad = [f"{s['name']} {s['status']}" for s in results["steps"] if s["status"] not in ("pass", "skipped")]
    steps = ", ".join([f"{status.count('pass')} passed", f"{status.count('skipped')} skipped", *bad])
    facts = (f"Recorded by `scripts/record_results.py` from [`{where}/`]({where}/results.md): {env['gpu']}, driver "
             f"{env['driver']}, CUDA {env['cuda']}, torch {env['torch']}, triton {env['triton']}, git "
             f"{env['git_sha']}, {env['date']}. Steps: {steps}. Ratio = anchor time / our time (above 1: ours is "
             "faster).")
    return f"{facts}\n\n{gpu_report.bench_table(results)}"


def update_readme(readme: Path, section: str) -> None:
    text = readme.read_text()
    if text.count(BEGIN) != 1 or text.count(END) != 1 or text.index(BEGIN) > text.index(END):
        raise Refused(f"{readme} needs exactly one {BEGIN} ... {END} pair")
    head, rest = text.split(BEGIN)
    readme.write_text(f"{head}{BEGIN}\n{section}\n{END}{rest.split(END)[1]}")


def record(dirs: list[Path], results_root: Path, readme: Path) -> Path:
    """Copy the runs, write the merged record and the README table; returns the record's folder."""
    runs = [load(d) for d in dirs]
    results = merge(runs)
    target = results_root / f"{results['env']['date'][:10]}-{slug(results['env']['gpu'])}"
    for d, run in zip(dirs, runs):
        name = f"part-{run['part'].split('/')[0]}" if run["part"] else run["mode"]
        dest = target if len(dirs) == 1 else target / name
        dest.mkdir(parents=True, exist_ok=True)
        for f in d.iterdir():
            if f.is_file():
                shutil.copy2(f, dest / f.name)
    gpu_report.write_outputs(results, target)
    update_readme(readme, readme_section(results, target, readme))
    return target


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("results_dirs", nargs="+", type=Path, metavar="RESULTS_DIR")
    ap.add_argument("--results-root", type=Path, default=ROOT / "benchmarks" / "results",
                    help="where the <date>-<gpu>/ folder goes (default: benchmarks/results)")
    ap.add_argument("--readme", type=Path, default=ROOT / "README.md", help="the README whose table to regenerate")
    args = ap.parse_args(argv)
    try:
        target = record(args.results_dirs, args.results_root, args.readme)
    except Refused as e:
        print(f"record_results: refused: {e}", file=sys.stderr)
        return 2
    print(f"recorded {len(args.results_dirs)} run(s) in {target}; regenerated the table in {args.readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
