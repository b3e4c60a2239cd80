// Moonwalk — naive forward mode: one tangent pass per parameter, O(P·L).
#pragma once

#include "moonwalk/core/ops.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

namespace detail {

/// Adds the flat vector g (num_params() entries, flat order) to the layer's
/// gradient storage.
template <Layer Lyr>
void add_to_gradients(Lyr& l, const Vector<typename Lyr::scalar_type>& g) {
  using S = typename Lyr::scalar_type;
  Index o = 0;
  for (auto b : moonwalk::gradient_blocks(l)) {
    const auto n = static_cast<Index>(b.size());
    Eigen::Map<Vector<S>>(b.data(), n) += g.segment(o, n);
    o += n;
  }
}

/// ∂ℓ/∂x_0 by forward mode (plan/plan.hpp's tangents(0)): for each feature
/// k, carry t = e_k (every column) through the layers with jvps, their inputs
/// recomputed alongside; then ∂ℓ/∂x_0[k, b] = ⟨g_L[:, b], t_L[:, b]⟩.
template <Net N>
Matrix<typename N::scalar_type> input_gradient_by_jvps(N& net, const CRef<typename N::scalar_type>& x0,
                                                       const Matrix<typename N::scalar_type>& gL, Stats& st) {
  using S = typename N::scalar_type;
  const Index n = x0.rows(), B = x0.cols();
  Matrix<S> h(n, B);
  for (Index k = 0; k < n; ++k) {
    Matrix<S> x = x0;
    Matrix<S> t = Matrix<S>::Zero(n, B);
    t.row(k).setOnes();
    for (std::size_t i = 0; i < net.size(); ++i)
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

/// The forward-mode baseline: nothing kept, one jvp pass per parameter.
///
/// For every parameter p (owned by layer i, local index q): recompute x_i
/// from the input, start the tangent t = J_{θ,i} e_q (jvp_params with a unit
/// vector), carry t_j = J_j t_{j−1} through the layers after i (recomputing
/// their inputs alongside), and read ∂ℓ/∂θ_p = Σ_b ⟨g_L[:, b], t_L[:, b]⟩,
/// g_L = ∂ℓ/∂x_L. Forward calls: L + P·(L − 1) + n_0·(L − 1); jvp_params: P;
/// jvps: Σ_i P_i·(L − 1 − i) + n_0·L. h_0 by one jvp pass per input feature
/// (as pure-forward Moonwalk).
struct NaiveForward {
  [[nodiscard]] static std::string name() { return "forward"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    GradientResult<S> out;
    Stats& st = out.stats;
    st.schedule = name();
    SavedStore store(net.size());  // stays empty: nothing is kept between passes
    zero_gradients(net);
    const std::size_t n = net.size();

    const Matrix<S> gL = detail::output_cotangent(net, x0, loss, target, out);

    for (std::size_t i = 0; i < n; ++i) {
      Index P = 0;
      net.visit(i, [&](const auto& l) { P = l.num_params(); });
      if (P == 0) continue;
      Vector<S> g(P);
      for (Index q = 0; q < P; ++q) {
        // x_i (the owner's input), recomputed from the input.
        Matrix<S> xi = x0;
        for (std::size_t j = 0; j < i; ++j) {
          net.visit(j, [&](const auto& l) { xi = l.forward(xi); });
          ++st.counts.forward;
        }
        Matrix<S> t;
        net.visit(i, [&](const auto& l) {
          Vector<S> e = Vector<S>::Zero(P);
          e(q) = S(1);
          t = l.jvp_params(xi, e);
          ++st.counts.jvp_params;
          if (i + 1 < n) {
            xi = l.forward(xi);
            ++st.counts.forward;
          }
        });
        for (std::size_t j = i + 1; j < n; ++j)
          net.visit(j, [&](const auto& l) {
            t = l.jvp(xi, t);
            ++st.counts.jvp;
            if (j + 1 < n) {
              xi = l.forward(xi);
              ++st.counts.forward;
            }
          });
        g(q) = gL.cwiseProduct(t).sum();
      }
      net.visit(i, [&](auto& l) { detail::add_to_gradients(l, g); });
    }

    out.h0 = detail::input_gradient_by_jvps(net, x0, gL, st);
    out.gradient = get_gradients(net);
    store.report_to(st);
    return out;
  }
};

}  // namespace moonwalk
