// The kernels compiled for AVX2 + FMA + F16C (x86-64-v3), inside a target region so that
// no other code in the library is compiled for it.
#include "isa_region.hpp"
#include "kernels.hpp"

#if BATCHNORM_HAVE_TARGETS
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#define BATCHNORM_KERNEL_ISA "avx2"
#define BATCHNORM_KERNEL_FMA 1
#define BATCHNORM_KERNEL_SIMD 256
#define BATCHNORM_KERNEL_F16C 1

BATCHNORM_TARGET_BEGIN("avx2,fma,f16c,bmi2")
namespace batchnorm::detail::avx2 {
#include "kernels-inl.hpp"
}  // namespace batchnorm::detail::avx2
BATCHNORM_TARGET_END
#else
namespace batchnorm::detail::avx2 {
const Tables* tables() { return nullptr; }
}  // namespace batchnorm::detail::avx2
#endif
