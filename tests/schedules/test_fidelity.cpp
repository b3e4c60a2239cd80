// The fidelity policy (fidelity/policy.hpp): tolerance-driven anchors, double
// cotangents, verification and fallback — every Moonwalk gradient against
// double backprop on a twin with identical parameters (the truth).
#include <catch2/catch.hpp>
#include <moonwalk/moonwalk.hpp>
#include <string>

#include "support/random_net.hpp"

using namespace moonwalk;
using moonwalk_test::max_rel_err_per_tensor;

namespace {

/// A gradient of `net` (float) with its true error against double backprop.
struct Checked {
  GradientResult<float> r;
  double err = 0;
  std::size_t backprop_bytes = 0;
};

template <class Sch>
Checked check_float(const Sch& schedule, Network<float>& net, Network<double>& twin, Index batch,
                    std::uint64_t seed) {
  set_parameters(twin, get_parameters(net).cast<double>());
  const Matrix<double> x = gaussian<double>(net.in_features(), batch, seed + 1);
  const Matrix<double> t = gaussian<double>(net.out_features(), batch, seed + 2);
  const Matrix<float> xs = x.cast<float>(), ts = t.cast<float>();
  const auto truth =
      gradient(Backprop{.input_gradient = true}, twin, xs.cast<double>(), MSE<double>{}, ts.cast<double>());
  Checked c;
  c.r = gradient(schedule, net, xs, MSE<float>{}, ts);
  c.err = max_rel_err_per_tensor(c.r.gradient, truth.gradient, parameter_offsets(net));
  c.backprop_bytes =
      gradient(Backprop{.input_gradient = true}, net, xs, MSE<float>{}, ts).stats.residual_bytes;
  return c;
}

}  // namespace

TEST_CASE("Anchor planner: anchors where the predicted Σ Π γ would pass the budget", "[fidelity]") {
  // γ = 2 everywhere, budget 100: a segment of k layers predicts
  // 2 + 4 + … + 2^k = 2^{k+1} − 2, which is 62 for k = 5 and 126 for k = 6,
  // so every 6th layer (walking down) is anchored and the next starts afresh.
  detail::AnchorPlanner p(100);
  std::string pattern;
  for (int i = 0; i < 14; ++i) pattern += p.place(2) ? 'A' : '.';
  CHECK(pattern == ".....A.....A..");
  CHECK(p.worst() == Approx(62));
  // γ = 1: a segment grows linearly (k layers predict k).
  detail::AnchorPlanner q(10);
  std::string flat;
  for (int i = 0; i < 12; ++i) flat += q.place(1) ? 'A' : '.';
  CHECK(flat == "..........A.");
  // A NaN amplification is never trusted: it forces an anchor.
  detail::AnchorPlanner r(1e9);
  CHECK(r.place(std::numeric_limits<double>::quiet_NaN()));
}

TEST_CASE("Default policy holds the float tolerance on deep MLPs where the unguarded sweep fails",
          "[fidelity][schedules]") {
  // docs/design.md §5: orthogonal + LeakyReLU(0.1) in float is 1e-5 at depth 4 and
  // 4e+3 at depth 16 unguarded.
  for (const double slope : {0.1, 0.3}) {
    const int depth = slope < 0.2 ? 16 : 32;
    Network<float> net = moonwalk_test::leaky_mlp<float>(depth, 24, slope, Init::orthogonal, 40);
    Network<double> twin = moonwalk_test::leaky_mlp<double>(depth, 24, slope, Init::orthogonal, 40);
    const Checked none = check_float(MixedMoonwalk{.fidelity = Fidelity::none()}, net, twin, 16, 5);
    const Checked held = check_float(MixedMoonwalk{.input_gradient = true}, net, twin, 16, 5);
    const Stats& st = held.r.stats;
    INFO("slope " << slope << " depth " << depth << ": unguarded err " << none.err << " est "
                  << none.r.stats.error_estimate << "; policy err " << held.err << " est "
                  << st.error_estimate << " predicted " << st.predicted_error << " anchors "
                  << st.anchor_layers.size() << " precision " << st.precision << " fallbacks " << st.fallbacks
                  << " bytes " << st.residual_bytes << " / backprop " << held.backprop_bytes << "\n"
                  << report_text(st));
    CHECK(none.err > 1e-4);                      // the sweep alone is not good enough here …
    CHECK_FALSE(none.r.stats.within_tolerance);  // … and says so
    CHECK(st.within_tolerance);
    CHECK(st.error_estimate <= 1e-4);
    CHECK(held.err <= 1e-4);
    CHECK(st.tolerance == 1e-4);
    CHECK_FALSE(st.anchor_layers.empty());
    CHECK(st.residual_bytes < held.backprop_bytes);  // and it still keeps less than backprop
    // The amplification the policy predicted from is reported per layer.
    REQUIRE(st.amplification.size() == net.size());
    CHECK(st.amplification[1].known);
    CHECK(st.amplification[1].typical > 1);
    CHECK(st.amplification[1].bound >= st.amplification[1].typical);
  }
}

