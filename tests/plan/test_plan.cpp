// Plans as data (plan/plan.hpp), the planner's dynamic program
// (plan/planner.hpp) against an exhaustive search, and the executor
// (plan/executor.hpp) against reference backprop.
#include <catch2/catch.hpp>
#include <map>
#include <moonwalk/moonwalk.hpp>
#include <queue>
#include <random>
#include <tuple>

#include "support/random_net.hpp"

using namespace moonwalk;
using moonwalk_test::RandomArch;

namespace {

/// The least time of any plan check_plan accepts whose held values (x_0
/// excluded) never exceed `budget`, by Dijkstra over every state (values
/// held, which of them are temporary, where the cotangent is) and every step
/// (forward with either role, the loss, backward). Written without the
/// planner's recurrence. Infinity when none fits.
double exhaustive_optimum(const ChainCosts& c, std::size_t budget) {
  const std::size_t L = c.layers();
  using State =
      std::tuple<unsigned, unsigned, std::size_t>;  // held, temporary (bit i: x_i, i ≥ 1), cotangent
  std::map<State, double> best;
  using Item = std::pair<double, State>;
  std::priority_queue<Item, std::vector<Item>, std::greater<>> q;
  auto bytes = [&](unsigned held) {
    std::size_t b = 0;
    for (std::size_t i = 1; i <= L; ++i)
      if (held >> i & 1U) b += c.value_bytes[i];
    return b;
  };
  auto push = [&](double t, State s) {
    auto it = best.find(s);
    if (it != best.end() && it->second <= t) return;
    best[s] = t;
    q.emplace(t, s);
  };
  push(0, {1U, 0U, L + 1});
  while (!q.empty()) {
    auto [t, s] = q.top();
    q.pop();
    if (best[s] < t) continue;
    auto [held, temp, cot] = s;
    if (cot == 0) return t;
    for (std::size_t i = 0; i < L; ++i) {  // forward(i)
      if (!(held >> i & 1U) || (held >> (i + 1) & 1U) || i + 1 >= cot) continue;
      const unsigned h = held | 1U << (i + 1);
      if (bytes(h) > budget) continue;
      for (int temporary = 0; temporary < 2; ++temporary) {
        unsigned nh = h, nt = temporary ? temp | 1U << (i + 1) : temp;
        if (i > 0 && (temp >> i & 1U)) {
          nh &= ~(1U << i);
          nt &= ~(1U << i);
        }
        push(t + c.forward[i], {nh, nt, cot});
      }
    }
    auto freed = [&](std::size_t i) {
      return std::pair{i > 0 ? held & ~(1U << i) : held, temp & ~(1U << i)};
    };
    if (cot == L + 1 && (held >> L & 1U)) {
      auto [nh, nt] = freed(L);
      push(t + c.loss, {nh, nt, L});
    }
    if (cot <= L && cot > 0 && (held >> (cot - 1) & 1U)) {
      auto [nh, nt] = freed(cot - 1);
      push(t + c.backward[cot - 1], {nh, nt, cot - 1});
    }
  }
  return std::numeric_limits<double>::infinity();
}

ChainCosts random_chain(std::mt19937_64& rng, std::size_t L) {
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  ChainCosts c;
  for (std::size_t i = 0; i <= L; ++i) c.value_bytes.push_back(static_cast<std::size_t>(pick(1, 4)));
  for (std::size_t i = 0; i < L; ++i) {
    c.forward.push_back(pick(1, 5));
    c.backward.push_back(pick(1, 9));
  }
  c.loss = pick(0, 2);
  return c;
}

PlanFigures figures(const Plan& p, const ChainCosts& c) {
  return check_plan(p, c.value_bytes, c.forward, c.backward, c.loss);
}

}  // namespace

