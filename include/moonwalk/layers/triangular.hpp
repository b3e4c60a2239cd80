// Moonwalk — dense layer y = [U | V] x + b with U unit upper triangular: a
// submersive Linear whose vijp is one triangular solve, with no factorisation.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/probe.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/core/version_cache.hpp"
#include "moonwalk/layers/linear_in_x.hpp"

namespace moonwalk {

/// Dense contracting or square layer `y = W x + b` (W out × in, out ≤ in)
/// parametrised as
///
///   W = [U | V],   U (out × out) UNIT upper triangular (U_ii = 1, free U_ij
///                  for i < j, zero below), V (out × (in − out)) free.
///
/// With x = [x₁; x₂] (x₁ the first `out` rows): y = U x₁ + V x₂ + b.
///
/// θ = [u, vec(V), b]: u is the strict upper triangle of U packed column by
/// column, `u[j(j−1)/2 + i] = U(i, j)` for 0 ≤ i < j < out (out(out−1)/2
/// numbers, the layout of OrthogonalLinear), then V column-major
/// (out · (in − out) numbers), then b (out numbers). The diagonal of U is not
/// a parameter: it is 1 under every update, so U is invertible for every θ.
///
/// Why: Moonwalk's vijp solves Wᵀ h_y = h_x. Its first `out` rows read
/// Uᵀ h_y = h_x[0:out], so
///
///   h_y = U⁻ᵀ h_x[0:out]      (forward substitution with Uᵀ: out² · batch / 2
///                              multiply-adds, against out · in · batch for
///                              W's product; no factorisation, nothing cached)
///
/// This is exact when h_x = Wᵀ h_y exactly. It is NOT the least-squares
/// solution (Linear's vijp): rounding in the other in − out rows of h_x is
/// ignored rather than averaged in, and an error δ in h_x reaches h_y as
/// U⁻ᵀ δ[0:out], so the relative error of h_y grows by up to ‖W‖₂ ‖U⁻¹‖₂
/// (≥ κ₂(W), since W Wᵀ = U Uᵀ + V Vᵀ ⪰ U Uᵀ gives ‖U⁻¹‖₂ ≥ ‖W⁺‖₂, and
/// ≥ κ₂(U)). For a square layer W = U and the figure is κ₂(U).
///
/// Initialisation (seeded; drawn in double so float and double layers start
/// from the same θ up to rounding): G = gaussian<double>(out, in, seed),
///   U_ij = upper · G_ij / √out   (i < j)     default upper = 0.1
///   V    = gain  · G[:, out:] / √in          (N(0, gain² / in), LeCun-scaled)
///   b    = 0.
/// A unit triangular matrix with O(1) random off-diagonal entries is
/// exponentially ill-conditioned in out (Viswanath & Trefethen 1998), and
/// κ(U) drives the vijp's error; with entries of standard deviation
/// 0.1/√out the strictly upper part N has ‖N‖₂ ≲ 0.15, so
/// κ₂(U) ≤ (1 + ‖N‖)/(1 − ‖N‖) ≈ 1.3 at any width while U is still a
/// generic (non-identity) mixing. `upper = 0` starts from U = I. The gain
/// scales V only: U's diagonal is fixed at 1.
///
/// The contract's operations come from LinearInX (A = W, offset b).
///
/// Operators (x = [x₁; x₂], G = h xᵀ):
///   forward       y = U x₁ + V x₂ + b
///   jvp           J dx = U dx₁ + V dx₂
///   jvp_params    dU x₁ + dV x₂ + db        (dU strictly upper, from du)
///   vjp           Jᵀ h = [Uᵀ h; Vᵀ h]       (residual: Empty — needs only W)
///   vjp_params    g_u(i, j) += (h x₁ᵀ)(i, j) for i < j,  g_V += h x₂ᵀ,
///                 g_b += Σ_columns h        (no gradient for the fixed diagonal)
///   vijp          h_y = U⁻ᵀ h_x[0:out]
///   inverse       x = U⁻¹ (y − b)           (square only)
///
/// Amplification (core/amplification.hpp) of this vijp, per weight version
/// (cached; mutable access to θ starts a new version, as for Linear):
///   bound    √(‖W‖₁ ‖W‖_∞) · √(‖U⁻¹‖₁ ‖U⁻¹‖_∞), the inverse norms by the
///            Hager–Higham estimator (solves with U and Uᵀ, as LAPACK's
///            xTRCON) and each at least 1 (= max 1/|U_ii|). Since
///            ‖A‖₂² ≤ ‖A‖₁‖A‖_∞ this is ≥ ‖W‖₂ ‖U⁻¹‖₂ (the error growth
///            above) when the estimator is exact, and at most
///            (in · out)^{1/4} · √out times it (k · κ₂(U) when square).
///   typical  γ = (‖W‖_F / √out) · (‖U⁻¹‖_F / √in): a random error δ (in)
///            gives E‖U⁻ᵀ δ₁‖² = ‖U⁻¹‖_F² ‖δ‖² / in and a random h_y gives
///            E‖Wᵀ h_y‖² = ‖W‖_F² ‖h_y‖² / out. Square: ‖U‖_F ‖U⁻¹‖_F / k.
/// Cost: O(in · out) for W's norms, a few O(out²) solves for the estimator and
/// one out × out unit-triangular inverse for ‖U⁻¹‖_F — no factorisation;
/// vijp never touches this cache. U is invertible for every θ, so unlike
/// Linear nothing throws RankError; a badly conditioned U shows up as a large
/// bound instead.
template <class S>
class TriangularLinear : public FlatParameters<S>, public LinearInX<TriangularLinear<S>, S> {
  template <class>
  friend class TriangularLinear;
  using FlatParameters<S>::theta_;
  using FlatParameters<S>::grad_;
  using FlatParameters<S>::version_;

