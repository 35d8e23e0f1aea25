// The canonical view: any (shape, strides, feature axes) of up to three arrays that share
// a shape (x and y; or dy, x and dx) becomes a list of channel dimensions and a list of
// reduction dimensions, size-1 dimensions dropped and mergeable neighbours merged, so the
// kernels see one of three layouts:
//
//   channels_last  (nspc): the innermost channel dimension has stride 1 in every array.
//                  Work is split by rows (each row: the channels of that dimension,
//                  contiguous; outer channel dimensions make groups of rows, each with
//                  its own channels); vectorized across C.
//   channels_first (ncsp): the innermost reduction dimension has stride 1 in every array.
//                  Work is split by runs (a channel's contiguous stretch); vectorized along it.
//   strided        anything else: runs along the innermost reduction dimension, any strides.
//
// Reduction dimensions may be reordered (sum order only changes rounding), so they are
// flipped to positive strides in the first array and sorted by decreasing stride, which
// turns e.g. a torch.channels_last view (NCHW shape, NHWC strides) into channels_last.
// Channel dimensions keep their order: it defines the channel index.
//
// A mask (masked statistics) is one more operand, the last: stride 0 along the channel
// dimensions, so it does not decide whether channels are contiguous; it takes part in
// merging reduction dimensions and must step by 1 along the innermost for channels_first.
#pragma once

#include <array>
#include <initializer_list>
#include <vector>

#include "batchnorm/functional.hpp"

namespace batchnorm::detail {

constexpr int kMaxOperands = 4;

struct Dim {
  index_t size = 1;
  std::array<index_t, kMaxOperands> stride{};
};

enum class Kind { channels_last, channels_first, strided };

struct Plan {
  Kind kind = Kind::strided;
  int operands = 1;
  bool masked = false;                         // the last operand is a mask
  index_t channels = 1;                        // product of channel_dims sizes
  index_t count = 1;                           // product of reduce_dims sizes
  std::vector<Dim> channel_dims;               // outermost first
  std::vector<Dim> reduce_dims;                // outermost first; the innermost is last
  std::array<index_t, kMaxOperands> offset{};  // element offset of the first element, per array

  /// Offset of channel c in array op.
  index_t channel_offset(index_t c, int op) const { return offset_in(channel_dims, channel_dims.size(), c, op); }

  /// Calls f(c, channel_offset(c, op)) for every channel in order, without a division per
  /// channel (ghost batches have tens of thousands of channels).
  template <class F>
  void for_each_channel(int op, const F& f) const {
    const auto o = static_cast<std::size_t>(op);
    std::vector<index_t> i(channel_dims.size(), 0);
    index_t off = 0;
    for (index_t c = 0; c < channels; ++c) {
      f(c, off);
      for (std::size_t d = channel_dims.size(); d-- > 0;) {  // an odometer, the innermost dim first
        off += channel_dims[d].stride[o];
        if (++i[d] < channel_dims[d].size) break;
        off -= channel_dims[d].stride[o] * channel_dims[d].size;
        i[d] = 0;
      }
    }
  }

  /// Offset (without `offset`) of the multi-index number i over the first n reduce dims.
  index_t reduce_offset(index_t i, std::size_t n, int op) const { return offset_in(reduce_dims, n, i, op); }

 private:
  static index_t offset_in(const std::vector<Dim>& dims, std::size_t n, index_t i, int op) {
    index_t off = 0;
    for (std::size_t d = n; d-- > 0;) {
      const index_t size = dims[d].size;
      off += (i % size) * dims[d].stride[static_cast<std::size_t>(op)];
      i /= size;
    }
    return off;
  }
};

/// C-contiguous strides for shape, in elements.
Strides contiguous_strides(const Shape& shape);

/// Builds the plan for arrays sharing g.shape; strides[i] empty means C-contiguous.
/// Validates the shape, the axes and the strides' lengths. masked: the last strides are a
/// mask's over g.shape (0 along the feature axes).
Plan make_plan(const Geometry& g, const std::vector<const Strides*>& strides, bool masked = false);

/// A mask's strides over g.shape from its strides over g.shape without the feature axes
/// (empty: C-contiguous there): 0 along the feature axes. Validates their count.
Strides mask_strides(const Geometry& g, const Strides& reduced);

/// The operand number of the mask of a masked plan.
inline int mask_operand(const Plan& p) { return p.operands - 1; }

/// The strides of the operands, in plan order, as make_plan takes them.
inline std::vector<const Strides*> operand_strides(std::initializer_list<const Strides*> s) { return s; }

const char* kind_name(Kind kind);

/// The channels of one row of a channels_last plan (its innermost channel dimension).
inline index_t row_channels(const Plan& p) { return p.channel_dims.empty() ? p.channels : p.channel_dims.back().size; }

/// The groups of rows of a channels_last plan (the outer channel dimensions; 1 without them).
inline index_t row_groups(const Plan& p) {
  const index_t rc = row_channels(p);
  return rc > 0 ? p.channels / rc : 1;
}

}  // namespace batchnorm::detail
