// TriangularLinear: the generic layer checker on contracting and square
// configurations, then the packing of θ, the vijp against the least-squares
// solution, no cached factorisation, the fixed unit diagonal under an
// optimizer step, parameter gradients against finite differences, shape
// errors, the amplification figures against an SVD, and the spec token.
#include <Eigen/QR>
#include <Eigen/SVD>
#include <cmath>
#include <limits>
#include <moonwalk/core/amplification.hpp>
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/layers/triangular.hpp>
#include <moonwalk/nets/parameters.hpp>
#include <moonwalk/nets/sequential.hpp>
#include <moonwalk/nets/spec.hpp>
#include <moonwalk/optim/optimizers.hpp>

#include "support/layer_check.hpp"

using moonwalk::Index;
using moonwalk::TriangularLinear;
using mwtest::Mat;
using mwtest::perturbed;
using mwtest::rel_err;
using mwtest::Vec;

static_assert(moonwalk::check_submersive<TriangularLinear<float>>());
static_assert(moonwalk::Invertible<TriangularLinear<double>>);
static_assert(moonwalk::HasResidual<TriangularLinear<double>>);
static_assert(std::is_same_v<moonwalk::residual_t<TriangularLinear<float>>, moonwalk::Empty>);
static_assert(moonwalk::HasAmplification<TriangularLinear<float>>);
static_assert(moonwalk::CastableTo<TriangularLinear<float>, double>);
static_assert(moonwalk::CastableTo<TriangularLinear<double>, float>);

MOONWALK_LAYER_TEST("triangular 7->5", (TriangularLinear<S>(7, 5, {.seed = 1})))
MOONWALK_LAYER_TEST("triangular 7->5, perturbed", (perturbed(TriangularLinear<S>(7, 5, {.seed = 2}), 3)))
MOONWALK_LAYER_TEST("triangular 9->3, gain 2", (TriangularLinear<S>(9, 3, {.seed = 4, .gain = S(2)})))
MOONWALK_LAYER_TEST("triangular 6->1", (perturbed(TriangularLinear<S>(6, 1, {.seed = 5}), 6)))
MOONWALK_LAYER_TEST("triangular 6->6 (square)", (perturbed(TriangularLinear<S>(6, 6, {.seed = 7}), 8)))
MOONWALK_LAYER_TEST("triangular 4->4, U = I", (TriangularLinear<S>(4, 4, {.seed = 9, .upper = S(0)})))
MOONWALK_LAYER_TEST("triangular 1->1", (perturbed(TriangularLinear<S>(1, 1, {.seed = 10}), 11)))
MOONWALK_LAYER_TEST("triangular 12->8, upper 1", (TriangularLinear<S>(12, 8, {.seed = 12, .upper = S(1)})))

namespace {

template <class S>
Mat<S> rand_mat(Index r, Index c, std::uint64_t seed) {
  return mwtest::randn(r, c, seed).template cast<S>();
}

/// θ of a layer, as a double vector.
template <class L>
Vec<double> theta_of(const L& l) {
  const auto p = l.parameters();
  Vec<double> v(static_cast<Index>(p.size()));
  for (Index k = 0; k < v.size(); ++k) v(k) = static_cast<double>(p[static_cast<std::size_t>(k)]);
  return v;
}
template <class L>
void set_theta(L& l, const Vec<double>& v) {
  auto p = l.parameters();
  for (Index k = 0; k < v.size(); ++k)
    p[static_cast<std::size_t>(k)] = static_cast<typename L::scalar_type>(v(k));
}

/// Singular values of a double matrix, descending.
Vec<double> singular_values(const Mat<double>& a) {
  return Eigen::JacobiSVD<Mat<double>>(a).singularValues();
}

double kappa2(const Mat<double>& a) {
  const Vec<double> s = singular_values(a);
  return s(0) / s(s.size() - 1);
}

}  // namespace

