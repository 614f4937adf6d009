// Argument checks at the op boundary. Every message names the op and the argument and says expected vs actual.
#pragma once
#include <ATen/ATen.h>
#include <optional>
#include <string>

namespace linflow {

inline std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

inline bool is_supported_float(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// `t` must be a floating tensor (fp32 / bf16 / fp16, fp64 on CPU) of rank `dims.size()` on `device`, whose
// sizes match `dims` where dims[i] >= 0.
inline void check_float_tensor(const char* op, const char* name, const at::Tensor& t, at::IntArrayRef dims,
                               const at::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is undefined");
  TORCH_CHECK(is_supported_float(t.scalar_type()), op, ": ", name, " must be float32, bfloat16 or float16 (float64 on CPU), got ",
              t.scalar_type());
  TORCH_CHECK(t.device() == device, op, ": ", name, " is on ", t.device(), " but q is on ", device,
              " (all tensors must be on one device)");
  TORCH_CHECK(!(t.scalar_type() == at::kDouble && t.is_cuda()), op, ": ", name, " is float64 on CUDA; float64 runs on CPU only");
  TORCH_CHECK(t.dim() == (int64_t)dims.size(), op, ": ", name, " must have ", dims.size(), " dims (expected shape ",
              shape_str(dims), ", -1 = any), got shape ", shape_str(t.sizes()));
  for (size_t i = 0; i < dims.size(); ++i)
    TORCH_CHECK(dims[i] < 0 || t.size(i) == dims[i], op, ": ", name, " has shape ", shape_str(t.sizes()), " but expected ",
                shape_str(dims), " (-1 = any); mismatch at dim ", i);
}

inline void check_optional_float_tensor(const char* op, const char* name, const std::optional<at::Tensor>& t,
                                        at::IntArrayRef dims, const at::Device& device) {
  if (t.has_value() && t->defined()) check_float_tensor(op, name, *t, dims, device);
}

// Head dims our kernels are built for.
inline void check_head_dim(const char* op, const char* name, int64_t d) {
  TORCH_CHECK(d >= 1 && d <= 256, op, ": ", name, " = ", d, " is not supported (expected 1..256)");
}

// q [B, T, H, K], k [B, T, Hkv, K], v [B, T, Hkv, V] of one dtype, head dims in 1..256. Hkv == H unless
// `grouped` (then H % Hkv == 0: grouped-query attention).
struct QKVShape {
  int64_t B, T, H, Hkv, K, V;
};

inline QKVShape check_qkv(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                          bool grouped = false) {
  TORCH_CHECK(q.defined() && q.dim() == 4, op, ": q must have shape [B, T, H, K], got ",
              q.defined() ? shape_str(q.sizes()) : std::string("undefined"));
  const int64_t B = q.size(0), T = q.size(1), H = q.size(2), K = q.size(3);
  const at::Device dev = q.device();
  check_float_tensor(op, "q", q, {B, T, H, K}, dev);
  int64_t Hkv = H;
  if (grouped) {
    TORCH_CHECK(k.defined() && k.dim() == 4, op, ": k must have shape [B, T, Hkv, K] = [", B, ", ", T, ", Hkv, ", K,
                "], got ", k.defined() ? shape_str(k.sizes()) : std::string("undefined"));
    Hkv = k.size(2);
    TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, op, ": k has ", Hkv, " heads, which must divide the ", H,
                " query heads of q (grouped-query attention)");
  }
  check_float_tensor(op, "k", k, {B, T, Hkv, K}, dev);
  TORCH_CHECK(v.defined() && v.dim() == 4, op, ": v must have shape [B, T, ", grouped ? "Hkv" : "H", ", V] = [", B,
              ", ", T, ", ", Hkv, ", V], got ", v.defined() ? shape_str(v.sizes()) : std::string("undefined"));
  const int64_t V = v.size(3);
  check_float_tensor(op, "v", v, {B, T, Hkv, V}, dev);
  TORCH_CHECK(k.scalar_type() == q.scalar_type() && v.scalar_type() == q.scalar_type(), op,
              ": q, k, v must share one dtype, got q ", q.scalar_type(), ", k ", k.scalar_type(), ", v ", v.scalar_type());
  check_head_dim(op, "head dim K (q.size(-1))", K);
  check_head_dim(op, "head dim V (v.size(-1))", V);
  return {B, T, H, Hkv, K, V};
}

// cu_seqlens: int32/int64, 1-D [N+1], on the data's device, starts at 0, ends at total_t, non-decreasing.
// The monotonic / endpoint checks read values: done on CPU tensors only (no device sync on CUDA).
inline int64_t check_cu_seqlens(const char* op, const std::optional<at::Tensor>& cu, int64_t batch, int64_t total_t,
                                const at::Device& device) {
  if (!cu.has_value() || !cu->defined()) return batch;
  const at::Tensor& c = *cu;
  TORCH_CHECK(c.scalar_type() == at::kInt || c.scalar_type() == at::kLong, op, ": cu_seqlens must be int32 or int64, got ",
              c.scalar_type());
  TORCH_CHECK(c.dim() == 1 && c.size(0) >= 2, op, ": cu_seqlens must be 1-D [N+1] with N >= 1, got shape ", shape_str(c.sizes()));
  TORCH_CHECK(c.device() == device, op, ": cu_seqlens is on ", c.device(), " but q is on ", device);
  TORCH_CHECK(batch == 1, op, ": with cu_seqlens the batch size must be 1 (sequences packed along T), got B = ", batch);
  if (c.is_cpu()) {
    at::Tensor cl = c.to(at::kLong);
    const int64_t* p = cl.data_ptr<int64_t>();
    TORCH_CHECK(p[0] == 0, op, ": cu_seqlens[0] must be 0, got ", p[0]);
    for (int64_t i = 1; i < c.size(0); ++i)
      TORCH_CHECK(p[i] >= p[i - 1], op, ": cu_seqlens must be non-decreasing, but cu_seqlens[", i, "] = ", p[i],
                  " < cu_seqlens[", i - 1, "] = ", p[i - 1]);
    TORCH_CHECK(p[c.size(0) - 1] == total_t, op, ": cu_seqlens[-1] = ", p[c.size(0) - 1], " must equal the total length T = ",
                total_t);
  }
  return c.size(0) - 1;
}

}  // namespace linflow
