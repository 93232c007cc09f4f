// Argument checks and small helpers shared by every device implementation of
// int8_matmul / int8_linear / mixed_gemm, so each device reports the same errors.
#pragma once
#include <ATen/ATen.h>

#include <optional>
#include <string>
#include <string_view>

namespace msmartcompute {

// Epilogue activation of mixed_gemm; the numbers are what the kernels receive.
enum class Activation : int { kNone = 0, kRelu = 1, kGelu = 2, kSilu = 3 };

inline Activation parse_activation(const std::optional<c10::string_view>& name) {
  if (!name.has_value()) return Activation::kNone;
  const std::string_view s(name->data(), name->size());
  if (s == "none") return Activation::kNone;
  if (s == "relu") return Activation::kRelu;
  if (s == "gelu") return Activation::kGelu;
  if (s == "silu") return Activation::kSilu;
  TORCH_CHECK(false, "mixed_gemm: activation must be None, 'relu', 'gelu' or 'silu', got '", s, "'");
}

inline bool is_float_type(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

inline void check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t N, const at::Tensor& like) {
  if (!bias.has_value()) return;
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == N, op, ": bias must have shape [", N, "], got ", bias->sizes());
  TORCH_CHECK(is_float_type(bias->scalar_type()), op, ": bias must be float32, float16 or bfloat16, got ",
              bias->scalar_type());
  TORCH_CHECK(bias->device() == like.device(), op, ": bias is on ", bias->device(), " but the inputs are on ",
              like.device());
}

// Past this K an int8 dot product can leave int32: K * 128 * 128 > 2**31 - 1. Refused rather
// than wrapped silently; ops/gemm.py checks the same bound for every backend.
constexpr int64_t kMaxInt8K = 131071;

inline void check_int8_k(const char* op, int64_t K) {
  TORCH_CHECK(K <= kMaxInt8K, op, ": K = ", K, " is past ", kMaxInt8K,
              ", where int32 accumulation of int8 products can overflow; split K and add the partial "
              "results in float, or use mode='w8a16'");
}

// Checks int8_matmul's arguments and returns the output dtype.
inline at::ScalarType check_int8_matmul(const at::Tensor& a_q, const at::Tensor& b_q, const at::Tensor& a_scale,
                                        const at::Tensor& b_scale, const std::optional<at::Tensor>& bias,
                                        std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(a_q.scalar_type() == at::kChar && b_q.scalar_type() == at::kChar,
              "int8_matmul: a_q and b_q must be int8, got ", a_q.scalar_type(), " and ", b_q.scalar_type());
  TORCH_CHECK(a_q.dim() == 2 && b_q.dim() == 2, "int8_matmul: a_q [M, K] and b_q [N, K] must be 2-D, got ",
              a_q.sizes(), " and ", b_q.sizes());
  TORCH_CHECK(a_q.size(1) == b_q.size(1), "int8_matmul: a_q [M, K] and b_q [N, K] disagree on K: ", a_q.sizes(),
              " vs ", b_q.sizes());
  check_int8_k("int8_matmul", a_q.size(1));
  TORCH_CHECK(a_scale.scalar_type() == at::kFloat && b_scale.scalar_type() == at::kFloat,
              "int8_matmul: a_scale and b_scale must be float32");
  TORCH_CHECK(a_scale.dim() == 1 && a_scale.size(0) == a_q.size(0), "int8_matmul: a_scale must have shape [",
              a_q.size(0), "], got ", a_scale.sizes());
  TORCH_CHECK(b_scale.dim() == 1 && b_scale.size(0) == b_q.size(0), "int8_matmul: b_scale must have shape [",
              b_q.size(0), "], got ", b_scale.sizes());
  TORCH_CHECK(b_q.device() == a_q.device() && a_scale.device() == a_q.device() &&
                  b_scale.device() == a_q.device(),
              "int8_matmul: a_q, b_q, a_scale and b_scale must be on one device");
  check_bias("int8_matmul", bias, b_q.size(0), a_q);
  const auto dtype = out_dtype.value_or(at::kBFloat16);
  TORCH_CHECK(is_float_type(dtype) || dtype == at::kInt,
              "int8_matmul: out_dtype must be float32, float16, bfloat16 or int32, got ", dtype);
  TORCH_CHECK(dtype != at::kInt || !bias.has_value(),
              "int8_matmul: out_dtype=int32 returns the raw accumulator; bias must be None");
  return dtype;
}

