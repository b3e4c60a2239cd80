// The planned schedule: backprop's gradient within a working-set budget,
// its predicted working set against the measured one, its errors, and the
// layer-cost file it keeps.
#include <catch2/catch.hpp>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <moonwalk/moonwalk.hpp>
#include <sstream>

#include "support/random_net.hpp"
#include "support/temp_dir.hpp"

using namespace moonwalk;
using moonwalk_test::RandomArch;

namespace {

/// The working set of backprop's plan, and the least working set of any plan
/// by the values' sizes (the tightest plan's layout may need more), for `net`
/// at `batch` (values, two cotangent buffers, ∂ℓ/∂x_L).
template <class S>
std::pair<std::size_t, std::size_t> budget_range(Network<S>& net, Index batch, bool input_gradient) {
  const std::vector<Index> rows = value_rows(net);
  ChainCosts c;
  for (Index r : rows) c.value_bytes.push_back(static_cast<std::size_t>(r * batch) * sizeof(S));
  c.forward.assign(net.size(), 1);
  c.backward.assign(net.size(), 1);
  const std::size_t fixed = PlanRun<S>::cotangent_bytes(rows, batch, input_gradient);
  std::size_t all = 0;
  for (std::size_t i = 1; i < c.value_bytes.size(); ++i) all += c.value_bytes[i];
  return {fixed + all, fixed + least_held_bytes(c)};
}

/// Sets an environment variable for a scope.
struct ScopedEnv {
  std::string name;
  std::string old;
  bool had = false;
  ScopedEnv(const char* n, const std::string& v) : name(n) {
    if (const char* o = std::getenv(n)) old = o, had = true;
    ::setenv(n, v.c_str(), 1);
  }
  ~ScopedEnv() {
    if (had)
      ::setenv(name.c_str(), old.c_str(), 1);
    else
      ::unsetenv(name.c_str());
  }
};

}  // namespace

TEMPLATE_TEST_CASE(
    "planned equals backprop on 50 random architectures at budgets from backprop's to the least",
    "[schedules][planned][property]", double, float) {
  using S = TestType;
  for (std::uint64_t seed = 5001; seed < 5051; ++seed) {
    const RandomArch a(seed);
    std::string desc;
    Network<S> net = a.build<S>(&desc);
    INFO(desc);
    const Matrix<S> x = moonwalk_test::random_batch<S>(a.in, a.batch, seed + 1);
    const Matrix<S> t = moonwalk_test::random_batch<S>(a.out, a.batch, seed + 2);
    const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
    const auto [full, least_values] = budget_range(net, a.batch, true);
    const Planned tightest{
        .calibration = Calibration::estimate, .input_gradient = true, .invert = false, .moonwalk = false};
    const std::size_t least = tightest.smallest_budget(net, x);
    CHECK(least >= least_values);
    CHECK(least <= full);
    for (const std::size_t budget :
         {std::size_t{0}, full, (full + least) / 2, least + (full - least) / 8, least}) {
      INFO("budget " << budget << " (backprop's plan " << full << ", least " << least << ")");
      const Planned p{.budget = budget,
                      .calibration = Calibration::estimate,
                      .input_gradient = true,
                      .invert = false,
                      .moonwalk = false};
      const auto r = gradient(p, net, x, MSE<S>{}, t);
      CHECK(r.gradient == ref.gradient);
      CHECK(r.h0 == ref.h0);
      CHECK(r.loss == ref.loss);
      CHECK(r.stats.within_tolerance);
      CHECK(r.stats.schedule == "planned");
      // Predicted working set = measured (without this thread's product
      // scratch), and within the budget.
      const double predicted = r.stats.figures.at("predicted_working_bytes");
      const double measured = static_cast<double>(r.stats.working_bytes - thread_scratch_bytes());
      CHECK(std::abs(measured - predicted) <= 0.1 * predicted);
      if (budget > 0) CHECK(predicted <= static_cast<double>(budget));
      if (budget == 0 || budget == full) CHECK(r.stats.figures.at("recomputed_forwards") == 0);
    }
    const Planned below{.budget = least - 1,
                        .calibration = Calibration::estimate,
                        .input_gradient = true,
                        .invert = false,
                        .moonwalk = false};
    CHECK_THROWS_WITH(gradient(below, net, x, MSE<S>{}, t),
                      Catch::Contains("planned: no plan") &&
                          Catch::Contains(detail::cat("the smallest budget is ", least, " bytes")));
  }
}

