// GRU kernels: the GRU cell policy of the persistent recurrence machinery (csrc/recurrence.cuh: work
// split, tensor-core and FFMA products, the release/acquire flag handoff between blocks, the
// one-launch step) and the GRU's launchers, which say where their pointers go and hand the rest to
// the shared host side (csrc/recurrence_launch.cuh). Layouts and the math are stated in gru.h.
// Fast math (--use_fast_math): the only approximations are those of recurrence.cuh's sigmoid and
// tanh_f32 (__expf = ex2.approx.ftz, the reciprocal = rcp.approx.ftz, FTZ); their documented bounds,
// measured worst cases (tanh_f32 6.6e-7 relative, sigmoid 2.1e-7 absolute) and sweeps are stated
// there. The products run in fp32 FMA / tensor-core MMA with fp32 accumulation; no min/max touches a
// value, so NaN and inf propagate through the recurrence as in torch.
#include "common.cuh"
#include "gru.h"
#include "recurrence.cuh"
#include "recurrence_launch.cuh"

namespace seqgen {
namespace gru {
namespace {

using recurrence::SeqArgs;
using recurrence::StepArgs;
using recurrence::sigmoid;
using recurrence::tanh_f32;

// The GRU as a cell policy of recurrence.cuh (interface documented there). Slots of SeqArgs:
// xg = x W_ih^T + b_ih, b_rec = b_hh (added to the recurrent product, so that b_hn sits inside
// r * (W_hn h + b_hn)), saved[0] = act [T,B,4H] (r, z, n, hg^n), no second state (s0, s_n, grad_s_n,
// grad_s0 unused); carry = h_{t-1} in fp32 (forward) and dL/dh_t through step t+1's z * h_t term
// (backward); the backward reads h_{t-1} from hs / h0, writes d_rec = dL/dhg and d_xg = dL/dxg.
struct GruCell {
  static constexpr int kGates = 3;
  static constexpr const char* kName = "GRU";
  static constexpr const char* kFamily = "gru";

  // act = (r, z, n, hg^n) from xg and hg = h W_hh^T + b_hh; returns h_t = n + z (h - n).
  __device__ static float pointwise(const float (&x)[3], const float (&hg)[3], float h, float (&act)[4]) {
    act[0] = sigmoid(x[0] + hg[0]);
    act[1] = sigmoid(x[1] + hg[1]);
    act[2] = tanh_f32(x[2] + act[0] * hg[2]);
    act[3] = hg[2];
    return act[2] + act[1] * (h - act[2]);
  }

  struct FwdIn { float x[3], b[3]; };
  template <typename T>
  __device__ static FwdIn load_forward(const SeqArgs& a, int H, int64_t row, int j) {
    const T* x = static_cast<const T*>(a.xg) + row * 3 * H + j;
    const T* b = static_cast<const T*>(a.b_rec);
    FwdIn in;
#pragma unroll
    for (int g = 0; g < 3; ++g) {
      in.x[g] = to_float(x[g * H]);
      in.b[g] = b != nullptr ? to_float(b[g * H + j]) : 0.f;
    }
    return in;
  }
  template <typename T>
  __device__ static float step_forward(const SeqArgs& a, int H, const FwdIn& in, const float (&rec)[3], float& h,
                                       int64_t row, int j) {
    const float hg[3] = {rec[0] + in.b[0], rec[1] + in.b[1], rec[2] + in.b[2]};
    float act[4];
    h = pointwise(in.x, hg, h, act);
    if (a.saved[0] != nullptr) {
      T* saved = static_cast<T*>(a.saved[0]) + row * 4 * H + j;
#pragma unroll
      for (int g = 0; g < 4; ++g) saved[g * H] = from_float<T>(act[g]);
    }
    return h;
  }
  template <typename T>
  __device__ static float initial_carry(const SeqArgs& a, int, int64_t bh) {
    return to_float(static_cast<const T*>(a.h0)[bh]);
  }
  template <typename T>
  __device__ static void finish_forward(const SeqArgs& a, int, int64_t bh, float h, float) {
    static_cast<T*>(a.h_n)[bh] = from_float<T>(h);
  }