// Checks int8_linear's arguments; returns true for mode "w8a8", false for "w8a16".
inline bool check_int8_linear(const at::Tensor& x, const at::Tensor& w_q, const at::Tensor& w_scale,
                              const std::optional<at::Tensor>& bias, c10::string_view mode) {
  const std::string_view m(mode.data(), mode.size());
  TORCH_CHECK(m == "w8a8" || m == "w8a16", "int8_linear: mode must be 'w8a8' or 'w8a16', got '", m, "'");
  TORCH_CHECK(is_float_type(x.scalar_type()), "int8_linear: x must be float32, float16 or bfloat16, got ",
              x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "int8_linear: x must have at least 1 dimension");
  TORCH_CHECK(w_q.scalar_type() == at::kChar && w_q.dim() == 2, "int8_linear: w_q must be a 2-D int8 [N, K] tensor");
  TORCH_CHECK(x.size(-1) == w_q.size(1), "int8_linear: x [..., K] and w_q [N, K] disagree on K: ", x.sizes(),
              " vs ", w_q.sizes());
  TORCH_CHECK(w_scale.scalar_type() == at::kFloat && w_scale.dim() == 1 && w_scale.size(0) == w_q.size(0),
              "int8_linear: w_scale must be float32 of shape [", w_q.size(0), "], got ", w_scale.scalar_type(), " ",
              w_scale.sizes());
  TORCH_CHECK(w_q.device() == x.device() && w_scale.device() == x.device(),
              "int8_linear: x, w_q and w_scale must be on one device");
  check_bias("int8_linear", bias, w_q.size(0), x);
  if (m == "w8a8") check_int8_k("int8_linear", w_q.size(1));
  return m == "w8a8";
}

// Checks mixed_gemm's arguments and returns the output dtype.
inline at::ScalarType check_mixed_gemm(const at::Tensor& a, const at::Tensor& b, const std::optional<at::Tensor>& bias,
                                       std::optional<at::ScalarType> out_dtype) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2, "mixed_gemm: a [M, K] and b [N, K] must be 2-D, got ", a.sizes(),
              " and ", b.sizes());
  TORCH_CHECK(a.size(1) == b.size(1), "mixed_gemm: a [M, K] and b [N, K] (nn.Linear weight layout) disagree on K: ",
              a.sizes(), " vs ", b.sizes());
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "mixed_gemm: a and b must share a dtype, got ", a.scalar_type(),
              " and ", b.scalar_type());
  TORCH_CHECK(is_float_type(a.scalar_type()), "mixed_gemm: inputs must be float16 or bfloat16 (float32 on CPU), got ",
              a.scalar_type());
  TORCH_CHECK(b.device() == a.device(), "mixed_gemm: a and b must be on one device");
  check_bias("mixed_gemm", bias, b.size(0), a);
  const auto dtype = out_dtype.value_or(a.scalar_type());
  TORCH_CHECK(is_float_type(dtype), "mixed_gemm: out_dtype must be float32, float16 or bfloat16, got ", dtype);
  return dtype;
}

// x[..., K] viewed as [rows, K], contiguous.
inline at::Tensor as_matrix(const at::Tensor& x) { return x.reshape({-1, x.size(-1)}).contiguous(); }

// The output shape of x[..., K] @ w[N, K]^T: [..., N].
inline std::vector<int64_t> linear_shape(const at::Tensor& x, int64_t N) {
  auto shape = x.sizes().vec();
  shape.back() = N;
  return shape;
}

// From csrc/cpu/quant_int8.cpp: the per-row quantization int8_linear reuses.
std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x, int64_t dim);

}  // namespace msmartcompute
