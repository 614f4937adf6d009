// Delta rule: the plain parameter structs the CUDA kernels take, and the launchers (cuda.cu, step_cuda.cu) that the
// host code (cuda_host.cpp) calls. No ATen and no device code here: launchers return the CUDA status, the host side
// turns it into an error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/seq_layout.h"

namespace linflow::delta_rule {

enum class Elem : int { f32, bf16, f16 };  // element type of q, k, v (and of beta / g for the step)
using FloatKind = Elem;

struct FwdParams {
  const void *q, *k, *v;       // [B,T,H,K|V], element type T
  const float *beta, *g;       // [B,T,H] fp32 (g may be null)
  const float* h0;             // [N,H,K,V] fp32 or null
  void *o, *w, *u, *vn, *h;    // outputs / workspaces (h: [slots,H,K,V])
  void* tm;                    // [B,T,H,C] element type T, or null: wy_fwd stores the chunk inverse Tm (row r of a
                               // chunk at its token) for chunk_bwd; the backward's recompute sets it
  float* ht;                   // [N,H,K,V] fp32 or null
  chunk::SeqLayout seq;
  int H, K, V;
  float scale;
  bool vec_k, vec_v;           // 16-byte loads allowed along K / V
  int state_warps;             // warps a block of the mma.sync sequential passes: 0 = chosen from the problem size
  bool state_mma_sync;         // the mma.sync sequential passes even where the wgmma ones could run
};

struct BwdParams {
  FwdParams f;                 // inputs, w/u/vn/h recomputed by the forward kernels
  const void* dout;            // [B,T,H,V]
  const float* dht;            // [N,H,K,V] fp32 or null
  void *dh, *dvn, *dvl;        // workspaces: [slots,H,K,V], [B,T,H,V], [B,T,H,V] (P^T dO)
  void *dq, *dk, *dv;          // [B,T,H,K|V]
  float *dbeta, *dg, *dh0;     // [B,T,H] fp32, [B,T,H] fp32 (or null), [N,H,K,V] fp32 (or null)
  int64_t slots;               // chunk slots (set by the launcher; chunk_bwd walks slots x H work items)
};


struct StepParams {
  const void *q, *k, *v;     // [B,T,H,K|V], element type T of the kernel, any strides (elements)
  const void *beta, *g;      // [B,T,H], element kinds beta_kind / g_kind; g null: ungated (a_t = 1)
  const void* state_indices; // [B] int32 (idx64 false) / int64, or null (row b uses state[b]); < 0: padding row
  float* state;              // [N,H,K,V] fp32, contiguous, updated in place
  void* o;                   // [B,T,H,V] contiguous, element type T
  int64_t q_stride[4], k_stride[4], v_stride[4], beta_stride[3], g_stride[3], idx_stride;
  int64_t N;
  int B, T, H, K, V;
  float scale;
  FloatKind beta_kind, g_kind;
  bool idx64;
  bool vec_state;            // 16-byte state accesses: V % 4 == 0 and a 16-byte aligned state pointer
  bool v2;                   // step_kernel_v2 where it covers the shape (default; LINFLOW_STEP_KERNEL=v1: false)
};

// Chunk forward: wy_fwd, state_fwd and (want_output) chunk_local (the output). q, k, v bf16 or fp16; K <= 256.
cudaError_t launch_chunk_forward(FwdParams& p, Elem e, int64_t slots, int64_t N, bool want_output, cudaStream_t s);
// Chunk backward: the recompute of w, u, h, vn (into b.f's buffers, Tm into b.f.tm), P^T dO (chunk_local), state_bwd and
// chunk_bwd. K <= 128. `side` (null or s: one stream) runs the dVn / dS pass beside the recompute; s waits for it.
cudaError_t launch_chunk_backward(BwdParams& b, Elem e, int64_t slots, int64_t N, cudaStream_t s, cudaStream_t side);
constexpr int kStepColumns = 32;  // state columns per decode-step block

// Decode step over `blocks` = ceil(V / 32) * H * B blocks (p.v2: step_kernel_v2 sizes its own, fewer, blocks).
cudaError_t launch_step(const StepParams& p, Elem e, int64_t blocks, cudaStream_t s);

}  // namespace linflow::delta_rule
