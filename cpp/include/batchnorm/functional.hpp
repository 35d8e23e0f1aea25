// The stateless batch-norm kernels of batchnorm: moments, normalize, forward, backward.
//
// Every function works on a strided n-d array described by a Geometry (shape and the
// feature axes, which are kept; statistics reduce over all the other axes) and, for
// each array argument, a data pointer and strides in elements (empty = C-contiguous;
// negative and zero strides are allowed for inputs). Per-channel arrays (mean,
// variance, gamma, beta, ...) are contiguous, one value per channel, channels in C
// order of the sorted feature axes; a null gamma means 1, a null beta means 0.
//
// Element types: float, double, float16_t, bfloat16_t. Statistics and per-channel
// arrays are stat_t<T> (float, or double for double); all reductions accumulate in
// double, so results do not depend on the thread count beyond the final rounding.
//
// Example (NCHW float data, feature axis 1):
//
//   std::vector<float> x(N * C * H * W), y(x.size()), mean(C), var(C), inv_std(C);
//   batchnorm::Geometry g{{N, C, H, W}, {1}};
//   batchnorm::forward<float>(g, {x.data()}, {y.data()}, {}, 1e-5, batchnorm::Activation::none,
//                             mean.data(), var.data(), inv_std.data());
//
// Masked statistics (moments, forward, backward: the last argument `mask`, default none):
// the statistics are weighted by a mask over the reduced positions, an array of x's element
// type (0/1 for a boolean mask, or frequency weights) with x's shape without the feature
// axes, its strides in elements over that shape (empty = C-contiguous; 0 broadcasts). Every
// position is normalized with them, and backward is the exact gradient of that function.
// A mask that selects nothing (no nonzero value) is a value_error.
//
// Errors throw batchnorm::value_error or batchnorm::type_error (both std::invalid_argument).
#pragma once

#include "batchnorm/export.hpp"
#include "batchnorm/types.hpp"

