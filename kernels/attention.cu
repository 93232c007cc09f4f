// Attention on tensor cores, FlashAttention-2 style, fp16/bf16 with fp32 accumulation: dense
// (any strides), variable-length (cu_seqlens) and paged-KV (block table) inputs share one kernel.
//
// Shared memory holds Q/K/V tiles row-major as [rows][D] with an XOR swizzle of the 16-byte chunks
// (attention_layout.h), filled by cp.async with zero fill and read into mma.sync m16n8k16 fragments
// by ldmatrix (K as the B operand of S = Q K^T) and ldmatrix.trans (V as the B operand of O = P V):
// no transposed copies, no bank conflicts. K/V tiles are double-buffered: the copy of tile n + 1
// runs while tile n is multiplied. P never leaves registers (the accumulator layout of two 8-key
// tiles is the A layout of one 16-key step); the online softmax runs in base 2 with log2(e) folded
// into the scale; causal tiles past a block's last visible key are never loaded.
//
// Grouped-query packing: the G = H / Hkv query heads of one kv head are the rows of one [G * Sq, D]
// matrix (row r is position r % Sq of head r / Sq), all reading the same K/V tiles.
// Prefill (Sq > 16): a block is 4 warps x 32 rows (x 16 at D 128/256); each warp multiplies its rows
// with every key of the tile, each K/V fragment it loads feeding both of its 16-row m-tiles (half the
// shared-memory reads per mma of 16 rows per warp). Decode (Sq <= 16): a block is 16 rows and its warps split every key tile between them
// (16 keys each), merged in shared memory at the end, and the key range is split across blocks
// (grid.z) when the grid would not fill the GPU; attention_combine_kernel merges those by lse.
#include <algorithm>
#include <cmath>

#include "attention_layout.h"
#include "common.cuh"
#include "gemm_common.cuh"
#include "launchers.h"

namespace msmartcompute::cuda {
namespace {

namespace lay = layout;
constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kDecodeMaxSq = 16;

template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi);
template <>
__device__ __forceinline__ uint32_t pack2<__half>(float lo, float hi) {
  __half2 h = __floats2half2_rn(lo, hi);  // lo in the low 16 bits: the lower column
  return *reinterpret_cast<uint32_t*>(&h);
}
template <>
__device__ __forceinline__ uint32_t pack2<__nv_bfloat16>(float lo, float hi) {
  __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&h);
}

// c[16x8] += a[16x16] b[16x8], fragments as lay::mma_a / mma_b / mma_c.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1);
template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}
template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const uint32_t (&a)[4], uint32_t b0,
                                                         uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void ldsm_x4(uint32_t (&r)[4], const uint16_t* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}
__device__ __forceinline__ void ldsm_x4_trans(uint32_t (&r)[4], const uint16_t* p) {
  const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(p));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(addr));
}

// c[mt][16][8 NT] += A[16 MT][D] B[8 NT][D]^T, m-tile mt being A rows a_row0 + 16 mt.. of swizzled
// tile sA, B rows b_row0.. of sB. Each B fragment loaded feeds MT products.
template <typename T, int D, int MT, int NT>
__device__ __forceinline__ void mma_a_bt(float (&c)[MT][NT][4], const uint16_t* sA, int a_row0, const uint16_t* sB,
                                         int b_row0) {
  static_assert(NT % 2 == 0, "ldmatrix.x4 loads the B fragments of two 8-wide n-tiles");
  const int lane = threadIdx.x % 32;
  const lay::Coord la = lay::ldsm_a(lane), lb = lay::ldsm_b(lane);
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
      ldsm_x4(a[mt], sA + lay::swizzled_offset(a_row0 + 16 * mt + la.row, kk * 16 + la.col, D));
#pragma unroll
    for (int jj = 0; jj < NT / 2; ++jj) {
      uint32_t b[4];
      ldsm_x4(b, sB + lay::swizzled_offset(b_row0 + jj * 16 + lb.row, kk * 16 + lb.col, D));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(c[mt][2 * jj], a[mt], b[0], b[1]);
        mma_16816<T>(c[mt][2 * jj + 1], a[mt], b[2], b[3]);
      }
    }
  }
}
template <typename T, int D, int NT>
__device__ __forceinline__ void mma_a_bt(float (&c)[NT][4], const uint16_t* sA, int a_row0, const uint16_t* sB,
                                         int b_row0) {
  mma_a_bt<T, D, 1, NT>(reinterpret_cast<float(&)[1][NT][4]>(c), sA, a_row0, sB, b_row0);
}

// acc[mt][16][N] += X[mt][16][8 NT] B[8 NT][col0, col0 + N): X as accumulator tiles (rounded to T
// here), B rows b_row0.. of swizzled [rows][D] tile sB, read transposed by ldmatrix.trans; each B
// fragment feeds MT products. N < D: a block computes only those output columns (D 256 backward).
template <typename T, int D, int MT, int NT, int N = D>
__device__ __forceinline__ void mma_x_b(float (&acc)[MT][N / 8][4], const float (&x)[MT][NT][4], const uint16_t* sB,
                                        int b_row0, int col0 = 0) {
  const int lane = threadIdx.x % 32;
  const lay::Coord lt = lay::ldsm_b_trans(lane);
#pragma unroll
  for (int kk = 0; kk < NT / 2; ++kk) {
    uint32_t a[MT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        const float* c = x[mt][2 * kk + lay::a_reg_c_tile(r)];
        a[mt][r] = pack2<T>(c[lay::a_reg_c_first(r)], c[lay::a_reg_c_first(r) + 1]);
      }
#pragma unroll
    for (int ii = 0; ii < N / 16; ++ii) {
      uint32_t b[4];
      ldsm_x4_trans(b, sB + lay::swizzled_offset(b_row0 + kk * 16 + lt.row, col0 + ii * 16 + lt.col, D));
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        mma_16816<T>(acc[mt][2 * ii], a[mt], b[0], b[1]);
        mma_16816<T>(acc[mt][2 * ii + 1], a[mt], b[2], b[3]);
      }
    }
  }
}
template <typename T, int D, int NT, int N = D>
__device__ __forceinline__ void mma_x_b(float (&acc)[N / 8][4], const float (&x)[NT][4], const uint16_t* sB,
                                        int b_row0, int col0 = 0) {
  mma_x_b<T, D, 1, NT, N>(reinterpret_cast<float(&)[1][N / 8][4]>(acc),
                          reinterpret_cast<const float(&)[1][NT][4]>(x), sB, b_row0, col0);
}

