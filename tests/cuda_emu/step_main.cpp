// CPU emulation check of the delta-rule decode step kernels (csrc/delta_rule/step_kernel.cuh and step_kernel_v2.cuh):
// random inputs with odd strides, dtypes, gates, state indices (int32 / int64, padding rows), T across the staging
// chunks; each kernel runs on the emulation of shim/emu.h (static __shared__ arrays shared by the block's threads,
// blocks one at a time) and is compared with a float64 transcription of the recurrence. Built by check_step.py.
#include "emu.h"
#undef __shared__
#define __shared__ static
template <class X> inline X __ldcs(const X* p) { return *p; }
template <class X> inline void __stcs(X* p, X v) { *p = v; }
#include "delta_rule/step_kernel.cuh"
#include "delta_rule/step_kernel_v2.cuh"
#include "driver.h"

#include <random>
#include <string>

using namespace linflow::delta_rule;
alignas(128) char g_smem[16];

template <typename X> X enc(float f);
template <> float enc<float>(float f) { return f; }
template <> __nv_bfloat16 enc<__nv_bfloat16>(float f) { return __float2bfloat16(f); }
template <> __half enc<__half>(float f) { return __float2half(f); }
template <typename X> float dec(X x) { return linflow::tile::to_f(x); }
template <> float dec<float>(float x) { return x; }

// A strided [D0, D1, D2(, D3)] tensor of X: values (rounded to X) kept as float for the reference.
template <typename X> struct Strided {
  std::vector<X> buf; std::vector<int64_t> st; std::vector<int64_t> dim;
  Strided(std::vector<int64_t> d, bool odd, std::mt19937& g, float lo, float hi) : dim(d) {
    st.assign(d.size(), 1);
    const int64_t pad = odd ? 2 : 1;  // odd: every other element along the last dim, gaps between the others
    st.back() = pad;
    for (int i = int(d.size()) - 2; i >= 0; --i) st[i] = st[i + 1] * d[i + 1] + (odd ? 3 : 0);
    buf.assign(st[0] * d[0] + 8, enc<X>(NAN));
    std::uniform_real_distribution<float> u(lo, hi);
    std::vector<int64_t> i(d.size(), 0);
    for (bool more = true; more;) {
      buf[off(i)] = enc<X>(u(g));
      for (int a = int(d.size()) - 1; a >= 0; --a) { if (++i[a] < d[a]) break; i[a] = 0; if (a == 0) more = false; }
    }
  }
  int64_t off(const std::vector<int64_t>& i) const { int64_t o = 0; for (size_t a = 0; a < i.size(); ++a) o += i[a] * st[a]; return o; }
  double at(std::vector<int64_t> i) const { return dec(buf[off(i)]); }
};

