// Moonwalk — pure-forward Moonwalk: h_0 by forward-mode jvps, then the forward sweep.
#pragma once

#include <cmath>
#include <sstream>

#include "moonwalk/fidelity/policy.hpp"
#include "moonwalk/fidelity/retry.hpp"
#include "moonwalk/plan/executor.hpp"
#include "moonwalk/schedules/detail/sweep.hpp"

namespace moonwalk {

namespace detail {
template <class L>
struct sweep_capable : std::bool_constant<SweepCapable<L>> {};
}  // namespace detail

/// No reverse pass. h_0 = ∂ℓ/∂x_0 by n_0 forward-mode jvp passes (one per
/// input feature, all batch columns together); at each fragmental layer i,
/// h_{i+1} by n_{i+1} jvp passes of the tail, of which only the fragment is
/// kept. Then the sweep. The plan is pure_moonwalk_plan (plan/plan.hpp), run
/// by the executor (plan/executor.hpp).
/// Every layer must be submersive or fragmental (there is nothing to anchor
/// from): a compile-time error for Sequential, ScheduleError for Network; and
/// no layer may couple the samples of its batch (core/step.hpp; ScheduleError).
struct PureMoonwalk {
  /// Default: verify, escalating a float network's cotangents to double when
  /// the estimate is above the tolerance (no anchors: there is no reverse pass);
  /// a later step on the same shape starts in double (Fidelity::memory).
  Fidelity fidelity{};

  [[nodiscard]] static std::string name() { return "pure"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    if constexpr (N::is_static)
      static_assert(
          N::template all_layers<detail::sweep_capable>,
          "Moonwalk: PureMoonwalk needs every layer to be Submersive or Fragmental; a layer with "
          "neither has no reverse pass to anchor from under pure-forward Moonwalk: use MixedMoonwalk");
    const std::vector<SweepMode> modes = detail::sweep_modes(net);
    for (std::size_t i = 0; i < net.size(); ++i)
      if (modes[i] == SweepMode::anchor) {
        std::ostringstream s;
        net.visit(i, [&](const auto& l) { s << "pure: layer " << i << " " << l.name(); });
        s << " is neither submersive nor fragmental; pure-forward Moonwalk cannot cross it (use mixed)";
        throw ScheduleError(s.str());
      }
    // A tangent e_k set in every column is one pass for the whole batch only
    // while the samples do not interact.
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        if (moonwalk::couples_batch(l))
          throw ScheduleError(
              detail::cat("pure: layer ", i, " ", l.name(),
                          " couples the samples of its batch (BatchNorm in training); pure-forward "
                          "Moonwalk's batched tangents would mix them (use mixed)"));
      });

    // Working precision, then (float networks) double cotangents; the
    // estimate is always reported, and `within_tolerance` says whether the
    // returned gradient holds the tolerance (pure-forward has no reverse pass
    // to anchor from, so nothing else can be done).
    const double tol = fidelity.target<S>();
    bool use_double = fidelity.precision == Precision::double_cotangents;
    const bool can_double = detail::double_possible<N> && detail::castable_to_double(net);
    if (use_double && !can_double && !std::is_same_v<S, double>)
      throw ScheduleError("pure: double cotangents asked for, but a layer offers no cast<double>()");
    std::size_t peak = 0, working = 0;
    // The precision the last step on this shape ended in (Fidelity::memory).
    const bool remember =
        fidelity.memory && fidelity.precision == Precision::automatic && can_double && fidelity.verify;
    const std::uint64_t shape = remember ? detail::shape_key(net, x0.cols(), 1) : 0;
    const bool remembered = remember && !use_double && fidelity.memory->starts_in_double(shape);
    use_double = use_double || remembered;
    // Its one move is double cotangents (fidelity/retry.hpp), and it accepts
    // an estimate up to the tolerance itself: there is nothing to fall back on.
    FidelityRetry retry(RetrySetup{
        .tolerance = tol,
        .verify = fidelity.verify,
        .accept = 1,
        .can_escalate = can_double && fidelity.precision != Precision::working,
        .start_in_double = use_double,
        .moves = {.densify_anchors = false, .keep_inputs = false, .backprop = false},
    });
    // The plan, bound once for the step's attempts (its buffers are not kept
    // across steps: the tail jvps dominate pure Moonwalk's cost).
    std::vector<CotangentKeep> keep(modes.size(), CotangentKeep::none);
    for (std::size_t i = 0; i < modes.size(); ++i)
      if (modes[i] == SweepMode::fragment) keep[i] = CotangentKeep::fragment;
    PlanRun<S> plan;
    plan.bind(pure_moonwalk_plan(keep), value_rows(net), x0.cols(), /*input_gradient=*/true,
              /*allocate=*/false);
    GradientResult<S> out;
    for (;;) {
      if constexpr (detail::double_possible<N>)
        out = retry.settings().in_double ? attempt<double>(net, plan, x0, loss, target)
                                         : attempt<S>(net, plan, x0, loss, target);
      else
        out = attempt<S>(net, plan, x0, loss, target);
      peak = std::max(peak, out.stats.residual_bytes);
      working = std::max(working, out.stats.working_bytes);
      // (A non-finite loss is no rounding double cotangents could repair.)
      if (retry.after({.finite = std::isfinite(out.loss), .estimate = out.stats.error_estimate}) ==
          Retry::accept)
        break;
      if (!std::is_same_v<S, double> && retry.settings().in_double) plan.template release_carried<S>();
    }
    use_double = retry.settings().in_double;
    const std::size_t fallbacks = retry.fallbacks();
    if (remember) fidelity.memory->settled(shape, use_double);
    if (remembered) out.stats.figures["precision_remembered"] = 1;
    out.stats.tolerance = tol;
    out.stats.within_tolerance = out.stats.error_estimate <= tol;
    out.stats.fallbacks = fallbacks;
    out.stats.residual_bytes = peak;
    out.stats.working_bytes = working;
    return out;
  }

 private:
  /// One gradient with cotangents in C: the bound plan run by the executor.
  template <class C, Net N, class L>
  GradientResult<typename N::scalar_type> attempt(N& net, PlanRun<typename N::scalar_type>& plan,
                                                  const CRef<typename N::scalar_type>& x0, const L& loss,
                                                  const typename L::target_type& target) const {
    GradientResult<typename N::scalar_type> out;
    out.stats.schedule = name();
    out.stats.precision = detail::scalar_name<C>();
    zero_gradients(net);
    (void)plan.template run<C>(net, x0, loss, target, out);
    if (!std::isfinite(out.loss)) {  // (no gradient to recover: the run stopped)
      detail::no_gradient(net, x0.cols(), out);
      return out;
    }
    out.gradient = get_gradients(net);
    return out;
  }
};

}  // namespace moonwalk
