// LSTM kernels: persistent cooperative forward/backward over a whole sequence, and a fused cell step.
// Layouts and the math are stated in lstm.h.
//
// Work split shared by all three kernels. A block owns U consecutive hidden units j0..j0+U-1 and
// computes, per batch row b, the 4U gate pre-activations of those units (forward, cell) or the U
// recurrent gradients dh[b][j] (backward). That product is a small matrix product
//   out[b][r] = sum_k A[r][k] * X[b][k]
// done in warp tiles of kRT rows x BT batch rows: the 32 lanes of a warp stride over k in 16-byte
// chunks (VEC elements of A), keep kRT*BT fp32 accumulators, and reduce them with shuffles. When a
// block has fewer tiles than warps, `ksplit` warps share one tile's k range and the partial sums
// land in separate shared-memory slots summed in a fixed order (deterministic).
//
// Persistent kernels: A (the block's W_hh slice; forward rows g*U+u = W_hh[g*H + j0+u, :],
// backward rows u = W_hh[:, j0+u]) lives in shared memory for the whole launch. Each step stages
// the recurrent input of `batch_tile` rows from global memory (L2, bypassing L1: other blocks wrote
// it), computes the tiles, applies the pointwise cell (or cell-backward) update with the fp32 cell
// state kept in shared memory, writes its units' outputs, and meets the other blocks at a grid-wide
// barrier (cooperative launch), the only inter-block synchronisation.
#include <algorithm>
#include <string>
#include <utility>

#include "common.cuh"
#include "lstm.h"

namespace cg = cooperative_groups;

