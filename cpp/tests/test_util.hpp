// Helpers shared by the C++ tests: element types and their precision, conversions,
// strided buffers with guard values in their gaps, random data, and comparisons.
#pragma once

#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <string>
#include <type_traits>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "batchnorm/reference.hpp"

namespace bntest {

using batchnorm::bfloat16_t;
using batchnorm::float16_t;
using batchnorm::index_t;
using batchnorm::Shape;
using batchnorm::Strides;

using ElementTypes = ::testing::Types<float, double, float16_t, bfloat16_t>;

struct TypeNames {
  template <class T>
  static std::string GetName(int) {
    if constexpr (std::is_same_v<T, float>)
      return "float32";
    else if constexpr (std::is_same_v<T, double>)
      return "float64";
    else if constexpr (std::is_same_v<T, float16_t>)
      return "float16";
    else
      return "bfloat16";
  }
};

// Element <-> double conversions: the oracle's own, so tests and reference agree on them.
template <class T>
double to_d(T v) {
  return batchnorm::reference::detail::to_double(v);
}

template <class T>
T from_d(double v) {
  return batchnorm::reference::detail::from_double<T>(v);
}

/// Unit roundoff of the storage type T (half an ulp, relative).
template <class T>
constexpr double unit_roundoff() {
  if constexpr (std::is_same_v<T, double>)
    return 0x1p-53;
  else if constexpr (std::is_same_v<T, float>)
    return 0x1p-24;
  else if constexpr (std::is_same_v<T, float16_t>)
    return 0x1p-11;
  else
    return 0x1p-8;
}

/// Half an ulp of T at magnitude |v|: the largest error of rounding a value of that
/// magnitude to T (subnormals included).
template <class T>
double half_ulp(double v) {
  constexpr int precision = std::is_same_v<T, double>      ? 53
                            : std::is_same_v<T, float>     ? 24
                            : std::is_same_v<T, float16_t> ? 11
                                                           : 8;
  constexpr int emin = std::is_same_v<T, double> ? -1022 : std::is_same_v<T, float16_t> ? -14 : -126;
  int e = 0;
  std::frexp(std::fabs(v), &e);  // |v| = f * 2^e, f in [0.5, 1): the exponent of v is e - 1
  return std::ldexp(0.5, std::max(e - 1, emin) - (precision - 1));
}

/// Unit roundoff of the compute type of T (float, or double for double).
template <class T>
constexpr double compute_roundoff() {
  return std::is_same_v<T, double> ? 0x1p-53 : 0x1p-24;
}

/// The neighbours of a value in T (finite, non-zero values only).
template <class T>
T next_up(T v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return std::nextafter(v, std::numeric_limits<T>::infinity());
  } else {
    T r = v;
    r.bits = static_cast<std::uint16_t>((v.bits & 0x8000u) ? v.bits - 1 : v.bits + 1);
    return r;
  }
}
template <class T>
T next_down(T v) {
  if constexpr (std::is_same_v<T, float> || std::is_same_v<T, double>) {
    return std::nextafter(v, -std::numeric_limits<T>::infinity());
  } else {
    T r = v;
    r.bits = static_cast<std::uint16_t>((v.bits & 0x8000u) ? v.bits + 1 : v.bits - 1);
    return r;
  }
}

/// The bits of a value, for bitwise comparisons (NaN == NaN, -0 != +0).
template <class T>
std::uint64_t bits_of(T v) {
  std::uint64_t b = 0;
  std::memcpy(&b, &v, sizeof v);
  return b;
}

inline std::size_t numel(const Shape& shape) {
  index_t n = 1;
  for (index_t s : shape) n *= s;
  return static_cast<std::size_t>(n);
}

inline Strides contiguous(const Shape& shape) {
  Strides s(shape.size());
  index_t step = 1;
  for (std::size_t d = shape.size(); d-- > 0;) {
    s[d] = step;
    step *= std::max<index_t>(shape[d], 1);
  }
  return s;
}

