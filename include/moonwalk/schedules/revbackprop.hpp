// Moonwalk — backprop for invertible networks: rebuild inputs by inversion.
#pragma once

#include <algorithm>
#include <vector>

#include "moonwalk/core/ops.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Reversible backprop (RevNet-style). Forward to x_L keeping only the input
/// of each layer that cannot be inverted (a classifier head, a ReLU: kind
/// "activation" in the report — on a fully invertible network nothing at
/// all); backward, for i = L..1: x_{i−1} = f_i⁻¹(x_i) (or the kept input),
/// g_i += J_{θ,i}ᵀ h_i, h_{i−1} = J_iᵀ h_i.
///
/// Inverting in floating point drifts (DESIGN §5), so every rebuilt stretch
/// ends with a check of the same form as Moonwalk's end-of-sweep one:
/// at x_0 the rebuilt input against the true one, and at a kept input the
/// rebuilt output above it against f(kept input);
/// `stats.error_estimate` = the largest max|x̂ − x| / max|x| seen (also
/// `stats.figures["max_reconstruction_error"]`).
struct RevBackprop {
  [[nodiscard]] static std::string name() { return "revbackprop"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    std::vector<bool> invert(net.size());
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) { invert[i] = can_invert(l); });

    GradientResult<S> out;
    Stats& st = out.stats;
    st.schedule = name();
    SavedStore store(net.size());
    zero_gradients(net);

    Matrix<S> x = x0;
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      Matrix<S> y = l.forward(x);
      ++st.counts.forward;
      if (!invert[i]) store.put(i, SavedStore::activation, l.name(), std::move(x));
      x = std::move(y);
    });
    auto vg = loss.value_and_gradient(x, target);  // (no structured binding: lambdas capture h)
    out.loss = vg.first;
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
      h = l.vjp(xin, h);
      ++st.counts.vjp;
      x = std::move(xin);
    });
    out.h0 = std::move(h);
    if (rebuilt) drift = std::max(drift, detail::rel_max_err(x, x0));

    st.error_estimate = drift;
    st.figures["max_reconstruction_error"] = drift;
    out.gradient = get_gradients(net);
    store.report_to(st);
    return out;
  }
};

}  // namespace moonwalk
