// The two sequential chunk passes of the delta rule on Hopper's warpgroup MMA (sm_90a; same math and names as
// state_mma.cuh). A block is one warpgroup owning a 64-column slice of the K x V state of one (sequence, head):
// warp w keeps state columns 16 w.. transposed, S^T (16 x KP fp32), in registers for the whole sequence, which is
// exactly the wgmma accumulator layout of a 64 x KP product, and packs it to the A operand of the next product.
// B operands are the chunk's W / K / Q tiles, streamed by cp.async (two stages) into the SW128 layout:
//   forward,  chunk c:  X = S^T W^T          (64 x C,  B = W  "k-major", KP / 16 k-steps)
//                       Vn^T = U^T - X;      S^T = e^gC S^T + (Vn^T diag(kd)) K   (64 x KP, B = K  "mn-major")
//   backward, chunk c:  Y = dS^T K^T;        dVn^T = (P^T dO)^T + diag(kd) Y
//                       dS^T = e^gC dS^T + (dO^T diag(s e^gamma)) Q - dVn^T W      (64 x KP, B = Q, W  "mn-major")
// Per chunk one block barrier and two wgmma groups; the state stores (h_c / dh_c) and the gate scan run while the
// first group is on the tensor cores. Against the mma.sync passes: the tile's B fragments are read from shared
// memory once per block instead of once per warp, and a k-step is one instruction for the warpgroup.
#pragma once
#include "common/wgmma.cuh"
#include "delta_rule/state_mma.cuh"

