// Linear beyond the generic checker: initialisation, the vijp factorisation
// cache, rank errors and the fragment of an expanding layer.
#include <Eigen/QR>
#include <algorithm>
#include <moonwalk/core/ops.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/nets/any_layer.hpp>

#include "support/check_util.hpp"

using moonwalk::Index;
using moonwalk::Linear;
using moonwalk::RankError;
using mwtest::Mat;
using mwtest::rel_err;

namespace {

template <class S>
constexpr double tol() {
  return 100 * static_cast<double>(std::numeric_limits<S>::epsilon());
}

/// max |G − c·I|, the departure of a Gram matrix from c·I.
template <class S>
double gram_error(const Mat<S>& g, double c) {
  const Mat<double> gd = g.template cast<double>();
  return (gd - c * Mat<double>::Identity(gd.rows(), gd.cols())).cwiseAbs().maxCoeff();
}

/// vijp(x, vjp(x, h)) vs h, relative.
template <class S>
double roundtrip_error(const Linear<S>& l, std::uint64_t seed) {
  const Mat<S> x = mwtest::randn(l.in_features(), 3, seed).template cast<S>();
  const Mat<S> h = mwtest::randn(l.out_features(), 3, seed + 1).template cast<S>();
  return rel_err(l.vijp(x, l.vjp(x, h)), h);
}

}  // namespace

TEMPLATE_TEST_CASE("linear: default initialisation is (semi-)orthogonal", "[layers][linear]", float, double) {
  using S = TestType;
  const std::vector<std::pair<Index, Index>> shapes{{7, 5}, {6, 6}, {4, 7}, {1, 3}, {3, 1}, {16, 16}};
  for (const auto& [in, out] : shapes) {
    for (const double gain : {1.0, 2.5}) {
      const Linear<S> l(in, out, {.seed = 11, .gain = static_cast<S>(gain)});
      INFO(l.name() << ", gain " << gain);
      const Mat<S> W = l.W();
      REQUIRE(W.rows() == out);
      REQUIRE(W.cols() == in);
      if (out <= in)
        CHECK(gram_error<S>(W * W.transpose(), gain * gain) <= tol<S>() * gain * gain);  // orthonormal rows
      else
        CHECK(gram_error<S>(W.transpose() * W, gain * gain) <=
              tol<S>() * gain * gain);  // orthonormal columns
      CHECK(l.b().isZero(0));
      CHECK(l.num_params() == out * in + out);
    }
  }
}

TEMPLATE_TEST_CASE("linear: initialisation is seeded", "[layers][linear]", float, double) {
  using S = TestType;
  const Linear<S> a(7, 5, {.seed = 3}), b(7, 5, {.seed = 3}), c(7, 5, {.seed = 4});
  CHECK(a.W() == b.W());  // same seed: bitwise the same W
  CHECK((a.W() - c.W()).norm() > S(0.5));
  // the default seed is fixed too
  CHECK(Linear<S>(7, 5).W() == Linear<S>(7, 5).W());
  CHECK(Linear<S>(7, 5).W() == Linear<S>(7, 5, {.seed = 0}).W());
  // float and double draw the same matrix (rounded)
  CHECK(rel_err(Linear<float>(7, 5, {.seed = 3}).W(), Linear<double>(7, 5, {.seed = 3}).W()) < 1e-6);
}

TEMPLATE_TEST_CASE("linear: the vijp factorisation follows weight changes", "[layers][linear]", float,
                   double) {
  using S = TestType;
  Linear<S> l(7, 5, {.seed = 1});
  REQUIRE(roundtrip_error(l, 1) <= tol<S>());  // builds the cached factorisation
  const Linear<S> before = l;                  // a copy holding the old weights

  SECTION("through W()") {
    l.W() += (0.5 * mwtest::randn(5, 7, 2)).template cast<S>();
    CHECK(roundtrip_error(l, 3) <= tol<S>());
    // sensitivity: the old weights' right inverse does not invert the new vjp
    const Mat<S> x = mwtest::randn(7, 3, 4).template cast<S>(), h = mwtest::randn(5, 3, 5).template cast<S>();
    CHECK(rel_err(before.vijp(x, l.vjp(x, h)), h) > 1e-2);
  }
  SECTION("through parameters()") {
    auto p = l.parameters();
    for (std::size_t k = 0; k < 35; k += 3) p[k] += S(0.7);  // entries of W (the first 35)
    CHECK(roundtrip_error(l, 3) <= tol<S>());
    CHECK((l.W() - before.W()).norm() > S(1));
  }
  SECTION("through the type-erased parameter blocks") {
    moonwalk::AnyLayer<S> a(l);
    const Mat<S> x = mwtest::randn(7, 3, 4).template cast<S>(), h = mwtest::randn(5, 3, 5).template cast<S>();
    REQUIRE(rel_err(a.vijp(x, a.vjp(x, h)), h) <= tol<S>());
    for (auto blk : moonwalk::parameter_blocks(a))
      for (std::size_t k = 0; k < 35; k += 2) blk[k] -= S(0.6);
    CHECK(rel_err(a.vijp(x, a.vjp(x, h)), h) <= tol<S>());
  }
  SECTION("square layer: inverse follows too") {
    Linear<S> q(6, 6, {.seed = 2});
    const Mat<S> x = mwtest::randn(6, 3, 6).template cast<S>();
    REQUIRE(rel_err(q.inverse(q.forward(x)), x) <= tol<S>());
    q.W() += (0.4 * mwtest::randn(6, 6, 7)).template cast<S>();
    q.b() = mwtest::randn(6, 1, 8).template cast<S>();
    CHECK(rel_err(q.inverse(q.forward(x)), x) <= tol<S>());
  }
}