 public:
  using scalar_type = S;
  using residual_type = Empty;

  struct Options {
    std::uint64_t seed = 0;
    /// V ~ N(0, gain² / in).
    S gain = S(1);
    /// Standard deviation of U's strictly upper entries times √out (0: U = I).
    S upper = S(0.1);
  };

  TriangularLinear(Index in, Index out) : TriangularLinear(in, out, Options{}) {}
  TriangularLinear(Index in, Index out, Options opt) : TriangularLinear(Uninitialised{}, in, out) {
    const Matrix<double> g = gaussian<double>(out_, in_, opt.seed);
    const double su = static_cast<double>(opt.upper) / std::sqrt(static_cast<double>(out_));
    for (Index j = 1; j < out_; ++j)
      for (Index i = 0; i < j; ++i) theta_(upper_index(i, j)) = static_cast<S>(su * g(i, j));
    const double sv = static_cast<double>(opt.gain) / std::sqrt(static_cast<double>(in_));
    V() = (sv * g.rightCols(in_ - out_)).template cast<S>();
    b().setZero();
    grad_ = detail::Gradient<S>::stored(theta_.size());
  }

  [[nodiscard]] Index in_features() const { return in_; }
  [[nodiscard]] Index out_features() const { return out_; }
  [[nodiscard]] std::string name() const { return detail::cat("triangular_linear(", in_, "->", out_, ")"); }

  /// The same layer (θ rounded to T) in scalar type T, gradient zero (stored
  /// on first use: detail::Gradient).
  template <class T>
  [[nodiscard]] TriangularLinear<T> cast() const {
    TriangularLinear<T> out(typename TriangularLinear<T>::Uninitialised{}, in_, out_);
    out.theta_ = theta_.template cast<T>();
    return out;
  }

  // ---- parameters θ = [packed U; vec V; b] (FlatParameters: mutable access
  //      starts a new weight version, so the cached amplification is
  //      recomputed on next use. The operators read θ directly, so writes
  //      through a kept span are always seen by them.)
  /// Number of packed entries of U: out(out−1)/2.
  [[nodiscard]] Index num_upper() const { return out_ * (out_ - 1) / 2; }
  /// Position of U(i, j), i < j, in θ (column-major strict upper triangle).
  [[nodiscard]] static Index upper_index(Index i, Index j) { return j * (j - 1) / 2 + i; }

  /// The packed strict upper triangle of U (class comment).
  Eigen::Map<Vector<S>> u() {
    ++version_;
    return {theta_.data(), num_upper()};
  }
  [[nodiscard]] Eigen::Map<const Vector<S>> u() const { return {theta_.data(), num_upper()}; }
  Eigen::Map<Matrix<S>> V() {
    ++version_;
    return {theta_.data() + num_upper(), out_, in_ - out_};
  }
  [[nodiscard]] Eigen::Map<const Matrix<S>> V() const {
    return {theta_.data() + num_upper(), out_, in_ - out_};
  }
  Eigen::Map<Vector<S>> b() {
    ++version_;
    return {theta_.data() + b_offset(), out_};
  }
  [[nodiscard]] Eigen::Map<const Vector<S>> b() const { return {theta_.data() + b_offset(), out_}; }

  /// U (out × out): ones on the diagonal, u above it, zeros below.
  [[nodiscard]] Matrix<S> U() const {
    Matrix<S> m = unpack(CVecRef<S>(u()));
    m.diagonal().setOnes();
    return m;
  }
  /// W = [U | V] (out × in).
  [[nodiscard]] Matrix<S> W() const {
    Matrix<S> w(out_, in_);
    w.leftCols(out_) = U();
    w.rightCols(in_ - out_) = V();
    return w;
  }

