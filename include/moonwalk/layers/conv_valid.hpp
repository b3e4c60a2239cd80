// Moonwalk — submersive "valid" convolutions (stride 1, no padding): the
// output is smaller than the input, and the Jacobian's transpose is solved by
// substitution over the output positions (docs/design.md §3, "Conv1d, valid").
//
// Layout (core/image.hpp): one column per sample, channel-major. A 2-D sample
// is C × H × W with index (c·H + i)·W + j; a 1-D sample is C × N with index
// c·N + n (a 1-row image, H = 1). With taps t (t = (ti, tj), 0 ≤ ti, tj < k,
// flat tap index ti·k + tj; in 1-D t = 0..k−1) and output positions p
// (Ho × Wo = (H−k+1) × (W−k+1); 1-D: N−k+1):
//
//   y[o, p] = Σ_t Σ_c W_t[o, c] x[c, p + t] + b[o]            (forward)
//   h_x[c, q] = Σ_t Σ_o W_t[o, c] h_y[o, q − t]               (vjp = Jᵀ h_y,
//               over the t with q − t a valid output position)
//
// vijp: solve Jᵀ h_y = h_x. Read the vjp at the input pixel q = p for every
// output position p (the input pixel with the same coordinates): it receives
// tap 0 from output p and tap t ≠ 0 from output p − t, which comes earlier
// in lexicographic order ((i − ti, j − tj): an earlier row when ti > 0, the
// same row and an earlier column when ti = 0, tj > 0). So, position by
// position in lexicographic order,
//
//   h_x[:, p] = W_0ᵀ h_y[:, p] + Σ_{t ≠ 0, p − t valid} W_tᵀ h_y[:, p − t]
//   h_y[:, p] = A (h_x[:, p] − Σ_{t ≠ 0, p − t valid} W_tᵀ h_y[:, p − t])
//             = A h_x[:, p] − Σ_{t ≠ 0, p − t valid} G_t h_y[:, p − t],
//
// with A = (W_0ᵀ)⁺ = P R⁻¹ Q₁ᵀ from a column-pivoted QR W_0ᵀ P = Q₁ R of the
// tall C_in × C_out matrix W_0ᵀ, and G_t = A W_tᵀ (C_out × C_out), both
// cached per weight version. In 1-D this is a banded block lower-triangular
// solve. The input pixels not of the form p (the trailing k − 1 columns and
// rows) carry consistency equations that a range-space h_x satisfies and the
// solve does not use (and with c_out < c_in the equations at p are solved in
// least squares, A W_0ᵀ = I but W_0ᵀ A ≠ I). The Jacobian has full row rank whenever W_0 does; a
// (numerically) rank-deficient W_0 raises RankError.
#pragma once

#include <Eigen/QR>
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <span>
#include <sstream>
#include <string>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/image.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/probe.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/core/version_cache.hpp"
#include "moonwalk/layers/linear_in_x.hpp"

