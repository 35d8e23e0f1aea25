// The two reductions, each in a rows form (channels last) and a runs form, on the
// operations of simd-inl.hpp and the drivers of general-inl.hpp. No include guard and no
// instruction-set conditionals (see kernels-inl.hpp).
//   reduce-1:  s += x - m,  ss += (x - m)^2                  (m: the channel's shift)
//              weighted by a mask w read beside x:  s += w*(x - m),  ss += w*(x - m)^2
//   reduce-2:  s += g,      ss += g * (x - m),  g = dy masked by relu(a*(x - m) + b)
// Sums are double: float values are converted lane by lane (GCC does not vectorize that
// on its own), kUnroll accumulators per sum.

// ---- runs ----------------------------------------------------------------------------

// Reduce-1 over n contiguous values (T, or the compute type in the general loops);
// Weighted: each weighted by the mask value beside it, w[i] (w is not read otherwise).
template <bool Weighted, class T>
inline void reduce1_run(const T* x, const T* w, index_t n, double m, Sums& sums, index_t ahead) {
  constexpr index_t W = kLanesD;
  const VD vm = set<VD>(m);
  auto step = [&](VD d, VD wv, int u) {
    if (Weighted) d = if_nonzero(wv, d);  // a padded position adds nothing, whatever it holds (NaN too)
    const VD wd = Weighted ? mul(wv, d) : d;
    sums.s.acc[u] = add(sums.s.acc[u], wd);
    sums.ss.acc[u] = mul_add(wd, d, sums.ss.acc[u]);
  };
  auto weight = [&](index_t i) { return Weighted ? promote(load<Narrow<T>>(w + i)) : vm; };
  index_t i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W) {
    if (ahead) prefetch_lines(x + i + ahead, kUnroll * W);
    for (int u = 0; u < kUnroll; ++u) step(sub(promote(load<Narrow<T>>(x + i + u * W)), vm), weight(i + u * W), u);
  }
  for (; i + W <= n; i += W) step(sub(promote(load<Narrow<T>>(x + i)), vm), weight(i), 0);
  if (i < n)
    step(keep_first(sub(promote(load_n<Narrow<T>>(x + i, n - i)), vm), n - i),
         Weighted ? promote(load_n<Narrow<T>>(w + i, n - i)) : vm, 1);
}

// Reduce-2 over n contiguous values; a and b matter only with the ReLU.
template <bool Relu, class T, class C>
inline void reduce2_run(const T* x, const T* dy, index_t n, C a, C m, C b, Sums& sums, index_t ahead) {
  using V = Narrow<T>;
  constexpr index_t W = kLanesD;
  const V va = set<V>(a), vm = set<V>(m), vb = set<V>(b);
  const VD md = set<VD>(m);
  auto step = [&](V xv, V dyv, int u) {
    const VD g = promote(grad<Relu>(dyv, xv, va, vm, vb));
    sums.s.acc[u] = add(sums.s.acc[u], g);
    sums.ss.acc[u] = mul_add(g, sub(promote(xv), md), sums.ss.acc[u]);
  };
  index_t i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W) {
    if (ahead) {
      prefetch_lines(x + i + ahead, kUnroll * W);
      prefetch_lines(dy + i + ahead, kUnroll * W);
    }
    for (int u = 0; u < kUnroll; ++u) step(load<V>(x + i + u * W), load<V>(dy + i + u * W), u);
  }
  for (; i + W <= n; i += W) step(load<V>(x + i), load<V>(dy + i), 0);
  if (i < n) step(load_n<V>(x + i, n - i), load_n<V>(dy + i, n - i), 1);  // dy = 0 past n: adds nothing
}

template <class T>
void reduce1_runs(const RunArray<const T>& x, const RunShape& shape, Coefs<compute_t<T>> k, double* s, double* ss,
                  index_t ahead) {
  reduce_runs<T>(
      shape, s, ss, ahead,
      [&](index_t c, index_t n, index_t prefetch_ahead, Sums& sums, const auto* xp) {
        reduce1_run<false>(xp, xp, n, static_cast<double>(k.m[c]), sums, prefetch_ahead);
      },
      x);
}

