// Moonwalk — coupling blocks (RevNet): invertible by construction, with F and
// G any layers (or chains), not necessarily invertible themselves.
//
// Features split as x = [x1; x2] (x1: the first n1 rows, x2: the other n2),
// F: n2 → n1, G: n1 → n2.
//
//   additive:  y1 = x1 + F(x2),            y2 = x2 + G(y1)
//   affine:    y1 = x1 ⊙ e^{tanh F(x2)},   y2 = x2 + G(y1)
//
// The affine block's scale e^{tanh(·)} lies in [1/e, e], so it never vanishes:
// the block stays invertible and its vijp never divides by less than 1/e.
// Write s = tanh F(x2), e = e^{s}, d = x1 ⊙ e ⊙ (1 − s²) (so ∂y1/∂F = diag d);
// the additive block is e = 1, d ≡ 1 with y1 = x1 + F(x2) instead.
//
//   jvp:   dy1 = e ⊙ dx1 + d ⊙ F.jvp(x2, dx2);  dy2 = dx2 + G.jvp(y1, dy1)
//   vjp:   ḡ = h1 + G.vjp(y1, h2);  h_x1 = e ⊙ ḡ;  h_x2 = h2 + F.vjp(x2, d ⊙ ḡ)
//   vijp:  ḡ = h_x1 / e;  h_y2 = h_x2 − F.vjp(x2, d ⊙ ḡ);  h_y1 = ḡ − G.vjp(y1, h_y2)
//   θ:     g_F += F.vjp_params(x2, d ⊙ ḡ);  g_G += G.vjp_params(y1, h2)
//
// F's and G's vjps run inside the block, so their internals live only within
// the block's own call.
//
// Amplification (core/amplification.hpp), per sample: J = A_G A_F with
//   A_F = [[diag e, diag d · F'], [0, I]]   (dx1, dx2) ↦ (dy1, dx2)
//   A_G = [[I, 0], [G', I]]                 (dy1, dx2) ↦ (dy1, dy2)
// F' = ∂F/∂x2 at x2, G' = ∂G/∂y1 at y1, f = ‖F'‖, g = ‖G'‖ (power iteration,
// detail::power_norms: an estimate). With A_F⁻¹ = [[E⁻¹, −E⁻¹ D F'], [0, I]]
// and A_G⁻¹ = [[I, 0], [−G', I]]:
//   ‖A_F‖ ≤ max(e_max, 1) + d_max f,   ‖A_F⁻¹‖ ≤ max(1 / e_min, 1) + d_max f / e_min
//   ‖A_G‖, ‖A_G⁻¹‖ ≤ 1 + g
//   κ ≤ (1 + g)² · (max(e_max, 1) + d_max f) · (max(1 / e_min, 1) + d_max f / e_min)
// with e_max, e_min, d_max = max|d| over the sample's first half; additive
// (e = d = 1): κ ≤ (1 + f)² (1 + g)². γ is probed (detail::probe_typical) and
// floored at 1 (J is square, so γ ≥ 1 by Cauchy–Schwarz).
#pragma once

#include <cmath>
#include <cstdint>
#include <span>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/core/probe.hpp"

namespace moonwalk {

enum class CouplingKind { additive, affine };

template <Layer F, Layer G, CouplingKind Kind>
class Coupling {
  static_assert(std::is_same_v<typename F::scalar_type, typename G::scalar_type>,
                "Moonwalk: a coupling block's F and G must have the same scalar type");

 public:
  using scalar_type = typename F::scalar_type;
  using S = scalar_type;

  Coupling(F f, G g) : f_(std::move(f)), g_(std::move(g)), n1_(f_.out_features()), n2_(f_.in_features()) {
    if (g_.in_features() != n1_ || g_.out_features() != n2_) {
      std::ostringstream s;
      s << label() << ": F " << f_.name() << " maps " << n2_ << " -> " << n1_ << " so G must map " << n1_
        << " -> " << n2_ << ", but G " << g_.name() << " maps " << g_.in_features() << " -> "
        << g_.out_features();
      throw ShapeError(s.str());
    }
  }

  [[nodiscard]] Index in_features() const { return n1_ + n2_; }
  [[nodiscard]] Index out_features() const { return n1_ + n2_; }
  [[nodiscard]] std::string name() const { return detail::cat(label(), "(", n1_, "+", n2_, ")"); }
  F& f() { return f_; }
  G& g() { return g_; }
  [[nodiscard]] const F& f() const { return f_; }
  [[nodiscard]] const G& g() const { return g_; }

