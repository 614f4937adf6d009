// The two sequential chunk passes of the delta rule on mma.sync, with the state held in registers (K <= 128).
// A block owns one (16 NW)-column slice of the K x V state of one (sequence, head); warp w owns 16 of its columns
// and keeps them transposed, S^T (16 x KP, fp32 accumulators), for the whole sequence. Every product of a chunk
// step is a warp-local register GEMM against tiles in shared memory (ALGORITHMS.md §1, names as in kernels.cuh):
//   forward,  chunk c:   h_c = S;  Vn^T = U^T - S^T W^T;  S^T = e^gC S^T + (Vn^T diag(kd)) K
//   backward, chunk c:   dh_c = dS;  dVn^T = (P^T dO)^T + diag-scaled (dS^T K^T);
//                        dS^T = e^gC dS^T + dO^T Qg - dVn^T W
// (kd = e^(gC - gamma), Qg = s diag(e^gamma) Q). The accumulator layout of S^T / Vn^T is the A-operand layout
// of the next product, so nothing but the chunk's input tiles goes through shared memory: one block barrier per
// chunk, while the next chunk's tiles stream in (cp.async, two stages). Each warp scans the chunk's gates itself.
// P^T dO (state-independent) comes from chunk_local_kernel<DVL = true>, chunk-parallel, beside the recompute.
#pragma once
#include "common/mma.cuh"
#include "delta_rule/kernels.cuh"

namespace linflow::delta_rule {

// Per-thread gate factors at the rows r = 8 j + 2 t + e that index its accumulator columns:
// kd[j][e] = e^(gC - gamma_r), eg[j][e] = e^gamma_r, and eC = e^gC.
struct RowGates {
  float kd[C / 8][2], eg[C / 8][2], eC = 1.f;
  __device__ __forceinline__ void load(const float* g) {
    const int t4 = threadIdx.x % 4;
    if (g == nullptr) {
#pragma unroll
      for (int j = 0; j < C / 8; ++j) kd[j][0] = kd[j][1] = eg[j][0] = eg[j][1] = 1.f;
      eC = 1.f;
      return;
    }
    chunk::WarpGamma gm;
    gm.scan(g);
    const float gC = gm.last();
    eC = __expf(gC);
#pragma unroll
    for (int j = 0; j < C / 8; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {
        const float gr = gm.at(8 * j + 2 * t4 + e);
        kd[j][e] = __expf(gC - gr);
        eg[j][e] = __expf(gr);
      }
  }
};

template <int KP, int NW, typename T>
struct StateMmaSmem {  // per stage: X0, X1, X2 (C x KP: W, K [, Q]) and Y0, Y1 (C x 16 NW: U [, or dO, P^T dO]), g
  T *X[3][2], *Y[2][2];
  float* g[2];
  __host__ __device__ static size_t carve(char* base, StateMmaSmem* s, int nx, int ny) {
    SmemCarver sc{base};
    StateMmaSmem t{};
    for (int b = 0; b < 2; ++b) {
      for (int i = 0; i < nx; ++i) t.X[i][b] = sc.take<T>(C * ld_h(KP));
      for (int i = 0; i < ny; ++i) t.Y[i][b] = sc.take<T>(C * ld_h(16 * NW));
      t.g[b] = sc.take<float>(C);
    }
    if (s) *s = t;
    return sc.used;
  }
};

// S (accumulators of S^T, rows v = va / vb, cols k = 8 j + 2 t + e) <-> a K x V fp32 state in global memory.
template <int NK>
__device__ __forceinline__ void load_state(float (&S)[NK][4], const float* src, int K, int V, int va, int vb) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < NK; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = 8 * j + 2 * t4 + (e & 1), v = e < 2 ? va : vb;
      S[j][e] = (src && k < K && v < V) ? src[static_cast<int64_t>(k) * V + v] : 0.f;
    }
}
template <int NK, typename D>
__device__ __forceinline__ void store_state(D* dst, const float (&S)[NK][4], int K, int V, int va, int vb) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < NK; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int k = 8 * j + 2 * t4 + (e & 1), v = e < 2 ? va : vb;
      if (k < K && v < V) dst[static_cast<int64_t>(k) * V + v] = tile::from_f<D>(S[j][e]);
    }
}

// Where a state block works: (16 NW)-column slice v0.. of the state of sequence n, head h; this thread's two
// accumulator rows are the state columns ua, ub (local to the slice).
template <int NW>
struct StateBlock {
  int warp, v0, h, n, cols, ua, ub;
  int64_t bos, len, slot0, nc;
  bool vec_v;
  __device__ explicit StateBlock(const FwdParams& p) {
    warp = threadIdx.x / 32;
    v0 = blockIdx.x * 16 * NW, h = blockIdx.y, n = blockIdx.z;
    cols = min(16 * NW, p.V - v0);
    p.seq.seq(n, bos, len);
    slot0 = p.seq.first_slot(n, bos), nc = (len + C - 1) / C;
    vec_v = p.vec_v && cols % 8 == 0;
    ua = 16 * warp + (threadIdx.x % 32) / 4, ub = ua + 8;
  }
  __device__ int rows(int64_t c) const { return static_cast<int>(len - c * C < C ? len - c * C : C); }
};

