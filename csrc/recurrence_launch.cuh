// The host side of the persistent recurrence machinery (csrc/recurrence.cuh), shared by the recurrent
// kernel families: argument checks, a layer's plan for a dtype and product, the device facts and the
// residency check of the cooperative grid (the SMs an MPS client or a green context may use, the
// planned kernel's occupancy), the kernel instance a plan names, and the launches. Everything is
// templated over the cell policy; a family's .cu file (lstm.cu, gru.cu) keeps only its own argument
// lists -- which pointers it needs under which names, and where they go in SeqArgs / StepArgs.
//
// Errors: bad arguments throw std::invalid_argument naming the launcher (`what`) and the argument; a
// plan that does not fit on chip, a device without cooperative launches and a grid that cannot be
// resident throw std::runtime_error from the launchers, and are the `reason` of check_sequence.
#pragma once

#include <initializer_list>
#include <stdexcept>
#include <string>
#include <utility>

#include "common.cuh"
#include "recurrence.cuh"
#include "recurrence.h"

namespace seqgen {
namespace recurrence {

using SeqKernel = void (*)(const Params);
using StepKernel = void (*)(const StepParams);

// ---------------------------------------------------------------------------------------------
// Kernel instances of one cell
// ---------------------------------------------------------------------------------------------
template <class Cell, typename T, int MT, int NTW>
SeqKernel mma_instance(bool backward) {
  using Product = MmaProduct<T, MT, NTW>;
  if constexpr (MT == 1) {
    if (backward) return backward_kernel<Cell, Product>;
  }
  return forward_kernel<Cell, Product>;
}

// The instances a plan can ask for: forward mt x ntw <= 8 (fp32 accumulators per lane <= 32), backward
// mt = 1 (a block's units fit one m-tile).
template <class Cell, typename T>
SeqKernel mma_sequence_kernel(bool backward, int mt, int ntw) {
  switch (mt * 8 + ntw) {
    case 9: return mma_instance<Cell, T, 1, 1>(backward);
    case 10: return mma_instance<Cell, T, 1, 2>(backward);
    case 12: return mma_instance<Cell, T, 1, 4>(backward);
    default: break;
  }
  if (!backward) {
    switch (mt * 8 + ntw) {
      case 17: return mma_instance<Cell, T, 2, 1>(false);
      case 18: return mma_instance<Cell, T, 2, 2>(false);
      case 20: return mma_instance<Cell, T, 2, 4>(false);
      case 33: return mma_instance<Cell, T, 4, 1>(false);
      case 34: return mma_instance<Cell, T, 4, 2>(false);
      default: break;
    }
  }
  throw std::invalid_argument(std::string(Cell::kFamily) + ": no tensor-core kernel for a warp tile of " +
                              std::to_string(mt) + " x " + std::to_string(ntw) +
                              (backward ? " (backward)" : " (forward)"));
}

template <class Cell>
SeqKernel sequence_kernel(int dtype, const HostPlan& hp, bool backward) {
  if (hp.math == kMathFfma) {
    if (hp.bt == 4) return backward ? backward_kernel<Cell, FfmaProduct<4>> : forward_kernel<Cell, FfmaProduct<4>>;
    return backward ? backward_kernel<Cell, FfmaProduct<1>> : forward_kernel<Cell, FfmaProduct<1>>;
  }
  SeqKernel k = nullptr;
  dispatch_float_types(dtype, Cell::kFamily, [&](auto tag) {
    k = mma_sequence_kernel<Cell, decltype(tag)>(backward, hp.mt, hp.ntw);
  });
  return k;
}

template <class Cell, typename T, int MT>
StepKernel mma_step_instance(int ntw) {
  switch (ntw) {
    case 1: return step_kernel<Cell, T, MT, 1>;
    case 2: return step_kernel<Cell, T, MT, 2>;
    default: return step_kernel<Cell, T, MT, 4>;
  }
}

template <class Cell, typename T, int VEC>
StepKernel ffma_step_instance(int bt) {
  return bt == 4 ? step_kernel_ffma<Cell, T, VEC, 4> : step_kernel_ffma<Cell, T, VEC, 1>;
}

template <class Cell>
StepKernel step_kernel_for(int dtype, const HostStepPlan& hp, bool vec16) {
  StepKernel k = nullptr;
  dispatch_float_types(dtype, Cell::kFamily, [&](auto tag) {
    using T = decltype(tag);
    if (hp.math == kMathMma) {
      k = hp.mt == 1 ? mma_step_instance<Cell, T, 1>(hp.ntw) : mma_step_instance<Cell, T, 2>(hp.ntw);
    } else {
      k = vec16 ? ffma_step_instance<Cell, T, 16 / sizeof(T)>(hp.bt) : ffma_step_instance<Cell, T, 1>(hp.bt);
    }
  });
  return k;
}

// ---------------------------------------------------------------------------------------------
// Argument checks
// ---------------------------------------------------------------------------------------------
inline const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unsupported";
  }
}

