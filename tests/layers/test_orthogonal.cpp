// OrthogonalLinear beyond the generic checker: Q stays orthogonal under
// training, the Cayley derivatives against finite differences, the packing of
// θ, the vijp and inverse round trips, the cache, cast and amplification.
#include <Eigen/LU>
#include <cmath>
#include <limits>
#include <moonwalk/core/amplification.hpp>
#include <moonwalk/core/ops.hpp>
#include <moonwalk/layers/orthogonal.hpp>
#include <moonwalk/nets/any_layer.hpp>

#include "support/check_util.hpp"

using moonwalk::Index;
using moonwalk::OrthogonalLinear;
using mwtest::Mat;
using mwtest::rel_err;
using mwtest::Vec;

static_assert(moonwalk::check_submersive<OrthogonalLinear<float>>());
static_assert(moonwalk::Invertible<OrthogonalLinear<double>>);
static_assert(moonwalk::HasResidual<OrthogonalLinear<double>>);
static_assert(std::is_same_v<moonwalk::residual_t<OrthogonalLinear<float>>, moonwalk::Empty>);
static_assert(moonwalk::HasAmplification<OrthogonalLinear<float>>);
static_assert(moonwalk::CastableTo<OrthogonalLinear<float>, double>);
static_assert(moonwalk::CastableTo<OrthogonalLinear<double>, float>);

namespace {

template <class S>
constexpr double tol() {
  return 100 * static_cast<double>(std::numeric_limits<S>::epsilon());
}

/// max |QᵀQ − I|, in double.
template <class S>
double orthogonality_error(const Mat<S>& q) {
  const Mat<double> qd = q.template cast<double>();
  return (qd.transpose() * qd - Mat<double>::Identity(qd.rows(), qd.cols())).cwiseAbs().maxCoeff();
}

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

}  // namespace

TEMPLATE_TEST_CASE("orthogonal: Q is orthogonal, nontrivial, seeded; scale 0 gives Q = I",
                   "[layers][orthogonal]", float, double) {
  using S = TestType;
  for (const Index n : {1, 2, 5, 16, 33}) {
    const OrthogonalLinear<S> l(n, {.seed = 7});
    INFO(l.name());
    CHECK(l.name() == moonwalk::detail::cat("orthogonal(", n, ")"));
    CHECK(l.in_features() == n);
    CHECK(l.out_features() == n);
    CHECK(l.num_params() == n * (n - 1) / 2 + n);
    CHECK(l.b().isZero(0));
    CHECK(orthogonality_error<S>(l.Q()) <= tol<S>());
    CHECK(std::abs(l.Q().template cast<double>().determinant() - 1.0) <= tol<S>() * static_cast<double>(n));
    if (n > 1) CHECK((l.Q() - Mat<S>::Identity(n, n)).norm() > S(0.5));  // a genuine rotation
  }
  CHECK(OrthogonalLinear<S>(6, {.seed = 3}).Q() == OrthogonalLinear<S>(6, {.seed = 3}).Q());
  CHECK((OrthogonalLinear<S>(6, {.seed = 3}).Q() - OrthogonalLinear<S>(6, {.seed = 4}).Q()).norm() > S(0.5));
  CHECK(OrthogonalLinear<S>(6, {.seed = 3, .scale = S(0)}).Q().isIdentity(0));
  // float and double draw the same U (rounded)
  CHECK(rel_err(OrthogonalLinear<float>(6, {.seed = 3}).Q(), OrthogonalLinear<double>(6, {.seed = 3}).Q()) <
        1e-6);
}

