"""A recurrent kernel family's launchers (``csrc/<family>.cu`` on ``csrc/recurrence.cuh``) run on the
host under the SIMT emulation of :mod:`support.emulation`, behind an adapter with the names,
arguments and exceptions of ``seqgen_fast._C``'s functions.

A family's test writes a shim: :func:`shim` gives its head (the emulation's entry points, the plan and
check of ``seqgen::<family>`` as ``emu_plan`` / ``emu_check``), the test adds ``extern "C"`` wrappers of
its launchers in ``EMU_CALL``; :class:`EmulatedRecurrence` subclasses give those the ``_C`` names.
:func:`emulate_cuda_backend` then makes the whole cuda backend of seqgen_fast (dispatch, supports,
launch plans, flags, ops, autograd) run on the emulated kernels with CPU tensors.

:func:`tsan_program` and :func:`assert_race_free` build and run a program driving the persistent
kernels with ThreadSanitizer: every read of another block's data must be ordered after its write by
the flags' release/acquire edges (and the block barriers), else TSan reports a data race.
"""
from __future__ import annotations

import ctypes
import os
import subprocess

import torch

from seqgen_fast import _backend, _ext

from .emulation import build_program

PLAN_KEYS = ("math", "groups", "slices", "units", "blocks", "threads", "rows", "cols", "kparts", "ngroups", "mt",
             "ntw", "bt", "smem_bytes")


def shim(family: str) -> str:
    """The head of a shim for ``csrc/<family>.h``: includes, and ``emu_plan`` / ``emu_check`` over
    ``seqgen::<family>::plan_sequence`` / ``check_sequence`` (the plan as PLAN_KEYS longs and a reason)."""
    return rf"""#include "seqgen_emulation_shim.h"
#include "common.cuh"
#include "{family}.h"

namespace {{
void fill(const seqgen::recurrence::SequencePlan& p, long* out, char* reason) {{
  const long v[] = {{p.math, p.groups, p.slices, p.units, p.blocks, p.threads, p.rows, p.cols, p.kparts,
                    p.ngroups, p.mt, p.ntw, p.bt, p.smem_bytes}};
  for (int i = 0; i < {len(PLAN_KEYS)}; ++i) out[i] = v[i];
  std::snprintf(reason, 1024, "%s", p.reason.c_str());
}}
}}  // namespace

extern "C" int emu_plan(int dt, long H, long B, int bwd, int math, int sms, long smem, long* out, char* reason) {{
  EMU_CALL(fill(seqgen::{family}::plan_sequence(dt, H, B, bwd != 0, math, sms, smem), out, reason))
}}
extern "C" int emu_check(int dt, long H, long B, int bwd, int math, long* out, char* reason) {{
  EMU_CALL(fill(seqgen::{family}::check_sequence(0, dt, H, B, bwd != 0, math, 0), out, reason))
}}
"""


class EmulatedRecurrence:
    """The calls every emulated family shares: calls of its shim's functions with tensors as host
    addresses (ValueError / RuntimeError as pybind11 raises them), its plan, check and launchers (a
    subclass binds them to the ``_C`` names: ``lstm_sequence_plan = EmulatedRecurrence.sequence_plan``),
    and the emulated device. The shim defines ``emu_forward`` / ``emu_backward`` (dtype, math, T, B, H,
    then ``forward_ptrs`` / ``backward_ptrs`` pointers and the flag count) and ``emu_cell`` (dtype, math,
    B, I, H, then ``cell_ptrs`` pointers): the ``_C`` launchers' arguments without device and stream."""

    def __init__(self, lib: ctypes.CDLL, forward_ptrs: int, backward_ptrs: int, cell_ptrs: int):
        self.lib = lib
        L, I, P = ctypes.c_long, ctypes.c_int, ctypes.c_size_t
        lib.emu_plan.argtypes = [I, L, L, I, I, I, L, P, P]
        lib.emu_check.argtypes = [I, L, L, I, I, P, P]
        lib.emu_forward.argtypes = [I, I, L, L, L] + [P] * forward_ptrs + [L]
        lib.emu_backward.argtypes = [I, I, L, L, L] + [P] * backward_ptrs + [L]
        lib.emu_cell.argtypes = [I, I, L, L, L] + [P] * cell_ptrs
        lib.emu_schedule.argtypes = [ctypes.c_uint]
        lib.emu_residency.argtypes = [I, I]

    def call(self, name, *args):
        rc = getattr(self.lib, name)(*[a.data_ptr() if isinstance(a, torch.Tensor) else (0 if a is None else a)
                                       for a in args])
        if rc:
            raise (ValueError if rc == 2 else RuntimeError)(self.lib.emu_error_message().decode())

    def _plan(self, name, *args):
        out, reason = (ctypes.c_long * len(PLAN_KEYS))(), ctypes.create_string_buffer(1024)
        self.call(name, *args, ctypes.addressof(out), ctypes.addressof(reason))
        return {"reason": reason.value.decode(), **dict(zip(PLAN_KEYS, out))}

    def sequence_plan(self, dtype, hidden, batch, backward, math, sm_count, smem_per_block):
        return self._plan("emu_plan", dtype, hidden, batch, int(backward), math, sm_count, smem_per_block)

    def sequence_check(self, device, dtype, hidden, batch, backward, math, stream):
        return self._plan("emu_check", dtype, hidden, batch, int(backward), math)

    def sequence_forward(self, device, dtype, math, seq_len, batch, hidden, *ptrs_flags_stream):
        self.call("emu_forward", dtype, math, seq_len, batch, hidden, *ptrs_flags_stream[:-1])

    def sequence_backward(self, device, dtype, math, seq_len, batch, hidden, *ptrs_flags_stream):
        self.call("emu_backward", dtype, math, seq_len, batch, hidden, *ptrs_flags_stream[:-1])

    def cell_step(self, device, dtype, math, batch, input_size, hidden, *ptrs_stream):
        self.call("emu_cell", dtype, math, batch, input_size, hidden, *ptrs_stream[:-1])

    def configure(self, sms, smem, threads, seed=0, context_sms=0, blocks_per_sm=1):
        """The emulated device (SMs, opt-in shared memory, threads per block of runtime-API launches),
        the schedule of cooperative launches, and what the context may occupy."""
        self.lib.emu_config(sms, smem, threads)
        self.lib.emu_schedule(seed)
        self.lib.emu_residency(context_sms, blocks_per_sm)


