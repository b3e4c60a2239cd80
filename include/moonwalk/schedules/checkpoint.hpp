// Moonwalk — checkpointed backprop: every-k (√L) segments, or binomial (Revolve).
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <vector>

#include "moonwalk/plan/executor.hpp"
#include "moonwalk/plan/plan.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Backprop that keeps only some layer inputs and recomputes the others.
///
/// every-k (`slots == 0`): the forward pass keeps x_s for every segment start
/// s = 0, k, 2k, … ("checkpoint"); then, segment by segment from the last,
/// recomputes the segment's other inputs from its checkpoint, keeping them
/// ("activation", also accounted), backprops through the segment and frees it.
/// Peak: ⌈L/k⌉ checkpoints + k − 1 recomputed inputs. `every == 0` means
/// k = round(√L) (at least 1).
///
/// binomial (`slots = c > 0`): at most c layer inputs are held at once (x_0
/// included); checkpoints are placed by Griewank's treeverse with the split
/// from binomial numbers, so the number of forward calls is the minimum
/// t(L, c) + 1 (the +1 is x_L for the loss; detail::revolve_forward_steps).
/// `stats.figures["recomputed_forwards"]` is the forward calls beyond L.
///
/// Both are plans (every_k_plan, binomial_plan in plan/plan.hpp) run by the
/// executor (plan/executor.hpp); the report accounts x_0 as a checkpoint.
struct Checkpointing {
  std::size_t every = 0;  ///< segment length k; 0: round(√L)
  std::size_t slots = 0;  ///< > 0: binomial checkpointing with this many held inputs
  /// Also return h_0 = ∂ℓ/∂x_0 (one more input-vjp, through the first layer).
  bool input_gradient = false;
  /// The bound plan, reused by every step on the same shapes
  /// (schedules/detail/workspace.hpp; copies share it).
  std::shared_ptr<detail::SharedWorkspace> workspace = detail::new_workspace();

  [[nodiscard]] static std::string name() { return "checkpoint"; }

  /// The plan for a chain of `layers` layers (plan/plan.hpp).
  [[nodiscard]] Plan plan(std::size_t layers) const {
    if (every > 0 && slots > 0)
      throw ScheduleError(
          detail::cat(name(), ": choose every (", every, ") or slots (", slots, "), not both"));
    if (slots > 0) return binomial_plan(layers, slots);
    return every_k_plan(layers, segment(layers));
  }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    return detail::run_fresh(*this, net, x0, loss, target);
  }

  /// run(), written into `out`: a step on the shapes of the last one reuses
  /// the bound plan and its buffers.
  template <Net N, class L>
  void run_into(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                const typename L::target_type& target, GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    if (every > 0 && slots > 0) (void)plan(net.size());  // (throws)
    const detail::WorkspaceLease ws(workspace);
    auto& bound = ws->get<Bound<S>>(0);
    const Index batch = x0.cols();
    const std::size_t n = net.size();
    const std::size_t k = slots > 0 ? 0 : segment(n);
    value_rows_into(net, bound.rows);
    if (!bound.run.bound_to(bound.rows, batch, input_gradient) || bound.every != k || bound.slots != slots) {
      bound.run.bind(plan(n), bound.rows, batch, input_gradient);
      bound.every = k;
      bound.slots = slots;
      bound.figures = check_plan(bound.run.plan());
    }
    out.stats.restart();
    out.stats.schedule = name();
    out.stats.amplification.clear();
    zero_gradients(net);
    bound.run.run(net, x0, loss, target, out);
    Stats& st = out.stats;
    st.figures["recomputed_forwards"] = static_cast<double>(st.counts.forward) - static_cast<double>(n);
    st.figures["checkpoints"] = static_cast<double>(bound.figures.peak_checkpoints);
    if (slots > 0) {
      st.figures["slots"] = static_cast<double>(slots);
      st.figures["predicted_forwards"] = static_cast<double>(detail::revolve_forward_steps(n, slots) + 1);
    } else {
      st.figures["every"] = static_cast<double>(k);
    }
    if (!detail::keep_across_steps(net, batch)) bound.run.release();
    detail::flat_gradient_into(net, out);
  }

 private:
  template <class S>
  struct Bound {
    PlanRun<S> run;
    std::vector<Index> rows;
    std::size_t every = 0, slots = 0;
    PlanFigures figures;
  };

  [[nodiscard]] std::size_t segment(std::size_t layers) const {
    const auto root = static_cast<std::size_t>(std::lround(std::sqrt(static_cast<double>(layers))));
    return std::clamp<std::size_t>(every > 0 ? every : root, 1, std::max<std::size_t>(layers, 1));
  }
};

}  // namespace moonwalk
