// The persistent recurrence machinery of the recurrent kernel families, parametrised by the cell:
// a forward and a backward kernel that run one layer's whole sequence in one cooperative launch, and
// a one-launch step kernel for generation. Two cells use it: the LSTM (csrc/lstm.cu) and the GRU
// (csrc/gru.cu); the host side (plans to launches, the kernel instances a plan names) is
// csrc/recurrence_launch.cuh, shared the same way.
//
// ================================== The cell policy ===================================================
// A cell is a struct of static members (LstmCell in lstm.cu, GruCell in gru.cu). Every member taking
// SeqArgs also takes H; T is the storage type; row = t*B + b indexes [T, B, *] tensors, bh = b*H + j
// [B, H] ones.
//
//   static constexpr int kGates;       gate rows per hidden unit: W_hh is [kGates*H, H], gate-major
//                                      (row g*H + j is gate g of unit j), as torch stores it.
//   static constexpr const char* kName, *kFamily;   "LSTM" / "lstm": what the host's messages and
//                                      launcher names say (recurrence_launch.cuh).
//   struct FwdIn;                      what one item (batch row b, unit j) of step t loads before the
//                                      step waits for h_{t-1}: its slice of the input projection xg.
//   FwdIn load_forward<T>(a, H, row, j);
//   float step_forward<T>(a, H, const FwdIn&, const float (&rec)[kGates], float& carry, row, j);
//       The pointwise forward of one item. rec[g] = (h_{t-1} W_hh^T)[b, g*H + j], the recurrent
//       product alone: the cell combines it with xg and with SeqArgs::b_rec (a recurrent bias the
//       cell keeps out of xg, e.g. a GRU's b_hn inside r * (W_hn h + b_hn); the LSTM folds b_hh into
//       xg and passes none). carry: one fp32 per item kept on chip across steps (LSTM: c; GRU: h).
//       Stores the saved format (SeqArgs::saved, when training) and returns h_t (the kernel stores it).
//   float initial_carry<T>(a, H, bh);                       the carry of step 0, from h0 / s0
//   void finish_forward<T>(a, H, bh, float h, float carry); h_n and s_n after the last step
//
//   struct BwdIn;                      what one item of step t loads before waiting for the
//                                      recurrent gradient: saved activations, grad_hs[t].
//   BwdIn load_backward<T>(a, H, row, prev_row, bh, j);    prev_row: step t-1's row, -1 at t = 0
//   void step_backward<T>(a, H, const BwdIn&, float dh_in, float& carry, row, j);
//       dh_in = dL/dh_t through the recurrence ((d_rec_{t+1} W_hh)[b, j], grad_h_n at t = T-1); the
//       cell adds grad_hs[t] and its carried terms (LSTM: dc, the carry), and stores its gate
//       gradients: SeqArgs::d_rec[t] = dL/d(recurrent product), exchanged between blocks in the
//       layer dtype, and, for cells where it differs, SeqArgs::d_xg[t] = dL/dxg (the LSTM's are one).
//   float initial_carry_backward<T>(a, H, bh);              from grad_s_n
//   void finish_backward<T>(a, H, bh, float dh_in, float carry);
//       dh_in = (d_rec_0 W_hh)[b, j]: stores grad_h0 and grad_s0.
//   float cell_step(const float (&x)[kGates], const float (&rec)[kGates], float& carry);
//       The one-launch generation step: x = x W_ih^T + b_ih and rec = h W_hh^T + b_hh kept apart (a
//       GRU needs them apart for its n gate); carry in (c or h) and out; returns h_1.
//
// Which recurrent rows a block owns follows from kGates: block (group, slice) owns the units
// j0 = slice*units .. j0+units-1 with all their gate rows (forward: rows g*H + j of W_hh; backward:
// columns j of W_hh over all kGates*H rows) for the batch rows of its group.
//
// ================================== The persistent kernels ============================================
// Grid: groups x slices blocks of kSeqThreads threads, one per SM, all resident (a cooperative launch,
// after the launcher checked the occupancy). Block (group, slice) keeps its W_hh slice in shared
// memory for the whole sequence: A [rows][lda], rows = kGates*units padded (forward) or units padded
// (backward). Per step and batch pass it computes part = A x X^T, X = the recurrent input rows of its
// group (forward h_{t-1} [B, H]; backward d_rec_{t+1} [B, kGates*H]) read straight from L2, then the
// cell's pointwise step for its items (batch row, unit), then publishes its flag.
//
// Products (the `Product` parameter):
//   MmaProduct<T, MT, NTW>  tensor cores (csrc/mma.cuh): fp16/bf16 mma.m16n8k16, fp32 as tf32
//       mma.m16n8k8. Warps split the pass into ngroups batch groups of NTW n-tiles times kparts
//       k-ranges; each warp covers all MT m-tiles of A (X fragments loaded once per warp), reads A
//       through ldmatrix and X straight into fragments, and writes its partial sums to shared memory.
//   FfmaProduct<BT>  fp32 exact (FFMA) for float32 when TF32 is off: the k-ranges of X are staged into
//       shared memory by the warps that waited for them, then warp tiles of 4 rows x BT batch rows.
// The partial sums of the kparts k-ranges are added in a fixed order: results are deterministic.
//
// ================================== The handoff protocol ==============================================
// No grid-wide barrier. Each block owns one 32-bit flag (a zeroed workspace of the launch):
//   forward:  after every thread of block (g, s) has stored its h_t, __syncthreads(); then thread 0
//             releases flag[g, s] = t + 1 (st.release.gpu: the barrier orders the other threads'
//             stores before thread 0's release, which orders them before the flag store).
//   consumer: a warp about to multiply h_{t-1} over k in [k_lo, k_hi) acquires only the flags of the
//             blocks of its group owning those units (ld.acquire.gpu, one lane per flag, spinning
//             until flag >= t), then __syncwarp() (which orders the lanes' acquires before every lane's
//             loads), then reads that part of h_{t-1} with ld.global.cg. Its stores of h_t happen only
//             after the block's epilogue, so nothing ever overwrites data another block may still read
//             (hs[t] is a fresh row per step).
//   backward: the same with d_rec_{t+1}: after step t block (g, s) releases flag = T - t, and the
//             step-t product waits for flag >= T - t - 1 (the final product of grad_h0: >= T).
// Every cross-block datum is read after an acquire that synchronizes with the release of its
// writer, so reads are ordered by the CUDA memory model, not by cache behaviour: ld.cg bypasses L1
// anyway, and nothing assumes L1 coherence. Each step prefetches what does not depend on other
// blocks (xg_t, the saved activations, grad_hs[t]) into registers before it waits. A warp starts its
// product as soon as the owners of its own k-range have published, not when the whole grid has.
#pragma once