  struct BwdIn { float act[4], h_prev, dh; };
  template <typename T>
  __device__ static BwdIn load_backward(const SeqArgs& a, int H, int64_t row, int64_t prev_row, int64_t bh, int j) {
    const T* act = static_cast<const T*>(a.saved[0]) + row * 4 * H + j;
    const T* grad_hs = static_cast<const T*>(a.grad_hs);
    BwdIn in;
#pragma unroll
    for (int g = 0; g < 4; ++g) in.act[g] = to_float(act[g * H]);
    const T* h_prev = prev_row >= 0 ? static_cast<const T*>(a.hs) + prev_row * H + j : static_cast<const T*>(a.h0) + bh;
    in.h_prev = to_float(*h_prev);
    in.dh = grad_hs != nullptr ? to_float(grad_hs[row * H + j]) : 0.f;
    return in;
  }
  // dh = dh_in + grad_hs[t] + carry; d_xg = (dr, dz, dn), d_hg = (dr, dz, dn r) with dn = dh (1-z)(1-n^2),
  // dz = dh (h_{t-1} - n) z(1-z), dr = dn hg^n r(1-r); the carry becomes dh z.
  template <typename T>
  __device__ static void step_backward(const SeqArgs& a, int H, const BwdIn& in, float dh_in, float& carry, int64_t row,
                                       int j) {
    const float r = in.act[0], z = in.act[1], n = in.act[2], hn = in.act[3];
    const float dh = dh_in + in.dh + carry;
    const float dn = dh * (1.f - z) * (1.f - n * n);
    const float dz = dh * (in.h_prev - n) * z * (1.f - z);
    const float dr = dn * hn * r * (1.f - r);
    T* dx = static_cast<T*>(a.d_xg) + row * 3 * H + j;
    T* dg = static_cast<T*>(a.d_rec) + row * 3 * H + j;
    dx[0] = dg[0] = from_float<T>(dr);
    dx[H] = dg[H] = from_float<T>(dz);
    dx[2 * H] = from_float<T>(dn);
    dg[2 * H] = from_float<T>(dn * r);
    carry = dh * z;
  }
  template <typename T>
  __device__ static float initial_carry_backward(const SeqArgs&, int, int64_t) {
    return 0.f;  // grad_h_n arrives as dh_in of the last step
  }
  template <typename T>
  __device__ static void finish_backward(const SeqArgs& a, int, int64_t bh, float dh_in, float carry) {
    static_cast<T*>(a.grad_h0)[bh] = from_float<T>(dh_in + carry);
  }