namespace linflow::delta_rule {

constexpr int kWgColumns = 64;  // state columns a block (4 warps x 16)

template <int KP, typename T>
struct StateWgSmem {  // per stage: X0..X2 (SW128, C x KP: W, K [, Q]), Y0, Y1 (C x 64, padded: U [, or dO, P^T dO]), g
  T *X[3][2], *Y[2][2];
  float* g[2];
  // Bytes from a 1024-aligned base; the launcher adds wgmma::kAlign for the kernel's own alignment of the base.
  __host__ __device__ static size_t carve(char* base, StateWgSmem* s, int nx, int ny) {
    SmemCarver sc{base};
    StateWgSmem t{};
    for (int b = 0; b < 2; ++b)
      for (int i = 0; i < nx; ++i) t.X[i][b] = sc.take<T>(C * KP);  // multiples of 1024 bytes: stay aligned
    for (int b = 0; b < 2; ++b) {
      for (int i = 0; i < ny; ++i) t.Y[i][b] = sc.take<T>(C * ld_h(kWgColumns));
      t.g[b] = sc.take<float>(C);
    }
    if (s) *s = t;
    return sc.used;
  }
};

__device__ __forceinline__ char* align_smem(char* p) {
  return reinterpret_cast<char*>((reinterpret_cast<uintptr_t>(p) + wgmma::kAlign - 1) & ~uintptr_t(wgmma::kAlign - 1));
}

// S^T (64 x KP accumulators) packed to KP / 16 A fragments.
template <int KP, typename T>
__device__ __forceinline__ void state_to_a(uint32_t (&a)[KP / 16][4], const float (&S)[KP / 8][4]) {
#pragma unroll
  for (int kb = 0; kb < KP / 16; ++kb) mma::acc_to_a<T>(a[kb], S, kb);
}

// out = a . X^T (64 x C), X an SW128 C x KP tile: issued and committed, not waited for.
template <int KP, typename T>
__device__ __forceinline__ void issue_times_rows(float (&out)[C / 8][4], const uint32_t (&a)[KP / 16][4], const T* X) {
  wgmma::fence();
#pragma unroll
  for (int kb = 0; kb < KP / 16; ++kb) wgmma::mma_m64n64<false, T>(out, a[kb], wgmma::b_kmajor<C>(X, kb), kb > 0);
  wgmma::commit();
}

// acc += a[rb] . X[16 rb.., :] over the chunk's rows (64 x KP), X an SW128 C x KP tile; not committed.
template <int KP, typename T>
__device__ __forceinline__ void issue_rows_times(float (&acc)[KP / 8][4], const uint32_t (&a)[C / 16][4], const T* X) {
#pragma unroll
  for (int rb = 0; rb < C / 16; ++rb) {
    if constexpr (KP == 64) {
      wgmma::mma_m64n64<true, T>(acc, a[rb], wgmma::b_mnmajor<C>(X, rb), true);
    } else {
      wgmma::mma_m64n128<true, T>(acc, a[rb], wgmma::b_mnmajor<C>(X, rb), true);
    }
  }
}

template <int KP, typename T>
__global__ void __launch_bounds__(128) state_fwd_wg_kernel(FwdParams p) {
  constexpr int BV = kWgColumns, NT = 128, NK = KP / 8, NR = C / 8;
  extern __shared__ __align__(128) char smem_raw[];
  StateWgSmem<KP, T> s;
  StateWgSmem<KP, T>::carve(align_smem(smem_raw), &s, 2, 1);
  const StateBlock<4> sb(p);
  const int v0 = sb.v0, h = sb.h, n = sb.n, cols = sb.cols, ua = sb.ua, ub = sb.ub;
  const int64_t H = p.H, K = p.K, V = p.V, bos = sb.bos, slot0 = sb.slot0, nc = sb.nc;
  auto prefetch = [&](int64_t c) {
    const int b = c & 1, rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    wgmma::fetch_tile_sw128<C, KP, T, NT>(pick(s.X[0], b), static_cast<const T*>(p.w) + (tok0 * H + h) * K, H * K, rows,
                                          p.K, p.vec_k);
    wgmma::fetch_tile_sw128<C, KP, T, NT>(pick(s.X[1], b), static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows,
                                          p.K, p.vec_k);
    tile::fetch_tile<C, BV, T, NT>(pick(s.Y[0], b), static_cast<const T*>(p.u) + (tok0 * H + h) * V + v0, H * V, rows,
                                   cols, sb.vec_v);
    if (p.g) tile::fetch_column<C, NT>(pick(s.g, b), p.g + tok0 * H + h, H, rows);
    tile::cp_async_commit();
  };
  float S[NK][4];
  load_state(S, p.h0 ? p.h0 + (n * H + h) * K * V : nullptr, p.K, p.V, v0 + ua, v0 + ub);
  if (nc > 0) prefetch(0);
  for (int64_t c = 0; c < nc; ++c) {
    const int b = c & 1, rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    tile::cp_async_wait<0>();
    wgmma::fence_proxy_async();  // the tiles cp.async wrote are read by the tensor cores
    __syncthreads();             // chunk c's tiles landed; every warp is done with chunk c - 1's buffer
    if (c + 1 < nc) prefetch(c + 1);
    const T *W = pick(s.X[0], b), *Kt = pick(s.X[1], b), *U = pick(s.Y[0], b);
    uint32_t sa[KP / 16][4];
    state_to_a<KP, T>(sa, S);
    float X[NR][4];
    issue_times_rows<KP, T>(X, sa, W);  // X = S^T W^T on the tensor cores while h_c and the gates are handled
    store_state(static_cast<T*>(p.h) + ((slot0 + c) * H + h) * K * V, S, p.K, p.V, v0 + ua, v0 + ub);
    RowGates gt;
    gt.load(p.g ? pick(s.g, b) : nullptr);
    wgmma::wait<0>();
    wgmma::fence_operand(X);
    combine_rows<BV, T>(X, U, static_cast<T*>(p.vn) + (tok0 * H + h) * V + v0, H * V, ua, ub, rows, cols,
                        [](float u, float ws, int, int) { return u - ws; });  // Vn^T = U^T - S^T W^T
    uint32_t va[C / 16][4];
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb) mma::acc_to_a_scaled<T>(va[rb], X, gt.kd, rb);
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[j][e] *= gt.eC;
    wgmma::fence();
    issue_rows_times<KP, T>(S, va, Kt);  // S^T += (Vn^T diag(kd)) K
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operand(S);
  }
  if (p.ht) store_state(p.ht + (n * H + h) * K * V, S, p.K, p.V, v0 + ua, v0 + ub);
}

