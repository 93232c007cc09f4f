// Fused attention forward on tensor cores (FlashAttention-2 style), fp16/bf16.
//
// Grouped-query packing: q [B, H, Sq, D] with H = Hkv * G is, per kv head, one contiguous
// [G * Sq, D] matrix of "rows" (row r is query r % Sq of head r / Sq), and every row of it
// reads the same K/V. A block takes 16 * WARPS rows of one kv head (each warp 16 rows, kept
// in shared memory), streams K/V tiles of BN keys through shared memory, and keeps the
// online-softmax state in registers: S = Q K^T and O += P V on mma.sync m16n8k16 with fp32
// accumulation, exp2 with log2(e) folded into the scale, causal tiles past the last visible
// key skipped. P never leaves registers: the S accumulator layout of two 8-key tiles is the
// A-operand layout of one 16-key step.
//
// Prefill: WARPS = 4, one block per 64 rows. Decode (Sq <= 16): WARPS = 1 and the key range is
// split across blocks (grid.z); each split writes an fp32 partial O and its log-sum-exp, and
// attention_combine_kernel merges them by log-sum-exp.
#include <algorithm>
#include <cmath>

#include "common.cuh"
#include "launchers.h"

namespace msmartcompute::cuda {
namespace {

constexpr int kPad = 8;  // halves of padding per shared row: 16 bytes, so rows g = 0..7 hit distinct banks
constexpr int kDecodeMaxSq = 16;

template <int D>
struct TileConfig {
  static constexpr int kBlockN = D <= 128 ? 64 : 32;  // keys per streamed tile
};

template <int WARPS, int D>
constexpr size_t smem_bytes() {
  constexpr int BN = TileConfig<D>::kBlockN;
  return sizeof(uint16_t) * (16 * WARPS * (D + kPad) + BN * (D + kPad) + D * (BN + kPad));
}

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

// c[16x8] += a[16x16] b[16x8]; fragments as in the PTX ISA for m16n8k16 (g = lane / 4, t = lane % 4):
// a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..); b0 (k 2t..2t+1, n g),
// b1 (k 2t+8.., n g); c0,c1 (g, 2t..2t+1), c2,c3 (g+8, 2t..2t+1).
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

__device__ __forceinline__ uint32_t load_pair(const uint16_t* p) { return *reinterpret_cast<const uint32_t*>(p); }

// One block: rows [r0, r0 + 16 * WARPS) of kv head blockIdx.y, keys of split blockIdx.z.
template <typename T, int D, int WARPS>
__global__ __launch_bounds__(WARPS * 32) void attention_fwd_kernel(const T* __restrict__ q,      // [B * Hkv, R, D], R = G * Sq
                         const T* __restrict__ k,      // [B * Hkv, Sk, D]
                         const T* __restrict__ v,      // [B * Hkv, Sk, D]
                         T* __restrict__ out,          // [B * Hkv, R, D]
                         float* __restrict__ lse,      // [B * Hkv, R]
                         float* __restrict__ part_o,   // [splits, B * Hkv, R, D] or null (no split)
                         float* __restrict__ part_lse, // [splits, B * Hkv, R]
                         int R, int Sq, int Sk, int keys_per_split, bool causal, float scale_log2) {
  constexpr int BM = 16 * WARPS, BN = TileConfig<D>::kBlockN;
  constexpr int LDQ = D + kPad, LDK = D + kPad, LDV = BN + kPad;
  constexpr int kChunks = D / 8;  // 16-byte chunks per row
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;              // [BM][LDQ]
  uint16_t* sK = sQ + BM * LDQ;     // [BN][LDK]
  uint16_t* sVt = sK + BN * LDK;    // [D][LDV]: V transposed, so B fragments of P V are 32-bit loads

  const int tid = threadIdx.x, warp = tid / 32, lane = tid % 32, g = lane / 4, t = lane % 4;
  const int64_t head = blockIdx.y;  // b * Hkv + kv head
  const int r0 = blockIdx.x * BM;
  const int split = blockIdx.z;
  const uint16_t* qh = reinterpret_cast<const uint16_t*>(q) + head * R * D;
  const uint16_t* kh = reinterpret_cast<const uint16_t*>(k) + head * Sk * D;
  const uint16_t* vh = reinterpret_cast<const uint16_t*>(v) + head * Sk * D;
  const int offset = Sk - Sq;  // causal: query position i sees keys j <= i + offset

  // Keys this block needs: its split's range, cut at the last key any of its rows sees.
  int kv_begin = split * keys_per_split;
  int kv_end = min(Sk, kv_begin + keys_per_split);
  if (causal) {
    const int r_last = min(R, r0 + BM) - 1;
    const int max_pos = (r0 / Sq == r_last / Sq) ? r_last % Sq : Sq - 1;
    kv_end = min(kv_end, max_pos + offset + 1);
  }

  for (int c = tid; c < BM * kChunks; c += WARPS * 32) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (r0 + row < R) val = *reinterpret_cast<const uint4*>(qh + int64_t(r0 + row) * D + col);
    *reinterpret_cast<uint4*>(sQ + row * LDQ + col) = val;
  }

