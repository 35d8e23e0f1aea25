// Validation shared by the functional API: arguments that must not be null, epsilon, and
// outputs whose strides would give two elements one location.
#pragma once

#include <cstddef>
#include <cstdint>
#include <initializer_list>

#include "plan.hpp"

namespace batchnorm::detail {

/// Throws value_error unless epsilon is finite and >= 0.
void check_epsilon(double epsilon);

/// Throws value_error naming `what` if p is null.
void check_not_null(const void* p, const char* what);

/// check_not_null for the array arguments of backward (one message for all of them).
void check_inputs(std::initializer_list<const void*> ptrs);

/// Throws value_error for an empty batch (statistics need values), e.g. "moments of an empty batch: ...".
void check_batch(const Plan& p, const char* what);

/// Whether the plan has no value to read or write (no channels or nothing to reduce).
inline bool empty(const Plan& p) { return p.channels == 0 || p.count == 0; }

/// Whether two elements of operand op share a location.
bool overlaps_itself(const Plan& p, int op);

/// Throws value_error naming `what` if operand op of a non-empty plan has a zero stride or
/// overlaps itself.
void check_output(const Plan& p, int op, const char* what);

/// The bytes an argument array covers, [begin, end) (empty for none), and its name.
struct Span {
  std::uintptr_t begin = 0;  // as integers: addresses of unrelated arrays are compared
  std::uintptr_t end = 0;
  const char* name = "";
};

/// Operand op of plan p at `data` (elements of `size` bytes): from its lowest to its highest element.
Span span_of(const Plan& p, int op, const void* data, std::size_t size, const char* name);

/// A per-channel array: `channels` contiguous elements at `data` (null: none).
template <class S>
Span span_of(const S* data, index_t channels, const char* name) {
  const auto b = reinterpret_cast<std::uintptr_t>(data);
  return {b, data ? b + static_cast<std::size_t>(channels) * sizeof(S) : b, name};
}

/// Throws value_error naming both if an output shares a byte with another output or with an
/// input: a pass reads inputs after it wrote outputs (gamma of a channel after the output of
/// an earlier one), so sharing would give a silently wrong result. Byte ranges are compared,
/// so an output whose gaps hold an input is refused too.
void check_apart(std::initializer_list<Span> outputs, std::initializer_list<Span> inputs);

}  // namespace batchnorm::detail
