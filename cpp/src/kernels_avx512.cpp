// The kernels compiled for AVX-512 F/BW/DQ/VL (x86-64-v4), inside a target region so that
// no other code in the library is compiled for it.
#include "isa_region.hpp"
#include "kernels.hpp"

#if BATCHNORM_HAVE_TARGETS
// GCC 12's avx512fintrin.h makes "undefined" vectors from self-initialized variables,
// which -Wmaybe-uninitialized reports wherever they are inlined; not a defect here.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wuninitialized"  // GCC 12's _mm512_extractf64x4_pd
#endif
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#define BATCHNORM_KERNEL_ISA "avx512"
#define BATCHNORM_KERNEL_FMA 1
#define BATCHNORM_KERNEL_SIMD 512
#define BATCHNORM_KERNEL_F16C 1

BATCHNORM_TARGET_BEGIN("avx512f,avx512bw,avx512dq,avx512vl,avx2,fma,f16c,bmi2")
namespace batchnorm::detail::avx512 {
#include "kernels-inl.hpp"
}  // namespace batchnorm::detail::avx512
BATCHNORM_TARGET_END
#else
namespace batchnorm::detail::avx512 {
const Tables* tables() { return nullptr; }
}  // namespace batchnorm::detail::avx512
#endif