  // Each thread's rows (packed indices) and their query positions, for the causal mask.
  const int row_a = r0 + warp * 16 + g, row_b = row_a + 8;
  const int pos_a = row_a % Sq, pos_b = row_b % Sq;
  float acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_a = -INFINITY, m_b = -INFINITY, l_a = 0.f, l_b = 0.f;  // l: this thread's partial row sums

  for (int n0 = kv_begin; n0 < kv_end; n0 += BN) {
    __syncthreads();  // previous tile fully consumed (and sQ written, on the first pass)
    for (int c = tid; c < BN * kChunks; c += WARPS * 32) {
      const int row = c / kChunks, col = (c % kChunks) * 8;
      uint4 kval = make_uint4(0, 0, 0, 0), vval = make_uint4(0, 0, 0, 0);
      if (n0 + row < kv_end) {
        kval = *reinterpret_cast<const uint4*>(kh + int64_t(n0 + row) * D + col);
        vval = *reinterpret_cast<const uint4*>(vh + int64_t(n0 + row) * D + col);
      }
      *reinterpret_cast<uint4*>(sK + row * LDK + col) = kval;
      const uint16_t* ve = reinterpret_cast<const uint16_t*>(&vval);
#pragma unroll
      for (int e = 0; e < 8; ++e) sVt[(col + e) * LDV + row] = ve[e];
    }
    __syncthreads();

    // S = Q K^T for this warp's 16 rows: [16][BN] as BN / 8 accumulator tiles.
    float s[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    const uint16_t* qw = sQ + (warp * 16) * LDQ;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) {
      uint32_t a[4];
      a[0] = load_pair(qw + g * LDQ + kk * 16 + 2 * t);
      a[1] = load_pair(qw + (g + 8) * LDQ + kk * 16 + 2 * t);
      a[2] = load_pair(qw + g * LDQ + kk * 16 + 2 * t + 8);
      a[3] = load_pair(qw + (g + 8) * LDQ + kk * 16 + 2 * t + 8);
#pragma unroll
      for (int j = 0; j < BN / 8; ++j) {
        const uint16_t* kr = sK + (j * 8 + g) * LDK + kk * 16 + 2 * t;
        mma_16816<T>(s[j], a, load_pair(kr), load_pair(kr + 8));
      }
    }

    // Scale (base 2), mask, and the online softmax update of rows a (g) and b (g + 8).
    float mx_a = -INFINITY, mx_b = -INFINITY;
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = n0 + j * 8 + 2 * t + (e & 1);
        const int pos = e < 2 ? pos_a : pos_b;
        const bool hidden = col >= kv_end || (causal && col > pos + offset);
        s[j][e] = hidden ? -INFINITY : s[j][e] * scale_log2;
      }
      mx_a = fmaxf(mx_a, fmaxf(s[j][0], s[j][1]));
      mx_b = fmaxf(mx_b, fmaxf(s[j][2], s[j][3]));
    }
    // The 4 threads of a quad (same g) hold one row between them.
#pragma unroll
    for (int o = 1; o <= 2; o <<= 1) {
      mx_a = fmaxf(mx_a, __shfl_xor_sync(0xffffffffu, mx_a, o));
      mx_b = fmaxf(mx_b, __shfl_xor_sync(0xffffffffu, mx_b, o));
    }
    const float new_a = fmaxf(m_a, mx_a), new_b = fmaxf(m_b, mx_b);
    // A row with no visible key yet keeps max -inf; subtract 0 then so exp2 gives 0, not NaN.
    const float base_a = new_a == -INFINITY ? 0.f : new_a, base_b = new_b == -INFINITY ? 0.f : new_b;
    const float alpha_a = exp2f(m_a - base_a), alpha_b = exp2f(m_b - base_b);
    m_a = new_a;
    m_b = new_b;
    l_a *= alpha_a;
    l_b *= alpha_b;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      acc[i][0] *= alpha_a;
      acc[i][1] *= alpha_a;
      acc[i][2] *= alpha_b;
      acc[i][3] *= alpha_b;
    }
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) {
      s[j][0] = exp2f(s[j][0] - base_a);
      s[j][1] = exp2f(s[j][1] - base_a);
      s[j][2] = exp2f(s[j][2] - base_b);
      s[j][3] = exp2f(s[j][3] - base_b);
      l_a += s[j][0] + s[j][1];
      l_b += s[j][2] + s[j][3];
    }

    // O += P V: P's accumulator tiles 2kk, 2kk+1 are the A fragment of key step kk.
#pragma unroll
    for (int kk = 0; kk < BN / 16; ++kk) {
      uint32_t a[4];
      a[0] = pack2<T>(s[2 * kk][0], s[2 * kk][1]);
      a[1] = pack2<T>(s[2 * kk][2], s[2 * kk][3]);
      a[2] = pack2<T>(s[2 * kk + 1][0], s[2 * kk + 1][1]);
      a[3] = pack2<T>(s[2 * kk + 1][2], s[2 * kk + 1][3]);
#pragma unroll
      for (int i = 0; i < D / 8; ++i) {
        const uint16_t* vr = sVt + (i * 8 + g) * LDV + kk * 16 + 2 * t;
        mma_16816<T>(acc[i], a, load_pair(vr), load_pair(vr + 8));
      }
    }
  }

