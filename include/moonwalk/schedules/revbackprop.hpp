// Moonwalk — backprop for invertible networks: rebuild inputs by inversion.
#pragma once

#include <algorithm>
#include <cmath>
#include <vector>

#include "moonwalk/core/ops.hpp"
#include "moonwalk/fidelity/tolerance.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Reversible backprop (RevNet-style). Forward to x_L keeping only the input
/// of each layer that cannot be inverted (a classifier head, a ReLU: kind
/// "activation" in the report — on a fully invertible network nothing at
/// all), and the branch bits of each invertible piecewise-linear layer
/// (LeakyReLU: one bit per element, kind "mask"; keeps_branches); backward,
/// for i = L..1: x_{i−1} = f_i⁻¹(x_i) (or the kept input),
/// g_i += J_{θ,i}ᵀ h_i, h_{i−1} = J_iᵀ h_i (from the kept bits where there
/// are any: a rebuilt input of ±1e-17 where the forward pass had an exact 0
/// would pick the other one-sided derivative).
///
/// Inverting in floating point drifts (docs/design.md §5), so every rebuilt stretch
/// ends with a check of the same form as Moonwalk's end-of-sweep one:
/// at x_0 the rebuilt input against the true one, and at a kept input the
/// rebuilt output above it against f(kept input);
/// `stats.error_estimate` = the largest max|x̂ − x| / max|x| seen (also
/// `stats.figures["max_reconstruction_error"]`), judged against `tolerance`
/// (0: default_target<S>()) in `stats.within_tolerance`.
struct RevBackprop {
  /// The largest reconstruction drift a trusted gradient may carry (0: default_target<S>()).
  double tolerance = 0;
  /// Also return h_0 = ∂ℓ/∂x_0 (one more input-vjp, through the first layer;
  /// the first layer's input is rebuilt all the same, for the check at x_0).
  bool input_gradient = false;

  [[nodiscard]] static std::string name() { return "revbackprop"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    std::vector<bool> invert(net.size()), branches(net.size());
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        invert[i] = can_invert(l);
        branches[i] = invert[i] && keeps_branches(l);
      });

    GradientResult<S> out;
    Stats& st = out.stats;
    st.schedule = name();
    SavedStore store(net.size());
    zero_gradients(net);

    Matrix<S> x = x0;
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      if (branches[i]) store.put(i, SavedStore::residual, l.name(), moonwalk::save_residual(l, x));
      Matrix<S> y = l.forward(x);
      ++st.counts.forward;
      if (!invert[i]) store.put(i, SavedStore::activation, l.name(), std::move(x));
      x = std::move(y);
    });
    auto vg = loss.value_and_gradient(x, target);  // (no structured binding: lambdas capture h)
    out.loss = vg.first;
    if (!std::isfinite(out.loss)) {  // (no gradient to rebuild towards)
      detail::no_gradient(net, x0.cols(), out, input_gradient);
      store.report_to(st);
      return out;
    }
    Matrix<S> h = std::move(vg.second);

    double drift = 0;
    bool rebuilt = false;  // is the running x a reconstruction?
    detail::for_each_layer_reverse(net, [&](std::size_t i, auto& l) {
      using Lyr = std::remove_cvref_t<decltype(l)>;
      Matrix<S> xin;
      if (invert[i]) {
        if constexpr (Invertible<Lyr>) xin = l.inverse(x);
        ++st.counts.inverse;
        rebuilt = true;
      } else {
        xin = store.take<Matrix<S>>(i, SavedStore::activation);
        if (rebuilt) {  // the rebuilt output against the output of the kept input
          drift = std::max(drift, detail::rel_max_err(x, l.forward(xin)));
          ++st.counts.forward;
        }
        rebuilt = false;
      }
      moonwalk::accumulate_vjp_params(l, xin, h);
      ++st.counts.vjp_params;
      detail::gradient_ready(i);
      if (i == 0 && !input_gradient) {
        if (branches[i]) store.drop(i, SavedStore::residual);
      } else {
        if (branches[i])
          h = moonwalk::vjp_residual(l, store.take<residual_t<Lyr>>(i, SavedStore::residual), h);
        else
          h = l.vjp(xin, h);
        ++st.counts.vjp;
      }
      x = std::move(xin);
    });
    if (input_gradient) out.h0 = std::move(h);
    if (rebuilt) drift = std::max(drift, detail::rel_max_err(x, x0));

    st.error_estimate = drift;
    st.figures["max_reconstruction_error"] = drift;
    st.tolerance = tolerance > 0 ? tolerance : default_target<S>();
    st.within_tolerance = drift <= st.tolerance;
    out.gradient = get_gradients(net);
    store.report_to(st);
    return out;
  }
};

}  // namespace moonwalk
