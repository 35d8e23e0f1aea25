// The functional API: validation, the canonical view, the per-channel math between the
// passes, and the split of each pass over threads. The passes themselves are the
// kernels of the active instruction set (kernels.hpp).
//
// Statistics. Each channel's values are shifted by the channel's first value K before
// they are summed, in double: s = sum(x - K), ss = sum((x - K)^2). Then
//     mean = K + s/M,   M2 = ss - s^2/M,   variance = M2/M.
// The shift removes the offset that ruins the textbook E[x^2] - E[x]^2 (float32 data with
// mean/std = 1e4 loses all digits there); what cancels in M2 is at most about the ratio
// of (K - mean)^2 to the variance, harmless in double. Per-thread partial sums share K,
// so they add; they are merged in thread order, so a result depends only on the data and
// the thread count, and across thread counts only in double rounding.
//
// Backward (per channel, g = dy masked by the fused ReLU, x_hat = (x - mean)*inv_std):
//     dbeta  = sum g,   dgamma = sum g*x_hat = inv_std * sum g*(x - mean)
//     batch statistics:  dx = a*(g - dbeta/M - x_hat*dgamma/M),  a = gamma*inv_std
//                          = k1*g + k2*(x - mean) + k3,  k1 = a, k2 = -a*inv_std*dgamma/M,
//                                                         k3 = -a*dbeta/M
//     fixed statistics:  dx = a*g
// The per-channel coefficients of every pass are derived from the stored (rounded)
// mean and inv_std, so backward rebuilds the forward's ReLU mask bit for bit.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "batchnorm/functional.hpp"
#include "kernels.hpp"
#include "plan.hpp"
#include "threads.hpp"

