// Masked statistics (the `mask` argument of moments, forward and backward) against a
// float64 reference of their definition, on channels-first, channels-last, strided and
// broadcast layouts and for every element type, under the active instruction set (ctest
// runs the program again under BATCHNORM_MAX_ISA=baseline and =avx2). Then the errors.
#include <gtest/gtest.h>

#include <algorithm>
#include <cmath>
#include <random>
#include <string>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "test_util.hpp"

namespace {

namespace bn = batchnorm;
using bn::Activation;
using bn::Affine;
using bn::Axes;
using bn::Geometry;
using bn::In;
using bn::index_t;
using bn::Out;
using bn::Shape;
using bn::stat_t;
using bn::Strides;
using bntest::Buffer;
using bntest::from_d;
using bntest::to_d;

struct Case {
  std::string name;
  Shape shape;
  Axes axes;
  Strides x;     // x, dy and dx (empty: C-contiguous)
  Shape mask;    // x's shape without the feature axes
  Strides mstr;  // the mask's strides (empty: C-contiguous; 0 broadcasts)
};

std::vector<Case> cases() {
  const Shape ncl = {4, 6, 40};
  return {
      {"ncl", ncl, {1}, {}, {4, 40}, {}},
      {"nlc", {4, 40, 6}, {-1}, {}, {4, 40}, {}},
      {"nc", {50, 7}, {1}, {}, {50}, {}},
      {"ncl_strided", ncl, {1}, bntest::make_strides(ncl, {}, {1, 2, 3}), {4, 40}, {81, 2}},
      {"ncl_channels_last_strides", ncl, {1}, bntest::make_strides(ncl, {0, 2, 1}), {4, 40}, {}},
      {"ncl_mask_broadcast_over_batch", ncl, {1}, {}, {4, 40}, {0, 1}},
      {"nlc_mask_broadcast_over_length", {4, 40, 6}, {-1}, {}, {4, 40}, {1, 0}},
      {"two_feature_axes", {3, 4, 5, 6}, {1, 3}, {}, {3, 5}, {}},
      {"channel_blocks", {2, 8, 2048}, {1}, {}, {2, 2048}, {}},
      {"long_runs", {2, 3, 70000}, {1}, {}, {2, 70000}, {}},
      {"many_channels_few_values", {4, 20000}, {1}, {}, {4}, {}},
      {"wide_rows", {64, 600}, {1}, {}, {64}, {}},
  };
}

// Whether d is one of the (non-negative) feature axes.
bool is_feature(const Case& c, std::size_t d) {
  const Axes axes = bn::feature_axes(c.axes, c.shape.size());
  return std::find(axes.begin(), axes.end(), static_cast<int>(d)) != axes.end();
}

index_t channel_of(const Case& c, const std::vector<index_t>& i) {
  index_t ch = 0;
  for (std::size_t d = 0; d < c.shape.size(); ++d)
    if (is_feature(c, d)) ch = ch * c.shape[d] + i[d];
  return ch;
}

std::vector<index_t> reduced_index(const Case& c, const std::vector<index_t>& i) {
  std::vector<index_t> r;
  for (std::size_t d = 0; d < c.shape.size(); ++d)
    if (!is_feature(c, d)) r.push_back(i[d]);
  return r;
}

template <class T>
class Masked : public ::testing::Test {
 protected:
  using S = stat_t<T>;
  static constexpr double uC = bntest::compute_roundoff<T>();
  std::mt19937_64 rng{20240601};

