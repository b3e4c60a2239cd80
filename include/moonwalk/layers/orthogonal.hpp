// Moonwalk — orthogonal dense layer y = Q x + b, Q ∈ O(n) by the Cayley transform.
#pragma once

#include <Eigen/LU>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <string>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/dense.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/layers/linear_in_x.hpp"

namespace moonwalk {

/// Square dense layer `y = Q x + b` whose Q stays orthogonal under any update
/// of its parameters (an orthogonal parametrisation, docs/design.md §5 "Conditioning").
///
/// Parametrisation (Cayley transform):
///
///   A = U − Uᵀ            skew-symmetric, U strictly upper triangular (n × n)
///   M = (I + A)⁻¹         I + A is invertible for every skew A (eigenvalues 1 + iλ)
///   Q = (I + A)⁻¹ (I − A) = 2M − I          (since I − A = 2I − (I + A))
///
/// Q is orthogonal for every U (its eigenvalues are (1 − iλ)/(1 + iλ), of
/// modulus 1), and det Q = +1: the layer reaches every rotation without an
/// eigenvalue −1. Training U therefore never leaves O(n): the Jacobian has
/// condition number 1 and the vijp is a product with Q, no solve.
///
/// θ = [u, b] with u the strict upper triangle of U packed column by column:
/// `u[j(j−1)/2 + i] = U(i, j)` for 0 ≤ i < j < n (n(n−1)/2 numbers), then b
/// (n numbers).
///
/// Initialisation: the entries of u are i.i.d. N(0, scale² / n) from the
/// seeded generator (drawn in double, so float and double layers start from
/// the same U up to rounding), b = 0. The spectrum of A then spreads over
/// ±i·[0, ~2·scale], so with the default scale 1 Q is a genuinely mixing
/// rotation (rotation angles 2·atan λ up to ~2.2 rad) while I + A stays well
/// conditioned (≈ √(1 + 4·scale²)). `scale = 0` starts from Q = I.
///
/// Q and M are computed (in double, then rounded to S) once per parameter
/// version and cached, as Linear caches its factorisation: mutable access to
/// the parameters starts a new version. Unlike Linear, forward itself reads
/// the cache, so a write through a parameter view kept across calls (finite
/// differences holding a span, say) must be seen too: the cache also keeps
/// the packed U it was built from and is rebuilt when U differs (an O(n²)
/// comparison, cheaper than the O(n²·batch) product it guards).
///
/// The contract's operations come from LinearInX (A = Q, offset b).
///
/// Operators (x: n × B, G = h xᵀ):
///   forward      y = Q x + b
///   jvp          J dx = Q dx
///   vjp          Jᵀ h = Qᵀ h                       (residual: Empty — needs only Q)
///   jvp_params   dQ x + db, dQ = −M dA (I + Q) = −2 M dA M, dA = dU − dUᵀ
///                (from (I + A) Q = I − A:  dA Q + (I + A) dQ = −dA
///                 ⇒ dQ = −M dA (I + Q))
///   vjp_params   ∂ℓ/∂A = −Mᵀ G (I + Q)ᵀ = −2 (Mᵀ h)(M x)ᵀ,
///                ∂ℓ/∂U = strict_upper(∂ℓ/∂A − (∂ℓ/∂A)ᵀ),  g_b += Σ_columns h
///   vijp         h_y = Q h_x                       (Qᵀ h_y = h_x)
///   inverse      x = Qᵀ (y − b)
///   amplification κ = γ = 1 (orthogonal)
template <class S>
class OrthogonalLinear : public LinearInX<OrthogonalLinear<S>, S> {
 public:
  using scalar_type = S;
  using residual_type = Empty;

  struct Options {
    std::uint64_t seed = 0;
    /// Standard deviation of U's entries times √n (0: Q = I).
    S scale = S(1);
  };

  explicit OrthogonalLinear(Index n) : OrthogonalLinear(n, Options{}) {}
  OrthogonalLinear(Index n, Options opt) : n_(n) {
    if (n <= 0) throw ShapeError(detail::cat("OrthogonalLinear: size must be positive, got ", n));
    theta_.resize(n_ * (n_ - 1) / 2 + n_);
    grad_.setZero(theta_.size());
    const Matrix<double> g = gaussian<double>(n_, n_, opt.seed);
    const double s = static_cast<double>(opt.scale) / std::sqrt(static_cast<double>(n_));
    for (Index j = 1; j < n_; ++j)
      for (Index i = 0; i < j; ++i) theta_(upper_index(i, j)) = static_cast<S>(s * g(i, j));
    theta_.tail(n_).setZero();
  }

