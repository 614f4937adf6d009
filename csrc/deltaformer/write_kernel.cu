// Deltaformer write pass on mma.sync (ALGORITHMS.md §3; the ATen reference is write_pass in chunk_aten.cpp).
// Per write head, s = scale, rows i, keys j:
//   P_ij = exp(s w_i.k_j - lse_w_i) for j < i,   (I + diag(beta) P) U = V,   R = P U.
// Sequential over chunks of C = 64 rows only through U: chunk c needs U of every earlier chunk, so one block per
// (sequence, write head) walks the chunks in order, re-reading the U it wrote (a 16-bit shadow copy, L2-resident)
// as the B operand of P U.
#include <ATen/ATen.h>
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "common/alloc.h"
#include "common/chunk.cuh"
#include "common/launch.cuh"
#include "common/mma.cuh"
#include "common/seq_layout.h"
#include "common/tile.cuh"
#include "deltaformer/write.h"
#include "deltaformer/write_host.h"

namespace linflow::deltaformer {
namespace {
using at::Tensor;
using chunk::C;
using tile::ld_f;
using tile::ld_h;

constexpr int kWarps = 8, kThreads = kWarps * 32;  // 4 row slices x 2 key groups
constexpr int kStageKeys = 2 * C;                  // a stage holds one C-key sub-block per key group
static_assert(kThreads == tile::kThreads, "tile helpers and wy_substitute assume 256 threads");
constexpr float kLog2e = 1.4426950408889634f, kLn2 = 0.6931471805599453f;

struct WriteParams {
  const void *k, *w, *v;  // [B,T,Hkv,K|V], element type T, contiguous, 16-byte aligned
  const float* beta;      // [B,T,Hkv] fp32 or null (beta = 1)
  float *u, *r, *lse;     // [B,T,Hkv,V], [B,T,Hkv,V], [B,T,Hkv] fp32
  void* u16;              // [B,T,Hkv,V] element type T: shadow copy of u, the tensor-core operand of P U
  chunk::SeqLayout seq;
  int H;                  // write (KV) heads
  float sl2;              // scale * log2(e): scores live in log2 units
};

__host__ __device__ constexpr size_t cmax(size_t a, size_t b) { return a > b ? a : b; }
__host__ __device__ constexpr size_t round128(size_t b) { return (b + 127) / 128 * 128; }

// Shared memory (bytes), phases of a chunk: [prior loop] / [diagonal + solve].
//   A0: Ws (chunk's write queries, C x K half)   / Pcc (diagonal scores, then probabilities, fp32 C x C)
//   A1: Kc (chunk's keys, C x K half)            / Tm = (I + diag(beta) Pcc)^-1 (fp32 C x C)
//   S0: stage buffer 0: keys (2C x K) + U (2C x V), halves
//   S1: stage buffer 1                           / Rs (partials, then R_prior), Ys (Y, then U_c), fp32 C x V each
//   small: beta, lse (log2 units), (m, l) pairs of key group 1
template <int K, int V, typename T>
struct Smem {
  static constexpr size_t half = round128(cmax(C * ld_h(K) * sizeof(T), C * ld_f(C) * sizeof(float)));
  static constexpr size_t stage_elems = size_t(kStageKeys) * (ld_h(K) + ld_h(V));
  static constexpr size_t stage = round128(stage_elems * sizeof(T));
  static constexpr size_t fp = round128(2 * C * ld_f(V) * sizeof(float));
  static constexpr size_t a0 = 0, a1 = half, s0 = 2 * half, s1 = s0 + stage, small = s1 + cmax(stage, fp);
  static constexpr size_t total = small + 4 * C * sizeof(float);
};

// Online softmax of one 16-row slice over a block of NS x 8 keys (the warp's mma accumulator layout: this thread
// holds rows g and g + 8). x: scores in log2 units (-inf = dropped); on return x = exp2(x - m_new). m: running max
// (-inf while a row has seen nothing); l: this thread's partial running sum (its quad's columns only); acc rescaled.
template <int NS, int NV>
__device__ __forceinline__ void online_update(float (&x)[NS][4], float (&m)[2], float (&l)[2], float (&acc)[NV][4]) {
  float mx[2] = {m[0], m[1]};
#pragma unroll
  for (int j = 0; j < NS; ++j) {
    mx[0] = fmaxf(mx[0], fmaxf(x[j][0], x[j][1]));
    mx[1] = fmaxf(mx[1], fmaxf(x[j][2], x[j][3]));
  }
  float shift[2];
#pragma unroll
  for (int hh = 0; hh < 2; ++hh) {
    mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffff, mx[hh], 1));
    mx[hh] = fmaxf(mx[hh], __shfl_xor_sync(0xffffffff, mx[hh], 2));
    shift[hh] = mx[hh] == -INFINITY ? 0.f : mx[hh];  // a row without keys: exp2 never sees -inf - -inf
    const float alpha = exp2f(m[hh] - shift[hh]);     // m = -inf: 0
    m[hh] = mx[hh];
    l[hh] *= alpha;
#pragma unroll
    for (int j = 0; j < NV; ++j) {
      acc[j][2 * hh] *= alpha;
      acc[j][2 * hh + 1] *= alpha;
    }
  }
#pragma unroll
  for (int j = 0; j < NS; ++j)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      x[j][e] = exp2f(x[j][e] - shift[e >> 1]);
      l[e >> 1] += x[j][e];
    }
}

