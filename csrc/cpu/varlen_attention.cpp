// CPU variable-length attention over packed sequences. Forward: the tile of attention_tile.h,
// parallel over (sequence, kv head, block of the group's packed query rows), q/k/v read in place
// through their strides. Backward: the plain fp32 math per sequence.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../attention.h"
#include "attention_tile.h"

namespace msmartcompute {
namespace {

using cpu::kBlockQ;

// cu_seqlens as host int64 offsets, checked: 0 first, non-decreasing, `total` last, no length
// above max_seqlen.
std::vector<int64_t> offsets(const char* op, const at::Tensor& cu, int64_t total, int64_t max_seqlen,
                             const char* name) {
  auto host = cu.to(at::kCPU).contiguous();
  const int32_t* p = host.const_data_ptr<int32_t>();
  std::vector<int64_t> out(p, p + host.numel());
  TORCH_CHECK(out.front() == 0 && out.back() == total, op, ": ", name, " must start at 0 and end at ", total,
              " (the packed length), got ", out.front(), " ... ", out.back());
  for (size_t b = 1; b < out.size(); ++b) {
    const int64_t len = out[b] - out[b - 1];
    TORCH_CHECK(len >= 0 && len <= max_seqlen, op, ": sequence ", b - 1, " of ", name, " has length ", len,
                ", outside [0, max_seqlen = ", max_seqlen, "]");
  }
  return out;
}

template <typename T>
void varlen_fwd(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out, at::Tensor& lse,
                const std::vector<int64_t>& cu_q, const std::vector<int64_t>& cu_k, const VarlenShape& s,
                bool causal, float scale) {
  const int64_t D = s.D, H = s.H, G = s.H / s.Hkv;
  // Tasks of sequence b: Hkv x (blocks of its G * len_q packed rows), numbered from first_task[b].
  std::vector<int64_t> first_task(s.B + 1, 0);
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t blocks = (G * (cu_q[b + 1] - cu_q[b]) + kBlockQ - 1) / kBlockQ;
    first_task[b + 1] = first_task[b] + s.Hkv * blocks;
  }
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  at::parallel_for(0, first_task[s.B], 1, [&](int64_t begin, int64_t end) {
    cpu::TileBuffers buf(D);
    cpu::TileState state(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t b = std::upper_bound(first_task.begin(), first_task.end(), task) - first_task.begin() - 1;
      const int64_t q0 = cu_q[b], len_q = cu_q[b + 1] - q0, k0 = cu_k[b], len_k = cu_k[b + 1] - k0;
      const int64_t blocks = (G * len_q + kBlockQ - 1) / kBlockQ, local = task - first_task[b];
      const int64_t hk = local / blocks, i0 = (local % blocks) * kBlockQ, nq = std::min(kBlockQ, G * len_q - i0);
      // Packed row r is token q0 + (i0 + r) % len_q of query head hk * G + (i0 + r) / len_q.
      auto head_of = [&](int64_t r) { return hk * G + (i0 + r) / len_q; };
      auto pos_of = [&](int64_t r) { return (i0 + r) % len_q; };
      auto q_row = [&](int64_t r) { return qp + (q0 + pos_of(r)) * qs[0] + head_of(r) * qs[1]; };
      auto k_row = [&](int64_t j) { return kp + (k0 + j) * ks[0] + hk * ks[1]; };
      auto v_row = [&](int64_t j) { return vp + (k0 + j) * vs[0] + hk * vs[1]; };
      auto key_end = [&](int64_t r) { return causal ? pos_of(r) + len_k - len_q + 1 : len_k; };
      cpu::load_queries<T>(buf, nq, D, scale, q_row);
      state.reset(nq, D);
      cpu::attend_keys<T>(buf, state, nq, D, 0, len_k, k_row, v_row, key_end);
      cpu::finish_rows<T>(state, nq, D, [&](int64_t r) { return op + ((q0 + pos_of(r)) * H + head_of(r)) * D; },
                          [&](int64_t r, float value) { lp[head_of(r) * s.total_q + q0 + pos_of(r)] = value; });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                            const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                            int64_t max_seqlen_k, bool causal, double scale) {
  const char* op = "varlen_attention_fwd";
  const auto s = check_varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k);
  cpu::check_cpu_float(op, q);
  const auto cu_q = offsets(op, cu_seqlens_q, s.total_q, max_seqlen_q, "cu_seqlens_q");
  const auto cu_k = offsets(op, cu_seqlens_k, s.total_k, max_seqlen_k, "cu_seqlens_k");
  auto qc = cpu::last_dim_contiguous(q), kc = cpu::last_dim_contiguous(k), vc = cpu::last_dim_contiguous(v);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({s.H, s.total_q}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "varlen_attention_fwd_cpu", [&] {
    varlen_fwd<scalar_t>(qc, kc, vc, out, lse, cu_q, cu_k, s, causal, static_cast<float>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale) {
  const char* op = "varlen_attention_bwd";
  const auto s = check_varlen_inputs(op, q, k, v, cu_seqlens_q, cu_seqlens_k);
  cpu::check_cpu_float(op, q);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == s.H && lse.size(1) == s.total_q,
              op, ": lse must be float32 [H, total_q] = [", s.H, ", ", s.total_q, "], got ", lse.scalar_type(), " ",
              lse.sizes());
  const auto cu_q = offsets(op, cu_seqlens_q, s.total_q, max_seqlen_q, "cu_seqlens_q");
  const auto cu_k = offsets(op, cu_seqlens_k, s.total_k, max_seqlen_k, "cu_seqlens_k");
  auto dq = at::zeros(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dk = at::zeros(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  auto dv = at::zeros(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  for (int64_t b = 0; b < s.B; ++b) {
    const int64_t q0 = cu_q[b], q1 = cu_q[b + 1], k0 = cu_k[b], k1 = cu_k[b + 1];
    if (q1 == q0 || k1 == k0) continue;  // no query, or no key: every gradient of the sequence is 0
    auto heads_first = [](const at::Tensor& t, int64_t lo, int64_t hi) { return t.slice(0, lo, hi).transpose(0, 1); };
    auto [gq, gk, gv] = cpu::attention_bwd_math(heads_first(grad_out, q0, q1), heads_first(q, q0, q1),
                                                heads_first(k, k0, k1), heads_first(v, k0, k1),
                                                heads_first(out, q0, q1), lse.slice(1, q0, q1), causal, scale);
    heads_first(dq, q0, q1).copy_(gq);
    heads_first(dk, k0, k1).copy_(gk);
    heads_first(dv, k0, k1).copy_(gv);
  }
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CPU, m) {
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cpu);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cpu);
}

}  // namespace msmartcompute
