"""The seqgen-fast command line: info, check, bench."""
import json
import os
import subprocess
import sys

import pytest
import torch

from seqgen_fast import bench, cli
from seqgen_fast import checks as checks_pkg
from seqgen_fast._families import NAMES
from seqgen_fast.checks import load_all


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "seqgen_fast", *args], capture_output=True, text=True, timeout=600)


def test_info_names_every_backend_with_state_or_reason():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    backends = out.stdout.split("backends:", 1)[1].splitlines()
    for name in ("cuda", "triton", "reference"):
        line = next(l for l in backends if l.strip().startswith(name + " "))
        assert "available" in line
        if "unavailable" in line:
            assert len(line.split("unavailable:", 1)[1].strip()) > 10  # a reason, not just a word
    assert "torch" in out.stdout and "_C" in out.stdout


def test_info_lists_each_ops_backends_and_what_they_take():
    out = run_cli("info")
    assert out.returncode == 0, out.stderr
    ops = out.stdout.split("ops (", 1)[1]
    assert "lstm_sequence" in ops and "cuda [float32, float16, bfloat16]" in ops
    assert "scaled_dot_product_attention" in ops and "head dims 1..256" in ops
    assert "families    " + ", ".join(NAMES) in out.stdout


def test_check_runs_every_registered_op_and_passes(capsys):
    # In-process on the reference backend (the CPU path): every op, a table, exit code 0.
    checks = load_all()
    assert {name.split(".")[0].split("_")[0] for name in checks} >= {"lstm", "attention", "decode", "diffusion",
                                                                       "sample"}
    code = cli.main(["check", "--backend", "reference"])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in checks:
        assert name in out
    assert " failed" in out and "0 failed" in out
    assert "reference: " in out.split("verified, by backend:")[1]


def test_check_without_an_optional_package_says_na_with_the_install_hint(monkeypatch, capsys):
    # A check that needs a package that is not installed: "n/a" with the hint, never a failure.
    monkeypatch.setattr(checks_pkg, "_CHECKS", {})
    checks_pkg.register_check("needs_missing", dtypes=(torch.float32,), requires=("no_such_package_xyz",))(
        lambda device, dtype: {"out": (torch.ones(3), torch.full((3,), 2.0))})
    code = cli.main(["check", "--backend", "reference"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "n/a" in out and "pip install 'seqgen_fast[no_such_package_xyz]'" in out


def test_newcomer_path_passes_without_any_optional_package():
    """`seqgen-fast info && seqgen-fast check && seqgen-fast bench --quick` on a machine where neither
    diffusers nor transformers is installed (their imports made to fail) and no GPU: exit 0 each."""
    hide = "import sys; sys.modules.update(diffusers=None, transformers=None); from seqgen_fast.cli import main; "
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for args in (["info"], ["check"], ["bench", "--quick"]):
        out = subprocess.run([sys.executable, "-c", hide + f"sys.exit(main({args!r}))"], capture_output=True,
                             text=True, timeout=600, env=env)
        assert out.returncode == 0, (args, out.stdout[-3000:], out.stderr[-3000:])
        if args == ["check"]:
            assert "0 failed" in out.stdout
            assert "needs diffusers, not installed (pip install 'seqgen_fast[diffusers]')" in out.stdout


def test_check_of_one_family_runs_only_its_checks(capsys):
    assert cli.main(["check", "--backend", "reference", "--family", "decode"]) == 0
    out = capsys.readouterr().out
    assert "decode_attention" in out and "lstm_cell" not in out


def test_check_exit_code_is_nonzero_on_a_failure(monkeypatch, capsys):
    monkeypatch.setattr(checks_pkg, "_CHECKS", {})
    monkeypatch.setattr(checks_pkg, "load_all", lambda families=None: {})
    checks_pkg.register_check("always_wrong", dtypes=(torch.float32,))(
        lambda device, dtype: {"out": (torch.ones(3), torch.full((3,), 2.0))})
    code = cli.main(["check", "--backend", "reference"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "always_wrong" in out


def test_check_reports_crashes_as_failures(monkeypatch, capsys):
    monkeypatch.setattr(checks_pkg, "_CHECKS", {})
    monkeypatch.setattr(checks_pkg, "load_all", lambda families=None: {})

    def boom(device, dtype):
        raise ValueError("kaboom")

    checks_pkg.register_check("crashes", dtypes=(torch.float32,))(boom)
    assert cli.main(["check", "--backend", "reference"]) == 1
    assert "kaboom" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for machines without one")
def test_bench_without_gpu_says_what_check_verified_and_prints_no_timings():
    out = run_cli("bench", "--quick")
    assert out.returncode == 0
    assert "GPU timings need a GPU" in out.stdout
    assert "reference backend" in out.stdout and "have not run here" in out.stdout
    assert " us" not in out.stdout


def test_bench_dry_run_times_every_familys_tiny_case_on_the_cpu(tmp_path):
    out = run_cli("bench", "--dry-run", "--json", str(tmp_path / "b.json"))
    assert out.returncode == 0, out.stderr
    data = json.loads((tmp_path / "b.json").read_text())
    assert data["meta"]["mode"] == "tiny" and "dry run" in data["meta"]["device"]
    assert {r["family"] for r in data["rows"] if r["provider"] == "ours" and r["median_us"]} == set(NAMES)


def test_bench_cases_are_well_formed():
    # Every family's benchmark module builds its case list (no GPU needed to enumerate).
    for mode in bench.MODES:
        cases = list(bench.all_cases(mode))
        assert cases, mode
        for case in cases:
            assert case.family in NAMES and case.anchor and case.shape
    full = {(c.family, c.op, c.shape, c.dtype) for c in bench.all_cases("full")}
    quick = {(c.family, c.op, c.shape, c.dtype) for c in bench.all_cases("quick")}
    headline = {(c.family, c.op, c.shape, c.dtype) for c in bench.all_cases("headline")}
    assert quick <= full and len(quick) < len(full)
    assert headline <= full and sorted(f for f, *_ in headline) == sorted(NAMES)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    rows = [bench.Row("lstm", "fwd", p, "B1", "float16", "gpu", us, anchor="cudnn")
            for p, us in (("ours", 10.0), ("cudnn", 50.0))]
    path = tmp_path / "chart.png"
    bench.plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