  // ---- the maps of y = W x + b (LinearInX writes the contract's operations
  //      and their shape checks from them)
  /// out = W a = U a₁ + V a₂
  void apply_into(const CRef<S>& a, MatRef<S> out) const {
    const Matrix<S> u_full = unpack(CVecRef<S>(u()));
    out.noalias() = u_full.template triangularView<Eigen::UnitUpper>() * a.topRows(out_);
    if (in_ > out_) out.noalias() += V() * a.bottomRows(in_ - out_);
  }
  /// out = Wᵀ h = [Uᵀ h; Vᵀ h]
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const {
    const Matrix<S> u_full = unpack(CVecRef<S>(u()));
    out.topRows(out_).noalias() = u_full.template triangularView<Eigen::UnitUpper>().transpose() * h;
    if (in_ > out_) out.bottomRows(in_ - out_).noalias() = V().transpose() * h;
  }
  /// y += s · b on every column
  void add_offset(MatRef<S> y, S s) const { add_to_columns<S>(y, b(), s); }

  /// J_θ dθ = dU x₁ + dV x₂ + db, dU strictly upper from the packed du.
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "parameter tangent", dtheta, this->num_params(), 1);
    const Matrix<S> dU = unpack(dtheta.head(num_upper()));
    Eigen::Map<const Matrix<S>> dV(dtheta.data() + num_upper(), out_, in_ - out_);
    Matrix<S> t(out_, x.cols());
    t.noalias() = dU.template triangularView<Eigen::StrictlyUpper>() * x.topRows(out_);
    if (in_ > out_) t.noalias() += dV * x.bottomRows(in_ - out_);
    t.colwise() += dtheta.segment(b_offset(), out_);
    return t;
  }
  /// g_u(i, j) += (h x₁ᵀ)(i, j) for i < j, g_V += h x₂ᵀ, g_b += Σ_columns h.
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "cotangent", h, out_, x.cols());
    detail::check_rows(*this, "gradient", g, this->num_params(), 1);
    Matrix<S> gU(out_, out_);
    gU.noalias() = h * x.topRows(out_).transpose();
    for (Index j = 1; j < out_; ++j)
      for (Index i = 0; i < j; ++i) g(upper_index(i, j)) += gU(i, j);
    if (in_ > out_) {
      Eigen::Map<Matrix<S>> gV(g.data() + num_upper(), out_, in_ - out_);
      gV.noalias() += h * x.bottomRows(in_ - out_).transpose();
    }
    g.segment(b_offset(), out_) += h.rowwise().sum();
  }

  // ---- Moonwalk: always submersive (U invertible for every θ)
  [[nodiscard]] static constexpr bool is_submersive() { return true; }
  [[nodiscard]] bool is_invertible() const { return out_ == in_; }

  /// out = h_y = U⁻ᵀ h_x[0:out]: the first `out` rows of Wᵀ h_y = h_x (the
  /// vijp; class comment: exact for h_x = Wᵀ h_y, not the least-squares
  /// solution).
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> hy) const {
    const Matrix<S> u_full = unpack(CVecRef<S>(u()));
    hy = hx.topRows(out_);
    u_full.template triangularView<Eigen::UnitUpper>().transpose().solveInPlace(hy);
  }
  /// x ← U⁻¹ x in place (square only; the inverse, after LinearInX subtracted b).
  void solve_into(const CRef<S>& y, MatRef<S> x) const {
    if (!is_invertible()) throw RankError(name() + ": inverse needs a square layer (in == out)");
    const Matrix<S> u_full = unpack(CVecRef<S>(u()));
    x = y;  // (in place: the same matrix)
    u_full.template triangularView<Eigen::UnitUpper>().solveInPlace(x);
  }

  /// Amplification of the vijp (class comment), once per weight version.
  [[nodiscard]] Amplification amplification(const Empty&) const {
    const Cache& c = cache();
    return {c.bound, c.typical};
  }

  /// Frees the cached amplification figures (moonwalk::release_derived); the next use rebuilds it.
  void release_derived() const noexcept { cache_.reset(); }

 private:
  struct Cache {
    double bound = 1;    // √(‖W‖₁‖W‖_∞) · √(‖U⁻¹‖₁‖U⁻¹‖_∞), estimated
    double typical = 1;  // (‖W‖_F / √out) · (‖U⁻¹‖_F / √in)
  };

  struct Uninitialised {};
  /// Shapes checked, θ zero, gradient zero (stored on first use; the public
  /// constructor stores it): for the constructor and cast().
  TriangularLinear(Uninitialised, Index in, Index out) : in_(in), out_(out) {
    if (in <= 0 || out <= 0 || out > in)
      throw ShapeError(
          detail::cat("TriangularLinear: needs 0 < out <= in (W = [U | V] is out x in with U out x ",
                      "out), got W ", detail::shape_str(out, in), " (in = ", in, ", out = ", out, ")"));
    theta_.setZero(out_ * (out_ - 1) / 2 + out_ * (in_ - out_) + out_);
    grad_ = detail::Gradient<S>::on_first_use(theta_.size());
  }

  [[nodiscard]] Index b_offset() const { return num_upper() + out_ * (in_ - out_); }

  /// The out × out matrix with the packed entries above the diagonal and
  /// zeros on and below it (read through UnitUpper / StrictlyUpper views).
  [[nodiscard]] Matrix<S> unpack(const CVecRef<S>& packed) const {
    Matrix<S> m = Matrix<S>::Zero(out_, out_);
    for (Index j = 1; j < out_; ++j) m.col(j).head(j) = packed.segment(upper_index(0, j), j);
    return m;
  }

  /// M ← M⁻¹ for M unit upper triangular (its diagonal and lower part are not
  /// read; on return the lower part is zero), by the block recursion
  ///   [A B; 0 D]⁻¹ = [A⁻¹  −A⁻¹ B D⁻¹; 0  D⁻¹]
  /// with two triangular solves per level: k³/3 flops (blocked), a third of a
  /// solve against the identity, which does not skip its zeros.
  static void unit_upper_inverse(Eigen::Ref<Matrix<double>> m) {
    const Index n = m.rows();
    if (n <= 32) {
      Matrix<double> inv = Matrix<double>::Identity(n, n);
      m.template triangularView<Eigen::UnitUpper>().solveInPlace(inv);
      m = inv.template triangularView<Eigen::Upper>();
      return;
    }
    const Index h = n / 2;
    auto B = m.topRightCorner(h, n - h);
    m.bottomRightCorner(n - h, n - h)
        .template triangularView<Eigen::UnitUpper>()
        .template solveInPlace<Eigen::OnTheRight>(B);                                   // B D⁻¹
    m.topLeftCorner(h, h).template triangularView<Eigen::UnitUpper>().solveInPlace(B);  // A⁻¹ B D⁻¹
    B = -B;
    m.bottomLeftCorner(n - h, h).setZero();
    unit_upper_inverse(m.topLeftCorner(h, h));
    unit_upper_inverse(m.bottomRightCorner(n - h, n - h));
  }

  /// The amplification figures (class comment), in double, once per version.
  const Cache& cache() const {
    return cache_.get(version_, [this](Cache& c) { estimate(c); });
  }

  void estimate(Cache& c) const {
    const Index k = out_;
    // U in double (k × k); W's norms are read from U and V without forming W.
    Matrix<double> Ud = unpack(CVecRef<S>(u())).template cast<double>();
    Ud.diagonal().setOnes();
    const auto Vd = V().template cast<double>();
    const Matrix<double>& Uc = Ud;  // (the const view: Eigen 3.4 cannot transpose a mutable one)
    const auto T = Uc.triangularView<Eigen::UnitUpper>();
    auto solve = [&](VecRef<double> v) { T.solveInPlace(v); };
    auto solve_t = [&](VecRef<double> v) { T.transpose().solveInPlace(v); };
    // ‖U⁻¹‖₁ = ‖B‖₁ with B = U⁻¹; ‖U⁻¹‖_∞ = ‖U⁻ᵀ‖₁. Both ≥ max 1/|U_ii| = 1.
    Matrix<double> work(k, 4);
    const double inv_1 = std::max(detail::norm1_estimate(k, solve, solve_t, work), 1.0);
    const double inv_inf = std::max(detail::norm1_estimate(k, solve_t, solve, work), 1.0);
    // ‖W‖₁ = max(‖U‖₁, ‖V‖₁), ‖W‖_∞ = max_i (Σ_j |U_ij| + Σ_j |V_ij|), ‖W‖_F² = ‖U‖_F² + ‖V‖_F².
    double w_1 = Ud.cwiseAbs().colwise().sum().maxCoeff();
    if (in_ > out_) w_1 = std::max(w_1, static_cast<double>(Vd.cwiseAbs().colwise().sum().maxCoeff()));
    Vector<double> rows = Ud.cwiseAbs().rowwise().sum();
    if (in_ > out_) rows += Vd.cwiseAbs().rowwise().sum();
    const double w_inf = rows.maxCoeff();
    const double w_f = std::sqrt(Ud.squaredNorm() + (in_ > out_ ? Vd.squaredNorm() : 0.0));
    c.bound = std::sqrt(w_1 * inv_1) * std::sqrt(w_inf * inv_inf);
    // ‖U⁻¹‖_F from the unit-triangular inverse (k × k, k³/3 flops), in place.
    unit_upper_inverse(Ud);
    c.typical =
        (w_f / std::sqrt(static_cast<double>(out_))) * (Ud.norm() / std::sqrt(static_cast<double>(in_)));
  }

  Index in_, out_;
  VersionCache<Cache> cache_;
};

}  // namespace moonwalk
