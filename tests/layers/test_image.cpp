// Image plumbing (layers/image.hpp): every layer through the generic checker,
// then the layout each one promises, on hand-built examples.
#include <Eigen/QR>
#include <Eigen/SVD>
#include <cmath>
#include <moonwalk/core/amplification.hpp>
#include <moonwalk/core/image.hpp>
#include <moonwalk/layers/image.hpp>
#include <moonwalk/layers/pad.hpp>
#include <vector>

#include "support/check_util.hpp"
#include "support/layer_check.hpp"

using moonwalk::AvgPool2d;
using moonwalk::Flatten;
using moonwalk::GlobalAvgPool;
using moonwalk::ImageShape;
using moonwalk::Index;
using moonwalk::PadChannels;
using moonwalk::ShapeError;
using moonwalk::SpaceToDepth;
using moonwalk::ZeroPad;
using mwtest::Mat;
using mwtest::rel_err;

// ---- the generic checker: non-square images, C > 1, factors 2 and 3
MOONWALK_LAYER_TEST("space_to_depth 2x4x6, f=2", (SpaceToDepth<S>(ImageShape{2, 4, 6})))
MOONWALK_LAYER_TEST("space_to_depth 3x6x3, f=3", (SpaceToDepth<S>(ImageShape{3, 6, 3}, 3)))
MOONWALK_LAYER_TEST("space_to_depth 1x2x2, f=2", (SpaceToDepth<S>(ImageShape{1, 2, 2})))
MOONWALK_LAYER_TEST("avg_pool2d 2x4x6", (AvgPool2d<S>(ImageShape{2, 4, 6})))
MOONWALK_LAYER_TEST("avg_pool2d 3x2x8", (AvgPool2d<S>(ImageShape{3, 2, 8})))
MOONWALK_LAYER_TEST("avg_pool2d 2x6x3, 3x3 windows", (AvgPool2d<S>(ImageShape{2, 6, 3}, 3)))
MOONWALK_LAYER_TEST("global_avg_pool 3x4x5", (GlobalAvgPool<S>(ImageShape{3, 4, 5})))
MOONWALK_LAYER_TEST("global_avg_pool 1x2x3", (GlobalAvgPool<S>(ImageShape{1, 2, 3})))
MOONWALK_LAYER_TEST("flatten 2x3x4", (Flatten<S>(ImageShape{2, 3, 4})))
MOONWALK_LAYER_TEST("flatten 1x1x5", (Flatten<S>(ImageShape{1, 1, 5})))
MOONWALK_LAYER_TEST("pad_channels 2x3x4->5 (fragmental)", (PadChannels<S>(ImageShape{2, 3, 4}, 5)))
MOONWALK_LAYER_TEST("pad_channels 1x2x3->2 (fragmental)", (PadChannels<S>(ImageShape{1, 2, 3}, 2)))
MOONWALK_LAYER_TEST("pad_channels 3x2x2->3 (no padding)", (PadChannels<S>(ImageShape{3, 2, 2}, 3)))

namespace {

template <class S>
constexpr double tol() {
  return 100 * static_cast<double>(std::numeric_limits<S>::epsilon());
}

/// One sample of shape s whose pixel (c, i, j) is value(c, i, j).
template <class S, class F>
Mat<S> image(const ImageShape& s, F value) {
  Mat<S> x(s.size(), 1);
  for (Index c = 0; c < s.c; ++c)
    for (Index i = 0; i < s.h; ++i)
      for (Index j = 0; j < s.w; ++j) x(s.index(c, i, j), 0) = static_cast<S>(value(c, i, j));
  return x;
}

/// A column of the given numbers.
template <class S>
Mat<S> column(std::initializer_list<double> v) {
  Mat<S> m(static_cast<Index>(v.size()), 1);
  Index k = 0;
  for (const double e : v) m(k++, 0) = static_cast<S>(e);
  return m;
}

/// The dense Jacobian of a linear layer, J e_k column by column, in double.
template <class L>
Mat<double> dense_jacobian(const L& l) {
  using S = typename L::scalar_type;
  const Index n = l.in_features();
  return l.jvp(Mat<S>::Zero(n, n), Mat<S>::Identity(n, n)).template cast<double>();
}

/// κ = ‖J‖‖J⁺‖ and γ = (‖J‖_F/√m)(‖J⁺‖_F/√n) from the singular values of J.
std::pair<double, double> exact_amplification(const Mat<double>& J) {
  const Eigen::JacobiSVD<Mat<double>> svd(J);
  const auto& s = svd.singularValues();
  const double m = static_cast<double>(J.rows()), n = static_cast<double>(J.cols());
  const double kappa = s.maxCoeff() / s.minCoeff();
  const double gamma = (s.norm() / std::sqrt(m)) * (s.cwiseInverse().norm() / std::sqrt(n));
  return {kappa, gamma};
}

}  // namespace