namespace moonwalk {

/// Valid (unpadded, stride-1) convolution in `Dim` = 1 or 2 spatial
/// dimensions, submersive: use it as ConvValid1d<S> / ConvValid2d<S>
/// (formulas and layout: header comment).
///
/// Constructible only when the output has fewer numbers than the input,
/// c_out · out_positions < c_in · in_positions, and c_out ≤ c_in (else
/// ShapeError naming the layer and the shapes).
///
/// The contract's operations come from LinearInX (the vijp is its solve of
/// Jᵀ h_y = h_x; offset b per channel).
///
/// Parameters, stored flat: θ = [vec(W_0), vec(W_1), …, vec(W_{K−1}), b]
/// with every tap W_t a C_out × C_in channel matrix (column-major), taps in
/// lexicographic order (t = ti·k + tj in 2-D), and b (C_out) only with
/// `Options::bias`. Default initialisation: W_0 semi-orthogonal (orthonormal
/// rows) times `gain`; every other tap N(0, σ²)·gain with
/// σ = 1 / (2 (K − 1)(√C_in + √C_out)), so Σ_{t≠0} ‖W_t‖ ≈ gain/2 and the
/// substitution is a contraction (‖G_t‖ ≤ ‖W_t‖/gain): ‖vijp‖ ≲ 2/gain and
/// the amplification bound is ≲ 3; b = 0.
///
/// Its reverse pass saves nothing (residual_type Empty: Jᵀ h needs only W).
///
/// Amplification (core/amplification.hpp). The vijp operator M (h_x ↦ h_y,
/// a left inverse of Jᵀ, not the pseudo-inverse: it ignores the consistency
/// equations) does not depend on x, so its figures are computed once per
/// weight version from W alone, on one sample:
///   bound    ‖J‖₂ · ‖M‖₂, each by 20 power-iteration steps (‖J‖ with jvp and
///            vjp, ‖M‖ with vijp and its transpose vijp_transpose) from a
///            fixed-seed start, raised to the typical figure and to 1 (both
///            are lower bounds of the true value). An ESTIMATE from below of
///            the worst-case growth ‖J‖‖M‖ ≥ ‖J‖‖J⁺‖ = κ₂(J), not a guarantee.
///   typical  (‖J‖_F / √m) · (‖M‖_F / √n), with ‖J‖_F² = out_positions ·
///            Σ_t ‖W_t‖_F² exact and ‖M‖_F² by Hutchinson (16 Gaussian probes).
/// A rank-deficient W_0 gives +∞ for both.
template <class S, int Dim>
class ConvValid : public FlatParameters<S>, public LinearInX<ConvValid<S, Dim>, S> {
  static_assert(Dim == 1 || Dim == 2, "ConvValid: Dim is 1 or 2");
  template <class, int>
  friend class ConvValid;
  using FlatParameters<S>::theta_;
  using FlatParameters<S>::grad_;
  using FlatParameters<S>::version_;

 public:
  using scalar_type = S;
  using residual_type = Empty;

  struct Options {
    std::uint64_t seed = 0;
    S gain = S(1);
    bool bias = true;
  };

  /// 1-D: per-sample C_in × length signals, C_out channels out, k taps.
  ConvValid(Index c_in, Index length, Index c_out, Index k) requires(Dim == 1)
      : ConvValid(c_in, length, c_out, k, Options{}) {}
  ConvValid(Index c_in, Index length, Index c_out, Index k, Options opt) requires(Dim == 1)
      : ConvValid(Geometry{c_in, 1, length, c_out, 1, k}, opt.bias) {
    initialise(opt);
  }
  /// 2-D: per-sample C_in × H × W images, C_out channels out, k × k taps.
  ConvValid(ImageShape in, Index c_out, Index k) requires(Dim == 2) : ConvValid(in, c_out, k, Options{}) {}
  ConvValid(ImageShape in, Index c_out, Index k, Options opt) requires(Dim == 2)
      : ConvValid(Geometry{in.c, in.h, in.w, c_out, k, k}, opt.bias) {
    initialise(opt);
  }

  [[nodiscard]] Index in_features() const { return g_.cin * g_.h * g_.w; }
  [[nodiscard]] Index out_features() const { return g_.cout * g_.ho() * g_.wo(); }
  [[nodiscard]] std::string name() const { return g_.name(bias_); }

  /// Input and output shapes (a 1-D layer is a 1-row image: C × 1 × N).
  [[nodiscard]] ImageShape in_shape() const { return {g_.cin, g_.h, g_.w}; }
  [[nodiscard]] ImageShape out_shape() const { return {g_.cout, g_.ho(), g_.wo()}; }
  [[nodiscard]] Index num_taps() const { return g_.taps(); }
  [[nodiscard]] bool has_bias() const { return bias_; }

  /// The same layer in scalar type T: θ converted, gradient zero (stored on
  /// first use: detail::Gradient).
  template <class T>
  [[nodiscard]] ConvValid<T, Dim> cast() const {
    ConvValid<T, Dim> out(typename ConvValid<T, Dim>::Geometry{g_.cin, g_.h, g_.w, g_.cout, g_.kh, g_.kw},
                          bias_);
    out.theta_ = theta_.template cast<T>();
    out.grad_ = detail::Gradient<T>::on_first_use(out.theta_.size());
    return out;
  }

