// Moonwalk — the planner: the fastest plan whose held values fit a budget.
//
// For a chain with per-layer costs (forward f_i, backward b_i, loss ℓ) and
// value sizes s_i = bytes of x_i, let C(a, b, m) be the least time that
// reverses layers a … b−1 given x_a held, h_b at hand and m bytes free for
// further values (layer L is the loss, its backward the loss's gradient).
// Then (Griewank's treeverse over a heterogeneous chain, as Rotor's dynamic
// program of Beaumont et al. 2019 with the layer input as the tape):
//
//   C(a, a+1, m) = b_a
//   C(a, b, m)   = min over a < k < b with A(a, k) ≤ m of
//                  Σ_{a≤j<k} f_j + C(k, b, m − s_k) + C(a, k, m)
//
// where A(a, k) = max_{a<j≤k} (s_j + [j−1 > a] s_{j−1}) is the peak of
// advancing from x_a to x_k, freeing each intermediate value once the next
// is computed: advance to a checkpoint x_k, reverse the right part holding
// it, then the left part. k = a + 1 everywhere is backprop. Memory is
// counted in units: the sizes' common divisor where the budget is at most M
// of them (exact), else ⌈budget / M⌉ bytes (sizes rounded up, so a plan that
// fits in units fits in bytes).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "moonwalk/plan/plan.hpp"

namespace moonwalk {

/// What the planner knows of a chain at one batch size: x_i's bytes (L + 1
/// values) and the seconds of each layer's forward and backward step (L
/// each) and of the loss.
struct ChainCosts {
  std::vector<std::size_t> value_bytes;
  std::vector<double> forward;
  std::vector<double> backward;
  double loss = 0;

