// Fused diffusion scheduler step; the contract is in diffusion.h.
//
// Grid (ceil(N / (256 * PACK)), B): each block owns one sample and 256 packs of PACK = 16 / sizeof(T)
// consecutive elements; each thread one pack. The sample's coefficient row is read once per thread
// (the same address for the whole block: one broadcast transaction).
#include "common.cuh"
#include "diffusion.h"

#include <string>
#include <type_traits>

namespace seqgen {
namespace diffusion {
namespace {

constexpr int kThreads = 256;
constexpr int kNcoef = 24;  // row stride of the table (seqgen_fast/_contract.py)
constexpr int kAuxX = 19, kAuxX0 = 20;  // aux = aux_x * x' + aux_x0 * x0c (columns DX, D0)

struct Params {
  const void* x;
  const void* m;
  void* out;
  void* x0;
  const void* noise;
  const float* coef;
  const void* ts;
  const float* guidance;
  const float* model_scale;
  const float* threshold;
  int64_t batch, n, rows, key, ts_stride;
  int ts_dtype, cfg, x0_mode, noise_mode;
  float guidance_scale, clip_range;
  uint64_t seed;
  uint32_t offset;
  const int64_t* rng_offset;  // or null: added to offset on the device (CUDA-graph replays)
};

// Philox4x32-10 (Salmon et al. 2011).
__device__ __forceinline__ uint4 philox(uint4 c, uint32_t k0, uint32_t k1) {
#pragma unroll
  for (int r = 0; r < 10; ++r) {
    const uint32_t lo0 = 0xD2511F53u * c.x, hi0 = __umulhi(0xD2511F53u, c.x);
    const uint32_t lo1 = 0xCD9E8D57u * c.z, hi1 = __umulhi(0xCD9E8D57u, c.z);
    c = make_uint4(hi1 ^ c.y ^ k0, lo1, hi0 ^ c.w ^ k1, lo0);
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  return c;
}

__device__ __forceinline__ float to_uniform(uint32_t w) {
  int x = static_cast<int>(w);
  x = x < 0 ? ~x : x;
  return x * 4.6566127342e-10f;
}

// max(v, lo) by comparison (nvcc compiles it to the NaN-propagating FMNMX.NAN), as every clamp of this
// file: tests/test_fast_math_diffusion.py asserts the SASS holds no NaN-dropping FMNMX (fmaxf's).
__device__ __forceinline__ float at_least(float v, float lo) { return v < lo ? lo : v; }

// c v, but 0 where the coefficient is -0.0, a term the scheduler's formula does not have
// (seqgen_fast.reference.diffusion.times: the same rule), so an inf in v does not become 0 * inf = NaN
// where diffusers never forms that product. A +0.0 coefficient multiplies, as diffusers does.
__device__ __forceinline__ float term(float c, float v) { return c == 0.0f && signbit(c) ? 0.0f : c * v; }

// Four normals for counter (group, b, offset, 0): Box-Muller, z = sqrt(-2 ln u0) (cos, sin)(2 pi u1).
// Fast-math accounting (setup.py: --use_fast_math; the sweep is tests/test_fast_math_diffusion.py):
//   logf    -> __logf = lg2.approx.ftz.f32 * ln 2: documented 2^-22.6 absolute error in log2 (PTX ISA),
//              u0 in [1e-7, 1]. Near u0 = 1 that bound exceeds -log2(u0) itself, so -2 ln u0 is clamped
//              at 0 before the root (else a NaN normal).
//   sincosf -> __sinf / __cosf = sin/cos.approx.ftz.f32: documented 2^-20.5 absolute on [-100 pi, 100 pi];
//              the kernel feeds [0, 2 pi].
//   sqrtf   -> sqrt.approx.ftz.f32 (-prec-sqrt=false): documented 2^-23 relative.
// Measured worst case of a normal at those bounds over the inputs the kernel can feed (the sweep):
// 4.4e-6 absolute where r = sqrt(-2 ln u0) >= 0.1; up to 3.5e-4 absolute where r < 0.1 (u0 > 0.995,
// 0.5% of pairs: the log's absolute bound over 2r), where the normal itself is below 0.1; 1.3e-6
// relative norm over uniform draws. The step's noise term is c[6] z, against the dtype's relative-norm
// tolerance (3e-5 in fp32).
// Every other value of the step is fp32 FMA arithmetic (no approximation; FTZ of subnormal fp32
// intermediates); NaN / inf propagate as in the reference: the clamps below are comparisons.
__device__ __forceinline__ float4 normals4(const Params& p, uint32_t offset, uint32_t group, uint32_t b) {
  const uint4 r = philox(make_uint4(group, b, offset, 0u), static_cast<uint32_t>(p.seed),
                         static_cast<uint32_t>(p.seed >> 32));
  float4 z;
  const float u0 = at_least(to_uniform(r.x), 1e-7f), u2 = at_least(to_uniform(r.z), 1e-7f);
  const float ra = sqrtf(at_least(-2.0f * logf(u0), 0.0f)), rb = sqrtf(at_least(-2.0f * logf(u2), 0.0f));
  float s, c;
  sincosf(6.283185307179586f * to_uniform(r.y), &s, &c);
  z.x = ra * c;
  z.y = ra * s;
  sincosf(6.283185307179586f * to_uniform(r.w), &s, &c);
  z.z = rb * c;
  z.w = rb * s;
  return z;
}

__device__ __forceinline__ float lane(const float4& z, int i) {
  return i == 0 ? z.x : i == 1 ? z.y : i == 2 ? z.z : z.w;
}

__device__ __forceinline__ float read_timestep(const Params& p, int64_t b) {
  const int64_t i = b * p.ts_stride;
  switch (p.ts_dtype) {
    case 0: return static_cast<const float*>(p.ts)[i];
    case 1: return static_cast<float>(static_cast<const int64_t*>(p.ts)[i]);
    default: return static_cast<float>(static_cast<const int32_t*>(p.ts)[i]);  // 2 (step admits 0..2)
  }
}

template <typename T, int PACK>
struct alignas(16) Pack {
  T v[PACK];
};

template <typename T, typename NT, bool VEC>
__global__ void __launch_bounds__(kThreads) step_kernel(Params p) {
  constexpr int PACK = 16 / sizeof(T);
  const int64_t b = blockIdx.y;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x) * PACK;
  if (first >= p.n) return;

  // the sample's coefficient row
  int64_t row = p.key;
  bool valid = row >= 0 && row < p.rows;
  if (p.key < 0) {
    const float t = read_timestep(p, b);
    row = static_cast<int64_t>(t);
    valid = t >= 0.0f && static_cast<float>(row) == t && row < p.rows;
  }
  float c[8];  // the single-step terms: columns 0..7
#pragma unroll
  for (int k = 0; k < 8; ++k) c[k] = valid ? p.coef[row * kNcoef + k] : __int_as_float(0x7fc00000);
  const float aux_x = valid ? p.coef[row * kNcoef + kAuxX] : __int_as_float(0x7fc00000);
  const float aux_x0 = valid ? p.coef[row * kNcoef + kAuxX0] : __int_as_float(0x7fc00000);
  const float g = p.guidance ? p.guidance[b] : p.guidance_scale;
  const float ms = p.model_scale ? p.model_scale[b] : 1.0f;
  const float thr = p.x0_mode == 2 ? p.threshold[b] : 1.0f;

  const int64_t base = b * p.n;
  const T* x = static_cast<const T*>(p.x) + base;
  const T* u = static_cast<const T*>(p.m) + base;
  const T* cc = static_cast<const T*>(p.m) + (b + p.batch) * p.n;
  T* out = static_cast<T*>(p.out) + base;
  T* x0p = p.x0 ? static_cast<T*>(p.x0) + base : nullptr;
  const NT* nz = p.noise_mode == 1 ? static_cast<const NT*>(p.noise) + base : nullptr;

  float xv[PACK], mv[PACK], nv[PACK];
  const int count = p.n - first < PACK ? static_cast<int>(p.n - first) : PACK;
  if (VEC) {
    const Pack<T, PACK> xp = *reinterpret_cast<const Pack<T, PACK>*>(x + first);
    const Pack<T, PACK> up = *reinterpret_cast<const Pack<T, PACK>*>(u + first);
    Pack<T, PACK> cp = up;
    if (p.cfg) cp = *reinterpret_cast<const Pack<T, PACK>*>(cc + first);
#pragma unroll
    for (int i = 0; i < PACK; ++i) {
      xv[i] = to_float(xp.v[i]);
      const float uf = to_float(up.v[i]);
      mv[i] = (p.cfg ? uf + g * (to_float(cp.v[i]) - uf) : uf) * ms;
    }
  } else {
#pragma unroll
    for (int i = 0; i < PACK; ++i) {
      if (i < count) {
        xv[i] = to_float(x[first + i]);
        const float uf = to_float(u[first + i]);
        mv[i] = (p.cfg ? uf + g * (to_float(cc[first + i]) - uf) : uf) * ms;
      } else {
        xv[i] = mv[i] = 0.0f;
      }
    }
  }
  if (p.noise_mode == 1) {
    if constexpr (VEC && std::is_same<NT, T>::value) {
      const Pack<T, PACK> np = *reinterpret_cast<const Pack<T, PACK>*>(nz + first);
#pragma unroll
      for (int i = 0; i < PACK; ++i) nv[i] = to_float(np.v[i]);
    } else {
#pragma unroll
      for (int i = 0; i < PACK; ++i) nv[i] = (VEC || i < count) ? to_float(nz[first + i]) : 0.0f;
    }
  } else if (p.noise_mode == 2) {
    const uint32_t offset = p.offset + (p.rng_offset ? static_cast<uint32_t>(*p.rng_offset) : 0u);
    if (VEC) {  // PACK is a multiple of 4 and `first` too: whole groups
#pragma unroll
      for (int q = 0; q < PACK / 4; ++q) {
        const float4 z = normals4(p, offset, static_cast<uint32_t>((first >> 2) + q), static_cast<uint32_t>(b));
        nv[4 * q] = z.x;
        nv[4 * q + 1] = z.y;
        nv[4 * q + 2] = z.z;
        nv[4 * q + 3] = z.w;
      }
    } else {
#pragma unroll
      for (int i = 0; i < PACK; ++i) {
        const int64_t e = first + i;
        nv[i] = i < count ? lane(normals4(p, offset, static_cast<uint32_t>(e >> 2), static_cast<uint32_t>(b)),
                                 static_cast<int>(e & 3))
                          : 0.0f;
      }
    }
  } else {
#pragma unroll
    for (int i = 0; i < PACK; ++i) nv[i] = 0.0f;
  }

  Pack<T, PACK> op, xo;
#pragma unroll
  for (int i = 0; i < PACK; ++i) {
    const float xi = xv[i] + term(c[7], nv[i]);
    float x0 = term(c[0], xi) + term(c[1], mv[i]);
    // comparisons, not fminf/fmaxf: those drop a NaN operand, and a NaN row (key outside the table)
    // must give a NaN x0 as in the reference, not +-clip_range
    if (p.x0_mode == 1) x0 = x0 < -p.clip_range ? -p.clip_range : x0 > p.clip_range ? p.clip_range : x0;
    else if (p.x0_mode == 2) x0 = (x0 < -thr ? -thr : x0 > thr ? thr : x0) / thr;
    float o = term(c[2], xi) + term(c[3], x0) + term(c[4], mv[i]);
    if (p.noise_mode != 0) o += term(c[6], nv[i]);
    op.v[i] = from_float<T>(o);
    xo.v[i] = from_float<T>(term(aux_x, xi) + term(aux_x0, x0));
  }
  if (VEC) {
    *reinterpret_cast<Pack<T, PACK>*>(out + first) = op;
    if (x0p) *reinterpret_cast<Pack<T, PACK>*>(x0p + first) = xo;
  } else {
#pragma unroll
    for (int i = 0; i < PACK; ++i) {
      if (i < count) {
        out[first + i] = op.v[i];
        if (x0p) x0p[first + i] = xo.v[i];
      }
    }
  }
}

template <typename T, typename NT>
void launch(const Params& p, bool vec, cudaStream_t stream) {
  constexpr int PACK = 16 / sizeof(T);
  const int64_t per_block = static_cast<int64_t>(kThreads) * PACK;
  const dim3 grid(static_cast<unsigned>((p.n + per_block - 1) / per_block), static_cast<unsigned>(p.batch));
  const auto kernel = vec ? step_kernel<T, NT, true> : step_kernel<T, NT, false>;
  SEQGEN_LAUNCH(kernel, grid, kThreads, 0, stream, p);
  SEQGEN_CHECK_LAUNCH("diffusion step_kernel");
}

bool aligned16(std::uintptr_t ptr) { return ptr % 16 == 0; }

}  // namespace

void step(std::uintptr_t sample, std::uintptr_t model_output, std::uintptr_t out, std::uintptr_t x0,
          std::uintptr_t noise, std::uintptr_t coef, std::uintptr_t timesteps, int ts_dtype, int64_t ts_stride,
          std::uintptr_t guidance, std::uintptr_t model_scale, std::uintptr_t threshold, int64_t batch, int64_t n,
          int64_t rows, int64_t key, int cfg, float guidance_scale, int x0_mode, float clip_range, int noise_mode,
          uint64_t seed, uint32_t offset, std::uintptr_t rng_offset, int dtype, int noise_dtype, int device,
          std::uintptr_t stream) {
  if (batch <= 0 || n <= 0) return;
  if (batch > 65535) throw std::invalid_argument("diffusion_step: batch " + std::to_string(batch) + " > 65535");
  if (key < 0 && (timesteps == 0 || ts_dtype < 0 || ts_dtype > 2))
    throw std::invalid_argument("diffusion_step: key < 0 needs timesteps with a dtype code in 0..2 "
                                "(0 float32, 1 int64, 2 int32; got " + std::to_string(ts_dtype) + ")");
  if (x0_mode == 2 && threshold == 0) throw std::invalid_argument("diffusion_step: x0_mode 2 needs threshold");
  if (noise_mode == 1 && noise == 0) throw std::invalid_argument("diffusion_step: noise_mode 1 needs noise");
  const int esize = dtype == kFloat32 ? 4 : 2;
  const int64_t pack = 16 / esize;
  const int nsize = noise_dtype == kFloat32 ? 4 : 2;
  const int64_t packs_per_grid_x = (n + kThreads * pack - 1) / (kThreads * pack);
  if (packs_per_grid_x > 0x7fffffff) throw std::invalid_argument("diffusion_step: sample too large");
  bool vec = n % pack == 0 && aligned16(sample) && aligned16(model_output) && aligned16(out) &&
             (x0 == 0 || aligned16(x0)) && (noise_mode != 1 || (aligned16(noise) && nsize == esize));
  Params p{reinterpret_cast<const void*>(sample), reinterpret_cast<const void*>(model_output),
           reinterpret_cast<void*>(out), reinterpret_cast<void*>(x0), reinterpret_cast<const void*>(noise),
           as_ptr<const float>(coef), reinterpret_cast<const void*>(timesteps), as_ptr<const float>(guidance),
           as_ptr<const float>(model_scale), as_ptr<const float>(threshold), batch, n, rows, key, ts_stride,
           ts_dtype, cfg, x0_mode, noise_mode, guidance_scale, clip_range, seed, offset,
           as_ptr<const int64_t>(rng_offset)};
  DeviceGuard guard(device);
  const cudaStream_t s = as_stream(stream);
  dispatch_float_types(dtype, "diffusion_step", [&](auto tag) {
    using T = decltype(tag);
    if (noise_mode == 1 && noise_dtype != dtype) {
      if (noise_dtype != kFloat32) throw std::invalid_argument("diffusion_step: noise must be float32 or the sample dtype");
      launch<T, float>(p, vec, s);
    } else {
      launch<T, T>(p, vec, s);
    }
  });
}

}  // namespace diffusion
}  // namespace seqgen
