// batchnorm::reference: a scalar, header-only reference implementation of the functional
// API (functional.hpp), the oracle of the C++ tests.
//
// It is written independently of the library's kernels and of its canonical view (plan):
// it visits every element of the n-d array with plain index loops (an odometer over the
// shape, last axis fastest), computes each element's offset from the strides exactly as
// given (sum of index * stride, negative and zero strides included) and its channel from
// the indices along the feature axes (C order of the sorted feature axes, as in
// functional.hpp). Every computation is in double; the mean and the variance come from
// two passes (the mean first, then the sum of squared deviations from it). Nothing is
// shifted, blocked, vectorized, fused or threaded: it is meant to be obviously right, not
// fast.
// The library itself never includes it; it is for tests and for checking results by hand.
//
// Signatures: those of batchnorm::moments, normalize, forward and backward, with two
// additions so that a test can keep the reference's results unrounded: the element type
// of the array output (y, dx; default T) and the type of the per-channel outputs
// (default stat_t<T>) are template parameters deduced from the arguments, e.g.
//
//   std::vector<double> y(n), mean(C), var(C), inv_std(C);
//   batchnorm::reference::forward<float>(g, {x.data()}, batchnorm::Out<double>{y.data()}, {}, 1e-5,
//                                        batchnorm::Activation::none, mean.data(), var.data(), inv_std.data());
//
// Elements convert to double through float for float16_t and bfloat16_t (float(x), which is
// exact) and directly for float and double; results convert back the same way (T(float(v))
// for the 16-bit types, i.e. rounded twice).
//
// Formulas, per channel, M = number of values reduced per channel, x_hat = (x - mean) * inv_std:
//   moments:   mean = sum(x) / M,  variance = sum((x - mean)^2) / M  (biased)
//   normalize: y = act(gamma * (x - mean) / sqrt(variance + epsilon) + beta)
//   forward:   mean and variance as moments, inv_std = 1 / sqrt(variance + epsilon), y as normalize
//   backward:  g = dy; with Activation::relu, g = 0 where the pre-activation
//              gamma * inv_std * (x - mean) + beta is not > 0
//              dbeta = sum(g),  dgamma = sum(g * x_hat)
//              Statistics::batch: dx = gamma * inv_std * (g - mean(g) - x_hat * mean(g * x_hat))
//              Statistics::fixed: dx = gamma * inv_std * g
// act is the identity or relu (max(z, 0), NaN stays NaN); a null gamma means 1, a null
// beta 0. mean and inv_std given to backward are used as given (not recomputed).
//
// Errors throw batchnorm::value_error as the library does: 0-d arrays, negative sizes,
// feature axes out of range, repeated or missing, strides of the wrong length, an epsilon
// that is negative or not finite, an empty batch (moments, forward) and null pointers.
#pragma once

#include <cmath>
#include <cstddef>
#include <string>
#include <type_traits>
#include <vector>

#include "batchnorm/functional.hpp"
#include "batchnorm/types.hpp"

