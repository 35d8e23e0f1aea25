// Element types, their accumulation types, and the exceptions of the C++ API.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "batchnorm/export.hpp"

namespace batchnorm {

using index_t = std::int64_t;
using Shape = std::vector<index_t>;
/// Strides in elements (not bytes); may be negative or zero. Empty means C-contiguous.
using Strides = std::vector<index_t>;
/// Feature axes: kept by the statistics; negative values count from the end.
using Axes = std::vector<int>;

/// A bad value or shape (Python: ValueError).
class BATCHNORM_API value_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A wrong type or dtype (Python: TypeError).
class BATCHNORM_API type_error : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

/// A long call stopped because the interrupt check said so (see set_interrupt_check;
/// Python: the exception the signal handler raised, KeyboardInterrupt for Ctrl-C).
class BATCHNORM_API interrupted : public std::runtime_error {
 public:
  interrupted() : std::runtime_error("interrupted") {}
};

namespace detail {
template <class To, class From>
inline To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast needs equal sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}
}  // namespace detail

/// IEEE 754 binary16, stored as its bits. Converts exactly to float and back with
/// round-to-nearest-even (what F16C's vcvtps2ph does).
struct BATCHNORM_API float16_t {
  std::uint16_t bits = 0;

  float16_t() = default;
  explicit float16_t(float f) : bits(from_float(f)) {}
  explicit operator float() const { return to_float(bits); }

  static float to_float(std::uint16_t h) {
    const std::uint32_t sign = static_cast<std::uint32_t>(h & 0x8000u) << 16;
    const std::uint32_t exponent = (h >> 10) & 0x1fu;
    const std::uint32_t mantissa = h & 0x3ffu;
    if (exponent == 0) {  // zero or subnormal: mantissa * 2^-24, exact in float
      const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
      return sign ? -magnitude : magnitude;
    }
    const std::uint32_t bits =
        exponent == 0x1f ? sign | 0x7f800000u | (mantissa << 13) : sign | ((exponent + 112u) << 23) | (mantissa << 13);
    return detail::bit_cast<float>(bits);
  }

  static std::uint16_t from_float(float f) {
    std::uint32_t x = detail::bit_cast<std::uint32_t>(f);
    const auto sign = static_cast<std::uint16_t>((x >> 16) & 0x8000u);
    x &= 0x7fffffffu;
    if (x > 0x7f800000u)  // NaN: keep it quiet and keep the top payload bits
      return static_cast<std::uint16_t>(sign | 0x7e00u | ((x >> 13) & 0x3ffu));
    if (x >= 0x477ff000u)  // >= 65520 rounds to infinity
      return static_cast<std::uint16_t>(sign | 0x7c00u);
    if (x < 0x38800000u) {  // below 2^-14: adding 0.5 rounds to a multiple of 2^-24 (RNE)
      const float shifted = detail::bit_cast<float>(x) + 0.5f;
      return static_cast<std::uint16_t>(sign | (detail::bit_cast<std::uint32_t>(shifted) - 0x3f000000u));
    }
    const std::uint32_t odd = (x >> 13) & 1u;  // rebias the exponent, round half to even
    x += 0xc8000fffu + odd;
    return static_cast<std::uint16_t>(sign | (x >> 13));
  }
};

/// bfloat16 (the top half of a float32), stored as its bits; round-to-nearest-even.
struct BATCHNORM_API bfloat16_t {
  std::uint16_t bits = 0;

  bfloat16_t() = default;
  explicit bfloat16_t(float f) : bits(from_float(f)) {}
  explicit operator float() const { return to_float(bits); }

  static float to_float(std::uint16_t b) { return detail::bit_cast<float>(static_cast<std::uint32_t>(b) << 16); }
  static std::uint16_t from_float(float f) {
    const std::uint32_t x = detail::bit_cast<std::uint32_t>(f);
    if ((x & 0x7fffffffu) > 0x7f800000u) return static_cast<std::uint16_t>((x >> 16) | 0x40u);
    return static_cast<std::uint16_t>((x + 0x7fffu + ((x >> 16) & 1u)) >> 16);
  }
};

/// The type of per-channel statistics and parameters for element type T:
/// float for float and the 16-bit types, double for double.
template <class T>
using stat_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

template <class T>
inline constexpr bool is_element_v = std::is_same_v<T, float> || std::is_same_v<T, double> ||
                                     std::is_same_v<T, float16_t> || std::is_same_v<T, bfloat16_t>;

/// An activation fused into the normalization pass.
enum class Activation { none, relu };

}  // namespace batchnorm
