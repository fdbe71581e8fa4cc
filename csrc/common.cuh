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
#pragma once

#ifdef SEQGEN_HOST_EMULATION
#include "seqgen_emulation.h"
#define SEQGEN_DYNAMIC_SMEM() (emu_smem_ptr)
#define SEQGEN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  emu_chevron(kernel, grid, block, smem, stream, __VA_ARGS__)
#else
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#define SEQGEN_DYNAMIC_SMEM() (::seqgen::dynamic_smem())
#define SEQGEN_LAUNCH(kernel, grid, block, smem, stream, ...) \
  kernel<<<(grid), (block), (smem), (stream)>>>(__VA_ARGS__)
#endif

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

}  // namespace seqgen