/// Strides of a view: dims laid out in memory in `order` (outermost first), dimension d
/// taking every step[d]-th element of a larger buffer, dims with flip[d] reversed.
/// Empty order/step/flip mean C order, 1, no flip.
inline Strides make_strides(const Shape& shape, std::vector<int> order = {}, std::vector<index_t> step = {},
                            std::vector<bool> flip = {}) {
  const std::size_t n = shape.size();
  if (order.empty())
    for (std::size_t d = 0; d < n; ++d) order.push_back(static_cast<int>(d));
  if (step.empty()) step.assign(n, 1);
  if (flip.empty()) flip.assign(n, false);
  Strides s(n);
  index_t extent = 1;
  for (std::size_t k = n; k-- > 0;) {
    const auto d = static_cast<std::size_t>(order[k]);
    s[d] = extent * step[d];
    extent *= std::max<index_t>(shape[d], 1) * step[d];
  }
  for (std::size_t d = 0; d < n; ++d)
    if (flip[d]) s[d] = -s[d];
  return s;
}

using batchnorm::reference::detail::for_each_index;
using batchnorm::reference::detail::offset_of;

/// Memory for one strided view: exactly the span the view touches (so that ASan sees any
/// access outside it), with data() pointing at element (0, ..., 0). Elements of the span
/// that are not in the view (gaps) hold a guard pattern, checked by gaps_intact().
template <class T>
class Buffer {
 public:
  Buffer(Shape shape, Strides strides) : shape_(std::move(shape)), strides_(std::move(strides)) {
    if (strides_.empty()) strides_ = contiguous(shape_);
    index_t lo = 0, hi = 0;
    bool empty = false;
    for (std::size_t d = 0; d < shape_.size(); ++d) {
      if (shape_[d] == 0) empty = true;
      const index_t far = (shape_[d] - 1) * strides_[d];
      (far < 0 ? lo : hi) += far;
    }
    origin_ = empty ? 0 : -lo;
    mem_.resize(empty ? 1 : static_cast<std::size_t>(hi - lo + 1));
    for (std::size_t i = 0; i < mem_.size(); ++i)
      std::memcpy(static_cast<void*>(&mem_[i]), &kGuard, sizeof(T) < 8 ? sizeof(T) : 8);
    guard_ = mem_;
  }

  T* data() { return mem_.data() + origin_; }
  const T* data() const { return mem_.data() + origin_; }
  const Shape& shape() const { return shape_; }
  const Strides& strides() const { return strides_; }
  T& at(const std::vector<index_t>& i) { return data()[offset_of(i, strides_)]; }
  const T& at(const std::vector<index_t>& i) const { return data()[offset_of(i, strides_)]; }

  /// The view's values in C order.
  std::vector<T> values() const {
    std::vector<T> out;
    for_each_index(shape_, [&](const std::vector<index_t>& i) { out.push_back(at(i)); });
    return out;
  }
  /// Sets the view's values from a C-order vector.
  void set(const std::vector<T>& v) {
    std::size_t k = 0;
    for_each_index(shape_, [&](const std::vector<index_t>& i) { at(i) = v[k++]; });
  }

  /// Whether every element outside the view still holds the guard pattern.
  bool gaps_intact() const {
    std::vector<bool> in_view(mem_.size(), false);
    for_each_index(shape_, [&](const std::vector<index_t>& i) {
      in_view[static_cast<std::size_t>(origin_ + offset_of(i, strides_))] = true;
    });
    for (std::size_t i = 0; i < mem_.size(); ++i)
      if (!in_view[i] && std::memcmp(&mem_[i], &guard_[i], sizeof(T)) != 0) return false;
    return true;
  }

 private:
  static constexpr std::uint64_t kGuard = 0x7ff4dead7fc1beefULL;
  Shape shape_;
  Strides strides_;
  std::vector<T> mem_, guard_;
  index_t origin_ = 0;
};

/// n draws of dist, rounded to T.
template <class T, class Dist>
std::vector<T> draw(std::size_t n, Dist dist, std::mt19937_64& rng) {
  std::vector<T> v(n);
  for (auto& x : v) x = from_d<T>(dist(rng));
  return v;
}