inline int element_bytes(int dtype, const std::string& what) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16:
    case kBFloat16: return 2;
    default:
      throw std::invalid_argument(what + ": unsupported dtype code " + std::to_string(dtype) +
                                  " (expected 0 float32, 1 float16, 2 bfloat16)");
  }
}

inline void require_math(const std::string& what, int dtype, int math, bool half_ffma_ok) {
  if (math != kMathMma && math != kMathFfma) {
    throw std::invalid_argument(what + ": unsupported math code " + std::to_string(math) +
                                " (expected 0 tensor cores, 1 fp32 FFMA)");
  }
  if (math == kMathFfma && dtype != kFloat32 && !half_ffma_ok) {
    throw std::invalid_argument(what + ": the FFMA product is for float32 (" + dtype_name(dtype) +
                                " runs on tensor cores)");
  }
}

inline void require_size(const std::string& what, const char* name, int64_t v, int64_t lo) {
  if (v < lo || v > INT32_MAX) {
    throw std::invalid_argument(what + ": " + name + " must be in [" + std::to_string(lo) + ", 2^31) (got " +
                                std::to_string(v) + ")");
  }
}

using NamedPtr = std::pair<const char*, std::uintptr_t>;

// Every pointer of `ptrs` (the ones a launcher cannot do without) is non-null.
inline void require_ptrs(const char* what, std::initializer_list<NamedPtr> ptrs) {
  for (const auto& [name, p] : ptrs) {
    if (p == 0) throw std::invalid_argument(std::string(what) + ": " + name + " is a null pointer");
  }
}

// The codes and sizes of a launch: each size in [1, 2^31). The persistent kernels' FFMA product is for
// float32 only (half_ffma_ok false); the step's FFMA tiles take every dtype.
inline void require_codes_and_sizes(const char* what, int dtype, int math, bool half_ffma_ok,
                                    std::initializer_list<std::pair<const char*, int64_t>> sizes) {
  element_bytes(dtype, what);
  require_math(what, dtype, math, half_ffma_ok);
  for (const auto& [name, v] : sizes) require_size(what, name, v, 1);
}

// ---------------------------------------------------------------------------------------------
// Plans, device facts, residency
// ---------------------------------------------------------------------------------------------
inline SequencePlan public_plan(const HostPlan& hp) {
  SequencePlan s;
  s.reason = hp.reason;
  s.math = hp.math;
  s.groups = hp.p.groups, s.slices = hp.p.slices, s.units = hp.p.units, s.blocks = hp.blocks, s.threads = hp.threads;
  s.rows = hp.p.rows, s.cols = hp.p.cols, s.kparts = hp.p.kparts, s.ngroups = hp.p.ngroups;
  s.mt = hp.mt, s.ntw = hp.ntw, s.bt = hp.bt, s.smem_bytes = hp.p.smem_bytes;
  return s;
}