TEST_CASE("orthogonal: θ packs U's strict upper triangle column by column, then b", "[layers][orthogonal]") {
  const Index n = 5;
  OrthogonalLinear<double> l(n, {.seed = 1, .scale = 0});
  Vec<double> th = Vec<double>::Zero(l.num_params());
  for (Index j = 1; j < n; ++j)
    for (Index i = 0; i < j; ++i) th(OrthogonalLinear<double>::upper_index(i, j)) = 10.0 * j + i;
  th.tail(n) = Vec<double>::LinSpaced(n, 1, n);
  set_theta(l, th);
  const Mat<double> A = l.A();
  CHECK((A + A.transpose()).isZero(0));
  for (Index j = 1; j < n; ++j)
    for (Index i = 0; i < j; ++i) CHECK(A(i, j) == 10.0 * j + i);
  CHECK(OrthogonalLinear<double>::upper_index(0, 1) == 0);
  CHECK(OrthogonalLinear<double>::upper_index(0, 2) == 1);
  CHECK(OrthogonalLinear<double>::upper_index(1, 2) == 2);
  CHECK(OrthogonalLinear<double>::upper_index(n - 2, n - 1) == l.num_upper() - 1);
  CHECK(l.b() == th.tail(n));
  // Q is the Cayley transform of that A, and M = (I + A)⁻¹
  const Mat<double> I = Mat<double>::Identity(n, n);
  CHECK(rel_err(l.Q(), Mat<double>((I + A).inverse() * (I - A))) <= 1e-12);
  CHECK(rel_err(l.M(), Mat<double>((I + A).inverse())) <= 1e-12);
  CHECK(orthogonality_error<double>(l.Q()) <= 1e-12);
}

TEST_CASE("orthogonal: jvp_params and vjp_params against central differences (double)",
          "[layers][orthogonal]") {
  const Index n = 6, B = 4;
  OrthogonalLinear<double> l(n, {.seed = 5});
  set_theta(l, Vec<double>(theta_of(l) + 0.2 * mwtest::randn(l.num_params(), 1, 50)));
  const Mat<double> x = mwtest::randn(n, B, 51), h = mwtest::randn(n, B, 52);
  const Vec<double> th0 = theta_of(l);
  const Index P = l.num_params();

  // J_θ column by column: ∂ forward / ∂θ_k by central differences.
  const double eps = 1e-6;
  Mat<double> J(n * B, P);
  for (Index k = 0; k < P; ++k) {
    Vec<double> tp = th0, tm = th0;
    tp(k) += eps;
    tm(k) -= eps;
    set_theta(l, tp);
    const Mat<double> yp = l.forward(x);
    set_theta(l, tm);
    const Mat<double> ym = l.forward(x);
    const Mat<double> d = (yp - ym) / (2 * eps);
    J.col(k) = Eigen::Map<const Vec<double>>(d.data(), n * B);
  }
  set_theta(l, th0);

  // jvp_params along a random direction and along each basis vector
  const Vec<double> dth = mwtest::randn(P, 1, 53);
  const Mat<double> t = l.jvp_params(x, dth);
  const Vec<double> fd = J * dth;
  CHECK(rel_err(Eigen::Map<const Vec<double>>(t.data(), n * B), fd) <= 1e-8);
  for (Index k = 0; k < P; ++k) {
    const Mat<double> tk = l.jvp_params(x, Vec<double>(Vec<double>::Unit(P, k)));
    INFO("parameter " << k);
    CHECK(rel_err(Eigen::Map<const Vec<double>>(tk.data(), n * B), Vec<double>(J.col(k))) <= 1e-7);
  }

  // vjp_params = J_θᵀ h
  Vec<double> g = Vec<double>::Zero(P);
  l.vjp_params(x, h, g);
  const Vec<double> fd_g = J.transpose() * Eigen::Map<const Vec<double>>(h.data(), n * B);
  CHECK(rel_err(g, fd_g) <= 1e-8);

  // dQ = −M dA (I + Q) for dA = dU − dUᵀ, against differences of Q itself
  Vec<double> tp = th0, tm = th0;
  tp.head(l.num_upper()) += eps * dth.head(l.num_upper());
  tm.head(l.num_upper()) -= eps * dth.head(l.num_upper());
  set_theta(l, tp);
  const Mat<double> qp = l.Q();
  set_theta(l, tm);
  const Mat<double> qm = l.Q();
  set_theta(l, th0);
  OrthogonalLinear<double> dl(n, {.seed = 0, .scale = 0});
  Vec<double> du = Vec<double>::Zero(P);
  du.head(l.num_upper()) = dth.head(l.num_upper());
  set_theta(dl, du);
  const Mat<double> dA = dl.A();
  const Mat<double> dQ = -l.M() * dA * (Mat<double>::Identity(n, n) + l.Q());
  CHECK(rel_err(dQ, Mat<double>((qp - qm) / (2 * eps))) <= 1e-8);
  // and dQ keeps QᵀQ = I to first order: Qᵀ dQ is skew
  const Mat<double> qtdq = l.Q().transpose() * dQ;
  CHECK((qtdq + qtdq.transpose()).norm() <= 1e-12 * qtdq.norm() + 1e-14);
}

