// Moonwalk — pure-forward Moonwalk: h_0 by forward-mode jvps, then the forward sweep.
#pragma once

#include <sstream>

#include "moonwalk/schedules/detail/sweep.hpp"

namespace moonwalk {

namespace detail {
template <class L>
struct sweep_capable : std::bool_constant<SweepCapable<L>> {};

/// Directional derivatives of ℓ along unit tangents at x_start (the input of
/// layer `start`): for each feature k, carry t = e_k (every column) through
/// layers start..L−1 with jvps, then ∂ℓ/∂x_start[k, b] = ⟨g_L[:, b], t_L[:, b]⟩.
template <Net N>
Matrix<typename N::scalar_type> cotangent_by_jvps(N& net, std::size_t start,
                                                  const Matrix<typename N::scalar_type>& x_start,
                                                  const Matrix<typename N::scalar_type>& gL, Stats& st) {
  using S = typename N::scalar_type;
  const Index n = x_start.rows(), B = x_start.cols();
  Matrix<S> h(n, B);
  for (Index k = 0; k < n; ++k) {
    Matrix<S> x = x_start;
    Matrix<S> t = Matrix<S>::Zero(n, B);
    t.row(k).setOnes();
    for (std::size_t i = start; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        t = l.jvp(x, t);
        ++st.counts.jvp;
        if (i + 1 < net.size()) {
          x = l.forward(x);
          ++st.counts.forward;
        }
      });
    h.row(k) = gL.cwiseProduct(t).colwise().sum();
  }
  return h;
}
}  // namespace detail

/// No reverse pass. h_0 = ∂ℓ/∂x_0 by n_0 forward-mode jvps (one per input
/// feature, all batch columns together); at each fragmental layer i, h_i by
/// n_i jvps of the tail, of which only the fragment is kept. Then the sweep.
/// Every layer must be submersive or fragmental (there is nothing to anchor
/// from): a compile-time error for Sequential, ScheduleError for Network.
struct PureMoonwalk {
  [[nodiscard]] static std::string name() { return "pure"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    if constexpr (N::is_static)
      static_assert(
          N::template all_layers<detail::sweep_capable>,
          "Moonwalk: PureMoonwalk needs every layer to be Submersive or Fragmental; a layer with "
          "neither has no reverse pass to anchor from under pure-forward Moonwalk: use MixedMoonwalk");
    const std::vector<SweepMode> modes = detail::sweep_modes(net);
    for (std::size_t i = 0; i < net.size(); ++i)
      if (modes[i] == SweepMode::anchor) {
        std::ostringstream s;
        net.visit(i, [&](const auto& l) { s << "pure: layer " << i << " " << l.name(); });
        s << " is neither submersive nor fragmental; pure-forward Moonwalk cannot cross it (use mixed)";
        throw ScheduleError(s.str());
      }

    GradientResult<S> out;
    Stats& st = out.stats;
    st.schedule = name();
    SavedStore store(net.size());
    zero_gradients(net);

    // x_L and g_L = ∂ℓ/∂x_L (nothing kept).
    const Matrix<S> gL = detail::output_cotangent(net, x0, loss, target, out);
    Matrix<S> x;

    // Fragments: h_i at each fragmental layer by tail jvps; keep only φ_i.
    x = x0;
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      using Lyr = std::remove_cvref_t<decltype(l)>;
      Matrix<S> y = l.forward(x);
      ++st.counts.forward;
      if (modes[i] == SweepMode::fragment) {
        if constexpr (Fragmental<Lyr>) {
          const Matrix<S> hi = i + 1 < net.size() ? detail::cotangent_by_jvps(net, i + 1, y, gL, st) : gL;
          store.put(i, SavedStore::fragment, l.name(), l.save_fragment(moonwalk::save_residual(l, x), hi));
        }
      }
      x = std::move(y);
    });
    x.resize(0, 0);

    out.h0 = detail::cotangent_by_jvps(net, 0, Matrix<S>(x0), gL, st);
    st.error_estimate = detail::forward_sweep(net, x0, out.h0, store, modes, loss, target, st);
    out.gradient = get_gradients(net);
    store.report_to(st);
    return out;
  }
};

}  // namespace moonwalk
