// Amplification and cast beyond the generic checker: the Linear condition
// estimator against the SVD, elementwise figures by their formulas, coupling
// bounds against the exact per-sample condition number, type erasure, and a
// Network carried into double.
#include <Eigen/QR>
#include <Eigen/SVD>
#include <cmath>
#include <moonwalk/core/amplification.hpp>
#include <moonwalk/core/probe.hpp>
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/coupling.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/layers/pad.hpp>
#include <moonwalk/nets/any_layer.hpp>
#include <moonwalk/nets/network.hpp>
#include <moonwalk/nets/sequential.hpp>

#include "support/check_util.hpp"
#include "support/user_layers.hpp"

using moonwalk::AdditiveCoupling;
using moonwalk::AffineCoupling;
using moonwalk::Amplification;
using moonwalk::AnyLayer;
using moonwalk::Erased;
using moonwalk::Index;
using moonwalk::LeakyReLU;
using moonwalk::Linear;
using moonwalk::Network;
using moonwalk::ReLU;
using moonwalk::Sequential;
using moonwalk::Tanh;
using moonwalk::ZeroPad;
using mwtest::Mat;
using mwtest::randn;
using mwtest::rel_err;

namespace {

/// Singular values of a matrix, in double.
Eigen::VectorXd singular_values(const Mat<double>& a) {
  return Eigen::JacobiSVD<Mat<double>>(a).singularValues();
}

double kappa2(const Mat<double>& a) {
  const Eigen::VectorXd s = singular_values(a);
  return s(0) / s(s.size() - 1);
}

/// A random orthogonal n × n matrix.
Mat<double> random_orthogonal(Index n, std::uint64_t seed) {
  return moonwalk::orthogonal<double>(n, n, seed);
}

/// out × in with singular values `sv` (length min(in, out)).
Mat<double> with_singular_values(Index in, Index out, const Eigen::VectorXd& sv, std::uint64_t seed) {
  const Index k = std::min(in, out);
  const Mat<double> U = random_orthogonal(out, seed).leftCols(k),
                    V = random_orthogonal(in, seed + 1).leftCols(k);
  return U * sv.asDiagonal() * V.transpose();
}

/// |r_11| / |r_kk| of the layer's cached pivoted QR (the crude estimate it must beat).
template <class S>
double diagonal_ratio(const Linear<S>& l) {
  const Mat<S> r = l.r_factor();
  return std::abs(double(r(0, 0))) / std::abs(double(r(r.rows() - 1, r.cols() - 1)));
}

/// The Jacobian of one sample column of a layer, column by column through jvp.
template <class L>
Mat<double> jacobian_at(const L& l, const Mat<double>& x1) {
  const Index n = l.in_features();
  Mat<double> J(l.out_features(), n);
  for (Index i = 0; i < n; ++i) J.col(i) = l.jvp(x1, Mat<double>(Mat<double>::Identity(n, n).col(i)));
  return J;
}

/// A coupling branch: linear, tanh, linear.
template <class S>
using Branch = Sequential<Linear<S>, Tanh<S>, Linear<S>>;

template <class S>
Sequential<Linear<S>, Tanh<S>, Linear<S>> branch(Index in, Index hidden, Index out, std::uint64_t seed,
                                                 S gain) {
  return Sequential(Linear<S>(in, hidden, {.seed = seed, .gain = gain, .init = moonwalk::Init::gaussian}),
                    Tanh<S>(hidden), Linear<S>(hidden, out, {.seed = seed + 1, .gain = gain}));
}

}  // namespace

