// The trust verdict every schedule's gradient carries (stats.within_tolerance,
// stats.non_finite; detail::judge): non-finite numbers are never within
// tolerance and cost no fallbacks; RevBackprop judges its drift; schedules that
// rebuild inputs keep the branch of each piecewise-linear element from the
// forward pass.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <moonwalk/moonwalk.hpp>
#include <string>
#include <vector>

#include "support/random_net.hpp"
#include "support/revnets.hpp"

using namespace moonwalk;

namespace {

/// Calls f(schedule) for every schedule of the library, named.
template <class F>
void for_every_schedule(F&& f) {
  f(Backprop{.input_gradient = true});
  f(MixedMoonwalk{.input_gradient = true});
  f(MixedMoonwalk{.rebuild_inputs = true, .input_gradient = true});
  f(PureMoonwalk{});
  f(Checkpointing{.input_gradient = true});
  f(Checkpointing{.slots = 2, .input_gradient = true});
  f(RevBackprop{.input_gradient = true});
  f(Planned{.calibration = Calibration::estimate, .input_gradient = true});
  f(NaiveForward{});
  f(ProjForward{.directions = 4});
}

template <class S>
Network<S> small_net() {
  return parse_network<S>("in:6,linear:6,leaky_relu:0.5,linear:5,leaky_relu:0.2,linear:3", 4);
}

}  // namespace

TEMPLATE_TEST_CASE("A non-finite input is reported by every schedule, never within tolerance",
                   "[schedules][trust]", float, double) {
  using S = TestType;
  const S bad = GENERATE(std::numeric_limits<S>::quiet_NaN(), std::numeric_limits<S>::infinity());
  Network<S> net = small_net<S>();
  Matrix<S> x = gaussian<S>(6, 5, 1);
  x(2, 3) = bad;
  const auto t = moonwalk_test::random_labels(3, 5, 2);
  const SoftmaxCrossEntropy<S> loss;
  for_every_schedule([&](const auto& schedule) {
    INFO(schedule.name() << ", input holds " << bad);
    const auto r = gradient(schedule, net, x, loss, t);
    CHECK_FALSE(r.stats.within_tolerance);
    CHECK(r.stats.non_finite == NonFinite::input);
    CHECK(r.stats.fallbacks == 0);  // no fallback can repair a NaN input
    CHECK(report_json(r.stats).find("\"non_finite\":\"input\"") != std::string::npos);
    CHECK(report_text(r.stats).find("not finite: input") != std::string::npos);
    // gradient_into says the same, and a finite step after it is trusted again.
    GradientResult<S> into;
    gradient_into(schedule, net, x, loss, t, into);
    CHECK_FALSE(into.stats.within_tolerance);
    CHECK(into.stats.non_finite == NonFinite::input);
    gradient_into(schedule, net, gaussian<S>(6, 5, 1), loss, t, into);
    CHECK(into.stats.non_finite == NonFinite::none);
    CHECK(into.stats.within_tolerance);
  });
}

TEMPLATE_TEST_CASE("A non-finite parameter is reported by every schedule, never within tolerance",
                   "[schedules][trust]", float, double) {
  using S = TestType;
  Network<S> net = small_net<S>();
  Vector<S> theta = get_parameters(net);
  theta(7) = std::numeric_limits<S>::infinity();
  set_parameters(net, theta);
  const Matrix<S> x = gaussian<S>(6, 5, 1);
  const auto t = moonwalk_test::random_labels(3, 5, 2);
  const SoftmaxCrossEntropy<S> loss;
  for_every_schedule([&](const auto& schedule) {
    INFO(schedule.name());
    const auto r = gradient(schedule, net, x, loss, t);
    CHECK_FALSE(r.stats.within_tolerance);
    CHECK(r.stats.non_finite == NonFinite::parameters);
    CHECK(r.stats.fallbacks == 0);
  });
}

