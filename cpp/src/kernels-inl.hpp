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
// Structure, two layers:
//  - Register paths (the "direct", "tiles" and "runs" functions) for the common case:
//    float, float16 and bfloat16 (compute type float) in contiguous runs or rows. They
//    load, convert, compute, convert and store in registers, stream large outputs with
//    non-temporal stores, and handle run edges with masked vectors on AVX-512.
//  - General loops for everything else (double, strided runs, scalar edges): they work on
//    contiguous arrays of the compute type C, using data in place where it already is
//    one and otherwise converting block by block through a small stack buffer.
// Both round every expression the same way (madd, affine, apply2), so results do not
// depend on which layer, vector body or scalar edge computed an element.

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
  for (; i < n; ++i) out[i] = _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p[i * stride].bits)));
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
  for (; i < n; ++i)
    p[i * stride].bits =
        static_cast<std::uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(in[i]), _MM_FROUND_TO_NEAREST_INT), 0));
#endif
  for (; i < n; ++i) p[i * stride].bits = float16_t::from_float(in[i]);
}

// One element in and out of the compute type, as load()/store() convert it.
template <class T>
inline float to_compute(const T* p) {
  float v;
  load(p, 1, 1, &v);
  return v;
}
template <class T>
inline void from_compute(float v, T* p) {
  store(&v, p, 1, 1);
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

// Prefetches the line of p (into L2 and closer), for a pass that reads it later.
inline void prefetch(const void* p) {
#if BATCHNORM_KERNEL_SIMD
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
  (void)p;
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

// a*b + c: one fused multiply-add where the instruction set has it, a multiply and an add
// where it does not. Every pass is written with it, so the rounding is the same everywhere
// an expression is computed (vector bodies, scalar edges, every code path).
inline float madd(float a, float b, float c) {
#if BATCHNORM_KERNEL_FMA
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
inline double madd(double a, double b, double c) {
#if BATCHNORM_KERNEL_FMA
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}

// a*(x - m) + b: the forward output and the backward's ReLU mask (bit for bit the same).
template <class C>
inline C affine(C x, C a, C m, C b) {
  return madd(a, x - m, b);
}

// dx = k1*g + k2*(x - m) + k3, as madd(k1, g, madd(k2, x - m, k3)).
template <class C>
inline C apply2(C g, C xc, C k1, C k2, C k3) {
  return madd(k1, g, madd(k2, xc, k3));
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
inline vf f_load(const float16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vf f_load(const bfloat16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
// The first n < W elements as floats, zeros after (masked loads touch no other memory).
inline __mmask8 first_lanes(index_t n) { return static_cast<__mmask8>((1u << n) - 1u); }
inline vf f_load_first(const float* p, __mmask8 k) { return _mm256_maskz_loadu_ps(k, p); }
inline vf f_load_first(const float16_t* p, __mmask8 k) { return _mm256_cvtph_ps(_mm_maskz_loadu_epi16(k, p)); }
inline vf f_load_first(const bfloat16_t* p, __mmask8 k) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(k, p)), 16));
}
inline vd d_sub_first(__mmask8 k, vd a, vd b) { return _mm512_maskz_sub_pd(k, a, b); }
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
inline vf f_load(const float16_t* p) { return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))); }
inline vf f_load(const bfloat16_t* p) {
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16));
}
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
  // The pairwise order of Lanes::total over the kUnroll*W lanes (halves added, then
  // halves of the halves), done in registers: short runs finish once per run.
  double finish(double tail) {
    static_assert(kUnroll == 4, "the pairing below is written for four accumulators");
    const vd v = d_add(d_add(acc[0], acc[2]), d_add(acc[1], acc[3]));
#if BATCHNORM_KERNEL_SIMD == 512
    const __m256d h = _mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1));
#else
    const __m256d h = v;
#endif
    const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
    return (_mm_cvtsd_f64(q) + _mm_cvtsd_f64(_mm_unpackhi_pd(q, q))) + tail;
  }
};

// W elements as doubles (16-bit converted in registers); on AVX-512 also the first n < W.
template <class T>
inline vd load_d(const T* p) {
  if constexpr (std::is_same_v<T, double>)
    return d_load(p);
  else
    return d_from(f_load(p));
}
#if BATCHNORM_KERNEL_SIMD == 512
template <class T>
inline vd load_d_first(const T* p, __mmask8 k) {
  if constexpr (std::is_same_v<T, double>)
    return _mm512_maskz_loadu_pd(k, p);
  else
    return d_from(f_load_first(p, k));
}
#endif
template <class T>
inline double to_double(const T* p) {
  if constexpr (std::is_same_v<T, double>)
    return *p;
  else
    return static_cast<double>(to_compute(p));
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

// The two reductions straight from the element type (16-bit converted in registers), with
// the sums carried across the runs of one channel in Sums and reduced once at the end.
// With ahead != 0 the inputs are prefetched that many elements ahead as the run is read.
struct Sums {
  VectorLanes s, ss;
  double ts = 0, tss = 0;  // scalar tails
  void add_to(double& out_s, double& out_ss) {
    out_s += s.finish(ts);
    out_ss += ss.finish(tss);
  }
};

template <class T>
inline void reduce1_direct(const T* x, index_t n, double m, Sums& a, index_t ahead) {
  const vd vm = d_set(m);
  index_t i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W) {
    if (ahead) prefetch(x + i + ahead), prefetch(x + i + ahead + kUnroll * W - 1);
    for (int u = 0; u < kUnroll; ++u) {
      const vd d = d_sub(load_d(x + i + u * W), vm);
      a.s.acc[u] = d_add(a.s.acc[u], d);
      a.ss.acc[u] = d_fma(d, d, a.ss.acc[u]);
    }
  }
  for (; i + W <= n; i += W) {
    const vd d = d_sub(load_d(x + i), vm);
    a.s.acc[0] = d_add(a.s.acc[0], d);
    a.ss.acc[0] = d_fma(d, d, a.ss.acc[0]);
  }
  if (i == n) return;
#if BATCHNORM_KERNEL_SIMD == 512
  const __mmask8 k = first_lanes(n - i);
  const vd d = d_sub_first(k, load_d_first(x + i, k), vm);
  a.s.acc[1] = d_add(a.s.acc[1], d);
  a.ss.acc[1] = d_fma(d, d, a.ss.acc[1]);
#else
  for (; i < n; ++i) {
    const double d = to_double(x + i) - m;
    a.ts += d;
    a.tss += d * d;
  }
#endif
}