// Rows [0, rows) of a swizzled [rows][D] tile by cp.async; row_ptr(i) is row i's global address, or
// null for a row past the data (zero-filled: it adds nothing to any product).
template <int D, int THREADS, typename RowPtr>
__device__ __forceinline__ void load_tile_async(uint16_t* tile, int rows, const void* any_global, RowPtr row_ptr) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += THREADS) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    const uint16_t* src = row_ptr(row);
    cp_async_16(tile + lay::swizzled_offset(row, col, D), src ? src + col : any_global, src ? 16 : 0);
  }
}

// Where one (batch, kv head) of a call lives: its sequence lengths, and the global address of its
// packed query rows and of its keys, whichever of dense / varlen / paged the call is.
struct Sequence {
  const AttentionParams& p;
  int64_t b, hkv;
  int G, Sq, Sk;              // this sequence's lengths
  int64_t q_start, k_start;   // varlen offsets (0 otherwise)

  __device__ __forceinline__ Sequence(const AttentionParams& params, int64_t head_index)
      : p(params), b(head_index / params.Hkv), hkv(head_index % params.Hkv), G(static_cast<int>(params.H / params.Hkv)) {
    q_start = p.cu_seqlens_q ? p.cu_seqlens_q[b] : 0;
    Sq = p.cu_seqlens_q ? p.cu_seqlens_q[b + 1] - static_cast<int>(q_start) : static_cast<int>(p.max_seqlen_q);
    k_start = p.cu_seqlens_k ? p.cu_seqlens_k[b] : 0;
    // Paged: never past the block table's row (max_seqlen_k = its blocks * block_size).
    Sk = p.cu_seqlens_k ? p.cu_seqlens_k[b + 1] - static_cast<int>(k_start)
                        : (p.seq_lens_k ? max(0, min(p.seq_lens_k[b], static_cast<int>(p.max_seqlen_k)))
                                        : static_cast<int>(p.max_seqlen_k));
  }
  __device__ __forceinline__ int rows() const { return G * Sq; }
  // Element offset of packed row r (r < rows()) in a [batch][head][row] operand with q's indexing.
  __device__ __forceinline__ int64_t row_offset(const StridedRows& t, int r) const {
    const int64_t h = hkv * G + lay::packed_head(r, Sq);
    return b * t.batch_stride + h * t.head_stride + (q_start + lay::packed_pos(r, Sq)) * t.row_stride;
  }
  // Element offset of key n (n < Sk) in K or V.
  __device__ __forceinline__ int64_t key_offset(const StridedRows& t, int n) const {
    if (p.block_table != nullptr) {
      const int64_t block = p.block_table[b * p.block_table_stride + n / p.block_size];
      return block * t.batch_stride + hkv * t.head_stride + (n % p.block_size) * t.row_stride;
    }
    return b * t.batch_stride + hkv * t.head_stride + (k_start + n) * t.row_stride;
  }
  // The last key packed row r sees (keys j <= limit), or -1 for none.
  __device__ __forceinline__ int key_limit(int r, bool causal) const {
    return causal ? min(Sk - 1, lay::packed_pos(r, Sq) + Sk - Sq) : Sk - 1;
  }
};

__device__ __forceinline__ const uint16_t* half_ptr(const StridedRows& t) {
  return static_cast<const uint16_t*>(t.data);
}

template <int D>
struct FwdConfig {
  static constexpr int kPrefillWarps = 4;
  // 16-row m-tiles per warp: at D <= 64 each K/V fragment feeds 2 (at D 128 the second tile's
  // accumulators would spill on sm_80: 255 registers and a 104-byte stack).
  static constexpr int kPrefillWarpTiles = D <= 64 ? 2 : 1;
  static constexpr int kDecodeWarps = D <= 128 ? 4 : 2;  // D 256: two warps keep K/V stages under 99 KB
  static constexpr int kPrefillKeys = D <= 128 ? 64 : 32;  // keys per K/V stage
};

template <int D, int WARPS, bool KEY_SPLIT>
struct FwdTile {
  static constexpr int kWarpTiles = KEY_SPLIT ? 1 : FwdConfig<D>::kPrefillWarpTiles;
  static constexpr int kRows = KEY_SPLIT ? 16 : 16 * kWarpTiles * WARPS;              // query rows per block
  static constexpr int kKeys = KEY_SPLIT ? 16 * WARPS : FwdConfig<D>::kPrefillKeys;  // keys per stage
  static constexpr int kWarpKeys = KEY_SPLIT ? 16 : kKeys;                           // keys one warp multiplies
  static constexpr size_t kSmem = sizeof(uint16_t) * (kRows * D + 4 * kKeys * D);  // Q + 2 stages of K, V
};

