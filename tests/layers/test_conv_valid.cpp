// Valid (unpadded, stride-1) convolutions, 1-D and 2-D: the generic layer
// check, the forward against a direct loop, the substitution vijp and its
// transpose, the shape rules, rank detection, and the amplification estimate.
#include <cmath>
#include <limits>
#include <moonwalk/core/image.hpp>
#include <moonwalk/layers/conv_valid.hpp>

#include "support/check_util.hpp"
#include "support/layer_check.hpp"

using moonwalk::ConvValid1d;
using moonwalk::ConvValid2d;
using moonwalk::ImageShape;
using moonwalk::Index;
using mwtest::Mat;
using mwtest::perturbed;
using mwtest::randn;
using mwtest::rel_err;

// ---- every operator through the generic checker, float and double
MOONWALK_LAYER_TEST("conv_valid1d 3x10 -> 2x8, k=3", (ConvValid1d<S>(3, 10, 2, 3, {.seed = 1})))
MOONWALK_LAYER_TEST("conv_valid1d 3x10 -> 2x8, k=3, perturbed",
                    (perturbed(ConvValid1d<S>(3, 10, 2, 3, {.seed = 2}), 21, 0.1)))
MOONWALK_LAYER_TEST("conv_valid1d 4x9 -> 4x8, k=2 (c_out = c_in), no bias",
                    (ConvValid1d<S>(4, 9, 4, 2, {.seed = 3, .bias = false})))
MOONWALK_LAYER_TEST("conv_valid1d 3x8 -> 3x6, k=3 (c_out = c_in), perturbed",
                    (perturbed(ConvValid1d<S>(3, 8, 3, 3, {.seed = 4}), 41, 0.1)))
MOONWALK_LAYER_TEST("conv_valid1d 5x6 -> 2x6, k=1 (pointwise), gain 2",
                    (ConvValid1d<S>(5, 6, 2, 1, {.seed = 5, .gain = S(2)})))
MOONWALK_LAYER_TEST("conv_valid2d 3x5x6 -> 2x3x4, k=3",
                    (ConvValid2d<S>(ImageShape{3, 5, 6}, 2, 3, {.seed = 6})))
MOONWALK_LAYER_TEST("conv_valid2d 3x5x6 -> 2x3x4, k=3, perturbed",
                    (perturbed(ConvValid2d<S>(ImageShape{3, 5, 6}, 2, 3, {.seed = 7}), 71, 0.1)))
MOONWALK_LAYER_TEST("conv_valid2d 2x4x5 -> 2x3x4, k=2 (c_out = c_in), no bias",
                    (ConvValid2d<S>(ImageShape{2, 4, 5}, 2, 2, {.seed = 8, .bias = false})))
MOONWALK_LAYER_TEST("conv_valid2d 3x4x4 -> 3x2x2, k=3 (c_out = c_in), perturbed",
                    (perturbed(ConvValid2d<S>(ImageShape{3, 4, 4}, 3, 3, {.seed = 9}), 91, 0.1)))
MOONWALK_LAYER_TEST("conv_valid2d 4x3x3 -> 3x3x3, k=1 (pointwise), no bias",
                    (ConvValid2d<S>(ImageShape{4, 3, 3}, 3, 1, {.seed = 10, .bias = false})))

namespace {

/// y[o, (i, j)] = Σ_{ti, tj, c} W_{ti·kw+tj}[o, c] x[c, (i + ti, j + tj)] + b[o], by loops.
template <class L>
Mat<double> direct_forward(const L& l, const Mat<double>& x, Index kh, Index kw) {
  const ImageShape in = l.in_shape(), out = l.out_shape();
  Mat<double> y(out.size(), x.cols());
  for (Index s = 0; s < x.cols(); ++s)
    for (Index o = 0; o < out.c; ++o)
      for (Index i = 0; i < out.h; ++i)
        for (Index j = 0; j < out.w; ++j) {
          double v = l.has_bias() ? l.b()(o) : 0.0;
          for (Index ti = 0; ti < kh; ++ti)
            for (Index tj = 0; tj < kw; ++tj)
              for (Index c = 0; c < in.c; ++c)
                v += l.tap(ti * kw + tj)(o, c) * x(in.index(c, i + ti, j + tj), s);
          y(out.index(o, i, j), s) = v;
        }
  return y;
}

/// Random weights of the given scale on top of the default init (b too).
template <class L>
L scrambled(L l, std::uint64_t seed, double scale) {
  return perturbed(std::move(l), seed, scale);
}

}  // namespace

