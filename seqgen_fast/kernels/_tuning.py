"""Kernel configurations chosen once per (GPU, Triton version, kernel, key) and remembered.

A :class:`Tuner` answers "which (BLOCK_M, BLOCK_N, num_warps, num_stages) for this kernel and key?"
from, in order: this process's memory; the disk cache (``$SEQGEN_FAST_TUNING_CACHE``, default
``~/.cache/seqgen_fast/tuning``, one JSON file per GPU name and Triton version); the shipped table of
pre-tuned configs (``seqgen_fast.kernels.attention_tuned``); and only then, if tuning is allowed
for this call, a benchmark of every candidate (``triton.testing.do_bench``), whose winner is written
to memory and disk. Tuning is never allowed while the current CUDA stream is being captured into a
graph (benchmarks synchronise, which breaks a capture) nor for calls traced by ``torch.compile``
(the ops get ``tune=False`` there): those take the remembered config or the kernel's default, which
is always a valid one. ``seqgen_fast.warmup`` tunes ahead of time.

Keys are tuples of plain values (head dims, dtype, flags, sequence-length buckets): a new sequence
length within a bucket reuses the config, a new bucket tunes once.
"""
from __future__ import annotations

import json
import os
import threading
from dataclasses import dataclass
from typing import Callable

import torch
import triton

from .._backend import interpret_mode

_TUNING = threading.Lock()  # serialises first lookups and benchmarks (timings of concurrent runs would be wrong too)


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def as_list(self) -> list[int]:
        return [self.block_m, self.block_n, self.num_warps, self.num_stages]


def seq_bucket(n: int) -> int:
    """Power-of-two bucket of a sequence length, 64..65536 (the autotune keys' length field)."""
    return min(max(64, triton.next_power_of_2(max(int(n), 1))), 65536)


def _cache_dir() -> str:
    return os.environ.get("SEQGEN_FAST_TUNING_CACHE") or os.path.join(os.path.expanduser("~"), ".cache",
                                                                          "seqgen_fast", "tuning")


def _gpu_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _file_for(gpu: str) -> str:
    safe = "".join(c if c.isalnum() else "_" for c in gpu)
    return os.path.join(_cache_dir(), f"{safe}-triton{triton.__version__}.json")


def _key_text(kernel: str, key: tuple) -> str:
    return kernel + "|" + "|".join(str(k) for k in key)


def tuning_allowed(device: torch.device, tune: bool) -> bool:
    """Whether a benchmark may run now: a CUDA device, not the interpreter, the caller allows it
    (eager, not traced by torch.compile) and the current stream is not capturing a graph."""
    if not tune or device.type != "cuda" or interpret_mode():
        return False
    return not torch.cuda.is_current_stream_capturing()


class Tuner:
    """Configs of one kernel. ``candidates(key)`` lists what may be tried; ``default(key)`` is the
    config used when nothing is remembered and tuning is not allowed; ``shipped`` maps a GPU name
    prefix to {key text: config list} (the pre-tuned table)."""

    def __init__(self, kernel: str, candidates: Callable[[tuple], list[Config]], default: Callable[[tuple], Config],
                 shipped: dict[str, dict[str, list[int]]]):
        self.kernel = kernel
        self.candidates = candidates
        self.default = default
        self.shipped = shipped
        self._memory: dict[tuple, Config] = {}
        self._lock = threading.Lock()

    def _remembered(self, gpu: str, text: str) -> Config | None:
        path = _file_for(gpu)
        try:
            with open(path) as f:
                entry = json.load(f).get(text)
        except (OSError, ValueError):
            entry = None
        if entry is None:
            for prefix, table in self.shipped.items():
                if gpu.startswith(prefix) and text in table:
                    entry = table[text]
                    break
        return Config(*entry) if entry is not None else None

    def _persist(self, gpu: str, text: str, cfg: Config) -> None:
        path = _file_for(gpu)
        try:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            try:
                with open(path) as f:
                    data = json.load(f)
            except (OSError, ValueError):
                data = {}
            data[text] = cfg.as_list()
            tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"  # a writer's own file
            with open(tmp, "w") as f:
                json.dump(data, f, indent=0, sort_keys=True)
            os.replace(tmp, path)
        except OSError:  # a read-only home is no reason to fail a call: the config stays in memory
            pass

    def config(self, device: torch.device, key: tuple, run: Callable[[Config], None] | None, tune: bool) -> Config:
        """The config for ``key`` on ``device``; ``run(cfg)`` launches the kernel once with ``cfg``
        (into scratch outputs) and is benchmarked only when tuning is allowed."""
        if interpret_mode() or device.type != "cuda":
            return self.default(key)
        gpu = _gpu_name(device)
        full = (gpu, key)
        with self._lock:
            cfg = self._memory.get(full)
        if cfg is not None:
            return cfg
        text = _key_text(self.kernel, key)
        with _TUNING:  # one thread looks up (and maybe benchmarks) a key; the others then find it in memory
            with self._lock:
                cfg = self._memory.get(full)
            if cfg is not None:
                return cfg
            cfg = self._remembered(gpu, text)
            if cfg is None and run is not None and tuning_allowed(device, tune):
                cfg = self._benchmark(key, run)
                self._persist(gpu, text, cfg)
            if cfg is None:
                return self.default(key)  # not remembered: later eager calls may still tune
            with self._lock:
                self._memory[full] = cfg
        return cfg

    def _benchmark(self, key: tuple, run: Callable[[Config], None]) -> Config:
        from triton.testing import do_bench

        best, best_ms = self.default(key), float("inf")
        for cfg in self.candidates(key):
            try:
                ms = do_bench(lambda: run(cfg), warmup=5, rep=25)
            except (triton.runtime.errors.OutOfResources, triton.compiler.errors.CompilationError, RuntimeError):
                continue  # a candidate that does not fit this GPU or shape is skipped, as Triton's autotuner does
            if ms < best_ms:
                best, best_ms = cfg, ms
        return best