TEMPLATE_TEST_CASE("orthogonal: Q stays orthogonal through SGD on the parameter gradients",
                   "[layers][orthogonal]", float, double) {
  using S = TestType;
  const Index n = 8, B = 16;
  OrthogonalLinear<S> l(n, {.seed = 9});
  const Mat<S> x = rand_mat<S>(n, B, 90);
  const Mat<S> target = rand_mat<S>(n, B, 91);
  const Mat<S> Q0 = l.Q();
  auto loss = [&] { return 0.5 * (l.forward(x) - target).template cast<double>().squaredNorm(); };
  const double loss0 = loss();
  const S lr = S(0.02);
  for (int step = 0; step < 40; ++step) {
    const Mat<S> h = l.forward(x) - target;  // ∂ℓ/∂y of ½‖y − target‖²
    Vec<S> g = Vec<S>::Zero(l.num_params());
    l.vjp_params(x, h, g);
    auto p = l.parameters();
    for (Index k = 0; k < g.size(); ++k) p[static_cast<std::size_t>(k)] -= lr * g(k);
    INFO("step " << step);
    REQUIRE(orthogonality_error<S>(l.Q()) <= tol<S>());
  }
  CHECK(loss() < 0.8 * loss0);          // it trained
  CHECK((l.Q() - Q0).norm() > S(0.1));  // Q moved, within O(n)
  CHECK(std::abs(l.Q().template cast<double>().determinant() - 1.0) <= tol<S>() * n);
  // and the vijp of the trained layer is still exact
  const Mat<S> h = rand_mat<S>(n, 3, 92);
  CHECK(rel_err(l.vijp(x.leftCols(3), l.vjp(x.leftCols(3), h)), h) <= tol<S>());
}

TEMPLATE_TEST_CASE("orthogonal: vijp(vjp(h)) = h, inverse(forward(x)) = x", "[layers][orthogonal]", float,
                   double) {
  using S = TestType;
  for (const Index n : {1, 3, 12, 40}) {
    OrthogonalLinear<S> l(n, {.seed = static_cast<std::uint64_t>(n)});
    l.b() = rand_mat<S>(n, 1, 100 + n);
    INFO(l.name());
    const Mat<S> x = rand_mat<S>(n, 5, 200 + n), h = rand_mat<S>(n, 5, 300 + n);
    CHECK(moonwalk::can_vijp(l));
    CHECK(moonwalk::can_invert(l));
    CHECK(rel_err(l.vijp(x, l.vjp(x, h)), h) <= tol<S>());
    CHECK(rel_err(l.vjp(x, l.vijp(x, h)), h) <= tol<S>());
    CHECK(rel_err(l.inverse(l.forward(x)), x) <= tol<S>());
    CHECK(rel_err(l.forward(l.inverse(x)), x) <= tol<S>());
    // vijp is a product with Q: the same as the jvp
    CHECK(l.vijp(x, h) == l.jvp(x, h));
  }
}

