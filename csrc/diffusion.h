// Fused diffusion scheduler step (the CUDA twin of seqgen_fast/kernels/diffusion.py for the DDPM- and
// DDIM-style steps: no multistep history, no timestep search). Math and row layout as in
// seqgen_fast/reference/diffusion.py; per sample b with row c = coef[key_b] (24 floats, of which this
// kernel reads columns 0..7 -- x0_x, x0_m, x, x0, m, (h1), noise, pre_noise -- and 19, 20 -- aux_x, aux_x0):
//
//   m   = model_scale_b * (u + g_b (c - u))   (cfg: model_output is [uncond (B); cond (B)]) else model_output
//   x'  = x + c.pre_noise * n
//   x0  = c.x0_x x' + c.x0_m m ;  x0c = clamp(x0, -r, r) (x0_mode 1) or clamp(x0, -s_b, s_b) / s_b (x0_mode 2)
//   out = c.x x' + c.x0 x0c + c.m m + c.noise n ;  x0 output = c.aux_x x' + c.aux_x0 x0c
//
// Layouts: sample, out, x0, noise [B, N] contiguous; model_output [B or 2B, N]; coef [rows, 24] fp32;
// timesteps [B] (stride ts_stride, 0 = one for all) of dtype code ts_dtype (0 f32, 1 i64, 2 i32),
// read when key < 0 (the row is the integer timestep; a non-integer or out-of-table timestep gives NaN);
// guidance, model_scale, threshold [B] fp32 or 0 (null). noise_mode 0 none, 1 given (dtype code
// noise_dtype), 2 in-kernel Philox4x32-10: element i of sample b takes word (i & 3) of
// philox(key = seed, counter = (i >> 2, b, offset, 0)), Box-Muller on word pairs (0,1), (2,3); when
// rng_offset is non-zero it points to one int64 on the device added to offset (mod 2^32) -- the
// offset a captured CUDA graph reads at each replay.
// Storage dtype T in {fp32, fp16, bf16}; math in fp32; 16-byte accesses when every pointer is aligned
// and N is a multiple of the pack (4 fp32 / 8 half), else an element-wise path with the same results.
#pragma once

#include <cstdint>

namespace seqgen {
namespace diffusion {

void step(std::uintptr_t sample, std::uintptr_t model_output, std::uintptr_t out, std::uintptr_t x0,
          std::uintptr_t noise, std::uintptr_t coef, std::uintptr_t timesteps, int ts_dtype, int64_t ts_stride,
          std::uintptr_t guidance, std::uintptr_t model_scale, std::uintptr_t threshold, int64_t batch, int64_t n,
          int64_t rows, int64_t key, int cfg, float guidance_scale, int x0_mode, float clip_range, int noise_mode,
          uint64_t seed, uint32_t offset, std::uintptr_t rng_offset, int dtype, int noise_dtype, int device,
          std::uintptr_t stream);

}  // namespace diffusion
}  // namespace seqgen
