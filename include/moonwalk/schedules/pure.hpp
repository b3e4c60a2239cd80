// Moonwalk — pure-forward Moonwalk: h_0 by forward-mode jvps, then the forward sweep.
#pragma once

#include <cmath>
#include <sstream>

#include "moonwalk/fidelity/policy.hpp"
#include "moonwalk/fidelity/retry.hpp"
#include "moonwalk/schedules/detail/sweep.hpp"

namespace moonwalk {

namespace detail {
template <class L>
struct sweep_capable : std::bool_constant<SweepCapable<L>> {};

/// Directional derivatives of ℓ along unit tangents at x_start (the input of
/// layer `start`): for each feature k, carry t = e_k (every column) through
/// layers start..L−1 with jvps (in scalar type C; layers cast when C differs),
/// then ∂ℓ/∂x_start[k, b] = ⟨g_L[:, b], t_L[:, b]⟩.
template <class C, Net N>
Matrix<C> cotangent_by_jvps(N& net, CastLayers<C>& casts, std::size_t start,
                            const Matrix<typename N::scalar_type>& x_start,
                            const Matrix<typename N::scalar_type>& gL, Stats& st) {
  using S = typename N::scalar_type;
  const Index n = x_start.rows(), B = x_start.cols();
  const Matrix<C> gLc = in_scalar<C>(gL);
  Matrix<C> h(n, B);
  for (Index k = 0; k < n; ++k) {
    Matrix<S> x = x_start;
    Matrix<C> t = Matrix<C>::Zero(n, B);
    t.row(k).setOnes();
    for (std::size_t i = start; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        t = casts(i, l).jvp(in_scalar<C>(x), t);
        ++st.counts.jvp;
        if (i + 1 < net.size()) {
          x = l.forward(x);
          ++st.counts.forward;
        }
      });
    h.row(k) = gLc.cwiseProduct(t).colwise().sum();
  }
  return h;
}
}  // namespace detail