#include <algorithm>
#include <string>
#include <type_traits>

#include "common.cuh"
#include "mma.cuh"
#include "recurrence.h"

namespace seqgen {
namespace recurrence {

constexpr int kSeqThreads = 512;  // persistent kernels: one block per SM, 16 warps
constexpr int kWarps = kSeqThreads / 32;
constexpr int kMaxItems = 2;      // epilogue items (batch row, unit) per thread and batch pass
constexpr int kRT = 4;            // FFMA warp tile rows

__host__ __device__ constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
__host__ __device__ constexpr int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// The split of one layer (computed on the host by plan(), read by the kernels; plain data).
struct Plan {
  int groups, slices, units, group_batch;  // grid groups x slices; block (g, s): units s*units.., rows g*group_batch..
  int rows, lda;              // m-tile rows of the product (partials); A row stride (elements of SmemA)
  int a_rows;                 // A: a_rows rows at shared offset 0 (MMA: the block's rows, then a zero row that
                              // the m-tiles' padding rows read)
  int cols, ldp, kparts;      // a batch pass: cols columns; partials kparts x rows x ldp floats
  int ngroups;                // MMA: warp groups along the pass's columns (ngroups * kparts warps busy)
  int ldx;                    // FFMA: staging row stride (floats); 0 for MMA
  int off_part, off_stage, off_state, smem_bytes;
};

// Pointers of one layer's recurrence (generic slots; each cell documents what it puts where).
struct SeqArgs {
  const void* xg;        // [T, B, G*H] input projection
  const void* w;         // [G*H, H] recurrent weights
  const void* b_rec;     // [G*H] recurrent bias kept out of xg, or null
  const void* h0;        // [B, H]
  const void* s0;        // [B, H] the cell's other state (LSTM c0), or null
  void* hs;              // [T, B, H] h_1..h_T
  void* h_n;             // [B, H]
  void* s_n;             // [B, H], or null
  void* saved[2];        // the cell's saved format for backward (null: inference)
  const void* grad_hs;   // [T, B, H], grad_h_n / grad_s_n [B, H]; each may be null (zeros)
  const void* grad_h_n;
  const void* grad_s_n;
  void* d_rec;           // [T, B, G*H] dL/d(recurrent product), layer dtype
  void* d_xg;            // [T, B, G*H] dL/dxg where it differs from d_rec, else null
  void* grad_h0;         // [B, H]
  void* grad_s0;         // [B, H], or null
  unsigned* flags;       // [groups * slices], zero at launch
};

struct Params {
  SeqArgs a;
  Plan p;
  int T, B, H;
  int vec;  // X rows are 4-byte aligned at even k (32-bit fragment loads)
};

// ---------------------------------------------------------------------------------------------
// Device helpers
// ---------------------------------------------------------------------------------------------
// The cells' activations in fp32. Fast-math accounting (setup.py builds with --use_fast_math, which
// implies -ftz=true, -prec-div=false, -prec-sqrt=false); the sweeps are tests/test_fast_math_recurrent.py:
//   __expf(x)  = ex2.approx.ftz.f32(x * log2 e): documented at most 2 + floor(|1.173 x|) ulp (CUDA
//                Programming Guide, intrinsic functions); the cells feed it -x (sigmoid) and 2|x| (tanh).
//   1.f / y    = rcp.approx.ftz.f32 under -prec-div=false: documented at most 1 ulp, y in [1, inf].
//   FTZ        subnormal inputs and results of these instructions are flushed to +-0 (the only place a
//              result differs from torch's by more than the bounds below: |difference| < 2^-126).
// Measured worst case over the whole fp32 range, each approximation at its documented bound (the sweep):
// sigmoid 2.1e-7 absolute, 2.7e-6 relative for |x| <= 16 and 1.01e-5 relative down to values of 1e-30
// (__expf's bound grows with |x|), and for x >= 4 at most 1 ulp from the correctly rounded value;
// tanh_f32 6.6e-7 relative (1.8e-7 with a correctly rounded ex2).
// The fp32 layers' tolerance is 3e-5 relative norm (tests/support/fuzz.py).
// Non-finite values follow torch: sigmoid(+inf) = 1, sigmoid(-inf) = 0, tanh(+-inf) = +-1, NaN -> NaN
// (ex2.approx(NaN) = NaN, rcp.approx(+inf) = 0; no min/max anywhere on this path).

// sigmoid(x) = s for x < 0 and 1 - s for x >= 0, where s = e / (1 + e) = sigmoid(-|x|), e = exp(-|x|).
// s has relative accuracy, so a saturated gate lands within an ulp of the correctly rounded value and
// the backward's i(1 - i) (1 - i exact from the saved i) keeps the accuracy the saved format allows.
// 1 / (1 + exp(-x)) rounded 1 + e first: up to 4 ulp below 1 off, e.g. 1 - 2.4e-7 for 1 - 1.79e-7, a
// 33% error in 1 - i (found by the fuzz suite: tests/test_fuzz_recurrent.py, saturated gate gradient).
__device__ __forceinline__ float sigmoid(float x) {
  const float e = __expf(-fabsf(x));
  const float s = e * (1.f / (1.f + e));
  return x >= 0.f ? 1.f - s : s;  // NaN fails the comparison: s = NaN
}

// tanh in fp32 with relative accuracy everywhere. Not tanhf: under --use_fast_math it becomes
// tanh.approx.f32 (relative error 2^-11, too coarse for fp32 layers). |x| < 0.4: the odd Taylor
// polynomial through x^11 (truncation below 6e-8 relative, 1.1e-7 measured with its fp32 rounding);
// else 1 - 2/(e^{2|x|} + 1) (absolute error below 2.5e-7, so 6.6e-7 relative at |x| >= 0.4), which
// saturates to +-1. That form alone lost relative accuracy near 0 (1.7e-4 relative at |x| = 1e-4,
// cancellation in 1 - 2/(e^{2|x|} + 1)). A NaN fails the comparison and takes the exp form: NaN.
__device__ __forceinline__ float tanh_f32(float x) {
  const float a = fabsf(x);
  float t;
  if (a < 0.4f) {
    const float a2 = a * a;
    float p = fmaf(a2, -1382.f / 155925.f, 62.f / 2835.f);
    p = fmaf(a2, p, -17.f / 315.f);
    p = fmaf(a2, p, 2.f / 15.f);
    p = fmaf(a2, p, -1.f / 3.f);
    t = fmaf(a * a2, p, a);
  } else {
    t = 1.f - 2.f / (__expf(2.f * a) + 1.f);
  }
  return copysignf(t, x);  // tanh(-0) = -0 as torch's
}

template <typename S, typename T>
__device__ __forceinline__ S to_smem(T v) {
  if constexpr (std::is_same_v<S, uint32_t>) {
    return to_tf32(to_float(v));
  } else if constexpr (std::is_same_v<S, float>) {
    return to_float(v);
  } else {
    return v;
  }
}

// Warp-collective: returns once every block of `flags` (the `slices` blocks of one batch group) owning
// a unit j in {k mod h : k_lo <= k < k_hi} has published at least `target`, with acquire order.
__device__ __forceinline__ void wait_owners(const unsigned* flags, int k_lo, int k_hi, int h, int units, int slices,
                                            unsigned target) {
  int first = 0, count = 0, split = 0, second = 0;  // owners [first, first+count) then [second, slices)
  if (k_hi - k_lo >= h) {
    count = slices;
  } else if (k_hi > k_lo) {
    const int j_lo = k_lo % h, j_hi = (k_hi - 1) % h;
    if (j_lo <= j_hi) {
      first = j_lo / units;
      count = j_hi / units - first + 1;
    } else {  // the range wraps from one gate's rows into the next gate's (backward: k over G*H)
      count = j_hi / units + 1;
      second = j_lo / units;
      split = slices - second;
      if (second < count) count = slices, split = 0;  // the two pieces overlap: every owner
    }
  }
  const int lane = threadIdx.x % 32;
  for (int i = lane; i < count + split; i += 32) {
    wait_flag_at_least(flags + (i < count ? first + i : second + i - count), target);
  }
  __syncwarp();
}

// Forward: A[r][k] = W[g*H + j0 + u][k] for r = g*units + u, zero past the block's units or k >= H.
template <int G, typename S, typename T>
__device__ void load_forward_weights(S* a_s, const T* w, const Plan& p, int j0, int H) {
  for (int idx = threadIdx.x; idx < p.a_rows * p.lda; idx += blockDim.x) {
    const int r = idx / p.lda, k = idx - r * p.lda, g = r / p.units, j = j0 + r - g * p.units;
    const bool inside = g < G && j < H && j < j0 + p.units && k < H;
    a_s[idx] = to_smem<S>(inside ? w[(static_cast<int64_t>(g) * H + j) * H + k] : from_float<T>(0.f));
  }
}

// Backward: A[u][k] = W[k][j0 + u] (column j0+u of W over its G*H rows), zero past the block's units or
// k >= G*H. Consecutive threads take consecutive units: coalesced reads of W's rows.
template <int G, typename S, typename T>
__device__ void load_backward_weights(S* a_s, const T* w, const Plan& p, int j0, int H) {
  const int rows = p.a_rows;
  for (int idx = threadIdx.x; idx < rows * p.lda; idx += blockDim.x) {
    const int k = idx / rows, u = idx - k * rows, j = j0 + u;
    const bool inside = u < p.units && j < H && k < G * H;
    a_s[static_cast<size_t>(u) * p.lda + k] = to_smem<S>(inside ? w[static_cast<int64_t>(k) * H + j] : from_float<T>(0.f));
  }
}

// ---------------------------------------------------------------------------------------------
// Products: part[kp][r][c] (row stride ldp) = sum over k-range kp of A[r][k] X[c][k], c < cols
// ---------------------------------------------------------------------------------------------
template <typename T, int MT, int NTW>
struct MmaProduct {
  using Elem = T;
  using SmemA = typename mma::Traits<T>::SmemA;

