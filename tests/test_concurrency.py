"""Thread and process safety: backend forcing is per thread; the tuning cache is safe under concurrent
first use; importing seqgen_fast and running it on the CPU never touches the CUDA context, so forked
dataloader workers that use it stay safe."""
import collections
import json
import subprocess
import sys
import threading
import time

import torch

import seqgen_fast
from seqgen_fast._backend import forced_backend, use_backend


def test_use_backend_is_per_thread():
    seen, ready, release = {}, threading.Barrier(3), threading.Event()

    def worker(name):
        with use_backend(name):
            ready.wait()  # every thread inside its own block at once
            release.wait()
            seen[name] = forced_backend()

    threads = [threading.Thread(target=worker, args=(n,)) for n in ("triton", "reference")]
    for t in threads:
        t.start()
    ready.wait()
    assert forced_backend() is None  # this thread forced nothing
    release.set()
    for t in threads:
        t.join()
    assert seen == {"triton": "triton", "reference": "reference"}


# Run in a fresh interpreter where any CUDA initialisation raises: the import, the CPU paths of the
# ops and modules, swap_modules, the dispatch reports and a forked DataLoader worker calling an op.
_NO_CUDA = r"""
import torch, torch.cuda
def _refuse(*a, **k):
    raise AssertionError("seqgen_fast initialised CUDA")
torch.cuda._lazy_init = _refuse
torch.cuda.init = _refuse

import seqgen_fast
from seqgen_fast import functional as F
from seqgen_fast.cli import main

x = torch.randn(2, 3, 5, 8)
F.scaled_dot_product_attention(x, x, x, is_causal=True)
F.sample_tokens(torch.randn(3, 11), top_k=4)
model = seqgen_fast.swap_modules(torch.nn.Sequential(torch.nn.LSTM(4, 6)))
model[0](torch.randn(5, 2, 4))
assert main(["info"]) == 0


class Data(torch.utils.data.Dataset):
    def __len__(self):
        return 4

    def __getitem__(self, i):
        logits = torch.randn(2, 7)
        return F.sample_tokens(logits, temperature=0)


loader = torch.utils.data.DataLoader(Data(), batch_size=2, num_workers=2, multiprocessing_context="fork")
assert sum(b.numel() for b in loader) == 8
print("no CUDA touched")
"""


def test_cpu_use_and_forked_workers_never_touch_cuda():
    out = subprocess.run([sys.executable, "-c", _NO_CUDA], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "no CUDA touched" in out.stdout, out.stderr[-3000:]


def test_public_namespace_imports_without_optional_packages():
    out = subprocess.run([sys.executable, "-c", "import sys; sys.modules.update(diffusers=None, transformers=None);"
                          "import seqgen_fast, seqgen_fast.nn, seqgen_fast.functional, seqgen_fast.diffusion;"
                          "print(sorted(seqgen_fast.functional.__all__))"], capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert set(seqgen_fast.functional.__all__) <= set(eval(out.stdout.strip()))


def test_tuning_cache_under_concurrent_first_use(monkeypatch, tmp_path):
    """Eight threads ask one Tuner for configs at once, nothing remembered yet (four keys, two threads
    each): each key is benchmarked once, no two benchmarks overlap (they would time each other), every
    thread gets its key's winner, and the disk cache ends as valid JSON holding every key."""
    from seqgen_fast.kernels import _tuning

    monkeypatch.setenv("SEQGEN_FAST_TUNING_CACHE", str(tmp_path))
    monkeypatch.setattr(_tuning, "interpret_mode", lambda: False)
    monkeypatch.setattr(_tuning, "_gpu_name", lambda device: "Fake GPU")
    monkeypatch.setattr(_tuning, "tuning_allowed", lambda device, tune: tune)
    runs, running, lock = collections.Counter(), [0, 0], threading.Lock()  # running: now, most at once

    def benchmark(self, key, run):
        with lock:
            runs[key] += 1
            running[0] += 1
            running[1] = max(running)
        time.sleep(0.05)  # every thread arrives while the first benchmarks run
        with lock:
            running[0] -= 1
        return _tuning.Config(64, 16 * (key[0] + 1), 4, 2)

    monkeypatch.setattr(_tuning.Tuner, "_benchmark", benchmark)
    tuner = _tuning.Tuner("fake_kernel", candidates=lambda key: [], default=lambda key: _tuning.Config(16, 16, 1, 1),
                          shipped={})
    keys = [(i % 4,) for i in range(8)]
    start, got = threading.Barrier(len(keys)), {}

    def worker(i):
        start.wait()
        got[i] = tuner.config(torch.device("cuda"), keys[i], run=lambda cfg: None, tune=True)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(len(keys))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == {i: _tuning.Config(64, 16 * (k[0] + 1), 4, 2) for i, k in enumerate(keys)}
    assert runs == {k: 1 for k in set(keys)}, f"benchmarks per key: {dict(runs)}"
    assert running[1] == 1, f"{running[1]} benchmarks ran at once"
    with open(_tuning._file_for("Fake GPU")) as f:
        on_disk = json.load(f)
    assert sorted(on_disk) == sorted(_tuning._key_text("fake_kernel", k) for k in set(keys))
