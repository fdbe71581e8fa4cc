"""The examples run end to end (tiny settings on the CPU; their default sizes on a GPU) and their
seqgen_fast outputs agree with the plain-torch runs within each example's stated tolerance."""
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
COMMON = ["--repeats", "1", "--no-progress"]
TINY = {
    "char_lstm": ["--steps", "3", "--tokens", "8", "--hidden", "32", "--layers", "1", "--batch", "2", "--seq", "16"],
    "llama_generate": ["--batch", "2", "--prompt", "12", "--tokens", "6", "--vocab", "300", "--hidden", "64",
                       "--layers", "1", "--heads", "4", "--kv-heads", "2"],
    "diffusion_sample": ["--steps", "4", "--batch", "1", "--size", "8", "--width", "32", "--depth", "1",
                         "--heads", "2"],
}


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"seqgen_example_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs_on_cpu(name, capsys):
    assert load(name).main(["--device", "cpu", *COMMON, *TINY[name]]) == 0
    out = capsys.readouterr().out
    assert "speed needs a GPU: on the CPU seqgen_fast runs its reference path" in out
    assert "outputs within tolerance" in out and "plain torch" in out and "seqgen_fast" in out


def test_diffusion_example_with_dpm_solver(capsys):
    args = ["--device", "cpu", *COMMON, *TINY["diffusion_sample"], "--scheduler", "dpm"]
    assert load("diffusion_sample").main(args) == 0
    assert "outputs within tolerance" in capsys.readouterr().out


def test_cpu_table_flags_a_difference_beyond_tolerance(capsys):
    common = load("_common")
    Row, print_table = common.Row, common.print_table
    ok = print_table("t", [Row("x", 1.0, 0.5, 10, "tok", 1.0, 0.1), Row("y", 1.0, 0.5, 10, "tok", 0.01, 0.1)],
                     torch.device("cpu"))
    out = capsys.readouterr().out
    assert not ok and "FAIL" in out and "2.00x" in out and "20.0 tok/s" in out


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(TINY))
def test_example_runs_on_gpu_at_default_size(name, capsys):
    assert load(name).main(["--device", "cuda", "--no-progress"]) == 0
    assert "outputs within tolerance" in capsys.readouterr().out


TORCHRUN = {
    "train_lstm_ddp": (["--steps", "4", "--hidden", "32", "--layers", "1", "--batch", "2", "--seq", "16"],
                       "replicas in sync"),
    "tp_generate": (["--tokens", "6", "--vocab", "97", "--dim", "64", "--layers", "2", "--heads", "4", "--kv-heads",
                     "2", "--ffn", "96", "--batch", "2", "--prompt", "9"], "tokens match the unsharded model"),
}


@pytest.mark.parametrize("name", sorted(TORCHRUN))
def test_multiprocess_example_runs_under_torchrun_on_gloo(name):
    """The multi-GPU examples' CPU version: two gloo ranks on loopback, started by torchrun."""
    args, verdict = TORCHRUN[name]
    out = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          str(EXAMPLES / f"{name}.py"), "--device", "cpu", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert verdict in out.stdout
