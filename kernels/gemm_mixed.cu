// fp16 / bf16 GEMM on the tensor cores (mma.sync m16n8k16 -> HMMA) with float32
// accumulation and a fused epilogue: C = activation(A @ B^T * b_scale[n] + bias[n]).
// A is [M, K] half or bfloat16; B is [N, K] (nn.Linear layout) of the same type, or int8
// for w8a16: the int8 tile is converted to A's type in registers right before the mma
// (exact, |q| <= 127) and the per-channel scale is applied once in the epilogue.
//
// Same block structure as gemm_int8.cu: kBm x kBn tile, kWm x kWn warps, kStages-deep
// cp.async ring, shared rows padded by 16 bytes so fragment loads are conflict-free.
#include <type_traits>

#include "gemm_common.cuh"

namespace msmartcompute::cuda {
namespace {

template <typename T>
__device__ __forceinline__ uint32_t int8x2_to(const uint8_t* p);  // two int8 -> packed T x2
template <>
__device__ __forceinline__ uint32_t int8x2_to<__half>(const uint8_t* p) {
  __half2 h = __floats2half2_rn(float(int8_t(p[0])), float(int8_t(p[1])));
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t int8x2_to<__nv_bfloat16>(const uint8_t* p) {
  __nv_bfloat162 h = __floats2bfloat162_rn(float(int8_t(p[0])), float(int8_t(p[1])));
  return *reinterpret_cast<uint32_t*>(&h);
}

// One output element: act(v * b_scale[n] + bias[n]) stored as out_type. Not inlined:
// inlined into every accumulator register it took this file's sm_90 compile from 7 s to
// 173 s (measured on the 2-core dev box); it runs once per output element, after the K loop.
__device__ __noinline__ void epilogue_one(void* c, int64_t m, int64_t n, int64_t N, float v, const float* b_scale,
                                          const float* bias, FloatType out_type, int activation) {
  if (b_scale) v *= b_scale[n];
  if (bias) v += bias[n];
  store_out(c, m * N + n, activate(v, activation), out_type);
}

template <int kBm, int kBn, int kBk, int kWm, int kWn, int kStages, bool kBInt8>
struct MixedTile {
  static constexpr int kThreads = kWm * kWn * 32;
  static constexpr int kStrideA = kBk * 2 + 16;                  // bytes per shared A row
  static constexpr int kStrideB = kBk * (kBInt8 ? 1 : 2) + 16;   // bytes per shared B row
  static constexpr int kWarpM = kBm / kWm, kWarpN = kBn / kWn;
  static constexpr int kMt = kWarpM / 16, kNt = kWarpN / 8;
  static constexpr int kStageBytes = kBm * kStrideA + kBn * kStrideB;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kWarpM % 16 == 0 && kWarpN % 8 == 0 && kBk % 16 == 0, "tile shape");
};

template <typename T, typename Tile, int kBm, int kBn, int kBk, int kStages, bool kBInt8, bool kAligned>
__global__ __launch_bounds__(Tile::kThreads) void
    mixed_gemm_kernel(const uint16_t* __restrict__ a,      // [M, K] bits of T, row stride lda
                      const void* __restrict__ b_raw,      // [N, K] bits of T, or int8; row stride ldb
                      const float* __restrict__ b_scale,   // [N] or nullptr
                      const float* __restrict__ bias,      // [N] or nullptr
                      void* __restrict__ c,                // [M, N] of out_type
                      int64_t lda, int64_t ldb, int M, int N, int K, FloatType out_type, int activation,
                      int k_tiles_per_split,           // K tiles of blockIdx.z's split
                      float* __restrict__ partial) {   // [splits, M, N] raw sums, or nullptr: epilogue here
  using BElem = std::conditional_t<kBInt8, int8_t, uint16_t>;
  const BElem* b = static_cast<const BElem*>(b_raw);
  extern __shared__ __align__(16) uint8_t smem[];  // kStages x (A [kBm][kStrideA], B [kBn][kStrideB])
  const int64_t m0 = int64_t(blockIdx.y) * kBm, n0 = int64_t(blockIdx.x) * kBn;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / (kBn / Tile::kWarpN), wn = warp % (kBn / Tile::kWarpN);
  const int group = lane / 4, quad = lane % 4;
  constexpr int SA = Tile::kStrideA, SB = Tile::kStrideB;

  auto load_stage = [&](int stage, int kt) {
    uint8_t* as = smem + stage * Tile::kStageBytes;
    uint8_t* bs = as + kBm * SA;
    load_tile<uint16_t, kBm, kBk, Tile::kThreads, kAligned>(as, SA, a, lda, m0, M, int64_t(kt) * kBk, K);
    load_tile<BElem, kBn, kBk, Tile::kThreads, kAligned>(bs, SB, b, ldb, n0, N, int64_t(kt) * kBk, K);
  };

  float acc[Tile::kMt][Tile::kNt][4] = {};
  const int kt0 = blockIdx.z * k_tiles_per_split;  // this split's K tiles: [kt0, kt0 + k_tiles)
  const int k_tiles = min((K + kBk - 1) / kBk - kt0, k_tiles_per_split);
#pragma unroll
  for (int s = 0; s < kStages - 1; ++s) {
    if (s < k_tiles) load_stage(s, kt0 + s);
    cp_async_commit();
  }
  for (int kt = 0; kt < k_tiles; ++kt) {
    cp_async_wait<kStages - 2>();  // tile kt has landed
    __syncthreads();               // ... for every thread, and tile kt - 1 is no longer read
    const int next = kt + kStages - 1;
    if (next < k_tiles) load_stage(next % kStages, kt0 + next);
    cp_async_commit();

    const uint8_t* as = smem + (kt % kStages) * Tile::kStageBytes;  // [kBm][SA]
    const uint8_t* bs = as + kBm * SA;                                // [kBn][SB]
#pragma unroll
    for (int kk = 0; kk < kBk; kk += 16) {
      uint32_t af[Tile::kMt][4], bf[Tile::kNt][2];
#pragma unroll
      for (int mt = 0; mt < Tile::kMt; ++mt) {
        // rows group / group + 8, elements quad*2.. and 8 + quad*2.. of this k16 slice
        const uint8_t* p = as + (wm * Tile::kWarpM + mt * 16 + group) * SA + (kk + quad * 2) * 2;
        af[mt][0] = load_u32(p);
        af[mt][1] = load_u32(p + 8 * SA);
        af[mt][2] = load_u32(p + 16);
        af[mt][3] = load_u32(p + 8 * SA + 16);
      }
#pragma unroll
      for (int nt = 0; nt < Tile::kNt; ++nt) {
        // column n = group; k = quad*2.. and 8 + quad*2.., contiguous in B [N, K]
        const int n = wn * Tile::kWarpN + nt * 8 + group;
        if constexpr (kBInt8) {
          const uint8_t* p = bs + n * SB + kk + quad * 2;
          bf[nt][0] = int8x2_to<T>(p);
          bf[nt][1] = int8x2_to<T>(p + 8);
        } else {
          const uint8_t* p = bs + n * SB + (kk + quad * 2) * 2;
          bf[nt][0] = load_u32(p);
          bf[nt][1] = load_u32(p + 16);
        }
      }
#pragma unroll
      for (int mt = 0; mt < Tile::kMt; ++mt)
#pragma unroll
        for (int nt = 0; nt < Tile::kNt; ++nt) mma_16816<T>(acc[mt][nt], af[mt], bf[nt]);
    }
  }

  // d[0..1]: row group, d[2..3]: row group + 8; columns quad*2 + {0, 1}.
#pragma unroll
  for (int mt = 0; mt < Tile::kMt; ++mt)
#pragma unroll
    for (int nt = 0; nt < Tile::kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + wm * Tile::kWarpM + mt * 16 + group + (i >= 2 ? 8 : 0);
        const int64_t n = n0 + wn * Tile::kWarpN + nt * 8 + quad * 2 + (i & 1);
        if (m >= M || n >= N) continue;
        if (partial)
          partial[(int64_t(blockIdx.z) * M + m) * N + n] = acc[mt][nt][i];
        else
          epilogue_one(c, m, n, N, acc[mt][nt][i], b_scale, bias, out_type, activation);
      }
}

// Adds the splits' float32 partial sums in split order (deterministic) and runs the epilogue;
// one row of C per blockIdx.y (M <= 32 here), columns across blockIdx.x.
__global__ void mixed_split_k_epilogue(const float* __restrict__ partial,  // [splits, M, N]
                                       int splits, const float* __restrict__ b_scale, const float* __restrict__ bias,
                                       void* __restrict__ c, int M, int N, FloatType out_type, int activation) {
  const int64_t m = blockIdx.y;
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    float v = 0.f;
    for (int s = 0; s < splits; ++s) v += partial[(int64_t(s) * M + m) * N + n];
    epilogue_one(c, m, n, N, v, b_scale, bias, out_type, activation);
  }
}

constexpr int kDecodeBm = 32, kDecodeBn = 64, kDecodeBk = 32;

template <typename T, bool kBInt8, int kBm, int kBn, int kBk, int kWm, int kWn, int kStages>
cudaError_t launch_tile(const void* a, int64_t lda, const void* b, int64_t ldb, const float* b_scale,
                        const float* bias, void* c, int64_t M, int64_t N, int64_t K, FloatType out_type,
                        int activation, void* workspace, cudaStream_t stream) {
  using Tile = MixedTile<kBm, kBn, kBk, kWm, kWn, kStages, kBInt8>;
  const SplitK plan = plan_split_k(M, N, K, kBm, kBn, kBk);
  const bool split = plan.splits > 1 && workspace != nullptr;
  const dim3 grid((N + kBn - 1) / kBn, (M + kBm - 1) / kBm, split ? plan.splits : 1);
  const int k_tiles_per_split = split ? plan.k_tiles_per_split : int((K + kBk - 1) / kBk);
  float* partial = split ? static_cast<float*>(workspace) : nullptr;
  // 16-byte rows: 8 half elements of A; 16 int8 or 8 half elements of B.
  const int b_elems = kBInt8 ? 16 : 8;
  const bool aligned = K % b_elems == 0 && K % 8 == 0 && lda % 8 == 0 && ldb % b_elems == 0 && aligned16(a) &&
                       aligned16(b);
  auto kernel = aligned ? mixed_gemm_kernel<T, Tile, kBm, kBn, kBk, kStages, kBInt8, true>
                        : mixed_gemm_kernel<T, Tile, kBm, kBn, kBk, kStages, kBInt8, false>;
  if (cudaError_t err = allow_smem(kernel, Tile::kSmemBytes); err != cudaSuccess) return err;
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(static_cast<const uint16_t*>(a), b, b_scale, bias, c,
                                                             lda, ldb, int(M), int(N), int(K), out_type,
                                                             activation, k_tiles_per_split, partial);
  if (split) {
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    const dim3 reduce_grid(static_cast<unsigned>(std::min<int64_t>((N + 255) / 256, 64)), static_cast<unsigned>(M));
    mixed_split_k_epilogue<<<reduce_grid, 256, 0, stream>>>(partial, plan.splits, b_scale, bias, c, int(M), int(N),
                                                           out_type, activation);
  }
  return cudaGetLastError();
}

template <typename T, bool kBInt8>
cudaError_t launch_typed(const void* a, int64_t lda, const void* b, int64_t ldb, const float* b_scale,
                         const float* bias, void* c, int64_t M, int64_t N, int64_t K, FloatType out_type,
                         int activation, void* workspace, cudaStream_t stream) {
  // Small M (decoding, small batches): 32 x 64 tiles, 4 warps, K split so the grid fills the GPU.
  if (M <= 32)
    return launch_tile<T, kBInt8, kDecodeBm, kDecodeBn, kDecodeBk, 1, 4, 4>(a, lda, b, ldb, b_scale, bias, c, M, N,
                                                                             K, out_type, activation, workspace,
                                                                             stream);
  return launch_tile<T, kBInt8, 128, 128, 32, 2, 4, 3>(a, lda, b, ldb, b_scale, bias, c, M, N, K, out_type,
                                                       activation, nullptr, stream);
}

}  // namespace

