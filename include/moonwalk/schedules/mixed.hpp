// Moonwalk — mixed Moonwalk: a lean reverse pass for h_0, then the forward sweep.
#pragma once

#include <cmath>
#include <limits>
#include <memory>

#include "moonwalk/fidelity/policy.hpp"
#include "moonwalk/fidelity/retry.hpp"
#include "moonwalk/plan/executor.hpp"
#include "moonwalk/schedules/backprop.hpp"
#include "moonwalk/schedules/detail/sweep.hpp"

namespace moonwalk {

namespace detail {
/// Mixed Moonwalk's plan (moonwalk_plan) bound to the last step's shapes and
/// sweep modes, with its buffers: the workspace's one slot, kBoundPlan.
template <class S>
struct BoundMoonwalk {
  PlanRun<S> run;
  std::vector<Index> rows;
  std::vector<SweepMode> modes;         ///< this step's: how the sweep can cross each layer
  std::vector<bool> anchored;           ///< this step's: the layers MixedMoonwalk::anchors names
  std::vector<CotangentKeep> keep;      ///< the bound plan's
  std::vector<bool> rebuilt, branches;  ///< the bound plan's (moonwalk_plan)
  std::vector<CotangentKeep> now;       ///< this step's
  std::vector<bool> rebuilt_now, branches_now;
};
inline constexpr std::size_t kBoundPlan = 0;
}  // namespace detail

/// Reverse pass: x_i = f_i(x_{i−1}) keeping only each layer's residual (bit
/// masks for piecewise-linear activations, nothing for Linear, σ' for smooth
/// activations); then h_{i−1} = Jᵢᵀ h_i from the residual alone, saving the
/// cokernel fragment of h_i at fragmental layers and h_i itself at anchors.
/// Then the forward sweep recovers h_i and reads ∂ℓ/∂θ_i.
///
/// Anchors are the union of `anchors` (every-k / explicit), the layers that
/// are neither submersive nor fragmental, and — under the default fidelity
/// policy — the layers the error model picks so the predicted error stays
/// under the tolerance (fidelity/policy.hpp). The policy also escalates to
/// double cotangents when double would anchor for clearly less, and verifies
/// the a-posteriori estimate, recomputing (kept instead of rebuilt inputs when
/// the inversion drifted, denser anchors, then double cotangents, then
/// backprop) until it holds. A step on the shape (widths and batch) of a
/// previous step that ended in double starts in double, with no discarded
/// attempt (`Fidelity::memory`; figures["precision_remembered"]).
/// `Fidelity::none()` is the unguarded sweep.
///
/// With `rebuild_inputs`, an invertible layer keeps nothing at all in the
/// reverse pass (a LeakyReLU its branch bits): its input is rebuilt by
/// inversion, x_{i−1} = f_i⁻¹(x_i), walking down from the layer output kept
/// where the layer above cannot be inverted (RevBackprop-style). Inversion
/// drift reaches h_0 and so the end-of-sweep estimate;
/// `figures["reconstruction_error"]` is the mismatch of the rebuilt x_0
/// (when the first layer is invertible), in the same form as RevBackprop's.
///
/// Without `input_gradient` the reverse pass stops at h_1 = ∂ℓ/∂x_1, the
/// first layer's output cotangent, and the sweep starts from it: the first
/// layer keeps no residual and costs no input-vjp and no vijp (on an MLP whose
/// first layer is its widest, as on Fashion-MNIST's 784 → 256, most of the
/// step). With it, both passes run to h_0 and the result holds h_0 (GradientResult::h0).
///
/// An attempt is Moonwalk's plan (moonwalk_plan: residuals, or inputs
/// rebuilt by inversion, cotangent steps keeping the anchors of `anchors`
/// and the fragments and anchors the layers' sweep modes need) run by the
/// executor (plan/executor.hpp), which places the policy's anchors.
struct MixedMoonwalk {
  Anchors anchors{};
  Fidelity fidelity{};
  bool rebuild_inputs = false;
  /// Also return h_0 = ∂ℓ/∂x_0 (struct comment).
  bool input_gradient = false;
  /// Buffers kept across steps, shared by copies (schedules/detail/workspace.hpp):
  /// the working activations and cotangents, residuals and anchor buffers.
  std::shared_ptr<detail::SharedWorkspace> workspace = detail::new_workspace();

