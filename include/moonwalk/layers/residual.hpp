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
// Lipschitz limit (Options::lipschitz = c in (0, 1), i-ResNet's spectral
// normalisation applied as a projection): at construction and after every
// update (set_step, which the optimizers call after each step), each weighted
// layer W_i of F (a layer whose scale_weight hook works: Linear, Conv2d) with
// σ_i = ‖W_i‖₂ > c is scaled by c/σ_i. σ_i is estimated by power iteration on
// J_iᵀ J_i (jvp and vjp at x = 0, a layer linear in x; the vector kept from step
// to step, so a few iterations a step follow the slowly changing weights).
// With F's other layers 1-Lipschitz (relu, leaky_relu, tanh, sigmoid, …),
// Lip(F) ≤ c_F = Π_i min(σ_i, c), and then κ(I + J_F) ≤ (1 + c_F)/(1 − c_F):
// amplification() reports it, and GMRES converges at a rate set by c_F. The
// projection happens between steps, so a step's gradient is that of the
// function it ran.
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
#include "moonwalk/core/init.hpp"
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
    double lipschitz = 0;  ///< c in (0, 1): ‖W‖₂ ≤ c for F's weighted layers (header comment); 0: off
  };

  explicit Residual(F f, Options o = {}) : f_(std::move(f)), o_(o) {
    if (f_.in_features() != f_.out_features())
      throw ShapeError(detail::cat("residual: F ", f_.name(), " maps ", f_.in_features(), " -> ",
                                   f_.out_features(), " features; y = x + F(x) needs F square"));
    if (!(o_.tolerance >= 0) || o_.max_iterations < 1 || o_.restart < 1)
      throw Error("residual: tolerance must be >= 0, max_iterations and restart >= 1");
    if (!(o_.lipschitz >= 0 && o_.lipschitz < 1))
      throw Error(detail::cat("residual: lipschitz must lie in [0, 1) (0: off), got ", o_.lipschitz));
    if (o_.lipschitz > 0) limit_lipschitz(kFirstPowerIterations);
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
  /// F's step; under a Lipschitz limit, F's weights projected back within it
  /// (header comment): set_step follows every update.
  void set_step(std::uint64_t k) {
    moonwalk::set_step(f_, k);
    if (o_.lipschitz > 0) limit_lipschitz(kStepPowerIterations);
  }
  /// Under a Lipschitz limit: c_F = Π_i min(σ_i, c) over F's weighted layers
  /// as last estimated, an estimate of Lip(F) when F's other layers are
  /// 1-Lipschitz; 0 without a limit.
  [[nodiscard]] double lipschitz_estimate() const { return lipschitz_estimate_; }
  /// Under a Lipschitz limit with c_F < 1: κ(I + J_F) ≤ (1 + c_F)/(1 − c_F),
  /// for both figures; unknown otherwise.
  [[nodiscard]] Amplification amplification(const Matrix<S>&) const {
    const double c = lipschitz_estimate_;
    if (!(o_.lipschitz > 0 && c < 1)) return Amplification::unknown();
    const double k = (1 + c) / (1 - c);
    return {k, k};
  }
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
    // (built without the limit, then given it: a cast keeps F's weights as they are)
    Residual<FT> r(f_.template cast<T>(), {o_.tolerance, o_.max_iterations, o_.restart});
    r.o_.lipschitz = o_.lipschitz;
    r.power_ = power_;
    r.lipschitz_estimate_ = lipschitz_estimate_;
    return r;
  }

 private:
  template <Layer>
  friend class Residual;

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
    const CRef<S> x_;  // by value: a Ref built from a Matrix argument would not outlive the constructor
    std::vector<Matrix<S>> xs_;
  };

  static constexpr int kFirstPowerIterations = 20, kStepPowerIterations = 2, kMaxPowerIterations = 200;

  /// σ = ‖J‖₂ of a layer linear in x by power iteration on JᵀJ from v (unit,
  /// updated), J applied as jvp at x = 0: at least `iterations` steps, then
  /// on until the estimate σ_k = ‖J v_k‖ changes by less than 1e-5 relative
  /// (σ_k increases to σ; at most kMaxPowerIterations steps).
  template <class L>
  static double spectral_norm(const L& l, Vector<double>& v, int iterations) {
    using LS = typename L::scalar_type;
    const Matrix<LS> zero = Matrix<LS>::Zero(l.in_features(), 1);
    double sigma = 0;
    for (int it = 0; it < kMaxPowerIterations; ++it) {
      const Matrix<LS> u = l.jvp(zero, v.template cast<LS>());
      const double next = u.template cast<double>().norm();
      const bool settled = it >= iterations && std::abs(next - sigma) <= 1e-5 * next;
      sigma = next;
      if (settled) break;
      const Vector<double> g = l.vjp(zero, u).template cast<double>();
      const double n = g.norm();
      if (!(n > 0)) return 0;
      v = g / n;
    }
    return sigma;
  }

  /// ‖W_i‖₂ ≤ c for F's weighted layers (header comment).
  void limit_lipschitz(int iterations) {
    double bound = 1;
    std::size_t j = 0;
    const auto one = [&](auto& l) {
      const std::size_t slot = j++;
      if (!moonwalk::scale_weight(l, 1.0)) return;  // no weights: 1-Lipschitz by assumption
      if (power_.size() <= slot) power_.resize(slot + 1);
      Vector<double>& v = power_[slot];
      if (v.size() != l.in_features()) {
        v = gaussian<double>(l.in_features(), 1, 0x5eed + slot);
        v /= v.norm();
      }
      const double sigma = spectral_norm(l, v, v.size() > 0 ? iterations : 0);
      if (sigma > o_.lipschitz) (void)moonwalk::scale_weight(l, o_.lipschitz / sigma);
      bound *= std::min(sigma, o_.lipschitz);
    };
    if constexpr (detail::Walkable<F>) {
      for (std::size_t i = 0; i < f_.size(); ++i) f_.visit(i, one);
    } else {
      one(f_);
    }
    lipschitz_estimate_ = bound;
  }

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
  std::vector<Vector<double>> power_;  ///< power iteration's vector per layer of F (Lipschitz limit)
  double lipschitz_estimate_ = 0;
  mutable std::uint64_t iterations_ = 0;
  mutable int last_iterations_ = 0;
};

}  // namespace moonwalk
