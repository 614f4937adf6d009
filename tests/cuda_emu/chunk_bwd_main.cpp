#include "emu.h"
#include "delta_rule/kernels_bwd.cuh"
#include "driver.h"
#include <fstream>
#include <string>

namespace linflow::delta_rule { alignas(128) char smem[232448]; }
using namespace linflow::delta_rule;

// wy_fwd (the backward's recompute: stores Tm into b.f.tm), then chunk_bwd (a persistent grid of `blocks` blocks,
// each walking items blockIdx.x, + blocks, ...).
template <int KP, typename bf>
void run_all(BwdParams& b, int64_t slots, int H, int blocks) {
  const size_t wm = WyFwdSmem<KP, bf>::carve(nullptr, nullptr);
  launch_grid(smem, sizeof(smem), wm, {unsigned(slots), unsigned(H), 1}, 256, [&] { wy_fwd_kernel<KP, bf>(b.f); });
  {
    const size_t sm = ChunkBwdSmem<KP, bf>::carve(nullptr, nullptr);
    const int64_t items = slots * H;
    const unsigned g = unsigned(blocks < items ? blocks : items);
    std::printf("KP %d smem %zu bytes, %u blocks for %lld items\n", KP, sm, g, (long long)items);
    b.slots = slots;
    launch_grid(smem, sizeof(smem), sm, {g, 1, 1}, 256, [&] { chunk_bwd_kernel<KP, bf>(b); });
  }
}

template <typename bf>
int run(int argc, char** argv) {
  const std::string d = argv[1];
  std::ifstream pf(d + "/params.txt");
  int64_t B, T, H, K, V, N, varlen, gated, slots, total;
  float scale;
  pf >> B >> T >> H >> K >> V >> N >> varlen >> gated >> scale >> slots >> total;
  const size_t nk = total * H * K, nv = total * H * V, ns = slots * H * K * V, nt = total * H;
  auto q = rd<bf>(d + "/q.bin", nk), k = rd<bf>(d + "/k.bin", nk);
  auto v = rd<bf>(d + "/v.bin", nv), vn = rd<bf>(d + "/vn.bin", nv), dout = rd<bf>(d + "/dout.bin", nv),
       dvn = rd<bf>(d + "/dvn.bin", nv);
  auto h = rd<bf>(d + "/h.bin", ns), dh = rd<bf>(d + "/dh.bin", ns);
  auto beta = rd<float>(d + "/beta.bin", nt);
  std::vector<float> g;
  if (gated) g = rd<float>(d + "/g.bin", nt);
  std::vector<int64_t> cu;
  if (varlen) cu = rd<int64_t>(d + "/cu.bin", N + 1);
  std::vector<bf> dq(nk, bf{0x7e00}), dk(nk, bf{0x7e00}), dv(nv, bf{0x7e00});  // NaN in fp16 and bf16
  std::vector<bf> w(nk, bf{0x7e00}), u(nv, bf{0x7e00}), tm(total * H * 64, bf{0x7e00});
  std::vector<float> dbeta(nt, NAN), dg(nt, NAN);
  BwdParams b{};
  FwdParams& p = b.f;
  p.q = q.data(); p.k = k.data(); p.v = v.data(); p.beta = beta.data(); p.g = gated ? g.data() : nullptr;
  p.vn = vn.data(); p.h = h.data(); p.w = w.data(); p.u = u.data(); p.tm = tm.data();
  p.seq = {varlen ? cu.data() : nullptr, varlen ? total : T, int(N)};
  p.H = int(H); p.K = int(K); p.V = int(V); p.scale = scale;
  p.vec_k = K % 8 == 0; p.vec_v = V % 8 == 0;
  b.dout = dout.data(); b.dh = dh.data(); b.dvn = dvn.data();
  b.dq = dq.data(); b.dk = dk.data(); b.dv = dv.data(); b.dbeta = dbeta.data(); b.dg = gated ? dg.data() : nullptr;
  const int blocks = std::atoi(argv[3]);
  if (K <= 64) run_all<64, bf>(b, slots, int(H), blocks); else run_all<128, bf>(b, slots, int(H), blocks);
  wr(d + "/tm.out", tm); wr(d + "/w.out", w); wr(d + "/u.out", u);
  wr(d + "/dq.out", dq); wr(d + "/dk.out", dk); wr(d + "/dv.out", dv); wr(d + "/dbeta.out", dbeta);
  wr(d + "/dg.out", dg);
  return 0;
}

int main(int argc, char** argv) {
  return std::string(argv[2]) == "f16" ? run<__half>(argc, argv) : run<__nv_bfloat16>(argc, argv);
}