TEST_CASE("linear: condition estimate vs the SVD", "[layers][amplification]") {
  struct Shape {
    Index in, out;
  };
  for (const Shape sh : {Shape{6, 6}, Shape{9, 5}, Shape{4, 8}, Shape{12, 12}, Shape{1, 3}}) {
    const Index k = std::min(sh.in, sh.out);
    for (std::uint64_t seed = 1; seed <= 4; ++seed) {
      Eigen::VectorXd ill(k), random_sv;
      for (Index i = 0; i < k; ++i)
        ill(i) = std::pow(10.0, -6.0 * double(i) / double(std::max<Index>(k - 1, 1)));
      Linear<double> gauss(sh.in, sh.out, {.seed = seed, .init = moonwalk::Init::gaussian});
      Linear<double> bad(sh.in, sh.out);
      bad.W() = with_singular_values(sh.in, sh.out, ill, 100 + seed);
      for (const Linear<double>* l : {&gauss, &bad}) {
        const double exact = kappa2(l->W());
        const double est = l->condition_estimate();
        INFO(l->name() << " seed " << seed << ": kappa2 " << exact << ", estimate " << est << ", diag ratio "
                       << diagonal_ratio(*l));
        CHECK(est >= exact / double(k) * (1 - 1e-9));
        CHECK(est <= exact * double(k) * (1 + 1e-9));
        CHECK(est >= diagonal_ratio(*l) * (1 - 1e-12));
        // √(κ₁κ_∞) ≥ κ₂ when the 1-norm estimator is exact (it is, on these)
        CHECK(est >= exact * (1 - 1e-9));
        const Amplification a = l->amplification(moonwalk::Empty{});
        CHECK(a.bound == est);
        // γ = (‖W‖_F / √out)(‖W⁺‖_F / √in)
        const Eigen::VectorXd s = singular_values(l->W());
        const double gamma = s.norm() * s.cwiseInverse().norm() / std::sqrt(double(sh.in) * double(sh.out));
        CHECK(a.typical == Approx(gamma).epsilon(1e-9));
        CHECK(a.typical >= std::sqrt(double(k) / double(std::max(sh.in, sh.out))) * (1 - 1e-12));
        CHECK(a.typical <= a.bound * (1 + 1e-12));
      }
    }
  }
  // the worst direction really is amplified by about κ: 1e-6 singular value
  Eigen::VectorXd sv(5);
  sv << 1, 1e-1, 1e-2, 1e-4, 1e-6;
  Linear<double> l(5, 5);
  l.W() = with_singular_values(5, 5, sv, 7);
  CHECK(l.condition_estimate() >= 1e6 * (1 - 1e-6));
  CHECK(l.condition_estimate() <= 5e6);
  // rank deficient: cache() throws, amplification says +∞
  sv << 1, 1, 1, 1, 0;
  l.W() = with_singular_values(5, 5, sv, 8);
  CHECK_THROWS_AS(l.condition_estimate(), moonwalk::RankError);
  CHECK(std::isinf(l.amplification(moonwalk::Empty{}).bound));
}

TEST_CASE("linear: the estimator beats the diagonal ratio on a Kahan-type R", "[layers][amplification]") {
  // Kahan's matrix: R_ii = s^{i}, R_ij = −c s^{i} (j > i); pivoted QR leaves it
  // nearly alone, the diagonal ratio badly underestimates κ.
  const Index n = 12;
  const double theta = 1.2, s = std::sin(theta), c = std::cos(theta);
  Mat<double> R = Mat<double>::Zero(n, n);
  for (Index i = 0; i < n; ++i) {
    R(i, i) = std::pow(s, double(i));
    for (Index j = i + 1; j < n; ++j) R(i, j) = -c * std::pow(s, double(i));
  }
  Linear<double> l(n, n);
  l.W() = R.transpose();  // vijp factors Wᵀ = R
  const double exact = kappa2(l.W());
  INFO("kappa2 " << exact << ", estimate " << l.condition_estimate() << ", diag ratio " << diagonal_ratio(l));
  CHECK(l.condition_estimate() >= exact / double(n));
  CHECK(l.condition_estimate() <= exact * double(n));
  CHECK(l.condition_estimate() >= diagonal_ratio(l));
}

