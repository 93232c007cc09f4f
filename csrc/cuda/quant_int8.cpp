// CUDA registrations of quantize_int8 / dequantize_int8: checks, allocation and
// the current stream here; the kernels are in kernels/quant_int8.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"
#include "../quant_int8.h"

namespace msmartcompute {
namespace {

std::tuple<at::Tensor, at::Tensor> quantize_int8_cuda(const at::Tensor& x, int64_t dim) {
  check_quantize_input(x, dim);
  TORCH_CHECK(x.is_cuda(), "quantize_int8_cuda: expected a CUDA tensor, got ", x.device());
  const c10::cuda::CUDAGuard guard(x.device());
  auto rows = as_rows(x, dim);  // [R, C]
  auto q = at::empty(rows.sizes(), rows.options().dtype(at::kChar));
  auto scale = at::empty({rows.size(0)}, rows.options().dtype(at::kFloat));
  check_launch(cuda::launch_quantize_int8(rows.const_data_ptr(), q.mutable_data_ptr<int8_t>(),
                                          scale.mutable_data_ptr<float>(), rows.size(0), rows.size(1),
                                          float_type(rows.scalar_type(), "msmartcompute int8 quantization"), c10::cuda::getCurrentCUDAStream()),
               "quantize_int8 kernel");
  return {from_rows(q, x, dim), scale.view(scale_shape(x, dim))};
}

at::Tensor dequantize_int8_cuda(const at::Tensor& q, const at::Tensor& scale, int64_t dim,
                                std::optional<at::ScalarType> dtype) {
  check_dequantize_input(q, scale, dim);
  TORCH_CHECK(q.is_cuda(), "dequantize_int8_cuda: expected CUDA tensors, got ", q.device());
  const c10::cuda::CUDAGuard guard(q.device());
  const auto out_dtype = dtype.value_or(at::kFloat);
  auto rows = as_rows(q, dim);  // [R, C]
  auto s = scale.contiguous();  // [R]
  auto out = at::empty(rows.sizes(), rows.options().dtype(out_dtype));
  check_launch(cuda::launch_dequantize_int8(rows.const_data_ptr<int8_t>(), s.const_data_ptr<float>(),
                                            out.mutable_data_ptr(), rows.size(0), rows.size(1),
                                            float_type(out_dtype, "msmartcompute int8 quantization"), c10::cuda::getCurrentCUDAStream()),
               "dequantize_int8 kernel");
  return from_rows(out, q, dim);
}

}  // namespace

TORCH_LIBRARY_IMPL(msmartcompute, CUDA, m) {
  m.impl("quantize_int8", &quantize_int8_cuda);
  m.impl("dequantize_int8", &dequantize_int8_cuda);
}

}  // namespace msmartcompute