// ---- SpaceToDepth
TEMPLATE_TEST_CASE("space_to_depth: documented channel order, hand-built", "[layers][image]", float, double) {
  using S = TestType;
  // x(c, i, j) = 100 c + 10 i + j on 2 x 2 x 4; out channel = c·4 + di·2 + dj, pixel (i, j) ← (2i+di, 2j+dj)
  const SpaceToDepth<S> l(ImageShape{2, 2, 4});
  CHECK(l.out_shape() == ImageShape{8, 1, 2});
  CHECK(l.name() == "space_to_depth(2x2x4->8x1x2)");
  const Mat<S> x = image<S>(l.in_shape(), [](Index c, Index i, Index j) { return 100 * c + 10 * i + j; });
  const Mat<S> expected = column<S>({0, 2, 1, 3, 10, 12, 11, 13, 100, 102, 101, 103, 110, 112, 111, 113});
  CHECK(l.forward(x) == expected);
  CHECK(l.inverse(expected) == x);
}

TEMPLATE_TEST_CASE("space_to_depth: a permutation in the documented order", "[layers][image]", float,
                   double) {
  using S = TestType;
  for (const Index f : {1, 2, 3}) {
    const ImageShape in{3, 6, 12};
    const SpaceToDepth<S> l(in, f);
    INFO(l.name());
    const ImageShape out = l.out_shape();
    REQUIRE(out == ImageShape{3 * f * f, 6 / f, 12 / f});
    // every input index appears exactly once
    const Mat<S> idx = Eigen::VectorX<S>::LinSpaced(in.size(), S(0), static_cast<S>(in.size() - 1));
    const Mat<S> y = l.forward(idx);
    std::vector<int> seen(static_cast<std::size_t>(in.size()), 0);
    for (Index k = 0; k < y.rows(); ++k) ++seen[static_cast<std::size_t>(y(k, 0))];
    CHECK(std::all_of(seen.begin(), seen.end(), [](int s) { return s == 1; }));
    // y(c·f² + di·f + dj, i, j) = x(c, i·f + di, j·f + dj)
    bool order_ok = true;
    for (Index c = 0; c < in.c; ++c)
      for (Index di = 0; di < f; ++di)
        for (Index dj = 0; dj < f; ++dj)
          for (Index i = 0; i < out.h; ++i)
            for (Index j = 0; j < out.w; ++j) {
              const Index k = out.index(c * f * f + di * f + dj, i, j);
              order_ok = order_ok && y(k, 0) == static_cast<S>(in.index(c, i * f + di, j * f + dj)) &&
                         l.source_index(k) == in.index(c, i * f + di, j * f + dj);
            }
    CHECK(order_ok);
  }
}

