// Moonwalk — normalisation layers: BatchNorm (per feature or per channel,
// over the batch) and LayerNorm (per sample, over its features).
//
// Both normalise groups of entries: x̂ = (x − μ)/σ with μ the group's mean
// and σ = √(var + ε) (var the biased variance of the group, M entries), then
// apply an affine map. With P = I − 11ᵀ/M − x̂x̂ᵀ/M, the normalisation's
// Jacobian within a group is the symmetric P/σ, so
//
//   J dx = (1/σ) (dx − mean(dx) − x̂ mean(x̂ dx)),   Jᵀ h the same formula.
//
// Jᵀ erases the group mean of the cotangent u = γ h_y (and, at ε = 0, its
// component along x̂; at ε > 0 it shrinks that component by ε/(var + ε)). A
// Moonwalk sweep recovers it from a fragment of two numbers per group,
// φ = (mean(u), mean(x̂ u)), saved in the reverse pass:
//
//   u = σ h_x + φ₀ + x̂ φ₁,   h_y = u / γ        (exact: σ h_x = u − φ₀ − x̂ φ₁)
//
// (Restoring the x̂ component from h_x instead would divide by ε/(var + ε).)
// Both layers are fragmental wherever every γ ≠ 0, and keep their input for
// the reverse pass.
//
// BatchNorm<S>(channels, spatial = 1): rows c·spatial … (c+1)·spatial − 1 are
// channel c (a flat input has spatial = 1; an image C×H×W has spatial = H·W,
// core/image.hpp), normalised over those rows and every sample: M = spatial ·
// batch. θ = [γ (C); β (C)], y = γ_c x̂ + β_c. Training mode uses the batch's
// statistics and folds them into the running statistics once per training
// step (core/step.hpp): mean ← (1 − m) mean + m μ, var ← (1 − m) var + m ·
// var_batch · M/(M − 1) (the unbiased variance), m the momentum. Evaluation
// mode normalises with the running statistics: a per-channel affine map,
// submersive (vijp h_y = σ h_x / γ). In training the samples interact
// (couples_batch()), and no per-sample amplification bound exists: a sample's
// cotangent can be small next to the batch mean that Jᵀ subtracts.
//
// LayerNorm<S>(features): each sample (column) is one group of M = features
// entries; θ = [γ (features); β (features)], y = γ ⊙ x̂ + β. Per sample,
// ‖Δh_y‖/‖h_y‖ ≤ (max|γ|/min|γ|) ‖δ‖/‖h_x‖ for an error δ in h_x (‖P‖ ≤ 1).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/step.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk {

namespace detail {

/// μ and 1/σ of one normalisation group, computed in double.
struct GroupMoments {
  double mean = 0;
  double var = 0;  ///< biased: Σ(x − μ)²/M
  double inv_std = 1;
};

template <class Derived>
GroupMoments group_moments(const Eigen::DenseBase<Derived>& g, double eps) {
  const auto gd = g.derived().template cast<double>().array();
  GroupMoments m;
  m.mean = gd.mean();
  m.var = (gd - m.mean).square().mean();
  m.inv_std = 1 / std::sqrt(m.var + eps);
  return m;
}

/// out = s · (v − mean(v) − x̂ · mean(x̂ ⊙ v)) within one group, x̂ = (x − μ)/σ:
/// s·σ·J v (= s·σ·Jᵀ v) of the normalisation (header comment).
template <class X, class V, class O>
void project_normalised(const X& x, const GroupMoments& m, const V& v, double s, O&& out) {
  using S = typename std::remove_reference_t<O>::Scalar;
  const auto xh = (x.array().template cast<double>() - m.mean) * m.inv_std;
  const auto vd = v.array().template cast<double>();
  const double mv = vd.mean(), mxv = (xh * vd).mean();
  out = (s * (vd - mv - xh * mxv)).template cast<S>().matrix();
}

/// The group's normalised entries x̂ ⊙ w summed (Σ x̂ w) and Σ w, for ∂ℓ/∂γ and ∂ℓ/∂β.
template <class X, class W>
std::pair<double, double> normalised_sums(const X& x, const GroupMoments& m, const W& w) {
  const auto xh = (x.array().template cast<double>() - m.mean) * m.inv_std;
  const auto wd = w.array().template cast<double>();
  return {(xh * wd).sum(), wd.sum()};
}

inline double check_eps(const std::string& who, double eps) {
  if (!(eps >= 0) || !std::isfinite(eps))
    throw Error(cat(who, ": eps must be finite and >= 0 (got ", eps, ")"));
  return eps;
}

}  // namespace detail