  [[nodiscard]] Index in_features() const { return n_; }
  [[nodiscard]] Index out_features() const { return n_; }
  [[nodiscard]] std::string name() const { return detail::cat("orthogonal(", n_, ")"); }

  // ---- parameters (mutable access starts a new parameter version: Q and M
  //      are rebuilt on next use. Write through a view obtained after the last
  //      operator call; optimizers re-fetch views each step.)
  [[nodiscard]] Index num_params() const { return theta_.size(); }
  /// Number of packed entries of U: n(n−1)/2.
  [[nodiscard]] Index num_upper() const { return n_ * (n_ - 1) / 2; }
  /// Position of U(i, j), i < j, in θ (column-major strict upper triangle).
  [[nodiscard]] static Index upper_index(Index i, Index j) { return j * (j - 1) / 2 + i; }

  std::span<S> parameters() {
    ++version_;
    return {theta_.data(), static_cast<std::size_t>(theta_.size())};
  }
  [[nodiscard]] std::span<const S> parameters() const {
    return {theta_.data(), static_cast<std::size_t>(theta_.size())};
  }
  std::span<S> gradients() { return {grad_.data(), static_cast<std::size_t>(grad_.size())}; }
  [[nodiscard]] std::span<const S> gradients() const {
    return {grad_.data(), static_cast<std::size_t>(grad_.size())};
  }
  /// The packed strict upper triangle of U (see the class comment).
  Eigen::Map<Vector<S>> u() {
    ++version_;
    return {theta_.data(), num_upper()};
  }
  [[nodiscard]] Eigen::Map<const Vector<S>> u() const { return {theta_.data(), num_upper()}; }
  Eigen::Map<Vector<S>> b() {
    ++version_;
    return {theta_.data() + num_upper(), n_};
  }
  [[nodiscard]] Eigen::Map<const Vector<S>> b() const { return {theta_.data() + num_upper(), n_}; }

  /// A = U − Uᵀ (skew-symmetric).
  [[nodiscard]] Matrix<S> A() const { return skew(CVecRef<S>(u())); }
  /// Q = (I + A)⁻¹ (I − A), orthogonal (cached per parameter version).
  [[nodiscard]] const Matrix<S>& Q() const { return cache().Q; }
  /// M = (I + A)⁻¹ (cached per parameter version).
  [[nodiscard]] const Matrix<S>& M() const { return cache().M; }

  // ---- the maps of y = Q x + b (LinearInX writes the contract's operations
  //      and their shape checks from them)
  /// out = Q a
  void apply_into(const CRef<S>& a, MatRef<S> out) const { out.noalias() = Q() * a; }
  /// out = Qᵀ h
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const { out.noalias() = Q().transpose() * h; }
  /// out = h_y with Qᵀ h_y = h_x: h_y = Q h_x (the vijp: one product, no solve)
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> out) const { out.noalias() = Q() * hx; }
  /// x ← Qᵀ x in place (the inverse, after LinearInX subtracted b), through
  /// this thread's layer scratch (core/dense.hpp).
  void solve_into(const CRef<S>& y, MatRef<S> x) const {
    auto t = detail::scratch_matrix<S>(detail::Scratch::layer, n_, y.cols());
    t.noalias() = Q().transpose() * y;
    x = t;
  }
  /// y += s · b on every column
  void add_offset(MatRef<S> y, S s) const { add_to_columns<S>(y, b(), s); }

