"""The GPU routine (scripts/gpu_check.sh, gpu_report.py, record_results.py) runs on every commit as a dry run,
so it cannot rot unseen between GPU sessions; and pytest's --shard splits the tests into disjoint parts."""
import json
import os
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest

from seqgen_fast._families import NAMES

ROOT = Path(__file__).resolve().parent.parent
STEPS = ["build", "info", "pytest", "memcheck", "racecheck", "check", "bench"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    """One `gpu_check.sh --dry-run` for the whole module: (completed process, results dir, wall seconds)."""
    out = tmp_path_factory.mktemp("dry_run")
    t0 = time.monotonic()
    proc = subprocess.run(["bash", "scripts/gpu_check.sh", "--dry-run", str(out)], cwd=ROOT, capture_output=True,
                          text=True, timeout=900, env=dict(os.environ, GPU_CHECK_PYTHON=sys.executable))
    return proc, out, time.monotonic() - t0


def _results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def test_dry_run_runs_every_step_or_says_why_not(dry_run):
    proc, out, seconds = dry_run
    assert proc.returncode == 0, proc.stdout + proc.stderr
    steps = _results(out)["steps"]
    assert [s["name"] for s in steps] == STEPS
    for s in steps:
        if s["status"] == "skipped":
            assert len(s["note"]) > 10, s  # a reason, not just a word
        else:
            assert s["status"] == "pass" and s["rc"] == 0 and (out / s["log"]).exists(), s
    assert {s["name"] for s in steps if s["status"] == "skipped"} == {"build", "memcheck", "racecheck"}
    print(f"gpu_check.sh --dry-run: {seconds:.0f} s")


def test_dry_run_files_say_dry_run(dry_run):
    _, out, _ = dry_run
    results = _results(out)
    assert results["dry_run"] and "DRY RUN" in results["notice"] and "dry run" in results["env"]["gpu"]
    assert "CPU DRY RUN" in (out / "results.md").read_text().splitlines()[0]
    pytest.importorskip("matplotlib")  # the plot extra draws bench.png
    from PIL import Image

    with Image.open(out / "bench.png") as png:
        assert png.format == "PNG" and "dry run" in png.info["Title"]


def test_dry_run_benchmarks_every_family_and_tabulates_it(dry_run):
    _, out, _ = dry_run
    results = _results(out)
    rows = results["bench"]["rows"]
    assert {r["family"] for r in rows if r["provider"] == "ours" and r["median_us"]} == set(NAMES)
    table = (out / "results.md").read_text().split("## Benchmarks", 1)[1]
    for r in rows:
        assert f"| {r['op']} | {r['shape']} |" in table


def test_dry_run_pytest_runs_cpu_smoke_tests_and_lists_the_gpu_tier(dry_run):
    _, out, _ = dry_run
    summary = _results(out)["pytest"]
    assert summary["passed"] >= len(NAMES) and summary["failed"] == summary["errors"] == 0
    cases = list(ET.parse(out / "pytest.xml").getroot().iter("testcase"))
    files = {c.get("classname") for c in cases}
    assert "tests.test_gpu_check" not in files  # the inner pytest does not recurse into this module
    gpu_tier = {c.get("classname") for c in cases if c.find("skipped") is not None}
    assert {"tests.test_lstm", "tests.test_attention", "tests.test_decode", "tests.test_diffusion_cuda",
            "tests.test_sampling"} <= gpu_tier  # on a GPU these run: every family's kernels
    check = _results(out)["check"]
    assert check["failed"] == 0 and check["passed"] > 0


def _record(*args):
    return subprocess.run([sys.executable, "scripts/record_results.py", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)


def _readme(tmp_path: Path) -> Path:
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\ntext before\n\n<!-- gpu-results:begin -->\nNo GPU run has been recorded yet.\n"
                      "<!-- gpu-results:end -->\n\ntext after\n")
    return readme


def test_record_results_refuses_a_dry_run(dry_run, tmp_path):
    _, out, _ = dry_run
    readme = _readme(tmp_path)
    before = readme.read_text()
    proc = _record(out, "--results-root", tmp_path / "results", "--readme", readme)
    assert proc.returncode == 2 and "dry run" in proc.stderr and "never recorded" in proc.stderr
    assert readme.read_text() == before and not (tmp_path / "results").exists()


def _gpu_part(d: Path, part: str, family: str, ours_us: float, anchor_us: float) -> Path:
    """A results dir as a --full part on an H200 leaves it: results.json plus a log."""
    d.mkdir()
    env = {"date": "2030-01-02T03:04Z", "git_sha": "abc1234", "gpu": "NVIDIA H200", "driver": "570.1", "cuda": "13.0",
           "nvcc": "13.0", "torch": "2.11.0", "triton": "3.6.0", "python": "3.12.0", "cpu_cores": 16}
    row = dict(family=family, op=f"{family} op", shape="B1 S4096", dtype="bfloat16", device="NVIDIA H200",
               tflops=None, tbps=2.5, us_per_step=None, anchor="base", note="", version="0.1.0", git_sha="abc1234")
    rows = [dict(row, provider="ours", median_us=ours_us, ratio_to_anchor=anchor_us / ours_us),
            dict(row, provider="base", median_us=anchor_us, tbps=1.0, ratio_to_anchor=1.0)]
    step = dict(name="pytest", status="pass", rc=0, seconds=100, limit=270, log="pytest.log", note="", details="")
    results = dict(dry_run=False, mode="full", part=part, env=env, steps=[step], built="",
                   pytest=dict(tests=10, passed=9, failed=0, errors=0, skipped=1, seconds=90.0, failed_tests=[]),
                   check=None, sanitizer=dict(memcheck=None, racecheck=None), bench=dict(meta={}, rows=rows))
    (d / "results.json").write_text(json.dumps(results))
    (d / "pytest.log").write_text("9 passed, 1 skipped\n")
    return d


def test_record_results_merges_parts_and_regenerates_the_readme_table(tmp_path):
    pytest.importorskip("matplotlib")  # the plot extra draws bench.png
    parts = [_gpu_part(tmp_path / "p1", "1/2", "lstm", 10.0, 25.0),
             _gpu_part(tmp_path / "p2", "2/2", "decode", 8.0, 4.0)]
    readme, root = _readme(tmp_path), tmp_path / "results"
    proc = _record(*parts, "--results-root", root, "--readme", readme)
    assert proc.returncode == 0, proc.stderr
    record = root / "2030-01-02-h200"
    assert (record / "part-1" / "pytest.log").exists() and (record / "part-2" / "results.json").exists()
    merged = json.loads((record / "results.json").read_text())
    assert merged["pytest"]["passed"] == 18 and len(merged["bench"]["rows"]) == 4
    assert (record / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = readme.read_text()
    assert text.startswith("# title\n\ntext before\n") and text.endswith("<!-- gpu-results:end -->\n\ntext after\n")
    assert "No GPU run has been recorded yet" not in text and "results/2030-01-02-h200/results.md" in text
    assert "| lstm op | B1 S4096 | bfloat16 | 10.0 | 2.5 TB/s | base | 25.0 | 2.50x | NVIDIA H200 | 570.1 |" in text
    assert "| decode op | B1 S4096 | bfloat16 | 8.0 | 2.5 TB/s | base | 4.0 | 0.50x |" in text
    assert _record(*parts, "--results-root", root, "--readme", readme).returncode == 0  # re-recording: one table
    assert readme.read_text().count("| lstm op |") == 1


def test_shard_option_partitions_the_tests():
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "tests/test_decode.py"]
    procs = [subprocess.Popen(cmd + extra, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for extra in ([], ["--shard=1/3"], ["--shard=2/3"], ["--shard=3/3"])]  # in parallel: 4 collections
    outs = [p.communicate(timeout=300)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), outs
    everything, *shards = ({line for line in out.splitlines() if "::" in line} for out in outs)
    assert all(shards) and set().union(*shards) == everything
    assert sum(map(len, shards)) == len(everything)  # disjoint