TEMPLATE_TEST_CASE("linear: a wide batch's vijp is one product with the explicit right inverse",
                   "[layers][linear]", float, double) {
  using S = TestType;
  for (const auto& [in, out] : {std::pair<Index, Index>{7, 5}, {6, 6}}) {
    Linear<S> l(in, out, {.seed = 3, .init = moonwalk::Init::gaussian});
    const Index wide = Linear<S>::kExplicitBatch * out;
    const Mat<S> x = mwtest::randn(in, wide, 4).template cast<S>();
    const Mat<S> h = mwtest::randn(out, wide, 5).template cast<S>();
    const Mat<S> hx = l.vjp(x, h);
    // The wide call (explicit P = R⁻¹ Q₁ᵀ) against the reflectors on a narrow slice.
    const Mat<S> wide_hy = l.vijp(x, hx);
    const Mat<S> narrow_hy = l.vijp(x.leftCols(3), hx.leftCols(3));
    CHECK(rel_err(wide_hy, h) <= tol<S>());
    CHECK(rel_err(Mat<S>(wide_hy.leftCols(3)), narrow_hy) <= tol<S>());
    // P follows a weight change (it belongs to the weight version).
    l.W() += (0.3 * mwtest::randn(out, in, 6)).template cast<S>();
    const Mat<S> hx2 = l.vjp(x, h);
    CHECK(rel_err(l.vijp(x, hx2), h) <= tol<S>());
    CHECK(rel_err(l.vijp(x, hx), h) > 1e-2);  // sensitivity: the old h_x no longer maps back to h
  }
}

TEMPLATE_TEST_CASE("linear: rank-deficient W makes vijp throw RankError naming the layer", "[layers][linear]",
                   float, double) {
  using S = TestType;
  Linear<S> l(7, 5, {.seed = 1});
  const Mat<S> x = mwtest::randn(7, 3, 1).template cast<S>(), hx = mwtest::randn(7, 3, 2).template cast<S>();
  const Mat<S> W0 = l.W();

  SECTION("two equal rows") { l.W().row(3) = l.W().row(1); }
  SECTION("a zero row") { l.W().row(2).setZero(); }
  SECTION("a row that is a sum of two others") { l.W().row(4) = l.W().row(0) + l.W().row(1); }
  SECTION("all zero") { l.W().setZero(); }

  INFO("W =\n" << l.W());
  mwtest::require_throw<RankError>([&] { (void)l.vijp(x, hx); }, {l.name(), "rank"});
  // a failed factorisation is not cached: full rank again, vijp works again
  l.W() = W0;
  CHECK(roundtrip_error(l, 3) <= tol<S>());
}

TEMPLATE_TEST_CASE("linear: singular square W and rank-deficient expanding W throw RankError",
                   "[layers][linear]", float, double) {
  using S = TestType;
  const Mat<S> y = mwtest::randn(6, 3, 1).template cast<S>();
  Linear<S> q(6, 6, {.seed = 2});
  q.W().col(5) = q.W().col(0);
  mwtest::require_throw<RankError>([&] { (void)q.inverse(y); }, {q.name()});
  mwtest::require_throw<RankError>([&] { (void)q.vijp(y, y); }, {q.name()});

  Linear<S> e(4, 7, {.seed = 3});
  e.W().col(2) = S(2) * e.W().col(1);  // rank 3 < in = 4: no exact fragment split
  const Mat<S> hy = mwtest::randn(7, 3, 2).template cast<S>();
  mwtest::require_throw<RankError>([&] { (void)e.save_fragment(moonwalk::Empty{}, hy); }, {e.name()});
}

