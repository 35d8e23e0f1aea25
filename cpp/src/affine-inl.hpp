// The two elementwise passes, each in a rows form (channels last) and a runs form, on the
// operations of simd-inl.hpp and the drivers of general-inl.hpp. No include guard and no
// instruction-set conditionals (see kernels-inl.hpp).
//   affine-1:  y  = act(a*(x - m) + b)
//   affine-2:  dx = k1*(g - k3) + k2*(x - m),  g = dy masked by relu(a*(x - m) + b)
//              with masked statistics: dx = k1*(g - w*k3) + w*k2*(x - m), w the mask beside x
// The direct bodies compute in registers and write large outputs with non-temporal stores
// straight from them, after a head that aligns the output to a cache line (rows align it
// whether streamed or not: NumPy puts large arrays 16 bytes past a line, and vectors that
// straddle lines cost row groups half their speed); run edges are partial vectors. Every
// value is computed by the same operations whichever part of a body (or the general
// loops) computes it.

// Elements before p is on a 64-byte boundary, or -1 if it never is (p not T-aligned).
template <class T>
inline index_t line_head(const T* p) {
  const auto misalign = reinterpret_cast<std::uintptr_t>(p) % 64;
  return misalign % sizeof(T) != 0 ? -1 : static_cast<index_t>((64 - misalign) % 64 / sizeof(T));
}

// Elements before p is aligned to 64 bytes (at most n): the head of a streamed pass.
template <class T>
inline index_t unaligned_head(const T* p, index_t n) {
  const index_t head = line_head(p);
  return head < 0 ? n : std::min(n, head);  // never aligned: all head, ordinary stores
}

// End of the streamed part of [i, n) when i is 64-byte aligned: whole cache lines only. A
// line written partly by streaming and partly by ordinary stores (a 16-bit vector is half
// a line) costs a partial write-combining flush and a read for ownership.
template <class T>
inline index_t whole_lines_end(index_t i, index_t n) {
  constexpr index_t line = 64 / static_cast<index_t>(sizeof(T));
  return i + (n - i) / line * line;
}

template <bool Stream, class T, class V>
inline void write(T* p, V v) {
  if constexpr (Stream)
    stream(p, v);
  else
    store(p, v);
}

// Per-channel coefficients of a row-periodic pass writing `out` (from channel 0), extended
// so that a vector starting at channel c reads coefficient (c + j) mod channels at lane j.
//
// Phase: the arrays start where, in a cache line, the vector loop's first coefficient load
// falls when its output positions are whole lines (after the head that aligns the output),
// so those loads are whole lines too: a load that straddles two lines costs two L1
// accesses, and a pass over memory has few to spare.
//
// Extension: a vector starts at a channel c < channels, or, where row groups start at the
// head that aligns the output (group_shift), up to 64 / sizeof(T) - 1 channels past
// a row, so each array holds channels + max(kLanesF, 64 / sizeof(T)) values (no more: the
// arrays compete with the data for L1).
struct PeriodicCoefs {
  std::vector<float> v;
  Coefs<float> k;  // the extended arrays
  // a, m, b (and k1, k2, k3 for backward) of `src`; a missing one (unused) repeats m.
  template <class T>
  PeriodicCoefs(const Coefs<float>& src, bool backward, index_t channels, const T* out) {
    auto or_m = [&](const float* p) { return p ? p : src.m; };
    const float* arrays[] = {or_m(src.a), src.m, or_m(src.b), or_m(src.k1), or_m(src.k2), or_m(src.k3)};
    const std::size_t count = backward ? 6 : 3;
    constexpr std::size_t line = 64 / sizeof(float);
    const index_t head = line_head(out);
    const std::size_t phase = head > 0 ? (64 - static_cast<std::size_t>(head) * sizeof(float) % 64) % 64 : 0;
    const auto len = static_cast<std::size_t>(channels + std::max<index_t>(kLanesF, 64 / sizeof(T)));
    const std::size_t stride = (len + line - 1) / line * line;  // in floats, from one array to the next
    v.resize(stride * count + line);
    const auto addr = reinterpret_cast<std::uintptr_t>(v.data());  // float-aligned
    float* const first = v.data() + (phase + 64 - addr % 64) % 64 / sizeof(float);
    for (std::size_t i = 0; i < count; ++i) {  // a[0..channels) repeated (no division per value: C = 4096 is common)
      for (std::size_t j = 0; j < len; j += static_cast<std::size_t>(channels))
        std::copy_n(arrays[i], std::min(static_cast<std::size_t>(channels), len - j), first + i * stride + j);
    }
    float* at_index[6] = {};
    for (std::size_t i = 0; i < count; ++i) at_index[i] = first + i * stride;
    k = {at_index[0], at_index[1], at_index[2], at_index[3], at_index[4], at_index[5]};
  }
};