  // x: column 0 of this pass (row stride ldx elements, n valid columns). wait(k_lo, k_hi) is called
  // warp-collectively before the warp reads X over that k range.
  template <class Wait>
  __device__ static void run(const Plan& p, const SmemA* a_s, const T* x, int64_t ldx, int n, int K, bool vec,
                             Wait&& wait, float* part, unsigned char* /*stage*/) {
    constexpr int kK = mma::Traits<T>::kK;
    const int KT = static_cast<int>(cdiv(K, kK));
    // Work item w = (batch group ng, k-range kp): one per warp of a kSeqThreads block (no block barrier here).
    for (int w = threadIdx.x / 32; w < p.ngroups * p.kparts; w += blockDim.x / 32) {
      const int ng = w % p.ngroups, kp = w / p.ngroups;
      const int kt0 = kp * KT / p.kparts, kt1 = (kp + 1) * KT / p.kparts;
      wait(kt0 * kK, min(kt1 * kK, K));
      mma::tile_product<T, MT, NTW>(
          part + static_cast<size_t>(kp) * p.rows * p.ldp, p.ldp,
          [&](uint32_t (&a)[4], int m, int k0) { mma::load_a_smem<T>(a, a_s, p.lda, 16 * m, p.a_rows - 1, k0); }, x, ldx,
          n, ng * NTW * 8, kt0, kt1, K, vec);
    }
  }
};

// ---- FFMA tiles (fp32 exact products; also the small-batch generation step) ------------------------
// VEC consecutive elements at p (16-byte aligned when VEC*sizeof(T) >= 16) converted to fp32.
template <int VEC, typename T>
__device__ __forceinline__ void load_floats(const T* p, float (&v)[VEC]) {
  constexpr int kBytes = VEC * static_cast<int>(sizeof(T));
  if constexpr (kBytes % 16 == 0) {
    constexpr int kPer = 16 / sizeof(T);
#pragma unroll
    for (int c = 0; c < kBytes / 16; ++c) {
      const uint4 u = *reinterpret_cast<const uint4*>(p + c * kPer);
      const T* e = reinterpret_cast<const T*>(&u);
#pragma unroll
      for (int i = 0; i < kPer; ++i) v[c * kPer + i] = to_float(e[i]);
    }
  } else {
#pragma unroll
    for (int i = 0; i < VEC; ++i) v[i] = to_float(p[i]);
  }
}

// acc[r][b] += sum over k in {start, start+stride, ...} < K of the VEC-chunk dot a[r][k..] . x[b][k..].
template <int VEC, int RT, int BT, typename TA, typename TX>
__device__ __forceinline__ void dot_accumulate(float (&acc)[RT][BT], const TA* const (&a)[RT],
                                               const TX* const (&x)[BT], int K, int start, int stride) {
  for (int k = start; k < K; k += stride) {
    float av[RT][VEC], xv[BT][VEC];
#pragma unroll
    for (int r = 0; r < RT; ++r) load_floats<VEC>(a[r] + k, av[r]);
#pragma unroll
    for (int b = 0; b < BT; ++b) load_floats<VEC>(x[b] + k, xv[b]);
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int b = 0; b < BT; ++b)
#pragma unroll
        for (int v = 0; v < VEC; ++v) acc[r][b] = fmaf(av[r][v], xv[b][v], acc[r][b]);
  }
}

// One halving stage of warp_reduce_scatter over the first n of N values, at lane offset 16 * n / N:
// a lane keeps one half of its values (the upper when its offset bit is set), sends the other to its
// partner and adds what the partner sent; then the next stage on the kept half.
template <int N, int n>
__device__ __forceinline__ void halving_stages(float (&v)[N], int lane) {
  if constexpr (n > 1) {
    constexpr int kOff = 16 * n / N;
    const bool upper = (lane & kOff) != 0;
#pragma unroll
    for (int i = 0; i < n / 2; ++i) {
      const float send = upper ? v[i] : v[i + n / 2];
      const float keep = upper ? v[i + n / 2] : v[i];
      v[i] = keep + __shfl_xor_sync(0xffffffffu, send, kOff);
    }
    halving_stages<N, n / 2>(v, lane);
  }
}

// Sums each of the N (a power of two <= 32) values over the warp's lanes by recursive halving,
// N-1 + log2(32/N) shuffles in all instead of 5N. Lane l returns the total of value l / (32 / N).
template <int N>
__device__ __forceinline__ float warp_reduce_scatter(float (&v)[N], int lane) {
  static_assert(N >= 1 && N <= 32 && (N & (N - 1)) == 0, "N must be a power of two <= 32");
  halving_stages<N, N>(v, lane);
  float s = v[0];
#pragma unroll
  for (int off = 16 / N; off > 0; off /= 2) s += __shfl_xor_sync(0xffffffffu, s, off);
  return s;
}

// Runs every (tile, k-part) of a rows x cols product over the block's warps, in warp tiles of kRT
// rows x BT columns: dot(acc, r0, c0, start, stride) accumulates one tile's lane share (lanes stride
// over k in VEC chunks), and the warp-reduced sums go to part[kp][r][c] (row stride ldp).
template <int BT, int VEC, class Dot>
__device__ __forceinline__ void ffma_tiles(Dot&& dot, int rows, int cols, int kparts, float* part, int ldp) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int btiles = cols / BT, tiles = (rows / kRT) * btiles;
  for (int w = warp; w < tiles * kparts; w += warps) {
    const int tile = w % tiles, kp = w / tiles;
    const int r0 = (tile / btiles) * kRT, c0 = (tile % btiles) * BT;
    float acc[kRT][BT];
#pragma unroll
    for (int r = 0; r < kRT; ++r)
#pragma unroll
      for (int b = 0; b < BT; ++b) acc[r][b] = 0.f;
    dot(acc, r0, c0, (kp * 32 + lane) * VEC, kparts * 32 * VEC);
    float flat[kRT * BT];
#pragma unroll
    for (int i = 0; i < kRT * BT; ++i) flat[i] = acc[i / BT][i % BT];
    const float total = warp_reduce_scatter(flat, lane);
    constexpr int kLanesPerValue = 32 / (kRT * BT);
    if (lane % kLanesPerValue == 0) {
      const int i = lane / kLanesPerValue;  // value i is acc[i / BT][i % BT]
      part[(static_cast<size_t>(kp) * rows + r0 + i / BT) * ldp + c0 + i % BT] = total;
    }
  }
}

