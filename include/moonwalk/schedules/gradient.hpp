// Moonwalk — the one entry point: gradient(schedule, net, x, loss, target).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>

#include "moonwalk/fidelity/tolerance.hpp"
#include "moonwalk/nets/network.hpp"
#include "moonwalk/nets/parameters.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/result.hpp"

namespace moonwalk {

/// A schedule is a policy object with a name and a `run` over a network.
template <class Sch, class N, class L>
concept ScheduleFor = Net<N> && requires(const Sch& s, N& net, const Matrix<typename N::scalar_type>& x,
                                         const L& loss, const typename L::target_type& t) {
  { s.name() } -> std::convertible_to<std::string>;
  { s.run(net, x, loss, t) } -> std::same_as<GradientResult<typename N::scalar_type>>;
};

/// A schedule that can fill a caller's result in place: `run_into` writes
/// what `run` returns into `out`, reusing its storage (the gradient, h_0,
/// the report's lists and maps).
template <class Sch, class N, class L>
concept ScheduleInto = ScheduleFor<Sch, N, L> &&
    requires(const Sch& s, N& net, const Matrix<typename N::scalar_type>& x, const L& loss,
             const typename L::target_type& t, GradientResult<typename N::scalar_type>& out) {
  s.run_into(net, x, loss, t, out);
};

namespace detail {
/// "<schedule>: network input", formatted only for an error message.
template <class Sch>
struct NetworkInputOf {
  const Sch& schedule;
  [[nodiscard]] std::string name() const { return cat(schedule.name(), ": network input"); }
};

template <class N, class Sch>
void check_gradient_input(const Sch& schedule, const N& net, const CRef<typename N::scalar_type>& x) {
  if (net.size() == 0) throw ShapeError(std::string(schedule.name()) + ": empty network");
  check_rows(NetworkInputOf<Sch>{schedule}, "batch", x, net.in_features());
}

/// ∂ℓ/∂θ as `out` asks for it (GradientResult::flat_gradient): copied from
/// the layers' storage into out.gradient, or out.gradient left empty.
template <Net N>
void flat_gradient_into(const N& net, GradientResult<typename N::scalar_type>& out) {
  if (out.flat_gradient)
    gradients_into(net, out.gradient);
  else
    out.gradient = Vector<typename N::scalar_type>();
}

/// A step whose loss is not finite has no gradient: ∂ℓ/∂θ (flat and in the
/// layers' storage) and h_0, when asked for (`with_h0`), are NaN; judge()
/// names the cause.
template <Net N>
void no_gradient(N& net, Index batch, GradientResult<typename N::scalar_type>& out, bool with_h0 = true) {
  using S = typename N::scalar_type;
  const S nan = std::numeric_limits<S>::quiet_NaN();
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](auto& l) {
      for (auto s : gradient_blocks(l)) std::fill(s.begin(), s.end(), nan);
    });
  flat_gradient_into(net, out);
  if (with_h0)
    out.h0.setConstant(net.in_features(), batch, nan);
  else
    out.h0.resize(0, 0);
}

/// The verdict every gradient carries, whatever its schedule:
///
///   within_tolerance ⇔ the schedule's own verdict ∧ ℓ, ∂ℓ/∂θ, h_0 finite
///                      ∧ error_estimate ≤ T
///
/// with T = stats.tolerance, or default_target<S>() where the schedule was
/// asked none (fidelity/tolerance.hpp); a NaN estimate is never within. A
/// stochastic estimate (is_estimate) is judged on finiteness only: its
/// error_estimate is the spread of an unbiased estimator, not a drift. A
/// non-finite result names its first cause in stats.non_finite (the input and
/// the parameters are looked at only then, so a finite step pays nothing).
template <Net N>
void judge(const N& net, const CRef<typename N::scalar_type>& x,
           GradientResult<typename N::scalar_type>& out) {
  using S = typename N::scalar_type;
  Stats& st = out.stats;
  const bool finite = std::isfinite(out.loss) &&
                      (out.flat_gradient ? out.gradient.allFinite() : gradients_finite(net)) &&
                      out.h0.allFinite();
  if (!finite) {
    st.non_finite = !x.allFinite()                      ? NonFinite::input
                    : !moonwalk::parameters_finite(net) ? NonFinite::parameters
                    : !std::isfinite(out.loss)          ? NonFinite::loss
                                                        : NonFinite::gradient;
    st.within_tolerance = false;
    return;
  }
  st.non_finite = NonFinite::none;
  if (st.is_estimate) return;
  const double tol = st.tolerance > 0 ? st.tolerance : default_target<S>();
  st.within_tolerance = st.within_tolerance && st.error_estimate <= tol;
}
}  // namespace detail

