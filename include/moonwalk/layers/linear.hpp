// Moonwalk — dense layer y = W x + b (W is out × in).
#pragma once

#include <Eigen/QR>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <sstream>
#include <string>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/dense.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/probe.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/core/version_cache.hpp"
#include "moonwalk/layers/linear_in_x.hpp"

namespace moonwalk {

/// Dense layer `y = W x + b`.
///
/// The contract's operations come from LinearInX (A = W, offset b); the
/// fragment of an expanding W is this layer's own.
///
/// Parameters are stored flat as θ = [vec(W) (column-major), b]. Default
/// initialisation is (semi-)orthogonal W with all singular values 1 and b = 0
/// (`Options::init = Init::gaussian` for N(0, gain²/in) entries instead).
///
/// Its reverse pass saves nothing (`Jᵀ h = Wᵀ h` needs only W). For out ≤ in
/// it is submersive: `vijp` solves `Wᵀ h_y = h_x` in the least-squares sense
/// through a Householder QR of Wᵀ (blocked, detail::BlockedQR; backward
/// stable for full rank, never the normal equations), factorised once per
/// weight version and applied directly: h_y = R⁻¹ Q₁ᵀ h_x (one application of
/// the reflectors and a k × k triangular solve per call). In training every
/// weight version meets one or two vijps, so the explicit right inverse
/// P = R⁻¹ Q₁ᵀ (k × in: forming Q₁ and a solve with `in` right-hand sides,
/// about 5 · in · k² flops) is formed only for a batch of at least
/// `kExplicitBatch · k` columns, where forming it costs less than applying
/// the reflectors and R⁻¹ to the batch (≈ 3 products of W with the batch);
/// the vijp is then the one product h_y = P h_x. For out > in it is
/// fragmental: the fragment is the component of h_y in null(Wᵀ), `out − in`
/// numbers per sample.
///
/// Amplification (core/amplification.hpp), from the same cached QR (R is
/// k × k, k = min(in, out), with κ(R) = κ(W) and ‖R⁻¹‖_F = ‖W⁺‖_F):
///   bound    κ ≈ √(κ₁(R) · κ_∞(R)), each ‖R⁻¹‖ by the Hager–Higham estimator
///            (core/probe.hpp); since ‖A‖₂² ≤ ‖A‖₁‖A‖_∞ this is ≥ κ₂(W) when
///            the estimator is exact, and never above k · κ₂(W)
///   typical  γ = (‖W‖_F / √out) · (‖W⁺‖_F / √in)   (1 for a square orthogonal
///            W, √(k / max(in, out)) < 1 for a semi-orthogonal one: a random
///            error loses its part outside the range)
/// computed once per weight version. An expanding W's fragment restores the
/// null(Wᵀ) part exactly, so the same range-space figures apply.
template <class S>
class Linear : public FlatParameters<S>, public LinearInX<Linear<S>, S> {
  template <class>
  friend class Linear;
  using FlatParameters<S>::theta_;
  using FlatParameters<S>::grad_;
  using FlatParameters<S>::version_;

 public:
  using scalar_type = S;
  using residual_type = Empty;
  using fragment_type = Fragment<S>;

  struct Options {
    std::uint64_t seed = 0;
    S gain = S(1);
    Init init = Init::orthogonal;
  };

  Linear(Index in, Index out) : Linear(in, out, Options{}) {}
  Linear(Index in, Index out, Options opt) : FlatParameters<S>(num_params_of(in, out)), in_(in), out_(out) {
    if (opt.init == Init::orthogonal)
      W() = orthogonal<S>(out, in, opt.seed, opt.gain);
    else
      W() = gaussian<S>(out, in, opt.seed) * (opt.gain / std::sqrt(static_cast<S>(in)));
    b().setZero();
  }

  [[nodiscard]] Index in_features() const { return in_; }
  [[nodiscard]] Index out_features() const { return out_; }
  [[nodiscard]] std::string name() const { return detail::cat("linear(", in_, "->", out_, ")"); }

