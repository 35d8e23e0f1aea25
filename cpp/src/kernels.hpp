// The four per-channel kernels, as a table of function pointers per element type.
// kernels-inl.hpp is compiled once per instruction set (kernels_<isa>.cpp), each time in
// its own namespace inside a target region; dispatch.cpp picks one table at run time. The
// kernels are single-threaded; the schedule partitions the work.
//
// Each kernel has two forms:
//   rows: `rows` rows of `channels` contiguous values (channels_last), row strides given;
//         per-channel coefficients and accumulators are arrays indexed by channel.
//   runs: `count` runs of `n` values (channels_first / strided), each operand with its own
//         element stride and distance between runs; run j uses the coefficients and
//         accumulators of channel j*step. A single run is count 1.
// Operands come in the plan's order: x, y for the forward passes, x, dy, dx for backward.
// Masked statistics add a mask operand w of x's type (weights, 0/1 for a boolean mask), read
// beside x: one value per row in the rows form (the mask does not vary along the channels),
// a run beside x's in the runs form. Only two passes read it: reduce-1 (weighted sums) and
// affine-2 (dx's statistics part); the other two are the same with or without a mask.
//
// Coefficients are in the compute type (float for float and the 16-bit types, double for
// double). `stream` asks the elementwise passes to write contiguous output with
// non-temporal stores (no read-for-ownership of the output's cache lines, and no eviction
// of useful data), for outputs too large to stay in cache. Every affine pass computes
// z = a*(x - m) + b with m the mean in the compute type. Accumulators are double.
#pragma once

#include <string>
#include <type_traits>

#include "batchnorm/types.hpp"

namespace batchnorm::detail {

// Rows per tile of the rows reductions (reduce-inl.hpp; half as many for reduce-2): a call's
// sums depend on where its tiles start, so the schedule cuts rows at multiples of it.
constexpr index_t kTileRows = 8;

template <class T>
using compute_t = std::conditional_t<std::is_same_v<T, double>, double, float>;

/// Per-channel coefficients (structure of arrays; unused ones may be null).
///   affine-1:  y  = act(a*(x - m) + b)
///   reduce-1:  s += x - m,  ss += (x - m)^2                 (m: the channel's shift)
///              masked:  s += w*(x - m),  ss += w*(x - m)^2
///   reduce-2:  s += dy',    ss += dy' * (x - m)              (dy' = dy masked by relu(a*(x-m)+b))
///   affine-2:  dx = k1*(dy' - k3) + k2*(x - m);  masked: dx = k1*(dy' - w*k3) + w*k2*(x - m)
template <class C>
struct Coefs {
  const C* a = nullptr;
  const C* m = nullptr;
  const C* b = nullptr;
  const C* k1 = nullptr;
  const C* k2 = nullptr;
  const C* k3 = nullptr;

