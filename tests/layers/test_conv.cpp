// Conv2d: the generic layer checker on several configurations (stride, padding,
// dilation, no bias, 1×1 kernels, non-square images, inside coupling blocks
// and runtime networks), a direct-loop reference for every operator, the
// parameter layout, initialisation and shape errors, and a convolutional
// RevNet whose Moonwalk gradients match backprop.
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/conv.hpp>
#include <moonwalk/layers/coupling.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/moonwalk.hpp>
#include <moonwalk/nets/network.hpp>
#include <string>
#include <vector>

#include "support/layer_check.hpp"
#include "support/random_net.hpp"

using moonwalk::AdditiveCoupling;
using moonwalk::Conv2d;
using moonwalk::ImageShape;
using moonwalk::Index;
using moonwalk::Init;
using moonwalk::LeakyReLU;
using moonwalk::Linear;
using moonwalk::Network;
using moonwalk::ShapeError;
using moonwalk::Tanh;
using mwtest::Mat;
using mwtest::perturbed;
using mwtest::rel_err;
using mwtest::Vec;

namespace {

/// A coupling branch on images: conv(k3, pad 1) – tanh – conv(k3, pad 1), c_in → hidden → c_out
/// channels at the same H × W (perturbed: general kernels, non-zero biases).
template <class S>
Network<S> conv_branch(ImageShape in, Index hidden, Index c_out, std::uint64_t seed) {
  const Conv2d<S> c1 = perturbed(Conv2d<S>(in, hidden, 3, {.pad = 1, .seed = seed}), seed + 1);
  const Conv2d<S> c2 = perturbed(Conv2d<S>(c1.out_shape(), c_out, 3, {.pad = 1, .seed = seed + 2}), seed + 3);
  Network<S> n;
  n.add(c1).add(Tanh<S>(c1.out_features())).add(c2);
  return n;
}

/// The additive coupling block on a C × H × W image split by channels: x1 = the
/// first c1 channels, x2 = the other C − c1 (channel-major layout: the top rows).
template <class S>
auto conv_coupling(ImageShape img, Index c1, std::uint64_t seed) {
  const ImageShape s1{c1, img.h, img.w}, s2{img.c - c1, img.h, img.w};
  // Explicit template arguments: CTAD through the alias template needs clang 19.
  return AdditiveCoupling<Network<S>, Network<S>>(conv_branch<S>(s2, 3, c1, seed),
                                                  conv_branch<S>(s1, 3, s2.c, seed + 10));
}

template <class S>
Network<S> conv_act_conv() {
  Network<S> n;
  const Conv2d<S> a = perturbed(Conv2d<S>({2, 5, 6}, 3, 3, {.stride = 2, .pad = 1, .seed = 71}), 72);
  const Conv2d<S> b = perturbed(Conv2d<S>(a.out_shape(), 2, 2, {.seed = 73}), 74);
  n.add(a).add(Tanh<S>(a.out_features())).add(b);
  return n;
}

}  // namespace

// ---- the generic checker (float and double): one line per configuration
MOONWALK_LAYER_TEST("conv2d 2x6x5 -> 3, k3 s1 p1",
                    (perturbed(Conv2d<S>({2, 6, 5}, 3, 3, {.pad = 1, .seed = 1}), 11)))
MOONWALK_LAYER_TEST("conv2d 2x6x5 -> 3, k3 s1 p0 (valid)",
                    (perturbed(Conv2d<S>({2, 6, 5}, 3, 3, {.seed = 2}), 21)))
MOONWALK_LAYER_TEST("conv2d 3x7x6 -> 4, k3 s2 p1",
                    (perturbed(Conv2d<S>({3, 7, 6}, 4, 3, {.stride = 2, .pad = 1, .seed = 3}), 31)))
MOONWALK_LAYER_TEST("conv2d 2x8x7 -> 3, k3 s2 p0",
                    (perturbed(Conv2d<S>({2, 8, 7}, 3, 3, {.stride = 2, .seed = 4}), 41)))
MOONWALK_LAYER_TEST("conv2d 2x7x8 -> 3, k3 d2 p2",
                    (perturbed(Conv2d<S>({2, 7, 8}, 3, 3, {.pad = 2, .dilation = 2, .seed = 5}), 51)))
MOONWALK_LAYER_TEST("conv2d 2x6x5 -> 3, k2 s3 p1 d2",
                    (perturbed(Conv2d<S>({2, 6, 5}, 3, 2, {.stride = 3, .pad = 1, .dilation = 2, .seed = 6}),
                               61)))
