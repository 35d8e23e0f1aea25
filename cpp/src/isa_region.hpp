// Opens and closes a target region for one instruction set (GCC and Clang): every
// function defined between BATCHNORM_TARGET_BEGIN and BATCHNORM_TARGET_END is compiled
// for it, nothing else is. Defines BATCHNORM_HAVE_TARGETS where this is supported.
#pragma once

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#define BATCHNORM_HAVE_TARGETS 1
#define BATCHNORM_PRAGMA(x) _Pragma(#x)
#if defined(__clang__)
#define BATCHNORM_TARGET_BEGIN(isa) \
  BATCHNORM_PRAGMA(clang attribute push(__attribute__((target(isa))), apply_to = function))
#define BATCHNORM_TARGET_END BATCHNORM_PRAGMA(clang attribute pop)
#else
#define BATCHNORM_TARGET_BEGIN(isa) BATCHNORM_PRAGMA(GCC push_options) BATCHNORM_PRAGMA(GCC target(isa))
#define BATCHNORM_TARGET_END BATCHNORM_PRAGMA(GCC pop_options)
#endif
#else
#define BATCHNORM_HAVE_TARGETS 0
#endif
