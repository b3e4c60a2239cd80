// Moonwalk — elementwise activations y = σ(x), one generic layer over a rule.
//
// A rule gives value σ(x), derivative σ'(x) and, where it exists, inverse σ⁻¹(y).
// A rule with `piecewise_linear = true` has σ'(x) ∈ {slope_on, slope_off}
// decided by `on(x)`: its reverse pass keeps one bit per element. A smooth
// rule keeps σ'(x) (one number per element; docs/design.md §4 — the report shows it).
// With σ' ≠ 0 everywhere the layer is submersive: vijp is h_y = h_x / σ'(x).
//
// Amplification (core/amplification.hpp) of the diagonal J = diag σ'(x), per
// sample: κ = max|σ'| / min|σ'|, γ = √(mean σ'²) · √(mean σ'⁻²), both
// maximised over the batch, +∞ where some σ'(x) = 0. A rule carries its
// parameters into another scalar type by `cast<T>()`.
//
// A rule may also give `values(a)` and `derivatives(a)` over a whole Eigen
// array expression (the same formulas, written so Eigen vectorises them);
// the layer uses them when present and falls back to the scalar functions
// element by element otherwise.
#pragma once

#include <algorithm>
#include <cmath>
#include <limits>
#include <sstream>
#include <string>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/layers/linear_in_x.hpp"

