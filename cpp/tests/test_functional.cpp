// The functional API (functional.hpp) against batchnorm::reference, on many shapes, feature
// axes and layouts, for every element type, under the active instruction set (ctest also
// runs this whole program under BATCHNORM_MAX_ISA=baseline and =avx2; the kernels of every
// ISA are also called directly in test_kernels.cpp). Then thread counts, numerics far from
// zero and beyond float16's range, partial/merged moments, and errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "batchnorm/reference.hpp"
#include "test_util.hpp"

namespace {

namespace bn = batchnorm;
namespace ref = batchnorm::reference;
using bn::Activation;
using bn::Affine;
using bn::Axes;
using bn::Geometry;
using bn::In;
using bn::index_t;
using bn::Out;
using bn::Shape;
using bn::stat_t;
using bn::Statistics;
using bn::Strides;
using bntest::Buffer;
using bntest::from_d;
using bntest::make_strides;
using bntest::to_d;

// ---- the layouts ---------------------------------------------------------------------------

struct Case {
  std::string name;
  Shape shape;
  Axes axes;
  Strides x;    // x (empty: C-contiguous)
  Strides out;  // y, dy and dx (empty: C-contiguous)
};

std::vector<Case> cases() {
  const Shape nchw = {3, 5, 6, 7};
  const Strides nhwc_strides = make_strides(nchw, {0, 2, 3, 1});
  return {
      {"nchw", nchw, {1}, {}, {}},
      {"nhwc", {3, 6, 7, 5}, {-1}, {}, {}},
      {"nchw_shape_nhwc_strides", nchw, {1}, nhwc_strides, nhwc_strides},
      {"gapped_view", nchw, {1}, make_strides(nchw, {}, {2, 1, 1, 3}), make_strides(nchw, {}, {1, 2, 1, 1})},
      {"negative_batch_strides",
       nchw,
       {1},
       make_strides(nchw, {}, {}, {true, false, true, false}),
       make_strides(nchw, {}, {}, {false, false, true, true})},
      {"negative_channel_strides",
       nchw,
       {1},
       make_strides(nchw, {}, {}, {false, true, false, true}),
       make_strides(nchw, {}, {}, {false, true, false, false})},
      {"features_1_3", nchw, {1, 3}, {}, {}},
      {"features_2_3", nchw, {2, 3}, {}, {}},
      {"ghost_batches_nc", {4, 9, 37}, {0, 2}, {}, {}},  // (G, k, C): rows of C in G groups
      {"ghost_batches_nhwc_view",
       {3, 2, 5, 6, 7},
       {0, 2},
       make_strides({3, 2, 5, 6, 7}, {0, 1, 3, 4, 2}),
       make_strides({3, 2, 5, 6, 7}, {0, 1, 3, 4, 2})},
      {"features_0_2_permuted", nchw, {2, 0}, nhwc_strides, make_strides(nchw, {3, 1, 2, 0})},
      {"c1", {4, 1, 9}, {1}, {}, {}},
      {"count1", {1, 7}, {1}, {}, {}},
      {"count1_1d", {7}, {0}, {}, {}},
      {"count1_reversed_1d", {7}, {-1}, {-1}, {-2}},
      {"all_features", {2, 3}, {0, 1}, {}, {}},
      {"nc_2d", {37, 33}, {1}, {}, {}},
      {"cn_2d", {33, 37}, {0}, {}, {}},
      {"long_runs", {2, 3, 700}, {1}, {}, {}},
      {"short_runs_channel_blocks", {6, 200, 24}, {1}, {}, {}},  // blocks of 25-50 channels (forward and backward)
      {"wide_channels", {5, 600}, {1}, {}, {}},
      {"wide_channels_reversed_rows", {5, 600}, {1}, {-600, 1}, {-600, 1}},
      {"broadcast_x", {3, 5, 7}, {1}, {0, 7, 1}, {}},
      {"x_nchw_y_nhwc", nchw, {1}, {}, nhwc_strides},
      {"x_nhwc_y_nchw", nchw, {1}, nhwc_strides, {}},
      {"mixed_flips_and_gaps",
       {4, 6, 5},
       {2},
       make_strides({4, 6, 5}, {}, {}, {true, false, false}),
       make_strides({4, 6, 5}, {1, 0, 2}, {1, 2, 1})},
  };
}

bool has_zero_stride(const Strides& s) { return std::find(s.begin(), s.end(), 0) != s.end(); }

// The cases whose outputs may be x itself: x has no zero stride.
std::vector<Case> in_place_cases() {
  std::vector<Case> out;
  for (const Case& c : cases())
    if (!has_zero_stride(c.x)) out.push_back(c);
  return out;
}

index_t channel_of(const Shape& shape, const Axes& axes, const std::vector<index_t>& i) {
  std::vector<bool> feature(shape.size(), false);
  for (int a : axes) feature[static_cast<std::size_t>(a < 0 ? a + static_cast<int>(shape.size()) : a)] = true;
  index_t c = 0;
  for (std::size_t d = 0; d < shape.size(); ++d)
    if (feature[d]) c = c * shape[d] + i[d];
  return c;
}

std::string act_name(Activation a) { return a == Activation::relu ? "relu" : "none"; }

// ---- fixture -------------------------------------------------------------------------------

template <class T>
class Functional : public ::testing::Test {
 protected:
  using Stat = stat_t<T>;
  static constexpr double uT = bntest::unit_roundoff<T>();
  static constexpr double uC = bntest::compute_roundoff<T>();
  // Statistics: float rounding of a double result (or double vs double by another route).
  static constexpr double stat_rtol = std::max(2 * bntest::compute_roundoff<T>(), 1e-12);
  static constexpr double eps = 1e-3;

  std::mt19937_64 rng{987654321};

  // x in the case's layout: channel c ~ N(mu_c, sigma_c), mu_c in [-2, 2], sigma_c in [0.5, 2].
  Buffer<T> make_x(const Case& c) {
    Buffer<T> x(c.shape, c.x);
    const auto C = static_cast<std::size_t>(bn::extent(Geometry{c.shape, c.axes}).channels);
    const auto mu = bntest::uniform<double>(C, -2, 2, rng);
    const auto sigma = bntest::uniform<double>(C, 0.5, 2, rng);
    std::normal_distribution<double> n01(0, 1);
    bntest::for_each_index(c.shape, [&](const std::vector<index_t>& i) {
      const auto ch = static_cast<std::size_t>(channel_of(c.shape, c.axes, i));
      x.at(i) = from_d<T>(mu[ch] + sigma[ch] * n01(rng));
    });
    return x;
  }

  Buffer<T> make_dy(const Case& c) {
    Buffer<T> dy(c.shape, c.out);
    dy.set(bntest::normal<T>(bntest::numel(c.shape), 0.1, 1.0, rng));
    return dy;
  }

  struct Params {
    std::vector<Stat> gamma, beta;
    Affine<Stat> affine(bool given) const { return given ? Affine<Stat>{gamma.data(), beta.data()} : Affine<Stat>{}; }
  };
  Params make_params(index_t channels) {
    Params p;
    const auto C = static_cast<std::size_t>(channels);
    p.gamma = bntest::uniform<Stat>(C, 0.5, 1.5, rng);
    for (std::size_t c = 1; c < C; c += 2) p.gamma[c] = -p.gamma[c];
    p.beta = bntest::uniform<Stat>(C, -0.5, 0.5, rng);
    return p;
  }

  static index_t channels(const Case& c) { return bn::extent(Geometry{c.shape, c.axes}).channels; }
  static index_t count(const Case& c) { return bn::extent(Geometry{c.shape, c.axes}).count; }

  // What every check of one case starts from: its geometry, channel count, x and parameters.
  struct Setup {
    Geometry g;
    std::size_t C;
    Buffer<T> x;
    Params params;
  };
  Setup setup(const Case& c) {
    const auto C = static_cast<std::size_t>(channels(c));
    auto x = make_x(c);
    auto params = make_params(static_cast<index_t>(C));
    return {Geometry{c.shape, c.axes}, C, std::move(x), std::move(params)};
  }

