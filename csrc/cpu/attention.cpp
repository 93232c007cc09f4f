// CPU fused attention. Forward: the blocked online-softmax tile of attention_tile.h, parallel over
// (batch, kv head, block of the group's packed query rows), reading q/k/v in place through their
// strides (a KV-cache slice is a view, never copied). Backward: the plain math in fp32,
// recomputing the probabilities from the saved log-sum-exp.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <limits>

#include "../attention.h"
#include "attention_tile.h"

namespace msmartcompute {
namespace {

using cpu::kBlockQ;

// q [B, H, Sq, D], k and v [B, Hkv, Sk, D] with any strides but a unit one on D; out [B, H, Sq, D]
// and lse [B, H, Sq] contiguous. Grouped-query packing, as in kernels/attention.cu: per kv head, the
// rows of its G query heads form one [R = G * Sq, D] matrix (row r is query r % Sq of head r / Sq)
// that reads the same K/V, so one task converts a K/V block once for the whole group.
template <typename T>
void attention_fwd_strided(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, at::Tensor& out,
                           at::Tensor& lse, const AttentionShape& s, bool causal, float scale) {
  const int64_t D = s.D, G = s.H / s.Hkv, R = G * s.Sq, q_blocks = (R + kBlockQ - 1) / kBlockQ;
  const int64_t offset = s.Sk - s.Sq;  // causal: query position i sees keys j <= i + offset
  const T* qp = q.const_data_ptr<T>();
  const T* kp = k.const_data_ptr<T>();
  const T* vp = v.const_data_ptr<T>();
  T* op = out.mutable_data_ptr<T>();
  float* lp = lse.mutable_data_ptr<float>();
  const auto qs = q.strides(), ks = k.strides(), vs = v.strides();
  at::parallel_for(0, s.B * s.Hkv * q_blocks, 1, [&](int64_t begin, int64_t end) {
    cpu::TileBuffers buf(D);
    cpu::TileState state(D);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t head = task / q_blocks, i0 = (task % q_blocks) * kBlockQ;  // head: b * Hkv + kv head
      const int64_t b = head / s.Hkv, hk = head % s.Hkv, nq = std::min(kBlockQ, R - i0);
      // Packed row r of this tile is query (r + i0) % Sq of head hk * G + (r + i0) / Sq.
      auto q_row = [&](int64_t r) {
        const int64_t row = i0 + r;
        return qp + b * qs[0] + (hk * G + row / s.Sq) * qs[1] + (row % s.Sq) * qs[2];
      };
      auto k_row = [&](int64_t j) { return kp + b * ks[0] + hk * ks[1] + j * ks[2]; };
      auto v_row = [&](int64_t j) { return vp + b * vs[0] + hk * vs[1] + j * vs[2]; };
      auto key_end = [&](int64_t r) { return causal ? (i0 + r) % s.Sq + offset + 1 : s.Sk; };
      cpu::load_queries<T>(buf, nq, D, scale, q_row);
      state.reset(nq, D);
      cpu::attend_keys<T>(buf, state, nq, D, 0, s.Sk, k_row, v_row, key_end);
      // out and lse are contiguous [B, H, Sq, *]: the packed rows of a kv head are consecutive.
      cpu::finish_rows<T>(state, nq, D, [&](int64_t r) { return op + (head * R + i0 + r) * D; },
                          [&](int64_t r, float value) { lp[head * R + i0 + r] = value; });
    }
  });
}

std::tuple<at::Tensor, at::Tensor> fused_attention_fwd_cpu(const at::Tensor& q, const at::Tensor& k,
                                                           const at::Tensor& v, bool causal, double scale) {
  const auto s = check_attention_inputs("fused_attention_fwd", q, k, v, causal);
  cpu::check_cpu_float("fused_attention_fwd", q);
  auto qc = cpu::last_dim_contiguous(q), kc = cpu::last_dim_contiguous(k), vc = cpu::last_dim_contiguous(v);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({s.B, s.H, s.Sq}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "fused_attention_fwd_cpu", [&] {
    attention_fwd_strided<scalar_t>(qc, kc, vc, out, lse, s, causal, static_cast<float>(scale));
  });
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention_bwd_cpu(const at::Tensor& grad_out,
                                                                       const at::Tensor& q, const at::Tensor& k,
                                                                       const at::Tensor& v, const at::Tensor& out,
                                                                       const at::Tensor& lse, bool causal,
                                                                       double scale) {
  check_attention_inputs("fused_attention_bwd", q, k, v, causal);
  check_attention_grads("fused_attention_bwd", q, grad_out, out, lse);
  cpu::check_cpu_float("fused_attention_bwd", q);
  return cpu::attention_bwd_math(grad_out, q, k, v, out, lse, causal, scale);
}

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CPU, m) {
  m.impl("fused_attention_fwd", &fused_attention_fwd_cpu);
  m.impl("fused_attention_bwd", &fused_attention_bwd_cpu);
}

}  // namespace msmartcompute