template <int BT>
struct FfmaProduct {
  using Elem = float;
  using SmemA = float;

  // Each warp stages its k-range of X (all cols columns, zeros past n or K) into shared memory after
  // waiting for that range's owners; then every warp tile multiplies from shared memory.
  template <class Wait>
  __device__ static void run(const Plan& p, const float* a_s, const float* x, int64_t ldx, int n, int K, bool /*vec*/,
                             Wait&& wait, float* part, unsigned char* stage) {
    float* x_s = reinterpret_cast<float*>(stage);  // [cols][p.ldx]
    const int lane = threadIdx.x % 32, ld = p.ldx;
    const int chunk = static_cast<int>(round_up(cdiv(ld, kWarps), 4));
    for (int w = threadIdx.x / 32; w < kWarps; w += blockDim.x / 32) {  // chunk w of the k range
      const int k_lo = w * chunk, k_hi = min(ld, k_lo + chunk);
      if (k_lo < K) wait(k_lo, min(k_hi, K));
      for (int c = 0; c < p.cols; ++c) {
        for (int k = k_lo + lane; k < k_hi; k += 32) x_s[c * ld + k] = (c < n && k < K) ? __ldcg(x + c * ldx + k) : 0.f;
      }
    }
    __syncthreads();
    ffma_tiles<BT, 4>(
        [&](float (&acc)[kRT][BT], int r0, int c0, int start, int stride) {
          const float* ar[kRT];
          const float* xr[BT];
#pragma unroll
          for (int r = 0; r < kRT; ++r) ar[r] = a_s + static_cast<size_t>(r0 + r) * p.lda;
#pragma unroll
          for (int b = 0; b < BT; ++b) xr[b] = x_s + (c0 + b) * ld;
          dot_accumulate<4>(acc, ar, xr, ld, start, stride);
        },
        p.rows, p.cols, p.kparts, part, p.ldp);
  }
};

// The sum over the kparts k-ranges (in a fixed order) of part[.][r][c] (partials rows x ldp floats each).
__device__ __forceinline__ float part_sum(const float* part, int kparts, int rows, int ldp, int r, int c) {
  float s = 0.f;
  for (int kp = 0; kp < kparts; ++kp) s += part[(static_cast<size_t>(kp) * rows + r) * ldp + c];
  return s;
}

// ---------------------------------------------------------------------------------------------
// The persistent kernels
// ---------------------------------------------------------------------------------------------
// The items (batch column c, unit u) of a pass, idx = c * units + u, are spread over the threads:
// item idx = threadIdx.x + i * blockDim.x. prefetch_items loads the first kMaxItems of each thread
// before the product (the plan keeps every item among them in a kSeqThreads block); for_items then
// runs fn on each item with its prefetched input, and on any further items (blocks of fewer threads:
// the host emulation's) with an input loaded on the spot.
template <class In, class Load>
__device__ __forceinline__ void prefetch_items(int count, In (&in)[kMaxItems], Load&& load) {
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < count) in[i] = load(idx);
  }
}

