// Python bindings of the LSTM kernels (csrc/lstm.cu); layouts and math in csrc/lstm.h.
#include <pybind11/pybind11.h>

#include "lstm.h"
#include "registry.h"

namespace py = pybind11;

namespace {

py::dict plan_dict(int dtype, int64_t hidden, int64_t batch, bool backward, int sm_count, int64_t smem_per_block) {
  const seqgen::lstm::SequencePlan p =
      seqgen::lstm::plan_sequence(dtype, hidden, batch, backward, sm_count, smem_per_block);
  py::dict d;
  d["reason"] = p.reason;
  d["units"] = p.units;
  d["blocks"] = p.blocks;
  d["threads"] = p.threads;
  d["batch_tile"] = p.batch_tile;
  d["batch_step"] = p.batch_step;
  d["ksplit"] = p.ksplit;
  d["k_pad"] = p.k_pad;
  d["smem_bytes"] = p.smem_bytes;
  return d;
}

}  // namespace

SEQGEN_BINDINGS(lstm) {
  m.def("lstm_sequence_plan", &plan_dict, py::arg("dtype"), py::arg("hidden"), py::arg("batch"),
        py::arg("backward"), py::arg("sm_count"), py::arg("smem_per_block"),
        "Split of the persistent LSTM kernel for these sizes on a device with sm_count SMs and "
        "smem_per_block bytes of opt-in shared memory (pure host computation, no CUDA call): dict with "
        "reason ('' when it fits), units per block, blocks, threads, batch_tile, batch_step, ksplit, "
        "k_pad, smem_bytes.");
  m.def("lstm_sequence_forward", &seqgen::lstm::sequence_forward, py::arg("device"), py::arg("dtype"),
        py::arg("seq_len"), py::arg("batch"), py::arg("hidden"), py::arg("xg"), py::arg("w_hh"), py::arg("h0"),
        py::arg("c0"), py::arg("hs"), py::arg("h_n"), py::arg("c_n"), py::arg("cs"), py::arg("gates"),
        py::arg("stream"),
        "Persistent LSTM forward over a sequence (cooperative launch). xg [T,B,4H] = x W_ih^T + b_ih + b_hh, "
        "w_hh [4H,H], h0/c0 [B,H] -> hs [T,B,H], h_n/c_n [B,H]; cs [T,B,H] and activated gates [T,B,4H] "
        "when both are non-zero. Pointers as integers, one dtype code, fp32 math.");
  m.def("lstm_sequence_backward", &seqgen::lstm::sequence_backward, py::arg("device"), py::arg("dtype"),
        py::arg("seq_len"), py::arg("batch"), py::arg("hidden"), py::arg("w_hh"), py::arg("cs"), py::arg("gates"),
        py::arg("c0"), py::arg("grad_hs"), py::arg("grad_h_n"), py::arg("grad_c_n"), py::arg("grad_gates"),
        py::arg("grad_h0"), py::arg("grad_c0"), py::arg("stream"),
        "Persistent LSTM backward through time from saved cs/gates: grad_gates [T,B,4H] (fp32, w.r.t. "
        "pre-activations), grad_h0/grad_c0 [B,H] (layer dtype). grad_hs/grad_h_n/grad_c_n may be 0 (zeros).");
  m.def("lstm_cell_step", &seqgen::lstm::cell_step, py::arg("device"), py::arg("dtype"), py::arg("batch"),
        py::arg("input_size"), py::arg("hidden"), py::arg("x"), py::arg("h"), py::arg("c"), py::arg("w_ih"),
        py::arg("w_hh"), py::arg("b_ih"), py::arg("b_hh"), py::arg("h1"), py::arg("c1"), py::arg("stream"),
        "One fused LSTM cell step: gates = x W_ih^T + b_ih + h W_hh^T + b_hh; c1 = f*c + i*g; h1 = o*tanh(c1). "
        "x [B,I], h/c/h1/c1 [B,H], biases may be 0. One ordinary launch (CUDA-graph capturable).");
}
