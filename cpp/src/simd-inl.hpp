// The operations the kernels are written with: one vocabulary for every instruction set,
// and the only kernel code that names one. No include guard: kernels-inl.hpp includes it
// inside each kernels_<isa>.cpp's namespace and target region, after that file defines
//   BATCHNORM_KERNEL_SIMD  0 (baseline), 256 (AVX2) or 512 (AVX-512)
//   BATCHNORM_KERNEL_FMA   1 where fused multiply-add instructions may be used
//   BATCHNORM_KERNEL_F16C  1 where the F16C half <-> float conversions may be used
//
// Vectors (baseline: 1-lane "vectors", plain float and double, so the same loops run):
//   VF  kLanesF floats (16 on AVX-512, 8 on AVX2)
//   VH  kLanesD floats: half a VF, the floats one VD holds as doubles
//   VD  kLanesD doubles (8 on AVX-512, 4 on AVX2)
// Arithmetic is overloaded on the vector type and on float and double, so one expression
// serves vectors and scalars with the same roundings. A load names the vector it makes:
// load<VF>(p) converts kLanesF values of float, float16 or bfloat16 to floats.
// Partial loads and stores (load_n, store_n) touch the first n lanes' memory only.

#if defined(__GNUC__) && !defined(__clang__)
// A vector type as a template argument (load<VF>, Narrow<T>) loses its may_alias attribute,
// which matters only for pointers to vectors; the kernels never dereference one.
#pragma GCC diagnostic ignored "-Wignored-attributes"
#endif

#if BATCHNORM_KERNEL_SIMD == 512
using VF = __m512;
using VH = __m256;
using VD = __m512d;
#elif BATCHNORM_KERNEL_SIMD == 256
using VF = __m256;
using VH = __m128;
using VD = __m256d;
#else
using VF = float;
using VH = float;
using VD = double;
#endif
constexpr index_t kLanesF = static_cast<index_t>(sizeof(VF) / sizeof(float));
constexpr index_t kLanesD = static_cast<index_t>(sizeof(VD) / sizeof(double));
constexpr int kHalves = static_cast<int>(kLanesF / kLanesD);  // VDs per VF: 2 (1 with 1-lane vectors)
static_assert(sizeof(VH) == kLanesD * sizeof(float), "VH holds the floats of one VD");

template <class V>
using lane_t = std::conditional_t<std::is_same_v<V, VD>, double, float>;
template <class V>
constexpr index_t kLanes = static_cast<index_t>(sizeof(V) / sizeof(lane_t<V>));
// The vectors of T's compute type: Narrow, kLanesD values (converted lane by lane to one
// VD, as the reductions sum them); Wide, a whole register (the elementwise passes).
template <class T>
using Narrow = std::conditional_t<std::is_same_v<T, double>, VD, VH>;
template <class T>
using Wide = std::conditional_t<std::is_same_v<T, double>, VD, VF>;

template <class V>
V zero();
template <class V>
V set(lane_t<V> a);
// The lanes' worth of values at p, in V's lane type.
template <class V>
V load(const float* p);
template <class V>
V load(const float16_t* p);
template <class V>
V load(const bfloat16_t* p);
template <class V>
V load(const double* p);
// The first n values at p (0 < n <= lanes), zeros in the lanes after them.
template <class V>
V load_n(const float* p, index_t n);
template <class V>
V load_n(const float16_t* p, index_t n);
template <class V>
V load_n(const bfloat16_t* p, index_t n);
template <class V>
V load_n(const double* p, index_t n);

// ---- scalars: one element in and out of the compute type, and the arithmetic --------

inline float to_compute(const float* p) { return *p; }
inline double to_compute(const double* p) { return *p; }
inline float to_compute(const bfloat16_t* p) { return bfloat16_t::to_float(p->bits); }
inline float to_compute(const float16_t* p) {
#if BATCHNORM_KERNEL_F16C
  return _mm_cvtss_f32(_mm_cvtph_ps(_mm_cvtsi32_si128(p->bits)));
#else
  return float16_t::to_float(p->bits);
#endif
}

