// Static partitions for OpenMP: the work is split into contiguous, equal ranges by thread
// number, so what each thread computes, and the order partial results are merged in,
// depend only on the thread count. (Elementwise passes may also hand out pieces in turn,
// map_pass: no value depends on which thread computes it.)
#pragma once

#include <algorithm>
#include <atomic>
#include <chrono>

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

/// Passes over at least this many values can be interrupted (set_interrupt_check): shorter
/// ones take a few milliseconds at most, and skip reading the clock.
constexpr index_t kInterruptibleValues = index_t{1} << 22;
constexpr std::chrono::milliseconds kInterruptCheckInterval{50};

/// What the threads of one interruptible pass share: whether to stop, and when the calling
/// thread asks the interrupt check next.
struct PassStop {
  std::atomic<bool> stop{false};
  std::chrono::steady_clock::time_point next = std::chrono::steady_clock::now() + kInterruptCheckInterval;
};

/// The pass the current thread works for (null: not interruptible), and whether it is the
/// calling thread (the one that may run the check, e.g. Python's signal handlers).
extern thread_local PassStop* t_pass;
extern thread_local bool t_pass_caller;

/// Asks the check set by set_interrupt_check (false if none).
bool interrupt_requested();

/// Between chunks of work: whether the pass should stop (see set_interrupt_check).
inline bool stop_requested() {
  PassStop* pass = t_pass;
  if (!pass) return false;
  if (t_pass_caller && std::chrono::steady_clock::now() >= pass->next) {
    pass->next = std::chrono::steady_clock::now() + kInterruptCheckInterval;
    if (interrupt_requested()) pass->stop.store(true, std::memory_order_relaxed);
  }
  return pass->stop.load(std::memory_order_relaxed);
}

// Sets t_pass and t_pass_caller for the scope of one thread's part of a pass.
class PassScope {
 public:
  PassScope(PassStop* pass, bool caller) : pass_(t_pass), caller_(t_pass_caller) {
    t_pass = pass;
    t_pass_caller = caller;
  }
  ~PassScope() {
    t_pass = pass_;
    t_pass_caller = caller_;
  }
  PassScope(const PassScope&) = delete;
  PassScope& operator=(const PassScope&) = delete;

 private:
  PassStop* pass_;
  bool caller_;
};

/// The range [begin, end) of `total` items for part t of n.
inline void partition(index_t total, int t, int n, index_t& begin, index_t& end) {
  begin = total * t / n;
  end = total * (t + 1) / n;
}

/// Calls f(t, n) for t in [0, n) on n threads (the current thread if n == 1). f must not throw.
/// A pass over at least kInterruptibleValues `values` can be interrupted: f's loops ask
/// stop_requested() between chunks, and then this throws `interrupted` once all have returned.
/// Without `values`, not interruptible.
template <class F>
void parallel([[maybe_unused]] int n, index_t values, const F& f) {
  if (values < kInterruptibleValues) {
#if BATCHNORM_OPENMP
    if (n > 1) {
      note_team();
#pragma omp parallel num_threads(n)
      f(omp_get_thread_num(), omp_get_num_threads());
      return;
    }
#endif
    return f(0, 1);
  }
  PassStop pass;
#if BATCHNORM_OPENMP
  if (n > 1) {
    note_team();
#pragma omp parallel num_threads(n)
    {
      const PassScope scope(&pass, omp_get_thread_num() == 0);
      f(omp_get_thread_num(), omp_get_num_threads());
    }
  } else
#endif
  {
    const PassScope scope(&pass, true);
    f(0, 1);
  }
  if (pass.stop.load(std::memory_order_relaxed)) throw interrupted();
}
template <class F>
void parallel(int n, const F& f) {
  parallel(n, 0, f);
}

}  // namespace batchnorm::detail