// The general loops' reduce-1 over one block (float or double): the same sums, finished.
template <class C>
inline void reduce1_block(const C* x, index_t n, double m, double& s, double& ss) {
  Sums a;
  reduce1_direct(x, n, m, a, 0);
  a.add_to(s, ss);
}

template <class T, bool Relu>
inline void reduce2_direct(const T* dy, const T* x, index_t n, float a, float m, float b, Sums& sums, index_t ahead) {
  const vf va = f_set(a), vm = f_set(m), vb = f_set(b);
  const vd md = d_set(m);
  auto step = [&](vf dyv, vf xv, int u) {
    vf g = dyv;
    if constexpr (Relu) g = f_positive_and(f_affine(xv, va, vm, vb), g);
    const vd gd = d_from(g);
    sums.s.acc[u] = d_add(sums.s.acc[u], gd);
    sums.ss.acc[u] = d_fma(gd, d_sub(d_from(xv), md), sums.ss.acc[u]);
  };
  index_t i = 0;
  for (; i + kUnroll * W <= n; i += kUnroll * W) {
    if (ahead) {
      prefetch(x + i + ahead), prefetch(x + i + ahead + kUnroll * W - 1);
      prefetch(dy + i + ahead), prefetch(dy + i + ahead + kUnroll * W - 1);
    }
    for (int u = 0; u < kUnroll; ++u) step(f_load(dy + i + u * W), f_load(x + i + u * W), u);
  }
  for (; i + W <= n; i += W) step(f_load(dy + i), f_load(x + i), 0);
  if (i == n) return;
#if BATCHNORM_KERNEL_SIMD == 512
  const __mmask8 k = first_lanes(n - i);  // dy = 0 in the lanes past the end: they add nothing
  step(f_load_first(dy + i, k), f_load_first(x + i, k), 1);
#else
  for (; i < n; ++i) {
    const float xv = to_compute(x + i);
    const double g = masked<float, Relu>(to_compute(dy + i), xv, a, m, b);
    sums.ts += g;
    sums.tss += g * (static_cast<double>(xv) - static_cast<double>(m));
  }
#endif
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

// ---- direct vector elementwise passes (float compute: float, float16, bfloat16) --------
// The affine passes over contiguous data load, convert, compute, convert and store in
// registers, with no staging buffer, and write streamed output with non-temporal stores
// straight from registers (after a scalar head that aligns the output to 64 bytes).
// Every element is computed by the same sequence of roundings as the scalar functions
// above (affine(), relu(), apply2()), so vector body and scalar edges agree.
// The baseline build runs the same loops with one float per "vector".
#if BATCHNORM_KERNEL_SIMD == 512
using vF = __m512;
constexpr index_t kVF = 16;  // floats per vector
inline vF vf_set(float a) { return _mm512_set1_ps(a); }
inline vF vf_loadu(const float* p) { return _mm512_loadu_ps(p); }
inline vF vf_load(const float* p) { return _mm512_loadu_ps(p); }
inline vF vf_load(const float16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline vF vf_load(const bfloat16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline vF vf_sub(vF a, vF b) { return _mm512_sub_ps(a, b); }
inline vF vf_fma(vF a, vF b, vF c) { return _mm512_fmadd_ps(a, b, c); }
inline vF vf_relu(vF z) { return _mm512_max_ps(_mm512_setzero_ps(), z); }  // (0 > z) ? 0 : z, as relu()
inline vF vf_where_positive(vF z, vF g) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ), g);
}
inline __m256i vf_to_half(vF v) {  // the maskz form: the plain one is a macro with a bare -1 mask at -O0
  return _mm512_maskz_cvtps_ph(static_cast<__mmask16>(0xffff), v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m256i vf_to_bfloat(vF v) {
  const __m512i u = _mm512_castps_si512(v);
  const __m512i one = _mm512_set1_epi32(1);
  const __m512i rounded = _mm512_srli_epi32(
      _mm512_add_epi32(u, _mm512_add_epi32(_mm512_set1_epi32(0x7fff), _mm512_and_si512(_mm512_srli_epi32(u, 16), one))),
      16);
  const __mmask16 nan =
      _mm512_cmpgt_epu32_mask(_mm512_and_si512(u, _mm512_set1_epi32(0x7fffffff)), _mm512_set1_epi32(0x7f800000));
  const __m512i quiet = _mm512_or_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(0x40));
  return _mm512_cvtepi32_epi16(_mm512_mask_mov_epi32(rounded, nan, quiet));
}
template <bool Stream>
inline void vf_store(float* p, vF v) {
  Stream ? _mm512_stream_ps(p, v) : _mm512_storeu_ps(p, v);
}
template <bool Stream>
inline void vh_store(void* p, __m256i h) {
  Stream ? _mm256_stream_si256(static_cast<__m256i*>(p), h) : _mm256_storeu_si256(static_cast<__m256i*>(p), h);
}
// The first n < kVF elements (masked: nothing past them is read or written).
inline __mmask16 first_floats(index_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline vF vf_load_first(const float* p, __mmask16 k) { return _mm512_maskz_loadu_ps(k, p); }
inline vF vf_load_first(const float16_t* p, __mmask16 k) { return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p)); }
inline vF vf_load_first(const bfloat16_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}
inline void vf_store_first(float* p, vF v, __mmask16 k) { _mm512_mask_storeu_ps(p, k, v); }
inline void vf_store_first(float16_t* p, vF v, __mmask16 k) { _mm256_mask_storeu_epi16(p, k, vf_to_half(v)); }
inline void vf_store_first(bfloat16_t* p, vF v, __mmask16 k) { _mm256_mask_storeu_epi16(p, k, vf_to_bfloat(v)); }
#elif BATCHNORM_KERNEL_SIMD == 256
using vF = __m256;
constexpr index_t kVF = 8;
inline vF vf_set(float a) { return _mm256_set1_ps(a); }
inline vF vf_loadu(const float* p) { return _mm256_loadu_ps(p); }
inline vF vf_load(const float* p) { return _mm256_loadu_ps(p); }
inline vF vf_load(const float16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline vF vf_load(const bfloat16_t* p) {
  const __m256i u = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
}
inline vF vf_sub(vF a, vF b) { return _mm256_sub_ps(a, b); }
inline vF vf_fma(vF a, vF b, vF c) { return _mm256_fmadd_ps(a, b, c); }
inline vF vf_relu(vF z) { return _mm256_max_ps(_mm256_setzero_ps(), z); }
inline vF vf_where_positive(vF z, vF g) { return _mm256_and_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ), g); }
inline __m128i vf_to_half(vF v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m128i vf_to_bfloat(vF v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i rounded = _mm256_srli_epi32(
      _mm256_add_epi32(u, _mm256_add_epi32(_mm256_set1_epi32(0x7fff),
                                           _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)))),
      16);
  const __m256i nan =
      _mm256_cmpgt_epi32(_mm256_and_si256(u, _mm256_set1_epi32(0x7fffffff)), _mm256_set1_epi32(0x7f800000));
  const __m256i quiet = _mm256_or_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(0x40));
  const __m256i r = _mm256_blendv_epi8(rounded, quiet, nan);
  return _mm256_castsi256_si128(_mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0x08));
}
template <bool Stream>
inline void vf_store(float* p, vF v) {
  Stream ? _mm256_stream_ps(p, v) : _mm256_storeu_ps(p, v);
}
template <bool Stream>
inline void vh_store(void* p, __m128i h) {
  Stream ? _mm_stream_si128(static_cast<__m128i*>(p), h) : _mm_storeu_si128(static_cast<__m128i*>(p), h);
}
#endif
#if BATCHNORM_KERNEL_SIMD
template <bool Stream>
inline void vf_store(float16_t* p, vF v) {
  vh_store<Stream>(p, vf_to_half(v));
}
template <bool Stream>
inline void vf_store(bfloat16_t* p, vF v) {
  vh_store<Stream>(p, vf_to_bfloat(v));
}
#else
using vF = float;
constexpr index_t kVF = 1;
inline vF vf_set(float a) { return a; }
inline vF vf_loadu(const float* p) { return *p; }
template <class T>
inline vF vf_load(const T* p) {
  return to_compute(p);
}
inline vF vf_sub(vF a, vF b) { return a - b; }
inline vF vf_fma(vF a, vF b, vF c) { return a * b + c; }  // as affine() without FMA
inline vF vf_relu(vF z) { return relu(z); }
inline vF vf_where_positive(vF z, vF g) { return z > 0.0f ? g : 0.0f; }
template <bool Stream, class T>
inline void vf_store(T* p, vF v) {
  from_compute(v, p);
}
#endif