#pragma unroll
  for (int o = 1; o <= 2; o <<= 1) {
    l_a += __shfl_xor_sync(0xffffffffu, l_a, o);
    l_b += __shfl_xor_sync(0xffffffffu, l_b, o);
  }
  // A row with no key in this split (l = 0) gets O = 0 and lse = -inf: no weight when combined.
  const float inv_a = l_a > 0.f ? 1.f / l_a : 0.f, inv_b = l_b > 0.f ? 1.f / l_b : 0.f;
  constexpr float kLn2 = 0.6931471805599453f;
  const float lse_a = l_a > 0.f ? (m_a + log2f(l_a)) * kLn2 : -INFINITY;
  const float lse_b = l_b > 0.f ? (m_b + log2f(l_b)) * kLn2 : -INFINITY;
  const int64_t rows_before = head * R;
  if (part_o == nullptr) {
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = i * 8 + 2 * t;
      if (row_a < R)
        *reinterpret_cast<uint32_t*>(out + (rows_before + row_a) * D + col) =
            pack2<T>(acc[i][0] * inv_a, acc[i][1] * inv_a);
      if (row_b < R)
        *reinterpret_cast<uint32_t*>(out + (rows_before + row_b) * D + col) =
            pack2<T>(acc[i][2] * inv_b, acc[i][3] * inv_b);
    }
    if (t == 0 && row_a < R) lse[rows_before + row_a] = lse_a;
    if (t == 0 && row_b < R) lse[rows_before + row_b] = lse_b;
  } else {
    const int64_t split_rows = int64_t(split) * gridDim.y * R + rows_before;
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const int col = i * 8 + 2 * t;
      if (row_a < R)
        *reinterpret_cast<float2*>(part_o + (split_rows + row_a) * D + col) =
            make_float2(acc[i][0] * inv_a, acc[i][1] * inv_a);
      if (row_b < R)
        *reinterpret_cast<float2*>(part_o + (split_rows + row_b) * D + col) =
            make_float2(acc[i][2] * inv_b, acc[i][3] * inv_b);
    }
    if (t == 0 && row_a < R) part_lse[split_rows + row_a] = lse_a;
    if (t == 0 && row_b < R) part_lse[split_rows + row_b] = lse_b;
  }
}

// out[row] = sum_s exp(lse_s - lse) * O_s with lse = log sum_s exp(lse_s): one block per row.
template <typename T>
__global__ void attention_combine_kernel(const float* __restrict__ part_o,    // [splits, rows, D]
                                         const float* __restrict__ part_lse,  // [splits, rows]
                                         T* __restrict__ out,                 // [rows, D]
                                         float* __restrict__ lse,             // [rows]
                                         int splits, int64_t rows, int D) {
  const int64_t row = blockIdx.x;
  float m = -INFINITY;
  for (int s = 0; s < splits; ++s) m = fmaxf(m, part_lse[s * rows + row]);
  float total = 0.f;
  for (int s = 0; s < splits; ++s) total += __expf(part_lse[s * rows + row] - m);  // split 0 always has a key
  for (int col = threadIdx.x; col < D; col += blockDim.x) {
    float acc = 0.f;
    for (int s = 0; s < splits; ++s)
      acc += __expf(part_lse[s * rows + row] - m) * part_o[(s * rows + row) * D + col];
    out[row * D + col] = from_float<T>(acc / total);
  }
  if (threadIdx.x == 0) lse[row] = m + logf(total);
}

// ---------------------------------------------------------------------------------------------
// Backward (FlashAttention-2): delta = rowsum(dO * O); one kernel for dK/dV (a block owns 64 keys of
// one kv head, each warp 16, and loops over every packed query row of the group, so no atomics),
// one for dQ (a block owns 64 packed rows and loops over the keys). Both recompute
// P = exp2(S * scale * log2(e) - lse * log2(e)) from the forward's log-sum-exp.

// Tiles: 64 keys per dK/dV block or dQ step; 64 packed rows per dQ block; rows per dK/dV step
// 64, or 32 for D = 128, which keeps every kernel under 99 KB of shared memory (the sm_86/89
// limit; sm_80 and sm_90 allow more) and the dK/dV kernel's registers in bounds.
constexpr int kBwdRows = 64;
constexpr int kBwdKeys = 64;
template <int D>
constexpr int bwd_step_rows() { return D <= 64 ? 64 : 32; }
constexpr float kLog2e = 1.4426950408889634f;

template <int D>
constexpr size_t bwd_dkdv_smem_bytes() {
  constexpr int BM = bwd_step_rows<D>();
  return sizeof(uint16_t) * (2 * kBwdKeys * (D + kPad) + 2 * BM * (D + kPad) + 2 * D * (BM + kPad)) +
         sizeof(float) * 2 * BM;
}

