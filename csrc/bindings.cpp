// The one PYBIND11_MODULE of seqgen_fast._C. Each kernel family registers its functions through
// SEQGEN_BINDINGS (registry.h) in its own <family>_bind.cpp; this file only collects them and
// exposes device facts that the launch heuristics use.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cuda_runtime.h>

#include <string>
#include <utility>
#include <vector>

#include "common.cuh"
#include "registry.h"

namespace py = pybind11;

namespace seqgen {

static std::vector<std::pair<std::string, BindFn>>& registry() {
  static std::vector<std::pair<std::string, BindFn>> fns;  // built before main, in any TU order
  return fns;
}

int register_binding(const char* name, BindFn fn) {
  registry().emplace_back(name, fn);
  return static_cast<int>(registry().size());
}

static py::dict device_info(int device) {
  int count = 0;
  SEQGEN_CUDA_CHECK(cudaGetDeviceCount(&count));
  if (device < 0 || device >= count) {
    throw py::index_error("device_info: device " + std::to_string(device) + " out of range; " +
                          std::to_string(count) + " CUDA device(s) visible");
  }
  cudaDeviceProp p{};
  SEQGEN_CUDA_CHECK(cudaGetDeviceProperties(&p, device));
  py::dict d;
  d["name"] = std::string(p.name);
  d["major"] = p.major;
  d["minor"] = p.minor;
  d["multiprocessor_count"] = p.multiProcessorCount;
  d["shared_memory_per_block"] = static_cast<size_t>(p.sharedMemPerBlock);
  d["shared_memory_per_block_optin"] = static_cast<size_t>(p.sharedMemPerBlockOptin);
  d["shared_memory_per_multiprocessor"] = static_cast<size_t>(p.sharedMemPerMultiprocessor);
  d["registers_per_multiprocessor"] = p.regsPerMultiprocessor;
  d["max_threads_per_multiprocessor"] = p.maxThreadsPerMultiProcessor;
  d["l2_cache_size"] = p.l2CacheSize;
  d["total_global_memory"] = static_cast<size_t>(p.totalGlobalMem);
  int coop = 0;
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&coop, cudaDevAttrCooperativeLaunch, device));
  d["cooperative_launch"] = coop != 0;
  return d;
}

static int device_count() {
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err == cudaErrorNoDevice || err == cudaErrorInsufficientDriver) {
    cudaGetLastError();  // clear the sticky-free error so later calls start clean
    return 0;
  }
  SEQGEN_CUDA_CHECK(err);
  return count;
}

}  // namespace seqgen

PYBIND11_MODULE(_C, m) {
  m.doc() = "seqgen_fast CUDA kernels (torch-ABI-free: pointers, sizes, strides and streams as integers)";
  m.def("device_count", &seqgen::device_count, "Number of visible CUDA devices (0 without a driver).");
  m.def("device_info", &seqgen::device_info, py::arg("device"),
        "cudaGetDeviceProperties of `device` as a dict: name, compute capability (major, minor), "
        "multiprocessor count, shared memory per block (default and opt-in) and per SM, L2 size.");
  m.attr("cuda_runtime_version") = CUDART_VERSION;
  py::list families;
  for (auto& [name, fn] : seqgen::registry()) {
    fn(m);
    families.append(name);
  }
  m.attr("families") = families;
}