  // y (or dx) from the library against the reference's in double: the type's rounding
  // plus a few roundings of the compute type on the scale of the terms.
  ::testing::AssertionResult close_values(const std::vector<T>& got, const std::vector<double>& want,
                                          double scale) const {
    return bntest::all_close_rounded(got, want, (16 * uC + 1e-13) * scale);
  }

  template <class A>
  ::testing::AssertionResult close_stats(const std::vector<A>& got, const std::vector<double>& want,
                                         double atol = 0) const {
    return bntest::all_close(got, want, stat_rtol, atol + 1e-12 * bntest::max_abs(want) + 1e-300);
  }

  // Moves elements of x whose pre-activation gamma*inv_std*(x - mean) + beta lies within
  // 1e-3 of 0 to about +-0.3, so the ReLU mask cannot differ between the library's compute type
  // and the reference's double (backward takes mean and inv_std as given, so x may change).
  void keep_off_relu_kink(const Case& c, Buffer<T>& x, const std::vector<Stat>& mean, const std::vector<Stat>& inv_std,
                          const Affine<Stat>& affine) {
    bntest::for_each_index(c.shape, [&](const std::vector<index_t>& i) {
      const auto ch = static_cast<std::size_t>(channel_of(c.shape, c.axes, i));
      const double a = (affine.gamma ? affine.gamma[ch] : 1.0) * static_cast<double>(inv_std[ch]);
      const double b = affine.beta ? affine.beta[ch] : 0.0, m = mean[ch];
      const double z = a * (to_d(x.at(i)) - m) + b;
      if (std::fabs(z) >= 1e-3) return;
      for (double target : {0.3, 0.5, 0.7, 1.0, 2.0, 5.0}) {
        x.at(i) = from_d<T>(m + (std::copysign(target, z) - b) / a);
        if (std::fabs(a * (to_d(x.at(i)) - m) + b) >= 1e-3) return;
      }
      throw std::logic_error("cannot move x off the ReLU kink");
    });
  }

  void check_forward(const Case& c, Activation act, bool affine_given) {
    SCOPED_TRACE(c.name + " act=" + act_name(act) + (affine_given ? " gamma/beta" : " no gamma/beta"));
    auto [g, C, x, params] = setup(c);
    const Affine<Stat> affine = params.affine(affine_given);
    Buffer<T> y(c.shape, c.out);
    std::vector<Stat> mean(C), var(C), inv(C);
    EXPECT_EQ(bn::forward<T>(g, {x.data(), x.strides()}, {y.data(), y.strides()}, affine, eps, act, mean.data(),
                             var.data(), inv.data()),
              count(c));
    std::vector<double> want(bntest::numel(c.shape)), want_mean(C), want_var(C), want_inv(C);
    ref::forward<T>(g, {x.data(), x.strides()}, Out<double>{want.data()}, affine, eps, act, want_mean.data(),
                    want_var.data(), want_inv.data());
    EXPECT_TRUE(close_stats(mean, want_mean, 1e-12 * std::sqrt(bntest::max_abs(want_var)))) << "mean";
    EXPECT_TRUE(close_stats(var, want_var)) << "variance";
    EXPECT_TRUE(close_stats(inv, want_inv)) << "inv_std";
    double scale = bntest::max_abs(want) + 1;
    for (std::size_t k = 0; k < C; ++k) scale = std::max(scale, std::fabs(want_mean[k] * want_inv[k]) * 1.5 + 1);
    EXPECT_TRUE(close_values(y.values(), want, scale)) << "y";
    EXPECT_TRUE(y.gaps_intact()) << "forward wrote outside y";
  }

  void check_backward(const Case& c, Statistics st, Activation act, bool affine_given) {
    SCOPED_TRACE(c.name + (st == Statistics::batch ? " batch" : " fixed") + " act=" + act_name(act) +
                 (affine_given ? " gamma/beta" : " no gamma/beta"));
    auto [g, C, x, params] = setup(c);
    const index_t M = count(c);
    const Affine<Stat> affine = params.affine(affine_given);
    // The forward's statistics, as a training step would have them.
    std::vector<Stat> mean(C), var(C), inv(C);
    Buffer<T> y(c.shape, c.out);
    bn::forward<T>(g, {x.data(), x.strides()}, {y.data(), y.strides()}, affine, eps, act, mean.data(), var.data(),
                   inv.data());
    if (act == Activation::relu) keep_off_relu_kink(c, x, mean, inv, affine);
    auto dy = make_dy(c);
    Buffer<T> dx(c.shape, c.out);
    std::vector<Stat> dgamma(C, Stat(-1)), dbeta(C, Stat(-1));
    bn::backward<T>(g, {dy.data(), dy.strides()}, {x.data(), x.strides()}, {dx.data(), dx.strides()}, mean.data(),
                    inv.data(), affine, act, dgamma.data(), dbeta.data(), st);
    std::vector<double> want(bntest::numel(c.shape)), want_dgamma(C), want_dbeta(C);
    ref::backward<T>(g, {dy.data(), dy.strides()}, {x.data(), x.strides()}, Out<double>{want.data()}, mean.data(),
                     inv.data(), affine, act, want_dgamma.data(), want_dbeta.data(), st);
    double amax = 0;
    for (std::size_t k = 0; k < C; ++k)
      amax = std::max(amax, std::fabs(static_cast<double>(inv[k]) * (affine.gamma ? affine.gamma[k] : 1.0)));
    const double dymax = bntest::max_abs(dy.values());
    const double scale = bntest::max_abs(want) + 4 * amax * dymax + 1e-30;
    EXPECT_TRUE(bntest::all_close_rounded(dx.values(), want, (32 * uC + 1e-13) * scale)) << "dx";
    EXPECT_TRUE(dx.gaps_intact()) << "backward wrote outside dx";
    const double sum_atol = 1e-11 * static_cast<double>(M) * dymax * 10;
    EXPECT_TRUE(close_stats(dgamma, want_dgamma, sum_atol)) << "dgamma";
    EXPECT_TRUE(close_stats(dbeta, want_dbeta, sum_atol)) << "dbeta";
  }
};

TYPED_TEST_SUITE(Functional, bntest::ElementTypes, bntest::TypeNames);

// ---- moments, normalize, forward, backward vs the reference --------------------------------

TYPED_TEST(Functional, Moments) {
  using T = TypeParam;
  using S = stat_t<T>;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const Geometry g{c.shape, c.axes};
    auto x = this->make_x(c);
    const auto C = static_cast<std::size_t>(this->channels(c));
    std::vector<S> mean(C), var(C);
    std::vector<double> want_mean(C), want_var(C);
    EXPECT_EQ(bn::moments<T>(g, {x.data(), x.strides()}, mean.data(), var.data()), this->count(c));
    EXPECT_EQ(ref::moments<T>(g, {x.data(), x.strides()}, want_mean.data(), want_var.data()), this->count(c));
    EXPECT_TRUE(this->close_stats(mean, want_mean, 1e-12 * std::sqrt(bntest::max_abs(want_var)))) << "mean";
    EXPECT_TRUE(this->close_stats(var, want_var)) << "variance";
  }
}

TYPED_TEST(Functional, Normalize) {
  using T = TypeParam;
  using S = stat_t<T>;
  for (const Case& c : cases())
    for (Activation act : {Activation::none, Activation::relu})
      for (bool affine_given : {false, true}) {
        SCOPED_TRACE(c.name + " act=" + act_name(act) + (affine_given ? " gamma/beta" : " no gamma/beta"));
        const Geometry g{c.shape, c.axes};
        const auto C = static_cast<std::size_t>(this->channels(c));
        auto x = this->make_x(c);
        const auto params = this->make_params(static_cast<index_t>(C));
        const Affine<S> affine = params.affine(affine_given);
        // Statistics that are not the batch's own (as in inference): perturbed moments.
        std::vector<S> mean(C), var(C);
        ref::moments<T>(g, {x.data(), x.strides()}, mean.data(), var.data());
        for (std::size_t k = 0; k < C; ++k) mean[k] += S(0.125), var[k] *= S(1.5);
        Buffer<T> y(c.shape, c.out);
        bn::normalize<T>(g, {x.data(), x.strides()}, {y.data(), y.strides()}, mean.data(), var.data(), affine,
                         this->eps, act);
        std::vector<double> want(bntest::numel(c.shape));
        ref::normalize<T>(g, {x.data(), x.strides()}, Out<double>{want.data()}, mean.data(), var.data(), affine,
                          this->eps, act);
        double scale = bntest::max_abs(want) + 1;
        for (std::size_t k = 0; k < C; ++k)
          scale = std::max(scale, std::fabs(mean[k] / std::sqrt(var[k] + this->eps)) * 1.5 + 1);
        EXPECT_TRUE(this->close_values(y.values(), want, scale));
        EXPECT_TRUE(y.gaps_intact()) << "normalize wrote outside y";
      }
}

