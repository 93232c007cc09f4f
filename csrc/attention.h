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

// Shapes of varlen_attention_fwd/bwd: q [total_q, H, D], k and v [total_k, Hkv, D], B sequences.
struct VarlenShape {
  int64_t B, total_q, total_k, H, Hkv, D;
};

// Checks what can be checked without reading cu_seqlens (a device tensor): ranks, dtypes, devices,
// H % Hkv == 0, int32 cu_seqlens of one length B + 1 >= 2. Implementations check the offsets.
inline VarlenShape check_varlen_inputs(const char* op, const at::Tensor& q, const at::Tensor& k,
                                       const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                       const at::Tensor& cu_seqlens_k) {
  TORCH_CHECK(q.dim() == 3 && k.dim() == 3 && v.dim() == 3, op,
              ": expected q [total_q, H, D], k and v [total_k, Hkv, D], got q ", q.sizes(), ", k ", k.sizes(),
              ", v ", v.sizes());
  TORCH_CHECK(q.scalar_type() == k.scalar_type() && q.scalar_type() == v.scalar_type(), op,
              ": q, k and v must share a dtype, got ", q.scalar_type(), ", ", k.scalar_type(), ", ",
              v.scalar_type());
  TORCH_CHECK(k.sizes() == v.sizes(), op, ": k and v must have one shape, got k ", k.sizes(), " and v ",
              v.sizes());
  TORCH_CHECK(q.size(2) == k.size(2), op, ": q ", q.sizes(), " and k ", k.sizes(), " must agree on head dim");
  TORCH_CHECK(k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": q has ", q.size(1),
              " heads, which is not a multiple of the ", k.size(1), " kv heads");
  for (const auto* cu : {&cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK(cu->scalar_type() == at::kInt && cu->dim() == 1 && cu->size(0) >= 2, op,
                ": cu_seqlens must be int32 [B + 1] with B >= 1, got ", cu->scalar_type(), " ", cu->sizes());
  }
  TORCH_CHECK(cu_seqlens_q.size(0) == cu_seqlens_k.size(0), op, ": cu_seqlens_q ", cu_seqlens_q.sizes(),
              " and cu_seqlens_k ", cu_seqlens_k.sizes(), " must describe the same number of sequences");
  for (const auto* t : {&k, &v, &cu_seqlens_q, &cu_seqlens_k}) {
    TORCH_CHECK(t->device() == q.device(), op, ": every tensor must be on ", q.device(), ", got ", t->device());
  }
  return {cu_seqlens_q.size(0) - 1, q.size(0), k.size(0), q.size(1), k.size(1), q.size(2)};
}

// Shapes of paged_attention: q [B, Sq, H, D], caches [num_blocks, block_size, Hkv, D].
struct PagedShape {
  int64_t B, Sq, H, Hkv, D, num_blocks, block_size, max_blocks;
};

inline PagedShape check_paged_inputs(const char* op, const at::Tensor& q, const at::Tensor& k_cache,
                                     const at::Tensor& v_cache, const at::Tensor& block_table,
                                     const at::Tensor& seq_lens) {
  TORCH_CHECK(q.dim() == 4 && k_cache.dim() == 4, op,
              ": expected q [B, Sq, H, D] and caches [num_blocks, block_size, Hkv, D], got q ", q.sizes(),
              ", k_cache ", k_cache.sizes());
  TORCH_CHECK(k_cache.sizes() == v_cache.sizes(), op, ": k_cache ", k_cache.sizes(), " and v_cache ",
              v_cache.sizes(), " must have one shape");
  TORCH_CHECK(q.scalar_type() == k_cache.scalar_type() && q.scalar_type() == v_cache.scalar_type(), op,
              ": q and the caches must share a dtype, got ", q.scalar_type(), ", ", k_cache.scalar_type(), ", ",
              v_cache.scalar_type());
  const PagedShape s{q.size(0), q.size(1), q.size(2), k_cache.size(2), q.size(3),
                     k_cache.size(0), k_cache.size(1), block_table.dim() == 2 ? block_table.size(1) : 0};
  TORCH_CHECK(k_cache.size(3) == s.D, op, ": q ", q.sizes(), " and k_cache ", k_cache.sizes(),
              " must agree on head dim");
  TORCH_CHECK(s.Hkv > 0 && s.H % s.Hkv == 0, op, ": q has ", s.H, " heads, which is not a multiple of the ",
              s.Hkv, " kv heads");
  TORCH_CHECK(s.block_size > 0, op, ": block_size must be >= 1, got k_cache ", k_cache.sizes());
  TORCH_CHECK(block_table.scalar_type() == at::kInt && block_table.dim() == 2 && block_table.size(0) == s.B, op,
              ": block_table must be int32 [B, max_blocks] with B = ", s.B, ", got ", block_table.scalar_type(),
              " ", block_table.sizes());
  TORCH_CHECK(seq_lens.scalar_type() == at::kInt && seq_lens.dim() == 1 && seq_lens.size(0) == s.B, op,
              ": seq_lens must be int32 [B] with B = ", s.B, ", got ", seq_lens.scalar_type(), " ",
              seq_lens.sizes());
  for (const auto* t : {&k_cache, &v_cache, &block_table, &seq_lens}) {
    TORCH_CHECK(t->device() == q.device(), op, ": every tensor must be on ", q.device(), ", got ", t->device());
  }
  return s;
}

inline void check_cache_write(const char* op, const at::Tensor& k, const at::Tensor& v, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& slot_mapping) {
  TORCH_CHECK(k.dim() == 3 && k.sizes() == v.sizes(), op, ": expected k and v [N, Hkv, D] of one shape, got k ",
              k.sizes(), ", v ", v.sizes());
  TORCH_CHECK(k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes(), op,
              ": expected caches [num_blocks, block_size, Hkv, D] of one shape, got ", k_cache.sizes(), " and ",
              v_cache.sizes());
  TORCH_CHECK(k.size(1) == k_cache.size(2) && k.size(2) == k_cache.size(3), op, ": k ", k.sizes(),
              " does not fit cache rows of ", k_cache.sizes().slice(2));
  TORCH_CHECK(k.scalar_type() == k_cache.scalar_type() && v.scalar_type() == v_cache.scalar_type() &&
                  k.scalar_type() == v.scalar_type(),
              op, ": k, v and the caches must share a dtype, got ", k.scalar_type(), ", ", v.scalar_type(), ", ",
              k_cache.scalar_type(), ", ", v_cache.scalar_type());
  TORCH_CHECK(slot_mapping.scalar_type() == at::kLong && slot_mapping.dim() == 1 &&
                  slot_mapping.size(0) == k.size(0),
              op, ": slot_mapping must be int64 [N] with N = ", k.size(0), ", got ", slot_mapping.scalar_type(), " ",
              slot_mapping.sizes());
  for (const auto* t : {&v, &k_cache, &v_cache, &slot_mapping}) {
    TORCH_CHECK(t->device() == k.device(), op, ": every tensor must be on ", k.device(), ", got ", t->device());
  }
}

}  // namespace msmartcompute
