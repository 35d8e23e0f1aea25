#include "plan.hpp"

#include <algorithm>
#include <cstdlib>
#include <limits>
#include <string>

namespace batchnorm {

namespace {

std::string tuple_text(const Axes& axes) {  // as Python prints a tuple: (1,) or (3, -1)
  std::string s = "(";
  for (std::size_t i = 0; i < axes.size(); ++i) s += (i ? ", " : "") + std::to_string(axes[i]);
  return s + (axes.size() == 1 ? ",)" : ")");
}

}  // namespace

Axes feature_axes(const Axes& axes, std::size_t ndim) {
  const int n = static_cast<int>(ndim);
  if (axes.empty()) throw value_error("axis must name at least one feature axis");
  Axes out;
  out.reserve(axes.size());
  for (int a : axes) {
    if (a < -n || a >= n)
      throw value_error("axis " + std::to_string(a) + " is out of range for an array of ndim " + std::to_string(n));
    const int k = a < 0 ? a + n : a;
    if (std::find(out.begin(), out.end(), k) != out.end())
      throw value_error("axis " + std::to_string(a) + " is repeated in the feature axes " + tuple_text(axes));
    out.push_back(k);
  }
  std::sort(out.begin(), out.end());
  return out;
}

}  // namespace batchnorm

namespace batchnorm::detail {

Strides contiguous_strides(const Shape& shape) {
  Strides s(shape.size());
  index_t step = 1;
  for (std::size_t d = shape.size(); d-- > 0;) {
    s[d] = step;
    step *= std::max<index_t>(shape[d], 1);
  }
  return s;
}

Strides mask_strides(const Geometry& g, const Strides& reduced) {
  const Axes axes = feature_axes(g.axes, g.shape.size());
  Shape shape;
  for (std::size_t d = 0; d < g.shape.size(); ++d)
    if (!std::binary_search(axes.begin(), axes.end(), static_cast<int>(d))) shape.push_back(g.shape[d]);
  const Strides given = reduced.empty() ? contiguous_strides(shape) : reduced;
  if (given.size() != shape.size())
    throw value_error("mask strides have " + std::to_string(given.size()) + " entries for the " +
                      std::to_string(shape.size()) + " axes of x without its feature axes");
  Strides full(g.shape.size(), 0);
  for (std::size_t d = 0, j = 0; d < g.shape.size(); ++d)
    if (!std::binary_search(axes.begin(), axes.end(), static_cast<int>(d))) full[d] = given[j++];
  return full;
}

namespace {

// Merges neighbours (outer, inner) where every array steps over inner exactly into outer.
std::vector<Dim> coalesce(const std::vector<Dim>& dims, int operands) {
  std::vector<Dim> out;
  for (const Dim& d : dims) {
    if (!out.empty()) {
      Dim& prev = out.back();
      bool mergeable = true;
      for (std::size_t op = 0; op < static_cast<std::size_t>(operands); ++op)
        mergeable = mergeable && prev.stride[op] == d.stride[op] * d.size;
      if (mergeable) {
        prev.size *= d.size;
        prev.stride = d.stride;
        continue;
      }
    }
    out.push_back(d);
  }
  return out;
}

bool unit_stride(const Dim& d, int operands) {
  for (std::size_t op = 0; op < static_cast<std::size_t>(operands); ++op)
    if (d.stride[op] != 1) return false;
  return true;
}

}  // namespace

Plan make_plan(const Geometry& g, const std::vector<const Strides*>& strides, bool masked) {
  const std::size_t ndim = g.shape.size();
  if (ndim == 0) throw value_error("expected an array with at least 1 dimension, got a 0-d array");
  for (index_t s : g.shape)
    if (s < 0) throw value_error("shape entries must be non-negative");
  const Axes axes = feature_axes(g.axes, ndim);

  Plan p;
  p.operands = static_cast<int>(strides.size());
  p.masked = masked;
  if (p.operands < 1 || p.operands > kMaxOperands) throw value_error("internal: bad operand count");
  std::vector<Strides> st(strides.size());
  for (std::size_t op = 0; op < strides.size(); ++op) {
    st[op] = strides[op]->empty() ? contiguous_strides(g.shape) : *strides[op];
    if (st[op].size() != ndim)
      throw value_error("strides have " + std::to_string(st[op].size()) + " entries for an array of ndim " +
                        std::to_string(ndim));
  }

  std::vector<Dim> channel, reduce;
  for (std::size_t d = 0; d < ndim; ++d) {
    const bool is_channel = std::binary_search(axes.begin(), axes.end(), static_cast<int>(d));
    (is_channel ? p.channels : p.count) *= g.shape[d];
    if (g.shape[d] == 1) continue;
    Dim dim;
    dim.size = g.shape[d];
    for (std::size_t op = 0; op < strides.size(); ++op) dim.stride[op] = st[op][d];
    (is_channel ? channel : reduce).push_back(dim);
  }

  // Reduction order is free: flip to a positive stride in the first array, sort outer to inner.
  for (Dim& d : reduce) {
    if (d.stride[0] >= 0) continue;
    for (std::size_t op = 0; op < strides.size(); ++op) {
      p.offset[op] += (d.size - 1) * d.stride[op];
      d.stride[op] = -d.stride[op];
    }
  }
  // Zero strides (broadcast) go outermost: they cost nothing there and would hide the
  // contiguous innermost dimension of the fast layouts.
  auto key = [](const Dim& d) { return d.stride[0] == 0 ? std::numeric_limits<index_t>::max() : d.stride[0]; };
  std::stable_sort(reduce.begin(), reduce.end(), [&](const Dim& a, const Dim& b) { return key(a) > key(b); });

  p.channel_dims = coalesce(channel, p.operands);
  p.reduce_dims = coalesce(reduce, p.operands);

  // Outer channel dims (several feature axes: ghost batches (G, k, C) with axes (0, 2)) make
  // groups of rows, each with its own channels: still rows of contiguous channels.
  if (!p.channel_dims.empty() && unit_stride(p.channel_dims.back(), p.operands - (masked ? 1 : 0)))
    p.kind = Kind::channels_last;
  else if (!p.reduce_dims.empty() && unit_stride(p.reduce_dims.back(), p.operands))
    p.kind = Kind::channels_first;
  else
    p.kind = Kind::strided;
  return p;
}

const char* kind_name(Kind kind) {
  switch (kind) {
    case Kind::channels_last:
      return "channels_last";
    case Kind::channels_first:
      return "channels_first";
    default:
      return "strided";
  }
}

}  // namespace batchnorm::detail
