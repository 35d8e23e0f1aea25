// batchnorm::BatchNorm<T>: a stateful batch-normalization layer for C++ applications.
//
// It owns what the functional API (functional.hpp) leaves to the caller: the parameters
// gamma and beta, the moving (running) statistics and their update rule, the per-channel
// values the last forward pass used (for backward), and the gradients of gamma and beta.
// All arithmetic on arrays is done by the functional kernels (forward, normalize, backward);
// this class only does per-channel bookkeeping. Header-only: any element type of the
// functional API works (float, double, float16_t, bfloat16_t); parameters, statistics and
// gradients are stat_t<T> (float, or double for double).
//
// Example: a channels-first (NCHW) layer with PyTorch's conventions, ReLU fused.
//
//   auto options = batchnorm::BatchNormOptions::pytorch();   // momentum 0.1, eps 1e-5, axis 1
//   options.activation = batchnorm::Activation::relu;
//   batchnorm::BatchNorm<float> bn(C, options);
//   const batchnorm::Shape shape{N, C, H, W};
//   bn.forward(shape, {x.data()}, {y.data()}, batchnorm::Mode::training);   // batch statistics;
//                                                                           // running ones updated
//   bn.backward(shape, {dy.data()}, {x.data()}, {dx.data()});  // dx; gamma_grad(), beta_grad()
//   for (index_t c = 0; c < C; ++c) bn.gamma()[c] -= lr * bn.gamma_grad()[c];   // your optimizer
//   bn.forward(shape, {x.data()}, {y.data()}, batchnorm::Mode::inference);  // running statistics
//
// Arrays are passed as in the functional API: a shape, and per array a data pointer with
// optional strides in elements (empty = C-contiguous). The feature axes are fixed by the
// options (PyTorch: 1, channels-first; Keras: -1, channels-last); their sizes multiply to
// channels(). So one layer normalizes an NCHW batch with axes {1} or an NHWC batch with
// axes {-1}; an NHWC-strided view of an NCHW-shaped array works with axes {1} too.
//
// Moving statistics, per channel, for a training batch with mean m, biased variance v and
// M values per channel (var_b = v * M / (M - 1) when the options ask for the unbiased one):
//   Convention::keras   (tf-keras: momentum weights the OLD value; default 0.99)
//     moving_mean     = moving_mean     - (moving_mean     - m)     * (1 - momentum)
//     moving_variance = moving_variance - (moving_variance - var_b) * (1 - momentum)
//     computed in stat_t<T> as tf-keras does; the biased variance by default (tf-keras's
//     non-fused layers; unbiased_moving_variance = true gives its fused 4-D/5-D behaviour,
//     with M / max(M - 1, 1), so M = 1 gives 0 and never NaN).
//   Convention::pytorch (torch.nn.BatchNorm*d: momentum weights the NEW value; default 0.1)
//     f = momentum, or 1 / (num_batches_tracked + 1) without one (cumulative average)
//     running_mean = (1 - f) * running_mean + f * m
//     running_var  = (1 - f) * running_var  + f * var_b      (unbiased by default)
//     computed in double, rounded to stat_t<T>; training with M = 1 throws, as in PyTorch.
// The output of a training pass is always normalized with the biased batch variance (both
// frameworks do so); num_batches_tracked counts the training passes in both conventions.
//
// backward(dy, x) differentiates the last forward call, which must have been given the same
// x (the layer keeps no pointer to it: do not overwrite x in place if you need backward):
// after a training pass through the batch statistics (Statistics::batch), after an inference
// pass with the moving statistics as constants (Statistics::fixed, dx = gamma * inv_std * dy).
// It uses the gamma, beta, mean and inv_std of that forward call (copied then), so updating
// the parameters in between changes nothing; with the ReLU fused the mask is rebuilt from x
// exactly as the forward computed it. gamma_grad() = sum(dy' * x_hat) and beta_grad() =
// sum(dy') are written by every backward, also without scale/center (dy' = dy masked by relu).
//
// Errors throw batchnorm::value_error (a std::invalid_argument), and a call that throws
// leaves the layer unchanged: options are checked at construction; forward checks the
// geometry (axes, channel count, strides) before anything else, the kernels run on
// temporaries, and the new state is committed only after every step that can fail. An
// output array may have been partly written when a kernel throws. One layer is not meant to
// be called from several threads at once (the kernels use the library's threads themselves).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <string>
#include <utility>
#include <vector>

#include "batchnorm/functional.hpp"
#include "batchnorm/types.hpp"