namespace seqgen {
namespace lstm {
namespace {

constexpr int kSeqThreads = 512;   // persistent kernels: one block per SM, 16 warps
constexpr int kCellThreads = 256;  // cell step: several blocks per SM
constexpr int kRT = 4;             // gate rows per warp tile
constexpr int kMaxBatchTile = 64;
constexpr int64_t kCellSmemLimit = 48 * 1024;  // no opt-in attribute: capturable, no setup call

__host__ __device__ constexpr int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }
__host__ __device__ constexpr int64_t cdiv(int64_t x, int64_t m) { return (x + m - 1) / m; }

// Warps sharing one tile's reduction range: all warps busy when there are fewer tiles than warps.
__host__ __device__ constexpr int ksplit_for(int tiles, int warps) { return tiles >= warps ? 1 : warps / tiles; }

// Shared-memory carve-up of a persistent block (host sizes it, the kernel uses the same offsets).
struct SmemLayout {
  size_t x, part, state, total;  // A starts at 0
  __host__ __device__ SmemLayout(int rows, int k_pad, int batch_tile, int ksplit, int batch, int units,
                                 int a_bytes, int x_bytes) {
    x = round_up(static_cast<int64_t>(rows) * k_pad * a_bytes, 16);
    part = x + round_up(static_cast<int64_t>(batch_tile) * k_pad * x_bytes, 16);
    state = part + round_up(static_cast<int64_t>(ksplit) * batch_tile * rows * 4, 16);
    total = state + round_up(static_cast<int64_t>(batch) * units * 4, 16);
  }
};

__device__ __forceinline__ float sigmoid(float x) { return 1.f / (1.f + __expf(-x)); }

// tanh through exp: under --use_fast_math tanhf becomes tanh.approx.f32 (relative error 2^-11, too
// coarse for fp32 layers); this form keeps the absolute error near 1e-7 and saturates to +-1.
__device__ __forceinline__ float tanh_f32(float x) {
  return copysignf(1.f - 2.f / (__expf(2.f * fabsf(x)) + 1.f), x);
}

// One element through L2 only (.cg): data written by other blocks of this launch.
template <typename T> __device__ __forceinline__ T load_cg(const T* p);
template <> __device__ __forceinline__ float load_cg<float>(const float* p) { return __ldcg(p); }
template <> __device__ __forceinline__ __half load_cg<__half>(const __half* p) {
  return __ushort_as_half(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}
template <> __device__ __forceinline__ __nv_bfloat16 load_cg<__nv_bfloat16>(const __nv_bfloat16* p) {
  return __ushort_as_bfloat16(__ldcg(reinterpret_cast<const unsigned short*>(p)));
}

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

// Runs every (tile, k-part) of a rows x batch_tile product over the block's warps. dot(acc, r0, b0,
// start, stride) accumulates one tile's lane share; the warp-reduced sums go to
// part[(p * batch_tile + b) * rows + r].
template <int RT, int BT, int VEC, typename Dot>
__device__ __forceinline__ void block_tiles(Dot&& dot, int rows, int batch_tile, int ksplit, float* part) {
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int btiles = batch_tile / BT, tiles = (rows / RT) * btiles;
  for (int w = warp; w < tiles * ksplit; w += warps) {
    const int tile = w % tiles, p = w / tiles;
    const int r0 = (tile / btiles) * RT, b0 = (tile % btiles) * BT;
    float acc[RT][BT];
#pragma unroll
    for (int r = 0; r < RT; ++r)
#pragma unroll
      for (int b = 0; b < BT; ++b) acc[r][b] = 0.f;
    dot(acc, r0, b0, (p * 32 + lane) * VEC, ksplit * 32 * VEC);
    float flat[RT * BT];
#pragma unroll
    for (int i = 0; i < RT * BT; ++i) flat[i] = acc[i / BT][i % BT];
    const float total = warp_reduce_scatter(flat, lane);
    constexpr int kLanesPerValue = 32 / (RT * BT);
    if (lane % kLanesPerValue == 0) {
      const int i = lane / kLanesPerValue;  // value i is acc[i / BT][i % BT]
      part[(static_cast<size_t>(p) * batch_tile + b0 + i % BT) * rows + r0 + i / BT] = total;
    }
  }
}

// part = the rows x batch_tile product of w_s [rows][k_pad] and x_s [batch_tile][k_pad], both in
// shared memory (one row of each per dot), in block_tiles' k-part layout.
template <int BT, int VEC, typename TW, typename TX>
__device__ __forceinline__ void shared_product(const TW* w_s, const TX* x_s, int k_pad, int rows, int batch_tile,
                                               int ksplit, float* part) {
  block_tiles<kRT, BT, VEC>(
      [&](float (&acc)[kRT][BT], int r0, int b0, int start, int stride) {
        const TW* a[kRT];
        const TX* x[BT];
#pragma unroll
        for (int r = 0; r < kRT; ++r) a[r] = w_s + (r0 + r) * k_pad;
#pragma unroll
        for (int b = 0; b < BT; ++b) x[b] = x_s + (b0 + b) * k_pad;
        dot_accumulate<VEC>(acc, a, x, k_pad, start, stride);
      },
      rows, batch_tile, ksplit, part);
}

// Copies rows [0, nb) x [0, K) of src (row stride K) into dst (batch_tile x k_pad), zero elsewhere.
// Reads bypass L1 (other blocks of this launch wrote src).
template <typename T>
__device__ __forceinline__ void stage_rows(T* dst, const T* src, int nb, int batch_tile, int K, int k_pad) {
  constexpr int kPer = 16 / sizeof(T);
  if (K % kPer == 0 && reinterpret_cast<std::uintptr_t>(src) % 16 == 0) {
    const int row_chunks = k_pad / kPer, k_chunks = K / kPer;
    for (int idx = threadIdx.x; idx < batch_tile * row_chunks; idx += blockDim.x) {
      const int b = idx / row_chunks, c = idx - b * row_chunks;
      uint4 v = make_uint4(0u, 0u, 0u, 0u);
      if (b < nb && c < k_chunks) v = __ldcg(reinterpret_cast<const uint4*>(src + static_cast<int64_t>(b) * K) + c);
      reinterpret_cast<uint4*>(dst)[idx] = v;
    }
  } else {
    for (int idx = threadIdx.x; idx < batch_tile * k_pad; idx += blockDim.x) {
      const int b = idx / k_pad, k = idx - b * k_pad;
      dst[idx] = (b < nb && k < K) ? load_cg(src + static_cast<int64_t>(b) * K + k) : from_float<T>(0.f);
    }
  }
}

struct ForwardParams {
  const void* xg; const void* w_hh; const void* h0; const void* c0;
  void* hs; void* h_n; void* c_n; void* cs; void* gates;
  int T, B, H, units, batch_tile, ksplit, k_pad;
};

template <typename T, int BT>
__global__ void __launch_bounds__(kSeqThreads, 1) lstm_sequence_forward_kernel(ForwardParams p) {
  constexpr int VEC = 16 / sizeof(T);
  const int H = p.H, B = p.B, U = p.units, rows = 4 * U, k_pad = p.k_pad, tile_b = p.batch_tile;
  const int j0 = blockIdx.x * U;
  const SmemLayout lay(rows, k_pad, tile_b, p.ksplit, B, U, sizeof(T), sizeof(T));
  unsigned char* smem = SEQGEN_DYNAMIC_SMEM();
  T* w_s = reinterpret_cast<T*>(smem);
  T* x_s = reinterpret_cast<T*>(smem + lay.x);
  float* part = reinterpret_cast<float*>(smem + lay.part);
  float* c_s = reinterpret_cast<float*>(smem + lay.state);  // [B][U] fp32 cell state

  const T* w = static_cast<const T*>(p.w_hh);
  const T* xg = static_cast<const T*>(p.xg);
  T* hs = static_cast<T*>(p.hs);
  T* cs = static_cast<T*>(p.cs);
  T* gates = static_cast<T*>(p.gates);
  for (int idx = threadIdx.x; idx < rows * k_pad; idx += blockDim.x) {
    const int r = idx / k_pad, k = idx - r * k_pad, g = r / U, j = j0 + r - g * U;
    w_s[idx] = (j < H && k < H) ? w[(static_cast<int64_t>(g) * H + j) * H + k] : from_float<T>(0.f);
  }
  for (int idx = threadIdx.x; idx < B * U; idx += blockDim.x) {
    const int b = idx / U, j = j0 + idx - b * U;
    c_s[idx] = j < H ? to_float(static_cast<const T*>(p.c0)[static_cast<int64_t>(b) * H + j]) : 0.f;
  }
  cg::grid_group grid = cg::this_grid();
  for (int t = 0; t < p.T; ++t) {
    const T* h_prev = t == 0 ? static_cast<const T*>(p.h0) : hs + static_cast<int64_t>(t - 1) * B * H;
    for (int b0 = 0; b0 < B; b0 += tile_b) {
      const int nb = min(tile_b, B - b0);
      __syncthreads();  // x_s and part free again; w_s and c_s written
      stage_rows(x_s, h_prev + static_cast<int64_t>(b0) * H, nb, tile_b, H, k_pad);
      __syncthreads();
      shared_product<BT, VEC>(w_s, x_s, k_pad, rows, tile_b, p.ksplit, part);
      __syncthreads();
      for (int idx = threadIdx.x; idx < nb * U; idx += blockDim.x) {
        const int b = idx / U, u = idx - b * U, j = j0 + u;
        if (j >= H) continue;
        const int64_t row = static_cast<int64_t>(t) * B + b0 + b;
        float pre[4];
#pragma unroll
        for (int g = 0; g < 4; ++g) {
          float s = to_float(xg[row * 4 * H + g * H + j]);
          for (int q = 0; q < p.ksplit; ++q) s += part[(static_cast<size_t>(q) * tile_b + b) * rows + g * U + u];
          pre[g] = s;
        }
        const float ig = sigmoid(pre[0]), fg = sigmoid(pre[1]), gg = tanh_f32(pre[2]), og = sigmoid(pre[3]);
        float& c_state = c_s[(b0 + b) * U + u];
        const float c = fg * c_state + ig * gg;
        const float h = og * tanh_f32(c);
        c_state = c;
        hs[row * H + j] = from_float<T>(h);
        if (cs != nullptr) {
          cs[row * H + j] = from_float<T>(c);
          T* gr = gates + row * 4 * H + j;
          gr[0] = from_float<T>(ig);
          gr[H] = from_float<T>(fg);
          gr[2 * H] = from_float<T>(gg);
          gr[3 * H] = from_float<T>(og);
        }
        if (t == p.T - 1) {
          static_cast<T*>(p.h_n)[static_cast<int64_t>(b0 + b) * H + j] = from_float<T>(h);
          static_cast<T*>(p.c_n)[static_cast<int64_t>(b0 + b) * H + j] = from_float<T>(c);
        }
      }
    }
    if (t + 1 < p.T) grid.sync();  // h_t of every block visible before step t+1 stages it
  }
}

struct BackwardParams {
  const void* w_hh; const void* cs; const void* gates; const void* c0;
  const void* grad_hs; const void* grad_h_n; const void* grad_c_n;
  float* grad_gates; void* grad_h0; void* grad_c0;
  int T, B, H, units, batch_tile, ksplit, k_pad;
};

// Reverse time: dh_t = grad_hs[t] + grad_gates_{t+1} @ W_hh (grad_h_n at t = T-1);
// dc_t = dc_{t+1} * f_{t+1} + dh_t * o * (1 - tanh^2 c_t); grad_gates_t = (dc*g*i(1-i), dc*c_{t-1}*f(1-f),
// dc*i*(1-g^2), dh*tanh(c_t)*o(1-o)); finally grad_h0 = grad_gates_0 @ W_hh, grad_c0 = dc_0 * f_0.
template <typename T, int BT>
__global__ void __launch_bounds__(kSeqThreads, 1) lstm_sequence_backward_kernel(BackwardParams p) {
  constexpr int VEC = 16 / sizeof(T);
  const int H = p.H, B = p.B, U = p.units, rows = static_cast<int>(round_up(U, kRT)), K = 4 * H;
  const int k_pad = p.k_pad, tile_b = p.batch_tile;
  const int j0 = blockIdx.x * U;
  const SmemLayout lay(rows, k_pad, tile_b, p.ksplit, B, U, sizeof(T), sizeof(float));
  unsigned char* smem = SEQGEN_DYNAMIC_SMEM();
  T* w_s = reinterpret_cast<T*>(smem);  // [rows][k_pad]: row u = column j0+u of W_hh
  float* x_s = reinterpret_cast<float*>(smem + lay.x);
  float* part = reinterpret_cast<float*>(smem + lay.part);
  float* dc_s = reinterpret_cast<float*>(smem + lay.state);  // [B][U] fp32 dc carried backwards

  const T* w = static_cast<const T*>(p.w_hh);
  const T* cs = static_cast<const T*>(p.cs);
  const T* gates = static_cast<const T*>(p.gates);
  const T* grad_hs = static_cast<const T*>(p.grad_hs);
  const T* grad_h_n = static_cast<const T*>(p.grad_h_n);
  const T* grad_c_n = static_cast<const T*>(p.grad_c_n);
  float* grad_gates = p.grad_gates;
  for (int idx = threadIdx.x; idx < k_pad * rows; idx += blockDim.x) {  // u fastest: coalesced reads
    const int r = idx / rows, u = idx - r * rows, j = j0 + u;
    w_s[u * k_pad + r] = (u < U && j < H && r < K) ? w[static_cast<int64_t>(r) * H + j] : from_float<T>(0.f);
  }
  for (int idx = threadIdx.x; idx < B * U; idx += blockDim.x) {
    const int b = idx / U, j = j0 + idx - b * U;
    dc_s[idx] = (j < H && grad_c_n != nullptr) ? to_float(grad_c_n[static_cast<int64_t>(b) * H + j]) : 0.f;
  }
  cg::grid_group grid = cg::this_grid();
  for (int t = p.T - 1; t >= -1; --t) {
    for (int b0 = 0; b0 < B; b0 += tile_b) {
      const int nb = min(tile_b, B - b0);
      __syncthreads();  // x_s and part free again; w_s and dc_s written
      if (t < p.T - 1) {  // recurrent gradient from step t+1 (from step 0 when t == -1)
        stage_rows(x_s, grad_gates + (static_cast<int64_t>(t + 1) * B + b0) * K, nb, tile_b, K, k_pad);
        __syncthreads();
        shared_product<BT, VEC>(w_s, x_s, k_pad, rows, tile_b, p.ksplit, part);
        __syncthreads();
      }
      for (int idx = threadIdx.x; idx < nb * U; idx += blockDim.x) {
        const int b = idx / U, u = idx - b * U, j = j0 + u;
        if (j >= H) continue;
        const int64_t bh = static_cast<int64_t>(b0 + b) * H + j;
        float dh = 0.f;
        if (t == p.T - 1) {
          if (grad_h_n != nullptr) dh = to_float(grad_h_n[bh]);
        } else {
          for (int q = 0; q < p.ksplit; ++q) dh += part[(static_cast<size_t>(q) * tile_b + b) * rows + u];
        }
        if (t < 0) {
          static_cast<T*>(p.grad_h0)[bh] = from_float<T>(dh);
          continue;
        }
        const int64_t row = static_cast<int64_t>(t) * B + b0 + b;
        if (grad_hs != nullptr) dh += to_float(grad_hs[row * H + j]);
        const T* gr = gates + row * K + j;
        const float ig = to_float(gr[0]), fg = to_float(gr[H]), gg = to_float(gr[2 * H]), og = to_float(gr[3 * H]);
        const float c = to_float(cs[row * H + j]);
        const float c_prev = to_float(t > 0 ? cs[(row - B) * H + j] : static_cast<const T*>(p.c0)[bh]);
        const float tc = tanh_f32(c);
        float& dc_state = dc_s[(b0 + b) * U + u];
        const float dc = dc_state + dh * og * (1.f - tc * tc);
        float* dg = grad_gates + row * K + j;
        dg[0] = dc * gg * ig * (1.f - ig);
        dg[H] = dc * c_prev * fg * (1.f - fg);
        dg[2 * H] = dc * ig * (1.f - gg * gg);
        dg[3 * H] = dh * tc * og * (1.f - og);
        dc_state = dc * fg;
        if (t == 0) static_cast<T*>(p.grad_c0)[bh] = from_float<T>(dc * fg);
      }
    }
    if (t >= 0) grid.sync();  // grad_gates_t of every block visible before it is staged
  }
}

struct CellParams {
  const void* x; const void* h; const void* c; const void* w_ih; const void* w_hh;
  const void* b_ih; const void* b_hh; void* h1; void* c1;
  int B, I, H, units, batch_tile, ksplit;
};

// Weights stream from global memory (L2-resident across generation steps); VEC is 16/sizeof(T)
// when every row is 16-byte aligned, else 1.
template <typename T, int VEC, int BT>
__global__ void __launch_bounds__(kCellThreads) lstm_cell_kernel(CellParams p) {
  const int H = p.H, B = p.B, I = p.I, U = p.units, rows = 4 * U, tile_b = p.batch_tile;
  const int j0 = blockIdx.x * U;
  unsigned char* smem = SEQGEN_DYNAMIC_SMEM();
  float* part = reinterpret_cast<float*>(smem);
  const T* x = static_cast<const T*>(p.x);
  const T* h = static_cast<const T*>(p.h);
  const T* w_ih = static_cast<const T*>(p.w_ih);
  const T* w_hh = static_cast<const T*>(p.w_hh);
  const T* b_ih = static_cast<const T*>(p.b_ih);
  const T* b_hh = static_cast<const T*>(p.b_hh);
  for (int b0 = 0; b0 < B; b0 += tile_b) {
    const int nb = min(tile_b, B - b0);
    if (b0 > 0) __syncthreads();  // part free again
    block_tiles<kRT, BT, VEC>(
        [&](float (&acc)[kRT][BT], int r0, int bb, int start, int stride) {
          const T* a_ih[kRT];
          const T* a_hh[kRT];
          const T* xr[BT];
          const T* hr[BT];
#pragma unroll
          for (int r = 0; r < kRT; ++r) {  // rows past H repeat the last unit; their sums are unused
            const int g = (r0 + r) / U, j = min(j0 + (r0 + r) - g * U, H - 1);
            a_ih[r] = w_ih + (static_cast<int64_t>(g) * H + j) * I;
            a_hh[r] = w_hh + (static_cast<int64_t>(g) * H + j) * H;
          }
#pragma unroll
          for (int b = 0; b < BT; ++b) {  // batch rows past B repeat the last one, likewise unused
            const int64_t bg = min(b0 + bb + b, B - 1);
            xr[b] = x + bg * I;
            hr[b] = h + bg * H;
          }
          dot_accumulate<VEC>(acc, a_ih, xr, I, start, stride);
          dot_accumulate<VEC>(acc, a_hh, hr, H, start, stride);
        },
        rows, tile_b, p.ksplit, part);
    __syncthreads();
    for (int idx = threadIdx.x; idx < nb * U; idx += blockDim.x) {
      const int b = idx / U, u = idx - b * U, j = j0 + u;
      if (j >= H) continue;
      float pre[4];
#pragma unroll
      for (int g = 0; g < 4; ++g) {
        float s = 0.f;
        for (int q = 0; q < p.ksplit; ++q) s += part[(static_cast<size_t>(q) * tile_b + b) * rows + g * U + u];
        if (b_ih != nullptr) s += to_float(b_ih[g * H + j]);
        if (b_hh != nullptr) s += to_float(b_hh[g * H + j]);
        pre[g] = s;
      }
      const float ig = sigmoid(pre[0]), fg = sigmoid(pre[1]), gg = tanh_f32(pre[2]), og = sigmoid(pre[3]);
      const int64_t bh = static_cast<int64_t>(b0 + b) * H + j;
      const float c1 = fg * to_float(static_cast<const T*>(p.c)[bh]) + ig * gg;
      static_cast<T*>(p.c1)[bh] = from_float<T>(c1);
      static_cast<T*>(p.h1)[bh] = from_float<T>(og * tanh_f32(c1));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Host side
// ---------------------------------------------------------------------------------------------
const char* dtype_name(int dtype) {
  switch (dtype) {
    case kFloat32: return "float32";
    case kFloat16: return "float16";
    case kBFloat16: return "bfloat16";
    default: return "unsupported";
  }
}

int element_bytes(int dtype, const char* what) {
  switch (dtype) {
    case kFloat32: return 4;
    case kFloat16:
    case kBFloat16: return 2;
    default:
      throw std::invalid_argument(std::string(what) + ": unsupported dtype code " + std::to_string(dtype) +
                                  " (expected 0 float32, 1 float16, 2 bfloat16)");
  }
}

void require_size(const char* what, const char* name, int64_t v, int64_t lo) {
  if (v < lo || v > INT32_MAX) {
    throw std::invalid_argument(std::string(what) + ": " + name + " must be in [" + std::to_string(lo) +
                                ", 2^31) (got " + std::to_string(v) + ")");
  }
}

using NamedPtr = std::pair<const char*, std::uintptr_t>;

void require_ptr(const char* what, const char* name, std::uintptr_t p) {
  if (p == 0) throw std::invalid_argument(std::string(what) + ": " + name + " is a null pointer");
}

// Batch rows per warp tile: 4 share each weight load; 1 avoids wasted work for B < 4.
int batch_step_for(int64_t batch) { return batch >= 4 ? 4 : 1; }

struct DeviceFacts {
  int sms = 0;
  int64_t smem_optin = 0;
  bool cooperative = false;
};

DeviceFacts device_facts(int device) {
  DeviceFacts f;
  int v = 0;
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&f.sms, cudaDevAttrMultiProcessorCount, device));
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrMaxSharedMemoryPerBlockOptin, device));
  f.smem_optin = v;
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&v, cudaDevAttrCooperativeLaunch, device));
  f.cooperative = v != 0;
  return f;
}

