// What kernels_avx2.cpp and kernels_avx512.cpp share: each defines
//   BATCHNORM_KERNEL_NS      its namespace under batchnorm::detail, also the ISA's name
//   BATCHNORM_KERNEL_TARGET  the target region's features, e.g. "avx2,fma,f16c,bmi2"
//   BATCHNORM_KERNEL_SIMD    the vector width in bits (see simd-inl.hpp)
// and includes this file, which compiles kernels-inl.hpp for that target (with FMA and
// F16C, which every such target has), or gives a null table where the compiler has no
// target regions. Included once per translation unit.
#pragma once

#include "isa_region.hpp"
#include "kernels.hpp"

#if BATCHNORM_HAVE_TARGETS
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#define BATCHNORM_KERNEL_STR_(x) #x
#define BATCHNORM_KERNEL_STR(x) BATCHNORM_KERNEL_STR_(x)
#define BATCHNORM_KERNEL_ISA BATCHNORM_KERNEL_STR(BATCHNORM_KERNEL_NS)
#define BATCHNORM_KERNEL_FMA 1
#define BATCHNORM_KERNEL_F16C 1

BATCHNORM_TARGET_BEGIN(BATCHNORM_KERNEL_TARGET)
namespace batchnorm::detail::BATCHNORM_KERNEL_NS {
#include "kernels-inl.hpp"
}  // namespace batchnorm::detail::BATCHNORM_KERNEL_NS
BATCHNORM_TARGET_END
#else
namespace batchnorm::detail::BATCHNORM_KERNEL_NS {
const Tables* tables() { return nullptr; }
}  // namespace batchnorm::detail::BATCHNORM_KERNEL_NS
#endif