template <int D>
constexpr size_t bwd_dq_smem_bytes() {
  return sizeof(uint16_t) * (2 * kBwdRows * (D + kPad) + 2 * kBwdKeys * (D + kPad) + D * (kBwdKeys + kPad));
}

// Copies rows [first, first + rows) of a [total, D] matrix into smem as [rows][D + kPad] and, when
// `transposed` is not null, also as [D][rows + kPad]; rows past `total` become zeros.
template <int D, int THREADS>
__device__ __forceinline__ void load_tile(const uint16_t* src, int first, int rows, int total, uint16_t* plain,
                                          uint16_t* transposed) {
  constexpr int kChunks = D / 8;
  for (int c = threadIdx.x; c < rows * kChunks; c += THREADS) {
    const int row = c / kChunks, col = (c % kChunks) * 8;
    uint4 val = make_uint4(0, 0, 0, 0);
    if (first + row < total) val = *reinterpret_cast<const uint4*>(src + int64_t(first + row) * D + col);
    if (plain != nullptr) *reinterpret_cast<uint4*>(plain + row * (D + kPad) + col) = val;
    if (transposed != nullptr) {
      const uint16_t* e = reinterpret_cast<const uint16_t*>(&val);
#pragma unroll
      for (int x = 0; x < 8; ++x) transposed[(col + x) * (rows + kPad) + row] = e[x];
    }
  }
}

// c[16][8 * N] += A[16][D] B[D][8 * N], A rows from `a` ([16][lda]), B^T rows from `bt` ([8 * N][ldb]).
template <typename T, int D, int N>
__device__ __forceinline__ void mma_rows(float (&c)[N][4], const uint16_t* a, int lda, const uint16_t* bt, int ldb) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t af[4];
    af[0] = load_pair(a + g * lda + kk * 16 + 2 * t);
    af[1] = load_pair(a + (g + 8) * lda + kk * 16 + 2 * t);
    af[2] = load_pair(a + g * lda + kk * 16 + 2 * t + 8);
    af[3] = load_pair(a + (g + 8) * lda + kk * 16 + 2 * t + 8);
#pragma unroll
    for (int j = 0; j < N; ++j) {
      const uint16_t* br = bt + (j * 8 + g) * ldb + kk * 16 + 2 * t;
      mma_16816<T>(c[j], af, load_pair(br), load_pair(br + 8));
    }
  }
}

// acc[D / 8][4] += X[16][8 * N] B[8 * N][D], X given as accumulator tiles (rounded to T), B^T rows
// from `bt` ([D][ldb]).
template <typename T, int D, int N>
__device__ __forceinline__ void mma_acc(float (&acc)[D / 8][4], const float (&x)[N][4], const uint16_t* bt, int ldb) {
  const int lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
#pragma unroll
  for (int kk = 0; kk < N / 2; ++kk) {
    uint32_t a[4];
    a[0] = pack2<T>(x[2 * kk][0], x[2 * kk][1]);
    a[1] = pack2<T>(x[2 * kk][2], x[2 * kk][3]);
    a[2] = pack2<T>(x[2 * kk + 1][0], x[2 * kk + 1][1]);
    a[3] = pack2<T>(x[2 * kk + 1][2], x[2 * kk + 1][3]);
#pragma unroll
    for (int i = 0; i < D / 8; ++i) {
      const uint16_t* br = bt + (i * 8 + g) * ldb + kk * 16 + 2 * t;
      mma_16816<T>(acc[i], a, load_pair(br), load_pair(br + 8));
    }
  }
}

// delta[row] = sum_d dout[row][d] * out[row][d]: one warp per row.
template <typename T>
__global__ void attention_bwd_delta_kernel(const T* __restrict__ out,   // [rows, D]
                                           const T* __restrict__ dout,  // [rows, D]
                                           float* __restrict__ delta,   // [rows]
                                           int64_t rows, int D) {
  const int64_t row = blockIdx.x * int64_t(blockDim.x / 32) + threadIdx.x / 32;
  if (row >= rows) return;
  float sum = 0.f;
  for (int d = threadIdx.x % 32; d < D; d += 32) sum += to_float(out[row * D + d]) * to_float(dout[row * D + d]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, o);
  if (threadIdx.x % 32 == 0) delta[row] = sum;
}

// The causal limit of packed rows [r0, r1): one past the last key any of them sees.
__device__ __forceinline__ int causal_key_end(int r0, int r1, int Sq, int Sk) {
  const int r_last = r1 - 1;
  const int max_pos = (r0 / Sq == r_last / Sq) ? r_last % Sq : Sq - 1;
  return min(Sk, max_pos + Sk - Sq + 1);
}

