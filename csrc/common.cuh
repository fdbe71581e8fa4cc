// Shared helpers for the CUDA kernels of seqgen_fast.
//
// The extension is torch-ABI-free: launchers receive raw device pointers, sizes, strides and the
// CUDA stream as integers, so nothing here includes a libtorch header. CUDA errors are thrown as
// std::runtime_error carrying cudaGetErrorString; pybind11 turns them into Python RuntimeError.
//
// This header is also the seam through which the tests' host emulation (tests/support/emulation/)
// compiles the kernels. Kernel files take every CUDA header from here and write the two constructs
// that differ between the device and the emulation with these macros:
//
//   SEQGEN_DYNAMIC_SMEM()
//       The running block's dynamic shared memory, 16-byte aligned, as unsigned char*.
//   SEQGEN_LAUNCH(kernel, grid, block, smem, stream, args...)
//       An ordinary (non-cooperative) launch: kernel<<<grid, block, smem, stream>>>(args...).
//       `kernel` must be one preprocessor token: name a template instance through a local variable,
//       e.g. `const auto kernel = step_kernel<T, NT, true>; SEQGEN_LAUNCH(kernel, grid, 256, 0, s, p);`
//
// With SEQGEN_HOST_EMULATION defined, seqgen_emulation.h stands in for <cuda_runtime.h>,
// <cuda_fp16.h>, <cuda_bf16.h> and <cooperative_groups.h> (runtime API calls such as
// cudaLaunchCooperativeKernel and cudaLaunchKernel included), and the macros expand to its
// emu_smem_ptr and emu_chevron(...).
//
// The same seam carries the PTX-level primitives that inline assembly would hide from a host
// compiler (bottom of this file): warp-wide tensor-core products (mma_m16n8k16, mma_m16n8k8_tf32),
// ldmatrix, the tf32 rounding, and the release/acquire flag operations of inter-block handoffs
// (flag_release, flag_acquire, wait_flag_at_least). On the device they are one PTX instruction
// each; under the emulation they are warp-collective host functions with the fragment layouts of
// the PTX ISA and std::atomic release/acquire operations.
#pragma once

#ifdef SEQGEN_HOST_EMULATION
#include "seqgen_emulation.h"
#define SEQGEN_DYNAMIC_SMEM() (emu_smem_ptr)
#define SEQGEN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu_chevron(kernel, grid, block, smem, stream, __VA_ARGS__)
#else
#include <cooperative_groups.h>
#include <cuda.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SEQGEN_DYNAMIC_SMEM() (::seqgen::dynamic_smem())
#define SEQGEN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>

namespace seqgen {

// Storage dtype codes shared with seqgen_fast/_contract.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

inline void cuda_check(cudaError_t err, const char* what, const char* file, int line) {
  if (err != cudaSuccess) {
    throw std::runtime_error(std::string("CUDA error in ") + what + " (" + file + ":" +
                             std::to_string(line) + "): " + cudaGetErrorName(err) + ": " +
                             cudaGetErrorString(err));
  }
}

#define SEQGEN_CUDA_CHECK(expr) ::seqgen::cuda_check((expr), #expr, __FILE__, __LINE__)
// After a kernel launch: configuration errors surface at once, without a device sync.
#define SEQGEN_CHECK_LAUNCH(name) ::seqgen::cuda_check(cudaGetLastError(), name, __FILE__, __LINE__)

// Makes `device` current for the scope, restoring the previous device after.
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    SEQGEN_CUDA_CHECK(cudaGetDevice(&prev_));
    if (prev_ != device) SEQGEN_CUDA_CHECK(cudaSetDevice(device));
  }
  ~DeviceGuard() { cudaSetDevice(prev_); }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int prev_ = 0;
};

#ifndef SEQGEN_HOST_EMULATION
// What SEQGEN_DYNAMIC_SMEM() reads on the device: the launch's dynamic shared memory.
__device__ __forceinline__ unsigned char* dynamic_smem() {
  extern __shared__ __align__(16) unsigned char dynamic_smem_bytes[];
  return dynamic_smem_bytes;
}
#endif