/// No reverse pass. h_0 = ∂ℓ/∂x_0 by n_0 forward-mode jvps (one per input
/// feature, all batch columns together); at each fragmental layer i, h_i by
/// n_i jvps of the tail, of which only the fragment is kept. Then the sweep.
/// Every layer must be submersive or fragmental (there is nothing to anchor
/// from): a compile-time error for Sequential, ScheduleError for Network; and
/// no layer may couple the samples of its batch (core/step.hpp; ScheduleError).
struct PureMoonwalk {
  /// Default: verify, escalating a float network's cotangents to double when
  /// the estimate is above the tolerance (no anchors: there is no reverse pass);
  /// a later step on the same shape starts in double (Fidelity::memory).
  Fidelity fidelity{};

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
    // A tangent e_k set in every column is one pass for the whole batch only
    // while the samples do not interact.
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        if (moonwalk::couples_batch(l))
          throw ScheduleError(
              detail::cat("pure: layer ", i, " ", l.name(),
                          " couples the samples of its batch (BatchNorm in training); pure-forward "
                          "Moonwalk's batched tangents would mix them (use mixed)"));
      });

    // Working precision, then (float networks) double cotangents; the
    // estimate is always reported, and `within_tolerance` says whether the
    // returned gradient holds the tolerance (pure-forward has no reverse pass
    // to anchor from, so nothing else can be done).
    const double tol = fidelity.target<S>();
    bool use_double = fidelity.precision == Precision::double_cotangents;
    const bool can_double = detail::double_possible<N> && detail::castable_to_double(net);
    if (use_double && !can_double && !std::is_same_v<S, double>)
      throw ScheduleError("pure: double cotangents asked for, but a layer offers no cast<double>()");
    std::size_t peak = 0;
    // The precision the last step on this shape ended in (Fidelity::memory).
    const bool remember =
        fidelity.memory && fidelity.precision == Precision::automatic && can_double && fidelity.verify;
    const std::uint64_t shape = remember ? detail::shape_key(net, x0.cols(), 1) : 0;
    const bool remembered = remember && !use_double && fidelity.memory->starts_in_double(shape);
    use_double = use_double || remembered;
    // Its one move is double cotangents (fidelity/retry.hpp), and it accepts
    // an estimate up to the tolerance itself: there is nothing to fall back on.
    FidelityRetry retry(RetrySetup{
        .tolerance = tol,
        .verify = fidelity.verify,
        .accept = 1,
        .can_escalate = can_double && fidelity.precision != Precision::working,
        .start_in_double = use_double,
        .moves = {.densify_anchors = false, .keep_inputs = false, .backprop = false},
    });
    GradientResult<S> out;
    for (;;) {
      if constexpr (detail::double_possible<N>)
        out = retry.settings().in_double ? attempt<double>(net, x0, modes, loss, target)
                                         : attempt<S>(net, x0, modes, loss, target);
      else
        out = attempt<S>(net, x0, modes, loss, target);
      peak = std::max(peak, out.stats.residual_bytes);
      // (A non-finite loss is no rounding double cotangents could repair.)
      if (retry.after({.finite = std::isfinite(out.loss), .estimate = out.stats.error_estimate}) ==
          Retry::accept)
        break;
    }
    use_double = retry.settings().in_double;
    const std::size_t fallbacks = retry.fallbacks();
    if (remember) fidelity.memory->settled(shape, use_double);
    if (remembered) out.stats.figures["precision_remembered"] = 1;
    out.stats.tolerance = tol;
    out.stats.within_tolerance = out.stats.error_estimate <= tol;
    out.stats.fallbacks = fallbacks;
    out.stats.residual_bytes = peak;
    return out;
  }

 private:
  template <class C, Net N, class L>
  GradientResult<typename N::scalar_type> attempt(N& net, const CRef<typename N::scalar_type>& x0,
                                                  const std::vector<SweepMode>& modes, const L& loss,
                                                  const typename L::target_type& target) const {
    using S = typename N::scalar_type;
    GradientResult<S> out;
    Stats& st = out.stats;
    st.schedule = name();
    st.precision = detail::scalar_name<C>();
    SavedStore store(net.size());
    detail::CastLayers<C> casts(net.size());
    zero_gradients(net);

    // x_L and g_L = ∂ℓ/∂x_L (nothing kept).
    const Matrix<S> gL = detail::output_cotangent(net, x0, loss, target, out);
    if (!std::isfinite(out.loss)) {  // (no gradient to recover: run stops)
      detail::no_gradient(net, x0.cols(), out);
      return out;
    }
    Matrix<S> x;

    // Fragments: h_i at each fragmental layer by tail jvps; keep only φ_i.
    x = x0;
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      Matrix<S> y = l.forward(x);
      ++st.counts.forward;
      if (modes[i] == SweepMode::fragment) {
        decltype(auto) lc = casts(i, l);
        using Lc = std::remove_cvref_t<decltype(lc)>;
        if constexpr (Fragmental<Lc>) {
          const Matrix<C> hi = i + 1 < net.size() ? detail::cotangent_by_jvps<C>(net, casts, i + 1, y, gL, st)
                                                  : detail::in_scalar<C>(gL);
          store.put(i, SavedStore::fragment, l.name(),
                    lc.save_fragment(moonwalk::save_residual(lc, detail::in_scalar<C>(x)), hi));
        }
      }
      x = std::move(y);
    });
    x.resize(0, 0);

    Matrix<C> h0 = detail::cotangent_by_jvps<C>(net, casts, 0, Matrix<S>(x0), gL, st);
    if constexpr (std::is_same_v<C, S>)
      out.h0 = h0;
    else
      out.h0 = h0.template cast<S>();
    detail::Workspace ws;  // (pure Moonwalk's tail jvps dominate its cost: buffers are not kept across steps)
    detail::PingPong<C> h = detail::cotangent_buffers<C>(ws);
    h.assign(h0);
    st.error_estimate = detail::forward_sweep<C>(net, casts, /*casts_in_ws=*/false, ws, false, x0, h,
                                                 /*from_h1=*/false, store, modes, loss, target, st);
    st.working_bytes = 0;  // (the sweep's figure would leave out the jvp phase: not accounted here)
    out.gradient = get_gradients(net);
    store.report_to(st);
    return out;
  }
};

}  // namespace moonwalk