template <int KP, typename T>
__global__ void __launch_bounds__(128) state_bwd_wg_kernel(BwdParams bp) {
  constexpr int BV = kWgColumns, NT = 128, NK = KP / 8, NR = C / 8;
  extern __shared__ __align__(128) char smem_raw[];
  const FwdParams& p = bp.f;
  StateWgSmem<KP, T> s;
  StateWgSmem<KP, T>::carve(align_smem(smem_raw), &s, 3, 2);
  const StateBlock<4> sb(p);
  const int v0 = sb.v0, h = sb.h, n = sb.n, cols = sb.cols, ua = sb.ua, ub = sb.ub, warp = sb.warp;
  const int64_t H = p.H, K = p.K, V = p.V, bos = sb.bos, slot0 = sb.slot0, nc = sb.nc;
  auto prefetch = [&](int64_t c) {
    const int b = c & 1, rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    wgmma::fetch_tile_sw128<C, KP, T, NT>(pick(s.X[0], b), static_cast<const T*>(p.w) + (tok0 * H + h) * K, H * K, rows,
                                          p.K, p.vec_k);
    wgmma::fetch_tile_sw128<C, KP, T, NT>(pick(s.X[1], b), static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows,
                                          p.K, p.vec_k);
    wgmma::fetch_tile_sw128<C, KP, T, NT>(pick(s.X[2], b), static_cast<const T*>(p.q) + (tok0 * H + h) * K, H * K, rows,
                                          p.K, p.vec_k);
    tile::fetch_tile<C, BV, T, NT>(pick(s.Y[0], b), static_cast<const T*>(bp.dout) + (tok0 * H + h) * V + v0, H * V,
                                   rows, cols, sb.vec_v);
    tile::fetch_tile<C, BV, T, NT>(pick(s.Y[1], b), static_cast<const T*>(bp.dvl) + (tok0 * H + h) * V + v0, H * V,
                                   rows, cols, sb.vec_v);
    if (p.g) tile::fetch_column<C, NT>(pick(s.g, b), p.g + tok0 * H + h, H, rows);
    tile::cp_async_commit();
  };
  float dS[NK][4];
  load_state(dS, bp.dht ? bp.dht + (n * H + h) * K * V : nullptr, p.K, p.V, v0 + ua, v0 + ub);
  if (nc > 0) prefetch(nc - 1);
  for (int64_t c = nc - 1; c >= 0; --c) {
    const int b = c & 1, rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    tile::cp_async_wait<0>();
    wgmma::fence_proxy_async();
    __syncthreads();
    if (c > 0) prefetch(c - 1);
    const T *W = pick(s.X[0], b), *Kt = pick(s.X[1], b), *Q = pick(s.X[2], b);
    const T *dO = pick(s.Y[0], b), *dvl = pick(s.Y[1], b);
    uint32_t sa[KP / 16][4];
    state_to_a<KP, T>(sa, dS);
    float Y[NR][4];
    issue_times_rows<KP, T>(Y, sa, Kt);  // Y = dS^T K^T
    store_state(static_cast<T*>(bp.dh) + ((slot0 + c) * H + h) * K * V, dS, p.K, p.V, v0 + ua, v0 + ub);
    RowGates gt;
    gt.load(p.g ? pick(s.g, b) : nullptr);
    uint32_t da[C / 16][4];  // dO^T diag(s e^gamma): columns r = 16 rb + 8 (i / 2) + 2 t (+1)
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb) {
      mma::a_from_cols(da[rb], dO, ld_h(BV), 16 * warp, 16 * rb);
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = mma::unpack2<T>(da[rb][i]);
        const int j = 2 * rb + i / 2;
        da[rb][i] = mma::pack2<T>(f.x * p.scale * gt.eg[j][0], f.y * p.scale * gt.eg[j][1]);
      }
    }
    wgmma::wait<0>();
    wgmma::fence_operand(Y);
    combine_rows<BV, T>(Y, dvl, static_cast<T*>(bp.dvn) + (tok0 * H + h) * V + v0, H * V, ua, ub, rows, cols,
                        [&](float pdo, float y, int j, int e) { return pdo + gt.kd[j][e & 1] * y; });
    uint32_t na[C / 16][4];  // -dVn^T
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb) {
      mma::acc_to_a<T>(na[rb], Y, rb);
#pragma unroll
      for (int i = 0; i < 4; ++i) na[rb][i] ^= 0x80008000u;  // negate both 16-bit halves
    }
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dS[j][e] *= gt.eC;
    wgmma::fence();
    issue_rows_times<KP, T>(dS, da, Q);  // dS^T += dO^T Qg
    issue_rows_times<KP, T>(dS, na, W);  // dS^T -= dVn^T W
    wgmma::commit();
    wgmma::wait<0>();
    wgmma::fence_operand(dS);
  }
  if (bp.dh0) store_state(bp.dh0 + (n * H + h) * K * V, dS, p.K, p.V, v0 + ua, v0 + ub);
}

}  // namespace linflow::delta_rule