TEMPLATE_TEST_CASE("orthogonal: the cached Q follows every kind of parameter write", "[layers][orthogonal]",
                   float, double) {
  using S = TestType;
  OrthogonalLinear<S> l(6, {.seed = 2});
  const Mat<S> x = rand_mat<S>(6, 3, 1), h = rand_mat<S>(6, 3, 2);
  REQUIRE(rel_err(l.vijp(x, l.vjp(x, h)), h) <= tol<S>());
  const OrthogonalLinear<S> before = l;
  const Mat<S> Q0 = l.Q();

  SECTION("through u()") { l.u() += Vec<S>::Constant(l.num_upper(), S(0.3)); }
  SECTION("through parameters()") {
    auto p = l.parameters();
    for (std::size_t k = 0; k < 15; k += 2) p[k] -= S(0.4);
  }
  SECTION("through a view kept across calls (finite differences do this)") {
    auto p = l.parameters();  // fetched once, written after Q was built
    REQUIRE(rel_err(l.forward(x), before.forward(x)) == 0);
    p[1] += S(0.5);
    const Mat<S> y1 = l.forward(x);
    CHECK(rel_err(y1, before.forward(x)) > 1e-2);
    p[1] -= S(0.5);
    CHECK(rel_err(l.forward(x), before.forward(x)) <= tol<S>());
    p[4] -= S(0.7);
  }
  SECTION("through the type-erased parameter blocks") {
    moonwalk::AnyLayer<S> a(l);
    REQUIRE(rel_err(a.vijp(x, a.vjp(x, h)), h) <= tol<S>());
    for (auto blk : moonwalk::parameter_blocks(a))
      for (std::size_t k = 0; k < 15; k += 2) blk[k] -= S(0.4);
    CHECK(rel_err(a.vijp(x, a.vjp(x, h)), h) <= tol<S>());
    CHECK(rel_err(a.inverse(a.forward(x)), x) <= tol<S>());
    return;
  }
  CHECK((l.Q() - Q0).norm() > S(0.1));
  CHECK(orthogonality_error<S>(l.Q()) <= tol<S>());
  CHECK(rel_err(l.vijp(x, l.vjp(x, h)), h) <= tol<S>());
  CHECK(rel_err(before.vijp(x, l.vjp(x, h)), h) > 1e-2);  // the old Q does not invert the new vjp
  CHECK(before.Q() == Q0);                                // a copy keeps its own parameters
}

TEST_CASE("orthogonal: cast converts the parameters; amplification is 1", "[layers][orthogonal]") {
  OrthogonalLinear<double> d(7, {.seed = 4});
  d.b() = mwtest::randn(7, 1, 5);
  const OrthogonalLinear<float> f = d.cast<float>();
  CHECK(f.name() == d.name());
  REQUIRE(f.num_params() == d.num_params());
  CHECK(rel_err(theta_of(f), theta_of(d)) <= 1e-7);
  CHECK(rel_err(f.Q(), d.Q()) <= 1e-6);
  const OrthogonalLinear<double> back = moonwalk::cast<double>(f);
  CHECK(theta_of(back) == theta_of(f));  // float → double is exact
  const Mat<double> x = mwtest::randn(7, 2, 6);
  CHECK(rel_err(back.forward(x), d.forward(x)) <= 1e-6);
  CHECK(&moonwalk::cast<double>(d) == &d);  // same type: the layer itself

  const moonwalk::Amplification a = moonwalk::amplification(f, moonwalk::Empty{});
  CHECK(a.known);
  CHECK(a.bound == 1);
  CHECK(a.typical == 1);
}

TEMPLATE_TEST_CASE("orthogonal: shape errors name the layer", "[layers][orthogonal]", float, double) {
  using S = TestType;
  const OrthogonalLinear<S> l(4, {.seed = 1});
  const Mat<S> x = rand_mat<S>(4, 2, 1), bad = rand_mat<S>(5, 2, 2);
  mwtest::require_throw<moonwalk::ShapeError>([&] { (void)l.forward(bad); }, {"orthogonal(4)", "5x2", "4x"});
  mwtest::require_throw<moonwalk::ShapeError>([&] { (void)l.vijp(x, bad); }, {"orthogonal(4)", "5x2"});
  mwtest::require_throw<moonwalk::ShapeError>([&] { (void)l.inverse(bad); }, {"orthogonal(4)", "5x2"});
  mwtest::require_throw<moonwalk::ShapeError>(
      [&] { (void)l.jvp_params(x, Vec<S>(Vec<S>::Zero(l.num_params() + 1))); }, {"orthogonal(4)"});
  Vec<S> g = Vec<S>::Zero(l.num_params() - 1);
  mwtest::require_throw<moonwalk::ShapeError>([&] { l.vjp_params(x, x, g); }, {"orthogonal(4)", "gradient"});
  mwtest::require_throw<moonwalk::ShapeError>([&] { (void)OrthogonalLinear<S>(0); },
                                              {"OrthogonalLinear", "0"});
}