template <typename Kernel, typename Params>
void launch_cooperative(const char* what, Kernel kernel, const SequencePlan& plan, int sms, Params params,
                        std::uintptr_t stream) {
  const size_t smem = static_cast<size_t>(plan.smem_bytes);
  SEQGEN_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  int per_sm = 0;
  SEQGEN_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kernel, plan.threads, smem));
  if (static_cast<int64_t>(per_sm) * sms < plan.blocks) {
    throw std::runtime_error(std::string(what) + ": " + std::to_string(plan.blocks) + " blocks of " +
                             std::to_string(plan.threads) + " threads and " + std::to_string(smem) +
                             " bytes of shared memory cannot all be resident (" + std::to_string(per_sm) +
                             " per SM x " + std::to_string(sms) + " SMs); a cooperative launch needs that");
  }
  void* args[] = {&params};
  SEQGEN_CUDA_CHECK(cudaLaunchCooperativeKernel(kernel, dim3(plan.blocks), dim3(plan.threads), args, smem,
                                                as_stream(stream)));
}

SequencePlan checked_plan(const char* what, int device, int dtype, int64_t batch, int64_t hidden, bool backward,
                          DeviceFacts* facts) {
  *facts = device_facts(device);
  if (!facts->cooperative) {
    throw std::runtime_error(std::string(what) + ": device " + std::to_string(device) +
                             " does not support cooperative launches");
  }
  SequencePlan plan = plan_sequence(dtype, hidden, batch, backward, facts->sms, facts->smem_optin);
  if (!plan.reason.empty()) throw std::invalid_argument(std::string(what) + ": " + plan.reason);
  return plan;
}

}  // namespace

