// Residual blocks y = x + F(x) (layers/residual.hpp): the generic checker,
// the GMRES vijp and the Newton inverse, and what a singular block does.
// Under every schedule: tests/schedules/test_by_name.cpp.
#include <Eigen/SVD>
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/layers/residual.hpp>
#include <moonwalk/nets/any_layer.hpp>
#include <moonwalk/nets/network.hpp>
#include <moonwalk/nets/sequential.hpp>

#include "support/layer_check.hpp"

using moonwalk::AnyLayer;
using moonwalk::Index;
using moonwalk::LeakyReLU;
using moonwalk::Linear;
using moonwalk::Matrix;
using moonwalk::Network;
using moonwalk::Residual;
using moonwalk::Sequential;
using moonwalk::Tanh;
using mwtest::perturbed;

namespace {
template <class S>
using Branch = Sequential<Linear<S>, Tanh<S>, Linear<S>>;
/// F = linear:HIDDEN, tanh, linear:n with gain `gain` (a contraction for gain < 1), slightly perturbed.
template <class S>
Branch<S> branch(Index n, Index hidden, double gain, std::uint64_t seed) {
  return Sequential(perturbed(Linear<S>(n, hidden, {.seed = seed}), seed + 1, 0.05), Tanh<S>(hidden),
                    perturbed(Linear<S>(hidden, n, {.seed = seed + 2, .gain = S(gain)}), seed + 3, 0.05));
}
template <class S>
Network<S> runtime_branch(Index n, std::uint64_t seed) {
  Network<S> f;
  f.add(Linear<S>(n, n + 2, {.seed = seed})).add(LeakyReLU<S>(n + 2, S(0.2)));
  f.add(Linear<S>(n + 2, n, {.seed = seed + 1, .gain = S(0.6)}));
  return f;
}
}  // namespace

MOONWALK_LAYER_TEST("residual(linear-tanh-linear), gain 0.5", (Residual<Branch<S>>(branch<S>(5, 7, 0.5, 91))))
MOONWALK_LAYER_TEST("residual(linear-tanh-linear), gain 0.9", (Residual<Branch<S>>(branch<S>(4, 6, 0.9, 92))))
MOONWALK_LAYER_TEST("residual(runtime network)", (Residual<Network<S>>(runtime_branch<S>(5, 93))))
MOONWALK_LAYER_TEST("any_layer(residual)", (AnyLayer<S>(Residual<Branch<S>>(branch<S>(4, 5, 0.5, 94)))))
MOONWALK_LAYER_TEST("residual(linear-tanh-linear), gain 3, Lipschitz limit 0.6",
                    (Residual<Branch<S>>(branch<S>(5, 7, 3.0, 95), {.lipschitz = 0.6})))

TEST_CASE("residual: vijp by GMRES converges in a few iterations on a contraction", "[layers][residual]") {
  const Residual<Branch<double>> r(branch<double>(16, 24, 0.5, 7));
  const Matrix<double> x = moonwalk::gaussian<double>(16, 8, 1);
  const Matrix<double> h = moonwalk::gaussian<double>(16, 8, 2);
  const Matrix<double> hy = r.vijp(x, r.vjp(x, h));
  CHECK(mwtest::rel_err(hy, h) < 1e-12);
  CHECK(r.last_iterations() > 1);
  CHECK(r.last_iterations() < 30);
  const Matrix<double> y = r.forward(x);
  CHECK(mwtest::rel_err(r.inverse(y), x) < 1e-12);
  CHECK(r.iterations() > static_cast<std::uint64_t>(r.last_iterations()));
}

TEST_CASE("residual: a singular block says so, naming it; a non-contraction may still solve",
          "[layers][residual]") {
  const Matrix<double> y = moonwalk::gaussian<double>(3, 2, 3);
  // F = -2 x: no contraction, but I + J_F = -I is invertible: Newton and GMRES solve it.
  Linear<double> neg(3, 3, {.seed = 1});
  neg.W() = -2 * Matrix<double>::Identity(3, 3);
  const Residual<Linear<double>> r(neg, {.max_iterations = 20});
  CHECK(mwtest::rel_err(r.inverse(y), Matrix<double>(-y)) < 1e-14);
  CHECK(mwtest::rel_err(r.vijp(y, y), Matrix<double>(-y)) < 1e-14);
  // F = -x: I + J_F = 0 is singular: neither solve reaches the tolerance.
  Linear<double> minus(3, 3, {.seed = 1});
  minus.W() = -Matrix<double>::Identity(3, 3);
  const Residual<Linear<double>> s(minus, {.max_iterations = 20});
  CHECK_THROWS_WITH(s.vijp(y, y),
                    Catch::Contains("residual(linear(3->3))") && Catch::Contains("contraction"));
  CHECK_THROWS_WITH(s.inverse(y),
                    Catch::Contains("residual(linear(3->3))") && Catch::Contains("contraction"));
  CHECK_THROWS_AS(Residual<Linear<double>>(Linear<double>(3, 4)), moonwalk::ShapeError);
}

TEST_CASE("residual: a Lipschitz limit keeps F's weights at spectral norm <= c after every update",
          "[layers][residual]") {
  // F = 3 · (random Linear) alone: far from a contraction until limited.
  Linear<double> w(6, 6, {.seed = 3, .gain = 3.0});
  const double before = Eigen::JacobiSVD<Matrix<double>>(Matrix<double>(w.W())).singularValues()(0);
  REQUIRE(before > 2);
  Residual<Linear<double>> r(w, {.lipschitz = 0.7});
  auto sigma = [&] {
    return Eigen::JacobiSVD<Matrix<double>>(Matrix<double>(r.inner().W())).singularValues()(0);
  };
  CHECK(sigma() == Approx(0.7).epsilon(1e-6));
  CHECK(r.lipschitz_estimate() == Approx(0.7).epsilon(1e-6));
  const auto a = r.amplification(Matrix<double>::Zero(6, 1));
  CHECK(a.known);
  CHECK(a.bound == Approx(1.7 / 0.3).epsilon(1e-5));
  // An update that breaks the limit; set_step (which optimizers call) restores it.
  r.inner().W() += 2 * moonwalk::gaussian<double>(6, 6, 9);
  REQUIRE(sigma() > 1);
  r.set_step(1);
  CHECK(sigma() <= 0.7 * (1 + 1e-3));
  CHECK(sigma() >= 0.7 * (1 - 1e-3));
  const Matrix<double> x = moonwalk::gaussian<double>(6, 4, 1), h = moonwalk::gaussian<double>(6, 4, 2);
  CHECK(mwtest::rel_err(r.vijp(x, r.vjp(x, h)), h) < 1e-12);
  CHECK(mwtest::rel_err(r.inverse(r.forward(x)), x) < 1e-12);
  // The bias is kept; a weight below the limit is left as it is.
  Linear<double> small(6, 6, {.seed = 4, .gain = 0.2});
  small.b().setConstant(0.5);
  const Residual<Linear<double>> kept(small, {.lipschitz = 0.7});
  CHECK(Matrix<double>(kept.inner().W()) == Matrix<double>(small.W()));
  CHECK(Matrix<double>(kept.inner().b()) == Matrix<double>(small.b()));
  CHECK(kept.lipschitz_estimate() < 0.7);
  CHECK_THROWS_WITH(Residual<Linear<double>>(w, {.lipschitz = 1}), Catch::Contains("lipschitz"));
  // Without a limit: no estimate, no amplification bound.
  const Residual<Linear<double>> off(w);
  CHECK(off.lipschitz_estimate() == 0);
  CHECK_FALSE(off.amplification(x).known);
}
