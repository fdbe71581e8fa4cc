// Host SIMT emulation of the CUDA runtime, for running the kernels of csrc/ on the CPU in the tests.
//
// csrc/common.cuh includes this header in place of <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and
// <cooperative_groups.h> when SEQGEN_HOST_EMULATION is defined, and its seam macros become
//   SEQGEN_DYNAMIC_SMEM()                     -> emu_smem_ptr
//   SEQGEN_LAUNCH(k, grid, block, smem, s, ...) -> emu_chevron(k, grid, block, smem, s, ...)
// so g++ compiles a csrc/*.cu file unchanged (tests/support/emulation.py builds it).
//
// Every CUDA thread is a host thread; __syncthreads, grid.sync and each warp shuffle are std::barrier
// waits. A launch checks what a device would refuse or what a kernel must not do:
//   * block size 1..1024, grid.y and grid.z at most 65535, no empty grid;
//   * dynamic shared memory within 48 KiB (ordinary launch) or the opt-in limit (cooperative);
//   * a cooperative grid no larger than the SM count (one persistent block per SM), grid.sync only
//     inside a cooperative launch (else it aborts: the waiting threads cannot be unwound);
//   * shared memory starts as 0xFF bytes (NaN in fp32, fp16 and bf16: reads before writes show up in
//     the results) and the 64 bytes past the planned size must still be 0xFF afterwards.
// It cannot check L1/L2 coherence, memory-model races or timing.
//
// Launches through the runtime API (cudaLaunchCooperativeKernel, cudaLaunchKernel) run blocks of
// emu_threads threads, whatever block they ask for: the LSTM kernels take any multiple of 32, and
// 32-64 host threads per block keep the tests fast. SEQGEN_LAUNCH launches run the block they ask for.
// emu_config() (seqgen_emulation.cpp) sets emu_sms, emu_smem_optin and emu_threads.
#pragma once

#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

// ---- CUDA qualifiers: plain host code --------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)

// ---- vector types ------------------------------------------------------------------------------
struct dim3 {
  unsigned x, y, z;
  dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {}
};
struct uint4 { unsigned x, y, z, w; };
struct float4 { float x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }

// ---- cuda_fp16.h / cuda_bf16.h -------------------------------------------------------------------
struct __half { _Float16 v; };
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return {_Float16(f)}; }
inline __half __ushort_as_half(unsigned short u) { __half h; std::memcpy(&h, &u, 2); return h; }

struct __nv_bfloat16 { unsigned short x; };
inline float __bfloat162float(__nv_bfloat16 h) {
  const unsigned u = unsigned(h.x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float f) {  // round to nearest even
  unsigned u;
  std::memcpy(&u, &f, 4);
  u += 0x7FFF + ((u >> 16) & 1);
  return {static_cast<unsigned short>(u >> 16)};
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }

// ---- what the emulation is configured with, and the state of the running CUDA thread --------------
inline int emu_sms = 1;           // cudaDevAttrMultiProcessorCount
inline int emu_smem_optin = 0;    // cudaDevAttrMaxSharedMemoryPerBlockOptin
inline int emu_threads = 32;      // block size of the runtime-API launches (see above)
constexpr size_t kEmuSmemLimit = 48 * 1024;  // dynamic shared memory of an ordinary launch

inline thread_local dim3 threadIdx, blockIdx, blockDim;
inline thread_local unsigned char* emu_smem_ptr;   // the block's dynamic shared memory
inline thread_local int emu_lane;                  // linear thread index % 32
inline thread_local std::barrier<>* emu_block_bar; // __syncthreads
inline thread_local std::barrier<>* emu_warp_bar;  // one per warp: shuffles
inline thread_local float* emu_warp_buf;           // 32 floats per warp: shuffle exchange
inline thread_local std::barrier<>* emu_grid_bar;  // grid.sync; null outside cooperative launches

// ---- runtime API: errors, device facts, launch attributes -----------------------------------------
typedef int cudaError_t;
constexpr cudaError_t cudaSuccess = 0;
typedef void* cudaStream_t;
enum cudaDeviceAttr {
  cudaDevAttrMultiProcessorCount,
  cudaDevAttrMaxSharedMemoryPerBlockOptin,
  cudaDevAttrCooperativeLaunch,
};
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };

// Launch errors are thrown (std::runtime_error) where they happen, so these never see one.
inline const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetLastError() { return cudaSuccess; }
inline cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
inline cudaError_t cudaSetDevice(int) { return cudaSuccess; }
inline cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? emu_sms
           : attr == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu_smem_optin
                                                              : 1;
  return cudaSuccess;
}
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return cudaSuccess; }
template <class F>
cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* blocks, F, int, size_t) {
  *blocks = 1;
  return cudaSuccess;
}

