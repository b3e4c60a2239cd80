// Moonwalk — the planned schedule: the fastest plan whose working set fits a budget.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <memory>
#include <vector>

#include "moonwalk/fidelity/tolerance.hpp"
#include "moonwalk/plan/costs.hpp"
#include "moonwalk/plan/executor.hpp"
#include "moonwalk/plan/plan.hpp"
#include "moonwalk/plan/planner.hpp"
#include "moonwalk/plan/report.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// The gradient by the plan of least predicted time whose working set fits
/// `budget` bytes (plan/planner.hpp): which layer inputs it keeps, which it
/// recomputes from checkpoints, and where the checkpoints go, chosen for
/// this network's layer sizes and timed costs (plan/costs.hpp). A plan that
/// only stores and recomputes gives reference backprop's result, bit for
/// bit: recomputation repeats its arithmetic.
///
/// The budget bounds the step's working set as Stats::working_bytes counts
/// it: the values the plan holds (x_0 excluded: the caller's), the two
/// cotangent buffers and ∂ℓ/∂x_L; the thread's product scratch
/// (thread_scratch_bytes) comes on top. 0: unlimited (backprop's plan). A
/// budget below the least any plan needs (smallest_budget) is a
/// ScheduleError that names the least.
///
/// Where layers have inverses (can_invert: coupling blocks, LeakyReLU, …)
/// the plans may rebuild values by inversion instead of recomputing them,
/// as RevBackprop does, each rebuilt stretch checked against a value
/// recomputed exactly (plan/plan.hpp): the largest relative drift is the
/// step's error estimate ("max_reconstruction_error"). A stretch is
/// planned only where its predicted drift c · d holds `tolerance`: d its
/// drift measured on the first columns of the step's batch before the plan
/// is made (stretch_drifts, plan/costs.hpp: every stretch's inverses run
/// once, on a few columns), c = `drift_calibration` (default
/// kDriftMargin: the batch drifts further than a few of its columns). Above
/// `tolerance` the drift model is calibrated on what the checks measured
/// (c = 2 max drift / d over the checked stretches: the drifted ones are
/// then predicted over the tolerance) and the step is taken again by the fastest
/// plan within the same budget whose stretches it predicts within the
/// tolerance; after kRecalibrations such re-plans, by the best plan without
/// inversion (Stats::fallbacks counts the steps taken again). The later
/// steps on that shape run the last plan taken, and a later bind keeps the
/// measured constant. Where no plan fits, the step is returned as it is,
/// flagged (within_tolerance false). Such a result differs from
/// backprop's by the drift; plans without inverse steps repeat backprop's
/// arithmetic.
///
/// With `moonwalk`, a plan may reverse the bottom layers of the chain by
/// Moonwalk (their residuals kept, cotangent steps, then the sweep), with
/// anchors where the layers need them and where the fidelity policy's error
/// model (fidelity/policy.hpp, Fidelity's default margin and calibration),
/// fed with each layer's amplification on the step's batch, places them
/// for `tolerance`; the sweep's checks are the step's error estimate
/// ("moonwalk_layers": the layers swept). A Moonwalk plan whose estimate
/// passes the tolerance is replaced, as a drifted one is, by the best plan
/// without inversion or Moonwalk.
///
/// The plan is made on the first step on a shape (the costs timed then, or
/// read from the cost file) and bound once: later steps on that shape reuse
/// it. Making it takes memory the budget does not cover, for that step only:
/// the planner's table (mapped outside the heap, at most the budget's bytes
/// above a floor: table_entries; more on chains of over ~400 layers, whose
/// table has at least 9 entries per pair of layers) and, when timing, four
/// buffers of the widest value. Both are freed before the plan's buffers
/// are allocated. Its figures: "budget", "predicted_working_bytes",
/// "predicted_seconds", "recomputed_forwards", "checkpoints", "inverses",
/// where the plan inverts, "max_reconstruction_error", and where a drift
/// model bounds the stretches, "drift_calibration" (its c).
struct Planned {
  std::size_t budget = 0;  ///< bytes of a step's working set; 0: unlimited
  Calibration calibration = Calibration::cached;
  /// Also return h_0 = ∂ℓ/∂x_0 (one more input-vjp, through the first layer).
  bool input_gradient = false;
  /// Plans may rebuild values by inversion (struct comment).
  bool invert = true;
  /// Plans may reverse the bottom of the chain by Moonwalk (struct comment).
  bool moonwalk = true;
  /// The largest drift a rebuilt stretch may carry (0: default_target<S>()).
  double tolerance = 0;
  /// The drift model's constant c: a stretch is planned where c times its
  /// drift measured on a few columns holds `tolerance` (struct comment);
  /// 0: kDriftMargin.
  double drift_calibration = 0;
  /// The default c: about twice the most a 1024-column batch drifted over
  /// its first 16 columns (1.21×, BENCHMARKS.md, "The planner").
  static constexpr double kDriftMargin = 2.5;
  /// The bound plan, reused by every step on the same shapes (copies share it).
  std::shared_ptr<detail::SharedWorkspace> workspace = detail::new_workspace();