// plan() of recurrence.cuh for Cell, with the codes checked and the reason naming the kernel.
template <class Cell>
HostPlan host_plan(int dtype, int64_t hidden, int64_t batch, bool backward, int math, int sm_count,
                   int64_t smem_per_block) {
  const std::string what = std::string(Cell::kFamily) + "_sequence_plan";
  require_codes_and_sizes(what.c_str(), dtype, math, false,
                          {{"hidden", hidden}, {"batch", batch}, {"sm_count", sm_count}});
  HostPlan hp = plan(Cell::kGates, element_bytes(dtype, what), math, hidden, batch, backward, sm_count, smem_per_block);
  if (!hp.reason.empty()) {
    hp.reason = std::string("the persistent ") + Cell::kName + " " + (backward ? "backward" : "forward") +
                " kernel (" + dtype_name(dtype) + (math == kMathMma ? ", tensor cores" : ", fp32 FFMA") + ") at " +
                hp.reason;
  }
  return hp;
}

// What the launchers query of the device (cheap runtime calls; the Python side caches the outcome of
// check_sequence per device, stream and size).
struct DeviceFacts {
  int sms = 0;
  int64_t smem_optin = 0;
  bool cooperative = false;
};

inline DeviceFacts device_facts(int device) {
  DeviceFacts f;
  int v = 0;
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device));
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  f.smem_optin = v;
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrCooperativeLaunch, device));
  f.cooperative = v != 0;
  return f;
}

// Blocks of `kernel` (kSeqThreads threads, `smem` dynamic shared memory) one SM holds at once; sets the
// kernel's dynamic shared memory limit first (also what its launch needs).
inline int blocks_per_sm(SeqKernel kernel, int64_t smem) {
  SEQGEN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  SEQGEN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, kSeqThreads,
                                                                  static_cast<size_t>(smem)));
  return per_sm;
}

// The plan for the device's opt-in shared memory and the SMs a launch on `stream` may use, the kernel
// it runs, and the reason it cannot run there (the device has no cooperative launch, or the grid
// cannot all be resident), if any.
template <class Cell>
std::pair<HostPlan, SeqKernel> checked(int device, int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                                       std::uintptr_t stream) {
  DeviceGuard guard(device);
  const DeviceFacts facts = device_facts(device);
  const int sms = available_sms(device, as_stream(stream));
  HostPlan hp = host_plan<Cell>(dtype, hidden, batch, backward, math, sms, facts.smem_optin);
  if (!hp.reason.empty()) return {hp, nullptr};
  if (!facts.cooperative) {
    hp.reason = "device " + std::to_string(device) + " does not support cooperative launches";
    return {hp, nullptr};
  }
  const SeqKernel kernel = sequence_kernel<Cell>(dtype, hp, backward);
  const int per_sm = blocks_per_sm(kernel, hp.p.smem_bytes);
  if (static_cast<int64_t>(per_sm) * sms < hp.blocks) {
    hp.reason = std::string("the persistent ") + Cell::kName + " kernel's cooperative grid of " +
                std::to_string(hp.blocks) + " blocks of " + std::to_string(hp.threads) + " threads and " +
                std::to_string(hp.p.smem_bytes) + " bytes of shared memory cannot all be resident: " +
                std::to_string(per_sm) + " per SM x " + std::to_string(sms) +
                " SMs available to this context and stream" +
                (sms < facts.sms ? " (of the device's " + std::to_string(facts.sms) +
                                       ": an MPS client limit or a green context)"
                                 : std::string());
  }
  return {hp, kernel};
}

// A family's plan_sequence (pure host computation) and check_sequence (what a launch meets).
template <class Cell>
SequencePlan plan_sequence(int dtype, int64_t hidden, int64_t batch, bool backward, int math, int sm_count,
                           int64_t smem_per_block) {
  return public_plan(host_plan<Cell>(dtype, hidden, batch, backward, math, sm_count, smem_per_block));
}