template <class T>
void reduce1w_runs(const RunArray<const T>& x, const RunArray<const T>& w, const RunShape& shape, Coefs<compute_t<T>> k,
                   double* s, double* ss, index_t ahead) {
  reduce_runs<T>(
      shape, s, ss, ahead,
      [&](index_t c, index_t n, index_t prefetch_ahead, Sums& sums, const auto* xp, const auto* wp) {
        reduce1_run<true>(xp, wp, n, static_cast<double>(k.m[c]), sums, prefetch_ahead);
      },
      x, w);
}

template <class T>
void reduce2_runs(const RunArray<const T>& x, const RunArray<const T>& dy, const RunShape& shape, Coefs<compute_t<T>> k,
                  bool relu_on, double* s, double* ss, index_t ahead) {
  using C = compute_t<T>;
  auto pass = [&](auto relu) {
    reduce_runs<T>(
        shape, s, ss, ahead,
        [&](index_t c, index_t n, index_t prefetch_ahead, Sums& sums, const auto* xp, const auto* dyp) {
          const C a = relu.value ? k.a[c] : C(1), b = relu.value ? k.b[c] : C(0);  // a, b exist only with the ReLU
          reduce2_run<relu.value>(xp, dyp, n, a, k.m[c], b, sums, prefetch_ahead);
        },
        x, dy);
  };
  relu_on ? pass(std::true_type{}) : pass(std::false_type{});
}

// ---- rows ----------------------------------------------------------------------------

// Row tiles (the direct body): the sums of a tile of rows by kTileVectors vectors of channels
// are kept in double registers and added to the per-channel accumulators once per tile,
// instead of loading and storing the accumulators for every row; a tile's
// 2 * kTileVectors * kHalves sums are independent, so their adds overlap. A tile is
// kTileRows rows (kernels.hpp) of one array, or half as many of two (x and dy): rows whose
// distance is a multiple of 4 KiB fall in one L1 set, and 16 lines there lost to 8 (256x4096
// backward, docs/performance.md). Tiles start at multiples of their height from the first
// row of the call. Channels past the last whole vector go through a scalar loop per row.
constexpr std::size_t kTileVectors = 2;
// Elements the row reductions prefetch ahead of their loads: the same columns of the next
// tile, or this many elements on where the next tile is nearer (short rows).
constexpr index_t kAheadRows = 2048;

// s[0..kLanesF) += sum, ss[0..kLanesF) += sq, every load before any store: s and ss are
// often a multiple of 4 KiB apart (per-thread partials of C channels), and a load behind a
// store to an address with the same low 12 bits waits for it (4K aliasing).
inline void add_sums(double* s, double* ss, const VD (&sum)[kHalves], const VD (&sq)[kHalves]) {
  VD a[kHalves], b[kHalves];
  for (int h = 0; h < kHalves; ++h) a[h] = load<VD>(s + h * kLanesD);
  for (int h = 0; h < kHalves; ++h) b[h] = load<VD>(ss + h * kLanesD);
  for (int h = 0; h < kHalves; ++h) store(s + h * kLanesD, add(a[h], sum[h]));
  for (int h = 0; h < kHalves; ++h) store(ss + h * kLanesD, add(b[h], sq[h]));
}

// The first channel of vector j of a tile.
inline index_t lane0(std::size_t j) { return static_cast<index_t>(j) * kLanesF; }

// Calls tile(r0, r1, c, nv) for the tiles of rows [r0, r1) and nv vectors of channels from c
// on, after prefetching ahead in each row of the tile (`operands`: the arrays read, with
// their row strides), then scalar(r) for each row of the tile's rows where channels remain.
template <class T, class Tile, class Scalar>
void for_row_tiles(std::initializer_list<Strided<const T>> operands, index_t rows, index_t channels, const Tile& tile,
                   const Scalar& scalar) {
  const index_t vec_channels = channels / kLanesF * kLanesF;
  const index_t height = kTileRows / static_cast<index_t>(operands.size());
  for (index_t r0 = 0; r0 < rows; r0 += height) {
    const index_t r1 = std::min(rows, r0 + height);
    index_t c = 0;
    for (; c + lane0(kTileVectors) <= vec_channels; c += lane0(kTileVectors)) {
      for (const Strided<const T>& a : operands) {
        const index_t ahead = std::max(kAheadRows, height * a.stride);  // at least the next tile's rows
        for (index_t r = r0; r < r1; ++r) {
          prefetch_lines(a.p + r * a.stride + c + ahead, lane0(kTileVectors));
        }
      }
      tile(r0, r1, c, std::integral_constant<std::size_t, kTileVectors>{});
    }
    for (; c < vec_channels; c += kLanesF) tile(r0, r1, c, std::integral_constant<std::size_t, 1>{});
    for (index_t r = r0; r < r1 && vec_channels < channels; ++r) scalar(r, vec_channels);
  }
}