// One block: packed rows [blockIdx.x * BM, + BM) of (batch, kv head) blockIdx.y, keys of split blockIdx.z.
// A thread holds 2 MT rows: index ri = 2 mt + h is accumulator row g + 8 h of the warp's m-tile mt.
template <typename T, int D, int WARPS, bool KEY_SPLIT>
__global__ __launch_bounds__(WARPS * 32) void attention_fwd_kernel(const __grid_constant__ AttentionParams p,
                                                                   float* __restrict__ part_o,    // [splits, B*Hkv*R, D] or null
                                                                   float* __restrict__ part_lse,  // [splits, B*Hkv*R]
                                                                   int keys_per_split) {
  using Tile = FwdTile<D, WARPS, KEY_SPLIT>;
  constexpr int MT = Tile::kWarpTiles, BM = Tile::kRows, BN = Tile::kKeys, NT = Tile::kWarpKeys / 8;
  constexpr int THREADS = WARPS * 32, RI = 2 * MT;
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* sQ = smem;              // [BM][D]
  uint16_t* sK = sQ + BM * D;       // [2][BN][D]
  uint16_t* sV = sK + 2 * BN * D;   // [2][BN][D]

  const Sequence seq(p, blockIdx.y);
  const int R = seq.rows(), r0 = blockIdx.x * BM;
  if (r0 >= R) return;  // varlen: this sequence has fewer rows than the longest
  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int warp_row0 = KEY_SPLIT ? 0 : warp * 16 * MT, warp_key0 = KEY_SPLIT ? warp * 16 : 0;

  // Keys this block needs: its split's range, cut at the last key any of its rows sees.
  const int kv_begin = blockIdx.z * keys_per_split;
  int kv_end = min(seq.Sk, kv_begin + keys_per_split);
  if (p.causal) kv_end = min(kv_end, lay::causal_key_end(r0, min(R, r0 + BM), seq.Sq, seq.Sk));

  const uint16_t *qg = half_ptr(p.q), *kg = half_ptr(p.k), *vg = half_ptr(p.v);
  load_tile_async<D, THREADS>(sQ, BM, qg, [&](int i) {
    return r0 + i < R ? qg + seq.row_offset(p.q, r0 + i) : nullptr;
  });
  auto load_kv = [&](int n0, int stage) {
    load_tile_async<D, THREADS>(sK + stage * BN * D, BN, kg, [&](int i) {
      return n0 + i < kv_end ? kg + seq.key_offset(p.k, n0 + i) : nullptr;
    });
    load_tile_async<D, THREADS>(sV + stage * BN * D, BN, vg, [&](int i) {
      return n0 + i < kv_end ? vg + seq.key_offset(p.v, n0 + i) : nullptr;
    });
  };
  if (kv_begin < kv_end) load_kv(kv_begin, 0);
  cp_async_commit();

  // This thread's rows and the last key each sees; the online-softmax state (l: this thread's
  // partial row sums, completed across the quad at the end).
  int row[RI], limit[RI];
  float m[RI], l[RI];
#pragma unroll
  for (int ri = 0; ri < RI; ++ri) {
    row[ri] = r0 + warp_row0 + 16 * (ri / 2) + g + 8 * (ri % 2);
    limit[ri] = row[ri] < R ? seq.key_limit(row[ri], p.causal) : -1;
    m[ri] = -INFINITY;
    l[ri] = 0.f;
  }
  const float scale_log2 = p.scale * kLog2e;
  float acc[MT][D / 8][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt)
#pragma unroll
    for (int i = 0; i < D / 8; ++i) acc[mt][i][0] = acc[mt][i][1] = acc[mt][i][2] = acc[mt][i][3] = 0.f;

  for (int n0 = kv_begin, stage = 0; n0 < kv_end; n0 += BN, stage ^= 1) {
    if (n0 + BN < kv_end) load_kv(n0 + BN, stage ^ 1);  // the next tile flies while this one is used
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* sKs = sK + stage * BN * D;
    const uint16_t* sVs = sV + stage * BN * D;

    float s[MT][NT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NT; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
    mma_a_bt<T, D, MT, NT>(s, sQ, warp_row0, sKs, warp_key0);

    // Scale (base 2), mask, and the online softmax update of each row.
    float mx[RI];
#pragma unroll
    for (int ri = 0; ri < RI; ++ri) mx[ri] = -INFINITY;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int ri = 2 * mt + e / 2;
          const int key = n0 + warp_key0 + j * 8 + lay::mma_c(lane, e).col;
          const bool hidden = key >= kv_end || key > limit[ri];
          s[mt][j][e] = hidden ? -INFINITY : s[mt][j][e] * scale_log2;
          mx[ri] = fmaxf(mx[ri], s[mt][j][e]);
        }
    float base[RI], alpha[RI];
#pragma unroll
    for (int ri = 0; ri < RI; ++ri) {
      // The 4 threads of a quad (same g) hold one row between them.
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 1));
      mx[ri] = fmaxf(mx[ri], __shfl_xor_sync(0xffffffffu, mx[ri], 2));
      const float next = fmaxf(m[ri], mx[ri]);
      // A row with no visible key yet keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
      base[ri] = next == -INFINITY ? 0.f : next;
      alpha[ri] = exp2f(m[ri] - base[ri]);
      m[ri] = next;
      l[ri] *= alpha[ri];
    }
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc[mt][i][e] *= alpha[2 * mt + e / 2];
#pragma unroll
      for (int j = 0; j < NT; ++j)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          s[mt][j][e] = exp2f(s[mt][j][e] - base[2 * mt + e / 2]);
          l[2 * mt + e / 2] += s[mt][j][e];
        }
    }
    mma_x_b<T, D, MT, NT>(acc, s, sVs, warp_key0);  // O += P V
    __syncthreads();  // this stage is read by every warp before the next iteration refills it
  }
  cp_async_wait<0>();