TEMPLATE_TEST_CASE("elementwise: amplification by its formula", "[layers][amplification]", float, double) {
  using S = TestType;
  const Index n = 6, B = 5;
  Mat<S> x = randn(n, B, 3).template cast<S>();
  x.col(0).setConstant(S(1));   // all on: κ = γ = 1 for this sample
  x.col(1).setConstant(S(-1));  // all off: κ = γ = 1 too
  x(0, 2) = S(1);
  x(1, 2) = S(-1);  // mixed signs
  const LeakyReLU<S> l(n, S(0.1));
  const Amplification a = l.amplification(l.save_residual(x));
  const double slope = double(S(0.1));
  CHECK(a.known);
  CHECK(a.bound == 1 / slope);
  if constexpr (std::is_same_v<S, double>) CHECK(a.bound == 10.0);
  double gamma = 0;
  for (Index j = 0; j < B; ++j) {
    double on = 0;
    for (Index i = 0; i < n; ++i) on += x(i, j) > 0 ? 1 : 0;
    const double off = double(n) - on;
    gamma = std::max(gamma, std::sqrt((on + off * slope * slope) / double(n)) *
                                std::sqrt((on + off / (slope * slope)) / double(n)));
  }
  CHECK(a.typical == Approx(gamma).epsilon(1e-12));
  CHECK(a.typical > 1);
  // a batch of same-sign samples only: nothing is amplified
  const Amplification ones = l.amplification(l.save_residual(Mat<S>(x.leftCols(2))));
  CHECK(ones.bound == 1);
  CHECK(ones.typical == Approx(1).epsilon(1e-12));

  // smooth: from the saved σ'
  const Tanh<S> t(n);
  const Mat<S> x3 = S(3) * x;
  const Mat<double> d = t.derivative(x3).template cast<double>();
  double kappa = 0, g = 0;
  for (Index j = 0; j < B; ++j) {
    const Eigen::VectorXd dj = d.col(j).cwiseAbs();
    kappa = std::max(kappa, dj.maxCoeff() / dj.minCoeff());
    g = std::max(
        g, std::sqrt(dj.squaredNorm() / double(n)) * std::sqrt(dj.cwiseInverse().squaredNorm() / double(n)));
  }
  const Amplification at = t.amplification(t.save_residual(x3));
  CHECK(at.bound == Approx(kappa).epsilon(1e-12));
  CHECK(at.typical == Approx(g).epsilon(1e-12));
  // σ' underflowed to 0: not submersive there, +∞
  Mat<S> big = x3;
  big(2, 3) = S(1000);
  const Amplification inf = t.amplification(t.save_residual(big));
  CHECK(std::isinf(inf.bound));
  CHECK(std::isinf(inf.typical));
  // ReLU: fragmental coordinates are restored exactly; the rest is copied
  const ReLU<S> r(n);
  const Amplification ar = r.amplification(r.save_residual(x));
  CHECK(ar.bound == 1);
  CHECK(ar.typical == 1);
  CHECK(ZeroPad<S>(3, 5).amplification(moonwalk::Empty{}).bound == 1);
}

