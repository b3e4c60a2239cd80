// Moonwalk — estimates behind the layers' amplification (core/amplification.hpp).
//
// norm1_estimate: the Hager–Higham 1-norm estimator (LAPACK xLACN2), ‖B‖₁ of
// an operator known only through products with B and Bᵀ (e.g. B = R⁻¹ by
// triangular solves, as xTRCON does): a lower bound, in practice exact or
// within a factor ~3, at the cost of ≤ 5 + 1 products with each.
//
// probe_typical: the typical amplification of a submersive layer whose
// Jacobian has no cheap closed form, from random probes.
//
// With J (m × n) at one sample and Gaussian probes e (n) and z (m),
// E‖J⁻ᵀ e‖² = ‖J⁺‖_F² and E‖Jᵀ z‖² = ‖J‖_F² (Hutchinson), so
//
//   γ ≈ √(Σ_p ‖vijp(x, e_p)‖² / Σ_p ‖e_p‖²) · √(Σ_p ‖vjp(x, z_p)‖² / Σ_p ‖z_p‖²)
//
// over p = 1..probes draws per sample. Each factor is at most ‖J⁺‖ resp. ‖J‖,
// so the estimate never exceeds κ₂(J); it is an estimate, not a bound.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/init.hpp"

namespace moonwalk::detail {

/// Hager–Higham estimate of ‖B‖₁ for a k × k operator: `apply(v)` overwrites
/// v (a VecRef<double> of size k) with B v, `apply_t(v)` with Bᵀ v. Every
/// candidate is ‖B x‖₁ / ‖x‖₁ for some x, so the result never exceeds ‖B‖₁:
///   x = 1/k;  y = B x;  ξ = sign y;  z = Bᵀ ξ;                 est = ‖y‖₁
///   repeat (≤ 4 times): x = e_j, j = argmax |z_j|;  y = B x;  est = max(est, ‖y‖₁);
///     stop when sign y repeats ξ, ‖y‖₁ stops growing, or argmax |z| repeats j
///   Higham's safeguard: x_i = (−1)ⁱ (1 + i/(k−1)), est = max(est, 2‖B x‖₁ / 3k).
/// `work` (k × at least 4, the caller's) holds the iteration's four vectors,
/// so the estimate allocates nothing.
template <class Apply, class ApplyT>
double norm1_estimate(Index k, Apply apply, ApplyT apply_t, MatRef<double> work) {
  if (k <= 0) return 0;
  eigen_assert(work.rows() == k && work.cols() >= 4);
  auto y = work.col(0), xi = work.col(1), z = work.col(2), xi_new = work.col(3);
  const auto sign = [](double v) { return v >= 0 ? 1.0 : -1.0; };
  y.setConstant(1.0 / static_cast<double>(k));  // y = B x with x = 1/k
  apply(VecRef<double>(y));
  double est = y.lpNorm<1>();
  if (k == 1) return est;
  xi = y.unaryExpr(sign);
  z = xi;  // z = Bᵀ ξ
  apply_t(VecRef<double>(z));
  Index j = 0;
  z.cwiseAbs().maxCoeff(&j);
  for (int iter = 2; iter <= 5; ++iter) {  // LAPACK's ITMAX = 5
    y.setZero();                           // y = B e_j
    y(j) = 1;
    apply(VecRef<double>(y));
    const double previous = est;
    const double now = y.lpNorm<1>();
    est = std::max(est, now);
    xi_new = y.unaryExpr(sign);
    if (xi_new == xi || now <= previous) break;  // converged, or cycling
    xi = xi_new;
    z = xi;
    apply_t(VecRef<double>(z));
    Index j_new = 0;
    z.cwiseAbs().maxCoeff(&j_new);
    if (std::abs(z(j_new)) <= std::abs(z(j))) break;  // the best column repeats
    j = j_new;
  }
  for (Index i = 0; i < k; ++i)
    y(i) = (i % 2 == 0 ? 1.0 : -1.0) * (1.0 + static_cast<double>(i) / static_cast<double>(k - 1));
  apply(VecRef<double>(y));
  return std::max(est, 2.0 * y.lpNorm<1>() / (3.0 * static_cast<double>(k)));
}

/// Per-column Euclidean norms, in double.
template <class Derived>
Vector<double> column_norms(const Eigen::MatrixBase<Derived>& m) {
  return m.template cast<double>().colwise().norm().transpose();
}

/// Per-sample spectral norm ‖J‖₂ of a layer at x (one column per sample) by
/// `iters` steps of power iteration on JᵀJ, every column on its own, from a
/// fixed-seed Gaussian start:  t ← t / ‖t‖;  s = J t (jvp);  t ← Jᵀ s (vjp).
/// Each value is ‖J t‖ for a unit t: a lower bound converging to ‖J‖₂ (an
/// estimate — a start nearly orthogonal to the top singular vector converges slowly).
template <Layer L>
Vector<double> power_norms(const L& l, const CRef<typename L::scalar_type>& x, int iters = 3,
                           std::uint64_t seed = 0x5851f42d4c957f2dULL) {
  using S = typename L::scalar_type;
  Matrix<S> t = gaussian<S>(l.in_features(), x.cols(), seed);
  Vector<double> est = Vector<double>::Zero(x.cols());
  for (int it = 0; it < iters; ++it) {
    for (Index j = 0; j < t.cols(); ++j) {
      const S nt = t.col(j).norm();
      if (nt > S(0)) t.col(j) /= nt;
    }
    const Matrix<S> s = l.jvp(x, t);
    est = est.cwiseMax(column_norms(s));
    if (it + 1 < iters) t = l.vjp(x, s);
  }
  return est;
}

/// γ of a submersive layer estimated on up to `cols` samples of x (the first
/// ones), `probes` Gaussian draws each, fixed seed; the maximum over those
/// samples (header comment).
template <Submersive L>
double probe_typical(const L& l, const CRef<typename L::scalar_type>& x, Index cols = 4, Index probes = 8,
                     std::uint64_t seed = 0x9e3779b97f4a7c15ULL) {
  using S = typename L::scalar_type;
  const Index c = std::min(cols, x.cols());
  if (c == 0 || probes <= 0) return 1;
  const Index m = l.out_features(), n = l.in_features();
  // Every chosen sample repeated `probes` times: one vijp and one vjp for all draws.
  Matrix<S> xr(x.rows(), c * probes);
  for (Index j = 0; j < c; ++j)
    for (Index p = 0; p < probes; ++p) xr.col(j * probes + p) = x.col(j);
  const Matrix<S> e = gaussian<S>(n, c * probes, seed);
  const Matrix<S> z = gaussian<S>(m, c * probes, seed + 1);
  const Vector<double> inv = column_norms(l.vijp(xr, e)), fwd = column_norms(l.vjp(xr, z));
  const Vector<double> ne = column_norms(e), nz = column_norms(z);
  double gamma = 0;
  for (Index j = 0; j < c; ++j) {
    const auto seg = [&](const Vector<double>& v) { return v.segment(j * probes, probes).squaredNorm(); };
    gamma = std::max(gamma, std::sqrt(seg(inv) / seg(ne)) * std::sqrt(seg(fwd) / seg(nz)));
  }
  return gamma;
}

}  // namespace moonwalk::detail
