// int8 x int8 -> int32 GEMM on the integer tensor cores (mma.sync m16n8k32 -> IMMA),
// C[M, N] = A[M, K] @ B[N, K]^T, with the dequantize (a_scale[m] * b_scale[n]) and bias
// epilogue fused; or the raw int32 accumulator.
//
// A block computes a kBm x kBn tile with kWm x kWn warps; K advances kBk bytes at a time
// through a kStages-deep cp.async ring in dynamic shared memory. Shared rows are padded
// by 16 bytes (80-byte stride for kBk = 64): the 8 rows x 4 words a fragment load
// touches then fall in 32 distinct banks.
#include "gemm_common.cuh"

namespace msmartcompute::cuda {
namespace {

template <int kBm, int kBn, int kBk, int kWm, int kWn, int kStages>
struct Int8Tile {
  static constexpr int kThreads = kWm * kWn * 32;
  static constexpr int kStride = kBk + 16;             // bytes per shared row
  static constexpr int kWarpM = kBm / kWm, kWarpN = kBn / kWn;
  static constexpr int kMt = kWarpM / 16, kNt = kWarpN / 8;  // mma tiles per warp
  static constexpr int kStageBytes = (kBm + kBn) * kStride;
  static constexpr int kSmemBytes = kStages * kStageBytes;
  static_assert(kWarpM % 16 == 0 && kWarpN % 8 == 0 && kBk % 32 == 0, "tile shape");
};

template <typename Tile, int kBm, int kBn, int kBk, int kStages, bool kAligned>
__global__ __launch_bounds__(Tile::kThreads) void
    int8_gemm_kernel(const int8_t* __restrict__ a,        // [M, K], row stride lda
                     const int8_t* __restrict__ b,        // [N, K], row stride ldb
                     const float* __restrict__ a_scale,   // [M]
                     const float* __restrict__ b_scale,   // [N]
                     const float* __restrict__ bias,      // [N] or nullptr
                     void* __restrict__ c,                // [M, N] int32 or out_type
                     int64_t lda, int64_t ldb, int M, int N, int K, bool raw_int32, FloatType out_type,
                     int k_tiles_per_split,             // K tiles of blockIdx.z's split
                     int32_t* __restrict__ partial) {   // [splits, M, N] raw sums, or nullptr: epilogue here
  extern __shared__ __align__(16) uint8_t smem[];  // kStages x (A [kBm][kStride], B [kBn][kStride])
  const int64_t m0 = int64_t(blockIdx.y) * kBm, n0 = int64_t(blockIdx.x) * kBn;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int wm = warp / (kBn / Tile::kWarpN), wn = warp % (kBn / Tile::kWarpN);
  const int group = lane / 4, quad = lane % 4;  // mma fragment coordinates
  constexpr int S = Tile::kStride;

  auto load_stage = [&](int stage, int kt) {
    uint8_t* as = smem + stage * Tile::kStageBytes;
    uint8_t* bs = as + kBm * S;
    load_tile<int8_t, kBm, kBk, Tile::kThreads, kAligned>(as, S, a, lda, m0, M, int64_t(kt) * kBk, K);
    load_tile<int8_t, kBn, kBk, Tile::kThreads, kAligned>(bs, S, b, ldb, n0, N, int64_t(kt) * kBk, K);
  };

  int32_t acc[Tile::kMt][Tile::kNt][4] = {};
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

    const uint8_t* as = smem + (kt % kStages) * Tile::kStageBytes;  // [kBm][S]
    const uint8_t* bs = as + kBm * S;                                // [kBn][S]
#pragma unroll
    for (int kk = 0; kk < kBk; kk += 32) {
      uint32_t af[Tile::kMt][4], bf[Tile::kNt][2];
#pragma unroll
      for (int mt = 0; mt < Tile::kMt; ++mt) {
        // rows group / group + 8, bytes quad*4.. and 16 + quad*4.. of this k32 slice
        const uint8_t* p = as + (wm * Tile::kWarpM + mt * 16 + group) * S + kk + quad * 4;
        af[mt][0] = load_u32(p);
        af[mt][1] = load_u32(p + 8 * S);
        af[mt][2] = load_u32(p + 16);
        af[mt][3] = load_u32(p + 8 * S + 16);
      }
#pragma unroll
      for (int nt = 0; nt < Tile::kNt; ++nt) {
        // column n = group of this n8 tile; B [N, K] makes the k run contiguous
        const uint8_t* p = bs + (wn * Tile::kWarpN + nt * 8 + group) * S + kk + quad * 4;
        bf[nt][0] = load_u32(p);
        bf[nt][1] = load_u32(p + 16);
      }
#pragma unroll
      for (int mt = 0; mt < Tile::kMt; ++mt)
#pragma unroll
        for (int nt = 0; nt < Tile::kNt; ++nt) mma_s8_16832(acc[mt][nt], af[mt], bf[nt]);
    }
  }