namespace batchnorm {

/// How the moving statistics follow the batches (see the top of this file).
enum class Convention { keras, pytorch };

/// Batch statistics (training: the moving statistics are updated) or the moving ones (inference).
enum class Mode { training, inference };

/// The configuration of a BatchNorm layer. Start from keras() or pytorch(), then change fields.
struct BatchNormOptions {
  Convention convention = Convention::pytorch;
  /// Keras: the weight of the old value, in [0, 1]. PyTorch: the weight of the new value, in
  /// [0, 1], or std::nullopt for the cumulative average of all batches seen.
  std::optional<double> momentum = 0.1;
  /// Added to the variance before the square root; finite and >= 0.
  double epsilon = 1e-5;
  /// The feature axes (kept; statistics reduce over the others); negative counts from the end.
  Axes axes = {1};
  /// Learn gamma (scale) and beta (center); without them gamma = 1 and beta = 0.
  bool scale = true;
  bool center = true;
  /// Which batch variance feeds the moving variance: M/(M-1) times the biased one, or the biased one.
  bool unbiased_moving_variance = true;
  /// An activation fused into every pass (and into backward).
  Activation activation = Activation::none;

  /// tf-keras's BatchNormalization: momentum 0.99 (weight of the old value), epsilon 1e-3,
  /// channels-last, biased moving variance (pass unbiased = true for its fused 4-D/5-D path).
  static BatchNormOptions keras(double momentum = 0.99, double epsilon = 1e-3, Axes axes = {-1},
                                bool unbiased = false) {
    return with(Convention::keras, momentum, epsilon, std::move(axes), unbiased);
  }

  /// torch.nn.BatchNorm*d: momentum 0.1 (weight of the new value; std::nullopt: cumulative
  /// average), epsilon 1e-5, channels-first (axis 1), unbiased running variance.
  static BatchNormOptions pytorch(std::optional<double> momentum = 0.1, double epsilon = 1e-5, Axes axes = {1}) {
    return with(Convention::pytorch, momentum, epsilon, std::move(axes), true);
  }

 private:
  static BatchNormOptions with(Convention convention, std::optional<double> momentum, double epsilon, Axes axes,
                               bool unbiased) {
    BatchNormOptions o;
    o.convention = convention;
    o.momentum = momentum;
    o.epsilon = epsilon;
    o.axes = std::move(axes);
    o.unbiased_moving_variance = unbiased;
    return o;
  }
};

/// A batch-normalization layer over `channels` channels; see the top of this file.
/// torch.nn.BatchNorm*d's running-statistics rule, in place: running = (1 - f) * running +
/// f * batch, in double and rounded once, the batch variance multiplied by `bessel` first
/// (M / (M - 1) for torch's unbiased variance).
template <class S>
void update_running_pytorch(index_t channels, S* running_mean, S* running_var, const S* batch_mean,
                            const S* batch_variance, double f, double bessel) {
  for (index_t c = 0; c < channels; ++c) {
    const double v = static_cast<double>(batch_variance[c]) * bessel;
    running_mean[c] =
        static_cast<S>((1.0 - f) * static_cast<double>(running_mean[c]) + f * static_cast<double>(batch_mean[c]));
    running_var[c] = static_cast<S>((1.0 - f) * static_cast<double>(running_var[c]) + f * v);
  }
}

template <class T>
class BatchNorm {
  static_assert(is_element_v<T>, "BatchNorm<T>: T must be float, double, float16_t or bfloat16_t");

 public:
  using value_type = T;
  /// The type of parameters, statistics and gradients.
  using stat_type = stat_t<T>;

  /// gamma = 1, beta = 0, moving mean 0, moving variance 1. Throws value_error for
  /// channels < 1, a momentum outside [0, 1] (or missing with Convention::keras), an epsilon
  /// that is negative or not finite, or no feature axis.
  explicit BatchNorm(index_t channels, BatchNormOptions options = BatchNormOptions())
      : channels_(channels), options_(std::move(options)) {
    if (channels < 1) throw value_error("BatchNorm: channels must be >= 1, got " + std::to_string(channels));
    if (options_.momentum) {
      const double m = *options_.momentum;
      if (!(m >= 0.0 && m <= 1.0)) throw value_error("BatchNorm: momentum must be in [0, 1], got " + std::to_string(m));
    } else if (options_.convention == Convention::keras) {
      throw value_error("BatchNorm: Convention::keras needs a momentum (only PyTorch's has a cumulative average)");
    }
    if (!std::isfinite(options_.epsilon) || options_.epsilon < 0.0)
      throw value_error("BatchNorm: epsilon must be finite and >= 0, got " + std::to_string(options_.epsilon));
    if (options_.axes.empty()) throw value_error("BatchNorm: no feature axis");
    const auto n = static_cast<std::size_t>(channels);
    if (options_.scale) gamma_.assign(n, stat_type(1));
    if (options_.center) beta_.assign(n, stat_type(0));
    moving_mean_.assign(n, stat_type(0));
    moving_variance_.assign(n, stat_type(1));
    gamma_grad_.assign(n, stat_type(0));
    beta_grad_.assign(n, stat_type(0));
  }

