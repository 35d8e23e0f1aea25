// A CPU inference step with batchnorm::BatchNorm<float>, in a C++ application without
// Python: one generated batch normalized in both layouts, channels-first (NCHW, PyTorch's
// axis 1) and channels-last (NHWC, axis -1), with the ReLU fused, checked against a plain
// loop. Exits non-zero if a value is off.
#include <batchnorm/batchnorm.hpp>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <random>
#include <vector>

namespace bn = batchnorm;
using bn::index_t;

int main() {
  const index_t N = 8, C = 32, H = 14, W = 14;

  // Two layers with the same state, one per layout. In an application the parameters and
  // moving statistics come from a trained model; here they are made up.
  auto options = bn::BatchNormOptions::pytorch();  // momentum 0.1, epsilon 1e-5, axis 1
  options.activation = bn::Activation::relu;
  bn::BatchNorm<float> nchw(C, options);
  options.axes = {-1};
  bn::BatchNorm<float> nhwc(C, options);
  for (bn::BatchNorm<float>* layer : {&nchw, &nhwc}) {
    for (index_t c = 0; c < C; ++c) {
      const auto k = static_cast<float>(c);
      layer->gamma()[c] = 0.5f + 0.05f * k;
      layer->beta()[c] = 0.1f * k - 1.0f;
      layer->moving_mean()[c] = 3.0f + 0.1f * k;
      layer->moving_variance()[c] = 4.0f + 0.2f * k;
    }
  }

  // One batch, stored both ways: x_nchw[n][c][h][w] == x_nhwc[n][h][w][c].
  const auto size = static_cast<std::size_t>(N * C * H * W);
  std::vector<float> x_nchw(size), x_nhwc(size), y_nchw(size), y_nhwc(size);
  const auto at_nchw = [&](index_t n, index_t c, index_t h, index_t w) {
    return static_cast<std::size_t>(((n * C + c) * H + h) * W + w);
  };
  const auto at_nhwc = [&](index_t n, index_t c, index_t h, index_t w) {
    return static_cast<std::size_t>(((n * H + h) * W + w) * C + c);
  };
  std::mt19937 rng(0);
  std::normal_distribution<float> normal(3.0f, 2.0f);
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t h = 0; h < H; ++h)
        for (index_t w = 0; w < W; ++w) x_nchw[at_nchw(n, c, h, w)] = x_nhwc[at_nhwc(n, c, h, w)] = normal(rng);

  // The inference step: y = relu(gamma * (x - moving_mean) / sqrt(moving_variance + eps) + beta).
  nchw.forward({N, C, H, W}, {x_nchw.data()}, {y_nchw.data()}, bn::Mode::inference);
  nhwc.forward({N, H, W, C}, {x_nhwc.data()}, {y_nhwc.data()}, bn::Mode::inference);

  // The same with a plain loop, in double.
  double max_error = 0;
  for (index_t n = 0; n < N; ++n)
    for (index_t c = 0; c < C; ++c)
      for (index_t h = 0; h < H; ++h)
        for (index_t w = 0; w < W; ++w) {
          const double x = x_nchw[at_nchw(n, c, h, w)];
          const double z = nchw.gamma()[c] * (x - nchw.moving_mean()[c]) /
                               std::sqrt(static_cast<double>(nchw.moving_variance()[c]) + options.epsilon) +
                           nchw.beta()[c];
          const double want = std::max(z, 0.0);
          for (const double got : {y_nchw[at_nchw(n, c, h, w)], y_nhwc[at_nhwc(n, c, h, w)]})
            max_error = std::max(max_error, std::fabs(got - want) / (1.0 + std::fabs(want)));
        }

  const bool ok = max_error <= 1e-5;
  std::printf("batchnorm %s (%s, %d threads): inference on %lldx%lldx%lldx%lld in NCHW and NHWC, max error %.1e: %s\n",
              bn::version().c_str(), bn::active_isa().c_str(), bn::get_num_threads(), static_cast<long long>(N),
              static_cast<long long>(C), static_cast<long long>(H), static_cast<long long>(W), max_error,
              ok ? "ok" : "WRONG");
  return ok ? 0 : 1;
}
