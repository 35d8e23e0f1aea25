// The per-ISA kernel tables (kernels.hpp), called directly for every instruction set this
// CPU supports (not only the active one), every element type, lengths and channel counts
// that are not multiples of the vector widths or of the conversion block (512), unit,
// non-unit and negative strides, with and without the fused ReLU, against plain loops in
// double. Outputs live in buffers of exactly the span they cover, with guard values in the
// gaps, so any write outside the view is caught here and any read outside it by ASan.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <random>
#include <string>
#include <vector>

#include "batchnorm/runtime.hpp"
#include "kernels.hpp"
#include "test_util.hpp"

namespace {

using batchnorm::index_t;
using batchnorm::detail::Coefs;
using batchnorm::detail::compute_t;
using batchnorm::detail::KernelTable;
using batchnorm::detail::Output;
using batchnorm::detail::RunShape;
using batchnorm::detail::Strided;
using batchnorm::detail::Tables;
using batchnorm::detail::tables_for;
using bntest::Buffer;
using bntest::from_d;
using bntest::to_d;

const index_t kLengths[] = {1, 3, 15, 16, 17, 31, 33, 513, 1029};
const index_t kRunStrides[] = {1, 3, -1, -3};
const index_t kRows[] = {1, 4};

std::vector<std::string> isas() { return batchnorm::supported_isas(); }

template <class T>
const KernelTable<T>& table(const std::string& isa) {
  const Tables* t = tables_for(isa);
  if (!t) throw std::runtime_error("no kernel table for " + isa);
  return t->get<T>();
}

// Row strides for `channels` channels: dense, padded, reversed dense, reversed padded.
std::vector<index_t> row_strides(index_t channels) { return {channels, channels + 3, -channels, -(channels + 3)}; }

template <class T>
class Kernels : public ::testing::Test {
 protected:
  static constexpr double uT = bntest::unit_roundoff<T>();
  static constexpr double uC = bntest::compute_roundoff<T>();

  std::mt19937_64 rng{20240601};

  // n values of one channel around `center`, with the pre-activation a*(x - m) + b kept
  // at least 0.05 from 0 so the ReLU mask is the same in double and in the compute type.
  std::vector<T> channel_values(index_t n, double center, double a, double m, double b) {
    std::vector<T> v = bntest::normal<T>(static_cast<std::size_t>(n), center, 1.5, rng);
    for (auto& x : v) keep_off_zero(x, a, m, b, 0.05);
    return v;
  }

  static void keep_off_zero(T& x, double a, double m, double b, double margin) {
    const double z = a * (to_d(x) - m) + b;
    if (std::fabs(z) >= margin) return;
    x = from_d<T>(m + (std::copysign(0.3, z) - b) / a);
    const double z2 = a * (to_d(x) - m) + b;
    if (std::fabs(z2) < margin) throw std::logic_error("test data: could not move a value off the ReLU kink");
  }

  // A run buffer of n elements with the given stride, filled from v.
  static Buffer<T> run_buffer(index_t n, index_t stride, const std::vector<T>& v) {
    Buffer<T> b({n}, {stride});
    b.set(v);
    return b;
  }

  // A rows x channels buffer with the given row stride, filled from v (row-major).
  static Buffer<T> rows_buffer(index_t rows, index_t channels, index_t stride, const std::vector<T>& v) {
    Buffer<T> b({rows, channels}, {stride, 1});
    b.set(v);
    return b;
  }
};

TYPED_TEST_SUITE(Kernels, bntest::ElementTypes, bntest::TypeNames);

TEST(KernelTables, EverySupportedIsaHasTables) {
  const auto compiled = batchnorm::compiled_isas();
  const auto supported = batchnorm::supported_isas();
  ASSERT_FALSE(supported.empty());
  EXPECT_EQ(supported.back(), "baseline");
  for (const auto& isa : supported) {
    EXPECT_NE(std::find(compiled.begin(), compiled.end(), isa), compiled.end()) << isa;
    const Tables* t = tables_for(isa);
    ASSERT_NE(t, nullptr) << isa;
    EXPECT_EQ(std::string(t->isa), isa);
    for (const auto* f :
         {reinterpret_cast<const void*>(t->f32.reduce1_runs), reinterpret_cast<const void*>(t->f16.affine2_rows),
          reinterpret_cast<const void*>(t->bf16.reduce2_rows), reinterpret_cast<const void*>(t->f64.affine1_runs)})
      EXPECT_NE(f, nullptr) << isa;
  }
  EXPECT_EQ(tables_for("no-such-isa"), nullptr);
  const std::string active = batchnorm::active_isa();
  EXPECT_NE(std::find(supported.begin(), supported.end(), active), supported.end()) << active;
  EXPECT_EQ(std::string(batchnorm::detail::active_tables().isa), active);
  // BATCHNORM_MAX_ISA caps the choice (ctest runs this under several values of it).
  if (const char* cap = std::getenv("BATCHNORM_MAX_ISA"); cap && *cap) {
    const std::vector<std::string> order = {"avx512", "avx2", "baseline"};
    const auto rank = [&](const std::string& s) { return std::find(order.begin(), order.end(), s) - order.begin(); };
    if (rank(cap) < 3) {
      EXPECT_GE(rank(active), rank(cap)) << "active " << active << " above BATCHNORM_MAX_ISA=" << cap;
      // The best supported one at or below the cap.
      for (const auto& isa : supported)
        if (rank(isa) >= rank(cap)) {
          EXPECT_EQ(active, isa);
          break;
        }
    }
  } else {
    EXPECT_EQ(active, supported.front());
  }
}

// ---- runs kernels, one run (channels_first / strided): n values of one channel, any stride --

TYPED_TEST(Kernels, Reduce1Run) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas()) {
    const KernelTable<T>& kt = table<T>(isa);
    for (index_t n : kLengths)
      for (index_t stride : kRunStrides) {
        SCOPED_TRACE(::testing::Message() << isa << " n=" << n << " stride=" << stride);
        const C m = static_cast<C>(2.25);
        const auto v = bntest::normal<T>(static_cast<std::size_t>(n), 2.0, 1.5, this->rng);
        auto x = this->run_buffer(n, stride, v);
        double s = 0.25, ss = 0.5, want_s = s, want_ss = ss, scale = 1;
        for (const T& xi : v) {
          const double d = to_d(xi) - static_cast<double>(m);
          want_s += d, want_ss += d * d, scale += std::fabs(d) + d * d;
        }
        Coefs<C> k;
        k.m = &m;
        kt.reduce1_runs({x.data(), stride}, {n}, k, &s, &ss, 0);
        EXPECT_NEAR(s, want_s, 1e-13 * scale);
        EXPECT_NEAR(ss, want_ss, 1e-13 * scale);
      }
  }
}