template <typename T, int D>
__global__ __launch_bounds__(128) void attention_bwd_dkdv_kernel(
    const T* __restrict__ q,        // [B * Hkv, R, D]
    const T* __restrict__ k,        // [B * Hkv, Sk, D]
    const T* __restrict__ v,        // [B * Hkv, Sk, D]
    const T* __restrict__ dout,     // [B * Hkv, R, D]
    const float* __restrict__ lse,  // [B * Hkv, R]
    const float* __restrict__ delta,  // [B * Hkv, R]
    T* __restrict__ dk,             // [B * Hkv, Sk, D]
    T* __restrict__ dv,             // [B * Hkv, Sk, D]
    int R, int Sq, int Sk, bool causal, float scale, float scale_log2) {
  constexpr int BM = bwd_step_rows<D>(), BN = kBwdKeys, LD = D + kPad, LDT = BM + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sK = smem;              // [BN][LD]
  uint16_t* sV = sK + BN * LD;      // [BN][LD]
  uint16_t* sQ = sV + BN * LD;      // [BM][LD]
  uint16_t* sdO = sQ + BM * LD;     // [BM][LD]
  uint16_t* sQt = sdO + BM * LD;    // [D][LDT]
  uint16_t* sdOt = sQt + D * LDT;   // [D][LDT]
  float* sL = reinterpret_cast<float*>(sdOt + D * LDT);  // [BM] lse in base 2
  float* sDelta = sL + BM;                               // [BM]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t head = blockIdx.y;
  const int n0 = blockIdx.x * BN;
  const int offset = Sk - Sq;
  const uint16_t* qh = reinterpret_cast<const uint16_t*>(q) + head * R * D;
  const uint16_t* doh = reinterpret_cast<const uint16_t*>(dout) + head * R * D;
  load_tile<D, 128>(reinterpret_cast<const uint16_t*>(k) + head * Sk * D, n0, BN, Sk, sK, nullptr);
  load_tile<D, 128>(reinterpret_cast<const uint16_t*>(v) + head * Sk * D, n0, BN, Sk, sV, nullptr);

  const int key_a = n0 + warp * 16 + g, key_b = key_a + 8;  // this thread's keys (accumulator rows)
  float dk_acc[D / 8][4], dv_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i)
#pragma unroll
    for (int e = 0; e < 4; ++e) dk_acc[i][e] = dv_acc[i][e] = 0.f;

  for (int r0 = 0; r0 < R; r0 += BM) {
    const int r1 = min(R, r0 + BM);
    if (causal && causal_key_end(r0, r1, Sq, Sk) <= n0) continue;  // no row of this tile sees these keys
    __syncthreads();  // previous tile consumed (and sK/sV written, on the first pass)
    load_tile<D, 128>(qh, r0, BM, R, sQ, sQt);
    load_tile<D, 128>(doh, r0, BM, R, sdO, sdOt);
    for (int i = threadIdx.x; i < BM; i += 128) {
      sL[i] = r0 + i < R ? lse[head * R + r0 + i] * kLog2e : 0.f;
      sDelta[i] = r0 + i < R ? delta[head * R + r0 + i] : 0.f;
    }
    __syncthreads();

    // P^T = exp2(K Q^T * scale_log2 - lse_log2): [16 keys][BM rows] for this warp.
    float pt[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) pt[j][0] = pt[j][1] = pt[j][2] = pt[j][3] = 0.f;
    mma_rows<T, D, BM / 8>(pt, sK + warp * 16 * LD, LD, sQ, LD);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int local = j * 8 + 2 * t + (e & 1), row = r0 + local, key = e < 2 ? key_a : key_b;
        const bool visible = key < Sk && row < R && (!causal || key <= row % Sq + offset);
        pt[j][e] = visible ? exp2f(pt[j][e] * scale_log2 - sL[local]) : 0.f;
      }
    mma_acc<T, D, BM / 8>(dv_acc, pt, sdOt, LDT);  // dV += P^T dO

    // dS^T = P^T * (V dO^T - delta).
    float dst[BM / 8][4];
#pragma unroll
    for (int j = 0; j < BM / 8; ++j) dst[j][0] = dst[j][1] = dst[j][2] = dst[j][3] = 0.f;
    mma_rows<T, D, BM / 8>(dst, sV + warp * 16 * LD, LD, sdO, LD);
#pragma unroll
    for (int j = 0; j < BM / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) dst[j][e] = pt[j][e] * (dst[j][e] - sDelta[j * 8 + 2 * t + (e & 1)]);
    mma_acc<T, D, BM / 8>(dk_acc, dst, sQt, LDT);  // dK += dS^T Q
  }

  T* dkh = dk + head * Sk * D;
  T* dvh = dv + head * Sk * D;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = i * 8 + 2 * t;
    if (key_a < Sk) {
      *reinterpret_cast<uint32_t*>(dkh + int64_t(key_a) * D + col) = pack2<T>(dk_acc[i][0] * scale, dk_acc[i][1] * scale);
      *reinterpret_cast<uint32_t*>(dvh + int64_t(key_a) * D + col) = pack2<T>(dv_acc[i][0], dv_acc[i][1]);
    }
    if (key_b < Sk) {
      *reinterpret_cast<uint32_t*>(dkh + int64_t(key_b) * D + col) = pack2<T>(dk_acc[i][2] * scale, dk_acc[i][3] * scale);
      *reinterpret_cast<uint32_t*>(dvh + int64_t(key_b) * D + col) = pack2<T>(dv_acc[i][2], dv_acc[i][3]);
    }
  }
}

