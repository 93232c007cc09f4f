// Shape logic shared by every device implementation of the int8 quantize ops:
// a quantization along `dim` is run as a row-wise op on a [rows, cols] view
// with `dim` moved last.
#pragma once
#include <ATen/ATen.h>

namespace msmartcompute {

inline void check_quantize_input(const at::Tensor& x, int64_t dim) {
  TORCH_CHECK(x.dim() >= 1, "quantize_int8: expected a tensor with at least 1 dimension, got a scalar");
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kHalf ||
                  x.scalar_type() == at::kBFloat16,
              "quantize_int8: expected float32, float16 or bfloat16 input, got ", x.scalar_type());
  TORCH_CHECK(dim >= -x.dim() && dim < x.dim(), "quantize_int8: dim ", dim,
              " out of range for a tensor of shape ", x.sizes());
}

inline void check_dequantize_input(const at::Tensor& q, const at::Tensor& scale, int64_t dim) {
  TORCH_CHECK(q.scalar_type() == at::kChar, "dequantize_int8: expected int8 q, got ", q.scalar_type());
  TORCH_CHECK(scale.scalar_type() == at::kFloat, "dequantize_int8: expected float32 scale, got ",
              scale.scalar_type());
  TORCH_CHECK(q.dim() >= 1, "dequantize_int8: expected q with at least 1 dimension");
  TORCH_CHECK(dim >= -q.dim() && dim < q.dim(), "dequantize_int8: dim ", dim,
              " out of range for q of shape ", q.sizes());
  TORCH_CHECK(q.device() == scale.device(), "dequantize_int8: q is on ", q.device(),
              " but scale is on ", scale.device());
  auto expected = q.sizes().vec();
  expected.erase(expected.begin() + at::maybe_wrap_dim(dim, q.dim()));
  TORCH_CHECK(scale.sizes().vec() == expected, "dequantize_int8: scale has shape ", scale.sizes(),
              " but q of shape ", q.sizes(), " along dim ", dim, " needs ", at::IntArrayRef(expected));
}

// x with `dim` moved last, contiguous, viewed as [rows, cols].
inline at::Tensor as_rows(const at::Tensor& x, int64_t dim) {
  auto moved = x.movedim(dim, -1).contiguous();
  return moved.view({-1, moved.size(-1)});
}

// Undo as_rows for a [rows, cols] result: back to x's shape with `dim` in place.
inline at::Tensor from_rows(const at::Tensor& rows, const at::Tensor& like, int64_t dim) {
  auto moved_shape = like.movedim(dim, -1).sizes();
  return rows.view(moved_shape).movedim(-1, dim).contiguous();
}

// Shape of the scale: x's shape without `dim`.
inline std::vector<int64_t> scale_shape(const at::Tensor& x, int64_t dim) {
  auto shape = x.sizes().vec();
  shape.erase(shape.begin() + at::maybe_wrap_dim(dim, x.dim()));
  return shape;
}

}  // namespace msmartcompute
