// The emulation's entry points for ctypes, linked into every emulated library (tests/support/emulation.py).
#include "seqgen_emulation_shim.h"

// Device facts the launchers query and the block size of the runtime-API launches (seqgen_emulation.h).
extern "C" void emu_config(int sms, int smem_optin, int threads) {
  emu_sms = sms;
  emu_smem_optin = smem_optin;
  emu_threads = threads;
}

// The schedule of cooperative launches: block start order and pauses at flag operations (seqgen_emulation.h).
extern "C" void emu_schedule(unsigned seed) { emu_seed = seed; }

// What a launch may occupy: the SMs of the context (0: all emu_sms) and the blocks one SM holds.
extern "C" void emu_residency(int context_sms, int blocks_per_sm) {
  emu_context_sms = context_sms;
  emu_blocks_per_sm = blocks_per_sm;
}

// The message of the last exception an EMU_CALL caught.
extern "C" const char* emu_error_message() { return emu_error; }
