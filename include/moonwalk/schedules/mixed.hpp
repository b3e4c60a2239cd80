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
/// sweep modes, with its buffers; in the workspace at kBoundPlan.
template <class S>
struct BoundMoonwalk {
  PlanRun<S> run;
  std::vector<Index> rows;
  std::vector<CotangentKeep> keep;  ///< the bound plan's
  std::vector<CotangentKeep> now;   ///< this step's
};
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
/// reverse pass: its input is rebuilt by inversion, x_{i−1} = f_i⁻¹(x_i),
/// walking down from x_L (RevBackprop-style; a layer output is kept only
/// where the layer above cannot be inverted). Inversion drift reaches h_0 and
/// so the end-of-sweep estimate; `figures["reconstruction_error"]` is the
/// mismatch of the rebuilt x_0, in the same form as RevBackprop's.
///
/// Without `input_gradient` the reverse pass stops at h_1 = ∂ℓ/∂x_1, the
/// first layer's output cotangent, and the sweep starts from it: the first
/// layer keeps no residual and costs no input-vjp and no vijp (on an MLP whose
/// first layer is its widest, as on Fashion-MNIST's 784 → 256, most of the
/// step). With it, both passes run to h_0 and the result holds h_0 (GradientResult::h0).
///
/// Without `rebuild_inputs` an attempt is Moonwalk's plan (moonwalk_plan:
/// every layer's residual, cotangent steps keeping the anchors of `anchors`
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
    // Layers cast for double cotangents: once per gradient, shared by every
    // attempt, and kept (refreshed in place each step) where the workspace is.
    detail::CastLayers<double> local_casts;
    detail::CastLayers<double>& cast_double =
        keep ? ws->get<detail::CastLayers<double>>(detail::kCasts) : local_casts;
    cast_double.restart(net.size(), keep);
    detail::CastLayers<S> own(0);
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
      if (!a.rebuild_inputs) {
        if constexpr (detail::double_possible<N>) {
          if (a.in_double)
            outcome = planned_attempt<double>(net, *ws, keep, x0, loss, target, a, out);
          else
            outcome = planned_attempt<S>(net, *ws, keep, x0, loss, target, a, out);
        } else {
          outcome = planned_attempt<S>(net, *ws, keep, x0, loss, target, a, out);
        }
      } else if constexpr (detail::double_possible<N>) {
        if (a.in_double)
          outcome = attempt<double>(net, cast_double, *ws, keep, x0, loss, target, a, out);
        else
          outcome = attempt<S>(net, own, *ws, keep, x0, loss, target, a, out);
      } else {
        outcome = attempt<S>(net, own, *ws, keep, x0, loss, target, a, out);
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
        detail::release_cotangent_buffers<S>(*ws, net.size());
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
      ws->clear_except({detail::kNames, detail::kStore, detail::kPlan, detail::kBoundPlan});
      ws->get<detail::BoundMoonwalk<S>>(detail::kBoundPlan).run.release();
      detail::release_derived(net);
    } else if constexpr (!std::is_same_v<S, double>) {
      auto& bound = ws->get<detail::BoundMoonwalk<S>>(detail::kBoundPlan).run;
      if (use_double) {
        detail::release_cotangent_buffers<S>(*ws, net.size());
        bound.template release_carried<S>();
      } else {
        detail::release_cotangent_buffers<double>(*ws, net.size());
        bound.template release_carried<double>();
      }
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
  /// the executor, with the policy's anchors for the tolerance
  /// (`settings.anchor_scale` multiplies the calibration constant) and, with
  /// `settings.may_give_up_for_double`, the early escalation (fidelity/policy.hpp).
  template <class C, Net N, class L>
  AttemptOutcome planned_attempt(N& net, detail::Workspace& ws, bool keep,
                                 const CRef<typename N::scalar_type>& x0, const L& loss,
                                 const typename L::target_type& target, const AttemptSettings& settings,
                                 GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    Stats& st = out.stats;
    st.restart();
    st.schedule = name();
    st.precision = detail::scalar_name<C>();
    const std::size_t n = net.size();
    // How the sweep crosses each layer: an anchor where `anchors` asks or the
    // layer has neither vijp nor fragment, a fragment where it has one.
    detail::StepPlan& step = ws.get<detail::StepPlan>(detail::kPlan);
    detail::sweep_modes_into(net, step.modes);
    anchors.mask_into(n, step.anchored);
    auto& b = ws.get<detail::BoundMoonwalk<S>>(detail::kBoundPlan);
    b.now.resize(n);
    std::size_t forced = 0;  // anchors the sweep modes force (of crossed layers)
    for (std::size_t i = 0; i < n; ++i) {
      const SweepMode m = step.modes[i];
      b.now[i] = step.anchored[i] || m == SweepMode::anchor ? CotangentKeep::anchor
                 : m == SweepMode::fragment                 ? CotangentKeep::fragment
                                                            : CotangentKeep::none;
      forced += m == SweepMode::anchor && (i > 0 || input_gradient);
    }
    value_rows_into(net, b.rows);
    if (!b.run.bound_to(b.rows, x0.cols(), input_gradient) || b.now != b.keep) {
      b.keep = b.now;
      b.run.bind(moonwalk_plan(b.keep, n, input_gradient), b.rows, x0.cols(), input_gradient);
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
    st.figures["anchors"] = static_cast<double>(st.anchor_layers.size());
    st.figures["fallback_anchors"] = static_cast<double>(forced);
    return outcome;
  }

  /// One gradient with cotangents in C, with invertible layers' inputs
  /// rebuilt by inversion (`settings.rebuild_inputs`), written into `out`,
  /// and how it ended (fidelity/retry.hpp): `settings.anchor_scale`
  /// multiplies the calibration constant, and with
  /// `settings.may_give_up_for_double` the reverse pass stops as soon as
  /// double cotangents would clearly anchor for less (fidelity/policy.hpp).
  template <class C, Net N, class L>
  AttemptOutcome attempt(N& net, detail::CastLayers<C>& casts, detail::Workspace& ws, bool keep,
                         const CRef<typename N::scalar_type>& x0, const L& loss,
                         const typename L::target_type& target, const AttemptSettings& settings,
                         GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    const double scale = settings.anchor_scale;
    const bool rebuild = settings.rebuild_inputs;
    const bool escalate = settings.may_give_up_for_double;
    AttemptOutcome outcome;
    Stats& st = out.stats;
    st.restart();
    st.schedule = name();
    st.precision = detail::scalar_name<C>();
    detail::StepPlan& plan = ws.get<detail::StepPlan>(detail::kPlan);
    detail::sweep_modes_into(net, plan.modes);
    const std::vector<SweepMode>& modes = plan.modes;
    anchors.mask_into(net.size(), plan.anchored);
    const std::vector<bool>& anchored = plan.anchored;
    SavedStore& store = ws.get<SavedStore>(detail::kStore);
    store.restart(net.size());
    detail::LayerNames& names = ws.get<detail::LayerNames>(detail::kNames);
    // Layer i's anchor, when it has one (its storage from the pool kAnchors).
    std::vector<Matrix<C>>& held_anchors = ws.get<std::vector<Matrix<C>>>(detail::held_anchors_slot<C>);
    held_anchors.resize(net.size());
    zero_gradients(net);

    const double uc = unit_roundoff<C>() * fidelity.calibration * scale;
    const double budget = fidelity.margin * fidelity.target<S>();
    detail::AnchorPlanner planner(fidelity.tolerance_anchors ? budget / uc : 0);
    // What double cotangents would anchor (escalation, fidelity/policy.hpp).
    detail::AnchorPlanner in_double(budget / (unit_roundoff<double>() * fidelity.calibration * scale));
    std::size_t anchor_bytes = 0, double_anchor_bytes = 0;
    std::size_t backprop_bytes = 0;  // what backprop keeps: every layer input
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        backprop_bytes += static_cast<std::size_t>(l.in_features() * x0.cols()) * sizeof(S);
      });

    // Which layers rebuild their input by inversion instead of keeping a residual.
    // Of those, the piecewise-linear ones keep their branch bits from this
    // forward half (one bit per element): re-derived from a rebuilt input, a
    // branch can flip where the forward pass sat exactly on a kink.
    std::vector<bool>& rebuilt = plan.rebuilt;
    std::vector<bool>& branches_kept = plan.branches_kept;
    rebuilt.assign(net.size(), false);
    branches_kept.assign(net.size(), false);
    if (rebuild)
      for (std::size_t i = 0; i < net.size(); ++i)
        net.visit(i, [&](const auto& l) {
          rebuilt[i] = can_invert(l);
          branches_kept[i] = rebuilt[i] && keeps_branches(l);
        });

    // Reverse pass, forward half: keep residuals only (and, for rebuilt
    // layers, their output where nothing above can give it back). Layer i
    // reads x_i from one workspace buffer and writes x_{i+1} to the other;
    // its residual is the workspace's too, held in the store's accounts.
    constexpr std::size_t c = detail::precision_offset<C>;
    const Index batch = x0.cols();
    detail::PingPong<S> x = detail::activation_buffers<S>(ws);
    detail::Buffer<C>& xbuf = ws.get<detail::Buffer<C>>(detail::kXc + c);
    // The reverse pass crosses layer i (needs its residual) for i ≥ 1, and the
    // first layer only when h_0 is asked for.
    const auto crossed = [&](std::size_t i) { return i > 0 || input_gradient; };
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      // Layer i's input: x_0 itself for the first layer (no copy), else the last output.
      const CRef<S> xi = i == 0 ? CRef<S>(x0) : CRef<S>(x.current());
      if ((!rebuilt[i] || branches_kept[i]) && crossed(i)) {
        decltype(auto) lc = casts(i, l);
        auto& r = ws.get<residual_t<std::remove_cvref_t<decltype(lc)>>>(detail::residual_slot<C>(i));
        moonwalk::save_residual_into(lc, detail::in_scalar<C>(xi, xbuf), r);
        store.hold(i, SavedStore::residual, names(i, l), nbytes(r), residual_kind(r));
        // Only the residual waits for the backward half, not the cast: a
        // double Linear cast is 1 MiB at width 256 (W and its gradient
        // storage), and held from here to the backward half the casts of all
        // layers were the bulk of the peak. The backward half casts again.
        casts.release(i);
      }
      moonwalk::forward_into(l, xi, x.next(l.out_features(), batch));
      x.flip();
      ++st.counts.forward;
      if (rebuilt[i] && (i + 1 == net.size() || !rebuilt[i + 1]))
        store.put(i, SavedStore::activation, names(i, l), Matrix<S>(x.current()), "checkpoint");
    });
    // Casts held outside the workspace (a step whose buffers do not outlive it).
    const detail::CastLayers<C>* own_casts = keep ? nullptr : &casts;
    Matrix<S>& g_out = ws.get<Matrix<S>>(detail::kLossGrad);
    out.loss = detail::loss_into<L, S>(loss, x.current(), target, g_out);
    detail::note_working_bytes(st, ws, store, own_casts);
    if (!std::isfinite(out.loss)) {  // (no gradient to recover: run_into stops)
      store.report_to(st);
      outcome.finite = false;
      return outcome;
    }
    detail::PingPong<C> h = detail::cotangent_buffers<C>(ws);
    h.assign(g_out.template cast<C>());
    if (!keep) {  // (the backward half holds the anchors: no idle activation buffers next to them)
      ws.release(detail::kXEven);
      ws.release(detail::kXOdd);
      ws.release(detail::kXc + c);
    }

    // Residual bytes now, and what they would be in double (masks and
    // nothing stay; derivatives and kept inputs double), for escalation.
    const std::size_t residual_bytes = store.current_bytes();
    const std::size_t double_residual_bytes =
        residual_bytes +
        (sizeof(double) / sizeof(C) - 1) *
            (store.bytes_put("derivative") + store.bytes_put("activation") + store.bytes_put("checkpoint"));

    // Reverse pass, backward half: h_{i−1} = Jᵢᵀ h_i; fragments and anchors.
    std::size_t n_fallback = 0;
    bool gave_up = false;
    Matrix<S> x_carried;  // x_i rebuilt by inversion, when the layer above was rebuilt
    st.amplification.resize(net.size());
    // Layer i's input x_i rebuilt by inversion from x_{i+1} (held or carried).
    const auto rebuild_input = [&](std::size_t i, const auto& l) {
      Matrix<S> y = store.has(i, SavedStore::activation) ? store.take<Matrix<S>>(i, SavedStore::activation)
                                                         : std::move(x_carried);
      x_carried = l.inverse(y);
      ++st.counts.inverse;
    };
    detail::for_each_layer_reverse(net, [&](std::size_t i, auto& l) {
      if (gave_up) return;
      using Lyr = std::remove_cvref_t<decltype(l)>;
      if (!crossed(i)) {  // the sweep starts from h_1: nothing to cross here
        // (Layer 0's input is rebuilt all the same: the drift check at x_0.)
        if constexpr (Invertible<Lyr>)
          if (rebuilt[i]) rebuild_input(i, l);
        LayerFidelity& lf = st.amplification[i];
        lf.layer = i;
        lf.layer_name = names(i, l);
        lf.known = false;
        lf.anchored = false;
        return;
      }
      decltype(auto) lc = casts(i, l);
      using Lc = std::remove_cvref_t<decltype(lc)>;
      residual_t<Lc>& r = ws.get<residual_t<Lc>>(detail::residual_slot<C>(i));
      if constexpr (Invertible<Lyr>) {
        if (rebuilt[i]) {
          rebuild_input(i, l);
          if (!branches_kept[i])
            moonwalk::save_residual_into(
                lc, detail::in_scalar<C>(x_carried, ws.get<detail::Buffer<C>>(detail::kXc + c)), r);
        }
      }
      if (!rebuilt[i] || branches_kept[i]) store.drop(i, SavedStore::residual);
      // The fidelity policy: amplification of this layer's vijp, and whether h_i is anchored.
      LayerFidelity& lf = st.amplification[i];
      lf.layer = i;
      lf.anchored = false;
      if (fidelity.tolerance_anchors) {
        lf.layer_name = names(i, l);
        const Amplification a = moonwalk::amplification(lc, r);
        lf.bound = a.bound;
        lf.typical = a.typical;
        lf.known = a.known;
      } else {
        lf.known = false;
      }
      const bool forced = anchored[i] || modes[i] == SweepMode::anchor;
      bool anchor = forced;
      const std::size_t h_size = static_cast<std::size_t>(l.out_features() * batch);
      if (forced) {
        planner.restart();
        in_double.restart();
        double_anchor_bytes += h_size * sizeof(double);
      } else if (fidelity.tolerance_anchors) {
        anchor = planner.place(lf.typical);
        if (escalate && in_double.place(lf.typical)) double_anchor_bytes += h_size * sizeof(double);
      }
      if (anchor) {
        anchor_bytes += h_size * sizeof(C);
        if (escalate && residual_bytes + anchor_bytes > backprop_bytes / 8 &&
            residual_bytes + anchor_bytes > 2 * (double_residual_bytes + double_anchor_bytes)) {
          gave_up = true;
          return;
        }
        Matrix<C>& a = held_anchors[i];
        if (a.size() == 0) a = ws.take_spare<Matrix<C>>(detail::kAnchors + c);
        detail::safe_resize(a, h.current().rows(), h.current().cols());
        a = h.current();
        store.hold(i, SavedStore::anchor, names(i, l), static_cast<std::size_t>(a.size()) * sizeof(C),
                   "anchor");
        st.anchor_layers.insert(st.anchor_layers.begin(), i);
        lf.anchored = true;
        n_fallback += modes[i] == SweepMode::anchor;
      } else if (modes[i] == SweepMode::fragment) {
        if constexpr (Fragmental<Lc>)
          store.put(i, SavedStore::fragment, names(i, l), lc.save_fragment(r, h.current()));
      }
      moonwalk::vjp_residual_into(lc, r, h.current(), h.next(l.in_features(), batch));
      detail::note_working_bytes(st, ws, store, own_casts,
                                 static_cast<std::size_t>(x_carried.size()) * sizeof(S));
      h.flip();
      // r's last use: a step whose buffers will not outlive it frees it now,
      // and what the layer derived from its weights (the sweep derives it
      // again: held between the passes, the factorisations of every float
      // Linear were 16 MiB of the depth-64 peak at width 256).
      if (!keep) {
        ws.release(detail::residual_slot<C>(i));
        moonwalk::release_derived(l);
      }
      ++st.counts.vjp;
      // A cast layer is rebuilt for the sweep, not held between the passes:
      // a double Linear cast with its QR and gradient storage is ~6× the
      // float parameters, 1.5 MiB per width-256 layer, more than the
      // activation backprop keeps at batch 1024 (1 MiB). Refactorising costs
      // ~in·out² flops against the step's ~7·in·out·B (+2% at B = 1024).
      // Where the workspace outlives the step, the casts stay (release is a
      // no-op there).
      casts.release(i);
    });
    if (gave_up) {
      store.report_to(st);
      outcome.gave_up_for_double = true;
      return outcome;
    }
    if (rebuilt[0]) {
      outcome.drift = detail::rel_max_err(x_carried, x0);
      st.figures["reconstruction_error"] = *outcome.drift;
    }
    if (input_gradient)
      out.h0 = h.current().template cast<S>();
    else
      out.h0.resize(0, 0);
    if (!fidelity.tolerance_anchors) st.amplification.clear();
    st.predicted_error = planner.worst() * uc;

    st.error_estimate = detail::forward_sweep<C>(net, casts, keep, ws, keep, x0, h, !input_gradient, store,
                                                 modes, loss, target, st);
    // The sweep gave every anchor buffer back: keep as many as this step used.
    auto& pool = ws.get<std::vector<Matrix<C>>>(detail::kAnchors + c);
    if (pool.size() > st.anchor_layers.size()) pool.resize(st.anchor_layers.size());
    st.figures["anchors"] = static_cast<double>(st.anchor_layers.size());
    st.figures["fallback_anchors"] = static_cast<double>(n_fallback);
    // (out.gradient is copied by run_into(), from the accepted attempt only.)
    store.report_to(st);
    outcome.estimate = st.error_estimate;
    return outcome;
  }
};

}  // namespace moonwalk