TEST_CASE("conv_valid: forward matches the direct sum, 1-D and 2-D", "[layers][conv_valid]") {
  const auto l1 = scrambled(ConvValid1d<double>(3, 11, 2, 4, {.seed = 1}), 11, 0.5);
  const Mat<double> x1 = randn(l1.in_features(), 4, 12);
  CHECK(rel_err(l1.forward(x1), direct_forward(l1, x1, 1, 4)) < 1e-14);
  CHECK(l1.out_shape() == ImageShape{2, 1, 8});

  const auto l2 = scrambled(ConvValid2d<double>(ImageShape{3, 6, 5}, 2, 3, {.seed = 2}), 13, 0.5);
  const Mat<double> x2 = randn(l2.in_features(), 3, 14);
  CHECK(rel_err(l2.forward(x2), direct_forward(l2, x2, 3, 3)) < 1e-14);
  CHECK(l2.out_shape() == ImageShape{2, 4, 3});
  CHECK(l2.num_params() == 9 * 2 * 3 + 2);
  CHECK(l2.name() == "conv_valid2d(3x6x5->2x4x3, k=3)");
  CHECK(ConvValid1d<float>(3, 11, 2, 4, {.bias = false}).name() == "conv_valid1d(3x11->2x8, k=4, no bias)");
  CHECK(ConvValid1d<float>(3, 11, 2, 4, {.bias = false}).num_params() == 4 * 2 * 3);
}

TEMPLATE_TEST_CASE("conv_valid: vijp inverts vjp, and vjp(vijp(h_x)) = h_x on the range",
                   "[layers][conv_valid]", float, double) {
  using S = TestType;
  const double tol = std::is_same_v<S, double> ? 1e-10 : 2e-4;
  auto run = [&](const auto& l, std::uint64_t seed) {
    INFO(l.name());
    const Index B = 5;
    const Mat<S> x = randn(l.in_features(), B, seed).template cast<S>();
    const Mat<S> h = randn(l.out_features(), B, seed + 1).template cast<S>();
    const Mat<S> hx = l.vjp(x, h);
    CHECK(rel_err(l.vijp(x, hx), h) < tol);
    CHECK(rel_err(l.vjp(x, l.vijp(x, hx)), hx) < tol);
    // Off the range: at the input pixels p the equations hold projected onto
    // range(W_0ᵀ) (W_0 · residual = 0; all of them when c_out = c_in); the
    // trailing pixels' equations are not used, so they do not hold.
    const Mat<S> g = randn(l.in_features(), B, seed + 2).template cast<S>();
    const Mat<double> diff = (l.vjp(x, l.vijp(x, g)) - g).template cast<double>();
    const Mat<double> w0 = l.tap(0).template cast<double>();
    const ImageShape in = l.in_shape(), out = l.out_shape();
    double used = 0, unused = 0;
    for (Index s = 0; s < B; ++s)
      for (Index i = 0; i < in.h; ++i)
        for (Index j = 0; j < in.w; ++j) {
          Mat<double> r(in.c, 1);
          for (Index c = 0; c < in.c; ++c) r(c, 0) = diff(in.index(c, i, j), s);
          if (i < out.h && j < out.w)
            used = std::max(used, (w0 * r).norm());
          else
            unused = std::max(unused, r.norm());
        }
    CHECK(used < tol * static_cast<double>(g.norm()));
    CHECK(unused > 1e-3);
  };
  run(ConvValid1d<S>(3, 10, 2, 3, {.seed = 1}), 100);
  run(scrambled(ConvValid1d<S>(4, 17, 4, 2, {.seed = 2}), 21, 0.1), 110);
  run(scrambled(ConvValid1d<S>(6, 24, 3, 5, {.seed = 3, .bias = false}), 31, 0.1), 120);
  run(ConvValid2d<S>(ImageShape{3, 7, 6}, 2, 3, {.seed = 4}), 130);
  run(scrambled(ConvValid2d<S>(ImageShape{2, 5, 8}, 2, 2, {.seed = 5}), 51, 0.1), 140);
  run(scrambled(ConvValid2d<S>(ImageShape{5, 6, 6}, 3, 3, {.seed = 6, .bias = false}), 61, 0.1), 150);
  run(ConvValid2d<S>(ImageShape{8, 9, 7}, 8, 4, {.seed = 7, .gain = S(0.5)}), 160);
}

