// What every kernel is built from, above the operations of simd-inl.hpp: the arithmetic of
// the passes, the double accumulators of the reductions, the block conversions of the
// general loops, and the drivers that walk the runs of a runs kernel. No include guard
// and no instruction-set conditionals (see kernels-inl.hpp).
//
// A kernel has two loop bodies, which round every expression the same way:
//  - direct, for float, float16 and bfloat16 (compute type float) where every operand is
//    contiguous: loads convert in registers, stores convert back (or stream);
//  - general, for double and for operands with an element stride: blocks of up to kBlock
//    values converted to contiguous arrays of the compute type C in a stack buffer (or
//    used in place where they already are one).

constexpr index_t kBlock = 512;  // values per conversion block (4 KiB of double)

template <class T>
constexpr bool kDirect = !std::is_same_v<T, double>;

// ---- the arithmetic of the passes, for vectors and scalars alike -------------------

// a*(x - m) + b: the forward output and the backward's ReLU mask (bit for bit the same).
template <class V>
inline V affine(V x, V a, V m, V b) {
  return mul_add(a, sub(x, m), b);
}

// dy masked by the ReLU of affine(x).
template <bool Relu, class V>
inline V grad(V dy, V x, V a, V m, V b) {
  if constexpr (Relu) dy = if_positive(affine(x, a, m, b), dy);
  return dy;
}

// dx = k1*(g - k3) + k2*(x - m), g = grad(dy). Centring g and x before the products makes
// dx exactly 0 where the exact gradient is (one value per channel: g = k3 and x = m).
template <bool Relu, class V>
inline V dx_of(V dy, V x, V a, V m, V b, V k1, V k2, V k3) {
  return mul_add(k1, sub(grad<Relu>(dy, x, a, m, b), k3), mul(k2, sub(x, m)));
}

// dx of masked statistics: the mask weight w enters only their part,
// k1*(g - w*k3) + w*k2*(x - m) (w = 1 gives dx_of bit for bit).
template <bool Relu, class V>
inline V dx_of_weighted(V dy, V x, V a, V m, V b, V k1, V k2, V k3, V w) {
  return mul_add(k1, sub(grad<Relu>(dy, x, a, m, b), mul(w, k3)), mul(w, mul(k2, sub(x, m))));
}

// How an elementwise kernel reads the mask weights: none, one per value (a stream beside x),
// or one for the whole call (a channels-last row).
enum class Weights { none, each, one };

// ---- the sums of the reductions ----------------------------------------------------

constexpr int kUnroll = 4;  // independent accumulators per sum: hides the add latency

// kUnroll vector accumulators of one sum, reduced in a fixed pairwise order (in registers:
// short runs finish once per run).
struct Accumulators {
  VD acc[kUnroll];
  Accumulators() {
    for (VD& a : acc) a = zero<VD>();
  }
  double total() const {
    static_assert(kUnroll == 4, "the pairing below is written for four accumulators");
    return sum_lanes(add(add(acc[0], acc[2]), add(acc[1], acc[3])));
  }
};

// Both sums of a reduction (s and ss).
struct Sums {
  Accumulators s, ss;
  void add_to(double& out_s, double& out_ss) const {
    out_s += s.total();
    out_ss += ss.total();
  }
};

// ---- blocks of the general loops ---------------------------------------------------

template <class T>
inline void load_block(const T* p, index_t stride, index_t n, compute_t<T>* out) {
  for (index_t i = 0; i < n; ++i) out[i] = to_compute(p + i * stride);
}
template <class T>
inline void store_block(const compute_t<T>* in, T* p, index_t stride, index_t n) {
  for (index_t i = 0; i < n; ++i) from_compute(in[i], p + i * stride);
}

// n contiguous compute values starting at p: p itself where it already is that, else buf.
template <class T, class C>
inline const C* view(const T* p, index_t stride, index_t n, C* buf) {
  if constexpr (std::is_same_v<T, C>)
    if (stride == 1) return p;
  load_block(p, stride, n, buf);
  return buf;
}

// Where to compute n outputs for p, and how to write them: streamed through buf for
// contiguous output when asked, else in place where p is a contiguous C array, else
// through buf.
template <class T, class C>
inline C* output_target(T* p, index_t stride, C* buf, bool stream) {
  if constexpr (std::is_same_v<T, C>)
    if (stride == 1 && !stream) return p;
  return buf;
}
template <class T, class C>
inline void output_finish(const C* computed, T* p, index_t stride, index_t n, bool stream) {
  if (stream && stride == 1) {
    const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
    if constexpr (std::is_same_v<T, C>) {
      stream_copy(p, computed, bytes);
    } else {
      T converted[kBlock];
      store_block(computed, converted, 1, n);
      stream_copy(p, converted, bytes);
    }
    return;
  }
  if constexpr (std::is_same_v<T, C>)
    if (stride == 1) return;
  store_block(computed, p, stride, n);
}

// ---- coefficients and flags --------------------------------------------------------

// f(relu, stream) with both flags as std::bool_constant, for the bodies that take them as
// template arguments.
template <class F>
inline void with_flags(bool relu_on, bool stream, const F& f) {
  if (relu_on)
    stream ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  else
    stream ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
}

// ---- the runs of a runs kernel -----------------------------------------------------
// The body of a runs kernel handles n values of one channel's run, from pointers to T
// (direct) or to the compute type (general: one block at a time). The drivers below
// walk the runs (RunShape) and pick the body's form: direct where every operand has
// element stride 1 and T is not double.

template <class... In>
inline bool unit_strides(const In&... in) {
  return ((in.stride == 1) && ...);
}