  /// The same layer in scalar type T: W and b converted, gradient zero
  /// (stored on first use: detail::Gradient).
  template <class T>
  [[nodiscard]] Linear<T> cast() const {
    Linear<T> out(typename Linear<T>::Uninitialised{}, in_, out_);
    out.theta_ = theta_.template cast<T>();
    return out;
  }

  /// dst = cast<T>() into dst's storage: W and b converted in place, gradient
  /// zero (its storage, if dst has made it, zeroed in place), and a new
  /// weight version, so dst's factorisation is rebuilt into the buffers of
  /// its previous one (no allocation at an unchanged shape).
  template <class T>
  void cast_into(Linear<T>& dst) const {
    dst.in_ = in_;
    dst.out_ = out_;
    detail::safe_resize(dst.theta_, theta_.size());
    dst.theta_ = theta_.template cast<T>();
    dst.grad_.assign_zero(theta_.size());
    ++dst.version_;
  }

  // ---- parameters θ = [vec W; b] (FlatParameters: mutable access starts a
  //      new weight version, so the cached factorisation is rebuilt on the
  //      next vijp. A span kept across a vijp and written later leaves the
  //      cache stale.)
  Eigen::Map<Matrix<S>> W() {
    ++version_;
    return {theta_.data(), out_, in_};
  }
  [[nodiscard]] Eigen::Map<const Matrix<S>> W() const { return {theta_.data(), out_, in_}; }
  Eigen::Map<Vector<S>> b() {
    ++version_;
    return {theta_.data() + out_ * in_, out_};
  }
  [[nodiscard]] Eigen::Map<const Vector<S>> b() const { return {theta_.data() + out_ * in_, out_}; }
  /// W ← s W (b kept; a new weight version).
  bool scale_weight(double s) {
    W() *= static_cast<S>(s);
    return true;
  }

  // ---- the maps of y = W x + b (LinearInX writes the contract's operations
  //      and their shape checks from them)
  /// out = W a
  void apply_into(const CRef<S>& a, MatRef<S> out) const {
    detail::gemm<S>(out, W(), detail::Op::N, a, detail::Op::N);
  }
  /// out = Wᵀ h
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const {
    detail::gemm<S>(out, W(), detail::Op::T, h, detail::Op::N);
  }
  /// y += s · b on every column
  void add_offset(MatRef<S> y, S s) const { add_to_columns<S>(y, b(), s); }

