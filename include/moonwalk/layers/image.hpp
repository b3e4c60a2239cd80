// Moonwalk — image plumbing: parameter-free layers that reshape, pool or pad
// image batches (layout: core/image.hpp, one column per sample, channel-major
// C × H × W, row index (c·H + i)·W + j).
//
//   layer                   shape                        J            sweep
//   SpaceToDepth(in, f)     C×H×W → (C·f²)×(H/f)×(W/f)   permutation  vijp = the permutation; inverse
//   AvgPool2d(in, f = 2)    C×H×W → C×(H/f)×(W/f)        window mean  vijp = window sums (least squares)
//   GlobalAvgPool(in)       C×H×W → C                    channel mean vijp = channel sums (least squares)
//   Flatten(in)             C×H×W → C·H·W                identity     vijp = identity; inverse
//   PadChannels(in, c_out)  C×H×W → C_out×H×W            [I; 0]       fragment = padded channels; inverse
//
// All are linear in x, so their reverse pass keeps nothing (residual_type =
// Empty), and their amplification (core/amplification.hpp) is exact and does
// not depend on x. SpaceToDepth and Flatten are orthogonal (κ = γ = 1);
// PadChannels reports ZeroPad's κ = γ = 1 (the fragment restores the padded
// channels exactly). The pooling Jacobians (m × n, m < n) have m equal singular
// values σ, so κ = ‖J‖‖J⁺‖ = 1 and γ = (‖J‖_F/√m)(‖J⁺‖_F/√n) = σ · (√m/σ)/√n
// = √(m/n) < 1: their vijp is the least-squares solution, which drops the part
// of a random error outside range(Jᵀ) (n − m of n directions), so the typical
// relative error shrinks while the worst one (an error inside the range) keeps
// its size.
#pragma once

#include <cmath>
#include <string>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/image.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/layers/linear_in_x.hpp"
#include "moonwalk/layers/pad.hpp"

namespace moonwalk {

namespace detail {

/// Throws ShapeError naming `layer` unless every extent of `s` is positive.
inline void plumbing_require_valid(const char* layer, const ImageShape& s) {
  if (!s.valid()) throw ShapeError(cat(layer, ": image shape must be positive, got ", s.str()));
}

/// Throws ShapeError naming `layer` unless f > 0 divides H and W of `s`.
inline void plumbing_require_divisible(const char* layer, const ImageShape& s, Index f) {
  plumbing_require_valid(layer, s);
  if (f <= 0) throw ShapeError(cat(layer, ": factor must be positive, got ", f, " for input ", s.str()));
  if (s.h % f != 0 || s.w % f != 0)
    throw ShapeError(
        cat(layer, ": input ", s.str(), " has H x W = ", s.h, "x", s.w, ", not divisible by the factor ", f));
}

}  // namespace detail

// ---------------------------------------------------------------------------
/// Invertible downsampling ("squeeze", PyTorch's pixel_unshuffle): C×H×W →
/// (C·f²)×(H/f)×(W/f), each f × f block of pixels moved into f² channels:
///
///   y(c·f² + di·f + dj, i, j) = x(c, i·f + di, j·f + dj),   0 ≤ di, dj < f.
///
/// So output channels come in groups of f², one group per input channel, and
/// within a group the sub-pixel offset (di, dj) runs row-major. y = P x with a
/// permutation P: J = P, Jᵀ = P⁻¹ = Pᵀ, so vjp(h) = Pᵀ h, vijp(h_x) = P h_x
/// (the unique h_y with Pᵀ h_y = h_x), inverse(y) = Pᵀ y. κ = γ = 1.
/// H and W must be divisible by f (else ShapeError).
template <class S>
class SpaceToDepth : public NoParameters<S>, public LinearInX<SpaceToDepth<S>, S> {
 public:
  using scalar_type = S;

  explicit SpaceToDepth(ImageShape in, Index factor = 2) : in_(in), f_(factor) {
    detail::plumbing_require_divisible("space_to_depth", in, factor);
    out_ = {in.c * f_ * f_, in.h / f_, in.w / f_};
    // src_[k] = input row of output row k, k running through the output layout.
    src_.reserve(static_cast<std::size_t>(in_.size()));
    for (Index c = 0; c < in_.c; ++c)
      for (Index di = 0; di < f_; ++di)
        for (Index dj = 0; dj < f_; ++dj)
          for (Index i = 0; i < out_.h; ++i)
            for (Index j = 0; j < out_.w; ++j) src_.push_back(in_.index(c, i * f_ + di, j * f_ + dj));
  }

