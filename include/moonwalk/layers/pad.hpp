// Moonwalk — zero padding: y = [x; 0], widening the features (e.g. to give a
// RevNet more width than its input).
#pragma once

#include <string>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/residuals.hpp"

namespace moonwalk {

/// y = [x; 0] with `out ≥ in` rows. Jᵀ h = h_top erases the padded rows, so
/// the layer is fragmental: its fragment is the padded rows of h_y,
/// `out − in` numbers per sample. It is injective: inverse(y) = y_top.
template <class S>
class ZeroPad : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = Empty;
  using fragment_type = Fragment<S>;

  ZeroPad(Index in, Index out) : in_(in), out_(out) {
    if (in <= 0 || out < in)
      throw ShapeError(detail::cat("zero_pad: need 0 < in <= out, got ", in, " -> ", out));
  }
  [[nodiscard]] Index in_features() const { return in_; }
  [[nodiscard]] Index out_features() const { return out_; }
  [[nodiscard]] std::string name() const { return detail::cat("zero_pad(", in_, "->", out_, ")"); }

  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_);
    Matrix<S> y = Matrix<S>::Zero(out_, x.cols());
    y.topRows(in_) = x;
    return y;
  }
  /// J dx = [dx; 0]
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "tangent", dx, in_, x.cols());
    return forward(dx);
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>&) const {
    return Matrix<S>::Zero(out_, x.cols());
  }
  /// Jᵀ h = h_top
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_batch(*this, "input", x.cols(), "cotangent", h.cols());
    return vjp_residual(Empty{}, h);
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {}
  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_);
    return {};
  }
  [[nodiscard]] Matrix<S> vjp_residual(const Empty&, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, out_);
    return h.topRows(in_);
  }

  [[nodiscard]] bool is_submersive() const { return out_ == in_; }
  /// Only when no padding: h_y = h_x.
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    if (!is_submersive()) throw RankError(name() + ": padding is not submersive; use vijp_with_fragment");
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "input cotangent", hx, in_, x.cols());
    return hx;
  }
  /// φ = h_y's padded rows
  [[nodiscard]] Fragment<S> save_fragment(const Empty&, const CRef<S>& hy) const {
    detail::check_rows(*this, "output cotangent", hy, out_);
    return {hy.bottomRows(out_ - in_)};
  }
  /// h_y = [h_x; φ]
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const Fragment<S>& f) const {
    detail::check_rows(*this, "input cotangent", hx, in_, x.cols());
    detail::check_rows(*this, "fragment", f.value, out_ - in_, hx.cols());
    Matrix<S> hy(out_, hx.cols());
    hy.topRows(in_) = hx;
    hy.bottomRows(out_ - in_) = f.value;
    return hy;
  }
  /// x = y_top (exact on the range of forward)
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    detail::check_rows(*this, "output", y, out_);
    return y.topRows(in_);
  }

  /// κ = γ = 1: the kept rows are copied, the padded ones restored exactly
  /// from the fragment.
  [[nodiscard]] static Amplification amplification(const Empty&) { return {1, 1}; }
  template <class T>
  [[nodiscard]] ZeroPad<T> cast() const {
    return ZeroPad<T>(in_, out_);
  }

 private:
  Index in_, out_;
};

}  // namespace moonwalk
