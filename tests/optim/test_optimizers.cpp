// SGD and Adam over the flat parameter view, learning-rate schedules, state save/restore.
#include <cmath>
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/losses/losses.hpp>
#include <moonwalk/nets/network.hpp>
#include <moonwalk/nets/parameters.hpp>
#include <moonwalk/nets/sequential.hpp>
#include <moonwalk/optim/optimizers.hpp>
#include <moonwalk/schedules/backprop.hpp>

#include "support/check_util.hpp"

using moonwalk::Adam;
using moonwalk::CosineLR;
using moonwalk::Index;
using moonwalk::Linear;
using moonwalk::Network;
using moonwalk::Sequential;
using moonwalk::Sgd;
using moonwalk::ShapeError;
using moonwalk::StepLR;
using moonwalk::Tanh;
using mwtest::Mat;
using mwtest::Vec;

namespace {

using L = Linear<double>;

/// linear(2->2): θ = [vec W (column-major), b], 6 parameters.
Sequential<L> tiny() { return Sequential(L(2, 2, {.seed = 3})); }

Vec<double> vec(std::initializer_list<double> v) {
  Vec<double> out(static_cast<Index>(v.size()));
  Index i = 0;
  for (double x : v) out[i++] = x;
  return out;
}

/// Writes g into the layers' gradient storage, as a schedule would.
template <class N>
void set_gradients(N& net, const Vec<typename N::scalar_type>& g) {
  REQUIRE(g.size() == moonwalk::num_parameters(net));
  Index o = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](auto& l) {
      for (auto s : moonwalk::gradient_blocks(l))
        for (auto& x : s) x = g[o++];
    });
}

const Vec<double> theta0 = vec({1, -2, 0.5, 4, 0, -1});
const Vec<double> grad0 = vec({0.5, 1, -1, 0, 2, 0.25});

}  // namespace

TEST_CASE("Sgd: one step by hand, plain, momentum and Nesterov", "[optim]") {
  // lr = 0.5, μ = 0.5, λ = 0.25 (dyadic, so every value below is exact):
  // d = g + λθ = [0.75, 0.5, −0.875, 1, 2, 0], v₁ = d.
  SECTION("heavy ball: θ₁ = θ − lr·d") {
    auto net = tiny();
    moonwalk::set_parameters(net, theta0);
    set_gradients(net, grad0);
    Sgd<double> opt{.lr = 0.5, .momentum = 0.5, .weight_decay = 0.25};
    opt.step(net);
    CHECK(moonwalk::get_parameters(net) == vec({0.625, -2.25, 0.9375, 3.5, -1, -1}));
    CHECK(opt.velocity() == vec({0.75, 0.5, -0.875, 1, 2, 0}));
    CHECK(opt.steps() == 1);
    // the network computes with the new θ (the layer saw the write)
    const Mat<double> x = mwtest::randn(2, 3, 1);
    const Mat<double> y = net.layer<0>().W() * x;
    CHECK(net.forward(x) == (y.colwise() + net.layer<0>().b()).eval());
  }
  SECTION("nesterov: θ₁ = θ − lr·(d + μ v₁) = θ − 0.75 d") {
    auto net = tiny();
    moonwalk::set_parameters(net, theta0);
    set_gradients(net, grad0);
    Sgd<double> opt{.lr = 0.5, .momentum = 0.5, .weight_decay = 0.25, .nesterov = true};
    opt.step(net);
    CHECK(moonwalk::get_parameters(net) == vec({0.4375, -2.375, 1.15625, 3.25, -1.5, -1}));
  }
  SECTION("plain SGD: θ₁ = θ − lr·g") {
    auto net = tiny();
    moonwalk::set_parameters(net, theta0);
    set_gradients(net, grad0);
    Sgd<double> opt{.lr = 0.5};
    opt.step(net);
    CHECK(moonwalk::get_parameters(net) == (theta0 - 0.5 * grad0).eval());
  }
}

