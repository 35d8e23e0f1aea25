// The functional API: each function checks its arguments, builds the plan and picks the
// schedule that runs it (schedule.hpp); the instantiations for the four element types.
#include <algorithm>
#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <vector>

#include "batchnorm/functional.hpp"
#include "channel_math.hpp"
#include "checks.hpp"
#include "plan.hpp"
#include "schedule.hpp"

namespace batchnorm {

using namespace detail;

Extent extent(const Geometry& g) {
  const Strides none;
  const Plan p = make_plan(g, {&none});
  return {p.channels, p.count};
}

namespace {

// The plan of x and the given arrays, and a mask as its last operand when given.
Plan plan_with_mask(const Geometry& g, std::vector<const Strides*> strides, const void* mask,
                    const Strides& mask_reduced) {
  if (!mask) return make_plan(g, strides);
  const Strides full = mask_strides(g, mask_reduced);
  strides.push_back(&full);
  return make_plan(g, strides, true);
}

// The mask of a non-empty masked plan, summed and checked (Mask::w null without one).
template <class T>
Mask<T> mask_of(const Plan& p, const In<T>& mask) {
  Mask<T> m;
  if (!p.masked || empty(p)) return m;
  m.w = mask.data;
  m.sum = sum_mask(p, m.w);
  check_mask(m.sum);
  return m;
}

// The count a call reports: the values per channel, or the positions the mask selects.
template <class T>
index_t reported_count(const Plan& p, const Mask<T>& m) {
  return m.w ? m.sum.selected : p.count;
}

// The mask among a check_apart's inputs (an empty span without one).
template <class T>
Span mask_span(const Plan& p, const In<T>& mask) {
  return p.masked ? span_of(p, mask_operand(p), mask.data, sizeof(T), "mask") : Span{};
}

}  // namespace

template <class T>
index_t partial_moments(const Geometry& g, In<T> x, double* mean, double* m2, In<T> mask) {
  static_assert(is_element_v<T>, "unsupported element type");
  const Plan p = plan_with_mask(g, operand_strides({&x.strides}), mask.data, mask.strides);
  check_not_null(mean, "mean");
  check_not_null(m2, "m2");
  check_apart({span_of(mean, p.channels, "mean"), span_of(m2, p.channels, "m2")},
              {span_of(p, 0, x.data, sizeof(T), "x"), mask_span(p, mask)});
  Mask<T> m;
  if (p.masked && !empty(p)) m = {mask.data, sum_mask(p, mask.data)};
  if (p.count == 0 || (m.w && !(m.sum.total > 0))) {  // nothing, or nothing selected: no values to merge
    std::fill(mean, mean + p.channels, 0.0);
    std::fill(m2, m2 + p.channels, 0.0);
    return 0;
  }
  if (p.channels == 0) return p.count;
  check_not_null(x.data, "x");
  sum_moments(p, x.data, mean, m2, false, m);
  return reported_count(p, m);
}

void merge_moments(index_t channels, double* count_a, double* mean_a, double* m2_a, const double* count_b,
                   const double* mean_b, const double* m2_b) {
  for (index_t c = 0; c < channels; ++c) {
    const double na = count_a[c], nb = count_b[c], n = na + nb;
    if (nb == 0) continue;
    const double delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * (nb / n);
    m2_a[c] += m2_b[c] + delta * delta * (na * nb / n);
    count_a[c] = n;
  }
}

template <class T>
index_t moments(const Geometry& g, In<T> x, stat_t<T>* mean, stat_t<T>* variance, In<T> mask) {
  static_assert(is_element_v<T>, "unsupported element type");
  const Plan p = plan_with_mask(g, operand_strides({&x.strides}), mask.data, mask.strides);
  check_batch(p, "moments of");
  check_not_null(mean, "mean");
  check_not_null(variance, "variance");
  check_apart({span_of(mean, p.channels, "mean"), span_of(variance, p.channels, "variance")},
              {span_of(p, 0, x.data, sizeof(T), "x"), mask_span(p, mask)});
  const Mask<T> m = mask_of(p, mask);
  if (p.channels == 0) return p.count;
  check_not_null(x.data, "x");
  std::vector<double> mu(static_cast<std::size_t>(p.channels)), var(mu.size());
  sum_moments(p, x.data, mu.data(), var.data(), true, m);
  for (index_t c = 0; c < p.channels; ++c) {
    mean[c] = static_cast<stat_t<T>>(mu[static_cast<std::size_t>(c)]);
    variance[c] = static_cast<stat_t<T>>(var[static_cast<std::size_t>(c)]);
  }
  return reported_count(p, m);
}

namespace {

// The plan of a pass from x to y, after the checks of epsilon and of y that normalize and
// forward share.
template <class T>
Plan forward_plan(const Geometry& g, const In<T>& x, const Out<T>& y, double epsilon, const In<T>& mask = {}) {
  check_epsilon(epsilon);
  Plan p = plan_with_mask(g, operand_strides({&x.strides, &y.strides}), mask.data, mask.strides);
  check_output(p, 1, y.name ? y.name : "y");
  return p;
}

// check_apart of outputs and backward's per-channel inputs.
template <class S>
void check_apart_from_stats(std::initializer_list<Span> outputs, index_t ch, const S* mean, const S* inv_std,
                            const Affine<S>& affine) {
  check_apart(outputs, {span_of(mean, ch, "mean"), span_of(inv_std, ch, "inv_std"), span_of(affine.gamma, ch, "gamma"),
                        span_of(affine.beta, ch, "beta")});
}

}  // namespace

template <class T>
void normalize(const Geometry& g, In<T> x, Out<T> y, const stat_t<T>* mean, const stat_t<T>* variance,
               Affine<stat_t<T>> affine, double epsilon, Activation activation, stat_t<T>* inv_std) {
  static_assert(is_element_v<T>, "unsupported element type");
  const Plan p = forward_plan(g, x, y, epsilon);
  check_not_null(mean, "mean");
  check_not_null(variance, "variance");
  const index_t ch = p.channels;
  const Span out = span_of(p, 1, y.data, sizeof(T), y.name ? y.name : "y"), inv_out = span_of(inv_std, ch, "inv_std");
  check_apart({out, inv_out}, {span_of(mean, ch, "mean"), span_of(variance, ch, "variance"),
                               span_of(affine.gamma, ch, "gamma"), span_of(affine.beta, ch, "beta")});
  check_apart({inv_out}, {span_of(p, 0, x.data, sizeof(T), "x")});
  if (!empty(p)) {
    check_not_null(x.data, "x");
    check_not_null(y.data, "y");
  }
  std::vector<double> inv(static_cast<std::size_t>(p.channels));
  for (index_t c = 0; c < p.channels; ++c) {  // rounded as forward() stores it
    const auto stored = static_cast<stat_t<T>>(1.0 / std::sqrt(static_cast<double>(variance[c]) + epsilon));
    inv[static_cast<std::size_t>(c)] = static_cast<double>(stored);
    if (inv_std) inv_std[c] = stored;
  }
  if (empty(p)) return;
  CoefStore<compute_t<T>> k(p.channels, false);
  set_forward_coefs<T>(k, p.channels, mean, inv.data(), affine);
  affine1(p, x.data, y.data, k.view(), activation == Activation::relu, false);
}

template <class T>
index_t forward(const Geometry& g, In<T> x, Out<T> y, Affine<stat_t<T>> affine, double epsilon, Activation activation,
                stat_t<T>* mean, stat_t<T>* variance, stat_t<T>* inv_std, In<T> mask) {
  static_assert(is_element_v<T>, "unsupported element type");
  const Plan p = forward_plan(g, x, y, epsilon, mask);
  check_batch(p, "training on");
  check_not_null(mean, "mean");
  check_not_null(variance, "variance");
  check_not_null(inv_std, "inv_std");
  const index_t ch = p.channels;
  const Span mean_out = span_of(mean, ch, "mean"), var_out = span_of(variance, ch, "variance"),
             inv_out = span_of(inv_std, ch, "inv_std");
  check_apart({span_of(p, 1, y.data, sizeof(T), y.name ? y.name : "y"), mean_out, var_out, inv_out},
              {span_of(affine.gamma, ch, "gamma"), span_of(affine.beta, ch, "beta"), mask_span(p, mask)});
  check_apart({mean_out, var_out, inv_out}, {span_of(p, 0, x.data, sizeof(T), "x")});
  const Mask<T> m = mask_of(p, mask);
  if (p.channels == 0) return p.count;
  check_not_null(x.data, "x");
  check_not_null(y.data, "y");
  const bool relu = activation == Activation::relu;
  if (const ChannelBlocks cb = channel_blocks(p, sizeof(T)); cb.threads) {
    forward_channel_blocks(p, cb, x.data, y.data, affine, epsilon, relu, mean, variance, inv_std, m);
    return reported_count(p, m);
  }
  const auto n = static_cast<std::size_t>(p.channels);
  std::vector<double> mu(n), var(n), inv(n);
  sum_moments(p, x.data, mu.data(), var.data(), true, m);
  for (std::size_t c = 0; c < n; ++c)
    inv[c] = store_stats(static_cast<index_t>(c), mu[c], var[c], epsilon, mean, variance, inv_std);
  CoefStore<compute_t<T>> k(p.channels, false);
  set_forward_coefs<T>(k, p.channels, mean, inv.data(), affine);
  affine1(p, x.data, y.data, k.view(), relu, true);
  return reported_count(p, m);
}

template <class T>
void backward_sums(const Geometry& g, In<T> dy, In<T> x, const stat_t<T>* mean, const stat_t<T>* inv_std,
                   Affine<stat_t<T>> affine, Activation activation, double* sum_dy, double* sum_dy_xc) {
  static_assert(is_element_v<T>, "unsupported element type");
  BackwardSetup<T> b(g, x.strides, dy.strides, nullptr, mean, inv_std, affine, activation);
  check_not_null(sum_dy, "sum_dy");
  check_not_null(sum_dy_xc, "sum_dy_xc");
  const index_t ch = b.plan.channels;
  check_apart({span_of(sum_dy, ch, "sum_dy"), span_of(sum_dy_xc, ch, "sum_dy_xc")},
              {span_of(b.plan, kX, x.data, sizeof(T), "x"), span_of(b.plan, kDy, dy.data, sizeof(T), "dy")});
  check_apart_from_stats({span_of(sum_dy, ch, "sum_dy"), span_of(sum_dy_xc, ch, "sum_dy_xc")}, ch, mean, inv_std,
                         affine);
  if (empty(b.plan)) {
    std::fill(sum_dy, sum_dy + b.plan.channels, 0.0);
    std::fill(sum_dy_xc, sum_dy_xc + b.plan.channels, 0.0);
    return;
  }
  check_inputs({dy.data, x.data});
  reduce2(b, dy.data, x.data, sum_dy, sum_dy_xc);
}

template <class S>
void parameter_gradients(index_t channels, const S* inv_std, const double* sum_dy, const double* sum_dy_xc, S* dgamma,
                         S* dbeta) {
  if (channels < 0) throw value_error("channels must be >= 0");
  for (const void* ptr :
       {static_cast<const void*>(inv_std), static_cast<const void*>(sum_dy), static_cast<const void*>(sum_dy_xc),
        static_cast<const void*>(dgamma), static_cast<const void*>(dbeta)})
    check_not_null(ptr, "parameter_gradients' arrays");
  for (std::size_t c = 0; c < static_cast<std::size_t>(channels); ++c)
    detail::store_parameter_gradients(c, static_cast<double>(inv_std[c]), sum_dy[c], sum_dy_xc[c], dgamma, dbeta);
}

template <class T>
void backward_apply(const Geometry& g, In<T> dy, In<T> x, Out<T> dx, const stat_t<T>* mean, const stat_t<T>* inv_std,
                    Affine<stat_t<T>> affine, Activation activation, const double* sum_dy, const double* sum_dy_xc,
                    double count, Statistics statistics, In<T> mask) {
  static_assert(is_element_v<T>, "unsupported element type");
  const Strides full_mask = mask.data ? mask_strides(g, mask.strides) : Strides{};
  BackwardSetup<T> b(g, x.strides, dy.strides, &dx, mean, inv_std, affine, activation,
                     mask.data ? &full_mask : nullptr);
  check_not_null(sum_dy, "sum_dy");
  check_not_null(sum_dy_xc, "sum_dy_xc");
  if (!(count > 0) && statistics == Statistics::batch) throw value_error("backward_apply needs count > 0");
  const index_t ch = b.plan.channels;
  const Span out = span_of(b.plan, kDx, dx.data, sizeof(T), dx.name ? dx.name : "dx");
  check_apart({out}, {span_of(sum_dy, ch, "sum_dy"), span_of(sum_dy_xc, ch, "sum_dy_xc"), mask_span(b.plan, mask)});
  check_apart_from_stats({out}, ch, mean, inv_std, affine);
  if (empty(b.plan)) return;
  check_inputs({dy.data, x.data, dx.data});
  if (statistics == Statistics::batch) b.mask.w = mask.data;  // the count is the callers' (all processes' W)
  affine2(b, dy.data, x.data, dx.data, affine, sum_dy, sum_dy_xc, count, statistics);
}

template <class T>
void backward(const Geometry& g, In<T> dy, In<T> x, Out<T> dx, const stat_t<T>* mean, const stat_t<T>* inv_std,
              Affine<stat_t<T>> affine, Activation activation, stat_t<T>* dgamma, stat_t<T>* dbeta,
              Statistics statistics, In<T> mask) {
  static_assert(is_element_v<T>, "unsupported element type");
  // Fixed statistics have no gradient, so a mask changes nothing there (it is still checked).
  const Strides full_mask = mask.data ? mask_strides(g, mask.strides) : Strides{};
  BackwardSetup<T> b(g, x.strides, dy.strides, &dx, mean, inv_std, affine, activation,
                     mask.data ? &full_mask : nullptr);
  check_not_null(dgamma, "dgamma");
  check_not_null(dbeta, "dbeta");
  const index_t ch = b.plan.channels;
  const Span dgamma_out = span_of(dgamma, ch, "dgamma"), dbeta_out = span_of(dbeta, ch, "dbeta");
  const Span dx_out = span_of(b.plan, kDx, dx.data, sizeof(T), dx.name ? dx.name : "dx");
  check_apart_from_stats({dx_out, dgamma_out, dbeta_out}, ch, mean, inv_std, affine);
  check_apart({dgamma_out, dbeta_out},
              {span_of(b.plan, kX, x.data, sizeof(T), "x"), span_of(b.plan, kDy, dy.data, sizeof(T), "dy")});
  check_apart({dx_out, dgamma_out, dbeta_out}, {mask_span(b.plan, mask)});
  const Mask<T> m = mask_of(b.plan, mask);
  if (statistics == Statistics::batch) b.mask = m;
  if (empty(b.plan)) {
    std::fill(dgamma, dgamma + ch, stat_t<T>(0));
    std::fill(dbeta, dbeta + ch, stat_t<T>(0));
    return;
  }
  check_inputs({dy.data, x.data, dx.data});
  if (const ChannelBlocks cb = channel_blocks(b.plan, 2 * sizeof(T)); cb.threads) {  // x and dy stay in cache
    backward_channel_blocks(b, cb, dy.data, x.data, dx.data, affine, statistics, dgamma, dbeta);
    return;
  }
  std::vector<double> sum_dy(static_cast<std::size_t>(ch)), sum_dy_xc(sum_dy.size());
  reduce2(b, dy.data, x.data, sum_dy.data(), sum_dy_xc.data());
  parameter_gradients(ch, inv_std, sum_dy.data(), sum_dy_xc.data(), dgamma, dbeta);
  affine2(b, dy.data, x.data, dx.data, affine, sum_dy.data(), sum_dy_xc.data(), stat_count(b.plan, b.mask), statistics);
}

#define BATCHNORM_INSTANTIATE(T)                                                                                       \
  template index_t partial_moments<T>(const Geometry&, In<T>, double*, double*, In<T>);                                \
  template index_t moments<T>(const Geometry&, In<T>, stat_t<T>*, stat_t<T>*, In<T>);                                  \
  template void normalize<T>(const Geometry&, In<T>, Out<T>, const stat_t<T>*, const stat_t<T>*, Affine<stat_t<T>>,    \
                             double, Activation, stat_t<T>*);                                                          \
  template index_t forward<T>(const Geometry&, In<T>, Out<T>, Affine<stat_t<T>>, double, Activation, stat_t<T>*,       \
                              stat_t<T>*, stat_t<T>*, In<T>);                                                          \
  template void backward<T>(const Geometry&, In<T>, In<T>, Out<T>, const stat_t<T>*, const stat_t<T>*,                 \
                            Affine<stat_t<T>>, Activation, stat_t<T>*, stat_t<T>*, Statistics, In<T>);                 \
  template void backward_sums<T>(const Geometry&, In<T>, In<T>, const stat_t<T>*, const stat_t<T>*, Affine<stat_t<T>>, \
                                 Activation, double*, double*);                                                        \
  template void backward_apply<T>(const Geometry&, In<T>, In<T>, Out<T>, const stat_t<T>*, const stat_t<T>*,           \
                                  Affine<stat_t<T>>, Activation, const double*, const double*, double, Statistics,     \
                                  In<T>);

BATCHNORM_INSTANTIATE(float)
BATCHNORM_INSTANTIATE(double)
BATCHNORM_INSTANTIATE(float16_t)
BATCHNORM_INSTANTIATE(bfloat16_t)
template void parameter_gradients<float>(index_t, const float*, const double*, const double*, float*, float*);
template void parameter_gradients<double>(index_t, const double*, const double*, const double*, double*, double*);

}  // namespace batchnorm
