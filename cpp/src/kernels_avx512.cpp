// The kernels compiled for AVX-512 F/BW/DQ/VL (x86-64-v4), inside a target region so that
// no other code in the library is compiled for it.
#if defined(__GNUC__) && !defined(__clang__)
// GCC 12's avx512fintrin.h makes "undefined" vectors from self-initialized variables,
// which -Wmaybe-uninitialized reports wherever they are inlined; not a defect here.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's _mm512_extractf64x4_pd
#endif

#define BATCHNORM_KERNEL_NS avx512
#define BATCHNORM_KERNEL_TARGET "avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2"
#define BATCHNORM_KERNEL_SIMD 512
#include "kernels_target.hpp"