// SMs that kernels launched on `stream` of `device` may occupy: the device's count, lowered by the
// SM limit of an MPS client's context (its execution affinity) and by the green context `stream`
// belongs to. What a cooperative grid must fit in besides the per-SM occupancy.
inline int available_sms(int device, cudaStream_t stream) {
#ifdef SEQGEN_HOST_EMULATION
  (void)device, (void)stream;
  return emu_available_sms();
#else
  int sms = 0;
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  auto entry = [](const char* name) -> void* {  // a driver API function, or null where the driver has none
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
#if CUDART_VERSION >= 12050
    const cudaError_t err = cudaGetDriverEntryPointByVersion(name, &fn, 12000, cudaEnableDefault, &found);
#else
    const cudaError_t err = cudaGetDriverEntryPoint(name, &fn, cudaEnableDefault, &found);
#endif
    if (err != cudaSuccess || found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      return nullptr;
    }
    return fn;
  };
  using ExecAffinityFn = CUresult (*)(CUexecAffinityParam*, CUexecAffinityType);
  static const auto exec_affinity = reinterpret_cast<ExecAffinityFn>(entry("cuCtxGetExecAffinity"));
  CUexecAffinityParam affinity{};
  if (exec_affinity != nullptr && exec_affinity(&affinity, CU_EXEC_AFFINITY_TYPE_SM_COUNT) == CUDA_SUCCESS &&
      affinity.param.smCount.val > 0) {
    sms = std::min(sms, static_cast<int>(affinity.param.smCount.val));
  }
#if CUDA_VERSION >= 12040
  using StreamGreenFn = CUresult (*)(CUstream, CUgreenCtx*);
  using GreenResourceFn = CUresult (*)(CUgreenCtx, CUdevResource*, CUdevResourceType);
  static const auto stream_green = reinterpret_cast<StreamGreenFn>(entry("cuStreamGetGreenCtx"));
  static const auto green_resource = reinterpret_cast<GreenResourceFn>(entry("cuGreenCtxGetDevResource"));
  CUgreenCtx green = nullptr;
  CUdevResource resource{};
  if (stream_green != nullptr && green_resource != nullptr &&
      stream_green(reinterpret_cast<CUstream>(stream), &green) == CUDA_SUCCESS && green != nullptr &&
      green_resource(green, &resource, CU_DEV_RESOURCE_TYPE_SM) == CUDA_SUCCESS && resource.sm.smCount > 0) {
    sms = std::min(sms, static_cast<int>(resource.sm.smCount));
  }
#endif
  return sms;
#endif
}

template <typename T>
inline T* as_ptr(std::uintptr_t p) { return reinterpret_cast<T*>(p); }
inline cudaStream_t as_stream(std::uintptr_t s) { return reinterpret_cast<cudaStream_t>(s); }

// fp32 conversions used by every kernel: math is done in float, storage may be half/bf16.
__device__ __forceinline__ float to_float(float x) { return x; }
__device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_float(float x);
template <> __device__ __forceinline__ float from_float<float>(float x) { return x; }
template <> __device__ __forceinline__ __half from_float<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Calls f.template operator()<T>() with T the storage type of dtype code `dtype`.
template <typename F>
inline void dispatch_float_types(int dtype, const char* what, F&& f) {
  switch (dtype) {
    case kFloat32: f(float{}); break;
    case kFloat16: f(__half{}); break;
    case kBFloat16: f(__nv_bfloat16{}); break;
    default: throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(dtype));
  }
}


// ---- PTX-level primitives (the second half of the seam) -------------------------------------------
// Device code only: compiled by nvcc or under the emulation, skipped by host-only translation units
// (bindings.cpp includes this header for cuda_check and device facts).
#if defined(__CUDACC__) || defined(SEQGEN_HOST_EMULATION)
// Fragment layouts, PTX ISA "Matrix Fragments for mma.m16n8k16 / mma.m16n8k8" (g = lane / 4,
// q = lane % 4; each .b32 register of a 16-bit type holds two elements, the lower k in the low half):
//   m16n8k16 f16/bf16  A (16x16, row-major): a0 (g, 2q..2q+1)  a1 (g+8, 2q..)  a2 (g, 2q+8..)  a3 (g+8, 2q+8..)
//                      B (16x8, k x n):      b0 (k 2q..2q+1, n g)   b1 (k 2q+8.., n g)
//   m16n8k8 tf32       A (16x8):  a0 (g, q)  a1 (g+8, q)  a2 (g, q+4)  a3 (g+8, q+4)
//                      B (8x8):   b0 (k q, n g)   b1 (k q+4, n g)
//   C/D (16x8 fp32, both shapes): c0 (g, 2q)  c1 (g, 2q+1)  c2 (g+8, 2q)  c3 (g+8, 2q+1)
// ldmatrix.m8n8.x4.b16: lanes 8i..8i+7 give the 16-byte rows 0..7 of matrix i; register i of lane l
// receives the two 16-bit elements (row l / 4, columns 2 (l % 4), +1) of matrix i (.x2: matrices 0-1).
struct MmaF16 {};   // mma operand type tags
struct MmaBF16 {};