TEST_CASE("A finite loss with an overflowing cotangent is reported as a non-finite gradient",
          "[schedules][trust]") {
  using S = float;
  // x ~ 1e-35 through W1 = 1e30·Q1 and W2 = 1e30·Q2: logits ~ 1e25 keep the
  // loss finite (log-sum-exp), while h_0 = W1ᵀ W2ᵀ (softmax − onehot) ~ 1e60
  // overflows float.
  Sequential net(Linear<S>(4, 4, {.seed = 1, .gain = 1e30f}), Linear<S>(4, 3, {.seed = 2, .gain = 1e30f}));
  const Matrix<S> x = gaussian<S>(4, 3, 3) * 1e-35f;
  const auto t = moonwalk_test::random_labels(3, 3, 4);
  for (const bool mixed : {false, true}) {
    const auto r = mixed
                       ? gradient(MixedMoonwalk{.input_gradient = true}, net, x, SoftmaxCrossEntropy<S>{}, t)
                       : gradient(Backprop{.input_gradient = true}, net, x, SoftmaxCrossEntropy<S>{}, t);
    INFO(r.stats.schedule << ": loss " << r.loss);
    REQUIRE(std::isfinite(r.loss));
    CHECK_FALSE(r.h0.allFinite());
    CHECK(r.stats.non_finite == NonFinite::gradient);
    CHECK_FALSE(r.stats.within_tolerance);
  }
}

TEMPLATE_TEST_CASE(
    "flat_gradient = false: every schedule leaves dl/dtheta in the layers only, and it is judged there",
    "[schedules][trust]", float, double) {
  using S = TestType;
  const Matrix<S> x = gaussian<S>(6, 5, 1);
  const auto t = moonwalk_test::random_labels(3, 5, 2);
  const SoftmaxCrossEntropy<S> loss;
  for_every_schedule([&](const auto& schedule) {
    INFO(schedule.name());
    Network<S> net = small_net<S>();
    GradientResult<S> flat;
    gradient_into(schedule, net, x, loss, t, flat);
    REQUIRE(flat.gradient.size() == num_parameters(net));
    REQUIRE(flat.stats.within_tolerance);
    zero_gradients(net);
    GradientResult<S> in_layers;
    in_layers.flat_gradient = false;
    gradient_into(schedule, net, x, loss, t, in_layers);
    CHECK(in_layers.gradient.size() == 0);
    CHECK_FALSE(in_layers.flat_gradient);  // (a fresh result from run() keeps the caller's choice)
    CHECK(in_layers.stats.within_tolerance);
    CHECK(in_layers.stats.non_finite == NonFinite::none);
    CHECK(detail::rel_max_err(get_gradients(net), flat.gradient) <= (sizeof(S) == 4 ? 1e-5 : 1e-12));
    // The same result asked for the copy again fills it.
    in_layers.flat_gradient = true;
    gradient_into(schedule, net, x, loss, t, in_layers);
    CHECK(in_layers.gradient.size() == num_parameters(net));
  });
  // A finite loss whose parameter gradient overflows: x ~ 1e30 through
  // W1 = 1e-30·Q1 gives h_1 ~ 1, W2 = 1e30·Q2 gives logits ~ 1e30 (finite
  // loss), and ∂ℓ/∂W1 = (W2ᵀ δ) xᵀ ~ 1e60 is infinite in float and huge in
  // double; judge() finds it in the layers when no flat copy is made.
  if constexpr (sizeof(S) == 4) {
    Sequential net(Linear<S>(4, 4, {.seed = 1, .gain = 1e-30f}), Linear<S>(4, 3, {.seed = 2, .gain = 1e30f}));
    const Matrix<S> big = gaussian<S>(4, 3, 3) * 1e30f;
    const auto t3 = moonwalk_test::random_labels(3, 3, 4);
    for (const bool slotted : {false, true}) {
      GradientResult<S> r;
      r.flat_gradient = false;
      if (slotted)
        gradient_into(Checkpointing{.slots = 1}, net, big, SoftmaxCrossEntropy<S>{}, t3, r);
      else
        gradient_into(Backprop{}, net, big, SoftmaxCrossEntropy<S>{}, t3, r);
      INFO(r.stats.schedule << ": loss " << r.loss);
      REQUIRE(std::isfinite(r.loss));
      CHECK(r.gradient.size() == 0);
      CHECK_FALSE(gradients_finite(net));
      CHECK(r.stats.non_finite == NonFinite::gradient);
      CHECK_FALSE(r.stats.within_tolerance);
    }
  }
}

