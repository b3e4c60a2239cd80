// Moonwalk — the planned schedule: the fastest plan whose working set fits a budget.
#pragma once

#include <cstddef>
#include <memory>
#include <vector>

#include "moonwalk/plan/costs.hpp"
#include "moonwalk/plan/executor.hpp"
#include "moonwalk/plan/plan.hpp"
#include "moonwalk/plan/planner.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Backprop through the plan of least predicted time whose working set fits
/// `budget` bytes (plan/planner.hpp): which layer inputs it keeps, which it
/// recomputes from checkpoints, and where the checkpoints go, chosen for
/// this network's layer sizes and timed costs (plan/costs.hpp). The result
/// is reference backprop's, bit for bit: recomputation repeats its arithmetic.
///
/// The budget bounds the step's working set as Stats::working_bytes counts
/// it: the values the plan holds (x_0 excluded: the caller's), the two
/// cotangent buffers and ∂ℓ/∂x_L; the thread's product scratch
/// (thread_scratch_bytes) comes on top. 0: unlimited (backprop's plan). A
/// budget below the least any plan needs (smallest_budget) is a
/// ScheduleError that names the least.
///
/// The plan is made on the first step on a shape (the costs timed then, or
/// read from the cost file) and bound once: later steps on that shape reuse
/// it. Making it takes memory the budget does not cover, for that step only:
/// the planner's table (about 6 MiB; more on chains of over ~400 layers) and,
/// when timing, four buffers of the widest value. Its figures: "budget", "predicted_working_bytes",
/// "predicted_seconds", "recomputed_forwards", "checkpoints".
struct Planned {
  std::size_t budget = 0;  ///< bytes of a step's working set; 0: unlimited
  Calibration calibration = Calibration::cached;
  /// Also return h_0 = ∂ℓ/∂x_0 (one more input-vjp, through the first layer).
  bool input_gradient = false;
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
    b.rows.clear();
    b.rows.push_back(net.in_features());
    detail::for_each_layer(net, [&](std::size_t, const auto& l) { b.rows.push_back(l.out_features()); });
    if (!b.bound || !b.run.bound_to(b.rows, batch, input_gradient) || b.budget != budget ||
        b.calibration != calibration)
      bind(net, x0, b);
    out.stats.restart();
    out.stats.schedule = name();
    out.stats.amplification.clear();
    zero_gradients(net);
    b.run.run(net, x0, loss, target, out);
    Stats& st = out.stats;
    st.figures["budget"] = static_cast<double>(budget);
    st.figures["predicted_working_bytes"] = static_cast<double>(b.run.working_bytes());
    st.figures["predicted_seconds"] = b.predicted.seconds;
    st.figures["recomputed_forwards"] =
        static_cast<double>(st.counts.forward) - static_cast<double>(net.size());
    st.figures["checkpoints"] = static_cast<double>(b.predicted.peak_checkpoints);
    if (!detail::keep_across_steps(net, batch)) b.run.release();
    gradients_into(net, out.gradient);
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

  /// The least budget any plan of `net` at x0's batch fits: the working set
  /// of the tightest plan, its buffers laid out.
  template <Net N>
  [[nodiscard]] std::size_t smallest_budget(N& net, const CRef<typename N::scalar_type>& x0) const {
    using S = typename N::scalar_type;
    const ChainCosts costs = chain_costs(net, x0, calibration);
    PlanRun<S> run;
    run.bind(plan_within(costs, least_held_bytes(costs)), value_rows(net), x0.cols(), input_gradient, false);
    return run.working_bytes();
  }

 private:
  template <class S>
  struct Bound {
    PlanRun<S> run;
    std::vector<Index> rows;
    std::size_t budget = 0;
    Calibration calibration = Calibration::cached;
    PlanFigures predicted;
    bool bound = false;  ///< the last bind succeeded (one that threw leaves run bound to a plan over budget)
  };

  /// Plans within the budget and binds (the buffers are allocated by the
  /// first run): the held-value budget is what the cotangents leave; when the
  /// bound layout (buffers reused across values of other widths) overshoots,
  /// plans again with that much less, down to the tightest plan.
  template <Net N, class S>
  void bind(N& net, const CRef<S>& x0, Bound<S>& b) const {
    const Index batch = x0.cols();
    b.bound = false;
    const ChainCosts costs = chain_costs(net, x0, calibration);
    const std::size_t least = least_held_bytes(costs);
    std::size_t total = 0;
    for (std::size_t i = 1; i < costs.value_bytes.size(); ++i) total += costs.value_bytes[i];
    auto layout = [&](std::size_t held) {
      b.run.bind(plan_within(costs, held), b.rows, batch, input_gradient, false);
      return b.run.working_bytes();
    };
    if (budget == 0) {
      (void)layout(total);
    } else {
      const std::size_t fixed = PlanRun<S>::cotangent_bytes(b.rows, batch, input_gradient);
      std::size_t held = budget > fixed + least ? budget - fixed : least;
      for (int attempt = 0;; ++attempt) {
        const std::size_t need = layout(held);
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
    b.predicted = check_plan(b.run.plan(), costs.value_bytes, costs.forward, costs.backward, costs.loss);
    b.budget = budget;
    b.calibration = calibration;
    b.bound = true;
  }
};

}  // namespace moonwalk