// Vector forms of affine() and of dx = apply2(g, x - m, k1, k2, k3): the same operations in
// the same order, so a vector body's values equal the scalar edges' bit for bit.
inline vF vf_affine(vF x, vF a, vF m, vF b) { return vf_fma(a, vf_sub(x, m), b); }

// dx of one vector, g = dy masked by the ReLU of affine(x).
template <bool Relu>
inline vF vf_dx(vF dy, vF x, vF a, vF m, vF b, vF k1, vF k2, vF k3) {
  if constexpr (Relu) dy = vf_where_positive(vf_affine(x, a, m, b), dy);
  return vf_fma(k1, dy, vf_fma(k2, vf_sub(x, m), k3));
}

// Elements before p is on a 64-byte boundary, or -1 if it never is (p not T-aligned).
template <class T>
inline index_t line_head(const T* p) {
  const auto misalign = reinterpret_cast<std::uintptr_t>(p) % 64;
  return misalign % sizeof(T) != 0 ? -1 : static_cast<index_t>((64 - misalign) % 64 / sizeof(T));
}

// Elements before p is aligned to 64 bytes (at most n): the scalar head of a streamed pass.
template <class T>
inline index_t unaligned_head(const T* p, index_t n) {
  const index_t head = line_head(p);
  return head < 0 ? n : std::min(n, head);  // never aligned: all scalar, ordinary stores
}

// Per-channel coefficients of a row-periodic pass writing `out` (from channel 0), extended
// so that a vector starting at channel c reads coefficient (c + j) mod channels at lane j.
//
// Phase: the arrays start where, in a cache line, the vector loop's first coefficient load
// falls when its output positions are whole lines (after the scalar head that aligns a
// streamed output; at channel 0 otherwise), so those loads are whole lines too: a load that
// straddles two lines costs two L1 accesses, and a pass over memory has few to spare. One
// thread, 12.8 MB of float32 channels last, ordinary stores (x and y 16 bytes past a line,
// as NumPy allocates them): inference with C = 256 took 0.66-0.68 ms against 0.78-0.81 with
// straddling loads, C = 1024 0.65-0.66 against 0.70-0.71 (the channels-first pass of the
// same bytes: 0.66-0.71); backward with C = 256 1.64-1.65 against 1.92-1.96. From C = 2048
// on, the arrays crowd L1 and alignment no longer matters.
//
// Extension: a vector starts at a channel c < channels, or, where row groups start at the
// head that aligns a streamed output (group_shift), up to 64 / sizeof(T) - 1 channels past
// a row, so each array holds channels + max(kVF, 64 / sizeof(T)) values. (No more than
// needed: with 32 more, (256, 4096) training forward in cache took 323-327 us against 304.)
struct PeriodicCoefs {
  std::vector<float> v;
  std::size_t first = 0, stride = 0;  // in floats: the start of array 0, and from one array to the next
  template <class T>
  PeriodicCoefs(std::initializer_list<const float*> arrays, index_t channels, const T* out, bool stream) {
    constexpr std::size_t line = 64 / sizeof(float);
    const index_t head = stream ? line_head(out) : 0;
    const std::size_t phase = head > 0 ? (64 - static_cast<std::size_t>(head) * sizeof(float) % 64) % 64 : 0;
    const auto len = static_cast<std::size_t>(channels + std::max<index_t>(kVF, 64 / sizeof(T)));
    stride = (len + line - 1) / line * line;
    v.resize(stride * arrays.size() + line);
    const auto addr = reinterpret_cast<std::uintptr_t>(v.data());  // float-aligned
    first = (phase + 64 - addr % 64) % 64 / sizeof(float);
    float* dst = v.data() + first;
    for (const float* a : arrays) {  // a[0..channels) repeated (no division per value: C = 4096 is common)
      for (std::size_t j = 0; j < len; j += static_cast<std::size_t>(channels))
        std::copy_n(a, std::min(static_cast<std::size_t>(channels), len - j), dst + j);
      dst += stride;
    }
  }
  const float* operator[](std::size_t i) const { return v.data() + first + i * stride; }
};

