"""A host SIMT emulation of CUDA kernels, shared by the tests (no GPU needed).

g++ compiles a csrc/*.cu file against the stand-in CUDA headers below: every CUDA thread is a host
thread; __syncthreads, grid.sync and each warp shuffle are std::barrier waits. Shared memory is
filled with NaN bytes before launch and checked for writes past the planned size afterwards; a
cooperative grid larger than the (emulated) SM count fails like a cooperative launch would.
Kernels launched with ``<<<...>>>`` are first rewritten by :func:`rewrite_launches` into
``emu_chevron(...)`` calls (3-D grids, the launch's block size, blocks run one after another).
This checks indexing, tiling, vector/scalar paths, staging and barriers; it cannot check L1/L2
coherence, memory-model races or timing.

A test writes :data:`HEADERS` plus its own ``emu_main.cpp`` (``#include "cuda_runtime.h"``, its
launcher header, :data:`EMU_MAIN_DEFS`, then ``extern "C"`` shims wrapped in ``EMU_CALL``) and
calls :func:`build` to get a ``ctypes.CDLL`` (or a pytest skip when g++ is missing).
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import pytest

CSRC = os.path.join(os.path.dirname(__file__), "..", "csrc")

RUNTIME = r"""
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <thread>
#include <vector>
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
struct dim3 { unsigned x, y, z; dim3(unsigned a = 1, unsigned b = 1, unsigned c = 1) : x(a), y(b), z(c) {} };
struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned a, unsigned b, unsigned c, unsigned d) { return {a, b, c, d}; }
typedef int cudaError_t;
constexpr int cudaSuccess = 0;
typedef void* cudaStream_t;
enum cudaDeviceAttr { cudaDevAttrMultiProcessorCount, cudaDevAttrMaxSharedMemoryPerBlockOptin, cudaDevAttrCooperativeLaunch };
enum cudaFuncAttribute { cudaFuncAttributeMaxDynamicSharedMemorySize };
inline const char* cudaGetErrorName(cudaError_t) { return "emulated"; }
inline const char* cudaGetErrorString(cudaError_t) { return "emulated"; }
inline cudaError_t cudaGetLastError() { return 0; }
inline cudaError_t cudaGetDevice(int* d) { *d = 0; return 0; }
inline cudaError_t cudaSetDevice(int) { return 0; }
extern int emu_sms, emu_smem_optin, emu_threads;
inline cudaError_t cudaDeviceGetAttribute(int* v, cudaDeviceAttr a, int) {
  *v = a == cudaDevAttrMultiProcessorCount ? emu_sms : a == cudaDevAttrMaxSharedMemoryPerBlockOptin ? emu_smem_optin : 1;
  return 0;
}
template <class F> cudaError_t cudaFuncSetAttribute(F, cudaFuncAttribute, int) { return 0; }
template <class F> cudaError_t cudaOccupancyMaxActiveBlocksPerMultiprocessor(int* n, F, int, size_t) { *n = 1; return 0; }
extern thread_local dim3 threadIdx, blockIdx, blockDim;
extern thread_local unsigned char* emu_smem_ptr;
extern thread_local std::barrier<>* emu_block_bar;
extern thread_local std::barrier<>* emu_warp_bar;
extern thread_local std::barrier<>* emu_grid_bar;
extern thread_local float* emu_warp_buf;
inline void __syncthreads() { emu_block_bar->arrive_and_wait(); }
inline float __shfl_xor_sync(unsigned, float v, int off) {
  const int lane = threadIdx.x % 32;
  emu_warp_buf[lane] = v;
  emu_warp_bar->arrive_and_wait();
  const float r = emu_warp_buf[lane ^ off];
  emu_warp_bar->arrive_and_wait();
  return r;
}
inline float __ldcg(const float* p) { return *p; }
inline unsigned short __ldcg(const unsigned short* p) { return *p; }
inline uint4 __ldcg(const uint4* p) { return *p; }
inline float __expf(float x) { return std::exp(x); }
using std::min;
template <class P>
cudaError_t emu_launch(void (*kernel)(P), unsigned blocks, size_t smem, P prm, bool cooperative) {
  if (cooperative && blocks > unsigned(emu_sms)) throw std::runtime_error("cooperative grid larger than the SM count");
  if (smem > size_t(cooperative ? emu_smem_optin : 48 * 1024)) throw std::runtime_error("shared memory over the limit");
  const int threads = emu_threads, warps = int(blocks) * threads / 32;
  std::barrier<> grid(int(blocks) * threads);
  std::vector<std::unique_ptr<std::barrier<>>> bbar, wbar;
  std::vector<std::vector<unsigned char>> mem(blocks, std::vector<unsigned char>(smem + 64, 0xFF));
  std::vector<float> wbuf(size_t(warps) * 32);
  for (unsigned b = 0; b < blocks; ++b) bbar.emplace_back(new std::barrier<>(threads));
  for (int w = 0; w < warps; ++w) wbar.emplace_back(new std::barrier<>(32));
  std::vector<std::thread> ts;
  for (unsigned b = 0; b < blocks; ++b)
    for (int t = 0; t < threads; ++t)
      ts.emplace_back([&, b, t] {
        threadIdx = dim3(t); blockIdx = dim3(b); blockDim = dim3(threads);
        emu_smem_ptr = mem[b].data();
        emu_block_bar = bbar[b].get();
        emu_warp_bar = wbar[(b * threads + t) / 32].get();
        emu_warp_buf = wbuf.data() + (b * threads + t) / 32 * 32;
        emu_grid_bar = cooperative ? &grid : nullptr;
        kernel(prm);
      });
  for (auto& t : ts) t.join();
  for (auto& m : mem)
    for (size_t i = smem; i < m.size(); ++i)
      if (m[i] != 0xFF) throw std::runtime_error("a kernel wrote past its planned shared memory");
  return 0;
}
template <class P>
cudaError_t cudaLaunchCooperativeKernel(void (*k)(P), dim3 g, dim3, void** args, size_t smem, cudaStream_t) {
  return emu_launch(k, g.x, smem, *static_cast<P*>(args[0]), true);
}
template <class P>
cudaError_t cudaLaunchKernel(void (*k)(P), dim3 g, dim3, void** args, size_t smem, cudaStream_t) {
  return emu_launch(k, g.x, smem, *static_cast<P*>(args[0]), false);
}
// --- additions for kernels launched with <<<grid, block, smem, stream>>> (see rewrite_launches) ---
struct float4 { float x, y, z, w; };
inline float4 make_float4(float a, float b, float c, float d) { return {a, b, c, d}; }
inline unsigned __umulhi(unsigned a, unsigned b) { return unsigned((unsigned long long)a * b >> 32); }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline float __ldg(const float* p) { return *p; }
inline uint4 __ldg(const uint4* p) { return *p; }
inline float4 __ldg(const float4* p) { return *p; }
// Non-cooperative launch with a 3-D grid and the block size of the launch: blocks run one after the
// other (CUDA promises no order or concurrency between them); the threads of a block run together.
template <class... P, class... A>
cudaError_t emu_chevron(void (*kernel)(P...), dim3 g, dim3 blk, size_t smem, cudaStream_t, A&&... args) {
  if (smem > size_t(48 * 1024)) throw std::runtime_error("shared memory over the limit");
  const int threads = int(blk.x * blk.y * blk.z);
  if (threads <= 0 || threads > 1024) throw std::runtime_error("block size outside 1..1024");
  if (g.y > 65535 || g.z > 65535) throw std::runtime_error("grid.y/z over 65535");
  const int warps = (threads + 31) / 32;
  for (unsigned bz = 0; bz < g.z; ++bz)
    for (unsigned by = 0; by < g.y; ++by)
      for (unsigned bx = 0; bx < g.x; ++bx) {
        std::barrier<> bbar(threads);
        std::vector<std::unique_ptr<std::barrier<>>> wbar;
        for (int w = 0; w < warps; ++w) wbar.emplace_back(new std::barrier<>(std::min(32, threads - 32 * w)));
        std::vector<unsigned char> mem(smem + 64, 0xFF);
        std::vector<float> wbuf(size_t(warps) * 32);
        std::vector<std::thread> ts;
        for (int t = 0; t < threads; ++t)
          ts.emplace_back([&, t] {
            threadIdx = dim3(t % blk.x, t / blk.x % blk.y, t / (blk.x * blk.y));
            blockIdx = dim3(bx, by, bz);
            blockDim = blk;
            emu_smem_ptr = mem.data();
            emu_block_bar = &bbar;
            emu_warp_bar = wbar[t / 32].get();
            emu_warp_buf = wbuf.data() + t / 32 * 32;
            emu_grid_bar = nullptr;
            kernel(args...);
          });
        for (auto& t : ts) t.join();
        for (size_t i = smem; i < mem.size(); ++i)
          if (mem[i] != 0xFF) throw std::runtime_error("a kernel wrote past its planned shared memory");
      }
  return 0;
}
"""

HEADERS = {
    "cuda_runtime.h": RUNTIME,
    "cooperative_groups.h": """#pragma once
