// CPU implementations of quantize_int8 / dequantize_int8.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>

#include "../quant_int8.h"

namespace msmartcompute {

std::tuple<at::Tensor, at::Tensor> quantize_int8_cpu(const at::Tensor& x, int64_t dim) {
  check_quantize_input(x, dim);
  TORCH_CHECK(x.device().is_cpu(), "quantize_int8_cpu: expected a CPU tensor, got ", x.device());
  auto rows = as_rows(x, dim);  // [R, C]
  const int64_t R = rows.size(0), C = rows.size(1);
  auto q = at::empty({R, C}, rows.options().dtype(at::kChar));
  auto scale = at::empty({R}, rows.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, rows.scalar_type(), "quantize_int8_cpu", [&] {
    const scalar_t* src = rows.const_data_ptr<scalar_t>();
    int8_t* dst = q.mutable_data_ptr<int8_t>();
    float* s = scale.mutable_data_ptr<float>();
    // Rows are independent; a grain of ~32k elements keeps small tensors single-threaded.
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) {
        const scalar_t* row = src + r * C;
        float absmax = 0.f;
        for (int64_t c = 0; c < C; ++c) absmax = std::max(absmax, std::abs(static_cast<float>(row[c])));
        const float sc = absmax > 0.f ? absmax / 127.f : 1.f;
        s[r] = sc;
        int8_t* out = dst + r * C;
        for (int64_t c = 0; c < C; ++c) {
          // nearbyint under the default rounding mode is round-half-to-even, as torch.round.
          float v = std::nearbyint(static_cast<float>(row[c]) / sc);
          out[c] = static_cast<int8_t>(std::min(127.f, std::max(-127.f, v)));
        }
      }
    });
  });
  return {from_rows(q, x, dim), scale.view(scale_shape(x, dim))};
}

at::Tensor dequantize_int8_cpu(const at::Tensor& q, const at::Tensor& scale, int64_t dim,
                               std::optional<at::ScalarType> dtype) {
  check_dequantize_input(q, scale, dim);
  TORCH_CHECK(q.device().is_cpu(), "dequantize_int8_cpu: expected CPU tensors, got ", q.device());
  const auto out_dtype = dtype.value_or(at::kFloat);
  TORCH_CHECK(out_dtype == at::kFloat || out_dtype == at::kHalf || out_dtype == at::kBFloat16 ||
                  out_dtype == at::kDouble,
              "dequantize_int8: dtype must be a floating type, got ", out_dtype);
  auto rows = as_rows(q, dim);  // [R, C]
  auto s = scale.contiguous();  // [R]
  const int64_t R = rows.size(0), C = rows.size(1);
  auto out = at::empty({R, C}, rows.options().dtype(out_dtype));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out_dtype, "dequantize_int8_cpu", [&] {
    const int8_t* src = rows.const_data_ptr<int8_t>();
    const float* sp = s.const_data_ptr<float>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r)
        for (int64_t c = 0; c < C; ++c)
          dst[r * C + c] = static_cast<scalar_t>(static_cast<float>(src[r * C + c]) * sp[r]);
    });
  });
  return from_rows(out, q, dim);
}

TORCH_LIBRARY_IMPL(msmartcompute, CPU, m) {
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
}

}  // namespace msmartcompute
