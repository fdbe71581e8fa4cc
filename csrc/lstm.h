// LSTM kernels (gate order i, f, g, o as in torch): a persistent cooperative kernel for the whole
// recurrence of one layer, forward and backward, and a fused one-step cell for generation. The
// persistent kernels are the LSTM policy of the shared recurrence machinery (csrc/recurrence.cuh:
// the work split, the tensor-core products, the flag handoff between blocks).
//
// Layouts (all row-major, contiguous, one storage dtype T in {fp32, fp16, bf16}; fp32 accumulation):
//   xg     [T, B, 4H]  x_t @ W_ih^T + b_ih + b_hh, precomputed by the caller with one GEMM
//   w_hh   [4H, H]     rows g*H + j hold gate g of hidden unit j
//   h0, c0 [B, H]
//   hs, cs [T, B, H]   h_1..h_T and c_1..c_T
//   gates  [T, B, 4H]  activated gates sigmoid(i), sigmoid(f), tanh(g), sigmoid(o)
//   grad_gates [T, B, 4H] in T: dLoss/d(pre-activation gates)
//
// `math` picks the recurrent product (recurrence.h): kMathMma runs it on tensor cores (fp16/bf16
// mma.m16n8k16; fp32 operands rounded to tf32 for mma.m16n8k8, what cuDNN does under
// torch.backends.cudnn.allow_tf32), kMathFfma on the CUDA cores in exact fp32 (float32 only in the
// persistent kernels).
//
// Launchers take device pointers, sizes and the CUDA stream as integers (no libtorch), and a
// device index made current for the call. Bad arguments throw std::invalid_argument; CUDA failures
// and grids that cannot be resident throw std::runtime_error.
#pragma once

#include <cstdint>
#include <string>

#include "recurrence.h"

namespace seqgen {
namespace lstm {

using recurrence::kMathFfma;
using recurrence::kMathMma;
using recurrence::Math;
// How the persistent kernel splits one layer over the GPU (recurrence.h): each block owns `units`
// hidden units with all four gate rows.
using recurrence::SequencePlan;

// Pure host computation (no CUDA call): the plan for hidden size `hidden`, batch `batch`, storage
// dtype code `dtype` and product `math`, on a device with `sm_count` SMs and `smem_per_block` opt-in
// shared memory. Unsupported combinations (kMathFfma with a half type) throw std::invalid_argument.
SequencePlan plan_sequence(int dtype, int64_t hidden, int64_t batch, bool backward, int math, int sm_count,
                           int64_t smem_per_block);

// What a launch on `stream` of `device` meets: the plan for the device's opt-in shared memory and the
// SMs its context and stream may use (available_sms: MPS client limits, green contexts), with the
// reason the cooperative grid cannot be resident (the occupancy of the planned kernel x those SMs),
// or that the device has no cooperative launch, when so. What the launchers check before launching.
SequencePlan check_sequence(int device, int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                            std::uintptr_t stream);

// Forward over the whole sequence: writes hs, h_n, c_n and, when cs/gates are non-zero (training),
// c_1..c_T and the activated gates. `flags`: flag_count zeroed uint32 words, at least the plan's
// blocks (the handoff flags). Requires seq_len, batch, hidden >= 1.
void sequence_forward(int device, int dtype, int math, int64_t seq_len, int64_t batch, int64_t hidden,
                      std::uintptr_t xg, std::uintptr_t w_hh, std::uintptr_t h0, std::uintptr_t c0,
                      std::uintptr_t hs, std::uintptr_t h_n, std::uintptr_t c_n, std::uintptr_t cs,
                      std::uintptr_t gates, std::uintptr_t flags, int64_t flag_count, std::uintptr_t stream);

// Backward through time from the saved cs and gates: writes grad_gates (in the layer dtype), grad_h0,
// grad_c0. grad_hs, grad_h_n, grad_c_n may be 0 (zero gradients). `flags` as for the forward.
void sequence_backward(int device, int dtype, int math, int64_t seq_len, int64_t batch, int64_t hidden,
                       std::uintptr_t w_hh, std::uintptr_t cs, std::uintptr_t gates, std::uintptr_t c0,
                       std::uintptr_t grad_hs, std::uintptr_t grad_h_n, std::uintptr_t grad_c_n,
                       std::uintptr_t grad_gates, std::uintptr_t grad_h0, std::uintptr_t grad_c0,
                       std::uintptr_t flags, int64_t flag_count, std::uintptr_t stream);

// One fused step: gates = x W_ih^T + b_ih + h W_hh^T + b_hh, c1 = f*c + i*g, h1 = o*tanh(c1).
// x [B, I], h/c/h1/c1 [B, H]; b_ih/b_hh may be 0. One ordinary launch (CUDA-graph capturable): on
// tensor cores (kMathMma; tf32 for fp32) when batch >= 8, else on the CUDA cores in fp32.
void cell_step(int device, int dtype, int math, int64_t batch, int64_t input_size, int64_t hidden,
               std::uintptr_t x, std::uintptr_t h, std::uintptr_t c, std::uintptr_t w_ih,
               std::uintptr_t w_hh, std::uintptr_t b_ih, std::uintptr_t b_hh, std::uintptr_t h1,
               std::uintptr_t c1, std::uintptr_t stream);

}  // namespace lstm
}  // namespace seqgen