inline void from_compute(float v, float* p) { *p = v; }
inline void from_compute(double v, double* p) { *p = v; }
inline void from_compute(float v, bfloat16_t* p) {  // round to nearest even; NaN stays a quiet NaN
  std::uint32_t x;
  std::memcpy(&x, &v, sizeof x);
  const std::uint32_t rounded = (x + 0x7fffu + ((x >> 16) & 1u)) >> 16;
  const std::uint32_t quiet_nan = (x >> 16) | 0x40u;
  p->bits = static_cast<std::uint16_t>((x & 0x7fffffffu) > 0x7f800000u ? quiet_nan : rounded);
}
inline void from_compute(float v, float16_t* p) {
#if BATCHNORM_KERNEL_F16C
  p->bits = static_cast<std::uint16_t>(_mm_extract_epi16(_mm_cvtps_ph(_mm_set_ss(v), _MM_FROUND_TO_NEAREST_INT), 0));
#else
  p->bits = float16_t::from_float(v);
#endif
}

// a*b + c: one fused multiply-add where the instruction set has it, a multiply and an add
// where it does not. Every pass is written with it, so an expression rounds the same way
// in vector bodies, partial vectors and scalar loops.
inline float mul_add(float a, float b, float c) {
#if BATCHNORM_KERNEL_FMA
  return __builtin_fmaf(a, b, c);
#else
  return a * b + c;
#endif
}
inline double mul_add(double a, double b, double c) {
#if BATCHNORM_KERNEL_FMA
  return __builtin_fma(a, b, c);
#else
  return a * b + c;
#endif
}
inline float sub(float a, float b) { return a - b; }
inline float mul(float a, float b) { return a * b; }
inline double mul(double a, double b) { return a * b; }
inline double sub(double a, double b) { return a - b; }
inline double add(double a, double b) { return a + b; }
inline float relu(float z) { return z < 0.0f ? 0.0f : z; }  // NaN stays NaN, as IEEE max(z, 0) in PyTorch
inline double relu(double z) { return z < 0.0 ? 0.0 : z; }
inline float if_positive(float z, float g) { return z > 0.0f ? g : 0.0f; }  // g where z > 0, else 0
inline double if_positive(double z, double g) { return z > 0.0 ? g : 0.0; }
inline double if_nonzero(double w, double d) { return w != 0.0 ? d : 0.0; }  // d where w != 0, else 0
inline double promote(float v) { return v; }
inline double promote(double v) { return v; }

#if !BATCHNORM_KERNEL_SIMD
// 1-lane vectors: the scalars above, and these.
template <>
inline float zero<float>() {
  return 0.0f;
}
template <>
inline double zero<double>() {
  return 0.0;
}
template <>
inline float set<float>(float a) {
  return a;
}
template <>
inline double set<double>(double a) {
  return a;
}
template <>
inline float load<float>(const float* p) {
  return *p;
}
template <>
inline float load<float>(const float16_t* p) {
  return to_compute(p);
}
template <>
inline float load<float>(const bfloat16_t* p) {
  return to_compute(p);
}
template <>
inline double load<double>(const double* p) {
  return *p;
}
template <>
inline float load_n<float>(const float* p, index_t) {
  return *p;
}
template <>
inline float load_n<float>(const float16_t* p, index_t) {
  return to_compute(p);
}
template <>
inline float load_n<float>(const bfloat16_t* p, index_t) {
  return to_compute(p);
}
template <>
inline double load_n<double>(const double* p, index_t) {
  return *p;
}
template <class T, class C>
inline void store(T* p, C v) {
  from_compute(v, p);
}
template <class T, class C>
inline void store_n(T* p, C v, index_t) {
  from_compute(v, p);
}
template <class T, class C>
inline void stream(T* p, C v) {
  from_compute(v, p);
}
inline void halves(float v, double (&d)[1]) { d[0] = v; }
inline double keep_first(double v, index_t) { return v; }
inline double sum_lanes(double v) { return v; }
#else
// ---- 128- and 256-bit vectors (AVX2 and AVX-512 alike) -------------------------------

