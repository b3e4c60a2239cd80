// The fidelity policy's retry state machine (fidelity/retry.hpp), without a
// network: attempt outcomes in, decisions and next settings out.
#include <catch2/catch.hpp>
#include <cmath>
#include <limits>
#include <moonwalk/fidelity/retry.hpp>
#include <random>
#include <string>

using namespace moonwalk;

namespace {

constexpr double tol = 1e-4;  // accept · tol = 2.5e-5 with the default accept = 0.25

/// Mixed Moonwalk's setup under the default policy (schedules/mixed.hpp).
RetrySetup mixed_setup() {
  return RetrySetup{.tolerance = tol, .can_escalate = true, .early_escalation = true};
}

AttemptOutcome estimate(double e) { return AttemptOutcome{.estimate = e}; }

/// The decisions for a run of outcomes, as letters: a accept, e escalate,
/// k keep_inputs, d densify_anchors, b backprop.
std::string run(FidelityRetry& r, std::initializer_list<AttemptOutcome> outcomes) {
  std::string s;
  for (const auto& o : outcomes) s += to_string(r.after(o)).front();
  return s;
}

}  // namespace

TEST_CASE("Retry: an attempt within accept · tolerance is accepted at once", "[fidelity][retry]") {
  FidelityRetry r(mixed_setup());
  CHECK(r.settings().may_give_up_for_double);
  CHECK_FALSE(r.settings().in_double);
  CHECK(r.after(estimate(0.25 * tol)) == Retry::accept);
  CHECK(r.fallbacks() == 0);
  // Just above the threshold is not.
  FidelityRetry q(mixed_setup());
  CHECK(q.after(estimate(0.26 * tol)) == Retry::densify_anchors);
  CHECK(q.fallbacks() == 1);
}

TEST_CASE("Retry: the ladder densify, double, densify… then backprop after four recomputations",
          "[fidelity][retry]") {
  FidelityRetry r(mixed_setup());
  const auto bad = estimate(10 * 0.25 * tol);  // 10× over: the scale grows by 40
  CHECK(run(r, {bad}) == "d");
  CHECK(r.settings().anchor_scale == Approx(40));
  CHECK_FALSE(r.settings().in_double);
  CHECK(run(r, {bad}) == "e");  // the second recomputation escalates
  CHECK(r.settings().in_double);
  CHECK_FALSE(r.settings().may_give_up_for_double);
  CHECK(run(r, {bad, bad}) == "dd");
  CHECK(r.settings().anchor_scale == Approx(40.0 * 40 * 40));
  CHECK(run(r, {bad}) == "b");
  CHECK(r.fallbacks() == 5);
}

TEST_CASE("Retry: an estimate far over (or not finite) escalates at once", "[fidelity][retry]") {
  for (double e : {2e3 * 0.25 * tol, std::numeric_limits<double>::infinity(),
                   std::numeric_limits<double>::quiet_NaN()}) {
    FidelityRetry r(mixed_setup());
    CHECK(r.after(estimate(e)) == Retry::escalate);
    CHECK(r.settings().in_double);
    CHECK(r.settings().anchor_scale == 1);
  }
}

TEST_CASE("Retry: giving up for double in the reverse pass escalates, once", "[fidelity][retry]") {
  FidelityRetry r(mixed_setup());
  CHECK(r.after({.gave_up_for_double = true}) == Retry::escalate);
  CHECK(r.fallbacks() == 1);
  CHECK(r.settings().in_double);
  CHECK_FALSE(r.settings().may_give_up_for_double);
  CHECK(r.after(estimate(0)) == Retry::accept);
}

TEST_CASE("Retry: drifted rebuilt inputs are kept first; early escalation waits for them",
          "[fidelity][retry]") {
  RetrySetup s = mixed_setup();
  s.rebuild_inputs = true;
  FidelityRetry r(s);
  CHECK(r.settings().rebuild_inputs);
  CHECK_FALSE(r.settings().may_give_up_for_double);
  // Drift over margin · tol: keep the inputs, whatever the estimate.
  CHECK(r.after({.estimate = 1e6 * tol, .drift = 0.2 * tol}) == Retry::keep_inputs);
  CHECK_FALSE(r.settings().rebuild_inputs);
  CHECK(r.settings().may_give_up_for_double);
  CHECK(r.settings().anchor_scale == 1);
  CHECK_FALSE(r.settings().in_double);

  // Drift within margin · tol, or none reported: the inputs were not the cause.
  for (const auto& o :
       {AttemptOutcome{.estimate = 2 * tol, .drift = 0.1 * tol}, AttemptOutcome{.estimate = 2 * tol}}) {
    FidelityRetry q(s);
    CHECK(q.after(o) == Retry::densify_anchors);
    CHECK(q.settings().rebuild_inputs);
  }
  // A NaN drift is not within anything.
  FidelityRetry n(s);
  CHECK(n.after({.estimate = 2 * tol, .drift = std::numeric_limits<double>::quiet_NaN()}) ==
        Retry::keep_inputs);
}

