// Row-wise symmetric int8 quantization: one block per row, one pass to find
// absmax, one to scale and cast (the row is small enough to come back from L1/L2).
// Vector path: 16-byte loads of x and packed int8 stores when the row allows it.
#include <algorithm>

#include "common.cuh"
#include "launchers.h"

namespace msmartcompute::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
struct Vec16 {  // 16 bytes of T
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ int8_t quantize_one(float x, float scale) {
  // IEEE division (not a reciprocal multiply) so results match torch.round(x / scale)
  // bit for bit; __float2int_rn rounds half to even like torch.round.
  int v = __float2int_rn(__fdiv_rn(x, scale));
  return static_cast<int8_t>(max(-127, min(127, v)));
}

template <typename T, bool kVectorized>
__global__ void quantize_int8_kernel(const T* __restrict__ x,  // [rows, cols]
                                     int8_t* __restrict__ q,   // [rows, cols]
                                     float* __restrict__ scale,  // [rows]
                                     int64_t cols) {
  __shared__ float scratch[kThreads / 32];
  const int64_t row = blockIdx.x;
  const T* xr = x + row * cols;
  int8_t* qr = q + row * cols;
  constexpr int V = Vec16<T>::kSize;

  float absmax = 0.f;
  if constexpr (kVectorized) {
    const auto* xv = reinterpret_cast<const Vec16<T>*>(xr);
    for (int64_t i = threadIdx.x; i < cols / V; i += blockDim.x) {
      Vec16<T> chunk = xv[i];
#pragma unroll
      for (int j = 0; j < V; ++j) absmax = fmaxf(absmax, fabsf(to_float(chunk.v[j])));
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) absmax = fmaxf(absmax, fabsf(to_float(xr[i])));
  }
  absmax = block_max(absmax, scratch);
  const float s = absmax > 0.f ? __fdiv_rn(absmax, 127.f) : 1.f;
  if (threadIdx.x == 0) scale[row] = s;

  if constexpr (kVectorized) {
    const auto* xv = reinterpret_cast<const Vec16<T>*>(xr);
    for (int64_t i = threadIdx.x; i < cols / V; i += blockDim.x) {
      Vec16<T> chunk = xv[i];
      int8_t packed[V];
#pragma unroll
      for (int j = 0; j < V; ++j) packed[j] = quantize_one(to_float(chunk.v[j]), s);
      // V int8 values: 4, 8 or 16 bytes, stored in one go.
      if constexpr (V == 4) {
        *reinterpret_cast<char4*>(qr + i * V) = *reinterpret_cast<char4*>(packed);
      } else if constexpr (V == 8) {
        *reinterpret_cast<int2*>(qr + i * V) = *reinterpret_cast<int2*>(packed);
      } else {
        *reinterpret_cast<int4*>(qr + i * V) = *reinterpret_cast<int4*>(packed);
      }
    }
  } else {
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) qr[i] = quantize_one(to_float(xr[i]), s);
  }
}

template <typename T>
__global__ void dequantize_int8_kernel(const int8_t* __restrict__ q,     // [rows, cols]
                                       const float* __restrict__ scale,  // [rows]
                                       T* __restrict__ out,              // [rows, cols]
                                       int64_t cols, int64_t total) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < total;
       i += int64_t(gridDim.x) * blockDim.x) {
    out[i] = from_float<T>(static_cast<float>(q[i]) * scale[i / cols]);
  }
}

template <typename T>
cudaError_t launch_quantize_typed(const void* x, int8_t* q, float* scale, int64_t rows, int64_t cols,
                                  cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  constexpr int V = Vec16<T>::kSize;
  // Rows start 16-byte aligned only when cols is a multiple of the vector width.
  const bool vectorized = cols % V == 0 && reinterpret_cast<uintptr_t>(x) % 16 == 0 &&
                          reinterpret_cast<uintptr_t>(q) % V == 0;
  if (vectorized) {
    quantize_int8_kernel<T, true><<<rows, kThreads, 0, stream>>>(xt, q, scale, cols);
  } else {
    quantize_int8_kernel<T, false><<<rows, kThreads, 0, stream>>>(xt, q, scale, cols);
  }
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_dequantize_typed(const int8_t* q, const float* scale, void* out, int64_t rows, int64_t cols,
                                    cudaStream_t stream) {
  const int64_t total = rows * cols;
  const int blocks = static_cast<int>(std::min<int64_t>((total + kThreads - 1) / kThreads, 65535));
  dequantize_int8_kernel<T><<<blocks, kThreads, 0, stream>>>(q, scale, static_cast<T*>(out), cols, total);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_quantize_int8(const void* x, int8_t* q, float* scale, int64_t rows, int64_t cols,
                                 FloatType type, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  switch (type) {
    case FloatType::kFloat32: return launch_quantize_typed<float>(x, q, scale, rows, cols, stream);
    case FloatType::kFloat16: return launch_quantize_typed<__half>(x, q, scale, rows, cols, stream);
    case FloatType::kBFloat16: return launch_quantize_typed<__nv_bfloat16>(x, q, scale, rows, cols, stream);
  }
  return cudaErrorInvalidValue;
}

cudaError_t launch_dequantize_int8(const int8_t* q, const float* scale, void* out, int64_t rows, int64_t cols,
                                   FloatType type, cudaStream_t stream) {
  if (rows == 0 || cols == 0) return cudaSuccess;
  switch (type) {
    case FloatType::kFloat32: return launch_dequantize_typed<float>(q, scale, out, rows, cols, stream);
    case FloatType::kFloat16: return launch_dequantize_typed<__half>(q, scale, out, rows, cols, stream);
    case FloatType::kBFloat16: return launch_dequantize_typed<__nv_bfloat16>(q, scale, out, rows, cols, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace msmartcompute::cuda
