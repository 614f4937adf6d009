// Delta rule backward kernels (ALGORITHMS.md §1). After recomputing w, u (wy_fwd) and the chunk-start states h
// and new values vn (state_fwd), with dO' = s dO, P = s (Q K^T o E), Qg = s diag(e^gamma) Q, Kd = diag(e^(gamma_C-gamma)) K:
//   chunk_local<DVL> (P^T dO) + state_bwd (state_wgmma.cuh / state_mma.cuh), chunks in reverse:  dh_c = dS (gradient at the chunk's end),
//       dVn = P^T dO + Kd dS,  dS <- e^gamma_C dS + Qg^T dO - W^T dVn                    -> dh, dvn, dh0
//   chunk_bwd (slot, head), loop over v-tiles:  dVb = Tm^T dVn, dv = beta dVb,
//       dZ = dO' Vn^T, dA = -dVb Vn^T (= -(dVb U^T + dKb W^T), since W h = U - Vn),
//       dQg = dO' h^T, dKd = Vn dh^T, dKb = -dVb h^T   (register accumulators)
//     then dq, dk, dbeta, dg from those (quotient-free: every term is a product of chunk-local tiles).
#pragma once
#include "delta_rule/kernels.cuh"

namespace linflow::delta_rule {


constexpr int kBwdMmaBV = 32, kBwdMmaStages = 3;

// Element pair (row r, columns col, col + 1) of a 16-bit shared tile as floats.
template <typename T>
__device__ __forceinline__ float2 smem_pair(const T* X, int ld, int r, int col) {
  return mma::unpack2<T>(*reinterpret_cast<const uint32_t*>(X + r * ld + col));
}

// ---------------------------------------------------------------------------------------------------------------
// chunk_bwd on mma.sync, a persistent grid: one block (8 warps) a multiprocessor walks the work items (slot, head),
// head-fastest. Tm = (I + diag(beta) (K K^T o E)_strict)^-1 comes from the backward's recompute (wy_fwd stores it,
// 16-bit, when FwdParams::tm is set), so an item starts with loads only. Warp w owns rows 16 (w % 4).. of the chunk
// and column half ch = w / 4 of every C x KP product (k = KP/2 ch..) and of every C x C product (u = 32 ch..);
// all sums over V stay in fp32 register accumulators across the v-loop:
//   v-loop (32-column v-tiles dO, Vn, dVn, V, h, dh; a ring of three cp.async stages):
//     dVb = Tm^T dVn, dv = beta dVb and dbeta += rowsum(dVb o V);
//     dZ += dO Vn^T, dA += -dVb Vn^T (16 x 32),  dQg += dO h^T, dKb += -dVb h^T, dKd += Vn dh^T (16 x KP/2)
//     (dO unscaled in the loop: s is applied to dZ and dQg in fp32 afterwards); <h, dh> per warp.
//   epilogue, from registers: P = Q K^T and K K^T recomputed; dQK = tril(dZ) o E, G = tril_-1(dA) o beta_r E ->
//     16-bit tiles in shared memory (the only C x C exchange); gate / beta row and column sums per warp;
//     dq = e^gamma o dQg + dQK K, dk = kd o dKd + beta e^gamma o dKb + dQK^T Q + (G + G^T) K (G strictly lower: the
//     A fragments of G and G^T merge by a bitwise or), stored from the accumulators; dbeta, dg from the per-warp
//     partial sums (fixed order).
// The cp.async stream never stops at an item boundary: the v-tile ring runs on into the next item, and the next
// item's header (Q, K, Tm, beta, g: double-buffered) is issued at the first v-tile of the current one, so the
// epilogue, the stores and the start of the next item overlap the next item's loads; nvt + 2 barriers an item.
// dQK / G tiles and the column partials have their own space; the row partials live in the stage of the item's
// last v-tile (free once every warp passed barrier B, refilled only after the next top barrier).
// Measured on the H100 (bf16, K = V = 128): 1.12 ms at B8 T4096, 2.19 ms at B1 T65536 (the per-(slot, head) kernel
// it replaced, which computed Tm itself: 2.02 / 3.99 ms).
template <int KP, typename T>
struct ChunkBwdSmem {
  static constexpr int BV = kBwdMmaBV, NS = kBwdMmaStages;
  static constexpr size_t r128(size_t b) { return (b + 127) / 128 * 128; }
  static constexpr size_t kCT = r128(size_t(C) * ld_h(BV) * sizeof(T));   // a C x BV tile
  static constexpr size_t kHT = r128(size_t(KP) * ld_h(BV) * sizeof(T));  // a KP x BV tile
  static constexpr size_t kStage = 4 * kCT + 2 * kHT;                      // dO, Vn, dVn, V, h, dh
  // item header: Q, K (C x KP), Tm (C x C), beta, raw g, and the item's place (tb = tok0 H + h, sb = slot H + h, rows)
  static constexpr size_t kQ = r128(size_t(C) * ld_h(KP) * sizeof(T)), kTm = r128(size_t(C) * ld_h(C) * sizeof(T));
  static constexpr size_t oK = kQ, oTm = 2 * kQ, oBeta = oTm + kTm, oG = oBeta + r128(C * sizeof(float)),
                          oInfo = oG + r128(C * sizeof(float)), kHdr = oInfo + 128;
  char *hdr, *stages;
  T *dQKh, *Gh;
  float *colp, *red;  // [rg][col] dgamma column partial sums; per-warp sums: [0, 8) <h, dh>, [8, 16) kd hd
  __host__ __device__ static size_t carve(char* base, ChunkBwdSmem* s) {
    SmemCarver sc{base};
    ChunkBwdSmem t;
    t.hdr = sc.take<char>(2 * kHdr);
    t.dQKh = sc.take<T>(C * ld_h(C));
    t.Gh = sc.take<T>(C * ld_h(C));
    t.colp = sc.take<float>(4 * C);
    t.red = sc.take<float>(16);
    t.stages = sc.take<char>(NS * kStage);
    if (s) *s = t;
    return sc.used;
  }
  __device__ __forceinline__ T* Q(int b) const { return reinterpret_cast<T*>(hdr + b * kHdr); }
  __device__ __forceinline__ T* K(int b) const { return reinterpret_cast<T*>(hdr + b * kHdr + oK); }
  __device__ __forceinline__ T* Tm(int b) const { return reinterpret_cast<T*>(hdr + b * kHdr + oTm); }
  __device__ __forceinline__ float* beta(int b) const { return reinterpret_cast<float*>(hdr + b * kHdr + oBeta); }
  __device__ __forceinline__ float* g(int b) const { return reinterpret_cast<float*>(hdr + b * kHdr + oG); }
  __device__ __forceinline__ int64_t* info(int b) const { return reinterpret_cast<int64_t*>(hdr + b * kHdr + oInfo); }
  // Tile `which` (0 dO, 1 Vn, 2 dVn, 3 V, 4 h, 5 dh) of stage st.
  __device__ __forceinline__ T* tile(int st, int which) const {
    return reinterpret_cast<T*>(stages + st * kStage + (which < 4 ? which * kCT : 4 * kCT + (which - 4) * kHT));
  }
  // Row partials in stage st (only while it holds no tile): dbeta [ch][row], dgamma [ch][row].
  __device__ __forceinline__ float* dbp(int st) const { return reinterpret_cast<float*>(stages + st * kStage); }
  __device__ __forceinline__ float* dgp(int st) const { return dbp(st) + 2 * C; }
};

// Where a work item's chunk lives: tb = tok0 H + h (row base of every [B,T,H,*] tensor), sb = slot H + h (of the
// [slots,H,K,V] states); rows = 0 for an unused varlen slot (its loads zero-fill, its stores are skipped).
struct BwdItem {
  int64_t tb, sb;
  int rows;
};

// Items run head-fastest (item = slot H + h): the blocks in flight together read the heads of a few chunks, whole
// [T, H, *] rows, rather than one head of many chunks.
__device__ __forceinline__ BwdItem bwd_item(const FwdParams& p, int64_t slots, int item) {
  const int64_t slot = item / p.H, hh = item % p.H;
  int n;
  int64_t c, bos, len;
  BwdItem f;
  f.sb = slot * p.H + hh;
  if (p.seq.locate(slot, n, c, bos, len)) {
    f.tb = (bos + c * C) * p.H + hh;
    f.rows = static_cast<int>(len - c * C < C ? len - c * C : C);
  } else {
    f.tb = hh;
    f.rows = 0;
  }
  return f;
}

template <int KP, typename T>
__global__ void __launch_bounds__(256, 1) chunk_bwd_kernel(BwdParams b) {
  using Smem = ChunkBwdSmem<KP, T>;
  constexpr int BV = Smem::BV, NS = Smem::NS, NT = 256, KH = KP / 2, NK = KH / 8, NV = BV / 8, NU = 32 / 8;
  static_assert(NS == 3, "the prefetch distance is 1 or 2 v-tiles");
  extern __shared__ __align__(128) char smem[];
  const FwdParams& p = b.f;
  Smem s;
  Smem::carve(smem, &s);
  const int nitems = static_cast<int>(b.slots * p.H), G = static_cast<int>(gridDim.x);
  if (static_cast<int>(blockIdx.x) >= nitems) return;
  const int nk = (nitems - static_cast<int>(blockIdx.x) + G - 1) / G;  // this block's items
  const int64_t H = p.H, K = p.K, V = p.V;
  const bool gated = p.g != nullptr;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g8 = lane / 4, t4 = lane % 4;
  const int rg = warp % 4, ch = warp / 4, m0 = 16 * rg, r0 = m0 + g8, r1 = r0 + 8;
  const int kn0 = KH * ch, un0 = 32 * ch;  // this warp's columns of the C x KP and the C x C products
  const int nvt = (p.V + BV - 1) / BV, dist = nvt < NS - 1 ? nvt : NS - 1;  // prefetch distance (v-tiles)
  const bool pairs_v = V % 2 == 0;

  auto put_info = [&](int hb, const BwdItem& f) {
    if (threadIdx.x == 0) {
      int64_t* in = s.info(hb);
      in[0] = f.tb;
      in[1] = f.sb;
      in[2] = f.rows;
    }
  };
  auto get_info = [&](int hb) {
    const int64_t* in = s.info(hb);
    return BwdItem{in[0], in[1], static_cast<int>(in[2])};
  };
  auto issue_header = [&](int hb, const BwdItem& f) {
    tile::fetch_tile<C, KP, T, NT>(s.Q(hb), static_cast<const T*>(p.q) + f.tb * K, H * K, f.rows, p.K, p.vec_k);
    tile::fetch_tile<C, KP, T, NT>(s.K(hb), static_cast<const T*>(p.k) + f.tb * K, H * K, f.rows, p.K, p.vec_k);
    tile::fetch_tile<C, C, T, NT>(s.Tm(hb), static_cast<const T*>(p.tm) + f.tb * C, H * C, f.rows, C, true);
    tile::fetch_column<C, NT>(s.beta(hb), p.beta + f.tb, H, f.rows);
    if (gated) tile::fetch_column<C, NT>(s.g(hb), p.g + f.tb, H, f.rows);
  };
  auto issue_vtile = [&](int st, int it, const BwdItem& f) {
    const int v0 = it * BV, cols = min(BV, p.V - v0), krows = f.rows > 0 ? p.K : 0;
    const bool vec = p.vec_v && cols % 8 == 0;
    const int64_t tv = f.tb * V + v0, sv = f.sb * K * V + v0;
    tile::fetch_tile<C, BV, T, NT>(s.tile(st, 0), static_cast<const T*>(b.dout) + tv, H * V, f.rows, cols, vec);
    tile::fetch_tile<C, BV, T, NT>(s.tile(st, 1), static_cast<const T*>(p.vn) + tv, H * V, f.rows, cols, vec);
    tile::fetch_tile<C, BV, T, NT>(s.tile(st, 2), static_cast<const T*>(b.dvn) + tv, H * V, f.rows, cols, vec);
    tile::fetch_tile<C, BV, T, NT>(s.tile(st, 3), static_cast<const T*>(p.v) + tv, H * V, f.rows, cols, vec);
    tile::fetch_tile<KP, BV, T, NT>(s.tile(st, 4), static_cast<const T*>(p.h) + sv, V, krows, cols, vec);
    tile::fetch_tile<KP, BV, T, NT>(s.tile(st, 5), static_cast<const T*>(b.dh) + sv, V, krows, cols, vec);
  };

  {  // prologue: header of the first item with its v-tile 0 (one group), v-tile 1 (a second group) at distance 2
    const BwdItem f0 = bwd_item(p, b.slots, blockIdx.x);
    put_info(0, f0);
    issue_header(0, f0);
    issue_vtile(0, 0, f0);
    tile::cp_async_commit();
    if (dist == 2) {
      issue_vtile(1, 1, f0);
      tile::cp_async_commit();
    }
  }

  int sv_idx = 0;  // this block's v-tile counter (stage sv_idx % NS)
#pragma unroll 1
  for (int k = 0; k < nk; ++k) {
    const int hb = k & 1, item = static_cast<int>(blockIdx.x) + k * G;
    const bool has_next = k + 1 < nk;
    float dQg[NK][4], dKd[NK][4], dKb[NK][4], dZ[NU][4], dA[NU][4];
    mma::zero_acc(dQg);
    mma::zero_acc(dKd);
    mma::zero_acc(dKb);
    mma::zero_acc(dZ);
    mma::zero_acc(dA);
    float bv[2] = {0.f, 0.f}, hs_part = 0.f;  // rowsum(dVb o V) on this thread's columns; <h, dh> part
#pragma unroll 1
    for (int it = 0; it < nvt; ++it, ++sv_idx) {
      if (dist == 2) {
        tile::cp_async_wait<1>();
      } else {
        tile::cp_async_wait<0>();
      }
      __syncthreads();  // v-tile sv_idx (and at it 0 the item's header) landed; every warp is done with v-tile
                        // sv_idx - 1 and with the previous item's epilogue (its stage and header are refilled next)
      const BwdItem cur = get_info(hb);  // (re-read every v-tile: fewer registers live across the loop)
      if (it == 0) chunk::cumsum_rows(s.g(hb), gated ? s.g(hb) : nullptr, 1, C);  // warp 0: gamma, in place
      {  // at the item's first v-tile the next item's header; v-tile sv_idx + dist, of this item or of the next
         // (whose header is then in this group or an earlier one)
        const bool in_next = it + dist >= nvt;
        BwdItem f = cur;
        if (it == 0 && has_next) {
          const BwdItem nxt = bwd_item(p, b.slots, item + G);
          put_info(hb ^ 1, nxt);
          issue_header(hb ^ 1, nxt);
          if (in_next) f = nxt;
        } else if (in_next && has_next) {
          f = get_info(hb ^ 1);
        }
        if (!in_next || has_next) issue_vtile((sv_idx + dist) % NS, in_next ? it + dist - nvt : it + dist, f);
        tile::cp_async_commit();
      }
      const int st = sv_idx % NS, v0 = it * BV, cols = min(BV, p.V - v0);
      const T *dO = s.tile(st, 0), *Vn = s.tile(st, 1), *dVn = s.tile(st, 2), *Vt = s.tile(st, 3);
      const T *Hs = s.tile(st, 4), *dHs = s.tile(st, 5), *Tmh = s.Tm(hb);
      float dvb[NV][4];  // dVb = Tm^T dVn, rows m0.., all BV columns
      mma::zero_acc(dvb);
#pragma unroll
      for (int kb = 0; kb < C / 16; ++kb) {
        uint32_t a[1][4];
        mma::a_from_cols(a[0], Tmh, ld_h(C), m0, 16 * kb);
        mma::mma_acc<false>(dvb, a, dVn, ld_h(BV), 0, 16 * kb);
      }
      T* dv = static_cast<T*>(b.dv) + cur.tb * V + v0;
      const float beta_r[2] = {s.beta(hb)[r0], s.beta(hb)[r1]};
#pragma unroll
      for (int j = 0; j < NV; ++j) {  // dv = beta dVb, dbeta += dVb o V: column tiles j of this warp's half
        if (j / (NV / 2) != ch) continue;
        const int col = 8 * j + 2 * t4;
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = hf ? r1 : r0;
          const float d0 = dvb[j][2 * hf], d1 = dvb[j][2 * hf + 1];
          const float2 vv = smem_pair(Vt, ld_h(BV), r, col);
          bv[hf] += d0 * vv.x + d1 * vv.y;
          if (r >= cur.rows || col >= cols) continue;
          T* dst = dv + static_cast<int64_t>(r) * H * V + col;
          const float x0 = beta_r[hf] * d0, x1 = beta_r[hf] * d1;
          if (pairs_v && col + 1 < cols) {
            *reinterpret_cast<uint32_t*>(dst) = mma::pack2<T>(x0, x1);
          } else {
            dst[0] = tile::from_f<T>(x0);
            if (col + 1 < cols) dst[1] = tile::from_f<T>(x1);
          }
        }
      }
      uint32_t na[BV / 16][4], oa[BV / 16][4], va[BV / 16][4];  // -dVb, dO, Vn as A fragments (rows m0..)
#pragma unroll
      for (int kb = 0; kb < BV / 16; ++kb) {
        mma::acc_to_a<T>(na[kb], dvb, kb);
#pragma unroll
        for (int i = 0; i < 4; ++i) na[kb][i] ^= 0x80008000u;  // negate both 16-bit halves
        mma::a_from_rows(oa[kb], dO, ld_h(BV), m0, 16 * kb);
        mma::a_from_rows(va[kb], Vn, ld_h(BV), m0, 16 * kb);
      }
      mma::mma_acc2<true>(dZ, oa, dA, na, Vn, ld_h(BV), un0);    // dZ += dO Vn^T, dA += -dVb Vn^T
      mma::mma_acc2<true>(dQg, oa, dKb, na, Hs, ld_h(BV), kn0);  // dQg += dO h^T, dKb += -dVb h^T
      mma::mma_acc<true>(dKd, va, dHs, ld_h(BV), kn0);       // dKd += Vn dh^T
#pragma unroll
      for (int i = threadIdx.x; i < KP * BV / 8; i += NT) {  // <h, dh> (zero outside K x V), 8 elements a step
        const int r = i / (BV / 8), col = 8 * (i % (BV / 8));
        float x[8], y[8];
        tile::unpack8<T>(*reinterpret_cast<const uint4*>(Hs + r * ld_h(BV) + col), x);
        tile::unpack8<T>(*reinterpret_cast<const uint4*>(dHs + r * ld_h(BV) + col), y);
#pragma unroll
        for (int e = 0; e < 8; ++e) hs_part += x[e] * y[e];
      }
    }
    const int stl = (sv_idx - 1) % NS;  // the stage of this item's last v-tile: row partials after barrier B
#pragma unroll
    for (int o = 1; o < 32; o *= 2) hs_part += __shfl_xor_sync(0xffffffff, hs_part, o);
    if (lane == 0) s.red[warp] = hs_part;  // per-warp sums of <h, dh> (read after barrier C)
    if (nvt == 1) __syncthreads();  // gamma complete (else the barrier of v-tile 1 saw to it)

    // ---- epilogue (no barrier before it: it reads the header, and writes dQKh / Gh, which the previous item's
    // epilogue finished reading before its barrier C). Order chosen for registers: first fold dKb into dKd and
    // scale dQg (their row sums taken on the way), then the two C x C passes, then the two products.
    const T *Qs = s.Q(hb), *Ks = s.K(hb);
    const float* gam = s.g(hb);  // gamma (zeros if ungated)
    float rowg[2] = {0.f, 0.f}, rowb[2] = {bv[0], bv[1]}, hdw = 0.f;  // hdw: this thread's share of sum kd hd
    {  // dQg' = e^gamma o s dQg (dgamma += e^gamma <s dQg, Q>); dKd' = kd o dKd + beta e^gamma o dKb with
       // hd = <dKd, K>, kb = <dKb, K> by rows (dgamma += beta e^gamma kb - kd hd, dbeta += e^gamma kb)
      const float eg[2] = {__expf(gam[r0]), __expf(gam[r1])};
      const float kd[2] = {__expf(gam[C - 1] - gam[r0]), __expf(gam[C - 1] - gam[r1])};
      const float bg[2] = {s.beta(hb)[r0] * eg[0], s.beta(hb)[r1] * eg[1]};
      float qp[2] = {0.f, 0.f}, hd[2] = {0.f, 0.f}, kb2[2] = {0.f, 0.f};
#pragma unroll
      for (int j = 0; j < NK; ++j)
#pragma unroll
        for (int hf = 0; hf < 2; ++hf) {
          const int r = hf ? r1 : r0, col = kn0 + 8 * j + 2 * t4, e0 = 2 * hf, e1 = 2 * hf + 1;
          const float2 q = smem_pair(Qs, ld_h(KP), r, col), kk = smem_pair(Ks, ld_h(KP), r, col);
          dQg[j][e0] *= p.scale;  // dO' = s dO
          dQg[j][e1] *= p.scale;
          qp[hf] += dQg[j][e0] * q.x + dQg[j][e1] * q.y;
          dQg[j][e0] *= eg[hf];
          dQg[j][e1] *= eg[hf];
          hd[hf] += dKd[j][e0] * kk.x + dKd[j][e1] * kk.y;
          kb2[hf] += dKb[j][e0] * kk.x + dKb[j][e1] * kk.y;
          dKd[j][e0] = kd[hf] * dKd[j][e0] + bg[hf] * dKb[j][e0];
          dKd[j][e1] = kd[hf] * dKd[j][e1] + bg[hf] * dKb[j][e1];
        }
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        rowg[hf] += eg[hf] * qp[hf] + bg[hf] * kb2[hf] - kd[hf] * hd[hf];
        rowb[hf] += eg[hf] * kb2[hf];
        hdw += kd[hf] * hd[hf];
      }
    }
    const float gr[2] = {gam[r0], gam[r1]};
    float colv[NU][2];
#pragma unroll
    for (int j = 0; j < NU; ++j) colv[j][0] = colv[j][1] = 0.f;
    {  // pass 1: P = Q K^T; dQK = tril(s dZ) o E -> dQKh; gate sums hz = s dZ o P o E (rows minus columns)
      float P[NU][4];
      mma::zero_acc(P);
      mma::mma_rows<true, KP / 16>(P, Qs, ld_h(KP), m0, Ks, ld_h(KP), un0);
#pragma unroll
      for (int j = 0; j < NU; ++j) {
        float qk[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hf = e >> 1, r = hf ? r1 : r0, u = un0 + 8 * j + 2 * t4 + (e & 1);
          qk[e] = u <= r ? p.scale * dZ[j][e] * __expf(gr[hf] - gam[u]) : 0.f;
          const float x = qk[e] * P[j][e];
          rowg[hf] += x;
          colv[j][e & 1] += x;
        }
        const int u0 = un0 + 8 * j + 2 * t4;
        *reinterpret_cast<uint32_t*>(s.dQKh + r0 * ld_h(C) + u0) = mma::pack2<T>(qk[0], qk[1]);
        *reinterpret_cast<uint32_t*>(s.dQKh + r1 * ld_h(C) + u0) = mma::pack2<T>(qk[2], qk[3]);
      }
    }
    {  // pass 2: KKE = (K K^T) o E; G = tril_-1(dA) o beta_r E -> Gh; ha = dA o beta_r KKE, dbeta += dA o KKE
      const float beta_r[2] = {s.beta(hb)[r0], s.beta(hb)[r1]};
      float KK[NU][4];
      mma::zero_acc(KK);
      mma::mma_rows<true, KP / 16>(KK, Ks, ld_h(KP), m0, Ks, ld_h(KP), un0);
#pragma unroll
      for (int j = 0; j < NU; ++j) {
        float gg[4];
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int hf = e >> 1, r = hf ? r1 : r0, u = un0 + 8 * j + 2 * t4 + (e & 1);
          // (only u < r enters: A is strictly lower; a masked G is +0 exactly, for the or below)
          const float da = u < r ? dA[j][e] * __expf(gr[hf] - gam[u]) : 0.f;
          gg[e] = u < r ? da * beta_r[hf] : 0.f;
          const float x = gg[e] * KK[j][e];
          rowg[hf] += x;
          colv[j][e & 1] += x;
          rowb[hf] += da * KK[j][e];
        }
        const int u0 = un0 + 8 * j + 2 * t4;
        *reinterpret_cast<uint32_t*>(s.Gh + r0 * ld_h(C) + u0) = mma::pack2<T>(gg[0], gg[1]);
        *reinterpret_cast<uint32_t*>(s.Gh + r1 * ld_h(C) + u0) = mma::pack2<T>(gg[2], gg[3]);
      }
    }
