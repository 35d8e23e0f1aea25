// How each pass is split into work items and over threads (rows, groups of runs, channel
// blocks), in which order it walks memory and how it writes, and the pass drivers that call
// the kernel table of the active instruction set (kernels.hpp).
#pragma once

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <vector>

#include "batchnorm/functional.hpp"
#include "channel_math.hpp"
#include "checks.hpp"
#include "kernels.hpp"
#include "plan.hpp"
#include "threads.hpp"

namespace batchnorm::detail {

using Offsets = std::array<index_t, kMaxOperands>;
// Operand numbers, in the plan's order: x, y for the forward passes, x, dy, dx for backward.
constexpr int kX = 0, kY = 1, kDy = 1, kDx = 2;

// Rows per kernel call in an interruptible pass (threads.hpp): about kInterruptibleValues
// values, so the pass can stop every few milliseconds; at least 64 rows, so the per-call
// setup of the rows kernels (a copy of the coefficients) stays negligible; a multiple of
// kTileRows, the height of the reductions' row tiles, so the sums are those of one call bit for bit.
inline index_t interruptible_rows(const Plan& p) {
  return std::max<index_t>(64, kInterruptibleValues / std::max<index_t>(1, row_channels(p))) / kTileRows * kTileRows;
}

// Calls rows(offsets, nrows, row_strides) for rows [begin, end) of one group of rows of a
// channels_last plan, whose first channel is c0.
template <class F>
void for_group_rows(const Plan& p, index_t c0, index_t begin, index_t end, const F& rows) {
  Offsets base{};
  for (int op = 0; op < p.operands; ++op)
    base[static_cast<std::size_t>(op)] = p.offset[static_cast<std::size_t>(op)] + p.channel_offset(c0, op);
  if (p.reduce_dims.empty()) {
    if (begin < end) rows(base, index_t{1}, Offsets{});
    return;
  }
  const Dim& inner = p.reduce_dims.back();
  const std::size_t outer_dims = p.reduce_dims.size() - 1;
  const index_t most = t_pass ? interruptible_rows(p) : end - begin;
  for (index_t r = begin; r < end;) {
    if (stop_requested()) return;
    const index_t i = r % inner.size;
    const index_t len = std::min({inner.size - i, end - r, most});
    Offsets off{};
    for (int op = 0; op < p.operands; ++op) {
      const auto o = static_cast<std::size_t>(op);
      off[o] = base[o] + p.reduce_offset(r / inner.size, outer_dims, op) + i * inner.stride[o];
    }
    rows(off, len, inner.stride);
    r += len;
  }
}

// Calls rows(offsets, nrows, row_strides, c0) for rows [begin, end) of a channels_last plan,
// numbered group by group (row r is row r % count of group r / count, whose channels start at c0).
template <class F>
void for_rows(const Plan& p, index_t begin, index_t end, const F& rows) {
  const index_t count = std::max<index_t>(1, p.count), rc = row_channels(p);
  for (index_t r = begin; r < end;) {
    const index_t group = r / count, first = group * count, last = std::min(end, first + count);
    for_group_rows(p, group * rc, r - first, last - first,
                   [&](const Offsets& off, index_t nrows, const Offsets& rs) { rows(off, nrows, rs, group * rc); });
    r = last;
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

inline Runs runs_of(const Plan& p) {
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
    if (stop_requested()) return;
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

// The kernels' arguments for operand op of a group of rows or runs (the plan's order).
template <class P>
Strided<P> rows_array(P* base, const Offsets& offsets, const Offsets& row_strides, int op) {
  const auto o = static_cast<std::size_t>(op);
  return {base + offsets[o], row_strides[o]};
}
template <class P>
RunArray<P> run_array(P* base, const RunGroup& g, int op) {
  const auto o = static_cast<std::size_t>(op);
  return {base + g.offsets[o], g.elem[o], g.stride[o]};
}
inline RunShape run_shape(const RunGroup& g) { return {g.length, g.count, g.step}; }

// Work items of a plan (rows or runs), for splitting among threads.
inline index_t work_items(const Plan& p) {
  return p.kind == Kind::channels_last ? row_groups(p) * p.count : runs_of(p).total;
}

// Whether a pass splits channels among threads rather than work items: where per-thread
// scratch (a sum pass's partial sums, two doubles per channel and thread; a rows kernel's
// copy of the coefficients) would take more memory than the input (few values per channel,
// `value_bytes` read per value), each thread takes whole channels instead, and a sum pass
// sums straight into the result. The scratch is then bounded by the input whatever the
// thread count (and the sums no longer depend on it).
inline bool split_channels(const Plan& p, int nt, std::size_t value_bytes) {
  return nt > 1 && p.channels >= nt &&
         2 * sizeof(double) * static_cast<std::size_t>(nt) > static_cast<std::size_t>(p.count) * value_bytes;
}

// Calls rows(offsets, nrows, row_strides, c, nc) for channels [c0, c1) of every row of a
// channels_last plan, a group of rows at a time (channels have stride 1 within a row; a mask
// has one value per row: its channel offsets are 0).
template <class F>
void for_channel_rows(const Plan& p, index_t c0, index_t c1, const F& rows) {
  const index_t rc = row_channels(p);
  for (index_t c = c0; c < c1;) {
    const index_t group = c / rc, stop = std::min(c1, (group + 1) * rc);
    for_group_rows(p, c, 0, p.count,
                   [&](const Offsets& off, index_t nrows, const Offsets& rs) { rows(off, nrows, rs, c, stop - c); });
    c = stop;
  }
}

// A per-channel sum pass (reduce-1 or reduce-2), reading `value_bytes` per value: sums (s, ss)
// per channel into out_s, out_ss (zeroed here). rows_fn(offsets, nrows, row_strides, c0, nc, s, ss)
// does channels [c0, c0 + nc) of a group of rows (s, ss: channel c0's sums), run_fn(group, s_c, ss_c)
// a group of runs (s_c, ss_c: the group's first channel).
template <class RowsFn, class RunFn>
void reduce_pass(const Plan& p, std::size_t value_bytes, double* out_s, double* out_ss, const RowsFn& rows_fn,
                 const RunFn& run_fn) {
  const index_t C = p.channels;
  std::fill(out_s, out_s + C, 0.0);
  std::fill(out_ss, out_ss + C, 0.0);
  const int nt = threads_for(p.channels * p.count);
  const Runs runs = runs_of(p);
  if (split_channels(p, nt, value_bytes)) {
    parallel(nt, p.channels * p.count, [&](int t, int n) {
      index_t c0, c1;
      partition(C, t, n, c0, c1);
      if (p.kind == Kind::channels_last)
        for_channel_rows(p, c0, c1, [&](const Offsets& off, index_t nrows, const Offsets& rs, index_t c, index_t nc) {
          rows_fn(off, nrows, rs, c, nc, out_s + c, out_ss + c);
        });
      else
        for_run_groups(p, runs, false, c0 * runs.per_channel, c1 * runs.per_channel,
                       [&](const RunGroup& g) { run_fn(g, out_s + g.c, out_ss + g.c); });
    });
    return;
  }
  std::vector<double> partial(nt > 1 ? static_cast<std::size_t>(2 * nt * C) : 0, 0.0);
  const index_t items = work_items(p);
  parallel(nt, p.channels * p.count, [&](int t, int n) {
    double* s = nt > 1 ? partial.data() + 2 * t * C : out_s;
    double* ss = nt > 1 ? s + C : out_ss;
    index_t begin, end;
    partition(items, t, n, begin, end);
    if (p.kind == Kind::channels_last)
      for_rows(p, begin, end, [&](const Offsets& off, index_t nrows, const Offsets& rs, index_t c0) {
        rows_fn(off, nrows, rs, c0, row_channels(p), s + c0, ss + c0);
      });
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
// evicted, instead of being evicted by the start of the array. Only for arrays of up to
// kReverseMaxBytes, half a last-level cache: beyond, what the sums read last has partly
// been evicted (measured: docs/performance.md).
constexpr std::size_t kReverseChunkBytes = std::size_t{2} << 20;
constexpr std::size_t kReverseMaxBytes = std::size_t{16} << 20;

// Work items per chunk of a back-to-front pass that re-reads `reread_bytes` per element
// (summed over the arrays), or 0 (front to back) for none or beyond kReverseMaxBytes.
inline index_t reverse_chunk(const Plan& p, const Runs& runs, std::size_t reread_bytes) {
  const auto bytes = static_cast<std::size_t>(p.channels) * static_cast<std::size_t>(p.count) * reread_bytes;
  if (reread_bytes == 0 || bytes > kReverseMaxBytes) return 0;
  const index_t item = p.kind == Kind::channels_last ? row_channels(p) : runs.piece;
  const auto item_bytes = static_cast<std::size_t>(item) * reread_bytes;
  return static_cast<index_t>(std::max<std::size_t>(1, kReverseChunkBytes / std::max<std::size_t>(1, item_bytes)));
}

// Pieces per thread of a front-to-back elementwise pass, taken in turn from a shared
// counter: a thread that starts late (one woken from its sleep takes 30-250 us here) then
// takes fewer, instead of the others waiting for its fixed share. Each value is computed
// the same whichever thread computes it, so the result does not change.
constexpr index_t kPiecesPerThread = 4;

// An elementwise pass (affine-1 or affine-2) reading `value_bytes` per value; rows_fn takes
// for_channel_rows's arguments. After a sum pass that read `reread_bytes` per element it goes
// back to front where that pays (see kReverseChunkBytes), each thread over its own share;
// 0: front to back, in pieces (kPiecesPerThread).
template <class RowsFn, class RunFn>
void map_pass(const Plan& p, std::size_t value_bytes, const RowsFn& rows_fn, const RunFn& run_fn,
              std::size_t reread_bytes = 0) {
  const Runs runs = runs_of(p);
  const index_t items = work_items(p);
  const index_t chunk = reverse_chunk(p, runs, reread_bytes);
  const int nt = threads_for(p.channels * p.count);
  if (p.kind == Kind::channels_last && split_channels(p, nt, value_bytes)) {
    parallel(nt, p.channels * p.count, [&](int t, int n) {
      index_t c0, c1;
      partition(p.channels, t, n, c0, c1);
      for_channel_rows(p, c0, c1, rows_fn);
    });
    return;
  }
  auto range = [&](index_t lo, index_t hi) {
    if (p.kind == Kind::channels_last)
      for_rows(p, lo, hi, [&](const Offsets& off, index_t nrows, const Offsets& rs, index_t c0) {
        rows_fn(off, nrows, rs, c0, row_channels(p));
      });
    else
      for_run_groups(p, runs, runs.outer_major, lo, hi, run_fn);
  };
  if (chunk <= 0) {
    const auto pieces = static_cast<int>(nt > 1 ? std::min<index_t>(items, index_t{nt} * kPiecesPerThread) : 1);
    std::atomic<int> next{0};
    parallel(nt, p.channels * p.count, [&](int, int) {
      for (int k; (k = next.fetch_add(1, std::memory_order_relaxed)) < pieces;) {
        index_t lo, hi;
        partition(items, k, pieces, lo, hi);
        range(lo, hi);
      }
    });
    return;
  }
  parallel(nt, p.channels * p.count, [&](int t, int n) {
    index_t begin, end;
    partition(items, t, n, begin, end);
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
// saves (measured: docs/performance.md).
constexpr std::size_t kMinStreamRunBytes = 640;

template <class T>
bool stream_output(const Plan& p) {
  if (static_cast<std::size_t>(p.channels) * static_cast<std::size_t>(p.count) * sizeof(T) < kStreamBytes) return false;
  return p.kind == Kind::channels_last || p.reduce_dims.empty() ||
         static_cast<std::size_t>(p.reduce_dims.back().size) * sizeof(T) >= kMinStreamRunBytes;
}

// How far ahead (bytes of x) the elementwise passes in memory order prefetch: a 16-bit pass
// does twice the work per cache line of x, and the hardware prefetcher alone then leaves
// its loads waiting on memory (measured: docs/performance.md).
constexpr std::size_t kAheadBytes = 2048;
template <class T>
constexpr index_t ahead_elements() {
  return static_cast<index_t>(kAheadBytes / sizeof(T));
}

// The output of an elementwise pass in memory order: streamed, or prefetched as far ahead as
// its reads (Output::ahead_out; measured: docs/performance.md).
template <class T>
Output memory_order_output(bool stream) {
  return Output(stream, ahead_elements<T>(), ahead_elements<T>());
}

// The channel-block passes prefetch their output two runs on (Output::ahead_out; the
// memory-order passes, as far as their reads): the runs lie far apart, and the line then
// arrives while the run before is written.
inline index_t block_ahead_out(const RunGroup& g, int op) { return 2 * g.stride[static_cast<std::size_t>(op)]; }

template <class T>
const KernelTable<T>& kernels() {
  return active_tables().get<T>();
}

// The mask of a masked plan, summed once (every channel shares it), in order and in double:
// W, the sum of its weights, which the statistics divide by; the positions it selects
// (nonzero weights), the count a masked call reports; and the first of them (a reduce
// index), where each channel's shift is read.
struct MaskSum {
  double total = 0;
  index_t selected = 0;
  index_t first = 0;
};

// The mask operand of a call: its weights (null: no mask) and their sum.
template <class T>
struct Mask {
  const T* w = nullptr;
  MaskSum sum;
};

template <class T>
MaskSum sum_mask(const Plan& p, const T* w) {
  MaskSum m;
  if (p.count == 0) return m;
  const int op = mask_operand(p);
  const std::size_t dims = p.reduce_dims.size();
  const index_t inner = dims ? p.reduce_dims.back().size : 1;
  const index_t step = dims ? p.reduce_dims.back().stride[static_cast<std::size_t>(op)] : 0;
  bool found = false;
  for (index_t o = 0, i = 0; o < p.count / inner; ++o) {
    const T* run = w + p.offset[static_cast<std::size_t>(op)] + p.reduce_offset(o, dims ? dims - 1 : 0, op);
    for (index_t j = 0; j < inner; ++j, ++i) {
      const auto v = static_cast<double>(static_cast<compute_t<T>>(run[j * step]));
      if (v != 0) {
        if (!found) m.first = i, found = true;
        ++m.selected;
      }
      m.total += v;
    }
  }
  return m;
}

// Throws value_error unless the mask selects something and its weights have a positive, finite sum.
inline void check_mask(const MaskSum& m) {
  if (m.selected == 0) throw value_error("the mask selects nothing: no position of the batch has a nonzero mask value");
  if (!std::isfinite(m.total) || m.total <= 0) throw value_error("the mask's values must have a positive, finite sum");
}

// The count the statistics divide by: the values per channel, or the mask's W.
template <class T>
double stat_count(const Plan& p, const Mask<T>& mask) {
  return mask.w ? mask.sum.total : static_cast<double>(p.count);
}

// mean and variance of channel c from its sums (summed into mean, var); without a mask, a
// float64 channel whose shift was far from its mean is summed again around it
// (recentre_moments), and one whose sums overflowed, scaled (rescue_moments).
template <class T>
void finish_moments(const Plan& p, const T* x, const Mask<T>& mask, index_t c, double shift, double& mean, double& m2,
                    double& var) {
  const double M = stat_count(p, mask);
  moments_from_sums(shift, mean, m2, M, mean, m2);
  var = m2 / M;
  if (mask.w) return;
  recentre_moments(p, x, c, shift, mean, m2, var);
  rescue_moments(p, x, c, mean, m2, var);
}

// Per-channel sums of x - K over the whole array (streaming; weighted by a mask), then in
// double the mean and either M2 or the variance M2 / M (`variance`). The sums are summed
// into mean and second.
template <class T>
void sum_moments(const Plan& p, const T* x, double* mean, double* second, bool variance, const Mask<T>& mask = {}) {
  using C = compute_t<T>;
  const index_t ch = p.channels;
  std::vector<C> shift(static_cast<std::size_t>(ch));
  const index_t at = p.reduce_offset(mask.sum.first, p.reduce_dims.size(), 0);  // the first value summed
  p.for_each_channel(
      0, [&](index_t c, index_t off) { shift[static_cast<std::size_t>(c)] = shift_of(x + p.offset[0] + off + at); });
  Coefs<C> k;
  k.m = shift.data();
  const KernelTable<T>& kt = kernels<T>();
  const T* w = mask.w;
  const int kM = mask_operand(p);
  reduce_pass(
      p, sizeof(T), mean, second,
      [&](const Offsets& off, index_t rows, const Offsets& rs, index_t c0, index_t nc, double* ps, double* pss) {
        if (w)
          kt.reduce1w_rows(rows_array(x, off, rs, kX), rows_array(w, off, rs, kM), rows, nc, k.from(c0), ps, pss);
        else
          kt.reduce1_rows(rows_array(x, off, rs, kX), rows, nc, k.from(c0), ps, pss);
      },
      [&](const RunGroup& g, double* ps, double* pss) {
        if (w)
          kt.reduce1w_runs(run_array(x, g, kX), run_array(w, g, kM), run_shape(g), k.from(g.c), ps, pss, 0);
        else
          kt.reduce1_runs(run_array(x, g, kX), run_shape(g), k.from(g.c), ps, pss, 0);
      });
  for (std::size_t c = 0; c < shift.size(); ++c) {
    double m2 = second[c], var;
    finish_moments(p, x, mask, static_cast<index_t>(c), static_cast<double>(shift[c]), mean[c], m2, var);
    second[c] = variance ? var : m2;
  }
}

// Channel blocks. When a channels_first array's channel fits in cache, one thread takes each
// channel through both passes (sums, then the elementwise pass) while its values are still
// in its L2, so the second pass reads cache instead of memory: a training forward moves 2
// bytes per input byte instead of 3, a backward 3 instead of 5. Channels are split among
// threads, so each channel's sums are one thread's and do not depend on the thread count.
// The limit is a share of the last-level cache rather than L2: a channel of a few MiB is
// still there (or in L2) when it is read again (measured: docs/performance.md).
constexpr std::size_t kChannelCacheBytes = std::size_t{4} << 20;
// Short runs, of at most kShortRunBytes (counting each array read: x, or x and dy), such as
// BatchNorm1d's (N, C, L) sequences and 7x7 maps, scatter a channel over many small pieces
// of memory: one channel's 64 runs of 512 bytes sit 128 KB apart, each a cold miss.
// A block of several consecutive channels is read sample by sample instead, each sample's
// runs of the block one contiguous stretch of at least kMinStretchBytes (shorter ones, read
// a few KiB apart, lost to streaming: measured, docs/performance.md) and at most
// kMaxStretchBytes (longer ones measured slower: r50-7's 32 KiB stretches), and the block's
// inputs (up to kBlockCacheBytes, a share of L2) are still in L2 for the elementwise pass.
constexpr std::size_t kShortRunBytes = 1024;
constexpr std::size_t kBlockCacheBytes = std::size_t{1} << 20;
constexpr std::size_t kMinStretchBytes = std::size_t{4} << 10;
constexpr std::size_t kMaxStretchBytes = std::size_t{16} << 10;

struct ChannelBlocks {
  int threads = 0;       // 0: streaming passes instead
  index_t channels = 1;  // consecutive channels per block
};

// The channel-block schedule of a plan reading bytes_per_value per value (x, or x and dy),
// or threads 0 where streaming passes are the better choice: one channel per block for long
// runs, blocks of several for short ones.
inline ChannelBlocks channel_blocks(const Plan& p, std::size_t bytes_per_value) {
  if (p.kind == Kind::channels_last) return {};
  const auto channel_bytes = static_cast<std::size_t>(p.count) * bytes_per_value;
  if (channel_bytes > kChannelCacheBytes) return {};
  const int nt = threads_for(p.channels * p.count);
  const auto run_bytes =
      static_cast<std::size_t>(p.reduce_dims.empty() ? 1 : p.reduce_dims.back().size) * bytes_per_value;
  if (run_bytes > kShortRunBytes) {
    if (nt == 1 || p.channels >= 4 * nt) return {nt, 1};
    return {};  // few channels: balance by pieces instead
  }
  // Short runs: blocks of k channels whose runs are contiguous in each sample (NCL, NCHW).
  const Runs r = runs_of(p);
  if (p.kind != Kind::channels_first || p.channel_dims.size() != 1 || p.reduce_dims.size() != 2 || !r.outer_major ||
      r.pieces != 1)
    return {};
  const index_t k =
      std::min({static_cast<index_t>(kBlockCacheBytes / channel_bytes),
                static_cast<index_t>(kMaxStretchBytes / run_bytes), p.channels / (4 * static_cast<index_t>(nt))});
  if (k < 1 || static_cast<std::size_t>(k) * run_bytes < kMinStretchBytes) return {};
  return {nt, k};
}

// Element distance from channel c's values to channel c + k's in the given input arrays,
// when it is the same in all of them (the prefetch distance of the channel-block
// schedule), else 0 (no prefetch).
inline index_t next_block_distance(const Plan& p, index_t c, index_t k, std::initializer_list<int> inputs) {
  index_t distance = 0;
  for (int op : inputs) {
    const index_t d = p.channel_offset(c + k, op) - p.channel_offset(c, op);
    if (op != *inputs.begin() && d != distance) return 0;
    distance = d;
  }
  return distance;
}

// The channel-block schedule overlaps memory traffic with arithmetic: while the block of
// channels [c, c + k) is summed and then written, the next block is prefetched, the first
// half of its units during the sums and the rest during the elementwise pass (which also
// writes this block), so the memory never idles while a block is processed from cache.
// Distances of 0 prefetch nothing. Calls pass(group, ahead) for the units of the block: the
// first half with ahead = the distance to the next block when `first_half_ahead`, the
// second half with it otherwise. One channel goes run after run; a block of several,
// sample by sample, each sample's runs of the block one group.
template <class F>
void block_halves(const Plan& p, const Runs& r, index_t c, index_t k, index_t distance, bool first_half_ahead,
                  const F& pass) {
  const index_t half = r.per_channel / 2;
  auto ahead = [&](index_t u) { return (u < half) == first_half_ahead ? distance : 0; };
  if (k == 1) {
    const index_t u0 = c * r.per_channel;
    for_run_groups(p, r, false, u0, u0 + half, [&](const RunGroup& g) { pass(g, ahead(0)); });
    for_run_groups(p, r, false, u0 + half, u0 + r.per_channel, [&](const RunGroup& g) { pass(g, ahead(half)); });
    return;
  }
  for (index_t outer = 0; outer < r.per_channel; ++outer) {
    const index_t u0 = outer * p.channels + c;
    for_run_groups(p, r, true, u0, u0 + k, [&](const RunGroup& g) { pass(g, ahead(outer)); });
  }
}

// after_sums: x was just read front to back (see kReverseChunkBytes).
template <class T>
void affine1(const Plan& p, const T* x, T* y, const Coefs<compute_t<T>>& k, bool relu, bool after_sums) {
  const KernelTable<T>& kt = kernels<T>();
  const bool stream = stream_output<T>(p);
  map_pass(
      p, sizeof(T),
      [&](const Offsets& off, index_t rows, const Offsets& rs, index_t c0, index_t nc) {
        kt.affine1_rows(rows_array(x, off, rs, kX), rows_array(y, off, rs, kY), rows, nc, k.from(c0), relu,
                        memory_order_output<T>(stream));
      },
      [&](const RunGroup& g) {
        kt.affine1_runs(run_array(x, g, kX), run_array(y, g, kY), run_shape(g), k.from(g.c), relu,
                        memory_order_output<T>(stream));
      },
      after_sums ? sizeof(T) : 0);
}

// The training forward in channel blocks (see channel_blocks).
template <class T>
void forward_channel_blocks(const Plan& p, ChannelBlocks cb, const T* x, T* y, const Affine<stat_t<T>>& affine,
                            double epsilon, bool relu, stat_t<T>* mean, stat_t<T>* variance, stat_t<T>* inv_std,
                            const Mask<T>& mask) {
  using C = compute_t<T>;
  const Runs runs = runs_of(p);
  const KernelTable<T>& kt = kernels<T>();
  const int kM = mask_operand(p);
  const bool stream = stream_output<T>(p);
  const auto nk = static_cast<std::size_t>(cb.channels);
  parallel(cb.threads, p.channels * p.count, [&](int t, int n) {
    index_t c0, c1;
    partition(p.channels, t, n, c0, c1);
    std::vector<C> shift(nk), a(nk), m(nk), b(nk);
    std::vector<double> mu(nk), m2(nk);
    for (index_t c = c0; c < c1; c += cb.channels) {
      const index_t k = std::min(cb.channels, c1 - c);
      for (index_t j = 0; j < k; ++j) shift[static_cast<std::size_t>(j)] = channel_shift(p, x, c + j, mask.sum.first);
      Coefs<C> ks;
      ks.m = shift.data();
      std::fill(mu.begin(), mu.end(), 0.0);
      std::fill(m2.begin(), m2.end(), 0.0);
      const index_t next = c + k < c1 ? next_block_distance(p, c, k, {kX}) : 0;
      block_halves(p, runs, c, k, next, true, [&](const RunGroup& g, index_t ahead) {
        const index_t j = g.c - c;
        if (mask.w)
          kt.reduce1w_runs(run_array(x, g, kX), run_array(mask.w, g, kM), run_shape(g), ks.from(j), mu.data() + j,
                           m2.data() + j, ahead);
        else
          kt.reduce1_runs(run_array(x, g, kX), run_shape(g), ks.from(j), mu.data() + j, m2.data() + j, ahead);
      });
      for (index_t j = 0; j < k; ++j) {
        const auto i = static_cast<std::size_t>(j);
        double var;
        finish_moments(p, x, mask, c + j, static_cast<double>(shift[i]), mu[i], m2[i], var);
        const double inv = store_stats(c + j, mu[i], var, epsilon, mean, variance, inv_std);
        forward_coef<T>(affine, c + j, mean[c + j], inv, a[i], m[i], b[i]);
      }
      const Coefs<C> kc{a.data(), m.data(), b.data()};
      block_halves(p, runs, c, k, next, false, [&](const RunGroup& g, index_t ahead) {
        kt.affine1_runs(run_array(x, g, kX), run_array(y, g, kY), run_shape(g), kc.from(g.c - c), relu,
                        Output(stream, ahead, block_ahead_out(g, kY)));
      });
    }
  });
}

// What both halves of backward share: the plan (x, dy, dx) and the forward coefficients.
// With a mask (masked statistics), its strides over x's shape are the plan's last operand.
template <class T>
struct BackwardSetup {
  Plan plan;
  std::vector<double> inv;
  CoefStore<compute_t<T>> k;
  bool relu;
  Mask<T> mask;

  BackwardSetup(const Geometry& g, const Strides& xs, const Strides& dys, const Out<T>* dx, const stat_t<T>* mean,
                const stat_t<T>* inv_std, const Affine<stat_t<T>>& affine, Activation activation,
                const Strides* mask_strides = nullptr)
      : plan(mask_strides ? make_plan(g, operand_strides({&xs, &dys, &dx->strides, mask_strides}), true)
             : dx         ? make_plan(g, operand_strides({&xs, &dys, &dx->strides}))
                          : make_plan(g, operand_strides({&xs, &dys}))),
        inv(static_cast<std::size_t>(plan.channels)),
        k(plan.channels, true),
        relu(activation == Activation::relu) {
    if (dx) check_output(plan, 2, dx->name ? dx->name : "dx");
    for (const void* ptr : {static_cast<const void*>(mean), static_cast<const void*>(inv_std)})
      check_not_null(ptr, "mean and inv_std");
    for (std::size_t c = 0; c < inv.size(); ++c) inv[c] = static_cast<double>(inv_std[c]);
    set_forward_coefs<T>(k, plan.channels, mean, inv.data(), affine);
  }

  // k1, k2, k3 of channel c from its sums over `count` values (a mask's W).
  void set_apply_coef(std::size_t c, const Affine<stat_t<T>>& affine, double sum_dy, double sum_dy_xc, double count,
                      Statistics statistics) {
    detail::set_apply_coef<T>(k, c, inv[c], affine, sum_dy, sum_dy_xc, count, statistics);
  }
};

// The whole backward in channel blocks (see channel_blocks).
template <class T>
void backward_channel_blocks(BackwardSetup<T>& b, ChannelBlocks cb, const T* dy, const T* x, T* dx,
                             const Affine<stat_t<T>>& affine, Statistics statistics, stat_t<T>* dgamma,
                             stat_t<T>* dbeta) {
  const Plan& p = b.plan;
  const Runs runs = runs_of(p);
  const KernelTable<T>& kt = kernels<T>();
  const Coefs<compute_t<T>> kv = b.k.view();
  const bool stream = stream_output<T>(p);
  const auto nk = static_cast<std::size_t>(cb.channels);
  parallel(cb.threads, p.channels * p.count, [&](int t, int n) {
    index_t c0, c1;
    partition(p.channels, t, n, c0, c1);
    std::vector<double> sum_dy(nk), sum_dy_xc(nk);
    for (index_t c = c0; c < c1; c += cb.channels) {
      const index_t k = std::min(cb.channels, c1 - c);
      const index_t next = c + k < c1 ? next_block_distance(p, c, k, {kX, kDy}) : 0;
      std::fill(sum_dy.begin(), sum_dy.end(), 0.0);
      std::fill(sum_dy_xc.begin(), sum_dy_xc.end(), 0.0);
      block_halves(p, runs, c, k, next, true, [&](const RunGroup& g, index_t ahead) {
        const auto j = static_cast<std::size_t>(g.c - c);
        kt.reduce2_runs(run_array(x, g, kX), run_array(dy, g, kDy), run_shape(g), kv.from(g.c), b.relu,
                        sum_dy.data() + j, sum_dy_xc.data() + j, ahead);
      });
      for (index_t j = 0; j < k; ++j) {
        const auto i = static_cast<std::size_t>(c + j), s = static_cast<std::size_t>(j);
        store_parameter_gradients(i, b.inv[i], sum_dy[s], sum_dy_xc[s], dgamma, dbeta);
        b.set_apply_coef(i, affine, sum_dy[s], sum_dy_xc[s], stat_count(p, b.mask), statistics);
      }
      block_halves(p, runs, c, k, next, false, [&](const RunGroup& g, index_t ahead) {
        const Output out(stream, ahead, block_ahead_out(g, kDx));
        if (b.mask.w)
          kt.affine2w_runs(run_array(x, g, kX), run_array(dy, g, kDy), run_array(b.mask.w, g, mask_operand(p)),
                           run_array(dx, g, kDx), run_shape(g), kv.from(g.c), b.relu, out);
        else
          kt.affine2_runs(run_array(x, g, kX), run_array(dy, g, kDy), run_array(dx, g, kDx), run_shape(g), kv.from(g.c),
                          b.relu, out);
      });
    }
  });
}

template <class T>
void reduce2(const BackwardSetup<T>& b, const T* dy, const T* x, double* sum_dy, double* sum_dy_xc) {
  const Plan& p = b.plan;
  const KernelTable<T>& kt = kernels<T>();
  const Coefs<compute_t<T>> kv = b.k.view();
  const bool relu = b.relu;
  reduce_pass(
      p, 2 * sizeof(T), sum_dy, sum_dy_xc,
      [&](const Offsets& off, index_t rows, const Offsets& rs, index_t c0, index_t nc, double* s, double* ss) {
        kt.reduce2_rows(rows_array(x, off, rs, kX), rows_array(dy, off, rs, kDy), rows, nc, kv.from(c0), relu, s, ss);
      },
      [&](const RunGroup& g, double* s, double* ss) {
        kt.reduce2_runs(run_array(x, g, kX), run_array(dy, g, kDy), run_shape(g), kv.from(g.c), relu, s, ss, 0);
      });
}

template <class T>
void affine2(BackwardSetup<T>& b, const T* dy, const T* x, T* dx, const Affine<stat_t<T>>& affine, const double* sum_dy,
             const double* sum_dy_xc, double count, Statistics statistics) {
  using C = compute_t<T>;
  const Plan& p = b.plan;
  for (std::size_t c = 0; c < b.inv.size(); ++c)
    b.set_apply_coef(c, affine, sum_dy[c], sum_dy_xc[c], count, statistics);
  const KernelTable<T>& kt = kernels<T>();
  const Coefs<C> kv = b.k.view();
  const bool relu = b.relu;
  const bool stream = stream_output<T>(p);
  const T* w = b.mask.w;
  const int kM = mask_operand(p);
  map_pass(
      p, 2 * sizeof(T),
      [&](const Offsets& off, index_t rows, const Offsets& rs, index_t c0, index_t nc) {
        if (w)
          kt.affine2w_rows(rows_array(x, off, rs, kX), rows_array(dy, off, rs, kDy), rows_array(w, off, rs, kM),
                           rows_array(dx, off, rs, kDx), rows, nc, kv.from(c0), relu, stream);
        else
          kt.affine2_rows(rows_array(x, off, rs, kX), rows_array(dy, off, rs, kDy), rows_array(dx, off, rs, kDx), rows,
                          nc, kv.from(c0), relu, memory_order_output<T>(stream));
      },
      [&](const RunGroup& g) {
        if (w)
          kt.affine2w_runs(run_array(x, g, kX), run_array(dy, g, kDy), run_array(w, g, kM), run_array(dx, g, kDx),
                           run_shape(g), kv.from(g.c), relu, stream);
        else
          kt.affine2_runs(run_array(x, g, kX), run_array(dy, g, kDy), run_array(dx, g, kDx), run_shape(g), kv.from(g.c),
                          relu, memory_order_output<T>(stream));
      },
      2 * sizeof(T));  // x and dy were just summed, or were by backward_sums
}

}  // namespace batchnorm::detail