MOONWALK_LAYER_TEST("conv2d 2x5x4 -> 3, k3 p1, no bias",
                    (perturbed(Conv2d<S>({2, 5, 4}, 3, 3, {.pad = 1, .bias = false, .seed = 7}), 71)))
MOONWALK_LAYER_TEST("conv2d 4x3x5 -> 6, 1x1 kernel", (perturbed(Conv2d<S>({4, 3, 5}, 6, 1, {.seed = 8}), 81)))
MOONWALK_LAYER_TEST("conv2d 3x4x4 -> 2, k4 (output 1x1)",
                    (perturbed(Conv2d<S>({3, 4, 4}, 2, 4, {.seed = 9}), 91)))
MOONWALK_LAYER_TEST("conv2d 2x5x5 -> 3, k3 p1, gaussian init, gain 2",
                    (Conv2d<S>({2, 5, 5}, 3, 3,
                               {.pad = 1, .seed = 10, .gain = S(2), .init = Init::gaussian})))
MOONWALK_LAYER_TEST("conv2d default options", (Conv2d<S>({1, 4, 5}, 2, 3)))
MOONWALK_LAYER_TEST("network conv-tanh-conv", (conv_act_conv<S>()))
MOONWALK_LAYER_TEST("additive coupling with conv-tanh-conv branches, 4x4x5 split 2+2",
                    (conv_coupling<S>({4, 4, 5}, 2, 100)))

namespace {

/// Direct-loop reference, in double, from the layer's flat θ (documented layout).
struct Reference {
  ImageShape in, out;
  Index k, s, p, d;
  bool bias;
  Vec<double> theta;

  template <class S>
  explicit Reference(const Conv2d<S>& l)
      : in(l.in_shape()),
        out(l.out_shape()),
        k(l.kernel_size()),
        s(l.stride()),
        p(l.padding()),
        d(l.dilation()),
        bias(l.has_bias()) {
    theta.resize(l.num_params());
    for (Index i = 0; i < theta.size(); ++i)
      theta(i) = static_cast<double>(l.parameters()[static_cast<std::size_t>(i)]);
  }
  [[nodiscard]] double w(const Vec<double>& th, Index o, Index c, Index a, Index e) const {
    return th(o + out.c * ((c * k + a) * k + e));
  }
  /// Calls f(o, i, j, c, ii, jj, a, e) for every output pixel and every tap that reads the image.
  template <class F>
  void taps(F&& f) const {
    for (Index o = 0; o < out.c; ++o)
      for (Index i = 0; i < out.h; ++i)
        for (Index j = 0; j < out.w; ++j)
          for (Index c = 0; c < in.c; ++c)
            for (Index a = 0; a < k; ++a)
              for (Index e = 0; e < k; ++e) {
                const Index ii = i * s - p + a * d, jj = j * s - p + e * d;
                if (ii >= 0 && ii < in.h && jj >= 0 && jj < in.w) f(o, i, j, c, ii, jj, a, e);
              }
  }
  /// W(th) x + b(th) (b omitted when with_bias is false)
  [[nodiscard]] Mat<double> apply(const Vec<double>& th, const Mat<double>& x, bool with_bias) const {
    Mat<double> y = Mat<double>::Zero(out.size(), x.cols());
    for (Index b = 0; b < x.cols(); ++b) {
      taps([&](Index o, Index i, Index j, Index c, Index ii, Index jj, Index a, Index e) {
        y(out.index(o, i, j), b) += w(th, o, c, a, e) * x(in.index(c, ii, jj), b);
      });
      if (bias && with_bias)
        for (Index o = 0; o < out.c; ++o)
          for (Index i = 0; i < out.h; ++i)
            for (Index j = 0; j < out.w; ++j) y(out.index(o, i, j), b) += th(out.c * in.c * k * k + o);
    }
    return y;
  }
  [[nodiscard]] Mat<double> vjp(const Mat<double>& h) const {
    Mat<double> dx = Mat<double>::Zero(in.size(), h.cols());
    for (Index b = 0; b < h.cols(); ++b)
      taps([&](Index o, Index i, Index j, Index c, Index ii, Index jj, Index a, Index e) {
        dx(in.index(c, ii, jj), b) += w(theta, o, c, a, e) * h(out.index(o, i, j), b);
      });
    return dx;
  }
  [[nodiscard]] Vec<double> vjp_params(const Mat<double>& x, const Mat<double>& h) const {
    Vec<double> g = Vec<double>::Zero(theta.size());
    for (Index b = 0; b < h.cols(); ++b) {
      taps([&](Index o, Index i, Index j, Index c, Index ii, Index jj, Index a, Index e) {
        g(o + out.c * ((c * k + a) * k + e)) += h(out.index(o, i, j), b) * x(in.index(c, ii, jj), b);
      });
      if (bias)
        for (Index o = 0; o < out.c; ++o)
          for (Index i = 0; i < out.h; ++i)
            for (Index j = 0; j < out.w; ++j) g(out.c * in.c * k * k + o) += h(out.index(o, i, j), b);
    }
    return g;
  }
};

struct Config {
  ImageShape in;
  Index c_out, k, stride, pad, dilation;
  bool bias;
};

const std::vector<Config>& configs() {
  static const std::vector<Config> c{
      {{2, 6, 5}, 3, 3, 1, 1, 1, true},  {{3, 7, 6}, 4, 3, 2, 1, 1, true}, {{2, 8, 7}, 3, 3, 2, 0, 1, true},
      {{2, 7, 8}, 3, 3, 1, 2, 2, true},  {{2, 6, 5}, 3, 2, 3, 1, 2, true}, {{2, 5, 4}, 3, 3, 1, 1, 1, false},
      {{4, 3, 5}, 6, 1, 1, 0, 1, true},  {{3, 4, 4}, 2, 4, 1, 0, 1, true}, {{1, 9, 4}, 5, 5, 2, 3, 1, true},
      {{3, 5, 6}, 2, 3, 1, 4, 1, true},  // padding wider than the kernel: border outputs are only b
      {{2, 6, 6}, 3, 3, 2, 1, 3, false},
  };
  return c;
}

template <class S>
Conv2d<S> make(const Config& c, std::uint64_t seed) {
  return perturbed(
      Conv2d<S>(c.in, c.c_out, c.k,
                {.stride = c.stride, .pad = c.pad, .dilation = c.dilation, .bias = c.bias, .seed = seed}),
      seed + 1);
}

}  // namespace

