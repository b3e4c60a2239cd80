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
// it, then the left part. k = a + 1 everywhere is backprop.
//
// Inversion (ChainCosts::inverse, RevBackprop's move) adds, where layers
// a+1 … k−1 have inverses (a + 2 ≤ k < b), the left part rebuilt instead of
// recomputed: right after the right part (all but its last backward step),
// x_{j−1} = f_{j−1}⁻¹(x_j) then backward(j) for j = k … a+2, then the check
// x_{a+1} = f_a(x_a) (the exact value replaces the rebuilt one; their
// difference is the stretch's drift), backward(a+1) and backward(a):
//
//   Σ_{a≤j<k} f_j + C(k, b, m − s_k − B) − b_k + Σ_{a<j<k} i_j + f_a + Σ_{a≤j≤k} b_j
//
// where B is the branch bits the advance keeps for the layers a+2 … k−1
// whose backward step reads a rebuilt input (ChainCosts::branch_bytes),
// if the advance, the stretch and the check fit in m, each bit freed by its
// layer's backward step, and if the stretch's predicted drift D(a, k) is
// within ChainCosts::drift_budget (plan.hpp). The check reads x_a, held since the stretch began
// (a plan that recomputes the check's source after the stretch is outside
// this family; tests/plan/test_plan.cpp searches the family exhaustively).
// Memory is
// counted in units: the sizes' common divisor g where the budget is at most M
// of them (exact), else a multiple of g that cuts the budget into at most M
// units and wastes the fewest bytes rounding (sizes rounded up, so a plan
// that fits in units fits in bytes).
//
// Moonwalk (MoonwalkMove) adds, at the root, the plan that reverses the
// bottom layers 0 … t−1 by Moonwalk (moonwalk_plan): the advance to x_t
// keeps their residuals, the program reverses t … L−1 from x_t in what is
// left, C(t, L+1, m − s_t − R_t − K_t) (R_t the residuals' bytes, K_t the
// keeps', both counted from the start: the executor holds their buffers
// through the run), cotangent steps carry h_t down to h_s
// (s = 0 with the input gradient, else 1) keeping the fragments and anchors
// the sweep needs — an anchor where a layer has neither vijp nor fragment,
// at layer t−1 (h_t: the sweep's check, for t < L) and where the error
// model (P) of fidelity/policy.hpp, walking down from t−1 with the layers'
// γ (ChainCosts::sweep_gamma), would pass the move's anchor budget — and
// the sweep climbs back, recomputing x_1 … x_{t−1}:
//
//   Σ_{j<t} f_j + C(t, L+1, m − s_t − R_t − K_t) + Σ_{s≤j<t} cotangent_j
//     + Σ_{j<t} sweep_j + Σ_{j<t−1} f_j
//
// (t = L: C(L, L+1, ·) = ℓ, and the sweep also makes x_L for its check, a
// second ℓ: + f_{L−1} + ℓ), where the values of the advance and the sweep
// fit in m beside R_t and K_t. Its
// cotangents cannot carry on below t once swept, so Moonwalk takes the
// bottom of the chain only.
#pragma once

#include <algorithm>
#include <bit>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <numeric>
#include <vector>

#include "moonwalk/core/mapped.hpp"
#include "moonwalk/fidelity/policy.hpp"
#include "moonwalk/plan/plan.hpp"