TYPED_TEST(Functional, Forward) {
  for (const Case& c : cases())
    for (Activation act : {Activation::none, Activation::relu})
      for (bool affine_given : {false, true}) this->check_forward(c, act, affine_given);
}

TYPED_TEST(Functional, ForwardAndNormalizeInPlace) {
  using T = TypeParam;
  using S = stat_t<T>;
  for (const Case& c : in_place_cases()) {
    SCOPED_TRACE(c.name);
    auto [g, C, x, params] = this->setup(c);
    Buffer<T> y(c.shape, c.x);
    std::vector<S> mean(C), var(C), inv(C), mean2(C), var2(C), inv2(C);
    bn::forward<T>(g, {x.data(), x.strides()}, {y.data(), y.strides()}, params.affine(true), this->eps,
                   Activation::relu, mean.data(), var.data(), inv.data());
    auto z = x;  // normalize in place on a copy
    bn::forward<T>(g, {x.data(), x.strides()}, {x.data(), x.strides()}, params.affine(true), this->eps,
                   Activation::relu, mean2.data(), var2.data(), inv2.data());
    EXPECT_TRUE(bntest::bitwise_equal(x.values(), y.values())) << "forward in place";
    EXPECT_TRUE(bntest::bitwise_equal(mean, mean2));
    EXPECT_TRUE(bntest::bitwise_equal(inv, inv2));
    EXPECT_TRUE(x.gaps_intact());
    Buffer<T> w(c.shape, c.x);
    bn::normalize<T>(g, {z.data(), z.strides()}, {w.data(), w.strides()}, mean.data(), var.data(), params.affine(true),
                     this->eps, Activation::relu);
    bn::normalize<T>(g, {z.data(), z.strides()}, {z.data(), z.strides()}, mean.data(), var.data(), params.affine(true),
                     this->eps, Activation::relu);
    EXPECT_TRUE(bntest::bitwise_equal(z.values(), w.values())) << "normalize in place";
  }
}

TYPED_TEST(Functional, Backward) {
  for (const Case& c : cases())
    for (Statistics st : {Statistics::batch, Statistics::fixed})
      for (Activation act : {Activation::none, Activation::relu})
        for (bool affine_given : {false, true}) this->check_backward(c, st, act, affine_given);
}

// Runs longer than the library's work piece (2^15 values), not a multiple of it, with unit,
// gapped and reversed strides: the pieces of a run must add up to the whole.
TYPED_TEST(Functional, LongRuns) {
  const std::vector<Case> long_cases = {
      {"c3_runs_40000", {2, 3, 40000}, {1}, {}, {}},
      {"c1_run_70001", {70001, 1}, {1}, {}, {}},
      {"gapped_runs", {2, 40000}, {0}, make_strides({2, 40000}, {}, {1, 2}), {}},
      {"reversed_runs",
       {2, 40000},
       {0},
       make_strides({2, 40000}, {}, {}, {false, true}),
       make_strides({2, 40000}, {}, {}, {true, true})},
  };
  for (const Case& c : long_cases) {
    this->check_forward(c, Activation::relu, true);
    this->check_backward(c, Statistics::batch, Activation::relu, true);
  }
}

// Arrays of a few MiB: after the sums, the elementwise pass of a training forward or a
// backward walks each thread's share back to front in 2 MiB chunks; every chunk and the
// share's first, partial one must be written exactly once (rows and short runs).
TYPED_TEST(Functional, BackToFrontChunks) {
  const std::vector<Case> big_cases = {
      {"rows_2100x512", {2100, 512}, {1}, {}, {}},
      {"short_runs_96x256x7x7", {96, 256, 7, 7}, {1}, {}, {}},
  };
  for (const Case& c : big_cases) {
    this->check_forward(c, Activation::none, true);
    this->check_backward(c, Statistics::batch, Activation::relu, true);
  }
}

TYPED_TEST(Functional, BackwardInPlace) {
  using T = TypeParam;
  using S = stat_t<T>;
  for (const Case& c : in_place_cases()) {
    SCOPED_TRACE(c.name);
    auto [g, C, x, params] = this->setup(c);
    std::vector<S> mean(C), var(C), inv(C), dgamma(C), dbeta(C), dgamma2(C), dbeta2(C);
    bn::moments<T>(g, {x.data(), x.strides()}, mean.data(), var.data());
    for (std::size_t k = 0; k < C; ++k) inv[k] = S(1) / std::sqrt(var[k] + S(this->eps));
    auto dy = this->make_dy(c);
    Buffer<T> dx(c.shape, c.out);
    bn::backward<T>(g, {dy.data(), dy.strides()}, {x.data(), x.strides()}, {dx.data(), dx.strides()}, mean.data(),
                    inv.data(), params.affine(true), Activation::relu, dgamma.data(), dbeta.data());
    // dx over dy (same layout).
    auto dy2 = dy;
    bn::backward<T>(g, {dy2.data(), dy2.strides()}, {x.data(), x.strides()}, {dy2.data(), dy2.strides()}, mean.data(),
                    inv.data(), params.affine(true), Activation::relu, dgamma2.data(), dbeta2.data());
    EXPECT_TRUE(bntest::bitwise_equal(dy2.values(), dx.values())) << "dx over dy";
    EXPECT_TRUE(bntest::bitwise_equal(dgamma2, dgamma));
    EXPECT_TRUE(bntest::bitwise_equal(dbeta2, dbeta));
    // dx over x, where dy has x's layout.
    Buffer<T> dy3(c.shape, c.x), dx3(c.shape, c.x);
    dy3.set(dy.values());
    bn::backward<T>(g, {dy3.data(), dy3.strides()}, {x.data(), x.strides()}, {dx3.data(), dx3.strides()}, mean.data(),
                    inv.data(), params.affine(true), Activation::relu, dgamma.data(), dbeta.data());
    bn::backward<T>(g, {dy3.data(), dy3.strides()}, {x.data(), x.strides()}, {x.data(), x.strides()}, mean.data(),
                    inv.data(), params.affine(true), Activation::relu, dgamma2.data(), dbeta2.data());
    EXPECT_TRUE(bntest::bitwise_equal(x.values(), dx3.values())) << "dx over x";
    EXPECT_TRUE(bntest::bitwise_equal(dgamma2, dgamma));
  }
}

// The documented promise: backward rebuilds the forward's ReLU mask bit for bit, so with
// dy = 1 and fixed statistics dx is non-zero exactly where forward's y is positive.
TYPED_TEST(Functional, BackwardReluMaskIsForwardsMask) {
  using T = TypeParam;
  using S = stat_t<T>;
  for (const Case& c : cases())
    for (bool affine_given : {false, true}) {
      SCOPED_TRACE(c.name + (affine_given ? " gamma/beta" : " no gamma/beta"));
      const Geometry g{c.shape, c.axes};
      const auto C = static_cast<std::size_t>(this->channels(c));
      auto x = this->make_x(c);
      const auto params = this->make_params(static_cast<index_t>(C));
      const Affine<S> affine = params.affine(affine_given);
      Buffer<T> y(c.shape, c.out), dy(c.shape, c.out), dx(c.shape, c.out);
      std::vector<S> mean(C), var(C), inv(C), dgamma(C), dbeta(C);
      bn::forward<T>(g, {x.data(), x.strides()}, {y.data(), y.strides()}, affine, this->eps, Activation::relu,
                     mean.data(), var.data(), inv.data());
      dy.set(std::vector<T>(bntest::numel(c.shape), from_d<T>(1.0)));
      bn::backward<T>(g, {dy.data(), dy.strides()}, {x.data(), x.strides()}, {dx.data(), dx.strides()}, mean.data(),
                      inv.data(), affine, Activation::relu, dgamma.data(), dbeta.data(), Statistics::fixed);
      const auto yv = y.values(), dxv = dx.values();
      int mismatches = 0;
      for (std::size_t i = 0; i < yv.size(); ++i)
        if ((to_d(yv[i]) > 0) != (to_d(dxv[i]) != 0)) ++mismatches;
      EXPECT_EQ(mismatches, 0);
      // dbeta counts the unmasked elements per channel.
      double total = 0;
      for (S v : dbeta) total += static_cast<double>(v);
      EXPECT_EQ(total, static_cast<double>(std::count_if(yv.begin(), yv.end(), [](T v) { return to_d(v) > 0; })));
    }
}

