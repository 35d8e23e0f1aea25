// Validation shared by the functional API (checks.hpp).
#include "checks.hpp"

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace batchnorm::detail {

namespace {

// The shortest text that reads back as v: -1e-09, where std::to_string gives -0.000000.
std::string shortest_text(double v) {
  char text[32];
  for (int digits = 1; digits <= 17; ++digits) {
    std::snprintf(text, sizeof text, "%.*g", digits, v);
    if (std::strtod(text, nullptr) == v) break;
  }
  return text;
}

}  // namespace

void check_epsilon(double epsilon) {
  if (!std::isfinite(epsilon) || epsilon < 0)
    throw value_error("epsilon must be a finite number >= 0, got " + shortest_text(epsilon));
}

void check_not_null(const void* p, const char* what) {
  if (!p) throw value_error(std::string(what) + " must not be null");
}

void check_batch(const Plan& p, const char* what) {
  if (p.count == 0) throw value_error(std::string(what) + " an empty batch: the reduced axes hold no values");
}

void check_inputs(std::initializer_list<const void*> ptrs) {
  for (const void* ptr : ptrs) check_not_null(ptr, "dy, x and dx");
}

// Outputs of more elements than this whose strides are not nested (below) are refused
// rather than checked value by value, as the Python layer does.
constexpr index_t kExactOverlapLimit = index_t{1} << 20;

// Whether two elements of operand op share a location. Sufficient for no, and true of every
// slice or transpose of a dense array: each stride, in increasing order, steps over all that
// the smaller ones span. Otherwise (interleaved or too small strides) the offsets are
// compared, up to kExactOverlapLimit elements; larger ones count as overlapping.
bool overlaps_itself(const Plan& p, int op) {
  std::vector<std::pair<index_t, index_t>> dims;  // (|stride|, size) of the dims that vary
  for (const std::vector<Dim>* list : {&p.channel_dims, &p.reduce_dims})
    for (const Dim& d : *list)
      if (d.size > 1) dims.emplace_back(std::abs(d.stride[static_cast<std::size_t>(op)]), d.size);
  std::sort(dims.begin(), dims.end());
  index_t span = 1;  // elements from the first to the last offset of the dims so far, + 1
  bool nested = true;
  for (const auto& [stride, size] : dims) {
    if (stride < span) {
      nested = false;
      break;
    }
    span = stride > (std::numeric_limits<index_t>::max() - span) / (size - 1) ? std::numeric_limits<index_t>::max()
                                                                              : span + stride * (size - 1);
  }
  if (nested) return false;
  if (p.channels > kExactOverlapLimit / std::max<index_t>(1, p.count)) return true;
  std::vector<index_t> offsets{0};
  for (const auto& [stride, size] : dims) {
    std::vector<index_t> next;
    next.reserve(offsets.size() * static_cast<std::size_t>(size));
    for (index_t o : offsets)
      for (index_t i = 0; i < size; ++i) next.push_back(o + i * stride);
    offsets.swap(next);
  }
  std::sort(offsets.begin(), offsets.end());
  return std::adjacent_find(offsets.begin(), offsets.end()) != offsets.end();
}

// An output must give every element its own location (an empty one has nothing to place).
void check_output(const Plan& p, int op, const char* what) {
  if (empty(p)) return;
  for (const std::vector<Dim>* dims : {&p.channel_dims, &p.reduce_dims})
    for (const Dim& d : *dims)
      if (d.stride[static_cast<std::size_t>(op)] == 0)
        throw value_error(std::string(what) + " has a zero stride: several elements would share one location");
  if (overlaps_itself(p, op))
    throw value_error(std::string(what) +
                      " overlaps itself: its strides give several elements one location (interleaved or too small)");
}

Span span_of(const Plan& p, int op, const void* data, std::size_t size, const char* name) {
  const auto base = reinterpret_cast<std::uintptr_t>(data);
  if (!data || empty(p)) return {base, base, name};
  const auto o = static_cast<std::size_t>(op);
  index_t lo = p.offset[o], hi = p.offset[o];
  for (const std::vector<Dim>* dims : {&p.channel_dims, &p.reduce_dims})
    for (const Dim& d : *dims) {
      const index_t reach = d.stride[o] * (d.size - 1);
      (reach < 0 ? lo : hi) += reach;
    }
  const auto isize = static_cast<index_t>(size);
  return {base + static_cast<std::uintptr_t>(lo * isize), base + static_cast<std::uintptr_t>((hi + 1) * isize), name};
}

void check_apart(std::initializer_list<Span> outputs, std::initializer_list<Span> inputs) {
  auto apart = [](const Span& a, const Span& b) {
    if (a.begin < a.end && b.begin < b.end && a.begin < b.end && b.begin < a.end)
      throw value_error(std::string(a.name) + " overlaps " + b.name +
                        ": an output must not share memory with another argument (except x in place)");
  };
  for (auto a = outputs.begin(); a != outputs.end(); ++a) {
    for (auto b = a + 1; b != outputs.end(); ++b) apart(*a, *b);
    for (const Span& b : inputs) apart(*a, b);
  }
}

}  // namespace batchnorm::detail