template <>
inline __m128 set<__m128>(float a) {
  return _mm_set1_ps(a);
}
template <>
inline __m256 set<__m256>(float a) {
  return _mm256_set1_ps(a);
}
template <>
inline __m128 load<__m128>(const float* p) {
  return _mm_loadu_ps(p);
}
template <>
inline __m128 load<__m128>(const float16_t* p) {
  return _mm_cvtph_ps(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
template <>
inline __m128 load<__m128>(const bfloat16_t* p) {
  return _mm_castsi128_ps(_mm_slli_epi32(_mm_cvtepu16_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))), 16));
}
template <>
inline __m256 load<__m256>(const float* p) {
  return _mm256_loadu_ps(p);
}
template <>
inline __m256 load<__m256>(const float16_t* p) {
  return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
template <>
inline __m256 load<__m256>(const bfloat16_t* p) {
  return _mm256_castsi256_ps(
      _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))), 16));
}
inline __m128 sub(__m128 a, __m128 b) { return _mm_sub_ps(a, b); }
inline __m256 sub(__m256 a, __m256 b) { return _mm256_sub_ps(a, b); }
inline __m128 mul(__m128 a, __m128 b) { return _mm_mul_ps(a, b); }
inline __m256 mul(__m256 a, __m256 b) { return _mm256_mul_ps(a, b); }
inline __m128 mul_add(__m128 a, __m128 b, __m128 c) { return _mm_fmadd_ps(a, b, c); }
inline __m256 mul_add(__m256 a, __m256 b, __m256 c) { return _mm256_fmadd_ps(a, b, c); }
inline __m128 if_positive(__m128 z, __m128 g) { return _mm_and_ps(_mm_cmp_ps(z, _mm_setzero_ps(), _CMP_GT_OQ), g); }
inline __m256 if_positive(__m256 z, __m256 g) {
  return _mm256_and_ps(_mm256_cmp_ps(z, _mm256_setzero_ps(), _CMP_GT_OQ), g);
}
inline __m256 relu(__m256 z) { return _mm256_max_ps(_mm256_setzero_ps(), z); }  // max(0, NaN) is NaN, as relu()

// 8 floats to float16 / bfloat16 bits, rounded to nearest even (bfloat16 NaN kept quiet).
inline __m128i to_half(__m256 v) { return _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline __m128i to_bfloat(__m256 v) {
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

inline void store(double* p, __m256d v) { _mm256_storeu_pd(p, v); }
inline __m256d add(__m256d a, __m256d b) { return _mm256_add_pd(a, b); }
inline __m256d sub(__m256d a, __m256d b) { return _mm256_sub_pd(a, b); }
inline __m256d mul(__m256d a, __m256d b) { return _mm256_mul_pd(a, b); }
inline __m256d mul_add(__m256d a, __m256d b, __m256d c) { return _mm256_fmadd_pd(a, b, c); }
inline __m256d relu(__m256d z) { return _mm256_max_pd(_mm256_setzero_pd(), z); }
inline __m256d if_positive(__m256d z, __m256d g) {
  return _mm256_and_pd(_mm256_cmp_pd(z, _mm256_setzero_pd(), _CMP_GT_OQ), g);
}
inline __m256d if_nonzero(__m256d w, __m256d d) {
  return _mm256_and_pd(_mm256_cmp_pd(w, _mm256_setzero_pd(), _CMP_NEQ_UQ), d);
}
// The lanes added in a fixed pairwise order (halves, then halves of the halves): the
// result depends only on the values, never on timing.
inline double sum_lanes(__m256d h) {
  const __m128d q = _mm_add_pd(_mm256_castpd256_pd128(h), _mm256_extractf128_pd(h, 1));
  return _mm_cvtsd_f64(q) + _mm_cvtsd_f64(_mm_unpackhi_pd(q, q));
}
#endif

#if BATCHNORM_KERNEL_SIMD == 512
// ---- AVX-512: VF = __m512, VH = __m256, VD = __m512d; partial vectors are masked ------

template <>
inline __m512 set<__m512>(float a) {
  return _mm512_set1_ps(a);
}
template <>
inline __m512 load<__m512>(const float* p) {
  return _mm512_loadu_ps(p);
}
template <>
inline __m512 load<__m512>(const float16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
template <>
inline __m512 load<__m512>(const bfloat16_t* p) {
  const __m512i u = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  return _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
}
inline __mmask16 first16(index_t n) { return static_cast<__mmask16>((1u << n) - 1u); }
inline __mmask8 first8(index_t n) { return static_cast<__mmask8>((1u << n) - 1u); }
template <>
inline __m512 load_n<__m512>(const float* p, index_t n) {
  return _mm512_maskz_loadu_ps(first16(n), p);
}
template <>
inline __m512 load_n<__m512>(const float16_t* p, index_t n) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(first16(n), p));
}
template <>
inline __m512 load_n<__m512>(const bfloat16_t* p, index_t n) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(first16(n), p)), 16));
}
template <>
inline __m256 load_n<__m256>(const float* p, index_t n) {
  return _mm256_maskz_loadu_ps(first8(n), p);
}
template <>
inline __m256 load_n<__m256>(const float16_t* p, index_t n) {
  return _mm256_cvtph_ps(_mm_maskz_loadu_epi16(first8(n), p));
}
template <>
inline __m256 load_n<__m256>(const bfloat16_t* p, index_t n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_maskz_loadu_epi16(first8(n), p)), 16));
}