  // ---- parameters θ = [W_0; …; W_{taps−1}; b] (FlatParameters: mutable
  //      access starts a new weight version, so the cached factorisation is
  //      rebuilt on the next vijp; re-fetch views after it, as for Linear)
  /// Tap t (flat index, t = ti·k + tj in 2-D): the C_out × C_in channel matrix W_t.
  Eigen::Map<Matrix<S>> tap(Index t) {
    check_tap(t);
    ++version_;
    return {theta_.data() + t * tap_size(), g_.cout, g_.cin};
  }
  [[nodiscard]] Eigen::Map<const Matrix<S>> tap(Index t) const {
    check_tap(t);
    return {theta_.data() + t * tap_size(), g_.cout, g_.cin};
  }
  /// The bias (C_out entries; empty without bias).
  Eigen::Map<Vector<S>> b() {
    ++version_;
    return {theta_.data() + g_.taps() * tap_size(), bias_ ? g_.cout : 0};
  }
  [[nodiscard]] Eigen::Map<const Vector<S>> b() const {
    return {theta_.data() + g_.taps() * tap_size(), bias_ ? g_.cout : 0};
  }

  // ---- the maps of y = J x + b (LinearInX writes the contract's operations
  //      and their shape checks from them)
  /// out[o, p] = Σ_t Σ_c W_t[o, c] a[c, p + t]
  void apply_into(const CRef<S>& a, MatRef<S> out) const {
    out.setZero();
    conv_add(a, theta_.data(), out);
  }
  /// out = Jᵀ h: out[c, q] = Σ_t Σ_o W_t[o, c] h[o, q − t]
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const {
    const Index hw = g_.h * g_.w, po = g_.ho() * g_.wo(), wo = g_.wo();
    out.setZero();
    for (Index s = 0; s < h.cols(); ++s) {
      Eigen::Map<Matrix<S>> R(out.col(s).data(), hw, g_.cin);
      Eigen::Map<const Matrix<S>> H(h.col(s).data(), po, g_.cout);
      for (Index t = 0; t < g_.taps(); ++t) {
        const Eigen::Map<const Matrix<S>> Wt(theta_.data() + t * tap_size(), g_.cout, g_.cin);
        const Index ti = t / g_.kw, tj = t % g_.kw;
        for (Index i = 0; i < g_.ho(); ++i)
          R.middleRows((i + ti) * g_.w + tj, wo).noalias() += H.middleRows(i * wo, wo) * Wt;
      }
    }
  }
  /// y[o, ·] += s · b[o] on every column (nothing without bias)
  void add_offset(MatRef<S> y, S s) const {
    if (bias_) add_bias(s * b(), y);
  }

