// Deltaformer read pass on CUDA (causal softmax attention of q over (k, u), ALGORITHMS.md §3): the plain parameter
// structs and the launchers of read_kernel.cu. No ATen here; the host side (cuda_host.cpp) converts, allocates and
// turns the returned CUDA status into an error.
#pragma once
#include <cuda_runtime_api.h>

#include <cstdint>

#include "common/seq_layout.h"

namespace linflow::deltaformer {

enum class ReadElem : int { bf16, f16 };  // operand type of q, k, u (u converted by the host), o, dO

// Head dims the kernels take: K, V multiples of 8 up to kReadMaxDim (zero-padded to 64 / 128 inside).
constexpr int kReadMaxDim = 128;

struct ReadFwdParams {
  const void *q, *k, *u;  // [B,T,H,K], [B,T,Hkv,K], [B,T,Hkv,V]: contiguous, element type ReadElem
  void* o;                // [B,T,H,V], element type ReadElem
  float* lse;             // [B,T,H]: natural-log log-sum-exp of s q.k over the row's keys
  chunk::SeqLayout seq;   // query / key tiles are chunk::C rows of one sequence
  int H, Hkv, K, V;
  float scale;
};

struct ReadBwdParams {
  ReadFwdParams f;          // q, k, u, o (read), lse (read), seq, sizes
  const void* dout;         // [B,T,H,V], element type ReadElem
  float* drow;              // [B,T,H] workspace: rowsum(dO o O)
  float *dq, *dk, *du;      // [B,T,H,K] (zeroed: atomics), [B,T,Hkv,K], [B,T,Hkv,V] (written in full)
};

// o, lse. `slots`: chunk::num_slots(varlen, T, N); `tokens`: B * T.
cudaError_t launch_read_fwd(const ReadFwdParams& p, ReadElem e, int64_t slots, cudaStream_t s);
// drow, then dq (accumulated into zeros), dk, du.
cudaError_t launch_read_bwd(const ReadBwdParams& b, ReadElem e, int64_t slots, int64_t tokens, cudaStream_t s);

}  // namespace linflow::deltaformer
