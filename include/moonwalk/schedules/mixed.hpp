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
///
/// With `rebuild_inputs`, an invertible layer keeps nothing at all in the
/// reverse pass: its input is rebuilt by inversion, x_{i−1} = f_i⁻¹(x_i),
/// walking down from x_L (RevBackprop-style; a layer output is kept only
/// where the layer above cannot be inverted). Inversion drift reaches h_0 and
/// so the end-of-sweep estimate; `figures["reconstruction_error"]` is the
/// mismatch of the rebuilt x_0, in the same form as RevBackprop's.
struct MixedMoonwalk {
  Anchors anchors{};
  bool rebuild_inputs = false;

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

    // Which layers rebuild their input by inversion instead of keeping a residual.
    std::vector<bool> rebuilt(net.size(), false);
    if (rebuild_inputs)
      for (std::size_t i = 0; i < net.size(); ++i)
        net.visit(i, [&](const auto& l) { rebuilt[i] = can_invert(l); });

    // Reverse pass, forward half: keep residuals only (and, for rebuilt
    // layers, their output where nothing above can give it back).
    Matrix<S> x = x0;
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      if (!rebuilt[i]) store.put(i, SavedStore::residual, l.name(), moonwalk::save_residual(l, x));
      x = l.forward(x);
      ++st.counts.forward;
      if (rebuilt[i] && (i + 1 == net.size() || !rebuilt[i + 1]))
        store.put(i, SavedStore::activation, l.name(), Matrix<S>(x), "checkpoint");
    });
    auto vg = loss.value_and_gradient(x, target);  // (no structured binding: lambdas capture h)
    out.loss = vg.first;
    Matrix<S> h = std::move(vg.second);
    x.resize(0, 0);

    // Reverse pass, backward half: h_{i−1} = Jᵢᵀ h_i; fragments and anchors.
    std::size_t n_anchor = 0, n_fallback = 0;
    Matrix<S> x_carried;  // x_i rebuilt by inversion, when the layer above was rebuilt
    detail::for_each_layer_reverse(net, [&](std::size_t i, auto& l) {
      using Lyr = std::remove_cvref_t<decltype(l)>;
      residual_t<Lyr> r;
      if (rebuilt[i]) {
        if constexpr (Invertible<Lyr>) {
          Matrix<S> y = store.has(i, SavedStore::activation)
                            ? store.take<Matrix<S>>(i, SavedStore::activation)
                            : std::move(x_carried);
          x_carried = l.inverse(y);
          ++st.counts.inverse;
          r = moonwalk::save_residual(l, x_carried);
        }
      } else {
        r = store.take<residual_t<Lyr>>(i, SavedStore::residual);
      }
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
    if (rebuilt[0]) st.figures["reconstruction_error"] = detail::rel_max_err(x_carried, x0);
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