  // Step, mode and batch coupling (core/step.hpp): those of the branches.
  void set_step(std::uint64_t k) {
    moonwalk::set_step(f_, k);
    moonwalk::set_step(g_, k);
  }
  void set_training(bool t) {
    moonwalk::set_training(f_, t);
    moonwalk::set_training(g_, t);
  }
  [[nodiscard]] bool couples_batch() const {
    return moonwalk::couples_batch(f_) || moonwalk::couples_batch(g_);
  }
  /// The branches' buffers, F's then G's (core/step.hpp).
  std::vector<std::span<double>> buffers() {
    auto b = moonwalk::buffers(f_);
    moonwalk::append_buffers(g_, b);
    return b;
  }
  /// Both branches can be carried in double (core/amplification.hpp).
  [[nodiscard]] bool castable_to_double() const {
    return moonwalk::castable_to_double(f_) && moonwalk::castable_to_double(g_);
  }

  [[nodiscard]] Index num_params() const { return f_.num_params() + g_.num_params(); }
  std::vector<std::span<S>> parameter_blocks() {
    return join(moonwalk::parameter_blocks(f_), moonwalk::parameter_blocks(g_));
  }
  [[nodiscard]] std::vector<std::span<const S>> parameter_blocks() const {
    return join(moonwalk::parameter_blocks(f_), moonwalk::parameter_blocks(g_));
  }
  std::vector<std::span<S>> gradient_blocks() {
    return join(moonwalk::gradient_blocks(f_), moonwalk::gradient_blocks(g_));
  }
  [[nodiscard]] std::vector<std::span<const S>> gradient_blocks() const {
    return join(moonwalk::gradient_blocks(f_), moonwalk::gradient_blocks(g_));
  }

  /// [y1; y2]
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    const Inner in = inner(x);
    Matrix<S> y(in_features(), x.cols());
    y.topRows(n1_) = in.y1;
    y.bottomRows(n2_) = x.bottomRows(n2_) + g_.forward(in.y1);
    return y;
  }