TEST_CASE(
    "planned: at an unlimited budget the plan is backprop's; a tighter one recomputes less than binomial",
    "[schedules][planned]") {
  using S = float;
  const std::size_t L = 24;
  Network<S> net;
  for (std::size_t i = 0; i < L; ++i) {
    if (i % 2 == 0)
      net.add(Linear<S>(16, 16, {.seed = 40 + i}));
    else
      net.add(LeakyReLU<S>(16, 0.3F));
  }
  const Index B = 8;
  const Matrix<S> x = gaussian<S>(16, B, 1), t = gaussian<S>(16, B, 2);
  const Planned unlimited{.calibration = Calibration::estimate};
  CHECK(unlimited.plan(net, x).steps == backprop_plan(L).steps);
  // In the working set of binomial checkpointing with 4 slots, the plan is
  // predicted no slower than binomial's (the same costs: Linear layers cost
  // more than LeakyReLU ones, so it recomputes the cheap ones rather).
  const auto bin = gradient(Checkpointing{.slots = 4}, net, x, MSE<S>{}, t);
  const ChainCosts costs = chain_costs(net, x, Calibration::estimate);
  const PlanFigures fb = check_plan(binomial_plan(L, 4), costs.value_bytes, costs.forward, costs.backward);
  const auto [full, least] = budget_range(net, B, false);
  const std::size_t fixed = least - 2 * 16 * B * sizeof(S);
  const auto planned = gradient(Planned{.budget = fixed + fb.peak_held_bytes,
                                        .calibration = Calibration::estimate,
                                        .invert = false,
                                        .moonwalk = false},
                                net, x, MSE<S>{}, t);
  CHECK(planned.gradient == bin.gradient);
  CHECK(planned.stats.figures.at("predicted_seconds") <= fb.seconds * (1 + 1e-6));
  CHECK(planned.stats.figures.at("recomputed_forwards") > 0);
  CHECK(planned.stats.working_bytes - thread_scratch_bytes() <= fixed + fb.peak_held_bytes);
  CHECK(full > fixed + fb.peak_held_bytes);
}