TYPED_TEST(Kernels, Affine1Run) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas()) {
    const KernelTable<T>& kt = table<T>(isa);
    for (index_t n : kLengths)
      for (index_t stride : kRunStrides)
        for (index_t ystride : {stride, index_t{1}, index_t{-2}})
          for (bool relu : {false, true}) {
            SCOPED_TRACE(::testing::Message()
                         << isa << " n=" << n << " stride=" << stride << " y stride=" << ystride << " relu=" << relu);
            const C a = static_cast<C>(-0.75), m = static_cast<C>(1.875), b = static_cast<C>(0.3125);
            const auto v = bntest::normal<T>(static_cast<std::size_t>(n), 2.0, 1.5, this->rng);
            auto x = this->run_buffer(n, stride, v);
            Buffer<T> y({n}, {ystride});
            Coefs<C> k;
            k.a = &a, k.m = &m, k.b = &b;
            kt.affine1_runs({x.data(), stride}, {y.data(), ystride}, {n}, k, relu, false);
            std::vector<double> want;
            double scale = 0;
            for (const T& xi : v) {
              const double t = static_cast<double>(a) * (to_d(xi) - static_cast<double>(m));
              const double z = t + static_cast<double>(b);
              want.push_back(relu ? std::max(z, 0.0) : z);
              scale = std::max(scale, std::fabs(t) + std::fabs(static_cast<double>(b)));
            }
            EXPECT_TRUE(bntest::all_close_rounded(y.values(), want, 4 * this->uC * scale));
            EXPECT_TRUE(y.gaps_intact());
            EXPECT_TRUE(bntest::bitwise_equal(x.values(), v)) << "input changed";
          }
  }
}

TYPED_TEST(Kernels, Affine1RunInPlace) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas())
    for (index_t n : {index_t{17}, index_t{1029}})
      for (index_t stride : {index_t{1}, index_t{3}, index_t{-1}}) {
        SCOPED_TRACE(::testing::Message() << isa << " n=" << n << " stride=" << stride);
        const C a = static_cast<C>(1.5), m = static_cast<C>(0.5), b = static_cast<C>(-0.25);
        const auto v = bntest::normal<T>(static_cast<std::size_t>(n), 0.0, 1.0, this->rng);
        auto x = this->run_buffer(n, stride, v);
        Coefs<C> k;
        k.a = &a, k.m = &m, k.b = &b;
        table<T>(isa).affine1_runs({x.data(), stride}, {x.data(), stride}, {n}, k, true, false);
        std::vector<double> want;
        for (const T& xi : v) want.push_back(std::max(1.5 * (to_d(xi) - 0.5) - 0.25, 0.0));
        EXPECT_TRUE(bntest::all_close_rounded(x.values(), want, 64 * this->uC));
        EXPECT_TRUE(x.gaps_intact());
      }
}

TYPED_TEST(Kernels, Reduce2Run) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas()) {
    const KernelTable<T>& kt = table<T>(isa);
    for (index_t n : kLengths)
      for (index_t stride : kRunStrides)
        for (bool relu : {false, true}) {
          const index_t dstride = stride == 1 ? 1 : -stride + 1;  // dy with its own stride
          SCOPED_TRACE(::testing::Message()
                       << isa << " n=" << n << " stride=" << stride << " dy stride=" << dstride << " relu=" << relu);
          const C a = static_cast<C>(0.625), m = static_cast<C>(2.125), b = static_cast<C>(-0.1875);
          const auto xv = this->channel_values(n, 2.0, a, m, b);
          const auto dv = bntest::normal<T>(static_cast<std::size_t>(n), 0.1, 1.0, this->rng);
          auto x = this->run_buffer(n, stride, xv);
          auto dy = this->run_buffer(n, dstride, dv);
          double s = -0.5, ss = 1.25, want_s = s, want_ss = ss, scale = 2;
          for (std::size_t i = 0; i < xv.size(); ++i) {
            const double xd = to_d(xv[i]) - static_cast<double>(m);
            const double z = static_cast<double>(a) * xd + static_cast<double>(b);
            const double g = relu && !(z > 0) ? 0.0 : to_d(dv[i]);
            want_s += g, want_ss += g * xd, scale += std::fabs(g) * (1 + std::fabs(xd));
          }
          Coefs<C> k;
          k.a = &a, k.m = &m, k.b = &b;
          kt.reduce2_runs({x.data(), stride}, {dy.data(), dstride}, {n}, k, relu, &s, &ss, 0);
          EXPECT_NEAR(s, want_s, 1e-13 * scale);
          EXPECT_NEAR(ss, want_ss, 1e-13 * scale);
        }
  }
}