namespace batchnorm {
namespace detail {
namespace {

using Offsets = std::array<index_t, kMaxOperands>;

std::vector<const Strides*> operand_strides(std::initializer_list<const Strides*> s) { return s; }

void check_epsilon(double epsilon) {
  if (!std::isfinite(epsilon) || epsilon < 0)
    throw value_error("epsilon must be a finite number >= 0, got " + std::to_string(epsilon));
}

void check_not_null(const void* p, const char* what) {
  if (!p) throw value_error(std::string(what) + " must not be null");
}

bool empty(const Plan& p) { return p.channels == 0 || p.count == 0; }

// Outputs of more elements than this whose strides are not nested (below) are refused
// rather than checked value by value, as the Python layer does.
constexpr index_t kExactOverlapLimit = index_t{1} << 20;

// Whether two elements of operand op share a location. Sufficient for no, and true of every
// slice or transpose of a dense array: each stride, in increasing order, steps over all that
// the smaller ones span. Otherwise (interleaved or too small strides) the offsets are
// compared, up to kExactOverlapLimit elements; larger ones count as overlapping.
bool overlaps_itself(const Plan& p, int op) {
  std::vector<std::pair<index_t, index_t>> dims;  // (|stride|, size) of the dims that vary
  for (const std::vector<Dim>* list : {&p.channel_dims, &p.reduce_dims})
    for (const Dim& d : *list)
      if (d.size > 1) dims.emplace_back(std::abs(d.stride[static_cast<std::size_t>(op)]), d.size);
  std::sort(dims.begin(), dims.end());
  index_t span = 1;  // elements from the first to the last offset of the dims so far, + 1
  bool nested = true;
  for (const auto& [stride, size] : dims) {
    if (stride < span) {
      nested = false;
      break;
    }
    span = stride > (std::numeric_limits<index_t>::max() - span) / (size - 1) ? std::numeric_limits<index_t>::max()
                                                                              : span + stride * (size - 1);
  }
  if (nested) return false;
  if (p.channels > kExactOverlapLimit / std::max<index_t>(1, p.count)) return true;
  std::vector<index_t> offsets{0};
  for (const auto& [stride, size] : dims) {
    std::vector<index_t> next;
    next.reserve(offsets.size() * static_cast<std::size_t>(size));
    for (index_t o : offsets)
      for (index_t i = 0; i < size; ++i) next.push_back(o + i * stride);
    offsets.swap(next);
  }
  std::sort(offsets.begin(), offsets.end());
  return std::adjacent_find(offsets.begin(), offsets.end()) != offsets.end();
}

// An output must give every element its own location (an empty one has nothing to place).
void check_output(const Plan& p, int op, const char* what) {
  if (empty(p)) return;
  for (const std::vector<Dim>* dims : {&p.channel_dims, &p.reduce_dims})
    for (const Dim& d : *dims)
      if (d.stride[static_cast<std::size_t>(op)] == 0)
        throw value_error(std::string(what) + " has a zero stride: several elements would share one location");
  if (overlaps_itself(p, op))
    throw value_error(std::string(what) +
                      " overlaps itself: its strides give several elements one location (interleaved or too small)");
}

// Calls rows(offsets, nrows, row_strides) for rows [begin, end) of a channels_last plan.
template <class F>
void for_rows(const Plan& p, index_t begin, index_t end, const F& rows) {
  if (p.reduce_dims.empty()) {
    if (begin < end) rows(p.offset, index_t{1}, Offsets{});
    return;
  }
  const Dim& inner = p.reduce_dims.back();
  const std::size_t outer_dims = p.reduce_dims.size() - 1;
  for (index_t r = begin; r < end;) {
    const index_t i = r % inner.size;
    const index_t len = std::min(inner.size - i, end - r);
    Offsets off{};
    for (int op = 0; op < p.operands; ++op) {
      const auto o = static_cast<std::size_t>(op);
      off[o] = p.offset[o] + p.reduce_offset(r / inner.size, outer_dims, op) + i * inner.stride[o];
    }
    rows(off, len, inner.stride);
    r += len;
  }
}

// The runs of a channels_first / strided plan: units (channel, outer index, piece), each a
// stretch of at most `piece` values along the innermost reduce dimension. Cutting long runs
// into pieces of a fixed length lets few channels with long runs (C = 1, or RGB planes) use
// every thread; the cut does not depend on the thread count.
//
// Unit numbers follow memory order where the passes stream: in NCHW the channels of one
// image are neighbours (outer-major: u = (outer*C + c)*pieces + piece), so a thread's range
// of units is one contiguous stretch of memory, read by the hardware prefetcher as a single
// stream, rather than N runs per channel scattered C*S apart.
constexpr index_t kPiece = index_t{1} << 15;

struct Runs {
  index_t length = 1;  // of a whole run
  Offsets stride{};
  index_t piece = 1;  // values per unit (the last piece of a run may be shorter)
  index_t pieces = 1;
  index_t per_channel = 1;  // units per channel
  index_t total = 0;
  bool outer_major = false;  // unit numbering: outer index before channel (see above)
};

Runs runs_of(const Plan& p) {
  Runs r;
  if (!p.reduce_dims.empty()) {
    r.length = p.reduce_dims.back().size;
    r.stride = p.reduce_dims.back().stride;
  }
  r.piece = std::max<index_t>(1, std::min(r.length, kPiece));
  r.pieces = (r.length + r.piece - 1) / r.piece;
  r.per_channel = p.count / r.length * r.pieces;
  r.total = p.channels * r.per_channel;
  if (p.reduce_dims.size() >= 2 && !p.channel_dims.empty()) {
    const index_t outer_stride = p.reduce_dims[p.reduce_dims.size() - 2].stride[0];
    r.outer_major = p.channel_dims.back().stride[0] < outer_stride;
  }
  return r;
}

// Offsets of (channel c, outer index, start within the run).
inline Offsets run_offsets(const Plan& p, const Runs& r, index_t c, index_t outer, index_t start) {
  const std::size_t outer_dims = p.reduce_dims.empty() ? 0 : p.reduce_dims.size() - 1;
  Offsets off{};
  for (int op = 0; op < p.operands; ++op) {
    const auto o = static_cast<std::size_t>(op);
    off[o] = p.offset[o] + p.channel_offset(c, op) + p.reduce_offset(outer, outer_dims, op) + start * r.stride[o];
  }
  return off;
}

// A group of runs that one call of a runs kernel takes: `count` runs of `length` values
// from `offsets` on, `stride` apart, of channels c, c + step, c + 2*step, ... (step 0: all
// of channel c). Runs are grouped where they are contiguous (channels_first, unsplit) and
// the order walks a single channel dimension (consecutive channels) or a single outer
// dimension (one channel's runs); otherwise a group is one unit.
struct RunGroup {
  index_t c;
  Offsets offsets;
  index_t length, count, step;
  Offsets stride;  // between runs
  Offsets elem;    // within a run (1 in every array for channels_first)
};

// Calls run(group) for the units [begin, end), numbered outer-major or channel-major.
template <class F>
void for_run_groups(const Plan& p, const Runs& r, bool outer_major, index_t begin, index_t end, const F& run) {
  const index_t outers = r.per_channel / r.pieces;
  const bool contiguous_runs = p.kind == Kind::channels_first && r.pieces == 1;
  const bool by_channel = outer_major && contiguous_runs && p.channel_dims.size() == 1;
  const bool by_outer = !outer_major && contiguous_runs && p.reduce_dims.size() == 2;
  for (index_t u = begin; u < end;) {
    const index_t whole = u / r.pieces;  // the run's number
    const index_t c = outer_major ? whole % p.channels : whole / outers;
    const index_t outer = outer_major ? whole / p.channels : whole % outers;
    const index_t start = (u % r.pieces) * r.piece;
    RunGroup g{c, run_offsets(p, r, c, outer, start), std::min(r.piece, r.length - start), 1, 0, Offsets{}, r.stride};
    if (by_channel) {
      g.count = std::min(end - u, p.channels - c);
      g.step = 1;
      g.stride = p.channel_dims[0].stride;
    } else if (by_outer) {
      g.count = std::min(end - u, outers - outer);
      g.stride = p.reduce_dims[0].stride;
    }
    run(g);
    u += g.count;
  }
}

// One group through the kernels: the runs kernels take contiguous runs, the run kernels
// one run of any stride.
template <class T>
void reduce1_group(const KernelTable<T>& kt, const RunGroup& g, const T* x, const Coefs<compute_t<T>>& k, double* s,
                   double* ss, index_t ahead) {
  if (g.elem[0] == 1)
    kt.reduce1_runs({x + g.offsets[0], g.stride[0]}, g.length, g.count, g.step, k, s, ss, ahead);
  else
    kt.reduce1_run({x + g.offsets[0], g.elem[0]}, g.length, k, s, ss, ahead);
}
template <class T>
void affine1_group(const KernelTable<T>& kt, const RunGroup& g, const T* x, T* y, const Coefs<compute_t<T>>& k,
                   bool relu, Output out) {
  if (g.elem[0] == 1 && g.elem[1] == 1)
    kt.affine1_runs({x + g.offsets[0], g.stride[0]}, {y + g.offsets[1], g.stride[1]}, g.length, g.count, g.step, k,
                    relu, out);
  else
    kt.affine1_run({x + g.offsets[0], g.elem[0]}, {y + g.offsets[1], g.elem[1]}, g.length, k, relu, out);
}
template <class T>
void reduce2_group(const KernelTable<T>& kt, const RunGroup& g, const T* dy, const T* x, const Coefs<compute_t<T>>& k,
                   bool relu, double* s, double* ss, index_t ahead) {
  if (g.elem[0] == 1 && g.elem[1] == 1)
    kt.reduce2_runs({dy + g.offsets[1], g.stride[1]}, {x + g.offsets[0], g.stride[0]}, g.length, g.count, g.step, k,
                    relu, s, ss, ahead);
  else
    kt.reduce2_run({dy + g.offsets[1], g.elem[1]}, {x + g.offsets[0], g.elem[0]}, g.length, k, relu, s, ss, ahead);
}
template <class T>
void affine2_group(const KernelTable<T>& kt, const RunGroup& g, const T* dy, const T* x, T* dx,
                   const Coefs<compute_t<T>>& k, bool relu, Output out) {
  if (g.elem[0] == 1 && g.elem[1] == 1 && g.elem[2] == 1)
    kt.affine2_runs({dy + g.offsets[1], g.stride[1]}, {x + g.offsets[0], g.stride[0]}, {dx + g.offsets[2], g.stride[2]},
                    g.length, g.count, g.step, k, relu, out);
  else
    kt.affine2_run({dy + g.offsets[1], g.elem[1]}, {x + g.offsets[0], g.elem[0]}, {dx + g.offsets[2], g.elem[2]},
                   g.length, k, relu, out);
}

// Work items of a plan (rows or runs), for splitting among threads.
index_t work_items(const Plan& p) { return p.kind == Kind::channels_last ? p.count : runs_of(p).total; }

// A per-channel sum pass (reduce-1 or reduce-2): sums (s, ss) per channel into out_s,
// out_ss (zeroed here). rows_fn(offsets, nrows, row_strides, s, ss) and
// run_fn(group, s_c, ss_c) do one group of work items (s_c, ss_c: the group's first channel).
template <class RowsFn, class RunFn>
void reduce_pass(const Plan& p, double* out_s, double* out_ss, const RowsFn& rows_fn, const RunFn& run_fn) {
  const index_t C = p.channels;
  std::fill(out_s, out_s + C, 0.0);
  std::fill(out_ss, out_ss + C, 0.0);
  const int nt = threads_for(p.channels * p.count);
  std::vector<double> partial(nt > 1 ? static_cast<std::size_t>(2 * nt * C) : 0, 0.0);
  const Runs runs = runs_of(p);
  const index_t items = work_items(p);
  parallel(nt, [&](int t, int n) {
    double* s = nt > 1 ? partial.data() + 2 * t * C : out_s;
    double* ss = nt > 1 ? s + C : out_ss;
    index_t begin, end;
    partition(items, t, n, begin, end);
    if (p.kind == Kind::channels_last)
      for_rows(p, begin, end,
               [&](const Offsets& off, index_t nrows, const Offsets& rs) { rows_fn(off, nrows, rs, s, ss); });
    else
      for_run_groups(p, runs, runs.outer_major, begin, end, [&](const RunGroup& g) { run_fn(g, s + g.c, ss + g.c); });
  });
  if (nt > 1)
    for (int t = 0; t < nt; ++t) {
      const double* s = partial.data() + 2 * t * C;
      for (index_t c = 0; c < C; ++c) {
        out_s[c] += s[c];
        out_ss[c] += s[C + c];
      }
    }
}

// After a sum pass over the same arrays (training forward, backward), the elementwise pass
// walks each thread's share back to front, in chunks of kReverseChunkBytes read front to
// back: what the sums read last is still in cache (L2, then L3) and is used before it is
// evicted, instead of being evicted by the start of the array. Medians of three paired
// runs at 2 threads (benchmarks/passes.py, float32, fractions of the copy limit): dense
// 256x4096 training forward 0.81 -> 0.91, r50-7-nhwc 0.98 -> 1.05, r50-7-nchw 1.22 -> 1.25.
// Only for arrays of up to kReverseMaxBytes, half a last-level cache: beyond, what the
// sums read last has partly been evicted, and r50-28-nhwc float16 training forward
// (25.7 MB) ran 7-15% slower back to front, r50-28/56-nhwc float32 4-6% slower at one
// thread (dense 4096x1024 backward, 32 MiB of x and dy, was 13% faster: the gain depends
// on what else the cache holds). Chunks of 256 KiB were slower than 2 MiB.
constexpr std::size_t kReverseChunkBytes = std::size_t{2} << 20;
constexpr std::size_t kReverseMaxBytes = std::size_t{16} << 20;

// Work items per chunk of a back-to-front pass that re-reads `reread_bytes` per element
// (summed over the arrays), or 0 (front to back) for none or beyond kReverseMaxBytes.
index_t reverse_chunk(const Plan& p, const Runs& runs, std::size_t reread_bytes) {
  const auto bytes = static_cast<std::size_t>(p.channels) * static_cast<std::size_t>(p.count) * reread_bytes;
  if (reread_bytes == 0 || bytes > kReverseMaxBytes) return 0;
  const index_t item = p.kind == Kind::channels_last ? p.channels : runs.piece;
  const auto item_bytes = static_cast<std::size_t>(item) * reread_bytes;
  return static_cast<index_t>(std::max<std::size_t>(1, kReverseChunkBytes / std::max<std::size_t>(1, item_bytes)));
}

// An elementwise pass (affine-1 or affine-2). After a sum pass that read `reread_bytes` per
// element it goes back to front where that pays (see kReverseChunkBytes); 0: front to back.
template <class RowsFn, class RunFn>
void map_pass(const Plan& p, const RowsFn& rows_fn, const RunFn& run_fn, std::size_t reread_bytes = 0) {
  const Runs runs = runs_of(p);
  const index_t items = work_items(p);
  const index_t chunk = reverse_chunk(p, runs, reread_bytes);
  parallel(threads_for(p.channels * p.count), [&](int t, int n) {
    index_t begin, end;
    partition(items, t, n, begin, end);
    auto range = [&](index_t lo, index_t hi) {
      if (p.kind == Kind::channels_last)
        for_rows(p, lo, hi, rows_fn);
      else
        for_run_groups(p, runs, runs.outer_major, lo, hi, run_fn);
    };
    if (chunk <= 0) return range(begin, end);
    for (index_t hi = end; hi > begin;) {
      const index_t lo = std::max(begin, hi - chunk);
      range(lo, hi);
      hi = lo;
    }
  });
}

// Outputs at least this large are written with non-temporal stores: they cannot stay in
// cache anyway, and skipping the read-for-ownership of their cache lines saves a third of an
// elementwise pass's memory traffic. Smaller outputs stay in cache for whoever reads them next.
constexpr std::size_t kStreamBytes = std::size_t{16} << 20;

// Channels-first runs shorter than this are written with ordinary stores whatever the size:
// a short run shares its first and last cache lines with the runs of its neighbouring
// channels, and lines written partly streamed and partly not cost more than streaming
// saves. Measured at 2 threads (benchmarks/passes.py, float32, x of 26-77 MB): inference
// of 64x2048x7x7 (196-byte runs) 1.9-2.0 ms streamed against 1.07-1.10 ms not, 128x1024x8x8
// (256 B) 2.3-2.4 against 1.0-1.4, 128x1024x12x12 (576 B) 3.38 against 3.13-3.14 (training
// forward and backward alike); 128x1024x13x13 (676 B) 3.54-3.66 streamed against
// 3.76-3.78, and longer runs gain more from streaming.
constexpr std::size_t kMinStreamRunBytes = 640;

template <class T>
bool stream_output(const Plan& p) {
  if (static_cast<std::size_t>(p.channels) * static_cast<std::size_t>(p.count) * sizeof(T) < kStreamBytes) return false;
  return p.kind == Kind::channels_last || p.reduce_dims.empty() ||
         static_cast<std::size_t>(p.reduce_dims.back().size) * sizeof(T) >= kMinStreamRunBytes;
}

template <class T>
const KernelTable<T>& kernels() {
  return active_tables().get<T>();
}

template <class T>
Coefs<compute_t<T>> at_channel(const Coefs<compute_t<T>>& k, index_t c) {
  auto at = [c](const compute_t<T>* v) { return v ? v + c : v; };
  return {at(k.a), at(k.m), at(k.b), at(k.k1), at(k.k2), at(k.k3)};
}

// The shift K of channel c: its first value, unless that is infinite or NaN, which would
// turn every x - K into NaN; K = 0 lets the sums follow IEEE arithmetic (mean([inf, 1]) = inf).
template <class T>
compute_t<T> channel_shift(const Plan& p, const T* x, index_t c) {
  using C = compute_t<T>;
  const T* first = x + p.offset[0] + p.channel_offset(c, 0);
  C v;
  if constexpr (std::is_same_v<T, C>)
    v = *first;
  else
    v = static_cast<float>(*first);
  return std::isfinite(v) ? v : C(0);
}

// mean and M2 of M values from their sums s = sum(x - K), ss = sum((x - K)^2).
inline void moments_from_sums(double shift, double s, double ss, double M, double& mean, double& m2) {
  mean = shift + s / M;
  m2 = ss - s * s / M;
  if (m2 < 0) m2 = 0;  // rounding only; NaN stays NaN
}

// Per-channel sums of x - K over the whole array (streaming), then mean and M2 in double.
template <class T>
void sum_moments(const Plan& p, const T* x, double* mean, double* m2) {
  using C = compute_t<T>;
  const index_t ch = p.channels;
  std::vector<C> shift(static_cast<std::size_t>(ch));
  for (index_t c = 0; c < ch; ++c) shift[static_cast<std::size_t>(c)] = channel_shift(p, x, c);
  Coefs<C> k;
  k.m = shift.data();
  std::vector<double> s(static_cast<std::size_t>(ch)), ss(static_cast<std::size_t>(ch));
  const KernelTable<T>& kt = kernels<T>();
  reduce_pass(
      p, s.data(), ss.data(),
      [&](const Offsets& off, index_t rows, const Offsets& rs, double* ps, double* pss) {
        kt.reduce1_rows({x + off[0], rs[0]}, rows, ch, k, ps, pss);
      },
      [&](const RunGroup& g, double* ps, double* pss) { reduce1_group(kt, g, x, at_channel<T>(k, g.c), ps, pss, 0); });
  for (std::size_t c = 0; c < shift.size(); ++c)
    moments_from_sums(static_cast<double>(shift[c]), s[c], ss[c], static_cast<double>(p.count), mean[c], m2[c]);
}

// Channel blocks. When a channels_first array's channel fits in cache, one thread takes each
// channel through both passes (sums, then the elementwise pass) while its values are still
// in its L2, so the second pass reads cache instead of memory: a training forward moves 2
// bytes per input byte instead of 3, a backward 3 instead of 5. Channels are split among
// threads, so each channel's sums are one thread's and do not depend on the thread count.
// The limit is a share of the last-level cache rather than L2: a channel of a few MiB is
// still there (or in L2) when it is read again. ResNet's 32x64x112x112 backward (3.2 MB of
// x and dy per channel) measured 0.94 -> 1.01 of the copy limit at one thread with 4 MiB
// against 512 KiB; the 512 KiB cases were unchanged.
constexpr std::size_t kChannelCacheBytes = std::size_t{4} << 20;
constexpr std::size_t kMinBlockRunBytes = 1024;

// Threads for the channel-block schedule, or 0 where streaming passes are the better choice.
inline int channel_block_threads(const Plan& p, std::size_t bytes_per_value) {
  if (p.kind == Kind::channels_last) return 0;
  if (static_cast<std::size_t>(p.count) * bytes_per_value > kChannelCacheBytes) return 0;
  // Short runs (ResNet's 7x7 maps) scatter a channel over many small pieces of memory: one
  // channel's 32 runs of 196 bytes sit 400 KB apart, each a cold miss. Streaming passes
  // read them in memory order instead, which measured 1.5x faster at r50-7 shapes.
  if (static_cast<std::size_t>(p.reduce_dims.empty() ? 1 : p.reduce_dims.back().size) * bytes_per_value <
      kMinBlockRunBytes)
    return 0;
  const int nt = threads_for(p.channels * p.count);
  return nt == 1 || p.channels >= 4 * nt ? nt : 0;  // few channels: balance by pieces instead
}

// Element distance from channel c's values to channel c + 1's in the given input arrays,
// when it is the same in all of them (the prefetch distance of the channel-block
// schedule), else 0 (no prefetch).
inline index_t next_channel_distance(const Plan& p, index_t c, std::initializer_list<int> inputs) {
  index_t distance = 0;
  for (int op : inputs) {
    const index_t d = p.channel_offset(c + 1, op) - p.channel_offset(c, op);
    if (op != *inputs.begin() && d != distance) return 0;
    distance = d;
  }
  return distance;
}

// Calls run(group) for units [u0, u1) of channel c (numbered 0 .. runs.per_channel - 1).
template <class F>
void for_channel(const Plan& p, const Runs& r, index_t c, index_t u0, index_t u1, const F& run) {
  for_run_groups(p, r, false, c * r.per_channel + u0, c * r.per_channel + u1, run);
}

// The channel-block schedule overlaps memory traffic with arithmetic: while channel c is
// summed and then written, channel c + 1 is prefetched, the first half of its units during
// the sums and the rest during the elementwise pass (which also writes c), so the memory
// never idles while a channel is processed from cache. Distances of 0 prefetch nothing.
// Calls pass(group, ahead) for the units of channel c: the first half with ahead = the
// distance to channel c + 1 when `first_half_ahead`, the second half with it otherwise.
template <class F>
void channel_halves(const Plan& p, const Runs& r, index_t c, index_t distance, bool first_half_ahead, const F& pass) {
  const index_t half = r.per_channel / 2;
  for_channel(p, r, c, 0, half, [&](const RunGroup& g) { pass(g, first_half_ahead ? distance : 0); });
  for_channel(p, r, c, half, r.per_channel, [&](const RunGroup& g) { pass(g, first_half_ahead ? 0 : distance); });
}

// after_sums: x was just read front to back (see kReverseChunkBytes).
template <class T>
void affine1(const Plan& p, const T* x, T* y, const Coefs<compute_t<T>>& k, bool relu, bool after_sums) {
  const KernelTable<T>& kt = kernels<T>();
  const bool stream = stream_output<T>(p);
  map_pass(
      p,
      [&](const Offsets& off, index_t rows, const Offsets& rs) {
        kt.affine1_rows({x + off[0], rs[0]}, {y + off[1], rs[1]}, rows, p.channels, k, relu, stream);
      },
      [&](const RunGroup& g) { affine1_group(kt, g, x, y, at_channel<T>(k, g.c), relu, stream); },
      after_sums ? sizeof(T) : 0);
}

// Per-channel coefficients of an affine pass, in the compute type.
template <class C>
struct CoefStore {
  std::vector<C> a, m, b, k1, k2, k3;
  explicit CoefStore(index_t channels, bool backward) {
    const auto n = static_cast<std::size_t>(channels);
    a.resize(n), m.resize(n), b.resize(n);
    if (backward) k1.resize(n), k2.resize(n), k3.resize(n);
  }
  Coefs<C> view() const {
    auto ptr = [](const std::vector<C>& v) { return v.empty() ? nullptr : v.data(); };
    return {ptr(a), ptr(m), ptr(b), ptr(k1), ptr(k2), ptr(k3)};
  }
};

template <class S>
double gamma_of(const Affine<S>& affine, index_t c) {
  return affine.gamma ? static_cast<double>(affine.gamma[c]) : 1.0;
}
template <class S>
double beta_of(const Affine<S>& affine, index_t c) {
  return affine.beta ? static_cast<double>(affine.beta[c]) : 0.0;
}

// a = gamma*inv_std, m = mean, b = beta: the forward pass's coefficients of channel c.
template <class T>
void forward_coef(const Affine<stat_t<T>>& affine, index_t c, stat_t<T> mean, double inv_std, compute_t<T>& a,
                  compute_t<T>& m, compute_t<T>& b) {
  using C = compute_t<T>;
  a = static_cast<C>(gamma_of(affine, c) * inv_std);
  m = static_cast<C>(mean);
  b = static_cast<C>(beta_of(affine, c));
}

template <class T>
void set_forward_coefs(CoefStore<compute_t<T>>& k, index_t channels, const stat_t<T>* mean, const double* inv_std,
                       const Affine<stat_t<T>>& affine) {
  for (index_t c = 0; c < channels; ++c) {
    const auto i = static_cast<std::size_t>(c);
    forward_coef<T>(affine, c, mean[c], inv_std[c], k.a[i], k.m[i], k.b[i]);
  }
}

// Stores channel c's statistics in the statistics type; returns inv_std as stored, so every
// later pass (and backward) derives its coefficients from the same value.
template <class S>
double store_stats(index_t c, double mean, double m2, double count, double epsilon, S* mean_out, S* var_out,
                   S* inv_out) {
  const double var = m2 / count;
  mean_out[c] = static_cast<S>(mean);
  var_out[c] = static_cast<S>(var);
  inv_out[c] = static_cast<S>(1.0 / std::sqrt(var + epsilon));
  return static_cast<double>(inv_out[c]);
}

// The training forward in channel blocks (see channel_block_threads).
template <class T>
void forward_channel_blocks(const Plan& p, int nt, const T* x, T* y, const Affine<stat_t<T>>& affine, double epsilon,
                            bool relu, stat_t<T>* mean, stat_t<T>* variance, stat_t<T>* inv_std) {
  using C = compute_t<T>;
  const Runs runs = runs_of(p);
  const KernelTable<T>& kt = kernels<T>();
  const double M = static_cast<double>(p.count);
  const bool stream = stream_output<T>(p);
  parallel(nt, [&](int t, int n) {
    index_t c0, c1;
    partition(p.channels, t, n, c0, c1);
    for (index_t c = c0; c < c1; ++c) {
      C shift = channel_shift(p, x, c);
      Coefs<C> k;
      k.m = &shift;
      const index_t next = c + 1 < c1 ? next_channel_distance(p, c, {0}) : 0;
      double s = 0, ss = 0;
      channel_halves(p, runs, c, next, true,
                     [&](const RunGroup& g, index_t ahead) { reduce1_group(kt, g, x, k, &s, &ss, ahead); });
      double mu, m2;
      moments_from_sums(static_cast<double>(shift), s, ss, M, mu, m2);
      const double inv = store_stats(c, mu, m2, M, epsilon, mean, variance, inv_std);
      C a, m, b;
      forward_coef<T>(affine, c, mean[c], inv, a, m, b);
      const Coefs<C> kc{&a, &m, &b};
      channel_halves(p, runs, c, next, false, [&](const RunGroup& g, index_t ahead) {
        affine1_group(kt, g, x, y, kc, relu, Output(stream, ahead));
      });
    }
  });
}

}  // namespace
}  // namespace detail

using namespace detail;

Extent extent(const Geometry& g) {
  const Strides none;
  const Plan p = make_plan(g, {&none});
  return {p.channels, p.count};
}

template <class T>
index_t partial_moments(const Geometry& g, In<T> x, double* mean, double* m2) {
  static_assert(is_element_v<T>, "unsupported element type");
  const Plan p = make_plan(g, operand_strides({&x.strides}));
  check_not_null(mean, "mean");
  check_not_null(m2, "m2");
  if (p.count == 0) {
    std::fill(mean, mean + p.channels, 0.0);
    std::fill(m2, m2 + p.channels, 0.0);
    return 0;
  }
  if (p.channels == 0) return p.count;
  check_not_null(x.data, "x");
  sum_moments(p, x.data, mean, m2);
  return p.count;
}

void merge_moments(index_t channels, double* count_a, double* mean_a, double* m2_a, const double* count_b,
                   const double* mean_b, const double* m2_b) {
  for (index_t c = 0; c < channels; ++c) {
    const double na = count_a[c], nb = count_b[c], n = na + nb;
    if (nb == 0) continue;
    const double delta = mean_b[c] - mean_a[c];
    mean_a[c] += delta * (nb / n);
    m2_a[c] += m2_b[c] + delta * delta * (na * nb / n);
    count_a[c] = n;
  }
}

template <class T>
index_t moments(const Geometry& g, In<T> x, stat_t<T>* mean, stat_t<T>* variance) {
  static_assert(is_element_v<T>, "unsupported element type");
  const Plan p = make_plan(g, operand_strides({&x.strides}));
  if (p.count == 0) throw value_error("moments of an empty batch: the reduced axes hold no values");
  check_not_null(mean, "mean");
  check_not_null(variance, "variance");
  if (p.channels == 0) return p.count;
  check_not_null(x.data, "x");
  std::vector<double> mu(static_cast<std::size_t>(p.channels)), m2(mu.size());
  sum_moments(p, x.data, mu.data(), m2.data());
  for (index_t c = 0; c < p.channels; ++c) {
    mean[c] = static_cast<stat_t<T>>(mu[static_cast<std::size_t>(c)]);
    variance[c] = static_cast<stat_t<T>>(m2[static_cast<std::size_t>(c)] / static_cast<double>(p.count));
  }
  return p.count;
}

template <class T>
void normalize(const Geometry& g, In<T> x, Out<T> y, const stat_t<T>* mean, const stat_t<T>* variance,
               Affine<stat_t<T>> affine, double epsilon, Activation activation) {
  static_assert(is_element_v<T>, "unsupported element type");
  check_epsilon(epsilon);
  const Plan p = make_plan(g, operand_strides({&x.strides, &y.strides}));
  check_output(p, 1, "y");
  check_not_null(mean, "mean");
  check_not_null(variance, "variance");
  if (empty(p)) return;
  check_not_null(x.data, "x");
  check_not_null(y.data, "y");
  std::vector<double> inv_std(static_cast<std::size_t>(p.channels));
  for (index_t c = 0; c < p.channels; ++c)  // rounded as forward() stores it
    inv_std[static_cast<std::size_t>(c)] =
        static_cast<stat_t<T>>(1.0 / std::sqrt(static_cast<double>(variance[c]) + epsilon));
  CoefStore<compute_t<T>> k(p.channels, false);
  set_forward_coefs<T>(k, p.channels, mean, inv_std.data(), affine);
  affine1(p, x.data, y.data, k.view(), activation == Activation::relu, false);
}

template <class T>
index_t forward(const Geometry& g, In<T> x, Out<T> y, Affine<stat_t<T>> affine, double epsilon, Activation activation,
                stat_t<T>* mean, stat_t<T>* variance, stat_t<T>* inv_std) {
  static_assert(is_element_v<T>, "unsupported element type");
  check_epsilon(epsilon);
  const Plan p = make_plan(g, operand_strides({&x.strides, &y.strides}));
  check_output(p, 1, "y");
  if (p.count == 0) throw value_error("training on an empty batch: the reduced axes hold no values");
  check_not_null(mean, "mean");
  check_not_null(variance, "variance");
  check_not_null(inv_std, "inv_std");
  if (p.channels == 0) return p.count;
  check_not_null(x.data, "x");
  check_not_null(y.data, "y");
  const bool relu = activation == Activation::relu;
  if (const int nt = channel_block_threads(p, sizeof(T))) {
    forward_channel_blocks(p, nt, x.data, y.data, affine, epsilon, relu, mean, variance, inv_std);
    return p.count;
  }
  const auto n = static_cast<std::size_t>(p.channels);
  std::vector<double> mu(n), m2(n), inv(n);
  sum_moments(p, x.data, mu.data(), m2.data());
  for (std::size_t c = 0; c < n; ++c)
    inv[c] = store_stats(static_cast<index_t>(c), mu[c], m2[c], static_cast<double>(p.count), epsilon, mean, variance,
                         inv_std);
  CoefStore<compute_t<T>> k(p.channels, false);
  set_forward_coefs<T>(k, p.channels, mean, inv.data(), affine);
  affine1(p, x.data, y.data, k.view(), relu, true);
  return p.count;
}

namespace detail {
namespace {

// What both halves of backward share: the plan (x, dy, dx) and the forward coefficients.
template <class T>
struct BackwardSetup {
  Plan plan;
  std::vector<double> inv;
  CoefStore<compute_t<T>> k;
  bool relu;