namespace moonwalk {

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

/// Bytes of one entry of the planner's table: its cost, split and move.
inline constexpr std::size_t kPlannerEntryBytes =
    sizeof(float) + sizeof(std::uint16_t) + sizeof(std::uint8_t);

/// Moonwalk's move for the planner (the top of this file).
struct MoonwalkMove {
  /// Plans may reverse the bottom of the chain by Moonwalk (c's cotangent
  /// and sweep times, residual and fragment sizes and crossings apply).
  bool enabled = false;
  /// The cotangent steps go down to h_0 (layer 0 keeps its residual), else to h_1.
  bool input_gradient = false;
  /// The anchors' budget: the largest Σ Π γ a swept segment may reach
  /// (fidelity/policy.hpp's AnchorPlanner: margin · tolerance / (c · u));
  /// 0: anchors only where the layers need them.
  double anchor_budget = 0;
};

/// The plan of least predicted time (check_plan with c's times) whose held
/// values (x_0 excluded) never take more than `held_budget` bytes, found by
/// the dynamic program above with about max(table_entries, 9 · (L+1)(L+2)/2)
/// entries of kPlannerEntryBytes (up to 16 times more when rounding to the
/// coarser unit leaves no plan, before the plan holding nothing but x_0).
/// Throws ScheduleError when held_budget < least_held_bytes(c). With `mw`
/// enabled, the plan may reverse the bottom of the chain by Moonwalk.
inline Plan plan_within(const ChainCosts& c, std::size_t held_budget, std::size_t table_entries = 1u << 20,
                        const MoonwalkMove& mw = {}) {
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

  // Inversion: isum[k] = Σ_{j<k} i_j; backsum[k] = Σ_{j<k} b_j (b_L the
  // loss); rebuildable[j]: the first layer ≥ j without an inverse (L: none),
  // so layers a+1 … k−1 have inverses iff k ≤ rebuildable[a + 1].
  std::vector<double> isum(n + 1, 0), backsum(n + 1, 0);
  for (std::size_t j = 0; j < L; ++j)
    isum[j + 1] = isum[j] + (c.invertible(j) ? std::max(c.inverse[j], 1e-12) : 0);
  for (std::size_t j = 0; j < n; ++j) backsum[j + 1] = backsum[j] + back(j);
  std::vector<std::size_t> rebuildable(n + 1, 0);
  rebuildable[L] = L;
  rebuildable[n] = L;
  for (std::size_t j = L; j-- > 0;) rebuildable[j] = c.invertible(j) ? rebuildable[j + 1] : j;
  for (std::size_t i = 0; i < L; ++i)
    if (c.branches(i) > 0) g = std::gcd(g, c.branches(i));

  std::size_t units = 0, unit_bytes = 1;
  std::vector<std::size_t> s(n + 1), bsum(n + 1, 0);  // bsum[k]: Σ_{j<k} branch bits (units)
  // (the table: mapped on its own, so that its pages go back to the kernel
  // when planning ends and leave no hole in the heap the step allocates from)
  detail::MappedArray<float> cost;
  detail::MappedArray<std::uint16_t> split;
  detail::MappedArray<std::uint8_t> rebuilt;  // 1: the split's left part is rebuilt by inversion
  auto at = [&](std::size_t a, std::size_t b, std::size_t m) {
    return (row[a] + (b - a - 1)) * (units + 1) + m;
  };
  // The program with M + 1 memory levels; false when rounding to units left
  // no plan (then a finer unit may find one).
  auto solve = [&](std::size_t M) {
    // The unit: the sizes' greatest common divisor when the budget is at most
    // M of them (exact: value sizes are rows × batch × sizeof(S)), else the
    // multiple g k, k₀ = ⌈budget / (g M)⌉ ≤ k < 2 k₀ (the first 256 of those
    // and the power of two among them), that wastes the fewest bytes
    // rounding the sizes up and the budget down (a k dividing the common
    // value sizes keeps them exact).
    const std::size_t g1 = std::max<std::size_t>(g, 1);
    const std::size_t k0 = std::max<std::size_t>((budget / g1 + M - 1) / M, 1);
    std::size_t unit = g1 * k0;
    if (k0 > 1) {
      auto waste = [&](std::size_t u) {
        auto up = [u](std::size_t v) { return (v + u - 1) / u * u - v; };
        std::size_t w = budget % u;
        for (std::size_t i = 0; i <= L; ++i) w += up(c.value_bytes[i]);
        for (std::size_t i = 0; i < L; ++i) w += up(c.branches(i));
        return w;
      };
      std::size_t least_waste = waste(unit);
      auto consider = [&](std::size_t k) {
        if (const std::size_t w = waste(g1 * k); w < least_waste) {
          least_waste = w;
          unit = g1 * k;
        }
      };
      for (std::size_t k = k0 + 1; k < std::min(2 * k0, k0 + 256); ++k) consider(k);
      consider(std::bit_ceil(k0));
    }
    units = budget / unit;
    unit_bytes = unit;
    for (std::size_t i = 0; i <= L; ++i) s[i] = (c.value_bytes[i] + unit - 1) / unit;
    for (std::size_t i = 0; i < L; ++i) bsum[i + 1] = bsum[i] + (c.branches(i) + unit - 1) / unit;
    bsum[n] = bsum[L];
    constexpr float inf = std::numeric_limits<float>::infinity();
    cost.assign(pairs * (units + 1), inf);
    split.assign(pairs * (units + 1), 0);
    rebuilt.assign(pairs * (units + 1), 0);
    for (std::size_t a = 0; a < n; ++a)
      for (std::size_t m = 0; m <= units; ++m) cost[at(a, a + 1, m)] = static_cast<float>(back(a));
    for (std::size_t d = 2; d <= n; ++d)
      for (std::size_t a = 0; a + d <= n; ++a) {
        const std::size_t b = a + d;
        std::size_t peak = 0;  // A(a, k)
        // With inversion, bits kept by the advance for layers a+2 … k−1:
        // B(j) = their bytes up to layer j. The advance's peak (forward(j)
        // holds x_j, x_{j+1} and B(j)), and the stretch's: inverse(j−1) holds
        // x_j, x_{j−1} and B(min(j, k−1)); the check 2 s_{a+1}.
        std::size_t advance = 0, stretch = 2 * s[a + 1];
        double gammas = 1, drift = 0;  // Π γ and D(a, k) of the stretch a+1 … k−1
        auto bits_to = [&](std::size_t j) { return j >= a + 2 ? bsum[j + 1] - bsum[a + 2] : std::size_t{0}; };
        for (std::size_t k = a + 1; k < b; ++k) {
          peak = std::max(peak, s[k] + (k - 1 > a ? s[k - 1] : 0));
          if (peak > units) break;
          advance = std::max(advance, s[k] + (k - 1 > a ? s[k - 1] : 0) + bits_to(k - 1));
          const float adv = static_cast<float>(fsum[k] - fsum[a]);
          for (std::size_t m = peak; m <= units; ++m) {
            const float t = adv + cost[at(k, b, m - s[k])] + cost[at(a, k, m)];
            float& best = cost[at(a, b, m)];
            if (t < best) {
              best = t;
              split[at(a, b, m)] = static_cast<std::uint16_t>(k);
              rebuilt[at(a, b, m)] = 0;  // (an inverting split at a smaller k may have set it)
            }
          }
          if (k < a + 2) continue;
          if (c.measured.empty()) {
            gammas *= c.gamma(k - 1);
            drift += gammas;
          } else {
            drift = c.drift(a, k);
          }
          const std::size_t bits = bits_to(k - 1);
          const std::size_t need = std::max({advance, stretch, s[k] + s[k - 1] + bits});
          stretch = std::max(stretch, s[k] + s[k - 1] + bits_to(k));  // (for the longer stretches)
          if (k > rebuildable[a + 1] || !(drift <= c.drift_budget)) continue;
          const double fixed = fsum[k] - fsum[a] - back(k) + (isum[k] - isum[a + 1]) +
                               (fsum[a + 1] - fsum[a]) + (backsum[k + 1] - backsum[a]);
          for (std::size_t m = need; m <= units; ++m) {
            const float t = static_cast<float>(fixed + cost[at(k, b, m - s[k] - bits)]);
            float& best = cost[at(a, b, m)];
            if (t < best) {
              best = t;
              split[at(a, b, m)] = static_cast<std::uint16_t>(k);
              rebuilt[at(a, b, m)] = 1;
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

  // Moonwalk at the root (the top of this file): the best top t, its keeps
  // and what its residuals leave the program above.
  std::size_t mw_top = 0, mw_free = 0;
  double mw_seconds = std::numeric_limits<double>::infinity();
  std::vector<CotangentKeep> mw_keep(L, CotangentKeep::none), keep(L, CotangentKeep::none);
  const std::size_t s0 = mw.input_gradient ? 0 : 1;
  if (mw.enabled) {
    // (Moonwalk's own bytes are counted exactly; the program above gets
    // the units its values fit in what they leave.)
    auto bytes = [&](std::size_t i) { return c.value_bytes[i]; };
    auto seconds = [](const std::vector<double>& t, std::size_t i) { return i < t.size() ? t[i] : 0.0; };
    std::vector<std::size_t> kept(L, 0);  // bytes cotangent(j) keeps
    for (std::size_t t = s0 + 1; t <= L; ++t) {
      detail::AnchorPlanner anchors(mw.anchor_budget);
      for (std::size_t j = t; j-- > s0;) {  // (as the executor walks down: plan/executor.hpp)
        CotangentKeep k = j + 1 == t && t < L     ? CotangentKeep::anchor
                          : j < c.crossing.size() ? c.crossing[j]
                                                  : CotangentKeep::none;
        if (k == CotangentKeep::anchor)
          anchors.restart();
        else if (anchors.place(j < c.sweep_gamma.size() ? c.sweep_gamma[j] : 1.0))
          k = CotangentKeep::anchor;
        keep[j] = k;
        kept[j] = k == CotangentKeep::anchor     ? bytes(j + 1)
                  : k == CotangentKeep::fragment ? c.fragment(j)
                                                 : 0;
      }
      // The executor holds every residual and anchor buffer of the run at
      // once (plan/executor.hpp, working_bytes()): they are counted beside
      // the values throughout, and the values peak in the advance, the
      // program above (x_t and what it leaves) and the sweep.
      std::size_t held = 0, values = 0;
      for (std::size_t j = s0; j < t; ++j) held += c.residual(j) + kept[j];
      for (std::size_t i = 0; i < t; ++i) values = std::max(values, (i > 0 ? bytes(i) : 0) + bytes(i + 1));
      if (values + held > held_budget) continue;
      const std::size_t free = std::min(units, (held_budget - bytes(t) - held) / unit_bytes);
      const double above = t < L ? static_cast<double>(cost[at(t, n, free)]) : c.loss;
      if (!std::isfinite(above)) continue;
      double time = fsum[t] + above + (t == L ? fsum[L] + c.loss : fsum[t - 1]);
      for (std::size_t j = 0; j < t; ++j)
        time += (j >= s0 ? seconds(c.cotangent, j) : 0) + seconds(c.sweep, j);
      if (time < mw_seconds) {
        mw_seconds = time;
        mw_top = t;
        mw_free = free;
        mw_keep = keep;
      }
    }
  }
  const bool moonwalk = mw_top > 0 && !(found && static_cast<double>(cost[at(0, n, units)]) <= mw_seconds);

  Plan p{.layers = L, .input_role = ValueRole::checkpoint, .steps = {}, .origin = "planner"};
  // The program's plan of segment [a, b) in m units.
  auto emit = [&](auto& self, std::size_t a, std::size_t b, std::size_t m) -> void {
    if (b == a + 1) {
      p.steps.push_back(a == L ? PlanStep{PlanOp::loss, L} : PlanStep{PlanOp::backward, a});
      return;
    }
    const std::size_t k = split[at(a, b, m)];
    if (!rebuilt[at(a, b, m)]) {
      for (std::size_t j = a; j < k; ++j)
        p.steps.push_back({PlanOp::forward, j, j + 1 == k ? ValueRole::checkpoint : ValueRole::temporary});
      self(self, k, b, m - s[k]);
      self(self, a, k, m);
      return;
    }
    for (std::size_t j = a; j < k; ++j)
      p.steps.push_back({PlanOp::forward, j, j + 1 == k ? ValueRole::checkpoint : ValueRole::temporary,
                         j >= a + 2 && c.branches(j) > 0});
    self(self, k, b, m - s[k] - (bsum[k] - bsum[a + 2]));
    p.steps.pop_back();  // (backward(k), or the loss: it follows inverse(k − 1))
    for (std::size_t j = k; j >= a + 2; --j) {
      p.steps.push_back({PlanOp::inverse, j - 1, ValueRole::rebuilt});
      p.steps.push_back(j == L ? PlanStep{PlanOp::loss, L} : PlanStep{PlanOp::backward, j});
    }
    p.steps.push_back({PlanOp::forward, a, ValueRole::operand});  // the check
    p.steps.push_back({PlanOp::backward, a + 1});
    p.steps.push_back({PlanOp::backward, a});
  };
  if (moonwalk) {
    const std::size_t t = mw_top;
    for (std::size_t i = 0; i < t; ++i)
      p.steps.push_back({PlanOp::forward, i,
                         i + 1 < t ? ValueRole::temporary
                         : t < L   ? ValueRole::checkpoint
                                   : ValueRole::operand,
                         i >= s0, CotangentKeep::none});
    if (t < L)
      emit(emit, t, n, mw_free);
    else
      p.steps.push_back({PlanOp::loss, L});
    for (std::size_t j = t; j-- > s0;)
      p.steps.push_back({PlanOp::cotangent, j, ValueRole::temporary, false, mw_keep[j]});
    for (std::size_t i = 0; i < t; ++i) {
      p.steps.push_back({PlanOp::sweep, i});
      if (i + 1 < t || t == L)
        p.steps.push_back({PlanOp::forward, i,
                           i + 1 == L || (i + 2 == t && t < L) ? ValueRole::operand : ValueRole::temporary});
    }
    if (t == L) p.steps.push_back({PlanOp::loss, L});
  } else if (!found) {
    // Rounding to units lost the tightest plans: hold nothing but x_0.
    for (std::size_t j = L + 1; j-- > 0;) {
      for (std::size_t i = 0; i < j; ++i)
        p.steps.push_back({PlanOp::forward, i, i + 1 == j ? ValueRole::operand : ValueRole::temporary});
      p.steps.push_back(j == L ? PlanStep{PlanOp::loss, L} : PlanStep{PlanOp::backward, j});
    }
  } else {
    emit(emit, 0, n, units);
  }
  // Roles for the report: a held value from which no forward step runs is an
  // operand, one forward step an activation, more a checkpoint.
  std::vector<std::size_t> created(L + 1, 0), uses(L + 1, 0);
  auto settle = [&](std::size_t i) {
    if (i == 0) return;
    PlanStep& st = p.steps[created[i]];
    if (st.op != PlanOp::forward || st.output == ValueRole::temporary) return;
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
    } else if (st.op == PlanOp::inverse) {
      created[st.layer] = k;
    } else if (st.op == PlanOp::backward) {
      settle(st.layer);
    }
  }
  p.input_role = moonwalk       ? ValueRole::temporary  // (nothing of x_0 is kept: the caller's)
                 : uses[0] <= 1 ? ValueRole::activation
                                : ValueRole::checkpoint;
  // (x_L: created by the last forward to it, read by the loss: an operand.)
  for (auto& st : p.steps)
    if (st.op == PlanOp::forward && st.layer + 1 == L) st.output = ValueRole::operand;
  return p;
}

}  // namespace moonwalk
