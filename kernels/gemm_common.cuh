// Building blocks shared by the tensor-core GEMMs (gemm_int8.cu, gemm_mixed.cu):
// cp.async tile loads with zero fill, mma.sync wrappers, the epilogue store.
// Plain CUDA, no torch headers. Operands are K-contiguous: A [M, K] and B [N, K]
// (the nn.Linear weight layout), so both mma fragments are 32-bit shared-memory loads.
#pragma once
#include <algorithm>
#include <cstdint>

#include "common.cuh"
#include "launchers.h"

namespace msmartcompute::cuda {

__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
  // Copies src_bytes (0 or 16) and zero-fills the rest of the 16-byte destination.
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(src_bytes));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int kPending>
__device__ __forceinline__ void cp_async_wait() { asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending)); }

// Copies rows [row0, row0 + kRows) x elements [k0, k0 + kBk) of a K-contiguous matrix
// g [rows, K] (row stride ld elements) into smem [kRows][smem_stride bytes]; zero
// outside rows x K, so partial tiles add nothing to the dot products. E is the
// element's storage type (int8_t or uint16_t for half / bfloat16 bits).
// kAligned: K, ld and g are 16-byte multiples -> asynchronous 16-byte cp.async;
// otherwise element-wise predicated loads (any K, any alignment) stored as 16 bytes.
template <typename E, int kRows, int kBk, int kThreads, bool kAligned>
__device__ __forceinline__ void load_tile(uint8_t* smem, int smem_stride, const E* __restrict__ g, int64_t ld,
                                          int64_t row0, int64_t rows, int64_t k0, int64_t K) {
  constexpr int kElems = 16 / sizeof(E);  // per 16-byte chunk
  constexpr int kChunksPerRow = kBk / kElems;
  static_assert(kBk % kElems == 0, "tile K must be a whole number of 16-byte chunks");
#pragma unroll
  for (int c = threadIdx.x; c < kRows * kChunksPerRow; c += kThreads) {
    const int r = c / kChunksPerRow, kc = c % kChunksPerRow;
    const int64_t row = row0 + r, k = k0 + int64_t(kc) * kElems;
    uint8_t* dst = smem + r * smem_stride + kc * 16;
    if constexpr (kAligned) {
      const bool inside = row < rows && k < K;  // K % kElems == 0: all 16 bytes or none
      cp_async_16(dst, inside ? g + row * ld + k : g, inside ? 16 : 0);
    } else {
      alignas(16) E vals[kElems];
#pragma unroll
      for (int j = 0; j < kElems; ++j) vals[j] = (row < rows && k + j < K) ? g[row * ld + k + j] : E(0);
      *reinterpret_cast<int4*>(dst) = *reinterpret_cast<const int4*>(vals);
    }
  }
}

__device__ __forceinline__ uint32_t load_u32(const uint8_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// D[16x8] += A[16x32] * B[32x8], s8 inputs, s32 accumulators (IMMA.16832).
__device__ __forceinline__ void mma_s8_16832(int32_t (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k32.row.col.s32.s8.s8.s32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+r"(d[0]), "+r"(d[1]), "+r"(d[2]), "+r"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// D[16x8] += A[16x16] * B[16x8], f16 or bf16 inputs, f32 accumulators (HMMA.16816.F32).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&d)[4], const uint32_t (&a)[4],
                                                         const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// Activation codes as in csrc/gemm.h: 0 none, 1 relu, 2 gelu (erf), 3 silu.
__device__ __forceinline__ float activate(float x, int activation) {
  switch (activation) {
    case 1: return fmaxf(x, 0.f);
    case 2: return 0.5f * x * (1.f + erff(x * 0.70710678118654752f));
    case 3: return x / (1.f + expf(-x));
    default: return x;
  }
}

__device__ __forceinline__ void store_out(void* c, int64_t i, float v, FloatType type) {
  switch (type) {
    case FloatType::kFloat32: static_cast<float*>(c)[i] = v; break;
    case FloatType::kFloat16: static_cast<__half*>(c)[i] = __float2half_rn(v); break;
    case FloatType::kBFloat16: static_cast<__nv_bfloat16*>(c)[i] = __float2bfloat16_rn(v); break;
  }
}

// Dynamic shared memory above 48 KiB has to be opted into once per kernel.
template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, int bytes) {
  return bytes > 48 * 1024 ? cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes)
                           : cudaSuccess;
}

inline bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Split-K for the decode tiles (M <= 32): an [M, 4096] x [4096, 4096] GEMM is 64 blocks of
// 32 x 64, half a wave on a 132-SM H200, each streaming all of K. Splitting K gives about two
// blocks per SM (so more weight bytes in flight); each split writes its partial sums to a
// [splits, M, N] workspace that a second kernel adds up in a fixed order (deterministic) and
// runs the epilogue on. At least 4 K tiles per split keep the cp.async pipeline full.
struct SplitK {
  int splits = 1;
  int k_tiles_per_split = 0;
};

inline SplitK plan_split_k(int64_t M, int64_t N, int64_t K, int bm, int bn, int bk) {
  const int64_t k_tiles = (K + bk - 1) / bk;
  SplitK plan{1, static_cast<int>(k_tiles)};
  if (M > 32 || k_tiles < 8) return plan;
  int device = 0, sms = 0;
  if (cudaGetDevice(&device) != cudaSuccess ||
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device) != cudaSuccess)
    return plan;
  const int64_t blocks = ((N + bn - 1) / bn) * ((M + bm - 1) / bm);
  int64_t splits = std::min<int64_t>({(2 * sms + blocks - 1) / blocks, k_tiles / 4, 8});
  if (splits <= 1) return plan;
  plan.k_tiles_per_split = static_cast<int>((k_tiles + splits - 1) / splits);
  plan.splits = static_cast<int>((k_tiles + plan.k_tiles_per_split - 1) / plan.k_tiles_per_split);
  return plan;
}

}  // namespace msmartcompute::cuda
