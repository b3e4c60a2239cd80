// Moonwalk — backprop for invertible networks: rebuild inputs by inversion.
#pragma once

#include <memory>
#include <string>
#include <vector>

#include "moonwalk/core/ops.hpp"
#include "moonwalk/fidelity/tolerance.hpp"
#include "moonwalk/plan/executor.hpp"
#include "moonwalk/plan/plan.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Reversible backprop (RevNet-style), as a plan (revbackprop_plan in
/// plan/plan.hpp) run by the executor. Forward to x_L keeping only the input
/// of each layer that cannot be inverted (a classifier head, a ReLU: kind
/// "activation" in the report — on a fully invertible network nothing at
/// all); backward, for j = L..1: x_{j−1} = f_{j−1}⁻¹(x_j) (or the kept
/// input), g_j += J_{θ,j}ᵀ h_{j+1}, h_j = J_jᵀ h_{j+1}.
///
/// Inverting in floating point drifts (docs/design.md §5), so every rebuilt
/// stretch ends with a check of the same form as Moonwalk's end-of-sweep one:
/// at its bottom, above a kept input x_k (or x_0), x_{k+1} is recomputed
/// exactly from x_k, its relative difference max|x̂ − x| / max|x| from the
/// rebuilt one is the stretch's drift, and the exact value is the one the
/// backward step reads. `stats.error_estimate` = the largest drift (also
/// `stats.figures["max_reconstruction_error"]`), judged against `tolerance`
/// (0: default_target<S>()) in `stats.within_tolerance`. A piecewise-linear
/// layer whose rebuilt input is read unchecked (LeakyReLU) reads the branch
/// bits its forward step kept (one bit per element, kind "mask"): a rebuilt
/// ±1e-17 where the forward pass had an exact 0 would pick the other
/// one-sided derivative.
struct RevBackprop {
  /// The largest reconstruction drift a trusted gradient may carry (0: default_target<S>()).
  double tolerance = 0;
  /// Also return h_0 = ∂ℓ/∂x_0 (one more input-vjp, through the first layer).
  bool input_gradient = false;
  /// The bound plan, reused by every step on the same shapes
  /// (schedules/detail/workspace.hpp; copies share it).
  std::shared_ptr<detail::SharedWorkspace> workspace = detail::new_workspace();

  [[nodiscard]] static std::string name() { return "revbackprop"; }

  /// The plan for `net` (plan/plan.hpp): which inputs it keeps, rebuilds and checks.
  template <Net N>
  [[nodiscard]] static Plan plan(const N& net) {
    std::vector<bool> invert, branches;
    layer_flags(net, invert, branches);
    return revbackprop_plan(invert, branches);
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
    const detail::WorkspaceLease ws(workspace);
    auto& bound = ws->get<Bound<S>>(0);
    const Index batch = x0.cols();
    value_rows_into(net, bound.rows);
    // (The flags in place, so that a warm step allocates nothing.)
    layer_flags(net, bound.flags[0], bound.flags[1]);
    if (!bound.run.bound_to(bound.rows, batch, input_gradient) || bound.flags[0] != bound.invert ||
        bound.flags[1] != bound.branches) {
      bound.invert = bound.flags[0];
      bound.branches = bound.flags[1];
      bound.run.bind(revbackprop_plan(bound.invert, bound.branches), bound.rows, batch, input_gradient);
    }
    out.stats.restart();
    out.stats.schedule = name();
    out.stats.amplification.clear();
    zero_gradients(net);
    bound.run.run(net, x0, loss, target, out);
    Stats& st = out.stats;
    st.figures["max_reconstruction_error"] = st.error_estimate;
    st.tolerance = tolerance > 0 ? tolerance : default_target<S>();
    st.within_tolerance = st.error_estimate <= st.tolerance;
    if (!detail::keep_across_steps(net, batch)) bound.run.release();
    detail::flat_gradient_into(net, out);
  }

 private:
  template <class S>
  struct Bound {
    PlanRun<S> run;
    std::vector<Index> rows;
    std::vector<bool> invert, branches;  ///< the bound plan's layer flags
    std::vector<bool> flags[2];          ///< this step's
  };
  /// invert[i]: layer i has a working inverse; branches[i]: and keeps branch bits.
  template <Net N>
  static void layer_flags(const N& net, std::vector<bool>& invert, std::vector<bool>& branches) {
    invert.assign(net.size(), false);
    branches.assign(net.size(), false);
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        invert[i] = can_invert(l);
        branches[i] = invert[i] && keeps_branches(l);
      });
  }
};

}  // namespace moonwalk
