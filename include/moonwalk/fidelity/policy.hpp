// Moonwalk — the fidelity policy: how a Moonwalk schedule holds its gradient's
// error under a tolerance (docs/design.md §5).
//
// Error model. The sweep from a cotangent anchor (or from h_0) up to layer m
// adds a relative rounding error of about u per layer, and every later vijp
// stretches what came before by its typical amplification γ_k
// (core/amplification.hpp), so the relative error of h_m is predicted as
//
//   E_m = c · u_C · Σ_{j = a+1..m} Π_{k = j..m} γ_k                      (P)
//
// with a the last anchored layer below m, u_C the unit roundoff of the scalar
// type the cotangents are carried in, and c the calibration constant below.
// Anchoring layer i (keeping h_i from the reverse pass) restarts the sum.
//
// Policy `tolerance` (the default). The reverse pass walks down from the top,
// accumulating (P) for the segment above; when adding layer i would lift the
// prediction over `margin · tolerance`, layer i is anchored. Precision
// escalation: a second planner runs alongside with double's u_C = 2⁻⁵³; when
// the residuals plus the float anchors placed so far cost more than 1/8 of
// what backprop keeps (its layer inputs) and more than twice what double
// residuals and anchors would (smooth activations' σ' and kept inputs double
// in size; bit masks do not), the reverse pass stops and the step restarts
// with cotangents in double.
// Verification: the a-posteriori estimate (end-of-sweep mismatch and the
// mismatch below every anchor) must be ≤ accept · tolerance; above it the step
// is recomputed (inputs kept instead of rebuilt when their inversion drifted,
// anchors placed as if c were 4 · estimate / tolerance times larger, then
// double cotangents) and finally taken from reference backprop, which cannot
// drift. The stats record the tolerance, the precision used, the anchors and
// the number of recomputations (`fallbacks`).
//
// Calibration (BENCHMARKS.md, "Fidelity"): c was measured with
// `bench/fidelity.sh` as the ratio of the estimated error to u·Σ Π γ over the
// MLP and RevNet rows of docs/design.md §5 (float and double, depth 4–64, policy
// none); c = 4 sits above that ratio for every row, so the policy rarely has to
// fall back.
#pragma once

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <mutex>

#include "moonwalk/fidelity/tolerance.hpp"

namespace moonwalk {

/// The scalar type a Moonwalk schedule carries its cotangents in.
enum class Precision {
  working,            ///< the network's own scalar type
  double_cotangents,  ///< double, for a float network (layers are cast, core/amplification.hpp)
  automatic,          ///< working, escalating to double when anchors would cost more than backprop
};

/// What the automatic precision learned from earlier gradients: the shapes
/// (layer widths, batch) of the last kShapes networks whose steps ended in
/// double cotangents. A later step on a remembered shape starts in double,
/// skipping the working-precision attempt it would discard, except one probe
/// per interval, which tries the working precision again: a probe that holds
/// the tolerance forgets the shape; one that escalates again doubles the
/// shape's interval (kProbeEvery, 2 kProbeEvery, … up to kProbeEveryMax), so
/// a network that needs double keeps paying less for asking. Several shapes
/// are kept so that a training loop's short last batch does not make the next
/// epoch's full batches start over. Thread-safe.
class PrecisionMemory {
 public:
  static constexpr std::uint32_t kProbeEvery = 16;
  static constexpr std::uint32_t kProbeEveryMax = 256;
  static constexpr std::size_t kShapes = 4;

  /// Whether a step on `shape` starts in double (counts the step).
  bool starts_in_double(std::uint64_t shape) {
    if (shape == 0) return false;
    const std::lock_guard<std::mutex> lock(mutex_);
    Entry* e = find(shape);
    if (!e) return false;
    e->used = ++clock_;
    if (++e->since_probe < e->interval) return true;
    e->since_probe = 0;
    e->probing = true;
    return false;
  }
  /// The precision a step on `shape` ended in.
  void settled(std::uint64_t shape, bool in_double) {
    if (shape == 0) return;
    const std::lock_guard<std::mutex> lock(mutex_);
    Entry* e = find(shape);
    if (!in_double) {
      if (e) *e = Entry{};
      return;
    }
    if (!e) {
      e = &entries_[0];  // a free entry, else the least recently used
      for (Entry& x : entries_)
        if (x.shape == 0 || x.used < e->used) {
          e = &x;
          if (x.shape == 0) break;
        }
      *e = Entry{.shape = shape, .interval = kProbeEvery};
    } else if (e->probing) {
      e->interval = std::min(2 * e->interval, kProbeEveryMax);
    }
    e->probing = false;
    e->used = ++clock_;
  }

