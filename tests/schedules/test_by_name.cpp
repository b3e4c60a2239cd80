// Schedules chosen by name (schedules/by_name.hpp): every name runs the
// schedule it names, configured from the choice, and agrees with backprop.
#include <catch2/catch.hpp>
#include <moonwalk/moonwalk.hpp>
#include <set>
#include <string>
#include <vector>

#include "support/check_util.hpp"

using namespace moonwalk;

TEST_CASE("with_schedule: every name runs its schedule and agrees with backprop", "[schedules][by_name]") {
  auto net = parse_network<double>("in:12,linear:10,tanh,linear:8,leaky_relu:0.2,linear:4", 5);
  const Matrix<double> x = gaussian<double>(12, 6, 9);
  const Matrix<double> t = gaussian<double>(4, 6, 10);
  const MSE<double> loss;
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, loss, t);
  std::set<std::string> seen;
  for (const std::string& name : schedule_names()) {
    INFO(name);
    ScheduleChoice c{.name = name, .directions = 4, .seed = 3};
    const auto r = with_schedule(c, net.size(), [&](const auto& s) { return gradient(s, net, x, loss, t); });
    seen.insert(r.stats.schedule);
    CHECK(r.loss == Approx(bp.loss).epsilon(1e-12));
    if (r.stats.is_estimate) {
      CHECK(name == "projforward");
      CHECK(r.stats.figures.at("directions") == 4);
    } else {
      CHECK(mwtest::rel_err(r.gradient, bp.gradient) < 1e-9);
    }
  }
  // Nine names, and binomial is the slotted Checkpointing (same reported schedule name or not,
  // every one ran: at least the distinct schedule types).
  CHECK(schedule_names().size() == 9);
  CHECK(seen.count("mixed") == 1);
  CHECK(seen.count("pure") == 1);
  CHECK(seen.count("revbackprop") == 1);
  CHECK(is_schedule_name("binomial"));
  CHECK_FALSE(is_schedule_name("adam"));
}

TEST_CASE("with_schedule: options reach the schedule; an unknown name lists the known ones",
          "[schedules][by_name]") {
  auto net = parse_network<double>("in:8,linear:8,tanh,linear:8,tanh,linear:8,tanh,linear:2", 2);
  const Matrix<double> x = gaussian<double>(8, 3, 1);
  const Matrix<double> t = gaussian<double>(2, 3, 2);
  const MSE<double> loss;
  ScheduleChoice c{.name = "mixed", .anchors_every = 2};
  c.fidelity = Fidelity::none();
  const auto r = with_schedule(c, net.size(), [&](const auto& s) { return gradient(s, net, x, loss, t); });
  CHECK(r.stats.anchor_bytes() > 0);
  const auto plain = gradient(MixedMoonwalk{.fidelity = Fidelity::none()}, net, x, loss, t);
  CHECK(plain.stats.anchor_bytes() == 0);

  CHECK_THROWS_WITH(with_schedule(ScheduleChoice{.name = "nope"}, net.size(),
                                  [&](const auto& s) { return gradient(s, net, x, loss, t); }),
                    Catch::Contains("unknown schedule 'nope'") && Catch::Contains("binomial") &&
                        Catch::Contains("projforward"));
}

// ---- the layers with a step, a mode or an iterative vijp, under every schedule

