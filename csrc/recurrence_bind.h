// The bindings the recurrent kernel families share (csrc/lstm_bind.cpp, csrc/gru_bind.cpp): their
// product codes and their plan / check functions, whose results are dicts with the same keys.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <string>

#include "recurrence.h"

namespace seqgen {
namespace recurrence {

inline pybind11::dict plan_dict(const SequencePlan& p) {
  pybind11::dict d;
  d["reason"] = p.reason;
  d["math"] = p.math;
  d["groups"] = p.groups;
  d["slices"] = p.slices;
  d["units"] = p.units;
  d["blocks"] = p.blocks;
  d["threads"] = p.threads;
  d["rows"] = p.rows;
  d["cols"] = p.cols;
  d["kparts"] = p.kparts;
  d["ngroups"] = p.ngroups;
  d["mt"] = p.mt;
  d["ntw"] = p.ntw;
  d["bt"] = p.bt;
  d["smem_bytes"] = p.smem_bytes;
  return d;
}

// On module m: <NAME>_MATH_MMA / <NAME>_MATH_FFMA, and <family>_sequence_plan / <family>_sequence_check
// over the family's plan_sequence and check_sequence (name "LSTM", family "lstm").
inline void bind_plans(pybind11::module_& m, const std::string& name, const std::string& family, PlanFn plan,
                       CheckFn check) {
  namespace py = pybind11;
  m.attr((name + "_MATH_MMA").c_str()) = static_cast<int>(kMathMma);
  m.attr((name + "_MATH_FFMA").c_str()) = static_cast<int>(kMathFfma);
  const std::string keys =
      "dict with reason ('' when it fits), math, groups, slices, units (per block), blocks, threads, rows, cols "
      "(batch columns per pass), kparts, ngroups, mt, ntw (tensor-core warp tiles), bt (FFMA warp tiles), smem_bytes.";
  m.def((family + "_sequence_plan").c_str(),
        [plan](int dtype, int64_t hidden, int64_t batch, bool backward, int math, int sm_count,
               int64_t smem_per_block) {
          return plan_dict(plan(dtype, hidden, batch, backward, math, sm_count, smem_per_block));
        },
        py::arg("dtype"), py::arg("hidden"), py::arg("batch"), py::arg("backward"), py::arg("math"),
        py::arg("sm_count"), py::arg("smem_per_block"),
        ("Split of the persistent " + name + " kernel for these sizes and product (math: 0 tensor cores, 1 fp32 "
         "FFMA) on a device with sm_count SMs and smem_per_block bytes of opt-in shared memory (pure host "
         "computation, no CUDA call): " + keys).c_str());
  m.def((family + "_sequence_check").c_str(),
        [check](int device, int dtype, int64_t hidden, int64_t batch, bool backward, int math, std::uintptr_t stream) {
          return plan_dict(check(device, dtype, hidden, batch, backward, math, stream));
        },
        py::arg("device"), py::arg("dtype"), py::arg("hidden"), py::arg("batch"), py::arg("backward"),
        py::arg("math"), py::arg("stream"),
        ("The plan a launch on `stream` of `device` would run, for the SMs its context and stream may use (MPS "
         "client limits, green contexts), with the reason when it does not fit on chip, the device has no "
         "cooperative launch, or the cooperative grid cannot be resident (occupancy query): " + keys).c_str());
}

}  // namespace recurrence
}  // namespace seqgen
