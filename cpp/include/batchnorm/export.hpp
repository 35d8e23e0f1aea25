// BATCHNORM_API: marks the public, non-inline symbols of the library (functions, the
// explicit instantiations of the function templates, the types their instantiations and
// exceptions depend on), so that a shared build exports them although everything else is
// compiled with hidden visibility.
//
// CMake defines BATCHNORM_SHARED_DEFINE for the library and its users when the library is
// shared (BUILD_SHARED_LIBS=ON), and batchnorm_EXPORTS while it builds the library itself.
// A static library defines neither: BATCHNORM_API is then empty, and the symbols stay
// hidden, so that a shared object linking the static library (the Python module) does not
// re-export them.
#pragma once

#if defined(BATCHNORM_SHARED_DEFINE)
#if defined(_WIN32) || defined(__CYGWIN__)
#if defined(batchnorm_EXPORTS)
#define BATCHNORM_API __declspec(dllexport)
#else
#define BATCHNORM_API __declspec(dllimport)
#endif
#elif defined(__GNUC__) || defined(__clang__)
#define BATCHNORM_API __attribute__((visibility("default")))
#else
#define BATCHNORM_API
#endif
#else
#define BATCHNORM_API
#endif