  /// Normalizes x (of the given shape) into y. Mode::training: with the batch's statistics,
  /// then updates the moving statistics and num_batches_tracked; Mode::inference: with the
  /// moving statistics. y may be x itself (then backward is no longer possible). Throws
  /// value_error for a bad geometry, a channel count other than channels(), an empty batch in
  /// training, and (Convention::pytorch) one value per channel in training.
  void forward(const Shape& shape, In<T> x, Out<T> y, Mode mode) {
    const Geometry g{shape, options_.axes};
    const index_t count = check_geometry(g);
    const auto n = static_cast<std::size_t>(channels_);
    Saved saved;
    saved.shape = shape;
    saved.gamma = gamma_;
    saved.beta = beta_;
    saved.mean.resize(n);
    saved.inv_std.resize(n);
    if (mode == Mode::inference) {
      saved.statistics = Statistics::fixed;
      saved.mean = moving_mean_;
      for (std::size_t c = 0; c < n; ++c)  // as normalize() rounds it
        saved.inv_std[c] =
            static_cast<stat_type>(1.0 / std::sqrt(static_cast<double>(moving_variance_[c]) + options_.epsilon));
      batchnorm::normalize<T>(g, x, y, moving_mean_.data(), moving_variance_.data(), affine(), options_.epsilon,
                              options_.activation);
      saved_ = std::move(saved);  // noexcept from here on
      has_saved_ = true;
      return;
    }
    if (options_.convention == Convention::pytorch && count == 1)
      throw value_error(
          "BatchNorm: expected more than 1 value per channel when training (PyTorch convention), got "
          "shape " +
          shape_string(shape));
    std::vector<stat_type> variance(n);
    saved.statistics = Statistics::batch;
    const index_t m = batchnorm::forward<T>(g, x, y, affine(), options_.epsilon, options_.activation, saved.mean.data(),
                                            variance.data(), saved.inv_std.data());
    std::vector<stat_type> new_mean(moving_mean_), new_variance(moving_variance_);
    update_moving(saved.mean, variance, m, new_mean, new_variance);
    moving_mean_.swap(new_mean);  // noexcept from here on
    moving_variance_.swap(new_variance);
    ++num_batches_tracked_;
    saved_ = std::move(saved);
    has_saved_ = true;
  }

  /// Backward of the last forward call, which must have had the same shape and this x:
  /// writes dx and sets gamma_grad() and beta_grad(). Throws value_error before any forward,
  /// for another shape, or for bad strides.
  void backward(const Shape& shape, In<T> dy, In<T> x, Out<T> dx) {
    if (!has_saved_) throw value_error("BatchNorm: backward before any forward");
    if (shape != saved_.shape)
      throw value_error("BatchNorm: backward of shape " + shape_string(shape) + ", but the last forward had shape " +
                        shape_string(saved_.shape));
    const Geometry g{shape, options_.axes};
    const auto n = static_cast<std::size_t>(channels_);
    std::vector<stat_type> dgamma(n), dbeta(n);
    const Affine<stat_type> a{saved_.gamma.empty() ? nullptr : saved_.gamma.data(),
                              saved_.beta.empty() ? nullptr : saved_.beta.data()};
    batchnorm::backward<T>(g, dy, x, dx, saved_.mean.data(), saved_.inv_std.data(), a, options_.activation,
                           dgamma.data(), dbeta.data(), saved_.statistics);
    gamma_grad_.swap(dgamma);
    beta_grad_.swap(dbeta);
  }

  index_t channels() const { return channels_; }
  const BatchNormOptions& options() const { return options_; }