#pragma unroll
  for (int ri = 0; ri < RI; ++ri) {
    l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 1);
    l[ri] += __shfl_xor_sync(0xffffffffu, l[ri], 2);
  }

  if constexpr (KEY_SPLIT) {
    // Every warp holds a softmax of the same 16 rows over its own keys: merge them into warp 0,
    // each scaled by exp2(m_w - m) (the K/V stages are free now: the loop ended on a barrier).
    static_assert(MT == 1, "decode blocks are one m-tile");
    float* sO = reinterpret_cast<float*>(sK);  // [WARPS][16][D]
    float* sM = sO + WARPS * 16 * D;           // [WARPS][16]
    float* sL = sM + WARPS * 16;               // [WARPS][16]
    static_assert(sizeof(float) * (WARPS * 16 * (D + 2)) <= sizeof(uint16_t) * 4 * BN * D, "merge fits in K/V");
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const lay::Coord c = lay::mma_c(lane, e);
        sO[(warp * 16 + c.row) * D + i * 8 + c.col] = acc[0][i][e];
      }
    if (t == 0) {
#pragma unroll
      for (int h = 0; h < 2; ++h) {
        sM[warp * 16 + g + 8 * h] = m[h];
        sL[warp * 16 + g + 8 * h] = l[h];
      }
    }
    __syncthreads();
    if (warp != 0) return;
    float weight[2][WARPS];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      float top = -INFINITY;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) top = fmaxf(top, sM[w * 16 + g + 8 * h]);
      const float shift = top == -INFINITY ? 0.f : top;
      l[h] = 0.f;
#pragma unroll
      for (int w = 0; w < WARPS; ++w) {
        weight[h][w] = exp2f(sM[w * 16 + g + 8 * h] - shift);
        l[h] += weight[h][w] * sL[w * 16 + g + 8 * h];
      }
      m[h] = top;
    }
#pragma unroll
    for (int i = 0; i < D / 8; ++i)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const lay::Coord c = lay::mma_c(lane, e);
        float sum = 0.f;
#pragma unroll
        for (int w = 0; w < WARPS; ++w) sum += weight[e / 2][w] * sO[(w * 16 + c.row) * D + i * 8 + c.col];
        acc[0][i][e] = sum;
      }
  }

  // A row with no key in this split (l = 0) gets O = 0 and lse = -inf: no weight when combined.
  float inv[RI], lse[RI];
#pragma unroll
  for (int ri = 0; ri < RI; ++ri) {
    inv[ri] = l[ri] > 0.f ? 1.f / l[ri] : 0.f;
    lse[ri] = l[ri] > 0.f ? (m[ri] + log2f(l[ri])) * kLn2 : -INFINITY;
  }
  if (part_o == nullptr) {
    T* og = static_cast<T*>(p.out.data);
    float* lg = static_cast<float*>(p.lse.data);
#pragma unroll
    for (int ri = 0; ri < RI; ++ri) {
      if (row[ri] >= R) continue;
      T* orow = og + seq.row_offset(p.out, row[ri]);
      const int mt = ri / 2, h = ri % 2;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<uint32_t*>(orow + i * 8 + 2 * t) =
            pack2<T>(acc[mt][i][2 * h] * inv[ri], acc[mt][i][2 * h + 1] * inv[ri]);
      if (t == 0) lg[seq.row_offset(p.lse, row[ri])] = lse[ri];
    }
  } else {
    // Splits only run with one length for every sequence: flat row (b * Hkv + hkv) * R + r.
    const int64_t split_rows = (int64_t(blockIdx.z) * gridDim.y + blockIdx.y) * R;
#pragma unroll
    for (int ri = 0; ri < RI; ++ri) {
      if (row[ri] >= R) continue;
      float* prow = part_o + (split_rows + row[ri]) * D;
      const int mt = ri / 2, h = ri % 2;
#pragma unroll
      for (int i = 0; i < D / 8; ++i)
        *reinterpret_cast<float2*>(prow + i * 8 + 2 * t) =
            make_float2(acc[mt][i][2 * h] * inv[ri], acc[mt][i][2 * h + 1] * inv[ri]);
      if (t == 0) part_lse[split_rows + row[ri]] = lse[ri];
    }
  }
}