TEMPLATE_TEST_CASE("triangular: θ = [packed strict upper U, vec(V), b]; forward = [U | V] x + b",
                   "[layers][triangular]", float, double) {
  using S = TestType;
  TriangularLinear<S> l = perturbed(TriangularLinear<S>(7, 4, {.seed = 21}), 22);
  CHECK(l.name() == "triangular_linear(7->4)");
  CHECK(l.in_features() == 7);
  CHECK(l.out_features() == 4);
  CHECK(l.num_upper() == 6);
  CHECK(l.num_params() == 6 + 4 * 3 + 4);
  const auto p = l.parameters();
  const Mat<S> U = l.U();
  for (Index i = 0; i < 4; ++i)
    for (Index j = 0; j < 4; ++j) {
      if (i < j)
        CHECK(U(i, j) == p[static_cast<std::size_t>(j * (j - 1) / 2 + i)]);
      else
        CHECK(U(i, j) == S(i == j ? 1 : 0));
    }
  CHECK(TriangularLinear<S>::upper_index(0, 3) == 3);
  CHECK(TriangularLinear<S>::upper_index(2, 3) == 5);
  for (Index j = 0; j < 3; ++j)
    for (Index i = 0; i < 4; ++i) CHECK(l.V()(i, j) == p[static_cast<std::size_t>(6 + j * 4 + i)]);
  for (Index i = 0; i < 4; ++i) CHECK(l.b()(i) == p[static_cast<std::size_t>(18 + i)]);
  const Mat<S> W = l.W();
  CHECK(W.leftCols(4) == U);
  CHECK(W.rightCols(3) == l.V());
  const Mat<S> x = rand_mat<S>(7, 5, 23);
  const Mat<S> y = l.forward(x);
  const Mat<double> ref =
      (W.template cast<double>() * x.template cast<double>()).colwise() + l.b().template cast<double>();
  CHECK(rel_err(y.template cast<double>(), ref) < 100 * std::numeric_limits<S>::epsilon());
}

TEMPLATE_TEST_CASE("triangular: initialisation is seeded, κ(U) ≈ 1, V ~ N(0, gain²/in), b = 0",
                   "[layers][triangular]", float, double) {
  using S = TestType;
  const TriangularLinear<S> a(300, 200, {.seed = 3, .gain = S(2)});
  CHECK(theta_of(a) == theta_of(TriangularLinear<S>(300, 200, {.seed = 3, .gain = S(2)})));
  CHECK(theta_of(a) != theta_of(TriangularLinear<S>(300, 200, {.seed = 4, .gain = S(2)})));
  // float and double start from the same θ up to rounding
  CHECK(rel_err(theta_of(TriangularLinear<float>(30, 20, {.seed = 3})),
                theta_of(TriangularLinear<double>(30, 20, {.seed = 3}))) < 1e-7);
  CHECK(a.b().isZero(0));
  const double kU = kappa2(a.U().template cast<double>());
  INFO("kappa2(U) = " << kU);
  CHECK(kU < 1.5);
  CHECK(kU > 1.01);  // a genuine (non-identity) U
  const Mat<double> v = a.V().template cast<double>();
  const double var = v.squaredNorm() / static_cast<double>(v.size());
  CHECK(std::abs(var - 4.0 / 300) < 0.1 * 4.0 / 300);
  CHECK(TriangularLinear<S>(5, 5, {.upper = S(0)}).U() == Mat<S>::Identity(5, 5));
}

TEST_CASE("triangular: out > in (or a non-positive size) throws ShapeError naming the layer and shapes",
          "[layers][triangular]") {
  const std::string m = mwtest::require_throw<moonwalk::ShapeError>(
      [] { (void)TriangularLinear<double>(3, 4); }, {"TriangularLinear", "4x3", "in = 3", "out = 4"});
  CHECK(!m.empty());
  CHECK_THROWS_AS(TriangularLinear<double>(3, 0), moonwalk::ShapeError);
  CHECK_THROWS_AS(TriangularLinear<float>(0, 0), moonwalk::ShapeError);
  CHECK_NOTHROW(TriangularLinear<double>(4, 4));
  CHECK_THROWS_AS(TriangularLinear<double>(5, 3).inverse(Mat<double>::Zero(3, 2)), moonwalk::RankError);
}

