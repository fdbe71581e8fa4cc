// Python bindings of the LSTM kernels (csrc/lstm.cu); layouts and math in csrc/lstm.h.
#include <pybind11/pybind11.h>

#include "lstm.h"
#include "recurrence_bind.h"
#include "registry.h"

namespace py = pybind11;

SEQGEN_BINDINGS(lstm) {
  seqgen::recurrence::bind_plans(m, "LSTM", "lstm", &seqgen::lstm::plan_sequence, &seqgen::lstm::check_sequence);
  m.def("lstm_sequence_forward", &seqgen::lstm::sequence_forward, py::arg("device"), py::arg("dtype"), py::arg("math"),
        py::arg("seq_len"), py::arg("batch"), py::arg("hidden"), py::arg("xg"), py::arg("w_hh"), py::arg("h0"),
        py::arg("c0"), py::arg("hs"), py::arg("h_n"), py::arg("c_n"), py::arg("cs"), py::arg("gates"),
        py::arg("flags"), py::arg("flag_count"), py::arg("stream"),
        "Persistent LSTM forward over a sequence (cooperative launch, blocks hand h_t over through release/acquire "
        "flags). xg [T,B,4H] = x W_ih^T + b_ih + b_hh, w_hh [4H,H], h0/c0 [B,H] -> hs [T,B,H], h_n/c_n [B,H]; cs "
        "[T,B,H] and activated gates [T,B,4H] when both are non-zero. flags: flag_count zeroed uint32 words (at least "
        "the plan's blocks). Pointers as integers, one dtype code, fp32 accumulation.");
  m.def("lstm_sequence_backward", &seqgen::lstm::sequence_backward, py::arg("device"), py::arg("dtype"),
        py::arg("math"), py::arg("seq_len"), py::arg("batch"), py::arg("hidden"), py::arg("w_hh"), py::arg("cs"),
        py::arg("gates"), py::arg("c0"), py::arg("grad_hs"), py::arg("grad_h_n"), py::arg("grad_c_n"),
        py::arg("grad_gates"), py::arg("grad_h0"), py::arg("grad_c0"), py::arg("flags"), py::arg("flag_count"),
        py::arg("stream"),
        "Persistent LSTM backward through time from saved cs/gates: grad_gates [T,B,4H] (w.r.t. pre-activations), "
        "grad_h0/grad_c0 [B,H], all in the layer dtype. grad_hs/grad_h_n/grad_c_n may be 0 (zeros); flags as for "
        "the forward.");
  m.def("lstm_cell_step", &seqgen::lstm::cell_step, py::arg("device"), py::arg("dtype"), py::arg("math"),
        py::arg("batch"), py::arg("input_size"), py::arg("hidden"), py::arg("x"), py::arg("h"), py::arg("c"),
        py::arg("w_ih"), py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("h1"), py::arg("c1"),
        py::arg("stream"),
        "One fused LSTM cell step: gates = x W_ih^T + b_ih + h W_hh^T + b_hh; c1 = f*c + i*g; h1 = o*tanh(c1). "
        "x [B,I], h/c/h1/c1 [B,H], biases may be 0. One ordinary launch (CUDA-graph capturable); tensor cores "
        "(math 0; tf32 for float32) from batch 8, else fp32 FFMA.");
}
