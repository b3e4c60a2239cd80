// Moonwalk — 2-D convolution (cross-correlation, as in every deep-learning
// library) on image batches laid out as in core/image.hpp.
//
// Shapes. Input C × H × W, kernels k × k (square), zero padding `pad` on every
// side, stride s, dilation d, C' output channels:
//
//   H' = (H + 2 pad − d (k − 1) − 1) / s + 1,   W' likewise,   P = H' W'.
//
// With K = C k k, one sample's patch matrix X̂ = im2col(x) is K × P:
//
//   X̂((c k + a) k + e, i W' + j) = x(c, i s − pad + a d, j s − pad + e d)   (0 outside the image)
//
// and the convolution is one matrix product, y = W X̂ + b 1ᵀ (W is C' × K, the
// output is C' × P, i.e. channel-major C' × H' × W' as core/image.hpp wants).
//
// Operators (per sample; the batch is a loop over samples, each a GEMM):
//   forward     y = W im2col(x) + b
//   jvp         J dx = W im2col(dx)
//   jvp_params  J_θ dθ = dW im2col(x) + db
//   vjp         Jᵀ h = col2im(Wᵀ h)          (col2im = im2colᵀ: a scatter-add of
//                                             each patch entry back to its pixel)
//   vjp_params  g_W += Σ_samples h im2col(x)ᵀ,  g_b += Σ_samples Σ_pixels h
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <span>
#include <string>

#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/image.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/layers/linear_in_x.hpp"

namespace moonwalk {

/// 2-D convolution `y = W ⋆ x + b` with square k × k kernels, zero padding,
/// stride and dilation (formulas in the header comment), computed as
/// im2col + GEMM one sample at a time (the patch buffer is K × P for one
/// sample, not for the batch).
///
/// Parameters are stored flat as θ = [vec(W) (column-major), b]: W is
/// C' × K with K = C·k·k, and its column (c·k + a)·k + e holds the kernel tap
/// (a, e) (kernel row a, column e) of input channel c — the same channel-major,
/// row-major order as an image sample. So W(o, (c·k + a)·k + e) is
/// θ[o + C'·((c·k + a)·k + e)], and b(o) is θ[C'·K + o] (absent with
/// `Options::bias = false`).
///
/// Default initialisation: (semi-)orthogonal rows of the C' × K matrix W (as
/// Linear: every singular value `gain`), b = 0; `Options::init =
/// Init::gaussian` for N(0, gain²/K) entries.
///
/// The contract's operations come from LinearInX (A = W im2col, offset b per
/// channel). Its reverse pass saves nothing (Jᵀ h = col2im(Wᵀ h) needs only W). A
/// general convolution is not submersive (its Jacobian need not have full row
/// rank), so it offers no vijp: use it inside coupling blocks, whose branches
/// need only the layer contract.
template <class S>
class Conv2d : public FlatParameters<S>, public LinearInX<Conv2d<S>, S> {
  template <class>
  friend class Conv2d;
  using FlatParameters<S>::theta_;
  using FlatParameters<S>::grad_;

 public:
  using scalar_type = S;
  using residual_type = Empty;

  struct Options {
    Index stride = 1;
    Index pad = 0;
    Index dilation = 1;
    bool bias = true;
    std::uint64_t seed = 0;
    S gain = S(1);
    Init init = Init::orthogonal;
  };

  Conv2d(ImageShape in, Index c_out, Index k) : Conv2d(in, c_out, k, Options{}) {}
  Conv2d(ImageShape in, Index c_out, Index k, Options opt)
      : in_(in),
        k_(k),
        stride_(opt.stride),
        pad_(opt.pad),
        dil_(opt.dilation),
        bias_(opt.bias),
        out_(checked_out_shape(in, c_out, k, opt)) {
    theta_.setZero(c_out * kk() + (opt.bias ? c_out : 0));
    grad_ = detail::Gradient<S>::stored(theta_.size());
    if (opt.init == Init::orthogonal)
      W() = orthogonal<S>(c_out, kk(), opt.seed, opt.gain);
    else
      W() = gaussian<S>(c_out, kk(), opt.seed) * (opt.gain / std::sqrt(static_cast<S>(kk())));
    b().setZero();
  }

  [[nodiscard]] Index in_features() const { return in_.size(); }
  [[nodiscard]] Index out_features() const { return out_.size(); }
  [[nodiscard]] ImageShape in_shape() const { return in_; }
  [[nodiscard]] ImageShape out_shape() const { return out_; }
  [[nodiscard]] Index kernel_size() const { return k_; }
  [[nodiscard]] Index stride() const { return stride_; }
  [[nodiscard]] Index padding() const { return pad_; }
  [[nodiscard]] Index dilation() const { return dil_; }
  [[nodiscard]] bool has_bias() const { return bias_; }
  /// "conv2d(3x8x8->16x8x8, k3 s1 p1)", with " d2" for a dilation and ", no bias".
  [[nodiscard]] std::string name() const {
    return detail::cat("conv2d(", in_.str(), "->", out_.str(), ", k", k_, " s", stride_, " p", pad_,
                       dil_ != 1 ? detail::cat(" d", dil_) : std::string(), bias_ ? "" : ", no bias", ")");
  }