TEST_CASE("Sgd: momentum accumulates across steps", "[optim]") {
  auto net = tiny();
  moonwalk::set_parameters(net, theta0);
  Sgd<double> opt{.lr = 0.5, .momentum = 0.5, .weight_decay = 0.25};
  set_gradients(net, grad0);
  opt.step(net);
  set_gradients(net, grad0);
  opt.step(net);
  // d₂ = g + λθ₁ = [0.65625, 0.4375, −0.765625, 0.875, 1.75, 0]
  // v₂ = μ v₁ + d₂ = [1.03125, 0.6875, −1.203125, 1.375, 2.75, 0];  θ₂ = θ₁ − lr v₂
  CHECK(opt.velocity() == vec({1.03125, 0.6875, -1.203125, 1.375, 2.75, 0}));
  CHECK(moonwalk::get_parameters(net) == vec({0.109375, -2.59375, 1.5390625, 2.8125, -2.375, -1}));
  CHECK(opt.steps() == 2);
}

TEST_CASE("Adam: one step by hand", "[optim]") {
  auto net = tiny();
  moonwalk::set_parameters(net, theta0);
  set_gradients(net, grad0);
  Adam<double> opt{.lr = 0.01, .weight_decay = 0.5};
  opt.step(net);
  // t = 1: m = (1 − β₁) g, v = (1 − β₂) g², m̂ = m/(1 − β₁), v̂ = v/(1 − β₂);
  // θ ← θ − lr λ θ, then θ ← θ − lr m̂/(√v̂ + ε).
  const double b1 = 0.9, b2 = 0.999, eps = 1e-8, lr = 0.01, wd = 0.5;
  Vec<double> expect(6), m(6), v(6);
  for (Index j = 0; j < 6; ++j) {
    const double g = grad0[j];
    m[j] = b1 * 0.0 + (1 - b1) * g;
    v[j] = b2 * 0.0 + (1 - b2) * g * g;
    const double mh = m[j] / (1 - std::pow(b1, 1.0)), vh = v[j] / (1 - std::pow(b2, 1.0));
    double th = theta0[j];
    th -= (lr * wd) * th;
    th -= lr * mh / (std::sqrt(vh) + eps);
    expect[j] = th;
  }
  CHECK(opt.first_moment() == m);
  CHECK(opt.second_moment() == v);
  CHECK(moonwalk::get_parameters(net) == expect);
  // the first step moves each θ by ≈ lr·sign(g) (plus the decay)
  CHECK(mwtest::rel_err(moonwalk::get_parameters(net), vec({0.985, -2.0, 0.5075, 3.98, -0.01, -1.005})) <
        1e-6);
}

TEST_CASE("Adam converges on a convex least-squares problem", "[optim]") {
  // y = W x + b fitted to exact targets from W*, b*: the minimum loss is 0.
  const Mat<double> x = mwtest::randn(3, 64, 11);
  const Mat<double> Wstar = mwtest::randn(2, 3, 12);
  const Vec<double> bstar = mwtest::randn(2, 1, 13).col(0);
  const Mat<double> target = (Wstar * x).colwise() + bstar;
  const moonwalk::MSE<double> mse;

  auto run = [&](auto& net) {
    Adam<double> opt{.lr = 0.05};
    const CosineLR sched{.total_steps = 1500, .min_lr_ratio = 0.01};
    const double first = moonwalk::gradient(moonwalk::Backprop{}, net, x, mse, target).loss;
    double last = first;
    for (std::size_t k = 0; k < 1500; ++k) {
      last = moonwalk::gradient(moonwalk::Backprop{}, net, x, mse, target).loss;
      opt.step(net, opt.lr * sched.factor(opt.steps()));
    }
    last = mse.value(net.forward(x), target);
    INFO("initial loss " << first << ", final loss " << last);
    CHECK(first > 0.1);
    CHECK(last < 1e-10);
    CHECK(opt.steps() == 1500);
  };
  SECTION("Sequential") {
    auto net = Sequential(L(3, 2, {.seed = 5}));
    run(net);
    CHECK(mwtest::rel_err(net.layer<0>().W(), Wstar) < 1e-5);
  }
  SECTION("Network") {
    Network<double> net;
    net.add(L(3, 2, {.seed = 5}));
    run(net);
  }
}