// ---------------------------------------------------------------------------------------------------------------
// write_fwd: block = (sequence, write head), 8 warps; warp w owns row slice 16 (w % 4).. of the chunk and key group
// w / 4. Per chunk c (rows i0.., `rows` valid):
//  1. Ws, Kc, beta -> smem; each warp keeps its 16 x K slice of W as mma A fragments (registers).
//  2. Prior keys j < i0 in stages of 2C keys (cp.async double buffer: keys from k, U from the 16-bit shadow),
//     group g takes sub-block 2 st + g: S = s W K_j^T (mma), online max / sum, acc += P U_j (P from registers as
//     the A operand). All prior sub-blocks are full chunks of the same sequence: no masking.
//  3. Group 1 adds the diagonal tile (j < i strictly) to its (m, l) and keeps its scores in Pcc; it hands
//     (m, l, acc) to group 0 through smem; group 0 merges: lse, R_prior = acc / l, Y = V - diag(beta) R_prior.
//  4. Pcc = exp(S_cc - lse) (strictly lower, valid rows); Tm = (I + diag(beta) Pcc)^-1 by chunk::wy_substitute;
//     U_c = Tm Y and R_c = R_prior + Pcc U_c in fp32 on CUDA cores (thread: 4 rows x V/16 columns); u, u16, r
//     and lse_w to global. The next chunk's first stage is prefetched once U_c is in global memory.
template <int K, int V, typename T>
__global__ void __launch_bounds__(kThreads, 1) write_fwd_kernel(WriteParams p) {
  using L = Smem<K, V, T>;
  constexpr int NK = K / 16, NV = V / 8, NS = C / 8, LK = ld_h(K), LV = ld_h(V), LF = ld_f(V), LC = ld_f(C);
  constexpr int CPT = V / 16;  // columns a thread in the fp32 products
  extern __shared__ __align__(128) char smem[];
  T* Ws = reinterpret_cast<T*>(smem + L::a0);
  float* Pcc = reinterpret_cast<float*>(smem + L::a0);
  T* Kc = reinterpret_cast<T*>(smem + L::a1);
  float* Tm = reinterpret_cast<float*>(smem + L::a1);
  float* Rs = reinterpret_cast<float*>(smem + L::s1);
  float* Ys = Rs + C * LF;
  float* beta_s = reinterpret_cast<float*>(smem + L::small);
  float* lse_s = beta_s + C;
  float* ml_s = lse_s + C;

  int64_t bos, len;
  p.seq.seq(static_cast<int>(blockIdx.x), bos, len);
  if (len <= 0) return;
  const int h = blockIdx.y;
  const int64_t H = p.H, HK = H * K, HV = H * V;
  const T* kg = static_cast<const T*>(p.k) + h * K;  // token t: + t * HK
  const T* wg = static_cast<const T*>(p.w) + h * K;
  const T* vg = static_cast<const T*>(p.v) + h * V;
  T* u16g = static_cast<T*>(p.u16) + h * V;
  float* ug = p.u + h * V;
  float* rg_ = p.r + h * V;
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g8 = lane / 4, t4 = lane % 4;
  const int grp = warp / 4, m0 = 16 * (warp % 4), r0 = m0 + g8, r1 = r0 + 8;
  const int nc = static_cast<int>((len + C - 1) / C);

  // Stage st of the prior keys of chunk `cc` (sub-blocks 2 st, 2 st + 1 that are < cc) into buffer st % 2.
  auto fetch_stage = [&](int st, int cc) {
    T* kb = reinterpret_cast<T*>(smem + L::s0 + (st & 1) * L::stage);
    T* ub = kb + kStageKeys * LK;
#pragma unroll
    for (int q = 0; q < 2; ++q) {
      const int sb = 2 * st + q;
      if (sb >= cc) break;
      const int64_t tok = bos + static_cast<int64_t>(sb) * C;
      tile::fetch_tile<C, K, T, kThreads>(kb + q * C * LK, kg + tok * HK, HK, C, K, true);
      tile::fetch_tile<C, V, T, kThreads>(ub + q * C * LV, u16g + tok * HV, HV, C, V, true);
    }
  };

  for (int c = 0; c < nc; ++c) {
    const int64_t tok0 = bos + static_cast<int64_t>(c) * C;
    const int rows = static_cast<int>(len - static_cast<int64_t>(c) * C < C ? len - static_cast<int64_t>(c) * C : C);
    // ---- 1. the chunk's W, K, beta
    tile::fetch_tile<C, K, T, kThreads>(Ws, wg + tok0 * HK, HK, rows, K, true);
    tile::fetch_tile<C, K, T, kThreads>(Kc, kg + tok0 * HK, HK, rows, K, true);
    if (p.beta) {
      tile::fetch_column<C, kThreads>(beta_s, p.beta + tok0 * H + h, H, rows);
    } else {
      for (int i = tid; i < C; i += kThreads) beta_s[i] = i < rows ? 1.f : 0.f;
    }
    tile::cp_async_commit();
    tile::cp_async_wait<0>();  // also the first stage, prefetched by the previous chunk
    __syncthreads();
    uint32_t wa[NK][4];
#pragma unroll
    for (int kb = 0; kb < NK; ++kb) mma::a_from_rows(wa[kb], Ws, LK, m0, 16 * kb);
    float acc[NV][4];
    mma::zero_acc(acc);
    float m[2] = {-INFINITY, -INFINITY}, l[2] = {0.f, 0.f};
    __syncthreads();  // Ws is dead from here (Pcc takes its place)

    // ---- 2. prior keys
    const int nst = (c + 1) / 2;
    for (int st = 0; st < nst; ++st) {
      if (st + 1 < nst) {
        fetch_stage(st + 1, c);
        tile::cp_async_commit();
        tile::cp_async_wait<1>();
      } else {
        tile::cp_async_wait<0>();
      }
      __syncthreads();
      if (2 * st + grp < c) {
        const T* kb = reinterpret_cast<const T*>(smem + L::s0 + (st & 1) * L::stage) + grp * C * LK;
        const T* ub = reinterpret_cast<const T*>(smem + L::s0 + (st & 1) * L::stage) + kStageKeys * LK + grp * C * LV;
        float x[NS][4];
        mma::zero_acc(x);
        mma::mma_acc<true>(x, wa, kb, LK);  // W K_j^T
#pragma unroll
        for (int j = 0; j < NS; ++j)
#pragma unroll
          for (int e = 0; e < 4; ++e) x[j][e] *= p.sl2;
        online_update(x, m, l, acc);
#pragma unroll
        for (int kb2 = 0; kb2 < C / 16; ++kb2) {  // acc += P U_j
          uint32_t pa[1][4];
          mma::acc_to_a<T>(pa[0], x, kb2);
          mma::mma_acc<false>(acc, pa, ub, LV, 0, 16 * kb2);
        }
      }
      __syncthreads();  // buffer st % 2 is refilled at st + 1
    }

    // ---- 3. diagonal tile (group 1), combine of the two key groups (group 0)
    if (grp == 1) {
      float x[NS][4];
      mma::zero_acc(x);
      mma::mma_acc<true>(x, wa, Kc, LK);  // W_c K_c^T
#pragma unroll
      for (int j = 0; j < NS; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int rr = e < 2 ? r0 : r1, col = 8 * j + 2 * t4 + (e & 1);
          x[j][e] = col < rr ? x[j][e] * p.sl2 : -INFINITY;  // strictly causal
          Pcc[rr * LC + col] = x[j][e];
        }
      online_update(x, m, l, acc);  // the diagonal enters lse only (U_c is the unknown)
    }
#pragma unroll
    for (int hh = 0; hh < 2; ++hh) {
      l[hh] += __shfl_xor_sync(0xffffffff, l[hh], 1);
      l[hh] += __shfl_xor_sync(0xffffffff, l[hh], 2);
    }
    if (grp == 1) {
      if (t4 == 0) {
        ml_s[2 * r0] = m[0];
        ml_s[2 * r0 + 1] = l[0];
        ml_s[2 * r1] = m[1];
        ml_s[2 * r1 + 1] = l[1];
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int col = 8 * j + 2 * t4;
        *reinterpret_cast<float2*>(Rs + r0 * LF + col) = make_float2(acc[j][0], acc[j][1]);
        *reinterpret_cast<float2*>(Rs + r1 * LF + col) = make_float2(acc[j][2], acc[j][3]);
      }
    }
    __syncthreads();
    if (grp == 0) {
      float a0[2], a1[2], inv[2];
#pragma unroll
      for (int hh = 0; hh < 2; ++hh) {
        const int rr = hh ? r1 : r0;
        const float m1 = ml_s[2 * rr], l1 = ml_s[2 * rr + 1];
        const float mm = fmaxf(m[hh], m1), sh = mm == -INFINITY ? 0.f : mm;
        a0[hh] = exp2f(m[hh] - sh);
        a1[hh] = exp2f(m1 - sh);
        const float lt = l[hh] * a0[hh] + l1 * a1[hh];
        const float lse2 = lt > 0.f ? sh + __log2f(lt) : 0.f;
        inv[hh] = lt > 0.f ? 1.f / lt : 0.f;
        if (t4 == 0) {
          lse_s[rr] = lse2;
          if (rr < rows) p.lse[(tok0 + rr) * H + h] = lse2 * kLn2;
        }
      }
#pragma unroll
      for (int j = 0; j < NV; ++j) {
        const int col = 8 * j + 2 * t4;
#pragma unroll
        for (int hh = 0; hh < 2; ++hh) {
          const int rr = hh ? r1 : r0;
          const float2 o1 = *reinterpret_cast<const float2*>(Rs + rr * LF + col);
          const float rp0 = (acc[j][2 * hh] * a0[hh] + o1.x * a1[hh]) * inv[hh];  // R_prior
          const float rp1 = (acc[j][2 * hh + 1] * a0[hh] + o1.y * a1[hh]) * inv[hh];
          float2 vv = make_float2(0.f, 0.f);
          if (rr < rows) vv = mma::unpack2<T>(*reinterpret_cast<const uint32_t*>(vg + (tok0 + rr) * HV + col));
          const float b = beta_s[rr];
          *reinterpret_cast<float2*>(Rs + rr * LF + col) = make_float2(rp0, rp1);
          *reinterpret_cast<float2*>(Ys + rr * LF + col) = make_float2(vv.x - b * rp0, vv.y - b * rp1);
        }
      }
    }
    __syncthreads();

    // ---- 4. the solve inside the chunk
    for (int i = tid; i < C * C; i += kThreads) {
      const int rr = i / C, col = i % C;
      Pcc[rr * LC + col] = (col < rr && rr < rows) ? exp2f(Pcc[rr * LC + col] - lse_s[rr]) : 0.f;
    }
    __syncthreads();
    {
      float t[C / 4];
      chunk::wy_substitute(Pcc, beta_s, t);  // Tm = (I + diag(beta) Pcc)^-1 (Kc is dead: Tm takes its place)
      const int j = tid / 4;
#pragma unroll
      for (int i = 0; i < C / 4; ++i) Tm[chunk::wy_row(i) * LC + j] = t[i];
    }
    __syncthreads();
    const int cg = tid % 16, rg = tid / 16;  // rows rg + 16 i, columns cg * CPT ..
    float o[4][CPT];
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < CPT; ++e) o[i][e] = 0.f;
#pragma unroll 4
    for (int kk = 0; kk < C; ++kk) {  // U_c = Tm Y
      float y[CPT];
#pragma unroll
      for (int e = 0; e < CPT; e += 2) {
        const float2 yy = *reinterpret_cast<const float2*>(Ys + kk * LF + cg * CPT + e);
        y[e] = yy.x;
        y[e + 1] = yy.y;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float a = Tm[(rg + 16 * i) * LC + kk];
#pragma unroll
        for (int e = 0; e < CPT; ++e) o[i][e] = fmaf(a, y[e], o[i][e]);
      }
    }
    __syncthreads();  // every thread has read Y
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int rr = rg + 16 * i;
#pragma unroll
      for (int e = 0; e < CPT; e += 2) {
        const int col = cg * CPT + e;
        *reinterpret_cast<float2*>(Ys + rr * LF + col) = make_float2(o[i][e], o[i][e + 1]);
        if (rr < rows) {
          const int64_t off = (tok0 + rr) * HV + col;
          *reinterpret_cast<float2*>(ug + off) = make_float2(o[i][e], o[i][e + 1]);
          *reinterpret_cast<uint32_t*>(u16g + off) = mma::pack2<T>(o[i][e], o[i][e + 1]);
        }
      }
    }
    __threadfence_block();
    __syncthreads();  // U_c is in Ys and in global memory (read back by the next chunks' stages)
    if (c + 1 < nc) {
      fetch_stage(0, c + 1);  // into buffer 0: free (Rs / Ys live in buffer 1)
      tile::cp_async_commit();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i)