  /// J_θ dθ = Σ_t dW_t x[:, p + t] + db
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "parameter tangent", dtheta, this->num_params(), 1);
    Matrix<S> t = Matrix<S>::Zero(out_features(), x.cols());
    conv_add(x, dtheta.data(), t);
    if (bias_) add_bias(dtheta.segment(g_.taps() * tap_size(), g_.cout), t);
    return t;
  }
  /// g_{W_t}[o, c] += Σ_batch Σ_p h[o, p] x[c, p + t];  g_b[o] += Σ_batch Σ_p h[o, p]
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "cotangent", h, out_features(), x.cols());
    detail::check_rows(*this, "gradient", g, this->num_params(), 1);
    const Index hw = g_.h * g_.w, po = g_.ho() * g_.wo(), wo = g_.wo();
    for (Index s = 0; s < x.cols(); ++s) {
      Eigen::Map<const Matrix<S>> X(x.col(s).data(), hw, g_.cin);   // X(q, c) = x[c, q]
      Eigen::Map<const Matrix<S>> H(h.col(s).data(), po, g_.cout);  // H(p, o) = h[o, p]
      for (Index t = 0; t < g_.taps(); ++t) {
        Eigen::Map<Matrix<S>> gW(g.data() + t * tap_size(), g_.cout, g_.cin);
        const Index ti = t / g_.kw, tj = t % g_.kw;
        for (Index i = 0; i < g_.ho(); ++i)
          gW.noalias() += H.middleRows(i * wo, wo).transpose() * X.middleRows((i + ti) * g_.w + tj, wo);
      }
    }
    if (bias_)
      for (Index o = 0; o < g_.cout; ++o) g(g_.taps() * tap_size() + o) += h.middleRows(o * po, po).sum();
  }

  // ---- Moonwalk
  /// h_y with Jᵀ h_y = h_x, by substitution over the output positions in
  /// lexicographic order (header comment):
  ///   h_y[:, p] = A h_x[:, p] − Σ_{t ≠ 0, p − t valid} G_t h_y[:, p − t],
  ///   A = (W_0ᵀ)⁺ = P R⁻¹ Q₁ᵀ,  G_t = A W_tᵀ.
  /// Exact (to rounding) when h_x is in the range of Jᵀ. Otherwise the
  /// equations at the input pixels p hold projected onto range(W_0ᵀ)
  /// (W_0 (Jᵀ h_y − h_x)[:, p] = 0; fully when c_out = c_in) and the trailing
  /// pixels' equations are ignored.
  /// Throws RankError when W_0 is rank deficient. (The vijp.)
  void solve_transpose_into(const CRef<S>& hx, MatRef<S> hy) const {
    const Cache& c = cache();
    const Index B = hx.cols(), hw = g_.h * g_.w, po = g_.ho() * g_.wo();
    if (B == 0) return;
    Matrix<S> r(g_.cout, B);
    for (Index i = 0; i < g_.ho(); ++i)
      for (Index j = 0; j < g_.wo(); ++j) {
        // r = A h_x[:, (i, j)]   (input pixel (i, j): index i·W + j)
        r.noalias() = c.A * pixel(hx.data(), hx.outerStride(), hw, g_.cin, B, i * g_.w + j);
        for (Index t = 1; t < g_.taps(); ++t) {
          const Index ti = t / g_.kw, tj = t % g_.kw;
          if (ti > i || tj > j) continue;  // p − t is not an output position
          // r −= G_t h_y[:, (i − ti, j − tj)]   (an earlier output position)
          r.noalias() -= c.G[static_cast<std::size_t>(t)] *
                         pixel(hy.data(), hy.outerStride(), po, g_.cout, B, (i - ti) * g_.wo() + (j - tj));
        }
        pixel(hy.data(), hy.outerStride(), po, g_.cout, B, i * g_.wo() + j) = r;
      }
  }

  /// Mᵀ g for the linear operator M: h_x ↦ vijp(x, h_x) (used by the
  /// amplification estimate). Back-substitution in reverse lexicographic
  /// order: a[p] = g[p] − Σ_{t ≠ 0, p + t valid} G_tᵀ a[p + t], then
  /// (Mᵀ g)[:, p] = Aᵀ a[p] at the input pixels p and 0 at the trailing ones.
  [[nodiscard]] Matrix<S> vijp_transpose(const CRef<S>& gy) const {
    detail::check_rows(*this, "output cotangent", gy, out_features());
    const Cache& c = cache();
    const Index B = gy.cols(), hw = g_.h * g_.w, po = g_.ho() * g_.wo();
    Matrix<S> out = Matrix<S>::Zero(in_features(), B);
    if (B == 0) return out;
    Matrix<S> a = gy;  // receives the pushed contributions of later positions
    for (Index i = g_.ho() - 1; i >= 0; --i)
      for (Index j = g_.wo() - 1; j >= 0; --j) {
        const Matrix<S> ap = pixel(a.data(), a.outerStride(), po, g_.cout, B, i * g_.wo() + j);
        pixel(out.data(), out.outerStride(), hw, g_.cin, B, i * g_.w + j).noalias() = c.A.transpose() * ap;
        for (Index t = 1; t < g_.taps(); ++t) {
          const Index ti = t / g_.kw, tj = t % g_.kw;
          if (ti > i || tj > j) continue;
          pixel(a.data(), a.outerStride(), po, g_.cout, B, (i - ti) * g_.wo() + (j - tj)).noalias() -=
              c.G[static_cast<std::size_t>(t)].transpose() * ap;
        }
      }
    return out;
  }

  /// Amplification of the vijp (class comment): power-iteration and probe
  /// estimates from W alone, once per weight version; +∞ for a rank-deficient W_0.
  [[nodiscard]] Amplification amplification(const Empty&) const {
    Cache* c = nullptr;
    try {
      c = &cache();
    } catch (const RankError&) {
      const double inf = std::numeric_limits<double>::infinity();
      return {inf, inf};
    }
    if (!c->amp_ready) {
      c->amp = estimate_amplification();
      c->amp_ready = true;
    }
    return c->amp;
  }

  /// The R factor of the cached column-pivoted QR of W_0ᵀ (C_out × C_out,
  /// diagonal non-increasing in magnitude). Throws RankError when W_0 is rank deficient.
  [[nodiscard]] Matrix<S> r_factor() const {
    const Cache& c = cache();
    return c.qr.matrixR().topLeftCorner(g_.cout, g_.cout).template triangularView<Eigen::Upper>();
  }

  /// Frees the cached factorisation (moonwalk::release_derived); the next use rebuilds it.
  void release_derived() const noexcept { cache_.reset(); }

 private:
  /// Shapes: C_in × H × W in, C_out channels, kh × kw taps (1-D: H = kh = 1).
  struct Geometry {
    Index cin = 0, h = 0, w = 0, cout = 0, kh = 0, kw = 0;
    [[nodiscard]] Index ho() const { return h - kh + 1; }
    [[nodiscard]] Index wo() const { return w - kw + 1; }
    [[nodiscard]] Index taps() const { return kh * kw; }
    [[nodiscard]] std::string name(bool bias) const {
      std::ostringstream s;
      if (Dim == 1)
        s << "conv_valid1d(" << cin << "x" << w << "->" << cout << "x" << wo() << ", k=" << kw;
      else
        s << "conv_valid2d(" << cin << "x" << h << "x" << w << "->" << cout << "x" << ho() << "x" << wo()
          << ", k=" << kw;
      if (!bias) s << ", no bias";
      s << ")";
      return s.str();
    }
  };

  struct Cache {
    Eigen::ColPivHouseholderQR<Matrix<S>> qr;  // of W_0ᵀ (C_in × C_out)
    Matrix<S> A;                               // C_out × C_in: (W_0ᵀ)⁺ = P R⁻¹ Q₁ᵀ
    std::vector<Matrix<S>> G;                  // G[t] = A W_tᵀ (C_out × C_out), t ≥ 1
    bool amp_ready = false;
    Amplification amp;
  };

  /// Checks the shapes; θ zero (initialise() or cast() fills it), gradient zero.
  ConvValid(Geometry g, bool bias) : g_(g), bias_(bias) {
    const bool sizes_ok = g.cin > 0 && g.h > 0 && g.w > 0 && g.cout > 0 && g.kh > 0 && g.kw > 0;
    if (!sizes_ok || g.ho() <= 0 || g.wo() <= 0)
      throw ShapeError(detail::cat(
          name(), ": sizes must be positive and the kernel no larger than the input (",
          Dim == 1 ? "c_in x length " : "input ", in_str(), ", c_out ", g.cout, ", k ", g.kw, ")"));
    if (g.cout > g.cin)
      throw ShapeError(detail::cat(name(), ": not submersive: needs c_out <= c_in, got input ", in_str(),
                                   " and output ", out_str()));
    if (out_features() >= in_features())
      throw ShapeError(detail::cat(name(), ": not submersive: the output ", out_str(), " (", out_features(),
                                   " numbers) must be smaller than the input ", in_str(), " (", in_features(),
                                   " numbers)"));
    theta_ = Vector<S>::Zero(g.taps() * tap_size() + (bias ? g.cout : 0));
    grad_ = detail::Gradient<S>::stored(theta_.size());
  }

  [[nodiscard]] std::string in_str() const {
    return Dim == 1 ? detail::cat(g_.cin, "x", g_.w) : ImageShape{g_.cin, g_.h, g_.w}.str();
  }
  [[nodiscard]] std::string out_str() const {
    return Dim == 1 ? detail::cat(g_.cout, "x", g_.wo()) : ImageShape{g_.cout, g_.ho(), g_.wo()}.str();
  }

  /// Class comment: W_0 semi-orthogonal, other taps small Gaussian, b = 0.
  void initialise(const Options& opt) {
    const Index K = g_.taps();
    Eigen::Map<Matrix<S>>(theta_.data(), g_.cout, g_.cin) =
        orthogonal<S>(g_.cout, g_.cin, opt.seed, opt.gain);
    if (K > 1) {
      const double sigma = 0.5 / (static_cast<double>(K - 1) * (std::sqrt(static_cast<double>(g_.cin)) +
                                                                std::sqrt(static_cast<double>(g_.cout))));
      for (Index t = 1; t < K; ++t)
        Eigen::Map<Matrix<S>>(theta_.data() + t * tap_size(), g_.cout, g_.cin) =
            gaussian<S>(g_.cout, g_.cin, opt.seed + 0x9e3779b97f4a7c15ULL * static_cast<std::uint64_t>(t)) *
            static_cast<S>(sigma * static_cast<double>(opt.gain));
    }
  }

  [[nodiscard]] Index tap_size() const { return g_.cout * g_.cin; }
  void check_tap(Index t) const {
    if (t < 0 || t >= g_.taps())
      throw ShapeError(detail::cat(name(), ": tap ", t, " out of range [0, ", g_.taps(), ")"));
  }

  /// The C × B slice of a batch (column-major, outer stride `ld`, `positions`
  /// entries per channel) at one position: entry (c, s) is m(c·positions + q, s).
  using Strided = Eigen::Stride<Eigen::Dynamic, Eigen::Dynamic>;
  static Eigen::Map<Matrix<S>, 0, Strided> pixel(S* data, Index ld, Index positions, Index channels, Index B,
                                                 Index q) {
    return {data + q, channels, B, Strided(ld, positions)};
  }
  static Eigen::Map<const Matrix<S>, 0, Strided> pixel(const S* data, Index ld, Index positions,
                                                       Index channels, Index B, Index q) {
    return {data + q, channels, B, Strided(ld, positions)};
  }

  /// y += Σ_t W_t x[:, p + t] with the taps read from `w` (θ's layout), per
  /// sample and output row: Y(p, o) += X(p + t, c) W_t(o, c).
  void conv_add(const CRef<S>& x, const S* w, MatRef<S> y) const {
    const Index hw = g_.h * g_.w, po = g_.ho() * g_.wo(), wo = g_.wo();
    for (Index s = 0; s < x.cols(); ++s) {
      Eigen::Map<const Matrix<S>> X(x.col(s).data(), hw, g_.cin);
      Eigen::Map<Matrix<S>> Y(y.col(s).data(), po, g_.cout);
      for (Index t = 0; t < g_.taps(); ++t) {
        const Eigen::Map<const Matrix<S>> Wt(w + t * tap_size(), g_.cout, g_.cin);
        const Index ti = t / g_.kw, tj = t % g_.kw;
        for (Index i = 0; i < g_.ho(); ++i)
          Y.middleRows(i * wo, wo).noalias() += X.middleRows((i + ti) * g_.w + tj, wo) * Wt.transpose();
      }
    }
  }
  template <class Bias>
  void add_bias(const Bias& bias, MatRef<S> y) const {
    const Index po = g_.ho() * g_.wo();
    for (Index o = 0; o < g_.cout; ++o) y.middleRows(o * po, po).array() += bias(o);
  }

  /// Factorises W_0ᵀ once per weight version; throws RankError when R's
  /// diagonal shows W_0 is (numerically) rank deficient (Linear's test).
  Cache& cache() const {
    return cache_.get(version_, [this](Cache& c) { factorise(c); });
  }

  void factorise(Cache& c) const {
    const Index m = g_.cin, k = g_.cout;  // W_0ᵀ is m × k, m ≥ k
    const Matrix<S> w0t = tap(0).transpose();
    c.qr.compute(w0t);
    const auto& r = c.qr.matrixR();
    const S r0 = std::abs(r(0, 0));
    const S tol = static_cast<S>(m) * std::numeric_limits<S>::epsilon() * r0;
    const S rmin = std::abs(r(k - 1, k - 1));
    if (!(r0 > S(0)) || !(rmin > tol)) {
      std::ostringstream s;
      s << name() << ": the first tap W_0 (the " << k << "x" << m
        << " channel matrix of tap 0) is rank deficient (|R_kk| of its QR from " << r0 << " down to " << rmin
        << ", threshold " << tol << "); vijp's substitution needs W_0 of full row rank";
      throw RankError(s.str());
    }
    // W_0ᵀ P = Q₁ R  ⇒  A = (W_0ᵀ)⁺ = P R⁻¹ Q₁ᵀ   (C_out × C_in)
    const Matrix<S> q1 = c.qr.householderQ() * Matrix<S>::Identity(m, k);
    const Matrix<S> Rm = r.topLeftCorner(k, k).template triangularView<Eigen::Upper>();
    const Matrix<S> rinv_qt = Rm.template triangularView<Eigen::Upper>().solve(Matrix<S>(q1.transpose()));
    c.A = c.qr.colsPermutation() * rinv_qt;
    c.G.assign(static_cast<std::size_t>(g_.taps()), Matrix<S>());
    for (Index t = 1; t < g_.taps(); ++t) c.G[static_cast<std::size_t>(t)] = c.A * tap(t).transpose();
    c.amp_ready = false;
  }

  /// Class comment: bound ‖J‖‖M‖ by power iteration, typical (‖J‖_F/√m)(‖M‖_F/√n),
  /// on one sample (x does not matter: the layer is linear).
  [[nodiscard]] Amplification estimate_amplification() const {
    constexpr int iters = 20;
    constexpr Index probes = 16;
    const Index n = in_features(), m = out_features();
    const Matrix<S> x0 = Matrix<S>::Zero(n, 1);
    const double norm_J = detail::power_norms(*this, x0, iters)(0);
    double norm_M = 0;
    Matrix<S> t = gaussian<S>(n, 1, 0x2545f4914f6cdd1dULL);
    for (int it = 0; it < iters; ++it) {
      const S nt = t.norm();
      if (!(nt > S(0))) break;
      t /= nt;
      const Matrix<S> s = this->vijp(x0, t);
      norm_M = std::max(norm_M, static_cast<double>(s.template cast<double>().norm()));
      if (it + 1 < iters) t = vijp_transpose(s);
    }
    // Hutchinson: E‖M e‖² = ‖M‖_F² for e ~ N(0, I_n).
    const Matrix<S> e = gaussian<S>(n, probes, 0x9e3779b97f4a7c15ULL);
    const Matrix<S> xr = Matrix<S>::Zero(n, probes);
    const double me2 = this->vijp(xr, e).template cast<double>().squaredNorm();
    const double e2 = e.template cast<double>().squaredNorm();
    // ‖J‖_F² = out_positions · Σ_t ‖W_t‖_F² (every tap meets every output position)
    double w2 = 0;
    for (Index t2 = 0; t2 < g_.taps(); ++t2) w2 += tap(t2).template cast<double>().squaredNorm();
    const double po = static_cast<double>(g_.ho() * g_.wo());
    const double typical = std::sqrt(po * w2 / static_cast<double>(m)) * std::sqrt(me2 / e2);
    const double bound = std::max({1.0, typical, norm_J * norm_M});
    return {bound, typical};
  }

  Geometry g_;
  bool bias_ = true;
  VersionCache<Cache> cache_;
};

/// Valid 1-D convolution on C_in × N signals (class comment of ConvValid).
template <class S>
using ConvValid1d = ConvValid<S, 1>;
/// Valid 2-D convolution with k × k kernels on C_in × H × W images.
template <class S>
using ConvValid2d = ConvValid<S, 2>;

}  // namespace moonwalk