/// Runs `schedule` on `net` for input batch x (in_features × batch) and
/// `loss` against `target`; returns the loss, ∂ℓ/∂θ (flat, also left in the
/// layers' gradient storage), h_0 = ∂ℓ/∂x_0 where the schedule was asked for
/// it (GradientResult::h0) and the schedule's stats, with
/// the trust verdict (stats.within_tolerance, stats.non_finite: detail::judge).
template <Net N, class Sch, class L>
requires ScheduleFor<Sch, N, L> GradientResult<typename N::scalar_type> gradient(
    const Sch& schedule, N& net, const CRef<typename N::scalar_type>& x, const L& loss,
    const typename L::target_type& target) {
  detail::check_gradient_input(schedule, net, x);
  const std::uint64_t solves = detail::solver_iterations;
  GradientResult<typename N::scalar_type> out = schedule.run(net, x, loss, target);
  out.stats.counts.solver_iterations = static_cast<std::size_t>(detail::solver_iterations - solves);
  detail::judge(net, x, out);
  return out;
}

/// gradient(), written into `out`: the training-loop form. A result kept
/// across steps is filled again in place, so once a schedule's workspace and
/// `out` have seen a step on these shapes, a step of `Backprop` or
/// `MixedMoonwalk` allocates nothing (no gradient copy, no h_0, no report
/// strings; tests/alloc). Schedules without `run_into` assign a fresh result.
/// If it throws, `out` holds no meaningful result.
///
/// The last result's gradient and h_0 are freed before the step when they
/// cannot be reused: by a schedule without `run_into`, and where activations
/// outweigh the parameters, whose steps free their buffers with them
/// (schedules/detail/workspace.hpp). Held, they would sit under the step's
/// peak: +20 MiB at depth 64, width 256, batch 4096 (mixed, 82 MiB), and +40
/// MiB for RevBackprop on a 64-block RevNet (52 MiB).
template <Net N, class Sch, class L>
requires ScheduleFor<Sch, N, L>
void gradient_into(const Sch& schedule, N& net, const CRef<typename N::scalar_type>& x, const L& loss,
                   const typename L::target_type& target, GradientResult<typename N::scalar_type>& out) {
  using S = typename N::scalar_type;
  detail::check_gradient_input(schedule, net, x);
  constexpr bool in_place = ScheduleInto<Sch, N, L>;
  if (!in_place || !detail::keep_across_steps(net, x.cols())) {
    out.gradient = Vector<S>();
    out.h0 = Matrix<S>();
  }
  const std::uint64_t solves = detail::solver_iterations;
  if constexpr (in_place)
    schedule.run_into(net, x, loss, target, out);
  else {
    const bool flat = out.flat_gradient;
    out = schedule.run(net, x, loss, target);
    out.flat_gradient = flat;
    if (!flat) out.gradient = Vector<S>();
  }
  out.stats.counts.solver_iterations = static_cast<std::size_t>(detail::solver_iterations - solves);
  detail::judge(net, x, out);
}

namespace detail {

/// run() of a schedule that writes into a caller's result: its run_into on a fresh one.
template <class Sch, Net N, class L>
GradientResult<typename N::scalar_type> run_fresh(const Sch& schedule, N& net,
                                                  const CRef<typename N::scalar_type>& x0, const L& loss,
                                                  const typename L::target_type& target) {
  GradientResult<typename N::scalar_type> out;
  schedule.run_into(net, x0, loss, target, out);
  return out;
}

/// Calls f(i, layer_i) for i = 0..L−1.
template <Net N, class F>
void for_each_layer(N& net, F&& f) {
  for (std::size_t i = 0; i < net.size(); ++i) net.visit(i, [&](auto& l) { f(i, l); });
}

/// Calls f(i, layer_i) for i = L−1..0.
template <Net N, class F>
void for_each_layer_reverse(N& net, F&& f) {
  for (std::size_t i = net.size(); i-- > 0;) net.visit(i, [&](auto& l) { f(i, l); });
}

/// ℓ(y, t), with ∂ℓ/∂y written into g: the loss's value_and_gradient_into
/// when it has one (no allocation once g has its shape), else its
/// value_and_gradient.
template <class L, class S>
S loss_into(const L& loss, const CRef<S>& y, const typename L::target_type& t, Matrix<S>& g) {
  detail::safe_resize(g, y.rows(), y.cols());
  if constexpr (requires { loss.value_and_gradient_into(y, t, g); }) {
    return loss.value_and_gradient_into(y, t, g);
  } else {
    auto vg = loss.value_and_gradient(y, t);
    g = std::move(vg.second);
    return vg.first;
  }
}

/// x_L = f(x_0) keeping nothing; sets out.loss = ℓ(x_L) and returns g_L = ∂ℓ/∂x_L.
template <Net N, class L>
Matrix<typename N::scalar_type> output_cotangent(N& net, const CRef<typename N::scalar_type>& x0,
                                                 const L& loss, const typename L::target_type& target,
                                                 GradientResult<typename N::scalar_type>& out) {
  Matrix<typename N::scalar_type> x = x0;
  for_each_layer(net, [&](std::size_t, auto& l) {
    x = l.forward(x);
    ++out.stats.counts.forward;
  });
  auto vg = loss.value_and_gradient(x, target);
  out.loss = vg.first;
  return std::move(vg.second);
}

}  // namespace detail
}  // namespace moonwalk