def seed() -> int:
    """A schedule seed drawn from the test's own seeded generator: fresh per test, reproducible."""
    return int(torch.randint(0, 2**31 - 1, ()).item())


def emulate_cuda_backend(monkeypatch, emu: EmulatedRecurrence, kernels, dispatchers) -> None:
    """The cuda backend of seqgen_fast on the emulated kernels, with CPU tensors: ``_C`` is ``emu``, CPU
    tensors count as the device's, device and stream are 0, ``kernels`` (a ``<family>_cuda`` module)
    plans afresh, and ``dispatchers`` forget their memoized choices. Everything above the C launchers
    is the real code."""
    real_unavailable, real_device_reasons = _backend.backend_unavailable, _backend.device_reasons
    monkeypatch.setattr(_backend, "backend_unavailable",
                        lambda name: None if name == "cuda" else real_unavailable(name))
    monkeypatch.setattr(_backend, "device_reasons",
                        lambda name, *ts: [] if name == "cuda" else real_device_reasons(name, *ts))
    monkeypatch.setattr(_ext, "C", emu)
    monkeypatch.setattr(_ext, "device_index", lambda t: 0)
    monkeypatch.setattr(kernels, "_stream", lambda device: 0)
    monkeypatch.setattr(kernels, "_LAUNCH_PLANS", {})
    for d in dispatchers:
        monkeypatch.setattr(d, "_memo", {})


def tsan_program(family: str, body: str) -> str:
    """A C++ program over ``csrc/<family>.h``: a head with ``values<T>(n, scale)`` (n small values of a
    fixed pattern), ``ptr(vector)`` (its address as a launcher takes it) and ``plans(dtype, math, B, H,
    sms, seed, fwd, bwd)`` (the emulated device of ``sms`` SMs and the schedule ``seed``, and the forward
    and backward plans there; false, after printing the reasons, when one does not fit), then ``body``
    (which defines main)."""
    return rf"""#include <cstdio>
#include <vector>
#include "seqgen_emulation_shim.h"
#include "common.cuh"
#include "{family}.h"
extern "C" void emu_config(int sms, int smem_optin, int threads);
extern "C" void emu_schedule(unsigned seed);

namespace {{
template <typename T>
std::vector<T> values(size_t n, float scale) {{
  std::vector<T> x(n);
  for (size_t i = 0; i < n; ++i) x[i] = seqgen::from_float<T>(scale * static_cast<float>(int(i * 7919 % 23) - 11));
  return x;
}}
template <class V>
uptr ptr(V& x) {{ return reinterpret_cast<uptr>(x.data()); }}
bool plans(int dtype, int math, int B, int H, int sms, unsigned seed, seqgen::recurrence::SequencePlan& fwd,
           seqgen::recurrence::SequencePlan& bwd) {{
  emu_config(sms, 232448, 32);
  emu_schedule(seed);
  fwd = seqgen::{family}::check_sequence(0, dtype, H, B, false, math, 0);
  bwd = seqgen::{family}::check_sequence(0, dtype, H, B, true, math, 0);
  if (fwd.reason.empty() && bwd.reason.empty()) return true;
  std::printf("plan: %s%s\n", fwd.reason.c_str(), bwd.reason.c_str());
  return false;
}}
}}  // namespace
""" + body


def assert_race_free(directory, kernel: str, program: str, name: str) -> None:
    """Builds ``program`` with csrc/``kernel`` under ThreadSanitizer (skips where g++ has none), runs it,
    and fails on any report or a non-zero exit."""
    exe = build_program(str(directory), kernel, program, name, sanitize="thread")
    run = subprocess.run([exe], capture_output=True, text=True, timeout=600,
                         env={**os.environ, "TSAN_OPTIONS": "halt_on_error=1 exitcode=66"})
    assert "ThreadSanitizer" not in run.stderr, run.stderr[-4000:]
    assert run.returncode == 0, run.stdout + run.stderr[-2000:]
