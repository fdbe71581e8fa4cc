// Host SIMT emulation of the CUDA runtime, for running the kernels of csrc/ on the CPU in the tests.
//
// csrc/common.cuh includes this header in place of <cuda_runtime.h>, <cuda_fp16.h>, <cuda_bf16.h> and
// <cooperative_groups.h> when SEQGEN_HOST_EMULATION is defined, and its seam macros become
//   SEQGEN_DYNAMIC_SMEM()                     -> emu_smem_ptr
//   SEQGEN_LAUNCH(k, grid, block, smem, s, ...) -> emu_chevron(k, grid, block, smem, s, ...)
// so g++ compiles a csrc/*.cu file unchanged (tests/support/emulation.py builds it).
//
// Every CUDA thread is a host thread; __syncthreads, __syncwarp, grid.sync and each warp collective
// (shuffle, mma, ldmatrix) are std::barrier waits. A launch checks what a device would refuse or what a
// kernel must not do:
//   * block size 1..1024, grid.y and grid.z at most 65535, no empty grid;
//   * dynamic shared memory within 48 KiB (ordinary launch) or the opt-in limit (cooperative);
//   * a cooperative grid no larger than the SM count (one persistent block per SM), grid.sync only
//     inside a cooperative launch (else it aborts: the waiting threads cannot be unwound);
//   * shared memory starts as 0xFF bytes (NaN in fp32, fp16 and bf16: reads before writes show up in
//     the results) and the 64 bytes past the planned size must still be 0xFF afterwards;
//   * ldmatrix row addresses are 16-byte aligned and inside the block's shared memory.
//
// Warp collectives follow the PTX ISA: mma.m16n8k16 (f16, bf16) and mma.m16n8k8 (tf32) gather every
// lane's fragment registers, multiply in fp32 and hand each lane its accumulator fragment; ldmatrix
// hands lane l the elements (l / 4, 2 (l % 4), +1) of each 8x8 matrix whose rows lanes 8i..8i+7 named.
//
// Inter-block flags (flag_release / flag_acquire / wait_flag_at_least of common.cuh) are std::atomic
// release stores and acquire loads on real host threads, so ThreadSanitizer sees the same
// happens-before edges the CUDA memory model gives. A cooperative launch starts its blocks in an order
// drawn from emu_schedule(seed), and each flag release and wait yields or sleeps at random points drawn
// from the same seed: a kernel that reads another block's data before acquiring its flag reads the
// NaN-poisoned buffers of the tests on some schedules. A flag wait that lasts over 30 s aborts with the
// flag and the value it waited for (a deadlock in the kernel's protocol).
// emu_context_sms (default: emu_sms) is the SM count the launch's context may use (an MPS client
// limit, a green context): available_sms() of common.cuh reports it; emu_blocks_per_sm (default 1) is
// what the occupancy query answers. emu_residency() (seqgen_emulation.cpp) sets both.
// It cannot check L1/L2 coherence or timing.
//
// Launches through the runtime API (cudaLaunchCooperativeKernel, cudaLaunchKernel) run blocks of
// emu_threads threads, whatever block they ask for: the LSTM kernels take any multiple of 32, and
// 32-64 host threads per block keep the tests fast. SEQGEN_LAUNCH launches run the block they ask for.
// emu_config() (seqgen_emulation.cpp) sets emu_sms, emu_smem_optin and emu_threads.
#pragma once

#include <algorithm>
#include <atomic>
#include <barrier>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
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
inline int emu_context_sms = 0;   // SMs the context may use (0: emu_sms)
inline int emu_blocks_per_sm = 1; // cudaOccupancyMaxActiveBlocksPerMultiprocessor
inline unsigned emu_seed = 0;     // schedule of cooperative launches and flag operations (emu_schedule)
constexpr size_t kEmuSmemLimit = 48 * 1024;  // dynamic shared memory of an ordinary launch

inline thread_local dim3 threadIdx, blockIdx, blockDim;
inline thread_local unsigned char* emu_smem_ptr;   // the block's dynamic shared memory
inline thread_local int emu_lane;                  // linear thread index % 32
inline thread_local std::barrier<>* emu_block_bar; // __syncthreads
inline thread_local std::barrier<>* emu_warp_bar;  // one per warp: __syncwarp and warp collectives
inline thread_local unsigned char* emu_warp_buf;   // kEmuLaneBytes per lane of the warp: collective exchange
inline thread_local std::mt19937* emu_rng;         // this thread's draws of the schedule (cooperative launches)
constexpr size_t kEmuLaneBytes = 64;
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
  *blocks = emu_blocks_per_sm;
  return cudaSuccess;
}

// ---- device intrinsics -----------------------------------------------------------------------------
using std::min;
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline void __syncwarp(unsigned = 0xffffffffu) { emu_warp_bar->arrive_and_wait(); }

