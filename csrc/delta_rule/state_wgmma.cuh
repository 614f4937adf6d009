// The two sequential chunk passes of the delta rule on Hopper's warpgroup MMA (sm_90a; same math and names as
// state_mma.cuh). A block is one warpgroup owning a 64-column slice of the K x V state of one (sequence, head):
// warp w keeps state columns 16 w.. transposed, S^T (16 x KP fp32), in registers for the whole sequence, which is
// exactly the wgmma accumulator layout of a 64 x KP product, and packs it to the A operand of the next product.
// B operands are the chunk's W / K / Q tiles, streamed by cp.async (ST stages: 3 where one block a multiprocessor
// leaves the room, the loads then run two chunks ahead) into the SW128 layout:
//   forward,  chunk c:  X = S^T W^T          (64 x C,  B = W  "k-major", KP / 16 k-steps)
//                       Vn^T = U^T - X;      S^T = e^gC S^T + (Vn^T diag(kd)) K   (64 x KP, B = K  "mn-major")
//   backward, chunk c:  Y = dS^T K^T;        dVn^T = (P^T dO)^T + diag(kd) Y
//                       dS^T = e^gC dS^T + (dO^T diag(s e^gamma)) Q - dVn^T W      (64 x KP, B = Q, W  "mn-major")
// Per chunk two block barriers and two wgmma groups; the update of chunk c overlaps the wait for chunk c + 1's tiles
// and its gate scan, the first product overlaps the state store. The state slices and Vn / dVn leave through a
// per-warp staging area (stmatrix, then 16-byte stores). Against the mma.sync passes: the tiles' B fragments are
// read from shared memory once per block instead of once per warp, and a k-step is one instruction a warpgroup.
#pragma once
#include "common/wgmma.cuh"
#include "delta_rule/state_mma.cuh"

namespace linflow::delta_rule {

constexpr int kWgColumns = 64;  // state columns a block (4 warps x 16)

template <int KP, int ST, typename T>
struct StateWgSmem {  // per stage: X0..X2 (SW128, C x KP: W, K [, Q]), Y0, Y1 (C x 64, padded: U [, or dO, P^T dO]), g;
  T *X[3][3], *Y[2][3];  // and each warp's staging rows for its 16 state columns (KP rows of 32 bytes)
  float* g[3];
  T* stage;
  // Bytes from a 1024-aligned base; the launcher adds wgmma::kAlign for the kernel's own alignment of the base.
  __host__ __device__ static size_t carve(char* base, StateWgSmem* s, int nx, int ny) {
    SmemCarver sc{base};
    StateWgSmem t{};
    for (int b = 0; b < ST; ++b)
      for (int i = 0; i < nx; ++i) t.X[i][b] = sc.take<T>(C * KP);  // multiples of 1024 bytes: stay aligned
    for (int b = 0; b < ST; ++b) {
      for (int i = 0; i < ny; ++i) t.Y[i][b] = sc.take<T>(C * ld_h(kWgColumns));
      t.g[b] = sc.take<float>(C);
    }
    t.stage = sc.take<T>(4 * KP * 16);
    if (s) *s = t;
    return sc.used;
  }
};

// Stage pick without a run-time array index (which would put the pointer array in local memory).
template <typename X>
__device__ __forceinline__ X* pick3(X* const (&buf)[3], int b) { return b == 0 ? buf[0] : (b == 1 ? buf[1] : buf[2]); }

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

// A warp's 16 state columns leave through its staging rows: NB A fragments (rows = the 16 columns, k-block i =
// rows 16 i.. of the destination) are stored transposed, st[row][0..16), then copied out in 16-byte pieces to
// dst[row * row_stride + 0..16) for row < rows, pieces beyond `cols` (the warp's valid columns, a multiple of 8)
// skipped. Warp-private: __syncwarp only.
template <int NB, typename T>
__device__ __forceinline__ void store_columns(T* dst, int64_t row_stride, T* st, const uint32_t (&a)[NB][4], int rows,
                                              int cols) {
  const int lane = threadIdx.x % 32, m = lane / 8;
  __syncwarp();  // the previous copy's reads of st are done
#pragma unroll
  for (int kb = 0; kb < NB; ++kb)
    wgmma::stmatrix_x4_trans(st + (16 * kb + 8 * (m / 2) + lane % 8) * 16 + 8 * (m % 2), a[kb]);
  __syncwarp();
#pragma unroll
  for (int j = 0; j < NB; ++j) {
    const int i = lane + 32 * j, r = i / 2, c = 8 * (i % 2);
    if (r < rows && c < cols)
      *reinterpret_cast<uint4*>(dst + r * row_stride + c) = *reinterpret_cast<const uint4*>(st + r * 16 + c);
  }
}

// A chunk's result X^T (Vn^T or dVn^T: this warp's 16 state columns x the chunk's rows, accumulator layout) to dst
// ([tokens, H, V] rows from the block's first column): staged 16-byte stores where the vector path applies
// (vcols >= 0, warp_vector_cols), else element stores (combine_rows with the identity; Y any padded C x 64 tile).
template <typename T>
__device__ __forceinline__ void store_chunk_columns(T* dst, int64_t row_stride, float (&X)[C / 8][4], const T* Y,
                                                    T* stage, const StateBlock<4>& sb, int rows, int vcols) {
  if (vcols >= 0) {
    uint32_t f[C / 16][4];
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb) mma::acc_to_a<T>(f[rb], X, rb);
    store_columns<C / 16>(dst + 16 * sb.warp, row_stride, stage, f, rows, vcols);
  } else {
    combine_rows<kWgColumns, T>(X, Y, dst, row_stride, sb.ua, sb.ub, rows, sb.cols,
                                [](float, float x, int, int) { return x; });
  }
}