  // Epilogue straight from the accumulator fragments: d[0..1] row group, d[2..3] row
  // group + 8, columns quad*2 + {0, 1}.
#pragma unroll
  for (int mt = 0; mt < Tile::kMt; ++mt)
#pragma unroll
    for (int nt = 0; nt < Tile::kNt; ++nt)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int64_t m = m0 + wm * Tile::kWarpM + mt * 16 + group + (i >= 2 ? 8 : 0);
        const int64_t n = n0 + wn * Tile::kWarpN + nt * 8 + quad * 2 + (i & 1);
        if (m >= M || n >= N) continue;
        const int32_t v = acc[mt][nt][i];
        if (partial) {
          partial[(int64_t(blockIdx.z) * M + m) * N + n] = v;
        } else if (raw_int32) {
          static_cast<int32_t*>(c)[m * N + n] = v;
        } else {
          float out = static_cast<float>(v) * a_scale[m] * b_scale[n];
          if (bias) out += bias[n];
          store_out(c, m * N + n, out, out_type);
        }
      }
}

// Adds the splits' int32 partial sums (exact, in split order) and runs the epilogue; one row
// of C per blockIdx.y (M <= 32 here), columns across blockIdx.x.
__global__ void int8_split_k_epilogue(const int32_t* __restrict__ partial,  // [splits, M, N]
                                      int splits, const float* __restrict__ a_scale, const float* __restrict__ b_scale,
                                      const float* __restrict__ bias, void* __restrict__ c, int M, int N,
                                      bool raw_int32, FloatType out_type) {
  const int64_t m = blockIdx.y;
  for (int64_t n = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; n < N; n += int64_t(gridDim.x) * blockDim.x) {
    int32_t v = 0;
    for (int s = 0; s < splits; ++s) v += partial[(int64_t(s) * M + m) * N + n];
    if (raw_int32) {
      static_cast<int32_t*>(c)[m * N + n] = v;
    } else {
      float out = static_cast<float>(v) * a_scale[m] * b_scale[n];
      if (bias) out += bias[n];
      store_out(c, m * N + n, out, out_type);
    }
  }
}

constexpr int kDecodeBm = 32, kDecodeBn = 64, kDecodeBk = 64;

template <int kBm, int kBn, int kBk, int kWm, int kWn, int kStages>
cudaError_t launch_tile(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, const float* a_scale,
                        const float* b_scale, const float* bias, void* c, int64_t M, int64_t N, int64_t K,
                        bool raw_int32, FloatType out_type, void* workspace, cudaStream_t stream) {
  using Tile = Int8Tile<kBm, kBn, kBk, kWm, kWn, kStages>;
  const SplitK plan = plan_split_k(M, N, K, kBm, kBn, kBk);
  const bool split = plan.splits > 1 && workspace != nullptr;
  const dim3 grid((N + kBn - 1) / kBn, (M + kBm - 1) / kBm, split ? plan.splits : 1);
  const int k_tiles_per_split = split ? plan.k_tiles_per_split : int((K + kBk - 1) / kBk);
  int32_t* partial = split ? static_cast<int32_t*>(workspace) : nullptr;
  const bool aligned = K % 16 == 0 && lda % 16 == 0 && ldb % 16 == 0 && aligned16(a) && aligned16(b);
  auto kernel = aligned ? int8_gemm_kernel<Tile, kBm, kBn, kBk, kStages, true>
                        : int8_gemm_kernel<Tile, kBm, kBn, kBk, kStages, false>;
  if (cudaError_t err = allow_smem(kernel, Tile::kSmemBytes); err != cudaSuccess) return err;
  kernel<<<grid, Tile::kThreads, Tile::kSmemBytes, stream>>>(a, b, a_scale, b_scale, bias, c, lda, ldb, int(M),
                                                             int(N), int(K), raw_int32, out_type,
                                                             k_tiles_per_split, partial);
  if (split) {
    if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) return err;
    const dim3 reduce_grid(static_cast<unsigned>(std::min<int64_t>((N + 255) / 256, 64)), static_cast<unsigned>(M));
    int8_split_k_epilogue<<<reduce_grid, 256, 0, stream>>>(partial, plan.splits, a_scale, b_scale, bias, c, int(M),
                                                          int(N), raw_int32, out_type);
  }
  return cudaGetLastError();
}

}  // namespace

size_t int8_gemm_workspace_bytes(int64_t M, int64_t N, int64_t K) {
  if (M > 32) return 0;
  const SplitK plan = plan_split_k(M, N, K, kDecodeBm, kDecodeBn, kDecodeBk);
  return plan.splits > 1 ? size_t(plan.splits) * M * N * sizeof(int32_t) : 0;
}

cudaError_t launch_int8_gemm(const int8_t* a, int64_t lda, const int8_t* b, int64_t ldb, const float* a_scale,
                             const float* b_scale, const float* bias, void* c, int64_t M, int64_t N, int64_t K,
                             bool raw_int32, FloatType out_type, void* workspace, cudaStream_t stream) {
  if (M == 0 || N == 0) return cudaSuccess;
  // Small M (decoding, small batches): 32 x 64 tiles, 4 warps, K split so the grid fills the GPU.
  if (M <= 32)
    return launch_tile<kDecodeBm, kDecodeBn, kDecodeBk, 1, 4, 4>(a, lda, b, ldb, a_scale, b_scale, bias, c, M, N, K,
                                                                 raw_int32, out_type, workspace, stream);
  return launch_tile<128, 128, 64, 2, 4, 3>(a, lda, b, ldb, a_scale, b_scale, bias, c, M, N, K, raw_int32,
                                            out_type, nullptr, stream);
}

}  // namespace msmartcompute::cuda