// Infinities and NaNs propagate as IEEE arithmetic does (mean([inf, 1, 2]) = inf, and the
// variance of anything with an infinity is NaN), whichever position they hold in the
// channel, in the rows (channels_last) and the runs (channels_first) kernels alike.
TYPED_TEST(Functional, NonFiniteValuesPropagate) {
  using T = TypeParam;
  using S = stat_t<T>;
  const double inf = std::numeric_limits<double>::infinity(), nan = std::nan("");
  // Five channels of three values: inf first, inf later, NaN first, -inf and inf, finite.
  const std::vector<std::vector<double>> channel_values = {
      {inf, 1, 2}, {1, inf, 2}, {nan, 1, 2}, {-inf, inf, 1}, {1, 2, 3}};
  for (bool channels_last : {true, false}) {
    SCOPED_TRACE(channels_last ? "channels_last" : "channels_first");
    const Shape shape = channels_last ? Shape{3, 5} : Shape{5, 3};
    const Geometry g{shape, {channels_last ? 1 : 0}};
    std::vector<T> x(15);
    for (std::size_t c = 0; c < 5; ++c)
      for (std::size_t i = 0; i < 3; ++i) x[channels_last ? i * 5 + c : c * 3 + i] = from_d<T>(channel_values[c][i]);
    std::vector<S> mean(5), var(5), inv(5);
    std::vector<double> want_mean(5), want_var(5);
    bn::moments<T>(g, {x.data()}, mean.data(), var.data());
    ref::moments<T>(g, {x.data()}, want_mean.data(), want_var.data());
    auto same_class = [](double got, double want) {
      return (std::isnan(got) && std::isnan(want)) || (std::isinf(got) && got == want) ||
             (std::isfinite(got) && std::isfinite(want) && std::fabs(got - want) <= 1e-6 * (1 + std::fabs(want)));
    };
    for (std::size_t c = 0; c < 5; ++c) {
      EXPECT_PRED2(same_class, static_cast<double>(mean[c]), want_mean[c]) << "mean of channel " << c;
      EXPECT_PRED2(same_class, static_cast<double>(var[c]), want_var[c]) << "variance of channel " << c;
    }
    EXPECT_EQ(want_mean[0], inf);
    EXPECT_TRUE(std::isnan(want_var[0]));
    EXPECT_TRUE(std::isnan(want_mean[3]));
    std::vector<T> out(15);
    bn::forward<T>(g, {x.data()}, {out.data()}, {}, 1e-5, Activation::none, mean.data(), var.data(), inv.data());
    EXPECT_NEAR(static_cast<double>(mean[4]), 2.0, 1e-6);
    EXPECT_NEAR(static_cast<double>(var[4]), 2.0 / 3, 1e-6);
    EXPECT_TRUE(std::isnan(static_cast<double>(inv[0])));
  }
}

// The same promise where it is hardest to keep: values placed right at the ReLU kink, where
// a*(x - m) + b is within a few roundings of 0, so a forward and a backward that rounded the
// pre-activation differently (e.g. one fused multiply-add against a multiply and an add)
// would disagree. Statistics are chosen so that inv_std = 2 exactly in both passes.
TYPED_TEST(Functional, ReluMaskConsistentAtTheKink) {
  using T = TypeParam;
  using S = stat_t<T>;
  constexpr std::size_t C = 4, N = 401;
  std::vector<S> gamma(C), beta(C), mean(C), var(C, S(0.25)), inv(C, S(2));
  std::vector<std::vector<T>> values(C);
  for (std::size_t c = 0; c < C; ++c) {
    gamma[c] = S(0.3 + 0.173 * static_cast<double>(c));
    beta[c] = S(0.37 + 0.0517 * static_cast<double>(c));
    mean[c] = S(0.1 * static_cast<double>(c));
    const double a = static_cast<double>(gamma[c]) * 2;
    T x = from_d<T>(static_cast<double>(mean[c]) - static_cast<double>(beta[c]) / a);  // z ~ 0 here
    for (std::size_t k = 0; k < N / 2; ++k) x = bntest::next_down(x);
    for (std::size_t k = 0; k < N; ++k, x = bntest::next_up(x)) values[c].push_back(x);
  }
  for (bool channels_last : {false, true}) {
    SCOPED_TRACE(channels_last ? "channels_last" : "channels_first");
    const Shape shape = channels_last ? Shape{N, C} : Shape{C, N};
    const Geometry g{shape, {channels_last ? 1 : 0}};
    std::vector<T> x(C * N), y(C * N), dx(C * N), dy(C * N, from_d<T>(1.0));
    for (std::size_t c = 0; c < C; ++c)
      for (std::size_t i = 0; i < N; ++i) x[channels_last ? i * C + c : c * N + i] = values[c][i];
    const Affine<S> affine{gamma.data(), beta.data()};
    bn::normalize<T>(g, {x.data()}, {y.data()}, mean.data(), var.data(), affine, 0.0, Activation::relu);
    std::vector<S> dgamma(C), dbeta(C);
    bn::backward<T>(g, {dy.data()}, {x.data()}, {dx.data()}, mean.data(), inv.data(), affine, Activation::relu,
                    dgamma.data(), dbeta.data(), Statistics::fixed);
    int positive = 0, mismatches = 0;
    std::vector<double> passed_per_channel(C, 0.0);
    for (std::size_t i = 0; i < x.size(); ++i) {
      const bool y_positive = to_d(y[i]) > 0, passed = to_d(dx[i]) != 0;
      positive += y_positive;
      passed_per_channel[channels_last ? i % C : i / N] += passed;
      // float16 cannot hold the tiniest positive pre-activations (they round to +0), so
      // there only y > 0 => passed, and passed => y is not negative, can be required.
      if (std::is_same_v<T, bn::float16_t> ? (y_positive && !passed) || (passed && std::signbit(to_d(y[i])))
                                           : y_positive != passed)
        if (mismatches++ < 5)
          ADD_FAILURE() << "element " << i << ": x = " << to_d(x[i]) << ", y = " << to_d(y[i])
                        << ", dx = " << to_d(dx[i]);
    }
    EXPECT_EQ(mismatches, 0);
    EXPECT_GT(positive, 0);
    EXPECT_LT(positive, static_cast<int>(x.size()));
    // The reduction pass masks the same elements: dbeta = sum of dy = 1 over the unmasked ones.
    for (std::size_t c = 0; c < C; ++c)
      EXPECT_EQ(static_cast<double>(dbeta[c]), passed_per_channel[c]) << "dbeta of channel " << c;
  }
}