// Where the vector path applies (16-byte stores of whole 8-column pieces): this warp's valid columns, else -1.
__device__ __forceinline__ int warp_vector_cols(const StateBlock<4>& sb) {
  return sb.vec_v ? max(0, min(16, sb.cols - 16 * sb.warp)) : -1;
}

// Fragments of the transposed 16-bit tile Y^T (rows: this warp's 16 columns; cols: the chunk's rows), as acc_to_a.
template <typename T>
__device__ __forceinline__ void tile_cols_to_a(uint32_t (&a)[C / 16][4], const T* Y, int warp) {
#pragma unroll
  for (int rb = 0; rb < C / 16; ++rb) mma::a_from_cols(a[rb], Y, ld_h(kWgColumns), 16 * warp, 16 * rb);
}
// Element (j, e) of accumulator-layout data held as A fragments (acc_to_a's packing).
template <typename T>
__device__ __forceinline__ float frag_at(const uint32_t (&a)[C / 16][4], int j, int e) {
  const float2 f = mma::unpack2<T>(a[j / 2][2 * (j % 2) + e / 2]);
  return (e & 1) ? f.y : f.x;
}

// Chunk c's tiles (when `valid`) into stage c % ST: the SW128 tiles X[i] from xs[i] ([tokens, H, K]), the padded
// tiles Y[i] from ys[i] ([tokens, H, V], the block's columns), the gate column; then a commit group in any case, so
// cp_async_wait<ST - 2> always means "chunk c landed".
template <int KP, int ST, typename T, int NX, int NY>
__device__ __forceinline__ void prefetch_chunk(const StateWgSmem<KP, ST, T>& s, const FwdParams& p,
                                               const StateBlock<4>& sb, int64_t c, bool valid,
                                               const void* const (&xs)[NX], const void* const (&ys)[NY]) {
  constexpr int NT = 128;
  if (valid) {
    const int b = static_cast<int>(c % ST), rows = sb.rows(c);
    const int64_t H = p.H, tok = (sb.bos + c * C) * H + sb.h;
#pragma unroll
    for (int i = 0; i < NX; ++i)
      wgmma::fetch_tile_sw128<C, KP, T, NT>(pick3(s.X[i], b), static_cast<const T*>(xs[i]) + tok * p.K, H * p.K, rows,
                                            p.K, p.vec_k);
#pragma unroll
    for (int i = 0; i < NY; ++i)
      tile::fetch_tile<C, kWgColumns, T, NT>(pick3(s.Y[i], b), static_cast<const T*>(ys[i]) + tok * p.V + sb.v0, H * p.V,
                                             rows, sb.cols, sb.vec_v);
    if (p.g) tile::fetch_column<C, NT>(pick3(s.g, b), p.g + tok, H, rows);
  }
  tile::cp_async_commit();
}

