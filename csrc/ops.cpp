// The one list of msmartcompute op schemas. Device implementations register
// against these names: csrc/cpu/*.cpp (CPU key) and csrc/cuda/*.cpp (CUDA key,
// calling the launchers in kernels/*.cu).
#include <torch/library.h>

TORCH_LIBRARY(msmartcompute, m) {
  // Symmetric int8 quantization along `dim`: scale = absmax / 127 (1 for an
  // all-zero slice), q = round_half_even(x / scale) clamped to [-127, 127].
  // Returns (q int8 shaped like x, scale float32 shaped like x without `dim`).
  m.def("quantize_int8(Tensor x, int dim=-1) -> (Tensor, Tensor)");
  // Inverse of quantize_int8: q * scale broadcast along `dim`, cast to dtype
  // (float32 when None).
  m.def("dequantize_int8(Tensor q, Tensor scale, int dim=-1, ScalarType? dtype=None) -> Tensor");
}