TEMPLATE_TEST_CASE("conv2d: every operator matches a direct-loop reference", "[layers][conv]", float,
                   double) {
  using S = TestType;
  // double: the same sums in another order (1e-12); float: float rounding.
  const double tol = std::is_same_v<S, double> ? 1e-12 : 1e-5;
  std::uint64_t seed = 500;
  for (const Config& cfg : configs()) {
    const Conv2d<S> l = make<S>(cfg, seed);
    const Reference ref(l);
    INFO(l.name());
    const Index B = 3, n = l.in_features(), m = l.out_features(), P = l.num_params();
    const Mat<S> x = mwtest::randn(n, B, seed + 2).cast<S>();
    const Mat<S> dx = mwtest::randn(n, B, seed + 3).cast<S>();
    const Mat<S> h = mwtest::randn(m, B, seed + 4).cast<S>();
    const Vec<S> dth = mwtest::randn(P, 1, seed + 5).cast<S>();
    const Vec<S> g0 = mwtest::randn(P, 1, seed + 6).cast<S>();
    const Mat<double> xd = x.template cast<double>(), dxd = dx.template cast<double>(),
                      hd = h.template cast<double>();
    const Vec<double> dthd = dth.template cast<double>();

    CHECK(rel_err(l.forward(x), ref.apply(ref.theta, xd, true)) <= tol);
    CHECK(rel_err(l.jvp(x, dx), ref.apply(ref.theta, dxd, false)) <= tol);
    CHECK(rel_err(l.jvp_params(x, dth), ref.apply(dthd, xd, true)) <= tol);
    CHECK(rel_err(l.vjp(x, h), ref.vjp(hd)) <= tol);
    CHECK(rel_err(l.vjp_residual(l.save_residual(x), h), ref.vjp(hd)) <= tol);
    Vec<S> g = g0;
    l.vjp_params(x, h, g);
    CHECK(rel_err(g, Vec<double>(g0.template cast<double>() + ref.vjp_params(xd, hd))) <= tol);
    seed += 10;
  }
}