template <typename T, typename BK, typename GK>
bool run_case(const char* name, int v2, int B, int T_, int H, int K, int V, bool gated, int idx_mode, bool odd,
              unsigned seed) {
  std::mt19937 g(seed);
  Strided<T> q({B, T_, H, K}, odd, g, -1, 1), k({B, T_, H, K}, odd, g, -0.15f, 0.15f), v({B, T_, H, V}, odd, g, -1, 1);
  Strided<BK> beta({B, T_, H}, odd, g, 0.1f, 0.9f);
  Strided<GK> gg({B, T_, H}, odd, g, -0.5f, 0.f);
  const int N = B + 2;
  std::vector<int64_t> idx(B);  // idx_mode 0: none (N = B); 1: int32, 2: int64 (reversed rows, row 1 padding)
  for (int b = 0; b < B; ++b) idx[b] = idx_mode ? (b == 1 ? -1 : N - 1 - b) : b;
  std::vector<int32_t> idx32(idx.begin(), idx.end());
  const int Nst = idx_mode ? N : B;
  std::vector<float> state(size_t(Nst) * H * K * V);
  std::uniform_real_distribution<float> u(-1, 1);
  for (auto& x : state) x = u(g);
  std::vector<double> ref_state(state.begin(), state.end());
  std::vector<double> ref_o(size_t(B) * T_ * H * V, 0.0);
  const double scale = 1.0 / std::sqrt(double(K));
  for (int b = 0; b < B; ++b) {
    if (idx[b] < 0) continue;
    for (int h = 0; h < H; ++h) {
      double* S = &ref_state[((idx[b] * H) + h) * size_t(K) * V];
      for (int t = 0; t < T_; ++t) {
        const double a = gated ? std::exp(gg.at({b, t, h})) : 1.0, bt = beta.at({b, t, h});
        for (auto i = 0; i < K * V; ++i) S[i] *= a;
        for (int c = 0; c < V; ++c) {
          double sk = 0; for (int r = 0; r < K; ++r) sk += S[r * V + c] * k.at({b, t, h, r});
          const double d = bt * (v.at({b, t, h, c}) - sk);
          for (int r = 0; r < K; ++r) S[r * V + c] += k.at({b, t, h, r}) * d;
          double oq = 0; for (int r = 0; r < K; ++r) oq += S[r * V + c] * q.at({b, t, h, r});
          ref_o[((size_t(b) * T_ + t) * H + h) * V + c] = scale * oq;
        }
      }
    }
  }
  std::vector<T> o(size_t(B) * T_ * H * V, enc<T>(NAN));
  StepParams p{};
  p.q = q.buf.data(); p.k = k.buf.data(); p.v = v.buf.data(); p.beta = beta.buf.data();
  p.g = gated ? gg.buf.data() : nullptr;
  p.state_indices = idx_mode == 1 ? static_cast<const void*>(idx32.data()) : idx_mode == 2 ? idx.data() : nullptr;
  p.state = state.data(); p.o = o.data();
  for (int d = 0; d < 4; ++d) p.q_stride[d] = q.st[d], p.k_stride[d] = k.st[d], p.v_stride[d] = v.st[d];
  for (int d = 0; d < 3; ++d) p.beta_stride[d] = beta.st[d], p.g_stride[d] = gg.st[d];
  p.idx_stride = 1; p.idx64 = idx_mode == 2; p.N = Nst;
  p.B = B; p.T = T_; p.H = H; p.K = K; p.V = V; p.scale = float(scale);
  auto kind = [](auto x) { using X = decltype(x); return std::is_same_v<X, float> ? Elem::f32 : std::is_same_v<X, __half> ? Elem::f16 : Elem::bf16; };
  p.beta_kind = kind(BK{}); p.g_kind = kind(GK{});
  p.vec_state = V % 4 == 0;
  if (v2) {
    if (!step2::covers(p)) { std::printf("%s: not covered by v2\n", name); return false; }
    const int LC = step2::lanes_per_row(K, V), R = step2::rows_per_thread(K, LC);
    const unsigned blocks = unsigned((V + 4 * LC - 1) / (4 * LC) * H * B);
    auto go = [&](auto kern) { launch_grid(g_smem, sizeof(g_smem), 0, {blocks, 1, 1}, step2::kThreads, [&] { kern(p); }); };
    if (LC == 32) { if (R == 4) go(step_kernel_v2<32, 4, T>); else if (R == 8) go(step_kernel_v2<32, 8, T>); else go(step_kernel_v2<32, 16, T>); }
    else { if (R == 4) go(step_kernel_v2<16, 4, T>); else if (R == 8) go(step_kernel_v2<16, 8, T>); else go(step_kernel_v2<16, 16, T>); }
  } else {
    const unsigned blocks = unsigned((V + 31) / 32 * H * B);
    auto go = [&](auto kern) { launch_grid(g_smem, sizeof(g_smem), 0, {blocks, 1, 1}, step::kThreads, [&] { kern(p); }); };
    switch (step::rows_per_thread(K)) { case 1: go(step_kernel<1, T>); break; case 2: go(step_kernel<2, T>); break;
      case 4: go(step_kernel<4, T>); break; default: go(step_kernel<8, T>); }
  }
  double eo = 0, es = 0, mo = 0;
  int nan = 0;
  for (size_t i = 0; i < o.size(); ++i) {
    const double x = dec(o[i]);
    if (std::isnan(x)) ++nan;
    eo = std::max(eo, std::abs(x - ref_o[i])); mo = std::max(mo, std::abs(ref_o[i]));
  }
  for (size_t i = 0; i < state.size(); ++i) es = std::max(es, std::abs(double(state[i]) - ref_state[i]));
  const double otol = std::is_same_v<T, float> ? 1e-4 : std::is_same_v<T, __half> ? 2e-3 : 1e-2;
  const bool ok = nan == 0 && eo <= otol * std::max(1.0, mo) && es <= 1e-4;
  std::printf("  %-34s %s  o err %.2e (max |o| %.2f)  state err %.2e  nan %d  %s\n", name, v2 ? "v2" : "v1", eo, mo, es,
              nan, ok ? "ok" : "FAIL");
  return ok;
}

int main() {
  bool ok = true;
  for (int v2 = 0; v2 < 2; ++v2) {
    using bf = __nv_bfloat16;
    ok &= run_case<bf, bf, bf>("K128 V128 T1 bf16 gated idx32", v2, 3, 1, 2, 128, 128, true, 1, false, 1);
    ok &= run_case<float, float, float>("K128 V128 T11 f32 strided", v2, 2, 11, 2, 128, 128, false, 0, true, 2);
    ok &= run_case<__half, float, bf>("K256 V256 T3 f16 gated idx64 strd", v2, 3, 3, 1, 256, 256, true, 2, true, 3);
    ok &= run_case<bf, bf, float>("K100 V36 T2 bf16 gated idx32", v2, 3, 2, 2, 100, 36, true, 1, false, 4);
    ok &= run_case<float, __half, __half>("K16 V160 T9 f32 gated strided", v2, 2, 9, 1, 16, 160, true, 0, true, 5);
    ok &= run_case<bf, bf, bf>("K64 V96 T1 bf16 idx64", v2, 3, 1, 3, 64, 96, false, 2, false, 6);
    ok &= run_case<__half, __half, __half>("K200 V128 T2 f16 gated", v2, 2, 2, 1, 200, 128, true, 0, false, 7);
  }
  std::printf(ok ? "ALL OK\n" : "SOME FAILED\n");
  return ok ? 0 : 1;
}