TYPED_TEST(Functional, PartialMomentsMerge) {
  using T = TypeParam;
  // Two batches of one NCHW array (first 2 of 6, last 4), merged, vs the whole array's moments.
  const Case whole{"whole", {6, 4, 5}, {1}, {}, {}};
  auto x = this->make_x(whole);
  const Geometry ga{{2, 4, 5}, {1}}, gb{{4, 4, 5}, {1}};
  std::vector<double> ma(4), m2a(4), mb(4), m2b(4);
  EXPECT_EQ(bn::partial_moments<T>(ga, {x.data()}, ma.data(), m2a.data()), 10);
  EXPECT_EQ(bn::partial_moments<T>(gb, {x.data() + 40}, mb.data(), m2b.data()), 20);
  std::vector<double> na(4, 10.0), nb(4, 20.0);
  bn::merge_moments(4, na.data(), ma.data(), m2a.data(), nb.data(), mb.data(), m2b.data());
  std::vector<double> want_mean(4), want_var(4), var(4);
  ref::moments<T>(Geometry{whole.shape, whole.axes}, {x.data()}, want_mean.data(), want_var.data());
  for (std::size_t c = 0; c < 4; ++c) var[c] = m2a[c] / na[c];
  EXPECT_EQ(na, std::vector<double>(4, 30.0));
  EXPECT_TRUE(bntest::all_close(ma, want_mean, 1e-13, 1e-13));
  EXPECT_TRUE(bntest::all_close(var, want_var, 1e-12, 0));
  // An empty batch is allowed and merges as a no-op.
  std::vector<double> me(4, -1), m2e(4, -1), ne(4, 0.0);
  EXPECT_EQ(bn::partial_moments<T>(Geometry{{0, 4, 5}, {1}}, {nullptr}, me.data(), m2e.data()), 0);
  EXPECT_EQ(me, std::vector<double>(4, 0.0));
  EXPECT_EQ(m2e, std::vector<double>(4, 0.0));
  const auto before = ma;
  bn::merge_moments(4, na.data(), ma.data(), m2a.data(), ne.data(), me.data(), m2e.data());
  EXPECT_EQ(ma, before);
  // Merging into an empty accumulator copies.
  std::vector<double> n0(4, 0.0), m0(4, 0.0), m20(4, 0.0);
  bn::merge_moments(4, n0.data(), m0.data(), m20.data(), na.data(), ma.data(), m2a.data());
  EXPECT_EQ(n0, na);
  EXPECT_TRUE(bntest::all_close(m0, ma, 1e-15, 0));
}

TYPED_TEST(Functional, BackwardSumsAndParameterGradientsAreBackward) {
  using T = TypeParam;
  using S = stat_t<T>;
  // backward_sums, parameter_gradients and backward_apply give backward's outputs bit for bit.
  const Case c{"nchw", {3, 4, 5}, {1}, {}, {}};
  const std::vector<T> x = this->make_x(c).values();
  const Geometry g{c.shape, c.axes};
  std::vector<S> mean(4), var(4), inv(4), gamma{S(0.5), S(1), S(2), S(-1)}, beta{S(0), S(1), S(-1), S(2)};
  std::vector<T> y(x.size()), dy(x.size());
  std::normal_distribution<double> normal;
  for (auto& v : dy) v = from_d<T>(normal(this->rng));
  bn::forward<T>(g, {x.data()}, {y.data()}, {gamma.data(), beta.data()}, 1e-3, Activation::relu, mean.data(),
                 var.data(), inv.data());
  const Affine<S> affine{gamma.data(), beta.data()};
  std::vector<T> dx(x.size()), dx2(x.size());
  std::vector<S> dgamma(4), dbeta(4), dgamma2(4), dbeta2(4);
  bn::backward<T>(g, {dy.data()}, {x.data()}, {dx.data()}, mean.data(), inv.data(), affine, Activation::relu,
                  dgamma.data(), dbeta.data());
  std::vector<double> s(4), sx(4);
  bn::backward_sums<T>(g, {dy.data()}, {x.data()}, mean.data(), inv.data(), affine, Activation::relu, s.data(),
                       sx.data());
  bn::parameter_gradients<S>(4, inv.data(), s.data(), sx.data(), dgamma2.data(), dbeta2.data());
  bn::backward_apply<T>(g, {dy.data()}, {x.data()}, {dx2.data()}, mean.data(), inv.data(), affine, Activation::relu,
                        s.data(), sx.data(), 15.0);
  EXPECT_EQ(dgamma2, dgamma);
  EXPECT_EQ(dbeta2, dbeta);
  for (std::size_t i = 0; i < dx.size(); ++i) EXPECT_EQ(bntest::bits_of(dx2[i]), bntest::bits_of(dx[i])) << i;
  // inv_std 0 (a variance beyond the range): dgamma 0 whatever the sum of products holds.
  const std::vector<S> zero(2, S(0));
  const std::vector<double> sums{2.0, -3.0},
      products{std::numeric_limits<double>::infinity(), std::numeric_limits<double>::quiet_NaN()};
  std::vector<S> dg(2), db(2);
  bn::parameter_gradients<S>(2, zero.data(), sums.data(), products.data(), dg.data(), db.data());
  EXPECT_EQ(dg, zero);
  EXPECT_EQ(db, (std::vector<S>{S(2), S(-3)}));
  EXPECT_THROW(bn::parameter_gradients<S>(2, nullptr, sums.data(), products.data(), dg.data(), db.data()),
               bn::value_error);
}

TYPED_TEST(Functional, NormalizeReturnsInvStd) {
  using T = TypeParam;
  using S = stat_t<T>;
  const Case c{"nchw", {6, 4, 5}, {1}, {}, {}};
  const Geometry g{c.shape, c.axes};
  auto x = this->make_x(c);
  Buffer<T> y(c.shape, {}), z(c.shape, {});
  std::vector<S> mean(4), var(4), inv(4), got(4, S(-1));
  bn::forward<T>(g, {x.data()}, {y.data()}, {}, this->eps, Activation::none, mean.data(), var.data(), inv.data());
  bn::normalize<T>(g, {x.data()}, {z.data()}, mean.data(), var.data(), {}, this->eps, Activation::none, got.data());
  for (std::size_t i = 0; i < 4; ++i) {  // 1/sqrt(variance + eps) of the stored variance, rounded as forward's
    const auto want = static_cast<S>(1.0 / std::sqrt(static_cast<double>(var[i]) + this->eps));
    EXPECT_EQ(got[i], want) << "channel " << i;
    EXPECT_NEAR(static_cast<double>(got[i]), static_cast<double>(inv[i]),
                2 * this->stat_rtol * static_cast<double>(inv[i]));
  }
  if constexpr (std::is_same_v<T, double>) {
    EXPECT_EQ(got, inv);
  }
  // Written for an empty batch too; the default (null) writes nothing.
  std::vector<S> empty_inv(4, S(-1));
  bn::normalize<T>(Geometry{{0, 4, 5}, {1}}, {nullptr}, {nullptr}, mean.data(), var.data(), {}, this->eps,
                   Activation::none, empty_inv.data());
  EXPECT_EQ(empty_inv, got);
}

// ---- thread counts -------------------------------------------------------------------------

struct ThreadRun {
  std::vector<float> y, mean, var, inv, dx, dgamma, dbeta;
};

ThreadRun run_all(const Case& c, const Buffer<float>& x, const Buffer<float>& dy, const std::vector<float>& gamma,
                  const std::vector<float>& beta) {
  const Geometry g{c.shape, c.axes};
  const auto C = static_cast<std::size_t>(bn::extent(g).channels);
  ThreadRun r;
  r.mean.resize(C), r.var.resize(C), r.inv.resize(C), r.dgamma.resize(C), r.dbeta.resize(C);
  Buffer<float> y(c.shape, c.out), dx(c.shape, c.out);
  const Affine<float> affine{gamma.data(), beta.data()};
  bn::forward<float>(g, {x.data(), x.strides()}, {y.data(), y.strides()}, affine, 1e-5, Activation::relu, r.mean.data(),
                     r.var.data(), r.inv.data());
  bn::backward<float>(g, {dy.data(), dy.strides()}, {x.data(), x.strides()}, {dx.data(), dx.strides()}, r.mean.data(),
                      r.inv.data(), affine, Activation::relu, r.dgamma.data(), r.dbeta.data());
  r.y = y.values();
  r.dx = dx.values();
  return r;
}

