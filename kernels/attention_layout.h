// Index math of the attention kernels' tensor-core fragments and shared-memory layout, as small
// __host__ __device__ functions: kernels/attention.cu uses them, and tests/cpp/test_attention_layout.cpp
// checks them on the host against the PTX ISA fragment tables (mma.m16n8k16, ldmatrix), so a
// layout mistake fails CI on a machine with no GPU. No CUDA headers: it compiles with g++ too.
#pragma once

#if defined(__CUDACC__)
#define MSC_LAYOUT_FN __host__ __device__ __forceinline__
#else
#define MSC_LAYOUT_FN inline
#endif

namespace msmartcompute::cuda::layout {

struct Coord {
  int row, col;
};

// mma.sync.m16n8k16 (f16/bf16 inputs, f32 accumulators), PTX ISA "Matrix fragments for
// mma.m16n8k16 with floating point type"; g = lane >> 2 (groupID), t = lane % 4 (threadID_in_group).
// A [16][16]: element e = 0..7 (register e / 2, half e % 2) of a lane.
MSC_LAYOUT_FN Coord mma_a(int lane, int e) {
  return {(lane >> 2) + 8 * ((e >> 1) & 1), 2 * (lane & 3) + (e & 1) + 8 * (e >> 2)};
}
// B [16 (k)][8 (n)]: element e = 0..3 (register e / 2, half e % 2); row is k, col is n.
MSC_LAYOUT_FN Coord mma_b(int lane, int e) { return {2 * (lane & 3) + (e & 1) + 8 * (e >> 1), lane >> 2}; }
// C/D [16][8]: accumulator e = 0..3.
MSC_LAYOUT_FN Coord mma_c(int lane, int e) { return {(lane >> 2) + 8 * (e >> 1), 2 * (lane & 3) + (e & 1)}; }

// ldmatrix.sync.aligned.m8n8.x4.b16, PTX ISA "Warp-level matrix load instruction: ldmatrix":
// lane l gives the shared address of row l % 8 of matrix l / 8; register m of lane l receives
// row l / 4, columns 2 (l % 4) and 2 (l % 4) + 1 of matrix m, or with .trans the transpose: rows
// 2 (l % 4) and 2 (l % 4) + 1 of column l / 4. The element (in the 8x8 matrix as stored) that half
// h of a register of lane l holds:
MSC_LAYOUT_FN Coord ldmatrix_element(int lane, int h, bool trans) {
  return trans ? Coord{2 * (lane & 3) + h, lane >> 2} : Coord{lane >> 2, 2 * (lane & 3) + h};
}

// Which 8-element row segment of a 16x16 tile lane l addresses, so that the four registers of one
// ldmatrix.x4 are exactly an mma operand fragment:
// A operand from a row-major [m][k] tile: matrices (m 0-7, k 0-7), (m 8-15, k 0-7), (m 0-7, k 8-15),
// (m 8-15, k 8-15) are registers a0..a3.
MSC_LAYOUT_FN Coord ldsm_a(int lane) { return {(lane & 7) + 8 * ((lane >> 3) & 1), 8 * (lane >> 4)}; }
// B operand of two 8-wide n-tiles from a row-major [n][k] tile (K in S = Q K^T): matrices (n 0-7,
// k 0-7), (n 0-7, k 8-15), (n 8-15, k 0-7), (n 8-15, k 8-15) are b0, b1 of n-tile 0, then of n-tile 1.
MSC_LAYOUT_FN Coord ldsm_b(int lane) { return {(lane & 7) + 8 * (lane >> 4), 8 * ((lane >> 3) & 1)}; }
// B operand of two n-tiles from a row-major [k][n] tile with .trans (V in O = P V): matrices (k 0-7,
// n 0-7), (k 8-15, n 0-7), (k 0-7, n 8-15), (k 8-15, n 8-15) are b0, b1 of n-tile 0, then of n-tile 1.
MSC_LAYOUT_FN Coord ldsm_b_trans(int lane) { return {(lane & 7) + 8 * ((lane >> 3) & 1), 8 * (lane >> 4)}; }

// The accumulators of two adjacent 8-column C tiles (2 kk, 2 kk + 1) are, packed in pairs, the A
// fragment of one 16-deep k step: A register r is C tile (r >> 1) registers (2 (r & 1), 2 (r & 1) + 1).
// So P = softmax(S) and dS never leave registers between the two products.
MSC_LAYOUT_FN int a_reg_c_tile(int r) { return r >> 1; }
MSC_LAYOUT_FN int a_reg_c_first(int r) { return 2 * (r & 1); }

// Shared tiles are [rows][D] halves, rows of D / 8 16-byte chunks, with no padding: chunk c of row r
// is stored at chunk c ^ swizzle(r). The 8 rows one ldmatrix phase reads (8 consecutive rows, one
// logical chunk) and the 8 chunks one cp.async phase writes (8 consecutive chunks in row order) then
// fall in the 8 distinct 16-byte bank groups of a 128-byte line: no bank conflicts.
MSC_LAYOUT_FN int swizzle_chunk(int row, int chunk, int chunks_per_row) {
  const int rows_per_line = chunks_per_row >= 8 ? 1 : 8 / chunks_per_row;
  const int span = chunks_per_row >= 8 ? 8 : chunks_per_row;
  return chunk ^ ((row / rows_per_line) % span);
}
// Offset in halves of element (row, col) of a swizzled [rows][D] tile; col % 8 stays in its chunk.
MSC_LAYOUT_FN int swizzled_offset(int row, int col, int D) {
  return row * D + swizzle_chunk(row, col >> 3, D >> 3) * 8 + (col & 7);
}

// Grouped-query packing: the G = H / Hkv query heads of one kv head are the rows of one
// [G * Sq, D] matrix; packed row r is query position r % Sq of head (kv_head * G + r / Sq).
MSC_LAYOUT_FN int packed_head(int r, int Sq) { return r / Sq; }
MSC_LAYOUT_FN int packed_pos(int r, int Sq) { return r % Sq; }

// Causal, aligned bottom-right: query position i sees keys j <= i + Sk - Sq. One past the last key
// any of the packed rows [r0, r1) sees (0 when none does; never above Sk).
MSC_LAYOUT_FN int causal_key_end(int r0, int r1, int Sq, int Sk) {
  const int r_last = r1 - 1;
  const int max_pos = (r0 / Sq == r_last / Sq) ? r_last % Sq : Sq - 1;
  const int end = max_pos + Sk - Sq + 1;
  return end < 0 ? 0 : (end > Sk ? Sk : end);
}

// Backward tiles per head dim D (4 warps per block; every warp owns 16 rows of its products):
// - dK/dV: kKeys keys per block, kStepRows packed query rows per step (Q, dO double-buffered),
//   kOutCols of the D output columns per block (D / kOutCols blocks split the columns at D 256,
//   where 2 x 256 accumulator columns per thread would spill);
// - dQ: kDqRows packed rows per block, kDqKeys keys per step (K, V double-buffered).
// Shared memory in bytes: dK/dV holds K and V [kKeys][D] halves, two stages of Q and dO
// [kStepRows][D] and per staged row its lse, delta (float) and last visible key (int); dQ holds Q
// and dO [kDqRows][D] and two stages of K and V [kDqKeys][D].
template <int D>
struct BwdTiles {
  static constexpr int kKeys = 64;
  static constexpr int kStepRows = D <= 64 ? 64 : (D <= 128 ? 32 : 16);
  static constexpr int kOutCols = D <= 128 ? D : 128;
  static constexpr int kDqRows = 64;
  static constexpr int kDqKeys = D <= 128 ? 64 : 16;
  static constexpr int kDkdvSmem = 2 * (2 * kKeys * D + 4 * kStepRows * D) + 2 * kStepRows * (4 + 4 + 4);
  static constexpr int kDqSmem = 2 * (2 * kDqRows * D + 4 * kDqKeys * D);
};

}  // namespace msmartcompute::cuda::layout