TEST_CASE("conv2d: output shape, name and parameter layout", "[layers][conv]") {
  using S = double;
  const Conv2d<S> same({3, 8, 8}, 16, 3, {.pad = 1});
  CHECK(same.name() == "conv2d(3x8x8->16x8x8, k3 s1 p1)");
  CHECK(same.out_shape() == ImageShape{16, 8, 8});
  CHECK(same.in_features() == 3 * 8 * 8);
  CHECK(same.out_features() == 16 * 8 * 8);
  CHECK(same.num_params() == 16 * 27 + 16);

  // H' = (H + 2 pad − d (k − 1) − 1) / s + 1
  const Conv2d<S> strided({2, 9, 6}, 4, 3, {.stride = 2, .pad = 1, .dilation = 2, .bias = false});
  CHECK(strided.out_shape() == ImageShape{4, (9 + 2 - 4 - 1) / 2 + 1, (6 + 2 - 4 - 1) / 2 + 1});
  CHECK(strided.name() == "conv2d(2x9x6->4x4x2, k3 s2 p1 d2, no bias)");
  CHECK(strided.num_params() == 4 * 18);
  CHECK(strided.b().size() == 0);

  // θ = [vec(W), b], W(o, (c k + a) k + e): a single non-zero tap moves one pixel.
  Conv2d<S> l({2, 4, 5}, 3, 3, {.pad = 1});
  for (auto& t : l.parameters()) t = 0;
  const Index o = 2, c = 1, a = 0, e = 2;
  l.parameters()[static_cast<std::size_t>(o + 3 * ((c * 3 + a) * 3 + e))] =
      1;                                                     // y(o, i, j) = x(c, i − 1, j + 1)
  l.parameters()[static_cast<std::size_t>(3 * 18 + 1)] = 5;  // b(1) = 5
  Mat<S> x = mwtest::randn(l.in_features(), 2, 3);
  const Mat<S> y = l.forward(x);
  const ImageShape in = l.in_shape(), out = l.out_shape();
  for (Index b = 0; b < 2; ++b)
    for (Index i = 0; i < 4; ++i)
      for (Index j = 0; j < 5; ++j) {
        const bool inside = i - 1 >= 0 && j + 1 < 5;
        CHECK(y(out.index(o, i, j), b) == (inside ? x(in.index(c, i - 1, j + 1), b) : 0.0));
        CHECK(y(out.index(1, i, j), b) == 5.0);
        CHECK(y(out.index(0, i, j), b) == 0.0);
      }
}

TEMPLATE_TEST_CASE("conv2d: default initialisation is (semi-)orthogonal, Gaussian on request",
                   "[layers][conv]", float, double) {
  using S = TestType;
  const double tol = 100 * static_cast<double>(std::numeric_limits<S>::epsilon());
  for (const Index c_out : {Index{4}, Index{18}, Index{30}}) {  // K = 2·3·3 = 18: wide, square, tall
    const Conv2d<S> l({2, 5, 5}, c_out, 3, {.pad = 1, .seed = 3, .gain = S(2)});
    INFO(l.name());
    const Mat<double> W = l.W().template cast<double>();
    const Mat<double> gram = c_out <= 18 ? Mat<double>(W * W.transpose()) : Mat<double>(W.transpose() * W);
    CHECK((gram - 4 * Mat<double>::Identity(gram.rows(), gram.cols())).cwiseAbs().maxCoeff() <= 4 * tol);
    CHECK(l.b().isZero(0));
    CHECK(Vec<S>(Eigen::Map<const Vec<S>>(l.gradients().data(), l.num_params())).isZero(0));
  }
  const Conv2d<S> g({2, 5, 5}, 64, 3, {.seed = 4, .init = Init::gaussian});
  const double var = g.W().template cast<double>().squaredNorm() / static_cast<double>(g.W().size());
  CHECK(var == Approx(1.0 / 18).epsilon(0.15));  // N(0, gain² / (c_in k k))
  // Same seed, same weights; another seed, other weights.
  CHECK(Conv2d<S>({2, 5, 5}, 4, 3, {.seed = 9}).W() == Conv2d<S>({2, 5, 5}, 4, 3, {.seed = 9}).W());
  CHECK(Conv2d<S>({2, 5, 5}, 4, 3, {.seed = 9}).W() != Conv2d<S>({2, 5, 5}, 4, 3, {.seed = 10}).W());
}