TYPED_TEST(Kernels, Affine2Run) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas()) {
    const KernelTable<T>& kt = table<T>(isa);
    for (index_t n : kLengths)
      for (index_t stride : kRunStrides)
        for (bool relu : {false, true}) {
          const index_t dstride = -stride, ostride = stride == 1 ? 1 : 2;
          SCOPED_TRACE(::testing::Message() << isa << " n=" << n << " x stride=" << stride << " dy stride=" << dstride
                                            << " dx stride=" << ostride << " relu=" << relu);
          const C a = static_cast<C>(-1.25), m = static_cast<C>(1.5), b = static_cast<C>(0.4375);
          const C k1 = static_cast<C>(0.8), k2 = static_cast<C>(-0.3), k3 = static_cast<C>(0.05);
          const auto xv = this->channel_values(n, 1.5, a, m, b);
          const auto dv = bntest::normal<T>(static_cast<std::size_t>(n), -0.2, 1.0, this->rng);
          auto x = this->run_buffer(n, stride, xv);
          auto dy = this->run_buffer(n, dstride, dv);
          Buffer<T> dx({n}, {ostride});
          Coefs<C> k;
          k.a = &a, k.m = &m, k.b = &b, k.k1 = &k1, k.k2 = &k2, k.k3 = &k3;
          kt.affine2_runs({x.data(), stride}, {dy.data(), dstride}, {dx.data(), ostride}, {n}, k, relu, false);
          std::vector<double> want;
          double scale = 0;
          for (std::size_t i = 0; i < xv.size(); ++i) {
            const double xd = to_d(xv[i]) - static_cast<double>(m);
            const double z = static_cast<double>(a) * xd + static_cast<double>(b);
            const double g = relu && !(z > 0) ? 0.0 : to_d(dv[i]);
            const double t1 = static_cast<double>(k1) * (g - static_cast<double>(k3)),
                         t2 = static_cast<double>(k2) * xd;
            want.push_back(t1 + t2);
            scale = std::max(scale,
                             std::fabs(static_cast<double>(k1)) * (std::fabs(g) + std::fabs(static_cast<double>(k3))) +
                                 std::fabs(t2));
          }
          EXPECT_TRUE(bntest::all_close_rounded(dx.values(), want, 6 * this->uC * scale));
          EXPECT_TRUE(dx.gaps_intact());
        }
  }
}

TYPED_TEST(Kernels, Affine2RunInPlaceOverDy) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas())
    for (index_t stride : {index_t{1}, index_t{-3}}) {
      const index_t n = 1029;
      SCOPED_TRACE(::testing::Message() << isa << " stride=" << stride);
      const C a = static_cast<C>(1), m = static_cast<C>(0), b = static_cast<C>(0);
      const C k1 = static_cast<C>(2), k2 = static_cast<C>(0.5), k3 = static_cast<C>(-1);
      const auto xv = this->channel_values(n, 0.0, a, m, b);
      const auto dv = bntest::normal<T>(static_cast<std::size_t>(n), 0.0, 1.0, this->rng);
      auto x = this->run_buffer(n, stride, xv);
      auto dy = this->run_buffer(n, stride, dv);
      Coefs<C> k;
      k.a = &a, k.m = &m, k.b = &b, k.k1 = &k1, k.k2 = &k2, k.k3 = &k3;
      table<T>(isa).affine2_runs({x.data(), stride}, {dy.data(), stride}, {dy.data(), stride}, {n}, k, true, false);
      std::vector<double> want;
      for (std::size_t i = 0; i < xv.size(); ++i) {
        const double g = to_d(xv[i]) > 0 ? to_d(dv[i]) : 0.0;
        want.push_back(2 * (g + 1) + 0.5 * to_d(xv[i]));  // k1*(g - k3) + k2*(x - m)
      }
      EXPECT_TRUE(bntest::all_close_rounded(dy.values(), want, 64 * this->uC));
    }
}

// ---- many runs per call: run j of channel j*step, any element and run strides -----------