SequencePlan plan_sequence(int dtype, int64_t hidden, int64_t batch, bool backward, int sm_count,
                           int64_t smem_per_block) {
  const int elem = element_bytes(dtype, "lstm_sequence_plan");
  require_size("lstm_sequence_plan", "hidden", hidden, 1);
  require_size("lstm_sequence_plan", "batch", batch, 1);
  require_size("lstm_sequence_plan", "sm_count", sm_count, 1);
  SequencePlan plan;
  plan.threads = kSeqThreads;
  plan.units = static_cast<int>(cdiv(hidden, sm_count));
  plan.blocks = static_cast<int>(cdiv(hidden, plan.units));
  plan.batch_step = batch_step_for(batch);
  const int64_t k = backward ? 4 * hidden : hidden;
  const int64_t rows = backward ? round_up(plan.units, kRT) : 4 * plan.units;
  const int x_bytes = backward ? 4 : elem;
  const int64_t k_pad = round_up(k, 16 / elem);
  // Larger batch tiles first (fewer passes per step); the smallest is one warp tile of batch rows.
  int64_t tile = std::min<int64_t>(round_up(batch, plan.batch_step), kMaxBatchTile);
  int64_t need = 0;
  while (true) {
    const int tiles = static_cast<int>(rows / kRT * (tile / plan.batch_step));
    const int ksplit = ksplit_for(tiles, kSeqThreads / 32);
    need = static_cast<int64_t>(SmemLayout(static_cast<int>(rows), static_cast<int>(k_pad), static_cast<int>(tile),
                                           ksplit, static_cast<int>(batch), plan.units, elem, x_bytes).total);
    if (need <= smem_per_block) {
      plan.batch_tile = static_cast<int>(tile);
      plan.ksplit = ksplit;
      plan.k_pad = static_cast<int>(k_pad);
      plan.smem_bytes = need;
      return plan;
    }
    if (tile == plan.batch_step) break;
    tile = round_up(tile / 2, plan.batch_step);
  }
  plan.reason = std::string("the persistent LSTM ") + (backward ? "backward" : "forward") + " kernel needs " +
                std::to_string(need) + " bytes of shared memory per block for hidden=" + std::to_string(hidden) +
                ", batch=" + std::to_string(batch) + " (" + dtype_name(dtype) + "; " +
                std::to_string(plan.units) + " units per block over " + std::to_string(sm_count) +
                " SMs: W_hh slice " + std::to_string(rows * k_pad * elem) + " bytes, fp32 state " +
                std::to_string(batch * plan.units * 4) + " bytes), more than the " + std::to_string(smem_per_block) +
                " the device allows";
  return plan;
}