// Coefficient vector of channel c: loaded from extended arrays (periodic), or the one
// channel's value broadcast.
template <class V, bool Periodic>
inline V coef(const lane_t<V>* p, index_t c) {
  if constexpr (Periodic)
    return load<V>(p + c);
  else
    return set<V>(*p);
}

// y = act(a*(x - m) + b) over n contiguous values: of one channel (k holds its
// coefficients), or, Periodic, from channel first_channel of rows of `period` channels (k
// holds extended arrays; lane j of position i uses channel (c + j) mod period). The
// periodic loop reads k through memory (its stores may alias it), as it was measured fastest.
template <class T, bool Relu, bool Stream, bool Periodic>
void affine1_direct(const T* x, T* y, index_t n, const Coefs<compute_t<T>>& k, index_t period, index_t ahead = 0,
                    index_t ahead_out = 0, index_t first_channel = 0) {
  using V = Wide<T>;
  constexpr index_t L = kLanes<V>;
  index_t i = 0, c = first_channel;
  auto partial = [&](index_t e) {  // [i, e) as partial vectors
    while (i < e) {
      const index_t len = std::min(L, e - i);
      const V z = affine(load_n<V>(x + i, len), coef<V, Periodic>(k.a, c), coef<V, Periodic>(k.m, c),
                         coef<V, Periodic>(k.b, c));
      store_n(y + i, Relu ? relu(z) : z, len);
      i += len;
      if (Periodic && (c += len) >= period) c %= period;
    }
  };
  if (Stream || Periodic) partial(unaligned_head(y, n));
  const index_t lines_end = Stream ? whole_lines_end<T>(i, n) : n;
  if constexpr (Periodic) {
    auto loop = [&](auto streamed, index_t end) {
      for (; i + L <= end; i += L) {
        if (ahead) prefetch(x + i + ahead);
        if (ahead_out) prefetch(y + i + ahead_out);
        const V z = affine(load<V>(x + i), load<V>(k.a + c), load<V>(k.m + c), load<V>(k.b + c));
        write<streamed.value>(y + i, Relu ? relu(z) : z);
        c += L;
        if (c >= period) c %= period;
      }
    };
    loop(std::bool_constant<Stream>{}, lines_end), loop(std::false_type{}, n);
  } else {
    const V a = set<V>(*k.a), m = set<V>(*k.m), b = set<V>(*k.b);
    auto loop = [&](auto streamed, index_t end) {
      for (; i + L <= end; i += L) {
        if (ahead) prefetch(x + i + ahead);
        if (ahead_out) prefetch(y + i + ahead_out);
        const V z = affine(load<V>(x + i), a, m, b);
        write<streamed.value>(y + i, Relu ? relu(z) : z);
      }
    };
    loop(std::bool_constant<Stream>{}, lines_end), loop(std::false_type{}, n);
  }
  partial(n);
}