TEST_CASE("planned: the layer-cost file is written once, read back, and can be turned off",
          "[schedules][planned][costs]") {
  using S = float;
  moonwalk::test::TempDir dir;
  const ScopedEnv cache("MOONWALK_CACHE_DIR", dir.dir.string());
  const ScopedEnv on("MOONWALK_COST_CACHE", "1");
  auto net = parse_network<S>("in:12,linear:20,tanh,linear:20,tanh,linear:20,tanh,linear:3", 4);
  const Matrix<S> x = gaussian<S>(12, 16, 1), t = gaussian<S>(3, 16, 2);
  const auto ref = gradient(Backprop{}, net, x, MSE<S>{}, t);
  const std::filesystem::path file = dir.dir / "layer-costs-v4.tsv";

  const auto r = gradient(Planned{}, net, x, MSE<S>{}, t);  // Calibration::cached
  CHECK(r.gradient == ref.gradient);
  REQUIRE(std::filesystem::exists(file));
  std::stringstream first;
  first << std::ifstream(file).rdbuf();
  // One line per distinct layer (name with widths): linear 12→20, tanh 20,
  // linear 20→20, linear 20→3; each with the batch and scalar type.
  std::size_t lines = 0;
  for (std::string line; std::getline(first, line);) {
    ++lines;
    CHECK(line.find("\tfloat\t16\t") != std::string::npos);
  }
  CHECK(lines == 4);
  // Read back: the same costs, nothing timed, the file unchanged.
  const ChainCosts c1 = chain_costs(net, x, Calibration::cached);
  const ChainCosts c2 = chain_costs(net, x, Calibration::cached);
  CHECK(c1.forward == c2.forward);
  CHECK(c1.backward == c2.backward);
  std::stringstream second;
  second << std::ifstream(file).rdbuf();
  CHECK(second.str() == first.str());
  // A damaged line is dropped (and its layer timed again); the rest stays.
  {
    std::ofstream out(file, std::ios::app);
    out << "garbage without tabs\nkey\tnot-a-number\t1\n";
  }
  CHECK(chain_costs(net, x, Calibration::cached).forward == c1.forward);
  // Another batch: its layers timed, the file rewritten whole (the damaged
  // lines gone); measure: the file neither read nor written.
  (void)chain_costs(net, Matrix<S>(gaussian<S>(12, 5, 3)), Calibration::cached);
  std::stringstream third;
  third << std::ifstream(file).rdbuf();
  CHECK(third.str().find("garbage") == std::string::npos);
  CHECK(third.str().find("not-a-number") == std::string::npos);
  CHECK(third.str().find(first.str().substr(0, first.str().find('\n'))) != std::string::npos);
  std::size_t now = 0;
  for (std::string line; std::getline(third, line);) ++now;
  CHECK(now == 8);
  std::filesystem::remove(file);
  (void)chain_costs(net, x, Calibration::measure);
  CHECK_FALSE(std::filesystem::exists(file));
  {
    const ScopedEnv off("MOONWALK_COST_CACHE", "0");
    (void)chain_costs(net, x, Calibration::cached);
    CHECK_FALSE(std::filesystem::exists(file));
  }
  // Measured costs are positive seconds; estimates scale with the layer.
  const ChainCosts m = chain_costs(net, x, Calibration::measure);
  for (double f : m.forward) CHECK(f > 0);
  const ChainCosts e = chain_costs(net, x, Calibration::estimate);
  CHECK(e.forward[0] > e.forward[1]);  // a 12→20 Linear over a 20-wide tanh
  CHECK(e.backward[0] == 2 * e.forward[0]);
  // Moonwalk's moves: how the sweep crosses each layer, what it keeps, and
  // the times of its cotangent and sweep steps.
  for (std::size_t i = 0; i < net.size(); ++i) {
    INFO("layer " << i);
    CHECK(m.cotangent[i] > 0);
    CHECK(m.sweep[i] > 0);
    CHECK(e.cotangent[i] == e.forward[i]);
    CHECK(e.sweep[i] == 2 * e.forward[i]);
  }
  CHECK(m.crossing == e.crossing);
  CHECK(m.residual_bytes == e.residual_bytes);
  CHECK(e.crossing[0] == CotangentKeep::fragment);    // 12 → 20: J_iᵀ erases 8 directions
  CHECK(e.crossing[2] == CotangentKeep::none);        // 20 → 20
  CHECK(e.crossing[6] == CotangentKeep::none);        // 20 → 3
  CHECK(e.residual_bytes[0] == 0);                    // a Linear's vjp needs nothing but W
  CHECK(e.residual_bytes[1] == 20 * 16 * sizeof(S));  // tanh: σ′
  CHECK(e.fragment_bytes[0] > 0);
  CHECK(e.fragment_bytes[2] == 0);
  // Inverses: timed where the layer has one (tanh; the square Linear), +∞ where not.
  CHECK_FALSE(m.invertible(0));
  CHECK(m.invertible(1));
  CHECK(m.inverse[1] > 0);
  CHECK(m.invertible(2));
  CHECK_FALSE(m.invertible(6));
  CHECK(e.inverse[1] == 2 * e.forward[1]);
  CHECK(c1.inverse == c2.inverse);
}

TEST_CASE("planned by name, with its budget; the plan is made once per shape",
          "[schedules][planned][by_name]") {
  using S = double;
  auto net = parse_network<S>("in:8,linear:8,tanh,linear:8,tanh,linear:8,tanh,linear:8,tanh,linear:2", 3);
  const Matrix<S> x = gaussian<S>(8, 4, 1), t = gaussian<S>(2, 4, 2);
  const auto ref = gradient(Backprop{}, net, x, MSE<S>{}, t);
  const auto [full, least] = budget_range(net, 4, false);
  ScheduleChoice c{.name = "planned", .budget = least, .calibration = Calibration::estimate, .invert = false};
  GradientResult<S> r;
  for (int step = 0; step < 3; ++step) {
    with_schedule(c, net.size(), [&](const auto& s) { gradient_into(s, net, x, MSE<S>{}, t, r); });
    CHECK(r.gradient == ref.gradient);
    CHECK(r.stats.figures.at("budget") == static_cast<double>(least));
    CHECK(r.stats.figures.at("recomputed_forwards") > 0);
  }
  c.budget = full;  // a new budget: planned again
  with_schedule(c, net.size(), [&](const auto& s) { gradient_into(s, net, x, MSE<S>{}, t, r); });
  CHECK(r.stats.figures.at("recomputed_forwards") == 0);
  CHECK(r.gradient == ref.gradient);
  // Another batch on the same workspace: planned for its shapes.
  const Matrix<S> x2 = gaussian<S>(8, 9, 3), t2 = gaussian<S>(2, 9, 4);
  with_schedule(c, net.size(), [&](const auto& s) { gradient_into(s, net, x2, MSE<S>{}, t2, r); });
  CHECK(r.gradient == gradient(Backprop{}, net, x2, MSE<S>{}, t2).gradient);
}

