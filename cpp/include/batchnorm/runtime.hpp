// Run-time configuration: threads, the instruction set in use, build information.
#pragma once

#include <cstddef>
#include <string>
#include <vector>

#include "batchnorm/export.hpp"

namespace batchnorm {

/// Threads the kernels use for work large enough to pay for them. Starts from
/// OpenMP's default (OMP_NUM_THREADS); set_num_threads applies to every thread that
/// calls into the library afterwards; a later omp_set_num_threads on the calling
/// thread (what threadpoolctl does) is honoured until the next set_num_threads.
/// A process forked after the library ran threads uses one thread for good (OpenMP's
/// thread pool does not survive fork()); get_num_threads then returns 1.
BATCHNORM_API int get_num_threads();
/// n >= 1; throws value_error otherwise. Without OpenMP the count is stored but one thread runs.
BATCHNORM_API void set_num_threads(int n);

/// The instruction sets this build can dispatch to, best first ("avx512", "avx2", "baseline").
BATCHNORM_API std::vector<std::string> compiled_isas();
/// Those the running CPU supports, best first.
BATCHNORM_API std::vector<std::string> supported_isas();
/// The one in use: the best supported one, capped by the environment variable
/// BATCHNORM_MAX_ISA (baseline|avx2|avx512) read once at first use.
BATCHNORM_API std::string active_isa();
/// The BATCHNORM_MAX_ISA cap that choice obeyed, or "" for none (unset, empty or not one of
/// the names): later changes of the environment variable change neither.
BATCHNORM_API std::string max_isa();

/// Copies `bytes` bytes with the library's threads, with ordinary or non-temporal stores:
/// the yardstick the benchmarks measure the kernels against. The ranges must not overlap.
BATCHNORM_API void copy_memory(const void* src, void* dst, std::size_t bytes, bool nontemporal);

/// A function that tells whether a long call should stop (e.g. a signal is pending), or
/// nullptr for none (the default). A call over kernels of more than 4 Mi values asks it
/// from the calling thread, between chunks, at most every 50 ms; when it returns true,
/// every thread stops after its current chunk and the call throws `interrupted`. Outputs
/// the call had begun to write are then partly written; nothing else is.
BATCHNORM_API void set_interrupt_check(bool (*check)());

/// Library version ("major.minor.patch").
BATCHNORM_API std::string version();
/// Compiler that built the library, e.g. "GCC 12.2.0".
BATCHNORM_API std::string compiler();
/// Whether the library was built with OpenMP.
BATCHNORM_API bool has_openmp();

}  // namespace batchnorm
