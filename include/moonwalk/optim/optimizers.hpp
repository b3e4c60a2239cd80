// Moonwalk — first-order optimizers (SGD, Adam) and learning-rate schedules
// over the flat parameter view of any `Net` (nets/parameters.hpp).
//
// Usage:
//   Adam<double> opt{.lr = 1e-3};
//   CosineLR sched{.total_steps = 1000};
//   for (...) {
//     gradient(Backprop{}, net, x, MSE<double>{}, t);           // fills the layers' gradients
//     opt.step(net, opt.lr * sched.factor(opt.steps()));        // or opt.step(net) for constant lr
//   }
//
// Learning rate: `.lr` is the base rate. `step(net)` uses it; `step(net, lr)`
// uses the given rate for this one step and leaves `.lr` unchanged, so a
// schedule is applied as `opt.step(net, opt.lr * sched.factor(opt.steps()))`
// (`steps()` is the number of steps already taken, 0 before the first).
//
// Gradients are read from each layer's gradient storage (gradient_blocks),
// exactly as a schedule such as `gradient(Backprop{}, ...)` left them; `step`
// does not zero them. After the update, `step` sets the network's training
// step to steps() (core/step.hpp: Dropout draws the next step's masks,
// BatchNorm folds the next batch into its running statistics). Parameters are written through
// parameter_blocks, fetched afresh on every step: mutable access bumps a layer's weight version (Linear's
// cached QR for vijp is keyed on it), so no view is kept across steps.
//
// State (velocity / moments) is sized on the first step; a later step on a
// network with a different parameter count throws ShapeError. `state()` and
// `load_state(net, s)` save and restore it as one flat Vector<double> for
// checkpoints (the hyperparameters are not part of it).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <initializer_list>
#include <limits>
#include <numbers>
#include <span>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moonwalk/core/ops.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/nets/network.hpp"
#include "moonwalk/nets/parameters.hpp"

namespace moonwalk {

namespace detail {

/// Calls f(θ_j, g_j, j) for every parameter of `net` in flat order j, with θ_j
/// writable. Parameter and gradient blocks are walked in lockstep, so the two
/// block partitions of a layer need not coincide.
template <Net N, class F>
void for_each_parameter(N& net, F&& f) {
  using S = typename N::scalar_type;
  Index j = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](auto& l) {
      const auto gb = gradient_blocks(std::as_const(l));
      const auto pb = parameter_blocks(l);  // bumps the weight version: we write θ
      std::size_t gi = 0, go = 0;
      for (std::span<S> p : pb)
        for (S& th : p) {
          while (go == gb[gi].size()) ++gi, go = 0;
          f(th, gb[gi][go++], j++);
        }
    });
}

/// Throws ShapeError unless optimizer state sized for `have` parameters fits a
/// network with `want`.
inline void check_state_size(const char* who, Index have, Index want) {
  if (have != want)
    throw ShapeError(
        cat(who, ": optimizer state is for ", have, " parameters, network has ", want, " parameters"));
}

/// Restores a flat state [t, buffer_0 (P), …, buffer_{k−1} (P)]; throws
/// ShapeError unless it has 1 + k·P entries (or is [0], the never-stepped
/// state), and Error (naming `who` and the entry) when the step counter t is
/// not an integer in [0, 2^64) or an entry is not finite, or an entry of a
/// buffer whose index is in `non_negative` is negative (Adam's second
/// moment). Nothing is changed unless the whole state is accepted.
template <class S>
void load_flat_state(const char* who, const Vector<double>& s, Index p, std::size_t& t,
                     std::initializer_list<Vector<S>*> buffers,
                     std::initializer_list<std::size_t> non_negative = {}) {
  const Index k = static_cast<Index>(buffers.size());
  if (s.size() == 1 && s[0] == 0.0) {
    t = 0;
    for (auto* b : buffers) b->resize(0);
    return;
  }
  if (s.size() != 1 + k * p)
    throw ShapeError(cat(who, ": state has ", s.size(), " entries, expected ", 1 + k * p, " (1 + ", k, " x ",
                         p, " parameters)"));
  // SIZE_MAX + 1 (2^64 or 2^32) is exact in double; every integer-valued double below it fits size_t.
  constexpr double t_end = static_cast<double>(std::numeric_limits<std::size_t>::max()) + 1.0;
  if (!(s[0] >= 0.0 && s[0] < t_end) || s[0] != std::floor(s[0]))
    throw Error(cat(who, ": state step counter ", s[0], " is not an integer in [0, ", t_end, ")"));
  for (Index i = 1; i < s.size(); ++i) {
    if (!std::isfinite(s[i]))
      throw Error(cat(who, ": state entry ", i, " (buffer ", (i - 1) / std::max<Index>(p, 1), ", parameter ",
                      (i - 1) % std::max<Index>(p, 1), ") is ", s[i], ", not finite"));
    if (std::abs(s[i]) > static_cast<double>(std::numeric_limits<S>::max()))
      throw Error(cat(who, ": state entry ", i, " = ", s[i], " overflows the optimizer's scalar type"));
  }
  for (const std::size_t b : non_negative) {
    for (Index j = 0; j < p; ++j) {
      const double v = s[1 + static_cast<Index>(b) * p + j];
      if (v < 0)
        throw Error(cat(who, ": state entry ", 1 + static_cast<Index>(b) * p + j, " (buffer ", b,
                        ", parameter ", j, ") is ", v, ", but must be >= 0"));
    }
  }
  t = static_cast<std::size_t>(s[0]);
  Index o = 1;
  for (auto* b : buffers) {
    *b = s.segment(o, p).template cast<S>();
    o += p;
  }
}