namespace batchnorm {

/// The shape of an array and its feature axes (int or several; negative counts from the end).
struct Geometry {
  Shape shape;
  Axes axes;
};

/// An input array: data pointer and strides in elements (empty = C-contiguous).
template <class T>
struct In {
  const T* data = nullptr;
  Strides strides = {};
};

/// An output array: data pointer and strides in elements (empty = C-contiguous).
/// It must not overlap the inputs, unless it is the same array with the same strides.
/// Strides that give two of its elements one location (zero, too small or interleaved
/// onto each other) are refused with value_error; interleaved strides that keep every
/// element apart are accepted up to 2^20 elements (checked one by one) and refused beyond.
/// Those errors call it `name`, or by its parameter's name (y, dx) when that is null.
/// Every output (this one and the per-channel ones: mean, variance, inv_std, dgamma, ...)
/// must also be apart from the per-channel arguments and from each other, and the per-channel
/// outputs from the data: value_error names both otherwise.
template <class T>
struct Out {
  T* data = nullptr;
  Strides strides = {};
  const char* name = nullptr;
};

/// Per-channel scale and shift. nullptr: gamma = 1, beta = 0.
template <class S>
struct Affine {
  const S* gamma = nullptr;
  const S* beta = nullptr;
};

/// The feature axes of an array of ndim dimensions, validated (at least one, each in
/// [-ndim, ndim), none repeated), non-negative and sorted: the order of the channels.
BATCHNORM_API Axes feature_axes(const Axes& axes, std::size_t ndim);

/// Number of channels (product of the feature axes' sizes) and of values reduced per
/// channel (product of the others), after validating g.
struct Extent {
  index_t channels;
  index_t count;
};
BATCHNORM_API Extent extent(const Geometry& g);

/// Per-channel batch mean and biased (population) variance. Returns the count reduced
/// per channel (with a mask: the positions it selects). Throws value_error for an empty batch.
template <class T>
BATCHNORM_API index_t moments(const Geometry& g, In<T> x, stat_t<T>* mean, stat_t<T>* variance, In<T> mask = {});

/// Mergeable per-channel statistics (count, mean, M2 = sum of squared deviations), in
/// double. Partials from different arrays merge exactly (Chan et al.); see merge_moments.
/// An empty batch is allowed here (count 0, mean 0, M2 0), and so is a mask that selects
/// nothing. With a mask, mean and M2 are the weighted ones, to be merged with the mask's
/// weight sum W as the count (the return value is the positions it selects).
template <class T>
BATCHNORM_API index_t partial_moments(const Geometry& g, In<T> x, double* mean, double* m2, In<T> mask = {});

/// Merges (count_b, mean_b, m2_b) into (count_a, mean_a, m2_a), per channel.
BATCHNORM_API void merge_moments(index_t channels, double* count_a, double* mean_a, double* m2_a, const double* count_b,
                                 const double* mean_b, const double* m2_b);

/// Inference pass: y = act(gamma * (x - mean) * inv_std + beta), inv_std = 1/sqrt(variance +
/// epsilon) rounded to stat_t<T> (as forward stores it, so that backward with that inv_std
/// rebuilds the same ReLU mask). A non-null inv_std receives it, one value per channel (also
/// for an empty batch).
template <class T>
BATCHNORM_API void normalize(const Geometry& g, In<T> x, Out<T> y, const stat_t<T>* mean, const stat_t<T>* variance,
                             Affine<stat_t<T>> affine, double epsilon, Activation activation = Activation::none,
                             stat_t<T>* inv_std = nullptr);

/// Training pass: batch statistics, then y = act(gamma * (x - mean) * inv_std + beta)
/// with inv_std = 1 / sqrt(variance + epsilon). Writes the statistics (variance biased)
/// and returns the count reduced per channel (as moments). y may be x itself (in place).
template <class T>
BATCHNORM_API index_t forward(const Geometry& g, In<T> x, Out<T> y, Affine<stat_t<T>> affine, double epsilon,
                              Activation activation, stat_t<T>* mean, stat_t<T>* variance, stat_t<T>* inv_std,
                              In<T> mask = {});

/// Whether the statistics used in the forward pass were the batch's own (training) or
/// constants such as moving averages (inference): the latter have no gradient.
enum class Statistics { batch, fixed };

/// Backward of forward() (Statistics::batch) or of normalize() (Statistics::fixed, with
/// inv_std = 1/sqrt(variance + epsilon)). With Activation::relu the mask is rebuilt from
/// x, mean, inv_std, gamma and beta exactly as the forward pass computed it.
/// dgamma = sum(dy' * x_hat), dbeta = sum(dy'), always written (dy' = dy masked by relu).
template <class T>
BATCHNORM_API void backward(const Geometry& g, In<T> dy, In<T> x, Out<T> dx, const stat_t<T>* mean,
                            const stat_t<T>* inv_std, Affine<stat_t<T>> affine, Activation activation,
                            stat_t<T>* dgamma, stat_t<T>* dbeta, Statistics statistics = Statistics::batch,
                            In<T> mask = {});

/// The two halves of backward, for callers that combine the sums of several arrays
/// (synchronized batch norm across processes) before applying them.
/// backward_sums writes per channel sum_dy = sum(dy') and sum_dy_xc = sum(dy' * (x - mean)),
/// in double (parameter_gradients turns them into dgamma and dbeta).
template <class T>
BATCHNORM_API void backward_sums(const Geometry& g, In<T> dy, In<T> x, const stat_t<T>* mean, const stat_t<T>* inv_std,
                                 Affine<stat_t<T>> affine, Activation activation, double* sum_dy, double* sum_dy_xc);

/// dgamma and dbeta from backward_sums' sums, computed and rounded as backward computes them
/// (for a synchronized layer, each process's own, from its sums before they are combined):
/// dbeta = sum_dy; dgamma = inv_std * sum_dy_xc, or 0 * sum_dy where inv_std is 0 (a
/// variance beyond the range: every x_hat is 0, whatever sum_dy_xc holds). S is stat_t of
/// the data (float or double).
template <class S>
BATCHNORM_API void parameter_gradients(index_t channels, const S* inv_std, const double* sum_dy,
                                       const double* sum_dy_xc, S* dgamma, S* dbeta);

/// backward_apply writes dx from (possibly combined) sums over `count` values per channel
/// (with a mask, the statistics' count: the sum W of the mask's weights over all arrays).
template <class T>
BATCHNORM_API void backward_apply(const Geometry& g, In<T> dy, In<T> x, Out<T> dx, const stat_t<T>* mean,
                                  const stat_t<T>* inv_std, Affine<stat_t<T>> affine, Activation activation,
                                  const double* sum_dy, const double* sum_dy_xc, double count,
                                  Statistics statistics = Statistics::batch, In<T> mask = {});

}  // namespace batchnorm
