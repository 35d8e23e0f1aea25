// Static partitions for OpenMP: the work is split into contiguous, equal ranges by thread
// number, so what each thread computes, and the order partial results are merged in,
// depend only on the thread count.
#pragma once

#include <algorithm>

#include "batchnorm/types.hpp"

#if BATCHNORM_OPENMP
#include <omp.h>
#endif

namespace batchnorm::detail {

/// Threads the calling thread may use (see runtime.hpp); 1 in a child forked after a team ran.
int threads();

/// Records that an OpenMP team has run: a process forked after that runs single-threaded
/// (libgomp's pool does not survive fork(), and the child's first team would wait for it).
void note_team();

/// Elements below which one thread does the work: a parallel region costs a few
/// microseconds, about what one core needs to stream this many values.
constexpr index_t kParallelGrain = index_t{1} << 15;

/// Processors available to this process (1 without OpenMP).
inline int processors() {
#if BATCHNORM_OPENMP
  return omp_get_num_procs();
#else
  return 1;
#endif
}

/// Threads worth using for `elements` of work: at most threads(), at least one grain each,
/// and no more than 4 per processor (set_num_threads accepts any count; a team of
/// thousands of threads would only thrash).
inline int threads_for(index_t elements) {
  if (elements < 2 * kParallelGrain) return 1;  // without asking OpenMP (a system call) on tiny inputs
  const index_t by_size = std::max<index_t>(1, elements / kParallelGrain);
  const index_t cap = index_t{4} * std::max(1, processors());
  return static_cast<int>(std::min<index_t>({threads(), by_size, cap}));
}

/// The range [begin, end) of `total` items for part t of n.
inline void partition(index_t total, int t, int n, index_t& begin, index_t& end) {
  begin = total * t / n;
  end = total * (t + 1) / n;
}

/// Calls f(t, n) for t in [0, n) on n threads (the current thread if n == 1). f must not throw.
template <class F>
void parallel([[maybe_unused]] int n, const F& f) {
#if BATCHNORM_OPENMP
  if (n > 1) {
    note_team();
#pragma omp parallel num_threads(n)
    f(omp_get_thread_num(), omp_get_num_threads());
    return;
  }
#endif
  f(0, 1);
}

}  // namespace batchnorm::detail