  // The float64 reference of masked batch norm, from the library's stored mean and inv_std
  // (so y and dx are checked apart from the statistics' rounding), and its own statistics.
  struct Reference {
    std::vector<double> mean, var, y, dx, dgamma, dbeta;
    index_t selected = 0;
  };
  Reference reference(const Case& c, const Buffer<T>& x, const Buffer<T>& m, const Buffer<T>& dy,
                      const std::vector<S>& mean, const std::vector<S>& inv_std, const std::vector<S>& gamma,
                      const std::vector<S>& beta) {
    const auto C = gamma.size();
    Reference r;
    r.mean.assign(C, 0), r.var.assign(C, 0), r.dgamma.assign(C, 0), r.dbeta.assign(C, 0);
    double W = 0;
    bntest::for_each_index(c.mask, [&](const std::vector<index_t>& i) {
      W += to_d(m.at(i));
      r.selected += to_d(m.at(i)) != 0;
    });
    auto each = [&](auto f) {
      bntest::for_each_index(c.shape, [&](const std::vector<index_t>& i) {
        f(i, static_cast<std::size_t>(channel_of(c, i)), to_d(m.at(reduced_index(c, i))), to_d(x.at(i)));
      });
    };
    each([&](const auto&, std::size_t ch, double w, double v) { r.mean[ch] += w * v / W; });
    each([&](const auto&, std::size_t ch, double w, double v) {
      r.var[ch] += w * (v - r.mean[ch]) * (v - r.mean[ch]) / W;
    });
    each([&](const auto& i, std::size_t ch, double, double v) {
      const double xhat = (v - to_d(mean[ch])) * to_d(inv_std[ch]);
      r.dbeta[ch] += to_d(dy.at(i));
      r.dgamma[ch] += to_d(dy.at(i)) * xhat;
    });
    each([&](const auto& i, std::size_t ch, double w, double v) {
      const double xhat = (v - to_d(mean[ch])) * to_d(inv_std[ch]), a = to_d(gamma[ch]) * to_d(inv_std[ch]);
      r.y.push_back(a * (v - to_d(mean[ch])) + to_d(beta[ch]));
      r.dx.push_back(a * (to_d(dy.at(i)) - w * (r.dbeta[ch] / W + xhat * r.dgamma[ch] / W)));
    });
    return r;
  }