// A warp collective: every lane publishes `mine` in its slot, then `f(slot)` reads any lane's slot
// (slot(l) -> const P&) once all have published; no lane publishes again before every lane has read.
template <class P, class F>
inline auto emu_warp_collective(const P& mine, F&& f) {
  static_assert(sizeof(P) <= kEmuLaneBytes, "collective payload larger than a lane's exchange slot");
  std::memcpy(emu_warp_buf + emu_lane * kEmuLaneBytes, &mine, sizeof(P));
  emu_warp_bar->arrive_and_wait();
  auto slot = [](int l) -> const P& { return *reinterpret_cast<const P*>(emu_warp_buf + l * kEmuLaneBytes); };
  auto r = f(slot);
  emu_warp_bar->arrive_and_wait();
  return r;
}
inline float __shfl_xor_sync(unsigned, float v, int lane_mask) {
  return emu_warp_collective(v, [&](auto slot) { return slot(emu_lane ^ lane_mask); });
}
inline float __ldcg(const float* p) { return *p; }
inline unsigned short __ldcg(const unsigned short* p) { return *p; }
inline unsigned __ldcg(const unsigned* p) { return *p; }
inline uint4 __ldcg(const uint4* p) { return *p; }
// --use_fast_math's __expf: ex2.approx.ftz.f32 of the fp32 product x * log2(e), as nvcc emits it. The
// product's rounding and the flush of subnormal inputs and results (FTZ) are emulated bit-exactly; the
// ex2 itself is correctly rounded here, inside its documented bound (tests/test_fast_math_recurrent.py
// sweeps the kernels' activations at that bound).
using std::signbit;
inline float emu_ftz(float v) { return std::fpclassify(v) == FP_SUBNORMAL ? std::copysign(0.f, v) : v; }
inline float __expf(float x) {
  const float y = emu_ftz(emu_ftz(x) * 1.44269504088896341f);
  return emu_ftz(static_cast<float>(std::exp2(static_cast<double>(y))));
}
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((unsigned long long)a * b >> 32); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }

inline int emu_available_sms() { return emu_context_sms > 0 ? emu_context_sms : emu_sms; }

// ---- tensor-core and memory-model primitives of common.cuh's seam ----------------------------------
inline float emu_half_bits(uint32_t reg, int half, bool bf16) {
  const unsigned short u = static_cast<unsigned short>(half ? reg >> 16 : reg & 0xFFFFu);
  return bf16 ? __bfloat162float(__ushort_as_bfloat16(u)) : __half2float(__ushort_as_half(u));
}
inline float emu_tf32_value(uint32_t bits) {  // the tensor core ignores the 13 low mantissa bits
  return __int_as_float(static_cast<int>(bits & 0xFFFFE000u));
}
struct EmuFrag { uint32_t a[4], b[2]; };

// D (16x8) += A (16xK) B (Kx8), K = 16 (f16/bf16, two elements per register) or 8 (tf32); a(l, row, k)
// and b(l, k, n) name the lane and the element of each fragment per the layouts of common.cuh.
template <class ElemA, class ElemB>
inline void emu_mma(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2], int K, ElemA&& ea, ElemB&& eb) {
  EmuFrag mine;
  std::memcpy(mine.a, a, sizeof mine.a);
  std::memcpy(mine.b, b, sizeof mine.b);
  const int g = emu_lane / 4, q = emu_lane % 4;
  struct Out { float v[4]; };
  const Out out = emu_warp_collective(mine, [&](auto slot) {
    Out o;
    for (int i = 0; i < 4; ++i) {
      const int row = g + 8 * (i / 2), col = 2 * q + i % 2;
      float acc = d[i];
      for (int k = 0; k < K; ++k) acc += ea(slot, row, k) * eb(slot, k, col);
      o.v[i] = acc;
    }
    return o;
  });
  std::memcpy(d, out.v, sizeof out.v);
}
inline void emu_mma_m16n8k16(bool bf16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_mma(d, a, b, 16,
          [bf16](auto slot, int row, int k) {
            return emu_half_bits(slot(row % 8 * 4 + k % 8 / 2).a[row / 8 + 2 * (k / 8)], k % 2, bf16);
          },
          [bf16](auto slot, int k, int n) { return emu_half_bits(slot(n * 4 + k % 8 / 2).b[k / 8], k % 2, bf16); });
}
inline void emu_mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  emu_mma(d, a, b, 8,
          [](auto slot, int row, int k) { return emu_tf32_value(slot(row % 8 * 4 + k % 4).a[row / 8 + 2 * (k / 4)]); },
          [](auto slot, int k, int n) { return emu_tf32_value(slot(n * 4 + k % 4).b[k / 4]); });
}
inline uint32_t emu_to_tf32(float x) {  // cvt.rna.tf32.f32: round half away from zero at bit 13
  uint32_t u;
  std::memcpy(&u, &x, 4);
  if ((u & 0x7F800000u) != 0x7F800000u) u += 0x1000u;  // finite: add half an ulp of tf32 to the magnitude
  return u & 0xFFFFE000u;
}

inline thread_local const unsigned char* emu_smem_begin;  // the running block's shared memory
inline thread_local const unsigned char* emu_smem_end;

