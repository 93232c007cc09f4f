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
  // int32 = a_q[M,K] @ b_q[N,K]^T (int8 operands, int32 accumulation); unless
  // out_dtype is int32 (raw accumulator, bias must be None) the epilogue returns
  // acc * a_scale[m] * b_scale[n] + bias[n] as out_dtype (bfloat16 when None).
  m.def("int8_matmul(Tensor a_q, Tensor b_q, Tensor a_scale, Tensor b_scale, Tensor? bias=None, "
        "ScalarType? out_dtype=None) -> Tensor");
  // x[..., K] @ dequant(w_q[N,K], w_scale[N])^T + bias as x.dtype. mode "w8a8": x is
  // quantized per token (quantize_int8 rounding) and runs the int8 GEMM; "w8a16": x
  // stays floating point and the weights are converted in registers.
  m.def("int8_linear(Tensor x, Tensor w_q, Tensor w_scale, Tensor? bias=None, str mode=\"w8a8\") -> Tensor");
  // activation(a[M,K] @ b[N,K]^T + bias[N]) with float32 accumulation; activation is
  // None, "relu", "gelu" (erf form) or "silu"; out_dtype defaults to a.dtype.
  m.def("mixed_gemm(Tensor a, Tensor b, Tensor? bias=None, str? activation=None, "
        "ScalarType? out_dtype=None) -> Tensor");
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
