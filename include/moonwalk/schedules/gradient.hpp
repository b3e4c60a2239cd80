// Moonwalk — the one entry point: gradient(schedule, net, x, loss, target).
#pragma once

#include "moonwalk/nets/network.hpp"
#include "moonwalk/nets/parameters.hpp"
#include "moonwalk/schedules/result.hpp"

namespace moonwalk {

/// A schedule is a policy object with a name and a `run` over a network.
template <class Sch, class N, class L>
concept ScheduleFor = Net<N> && requires(const Sch& s, N& net, const Matrix<typename N::scalar_type>& x,
                                         const L& loss, const typename L::target_type& t) {
  { s.name() } -> std::convertible_to<std::string>;
  { s.run(net, x, loss, t) } -> std::same_as<GradientResult<typename N::scalar_type>>;
};

/// Runs `schedule` on `net` for input batch x (in_features × batch) and
/// `loss` against `target`; returns the loss, ∂ℓ/∂θ (flat, also left in the
/// layers' gradient storage), h_0 = ∂ℓ/∂x_0 and the schedule's stats.
template <Net N, class Sch, class L>
requires ScheduleFor<Sch, N, L> GradientResult<typename N::scalar_type> gradient(
    const Sch& schedule, N& net, const CRef<typename N::scalar_type>& x, const L& loss,
    const typename L::target_type& target) {
  if (net.size() == 0) throw ShapeError(std::string(schedule.name()) + ": empty network");
  detail::check_rows(std::string(schedule.name()) + ": network input", "batch", x, net.in_features());
  return schedule.run(net, x, loss, target);
}

namespace detail {

/// Calls f(i, layer_i) for i = 0..L−1.
template <Net N, class F>
void for_each_layer(N& net, F&& f) {
  for (std::size_t i = 0; i < net.size(); ++i) net.visit(i, [&](auto& l) { f(i, l); });
}

/// Calls f(i, layer_i) for i = L−1..0.
template <Net N, class F>
void for_each_layer_reverse(N& net, F&& f) {
  for (std::size_t i = net.size(); i-- > 0;) net.visit(i, [&](auto& l) { f(i, l); });
}

/// ℓ(y, t), with ∂ℓ/∂y written into g: the loss's value_and_gradient_into
/// when it has one (no allocation once g has its shape), else its
/// value_and_gradient.
template <class L, class S>
S loss_into(const L& loss, const CRef<S>& y, const typename L::target_type& t, Matrix<S>& g) {
  detail::safe_resize(g, y.rows(), y.cols());
  if constexpr (requires { loss.value_and_gradient_into(y, t, g); }) {
    return loss.value_and_gradient_into(y, t, g);
  } else {
    auto vg = loss.value_and_gradient(y, t);
    g = std::move(vg.second);
    return vg.first;
  }
}

/// x_L = f(x_0) keeping nothing; sets out.loss = ℓ(x_L) and returns g_L = ∂ℓ/∂x_L.
template <Net N, class L>
Matrix<typename N::scalar_type> output_cotangent(N& net, const CRef<typename N::scalar_type>& x0,
                                                 const L& loss, const typename L::target_type& target,
                                                 GradientResult<typename N::scalar_type>& out) {
  Matrix<typename N::scalar_type> x = x0;
  for_each_layer(net, [&](std::size_t, auto& l) {
    x = l.forward(x);
    ++out.stats.counts.forward;
  });
  auto vg = loss.value_and_gradient(x, target);
  out.loss = vg.first;
  return std::move(vg.second);
}

}  // namespace detail
}  // namespace moonwalk
