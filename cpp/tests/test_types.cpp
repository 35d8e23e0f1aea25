// float16_t and bfloat16_t: exact widening, round-to-nearest-even narrowing, NaN and
// overflow handling, checked exhaustively over the 16-bit patterns, at every halfway
// point, against an independent rounding written with frexp/nearbyint, and (where the CPU
// has F16C) against the hardware conversions the AVX2/AVX-512 kernels use.
#include <gtest/gtest.h>

#include <cfenv>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <random>
#include <type_traits>

#include "batchnorm/types.hpp"

#if (defined(__x86_64__) || defined(_M_X64)) && (defined(__GNUC__) || defined(__clang__))
#include <cpuid.h>
#include <immintrin.h>
#define BNTEST_HAVE_F16C_TARGET 1
#else
#define BNTEST_HAVE_F16C_TARGET 0
#endif

namespace {

using batchnorm::bfloat16_t;
using batchnorm::float16_t;

float f32(std::uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}
std::uint32_t bits32(float f) {
  std::uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// The value of a binary16 pattern, decoded independently (ldexp on the fields).
double decode_half(std::uint16_t h) {
  const int sign = h >> 15, exponent = (h >> 10) & 0x1f, mantissa = h & 0x3ff;
  double v;
  if (exponent == 0)
    v = std::ldexp(mantissa, -24);
  else if (exponent == 31)
    v = mantissa ? std::numeric_limits<double>::quiet_NaN() : std::numeric_limits<double>::infinity();
  else
    v = std::ldexp(1024 + mantissa, exponent - 25);
  return sign ? -v : v;
}

// Round-to-nearest-even of a finite float to a format with `mantissa_bits` stored bits,
// minimum normal exponent emin and largest finite value max_finite, as a double (inf on
// overflow). Independent of the library: frexp + nearbyint in the default rounding mode.
double round_to_format(float f, int mantissa_bits, int emin, double max_finite) {
  const double a = std::fabs(static_cast<double>(f));
  double v = 0;
  if (a != 0) {
    int e;
    std::frexp(a, &e);  // a = m * 2^e, m in [0.5, 1): the exponent of a is e - 1
    const int exponent = std::max(e - 1, emin);
    const double ulp = std::ldexp(1.0, exponent - mantissa_bits);
    v = std::nearbyint(a / ulp) * ulp;
  }
  if (v > max_finite) v = std::numeric_limits<double>::infinity();
  return std::signbit(f) ? -v : v;
}

double round_to_half(float f) { return round_to_format(f, 10, -14, 65504.0); }
double round_to_bfloat(float f) { return round_to_format(f, 7, -126, static_cast<double>(f32(0x7f7f0000u))); }

bool is_half_nan(std::uint16_t h) { return (h & 0x7c00u) == 0x7c00u && (h & 0x3ffu) != 0; }
bool is_bfloat_nan(std::uint16_t b) { return (b & 0x7f80u) == 0x7f80u && (b & 0x7fu) != 0; }

TEST(Float16, EveryPatternWidensExactlyAndRoundTrips) {
  for (std::uint32_t u = 0; u < 0x10000u; ++u) {
    const auto h = static_cast<std::uint16_t>(u);
    const float f = float16_t::to_float(h);
    const double want = decode_half(h);
    float16_t x;
    x.bits = h;
    ASSERT_EQ(bits32(static_cast<float>(x)), bits32(f)) << "operator float, pattern " << u;
    if (is_half_nan(h)) {
      ASSERT_TRUE(std::isnan(f)) << "pattern " << u;
      const std::uint16_t back = float16_t::from_float(f);
      ASSERT_TRUE(is_half_nan(back)) << "NaN pattern " << u << " came back as " << back;
      ASSERT_EQ(back & 0x8000u, h & 0x8000u) << "NaN sign, pattern " << u;
      ASSERT_NE(back & 0x200u, 0u) << "NaN must come back quiet, pattern " << u;
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), want) << "pattern " << u;
    ASSERT_EQ(std::signbit(f), (h & 0x8000u) != 0) << "pattern " << u;
    ASSERT_EQ(float16_t::from_float(f), h) << "round trip of pattern " << u;
    ASSERT_EQ(float16_t(f).bits, h) << "constructor, pattern " << u;
  }
}

TEST(Float16, HalfwayValuesRoundToEven) {
  // Every pair of neighbours (h, h + 1) among the positive finite values, 0x7bff's upper
  // neighbour being 65536 (the overflow threshold's other side, which encodes as inf).
  for (std::uint16_t h = 0; h <= 0x7bff; ++h) {
    const double lo = decode_half(h);
    const double hi = h == 0x7bff ? 65536.0 : decode_half(static_cast<std::uint16_t>(h + 1));
    const double mid_d = (lo + hi) / 2;
    const auto mid = static_cast<float>(mid_d);
    ASSERT_EQ(static_cast<double>(mid), mid_d) << "halfway value not exact in float";
    const std::uint16_t even = (h & 1u) ? static_cast<std::uint16_t>(h + 1) : h;
    const auto upper = static_cast<std::uint16_t>(h + 1);
    ASSERT_EQ(float16_t::from_float(mid), even) << "halfway between " << lo << " and " << hi;
    ASSERT_EQ(float16_t::from_float(-mid), even | 0x8000u) << "halfway between " << -lo << " and " << -hi;
    ASSERT_EQ(float16_t::from_float(std::nextafter(mid, 0.0f)), h) << "just below halfway above " << lo;
    ASSERT_EQ(float16_t::from_float(std::nextafter(mid, 1e30f)), upper) << "just above halfway above " << lo;
    ASSERT_EQ(float16_t::from_float(-std::nextafter(mid, 1e30f)), upper | 0x8000u);
  }
}

TEST(Float16, OverflowAndUnderflow) {
  EXPECT_EQ(float16_t::from_float(65504.0f), 0x7bffu);
  EXPECT_EQ(float16_t::from_float(std::nextafter(65520.0f, 0.0f)), 0x7bffu);
  EXPECT_EQ(float16_t::from_float(65520.0f), 0x7c00u);
  EXPECT_EQ(float16_t::from_float(-65520.0f), 0xfc00u);
  EXPECT_EQ(float16_t::from_float(65536.0f), 0x7c00u);
  EXPECT_EQ(float16_t::from_float(1e10f), 0x7c00u);
  EXPECT_EQ(float16_t::from_float(std::numeric_limits<float>::max()), 0x7c00u);
  EXPECT_EQ(float16_t::from_float(std::numeric_limits<float>::infinity()), 0x7c00u);
  EXPECT_EQ(float16_t::from_float(-std::numeric_limits<float>::infinity()), 0xfc00u);
  EXPECT_TRUE(std::isinf(static_cast<float>(float16_t(65520.0f))));
  // Smallest subnormal 2^-24: 2^-25 is halfway to 0 (even), anything above rounds up.
  EXPECT_EQ(float16_t::from_float(0x1p-25f), 0x0000u);
  EXPECT_EQ(float16_t::from_float(-0x1p-25f), 0x8000u);
  EXPECT_EQ(float16_t::from_float(std::nextafter(0x1p-25f, 1.0f)), 0x0001u);
  EXPECT_EQ(float16_t::from_float(0x1p-24f), 0x0001u);
  EXPECT_EQ(float16_t::from_float(3 * 0x1p-25f), 0x0002u);  // 1.5 ulp -> 2 (even)
  EXPECT_EQ(float16_t::from_float(0x1p-14f), 0x0400u);      // smallest normal
  EXPECT_EQ(float16_t::from_float(std::numeric_limits<float>::denorm_min()), 0x0000u);
  EXPECT_EQ(float16_t::from_float(-0.0f), 0x8000u);
  EXPECT_EQ(float16_t::from_float(1.0f), 0x3c00u);
  EXPECT_EQ(float16_t::from_float(-2.0f), 0xc000u);
}

TEST(Float16, NaNFromFloatStaysNaN) {
  for (std::uint32_t payload : {0x1u, 0x2000u, 0x400000u, 0x7fffffu, 0x12345u})
    for (std::uint32_t sign : {0u, 0x80000000u}) {
      const float nan = f32(sign | 0x7f800000u | payload);
      ASSERT_TRUE(std::isnan(nan));
      const std::uint16_t h = float16_t::from_float(nan);
      EXPECT_TRUE(is_half_nan(h)) << std::hex << payload;
      EXPECT_EQ(h & 0x8000u, sign >> 16);
    }
}

TEST(Float16, MatchesIndependentRoundingOverFloatPatterns) {
  ASSERT_EQ(std::fegetround(), FE_TONEAREST);
  // Every 251st float pattern (all exponents, both signs, ~17M values).
  for (std::uint64_t u = 0; u < (std::uint64_t{1} << 32); u += 251) {
    const float f = f32(static_cast<std::uint32_t>(u));
    if (std::isnan(f)) continue;
    const double want = round_to_half(f);
    const std::uint16_t h = float16_t::from_float(f);
    const double got = decode_half(h);
    if (got != want || std::signbit(got) != std::signbit(want))
      FAIL() << "from_float(" << f << " = 0x" << std::hex << u << ") = 0x" << h << std::dec << " (" << got << "), want "
             << want;
  }
}

TEST(BFloat16, EveryPatternWidensExactlyAndRoundTrips) {
  for (std::uint32_t u = 0; u < 0x10000u; ++u) {
    const auto b = static_cast<std::uint16_t>(u);
    const float f = bfloat16_t::to_float(b);
    ASSERT_EQ(bits32(f), u << 16) << "pattern " << u;
    bfloat16_t x;
    x.bits = b;
    ASSERT_EQ(bits32(static_cast<float>(x)), u << 16);
    if (is_bfloat_nan(b)) {
      ASSERT_TRUE(std::isnan(f));
      const std::uint16_t back = bfloat16_t::from_float(f);
      ASSERT_TRUE(is_bfloat_nan(back)) << "NaN pattern " << u << " came back as " << back;
      ASSERT_EQ(back & 0x8000u, b & 0x8000u);
      ASSERT_NE(back & 0x40u, 0u) << "NaN must come back quiet, pattern " << u;
      continue;
    }
    ASSERT_EQ(bfloat16_t::from_float(f), b) << "round trip of pattern " << u;
    ASSERT_EQ(bfloat16_t(f).bits, b);
  }
}

TEST(BFloat16, HalfwayValuesRoundToEven) {
  for (std::uint32_t h = 0; h <= 0x7f7fu; ++h) {
    const std::uint32_t mid_bits = (h << 16) | 0x8000u;  // exactly halfway to h + 1
    const float mid = f32(mid_bits);
    const std::uint32_t even = (h & 1u) ? h + 1 : h;
    ASSERT_EQ(bfloat16_t::from_float(mid), even) << "halfway above pattern " << h;
    ASSERT_EQ(bfloat16_t::from_float(-mid), even | 0x8000u);
    ASSERT_EQ(bfloat16_t::from_float(f32(mid_bits - 1)), h);
    ASSERT_EQ(bfloat16_t::from_float(f32(mid_bits + 1)), h + 1);
    ASSERT_EQ(bfloat16_t::from_float(f32(0x80000000u | (mid_bits + 1))), (h + 1) | 0x8000u);
  }
  // The largest finite value's upper halfway point overflows to infinity.
  EXPECT_EQ(bfloat16_t::from_float(std::numeric_limits<float>::max()), 0x7f80u);
  EXPECT_EQ(bfloat16_t::from_float(std::numeric_limits<float>::infinity()), 0x7f80u);
  EXPECT_EQ(bfloat16_t::from_float(-std::numeric_limits<float>::infinity()), 0xff80u);
}

TEST(BFloat16, MatchesIndependentRoundingOverFloatPatterns) {
  for (std::uint64_t u = 0; u < (std::uint64_t{1} << 32); u += 251) {
    const float f = f32(static_cast<std::uint32_t>(u));
    if (std::isnan(f)) {
      ASSERT_TRUE(is_bfloat_nan(bfloat16_t::from_float(f)));
      continue;
    }
    const double want = round_to_bfloat(f);
    const std::uint16_t b = bfloat16_t::from_float(f);
    const double got = static_cast<double>(bfloat16_t::to_float(b));
    if (got != want || std::signbit(got) != std::signbit(want))
      FAIL() << "from_float(" << f << " = 0x" << std::hex << u << ") = 0x" << b << std::dec << " (" << got << "), want "
             << want;
  }
}

TEST(Types, StatTypeAndElementTrait) {
  static_assert(std::is_same_v<batchnorm::stat_t<float>, float>);
  static_assert(std::is_same_v<batchnorm::stat_t<double>, double>);
  static_assert(std::is_same_v<batchnorm::stat_t<float16_t>, float>);
  static_assert(std::is_same_v<batchnorm::stat_t<bfloat16_t>, float>);
  static_assert(batchnorm::is_element_v<float16_t> && batchnorm::is_element_v<bfloat16_t>);
  static_assert(!batchnorm::is_element_v<int>);
  static_assert(sizeof(float16_t) == 2 && sizeof(bfloat16_t) == 2);
  static_assert(std::is_base_of_v<std::invalid_argument, batchnorm::value_error>);
  static_assert(std::is_base_of_v<std::invalid_argument, batchnorm::type_error>);
}

// ---- agreement with the F16C instructions (what the AVX2/AVX-512 kernels use) ------------

#if BNTEST_HAVE_F16C_TARGET
__attribute__((target("f16c"))) std::uint16_t hw_from_float(float f) {
  return static_cast<std::uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(f), _MM_FROUND_TO_NEAREST_INT), 0));
}
__attribute__((target("f16c"))) float hw_to_float(std::uint16_t h) {
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(h)));
}
bool cpu_has_f16c() {  // CPUID leaf 1, ECX bit 29 (Clang's __builtin_cpu_supports has no "f16c")
  unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
  return __get_cpuid(1, &eax, &ebx, &ecx, &edx) && (ecx & bit_F16C) != 0;
}
#endif