TEST(Threads, CountsAgreeAndRepeatedCallsAreBitwiseIdentical) {
  bntest::ThreadGuard guard;
  const Shape nchw = {16, 8, 48, 48};  // 294912 elements >= 2^18
  const std::vector<Case> big = {
      {"channels_first", nchw, {1}, {}, {}},
      {"channels_last", {16, 48, 48, 8}, {-1}, {}, {}},
      {"channels_last_view", nchw, {1}, make_strides(nchw, {0, 2, 3, 1}), make_strides(nchw, {0, 2, 3, 1})},
      {"row_groups", nchw, {1, 3}, {}, {}},
      {"strided", nchw, {1}, make_strides(nchw, {0, 2, 3, 1}), {}},
      {"row_groups_few_values", {64, 2, 2304}, {0, 2}, {}, {}},
      {"one_channel", {8, 1, 192, 192}, {1}, {}, {}},
      {"many_channels_few_values", {2, 147456}, {1}, {}, {}},
  };
  std::mt19937_64 rng(42);
  for (const Case& c : big) {
    SCOPED_TRACE(c.name);
    ASSERT_GE(bntest::numel(c.shape), std::size_t{1} << 18);
    const auto C = static_cast<std::size_t>(bn::extent(Geometry{c.shape, c.axes}).channels);
    Buffer<float> x(c.shape, c.x), dy(c.shape, c.out);
    x.set(bntest::normal<float>(bntest::numel(c.shape), 0.5, 2.0, rng));
    dy.set(bntest::normal<float>(bntest::numel(c.shape), 0.0, 1.0, rng));
    const auto gamma = bntest::uniform<float>(C, 0.5, 1.5, rng), beta = bntest::uniform<float>(C, -0.5, 0.5, rng);
    ThreadRun one;
    for (int nt : {1, 2, 3}) {
      SCOPED_TRACE(::testing::Message() << nt << " threads");
      bn::set_num_threads(nt);
      EXPECT_EQ(bn::get_num_threads(), nt);
      const ThreadRun a = run_all(c, x, dy, gamma, beta);
      const ThreadRun b = run_all(c, x, dy, gamma, beta);
      for (auto field : {&ThreadRun::y, &ThreadRun::mean, &ThreadRun::var, &ThreadRun::inv, &ThreadRun::dx,
                         &ThreadRun::dgamma, &ThreadRun::dbeta})
        EXPECT_TRUE(bntest::bitwise_equal(a.*field, b.*field)) << "repeated call differs";
      if (nt == 1) {
        one = a;
        continue;
      }
      for (auto field : {&ThreadRun::y, &ThreadRun::mean, &ThreadRun::var, &ThreadRun::inv, &ThreadRun::dx,
                         &ThreadRun::dgamma, &ThreadRun::dbeta})
        EXPECT_TRUE(bntest::all_close(a.*field, one.*field, 1e-6, 1e-6 * bntest::max_abs(one.*field)))
            << "differs from 1 thread";
    }
  }
}

TEST(Threads, SetAndGet) {
  bntest::ThreadGuard guard;
  EXPECT_GE(bn::get_num_threads(), 1);
  bn::set_num_threads(2);
  EXPECT_EQ(bn::get_num_threads(), 2);
  EXPECT_THROW(bn::set_num_threads(0), bn::value_error);
  EXPECT_THROW(bn::set_num_threads(-3), std::invalid_argument);
  EXPECT_EQ(bn::get_num_threads(), 2);
}

// ---- numerics ------------------------------------------------------------------------------

// float32 data far from zero (mean/std = 1e4 and 1e6): the textbook E[x^2] - E[x]^2 would
// lose every digit; the variance must match the double two-pass reference to 1e-5.
TEST(Numerics, Float32FarFromZero) {
  std::mt19937_64 rng(7);
  for (double offset : {1e4, 1e6})
    for (const Case& c :
         std::vector<Case>{{"nchw", {4, 3, 128, 128}, {1}, {}, {}}, {"nhwc", {4, 128, 128, 3}, {-1}, {}, {}}}) {
      SCOPED_TRACE(::testing::Message() << c.name << " mean " << offset);
      const Geometry g{c.shape, c.axes};
      Buffer<float> x(c.shape, c.x);
      x.set(bntest::normal<float>(bntest::numel(c.shape), offset, 1.0, rng));
      std::vector<float> mean(3), var(3), inv(3);
      std::vector<double> want_mean(3), want_var(3);
      ref::moments<float>(g, {x.data()}, want_mean.data(), want_var.data());
      bn::moments<float>(g, {x.data()}, mean.data(), var.data());
      EXPECT_TRUE(bntest::all_close(var, want_var, 1e-5, 0)) << "moments variance";
      EXPECT_TRUE(bntest::all_close(mean, want_mean, 1e-7, 0)) << "moments mean";
      Buffer<float> y(c.shape, c.out);
      bn::forward<float>(g, {x.data()}, {y.data()}, {}, 1e-5, Activation::none, mean.data(), var.data(), inv.data());
      EXPECT_TRUE(bntest::all_close(var, want_var, 1e-5, 0)) << "forward variance";
      // An outlier as each channel's first value (the library's shift) changes nothing.
      auto v = x.values();
      for (std::size_t i = 0; i < v.size(); ++i)
        if (c.axes[0] == 1 ? (i % (128 * 128) == 0) : (i < 3)) v[i] = static_cast<float>(offset + 50);
      x.set(v);
      ref::moments<float>(g, {x.data()}, want_mean.data(), want_var.data());
      bn::moments<float>(g, {x.data()}, mean.data(), var.data());
      EXPECT_TRUE(bntest::all_close(var, want_var, 1e-5, 0)) << "variance with an outlier first";
    }
}

// float16 data whose squares (and sums) exceed float16's range (65504): the statistics are
// accumulated wider, so they are finite and match the reference.
TEST(Numerics, Float16BeyondItsRange) {
  std::mt19937_64 rng(11);
  for (const auto& [offset, stddev] : std::vector<std::pair<double, double>>{{1000.0, 300.0}, {30000.0, 3000.0}}) {
    SCOPED_TRACE(::testing::Message() << "mean " << offset);
    const Geometry g{{64, 4, 256}, {1}};
    Buffer<bn::float16_t> x({64, 4, 256}, {});
    x.set(bntest::normal<bn::float16_t>(64 * 4 * 256, offset, stddev, rng));
    std::vector<float> mean(4), var(4), inv(4);
    std::vector<double> want_mean(4), want_var(4), want_inv(4), want_y(64 * 4 * 256);
    Buffer<bn::float16_t> y({64, 4, 256}, {});
    bn::forward<bn::float16_t>(g, {x.data()}, {y.data()}, {}, 1e-5, Activation::none, mean.data(), var.data(),
                               inv.data());
    ref::forward<bn::float16_t>(g, {x.data()}, Out<double>{want_y.data()}, {}, 1e-5, Activation::none, want_mean.data(),
                                want_var.data(), want_inv.data());
    for (float v : var) EXPECT_TRUE(std::isfinite(v) && v > 65504.0f) << v;
    EXPECT_TRUE(bntest::all_close(mean, want_mean, 1e-6, 0));
    EXPECT_TRUE(bntest::all_close(var, want_var, 1e-5, 0));
    EXPECT_TRUE(bntest::all_close(inv, want_inv, 1e-5, 0));
    EXPECT_TRUE(bntest::all_close(y.values(), want_y, 2 * 0x1p-11, 1e-3));
    // moments agrees with forward.
    std::vector<float> mean2(4), var2(4);
    bn::moments<bn::float16_t>(g, {x.data()}, mean2.data(), var2.data());
    EXPECT_TRUE(bntest::bitwise_equal(mean2, mean));
    EXPECT_TRUE(bntest::bitwise_equal(var2, var));
  }
}

// bfloat16 data whose sum of squares overflows float (values ~1e18, squares ~1e36, 2^16 of them).
TEST(Numerics, BFloat16SumOfSquaresBeyondFloat) {
  std::mt19937_64 rng(13);
  const Geometry g{{2, 65536}, {0}};
  Buffer<bn::bfloat16_t> x({2, 65536}, {});
  x.set(bntest::normal<bn::bfloat16_t>(2 * 65536, 1e18, 1e17, rng));
  std::vector<float> mean(2), var(2);
  std::vector<double> want_mean(2), want_var(2);
  bn::moments<bn::bfloat16_t>(g, {x.data()}, mean.data(), var.data());
  ref::moments<bn::bfloat16_t>(g, {x.data()}, want_mean.data(), want_var.data());
  EXPECT_TRUE(bntest::all_close(mean, want_mean, 1e-6, 0));
  EXPECT_TRUE(bntest::all_close(var, want_var, 1e-5, 0));
}

// ---- errors --------------------------------------------------------------------------------

