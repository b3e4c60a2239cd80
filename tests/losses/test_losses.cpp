// Losses: gradients against central differences, stability, shape errors.
#include <cmath>
#include <moonwalk/losses/losses.hpp>
#include <vector>

#include "support/check_util.hpp"

using moonwalk::Index;
using moonwalk::MSE;
using moonwalk::ShapeError;
using moonwalk::SoftmaxCrossEntropy;
using mwtest::Mat;

namespace {

/// Central differences of loss.value(·, t) at y, entry by entry, in double.
template <class Loss>
Mat<double> fd_gradient(const Loss& loss, const Mat<double>& y, const typename Loss::target_type& t,
                        double step = 1e-5) {
  Mat<double> g(y.rows(), y.cols());
  for (Index j = 0; j < y.cols(); ++j)
    for (Index i = 0; i < y.rows(); ++i) {
      Mat<double> yp = y, ym = y;
      yp(i, j) += step;
      ym(i, j) -= step;
      g(i, j) = (loss.value(yp, t) - loss.value(ym, t)) / (2 * step);
    }
  return g;
}

std::vector<Index> labels_for(Index classes, Index batch, std::uint64_t seed) {
  std::vector<Index> t;
  const Mat<double> r = mwtest::randn(1, batch, seed);
  for (Index b = 0; b < batch; ++b)
    t.push_back(static_cast<Index>(std::floor(std::abs(r(0, b)) * 7919)) % classes);
  return t;
}

}  // namespace

TEST_CASE("mse: value and gradient against central differences (double)", "[losses]") {
  const MSE<double> loss;
  for (const Index batch : {1, 4}) {
    INFO("batch " << batch);
    const Mat<double> y = mwtest::randn(5, batch, 1), t = mwtest::randn(5, batch, 2);
    const auto [value, grad] = loss.value_and_gradient(y, t);
    CHECK(value == Approx(0.5 * (y - t).squaredNorm() / static_cast<double>(batch)).epsilon(1e-14));
    CHECK(mwtest::rel_err(grad, fd_gradient(loss, y, t)) <= 1e-9);
    CHECK(loss.value(y, t) == value);
    CHECK(loss.gradient(y, t) == grad);
    CHECK(loss.value(t, t) == 0);
  }
}

TEST_CASE("xent: value and gradient against central differences (double)", "[losses]") {
  const SoftmaxCrossEntropy<double> loss;
  for (const Index batch : {1, 4}) {
    INFO("batch " << batch);
    const Mat<double> y = 2 * mwtest::randn(5, batch, 3);
    const auto t = labels_for(5, batch, 4);
    const auto [value, grad] = loss.value_and_gradient(y, t);
    double expected = 0;
    for (Index b = 0; b < batch; ++b)
      expected += std::log(y.col(b).array().exp().sum()) - y(t[static_cast<std::size_t>(b)], b);
    CHECK(value == Approx(expected / static_cast<double>(batch)).epsilon(1e-13));
    CHECK(mwtest::rel_err(grad, fd_gradient(loss, y, t)) <= 1e-9);
    // softmax − one-hot: every column sums to zero
    CHECK(grad.colwise().sum().cwiseAbs().maxCoeff() <= 1e-15);
  }
}

TEMPLATE_TEST_CASE("xent: stable for huge logits", "[losses]", float, double) {
  using S = TestType;
  const SoftmaxCrossEntropy<S> loss;
  // column 0: logits (1e4, 0, −1e4), label 1 → loss 1e4; gradient (1, −1, 0)
  // column 1: logits (1e4, 1e4, −1e4), label 0 → loss log 2; gradient (½ − 1, ½, 0)
  Mat<S> y(3, 2);
  y << S(1e4), S(1e4), S(0), S(1e4), S(-1e4), S(-1e4);
  const std::vector<Index> t{1, 0};
  const auto [value, grad] = loss.value_and_gradient(y, t);
  REQUIRE(std::isfinite(value));
  REQUIRE(grad.allFinite());
  const double eps = static_cast<double>(std::numeric_limits<S>::epsilon());
  CHECK(static_cast<double>(value) == Approx((1e4 + std::log(2.0)) / 2).epsilon(4 * eps));
  Mat<double> expected(3, 2);
  expected << 1, -0.5, -1, 0.5, 0, 0;
  expected /= 2;
  CHECK(mwtest::rel_err(grad, expected) <= 4 * eps);

  // all-huge, all-negative and mixed columns, batch 3: finite, non-negative
  const Mat<S> big = (1e4 * mwtest::randn(6, 3, 5)).template cast<S>();
  const auto [v2, g2] = loss.value_and_gradient(big, {0, 3, 5});
  CHECK(std::isfinite(v2));
  CHECK(v2 >= S(0));
  CHECK(g2.allFinite());
  const auto [v3, g3] = loss.value_and_gradient(Mat<S>::Constant(4, 2, S(-3e4)), {2, 1});
  CHECK(static_cast<double>(v3) == Approx(std::log(4.0)).epsilon(4 * eps));
  CHECK(g3.allFinite());
}

TEST_CASE("xent: a label out of range or a label count mismatch throws ShapeError", "[losses]") {
  const SoftmaxCrossEntropy<double> loss;
  const Mat<double> y = mwtest::randn(5, 3, 1);
  mwtest::require_throw<ShapeError>([&] { (void)loss.value(y, {0, 5, 1}); }, {"xent", "label 5", "[0, 5)"});
  mwtest::require_throw<ShapeError>([&] { (void)loss.value(y, {0, -1, 1}); }, {"xent", "label -1"});
  mwtest::require_throw<ShapeError>([&] { (void)loss.value_and_gradient(y, {0, 1}); }, {"xent", "3", "2"});
  mwtest::require_throw<ShapeError>([&] { (void)loss.gradient(y, {0, 1, 2, 3}); }, {"xent", "3", "4"});
  mwtest::require_throw<ShapeError>([&] { (void)loss.value(Mat<double>(5, 0), {}); }, {"xent"});
  CHECK_NOTHROW(loss.value(y, {0, 4, 2}));
}

TEST_CASE("mse: a target of another shape throws ShapeError", "[losses]") {
  const MSE<double> loss;
  const Mat<double> y = mwtest::randn(5, 3, 1);
  mwtest::require_throw<ShapeError>([&] { (void)loss.value(y, mwtest::randn(4, 3, 2)); },
                                    {"mse", "5x3", "4x3"});
  mwtest::require_throw<ShapeError>([&] { (void)loss.gradient(y, mwtest::randn(5, 2, 2)); }, {"mse", "5x2"});
  mwtest::require_throw<ShapeError>([&] { (void)loss.value(Mat<double>(5, 0), Mat<double>(5, 0)); }, {"mse"});
}
