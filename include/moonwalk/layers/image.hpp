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
class SpaceToDepth : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = Empty;

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

  /// y = P x
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return gather(x);
  }
  /// J dx = P dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "tangent", dx, in_features(), x.cols());
    return gather(dx);
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>&) const {
    return Matrix<S>::Zero(out_features(), x.cols());
  }
  /// Jᵀ h = Pᵀ h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_batch(*this, "input", x.cols(), "cotangent", h.cols());
    return vjp_residual(Empty{}, h);
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {}
  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return {};
  }
  [[nodiscard]] Matrix<S> vjp_residual(const Empty&, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, out_features());
    return scatter(h);
  }
  /// h_y = P h_x, the unique solution of Pᵀ h_y = h_x
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "input cotangent", hx, in_features(), x.cols());
    return gather(hx);
  }
  /// x = Pᵀ y
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    detail::check_rows(*this, "output", y, out_features());
    return scatter(y);
  }

  /// A permutation: κ = γ = 1.
  [[nodiscard]] static Amplification amplification(const Empty&) { return {1, 1}; }
  template <class T>
  [[nodiscard]] SpaceToDepth<T> cast() const {
    return SpaceToDepth<T>(in_, f_);
  }

 private:
  /// P a: row k of the result is row src_[k] of a.
  Matrix<S> gather(const CRef<S>& a) const {
    Matrix<S> r(out_features(), a.cols());
    for (Index b = 0; b < a.cols(); ++b)
      for (Index k = 0; k < r.rows(); ++k) r(k, b) = a(src_[static_cast<std::size_t>(k)], b);
    return r;
  }
  /// Pᵀ a: row src_[k] of the result is row k of a.
  Matrix<S> scatter(const CRef<S>& a) const {
    Matrix<S> r(in_features(), a.cols());
    for (Index b = 0; b < a.cols(); ++b)
      for (Index k = 0; k < a.rows(); ++k) r(src_[static_cast<std::size_t>(k)], b) = a(k, b);
    return r;
  }

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
class AvgPool2d : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = Empty;

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

  /// y = window means
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return window_sums(x) / static_cast<S>(f_ * f_);
  }
  /// J dx = window means of dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "tangent", dx, in_features(), x.cols());
    return window_sums(dx) / static_cast<S>(f_ * f_);
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>&) const {
    return Matrix<S>::Zero(out_features(), x.cols());
  }
  /// Jᵀ h: h(c, i, j)/f² on every pixel of window (i, j)
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_batch(*this, "input", x.cols(), "cotangent", h.cols());
    return vjp_residual(Empty{}, h);
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {}
  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return {};
  }
  [[nodiscard]] Matrix<S> vjp_residual(const Empty&, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, out_features());
    const S scale = S(1) / static_cast<S>(f_ * f_);
    Matrix<S> g(in_features(), h.cols());
    for (Index b = 0; b < h.cols(); ++b)
      for (Index c = 0; c < in_.c; ++c)
        for (Index i = 0; i < in_.h; ++i)
          for (Index j = 0; j < in_.w; ++j)
            g(in_.index(c, i, j), b) = scale * h(out_.index(c, i / f_, j / f_), b);
    return g;
  }
  /// h_y = window sums of h_x (exact on range(Jᵀ), least squares otherwise)
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "input cotangent", hx, in_features(), x.cols());
    return window_sums(hx);
  }

  /// Singular values all 1/f: κ = 1, γ = 1/f.
  [[nodiscard]] Amplification amplification(const Empty&) const { return {1, 1.0 / static_cast<double>(f_)}; }
  template <class T>
  [[nodiscard]] AvgPool2d<T> cast() const {
    return AvgPool2d<T>(in_, f_);
  }

 private:
  Matrix<S> window_sums(const CRef<S>& a) const {
    Matrix<S> r = Matrix<S>::Zero(out_features(), a.cols());
    for (Index b = 0; b < a.cols(); ++b)
      for (Index c = 0; c < in_.c; ++c)
        for (Index i = 0; i < in_.h; ++i)
          for (Index j = 0; j < in_.w; ++j) r(out_.index(c, i / f_, j / f_), b) += a(in_.index(c, i, j), b);
    return r;
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
class GlobalAvgPool : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = Empty;

  explicit GlobalAvgPool(ImageShape in) : in_(in) { detail::plumbing_require_valid("global_avg_pool", in); }

  [[nodiscard]] ImageShape in_shape() const { return in_; }
  [[nodiscard]] ImageShape out_shape() const { return {in_.c, 1, 1}; }
  [[nodiscard]] Index in_features() const { return in_.size(); }
  [[nodiscard]] Index out_features() const { return in_.c; }
  [[nodiscard]] std::string name() const {
    return detail::cat("global_avg_pool(", in_.str(), "->", in_.c, ")");
  }

  /// y = channel means
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return channel_sums(x) / static_cast<S>(pixels());
  }
  /// J dx = channel means of dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "tangent", dx, in_features(), x.cols());
    return channel_sums(dx) / static_cast<S>(pixels());
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>&) const {
    return Matrix<S>::Zero(out_features(), x.cols());
  }
  /// Jᵀ h: h(c)/(H·W) on every pixel of channel c
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_batch(*this, "input", x.cols(), "cotangent", h.cols());
    return vjp_residual(Empty{}, h);
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {}
  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return {};
  }
  [[nodiscard]] Matrix<S> vjp_residual(const Empty&, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, out_features());
    const Index p = pixels();
    const S scale = S(1) / static_cast<S>(p);
    Matrix<S> g(in_features(), h.cols());
    for (Index b = 0; b < h.cols(); ++b)
      for (Index c = 0; c < in_.c; ++c) g.col(b).segment(c * p, p).setConstant(scale * h(c, b));
    return g;
  }
  /// h_y = channel sums of h_x (exact on range(Jᵀ), least squares otherwise)
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "input cotangent", hx, in_features(), x.cols());
    return channel_sums(hx);
  }

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
  Matrix<S> channel_sums(const CRef<S>& a) const {
    const Index p = pixels();
    Matrix<S> r(in_.c, a.cols());
    for (Index b = 0; b < a.cols(); ++b)
      for (Index c = 0; c < in_.c; ++c) r(c, b) = a.col(b).segment(c * p, p).sum();
    return r;
  }

  ImageShape in_;
};

