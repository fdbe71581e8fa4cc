// Shared helpers for the CUDA kernels of seqgen_fast.
//
// The extension is torch-ABI-free: launchers receive raw device pointers, sizes, strides and the
// CUDA stream as integers, so nothing here includes a libtorch header. CUDA errors are thrown as
// std::runtime_error carrying cudaGetErrorString; pybind11 turns them into Python RuntimeError.
#pragma once

#include <cuda_runtime.h>
#include <cuda_fp16.h>
#include <cuda_bf16.h>

#include <cstdint>
#include <stdexcept>
#include <string>

namespace seqgen {

// Dtype codes shared with seqgen_fast/_ext.py (DTYPE_CODES).
enum DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2, kFloat64 = 3 };

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