  [[nodiscard]] std::size_t layers() const { return forward.size(); }
  /// Throws ScheduleError unless the sizes agree and every time is finite and ≥ 0.
  void check() const {
    const std::size_t n = layers();
    if (n == 0) throw ScheduleError("chain costs: no layers");
    if (backward.size() != n || value_bytes.size() != n + 1)
      throw ScheduleError(detail::cat("chain costs: ", n, " forward times, ", backward.size(),
                                      " backward times and ", value_bytes.size(),
                                      " value sizes (need L, L and L + 1)"));
    auto ok = [](double t) { return std::isfinite(t) && t >= 0; };
    for (std::size_t i = 0; i < n; ++i)
      if (!ok(forward[i]) || !ok(backward[i]))
        throw ScheduleError(detail::cat("chain costs: layer ", i, ": time not finite and >= 0"));
    if (!ok(loss)) throw ScheduleError("chain costs: loss time not finite and >= 0");
  }
};

/// The least bytes of held values (x_0 excluded) any plan of the chain
/// needs: every x_j is computed from a held x_{j−1}, so
/// max(s_1, max_{2≤j≤L} s_{j−1} + s_j) — what the plan holding no
/// checkpoint but x_0 needs.
inline std::size_t least_held_bytes(const ChainCosts& c) {
  const std::size_t n = c.layers();
  std::size_t m = n > 0 ? c.value_bytes[1] : 0;
  for (std::size_t j = 2; j <= n; ++j) m = std::max(m, c.value_bytes[j - 1] + c.value_bytes[j]);
  return m;
}

/// The plan of least predicted time (check_plan with c's times) whose held
/// values (x_0 excluded) never take more than `held_budget` bytes, found by
/// the dynamic program above with about max(table_entries, 9 · (L+1)(L+2)/2)
/// cost entries (6 bytes each; up to 16 times more when rounding to the
/// coarser unit leaves no plan, before the plan holding nothing but x_0).
/// Throws ScheduleError when held_budget < least_held_bytes(c).
inline Plan plan_within(const ChainCosts& c, std::size_t held_budget, std::size_t table_entries = 1u << 20) {
  c.check();
  const std::size_t L = c.layers();
  const std::size_t least = least_held_bytes(c);
  if (held_budget < least)
    throw ScheduleError(
        detail::cat("planner: no plan holds its values in ", held_budget, " bytes; the least is ", least));
  std::size_t total = 0;
  for (std::size_t i = 1; i <= L; ++i) total += c.value_bytes[i];
  const std::size_t budget = std::max<std::size_t>(std::min(held_budget, total), 1);

  const std::size_t n = L + 1;  // stages 0..L−1 the layers, L the loss
  if (n > std::numeric_limits<std::uint16_t>::max())
    throw ScheduleError("planner: chains of 65535 layers or more");
  const std::size_t pairs = n * (n + 1) / 2;
  std::vector<double> fsum(n + 1, 0);  // fsum[k] = Σ_{j<k} f_j
  for (std::size_t j = 0; j < L; ++j) fsum[j + 1] = fsum[j] + std::max(c.forward[j], 1e-12);
  auto back = [&](std::size_t a) { return a == L ? c.loss : std::max(c.backward[a], 1e-12); };
  // pair (a, b), a < b ≤ n: row a holds b = a+1 … n.
  std::vector<std::size_t> row(n + 1, 0);
  for (std::size_t a = 1; a <= n; ++a) row[a] = row[a - 1] + (n - (a - 1));
  std::size_t g = 0;
  for (std::size_t i = 0; i <= L; ++i) g = std::gcd(g, c.value_bytes[i]);

  std::size_t units = 0;
  std::vector<std::size_t> s(n + 1);
  std::vector<float> cost;
  std::vector<std::uint16_t> split;
  auto at = [&](std::size_t a, std::size_t b, std::size_t m) {
    return (row[a] + (b - a - 1)) * (units + 1) + m;
  };
  // The program with M + 1 memory levels; false when rounding to units left
  // no plan (then a finer unit may find one).
  auto solve = [&](std::size_t M) {
    // The unit: the sizes' greatest common divisor when the budget is at most
    // M of them (exact: value sizes are rows × batch × sizeof(S)), else ⌈budget / M⌉.
    const std::size_t unit = g > 0 && budget / g <= M ? g : (budget + M - 1) / M;
    units = budget / unit;
    for (std::size_t i = 0; i <= L; ++i) s[i] = (c.value_bytes[i] + unit - 1) / unit;
    constexpr float inf = std::numeric_limits<float>::infinity();
    cost.assign(pairs * (units + 1), inf);
    split.assign(pairs * (units + 1), 0);
    for (std::size_t a = 0; a < n; ++a)
      for (std::size_t m = 0; m <= units; ++m) cost[at(a, a + 1, m)] = static_cast<float>(back(a));
    for (std::size_t d = 2; d <= n; ++d)
      for (std::size_t a = 0; a + d <= n; ++a) {
        const std::size_t b = a + d;
        std::size_t peak = 0;  // A(a, k)
        for (std::size_t k = a + 1; k < b; ++k) {
          peak = std::max(peak, s[k] + (k - 1 > a ? s[k - 1] : 0));
          if (peak > units) break;
          const float adv = static_cast<float>(fsum[k] - fsum[a]);
          for (std::size_t m = peak; m <= units; ++m) {
            const float t = adv + cost[at(k, b, m - s[k])] + cost[at(a, k, m)];
            float& best = cost[at(a, b, m)];
            if (t < best) {
              best = t;
              split[at(a, b, m)] = static_cast<std::uint16_t>(k);
            }
          }
        }
      }
    return std::isfinite(cost[at(0, n, units)]);
  };
  std::size_t M = std::clamp<std::size_t>(table_entries / pairs, 8, 4096);
  bool found = solve(M);
  for (int finer = 0; !found && finer < 2 && M < 4096; ++finer)
    found = solve(M = std::min<std::size_t>(4 * M, 4096));

  Plan p{.layers = L, .input_role = ValueRole::checkpoint, .steps = {}, .origin = "planner"};
  if (!found) {
    // Rounding to units lost the tightest plans: hold nothing but x_0.
    for (std::size_t j = L + 1; j-- > 0;) {
      for (std::size_t i = 0; i < j; ++i)
        p.steps.push_back({PlanOp::forward, i, i + 1 == j ? ValueRole::operand : ValueRole::temporary});
      p.steps.push_back(j == L ? PlanStep{PlanOp::loss, L} : PlanStep{PlanOp::backward, j});
    }
  } else {
    auto emit = [&](auto& self, std::size_t a, std::size_t b, std::size_t m) -> void {
      if (b == a + 1) {
        p.steps.push_back(a == L ? PlanStep{PlanOp::loss, L} : PlanStep{PlanOp::backward, a});
        return;
      }
      const std::size_t k = split[at(a, b, m)];
      for (std::size_t j = a; j < k; ++j)
        p.steps.push_back({PlanOp::forward, j, j + 1 == k ? ValueRole::checkpoint : ValueRole::temporary});
      self(self, k, b, m - s[k]);
      self(self, a, k, m);
    };
    emit(emit, 0, n, units);
  }
  // Roles for the report: a held value from which no forward step runs is an
  // operand, one forward step an activation, more a checkpoint.
  std::vector<std::size_t> created(L + 1, 0), uses(L + 1, 0);
  auto settle = [&](std::size_t i) {
    if (i == 0) return;
    PlanStep& st = p.steps[created[i]];
    if (st.output == ValueRole::temporary) return;
    st.output = uses[i] == 0   ? ValueRole::operand
                : uses[i] == 1 ? ValueRole::activation
                               : ValueRole::checkpoint;
  };
  for (std::size_t k = 0; k < p.steps.size(); ++k) {
    const PlanStep& st = p.steps[k];
    if (st.op == PlanOp::forward) {
      ++uses[st.layer];
      created[st.layer + 1] = k;
      uses[st.layer + 1] = 0;
    } else if (st.op == PlanOp::backward) {
      settle(st.layer);
    }
  }
  p.input_role = uses[0] <= 1 ? ValueRole::activation : ValueRole::checkpoint;
  // (x_L: created by the last forward to it, read by the loss: an operand.)
  for (auto& st : p.steps)
    if (st.op == PlanOp::forward && st.layer + 1 == L) st.output = ValueRole::operand;
  return p;
}

}  // namespace moonwalk