TEST_CASE("check_plan accepts the generators' plans and names the first wrong step", "[plan]") {
  for (std::size_t L = 1; L <= 12; ++L) {
    INFO("L = " << L);
    std::vector<std::size_t> bytes(L + 1, 10);
    const PlanFigures bp = check_plan(backprop_plan(L), bytes);
    CHECK(bp.forward_steps == L);
    CHECK(bp.peak_held_bytes == 10 * L);
    CHECK(bp.peak_kept_bytes == 10 * L);  // x_0 … x_{L−1} (x_L is the loss's operand)
    for (std::size_t k = 1; k <= L; ++k) {
      const PlanFigures ek = check_plan(every_k_plan(L, k), bytes);
      CHECK(ek.forward_steps == L + (L - (L + k - 1) / k));  // every input not a checkpoint, once more
      CHECK(ek.peak_checkpoints == (L + k - 1) / k);
    }
    for (std::size_t c = 1; c <= 4; ++c) {
      const PlanFigures bi = check_plan(binomial_plan(L, c), bytes);
      CHECK(bi.forward_steps == detail::revolve_forward_steps(L, c) + 1);
      CHECK(bi.peak_checkpoints <= c);
    }
  }
  const Plan good = backprop_plan(3);
  auto refused = [&](Plan p, const char* why) {
    p.origin = "test";
    CHECK_THROWS_WITH(check_plan(p), Catch::Contains("plan (test, 3 layers)") && Catch::Contains(why));
  };
  Plan p = good;
  p.steps.erase(p.steps.begin() + 1);  // forward(2) reads x_2, never computed
  refused(p, "step 1: forward(2) reads x_2, which is not held");
  p = good;
  std::swap(p.steps[4], p.steps[5]);  // backward(1) before backward(2)
  refused(p, "step 4: backward(1) needs h_2; the cotangent is h_3");
  p = good;
  p.steps.insert(p.steps.begin() + 4, PlanStep{PlanOp::loss, 3});
  refused(p, "a second loss");
  p = good;
  p.steps[1].output = ValueRole::temporary;  // x_2 freed by forward(2): backward(2) cannot read it
  refused(p, "backward(2) reads x_2, which is not held");
  p = good;
  p.steps.pop_back();
  refused(p, "ends at h_1, not h_0");
  p = good;
  p.steps.insert(p.steps.begin() + 3, PlanStep{PlanOp::forward, 0, ValueRole::temporary});
  refused(p, "writes x_1, which is held");
  p = good;
  p.steps[2].output = ValueRole::activation;  // x_3 = x_L: the loss's operand, never an activation
  refused(p, "x_3 is read by the loss alone");
  CHECK_THROWS_AS(check_plan(good, {1, 2}), ScheduleError);  // 2 value sizes for 4 values
  CHECK_THROWS_AS(every_k_plan(0, 2), ScheduleError);
  CHECK_THROWS_AS(binomial_plan(4, 0), ScheduleError);
}

TEST_CASE("The planner's dynamic program finds the exhaustive optimum on small chains", "[plan][planner]") {
  std::mt19937_64 rng(7);
  int compared = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const std::size_t L = 1 + static_cast<std::size_t>(trial % 6);
    const ChainCosts c = random_chain(rng, L);
    const std::size_t least = least_held_bytes(c);
    std::size_t total = 0;
    for (std::size_t i = 1; i <= L; ++i) total += c.value_bytes[i];
    CHECK_THROWS_WITH(plan_within(c, least - 1), Catch::Contains(detail::cat("the least is ", least)));
    for (std::size_t budget = least; budget <= total + 1; ++budget) {
      const Plan p = plan_within(c, budget);
      INFO("trial " << trial << ", budget " << budget << "\n" << plan_text(p));
      const PlanFigures f = figures(p, c);
      CHECK(f.peak_held_bytes <= budget);
      CHECK(f.seconds == Approx(exhaustive_optimum(c, budget)).epsilon(1e-9));
      ++compared;
    }
    // Unlimited: backprop's plan, step for step, roles included.
    CHECK(plan_within(c, total).steps == backprop_plan(L).steps);
    CHECK(plan_within(c, total).input_role == ValueRole::activation);
  }
  CHECK(compared > 300);
}