// dx = k1*(g - k3) + k2*(x - m), g = dy (masked by relu(a*(x - m) + b)); as affine1_direct.
// With mask weights (Wt, read at w: one per value, or one for the call) the dx of masked
// statistics, dx_of_weighted.
template <class T, bool Relu, bool Stream, bool Periodic, Weights Wt = Weights::none>
void affine2_direct(const T* x, const T* dy, T* dx, index_t n, const Coefs<compute_t<T>>& k, index_t period,
                    index_t ahead = 0, index_t ahead_out = 0, index_t first_channel = 0, const T* w = nullptr) {
  using V = Wide<T>;
  constexpr index_t L = kLanes<V>;
  index_t i = 0, c = first_channel;
  const V w_one = Wt == Weights::one ? set<V>(to_compute(w)) : V{};
  auto dx_at = [&](V dyv, V xv, V a, V m, V b, V k1, V k2, V k3, index_t len) {
    if constexpr (Wt == Weights::none)
      return dx_of<Relu>(dyv, xv, a, m, b, k1, k2, k3);
    else if constexpr (Wt == Weights::one)
      return dx_of_weighted<Relu>(dyv, xv, a, m, b, k1, k2, k3, w_one);
    else
      return dx_of_weighted<Relu>(dyv, xv, a, m, b, k1, k2, k3, len == L ? load<V>(w + i) : load_n<V>(w + i, len));
  };
  auto partial = [&](index_t e) {  // [i, e) as partial vectors (dy = x = 0 past e: finite)
    while (i < e) {
      const index_t len = std::min(L, e - i);
      const V a = Relu ? coef<V, Periodic>(k.a, c) : V{}, b = Relu ? coef<V, Periodic>(k.b, c) : V{};
      store_n(dx + i,
              dx_at(load_n<V>(dy + i, len), load_n<V>(x + i, len), a, coef<V, Periodic>(k.m, c), b,
                    coef<V, Periodic>(k.k1, c), coef<V, Periodic>(k.k2, c), coef<V, Periodic>(k.k3, c), len),
              len);
      i += len;
      if (Periodic && (c += len) >= period) c %= period;
    }
  };
  auto vec = [&](auto streamed, V a, V m, V b, V k1, V k2, V k3) {
    write<streamed.value>(dx + i, dx_at(load<V>(dy + i), load<V>(x + i), a, m, b, k1, k2, k3, L));
  };
  if (Stream || Periodic) partial(unaligned_head(dx, n));
  const index_t lines_end = Stream ? whole_lines_end<T>(i, n) : n;
  if constexpr (Periodic) {
    auto loop = [&](auto streamed, index_t end) {
      for (; i + L <= end; i += L) {
        if (ahead) prefetch(x + i + ahead), prefetch(dy + i + ahead);
        if (ahead_out) prefetch(dx + i + ahead_out);
        vec(streamed, Relu ? load<V>(k.a + c) : V{}, load<V>(k.m + c), Relu ? load<V>(k.b + c) : V{}, load<V>(k.k1 + c),
            load<V>(k.k2 + c), load<V>(k.k3 + c));
        c += L;
        if (c >= period) c %= period;
      }
    };
    loop(std::bool_constant<Stream>{}, lines_end), loop(std::false_type{}, n);
  } else {
    const V a = Relu ? set<V>(*k.a) : V{}, m = set<V>(*k.m), b = Relu ? set<V>(*k.b) : V{};
    const V k1 = set<V>(*k.k1), k2 = set<V>(*k.k2), k3 = set<V>(*k.k3);
    auto loop = [&](auto streamed, index_t end) {
      for (; i + L <= end; i += L) {
        if (ahead) prefetch(x + i + ahead), prefetch(dy + i + ahead);
        if (ahead_out) prefetch(dx + i + ahead_out);
        vec(streamed, a, m, b, k1, k2, k3);
      }
    };
    loop(std::bool_constant<Stream>{}, lines_end), loop(std::false_type{}, n);
  }
  partial(n);
}

// ---- rows ----------------------------------------------------------------------------

// Wide rows (channels last): once the coefficient arrays a pass reads per channel fill
// most of L1 (3 arrays for inference, 4 or 6 for backward), reloading them for every row
// makes them the larger part of the traffic. Groups of kRowGroup rows then load each
// coefficient vector once for all of them; narrower rows keep the one stretch, which is
// faster there.
// Groups need whole vectors, and take group rows that start on a cache line and are whole
// lines (required when streamed, by the rule of whole_lines_end; twice as fast otherwise):
// rows a multiple of 64 bytes long and apart, and an output that starts on a line, or, for
// one contiguous stretch, group rows shifted by the head that aligns it: a group row then
// runs from channel h of one row to channel h - 1 of the next (NumPy puts large arrays 16
// bytes past a line). Other rows take unaligned groups, or none when streamed.
constexpr index_t kRowGroup = 4;
constexpr std::size_t kRowGroupCoefBytes = 32 << 10;

// The channel h at which group rows start, or -1 for no groups.
template <class T>
inline index_t group_shift(index_t rows, index_t channels, int coef_arrays, bool stream, const T* out,
                           index_t out_stride, bool contiguous) {
  if (rows < kRowGroup || channels % kLanesF != 0) return -1;
  if (static_cast<std::size_t>(channels) * sizeof(float) * static_cast<std::size_t>(coef_arrays) < kRowGroupCoefBytes)
    return -1;
  const auto line = static_cast<index_t>(64 / sizeof(T));
  const index_t head = line_head(out);
  if (out_stride % line == 0 && channels % line == 0 && (head == 0 || (head > 0 && contiguous))) return head;
  return stream ? -1 : 0;  // else groups whose stores straddle lines, which streamed stores must not
}