template <class T>
std::vector<T> normal(std::size_t n, double mean, double stddev, std::mt19937_64& rng) {
  return draw<T>(n, std::normal_distribution<double>(mean, stddev), rng);
}

template <class T>
std::vector<T> uniform(std::size_t n, double lo, double hi, std::mt19937_64& rng) {
  return draw<T>(n, std::uniform_real_distribution<double>(lo, hi), rng);
}

/// |got - want| <= atol + rtol * |want| for every element, with a message naming the first few failures.
template <class A, class B>
::testing::AssertionResult all_close(const std::vector<A>& got, const std::vector<B>& want, double rtol, double atol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes differ: " << got.size() << " vs " << want.size();
  int bad = 0;
  std::string msg;
  double worst = 0;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = to_d(got[i]), w = to_d(want[i]);
    const double err = std::fabs(g - w);
    const double tol = atol + rtol * std::fabs(w);
    const bool ok = err <= tol || (std::isnan(g) && std::isnan(w)) || (std::isinf(w) && g == w);
    if (!ok) {
      worst = std::max(worst, err / tol);
      if (bad++ < 5)
        msg += "\n  [" + std::to_string(i) + "] got " + std::to_string(g) + " want " + std::to_string(w) + " (err " +
               std::to_string(err) + " > tol " + std::to_string(tol) + ")";
    }
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ (worst err/tol " << worst
                                       << "):" << msg;
}

/// got (in T) against want (in double): within the rounding to T of a value within atol of
/// want (half an ulp of T, taken one binade up near a binade's top) plus atol.
template <class T>
::testing::AssertionResult all_close_rounded(const std::vector<T>& got, const std::vector<double>& want, double atol) {
  if (got.size() != want.size())
    return ::testing::AssertionFailure() << "sizes differ: " << got.size() << " vs " << want.size();
  int bad = 0;
  std::string msg;
  for (std::size_t i = 0; i < got.size(); ++i) {
    const double g = to_d(got[i]), w = want[i];
    const double tol = half_ulp<T>((std::fabs(w) + atol) * (1 + 0x1p-20)) + atol;
    const bool ok = std::fabs(g - w) <= tol || (std::isnan(g) && std::isnan(w)) || (std::isinf(w) && g == w);
    if (!ok && bad++ < 5)
      msg += "\n  [" + std::to_string(i) + "] got " + std::to_string(g) + " want " + std::to_string(w) + " (err " +
             std::to_string(std::fabs(g - w)) + " > tol " + std::to_string(tol) + ")";
  }
  if (bad == 0) return ::testing::AssertionSuccess();
  return ::testing::AssertionFailure() << bad << " of " << got.size() << " elements differ:" << msg;
}

template <class A>
double max_abs(const std::vector<A>& v) {
  double m = 0;
  for (const auto& x : v) m = std::max(m, std::fabs(to_d(x)));
  return m;
}

/// Bitwise equality of two vectors.
template <class A>
::testing::AssertionResult bitwise_equal(const std::vector<A>& a, const std::vector<A>& b) {
  if (a.size() != b.size()) return ::testing::AssertionFailure() << "sizes differ";
  for (std::size_t i = 0; i < a.size(); ++i)
    if (std::memcmp(&a[i], &b[i], sizeof(A)) != 0)
      return ::testing::AssertionFailure() << "element " << i << " differs: " << to_d(a[i]) << " vs " << to_d(b[i]);
  return ::testing::AssertionSuccess();
}

/// Restores the library's thread count at scope exit.
class ThreadGuard {
 public:
  ThreadGuard() : saved_(batchnorm::get_num_threads()) {}
  ~ThreadGuard() { batchnorm::set_num_threads(saved_); }
  ThreadGuard(const ThreadGuard&) = delete;
  ThreadGuard& operator=(const ThreadGuard&) = delete;

 private:
  int saved_;
};

}  // namespace bntest