#pragma unroll
    for (int j = 0; j < NU; ++j)
#pragma unroll
      for (int e = 0; e < 2; ++e) {  // column sums over the warp's 16 rows: reduce over g (lanes 4, 8, 16 apart)
        float x = colv[j][e];
        x += __shfl_xor_sync(0xffffffff, x, 4);
        x += __shfl_xor_sync(0xffffffff, x, 8);
        x += __shfl_xor_sync(0xffffffff, x, 16);
        if (g8 == 0) s.colp[rg * C + un0 + 8 * j + 2 * t4 + e] = x;
      }
    __syncthreads();  // B: dQKh, Gh, colp complete; every warp is done with the last v-tile (stage stl is free)

    const BwdItem cur = get_info(hb);
    mma::mma_rows<false, C / 16>(dQg, s.dQKh, ld_h(C), m0, Ks, ld_h(KP), kn0);  // dq = dQg' + dQK K
    store_acc_rows<NK, T>(static_cast<T*>(b.dq) + cur.tb * K, H * K, dQg, r0, kn0, cur.rows, p.K, K % 2 == 0);
#pragma unroll
    for (int kb = 0; kb < C / 16; ++kb) {  // dk = dKd' + dQK^T Q + (G + G^T) K
      uint32_t a[1][4], at[4];
      mma::a_from_cols(a[0], s.dQKh, ld_h(C), m0, 16 * kb);  // dQK^T Q
      mma::mma_acc<false>(dKd, a, Qs, ld_h(KP), kn0, 16 * kb);
      mma::a_from_rows(a[0], s.Gh, ld_h(C), m0, 16 * kb);    // (G + G^T) K: of G[r][u], G[u][r] one is a
      mma::a_from_cols(at, s.Gh, ld_h(C), m0, 16 * kb);      // masked +0 (bits 0), so or-ing the 16-bit
#pragma unroll                                                // fragments adds them exactly
      for (int i = 0; i < 4; ++i) a[0][i] |= at[i];
      mma::mma_acc<false>(dKd, a, Ks, ld_h(KP), kn0, 16 * kb);
    }
    store_acc_rows<NK, T>(static_cast<T*>(b.dk) + cur.tb * K, H * K, dKd, r0, kn0, cur.rows, p.K, K % 2 == 0);
