// Moonwalk — the forward sweep shared by the Moonwalk schedules.
#pragma once

#include <algorithm>
#include <sstream>
#include <vector>

#include "moonwalk/core/ops.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Which layers keep their output cotangent h_i as an anchor in the reverse
/// pass: every k-th layer and/or an explicit list (0-based layer indices).
/// Layers that are neither submersive nor fragmental are anchored whatever
/// this says. The tolerance-driven policy builds on this mechanism.
struct Anchors {
  std::size_t every = 0;          ///< 0: none; k: layers k−1, 2k−1, … (not the last)
  std::vector<std::size_t> at{};  ///< explicit layer indices

  [[nodiscard]] std::vector<bool> mask(std::size_t layers) const {
    std::vector<bool> m(layers, false);
    if (every > 0)
      for (std::size_t i = every - 1; i + 1 < layers; i += every) m[i] = true;
    for (std::size_t i : at) {
      if (i >= layers) {
        std::ostringstream s;
        s << "Anchors: layer " << i << " does not exist (network has " << layers << " layers)";
        throw ScheduleError(s.str());
      }
      m[i] = true;
    }
    return m;
  }
};

namespace detail {

/// How each layer is crossed by the sweep (vijp, fragment or anchor).
template <Net N>
std::vector<SweepMode> sweep_modes(const N& net) {
  std::vector<SweepMode> m(net.size());
  for (std::size_t i = 0; i < net.size(); ++i) net.visit(i, [&](const auto& l) { m[i] = sweep_mode(l); });
  return m;
}

/// The forward sweep (DESIGN §1): from x_0 and h_0, for i = 1..L
///   x_i = f_i(x_{i−1});
///   h_i = vijp(x_{i−1}, h_{i−1})            (submersive)
///       = vijp_with_fragment(…, φ_i)         (fragmental, φ_i from the store)
///       = anchor h_i                          (anchored; where a reconstruction
///                                              exists, its mismatch is recorded)
///   g_i += J_{θ,i}ᵀ h_i;  drop x_{i−1}.
/// Ends with the a-posteriori check: h_L against ∂ℓ/∂x_L computed from x_L.
/// Returns the largest relative mismatch seen (the error estimate).
template <Net N, class L>
double forward_sweep(N& net, const CRef<typename N::scalar_type>& x0, Matrix<typename N::scalar_type> h,
                     SavedStore& store, const std::vector<SweepMode>& modes, const L& loss,
                     const typename L::target_type& target, Stats& st) {
  using S = typename N::scalar_type;
  double estimate = 0;
  Matrix<S> x = x0;
  for_each_layer(net, [&](std::size_t i, auto& l) {
    using Lyr = std::remove_cvref_t<decltype(l)>;
    Matrix<S> y = l.forward(x);
    ++st.counts.forward;
    if (store.has(i, SavedStore::anchor)) {
      Matrix<S> a = store.take<Matrix<S>>(i, SavedStore::anchor);
      if (modes[i] == SweepMode::vijp) {
        if constexpr (Submersive<Lyr>) {
          estimate = std::max(estimate, rel_max_err(l.vijp(x, h), a));
          ++st.counts.vijp;
        }
      }
      h = std::move(a);
    } else if (modes[i] == SweepMode::vijp) {
      if constexpr (Submersive<Lyr>) h = l.vijp(x, h);
      ++st.counts.vijp;
    } else {
      if constexpr (Fragmental<Lyr>) {
        auto f = store.take<typename Lyr::fragment_type>(i, SavedStore::fragment);
        h = l.vijp_with_fragment(x, h, f);
      }
      ++st.counts.vijp;
    }
    moonwalk::accumulate_vjp_params(l, x, h);
    ++st.counts.vjp_params;
    x = std::move(y);
  });
  const Matrix<S> gL = loss.gradient(x, target);
  estimate = std::max(estimate, rel_max_err(h, gL));
  return estimate;
}

}  // namespace detail
}  // namespace moonwalk