/// θ = [γ; β] of a normalisation layer, k entries each (one per channel or
/// feature): γ = 1, β = 0 at construction; the parameter members of the
/// contract come from FlatParameters.
template <class S>
class ScaleShift : public FlatParameters<S> {
 public:
  Eigen::Map<Vector<S>> gamma() { return {this->theta_.data(), groups()}; }
  [[nodiscard]] Eigen::Map<const Vector<S>> gamma() const { return {this->theta_.data(), groups()}; }
  Eigen::Map<Vector<S>> beta() { return {this->theta_.data() + groups(), groups()}; }
  [[nodiscard]] Eigen::Map<const Vector<S>> beta() const {
    return {this->theta_.data() + groups(), groups()};
  }

 protected:
  /// γ = 1, β = 0 for k groups, gradient stored.
  void reset_scale_shift(Index k) {
    this->theta_ = Vector<S>::Zero(2 * k);
    this->theta_.head(k).setOnes();
    this->grad_ = detail::Gradient<S>::stored(2 * k);
  }
  /// θ = the other layer's θ (as many groups) rounded to S, gradient stored
  /// on first use (a cast for the sweep never accumulates).
  template <class T>
  void assign_cast(const ScaleShift<T>& o) {
    const auto theta = o.parameters();
    for (Index k = 0; k < this->theta_.size(); ++k)
      this->theta_(k) = static_cast<S>(theta[static_cast<std::size_t>(k)]);
    this->grad_ = detail::Gradient<S>::on_first_use(this->theta_.size());
  }

 private:
  [[nodiscard]] Index groups() const { return this->theta_.size() / 2; }
};

/// Batch normalisation (header comment).
template <class S>
class BatchNorm : public ScaleShift<S> {
 public:
  using ScaleShift<S>::gamma;
  using ScaleShift<S>::beta;
  using scalar_type = S;
  using fragment_type = Fragment<S>;

  struct Options {
    double momentum = 0.1;  ///< weight of a step's batch statistics in the running ones, in [0, 1]
    double eps = 1e-5;      ///< σ = √(var + eps); 0 only for inputs whose groups have variance
  };

  explicit BatchNorm(Index channels, Index spatial = 1, Options o = {}) : c_(channels), sp_(spatial), o_(o) {
    if (channels <= 0 || spatial <= 0)
      throw ShapeError(detail::cat("batchnorm: channels and spatial size must be positive (got ", channels,
                                   ", ", spatial, ")"));
    if (!(o.momentum >= 0 && o.momentum <= 1))
      throw Error(detail::cat("batchnorm: momentum must lie in [0, 1] (got ", o.momentum, ")"));
    (void)detail::check_eps("batchnorm", o.eps);
    if (__builtin_mul_overflow(channels, spatial, &n_))
      throw ShapeError("batchnorm: channels x spatial size overflows");
    this->reset_scale_shift(c_);
    running_mean_ = Vector<double>::Zero(c_);
    running_var_ = Vector<double>::Ones(c_);
  }

  [[nodiscard]] Index in_features() const { return n_; }
  [[nodiscard]] Index out_features() const { return n_; }
  [[nodiscard]] Index channels() const { return c_; }
  [[nodiscard]] Index spatial() const { return sp_; }
  [[nodiscard]] const Options& options() const { return o_; }
  [[nodiscard]] std::string name() const {
    return sp_ == 1 ? detail::cat("batchnorm(", c_, ")")
                    : detail::cat("batchnorm(", c_, " channels of ", sp_, ")");
  }