// Order of a wide-rows pass: with groups (h = group_shift(...) >= 0), the first h values
// of row 0, then groups of kRowGroup rows from channel h (group(i): rows i.. from there;
// a shifted group's last row runs into row i + kRowGroup, so one row is left over); then
// the values not yet written, as one stretch when the rows are contiguous
// (stretch(offset, n, first_channel)), else row by row (row(i)).
template <class Group, class Stretch, class Row>
inline void drive_rows(index_t rows, index_t channels, index_t h, bool contiguous, const Group& group,
                       const Stretch& stretch, const Row& row) {
  index_t i = 0;
  if (h >= 0) {
    if (h > 0) stretch(index_t{0}, h, index_t{0});
    for (; i + kRowGroup + (h > 0) <= rows; i += kRowGroup) group(i);
  }
  const index_t c = std::max<index_t>(h, 0);  // (h > 0 only for contiguous rows)
  if (contiguous)
    stretch(i * channels + c, (rows - i) * channels - c, c);
  else
    for (; i < rows; ++i) row(i);
}

template <class T, bool Relu, bool Stream>
void affine1_row_group(const T* x, index_t xs, T* y, index_t ys, index_t channels, const Coefs<float>& k) {
  const float *const ka = k.a, *const km = k.m, *const kb = k.b;
  for (index_t c = 0; c < channels; c += kLanesF) {
    const VF a = load<VF>(ka + c), m = load<VF>(km + c), b = load<VF>(kb + c);
    for (index_t r = 0; r < kRowGroup; ++r) {
      const VF z = affine(load<VF>(x + r * xs + c), a, m, b);
      write<Stream>(y + r * ys + c, Relu ? relu(z) : z);
    }
  }
}

template <class T, bool Relu, bool Stream>
void affine2_row_group(const T* x, index_t xs, const T* dy, index_t ds, T* dx, index_t os, index_t channels,
                       const Coefs<float>& k) {
  const float *const ka = k.a, *const km = k.m, *const kb = k.b;
  const float *const k1 = k.k1, *const k2 = k.k2, *const k3 = k.k3;
  for (index_t c = 0; c < channels; c += kLanesF) {
    const VF a = Relu ? load<VF>(ka + c) : VF{}, m = load<VF>(km + c), b = Relu ? load<VF>(kb + c) : VF{};
    const VF c1 = load<VF>(k1 + c), c2 = load<VF>(k2 + c), c3 = load<VF>(k3 + c);
    for (index_t r = 0; r < kRowGroup; ++r)
      write<Stream>(dx + r * os + c,
                    dx_of<Relu>(load<VF>(dy + r * ds + c), load<VF>(x + r * xs + c), a, m, b, c1, c2, c3));
  }
}

// The general loops' rows: channel c uses coefficient [c].
template <bool Relu, class C>
inline void affine1_channels(const C* x, C* y, index_t n, const Coefs<C>& k) {
  for (index_t c = 0; c < n; ++c) {
    const C z = affine(x[c], k.a[c], k.m[c], k.b[c]);
    y[c] = Relu ? relu(z) : z;
  }
}

// Weighted: the dx of masked statistics, w the row's mask value.
template <bool Relu, bool Weighted = false, class C>
inline void affine2_channels(const C* x, const C* dy, C* dx, index_t n, const Coefs<C>& k, C w = C(1)) {
  for (index_t c = 0; c < n; ++c) {
    const C a = Relu ? k.a[c] : C(0), b = Relu ? k.b[c] : C(0);  // a and b exist only with the ReLU
    dx[c] = Weighted ? dx_of_weighted<Relu>(dy[c], x[c], a, k.m[c], b, k.k1[c], k.k2[c], k.k3[c], w)
                     : dx_of<Relu>(dy[c], x[c], a, k.m[c], b, k.k1[c], k.k2[c], k.k3[c]);
  }
}

