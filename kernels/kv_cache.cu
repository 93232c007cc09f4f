// Writes new keys and values into a paged KV cache by slot mapping (vLLM's reshape_and_cache):
// token n's k/v rows [Hkv, D] go to block slot / block_size, row slot % block_size. One block per
// token, its threads over Hkv * D elements; a negative slot (padding) writes nothing, and so does
// a slot past the cache (checked here, since the host cannot read the slots without a sync).
#include <algorithm>

#include "launchers.h"

namespace msmartcompute::cuda {
namespace {

template <typename E>  // the element's bits: uint16_t (fp16/bf16) or uint32_t (fp32)
__global__ void write_kv_cache_kernel(const __grid_constant__ KvCacheWrite w) {
  const int64_t n = blockIdx.x;
  const int64_t slot = w.slot_mapping[n];
  if (slot < 0 || slot >= w.capacity) return;  // padding, or past the cache: nothing written
  const int64_t block = slot / w.block_size, row = slot % w.block_size;
  const E* k = static_cast<const E*>(w.k) + n * w.k_stride[0];
  const E* v = static_cast<const E*>(w.v) + n * w.v_stride[0];
  E* kc = static_cast<E*>(w.k_cache) + block * w.k_cache_stride[0] + row * w.k_cache_stride[1];
  E* vc = static_cast<E*>(w.v_cache) + block * w.v_cache_stride[0] + row * w.v_cache_stride[1];
  for (int64_t i = threadIdx.x; i < w.Hkv * w.D; i += blockDim.x) {
    const int64_t h = i / w.D, d = i % w.D;
    kc[h * w.k_cache_stride[2] + d * w.k_cache_stride[3]] = k[h * w.k_stride[1] + d * w.k_stride[2]];
    vc[h * w.v_cache_stride[2] + d * w.v_cache_stride[3]] = v[h * w.v_stride[1] + d * w.v_stride[2]];
  }
}

}  // namespace

cudaError_t launch_write_kv_cache(const KvCacheWrite& w, int element_bytes, cudaStream_t stream) {
  if (w.N == 0 || w.Hkv * w.D == 0) return cudaSuccess;
  if (w.block_size <= 0 || w.N > 0x7fffffff) return cudaErrorInvalidValue;
  const unsigned threads = static_cast<unsigned>(std::min<int64_t>(256, ((w.Hkv * w.D + 31) / 32) * 32));
  switch (element_bytes) {
    case 2: write_kv_cache_kernel<uint16_t><<<static_cast<unsigned>(w.N), threads, 0, stream>>>(w); break;
    case 4: write_kv_cache_kernel<uint32_t><<<static_cast<unsigned>(w.N), threads, 0, stream>>>(w); break;
    default: return cudaErrorInvalidValue;
  }
  return cudaGetLastError();
}

}  // namespace msmartcompute::cuda
