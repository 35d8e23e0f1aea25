// Threads and build information.
#include "batchnorm/runtime.hpp"

#include <atomic>
#include <string>

#include "batchnorm/types.hpp"
#include "threads.hpp"

#if BATCHNORM_OPENMP
#include <omp.h>
#endif

#if BATCHNORM_OPENMP && (defined(__unix__) || defined(__APPLE__))
#include <pthread.h>
#define BATCHNORM_ATFORK 1
#else
#define BATCHNORM_ATFORK 0
#endif

#ifndef BATCHNORM_VERSION
#define BATCHNORM_VERSION "0.0.0"
#endif

namespace batchnorm {
namespace detail {
// set_num_threads stores the count with a new generation; each calling thread applies it
// to its own OpenMP state (which is per thread) the first time it sees that generation.
std::atomic<int> g_threads{0};
std::atomic<unsigned> g_generation{0};
thread_local unsigned t_generation = 0;

// After fork() only the forking thread exists in the child, but libgomp still believes its
// pool does, and the child's first team waits for those threads for ever. So a child forked
// after a team ran uses one thread (as PyTorch's and OpenBLAS's pools do after fork).
std::atomic<bool> g_team_ran{false};
std::atomic<bool> g_single{false};

void note_team() {
  if (!g_team_ran.load(std::memory_order_relaxed)) g_team_ran.store(true, std::memory_order_relaxed);
}

#if BATCHNORM_ATFORK
namespace {
void in_child() {
  if (g_team_ran.load(std::memory_order_relaxed)) g_single.store(true, std::memory_order_relaxed);
}
[[maybe_unused]] const int g_atfork = pthread_atfork(nullptr, nullptr, in_child);
}  // namespace
#endif

thread_local PassStop* t_pass = nullptr;
thread_local bool t_pass_caller = false;
std::atomic<bool (*)()> g_interrupt_check{nullptr};

bool interrupt_requested() {
  bool (*check)() = g_interrupt_check.load(std::memory_order_acquire);
  return check && check();
}

int threads() {
  if (g_single.load(std::memory_order_relaxed)) return 1;
  const unsigned gen = g_generation.load(std::memory_order_acquire);
  if (gen != t_generation) {
    t_generation = gen;
#if BATCHNORM_OPENMP
    omp_set_num_threads(g_threads.load(std::memory_order_relaxed));
#endif
  }
#if BATCHNORM_OPENMP
  return omp_get_max_threads();
#else
  const int n = g_threads.load(std::memory_order_relaxed);
  return n > 0 ? n : 1;
#endif
}

}  // namespace detail

int get_num_threads() { return detail::threads(); }

void set_num_threads(int n) {
  if (n < 1) throw value_error("set_num_threads needs n >= 1, got " + std::to_string(n));
  detail::g_threads.store(n, std::memory_order_relaxed);
  // The calling thread applies it now, so a later threadpoolctl limit on this thread wins.
  detail::t_generation = detail::g_generation.fetch_add(1, std::memory_order_release) + 1;
#if BATCHNORM_OPENMP
  omp_set_num_threads(n);
#endif
}

void set_interrupt_check(bool (*check)()) { detail::g_interrupt_check.store(check, std::memory_order_release); }

std::string version() { return BATCHNORM_VERSION; }

std::string compiler() {
#if defined(__clang__)
  return std::string("Clang ") + __clang_version__;
#elif defined(__GNUC__)
  return "GCC " + std::to_string(__GNUC__) + "." + std::to_string(__GNUC_MINOR__) + "." +
         std::to_string(__GNUC_PATCHLEVEL__);
#elif defined(_MSC_VER)
  return "MSVC " + std::to_string(_MSC_VER);
#else
  return "unknown";
#endif
}

bool has_openmp() { return BATCHNORM_OPENMP != 0; }

}  // namespace batchnorm