// The general loops' calls of a body: values [i, i + len) of run j of each input, as
// contiguous compute values (view()).
template <class C, class Body, class... In, std::size_t... I>
inline void reduce_block(std::index_sequence<I...>, const Body& body, index_t c, index_t j, index_t i, index_t len,
                         Sums& sums, const In&... in) {
  C buf[sizeof...(In)][kBlock];
  body(c, len, index_t{0}, sums, view(in.p + j * in.run_stride + i * in.stride, in.stride, len, buf[I])...);
}
template <class C, class Body, class... In, std::size_t... I>
inline void map_block(std::index_sequence<I...>, const Body& body, index_t c, index_t j, index_t i, index_t len, C* out,
                      const In&... in) {
  C buf[sizeof...(In)][kBlock];
  body(c, len, index_t{0}, index_t{0}, std::false_type{},
       view(in.p + j * in.run_stride + i * in.stride, in.stride, len, buf[I])..., out);
}

// The drivers below are inlined into each kernel and their general loops are not: a call
// of the direct path (short runs: a few vectors) costs little more than its loads.
template <class T, class Body, class... In>
[[gnu::noinline]] void reduce_runs_general(const RunShape& sh, double* s, double* ss, const Body& body,
                                           const In&... in) {
  for (index_t j = 0; j < sh.count; ++j) {
    const index_t c = j * sh.step;
    for (index_t i = 0; i < sh.n; i += kBlock) {
      const index_t len = std::min(kBlock, sh.n - i);
      Sums sums;
      reduce_block<compute_t<T>>(std::index_sequence_for<In...>{}, body, c, j, i, len, sums, in...);
      sums.add_to(s[c], ss[c]);
    }
  }
}
template <bool Stream, class T, class Body, class... In>
[[gnu::noinline]] void map_runs_general(const RunShape& sh, const Body& body, const RunArray<T>& out, const In&... in) {
  using C = compute_t<T>;
  for (index_t j = 0; j < sh.count; ++j) {
    const index_t c = j * sh.step;
    for (index_t i = 0; i < sh.n; i += kBlock) {
      const index_t len = std::min(kBlock, sh.n - i);
      T* o = out.p + j * out.run_stride + i * out.stride;
      C obuf[kBlock];
      C* target = output_target(o, out.stride, obuf, Stream);
      map_block<C>(std::index_sequence_for<In...>{}, body, c, j, i, len, target, in...);
      output_finish(target, o, out.stride, len, Stream);
    }
  }
}

// A reduction: body(c, n, ahead, sums, in...) adds n values of channel c to sums. The sums
// are carried across the runs of one channel (step 0) and reduced once, or fresh for each
// run (each its own channel); the general loops reduce them once per block.
template <class T, class Body, class... In>
[[gnu::always_inline]] inline void reduce_runs(const RunShape& sh, double* s, double* ss, index_t ahead,
                                               const Body& body, const In&... in) {
  if constexpr (kDirect<T>) {
    if (unit_strides(in...)) {
      if (sh.step == 0) {
        Sums sums;
        for (index_t j = 0; j < sh.count; ++j) body(index_t{0}, sh.n, ahead, sums, (in.p + j * in.run_stride)...);
        sums.add_to(*s, *ss);
        return;
      }
      for (index_t j = 0; j < sh.count; ++j) {  // fresh sums each run, which stay in registers
        Sums sums;
        body(j * sh.step, sh.n, ahead, sums, (in.p + j * in.run_stride)...);
        sums.add_to(s[j * sh.step], ss[j * sh.step]);
      }
      return;
    }
  }
  reduce_runs_general<T>(sh, s, ss, body, in...);
}

// An elementwise pass: body(c, n, ahead, ahead_out, stream, in..., out) writes n values of
// channel c, prefetching as Output says; stream (std::bool_constant) says whether the
// direct body streams its output (the general loops compute into a block and stream that).
template <bool Stream, class T, class Body, class... In>
[[gnu::always_inline]] inline void map_runs(const RunShape& sh, const Output& o, const Body& body,
                                            const RunArray<T>& out, const In&... in) {
  if constexpr (kDirect<T>) {
    if (unit_strides(out, in...)) {
      for (index_t j = 0; j < sh.count; ++j)
        body(j * sh.step, sh.n, o.ahead, Stream ? 0 : o.ahead_out, std::bool_constant<Stream>{},
             (in.p + j * in.run_stride)..., out.p + j * out.run_stride);
      return;
    }
  }
  map_runs_general<Stream>(sh, body, out, in...);
}

// ---- the rows of the general loops -------------------------------------------------

// Rows are processed in blocks of whole rows: where consecutive rows are contiguous in
// every array (the usual NHWC / (N, C) case) a block is one contiguous stretch of up to
// kBlock values, converted, computed and written (or streamed) in one piece; otherwise a
// block is one row, or a kBlock-wide part of a long row. rows_fn(r, nr, c0, n) handles
// rows [r, r + nr) and, within each, channels [c0, c0 + n), with nr > 1 only when those
// rows form one contiguous block of nr * channels values.
template <class F>
inline void for_row_blocks(index_t rows, index_t channels, bool contiguous, const F& rows_fn) {
  if (contiguous && channels <= kBlock / 2) {
    const index_t per = kBlock / channels;
    for (index_t r = 0; r < rows; r += per) rows_fn(r, std::min(per, rows - r), index_t{0}, channels);
    return;
  }
  for (index_t r = 0; r < rows; ++r)
    for (index_t c0 = 0; c0 < channels; c0 += kBlock) rows_fn(r, index_t{1}, c0, std::min(kBlock, channels - c0));
}
