// Moonwalk — when is a Moonwalk gradient accurate enough? One rule, shared by
// moonwalk-gradcheck and the property tests.
//
// A Moonwalk sweep recovers h_i = J_i⁻ᵀ h_{i−1} layer by layer, so its error is
// not a constant: it grows with depth and with how much each layer shrank the
// cotangent in the reverse pass (docs/design.md §5). A fixed tolerance would be either
// too loose for shallow networks or fail healthy deep ones. Instead the
// gradient is judged against the engine's own error model, the a-posteriori
// estimate `stats.error_estimate` (the end-of-sweep mismatch between the
// reconstructed h_L and ∂ℓ/∂x_L, and the mismatch at every anchor):
//
//   pass  ⇔  err_vs_backprop ≤ max(c · u · L, 10 · estimate)     (1)
//         ∧  estimate ≤ T   (T = tolerance, default_target<S>())  (2)
//
//   err_vs_backprop  relative error against backprop in the same scalar type
//                    (per parameter tensor: max|g − g_bp| / max|g_bp|,
//                    maximised over tensors)
//   u                unit roundoff of S (2⁻²⁴ for float, 2⁻⁵³ for double)
//   L                number of layers
//   c = 8            rounding floor: with a perfectly conditioned network the
//                    estimate can be exactly 0 (or far below the true error)
//                    while both gradients still carry ordinary rounding, a few
//                    u per layer from the forward, vijp and weight-vjp of the
//                    sweep and the same again in backprop.
//
// (1) says the true error is within 10× of what the engine predicted (the
// estimate was measured to sit 1–10× above the worst error; docs/design.md §5), so the
// estimate can be trusted; (2) says the prediction itself is good enough: a
// gradient whose own estimate exceeds the library's fidelity target fails even
// when it happens to be accurate, because a user could not have known. Any
// NaN or infinity fails.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <limits>
#include <type_traits>

namespace moonwalk {

/// Unit roundoff u = ε / 2 of S (2⁻²⁴ for float, 2⁻⁵³ for double).
template <class S>
constexpr double unit_roundoff() {
  return static_cast<double>(std::numeric_limits<S>::epsilon()) / 2;
}

/// The library's default fidelity target for a Moonwalk gradient's estimated
/// relative error: 1e-4 for float, 1e-10 for double.
template <class S>
constexpr double default_target() {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>,
                "Moonwalk: default_target<S> is defined for float and double");
  if constexpr (std::is_same_v<S, float>)
    return 1e-4;
  else
    return 1e-10;
}

/// The constant c of the rounding floor c · u · L (see the header comment).
inline constexpr double error_model_rounding_constant = 8;

/// The largest error against backprop rule (1) accepts: max(c · u · L, 10 · estimate).
template <class S>
double error_model_bound(double estimate, std::size_t layers) {
  const double floor = error_model_rounding_constant * unit_roundoff<S>() * static_cast<double>(layers);
  return std::max(floor, 10 * estimate);
}

/// True when a Moonwalk gradient passes the error model: rules (1) and (2) of
/// the header comment, with T = `tolerance` (0: default_target<S>()). NaN or
/// infinite inputs fail.
template <class S>
bool within_error_model(double err_vs_backprop, double estimate, std::size_t layers, double tolerance = 0) {
  if (!std::isfinite(err_vs_backprop) || !std::isfinite(estimate)) return false;
  const double target = tolerance > 0 ? tolerance : default_target<S>();
  return err_vs_backprop <= error_model_bound<S>(estimate, layers) && estimate <= target;
}

}  // namespace moonwalk
