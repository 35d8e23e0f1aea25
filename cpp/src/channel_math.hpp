// The per-channel arithmetic between the passes: the shift and the moments of the sums,
// the statistics as stored, and the coefficients each pass applies.
//
// Statistics. Each channel's values are shifted by the channel's first value K before
// they are summed, in double: s = sum(x - K), ss = sum((x - K)^2). Then
//     mean = K + s/M,   M2 = ss - s^2/M,   variance = M2/M.
// The shift removes the offset that ruins the textbook E[x^2] - E[x]^2 (float32 data with
// mean/std = 1e4 loses all digits there); what cancels in M2 is at most about the ratio
// of (K - mean)^2 to the variance, harmless in double for float32 and 16-bit data; a
// float64 channel whose K is over 4 standard deviations out is summed again around its
// mean (recentre_moments). Per-thread partial sums share K,
// so they add; they are merged in thread order, so a result depends only on the data and
// the thread count, and across thread counts only in double rounding.
//
// Backward (per channel, g = dy masked by the fused ReLU, x_hat = (x - mean)*inv_std):
//     dbeta  = sum g,   dgamma = sum g*x_hat = inv_std * sum g*(x - mean)
//     batch statistics:  dx = a*(g - dbeta/M - x_hat*dgamma/M),  a = gamma*inv_std
//                          = k1*(g - k3) + k2*(x - mean),  k1 = a, k2 = -a*inv_std*dgamma/M,
//                                                           k3 = dbeta/M
//     fixed statistics:  dx = a*g
// Masked statistics (mask weights w, W = sum w): mean and variance are the w-weighted ones
// over W, every position is normalized with them, and their derivatives carry a factor w:
//     dx = a*(g - w*(dbeta/W + x_hat*dgamma/W)),  dbeta and dgamma summed over every position
//        = k1*(g - w*k3) + w*k2*(x - mean),  k1, k2, k3 as above with M = W.
// The per-channel coefficients of every pass are derived from the stored (rounded)
// mean and inv_std, so backward rebuilds the forward's ReLU mask bit for bit.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>
#include <vector>

#include "batchnorm/functional.hpp"
#include "kernels.hpp"
#include "plan.hpp"