namespace moonwalk {

namespace rules {

/// σ(x) = x for x > 0, a·x otherwise (a ≠ 0).
template <class S>
struct LeakyReLU {
  static constexpr bool piecewise_linear = true;
  S slope = S(0.01);
  static constexpr const char* label = "leaky_relu";
  [[nodiscard]] std::string args() const {
    std::ostringstream s;
    s << ", slope " << slope;
    return s.str();
  }
  static bool on(S x) { return x > S(0); }
  [[nodiscard]] S slope_on() const { return S(1); }
  [[nodiscard]] S slope_off() const { return slope; }
  [[nodiscard]] S value(S x) const { return x > S(0) ? x : slope * x; }
  [[nodiscard]] S derivative(S x) const { return x > S(0) ? S(1) : slope; }
  template <class A>
  [[nodiscard]] auto values(const Eigen::ArrayBase<A>& x) const {
    return x.max(S(0)) + slope * x.min(S(0));
  }
  template <class A>
  [[nodiscard]] auto derivatives(const Eigen::ArrayBase<A>& x) const {
    using P = typename A::PlainObject;
    return (x > S(0)).select(P::Ones(x.rows(), x.cols()), P::Constant(x.rows(), x.cols(), slope));
  }
  /// σ⁻¹(y) = y for y > 0, y / a otherwise (a > 0 keeps the sign).
  [[nodiscard]] S inverse(S y) const { return y > S(0) ? y : y / slope; }
  /// The same on an array, branch-free: max(y, 0) + min(y, 0) / a.
  template <class A>
  [[nodiscard]] auto inverses(const Eigen::ArrayBase<A>& y) const {
    return y.max(S(0)) + y.min(S(0)) / slope;
  }
  template <class T>
  [[nodiscard]] LeakyReLU<T> cast() const {
    return {static_cast<T>(slope)};
  }
};

/// σ(x) = tanh x, σ' = 1 − tanh² x.
template <class S>
struct Tanh {
  static constexpr bool piecewise_linear = false;
  static constexpr const char* label = "tanh";
  [[nodiscard]] static std::string args() { return ""; }
  S value(S x) const { return std::tanh(x); }
  S derivative(S x) const {
    const S t = std::tanh(x);
    return S(1) - t * t;
  }
  template <class A>
  [[nodiscard]] auto values(const Eigen::ArrayBase<A>& x) const {
    return x.tanh();
  }
  template <class A>
  [[nodiscard]] auto derivatives(const Eigen::ArrayBase<A>& x) const {
    return S(1) - x.tanh().square();
  }
  S inverse(S y) const { return std::atanh(y); }
  template <class T>
  [[nodiscard]] Tanh<T> cast() const {
    return {};
  }
};

/// σ(x) = 1 / (1 + e^{−x}); σ' = e^{−|x|} / (1 + e^{−|x|})², stable for large |x|.
template <class S>
struct Sigmoid {
  static constexpr bool piecewise_linear = false;
  static constexpr const char* label = "sigmoid";
  [[nodiscard]] static std::string args() { return ""; }
  S value(S x) const {
    const S e = std::exp(-std::abs(x));
    return x >= S(0) ? S(1) / (S(1) + e) : e / (S(1) + e);
  }
  S derivative(S x) const {
    const S e = std::exp(-std::abs(x));
    return e / ((S(1) + e) * (S(1) + e));
  }
  S inverse(S y) const { return std::log(y) - std::log1p(-y); }
  template <class T>
  [[nodiscard]] Sigmoid<T> cast() const {
    return {};
  }
};

/// σ(x) = log(1 + eˣ) = max(x, 0) + log1p(e^{−|x|}); σ' = sigmoid(x).
template <class S>
struct Softplus {
  static constexpr bool piecewise_linear = false;
  static constexpr const char* label = "softplus";
  [[nodiscard]] static std::string args() { return ""; }
  S value(S x) const { return std::max(x, S(0)) + std::log1p(std::exp(-std::abs(x))); }
  S derivative(S x) const { return Sigmoid<S>{}.value(x); }
  /// σ⁻¹(y) = log(eʸ − 1) = y + log1p(−e^{−y}).
  S inverse(S y) const { return y + std::log1p(-std::exp(-y)); }
  template <class T>
  [[nodiscard]] Softplus<T> cast() const {
    return {};
  }
};

/// σ(x) = x for x > 0, α(eˣ − 1) otherwise.
template <class S>
struct ELU {
  static constexpr bool piecewise_linear = false;
  S alpha = S(1);
  static constexpr const char* label = "elu";
  [[nodiscard]] std::string args() const {
    std::ostringstream s;
    s << ", alpha " << alpha;
    return s.str();
  }
  S value(S x) const { return x > S(0) ? x : alpha * std::expm1(x); }
  S derivative(S x) const { return x > S(0) ? S(1) : alpha * std::exp(x); }
  S inverse(S y) const { return y > S(0) ? y : std::log1p(y / alpha); }
  template <class T>
  [[nodiscard]] ELU<T> cast() const {
    return {static_cast<T>(alpha)};
  }
};

}  // namespace rules

namespace detail {

/// κ and γ of one sample's diagonal Jacobian from its slope statistics:
/// Σσ'², Σσ'⁻², max|σ'|, min|σ'| over n features (+∞ when min|σ'| = 0).
inline Amplification diagonal_amplification(double sum_sq, double sum_inv_sq, double max_abs, double min_abs,
                                            Index n) {
  if (!(min_abs > 0)) {
    const double inf = std::numeric_limits<double>::infinity();
    return {inf, inf};
  }
  const double dn = static_cast<double>(n);
  return {max_abs / min_abs, std::sqrt(sum_sq / dn) * std::sqrt(sum_inv_sq / dn)};
}

/// The worse of two amplifications, entry by entry (maximum over a batch).
inline Amplification worse(const Amplification& a, const Amplification& b) {
  return {std::max(a.bound, b.bound), std::max(a.typical, b.typical), a.known && b.known};
}

}  // namespace detail

/// Elementwise layer over a rule (see header comment). Width is fixed at
/// construction so shapes are checked.
template <class S, class Rule>
class Elementwise : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = std::conditional_t<Rule::piecewise_linear, BitMask, Derivative<S>>;

  explicit Elementwise(Index features, Rule rule = {}) : n_(features), rule_(rule) {
    if (features <= 0) throw ShapeError(std::string(Rule::label) + ": width must be positive");
  }

  [[nodiscard]] Index in_features() const { return n_; }
  [[nodiscard]] Index out_features() const { return n_; }
  [[nodiscard]] std::string name() const { return detail::cat(Rule::label, "(", n_, rule_.args(), ")"); }
  [[nodiscard]] const Rule& rule() const { return rule_; }