#pragma unroll
      for (int e = 0; e < CPT; e += 2) {
        const float2 rp = *reinterpret_cast<const float2*>(Rs + (rg + 16 * i) * LF + cg * CPT + e);
        o[i][e] = rp.x;
        o[i][e + 1] = rp.y;
      }
#pragma unroll 4
    for (int kk = 0; kk < C; ++kk) {  // R_c = R_prior + Pcc U_c
      float y[CPT];
#pragma unroll
      for (int e = 0; e < CPT; e += 2) {
        const float2 yy = *reinterpret_cast<const float2*>(Ys + kk * LF + cg * CPT + e);
        y[e] = yy.x;
        y[e + 1] = yy.y;
      }
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const float a = Pcc[(rg + 16 * i) * LC + kk];
#pragma unroll
        for (int e = 0; e < CPT; ++e) o[i][e] = fmaf(a, y[e], o[i][e]);
      }
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int rr = rg + 16 * i;
      if (rr >= rows) continue;
#pragma unroll
      for (int e = 0; e < CPT; e += 2)
        *reinterpret_cast<float2*>(rg_ + (tok0 + rr) * HV + cg * CPT + e) = make_float2(o[i][e], o[i][e + 1]);
    }
    __syncthreads();  // Pcc / Tm / Rs / Ys are overwritten by the next chunk's loads
  }
}