// out = sum_s exp(lse_s - lse) O_s with lse = log sum_s exp(lse_s): one block per flat row
// (b * Hkv + hkv) * R + r; a row no split saw (lse_s all -inf) gets out = 0, lse = -inf.
template <typename T>
__global__ void attention_combine_kernel(const __grid_constant__ AttentionParams p, const float* __restrict__ part_o,
                                         const float* __restrict__ part_lse, int splits) {
  const int D = static_cast<int>(p.D);
  const int R = static_cast<int>(p.H / p.Hkv * p.max_seqlen_q);
  const int64_t flat = blockIdx.x, rows = gridDim.x;
  const Sequence seq(p, flat / R);
  const int r = static_cast<int>(flat % R);
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_lse[s * rows + flat]);
  const float base = m == -INFINITY ? 0.f : m;
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += __expf(part_lse[s * rows + flat] - base);
  const float inv = total > 0.f ? 1.f / total : 0.f;
  T* out = static_cast<T*>(p.out.data) + seq.row_offset(p.out, r);
  for (int col = threadIdx.x; col < D; col += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s) acc += __expf(part_lse[s * rows + flat] - base) * part_o[(s * rows + flat) * D + col];
    out[col] = from_float<T>(acc * inv);
  }
  if (threadIdx.x == 0)
    static_cast<float*>(p.lse.data)[seq.row_offset(p.lse, r)] = total > 0.f ? base + logf(total) : -INFINITY;
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2): delta = rowsum(dO * O); a dK/dV kernel (a block owns 64 keys of one
// (batch, kv head), each warp 16, and loops over every packed query row of the group: no atomics)
// and a dQ kernel (a block owns 64 packed rows and loops over the keys). Both recompute
// P = exp2(S * scale * log2(e) - lse * log2(e)) from the forward's log-sum-exp, and both read every
// operand through ldmatrix (.trans for the products that need the transpose) from swizzled tiles
// filled by double-buffered cp.async.

// Tile sizes per head dim (lay::BwdTiles), all under 99 KB of shared memory (the sm_86/89 limit;
// sm_80 has 163, sm_90 227; checked by tests/cpp/test_attention_layout.cpp) and without register
// spills (.ci/check_device_code.py).
template <int D>
using BwdTiles = lay::BwdTiles<D>;

// delta[b, h, i] = sum_d dout * out: one warp per query row.
template <typename T>
__global__ void attention_bwd_delta_kernel(const __grid_constant__ AttentionParams p,
                                           const __grid_constant__ AttentionGradParams gp) {
  const Sequence seq(p, blockIdx.y / (p.H / p.Hkv));  // blockIdx.y = b * H + h
  const int head_in_group = static_cast<int>(blockIdx.y % (p.H / p.Hkv));
  const int pos = blockIdx.x * (blockDim.x / 32) + threadIdx.x / 32;
  if (pos >= seq.Sq) return;
  const int r = head_in_group * seq.Sq + pos;  // packed row
  const T* o = static_cast<const T*>(p.out.data) + seq.row_offset(p.out, r);
  const T* d = static_cast<const T*>(gp.dout.data) + seq.row_offset(gp.dout, r);
  float sum = 0.f;
  for (int c = threadIdx.x % 32; c < p.D; c += 32) sum += to_float(o[c]) * to_float(d[c]);
#pragma unroll
  for (int o2 = 16; o2 > 0; o2 >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o2);
  if (threadIdx.x % 32 == 0) static_cast<float*>(gp.delta.data)[seq.row_offset(gp.delta, r)] = sum;
}

// One block: keys [blockIdx.x * BN, + BN) of (batch, kv head) blockIdx.y, dK/dV columns
// [blockIdx.z * DO, + DO). At D 256 two blocks split the columns (DO 128): the accumulators of all
// 256 would spill; each recomputes the full-D products S and dP (1.5x the dK/dV kernel's flops).
template <typename T, int D>
__global__ __launch_bounds__(128) void attention_bwd_dkdv_kernel(const __grid_constant__ AttentionParams p,
                                                                const __grid_constant__ AttentionGradParams gp) {
  constexpr int BM = BwdTiles<D>::kStepRows, BN = BwdTiles<D>::kKeys, DO = BwdTiles<D>::kOutCols;
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* sK = smem;              // [BN][D]
  uint16_t* sV = sK + BN * D;       // [BN][D]
  uint16_t* sQ = sV + BN * D;       // [2][BM][D]
  uint16_t* sdO = sQ + 2 * BM * D;  // [2][BM][D]
  float* sLse = reinterpret_cast<float*>(sdO + 2 * BM * D);  // [2][BM], base 2
  float* sDelta = sLse + 2 * BM;                             // [2][BM]
  int* sLimit = reinterpret_cast<int*>(sDelta + 2 * BM);     // [2][BM]: last key each row sees, -1 none

  const Sequence seq(p, blockIdx.y);
  const int n0 = blockIdx.x * BN;
  if (n0 >= seq.Sk) return;
  const int R = seq.rows(), warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const uint16_t *qg = half_ptr(p.q), *dog = half_ptr(gp.dout);
  load_tile_async<D, 128>(sK, BN, half_ptr(p.k), [&](int i) {
    return n0 + i < seq.Sk ? half_ptr(p.k) + seq.key_offset(p.k, n0 + i) : nullptr;
  });
  load_tile_async<D, 128>(sV, BN, half_ptr(p.v), [&](int i) {
    return n0 + i < seq.Sk ? half_ptr(p.v) + seq.key_offset(p.v, n0 + i) : nullptr;
  });
  // Row tiles with a row that sees one of this block's keys (causal: the first tiles may see none).
  auto next_tile = [&](int r0) {
    while (r0 < R && p.causal && lay::causal_key_end(r0, min(R, r0 + BM), seq.Sq, seq.Sk) <= n0) r0 += BM;
    return r0;
  };
  auto load_rows = [&](int r0, int stage) {
    load_tile_async<D, 128>(sQ + stage * BM * D, BM, qg, [&](int i) {
      return r0 + i < R ? qg + seq.row_offset(p.q, r0 + i) : nullptr;
    });
    load_tile_async<D, 128>(sdO + stage * BM * D, BM, dog, [&](int i) {
      return r0 + i < R ? dog + seq.row_offset(gp.dout, r0 + i) : nullptr;
    });
    for (int i = threadIdx.x; i < BM; i += 128) {
      const bool inside = r0 + i < R;
      sLse[stage * BM + i] = inside ? static_cast<const float*>(p.lse.data)[seq.row_offset(p.lse, r0 + i)] * kLog2e : 0.f;
      sDelta[stage * BM + i] = inside ? static_cast<const float*>(gp.delta.data)[seq.row_offset(gp.delta, r0 + i)] : 0.f;
      sLimit[stage * BM + i] = inside ? seq.key_limit(r0 + i, p.causal) : -1;
    }
  };
  int r0 = next_tile(0);
  if (r0 < R) load_rows(r0, 0);
  cp_async_commit();

  const int key_a = n0 + warp * 16 + lane / 4, key_b = key_a + 8;  // this thread's keys (accumulator rows)
  const int c0 = static_cast<int>(blockIdx.z) * DO;                 // this block's output columns
  const float scale_log2 = p.scale * kLog2e;
  float dk_acc[DO / 8][4], dv_acc[DO / 8][4];
#pragma unroll
  for (int i = 0; i < DO / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;

  for (int stage = 0; r0 < R; stage ^= 1) {
    const int next = next_tile(r0 + BM);
    if (next < R) load_rows(next, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* sQs = sQ + stage * BM * D;
    const uint16_t* sdOs = sdO + stage * BM * D;
    const float* lse_s = sLse + stage * BM;
    const float* delta_s = sDelta + stage * BM;
    const int* limit_s = sLimit + stage * BM;

    // P^T = exp2(K Q^T * scale_log2 - lse_log2): [16 keys][BM rows] for this warp.
    float pt[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) pt[j][0] = pt[j][1] = pt[j][2] = pt[j][3] = 0.f;
    mma_a_bt<T, D, BM / 8>(pt, sK, warp * 16, sQs, 0);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int local = j * 8 + lay::mma_c(lane, e).col, key = e < 2 ? key_a : key_b;
        pt[j][e] = key <= limit_s[local] ? exp2f(pt[j][e] * scale_log2 - lse_s[local]) : 0.f;
      }
    mma_x_b<T, D, BM / 8, DO>(dv_acc, pt, sdOs, 0, c0);  // dV += P^T dO

    // dS^T = P^T * (V dO^T - delta).
    float dst[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) dst[j][0] = dst[j][1] = dst[j][2] = dst[j][3] = 0.f;
    mma_a_bt<T, D, BM / 8>(dst, sV, warp * 16, sdOs, 0);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[j][e] = pt[j][e] * (dst[j][e] - delta_s[j * 8 + lay::mma_c(lane, e).col]);
    mma_x_b<T, D, BM / 8, DO>(dk_acc, dst, sQs, 0, c0);  // dK += dS^T Q
    __syncthreads();
    r0 = next;
  }
  cp_async_wait<0>();

  T* dkg = static_cast<T*>(gp.dk.data);
  T* dvg = static_cast<T*>(gp.dv.data);
#pragma unroll
  for (int i = 0; i < DO / 8; ++i) {
    const int col = c0 + i * 8 + 2 * t;
    if (key_a < seq.Sk) {
      *reinterpret_cast<uint32_t*>(dkg + seq.key_offset(gp.dk, key_a) + col) = pack2<T>(dk_acc[i][0] * p.scale, dk_acc[i][1] * p.scale);
      *reinterpret_cast<uint32_t*>(dvg + seq.key_offset(gp.dv, key_a) + col) = pack2<T>(dv_acc[i][0], dv_acc[i][1]);
    }
    if (key_b < seq.Sk) {
      *reinterpret_cast<uint32_t*>(dkg + seq.key_offset(gp.dk, key_b) + col) = pack2<T>(dk_acc[i][2] * p.scale, dk_acc[i][3] * p.scale);
      *reinterpret_cast<uint32_t*>(dvg + seq.key_offset(gp.dv, key_b) + col) = pack2<T>(dv_acc[i][2], dv_acc[i][3]);
    }
  }
}

template <typename T, int D>
__global__ __launch_bounds__(128) void attention_bwd_dq_kernel(const __grid_constant__ AttentionParams p,
                                                              const __grid_constant__ AttentionGradParams gp) {
  constexpr int BM = BwdTiles<D>::kDqRows, BN = BwdTiles<D>::kDqKeys;
  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* sQ = smem;              // [BM][D]
  uint16_t* sdO = sQ + BM * D;      // [BM][D]
  uint16_t* sK = sdO + BM * D;      // [2][BN][D]
  uint16_t* sV = sK + 2 * BN * D;   // [2][BN][D]

  const Sequence seq(p, blockIdx.y);
  const int R = seq.rows(), r0 = blockIdx.x * BM;
  if (r0 >= R) return;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const uint16_t *qg = half_ptr(p.q), *dog = half_ptr(gp.dout), *kg = half_ptr(p.k), *vg = half_ptr(p.v);
  const int kv_end = p.causal ? lay::causal_key_end(r0, min(R, r0 + BM), seq.Sq, seq.Sk) : seq.Sk;
  load_tile_async<D, 128>(sQ, BM, qg, [&](int i) { return r0 + i < R ? qg + seq.row_offset(p.q, r0 + i) : nullptr; });
  load_tile_async<D, 128>(sdO, BM, dog, [&](int i) {
    return r0 + i < R ? dog + seq.row_offset(gp.dout, r0 + i) : nullptr;
  });
  auto load_kv = [&](int n0, int stage) {
    load_tile_async<D, 128>(sK + stage * BN * D, BN, kg, [&](int i) {
      return n0 + i < kv_end ? kg + seq.key_offset(p.k, n0 + i) : nullptr;
    });
    load_tile_async<D, 128>(sV + stage * BN * D, BN, vg, [&](int i) {
      return n0 + i < kv_end ? vg + seq.key_offset(p.v, n0 + i) : nullptr;
    });
  };
  if (kv_end > 0) load_kv(0, 0);
  cp_async_commit();

  const int row_a = r0 + warp * 16 + g, row_b = row_a + 8;
  const float* lseg = static_cast<const float*>(p.lse.data);
  const float* deltag = static_cast<const float*>(gp.delta.data);
  const float lse_a = row_a < R ? lseg[seq.row_offset(p.lse, row_a)] * kLog2e : 0.f;
  const float lse_b = row_b < R ? lseg[seq.row_offset(p.lse, row_b)] * kLog2e : 0.f;
  const float delta_a = row_a < R ? deltag[seq.row_offset(gp.delta, row_a)] : 0.f;
  const float delta_b = row_b < R ? deltag[seq.row_offset(gp.delta, row_b)] : 0.f;
  const int limit_a = row_a < R ? seq.key_limit(row_a, p.causal) : -1;
  const int limit_b = row_b < R ? seq.key_limit(row_b, p.causal) : -1;
  const float scale_log2 = p.scale * kLog2e;
  float dq_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq_acc[i][0] = dq_acc[i][1] = dq_acc[i][2] = dq_acc[i][3] = 0.f;

  for (int n0 = 0, stage = 0; n0 < kv_end; n0 += BN, stage ^= 1) {
    if (n0 + BN < kv_end) load_kv(n0 + BN, stage ^ 1);
    cp_async_commit();
    cp_async_wait<1>();
    __syncthreads();
    const uint16_t* sKs = sK + stage * BN * D;
    const uint16_t* sVs = sV + stage * BN * D;
    float s[BN / 8][4], ds[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = ds[j][0] = ds[j][1] = ds[j][2] = ds[j][3] = 0.f;
    mma_a_bt<T, D, BN / 8>(s, sQ, warp * 16, sKs, 0);  // S = Q K^T, then P in place
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j * 8 + lay::mma_c(lane, e).col;
        const bool visible = key <= (e < 2 ? limit_a : limit_b);
        s[j][e] = visible ? exp2f(s[j][e] * scale_log2 - (e < 2 ? lse_a : lse_b)) : 0.f;
      }
    mma_a_bt<T, D, BN / 8>(ds, sdO, warp * 16, sVs, 0);  // dP = dO V^T, then dS = P (dP - delta)
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) ds[j][e] = s[j][e] * (ds[j][e] - (e < 2 ? delta_a : delta_b));
    mma_x_b<T, D, BN / 8>(dq_acc, ds, sKs, 0);  // dQ += dS K
    __syncthreads();
  }
  cp_async_wait<0>();

  T* dqg = static_cast<T*>(gp.dq.data);
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = i * 8 + 2 * t;
    if (row_a < R)
      *reinterpret_cast<uint32_t*>(dqg + seq.row_offset(gp.dq, row_a) + col) = pack2<T>(dq_acc[i][0] * p.scale, dq_acc[i][1] * p.scale);
    if (row_b < R)
      *reinterpret_cast<uint32_t*>(dqg + seq.row_offset(gp.dq, row_b) + col) = pack2<T>(dq_acc[i][2] * p.scale, dq_acc[i][3] * p.scale);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

template <typename Kernel>
cudaError_t allow_smem(Kernel kernel, size_t bytes) {
  if (bytes <= 48 * 1024) return cudaSuccess;
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct Plan {
  bool key_split;  // decode shape: warps split the keys of each tile
  int splits, keys_per_split;
};

int decode_keys_per_stage(int64_t D) { return D <= 128 ? 64 : 32; }

Plan plan_attention(const AttentionParams& p) {
  const int64_t G = p.H / p.Hkv, Sk = std::max<int64_t>(p.max_seqlen_k, 1);
  if (p.max_seqlen_q > kDecodeMaxSq) return {false, 1, static_cast<int>(Sk)};
  if (p.cu_seqlens_q != nullptr) return {true, 1, static_cast<int>(Sk)};  // varlen: rows differ per sequence
  // Decode: few rows, so split the keys until the grid covers every SM about three times.
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int BN = decode_keys_per_stage(p.D);
  const int64_t blocks = p.B * p.Hkv * ceil_div(G * p.max_seqlen_q, 16);
  const int64_t tiles = ceil_div(Sk, BN);
  const int64_t splits = std::clamp<int64_t>(ceil_div(3 * sms, blocks), 1, std::min<int64_t>(tiles, 64));
  const int64_t keys = ceil_div(tiles, splits) * BN;
  return {true, static_cast<int>(ceil_div(Sk, keys)), static_cast<int>(keys)};
}

template <typename T, int D, int WARPS, bool KEY_SPLIT>
cudaError_t launch_fwd(const AttentionParams& p, const Plan& plan, float* part_o, float* part_lse,
                       cudaStream_t stream) {
  using Tile = FwdTile<D, WARPS, KEY_SPLIT>;
  const int64_t R = p.H / p.Hkv * p.max_seqlen_q;
  const dim3 grid(static_cast<unsigned>(ceil_div(R, Tile::kRows)), static_cast<unsigned>(p.B * p.Hkv),
                  static_cast<unsigned>(plan.splits));
  auto kernel = attention_fwd_kernel<T, D, WARPS, KEY_SPLIT>;
  cudaError_t err = allow_smem(kernel, Tile::kSmem);
  if (err != cudaSuccess) return err;
  kernel<<<grid, WARPS * 32, Tile::kSmem, stream>>>(p, plan.splits > 1 ? part_o : nullptr, part_lse,
                                                    plan.keys_per_split);
  if ((err = cudaGetLastError()) != cudaSuccess || plan.splits == 1) return err;
  attention_combine_kernel<T><<<static_cast<unsigned>(p.B * p.Hkv * R), std::min<int>(D, 128), 0, stream>>>(
      p, part_o, part_lse, plan.splits);
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_fwd_d(const AttentionParams& p, const Plan& plan, float* part_o, float* part_lse,
                         cudaStream_t stream) {
  if (plan.key_split)
    return launch_fwd<T, D, FwdConfig<D>::kDecodeWarps, true>(p, plan, part_o, part_lse, stream);
  return launch_fwd<T, D, FwdConfig<D>::kPrefillWarps, false>(p, plan, part_o, part_lse, stream);
}

template <typename T>
cudaError_t launch_fwd_typed(const AttentionParams& p, const Plan& plan, float* part_o, float* part_lse,
                             cudaStream_t stream) {
  switch (p.D) {
    case 32: return launch_fwd_d<T, 32>(p, plan, part_o, part_lse, stream);
    case 64: return launch_fwd_d<T, 64>(p, plan, part_o, part_lse, stream);
    case 128: return launch_fwd_d<T, 128>(p, plan, part_o, part_lse, stream);
    case 256: return launch_fwd_d<T, 256>(p, plan, part_o, part_lse, stream);
  }
  return cudaErrorInvalidValue;
}

template <typename T, int D>
cudaError_t launch_bwd(const AttentionParams& p, const AttentionGradParams& g, cudaStream_t stream) {
  const int64_t G = p.H / p.Hkv;
  cudaError_t err = cudaSuccess;
  if (p.max_seqlen_q > 0) {
    attention_bwd_delta_kernel<T><<<dim3(static_cast<unsigned>(ceil_div(p.max_seqlen_q, 8)),
                                         static_cast<unsigned>(p.B * p.H)), 256, 0, stream>>>(p, g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  auto dkdv = attention_bwd_dkdv_kernel<T, D>;
  auto dq = attention_bwd_dq_kernel<T, D>;
  constexpr size_t dkdv_smem = BwdTiles<D>::kDkdvSmem, dq_smem = BwdTiles<D>::kDqSmem;
  if ((err = allow_smem(dkdv, dkdv_smem)) != cudaSuccess || (err = allow_smem(dq, dq_smem)) != cudaSuccess) return err;
  // Every key gets dK/dV written and every query dQ: zeros where nothing is seen.
  if (p.max_seqlen_k > 0) {
    dkdv<<<dim3(static_cast<unsigned>(ceil_div(p.max_seqlen_k, BwdTiles<D>::kKeys)), static_cast<unsigned>(p.B * p.Hkv),
                D / BwdTiles<D>::kOutCols),
           128, dkdv_smem, stream>>>(p, g);
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  if (p.max_seqlen_q == 0) return cudaSuccess;
  dq<<<dim3(static_cast<unsigned>(ceil_div(G * p.max_seqlen_q, BwdTiles<D>::kDqRows)),
            static_cast<unsigned>(p.B * p.Hkv)),
       128, dq_smem, stream>>>(p, g);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd_typed(const AttentionParams& p, const AttentionGradParams& g, cudaStream_t stream) {
  switch (p.D) {
    case 32: return launch_bwd<T, 32>(p, g, stream);
    case 64: return launch_bwd<T, 64>(p, g, stream);
    case 128: return launch_bwd<T, 128>(p, g, stream);
    case 256: return launch_bwd<T, 256>(p, g, stream);
  }
  return cudaErrorInvalidValue;
}

bool valid(const AttentionParams& p) {
  return p.Hkv > 0 && p.H % p.Hkv == 0 && p.B * p.Hkv <= 65535 && p.max_seqlen_q >= 0 && p.max_seqlen_k >= 0 &&
         (p.block_table == nullptr || (p.block_size > 0 && p.seq_lens_k != nullptr));
}

}  // namespace

size_t attention_fwd_workspace_bytes(const AttentionParams& p) {
  if (!valid(p)) return 0;
  const Plan plan = plan_attention(p);
  if (plan.splits == 1) return 0;
  return sizeof(float) * static_cast<size_t>(plan.splits) * p.B * p.H * p.max_seqlen_q * (p.D + 1);
}

cudaError_t launch_attention_fwd(const AttentionParams& p, void* workspace, FloatType type, cudaStream_t stream) {
  if (!valid(p)) return cudaErrorInvalidValue;
  if (p.B * p.H * p.max_seqlen_q == 0) return cudaSuccess;
  const Plan plan = plan_attention(p);
  const int64_t rows = p.B * p.H * p.max_seqlen_q;
  float* part_o = static_cast<float*>(workspace);                                 // [splits, rows, D]
  float* part_lse = part_o ? part_o + int64_t(plan.splits) * rows * p.D : nullptr;  // [splits, rows]
  if (plan.splits > 1 && part_o == nullptr) return cudaErrorInvalidValue;
  switch (type) {
    case FloatType::kFloat16: return launch_fwd_typed<__half>(p, plan, part_o, part_lse, stream);
    case FloatType::kBFloat16: return launch_fwd_typed<__nv_bfloat16>(p, plan, part_o, part_lse, stream);
    case FloatType::kFloat32: break;
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_attention_bwd(const AttentionParams& p, const AttentionGradParams& g, FloatType type,
                                 cudaStream_t stream) {
  if (!valid(p) || p.block_table != nullptr) return cudaErrorInvalidValue;
  if (p.B * p.Hkv == 0 || p.max_seqlen_q + p.max_seqlen_k == 0) return cudaSuccess;
  switch (type) {
    case FloatType::kFloat16: return launch_bwd_typed<__half>(p, g, stream);
    case FloatType::kBFloat16: return launch_bwd_typed<__nv_bfloat16>(p, g, stream);
    case FloatType::kFloat32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace msmartcompute::cuda
