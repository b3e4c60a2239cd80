// Moonwalk — the fidelity policy's retry state machine: given how an attempt
// at a gradient ended, what the next attempt does (fidelity/policy.hpp).
//
// A Moonwalk schedule runs attempts until one is accepted. Each attempt runs
// with AttemptSettings (cotangent precision, anchor density, inputs rebuilt
// or kept) and reports an AttemptOutcome (finite or not, given up for double
// cotangents in its reverse pass, a-posteriori estimate, drift of the inputs
// it rebuilt). FidelityRetry::after() turns the outcome into a Retry decision
// and the settings of the next attempt:
//
//   not finite                             → accept (no rounding to repair)
//   gave up for double                     → escalate
//   not verified, or estimate ≤ accept·tol → accept
//   more than kMaxFallbacks recomputations → backprop (or accept, flagged, where
//                                            the schedule has no backprop move)
//   rebuilt inputs drifted (> margin·tol)  → keep_inputs
//   still in the working precision, double possible, and the anchors have
//   been densified once or the estimate is > 10³ over → escalate
//   else                                   → densify_anchors (the calibration
//                                            scale × max(4, 4 · estimate / (accept · tol)))
//
// A schedule without some move (pure-forward Moonwalk has no anchors, no
// rebuilt inputs and no backprop fallback) says so in RetryMoves; where the
// next move in the list is missing, the following one applies, and where none
// is left the attempt is accepted (its Stats::within_tolerance then says it
// does not hold the tolerance).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <optional>
#include <string_view>

namespace moonwalk {

/// The settings of one attempt.
struct AttemptSettings {
  /// Cotangents in double (a float network's layers cast).
  bool in_double = false;
  /// Multiplies the error model's calibration constant c: > 1 places anchors more densely.
  double anchor_scale = 1;
  /// Invertible layers rebuild their input by inversion instead of keeping a residual.
  bool rebuild_inputs = false;
  /// The reverse pass gives up (AttemptOutcome::gave_up_for_double) as soon as
  /// double cotangents would clearly anchor for less.
  bool may_give_up_for_double = false;
};

/// How one attempt ended, as the engine measured it.
struct AttemptOutcome {
  /// The input and the loss were finite (a non-finite one is returned as is).
  bool finite = true;
  /// The reverse pass stopped: double cotangents anchor for clearly less.
  bool gave_up_for_double = false;
  /// A-posteriori relative error estimate of the gradient.
  double estimate = 0;
  /// Relative mismatch of the inputs rebuilt by inversion (none when none were).
  std::optional<double> drift = std::nullopt;
};

/// What the next step of a gradient is.
enum class Retry {
  accept,           ///< return the attempt's gradient
  escalate,         ///< recompute with cotangents in double
  keep_inputs,      ///< recompute keeping the inputs that were rebuilt by inversion
  densify_anchors,  ///< recompute with anchors placed more densely
  backprop,         ///< compute the gradient by reference backprop
};

[[nodiscard]] constexpr std::string_view to_string(Retry r) noexcept {
  switch (r) {
    case Retry::accept:
      return "accept";
    case Retry::escalate:
      return "escalate";
    case Retry::keep_inputs:
      return "keep_inputs";
    case Retry::densify_anchors:
      return "densify_anchors";
    case Retry::backprop:
      return "backprop";
  }
  return "?";
}

/// The recomputations a schedule can make.
struct RetryMoves {
  bool escalate = true;
  bool densify_anchors = true;
  bool keep_inputs = true;
  bool backprop = true;
};

/// What the retry machine needs to know of the policy and the network.
struct RetrySetup {
  /// The relative error the gradient must hold.
  double tolerance = 0;
  /// Check the a-posteriori estimate (Fidelity::verify); false accepts every finite attempt.
  bool verify = true;
  /// An attempt is accepted when its estimate is ≤ accept · tolerance (Fidelity::accept).
  double accept = 0.25;
  /// Rebuilt inputs whose drift is above margin · tolerance are kept instead (Fidelity::margin).
  double margin = 0.125;
  /// The network's layers can be cast for double cotangents, and the policy allows it.
  bool can_escalate = false;
  /// The reverse pass may give up early for double (Precision::automatic with policy anchors).
  bool early_escalation = false;
  /// The first attempt's cotangents are double (asked for, or remembered for the shape).
  bool start_in_double = false;
  /// The first attempt rebuilds invertible layers' inputs.
  bool rebuild_inputs = false;
  RetryMoves moves{};
};

/// The retry state machine (header comment). Not thread-safe: one per gradient.
class FidelityRetry {
 public:
  /// Recomputations after which the gradient is taken from backprop.
  static constexpr std::size_t kMaxFallbacks = 4;
  /// An estimate this many times over the acceptance threshold escalates at once.
  static constexpr double kEscalateRatio = 1e3;