  /// channels() values each; gamma/beta are nullptr without scale/center.
  stat_type* gamma() { return gamma_.empty() ? nullptr : gamma_.data(); }
  const stat_type* gamma() const { return gamma_.empty() ? nullptr : gamma_.data(); }
  stat_type* beta() { return beta_.empty() ? nullptr : beta_.data(); }
  const stat_type* beta() const { return beta_.empty() ? nullptr : beta_.data(); }
  stat_type* moving_mean() { return moving_mean_.data(); }
  const stat_type* moving_mean() const { return moving_mean_.data(); }
  stat_type* moving_variance() { return moving_variance_.data(); }
  const stat_type* moving_variance() const { return moving_variance_.data(); }
  /// Gradients of the last backward (zero before any): sum(dy' * x_hat) and sum(dy').
  const stat_type* gamma_grad() const { return gamma_grad_.data(); }
  const stat_type* beta_grad() const { return beta_grad_.data(); }

  /// Training passes so far (PyTorch's num_batches_tracked; drives the cumulative average).
  std::int64_t num_batches_tracked() const { return num_batches_tracked_; }
  void set_num_batches_tracked(std::int64_t n) {
    if (n < 0) throw value_error("BatchNorm: num_batches_tracked must be >= 0");
    num_batches_tracked_ = n;
  }

  /// Moving mean 0, moving variance 1, num_batches_tracked 0 (PyTorch's reset_running_stats).
  void reset_moving_statistics() {
    std::fill(moving_mean_.begin(), moving_mean_.end(), stat_type(0));
    std::fill(moving_variance_.begin(), moving_variance_.end(), stat_type(1));
    num_batches_tracked_ = 0;
  }

  /// The per-channel mean and inv_std = 1/sqrt(variance + epsilon) the last forward used
  /// (the batch's, or the moving ones); nullptr before any forward.
  const stat_type* last_mean() const { return has_saved_ ? saved_.mean.data() : nullptr; }
  const stat_type* last_inv_std() const { return has_saved_ ? saved_.inv_std.data() : nullptr; }

 private:
  struct Saved {
    Shape shape;
    Statistics statistics = Statistics::batch;
    std::vector<stat_type> mean, inv_std, gamma, beta;
  };

  Affine<stat_type> affine() const { return {gamma(), beta()}; }

  static std::string shape_string(const Shape& shape) {
    std::string s = "(";
    for (std::size_t i = 0; i < shape.size(); ++i) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + ")";
  }

  // Validates the geometry and the channel count; returns the values per channel.
  index_t check_geometry(const Geometry& g) const {
    const Extent e = extent(g);
    if (e.channels != channels_)
      throw value_error("BatchNorm: the feature axes of shape " + shape_string(g.shape) + " hold " +
                        std::to_string(e.channels) + " channels, the layer has " + std::to_string(channels_));
    return e.count;
  }

  // New moving statistics (in mean/variance, which hold the old ones) from a batch's mean,
  // biased variance and count M, by the convention of the options.
  void update_moving(const std::vector<stat_type>& batch_mean, const std::vector<stat_type>& batch_variance, index_t M,
                     std::vector<stat_type>& mean, std::vector<stat_type>& variance) const {
    const double m = static_cast<double>(M);
    const bool unbiased = options_.unbiased_moving_variance;
    if (options_.convention == Convention::keras) {
      // tf-keras: var.assign_sub((var - value) * (1 - momentum)), in the parameter type;
      // its fused kernel's unbiased variance uses M / max(M - 1, 1).
      const double bessel = unbiased ? m / std::max(m - 1.0, 1.0) : 1.0;
      const auto decay = static_cast<stat_type>(1.0 - *options_.momentum);
      for (std::size_t c = 0; c < mean.size(); ++c) {
        const auto v = static_cast<stat_type>(static_cast<double>(batch_variance[c]) * bessel);
        mean[c] = static_cast<stat_type>(mean[c] - (mean[c] - batch_mean[c]) * decay);
        variance[c] = static_cast<stat_type>(variance[c] - (variance[c] - v) * decay);
      }
      return;
    }
    // PyTorch: f = 1/(n+1) without momentum.
    const double f = options_.momentum ? *options_.momentum : 1.0 / (static_cast<double>(num_batches_tracked_) + 1.0);
    const double bessel = unbiased ? m / (m - 1.0) : 1.0;  // M > 1 was checked
    update_running_pytorch(static_cast<index_t>(mean.size()), mean.data(), variance.data(), batch_mean.data(),
                           batch_variance.data(), f, bessel);
  }

  index_t channels_;
  BatchNormOptions options_;
  std::vector<stat_type> gamma_, beta_, moving_mean_, moving_variance_, gamma_grad_, beta_grad_;
  std::int64_t num_batches_tracked_ = 0;
  Saved saved_;
  bool has_saved_ = false;
};

}  // namespace batchnorm