  /// The same layer in scalar type T: W and b converted, gradient zero
  /// (stored on first use: detail::Gradient).
  template <class T>
  [[nodiscard]] Conv2d<T> cast() const {
    return Conv2d<T>(typename Conv2d<T>::Uninitialised{}, *this);
  }

  // ---- parameters θ = [vec W; b] (FlatParameters)
  /// C' × K, column (c·k + a)·k + e = tap (a, e) of input channel c.
  Eigen::Map<Matrix<S>> W() { return {theta_.data(), out_.c, kk()}; }
  /// W ← s W (b kept).
  bool scale_weight(double s) {
    W() *= static_cast<S>(s);
    return true;
  }
  [[nodiscard]] Eigen::Map<const Matrix<S>> W() const { return {theta_.data(), out_.c, kk()}; }
  /// C' entries (0 entries without bias).
  Eigen::Map<Vector<S>> b() { return {theta_.data() + out_.c * kk(), bias_ ? out_.c : 0}; }
  [[nodiscard]] Eigen::Map<const Vector<S>> b() const {
    return {theta_.data() + out_.c * kk(), bias_ ? out_.c : 0};
  }

  // ---- operators (one sample's output, C' × H' × W', is the P × C' column-major
  //      matrix Y_bᵀ, so each is computed as X̂_bᵀ Wᵀ)
  /// out = W im2col(a)
  void apply_into(const CRef<S>& a, MatRef<S> out) const { apply(W(), a, out); }
  /// out = col2im(Wᵀ h), per sample: the P × K patch cotangent H_bᵀ W
  /// scattered back onto the input pixels.
  void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const {
    const Index P = pixels(), C = out_.c;
    out.setZero();
    Matrix<S> cols(P, kk());
    for (Index s = 0; s < h.cols(); ++s) {
      Eigen::Map<const Matrix<S>> hs(h.col(s).data(), P, C);
      cols.noalias() = hs * W();
      col2im(cols, out.col(s).data());
    }
  }
  /// y(channel o, every pixel) += s · b(o) on every column (nothing without bias)
  void add_offset(MatRef<S> y, S s) const {
    if (bias_) add_bias(y, s * b());
  }
  /// J_θ dθ = dW im2col(x) + db
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dtheta) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "parameter tangent", dtheta, this->num_params(), 1);
    Eigen::Map<const Matrix<S>> dW(dtheta.data(), out_.c, kk());
    Matrix<S> t(out_features(), x.cols());
    apply(dW, x, t);
    if (bias_) add_bias(t, dtheta.segment(out_.c * kk(), out_.c));
    return t;
  }
  /// g_W += Σ_samples h im2col(x)ᵀ, g_b += Σ_samples Σ_pixels h
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    detail::check_rows(*this, "input", x, in_features());
    detail::check_rows(*this, "cotangent", h, out_features(), x.cols());
    detail::check_rows(*this, "gradient", g, this->num_params(), 1);
    const Index P = pixels(), C = out_.c;
    Eigen::Map<Matrix<S>> gW(g.data(), C, kk());
    Matrix<S> cols(P, kk());
    for (Index s = 0; s < x.cols(); ++s) {
      im2col(x.col(s).data(), cols);
      Eigen::Map<const Matrix<S>> hs(h.col(s).data(), P, C);  // Y_bᵀ layout
      gW.noalias() += hs.transpose() * cols;
      if (bias_) g.segment(C * kk(), C) += hs.colwise().sum().transpose();
    }
  }

  // ---- im2col / col2im for one sample (public for tests and benchmarks)
  /// cols (P × K) = im2col(x)ᵀ for the sample at `x` (in_features() entries):
  /// cols(i W' + j, (c k + a) k + e) = x(c, i s − pad + a d, j s − pad + e d), 0 outside.
  void im2col(const S* x, Matrix<S>& cols) const {
    detail::safe_resize(cols, pixels(), kk());
    for_each_tap(
        [&](Index col, Index c, Index i, Index ii, Index j0, Index j1, Index jj0) {
          S* dst = cols.col(col).data() + i * out_.w;
          std::fill(dst, dst + j0, S(0));
          const S* src = x + in_.index(c, ii, 0);
          if (j1 == j0) {
          } else if (stride_ == 1) {
            std::copy(src + jj0, src + jj0 + (j1 - j0), dst + j0);
          } else {
            for (Index j = j0; j < j1; ++j) dst[j] = src[jj0 + (j - j0) * stride_];
          }
          std::fill(dst + j1, dst + out_.w, S(0));
        },
        [&](Index col, Index i) {
          S* dst = cols.col(col).data() + i * out_.w;
          std::fill(dst, dst + out_.w, S(0));
        });
  }
  /// dx += col2im(cols): every entry of the P × K patch matrix added to the
  /// input pixel it was read from (entries read from the padding are dropped).
  void col2im(const Matrix<S>& cols, S* dx) const {
    for_each_tap(
        [&](Index col, Index c, Index i, Index ii, Index j0, Index j1, Index jj0) {
          const S* src = cols.col(col).data() + i * out_.w;
          S* dst = dx + in_.index(c, ii, 0);
          for (Index j = j0; j < j1; ++j) dst[jj0 + (j - j0) * stride_] += src[j];
        },
        [](Index, Index) {});
  }

 private:
  struct Uninitialised {};
  /// Same configuration and θ as `o`, converted to S (gradient zero, stored on
  /// first use): for cast().
  template <class T>
  Conv2d(Uninitialised, const Conv2d<T>& o)
      : FlatParameters<S>(o.theta_.template cast<S>()),
        in_(o.in_),
        k_(o.k_),
        stride_(o.stride_),
        pad_(o.pad_),
        dil_(o.dil_),
        bias_(o.bias_),
        out_(o.out_) {}

  static ImageShape checked_out_shape(ImageShape in, Index c_out, Index k, const Options& o) {
    const auto config = [&] {
      return detail::cat("conv2d(", in.str(), ", ", c_out, " channels, k", k, " s", o.stride, " p", o.pad,
                         " d", o.dilation, ")");
    };
    if (!in.valid() || c_out <= 0)
      throw ShapeError(config() + ": the input shape and the channel count must be positive");
    if (k <= 0 || o.stride <= 0 || o.dilation <= 0 || o.pad < 0)
      throw ShapeError(config() + ": need k, stride, dilation > 0 and pad >= 0");
    const Index span = o.dilation * (k - 1) + 1;  // the dilated kernel's extent
    const Index nh = in.h + 2 * o.pad - span, nw = in.w + 2 * o.pad - span;
    if (nh < 0 || nw < 0)
      throw ShapeError(detail::cat(config(), ": the dilated kernel (", span, "x", span,
                                   ") does not fit the padded input (", in.h + 2 * o.pad, "x",
                                   in.w + 2 * o.pad, "): the output would be empty"));
    return {c_out, nh / o.stride + 1, nw / o.stride + 1};
  }

  [[nodiscard]] Index kk() const { return in_.c * k_ * k_; }
  [[nodiscard]] Index pixels() const { return out_.h * out_.w; }

  /// y = W X̂ for every sample: sample s of y is the P × C' matrix X̂_sᵀ Wᵀ.
  template <class WMat>
  void apply(const WMat& w, const CRef<S>& x, MatRef<S> y) const {
    const Index P = pixels(), C = out_.c;
    Matrix<S> cols(P, kk());
    for (Index s = 0; s < x.cols(); ++s) {
      im2col(x.col(s).data(), cols);
      Eigen::Map<Matrix<S>> ys(y.col(s).data(), P, C);
      ys.noalias() = cols * w.transpose();
    }
  }
  /// y(channel o, every pixel, every sample) += bias(o)
  template <class Bias>
  void add_bias(MatRef<S> y, const Bias& bias) const {
    const Index P = pixels();
    for (Index s = 0; s < y.cols(); ++s)
      for (Index o = 0; o < out_.c; ++o) y.col(s).segment(o * P, P).array() += bias(o);
  }

  /// Smallest j ≥ 0 with j·s ≥ v (v may be negative).
  [[nodiscard]] Index ceil_div(Index v) const { return v <= 0 ? 0 : (v + stride_ - 1) / stride_; }

  /// For every patch column (c, a, e) and output row i: `row(col, c, i, ii, j0, j1, jj0)` when
  /// input row ii = i s − pad + a d lies in the image, with output columns [j0, j1) reading
  /// input columns jj0, jj0 + s, … (the others read padding); `outside(col, i)` otherwise.
  template <class Row, class Outside>
  void for_each_tap(Row&& row, Outside&& outside) const {
    for (Index c = 0; c < in_.c; ++c)
      for (Index a = 0; a < k_; ++a)
        for (Index e = 0; e < k_; ++e) {
          const Index col = (c * k_ + a) * k_ + e;
          const Index off_w = e * dil_ - pad_;  // input column = j s + off_w
          // 0 ≤ j s + off_w ≤ W − 1
          const Index j0 = std::min(out_.w, ceil_div(-off_w));
          const Index j1 =
              std::max(j0, std::min(out_.w, in_.w - off_w > 0 ? (in_.w - 1 - off_w) / stride_ + 1 : 0));
          const Index jj0 = j0 * stride_ + off_w;
          for (Index i = 0; i < out_.h; ++i) {
            const Index ii = i * stride_ - pad_ + a * dil_;
            if (ii < 0 || ii >= in_.h)
              outside(col, i);
            else
              row(col, c, i, ii, j0, j1, jj0);
          }
        }
  }

  ImageShape in_;
  Index k_, stride_, pad_, dil_;
  bool bias_;
  ImageShape out_;
};

}  // namespace moonwalk