inline void emu_ldmatrix(uint32_t* r, int matrices, const void* row) {
  const auto* p = static_cast<const unsigned char*>(row);
  const int lanes = 8 * matrices;
  if (emu_lane < lanes && (reinterpret_cast<std::uintptr_t>(p) % 16 != 0 || p < emu_smem_begin ||
                           p + 16 > emu_smem_end)) {
    std::fprintf(stderr, "seqgen emulation: ldmatrix row address of lane %d is not a 16-byte aligned row of the "
                         "block's shared memory\n", emu_lane);
    std::abort();
  }
  struct Regs { uint32_t v[4]; };
  const Regs out = emu_warp_collective(p, [&](auto slot) {
    Regs o{};
    for (int i = 0; i < matrices; ++i) std::memcpy(&o.v[i], slot(8 * i + emu_lane / 4) + 4 * (emu_lane % 4), 4);
    return o;
  });
  std::memcpy(r, out.v, 4 * matrices);
}

// A short random pause on the schedule of cooperative launches: a yield, sometimes a sleep of up to 200 us.
inline void emu_jitter() {
  if (emu_rng == nullptr) return;
  const unsigned draw = (*emu_rng)() % 64;
  if (draw < 8) std::this_thread::sleep_for(std::chrono::microseconds(25 * draw));
  else if (draw < 32) std::this_thread::yield();
}
inline void emu_flag_release(unsigned* flag, unsigned value) {
  emu_jitter();
  std::atomic_ref<unsigned>(*flag).store(value, std::memory_order_release);
}
inline unsigned emu_flag_acquire(const unsigned* flag) {
  return std::atomic_ref<unsigned>(*const_cast<unsigned*>(flag)).load(std::memory_order_acquire);
}
inline void emu_wait_flag(const unsigned* flag, unsigned target) {
  const auto start = std::chrono::steady_clock::now();
  emu_jitter();
  while (emu_flag_acquire(flag) < target) {
    std::this_thread::yield();
    if (std::chrono::steady_clock::now() - start > std::chrono::seconds(30)) {
      std::fprintf(stderr, "seqgen emulation: block %u waited 30 s for flag %p to reach %u (it holds %u): the "
                           "kernel's handoff protocol deadlocked\n", blockIdx.x, static_cast<const void*>(flag),
                   target, emu_flag_acquire(flag));
      std::abort();
    }
  }
}

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
  std::vector<unsigned char> lanes;
  std::vector<unsigned char> smem;
  Block(int threads, size_t smem_bytes)
      : sync(threads), lanes(size_t(threads + 31) / 32 * 32 * kEmuLaneBytes), smem(smem_bytes + kGuardBytes, kPoison) {
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
// thread per CUDA thread, each calling body(); then checks every block's shared-memory guard. With
// `scheduled` (cooperative launches) the blocks start in an order drawn from emu_seed and each thread
// draws its pauses at flag operations from its own generator seeded from emu_seed.
template <class Body>
void run_blocks(const Body& body, dim3 grid, dim3 block, size_t smem, unsigned first, unsigned count,
                std::barrier<>* grid_bar, bool scheduled = false) {
  const int threads = int(block.x * block.y * block.z);
  std::vector<std::unique_ptr<Block>> blocks;
  for (unsigned i = 0; i < count; ++i) blocks.push_back(std::make_unique<Block>(threads, smem));
  std::vector<unsigned> order(count);
  for (unsigned i = 0; i < count; ++i) order[i] = i;
  if (scheduled) {
    std::mt19937 shuffle(emu_seed);
    std::shuffle(order.begin(), order.end(), shuffle);
  }
  std::vector<std::thread> workers;
  for (unsigned i : order) {
    for (int t = 0; t < threads; ++t) {
      workers.emplace_back([&, i, t] {
        Block& b = *blocks[i];
        std::mt19937 rng(emu_seed * 2654435761u + (first + i) * 1024u + unsigned(t));
        emu_rng = scheduled ? &rng : nullptr;
        const unsigned linear = first + i;
        threadIdx = dim3(t % block.x, t / block.x % block.y, t / (block.x * block.y));
        blockIdx = dim3(linear % grid.x, linear / grid.x % grid.y, linear / (grid.x * grid.y));
        blockDim = block;
        emu_smem_ptr = b.smem.data();
        emu_smem_begin = b.smem.data();
        emu_smem_end = b.smem.data() + smem;
        emu_lane = t % 32;
        emu_block_bar = &b.sync;
        emu_warp_bar = b.warps[t / 32].get();
        emu_warp_buf = b.lanes.data() + t / 32 * 32 * kEmuLaneBytes;
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
  if (blocks > unsigned(emu_available_sms())) {  // cudaErrorCooperativeLaunchTooLarge
    throw std::runtime_error("cooperative grid of " + std::to_string(blocks) + " blocks larger than the " +
                             std::to_string(emu_available_sms()) + " SMs the context may use");
  }
  std::barrier<> grid_bar(std::ptrdiff_t(blocks) * emu_threads);
  const P params = *static_cast<P*>(args[0]);
  emu_detail::run_blocks([&] { kernel(params); }, grid, block, smem, 0, blocks, &grid_bar, true);
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
