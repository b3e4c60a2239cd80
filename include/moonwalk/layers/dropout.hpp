// Moonwalk — inverted dropout whose mask is replayed, never stored.
//
// In training mode, y = x ⊙ m / (1 − p) with m_k = [u_k ≥ p], where u_k is a
// uniform number drawn from a counter-based stream (core/random.hpp) keyed
// on (seed, step, k), k = j·features + i the element's column-major index.
// Every pass of one step (core/step.hpp) draws the same mask from the same
// key, so the reverse pass keeps nothing (residual Empty) and a cast, a
// recomputation or a sweep replays it exactly. In evaluation mode, and for
// p = 0, the layer is the identity.
//
// J = diag(m)/(1 − p): Jᵀ erases h_y on the dropped coordinates, so in
// training the layer is fragmental: φ = h_y there (column-major order), and
// h_y = (1 − p) h_x elsewhere. An error δ in h_x reaches only the kept
// coordinates, scaled by (1 − p) as the signal is: κ = γ = 1.
#pragma once

#include <cmath>
#include <cstdint>
#include <string>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/random.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/step.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk {

template <class S>
class Dropout : public NoParameters<S> {
 public:
  using scalar_type = S;
  using residual_type = Empty;
  using fragment_type = Fragment<S>;

  /// Drops each element with probability p ∈ [0, 1); `seed` keys the layer's stream.
  Dropout(Index features, double p, std::uint64_t seed = 0) : n_(features), p_(p), seed_(seed) {
    if (features <= 0) throw ShapeError(detail::cat("dropout: width must be positive (got ", features, ")"));
    if (!(p >= 0 && p < 1))
      throw Error(detail::cat("dropout: drop probability must lie in [0, 1) (got ", p, ")"));
  }

  [[nodiscard]] Index in_features() const { return n_; }
  [[nodiscard]] Index out_features() const { return n_; }
  [[nodiscard]] double p() const { return p_; }
  [[nodiscard]] std::uint64_t seed() const { return seed_; }
  [[nodiscard]] std::string name() const { return detail::cat("dropout(", n_, ", p ", p_, ")"); }

  void set_step(std::uint64_t k) { state_.step = k; }
  void set_training(bool t) { state_.training = t; }
  [[nodiscard]] const StepState& step_state() const { return state_; }
  /// Training with p > 0: the mask is applied.
  [[nodiscard]] bool active() const { return state_.training && p_ > 0; }

  /// Whether element (i, j) is kept in the current step (true when inactive).
  [[nodiscard]] bool kept(Index i, Index j) const { return !active() || keeps(key(), i, j); }

  /// y = x ⊙ m / (1 − p)
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, n_);
    return masked(x);
  }
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "tangent", dx, n_, x.cols());
    return masked(dx);
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>&) const {
    return Matrix<S>::Zero(n_, x.cols());
  }
  /// Jᵀ h = m ⊙ h / (1 − p)
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "cotangent", h, n_, x.cols());
    return masked(h);
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {}

  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(*this, "input", x, n_);
    return {};
  }
  /// Jᵀ h from nothing: the mask is replayed.
  [[nodiscard]] Matrix<S> vjp_residual(const Empty&, const CRef<S>& h) const {
    detail::check_rows(*this, "cotangent", h, n_);
    return masked(h);
  }

  /// Inactive: h_y = h_x. Active: throws RankError (use the fragment).
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    detail::check_rows(*this, "input cotangent", hx, n_, x.cols());
    if (active()) throw RankError(name() + ": in training mode J^T erases the dropped coordinates; no vijp");
    return hx;
  }
  [[nodiscard]] bool is_submersive() const { return !active(); }

  /// φ = h_y on the dropped coordinates.
  [[nodiscard]] Fragment<S> save_fragment(const Empty&, const CRef<S>& hy) const {
    detail::check_rows(*this, "output cotangent", hy, n_);
    const bool on = active();
    const std::uint64_t key0 = key();
    Index dropped = 0;
    for (Index j = 0; j < hy.cols(); ++j)
      for (Index i = 0; i < n_; ++i) dropped += on && !keeps(key0, i, j) ? 1 : 0;
    Fragment<S> f{Matrix<S>(dropped, 1)};
    Index k = 0;
    for (Index j = 0; j < hy.cols(); ++j)
      for (Index i = 0; i < n_; ++i)
        if (on && !keeps(key0, i, j)) f.value(k++, 0) = hy(i, j);
    return f;
  }
  /// h_y = (1 − p) h_x where kept, φ where dropped.
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const Fragment<S>& f) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "input cotangent", hx, n_, x.cols());
    const S keep = static_cast<S>(1 - p_);
    const bool on = active();
    const std::uint64_t key0 = key();
    Matrix<S> hy(n_, hx.cols());
    Index k = 0;
    for (Index j = 0; j < hx.cols(); ++j)
      for (Index i = 0; i < n_; ++i) {
        if (!on || keeps(key0, i, j)) {
          hy(i, j) = keep * hx(i, j);
        } else {
          if (k >= f.value.size()) throw ShapeError(name() + ": fragment is shorter than the dropped set");
          hy(i, j) = f.value(k++, 0);
        }
      }
    if (k != f.value.size()) throw ShapeError(name() + ": fragment is longer than the dropped set");
    return hy;
  }
  [[nodiscard]] bool is_fragmental() const { return active(); }

  /// κ = γ = 1 (header comment).
  [[nodiscard]] static Amplification amplification(const Empty&) { return {1, 1}; }

  /// The same layer (seed, p, step, mode) in scalar type T: the same mask.
  template <class T>
  [[nodiscard]] Dropout<T> cast() const {
    Dropout<T> l(n_, p_, seed_);
    l.set_step(state_.step);
    l.set_training(state_.training);
    return l;
  }

 private:
  /// The stream key of (seed, step).
  [[nodiscard]] std::uint64_t key() const {
    return detail::splitmix64_at(seed_ ^ detail::splitmix64_at(state_.step + 0x5bd1e995ULL));
  }
  /// u_k ≥ p for k = j·features + i in the stream `key`.
  [[nodiscard]] bool keeps(std::uint64_t key, Index i, Index j) const {
    const std::uint64_t k =
        static_cast<std::uint64_t>(j) * static_cast<std::uint64_t>(n_) + static_cast<std::uint64_t>(i);
    return detail::unit_interval(detail::splitmix64_at(key + k)) >= p_;
  }
  Matrix<S> masked(const CRef<S>& v) const {
    if (!active()) return v;
    const S scale = static_cast<S>(1 / (1 - p_));
    const std::uint64_t key0 = key();
    Matrix<S> out(v.rows(), v.cols());
    for (Index j = 0; j < v.cols(); ++j)
      for (Index i = 0; i < n_; ++i) out(i, j) = keeps(key0, i, j) ? v(i, j) * scale : S(0);
    return out;
  }

  Index n_;
  double p_;
  std::uint64_t seed_;
  StepState state_;
};

}  // namespace moonwalk