  /// The coefficients from channel c on (for a kernel call that starts at channel c).
  Coefs from(index_t c) const {
    auto at = [c](const C* v) { return v ? v + c : v; };
    return {at(a), at(m), at(b), at(k1), at(k2), at(k3)};
  }
};

/// A rows operand: row r at p + r*stride, its channels contiguous.
template <class T>
struct Strided {
  T* p;
  index_t stride;
};

/// A runs operand: value i of run j at p[j*run_stride + i*stride].
template <class T>
struct RunArray {
  T* p;
  index_t stride;
  index_t run_stride = 0;
};

/// `count` runs of `n` values; run j uses the coefficients and accumulators of channel
/// j*step: step 0 for the runs of one channel (sums carried across them), step 1 for
/// consecutive channels.
struct RunShape {
  index_t n;
  index_t count = 1;
  index_t step = 0;
};

/// How an elementwise pass writes its output, and what it prefetches meanwhile.
///   stream: non-temporal stores for contiguous output (see above).
///   ahead:  runs only: while computing element i, prefetch element i + ahead of each
///           input (x, and dy in affine-2) into cache, for the pass that reads there next
///           (the channel-block schedule's next channel); 0 prefetches nothing. The reduce
///           runs kernels take the same distance as their last argument.
///   ahead_out: without streaming, while writing element i, prefetch element i + ahead_out
///           of the output: an ordinary store to a line not in cache first reads it, and a
///           line fetched early is in cache, owned, when the store comes; 0 prefetches nothing.
struct Output {
  bool stream = false;
  index_t ahead = 0;
  index_t ahead_out = 0;
  Output(bool stream_ = false, index_t ahead_ = 0, index_t ahead_out_ = 0)  // NOLINT: from bool
      : stream(stream_), ahead(ahead_), ahead_out(ahead_out_) {}
};

template <class T>
struct KernelTable {
  using C = compute_t<T>;
  void (*reduce1_rows)(Strided<const T> x, index_t rows, index_t channels, Coefs<C> k, double* s, double* ss);
  void (*reduce1_runs)(const RunArray<const T>& x, const RunShape& shape, Coefs<C> k, double* s, double* ss,
                       index_t ahead);
  void (*affine1_rows)(Strided<const T> x, Strided<T> y, index_t rows, index_t channels, Coefs<C> k, bool relu,
                       Output out);
  void (*affine1_runs)(const RunArray<const T>& x, const RunArray<T>& y, const RunShape& shape, Coefs<C> k, bool relu,
                       Output out);
  void (*reduce2_rows)(Strided<const T> x, Strided<const T> dy, index_t rows, index_t channels, Coefs<C> k, bool relu,
                       double* s, double* ss);
  void (*reduce2_runs)(const RunArray<const T>& x, const RunArray<const T>& dy, const RunShape& shape, Coefs<C> k,
                       bool relu, double* s, double* ss, index_t ahead);
  void (*affine2_rows)(Strided<const T> x, Strided<const T> dy, Strided<T> dx, index_t rows, index_t channels,
                       Coefs<C> k, bool relu, Output out);
  void (*affine2_runs)(const RunArray<const T>& x, const RunArray<const T>& dy, const RunArray<T>& dx,
                       const RunShape& shape, Coefs<C> k, bool relu, Output out);
  // Masked statistics (w: the mask's weights).
  void (*reduce1w_rows)(Strided<const T> x, Strided<const T> w, index_t rows, index_t channels, Coefs<C> k, double* s,
                        double* ss);
  void (*reduce1w_runs)(const RunArray<const T>& x, const RunArray<const T>& w, const RunShape& shape, Coefs<C> k,
                        double* s, double* ss, index_t ahead);
  void (*affine2w_rows)(Strided<const T> x, Strided<const T> dy, Strided<const T> w, Strided<T> dx, index_t rows,
                        index_t channels, Coefs<C> k, bool relu, bool stream);
  void (*affine2w_runs)(const RunArray<const T>& x, const RunArray<const T>& dy, const RunArray<const T>& w,
                        const RunArray<T>& dx, const RunShape& shape, Coefs<C> k, bool relu, Output out);
};

struct Tables {
  const char* isa;
  KernelTable<float> f32;
  KernelTable<double> f64;
  KernelTable<float16_t> f16;
  KernelTable<bfloat16_t> bf16;

  template <class T>
  const KernelTable<T>& get() const {
    if constexpr (std::is_same_v<T, float>)
      return f32;
    else if constexpr (std::is_same_v<T, double>)
      return f64;
    else if constexpr (std::is_same_v<T, float16_t>)
      return f16;
    else
      return bf16;
  }
};

// One per compiled instruction set (kernels_<isa>.cpp); null where not compiled.
namespace baseline {
const Tables* tables();
}
namespace avx2 {
const Tables* tables();
}
namespace avx512 {
const Tables* tables();
}

/// The table in use (dispatch.cpp).
const Tables& active_tables();
/// The table of a named instruction set if compiled and supported by this CPU, else null.
const Tables* tables_for(const std::string& isa);

}  // namespace batchnorm::detail