  explicit FidelityRetry(const RetrySetup& setup) : setup_(setup) {
    settings_.in_double = setup.start_in_double;
    settings_.rebuild_inputs = setup.rebuild_inputs;
    refresh();
  }

  /// The settings of the next attempt.
  [[nodiscard]] const AttemptSettings& settings() const { return settings_; }
  /// Recomputations so far (escalations included).
  [[nodiscard]] std::size_t fallbacks() const { return fallbacks_; }
  /// The last decision (Retry::accept before any attempt).
  [[nodiscard]] Retry last() const { return last_; }

  /// The decision after an attempt run with settings(); settings() is then the next attempt's.
  Retry after(const AttemptOutcome& o) { return last_ = decide(o); }

 private:
  Retry decide(const AttemptOutcome& o) {
    if (!o.finite) return Retry::accept;
    if (!o.gave_up_for_double && (!setup_.verify || o.estimate <= setup_.accept * setup_.tolerance))
      return Retry::accept;
    const Retry r = recompute(o, fallbacks_ + 1);
    if (r != Retry::accept) ++fallbacks_;
    return r;
  }
  // The move of recomputation number n (1, 2, …).
  Retry recompute(const AttemptOutcome& o, std::size_t n) {
    if (o.gave_up_for_double) return move_to_double();
    const double tol = setup_.tolerance;
    if (n > kMaxFallbacks) return setup_.moves.backprop ? Retry::backprop : Retry::accept;
    if (settings_.rebuild_inputs && setup_.moves.keep_inputs && o.drift &&
        !(*o.drift <= setup_.margin * tol)) {
      settings_.rebuild_inputs = false;
      refresh();
      return Retry::keep_inputs;
    }
    const double ratio = std::isfinite(o.estimate) ? o.estimate / (setup_.accept * tol) : 1e6;
    const bool double_left = !settings_.in_double && setup_.can_escalate && setup_.moves.escalate;
    if (double_left && (n >= 2 || ratio > kEscalateRatio || !setup_.moves.densify_anchors))
      return move_to_double();
    if (setup_.moves.densify_anchors) {
      settings_.anchor_scale *= std::max(4.0, 4 * ratio);
      return Retry::densify_anchors;
    }
    // Nothing left that could do better than this attempt but backprop.
    return setup_.moves.backprop ? Retry::backprop : Retry::accept;
  }
  Retry move_to_double() {
    settings_.in_double = true;
    refresh();
    return Retry::escalate;
  }
  // Early escalation only from the working precision and with kept inputs
  // (their drift is settled first, and a kept input costs twice as much in double).
  void refresh() {
    settings_.may_give_up_for_double =
        setup_.early_escalation && setup_.can_escalate && !settings_.in_double && !settings_.rebuild_inputs;
  }

  RetrySetup setup_;
  AttemptSettings settings_{};
  std::size_t fallbacks_ = 0;
  Retry last_ = Retry::accept;
};

}  // namespace moonwalk