TEST(Errors, FeatureAxes) {
  EXPECT_EQ(bn::feature_axes({-1, 0}, 3), (Axes{0, 2}));
  EXPECT_THROW(bn::feature_axes({}, 3), bn::value_error);
  EXPECT_THROW(bn::feature_axes({3}, 3), bn::value_error);
  EXPECT_THROW(bn::feature_axes({-4}, 3), bn::value_error);
  try {
    bn::feature_axes({2, -1}, 3);
    ADD_FAILURE() << "a repeated axis was accepted";
  } catch (const bn::value_error& e) {
    EXPECT_EQ(std::string(e.what()), "axis -1 is repeated in the feature axes (2, -1)");
  }
}

TEST(Errors, Epsilon) {
  std::vector<float> x(12, 1.0f), y(12), mean(3, 0.0f), var(3, 1.0f), inv(3);
  const Geometry g{{4, 3}, {1}};
  for (double eps : {-1e-5, std::nan(""), std::numeric_limits<double>::infinity()}) {
    SCOPED_TRACE(eps);
    EXPECT_THROW(bn::normalize<float>(g, {x.data()}, {y.data()}, mean.data(), var.data(), {}, eps), bn::value_error);
    EXPECT_THROW(
        bn::forward<float>(g, {x.data()}, {y.data()}, {}, eps, Activation::none, mean.data(), var.data(), inv.data()),
        bn::value_error);
  }
  EXPECT_NO_THROW(bn::normalize<float>(g, {x.data()}, {y.data()}, mean.data(), var.data(), {}, 0.0));
  // The value as it reads back, not std::to_string's six decimals.
  for (const auto& [eps, text] : {std::pair{-1e-9, "-1e-09"}, {-0.1, "-0.1"}, {-1.0 / 3, "-0.3333333333333333"}}) {
    try {
      bn::normalize<float>(g, {x.data()}, {y.data()}, mean.data(), var.data(), {}, eps);
      ADD_FAILURE() << "epsilon " << text << " was accepted";
    } catch (const bn::value_error& e) {
      EXPECT_EQ(std::string(e.what()), std::string("epsilon must be a finite number >= 0, got ") + text);
    }
  }
}

TEST(Errors, EmptyBatch) {
  std::vector<float> mean(3, -1.0f), var(3, -1.0f), inv(3), dgamma(3, -1.0f), dbeta(3, -1.0f);
  float dummy = 0;
  const Geometry g{{0, 3}, {1}};
  EXPECT_THROW(bn::moments<float>(g, {&dummy}, mean.data(), var.data()), bn::value_error);
  EXPECT_THROW(
      bn::forward<float>(g, {&dummy}, {&dummy}, {}, 1e-5, Activation::none, mean.data(), var.data(), inv.data()),
      bn::value_error);
  EXPECT_THROW(bn::moments<double>(Geometry{{3, 0, 2}, {0}}, {nullptr}, nullptr, nullptr), bn::value_error);
  // normalize on nothing is a no-op; backward on nothing has zero gradients for gamma and beta.
  EXPECT_NO_THROW(bn::normalize<float>(g, {nullptr}, {nullptr}, mean.data(), var.data(), {}, 1e-5));
  bn::backward<float>(g, {nullptr}, {nullptr}, {nullptr}, mean.data(), var.data(), {}, Activation::none, dgamma.data(),
                      dbeta.data());
  EXPECT_EQ(dgamma, std::vector<float>(3, 0.0f));
  EXPECT_EQ(dbeta, std::vector<float>(3, 0.0f));
  // No channels: nothing to compute, nothing written.
  EXPECT_EQ(bn::moments<float>(Geometry{{4, 0}, {1}}, {nullptr}, mean.data(), var.data()), 4);
}

TEST(Errors, NullPointers) {
  std::vector<float> x(12, 1.0f), y(12), mean(3, 0.0f), var(3, 1.0f), inv(3, 1.0f), dg(3), db(3);
  const Geometry g{{4, 3}, {1}};
  EXPECT_THROW(bn::moments<float>(g, {nullptr}, mean.data(), var.data()), bn::value_error);
  EXPECT_THROW(bn::moments<float>(g, {x.data()}, nullptr, var.data()), bn::value_error);
  EXPECT_THROW(bn::moments<float>(g, {x.data()}, mean.data(), nullptr), bn::value_error);
  EXPECT_THROW(bn::normalize<float>(g, {nullptr}, {y.data()}, mean.data(), var.data(), {}, 1e-5), bn::value_error);
  EXPECT_THROW(bn::normalize<float>(g, {x.data()}, {nullptr}, mean.data(), var.data(), {}, 1e-5), bn::value_error);
  EXPECT_THROW(bn::normalize<float>(g, {x.data()}, {y.data()}, nullptr, var.data(), {}, 1e-5), bn::value_error);
  EXPECT_THROW(bn::normalize<float>(g, {x.data()}, {y.data()}, mean.data(), nullptr, {}, 1e-5), bn::value_error);
  auto fwd = [&](const float* xp, float* yp, float* m, float* v, float* i) {
    bn::forward<float>(g, {xp}, {yp}, {}, 1e-5, Activation::none, m, v, i);
  };
  EXPECT_THROW(fwd(nullptr, y.data(), mean.data(), var.data(), inv.data()), bn::value_error);
  EXPECT_THROW(fwd(x.data(), nullptr, mean.data(), var.data(), inv.data()), bn::value_error);
  EXPECT_THROW(fwd(x.data(), y.data(), nullptr, var.data(), inv.data()), bn::value_error);
  EXPECT_THROW(fwd(x.data(), y.data(), mean.data(), nullptr, inv.data()), bn::value_error);
  EXPECT_THROW(fwd(x.data(), y.data(), mean.data(), var.data(), nullptr), bn::value_error);
  auto bwd = [&](const float* dyp, const float* xp, float* dxp, const float* m, const float* i, float* dgp,
                 float* dbp) { bn::backward<float>(g, {dyp}, {xp}, {dxp}, m, i, {}, Activation::relu, dgp, dbp); };
  EXPECT_THROW(bwd(nullptr, x.data(), y.data(), mean.data(), inv.data(), dg.data(), db.data()), bn::value_error);
  EXPECT_THROW(bwd(x.data(), nullptr, y.data(), mean.data(), inv.data(), dg.data(), db.data()), bn::value_error);
  EXPECT_THROW(bwd(x.data(), x.data(), nullptr, mean.data(), inv.data(), dg.data(), db.data()), bn::value_error);
  EXPECT_THROW(bwd(x.data(), x.data(), y.data(), nullptr, inv.data(), dg.data(), db.data()), bn::value_error);
  EXPECT_THROW(bwd(x.data(), x.data(), y.data(), mean.data(), nullptr, dg.data(), db.data()), bn::value_error);
  EXPECT_THROW(bwd(x.data(), x.data(), y.data(), mean.data(), inv.data(), nullptr, db.data()), bn::value_error);
  EXPECT_THROW(bwd(x.data(), x.data(), y.data(), mean.data(), inv.data(), dg.data(), nullptr), bn::value_error);
  std::vector<double> pm(3), pm2(3);
  EXPECT_THROW(bn::partial_moments<float>(g, {nullptr}, pm.data(), pm2.data()), bn::value_error);
  EXPECT_THROW(bn::partial_moments<float>(g, {x.data()}, nullptr, pm2.data()), bn::value_error);
}

TEST(Errors, ShapesAxesStridesAndOutputs) {
  std::vector<float> x(24, 1.0f), y(24), mean(4), var(4), inv(4);
  EXPECT_THROW(bn::moments<float>(Geometry{{2, 3, 4}, {3}}, {x.data()}, mean.data(), var.data()), bn::value_error);
  EXPECT_THROW(bn::moments<float>(Geometry{{2, 3, 4}, {-4}}, {x.data()}, mean.data(), var.data()), bn::value_error);
  EXPECT_THROW(bn::moments<float>(Geometry{{2, 3, 4}, {2, -1}}, {x.data()}, mean.data(), var.data()), bn::value_error);
  EXPECT_THROW(bn::moments<float>(Geometry{{2, 3, 4}, {}}, {x.data()}, mean.data(), var.data()), bn::value_error);
  EXPECT_THROW(bn::moments<float>(Geometry{{}, {0}}, {x.data()}, mean.data(), var.data()), bn::value_error);
  EXPECT_THROW(bn::moments<float>(Geometry{{2, 3, 4}, {1}}, {x.data(), {12, 4}}, mean.data(), var.data()),
               bn::value_error);
  // An output with a zero stride would write several elements to one place.
  EXPECT_THROW(bn::forward<float>(Geometry{{6, 4}, {1}}, {x.data()}, {y.data(), {0, 1}}, {}, 1e-5, Activation::none,
                                  mean.data(), var.data(), inv.data()),
               bn::value_error);
  EXPECT_THROW(
      bn::normalize<float>(Geometry{{6, 4}, {1}}, {x.data()}, {y.data(), {4, 0}}, mean.data(), var.data(), {}, 1e-5),
      bn::value_error);
  EXPECT_THROW(bn::backward<float>(Geometry{{6, 4}, {1}}, {x.data()}, {x.data()}, {y.data(), {0, 1}}, mean.data(),
                                   var.data(), {}, Activation::none, inv.data(), inv.data()),
               bn::value_error);
  // A zero-stride input is fine.
  EXPECT_NO_THROW(bn::moments<float>(Geometry{{6, 4}, {1}}, {x.data(), {0, 1}}, mean.data(), var.data()));
}

