// The kernels, written once. This file has no include guard on purpose: each
// kernels_<isa>.cpp includes it inside its own namespace (batchnorm::detail::<isa>) and
// its own target region, after defining
//   BATCHNORM_KERNEL_ISA   the instruction set's name ("baseline", "avx2", "avx512")
//   BATCHNORM_KERNEL_F16C  1 where the F16C half <-> float conversions may be used
//   BATCHNORM_KERNEL_FMA   1 where fused multiply-add instructions may be used
//   BATCHNORM_KERNEL_SIMD  0, 256 (AVX2) or 512 (AVX-512): the hand-written vector bodies
// so the same loops are compiled for each instruction set. Nothing here may be defined
// outside that namespace: a function compiled for AVX-512 must never be picked by the
// linker for baseline code.
//
// Structure: the inner loops work on contiguous arrays of the compute type C. Data that
// is already such an array is used in place; anything else (16-bit types, strided runs)
// is converted block by block into a small stack buffer first, and written back the same
// way, so one set of simple loops serves every element type and stride.

constexpr index_t kBlock = 512;  // elements per conversion block (4 KiB of double)
constexpr int kLanes = 16;       // independent accumulators: enough to hide add latency

// ---- element conversion ------------------------------------------------------------

inline void load(const float* p, index_t stride, index_t n, float* out) {
  for (index_t i = 0; i < n; ++i) out[i] = p[i * stride];
}
inline void load(const double* p, index_t stride, index_t n, double* out) {
  for (index_t i = 0; i < n; ++i) out[i] = p[i * stride];
}
inline void load(const bfloat16_t* p, index_t stride, index_t n, float* out) {
  for (index_t i = 0; i < n; ++i) {
    const std::uint32_t u = static_cast<std::uint32_t>(p[i * stride].bits) << 16;
    std::memcpy(out + i, &u, sizeof u);
  }
}
inline void load(const float16_t* p, index_t stride, index_t n, float* out) {
  index_t i = 0;
#if BATCHNORM_KERNEL_F16C
  if (stride == 1)
    for (; i + 8 <= n; i += 8)
      _mm256_storeu_ps(out + i, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i))));
#endif
  for (; i < n; ++i) out[i] = float16_t::to_float(p[i * stride].bits);
}

inline void store(const float* in, float* p, index_t stride, index_t n) {
  for (index_t i = 0; i < n; ++i) p[i * stride] = in[i];
}
inline void store(const double* in, double* p, index_t stride, index_t n) {
  for (index_t i = 0; i < n; ++i) p[i * stride] = in[i];
}
inline void store(const float* in, bfloat16_t* p, index_t stride, index_t n) {
  for (index_t i = 0; i < n; ++i) {
    std::uint32_t x;
    std::memcpy(&x, in + i, sizeof x);
    const std::uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
    const std::uint32_t quiet_nan = (x >> 16) | 0x40u;
    p[i * stride].bits = static_cast<std::uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
  }
}
inline void store(const float* in, float16_t* p, index_t stride, index_t n) {
  index_t i = 0;
#if BATCHNORM_KERNEL_F16C
  if (stride == 1)
    for (; i + 8 <= n; i += 8)
      _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                       _mm256_cvtps_ph(_mm256_loadu_ps(in + i), _MM_FROUND_TO_NEAREST_INT));
#endif
  for (; i < n; ++i) p[i * stride].bits = float16_t::from_float(in[i]);
}

// n contiguous compute values starting at p: p itself where it already is that, else buf.
template <class T, class C>
inline const C* view(const T* p, index_t stride, index_t n, C* buf) {
  if constexpr (std::is_same_v<T, C>)
    if (stride == 1) return p;
  load(p, stride, n, buf);
  return buf;
}

// Where to compute n outputs for p: p itself where it is a contiguous C array, else buf
// (then finish() writes buf out).
template <class T, class C>
inline C* target(T* p, index_t stride, C* buf) {
  if constexpr (std::is_same_v<T, C>)
    if (stride == 1) return p;
  return buf;
}
template <class T, class C>
inline void finish(const C* computed, T* p, index_t stride, index_t n) {
  if constexpr (std::is_same_v<T, C>)
    if (stride == 1) return;
  store(computed, p, stride, n);
}