template <typename T, int D>
__global__ __launch_bounds__(128) void attention_bwd_dq_kernel(
    const T* __restrict__ q,          // [B * Hkv, R, D]
    const T* __restrict__ k,          // [B * Hkv, Sk, D]
    const T* __restrict__ v,          // [B * Hkv, Sk, D]
    const T* __restrict__ dout,       // [B * Hkv, R, D]
    const float* __restrict__ lse,    // [B * Hkv, R]
    const float* __restrict__ delta,  // [B * Hkv, R]
    T* __restrict__ dq,               // [B * Hkv, R, D]
    int R, int Sq, int Sk, bool causal, float scale, float scale_log2) {
  constexpr int BM = kBwdRows, BN = kBwdKeys, LD = D + kPad, LDT = BN + kPad;
  extern __shared__ __align__(16) uint16_t smem[];
  uint16_t* sQ = smem;             // [BM][LD]
  uint16_t* sdO = sQ + BM * LD;    // [BM][LD]
  uint16_t* sK = sdO + BM * LD;    // [BN][LD]
  uint16_t* sV = sK + BN * LD;     // [BN][LD]
  uint16_t* sKt = sV + BN * LD;    // [D][LDT]

  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
  const int64_t head = blockIdx.y;
  const int r0 = blockIdx.x * BM;
  const int offset = Sk - Sq;
  const uint16_t* kh = reinterpret_cast<const uint16_t*>(k) + head * Sk * D;
  const uint16_t* vh = reinterpret_cast<const uint16_t*>(v) + head * Sk * D;
  load_tile<D, 128>(reinterpret_cast<const uint16_t*>(q) + head * R * D, r0, BM, R, sQ, nullptr);
  load_tile<D, 128>(reinterpret_cast<const uint16_t*>(dout) + head * R * D, r0, BM, R, sdO, nullptr);

  const int row_a = r0 + warp * 16 + g, row_b = row_a + 8;
  const int pos_a = row_a % Sq, pos_b = row_b % Sq;
  const float lse_a = row_a < R ? lse[head * R + row_a] * kLog2e : 0.f;
  const float lse_b = row_b < R ? lse[head * R + row_b] * kLog2e : 0.f;
  const float delta_a = row_a < R ? delta[head * R + row_a] : 0.f;
  const float delta_b = row_b < R ? delta[head * R + row_b] : 0.f;
  const int kv_end = causal ? causal_key_end(r0, min(R, r0 + BM), Sq, Sk) : Sk;
  float dq_acc[D / 8][4];
#pragma unroll
  for (int i = 0; i < D / 8; ++i) dq_acc[i][0] = dq_acc[i][1] = dq_acc[i][2] = dq_acc[i][3] = 0.f;

  for (int n0 = 0; n0 < kv_end; n0 += BN) {
    __syncthreads();
    load_tile<D, 128>(kh, n0, BN, Sk, sK, sKt);
    load_tile<D, 128>(vh, n0, BN, Sk, sV, nullptr);
    __syncthreads();
    float p[BN / 8][4], ds[BN / 8][4];
#pragma unroll
    for (int j = 0; j < BN / 8; ++j) p[j][0] = p[j][1] = p[j][2] = p[j][3] = ds[j][0] = ds[j][1] = ds[j][2] = ds[j][3] = 0.f;
    mma_rows<T, D, BN / 8>(p, sQ + warp * 16 * LD, LD, sK, LD);    // S = Q K^T
    mma_rows<T, D, BN / 8>(ds, sdO + warp * 16 * LD, LD, sV, LD);  // dP = dO V^T
#pragma unroll
    for (int j = 0; j < BN / 8; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int key = n0 + j * 8 + 2 * t + (e & 1), row = e < 2 ? row_a : row_b;
        const bool visible = key < Sk && row < R && (!causal || key <= (e < 2 ? pos_a : pos_b) + offset);
        const float prob = visible ? exp2f(p[j][e] * scale_log2 - (e < 2 ? lse_a : lse_b)) : 0.f;
        ds[j][e] = prob * (ds[j][e] - (e < 2 ? delta_a : delta_b));
      }
    mma_acc<T, D, BN / 8>(dq_acc, ds, sKt, LDT);  // dQ += dS K
  }

  T* dqh = dq + head * R * D;
#pragma unroll
  for (int i = 0; i < D / 8; ++i) {
    const int col = i * 8 + 2 * t;
    if (row_a < R)
      *reinterpret_cast<uint32_t*>(dqh + int64_t(row_a) * D + col) = pack2<T>(dq_acc[i][0] * scale, dq_acc[i][1] * scale);
    if (row_b < R)
      *reinterpret_cast<uint32_t*>(dqh + int64_t(row_b) * D + col) = pack2<T>(dq_acc[i][2] * scale, dq_acc[i][3] * scale);
  }
}