  [[nodiscard]] static std::string name() { return "planned"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    return detail::run_fresh(*this, net, x0, loss, target);
  }

  template <Net N, class L>
  void run_into(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                const typename L::target_type& target, GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    const detail::WorkspaceLease ws(workspace);
    auto& b = ws->get<Bound<S>>(0);
    const Index batch = x0.cols();
    value_rows_into(net, b.rows);
    if (!b.bound || !b.run.bound_to(b.rows, batch, input_gradient) || b.budget != budget ||
        b.calibration != calibration || b.invert != invert || b.moonwalk != moonwalk ||
        b.tolerance != tolerance || b.drift_calibration != drift_calibration)
      bind(net, x0, b);
    const double tol = tolerance > 0 ? tolerance : default_target<S>();
    out.stats.restart();
    out.stats.schedule = name();
    out.stats.amplification.clear();
    zero_gradients(net);
    // After a step whose stretches drifted over the tolerance, the steps on
    // this shape run the plan made with the drift model calibrated on it, or
    // the plan without inversion (until the next bind).
    PlanRun<S>* ran = b.drifted ? &b.exact : &b.run;
    // A Moonwalk sweep's vijp may meet a singular Jacobian (RankError: a
    // saturated σ′, a rank-deficient W): the plan without Moonwalk takes the step.
    bool singular = false;
    try {
      ran->run(net, x0, loss, target, out);
    } catch (const RankError&) {
      if (ran != &b.run || b.predicted.sweep_steps == 0) throw;
      singular = true;
    }
    double drift = singular ? std::numeric_limits<double>::infinity() : out.stats.error_estimate;
    std::size_t fallbacks = 0, working = out.stats.working_bytes;
    auto again = [&](PlanRun<S>& run) {
      out.stats.restart();
      out.stats.schedule = name();
      zero_gradients(net);
      run.run(net, x0, loss, target, out);
      working = std::max(working, out.stats.working_bytes);
      drift = out.stats.error_estimate;
      ++fallbacks;
    };
    while (ran == &b.run && (b.predicted.inverse_steps > 0 || b.predicted.sweep_steps > 0) &&
           !(drift <= tol) && (singular || std::isfinite(out.loss))) {
      // The drifted plan's buffers go first: planning (its table) and the
      // next plan's buffers must not stack on them.
      b.run.release();
      // (A sweep over the tolerance is not the drift model's to calibrate.)
      if (b.predicted.sweep_steps == 0 && fallbacks < kRecalibrations && recalibrate(net, x0, b, tol)) {
        again(b.run);  // shorter stretches, or none
        continue;
      }
      // The best plan without inversion, if one fits.
      if (!b.exact_tried) {
        b.exact_tried = true;
        ChainCosts exact = b.costs;
        exact.inverse.clear();
        exact.branch_bytes.clear();
        try {
          b.exact_figures = layout(net, exact, batch, b.exact, MoonwalkMove{});
          b.has_exact = true;
        } catch (const ScheduleError&) {
          b.has_exact = false;
        }
      }
      if (!b.has_exact) {
        if (singular)
          throw ScheduleError(detail::cat(name(),
                                          ": the plan's Moonwalk sweep met a singular Jacobian, and no plan "
                                          "without Moonwalk fits the budget"));
        break;
      }
      ran = &b.exact;
      b.drifted = true;
      again(b.exact);
    }
    const bool inverts = ran == &b.run && b.predicted.inverse_steps > 0;
    Stats& st = out.stats;
    const PlanFigures& predicted = ran == &b.run ? b.predicted : b.exact_figures;
    if (predicted.sweep_steps > 0) st.figures["moonwalk_layers"] = static_cast<double>(predicted.sweep_steps);
    st.figures["budget"] = static_cast<double>(budget);
    st.figures["predicted_working_bytes"] = static_cast<double>(ran->working_bytes());
    st.figures["predicted_seconds"] = predicted.seconds;
    st.figures["recomputed_forwards"] = static_cast<double>(st.counts.forward) -
                                        static_cast<double>(net.size()) -
                                        static_cast<double>(predicted.checks);
    st.figures["checkpoints"] = static_cast<double>(predicted.peak_checkpoints);
    st.figures["inverses"] = static_cast<double>(st.counts.inverse);
    if (inverts) st.figures["max_reconstruction_error"] = drift;
    if (b.calibrated > 0) st.figures["drift_calibration"] = b.calibrated;
    st.tolerance = tol;
    st.fallbacks = fallbacks;
    st.working_bytes = working;
    if (!detail::keep_across_steps(net, batch)) {
      b.run.release();
      b.exact.release();
    }
    detail::flat_gradient_into(net, out);
  }

