// Sequential and Network: chain-width checks, flat parameter views, deep copies.
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/nets/network.hpp>
#include <moonwalk/nets/parameters.hpp>
#include <moonwalk/nets/sequential.hpp>

#include "support/check_util.hpp"

using moonwalk::Index;
using moonwalk::Linear;
using moonwalk::Network;
using moonwalk::Sequential;
using moonwalk::ShapeError;
using moonwalk::Tanh;
using mwtest::Mat;
using mwtest::Vec;

namespace {

using L = Linear<double>;
using T = Tanh<double>;

/// linear(4->5), tanh(5), linear(5->3): 25 + 0 + 18 parameters.
Sequential<L, T, L> make_sequential() { return Sequential(L(4, 5, {.seed = 1}), T(5), L(5, 3, {.seed = 2})); }
Network<double> make_network() {
  Network<double> n;
  n.add(L(4, 5, {.seed = 1})).add(T(5)).add(L(5, 3, {.seed = 2}));
  return n;
}

const L& first_linear(const Sequential<L, T, L>& n) { return n.layer<0>(); }
const L& last_linear(const Sequential<L, T, L>& n) { return n.layer<2>(); }
const L& last_linear(const Network<double>& n) { return *n[2].target<L>(); }
L& first_linear(Network<double>& n) { return *n[0].target<L>(); }

/// y = W2 tanh(W1 x + b1) + b2 from a flat θ laid out [vec W1, b1, vec W2, b2].
Mat<double> reference_forward(const Vec<double>& th, const Mat<double>& x) {
  const Eigen::Map<const Mat<double>> W1(th.data(), 5, 4), W2(th.data() + 25, 3, 5);
  const Vec<double> b1 = th.segment(20, 5), b2 = th.segment(40, 3);
  const Mat<double> z = (W1 * x).colwise() + b1;
  return (W2 * z.array().tanh().matrix()).colwise() + b2;
}

template <class N>
void check_flat_views(N& net) {
  REQUIRE(moonwalk::num_parameters(net) == 43);
  CHECK(moonwalk::parameter_offsets(net) == std::vector<Index>{0, 25, 25, 43});

  // get: layer by layer, W column-major then b
  const Vec<double> th = moonwalk::get_parameters(net);
  REQUIRE(th.size() == 43);
  CHECK(th.segment(0, 20) == Eigen::Map<const Vec<double>>(first_linear(net).W().data(), 20));
  CHECK(th.segment(20, 5) == first_linear(net).b());
  CHECK(th.segment(25, 15) == Eigen::Map<const Vec<double>>(last_linear(net).W().data(), 15));
  CHECK(th.segment(40, 3) == last_linear(net).b());

  // set then get round-trips exactly, and the network computes with the new θ
  const Vec<double> th2 = mwtest::randn(43, 1, 7);
  moonwalk::set_parameters(net, th2);
  CHECK(moonwalk::get_parameters(net) == th2);
  CHECK(first_linear(net).W() == Eigen::Map<const Mat<double>>(th2.data(), 5, 4));
  CHECK(last_linear(net).b() == th2.segment(40, 3));
  const Mat<double> x = mwtest::randn(4, 3, 8);
  CHECK(mwtest::rel_err(net.forward(x), reference_forward(th2, x)) <= 1e-14);

  // a vector of the wrong size is refused and leaves θ alone
  for (const Index p : {42, 44, 0}) {
    INFO("vector of " << p << " entries");
    const Vec<double> bad = Vec<double>::Ones(p);
    mwtest::require_throw<ShapeError>([&] { moonwalk::set_parameters(net, bad); }, {std::to_string(p), "43"});
    CHECK(moonwalk::get_parameters(net) == th2);
  }

  // gradients: the same layout; zero_gradients clears every block
  Index k = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](auto& l) {
      for (auto blk : moonwalk::gradient_blocks(l))
        for (auto& g : blk) g = static_cast<double>(++k);
    });
  REQUIRE(k == 43);
  const Vec<double> g = moonwalk::get_gradients(net);
  REQUIRE(g.size() == 43);
  CHECK(g == Vec<double>::LinSpaced(43, 1, 43));
  moonwalk::zero_gradients(net);
  CHECK(moonwalk::get_gradients(net).isZero(0));
  CHECK(moonwalk::get_parameters(net) == th2);  // parameters untouched
}

}  // namespace

TEST_CASE("sequential: a width mismatch throws ShapeError naming both layers", "[nets]") {
  mwtest::require_throw<ShapeError>([] { (void)Sequential(L(4, 5), T(6)); },
                                    {"linear(4->5)", "tanh(6)", "5", "6"});
  mwtest::require_throw<ShapeError>([] { (void)Sequential(L(4, 5), T(5), L(6, 3)); },
                                    {"tanh(5)", "linear(6->3)", "layer 1", "layer 2"});
  CHECK_NOTHROW(Sequential(L(4, 5), T(5), L(5, 3)));
}

TEST_CASE("network: a width mismatch throws ShapeError naming both layers", "[nets]") {
  Network<double> n;
  n.add(L(4, 5)).add(T(5));
  mwtest::require_throw<ShapeError>([&] { n.add(L(6, 3)); }, {"tanh(5)", "linear(6->3)", "5", "6"});
  CHECK(n.size() == 2);  // the failed add left the network as it was
  n.add(L(5, 3));
  CHECK(n.size() == 3);
  CHECK(n.out_features() == 3);
}

TEST_CASE("flat parameter views round-trip (Sequential)", "[nets][parameters]") {
  auto net = make_sequential();
  check_flat_views(net);
}

TEST_CASE("flat parameter views round-trip (Network)", "[nets][parameters]") {
  auto net = make_network();
  check_flat_views(net);
}

TEST_CASE("network: a copy is deep", "[nets]") {
  Network<double> a = make_network();
  const Vec<double> th = moonwalk::get_parameters(a);
  const Mat<double> x = mwtest::randn(4, 3, 1);
  const Mat<double> y = a.forward(x);
  moonwalk::set_parameters(a, Vec<double>(mwtest::randn(43, 1, 2)));
  moonwalk::set_parameters(a, th);
  for (std::size_t i = 0; i < a.size(); ++i)
    a.visit(i, [](auto& l) {
      for (auto blk : moonwalk::gradient_blocks(l))
        for (auto& g : blk) g = 1;
    });

  SECTION("copy construction") {
    Network<double> b = a;
    moonwalk::set_parameters(b, Vec<double>(mwtest::randn(43, 1, 3)));
    moonwalk::zero_gradients(b);
    first_linear(b).W().setZero();
    CHECK(moonwalk::get_parameters(a) == th);
    CHECK(a.forward(x) == y);
    CHECK(moonwalk::get_gradients(a) == Vec<double>::Ones(43));
    CHECK((b.forward(x) - y).norm() > 0.1);
  }
  SECTION("copy assignment") {
    Network<double> b;
    b.add(T(2));
    b = a;
    REQUIRE(b.size() == 3);
    CHECK(b.forward(x) == y);
    moonwalk::set_parameters(b, Vec<double>(mwtest::randn(43, 1, 4)));
    CHECK(moonwalk::get_parameters(a) == th);
    CHECK(a.forward(x) == y);
  }
}
