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
  // Variable-length attention over packed sequences (no padding): q [total_q, H, D], k and v
  // [total_k, Hkv, D], H % Hkv == 0; cu_seqlens_q / cu_seqlens_k int32 [B + 1] are the sequences'
  // start offsets (cu[0] = 0, cu[B] = total), max_seqlen_* bound their lengths. Sequence b's
  // queries attend to its keys only; causal aligns the mask to the end of each sequence (query i
  // sees keys j <= i + len_k - len_q), and a query that sees no key gets zeros (lse -inf).
  // q/k/v may have any strides on the token and head dims (last dim contiguous). Returns
  // (out [total_q, H, D] contiguous in q's dtype, lse float32 [H, total_q], natural log).
  m.def("varlen_attention_fwd(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
        "int max_seqlen_q, int max_seqlen_k, bool causal, float scale) -> (Tensor out, Tensor lse)");
  // Gradients of varlen_attention_fwd's out with respect to q, k, v (shaped like them).
  m.def("varlen_attention_bwd(Tensor grad_out, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
        "Tensor cu_seqlens_q, Tensor cu_seqlens_k, int max_seqlen_q, int max_seqlen_k, bool causal, "
        "float scale) -> (Tensor grad_q, Tensor grad_k, Tensor grad_v)");
  // Attention against a paged KV cache (decode and chunked prefill): q [B, Sq, H, D]; k_cache and
  // v_cache [num_blocks, block_size, Hkv, D]; block_table int32 [B, max_blocks] (sequence b's key
  // j lives in block block_table[b, j / block_size], row j % block_size); seq_lens int32 [B] keys
  // per sequence, the new tokens included. Causal aligned to the end: query i of sequence b sees
  // keys j <= seq_lens[b] - Sq + i; a query that sees no key gets zeros. Any strides on every dim
  // but the last. Returns out [B, Sq, H, D] contiguous in q's dtype.
  m.def("paged_attention(Tensor q, Tensor k_cache, Tensor v_cache, Tensor block_table, Tensor seq_lens, "
        "float scale) -> Tensor");
  // Writes new keys/values into the paged cache in place: k and v [N, Hkv, D] go to row
  // slot_mapping[n] % block_size of block slot_mapping[n] / block_size (slot_mapping int64 [N]);
  // a negative slot skips that token (padding).
  m.def("reshape_and_cache(Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, Tensor slot_mapping) -> ()");
}
