// CPU emulation driver for the Deltaformer write-pass backward kernels (csrc/deltaformer/write_bwd_kernel.cuh):
// reads the inputs written by check_deltaformer_write_bwd.py, runs write_bwd_dv_kernel over (sequence, head) and
// write_bwd_pair_kernel<false / true> over (chunk slot, head), one OS thread per CUDA thread, writes the outputs.
#include "emu.h"
inline float2 make_float2(float a, float b) { return {a, b}; }
inline void __threadfence_block() {}
// gridDim: shim/emu.h
#include "deltaformer/write_bwd_kernel.cuh"
#include "driver.h"
#include <fstream>
#include <functional>
#include <string>

namespace linflow::deltaformer::wbwd { alignas(128) char smem[232448]; }
using namespace linflow::deltaformer::wbwd;


// One launch: grid (gx, gy) of 256-thread blocks.
void launch(size_t sm, int64_t gx, int gy, const std::function<void()>& kern) {
  launch_grid(smem, sizeof(smem), sm, {unsigned(gx), unsigned(gy), 1}, 256, kern);
}

template <int K, int V, typename bf>
void run_all(WriteBwdParams& p, int64_t N, int64_t slots, int H) {
  launch(DvSmem<K, V, bf>::total, N, H, [&] { write_bwd_dv_kernel<K, V, bf>(p); });
  launch(PairSmem<K, V, bf>::total, slots, H, [&] { write_bwd_pair_kernel<K, V, bf, false>(p); });
  launch(PairSmem<K, V, bf>::total, slots, H, [&] { write_bwd_pair_kernel<K, V, bf, true>(p); });
}

template <typename bf, int K>
void by_v(WriteBwdParams& p, int64_t V, int64_t N, int64_t slots, int H) {
  if (V == 32) run_all<K, 32, bf>(p, N, slots, H);
  else if (V == 64) run_all<K, 64, bf>(p, N, slots, H);
  else run_all<K, 128, bf>(p, N, slots, H);
}

template <typename bf>
int run(int argc, char** argv) {
  const std::string d = argv[1];
  std::ifstream pf(d + "/params.txt");
  int64_t T, H, K, V, N, varlen, has_beta, has_w, slots, total;
  float scale;
  pf >> T >> H >> K >> V >> N >> varlen >> has_beta >> has_w >> scale >> slots >> total;
  const size_t nk = total * H * K, nv = total * H * V, nt = total * H;
  auto k = rd<bf>(d + "/k.bin", nk), u16 = rd<bf>(d + "/u16.bin", nv);
  std::vector<bf> w;
  if (has_w) w = rd<bf>(d + "/w.bin", nk);
  std::vector<float> beta;
  if (has_beta) beta = rd<float>(d + "/beta.bin", nt);
  auto lse = rd<float>(d + "/lse.bin", nt);
  auto r = rd<float>(d + "/r.bin", nv), du = rd<float>(d + "/du.bin", nv);
  std::vector<int64_t> cu;
  if (varlen) cu = rd<int64_t>(d + "/cu.bin", N + 1);
  std::vector<bf> b16(nv, bf{0x7e00});
  std::vector<float> dv(nv, NAN), dbeta(nt, NAN), delta(nt, NAN), dw(nk, NAN), dk(nk, NAN);
  WriteBwdParams p{};
  p.k = k.data(); p.w = has_w ? w.data() : k.data(); p.u16 = u16.data(); p.b16 = b16.data();
  p.beta = has_beta ? beta.data() : nullptr;
  p.lse = lse.data(); p.r = r.data(); p.du = du.data();
  p.dv = dv.data(); p.dbeta = dbeta.data(); p.delta = delta.data(); p.dw = dw.data(); p.dk = dk.data();
  p.seq = {varlen ? cu.data() : nullptr, varlen ? total : T, int(N)};
  p.H = int(H); p.sl2 = scale * kLog2e; p.scale = scale;
  if (K == 32) by_v<bf, 32>(p, V, N, slots, int(H));
  else if (K == 64) by_v<bf, 64>(p, V, N, slots, int(H));
  else by_v<bf, 128>(p, V, N, slots, int(H));
  wr(d + "/dv.out", dv); wr(d + "/dbeta.out", dbeta); wr(d + "/dw.out", dw); wr(d + "/dk.out", dk);
  return 0;
}

int main(int argc, char** argv) {
  return std::string(argv[2]) == "f16" ? run<__half>(argc, argv) : run<__nv_bfloat16>(argc, argv);
}