  [[nodiscard]] ImageShape in_shape() const { return in_; }
  [[nodiscard]] ImageShape out_shape() const { return out_; }
  [[nodiscard]] Index factor() const { return f_; }
  [[nodiscard]] Index in_features() const { return in_.size(); }
  [[nodiscard]] Index out_features() const { return out_.size(); }
  [[nodiscard]] std::string name() const {
    return detail::cat("space_to_depth(", in_.str(), "->", out_.str(), ")");
  }
  /// Input row that output row k comes from: y(k, ·) = x(source_index(k), ·).
  [[nodiscard]] Index source_index(Index k) const { return src_[static_cast<std::size_t>(k)]; }

  /// P a: row k of the result is row src_[k] of a.
  void apply_into(const CRef<S>& a, MatRef<S> out) const {
    for (Index b = 0; b < a.cols(); ++b)
      for (Index k = 0; k < out.rows(); ++k) out(k, b) = a(src_[static_cast<std::size_t>(k)], b);
  }
  /// Pᵀ h: row src_[k] of the result is row k of h.
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const {
    for (Index b = 0; b < h.cols(); ++b)
      for (Index k = 0; k < h.rows(); ++k) out(src_[static_cast<std::size_t>(k)], b) = h(k, b);
  }
  /// h_y = P h_x, the unique solution of Pᵀ h_y = h_x
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> out) const { apply_into(hx, out); }
  /// x = Pᵀ y
  void solve_into(const CRef<S>& y, MatRef<S> out) const { apply_transpose_into(y, out); }

  /// A permutation: κ = γ = 1.
  [[nodiscard]] static Amplification amplification(const Empty&) { return {1, 1}; }
  template <class T>
  [[nodiscard]] SpaceToDepth<T> cast() const {
    return SpaceToDepth<T>(in_, f_);
  }

 private:
  ImageShape in_, out_;
  Index f_;
  std::vector<Index> src_;
};

// ---------------------------------------------------------------------------
/// Average pooling over disjoint f × f windows (f = 2 by default; H and W
/// divisible by f): C×H×W → C×(H/f)×(W/f),
///
///   y(c, i, j) = (1/f²) Σ_{di, dj < f} x(c, i·f + di, j·f + dj).
///
/// Per window J = (1/f²)·[1 … 1] (f² ones): full row rank, so the layer is
/// submersive. vjp spreads h(c, i, j)/f² over the window; vijp returns the
/// window sums h_y(c, i, j) = Σ_window h_x — the exact solution of Jᵀ h_y = h_x
/// when h_x is in range(Jᵀ) (constant over each window), and the least-squares
/// solution (J Jᵀ)⁻¹ J h_x = J⁺ᵀ h_x otherwise.
/// Amplification: all singular values are 1/f, so κ = 1 and γ = √(m/n) = 1/f
/// (1/2 for 2 × 2 windows).
template <class S>
class AvgPool2d : public NoParameters<S>, public LinearInX<AvgPool2d<S>, S> {
 public:
  using scalar_type = S;

  explicit AvgPool2d(ImageShape in, Index factor = 2) : in_(in), f_(factor) {
    detail::plumbing_require_divisible("avg_pool2d", in, factor);
    out_ = {in.c, in.h / f_, in.w / f_};
  }

  [[nodiscard]] ImageShape in_shape() const { return in_; }
  [[nodiscard]] ImageShape out_shape() const { return out_; }
  [[nodiscard]] Index factor() const { return f_; }
  [[nodiscard]] Index in_features() const { return in_.size(); }
  [[nodiscard]] Index out_features() const { return out_.size(); }
  [[nodiscard]] std::string name() const {
    return detail::cat("avg_pool2d(", in_.str(), "->", out_.str(), ")");
  }