  [[nodiscard]] static std::string name() { return "mixed"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    return detail::run_fresh(*this, net, x0, loss, target);
  }

  /// run(), written into `out` (gradient_into): reusing its storage and the
  /// workspace, a step on the shapes of the last one allocates nothing.
  template <Net N, class L>
  void run_into(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                const typename L::target_type& target, GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    const double tol = fidelity.target<S>();
    const bool can_double = detail::double_possible<N> && detail::castable_to_double(net);
    bool use_double = fidelity.precision == Precision::double_cotangents;
    if (use_double && !can_double && !std::is_same_v<S, double>)
      throw ScheduleError("mixed: double cotangents asked for, but a layer offers no cast<double>()");
    std::size_t peak = 0, working = 0;
    const detail::WorkspaceLease ws(workspace);
    const bool keep = detail::keep_across_steps(net, x0.cols());
    // The precision the last step on this shape ended in (not while inputs are rebuilt).
    const bool remember = fidelity.memory && fidelity.precision == Precision::automatic && can_double &&
                          fidelity.tolerance_anchors && !rebuild_inputs;
    const std::uint64_t shape = remember ? detail::shape_key(net, x0.cols(), 0) : 0;
    const bool remembered = remember && !use_double && fidelity.memory->starts_in_double(shape);
    use_double = use_double || remembered;
    const bool finite_input = x0.allFinite();
    // The attempts' settings and the decisions between them (fidelity/retry.hpp).
    FidelityRetry retry(RetrySetup{
        .tolerance = tol,
        .verify = fidelity.verify,
        .accept = fidelity.accept,
        .margin = fidelity.margin,
        .can_escalate = can_double && fidelity.precision != Precision::working,
        .early_escalation = fidelity.precision == Precision::automatic && fidelity.tolerance_anchors,
        .start_in_double = use_double,
        .rebuild_inputs = rebuild_inputs,
        .moves = {.densify_anchors = fidelity.tolerance_anchors},
    });
    for (;;) {
      const AttemptSettings& a = retry.settings();
      AttemptOutcome outcome;
      if constexpr (detail::double_possible<N>) {
        if (a.in_double)
          outcome = attempt<double>(net, *ws, keep, x0, loss, target, a, out);
        else
          outcome = attempt<S>(net, *ws, keep, x0, loss, target, a, out);
      } else {
        outcome = attempt<S>(net, *ws, keep, x0, loss, target, a, out);
      }
      peak = std::max(peak, out.stats.residual_bytes);
      working = std::max(working, out.stats.working_bytes);
      // A non-finite input or loss is no rounding that denser anchors, double
      // cotangents or backprop could repair: the step returns it as it is
      // (gradient() reports it, Stats::non_finite).
      outcome.finite = finite_input && std::isfinite(out.loss);
      const Retry next = retry.after(outcome);
      if (next == Retry::accept) break;
      if (next == Retry::backprop) {
        // Last resort: reference backprop cannot drift.
        Backprop{.input_gradient = input_gradient}.run_into(net, x0, loss, target, out);
        out.stats.schedule = name();
        out.stats.precision = "backprop";
        out.stats.figures["backprop_fallback"] = 1;
        peak = std::max(peak, out.stats.residual_bytes);
        working = std::max(working, out.stats.working_bytes);
        break;
      }
      if (outcome.gave_up_for_double) {  // the discarded attempt's buffers and factorisations
        ws->get<detail::BoundMoonwalk<S>>(detail::kBoundPlan).run.template release_carried<S>();
        if (!keep) detail::release_derived(net);
      }
    }
    use_double = retry.settings().in_double;
    const std::size_t fallbacks = retry.fallbacks();
    if (remember) fidelity.memory->settled(shape, use_double);
    // Keep the buffers of the precision this step ended in (an escalated
    // float attempt's are not held until the next float probe), and only
    // where the workspace may outlive the step.
    if (!keep) {
      // Nothing parameter-sized outlives the step: the next step's weights
      // are new in training, and refactorising costs little next to the
      // activation-sized products of this regime.
      ws->get<detail::BoundMoonwalk<S>>(detail::kBoundPlan).run.release();
      detail::release_derived(net);
    } else if constexpr (!std::is_same_v<S, double>) {
      auto& bound = ws->get<detail::BoundMoonwalk<S>>(detail::kBoundPlan).run;
      if (use_double)
        bound.template release_carried<S>();
      else
        bound.template release_carried<double>();
    }
    detail::flat_gradient_into(net, out);  // (after the workspace is given back)
    if (!std::isfinite(out.loss)) detail::no_gradient(net, x0.cols(), out, input_gradient);
    Stats& st = out.stats;
    if (remembered) st.figures["precision_remembered"] = 1;
    st.tolerance = tol;
    st.within_tolerance = st.error_estimate <= (fidelity.verify ? fidelity.accept : 1.0) * tol;
    st.fallbacks = fallbacks;
    st.residual_bytes = peak;
    st.working_bytes = working;
  }