TEST_CASE("planned reverses the bottom of the chain by Moonwalk where that is fastest in the budget",
          "[schedules][planned][moonwalk]") {
  // 24 orthogonal Linear + LeakyReLU(0.5) pairs in double: a LeakyReLU keeps
  // one bit per element, a Linear nothing, and γ stays small (few anchors).
  using S = double;
  std::string spec = "in:32";
  for (int i = 0; i < 24; ++i) spec += ",linear:32,leaky_relu:0.5";
  spec += ",linear:4";
  auto net = parse_network<S>(spec, 7);
  const Index B = 64;
  const Matrix<S> x = gaussian<S>(32, B, 1), t = gaussian<S>(4, B, 2);
  for (const bool h0 : {false, true})
    for (const bool invert : {false, true}) {  // (these layers invert: the planner may prefer that)
      INFO("h_0 " << h0 << ", invert " << invert);
      const auto ref = gradient(Backprop{.input_gradient = h0}, net, x, MSE<S>{}, t);
      const Planned probe{.calibration = Calibration::estimate, .input_gradient = h0, .moonwalk = false};
      const std::size_t least = probe.smallest_budget(net, x), value = 32 * B * sizeof(S);
      std::size_t swept = 0;
      for (const std::size_t budget :
           {least + value / 2, least + value, least + 3 * value, least + 8 * value}) {
        INFO("budget " << budget << " (least " << least << ")");
        const Planned with{
            .budget = budget, .calibration = Calibration::estimate, .input_gradient = h0, .invert = invert};
        Planned without = with;
        without.moonwalk = false;
        without.workspace = detail::new_workspace();
        const auto r = gradient(with, net, x, MSE<S>{}, t);
        const std::size_t scratch = thread_scratch_bytes();  // (as r's step left it)
        const auto k = gradient(without, net, x, MSE<S>{}, t);
        INFO(plan_text(with.plan(net, x)));
        CHECK(r.stats.figures.at("predicted_seconds") <= k.stats.figures.at("predicted_seconds"));
        CHECK(r.stats.within_tolerance);
        CHECK(r.stats.fallbacks == 0);
        CHECK(detail::rel_max_err(r.gradient, ref.gradient) < 1e-10);
        if (h0) CHECK(detail::rel_max_err(r.h0, ref.h0) < 1e-10);
        const double predicted = r.stats.figures.at("predicted_working_bytes");
        INFO("working " << r.stats.working_bytes << ", scratch " << scratch);
        REQUIRE(r.stats.working_bytes >= scratch);
        const double measured = static_cast<double>(r.stats.working_bytes - scratch);
        CHECK(predicted <= static_cast<double>(budget));
        CHECK(std::abs(measured - predicted) <= 0.1 * predicted);
        if (r.stats.figures.count("moonwalk_layers") > 0) {
          ++swept;
          CHECK(r.stats.figures.at("predicted_seconds") < k.stats.figures.at("predicted_seconds"));
          CHECK(r.stats.error_estimate > 0);  // (the sweep's checks)
          CHECK(r.stats.error_estimate < 1e-10);
          CHECK(r.stats.counts.vijp > 0);
        } else if (r.stats.figures.at("inverses") == 0) {
          CHECK(r.gradient == ref.gradient);
        }
      }
      if (!invert) CHECK(swept > 0);
    }
}

