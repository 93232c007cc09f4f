// Host test of kernels/attention_layout.h: the attention kernels' fragment, ldmatrix and swizzle
// index math against the PTX ISA tables, with a lane-level emulation of ldmatrix on a swizzled
// shared tile. Runs under ctest with no GPU; a layout mistake in the kernels fails here.
#include <cstdio>
#include <set>
#include <utility>
#include <vector>

#include "../../kernels/attention_layout.h"

namespace {

using namespace msmartcompute::cuda::layout;

int failures = 0;

void expect(bool ok, const char* what, int a = -1, int b = -1, int c = -1) {
  if (!ok) {
    ++failures;
    if (failures <= 20) std::printf("FAIL: %s (%d, %d, %d)\n", what, a, b, c);
  }
}

// The PTX ISA fragment tables written out the way the ISA states them, independently of the header.
Coord isa_a(int lane, int i) {  // a_i, i = 0..7
  const int group = lane >> 2, tig = lane % 4;
  const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
  const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
  return {row, col};
}
Coord isa_b(int lane, int i) {  // b_i, i = 0..3: row is k, col is n
  const int group = lane >> 2, tig = lane % 4;
  return {tig * 2 + (i & 1) + (i >= 2 ? 8 : 0), group};
}
Coord isa_c(int lane, int i) {  // c_i, i = 0..3
  const int group = lane >> 2, tig = lane % 4;
  return {i < 2 ? group : group + 8, tig * 2 + (i & 1)};
}

void test_mma_tables() {
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e)
      expect(mma_a(lane, e).row == isa_a(lane, e).row && mma_a(lane, e).col == isa_a(lane, e).col, "mma_a", lane, e);
    for (int e = 0; e < 4; ++e) {
      expect(mma_b(lane, e).row == isa_b(lane, e).row && mma_b(lane, e).col == isa_b(lane, e).col, "mma_b", lane, e);
      expect(mma_c(lane, e).row == isa_c(lane, e).row && mma_c(lane, e).col == isa_c(lane, e).col, "mma_c", lane, e);
    }
  }
  // Each table covers its matrix exactly once over the warp.
  std::set<std::pair<int, int>> a, b, c;
  for (int lane = 0; lane < 32; ++lane) {
    for (int e = 0; e < 8; ++e) a.insert({mma_a(lane, e).row, mma_a(lane, e).col});
    for (int e = 0; e < 4; ++e) b.insert({mma_b(lane, e).row, mma_b(lane, e).col});
    for (int e = 0; e < 4; ++e) c.insert({mma_c(lane, e).row, mma_c(lane, e).col});
  }
  expect(a.size() == 256 && b.size() == 128 && c.size() == 128, "fragments cover A 16x16, B 16x8, C 16x8");
}

// C tiles 2kk, 2kk+1 reused as the A fragment of k step kk (P V, dS K, P^T dO, dS^T Q).
void test_accumulator_is_a_fragment() {
  for (int lane = 0; lane < 32; ++lane)
    for (int e = 0; e < 8; ++e) {
      const int reg = e >> 1, half = e & 1;
      const int tile = a_reg_c_tile(reg), ce = a_reg_c_first(reg) + half;
      const Coord from_c{mma_c(lane, ce).row, mma_c(lane, ce).col + 8 * tile};
      expect(from_c.row == mma_a(lane, e).row && from_c.col == mma_a(lane, e).col, "C tiles as A", lane, e);
    }
}

// The value of logical element (row, col) of a test matrix: unique per element.
int value(int row, int col) { return row * 1000 + col; }

// A swizzled [rows][D] shared tile holding value(row, col).
std::vector<int> swizzled_tile(int rows, int D) {
  std::vector<int> smem(rows * D, -1);
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < D; ++c) smem[swizzled_offset(r, c, D)] = value(r, c);
  return smem;
}

// ldmatrix.x4 as the ISA defines it: addresses from lanes 8m .. 8m+7 are rows of matrix m; returns
// regs[lane][m][h]. The address a lane gives is the start of an 8-element row segment: logical
// (row, col) with col % 8 == 0, which the swizzle keeps contiguous.
using Regs = std::vector<std::vector<std::vector<int>>>;
Regs emulate_ldmatrix_x4(const std::vector<int>& smem, int D, const Coord (&addr)[32], bool trans) {
  Regs regs(32, std::vector<std::vector<int>>(4, std::vector<int>(2)));
  for (int lane = 0; lane < 32; ++lane)
    for (int m = 0; m < 4; ++m)
      for (int h = 0; h < 2; ++h) {
        const Coord in = ldmatrix_element(lane, h, trans);  // (row, col) within matrix m as stored
        const Coord seg = addr[8 * m + in.row];
        regs[lane][m][h] = smem[swizzled_offset(seg.row, seg.col + in.col, D)];
      }
  return regs;
}