// Copies `bytes` bytes to dst with non-temporal stores for the vector-aligned body (the
// edges with ordinary stores). Ends with no fence: the kernel calls end_stream() once.
inline void stream_bytes(const void* src, void* dst, std::size_t bytes) {
  auto* d = static_cast<char*>(dst);
  const auto* s = static_cast<const char*>(src);
#if BATCHNORM_KERNEL_SIMD == 512
  constexpr std::size_t V = 64;
#elif BATCHNORM_KERNEL_SIMD == 256
  constexpr std::size_t V = 32;
#elif defined(__SSE2__)
  constexpr std::size_t V = 16;
#else
  constexpr std::size_t V = 0;
#endif
  std::size_t i = 0;
  if constexpr (V > 0) {
    i = std::min(bytes, (V - reinterpret_cast<std::uintptr_t>(d) % V) % V);
    std::memcpy(d, s, i);
    for (; i + V <= bytes; i += V) {
#if BATCHNORM_KERNEL_SIMD == 512
      _mm512_stream_si512(reinterpret_cast<__m512i*>(d + i), _mm512_loadu_si512(s + i));
#elif BATCHNORM_KERNEL_SIMD == 256
      _mm256_stream_si256(reinterpret_cast<__m256i*>(d + i),
                          _mm256_loadu_si256(reinterpret_cast<const __m256i*>(s + i)));
#elif defined(__SSE2__)
      _mm_stream_si128(reinterpret_cast<__m128i*>(d + i), _mm_loadu_si128(reinterpret_cast<const __m128i*>(s + i)));
#endif
    }
  }
  std::memcpy(d + i, s + i, bytes - i);
}

// Makes the non-temporal stores of this thread visible before anything that follows.
inline void end_stream() {
#if defined(__SSE2__) || BATCHNORM_KERNEL_SIMD
  _mm_sfence();
#endif
}

// Writes n computed values to contiguous p with non-temporal stores.
template <class T, class C>
inline void stream_out(const C* computed, T* p, index_t n) {
  const auto bytes = static_cast<std::size_t>(n) * sizeof(T);
  if constexpr (std::is_same_v<T, C>) {
    stream_bytes(computed, p, bytes);
  } else {
    T converted[kBlock];
    store(computed, converted, 1, n);
    stream_bytes(converted, p, bytes);
  }
}

// Where to compute outputs and how to write them: streamed (through buf) for contiguous
// output when asked, else in place or through buf as target()/finish() decide.
template <class T, class C>
inline C* output_target(T* p, index_t stride, C* buf, bool stream) {
  return stream && stride == 1 ? buf : target(p, stride, buf);
}
template <class T, class C>
inline void output_finish(const C* computed, T* p, index_t stride, index_t n, bool stream) {
  if (stream && stride == 1)
    stream_out(computed, p, n);
  else
    finish(computed, p, stride, n);
}

// ---- the arithmetic, on contiguous compute arrays ------------------------------------

// a*(x - m) + b, rounded the same way everywhere it is computed (forward output, the
// backward's ReLU mask, scalar tails and vector bodies): one fused multiply-add where the
// instruction set has it, a multiply and an add where it does not.
inline float affine(float x, float a, float m, float b) {
#if BATCHNORM_KERNEL_FMA
  return __builtin_fmaf(a, x - m, b);
#else
  return a * (x - m) + b;
#endif
}
inline double affine(double x, double a, double m, double b) {
#if BATCHNORM_KERNEL_FMA
  return __builtin_fma(a, x - m, b);
#else
  return a * (x - m) + b;
#endif
}
template <class C>
inline C relu(C z) {
  return z < C(0) ? C(0) : z;  // NaN stays NaN, as IEEE max(z, 0) in PyTorch
}

// Lane accumulators reduced in a fixed pairwise order: the result depends only on the
// data, never on timing.
struct Lanes {
  double v[kLanes] = {};
  double total() {
    for (int w = kLanes / 2; w > 0; w /= 2)
      for (int j = 0; j < w; ++j) v[j] += v[j + w];
    return v[0];
  }
};

template <class C>
inline void reduce1_block_scalar(const C* x, index_t n, double m, double& s, double& ss) {
  Lanes ls, lss;
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double d = static_cast<double>(x[i + j]) - m;
      ls.v[j] += d;
      lss.v[j] += d * d;
    }
  for (int j = 0; i < n; ++i, ++j) {
    const double d = static_cast<double>(x[i]) - m;
    ls.v[j] += d;
    lss.v[j] += d * d;
  }
  s += ls.total();
  ss += lss.total();
}

