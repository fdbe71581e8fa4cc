// GRU kernels (gate order r, z, n as in torch): a persistent cooperative kernel for the whole
// recurrence of one layer, forward and backward, and a fused one-step cell for generation. They are
// the GRU policy of the recurrence machinery the LSTM runs on (csrc/recurrence.cuh: the work split,
// the tensor-core and FFMA products, the flag handoff between blocks, the step kernel;
// csrc/recurrence_launch.cuh: plans, residency checks, launches).
//
// Math (fp32 in the kernels; h_{t-1} carried on chip in fp32 from step to step):
//   hg = h_{t-1} W_hh^T + b_hh                       (the recurrent product, b_hh kept apart from xg)
//   r = sigmoid(xg^r + hg^r),  z = sigmoid(xg^z + hg^z),  n = tanh(xg^n + r hg^n)
//   h_t = n + z (h_{t-1} - n)
// Backward per step, in reverse (dh_rec = d_hg_{t+1} W_hh, grad_h_n at t = T-1; carry from step t+1):
//   dh = dh_rec + grad_hs[t] + carry;  dn = dh (1-z)(1-n^2);  dz = dh (h_{t-1} - n) z(1-z);
//   dr = dn hg^n r(1-r);  d_xg = (dr, dz, dn);  d_hg = (dr, dz, dn r);  carry <- dh z
// and grad_h0 = d_hg_0 W_hh + carry.
//
// Layouts (all row-major, contiguous, one storage dtype T in {fp32, fp16, bf16}; fp32 accumulation):
//   xg     [T, B, 3H]  x_t @ W_ih^T + b_ih, precomputed by the caller with one GEMM
//   w_hh   [3H, H]     rows g*H + j hold gate g of hidden unit j;  b_hh [3H] (or 0: no bias)
//   h0     [B, H];  hs [T, B, H] = h_1..h_T;  h_n [B, H]
//   act    [T, B, 4H]  the saved format: r, z, n and hg^n (b_hn included), in T
//   d_xg, d_hg [T, B, 3H] in T: dLoss/dxg and dLoss/dhg (they differ in the n block by the factor r)
//
// `math` is recurrence.h's (kMathMma: tensor cores, tf32 for fp32; kMathFfma: exact fp32, float32
// only in the persistent kernels). Launchers take device pointers, sizes and the CUDA stream as
// integers (no libtorch), and a device index made current for the call. Bad arguments throw
// std::invalid_argument; CUDA failures and grids that cannot be resident throw std::runtime_error.
#pragma once

#include <cstdint>

#include "recurrence.h"

namespace seqgen {
namespace gru {

// The split of one layer (recurrence.h): each block owns `units` hidden units with their three gate
// rows. Pure host computation; kMathFfma with a half type throws std::invalid_argument.
recurrence::SequencePlan plan_sequence(int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                                       int sm_count, int64_t smem_per_block);

// The plan a launch on `stream` of `device` meets (the SMs its context and stream may use, the
// planned kernel's occupancy), with the reason it cannot run there, if any.
recurrence::SequencePlan check_sequence(int device, int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                                        std::uintptr_t stream);

// Forward over the whole sequence: writes hs and h_n and, when act is non-zero (training), the saved
// format. b_hh may be 0. `flags`: flag_count zeroed uint32 words, at least the plan's blocks.
void sequence_forward(int device, int dtype, int math, int64_t seq_len, int64_t batch, int64_t hidden,
                      std::uintptr_t xg, std::uintptr_t w_hh, std::uintptr_t b_hh, std::uintptr_t h0,
                      std::uintptr_t hs, std::uintptr_t h_n, std::uintptr_t act, std::uintptr_t flags,
                      int64_t flag_count, std::uintptr_t stream);

// Backward through time from the forward's hs, act and h0: writes d_xg, d_hg (layer dtype) and
// grad_h0. grad_hs and grad_h_n may be 0 (zero gradients). `flags` as for the forward.
void sequence_backward(int device, int dtype, int math, int64_t seq_len, int64_t batch, int64_t hidden,
                       std::uintptr_t w_hh, std::uintptr_t hs, std::uintptr_t act, std::uintptr_t h0,
                       std::uintptr_t grad_hs, std::uintptr_t grad_h_n, std::uintptr_t d_xg, std::uintptr_t d_hg,
                       std::uintptr_t grad_h0, std::uintptr_t flags, int64_t flag_count, std::uintptr_t stream);

// One fused step: x W_ih^T + b_ih and h W_hh^T + b_hh (kept apart for the n gate), then the cell:
// h1 [B, H] from x [B, I] and h [B, H]; b_ih/b_hh may be 0. One ordinary launch (CUDA-graph
// capturable): on tensor cores (kMathMma; tf32 for fp32) when batch >= 8, else fp32 FFMA tiles.
void cell_step(int device, int dtype, int math, int64_t batch, int64_t input_size, int64_t hidden, std::uintptr_t x,
               std::uintptr_t h, std::uintptr_t w_ih, std::uintptr_t w_hh, std::uintptr_t b_ih, std::uintptr_t b_hh,
               std::uintptr_t h1, std::uintptr_t stream);

}  // namespace gru
}  // namespace seqgen
