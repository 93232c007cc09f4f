// Host launchers of the CUDA kernels: raw pointers, sizes and a stream, no
// torch types, so the .cu files build with nvcc alone. The torch glue that
// checks, allocates and registers lives in csrc/cuda/*.cpp.
#pragma once
#include <cuda_runtime.h>
#include <cstdint>

namespace msmartcompute::cuda {

enum class FloatType { kFloat32, kFloat16, kBFloat16 };

// Row-wise symmetric int8 quantization of a contiguous [rows, cols] matrix.
cudaError_t launch_quantize_int8(const void* x,    // [rows, cols] of `type`
                                 int8_t* q,        // [rows, cols]
                                 float* scale,     // [rows]
                                 int64_t rows, int64_t cols, FloatType type, cudaStream_t stream);

// out[r, c] = q[r, c] * scale[r], written as `type`.
cudaError_t launch_dequantize_int8(const int8_t* q,     // [rows, cols]
                                   const float* scale,  // [rows]
                                   void* out,           // [rows, cols] of `type`
                                   int64_t rows, int64_t cols, FloatType type, cudaStream_t stream);

}  // namespace msmartcompute::cuda
