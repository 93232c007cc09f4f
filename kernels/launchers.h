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
// Bytes of scratch launch_attention_fwd needs for these sizes (0 when it does not split keys).
size_t attention_fwd_workspace_bytes(int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D);

// Fused attention forward, fp16/bf16, head dim 32/64/128/256, contiguous tensors:
// out = softmax(q k^T * scale [+ causal mask aligned to the end]) v and its log-sum-exp.
cudaError_t launch_attention_fwd(const void* q,      // [B, H, Sq, D] of `type`
                                 const void* k,      // [B, Hkv, Sk, D]
                                 const void* v,      // [B, Hkv, Sk, D]
                                 void* out,          // [B, H, Sq, D]
                                 float* lse,         // [B, H, Sq], natural log
                                 void* workspace,    // attention_fwd_workspace_bytes(...) bytes, or null if 0
                                 int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, bool causal,
                                 float scale, FloatType type, cudaStream_t stream);

// Fused attention backward, fp16/bf16, head dim 32/64/128, contiguous tensors: dq, dk, dv from
// the forward's out and log-sum-exp (probabilities recomputed, never stored).
cudaError_t launch_attention_bwd(const void* dout,   // [B, H, Sq, D] of `type`
                                 const void* q,      // [B, H, Sq, D]
                                 const void* k,      // [B, Hkv, Sk, D]
                                 const void* v,      // [B, Hkv, Sk, D]
                                 const void* out,    // [B, H, Sq, D]
                                 const float* lse,   // [B, H, Sq], natural log
                                 float* delta,       // [B, H, Sq] scratch: rowsum(dout * out)
                                 void* dq,           // [B, H, Sq, D]
                                 void* dk,           // [B, Hkv, Sk, D]
                                 void* dv,           // [B, Hkv, Sk, D]
                                 int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, bool causal,
                                 float scale, FloatType type, cudaStream_t stream);

}  // namespace msmartcompute::cuda