TEST_CASE("conv_valid: vijp_transpose is the adjoint of vijp", "[layers][conv_valid]") {
  auto run = [](const auto& l, std::uint64_t seed) {
    INFO(l.name());
    const Mat<double> x = randn(l.in_features(), 3, seed);
    const Mat<double> hx = randn(l.in_features(), 3, seed + 1), gy = randn(l.out_features(), 3, seed + 2);
    const double lhs = mwtest::dot(gy, l.vijp(x, hx)), rhs = mwtest::dot(l.vijp_transpose(gy), hx);
    CHECK(std::abs(lhs - rhs) <= 1e-12 * (std::abs(lhs) + gy.norm() * hx.norm()));
  };
  run(scrambled(ConvValid1d<double>(3, 9, 2, 3, {.seed = 1}), 11, 0.2), 200);
  run(scrambled(ConvValid2d<double>(ImageShape{3, 5, 6}, 3, 3, {.seed = 2}), 12, 0.2), 210);
  run(scrambled(ConvValid2d<double>(ImageShape{4, 4, 5}, 2, 2, {.seed = 3, .bias = false}), 13, 0.2), 220);
}

TEST_CASE("conv_valid: only submersive shapes construct", "[layers][conv_valid]") {
  using moonwalk::ShapeError;
  // c_out > c_in
  mwtest::require_throw<ShapeError>([] { (void)ConvValid1d<double>(2, 10, 3, 3); },
                                    {"conv_valid1d(2x10->3x8, k=3)", "c_out <= c_in"});
  mwtest::require_throw<ShapeError>(
      [] {
        (void)ConvValid2d<double>(ImageShape{2, 5, 5}, 3, 2);
      },
      {"conv_valid2d(2x5x5->3x4x4, k=2)", "c_out <= c_in"});
  // c_out = c_in without a spatial shrink (k = 1): as many numbers out as in
  mwtest::require_throw<ShapeError>([] { (void)ConvValid1d<double>(3, 10, 3, 1); },
                                    {"conv_valid1d(3x10->3x10, k=1)", "3x10", "30 numbers", "smaller"});
  mwtest::require_throw<ShapeError>(
      [] {
        (void)ConvValid2d<float>(ImageShape{2, 4, 4}, 2, 1);
      },
      {"conv_valid2d", "2x4x4", "32 numbers"});
  // kernel larger than the input, non-positive sizes
  mwtest::require_throw<ShapeError>([] { (void)ConvValid1d<double>(3, 4, 2, 5); }, {"conv_valid1d", "3x4"});
  mwtest::require_throw<ShapeError>(
      [] {
        (void)ConvValid2d<double>(ImageShape{3, 6, 2}, 2, 3);
      },
      {"conv_valid2d", "3x6x2"});
  mwtest::require_throw<ShapeError>([] { (void)ConvValid1d<double>(0, 4, 0, 1); }, {"conv_valid1d"});
  // the boundary cases that are submersive
  CHECK_NOTHROW(ConvValid1d<double>(3, 10, 3, 2));
  CHECK_NOTHROW(ConvValid1d<double>(3, 10, 2, 1));
  CHECK_NOTHROW(ConvValid2d<double>(ImageShape{1, 2, 2}, 1, 2));
}

