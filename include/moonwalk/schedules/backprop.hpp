// Moonwalk — reference backprop: keeps every layer input between passes.
#pragma once

#include <memory>
#include <vector>

#include "moonwalk/core/dense.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Reverse-mode reference. Forward: x_i = f_i(x_{i−1}), keeping x_{i−1}.
/// Backward: g_i += J_{θ,i}ᵀ h_i, h_{i−1} = J_iᵀ h_i from the kept inputs,
/// down to h_1, or to h_0 = ∂ℓ/∂x_0 with `input_gradient` (GradientResult::h0).
///
/// The kept inputs and the cotangents live in `workspace`, reused from step
/// to step (schedules/detail/workspace.hpp): between steps it still holds
/// what the last step kept, as a caching allocator would; `workspace->buffers.clear()`
/// (or a fresh Backprop) gives it back.
struct Backprop {
  std::shared_ptr<detail::SharedWorkspace> workspace = detail::new_workspace();
  /// Also return h_0 = ∂ℓ/∂x_0 (one more input-vjp, through the first layer).
  bool input_gradient = false;
  /// Its slots: the layer outputs x_1..x_L (a std::vector), ∂ℓ/∂x_L, the
  /// two buffers the cotangents alternate between, the store that accounts
  /// for the kept inputs, and the layer names its report lists.
  enum Slot : std::size_t {
    outputs_slot,
    loss_slot,
    cotangent_slot,
    next_cotangent_slot,
    store_slot,
    names_slot
  };

  [[nodiscard]] static std::string name() { return "backprop"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    return detail::run_fresh(*this, net, x0, loss, target);
  }

  /// run(), written into `out` (gradient_into): reusing its storage, a step
  /// on the shapes of the last one allocates nothing.
  template <Net N, class L>
  void run_into(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                const typename L::target_type& target, GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    const detail::WorkspaceLease ws(workspace);
    out.stats.restart();
    out.stats.schedule = name();
    out.stats.amplification.clear();  // (no fidelity figures: backprop does not amplify)
    SavedStore& store = ws->get<SavedStore>(store_slot);
    store.restart(net.size());
    detail::LayerNames& names = ws->get<detail::LayerNames>(names_slot);
    zero_gradients(net);
    // xs[i] = x_{i+1}, the output of layer i (x_0 is the caller's).
    const Index batch = x0.cols();
    auto& xs = ws->get<std::vector<Matrix<S>>>(outputs_slot);
    xs.resize(net.size());
    auto input = [&](std::size_t i) -> CRef<S> {
      if (i == 0) return x0;
      return xs[i - 1];
    };
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      detail::safe_resize(xs[i], l.out_features(),
                          batch);  // (no allocation when the shape is the last step's)
      moonwalk::forward_into(l, input(i), xs[i]);
      ++out.stats.counts.forward;
      store.hold(i, SavedStore::activation, names(i, l),
                 static_cast<std::size_t>(input(i).size()) * sizeof(S), "activation");
    });
    Matrix<S>& g = ws->get<Matrix<S>>(loss_slot);
    out.loss = detail::loss_into<L, S>(loss, xs.back(), target, g);
    detail::PingPong<S> h(ws->get<detail::Buffer<S>>(cotangent_slot),
                          ws->get<detail::Buffer<S>>(next_cotangent_slot));
    h.assign(g);
    detail::for_each_layer_reverse(net, [&](std::size_t i, auto& l) {
      const CRef<S> xi = input(i);
      moonwalk::accumulate_vjp_params(l, xi, h.current());
      out.stats.counts.vjp_params += 1;
      detail::gradient_ready(i);
      if (i > 0 || input_gradient) {
        moonwalk::vjp_into(l, xi, h.current(), h.next(l.in_features(), batch));
        h.flip();
        out.stats.counts.vjp += 1;
      }
      store.drop(i, SavedStore::activation);
    });
    // (The peak: every kept input, ∂ℓ/∂x_L and both cotangent buffers.)
    out.stats.working_bytes = ws->bytes() + thread_scratch_bytes();
    if (input_gradient)
      out.h0 = h.current();
    else
      out.h0.resize(0, 0);
    store.report_to(out.stats);
    if (!detail::keep_across_steps(net, batch))  // (before the gradient's copy is made)
      ws->clear_except({store_slot, names_slot});
    detail::flat_gradient_into(net, out);
  }
};

}  // namespace moonwalk