  // ---- parameters θ = [γ; β] (ScaleShift) and the running statistics
  /// Running mean and (unbiased) variance per channel, in double whatever S.
  Vector<double>& running_mean() { return running_mean_; }
  [[nodiscard]] const Vector<double>& running_mean() const { return running_mean_; }
  Vector<double>& running_var() { return running_var_; }
  [[nodiscard]] const Vector<double>& running_var() const { return running_var_; }
  /// The running statistics, saved in checkpoints (core/step.hpp): mean, then variance.
  std::vector<std::span<double>> buffers() {
    return {{running_mean_.data(), static_cast<std::size_t>(c_)},
            {running_var_.data(), static_cast<std::size_t>(c_)}};
  }
  /// Running statistics folded in so far (one per training step).
  [[nodiscard]] std::uint64_t updates() const { return updates_; }

  // ---- step and mode (core/step.hpp)
  void set_step(std::uint64_t k) { state_.step = k; }
  void set_training(bool t) { state_.training = t; }
  [[nodiscard]] const StepState& step_state() const { return state_; }
  [[nodiscard]] bool couples_batch() const { return state_.training; }

  /// y = γ_c x̂ + β_c; in training, folds the batch statistics into the
  /// running ones on the step's first forward.
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, n_);
    Matrix<S> y(n_, x.cols());
    const bool fold_now = state_.training && !(folded_step_ && *folded_step_ == state_.step);
    for (Index c = 0; c < c_; ++c) {
      const auto m = moments(x, c);
      const double a = static_cast<double>(gamma()(c)) * m.inv_std, b = static_cast<double>(beta()(c));
      y.middleRows(c * sp_, sp_) =
          ((group(x, c).array().template cast<double>() - m.mean) * a + b).template cast<S>().matrix();
      if (fold_now) fold(c, m, x.cols());
    }
    if (fold_now) {
      folded_step_ = state_.step;
      ++updates_;
    }
    return y;
  }

  /// J dx: training (γ/σ)(dx − mean dx − x̂ mean(x̂ dx)) per channel; evaluation (γ/σ) dx.
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "tangent", dx, n_, x.cols());
    return apply_jacobian(x, dx);
  }
  /// J_θ dθ = dγ_c x̂ + dβ_c
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "parameter tangent", dtheta, 2 * c_, 1);
    Matrix<S> out(n_, x.cols());
    for (Index c = 0; c < c_; ++c) {
      const auto m = moments(x, c);
      out.middleRows(c * sp_, sp_) = (((group(x, c).array().template cast<double>() - m.mean) * m.inv_std) *
                                          static_cast<double>(dtheta(c)) +
                                      static_cast<double>(dtheta(c_ + c)))
                                         .template cast<S>()
                                         .matrix();
    }
    return out;
  }
  /// Jᵀ h (J is symmetric within a channel: the same formula as jvp).
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "cotangent", h, n_, x.cols());
    return apply_jacobian(x, h);
  }
  /// g += [Σ h x̂ per channel; Σ h per channel]
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "cotangent", h, n_, x.cols());
    detail::check_rows(*this, "gradient", g, 2 * c_, 1);
    for (Index c = 0; c < c_; ++c) {
      const auto [sg, sb] = detail::normalised_sums(group(x, c), moments(x, c), group(h, c));
      g(c) += static_cast<S>(sg);
      g(c_ + c) += static_cast<S>(sb);
    }
  }

  /// Evaluation mode: h_y = σ h_x / γ per channel. Training mode throws
  /// RankError (Jᵀ erases the channel means: use the fragment).
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "input cotangent", hx, n_, x.cols());
    if (state_.training) throw RankError(name() + ": in training mode J^T erases the channel means; no vijp");
    check_gamma();
    Matrix<S> hy(n_, hx.cols());
    for (Index c = 0; c < c_; ++c)
      hy.middleRows(c * sp_, sp_) = (group(hx, c).array().template cast<double>() /
                                     (static_cast<double>(gamma()(c)) * moments(x, c).inv_std))
                                        .template cast<S>()
                                        .matrix();
    return hy;
  }
  [[nodiscard]] bool is_submersive() const { return !state_.training && gamma_nonzero(); }

  /// φ = (mean h_y, mean x̂ h_y) per channel, a 2 × C matrix (training mode).
  [[nodiscard]] Fragment<S> save_fragment(const Matrix<S>& x, const CRef<S>& hy) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "output cotangent", hy, n_, x.cols());
    Fragment<S> f{Matrix<S>(2, c_)};
    for (Index c = 0; c < c_; ++c) {
      const auto [sxh, sh] = detail::normalised_sums(group(x, c), moments(x, c), group(hy, c));
      const double mcount = static_cast<double>(sp_ * x.cols());
      f.value(0, c) = static_cast<S>(sh / mcount);
      f.value(1, c) = static_cast<S>(sxh / mcount);
    }
    return f;
  }
  /// h_y = σ h_x / γ + φ₀ + x̂ φ₁ per channel.
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const Fragment<S>& f) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "input cotangent", hx, n_, x.cols());
    if (f.value.rows() != 2 || f.value.cols() != c_)
      throw ShapeError(
          detail::cat(name(), ": fragment is ", f.value.rows(), "x", f.value.cols(), ", expected 2x", c_));
    check_gamma();
    Matrix<S> hy(n_, hx.cols());
    for (Index c = 0; c < c_; ++c) {
      const auto m = moments(x, c);
      const auto xh = (group(x, c).array().template cast<double>() - m.mean) * m.inv_std;
      hy.middleRows(c * sp_, sp_) =
          (group(hx, c).array().template cast<double>() / (static_cast<double>(gamma()(c)) * m.inv_std) +
           static_cast<double>(f.value(0, c)) + xh * static_cast<double>(f.value(1, c)))
              .template cast<S>()
              .matrix();
    }
    return hy;
  }
  [[nodiscard]] bool is_fragmental() const { return state_.training && gamma_nonzero(); }

  /// Evaluation: the diagonal J = diag(γ_c/σ_c), κ = max|a|/min|a|, γ = rms(a)·rms(1/a).
  /// Training: unknown (header comment).
  [[nodiscard]] Amplification amplification(const Matrix<S>& x) const {
    if (state_.training) return Amplification::unknown();
    double hi = 0, lo = std::numeric_limits<double>::infinity(), sq = 0, inv_sq = 0;
    for (Index c = 0; c < c_; ++c) {
      const double a = std::abs(static_cast<double>(gamma()(c)) * moments(x, c).inv_std);
      hi = std::max(hi, a);
      lo = std::min(lo, a);
      sq += a * a;
      inv_sq += a > 0 ? 1 / (a * a) : std::numeric_limits<double>::infinity();
    }
    if (!(lo > 0)) return {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    const double dc = static_cast<double>(c_);
    return {hi / lo, std::sqrt(sq / dc) * std::sqrt(inv_sq / dc)};
  }

  /// The same layer in scalar type T: θ converted, the running statistics,
  /// options, step and mode carried over.
  template <class T>
  [[nodiscard]] BatchNorm<T> cast() const {
    BatchNorm<T> l(c_, sp_, {.momentum = o_.momentum, .eps = o_.eps});
    l.assign_cast(*this);
    l.running_mean() = running_mean_;
    l.running_var() = running_var_;
    l.state_ = state_;
    l.folded_step_ = folded_step_;
    l.updates_ = updates_;
    return l;
  }

 private:
  template <class>
  friend class BatchNorm;

  template <class M>
  auto group(const M& m, Index c) const {
    return m.middleRows(c * sp_, sp_);
  }
  /// The statistics channel c is normalised with: the batch's in training, the running ones in evaluation.
  detail::GroupMoments moments(const CRef<S>& x, Index c) const {
    if (state_.training) {
      if (sp_ * x.cols() < 2)
        throw ShapeError(detail::cat(name(), ": training mode needs at least 2 values per channel (batch ",
                                     x.cols(), ")"));
      return detail::group_moments(group(x, c), o_.eps);
    }
    detail::GroupMoments m;
    m.mean = running_mean_(c);
    m.var = running_var_(c);
    m.inv_std = 1 / std::sqrt(m.var + o_.eps);
    return m;
  }
  /// Folds channel c's batch statistics into the running ones.
  void fold(Index c, const detail::GroupMoments& m, Index batch) const {
    const double count = static_cast<double>(sp_ * batch), mo = o_.momentum;
    running_mean_(c) = (1 - mo) * running_mean_(c) + mo * m.mean;
    running_var_(c) = (1 - mo) * running_var_(c) + mo * m.var * count / (count - 1);
  }
  Matrix<S> apply_jacobian(const CRef<S>& x, const CRef<S>& v) const {
    Matrix<S> out(n_, x.cols());
    for (Index c = 0; c < c_; ++c) {
      const auto m = moments(x, c);
      const double a = static_cast<double>(gamma()(c)) * m.inv_std;
      if (state_.training)
        detail::project_normalised(group(x, c), m, group(v, c), a, out.middleRows(c * sp_, sp_));
      else
        out.middleRows(c * sp_, sp_) =
            (group(v, c).array().template cast<double>() * a).template cast<S>().matrix();
    }
    return out;
  }
  [[nodiscard]] bool gamma_nonzero() const { return (gamma().array() != S(0)).all(); }
  void check_gamma() const {
    if (!gamma_nonzero())
      throw RankError(name() + ": a channel has gamma = 0; its output cotangent is erased");
  }

  Index c_, sp_, n_ = 0;
  Options o_;
  StepState state_;
  mutable Vector<double> running_mean_, running_var_;
  mutable std::optional<std::uint64_t> folded_step_;
  mutable std::uint64_t updates_ = 0;
};

