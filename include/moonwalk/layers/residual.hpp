// Moonwalk — residual blocks y = x + F(x), F any layer or chain of width n → n.
//
//   J = I + J_F,  J_θ = J_{F,θ}:  jvp dx + J_F dx,  vjp h + J_Fᵀ h,
//   parameters and gradients those of F.
//
// vijp solves (I + J_Fᵀ) h_y = h_x by restarted GMRES with F linearised once
// at x (a chain's intermediate inputs computed once, then one vjp per layer
// per iteration), to a relative residual ‖h_x − (I + J_Fᵀ) h_y‖ / ‖h_x‖ ≤
// Options::tolerance (default 10 ε of the scalar type). When F is a
// contraction (Lipschitz constant c < 1) the system is well posed and κ(J) ≤
// (1 + c)/(1 − c); GMRES converges in a handful of iterations for c ≤ 1/2.
// inverse solves x + F(x) = y by Newton's method (each step a GMRES solve
// with J_F), to the same relative residual; x + F(x) is a bijection for c < 1
// (i-ResNet). A solve that has not converged within
// Options::max_iterations throws RankError naming the block and the residual
// reached (the gradient call fails with it): keep F contractive, e.g. by a
// small gain on its last layer, as the spec tokens do (gain 1/2).
//
// iterations() counts the operator applications of every solve so far
// (last_iterations() those of the latest one); a gradient reports its own
// in Stats::counts.solver_iterations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/nets/chain.hpp"

namespace moonwalk {

namespace detail {

/// ⟨a, b⟩ in double.
template <class S>
double dot_d(const CRef<S>& a, const CRef<S>& b) {
  return (a.array().template cast<double>() * b.array().template cast<double>()).sum();
}

/// Solves (I + A) h = b by restarted GMRES(m): `apply(v, out)` writes A v.
/// h holds the initial guess on entry and the solution on return. Returns the
/// relative residual ‖b − (I + A) h‖ / ‖b‖ reached; `iterations` counts the
/// applications of A.
template <class S, class Apply>
double gmres_identity_plus(const Apply& apply, const CRef<S>& b, Matrix<S>& h, double tol, int max_iterations,
                           int restart, int& iterations) {
  const Index rows = b.rows(), cols = b.cols();
  const double bnorm = std::sqrt(dot_d<S>(b, b));
  iterations = 0;
  if (bnorm == 0) {
    h.setZero(rows, cols);
    return 0;
  }
  Matrix<S> av(rows, cols), r(rows, cols);
  std::vector<Matrix<S>> v(static_cast<std::size_t>(restart) + 1, Matrix<S>(rows, cols));
  Eigen::MatrixXd H = Eigen::MatrixXd::Zero(restart + 1, restart);
  Eigen::VectorXd cs(restart), sn(restart), g(restart + 1);
  auto residual = [&]() {  // r = b − (I + A) h, and its relative norm
    apply(h, av);
    ++iterations;
    r = b - h - av;
    return std::sqrt(dot_d<S>(r, r)) / bnorm;
  };
  double rel = residual();
  while (rel > tol && iterations < max_iterations) {
    const double beta = rel * bnorm;
    v[0] = r / static_cast<S>(beta);
    g.setZero();
    g(0) = beta;
    H.setZero();
    int k = 0;
    for (; k < restart && iterations < max_iterations; ++k) {
      apply(v[static_cast<std::size_t>(k)], av);
      ++iterations;
      Matrix<S>& w = v[static_cast<std::size_t>(k) + 1];
      w = v[static_cast<std::size_t>(k)] + av;
      for (int i = 0; i <= k; ++i) {  // modified Gram–Schmidt
        H(i, k) = dot_d<S>(w, v[static_cast<std::size_t>(i)]);
        w -= static_cast<S>(H(i, k)) * v[static_cast<std::size_t>(i)];
      }
      H(k + 1, k) = std::sqrt(dot_d<S>(w, w));
      if (H(k + 1, k) > 0) w /= static_cast<S>(H(k + 1, k));
      for (int i = 0; i < k; ++i) {  // earlier Givens rotations
        const double t = cs(i) * H(i, k) + sn(i) * H(i + 1, k);
        H(i + 1, k) = -sn(i) * H(i, k) + cs(i) * H(i + 1, k);
        H(i, k) = t;
      }
      const double d = std::hypot(H(k, k), H(k + 1, k));
      cs(k) = d > 0 ? H(k, k) / d : 1;
      sn(k) = d > 0 ? H(k + 1, k) / d : 0;
      H(k, k) = d;
      H(k + 1, k) = 0;
      g(k + 1) = -sn(k) * g(k);
      g(k) = cs(k) * g(k);
      if (H(k, k) == 0) break;  // breakdown: I + A is singular on the Krylov space
      if (std::abs(g(k + 1)) <= tol * bnorm) {
        ++k;
        break;
      }
    }
    // h += V y with H(0:k, 0:k) y = g(0:k)
    const Eigen::VectorXd y = H.topLeftCorner(k, k).triangularView<Eigen::Upper>().solve(g.head(k));
    for (int i = 0; i < k; ++i) h += static_cast<S>(y(i)) * v[static_cast<std::size_t>(i)];
    const double before = rel;
    rel = residual();
    if (!(rel < before)) break;  // stagnated (rounding floor, or a singular I + A)
  }
  return rel;
}

}  // namespace detail

/// y = x + F(x) (header comment).
template <Layer F>
class Residual {
 public:
  using scalar_type = typename F::scalar_type;
  using S = scalar_type;