using write_host::head_dim_ok, write_host::present, write_host::with_dim;

template <typename T>
cudaError_t launch_write(const WriteParams& p, int64_t K, int64_t V, dim3 grid, cudaStream_t stream) {
  return with_dim(K, [&](auto kk) {
    return with_dim(V, [&](auto vv) {
      constexpr int KK = decltype(kk)::value, VV = decltype(vv)::value;
      constexpr size_t smem = Smem<KK, VV, T>::total;
      return launch_kernel(write_fwd_kernel<KK, VV, T>, grid, kThreads, smem, p, stream);
    });
  });
}

// Contiguous with a 16-byte aligned start (cp.async rows); a copy only when needed.
Tensor aligned(const Tensor& x) { return write_host::aligned(x, x.scalar_type()); }

}  // namespace

bool write_fwd_cuda_supports(const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                             const std::optional<Tensor>& w) {
  if (!k.defined() || !v.defined() || !k.is_cuda() || k.dim() != 4 || v.dim() != 4) return false;
  const auto dt = k.scalar_type();
  if ((dt != at::kBFloat16 && dt != at::kHalf) || v.scalar_type() != dt) return false;
  if (present(w) && (w->scalar_type() != dt || w->sizes() != k.sizes())) return false;
  if (present(beta) && beta->scalar_type() == at::kDouble) return false;
  return head_dim_ok(k.size(3)) && head_dim_ok(v.size(3));
}