template <class T>
void affine1_rows(Strided<const T> x, Strided<T> y, index_t rows, index_t channels, Coefs<compute_t<T>> k, bool relu_on,
                  Output out) {
  using C = compute_t<T>;
  if (rows <= 0 || channels <= 0) return;
  const bool stream = out.stream;
  if constexpr (kDirect<T>) {
    const PeriodicCoefs pc(k, false, channels, y.p);
    const Coefs<float>& kk = pc.k;
    with_flags(relu_on, stream, [&](auto r, auto st) {
      const bool contiguous = x.stride == channels && y.stride == channels;
      const index_t h = group_shift(rows, channels, 3, stream, y.p, y.stride, contiguous);
      const index_t g = std::max<index_t>(h, 0);  // the channel group rows start at
      const Coefs<float> kg = kk.from(g);
      drive_rows(
          rows, channels, h, contiguous,
          [&](index_t i) {
            affine1_row_group<T, r.value, st.value>(x.p + i * x.stride + g, x.stride, y.p + i * y.stride + g, y.stride,
                                                    channels, kg);
          },
          [&](index_t off, index_t n, index_t c) {
            affine1_direct<T, r.value, st.value, true>(x.p + off, y.p + off, n, kk, channels, out.ahead,
                                                       st.value ? 0 : out.ahead_out, c);
          },
          [&](index_t i) {
            affine1_direct<T, r.value, st.value, true>(x.p + i * x.stride, y.p + i * y.stride, channels, kk, channels);
          });
    });
  } else {
    C xbuf[kBlock], ybuf[kBlock];
    const bool contiguous = x.stride == channels && y.stride == channels;
    for_row_blocks(rows, channels, contiguous, [&](index_t r, index_t nr, index_t c0, index_t n) {
      const C* xs = view(x.p + r * x.stride + c0, 1, nr * n, xbuf);
      T* yp = y.p + r * y.stride + c0;
      C* ys = output_target(yp, 1, ybuf, stream);
      const Coefs<C> kc = k.from(c0);
      for (index_t i = 0; i < nr; ++i)
        relu_on ? affine1_channels<true>(xs + i * n, ys + i * n, n, kc)
                : affine1_channels<false>(xs + i * n, ys + i * n, n, kc);
      output_finish(ys, yp, 1, nr * n, stream);
    });
  }
  if (stream) end_stream();
}

template <class T>
void affine2_rows(Strided<const T> x, Strided<const T> dy, Strided<T> dx, index_t rows, index_t channels,
                  Coefs<compute_t<T>> k, bool relu_on, Output out) {
  using C = compute_t<T>;
  if (rows <= 0 || channels <= 0) return;
  const bool stream = out.stream;
  const bool contiguous = x.stride == channels && dy.stride == channels && dx.stride == channels;
  if constexpr (kDirect<T>) {
    const PeriodicCoefs pc(k, true, channels, dx.p);
    const Coefs<float>& kk = pc.k;
    with_flags(relu_on, stream, [&](auto r, auto st) {
      const index_t h = group_shift(rows, channels, r.value ? 6 : 4, stream, dx.p, dx.stride, contiguous);
      const index_t g = std::max<index_t>(h, 0);
      const Coefs<float> kg = kk.from(g);
      drive_rows(
          rows, channels, h, contiguous,
          [&](index_t i) {
            affine2_row_group<T, r.value, st.value>(x.p + i * x.stride + g, x.stride, dy.p + i * dy.stride + g,
                                                    dy.stride, dx.p + i * dx.stride + g, dx.stride, channels, kg);
          },
          [&](index_t off, index_t n, index_t c) {
            affine2_direct<T, r.value, st.value, true>(x.p + off, dy.p + off, dx.p + off, n, kk, channels, out.ahead,
                                                       st.value ? 0 : out.ahead_out, c);
          },
          [&](index_t i) {
            affine2_direct<T, r.value, st.value, true>(x.p + i * x.stride, dy.p + i * dy.stride, dx.p + i * dx.stride,
                                                       channels, kk, channels);
          });
    });
  } else {
    C xbuf[kBlock], dbuf[kBlock], obuf[kBlock];
    for_row_blocks(rows, channels, contiguous, [&](index_t r, index_t nr, index_t c0, index_t n) {
      const C* xs = view(x.p + r * x.stride + c0, 1, nr * n, xbuf);
      const C* ds = view(dy.p + r * dy.stride + c0, 1, nr * n, dbuf);
      T* op = dx.p + r * dx.stride + c0;
      C* os = output_target(op, 1, obuf, stream);
      const Coefs<C> kc = k.from(c0);
      for (index_t i = 0; i < nr; ++i)
        relu_on ? affine2_channels<true>(xs + i * n, ds + i * n, os + i * n, n, kc)
                : affine2_channels<false>(xs + i * n, ds + i * n, os + i * n, n, kc);
      output_finish(os, op, 1, nr * n, stream);
    });
  }
  if (stream) end_stream();
}

