// LSTM kernels (gate order i, f, g, o as in torch): a persistent cooperative kernel for the whole
// recurrence of one layer, forward and backward, and a fused one-step cell for generation.
//
// Layouts (all row-major, contiguous, one storage dtype T in {fp32, fp16, bf16}; math in fp32):
//   xg     [T, B, 4H]  x_t @ W_ih^T + b_ih + b_hh, precomputed by the caller with one GEMM
//   w_hh   [4H, H]     rows g*H + j hold gate g of hidden unit j
//   h0, c0 [B, H]
//   hs, cs [T, B, H]   h_1..h_T and c_1..c_T
//   gates  [T, B, 4H]  activated gates sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
//   grad_gates [T, B, 4H] fp32: dLoss/d(pre-activation gates)
//
// Launchers take device pointers, sizes and the CUDA stream as integers (no libtorch), and a
// device index made current for the call. Bad arguments throw std::invalid_argument; CUDA failures
// throw std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

namespace seqgen {
namespace lstm {

// How the persistent kernel splits one layer over the GPU. Each of `blocks` blocks owns `units`
// consecutive hidden units with all four gate rows, keeps its slice of W_hh in shared memory for
// the whole sequence, and stages `batch_tile` rows of the recurrent input (h_{t-1} forward,
// grad_gates_{t+1} backward) at a time. `reason` is empty when the problem fits.
struct SequencePlan {
  std::string reason;
  int units = 0;
  int blocks = 0;
  int threads = 0;
  int batch_tile = 0;   // rows of the staged input per pass (a multiple of batch_step)
  int batch_step = 0;   // batch rows per warp tile (4 when batch >= 4, else 1)
  int ksplit = 0;       // warps splitting the reduction dimension of one tile
  int k_pad = 0;        // padded reduction length of the shared-memory rows
  int64_t smem_bytes = 0;
};

// Pure host computation (no CUDA call): the plan for hidden size `hidden`, batch `batch`, storage
// dtype code `dtype`, on a device with `sm_count` SMs and `smem_per_block` opt-in shared memory.
SequencePlan plan_sequence(int dtype, int64_t hidden, int64_t batch, bool backward, int sm_count,
                           int64_t smem_per_block);

// Forward over the whole sequence: writes hs, h_n, c_n and, when cs/gates are non-zero (training),
// c_1..c_T and the activated gates. Requires seq_len, batch, hidden >= 1.
void sequence_forward(int device, int dtype, int64_t seq_len, int64_t batch, int64_t hidden,
                      std::uintptr_t xg, std::uintptr_t w_hh, std::uintptr_t h0, std::uintptr_t c0,
                      std::uintptr_t hs, std::uintptr_t h_n, std::uintptr_t c_n, std::uintptr_t cs,
                      std::uintptr_t gates, std::uintptr_t stream);

// Backward through time from the saved cs and gates: writes grad_gates (fp32), grad_h0, grad_c0.
// grad_hs, grad_h_n, grad_c_n may be 0 (zero gradients).
void sequence_backward(int device, int dtype, int64_t seq_len, int64_t batch, int64_t hidden,
                       std::uintptr_t w_hh, std::uintptr_t cs, std::uintptr_t gates, std::uintptr_t c0,
                       std::uintptr_t grad_hs, std::uintptr_t grad_h_n, std::uintptr_t grad_c_n,
                       std::uintptr_t grad_gates, std::uintptr_t grad_h0, std::uintptr_t grad_c0,
                       std::uintptr_t stream);

// One fused step: gates = x W_ih^T + b_ih + h W_hh^T + b_hh, c1 = f*c + i*g, h1 = o*tanh(c1).
// x [B, I], h/c/h1/c1 [B, H]; b_ih/b_hh may be 0. One ordinary launch (CUDA-graph capturable).
void cell_step(int device, int dtype, int64_t batch, int64_t input_size, int64_t hidden,
               std::uintptr_t x, std::uintptr_t h, std::uintptr_t c, std::uintptr_t w_ih,
               std::uintptr_t w_hh, std::uintptr_t b_ih, std::uintptr_t b_hh, std::uintptr_t h1,
               std::uintptr_t c1, std::uintptr_t stream);

}  // namespace lstm
}  // namespace seqgen