template <class In, class Load, class Fn>
__device__ __forceinline__ void for_items(int count, const In (&in)[kMaxItems], Load&& load, Fn&& fn) {
#pragma unroll
  for (int i = 0; i < kMaxItems; ++i) {
    const int idx = threadIdx.x + i * blockDim.x;
    if (idx < count) fn(idx, in[i]);
  }
  for (int idx = threadIdx.x + kMaxItems * blockDim.x; idx < count; idx += blockDim.x) fn(idx, load(idx));
}

// What persistent block blockIdx.x owns: the batch rows [b_lo, b_hi) of its group, the units j0.. of
// its slice, the flags of its group, and its shared memory (A, the partial sums, the FFMA staging, the
// fp32 carry of each item [group_batch][units]).
template <typename S>
struct BlockShare {
  int j0, b_lo, b_hi;
  const unsigned* group_flags;
  S* a_s;
  float* part;
  unsigned char* stage;
  float* carry;
  __device__ explicit BlockShare(const Params& prm) {
    const Plan& p = prm.p;
    const int group = blockIdx.x / p.slices;
    j0 = (blockIdx.x % p.slices) * p.units;
    b_lo = group * p.group_batch, b_hi = min(prm.B, b_lo + p.group_batch);
    group_flags = prm.a.flags + group * p.slices;
    unsigned char* smem = SEQGEN_DYNAMIC_SMEM();
    a_s = reinterpret_cast<S*>(smem);
    part = reinterpret_cast<float*>(smem + p.off_part);
    stage = smem + p.off_stage;
    carry = reinterpret_cast<float*>(smem + p.off_state);
  }
  // carry[idx] = init(bh) for every item of the block (0 past H).
  template <class Init>
  __device__ void init_carry(int U, int H, Init&& init) const {
    for (int idx = threadIdx.x; idx < (b_hi - b_lo) * U; idx += blockDim.x) {
      const int b = b_lo + idx / U, j = j0 + idx % U;
      carry[idx] = j < H ? init(static_cast<int64_t>(b) * H + j) : 0.f;
    }
  }
};

template <class Cell, class Product>
__global__ void __launch_bounds__(kSeqThreads, 1) forward_kernel(const Params prm) {
  using T = typename Product::Elem;
  constexpr int G = Cell::kGates;
  const Plan& p = prm.p;
  const SeqArgs& a = prm.a;
  const int B = prm.B, H = prm.H, U = p.units;
  const BlockShare<typename Product::SmemA> blk(prm);
  const int j0 = blk.j0, b_lo = blk.b_lo, b_hi = blk.b_hi;
  float* part = blk.part;
  load_forward_weights<G>(blk.a_s, static_cast<const T*>(a.w), p, j0, H);
  blk.init_carry(U, H, [&](int64_t bh) { return Cell::template initial_carry<T>(a, H, bh); });
  __syncthreads();
  const unsigned* group_flags = blk.group_flags;
  T* hs = static_cast<T*>(a.hs);
  for (int t = 0; t < prm.T; ++t) {
    const T* x = t == 0 ? static_cast<const T*>(a.h0) : hs + static_cast<int64_t>(t - 1) * B * H;
    for (int c0 = b_lo; c0 < b_hi; c0 += p.cols) {
      const int n = min(p.cols, b_hi - c0);
      auto load = [&](int idx) {  // xg_t of the item: independent of the other blocks
        typename Cell::FwdIn in{};
        const int j = j0 + idx % U;
        if (j < H) in = Cell::template load_forward<T>(a, H, static_cast<int64_t>(t) * B + c0 + idx / U, j);
        return in;
      };
      typename Cell::FwdIn in[kMaxItems];
      prefetch_items(n * U, in, load);
      Product::run(p, blk.a_s, x + static_cast<int64_t>(c0) * H, H, n, H, prm.vec != 0,
                   [&](int k_lo, int k_hi) {
                     if (t > 0) wait_owners(group_flags, k_lo, k_hi, H, U, p.slices, static_cast<unsigned>(t));
                   },
                   part, blk.stage);
      __syncthreads();
      for_items(n * U, in, load, [&](int idx, const typename Cell::FwdIn& item) {
        const int u = idx % U, c = idx / U, j = j0 + u;
        if (j >= H) return;
        float rec[G];
#pragma unroll
        for (int g = 0; g < G; ++g) rec[g] = part_sum(part, p.kparts, p.rows, p.ldp, g * U + u, c);
        const int64_t row = static_cast<int64_t>(t) * B + c0 + c, bh = static_cast<int64_t>(c0 + c) * H + j;
        float& cy = blk.carry[(c0 + c - b_lo) * U + u];
        const float h = Cell::template step_forward<T>(a, H, item, rec, cy, row, j);
        hs[row * H + j] = from_float<T>(h);
        if (t == prm.T - 1) Cell::template finish_forward<T>(a, H, bh, h, cy);
      });
      __syncthreads();  // part free again; every h_t of this block stored
    }
    if (threadIdx.x == 0) flag_release(a.flags + blockIdx.x, static_cast<unsigned>(t + 1));
  }
}

template <class Cell, class Product>
__global__ void __launch_bounds__(kSeqThreads, 1) backward_kernel(const Params prm) {
  using T = typename Product::Elem;
  constexpr int G = Cell::kGates;
  const Plan& p = prm.p;
  const SeqArgs& a = prm.a;
  const int B = prm.B, H = prm.H, U = p.units, K = G * H, T_len = prm.T;
  const BlockShare<typename Product::SmemA> blk(prm);
  const int j0 = blk.j0, b_lo = blk.b_lo, b_hi = blk.b_hi;
  float* part = blk.part;
  load_backward_weights<G>(blk.a_s, static_cast<const T*>(a.w), p, j0, H);
  blk.init_carry(U, H, [&](int64_t bh) { return Cell::template initial_carry_backward<T>(a, H, bh); });
  __syncthreads();
  const unsigned* group_flags = blk.group_flags;
  const T* d_rec = static_cast<const T*>(a.d_rec);
  const T* grad_h_n = static_cast<const T*>(a.grad_h_n);
  for (int t = T_len - 1; t >= -1; --t) {
    for (int c0 = b_lo; c0 < b_hi; c0 += p.cols) {
      const int n = min(p.cols, b_hi - c0);
      auto load = [&](int idx) {  // the item's saved activations and grad_hs[t]
        typename Cell::BwdIn in{};
        const int j = j0 + idx % U, b = c0 + idx / U;
        if (t >= 0 && j < H) {
          const int64_t row = static_cast<int64_t>(t) * B + b;
          in = Cell::template load_backward<T>(a, H, row, t > 0 ? row - B : -1, static_cast<int64_t>(b) * H + j, j);
        }
        return in;
      };
      typename Cell::BwdIn in[kMaxItems];
      prefetch_items(n * U, in, load);
      if (t < T_len - 1) {  // dh_rec = d_rec_{t+1} W_hh (from d_rec_0 when t == -1)
        Product::run(p, blk.a_s, d_rec + (static_cast<int64_t>(t + 1) * B + c0) * K, K, n, K, prm.vec != 0,
                     [&](int k_lo, int k_hi) {
                       wait_owners(group_flags, k_lo, k_hi, H, U, p.slices, static_cast<unsigned>(T_len - t - 1));
                     },
                     part, blk.stage);
      }
      __syncthreads();
      for_items(n * U, in, load, [&](int idx, const typename Cell::BwdIn& item) {
        const int u = idx % U, c = idx / U, j = j0 + u;
        if (j >= H) return;
        const int64_t bh = static_cast<int64_t>(c0 + c) * H + j;
        float dh_in = 0.f;
        if (t < T_len - 1) {
          dh_in = part_sum(part, p.kparts, p.rows, p.ldp, u, c);
        } else if (grad_h_n != nullptr) {
          dh_in = to_float(grad_h_n[bh]);
        }
        float& cy = blk.carry[(c0 + c - b_lo) * U + u];
        if (t < 0) {
          Cell::template finish_backward<T>(a, H, bh, dh_in, cy);
        } else {
          Cell::template step_backward<T>(a, H, item, dh_in, cy, static_cast<int64_t>(t) * B + c0 + c, j);
        }
      });
      __syncthreads();  // part free again; every d_rec_t of this block stored
    }
    if (t >= 0 && threadIdx.x == 0) flag_release(a.flags + blockIdx.x, static_cast<unsigned>(T_len - t));
  }
}

