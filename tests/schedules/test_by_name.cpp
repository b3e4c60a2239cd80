// Schedules chosen by name (schedules/by_name.hpp): every name runs the
// schedule it names, configured from the choice, and agrees with backprop.
#include <catch2/catch.hpp>
#include <moonwalk/moonwalk.hpp>
#include <set>
#include <string>

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