// End of the streamed part of [i, n) when i is 64-byte aligned: whole cache lines only. A
// line written partly by streaming and partly by ordinary stores (a 16-bit vector is half
// a line) costs a partial write-combining flush and a read for ownership: float16 runs of
// 1568 bytes ran at 0.2-0.35 of the copy limit that way, 0.8 without.
template <class T>
inline index_t whole_lines_end(index_t i, index_t n) {
  constexpr index_t line = 64 / static_cast<index_t>(sizeof(T));
  return i + (n - i) / line * line;
}

// y = act(a*(x - m) + b) over n contiguous values that start at channel first_channel of
// rows of `period` channels (period 0: one channel, scalar coefficients). Coefficient
// vectors: lane j of position i uses channel (c + j) mod period.
template <class T, bool Relu, bool Stream>
void affine1_direct(const T* x, T* y, index_t n, const float* const* k, index_t period, index_t ahead = 0,
                    index_t first_channel = 0) {
  index_t i = 0, c = first_channel;
  auto scalar = [&](index_t e) {
    for (; i < e; ++i) {
      const index_t ch = period ? c : 0;
      const float z = affine(to_compute(x + i), k[0][ch], k[1][ch], k[2][ch]);
      from_compute(Relu ? relu(z) : z, y + i);
      if (period && ++c == period) c = 0;
    }
  };
#if BATCHNORM_KERNEL_SIMD == 512
  // Runs: the elements before the aligned body, and after it, as masked vectors.
  auto masked = [&](index_t e) {
    const vF a = vf_set(k[0][0]), m = vf_set(k[1][0]), b = vf_set(k[2][0]);
    for (; i < e; i += std::min(kVF, e - i)) {
      const __mmask16 f = first_floats(std::min(kVF, e - i));
      const vF z = vf_affine(vf_load_first(x + i, f), a, m, b);
      vf_store_first(y + i, Relu ? vf_relu(z) : z, f);
    }
  };
  if (Stream && !period) masked(unaligned_head(y, n));
#endif
  if (Stream) scalar(unaligned_head(y, n));
  const index_t lines_end = Stream ? whole_lines_end<T>(i, n) : n;
  if (period) {
    auto loop = [&](auto streamed, index_t end) {
      for (; i + kVF <= end; i += kVF) {
        const vF z = vf_affine(vf_load(x + i), vf_loadu(k[0] + c), vf_loadu(k[1] + c), vf_loadu(k[2] + c));
        vf_store<streamed.value>(y + i, Relu ? vf_relu(z) : z);
        c += kVF;
        if (c >= period) c %= period;
      }
    };
    loop(std::bool_constant<Stream>{}, lines_end), loop(std::false_type{}, n);
  } else {
    const vF a = vf_set(k[0][0]), m = vf_set(k[1][0]), b = vf_set(k[2][0]);
    auto loop = [&](auto streamed, index_t end) {
      for (; i + kVF <= end; i += kVF) {
        if (ahead) prefetch(x + i + ahead);
        const vF z = vf_affine(vf_load(x + i), a, m, b);
        vf_store<streamed.value>(y + i, Relu ? vf_relu(z) : z);
      }
    };
    loop(std::bool_constant<Stream>{}, lines_end), loop(std::false_type{}, n);
#if BATCHNORM_KERNEL_SIMD == 512
    masked(n);
#endif
  }
  scalar(n);
}

// dx = apply2(g, x - m, k1, k2, k3), g = dy (masked by relu(a*(x - m) + b)); layout as affine1_direct.
// k: a, m, b, k1, k2, k3.
template <class T, bool Relu, bool Stream>
void affine2_direct(const T* dy, const T* x, T* dx, index_t n, const float* const* k, index_t period, index_t ahead = 0,
                    index_t first_channel = 0) {
  index_t i = 0, c = first_channel;
  auto scalar = [&](index_t e) {
    for (; i < e; ++i) {
      const index_t ch = period ? c : 0;
      const float xv = to_compute(x + i), m = k[1][ch];
      float g = to_compute(dy + i);
      if constexpr (Relu) g = affine(xv, k[0][ch], m, k[2][ch]) > 0.0f ? g : 0.0f;
      from_compute(apply2(g, xv - m, k[3][ch], k[4][ch], k[5][ch]), dx + i);
      if (period && ++c == period) c = 0;
    }
  };
  auto vec = [&](auto streamed, vF a, vF m, vF b, vF k1, vF k2, vF k3) {
    vf_store<streamed.value>(dx + i, vf_dx<Relu>(vf_load(dy + i), vf_load(x + i), a, m, b, k1, k2, k3));
  };
#if BATCHNORM_KERNEL_SIMD == 512
  // Runs: the elements before the aligned body, and after it, as masked vectors (dy = x = 0
  // in the lanes past them: finite).
  auto masked = [&](index_t e) {
    const vF a = Relu ? vf_set(k[0][0]) : vF{}, m = vf_set(k[1][0]), b = Relu ? vf_set(k[2][0]) : vF{};
    const vF k1 = vf_set(k[3][0]), k2 = vf_set(k[4][0]), k3 = vf_set(k[5][0]);
    for (; i < e; i += std::min(kVF, e - i)) {
      const __mmask16 f = first_floats(std::min(kVF, e - i));
      vf_store_first(dx + i, vf_dx<Relu>(vf_load_first(dy + i, f), vf_load_first(x + i, f), a, m, b, k1, k2, k3), f);
    }
  };
  if (Stream && !period) masked(unaligned_head(dx, n));
#endif
  if (Stream) scalar(unaligned_head(dx, n));
  const index_t lines_end = Stream ? whole_lines_end<T>(i, n) : n;
  if (period) {
    auto loop = [&](auto streamed, index_t end) {
      for (; i + kVF <= end; i += kVF) {
        vec(streamed, Relu ? vf_loadu(k[0] + c) : vF{}, vf_loadu(k[1] + c), Relu ? vf_loadu(k[2] + c) : vF{},
            vf_loadu(k[3] + c), vf_loadu(k[4] + c), vf_loadu(k[5] + c));
        c += kVF;
        if (c >= period) c %= period;
      }
    };
    loop(std::bool_constant<Stream>{}, lines_end), loop(std::false_type{}, n);
  } else {
    const vF a = Relu ? vf_set(k[0][0]) : vF{}, m = vf_set(k[1][0]), b = Relu ? vf_set(k[2][0]) : vF{};
    const vF k1 = vf_set(k[3][0]), k2 = vf_set(k[4][0]), k3 = vf_set(k[5][0]);
    auto loop = [&](auto streamed, index_t end) {
      for (; i + kVF <= end; i += kVF) {
        if (ahead) prefetch(x + i + ahead), prefetch(dy + i + ahead);
        vec(streamed, a, m, b, k1, k2, k3);
      }
    };
    loop(std::bool_constant<Stream>{}, lines_end), loop(std::false_type{}, n);
#if BATCHNORM_KERNEL_SIMD == 512
    masked(n);
#endif
  }
  scalar(n);
}

