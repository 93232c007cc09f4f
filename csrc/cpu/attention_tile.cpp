// The hot loops of the CPU attention tile (declared in attention_tile.h), where the time goes:
// the block products and the exponentials, on fp32 buffers.
#include "attention_tile.h"

#include <cstdint>

namespace msmartcompute::cpu {

// On x86-64 GCC builds clones for AVX-512 and AVX2 + FMA, picked at load time (so the build still
// runs on any x86-64); the fixed-width inner loops keep their accumulators in vector registers.
// no-trapping-math lets GCC if-convert the clamp in exp_nonpositive, so its loop vectorizes.
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MSC_HOT \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("no-trapping-math")))
#else
#define MSC_HOT
#endif

#define MSC_INLINE inline __attribute__((always_inline))

constexpr int64_t kChunk = 64;  // head-dim columns accumulated in registers at a time

// s[r][:] = q[r] . kt for r < nq over all kBlockK keys (kt is zero past the block's keys).
// Four rows at a time, so each loaded row of kt feeds four rows of accumulators.
MSC_HOT void block_scores(const float* q,  // [nq][D]
                          const float* kt, // [D][kBlockK]
                          float* s,        // [nq][kBlockK]
                          int64_t nq, int64_t D) {
  int64_t r = 0;
  for (; r + 4 <= nq; r += 4) {
    float sr[4][kBlockK] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float* kr = kt + d * kBlockK;
      const float q0 = q[r * D + d], q1 = q[(r + 1) * D + d], q2 = q[(r + 2) * D + d], q3 = q[(r + 3) * D + d];
      for (int64_t j = 0; j < kBlockK; ++j) {
        sr[0][j] += q0 * kr[j];
        sr[1][j] += q1 * kr[j];
        sr[2][j] += q2 * kr[j];
        sr[3][j] += q3 * kr[j];
      }
    }
    for (int64_t i = 0; i < 4; ++i)
      for (int64_t j = 0; j < kBlockK; ++j) s[(r + i) * kBlockK + j] = sr[i][j];
  }
  for (; r < nq; ++r) {
    float sr[kBlockK] = {};
    for (int64_t d = 0; d < D; ++d) {
      const float qd = q[r * D + d];
      const float* kr = kt + d * kBlockK;
      for (int64_t j = 0; j < kBlockK; ++j) sr[j] += qd * kr[j];
    }
    for (int64_t j = 0; j < kBlockK; ++j) s[r * kBlockK + j] = sr[j];
  }
}

// exp(x) for x <= 0 in a form that vectorizes: 2^n * e^f with |f| <= ln2 / 2 and a degree-6
// polynomial for e^f (Cephes expf, about 1 ulp); below -87 it returns about 1e-38, not 0.
MSC_INLINE float exp_nonpositive(float x) {
  x = x < -87.f ? -87.f : x;
  const float n = __builtin_floorf(x * 1.44269504088896341f + 0.5f);
  const float f = x - n * 0.693359375f + n * 2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * f + 1.3981999507e-3f;
  y = y * f + 8.3334519073e-3f;
  y = y * f + 4.1665795894e-2f;
  y = y * f + 1.6666665459e-1f;
  y = y * f + 5.0000001201e-1f;
  y = y * f * f + f + 1.f;
  union {  // 2^n from its bits (GCC defines union punning; its vectorizer takes this, not bit_cast)
    int32_t i;
    float f;
  } two_n;
  two_n.i = (static_cast<int32_t>(n) + 127) << 23;
  return y * two_n.f;
}

// p[j] = exp(p[j] - max) for j < n; returns their sum. Two loops: the first vectorizes, a
// float sum in the same loop would not (it may not be reordered).
MSC_HOT float exp_shifted(float* p, int64_t n, float max) {
  for (int64_t j = 0; j < n; ++j) p[j] = exp_nonpositive(p[j] - max);
  float sum = 0.f;
  for (int64_t j = 0; j < n; ++j) sum += p[j];
  return sum;
}

// acc[r][:] += sum_j p[r][j] * v[j][:] for r < nq, j < nk; four rows at a time share each
// loaded row of v, and kChunk head-dim columns stay in registers across the keys.
MSC_HOT void block_accumulate(const float* p,  // [nq][kBlockK]
                              const float* v,  // [nk][D]
                              float* acc,      // [nq][D]
                              int64_t nq, int64_t nk, int64_t D) {
  int64_t r = 0;
  for (; r + 4 <= nq; r += 4) {
    int64_t c = 0;
    for (; c + kChunk <= D; c += kChunk) {
      float a[4][kChunk];
      for (int64_t i = 0; i < 4; ++i)
        for (int64_t x = 0; x < kChunk; ++x) a[i][x] = acc[(r + i) * D + c + x];
      for (int64_t j = 0; j < nk; ++j) {
        const float* vr = v + j * D + c;
        const float p0 = p[r * kBlockK + j], p1 = p[(r + 1) * kBlockK + j], p2 = p[(r + 2) * kBlockK + j],
                    p3 = p[(r + 3) * kBlockK + j];
        for (int64_t x = 0; x < kChunk; ++x) {
          a[0][x] += p0 * vr[x];
          a[1][x] += p1 * vr[x];
          a[2][x] += p2 * vr[x];
          a[3][x] += p3 * vr[x];
        }
      }
      for (int64_t i = 0; i < 4; ++i)
        for (int64_t x = 0; x < kChunk; ++x) acc[(r + i) * D + c + x] = a[i][x];
    }
    for (int64_t i = 0; i < 4 && c < D; ++i)  // head dims that are not a multiple of kChunk
      for (int64_t j = 0; j < nk; ++j)
        for (int64_t x = c; x < D; ++x) acc[(r + i) * D + x] += p[(r + i) * kBlockK + j] * v[j * D + x];
  }
  for (; r < nq; ++r) {
    for (int64_t j = 0; j < nk; ++j) {
      const float pj = p[r * kBlockK + j];
      const float* vr = v + j * D;
      float* a = acc + r * D;
      for (int64_t x = 0; x < D; ++x) a[x] += pj * vr[x];
    }
  }
}

}  // namespace msmartcompute::cpu