template <typename T, int D>
cudaError_t launch_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out,
                       const float* lse, float* delta, void* dq, void* dk, void* dv, int64_t B, int64_t H,
                       int64_t Hkv, int64_t Sq, int64_t Sk, bool causal, float scale, cudaStream_t stream) {
  const int64_t R = (H / Hkv) * Sq, rows = B * H * Sq;
  cudaError_t err = cudaSuccess;
  if (rows > 0) {  // with no queries only the dK/dV kernel runs, writing zeros
    attention_bwd_delta_kernel<T><<<static_cast<unsigned>((rows + 7) / 8), 256, 0, stream>>>(
        static_cast<const T*>(out), static_cast<const T*>(dout), delta, rows, static_cast<int>(D));
    if ((err = cudaGetLastError()) != cudaSuccess) return err;
  }
  constexpr size_t dkdv_smem = bwd_dkdv_smem_bytes<D>(), dq_smem = bwd_dq_smem_bytes<D>();
  auto dkdv = attention_bwd_dkdv_kernel<T, D>;
  auto dqk = attention_bwd_dq_kernel<T, D>;
  if ((err = cudaFuncSetAttribute(dkdv, cudaFuncAttributeMaxDynamicSharedMemorySize, dkdv_smem)) != cudaSuccess)
    return err;
  if ((err = cudaFuncSetAttribute(dqk, cudaFuncAttributeMaxDynamicSharedMemorySize, dq_smem)) != cudaSuccess)
    return err;
  const float scale_log2 = scale * kLog2e;
  dkdv<<<dim3(static_cast<unsigned>((Sk + kBwdKeys - 1) / kBwdKeys), static_cast<unsigned>(B * Hkv)), 128,
         dkdv_smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                              static_cast<const T*>(dout), lse, delta, static_cast<T*>(dk), static_cast<T*>(dv),
                              static_cast<int>(R), static_cast<int>(Sq), static_cast<int>(Sk), causal, scale,
                              scale_log2);
  if ((err = cudaGetLastError()) != cudaSuccess || R == 0) return err;
  dqk<<<dim3(static_cast<unsigned>((R + kBwdRows - 1) / kBwdRows), static_cast<unsigned>(B * Hkv)), 128, dq_smem,
        stream>>>(static_cast<const T*>(q), static_cast<const T*>(k), static_cast<const T*>(v),
                  static_cast<const T*>(dout), lse, delta, static_cast<T*>(dq), static_cast<int>(R),
                  static_cast<int>(Sq), static_cast<int>(Sk), causal, scale, scale_log2);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd_typed(const void* dout, const void* q, const void* k, const void* v, const void* out,
                             const float* lse, float* delta, void* dq, void* dk, void* dv, int64_t B, int64_t H,
                             int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, bool causal, float scale,
                             cudaStream_t stream) {
  switch (D) {
    case 32: return launch_bwd<T, 32>(dout, q, k, v, out, lse, delta, dq, dk, dv, B, H, Hkv, Sq, Sk, causal, scale, stream);
    case 64: return launch_bwd<T, 64>(dout, q, k, v, out, lse, delta, dq, dk, dv, B, H, Hkv, Sq, Sk, causal, scale, stream);
    case 128: return launch_bwd<T, 128>(dout, q, k, v, out, lse, delta, dq, dk, dv, B, H, Hkv, Sq, Sk, causal, scale, stream);
  }
  return cudaErrorInvalidValue;
}

struct Plan {
  int warps, splits, keys_per_split;
};

Plan plan_attention(int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D) {
  const int BN = D <= 128 ? 64 : 32;
  const int64_t R = (H / Hkv) * Sq;
  if (Sq > kDecodeMaxSq) return {4, 1, static_cast<int>(Sk)};
  // Decode: few rows, so split the keys until the grid covers the SMs about twice.
  int device = 0, sms = 132;
  if (cudaGetDevice(&device) == cudaSuccess) cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t blocks = B * Hkv * ((R + 15) / 16);
  const int64_t tiles = (Sk + BN - 1) / BN;
  const int64_t splits = std::clamp<int64_t>((2 * sms + blocks - 1) / blocks, 1, std::min<int64_t>(tiles, 128));
  const int64_t keys = ((tiles + splits - 1) / splits) * BN;
  return {1, static_cast<int>((Sk + keys - 1) / keys), static_cast<int>(keys)};
}

template <typename T, int D, int WARPS>
cudaError_t launch_fwd(const void* q, const void* k, const void* v, void* out, float* lse, float* part_o,
                       float* part_lse, int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, const Plan& plan,
                       bool causal, float scale, cudaStream_t stream) {
  const int64_t R = (H / Hkv) * Sq;
  const dim3 grid(static_cast<unsigned>((R + 16 * WARPS - 1) / (16 * WARPS)), static_cast<unsigned>(B * Hkv),
                  static_cast<unsigned>(plan.splits));
  constexpr size_t smem = smem_bytes<WARPS, D>();
  auto kernel = attention_fwd_kernel<T, D, WARPS>;
  if constexpr (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, smem);
    if (err != cudaSuccess) return err;
  }
  kernel<<<grid, WARPS * 32, smem, stream>>>(static_cast<const T*>(q), static_cast<const T*>(k),
                                             static_cast<const T*>(v), static_cast<T*>(out), lse,
                                             plan.splits > 1 ? part_o : nullptr, part_lse, static_cast<int>(R),
                                             static_cast<int>(Sq), static_cast<int>(Sk), plan.keys_per_split, causal,
                                             scale * kLog2e);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || plan.splits == 1) return err;
  const int64_t rows = B * H * Sq;
  attention_combine_kernel<T><<<static_cast<unsigned>(rows), std::min<int>(D, 128), 0, stream>>>(
      part_o, part_lse, static_cast<T*>(out), lse, plan.splits, rows, static_cast<int>(D));
  return cudaGetLastError();
}