// Wide rows (channels last): once the coefficient arrays a pass reads per channel fill
// most of L1 (3 arrays for inference, 4 or 6 for backward; C = 4096 inference: 48 KiB),
// reloading them for every row makes them the larger part of the traffic (C = 4096, in
// cache: 50 us per 64 rows, 28 us with the coefficients in L1). Groups of kRowGroup rows
// then load each coefficient vector once for all of them (dense 256x4096, 2 threads:
// inference 0.45 -> 0.55-0.63 of the copy limit, backward 0.72-0.78 -> 0.98-1.02).
// Narrower rows keep the one stretch: grouped, r50-7-nhwc inference (C = 2048, 24 KiB of
// coefficients) took 0.78-0.87 ms against 0.52-0.60.
// Groups need whole vectors and, when streamed, group rows that start on a cache line and
// are whole lines (the streamed-store rule of whole_lines_end): rows a multiple of 64
// bytes long and apart, and an output that starts on a line, or, for one contiguous
// stretch, group rows shifted by the head that aligns it: a group row then runs from
// channel h of one row to channel h - 1 of the next. (NumPy puts large arrays 16 bytes
// past a line. Unshifted, such outputs took the one-stretch loop: (1024, 4096) float32
// inference at one thread 1.26 ms, against 0.81 ms for an aligned output in groups.)
constexpr index_t kRowGroup = 4;
constexpr std::size_t kRowGroupCoefBytes = 32 << 10;

