// Moonwalk — dense layer y = W x + b (W is out × in).
#pragma once

#include <Eigen/QR>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <sstream>
#include <string>

#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk {

/// Dense layer `y = W x + b`.
///
/// Parameters are stored flat as θ = [vec(W) (column-major), b]. Default
/// initialisation is (semi-)orthogonal W with all singular values 1 and b = 0.
///
/// Its reverse pass saves nothing (`Jᵀ h = Wᵀ h` needs only W). For out ≤ in
/// it is submersive: `vijp` solves `Wᵀ h_y = h_x` through a column-pivoted
/// thin QR of Wᵀ, cached per weight version (never the normal equations). For
/// out > in it is fragmental: the fragment is the component of h_y in
/// null(Wᵀ), `out − in` numbers per sample.
template <class S>
class Linear {
 public:
  using scalar_type = S;
  using residual_type = Empty;
  using fragment_type = Fragment<S>;

  struct Options {
    std::uint64_t seed = 0;
    S gain = S(1);
  };

  Linear(Index in, Index out) : Linear(in, out, Options{}) {}
  Linear(Index in, Index out, Options opt)
      : in_(in), out_(out), theta_(out * in + out), grad_(out * in + out) {
    if (in <= 0 || out <= 0)
      throw ShapeError("Linear: sizes must be positive, got " + detail::shape_str(out, in));
    W() = orthogonal<S>(out, in, opt.seed, opt.gain);
    b().setZero();
    grad_.setZero();
  }

  [[nodiscard]] Index in_features() const { return in_; }
  [[nodiscard]] Index out_features() const { return out_; }
  [[nodiscard]] std::string name() const { return detail::cat("linear(", in_, "->", out_, ")"); }

  // ---- parameters (mutable access starts a new weight version: the cached
  //      factorisation is rebuilt on the next vijp. Write through a view
  //      obtained after the last vijp — a span kept across a vijp and written
  //      later leaves the cache stale; optimizers re-fetch views each step.)
  [[nodiscard]] Index num_params() const { return theta_.size(); }
  std::span<S> parameters() {
    ++version_;
    return {theta_.data(), static_cast<std::size_t>(theta_.size())};
  }
  [[nodiscard]] std::span<const S> parameters() const {
    return {theta_.data(), static_cast<std::size_t>(theta_.size())};
  }
  std::span<S> gradients() { return {grad_.data(), static_cast<std::size_t>(grad_.size())}; }
  [[nodiscard]] std::span<const S> gradients() const {
    return {grad_.data(), static_cast<std::size_t>(grad_.size())};
  }
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

