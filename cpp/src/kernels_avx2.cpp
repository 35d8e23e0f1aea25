// The kernels compiled for AVX2 + FMA + F16C (x86-64-v3), inside a target region so that
// no other code in the library is compiled for it.
#define BATCHNORM_KERNEL_NS avx2
#define BATCHNORM_KERNEL_TARGET "avx2,fma,f16c,bmi2"
#define BATCHNORM_KERNEL_SIMD 256
#include "kernels_target.hpp"
