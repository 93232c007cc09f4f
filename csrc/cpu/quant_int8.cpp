// CPU implementations of quantize_int8 / dequantize_int8.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <type_traits>

#include "../quant_int8.h"
#include "vectorize.h"

namespace msmartcompute {
namespace {

constexpr int64_t kChunk = 512;  // half-precision rows are converted to float32 this many at a time

// The hot loops use builtins and ternaries, not std::max / std::fabs: a target clone cannot
// inline those (compiled for the default target), and calling them per element is scalar.

// max |x[c]| over n floats, on the bit patterns: with the sign bit cleared, IEEE floats order as
// their unsigned integers do, and GCC vectorizes an integer max reduction (vpmaxud) where a float
// one is kept scalar for its NaN rules (measured: 4x faster on a 256x4096 quantize). A NaN
// (above +inf as bits) propagates to the scale, as torch's amax does.
MSC_HOT float absmax_f32(const float* x, int64_t n) {
  uint32_t m = 0;
  for (int64_t c = 0; c < n; ++c) {
    uint32_t bits;
    __builtin_memcpy(&bits, x + c, sizeof bits);
    bits &= 0x7fffffffu;
    m = bits > m ? bits : m;
  }
  float out;
  __builtin_memcpy(&out, &m, sizeof out);
  return out;
}

// q[c] = round_half_even(x[c] * inv) clamped to +-127, as reference.quantize_int8. Clamping
// before the 1.5 * 2**23 add-subtract (exact rounding for |v| < 2**22) keeps the multiply out
// of an FMA, which would round once where the reference rounds twice.
MSC_HOT void scale_round_f32(const float* x, int64_t n, float inv, int8_t* q) {
  for (int64_t c = 0; c < n; ++c) {
    float v = x[c] * inv;
    v = v < -127.f ? -127.f : v;
    v = v > 127.f ? 127.f : v;
    v = (v + 12582912.f) - 12582912.f;
    q[c] = static_cast<int8_t>(static_cast<int32_t>(v));
  }
}

// 127 / absmax, one division per row, capped at float32's max (an all-zero row gives zeros).
float reciprocal_scale(float absmax) {
  return std::min(127.f / absmax, std::numeric_limits<float>::max());
}

template <typename T>
void quantize_row(const T* row, int64_t C, int8_t* q, float* scale) {
  float absmax = 0.f;
  float inv = 0.f;
  if constexpr (std::is_same_v<T, float>) {
    absmax = absmax_f32(row, C);
    inv = reciprocal_scale(absmax);
    scale_round_f32(row, C, inv, q);
  } else {  // half / bfloat16: convert a chunk at a time into a float32 buffer, twice
    float buf[kChunk];
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<float>(row[c0 + c]);
      absmax = std::max(absmax, absmax_f32(buf, n));
    }
    inv = reciprocal_scale(absmax);
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      for (int64_t c = 0; c < n; ++c) buf[c] = static_cast<float>(row[c0 + c]);
      scale_round_f32(buf, n, inv, q + c0);
    }
  }
  *scale = absmax > 0.f ? absmax / 127.f : 1.f;
}

// out[c] = q[c] * scale over n values, as float32.
MSC_HOT void dequantize_row_f32(const int8_t* q, int64_t n, float scale, float* out) {
  for (int64_t c = 0; c < n; ++c) out[c] = static_cast<float>(q[c]) * scale;
}

// The same as bfloat16 bits, rounded to nearest even on the float32 bits (c10's rounding, in a
// loop GCC vectorizes; the per-element c10::BFloat16 conversion stays scalar). Products of an int8
// and a finite scale are never a signalling NaN, the one input this rounding would mistreat.
MSC_HOT void dequantize_row_bf16(const int8_t* q, int64_t n, float scale, uint16_t* out) {
  for (int64_t c = 0; c < n; ++c) {
    const float v = static_cast<float>(q[c]) * scale;
    uint32_t bits;
    __builtin_memcpy(&bits, &v, sizeof bits);
    out[c] = static_cast<uint16_t>((bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16);
  }
}

template <typename T>
void dequantize_row(const int8_t* q, int64_t C, float scale, T* out) {
  if constexpr (std::is_same_v<T, float>) {
    dequantize_row_f32(q, C, scale, out);
  } else if constexpr (std::is_same_v<T, c10::BFloat16>) {
    dequantize_row_bf16(q, C, scale, reinterpret_cast<uint16_t*>(out));
  } else {  // half / bfloat16 / double: through a float32 buffer
    float buf[kChunk];
    for (int64_t c0 = 0; c0 < C; c0 += kChunk) {
      const int64_t n = std::min(kChunk, C - c0);
      dequantize_row_f32(q + c0, n, scale, buf);
      for (int64_t c = 0; c < n; ++c) out[c0 + c] = static_cast<T>(buf[c]);
    }
  }
}

}  // namespace

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
    // Rows are independent; a grain of ~64k elements keeps small tensors on one thread
    // (measured: waking a second thread costs more than it saves below that).
    const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(C, 1));
    at::parallel_for(0, R, grain, [&](int64_t begin, int64_t end) {
      for (int64_t r = begin; r < end; ++r) quantize_row(src + r * C, C, dst + r * C, s + r);
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
      for (int64_t r = begin; r < end; ++r) dequantize_row(src + r * C, C, sp[r], dst + r * C);
    });
  });
  return from_rows(out, q, dim);
}

TORCH_LIBRARY_IMPL(msmartcompute, CPU, m) {
  m.impl("quantize_int8", &quantize_int8_cpu);
  m.impl("dequantize_int8", &dequantize_int8_cpu);
}

}  // namespace msmartcompute