TEMPLATE_TEST_CASE("linear: an expanding layer is fragmental, not submersive", "[layers][linear]", float,
                   double) {
  using S = TestType;
  const Linear<S> l(4, 7, {.seed = 3});
  CHECK_FALSE(l.is_submersive());
  CHECK_FALSE(moonwalk::can_vijp(l));
  CHECK(moonwalk::can_fragment(l));
  CHECK(moonwalk::sweep_mode(l) == moonwalk::SweepMode::fragment);
  const Mat<S> x = mwtest::randn(4, 3, 1).template cast<S>(), hx = mwtest::randn(4, 3, 2).template cast<S>();
  mwtest::require_throw<RankError>([&] { (void)l.vijp(x, hx); }, {l.name()});
  mwtest::require_throw<RankError>([&] { (void)l.inverse(mwtest::randn(7, 3, 3).template cast<S>()); },
                                   {l.name()});

  const Linear<S> c(7, 4, {.seed = 3});
  CHECK(moonwalk::sweep_mode(c) == moonwalk::SweepMode::vijp);
}

TEMPLATE_TEST_CASE("linear: the fragment of an expanding layer has (out - in) x batch entries",
                   "[layers][linear]", float, double) {
  using S = TestType;
  using moonwalk::Empty;
  for (const Index batch : {1, 3, 8}) {
    const Linear<S> l(4, 7, {.seed = 5});
    INFO("batch " << batch);
    const Mat<S> hy = mwtest::randn(7, batch, 1).template cast<S>();
    const auto f = l.save_fragment(Empty{}, hy);
    CHECK(f.value.rows() == 3);
    CHECK(f.value.cols() == batch);
    CHECK(moonwalk::nbytes(f) == static_cast<std::size_t>(3 * batch) * sizeof(S));
    CHECK(std::string(moonwalk::residual_kind(f)) == "fragment");

    // φ is the null(Wᵀ) part of h_y: zero for h_y in range(W), and
    // ‖h_y‖² = ‖range part‖² + ‖φ‖² (orthonormal basis).
    const Mat<double> W = l.W().template cast<double>(), h = hy.template cast<double>();
    const Mat<double> range_part = W * W.colPivHouseholderQr().solve(h);  // least squares
    CHECK(std::abs(range_part.squaredNorm() + f.value.template cast<double>().squaredNorm() -
                   h.squaredNorm()) <= tol<S>() * h.squaredNorm());
    const auto f_range = l.save_fragment(Empty{}, range_part.template cast<S>());
    CHECK(mwtest::norm(f_range.value) <= tol<S>() * range_part.norm());
  }
  // contracting and square layers have an empty fragment
  const Mat<S> h5 = mwtest::randn(5, 3, 1).template cast<S>();
  const auto f0 = Linear<S>(7, 5).save_fragment(moonwalk::Empty{}, h5);
  CHECK(f0.value.size() == 0);
  CHECK(moonwalk::nbytes(f0) == 0);
}

TEST_CASE("linear: sizes must be positive", "[layers][linear]") {
  mwtest::require_throw<moonwalk::ShapeError>([] { Linear<double>(0, 3); }, {"0"});
  mwtest::require_throw<moonwalk::ShapeError>([] { Linear<double>(3, -1); });
}

TEST_CASE("linear: a cast stores its gradient only once asked, and it starts at zero", "[layers][linear]") {
  Linear<float> l(6, 4);
  l.gradients()[0] = 1;  // the source's gradient is not carried over
  REQUIRE(l.stores_gradient());
  const Linear<double> d = l.cast<double>();
  CHECK_FALSE(d.stores_gradient());  // a cast for the sweep's operators carries no W-sized zeros
  const auto g = d.gradients();      // (const access makes it too)
  CHECK(g.size() == static_cast<std::size_t>(d.num_params()));
  CHECK(std::all_of(g.begin(), g.end(), [](double v) { return v == 0; }));
  CHECK(d.stores_gradient());

  // cast_into zeroes a stored gradient in place, and leaves an unstored one unstored.
  Linear<double> held = l.cast<double>();
  held.gradients()[1] = 2;
  const double* storage = held.gradients().data();
  l.cast_into(held);
  REQUIRE(held.stores_gradient());
  CHECK(held.gradients().data() == storage);
  CHECK(held.gradients()[1] == 0);
  Linear<double> bare = l.cast<double>();
  l.cast_into(bare);
  CHECK_FALSE(bare.stores_gradient());
  // A cast of another shape: its gradient follows the new shape on first access.
  Linear<float>(3, 5).cast_into(held);
  CHECK(held.gradients().size() == static_cast<std::size_t>(held.num_params()));
  CHECK(held.num_params() == 3 * 5 + 5);
}