TEST_CASE("Gaussian initialisation: the policy escalates (anchors, double cotangents) and holds",
          "[fidelity][schedules]") {
  Network<float> net = moonwalk_test::leaky_mlp<float>(12, 24, 0.1, Init::gaussian, 70);
  Network<double> twin = moonwalk_test::leaky_mlp<double>(12, 24, 0.1, Init::gaussian, 70);
  const Checked none = check_float(MixedMoonwalk{.fidelity = Fidelity::none()}, net, twin, 16, 9);
  const Checked held = check_float(MixedMoonwalk{.input_gradient = true}, net, twin, 16, 9);
  const Checked dbl = check_float(MixedMoonwalk{.fidelity = Fidelity::double_cotangents()}, net, twin, 16, 9);
  INFO("unguarded err " << none.err << "; policy err " << held.err << " est " << held.r.stats.error_estimate
                        << " precision " << held.r.stats.precision << " fallbacks " << held.r.stats.fallbacks
                        << " anchors " << held.r.stats.anchor_layers.size() << "; double err " << dbl.err
                        << " est " << dbl.r.stats.error_estimate);
  CHECK(none.err > 1e-4);
  CHECK(held.r.stats.within_tolerance);
  CHECK(held.err <= 1e-4);
  // Double cotangents alone shrink the unguarded error by orders of magnitude.
  CHECK(dbl.r.stats.precision == "double");
  CHECK(dbl.err < none.err * 1e-3);
}

