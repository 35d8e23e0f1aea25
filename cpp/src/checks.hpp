// Validation shared by the functional API: arguments that must not be null, epsilon, and
// outputs whose strides would give two elements one location.
#pragma once

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

}  // namespace batchnorm::detail
