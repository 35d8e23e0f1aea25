// libFuzzer target over the C++ core: the canonical view (plan), validation and the four
// functional kernels, under AddressSanitizer and UndefinedBehaviorSanitizer, against the
// scalar oracle batchnorm/reference.hpp. Build and run: tests/fuzz/run_core_fuzzer.sh.
//
// Each input decodes into an element type (float or double), a shape of 1 to 5 axes of
// size 0 to 9, feature axes (sometimes out of range, repeated or none), per-array strides
// in elements from -3 to +3 (zero included) or C order, the values (a seed, an offset,
// a scale, planted NaN/inf), gamma/beta, epsilon (sometimes negative or NaN), the
// activation and the function. The arrays live in buffers exactly as large as their
// strides reach, so any out-of-bounds access is an ASan report.
//
// Invariants: no sanitizer report; the library throws (std::invalid_argument) exactly
// when the oracle does; for finite, moderate data the results match the oracle to float
// rounding; a second call gives the same bits.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <vector>

#include "batchnorm/functional.hpp"
#include "batchnorm/reference.hpp"

namespace bn = batchnorm;

namespace {

using index_t = bn::index_t;

struct Reader {
  const uint8_t* p;
  size_t n;
  uint32_t next(uint32_t range) {  // in [0, range)
    uint32_t v = 0;
    for (int i = 0; i < 4 && n; ++i, ++p, --n) v = (v << 8) | *p;
    return range ? v % range : 0;
  }
};

std::string g_case;  // the decoded input, for the report of a finding

[[noreturn]] void fail(const char* what, double got = 0, double want = 0) {
  std::fprintf(stderr, "FINDING: %s (got %.17g, expected %.17g)\n  input: %s\n", what, got, want, g_case.c_str());
  std::abort();
}

template <class V>
std::string list(const V& v) {
  std::string s = "(";
  for (auto e : v) s += std::to_string(e) + ",";
  return s + ")";
}

// A strided array inside a buffer that holds exactly the elements its strides reach.
template <class T>
struct Array {
  std::vector<T> buffer;
  bn::Strides strides;  // elements; empty = C order
  std::ptrdiff_t offset = 0;
  T* data() { return buffer.data() + offset; }
};

template <class T>
Array<T> make(Reader& r, const bn::Shape& shape, std::mt19937_64& rng, double loc, double scale, bool contiguous) {
  Array<T> a;
  index_t count = 1;
  for (auto s : shape) count *= s;
  if (contiguous || r.next(3) == 0) {
    a.buffer.resize(static_cast<size_t>(std::max<index_t>(count, 1)));
  } else {
    a.strides.resize(shape.size());
    index_t lo = 0, hi = 0;
    for (size_t d = 0; d < shape.size(); ++d) {
      a.strides[d] = static_cast<index_t>(r.next(7)) - 3;
      if (shape[d] > 0) (a.strides[d] < 0 ? lo : hi) += a.strides[d] * (shape[d] - 1);
    }
    a.buffer.resize(static_cast<size_t>(count ? hi - lo + 1 : 1));
    a.offset = -lo;
  }
  std::normal_distribution<double> normal(loc, scale);
  for (auto& v : a.buffer) v = static_cast<T>(normal(rng));
  for (uint32_t k = r.next(3); k > 0; --k) {  // plant non-finite values
    const double special[] = {NAN, INFINITY, -INFINITY, 0.0};
    a.buffer[r.next(static_cast<uint32_t>(a.buffer.size()))] = static_cast<T>(special[r.next(4)]);
  }
  return a;
}

template <class T>
bool moderate(const std::vector<T>& v) {
  for (T x : v)
    if (!std::isfinite(static_cast<double>(x)) || std::fabs(static_cast<double>(x)) > 1e4) return false;
  return true;
}

void close(double got, double want, double tol, const char* what) {
  if (std::isnan(want) && std::isnan(got)) return;
  if (!(std::fabs(got - want) <= tol)) fail(what, got, want);
}

template <class T>
void run(Reader& r) {
  using S = bn::stat_t<T>;
  std::mt19937_64 rng(r.next(0xffffffffu));
  const int ndim = 1 + static_cast<int>(r.next(5));
  bn::Shape shape(static_cast<size_t>(ndim));
  for (auto& s : shape) s = static_cast<index_t>(r.next(r.next(4) == 0 ? 2 : 10));
  bn::Axes axes;
  for (uint32_t k = 1 + r.next(static_cast<uint32_t>(ndim) + 1); k > 0; --k)
    axes.push_back(static_cast<int>(r.next(static_cast<uint32_t>(2 * ndim + 2))) - ndim - 1);
  if (r.next(8) == 0) axes.clear();
  const bn::Geometry g{shape, axes};
  const double loc = static_cast<double>(r.next(2001)) - 1000.0;
  const double scale = std::pow(10.0, static_cast<double>(r.next(7)) - 3.0);
  const double eps_choices[] = {1e-3, 0.0, 1.0, 1e-12, -1.0, NAN};
  const double eps = eps_choices[r.next(6)];
  const auto act = r.next(2) ? bn::Activation::relu : bn::Activation::none;
  const uint32_t fn = r.next(4);

  Array<T> x = make<T>(r, shape, rng, loc, scale, false);
  Array<T> dy = make<T>(r, shape, rng, 0.0, 1.0, false);
  Array<T> out = make<T>(r, shape, rng, 0.0, 1.0, r.next(2) == 0);  // fresh: C order or strided
  // an output must not overlap itself: a strided one with zero or colliding strides is
  // part of the test only through the library's own check (which then must throw)
  std::vector<index_t> offsets;  // of the output's elements in its buffer
  {
    index_t count = 1;
    for (auto s : shape) count *= s;
    const bn::Strides st = out.strides.empty() ? bn::Strides{} : out.strides;
    index_t step = 1;
    bn::Strides c_order(shape.size());
    for (size_t d = shape.size(); d-- > 0;) {
      c_order[d] = step;
      step *= std::max<index_t>(shape[d], 1);
    }
    for (index_t i = 0; i < count; ++i) {
      index_t rem = i, off = out.offset;
      for (size_t d = shape.size(); d-- > 0;) {
        off += (rem % shape[d]) * (st.empty() ? c_order[d] : st[d]);
        rem /= shape[d];
      }
      offsets.push_back(off);
    }
  }
  std::vector<index_t> sorted_offsets(offsets);
  std::sort(sorted_offsets.begin(), sorted_offsets.end());
  const bool out_overlaps = std::adjacent_find(sorted_offsets.begin(), sorted_offsets.end()) != sorted_offsets.end();

  g_case = std::string(std::is_same_v<T, double> ? "double" : "float") + " fn=" + std::to_string(fn) +
           " shape=" + list(shape) + " axes=" + list(axes) + " x_strides=" + list(x.strides) +
           " dy_strides=" + list(dy.strides) + " out_strides=" + list(out.strides) + " eps=" + std::to_string(eps) +
           " relu=" + std::to_string(act == bn::Activation::relu) + " loc=" + std::to_string(loc) +
           " scale=" + std::to_string(scale);
  index_t channels = 1;
  bool geometry_ok = true;
  try {
    channels = bn::extent(g).channels;
  } catch (const std::invalid_argument&) {
    geometry_ok = false;
  }
  const size_t c = static_cast<size_t>(std::max<index_t>(channels, 1));
  std::vector<S> gamma(c), beta(c), mean(c), var(c), inv(c), mean2(c), var2(c), inv2(c);
  std::uniform_real_distribution<double> u(-2.0, 2.0);
  for (size_t i = 0; i < c; ++i) {
    gamma[i] = static_cast<S>(u(rng));
    beta[i] = static_cast<S>(u(rng));
    mean[i] = static_cast<S>(loc + u(rng));
    var[i] = static_cast<S>(scale * scale * (1.0 + u(rng) * 0.4));
    inv[i] = static_cast<S>(1.0 / std::sqrt(static_cast<double>(var[i]) + 1e-3));
  }
  const bn::Affine<S> affine{r.next(2) ? gamma.data() : nullptr, r.next(2) ? beta.data() : nullptr};
  std::vector<double> ry(out.buffer.size()), rmean(c), rvar(c), rinv(c), rdg(c), rdb(c);
  std::vector<S> dg(c), db(c);
  const bn::In<T> xin{x.data(), x.strides};
  const bn::In<T> dyin{dy.data(), dy.strides};
  const bn::Out<T> o{out.data(), out.strides};
  const bn::Out<double> ro{ry.data() + out.offset, out.strides};

  // The library and the oracle: both throw or neither (the oracle does not check outputs
  // for self-overlap; the library must refuse a zero stride, and may a colliding one).
  bool lib_threw = false, ref_threw = false;
  auto call_lib = [&]() {
    switch (fn) {
      case 0:
        bn::moments<T>(g, xin, mean2.data(), var2.data());
        break;
      case 1:
        bn::normalize<T>(g, xin, o, mean.data(), var.data(), affine, eps, act);
        break;
      case 2:
        bn::forward<T>(g, xin, o, affine, eps, act, mean2.data(), var2.data(), inv2.data());
        break;
      default:
        bn::backward<T>(g, dyin, xin, o, mean.data(), inv.data(), affine, act, dg.data(), db.data());
    }
  };
  try {
    call_lib();
  } catch (const std::invalid_argument&) {
    lib_threw = true;
  } catch (...) {
    fail("the library threw something other than std::invalid_argument");
  }
  try {
    switch (fn) {
      case 0:
        bn::reference::moments<T>(g, xin, rmean.data(), rvar.data());
        break;
      case 1:
        bn::reference::normalize<T>(g, xin, ro, mean.data(), var.data(), affine, eps, act);
        break;
      case 2:
        bn::reference::forward<T>(g, xin, ro, affine, eps, act, rmean.data(), rvar.data(), rinv.data());
        break;
      default:
        bn::reference::backward<T>(g, dyin, xin, ro, mean.data(), inv.data(), affine, act, rdg.data(), rdb.data());
    }
  } catch (const std::invalid_argument&) {
    ref_threw = true;
  }
  const bool writes = fn != 0;
  if (ref_threw && !lib_threw) fail("the library accepted what the oracle refuses");
  // the oracle does not look at outputs: an output whose elements share memory may be
  // refused (the library refuses zero strides; other collisions it writes in some order)
  if (lib_threw && !ref_threw && !(writes && out_overlaps)) fail("the library refused a valid call");
  if (lib_threw || ref_threw || !geometry_ok) return;
  if (writes && out_overlaps) return;  // written in some order: nothing to compare

  // Results: only for finite, moderate data (NaN/inf are checked for not crashing).
  if (!moderate(x.buffer) || !moderate(dy.buffer)) return;
  if (scale < 1e-2 * std::fabs(loc)) return;  // ill-conditioned: the Python fuzzer measures those
  const double rel = std::is_same_v<T, double> ? 1e-9 : 1e-3;
  if (fn == 0 || fn == 2) {
    for (size_t i = 0; i < static_cast<size_t>(channels); ++i) {
      const double m = static_cast<double>(mean2[i]);
      close(m, rmean[i], rel * (std::fabs(loc) + 10 * scale) + 1e-30, "mean");
      close(static_cast<double>(var2[i]), rvar[i], rel * (rvar[i] + (std::fabs(loc) + scale) * scale * 1e-3) + 1e-30,
            "variance");
    }
  }
  if (fn == 1 || fn == 2 || fn == 3) {
    // outputs, element by element (relu: skip values next to the kink)
    if (fn == 3 && act == bn::Activation::relu) return;  // the mask from rounded statistics: see the Python tests
    std::vector<T> again(out.buffer);
    double ymax = 0;
    for (double v : ry) ymax = std::max(ymax, std::fabs(v));
    if (!std::isfinite(ymax)) return;
    // what the rounding of a mean (the library's, or the oracle's naive sum) moves y by:
    // gamma * inv_std * a few ulp of |x|
    double inv_max = 0, gamma_max = 1;
    for (size_t k = 0; k < static_cast<size_t>(channels); ++k) {
      inv_max = std::max(inv_max, fn == 2 ? static_cast<double>(inv2[k]) : static_cast<double>(inv[k]));
      if (fn == 1) inv_max = std::max(inv_max, 1.0 / std::sqrt(static_cast<double>(var[k]) + eps));
      if (affine.gamma) gamma_max = std::max(gamma_max, std::fabs(static_cast<double>(gamma[k])));
    }
    // epsilon 0 and a constant channel: the library's variance is exactly 0 and y = 0 * inf
    // = NaN, as IEEE has it; the oracle's naive mean is not exact, so it finds a tiny
    // variance and a finite y. Nothing to compare.
    if (!std::isfinite(inv_max)) return;
    const double unit = std::is_same_v<T, double> ? 0x1p-52 : 0x1p-23;
    const double atol = 64 * unit * gamma_max * inv_max * (std::fabs(loc) + 10 * scale);
    for (index_t off : offsets) {
      const auto i = static_cast<size_t>(off);
      const double want = ry[i];
      const double got = static_cast<double>(out.buffer[i]);
      if (act == bn::Activation::relu && std::fabs(want) < 1e-3 * (ymax + 1)) continue;
      if (act == bn::Activation::relu && got == 0 && std::fabs(want) < 1e-2 * (ymax + 1)) continue;
      if (std::getenv("BATCHNORM_FUZZ_VERBOSE") && !(std::fabs(got - want) <= rel * 10 * (ymax + 1) + atol)) {
        std::fprintf(stderr, "offset %ld of %zu\n", static_cast<long>(off), out.buffer.size());
        for (size_t k = 0; k < c; ++k)
          std::fprintf(stderr,
                       "  channel %zu: lib mean %.17g var %.17g inv %.17g | ref mean %.17g var %.17g inv %.17g\n", k,
                       static_cast<double>(mean2[k]), static_cast<double>(var2[k]), static_cast<double>(inv2[k]),
                       rmean[k], rvar[k], rinv[k]);
      }
      close(got, want, rel * 10 * (ymax + 1) + atol, fn == 3 ? "dx" : "y");
    }
    call_lib();  // reproducible
    if (std::memcmp(again.data(), out.buffer.data(), again.size() * sizeof(T)) != 0 && !out_overlaps)
      fail("a second call gave other bits");
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  Reader r{data, size};
  if (r.next(2) == 0)
    run<float>(r);
  else
    run<double>(r);
  return 0;
}