  // x = x W_ih^T + b_ih, rec = h W_hh^T + b_hh; h in, h_1 out (and returned).
  __device__ static float cell_step(const float (&x)[3], const float (&rec)[3], float& h) {
    float act[4];
    h = pointwise(x, rec, h, act);
    return h;
  }
};

}  // namespace

recurrence::SequencePlan plan_sequence(int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                                       int sm_count, int64_t smem_per_block) {
  return recurrence::plan_sequence<GruCell>(dtype, hidden, batch, backward, math, sm_count, smem_per_block);
}

recurrence::SequencePlan check_sequence(int device, int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                                        std::uintptr_t stream) {
  return recurrence::check_sequence<GruCell>(device, dtype, hidden, batch, backward, math, stream);
}

void sequence_forward(int device, int dtype, int math, int64_t seq_len, int64_t batch, int64_t hidden,
                      std::uintptr_t xg, std::uintptr_t w_hh, std::uintptr_t b_hh, std::uintptr_t h0,
                      std::uintptr_t hs, std::uintptr_t h_n, std::uintptr_t act, std::uintptr_t flags,
                      int64_t flag_count, std::uintptr_t stream) {
  const char* what = "gru_sequence_forward";
  recurrence::require_codes_and_sizes(what, dtype, math, false,
                                      {{"seq_len", seq_len}, {"batch", batch}, {"hidden", hidden}});
  recurrence::require_ptrs(what, {{"xg", xg}, {"w_hh", w_hh}, {"h0", h0}, {"hs", hs}, {"h_n", h_n}, {"flags", flags}});
  SeqArgs a{};
  a.xg = as_ptr<const void>(xg), a.w = as_ptr<const void>(w_hh), a.b_rec = as_ptr<const void>(b_hh);
  a.h0 = as_ptr<const void>(h0), a.hs = as_ptr<void>(hs), a.h_n = as_ptr<void>(h_n), a.saved[0] = as_ptr<void>(act);
  recurrence::launch_sequence<GruCell>(what, device, dtype, math, seq_len, batch, hidden, false, a, flags, flag_count,
                                       stream);
}

void sequence_backward(int device, int dtype, int math, int64_t seq_len, int64_t batch, int64_t hidden,
                       std::uintptr_t w_hh, std::uintptr_t hs, std::uintptr_t act, std::uintptr_t h0,
                       std::uintptr_t grad_hs, std::uintptr_t grad_h_n, std::uintptr_t d_xg, std::uintptr_t d_hg,
                       std::uintptr_t grad_h0, std::uintptr_t flags, int64_t flag_count, std::uintptr_t stream) {
  const char* what = "gru_sequence_backward";
  recurrence::require_codes_and_sizes(what, dtype, math, false,
                                      {{"seq_len", seq_len}, {"batch", batch}, {"hidden", hidden}});
  recurrence::require_ptrs(what, {{"w_hh", w_hh}, {"hs", hs}, {"act", act}, {"h0", h0}, {"d_xg", d_xg},
                                  {"d_hg", d_hg}, {"grad_h0", grad_h0}, {"flags", flags}});
  SeqArgs a{};
  a.w = as_ptr<const void>(w_hh), a.hs = as_ptr<void>(hs), a.h0 = as_ptr<const void>(h0);
  a.saved[0] = as_ptr<void>(act), a.grad_hs = as_ptr<const void>(grad_hs), a.grad_h_n = as_ptr<const void>(grad_h_n);
  a.d_rec = as_ptr<void>(d_hg), a.d_xg = as_ptr<void>(d_xg), a.grad_h0 = as_ptr<void>(grad_h0);
  recurrence::launch_sequence<GruCell>(what, device, dtype, math, seq_len, batch, hidden, true, a, flags, flag_count,
                                       stream);
}

void cell_step(int device, int dtype, int math, int64_t batch, int64_t input_size, int64_t hidden, std::uintptr_t x,
               std::uintptr_t h, std::uintptr_t w_ih, std::uintptr_t w_hh, std::uintptr_t b_ih, std::uintptr_t b_hh,
               std::uintptr_t h1, std::uintptr_t stream) {
  const char* what = "gru_cell_step";
  recurrence::require_codes_and_sizes(what, dtype, math, true,
                                      {{"batch", batch}, {"input_size", input_size}, {"hidden", hidden}});
  recurrence::require_ptrs(what, {{"x", x}, {"h", h}, {"w_ih", w_ih}, {"w_hh", w_hh}, {"h1", h1}});
  // the carry of the step is h itself (s = h); the GRU has no second state to write (s1 = null)
  const StepArgs a{as_ptr<const void>(x), as_ptr<const void>(h), as_ptr<const void>(h), as_ptr<const void>(w_ih),
                   as_ptr<const void>(w_hh), as_ptr<const void>(b_ih), as_ptr<const void>(b_hh), as_ptr<void>(h1),
                   nullptr};
  recurrence::launch_step<GruCell>(what, device, dtype, math, batch, input_size, hidden, a, stream);
}

}  // namespace gru
}  // namespace seqgen