  /// J_θ dθ = dW x + db
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "parameter tangent", dtheta, this->num_params(), 1);
    Eigen::Map<const Matrix<S>> dW(dtheta.data(), out_, in_);
    Matrix<S> t(out_, x.cols());
    t.noalias() = dW * x;
    t.colwise() += dtheta.segment(out_ * in_, out_);
    return t;
  }
  /// g_W += h xᵀ, g_b += Σ_columns h
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "cotangent", h, out_, x.cols());
    detail::check_rows(*this, "gradient", g, this->num_params(), 1);
    Eigen::Map<Matrix<S>> gW(g.data(), out_, in_);
    detail::gemm<S>(gW, h, detail::Op::N, x, detail::Op::T, S(1), /*accumulate=*/true);
    g.segment(out_ * in_, out_) += h.rowwise().sum();
  }

  // ---- Moonwalk
  /// Submersive exactly when W has full row rank, which needs out ≤ in.
  [[nodiscard]] bool is_submersive() const { return out_ <= in_; }
  [[nodiscard]] bool is_invertible() const { return out_ == in_; }

  /// out = h_y with Wᵀ h_y = h_x: h_y = R⁻¹ Q₁ᵀ h_x from Wᵀ = Q R (out ≤ in;
  /// the vijp). Allocates nothing once the weight version's factorisation
  /// (and P) exist and this thread's scratch (core/dense.hpp) has seen the
  /// shape.
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> hy) const {
    if (!is_submersive())
      throw RankError(name() +
                      ": vijp needs out <= in (an expanding Linear is fragmental: use "
                      "vijp_with_fragment)");
    const Cache& c = cache();
    if (hx.cols() >= kExplicitBatch * out_) {
      // h_y = P h_x with P = R⁻¹ Q₁ᵀ, formed once per weight version.
      if (!c.p_formed) {
        // Q₁ = Q [I; 0] (in × k), transposed into P's storage, then R⁻¹ applied.
        auto q1 = detail::scratch_matrix<S>(detail::Scratch::layer, in_, out_);
        q1.setIdentity();
        c.qr.apply_q(q1);
        detail::safe_resize(c.p, out_, in_);
        c.p = q1.transpose();
        detail::trsm_upper<S>(c.r_block(), detail::Op::N, c.p);
        c.p_formed = true;
      }
      detail::gemm<S>(hy, c.p, detail::Op::N, hx, detail::Op::N);
      return;
    }
    // Wᵀ = Q R (in × out, tall): h_y = R⁻¹ (Qᵀ h_x)[0:k]
    auto t = detail::scratch_matrix<S>(detail::Scratch::layer, in_, hx.cols());
    t = hx;
    c.qr.apply_qt(t);
    hy = t.topRows(out_);
    detail::trsm_upper<S>(c.r_block(), detail::Op::N, hy);
  }
  /// x ← W⁻¹ x in place (square W; the inverse, after LinearInX subtracted
  /// b): Wᵀ = Q R, so W = Rᵀ Qᵀ and W⁻¹ = Q R⁻ᵀ.
  void solve_into(const CRef<S>& y, MatRef<S> x) const {
    if (!is_invertible()) throw RankError(name() + ": inverse needs a square W");
    const Cache& c = cache();
    x = y;  // (in place: the same matrix)
    c.rt().solveInPlace(x);
    c.qr.apply_q(x);
  }

  /// φ = Q₂ᵀ h_y, the component of h_y in null(Wᵀ) (empty when out ≤ in).
  [[nodiscard]] Fragment<S> save_fragment(const Empty&, const CRef<S>& hy) const {
    detail::check_rows(*this, "output cotangent", hy, out_);
    if (is_submersive()) return {Matrix<S>(0, hy.cols())};
    // W = Q R (out × in, tall): φ = Q₂ᵀ h_y = (Qᵀ h_y)[k:out]
    Matrix<S> t = hy;
    cache().qr.apply_qt(t);
    return {Matrix<S>(t.bottomRows(out_ - in_))};
  }
  /// h_y = Q₁ R⁻ᵀ h_x + Q₂ φ = Q [R⁻ᵀ h_x; φ], from W = Q R (out > in).
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const Fragment<S>& f) const {
    if (is_submersive()) return this->vijp(x, hx);
    detail::check_rows(*this, "input cotangent", hx, in_);
    detail::check_rows(*this, "fragment", f.value, out_ - in_, hx.cols());
    const Cache& c = cache();
    Matrix<S> hy(out_, hx.cols());
    hy.topRows(in_) = hx;
    c.rt().solveInPlace(hy.topRows(in_));
    hy.bottomRows(out_ - in_) = f.value;
    c.qr.apply_q(hy);
    return hy;
  }

  /// Amplification of the vijp (class comment): the weights' condition
  /// estimate and γ = ‖W‖_F ‖W⁺‖_F / k; +∞ for a rank-deficient W.
  [[nodiscard]] Amplification amplification(const Empty&) const {
    try {
      const Cache& c = cache();
      return {c.cond_estimate, c.typical};
    } catch (const RankError&) {
      const double inf = std::numeric_limits<double>::infinity();
      return {inf, inf};
    }
  }
  /// √(κ₁(R) κ_∞(R)) of the cached factor (class comment): κ₂(W) ≤ it ≤ k · κ₂(W)
  /// up to the 1-norm estimator's (rare) underestimate. Throws RankError when
  /// W is rank deficient.
  [[nodiscard]] double condition_estimate() const { return cache().cond_estimate; }

  /// The k × k R factor of the cached QR (of Wᵀ when out ≤ in, of W otherwise).
  [[nodiscard]] Matrix<S> r_factor() const { return cache().r(); }

  /// A vijp on at least kExplicitBatch · out columns applies the explicit
  /// right inverse (class comment).
  static constexpr Index kExplicitBatch = 2;

  /// Frees the cached QR (moonwalk::release_derived); the next use rebuilds it.
  void release_derived() const noexcept { cache_.reset(); }

 private:
  struct Cache {
    detail::BlockedQR<S> qr;  // of the tall one of Wᵀ and W (m × k)
    Index k = 0;
    double cond_estimate = 1;  // √(κ₁(R) κ_∞(R)), estimated
    double typical = 1;        // ‖W‖_F ‖W⁺‖_F / √(in · out)
    // R⁻¹ Q₁ᵀ (out × in), formed by the first wide vijp of a weight version
    // into the storage of the previous version's.
    mutable Matrix<S> p;
    mutable bool p_formed = false;
    /// R's square block (its strictly lower part holds reflectors).
    [[nodiscard]] auto r_block() const { return qr.matrixQR().topLeftCorner(k, k); }
    /// R (k × k, upper triangular), a view into the factorisation.
    [[nodiscard]] auto r() const {
      return qr.matrixQR().topLeftCorner(k, k).template triangularView<Eigen::Upper>();
    }
    /// Rᵀ (lower triangular).
    [[nodiscard]] auto rt() const {
      return qr.matrixQR().topLeftCorner(k, k).transpose().template triangularView<Eigen::Lower>();
    }
  };

  /// out · in + out, after checking both sizes are positive.
  static Index num_params_of(Index in, Index out) {
    if (in <= 0 || out <= 0)
      throw ShapeError("Linear: sizes must be positive, got " + detail::shape_str(out, in));
    return out * in + out;
  }

  struct Uninitialised {};
  /// Shapes only (θ uninitialised, gradient zero, stored on first use): for cast().
  Linear(Uninitialised, Index in, Index out)
      : FlatParameters<S>(Vector<S>(out * in + out)), in_(in), out_(out) {}

  /// √(κ₁(R) κ_∞(R)) with ‖R‖₁, ‖R‖_∞ exact and ‖R⁻¹‖₁ = ‖R⁻ᵀ‖_∞,
  /// ‖R⁻¹‖_∞ = ‖R⁻ᵀ‖₁ by the Hager–Higham estimator (solves with R and Rᵀ,
  /// as LAPACK's xTRCON). Each estimate is raised to max_i 1/|r_ii| (also a
  /// lower bound of both norms of R⁻¹), so the result is ≥ |r_11| / |r_kk|.
  /// Columns of the factorisation's scratch: ‖R⁻¹‖_F is summed over blocks of
  /// this many columns of R⁻¹ (k × 32 doubles, not a k × k inverse).
  static constexpr Index kWorkColumns = 32;

  /// The upper triangle of R (k × k; its strictly lower part is ignored);
  /// `work` is the estimator's scratch (detail::norm1_estimate).
  static double condition_of(const Eigen::Ref<const Matrix<double>>& R, MatRef<double> work) {
    const Index k = R.rows();
    const auto U = R.triangularView<Eigen::Upper>();
    auto solve = [&](VecRef<double> v) { U.solveInPlace(v); };
    auto solve_t = [&](VecRef<double> v) { U.transpose().solveInPlace(v); };
    const double diag_inv = R.diagonal().cwiseAbs().cwiseInverse().maxCoeff();
    const double inv_1 = std::max(detail::norm1_estimate(k, solve, solve_t, work), diag_inv);
    const double inv_inf = std::max(detail::norm1_estimate(k, solve_t, solve, work), diag_inv);
    double norm_1 = 0, norm_inf = 0;  // of the upper triangle, read in place
    for (Index j = 0; j < k; ++j) {
      norm_1 = std::max(norm_1, R.col(j).head(j + 1).cwiseAbs().sum());
      norm_inf = std::max(norm_inf, R.row(j).tail(k - j).cwiseAbs().sum());
    }
    return std::sqrt(norm_1 * inv_1) * std::sqrt(norm_inf * inv_inf);
  }

  /// ‖R⁻¹‖_F² = Σ_j ‖R⁻¹ e_j‖², solved work.cols() right-hand sides at a time in `work`.
  static double inverse_norm(const Eigen::Ref<const Matrix<double>>& R, MatRef<double> work) {
    const Index k = R.rows();
    double sum = 0;
    for (Index j0 = 0; j0 < k; j0 += work.cols()) {
      const Index n = std::min(work.cols(), k - j0);
      auto e = work.leftCols(n);
      e.setZero();
      for (Index j = 0; j < n; ++j) e(j0 + j, j) = 1;
      // Rows ≥ j0 + n of R⁻¹ e_j are zero for j < j0 + n: solve the leading block only.
      detail::trsm_upper<double>(R.topLeftCorner(j0 + n, j0 + n), detail::Op::N, e.topRows(j0 + n));
      sum += e.topRows(j0 + n).squaredNorm();
    }
    return std::sqrt(sum);
  }

  /// Factorises once per weight version; throws RankError when W is
  /// (numerically) rank deficient: a diagonal entry of R below
  /// max(in, out) · ε · max|r_ii| (exact dependence), or a condition estimate
  /// of at least 1 / (max(in, out) · ε) (no digit of a vijp would survive).
  const Cache& cache() const {
    return cache_.get(version_, [this](Cache& c) { factorise(c); });
  }

  void factorise(Cache& c) const {
    c.p_formed = false;
    const bool wide = out_ <= in_;  // factor the tall one of Wᵀ (in × out) and W (out × in)
    if (wide)
      c.qr.compute(W().transpose());
    else
      c.qr.compute(W());
    c.k = std::min(in_, out_);
    const auto d = c.qr.matrixQR().diagonal().head(c.k).cwiseAbs();
    const double n_eps = static_cast<double>(std::max(in_, out_)) * std::numeric_limits<S>::epsilon();
    const double rmax = static_cast<double>(d.maxCoeff()), rmin = static_cast<double>(d.minCoeff());
    auto rank_error = [&](const std::string& why) {
      std::ostringstream s;
      s << name() << ": W is rank deficient (" << why << "); vijp would return garbage";
      throw RankError(s.str());
    };
    if (!(rmax > 0) || !(rmin > n_eps * rmax))
      rank_error(detail::cat("|R_ii| from ", rmax, " down to ", rmin, ", threshold ", n_eps * rmax));
    // R read in place in double; a float factor converted first.
    if constexpr (std::is_same_v<S, double>) {
      estimate(c, c.qr.matrixQR().topLeftCorner(c.k, c.k), n_eps, rank_error);
    } else {
      auto Rd = detail::scratch_matrix<double>(detail::Scratch::factor, c.k, c.k);
      Rd = c.qr.matrixQR().topLeftCorner(c.k, c.k).template cast<double>();
      estimate(c, Rd, n_eps, rank_error);
    }
  }

  /// The amplification figures from R (its upper triangle, in double).
  template <class RankErrorFn>
  void estimate(Cache& c, const Eigen::Ref<const Matrix<double>>& R, double n_eps,
                RankErrorFn& rank_error) const {
    // One scratch (k × kWorkColumns) for both estimates, this thread's
    // (core/dense.hpp): kept in the cache it would stay with every layer
    // that was ever factorised (64 KiB per width-256 layer).
    const Index k = R.rows();
    auto work = detail::scratch_matrix<double>(detail::Scratch::estimate, k,
                                               std::max<Index>(4, std::min(kWorkColumns, k)));
    c.cond_estimate = condition_of(R, work);
    if (!(c.cond_estimate * n_eps < 1))
      rank_error(
          detail::cat("condition estimate ", c.cond_estimate, " >= 1 / (max(in, out) eps) = ", 1 / n_eps));
    // ‖W⁺‖_F = ‖R⁻¹‖_F (Q has orthonormal columns).
    c.typical = static_cast<double>(W().template cast<double>().norm()) * inverse_norm(R, work) /
                std::sqrt(static_cast<double>(in_) * static_cast<double>(out_));
  }

  Index in_, out_;
  VersionCache<Cache> cache_;
};

}  // namespace moonwalk