  /// y = σ(x)
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    Matrix<S> y(n_, x.cols());
    forward_into(x, y);
    return y;
  }
  /// y = σ(x) into y
  void forward_into(const CRef<S>& x, MatRef<S> y) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "output buffer", y, n_, x.cols());
    if constexpr (requires { rule_.values(x.array()); })
      y.array() = rule_.values(x.array());
    else
      y = x.unaryExpr([this](S v) { return rule_.value(v); });
  }
  /// σ'(x) elementwise
  [[nodiscard]] Matrix<S> derivative(const CRef<S>& x) const {
    Matrix<S> d(n_, x.cols());
    derivative_into(x, d);
    return d;
  }
  /// d = σ'(x) into d
  void derivative_into(const CRef<S>& x, MatRef<S> d) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "derivative buffer", d, n_, x.cols());
    if constexpr (requires { rule_.derivatives(x.array()); })
      d.array() = rule_.derivatives(x.array());
    else
      d = x.unaryExpr([this](S v) { return rule_.derivative(v); });
  }
  /// J dx = σ'(x) ⊙ dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "tangent", dx, n_, x.cols());
    return derivative(x).cwiseProduct(dx);
  }
  /// No parameters: J_θ dθ = 0.
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& /*dtheta*/) const {
    return Matrix<S>::Zero(n_, x.cols());
  }
  /// Jᵀ h = σ'(x) ⊙ h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    Matrix<S> out(n_, h.cols());
    vjp_into(x, h, out);
    return out;
  }
  /// out = σ'(x) ⊙ h (σ'(x) formed in out, then multiplied in place)
  void vjp_into(const CRef<S>& x, const CRef<S>& h, MatRef<S> out) const {
    detail::check_rows(*this, "cotangent", h, n_, x.cols());
    derivative_into(x, out);
    out.array() *= h.array();
  }
  void vjp_params(const CRef<S>& /*x*/, const CRef<S>& /*h*/, VecRef<S> /*g*/) const {}

  /// Piecewise-linear: the sign bits of x; smooth: σ'(x).
  [[nodiscard]] residual_type save_residual(const CRef<S>& x) const {
    residual_type r;
    save_residual_into(x, r);
    return r;
  }
  /// The same into r's storage.
  void save_residual_into(const CRef<S>& x, residual_type& r) const {
    detail::check_rows(*this, "input", x, n_);
    if constexpr (Rule::piecewise_linear) {
      r.assign(x, [](S v) { return Rule::on(v); });
    } else {
      detail::safe_resize(r.value, n_, x.cols());
      derivative_into(x, r.value);
    }
  }
  /// Jᵀ h from the residual alone.
  [[nodiscard]] Matrix<S> vjp_residual(const residual_type& r, const CRef<S>& h) const {
    Matrix<S> out(n_, h.cols());
    vjp_residual_into(r, h, out);
    return out;
  }
  /// out = Jᵀ h = σ'(x) ⊙ h, σ'(x) from the residual
  void vjp_residual_into(const residual_type& r, const CRef<S>& h, MatRef<S> out) const {
    detail::check_rows(*this, "cotangent", h, n_);
    detail::check_rows(*this, "vjp output buffer", out, n_, h.cols());
    if constexpr (Rule::piecewise_linear) {
      detail::check_batch(*this, "mask", r.cols(), "cotangent", h.cols());
      const S a = rule_.slope_on(), c = rule_.slope_off();
      r.apply(h, out, [a, c](bool on, S v) { return v * (on ? a : c); });
    } else {
      detail::check_batch(*this, "saved derivative", r.value.cols(), "cotangent", h.cols());
      out.array() = r.value.array() * h.array();
    }
  }

  /// h_y = h_x / σ'(x); throws RankError where σ'(x) = 0 (a numerical cokernel).
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    Matrix<S> hy(n_, hx.cols());
    vijp_into(x, hx, hy);
    return hy;
  }
  /// The same into hy (σ'(x) is formed in hy, then divides h_x in place).
  void vijp_into(const CRef<S>& x, const CRef<S>& hx, MatRef<S> hy) const {
    detail::check_rows(*this, "input cotangent", hx, n_, x.cols());
    derivative_into(x, hy);
    if ((hy.array() == S(0)).any())
      throw RankError(name() + ": sigma'(x) underflowed to 0; the Jacobian is singular there");
    hy.array() = hx.array() / hy.array();
  }

  /// x = σ⁻¹(y)
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    Matrix<S> x(n_, y.cols());
    inverse_into(y, x);
    return x;
  }
  /// The same into x (vectorised where the rule states σ⁻¹ on arrays: `inverses`).
  void inverse_into(const CRef<S>& y, MatRef<S> x) const {
    detail::check_rows(*this, "output", y, n_);
    detail::check_rows(*this, "inverse output buffer", x, n_, y.cols());
    if constexpr (requires { rule_.inverses(y.array()); })
      x.array() = rule_.inverses(y.array());
    else
      x = y.unaryExpr([this](S v) { return rule_.inverse(v); });
  }

  /// Per sample κ = max|σ'| / min|σ'| and γ = √(mean σ'²) · √(mean σ'⁻²) over
  /// its features, maximised over the batch; +∞ where some σ'(x) = 0 (the vijp
  /// would divide by it). Piecewise-linear: σ' ∈ {slope_on, slope_off} by the
  /// mask bit, so κ = |slope_on / slope_off| (or its inverse) once a sample has
  /// both, else 1.
  [[nodiscard]] Amplification amplification(const residual_type& r) const {
    Amplification worst;
    if constexpr (Rule::piecewise_linear) {
      if (r.rows() != n_)
        throw ShapeError(detail::cat(name(), ": mask has ", r.rows(), " rows, expected ", n_));
      const double a = std::abs(static_cast<double>(rule_.slope_on()));
      const double c = std::abs(static_cast<double>(rule_.slope_off()));
      for (Index j = 0; j < r.cols(); ++j) {
        Index on = 0;
        for (Index i = 0; i < n_; ++i) on += r(i, j) ? 1 : 0;
        const Index off = n_ - on;
        const double hi = on == 0 ? c : (off == 0 ? a : std::max(a, c));
        const double lo = on == 0 ? c : (off == 0 ? a : std::min(a, c));
        const double n_on = static_cast<double>(on), n_off = static_cast<double>(off);
        const double sq = n_on * a * a + n_off * c * c;
        const double inv_sq = lo > 0 ? (on > 0 ? n_on / (a * a) : 0.0) + (off > 0 ? n_off / (c * c) : 0.0)
                                     : std::numeric_limits<double>::infinity();
        worst = detail::worse(worst, detail::diagonal_amplification(sq, inv_sq, hi, lo, n_));
      }
    } else {
      detail::check_rows(*this, "saved derivative", r.value, n_);
      for (Index j = 0; j < r.value.cols(); ++j) {
        const auto d = r.value.col(j).template cast<double>().cwiseAbs();
        const double lo = d.minCoeff();
        const double inv_sq =
            lo > 0 ? d.cwiseInverse().squaredNorm() : std::numeric_limits<double>::infinity();
        worst = detail::worse(worst,
                              detail::diagonal_amplification(d.squaredNorm(), inv_sq, d.maxCoeff(), lo, n_));
      }
    }
    return worst;
  }

  /// The same layer in scalar type T (the rule's parameters converted).
  template <class T>
  requires requires(const Rule& rule) { rule.template cast<T>(); }
  [[nodiscard]] auto cast() const {
    using RuleT = decltype(rule_.template cast<T>());
    return Elementwise<T, RuleT>(n_, rule_.template cast<T>());
  }

 private:
  Index n_;
  Rule rule_;
};

