// Warp-level tensor-core products for the recurrent kernels: operand fragments and the k-loop of one
// warp tile, built on the mma / ldmatrix primitives of common.cuh (fragment layouts stated there).
//
// A warp tile is MT m-tiles (16 rows of A each) x NTW n-tiles (8 columns each) over a range of k-tiles:
//   acc[m][n] += A[16m .. 16m+15][k] * X[8n .. 8n+7][k]^T      (fp32 accumulators, 4 per lane per tile)
// A ("the weights") is row-major [rows][k]; X ("the inputs": batch rows of h or of the gate gradients)
// is row-major [columns][k], i.e. the column-major k x n operand mma.row.col takes. Element types:
//   __half / __nv_bfloat16: mma.m16n8k16 on the storage type;
//   float: mma.m16n8k8 on tf32 (operands rounded with cvt.rna, as cuBLAS does for TF32 GEMMs).
// A comes either from shared memory through ldmatrix (the persistent kernels keep the W_hh slice
// there) or straight from global memory (the one-step cell kernel reads each weight once); X always
// comes from global memory through L2 (ld.cg: other blocks wrote it), without shared-memory staging.
#pragma once

#include "common.cuh"

namespace seqgen {
namespace mma {

// Per storage type: the mma k-tile, the shared-memory element of A, and the packing of operands.
template <typename T> struct Traits;
template <> struct Traits<__half> {
  using Tag = MmaF16;
  using SmemA = __half;  // A in shared memory: the storage type itself
  static constexpr int kK = 16;
  __device__ static uint32_t bits(__half x) { return *reinterpret_cast<const unsigned short*>(&x); }
};
template <> struct Traits<__nv_bfloat16> {
  using Tag = MmaBF16;
  using SmemA = __nv_bfloat16;
  static constexpr int kK = 16;
  __device__ static uint32_t bits(__nv_bfloat16 x) { return *reinterpret_cast<const unsigned short*>(&x); }
};
template <> struct Traits<float> {
  using SmemA = uint32_t;  // tf32 bit patterns, rounded once when the slice is loaded
  static constexpr int kK = 8;
};

__device__ __forceinline__ unsigned short load_cg_bits(const __half* p) {
  return __ldcg(reinterpret_cast<const unsigned short*>(p));
}
__device__ __forceinline__ unsigned short load_cg_bits(const __nv_bfloat16* p) {
  return __ldcg(reinterpret_cast<const unsigned short*>(p));
}

// Elements k, k+1 of `row` packed in one register (zero past K or for a null row). `vec`: the pair is
// 4-byte aligned whenever k is even (even row stride, aligned base), so one 32-bit load serves.
template <typename T>
__device__ __forceinline__ uint32_t load_pair(const T* row, int k, int K, bool vec) {
  if (row == nullptr) return 0u;
  if (vec && k + 1 < K) return __ldcg(reinterpret_cast<const unsigned*>(row + k));
  const uint32_t lo = k < K ? load_cg_bits(row + k) : 0u;
  const uint32_t hi = k + 1 < K ? load_cg_bits(row + k + 1) : 0u;
  return lo | hi << 16;
}
__device__ __forceinline__ uint32_t load_tf32(const float* row, int k, int K) {
  return (row != nullptr && k < K) ? to_tf32(__ldcg(row + k)) : 0u;
}

// The X fragment of one n-tile at k-tile k0: `row` is this lane's column of X (column 8n + lane / 4
// of the tile), null past the last column.
template <typename T>
__device__ __forceinline__ void load_x(uint32_t (&b)[2], const T* row, int k0, int K, bool vec) {
  const int q = (threadIdx.x % 32) % 4;
  if constexpr (sizeof(T) == 4) {
    b[0] = load_tf32(row, k0 + q, K);
    b[1] = load_tf32(row, k0 + q + 4, K);
  } else {
    b[0] = load_pair(row, k0 + 2 * q, K, vec);
    b[1] = load_pair(row, k0 + 2 * q + 8, K, vec);
  }
}

// The A fragment of one m-tile at k-tile k0 from global memory: `lo` and `hi` are this lane's rows
// g and g + 8 of the tile (null: a zero row).
template <typename T>
__device__ __forceinline__ void load_a_global(uint32_t (&a)[4], const T* lo, const T* hi, int k0, int K, bool vec) {
  const int q = (threadIdx.x % 32) % 4;
  if constexpr (sizeof(T) == 4) {
    a[0] = load_tf32(lo, k0 + q, K);
    a[1] = load_tf32(hi, k0 + q, K);
    a[2] = load_tf32(lo, k0 + q + 4, K);
    a[3] = load_tf32(hi, k0 + q + 4, K);
  } else {
    a[0] = load_pair(lo, k0 + 2 * q, K, vec);
    a[1] = load_pair(hi, k0 + 2 * q, K, vec);
    a[2] = load_pair(lo, k0 + 2 * q + 8, K, vec);
    a[3] = load_pair(hi, k0 + 2 * q + 8, K, vec);
  }
}

// The A fragment of the m-tile of rows row0 .. row0+15 at k-tile k0, through one ldmatrix.x4 from
// shared memory: A's rows are `lda` elements apart (16-byte aligned) and row `zero_row` is all zeros:
// the lanes of rows past it name it. Lanes 0-15 name rows 0-15 at k0, lanes 16-31 the same rows at
// k0 + kK / 2 (matrices a0..a3 in order).
template <typename T>
__device__ __forceinline__ void load_a_smem(uint32_t (&a)[4], const typename Traits<T>::SmemA* a_s, int lda, int row0,
                                            int zero_row, int k0) {
  const int lane = threadIdx.x % 32, row = min(row0 + lane % 16, zero_row);
  ldmatrix_x4(a, a_s + static_cast<size_t>(row) * lda + k0 + (lane / 16) * (Traits<T>::kK / 2));
}

template <typename T>
__device__ __forceinline__ void mma_tile(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  if constexpr (sizeof(T) == 4) {
    mma_m16n8k8_tf32(d, a, b);
  } else {
    mma_m16n8k16(typename Traits<T>::Tag{}, d, a, b);
  }
}

// acc += the warp tile over k-tiles [kt0, kt1). load_a(a, m, k0) fills the A fragment of m-tile m at
// element k0; x[n] is this lane's column of n-tile n. The X fragments of KC k-tiles are loaded before
// their products (16 registers in flight per lane), so each warp keeps several L2 reads outstanding.
template <typename T, int MT, int NTW, class LoadA>
__device__ __forceinline__ void warp_tile(float (&acc)[MT][NTW][4], LoadA&& load_a, const T* const (&x)[NTW],
                                          int kt0, int kt1, int K, bool vec) {
  constexpr int kK = Traits<T>::kK;
  constexpr int KC = NTW >= 4 ? 2 : 8 / NTW;
  for (int kc = kt0; kc < kt1; kc += KC) {
    uint32_t b[KC][NTW][2];
#pragma unroll
    for (int i = 0; i < KC; ++i)
#pragma unroll
      for (int n = 0; n < NTW; ++n) {
        if (kc + i < kt1) {
          load_x(b[i][n], x[n], (kc + i) * kK, K, vec);
        } else {
          b[i][n][0] = b[i][n][1] = 0u;
        }
      }
#pragma unroll
    for (int i = 0; i < KC; ++i) {
      if (kc + i < kt1) {  // uniform over the warp
        uint32_t a[MT][4];
#pragma unroll
        for (int m = 0; m < MT; ++m) load_a(a[m], m, (kc + i) * kK);
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
          for (int n = 0; n < NTW; ++n) mma_tile<T>(acc[m][n], a[m], b[i][n]);
      }
    }
  }
}

// Writes the warp tile's accumulators to part[row][col] (row stride ldp floats): row 16m + g (+8),
// column col0 + 8n + 2q (+1), g = lane / 4, q = lane % 4.
template <int MT, int NTW>
__device__ __forceinline__ void store_tile(const float (&acc)[MT][NTW][4], float* part, int ldp, int col0) {
  const int lane = threadIdx.x % 32, g = lane / 4, q = lane % 4;
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int n = 0; n < NTW; ++n)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        part[static_cast<size_t>(16 * m + g + 8 * (i / 2)) * ldp + col0 + 8 * n + 2 * q + i % 2] = acc[m][n][i];
      }
}

// One warp's share of part = A X^T: columns col0 .. col0 + 8*NTW - 1 of X (rows of `x`, stride ldx,
// the first n valid; null past them) over k-tiles [kt0, kt1), stored to part (row stride ldp).
template <typename T, int MT, int NTW, class LoadA>
__device__ __forceinline__ void tile_product(float* part, int ldp, LoadA&& load_a, const T* x, int64_t ldx, int n,
                                             int col0, int kt0, int kt1, int K, bool vec) {
  const int lane = threadIdx.x % 32;
  const T* xr[NTW];
#pragma unroll
  for (int t = 0; t < NTW; ++t) {
    const int c = col0 + 8 * t + lane / 4;
    xr[t] = c < n ? x + c * ldx : nullptr;
  }
  float acc[MT][NTW][4];
#pragma unroll
  for (int m = 0; m < MT; ++m)
#pragma unroll
    for (int t = 0; t < NTW; ++t)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[m][t][i] = 0.f;
  warp_tile<T, MT, NTW>(acc, load_a, xr, kt0, kt1, K, vec);
  store_tile(acc, part, ldp, col0);
}

}  // namespace mma
}  // namespace seqgen