TEST_CASE("batchnorm: running statistics fold in once per step, whatever the schedule recomputes",
          "[layers][normalization][schedules]") {
  using namespace moonwalk;
  const std::string spec = "in:6,linear:7,tanh,batchnorm,leaky_relu:0.5,linear:7,batchnorm,tanh,linear:3";
  const Matrix<double> x = gaussian<double>(6, 9, 1);
  const Matrix<double> t = gaussian<double>(3, 9, 2);
  const MSE<double> loss;
  // The batch statistics of the first BatchNorm's input (layers 0-1 recomputed here).
  auto reference = parse_network<double>(spec, 4);
  Matrix<double> h = x;
  for (std::size_t i = 0; i < 2; ++i) reference.visit(i, [&](const auto& l) { h = l.forward(h); });
  const Eigen::VectorXd mu = h.rowwise().mean();
  const Eigen::VectorXd var = (h.colwise() - mu).array().square().rowwise().sum() / 8.0;  // unbiased, batch 9
  for (const std::string name : {"backprop", "mixed", "checkpoint", "binomial", "planned"}) {
    INFO(name);
    auto net = parse_network<double>(spec, 4);
    for (int step = 0; step < 2; ++step) {
      // Two gradients within one step: the second folds nothing in.
      for (int k = 0; k < 2; ++k) {
        const ScheduleChoice c{.name = name};
        (void)with_schedule(c, net.size(), [&](const auto& s) { return gradient(s, net, x, loss, t); });
      }
      const auto* bn = net[2].target<BatchNorm<double>>();
      REQUIRE(bn != nullptr);
      CHECK(bn->updates() == static_cast<std::uint64_t>(step + 1));
      if (step == 0) {
        CHECK(mwtest::rel_err(bn->running_mean(), Eigen::VectorXd(0.1 * mu)) < 1e-12);
        CHECK(mwtest::rel_err(bn->running_var(),
                              Eigen::VectorXd(0.9 * Eigen::VectorXd::Ones(7) + 0.1 * var)) < 1e-12);
      }
      set_step(net, static_cast<std::uint64_t>(step + 1));
    }
  }
  // Pure-forward Moonwalk's tangents span the whole batch: it refuses, naming the layer.
  auto net = parse_network<double>(spec, 4);
  CHECK_THROWS_WITH(gradient(PureMoonwalk{}, net, x, loss, t), Catch::Contains("layer 2 batchnorm(7)"));
}

namespace {

// Every schedule by name (but projforward: an estimate, not the gradient) on
// the network `spec` gives backprop's loss and gradient within tolerance; one
// that refuses is RevBackprop (needs invertible layers) or pure (submersive or
// fragmental layers whose samples do not interact), and its error names the
// layer. `check(name, result)` adds the caller's assertions.
template <class Check>
void every_schedule_agrees(const std::string& spec, std::uint64_t seed, moonwalk::Index batch, Check check) {
  using namespace moonwalk;
  INFO(spec);
  auto net = parse_network<double>(spec, seed);
  const Matrix<double> x = gaussian<double>(net.in_features(), batch, seed + 1);
  const Matrix<double> t = gaussian<double>(net.out_features(), batch, seed + 2);
  const MSE<double> loss;
  const auto bp = gradient(Backprop{}, net, x, loss, t);
  check(std::string("backprop"), bp);
  for (const std::string& name : schedule_names()) {
    if (name == "projforward" || name == "backprop") continue;
    INFO(name);
    const ScheduleChoice c{.name = name};
    try {
      const auto r =
          with_schedule(c, net.size(), [&](const auto& s) { return gradient(s, net, x, loss, t); });
      CHECK(r.loss == Approx(bp.loss).epsilon(1e-12));
      CHECK(mwtest::rel_err(r.gradient, bp.gradient) < 1e-8);
      CHECK(r.stats.within_tolerance);
      check(name, r);
    } catch (const ScheduleError& e) {
      INFO(e.what());
      CHECK((name == "revbackprop" || name == "pure"));
      CHECK(std::string(e.what()).find("layer") != std::string::npos);
    }
  }
}

}  // namespace

TEST_CASE("normalisation and dropout: every schedule agrees with backprop",
          "[layers][normalization][schedules]") {
  for (const char* spec : {
           "in:6,linear:8,batchnorm,leaky_relu:0.5,linear:6,layernorm,dropout:0.25,linear:3",
           "in:2x4x4,conv:3:3:1:1,batchnorm,tanh,dropout:0.2,conv:2:3:1:1,flatten,layernorm,linear:4",
           "in:6,coupling:additive:5,batchnorm,coupling:additive:4,dropout:0.3,linear:3",
       })
    every_schedule_agrees(spec, 21, 5, [](const std::string&, const auto&) {});
}

TEST_CASE("residual blocks: every schedule agrees with backprop; solves are counted",
          "[layers][residual][schedules]") {
  for (const char* spec : {
           "in:6,linear:6,residual:8,leaky_relu:0.5,residual:5:elu,layernorm,linear:3",
           "in:2x4x4,residual_conv:3,batchnorm,leaky_relu:0.2,residual_conv:2:tanh:0.3,flatten,dropout:0.2,"
           "linear:3",
       })
    every_schedule_agrees(spec, 51, 4, [](const std::string& name, const auto& r) {
      // Backprop solves nothing; mixed solves the blocks' vijps.
      if (name == "backprop") CHECK(r.stats.counts.solver_iterations == 0);
      if (name == "mixed") CHECK(r.stats.counts.solver_iterations > 0);
    });
}