namespace batchnorm::detail {

// The shift K of channel c: its first value (or, with a mask, the value at reduce index `at`,
// the first the mask selects), unless that is infinite or NaN, which would turn every x - K
// into NaN; K = 0 lets the sums follow IEEE arithmetic (mean([inf, 1]) = inf).
template <class T>
compute_t<T> shift_of(const T* first) {
  using C = compute_t<T>;
  C v;
  if constexpr (std::is_same_v<T, C>)
    v = *first;
  else
    v = static_cast<float>(*first);
  return std::isfinite(v) ? v : C(0);
}

template <class T>
compute_t<T> channel_shift(const Plan& p, const T* x, index_t c, index_t at = 0) {
  return shift_of(x + p.offset[0] + p.channel_offset(c, 0) + p.reduce_offset(at, p.reduce_dims.size(), 0));
}

// mean and M2 of M values from their sums s = sum(x - K), ss = sum((x - K)^2).
inline void moments_from_sums(double shift, double s, double ss, double M, double& mean, double& m2) {
  mean = shift + s / M;
  m2 = ss - s * s / M;
  if (m2 < 0) m2 = 0;  // rounding only; NaN stays NaN
}

// Value i (0 <= i < p.count) of channel c of x, in the plan's order: the scalar re-sums below.
template <class T>
auto channel_values(const Plan& p, const T* x, index_t c) {
  const T* base = x + p.offset[0] + p.channel_offset(c, 0);
  const std::size_t dims = p.reduce_dims.size();
  return [&p, base, dims](index_t i) { return base[p.reduce_offset(i, dims, 0)]; };
}

// Float64 data of magnitude near the largest double overflows the shifted sums (x - K, or
// its square, beyond 1.8e308) and would give mean -inf and M2 = inf - inf = NaN. A channel
// whose mean or M2 came out non-finite is summed again, by a scalar loop, scaled by a power
// of two (exact) that brings its values below 1; unless it holds an infinity or a NaN, whose
// results are IEEE's already. The variance is scaled back from the scaled one, so it is
// finite wherever it fits a double, even if M2 does not; beyond, it is inf, never NaN.
// Float32 and 16-bit data cannot overflow double sums. var is m2 / M on entry.
template <class T>
void rescue_moments([[maybe_unused]] const Plan& p, [[maybe_unused]] const T* x, [[maybe_unused]] index_t c,
                    [[maybe_unused]] double& mean, [[maybe_unused]] double& m2, [[maybe_unused]] double& var) {
  if constexpr (std::is_same_v<T, double>) {
    if (std::isfinite(mean) && std::isfinite(m2)) return;
    const auto value = channel_values(p, x, c);
    double largest = 0;
    for (index_t i = 0; i < p.count; ++i) {
      const double v = std::fabs(value(i));
      if (!(v <= std::numeric_limits<double>::max())) return;  // inf or NaN: IEEE's answer stands
      largest = std::max(largest, v);
    }
    if (largest == 0) return;
    const int e = std::ilogb(largest) + 1;  // |x| * 2^-e < 1
    const double shift = std::ldexp(value(0), -e);
    double s = 0, ss = 0;
    for (index_t i = 0; i < p.count; ++i) {
      const double d = std::ldexp(value(i), -e) - shift;
      s += d;
      ss += d * d;
    }
    const auto M = static_cast<double>(p.count);
    moments_from_sums(shift, s, ss, M, mean, m2);
    mean = std::ldexp(mean, e);
    var = std::ldexp(m2 / M, 2 * e);
    m2 = std::ldexp(m2, 2 * e);
  }
}

// A float64 channel whose shift K (its first value) lies far from its mean loses digits in
// M2 = ss - s^2/M, about (K - mean)^2 / variance times the rounding of the sums (a first
// value 90 standard deviations out: 1.7e-10 relative). Such a channel (K beyond 4 standard
// deviations) is summed again by a scalar loop around its mean. Float32 and 16-bit data
// keep far more digits in these double sums than their statistics store.
template <class T>
void recentre_moments([[maybe_unused]] const Plan& p, [[maybe_unused]] const T* x, [[maybe_unused]] index_t c,
                      [[maybe_unused]] double shift, [[maybe_unused]] double& mean, [[maybe_unused]] double& m2,
                      [[maybe_unused]] double& var) {
  if constexpr (std::is_same_v<T, double>) {
    const double d = shift - mean;
    if (!(d * d > 16 * var) || !std::isfinite(mean) || !std::isfinite(m2)) return;
    const auto value = channel_values(p, x, c);
    double s = 0, ss = 0;
    for (index_t i = 0; i < p.count; ++i) {
      const double e = value(i) - mean;
      s += e;
      ss += e * e;
    }
    const auto M = static_cast<double>(p.count);
    moments_from_sums(mean, s, ss, M, mean, m2);
    var = m2 / M;
  }
}

// Per-channel coefficients of an affine pass, in the compute type.
template <class C>
struct CoefStore {
  std::vector<C> a, m, b, k1, k2, k3;
  explicit CoefStore(index_t channels, bool backward) {
    const auto n = static_cast<std::size_t>(channels);
    a.resize(n), m.resize(n), b.resize(n);
    if (backward) k1.resize(n), k2.resize(n), k3.resize(n);
  }
  Coefs<C> view() const {
    auto ptr = [](const std::vector<C>& v) { return v.empty() ? nullptr : v.data(); };
    return {ptr(a), ptr(m), ptr(b), ptr(k1), ptr(k2), ptr(k3)};
  }
};

template <class S>
double gamma_of(const Affine<S>& affine, index_t c) {
  return affine.gamma ? static_cast<double>(affine.gamma[c]) : 1.0;
}
template <class S>
double beta_of(const Affine<S>& affine, index_t c) {
  return affine.beta ? static_cast<double>(affine.beta[c]) : 0.0;
}

// a = gamma*inv_std, m = mean, b = beta: the forward pass's coefficients of channel c.
template <class T>
void forward_coef(const Affine<stat_t<T>>& affine, index_t c, stat_t<T> mean, double inv_std, compute_t<T>& a,
                  compute_t<T>& m, compute_t<T>& b) {
  using C = compute_t<T>;
  a = static_cast<C>(gamma_of(affine, c) * inv_std);
  // inv_std 0 (a variance beyond the double range) makes every output beta; centring at 0
  // keeps x - m finite where float64 data spans more than the range (0*inf would be NaN).
  m = static_cast<C>(inv_std == 0 ? 0.0 : static_cast<double>(mean));
  b = static_cast<C>(beta_of(affine, c));
}

template <class T>
void set_forward_coefs(CoefStore<compute_t<T>>& k, index_t channels, const stat_t<T>* mean, const double* inv_std,
                       const Affine<stat_t<T>>& affine) {
  for (index_t c = 0; c < channels; ++c) {
    const auto i = static_cast<std::size_t>(c);
    forward_coef<T>(affine, c, mean[c], inv_std[c], k.a[i], k.m[i], k.b[i]);
  }
}

// Stores channel c's statistics in the statistics type; returns inv_std as stored, so every
// later pass (and backward) derives its coefficients from the same value.
template <class S>
double store_stats(index_t c, double mean, double var, double epsilon, S* mean_out, S* var_out, S* inv_out) {
  mean_out[c] = static_cast<S>(mean);
  var_out[c] = static_cast<S>(var);
  inv_out[c] = static_cast<S>(1.0 / std::sqrt(var + epsilon));
  return static_cast<double>(inv_out[c]);
}

// dgamma = inv_std * sum g*(x - mean). With inv_std 0 every x_hat is 0, so dgamma is 0 (NaN
// only for a non-finite g, as 0 * sum g gives), whatever the sum of products, which may
// have overflowed (centred at 0, see forward_coef).
inline double dgamma_of(double inv, double sum_dy, double sum_dy_xc) { return inv == 0 ? 0 * sum_dy : sum_dy_xc * inv; }

// Channel c's dgamma and dbeta from its two sums, rounded to the statistics type: what
// backward stores, and parameter_gradients gives the synchronized layers.
template <class S>
inline void store_parameter_gradients(std::size_t c, double inv, double sum_dy, double sum_dy_xc, S* dgamma, S* dbeta) {
  dbeta[c] = static_cast<S>(sum_dy);
  dgamma[c] = static_cast<S>(dgamma_of(inv, sum_dy, sum_dy_xc));
}

// k1, k2, k3 of channel c from its sums over `count` values (see the comment at the top;
// with a mask, count is the sum of its weights W).
template <class T>
void set_apply_coef(CoefStore<compute_t<T>>& k, std::size_t c, double inv, const Affine<stat_t<T>>& affine,
                    double sum_dy, double sum_dy_xc, double count, Statistics statistics) {
  using C = compute_t<T>;
  const double M = count;
  const bool batch = statistics == Statistics::batch;
  const double a = gamma_of(affine, static_cast<index_t>(c)) * inv;
  const double dgamma = dgamma_of(inv, sum_dy, sum_dy_xc);
  k.k1[c] = static_cast<C>(a);
  k.k2[c] = static_cast<C>(batch ? -a * inv * dgamma / M : 0.0);
  k.k3[c] = static_cast<C>(batch ? sum_dy / M : 0.0);
}

}  // namespace batchnorm::detail