void sequence_forward(int device, int dtype, int64_t seq_len, int64_t batch, int64_t hidden, std::uintptr_t xg,
                      std::uintptr_t w_hh, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t hs, std::uintptr_t h_n,
                      std::uintptr_t c_n, std::uintptr_t cs, std::uintptr_t gates, std::uintptr_t stream) {
  const char* what = "lstm_sequence_forward";
  element_bytes(dtype, what);
  require_size(what, "seq_len", seq_len, 1);
  require_size(what, "batch", batch, 1);
  require_size(what, "hidden", hidden, 1);
  const NamedPtr ptrs[] = {{"xg", xg}, {"w_hh", w_hh}, {"h0", h0}, {"c0", c0}, {"hs", hs}, {"h_n", h_n}, {"c_n", c_n}};
  for (const auto& [name, ptr] : ptrs) require_ptr(what, name, ptr);
  if ((cs == 0) != (gates == 0)) {
    throw std::invalid_argument(std::string(what) + ": cs and gates must both be given (training) or both be 0");
  }
  DeviceGuard guard(device);
  DeviceFacts facts;
  const SequencePlan plan = checked_plan(what, device, dtype, batch, hidden, false, &facts);
  ForwardParams prm{as_ptr<const void>(xg), as_ptr<const void>(w_hh), as_ptr<const void>(h0), as_ptr<const void>(c0),
                    as_ptr<void>(hs), as_ptr<void>(h_n), as_ptr<void>(c_n), as_ptr<void>(cs), as_ptr<void>(gates),
                    static_cast<int>(seq_len), static_cast<int>(batch), static_cast<int>(hidden), plan.units,
                    plan.batch_tile, plan.ksplit, plan.k_pad};
  dispatch_float_types(dtype, what, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = plan.batch_step == 4 ? lstm_sequence_forward_kernel<T, 4> : lstm_sequence_forward_kernel<T, 1>;
    launch_cooperative(what, kernel, plan, facts.sms, prm, stream);
  });
}