/// [t, buffers…] as one Vector<double>; [0] before the first step.
template <class S>
Vector<double> save_flat_state(std::size_t t, std::initializer_list<const Vector<S>*> buffers) {
  Index n = 1;
  for (auto* b : buffers) n += b->size();
  Vector<double> s(n);
  s[0] = static_cast<double>(t);
  Index o = 1;
  for (auto* b : buffers) {
    s.segment(o, b->size()) = b->template cast<double>();
    o += b->size();
  }
  return s;
}

}  // namespace detail

/// Stochastic gradient descent with (heavy-ball or Nesterov) momentum and
/// coupled L2 weight decay (PyTorch `SGD` without dampening). Per parameter,
/// with g = ∂ℓ/∂θ, μ = momentum, λ = weight_decay:
///   d ← g + λ θ
///   v ← μ v + d                  (v = 0 before the first step, so v₁ = d)
///   θ ← θ − lr · v               (heavy ball)
///   θ ← θ − lr · (d + μ v)       (nesterov = true, with the updated v)
/// μ = 0 gives plain SGD. An aggregate: `Sgd<double>{.lr = 0.1, .momentum = 0.9}`.
template <class S>
struct Sgd {
  using scalar_type = S;

  double lr = 1e-2;
  double momentum = 0;
  double weight_decay = 0;
  bool nesterov = false;

  /// One step with the base rate `.lr`.
  template <Net N>
  void step(N& net) {
    step(net, lr);
  }
  /// One step with rate `step_lr` (for schedules; `.lr` is left unchanged).
  template <Net N>
  void step(N& net, double step_lr) {
    static_assert(std::is_same_v<typename N::scalar_type, S>, "Sgd<S>: network scalar type must be S");
    const Index p = num_parameters(net);
    if (state_.v.size() == 0)
      state_.v = Vector<S>::Zero(p);
    else
      detail::check_state_size("Sgd", state_.v.size(), p);
    const S a = static_cast<S>(step_lr), mu = static_cast<S>(momentum), wd = static_cast<S>(weight_decay);
    S* v = state_.v.data();
    detail::for_each_parameter(net, [&](S& th, S g, Index j) {
      const S d = g + wd * th;
      v[j] = mu * v[j] + d;
      th -= a * (nesterov ? d + mu * v[j] : v[j]);
    });
    ++state_.t;
    moonwalk::set_step(net, state_.t);  // the next step draws new dropout masks (core/step.hpp)
  }

  /// Steps taken so far (0 before the first).
  [[nodiscard]] std::size_t steps() const { return state_.t; }
  /// The velocity v (empty before the first step).
  [[nodiscard]] const Vector<S>& velocity() const { return state_.v; }

  /// Checkpoint state [t, v (P entries)]; [0] before the first step.
  [[nodiscard]] Vector<double> state() const {
    if (state_.v.size() == 0) return Vector<double>::Zero(1);
    return detail::save_flat_state<S>(state_.t, {&state_.v});
  }
  /// Restores `state()` for `net`; throws ShapeError unless it has 1 + P
  /// entries (P = num_parameters(net)) or is the never-stepped [0], and
  /// Error (nothing restored) when the step counter is not an integer in
  /// [0, 2^64) or an entry is not finite.
  template <Net N>
  void load_state(const N& net, const Vector<double>& s) {
    detail::load_flat_state<S>("Sgd", s, num_parameters(net), state_.t, {&state_.v});
  }
  /// Forgets the velocity and the step count.
  void reset() { state_ = {}; }

  /// Internal state; public only so that Sgd stays an aggregate (designated
  /// initialisers). Use steps(), velocity(), state() and load_state().
  struct State {
    std::size_t t = 0;
    Vector<S> v;
  } state_{};
};

/// Adam (Kingma & Ba) with bias correction and decoupled weight decay
/// (AdamW, Loshchilov & Hutter: the decay is applied to θ directly, scaled by
/// lr, and never enters the moments). Per parameter, with g = ∂ℓ/∂θ,
/// λ = weight_decay, t the step number (1 on the first step):
///   m ← β₁ m + (1 − β₁) g
///   v ← β₂ v + (1 − β₂) g²
///   m̂ = m / (1 − β₁ᵗ),  v̂ = v / (1 − β₂ᵗ)
///   θ ← θ − lr · λ · θ
///   θ ← θ − lr · m̂ / (√v̂ + ε)
/// An aggregate: `Adam<double>{.lr = 1e-3, .weight_decay = 1e-2}`.
template <class S>
struct Adam {
  using scalar_type = S;

