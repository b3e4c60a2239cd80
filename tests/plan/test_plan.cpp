// Plans as data (plan/plan.hpp), the planner's dynamic program
// (plan/planner.hpp) against an exhaustive search, and the executor
// (plan/executor.hpp) against reference backprop.
#include <catch2/catch.hpp>
#include <map>
#include <moonwalk/moonwalk.hpp>
#include <moonwalk/plan/report.hpp>
#include <queue>
#include <random>
#include <tuple>

#include "support/random_net.hpp"
#include "support/revnets.hpp"

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

/// exhaustive_optimum with inversion: every plan check_plan accepts on a
/// chain whose layers may have inverses and branch bits — forward (either
/// role; keeping its layer's bits or not; a check onto a rebuilt value),
/// inverse, the loss, backward — whose checks read a value held since the
/// stretch's first inverse step (the planner's family: a stretch is checked
/// from the start of its segment, plan/planner.hpp), by Dijkstra over (held,
/// temporary, rebuilt, bits kept, held since the stretch began, cotangent).
/// Written from check_plan's rules, not the planner's recurrence.
double exhaustive_with_inverse(const ChainCosts& c, std::size_t budget) {
  const std::size_t L = c.layers();
  using State = std::tuple<unsigned, unsigned, unsigned, unsigned, unsigned, std::size_t>;
  std::map<State, double> best;
  using Item = std::pair<double, State>;
  std::priority_queue<Item, std::vector<Item>, std::greater<>> q;
  auto bytes = [&](unsigned held, unsigned bits) {
    std::size_t b = 0;
    for (std::size_t i = 1; i <= L; ++i)
      if (held >> i & 1U) b += c.value_bytes[i];
    for (std::size_t i = 0; i < L; ++i)
      if (bits >> i & 1U) b += c.branches(i);
    return b;
  };
  auto push = [&](double t, State s) {
    auto it = best.find(s);
    if (it != best.end() && it->second <= t) return;
    best[s] = t;
    q.emplace(t, s);
  };
  push(0, {1U, 0U, 0U, 0U, 0U, L + 1});
  while (!q.empty()) {
    auto [t, s] = q.top();
    q.pop();
    if (best[s] < t) continue;
    auto [held, temp, reb, bits, since, cot] = s;
    if (cot == 0) return t;
    auto has = [](unsigned set, std::size_t i) { return (set >> i & 1U) != 0; };
    for (std::size_t i = 0; i < L; ++i) {  // forward(i)
      if (!has(held, i) || has(reb, i) || i + 1 >= cot) continue;
      const bool check = has(held, i + 1) && has(reb, i + 1);
      if (has(held, i + 1) && !check) continue;
      if (check && !has(since, i)) continue;
      for (int keep_bits = 0; keep_bits < 2; ++keep_bits) {
        if (keep_bits && c.branches(i) == 0) continue;
        const unsigned nb = keep_bits ? bits | 1U << i : bits;
        const unsigned h = held | 1U << (i + 1);
        const std::size_t extra = check ? c.value_bytes[i + 1] : 0;
        if (bytes(h, nb) + extra > budget) continue;
        for (int temporary = 0; temporary < (check ? 1 : 2); ++temporary) {
          unsigned nh = h, nt = temporary ? temp | 1U << (i + 1) : temp & ~(1U << (i + 1));
          const unsigned nr = reb & ~(1U << (i + 1));
          if (i > 0 && has(temp, i)) {
            nh &= ~(1U << i);
            nt &= ~(1U << i);
          }
          push(t + c.forward[i], {nh, nt, nr, nb, since & nh & ~(1U << (i + 1)), cot});
        }
      }
    }
    for (std::size_t i = 0; i < L; ++i) {  // inverse(i)
      if (!c.invertible(i) || !has(held, i + 1) || has(held, i)) continue;
      if (!(i + 1 == L ? cot == L + 1 : cot == i + 2)) continue;
      const unsigned nh = held | 1U << i;
      if (bytes(nh, bits) > budget) continue;
      // (the stretch's first inverse: the values held now may check it)
      const unsigned ns = has(reb, i + 1) ? since : held & ~(1U << (i + 1));
      push(t + c.inverse[i], {nh, temp & ~(1U << i), reb | 1U << i, bits, ns, cot});
    }
    if (cot == L + 1 && has(held, L))
      push(t + c.loss, {held & ~(1U << L), temp & ~(1U << L), reb, bits, since & ~(1U << L), L});
    if (cot <= L && cot > 0 && has(held, cot - 1)) {
      const std::size_t j = cot - 1;
      bool ok = true;
      if (has(reb, j))
        ok = j > 0 && has(held, j - 1) && has(reb, j - 1) && (c.branches(j) == 0 || has(bits, j));
      if (ok)
        push(t + c.backward[j], {j > 0 ? held & ~(1U << j) : held, temp & ~(1U << j), reb & ~(1U << j),
                                 bits & ~(1U << j), j > 0 ? since & ~(1U << j) : since, j});
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

/// random_chain whose layers have inverses (most of them, timed 1..5) and,
/// some of them, branch bits (0..2 bytes).
ChainCosts random_invertible_chain(std::mt19937_64& rng, std::size_t L) {
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  ChainCosts c = random_chain(rng, L);
  for (std::size_t i = 0; i < L; ++i) {
    c.inverse.push_back(pick(0, 4) == 0 ? std::numeric_limits<double>::infinity() : 0.5 * pick(1, 3));
    c.branch_bytes.push_back(static_cast<std::size_t>(pick(0, 3) == 0 ? pick(1, 2) : 0));
  }
  return c;
}

PlanFigures figures(const Plan& p, const ChainCosts& c) { return check_plan(p, c); }

/// RevBackprop's plan: forward keeping nothing, then x_{i−1} rebuilt by
/// inversion right before each backward step, checked at x_1 from x_0.
/// How the sweep crosses each layer of `net` (its sweep mode), as a cotangent step keeps it.
template <class N>
std::vector<CotangentKeep> crossings(N& net) {
  std::vector<CotangentKeep> keep;
  for (const SweepMode m : detail::sweep_modes(net))
    keep.push_back(m == SweepMode::vijp       ? CotangentKeep::none
                   : m == SweepMode::fragment ? CotangentKeep::fragment
                                              : CotangentKeep::anchor);
  return keep;
}

Plan rebuild_all_plan(std::size_t L) {
  Plan p{.layers = L, .input_role = ValueRole::checkpoint, .steps = {}, .origin = "rebuild"};
  for (std::size_t i = 0; i < L; ++i)
    p.steps.push_back({PlanOp::forward, i, i + 1 == L ? ValueRole::operand : ValueRole::temporary});
  for (std::size_t j = L; j >= 2; --j) {
    p.steps.push_back({PlanOp::inverse, j - 1, ValueRole::rebuilt});
    p.steps.push_back(j == L ? PlanStep{PlanOp::loss, L} : PlanStep{PlanOp::backward, j});
  }
  p.steps.push_back({PlanOp::forward, 0, ValueRole::operand});
  if (L == 1) p.steps.pop_back(), p.steps.push_back({PlanOp::loss, 1});
  if (L > 1) p.steps.push_back({PlanOp::backward, 1});
  p.steps.push_back({PlanOp::backward, 0});
  return p;
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

TEST_CASE("check_plan: inverse steps, checks and branch bits", "[plan]") {
  const std::size_t L = 4;
  std::vector<std::size_t> bytes(L + 1, 10);
  const Plan p = rebuild_all_plan(L);
  INFO(plan_text(p));
  const PlanFigures f = check_plan(p, bytes);
  CHECK(f.inverse_steps == L - 1);
  CHECK(f.checks == 1);
  CHECK(f.forward_steps == L + 1);
  CHECK(f.peak_held_bytes == 20);  // two values at a time (a check: the exact one beside the rebuilt one)
  auto refused = [&](const Plan& bad, const ChainCosts& c, const char* why) {
    CHECK_THROWS_WITH(check_plan(bad, c), Catch::Contains(why));
  };
  const ChainCosts plain{
      .value_bytes = bytes, .forward = {}, .backward = {}, .loss = 0, .inverse = {}, .branch_bytes = {}};
  // inverse(0) right before backward(1) frees x_1: a check at x_0, x̂_0 beside the caller's x_0.
  Plan q = p;
  q.steps.insert(q.steps.end() - 2, PlanStep{PlanOp::inverse, 0, ValueRole::rebuilt});
  const PlanFigures fq = check_plan(q, plain);
  CHECK(fq.checks == 2);
  CHECK(fq.inverse_steps == L);
  CHECK(fq.peak_held_bytes == 20);  // x_1 and x̂_0 (x_0 is the caller's)
  q = p;
  q.steps.insert(q.steps.end() - 1, PlanStep{PlanOp::inverse, 0, ValueRole::rebuilt});
  refused(q, plain, "inverse(0) reads x_1, which is not held");
  // No check: x_1 is rebuilt by inverse(1) and read by backward(1).
  q = p;
  q.steps.erase(q.steps.end() - 3);  // the check
  refused(q, plain, "backward(1) reads x_1, rebuilt by inversion, and no inverse below it leads to a check");
  // ... but the check at x_0 checks it: inverse(0) right before backward(1).
  q = p;
  q.steps[q.steps.size() - 3] = PlanStep{PlanOp::inverse, 0, ValueRole::rebuilt};
  const PlanFigures f0 = check_plan(q, plain);
  CHECK(f0.checks == 1);
  CHECK(f0.inverse_steps == L);
  // An inverse not right before the backward step that frees its source.
  q = p;
  q.steps.insert(q.steps.begin() + L + 1,
                 PlanStep{PlanOp::inverse, 2, ValueRole::rebuilt});  // before the loss
  refused(q, plain, "inverse(2) runs right before backward(3)");
  // A layer without an inverse.
  ChainCosts c = plain;
  c.inverse.assign(L, 1.0);
  c.inverse[2] = std::numeric_limits<double>::infinity();
  refused(p, c, "inverse(2): layer 2 has no inverse");
  // A layer with branch bits read from a rebuilt input without them; kept, they count.
  c.inverse[2] = 1.0;
  c.branch_bytes = {0, 0, 4, 0};
  refused(p, c, "backward(2) reads x_2, rebuilt by inversion, without layer 2's branch bits");
  // So do Moonwalk's cotangent steps (a LeakyReLU's rebuilt ±1e-17 for an exact 0).
  const std::vector<CotangentKeep> none(L, CotangentKeep::none);
  refused(moonwalk_plan(none, L, false, std::vector<bool>(L, true), std::vector<bool>(L, false)), c,
          "cotangent(2) reads x_2, rebuilt by inversion, without layer 2's branch bits");
  CHECK_NOTHROW(
      check_plan(moonwalk_plan(none, L, false, std::vector<bool>(L, true), {false, false, true, false}), c));
  q = p;
  q.steps[2].residual = true;
  const PlanFigures fb = check_plan(q, c);
  CHECK(fb.peak_held_bytes == 24);
  CHECK(fb.peak_kept_bytes == 10 + 4);  // x_0 (a checkpoint) and the bits
  q.steps[1].residual = true;
  refused(q, c, "layer 1's residual, kept by a forward step, is read by no step");  // (x_1 is checked: exact)
  // A forward step from a rebuilt value.
  q = p;
  q.steps.insert(q.steps.begin() + L + 1, PlanStep{PlanOp::forward, 3, ValueRole::operand});
  refused(q, plain, "forward(3) reads x_3, rebuilt by inversion");
}

TEST_CASE("RevBackprop's plan: inputs kept where layers have no inverse, every stretch checked", "[plan]") {
  std::mt19937_64 rng(3);
  auto coin = [&] { return std::uniform_int_distribution<int>(0, 2)(rng) > 0; };
  int checks = 0, bits = 0;
  for (int trial = 0; trial < 300; ++trial) {
    const std::size_t L = 1 + static_cast<std::size_t>(trial % 9);
    std::vector<bool> inv(L), br(L);
    ChainCosts c = random_chain(rng, L);
    for (std::size_t i = 0; i < L; ++i) {
      inv[i] = coin();
      br[i] = inv[i] && !coin();
      c.inverse.push_back(inv[i] ? 1.0 : std::numeric_limits<double>::infinity());
      c.branch_bytes.push_back(br[i] ? 1 : 0);
    }
    const Plan p = revbackprop_plan(inv, br);
    INFO("trial " << trial << "\n" << plan_text(p));
    const PlanFigures f = check_plan(p, c);  // (rebuilt values read only checked or with their bits)
    std::size_t rebuilt = 0, kept = 0;
    for (std::size_t i = 1; i < L; ++i) {
      rebuilt += inv[i];
      if (!inv[i]) kept += c.value_bytes[i];
    }
    std::size_t bit_bytes = 0;
    for (const PlanStep& s : p.steps) bit_bytes += s.residual ? c.branches(s.layer) : 0;
    CHECK(f.inverse_steps == rebuilt);
    CHECK(f.forward_steps == L + f.checks);
    CHECK(f.peak_kept_bytes == kept + bit_bytes);  // nothing but the kept inputs and the bits
    checks += static_cast<int>(f.checks);
    bits += bit_bytes > 0;
    // Nothing to invert: backprop's steps.
    if (rebuilt == 0) CHECK(p.steps == backprop_plan(L).steps);
  }
  CHECK(checks > 100);
  CHECK(bits > 50);
  CHECK_THROWS_WITH(revbackprop_plan({true, true}, {true}), Catch::Contains("1 branch flags for 2 layers"));
}

TEST_CASE("The planner with inversion finds the exhaustive optimum on small chains", "[plan][planner]") {
  std::mt19937_64 rng(11);
  int compared = 0, inverting = 0;
  for (int trial = 0; trial < 60; ++trial) {
    const std::size_t L = 2 + static_cast<std::size_t>(trial % 5);
    const ChainCosts c = random_invertible_chain(rng, L);
    const std::size_t least = least_held_bytes(c);
    std::size_t total = 0;
    for (std::size_t i = 1; i <= L; ++i) total += c.value_bytes[i];
    for (std::size_t budget = least; budget <= total + 1; ++budget) {
      const Plan p = plan_within(c, budget);
      INFO("trial " << trial << ", budget " << budget << "\n" << plan_text(p));
      const PlanFigures f = figures(p, c);
      CHECK(f.peak_held_bytes <= budget);
      CHECK(f.seconds == Approx(exhaustive_with_inverse(c, budget)).epsilon(1e-9));
      inverting += f.inverse_steps > 0;
      ++compared;
    }
    // Without inverses, the search is the one without inversion.
    ChainCosts none = c;
    none.inverse.clear();
    none.branch_bytes.clear();
    CHECK(exhaustive_with_inverse(none, least) == Approx(exhaustive_optimum(none, least)).epsilon(1e-12));
  }
  CHECK(compared > 300);
  CHECK(inverting > 20);  // (the comparison covers plans that invert)
}

TEST_CASE("The planner rebuilds only stretches whose predicted drift holds the budget", "[plan][planner]") {
  std::mt19937_64 rng(17);
  auto uniform = [&](double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); };
  int limited = 0, inverting = 0;
  for (int trial = 0; trial < 80; ++trial) {
    const std::size_t L = 3 + static_cast<std::size_t>(trial % 10);
    ChainCosts c = random_invertible_chain(rng, L);
    // Even trials: the γ model; odd ones: drifts measured (in units of 0.5,
    // each top's list cut at a random length: +∞ beyond).
    const bool measured = trial % 2 == 1;
    if (measured) {
      c.measured.unit = 0.5;
      c.measured.first.assign(L + 2, 0);
      for (std::size_t k = 0; k <= L; ++k) {
        const std::size_t n = k < 2 ? 0 : static_cast<std::size_t>(uniform(0, static_cast<double>(k)));
        for (std::size_t e = 0; e < std::min(n, k - 1); ++e)
          c.measured.drift.push_back(static_cast<float>(uniform(0, 12)));
        c.measured.first[k + 1] = c.measured.drift.size();
      }
    } else {
      for (std::size_t i = 0; i < L; ++i) c.inverse_gamma.push_back(uniform(1, 4));
    }
    c.drift_budget = uniform(1, 30);
    ChainCosts unlimited = c;
    unlimited.drift_budget = std::numeric_limits<double>::infinity();
    ChainCosts none = c;
    none.inverse.clear();
    none.branch_bytes.clear();
    const std::size_t least = least_held_bytes(c);
    std::size_t total = 0;
    for (std::size_t i = 1; i <= L; ++i) total += c.value_bytes[i];
    for (std::size_t budget = least; budget <= total + 1; budget += 1 + total / 8) {
      const Plan p = plan_within(c, budget);
      INFO("trial " << trial << ", budget " << budget << ", drift budget " << c.drift_budget << "\n"
                    << plan_text(p));
      const PlanFigures f = figures(p, c);
      CHECK(f.peak_held_bytes <= budget);
      // Every stretch: inverse(i) from a value not itself rebuilt starts one;
      // D = Σ_{t=lo..hi} Π_{l=lo..t} γ_l over its layers lo … hi.
      std::vector<bool> rebuilt(L + 1, false);
      std::vector<std::pair<std::size_t, std::size_t>> stretches;  // (lo, hi)
      for (const PlanStep& st : p.steps) {
        if (st.op == PlanOp::forward) rebuilt[st.layer + 1] = false;
        if (st.op != PlanOp::inverse) continue;
        if (rebuilt[st.layer + 1] && !stretches.empty() && stretches.back().first == st.layer + 1)
          stretches.back().first = st.layer;
        else
          stretches.emplace_back(st.layer, st.layer);
        rebuilt[st.layer] = true;
      }
      for (auto [lo, hi] : stretches) {
        double prod = 1, d = 0;
        for (std::size_t t = lo; t <= hi; ++t) {
          prod *= c.gamma(t);
          d += prod;
        }
        // Measured: the drift of x̂_lo rebuilt from x_{hi+1}, in units,
        // and at least one unit per inverse.
        if (measured) d = std::max(c.measured.at(lo - 1, hi + 1) / 0.5, static_cast<double>(hi - lo + 1));
        CHECK(d <= c.drift_budget);
      }
      inverting += f.inverse_steps > 0;
      // The limit costs time, never saves it, and no limit at all is the unlimited plan's.
      const PlanFigures free_f = figures(plan_within(unlimited, budget), unlimited);
      CHECK(free_f.seconds <= f.seconds * (1 + 1e-9));
      limited += free_f.seconds < f.seconds * (1 - 1e-9);
      // A budget below every single layer's γ allows no stretch: the plan without inversion.
      ChainCosts tight = c;
      tight.drift_budget = 0.5;
      const Plan q = plan_within(tight, budget);
      CHECK(figures(q, tight).inverse_steps == 0);
      CHECK(figures(q, tight).seconds ==
            Approx(figures(plan_within(none, budget), none).seconds).epsilon(1e-9));
    }
  }
  CHECK(inverting > 20);  // (stretches were checked)
  CHECK(limited > 5);     // (the limit changed some plans)
  ChainCosts bad = random_invertible_chain(rng, 4);
  bad.inverse_gamma = {1, 2};
  CHECK_THROWS_WITH(bad.check(), Catch::Contains("2 inverse amplifications for 4 layers"));
  bad.inverse_gamma.clear();
  bad.measured = {.first = {0, 0, 0, 1}, .drift = {1}, .unit = 1};
  CHECK_THROWS_WITH(bad.check(), Catch::Contains("measured drifts for 4 - 2 layers (need 4)"));
}

TEST_CASE("The plan report: per-layer fates, bytes and times that add up to the plan's figures",
          "[plan][report]") {
  std::mt19937_64 rng(5);
  // Backprop: every input kept once; at backward(i) x_1 … x_i are held.
  const ChainCosts c = random_chain(rng, 7);
  const PlanReport b = plan_report(backprop_plan(7), c);
  std::size_t held = 0;
  for (std::size_t i = 0; i < 7; ++i) {
    const LayerPlan& r = b.rows[i];
    CHECK(r.input == InputFate::kept);
    CHECK(r.forwards == 1);
    CHECK(r.inverses == 0);
    if (i > 0) held += c.value_bytes[i];
    CHECK(r.working_bytes == held);
    CHECK(r.kept_bytes == c.value_bytes[i]);
    CHECK(r.seconds == Approx(c.forward[i] + c.backward[i]));
  }
  // Every-3 checkpointing: x_0, x_3, x_6 checkpoints, the rest recomputed once.
  const PlanReport e = plan_report(every_k_plan(7, 3), c);
  std::string fates;
  for (const LayerPlan& r : e.rows) fates += std::string(to_string(r.input)) + " ";
  CHECK(fates == "checkpoint recomputed recomputed checkpoint recomputed recomputed checkpoint ");
  CHECK(e.rows[1].kept_bytes == c.value_bytes[1]);  // (held as an activation once recomputed)
  CHECK(e.rows[1].forwards == 2);

  // Random chains with inverses, planned at every budget: the rows add up to the figures.
  int rebuilt_rows = 0;
  for (int trial = 0; trial < 40; ++trial) {
    const std::size_t L = 2 + static_cast<std::size_t>(trial % 7);
    const ChainCosts ci = random_invertible_chain(rng, L);
    std::size_t total = 0;
    for (std::size_t i = 1; i <= L; ++i) total += ci.value_bytes[i];
    for (std::size_t budget = least_held_bytes(ci); budget <= total; ++budget) {
      const Plan p = plan_within(ci, budget);
      const PlanReport r = plan_report(p, ci);
      INFO("trial " << trial << ", budget " << budget << "\n" << plan_text(p) << plan_report_text(r));
      double seconds = r.loss_seconds;
      std::size_t forwards = 0, inverses = 0, checks = 0;
      for (const LayerPlan& row : r.rows) {
        seconds += row.seconds;
        forwards += row.forwards;
        inverses += row.inverses;
        checks += row.checked;
        CHECK(row.working_bytes <= r.figures.peak_held_bytes);
        CHECK(row.forwards >= 1);
        CHECK((row.inverses > 0) == (row.input == InputFate::rebuilt));
        if (row.input == InputFate::rebuilt) {
          ++rebuilt_rows;
          CHECK(row.kept_bytes == (row.residual ? ci.branches(row.layer) : 0));
          // (A checked input is exact again when its backward step reads it.)
          if (!row.checked) CHECK((row.residual || ci.branches(row.layer) == 0));
        }
      }
      CHECK(seconds == Approx(r.figures.seconds).epsilon(1e-12));
      CHECK(forwards == r.figures.forward_steps);
      CHECK(inverses == r.figures.inverse_steps);
      CHECK(checks == r.figures.checks);
      const std::string json = plan_report_json(r);
      CHECK(std::count(json.begin(), json.end(), '{') == static_cast<long>(L) + 1);
      CHECK(json.find("\"inverse_steps\":" + std::to_string(inverses)) != std::string::npos);
    }
  }
  CHECK(rebuilt_rows > 20);
  CHECK_THROWS_WITH(plan_report(backprop_plan(3), random_chain(rng, 3), {"a", "b"}),
                    Catch::Contains("2 layer names for 3 layers"));
}

namespace {

/// The Moonwalk-rooted plans of every top t (layers 0 … t−1 by Moonwalk,
/// the program's best plan of layers t … L−1 within what is left above
/// them), each checked on `c`: the least time of those whose values, with
/// every residual and keep beside them, fit `budget` (+∞: none), by brute
/// force over t.
double best_moonwalk_root(const ChainCosts& c, std::size_t budget, const MoonwalkMove& mw) {
  const std::size_t L = c.layers(), s0 = mw.input_gradient ? 0 : 1;
  double best = std::numeric_limits<double>::infinity();
  for (std::size_t t = s0 + 1; t <= L; ++t) {
    // The keeps: the layers' crossings, the anchor at t − 1, the policy's anchors walking down.
    std::vector<CotangentKeep> keep(L, CotangentKeep::none);
    detail::AnchorPlanner anchors(mw.anchor_budget);
    for (std::size_t j = t; j-- > s0;) {
      keep[j] = j + 1 == t && t < L  ? CotangentKeep::anchor
                : c.crossing.empty() ? CotangentKeep::none
                                     : c.crossing[j];
      if (keep[j] == CotangentKeep::anchor)
        anchors.restart();
      else if (anchors.place(c.sweep_gamma.empty() ? 1.0 : c.sweep_gamma[j]))
        keep[j] = CotangentKeep::anchor;
    }
    // Residuals and keeps, counted through the run (as the executor holds their buffers).
    std::size_t held = 0;
    for (std::size_t j = s0; j < t; ++j)
      held += c.residual(j) + (keep[j] == CotangentKeep::anchor     ? c.value_bytes[j + 1]
                               : keep[j] == CotangentKeep::fragment ? c.fragment(j)
                                                                    : 0);
    Plan p{.layers = L, .input_role = ValueRole::temporary, .steps = {}, .origin = "brute force"};
    for (std::size_t i = 0; i < t; ++i)
      p.steps.push_back({PlanOp::forward, i,
                         i + 1 < t ? ValueRole::temporary
                         : t < L   ? ValueRole::checkpoint
                                   : ValueRole::operand,
                         i >= s0, CotangentKeep::none});
    if (t < L) {
      ChainCosts above;  // layers t … L−1, x_t its input
      above.value_bytes.assign(c.value_bytes.begin() + static_cast<std::ptrdiff_t>(t), c.value_bytes.end());
      above.forward.assign(c.forward.begin() + static_cast<std::ptrdiff_t>(t), c.forward.end());
      above.backward.assign(c.backward.begin() + static_cast<std::ptrdiff_t>(t), c.backward.end());
      above.loss = c.loss;
      if (budget < c.value_bytes[t] + held) continue;
      const std::size_t free = budget - c.value_bytes[t] - held;
      if (free < least_held_bytes(above)) continue;
      for (PlanStep st : plan_within(above, free).steps) {
        st.layer += t;
        p.steps.push_back(st);
      }
    } else {
      p.steps.push_back({PlanOp::loss, L});
    }
    for (std::size_t j = t; j-- > s0;)
      p.steps.push_back({PlanOp::cotangent, j, ValueRole::temporary, false, keep[j]});
    for (std::size_t i = 0; i < t; ++i) {
      p.steps.push_back({PlanOp::sweep, i});
      if (i + 1 < t || t == L)
        p.steps.push_back({PlanOp::forward, i,
                           i + 1 == L || (i + 2 == t && t < L) ? ValueRole::operand : ValueRole::temporary});
    }
    if (t == L) p.steps.push_back({PlanOp::loss, L});
    const PlanFigures f = check_plan(p, c);
    if (f.peak_value_bytes + held <= budget) best = std::min(best, f.seconds);
  }
  return best;
}

}  // namespace

TEST_CASE("The planner reverses the bottom of the chain by Moonwalk where that is fastest in the budget",
          "[plan][planner][moonwalk]") {
  const std::size_t L = 12;
  ChainCosts c;
  c.value_bytes.assign(L + 1, 10);
  c.forward.assign(L, 1);
  c.backward.assign(L, 2);
  c.loss = 0.5;
  c.residual_bytes.assign(L, 1);
  c.fragment_bytes.assign(L, 0);
  c.crossing.assign(L, CotangentKeep::none);
  c.cotangent.assign(L, 0.5);
  c.sweep.assign(L, 1);
  std::size_t chosen = 0, declined = 0;
  for (int variant = 0; variant < 4; ++variant) {
    MoonwalkMove mw{.enabled = true, .input_gradient = variant % 2 == 1, .anchor_budget = 0};
    if (variant >= 2) {  // anchors: by the error model, and where a layer needs a fragment or an anchor
      c.sweep_gamma.assign(L, 2.0);
      c.sweep_gamma[5] = 0.5;
      mw.anchor_budget = 7;
      c.crossing[3] = CotangentKeep::fragment;
      c.fragment_bytes[3] = 3;
      c.crossing[6] = CotangentKeep::anchor;
    }
    for (std::size_t budget = least_held_bytes(c); budget <= 100; ++budget) {
      INFO("variant " << variant << ", budget " << budget);
      const Plan with = plan_within(c, budget, 1u << 20, mw);
      const Plan without = plan_within(c, budget);
      INFO(plan_text(with));
      const PlanFigures f = check_plan(with, c), g = check_plan(without, c);
      CHECK(f.peak_held_bytes <= budget);
      CHECK(f.seconds <= g.seconds + 1e-9);
      // The least of the program's plan and every Moonwalk-rooted plan.
      const double best = std::min(g.seconds, best_moonwalk_root(c, budget, mw));
      CHECK(f.seconds == Approx(best).epsilon(1e-6));
      if (with.count(PlanOp::cotangent) > 0 || with.count(PlanOp::sweep) > 0) {
        ++chosen;
        CHECK(f.seconds < g.seconds);
        CHECK(with.count(PlanOp::backward) + with.count(PlanOp::sweep) == L);
      } else {
        ++declined;
        CHECK(with.steps == without.steps);
      }
    }
    // Unlimited: backprop, where Moonwalk's steps cost more than its backward steps.
    ChainCosts slow = c;
    slow.sweep.assign(L, 2);
    CHECK(plan_within(slow, 1000, 1u << 20, mw).steps == plan_within(slow, 1000).steps);
    CHECK(plan_within(slow, 1000).steps == backprop_plan(L).steps);
  }
  CHECK(chosen > 10);
  CHECK(declined > 10);
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

namespace {

/// Unit costs in which inverting is cheap: the planner rebuilds what it can.
template <class S>
ChainCosts cheap_inverses(Network<S>& net, Index batch) {
  const ChainCosts e = chain_costs(net, Matrix<S>::Zero(net.in_features(), batch), Calibration::estimate);
  ChainCosts c = e;
  c.forward.assign(net.size(), 1.0);
  c.backward.assign(net.size(), 2.0);
  for (std::size_t i = 0; i < net.size(); ++i)
    if (e.invertible(i)) c.inverse[i] = 0.25;
  return c;
}

}  // namespace

TEST_CASE("The executor runs plans that invert: backprop's gradient up to the drift it measures",
          "[plan][executor][property]") {
  using S = double;
  int inverting = 0;
  for (std::uint64_t seed = 61; seed < 91; ++seed) {
    const std::string spec = moonwalk_test::random_revnet_spec(seed);
    Network<S> net = parse_network<S>(spec, seed);
    const Index B = 1 + static_cast<Index>(seed % 7);
    const Matrix<S> x = gaussian<S>(net.in_features(), B, seed + 1);
    const Matrix<S> t = gaussian<S>(net.out_features(), B, seed + 2);
    const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
    const ChainCosts c = cheap_inverses(net, B);
    std::size_t total = 0;
    for (std::size_t i = 1; i < c.value_bytes.size(); ++i) total += c.value_bytes[i];
    const std::size_t least = least_held_bytes(c);
    // Every stretch's drift, measured on the batch (B ≤ 16: all of it):
    // finite exactly where every layer of the stretch inverts.
    const StretchDrifts probe = stretch_drifts(net, x, std::numeric_limits<double>::infinity());
    const std::size_t L = net.size();
    REQUIRE(probe.first.size() == L + 2);
    for (std::size_t k = 2; k <= L; ++k)
      for (std::size_t a = 0; a + 2 <= k; ++a) {
        bool inverts = true;
        for (std::size_t l = a + 1; l < k; ++l)
          net.visit(l, [&](const auto& y) { inverts = inverts && can_invert(y); });
        INFO(spec << ": stretch " << a + 1 << " … " << k - 1);
        CHECK(std::isfinite(probe.at(a, k)) == inverts);
      }
    // With a limit, a stretch stops right after its drift first exceeds it.
    const double limit = 1e-15;
    const StretchDrifts cut = stretch_drifts(net, x, limit);
    REQUIRE(cut.first.size() == L + 2);
    for (std::size_t k = 0; k <= L; ++k) {
      CHECK(cut.first[k + 1] - cut.first[k] <= probe.first[k + 1] - probe.first[k]);
      for (std::size_t i = cut.first[k]; i + 1 < cut.first[k + 1]; ++i) CHECK(cut.drift[i] <= limit);
    }
    for (const std::size_t budget : {least, (least + total) / 2, total}) {
      PlanRun<S> run;
      run.bind(plan_within(c, budget), value_rows(net), B, true);
      const PlanFigures f = check_plan(run.plan(), c);
      INFO(spec << ", batch " << B << ", budget " << budget << "\n" << plan_text(run.plan()));
      CHECK(f.peak_held_bytes <= budget);
      GradientResult<S> out;
      zero_gradients(net);
      run.run(net, x, MSE<S>{}, t, out);
      gradients_into(net, out.gradient);
      CHECK(out.loss == ref.loss);
      CHECK(out.stats.counts.inverse == f.inverse_steps);
      CHECK(out.stats.counts.forward == f.forward_steps);
      inverting += f.inverse_steps > 0;
      // Rebuilt stretches carry drift; the checks measure it, and the
      // gradient is backprop's up to it (in double, both tiny).
      CHECK(out.stats.error_estimate < 1e-10);
      CHECK(detail::rel_max_err(out.gradient, ref.gradient) < 1e-8);
      CHECK(detail::rel_max_err(out.h0, ref.h0) < 1e-8);
      if (f.inverse_steps == 0) CHECK(out.gradient == ref.gradient);
      // What each check measured, the probe measured (the same values, the
      // same inverses; only the products' blocking may differ).
      for (const CheckedDrift& d : run.checked_drifts()) {
        const double p = probe.at(d.layer, d.top), u = unit_roundoff<S>();
        INFO("stretch " << d.layer + 1 << " … " << d.top - 1 << ": checked " << d.drift << ", probed " << p);
        CHECK(p <= 2 * d.drift + 8 * u);
        CHECK(d.drift <= 2 * p + 8 * u);
      }
      // The working set: as bound (values, bits, cotangents), as predicted.
      CHECK(out.stats.working_bytes == run.storage_bytes() + thread_scratch_bytes());
      CHECK(run.storage_bytes() == run.working_bytes());
    }
  }
  CHECK(inverting > 20);
}

TEST_CASE("A rebuilt x_1 checked at x_0 and read by backward(1): the check is the step's estimate",
          "[plan][executor]") {
  using S = double;
  auto net = parse_network<S>(
      "in:8,coupling:additive:4:tanh:0.5,coupling:additive:4:tanh:0.5,coupling:additive:4:tanh:0.5", 3);
  const Matrix<S> x = gaussian<S>(8, 5, 1), t = gaussian<S>(8, 5, 2);
  const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  Plan p = rebuild_all_plan(net.size());
  p.steps[p.steps.size() - 3] = PlanStep{PlanOp::inverse, 0, ValueRole::rebuilt};  // (the check at x_1)
  INFO(plan_text(p));
  PlanRun<S> run;
  run.bind(p, value_rows(net), 5, true);
  GradientResult<S> out;
  zero_gradients(net);
  run.run(net, x, MSE<S>{}, t, out);
  gradients_into(net, out.gradient);
  REQUIRE(run.input_drift() > 0);
  CHECK(out.stats.error_estimate == run.input_drift());
  CHECK(detail::rel_max_err(out.gradient, ref.gradient) < 1e-12);
  CHECK(detail::rel_max_err(out.h0, ref.h0) < 1e-12);
}

TEST_CASE("A plan that inverts a LeakyReLU's input reads its branch bits, not the rebuilt input's",
          "[plan][executor][trust]") {
  using S = double;
  // (The kink network: the LeakyReLU, layer 3, sees exact zeros.)
  Network<S> net = parse_network<S>(moonwalk_test::kink_revnet_spec, moonwalk_test::kink_revnet_seed);
  const Matrix<S> x = gaussian<S>(10, 6, 10), y = gaussian<S>(4, 6, 11);
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, y);
  const ChainCosts c = cheap_inverses(net, 6);
  REQUIRE(c.branches(3) == 3 * sizeof(std::uint64_t));  // 24 × 6 bits
  PlanRun<S> run;
  run.bind(plan_within(c, least_held_bytes(c) + c.branches(3)), value_rows(net), 6, true);
  INFO(plan_text(run.plan()));
  const Plan& p = run.plan();
  REQUIRE(std::any_of(p.steps.begin(), p.steps.end(),
                      [](const PlanStep& s) { return s.op == PlanOp::inverse && s.layer == 3; }));
  REQUIRE(std::any_of(p.steps.begin(), p.steps.end(), [](const PlanStep& s) {
    return s.op == PlanOp::forward && s.layer == 3 && s.residual;
  }));
  GradientResult<S> out;
  zero_gradients(net);
  run.run(net, x, MSE<S>{}, y, out);
  gradients_into(net, out.gradient);
  CHECK(detail::rel_max_err(out.gradient, bp.gradient) < 1e-12);
  CHECK(detail::rel_max_err(out.h0, bp.h0) < 1e-12);
  CHECK(out.stats.bytes_of("mask") == 3 * sizeof(std::uint64_t));
  // Without the bits the plan is refused.
  Plan bare = p;
  for (PlanStep& s : bare.steps) s.residual = false;
  CHECK_THROWS_WITH(check_plan(bare, c), Catch::Contains("without layer 3's branch bits"));
}

TEST_CASE("Moonwalk's plans: residuals, cotangent steps and the sweep, checked and costed",
          "[plan][moonwalk]") {
  for (std::size_t L = 1; L <= 7; ++L)
    for (std::size_t top = 0; top <= L; ++top)
      for (const bool h0 : {false, true}) {
        INFO("L = " << L << ", top = " << top << ", h_0 " << h0);
        std::vector<CotangentKeep> keep(L, CotangentKeep::none);
        if (L > 3) keep[2] = CotangentKeep::fragment;
        if (L > 5) keep[4] = CotangentKeep::anchor;
        const Plan p = moonwalk_plan(keep, top, h0);
        INFO(plan_text(p));
        ChainCosts c;
        c.value_bytes.assign(L + 1, 100);
        c.forward.assign(L, 1);
        c.backward.assign(L, 2);
        c.residual_bytes.assign(L, 3);
        c.fragment_bytes.assign(L, 7);
        c.crossing.assign(L, CotangentKeep::none);
        if (L > 3) c.crossing[2] = CotangentKeep::fragment;
        c.cotangent.assign(L, 1.5);
        c.sweep.assign(L, 2.5);
        std::vector<LayerPlan> rows;
        const PlanFigures f = plan_rows(p, c, rows);
        const std::size_t s = h0 ? 0 : 1, m = top > s ? top - s : 0;  // the layers cotangent steps cross
        CHECK(f.sweep_steps == top);
        CHECK(f.cotangent_steps == m);
        CHECK(f.forward_steps == (top == 0 ? L : L + (top == L ? L : top - 1)));
        const std::size_t anchors =
            (L > 5 && top > 4 && !(top < L && top == 5) ? 1 : 0) + (top < L && m > 0 ? 1 : 0);
        CHECK(f.anchors == anchors);
        CHECK(f.seconds == Approx(1.0 * f.forward_steps + 2.0 * (L - top) + 1.5 * m + 2.5 * top));
        double row_seconds = 0;
        for (const LayerPlan& r : rows) {
          row_seconds += r.seconds;
          if (r.layer > 0 && r.layer < top) {
            CHECK(r.input == InputFate::swept);
            CHECK(r.residual);
          }
          CHECK(r.crossed == (r.layer < top && r.layer >= s));
          if (r.layer >= top) CHECK(r.input == InputFate::kept);
        }
        CHECK(row_seconds == Approx(f.seconds));
        const std::string json = plan_report_json(plan_report(p, c));
        CHECK((json.find("\"keep\":null") != std::string::npos) == (top < L || s == 1));
        bool by_vijp = false;  // a crossed layer the sweep crosses by vijp
        for (std::size_t j = s; j < top; ++j)
          by_vijp |= keep[j] == CotangentKeep::none && !(j + 1 == top && top < L);
        CHECK((json.find("\"keep\":\"vijp\"") != std::string::npos) == by_vijp);
        if (top == L && L >= 2) {
          // At most two values at once (a forward step's input and output), and either every
          // residual (the end of the forward pass: layer 0's only with h_0) or what the
          // cotangent steps keep (the sweep's start: layer 2's fragment, layer 4's anchor).
          const std::size_t keeps = (L > 3 ? 7 : 0) + (L > 5 ? 100 : 0);
          CHECK(f.peak_held_bytes == 200 + std::max<std::size_t>(3 * (L - s), keeps));
          CHECK(f.peak_kept_bytes >= 3 * (L - s));
          CHECK(f.peak_kept_bytes <= 3 * (L - s) + keeps);
        }
      }
  // Refusals name the step and why.
  ChainCosts c;
  c.crossing = {CotangentKeep::none, CotangentKeep::anchor, CotangentKeep::fragment, CotangentKeep::none};
  const Plan good = moonwalk_plan(
      {CotangentKeep::none, CotangentKeep::anchor, CotangentKeep::fragment, CotangentKeep::none}, 4, true);
  REQUIRE_NOTHROW(check_plan(good, c));
  auto refused = [&](Plan p, const char* why) {
    p.origin = "test";
    INFO(plan_text(p));
    CHECK_THROWS_WITH(check_plan(p, c), Catch::Contains("plan (test, 4 layers)") && Catch::Contains(why));
  };
  auto at = [&](PlanOp op, std::size_t layer) {
    return static_cast<std::size_t>(
        std::find_if(good.steps.begin(), good.steps.end(),
                     [&](const PlanStep& st) { return st.op == op && st.layer == layer; }) -
        good.steps.begin());
  };
  Plan p = good;
  p.steps[at(PlanOp::cotangent, 1)].keep = CotangentKeep::none;
  refused(p, "cotangent(1) keeps vijp for the sweep, but layer 1 is crossed by anchor (no vijp)");
  p = good;
  p.steps[at(PlanOp::cotangent, 2)].keep = CotangentKeep::none;
  refused(p, "but layer 2 is crossed by fragment");
  p = good;
  p.steps[at(PlanOp::forward, 2)].residual = false;
  refused(p, "cotangent(2) reads layer 2's residual or x_2, and neither is held");
  p = good;
  p.steps.erase(p.steps.begin() + static_cast<std::ptrdiff_t>(at(PlanOp::cotangent, 0)));
  refused(p, "layer 0's residual, kept by a forward step, is read by no step");  // (sweep(0): ∂ℓ/∂θ_0 only)
  // Cotangent steps no sweep follows: the gradients of their layers are never read.
  p = Plan{.layers = 4, .input_role = ValueRole::temporary, .steps = {}, .origin = "test"};
  for (std::size_t i = 0; i < 4; ++i)
    p.steps.push_back({PlanOp::forward, i, i == 3 ? ValueRole::operand : ValueRole::temporary, true});
  p.steps.push_back({PlanOp::loss, 4});
  for (std::size_t i = 4; i-- > 0;)
    p.steps.push_back({PlanOp::cotangent, i, ValueRole::temporary, false, c.crossing[i]});
  refused(p, "layer 0's gradient is never read");
  p = good;
  p.steps.pop_back();  // the check at x_L
  refused(p, "the sweep ends at h_4 unchecked (no anchor at its last layer, no check at x_L)");
  p = good;
  p.steps.insert(p.steps.begin() + static_cast<std::ptrdiff_t>(at(PlanOp::sweep, 2)) + 1,
                 PlanStep{PlanOp::sweep, 2});
  refused(p, "sweep(2): layer 2's gradient is read already");
  p = good;
  p.steps.push_back({PlanOp::backward, 3});
  refused(p, "a step after the sweep's check");
  p = good;
  std::swap(p.steps[at(PlanOp::sweep, 1)], p.steps[at(PlanOp::sweep, 1) + 1]);  // forward(1) before sweep(1)
  refused(p, "forward(1) in the sweep writes x_2, which no sweep step reads next (the cotangent is h_1)");
  p = good;
  p.steps.insert(p.steps.begin() + static_cast<std::ptrdiff_t>(at(PlanOp::cotangent, 0)),
                 PlanStep{PlanOp::sweep, 1});
  refused(p, "sweep(1) reads x_1, which is not held");
  CHECK_THROWS_AS(moonwalk_plan({}, 0, false), ScheduleError);
  CHECK_THROWS_AS(moonwalk_plan({CotangentKeep::none}, 2, false), ScheduleError);
  CHECK(moonwalk_plan({CotangentKeep::none, CotangentKeep::none}, 0, true).steps == backprop_plan(2).steps);
}

TEMPLATE_TEST_CASE("The executor runs Moonwalk's plans: backprop's gradient up to the sweep's checks",
                   "[plan][executor][moonwalk][property]", double, float) {
  using S = TestType;
  const double tol = std::is_same_v<S, double> ? 1e-9 : 2e-3;
  std::size_t swept = 0, fragments = 0, anchors = 0;
  for (std::uint64_t seed = 3001; seed < 3031; ++seed) {
    const RandomArch a(seed);
    std::string desc;
    Network<S> net = a.build<S>(&desc);
    INFO(desc);
    const Matrix<S> x = moonwalk_test::random_batch<S>(a.in, a.batch, seed + 1);
    const Matrix<S> t = moonwalk_test::random_batch<S>(a.out, a.batch, seed + 2);
    const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
    std::vector<CotangentKeep> keep = crossings(net);
    for (std::size_t top = 0; top <= net.size(); ++top)
      for (const bool h0 : {false, true}) {
        PlanRun<S> run;
        run.bind(moonwalk_plan(keep, top, h0), value_rows(net), a.batch, h0);
        const PlanFigures f = check_plan(run.plan(), ChainCosts{});
        INFO("top " << top << ", h_0 " << h0 << "\n" << plan_text(run.plan()));
        GradientResult<S> out;
        for (int step = 0; step < 2; ++step) {  // (the second on the bound buffers)
          out.stats.restart();
          zero_gradients(net);
          run.run(net, x, MSE<S>{}, t, out);
          gradients_into(net, out.gradient);
          CHECK(out.loss == ref.loss);
          CHECK(detail::rel_max_err(out.gradient, ref.gradient) < tol);
          if (h0) CHECK(detail::rel_max_err(out.h0, ref.h0) < tol);
          if (!h0) CHECK(out.h0.size() == 0);
          CHECK(out.stats.error_estimate < tol);
          CHECK(out.stats.counts.forward == run.plan().forward_steps());
          CHECK(out.stats.counts.vjp_params == net.size());
          // (the largest storage of the run: its arena and residuals are given back mid-run)
          CHECK(out.stats.working_bytes >= run.storage_bytes() + thread_scratch_bytes());
          if (top == 0) CHECK(out.stats.working_bytes == run.storage_bytes() + thread_scratch_bytes());
        }
        if (top == 0) CHECK(out.gradient == ref.gradient);  // (backprop's plan: its arithmetic)
        swept += f.sweep_steps;
        fragments += out.stats.bytes_of("fragment") > 0;
        anchors += f.anchors;
      }
  }
  CHECK(swept > 300);
  CHECK(fragments > 0);
  CHECK(anchors > 30);
}

TEST_CASE("chain_costs states Moonwalk's sizes: the kept bytes check_plan predicts are the executor's",
          "[plan][executor][moonwalk][costs]") {
  std::size_t fragments = 0, residuals = 0;
  for (std::uint64_t seed = 3001; seed < 3031; ++seed) {
    const RandomArch a(seed);
    std::string desc;
    Network<double> net = a.build<double>(&desc);
    INFO(desc);
    const Matrix<double> x = moonwalk_test::random_batch<double>(a.in, a.batch, seed + 1);
    const Matrix<double> t = moonwalk_test::random_batch<double>(a.out, a.batch, seed + 2);
    const ChainCosts c = chain_costs(net, x, Calibration::estimate);
    REQUIRE_NOTHROW(c.check());
    const std::vector<CotangentKeep> crossing = crossings(net);
    CHECK(c.crossing == crossing);
    for (std::size_t i = 0; i < net.size(); ++i) {
      if (crossing[i] != CotangentKeep::fragment) CHECK(c.fragment_bytes[i] == 0);  // (a ReLU's: its zeros')
      CHECK(c.cotangent[i] == c.forward[i]);
      CHECK(c.sweep[i] == 2 * c.forward[i]);
    }
    for (const bool h0 : {false, true}) {
      PlanRun<double> run;
      run.bind(moonwalk_plan(c.crossing, net.size(), h0), value_rows(net), a.batch, h0);
      const PlanFigures f = check_plan(run.plan(), c);
      INFO("h_0 " << h0 << "\n" << plan_text(run.plan()));
      GradientResult<double> out;
      zero_gradients(net);
      run.run(net, x, MSE<double>{}, t, out);
      CHECK(out.stats.residual_bytes == f.peak_kept_bytes);
      fragments += out.stats.bytes_of("fragment") > 0;
      residuals += out.stats.bytes_of("mask") > 0 || out.stats.bytes_of("derivative") > 0;
    }
  }
  CHECK(fragments > 5);
  CHECK(residuals > 20);
}

TEST_CASE("The executor carries a float network's cotangents in double", "[plan][executor][moonwalk]") {
  std::size_t runs = 0;
  for (std::uint64_t seed = 3001; seed < 3021; ++seed) {
    const RandomArch a(seed);
    std::string desc;
    Network<float> net = a.build<float>(&desc);
    Network<double> wide = a.build<double>();
    INFO(desc);
    const Matrix<float> x = moonwalk_test::random_batch<float>(a.in, a.batch, seed + 1);
    const Matrix<float> t = moonwalk_test::random_batch<float>(a.out, a.batch, seed + 2);
    // The reference: backprop on the same network in double, the same float inputs.
    const auto ref = gradient(Backprop{.input_gradient = true}, wide, Matrix<double>(x.cast<double>()),
                              MSE<double>{}, Matrix<double>(t.cast<double>()));
    std::vector<CotangentKeep> keep = crossings(net);
    for (const bool h0 : {false, true}) {
      PlanRun<float> run;
      run.bind(moonwalk_plan(keep, net.size(), h0), value_rows(net), a.batch, h0);
      GradientResult<float> out, in_float;
      for (int step = 0; step < 2; ++step) {
        out.stats.restart();
        zero_gradients(net);
        run.run<double>(net, x, MSE<float>{}, t, out);
        gradients_into(net, out.gradient);
      }
      in_float.stats.restart();
      zero_gradients(net);
      run.run(net, x, MSE<float>{}, t, in_float);
      gradients_into(net, in_float.gradient);
      // In double the sweep's own error is gone: what is left is the float forward pass's.
      const double e = detail::rel_max_err(out.gradient.cast<double>(), ref.gradient);
      const double ef = detail::rel_max_err(in_float.gradient.cast<double>(), ref.gradient);
      CHECK(e < 2e-4);
      CHECK(e <= ef + 1e-5);
      CHECK(out.stats.error_estimate < 1e-9);
      if (h0) CHECK(detail::rel_max_err(out.h0.cast<double>(), ref.h0) < 2e-4);
      PlanRun<float> bp;  // (backward steps run in the network's precision)
      bp.bind(backprop_plan(net.size()), value_rows(net), a.batch, false);
      CHECK_THROWS_AS(bp.run<double>(net, x, MSE<float>{}, t, out), ScheduleError);
      ++runs;
    }
  }
  CHECK(runs == 40);
}

TEST_CASE("Pure-forward Moonwalk's plans: tangents steps, checked, and backprop's gradient when run",
          "[plan][executor][moonwalk]") {
  // Every pattern of kept layers (vijp, fragment, anchor) for L ≤ 6.
  for (std::size_t L = 1; L <= 6; ++L) {
    std::size_t patterns = 1;
    for (std::size_t i = 0; i < L; ++i) patterns *= 3;
    for (std::size_t code = 0; code < patterns; ++code) {
      std::vector<CotangentKeep> keep(L);
      std::size_t kept = 0;
      for (std::size_t i = 0, v = code; i < L; ++i, v /= 3) {
        keep[i] = static_cast<CotangentKeep>(v % 3);
        kept += keep[i] != CotangentKeep::none;
      }
      const Plan p = pure_moonwalk_plan(keep);
      INFO(plan_text(p));
      ChainCosts c;
      c.value_bytes.assign(L + 1, 100);
      c.forward.assign(L, 1);
      c.backward.assign(L, 2);
      c.residual_bytes.assign(L, 3);
      c.fragment_bytes.assign(L, 7);
      c.crossing = keep;  // (each layer crossable only as the plan keeps it)
      std::vector<LayerPlan> rows;
      const PlanFigures f = plan_rows(p, c, rows);
      CHECK(p.count(PlanOp::backward) == 0);  // no reverse pass
      CHECK(f.sweep_steps == L);
      CHECK(f.cotangent_steps == kept);
      // A tangents step per kept layer whose h_{j+1} no cotangent step made,
      // and h_0's unless one did: none when every layer is kept.
      CHECK(f.tangent_steps <= kept + 1);
      CHECK((f.tangent_steps == 0) == (kept == L));
      CHECK((p.steps.back().op == PlanOp::loss && p.steps.back().layer == L));
      for (const LayerPlan& r : rows) {
        CHECK(r.crossed);
        CHECK(r.keep == keep[r.layer]);
        CHECK(r.input == (r.layer == 0 ? InputFate::kept : InputFate::swept));
      }
      // Two values at once at most (a forward step's input and output), and
      // what is kept for the sweep: every fragment and anchor, a residual while its tangents run.
      std::size_t keeps = 0;
      for (const CotangentKeep k : keep)
        keeps += k == CotangentKeep::anchor ? 100 : k == CotangentKeep::fragment ? 7 : 0;
      CHECK(f.peak_held_bytes <= 200 + keeps + 3);
      CHECK(f.peak_kept_bytes <= keeps + 3);
    }
  }
  // Refusals name the step and why.
  ChainCosts c;
  c.crossing = {CotangentKeep::none, CotangentKeep::fragment, CotangentKeep::none, CotangentKeep::none};
  const Plan good = pure_moonwalk_plan(c.crossing);
  REQUIRE_NOTHROW(check_plan(good, c));
  REQUIRE(good.count(PlanOp::tangents) == 2);  // h_2 (for layer 1's fragment), then h_0
  auto refused = [&](Plan p, const char* why) {
    p.origin = "test";
    INFO(plan_text(p));
    CHECK_THROWS_WITH(check_plan(p, c), Catch::Contains("plan (test, 4 layers)") && Catch::Contains(why));
  };
  auto at = [&](PlanOp op, std::size_t layer) {
    return static_cast<std::size_t>(
        std::find_if(good.steps.begin(), good.steps.end(),
                     [&](const PlanStep& st) { return st.op == op && st.layer == layer; }) -
        good.steps.begin());
  };
  Plan p = good;
  p.steps.erase(p.steps.begin() + static_cast<std::ptrdiff_t>(at(PlanOp::cotangent, 1)));
  refused(p, "tangents(0) leaves layer 1 to the sweep's vijp, but it is crossed by fragment");
  p = good;
  p.steps.insert(p.steps.begin(), PlanStep{PlanOp::tangents, 0});
  refused(p, "tangents(0) before the loss");
  p = good;
  p.steps.insert(p.steps.begin() + static_cast<std::ptrdiff_t>(at(PlanOp::tangents, 0)) + 1,
                 PlanStep{PlanOp::tangents, 0});
  refused(p, "tangents(0) makes h_0, but the cotangent is h_0 already");
  p = good;
  p.steps[at(PlanOp::tangents, 2)].layer = 3;
  refused(p, "tangents(3) reads x_3, which is not held");
  p = good;
  p.steps.insert(p.steps.begin() + static_cast<std::ptrdiff_t>(at(PlanOp::sweep, 0)) + 1,
                 PlanStep{PlanOp::tangents, 0});
  refused(p, "tangents(0) after the sweep began");
  CHECK_THROWS_AS(pure_moonwalk_plan({}), ScheduleError);

  // Run: the gradient and h_0 of backprop, the jvp passes the plan says, and
  // a warm run in the same storage. Layers with neither vijp nor fragment
  // are anchored: their h_{i+1} comes from tangents too.
  std::size_t tangents = 0, anchors = 0, fragments = 0;
  for (std::uint64_t seed = 3001; seed < 3021; ++seed) {
    const RandomArch a(seed);
    std::string desc;
    Network<double> net = a.build<double>(&desc);
    INFO(desc);
    const Matrix<double> x = moonwalk_test::random_batch<double>(a.in, a.batch, seed + 1);
    const Matrix<double> t = moonwalk_test::random_batch<double>(a.out, a.batch, seed + 2);
    const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<double>{}, t);
    std::vector<CotangentKeep> keep = crossings(net);
    if (seed % 2 == 0) keep[seed % keep.size()] = CotangentKeep::anchor;  // (any layer can be anchored)
    anchors += static_cast<std::size_t>(std::count(keep.begin(), keep.end(), CotangentKeep::anchor));
    PlanRun<double> run;
    run.bind(pure_moonwalk_plan(keep), value_rows(net), a.batch, true);
    run.keep_across_runs(true);  // (else the arena is given back mid-run: taken again, it may move)
    INFO(plan_text(run.plan()));
    const std::vector<Index> rows = value_rows(net);
    std::size_t jvps = 0, tail_forwards = 0;
    for (const PlanStep& st : run.plan().steps)
      if (st.op == PlanOp::tangents) {
        jvps += static_cast<std::size_t>(rows[st.layer]) * (net.size() - st.layer);
        tail_forwards += static_cast<std::size_t>(rows[st.layer]) * (net.size() - st.layer - 1);
        ++tangents;
      }
    GradientResult<double> out;
    std::vector<const void*> storage;
    for (int step = 0; step < 2; ++step) {
      out.stats.restart();
      zero_gradients(net);
      run.run(net, x, MSE<double>{}, t, out);
      gradients_into(net, out.gradient);
      CHECK(out.loss == ref.loss);
      CHECK(detail::rel_max_err(out.gradient, ref.gradient) < 1e-9);
      CHECK(detail::rel_max_err(out.h0, ref.h0) < 1e-9);
      CHECK(out.stats.error_estimate < 1e-9);
      CHECK(out.stats.counts.jvp == jvps);
      CHECK(out.stats.counts.forward == run.plan().forward_steps() + tail_forwards);
      CHECK(out.stats.counts.vjp_params == net.size());
      if (step == 0) storage = run.storage();
      if (step == 1) CHECK(run.storage() == storage);
    }
    fragments += out.stats.bytes_of("fragment") > 0;
  }
  CHECK(tangents > 20);
  CHECK(anchors > 0);
  CHECK(fragments > 0);
}

TEST_CASE(
    "The executor places the fidelity policy's anchors where mixed Moonwalk does, and holds the tolerance",
    "[plan][executor][moonwalk][fidelity]") {
  // Orthogonal Linears with LeakyReLU(0.1): the unguarded float sweep fails
  // at depth 16 (docs/design.md §5).
  const int depth = 16;
  Network<float> net = moonwalk_test::leaky_mlp<float>(depth, 24, 0.1, Init::orthogonal, 40);
  Network<double> twin = moonwalk_test::leaky_mlp<double>(depth, 24, 0.1, Init::orthogonal, 40);
  const Index batch = 16;
  const Matrix<float> x = moonwalk_test::random_batch<float>(24, batch, 5);
  const Matrix<float> t = moonwalk_test::random_batch<float>(4, batch, 6);
  const auto ref = gradient(Backprop{}, twin, Matrix<double>(x.cast<double>()), MSE<double>{},
                            Matrix<double>(t.cast<double>()));
  const std::vector<CotangentKeep> keep(net.size(), CotangentKeep::none);
  Fidelity fid;
  fid.precision = Precision::working;
  fid.verify = false;
  fid.memory = nullptr;
  const double tol = fid.target<float>();
  const RunFidelity policy{.budget = fid.margin * tol, .calibration = fid.calibration};

  PlanRun<float> run;
  run.bind(moonwalk_plan(keep, net.size(), false), value_rows(net), batch, false);
  GradientResult<float> bare, out;
  zero_gradients(net);
  const AttemptOutcome unguarded = run.run(net, x, MSE<float>{}, t, bare);
  gradients_into(net, bare.gradient);
  CHECK(bare.stats.anchor_layers.empty());
  CHECK(bare.stats.amplification.empty());
  CHECK(unguarded.estimate > tol);  // (the sweep alone does not hold it, and says so)
  const std::size_t bound_bytes = run.storage_bytes();
  for (int step = 0; step < 2; ++step) {  // (the second on the pool's buffers)
    out.stats.restart();
    zero_gradients(net);
    const AttemptOutcome o = run.run(net, x, MSE<float>{}, t, out, policy);
    gradients_into(net, out.gradient);
    const Stats& st = out.stats;
    INFO("anchors " << st.anchor_layers.size() << " estimate " << o.estimate << " predicted "
                    << st.predicted_error);
    CHECK(o.finite);
    CHECK_FALSE(o.gave_up_for_double);
    CHECK_FALSE(o.drift.has_value());
    CHECK(o.estimate == st.error_estimate);
    CHECK(o.estimate <= fid.accept * tol);
    CHECK(detail::rel_max_err(out.gradient.cast<double>(), ref.gradient) <= tol);
    CHECK(st.predicted_error > 0);
    CHECK(st.predicted_error <= fid.margin * tol);
    REQUIRE(st.amplification.size() == net.size());
    CHECK_FALSE(st.amplification[0].known);  // (layer 0 is not crossed: no h_0)
    CHECK(st.amplification[1].known);
    CHECK(st.amplification[1].typical > 1);
    std::size_t marked = 0;
    for (const LayerFidelity& lf : st.amplification) marked += lf.anchored;
    CHECK(marked == st.anchor_layers.size());
    CHECK(st.bytes_of("anchor") > 0);
    // The pool holds one buffer per anchor held at once (all of them: the sweep begins after them).
    CHECK(run.storage_bytes() == bound_bytes + st.anchor_layers.size() * 24 * batch * sizeof(float));
    CHECK(out.stats.counts.vijp + st.anchor_layers.size() + 1 == net.size());  // (layer 0: read only)
  }
  // The anchors are the error model's (P) on the amplification the run reports:
  // replayed top-down from the rows, the same layers and the same prediction.
  {
    detail::AnchorPlanner replay(policy.budget / (unit_roundoff<float>() * policy.calibration));
    std::vector<std::size_t> expected;
    for (std::size_t i = net.size(); i-- > 1;)
      if (replay.place(out.stats.amplification[i].typical)) expected.insert(expected.begin(), i);
    CHECK(expected == out.stats.anchor_layers);
    CHECK(replay.worst() * unit_roundoff<float>() * policy.calibration ==
          Approx(out.stats.predicted_error).epsilon(1e-12));
  }
  // Mixed Moonwalk (its plan on the executor, in the working precision) reports the same.
  zero_gradients(net);
  const auto mixed = gradient(MixedMoonwalk{.fidelity = fid}, net, x, MSE<float>{}, t);
  CHECK(mixed.stats.anchor_layers == out.stats.anchor_layers);

  SECTION("a plan's own anchor restarts the prediction") {
    std::vector<CotangentKeep> k = keep;
    k[8] = CotangentKeep::anchor;
    PlanRun<float> r2;
    r2.bind(moonwalk_plan(k, net.size(), false), value_rows(net), batch, false);
    GradientResult<float> o2;
    zero_gradients(net);
    (void)r2.run(net, x, MSE<float>{}, t, o2, policy);
    const auto& al = o2.stats.anchor_layers;
    CHECK(std::find(al.begin(), al.end(), 8) != al.end());
    CHECK(o2.stats.error_estimate <= fid.accept * tol);
  }
  SECTION("double cotangents: the same budget needs fewer anchors") {
    GradientResult<float> od;
    zero_gradients(net);
    const RunFidelity d{
        .budget = policy.budget, .calibration = policy.calibration, .may_give_up_for_double = true};
    const AttemptOutcome o = run.run<double>(net, x, MSE<float>{}, t, od, d);
    CHECK_FALSE(o.gave_up_for_double);  // (already in double)
    CHECK(od.stats.anchor_layers.size() < out.stats.anchor_layers.size());
    CHECK(o.estimate <= fid.accept * tol);  // (anchored for the tolerance, not for double's roundoff)
    CHECK(od.stats.predicted_error <= fid.margin * tol);
  }
}

TEST_CASE("The executor gives up for double where float anchors would cost more than double's",
          "[plan][executor][moonwalk][fidelity]") {
  // Gaussian Linears with LeakyReLU(0.1): float anchors almost every layer.
  Network<float> net = moonwalk_test::leaky_mlp<float>(12, 24, 0.1, Init::gaussian, 70);
  const Index batch = 16;
  const Matrix<float> x = moonwalk_test::random_batch<float>(24, batch, 9);
  const Matrix<float> t = moonwalk_test::random_batch<float>(4, batch, 10);
  const double tol = default_target<float>();
  const std::vector<CotangentKeep> keep(net.size(), CotangentKeep::none);
  PlanRun<float> run;
  run.bind(moonwalk_plan(keep, net.size(), false), value_rows(net), batch, false);
  GradientResult<float> out;
  zero_gradients(net);
  const RunFidelity f{.budget = 0.125 * tol, .calibration = 4, .may_give_up_for_double = true};
  const AttemptOutcome o = run.run(net, x, MSE<float>{}, t, out, f);
  CHECK(o.gave_up_for_double);
  CHECK(out.stats.working_bytes > 0);  // (what the abandoned run held)
  // Mixed Moonwalk's retry machine escalates on the same network and ends in double.
  MixedMoonwalk m{};
  m.fidelity.memory = nullptr;
  const auto mixed = gradient(m, net, x, MSE<float>{}, t);
  CHECK(mixed.stats.precision == "double");
  CHECK(mixed.stats.fallbacks >= 1);
  // Without the option the same run anchors in float and completes.
  zero_gradients(net);
  const AttemptOutcome kept = run.run(net, x, MSE<float>{}, t, out, RunFidelity{.budget = f.budget});
  CHECK_FALSE(kept.gave_up_for_double);
  CHECK(out.stats.anchor_layers.size() > net.size() / 4);
  // And in double it completes with fewer anchors.
  GradientResult<float> od;
  zero_gradients(net);
  const AttemptOutcome d = run.run<double>(net, x, MSE<float>{}, t, od, f);
  CHECK_FALSE(d.gave_up_for_double);
  CHECK(od.stats.anchor_layers.size() < out.stats.anchor_layers.size());
}

TEST_CASE("Moonwalk's plans with inputs rebuilt by inversion: checked, and backprop's gradient when run",
          "[plan][executor][moonwalk][revnet]") {
  // Every combination of rebuilt and branch flags on short chains: the
  // generator's plans pass check_plan, keep no residual and no value where a
  // rebuilt input serves, and check x_0 when the first layer is rebuilt.
  for (std::size_t L = 1; L <= 5; ++L)
    for (unsigned mask = 0; mask < (1U << L); ++mask)
      for (unsigned bits = 0; bits < (1U << L); ++bits) {
        if ((bits & ~mask) != 0) continue;  // (branch bits only on rebuilt layers)
        std::vector<bool> rebuilt(L), branches(L);
        for (std::size_t i = 0; i < L; ++i) {
          rebuilt[i] = (mask >> i & 1U) != 0;
          branches[i] = (bits >> i & 1U) != 0;
        }
        const std::vector<CotangentKeep> keep(L, CotangentKeep::none);
        for (std::size_t top = 1; top <= L; ++top)
          for (const bool h0 : {false, true}) {
            const Plan p = moonwalk_plan(keep, top, h0, rebuilt, branches);
            INFO("L " << L << " rebuilt " << mask << " branches " << bits << " top " << top << " h_0 " << h0
                      << "\n"
                      << plan_text(p));
            std::vector<std::size_t> bytes(L + 1, 100);
            ChainCosts c{.value_bytes = bytes,
                         .forward = {},
                         .backward = {},
                         .loss = 0,
                         .inverse = {},
                         .branch_bytes = {}};
            c.residual_bytes.assign(L, 1);
            const PlanFigures f = check_plan(p, c);
            CHECK(f.checks == (rebuilt[0] ? 1U : 0U));
            std::size_t residuals = 0;
            for (const PlanStep& st : p.steps) residuals += st.op == PlanOp::forward && st.residual;
            std::size_t expected = 0;
            for (std::size_t i = h0 ? 0 : 1; i < top; ++i) expected += !rebuilt[i] || branches[i];
            CHECK(residuals == expected);
            // Inversion holds at most two values beyond those the forward pass kept
            // (a stretch's rebuilt source and the input rebuilt from it, or x̂_0 for the check).
            std::size_t kept = 0;
            for (std::size_t k = 0; k < L; ++k) kept += p.steps[k].output != ValueRole::temporary;
            CHECK(f.peak_held_bytes <= (kept + 2) * 100 + L);
          }
      }

  // On random RevNets (couplings, padding, tanh and LeakyReLU between them),
  // run by the executor: backprop's gradient, the inverses counted, the
  // check at x_0 measured, and no coupling input kept.
  for (std::uint64_t seed = 1; seed <= 25; ++seed) {
    using S = double;
    const std::string spec = moonwalk_test::random_revnet_spec(seed);
    Network<S> net = parse_network<S>(spec, seed);
    INFO(spec);
    const Index B = 1 + static_cast<Index>(seed % 7);
    const Matrix<S> x = gaussian<S>(net.in_features(), B, seed + 1);
    const Matrix<S> t = gaussian<S>(net.out_features(), B, seed + 2);
    const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
    const std::size_t n = net.size();
    std::vector<bool> rebuilt(n), branches(n);
    for (std::size_t i = 0; i < n; ++i)
      net.visit(i, [&](const auto& l) {
        rebuilt[i] = can_invert(l);
        branches[i] = rebuilt[i] && keeps_branches(l);
      });
    const std::vector<CotangentKeep> keep = crossings(net);
    REQUIRE(rebuilt[0]);  // (pad)
    for (const bool h0 : {false, true}) {
      PlanRun<S> run;
      run.bind(moonwalk_plan(keep, n, h0, rebuilt, branches), value_rows(net), B, h0);
      INFO("h_0 " << h0 << "\n" << plan_text(run.plan()));
      GradientResult<S> out;
      for (int step = 0; step < 2; ++step) {
        out.stats.restart();
        zero_gradients(net);
        const AttemptOutcome o = run.run(net, x, MSE<S>{}, t, out);
        gradients_into(net, out.gradient);
        CHECK(detail::rel_max_err(out.gradient, ref.gradient) < 1e-9);
        if (h0) CHECK(detail::rel_max_err(out.h0, ref.h0) < 1e-9);
        CHECK(out.stats.counts.inverse == run.plan().inverse_steps());
        CHECK(out.stats.counts.inverse >= 1);
        // The check at x_0 (a diagnostic: the outcome's drift, not the estimate).
        REQUIRE(o.drift.has_value());
        CHECK(*o.drift == run.input_drift());
        CHECK(run.input_drift() >= 0);
        CHECK(run.input_drift() < 1e-10);
        CHECK(run.checked_drifts().empty());
        CHECK(out.stats.error_estimate < 1e-9);
        // Kept between the passes: the stretch tops (checkpoints), no layer input else.
        std::size_t tops = 0;
        for (std::size_t k = 0; k < n; ++k)
          if (run.plan().steps[k].output == ValueRole::checkpoint)
            tops += static_cast<std::size_t>(value_rows(net)[k + 1] * B) * sizeof(S);
        CHECK(out.stats.bytes_of("checkpoint") == tops);
        CHECK(out.stats.bytes_of("activation") == 0);
      }
    }
  }
  // A float network's rebuilt plan runs with double cotangents (its inverses in float).
  {
    Network<float> net = parse_network<float>(moonwalk_test::random_revnet_spec(4), 4);
    Network<double> wide = parse_network<double>(moonwalk_test::random_revnet_spec(4), 4);
    const Matrix<float> x = gaussian<float>(net.in_features(), 5, 5);
    const Matrix<float> t = gaussian<float>(net.out_features(), 5, 6);
    const auto ref = gradient(Backprop{}, wide, Matrix<double>(x.cast<double>()), MSE<double>{},
                              Matrix<double>(t.cast<double>()));
    const std::size_t n = net.size();
    std::vector<bool> rebuilt(n), branches(n);
    for (std::size_t i = 0; i < n; ++i)
      net.visit(i, [&](const auto& l) {
        rebuilt[i] = can_invert(l);
        branches[i] = rebuilt[i] && keeps_branches(l);
      });
    std::vector<CotangentKeep> keep = crossings(net);
    PlanRun<float> run;
    run.bind(moonwalk_plan(keep, n, false, rebuilt, branches), value_rows(net), 5, false);
    GradientResult<float> out;
    zero_gradients(net);
    (void)run.run<double>(net, x, MSE<float>{}, t, out);
    gradients_into(net, out.gradient);
    CHECK(out.stats.counts.inverse >= 1);
    CHECK(detail::rel_max_err(out.gradient.cast<double>(), ref.gradient) < 1e-4);
  }
}