TEMPLATE_TEST_CASE("space_to_depth: vjp, vijp and inverse are the permutation's", "[layers][image]", float,
                   double) {
  using S = TestType;
  const SpaceToDepth<S> l(ImageShape{2, 4, 6});
  const Mat<S> x = mwtest::randn(l.in_features(), 3, 1).template cast<S>();
  const Mat<S> h = mwtest::randn(l.out_features(), 3, 2).template cast<S>();
  // exact: a permutation moves numbers, it does not round them
  CHECK(l.vijp(x, l.vjp(x, h)) == h);
  CHECK(l.inverse(l.forward(x)) == x);
  CHECK(l.vijp(x, x) == l.forward(x));  // vijp is P itself
  CHECK(l.vjp(x, h) == l.inverse(h));   // vjp is Pᵀ = P⁻¹
}

TEST_CASE("space_to_depth: shape errors name the layer and the shapes", "[layers][image]") {
  mwtest::require_throw<ShapeError>(
      [] {
        SpaceToDepth<double>(ImageShape{2, 5, 4});
      },
      {"space_to_depth", "2x5x4", "2"});
  mwtest::require_throw<ShapeError>(
      [] {
        SpaceToDepth<double>(ImageShape{2, 6, 6}, 4);
      },
      {"space_to_depth", "2x6x6", "4"});
  mwtest::require_throw<ShapeError>([] { SpaceToDepth<double>(ImageShape{2, 4, 4}, 0); }, {"space_to_depth"});
  mwtest::require_throw<ShapeError>(
      [] {
        SpaceToDepth<double>(ImageShape{0, 4, 4});
      },
      {"space_to_depth", "0x4x4"});
  const SpaceToDepth<double> l(ImageShape{1, 2, 2});
  mwtest::require_throw<ShapeError>([&] { (void)l.forward(Mat<double>::Zero(5, 2)); },
                                    {"space_to_depth(1x2x2->4x1x1)", "5x2", "4x"});
}

// ---- AvgPool2d
TEMPLATE_TEST_CASE("avg_pool2d: window means, hand-computed", "[layers][image]", float, double) {
  using S = TestType;
  const AvgPool2d<S> l(ImageShape{2, 2, 4});
  CHECK(l.out_shape() == ImageShape{2, 1, 2});
  CHECK(l.name() == "avg_pool2d(2x2x4->2x1x2)");
  // channel 0 [[1 2 3 4] [5 6 7 8]], channel 1 [[0 0 4 4] [8 8 -4 0]]
  const Mat<S> x = column<S>({1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 4, 4, 8, 8, -4, 0});
  CHECK(l.forward(x) == column<S>({3.5, 5.5, 4, 1}));
  // vjp spreads h/4 over each window
  const Mat<S> h = column<S>({4, 8, -2, 1});
  CHECK(l.vjp(x, h) == column<S>({1, 1, 2, 2, 1, 1, 2, 2, -0.5, -0.5, 0.25, 0.25, -0.5, -0.5, 0.25, 0.25}));
  // vijp returns window sums
  CHECK(l.vijp(x, x) == column<S>({14, 22, 16, 4}));
}

// ---- GlobalAvgPool
TEMPLATE_TEST_CASE("global_avg_pool: channel means, hand-computed", "[layers][image]", float, double) {
  using S = TestType;
  const GlobalAvgPool<S> l(ImageShape{2, 2, 4});
  CHECK(l.out_shape() == ImageShape{2, 1, 1});
  CHECK(l.out_features() == 2);
  CHECK(l.name() == "global_avg_pool(2x2x4->2)");
  const Mat<S> x = column<S>({1, 2, 3, 4, 5, 6, 7, 8, 0, 0, 4, 4, 8, 8, -4, 0});
  CHECK(l.forward(x) == column<S>({4.5, 2.5}));
  const Mat<S> h = column<S>({8, -4});
  Mat<S> expected(16, 1);
  expected << Mat<S>::Constant(8, 1, S(1)), Mat<S>::Constant(8, 1, S(-0.5));
  CHECK(l.vjp(x, h) == expected);
  CHECK(l.vijp(x, x) == column<S>({36, 20}));
}

