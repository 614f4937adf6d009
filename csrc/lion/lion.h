// LION (bidirectional linear attention, ALGORITHMS.md §4): argument checks and the device-generic ATen forms
// (lion_aten.cpp) that serve the CPU and every CUDA case the sweep kernels (kernels.cuh, cuda_host.cpp) do not take.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>
#include <tuple>

namespace linflow::lion {

enum class Decay { none, fixed, selective };
enum class Convention { symmetric, lion_code };
enum class Mode { chunked, full, recurrent };

struct Config {
  int64_t B, T, H, K, V, N;  // N: number of sequences (B, or len(cu_seqlens) - 1)
  Decay decay;
  Convention convention;
  Mode mode;  // "auto" resolved
  bool normalize;
  double eps, scale;
  int64_t chunk_size;
};

// Validates every argument of lion_fwd / lion_bwd and returns the problem sizes and parsed options.
Config check_args(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                  const std::optional<at::Tensor>& g, const std::optional<at::Tensor>& g_backward,
                  const std::optional<at::Tensor>& lam, const std::optional<at::Tensor>& cu_seqlens,
                  const std::string& decay, const std::string& decay_convention, bool normalize, double eps,
                  double scale, const std::string& mode, int64_t chunk_size);

at::Tensor fwd_aten(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
                    const std::optional<at::Tensor>& g_backward, const std::optional<at::Tensor>& lam,
                    const std::optional<at::Tensor>& cu_seqlens, c10::string_view decay,
                    c10::string_view decay_convention, bool normalize, double eps, double scale,
                    c10::string_view mode, int64_t chunk_size);

// (dq, dk, dv, dg, dg_backward, dlam); absent inputs get empty tensors.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> bwd_aten(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& g,
    const std::optional<at::Tensor>& g_backward, const std::optional<at::Tensor>& lam,
    const std::optional<at::Tensor>& cu_seqlens, const at::Tensor& grad_o, c10::string_view decay,
    c10::string_view decay_convention, bool normalize, double eps, double scale, c10::string_view mode,
    int64_t chunk_size);

}  // namespace linflow::lion
