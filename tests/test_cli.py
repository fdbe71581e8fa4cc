"""The seqgen-fast command line: info, check, bench."""
import subprocess
import sys

import pytest
import torch

from seqgen_fast import cli


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


def test_check_runs_every_registered_op_and_passes(capsys):
    # In-process on the reference backend (the CPU path): every op, a table, exit code 0.
    from seqgen_fast._checks import all_checks
    from seqgen_fast.ops import load_all

    load_all()
    assert len(all_checks()) >= 5, sorted(all_checks())
    code = cli.main(["check", "--backend", "reference"])
    out = capsys.readouterr().out
    assert code == 0, out
    for name in all_checks():
        assert name in out
    assert " failed" in out and "0 failed" in out


def test_check_exit_code_is_nonzero_on_a_failure(monkeypatch, capsys):
    from seqgen_fast import _checks

    monkeypatch.setattr(_checks, "_CHECKS", {})
    _checks.register_check("always_wrong", dtypes=(torch.float32,))(
        lambda device, dtype: {"out": (torch.ones(3), torch.full((3,), 2.0))})
    code = cli.main(["check", "--backend", "reference"])
    out = capsys.readouterr().out
    assert code == 1 and "FAIL" in out and "always_wrong" in out


def test_check_reports_crashes_as_failures(monkeypatch, capsys):
    from seqgen_fast import _checks

    monkeypatch.setattr(_checks, "_CHECKS", {})

    def boom(device, dtype):
        raise ValueError("kaboom")

    _checks.register_check("crashes", dtypes=(torch.float32,))(boom)
    assert cli.main(["check", "--backend", "reference"]) == 1
    assert "kaboom" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="the no-GPU message is for machines without one")
def test_bench_without_gpu_says_so_and_prints_no_timings():
    out = run_cli("bench", "--quick")
    assert out.returncode == 0
    assert "GPU timings need a GPU" in out.stdout
    assert " us" not in out.stdout


def test_bench_cases_are_well_formed():
    # Every family's benchmark module builds its case list (no GPU needed to enumerate).
    sys.path.insert(0, str(cli._benchmarks_dir(None)))
    import common

    for mode in ("quick", "full"):
        cases = list(common.all_cases(mode))
        assert cases, mode
        for case in cases:
            assert case.family in common.FAMILIES and case.anchor and case.shape
    full = {(c.family, c.op, c.shape, c.dtype) for c in common.all_cases("full")}
    quick = {(c.family, c.op, c.shape, c.dtype) for c in common.all_cases("quick")}
    assert quick <= full and len(quick) < len(full)


def test_plot_writes_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    sys.path.insert(0, str(cli._benchmarks_dir(None)))
    import common

    rows = [common.Row("lstm", "fwd", p, "B1", "float16", "gpu", us, anchor="cudnn")
            for p, us in (("ours", 10.0), ("cudnn", 50.0))]
    path = tmp_path / "chart.png"
    cli._plot(rows, str(path))
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
