// The one list of msmartcompute op schemas. Device implementations register
// against these names: csrc/cpu/*.cpp (CPU key) and csrc/cuda/*.cpp (CUDA key,
// calling the launchers in kernels/*.cu).
#include <torch/library.h>

TORCH_LIBRARY(msmartcompute, m) {
  // Symmetric int8 quantization along `dim`: scale = absmax / 127 (1 for an
  // all-zero slice), q = round_half_even(x / scale) clamped to [-127, 127].
  // Returns (q int8 shaped like x, scale float32 shaped like x without `dim`).
  m.def("quantize_int8(Tensor x, int dim=-1) -> (Tensor, Tensor)");
  // Inverse of quantize_int8: q * scale broadcast along `dim`, cast to dtype
  // (float32 when None).
  m.def("dequantize_int8(Tensor q, Tensor scale, int dim=-1, ScalarType? dtype=None) -> Tensor");
  // Attention softmax(q k^T * scale) v: q [B, H, Sq, D], k and v [B, Hkv, Sk, D], H % Hkv == 0
  // (query head h reads kv head h / (H / Hkv)); causal aligns the mask to the end (query i sees
  // keys j <= Sk - Sq + i). Returns (out [B, H, Sq, D] in q's dtype, lse float32 [B, H, Sq], the
  // natural-log sum of exp of each scaled score row, kept for the backward).
  m.def("fused_attention_fwd(Tensor q, Tensor k, Tensor v, bool causal, float scale) -> (Tensor out, Tensor lse)");
  // Gradients of fused_attention_fwd's out with respect to q, k, v, recomputing the
  // probabilities from lse instead of storing them.
  m.def("fused_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, bool causal, "
        "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
}