TEST_CASE("RevBackprop judges its reconstruction drift against the tolerance", "[schedules][trust][revnet]") {
  using S = double;
  // Gaussian-initialised square Linears stretch some directions a lot: the
  // inputs rebuilt by inversion drift far from the true ones.
  std::string spec = "in:16";
  for (int i = 0; i < 24; ++i) spec += ",linear:16,leaky_relu:0.05";
  spec += ",linear:4";
  Network<S> net = parse_network<S>(spec, 5, {.init = Init::gaussian});
  const Matrix<S> x = gaussian<S>(16, 8, 6);
  const auto t = moonwalk_test::random_labels(4, 8, 7);
  const SoftmaxCrossEntropy<S> loss;
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, loss, t);
  const auto rb = gradient(RevBackprop{.input_gradient = true}, net, x, loss, t);
  const double err = detail::rel_max_err(rb.gradient, bp.gradient);
  INFO("estimate " << rb.stats.error_estimate << ", error against backprop " << err);
  REQUIRE(rb.stats.error_estimate > 1e-6);  // the network does drift
  CHECK_FALSE(rb.stats.within_tolerance);
  CHECK(rb.stats.tolerance == default_target<S>());
  // A tolerance of its own, looser than the drift, accepts the same gradient.
  const auto loose = gradient(RevBackprop{.tolerance = 2 * rb.stats.error_estimate, .input_gradient = true},
                              net, x, loss, t);
  CHECK(loose.stats.within_tolerance);
  // On a well-conditioned network it is trusted.
  Network<S> ok = parse_network<S>("in:8,linear:8,leaky_relu:0.5,linear:8,linear:3", 5);
  const auto good = gradient(RevBackprop{.input_gradient = true}, ok, gaussian<S>(8, 4, 1), loss,
                             moonwalk_test::random_labels(3, 4, 2));
  CHECK(good.stats.within_tolerance);
}

TEST_CASE("RevBackprop's NaN drift estimate is never within tolerance", "[schedules][trust][revnet]") {
  using S = float;
  Network<S> net = parse_network<S>("in:4,linear:4,leaky_relu:0.5,linear:4", 2);
  Matrix<S> x = gaussian<S>(4, 3, 1);
  GradientResult<S> r;
  r.stats.error_estimate = std::numeric_limits<double>::quiet_NaN();
  r.stats.within_tolerance = true;
  r.loss = 1;
  r.gradient = Vector<S>::Zero(num_parameters(net));
  r.h0 = Matrix<S>::Zero(4, 3);
  detail::judge(net, x, r);
  CHECK_FALSE(r.stats.within_tolerance);
  CHECK(r.stats.non_finite == NonFinite::none);
}

TEST_CASE("Schedules that rebuild inputs keep piecewise-linear branches from the forward pass",
          "[schedules][trust][revnet]") {
  using S = double;
  // The kink network (support/revnets.hpp): the LeakyReLU's pre-activations
  // of the padded rows are exactly 0, and ±1e-17 when rebuilt.
  const std::string& spec = moonwalk_test::kink_revnet_spec;
  Network<S> net = parse_network<S>(spec, moonwalk_test::kink_revnet_seed);
  const Matrix<S> x = gaussian<S>(10, 6, 10);
  const Matrix<S> y = gaussian<S>(4, 6, 11);
  const MSE<S> loss;
  // The case is exercised: the LeakyReLU (layer 3) sees exact zeros.
  Matrix<S> pre = x;
  for (std::size_t i = 0; i < 3; ++i) pre = net[i].forward(pre);
  REQUIRE((pre.array() == 0).count() > 0);
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, loss, y);
  const auto rb = gradient(RevBackprop{.input_gradient = true}, net, x, loss, y);
  const auto mw = gradient(MixedMoonwalk{.rebuild_inputs = true, .input_gradient = true}, net, x, loss, y);
  for (const auto* r : {&rb, &mw}) {
    INFO(r->stats.schedule << "\n" << report_text(r->stats));
    CHECK(detail::rel_max_err(r->gradient, bp.gradient) < 1e-12);
    CHECK(detail::rel_max_err(r->h0, bp.h0) < 1e-12);
    CHECK(r->stats.within_tolerance);
  }
  // What that costs: one bit per LeakyReLU element (24 × 6 bits → 3 words).
  CHECK(rb.stats.bytes_of("mask") == 3 * sizeof(std::uint64_t));
  CHECK(mw.stats.bytes_of("mask") == 3 * sizeof(std::uint64_t));
}

TEST_CASE("Runtime and static networks agree on which layers keep their branches", "[schedules][trust]") {
  CHECK(keeps_branches(LeakyReLU<float>(3, 0.5f)));
  CHECK(keeps_branches(ReLU<double>(3)));
  CHECK_FALSE(keeps_branches(Tanh<float>(3)));
  CHECK_FALSE(keeps_branches(Linear<float>(3, 3, {.seed = 1})));
  CHECK(keeps_branches(AnyLayer<float>(LeakyReLU<float>(3, 0.5f))));
  CHECK_FALSE(keeps_branches(AnyLayer<float>(Tanh<float>(3))));
}