// Strides that give two output elements one location are refused like a zero stride;
// interleaved strides that do not are accepted (checked value by value up to 2^20
// elements, refused beyond, as the Python layer does).
TEST(Errors, SelfOverlappingOutputs) {
  std::vector<float> x(24), mean(3, 0.5f), var(3, 2.0f), inv(3);
  for (std::size_t i = 0; i < x.size(); ++i) x[i] = static_cast<float>(i % 7) - 2.5f;
  std::vector<float> y(64, -7.0f);
  const Geometry g{{4, 3}, {1}};
  auto message = [&](const bn::Strides& ys) {
    try {
      bn::normalize<float>(g, {x.data()}, {y.data(), ys}, mean.data(), var.data(), {}, 1e-5);
    } catch (const bn::value_error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message({1, 1}).find("y overlaps itself"), std::string::npos) << message({1, 1});
  EXPECT_NE(message({2, 1}).find("y overlaps itself"), std::string::npos);
  EXPECT_NE(message({-1, 2}).find("y overlaps itself"), std::string::npos);
  EXPECT_THROW(bn::forward<float>(g, {x.data()}, {y.data(), {1, 1}}, {}, 1e-5, Activation::none, mean.data(),
                                  var.data(), inv.data()),
               bn::value_error);
  EXPECT_THROW(bn::backward<float>(g, {x.data()}, {x.data()}, {y.data(), {2, 1}}, mean.data(), var.data(), {},
                                   Activation::none, var.data(), var.data()),
               bn::value_error);
  // Nested strides (transposed, padded) and interleaved ones without a shared location.
  std::vector<float> dense(12);
  bn::normalize<float>(g, {x.data()}, {dense.data()}, mean.data(), var.data(), {}, 1e-5);
  for (const bn::Strides& ys : {bn::Strides{1, 4}, bn::Strides{5, 1}, bn::Strides{3, 4}, bn::Strides{3, 2}}) {
    SCOPED_TRACE(::testing::Message() << "y strides " << ys[0] << ", " << ys[1]);
    std::fill(y.begin(), y.end(), -7.0f);
    EXPECT_EQ(message(ys), "");
    for (index_t i = 0; i < 4; ++i)
      for (index_t c = 0; c < 3; ++c)
        EXPECT_EQ(y[static_cast<std::size_t>(i * ys[0] + c * ys[1])], dense[static_cast<std::size_t>(i * 3 + c)]);
  }
  // (n, 2) with strides (2, 3): even and odd offsets, never equal, but not nested.
  const index_t big = index_t{1} << 20;
  std::vector<float> xb(static_cast<std::size_t>(2 * big)), yb(static_cast<std::size_t>(2 * big + 2));
  std::vector<float> m2(2, 0.0f), v2(2, 1.0f);
  EXPECT_NO_THROW(
      bn::normalize<float>(Geometry{{1000, 2}, {1}}, {xb.data()}, {yb.data(), {2, 3}}, m2.data(), v2.data(), {}, 1e-5));
  EXPECT_THROW(
      bn::normalize<float>(Geometry{{big, 2}, {1}}, {xb.data()}, {yb.data(), {2, 3}}, m2.data(), v2.data(), {}, 1e-5),
      bn::value_error);
}

TEST(Errors, AllDeriveFromInvalidArgument) {
  static_assert(std::is_base_of_v<std::invalid_argument, bn::value_error>);
  static_assert(std::is_base_of_v<std::invalid_argument, bn::type_error>);
  std::vector<float> x(12, 1.0f), mean(3), var(3);
  EXPECT_THROW(bn::moments<float>(Geometry{{4, 3}, {2}}, {x.data()}, mean.data(), var.data()), std::invalid_argument);
  EXPECT_THROW(bn::moments<float>(Geometry{{0, 3}, {1}}, {x.data()}, mean.data(), var.data()), std::invalid_argument);
  try {
    bn::moments<float>(Geometry{{4, 3}, {7}}, {x.data()}, mean.data(), var.data());
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("axis"), std::string::npos) << e.what();
  }
}

// ---- the reference itself, on values computed by hand ----------------------------------------

TEST(Reference, HandComputedValues) {
  // Two channels (axis 1) of a 3x2 array: channel 0 = {1, 2, 6}, channel 1 = {-1, -1, -1}.
  const std::vector<double> x = {1, -1, 2, -1, 6, -1};
  const Geometry g{{3, 2}, {1}};
  std::vector<double> mean(2), var(2), inv(2), y(6), dx(6), dg(2), db(2);
  ref::moments<double>(g, {x.data()}, mean.data(), var.data());
  EXPECT_EQ(mean, (std::vector<double>{3, -1}));
  EXPECT_DOUBLE_EQ(var[0], 14.0 / 3);
  EXPECT_EQ(var[1], 0);
  const std::vector<double> gamma = {2, 1}, beta = {1, 0};
  ref::forward<double>(g, {x.data()}, {y.data()}, {gamma.data(), beta.data()}, 0.0, Activation::relu, mean.data(),
                       var.data(), inv.data());
  // Channel 1 has variance 0 and epsilon 0: inv_std = inf, y = relu(inf * 0 + 0) = NaN.
  const double s = std::sqrt(14.0 / 3);
  EXPECT_DOUBLE_EQ(inv[0], 1 / s);
  EXPECT_DOUBLE_EQ(y[0], 0.0);  // 2 * (1 - 3) / s + 1 < 0
  EXPECT_DOUBLE_EQ(y[4], 2 * 3 / s + 1);
  // Backward, fixed statistics: dx = gamma * inv_std * dy where the pre-activation > 0.
  const std::vector<double> dy = {1, 1, 1, 1, 1, 1}, m = {3, 0}, is = {1, 1};
  ref::backward<double>(g, {dy.data()}, {x.data()}, {dx.data()}, m.data(), is.data(), {gamma.data(), beta.data()},
                        Activation::relu, dg.data(), db.data(), Statistics::fixed);
  // Channel 0: z = 2*(x-3)+1 = {-3, -1, 7}; channel 1: z = -1 < 0 everywhere.
  EXPECT_EQ(dx, (std::vector<double>{0, 0, 0, 0, 2, 0}));
  EXPECT_EQ(db, (std::vector<double>{1, 0}));
  EXPECT_EQ(dg, (std::vector<double>{3, 0}));
  // Batch statistics, no activation, on channel 0 only: dx sums to 0 and is orthogonal to x_hat.
  const std::vector<double> dy2 = {0.5, 0, -2, 0, 4, 0}, inv0 = {1 / s, 1};
  ref::backward<double>(g, {dy2.data()}, {x.data()}, {dx.data()}, mean.data(), inv0.data(), {}, Activation::none,
                        dg.data(), db.data(), Statistics::batch);
  EXPECT_NEAR(dx[0] + dx[2] + dx[4], 0, 1e-14);
  EXPECT_NEAR(dx[0] * (1 - 3) + dx[2] * (2 - 3) + dx[4] * (6 - 3), 0, 1e-13);
  EXPECT_DOUBLE_EQ(db[0], 2.5);
  EXPECT_DOUBLE_EQ(dg[0], (0.5 * -2 + -2 * -1 + 4 * 3) / s);
}

}  // namespace