// All four runs kernels over `count` runs at once, for step 0 (one channel: the sums carried
// across its runs) and step 1 (a channel per run), contiguous runs (the direct bodies) and
// strided ones (the general loops), against plain loops in double; the elementwise outputs
// of contiguous and strided runs must be the same bits.
TYPED_TEST(Kernels, ManyRunsPerCall) {
  using T = TypeParam;
  using C = compute_t<T>;
  struct Layout {
    index_t stride, gap;  // element stride; run stride = sign(gap) * (n * |stride| + |gap|)
  };
  const Layout layouts[] = {{1, 0}, {1, 7}, {1, -5}, {3, 2}, {-2, -1}};
  for (const auto& isa : isas()) {
    const KernelTable<T>& kt = table<T>(isa);
    for (index_t n : {index_t{1}, index_t{15}, index_t{17}, index_t{49}, index_t{513}})
      for (index_t count : {index_t{1}, index_t{3}, index_t{5}})
        for (index_t step : {index_t{0}, index_t{1}})
          for (bool relu : {false, true}) {
            const auto nc = static_cast<std::size_t>(step ? count : 1);
            std::vector<C> a(nc), m(nc), b(nc), k1(nc), k2(nc), k3(nc);
            for (std::size_t c = 0; c < nc; ++c) {
              a[c] = static_cast<C>(c % 2 ? -0.75 : 1.25), m[c] = static_cast<C>(1.5 + 0.25 * static_cast<double>(c));
              b[c] = static_cast<C>(0.125), k1[c] = static_cast<C>(0.8), k2[c] = static_cast<C>(-0.3);
              k3[c] = static_cast<C>(0.05 * static_cast<double>(c));
            }
            const Coefs<C> k{a.data(), m.data(), b.data(), k1.data(), k2.data(), k3.data()};
            // Values in C order (run j, element i), each run around its channel's m, off the ReLU kink.
            std::vector<T> xv, dv = bntest::normal<T>(static_cast<std::size_t>(count * n), 0.2, 1.0, this->rng);
            for (index_t j = 0; j < count; ++j) {
              const auto c = static_cast<std::size_t>(j * step);
              const auto run = this->channel_values(n, static_cast<double>(m[c]), static_cast<double>(a[c]),
                                                    static_cast<double>(m[c]), static_cast<double>(b[c]));
              xv.insert(xv.end(), run.begin(), run.end());
            }
            // Expected sums and outputs in double.
            std::vector<double> want_s1(nc, 0.5), want_ss1(nc, -0.25), want_s2(nc, 1.0), want_ss2(nc, 2.0),
                scale1(nc, 1), scale2(nc, 1), want_y, want_dx;
            double yscale = 0, dxscale = 0;
            for (std::size_t e = 0; e < xv.size(); ++e) {
              const std::size_t c = e / static_cast<std::size_t>(n) * static_cast<std::size_t>(step);
              const double d = to_d(xv[e]) - static_cast<double>(m[c]);
              const double t = static_cast<double>(a[c]) * d, z = t + static_cast<double>(b[c]);
              const double g = relu && !(z > 0) ? 0.0 : to_d(dv[e]);
              want_s1[c] += d, want_ss1[c] += d * d, scale1[c] += std::fabs(d) + d * d;
              want_s2[c] += g, want_ss2[c] += g * d, scale2[c] += std::fabs(g) * (1 + std::fabs(d));
              want_y.push_back(relu ? std::max(z, 0.0) : z);
              yscale = std::max(yscale, std::fabs(t) + std::fabs(static_cast<double>(b[c])));
              const double k3c = static_cast<double>(k3[c]);
              const double u1 = static_cast<double>(k1[c]) * (g - k3c), u2 = static_cast<double>(k2[c]) * d;
              want_dx.push_back(u1 + u2);
              dxscale = std::max(
                  dxscale, std::fabs(static_cast<double>(k1[c])) * (std::fabs(g) + std::fabs(k3c)) + std::fabs(u2));
            }
            std::vector<T> first_y, first_dx;  // of the first layout, for the bitwise comparison
            for (const Layout& l : layouts) {
              const index_t run_stride = (l.gap < 0 ? -1 : 1) * (n * std::abs(l.stride) + std::abs(l.gap));
              SCOPED_TRACE(::testing::Message()
                           << isa << " n=" << n << " count=" << count << " step=" << step << " relu=" << relu
                           << " stride=" << l.stride << " run stride=" << run_stride);
              Buffer<T> x({count, n}, {run_stride, l.stride}), dy({count, n}, {run_stride, l.stride});
              Buffer<T> y({count, n}, {run_stride, l.stride}), dx({count, n}, {run_stride, l.stride});
              x.set(xv), dy.set(dv);
              const RunShape shape{n, count, step};
              std::vector<double> s1(nc, 0.5), ss1(nc, -0.25), s2(nc, 1.0), ss2(nc, 2.0);
              kt.reduce1_runs({x.data(), l.stride, run_stride}, shape, k, s1.data(), ss1.data(), 0);
              kt.reduce2_runs({x.data(), l.stride, run_stride}, {dy.data(), l.stride, run_stride}, shape, k, relu,
                              s2.data(), ss2.data(), 0);
              for (std::size_t c = 0; c < nc; ++c) {
                EXPECT_NEAR(s1[c], want_s1[c], 1e-13 * scale1[c]) << "reduce1 s, channel " << c;
                EXPECT_NEAR(ss1[c], want_ss1[c], 1e-13 * scale1[c]) << "reduce1 ss, channel " << c;
                EXPECT_NEAR(s2[c], want_s2[c], 1e-13 * scale2[c]) << "reduce2 s, channel " << c;
                EXPECT_NEAR(ss2[c], want_ss2[c], 1e-13 * scale2[c]) << "reduce2 ss, channel " << c;
              }
              kt.affine1_runs({x.data(), l.stride, run_stride}, {y.data(), l.stride, run_stride}, shape, k, relu,
                              false);
              kt.affine2_runs({x.data(), l.stride, run_stride}, {dy.data(), l.stride, run_stride},
                              {dx.data(), l.stride, run_stride}, shape, k, relu, false);
              EXPECT_TRUE(bntest::all_close_rounded(y.values(), want_y, 4 * this->uC * yscale)) << "affine1_runs";
              EXPECT_TRUE(bntest::all_close_rounded(dx.values(), want_dx, 6 * this->uC * dxscale)) << "affine2_runs";
              EXPECT_TRUE(y.gaps_intact()) << "affine1_runs wrote outside y";
              EXPECT_TRUE(dx.gaps_intact()) << "affine2_runs wrote outside dx";
              if (first_y.empty()) {
                first_y = y.values(), first_dx = dx.values();
              } else {
                EXPECT_TRUE(bntest::bitwise_equal(y.values(), first_y)) << "affine1_runs: another layout, other bits";
                EXPECT_TRUE(bntest::bitwise_equal(dx.values(), first_dx)) << "affine2_runs: another layout, other bits";
              }
            }
          }
  }
}

// ---- rows kernels (channels_last): rows of `channels` contiguous values -------------------

