// LSTM kernels: the LSTM cell policy of the persistent recurrence machinery (csrc/recurrence.cuh:
// work split, tensor-core and FFMA products, the release/acquire flag handoff between blocks, the
// one-launch step) and the LSTM's launchers, which say where their pointers go and hand the rest to
// the shared host side (csrc/recurrence_launch.cuh: plans, residency checks, kernel instances,
// launches). Layouts and the math are stated in lstm.h.
// Fast math (--use_fast_math): the only approximations are those of recurrence.cuh's sigmoid and
// tanh_f32 (__expf = ex2.approx.ftz, the reciprocal = rcp.approx.ftz, FTZ); their documented bounds,
// measured worst cases (tanh_f32 6.6e-7 relative, sigmoid 2.1e-7 absolute) and sweeps are stated
// there. The products run in fp32 FMA / tensor-core MMA with fp32 accumulation; no min/max touches a
// value, so NaN and inf propagate through the recurrence as in torch.
#include "common.cuh"
#include "lstm.h"
#include "recurrence.cuh"
#include "recurrence_launch.cuh"

namespace seqgen {
namespace lstm {
namespace {

using recurrence::SeqArgs;
using recurrence::StepArgs;
using recurrence::sigmoid;
using recurrence::tanh_f32;

// The LSTM as a cell policy of recurrence.cuh (interface documented there). Slots of SeqArgs:
// xg = x W_ih^T + b_ih + b_hh (b_rec unused), s0/s_n = c0/c_n, saved = {cs [T,B,H], activated gates
// [T,B,4H]}, carry = c (forward) and dL/dc (backward), d_rec = grad_gates (= dL/dxg; d_xg unused),
// grad_s_n / grad_s0 = grad_c_n / grad_c0.
struct LstmCell {
  static constexpr int kGates = 4;
  static constexpr const char* kName = "LSTM";
  static constexpr const char* kFamily = "lstm";

  // c <- f c + i g; act = (i, f, g, o); returns h = o tanh(c).
  __device__ static float pointwise(const float (&x)[4], const float (&rec)[4], float& c, float (&act)[4]) {
    act[0] = sigmoid(x[0] + rec[0]);
    act[1] = sigmoid(x[1] + rec[1]);
    act[2] = tanh_f32(x[2] + rec[2]);
    act[3] = sigmoid(x[3] + rec[3]);
    c = act[1] * c + act[0] * act[2];
    return act[3] * tanh_f32(c);
  }

  struct FwdIn { float x[4]; };
  template <typename T>
  __device__ static FwdIn load_forward(const SeqArgs& a, int H, int64_t row, int j) {
    const T* x = static_cast<const T*>(a.xg) + row * 4 * H + j;
    return {{to_float(x[0]), to_float(x[H]), to_float(x[2 * H]), to_float(x[3 * H])}};
  }
  template <typename T>
  __device__ static float step_forward(const SeqArgs& a, int H, const FwdIn& in, const float (&rec)[4], float& c,
                                       int64_t row, int j) {
    float act[4];
    const float h = pointwise(in.x, rec, c, act);
    if (a.saved[0] != nullptr) {
      static_cast<T*>(a.saved[0])[row * H + j] = from_float<T>(c);
      T* gates = static_cast<T*>(a.saved[1]) + row * 4 * H + j;
#pragma unroll
      for (int g = 0; g < 4; ++g) gates[g * H] = from_float<T>(act[g]);
    }
    return h;
  }
  template <typename T>
  __device__ static float initial_carry(const SeqArgs& a, int, int64_t bh) {
    return to_float(static_cast<const T*>(a.s0)[bh]);
  }
  template <typename T>
  __device__ static void finish_forward(const SeqArgs& a, int, int64_t bh, float h, float c) {
    static_cast<T*>(a.h_n)[bh] = from_float<T>(h);
    static_cast<T*>(a.s_n)[bh] = from_float<T>(c);
  }