  /// x2 = y2 − G(y1);  x1 = (y1 − F(x2)) or y1 / e^{tanh F(x2)}
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    detail::check_rows(*this, "output", y, out_features());
    Matrix<S> x(in_features(), y.cols());
    const Matrix<S> y1 = y.topRows(n1_);
    x.bottomRows(n2_) = y.bottomRows(n2_) - g_.forward(y1);
    const Matrix<S> fx = f_.forward(x.bottomRows(n2_));
    if constexpr (Kind == CouplingKind::additive)
      x.topRows(n1_) = y1 - fx;
    else
      x.topRows(n1_) = y1.cwiseQuotient(scale(fx));
    return x;
  }

  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "tangent", dx, in_features(), x.cols());
    const Inner in = inner(x);
    const Matrix<S> x2 = x.bottomRows(n2_);
    Matrix<S> t(in_features(), x.cols());
    Matrix<S> df = f_.jvp(x2, dx.bottomRows(n2_));
    if constexpr (Kind == CouplingKind::additive)
      t.topRows(n1_) = dx.topRows(n1_) + df;
    else
      t.topRows(n1_) = in.e.cwiseProduct(dx.topRows(n1_)) + in.d.cwiseProduct(df);
    t.bottomRows(n2_) = dx.bottomRows(n2_) + g_.jvp(in.y1, t.topRows(n1_));
    return t;
  }

  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "parameter tangent", dtheta, num_params(), 1);
    const Inner in = inner(x);
    const Index pf = f_.num_params(), pg = g_.num_params();
    Matrix<S> t(in_features(), x.cols());
    Matrix<S> df =
        pf > 0 ? f_.jvp_params(x.bottomRows(n2_), dtheta.head(pf)) : Matrix<S>::Zero(n1_, x.cols());
    if constexpr (Kind == CouplingKind::additive)
      t.topRows(n1_) = df;
    else
      t.topRows(n1_) = in.d.cwiseProduct(df);
    t.bottomRows(n2_) = g_.jvp(in.y1, t.topRows(n1_));
    if (pg > 0) t.bottomRows(n2_) += g_.jvp_params(in.y1, dtheta.tail(pg));
    return t;
  }

  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, out_features(), x.cols());
    const Inner in = inner(x);
    const Matrix<S> gbar = h.topRows(n1_) + g_.vjp(in.y1, h.bottomRows(n2_));
    Matrix<S> hx(in_features(), x.cols());
    if constexpr (Kind == CouplingKind::additive) {
      hx.topRows(n1_) = gbar;
      hx.bottomRows(n2_) = h.bottomRows(n2_) + f_.vjp(in.x2, gbar);
    } else {
      hx.topRows(n1_) = in.e.cwiseProduct(gbar);
      hx.bottomRows(n2_) = h.bottomRows(n2_) + f_.vjp(in.x2, in.d.cwiseProduct(gbar));
    }
    return hx;
  }

  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> grad) const {
    detail::check_rows(*this, "cotangent", h, out_features(), x.cols());
    detail::check_rows(*this, "gradient", grad, num_params(), 1);
    const Inner in = inner(x);
    const Index pf = f_.num_params(), pg = g_.num_params();
    const Matrix<S> h2 = h.bottomRows(n2_);
    const Matrix<S> gbar = h.topRows(n1_) + g_.vjp(in.y1, h2);
    if (pf > 0) {
      if constexpr (Kind == CouplingKind::additive)
        f_.vjp_params(in.x2, gbar, grad.head(pf));
      else
        f_.vjp_params(in.x2, in.d.cwiseProduct(gbar), grad.head(pf));
    }
    if (pg > 0) g_.vjp_params(in.y1, h2, grad.tail(pg));
  }

  /// h_y from h_x (see header comment): always exists, the block is invertible.
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    detail::check_rows(*this, "input cotangent", hx, in_features(), x.cols());
    const Inner in = inner(x);
    Matrix<S> hy(out_features(), x.cols());
    Matrix<S> gbar;
    if constexpr (Kind == CouplingKind::additive) {
      gbar = hx.topRows(n1_);
      hy.bottomRows(n2_) = hx.bottomRows(n2_) - f_.vjp(in.x2, gbar);
    } else {
      gbar = hx.topRows(n1_).cwiseQuotient(in.e);
      hy.bottomRows(n2_) = hx.bottomRows(n2_) - f_.vjp(in.x2, in.d.cwiseProduct(gbar));
    }
    hy.topRows(n1_) = gbar - g_.vjp(in.y1, hy.bottomRows(n2_));
    return hy;
  }

  /// Largest and smallest scale over the batch (1 and 1 for additive): the
  /// first-half stretch the vijp applies, for amplification bounds.
  [[nodiscard]] std::pair<S, S> scale_range(const CRef<S>& x) const {
    if constexpr (Kind == CouplingKind::additive) {
      return {S(1), S(1)};
    } else {
      const Inner in = inner(x);
      return {in.e.maxCoeff(), in.e.minCoeff()};
    }
  }

  /// κ bound and probed γ of the vijp at x, maximised over the batch (header comment).
  [[nodiscard]] Amplification amplification(const Matrix<S>& x) const {
    const Inner in = inner(x);
    const Vector<double> f = detail::power_norms(f_, in.x2), g = detail::power_norms(g_, in.y1);
    double bound = 1;
    for (Index j = 0; j < x.cols(); ++j) {
      double e_max = 1, e_min = 1, d_max = 1;
      if constexpr (Kind == CouplingKind::affine) {
        e_max = static_cast<double>(in.e.col(j).maxCoeff());
        e_min = static_cast<double>(in.e.col(j).minCoeff());
        d_max = static_cast<double>(in.d.col(j).cwiseAbs().maxCoeff());
      }
      const double a_f =
          (std::max(e_max, 1.0) + d_max * f(j)) * (std::max(1 / e_min, 1.0) + d_max * f(j) / e_min);
      const double a_g = (1 + g(j)) * (1 + g(j));
      bound = std::max(bound, a_f * a_g);
    }
    return {bound, std::max(1.0, detail::probe_typical(*this, x))};
  }

  /// The same block in scalar type T (F and G cast, same kind).
  template <class T>
  requires(std::is_same_v<T, S> || (CastableTo<F, T> && CastableTo<G, T>)) [[nodiscard]] auto cast() const {
    if constexpr (std::is_same_v<T, S>) {
      return *this;
    } else {
      using FT = decltype(f_.template cast<T>());
      using GT = decltype(g_.template cast<T>());
      return Coupling<FT, GT, Kind>(f_.template cast<T>(), g_.template cast<T>());
    }
  }

 private:
  struct Inner {
    Matrix<S> x2, y1, e, d;
  };
  static constexpr const char* label() {
    return Kind == CouplingKind::additive ? "additive_coupling" : "affine_coupling";
  }
  static Matrix<S> scale(const Matrix<S>& fx) {
    return fx.unaryExpr([](S u) { return std::exp(std::tanh(u)); });
  }
  /// x2, y1 and (affine) e = e^{s}, d = x1 ⊙ e ⊙ (1 − s²), s = tanh F(x2).
  Inner inner(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, in_features());
    Inner in;
    in.x2 = x.bottomRows(n2_);
    const Matrix<S> fx = f_.forward(in.x2);
    if constexpr (Kind == CouplingKind::additive) {
      in.y1 = x.topRows(n1_) + fx;
    } else {
      const Matrix<S> s = fx.array().tanh().matrix();
      in.e = s.array().exp().matrix();
      in.y1 = x.topRows(n1_).cwiseProduct(in.e);
      in.d = (in.y1.array() * (S(1) - s.array().square())).matrix();
    }
    return in;
  }
  template <class T>
  static std::vector<T> join(const Blocks<T>& a, const Blocks<T>& b) {
    std::vector<T> out(a.begin(), a.end());
    out.insert(out.end(), b.begin(), b.end());
    return out;
  }

  F f_;
  G g_;
  Index n1_, n2_;
};

template <Layer F, Layer G>
using AdditiveCoupling = Coupling<F, G, CouplingKind::additive>;
template <Layer F, Layer G>
using AffineCoupling = Coupling<F, G, CouplingKind::affine>;

}  // namespace moonwalk
