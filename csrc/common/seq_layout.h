// Where the sequences of a (possibly packed) batch and their chunks live: shared by host launchers and kernels.
#pragma once
#include <cstdint>

#ifdef __CUDACC__
#define LINFLOW_HD __host__ __device__
#else
#define LINFLOW_HD
#endif

namespace linflow::chunk {

constexpr int C = 64;  // chunk length of the CUDA kernels

// Where sequences and their chunk slots live. Dense: N = B sequences of length T at n*T. Varlen: cu_seqlens
// (int64, device) gives the offsets. Per-chunk buffers (states) use slot = first_slot(n) + c with
// first_slot(n) = floor(bos / C) + n for varlen (a sync-free upper bound: ceil(T/C) + N slots in all).
struct SeqLayout {
  const int64_t* cu;  // null: dense
  int64_t T;          // dense length per sequence, or total packed length
  int N;              // number of sequences

  LINFLOW_HD inline void seq(int n, int64_t& bos, int64_t& len) const {
    if (cu) {
      bos = cu[n];
      len = cu[n + 1] - bos;
    } else {
      bos = n * T;
      len = T;
    }
  }
  LINFLOW_HD inline int64_t first_slot(int n, int64_t bos) const {
    return cu ? bos / C + n : n * ((T + C - 1) / C);
  }
  // Slot -> (sequence, chunk). Returns false for an unused slot.
  LINFLOW_HD inline bool locate(int64_t slot, int& n, int64_t& c, int64_t& bos, int64_t& len) const {
    if (!cu) {
      const int64_t nc = (T + C - 1) / C;
      n = static_cast<int>(slot / nc);
      c = slot % nc;
      bos = n * T;
      len = T;
      return n < N;
    }
    int lo = 0, hi = N - 1;  // last n with first_slot(n) <= slot
    while (lo < hi) {
      const int mid = (lo + hi + 1) / 2;
      if (cu[mid] / C + mid <= slot) lo = mid; else hi = mid - 1;
    }
    n = lo;
    bos = cu[n];
    len = cu[n + 1] - bos;
    c = slot - (bos / C + n);
    return c * C < len;
  }
};

inline int64_t num_slots(bool varlen, int64_t T, int64_t N) {
  return varlen ? (T + C - 1) / C + N : N * ((T + C - 1) / C);
}

}  // namespace linflow::chunk