  /// The plan this schedule runs for `net` at x0's batch, made as a step
  /// makes it (timing layers leaves their gradient storage dirty).
  template <Net N>
  [[nodiscard]] Plan plan(N& net, const CRef<typename N::scalar_type>& x0) const {
    Bound<typename N::scalar_type> b;
    b.rows = value_rows(net);
    bind(net, x0, b);
    return b.run.plan();
  }

  /// The report of the plan this schedule runs for `net` at x0's batch
  /// (plan/report.hpp): per layer, its input's fate, the bytes it keeps and
  /// holds, and its predicted time; made as plan() makes the plan.
  template <Net N>
  [[nodiscard]] PlanReport report(N& net, const CRef<typename N::scalar_type>& x0) const {
    Bound<typename N::scalar_type> b;
    b.rows = value_rows(net);
    bind(net, x0, b);
    std::vector<std::string> names;
    detail::for_each_layer(net, [&](std::size_t, const auto& l) { names.push_back(l.name()); });
    return plan_report(b.run.plan(), b.costs, std::move(names));
  }

  /// The least budget any plan of `net` at x0's batch fits: the working set
  /// of the tightest plan, its buffers laid out.
  template <Net N>
  [[nodiscard]] std::size_t smallest_budget(N& net, const CRef<typename N::scalar_type>& x0) const {
    using S = typename N::scalar_type;
    ChainCosts costs = chain_costs(net, x0, calibration);
    if (!invert) costs.inverse.clear();
    PlanRun<S> run;
    run.bind(plan_within(costs, least_held_bytes(costs), table_entries()), value_rows(net), x0.cols(),
             input_gradient, false);
    return run.working_bytes();
  }

  /// Entries of the planner's table for this budget: the budget's bytes'
  /// worth, between 2^17 (896 KiB: budgets of a few KiB keep exact memory
  /// levels) and 2^20 (7 MiB), so that planning a budget of a MiB or more
  /// needs no more memory than the step it plans (at tight budgets the memory
  /// levels are coarser: plan/planner.hpp's unit).
  [[nodiscard]] std::size_t table_entries() const {
    constexpr std::size_t least = std::size_t{1} << 17, most = std::size_t{1} << 20;
    return budget == 0 ? most : std::clamp(budget / kPlannerEntryBytes, least, most);
  }

 private:
  template <class S>
  struct Bound {
    PlanRun<S> run;
    std::vector<Index> rows;
    std::size_t budget = 0;
    Calibration calibration = Calibration::cached;
    bool invert = true, moonwalk = true;
    double tolerance = 0, drift_calibration = 0;  ///< the drift budget's inputs (bind)
    ChainCosts costs;
    PlanFigures predicted;
    bool bound = false;  ///< the last bind succeeded (one that threw leaves run bound to a plan over budget)
    // The plan without inversion, bound when a step first drifts.
    PlanRun<S> exact;
    PlanFigures exact_figures;
    bool exact_tried = false, has_exact = false;
    bool drifted = false;  ///< a step drifted over the tolerance: run `exact`
    /// The drift model's constant c in effect (0: none); measured ones
    /// outlive a bind (the same layers drift alike at another batch).
    double calibrated = 0, measured = 0;
  };

  /// Re-plans a step cannot take in more: a drifted plan is re-planned at most this often.
  static constexpr std::size_t kRecalibrations = 3;
  /// The measured constant is doubled before it bounds the stretches (what
  /// a check saw on one batch is not the most another batch drifts).
  static constexpr double kCalibrationMargin = 2;

  /// After a run whose checks measured drift over `tol`: calibrates the
  /// drift model on them, c = max over checks of drift / (u · D(stretch)),
  /// and binds b.run to the fastest plan whose stretches it predicts within
  /// `tol` (kCalibrationMargin · c · u · D ≤ tol). The drifted stretches are
  /// excluded by construction: their D now exceeds the budget. False when no
  /// plan fits.
  template <Net N, class S>
  bool recalibrate(N& net, const CRef<S>& x0, Bound<S>& b, double tol) const {
    if (b.costs.measured.empty()) b.costs.measured = stretch_drifts(net, x0, tol / b.calibrated);
    const double u = unit_roundoff<S>();
    double c = 0;
    for (const CheckedDrift& d : b.run.checked_drifts()) {
      const double predicted = b.costs.drift(d.layer, d.top);
      if (predicted > 0 && std::isfinite(d.drift)) c = std::max(c, d.drift / (u * predicted));
    }
    b.measured = std::max(b.measured, c);
    // Strictly tighter each time: the budget falls below every stretch that drifted.
    const double next = std::max(kCalibrationMargin * b.measured, kCalibrationMargin * b.calibrated);
    if (!(next > b.calibrated) || !std::isfinite(next)) return false;
    b.calibrated = next;
    b.costs.drift_budget = tol / (b.calibrated * u);
    try {
      b.predicted = layout(net, b.costs, x0.cols(), b.run, moonwalk_move<S>());
    } catch (const ScheduleError&) {
      return false;
    }
    return true;
  }