  struct BwdIn { float act[4], c, c_prev, dh; };
  template <typename T>
  __device__ static BwdIn load_backward(const SeqArgs& a, int H, int64_t row, int64_t prev_row, int64_t bh, int j) {
    const T* cs = static_cast<const T*>(a.saved[0]);
    const T* gates = static_cast<const T*>(a.saved[1]) + row * 4 * H + j;
    const T* grad_hs = static_cast<const T*>(a.grad_hs);
    BwdIn in;
#pragma unroll
    for (int g = 0; g < 4; ++g) in.act[g] = to_float(gates[g * H]);
    in.c = to_float(cs[row * H + j]);
    in.c_prev = to_float(prev_row >= 0 ? cs[prev_row * H + j] : static_cast<const T*>(a.s0)[bh]);
    in.dh = grad_hs != nullptr ? to_float(grad_hs[row * H + j]) : 0.f;
    return in;
  }
  // dc_t = dc + dh o (1 - tanh^2 c_t); grad_gates = (dc_t g i(1-i), dc_t c_{t-1} f(1-f), dc_t i (1-g^2),
  // dh tanh(c_t) o(1-o)); the carry becomes dL/dc_{t-1} = dc_t f.
  template <typename T>
  __device__ static void step_backward(const SeqArgs& a, int H, const BwdIn& in, float dh_in, float& dc, int64_t row,
                                       int j) {
    const float i = in.act[0], f = in.act[1], g = in.act[2], o = in.act[3];
    const float dh = dh_in + in.dh, tc = tanh_f32(in.c);
    const float dct = dc + dh * o * (1.f - tc * tc);
    T* dg = static_cast<T*>(a.d_rec) + row * 4 * H + j;
    dg[0] = from_float<T>(dct * g * i * (1.f - i));
    dg[H] = from_float<T>(dct * in.c_prev * f * (1.f - f));
    dg[2 * H] = from_float<T>(dct * i * (1.f - g * g));
    dg[3 * H] = from_float<T>(dh * tc * o * (1.f - o));
    dc = dct * f;
  }
  template <typename T>
  __device__ static float initial_carry_backward(const SeqArgs& a, int, int64_t bh) {
    return a.grad_s_n != nullptr ? to_float(static_cast<const T*>(a.grad_s_n)[bh]) : 0.f;
  }
  template <typename T>
  __device__ static void finish_backward(const SeqArgs& a, int, int64_t bh, float dh_in, float dc) {
    static_cast<T*>(a.grad_h0)[bh] = from_float<T>(dh_in);
    static_cast<T*>(a.grad_s0)[bh] = from_float<T>(dc);
  }