  /// J_θ dθ = dQ x + db with dQ = −M dA (I + Q) = −2 M dA M, dA = dU − dUᵀ:
  /// computed as −2 M (dA (M x)) + db.
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "parameter tangent", dtheta, num_params(), 1);
    const Cache& c = cache();
    const Matrix<S> dA = skew(dtheta.head(num_upper()));
    Matrix<S> mx(n_, x.cols()), w(n_, x.cols()), t(n_, x.cols());
    mx.noalias() = c.M * x;
    w.noalias() = dA * mx;
    t.noalias() = S(-2) * (c.M * w);
    t.colwise() += dtheta.tail(n_);
    return t;
  }
  /// With G = h xᵀ: ∂ℓ/∂A = −Mᵀ G (I + Q)ᵀ = −2 (Mᵀ h)(M x)ᵀ,
  /// g_U += strict_upper(∂ℓ/∂A − (∂ℓ/∂A)ᵀ), g_b += Σ_columns h.
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, n_);
    detail::check_rows(*this, "cotangent", h, n_, x.cols());
    detail::check_rows(*this, "gradient", g, num_params(), 1);
    const Cache& c = cache();
    Matrix<S> mth(n_, x.cols()), mx(n_, x.cols()), gA(n_, n_);
    mth.noalias() = c.M.transpose() * h;
    mx.noalias() = c.M * x;
    gA.noalias() = S(-2) * (mth * mx.transpose());
    for (Index j = 1; j < n_; ++j)
      for (Index i = 0; i < j; ++i) g(upper_index(i, j)) += gA(i, j) - gA(j, i);
    g.tail(n_) += h.rowwise().sum();
  }

  // ---- Moonwalk: always submersive and invertible
  [[nodiscard]] static constexpr bool is_submersive() { return true; }
  [[nodiscard]] static constexpr bool is_invertible() { return true; }

  // ---- optional protocols (core/amplification.hpp)
  /// Orthogonal Jacobian: κ = γ = 1 for every input.
  [[nodiscard]] Amplification amplification(const Empty&) const { return {1, 1}; }
  /// The same layer (same U and b, rounded to T) in scalar type T.
  template <class T>
  [[nodiscard]] OrthogonalLinear<T> cast() const {
    OrthogonalLinear<T> out(n_, {.seed = 0, .scale = T(0)});
    auto p = out.parameters();
    for (Index k = 0; k < theta_.size(); ++k) p[static_cast<std::size_t>(k)] = static_cast<T>(theta_(k));
    return out;
  }

 private:
  struct Cache {
    std::uint64_t version = std::numeric_limits<std::uint64_t>::max();
    Matrix<S> M;  // (I + A)⁻¹
    Matrix<S> Q;  // 2M − I
    Vector<S> u;  // the packed U they were built from
  };

  /// U − Uᵀ from the packed strict upper triangle.
  [[nodiscard]] Matrix<S> skew(const CVecRef<S>& packed) const {
    Matrix<S> a = Matrix<S>::Zero(n_, n_);
    for (Index j = 1; j < n_; ++j)
      for (Index i = 0; i < j; ++i) {
        const S v = packed(upper_index(i, j));
        a(i, j) = v;
        a(j, i) = -v;
      }
    return a;
  }

  /// M and Q once per parameter version, computed in double (I + A is
  /// invertible for every skew A; its condition number is √(1 + ‖A‖₂²)).
  const Cache& cache() const {
    if (!cache_.ptr) cache_.ptr = std::make_unique<Cache>();
    Cache& c = *cache_.ptr;
    const Eigen::Map<const Vector<S>> u_now = u();
    if (c.version == version_ && c.u.size() == u_now.size() && (c.u.array() == u_now.array()).all()) return c;
    const Matrix<double> ipa =
        Matrix<double>::Identity(n_, n_) + skew(CVecRef<S>(u())).template cast<double>();
    const Matrix<double> m = ipa.partialPivLu().inverse();
    c.M = m.template cast<S>();
    c.Q = (2.0 * m - Matrix<double>::Identity(n_, n_)).template cast<S>();
    c.u = u_now;
    c.version = version_;
    return c;
  }

  Index n_;
  Vector<S> theta_, grad_;
  std::uint64_t version_ = 0;
  /// Per-object cache; a copy starts empty (it may diverge).
  struct CacheSlot {
    std::unique_ptr<Cache> ptr;
    CacheSlot() = default;
    CacheSlot(const CacheSlot&) {}
    CacheSlot& operator=(const CacheSlot&) {
      ptr.reset();
      return *this;
    }
    CacheSlot(CacheSlot&&) noexcept = default;
    CacheSlot& operator=(CacheSlot&&) noexcept = default;
  };
  mutable CacheSlot cache_;
};

}  // namespace moonwalk