  /// A a = window means of a
  void apply_into(const CRef<S>& a, MatRef<S> out) const {
    window_sums(a, out);
    out /= static_cast<S>(f_ * f_);
  }
  /// Aᵀ h: h(c, i, j)/f² on every pixel of window (i, j)
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const {
    const S scale = S(1) / static_cast<S>(f_ * f_);
    for (Index b = 0; b < h.cols(); ++b)
      for (Index c = 0; c < in_.c; ++c)
        for (Index i = 0; i < in_.h; ++i)
          for (Index j = 0; j < in_.w; ++j)
            out(in_.index(c, i, j), b) = scale * h(out_.index(c, i / f_, j / f_), b);
  }
  /// h_y = window sums of h_x (exact on range(Jᵀ), least squares otherwise)
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> out) const { window_sums(hx, out); }

  /// Singular values all 1/f: κ = 1, γ = 1/f.
  [[nodiscard]] Amplification amplification(const Empty&) const { return {1, 1.0 / static_cast<double>(f_)}; }
  template <class T>
  [[nodiscard]] AvgPool2d<T> cast() const {
    return AvgPool2d<T>(in_, f_);
  }

 private:
  void window_sums(const CRef<S>& a, MatRef<S> r) const {
    r.setZero();
    for (Index b = 0; b < a.cols(); ++b)
      for (Index c = 0; c < in_.c; ++c)
        for (Index i = 0; i < in_.h; ++i)
          for (Index j = 0; j < in_.w; ++j) r(out_.index(c, i / f_, j / f_), b) += a(in_.index(c, i, j), b);
  }

  ImageShape in_, out_;
  Index f_;
};

// ---------------------------------------------------------------------------
/// Global average pooling: C×H×W → C (out_shape() = C×1×1),
///
///   y(c) = (1/(H·W)) Σ_{i, j} x(c, i, j).
///
/// Per channel J = (1/(H·W))·[1 … 1]: full row rank, submersive. vjp spreads
/// h(c)/(H·W) over channel c; vijp returns the channel sums
/// h_y(c) = Σ_{i, j} h_x(c, i, j) — exact when h_x is constant over each
/// channel (in range(Jᵀ)), the least-squares solution J⁺ᵀ h_x otherwise.
/// Amplification: singular values all 1/√(H·W), so κ = 1, γ = 1/√(H·W).
template <class S>
class GlobalAvgPool : public NoParameters<S>, public LinearInX<GlobalAvgPool<S>, S> {
 public:
  using scalar_type = S;

  explicit GlobalAvgPool(ImageShape in) : in_(in) { detail::plumbing_require_valid("global_avg_pool", in); }

  [[nodiscard]] ImageShape in_shape() const { return in_; }
  [[nodiscard]] ImageShape out_shape() const { return {in_.c, 1, 1}; }
  [[nodiscard]] Index in_features() const { return in_.size(); }
  [[nodiscard]] Index out_features() const { return in_.c; }
  [[nodiscard]] std::string name() const {
    return detail::cat("global_avg_pool(", in_.str(), "->", in_.c, ")");
  }

  /// A a = channel means of a
  void apply_into(const CRef<S>& a, MatRef<S> out) const {
    channel_sums(a, out);
    out /= static_cast<S>(pixels());
  }
  /// Aᵀ h: h(c)/(H·W) on every pixel of channel c
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const {
    const Index p = pixels();
    const S scale = S(1) / static_cast<S>(p);
    for (Index b = 0; b < h.cols(); ++b)
      for (Index c = 0; c < in_.c; ++c) out.col(b).segment(c * p, p).setConstant(scale * h(c, b));
  }
  /// h_y = channel sums of h_x (exact on range(Jᵀ), least squares otherwise)
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> out) const { channel_sums(hx, out); }

  /// Singular values all 1/√(H·W): κ = 1, γ = 1/√(H·W).
  [[nodiscard]] Amplification amplification(const Empty&) const {
    return {1, 1.0 / std::sqrt(static_cast<double>(pixels()))};
  }
  template <class T>
  [[nodiscard]] GlobalAvgPool<T> cast() const {
    return GlobalAvgPool<T>(in_);
  }

 private:
  [[nodiscard]] Index pixels() const { return in_.h * in_.w; }
  void channel_sums(const CRef<S>& a, MatRef<S> r) const {
    const Index p = pixels();
    for (Index b = 0; b < a.cols(); ++b)
      for (Index c = 0; c < in_.c; ++c) r(c, b) = a.col(b).segment(c * p, p).sum();
  }

  ImageShape in_;
};

// ---------------------------------------------------------------------------
/// The end of the image part of a network: C×H×W → C·H·W features
/// (out_shape() = (C·H·W)×1×1). Image batches already are columns, so this is
/// the identity on the layout: J = I, vjp = vijp = inverse = identity, κ = γ = 1.
template <class S>
class Flatten : public NoParameters<S>, public LinearInX<Flatten<S>, S> {
 public:
  using scalar_type = S;

  explicit Flatten(ImageShape in) : in_(in) { detail::plumbing_require_valid("flatten", in); }