template <class T>
struct RowsCase {
  std::vector<compute_t<T>> a, m, b, k1, k2, k3;
  Coefs<compute_t<T>> coefs() const { return {a.data(), m.data(), b.data(), k1.data(), k2.data(), k3.data()}; }
};

TYPED_TEST(Kernels, RowsKernels) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas()) {
    const KernelTable<T>& kt = table<T>(isa);
    for (index_t channels : kLengths)
      for (index_t rows : kRows)
        for (index_t rs : row_strides(channels))
          for (bool relu : {false, true}) {
            const index_t ys = -rs, ds = rs > 0 ? channels + 1 : rs;  // y reversed, dy its own stride
            SCOPED_TRACE(::testing::Message() << isa << " channels=" << channels << " rows=" << rows
                                              << " x row stride=" << rs << " relu=" << relu);
            const auto nc = static_cast<std::size_t>(channels);
            RowsCase<T> k;
            k.a = bntest::uniform<C>(nc, 0.5, 1.5, this->rng);
            for (std::size_t c = 0; c < nc; c += 3) k.a[c] = -k.a[c];
            k.m = bntest::uniform<C>(nc, -2, 2, this->rng);
            k.b = bntest::uniform<C>(nc, -0.5, 0.5, this->rng);
            k.k1 = bntest::uniform<C>(nc, -1, 1, this->rng);
            k.k2 = bntest::uniform<C>(nc, -1, 1, this->rng);
            k.k3 = bntest::uniform<C>(nc, -1, 1, this->rng);
            // Row-major values, each channel around its m, off the ReLU kink.
            std::vector<T> xv(nc * static_cast<std::size_t>(rows));
            std::vector<T> dv = bntest::normal<T>(xv.size(), 0.0, 1.0, this->rng);
            std::normal_distribution<double> noise(0.0, 1.0);
            for (std::size_t i = 0; i < xv.size(); ++i) {
              const std::size_t c = i % nc;
              const double a = static_cast<double>(k.a[c]), m = static_cast<double>(k.m[c]),
                           b = static_cast<double>(k.b[c]);
              xv[i] = from_d<T>(m + noise(this->rng));
              this->keep_off_zero(xv[i], a, m, b, 0.05);
            }
            auto x = this->rows_buffer(rows, channels, rs, xv);
            auto dy = this->rows_buffer(rows, channels, ds, dv);

            // Expected values in double.
            std::vector<double> s1(nc, 0.5), ss1(nc, -0.5), s2(nc, 1.0), ss2(nc, 2.0);
            std::vector<double> want_s1 = s1, want_ss1 = ss1, want_s2 = s2, want_ss2 = ss2, sc1(nc, 1), sc2(nc, 1);
            std::vector<double> want_y, want_dx;
            double yscale = 0, dxscale = 0;
            for (std::size_t i = 0; i < xv.size(); ++i) {
              const std::size_t c = i % nc;
              const double d = to_d(xv[i]) - static_cast<double>(k.m[c]);
              const double t = static_cast<double>(k.a[c]) * d;
              const double z = t + static_cast<double>(k.b[c]);
              const double g = relu && !(z > 0) ? 0.0 : to_d(dv[i]);
              want_s1[c] += d, want_ss1[c] += d * d, sc1[c] += std::fabs(d) + d * d;
              want_s2[c] += g, want_ss2[c] += g * d, sc2[c] += std::fabs(g) * (1 + std::fabs(d));
              want_y.push_back(relu ? std::max(z, 0.0) : z);
              yscale = std::max(yscale, std::fabs(t) + std::fabs(static_cast<double>(k.b[c])));
              const double k3c = static_cast<double>(k.k3[c]);
              const double u1 = static_cast<double>(k.k1[c]) * (g - k3c), u2 = static_cast<double>(k.k2[c]) * d;
              want_dx.push_back(u1 + u2);
              dxscale = std::max(
                  dxscale, std::fabs(static_cast<double>(k.k1[c])) * (std::fabs(g) + std::fabs(k3c)) + std::fabs(u2));
            }

            kt.reduce1_rows({x.data(), rs}, rows, channels, k.coefs(), s1.data(), ss1.data());
            kt.reduce2_rows({x.data(), rs}, {dy.data(), ds}, rows, channels, k.coefs(), relu, s2.data(), ss2.data());
            for (std::size_t c = 0; c < nc; ++c) {
              ASSERT_NEAR(s1[c], want_s1[c], 1e-13 * sc1[c]) << "reduce1 s, channel " << c;
              ASSERT_NEAR(ss1[c], want_ss1[c], 1e-13 * sc1[c]) << "reduce1 ss, channel " << c;
              ASSERT_NEAR(s2[c], want_s2[c], 1e-13 * sc2[c]) << "reduce2 s, channel " << c;
              ASSERT_NEAR(ss2[c], want_ss2[c], 1e-13 * sc2[c]) << "reduce2 ss, channel " << c;
            }

            Buffer<T> y({rows, channels}, {ys, 1});
            kt.affine1_rows({x.data(), rs}, {y.data(), ys}, rows, channels, k.coefs(), relu, false);
            EXPECT_TRUE(bntest::all_close_rounded(y.values(), want_y, 4 * this->uC * yscale)) << "affine1_rows";
            EXPECT_TRUE(y.gaps_intact()) << "affine1_rows wrote outside y";

            Buffer<T> dx({rows, channels}, {rs, 1});
            kt.affine2_rows({x.data(), rs}, {dy.data(), ds}, {dx.data(), rs}, rows, channels, k.coefs(), relu, false);
            EXPECT_TRUE(bntest::all_close_rounded(dx.values(), want_dx, 6 * this->uC * dxscale)) << "affine2_rows";
            EXPECT_TRUE(dx.gaps_intact()) << "affine2_rows wrote outside dx";
            EXPECT_TRUE(bntest::bitwise_equal(x.values(), xv)) << "x changed";
            EXPECT_TRUE(bntest::bitwise_equal(dy.values(), dv)) << "dy changed";
          }
  }
}

