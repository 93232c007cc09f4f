// CPU fused attention. Forward: blocked online softmax (a block of queries against
// streamed blocks of keys, fp32 accumulation, never the full score matrix), parallel
// over (batch, kv head, block of the group's packed query rows). Backward: the plain math in fp32, recomputing the
// probabilities from the saved log-sum-exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <type_traits>
#include <vector>

#include "../attention.h"
#include "vectorize.h"

namespace msmartcompute {
namespace {

constexpr int64_t kBlockQ = 64;  // queries per task: K/V block conversion amortized over 64 rows
constexpr int64_t kBlockK = 64;  // keys per streamed block: K^T and V blocks fit in L1/L2 as fp32

// The block products and the exponentials, on fp32 buffers, where the time goes. On x86-64
// GCC builds clones for AVX-512 and AVX2 + FMA, picked at load time (so the build still runs
// on any x86-64); the fixed-width inner loops keep their accumulators in vector registers.
// no-trapping-math lets GCC if-convert the clamp in exp_nonpositive, so its loop vectorizes
// (MSC_HOT, vectorize.h).

#define MSC_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 64;  // head-dim columns accumulated in registers at a time

// s[r][:] = q[r] . kt for r < nq over all kBlockK keys (kt is zero past the block's keys).
// Four rows at a time, so each loaded row of kt feeds four rows of accumulators.
MSC_HOT void block_scores(const float* q,  // [nq][D]
                          const float* kt, // [D][kBlockK]
                          float* s,        // [nq][kBlockK]
                          int64_t nq, int64_t D) {
  int64_t r = 0;
  for (; r + 4 <= nq; r += 4) {
    float sr[4][kBlockK] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* kr = kt + d * kBlockK;
      const float q0 = q[r * D + d], q1 = q[(r + 1) * D + d], q2 = q[(r + 2) * D + d], q3 = q[(r + 3) * D + d];
      for (int64_t j = 0; j < kBlockK; ++j) {
        sr[0][j] += q0 * kr[j];
        sr[1][j] += q1 * kr[j];
        sr[2][j] += q2 * kr[j];
        sr[3][j] += q3 * kr[j];
      }
    }
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < kBlockK; ++j) s[(r + i) * kBlockK + j] = sr[i][j];
  }
  for (; r < nq; ++r) {
    float sr[kBlockK] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[r * D + d];
      const float* kr = kt + d * kBlockK;
      for (int64_t j = 0; j < kBlockK; ++j) sr[j] += qd * kr[j];
    }
    for (int64_t j = 0; j < kBlockK; ++j) s[r * kBlockK + j] = sr[j];
  }
}

// exp(x) for x <= 0 in a form that vectorizes: 2^n * e^f with |f| <= ln2 / 2 and a degree-6
// polynomial for e^f (Cephes expf, about 1 ulp); below -87 it returns about 1e-38, not 0.
MSC_INLINE float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * f + 1.3981999507e-3f;
  y = y * f + 8.3334519073e-3f;
  y = y * f + 4.1665795894e-2f;
  y = y * f + 1.6666665459e-1f;
  y = y * f + 5.0000001201e-1f;
  y = y * f * f + f + 1.f;
  union {  // 2^n from its bits (GCC defines union punning; its vectorizer takes this, not bit_cast)
    int32_t i;
    float f;
  } two_n;
  two_n.i = (static_cast<int32_t>(n) + 127) << 23;
  return y * two_n.f;
}

// p[j] = exp(p[j] - max) for j < n; returns their sum. Two loops: the first vectorizes, a
// float sum in the same loop would not (it may not be reordered).
MSC_HOT float exp_shifted(float* p, int64_t n, float max) {
  for (int64_t j = 0; j < n; ++j) p[j] = exp_nonpositive(p[j] - max);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += p[j];
  return sum;
}