template <typename T, int D>
cudaError_t launch_fwd_warps(const void* q, const void* k, const void* v, void* out, float* lse, float* part_o,
                             float* part_lse, int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk,
                             const Plan& plan, bool causal, float scale, cudaStream_t stream) {
  if (plan.warps == 1)
    return launch_fwd<T, D, 1>(q, k, v, out, lse, part_o, part_lse, B, H, Hkv, Sq, Sk, plan, causal, scale, stream);
  return launch_fwd<T, D, 4>(q, k, v, out, lse, part_o, part_lse, B, H, Hkv, Sq, Sk, plan, causal, scale, stream);
}

template <typename T>
cudaError_t launch_fwd_typed(const void* q, const void* k, const void* v, void* out, float* lse, float* part_o,
                             float* part_lse, int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D,
                             const Plan& plan, bool causal, float scale, cudaStream_t stream) {
  switch (D) {
    case 32: return launch_fwd_warps<T, 32>(q, k, v, out, lse, part_o, part_lse, B, H, Hkv, Sq, Sk, plan, causal, scale, stream);
    case 64: return launch_fwd_warps<T, 64>(q, k, v, out, lse, part_o, part_lse, B, H, Hkv, Sq, Sk, plan, causal, scale, stream);
    case 128: return launch_fwd_warps<T, 128>(q, k, v, out, lse, part_o, part_lse, B, H, Hkv, Sq, Sk, plan, causal, scale, stream);
    case 256: return launch_fwd_warps<T, 256>(q, k, v, out, lse, part_o, part_lse, B, H, Hkv, Sq, Sk, plan, causal, scale, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t launch_attention_bwd(const void* dout, const void* q, const void* k, const void* v, const void* out,
                                 const float* lse, float* delta, void* dq, void* dk, void* dv, int64_t B, int64_t H,
                                 int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, bool causal, float scale,
                                 FloatType type, cudaStream_t stream) {
  if (B * Hkv * Sk == 0) return cudaSuccess;
  if (Hkv <= 0 || H % Hkv != 0 || B * Hkv > 65535 || (causal && Sq > Sk)) return cudaErrorInvalidValue;
  switch (type) {
    case FloatType::kFloat16:
      return launch_bwd_typed<__half>(dout, q, k, v, out, lse, delta, dq, dk, dv, B, H, Hkv, Sq, Sk, D, causal, scale,
                                      stream);
    case FloatType::kBFloat16:
      return launch_bwd_typed<__nv_bfloat16>(dout, q, k, v, out, lse, delta, dq, dk, dv, B, H, Hkv, Sq, Sk, D, causal,
                                             scale, stream);
    case FloatType::kFloat32: break;
  }
  return cudaErrorInvalidValue;
}

size_t attention_fwd_workspace_bytes(int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D) {
  const Plan plan = plan_attention(B, H, Hkv, Sq, Sk, D);
  if (plan.splits == 1) return 0;
  return sizeof(float) * static_cast<size_t>(plan.splits) * B * H * Sq * (D + 1);
}

cudaError_t launch_attention_fwd(const void* q, const void* k, const void* v, void* out, float* lse, void* workspace,
                                 int64_t B, int64_t H, int64_t Hkv, int64_t Sq, int64_t Sk, int64_t D, bool causal,
                                 float scale, FloatType type, cudaStream_t stream) {
  if (B * H * Sq == 0) return cudaSuccess;
  if (Hkv <= 0 || H % Hkv != 0 || Sk <= 0 || B * Hkv > 65535 || (causal && Sq > Sk)) return cudaErrorInvalidValue;
  const Plan plan = plan_attention(B, H, Hkv, Sq, Sk, D);
  float* part_o = static_cast<float*>(workspace);                        // [splits, B * H * Sq, D]
  float* part_lse = part_o ? part_o + int64_t(plan.splits) * B * H * Sq * D : nullptr;  // [splits, B * H * Sq]
  if (plan.splits > 1 && part_o == nullptr) return cudaErrorInvalidValue;
  switch (type) {
    case FloatType::kFloat16:
      return launch_fwd_typed<__half>(q, k, v, out, lse, part_o, part_lse, B, H, Hkv, Sq, Sk, D, plan, causal, scale, stream);
    case FloatType::kBFloat16:
      return launch_fwd_typed<__nv_bfloat16>(q, k, v, out, lse, part_o, part_lse, B, H, Hkv, Sq, Sk, D, plan, causal,
                                             scale, stream);
    case FloatType::kFloat32: break;
  }
  return cudaErrorInvalidValue;
}

}  // namespace msmartcompute::cuda