// ---- device intrinsics -----------------------------------------------------------------------------
using std::min;
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  emu_warp_buf[emu_lane] = v;
  emu_warp_bar->arrive_and_wait();  // every lane has published
  const float r = emu_warp_buf[emu_lane ^ lane_mask];
  emu_warp_bar->arrive_and_wait();  // every lane has read before the next shuffle overwrites
  return r;
}
inline float __ldcg(const float* p) { return *p; }
inline unsigned short __ldcg(const unsigned short* p) { return *p; }
inline uint4 __ldcg(const uint4* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((unsigned long long)a * b >> 32); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

// ---- cooperative_groups.h --------------------------------------------------------------------------
namespace cooperative_groups {
struct grid_group {
  // Outside a cooperative launch this is a kernel bug that cannot be unwound (the other threads wait
  // at barriers), so it aborts with the reason rather than throwing from a worker thread.
  void sync() {
    if (emu_grid_bar == nullptr) {
      std::fprintf(stderr, "seqgen emulation: grid.sync outside a cooperative launch\n");
      std::abort();
    }
    emu_grid_bar->arrive_and_wait();
  }
};
inline grid_group this_grid() { return {}; }
}  // namespace cooperative_groups

// ---- launches ------------------------------------------------------------------------------------
// Kernels launched through the runtime API take one parameter (csrc's take a params struct).
namespace emu_detail {

constexpr unsigned char kPoison = 0xFF;  // NaN in fp32, fp16 and bf16
constexpr size_t kGuardBytes = 64;       // past the planned shared memory: must stay kPoison

// What one block owns while it runs.
struct Block {
  std::barrier<> sync;
  std::vector<std::unique_ptr<std::barrier<>>> warps;
  std::vector<float> lanes;
  std::vector<unsigned char> smem;
  Block(int threads, size_t smem_bytes)
      : sync(threads), lanes(size_t(threads + 31) / 32 * 32), smem(smem_bytes + kGuardBytes, kPoison) {
    for (int w = 0; 32 * w < threads; ++w) warps.push_back(std::make_unique<std::barrier<>>(std::min(32, threads - 32 * w)));
  }
};

inline void check_config(dim3 grid, dim3 block, size_t smem, size_t smem_limit) {
  const unsigned long long threads = 1ull * block.x * block.y * block.z;
  if (threads == 0 || threads > 1024) throw std::runtime_error("block size " + std::to_string(threads) + " outside 1..1024");
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) throw std::runtime_error("empty grid");
  if (grid.y > 65535 || grid.z > 65535) throw std::runtime_error("grid.y/z over 65535");
  if (smem > smem_limit) {
    throw std::runtime_error(std::to_string(smem) + " bytes of dynamic shared memory over the limit of " +
                             std::to_string(smem_limit));
  }
}

// Runs `count` blocks of `grid` at the same time, linear block indices first.. (x fastest), one host
// thread per CUDA thread, each calling body(); then checks every block's shared-memory guard.
template <class Body>
void run_blocks(const Body& body, dim3 grid, dim3 block, size_t smem, unsigned first, unsigned count,
                std::barrier<>* grid_bar) {
  const int threads = int(block.x * block.y * block.z);
  std::vector<std::unique_ptr<Block>> blocks;
  for (unsigned i = 0; i < count; ++i) blocks.push_back(std::make_unique<Block>(threads, smem));
  std::vector<std::thread> workers;
  for (unsigned i = 0; i < count; ++i) {
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, i, t] {
        Block& b = *blocks[i];
        const unsigned linear = first + i;
        threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
        blockIdx = dim3(linear % grid.x, linear / grid.x % grid.y, linear / (grid.x * grid.y));
        blockDim = block;
        emu_smem_ptr = b.smem.data();
        emu_lane = t % 32;
        emu_block_bar = &b.sync;
        emu_warp_bar = b.warps[t / 32].get();
        emu_warp_buf = b.lanes.data() + t / 32 * 32;
        emu_grid_bar = grid_bar;
        body();
      });
    }
  }
  for (auto& w : workers) w.join();
  for (const auto& b : blocks) {
    if (std::any_of(b->smem.begin() + smem, b->smem.end(), [](unsigned char c) { return c != kPoison; })) {
      throw std::runtime_error("a kernel wrote past its planned shared memory");
    }
  }
}

// An ordinary launch: blocks run one after the other (CUDA promises no order or concurrency between
// them), the threads of a block together.
template <class Body>
void run_ordinary(const Body& body, dim3 grid, dim3 block, size_t smem) {
  check_config(grid, block, smem, kEmuSmemLimit);
  const unsigned blocks = grid.x * grid.y * grid.z;
  for (unsigned b = 0; b < blocks; ++b) run_blocks(body, grid, block, smem, b, 1, nullptr);
}

}  // namespace emu_detail

template <class P>
cudaError_t cudaLaunchCooperativeKernel(void (*kernel)(P), dim3 grid, dim3, void** args, size_t smem, cudaStream_t) {
  const dim3 block(emu_threads);
  emu_detail::check_config(grid, block, smem, size_t(emu_smem_optin));
  const unsigned blocks = grid.x * grid.y * grid.z;
  if (blocks > unsigned(emu_sms)) {
    throw std::runtime_error("cooperative grid of " + std::to_string(blocks) + " blocks larger than the SM count " +
                             std::to_string(emu_sms));
  }
  std::barrier<> grid_bar(std::ptrdiff_t(blocks) * emu_threads);
  const P params = *static_cast<P*>(args[0]);
  emu_detail::run_blocks([&] { kernel(params); }, grid, block, smem, 0, blocks, &grid_bar);
  return cudaSuccess;
}

template <class P>
cudaError_t cudaLaunchKernel(void (*kernel)(P), dim3 grid, dim3, void** args, size_t smem, cudaStream_t) {
  const P params = *static_cast<P*>(args[0]);
  emu_detail::run_ordinary([&] { kernel(params); }, grid, dim3(emu_threads), smem);
  return cudaSuccess;
}

// SEQGEN_LAUNCH(kernel, grid, block, smem, stream, args...): kernel<<<grid, block, smem, stream>>>(args...).
template <class... P, class... A>
cudaError_t emu_chevron(void (*kernel)(P...), dim3 grid, dim3 block, size_t smem, cudaStream_t, const A&... args) {
  emu_detail::run_ordinary([&] { kernel(args...); }, grid, block, smem);
  return cudaSuccess;
}