template <int KP, int ST, typename T>
__global__ void __launch_bounds__(128) state_fwd_wg_kernel(FwdParams p) {
  constexpr int NK = KP / 8, NR = C / 8;
  extern __shared__ __align__(128) char smem_raw[];
  StateWgSmem<KP, ST, T> s;
  StateWgSmem<KP, ST, T>::carve(align_smem(smem_raw), &s, 2, 1);
  const StateBlock<4> sb(p);
  const int v0 = sb.v0, h = sb.h, n = sb.n, ua = sb.ua, ub = sb.ub, warp = sb.warp;
  const int64_t H = p.H, K = p.K, V = p.V, bos = sb.bos, slot0 = sb.slot0, nc = sb.nc;
  const int vcols = warp_vector_cols(sb);
  T* stage = s.stage + warp * KP * 16;
  const void* const xs[2] = {p.w, p.k};
  const void* const ys[1] = {p.u};
  auto prefetch = [&](int64_t c) { prefetch_chunk(s, p, sb, c, c < nc, xs, ys); };
  float S[NK][4];
  load_state(S, p.h0 ? p.h0 + (n * H + h) * K * V : nullptr, p.K, p.V, v0 + ua, v0 + ub);
#pragma unroll
  for (int i = 0; i < ST - 1; ++i) prefetch(i);
  // Chunk c: the update of chunk c - 1 (second wgmma group) is still on the tensor cores while the block waits for
  // chunk c's tiles and scans its gates; the first group (X = S^T W^T) runs while h_c is stored.
  for (int64_t c = 0; c < nc; ++c) {
    const int b = static_cast<int>(c % ST), rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    tile::cp_async_wait<ST - 2>();
    wgmma::fence_proxy_async();  // the tiles cp.async wrote are read by the tensor cores
    __syncthreads();             // chunk c's tiles landed; every warp is done with chunk c - 1's buffer
    RowGates gt;
    gt.load(p.g ? pick3(s.g, b) : nullptr);
    wgmma::wait<0>();  // S: the state after chunk c - 1
    wgmma::fence_operand(S);
    __syncthreads();   // every warp's share of that update has read its K tile: chunk c - 1's stage is free
    prefetch(c + ST - 1);
    uint32_t sa[KP / 16][4];
    state_to_a<KP, T>(sa, S);
    T* h_dst = static_cast<T*>(p.h) + ((slot0 + c) * H + h) * K * V;
    if (vcols >= 0) store_columns<KP / 16>(h_dst + v0 + 16 * warp, V, stage, sa, p.K, vcols);  // h_c = S
    float X[NR][4];
    issue_times_rows<KP, T>(X, sa, pick3(s.X[0], b));  // X = S^T W^T
    if (vcols < 0) store_state(h_dst, S, p.K, p.V, v0 + ua, v0 + ub);
    uint32_t ua_frag[C / 16][4];  // U^T, this warp's columns
    tile_cols_to_a<T>(ua_frag, pick3(s.Y[0], b), warp);
    wgmma::wait<0>();
    wgmma::fence_operand(X);
#pragma unroll
    for (int j = 0; j < NR; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) X[j][e] = frag_at<T>(ua_frag, j, e) - X[j][e];  // Vn^T = U^T - S^T W^T
    store_chunk_columns<T>(static_cast<T*>(p.vn) + (tok0 * H + h) * V + v0, H * V, X, pick3(s.Y[0], b), stage, sb,
                           rows, vcols);
    uint32_t va[C / 16][4];
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb) mma::acc_to_a_scaled<T>(va[rb], X, gt.kd, rb);
#pragma unroll
    for (int j = 0; j < NK; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) S[j][e] *= gt.eC;
    wgmma::fence();
    issue_rows_times<KP, T>(S, va, pick3(s.X[1], b));  // S^T += (Vn^T diag(kd)) K
    wgmma::commit();
  }
  wgmma::wait<0>();
  wgmma::fence_operand(S);
  if (p.ht) store_state(p.ht + (n * H + h) * K * V, S, p.K, p.V, v0 + ua, v0 + ub);
}