// ---------------------------------------------------------------------------
/// The end of the image part of a network: C×H×W → C·H·W features
/// (out_shape() = (C·H·W)×1×1). Image batches already are columns, so this is
/// the identity on the layout: J = I, vjp = vijp = inverse = identity, κ = γ = 1.
template <class S>
class Flatten : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = Empty;

  explicit Flatten(ImageShape in) : in_(in) { detail::plumbing_require_valid("flatten", in); }

  [[nodiscard]] ImageShape in_shape() const { return in_; }
  [[nodiscard]] ImageShape out_shape() const { return {in_.size(), 1, 1}; }
  [[nodiscard]] Index in_features() const { return in_.size(); }
  [[nodiscard]] Index out_features() const { return in_.size(); }
  [[nodiscard]] std::string name() const { return detail::cat("flatten(", in_.str(), "->", in_.size(), ")"); }

  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const { return checked(x, "input"); }
  /// J dx = dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "tangent", dx, in_features(), x.cols());
    return dx;
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>&) const {
    return Matrix<S>::Zero(out_features(), x.cols());
  }
  /// Jᵀ h = h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_batch(*this, "input", x.cols(), "cotangent", h.cols());
    return checked(h, "cotangent");
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {}
  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return {};
  }
  [[nodiscard]] Matrix<S> vjp_residual(const Empty&, const CRef<S>& h) const {
    return checked(h, "cotangent");
  }
  /// h_y = h_x
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "input cotangent", hx, in_features(), x.cols());
    return hx;
  }
  /// x = y
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const { return checked(y, "output"); }

  /// J = I: κ = γ = 1.
  [[nodiscard]] static Amplification amplification(const Empty&) { return {1, 1}; }
  template <class T>
  [[nodiscard]] Flatten<T> cast() const {
    return Flatten<T>(in_);
  }

 private:
  Matrix<S> checked(const CRef<S>& m, const char* what) const {
    detail::check_rows(*this, what, m, in_features());
    return m;
  }
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
class PadChannels : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = Empty;
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

  /// y = [x; 0]
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return pad_.forward(x);
  }
  /// J dx = [dx; 0]
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "tangent", dx, in_features(), x.cols());
    return pad_.jvp(x, dx);
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    return pad_.jvp_params(x, dtheta);
  }
  /// Jᵀ h = the first C channels of h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_batch(*this, "input", x.cols(), "cotangent", h.cols());
    return vjp_residual(Empty{}, h);
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {}
  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    return {};
  }
  [[nodiscard]] Matrix<S> vjp_residual(const Empty& r, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, out_features());
    return pad_.vjp_residual(r, h);
  }

  [[nodiscard]] bool is_submersive() const { return pad_.is_submersive(); }
  /// Only when c_out = C: h_y = h_x.
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    if (!is_submersive())
      throw RankError(name() + ": channel padding is not submersive; use vijp_with_fragment");
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "input cotangent", hx, in_features(), x.cols());
    return pad_.vijp(x, hx);
  }
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
  /// x = the first C channels of y (exact on the range of forward)
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    detail::check_rows(*this, "output", y, out_features());
    return pad_.inverse(y);
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