// Weighted: row r's values weighted by the mask value w.p[r * w.stride] (not read otherwise).
template <bool Weighted, class T>
void reduce1_tiles(Strided<const T> x, Strided<const T> w, index_t rows, index_t channels, const float* m, double* s,
                   double* ss) {
  auto weight = [&](index_t r) { return Weighted ? to_compute(w.p + r * w.stride) : 1.0f; };
  auto tile = [&](index_t r0, index_t r1, index_t c, auto vectors) {
    constexpr std::size_t NV = vectors.value;
    VD md[NV][kHalves], sum[NV][kHalves], sq[NV][kHalves];
    for (std::size_t j = 0; j < NV; ++j) {
      halves(load<VF>(m + c + lane0(j)), md[j]);
      for (int h = 0; h < kHalves; ++h) sum[j][h] = zero<VD>(), sq[j][h] = zero<VD>();
    }
    for (index_t r = r0; r < r1; ++r) {
      if (Weighted && weight(r) == 0) continue;  // a padded row adds nothing, whatever it holds
      const VD wr = set<VD>(weight(r));
      for (std::size_t j = 0; j < NV; ++j) {
        VD v[kHalves];
        halves(load<VF>(x.p + r * x.stride + c + lane0(j)), v);
        for (int h = 0; h < kHalves; ++h) {
          const VD d = sub(v[h], md[j][h]), wd = Weighted ? mul(wr, d) : d;
          sum[j][h] = add(sum[j][h], wd);
          sq[j][h] = mul_add(wd, d, sq[j][h]);
        }
      }
    }
    for (std::size_t j = 0; j < NV; ++j) add_sums(s + c + lane0(j), ss + c + lane0(j), sum[j], sq[j]);
  };
  for_row_tiles<T>({x}, rows, channels, tile, [&](index_t r, index_t c0) {
    if (Weighted && weight(r) == 0) return;
    for (index_t c = c0; c < channels; ++c) {
      const double d = promote(to_compute(x.p + r * x.stride + c)) - promote(m[c]);
      const double wd = Weighted ? promote(weight(r)) * d : d;
      s[c] += wd;
      ss[c] += wd * d;
    }
  });
}

template <bool Relu, class T>
void reduce2_tiles(Strided<const T> x, Strided<const T> dy, index_t rows, index_t channels, const Coefs<float>& k,
                   double* s, double* ss) {
  auto tile = [&](index_t r0, index_t r1, index_t c, auto vectors) {
    constexpr std::size_t NV = vectors.value;
    VF mf[NV], a[NV], b[NV];
    VD md[NV][kHalves], sum[NV][kHalves], sq[NV][kHalves];
    for (std::size_t j = 0; j < NV; ++j) {
      mf[j] = load<VF>(k.m + c + lane0(j));
      a[j] = Relu ? load<VF>(k.a + c + lane0(j)) : mf[j];  // a, b exist only with the ReLU
      b[j] = Relu ? load<VF>(k.b + c + lane0(j)) : mf[j];
      halves(mf[j], md[j]);
      for (int h = 0; h < kHalves; ++h) sum[j][h] = zero<VD>(), sq[j][h] = zero<VD>();
    }
    for (index_t r = r0; r < r1; ++r)
      for (std::size_t j = 0; j < NV; ++j) {
        const VF xv = load<VF>(x.p + r * x.stride + c + lane0(j));
        VD g[kHalves], xd[kHalves];
        halves(grad<Relu>(load<VF>(dy.p + r * dy.stride + c + lane0(j)), xv, a[j], mf[j], b[j]), g);
        halves(xv, xd);
        for (int h = 0; h < kHalves; ++h) {
          sum[j][h] = add(sum[j][h], g[h]);
          sq[j][h] = mul_add(g[h], sub(xd[h], md[j][h]), sq[j][h]);
        }
      }
    for (std::size_t j = 0; j < NV; ++j) add_sums(s + c + lane0(j), ss + c + lane0(j), sum[j], sq[j]);
  };
  for_row_tiles<T>({x, dy}, rows, channels, tile, [&](index_t r, index_t c0) {
    for (index_t c = c0; c < channels; ++c) {
      const float xv = to_compute(x.p + r * x.stride + c);
      const float a = Relu ? k.a[c] : 1.0f, b = Relu ? k.b[c] : 0.0f;
      const double g = promote(grad<Relu>(to_compute(dy.p + r * dy.stride + c), xv, a, k.m[c], b));
      s[c] += g;
      ss[c] += g * (promote(xv) - promote(k.m[c]));
    }
  });
}