  double lr = 1e-3;
  double beta1 = 0.9;
  double beta2 = 0.999;
  double eps = 1e-8;
  double weight_decay = 0;  ///< decoupled (AdamW-style), see above

  /// One step with the base rate `.lr`.
  template <Net N>
  void step(N& net) {
    step(net, lr);
  }
  /// One step with rate `step_lr` (for schedules; `.lr` is left unchanged).
  template <Net N>
  void step(N& net, double step_lr) {
    static_assert(std::is_same_v<typename N::scalar_type, S>, "Adam<S>: network scalar type must be S");
    if (!(beta1 >= 0 && beta1 < 1 && beta2 >= 0 && beta2 < 1))
      throw Error(detail::cat("Adam: betas must lie in [0, 1), got beta1 = ", beta1, ", beta2 = ", beta2));
    const Index p = num_parameters(net);
    if (state_.m.size() == 0) {
      state_.m = Vector<S>::Zero(p);
      state_.v = Vector<S>::Zero(p);
    } else {
      detail::check_state_size("Adam", state_.m.size(), p);
    }
    const std::size_t t = state_.t + 1;
    const S b1 = static_cast<S>(beta1), b2 = static_cast<S>(beta2), e = static_cast<S>(eps);
    const S a = static_cast<S>(step_lr), decay = static_cast<S>(step_lr * weight_decay);
    const S c1 = S(1) - static_cast<S>(std::pow(beta1, static_cast<double>(t)));  // 1 − β₁ᵗ
    const S c2 = S(1) - static_cast<S>(std::pow(beta2, static_cast<double>(t)));  // 1 − β₂ᵗ
    S* m = state_.m.data();
    S* v = state_.v.data();
    detail::for_each_parameter(net, [&](S& th, S g, Index j) {
      m[j] = b1 * m[j] + (S(1) - b1) * g;
      v[j] = b2 * v[j] + (S(1) - b2) * g * g;
      const S mh = m[j] / c1, vh = v[j] / c2;
      th -= decay * th;
      th -= a * mh / (std::sqrt(vh) + e);
    });
    state_.t = t;
    moonwalk::set_step(net, t);  // the next step draws new dropout masks (core/step.hpp)
  }

  /// Steps taken so far (0 before the first).
  [[nodiscard]] std::size_t steps() const { return state_.t; }
  /// First and second moment estimates m, v (empty before the first step).
  [[nodiscard]] const Vector<S>& first_moment() const { return state_.m; }
  [[nodiscard]] const Vector<S>& second_moment() const { return state_.v; }

  /// Checkpoint state [t, m (P entries), v (P entries)]; [0] before the first step.
  [[nodiscard]] Vector<double> state() const {
    if (state_.m.size() == 0) return Vector<double>::Zero(1);
    return detail::save_flat_state<S>(state_.t, {&state_.m, &state_.v});
  }
  /// Restores `state()` for `net`; throws ShapeError unless it has 1 + 2P
  /// entries (P = num_parameters(net)) or is the never-stepped [0], and
  /// Error (nothing restored) when the step counter is not an integer in
  /// [0, 2^64), an entry is not finite or a second moment is negative.
  template <Net N>
  void load_state(const N& net, const Vector<double>& s) {
    detail::load_flat_state<S>("Adam", s, num_parameters(net), state_.t, {&state_.m, &state_.v}, {1});
  }
  /// Forgets the moments and the step count.
  void reset() { state_ = {}; }

  /// Internal state; public only so that Adam stays an aggregate (designated
  /// initialisers). Use steps(), first_moment(), second_moment(), state() and
  /// load_state().
  struct State {
    std::size_t t = 0;
    Vector<S> m, v;
  } state_{};
};

/// Step decay: factor(s) = γ^⌊s / every⌋ (s = steps already taken, from 0).
/// Multiply the base rate by it: `opt.step(net, opt.lr * sched.factor(opt.steps()))`.
struct StepLR {
  std::size_t every = 1;
  double gamma = 0.1;

  [[nodiscard]] double factor(std::size_t step) const {
    if (every == 0) throw Error("StepLR: every must be positive");
    return std::pow(gamma, static_cast<double>(step / every));
  }
};

/// Cosine annealing from 1 to r = min_lr_ratio over T = total_steps:
///   factor(s) = r + (1 − r) · ½ (1 + cos(π · min(s, T) / T))
/// so factor(0) = 1, factor(T/2) = (1 + r)/2 and factor(s) = r for s ≥ T.
struct CosineLR {
  std::size_t total_steps = 1;
  double min_lr_ratio = 0;

  [[nodiscard]] double factor(std::size_t step) const {
    if (total_steps == 0) throw Error("CosineLR: total_steps must be positive");
    const double s = static_cast<double>(std::min(step, total_steps)) / static_cast<double>(total_steps);
    return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + std::cos(std::numbers::pi * s));
  }
};

}  // namespace moonwalk