template <class S>
class LeakyReLU : public Elementwise<S, rules::LeakyReLU<S>> {
 public:
  LeakyReLU(Index features, S slope) : Elementwise<S, rules::LeakyReLU<S>>(features, {check(slope)}) {}
  explicit LeakyReLU(Index features) : LeakyReLU(features, S(0.01)) {}

 private:
  static S check(S slope) {
    if (!(slope > S(0)) || !std::isfinite(slope))
      throw RankError(
          detail::cat("leaky_relu: slope must be finite and > 0 (got ", slope, "); use ReLU for slope 0"));
    return slope;
  }
};
template <class S>
using Tanh = Elementwise<S, rules::Tanh<S>>;
template <class S>
using Sigmoid = Elementwise<S, rules::Sigmoid<S>>;
template <class S>
using Softplus = Elementwise<S, rules::Softplus<S>>;
template <class S>
using ELU = Elementwise<S, rules::ELU<S>>;

/// y = x (LinearInX with A = I). Saves nothing; vijp and inverse are the identity.
template <class S>
class Identity : public NoParameters<S>, public LinearInX<Identity<S>, S> {
 public:
  using scalar_type = S;
  explicit Identity(Index features) : n_(features) {}
  [[nodiscard]] Index in_features() const { return n_; }
  [[nodiscard]] Index out_features() const { return n_; }
  [[nodiscard]] std::string name() const { return detail::cat("identity(", n_, ")"); }