  BackwardSetup(const Geometry& g, const Strides& xs, const Strides& dys, const Strides* dxs, const stat_t<T>* mean,
                const stat_t<T>* inv_std, const Affine<stat_t<T>>& affine, Activation activation)
      : plan(dxs ? make_plan(g, operand_strides({&xs, &dys, dxs})) : make_plan(g, operand_strides({&xs, &dys}))),
        inv(static_cast<std::size_t>(plan.channels)),
        k(plan.channels, true),
        relu(activation == Activation::relu) {
    if (dxs) check_output(plan, 2, "dx");
    for (const void* ptr : {static_cast<const void*>(mean), static_cast<const void*>(inv_std)})
      check_not_null(ptr, "mean and inv_std");
    for (std::size_t c = 0; c < inv.size(); ++c) inv[c] = static_cast<double>(inv_std[c]);
    set_forward_coefs<T>(k, plan.channels, mean, inv.data(), affine);
  }

  // k1, k2, k3 of channel c from its sums over `count` values (see the comment at the top).
  void set_apply_coef(std::size_t c, const Affine<stat_t<T>>& affine, double sum_dy, double sum_dy_xc, index_t count,
                      Statistics statistics) {
    using C = compute_t<T>;
    const double M = static_cast<double>(count);
    const bool batch = statistics == Statistics::batch;
    const double a = gamma_of(affine, static_cast<index_t>(c)) * inv[c];
    const double dgamma = sum_dy_xc * inv[c];
    k.k1[c] = static_cast<C>(a);
    k.k2[c] = static_cast<C>(batch ? -a * inv[c] * dgamma / M : 0.0);
    k.k3[c] = static_cast<C>(batch ? -a * sum_dy / M : 0.0);
  }
};

// The whole backward in channel blocks (see channel_block_threads).
template <class T>
void backward_channel_blocks(BackwardSetup<T>& b, int nt, const T* dy, const T* x, T* dx,
                             const Affine<stat_t<T>>& affine, Statistics statistics, stat_t<T>* dgamma,
                             stat_t<T>* dbeta) {
  const Plan& p = b.plan;
  const Runs runs = runs_of(p);
  const KernelTable<T>& kt = kernels<T>();
  const Coefs<compute_t<T>> kv = b.k.view();
  const bool stream = stream_output<T>(p);
  parallel(nt, [&](int t, int n) {
    index_t c0, c1;
    partition(p.channels, t, n, c0, c1);
    for (index_t c = c0; c < c1; ++c) {
      const Coefs<compute_t<T>> kc = at_channel<T>(kv, c);
      const index_t next = c + 1 < c1 ? next_channel_distance(p, c, {0, 1}) : 0;
      double sum_dy = 0, sum_dy_xc = 0;
      channel_halves(p, runs, c, next, true, [&](const RunGroup& g, index_t ahead) {
        reduce2_group(kt, g, dy, x, kc, b.relu, &sum_dy, &sum_dy_xc, ahead);
      });
      const auto i = static_cast<std::size_t>(c);
      dbeta[c] = static_cast<stat_t<T>>(sum_dy);
      dgamma[c] = static_cast<stat_t<T>>(sum_dy_xc * b.inv[i]);
      b.set_apply_coef(i, affine, sum_dy, sum_dy_xc, p.count, statistics);
      channel_halves(p, runs, c, next, false, [&](const RunGroup& g, index_t ahead) {
        affine2_group(kt, g, dy, x, dx, kc, b.relu, Output(stream, ahead));
      });
    }
  });
}

template <class T>
void reduce2(const BackwardSetup<T>& b, const T* dy, const T* x, double* sum_dy, double* sum_dy_xc) {
  const Plan& p = b.plan;
  const index_t ch = p.channels;
  const KernelTable<T>& kt = kernels<T>();
  const Coefs<compute_t<T>> kv = b.k.view();
  const bool relu = b.relu;
  reduce_pass(
      p, sum_dy, sum_dy_xc,
      [&](const Offsets& off, index_t rows, const Offsets& rs, double* s, double* ss) {
        kt.reduce2_rows({dy + off[1], rs[1]}, {x + off[0], rs[0]}, rows, ch, kv, relu, s, ss);
      },
      [&](const RunGroup& g, double* s, double* ss) {
        reduce2_group(kt, g, dy, x, at_channel<T>(kv, g.c), relu, s, ss, 0);
      });
}

template <class T>
void affine2(BackwardSetup<T>& b, const T* dy, const T* x, T* dx, const Affine<stat_t<T>>& affine, const double* sum_dy,
             const double* sum_dy_xc, index_t count, Statistics statistics) {
  using C = compute_t<T>;
  const Plan& p = b.plan;
  for (std::size_t c = 0; c < b.inv.size(); ++c)
    b.set_apply_coef(c, affine, sum_dy[c], sum_dy_xc[c], count, statistics);
  const KernelTable<T>& kt = kernels<T>();
  const Coefs<C> kv = b.k.view();
  const bool relu = b.relu;
  const bool stream = stream_output<T>(p);
  map_pass(
      p,
      [&](const Offsets& off, index_t rows, const Offsets& rs) {
        kt.affine2_rows({dy + off[1], rs[1]}, {x + off[0], rs[0]}, {dx + off[2], rs[2]}, rows, p.channels, kv, relu,
                        stream);
      },
      [&](const RunGroup& g) { affine2_group(kt, g, dy, x, dx, at_channel<T>(kv, g.c), relu, stream); },
      2 * sizeof(T));  // x and dy were just summed, or were by backward_sums
}

void check_inputs(std::initializer_list<const void*> ptrs) {
  for (const void* ptr : ptrs) check_not_null(ptr, "dy, x and dx");
}

}  // namespace
}  // namespace detail

template <class T>
void backward_sums(const Geometry& g, In<T> dy, In<T> x, const stat_t<T>* mean, const stat_t<T>* inv_std,
                   Affine<stat_t<T>> affine, Activation activation, double* sum_dy, double* sum_dy_xc) {
  static_assert(is_element_v<T>, "unsupported element type");
  BackwardSetup<T> b(g, x.strides, dy.strides, nullptr, mean, inv_std, affine, activation);
  check_not_null(sum_dy, "sum_dy");
  check_not_null(sum_dy_xc, "sum_dy_xc");
  if (empty(b.plan)) {
    std::fill(sum_dy, sum_dy + b.plan.channels, 0.0);
    std::fill(sum_dy_xc, sum_dy_xc + b.plan.channels, 0.0);
    return;
  }
  check_inputs({dy.data, x.data});
  reduce2(b, dy.data, x.data, sum_dy, sum_dy_xc);
}

template <class T>
void backward_apply(const Geometry& g, In<T> dy, In<T> x, Out<T> dx, const stat_t<T>* mean, const stat_t<T>* inv_std,
                    Affine<stat_t<T>> affine, Activation activation, const double* sum_dy, const double* sum_dy_xc,
                    index_t count, Statistics statistics) {
  static_assert(is_element_v<T>, "unsupported element type");
  BackwardSetup<T> b(g, x.strides, dy.strides, &dx.strides, mean, inv_std, affine, activation);
  check_not_null(sum_dy, "sum_dy");
  check_not_null(sum_dy_xc, "sum_dy_xc");
  if (count < 1 && statistics == Statistics::batch) throw value_error("backward_apply needs count >= 1");
  if (empty(b.plan)) return;
  check_inputs({dy.data, x.data, dx.data});
  affine2(b, dy.data, x.data, dx.data, affine, sum_dy, sum_dy_xc, count, statistics);
}

template <class T>
void backward(const Geometry& g, In<T> dy, In<T> x, Out<T> dx, const stat_t<T>* mean, const stat_t<T>* inv_std,
              Affine<stat_t<T>> affine, Activation activation, stat_t<T>* dgamma, stat_t<T>* dbeta,
              Statistics statistics) {
  static_assert(is_element_v<T>, "unsupported element type");
  BackwardSetup<T> b(g, x.strides, dy.strides, &dx.strides, mean, inv_std, affine, activation);
  check_not_null(dgamma, "dgamma");
  check_not_null(dbeta, "dbeta");
  const index_t ch = b.plan.channels;
  if (empty(b.plan)) {
    std::fill(dgamma, dgamma + ch, stat_t<T>(0));
    std::fill(dbeta, dbeta + ch, stat_t<T>(0));
    return;
  }
  check_inputs({dy.data, x.data, dx.data});
  if (const int nt = channel_block_threads(b.plan, 2 * sizeof(T))) {  // x and dy stay in cache
    backward_channel_blocks(b, nt, dy.data, x.data, dx.data, affine, statistics, dgamma, dbeta);
    return;
  }
  std::vector<double> sum_dy(static_cast<std::size_t>(ch)), sum_dy_xc(sum_dy.size());
  reduce2(b, dy.data, x.data, sum_dy.data(), sum_dy_xc.data());
  for (std::size_t c = 0; c < sum_dy.size(); ++c) {
    dbeta[c] = static_cast<stat_t<T>>(sum_dy[c]);
    dgamma[c] = static_cast<stat_t<T>>(sum_dy_xc[c] * b.inv[c]);
  }
  affine2(b, dy.data, x.data, dx.data, affine, sum_dy.data(), sum_dy_xc.data(), b.plan.count, statistics);
}

#define BATCHNORM_INSTANTIATE(T)                                                                                       \
  template index_t partial_moments<T>(const Geometry&, In<T>, double*, double*);                                       \
  template index_t moments<T>(const Geometry&, In<T>, stat_t<T>*, stat_t<T>*);                                         \
  template void normalize<T>(const Geometry&, In<T>, Out<T>, const stat_t<T>*, const stat_t<T>*, Affine<stat_t<T>>,    \
                             double, Activation);                                                                      \
  template index_t forward<T>(const Geometry&, In<T>, Out<T>, Affine<stat_t<T>>, double, Activation, stat_t<T>*,       \
                              stat_t<T>*, stat_t<T>*);                                                                 \
  template void backward<T>(const Geometry&, In<T>, In<T>, Out<T>, const stat_t<T>*, const stat_t<T>*,                 \
                            Affine<stat_t<T>>, Activation, stat_t<T>*, stat_t<T>*, Statistics);                        \
  template void backward_sums<T>(const Geometry&, In<T>, In<T>, const stat_t<T>*, const stat_t<T>*, Affine<stat_t<T>>, \
                                 Activation, double*, double*);                                                        \
  template void backward_apply<T>(const Geometry&, In<T>, In<T>, Out<T>, const stat_t<T>*, const stat_t<T>*,           \
                                  Affine<stat_t<T>>, Activation, const double*, const double*, index_t, Statistics);

BATCHNORM_INSTANTIATE(float)
BATCHNORM_INSTANTIATE(double)
BATCHNORM_INSTANTIATE(float16_t)
BATCHNORM_INSTANTIATE(bfloat16_t)

}  // namespace batchnorm