// Wide rows (C = 2048 and 4096: the coefficient arrays no longer fit L1) are written a group
// of rows at a time; each value must come out as it does when the rows are passed one by
// one. Rows 4, 6 and 9 leave 0, 2 and 1 rows after the last group; the output is 64-byte
// aligned or 1 or 5 elements off (dense, the groups then start at the head that aligns the
// output, in the middle of a row; padded, no groups when streamed and groups that straddle
// lines when not), streamed or not, dense or padded (a padded row of 16 more keeps every
// row aligned).
TYPED_TEST(Kernels, WideRowGroupsEqualRowByRow) {
  using T = TypeParam;
  using C = compute_t<T>;
  auto bits = [](const T* p, std::size_t n) {
    std::vector<unsigned char> out(n * sizeof(T));
    std::memcpy(out.data(), p, out.size());
    return out;
  };
  for (const auto& isa : isas())
    for (index_t channels : {index_t{2048}, index_t{4096}})
      for (index_t rows : {index_t{4}, index_t{6}, index_t{9}})
        for (index_t pad : {index_t{0}, index_t{16}}) {
          const index_t stride = channels + pad;
          const auto nc = static_cast<std::size_t>(channels), span = static_cast<std::size_t>(rows * stride);
          RowsCase<T> k;
          k.a = bntest::uniform<C>(nc, -1.5, 1.5, this->rng), k.m = bntest::uniform<C>(nc, -1, 1, this->rng);
          k.b = bntest::uniform<C>(nc, -0.5, 0.5, this->rng), k.k1 = bntest::uniform<C>(nc, -1, 1, this->rng);
          k.k2 = bntest::uniform<C>(nc, -1, 1, this->rng), k.k3 = bntest::uniform<C>(nc, -1, 1, this->rng);
          const std::vector<T> x = bntest::normal<T>(span, 0.0, 1.0, this->rng);
          const std::vector<T> dy = bntest::normal<T>(span, 0.0, 1.0, this->rng);
          const KernelTable<T>& kt = table<T>(isa);
          for (std::size_t shift : {std::size_t{0}, std::size_t{1}, std::size_t{5}})
            for (bool relu : {false, true})
              for (bool stream : {false, true}) {
                SCOPED_TRACE(::testing::Message()
                             << isa << " channels " << channels << " rows " << rows << " pad " << pad << " shift "
                             << shift << " relu " << relu << " stream " << stream);
                // Outputs at a 64-byte boundary (+ shift elements), guard values around them.
                const T guard = from_d<T>(-7.0);
                std::vector<T> mem_a(span + 128, guard), mem_b(span + 128, guard);
                auto aligned = [shift](std::vector<T>& m) {
                  const auto addr = reinterpret_cast<std::uintptr_t>(m.data());
                  return m.data() + (64 - addr % 64) % 64 / sizeof(T) + shift;
                };
                T *grouped = aligned(mem_a), *single = aligned(mem_b);
                kt.affine1_rows({x.data(), stride}, {grouped, stride}, rows, channels, k.coefs(), relu, stream);
                for (index_t r = 0; r < rows; ++r)
                  kt.affine1_rows({x.data() + r * stride, stride}, {single + r * stride, stride}, 1, channels,
                                  k.coefs(), relu, stream);
                EXPECT_EQ(bits(grouped, span), bits(single, span)) << "affine1_rows";
                kt.affine2_rows({x.data(), stride}, {dy.data(), stride}, {grouped, stride}, rows, channels, k.coefs(),
                                relu, stream);
                for (index_t r = 0; r < rows; ++r)
                  kt.affine2_rows({x.data() + r * stride, stride}, {dy.data() + r * stride, stride},
                                  {single + r * stride, stride}, 1, channels, k.coefs(), relu, stream);
                EXPECT_EQ(bits(grouped, span), bits(single, span)) << "affine2_rows";
                // Nothing written before the first value or in the padding after a row.
                const std::size_t first = static_cast<std::size_t>(grouped - mem_a.data());
                EXPECT_TRUE(std::all_of(mem_a.begin(), mem_a.begin() + static_cast<std::ptrdiff_t>(first),
                                        [&](const T& v) { return to_d(v) == -7.0; }));
                EXPECT_TRUE(std::all_of(mem_a.begin() + static_cast<std::ptrdiff_t>(first + span), mem_a.end(),
                                        [&](const T& v) { return to_d(v) == -7.0; }));
                for (index_t r = 0; r < rows && pad > 0; ++r)
                  for (index_t c = channels; c < stride; ++c)
                    ASSERT_EQ(to_d(grouped[r * stride + c]), -7.0) << "padding of row " << r;
              }
        }
}

TYPED_TEST(Kernels, RowsInPlace) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas()) {
    const index_t rows = 3, channels = 1029, rs = channels + 3;
    SCOPED_TRACE(isa);
    const auto nc = static_cast<std::size_t>(channels);
    RowsCase<T> k;
    k.a.assign(nc, C(2)), k.m.assign(nc, C(1)), k.b.assign(nc, C(0.5));
    k.k1.assign(nc, C(1)), k.k2.assign(nc, C(0)), k.k3.assign(nc, C(0.25));
    const auto v = bntest::normal<T>(nc * 3, 1.0, 1.0, this->rng);
    auto x = this->rows_buffer(rows, channels, rs, v);
    table<T>(isa).affine1_rows({x.data(), rs}, {x.data(), rs}, rows, channels, k.coefs(), false, false);
    std::vector<double> want;
    for (const T& xi : v) want.push_back(2 * (to_d(xi) - 1) + 0.5);
    EXPECT_TRUE(bntest::all_close_rounded(x.values(), want, 128 * this->uC));
    EXPECT_TRUE(x.gaps_intact());
  }
}

