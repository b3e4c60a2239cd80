// Moonwalk — small numeric helpers for checking gradients: seeded Gaussian
// matrices, relative errors and inner products in double, and a way to run
// code expecting an exception. Used by the layer checker
// (testing/check_layer.hpp) and the repository's tests.
#pragma once

#include <cstdint>
#include <exception>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>

#include "moonwalk/core/init.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk::testing {

template <class S>
using Mat = moonwalk::Matrix<S>;
template <class S>
using Vec = moonwalk::Vector<S>;

template <class S>
constexpr const char* scalar_name() {
  return std::is_same_v<S, float> ? "float" : "double";
}

/// A seeded `rows × cols` matrix of N(0, 1) draws, held in double.
inline Mat<double> randn(Index rows, Index cols, std::uint64_t seed) {
  return moonwalk::gaussian<double>(rows, cols, seed);
}

/// ‖a − b‖_F / ‖b‖_F, computed in double (‖a − b‖_F when b = 0).
/// Shapes must agree (a mismatch is reported as +∞, never read out of bounds).
template <class A, class B>
double rel_err(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
  const Mat<double> ad = a.template cast<double>(), bd = b.template cast<double>();
  const double den = bd.norm(), num = (ad - bd).norm();
  return den > 0 ? num / den : num;
}

/// ⟨a, b⟩ in double.
template <class A, class B>
double dot(const Eigen::MatrixBase<A>& a, const Eigen::MatrixBase<B>& b) {
  return a.template cast<double>().cwiseProduct(b.template cast<double>()).sum();
}

/// ‖a‖_F in double.
template <class A>
double norm(const Eigen::MatrixBase<A>& a) {
  return a.template cast<double>().norm();
}

/// Result of running `f` expecting an exception of type E.
struct Thrown {
  enum Kind { nothing, expected, other } kind = nothing;
  std::string message;  ///< what() of the exception caught (either kind)
  [[nodiscard]] bool ok() const { return kind == expected; }
  [[nodiscard]] bool contains(const std::string& s) const { return message.find(s) != std::string::npos; }
};

/// Runs f and reports whether it threw an E (and its message).
template <class E, class F>
Thrown catch_as(F&& f) {
  try {
    f();
  } catch (const E& e) {
    return {Thrown::expected, e.what()};
  } catch (const std::exception& e) {
    return {Thrown::other, e.what()};
  } catch (...) {
    return {Thrown::other, "(not a std::exception)"};
  }
  return {};
}

}  // namespace moonwalk::testing