TEST_CASE("The planner on longer chains: within budget, never slower than binomial checkpointing",
          "[plan][planner]") {
  // Equal sizes and times: the planner's forward steps at c slots' memory
  // are at most Griewank's minimum (it may hold operands binomial does not).
  for (const std::size_t L : {8U, 20U, 40U}) {
    ChainCosts c;
    c.value_bytes.assign(L + 1, 1000);
    c.forward.assign(L, 1.0);
    c.backward.assign(L, 2.0);
    for (std::size_t slots = 2; slots <= 6; ++slots) {
      const Plan bin = binomial_plan(L, slots);
      const PlanFigures fb = figures(bin, c);
      const Plan p = plan_within(c, fb.peak_held_bytes);
      const PlanFigures fp = figures(p, c);
      INFO("L = " << L << ", slots = " << slots);
      CHECK(fp.peak_held_bytes <= fb.peak_held_bytes);
      CHECK(fp.forward_steps <= fb.forward_steps);
    }
  }
  SECTION("heterogeneous: a wide value is not kept when narrow ones serve") {
    ChainCosts c;
    c.value_bytes = {8, 8, 64, 8, 8, 8};
    c.forward = {1, 1, 1, 1, 1};
    c.backward = {2, 2, 2, 2, 2};
    const Plan p = plan_within(c, 64 + 8 + 8);  // x_2 and its neighbour, and one more narrow value
    const PlanFigures f = figures(p, c);
    CHECK(f.peak_held_bytes <= 80);
    CHECK(f.seconds == Approx(exhaustive_optimum(c, 80)));
  }
}

TEMPLATE_TEST_CASE("The executor runs any plan: backprop's gradient, bit for bit, on 50 random architectures",
                   "[plan][executor][property]", double, float) {
  using S = TestType;
  for (std::uint64_t seed = 3001; seed < 3051; ++seed) {
    const RandomArch a(seed);
    std::string desc;
    Network<S> net = a.build<S>(&desc);
    INFO(desc);
    const Matrix<S> x = moonwalk_test::random_batch<S>(a.in, a.batch, seed + 1);
    const Matrix<S> t = moonwalk_test::random_batch<S>(a.out, a.batch, seed + 2);
    const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
    const std::vector<Index> rows = value_rows(net);
    ChainCosts c;
    for (Index r : rows) c.value_bytes.push_back(static_cast<std::size_t>(r * a.batch) * sizeof(S));
    c.forward.assign(net.size(), 1.0);
    c.backward.assign(net.size(), 2.0);
    std::size_t total = 0;
    for (std::size_t i = 1; i < c.value_bytes.size(); ++i) total += c.value_bytes[i];
    const std::size_t least = least_held_bytes(c);
    for (const std::size_t budget : {least, (least + total) / 2, total}) {
      PlanRun<S> run;
      run.bind(plan_within(c, budget), rows, a.batch, true);
      INFO("budget " << budget << "\n" << plan_text(run.plan()));
      GradientResult<S> out;
      zero_gradients(net);
      run.run(net, x, MSE<S>{}, t, out);
      gradients_into(net, out.gradient);
      CHECK(out.gradient == ref.gradient);
      CHECK(out.h0 == ref.h0);
      CHECK(out.loss == ref.loss);
      CHECK(out.stats.counts.forward == run.plan().forward_steps());
      CHECK(out.stats.counts.vjp == net.size());
      // The stacked layout: the arena is exactly the plan's peak of held values.
      const PlanFigures f = check_plan(run.plan(), c.value_bytes);
      CHECK(run.value_bytes() == f.peak_held_bytes);
      CHECK(out.stats.residual_bytes == f.peak_kept_bytes);
      CHECK(out.stats.working_bytes == run.storage_bytes() + thread_scratch_bytes());
      CHECK(run.storage_bytes() == run.working_bytes());
      // A second step on the bound plan: the same result.
      GradientResult<S> again;
      zero_gradients(net);
      run.run(net, x, MSE<S>{}, t, again);
      gradients_into(net, again.gradient);
      CHECK(again.gradient == ref.gradient);
    }
  }
}