void test_ldmatrix_on_swizzled_tiles() {
  for (int D : {32, 64, 128, 256}) {
    const int rows = 64;
    const auto smem = swizzled_tile(rows, D);
    for (int row0 = 0; row0 < rows; row0 += 16)
      for (int col0 = 0; col0 < D; col0 += 16) {
        Coord addr_a[32], addr_b[32], addr_bt[32];
        for (int lane = 0; lane < 32; ++lane) {
          addr_a[lane] = {row0 + ldsm_a(lane).row, col0 + ldsm_a(lane).col};
          addr_b[lane] = {row0 + ldsm_b(lane).row, col0 + ldsm_b(lane).col};
          addr_bt[lane] = {row0 + ldsm_b_trans(lane).row, col0 + ldsm_b_trans(lane).col};
          for (const Coord& a : {addr_a[lane], addr_b[lane], addr_bt[lane]})
            expect(a.col % 8 == 0, "ldmatrix row segments start on a 16-byte chunk", D, lane);
        }
        // A from a [m][k] tile (Q rows, dO rows, K / V rows as A in the backward).
        const Regs a = emulate_ldmatrix_x4(smem, D, addr_a, false);
        // B from a [n][k] tile (K rows in S = Q K^T): registers b0, b1 of n-tiles 0 and 1.
        const Regs b = emulate_ldmatrix_x4(smem, D, addr_b, false);
        // B from a [k][n] tile with .trans (V rows in O = P V): the same registers.
        const Regs bt = emulate_ldmatrix_x4(smem, D, addr_bt, true);
        for (int lane = 0; lane < 32; ++lane) {
          for (int e = 0; e < 8; ++e) {
            const Coord want = mma_a(lane, e);
            expect(a[lane][e >> 1][e & 1] == value(row0 + want.row, col0 + want.col), "ldmatrix A fragment", D, lane, e);
          }
          for (int reg = 0; reg < 4; ++reg)
            for (int h = 0; h < 2; ++h) {
              const int ntile = reg >> 1;
              const Coord kn = mma_b(lane, 2 * (reg & 1) + h);  // (k, n) within the n-tile
              expect(b[lane][reg][h] == value(row0 + 8 * ntile + kn.col, col0 + kn.row), "ldmatrix B fragment", D,
                     lane, reg);
              expect(bt[lane][reg][h] == value(row0 + kn.row, col0 + 8 * ntile + kn.col), "ldmatrix.trans B fragment",
                     D, lane, reg);
            }
        }
      }
  }
}

int bank_group(int offset_halves) { return (offset_halves * 2 / 16) % 8; }

void test_swizzle_is_conflict_free() {
  for (int D : {32, 64, 128, 256}) {
    const int chunks = D / 8, rows = 64;
    for (int r = 0; r < rows; ++r) {  // a permutation of the chunks of each row
      std::set<int> seen;
      for (int c = 0; c < chunks; ++c) {
        const int s = swizzle_chunk(r, c, chunks);
        expect(s >= 0 && s < chunks, "swizzled chunk inside its row", D, r, c);
        seen.insert(s);
      }
      expect(static_cast<int>(seen.size()) == chunks, "swizzle permutes a row's chunks", D, r);
    }
    // ldmatrix phase: 8 consecutive rows (starting at a multiple of 8), one logical chunk.
    for (int r0 = 0; r0 < rows; r0 += 8)
      for (int c = 0; c < chunks; ++c) {
        std::set<int> groups;
        for (int i = 0; i < 8; ++i) groups.insert(bank_group(swizzled_offset(r0 + i, 8 * c, D)));
        expect(groups.size() == 8, "ldmatrix phase hits 8 distinct bank groups", D, r0, c);
      }
    // cp.async phase: 8 consecutive 16-byte chunks in row-major order.
    for (int first = 0; first < rows * chunks; first += 8) {
      std::set<int> groups;
      for (int i = first; i < first + 8; ++i) groups.insert(bank_group(swizzled_offset(i / chunks, 8 * (i % chunks), D)));
      expect(groups.size() == 8, "cp.async phase hits 8 distinct bank groups", D, first);
    }
    // The unswizzled layout would conflict: the test can tell the difference.
    std::set<int> plain;
    for (int i = 0; i < 8; ++i) plain.insert(bank_group(i * D));
    expect(D < 128 || plain.size() == 1, "without the swizzle, D >= 128 rows share a bank group", D);
  }
}

