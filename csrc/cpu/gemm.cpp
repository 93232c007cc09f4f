// CPU implementations of int8_matmul / int8_linear / mixed_gemm.
//
// Path choices (measured on the 2-core AVX-512 dev box, see the gemm benchmarks):
// the int32 accumulation runs in at::_int_mm (oneDNN's s8 GEMM, faster than fp32
// F.linear at every batch size measured) and only the dequantize + bias epilogue
// is a hand loop here; floating GEMMs go through MKL in float32.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "../gemm.h"

namespace msmartcompute {
namespace {

// acc[M, N] int32 = a_q[M, K] @ b_q[N, K]^T.
at::Tensor int8_accumulate(const at::Tensor& a_q, const at::Tensor& b_q) {
  const int64_t M = a_q.size(0), N = b_q.size(0), K = a_q.size(1);
  if (M == 0 || N == 0 || K == 0) return at::zeros({M, N}, a_q.options().dtype(at::kInt));
  return at::_int_mm(a_q.contiguous(), b_q.contiguous().t());
}

// out[m, n] = acc[m, n] * a_scale[m] * b_scale[n] + bias[n], as `dtype`.
at::Tensor dequantize_epilogue(const at::Tensor& acc, const at::Tensor& a_scale, const at::Tensor& b_scale,
                               const std::optional<at::Tensor>& bias, at::ScalarType dtype) {
  const int64_t M = acc.size(0), N = acc.size(1);
  auto out = at::empty({M, N}, acc.options().dtype(dtype));
  auto sa = a_scale.contiguous();                                              // [M]
  auto sb = b_scale.contiguous();                                              // [N]
  auto bf = bias.has_value() ? bias->to(at::kFloat).contiguous() : at::Tensor();  // [N]
  const int32_t* accp = acc.const_data_ptr<int32_t>();
  const float* sap = sa.const_data_ptr<float>();
  const float* sbp = sb.const_data_ptr<float>();
  const float* bp = bf.defined() ? bf.const_data_ptr<float>() : nullptr;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, dtype, "int8_matmul_epilogue", [&] {
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(N, 1));
    at::parallel_for(0, M, grain, [&](int64_t begin, int64_t end) {
      for (int64_t m = begin; m < end; ++m) {
        const float s = sap[m];
        for (int64_t n = 0; n < N; ++n) {
          float v = static_cast<float>(accp[m * N + n]) * s * sbp[n];
          if (bp) v += bp[n];
          dst[m * N + n] = static_cast<scalar_t>(v);
        }
      }
    });
  });
  return out;
}

// out[M, N] float32 = x[M, K] @ (w_q[N, K] * w_scale[:, None])^T + bias. The weights are
// dequantized a block of rows at a time into a cache-sized float32 buffer and each block
// goes through MKL (one thread per block). Measured on the 2-core dev box, 4096 x 4096,
// best of 12: dequantizing all of W first (an N x K float32 copy through DRAM) took
// 114-154 ms at batch 1-128, the blocks 33-78 ms; fp32 F.linear 3-52 ms. This is the same
// float32 GEMM plus a dequantize pass, so on a CPU w8a8 (at::_int_mm) is the fast mode.
at::Tensor w8a16_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                        const std::optional<at::Tensor>& bias) {
  const int64_t M = x.size(0), N = w_q.size(0), K = x.size(1);
  auto out = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return out;
  auto q = w_q.contiguous();     // [N, K]
  auto s = w_scale.contiguous();  // [N]
  const int8_t* qp = q.const_data_ptr<int8_t>();
  const float* sp = s.const_data_ptr<float>();
  const int64_t rows = std::max<int64_t>(16, (1 << 20) / 4 / std::max<int64_t>(K, 1));  // ~1 MiB of float W
  const int64_t blocks = (N + rows - 1) / rows;
  at::parallel_for(0, blocks, 1, [&](int64_t begin, int64_t end) {
    auto buf = at::empty({rows, K}, x.options());  // [rows, K] float32
    float* bp = buf.mutable_data_ptr<float>();
    for (int64_t blk = begin; blk < end; ++blk) {
      const int64_t n0 = blk * rows, nb = std::min(rows, N - n0);
      for (int64_t r = 0; r < nb; ++r) {
        const int8_t* src = qp + (n0 + r) * K;
        const float sc = sp[n0 + r];
        for (int64_t k = 0; k < K; ++k) bp[r * K + k] = static_cast<float>(src[k]) * sc;
      }
      auto dst = out.narrow(1, n0, nb);  // [M, nb], row stride N
      at::mm_out(dst, x, buf.narrow(0, 0, nb).t());
    }
  });
  if (bias.has_value()) out.add_(bias->to(at::kFloat));
  return out;
}

at::Tensor int8_matmul_cpu(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                           const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                           std::optional<at::ScalarType> out_dtype) {
  const auto dtype = check_int8_matmul(a_q, b_q, a_scale, b_scale, bias, out_dtype);
  TORCH_CHECK(a_q.device().is_cpu(), "int8_matmul_cpu: expected CPU tensors, got ", a_q.device());
  auto acc = int8_accumulate(a_q, b_q);  // [M, N] int32
  if (dtype == at::kInt) return acc;
  return dequantize_epilogue(acc, a_scale, b_scale, bias, dtype);
}

at::Tensor int8_linear_cpu(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                           const std::optional<at::Tensor>& bias, c10::string_view mode) {
  const bool w8a8 = check_int8_linear(x, w_q, w_scale, bias, mode);
  TORCH_CHECK(x.device().is_cpu(), "int8_linear_cpu: expected CPU tensors, got ", x.device());
  const int64_t N = w_q.size(0);
  auto x2 = as_matrix(x);  // [M, K]
  at::Tensor out;          // [M, N]
  if (w8a8) {
    auto [x_q, x_scale] = quantize_int8_cpu(x2, -1);  // [M, K] int8, [M]
    out = dequantize_epilogue(int8_accumulate(x_q, w_q), x_scale, w_scale, bias, x.scalar_type());
  } else {
    out = w8a16_linear(x2.to(at::kFloat), w_q, w_scale, bias).to(x.scalar_type());
  }
  return out.view(linear_shape(x, N));
}

at::Tensor mixed_gemm_cpu(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                          std::optional<c10::string_view> activation, std::optional<at::ScalarType> out_dtype) {
  const auto dtype = check_mixed_gemm(a, b, bias, out_dtype);
  const auto act = parse_activation(activation);
  TORCH_CHECK(a.device().is_cpu(), "mixed_gemm_cpu: expected CPU tensors, got ", a.device());
  // float32 accumulation: half inputs are exact in float32, so upcasting first is
  // the same math as a half GEMM with a float32 accumulator.
  auto bf = bias.has_value() ? std::optional<at::Tensor>(bias->to(at::kFloat)) : std::nullopt;
  auto acc = at::linear(a.to(at::kFloat), b.to(at::kFloat), bf);  // [M, N] float32
  switch (act) {
    case Activation::kNone: break;
    case Activation::kRelu: acc.relu_(); break;
    case Activation::kGelu: acc = at::gelu(acc); break;
    case Activation::kSilu: acc = at::silu(acc); break;
  }
  return acc.to(dtype);
}

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CPU, m) {
  m.impl("int8_matmul", &int8_matmul_cpu);
  m.impl("int8_linear", &int8_linear_cpu);
  m.impl("mixed_gemm", &mixed_gemm_cpu);
}

}  // namespace msmartcompute
