// CUDA registrations of int8_matmul / int8_linear / mixed_gemm: checks, allocation and
// the current stream here; the kernels are in kernels/gemm_int8.cu and kernels/gemm_mixed.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <limits>

#include "launch.h"
#include "../gemm.h"

namespace msmartcompute {
namespace {

// The kernels read rows along K with a row stride: keep row-strided views, copy the rest.
at::Tensor k_contiguous(const at::Tensor& t) {
  return t.stride(1) == 1 && t.stride(0) >= t.size(1) ? t : t.contiguous();
}

void check_sizes(const char* op, int64_t M, int64_t N, int64_t K) {
  constexpr int64_t kMax = std::numeric_limits<int>::max();
  TORCH_CHECK(M <= kMax && N <= kMax && K <= kMax, op, ": M, N and K must each fit in int32, got ", M, ", ", N,
              ", ", K);
}

const float* float_bias(const std::optional<at::Tensor>& bias, at::Tensor& holder) {
  if (!bias.has_value()) return nullptr;
  holder = bias->to(at::kFloat).contiguous();  // [N], tiny
  return holder.const_data_ptr<float>();
}

// The decode GEMMs' split-K partial sums, from the caching allocator (bytes, 0 when unsplit).
at::Tensor split_k_workspace(size_t bytes, const at::Tensor& like) {
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

// out [M, N] = int8 GEMM epilogue of a_q [M, K] and b_q [N, K].
at::Tensor run_int8_gemm(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                         const at::Tensor& b_scale, const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  auto a = k_contiguous(a_q), b = k_contiguous(b_q);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  check_sizes("int8_matmul", M, N, K);
  auto sa = a_scale.contiguous(), sb = b_scale.contiguous();
  at::Tensor bias_f;
  const float* bias_ptr = float_bias(bias, bias_f);
  auto out = at::empty({M, N}, a.options().dtype(dtype));
  const bool raw = dtype == at::kInt;
  auto workspace = split_k_workspace(cuda::int8_gemm_workspace_bytes(M, N, K), a);
  check_launch(cuda::launch_int8_gemm(a.const_data_ptr<int8_t>(), a.stride(0), b.const_data_ptr<int8_t>(),
                                      b.stride(0), sa.const_data_ptr<float>(), sb.const_data_ptr<float>(), bias_ptr,
                                      out.mutable_data_ptr(), M, N, K, raw,
                                      raw ? cuda::FloatType::kFloat32 : float_type(dtype, "msmartcompute GEMMs"),
                                      workspace.numel() ? workspace.mutable_data_ptr() : nullptr,
                                      c10::cuda::getCurrentCUDAStream()),
               "int8_matmul kernel");
  return out;
}

at::Tensor run_mixed_gemm(const at::Tensor& a_in, const at::Tensor& b_in, const float* b_scale,
                          const std::optional<at::Tensor>& bias, Activation act, at::ScalarType dtype) {
  auto a = k_contiguous(a_in), b = k_contiguous(b_in);
  const int64_t M = a.size(0), N = b.size(0), K = a.size(1);
  check_sizes("mixed_gemm", M, N, K);
  at::Tensor bias_f;
  const float* bias_ptr = float_bias(bias, bias_f);
  auto out = at::empty({M, N}, a.options().dtype(dtype));
  auto workspace = split_k_workspace(cuda::mixed_gemm_workspace_bytes(M, N, K), a);
  check_launch(cuda::launch_mixed_gemm(a.const_data_ptr(), a.stride(0), b.const_data_ptr(), b.stride(0),
                                       b.scalar_type() == at::kChar, b_scale, bias_ptr, out.mutable_data_ptr(), M, N,
                                       K, float_type(a.scalar_type(), "msmartcompute GEMMs"), float_type(dtype, "msmartcompute GEMMs"), static_cast<int>(act),
                                       workspace.numel() ? workspace.mutable_data_ptr() : nullptr,
                                       c10::cuda::getCurrentCUDAStream()),
               "mixed_gemm kernel");
  return out;
}

at::Tensor int8_matmul_cuda(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                            const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                            std::optional<at::ScalarType> out_dtype) {
  const auto dtype = check_int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype);
  TORCH_CHECK(a_q.is_cuda(), "int8_matmul_cuda: expected CUDA tensors, got ", a_q.device());
  const c10::cuda::CUDAGuard guard(a_q.device());
  return run_int8_gemm(a_q, b_q, a_scale, b_scale, bias, dtype);
}

at::Tensor int8_linear_cuda(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                            const std::optional<at::Tensor>& bias, c10::string_view mode) {
  const bool w8a8 = check_int8_linear(x, w_q, w_scale, bias, mode);
  TORCH_CHECK(x.is_cuda(), "int8_linear_cuda: expected CUDA tensors, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = w_q.size(0);
  auto x2 = as_matrix(x);  // [M, K]
  at::Tensor out;          // [M, N]
  if (w8a8) {
    // Per-token quantization (the quantize_int8 kernel), then the int8 GEMM: two launches
    // in one op; x_q is M x K bytes, small next to W where w8a8 pays off.
    auto x_q = at::empty(x2.sizes(), x2.options().dtype(at::kChar));        // [M, K]
    auto x_scale = at::empty({x2.size(0)}, x2.options().dtype(at::kFloat));  // [M]
    if (x2.numel() > 0)
      check_launch(cuda::launch_quantize_int8(x2.const_data_ptr(), x_q.mutable_data_ptr<int8_t>(),
                                              x_scale.mutable_data_ptr<float>(), x2.size(0), x2.size(1),
                                              float_type(x2.scalar_type(), "msmartcompute GEMMs"), c10::cuda::getCurrentCUDAStream()),
                   "int8_linear quantize kernel");
    else
      x_scale.fill_(1.f);
    out = run_int8_gemm(x_q, w_q, x_scale, w_scale, bias, x.scalar_type());
  } else if (x.scalar_type() == at::kFloat) {
    // There is no float32 HMMA: dequantize the weights and let cuBLAS run the float32 GEMM.
    auto w = w_q.to(at::kFloat).mul_(w_scale.unsqueeze(1));  // [N, K]
    auto bf = bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
    out = at::linear(x2, w, bf);
  } else {
    auto s = w_scale.contiguous();
    out = run_mixed_gemm(x2, w_q, s.const_data_ptr<float>(), bias, Activation::kNone, x.scalar_type());
  }
  return out.view(linear_shape(x, N));
}

at::Tensor mixed_gemm_cuda(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                           std::optional<c10::string_view> activation, std::optional<at::ScalarType> out_dtype) {
  const auto dtype = check_mixed_gemm(a, b, bias, out_dtype);
  const auto act = parse_activation(activation);
  TORCH_CHECK(a.is_cuda(), "mixed_gemm_cuda: expected CUDA tensors, got ", a.device());
  TORCH_CHECK(a.scalar_type() == at::kHalf || a.scalar_type() == at::kBFloat16,
              "mixed_gemm: the CUDA kernel takes float16 or bfloat16 inputs (tensor cores), got ", a.scalar_type());
  const c10::cuda::CUDAGuard guard(a.device());
  return run_mixed_gemm(a, b, nullptr, bias, act, dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CUDA, m) {
  m.impl("int8_matmul", &int8_matmul_cuda);
  m.impl("int8_linear", &int8_linear_cuda);
  m.impl("mixed_gemm", &mixed_gemm_cuda);
}

}  // namespace msmartcompute