void sequence_backward(int device, int dtype, int64_t seq_len, int64_t batch, int64_t hidden, std::uintptr_t w_hh,
                       std::uintptr_t cs, std::uintptr_t gates, std::uintptr_t c0, std::uintptr_t grad_hs,
                       std::uintptr_t grad_h_n, std::uintptr_t grad_c_n, std::uintptr_t grad_gates,
                       std::uintptr_t grad_h0, std::uintptr_t grad_c0, std::uintptr_t stream) {
  const char* what = "lstm_sequence_backward";
  element_bytes(dtype, what);
  require_size(what, "seq_len", seq_len, 1);
  require_size(what, "batch", batch, 1);
  require_size(what, "hidden", hidden, 1);
  const NamedPtr ptrs[] = {{"w_hh", w_hh}, {"cs", cs}, {"gates", gates}, {"c0", c0}, {"grad_gates", grad_gates},
                          {"grad_h0", grad_h0}, {"grad_c0", grad_c0}};
  for (const auto& [name, ptr] : ptrs) require_ptr(what, name, ptr);
  DeviceGuard guard(device);
  DeviceFacts facts;
  const SequencePlan plan = checked_plan(what, device, dtype, batch, hidden, true, &facts);
  BackwardParams prm{as_ptr<const void>(w_hh), as_ptr<const void>(cs), as_ptr<const void>(gates),
                     as_ptr<const void>(c0), as_ptr<const void>(grad_hs), as_ptr<const void>(grad_h_n),
                     as_ptr<const void>(grad_c_n), as_ptr<float>(grad_gates), as_ptr<void>(grad_h0),
                     as_ptr<void>(grad_c0), static_cast<int>(seq_len), static_cast<int>(batch),
                     static_cast<int>(hidden), plan.units, plan.batch_tile, plan.ksplit, plan.k_pad};
  dispatch_float_types(dtype, what, [&](auto tag) {
    using T = decltype(tag);
    auto kernel = plan.batch_step == 4 ? lstm_sequence_backward_kernel<T, 4> : lstm_sequence_backward_kernel<T, 1>;
    launch_cooperative(what, kernel, plan, facts.sms, prm, stream);
  });
}

