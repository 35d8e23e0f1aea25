// batchnorm::BatchNorm<T> (layer.hpp): its passes against batchnorm::reference, its moving
// statistics against the Keras and PyTorch formulas (hand-computed numbers, and the formulas
// iterated in double over reference moments), backward in training and inference, the fused
// ReLU, layouts, options, and that a call that throws leaves the layer unchanged.
#include <gtest/gtest.h>

#include <cmath>
#include <cstdint>
#include <optional>
#include <random>
#include <string>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "batchnorm/reference.hpp"
#include "test_util.hpp"

namespace {

namespace bn = batchnorm;
namespace ref = batchnorm::reference;
using bn::Activation;
using bn::BatchNorm;
using bn::BatchNormOptions;
using bn::Geometry;
using bn::In;
using bn::index_t;
using bn::Mode;
using bn::Out;
using bn::Shape;
using bn::stat_t;
using bn::Statistics;
using bn::Strides;
using bntest::numel;

template <class S>
std::vector<S> copy_of(const S* p, index_t n) {
  return std::vector<S>(p, p + n);
}

// Everything a call may change, to check that a throwing call changed nothing.
template <class T>
struct Snapshot {
  using S = stat_t<T>;
  std::vector<S> gamma, beta, moving_mean, moving_variance, gamma_grad, beta_grad, last_mean, last_inv_std;
  std::int64_t batches;

