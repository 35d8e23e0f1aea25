// Interrupting long calls (set_interrupt_check) and arguments that share memory.
#include <gtest/gtest.h>

#include <atomic>
#include <string>
#include <vector>

#include "batchnorm/batchnorm.hpp"
#include "test_util.hpp"

namespace {

namespace bn = batchnorm;

std::atomic<int> g_asked{0};
bool always_stop() {
  ++g_asked;
  return true;
}

// Restores the default (no check) after a test.
struct CheckGuard {
  ~CheckGuard() { bn::set_interrupt_check(nullptr); }
};

// 2^30 values read from one row of 2^16 channels (zero stride): no memory, and long enough
// (tens of milliseconds at least) for the check to be asked.
std::vector<float> row(std::size_t n) {
  std::vector<float> v(n);
  for (std::size_t i = 0; i < n; ++i) v[i] = static_cast<float>(i % 7);
  return v;
}

TEST(Interrupt, StopsALongCallOnAnyThreadCount) {
  bntest::ThreadGuard threads;
  CheckGuard guard;
  const std::vector<float> x = row(1 << 16);
  const bn::Geometry g{{1 << 14, 1 << 16}, {1}};
  std::vector<float> mean(1 << 16), variance(1 << 16);
  bn::set_interrupt_check(&always_stop);
  for (int nt : {1, 2}) {
    bn::set_num_threads(nt);
    g_asked = 0;
    EXPECT_THROW(bn::moments<float>(g, {x.data(), {0, 1}}, mean.data(), variance.data()), bn::interrupted);
    EXPECT_EQ(g_asked.load(), 1) << "asked once, then every thread stopped";
  }
}

TEST(Interrupt, ShortCallsNeverAsk) {
  CheckGuard guard;
  const std::vector<float> x = row(1 << 10);
  const bn::Geometry g{{1 << 11, 1 << 10}, {1}};  // 2^21 values: under the interruptible size
  std::vector<float> mean(1 << 10), variance(1 << 10);
  bn::set_interrupt_check(&always_stop);
  g_asked = 0;
  bn::moments<float>(g, {x.data(), {0, 1}}, mean.data(), variance.data());
  EXPECT_EQ(g_asked.load(), 0);
  for (std::size_t c = 0; c < mean.size(); ++c) {
    EXPECT_EQ(mean[c], x[c]);
    EXPECT_EQ(variance[c], 0.0f);
  }
}

TEST(Overlap, OutputsApartFromPerChannelArguments) {
  const bn::index_t n = 8, c = 16;
  std::vector<float> x(n * c, 1.0f), buffer(n * c + c, 1.0f), mean(c), variance(c), inv_std(c);
  const bn::Geometry g{{n, c}, {1}};
  auto message = [&](const float* gamma, float* m) {
    try {
      bn::forward<float>(g, {x.data()}, {buffer.data()}, {gamma, nullptr}, 1e-3, bn::Activation::none, m,
                         variance.data(), inv_std.data());
    } catch (const bn::value_error& e) {
      return std::string(e.what());
    }
    return std::string();
  };
  EXPECT_NE(message(buffer.data() + c, mean.data()).find("y overlaps gamma"), std::string::npos);
  EXPECT_NE(message(nullptr, x.data()).find("mean overlaps x"), std::string::npos);
  EXPECT_NE(message(nullptr, variance.data()).find("mean overlaps variance"), std::string::npos);
  EXPECT_EQ(message(buffer.data() + n * c, mean.data()), "");  // right after y: apart
}

}  // namespace