#pragma unroll
    for (int hf = 0; hf < 2; ++hf) {  // row partial sums over this warp's columns: reduce over t (lanes 1, 2 apart)
#pragma unroll
      for (int o = 1; o <= 2; o *= 2) {
        rowg[hf] += __shfl_xor_sync(0xffffffff, rowg[hf], o);
        rowb[hf] += __shfl_xor_sync(0xffffffff, rowb[hf], o);
      }
      if (t4 == 0) {
        const int r = hf ? r1 : r0;
        s.dgp(stl)[ch * C + r] = rowg[hf];
        s.dbp(stl)[ch * C + r] = rowb[hf];
      }
    }
#pragma unroll
    for (int o = 1; o < 32; o *= 2) hdw += __shfl_xor_sync(0xffffffff, hdw, o);  // per-warp sum (fixed order)
    if (lane == 0) s.red[8 + warp] = hdw;
    __syncthreads();  // C: row partials complete
    {
      const float* dbp = s.dbp(stl);
      if (static_cast<int>(threadIdx.x) < cur.rows)
        b.dbeta[cur.tb + threadIdx.x * H] = dbp[threadIdx.x] + dbp[C + threadIdx.x];
    }
    if (gated && warp == 0) {  // dgamma_C += sum kd hd + e^gC <h, dh>; dg = reverse cumsum of dgamma
      const float* dgp = s.dgp(stl);
      auto dgam = [&](int r) {
        return dgp[r] + dgp[C + r] - (s.colp[r] + s.colp[C + r] + s.colp[2 * C + r] + s.colp[3 * C + r]);
      };
      const float a = dgam(2 * lane);
      float bb = dgam(2 * lane + 1);
      if (lane == 31) {
        float hs = 0.f, hsum = 0.f;
#pragma unroll
        for (int w = 0; w < 8; ++w) {
          hs += s.red[w];
          hsum += s.red[8 + w];
        }
        bb += hsum + __expf(gam[C - 1]) * hs;
      }
      float x = a + bb;  // suffix sums: scan from the top
#pragma unroll
      for (int off = 1; off < 32; off *= 2) {
        const float y = __shfl_down_sync(0xffffffff, x, off);
        if (lane + off < 32) x += y;
      }
      if (2 * lane < cur.rows) b.dg[cur.tb + 2 * lane * H] = x;
      if (2 * lane + 1 < cur.rows) b.dg[cur.tb + (2 * lane + 1) * H] = x - a;
    }
  }
  tile::cp_async_wait<0>();  // only empty groups can be left
}

}  // namespace linflow::delta_rule