template <class Cell>
SequencePlan check_sequence(int device, int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                            std::uintptr_t stream) {
  return public_plan(checked<Cell>(device, dtype, hidden, batch, backward, math, stream).first);
}

// ---------------------------------------------------------------------------------------------
// Launches
// ---------------------------------------------------------------------------------------------
// One persistent layer (sizes and pointers checked by the family): the
// cooperative launch of the checked plan with `flags` (flag_count zeroed words) as the handoff flags.
// The product reads X rows with 32-bit pair loads when every row is 4-byte aligned at even k: forward
// X = h0, hs (rows of H), backward X = d_rec (rows of kGates*H).
template <class Cell>
void launch_sequence(const char* what, int device, int dtype, int math, int64_t seq_len, int64_t batch,
                     int64_t hidden, bool backward, SeqArgs args, std::uintptr_t flags, int64_t flag_count,
                     std::uintptr_t stream) {
  const auto [hp, kernel] = checked<Cell>(device, dtype, hidden, batch, backward, math, stream);
  if (!hp.reason.empty()) throw std::runtime_error(std::string(what) + ": " + hp.reason);
  if (flag_count < hp.blocks) {
    throw std::invalid_argument(std::string(what) + ": flags holds " + std::to_string(flag_count) + " words; the " +
                                std::to_string(hp.blocks) + " blocks need one each");
  }
  args.flags = as_ptr<unsigned>(flags);
  const auto aligned = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p) % 4 == 0; };
  const int vec = backward ? (Cell::kGates * hidden) % 2 == 0 && aligned(args.d_rec)
                           : hidden % 2 == 0 && aligned(args.h0) && aligned(args.hs);
  Params prm{args, hp.p, static_cast<int>(seq_len), static_cast<int>(batch), static_cast<int>(hidden), vec};
  void* kargs[] = {&prm};
  DeviceGuard guard(device);
  SEQGEN_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(hp.blocks), dim3(hp.threads), kargs,
                                                static_cast<size_t>(hp.p.smem_bytes), as_stream(stream)));
}

// One generation step (sizes and pointers checked by the family) in one ordinary
// launch: tensor cores from a batch of one n-tile up (below, the FFMA tiles waste less than a padded
// tile); 16-byte weight loads in the FFMA tiles when every row of x, h, W_ih and W_hh is 16-byte aligned.
template <class Cell>
void launch_step(const char* what, int device, int dtype, int math, int64_t batch, int64_t input_size, int64_t hidden,
                 const StepArgs& a, std::uintptr_t stream) {
  const int elem = element_bytes(dtype, what);
  DeviceGuard guard(device);
  const int sms = device_facts(device).sms;
  const int step_math = math == kMathMma && batch >= 8 ? kMathMma : kMathFfma;
  const HostStepPlan hp = plan_step(Cell::kGates, step_math, hidden, batch, sms);
  if (!hp.reason.empty()) throw std::invalid_argument(std::string(what) + ": " + hp.reason);
  const auto addr = [](const void* p) { return reinterpret_cast<std::uintptr_t>(p); };
  const std::uintptr_t x = addr(a.x), h = addr(a.h), w_ih = addr(a.w_ih), w_hh = addr(a.w_hh);
  const int vec = 16 / elem;
  const bool vec16 = input_size % vec == 0 && hidden % vec == 0 && ((x | h | w_ih | w_hh) % 16) == 0;
  StepParams prm{a, hp.p, static_cast<int>(batch), static_cast<int>(input_size), static_cast<int>(hidden),
                 input_size % 2 == 0 && (x | w_ih) % 4 == 0, hidden % 2 == 0 && (h | w_hh) % 4 == 0};
  void* args[] = {&prm};
  SEQGEN_CUDA_CHECK(cudaLaunchKernel(step_kernel_for<Cell>(dtype, hp, vec16), dim3(hp.blocks), dim3(kCellThreads),
                                     args, static_cast<size_t>(hp.p.smem_bytes), as_stream(stream)));
}

}  // namespace recurrence
}  // namespace seqgen
