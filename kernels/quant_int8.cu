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

__device__ __forceinline__ int8_t quantize_one(float x, float inv) {
  // x times the row's reciprocal scale, rounded once (__fmul_rn is never fused into an FMA),
  // then half to even (__float2int_rn): reference.quantize_int8's round(x * inv) bit for bit.
  int v = __float2int_rn(__fmul_rn(x, inv));
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
  if (threadIdx.x == 0) scale[row] = absmax > 0.f ? __fdiv_rn(absmax, 127.f) : 1.f;
  // One IEEE division per row; capped at float32's max so an all-zero row gives zeros.
  const float inv = fminf(__fdiv_rn(127.f, absmax), 3.402823466e38f);

  if constexpr (kVectorized) {
    const auto* xv = reinterpret_cast<const Vec16<T>*>(xr);
    for (int64_t i = threadIdx.x; i < cols / V; i += blockDim.x) {
      Vec16<T> chunk = xv[i];
      int8_t packed[V];
#pragma unroll
      for (int j = 0; j < V; ++j) packed[j] = quantize_one(to_float(chunk.v[j]), inv);
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
    for (int64_t i = threadIdx.x; i < cols; i += blockDim.x) qr[i] = quantize_one(to_float(xr[i]), inv);
  }
}

// One row per grid.y step, columns across grid.x: the row's scale is read once per thread and
// no element index is divided by cols (a 64-bit division per element, emulated on GPUs).
template <typename T>
__global__ void dequantize_int8_kernel(const int8_t* __restrict__ q,     // [rows, cols]
                                       const float* __restrict__ scale,  // [rows]
                                       T* __restrict__ out,              // [rows, cols]
                                       int64_t rows, int64_t cols) {
  for (int64_t row = blockIdx.y; row < rows; row += gridDim.y) {
    const float s = scale[row];
    const int8_t* qr = q + row * cols;
    T* outr = out + row * cols;
#pragma unroll 1  // an unrolled loop would divide by its stride for the trip count
    for (int64_t c = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; c < cols; c += int64_t(gridDim.x) * blockDim.x)
      outr[c] = from_float<T>(static_cast<float>(qr[c]) * s);
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
  // grid.x covers a row (at most 64 blocks: long rows loop), grid.y the rows (at most 65535: the limit).
  const dim3 grid(static_cast<unsigned>(std::min<int64_t>((cols + kThreads - 1) / kThreads, 64)),
                  static_cast<unsigned>(std::min<int64_t>(rows, 65535)));
  dequantize_int8_kernel<T><<<grid, kThreads, 0, stream>>>(q, scale, static_cast<T*>(out), rows, cols);
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
