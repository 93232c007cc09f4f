// Host launchers of the CUDA kernels: raw pointers, sizes and a stream, no
// torch types, so the .cu files build with nvcc alone. The torch glue that
// checks, allocates and registers lives in csrc/cuda/*.cpp.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace msmartcompute::cuda {

enum class FloatType { kFloat32, kFloat16, kBFloat16 };

// Row-wise symmetric int8 quantization of a contiguous [rows, cols] matrix.
cudaError_t launch_quantize_int8(const void* x,    // [rows, cols] of `type`
                                 int8_t* q,        // [rows, cols]
                                 float* scale,     // [rows]
                                 int64_t rows, int64_t cols, FloatType type, cudaStream_t stream);

// out[r, c] = q[r, c] * scale[r], written as `type`.
cudaError_t launch_dequantize_int8(const int8_t* q,     // [rows, cols]
                                   const float* scale,  // [rows]
                                   void* out,           // [rows, cols] of `type`
                                   int64_t rows, int64_t cols, FloatType type, cudaStream_t stream);

// C = A @ B^T on int8 tensor cores with int32 accumulation. raw_int32: C is the
// int32 accumulator; else C[m, n] = acc * a_scale[m] * b_scale[n] + bias[n] as out_type.
// Rows of A and B are K-contiguous with row strides lda / ldb (elements); any K works,
// 16-byte aligned rows (K, lda, ldb multiples of 16) take the cp.async path.
cudaError_t launch_int8_gemm(const int8_t* a,        // [M, K]
                             int64_t lda,
                             const int8_t* b,        // [N, K]
                             int64_t ldb,
                             const float* a_scale,   // [M]
                             const float* b_scale,   // [N]
                             const float* bias,      // [N] or nullptr
                             void* c,                // [M, N] contiguous, int32 or out_type
                             int64_t M, int64_t N, int64_t K, bool raw_int32, FloatType out_type,
                             void* workspace,        // int8_gemm_workspace_bytes(M, N, K) bytes, or nullptr
                             cudaStream_t stream);
// Bytes of scratch launch_int8_gemm uses to split K for these sizes (0: no split). Without
// it (workspace nullptr) the decode GEMM runs unsplit.
size_t int8_gemm_workspace_bytes(int64_t M, int64_t N, int64_t K);

// C = activation(A @ B^T * b_scale[n] + bias[n]) on fp16/bf16 tensor cores with float32
// accumulation, written as out_type. A is `a_type` (kFloat16 or kBFloat16); B is the same
// type, or int8 when b_int8 (w8a16: converted in registers, b_scale applied in the
// epilogue; b_scale is nullptr otherwise). activation: 0 none, 1 relu, 2 gelu (erf), 3 silu.
// Rows are K-contiguous with row strides lda / ldb (elements); any K works.
cudaError_t launch_mixed_gemm(const void* a,         // [M, K] of a_type
                              int64_t lda,
                              const void* b,         // [N, K] of a_type, or int8 when b_int8
                              int64_t ldb,
                              bool b_int8,
                              const float* b_scale,  // [N] or nullptr
                              const float* bias,     // [N] or nullptr
                              void* c,               // [M, N] contiguous, out_type
                              int64_t M, int64_t N, int64_t K, FloatType a_type, FloatType out_type,
                              int activation,
                              void* workspace,       // mixed_gemm_workspace_bytes(M, N, K) bytes, or nullptr
                              cudaStream_t stream);
// Bytes of scratch launch_mixed_gemm uses to split K for these sizes (0: no split).
size_t mixed_gemm_workspace_bytes(int64_t M, int64_t N, int64_t K);

// ---- Attention (kernels/attention.cu) ------------------------------------------------------
// An operand seen as [batch][head][row][D] with element strides; D is contiguous, and every row
// must start 16-byte aligned (data 16-byte aligned, strides multiples of 8 elements). Varlen: the
// batch stride is 0 and batch b's rows start at cu_seqlens[b]. Paged K/V caches
// [num_blocks, block_size, Hkv, D]: "batch" is the cache block, "row" the slot inside it.
// lse / delta use the same strides for float rows (D = 1, any alignment).
struct StridedRows {
  void* data = nullptr;
  int64_t batch_stride = 0, head_stride = 0, row_stride = 0;
};

// One attention call: dense ([B, H, Sq, D] views, any strides), varlen (cu_seqlens_q/k) or paged
// K/V (block_table + seq_lens_k). q heads H = Hkv * G: query head h reads kv head h / G. Causal is
// aligned bottom-right per sequence: query i of a sequence with Sq queries and Sk keys sees keys
// j <= i + Sk - Sq (a row that sees no key gets out = 0, lse = -inf).
struct AttentionParams {
  StridedRows q, k, v, out, lse;
  int64_t B = 0, H = 0, Hkv = 0, D = 0;
  int64_t max_seqlen_q = 0, max_seqlen_k = 0;  // dense: Sq and Sk; paged: max_seqlen_k bounds seq_lens_k
  const int32_t* cu_seqlens_q = nullptr;       // varlen [B + 1]
  const int32_t* cu_seqlens_k = nullptr;       // varlen [B + 1]
  const int32_t* seq_lens_k = nullptr;         // paged [B]: keys of each sequence
  const int32_t* block_table = nullptr;        // paged [B, block_table_stride]: cache block of each key block
  int64_t block_table_stride = 0, block_size = 0;
  bool causal = false;
  float scale = 1.f;
};

// The gradient operands of the backward; delta: float scratch with lse's strides.
struct AttentionGradParams {
  StridedRows dout, dq, dk, dv, delta;
};

// Bytes of scratch launch_attention_fwd needs (0 when it does not split the keys across blocks).
size_t attention_fwd_workspace_bytes(const AttentionParams& p);

// Forward, fp16/bf16, head dim 32/64/128/256: out = softmax(q k^T * scale [+ mask]) v and lse
// (natural log). workspace: attention_fwd_workspace_bytes(p) bytes, or null when that is 0.
cudaError_t launch_attention_fwd(const AttentionParams& p, void* workspace, FloatType type, cudaStream_t stream);

// Backward of a dense or varlen forward (not paged), fp16/bf16, head dim 32/64/128: dq, dk, dv
// from the forward's out and lse (probabilities recomputed, never stored).
cudaError_t launch_attention_bwd(const AttentionParams& p, const AttentionGradParams& g, FloatType type,
                                 cudaStream_t stream);

// ---- Paged KV cache (kernels/kv_cache.cu) ----------------------------------------------------
// k_cache[slot / block_size, slot % block_size] = k[n] (and v likewise) for every token n with
// slot = slot_mapping[n] >= 0; strides in elements: k/v [N, Hkv, D], caches [blocks, block_size, Hkv, D].
struct KvCacheWrite {
  const void* k = nullptr;
  const void* v = nullptr;
  void* k_cache = nullptr;
  void* v_cache = nullptr;
  const int64_t* slot_mapping = nullptr;  // [N]
  int64_t k_stride[3] = {}, v_stride[3] = {}, k_cache_stride[4] = {}, v_cache_stride[4] = {};
  int64_t N = 0, Hkv = 0, D = 0, block_size = 0;
  int64_t capacity = 0;  // blocks * block_size: larger slots write nothing
};
// element_bytes: 2 (fp16/bf16) or 4 (fp32); the copy moves bits, so any dtype of that size works.
cudaError_t launch_write_kv_cache(const KvCacheWrite& w, int element_bytes, cudaStream_t stream);

}  // namespace msmartcompute::cuda