#include "cuda_runtime.h"
namespace cooperative_groups {
struct grid_group {
  void sync() { if (!emu_grid_bar) throw std::runtime_error("grid.sync outside a cooperative launch"); emu_grid_bar->arrive_and_wait(); }
};
inline grid_group this_grid() { return {}; }
}
""",
    "cuda_fp16.h": """#pragma once
#include "cuda_runtime.h"
struct __half { _Float16 v; };
inline float __half2float(__half h) { return float(h.v); }
inline __half __float2half_rn(float f) { return {_Float16(f)}; }
inline __half __ushort_as_half(unsigned short u) { __half h; std::memcpy(&h, &u, 2); return h; }
""",
    "cuda_bf16.h": """#pragma once
#include "cuda_runtime.h"
struct __nv_bfloat16 { unsigned short x; };
inline float __bfloat162float(__nv_bfloat16 h) { unsigned u = unsigned(h.x) << 16; float f; std::memcpy(&f, &u, 4); return f; }
inline __nv_bfloat16 __float2bfloat16_rn(float f) {
  unsigned u; std::memcpy(&u, &f, 4); u += 0x7FFF + ((u >> 16) & 1); return {(unsigned short)(u >> 16)};
}
inline __nv_bfloat16 __ushort_as_bfloat16(unsigned short u) { return {u}; }
""",
}

# Definitions every emulated library needs once (in its emu_main.cpp, after the includes).
EMU_MAIN_DEFS = r"""int emu_sms = 1, emu_smem_optin = 0, emu_threads = 32;
thread_local dim3 threadIdx, blockIdx, blockDim;
thread_local unsigned char* emu_smem_ptr;
thread_local std::barrier<>* emu_block_bar;
thread_local std::barrier<>* emu_warp_bar;
thread_local std::barrier<>* emu_grid_bar;
thread_local float* emu_warp_buf;
static char emu_error[1024];
extern "C" const char* emu_error_message() { return emu_error; }
extern "C" void emu_config(int sms, int smem, int threads) { emu_sms = sms; emu_smem_optin = smem; emu_threads = threads; }
#define EMU_CALL(body) try { body; return 0; } catch (std::exception& e) { std::snprintf(emu_error, sizeof emu_error, "%s", e.what()); return 1; }
using u = std::uintptr_t;
"""

_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;()]*>)?)\s*<<<(.*?)>>>\s*\(")


def rewrite_launches(src: str) -> str:
    """``k<<<g, b[, smem[, stream]]>>>(args)`` -> ``emu_chevron(k, g, b, smem, stream, args)``."""
    def sub(mo):
        cfg = [a.strip() for a in mo.group(2).split(",")]
        cfg += ["0", "nullptr"][len(cfg) - 2:]
        return f"emu_chevron({mo.group(1)}, {', '.join(cfg)}, "
    return _LAUNCH.sub(sub, src)


def compiler() -> str:
    """The g++ to build with, or a pytest skip."""
    cxx = shutil.which("g++")
    if cxx is None:
        pytest.skip("no g++ to build the host emulation of the CUDA kernels")
    return cxx


def build(d, sources: dict[str, str], name: str = "emu") -> ctypes.CDLL:
    """Writes HEADERS and ``sources`` (file name -> text) into directory ``d``, compiles the .cpp files
    into one shared library (``-I d -I csrc``) and loads it; emu_error_message/emu_config typed."""
    cxx = compiler()
    for fname, text in {**HEADERS, **sources}.items():
        with open(os.path.join(d, fname), "w") as f:
            f.write(text)
    lib = os.path.join(d, f"lib{name}.so")
    cpps = [os.path.join(d, f) for f in sources if f.endswith(".cpp")]
    res = subprocess.run([cxx, "-std=c++20", "-O1", "-fPIC", "-shared", f"-I{d}", f"-I{CSRC}", *cpps, "-o", lib,
                          "-lpthread"], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr[-4000:]
    h = ctypes.CDLL(lib)
    h.emu_error_message.restype = ctypes.c_char_p
    h.emu_config.argtypes = [ctypes.c_int] * 3
    return h
