// Moonwalk — projected forward gradient: k random directions, an unbiased estimate.
#pragma once

#include <cmath>
#include <cstdint>
#include <random>
#include <sstream>

#include "moonwalk/core/ops.hpp"
#include "moonwalk/schedules/forward_mode.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// The forward gradient (Baydin et al. 2022, "Gradients without
/// backpropagation"), over θ and x_0 jointly (D = P + in_features·batch
/// numbers): draw v ~ N(0, I_D) (seeded), carry the joint tangent through one
/// forward pass, t_i = J_i t_{i−1} + J_{θ,i} v_θ,i with t_0 = v_x, read the
/// directional derivative d = ⟨∇ℓ, v⟩ = Σ_b ⟨g_L[:, b], t_L[:, b]⟩ and return
/// ĝ = (1/k) Σ d v (θ part as the gradient, x_0 part as h_0). Unbiased, since
/// E[v vᵀ] = I; its mean squared error is E‖ĝ − ∇ℓ‖² = (D + 1)‖∇ℓ‖² / k.
///
/// Not the gradient: `stats.is_estimate` is true and `stats.error_estimate`
/// is the expected (root-mean-square) relative ℓ2 error √((D + 1)/k), a
/// property of the method rather than of this draw (also
/// `stats.figures["expected_relative_error"]`); `figures["directions"]` = k,
/// `figures["dimension"]` = D. Nothing is kept between passes.
struct ProjForward {
  std::size_t directions = 16;  ///< k
  std::uint64_t seed = 0;

  [[nodiscard]] static std::string name() { return "projforward"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    if (directions == 0) throw ScheduleError(name() + ": needs at least one direction");
    GradientResult<S> out;
    Stats& st = out.stats;
    st.schedule = name();
    SavedStore store(net.size());  // stays empty: nothing is kept between passes
    zero_gradients(net);
    const std::size_t n = net.size();
    const std::vector<Index> offsets = parameter_offsets(net);
    const Index P = offsets.back();

    const Matrix<S> gL = detail::output_cotangent(net, x0, loss, target, out);

    std::mt19937_64 gen(seed);
    std::normal_distribution<double> normal(0.0, 1.0);
    auto draw = [&](Index rows, Index cols) {
      Matrix<S> m(rows, cols);
      for (Index j = 0; j < cols; ++j)
        for (Index i = 0; i < rows; ++i) m(i, j) = static_cast<S>(normal(gen));
      return m;
    };
    // Accumulated in double: k terms of either sign.
    Vector<double> g_sum = Vector<double>::Zero(P);
    Matrix<double> h_sum = Matrix<double>::Zero(x0.rows(), x0.cols());
    for (std::size_t d = 0; d < directions; ++d) {
      const Vector<S> vt = draw(P, 1);
      const Matrix<S> vx = draw(x0.rows(), x0.cols());
      Matrix<S> xi = x0, t = vx;
      for (std::size_t i = 0; i < n; ++i)
        net.visit(i, [&](const auto& l) {
          const Index p = l.num_params();
          t = l.jvp(xi, t);
          ++st.counts.jvp;
          if (p > 0) {
            t += l.jvp_params(xi, vt.segment(offsets[i], p));
            ++st.counts.jvp_params;
          }
          if (i + 1 < n) {
            xi = l.forward(xi);
            ++st.counts.forward;
          }
        });
      const double dd = static_cast<double>(gL.cwiseProduct(t).sum());
      g_sum += dd * vt.template cast<double>();
      h_sum += dd * vx.template cast<double>();
    }
    const double inv_k = 1.0 / static_cast<double>(directions);
    const Vector<S> g = (g_sum * inv_k).template cast<S>();
    out.h0 = (h_sum * inv_k).template cast<S>();
    for (std::size_t i = 0; i < n; ++i)
      net.visit(i, [&](auto& l) {
        const Index p = l.num_params();
        if (p > 0) detail::add_to_gradients(l, Vector<S>(g.segment(offsets[i], p)));
      });
    out.gradient = get_gradients(net);

    const double D = static_cast<double>(P + x0.size());
    st.is_estimate = true;
    st.error_estimate = std::sqrt((D + 1) / static_cast<double>(directions));
    st.figures["expected_relative_error"] = st.error_estimate;
    st.figures["directions"] = static_cast<double>(directions);
    st.figures["dimension"] = D;
    store.report_to(st);
    return out;
  }
};

}  // namespace moonwalk