// acc[r][:] += sum_j p[r][j] * v[j][:] for r < nq, j < nk; four rows at a time share each
// loaded row of v, and kChunk head-dim columns stay in registers across the keys.
MSC_HOT void block_accumulate(const float* p,  // [nq][kBlockK]
                              const float* v,  // [nk][D]
                              float* acc,      // [nq][D]
                              int64_t nq, int64_t nk, int64_t D) {
  int64_t r = 0;
  for (; r + 4 <= nq; r += 4) {
    int64_t c = 0;
    for (; c + kChunk <= D; c += kChunk) {
      float a[4][kChunk];
      for (int64_t i = 0; i < 4; ++i)
        for (int64_t x = 0; x < kChunk; ++x) a[i][x] = acc[(r + i) * D + c + x];
      for (int64_t j = 0; j < nk; ++j) {
        const float* vr = v + j * D + c;
        const float p0 = p[r * kBlockK + j], p1 = p[(r + 1) * kBlockK + j], p2 = p[(r + 2) * kBlockK + j],
                    p3 = p[(r + 3) * kBlockK + j];
        for (int64_t x = 0; x < kChunk; ++x) {
          a[0][x] += p0 * vr[x];
          a[1][x] += p1 * vr[x];
          a[2][x] += p2 * vr[x];
          a[3][x] += p3 * vr[x];
        }
      }
      for (int64_t i = 0; i < 4; ++i)
        for (int64_t x = 0; x < kChunk; ++x) acc[(r + i) * D + c + x] = a[i][x];
    }
    for (int64_t i = 0; i < 4 && c < D; ++i)  // head dims that are not a multiple of kChunk
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t x = c; x < D; ++x) acc[(r + i) * D + x] += p[(r + i) * kBlockK + j] * v[j * D + x];
  }
  for (; r < nq; ++r) {
    for (int64_t j = 0; j < nk; ++j) {
      const float pj = p[r * kBlockK + j];
      const float* vr = v + j * D;
      float* a = acc + r * D;
      for (int64_t x = 0; x < D; ++x) a[x] += pj * vr[x];
    }
  }
}