  // ---- operators
  /// y = W x + b
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_);
    Matrix<S> y(out_, x.cols());
    y.noalias() = W() * x;
    y.colwise() += b();
    return y;
  }
  /// J dx = W dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "tangent", dx, in_);
    detail::check_batch(*this, "input", x.cols(), "tangent", dx.cols());
    Matrix<S> t(out_, dx.cols());
    t.noalias() = W() * dx;
    return t;
  }
  /// J_θ dθ = dW x + db
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "parameter tangent", dtheta, num_params(), 1);
    Eigen::Map<const Matrix<S>> dW(dtheta.data(), out_, in_);
    Matrix<S> t(out_, x.cols());
    t.noalias() = dW * x;
    t.colwise() += dtheta.segment(out_ * in_, out_);
    return t;
  }
  /// Jᵀ h = Wᵀ h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_batch(*this, "input", x.cols(), "cotangent", h.cols());
    return vjp_residual(Empty{}, h);
  }
  /// g_W += h xᵀ, g_b += Σ_columns h
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, in_);
    detail::check_rows(*this, "cotangent", h, out_, x.cols());
    detail::check_rows(*this, "gradient", g, num_params(), 1);
    Eigen::Map<Matrix<S>> gW(g.data(), out_, in_);
    gW.noalias() += h * x.transpose();
    g.segment(out_ * in_, out_) += h.rowwise().sum();
  }

  // ---- residual protocol: nothing saved
  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_);
    return {};
  }
  [[nodiscard]] Matrix<S> vjp_residual(const Empty&, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, out_);
    Matrix<S> r(in_, h.cols());
    r.noalias() = W().transpose() * h;
    return r;
  }

  // ---- Moonwalk
  /// Submersive exactly when W has full row rank, which needs out ≤ in.
  [[nodiscard]] bool is_submersive() const { return out_ <= in_; }
  [[nodiscard]] bool is_invertible() const { return out_ == in_; }

  /// h_y with Wᵀ h_y = h_x: h_y = P R⁻¹ Q₁ᵀ h_x from Wᵀ P = Q R (out ≤ in).
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    if (!is_submersive())
      throw RankError(name() +
                      ": vijp needs out <= in (an expanding Linear is fragmental: use "
                      "vijp_with_fragment)");
    detail::check_rows(*this, "input cotangent", hx, in_);
    detail::check_batch(*this, "input", x.cols(), "input cotangent", hx.cols());
    const Cache& c = cache();
    Matrix<S> hy(out_, hx.cols());
    hy.noalias() = c.right_inverse * hx;
    return hy;
  }

  /// φ = Q₂ᵀ h_y, the component of h_y in null(Wᵀ) (empty when out ≤ in).
  [[nodiscard]] Fragment<S> save_fragment(const Empty&, const CRef<S>& hy) const {
    detail::check_rows(*this, "output cotangent", hy, out_);
    if (is_submersive()) return {Matrix<S>(0, hy.cols())};
    Fragment<S> f{Matrix<S>(out_ - in_, hy.cols())};
    f.value.noalias() = cache().null_basis.transpose() * hy;
    return f;
  }
  /// h_y = Q₁ R⁻ᵀ Pᵀ h_x + Q₂ φ, from W P = Q R (out > in).
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const Fragment<S>& f) const {
    if (is_submersive()) return vijp(x, hx);
    detail::check_rows(*this, "input cotangent", hx, in_);
    detail::check_rows(*this, "fragment", f.value, out_ - in_, hx.cols());
    const Cache& c = cache();
    Matrix<S> hy(out_, hx.cols());
    hy.noalias() = c.right_inverse * hx;
    hy.noalias() += c.null_basis * f.value;
    return hy;
  }

  /// x = W⁻¹ (y − b), square W only.
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    if (!is_invertible()) throw RankError(name() + ": inverse needs a square W");
    detail::check_rows(*this, "output", y, out_);
    const Cache& c = cache();
    Matrix<S> centered = y.colwise() - b();
    // W = (Wᵀ)ᵀ = (Q R Pᵀ)ᵀ = P Rᵀ Qᵀ, so W⁻¹ = Q R⁻ᵀ Pᵀ = right_inverseᵀ.
    Matrix<S> x(in_, y.cols());
    x.noalias() = c.right_inverse.transpose() * centered;
    return x;
  }

  /// The R factor of the cached column-pivoted QR (of Wᵀ when out ≤ in, of W
  /// otherwise): its diagonal is non-increasing in magnitude.
  [[nodiscard]] Matrix<S> r_factor() const {
    const Cache& c = cache();
    return c.qr.matrixR().topLeftCorner(c.k, c.k).template triangularView<Eigen::Upper>();
  }

 private:
  struct Cache {
    std::uint64_t version = std::numeric_limits<std::uint64_t>::max();
    Eigen::ColPivHouseholderQR<Matrix<S>> qr;
    Index k = 0;
    Matrix<S> right_inverse;  // out × in: a right inverse of Wᵀ
    Matrix<S> null_basis;     // out × (out − in): orthonormal basis of null(Wᵀ)
  };

  /// Factorises once per weight version; throws RankError when R's diagonal
  /// shows W is (numerically) rank deficient.
  const Cache& cache() const {
    if (!cache_.ptr) cache_.ptr = std::make_unique<Cache>();
    Cache& c = *cache_.ptr;
    if (c.version == version_) return c;
    const bool wide = out_ <= in_;  // factor the tall one of Wᵀ (in × out) and W (out × in)
    Matrix<S> a = wide ? Matrix<S>(W().transpose()) : Matrix<S>(W());
    c.qr.compute(a);
    c.k = std::min(in_, out_);
    const auto& r = c.qr.matrixR();
    const S r0 = std::abs(r(0, 0));
    const S tol = static_cast<S>(std::max(in_, out_)) * std::numeric_limits<S>::epsilon() * r0;
    const S rmin = std::abs(r(c.k - 1, c.k - 1));
    if (!(r0 > S(0)) || !(rmin > tol)) {
      std::ostringstream s;
      s << name() << ": W is rank deficient (|R_kk| from " << r0 << " down to " << rmin << ", threshold "
        << tol << "); vijp would return garbage";
      throw RankError(s.str());
    }
    // a P = Q R, a tall (m × k). Q₁ = first k columns of Q.
    const Index m = a.rows(), k = c.k;
    Matrix<S> q1 = c.qr.householderQ() * Matrix<S>::Identity(m, k);
    const Matrix<S> Rm = c.qr.matrixR().topLeftCorner(k, k).template triangularView<Eigen::Upper>();
    const auto R = Rm.template triangularView<Eigen::Upper>();
    if (wide) {
      // Wᵀ P = Q₁ R  ⇒  right inverse of Wᵀ (least squares) = P R⁻¹ Q₁ᵀ   (out × in)
      Matrix<S> rinv_qt = R.solve(Matrix<S>(q1.transpose()));
      c.right_inverse = c.qr.colsPermutation() * rinv_qt;
      c.null_basis.resize(out_, 0);
    } else {
      // W P = Q₁ R  ⇒  Wᵀ = P Rᵀ Q₁ᵀ; h_y = Q₁ R⁻ᵀ Pᵀ h_x solves Wᵀ h_y = h_x (out × in)
      Matrix<S> pt = Matrix<S>(c.qr.colsPermutation().transpose() * Matrix<S>::Identity(k, k));
      Matrix<S> rt_inv_pt = R.transpose().solve(pt);
      c.right_inverse = q1 * rt_inv_pt;
      Matrix<S> q = c.qr.householderQ();
      c.null_basis = q.rightCols(m - k);
    }
    c.version = version_;
    return c;
  }

  Index in_, out_;
  Vector<S> theta_, grad_;
  std::uint64_t version_ = 0;
  /// Per-object factorisation cache; a copy starts empty (it may diverge).
  struct CacheSlot {
    std::unique_ptr<Cache> ptr;
    CacheSlot() = default;
    CacheSlot(const CacheSlot&) {}
    CacheSlot& operator=(const CacheSlot&) {
      ptr.reset();
      return *this;
    }
    CacheSlot(CacheSlot&&) noexcept = default;
    CacheSlot& operator=(CacheSlot&&) noexcept = default;
  };
  mutable CacheSlot cache_;
};

}  // namespace moonwalk