// The first half of a chunk step, shared by both passes: store the state slice (h_c or dh_c), then
// out = S^T X^T (16 columns x C rows) with X = W (forward) or K (backward), the state packed to A fragments.
template <int KP, typename T>
__device__ __forceinline__ void state_times_rows(float (&out)[C / 8][4], const float (&S)[KP / 8][4], const T* X,
                                                 T* state_dst, int K, int V, int va, int vb) {
  store_state(state_dst, S, K, V, va, vb);
  uint32_t sa[KP / 16][4];
#pragma unroll
  for (int kb = 0; kb < KP / 16; ++kb) mma::acc_to_a<T>(sa[kb], S, kb);
  mma::zero_acc(out);
  mma::mma_acc<true>(out, sa, X, ld_h(KP));
}

// out[j][e] = f(Y[r][u], out[j][e], j, e) at row r = 8 j + 2t + (e & 1), column u (ua / ub) of a C x BV tile Y in
// shared memory; the result also goes to dst[r * row_stride + u] (r < rows, u < cols).
template <int BV, typename T, typename F>
__device__ __forceinline__ void combine_rows(float (&out)[C / 8][4], const T* Y, T* dst, int64_t row_stride, int ua,
                                             int ub, int rows, int cols, F&& f) {
  const int t4 = threadIdx.x % 4;
#pragma unroll
  for (int j = 0; j < C / 8; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int r = 8 * j + 2 * t4 + (e & 1), u = e < 2 ? ua : ub;
      out[j][e] = f(tile::to_f(Y[r * ld_h(BV) + u]), out[j][e], j, e);
      if (r < rows && u < cols) dst[r * row_stride + u] = tile::from_f<T>(out[j][e]);
    }
}