void cell_step(int device, int dtype, int64_t batch, int64_t input_size, int64_t hidden, std::uintptr_t x,
               std::uintptr_t h, std::uintptr_t c, std::uintptr_t w_ih, std::uintptr_t w_hh, std::uintptr_t b_ih,
               std::uintptr_t b_hh, std::uintptr_t h1, std::uintptr_t c1, std::uintptr_t stream) {
  const char* what = "lstm_cell_step";
  const int elem = element_bytes(dtype, what);
  require_size(what, "batch", batch, 1);
  require_size(what, "input_size", input_size, 1);
  require_size(what, "hidden", hidden, 1);
  const NamedPtr ptrs[] = {{"x", x}, {"h", h}, {"c", c}, {"w_ih", w_ih}, {"w_hh", w_hh}, {"h1", h1}, {"c1", c1}};
  for (const auto& [name, ptr] : ptrs) require_ptr(what, name, ptr);
  DeviceGuard guard(device);
  int sms = 0;
  SEQGEN_CUDA_CHECK(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  // Two blocks per SM: the step is bound by streaming W_ih and W_hh once.
  const int units = static_cast<int>(cdiv(hidden, 2 * static_cast<int64_t>(sms)));
  const int blocks = static_cast<int>(cdiv(hidden, units));
  const int rows = 4 * units, step = batch_step_for(batch), warps = kCellThreads / 32;
  int64_t tile = std::min<int64_t>(round_up(batch, step), kMaxBatchTile);
  auto smem_for = [&](int64_t tb) {
    return ksplit_for(static_cast<int>(rows / kRT * (tb / step)), warps) * tb * rows * 4;
  };
  while (smem_for(tile) > kCellSmemLimit && tile > step) tile = round_up(tile / 2, step);
  if (smem_for(tile) > kCellSmemLimit) {
    throw std::invalid_argument(std::string(what) + ": hidden=" + std::to_string(hidden) +
                                " needs more than 48 KiB of shared memory per block");
  }
  const int ksplit = ksplit_for(static_cast<int>(rows / kRT * (tile / step)), warps);
  const int vec = 16 / elem;
  const bool aligned = input_size % vec == 0 && hidden % vec == 0 &&
                       ((x | h | w_ih | w_hh) % 16) == 0;
  CellParams prm{as_ptr<const void>(x), as_ptr<const void>(h), as_ptr<const void>(c), as_ptr<const void>(w_ih),
                 as_ptr<const void>(w_hh), as_ptr<const void>(b_ih), as_ptr<const void>(b_hh), as_ptr<void>(h1),
                 as_ptr<void>(c1), static_cast<int>(batch), static_cast<int>(input_size), static_cast<int>(hidden),
                 units, static_cast<int>(tile), ksplit};
  const size_t smem = static_cast<size_t>(smem_for(tile));
  dispatch_float_types(dtype, what, [&](auto tag) {
    using T = decltype(tag);
    constexpr int V = 16 / sizeof(T);
    auto kernel = aligned ? (step == 4 ? lstm_cell_kernel<T, V, 4> : lstm_cell_kernel<T, V, 1>)
                          : (step == 4 ? lstm_cell_kernel<T, 1, 4> : lstm_cell_kernel<T, 1, 1>);
    void* args[] = {&prm};
    SEQGEN_CUDA_CHECK(cudaLaunchKernel(kernel, dim3(blocks), dim3(kCellThreads), args, smem, as_stream(stream)));
  });
}

}  // namespace lstm
}  // namespace seqgen