template <typename T>
void attention_fwd_blocked(const T* q,   // [B, H, Sq, D]
                           const T* k,   // [B, Hkv, Sk, D]
                           const T* v,   // [B, Hkv, Sk, D]
                           T* out,       // [B, H, Sq, D]
                           float* lse,   // [B, H, Sq]
                           const AttentionShape& s, bool causal, float scale) {
  // Grouped-query packing, as in kernels/attention.cu: per kv head, q is one contiguous
  // [R = G * Sq, D] matrix whose row r is query r % Sq of head r / Sq, and all its rows read
  // the same K/V, so one task converts a K/V block once for the whole group.
  const int64_t D = s.D, R = (s.H / s.Hkv) * s.Sq, q_blocks = (R + kBlockQ - 1) / kBlockQ;
  const int64_t offset = s.Sk - s.Sq;  // causal: query position i sees keys j <= i + offset
  const int64_t tasks = s.B * s.Hkv * q_blocks;
  at::parallel_for(0, tasks, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(kBlockQ * D), kt(D * kBlockK), vf(kBlockK * D), acc(kBlockQ * D), p(kBlockQ * kBlockK);
    std::vector<float> row_max(kBlockQ), row_sum(kBlockQ);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / q_blocks, i0 = (task % q_blocks) * kBlockQ;  // head: b * Hkv + kv head
      const int64_t nq = std::min(kBlockQ, R - i0);
      const T* qb = q + (head * R + i0) * D;
      const T* kb = k + head * s.Sk * D;
      const T* vb = v + head * s.Sk * D;
      for (int64_t x = 0; x < nq * D; ++x) qf[x] = static_cast<float>(qb[x]) * scale;  // scale folded into q
      std::fill(acc.begin(), acc.begin() + nq * D, 0.f);
      std::fill(row_max.begin(), row_max.end(), -std::numeric_limits<float>::infinity());
      std::fill(row_sum.begin(), row_sum.end(), 0.f);
      // Causal tiles past the last key any row of the block sees are skipped.
      int64_t k_end = s.Sk;
      if (causal) {
        const int64_t r_last = i0 + nq - 1;
        const int64_t max_pos = i0 / s.Sq == r_last / s.Sq ? r_last % s.Sq : s.Sq - 1;
        k_end = std::min(s.Sk, max_pos + offset + 1);
      }
      for (int64_t j0 = 0; j0 < k_end; j0 += kBlockK) {
        const int64_t nk = std::min(kBlockK, k_end - j0);
        if (nk < kBlockK) std::fill(kt.begin(), kt.end(), 0.f);
        for (int64_t j = 0; j < nk; ++j)
          for (int64_t d = 0; d < D; ++d) {
            kt[d * kBlockK + j] = static_cast<float>(kb[(j0 + j) * D + d]);  // transposed: rows of s vectorize
            if constexpr (!std::is_same_v<T, float>) vf[j * D + d] = static_cast<float>(vb[(j0 + j) * D + d]);
          }
        block_scores(qf.data(), kt.data(), p.data(), nq, D);
        // Online softmax per row: rescale what was accumulated to the new max, turn scores
        // into probabilities (0 for hidden keys), then accumulate P V for the whole block.
        for (int64_t r = 0; r < nq; ++r) {
          float* pr = &p[r * kBlockK];
          const int64_t visible = causal ? std::min(nk, (i0 + r) % s.Sq + offset - j0 + 1) : nk;
          if (visible <= 0) {
            std::fill(pr, pr + nk, 0.f);
            continue;
          }
          float block_max = pr[0];
          for (int64_t j = 1; j < visible; ++j) block_max = std::max(block_max, pr[j]);
          const float new_max = std::max(row_max[r], block_max);
          const float rescale = std::exp(row_max[r] - new_max);  // 0 on the first block (max was -inf)
          const float sum = exp_shifted(pr, visible, new_max);
          std::fill(pr + visible, pr + nk, 0.f);
          float* a = &acc[r * D];
          for (int64_t d = 0; d < D; ++d) a[d] *= rescale;
          row_max[r] = new_max;
          row_sum[r] = row_sum[r] * rescale + sum;
        }
        const float* vblock = vf.data();
        if constexpr (std::is_same_v<T, float>) vblock = vb + j0 * D;  // already fp32 [nk][D]: no copy
        block_accumulate(p.data(), vblock, acc.data(), nq, nk, D);
      }
      T* ob = out + (head * R + i0) * D;
      for (int64_t r = 0; r < nq; ++r) {
        const float inv = 1.f / row_sum[r];
        for (int64_t d = 0; d < D; ++d) ob[r * D + d] = static_cast<T>(acc[r * D + d] * inv);
        lse[head * R + i0 + r] = row_max[r] + std::log(row_sum[r]);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, bool causal, double scale) {
  const auto s = check_attention_inputs("fused_attention_fwd", q, k, v, causal);
  TORCH_CHECK(q.device().is_cpu(), "fused_attention_fwd_cpu: expected CPU tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kFloat || q.scalar_type() == at::kBFloat16 || q.scalar_type() == at::kHalf,
              "fused_attention_fwd on CPU: expected float32, bfloat16 or float16, got ", q.scalar_type());
  auto qc = q.contiguous(), kc = k.contiguous(), vc = v.contiguous();
  auto out = at::empty(q.sizes(), qc.options());
  auto lse = at::empty({s.B, s.H, s.Sq}, qc.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attention_fwd_cpu", [&] {
    attention_fwd_blocked<scalar_t>(qc.const_data_ptr<scalar_t>(), kc.const_data_ptr<scalar_t>(),
                                    vc.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(),
                                    lse.mutable_data_ptr<float>(), s, causal, static_cast<float>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention_bwd_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& out,
                                                                       const at::Tensor& lse, bool causal,
                                                                       double scale) {
  const auto s = check_attention_inputs("fused_attention_bwd", q, k, v, causal);
  check_attention_grads("fused_attention_bwd", q, grad_out, out, lse);
  TORCH_CHECK(q.device().is_cpu(), "fused_attention_bwd_cpu: expected CPU tensors, got ", q.device());
  const int64_t group = s.H / s.Hkv;
  auto qf = q.to(at::kFloat);                                         // [B, H, Sq, D]
  auto kf = k.to(at::kFloat).repeat_interleave(group, 1);             // [B, H, Sk, D]
  auto vf = v.to(at::kFloat).repeat_interleave(group, 1);             // [B, H, Sk, D]
  auto dout = grad_out.to(at::kFloat);                                // [B, H, Sq, D]
  auto scores = at::matmul(qf, kf.transpose(-2, -1)).mul_(scale);     // [B, H, Sq, Sk]
  if (causal) {
    auto hidden = at::ones({s.Sq, s.Sk}, q.options().dtype(at::kBool)).triu(s.Sk - s.Sq + 1);
    scores.masked_fill_(hidden, -std::numeric_limits<float>::infinity());
  }
  auto probs = scores.sub_(lse.unsqueeze(-1)).exp_();                 // [B, H, Sq, Sk]
  auto dv = at::matmul(probs.transpose(-2, -1), dout);                // [B, H, Sk, D]
  auto dprobs = at::matmul(dout, vf.transpose(-2, -1));               // [B, H, Sq, Sk]
  auto delta = (dout * out.to(at::kFloat)).sum(-1, true);             // [B, H, Sq, 1]
  auto dscores = probs.mul_(dprobs.sub_(delta));                      // [B, H, Sq, Sk]
  auto dq = at::matmul(dscores, kf).mul_(scale);                      // [B, H, Sq, D]
  auto dk = at::matmul(dscores.transpose(-2, -1), qf).mul_(scale);    // [B, H, Sk, D]
  if (group > 1) {  // a kv head's gradient sums over the query heads that read it
    dk = dk.view({s.B, s.Hkv, group, s.Sk, s.D}).sum(2);
    dv = dv.view({s.B, s.Hkv, group, s.Sk, s.D}).sum(2);
  }
  return {dq.to(q.scalar_type()), dk.to(k.scalar_type()), dv.to(v.scalar_type())};
}

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CPU, m) {
  m.impl("fused_attention_fwd", &fused_attention_fwd_cpu);
  m.impl("fused_attention_bwd", &fused_attention_bwd_cpu);
}

}  // namespace msmartcompute