template <int KP, int ST, typename T>
__global__ void __launch_bounds__(128) state_bwd_wg_kernel(BwdParams bp) {
  constexpr int NK = KP / 8, NR = C / 8;
  extern __shared__ __align__(128) char smem_raw[];
  const FwdParams& p = bp.f;
  StateWgSmem<KP, ST, T> s;
  StateWgSmem<KP, ST, T>::carve(align_smem(smem_raw), &s, 3, 2);
  const StateBlock<4> sb(p);
  const int v0 = sb.v0, h = sb.h, n = sb.n, ua = sb.ua, ub = sb.ub, warp = sb.warp;
  const int64_t H = p.H, K = p.K, V = p.V, bos = sb.bos, slot0 = sb.slot0, nc = sb.nc;
  const int vcols = warp_vector_cols(sb);
  T* stage = s.stage + warp * KP * 16;
  const void* const xs[3] = {p.w, p.k, p.q};
  const void* const ys[2] = {bp.dout, bp.dvl};
  auto prefetch = [&](int64_t c) { prefetch_chunk(s, p, sb, c, c >= 0, xs, ys); };
  float dS[NK][4];
  load_state(dS, bp.dht ? bp.dht + (n * H + h) * K * V : nullptr, p.K, p.V, v0 + ua, v0 + ub);
#pragma unroll
  for (int i = 0; i < ST - 1; ++i) prefetch(nc - 1 - i);
  // Chunk c (descending): as the forward, the update of chunk c + 1 overlaps the wait for chunk c's tiles, the
  // gate scan and the dO / P^T dO fragment loads; Y = dS^T K^T overlaps the store of dh_c.
  for (int64_t c = nc - 1; c >= 0; --c) {
    const int b = static_cast<int>(c % ST), rows = sb.rows(c);
    const int64_t tok0 = bos + c * C;
    tile::cp_async_wait<ST - 2>();
    wgmma::fence_proxy_async();
    __syncthreads();
    RowGates gt;
    gt.load(p.g ? pick3(s.g, b) : nullptr);
    uint32_t dof[C / 16][4];  // dO^T
    tile_cols_to_a<T>(dof, pick3(s.Y[0], b), warp);
    wgmma::wait<0>();  // dS: after chunk c + 1 (and the A registers of that update are free)
    wgmma::fence_operand(dS);
    __syncthreads();   // every warp's share of that update has read its Q / W tiles: chunk c + 1's stage is free
    prefetch(c - (ST - 1));
    uint32_t da[C / 16][4];  // dO^T diag(s e^gamma): columns r = 16 rb + 8 (i / 2) + 2 t (+1)
#pragma unroll
    for (int rb = 0; rb < C / 16; ++rb)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float2 f = mma::unpack2<T>(dof[rb][i]);
        const int j = 2 * rb + i / 2;
        da[rb][i] = mma::pack2<T>(f.x * p.scale * gt.eg[j][0], f.y * p.scale * gt.eg[j][1]);
      }
    uint32_t sa[KP / 16][4];
    state_to_a<KP, T>(sa, dS);
    T* dh_dst = static_cast<T*>(bp.dh) + ((slot0 + c) * H + h) * K * V;
    if (vcols >= 0) store_columns<KP / 16>(dh_dst + v0 + 16 * warp, V, stage, sa, p.K, vcols);  // dh_c = dS
    float Y[NR][4];
    issue_times_rows<KP, T>(Y, sa, pick3(s.X[1], b));  // Y = dS^T K^T
    if (vcols < 0) store_state(dh_dst, dS, p.K, p.V, v0 + ua, v0 + ub);
    uint32_t pf[C / 16][4];  // (P^T dO)^T
    tile_cols_to_a<T>(pf, pick3(s.Y[1], b), warp);
    wgmma::wait<0>();
    wgmma::fence_operand(Y);
#pragma unroll
    for (int j = 0; j < NR; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) Y[j][e] = frag_at<T>(pf, j, e) + gt.kd[j][e & 1] * Y[j][e];  // dVn^T
    store_chunk_columns<T>(static_cast<T*>(bp.dvn) + (tok0 * H + h) * V + v0, H * V, Y, pick3(s.Y[1], b), stage, sb,
                           rows, vcols);
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
    issue_rows_times<KP, T>(dS, da, pick3(s.X[2], b));  // dS^T += dO^T Qg
    issue_rows_times<KP, T>(dS, na, pick3(s.X[0], b));  // dS^T -= dVn^T W
    wgmma::commit();
  }
  wgmma::wait<0>();
  wgmma::fence_operand(dS);
  if (bp.dh0) store_state(bp.dh0 + (n * H + h) * K * V, dS, p.K, p.V, v0 + ua, v0 + ub);
}

}  // namespace linflow::delta_rule