template <class C, bool Relu>
inline double masked(C dy, C x, C a, C m, C b) {
  if constexpr (Relu) return affine(x, a, m, b) > C(0) ? static_cast<double>(dy) : 0.0;
  return static_cast<double>(dy);
}

template <class C, bool Relu>
inline void reduce2_block_scalar(const C* dy, const C* x, index_t n, C a, C m, C b, double& s, double& ss) {
  Lanes ls, lss;
  const double md = m;
  index_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) {
      const double g = masked<C, Relu>(dy[i + j], x[i + j], a, m, b);
      ls.v[j] += g;
      lss.v[j] += g * (static_cast<double>(x[i + j]) - md);
    }
  for (int j = 0; i < n; ++i, ++j) {
    const double g = masked<C, Relu>(dy[i], x[i], a, m, b);
    ls.v[j] += g;
    lss.v[j] += g * (static_cast<double>(x[i]) - md);
  }
  s += ls.total();
  ss += lss.total();
}

#if BATCHNORM_KERNEL_SIMD
// Hand-written bodies of the two channels-first reductions: GCC does not vectorize the
// float -> double lane accumulation on its own. W doubles per vector; vf holds W floats.
#if BATCHNORM_KERNEL_SIMD == 512
using vd = __m512d;
using vf = __m256;
constexpr int W = 8;
inline vd d_zero() { return _mm512_setzero_pd(); }
inline vd d_set(double a) { return _mm512_set1_pd(a); }
inline vd d_add(vd a, vd b) { return _mm512_add_pd(a, b); }
inline vd d_sub(vd a, vd b) { return _mm512_sub_pd(a, b); }
inline vd d_fma(vd a, vd b, vd c) { return _mm512_fmadd_pd(a, b, c); }
inline vd d_load(const double* p) { return _mm512_loadu_pd(p); }
inline vd d_from(vf f) { return _mm512_cvtps_pd(f); }
inline void d_store(double* p, vd v) { _mm512_storeu_pd(p, v); }
inline vd d_positive_and(vd z, vd g) {
  return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(z, _mm512_setzero_pd(), _CMP_GT_OQ), g);
}
inline vf f_load(const float* p) { return _mm256_loadu_ps(p); }
inline vf f_set(float a) { return _mm256_set1_ps(a); }
inline vf f_affine(vf x, vf a, vf m, vf b) { return _mm256_fmadd_ps(a, _mm256_sub_ps(x, m), b); }
inline vf f_positive_and(vf z, vf g) { return _mm256_and_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ), g); }
#else
using vd = __m256d;
using vf = __m128;
constexpr int W = 4;
inline vd d_zero() { return _mm256_setzero_pd(); }
inline vd d_set(double a) { return _mm256_set1_pd(a); }
inline vd d_add(vd a, vd b) { return _mm256_add_pd(a, b); }
inline vd d_sub(vd a, vd b) { return _mm256_sub_pd(a, b); }
inline vd d_fma(vd a, vd b, vd c) { return _mm256_fmadd_pd(a, b, c); }
inline vd d_load(const double* p) { return _mm256_loadu_pd(p); }
inline vd d_from(vf f) { return _mm256_cvtps_pd(f); }
inline void d_store(double* p, vd v) { _mm256_storeu_pd(p, v); }
inline vd d_positive_and(vd z, vd g) { return _mm256_and_pd(_mm256_cmp_pd(z, _mm256_setzero_pd(), _CMP_GT_OQ), g); }
inline vf f_load(const float* p) { return _mm_loadu_ps(p); }
inline vf f_set(float a) { return _mm_set1_ps(a); }
inline vf f_affine(vf x, vf a, vf m, vf b) { return _mm_fmadd_ps(a, _mm_sub_ps(x, m), b); }
inline vf f_positive_and(vf z, vf g) { return _mm_and_ps(_mm_cmp_ps(z, _mm_setzero_ps(), _CMP_GT_OQ), g); }
#endif

constexpr int kUnroll = 4;  // independent accumulators per sum: hides the add latency
static_assert(kUnroll * W <= kLanes * 2, "lane buffer too small");