TEMPLATE_TEST_CASE("conv_valid: a rank-deficient first tap is refused, an ill-conditioned one flagged",
                   "[layers][conv_valid]", float, double) {
  using S = TestType;
  using moonwalk::RankError;
  auto l = ConvValid2d<S>(ImageShape{3, 5, 5}, 2, 3, {.seed = 1});
  const Mat<S> x = randn(l.in_features(), 2, 300).template cast<S>();
  const Mat<S> hx = l.vjp(x, randn(l.out_features(), 2, 301).template cast<S>());
  const auto healthy = l.amplification(moonwalk::Empty{});
  CHECK(healthy.bound < 5);  // the contraction init (class comment)
  CHECK(std::isfinite(healthy.typical));

  // W_0's second row equal to its first: W_0 has rank 1 < c_out
  {
    auto w0 = l.tap(0);
    w0.row(1) = w0.row(0);
  }
  mwtest::require_throw<RankError>([&] { (void)l.vijp(x, hx); },
                                   {l.name(), "W_0", "rank deficient", "full row rank"});
  CHECK(std::isinf(l.amplification(moonwalk::Empty{}).bound));
  CHECK(std::isinf(l.amplification(moonwalk::Empty{}).typical));
  // the other taps do not matter for the substitution: a zero W_0 is refused too
  l.tap(0).setZero();
  mwtest::require_throw<RankError>([&] { (void)l.vijp(x, hx); }, {l.name(), "rank deficient"});

  // nearly dependent rows: solvable, but the amplification says how badly
  {
    auto w0 = l.tap(0);
    w0 = moonwalk::orthogonal<S>(2, 3, 7);
    w0.row(1) = w0.row(0) + S(1e-3) * w0.row(1);
  }
  const auto ill = l.amplification(moonwalk::Empty{});
  INFO("healthy bound " << healthy.bound << ", ill-conditioned bound " << ill.bound);
  CHECK(ill.bound > 100);
  CHECK(ill.bound > 50 * healthy.bound);
  CHECK(ill.typical <= ill.bound);
  if constexpr (std::is_same_v<S, double>) {
    const Mat<S> h = randn(l.out_features(), 2, 302);
    CHECK(rel_err(l.vijp(x, l.vjp(x, h)), h) < 1e-14 * ill.bound);
  }
}

TEST_CASE("conv_valid: the amplification estimate bounds the measured growth and follows the weights",
          "[layers][conv_valid]") {
  auto measured = [](const auto& l, std::uint64_t seed) {
    const Index B = 6;
    const Mat<double> x = randn(l.in_features(), B, seed);
    double worst = 0;
    for (std::uint64_t k = 0; k < 4; ++k) {
      const Mat<double> u = randn(l.out_features(), B, seed + 10 + k);
      const Mat<double> hx = l.vjp(x, u);
      const Mat<double> d = 1e-6 * randn(l.in_features(), B, seed + 20 + k);
      const Mat<double> dy = l.vijp(x, Mat<double>(hx + d)) - u;
      for (Index j = 0; j < B; ++j)
        worst = std::max(worst, (dy.col(j).norm() / u.col(j).norm()) / (d.col(j).norm() / hx.col(j).norm()));
    }
    return worst;
  };
  auto l = scrambled(ConvValid2d<double>(ImageShape{4, 6, 6}, 3, 3, {.seed = 4}), 41, 0.15);
  const auto a = l.amplification(moonwalk::Empty{});
  INFO("bound " << a.bound << ", typical " << a.typical);
  CHECK(a.bound >= 1);
  CHECK(a.typical <= a.bound);
  CHECK(measured(l, 400) <= a.bound);
  // cached per weight version: the same figures again, new ones after a change
  const auto again = l.amplification(moonwalk::Empty{});
  CHECK(again.bound == a.bound);
  CHECK(again.typical == a.typical);
  l.tap(1) *= 4.0;
  const auto changed = l.amplification(moonwalk::Empty{});
  CHECK(changed.bound != a.bound);
  CHECK(measured(l, 410) <= changed.bound);
  // the vijp follows the new weights too
  const Mat<double> x = randn(l.in_features(), 2, 420), h = randn(l.out_features(), 2, 421);
  CHECK(rel_err(l.vijp(x, l.vjp(x, h)), h) < 1e-10);

  // 1-D, c_out = c_in
  const auto l1 = scrambled(ConvValid1d<double>(3, 20, 3, 4, {.seed = 5}), 51, 0.1);
  const auto a1 = l1.amplification(moonwalk::Empty{});
  CHECK(a1.typical <= a1.bound);
  CHECK(measured(l1, 430) <= a1.bound);
}

TEST_CASE("conv_valid: cast carries the weights and keeps the vijp", "[layers][conv_valid]") {
  const auto l = scrambled(ConvValid2d<float>(ImageShape{3, 5, 4}, 2, 2, {.seed = 3}), 31, 0.2);
  const auto d = l.cast<double>();
  static_assert(std::is_same_v<std::remove_cvref_t<decltype(d)>, ConvValid2d<double>>);
  CHECK(d.name() == l.name());
  const Mat<double> x = randn(l.in_features(), 2, 500), h = randn(l.out_features(), 2, 501);
  CHECK(rel_err(d.vijp(x, d.vjp(x, h)), h) < 1e-12);
  CHECK(rel_err(d.forward(x), Mat<double>(l.forward(x.cast<float>()).cast<double>())) < 1e-5);
}
