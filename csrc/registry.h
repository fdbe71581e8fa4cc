// Registration of each kernel family's Python bindings into the one PYBIND11_MODULE
// (csrc/bindings.cpp). A family's <family>_bind.cpp writes
//
//   SEQGEN_BINDINGS(lstm) { m.def("lstm_forward", ...); }
//
// and is linked into seqgen_fast._C; bindings.cpp runs every registered function at import.
#pragma once

#include <pybind11/pybind11.h>

namespace seqgen {
using BindFn = void (*)(pybind11::module_&);
int register_binding(const char* name, BindFn fn);
}  // namespace seqgen

#define SEQGEN_BINDINGS(name)                                                        \
  static void seqgen_bind_##name(pybind11::module_& m);                              \
  static const int seqgen_registered_##name = ::seqgen::register_binding(#name, &seqgen_bind_##name); \
  static void seqgen_bind_##name(pybind11::module_& m)