TEST_CASE("Retry: non-finite attempts and unverified policies are accepted as they are",
          "[fidelity][retry]") {
  FidelityRetry r(mixed_setup());
  CHECK(r.after({.finite = false, .gave_up_for_double = false, .estimate = 1}) == Retry::accept);
  CHECK(r.fallbacks() == 0);
  RetrySetup s = mixed_setup();
  s.verify = false;
  FidelityRetry u(s);
  CHECK(u.after(estimate(1)) == Retry::accept);
  // (A reverse pass that gave up has no gradient to accept: that still escalates.)
  FidelityRetry g(s);
  CHECK(g.after({.gave_up_for_double = true}) == Retry::escalate);
}

TEST_CASE("Retry: without double or anchors, what is left is backprop", "[fidelity][retry]") {
  RetrySetup s = mixed_setup();
  s.can_escalate = false;
  FidelityRetry r(s);
  CHECK_FALSE(r.settings().may_give_up_for_double);
  CHECK(run(r, {estimate(tol), estimate(tol), estimate(tol), estimate(tol), estimate(tol)}) == "ddddb");
  s.moves.densify_anchors = false;  // (Fidelity without policy anchors)
  FidelityRetry q(s);
  CHECK(q.after(estimate(tol)) == Retry::backprop);
  // Anchors off but double possible: double first, then backprop.
  s.can_escalate = true;
  FidelityRetry p(s);
  CHECK(run(p, {estimate(tol), estimate(tol)}) == "eb");
}

TEST_CASE("Retry: pure-forward's one move is double; what double cannot hold is returned flagged",
          "[fidelity][retry][pure]") {
  const RetrySetup s{.tolerance = tol,
                     .accept = 1,
                     .can_escalate = true,
                     .moves = {.densify_anchors = false, .keep_inputs = false, .backprop = false}};
  FidelityRetry r(s);
  CHECK_FALSE(r.settings().may_give_up_for_double);
  CHECK(r.after(estimate(0.9 * tol)) == Retry::accept);  // (accepted up to the tolerance itself)
  FidelityRetry q(s);
  CHECK(run(q, {estimate(2 * tol), estimate(2 * tol)}) == "ea");
  CHECK(q.fallbacks() == 1);  // the final accept is no recomputation
  RetrySetup d = s;
  d.start_in_double = true;
  FidelityRetry w(d);
  CHECK(w.after(estimate(2 * tol)) == Retry::accept);
  CHECK(w.fallbacks() == 0);
}

TEST_CASE("Retry: any run of outcomes ends, settings only ever move towards safer", "[fidelity][retry]") {
  std::mt19937_64 rng(7);
  std::uniform_real_distribution<double> u(0, 1);
  for (int trial = 0; trial < 2000; ++trial) {
    RetrySetup s{.tolerance = tol,
                 .verify = u(rng) < 0.9,
                 .can_escalate = u(rng) < 0.7,
                 .early_escalation = u(rng) < 0.7,
                 .start_in_double = u(rng) < 0.2,
                 .rebuild_inputs = u(rng) < 0.4,
                 .moves = {.densify_anchors = u(rng) < 0.8, .backprop = u(rng) < 0.8}};
    FidelityRetry r(s);
    AttemptSettings before = r.settings();
    int decisions = 0;
    for (;;) {
      AttemptOutcome o;
      o.finite = u(rng) < 0.98;
      o.gave_up_for_double = r.settings().may_give_up_for_double && u(rng) < 0.3;
      o.estimate = std::pow(10.0, -8 + 8 * u(rng));  // 1e-8 … 1: mostly over the tolerance
      if (r.settings().rebuild_inputs) o.drift = std::pow(10.0, -8 + 6 * u(rng));
      const Retry d = r.after(o);
      ++decisions;
      const AttemptSettings& now = r.settings();
      INFO("trial " << trial << ", decision " << decisions << ": " << to_string(d));
      CHECK((now.in_double || !before.in_double));
      CHECK((before.rebuild_inputs || !now.rebuild_inputs));
      CHECK(now.anchor_scale >= before.anchor_scale);
      if (d == Retry::escalate) CHECK((s.can_escalate || o.gave_up_for_double));
      if (d == Retry::densify_anchors) CHECK(s.moves.densify_anchors);
      if (d == Retry::backprop) {
        CHECK(s.moves.backprop);
        break;
      }
      if (d == Retry::accept) {
        CHECK((!o.finite || !s.verify || o.estimate <= s.accept * tol || !s.moves.backprop));
        break;
      }
      before = now;
      REQUIRE(decisions <= static_cast<int>(FidelityRetry::kMaxFallbacks) + 1);
    }
    CHECK(r.fallbacks() <= FidelityRetry::kMaxFallbacks + 1);
  }
}
