// What a test's shim needs: the extern "C" functions through which ctypes calls a csrc launcher.
//
//   #include "seqgen_emulation_shim.h"
//   #include "lstm.h"
//   extern "C" int emu_cell(int dtype, long B, ..., uptr x, ...) {
//     EMU_CALL(seqgen::lstm::cell_step(0, dtype, B, ..., x, ..., 0))
//   }
//
// EMU_CALL returns 0, or after keeping the message of the exception the launcher threw for
// emu_error_message(): 2 for std::invalid_argument (a bad argument: pybind11's ValueError), 1 for any
// other (a launch the emulation refused, a CUDA failure: RuntimeError).
#pragma once

#include <cstdint>
#include <cstdio>
#include <exception>
#include <stdexcept>

#include "seqgen_emulation.h"

using uptr = std::uintptr_t;  // a device pointer passed as an integer, as the pybind launchers take it

inline char emu_error[1024];

#define EMU_CALL(body)                                                    \
  try {                                                                   \
    body;                                                                 \
    return 0;                                                             \
  } catch (const std::invalid_argument& e) {                              \
    std::snprintf(emu_error, sizeof emu_error, "%s", e.what());          \
    return 2;                                                             \
  } catch (const std::exception& e) {                                     \
    std::snprintf(emu_error, sizeof emu_error, "%s", e.what());          \
    return 1;                                                             \
  }
