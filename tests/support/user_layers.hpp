// Test layers written the way a user would: only the base contract.
#pragma once

#include <moonwalk/moonwalk.hpp>
#include <string>

namespace moonwalk_test {

using moonwalk::CRef;
using moonwalk::CVecRef;
using moonwalk::Index;
using moonwalk::Matrix;
using moonwalk::VecRef;

/// y = x + a·x³ with one parameter a: forward, jvp and vjp only (no vijp, no
/// residual protocol). Mixed Moonwalk must anchor its output cotangent and
/// keep its input as an activation residual.
template <class S>
struct CubicVjpOnly {
  using scalar_type = S;
  Index n;
  S a = S(0.1);
  S grad_a = 0;

  [[nodiscard]] Index in_features() const { return n; }
  [[nodiscard]] Index out_features() const { return n; }
  [[nodiscard]] std::string name() const { return "cubic_vjp_only(" + std::to_string(n) + ")"; }
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    return x + a * x.cwiseProduct(x).cwiseProduct(x);
  }
  /// J dx = (1 + 3a x²) ⊙ dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    return (S(1) + 3 * a * x.array().square()).matrix().cwiseProduct(dx);
  }
  /// J_a da = x³ da
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& da) const {
    return da(0) * x.cwiseProduct(x).cwiseProduct(x);
  }
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const { return jvp(x, h); }
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    g(0) += x.cwiseProduct(x).cwiseProduct(x).cwiseProduct(h).sum();
  }
  [[nodiscard]] Index num_params() const { return 1; }
  std::span<S> parameters() { return {&a, 1}; }
  [[nodiscard]] std::span<const S> parameters() const { return {&a, 1}; }
  std::span<S> gradients() { return {&grad_a, 1}; }
  [[nodiscard]] std::span<const S> gradients() const { return {&grad_a, 1}; }
};

}  // namespace moonwalk_test