/// Layer normalisation (header comment).
template <class S>
class LayerNorm : public ScaleShift<S> {
 public:
  using ScaleShift<S>::gamma;
  using ScaleShift<S>::beta;
  using scalar_type = S;
  using fragment_type = Fragment<S>;

  struct Options {
    double eps = 1e-5;  ///< σ = √(var + eps); 0 only for samples whose features vary
  };

  explicit LayerNorm(Index features, Options o = {}) : n_(features), o_(o) {
    if (features < 2)
      throw ShapeError(detail::cat("layernorm: needs at least 2 features (got ", features, ")"));
    (void)detail::check_eps("layernorm", o.eps);
    this->reset_scale_shift(n_);
  }

  [[nodiscard]] Index in_features() const { return n_; }
  [[nodiscard]] Index out_features() const { return n_; }
  [[nodiscard]] const Options& options() const { return o_; }
  [[nodiscard]] std::string name() const { return detail::cat("layernorm(", n_, ")"); }

  // ---- parameters θ = [γ; β] (ScaleShift)

  /// y = γ ⊙ x̂ + β per sample
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, n_);
    Matrix<S> y(n_, x.cols());
    for (Index j = 0; j < x.cols(); ++j) {
      const auto m = detail::group_moments(x.col(j), o_.eps);
      y.col(j) = (((x.col(j).array().template cast<double>() - m.mean) * m.inv_std) *
                      gamma().array().template cast<double>() +
                  beta().array().template cast<double>())
                     .template cast<S>()
                     .matrix();
    }
    return y;
  }
  /// J dx = γ ⊙ (1/σ)(dx − mean dx − x̂ mean(x̂ dx))
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "tangent", dx, n_, x.cols());
    Matrix<S> out(n_, x.cols());
    for (Index j = 0; j < x.cols(); ++j) {
      const auto m = detail::group_moments(x.col(j), o_.eps);
      detail::project_normalised(x.col(j), m, dx.col(j), m.inv_std, out.col(j));
    }
    out.array().colwise() *= gamma().array();
    return out;
  }
  /// J_θ dθ = dγ ⊙ x̂ + dβ
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "parameter tangent", dtheta, 2 * n_, 1);
    Matrix<S> out(n_, x.cols());
    for (Index j = 0; j < x.cols(); ++j) {
      const auto m = detail::group_moments(x.col(j), o_.eps);
      out.col(j) = (((x.col(j).array().template cast<double>() - m.mean) * m.inv_std) *
                        dtheta.head(n_).array().template cast<double>() +
                    dtheta.tail(n_).array().template cast<double>())
                       .template cast<S>()
                       .matrix();
    }
    return out;
  }
  /// Jᵀ h = (1/σ)(u − mean u − x̂ mean(x̂ u)), u = γ ⊙ h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "cotangent", h, n_, x.cols());
    Matrix<S> out(n_, x.cols());
    for (Index j = 0; j < x.cols(); ++j) {
      const auto m = detail::group_moments(x.col(j), o_.eps);
      detail::project_normalised(x.col(j), m, h.col(j).cwiseProduct(gamma()), m.inv_std, out.col(j));
    }
    return out;
  }
  /// g += [Σ_samples h ⊙ x̂; Σ_samples h]
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "cotangent", h, n_, x.cols());
    detail::check_rows(*this, "gradient", g, 2 * n_, 1);
    Vector<double> gg = Vector<double>::Zero(n_), gb = Vector<double>::Zero(n_);
    for (Index j = 0; j < x.cols(); ++j) {
      const auto m = detail::group_moments(x.col(j), o_.eps);
      const auto hd = h.col(j).template cast<double>().array();
      gg.array() += (x.col(j).array().template cast<double>() - m.mean) * m.inv_std * hd;
      gb.array() += hd;
    }
    g.head(n_) += gg.template cast<S>();
    g.tail(n_) += gb.template cast<S>();
  }

  /// φ = (mean u, mean x̂ u) per sample, u = γ ⊙ h_y: a 2 × batch matrix.
  [[nodiscard]] Fragment<S> save_fragment(const Matrix<S>& x, const CRef<S>& hy) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "output cotangent", hy, n_, x.cols());
    Fragment<S> f{Matrix<S>(2, x.cols())};
    const double dn = static_cast<double>(n_);
    for (Index j = 0; j < x.cols(); ++j) {
      const auto [sxu, su] = detail::normalised_sums(x.col(j), detail::group_moments(x.col(j), o_.eps),
                                                     hy.col(j).cwiseProduct(gamma()));
      f.value(0, j) = static_cast<S>(su / dn);
      f.value(1, j) = static_cast<S>(sxu / dn);
    }
    return f;
  }
  /// h_y = (σ h_x + φ₀ + x̂ φ₁) / γ per sample.
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const Fragment<S>& f) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "input cotangent", hx, n_, x.cols());
    if (f.value.rows() != 2 || f.value.cols() != x.cols())
      throw ShapeError(detail::cat(name(), ": fragment is ", f.value.rows(), "x", f.value.cols(),
                                   ", expected 2x", x.cols()));
    if (!gamma_nonzero())
      throw RankError(name() + ": a feature has gamma = 0; its output cotangent is erased");
    Matrix<S> hy(n_, hx.cols());
    for (Index j = 0; j < x.cols(); ++j) {
      const auto m = detail::group_moments(x.col(j), o_.eps);
      const auto xh = (x.col(j).array().template cast<double>() - m.mean) * m.inv_std;
      hy.col(j) = ((hx.col(j).array().template cast<double>() / m.inv_std +
                    static_cast<double>(f.value(0, j)) + xh * static_cast<double>(f.value(1, j))) /
                   gamma().array().template cast<double>())
                      .template cast<S>()
                      .matrix();
    }
    return hy;
  }
  [[nodiscard]] bool is_fragmental() const { return gamma_nonzero(); }

  /// κ = max|γ|/min|γ|, γ_typ = rms(γ)·rms(1/γ): independent of x (header comment).
  [[nodiscard]] Amplification amplification(const Matrix<S>& /*x*/) const {
    const auto g = gamma().template cast<double>().cwiseAbs();
    const double lo = g.minCoeff();
    if (!(lo > 0)) return {std::numeric_limits<double>::infinity(), std::numeric_limits<double>::infinity()};
    const double dn = static_cast<double>(n_);
    return {g.maxCoeff() / lo,
            std::sqrt(g.squaredNorm() / dn) * std::sqrt(g.cwiseInverse().squaredNorm() / dn)};
  }

  template <class T>
  [[nodiscard]] LayerNorm<T> cast() const {
    LayerNorm<T> l(n_, {.eps = o_.eps});
    l.assign_cast(*this);
    return l;
  }

 private:
  template <class>
  friend class LayerNorm;

  [[nodiscard]] bool gamma_nonzero() const { return (gamma().array() != S(0)).all(); }

  Index n_;
  Options o_;
};

}  // namespace moonwalk