TEST_CASE("planned: a budget that failed fails again; a smaller batch stays within the budget",
          "[schedules][planned]") {
  using S = float;
  Network<S> net;
  for (int i = 0; i < 40; ++i) net.add(Linear<S>(64, 64, {.seed = static_cast<std::uint64_t>(i + 1)}));
  const Matrix<S> t64 = gaussian<S>(64, 64, 2), t32 = gaussian<S>(64, 32, 3), t128 = gaussian<S>(64, 128, 4);
  const Planned p{.budget = 120 * 1024, .calibration = Calibration::estimate};
  GradientResult<S> r;
  gradient_into(p, net, gaussian<S>(64, 64, 1), MSE<S>{}, t64, r);
  // A batch too large for the budget throws, and throws again (the plan it
  // tried is not kept).
  for (int attempt = 0; attempt < 2; ++attempt)
    CHECK_THROWS_WITH(gradient_into(p, net, gaussian<S>(64, 128, 1), MSE<S>{}, t128, r),
                      Catch::Contains("smallest budget is"));
  // A smaller batch after a larger one (a partial last batch): the buffers
  // are those of its own plan.
  gradient_into(p, net, gaussian<S>(64, 64, 1), MSE<S>{}, t64, r);
  gradient_into(p, net, gaussian<S>(64, 32, 1), MSE<S>{}, t32, r);
  CHECK(r.stats.working_bytes - thread_scratch_bytes() <= p.budget);
  CHECK(static_cast<double>(r.stats.working_bytes - thread_scratch_bytes()) ==
        r.stats.figures.at("predicted_working_bytes"));
}

TEST_CASE("parse_bytes reads K, M, G suffixes and names the option in its errors", "[tools][bytes]") {
  CHECK(parse_bytes("--budget", "512") == 512);
  CHECK(parse_bytes("--budget", "4k") == 4096);
  CHECK(parse_bytes("--budget", "3M") == 3u << 20);
  CHECK(parse_bytes("--budget", "2G") == std::size_t{2} << 30);
  CHECK_THROWS_WITH(parse_bytes("--budget", "0"), Catch::Contains("--budget: must be > 0"));
  CHECK_THROWS_WITH(parse_bytes("--budget", "12T"), Catch::Contains("unknown suffix"));
  CHECK_THROWS_WITH(parse_bytes("--budget", ""), Catch::Contains("expected a number of bytes"));
  CHECK_THROWS_WITH(parse_bytes("--budget", "99999999999999999999"), Catch::Contains("too large"));
  CHECK_THROWS_WITH(parse_bytes("--budget", "1.5G"), Catch::Contains("'1.5G'"));
}

TEST_CASE("planned on a static Sequential: backprop's gradient at every budget down to the smallest",
          "[schedules][planned]") {
  using S = double;
  Sequential net(Linear<S>(6, 8, {.seed = 1}), Tanh<S>(8), Linear<S>(8, 8, {.seed = 2}), Tanh<S>(8),
                 Linear<S>(8, 8, {.seed = 3}), Tanh<S>(8), Linear<S>(8, 3, {.seed = 4}));
  const Matrix<S> x = gaussian<S>(6, 5, 1), t = gaussian<S>(3, 5, 2);
  const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  const Planned tightest{.calibration = Calibration::estimate, .input_gradient = true, .invert = false};
  const std::size_t least = tightest.smallest_budget(net, x);
  for (const std::size_t budget : {std::size_t{0}, 2 * least, least}) {
    INFO("budget " << budget);
    const auto r = gradient(
        Planned{
            .budget = budget, .calibration = Calibration::estimate, .input_gradient = true, .invert = false},
        net, x, MSE<S>{}, t);
    CHECK(r.gradient == ref.gradient);
    CHECK(r.h0 == ref.h0);
  }
  CHECK(
      gradient(
          Planned{
              .budget = least, .calibration = Calibration::estimate, .input_gradient = true, .invert = false},
          net, x, MSE<S>{}, t)
          .stats.figures.at("recomputed_forwards") > 0);
}