TEST_CASE("Weight decay shrinks parameters with zero gradient", "[optim]") {
  Network<double> net;
  net.add(L(3, 4, {.seed = 1})).add(Tanh<double>(4)).add(L(4, 2, {.seed = 2}));
  const Vec<double> th0 = moonwalk::get_parameters(net);
  const Index p = th0.size();
  REQUIRE(p == 16 + 10);
  SECTION("Sgd: θ ← (1 − lr λ) θ per step") {
    Sgd<double> opt{.lr = 0.1, .momentum = 0, .weight_decay = 0.5};
    for (int k = 0; k < 3; ++k) {
      moonwalk::zero_gradients(net);
      opt.step(net);
    }
    CHECK(mwtest::rel_err(moonwalk::get_parameters(net), (std::pow(0.95, 3) * th0).eval()) < 1e-14);
  }
  SECTION("Adam (decoupled): θ ← (1 − lr λ) θ per step, the moments stay 0") {
    Adam<double> opt{.lr = 0.1, .weight_decay = 0.5};
    for (int k = 0; k < 3; ++k) {
      moonwalk::zero_gradients(net);
      opt.step(net);
    }
    CHECK(mwtest::rel_err(moonwalk::get_parameters(net), (std::pow(0.95, 3) * th0).eval()) < 1e-14);
    CHECK(opt.first_moment() == Vec<double>::Zero(p));
    CHECK(opt.second_moment() == Vec<double>::Zero(p));
  }
  SECTION("no decay: nothing moves") {
    Adam<double> opt{.lr = 0.1};
    moonwalk::zero_gradients(net);
    opt.step(net);
    CHECK(moonwalk::get_parameters(net) == th0);
  }
}

TEST_CASE("Learning-rate schedules", "[optim]") {
  const StepLR st{.every = 10, .gamma = 0.5};
  CHECK(st.factor(0) == 1.0);
  CHECK(st.factor(9) == 1.0);
  CHECK(st.factor(10) == 0.5);
  CHECK(st.factor(25) == 0.25);
  CHECK(st.factor(30) == 0.125);

  const CosineLR cos{.total_steps = 100};
  CHECK(cos.factor(0) == 1.0);
  CHECK(cos.factor(50) == Approx(0.5).margin(1e-15));
  CHECK(cos.factor(25) == Approx(0.5 * (1 + std::sqrt(0.5))).epsilon(1e-14));
  CHECK(cos.factor(100) == Approx(0.0).margin(1e-15));
  CHECK(cos.factor(1000) == cos.factor(100));

  const CosineLR floor{.total_steps = 100, .min_lr_ratio = 0.1};
  CHECK(floor.factor(0) == 1.0);
  CHECK(floor.factor(50) == Approx(0.55).epsilon(1e-14));
  CHECK(floor.factor(100) == Approx(0.1).epsilon(1e-14));
  CHECK(floor.factor(7) < floor.factor(6));

  CHECK_THROWS_AS(StepLR{.every = 0}.factor(1), moonwalk::Error);
  CHECK_THROWS_AS(CosineLR{.total_steps = 0}.factor(1), moonwalk::Error);

  // a scheduled step uses the given rate and leaves .lr alone
  auto net = tiny();
  moonwalk::set_parameters(net, theta0);
  set_gradients(net, grad0);
  Sgd<double> opt{.lr = 1.0};
  opt.step(net, opt.lr * st.factor(10));
  CHECK(opt.lr == 1.0);
  CHECK(moonwalk::get_parameters(net) == (theta0 - 0.5 * grad0).eval());
}