inline __m256i to_half(__m512 v) {  // the maskz form: the plain one is a macro with a bare -1 mask at -O0
  return _mm512_maskz_cvtps_ph(static_cast<__mmask16>(0xffff), v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
inline __m256i to_bfloat(__m512 v) {
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
inline void store(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store(float16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_half(v)); }
inline void store(bfloat16_t* p, __m512 v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bfloat(v)); }
inline void stream(float* p, __m512 v) { _mm512_stream_ps(p, v); }
inline void stream(float16_t* p, __m512 v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_half(v)); }
inline void stream(bfloat16_t* p, __m512 v) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), to_bfloat(v)); }
inline void store_n(float* p, __m512 v, index_t n) { _mm512_mask_storeu_ps(p, first16(n), v); }
inline void store_n(float16_t* p, __m512 v, index_t n) { _mm256_mask_storeu_epi16(p, first16(n), to_half(v)); }
inline void store_n(bfloat16_t* p, __m512 v, index_t n) { _mm256_mask_storeu_epi16(p, first16(n), to_bfloat(v)); }

inline __m512 sub(__m512 a, __m512 b) { return _mm512_sub_ps(a, b); }
inline __m512 mul(__m512 a, __m512 b) { return _mm512_mul_ps(a, b); }
inline __m512 mul_add(__m512 a, __m512 b, __m512 c) { return _mm512_fmadd_ps(a, b, c); }
inline __m512 relu(__m512 z) { return _mm512_max_ps(_mm512_setzero_ps(), z); }  // max(0, NaN) is NaN, as relu()
inline __m512 if_positive(__m512 z, __m512 g) {
  return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(z, _mm512_setzero_ps(), _CMP_GT_OQ), g);
}
inline __m512d promote(__m256 v) { return _mm512_cvtps_pd(v); }
inline void halves(__m512 v, __m512d (&d)[2]) {
  d[0] = _mm512_cvtps_pd(_mm512_castps512_ps256(v));
  d[1] = _mm512_cvtps_pd(_mm512_extractf32x8_ps(v, 1));
}

template <>
inline __m512d zero<__m512d>() {
  return _mm512_setzero_pd();
}
template <>
inline __m512d set<__m512d>(double a) {
  return _mm512_set1_pd(a);
}
template <>
inline __m512d load<__m512d>(const double* p) {
  return _mm512_loadu_pd(p);
}
template <>
inline __m512d load_n<__m512d>(const double* p, index_t n) {
  return _mm512_maskz_loadu_pd(first8(n), p);
}
inline void store(double* p, __m512d v) { _mm512_storeu_pd(p, v); }
inline void stream(double* p, __m512d v) { _mm512_stream_pd(p, v); }
inline void store_n(double* p, __m512d v, index_t n) { _mm512_mask_storeu_pd(p, first8(n), v); }
inline __m512d add(__m512d a, __m512d b) { return _mm512_add_pd(a, b); }
inline __m512d sub(__m512d a, __m512d b) { return _mm512_sub_pd(a, b); }
inline __m512d mul(__m512d a, __m512d b) { return _mm512_mul_pd(a, b); }
inline __m512d mul_add(__m512d a, __m512d b, __m512d c) { return _mm512_fmadd_pd(a, b, c); }
inline __m512d relu(__m512d z) { return _mm512_max_pd(_mm512_setzero_pd(), z); }
inline __m512d if_positive(__m512d z, __m512d g) {
  return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(z, _mm512_setzero_pd(), _CMP_GT_OQ), g);
}
inline __m512d if_nonzero(__m512d w, __m512d d) {
  return _mm512_maskz_mov_pd(_mm512_cmp_pd_mask(w, _mm512_setzero_pd(), _CMP_NEQ_UQ), d);
}
inline __m512d promote(__m512d v) { return v; }
inline __m512d keep_first(__m512d v, index_t n) { return _mm512_maskz_mov_pd(first8(n), v); }  // zeros after n
inline double sum_lanes(__m512d v) {
  return sum_lanes(_mm256_add_pd(_mm512_castpd512_pd256(v), _mm512_extractf64x4_pd(v, 1)));
}
#elif BATCHNORM_KERNEL_SIMD == 256
// ---- AVX2: VF = __m256, VH = __m128, VD = __m256d; partial vectors: masked loads and
// stores of 32- and 64-bit lanes, a small buffer for 16-bit ones ----------------------

template <>
inline __m256d zero<__m256d>() {
  return _mm256_setzero_pd();
}
template <>
inline __m256d set<__m256d>(double a) {
  return _mm256_set1_pd(a);
}
template <>
inline __m256d load<__m256d>(const double* p) {
  return _mm256_loadu_pd(p);
}

