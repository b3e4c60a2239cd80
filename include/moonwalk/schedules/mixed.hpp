// Moonwalk — mixed Moonwalk: a lean reverse pass for h_0, then the forward sweep.
#pragma once

#include "moonwalk/schedules/detail/sweep.hpp"

namespace moonwalk {

/// Reverse pass: x_i = f_i(x_{i−1}) keeping only each layer's residual (bit
/// masks for piecewise-linear activations, nothing for Linear, σ' for smooth
/// activations); then h_{i−1} = Jᵢᵀ h_i from the residual alone, saving the
/// cokernel fragment of h_i at fragmental layers and h_i itself at anchors
/// (chosen by `anchors`, plus every layer that is neither submersive nor
/// fragmental). Then the forward sweep recovers h_i and reads ∂ℓ/∂θ_i.
struct MixedMoonwalk {
  Anchors anchors{};

  [[nodiscard]] static std::string name() { return "mixed"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    GradientResult<S> out;
    Stats& st = out.stats;
    st.schedule = name();
    const std::vector<SweepMode> modes = detail::sweep_modes(net);
    std::vector<bool> anchored = anchors.mask(net.size());
    SavedStore store(net.size());
    zero_gradients(net);

    // Reverse pass, forward half: keep residuals only.
    Matrix<S> x = x0;
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      store.put(i, SavedStore::residual, l.name(), moonwalk::save_residual(l, x));
      x = l.forward(x);
      ++st.counts.forward;
    });
    auto [value, h] = loss.value_and_gradient(x, target);
    out.loss = value;
    x.resize(0, 0);

    // Reverse pass, backward half: h_{i−1} = Jᵢᵀ h_i; fragments and anchors.
    std::size_t n_anchor = 0, n_fallback = 0;
    detail::for_each_layer_reverse(net, [&](std::size_t i, auto& l) {
      using Lyr = std::remove_cvref_t<decltype(l)>;
      auto r = store.take<residual_t<Lyr>>(i, SavedStore::residual);
      if (anchored[i] || modes[i] == SweepMode::anchor) {
        store.put(i, SavedStore::anchor, l.name(), Matrix<S>(h), "anchor");
        ++n_anchor;
        n_fallback += modes[i] == SweepMode::anchor;
      } else if (modes[i] == SweepMode::fragment) {
        if constexpr (Fragmental<Lyr>) store.put(i, SavedStore::fragment, l.name(), l.save_fragment(r, h));
      }
      h = moonwalk::vjp_residual(l, r, h);
      ++st.counts.vjp;
    });
    out.h0 = h;

    st.error_estimate = detail::forward_sweep(net, x0, std::move(h), store, modes, loss, target, st);
    st.figures["anchors"] = static_cast<double>(n_anchor);
    st.figures["fallback_anchors"] = static_cast<double>(n_fallback);
    out.gradient = get_gradients(net);
    store.report_to(st);
    return out;
  }
};

}  // namespace moonwalk
