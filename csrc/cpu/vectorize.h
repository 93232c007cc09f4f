// MSC_HOT marks a CPU hot loop: on x86-64 GCC builds clones for AVX-512 and AVX2 + FMA,
// picked at load time (so the build still runs on any x86-64). no-trapping-math lets GCC
// if-convert clamps, so their loops vectorize.
#pragma once

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__)
#define MSC_HOT \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default"), optimize("no-trapping-math")))
#else
#define MSC_HOT
#endif