// Spills vector accumulators into scalar lanes, where the tail continues and the fixed
// pairwise reduction ends.
struct VectorLanes {
  vd acc[kUnroll];
  VectorLanes() {
    for (vd& a : acc) a = d_zero();
  }
  double finish(double tail) {
    alignas(64) double lanes[kUnroll * W];
    for (int u = 0; u < kUnroll; ++u) d_store(lanes + u * W, acc[u]);
    for (int w = kUnroll * W / 2; w > 0; w /= 2)
      for (int j = 0; j < w; ++j) lanes[j] += lanes[j + w];
    return lanes[0] + tail;
  }
};

inline vd load_d(const float* p) { return d_from(f_load(p)); }
inline vd load_d(const double* p) { return d_load(p); }

template <class C>
inline void reduce1_block(const C* x, index_t n, double m, double& s, double& ss) {
  VectorLanes ls, lss;
  const vd vm = d_set(m);
  index_t i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W)
    for (int u = 0; u < kUnroll; ++u) {
      const vd d = d_sub(load_d(x + i + u * W), vm);
      ls.acc[u] = d_add(ls.acc[u], d);
      lss.acc[u] = d_fma(d, d, lss.acc[u]);
    }
  double ts = 0, tss = 0;
  reduce1_block_scalar(x + i, n - i, m, ts, tss);
  s += ls.finish(ts);
  ss += lss.finish(tss);
}

// dy masked by the ReLU of the pre-activation, as doubles.
template <bool Relu>
inline vd masked_d(const float* dy, const float* x, vf a, vf m, vf b) {
  vf g = f_load(dy);
  if constexpr (Relu) g = f_positive_and(f_affine(f_load(x), a, m, b), g);
  return d_from(g);
}
template <bool Relu>
inline vd masked_d(const double* dy, const double* x, vd a, vd m, vd b) {
  vd g = d_load(dy);
  if constexpr (Relu) g = d_positive_and(d_fma(a, d_sub(d_load(x), m), b), g);
  return g;
}
inline vf set_c(float v) { return f_set(v); }
inline vd set_c(double v) { return d_set(v); }

template <class C, bool Relu>
inline void reduce2_block(const C* dy, const C* x, index_t n, C a, C m, C b, double& s, double& ss) {
  VectorLanes ls, lss;
  const auto va = set_c(a), vm = set_c(m), vb = set_c(b);
  const vd md = d_set(m);
  index_t i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W)
    for (int u = 0; u < kUnroll; ++u) {
      const index_t k = i + u * W;
      const vd g = masked_d<Relu>(dy + k, x + k, va, vm, vb);
      ls.acc[u] = d_add(ls.acc[u], g);
      lss.acc[u] = d_fma(g, d_sub(load_d(x + k), md), lss.acc[u]);
    }
  double ts = 0, tss = 0;
  reduce2_block_scalar<C, Relu>(dy + i, x + i, n - i, a, m, b, ts, tss);
  s += ls.finish(ts);
  ss += lss.finish(tss);
}
#else
template <class C>
inline void reduce1_block(const C* x, index_t n, double m, double& s, double& ss) {
  reduce1_block_scalar(x, n, m, s, ss);
}
template <class C, bool Relu>
inline void reduce2_block(const C* dy, const C* x, index_t n, C a, C m, C b, double& s, double& ss) {
  reduce2_block_scalar<C, Relu>(dy, x, n, a, m, b, s, ss);
}
#endif

template <class C, bool Relu>
inline void affine1_block(const C* x, C* y, index_t n, C a, C m, C b) {
  for (index_t i = 0; i < n; ++i) {
    const C z = affine(x[i], a, m, b);
    y[i] = Relu ? relu(z) : z;
  }
}

template <class C, bool Relu>
inline void affine2_block(const C* dy, const C* x, C* dx, index_t n, const Coefs<C>& k) {
  const C k1 = *k.k1, k2 = *k.k2, k3 = *k.k3, m = *k.m;
  for (index_t i = 0; i < n; ++i) {
    C g = dy[i];
    if constexpr (Relu) g = affine(x[i], *k.a, m, *k.b) > C(0) ? g : C(0);
    dx[i] = k1 * g + k2 * (x[i] - m) + k3;
  }
}

// Per-channel (rows) versions: channel c uses coefficient [c] and accumulator [c].
template <class C>
inline void reduce1_channels(const C* x, index_t n, const C* m, double* s, double* ss) {
  for (index_t c = 0; c < n; ++c) {
    const double d = static_cast<double>(x[c]) - static_cast<double>(m[c]);
    s[c] += d;
    ss[c] += d * d;
  }
}

