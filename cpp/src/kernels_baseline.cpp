// The kernels compiled for the baseline of the target architecture (x86-64: SSE2),
// always present and last in the dispatch order.
#include <algorithm>
#include <cstdint>
#include <cstring>
#include <utility>
#include <vector>

#include "kernels.hpp"

#if defined(__SSE2__)
#include <emmintrin.h>  // non-temporal stores, part of baseline x86-64
#endif

#define BATCHNORM_KERNEL_ISA "baseline"
#define BATCHNORM_KERNEL_FMA 0
#define BATCHNORM_KERNEL_SIMD 0
#define BATCHNORM_KERNEL_F16C 0

namespace batchnorm::detail::baseline {
#include "kernels-inl.hpp"
}  // namespace batchnorm::detail::baseline