size_t mixed_gemm_workspace_bytes(int64_t M, int64_t N, int64_t K) {
  if (M > 32) return 0;
  const SplitK plan = plan_split_k(M, N, K, kDecodeBm, kDecodeBn, kDecodeBk);
  return plan.splits > 1 ? size_t(plan.splits) * M * N * sizeof(float) : 0;
}

cudaError_t launch_mixed_gemm(const void* a, int64_t lda, const void* b, int64_t ldb, bool b_int8,
                              const float* b_scale, const float* bias, void* c, int64_t M, int64_t N, int64_t K,
                              FloatType a_type, FloatType out_type, int activation, void* workspace,
                              cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  switch (a_type) {
    case FloatType::kFloat16:
      return b_int8 ? launch_typed<__half, true>(a, lda, b, ldb, b_scale, bias, c, M, N, K, out_type, activation,
                                                 workspace, stream)
                    : launch_typed<__half, false>(a, lda, b, ldb, b_scale, bias, c, M, N, K, out_type, activation,
                                                  workspace, stream);
    case FloatType::kBFloat16:
      return b_int8 ? launch_typed<__nv_bfloat16, true>(a, lda, b, ldb, b_scale, bias, c, M, N, K, out_type,
                                                        activation, workspace, stream)
                    : launch_typed<__nv_bfloat16, false>(a, lda, b, ldb, b_scale, bias, c, M, N, K, out_type,
                                                         activation, workspace, stream);
    default: return cudaErrorInvalidValue;  // float32 A has no HMMA path: the glue rejects it
  }
}

}  // namespace msmartcompute::cuda