template <class C, bool Relu>
inline void reduce2_channels(const C* dy, const C* x, index_t n, const Coefs<C>& k, double* s, double* ss) {
  for (index_t c = 0; c < n; ++c) {
    double g = dy[c];  // a and b exist only with the ReLU
    if constexpr (Relu) g = masked<C, Relu>(dy[c], x[c], k.a[c], k.m[c], k.b[c]);
    s[c] += g;
    ss[c] += g * (static_cast<double>(x[c]) - static_cast<double>(k.m[c]));
  }
}

template <class C, bool Relu>
inline void affine1_channels(const C* x, C* y, index_t n, const Coefs<C>& k) {
  for (index_t c = 0; c < n; ++c) {
    const C z = affine(x[c], k.a[c], k.m[c], k.b[c]);
    y[c] = Relu ? relu(z) : z;
  }
}

template <class C, bool Relu>
inline void affine2_channels(const C* dy, const C* x, C* dx, index_t n, const Coefs<C>& k) {
  for (index_t c = 0; c < n; ++c) {
    C g = dy[c];
    if constexpr (Relu) g = affine(x[c], k.a[c], k.m[c], k.b[c]) > C(0) ? g : C(0);
    dx[c] = k.k1[c] * g + k.k2[c] * (x[c] - k.m[c]) + k.k3[c];
  }
}

template <class C>
inline const C* at(const C* p, index_t c) {
  return p ? p + c : p;
}
template <class C>
inline Coefs<C> shifted(const Coefs<C>& k, index_t c) {
  return {at(k.a, c), at(k.m, c), at(k.b, c), at(k.k1, c), at(k.k2, c), at(k.k3, c)};
}

// ---- the table entries ----------------------------------------------------------------

template <class T>
void reduce1_rows(Strided<const T> x, index_t rows, index_t channels, Coefs<compute_t<T>> k, double* s, double* ss) {
  using C = compute_t<T>;
  C buf[kBlock];
  for (index_t r = 0; r < rows; ++r)
    for (index_t c0 = 0; c0 < channels; c0 += kBlock) {
      const index_t n = std::min(kBlock, channels - c0);
      reduce1_channels(view(x.p + r * x.stride + c0, 1, n, buf), n, k.m + c0, s + c0, ss + c0);
    }
}

template <class T>
void reduce1_run(Strided<const T> x, index_t n, Coefs<compute_t<T>> k, double* s, double* ss) {
  using C = compute_t<T>;
  C buf[kBlock];
  for (index_t i = 0; i < n; i += kBlock) {
    const index_t len = std::min(kBlock, n - i);
    reduce1_block(view(x.p + i * x.stride, x.stride, len, buf), len, static_cast<double>(*k.m), *s, *ss);
  }
}

template <class T>
void affine1_rows(Strided<const T> x, Strided<T> y, index_t rows, index_t channels, Coefs<compute_t<T>> k, bool relu_on,
                  bool stream) {
  using C = compute_t<T>;
  C xbuf[kBlock], ybuf[kBlock];
  for (index_t r = 0; r < rows; ++r)
    for (index_t c0 = 0; c0 < channels; c0 += kBlock) {
      const index_t n = std::min(kBlock, channels - c0);
      const C* xs = view(x.p + r * x.stride + c0, 1, n, xbuf);
      T* yp = y.p + r * y.stride + c0;
      C* ys = output_target(yp, 1, ybuf, stream);
      const Coefs<C> kc = shifted(k, c0);
      relu_on ? affine1_channels<C, true>(xs, ys, n, kc) : affine1_channels<C, false>(xs, ys, n, kc);
      output_finish(ys, yp, 1, n, stream);
    }
  if (stream) end_stream();
}

template <class T>
void affine1_run(Strided<const T> x, Strided<T> y, index_t n, Coefs<compute_t<T>> k, bool relu_on, bool stream) {
  using C = compute_t<T>;
  C xbuf[kBlock], ybuf[kBlock];
  for (index_t i = 0; i < n; i += kBlock) {
    const index_t len = std::min(kBlock, n - i);
    const C* xs = view(x.p + i * x.stride, x.stride, len, xbuf);
    T* yp = y.p + i * y.stride;
    C* ys = output_target(yp, y.stride, ybuf, stream);
    relu_on ? affine1_block<C, true>(xs, ys, len, *k.a, *k.m, *k.b)
            : affine1_block<C, false>(xs, ys, len, *k.a, *k.m, *k.b);
    output_finish(ys, yp, y.stride, len, stream);
  }
  if (stream) end_stream();
}

