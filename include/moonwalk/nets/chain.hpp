// Moonwalk — a chain of layers is itself a layer (for coupling branches F, G).
//
// These implement the layer contract for any walkable network (Sequential,
// Network) by walking its layers; vjps keep the chain's intermediate inputs
// only for the duration of the call (a local backprop inside the block).
// A chain's amplification multiplies its layers' (κ(J_L⋯J_1) ≤ Π κ(J_i)).
#pragma once

#include <span>
#include <sstream>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/ops.hpp"

namespace moonwalk::detail {

/// J dx = J_L ⋯ J_1 dx
template <class N, class S = typename N::scalar_type>
Matrix<S> chain_jvp(const N& net, const CRef<S>& x0, const CRef<S>& dx) {
  check_rows(net, "input", x0, net.in_features());
  check_rows(net, "tangent", dx, net.in_features(), x0.cols());
  Matrix<S> x = x0, t = dx;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      t = l.jvp(x, t);
      if (i + 1 < net.size()) x = l.forward(x);
    });
  return t;
}

/// J_θ dθ: t_i = J_i t_{i−1} + J_{θ,i} dθ_i, t_0 = 0.
template <class N, class S = typename N::scalar_type>
Matrix<S> chain_jvp_params(const N& net, const CRef<S>& x0, const CVecRef<S>& dtheta) {
  check_rows(net, "input", x0, net.in_features());
  Matrix<S> x = x0, t = Matrix<S>::Zero(x0.rows(), x0.cols());
  Index o = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      const Index p = l.num_params();
      t = l.jvp(x, t);
      if (p > 0) t += l.jvp_params(x, dtheta.segment(o, p));
      o += p;
      if (i + 1 < net.size()) x = l.forward(x);
    });
  return t;
}

/// The inputs x_0..x_{L−1} of every layer (local to one vjp call).
template <class N, class S = typename N::scalar_type>
std::vector<Matrix<S>> chain_inputs(const N& net, const CRef<S>& x0) {
  check_rows(net, "input", x0, net.in_features());
  std::vector<Matrix<S>> xs;
  xs.reserve(net.size());
  xs.emplace_back(x0);
  for (std::size_t i = 0; i + 1 < net.size(); ++i)
    net.visit(i, [&](const auto& l) { xs.push_back(l.forward(xs.back())); });
  return xs;
}

/// Jᵀ h = J_1ᵀ ⋯ J_Lᵀ h
template <class N, class S = typename N::scalar_type>
Matrix<S> chain_vjp(const N& net, const CRef<S>& x0, const CRef<S>& h) {
  check_rows(net, "cotangent", h, net.out_features(), x0.cols());
  const auto xs = chain_inputs(net, x0);
  Matrix<S> g = h;
  for (std::size_t i = net.size(); i-- > 0;) net.visit(i, [&](const auto& l) { g = l.vjp(xs[i], g); });
  return g;
}

/// g += J_θᵀ h, by a local backprop through the chain.
template <class N, class S = typename N::scalar_type>
void chain_vjp_params(const N& net, const CRef<S>& x0, const CRef<S>& h, VecRef<S> grad) {
  check_rows(net, "cotangent", h, net.out_features(), x0.cols());
  const auto xs = chain_inputs(net, x0);
  std::vector<Index> off{0};
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) { off.push_back(off.back() + l.num_params()); });
  Matrix<S> g = h;
  for (std::size_t i = net.size(); i-- > 0;)
    net.visit(i, [&](const auto& l) {
      const Index p = l.num_params();
      if (p > 0) l.vjp_params(xs[i], g, grad.segment(off[i], p));
      if (i > 0) g = l.vjp(xs[i], g);
    });
}

template <class N>
Index chain_num_params(const N& net) {
  Index p = 0;
  for (std::size_t i = 0; i < net.size(); ++i) net.visit(i, [&](const auto& l) { p += l.num_params(); });
  return p;
}

template <class N, class Span>
std::vector<Span> chain_blocks(N& net, bool gradients) {
  std::vector<Span> out;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](auto& l) {
      for (auto b : gradients ? gradient_blocks(l) : parameter_blocks(l))
        if (!b.empty()) out.push_back(b);
    });
  return out;
}

template <class N>
std::string chain_name(const N& net, const char* kind) {
  std::ostringstream s;
  s << kind << "[";
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) { s << (i ? ", " : "") << l.name(); });
  s << "]";
  return s.str();
}

}  // namespace moonwalk::detail

namespace moonwalk {

/// The layer contract for a chain, written once (CRTP): Sequential and
/// Network derive from it and provide size(), visit(), in_features(),
/// out_features() and `static constexpr const char* chain_kind`.
template <class Derived, class S>
class ChainLayer {
 public:
  /// x_L
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    detail::check_rows(self(), "input", x, self().in_features());
    Matrix<S> h = x;
    for (std::size_t i = 0; i < self().size(); ++i) self().visit(i, [&](const auto& l) { h = l.forward(h); });
    return h;
  }
  [[nodiscard]] std::string name() const { return detail::chain_name(self(), Derived::chain_kind); }
  /// J dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    return detail::chain_jvp(self(), x, dx);
  }
  /// J_θ dθ
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dt) const {
    return detail::chain_jvp_params(self(), x, dt);
  }
  /// Jᵀ h (local backprop through the chain)
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    return detail::chain_vjp(self(), x, h);
  }
  /// g += J_θᵀ h
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::chain_vjp_params(self(), x, h, g);
  }
  [[nodiscard]] Index num_params() const { return detail::chain_num_params(self()); }
  /// Π_i amplification of layer i at x_{i−1}, from its own residual (the
  /// product bounds κ of the chain's Jacobian; unknown if any layer is).
  [[nodiscard]] Amplification amplification(const Matrix<S>& x) const {
    detail::check_rows(self(), "input", x, self().in_features());
    Amplification a;
    Matrix<S> h = x;
    for (std::size_t i = 0; i < self().size(); ++i)
      self().visit(i, [&](const auto& l) {
        a *= moonwalk::amplification(l, moonwalk::save_residual(l, h));
        if (i + 1 < self().size()) h = l.forward(h);
      });
    return a;
  }
  /// Every layer can be carried in double (core/amplification.hpp).
  [[nodiscard]] bool castable_to_double() const {
    bool ok = true;
    for (std::size_t i = 0; i < self().size(); ++i)
      self().visit(i, [&](const auto& l) { ok = ok && moonwalk::castable_to_double(l); });
    return ok;
  }
  std::vector<std::span<S>> parameter_blocks() {
    return detail::chain_blocks<Derived, std::span<S>>(self(), false);
  }
  [[nodiscard]] std::vector<std::span<const S>> parameter_blocks() const {
    return detail::chain_blocks<const Derived, std::span<const S>>(self(), false);
  }
  std::vector<std::span<S>> gradient_blocks() {
    return detail::chain_blocks<Derived, std::span<S>>(self(), true);
  }
  [[nodiscard]] std::vector<std::span<const S>> gradient_blocks() const {
    return detail::chain_blocks<const Derived, std::span<const S>>(self(), true);
  }

 private:
  Derived& self() { return static_cast<Derived&>(*this); }
  const Derived& self() const { return static_cast<const Derived&>(*this); }
};

}  // namespace moonwalk