TEST_CASE("triangular: vijp is the least-squares solution when h_x = Wᵀ h_y exactly (double)",
          "[layers][triangular]") {
  for (const auto& [in, out] : {std::pair<Index, Index>{9, 4}, {16, 16}, {20, 7}, {5, 1}}) {
    INFO(in << " -> " << out);
    const TriangularLinear<double> t = perturbed(TriangularLinear<double>(in, out, {.seed = 31}), 32);
    const Mat<double> W = t.W();
    const Mat<double> x = mwtest::randn(in, 6, 33);
    const Mat<double> hy = mwtest::randn(out, 6, 34);
    const Mat<double> hx = W.transpose() * hy;
    const Mat<double> tri = t.vijp(x, hx);
    // least squares through a column-pivoted QR of Wᵀ, and through Linear's vijp
    const Mat<double> ls = W.transpose().colPivHouseholderQr().solve(hx);
    moonwalk::Linear<double> lin(in, out);
    lin.W() = W;
    const Mat<double> lin_hy = lin.vijp(x, hx);
    CHECK(rel_err(tri, hy) < 1e-12);
    CHECK(rel_err(tri, ls) < 1e-12);
    CHECK(rel_err(tri, lin_hy) < 1e-12);
    if (in > out) {
      // not least squares off the range: a perturbation of the last in − out
      // rows of h_x is ignored, one of the first rows is not averaged away
      Mat<double> hx2 = hx;
      hx2.bottomRows(in - out) += mwtest::randn(in - out, 6, 35);
      CHECK(t.vijp(x, hx2) == tri);
      CHECK(rel_err(lin.vijp(x, hx2), hy) > 1e-3);
    }
  }
}

TEMPLATE_TEST_CASE("triangular: vijp keeps nothing: a write to θ is seen by the very next vijp",
                   "[layers][triangular]", float, double) {
  using S = TestType;
  TriangularLinear<S> t(10, 6, {.seed = 41});
  const Mat<S> x = rand_mat<S>(10, 4, 42);
  const Mat<S> hy = rand_mat<S>(6, 4, 43);
  auto span = t.parameters();  // kept across the vijps below
  for (std::uint64_t k = 0; k < 3; ++k) {
    (void)t.vijp(x, t.vjp(x, hy));
    const Vec<double> theta = theta_of(t) + 0.2 * mwtest::randn(t.num_params(), 1, 44 + k);
    for (Index i = 0; i < theta.size(); ++i) span[static_cast<std::size_t>(i)] = static_cast<S>(theta(i));
    const Mat<S> hx = t.vjp(x, hy);
    CHECK(rel_err(t.vijp(x, hx), hy) < 1000 * std::numeric_limits<S>::epsilon());
  }
  // the amplification cache follows mutable access
  const moonwalk::Amplification a0 = t.amplification({});
  t.u() *= S(5);
  const moonwalk::Amplification a1 = t.amplification({});
  CHECK(a1.bound > a0.bound);
  CHECK(a1.typical != a0.typical);
}

TEMPLATE_TEST_CASE("triangular: inverse(forward(x)) = x when square", "[layers][triangular]", float, double) {
  using S = TestType;
  const TriangularLinear<S> t = perturbed(TriangularLinear<S>(8, 8, {.seed = 51}), 52);
  const Mat<S> x = rand_mat<S>(8, 5, 53);
  CHECK(rel_err(t.inverse(t.forward(x)), x) < 1000 * std::numeric_limits<S>::epsilon());
}