template <class T>
void reduce2_rows(Strided<const T> dy, Strided<const T> x, index_t rows, index_t channels, Coefs<compute_t<T>> k,
                  bool relu_on, double* s, double* ss) {
  using C = compute_t<T>;
  C dbuf[kBlock], xbuf[kBlock];
  for (index_t r = 0; r < rows; ++r)
    for (index_t c0 = 0; c0 < channels; c0 += kBlock) {
      const index_t n = std::min(kBlock, channels - c0);
      const C* ds = view(dy.p + r * dy.stride + c0, 1, n, dbuf);
      const C* xs = view(x.p + r * x.stride + c0, 1, n, xbuf);
      const Coefs<C> kc = shifted(k, c0);
      relu_on ? reduce2_channels<C, true>(ds, xs, n, kc, s + c0, ss + c0)
              : reduce2_channels<C, false>(ds, xs, n, kc, s + c0, ss + c0);
    }
}

template <class T>
void reduce2_run(Strided<const T> dy, Strided<const T> x, index_t n, Coefs<compute_t<T>> k, bool relu_on, double* s,
                 double* ss) {
  using C = compute_t<T>;
  C dbuf[kBlock], xbuf[kBlock];
  for (index_t i = 0; i < n; i += kBlock) {
    const index_t len = std::min(kBlock, n - i);
    const C* ds = view(dy.p + i * dy.stride, dy.stride, len, dbuf);
    const C* xs = view(x.p + i * x.stride, x.stride, len, xbuf);
    if (relu_on)  // a and b exist only with the ReLU
      reduce2_block<C, true>(ds, xs, len, *k.a, *k.m, *k.b, *s, *ss);
    else
      reduce2_block<C, false>(ds, xs, len, C(1), *k.m, C(0), *s, *ss);
  }
}

template <class T>
void affine2_rows(Strided<const T> dy, Strided<const T> x, Strided<T> dx, index_t rows, index_t channels,
                  Coefs<compute_t<T>> k, bool relu_on, bool stream) {
  using C = compute_t<T>;
  C dbuf[kBlock], xbuf[kBlock], obuf[kBlock];
  for (index_t r = 0; r < rows; ++r)
    for (index_t c0 = 0; c0 < channels; c0 += kBlock) {
      const index_t n = std::min(kBlock, channels - c0);
      const C* ds = view(dy.p + r * dy.stride + c0, 1, n, dbuf);
      const C* xs = view(x.p + r * x.stride + c0, 1, n, xbuf);
      T* op = dx.p + r * dx.stride + c0;
      C* os = output_target(op, 1, obuf, stream);
      const Coefs<C> kc = shifted(k, c0);
      relu_on ? affine2_channels<C, true>(ds, xs, os, n, kc) : affine2_channels<C, false>(ds, xs, os, n, kc);
      output_finish(os, op, 1, n, stream);
    }
  if (stream) end_stream();
}

template <class T>
void affine2_run(Strided<const T> dy, Strided<const T> x, Strided<T> dx, index_t n, Coefs<compute_t<T>> k, bool relu_on,
                 bool stream) {
  using C = compute_t<T>;
  C dbuf[kBlock], xbuf[kBlock], obuf[kBlock];
  for (index_t i = 0; i < n; i += kBlock) {
    const index_t len = std::min(kBlock, n - i);
    const C* ds = view(dy.p + i * dy.stride, dy.stride, len, dbuf);
    const C* xs = view(x.p + i * x.stride, x.stride, len, xbuf);
    T* op = dx.p + i * dx.stride;
    C* os = output_target(op, dx.stride, obuf, stream);
    relu_on ? affine2_block<C, true>(ds, xs, os, len, k) : affine2_block<C, false>(ds, xs, os, len, k);
    output_finish(os, op, dx.stride, len, stream);
  }
  if (stream) end_stream();
}

template <class T>
KernelTable<T> make_table() {
  return {&reduce1_rows<T>, &reduce1_run<T>, &affine1_rows<T>, &affine1_run<T>,
          &reduce2_rows<T>, &reduce2_run<T>, &affine2_rows<T>, &affine2_run<T>};
}

const Tables* tables() {
  static const Tables t{BATCHNORM_KERNEL_ISA, make_table<float>(), make_table<double>(), make_table<float16_t>(),
                        make_table<bfloat16_t>()};
  return &t;
}