  void apply_into(const CRef<S>& a, MatRef<S> out) const { out = a; }
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const { out = h; }
  void solve_transpose_into(const CRef<S>& h, MatRef<S> out) const { out = h; }
  void solve_into(const CRef<S>& y, MatRef<S> out) const { out = y; }

  /// J = I: κ = γ = 1.
  [[nodiscard]] static Amplification amplification(const Empty&) { return {1, 1}; }
  template <class T>
  [[nodiscard]] Identity<T> cast() const {
    return Identity<T>(n_);
  }

 private:
  Index n_;
};

/// y = max(x, 0). Not submersive (Jᵀ erases h_y where x ≤ 0): fragmental, the
/// fragment being h_y at those positions (column-major order); the reverse
/// pass keeps the mask bits.
template <class S>
class ReLU : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = BitMask;
  using fragment_type = Fragment<S>;
  explicit ReLU(Index features) : n_(features) {}
  [[nodiscard]] Index in_features() const { return n_; }
  [[nodiscard]] Index out_features() const { return n_; }
  [[nodiscard]] std::string name() const { return detail::cat("relu(", n_, ")"); }

  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, n_);
    return x.cwiseMax(S(0));
  }
  /// J dx = [x > 0] ⊙ dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "tangent", dx, n_, x.cols());
    return (x.array() > S(0)).select(dx, S(0));
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>&) const {
    return Matrix<S>::Zero(n_, x.cols());
  }
  /// Jᵀ h = [x > 0] ⊙ h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "cotangent", h, n_, x.cols());
    return (x.array() > S(0)).select(h, S(0));
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {}

  [[nodiscard]] BitMask save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, n_);
    return BitMask(x, [](S v) { return v > S(0); });
  }
  [[nodiscard]] Matrix<S> vjp_residual(const BitMask& m, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, n_, m.cols());
    Matrix<S> out;
    m.apply(h, out, [](bool on, S v) { return on ? v : S(0); });
    return out;
  }
  /// φ = h_y where x ≤ 0.
  [[nodiscard]] Fragment<S> save_fragment(const BitMask& m, const CRef<S>& hy) const {
    detail::check_rows(*this, "output cotangent", hy, n_, m.cols());
    Fragment<S> f{Matrix<S>(m.rows() * m.cols() - m.count(), 1)};
    Index k = 0;
    for (Index j = 0; j < hy.cols(); ++j)
      for (Index i = 0; i < n_; ++i)
        if (!m(i, j)) f.value(k++, 0) = hy(i, j);
    return f;
  }
  /// h_y = h_x where x > 0, φ elsewhere.
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const Fragment<S>& f) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "input cotangent", hx, n_, x.cols());
    Matrix<S> hy(n_, hx.cols());
    Index k = 0;
    for (Index j = 0; j < hx.cols(); ++j)
      for (Index i = 0; i < n_; ++i) {
        if (x(i, j) > S(0)) {
          hy(i, j) = hx(i, j);
        } else {
          if (k >= f.value.size())
            throw ShapeError(name() + ": fragment is shorter than the input's zero set");
          hy(i, j) = f.value(k++, 0);
        }
      }
    if (k != f.value.size()) throw ShapeError(name() + ": fragment is longer than the input's zero set");
    return hy;
  }

  /// κ = γ = 1: where x > 0 the sweep copies h_x (σ' = 1); elsewhere h_y is
  /// restored exactly from the fragment, so those coordinates carry no
  /// amplified error and are left out.
  [[nodiscard]] static Amplification amplification(const BitMask&) { return {1, 1}; }
  template <class T>
  [[nodiscard]] ReLU<T> cast() const {
    return ReLU<T>(n_);
  }

 private:
  Index n_;
};

}  // namespace moonwalk
