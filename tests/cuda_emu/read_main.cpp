// CPU emulation driver for the Deltaformer read-pass kernels (csrc/deltaformer/read_kernel.cuh): reads the inputs
// written by check_deltaformer_read.py, runs the forward (o, lse) and, on the reference o and lse, the backward
// (read_drow_kernel, then the backward kernel), one OS thread per CUDA thread; writes o, lse, dq, dk, du.
//   read_main <dir> bf16|f16
#include "emu.h"
#include <mutex>
inline float2 make_float2(float a, float b) { return {a, b}; }
inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline float __log2f(float x) { return std::log2(x); }
inline std::mutex g_atomic_mu;  // the block's threads run concurrently: atomics under one lock
inline float atomicAdd(float* a, float v) { std::lock_guard<std::mutex> g(g_atomic_mu); const float o = *a; *a += v; return o; }
inline float2 atomicAdd(float2* a, float2 v) {
  std::lock_guard<std::mutex> g(g_atomic_mu);
  if (reinterpret_cast<uintptr_t>(a) % 8) { std::fprintf(stderr, "atomicAdd(float2): misaligned\n"); std::abort(); }
  const float2 o = *a; a->x += v.x; a->y += v.y; return o;
}
#include "deltaformer/read_kernel.cuh"
#include "driver.h"
#include <fstream>
#include <string>

namespace linflow::deltaformer::rdk { alignas(128) char smem[232448]; }
using namespace linflow::deltaformer;
using namespace linflow::deltaformer::rdk;

template <typename T>
int run(const std::string& d) {
  std::ifstream pf(d + "/params.txt");
  int64_t Tn, H, Hkv, K, V, N, varlen, slots, total;
  float scale;
  pf >> Tn >> H >> Hkv >> K >> V >> N >> varlen >> scale >> slots >> total;
  const size_t nq = total * H * K, nk = total * Hkv * K, nu = total * Hkv * V, no = total * H * V, nr = total * H;
  auto q = rd<T>(d + "/q.bin", nq), k = rd<T>(d + "/k.bin", nk), u = rd<T>(d + "/u.bin", nu);
  auto oref = rd<T>(d + "/oref.bin", no), dout = rd<T>(d + "/do.bin", no);
  auto lseref = rd<float>(d + "/lseref.bin", nr);
  std::vector<int64_t> cu;
  if (varlen) cu = rd<int64_t>(d + "/cu.bin", N + 1);
  std::vector<T> o(no, T{0x7e00});
  std::vector<float> lse(nr, NAN), drow(nr, NAN), dq(nq, 0.f), dk(nk, NAN), du(nu, NAN);
  ReadBwdParams b{};
  ReadFwdParams& p = b.f;
  p.q = q.data(); p.k = k.data(); p.u = u.data(); p.o = o.data(); p.lse = lse.data();
  p.seq = {varlen ? cu.data() : nullptr, varlen ? total : Tn, int(N)};
  p.H = int(H); p.Hkv = int(Hkv); p.K = int(K); p.V = int(V); p.scale = scale;
  b.dout = dout.data(); b.drow = drow.data(); b.dq = dq.data(); b.dk = dk.data(); b.du = du.data();
  // forward on the given inputs; the backward on the reference o, lse (its check independent of the forward's)
  auto dims = [&](auto&& f) {
    using D64 = std::integral_constant<int, 64>;
    using D128 = std::integral_constant<int, 128>;
    if (K <= 64) { if (V <= 64) f(D64{}, D64{}); else f(D64{}, D128{}); }
    else { if (V <= 64) f(D128{}, D64{}); else f(D128{}, D128{}); }
  };
  dims([&](auto kp, auto vp) {
    constexpr int KP = decltype(kp)::value, VP = decltype(vp)::value;
    launch_grid(smem, sizeof(smem), FwdSmem<KP, VP, T>::kBytes, {unsigned(fwd_blocks(p.seq, slots) * p.H), 1, 1},
                kThreads, [&] { read_fwd_kernel<KP, VP, T>(p); });
  });
  wr(d + "/o.out", o); wr(d + "/lse.out", lse);
  ReadBwdParams bb = b;
  bb.f.o = oref.data(); bb.f.lse = lseref.data();
  dims([&](auto kp, auto vp) {
    constexpr int KP = decltype(kp)::value, VP = decltype(vp)::value;
    const int64_t rows = total * H;
    launch_grid(smem, sizeof(smem), 0, {unsigned((rows + 7) / 8), 1, 1}, 256, [&] { read_drow_kernel<T>(bb, rows); });
    launch_grid(smem, sizeof(smem), BwdSmem<KP, VP, T>::kBytes, {unsigned(bwd_blocks(p.seq, slots) * p.Hkv), 1, 1},
                kBwdThreads, [&] { read_bwd_kernel<KP, VP, T>(bb); });
  });
  wr(d + "/dq.out", dq); wr(d + "/dk.out", dk); wr(d + "/du.out", du);
  return 0;
}

int main(int argc, char** argv) {
  return std::string(argv[2]) == "f16" ? run<__half>(argv[1]) : run<__nv_bfloat16>(argv[1]);
}