// ---- the submersive ones: vijp inverts vjp, and is the least-squares solution off the range
TEMPLATE_TEST_CASE("image plumbing: vijp(vjp(h)) = h and least squares off the range", "[layers][image]",
                   float, double) {
  using S = TestType;
  auto check = [](const auto& l) {
    INFO(l.name());
    const Mat<S> x = mwtest::randn(l.in_features(), 4, 11).template cast<S>();
    const Mat<S> h = mwtest::randn(l.out_features(), 4, 12).template cast<S>();
    CHECK(rel_err(l.vijp(x, l.vjp(x, h)), h) <= tol<S>());
    // h_x not in range(Jᵀ): vijp gives argmin ‖Jᵀ h_y − h_x‖
    const Mat<S> hx = mwtest::randn(l.in_features(), 4, 13).template cast<S>();
    const Mat<double> Jt = dense_jacobian(l).transpose();
    const Mat<double> ls = Jt.colPivHouseholderQr().solve(hx.template cast<double>());
    CHECK(rel_err(l.vijp(x, hx), ls) <= tol<S>());
  };
  check(SpaceToDepth<S>(ImageShape{2, 4, 6}));
  check(SpaceToDepth<S>(ImageShape{3, 3, 6}, 3));
  check(AvgPool2d<S>(ImageShape{2, 4, 6}));
  check(AvgPool2d<S>(ImageShape{3, 6, 3}, 3));
  check(GlobalAvgPool<S>(ImageShape{3, 4, 5}));
  check(Flatten<S>(ImageShape{2, 3, 4}));
  check(PadChannels<S>(ImageShape{2, 3, 4}, 2));
}

// ---- amplification: the documented values are the exact κ and γ of J
TEMPLATE_TEST_CASE("image plumbing: amplification is exact", "[layers][image]", float, double) {
  using S = TestType;
  auto check = [](const auto& l, double kappa, double gamma) {
    INFO(l.name());
    const moonwalk::Amplification a = moonwalk::amplification(l, moonwalk::Empty{});
    CHECK(a.known);
    CHECK(a.bound == Approx(kappa).epsilon(1e-12));
    CHECK(a.typical == Approx(gamma).epsilon(1e-12));
    const std::pair<double, double> e = exact_amplification(dense_jacobian(l));
    CHECK(a.bound == Approx(e.first).epsilon(1e-9));
    CHECK(a.typical == Approx(e.second).epsilon(1e-9));
  };
  check(SpaceToDepth<S>(ImageShape{2, 4, 6}), 1, 1);
  check(AvgPool2d<S>(ImageShape{2, 4, 6}), 1, 0.5);
  check(AvgPool2d<S>(ImageShape{1, 6, 3}, 3), 1, 1.0 / 3);
  check(GlobalAvgPool<S>(ImageShape{3, 4, 5}), 1, 1 / std::sqrt(20.0));
  check(Flatten<S>(ImageShape{2, 3, 4}), 1, 1);
  // PadChannels reports ZeroPad's κ = γ = 1 (its fragment restores the padded part exactly)
  const PadChannels<S> p(ImageShape{2, 3, 4}, 5);
  const moonwalk::Amplification a = moonwalk::amplification(p, moonwalk::Empty{});
  CHECK(a.bound == 1);
  CHECK(a.typical == 1);
}

// ---- Flatten
TEMPLATE_TEST_CASE("flatten: the identity on the layout", "[layers][image]", float, double) {
  using S = TestType;
  const Flatten<S> l(ImageShape{2, 3, 4});
  CHECK(l.name() == "flatten(2x3x4->24)");
  CHECK(l.out_shape() == ImageShape{24, 1, 1});
  const Mat<S> x = mwtest::randn(24, 3, 21).template cast<S>();
  CHECK(l.forward(x) == x);
  CHECK(l.vjp(x, x) == x);
  CHECK(l.vijp(x, x) == x);
  CHECK(l.inverse(x) == x);
  mwtest::require_throw<ShapeError>([] { Flatten<S>(ImageShape{2, 0, 4}); }, {"flatten", "2x0x4"});
}

