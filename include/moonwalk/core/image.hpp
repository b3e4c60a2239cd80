// Moonwalk — the layout of an image batch.
//
// A batch of images is a matrix like any other batch: one column per sample.
// A sample of C channels of H × W pixels is laid out channel-major, rows
// within a channel, columns within a row:
//
//   x(index(c, i, j), b) = pixel (i, j) of channel c of sample b,
//   index(c, i, j) = (c · H + i) · W + j,
//
// so channel c of sample b is the contiguous block of H·W entries starting at
// c·H·W in column b (an H × W row-major image, or, mapped column-major, its
// W × H transpose). Image layers take and give `in_features() = C·H·W` rows
// and check their shapes through ImageShape.
#pragma once

#include <sstream>
#include <string>

#include "moonwalk/core/types.hpp"

namespace moonwalk {

/// C × H × W, the shape of one sample of an image batch (layout: header comment).
struct ImageShape {
  Index c = 0, h = 0, w = 0;

  /// Numbers per sample, C·H·W.
  [[nodiscard]] Index size() const { return c * h * w; }
  /// Row of pixel (i, j) of channel ch.
  [[nodiscard]] Index index(Index ch, Index i, Index j) const { return (ch * h + i) * w + j; }
  /// "CxHxW"
  [[nodiscard]] std::string str() const {
    std::ostringstream s;
    s << c << "x" << h << "x" << w;
    return s.str();
  }
  [[nodiscard]] bool valid() const { return c > 0 && h > 0 && w > 0; }
  friend bool operator==(const ImageShape&, const ImageShape&) = default;
};

}  // namespace moonwalk
