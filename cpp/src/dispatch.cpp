// Picks the kernel table once: the best instruction set that is compiled in, that the CPU
// (and the OS, for the AVX register state) supports, and that BATCHNORM_MAX_ISA allows.
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#include "batchnorm/runtime.hpp"
#include "isa_region.hpp"
#include "kernels.hpp"

#if BATCHNORM_HAVE_TARGETS
#include <cpuid.h>
#endif

namespace batchnorm {
namespace detail {
namespace {

// tables() of a per-ISA namespace is compiled inside that ISA's target region, and the
// compiler vectorizes even the table's construction with it: it may be called only once
// supported() said yes, or a CPU without that ISA dies of SIGILL. Whether it is compiled in
// at all is `compiled` (kernels_<isa>.cpp define real tables exactly when
// BATCHNORM_HAVE_TARGETS), so that compiled_isas() need not call it.
struct Candidate {
  const char* name;
  const Tables* (*tables)();
  bool (*supported)();
  bool compiled;
};

// F16C from CPUID leaf 1 (ECX bit 29): Clang's __builtin_cpu_supports has no "f16c".
bool cpu_has_f16c() {
#if BATCHNORM_HAVE_TARGETS
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
#else
  return false;
#endif
}

bool cpu_has_avx2() {
#if BATCHNORM_HAVE_TARGETS
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && cpu_has_f16c() &&
         __builtin_cpu_supports("bmi2");
#else
  return false;
#endif
}

bool cpu_has_avx512() {
#if BATCHNORM_HAVE_TARGETS
  return cpu_has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl");
#else
  return false;
#endif
}

bool always() { return true; }

// Best first; the portable baseline is last and always usable.
const std::vector<Candidate>& candidates() {
  static const std::vector<Candidate> list{
      {"avx512", &avx512::tables, &cpu_has_avx512, BATCHNORM_HAVE_TARGETS != 0},
      {"avx2", &avx2::tables, &cpu_has_avx2, BATCHNORM_HAVE_TARGETS != 0},
      {"baseline", &baseline::tables, &always, true},
  };
  return list;
}

int rank_of(const std::string& name) {
  const auto& list = candidates();
  for (std::size_t i = 0; i < list.size(); ++i)
    if (name == list[i].name) return static_cast<int>(i);
  return -1;
}

// The choice, made once: the table, and the BATCHNORM_MAX_ISA cap it obeyed (null: none).
struct Choice {
  const Tables* tables;
  const char* cap;
};

Choice choose() {
  int cap = 0;
  const char* cap_name = nullptr;
  if (const char* env = std::getenv("BATCHNORM_MAX_ISA"); env && *env) {
    cap = rank_of(env);
    if (cap < 0) {
      std::fprintf(stderr, "batchnorm: ignoring BATCHNORM_MAX_ISA=%s (expected baseline, avx2 or avx512)\n", env);
      cap = 0;
    } else {
      cap_name = candidates()[static_cast<std::size_t>(cap)].name;
    }
  }
  const auto& list = candidates();
  for (std::size_t i = static_cast<std::size_t>(cap); i < list.size(); ++i)
    if (list[i].compiled && list[i].supported()) return {list[i].tables(), cap_name};
  return {baseline::tables(), cap_name};
}

const Choice& choice() {
  static const Choice c = choose();
  return c;
}

}  // namespace

const Tables& active_tables() { return *choice().tables; }

const Tables* tables_for(const std::string& isa) {
  for (const Candidate& c : candidates())
    if (isa == c.name) return c.compiled && c.supported() ? c.tables() : nullptr;
  return nullptr;
}

}  // namespace detail

std::vector<std::string> compiled_isas() {
  std::vector<std::string> out;
  for (const auto& c : detail::candidates())
    if (c.compiled) out.emplace_back(c.name);
  return out;
}

std::vector<std::string> supported_isas() {
  std::vector<std::string> out;
  for (const auto& c : detail::candidates())
    if (c.compiled && c.supported()) out.emplace_back(c.name);
  return out;
}

std::string active_isa() { return detail::active_tables().isa; }

std::string max_isa() {
  const char* cap = detail::choice().cap;
  return cap ? cap : "";
}

}  // namespace batchnorm