  [[nodiscard]] ImageShape in_shape() const { return in_; }
  [[nodiscard]] ImageShape out_shape() const { return {in_.size(), 1, 1}; }
  [[nodiscard]] Index in_features() const { return in_.size(); }
  [[nodiscard]] Index out_features() const { return in_.size(); }
  [[nodiscard]] std::string name() const { return detail::cat("flatten(", in_.str(), "->", in_.size(), ")"); }

  /// A = I on the layout
  void apply_into(const CRef<S>& a, MatRef<S> out) const { out = a; }
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const { out = h; }
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> out) const { out = hx; }
  void solve_into(const CRef<S>& y, MatRef<S> out) const { out = y; }

  /// J = I: κ = γ = 1.
  [[nodiscard]] static Amplification amplification(const Empty&) { return {1, 1}; }
  template <class T>
  [[nodiscard]] Flatten<T> cast() const {
    return Flatten<T>(in_);
  }

 private:
  ImageShape in_;
};

// ---------------------------------------------------------------------------
/// Appends c_out − C zero channels: C×H×W → C_out×H×W. The layout being
/// channel-major, this is exactly ZeroPad(C·H·W → C_out·H·W), which it wraps:
/// every operator checks shapes under this layer's name and then delegates.
/// Fragmental (for c_out > C): the fragment is the padded channels of h_y,
/// (C_out − C)·H·W numbers per sample; inverse(y) drops them (exact on the
/// range). Submersive (vijp = identity) only when c_out = C. κ = γ = 1 as for
/// ZeroPad.
template <class S>
class PadChannels : public NoParameters<S>, public LinearInX<PadChannels<S>, S> {
 public:
  using scalar_type = S;
  using fragment_type = Fragment<S>;

  PadChannels(ImageShape in, Index c_out) : in_(in), out_{c_out, in.h, in.w}, pad_(make_pad(in, c_out)) {}

  [[nodiscard]] ImageShape in_shape() const { return in_; }
  [[nodiscard]] ImageShape out_shape() const { return out_; }
  [[nodiscard]] Index in_features() const { return in_.size(); }
  [[nodiscard]] Index out_features() const { return out_.size(); }
  [[nodiscard]] std::string name() const {
    return detail::cat("pad_channels(", in_.str(), "->", out_.str(), ")");
  }
  /// The ZeroPad this layer is.
  [[nodiscard]] const ZeroPad<S>& zero_pad() const { return pad_; }

  /// A a = [a; 0]
  void apply_into(const CRef<S>& a, MatRef<S> out) const { pad_.apply_into(a, out); }
  /// Aᵀ h = the first C channels of h
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const { pad_.apply_transpose_into(h, out); }
  [[nodiscard]] bool is_submersive() const { return pad_.is_submersive(); }
  /// Only when c_out = C: h_y = h_x.
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> out) const {
    if (!is_submersive())
      throw RankError(name() + ": channel padding is not submersive; use vijp_with_fragment");
    out = hx;
  }
  /// x = the first C channels of y (exact on the range of forward)
  void solve_into(const CRef<S>& y, MatRef<S> out) const { pad_.solve_into(y, out); }

  /// φ = the padded channels of h_y
  [[nodiscard]] Fragment<S> save_fragment(const Empty& r, const CRef<S>& hy) const {
    detail::check_rows(*this, "output cotangent", hy, out_features());
    return pad_.save_fragment(r, hy);
  }
  /// h_y = [h_x; φ]
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const Fragment<S>& f) const {
    detail::check_rows(*this, "input cotangent", hx, in_features(), x.cols());
    detail::check_rows(*this, "fragment", f.value, out_features() - in_features(), hx.cols());
    return pad_.vijp_with_fragment(x, hx, f);
  }

  /// ZeroPad's: κ = γ = 1.
  [[nodiscard]] static Amplification amplification(const Empty& r) { return ZeroPad<S>::amplification(r); }
  template <class T>
  [[nodiscard]] PadChannels<T> cast() const {
    return PadChannels<T>(in_, out_.c);
  }

 private:
  static ZeroPad<S> make_pad(const ImageShape& in, Index c_out) {
    detail::plumbing_require_valid("pad_channels", in);
    if (c_out < in.c)
      throw ShapeError(
          detail::cat("pad_channels: need c_out >= C, got ", in.str(), " -> ", c_out, "x", in.h, "x", in.w));
    return ZeroPad<S>(in.size(), c_out * in.h * in.w);
  }

  ImageShape in_, out_;
  ZeroPad<S> pad_;
};

}  // namespace moonwalk