  __device__ static float cell_step(const float (&x)[4], const float (&rec)[4], float& c) {
    float act[4];
    return pointwise(x, rec, c, act);
  }
};

}  // namespace

SequencePlan plan_sequence(int dtype, int64_t hidden, int64_t batch, bool backward, int math, int sm_count,
                           int64_t smem_per_block) {
  return recurrence::plan_sequence<LstmCell>(dtype, hidden, batch, backward, math, sm_count, smem_per_block);
}

SequencePlan check_sequence(int device, int dtype, int64_t hidden, int64_t batch, bool backward, int math,
                            std::uintptr_t stream) {
  return recurrence::check_sequence<LstmCell>(device, dtype, hidden, batch, backward, math, stream);
}

void sequence_forward(int device, int dtype, int math, int64_t seq_len, int64_t batch, int64_t hidden,
                      std::uintptr_t xg, std::uintptr_t w_hh, std::uintptr_t h0, std::uintptr_t c0, std::uintptr_t hs,
                      std::uintptr_t h_n, std::uintptr_t c_n, std::uintptr_t cs, std::uintptr_t gates,
                      std::uintptr_t flags, int64_t flag_count, std::uintptr_t stream) {
  const char* what = "lstm_sequence_forward";
  recurrence::require_codes_and_sizes(what, dtype, math, false,
                                      {{"seq_len", seq_len}, {"batch", batch}, {"hidden", hidden}});
  recurrence::require_ptrs(what, {{"xg", xg}, {"w_hh", w_hh}, {"h0", h0}, {"c0", c0}, {"hs", hs}, {"h_n", h_n},
                                  {"c_n", c_n}, {"flags", flags}});
  if ((cs == 0) != (gates == 0)) {
    throw std::invalid_argument(std::string(what) + ": cs and gates must both be given (training) or both be 0");
  }
  SeqArgs a{};
  a.xg = as_ptr<const void>(xg), a.w = as_ptr<const void>(w_hh), a.h0 = as_ptr<const void>(h0);
  a.s0 = as_ptr<const void>(c0), a.hs = as_ptr<void>(hs), a.h_n = as_ptr<void>(h_n), a.s_n = as_ptr<void>(c_n);
  a.saved[0] = as_ptr<void>(cs), a.saved[1] = as_ptr<void>(gates);
  recurrence::launch_sequence<LstmCell>(what, device, dtype, math, seq_len, batch, hidden, false, a, flags, flag_count,
                                        stream);
}

void sequence_backward(int device, int dtype, int math, int64_t seq_len, int64_t batch, int64_t hidden,
                       std::uintptr_t w_hh, std::uintptr_t cs, std::uintptr_t gates, std::uintptr_t c0,
                       std::uintptr_t grad_hs, std::uintptr_t grad_h_n, std::uintptr_t grad_c_n,
                       std::uintptr_t grad_gates, std::uintptr_t grad_h0, std::uintptr_t grad_c0,
                       std::uintptr_t flags, int64_t flag_count, std::uintptr_t stream) {
  const char* what = "lstm_sequence_backward";
  recurrence::require_codes_and_sizes(what, dtype, math, false,
                                      {{"seq_len", seq_len}, {"batch", batch}, {"hidden", hidden}});
  recurrence::require_ptrs(what, {{"w_hh", w_hh}, {"cs", cs}, {"gates", gates}, {"c0", c0}, {"grad_gates", grad_gates},
                                  {"grad_h0", grad_h0}, {"grad_c0", grad_c0}, {"flags", flags}});
  SeqArgs a{};
  a.w = as_ptr<const void>(w_hh), a.s0 = as_ptr<const void>(c0);
  a.saved[0] = as_ptr<void>(cs), a.saved[1] = as_ptr<void>(gates);
  a.grad_hs = as_ptr<const void>(grad_hs), a.grad_h_n = as_ptr<const void>(grad_h_n);
  a.grad_s_n = as_ptr<const void>(grad_c_n), a.d_rec = as_ptr<void>(grad_gates);
  a.grad_h0 = as_ptr<void>(grad_h0), a.grad_s0 = as_ptr<void>(grad_c0);
  recurrence::launch_sequence<LstmCell>(what, device, dtype, math, seq_len, batch, hidden, true, a, flags, flag_count,
                                        stream);
}

void cell_step(int device, int dtype, int math, int64_t batch, int64_t input_size, int64_t hidden, std::uintptr_t x,
               std::uintptr_t h, std::uintptr_t c, std::uintptr_t w_ih, std::uintptr_t w_hh, std::uintptr_t b_ih,
               std::uintptr_t b_hh, std::uintptr_t h1, std::uintptr_t c1, std::uintptr_t stream) {
  const char* what = "lstm_cell_step";
  recurrence::require_codes_and_sizes(what, dtype, math, true,
                                      {{"batch", batch}, {"input_size", input_size}, {"hidden", hidden}});
  recurrence::require_ptrs(what,
                           {{"x", x}, {"h", h}, {"c", c}, {"w_ih", w_ih}, {"w_hh", w_hh}, {"h1", h1}, {"c1", c1}});
  const StepArgs a{as_ptr<const void>(x), as_ptr<const void>(h), as_ptr<const void>(c), as_ptr<const void>(w_ih),
                   as_ptr<const void>(w_hh), as_ptr<const void>(b_ih), as_ptr<const void>(b_hh), as_ptr<void>(h1),
                   as_ptr<void>(c1)};
  recurrence::launch_step<LstmCell>(what, device, dtype, math, batch, input_size, hidden, a, stream);
}

}  // namespace lstm
}  // namespace seqgen