TYPED_TEST(Kernels, ZeroLengthIsANoOp) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas()) {
    const KernelTable<T>& kt = table<T>(isa);
    const C one = 1;
    const Coefs<C> k{&one, &one, &one, &one, &one, &one};
    T sentinel = from_d<T>(7.0);
    double s = 3, ss = 4;
    kt.reduce1_runs({&sentinel, 1}, {0}, k, &s, &ss, 0);
    kt.reduce2_runs({&sentinel, 1}, {&sentinel, 1}, {0}, k, true, &s, &ss, 0);
    kt.affine1_runs({&sentinel, 1}, {&sentinel, 1}, {0}, k, true, false);
    kt.affine2_runs({&sentinel, 1}, {&sentinel, 1}, {&sentinel, 1}, {0}, k, false, false);
    kt.reduce1_rows({&sentinel, 1}, 0, 1, k, &s, &ss);
    kt.affine1_rows({&sentinel, 1}, {&sentinel, 1}, 0, 1, k, false, false);
    kt.reduce1_rows({&sentinel, 1}, 5, 0, k, &s, &ss);
    kt.affine2_rows({&sentinel, 1}, {&sentinel, 1}, {&sentinel, 1}, 5, 0, k, true, false);
    EXPECT_EQ(s, 3);
    EXPECT_EQ(ss, 4);
    EXPECT_EQ(to_d(sentinel), 7.0);
  }
}

// The narrowing of results to the 16-bit types rounds half to even in every path (F16C
// vectors for unit-stride float16 chunks of 8, scalar code for the rest): every value of a
// binade, plus half its ulp, is exactly halfway between two neighbours.
template <class T>
void check_output_rounding() {
  using C = compute_t<T>;
  {
    const bool half = std::is_same_v<T, bntest::float16_t>;
    const unsigned mantissa_bits = half ? 10 : 7;
    // Exponent fields: subnormal, around 1, large (for float16 the top binade, whose
    // upper half-way points overflow to infinity).
    const std::vector<unsigned> fields = half ? std::vector<unsigned>{0, 15, 30} : std::vector<unsigned>{0, 127, 250};
    for (unsigned field : fields) {
      std::vector<T> xv;
      for (unsigned sign : {0u, 1u})
        for (unsigned mant = 0; mant < (1u << mantissa_bits); ++mant) {
          T v;
          v.bits = static_cast<std::uint16_t>((sign << 15) | (field << mantissa_bits) | mant);
          xv.push_back(v);
        }
      T lo, hi;  // the ulp of the binade
      lo.bits = static_cast<std::uint16_t>(field << mantissa_bits);
      hi.bits = static_cast<std::uint16_t>(lo.bits + 1);
      const double half_ulp = (to_d(hi) - to_d(lo)) / 2;
      std::vector<std::uint16_t> want;
      for (const T& v : xv) want.push_back(from_d<T>(to_d(v) + half_ulp).bits);
      const auto n = static_cast<index_t>(xv.size());
      const C one = 1, zero = 0, b = static_cast<C>(half_ulp), minus_b = -b;
      Coefs<C> k;  // y = 1*(x - 0) + b; dx = 1*(x - (-b)) + 0*(x - 0), with dy = x
      k.a = &one, k.m = &zero, k.b = &b, k.k1 = &one, k.k2 = &zero, k.k3 = &minus_b;
      const std::vector<C> ones(xv.size(), C(1)), zeros(xv.size(), C(0)), bs(xv.size(), b), minus_bs(xv.size(), -b);
      const Coefs<C> kr{ones.data(), zeros.data(), bs.data(), ones.data(), zeros.data(), minus_bs.data()};
      auto bits = [](const std::vector<T>& v) {
        std::vector<std::uint16_t> out;
        for (const T& e : v) out.push_back(e.bits);
        return out;
      };
      for (const auto& isa : isas())
        for (index_t stride : {index_t{1}, index_t{3}}) {
          SCOPED_TRACE(::testing::Message() << isa << " exponent field " << field << " stride " << stride);
          const KernelTable<T>& kt = table<T>(isa);
          Buffer<T> x({n}, {stride});
          x.set(xv);
          Buffer<T> y({n}, {stride}), dx({n}, {stride});
          kt.affine1_runs({x.data(), stride}, {y.data(), stride}, {n}, k, false, false);
          EXPECT_EQ(bits(y.values()), want) << "affine1_run";
          kt.affine2_runs({x.data(), stride}, {x.data(), stride}, {dx.data(), stride}, {n}, k, false, false);
          EXPECT_EQ(bits(dx.values()), want) << "affine2_run";
          if (stride != 1) continue;
          Buffer<T> yr({1, n}, {n, 1}), dxr({1, n}, {n, 1});
          kt.affine1_rows({x.data(), n}, {yr.data(), n}, 1, n, kr, false, false);
          EXPECT_EQ(bits(yr.values()), want) << "affine1_rows";
          kt.affine2_rows({x.data(), n}, {x.data(), n}, {dxr.data(), n}, 1, n, kr, false, false);
          EXPECT_EQ(bits(dxr.values()), want) << "affine2_rows";
        }
    }
  }
}

