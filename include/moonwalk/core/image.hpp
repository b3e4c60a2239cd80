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
// and check their shapes through ImageShape. A shape whose C·H·W does not fit
// an Index is not valid(), and its size() throws ShapeError rather than wrap.
#pragma once

#include <optional>
#include <sstream>
#include <string>

#include "moonwalk/core/types.hpp"

namespace moonwalk {

namespace detail {

/// a · b, or nullopt when it overflows Index.
[[nodiscard]] inline std::optional<Index> checked_mul(Index a, Index b) {
  Index r = 0;
  if (__builtin_mul_overflow(a, b, &r)) return std::nullopt;
  return r;
}
/// a + b, or nullopt when it overflows Index.
[[nodiscard]] inline std::optional<Index> checked_add(Index a, Index b) {
  Index r = 0;
  if (__builtin_add_overflow(a, b, &r)) return std::nullopt;
  return r;
}

}  // namespace detail

/// C × H × W, the shape of one sample of an image batch (layout: header comment).
struct ImageShape {
  Index c = 0, h = 0, w = 0;

  /// C·H·W, or nullopt when the product overflows Index.
  [[nodiscard]] std::optional<Index> checked_size() const {
    const auto ch = detail::checked_mul(c, h);
    return ch ? detail::checked_mul(*ch, w) : std::nullopt;
  }
  /// Numbers per sample, C·H·W; ShapeError when the product overflows Index.
  [[nodiscard]] Index size() const {
    const auto n = checked_size();
    if (!n) throw ShapeError(detail::cat("image shape ", str(), ": C x H x W overflows a 64-bit index"));
    return *n;
  }
  /// Row of pixel (i, j) of channel ch.
  [[nodiscard]] Index index(Index ch, Index i, Index j) const { return (ch * h + i) * w + j; }
  /// "CxHxW"
  [[nodiscard]] std::string str() const {
    std::ostringstream s;
    s << c << "x" << h << "x" << w;
    return s.str();
  }
  /// Every part positive and C·H·W representable.
  [[nodiscard]] bool valid() const { return c > 0 && h > 0 && w > 0 && checked_size().has_value(); }
  friend bool operator==(const ImageShape&, const ImageShape&) = default;
};

}  // namespace moonwalk
