// Moonwalk — seeded initialisation.
#pragma once

#include <cstdint>
#include <random>

#include "moonwalk/core/dense.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk {

/// How a dense layer's weights start: (semi-)orthogonal (every singular value
/// `gain`: condition number 1, the default) or i.i.d. N(0, gain² / in)
/// (LeCun-scaled Gaussian, whose small singular values make deep sweeps
/// amplify rounding error, docs/design.md §5).
enum class Init { orthogonal, gaussian };

/// A `rows × cols` matrix of independent N(0, 1) draws from a seeded generator.
template <class S>
Matrix<S> gaussian(Index rows, Index cols, std::uint64_t seed) {
  std::mt19937_64 gen(seed);
  std::normal_distribution<double> dist(0.0, 1.0);
  Matrix<S> m(rows, cols);
  for (Index j = 0; j < cols; ++j)
    for (Index i = 0; i < rows; ++i) m(i, j) = static_cast<S>(dist(gen));
  return m;
}

/// Haar-distributed (semi-)orthogonal `rows × cols` matrix times `gain`:
/// orthonormal rows when rows ≤ cols, orthonormal columns otherwise. Built as
/// the Q factor of a Gaussian matrix with the signs of diag(R) folded in, so
/// every singular value equals `gain` (condition number 1, docs/design.md §5).
template <class S>
Matrix<S> orthogonal(Index rows, Index cols, std::uint64_t seed, S gain = S(1)) {
  const bool wide = rows <= cols;
  const Index m = wide ? cols : rows, n = wide ? rows : cols;  // m ≥ n, tall
  detail::BlockedQR<double> qr;
  qr.compute(gaussian<double>(m, n, seed));
  Matrix<double> q = Matrix<double>::Identity(m, n);
  qr.apply_q(q);
  for (Index k = 0; k < n; ++k)
    if (qr.matrixQR()(k, k) < 0) q.col(k) = -q.col(k);
  Matrix<S> out = (wide ? Matrix<double>(q.transpose()) : q).template cast<S>();
  return out * gain;
}

}  // namespace moonwalk