// The general loops' rows: channel c uses coefficient [c] and accumulator [c]; Weighted:
// every value weighted by w (the row's mask value).
template <bool Weighted, class C>
inline void reduce1_channels(const C* x, index_t n, const C* m, double w, double* s, double* ss) {
  if (Weighted && w == 0) return;  // a padded row adds nothing, whatever it holds
  for (index_t c = 0; c < n; ++c) {
    const double d = static_cast<double>(x[c]) - static_cast<double>(m[c]), wd = Weighted ? w * d : d;
    s[c] += wd;
    ss[c] += wd * d;
  }
}

template <bool Relu, class C>
inline void reduce2_channels(const C* x, const C* dy, index_t n, const Coefs<C>& k, double* s, double* ss) {
  for (index_t c = 0; c < n; ++c) {
    const C a = Relu ? k.a[c] : C(1), b = Relu ? k.b[c] : C(0);  // a and b exist only with the ReLU
    const double g = promote(grad<Relu>(dy[c], x[c], a, k.m[c], b));
    s[c] += g;
    ss[c] += g * (static_cast<double>(x[c]) - static_cast<double>(k.m[c]));
  }
}

template <bool Weighted, class T>
void reduce1_rows_of(Strided<const T> x, Strided<const T> w, index_t rows, index_t channels, Coefs<compute_t<T>> k,
                     double* s, double* ss) {
  using C = compute_t<T>;
  if constexpr (kDirect<T>) {
    reduce1_tiles<Weighted>(x, w, rows, channels, k.m, s, ss);
  } else {
    C buf[kBlock];
    for_row_blocks(rows, channels, x.stride == channels, [&](index_t r, index_t nr, index_t c0, index_t n) {
      const C* xs = view(x.p + r * x.stride + c0, 1, nr * n, buf);
      for (index_t i = 0; i < nr; ++i) {
        const double wr = Weighted ? promote(to_compute(w.p + (r + i) * w.stride)) : 1.0;
        reduce1_channels<Weighted>(xs + i * n, n, k.m + c0, wr, s + c0, ss + c0);
      }
    });
  }
}

template <class T>
void reduce1_rows(Strided<const T> x, index_t rows, index_t channels, Coefs<compute_t<T>> k, double* s, double* ss) {
  reduce1_rows_of<false>(x, x, rows, channels, k, s, ss);
}

template <class T>
void reduce1w_rows(Strided<const T> x, Strided<const T> w, index_t rows, index_t channels, Coefs<compute_t<T>> k,
                   double* s, double* ss) {
  reduce1_rows_of<true>(x, w, rows, channels, k, s, ss);
}

template <class T>
void reduce2_rows(Strided<const T> x, Strided<const T> dy, index_t rows, index_t channels, Coefs<compute_t<T>> k,
                  bool relu_on, double* s, double* ss) {
  using C = compute_t<T>;
  if constexpr (kDirect<T>) {
    relu_on ? reduce2_tiles<true>(x, dy, rows, channels, k, s, ss)
            : reduce2_tiles<false>(x, dy, rows, channels, k, s, ss);
  } else {
    C xbuf[kBlock], dbuf[kBlock];
    const bool contiguous = x.stride == channels && dy.stride == channels;
    for_row_blocks(rows, channels, contiguous, [&](index_t r, index_t nr, index_t c0, index_t n) {
      const C* xs = view(x.p + r * x.stride + c0, 1, nr * n, xbuf);
      const C* ds = view(dy.p + r * dy.stride + c0, 1, nr * n, dbuf);
      const Coefs<C> kc = k.from(c0);
      for (index_t i = 0; i < nr; ++i)
        relu_on ? reduce2_channels<true>(xs + i * n, ds + i * n, n, kc, s + c0, ss + c0)
                : reduce2_channels<false>(xs + i * n, ds + i * n, n, kc, s + c0, ss + c0);
    });
  }
}