  // A mask of zeros and ones (about 30% zeros) at the case's strides; broadcast entries share one value.
  Buffer<T> make_mask(const Case& c) {
    Buffer<T> m(c.mask, c.mstr);
    std::bernoulli_distribution keep(0.7);
    bntest::for_each_index(c.mask, [&](const std::vector<index_t>& i) { m.at(i) = from_d<T>(keep(rng) ? 1.0 : 0.0); });
    std::vector<index_t> first(c.mask.size(), 0);
    m.at(first) = from_d<T>(1.0);  // never selects nothing
    return m;
  }
};

TYPED_TEST_SUITE(Masked, bntest::ElementTypes, bntest::TypeNames);

TYPED_TEST(Masked, StatisticsOutputsAndGradients) {
  using T = TypeParam;
  using Stat = stat_t<T>;
  for (const Case& c : cases()) {
    SCOPED_TRACE(c.name);
    const Geometry g{c.shape, c.axes};
    const auto C = static_cast<std::size_t>(bn::extent(g).channels);
    Buffer<T> x(c.shape, c.x), dy(c.shape, c.x), y(c.shape, c.x), dx(c.shape, c.x);
    x.set(bntest::normal<T>(bntest::numel(c.shape), 3.0, 2.0, this->rng));
    dy.set(bntest::normal<T>(bntest::numel(c.shape), 0.1, 1.0, this->rng));
    const Buffer<T> m = this->make_mask(c);
    const auto gamma = bntest::uniform<Stat>(C, 0.5, 1.5, this->rng),
               beta = bntest::uniform<Stat>(C, -0.5, 0.5, this->rng);
    const Affine<Stat> affine{gamma.data(), beta.data()};
    const In<T> mask{m.data(), m.strides()};
    std::vector<Stat> mean(C), var(C), inv(C), mm(C), mv(C), dgamma(C), dbeta(C);
    const index_t n = bn::forward<T>(g, {x.data(), x.strides()}, {y.data(), y.strides()}, affine, 1e-3,
                                     Activation::none, mean.data(), var.data(), inv.data(), mask);
    EXPECT_EQ(bn::moments<T>(g, {x.data(), x.strides()}, mm.data(), mv.data(), mask), n);
    bn::backward<T>(g, {dy.data(), dy.strides()}, {x.data(), x.strides()}, {dx.data(), dx.strides()}, mean.data(),
                    inv.data(), affine, Activation::none, dgamma.data(), dbeta.data(), bn::Statistics::batch, mask);
    const auto want = this->reference(c, x, m, dy, mean, inv, gamma, beta);
    EXPECT_EQ(n, want.selected);
    const double stat_rtol = std::max(4 * bntest::compute_roundoff<T>(), 1e-12);
    EXPECT_TRUE(bntest::all_close(mean, want.mean, stat_rtol, 1e-12));
    EXPECT_TRUE(bntest::all_close(var, want.var, stat_rtol, 1e-12));
    EXPECT_TRUE(bntest::all_close(mm, want.mean, stat_rtol, 1e-12));
    EXPECT_TRUE(bntest::all_close(mv, want.var, stat_rtol, 1e-12));
    // y's terms scale with a*|x - mean|: large where few positions are selected (inv_std ~ 1/sqrt(eps))
    EXPECT_TRUE(bntest::all_close_rounded(y.values(), want.y, (16 * this->uC + 1e-13) * (8 + bntest::max_abs(want.y))));
    const double dscale = 8 * bntest::max_abs(dy.values()) * 1.5 * bntest::max_abs(inv);
    EXPECT_TRUE(bntest::all_close_rounded(dx.values(), want.dx, (16 * this->uC + 1e-13) * dscale));
    const double count = static_cast<double>(bn::extent(g).count);
    EXPECT_TRUE(bntest::all_close(dbeta, want.dbeta, stat_rtol, 8 * this->uC * std::sqrt(count) * 4));
    EXPECT_TRUE(bntest::all_close(dgamma, want.dgamma, stat_rtol, 8 * this->uC * std::sqrt(count) * 16));
    EXPECT_TRUE(y.gaps_intact() && dx.gaps_intact());
  }
}

// A mask of ones gives what no mask gives: the same statistics and, up to rounding, outputs.
TYPED_TEST(Masked, OnesAreNoMask) {
  using T = TypeParam;
  using Stat = stat_t<T>;
  const Case c{"ncl", {3, 4, 50}, {1}, {}, {3, 50}, {0, 0}};
  const Geometry g{c.shape, c.axes};
  Buffer<T> x(c.shape, {}), y(c.shape, {}), ym(c.shape, {});
  x.set(bntest::normal<T>(bntest::numel(c.shape), -1.0, 3.0, this->rng));
  const T one = from_d<T>(1.0);
  std::vector<Stat> mean(4), var(4), inv(4), mean_m(4), var_m(4), inv_m(4);
  EXPECT_EQ(bn::forward<T>(g, {x.data()}, {y.data()}, {}, 1e-5, Activation::relu, mean.data(), var.data(), inv.data()),
            bn::forward<T>(g, {x.data()}, {ym.data()}, {}, 1e-5, Activation::relu, mean_m.data(), var_m.data(),
                           inv_m.data(), {&one, {0, 0}}));
  EXPECT_TRUE(bntest::all_close(mean_m, std::vector<double>(mean.begin(), mean.end()), 1e-6, 1e-6));
  EXPECT_TRUE(bntest::all_close(var_m, std::vector<double>(var.begin(), var.end()), 1e-6, 1e-6));
}

TEST(MaskedErrors, SelectsNothingShapeAndOverlap) {
  const Geometry g{{2, 3, 4}, {1}};
  std::vector<float> x(24, 1.0f), y(24), mean(3), var(3), inv(3);
  const std::vector<float> zeros(8, 0.0f), ones(8, 1.0f);
  auto fwd = [&](In<float> mask, float* out) {
    bn::forward<float>(g, {x.data()}, {out}, {}, 1e-3, Activation::none, mean.data(), var.data(), inv.data(), mask);
  };
  EXPECT_THROW(fwd({zeros.data()}, y.data()), bn::value_error);
  EXPECT_THROW(bn::moments<float>(g, {x.data()}, mean.data(), var.data(), {zeros.data()}), bn::value_error);
  EXPECT_THROW(fwd({ones.data(), {4}}, y.data()), bn::value_error);  // strides of one axis for two
  std::vector<float> both(24, 1.0f);
  EXPECT_THROW(fwd({both.data()}, both.data()), bn::value_error);  // y overlaps the mask
  EXPECT_NO_THROW(fwd({ones.data()}, y.data()));
  try {
    fwd({zeros.data()}, y.data());
  } catch (const bn::value_error& e) {
    EXPECT_NE(std::string(e.what()).find("mask selects nothing"), std::string::npos) << e.what();
  }
}

}  // namespace