// ---- PadChannels
TEMPLATE_TEST_CASE("pad_channels: equals ZeroPad on the flat layout", "[layers][image]", float, double) {
  using S = TestType;
  const PadChannels<S> l(ImageShape{3, 8, 8}, 8);
  const ZeroPad<S> z(3 * 64, 8 * 64);
  CHECK(l.name() == "pad_channels(3x8x8->8x8x8)");
  CHECK(l.out_shape() == ImageShape{8, 8, 8});
  CHECK(l.in_features() == z.in_features());
  CHECK(l.out_features() == z.out_features());
  const Mat<S> x = mwtest::randn(l.in_features(), 3, 31).template cast<S>();
  const Mat<S> v = mwtest::randn(l.in_features(), 3, 32).template cast<S>();
  const Mat<S> h = mwtest::randn(l.out_features(), 3, 33).template cast<S>();
  CHECK(l.forward(x) == z.forward(x));
  CHECK(l.jvp(x, v) == z.jvp(x, v));
  CHECK(l.vjp(x, h) == z.vjp(x, h));
  const moonwalk::Fragment<S> f = l.save_fragment({}, h);
  CHECK(f.value == z.save_fragment({}, h).value);
  CHECK(f.value.rows() == 5 * 64);  // the padded channels of h_y
  CHECK(l.vijp_with_fragment(x, l.vjp(x, h), f) == h);
  CHECK(l.inverse(l.forward(x)) == x);
  // the padded channels are channels 3..7 of the output image, and zero
  const Mat<S> y = l.forward(x);
  const ImageShape out = l.out_shape();
  CHECK(y.middleRows(out.index(3, 0, 0), 5 * 64).isZero(0));
  CHECK(y(out.index(2, 7, 7), 1) == x(l.in_shape().index(2, 7, 7), 1));
  CHECK_FALSE(l.is_submersive());
  mwtest::require_throw<moonwalk::RankError>([&] { (void)l.vijp(x, x); }, {"pad_channels(3x8x8->8x8x8)"});
}

TEST_CASE("pad_channels: shape errors name the layer and the shapes", "[layers][image]") {
  mwtest::require_throw<ShapeError>(
      [] {
        PadChannels<double>(ImageShape{3, 4, 5}, 2);
      },
      {"pad_channels", "3x4x5", "2x4x5"});
  const PadChannels<double> l(ImageShape{1, 2, 2}, 3);
  mwtest::require_throw<ShapeError>([&] { (void)l.vjp(Mat<double>::Zero(4, 2), Mat<double>::Zero(11, 2)); },
                                    {"pad_channels(1x2x2->3x2x2)", "11x2", "12x"});
  mwtest::require_throw<ShapeError>([] { AvgPool2d<double>(ImageShape{1, 4, 3}); }, {"avg_pool2d", "1x4x3"});
  mwtest::require_throw<ShapeError>(
      [] {
        GlobalAvgPool<double>(ImageShape{1, -1, 3});
      },
      {"global_avg_pool", "1x-1x3"});
}

// ---- the contract, at compile time
static_assert(moonwalk::check_submersive<SpaceToDepth<float>>());
static_assert(moonwalk::Invertible<SpaceToDepth<double>>);
static_assert(moonwalk::check_submersive<AvgPool2d<double>>());
static_assert(moonwalk::check_submersive<GlobalAvgPool<float>>());
static_assert(moonwalk::check_submersive<Flatten<double>>());
static_assert(moonwalk::Invertible<Flatten<float>>);
static_assert(moonwalk::check_fragmental<PadChannels<double>>());
static_assert(moonwalk::Invertible<PadChannels<float>>);
static_assert(moonwalk::CastableTo<PadChannels<float>, double>);
static_assert(moonwalk::HasAmplification<AvgPool2d<float>>);
static_assert(std::is_same_v<moonwalk::residual_t<GlobalAvgPool<double>>, moonwalk::Empty>);