  struct Options {
    double tolerance = 0;      ///< relative residual of vijp's and inverse's solves; 0: 10 ε of S
    int max_iterations = 200;  ///< operator applications per solve before RankError
    int restart = 30;          ///< GMRES restart length
  };

  explicit Residual(F f, Options o = {}) : f_(std::move(f)), o_(o) {
    if (f_.in_features() != f_.out_features())
      throw ShapeError(detail::cat("residual: F ", f_.name(), " maps ", f_.in_features(), " -> ",
                                   f_.out_features(), " features; y = x + F(x) needs F square"));
    if (!(o_.tolerance >= 0) || o_.max_iterations < 1 || o_.restart < 1)
      throw Error("residual: tolerance must be >= 0, max_iterations and restart >= 1");
  }

  [[nodiscard]] Index in_features() const { return f_.in_features(); }
  [[nodiscard]] Index out_features() const { return f_.in_features(); }
  [[nodiscard]] std::string name() const { return detail::cat("residual(", f_.name(), ")"); }
  F& inner() { return f_; }
  [[nodiscard]] const F& inner() const { return f_; }
  [[nodiscard]] const Options& options() const { return o_; }
  /// Operator applications of every solve so far, and of the latest one.
  [[nodiscard]] std::uint64_t iterations() const { return iterations_; }
  [[nodiscard]] int last_iterations() const { return last_iterations_; }

  // ---- parameters: F's
  [[nodiscard]] Index num_params() const { return f_.num_params(); }
  std::vector<std::span<S>> parameter_blocks() { return moonwalk::parameter_blocks(f_); }
  [[nodiscard]] std::vector<std::span<const S>> parameter_blocks() const {
    return moonwalk::parameter_blocks(f_);
  }
  std::vector<std::span<S>> gradient_blocks() { return moonwalk::gradient_blocks(f_); }
  [[nodiscard]] std::vector<std::span<const S>> gradient_blocks() const {
    return moonwalk::gradient_blocks(f_);
  }

  // ---- step, mode and batch coupling (core/step.hpp): F's
  void set_step(std::uint64_t k) { moonwalk::set_step(f_, k); }
  void set_training(bool t) { moonwalk::set_training(f_, t); }
  [[nodiscard]] bool couples_batch() const { return moonwalk::couples_batch(f_); }
  /// F's buffers (core/step.hpp).
  std::vector<std::span<double>> buffers() { return moonwalk::buffers(f_); }
  /// F can be carried in double (core/amplification.hpp).
  [[nodiscard]] bool castable_to_double() const { return moonwalk::castable_to_double(f_); }