inline __m128i first_lanes4(index_t n) {
  return _mm_cmpgt_epi32(_mm_set1_epi32(static_cast<int>(n)), _mm_setr_epi32(0, 1, 2, 3));
}
inline __m256i first_lanes8(index_t n) {
  return _mm256_cmpgt_epi32(_mm256_set1_epi32(static_cast<int>(n)), _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
}
inline __m256i first_lanes4x64(index_t n) {
  return _mm256_cmpgt_epi64(_mm256_set1_epi64x(n), _mm256_setr_epi64x(0, 1, 2, 3));
}
template <>
inline __m128 load_n<__m128>(const float* p, index_t n) {
  return _mm_maskload_ps(p, first_lanes4(n));
}
template <>
inline __m256 load_n<__m256>(const float* p, index_t n) {
  return _mm256_maskload_ps(p, first_lanes8(n));
}
// 16-bit values through a small buffer: AVX2 masks 32- and 64-bit lanes only.
template <class V, class T>
inline V load_n_buffered(const T* p, index_t n) {
  T buf[sizeof(V) / sizeof(float)] = {};
  std::memcpy(buf, p, static_cast<std::size_t>(n) * sizeof(T));
  return load<V>(buf);
}
template <class V>
V load_n(const float16_t* p, index_t n) {
  return load_n_buffered<V>(p, n);
}
template <class V>
V load_n(const bfloat16_t* p, index_t n) {
  return load_n_buffered<V>(p, n);
}
template <>
inline __m256d load_n<__m256d>(const double* p, index_t n) {
  return _mm256_maskload_pd(p, first_lanes4x64(n));
}

inline void store(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline void store(float16_t* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
inline void store(bfloat16_t* p, __m256 v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bfloat(v)); }
inline void stream(float* p, __m256 v) { _mm256_stream_ps(p, v); }
inline void stream(float16_t* p, __m256 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_half(v)); }
inline void stream(bfloat16_t* p, __m256 v) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), to_bfloat(v)); }
inline void stream(double* p, __m256d v) { _mm256_stream_pd(p, v); }
inline void store_n(float* p, __m256 v, index_t n) { _mm256_maskstore_ps(p, first_lanes8(n), v); }
inline void store_n(double* p, __m256d v, index_t n) { _mm256_maskstore_pd(p, first_lanes4x64(n), v); }
template <class T>
inline void store_n(T* p, __m256 v, index_t n) {  // float16, bfloat16
  T buf[8];
  store(buf, v);
  std::memcpy(p, buf, static_cast<std::size_t>(n) * sizeof(T));
}

inline __m256d promote(__m128 v) { return _mm256_cvtps_pd(v); }
inline __m256d promote(__m256d v) { return v; }
inline void halves(__m256 v, __m256d (&d)[2]) {
  d[0] = _mm256_cvtps_pd(_mm256_castps256_ps128(v));
  d[1] = _mm256_cvtps_pd(_mm256_extractf128_ps(v, 1));
}
inline __m256d keep_first(__m256d v, index_t n) {  // zeros after n
  return _mm256_and_pd(v, _mm256_castsi256_pd(first_lanes4x64(n)));
}
#endif

// ---- memory traffic -----------------------------------------------------------------

// Prefetches the line of p (into L2 and closer), for a pass that reads it later.
inline void prefetch(const void* p) {
#if BATCHNORM_KERNEL_SIMD
  _mm_prefetch(static_cast<const char*>(p), _MM_HINT_T1);
#else
  (void)p;
#endif
}

// Prefetches every line of the n values from p. A prefetch of the first and the last value
// misses the middle line of 128 bytes that do not start on a line, as NumPy's large arrays
// do not (16 bytes past one): those loads then waited on memory (docs/performance.md).
template <class T>
inline void prefetch_lines(const T* p, index_t n) {
  for (index_t j = 0; j < n; j += static_cast<index_t>(64 / sizeof(T))) prefetch(p + j);
  prefetch(p + n - 1);
}

// Makes the non-temporal stores of this thread visible before anything that follows.
inline void end_stream() {
#if defined(__SSE2__) || BATCHNORM_KERNEL_SIMD
  _mm_sfence();
#endif
}

// Copies `bytes` bytes to dst with non-temporal stores for the vector-aligned body (the
// edges with ordinary stores). Ends with no fence: the kernel calls end_stream() once.
inline void stream_copy(void* dst, const void* src, std::size_t bytes) {
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