 private:
  /// One gradient with cotangents in C (`settings.in_double` says which was
  /// asked for), written into `out`, and how it ended: Moonwalk's plan run by
  /// the executor, with invertible layers' inputs rebuilt where
  /// `settings.rebuild_inputs` says, the policy's anchors for the tolerance
  /// (`settings.anchor_scale` multiplies the calibration constant) and, with
  /// `settings.may_give_up_for_double`, the early escalation (fidelity/policy.hpp).
  template <class C, Net N, class L>
  AttemptOutcome attempt(N& net, detail::Workspace& ws, bool keep, const CRef<typename N::scalar_type>& x0,
                         const L& loss, const typename L::target_type& target,
                         const AttemptSettings& settings,
                         GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    Stats& st = out.stats;
    st.restart();
    st.schedule = name();
    st.precision = detail::scalar_name<C>();
    const std::size_t n = net.size();
    // How the sweep crosses each layer: an anchor where `anchors` asks or the
    // layer has neither vijp nor fragment, a fragment where it has one.
    auto& b = ws.get<detail::BoundMoonwalk<S>>(detail::kBoundPlan);
    detail::sweep_modes_into(net, b.modes);
    anchors.mask_into(n, b.anchored);
    b.now.resize(n);
    std::size_t forced = 0;  // anchors the sweep modes force (of crossed layers)
    for (std::size_t i = 0; i < n; ++i) {
      const SweepMode m = b.modes[i];
      b.now[i] = b.anchored[i] || m == SweepMode::anchor ? CotangentKeep::anchor
                 : m == SweepMode::fragment              ? CotangentKeep::fragment
                                                         : CotangentKeep::none;
      forced += m == SweepMode::anchor && (i > 0 || input_gradient);
    }
    // Which layers' inputs are rebuilt by inversion, and of those which keep their branch bits.
    b.rebuilt_now.assign(n, false);
    b.branches_now.assign(n, false);
    if (settings.rebuild_inputs)
      for (std::size_t i = 0; i < n; ++i)
        net.visit(i, [&](const auto& l) {
          b.rebuilt_now[i] = can_invert(l);
          b.branches_now[i] = b.rebuilt_now[i] && keeps_branches(l);
        });
    value_rows_into(net, b.rows);
    if (!b.run.bound_to(b.rows, x0.cols(), input_gradient) || b.now != b.keep || b.rebuilt_now != b.rebuilt ||
        b.branches_now != b.branches) {
      b.keep = b.now;
      b.rebuilt = b.rebuilt_now;
      b.branches = b.branches_now;
      b.run.bind(moonwalk_plan(b.keep, n, input_gradient, b.rebuilt, b.branches), b.rows, x0.cols(),
                 input_gradient, /*allocate=*/false);  // (the run sizes what its precision needs)
    }
    b.run.keep_across_runs(keep);
    zero_gradients(net);
    const RunFidelity rf{
        .budget = fidelity.tolerance_anchors ? fidelity.margin * fidelity.target<S>() : 0,
        .calibration = fidelity.calibration * settings.anchor_scale,
        .may_give_up_for_double = settings.may_give_up_for_double,
    };
    const AttemptOutcome outcome = b.run.template run<C>(net, x0, loss, target, out, rf);
    if (outcome.gave_up_for_double) return outcome;
    if (b.rebuilt[0] && outcome.drift) st.figures["reconstruction_error"] = *outcome.drift;
    st.figures["anchors"] = static_cast<double>(st.anchor_layers.size());
    st.figures["fallback_anchors"] = static_cast<double>(forced);
    return outcome;
  }
};

}  // namespace moonwalk