// d += a b (fp32 accumulators) on the warp's tensor cores; every lane of the warp must call it.
// SEQGEN_MMA_SYNC(shape and types, d, a, b): one mma.sync.aligned with d as both C and D.
#define SEQGEN_MMA_SYNC(shape_types, d, a, b)                                                              \
  asm volatile("mma.sync.aligned." shape_types " {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n" \
               : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])                                            \
               : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]))
__device__ __forceinline__ void mma_m16n8k16(MmaF16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef SEQGEN_HOST_EMULATION
  emu_mma_m16n8k16(false, d, a, b);
#else
  SEQGEN_MMA_SYNC("m16n8k16.row.col.f32.f16.f16.f32", d, a, b);
#endif
}
__device__ __forceinline__ void mma_m16n8k16(MmaBF16, float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef SEQGEN_HOST_EMULATION
  emu_mma_m16n8k16(true, d, a, b);
#else
  SEQGEN_MMA_SYNC("m16n8k16.row.col.f32.bf16.bf16.f32", d, a, b);
#endif
}
// Operands are tf32 bit patterns (to_tf32); the hardware ignores their 13 low mantissa bits.
__device__ __forceinline__ void mma_m16n8k8_tf32(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#ifdef SEQGEN_HOST_EMULATION
  emu_mma_m16n8k8_tf32(d, a, b);
#else
  SEQGEN_MMA_SYNC("m16n8k8.row.col.f32.tf32.tf32.f32", d, a, b);
#endif
}

// fp32 -> tf32 (round to nearest, ties away: cvt.rna), as a .b32 operand of mma_m16n8k8_tf32.
__device__ __forceinline__ uint32_t to_tf32(float x) {
#ifdef SEQGEN_HOST_EMULATION
  return emu_to_tf32(x);
#else
  uint32_t r;
  asm("cvt.rna.tf32.f32 %0, %1;\n" : "=r"(r) : "f"(x));
  return r;
#endif
}

// Four 8x8 b16 matrices from shared memory (row addresses from lanes 8i..8i+7, 16-byte aligned).
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
#ifdef SEQGEN_HOST_EMULATION
  emu_ldmatrix(r, 4, row);
#else
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
#endif
}

// Inter-block handoff flags (32-bit counters in global memory), GPU scope. flag_release orders every
// write this thread has made, or has observed through a barrier, before the store of `value`;
// flag_acquire orders the loads after it after the writes released by the store it reads.
__device__ __forceinline__ void flag_release(unsigned* flag, unsigned value) {
#ifdef SEQGEN_HOST_EMULATION
  emu_flag_release(flag, value);
#else
  asm volatile("st.release.gpu.global.u32 [%0], %1;\n" ::"l"(flag), "r"(value) : "memory");
#endif
}
__device__ __forceinline__ unsigned flag_acquire(const unsigned* flag) {
#ifdef SEQGEN_HOST_EMULATION
  return emu_flag_acquire(flag);
#else
  unsigned v;
  asm volatile("ld.acquire.gpu.global.u32 %0, [%1];\n" : "=r"(v) : "l"(flag) : "memory");
  return v;
#endif
}
// Spins (with a short sleep between polls) until *flag >= target, then returns with acquire order.
__device__ __forceinline__ void wait_flag_at_least(const unsigned* flag, unsigned target) {
#ifdef SEQGEN_HOST_EMULATION
  emu_wait_flag(flag, target);
#else
  while (flag_acquire(flag) < target) __nanosleep(20);
#endif
}
#endif  // defined(__CUDACC__) || defined(SEQGEN_HOST_EMULATION)

}  // namespace seqgen
