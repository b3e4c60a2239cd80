// Moonwalk — reference backprop: keeps every layer input between passes.
#pragma once

#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Reverse-mode reference. Forward: x_i = f_i(x_{i−1}), keeping x_{i−1}.
/// Backward: g_i += J_{θ,i}ᵀ h_i, h_{i−1} = J_iᵀ h_i from the kept inputs.
struct Backprop {
  [[nodiscard]] static std::string name() { return "backprop"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    GradientResult<S> out;
    out.stats.schedule = name();
    SavedStore store(net.size());
    zero_gradients(net);
    Matrix<S> x = x0;
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      Matrix<S> y = l.forward(x);
      ++out.stats.counts.forward;
      store.put(i, SavedStore::activation, l.name(), std::move(x));
      x = std::move(y);
    });
    auto vg = loss.value_and_gradient(x, target);  // (no structured binding: lambdas capture h)
    out.loss = vg.first;
    Matrix<S> h = std::move(vg.second);
    detail::for_each_layer_reverse(net, [&](std::size_t i, auto& l) {
      Matrix<S> xi = store.take<Matrix<S>>(i, SavedStore::activation);
      moonwalk::accumulate_vjp_params(l, xi, h);
      h = l.vjp(xi, h);
      out.stats.counts.vjp_params += 1;
      out.stats.counts.vjp += 1;
    });
    out.h0 = std::move(h);
    out.gradient = get_gradients(net);
    store.report_to(out.stats);
    return out;
  }
};

}  // namespace moonwalk
