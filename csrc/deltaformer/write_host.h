// Host helpers shared by the write pass's forward and backward launchers (write_kernel.cu, write_bwd_kernel.cu).
#pragma once
#include <ATen/ATen.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <optional>
#include <type_traits>

namespace linflow::deltaformer::write_host {

// The head dims the write kernels are instantiated for.
inline bool head_dim_ok(int64_t d) { return d == 32 || d == 64 || d == 128; }

// Runtime head dim (32, 64 or 128) -> compile-time constant for f; any other: cudaErrorInvalidValue.
template <typename F>
cudaError_t with_dim(int64_t d, F&& f) {
  if (d == 32) return f(std::integral_constant<int, 32>{});
  if (d == 64) return f(std::integral_constant<int, 64>{});
  if (d == 128) return f(std::integral_constant<int, 128>{});
  return cudaErrorInvalidValue;
}

inline bool present(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined(); }

// Contiguous in `dtype` with a 16-byte aligned start (cp.async rows); a copy only when needed.
inline at::Tensor aligned(const at::Tensor& x, at::ScalarType dtype) {
  at::Tensor c = x.to(dtype).contiguous();
  if (reinterpret_cast<uintptr_t>(c.data_ptr()) % 16 != 0) c = c.clone();
  return c;
}

}  // namespace linflow::deltaformer::write_host
