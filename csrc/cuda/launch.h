// Shared by the CUDA registrations: torch dtype -> launcher type, and launch error checks.
#pragma once
#include <ATen/ATen.h>

#include "../../kernels/launchers.h"

namespace msmartcompute {

inline cuda::FloatType float_type(at::ScalarType t, const char* op) {
  switch (t) {
    case at::kFloat: return cuda::FloatType::kFloat32;
    case at::kHalf: return cuda::FloatType::kFloat16;
    case at::kBFloat16: return cuda::FloatType::kBFloat16;
    default: TORCH_CHECK(false, op, " on CUDA supports float32, float16 and bfloat16, got ", t);
  }
}

inline void check_launch(cudaError_t err, const char* what) {
  TORCH_CHECK(err == cudaSuccess, what, " failed: ", cudaGetErrorString(err));
}

}  // namespace msmartcompute