// ---------------------------------------------------------------------------------------------
// The one-launch step (generation): x W_ih^T and h W_hh^T of a block's rows into two partial
// buffers, then the cell's step per item. Tensor cores (step_kernel) or FFMA (step_kernel_ffma).
// ---------------------------------------------------------------------------------------------
constexpr int kCellThreads = 256;
constexpr int kCellWarps = kCellThreads / 32;

struct StepArgs {
  const void* x; const void* h; const void* s;     // [B, I], [B, H], [B, H] (s: the carry's state -- LSTM c,
                                                   // GRU h itself -- or null for zeros)
  const void* w_ih; const void* w_hh;              // [G*H, I], [G*H, H]
  const void* b_ih; const void* b_hh;              // [G*H] or null
  void* h1; void* s1;                              // [B, H] (s1 null when s is)
};

// Block b owns units b*units.. with all their gate rows (rows = G*units, padded); batch passes of cols
// columns; partials kparts x rows x ldp floats, x W_ih^T at 0 and h W_hh^T at off_rec.
struct StepPlan {
  int units, rows, cols, ldp, kparts, ngroups;  // ngroups: MMA warp groups along the columns (0: FFMA)
  int off_rec, smem_bytes;
};

struct StepParams {
  StepArgs a;
  StepPlan p;
  int B, I, H;
  int vec_x, vec_h;  // MMA: x/W_ih rows (vec_x), h/W_hh rows (vec_h) 4-byte aligned at even k
};

// W row gate*H + j of the block's row r (null past the block's rows or H).
template <int G, typename T>
__device__ __forceinline__ const T* gate_row(const T* w, int64_t K, int r, int units, int j0, int H) {
  const int g = r / units, j = j0 + r - g * units;
  return (g < G && j < H && r < G * units) ? w + (static_cast<int64_t>(g) * H + j) * K : nullptr;
}

template <class Cell, typename T>
__device__ __forceinline__ void step_epilogue(const StepParams& prm, float* const (&parts)[2], int j0, int c0, int n) {
  constexpr int G = Cell::kGates;
  const StepPlan& p = prm.p;
  const StepArgs& a = prm.a;
  const int U = p.units, H = prm.H;
  const T* b_ih = static_cast<const T*>(a.b_ih);
  const T* b_hh = static_cast<const T*>(a.b_hh);
  for (int idx = threadIdx.x; idx < n * U; idx += blockDim.x) {
    const int u = idx % U, c = idx / U, j = j0 + u;
    if (j >= H) continue;
    float x[G], rec[G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
      x[g] = part_sum(parts[0], p.kparts, p.rows, p.ldp, g * U + u, c) + (b_ih != nullptr ? to_float(b_ih[g * H + j]) : 0.f);
      rec[g] = part_sum(parts[1], p.kparts, p.rows, p.ldp, g * U + u, c) + (b_hh != nullptr ? to_float(b_hh[g * H + j]) : 0.f);
    }
    const int64_t bh = static_cast<int64_t>(c0 + c) * H + j;
    float carry = a.s != nullptr ? to_float(static_cast<const T*>(a.s)[bh]) : 0.f;
    const float h1 = Cell::cell_step(x, rec, carry);
    static_cast<T*>(a.h1)[bh] = from_float<T>(h1);
    if (a.s1 != nullptr) static_cast<T*>(a.s1)[bh] = from_float<T>(carry);
  }
}

template <class Cell, typename T, int MT, int NTW>
__global__ void __launch_bounds__(kCellThreads, 2) step_kernel(const StepParams prm) {
  constexpr int G = Cell::kGates;
  constexpr int kK = mma::Traits<T>::kK;
  const StepPlan& p = prm.p;
  const StepArgs& a = prm.a;
  const int B = prm.B, H = prm.H, U = p.units, j0 = blockIdx.x * U;
  const int lane = threadIdx.x % 32;
  unsigned char* smem = SEQGEN_DYNAMIC_SMEM();
  float* const parts[2] = {reinterpret_cast<float*>(smem), reinterpret_cast<float*>(smem + p.off_rec)};
  for (int c0 = 0; c0 < B; c0 += p.cols) {
    const int n = min(p.cols, B - c0);
    if (c0 > 0) __syncthreads();  // partials free again
    for (int w = threadIdx.x / 32; w < p.ngroups * p.kparts; w += blockDim.x / 32) {  // one item per warp of kCellThreads
      const int ng = w % p.ngroups, kp = w / p.ngroups, col0 = ng * NTW * 8;
      auto segment = [&](const T* w, const T* v, int K, bool vec, float* part) {
        const int KT = static_cast<int>(cdiv(K, kK)), kt0 = kp * KT / p.kparts, kt1 = (kp + 1) * KT / p.kparts;
        const T* lo[MT];
        const T* hi[MT];
#pragma unroll
        for (int m = 0; m < MT; ++m) {
          lo[m] = gate_row<G>(w, K, 16 * m + lane / 4, U, j0, H);
          hi[m] = gate_row<G>(w, K, 16 * m + lane / 4 + 8, U, j0, H);
        }
        mma::tile_product<T, MT, NTW>(
            part + static_cast<size_t>(kp) * p.rows * p.ldp, p.ldp,
            [&](uint32_t (&f)[4], int m, int k0) { mma::load_a_global(f, lo[m], hi[m], k0, K, vec); },
            v + static_cast<int64_t>(c0) * K, K, n, col0, kt0, kt1, K, vec);
      };
      segment(static_cast<const T*>(a.w_ih), static_cast<const T*>(a.x), prm.I, prm.vec_x != 0, parts[0]);
      segment(static_cast<const T*>(a.w_hh), static_cast<const T*>(a.h), H, prm.vec_h != 0, parts[1]);
    }
    __syncthreads();
    step_epilogue<Cell, T>(prm, parts, j0, c0, n);
  }
}

