// The whole C++ API on one screen: every op schema of linflow. Kernels register per dispatch key in their
// family folders (csrc/<family>/cpu.cpp, csrc/<family>/cuda.cu).
#include <torch/library.h>

// Python imports linflow._C to load this library; it needs a module init symbol.
#include <Python.h>
extern "C" PyObject* PyInit__C(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module);
}

TORCH_LIBRARY(linflow, m) {
  // Row L2 norm over the last dim (use_qk_l2norm): y = x (sum x^2 + eps)^-1/2 in x's dtype, computed in fp32; rstd
  // [x.shape[:-1]] fp32 (fp64 for fp64 x). The backward takes x and rstd.
  m.def("l2norm_fwd(Tensor x, float eps) -> (Tensor, Tensor)");
  m.def("l2norm_bwd(Tensor grad_y, Tensor x, Tensor rstd) -> Tensor");

  // Delta rule / Gated DeltaNet (ALGORITHMS.md §1). q,k [B,T,H,K]; v [B,T,H,V]; beta, g [B,T,H];
  // initial_state [N,H,K,V]; cu_seqlens [N+1] (B == 1). Returns o [B,T,H,V] and the final state
  // [N,H,K,V] (fp32; an empty tensor unless output_final_state).
  m.def(
      "delta_rule_fwd(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, "
      "Tensor? cu_seqlens, float scale, bool output_final_state, int chunk_size) -> (Tensor, Tensor)");
  // Gradients of delta_rule_fwd: (dq, dk, dv, dbeta, dg, dinitial_state); dg / dinitial_state are empty
  // tensors when g / initial_state are absent.
  m.def(
      "delta_rule_bwd(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, "
      "Tensor? cu_seqlens, Tensor grad_o, Tensor? grad_final_state, float scale, int chunk_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Recurrent decode step: q,k [B,T,H,K] (a few tokens), state [N,H,K,V] fp32 updated in place; row b of the
  // batch uses state[state_indices[b]] (or state[b]). Returns o [B,T,H,V].
  m.def(
      "delta_rule_step(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor(a!) state, "
      "Tensor? state_indices, float scale) -> Tensor");

  // Rank-R delta rule (ParallelFlow / DeltaProduct, ALGORITHMS.md §2). q [B,T,H,K]; k [B,T,R,H,K];
  // v [B,T,R,H,V]; beta [B,T,R,H]; g [B,T,H]; form "product" | "simultaneous"; scan "sequential" | "parallel" |
  // "auto". Returns o [B,T,H,V] and the final state as delta_rule_fwd.
  m.def(
      "flow_fwd(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, Tensor? cu_seqlens, "
      "float scale, bool output_final_state, str form, str scan) -> (Tensor, Tensor)");
  // Gradients of flow_fwd: (dq, dk, dv, dbeta, dg, dinitial_state), empty dg / dinitial_state when absent.
  m.def(
      "flow_bwd(Tensor q, Tensor k, Tensor v, Tensor beta, Tensor? g, Tensor? initial_state, Tensor? cu_seqlens, "
      "Tensor grad_o, Tensor? grad_final_state, float scale, str form, str scan) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Affine state map S_out = P S_in + Q of every segment of `segment` tokens (the last one zero-padded):
  // P [B, NS, H, K, K], Q [B, NS, H, K, V] in fp32 (fp64 for fp64 inputs). Differentiable (composite ATen).
  m.def("flow_transition(Tensor k, Tensor v, Tensor beta, Tensor? g, str form, int segment) -> (Tensor, Tensor)");

  // LION, bidirectional linear attention (ALGORITHMS.md §4). q,k [B,T,H,K]; v [B,T,H,V]; g, g_backward [B,T,H]
  // log decays (decay "selective"); lam [H] in (0, 1) (decay "fixed"); cu_seqlens [N+1] (B == 1).
  // decay: "none" | "fixed" | "selective"; decay_convention: "symmetric" | "lion_code"; mode: "auto" | "chunked" |
  // "full" | "recurrent" (forward only). Returns o [B,T,H,V].
  m.def(
      "lion_fwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? g_backward, Tensor? lam, Tensor? cu_seqlens, "
      "str decay, str decay_convention, bool normalize, float eps, float scale, str mode, int chunk_size) -> Tensor");
  // Gradients of lion_fwd: (dq, dk, dv, dg, dg_backward, dlam); empty tensors for absent inputs.
  m.def(
      "lion_bwd(Tensor q, Tensor k, Tensor v, Tensor? g, Tensor? g_backward, Tensor? lam, Tensor? cu_seqlens, "
      "Tensor grad_o, str decay, str decay_convention, bool normalize, float eps, float scale, str mode, "
      "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");

  // Deltaformer (ALGORITHMS.md §3). q [B,T,H,K]; k, w [B,T,Hkv,K] (H % Hkv == 0; w absent: w = k); v [B,T,Hkv,V];
  // beta [B,T,Hkv] (absent: 1); cu_seqlens [N+1] (B == 1). Returns o [B,T,H,V] and, for the backward, the
  // pseudo-values u and r = P u [B,T,Hkv,V] and the log-sum-exps of the write and read softmaxes, lse_w [B,T,Hkv]
  // and lse_o [B,T,H] (u, r, lse_* in fp32; fp64 for fp64 inputs).
  m.def(
      "deltaformer_fwd(Tensor q, Tensor k, Tensor v, Tensor? beta, Tensor? w, Tensor? cu_seqlens, float scale, "
      "int chunk_size) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  // Gradients of deltaformer_fwd given grad_o (and grad_u, the cotangent of u, if u is used): (dq, dk, dv, dbeta,
  // dw); dbeta / dw are empty tensors when beta / w are absent.
  m.def(
      "deltaformer_bwd(Tensor q, Tensor k, Tensor v, Tensor? beta, Tensor? w, Tensor? cu_seqlens, Tensor o, "
      "Tensor u, Tensor r, Tensor lse_w, Tensor lse_o, Tensor grad_o, Tensor? grad_u, float scale, int chunk_size) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor)");
}
