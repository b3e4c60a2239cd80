// Moonwalk — what a rule saves between passes (its residuals) is a type of its own.
//
// A layer names its `residual_type`: the least it needs to compute its
// input-vjp without its input (JAX custom_vjp residuals). Schedules store
// residuals, fragments and anchors through `SavedStore` and account every
// byte by `nbytes(r)` and label it by `residual_kind(r)`.
#pragma once

#include <any>
#include <bit>
#include <cstdint>
#include <string>
#include <vector>

#include "moonwalk/core/types.hpp"

namespace moonwalk {

/// Nothing saved (Linear's input-vjp needs only W).
struct Empty {
  static constexpr std::size_t bytes() { return 0; }
  static constexpr const char* kind() { return "none"; }
};

/// One bit per element: the sign pattern of a piecewise-linear activation's input.
/// Element k = j·rows + i (column-major) is bit k mod 64 of word ⌊k / 64⌋.
class BitMask {
 public:
  BitMask() = default;
  /// mask(i, j) = pred(x(i, j)), packed 64 per word: one word at a time (a
  /// fixed-length loop the compiler vectorises) when x is contiguous.
  template <class Derived, class Pred>
  BitMask(const Eigen::MatrixBase<Derived>& x, Pred pred) {
    assign(x, pred);
  }
  /// The same into this mask's storage (no allocation when it already holds
  /// as many words).
  template <class Derived, class Pred>
  void assign(const Eigen::MatrixBase<Derived>& x, Pred pred) {
    rows_ = x.rows();
    cols_ = x.cols();
    const Index n = rows_ * cols_;
    words_.assign(static_cast<std::size_t>((n + 63) / 64), 0);
    if constexpr (contiguous_access<Derived>) {
      if (x.derived().outerStride() == rows_ || cols_ <= 1) {
        const auto* p = x.derived().data();
        const Index full = n / 64;
        for (Index w = 0; w < full; ++w, p += 64) {
          std::uint64_t bits = 0;
          for (int b = 0; b < 64; ++b) bits |= static_cast<std::uint64_t>(pred(p[b]) ? 1 : 0) << b;
          words_[static_cast<std::size_t>(w)] = bits;
        }
        for (Index k = full * 64; k < n; ++k, ++p)
          if (pred(*p)) words_[static_cast<std::size_t>(k >> 6)] |= std::uint64_t{1} << (k & 63);
        return;
      }
    }
    Index k = 0;
    for (Index j = 0; j < cols_; ++j)
      for (Index i = 0; i < rows_; ++i, ++k)
        if (pred(x(i, j))) words_[static_cast<std::size_t>(k >> 6)] |= (std::uint64_t{1} << (k & 63));
  }

  /// out(i, j) = f(mask(i, j), h(i, j)) for h of the mask's shape (out is
  /// resized to it): 32 bits at a time over contiguous storage.
  template <class S, class F>
  void apply(const CRef<S>& h, Matrix<S>& out, F f) const {
    detail::safe_resize(out, rows_, cols_);
    apply(h, MatRef<S>(out), f);
  }
  /// The same into out of the mask's shape.
  template <class S, class F>
  void apply(const CRef<S>& h, MatRef<S> out, F f) const {
    if (h.rows() != rows_ || h.cols() != cols_ || out.rows() != rows_ || out.cols() != cols_)
      throw ShapeError(detail::cat("BitMask::apply: mask ", detail::shape_str(rows_, cols_), ", cotangent ",
                                   detail::shape_str(h.rows(), h.cols()), ", output ",
                                   detail::shape_str(out.rows(), out.cols())));
    const Index n = rows_ * cols_;
    if ((h.outerStride() != rows_ || out.outerStride() != rows_) && cols_ > 1) {
      for (Index j = 0; j < cols_; ++j)
        for (Index i = 0; i < rows_; ++i) out(i, j) = f((*this)(i, j), h(i, j));
      return;
    }
    const S* src = h.data();
    S* dst = out.data();
    const Index full = n / 32;
    for (Index w = 0; w < full; ++w, src += 32, dst += 32) {
      const auto bits =
          static_cast<std::uint32_t>(words_[static_cast<std::size_t>(w >> 1)] >> ((w & 1) * 32));
      for (int b = 0; b < 32; ++b) dst[b] = f(((bits >> b) & 1U) != 0, src[b]);
    }
    for (Index k = full * 32; k < n; ++k, ++src, ++dst)
      *dst = f(((words_[static_cast<std::size_t>(k >> 6)] >> (k & 63)) & 1U) != 0, *src);
  }

  [[nodiscard]] bool operator()(Index i, Index j) const {
    const Index k = j * rows_ + i;
    return (words_[static_cast<std::size_t>(k >> 6)] >> (k & 63)) & 1u;
  }
  [[nodiscard]] Index rows() const { return rows_; }
  [[nodiscard]] Index cols() const { return cols_; }
  [[nodiscard]] Index count() const {
    Index c = 0;
    for (auto w : words_) c += static_cast<Index>(std::popcount(w));
    return c;
  }
  [[nodiscard]] std::size_t bytes() const { return words_.size() * sizeof(std::uint64_t); }
  static constexpr const char* kind() { return "mask"; }

 private:
  /// Eigen expressions with data() and outerStride() (plain matrices, maps, Refs, blocks).
  template <class Derived>
  static constexpr bool contiguous_access = (static_cast<int>(Derived::Flags) & Eigen::DirectAccessBit) !=
                                                0 &&
                                            !Derived::IsRowMajor;

  Index rows_ = 0, cols_ = 0;
  std::vector<std::uint64_t> words_;
};

/// Elementwise derivative values σ'(x) (smooth activations need one number per element).
template <class S>
struct Derivative {
  Matrix<S> value;
  [[nodiscard]] std::size_t bytes() const { return static_cast<std::size_t>(value.size()) * sizeof(S); }
  static constexpr const char* kind() { return "derivative"; }
};

/// A cokernel fragment: the part of an output cotangent a Jacobian erases.
template <class S>
struct Fragment {
  Matrix<S> value;
  [[nodiscard]] std::size_t bytes() const { return static_cast<std::size_t>(value.size()) * sizeof(S); }
  static constexpr const char* kind() { return "fragment"; }
};

/// A type-erased residual or fragment (runtime networks), with its accounting.
struct Erased {
  std::any value;
  std::size_t size_bytes = 0;
  const char* kind_name = "none";
  [[nodiscard]] std::size_t bytes() const { return size_bytes; }
  [[nodiscard]] const char* kind() const { return kind_name; }
};

/// Bytes held by a saved value: `r.bytes()`, or the storage of an Eigen matrix.
template <class R>
std::size_t nbytes(const R& r) {
  if constexpr (requires { r.bytes(); })
    return static_cast<std::size_t>(r.bytes());
  else if constexpr (requires {
                       r.size();
                       typename R::Scalar;
                     })
    return static_cast<std::size_t>(r.size()) * sizeof(typename R::Scalar);
  else
    static_assert(sizeof(R) == 0, "Moonwalk: a residual or fragment type must offer bytes()");
}

/// Label of a saved value for the saved-residual report; a plain matrix is a
/// stored activation.
template <class R>
const char* residual_kind(const R& r) {
  if constexpr (requires { r.kind(); })
    return r.kind();
  else
    return "activation";
}

/// Wraps any residual into an `Erased`, keeping its byte count and kind.
template <class R>
Erased erase(R r) {
  Erased e;
  e.size_bytes = nbytes(r);
  e.kind_name = residual_kind(r);
  e.value = std::move(r);
  return e;
}

}  // namespace moonwalk