TEST_CASE("coupling: the bound covers the exact per-sample condition number", "[layers][amplification]") {
  const Index n1 = 3, n2 = 4, B = 6;
  for (const double gain : {0.3, 1.0, 2.5}) {
    const auto add = AdditiveCoupling<Branch<double>, Branch<double>>(branch<double>(n2, 6, n1, 11, gain),
                                                                      branch<double>(n1, 5, n2, 13, gain));
    const auto aff = AffineCoupling<Branch<double>, Branch<double>>(branch<double>(n2, 6, n1, 21, gain),
                                                                    branch<double>(n1, 5, n2, 23, gain));
    const Mat<double> x = randn(n1 + n2, B, 5);
    auto check_block = [&](const auto& blk) {
      const Amplification a = blk.amplification(x);
      double worst_kappa = 0, worst_gamma = 0, worst_growth = 0;
      for (Index j = 0; j < B; ++j) {
        const Mat<double> J = jacobian_at(blk, Mat<double>(x.col(j)));
        const Eigen::VectorXd s = singular_values(J);
        worst_kappa = std::max(worst_kappa, s(0) / s(s.size() - 1));
        worst_gamma = std::max(worst_gamma, s.norm() * s.cwiseInverse().norm() / double(s.size()));
      }
      // measured: relative error growth of random perturbations through vijp, per sample
      for (std::uint64_t t = 0; t < 200; ++t) {
        const Mat<double> hx = blk.vjp(x, randn(n1 + n2, B, 1000 + t));
        const Mat<double> d = 1e-6 * randn(n1 + n2, B, 5000 + t);
        const Mat<double> h0 = blk.vijp(x, hx), dh = blk.vijp(x, Mat<double>(hx + d)) - h0;
        for (Index j = 0; j < B; ++j)
          worst_growth = std::max(
              worst_growth, (dh.col(j).norm() / h0.col(j).norm()) / (d.col(j).norm() / hx.col(j).norm()));
      }
      INFO(blk.name() << " gain " << gain << ": bound " << a.bound << ", exact kappa " << worst_kappa
                      << ", growth " << worst_growth << ", typical " << a.typical << ", exact gamma "
                      << worst_gamma);
      CHECK(a.known);
      CHECK(a.bound >= worst_kappa);
      CHECK(a.bound >= worst_growth);
      CHECK(worst_growth <= worst_kappa * (1 + 1e-6));
      CHECK(a.typical >= 1);
      CHECK(a.typical <= a.bound);
      // the probe is an estimate of γ: within a factor 2 here
      CHECK(a.typical <= 2 * worst_gamma);
      CHECK(a.typical >= worst_gamma / 2);
    };
    check_block(add);
    check_block(aff);
  }
}

TEST_CASE("coupling: power iteration finds a branch's norm", "[layers][amplification]") {
  // A Linear branch: J = W at every sample, so each column's estimate → ‖W‖₂.
  Linear<double> w(5, 3, {.seed = 4, .init = moonwalk::Init::gaussian});
  const Mat<double> x = randn(5, 4, 2);
  const Eigen::VectorXd est = moonwalk::detail::power_norms(w, x, 20);
  const double exact = singular_values(w.W())(0);
  for (Index j = 0; j < est.size(); ++j) {
    CHECK(est(j) <= exact * (1 + 1e-12));
    CHECK(est(j) == Approx(exact).epsilon(1e-6));
  }
}

TEST_CASE("any_layer and chains forward amplification", "[layers][amplification]") {
  const Mat<double> x = randn(6, 4, 9);
  const LeakyReLU<double> lr(6, 0.2);
  const AnyLayer<double> any(lr);
  const Erased r = any.save_residual(x);
  const Amplification direct = lr.amplification(lr.save_residual(x)), erased = any.amplification(r);
  CHECK(erased.bound == direct.bound);
  CHECK(erased.typical == direct.typical);
  CHECK(erased.known);
  CHECK(moonwalk::amplification(any, r).bound == direct.bound);

  // a layer without the protocol: unknown, through the erasure too
  const AnyLayer<double> user(moonwalk_test::CubicVjpOnly<double>{6});
  CHECK_FALSE(user.amplification(user.save_residual(x)).known);

  // a chain multiplies: Linear(6→6) · LeakyReLU at its output · Linear(6→4)
  Linear<double> l1(6, 6, {.seed = 3, .init = moonwalk::Init::gaussian}), l2(6, 4, {.seed = 4});
  Network<double> net;
  net.add(l1).add(lr).add(l2);
  const Amplification a = net.amplification(x);
  const Mat<double> x1 = l1.forward(x);
  const Amplification expect =
      l1.amplification({}) * lr.amplification(lr.save_residual(x1)) * l2.amplification({});
  CHECK(a.bound == Approx(expect.bound).epsilon(1e-12));
  CHECK(a.typical == Approx(expect.typical).epsilon(1e-12));
  CHECK(a.known);
  const auto seq = Sequential(l1, LeakyReLU<double>(6, 0.2), l2);
  CHECK(seq.amplification(x).bound == Approx(expect.bound).epsilon(1e-12));
  net.add(moonwalk_test::CubicVjpOnly<double>{4});
  CHECK_FALSE(net.amplification(x).known);
}