// The channel h at which group rows start, or -1 for no groups.
template <class T>
inline index_t group_shift(index_t rows, index_t channels, int coef_arrays, bool stream, const T* out,
                           index_t out_stride, bool contiguous) {
  if (rows < kRowGroup || channels % kVF != 0) return -1;
  if (static_cast<std::size_t>(channels) * sizeof(float) * static_cast<std::size_t>(coef_arrays) < kRowGroupCoefBytes)
    return -1;
  if (!stream) return 0;
  const auto line = static_cast<index_t>(64 / sizeof(T));
  if (out_stride % line != 0 || channels % line != 0) return -1;
  const index_t head = line_head(out);
  return head == 0 || (head > 0 && contiguous) ? head : -1;
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
void affine1_row_group(const T* x, index_t xs, T* y, index_t ys, index_t channels, const float* const* k) {
  const float *const ka = k[0], *const km = k[1], *const kb = k[2];
  for (index_t c = 0; c < channels; c += kVF) {
    const vF a = vf_loadu(ka + c), m = vf_loadu(km + c), b = vf_loadu(kb + c);
    for (index_t r = 0; r < kRowGroup; ++r) {
      const vF z = vf_affine(vf_load(x + r * xs + c), a, m, b);
      vf_store<Stream>(y + r * ys + c, Relu ? vf_relu(z) : z);
    }
  }
}

template <class T, bool Relu, bool Stream>
void affine2_row_group(const T* dy, index_t ds, const T* x, index_t xs, T* dx, index_t os, index_t channels,
                       const float* const* k) {
  const float *const ka = k[0], *const km = k[1], *const kb = k[2];
  const float *const k1 = k[3], *const k2 = k[4], *const k3 = k[5];
  for (index_t c = 0; c < channels; c += kVF) {
    const vF a = Relu ? vf_loadu(ka + c) : vF{}, m = vf_loadu(km + c), b = Relu ? vf_loadu(kb + c) : vF{};
    const vF c1 = vf_loadu(k1 + c), c2 = vf_loadu(k2 + c), c3 = vf_loadu(k3 + c);
    for (index_t r = 0; r < kRowGroup; ++r)
      vf_store<Stream>(dx + r * os + c,
                       vf_dx<Relu>(vf_load(dy + r * ds + c), vf_load(x + r * xs + c), a, m, b, c1, c2, c3));
  }
}

template <class F>
inline void with_flags(bool relu_on, bool stream, const F& f) {
  if (relu_on)
    stream ? f(std::true_type{}, std::true_type{}) : f(std::true_type{}, std::false_type{});
  else
    stream ? f(std::false_type{}, std::true_type{}) : f(std::false_type{}, std::false_type{});
}

template <class T>
constexpr bool kDirect = !std::is_same_v<T, double>;

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
    dx[i] = apply2(g, x[i] - m, k1, k2, k3);
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
    dx[c] = apply2(g, x[c] - k.m[c], k.k1[c], k.k2[c], k.k3[c]);
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

#if BATCHNORM_KERNEL_SIMD
// Row tiles for the channels-last reductions: for each vector of kVF channels, the sums of
// kTileRows rows are kept in registers and added to the per-channel accumulators once per
// tile, instead of loading and storing the accumulators for every row. Channels past the
// last whole vector go through the scalar per-row loop.
constexpr index_t kTileRows = 4;
// Elements the row reductions prefetch ahead of their loads: the accumulator stores between
// the loads kept the hardware prefetcher behind (r50-7-nhwc moments at one thread: 1.29 ->
// 0.57 ms with 2048, 0.65 ms with 1024).
constexpr index_t kAheadRows = 2048;
// Rows per tile for `channels`: with many channels a tile's rows are far apart and their
// accumulators are few per row, so one row at a time (accumulators in L1) reads faster.
inline index_t tile_rows(index_t channels) { return channels <= 128 ? kTileRows : 1; }

inline void split(vF v, vd& lo, vd& hi) {
#if BATCHNORM_KERNEL_SIMD == 512
  lo = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  hi = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
#else
  lo = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  hi = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
#endif
}

// s[0..2W) += (s0, s1), ss[0..2W) += (q0, q1), all four loads before any store: s and ss
// are often a multiple of 4 KiB apart (per-thread partials of C channels), and a load
// behind a store to an address with the same low 12 bits waits for it (4K aliasing),
// which made the row reductions 2-3x slower at 512, 1024, 2048 and 4096 channels.
inline void add_sums(double* s, double* ss, vd s0, vd s1, vd q0, vd q1) {
  const vd a0 = d_load(s), a1 = d_load(s + W), b0 = d_load(ss), b1 = d_load(ss + W);
  d_store(s, d_add(a0, s0)), d_store(s + W, d_add(a1, s1));
  d_store(ss, d_add(b0, q0)), d_store(ss + W, d_add(b1, q1));
}

template <class T>
void reduce1_tiles(Strided<const T> x, index_t rows, index_t channels, const float* m, double* s, double* ss) {
  const index_t vec_channels = channels / kVF * kVF, tile = tile_rows(channels);
  for (index_t r0 = 0; r0 < rows; r0 += tile) {
    const index_t r1 = std::min(rows, r0 + tile);
    for (index_t c = 0; c < vec_channels; c += kVF) {
      vd m0, m1;
      split(vf_loadu(m + c), m0, m1);
      vd s0 = d_zero(), s1 = d_zero(), q0 = d_zero(), q1 = d_zero();
      for (index_t r = r0; r < r1; ++r) {
        vd v0, v1;
        prefetch(x.p + r * x.stride + c + kAheadRows);
        split(vf_load(x.p + r * x.stride + c), v0, v1);
        const vd d0 = d_sub(v0, m0), d1 = d_sub(v1, m1);
        s0 = d_add(s0, d0), s1 = d_add(s1, d1);
        q0 = d_fma(d0, d0, q0), q1 = d_fma(d1, d1, q1);
      }
      add_sums(s + c, ss + c, s0, s1, q0, q1);
    }
    for (index_t r = r0; r < r1 && vec_channels < channels; ++r)
      for (index_t c = vec_channels; c < channels; ++c) {
        const double d = static_cast<double>(to_compute(x.p + r * x.stride + c)) - static_cast<double>(m[c]);
        s[c] += d;
        ss[c] += d * d;
      }
  }
}

template <class T, bool Relu>
void reduce2_tiles(Strided<const T> dy, Strided<const T> x, index_t rows, index_t channels, const Coefs<float>& k,
                   double* s, double* ss) {
  const index_t vec_channels = channels / kVF * kVF, tile = tile_rows(channels);
  for (index_t r0 = 0; r0 < rows; r0 += tile) {
    const index_t r1 = std::min(rows, r0 + tile);
    for (index_t c = 0; c < vec_channels; c += kVF) {
      const vF mf = vf_loadu(k.m + c);
      const vF a = Relu ? vf_loadu(k.a + c) : mf, b = Relu ? vf_loadu(k.b + c) : mf;  // a, b only with the ReLU
      vd m0, m1;
      split(mf, m0, m1);
      vd s0 = d_zero(), s1 = d_zero(), q0 = d_zero(), q1 = d_zero();
      for (index_t r = r0; r < r1; ++r) {
        prefetch(x.p + r * x.stride + c + kAheadRows), prefetch(dy.p + r * dy.stride + c + kAheadRows);
        const vF xv = vf_load(x.p + r * x.stride + c);
        vF g = vf_load(dy.p + r * dy.stride + c);
        if constexpr (Relu) g = vf_where_positive(vf_affine(xv, a, mf, b), g);
        vd g0, g1, x0, x1;
        split(g, g0, g1), split(xv, x0, x1);
        s0 = d_add(s0, g0), s1 = d_add(s1, g1);
        q0 = d_fma(g0, d_sub(x0, m0), q0), q1 = d_fma(g1, d_sub(x1, m1), q1);
      }
      add_sums(s + c, ss + c, s0, s1, q0, q1);
    }
    for (index_t r = r0; r < r1 && vec_channels < channels; ++r)
      for (index_t c = vec_channels; c < channels; ++c) {
        const float xv = to_compute(x.p + r * x.stride + c);
        const double g = masked<float, Relu>(to_compute(dy.p + r * dy.stride + c), xv, Relu ? k.a[c] : 1.0f, k.m[c],
                                             Relu ? k.b[c] : 0.0f);
        s[c] += g;
        ss[c] += g * (static_cast<double>(xv) - static_cast<double>(k.m[c]));
      }
  }
}
#endif

template <class T>
void reduce1_rows(Strided<const T> x, index_t rows, index_t channels, Coefs<compute_t<T>> k, double* s, double* ss) {
  using C = compute_t<T>;
#if BATCHNORM_KERNEL_SIMD
  if constexpr (kDirect<T>) return reduce1_tiles(x, rows, channels, k.m, s, ss);
#endif
  C buf[kBlock];
  for_row_blocks(rows, channels, x.stride == channels, [&](index_t r, index_t nr, index_t c0, index_t n) {
    const C* xs = view(x.p + r * x.stride + c0, 1, nr * n, buf);
    for (index_t i = 0; i < nr; ++i) reduce1_channels(xs + i * n, n, k.m + c0, s + c0, ss + c0);
  });
}

template <class T>
void reduce1_runs(Strided<const T> x, index_t n, index_t count, index_t step, Coefs<compute_t<T>> k, double* s,
                  double* ss, index_t ahead);

template <class T>
void reduce1_run(Strided<const T> x, index_t n, Coefs<compute_t<T>> k, double* s, double* ss, index_t ahead) {
  using C = compute_t<T>;
  if (kDirect<T> && BATCHNORM_KERNEL_SIMD && x.stride == 1) return reduce1_runs<T>(x, n, 1, 0, k, s, ss, ahead);
  C buf[kBlock];
  for (index_t i = 0; i < n; i += kBlock) {
    const index_t len = std::min(kBlock, n - i);
    reduce1_block(view(x.p + i * x.stride, x.stride, len, buf), len, static_cast<double>(*k.m), *s, *ss);
  }
}

// Coefficient arrays of a direct pass (a missing one, unused, reads m instead).
inline std::array<const float*, 6> coef_arrays(const Coefs<float>& k) {
  auto or_m = [&](const float* p) { return p ? p : k.m; };
  return {or_m(k.a), k.m, or_m(k.b), or_m(k.k1), or_m(k.k2), or_m(k.k3)};
}

template <class T>
void affine1_rows(Strided<const T> x, Strided<T> y, index_t rows, index_t channels, Coefs<compute_t<T>> k, bool relu_on,
                  bool stream) {
  using C = compute_t<T>;
  if (rows <= 0 || channels <= 0) return;
  if constexpr (kDirect<T>) {
    const std::array<const float*, 6> ka = coef_arrays(k);
    const PeriodicCoefs pc({ka[0], ka[1], ka[2]}, channels, y.p, stream);
    const float* kk[3] = {pc[0], pc[1], pc[2]};
    with_flags(relu_on, stream, [&](auto r, auto st) {
      const bool contiguous = x.stride == channels && y.stride == channels;
      const index_t h = group_shift(rows, channels, 3, stream, y.p, y.stride, contiguous);
      const index_t g = std::max<index_t>(h, 0);  // the channel group rows start at
      const float* ks[3] = {kk[0] + g, kk[1] + g, kk[2] + g};
      drive_rows(
          rows, channels, h, contiguous,
          [&](index_t i) {
            affine1_row_group<T, r.value, st.value>(x.p + i * x.stride + g, x.stride, y.p + i * y.stride + g, y.stride,
                                                    channels, ks);
          },
          [&](index_t off, index_t n, index_t c) {
            affine1_direct<T, r.value, st.value>(x.p + off, y.p + off, n, kk, channels, 0, c);
          },
          [&](index_t i) {
            affine1_direct<T, r.value, st.value>(x.p + i * x.stride, y.p + i * y.stride, channels, kk, channels);
          });
    });
    if (stream) end_stream();
    return;
  }
  C xbuf[kBlock], ybuf[kBlock];
  const bool contiguous = x.stride == channels && y.stride == channels;
  for_row_blocks(rows, channels, contiguous, [&](index_t r, index_t nr, index_t c0, index_t n) {
    const C* xs = view(x.p + r * x.stride + c0, 1, nr * n, xbuf);
    T* yp = y.p + r * y.stride + c0;
    C* ys = output_target(yp, 1, ybuf, stream);
    const Coefs<C> kc = shifted(k, c0);
    for (index_t i = 0; i < nr; ++i)
      relu_on ? affine1_channels<C, true>(xs + i * n, ys + i * n, n, kc)
              : affine1_channels<C, false>(xs + i * n, ys + i * n, n, kc);
    output_finish(ys, yp, 1, nr * n, stream);
  });
  if (stream) end_stream();
}

template <class T>
void affine1_run(Strided<const T> x, Strided<T> y, index_t n, Coefs<compute_t<T>> k, bool relu_on, Output out) {
  using C = compute_t<T>;
  const bool stream = out.stream;
  if constexpr (kDirect<T>) {
    if (x.stride == 1 && y.stride == 1) {
      const std::array<const float*, 6> ka = coef_arrays(k);
      with_flags(relu_on, stream,
                 [&](auto r, auto st) { affine1_direct<T, r.value, st.value>(x.p, y.p, n, ka.data(), 0, out.ahead); });
      if (stream) end_stream();
      return;
    }
  }
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
#if BATCHNORM_KERNEL_SIMD
  if constexpr (kDirect<T>)
    return relu_on ? reduce2_tiles<T, true>(dy, x, rows, channels, k, s, ss)
                   : reduce2_tiles<T, false>(dy, x, rows, channels, k, s, ss);
#endif
  C dbuf[kBlock], xbuf[kBlock];
  const bool contiguous = x.stride == channels && dy.stride == channels;
  for_row_blocks(rows, channels, contiguous, [&](index_t r, index_t nr, index_t c0, index_t n) {
    const C* ds = view(dy.p + r * dy.stride + c0, 1, nr * n, dbuf);
    const C* xs = view(x.p + r * x.stride + c0, 1, nr * n, xbuf);
    const Coefs<C> kc = shifted(k, c0);
    for (index_t i = 0; i < nr; ++i)
      relu_on ? reduce2_channels<C, true>(ds + i * n, xs + i * n, n, kc, s + c0, ss + c0)
              : reduce2_channels<C, false>(ds + i * n, xs + i * n, n, kc, s + c0, ss + c0);
  });
}

template <class T>
void reduce2_runs(Strided<const T> dy, Strided<const T> x, index_t n, index_t count, index_t step,
                  Coefs<compute_t<T>> k, bool relu_on, double* s, double* ss, index_t ahead);

template <class T>
void reduce2_run(Strided<const T> dy, Strided<const T> x, index_t n, Coefs<compute_t<T>> k, bool relu_on, double* s,
                 double* ss, index_t ahead) {
  using C = compute_t<T>;
  if (kDirect<T> && BATCHNORM_KERNEL_SIMD && x.stride == 1 && dy.stride == 1)
    return reduce2_runs<T>(dy, x, n, 1, 0, k, relu_on, s, ss, ahead);
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
  if (rows <= 0 || channels <= 0) return;
  if constexpr (kDirect<T>) {
    const std::array<const float*, 6> ka = coef_arrays(k);
    const PeriodicCoefs pc({ka[0], ka[1], ka[2], ka[3], ka[4], ka[5]}, channels, dx.p, stream);
    const float* kk[6] = {pc[0], pc[1], pc[2], pc[3], pc[4], pc[5]};
    with_flags(relu_on, stream, [&](auto r, auto st) {
      const bool contiguous = x.stride == channels && dy.stride == channels && dx.stride == channels;
      const index_t h = group_shift(rows, channels, r.value ? 6 : 4, stream, dx.p, dx.stride, contiguous);
      const index_t g = std::max<index_t>(h, 0);
      const float* ks[6] = {kk[0] + g, kk[1] + g, kk[2] + g, kk[3] + g, kk[4] + g, kk[5] + g};
      drive_rows(
          rows, channels, h, contiguous,
          [&](index_t i) {
            affine2_row_group<T, r.value, st.value>(dy.p + i * dy.stride + g, dy.stride, x.p + i * x.stride + g,
                                                    x.stride, dx.p + i * dx.stride + g, dx.stride, channels, ks);
          },
          [&](index_t off, index_t n, index_t c) {
            affine2_direct<T, r.value, st.value>(dy.p + off, x.p + off, dx.p + off, n, kk, channels, 0, c);
          },
          [&](index_t i) {
            affine2_direct<T, r.value, st.value>(dy.p + i * dy.stride, x.p + i * x.stride, dx.p + i * dx.stride,
                                                 channels, kk, channels);
          });
    });
    if (stream) end_stream();
    return;
  }
  C dbuf[kBlock], xbuf[kBlock], obuf[kBlock];
  const bool contiguous = x.stride == channels && dy.stride == channels && dx.stride == channels;
  for_row_blocks(rows, channels, contiguous, [&](index_t r, index_t nr, index_t c0, index_t n) {
    const C* ds = view(dy.p + r * dy.stride + c0, 1, nr * n, dbuf);
    const C* xs = view(x.p + r * x.stride + c0, 1, nr * n, xbuf);
    T* op = dx.p + r * dx.stride + c0;
    C* os = output_target(op, 1, obuf, stream);
    const Coefs<C> kc = shifted(k, c0);
    for (index_t i = 0; i < nr; ++i)
      relu_on ? affine2_channels<C, true>(ds + i * n, xs + i * n, os + i * n, n, kc)
              : affine2_channels<C, false>(ds + i * n, xs + i * n, os + i * n, n, kc);
    output_finish(os, op, 1, nr * n, stream);
  });
  if (stream) end_stream();
}

template <class T>
void affine2_run(Strided<const T> dy, Strided<const T> x, Strided<T> dx, index_t n, Coefs<compute_t<T>> k, bool relu_on,
                 Output out) {
  using C = compute_t<T>;
  const bool stream = out.stream;
  if constexpr (kDirect<T>) {
    if (x.stride == 1 && dy.stride == 1 && dx.stride == 1) {
      const std::array<const float*, 6> ka = coef_arrays(k);
      with_flags(relu_on, stream, [&](auto r, auto st) {
        affine2_direct<T, r.value, st.value>(dy.p, x.p, dx.p, n, ka.data(), 0, out.ahead);
      });
      if (stream) end_stream();
      return;
    }
  }
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

// ---- runs: `count` runs of n contiguous values, run j at p + j*stride in every array.
// Run j uses the coefficients and accumulators of channel j*step: step 0 for the runs of
// one channel (sums carried across them, reduced once), step 1 for consecutive channels.

template <class T>
void reduce1_runs(Strided<const T> x, index_t n, index_t count, index_t step, Coefs<compute_t<T>> k, double* s,
                  double* ss, index_t ahead) {
#if BATCHNORM_KERNEL_SIMD
  if constexpr (kDirect<T>) {
    if (step) {  // one channel per run: fresh sums each run, which stay in registers
      for (index_t j = 0; j < count; ++j) {
        Sums sums;
        reduce1_direct(x.p + j * x.stride, n, static_cast<double>(k.m[j]), sums, ahead);
        sums.add_to(s[j], ss[j]);
      }
      return;
    }
    Sums sums;
    for (index_t j = 0; j < count; ++j) reduce1_direct(x.p + j * x.stride, n, static_cast<double>(*k.m), sums, ahead);
    sums.add_to(*s, *ss);
    return;
  }
#endif
  for (index_t j = 0; j < count; ++j)
    reduce1_run<T>({x.p + j * x.stride, 1}, n, shifted(k, j * step), s + j * step, ss + j * step, ahead);
}

template <class T>
void reduce2_runs(Strided<const T> dy, Strided<const T> x, index_t n, index_t count, index_t step,
                  Coefs<compute_t<T>> k, bool relu_on, double* s, double* ss, index_t ahead) {
#if BATCHNORM_KERNEL_SIMD
  if constexpr (kDirect<T>) {
    auto body = [&](auto relu) {
      auto run = [&](index_t j, Sums& sums) {
        const index_t c = j * step;
        const float a = relu.value ? k.a[c] : 1.0f, b = relu.value ? k.b[c] : 0.0f;  // a, b: only with the ReLU
        reduce2_direct<T, relu.value>(dy.p + j * dy.stride, x.p + j * x.stride, n, a, k.m[c], b, sums, ahead);
      };
      if (step) {  // as reduce1_runs
        for (index_t j = 0; j < count; ++j) {
          Sums sums;
          run(j, sums);
          sums.add_to(s[j], ss[j]);
        }
        return;
      }
      Sums sums;
      for (index_t j = 0; j < count; ++j) run(j, sums);
      sums.add_to(*s, *ss);
    };
    relu_on ? body(std::true_type{}) : body(std::false_type{});
    return;
  }
#endif
  for (index_t j = 0; j < count; ++j)
    reduce2_run<T>({dy.p + j * dy.stride, 1}, {x.p + j * x.stride, 1}, n, shifted(k, j * step), relu_on, s + j * step,
                   ss + j * step, ahead);
}

template <class T>
void affine1_runs(Strided<const T> x, Strided<T> y, index_t n, index_t count, index_t step, Coefs<compute_t<T>> k,
                  bool relu_on, Output out) {
  if constexpr (kDirect<T>) {
    with_flags(relu_on, out.stream, [&](auto r, auto st) {
      for (index_t j = 0; j < count; ++j) {
        const std::array<const float*, 6> ka = coef_arrays(shifted(k, j * step));
        affine1_direct<T, r.value, st.value>(x.p + j * x.stride, y.p + j * y.stride, n, ka.data(), 0, out.ahead);
      }
    });
    if (out.stream) end_stream();
    return;
  }
  for (index_t j = 0; j < count; ++j)
    affine1_run<T>({x.p + j * x.stride, 1}, {y.p + j * y.stride, 1}, n, shifted(k, j * step), relu_on, out);
}

template <class T>
void affine2_runs(Strided<const T> dy, Strided<const T> x, Strided<T> dx, index_t n, index_t count, index_t step,
                  Coefs<compute_t<T>> k, bool relu_on, Output out) {
  if constexpr (kDirect<T>) {
    with_flags(relu_on, out.stream, [&](auto r, auto st) {
      for (index_t j = 0; j < count; ++j) {
        const std::array<const float*, 6> ka = coef_arrays(shifted(k, j * step));
        affine2_direct<T, r.value, st.value>(dy.p + j * dy.stride, x.p + j * x.stride, dx.p + j * dx.stride, n,
                                             ka.data(), 0, out.ahead);
      }
    });
    if (out.stream) end_stream();
    return;
  }
  for (index_t j = 0; j < count; ++j)
    affine2_run<T>({dy.p + j * dy.stride, 1}, {x.p + j * x.stride, 1}, {dx.p + j * dx.stride, 1}, n,
                   shifted(k, j * step), relu_on, out);
}

template <class T>
KernelTable<T> make_table() {
  return {&reduce1_rows<T>, &reduce1_run<T>, &affine1_rows<T>, &affine1_run<T>,  &reduce2_rows<T>, &reduce2_run<T>,
          &affine2_rows<T>, &affine2_run<T>, &reduce1_runs<T>, &affine1_runs<T>, &reduce2_runs<T>, &affine2_runs<T>};
}

const Tables* tables() {
  static const Tables t{BATCHNORM_KERNEL_ISA, make_table<float>(), make_table<double>(), make_table<float16_t>(),
                        make_table<bfloat16_t>()};
  return &t;
}