  /// Plans within the budget and binds (the buffers are allocated by the
  /// first run).
  template <Net N, class S>
  void bind(N& net, const CRef<S>& x0, Bound<S>& b) const {
    b.bound = false;
    b.exact_tried = b.has_exact = b.drifted = false;
    b.exact.release();
    b.costs = chain_costs(net, x0, calibration);
    // The drift model's constant: the caller's (or the default), or the one
    // steps measured.
    b.calibrated = invert ? std::max(drift_calibration > 0 ? drift_calibration : kDriftMargin,
                                     kCalibrationMargin * b.measured)
                          : 0;
    if (!invert) {
      b.costs.inverse.clear();
      b.costs.branch_bytes.clear();
    }
    b.predicted = layout(net, b.costs, x0.cols(), b.run, moonwalk_move<S>());
    if (b.predicted.inverse_steps > 0) {
      // Stretches are rebuilt only where their predicted drift holds the
      // tolerance (plan.hpp, ChainCosts): c · u · D ≤ tolerance, D measured
      // (measured only when the plan of the unbounded drift inverts at all;
      // a stretch is measured while c times its drift holds the tolerance).
      const double tol = tolerance > 0 ? tolerance : default_target<S>();
      b.run.release();
      b.costs.measured = stretch_drifts(net, x0, tol / b.calibrated);
      b.costs.drift_budget = tol / (b.calibrated * unit_roundoff<S>());
      b.predicted = layout(net, b.costs, x0.cols(), b.run, moonwalk_move<S>());
    }
    b.budget = budget;
    b.calibration = calibration;
    b.invert = invert;
    b.moonwalk = moonwalk;
    b.tolerance = tolerance;
    b.drift_calibration = drift_calibration;
    b.bound = true;
  }

  /// The planner's Moonwalk move: with `moonwalk`, anchors where the
  /// fidelity policy's (P) passes margin · tolerance / (c · u).
  template <class S>
  [[nodiscard]] MoonwalkMove moonwalk_move() const {
    const Fidelity f;
    const double tol = tolerance > 0 ? tolerance : default_target<S>();
    return {.enabled = moonwalk,
            .input_gradient = input_gradient,
            .anchor_budget = f.margin * tol / (f.calibration * unit_roundoff<S>())};
  }

  /// Binds `run` to the fastest plan on `costs` within the budget (layout
  /// only) and returns its predicted figures: the held-value budget is what
  /// the cotangents leave; when the bound layout (buffers reused across
  /// values of other widths) overshoots, plans again with that much less,
  /// down to the tightest plan.
  template <Net N, class S>
  PlanFigures layout(N& net, const ChainCosts& costs, Index batch, PlanRun<S>& run,
                     const MoonwalkMove& mw) const {
    std::vector<Index> rows = value_rows(net);
    const std::size_t least = least_held_bytes(costs);
    std::size_t total = 0;
    for (std::size_t i = 1; i < costs.value_bytes.size(); ++i) total += costs.value_bytes[i];
    auto bind_within = [&](std::size_t held) {
      run.bind(plan_within(costs, held, table_entries(), mw), rows, batch, input_gradient, false,
               costs.residual_bytes);
      return run.working_bytes();
    };
    if (budget == 0) {
      (void)bind_within(total);
    } else {
      const std::size_t fixed = PlanRun<S>::cotangent_bytes(rows, batch, input_gradient);
      std::size_t held = budget > fixed + least ? budget - fixed : least;
      for (int attempt = 0;; ++attempt) {
        const std::size_t need = bind_within(held);
        if (need <= budget) break;
        if (held == least) {
          throw ScheduleError(detail::cat(name(), ": no plan of this ", net.size(),
                                          "-layer network at batch ", batch, " fits a working set of ",
                                          budget, " bytes; the smallest budget is ", need, " bytes (", fixed,
                                          " for the cotangents and dl/dx_L, the rest for the values)"));
        }
        const std::size_t over = need - budget;
        held = attempt < 8 && held > least + over ? held - over : least;
      }
    }
    return check_plan(run.plan(), costs);
  }
};

}  // namespace moonwalk