 private:
  struct Entry {
    std::uint64_t shape = 0;  // 0: free
    std::uint32_t interval = kProbeEvery, since_probe = 0;
    bool probing = false;  // the last step on it probed the working precision
    std::uint64_t used = 0;
  };
  Entry* find(std::uint64_t shape) {
    for (Entry& e : entries_)
      if (e.shape == shape) return &e;
    return nullptr;
  }
  std::mutex mutex_;
  std::array<Entry, kShapes> entries_{};
  std::uint64_t clock_ = 0;
};

namespace detail {
/// A fresh PrecisionMemory, or nullptr (no memory) when even that cannot be
/// allocated. noexcept, so that building a Fidelity cannot throw: schedules
/// are aggregates built with designated initialisers.
inline std::shared_ptr<PrecisionMemory> new_precision_memory() noexcept {
  try {
    return std::make_shared<PrecisionMemory>();
  } catch (...) {
    return nullptr;
  }
}
}  // namespace detail

/// What a Moonwalk schedule does to hold its error (header comment).
struct Fidelity {
  /// Place cotangent anchors from predicted amplification (policy `tolerance`).
  bool tolerance_anchors = true;
  /// Target relative error of the gradient; 0 selects default_target<S>().
  double tolerance = 0;
  Precision precision = Precision::automatic;
  /// Check the a-posteriori estimate against the tolerance and recompute when it is above.
  bool verify = true;
  /// The constant c of the error model (P).
  double calibration = 4;
  /// Anchors keep the prediction under margin · tolerance.
  double margin = 0.125;
  /// Verification accepts a gradient when its estimate is ≤ accept · tolerance:
  /// the estimate was measured at 0.4–13× the true error (BENCHMARKS.md,
  /// "Fidelity"), so a factor 4 below the tolerance holds the true error under it.
  double accept = 0.25;
  /// Precision::automatic remembers the shapes whose steps needed double
  /// (PrecisionMemory); copies of a Fidelity share it, so a schedule rebuilt
  /// every step from one ScheduleChoice, or one schedule object reused, skips
  /// the discarded float attempt. nullptr: every step starts afresh.
  std::shared_ptr<PrecisionMemory> memory = detail::new_precision_memory();

  /// The unguarded sweep: no policy anchors, working precision, no verification
  /// (the estimate is still computed and reported).
  static Fidelity none() noexcept {
    Fidelity f;
    f.tolerance_anchors = false;
    f.precision = Precision::working;
    f.verify = false;
    return f;
  }
  /// Cotangents in double, no policy anchors, no verification.
  static Fidelity double_cotangents() noexcept {
    Fidelity f = none();
    f.precision = Precision::double_cotangents;
    return f;
  }

  template <class S>
  [[nodiscard]] double target() const {
    return tolerance > 0 ? tolerance : default_target<S>();
  }
};

namespace detail {

/// Places anchors top-down in a reverse pass by the error model (P).
class AnchorPlanner {
 public:
  /// `budget` = margin · tolerance / (c · u_C): the largest Σ Π γ a segment may reach.
  explicit AnchorPlanner(double budget) : budget_(budget) {}

  /// Layer i, with typical amplification γ, is being crossed (reverse pass,
  /// i = L−1 … 0). Returns true when h_i must be anchored. γ < 1 (a
  /// contracting layer drops the part of an error outside its range) is used
  /// as is; every layer still adds its own rounding (the 1 in each term).
  bool place(double gamma) {
    if (std::isnan(gamma) || gamma < 0) gamma = std::numeric_limits<double>::infinity();
    const double sum = sum_ + gamma * product_;
    if (sum > budget_ && budget_ > 0) {
      restart();
      return true;
    }
    product_ *= gamma;
    sum_ = sum;
    worst_ = std::max(worst_, sum_);
    return false;
  }
  /// The segment below starts afresh (an anchor the planner did not choose).
  void restart() {
    sum_ = 0;
    product_ = 1;
  }
  /// Largest Σ Π γ over the segments so far (times c · u_C: the predicted error).
  [[nodiscard]] double worst() const { return worst_; }

 private:
  double budget_;
  double sum_ = 0, product_ = 1, worst_ = 0;
};

}  // namespace detail
}  // namespace moonwalk