namespace batchnorm::reference {
namespace detail {

// 16-bit values go through float, the type they convert to exactly.
template <class T>
double to_double(T v) {
  if constexpr (std::is_same_v<T, double>) return v;
  return static_cast<double>(static_cast<float>(v));
}

template <class T>
T from_double(double v) {
  if constexpr (std::is_same_v<T, double>) return v;
  return T(static_cast<float>(v));
}

inline void require(const void* p, const char* what) {
  if (!p) throw value_error(std::string("reference: ") + what + " must not be null");
}

inline void check_epsilon(double epsilon) {
  if (!std::isfinite(epsilon) || epsilon < 0) throw value_error("reference: epsilon must be finite and >= 0");
}

/// The validated geometry: which axes are feature axes, and how many channels and values per channel.
struct Layout {
  Shape shape;
  std::vector<bool> feature;
  index_t channels = 1;
  index_t count = 1;
};

inline Layout layout_of(const Geometry& g) {
  Layout l;
  l.shape = g.shape;
  const int ndim = static_cast<int>(g.shape.size());
  if (ndim == 0) throw value_error("reference: 0-d array");
  if (g.axes.empty()) throw value_error("reference: no feature axis");
  l.feature.assign(g.shape.size(), false);
  for (int a : g.axes) {
    if (a < -ndim || a >= ndim) throw value_error("reference: axis " + std::to_string(a) + " out of range");
    const auto d = static_cast<std::size_t>(a < 0 ? a + ndim : a);
    if (l.feature[d]) throw value_error("reference: axis " + std::to_string(a) + " repeated");
    l.feature[d] = true;
  }
  for (std::size_t d = 0; d < g.shape.size(); ++d) {
    if (g.shape[d] < 0) throw value_error("reference: negative size");
    (l.feature[d] ? l.channels : l.count) *= g.shape[d];
  }
  return l;
}

/// The strides of an array argument: as given, or C-contiguous when empty.
inline Strides strides_of(const Layout& l, const Strides& s) {
  if (s.empty()) {
    Strides c(l.shape.size());
    index_t step = 1;
    for (std::size_t d = l.shape.size(); d-- > 0;) {
      c[d] = step;
      step *= l.shape[d] > 0 ? l.shape[d] : 1;
    }
    return c;
  }
  if (s.size() != l.shape.size()) throw value_error("reference: strides of the wrong length");
  return s;
}

/// Calls f(index) for every multi-index of shape, in C order (last axis fastest).
template <class F>
void for_each_index(const Shape& shape, F&& f) {
  for (index_t n : shape)
    if (n == 0) return;
  std::vector<index_t> index(shape.size(), 0);
  for (;;) {
    f(index);
    std::size_t d = shape.size();
    for (;;) {
      if (d == 0) return;
      --d;
      if (++index[d] < shape[d]) break;
      index[d] = 0;
    }
  }
}

/// Calls f(channel, index) for every element, in C order of the multi-index.
template <class F>
void for_each_element(const Layout& l, F&& f) {
  for_each_index(l.shape, [&](const std::vector<index_t>& index) {
    index_t channel = 0;
    for (std::size_t d = 0; d < index.size(); ++d)
      if (l.feature[d]) channel = channel * l.shape[d] + index[d];
    f(static_cast<std::size_t>(channel), index);
  });
}

/// Offset in elements of a multi-index.
inline index_t offset_of(const std::vector<index_t>& index, const Strides& strides) {
  index_t off = 0;
  for (std::size_t d = 0; d < index.size(); ++d) off += index[d] * strides[d];
  return off;
}

/// Two-pass mean and biased variance per channel, in double.
template <class T>
void two_pass(const Layout& l, const T* x, const Strides& xs, std::vector<double>& mean, std::vector<double>& var) {
  const auto C = static_cast<std::size_t>(l.channels);
  const auto M = static_cast<double>(l.count);
  mean.assign(C, 0.0);
  var.assign(C, 0.0);
  for_each_element(l, [&](std::size_t c, const std::vector<index_t>& i) { mean[c] += to_double(x[offset_of(i, xs)]); });
  for (double& m : mean) m /= M;
  for_each_element(l, [&](std::size_t c, const std::vector<index_t>& i) {
    const double d = to_double(x[offset_of(i, xs)]) - mean[c];
    var[c] += d * d;
  });
  for (double& v : var) v /= M;
}

template <class S>
double gamma_at(const Affine<S>& affine, std::size_t c) {
  return affine.gamma ? static_cast<double>(affine.gamma[c]) : 1.0;
}
template <class S>
double beta_at(const Affine<S>& affine, std::size_t c) {
  return affine.beta ? static_cast<double>(affine.beta[c]) : 0.0;
}

inline double activate(double z, Activation activation) { return activation == Activation::relu && z < 0.0 ? 0.0 : z; }

/// y = act(gamma * (x - mean) * inv_std + beta), everything in double.
template <class T, class Y>
void affine_pass(const Layout& l, const T* x, const Strides& xs, Y* y, const Strides& ys,
                 const std::vector<double>& mean, const std::vector<double>& inv_std, const Affine<stat_t<T>>& affine,
                 Activation activation) {
  for_each_element(l, [&](std::size_t c, const std::vector<index_t>& i) {
    const double z = gamma_at(affine, c) * (to_double(x[offset_of(i, xs)]) - mean[c]) * inv_std[c] + beta_at(affine, c);
    y[offset_of(i, ys)] = from_double<Y>(activate(z, activation));
  });
}

}  // namespace detail

/// Per-channel mean and biased variance (two passes, double). Returns the count per channel.
template <class T, class S = stat_t<T>>
index_t moments(const Geometry& g, In<T> x, S* mean, S* variance) {
  const detail::Layout l = detail::layout_of(g);
  const Strides xs = detail::strides_of(l, x.strides);
  if (l.count == 0) throw value_error("reference: moments of an empty batch");
  detail::require(mean, "mean");
  detail::require(variance, "variance");
  if (l.channels == 0) return l.count;
  detail::require(x.data, "x");
  std::vector<double> mu, var;
  detail::two_pass(l, x.data, xs, mu, var);
  for (std::size_t c = 0; c < mu.size(); ++c) {
    mean[c] = static_cast<S>(mu[c]);
    variance[c] = static_cast<S>(var[c]);
  }
  return l.count;
}

/// y = act(gamma * (x - mean) / sqrt(variance + epsilon) + beta), in double.
template <class T, class Y = T, class S = stat_t<T>>
void normalize(const Geometry& g, In<T> x, Out<Y> y, const S* mean, const S* variance, Affine<stat_t<T>> affine,
               double epsilon, Activation activation = Activation::none) {
  detail::check_epsilon(epsilon);
  const detail::Layout l = detail::layout_of(g);
  const Strides xs = detail::strides_of(l, x.strides);
  const Strides ys = detail::strides_of(l, y.strides);
  detail::require(mean, "mean");
  detail::require(variance, "variance");
  if (l.channels == 0 || l.count == 0) return;
  detail::require(x.data, "x");
  detail::require(y.data, "y");
  const auto C = static_cast<std::size_t>(l.channels);
  std::vector<double> mu(C), inv_std(C);
  for (std::size_t c = 0; c < C; ++c) {
    mu[c] = static_cast<double>(mean[c]);
    inv_std[c] = 1.0 / std::sqrt(static_cast<double>(variance[c]) + epsilon);
  }
  detail::affine_pass(l, x.data, xs, y.data, ys, mu, inv_std, affine, activation);
}

/// Batch statistics (two passes, double), then y as normalize. Returns the count per channel.
template <class T, class Y = T, class S = stat_t<T>>
index_t forward(const Geometry& g, In<T> x, Out<Y> y, Affine<stat_t<T>> affine, double epsilon, Activation activation,
                S* mean, S* variance, S* inv_std) {
  detail::check_epsilon(epsilon);
  const detail::Layout l = detail::layout_of(g);
  const Strides xs = detail::strides_of(l, x.strides);
  const Strides ys = detail::strides_of(l, y.strides);
  if (l.count == 0) throw value_error("reference: forward on an empty batch");
  detail::require(mean, "mean");
  detail::require(variance, "variance");
  detail::require(inv_std, "inv_std");
  if (l.channels == 0) return l.count;
  detail::require(x.data, "x");
  detail::require(y.data, "y");
  std::vector<double> mu, var;
  detail::two_pass(l, x.data, xs, mu, var);
  std::vector<double> inv(mu.size());
  for (std::size_t c = 0; c < mu.size(); ++c) {
    inv[c] = 1.0 / std::sqrt(var[c] + epsilon);
    mean[c] = static_cast<S>(mu[c]);
    variance[c] = static_cast<S>(var[c]);
    inv_std[c] = static_cast<S>(inv[c]);
  }
  // Each element is read before it is written, so y may be x itself (same strides).
  detail::affine_pass(l, x.data, xs, y.data, ys, mu, inv, affine, activation);
  return l.count;
}

/// Backward of forward (Statistics::batch) or of normalize (Statistics::fixed), in double,
/// with the given mean and inv_std.
template <class T, class D = T, class S = stat_t<T>, class G = S>
void backward(const Geometry& g, In<T> dy, In<T> x, Out<D> dx, const S* mean, const S* inv_std,
              Affine<stat_t<T>> affine, Activation activation, G* dgamma, G* dbeta,
              Statistics statistics = Statistics::batch) {
  const detail::Layout l = detail::layout_of(g);
  const Strides dys = detail::strides_of(l, dy.strides);
  const Strides xs = detail::strides_of(l, x.strides);
  const Strides dxs = detail::strides_of(l, dx.strides);
  detail::require(mean, "mean");
  detail::require(inv_std, "inv_std");
  detail::require(dgamma, "dgamma");
  detail::require(dbeta, "dbeta");
  const auto C = static_cast<std::size_t>(l.channels);
  if (l.channels == 0 || l.count == 0) {
    for (std::size_t c = 0; c < C; ++c) dgamma[c] = dbeta[c] = G(0);
    return;
  }
  detail::require(dy.data, "dy");
  detail::require(x.data, "x");
  detail::require(dx.data, "dx");

  // The masked gradient g and x_hat of every element, in C order (so dx may alias dy or x).
  std::vector<double> gs, xhat;
  std::vector<double> sum_g(C, 0.0), sum_gx(C, 0.0);
  detail::for_each_element(l, [&](std::size_t c, const std::vector<index_t>& i) {
    const double xv = detail::to_double(x.data[detail::offset_of(i, xs)]);
    const double m = static_cast<double>(mean[c]);
    const double is = static_cast<double>(inv_std[c]);
    const double xh = (xv - m) * is;
    double gv = detail::to_double(dy.data[detail::offset_of(i, dys)]);
    if (activation == Activation::relu) {
      const double z = detail::gamma_at(affine, c) * is * (xv - m) + detail::beta_at(affine, c);
      if (!(z > 0.0)) gv = 0.0;
    }
    gs.push_back(gv);
    xhat.push_back(xh);
    sum_g[c] += gv;
    sum_gx[c] += gv * xh;
  });
  const auto M = static_cast<double>(l.count);
  std::size_t k = 0;
  detail::for_each_element(l, [&](std::size_t c, const std::vector<index_t>& i) {
    const double a = detail::gamma_at(affine, c) * static_cast<double>(inv_std[c]);
    const double v =
        statistics == Statistics::batch ? a * (gs[k] - sum_g[c] / M - xhat[k] * (sum_gx[c] / M)) : a * gs[k];
    dx.data[detail::offset_of(i, dxs)] = detail::from_double<D>(v);
    ++k;
  });
  for (std::size_t c = 0; c < C; ++c) {
    dgamma[c] = static_cast<G>(sum_gx[c]);
    dbeta[c] = static_cast<G>(sum_g[c]);
  }
}

}  // namespace batchnorm::reference
