// Shape checks shared by every device implementation of fused_attention_fwd/bwd.
#pragma once
#include <ATen/ATen.h>

namespace msmartcompute {

struct AttentionShape {
  int64_t B, H, Hkv, Sq, Sk, D;
};

// Checks q [B, H, Sq, D], k and v [B, Hkv, Sk, D]: one dtype, one device, H % Hkv == 0, Sk >= 1,
// and with causal Sq <= Sk (a longer query would leave rows that see no key).
inline AttentionShape check_attention_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                             const at::Tensor& v, bool causal) {
  TORCH_CHECK(q.dim() == 4 && k.dim() == 4 && v.dim() == 4, op,
              ": expected q [B, H, Sq, D], k and v [B, Hkv, Sk, D], got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(q.device() == k.device() && q.device() == v.device(), op,
              ": q, k and v must be on one device, got ", q.device(), ", ", k.device(), ", ", v.device());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape, got k ", k.sizes(), " and v ",
              v.sizes());
  const AttentionShape s{q.size(0), q.size(1), k.size(1), q.size(2), k.size(2), q.size(3)};
  TORCH_CHECK(k.size(0) == s.B && k.size(3) == s.D, op, ": q ", q.sizes(), " and k ", k.sizes(),
              " must agree on batch (dim 0) and head dim (dim 3)");
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, op, ": q has ", s.H, " heads, which is not a multiple of the ",
              s.Hkv, " kv heads (q ", q.sizes(), ", k ", k.sizes(), ")");
  TORCH_CHECK(s.Sk > 0, op, ": k and v need at least one key, got k ", k.sizes());
  TORCH_CHECK(!causal || s.Sq <= s.Sk, op, ": causal needs Sq <= Sk (queries align to the last keys), got q ",
              q.sizes(), " and k ", k.sizes());
  return s;
}

inline void check_attention_grads(const char* op, const at::Tensor& q, const at::Tensor& grad_out,
                                  const at::Tensor& out, const at::Tensor& lse) {
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes(), op, ": grad_out ", grad_out.sizes(),
              " and out ", out.sizes(), " must have q's shape ", q.sizes());
  TORCH_CHECK(grad_out.scalar_type() == q.scalar_type() && out.scalar_type() == q.scalar_type(), op,
              ": grad_out and out must have q's dtype ", q.scalar_type());
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.sizes() == q.sizes().slice(0, 3), op,
              ": lse must be float32 [B, H, Sq] = ", q.sizes().slice(0, 3), ", got ", lse.scalar_type(), " ",
              lse.sizes());
  TORCH_CHECK(grad_out.device() == q.device() && out.device() == q.device() && lse.device() == q.device(), op,
              ": every tensor must be on ", q.device());
}

}  // namespace msmartcompute