std::tuple<Tensor, Tensor, Tensor> write_fwd_cuda(const Tensor& k, const Tensor& v, const std::optional<Tensor>& beta,
                                                  const std::optional<Tensor>& w,
                                                  const std::optional<Tensor>& cu_seqlens, double scale,
                                                  int64_t chunk_size) {
  const char* op = "deltaformer write_fwd_cuda";
  TORCH_CHECK(write_fwd_cuda_supports(k, v, beta, w), op,
              ": needs CUDA k, v (and w) of one dtype, bfloat16 or float16, head dims K, V in {32, 64, 128}; got k ",
              k.scalar_type(), " ", k.sizes(), ", v ", v.scalar_type(), " ", v.sizes());
  TORCH_CHECK(chunk_size == 16 || chunk_size == 32 || chunk_size == 64, op, ": chunk_size must be 16, 32 or 64, got ",
              chunk_size);
  const int64_t B = k.size(0), T = k.size(1), Hkv = k.size(2), K = k.size(3), V = v.size(3);
  TORCH_CHECK(v.size(0) == B && v.size(1) == T && v.size(2) == Hkv, op, ": v must be [B, T, Hkv, V] with k's B, T, Hkv");
  if (present(beta))
    TORCH_CHECK(beta->dim() == 3 && beta->size(0) == B && beta->size(1) == T && beta->size(2) == Hkv, op,
                ": beta must be [B, T, Hkv]");
  const c10::cuda::OptionalCUDAGuard guard(k.device());
  const auto fopts = k.options().dtype(at::kFloat);
  Tensor u = new_output({B, T, Hkv, V}, fopts), r = new_output({B, T, Hkv, V}, fopts);
  Tensor lse = new_output({B, T, Hkv}, fopts);
  Tensor cu;
  int64_t N = B;
  if (present(cu_seqlens)) {
    TORCH_CHECK(cu_seqlens->dim() == 1 && cu_seqlens->size(0) >= 2, op, ": cu_seqlens must be 1-D [N+1]");
    TORCH_CHECK(cu_seqlens->scalar_type() == at::kInt || cu_seqlens->scalar_type() == at::kLong, op,
                ": cu_seqlens must be int32 or int64");
    TORCH_CHECK(B == 1, op, ": with cu_seqlens the batch size must be 1, got ", B);
    cu = cu_seqlens->to(k.device(), at::kLong).contiguous();
    N = cu.size(0) - 1;
  }
  if (B * T * Hkv == 0 || N == 0) return {u, r, lse};
  TORCH_CHECK(N <= INT32_MAX && Hkv <= 65535, op, ": too many sequences or heads");
  Tensor kc = aligned(k), vc = aligned(v), wc = present(w) ? aligned(*w) : kc;
  Tensor bc = present(beta) ? beta->to(at::kFloat).contiguous() : Tensor();
  Tensor u16 = at::empty({B, T, Hkv, V}, k.options());
  WriteParams p;
  p.k = kc.data_ptr();
  p.w = wc.data_ptr();
  p.v = vc.data_ptr();
  p.beta = bc.defined() ? bc.data_ptr<float>() : nullptr;
  p.u = u.data_ptr<float>();
  p.r = r.data_ptr<float>();
  p.lse = lse.data_ptr<float>();
  p.u16 = u16.data_ptr();
  p.seq = chunk::SeqLayout{cu.defined() ? cu.data_ptr<int64_t>() : nullptr, T, static_cast<int>(N)};
  p.H = static_cast<int>(Hkv);
  p.sl2 = static_cast<float>(scale) * kLog2e;
  const dim3 grid(static_cast<unsigned>(N), static_cast<unsigned>(Hkv));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  const cudaError_t err = k.scalar_type() == at::kBFloat16 ? launch_write<__nv_bfloat16>(p, K, V, grid, stream)
                                                           : launch_write<__half>(p, K, V, grid, stream);
  C10_CUDA_CHECK(err);
  return {u, r, lse};
}

}  // namespace linflow::deltaformer