TEST_CASE(
    "Precision memory: a step on an escalated shape starts in double, and probes float ever more rarely",
    "[fidelity][schedules]") {
  Network<float> net = moonwalk_test::leaky_mlp<float>(12, 24, 0.1, Init::gaussian, 70);
  Network<double> twin = moonwalk_test::leaky_mlp<double>(12, 24, 0.1, Init::gaussian, 70);
  const MixedMoonwalk mixed{};
  const Checked first = check_float(mixed, net, twin, 16, 9);
  INFO("first: precision " << first.r.stats.precision << " fallbacks " << first.r.stats.fallbacks);
  REQUIRE(first.r.stats.precision == "double");  // the shape escalates
  REQUIRE(first.r.stats.fallbacks >= 1);
  CHECK(first.r.stats.figures.count("precision_remembered") == 0);

  // The same schedule (and a copy: the memory is shared) on the same shape:
  // double from the start, nothing discarded, the same gradient.
  for (const MixedMoonwalk& m : {mixed, MixedMoonwalk(mixed)}) {
    const Checked again = check_float(m, net, twin, 16, 9);
    CHECK(again.r.stats.precision == "double");
    CHECK(again.r.stats.figures.count("precision_remembered") == 1);
    CHECK(again.r.stats.fallbacks + 1 == first.r.stats.fallbacks);
    CHECK(again.r.stats.within_tolerance);
    CHECK(again.err <= 1e-4);
    if (first.r.stats.fallbacks == 1) CHECK(again.r.gradient == first.r.gradient);
  }
  // Steps 2..16 of this shape were remembered; the 17th probes the working precision.
  for (int step = 4; step <= 16; ++step)
    CHECK(check_float(mixed, net, twin, 16, 9).r.stats.figures.count("precision_remembered") == 1);
  const Checked probe = check_float(mixed, net, twin, 16, 9);
  CHECK(probe.r.stats.figures.count("precision_remembered") == 0);
  CHECK(probe.r.stats.fallbacks == first.r.stats.fallbacks);
  CHECK(check_float(mixed, net, twin, 16, 9).r.stats.figures.count("precision_remembered") == 1);
  // The probe escalated again: the shape's interval doubles (31 remembered steps, then a probe).
  for (std::uint32_t step = 2; step < 2 * PrecisionMemory::kProbeEvery; ++step)
    CHECK(check_float(mixed, net, twin, 16, 9).r.stats.figures.count("precision_remembered") == 1);
  CHECK(check_float(mixed, net, twin, 16, 9).r.stats.figures.count("precision_remembered") == 0);

  // Another batch width is another shape: not remembered at first; once it
  // has escalated both are (an epoch's short last batch does not make the
  // next epoch's full batches start over).
  CHECK(check_float(mixed, net, twin, 8, 9).r.stats.figures.count("precision_remembered") == 0);
  CHECK(check_float(mixed, net, twin, 8, 9).r.stats.figures.count("precision_remembered") == 1);
  CHECK(check_float(mixed, net, twin, 16, 9).r.stats.figures.count("precision_remembered") == 1);
  MixedMoonwalk forgetful{};
  forgetful.fidelity.memory = nullptr;
  for (int k = 0; k < 2; ++k) {
    const Checked c = check_float(forgetful, net, twin, 16, 9);
    CHECK(c.r.stats.figures.count("precision_remembered") == 0);
    CHECK(c.r.stats.fallbacks == first.r.stats.fallbacks);
  }

  // A schedule rebuilt by with_schedule from one ScheduleChoice keeps the memory.
  const ScheduleChoice choice{.name = "mixed"};
  auto by_name = [&] {
    return with_schedule(choice, net.size(),
                         [&](const auto& sch) { return check_float(sch, net, twin, 16, 9); });
  };
  CHECK(by_name().r.stats.figures.count("precision_remembered") == 0);
  CHECK(by_name().r.stats.figures.count("precision_remembered") == 1);

  // A shape that holds the tolerance in float is never remembered.
  Network<float> easy = moonwalk_test::leaky_mlp<float>(2, 8, 0.5, Init::orthogonal, 3);
  Network<double> easy_twin = moonwalk_test::leaky_mlp<double>(2, 8, 0.5, Init::orthogonal, 3);
  const MixedMoonwalk fresh{};
  for (int k = 0; k < 2; ++k) {
    const Checked c = check_float(fresh, easy, easy_twin, 8, 4);
    CHECK(c.r.stats.precision == "float");
    CHECK(c.r.stats.figures.count("precision_remembered") == 0);
  }
}

TEST_CASE("Verification: an under-predicting model is caught and the step recomputed",
          "[fidelity][fallback]") {
  // Calibration c = 1e-30 makes the planner place no anchors at all; the
  // a-posteriori estimate then exceeds the tolerance and the step must be
  // recomputed (denser anchors, double cotangents or backprop) until it holds.
  Network<float> net = moonwalk_test::leaky_mlp<float>(16, 24, 0.1, Init::orthogonal, 40);
  Network<double> twin = moonwalk_test::leaky_mlp<double>(16, 24, 0.1, Init::orthogonal, 40);
  Fidelity blind;
  blind.calibration = 1e-30;
  const Checked c = check_float(MixedMoonwalk{.fidelity = blind}, net, twin, 16, 5);
  INFO("err " << c.err << " est " << c.r.stats.error_estimate << " precision " << c.r.stats.precision
              << " fallbacks " << c.r.stats.fallbacks);
  CHECK(c.r.stats.fallbacks >= 1);
  CHECK(c.r.stats.within_tolerance);
  CHECK(c.err <= 1e-4);

  // Working precision only and no verification: the blind policy returns the
  // bad gradient, flagged.
  blind.verify = false;
  blind.precision = Precision::working;
  const Checked flagged = check_float(MixedMoonwalk{.fidelity = blind}, net, twin, 16, 5);
  CHECK(flagged.r.stats.fallbacks == 0);
  CHECK(flagged.r.stats.error_estimate > 1e-4);
  CHECK_FALSE(flagged.r.stats.within_tolerance);
}