TEST(KernelRounding, Float16OutputRoundsHalfToEven) { check_output_rounding<bntest::float16_t>(); }
TEST(KernelRounding, BFloat16OutputRoundsHalfToEven) { check_output_rounding<bntest::bfloat16_t>(); }

// Coefs documents "unused ones may be null": without the ReLU, reduce-2 does not use a or b.
TYPED_TEST(Kernels, Reduce2WithoutReluNeedsNoActivationCoefs) {
  using T = TypeParam;
  using C = compute_t<T>;
  for (const auto& isa : isas()) {
    SCOPED_TRACE(isa);
    const KernelTable<T>& kt = table<T>(isa);
    const std::vector<C> m(3, C(1));
    const std::vector<T> x(6, from_d<T>(2.0)), dy(6, from_d<T>(0.5));
    Coefs<C> k;
    k.m = m.data();  // a, b: null
    double s = 0, ss = 0;
    kt.reduce2_runs({x.data(), 1}, {dy.data(), 1}, {6}, k, false, &s, &ss, 0);
    EXPECT_EQ(s, 3.0);
    EXPECT_EQ(ss, 3.0);
    std::vector<double> sr(3, 0.0), ssr(3, 0.0);
    kt.reduce2_rows({x.data(), 3}, {dy.data(), 3}, 2, 3, k, false, sr.data(), ssr.data());
    EXPECT_EQ(sr, std::vector<double>(3, 1.0));
    EXPECT_EQ(ssr, std::vector<double>(3, 1.0));
  }
}

}  // namespace

// Non-temporal stores change how outputs are written, never what: for every ISA, type,
// length and misalignment of the output, streamed and ordinary writes give the same bits.
TYPED_TEST(Kernels, StreamedOrPrefetchingOutputEqualsOrdinaryOutput) {
  using T = TypeParam;
  using C = compute_t<T>;
  const index_t n = 1100;
  const std::vector<T> x = bntest::normal<T>(static_cast<std::size_t>(n + 64), 2.0, 1.5, this->rng);
  const std::vector<T> dy = bntest::normal<T>(static_cast<std::size_t>(n + 64), 0.0, 1.0, this->rng);
  // Coefficients differ per channel: a streamed rows pass starts its vector loop at another
  // channel than an ordinary one (after the head that aligns the output) and keeps its
  // coefficient arrays at another offset in the cache line (PeriodicCoefs).
  const auto nk = static_cast<std::size_t>(n + 64);
  const std::vector<C> a = bntest::uniform<C>(nk, 0.5, 1.5, this->rng), m = bntest::uniform<C>(nk, 1.5, 2.5, this->rng),
                       b = bntest::uniform<C>(nk, -0.2, 0.2, this->rng), k1 = bntest::uniform<C>(nk, -1, 1, this->rng),
                       k2 = bntest::uniform<C>(nk, -1, 1, this->rng), k3 = bntest::uniform<C>(nk, -0.1, 0.1, this->rng);
  const Coefs<C> k{a.data(), m.data(), b.data(), k1.data(), k2.data(), k3.data()};
  auto bits = [](const std::vector<T>& v) {
    std::vector<unsigned char> out(v.size() * sizeof(T));
    std::memcpy(out.data(), v.data(), out.size());
    return out;
  };
  for (const auto& isa : isas())
    for (index_t len : {index_t{1}, index_t{15}, index_t{33}, index_t{517}, n})
      for (index_t shift : {index_t{0}, index_t{1}, index_t{5}})
        for (bool relu : {false, true}) {
          SCOPED_TRACE(::testing::Message() << isa << " n " << len << " offset " << shift << " relu " << relu);
          const KernelTable<T>& kt = table<T>(isa);
          // call(out, output) writes into out + shift: ordinary stores, streamed, and ordinary
          // stores that prefetch the inputs and the output ahead all write the same bits.
          auto agree = [&](const char* what, const auto& call) {
            std::vector<T> plain(x.size()), streamed(x.size()), fetched(x.size());
            call(plain.data() + shift, Output(false));
            call(streamed.data() + shift, Output(true));
            call(fetched.data() + shift, Output(false, 48, 48));
            EXPECT_EQ(bits(plain), bits(streamed)) << what << ", streamed";
            EXPECT_EQ(bits(plain), bits(fetched)) << what << ", prefetching";
          };
          const T* xs = x.data() + shift;
          const T* dys = dy.data() + shift;
          agree("affine1_run", [&](T* o, Output out) { kt.affine1_runs({xs, 1}, {o, 1}, {len}, k, relu, out); });
          agree("affine2_run",
                [&](T* o, Output out) { kt.affine2_runs({xs, 1}, {dys, 1}, {o, 1}, {len}, k, relu, out); });
          agree("affine1_rows", [&](T* o, Output out) { kt.affine1_rows({xs, len}, {o, len}, 1, len, k, relu, out); });
          agree("affine2_rows",
                [&](T* o, Output out) { kt.affine2_rows({xs, len}, {dys, len}, {o, len}, 1, len, k, relu, out); });
          // Four rows in one stretch, of a quarter of len's whole vectors each: the channel of
          // the vector loop carries over from row to row.
          if (len < 16) continue;
          const index_t ch = len / 16 * 16 / 4, rows = len / ch;
          SCOPED_TRACE(::testing::Message() << rows << " rows of " << ch);
          agree("affine1_rows", [&](T* o, Output out) { kt.affine1_rows({xs, ch}, {o, ch}, rows, ch, k, relu, out); });
          agree("affine2_rows",
                [&](T* o, Output out) { kt.affine2_rows({xs, ch}, {dys, ch}, {o, ch}, rows, ch, k, relu, out); });
        }
}