TEST_CASE("Optimizer state round trip", "[optim]") {
  auto run = [](auto make_opt, Index state_size) {
    auto a = tiny(), b = tiny();
    auto opt_a = make_opt();
    for (std::uint64_t k = 0; k < 3; ++k) {
      set_gradients(a, mwtest::randn(6, 1, 20 + k).col(0));
      opt_a.step(a);
    }
    const Vec<double> s = opt_a.state();
    REQUIRE(s.size() == state_size);
    CHECK(s[0] == 3.0);

    auto opt_b = make_opt();
    CHECK(opt_b.state() == Vec<double>::Zero(1));
    opt_b.load_state(b, s);
    CHECK(opt_b.steps() == 3);
    CHECK(opt_b.state() == s);
    moonwalk::set_parameters(b, moonwalk::get_parameters(a));

    // both continue identically
    const Vec<double> g = mwtest::randn(6, 1, 30).col(0);
    set_gradients(a, g);
    set_gradients(b, g);
    opt_a.step(a);
    opt_b.step(b);
    CHECK(moonwalk::get_parameters(a) == moonwalk::get_parameters(b));
    CHECK(opt_a.state() == opt_b.state());

    // the never-stepped state resets
    opt_b.load_state(b, Vec<double>::Zero(1));
    CHECK(opt_b.steps() == 0);
    CHECK(opt_b.state() == Vec<double>::Zero(1));
  };
  SECTION("Sgd: [t, v]") {
    run([] { return Sgd<double>{.lr = 0.1, .momentum = 0.9}; }, 1 + 6);
  }
  SECTION("Adam: [t, m, v]") {
    run([] { return Adam<double>{.lr = 0.1}; }, 1 + 2 * 6);
  }
}

TEST_CASE("Optimizer size mismatches name both sizes", "[optim]") {
  auto small = tiny();                          // 6 parameters
  auto big = Sequential(L(3, 4, {.seed = 1}));  // 16 parameters
  set_gradients(small, grad0);
  moonwalk::zero_gradients(big);
  SECTION("Sgd step on a different network") {
    Sgd<double> opt{.lr = 0.1};
    opt.step(small);
    CHECK_THROWS_AS(opt.step(big), ShapeError);
    CHECK_THROWS_WITH(opt.step(big), Catch::Contains("Sgd") && Catch::Contains("6 parameters") &&
                                         Catch::Contains("16 parameters"));
  }
  SECTION("Adam step on a different network") {
    Adam<double> opt;
    opt.step(small);
    CHECK_THROWS_WITH(opt.step(big), Catch::Contains("Adam") && Catch::Contains("6 parameters") &&
                                         Catch::Contains("16 parameters"));
    CHECK(opt.steps() == 1);
  }
  SECTION("load_state for a different network") {
    Adam<double> opt;
    opt.step(small);
    const Vec<double> s = opt.state();  // 13 entries
    Adam<double> other;
    CHECK_THROWS_AS(other.load_state(big, s), ShapeError);
    CHECK_THROWS_WITH(other.load_state(big, s),
                      Catch::Contains("Adam") && Catch::Contains("13") && Catch::Contains("33"));
    CHECK(other.steps() == 0);
    Sgd<double> sgd{.lr = 0.1};
    CHECK_THROWS_WITH(sgd.load_state(small, s),
                      Catch::Contains("Sgd") && Catch::Contains("13") && Catch::Contains("expected 7"));
  }
}

TEST_CASE("Optimizers in float", "[optim]") {
  auto net = Sequential(Linear<float>(2, 2, {.seed = 3}));
  moonwalk::set_parameters(net, theta0.cast<float>());
  set_gradients(net, grad0.cast<float>());
  Sgd<float> sgd{.lr = 0.5, .momentum = 0.5, .weight_decay = 0.25};
  sgd.step(net);
  CHECK(moonwalk::get_parameters(net) == vec({0.625, -2.25, 0.9375, 3.5, -1, -1}).cast<float>());
  Adam<float> adam{.lr = 0.01f};
  adam.step(net);
  CHECK(adam.state().size() == 13);
}
