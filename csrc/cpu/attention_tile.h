// The CPU attention tile shared by fused, varlen and paged attention: up to kBlockQ query rows
// of one kv head (a grouped-query "packed" block: rows of several query heads that read the same
// keys) against streamed blocks of kBlockK keys, with an online softmax in fp32. The callers only
// say where rows live (row pointers, so strided views and paged caches are read in place, never
// copied) and which keys each row sees (key_end: row r sees keys j < key_end(r)).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

namespace msmartcompute::cpu {

constexpr int64_t kBlockQ = 64;  // query rows per tile: a K/V block's conversion amortized over 64 rows
constexpr int64_t kBlockK = 64;  // keys per streamed block: K^T and V blocks fit in L1/L2 as fp32

// The hot loops, compiled once in attention_tile.cpp (with AVX-512 / AVX2 clones on x86-64).
// s[r][:] = q[r] . kt for r < nq over kBlockK keys; q [nq][D], kt [D][kBlockK], s [nq][kBlockK].
void block_scores(const float* q, const float* kt, float* s, int64_t nq, int64_t D);
// p[j] = exp(p[j] - max) for j < n; returns their sum.
float exp_shifted(float* p, int64_t n, float max);
// acc[r][:] += sum_j p[r][j] * v[j][:] for r < nq, j < nk; p [nq][kBlockK], v [nk][D], acc [nq][D].
void block_accumulate(const float* p, const float* v, float* acc, int64_t nq, int64_t nk, int64_t D);

// Scratch of one thread: the tile's scaled fp32 queries, one K^T and V block, the probabilities.
struct TileBuffers {
  explicit TileBuffers(int64_t D) : qf(kBlockQ * D), kt(D * kBlockK), vf(kBlockK * D), p(kBlockQ * kBlockK) {}
  std::vector<float> qf, kt, vf, p;
};

// Online-softmax state of a tile: unnormalized output rows, running max and sum per row.
// A row that has seen no key yet has max -inf and sum 0.
struct TileState {
  explicit TileState(int64_t D) : acc(kBlockQ * D), row_max(kBlockQ), row_sum(kBlockQ) {}
  void reset(int64_t nq, int64_t D) {
    std::fill(acc.begin(), acc.begin() + nq * D, 0.f);
    std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
    std::fill(row_sum.begin(), row_sum.end(), 0.f);
  }
  std::vector<float> acc, row_max, row_sum;
};

// Loads rows r < nq (q_row(r) -> const T*, D contiguous values) into buf.qf, scale folded in.
template <typename T, typename QRow>
void load_queries(TileBuffers& buf, int64_t nq, int64_t D, float scale, QRow q_row) {
  for (int64_t r = 0; r < nq; ++r) {
    const T* src = q_row(r);
    float* dst = &buf.qf[r * D];
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<float>(src[d]) * scale;
  }
}

// Accumulates keys [k_lo, k_hi) into `state` for the rows loaded in buf.qf; row r takes only keys
// j < key_end(r). k_row(j) / v_row(j) -> const T* (D contiguous values). Key blocks past every
// row's key_end are skipped (causal tiles).
template <typename T, typename KRow, typename VRow, typename KeyEnd>
void attend_keys(TileBuffers& buf, TileState& state, int64_t nq, int64_t D, int64_t k_lo, int64_t k_hi,
                 KRow k_row, VRow v_row, KeyEnd key_end) {
  int64_t last = k_lo;
  for (int64_t r = 0; r < nq; ++r) last = std::max<int64_t>(last, key_end(r));
  k_hi = std::min(k_hi, last);
  for (int64_t j0 = k_lo; j0 < k_hi; j0 += kBlockK) {
    const int64_t nk = std::min(kBlockK, k_hi - j0);
    // Rows of a paged cache (or of one head in [S, H, D]) lie a page or more apart, where the
    // hardware prefetchers stop: ask for the next block's rows while this one is computed.
    for (int64_t j = j0 + kBlockK; j < std::min(k_hi, j0 + 2 * kBlockK); ++j) {
      const char* kr = reinterpret_cast<const char*>(k_row(j));
      const char* vr = reinterpret_cast<const char*>(v_row(j));
      for (int64_t byte = 0; byte < D * static_cast<int64_t>(sizeof(T)); byte += 64) {
        __builtin_prefetch(kr + byte);
        __builtin_prefetch(vr + byte);
      }
    }
    if (nk < kBlockK) std::fill(buf.kt.begin(), buf.kt.end(), 0.f);
    for (int64_t j = 0; j < nk; ++j) {
      const T* kr = k_row(j0 + j);
      const T* vr = v_row(j0 + j);
      float* vd = &buf.vf[j * D];
      for (int64_t d = 0; d < D; ++d) {
        buf.kt[d * kBlockK + j] = static_cast<float>(kr[d]);  // transposed: rows of s vectorize
        vd[d] = static_cast<float>(vr[d]);
      }
    }
    block_scores(buf.qf.data(), buf.kt.data(), buf.p.data(), nq, D);
    // Per row: rescale what was accumulated to the new max, turn scores into probabilities (0 for
    // keys the row does not see), then accumulate P V for the whole block.
    for (int64_t r = 0; r < nq; ++r) {
      float* pr = &buf.p[r * kBlockK];
      const int64_t visible = std::min<int64_t>(nk, key_end(r) - j0);
      if (visible <= 0) {
        std::fill(pr, pr + nk, 0.f);
        continue;
      }
      float block_max = pr[0];
      for (int64_t j = 1; j < visible; ++j) block_max = std::max(block_max, pr[j]);
      const float new_max = std::max(state.row_max[r], block_max);
      const float rescale = std::exp(state.row_max[r] - new_max);  // 0 on the first block (max was -inf)
      const float sum = exp_shifted(pr, visible, new_max);
      std::fill(pr + visible, pr + nk, 0.f);
      float* a = &state.acc[r * D];
      for (int64_t d = 0; d < D; ++d) a[d] *= rescale;
      state.row_max[r] = new_max;
      state.row_sum[r] = state.row_sum[r] * rescale + sum;
    }
    block_accumulate(buf.p.data(), buf.vf.data(), state.acc.data(), nq, nk, D);
  }
}

// Folds `part` (another key range of the same rows) into `into`. Rows empty in both stay empty:
// the max is -inf on both sides there, and exp(-inf - -inf) would be NaN, so it is never taken.
inline void merge_tiles(TileState& into, const TileState& part, int64_t nq, int64_t D) {
  for (int64_t r = 0; r < nq; ++r) {
    if (part.row_sum[r] == 0.f) continue;
    const float new_max = std::max(into.row_max[r], part.row_max[r]);
    const float a = std::exp(into.row_max[r] - new_max), b = std::exp(part.row_max[r] - new_max);
    float* acc = &into.acc[r * D];
    const float* other = &part.acc[r * D];
    for (int64_t d = 0; d < D; ++d) acc[d] = acc[d] * a + other[d] * b;
    into.row_sum[r] = into.row_sum[r] * a + part.row_sum[r] * b;
    into.row_max[r] = new_max;
  }
}

// Writes row r of the output (o_row(r) -> T*) as acc / sum and its natural-log lse through
// lse_at(r, value); a row that saw no key gets zeros and lse -inf.
template <typename T, typename ORow, typename LseAt>
void finish_rows(const TileState& state, int64_t nq, int64_t D, ORow o_row, LseAt lse_at) {
  for (int64_t r = 0; r < nq; ++r) {
    T* dst = o_row(r);
    const float sum = state.row_sum[r];
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    for (int64_t d = 0; d < D; ++d) dst[d] = static_cast<T>(state.acc[r * D + d] * inv);
    lse_at(r, sum > 0.f ? state.row_max[r] + std::log(sum) : -std::numeric_limits<float>::infinity());
  }
}

// The CPU kernels take CPU float32, bfloat16 and float16 tensors (fp32 math inside).
inline void check_cpu_float(const char* op, const at::Tensor& q) {
  TORCH_CHECK(q.device().is_cpu(), op, " on CPU: expected CPU tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              op, " on CPU: expected float32, bfloat16 or float16, got ", q.scalar_type());
}

// A view's rows must be contiguous in their last dim for the row pointers; anything else is
// copied (only q-sized inputs in practice: caches and projections have unit last stride).
inline at::Tensor last_dim_contiguous(const at::Tensor& t) {
  return t.stride(-1) == 1 ? t : t.contiguous();
}

// Gradients of attention by the plain math in fp32 (the CPU backward of fused and varlen
// attention): grad_out/q/out [..., H, Sq, D], k/v [..., Hkv, Sk, D], lse float32 [..., H, Sq];
// causal aligned to the end. The probabilities are recomputed from lse; rows that saw no key
// (lse -inf) have none, and no gradient.
inline std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_math(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const at::Tensor& out, const at::Tensor& lse, bool causal, double scale) {
  const int64_t heads = q.size(-3), kv_heads = k.size(-3), group = heads / kv_heads;
  const int64_t Sq = q.size(-2), Sk = k.size(-2);
  auto qf = q.to(at::kFloat);                                         // [..., H, Sq, D]
  auto kf = k.to(at::kFloat).repeat_interleave(group, -3);            // [..., H, Sk, D]
  auto vf = v.to(at::kFloat).repeat_interleave(group, -3);            // [..., H, Sk, D]
  auto dout = grad_out.to(at::kFloat);                                // [..., H, Sq, D]
  auto scores = at::matmul(qf, kf.transpose(-2, -1)).mul_(scale);     // [..., H, Sq, Sk]
  if (causal) {
    auto hidden = at::ones({Sq, Sk}, q.options().dtype(at::kBool)).triu(Sk - Sq + 1);
    scores.masked_fill_(hidden, -std::numeric_limits<float>::infinity());
  }
  auto row_lse = lse.unsqueeze(-1);
  auto probs = scores.sub_(row_lse).exp_().masked_fill_(row_lse.isneginf(), 0.f);  // [..., H, Sq, Sk]
  auto dv = at::matmul(probs.transpose(-2, -1), dout);                // [..., H, Sk, D]
  auto dprobs = at::matmul(dout, vf.transpose(-2, -1));               // [..., H, Sq, Sk]
  auto delta = (dout * out.to(at::kFloat)).sum(-1, true);             // [..., H, Sq, 1]
  auto dscores = probs.mul_(dprobs.sub_(delta));                      // [..., H, Sq, Sk]
  auto dq = at::matmul(dscores, kf).mul_(scale);                      // [..., H, Sq, D]
  auto dk = at::matmul(dscores.transpose(-2, -1), qf).mul_(scale);    // [..., H, Sk, D]
  if (group > 1) {  // a kv head's gradient sums over the query heads that read it
    auto grouped = [&](const at::Tensor& t) {
      auto sizes = t.sizes().vec();
      sizes[sizes.size() - 3] = kv_heads;
      sizes.insert(sizes.end() - 2, group);
      return t.reshape(sizes).sum(-3);
    };
    dk = grouped(dk);
    dv = grouped(dv);
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace msmartcompute::cpu
