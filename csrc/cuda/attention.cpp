// CUDA registrations of the attention ops: checks, allocation (outputs, log-sum-exp, the split-KV
// and delta scratch) and the current stream here; the kernels are in kernels/attention.cu.
// q/k/v are read through their strides (a KV-cache slice is a view, never copied) as long as the
// head dim is contiguous and rows start 16-byte aligned; anything else is copied once.
// The backward takes head dims 32/64/128; for 256 the Python autograd runs the Triton backward.
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

void check_cuda_attention(const char* op, const at::Tensor& q, int64_t D, int64_t B, int64_t Hkv,
                          bool backward) {
  TORCH_CHECK(q.is_cuda(), op, " on CUDA: expected CUDA tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
              " on CUDA: expected float16 or bfloat16, got ", q.scalar_type());
  if (backward) {
    TORCH_CHECK(D == 32 || D == 64 || D == 128, op, " on CUDA: head dim ", D, " is not supported (q ", q.sizes(),
                "); supported: 32, 64, 128 (use the Triton backward for 256)");
  } else {
    TORCH_CHECK(D == 32 || D == 64 || D == 128 || D == 256, op, " on CUDA: head dim ", D,
                " is not supported (q ", q.sizes(), "); supported: 32, 64, 128, 256");
  }
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

std::tuple<at::Tensor, at::Tensor> fused_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, bool causal, double scale) {
  const auto s = check_attention_inputs("fused_attention_fwd", q, k, v, causal);
  check_cuda_attention("fused_attention_fwd", q, s.D, s.B, s.Hkv, false);
  const c10::cuda::CUDAGuard guard(q.device());
  auto qr = readable(q), kr = readable(k), vr = readable(v);
  auto out = at::empty(q.sizes(), q.options().memory_format(at::MemoryFormat::Contiguous));
  auto lse = at::empty({s.B, s.H, s.Sq}, q.options().dtype(at::kFloat));
  const auto p = dense_params(qr, kr, vr, out, lse, s, causal, scale);
  const size_t scratch = cuda::attention_fwd_workspace_bytes(p);
  at::Tensor workspace;
  if (scratch > 0) workspace = at::empty({static_cast<int64_t>(scratch)}, q.options().dtype(at::kByte));
  check_launch(cuda::launch_attention_fwd(p, scratch > 0 ? workspace.mutable_data_ptr() : nullptr,
                                          float_type(q.scalar_type(), "fused_attention"),
                                          c10::cuda::getCurrentCUDAStream()),
               "fused_attention_fwd kernel");
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> fused_attention_bwd_cuda(const at::Tensor& grad_out,
                                                                        const at::Tensor& q, const at::Tensor& k,
                                                                        const at::Tensor& v, const at::Tensor& out,
                                                                        const at::Tensor& lse, bool causal,
                                                                        double scale) {
  const auto s = check_attention_inputs("fused_attention_bwd", q, k, v, causal);
  check_attention_grads("fused_attention_bwd", q, grad_out, out, lse);
  check_cuda_attention("fused_attention_bwd", q, s.D, s.B, s.Hkv, true);
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

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CUDA, m) {
  m.impl("fused_attention_fwd", &fused_attention_fwd_cuda);
  m.impl("fused_attention_bwd", &fused_attention_bwd_cuda);
}

}  // namespace msmartcompute