template <int KP, int NW, typename T>
__global__ void __launch_bounds__(NW * 32) state_fwd_mma_kernel(FwdParams p) {
  constexpr int BV = 16 * NW, NT = NW * 32, NK = KP / 8, NR = C / 8;
  extern __shared__ __align__(128) char smem[];
  StateMmaSmem<KP, NW, T> s;
  StateMmaSmem<KP, NW, T>::carve(smem, &s, 2, 1);
  const StateBlock<NW> sb(p);
  const int v0 = sb.v0, h = sb.h, n = sb.n, cols = sb.cols, ua = sb.ua, ub = sb.ub;
  const int64_t H = p.H, K = p.K, V = p.V, bos = sb.bos, len = sb.len, slot0 = sb.slot0, nc = sb.nc;
  const bool vec_v = sb.vec_v;
  auto prefetch = [&](int64_t c) {
    const int b = c & 1, rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    tile::fetch_tile<C, KP, T, NT>(s.X[0][b], static_cast<const T*>(p.w) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, KP, T, NT>(s.X[1][b], static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, BV, T, NT>(s.Y[0][b], static_cast<const T*>(p.u) + (tok0 * H + h) * V + v0, H * V, rows, cols, vec_v);
    if (p.g) tile::fetch_column<C, NT>(s.g[b], p.g + tok0 * H + h, H, rows);
    tile::cp_async_commit();
  };
  float S[NK][4];
  load_state(S, p.h0 ? p.h0 + (n * H + h) * K * V : nullptr, p.K, p.V, v0 + ua, v0 + ub);
  if (nc > 0) prefetch(0);
  for (int64_t c = 0; c < nc; ++c) {
    const int b = c & 1, rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    tile::cp_async_wait<0>();
    __syncthreads();  // chunk c's tiles landed; every warp is done with chunk c - 1's buffer
    if (c + 1 < nc) prefetch(c + 1);
    const T *W = b ? s.X[0][1] : s.X[0][0], *Kt = b ? s.X[1][1] : s.X[1][0], *U = b ? s.Y[0][1] : s.Y[0][0];
    RowGates gt;
    gt.load(p.g ? (b ? s.g[1] : s.g[0]) : nullptr);
    float X[NR][4];  // h_c = S; X = S^T W^T; then Vn^T = U^T - S^T W^T
    state_times_rows<KP, T>(X, S, W, static_cast<T*>(p.h) + ((slot0 + c) * H + h) * K * V, p.K, p.V, v0 + ua, v0 + ub);
    combine_rows<BV, T>(X, U, static_cast<T*>(p.vn) + (tok0 * H + h) * V + v0, H * V, ua, ub, rows, cols,
                        [](float u, float ws, int, int) { return u - ws; });
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[j][e] *= gt.eC;
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb) {  // S^T += (Vn^T diag(kd)) K
      uint32_t a[1][4];
      mma::acc_to_a_scaled<T>(a[0], X, gt.kd, rb);
      mma::mma_acc<false>(S, a, Kt, ld_h(KP), 0, 16 * rb);
    }
  }
  if (p.ht) store_state(p.ht + (n * H + h) * K * V, S, p.K, p.V, v0 + ua, v0 + ub);
}

template <int KP, int NW, typename T>
__global__ void __launch_bounds__(NW * 32) state_bwd_mma_kernel(BwdParams bp) {
  constexpr int BV = 16 * NW, NT = NW * 32, NK = KP / 8, NR = C / 8;
  extern __shared__ __align__(128) char smem[];
  const FwdParams& p = bp.f;
  StateMmaSmem<KP, NW, T> s;
  StateMmaSmem<KP, NW, T>::carve(smem, &s, 3, 2);
  const StateBlock<NW> sb(p);
  const int v0 = sb.v0, h = sb.h, n = sb.n, cols = sb.cols, ua = sb.ua, ub = sb.ub, warp = sb.warp;
  const int64_t H = p.H, K = p.K, V = p.V, bos = sb.bos, len = sb.len, slot0 = sb.slot0, nc = sb.nc;
  const bool vec_v = sb.vec_v;
  auto prefetch = [&](int64_t c) {
    const int b = c & 1, rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    tile::fetch_tile<C, KP, T, NT>(s.X[0][b], static_cast<const T*>(p.w) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, KP, T, NT>(s.X[1][b], static_cast<const T*>(p.k) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, KP, T, NT>(s.X[2][b], static_cast<const T*>(p.q) + (tok0 * H + h) * K, H * K, rows, p.K, p.vec_k);
    tile::fetch_tile<C, BV, T, NT>(s.Y[0][b], static_cast<const T*>(bp.dout) + (tok0 * H + h) * V + v0, H * V, rows, cols, vec_v);
    tile::fetch_tile<C, BV, T, NT>(s.Y[1][b], static_cast<const T*>(bp.dvl) + (tok0 * H + h) * V + v0, H * V, rows, cols, vec_v);
    if (p.g) tile::fetch_column<C, NT>(s.g[b], p.g + tok0 * H + h, H, rows);
    tile::cp_async_commit();
  };
  float dS[NK][4];
  load_state(dS, bp.dht ? bp.dht + (n * H + h) * K * V : nullptr, p.K, p.V, v0 + ua, v0 + ub);
  if (nc > 0) prefetch(nc - 1);
  for (int64_t c = nc - 1; c >= 0; --c) {
    const int b = c & 1, rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    tile::cp_async_wait<0>();
    __syncthreads();
    if (c > 0) prefetch(c - 1);
    const T *W = b ? s.X[0][1] : s.X[0][0], *Kt = b ? s.X[1][1] : s.X[1][0], *Q = b ? s.X[2][1] : s.X[2][0];
    const T *dO = b ? s.Y[0][1] : s.Y[0][0], *dvl = b ? s.Y[1][1] : s.Y[1][0];
    RowGates gt;
    gt.load(p.g ? (b ? s.g[1] : s.g[0]) : nullptr);
    float Y[NR][4];  // dh_c = dS; Y = dS^T K^T; then dVn^T = (P^T dO)^T + dS^T Kd^T
    state_times_rows<KP, T>(Y, dS, Kt, static_cast<T*>(bp.dh) + ((slot0 + c) * H + h) * K * V, p.K, p.V, v0 + ua,
                            v0 + ub);
    combine_rows<BV, T>(Y, dvl, static_cast<T*>(bp.dvn) + (tok0 * H + h) * V + v0, H * V, ua, ub, rows, cols,
                        [&](float pdo, float y, int j, int e) { return pdo + gt.kd[j][e & 1] * y; });
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dS[j][e] *= gt.eC;
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb) {  // dS^T += dO^T Qg - dVn^T W
      uint32_t a[1][4];
      mma::a_from_cols(a[0], dO, ld_h(BV), 16 * warp, 16 * rb);
#pragma unroll
      for (int i = 0; i < 4; ++i) {  // columns r = 16 rb + 8 (i / 2) + 2 t (+1): scale by s e^gamma_r
        const float2 f = mma::unpack2<T>(a[0][i]);
        const int j = 2 * rb + i / 2;
        a[0][i] = mma::pack2<T>(f.x * p.scale * gt.eg[j][0], f.y * p.scale * gt.eg[j][1]);
      }
      mma::mma_acc<false>(dS, a, Q, ld_h(KP), 0, 16 * rb);
      uint32_t an[1][4];
      mma::acc_to_a<T>(an[0], Y, rb);
#pragma unroll
      for (int i = 0; i < 4; ++i) an[0][i] ^= 0x80008000u;  // negate both 16-bit halves
      mma::mma_acc<false>(dS, an, W, ld_h(KP), 0, 16 * rb);
    }
  }
  if (bp.dh0) store_state(bp.dh0 + (n * H + h) * K * V, dS, p.K, p.V, v0 + ua, v0 + ub);
}

}  // namespace linflow::delta_rule