// Masked statistics, rows: each row has its own mask value, so rows go one at a time.
template <class T>
void affine2w_rows(Strided<const T> x, Strided<const T> dy, Strided<const T> w, Strided<T> dx, index_t rows,
                   index_t channels, Coefs<compute_t<T>> k, bool relu_on, bool stream) {
  using C = compute_t<T>;
  if (rows <= 0 || channels <= 0) return;
  if constexpr (kDirect<T>) {
    const PeriodicCoefs pc(k, true, channels, dx.p);
    with_flags(relu_on, stream, [&](auto r, auto st) {
      for (index_t i = 0; i < rows; ++i)
        affine2_direct<T, r.value, st.value, true, Weights::one>(x.p + i * x.stride, dy.p + i * dy.stride,
                                                                 dx.p + i * dx.stride, channels, pc.k, channels, 0, 0,
                                                                 0, w.p + i * w.stride);
    });
  } else {
    C xbuf[kBlock], dbuf[kBlock], obuf[kBlock];
    for (index_t r = 0; r < rows; ++r)
      for (index_t c0 = 0; c0 < channels; c0 += kBlock) {
        const index_t n = std::min(kBlock, channels - c0);
        const C* xs = view(x.p + r * x.stride + c0, 1, n, xbuf);
        const C* ds = view(dy.p + r * dy.stride + c0, 1, n, dbuf);
        T* op = dx.p + r * dx.stride + c0;
        C* os = output_target(op, 1, obuf, stream);
        const C wr = to_compute(w.p + r * w.stride);
        relu_on ? affine2_channels<true, true>(xs, ds, os, n, k.from(c0), wr)
                : affine2_channels<false, true>(xs, ds, os, n, k.from(c0), wr);
        output_finish(os, op, 1, n, stream);
      }
  }
  if (stream) end_stream();
}

// ---- runs ----------------------------------------------------------------------------

template <class T>
void affine1_runs(const RunArray<const T>& x, const RunArray<T>& y, const RunShape& shape, Coefs<compute_t<T>> k,
                  bool relu_on, Output out) {
  with_flags(relu_on, out.stream, [&](auto relu, auto stream) {
    map_runs<stream.value>(
        shape, out,
        [&](index_t c, index_t n, index_t ahead, index_t ahead_out, auto streamed, const auto* xp, auto* yp) {
          using E = std::remove_pointer_t<decltype(yp)>;  // T, or the compute type in the general loops
          affine1_direct<E, relu.value, streamed.value, false>(xp, yp, n, k.from(c), 0, ahead, ahead_out);
        },
        y, x);
  });
  if (out.stream) end_stream();
}

template <class T>
void affine2_runs(const RunArray<const T>& x, const RunArray<const T>& dy, const RunArray<T>& dx, const RunShape& shape,
                  Coefs<compute_t<T>> k, bool relu_on, Output out) {
  with_flags(relu_on, out.stream, [&](auto relu, auto stream) {
    map_runs<stream.value>(
        shape, out,
        [&](index_t c, index_t n, index_t ahead, index_t ahead_out, auto streamed, const auto* xp, const auto* dyp,
            auto* dxp) {
          using E = std::remove_pointer_t<decltype(dxp)>;
          affine2_direct<E, relu.value, streamed.value, false>(xp, dyp, dxp, n, k.from(c), 0, ahead, ahead_out);
        },
        dx, x, dy);
  });
  if (out.stream) end_stream();
}

template <class T>
void affine2w_runs(const RunArray<const T>& x, const RunArray<const T>& dy, const RunArray<const T>& w,
                   const RunArray<T>& dx, const RunShape& shape, Coefs<compute_t<T>> k, bool relu_on, Output out) {
  with_flags(relu_on, out.stream, [&](auto relu, auto stream) {
    map_runs<stream.value>(
        shape, out,
        [&](index_t c, index_t n, index_t ahead, index_t ahead_out, auto streamed, const auto* xp, const auto* dyp,
            const auto* wp, auto* dxp) {
          using E = std::remove_pointer_t<decltype(dxp)>;
          affine2_direct<E, relu.value, streamed.value, false, Weights::each>(xp, dyp, dxp, n, k.from(c), 0, ahead,
                                                                              ahead_out, 0, wp);
        },
        dx, x, dy, w);
  });
  if (out.stream) end_stream();
}
