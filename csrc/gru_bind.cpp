// Python bindings of the GRU kernels (csrc/gru.cu); layouts and math in csrc/gru.h.
#include <pybind11/pybind11.h>

#include "gru.h"
#include "recurrence_bind.h"
#include "registry.h"

namespace py = pybind11;

SEQGEN_BINDINGS(gru) {
  seqgen::recurrence::bind_plans(m, "GRU", "gru", &seqgen::gru::plan_sequence, &seqgen::gru::check_sequence);
  m.def("gru_sequence_forward", &seqgen::gru::sequence_forward, py::arg("device"), py::arg("dtype"), py::arg("math"),
        py::arg("seq_len"), py::arg("batch"), py::arg("hidden"), py::arg("xg"), py::arg("w_hh"), py::arg("b_hh"),
        py::arg("h0"), py::arg("hs"), py::arg("h_n"), py::arg("act"), py::arg("flags"), py::arg("flag_count"),
        py::arg("stream"),
        "Persistent GRU forward over a sequence (cooperative launch, blocks hand h_t over through release/acquire "
        "flags). xg [T,B,3H] = x W_ih^T + b_ih, w_hh [3H,H], b_hh [3H] (or 0), h0 [B,H] -> hs [T,B,H], h_n [B,H]; "
        "the saved act [T,B,4H] = (r, z, n, hg^n) when non-zero. flags: flag_count zeroed uint32 words (at least the "
        "plan's blocks). Pointers as integers, one dtype code, fp32 accumulation.");
  m.def("gru_sequence_backward", &seqgen::gru::sequence_backward, py::arg("device"), py::arg("dtype"),
        py::arg("math"), py::arg("seq_len"), py::arg("batch"), py::arg("hidden"), py::arg("w_hh"), py::arg("hs"),
        py::arg("act"), py::arg("h0"), py::arg("grad_hs"), py::arg("grad_h_n"), py::arg("d_xg"), py::arg("d_hg"),
        py::arg("grad_h0"), py::arg("flags"), py::arg("flag_count"), py::arg("stream"),
        "Persistent GRU backward through time from the forward's hs, act and h0: d_xg and d_hg [T,B,3H] (w.r.t. xg "
        "and hg = h W_hh^T + b_hh), grad_h0 [B,H], all in the layer dtype. grad_hs/grad_h_n may be 0 (zeros); "
        "flags as for the forward.");
  m.def("gru_cell_step", &seqgen::gru::cell_step, py::arg("device"), py::arg("dtype"), py::arg("math"),
        py::arg("batch"), py::arg("input_size"), py::arg("hidden"), py::arg("x"), py::arg("h"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("h1"), py::arg("stream"),
        "One fused GRU cell step: r, z = sigmoid(x W_i^T + b_i + h W_h^T + b_h), n = tanh(x W_in^T + b_in + "
        "r (h W_hn^T + b_hn)), h1 = n + z (h - n). x [B,I], h/h1 [B,H], biases may be 0. One ordinary launch "
        "(CUDA-graph capturable); tensor cores (math 0; tf32 for float32) from batch 8, else fp32 FFMA.");
}
