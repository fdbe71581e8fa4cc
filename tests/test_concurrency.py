"""Thread and process safety: backend forcing is per thread; importing seqgen_fast and running it on
the CPU never touches the CUDA context, so forked dataloader workers that use it stay safe."""
import subprocess
import sys
import threading

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