TEST_CASE("conv2d: bad configurations and shapes throw ShapeError naming the layer", "[layers][conv]") {
  using S = float;
  auto message = [](auto&& f) {
    const mwtest::Thrown t = mwtest::catch_as<ShapeError>(f);
    CHECK(t.ok());
    return t.message;
  };
  // The dilated kernel does not fit the padded image: H' would be ≤ 0.
  std::string m = message([] { (void)Conv2d<S>({3, 4, 6}, 2, 5); });
  CHECK_THAT(m, Catch::Contains("conv2d(3x4x6") && Catch::Contains("5x5") && Catch::Contains("4x6"));
  m = message([] { (void)Conv2d<S>({3, 6, 6}, 2, 3, {.dilation = 3}); });
  CHECK_THAT(m, Catch::Contains("conv2d(3x6x6") && Catch::Contains("7x7"));
  CHECK_NOTHROW(Conv2d<S>({3, 4, 6}, 2, 5, {.pad = 1}));  // 6x8 padded: H' = 2, W' = 4
  m = message([] { (void)Conv2d<S>({3, 4, 4}, 2, 3, {.stride = 0}); });
  CHECK_THAT(m, Catch::Contains("conv2d(3x4x4") && Catch::Contains("stride"));
  m = message([] { (void)Conv2d<S>({3, 4, 4}, 2, 3, {.pad = -1}); });
  CHECK_THAT(m, Catch::Contains("pad"));
  m = message([] { (void)Conv2d<S>({3, 4, 4}, 0, 3); });
  CHECK_THAT(m, Catch::Contains("conv2d(3x4x4, 0 channels"));
  m = message([] { (void)Conv2d<S>({0, 4, 4}, 2, 3); });
  CHECK_THAT(m, Catch::Contains("conv2d(0x4x4"));

  const Conv2d<S> l({2, 4, 5}, 3, 3, {.stride = 2});
  const Mat<S> x = Mat<S>::Ones(40, 2), h = Mat<S>::Ones(l.out_features(), 2);
  Vec<S> g = Vec<S>::Zero(l.num_params());
  m = message([&] { (void)l.forward(Mat<S>::Ones(39, 2)); });
  CHECK_THAT(m, Catch::Contains(l.name()) && Catch::Contains("39x2") && Catch::Contains("40x"));
  m = message([&] { (void)l.vjp(x, Mat<S>::Ones(l.out_features() + 1, 2)); });
  CHECK_THAT(m, Catch::Contains(l.name()) && Catch::Contains("cotangent"));
  m = message([&] { (void)l.vjp(x, Mat<S>::Ones(l.out_features(), 3)); });
  CHECK_THAT(m, Catch::Contains(l.name()) && Catch::Contains("cotangent has 3"));
  Vec<S> g_bad = Vec<S>::Zero(l.num_params() + 1);
  m = message([&] { l.vjp_params(x, h, g_bad); });
  CHECK_THAT(m, Catch::Contains(l.name()) && Catch::Contains("gradient"));
  m = message([&] { (void)l.jvp_params(x, Vec<S>::Zero(3)); });
  CHECK_THAT(m, Catch::Contains(l.name()) && Catch::Contains("parameter tangent"));
  CHECK_NOTHROW(l.vjp_params(x, h, g));
}

TEST_CASE("conv2d: a convolutional RevNet's Moonwalk gradients match backprop", "[layers][conv][revnet]") {
  using namespace moonwalk;
  using S = double;
  // 4x6x6 → coupling(conv branches) → leaky_relu → coupling → linear head (10 classes)
  const ImageShape img{4, 6, 6};
  Network<S> net;
  net.add(conv_coupling<S>(img, 2, 1))
      .add(LeakyReLU<S>(img.size(), 0.2))
      .add(conv_coupling<S>(img, 2, 30))
      .add(Linear<S>(img.size(), 10, {.seed = 5}));
  const Index B = 5;
  const Matrix<S> x = gaussian<S>(img.size(), B, 7);
  const auto t = moonwalk_test::random_labels(10, B, 8);
  const SoftmaxCrossEntropy<S> loss;
  const auto bp = gradient(Backprop{}, net, x, loss, t);
  const auto rb = gradient(RevBackprop{}, net, x, loss, t);
  const auto mixed = gradient(MixedMoonwalk{}, net, x, loss, t);
  const auto pure = gradient(PureMoonwalk{}, net, x, loss, t);
  REQUIRE(bp.gradient.norm() > 0);
  for (const auto* r : {&rb, &mixed, &pure}) {
    INFO(r->stats.schedule);
    CHECK(rel_err(r->gradient, bp.gradient) < 1e-10);
  }
}