TEMPLATE_TEST_CASE("triangular: the diagonal of U stays exactly 1 under an Sgd step", "[layers][triangular]",
                   float, double) {
  using S = TestType;
  moonwalk::Sequential net(TriangularLinear<S>(8, 5, {.seed = 61}), moonwalk::Tanh<S>(5));
  auto& t = net.template layer<0>();
  const Vec<double> before = theta_of(t);
  const Mat<S> x = rand_mat<S>(8, 4, 62), h = rand_mat<S>(5, 4, 63);
  Vec<S> g = Vec<S>::Zero(t.num_params());
  t.vjp_params(x, h, g);
  auto gs = t.gradients();
  for (Index i = 0; i < g.size(); ++i) gs[static_cast<std::size_t>(i)] = g(i);
  moonwalk::Sgd<S>{.lr = 0.1}.step(net);
  const Vec<double> after = theta_of(t);
  CHECK(rel_err(after, Vec<double>(before - 0.1 * g.template cast<double>())) <
        10 * std::numeric_limits<S>::epsilon());
  CHECK((after - before).norm() > 1e-3);
  const Mat<S> U = t.U();
  CHECK(U.diagonal() == Vec<S>::Ones(5));
  CHECK(U.template triangularView<Eigen::StrictlyLower>().toDenseMatrix().isZero(0));
  // the vijp after the step still inverts the new Jᵀ
  const Mat<S> hy = rand_mat<S>(5, 3, 64);
  const Mat<S> x3 = rand_mat<S>(8, 3, 65);
  CHECK(rel_err(t.vijp(x3, t.vjp(x3, hy)), hy) < 1000 * std::numeric_limits<S>::epsilon());
}

TEST_CASE("triangular: parameter gradient of <c, f(x)> against central differences (double)",
          "[layers][triangular]") {
  TriangularLinear<double> t = perturbed(TriangularLinear<double>(6, 4, {.seed = 71}), 72);
  const Mat<double> x = mwtest::randn(6, 3, 73), c = mwtest::randn(4, 3, 74);
  Vec<double> g = Vec<double>::Zero(t.num_params());
  t.vjp_params(x, c, g);
  const Vec<double> theta = theta_of(t);
  Vec<double> fd(theta.size());
  const double e = 1e-6;
  for (Index k = 0; k < theta.size(); ++k) {
    Vec<double> p = theta, m = theta;
    p(k) += e;
    m(k) -= e;
    set_theta(t, p);
    const double fp = (c.array() * t.forward(x).array()).sum();
    set_theta(t, m);
    const double fm = (c.array() * t.forward(x).array()).sum();
    fd(k) = (fp - fm) / (2 * e);
  }
  CHECK(rel_err(g, fd) < 1e-8);
}

