// Moonwalk — zero padding: y = [x; 0], widening the features (e.g. to give a
// RevNet more width than its input).
#pragma once

#include <string>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/layers/linear_in_x.hpp"

namespace moonwalk {

/// y = [x; 0] with `out ≥ in` rows (LinearInX with A = [I; 0]). Jᵀ h = h_top
/// erases the padded rows, so the layer is fragmental: its fragment is the
/// padded rows of h_y, `out − in` numbers per sample. It is injective:
/// inverse(y) = y_top.
template <class S>
class ZeroPad : public NoParameters<S>, public LinearInX<ZeroPad<S>, S> {
 public:
  using scalar_type = S;
  using fragment_type = Fragment<S>;

  ZeroPad(Index in, Index out) : in_(in), out_(out) {
    if (in <= 0 || out < in)
      throw ShapeError(detail::cat("zero_pad: need 0 < in <= out, got ", in, " -> ", out));
  }
  [[nodiscard]] Index in_features() const { return in_; }
  [[nodiscard]] Index out_features() const { return out_; }
  [[nodiscard]] std::string name() const { return detail::cat("zero_pad(", in_, "->", out_, ")"); }

  /// A a = [a; 0]
  void apply_into(const CRef<S>& a, MatRef<S> out) const {
    out.topRows(in_) = a;
    out.bottomRows(out_ - in_).setZero();
  }
  /// Aᵀ h = h_top
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const { out = h.topRows(in_); }
  [[nodiscard]] bool is_submersive() const { return out_ == in_; }
  /// Only when no padding: h_y = h_x.
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> out) const {
    if (!is_submersive()) throw RankError(name() + ": padding is not submersive; use vijp_with_fragment");
    out = hx;
  }
  /// x = y_top (exact on the range of forward)
  void solve_into(const CRef<S>& y, MatRef<S> out) const { out = y.topRows(in_); }

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
