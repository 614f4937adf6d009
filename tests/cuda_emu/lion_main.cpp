// CPU emulation driver of the LION sweep kernels (csrc/lion/kernels.cuh): one launch pair (forward sweep, then
// backward sweep) of sweep_kernel in forward mode (GR = 0) or gradient mode (GR = 1), inputs / outputs as raw files
// in a run directory written by check_lion.py.   lion_emu <dir> bf16|f16 <GR>   (-DLION_EMU_SMALL: K, V <= 64)
#include "emu.h"
#include "lion/kernels.cuh"
#include "driver.h"
#include <fstream>
#include <string>

namespace linflow::lion { alignas(128) char smem[232448]; }
using namespace linflow::lion;


template <int KP, int NW, bool BWD, typename T, bool GR>
void launch(const FwdParams& p, int nvt, int H, int N) {
  const size_t sm = SweepSmem<KP, NW, T>::bytes(BWD, p.rowx != nullptr);
  constexpr int NT = NW * 32;
  launch_grid(smem, sizeof(smem), sm, {unsigned(nvt), unsigned(H), unsigned(N)}, NT,
              [&] { sweep_kernel<KP, NW, BWD, T, GR>(p); });
}

template <typename T, bool GR>
void run_pair(const FwdParams& p, int KP, int NW, int nvt, int H, int N) {
  auto go = [&](auto kp, auto nw) {
    constexpr int KP_ = decltype(kp)::value, NW_ = decltype(nw)::value;
    launch<KP_, NW_, false, T, GR>(p, nvt, H, N);
    launch<KP_, NW_, true, T, GR>(p, nvt, H, N);
  };
  using I64 = std::integral_constant<int, 64>;
  using I128 = std::integral_constant<int, 128>;
  using W4 = std::integral_constant<int, 4>;
  using W8 = std::integral_constant<int, 8>;
#ifdef LION_EMU_SMALL  // quick build: K, V <= 64 only (KP 64, 4 warps)
  if (KP != 64 || NW != 4) { std::fprintf(stderr, "LION_EMU_SMALL build: K, V <= 64 only\n"); std::exit(1); }
  go(I64{}, W4{});
#else
  if (KP == 64) { if (NW == 4) go(I64{}, W4{}); else go(I64{}, W8{}); }
  else { if (NW == 4) go(I128{}, W4{}); else go(I128{}, W8{}); }
#endif
}

template <typename T>
int run(const std::string& d, bool gr) {
  std::ifstream pf(d + "/params.txt");
  int64_t N, total, H, K, V, normalize, varlen, Tdense, decay, ext, has_a, has_b, has_rowx, want_diag, has_dg, cols,
      shift;
  float scale, eps;
  pf >> N >> total >> H >> K >> V >> normalize >> scale >> eps >> varlen >> Tdense >> decay >> ext >> has_a >> has_b >>
      has_rowx >> want_diag >> has_dg >> cols >> shift;
  const size_t nk = total * H * K, nv = total * H * V, nt = total * H;
  auto q = rd<T>(d + "/q.bin", nk), k = rd<T>(d + "/k.bin", nk), v = rd<T>(d + "/v.bin", nv);
  std::vector<float> g, gb, lam, ea, eb, rq, hv, qk;
  std::vector<int64_t> cu;
  std::vector<T> rowx;
  if (decay == 2) { g = rd<float>(d + "/g.bin", nt); gb = rd<float>(d + "/gb.bin", nt); }
  if (decay == 1) lam = rd<float>(d + "/lam_log.bin", H);
  if (varlen) cu = rd<int64_t>(d + "/cu.bin", N + 1);
  if (has_a) ea = rd<float>(d + "/ea.bin", nt);
  if (has_b) eb = rd<float>(d + "/eb.bin", nt);
  if (has_rowx) rowx = rd<T>(d + "/rowx.bin", nv);
  if (has_dg) { rq = rd<float>(d + "/rq.bin", nt); hv = rd<float>(d + "/hv.bin", nt); qk = rd<float>(d + "/qk.bin", nt); }
  const int BV = int(cols), NW = BV / 16, KP = K <= 64 ? 64 : 128, nvt = int((V + BV - 1) / BV);
  const int64_t slots = linflow::chunk::num_slots(varlen, varlen ? total : Tdense, N);
  std::vector<float> part(slots * H * nvt * C * BV, NAN), den(slots * H * C, NAN);
  std::vector<T> o(nv, T{0x7e00});  // NaN in fp16 and bf16
  std::vector<float> rowdot(nt, NAN), diag(nt, NAN), dg(nt, NAN);
  FwdParams p{};
  p.q = q.data(); p.k = k.data(); p.v = v.data();
  p.gf = decay == 2 ? g.data() : nullptr;
  p.gb = decay == 2 ? gb.data() : nullptr;
  p.lam_log = decay == 1 ? lam.data() : nullptr;
  p.gf_shift = shift != 0;
  p.o = o.data(); p.part = part.data(); p.den = normalize ? den.data() : nullptr;
  p.seq = {varlen ? cu.data() : nullptr, varlen ? total : Tdense, int(N)};
  p.H = int(H); p.K = int(K); p.V = int(V);
  p.scale = scale; p.eps = eps; p.normalize = normalize != 0;
  p.vec_k = K % 8 == 0; p.vec_v = V % 8 == 0; p.block_columns = BV;
  p.rowx = has_rowx ? rowx.data() : nullptr;
  p.rowdot = has_rowx ? rowdot.data() : nullptr;  // with dg too (the check reads rk for its floor)
  p.diag = want_diag ? diag.data() : nullptr;
  if (has_dg) { p.rq = rq.data(); p.hv = hv.data(); p.qk = qk.data(); p.dg = dg.data(); }
  p.ext = ext != 0;
  p.ext_a = has_a ? ea.data() : nullptr;
  p.ext_b = has_b ? eb.data() : nullptr;
  if (gr) run_pair<T, true>(p, KP, NW, nvt, int(H), int(N));
  else run_pair<T, false>(p, KP, NW, nvt, int(H), int(N));
  wr(d + "/o.out", o); wr(d + "/rowdot.out", rowdot); wr(d + "/diag.out", diag); wr(d + "/dg.out", dg);
  return 0;
}

int main(int argc, char** argv) {
  const bool gr = std::atoi(argv[3]) != 0;
  return std::string(argv[2]) == "f16" ? run<__half>(argv[1], gr) : run<__nv_bfloat16>(argv[1], gr);
}