TEST_CASE("triangular: amplification against an SVD (double)", "[layers][triangular]") {
  for (const double upper : {0.0, 0.1, 1.0, 3.0}) {
    // square: bound within [κ₂(U), k κ₂(U)], typical = ‖U‖_F ‖U⁻¹‖_F / k
    for (const Index k : {1, 5, 24, 70}) {
      INFO("square " << k << ", upper " << upper);
      const TriangularLinear<double> t(k, k, {.seed = 81, .upper = upper});
      const Mat<double> U = t.U();
      const moonwalk::Amplification a = t.amplification({});
      const double kU = kappa2(U);
      CHECK(a.bound >= 1);
      CHECK(a.bound >= kU * (1 - 1e-10));
      CHECK(a.bound <= static_cast<double>(k) * kU * (1 + 1e-10));
      const double gamma = U.norm() * U.inverse().norm() / static_cast<double>(k);
      CHECK(std::abs(a.typical - gamma) <= 1e-10 * gamma);
      CHECK(a.typical <= a.bound);
      if (upper == 0.0) CHECK(a.bound == 1.0);
    }
    // contracting: bound within [‖W‖₂‖U⁻¹‖₂, (in·out)^¼ √out · ‖W‖₂‖U⁻¹‖₂], and ≥ κ₂(W), κ₂(U)
    for (const auto& [in, out] : {std::pair<Index, Index>{9, 4}, {40, 17}, {30, 1}}) {
      INFO(in << " -> " << out << ", upper " << upper);
      const TriangularLinear<double> t(in, out, {.seed = 82, .upper = upper});
      const Mat<double> U = t.U(), W = t.W();
      const moonwalk::Amplification a = t.amplification({});
      const Mat<double> Uinv = U.inverse();
      const double growth = singular_values(W)(0) * singular_values(Uinv)(0);
      CHECK(a.bound >= growth * (1 - 1e-10));
      CHECK(a.bound >= kappa2(W) * (1 - 1e-10));
      CHECK(a.bound >= kappa2(U) * (1 - 1e-10));
      const double slack =
          std::pow(static_cast<double>(in * out), 0.25) * std::sqrt(static_cast<double>(out));
      CHECK(a.bound <= slack * growth * (1 + 1e-10));
      const double gamma = (W.norm() / std::sqrt(static_cast<double>(out))) *
                           (Uinv.norm() / std::sqrt(static_cast<double>(in)));
      CHECK(std::abs(a.typical - gamma) <= 1e-10 * gamma);
      CHECK(a.typical <= a.bound);
      // measured: the worst error direction of the vijp reaches growth
      const Mat<double> hy = mwtest::randn(out, 1, 83);
      const Mat<double> hx = W.transpose() * hy;
      Eigen::JacobiSVD<Mat<double>> svd(Uinv, Eigen::ComputeFullU | Eigen::ComputeFullV);
      Mat<double> d = Mat<double>::Zero(in, 1);
      d.topRows(out) = 1e-6 * svd.matrixU().col(0);  // U⁻ᵀ's largest stretch
      const Mat<double> x = mwtest::randn(in, 1, 84);
      const double measured =
          ((t.vijp(x, hx + d) - t.vijp(x, hx)).norm() / hy.norm()) / (d.norm() / hx.norm());
      CHECK(measured <= a.bound * 1.0001);
    }
  }
}

TEMPLATE_TEST_CASE("spec: triangular:N is a TriangularLinear seeded like any token",
                   "[tools][spec][triangular]", float, double) {
  using S = TestType;
  const std::uint64_t seed = 5;
  const auto net = moonwalk::parse_network<S>("in:9,triangular:6,tanh,triangular:6,triangular:2", seed);
  REQUIRE(net.size() == 4);
  const auto* t = net[0].template target<TriangularLinear<S>>();
  REQUIRE(t != nullptr);
  CHECK(t->in_features() == 9);
  CHECK(t->out_features() == 6);
  const TriangularLinear<S> expected(9, 6, {.seed = moonwalk::spec::layer_seed(seed, 1)});
  CHECK(theta_of(*t) == theta_of(expected));
  CHECK(net[2].in_features() == 6);
  CHECK(net[2].out_features() == 6);
  CHECK(net[3].out_features() == 2);
  CHECK(moonwalk::can_vijp(net[0]));
  CHECK(!moonwalk::can_invert(net[0]));
  CHECK(moonwalk::can_invert(net[2]));
  mwtest::require_throw<moonwalk::SpecError>([] { (void)moonwalk::parse_network<S>("in:4,triangular:5", 1); },
                                             {"'triangular:5'"});
  CHECK_THROWS_AS(moonwalk::parse_network<S>("in:4,triangular:5", 1), moonwalk::SpecError);
  CHECK_THROWS_AS(moonwalk::parse_network<S>("in:4,triangular", 1), moonwalk::SpecError);
  CHECK_THROWS_AS(moonwalk::parse_network<S>("in:4,triangular:0", 1), moonwalk::SpecError);
}