// FFMA: warp tiles of 4 rows x BT batch rows streaming the weight rows from global memory (L2-resident
// across generation steps); VEC = 16 / sizeof(T) when every row is 16-byte aligned, else 1.
template <class Cell, typename T, int VEC, int BT>
__global__ void __launch_bounds__(kCellThreads, 2) step_kernel_ffma(const StepParams prm) {
  constexpr int G = Cell::kGates;
  const StepPlan& p = prm.p;
  const StepArgs& a = prm.a;
  const int B = prm.B, H = prm.H, U = p.units, j0 = blockIdx.x * U;
  unsigned char* smem = SEQGEN_DYNAMIC_SMEM();
  float* const parts[2] = {reinterpret_cast<float*>(smem), reinterpret_cast<float*>(smem + p.off_rec)};
  for (int c0 = 0; c0 < B; c0 += p.cols) {
    const int n = min(p.cols, B - c0);
    if (c0 > 0) __syncthreads();  // partials free again
    auto segment = [&](const T* w, const T* v, int K, float* part) {
      ffma_tiles<BT, VEC>(
          [&](float (&acc)[kRT][BT], int r0, int b0, int start, int stride) {
            const T* wr[kRT];
            const T* vr[BT];
#pragma unroll
            for (int r = 0; r < kRT; ++r) {  // rows past the block's repeat row 0; their sums are unused
              const T* row = gate_row<G>(w, K, r0 + r, U, j0, H);
              wr[r] = row != nullptr ? row : gate_row<G>(w, K, 0, U, j0, H);
            }
#pragma unroll
            for (int b = 0; b < BT; ++b) vr[b] = v + static_cast<int64_t>(min(c0 + b0 + b, B - 1)) * K;  // likewise
            dot_accumulate<VEC>(acc, wr, vr, K, start, stride);
          },
          p.rows, p.cols, p.kparts, part, p.ldp);
    };
    segment(static_cast<const T*>(a.w_ih), static_cast<const T*>(a.x), prm.I, parts[0]);
    segment(static_cast<const T*>(a.w_hh), static_cast<const T*>(a.h), H, parts[1]);
    __syncthreads();
    step_epilogue<Cell, T>(prm, parts, j0, c0, n);
  }
}

// ---------------------------------------------------------------------------------------------
// Host: plans
// ---------------------------------------------------------------------------------------------
// A plan with the reason it cannot run ('' when it fits) and the template shape of its product.
struct HostPlan {
  std::string reason;
  Plan p{};
  int math = kMathMma;
  int mt = 0, ntw = 0;  // MMA: m-tiles per warp tile and n-tiles per warp
  int bt = 0;           // FFMA: batch rows per warp tile
  int blocks = 0, threads = kSeqThreads;
};

inline int pow2_at_least(int64_t x) {
  int p = 1;
  while (p < x) p *= 2;
  return p;
}

// Byte offsets of the shared-memory regions after A (16-byte aligned each).
inline void lay_out(Plan& p, int64_t a_bytes, int64_t stage_bytes) {
  const int64_t part = round_up(a_bytes, 16);
  const int64_t stage = part + round_up(static_cast<int64_t>(p.kparts) * p.rows * p.ldp * 4, 16);
  const int64_t state = stage + round_up(stage_bytes, 16);
  const int64_t total = state + round_up(static_cast<int64_t>(p.group_batch) * p.units * 4, 16);
  p.off_part = static_cast<int>(part);
  p.off_stage = static_cast<int>(stage);
  p.off_state = static_cast<int>(state);
  p.smem_bytes = total > INT32_MAX ? INT32_MAX : static_cast<int>(total);
}

