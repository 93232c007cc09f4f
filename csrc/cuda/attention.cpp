// CUDA registrations of fused_attention_fwd / fused_attention_bwd: checks, allocation (outputs,
// log-sum-exp, the split-KV and delta scratch) and the current stream here; the kernels are in
// kernels/attention.cu. The backward takes head dims 32/64/128; for 256 the Python autograd
// runs the Triton backward instead.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"
#include "../attention.h"

namespace msmartcompute {
namespace {

// Contiguous and 16-byte aligned: the kernels load rows in 16-byte chunks.
at::Tensor prepared(const at::Tensor& t) {
  auto c = t.contiguous();
  return reinterpret_cast<uintptr_t>(c.const_data_ptr()) % 16 == 0 ? c : c.clone();
}

std::tuple<at::Tensor, at::Tensor> fused_attention_fwd_cuda(const at::Tensor& q, const at::Tensor& k,
                                                            const at::Tensor& v, bool causal, double scale) {
  const auto s = check_attention_inputs("fused_attention_fwd", q, k, v, causal);
  TORCH_CHECK(q.is_cuda(), "fused_attention_fwd_cuda: expected CUDA tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "fused_attention_fwd on CUDA: expected float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(s.D == 32 || s.D == 64 || s.D == 128 || s.D == 256, "fused_attention_fwd on CUDA: head dim ", s.D,
              " is not supported (q ", q.sizes(), "); supported: 32, 64, 128, 256");
  TORCH_CHECK(s.B * s.Hkv <= 65535, "fused_attention_fwd on CUDA: B * Hkv = ", s.B * s.Hkv,
              " exceeds the 65535 grid limit (k ", k.sizes(), ")");
  const c10::cuda::CUDAGuard guard(q.device());
  auto qc = prepared(q), kc = prepared(k), vc = prepared(v);
  auto out = at::empty(q.sizes(), qc.options());
  auto lse = at::empty({s.B, s.H, s.Sq}, qc.options().dtype(at::kFloat));
  const size_t scratch = cuda::attention_fwd_workspace_bytes(s.B, s.H, s.Hkv, s.Sq, s.Sk, s.D);
  at::Tensor workspace;
  if (scratch > 0) workspace = at::empty({static_cast<int64_t>(scratch)}, qc.options().dtype(at::kByte));
  const auto type = float_type(q.scalar_type(), "fused_attention");
  check_launch(cuda::launch_attention_fwd(
      qc.const_data_ptr(), kc.const_data_ptr(), vc.const_data_ptr(), out.mutable_data_ptr(),
      lse.mutable_data_ptr<float>(), scratch > 0 ? workspace.mutable_data_ptr() : nullptr, s.B, s.H, s.Hkv, s.Sq,
      s.Sk, s.D, causal, static_cast<float>(scale), type, c10::cuda::getCurrentCUDAStream()),
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
  TORCH_CHECK(q.is_cuda(), "fused_attention_bwd_cuda: expected CUDA tensors, got ", q.device());
  TORCH_CHECK(q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16,
              "fused_attention_bwd on CUDA: expected float16 or bfloat16, got ", q.scalar_type());
  TORCH_CHECK(s.D == 32 || s.D == 64 || s.D == 128, "fused_attention_bwd on CUDA: head dim ", s.D,
              " is not supported (q ", q.sizes(), "); supported: 32, 64, 128 (use the Triton backward for 256)");
  TORCH_CHECK(s.B * s.Hkv <= 65535, "fused_attention_bwd on CUDA: B * Hkv = ", s.B * s.Hkv,
              " exceeds the 65535 grid limit (k ", k.sizes(), ")");
  const c10::cuda::CUDAGuard guard(q.device());
  auto qc = prepared(q), kc = prepared(k), vc = prepared(v), oc = prepared(out), dout = prepared(grad_out);
  auto lc = lse.contiguous();
  auto dq = at::empty(q.sizes(), qc.options()), dk = at::empty(k.sizes(), kc.options());
  auto dv = at::empty(v.sizes(), vc.options());
  auto delta = at::empty({s.B, s.H, s.Sq}, qc.options().dtype(at::kFloat));
  const auto type = float_type(q.scalar_type(), "fused_attention");
  check_launch(cuda::launch_attention_bwd(
      dout.const_data_ptr(), qc.const_data_ptr(), kc.const_data_ptr(), vc.const_data_ptr(), oc.const_data_ptr(),
      lc.const_data_ptr<float>(), delta.mutable_data_ptr<float>(), dq.mutable_data_ptr(), dk.mutable_data_ptr(),
      dv.mutable_data_ptr(), s.B, s.H, s.Hkv, s.Sq, s.Sk, s.D, causal, static_cast<float>(scale), type,
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