  explicit Snapshot(const BatchNorm<T>& l)
      : moving_mean(copy_of(l.moving_mean(), l.channels())),
        moving_variance(copy_of(l.moving_variance(), l.channels())),
        gamma_grad(copy_of(l.gamma_grad(), l.channels())),
        beta_grad(copy_of(l.beta_grad(), l.channels())),
        batches(l.num_batches_tracked()) {
    if (l.gamma()) gamma = copy_of(l.gamma(), l.channels());
    if (l.beta()) beta = copy_of(l.beta(), l.channels());
    if (l.last_mean()) last_mean = copy_of(l.last_mean(), l.channels());
    if (l.last_inv_std()) last_inv_std = copy_of(l.last_inv_std(), l.channels());
  }
};

template <class T>
::testing::AssertionResult same_state(const Snapshot<T>& a, const Snapshot<T>& b) {
  const std::pair<const char*, std::pair<const std::vector<stat_t<T>>*, const std::vector<stat_t<T>>*>> parts[] = {
      {"gamma", {&a.gamma, &b.gamma}},
      {"beta", {&a.beta, &b.beta}},
      {"moving_mean", {&a.moving_mean, &b.moving_mean}},
      {"moving_variance", {&a.moving_variance, &b.moving_variance}},
      {"gamma_grad", {&a.gamma_grad, &b.gamma_grad}},
      {"beta_grad", {&a.beta_grad, &b.beta_grad}},
      {"last_mean", {&a.last_mean, &b.last_mean}},
      {"last_inv_std", {&a.last_inv_std, &b.last_inv_std}}};
  for (const auto& [name, v] : parts) {
    const auto r = bntest::bitwise_equal(*v.first, *v.second);
    if (!r) return ::testing::AssertionFailure() << name << ": " << r.message();
  }
  if (a.batches != b.batches) return ::testing::AssertionFailure() << "num_batches_tracked changed";
  return ::testing::AssertionSuccess();
}

// ---- hand-computed conventions (one channel, x = 1, 2, 3, 4: mean 2.5, biased variance
// 1.25, unbiased 5/3) --------------------------------------------------------------------

TEST(LayerConventions, KerasMomentumWeightsTheOldValue) {
  BatchNorm<double> l(1, BatchNormOptions::keras(0.99));
  const std::vector<double> x{1, 2, 3, 4};
  std::vector<double> y(4);
  l.forward({4, 1}, {x.data()}, {y.data()}, Mode::training);
  EXPECT_NEAR(l.moving_mean()[0], 0.0 - (0.0 - 2.5) * 0.01, 1e-15);       // 0.025
  EXPECT_NEAR(l.moving_variance()[0], 1.0 - (1.0 - 1.25) * 0.01, 1e-15);  // 1.0025, biased
  EXPECT_EQ(l.num_batches_tracked(), 1);
}

TEST(LayerConventions, KerasUnbiasedOption) {
  BatchNorm<double> l(1, BatchNormOptions::keras(0.9, 1e-3, {-1}, /*unbiased=*/true));
  const std::vector<double> x{1, 2, 3, 4};
  std::vector<double> y(4);
  l.forward({4, 1}, {x.data()}, {y.data()}, Mode::training);
  EXPECT_NEAR(l.moving_variance()[0], 1.0 - (1.0 - 5.0 / 3.0) * 0.1, 1e-15);
}

TEST(LayerConventions, KerasOneValuePerChannelGivesZeroVariance) {
  // tf-keras (fused or not): M = 1 trains, batch variance 0, never NaN.
  for (bool unbiased : {false, true}) {
    BatchNorm<float> l(3, BatchNormOptions::keras(0.99, 1e-3, {-1}, unbiased));
    const std::vector<float> x{5, -1, 2};
    std::vector<float> y(3);
    l.forward({1, 3}, {x.data()}, {y.data()}, Mode::training);
    for (int c = 0; c < 3; ++c) {
      EXPECT_FLOAT_EQ(l.moving_variance()[c], 0.99f);
      EXPECT_FLOAT_EQ(y[static_cast<std::size_t>(c)], 0.0f);  // beta
    }
  }
}

TEST(LayerConventions, PyTorchMomentumWeightsTheNewValue) {
  BatchNorm<double> l(1, BatchNormOptions::pytorch(0.1));
  const std::vector<double> x{1, 2, 3, 4};
  std::vector<double> y(4);
  l.forward({4, 1}, {x.data()}, {y.data()}, Mode::training);
  EXPECT_NEAR(l.moving_mean()[0], 0.9 * 0.0 + 0.1 * 2.5, 1e-15);              // 0.25
  EXPECT_NEAR(l.moving_variance()[0], 0.9 * 1.0 + 0.1 * (5.0 / 3.0), 1e-15);  // unbiased
  // The output is normalized with the biased variance all the same.
  EXPECT_NEAR(y[0], (1 - 2.5) / std::sqrt(1.25 + 1e-5), 1e-12);
}

TEST(LayerConventions, PyTorchBiasedOption) {
  auto o = BatchNormOptions::pytorch(0.1);
  o.unbiased_moving_variance = false;
  BatchNorm<double> l(1, o);
  const std::vector<double> x{1, 2, 3, 4};
  std::vector<double> y(4);
  l.forward({4, 1}, {x.data()}, {y.data()}, Mode::training);
  EXPECT_NEAR(l.moving_variance()[0], 0.9 + 0.1 * 1.25, 1e-15);
}

TEST(LayerConventions, PyTorchCumulativeAverageWithoutMomentum) {
  // momentum=None: the running statistics are the plain average over the batches seen.
  BatchNorm<double> l(1, BatchNormOptions::pytorch(std::nullopt));
  const std::vector<std::vector<double>> batches{{1, 2, 3, 4}, {0, 10}, {-3, -3, 3}};
  const double means[] = {2.5, 5.0, -1.0};
  const double unbiased[] = {5.0 / 3.0, 50.0, 12.0};
  double mean_sum = 0, var_sum = 0;
  for (std::size_t k = 0; k < batches.size(); ++k) {
    const auto& x = batches[k];
    std::vector<double> y(x.size());
    l.forward({static_cast<index_t>(x.size()), 1}, {x.data()}, {y.data()}, Mode::training);
    mean_sum += means[k];
    var_sum += unbiased[k];
    EXPECT_NEAR(l.moving_mean()[0], mean_sum / double(k + 1), 1e-13) << "after batch " << k;
    EXPECT_NEAR(l.moving_variance()[0], var_sum / double(k + 1), 1e-13) << "after batch " << k;
  }
  EXPECT_EQ(l.num_batches_tracked(), 3);
  l.reset_moving_statistics();
  EXPECT_EQ(l.moving_mean()[0], 0.0);
  EXPECT_EQ(l.moving_variance()[0], 1.0);
  EXPECT_EQ(l.num_batches_tracked(), 0);
}

TEST(LayerConventions, PyTorchOneValuePerChannelThrowsAndChangesNothing) {
  BatchNorm<float> l(2, BatchNormOptions::pytorch());
  const std::vector<float> x{1, 2};
  std::vector<float> y(2);
  const Snapshot<float> before(l);
  EXPECT_THROW(l.forward({1, 2}, {x.data()}, {y.data()}, Mode::training), bn::value_error);
  EXPECT_TRUE(same_state(before, Snapshot<float>(l)));
  // Inference with one value per channel is fine.
  EXPECT_NO_THROW(l.forward({1, 2}, {x.data()}, {y.data()}, Mode::inference));
}

// ---- every element type: passes against the reference, moving statistics against the
// formulas iterated in double ------------------------------------------------------------

template <class T>
class LayerTyped : public ::testing::Test {};
TYPED_TEST_SUITE(LayerTyped, bntest::ElementTypes, bntest::TypeNames);

// Relative tolerance of a pass's outputs against the double reference (a few roundings in T
// and in the compute type).
template <class T>
double pass_rtol() {
  return 8 * bntest::unit_roundoff<T>() + 64 * bntest::compute_roundoff<T>();
}

template <class T>
struct Batch {
  Shape shape;
  std::vector<T> x, dy;
};

template <class T>
Batch<T> make_batch(const Shape& shape, double mean, double stddev, std::mt19937_64& rng) {
  Batch<T> b{shape, bntest::normal<T>(numel(shape), mean, stddev, rng), bntest::normal<T>(numel(shape), 0, 1, rng)};
  return b;
}

template <class T>
void check_training_steps(const BatchNormOptions& options, const Shape& shape, int steps) {
  using S = stat_t<T>;
  std::mt19937_64 rng(42);
  const Geometry g{shape, options.axes};
  const index_t C = bn::extent(g).channels;
  const std::size_t n = static_cast<std::size_t>(C);
  BatchNorm<T> l(C, options);
  std::vector<double> mean_d(n, 0.0), var_d(n, 1.0);  // the formulas, in double
  for (int step = 0; step < steps; ++step) {
    const Batch<T> b = make_batch<T>(shape, 3.0 + step, 2.0, rng);
    std::vector<T> y(b.x.size());
    l.forward(shape, {b.x.data()}, {y.data()}, Mode::training);

    // The pass is the functional forward with the layer's parameters: against the reference.
    std::vector<double> y_ref(y.size()), bm(n), bv(n), binv(n);
    const index_t M = ref::forward<T>(g, {b.x.data()}, Out<double>{y_ref.data()}, bn::Affine<S>{l.gamma(), l.beta()},
                                      options.epsilon, options.activation, bm.data(), bv.data(), binv.data());
    EXPECT_TRUE(bntest::all_close(y, y_ref, pass_rtol<T>(), pass_rtol<T>())) << "step " << step;

    // The moving statistics: the convention's formula on the reference moments.
    const double m = static_cast<double>(M);
    for (std::size_t c = 0; c < n; ++c) {
      if (options.convention == bn::Convention::keras) {
        const double bessel = options.unbiased_moving_variance ? m / std::max(m - 1, 1.0) : 1.0;
        const double keep = *options.momentum;
        mean_d[c] = keep * mean_d[c] + (1 - keep) * bm[c];
        var_d[c] = keep * var_d[c] + (1 - keep) * bv[c] * bessel;
      } else {
        const double f = options.momentum ? *options.momentum : 1.0 / (step + 1);
        const double bessel = options.unbiased_moving_variance ? m / (m - 1) : 1.0;
        mean_d[c] = (1 - f) * mean_d[c] + f * bm[c];
        var_d[c] = (1 - f) * var_d[c] + f * bv[c] * bessel;
      }
    }
    // Each step rounds the statistics to S; the batch moments of 16-bit data are exact in
    // double, so only S's rounding (and Keras's arithmetic in S) accumulates.
    const double tol = 16.0 * (step + 1) * (std::is_same_v<S, double> ? 0x1p-53 : 0x1p-24);
    EXPECT_TRUE(bntest::all_close(copy_of(l.moving_mean(), C), mean_d, tol, tol)) << "step " << step;
    EXPECT_TRUE(bntest::all_close(copy_of(l.moving_variance(), C), var_d, tol, tol)) << "step " << step;
  }
  EXPECT_EQ(l.num_batches_tracked(), steps);
}

TYPED_TEST(LayerTyped, KerasMovingStatistics) {
  check_training_steps<TypeParam>(BatchNormOptions::keras(0.9), {4, 3, 5, 7}, 4);
  check_training_steps<TypeParam>(BatchNormOptions::keras(0.9, 1e-3, {-1}, true), {4, 3, 5, 7}, 4);
}

TYPED_TEST(LayerTyped, PyTorchMovingStatistics) {
  check_training_steps<TypeParam>(BatchNormOptions::pytorch(0.1), {4, 6, 5, 3}, 4);
  check_training_steps<TypeParam>(BatchNormOptions::pytorch(std::nullopt), {4, 6, 5, 3}, 4);
}

TYPED_TEST(LayerTyped, TrainingAndInferenceBackwardAgainstReference) {
  using T = TypeParam;
  using S = stat_t<T>;
  for (Activation act : {Activation::none, Activation::relu}) {
    for (Mode mode : {Mode::training, Mode::inference}) {
      auto o = BatchNormOptions::pytorch(0.5);
      o.activation = act;
      const Shape shape{3, 5, 4, 6};
      const Geometry g{shape, o.axes};
      BatchNorm<T> l(5, o);
      std::mt19937_64 rng(7);
      for (index_t c = 0; c < 5; ++c) {  // parameters and moving statistics away from 1 and 0
        l.gamma()[c] = static_cast<S>(0.5 + 0.25 * static_cast<double>(c));
        l.beta()[c] = static_cast<S>(0.1 * static_cast<double>(c) - 0.2);
      }
      const Batch<T> warm = make_batch<T>(shape, 1.0, 3.0, rng);
      std::vector<T> y(warm.x.size());
      l.forward(shape, {warm.x.data()}, {y.data()}, Mode::training);

      const Batch<T> b = make_batch<T>(shape, 0.5, 1.5, rng);
      l.forward(shape, {b.x.data()}, {y.data()}, mode);
      const std::vector<S> gamma = copy_of(l.gamma(), 5), beta = copy_of(l.beta(), 5);
      const std::vector<S> mean = copy_of(l.last_mean(), 5), inv_std = copy_of(l.last_inv_std(), 5);
      // The parameters change after the forward (an optimizer step): backward uses those of the forward.
      for (index_t c = 0; c < 5; ++c) l.gamma()[c] = static_cast<S>(l.gamma()[c] * 2 + 1);
      std::vector<T> dx(b.x.size());
      l.backward(shape, {b.dy.data()}, {b.x.data()}, {dx.data()});

      const bn::Affine<S> a{gamma.data(), beta.data()};
      std::vector<double> y_ref(y.size()), dx_ref(dx.size()), dg(5), db(5);
      if (mode == Mode::inference) {
        ref::normalize<T>(g, {b.x.data()}, Out<double>{y_ref.data()}, l.moving_mean(), l.moving_variance(), a,
                          o.epsilon, act);
        // The inference pass's statistics: the moving ones, inv_std rounded as normalize rounds it.
        for (index_t c = 0; c < 5; ++c) {
          EXPECT_EQ(mean[static_cast<std::size_t>(c)], l.moving_mean()[c]);
          EXPECT_EQ(inv_std[static_cast<std::size_t>(c)],
                    static_cast<S>(1.0 / std::sqrt(static_cast<double>(l.moving_variance()[c]) + o.epsilon)));
        }
      } else {
        std::vector<double> m(5), v(5), inv(5);
        ref::forward<T>(g, {b.x.data()}, Out<double>{y_ref.data()}, a, o.epsilon, act, m.data(), v.data(), inv.data());
        EXPECT_TRUE(bntest::all_close(mean, m, 64 * bntest::compute_roundoff<T>(), 1e-12));
        EXPECT_TRUE(bntest::all_close(inv_std, inv, 64 * bntest::compute_roundoff<T>(), 0));
      }
      EXPECT_TRUE(bntest::all_close(y, y_ref, pass_rtol<T>(), pass_rtol<T>()));
      ref::backward<T>(g, {b.dy.data()}, {b.x.data()}, Out<double>{dx_ref.data()}, mean.data(), inv_std.data(), a, act,
                       dg.data(), db.data(), mode == Mode::training ? Statistics::batch : Statistics::fixed);
      const double scale = bntest::max_abs(dx_ref) + 1;
      EXPECT_TRUE(bntest::all_close(dx, dx_ref, pass_rtol<T>(), 64 * pass_rtol<T>() * scale))
          << (mode == Mode::training ? "training" : "inference") << (act == Activation::relu ? " relu" : "");
      const double gs = bntest::max_abs(dg) + bntest::max_abs(db) + 1;
      EXPECT_TRUE(bntest::all_close(copy_of(l.gamma_grad(), 5), dg, 1e-5, 1e-5 * gs));
      EXPECT_TRUE(bntest::all_close(copy_of(l.beta_grad(), 5), db, 1e-5, 1e-5 * gs));
    }
  }
}

// ---- layouts, options ------------------------------------------------------------------

TEST(Layer, BothLayoutsGiveTheSameNumbers) {
  // One NCHW batch, normalized as NCHW (axis 1), as an NHWC copy (axis -1) and as an
  // NHWC-strided view of the NCHW shape (axis 1): the same per-channel results.
  const index_t N = 4, C = 5, H = 3, W = 6;
  std::mt19937_64 rng(3);
  const Shape nchw{N, C, H, W}, nhwc{N, H, W, C};
  const std::vector<float> x = bntest::normal<float>(numel(nchw), 2.0, 3.0, rng);
  std::vector<float> x_nhwc(x.size());
  const Strides as_nhwc = bntest::make_strides(nchw, {0, 2, 3, 1});  // NCHW index -> NHWC memory
  bntest::for_each_index(nchw, [&](const std::vector<index_t>& i) {
    x_nhwc[static_cast<std::size_t>(bntest::offset_of(i, as_nhwc))] =
        x[static_cast<std::size_t>(bntest::offset_of(i, bntest::contiguous(nchw)))];
  });

  BatchNorm<float> first(C, BatchNormOptions::pytorch()), last(C, BatchNormOptions::keras(0.9, 1e-5, {-1}));
  BatchNorm<float> strided(C, BatchNormOptions::pytorch());
  std::vector<float> y1(x.size()), y2(x.size()), y3(x.size());
  first.forward(nchw, {x.data()}, {y1.data()}, Mode::training);
  last.forward(nhwc, {x_nhwc.data()}, {y2.data()}, Mode::training);
  strided.forward(nchw, {x_nhwc.data(), as_nhwc}, {y3.data(), as_nhwc}, Mode::training);
  EXPECT_TRUE(bntest::all_close(y2, y3, 0, 0));  // the same memory order
  std::vector<float> y1_as_nhwc(x.size());
  bntest::for_each_index(nchw, [&](const std::vector<index_t>& i) {
    y1_as_nhwc[static_cast<std::size_t>(bntest::offset_of(i, as_nhwc))] =
        y1[static_cast<std::size_t>(bntest::offset_of(i, bntest::contiguous(nchw)))];
  });
  EXPECT_TRUE(bntest::all_close(y1_as_nhwc, y2, 1e-5, 1e-5));
  EXPECT_TRUE(bntest::all_close(copy_of(first.last_mean(), C), copy_of(last.last_mean(), C), 1e-6, 1e-6));
}

TEST(Layer, WithoutScaleAndCenter) {
  auto o = BatchNormOptions::keras();
  o.scale = false;
  o.center = false;
  BatchNorm<double> l(4, o);
  EXPECT_EQ(l.gamma(), nullptr);
  EXPECT_EQ(l.beta(), nullptr);
  std::mt19937_64 rng(5);
  const Shape shape{6, 4};
  const std::vector<double> x = bntest::normal<double>(24, -1.0, 2.0, rng), dy = bntest::normal<double>(24, 0, 1, rng);
  std::vector<double> y(24), dx(24), y_ref(24), m(4), v(4), inv(4), dx_ref(24), dg(4), db(4);
  l.forward(shape, {x.data()}, {y.data()}, Mode::training);
  l.backward(shape, {dy.data()}, {x.data()}, {dx.data()});
  const Geometry g{shape, {-1}};
  ref::forward<double>(g, {x.data()}, Out<double>{y_ref.data()}, {}, 1e-3, Activation::none, m.data(), v.data(),
                       inv.data());
  ref::backward<double>(g, {dy.data()}, {x.data()}, Out<double>{dx_ref.data()}, m.data(), inv.data(), {},
                        Activation::none, dg.data(), db.data());
  EXPECT_TRUE(bntest::all_close(y, y_ref, 1e-13, 1e-13));
  EXPECT_TRUE(bntest::all_close(dx, dx_ref, 1e-12, 1e-12));
  EXPECT_TRUE(bntest::all_close(copy_of(l.gamma_grad(), 4), dg, 1e-12, 1e-12));  // written all the same
  EXPECT_TRUE(bntest::all_close(copy_of(l.beta_grad(), 4), db, 1e-12, 1e-12));
}

TEST(Layer, InPlaceInference) {
  BatchNorm<float> l(3, BatchNormOptions::keras());
  l.moving_mean()[1] = 2.0f;
  l.moving_variance()[1] = 4.0f;
  std::vector<float> x{1, 2, 3, 4, 6, 8};  // (2, 3), channels-last
  l.forward({2, 3}, {x.data()}, {x.data()}, Mode::inference);
  EXPECT_FLOAT_EQ(x[1], 0.0f);
  EXPECT_NEAR(x[4], 4.0 / std::sqrt(4.0 + 1e-3), 1e-6);
  EXPECT_NEAR(x[0], 1.0 / std::sqrt(1.0 + 1e-3), 1e-6);
}

// ---- errors: messages, and nothing changes --------------------------------------------

TEST(LayerErrors, Construction) {
  EXPECT_THROW(BatchNorm<float>(0), bn::value_error);
  EXPECT_THROW(BatchNorm<float>(3, BatchNormOptions::keras(1.5)), bn::value_error);
  EXPECT_THROW(BatchNorm<float>(3, BatchNormOptions::pytorch(-0.1)), bn::value_error);
  EXPECT_THROW(BatchNorm<float>(3, BatchNormOptions::pytorch(std::nan(""))), bn::value_error);
  EXPECT_THROW(BatchNorm<float>(3, BatchNormOptions::keras(0.99, -1.0)), bn::value_error);
  EXPECT_THROW(BatchNorm<float>(3, BatchNormOptions::keras(0.99, INFINITY)), bn::value_error);
  EXPECT_THROW(BatchNorm<float>(3, BatchNormOptions::pytorch(0.1, 1e-5, {})), bn::value_error);
  auto keras_without_momentum = BatchNormOptions::keras();
  keras_without_momentum.momentum.reset();
  EXPECT_THROW(BatchNorm<float>(3, keras_without_momentum), bn::value_error);
  EXPECT_NO_THROW(BatchNorm<float>(3, BatchNormOptions::pytorch(std::nullopt)));
}

TEST(LayerErrors, ThrowingCallsLeaveTheLayerUnchanged) {
  BatchNorm<float> l(4, BatchNormOptions::pytorch(0.3));
  std::mt19937_64 rng(11);
  const Shape shape{3, 4, 5};
  const std::vector<float> x = bntest::normal<float>(60, 1.0, 2.0, rng), dy = bntest::normal<float>(60, 0, 1, rng);
  std::vector<float> y(60), dx(60);
  {
    const Snapshot<float> before(l);
    EXPECT_THROW(l.backward(shape, {dy.data()}, {x.data()}, {dx.data()}), bn::value_error);  // before any forward
    EXPECT_TRUE(same_state(before, Snapshot<float>(l)));
  }
  l.forward(shape, {x.data()}, {y.data()}, Mode::training);
  l.backward(shape, {dy.data()}, {x.data()}, {dx.data()});
  const Snapshot<float> before(l);
  const auto expect_unchanged = [&](const char* what, auto&& call) {
    EXPECT_THROW(call(), bn::value_error) << what;
    EXPECT_TRUE(same_state(before, Snapshot<float>(l))) << what;
  };
  for (Mode mode : {Mode::training, Mode::inference}) {
    expect_unchanged("wrong channel count", [&] { l.forward({3, 5, 4}, {x.data()}, {y.data()}, mode); });
    expect_unchanged("strides of the wrong length", [&] { l.forward(shape, {x.data(), {1, 2}}, {y.data()}, mode); });
    expect_unchanged("null x", [&] { l.forward(shape, {nullptr}, {y.data()}, mode); });
    expect_unchanged("null y", [&] { l.forward(shape, {x.data()}, {nullptr}, mode); });
    expect_unchanged("1-d", [&] { l.forward({4}, {x.data()}, {y.data()}, mode); });
  }
  expect_unchanged("empty batch", [&] { l.forward({0, 4, 5}, {x.data()}, {y.data()}, Mode::training); });
  expect_unchanged("backward of another shape", [&] { l.backward({3, 4, 4}, {dy.data()}, {x.data()}, {dx.data()}); });
  expect_unchanged("backward with bad strides", [&] { l.backward(shape, {dy.data(), {1}}, {x.data()}, {dx.data()}); });
  expect_unchanged("backward with null dx", [&] { l.backward(shape, {dy.data()}, {x.data()}, {nullptr}); });
  expect_unchanged("negative num_batches_tracked", [&] { l.set_num_batches_tracked(-1); });
  // A message that names the problem.
  try {
    l.forward({3, 5, 4}, {x.data()}, {y.data()}, Mode::training);
    FAIL() << "no exception";
  } catch (const std::invalid_argument& e) {
    EXPECT_NE(std::string(e.what()).find("5 channels, the layer has 4"), std::string::npos) << e.what();
  }
}

}  // namespace