// The split of one layer of `gates`-gate cells (hidden H, batch B, storage elements of `elem` bytes)
// over `sms` SMs with `smem_limit` bytes of shared memory per block: tensor cores (kMathMma; fp32
// elements run as tf32) or fp32 FFMA (kMathFfma). Pure host computation.
inline HostPlan plan(int gates, int elem, int math, int64_t H, int64_t B, bool backward, int sms, int64_t smem_limit) {
  HostPlan best;
  best.math = math;
  const int64_t K = backward ? gates * H : H;
  int64_t need = 0;
  std::string why;
  if (math == kMathMma) {
    const int kK = elem == 4 ? 8 : 16, a_elem = elem == 4 ? 4 : 2;
    const int64_t KT = cdiv(K, kK);
    for (int groups : {8, 4, 2, 1}) {
      if ((groups > 1 && B < 8 * groups) || groups > sms) continue;
      const int64_t slices0 = std::min<int64_t>(H, sms / groups);
      const int64_t units = cdiv(H, slices0), slices = cdiv(H, units);
      const int64_t a_rows = (backward ? units : gates * units) + 1;  // the block's rows and a zero row
      const int mt = pow2_at_least(cdiv(a_rows - 1, 16));              // the kernels' m-tiles: 1, 2, 4
      const int64_t rows = 16 * mt;
      if (mt > (backward ? 1 : 4)) {
        why = std::to_string(units) + " units per block need " + std::to_string(a_rows - 1) +
              " rows of W_hh per block, more than the " + std::to_string(backward ? 16 : 64) +
              " of the tensor-core kernels";
        continue;
      }
      const int64_t lda = (round_up(KT * kK * a_elem, 128) + 16) / a_elem;  // rows 16 bytes apart mod 128: no bank conflicts
      const int64_t gb = cdiv(B, groups), nt = cdiv(gb, 8);
      const int ntw = std::min<int>(mt == 4 ? 2 : 4, pow2_at_least(nt));
      int64_t ng = std::min<int64_t>(cdiv(nt, ntw), kWarps);
      while (ng > 1 && ng * ntw * 8 * units > int64_t(kMaxItems) * kSeqThreads) --ng;
      for (; ng >= 1; ng /= 2) {
        Plan p{};
        p.groups = groups, p.slices = static_cast<int>(slices), p.units = static_cast<int>(units);
        p.group_batch = static_cast<int>(gb), p.rows = static_cast<int>(rows), p.lda = static_cast<int>(lda);
        p.a_rows = static_cast<int>(a_rows);
        p.cols = static_cast<int>(ng * ntw * 8), p.ldp = p.cols + 4, p.ngroups = static_cast<int>(ng);
        p.kparts = static_cast<int>(std::min<int64_t>(kWarps / ng, KT)), p.ldx = 0;
        lay_out(p, a_rows * lda * a_elem, 0);
        need = p.smem_bytes;
        if (need <= smem_limit) {
          best.p = p, best.mt = mt, best.ntw = ntw, best.blocks = static_cast<int>(groups * slices);
          return best;
        }
        why = "needs " + std::to_string(need) + " bytes of shared memory per block (W_hh slice " +
              std::to_string((a_rows - 1) * lda * a_elem) + " bytes for " + std::to_string(units) + " units), more than the " +
              std::to_string(smem_limit) + " the device allows";
      }
    }
  } else {
    const int64_t units = cdiv(H, std::min<int64_t>(H, sms)), slices = cdiv(H, units);
    const int64_t rows = round_up(backward ? units : gates * units, kRT);
    const int bt = B >= 4 ? 4 : 1;
    const int64_t ld = round_up(K, 4);
    int64_t tile = std::min<int64_t>(round_up(B, bt), 64);
    while (tile > bt && tile * units > int64_t(kMaxItems) * kSeqThreads) tile = round_up(tile / 2, bt);
    while (true) {
      Plan p{};
      p.groups = 1, p.slices = static_cast<int>(slices), p.units = static_cast<int>(units);
      p.group_batch = static_cast<int>(B), p.rows = static_cast<int>(rows), p.lda = static_cast<int>(ld);
      p.a_rows = static_cast<int>(rows);
      p.cols = static_cast<int>(tile), p.ldp = p.cols, p.ngroups = 0, p.ldx = static_cast<int>(ld);
      const int64_t tiles = rows / kRT * (tile / bt);
      p.kparts = static_cast<int>(tiles >= kWarps ? 1 : kWarps / tiles);
      lay_out(p, rows * ld * 4, tile * ld * 4);
      need = p.smem_bytes;
      if (need <= smem_limit) {
        best.p = p, best.bt = bt, best.blocks = static_cast<int>(slices);
        return best;
      }
      why = "needs " + std::to_string(need) + " bytes of shared memory per block (W_hh slice " +
            std::to_string(rows * ld * 4) + " bytes, fp32 state " + std::to_string(B * units * 4) +
            " bytes), more than the " + std::to_string(smem_limit) + " the device allows";
      if (tile == bt) break;
      tile = round_up(tile / 2, bt);
    }
  }
  best.reason = "hidden=" + std::to_string(H) + ", batch=" + std::to_string(B) + " over " + std::to_string(sms) +
                " SMs: " + why;
  return best;
}

// The one-launch step: blocks of `units` units (rows = gates*units, padded to 16*mt for MMA), batch
// passes of `cols` columns, two partial buffers within the 48 KiB of an ordinary launch (no opt-in
// attribute call: capturable). MMA: the most busy warps, then the widest pass. FFMA: two blocks per
// SM, the widest batch tile (<= 64) that fits.
struct HostStepPlan {
  std::string reason;
  StepPlan p{};
  int math = kMathMma;
  int mt = 0, ntw = 0, bt = 0, blocks = 0;
};

constexpr int64_t kStepSmemLimit = 48 * 1024;

inline HostStepPlan plan_step(int gates, int math, int64_t H, int64_t B, int sms) {
  HostStepPlan best;
  best.math = math;
  StepPlan& p = best.p;
  if (math == kMathMma) {
    const int64_t units = std::min<int64_t>(cdiv(H, sms), 32 / gates), rows = round_up(gates * units, 16);
    const int64_t nt = cdiv(B, 8);
    int64_t best_busy = 0, best_cols = 0;
    for (int ntw : {4, 2, 1}) {
      if (ntw > 1 && ntw > pow2_at_least(nt)) continue;
      for (int kparts : {8, 4, 2, 1}) {
        const int64_t ng = std::min<int64_t>(kCellWarps / kparts, cdiv(nt, ntw)), cols = ng * ntw * 8;
        const int64_t part = round_up(kparts * rows * (cols + 4) * 4, 16);
        if (2 * part > kStepSmemLimit || ng * kparts < best_busy || (ng * kparts == best_busy && cols <= best_cols)) {
          continue;
        }
        best_busy = ng * kparts, best_cols = cols;
        p.units = static_cast<int>(units), p.rows = static_cast<int>(rows), p.ngroups = static_cast<int>(ng);
        p.cols = static_cast<int>(cols), p.ldp = p.cols + 4, p.kparts = kparts;
        p.off_rec = static_cast<int>(part), p.smem_bytes = static_cast<int>(2 * part);
        best.mt = static_cast<int>(rows / 16), best.ntw = ntw, best.blocks = static_cast<int>(cdiv(H, units));
      }
    }
    if (best_busy > 0) return best;
  } else {
    const int64_t units = cdiv(H, 2 * static_cast<int64_t>(sms)), rows = round_up(gates * units, kRT);
    best.bt = B >= 4 ? 4 : 1;
    const int bt = best.bt;
    for (int64_t tile = std::min<int64_t>(round_up(B, bt), 64);; tile = round_up(tile / 2, bt)) {
      const int64_t tiles = rows / kRT * (tile / bt);
      const int64_t kparts = tiles >= kCellWarps ? 1 : kCellWarps / tiles;
      const int64_t part = round_up(kparts * rows * tile * 4, 16);
      if (2 * part <= kStepSmemLimit) {
        p.units = static_cast<int>(units), p.rows = static_cast<int>(rows), p.ngroups = 0;
        p.cols = static_cast<int>(tile), p.ldp = p.cols, p.kparts = static_cast<int>(kparts);
        p.off_rec = static_cast<int>(part), p.smem_bytes = static_cast<int>(2 * part);
        best.blocks = static_cast<int>(cdiv(H, units));
        return best;
      }
      if (tile == bt) break;
    }
  }
  best.reason = "hidden=" + std::to_string(H) + " needs more than 48 KiB of shared memory per block";
  return best;
}

}  // namespace recurrence
}  // namespace seqgen
