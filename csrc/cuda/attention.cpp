// CUDA registrations of the attention ops (fused, varlen, paged, and the paged-cache write):
// checks, allocation (outputs, log-sum-exp, the split-KV and delta scratch) and the current stream
// here; the kernels are in kernels/attention.cu (one kernel for dense, varlen and paged K/V) and
// kernels/kv_cache.cu.
// q/k/v are read through their strides (a KV-cache slice is a view, never copied) as long as the
// head dim is contiguous and rows start 16-byte aligned; anything else is copied once.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"
#include "../attention.h"

namespace msmartcompute {
namespace {

// The tensor itself when the kernels can read it through its strides (last dim contiguous, every
// row 16-byte aligned: the kernels copy rows in 16-byte chunks); a contiguous aligned copy otherwise.
at::Tensor readable(const at::Tensor& t) {
  bool ok = t.stride(-1) == 1 && reinterpret_cast<uintptr_t>(t.const_data_ptr()) % 16 == 0;
  for (int64_t d = 0; d + 1 < t.dim(); ++d) ok = ok && (t.stride(d) % 8 == 0 || t.size(d) == 1);
  if (ok) return t;
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

// [B, H, S, D] (or [B, H, S] for lse) as batch / head / row strides.
cuda::StridedRows bhs_rows(const at::Tensor& t) {
  return {const_cast<void*>(t.const_data_ptr()), t.stride(0), t.stride(1), t.stride(2)};
}

void check_cuda_attention(const char* op, const at::Tensor& q, int64_t D, int64_t B, int64_t Hkv) {
  TORCH_CHECK(q.is_cuda(), op, " on CUDA: expected CUDA tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              " on CUDA: expected float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(D == 32 || D == 64 || D == 128 || D == 256, op, " on CUDA: head dim ", D,
              " is not supported (q ", q.sizes(), "); supported: 32, 64, 128, 256");
  TORCH_CHECK(B * Hkv <= 65535, op, " on CUDA: batch * kv heads = ", B * Hkv, " exceeds the 65535 grid limit");
}

// Dense [B, H, Sq, D] / [B, Hkv, Sk, D] operands (already `readable`) into the launcher's params.
cuda::AttentionParams dense_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                   const at::Tensor& out, const at::Tensor& lse, const AttentionShape& s,
                                   bool causal, double scale) {
  cuda::AttentionParams p;
  p.q = bhs_rows(q);
  p.k = bhs_rows(k);
  p.v = bhs_rows(v);
  p.out = bhs_rows(out);
  p.lse = bhs_rows(lse);
  p.B = s.B;
  p.H = s.H;
  p.Hkv = s.Hkv;
  p.D = s.D;
  p.max_seqlen_q = s.Sq;
  p.max_seqlen_k = s.Sk;
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  return p;
}

// Launches the forward kernel on p, with the split-KV workspace it asks for (decode shapes).
void run_attention_fwd(const cuda::AttentionParams& p, const at::Tensor& q, const char* op) {
  const size_t scratch = cuda::attention_fwd_workspace_bytes(p);
  at::Tensor workspace;
  if (scratch > 0) workspace = at::empty({static_cast<int64_t>(scratch)}, q.options().dtype(at::kByte));
  check_launch(cuda::launch_attention_fwd(p, scratch > 0 ? workspace.mutable_data_ptr() : nullptr,
                                          float_type(q.scalar_type(), op), c10::cuda::getCurrentCUDAStream()),
               op);
}

std::tuple<at::Tensor, at::Tensor> fused_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, bool causal, double scale) {
  const auto s = check_attention_inputs("fused_attention_fwd", q, k, v, causal);
  check_cuda_attention("fused_attention_fwd", q, s.D, s.B, s.Hkv);
  const c10::cuda::CUDAGuard guard(q.device());
  auto qr = readable(q), kr = readable(k), vr = readable(v);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({s.B, s.H, s.Sq}, q.options().dtype(at::kFloat));
  run_attention_fwd(dense_params(qr, kr, vr, out, lse, s, causal, scale), q, "fused_attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention_bwd_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v, const at::Tensor& out,
                                                                        const at::Tensor& lse, bool causal,
                                                                        double scale) {
  const auto s = check_attention_inputs("fused_attention_bwd", q, k, v, causal);
  check_attention_grads("fused_attention_bwd", q, grad_out, out, lse);
  check_cuda_attention("fused_attention_bwd", q, s.D, s.B, s.Hkv);
  const c10::cuda::CUDAGuard guard(q.device());
  auto qr = readable(q), kr = readable(k), vr = readable(v), outr = readable(out), dout = readable(grad_out);
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  auto dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  auto delta = at::empty({s.B, s.H, s.Sq}, q.options().dtype(at::kFloat));
  const auto p = dense_params(qr, kr, vr, outr, lse, s, causal, scale);
  cuda::AttentionGradParams g;
  g.dout = bhs_rows(dout);
  g.dq = bhs_rows(dq);
  g.dk = bhs_rows(dk);
  g.dv = bhs_rows(dv);
  g.delta = bhs_rows(delta);
  check_launch(cuda::launch_attention_bwd(p, g, float_type(q.scalar_type(), "fused_attention"),
                                          c10::cuda::getCurrentCUDAStream()),
               "fused_attention_bwd kernels");
  return {dq, dk, dv};
}

// [tokens, heads, D] (varlen q/k/v/out) as batch / head / row strides: batch 0, rows from cu_seqlens.
cuda::StridedRows token_rows(const at::Tensor& t) {
  return {const_cast<void*>(t.const_data_ptr()), 0, t.stride(1), t.stride(0)};
}

cuda::AttentionParams varlen_params(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                                    const at::Tensor& out, const at::Tensor& lse, const at::Tensor& cu_q,
                                    const at::Tensor& cu_k, const VarlenShape& s, int64_t max_seqlen_q,
                                    int64_t max_seqlen_k, bool causal, double scale) {
  cuda::AttentionParams p;
  p.q = token_rows(q);
  p.k = token_rows(k);
  p.v = token_rows(v);
  p.out = token_rows(out);
  p.lse = {const_cast<void*>(lse.const_data_ptr()), 0, lse.stride(0), lse.stride(1)};  // [H, total_q]
  p.B = s.B;
  p.H = s.H;
  p.Hkv = s.Hkv;
  p.D = s.D;
  p.max_seqlen_q = max_seqlen_q;
  p.max_seqlen_k = max_seqlen_k;
  p.cu_seqlens_q = cu_q.const_data_ptr<int32_t>();
  p.cu_seqlens_k = cu_k.const_data_ptr<int32_t>();
  p.causal = causal;
  p.scale = static_cast<float>(scale);
  return p;
}

void check_max_seqlens(const char* op, int64_t max_seqlen_q, int64_t max_seqlen_k) {
  TORCH_CHECK(max_seqlen_q >= 0 && max_seqlen_k >= 0 && max_seqlen_q < (1 << 30) && max_seqlen_k < (1 << 30), op,
              ": max_seqlen_q and max_seqlen_k must be in [0, 2^30), got ", max_seqlen_q, " and ", max_seqlen_k);
}

std::tuple<at::Tensor, at::Tensor> varlen_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                             const at::Tensor& v, const at::Tensor& cu_seqlens_q,
                                                             const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
                                                             int64_t max_seqlen_k, bool causal, double scale) {
  const auto s = check_varlen_inputs("varlen_attention_fwd", q, k, v, cu_seqlens_q, cu_seqlens_k);
  check_cuda_attention("varlen_attention_fwd", q, s.D, s.B, s.Hkv);
  check_max_seqlens("varlen_attention_fwd", max_seqlen_q, max_seqlen_k);
  const c10::cuda::CUDAGuard guard(q.device());
  auto qr = readable(q), kr = readable(k), vr = readable(v);
  auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  auto out = at::empty({s.total_q, s.H, s.D}, q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({s.H, s.total_q}, q.options().dtype(at::kFloat));
  run_attention_fwd(varlen_params(qr, kr, vr, out, lse, cu_q, cu_k, s, max_seqlen_q, max_seqlen_k, causal, scale), q,
                    "varlen_attention_fwd");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> varlen_attention_bwd_cuda(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& cu_seqlens_q, const at::Tensor& cu_seqlens_k, int64_t max_seqlen_q,
    int64_t max_seqlen_k, bool causal, double scale) {
  const auto s = check_varlen_inputs("varlen_attention_bwd", q, k, v, cu_seqlens_q, cu_seqlens_k);
  check_cuda_attention("varlen_attention_bwd", q, s.D, s.B, s.Hkv);
  check_max_seqlens("varlen_attention_bwd", max_seqlen_q, max_seqlen_k);
  TORCH_CHECK(grad_out.sizes() == q.sizes() && out.sizes() == q.sizes() && grad_out.scalar_type() == q.scalar_type() &&
                  out.scalar_type() == q.scalar_type(),
              "varlen_attention_bwd: grad_out ", grad_out.sizes(), " and out ", out.sizes(), " must be like q ",
              q.sizes(), " (", q.scalar_type(), ")");
  TORCH_CHECK(lse.scalar_type() == at::kFloat && lse.dim() == 2 && lse.size(0) == s.H && lse.size(1) == s.total_q,
              "varlen_attention_bwd: lse must be float32 [H, total_q] = [", s.H, ", ", s.total_q, "], got ",
              lse.scalar_type(), " ", lse.sizes());
  for (const auto* t : {&grad_out, &out, &lse})
    TORCH_CHECK(t->device() == q.device(), "varlen_attention_bwd: every tensor must be on ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  auto qr = readable(q), kr = readable(k), vr = readable(v), outr = readable(out), dout = readable(grad_out);
  auto cu_q = cu_seqlens_q.contiguous(), cu_k = cu_seqlens_k.contiguous();
  auto dq = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto dk = at::empty(k.sizes(), k.options().memory_format(at::MemoryFormat::Contiguous));
  auto dv = at::empty(v.sizes(), v.options().memory_format(at::MemoryFormat::Contiguous));
  auto delta = at::empty({s.H, s.total_q}, q.options().dtype(at::kFloat));
  const auto p = varlen_params(qr, kr, vr, outr, lse, cu_q, cu_k, s, max_seqlen_q, max_seqlen_k, causal, scale);
  cuda::AttentionGradParams g;
  g.dout = token_rows(dout);
  g.dq = token_rows(dq);
  g.dk = token_rows(dk);
  g.dv = token_rows(dv);
  g.delta = {delta.mutable_data_ptr(), 0, delta.stride(0), delta.stride(1)};
  check_launch(cuda::launch_attention_bwd(p, g, float_type(q.scalar_type(), "varlen_attention"),
                                          c10::cuda::getCurrentCUDAStream()),
               "varlen_attention_bwd kernels");
  return {dq, dk, dv};
}

at::Tensor paged_attention_cuda(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  const auto s = check_paged_inputs("paged_attention", q, k_cache, v_cache, block_table, seq_lens);
  check_cuda_attention("paged_attention", q, s.D, s.B, s.Hkv);
  TORCH_CHECK(s.max_blocks * s.block_size < (int64_t(1) << 30), "paged_attention: block_table ",
              block_table.sizes(), " x block_size ", s.block_size, " addresses more than 2^30 keys");
  const c10::cuda::CUDAGuard guard(q.device());
  auto qr = readable(q), kc = readable(k_cache), vc = readable(v_cache);
  auto table = block_table.stride(1) == 1 ? block_table : block_table.contiguous();
  auto lens = seq_lens.contiguous();
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({s.B, s.H, s.Sq}, q.options().dtype(at::kFloat));  // scratch: the op returns out only
  cuda::AttentionParams p;
  // q / out [B, Sq, H, D]: batch, head, row strides; caches [blocks, block_size, Hkv, D]: "batch" is the block.
  p.q = {const_cast<void*>(qr.const_data_ptr()), qr.stride(0), qr.stride(2), qr.stride(1)};
  p.out = {out.mutable_data_ptr(), out.stride(0), out.stride(2), out.stride(1)};
  p.k = {const_cast<void*>(kc.const_data_ptr()), kc.stride(0), kc.stride(2), kc.stride(1)};
  p.v = {const_cast<void*>(vc.const_data_ptr()), vc.stride(0), vc.stride(2), vc.stride(1)};
  p.lse = bhs_rows(lse);
  p.B = s.B;
  p.H = s.H;
  p.Hkv = s.Hkv;
  p.D = s.D;
  p.max_seqlen_q = s.Sq;
  p.max_seqlen_k = s.max_blocks * s.block_size;
  p.seq_lens_k = lens.const_data_ptr<int32_t>();
  p.block_table = table.const_data_ptr<int32_t>();
  p.block_table_stride = table.stride(0);
  p.block_size = s.block_size;
  p.causal = true;
  p.scale = static_cast<float>(scale);
  run_attention_fwd(p, q, "paged_attention");
  return out;
}

void reshape_and_cache_cuda(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                            const at::Tensor& slot_mapping) {
  check_cache_write("reshape_and_cache", k, v, k_cache, v_cache, slot_mapping);
  TORCH_CHECK(k.is_cuda(), "reshape_and_cache on CUDA: expected CUDA tensors, got ", k.device());
  TORCH_CHECK(k.element_size() == 2 || k.element_size() == 4, "reshape_and_cache on CUDA: expected a 2- or 4-byte "
              "dtype, got ", k.scalar_type());
  const c10::cuda::CUDAGuard guard(k.device());
  auto slots = slot_mapping.contiguous();
  cuda::KvCacheWrite w;
  w.k = k.const_data_ptr();
  w.v = v.const_data_ptr();
  w.k_cache = k_cache.mutable_data_ptr();
  w.v_cache = v_cache.mutable_data_ptr();
  w.slot_mapping = slots.const_data_ptr<int64_t>();
  for (int d = 0; d < 3; ++d) {
    w.k_stride[d] = k.stride(d);
    w.v_stride[d] = v.stride(d);
  }
  for (int d = 0; d < 4; ++d) {
    w.k_cache_stride[d] = k_cache.stride(d);
    w.v_cache_stride[d] = v_cache.stride(d);
  }
  w.N = k.size(0);
  w.Hkv = k.size(1);
  w.D = k.size(2);
  w.block_size = k_cache.size(1);
  w.capacity = k_cache.size(0) * k_cache.size(1);
  check_launch(cuda::launch_write_kv_cache(w, static_cast<int>(k.element_size()), c10::cuda::getCurrentCUDAStream()),
               "reshape_and_cache kernel");
}

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CUDA, m) {
  m.impl("fused_attention_fwd", &fused_attention_fwd_cuda);
  m.impl("fused_attention_bwd", &fused_attention_bwd_cuda);
  m.impl("varlen_attention_fwd", &varlen_attention_fwd_cuda);
  m.impl("varlen_attention_bwd", &varlen_attention_bwd_cuda);
  m.impl("paged_attention", &paged_attention_cuda);
  m.impl("reshape_and_cache", &reshape_and_cache_cuda);
}

}  // namespace msmartcompute
