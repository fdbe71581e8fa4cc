// What the recurrent kernel families (csrc/lstm.h, csrc/gru.h) share in their public launcher
// interface: the product codes and the split of the persistent kernels as the host sees it. Plain
// host C++ (no CUDA header): the bindings include it. The machinery itself is csrc/recurrence.cuh.
#pragma once

#include <cstdint>
#include <string>

namespace seqgen {
namespace recurrence {

// The recurrent product: tensor cores (fp16/bf16 mma.m16n8k16; fp32 operands rounded to tf32 for
// mma.m16n8k8, what cuDNN does under torch.backends.cudnn.allow_tf32), or the CUDA cores in exact
// fp32 (FFMA; float32 only in the persistent kernels).
enum Math : int { kMathMma = 0, kMathFfma = 1 };

// How a persistent kernel splits one layer over the GPU: groups x slices blocks of `threads`; block
// (g, s) owns `units` consecutive hidden units with all their gate rows (their slice of W_hh resident
// in shared memory for the whole sequence) for batch rows g*ceil(B/groups).. of its group, computed in
// passes of `cols` batch columns; `kparts` warps' k-ranges are summed per output. MMA kernels tile
// warps as `mt` m-tiles x `ntw` n-tiles (ngroups warp groups along the columns); FFMA kernels as 4
// rows x `bt` batch rows. `reason` is empty when the problem fits (and, from a family's
// check_sequence, when the grid can be resident).
struct SequencePlan {
  std::string reason;
  int math = 0;
  int groups = 0, slices = 0, units = 0, blocks = 0, threads = 0;
  int rows = 0, cols = 0, kparts = 0, ngroups = 0, mt = 0, ntw = 0, bt = 0;
  int64_t smem_bytes = 0;
};

// The signatures every family's plan_sequence / check_sequence have (the bindings take them).
using PlanFn = SequencePlan (*)(int dtype, int64_t hidden, int64_t batch, bool backward, int math, int sm_count,
                                int64_t smem_per_block);
using CheckFn = SequencePlan (*)(int device, int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                                 std::uintptr_t stream);

}  // namespace recurrence
}  // namespace seqgen