void test_causal_and_packing() {
  for (int Sq : {1, 3, 16, 17}) {
    for (int Sk : {Sq, Sq + 5, 40}) {
      const int G = 3, R = G * Sq;
      for (int r = 0; r < R; ++r) {
        expect(packed_head(r, Sq) * Sq + packed_pos(r, Sq) == r && packed_pos(r, Sq) < Sq, "packing", r, Sq);
      }
      for (int r0 = 0; r0 < R; r0 += 4)
        for (int r1 = r0 + 1; r1 <= R; ++r1) {
          int want = 0;  // brute force: one past the largest visible key of any row
          for (int r = r0; r < r1; ++r)
            for (int j = 0; j < Sk; ++j)
              if (j <= packed_pos(r, Sq) + Sk - Sq) want = want > j + 1 ? want : j + 1;
          expect(causal_key_end(r0, r1, Sq, Sk) >= want && causal_key_end(r0, r1, Sq, Sk) <= Sk,
                 "causal_key_end covers every visible key", r0, r1, Sk);
          if (r1 - r0 <= Sq && r0 / Sq == (r1 - 1) / Sq)
            expect(causal_key_end(r0, r1, Sq, Sk) == want, "causal_key_end is tight within one head", r0, r1, Sk);
        }
    }
  }
  expect(causal_key_end(0, 1, 5, 3) == 0, "rows with no visible key give an empty range");
}

// The backward's tiles (BwdTiles): what the kernels assume of them, per head dim.
template <int D>
void check_backward_tiles() {
  using B = BwdTiles<D>;
  constexpr int kWarps = 4, kSmemLimit = 99 * 1024;  // sm_86/89: the smallest of the cards we build for
  expect(B::kDkdvSmem <= kSmemLimit && B::kDqSmem <= kSmemLimit, "backward tiles fit 99 KB", D, B::kDkdvSmem,
         B::kDqSmem);
  expect(B::kKeys == 16 * kWarps && B::kDqRows == 16 * kWarps, "each warp owns 16 keys / rows", D);
  // ldmatrix.x4 loads the B fragments of two 8-wide n-tiles: row counts and column spans step by 16.
  expect(B::kStepRows % 16 == 0 && B::kDqKeys % 16 == 0 && B::kOutCols % 16 == 0, "steps of 16", D);
  expect(D % B::kOutCols == 0, "the column split divides D", D, B::kOutCols);
  // dK and dV accumulators of one thread: at most 128 floats (256 spill; D 256 splits the columns).
  expect(2 * (B::kOutCols / 8) * 4 <= 128, "dK/dV accumulators fit the registers", D, B::kOutCols);
  // The dK/dV blocks' stores (block z, column tile i, lane quad t, pair element) cover each of the D
  // columns exactly once.
  std::vector<int> written(D, 0);
  for (int z = 0; z < D / B::kOutCols; ++z)
    for (int i = 0; i < B::kOutCols / 8; ++i)
      for (int t = 0; t < 4; ++t)
        for (int h = 0; h < 2; ++h) ++written[z * B::kOutCols + i * 8 + 2 * t + h];
  for (int c = 0; c < D; ++c) expect(written[c] == 1, "every dK/dV column written once", D, c, written[c]);
}

void test_backward_tiles() {
  check_backward_tiles<32>();
  check_backward_tiles<64>();
  check_backward_tiles<128>();
  check_backward_tiles<256>();
}

}  // namespace

int main() {
  test_mma_tables();
  test_accumulator_is_a_fragment();
  test_ldmatrix_on_swizzled_tiles();
  test_swizzle_is_conflict_free();
  test_causal_and_packing();
  test_backward_tiles();
  std::printf("%s: %d failure(s)\n", failures ? "FAIL" : "ok", failures);
  return failures ? 1 : 0;
}
