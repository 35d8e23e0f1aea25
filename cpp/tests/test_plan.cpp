// The canonical view (plan.hpp): layout classification, flipping, dropping, coalescing,
// validation, and that every plan visits exactly the elements of its arrays, each once,
// with the right channel.
#include <gtest/gtest.h>

#include <algorithm>
#include <array>
#include <tuple>
#include <utility>
#include <vector>

#include "plan.hpp"
#include "test_util.hpp"

namespace {

using batchnorm::Axes;
using batchnorm::Geometry;
using batchnorm::index_t;
using batchnorm::Shape;
using batchnorm::Strides;
using batchnorm::value_error;
using batchnorm::detail::Dim;
using batchnorm::detail::Kind;
using batchnorm::detail::make_plan;
using batchnorm::detail::Plan;
using bntest::make_strides;

Plan plan1(const Shape& shape, const Axes& axes, const Strides& strides = {}) {
  return make_plan(Geometry{shape, axes}, {&strides});
}

// (size, stride of operand 0) of each dim.
std::vector<std::pair<index_t, index_t>> dims0(const std::vector<Dim>& dims) {
  std::vector<std::pair<index_t, index_t>> out;
  for (const Dim& d : dims) out.emplace_back(d.size, d.stride[0]);
  return out;
}

using P = std::vector<std::pair<index_t, index_t>>;

TEST(Plan, NchwContiguousAxis1IsChannelsFirst) {
  const Plan p = plan1({2, 3, 4, 5}, {1});
  EXPECT_EQ(p.kind, Kind::channels_first) << kind_name(p.kind);
  EXPECT_EQ(p.channels, 3);
  EXPECT_EQ(p.count, 40);
  EXPECT_EQ(dims0(p.channel_dims), (P{{3, 20}}));
  EXPECT_EQ(dims0(p.reduce_dims), (P{{2, 60}, {20, 1}}));  // H and W coalesced
  EXPECT_EQ(p.offset[0], 0);
}

TEST(Plan, NhwcContiguousLastAxisIsChannelsLast) {
  for (int axis : {-1, 3}) {
    const Plan p = plan1({2, 4, 5, 3}, {axis});
    EXPECT_EQ(p.kind, Kind::channels_last) << kind_name(p.kind);
    EXPECT_EQ(p.channels, 3);
    EXPECT_EQ(p.count, 40);
    EXPECT_EQ(dims0(p.channel_dims), (P{{3, 1}}));
    EXPECT_EQ(dims0(p.reduce_dims), (P{{40, 3}}));  // N, H, W coalesced into rows
  }
}

TEST(Plan, NchwShapeWithNhwcStridesIsChannelsLast) {
  // torch.channels_last memory format: shape NCHW, strides of NHWC.
  const Strides s = make_strides({2, 3, 4, 5}, {0, 2, 3, 1});
  ASSERT_EQ(s, (Strides{60, 1, 15, 3}));
  const Plan p = plan1({2, 3, 4, 5}, {1}, s);
  EXPECT_EQ(p.kind, Kind::channels_last) << kind_name(p.kind);
  EXPECT_EQ(dims0(p.channel_dims), (P{{3, 1}}));
  EXPECT_EQ(dims0(p.reduce_dims), (P{{40, 3}}));
}

TEST(Plan, NegativeReductionStridesAreFlipped) {
  // Rows in reverse order: element (0, 0) is at offset 0, the lowest address at -9.
  Plan p = plan1({4, 3}, {1}, {-3, 1});
  EXPECT_EQ(p.kind, Kind::channels_last);
  EXPECT_EQ(dims0(p.reduce_dims), (P{{4, 3}}));
  EXPECT_EQ(p.offset[0], -9);

  // NCHW with H and W reversed: still channels_first after flipping, and coalesced.
  p = plan1({2, 3, 4, 5}, {1}, {60, 20, -5, -1});
  EXPECT_EQ(p.kind, Kind::channels_first) << kind_name(p.kind);
  EXPECT_EQ(dims0(p.reduce_dims), (P{{2, 60}, {20, 1}}));
  EXPECT_EQ(p.offset[0], -3 * 5 - 4);

  // A reversed channel axis is kept as it is (it defines the channel order).
  p = plan1({4, 3}, {1}, {3, -1});
  EXPECT_EQ(dims0(p.channel_dims), (P{{3, -1}}));
  EXPECT_NE(p.kind, Kind::channels_last);
  EXPECT_EQ(p.channel_offset(2, 0), -2);
}

TEST(Plan, ZeroStrideDims) {
  // A broadcast batch dim: rows that all alias one row of channels.
  Plan p = plan1({5, 3}, {1}, {0, 1});
  EXPECT_EQ(p.kind, Kind::channels_last);
  EXPECT_EQ(p.count, 5);
  EXPECT_EQ(dims0(p.reduce_dims), (P{{5, 0}}));
  // A broadcast reduction dim inside a run: no unit stride innermost -> strided.
  p = plan1({3, 5}, {0}, {5, 0});
  EXPECT_EQ(p.kind, Kind::strided) << kind_name(p.kind);
  EXPECT_EQ(dims0(p.reduce_dims), (P{{5, 0}}));
  // A zero-stride dim next to a unit-stride one goes outermost, so the contiguous runs of
  // channels_first stay innermost (the visits are checked in VisitsExactlyTheArrayElements).
  p = plan1({2, 3, 4}, {1}, {0, 4, 1});
  EXPECT_EQ(p.kind, Kind::channels_first) << kind_name(p.kind);
  EXPECT_EQ(p.count, 8);
  EXPECT_EQ(p.channels, 3);
}

TEST(Plan, SizeOneDimsAreDropped) {
  // Size-1 dims may carry any stride.
  const Plan p = plan1({1, 3, 1, 5}, {1}, {999, 5, -7, 1});
  EXPECT_EQ(p.kind, Kind::channels_first);
  EXPECT_EQ(p.channels, 3);
  EXPECT_EQ(p.count, 5);
  EXPECT_EQ(dims0(p.channel_dims), (P{{3, 5}}));
  EXPECT_EQ(dims0(p.reduce_dims), (P{{5, 1}}));
  EXPECT_EQ(p.offset[0], 0);

  // C = 1: no channel dims at all.
  const Plan q = plan1({4, 1, 6}, {1});
  EXPECT_TRUE(q.channel_dims.empty());
  EXPECT_EQ(q.channels, 1);
  EXPECT_EQ(q.kind, Kind::channels_first);
  EXPECT_EQ(dims0(q.reduce_dims), (P{{24, 1}}));

  // One value per channel: no reduce dims.
  const Plan r = plan1({1, 7}, {1});
  EXPECT_TRUE(r.reduce_dims.empty());
  EXPECT_EQ(r.count, 1);
  EXPECT_EQ(r.kind, Kind::channels_last);
}

TEST(Plan, Coalescing) {
  // Feature axis 0, the rest one contiguous run.
  Plan p = plan1({2, 3, 4, 5}, {0});
  EXPECT_EQ(p.kind, Kind::channels_first);
  EXPECT_EQ(dims0(p.channel_dims), (P{{2, 60}}));
  EXPECT_EQ(dims0(p.reduce_dims), (P{{60, 1}}));
  // A gap (every other element along W) stops coalescing there.
  p = plan1({2, 3, 4}, {0}, make_strides({2, 3, 4}, {}, {1, 1, 2}));
  EXPECT_EQ(dims0(p.reduce_dims), (P{{12, 2}}));
  EXPECT_EQ(p.kind, Kind::strided);
  p = plan1({2, 3, 4}, {0}, make_strides({2, 3, 4}, {}, {1, 2, 1}));
  EXPECT_EQ(dims0(p.reduce_dims), (P{{3, 8}, {4, 1}}));
  EXPECT_EQ(p.kind, Kind::channels_first);
  // Neighbouring feature axes coalesce into one channel dim.
  p = plan1({2, 3, 4, 5}, {1, 2});
  EXPECT_EQ(dims0(p.channel_dims), (P{{12, 5}}));
}

TEST(Plan, SeveralFeatureAxes) {
  // C and W: channel dims do not coalesce (20 != 5); W has stride 1, so rows of 5 channels
  // in 3 groups (one per C), as ghost batches (G, k, C) with axes (0, 2) give.
  Plan p = plan1({2, 3, 4, 5}, {1, 3});
  EXPECT_EQ(p.kind, Kind::channels_last) << kind_name(p.kind);
  EXPECT_EQ(p.channels, 15);
  EXPECT_EQ(row_channels(p), 5);
  EXPECT_EQ(row_groups(p), 3);
  EXPECT_EQ(dims0(p.channel_dims), (P{{3, 20}, {5, 1}}));
  EXPECT_EQ(dims0(p.reduce_dims), (P{{2, 60}, {4, 5}}));
  // Axes given unsorted or negative mean the same.
  const Plan q = plan1({2, 3, 4, 5}, {-1, 1});
  EXPECT_EQ(dims0(q.channel_dims), dims0(p.channel_dims));
  // C and H: innermost reduce dim W has stride 1 -> channels_first.
  p = plan1({2, 3, 4, 5}, {1, 2});
  EXPECT_EQ(p.kind, Kind::channels_first) << kind_name(p.kind);
  EXPECT_EQ(dims0(p.reduce_dims), (P{{2, 60}, {5, 1}}));
  // H and W: one contiguous channel dim -> channels_last, N and C coalesced into rows.
  p = plan1({2, 3, 4, 5}, {2, 3});
  EXPECT_EQ(p.kind, Kind::channels_last) << kind_name(p.kind);
  EXPECT_EQ(dims0(p.channel_dims), (P{{20, 1}}));
  EXPECT_EQ(dims0(p.reduce_dims), (P{{6, 20}}));
  // Every axis a feature axis: one value per channel.
  p = plan1({2, 3}, {0, 1});
  EXPECT_EQ(p.count, 1);
  EXPECT_EQ(p.channels, 6);
  EXPECT_EQ(p.kind, Kind::channels_last);
  // Ghost batches of an (N, C) array: (G, k, C), axes (0, 2).
  p = plan1({4, 8, 16}, {0, 2});
  EXPECT_EQ(p.kind, Kind::channels_last) << kind_name(p.kind);
  EXPECT_EQ(row_groups(p), 4);
  EXPECT_EQ(dims0(p.reduce_dims), (P{{8, 16}}));
  // A channel dim with stride 1 in one array only: strided.
  p = plan1({3, 4, 5}, {0, 2}, make_strides({3, 4, 5}, {}, {1, 1, 2}));
  EXPECT_EQ(p.kind, Kind::strided) << kind_name(p.kind);
}

TEST(Plan, SeveralOperands) {
  // x NCHW, y NHWC: no layout serves both -> strided; dims coalesce only where both allow.
  const Strides xs = {}, ys = make_strides({2, 3, 4, 5}, {0, 2, 3, 1});
  Plan p = make_plan(Geometry{{2, 3, 4, 5}, {1}}, {&xs, &ys});
  EXPECT_EQ(p.operands, 2);
  EXPECT_EQ(p.kind, Kind::strided) << kind_name(p.kind);
  ASSERT_EQ(p.reduce_dims.size(), 2u);
  EXPECT_EQ(p.reduce_dims[1].size, 20);
  EXPECT_EQ(p.reduce_dims[1].stride[0], 1);
  EXPECT_EQ(p.reduce_dims[1].stride[1], 3);
  // Flipping follows the first array; the others flip with it.
  const Strides a = {-3, 1}, b = {3, 1};
  p = make_plan(Geometry{{4, 3}, {1}}, {&a, &b});
  EXPECT_EQ(p.kind, Kind::channels_last);
  EXPECT_EQ(p.reduce_dims[0].stride[0], 3);
  EXPECT_EQ(p.reduce_dims[0].stride[1], -3);
  EXPECT_EQ(p.offset[0], -9);
  EXPECT_EQ(p.offset[1], 9);
  // Three contiguous operands: channels_last.
  const Strides none;
  p = make_plan(Geometry{{6, 7}, {-1}}, {&none, &none, &none});
  EXPECT_EQ(p.kind, Kind::channels_last);
  EXPECT_EQ(p.operands, 3);
}

TEST(Plan, ForEachChannelGivesEveryChannelOffset) {
  const Shape s4 = {2, 3, 4, 5};
  const std::vector<std::pair<Axes, Strides>> cases = {
      {{1, 3}, {}},
      {{0, 2}, make_strides(s4, {3, 1, 0, 2})},
      {{1, 2, 3}, make_strides(s4, {}, {}, {false, true, false, true})},
      {{1}, {}},
  };
  for (const auto& [axes, strides] : cases) {
    const Plan p = plan1(s4, axes, strides);
    index_t next = 0;
    p.for_each_channel(0, [&](index_t c, index_t off) {
      EXPECT_EQ(c, next++);
      EXPECT_EQ(off, p.channel_offset(c, 0)) << "channel " << c;
    });
    EXPECT_EQ(next, p.channels);
  }
}

TEST(Plan, Errors) {
  EXPECT_THROW(plan1({2, 3}, {2}), value_error);
  EXPECT_THROW(plan1({2, 3}, {-3}), value_error);
  EXPECT_THROW(plan1({2, 3, 4}, {1, -2}), value_error);  // repeated
  EXPECT_THROW(plan1({2, 3, 4}, {1, 1}), value_error);
  EXPECT_THROW(plan1({2, 3}, {}), value_error);  // no feature axis
  EXPECT_THROW(plan1({}, {0}), value_error);     // 0-d
  EXPECT_THROW(plan1({2, -1}, {0}), value_error);
  EXPECT_THROW(plan1({2, 3}, {1}, {1}), value_error);  // strides of the wrong length
  EXPECT_THROW(plan1({2, 3}, {1}, {3, 1, 1}), value_error);
  const Strides good, bad = {1};
  EXPECT_THROW(make_plan(Geometry{{2, 3}, {1}}, {&good, &bad}), value_error);
  EXPECT_THROW(batchnorm::extent(Geometry{{2, 3}, {5}}), value_error);
  EXPECT_THROW(batchnorm::feature_axes({0, 0}, 2), value_error);
  EXPECT_EQ(batchnorm::feature_axes({-1, 0}, 3), (std::vector<int>{0, 2}));
}

TEST(Plan, Extent) {
  auto e = batchnorm::extent(Geometry{{2, 3, 4, 5}, {1, 3}});
  EXPECT_EQ(e.channels, 15);
  EXPECT_EQ(e.count, 8);
  e = batchnorm::extent(Geometry{{0, 3}, {1}});
  EXPECT_EQ(e.channels, 3);
  EXPECT_EQ(e.count, 0);
}

// Every (channel, offsets) the plan enumerates, sorted, against the same from plain loops.
using Visit = std::tuple<index_t, index_t, index_t, index_t>;

std::vector<Visit> visits_of_plan(const Plan& p) {
  std::vector<Visit> out;
  for (index_t c = 0; c < p.channels; ++c)
    for (index_t i = 0; i < p.count; ++i) {
      std::array<index_t, 3> off{};
      for (int op = 0; op < p.operands; ++op)
        off[static_cast<std::size_t>(op)] = p.offset[static_cast<std::size_t>(op)] + p.channel_offset(c, op) +
                                            p.reduce_offset(i, p.reduce_dims.size(), op);
      out.emplace_back(c, off[0], off[1], off[2]);
    }
  std::sort(out.begin(), out.end());
  return out;
}

std::vector<Visit> visits_of_loops(const Shape& shape, const Axes& axes, const std::vector<Strides>& strides) {
  std::vector<bool> feature(shape.size(), false);
  for (int a : axes) feature[static_cast<std::size_t>(a < 0 ? a + static_cast<int>(shape.size()) : a)] = true;
  std::vector<Visit> out;
  bntest::for_each_index(shape, [&](const std::vector<index_t>& i) {
    index_t c = 0;
    for (std::size_t d = 0; d < shape.size(); ++d)
      if (feature[d]) c = c * shape[d] + i[d];
    std::array<index_t, 3> off{};
    for (std::size_t op = 0; op < strides.size(); ++op) off[op] = bntest::offset_of(i, strides[op]);
    out.emplace_back(c, off[0], off[1], off[2]);
  });
  std::sort(out.begin(), out.end());
  return out;
}

TEST(Plan, VisitsExactlyTheArrayElements) {
  struct Case {
    Shape shape;
    Axes axes;
    std::vector<Strides> strides;
  };
  const Shape s4 = {2, 3, 4, 5};
  const std::vector<Case> cases = {
      {s4, {1}, {make_strides(s4)}},
      {s4, {1}, {make_strides(s4, {0, 2, 3, 1})}},
      {s4, {1}, {make_strides(s4), make_strides(s4, {0, 2, 3, 1})}},
      {s4, {1, 3}, {make_strides(s4, {}, {1, 2, 1, 3}, {true, false, true, false})}},
      {s4,
       {0, 2},
       {make_strides(s4, {3, 1, 0, 2}), make_strides(s4, {}, {}, {false, true, true, true}),
        make_strides(s4, {1, 2, 3, 0}, {2, 1, 1, 1})}},
      {s4, {3}, {make_strides(s4, {}, {}, {false, false, false, true})}},
      {{3, 1, 4, 1}, {1}, {{7, 100, -2, 3}}},
      {{3, 4, 5}, {1}, {{0, 5, 1}, {20, 5, 1}}},
      {{2, 3, 4}, {1}, {{0, 4, 1}}},
      {{6}, {0}, {{-2}}},
      {{2, 3}, {0, 1}, {{1, 2}}},
  };
  for (const Case& c : cases) {
    std::vector<const Strides*> ptrs;
    for (const Strides& s : c.strides) ptrs.push_back(&s);
    const Plan p = make_plan(Geometry{c.shape, c.axes}, ptrs);
    SCOPED_TRACE(::testing::Message() << "kind " << kind_name(p.kind) << ", case with " << c.shape.size()
                                      << " dims, first strides " << ::testing::PrintToString(c.strides[0]));
    EXPECT_EQ(visits_of_plan(p), visits_of_loops(c.shape, c.axes, c.strides));
    // Every reduce dim has a non-negative stride in the first array.
    for (const Dim& d : p.reduce_dims) EXPECT_GE(d.stride[0], 0);
  }
}

}  // namespace