TEST(Float16, AgreesWithF16CInstructions) {
#if BNTEST_HAVE_F16C_TARGET
  if (!cpu_has_f16c()) GTEST_SKIP() << "no F16C on this CPU";
  for (std::uint32_t u = 0; u < 0x10000u; ++u) {
    const auto h = static_cast<std::uint16_t>(u);
    const float sw = float16_t::to_float(h), hw = hw_to_float(h);
    if (is_half_nan(h))
      ASSERT_TRUE(std::isnan(sw) && std::isnan(hw));
    else
      ASSERT_EQ(bits32(sw), bits32(hw)) << "to_float of pattern " << u;
  }
  std::mt19937 rng(12345);
  auto check = [](float f) {
    const std::uint16_t sw = float16_t::from_float(f), hw = hw_from_float(f);
    if (std::isnan(f))
      ASSERT_TRUE(is_half_nan(sw) && is_half_nan(hw)) << std::hex << bits32(f);
    else
      ASSERT_EQ(sw, hw) << "from_float(" << f << " = 0x" << std::hex << bits32(f) << ")";
  };
  for (std::uint64_t u = 0; u < (std::uint64_t{1} << 32); u += 1021) check(f32(static_cast<std::uint32_t>(u)));
  for (int i = 0; i < (1 << 20); ++i) check(f32(static_cast<std::uint32_t>(rng())));
  for (std::uint16_t h = 0; h <= 0x7bff; ++h) {
    const double hi = h == 0x7bff ? 65536.0 : decode_half(static_cast<std::uint16_t>(h + 1));
    const auto mid = static_cast<float>((decode_half(h) + hi) / 2);
    check(mid);
    check(-mid);
    check(std::nextafter(mid, 0.0f));
    check(std::nextafter(mid, 1e30f));
  }
#else
  GTEST_SKIP() << "not an x86-64 GCC/Clang build";
#endif
}

}  // namespace