TEST_CASE("cast: a float Network carried into double", "[layers][cast]") {
  const Index B = 5;
  Network<float> net;
  net.add(Linear<float>(5, 7, {.seed = 1, .init = moonwalk::Init::gaussian}))
      .add(LeakyReLU<float>(7, 0.3f))
      .add(AdditiveCoupling<Branch<float>, Branch<float>>(branch<float>(4, 5, 3, 3, 1.0f),
                                                          branch<float>(3, 5, 4, 5, 1.0f)))
      .add(ZeroPad<float>(7, 8))
      .add(Linear<float>(8, 4, {.seed = 7}))
      .add(Tanh<float>(4));
  // non-zero biases everywhere
  for (auto b : net.parameter_blocks())
    for (auto& p : b) p += 0.01f;
  const Network<double> nd = net.cast<double>();
  REQUIRE(nd.size() == net.size());
  CHECK(nd.name() == net.name());
  REQUIRE(nd.num_params() == net.num_params());
  const auto pf = net.parameter_blocks();
  const auto pd = nd.parameter_blocks();
  REQUIRE(pf.size() == pd.size());
  for (std::size_t i = 0; i < pf.size(); ++i)
    for (std::size_t k = 0; k < pf[i].size(); ++k) CHECK(double(pf[i][k]) == pd[i][k]);

  const Mat<float> xf = randn(5, B, 11).cast<float>();
  const Mat<double> xd = xf.cast<double>();
  const Mat<float> hf = randn(4, B, 12).cast<float>();
  const Mat<double> hd = hf.cast<double>();
  CHECK(rel_err(net.forward(xf), nd.forward(xd)) < 1e-5);
  CHECK(rel_err(net.vjp(xf, hf), nd.vjp(xd, hd)) < 1e-5);
  Eigen::VectorXf gf = Eigen::VectorXf::Zero(net.num_params());
  Eigen::VectorXd gd = Eigen::VectorXd::Zero(nd.num_params());
  net.vjp_params(xf, hf, gf);
  nd.vjp_params(xd, hd, gd);
  CHECK(rel_err(gf, gd) < 1e-5);
  // the double network's own gradient storage starts at zero
  for (auto b : nd.gradient_blocks())
    for (double g : b) CHECK(g == 0);
  // and back to float: exactly the original parameters
  const Network<float> back = nd.cast<float>();
  const auto pb = back.parameter_blocks();
  for (std::size_t i = 0; i < pf.size(); ++i)
    for (std::size_t k = 0; k < pf[i].size(); ++k) CHECK(pb[i][k] == pf[i][k]);
  // same scalar type: a copy
  const Network<float> same = net.cast<float>();
  CHECK(rel_err(same.forward(xf), net.forward(xf)) == 0);
}

TEST_CASE("cast: a layer without cast<T>() is named when asked for one", "[layers][cast]") {
  Network<float> net;
  net.add(Linear<float>(3, 3)).add(moonwalk_test::CubicVjpOnly<float>{3});
  STATIC_REQUIRE_FALSE(moonwalk::CastableTo<moonwalk_test::CubicVjpOnly<float>, double>);
  mwtest::require_throw<moonwalk::ScheduleError>(
      [&] { (void)net.cast<double>(); }, {"cubic_vjp_only(3)", "cast<double>()", "double cotangents"});
  // static layers: the cast is a type of its own
  const auto seq = Sequential(Linear<float>(3, 4, {.seed = 2}), LeakyReLU<float>(4, 0.5f));
  const auto sd = moonwalk::cast<double>(seq);
  STATIC_REQUIRE(std::is_same_v<typename std::remove_cvref_t<decltype(sd)>::scalar_type, double>);
  const Mat<float> x = randn(3, 2, 1).cast<float>();
  CHECK(rel_err(seq.forward(x), sd.forward(Mat<double>(x.cast<double>()))) < 1e-6);
  // moonwalk::cast to the own scalar type is the layer itself
  CHECK(&moonwalk::cast<float>(seq) == &seq);
}