  /// y = x + F(x)
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    Matrix<S> y = f_.forward(x);
    y += x;
    return y;
  }
  /// dx + J_F dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "tangent", dx, in_features(), x.cols());
    Matrix<S> t = f_.jvp(x, dx);
    t += dx;
    return t;
  }
  /// J_{F,θ} dθ
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, in_features());
    return f_.jvp_params(x, dtheta);
  }
  /// h + J_Fᵀ h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "cotangent", h, in_features(), x.cols());
    Matrix<S> g = f_.vjp(x, h);
    g += h;
    return g;
  }
  /// g += J_{F,θ}ᵀ h
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "cotangent", h, in_features(), x.cols());
    f_.vjp_params(x, h, g);
  }

  /// h_y with (I + J_Fᵀ) h_y = h_x, by GMRES (header comment).
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "input cotangent", hx, in_features(), x.cols());
    const Linearised lin(f_, x);
    Matrix<S> h = hx;  // the guess of F = 0
    int its = 0;
    const double rel =
        detail::gmres_identity_plus<S>([&](const Matrix<S>& v, Matrix<S>& out) { lin.vjp(v, out); }, hx, h,
                                       tolerance(), o_.max_iterations, o_.restart, its);
    count(its);
    if (!(rel <= tolerance()))
      throw RankError(
          detail::cat(name(), ": vijp's solve of (I + J_F^T) h_y = h_x reached a relative residual of ", rel,
                      " after ", its, " iterations (tolerance ", tolerance(), "); is F a contraction here?"));
    return h;
  }
  /// x with x + F(x) = y, by Newton's method: x ← x + δ with (I + J_F(x)) δ =
  /// y − x − F(x) solved by GMRES, from x = y.
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    detail::check_rows(*this, "output", y, in_features());
    const double ynorm = std::max(std::sqrt(detail::dot_d<S>(y, y)), std::numeric_limits<double>::min());
    Matrix<S> x = y, r(y.rows(), y.cols()), delta(y.rows(), y.cols());
    double rel = std::numeric_limits<double>::infinity();
    int its = 0;
    while (its < o_.max_iterations) {
      r = y - x - f_.forward(x);
      ++its;
      const double before = rel;
      rel = std::sqrt(detail::dot_d<S>(r, r)) / ynorm;
      if (rel <= tolerance() || !(rel < before)) break;
      const Linearised lin(f_, x);
      delta = r;
      int inner = 0;
      const double rnorm = rel * ynorm;
      (void)detail::gmres_identity_plus<S>([&](const Matrix<S>& v, Matrix<S>& out) { lin.jvp(v, out); }, r,
                                           delta, std::min(0.5, 0.1 * tolerance() * ynorm / rnorm),
                                           o_.max_iterations - its, o_.restart, inner);
      its += inner;
      x += delta;
    }
    count(its);
    if (!(rel <= tolerance()))
      throw RankError(detail::cat(
          name(), ": inverse's Newton iteration for x + F(x) = y reached a relative residual of ", rel,
          " after ", its, " evaluations (tolerance ", tolerance(), "); is F a contraction here?"));
    return x;
  }

  /// The same block in scalar type T (F cast).
  template <class T>
  requires CastableTo<F, T>
  [[nodiscard]] auto cast() const {
    using FT = cast_t<T, F>;
    typename Residual<FT>::Options o{o_.tolerance, o_.max_iterations, o_.restart};
    return Residual<FT>(f_.template cast<T>(), o);
  }

 private:
  /// F linearised at x: a chain's layer inputs computed once, then Jᵀ v one
  /// vjp per layer; any other F through its own vjp.
  class Linearised {
   public:
    Linearised(const F& f, const CRef<S>& x) : f_(f), x_(x) {
      if constexpr (detail::Walkable<F>) xs_ = detail::chain_inputs(f, x);
    }
    void jvp(const Matrix<S>& v, Matrix<S>& out) const {
      if constexpr (detail::Walkable<F>) {
        out = v;
        for (std::size_t i = 0; i < f_.size(); ++i)
          f_.visit(i, [&](const auto& l) { out = l.jvp(xs_[i], out); });
      } else {
        out = f_.jvp(x_, v);
      }
    }
    void vjp(const Matrix<S>& v, Matrix<S>& out) const {
      if constexpr (detail::Walkable<F>) {
        out = v;
        for (std::size_t i = f_.size(); i-- > 0;)
          f_.visit(i, [&](const auto& l) { out = l.vjp(xs_[i], out); });
      } else {
        out = f_.vjp(x_, v);
      }
    }

   private:
    const F& f_;
    const CRef<S>& x_;
    std::vector<Matrix<S>> xs_;
  };

  [[nodiscard]] double tolerance() const {
    return o_.tolerance > 0 ? o_.tolerance : 10 * static_cast<double>(std::numeric_limits<S>::epsilon());
  }
  void count(int its) const {
    last_iterations_ = its;
    iterations_ += static_cast<std::uint64_t>(its);
    detail::solver_iterations += static_cast<std::uint64_t>(its);
  }

  F f_;
  Options o_;
  mutable std::uint64_t iterations_ = 0;
  mutable int last_iterations_ = 0;
};

}  // namespace moonwalk
