// LION on CUDA: the plain parameter struct of the chunk kernels (kernels.cuh) and the launcher (cuda.cu) that the host
// code (cuda_host.cpp) calls. No ATen and no device code here: the launcher returns the CUDA status.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/seq_layout.h"

namespace linflow::lion {

enum class Elem : int { bf16, f16 };  // element type of q, k, v and o

struct FwdParams {
  const void *q, *k, *v;  // [B,T,H,K|V] contiguous, element type of the kernel
  const float *gf, *gb;   // [B,T,H] fp32 log gates of the forward / backward sweep (selective); null otherwise
  const float* lam_log;   // [H] fp32 log lam (decay "fixed"); null otherwise. Neither gates nor lam: no decay
  bool gf_shift;          // "lion_code": the forward sweep's gate at token t is gf[t - 1] (nothing at a sequence start)
  void* o;                // [B,T,H,V], element type of the kernel
  float* part;            // workspace: forward-sweep partial numerators, [slots, H, v-tiles, C * BV] fp32
  float* den;             // workspace: forward-sweep partial denominators, [slots, H, C] fp32 (normalize only)
  chunk::SeqLayout seq;
  int H, K, V;
  float scale, eps;
  bool normalize;
  bool vec_k, vec_v;      // 16-byte loads allowed along K / V
  int block_columns;      // sweep_block_columns(V, ...): 64 (4 warps) or 128 (8 warps); sizes part
  // Backward use only (lion_bwd, kernels.cuh "Backward"); null / false in the forward.
  const void* rowx;       // [tokens, H, V] x of the per-row dot below (element type of the kernel); the host
                          // guarantees one v-tile (V <= block_columns). Forward mode (the recompute launch of the
                          // normalised backward): o := scale x inv (= G), rowdot := -scale inv (x . o) (= g0),
                          // inv = 1 / (scale D + eps). Gradient mode: rowdot := scale x . (PF - PB)
  float* rowdot;          // [tokens, H] (may be null)
  const float *ext_a, *ext_b;  // gradient mode, ext: rank-one score term a_r b_u added to q_r . k_u (null: ones)
  bool ext;
  float* diag;            // gradient mode: [tokens, H] fp32 score q_t . k_t (+ a_t b_t), written by the forward sweep
  // gradient mode with rowx: dg := the per-sequence reverse cumsum of rq + rowdot - 2 scale hv qk (all [tokens, H])
  const float *rq, *hv, *qk;
  float* dg;
};

// Value columns a block of the sweep kernels owns (16 a warp): 64 for V <= 64, else 128; `forced` (64 or 128, from
// LINFLOW_LION_COLUMNS: a tuning knob for benchmarks) overrides the rule.
inline int sweep_block_columns(int64_t V, int forced = 0) {
  if (forced == 64 || forced == 128) return forced;
  return V <= 64 ? 64 : 128;
}

// Forward, `mode="chunked"`: the forward sweep (partials to part / den), then the backward sweep (adds, normalises,
// writes o). q, k, v bf16 or fp16, K <= 128, any V (1..256), N <= 65535 sequences.
cudaError_t launch_forward(const FwdParams& p, Elem e, int64_t N, cudaStream_t s);

// The same two sweeps in gradient mode (kernels.cuh, "Backward"): o = scale (PF + PB) without normalisation
// (normalize must be false), the optional rank-one score term (ext), rowdot = scale x . (PF - PB), the diagonal
// scores and the fused gate gradient dg. Used three times by lion_bwd.
cudaError_t launch_grad_sweeps(const FwdParams& p, Elem e, int64_t N, cudaStream_t s);

}  // namespace linflow::lion