TEST_CASE(
    "planned on a RevNet: it rebuilds by inversion below every store-and-recompute plan's time, "
    "checks the drift, and falls back when it is over the tolerance",
    "[schedules][planned][revnet]") {
  using S = double;
  // 12 additive blocks at width 32, batch 16, a head; inversion is cheap.
  std::string spec = "in:32";
  for (int b = 0; b < 12; ++b) spec += ",coupling:additive:16:tanh:0.5";
  spec += ",linear:4";
  auto net = parse_network<S>(spec, 5);
  const Matrix<S> x = gaussian<S>(32, 16, 1), t = gaussian<S>(4, 16, 2);
  const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  const Planned exact{.calibration = Calibration::estimate, .input_gradient = true, .invert = false};
  const std::size_t least = exact.smallest_budget(net, x);
  const Planned inverting{.budget = least, .calibration = Calibration::estimate, .input_gradient = true};
  const Planned recomputing{
      .budget = least, .calibration = Calibration::estimate, .input_gradient = true, .invert = false};
  const auto r = gradient(inverting, net, x, MSE<S>{}, t);
  const auto k = gradient(recomputing, net, x, MSE<S>{}, t);
  INFO(plan_text(inverting.plan(net, x)));
  CHECK(r.stats.figures.at("inverses") > 0);
  CHECK(r.stats.figures.at("predicted_seconds") < k.stats.figures.at("predicted_seconds"));
  CHECK(r.stats.counts.forward < k.stats.counts.forward);
  CHECK(r.stats.working_bytes - thread_scratch_bytes() <= least);
  CHECK(r.stats.within_tolerance);
  CHECK(r.stats.fallbacks == 0);
  CHECK(r.stats.error_estimate == r.stats.figures.at("max_reconstruction_error"));
  CHECK(r.stats.error_estimate < 1e-12);
  CHECK(detail::rel_max_err(r.gradient, ref.gradient) < 1e-10);
  CHECK(detail::rel_max_err(r.h0, ref.h0) < 1e-10);
  CHECK(k.gradient == ref.gradient);
  REQUIRE(r.stats.error_estimate > 0);
  // A tolerance of one rounding: every stretch's predicted drift c · u · D
  // (D ≥ 1) is over it, so no stretch is planned. The copy shares the
  // inverting schedule's workspace, bound above: the new drift budget binds
  // again.
  Planned predicted = inverting;
  predicted.tolerance = unit_roundoff<S>();
  predicted.drift_calibration = 4;
  const auto p = gradient(predicted, net, x, MSE<S>{}, t);
  CHECK(p.stats.fallbacks == 0);
  CHECK(p.stats.figures.at("inverses") == 0);
  CHECK(p.gradient == ref.gradient);
  // A tolerance below the measured drift and a drift model far too
  // optimistic (c = 1e-6 times what the stretches drifted on the batch's
  // columns): the checks calibrate the model and the step is taken again,
  // within the same budget, by a plan whose stretches it predicts within the
  // tolerance (shorter ones, or none).
  const Planned strict{.budget = least,
                       .calibration = Calibration::estimate,
                       .input_gradient = true,
                       .tolerance = r.stats.error_estimate / 2,
                       .drift_calibration = 1e-6};
  const auto f = gradient(strict, net, x, MSE<S>{}, t);
  INFO("inverses " << f.stats.figures.at("inverses") << ", drift " << f.stats.error_estimate);
  CHECK(f.stats.fallbacks >= 1);
  CHECK(f.stats.figures.at("drift_calibration") > 0);
  CHECK(f.stats.error_estimate <= strict.tolerance);
  CHECK(f.stats.within_tolerance);
  CHECK(f.stats.figures.at("inverses") < r.stats.figures.at("inverses"));
  CHECK(detail::rel_max_err(f.gradient, ref.gradient) < 1e-10);
  CHECK(detail::rel_max_err(f.h0, ref.h0) < 1e-10);
  CHECK(f.stats.working_bytes - thread_scratch_bytes() <= least);
  // The next steps on that shape take the re-planned plan at once.
  GradientResult<S> again;
  for (int step = 0; step < 2; ++step) {
    gradient_into(strict, net, x, MSE<S>{}, t, again);
    CHECK(again.stats.fallbacks == 0);
    CHECK(again.stats.counts.inverse == f.stats.counts.inverse);
    CHECK(again.gradient == f.gradient);
  }
  // Without inversion the plans repeat backprop's arithmetic (the same
  // optimistic model: the checks, not the prediction, rule inversion out).
  const Planned none{.budget = least,
                     .calibration = Calibration::estimate,
                     .input_gradient = true,
                     .tolerance = unit_roundoff<S>() / 4,
                     .drift_calibration = 1e-6};
  const auto e = gradient(none, net, x, MSE<S>{}, t);
  CHECK(e.stats.fallbacks >= 1);
  CHECK(e.stats.figures.at("inverses") == 0);
  CHECK(e.gradient == ref.gradient);
  CHECK(e.h0 == ref.h0);
  CHECK(e.stats.error_estimate == 0);
  CHECK(e.stats.within_tolerance);
}