TEST_CASE("Pure-forward escalates to double cotangents and flags what it cannot hold", "[fidelity][pure]") {
  Network<float> net = moonwalk_test::leaky_mlp<float>(10, 12, 0.1, Init::orthogonal, 11);
  Network<double> twin = moonwalk_test::leaky_mlp<double>(10, 12, 0.1, Init::orthogonal, 11);
  const Checked none = check_float(PureMoonwalk{.fidelity = Fidelity::none()}, net, twin, 8, 3);
  const Checked held = check_float(PureMoonwalk{}, net, twin, 8, 3);
  INFO("unguarded err " << none.err << " est " << none.r.stats.error_estimate << "; policy err " << held.err
                        << " est " << held.r.stats.error_estimate << " precision " << held.r.stats.precision);
  REQUIRE(none.r.stats.error_estimate > 1e-4);  // the network is bad enough to need it
  CHECK_FALSE(none.r.stats.within_tolerance);
  CHECK(held.r.stats.precision == "double");
  CHECK(held.r.stats.fallbacks == 1);
  CHECK(held.r.stats.within_tolerance);
  CHECK(held.err <= 1e-4);

  // Too deep even for double: returned, and flagged.
  Network<float> deep = moonwalk_test::leaky_mlp<float>(40, 12, 0.1, Init::orthogonal, 12);
  Network<double> deep_twin = moonwalk_test::leaky_mlp<double>(40, 12, 0.1, Init::orthogonal, 12);
  const Checked lost = check_float(PureMoonwalk{}, deep, deep_twin, 8, 3);
  INFO("depth 40: err " << lost.err << " est " << lost.r.stats.error_estimate);
  CHECK(lost.r.stats.precision == "double");
  CHECK((lost.r.stats.within_tolerance == (lost.r.stats.error_estimate <= 1e-4)));
  if (!lost.r.stats.within_tolerance) CHECK(lost.err > 1e-6);  // the flag is not a false alarm
}

TEST_CASE("Double cotangents through a static Sequential (layers cast at compile time)", "[fidelity]") {
  using Seq = Sequential<Linear<float>, LeakyReLU<float>, Linear<float>, LeakyReLU<float>, Linear<float>>;
  Seq net(Linear<float>(8, 8, {.seed = 1}), LeakyReLU<float>(8, 0.2f), Linear<float>(8, 8, {.seed = 2}),
          LeakyReLU<float>(8, 0.2f), Linear<float>(8, 3, {.seed = 3}));
  const Matrix<float> x = gaussian<float>(8, 5, 4), t = gaussian<float>(3, 5, 5);
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, MSE<float>{}, t);
  const auto dbl =
      gradient(MixedMoonwalk{.fidelity = Fidelity::double_cotangents()}, net, x, MSE<float>{}, t);
  CHECK(dbl.stats.precision == "double");
  CHECK(detail::rel_max_err(dbl.gradient, bp.gradient) < 1e-5);
  CHECK(dbl.stats.error_estimate < 1e-6);
}

TEST_CASE("The saved-residual report carries the fidelity figures", "[fidelity][report]") {
  Network<double> net = moonwalk_test::leaky_mlp<double>(3, 6, 0.3, Init::orthogonal, 2);
  const Matrix<double> x = gaussian<double>(6, 4, 1), t = gaussian<double>(4, 4, 2);
  const auto r = gradient(MixedMoonwalk{.input_gradient = true}, net, x, MSE<double>{}, t);
  const std::string json = report_json(r.stats);
  CHECK(json.find("\"fidelity\":{") != std::string::npos);
  CHECK(json.find("\"precision\":\"double\"") != std::string::npos);
  CHECK(json.find("\"amplification\":[{\"layer\":0") != std::string::npos);
  const std::string text = report_text(r.stats);
  CHECK(text.find("fidelity: estimate") != std::string::npos);
  CHECK(text.find("typical") != std::string::npos);
}
