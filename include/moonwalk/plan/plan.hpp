// Moonwalk — a plan: the passes of a gradient step as data.
//
// A chain of L layers maps x_0 → x_1 → … → x_L, then the loss gives h_L =
// ∂ℓ/∂x_L, and layer i's backward step reads its input x_i and its output
// cotangent h_{i+1}:  g_i += J_{θ,i}ᵀ h_{i+1},  h_i = J_iᵀ h_{i+1}.
// A plan lists the steps in order:
//
//   forward(i)   x_{i+1} = f_i(x_i); x_i must be held; x_{i+1} is held after
//                it, with the role the step gives it; x_i is freed when its
//                role is `temporary`.
//   loss         ℓ and h_L from x_L (held; freed after).
//   backward(i)  as above, from x_i (held; freed after) and h_{i+1}.
//   inverse(i)   x_i = f_i⁻¹(x_{i+1}), right before backward(i+1) or
//                cotangent(i+1) (or the loss) frees x_{i+1}: x_i is held,
//                `rebuilt`. inverse(0) rebuilds the caller's x_0 beside it:
//                a check of the stretch above (x̂_0 against x_0), then dropped.
//
// A rebuilt value carries the inversion's rounding drift, so a plan must
// check every stretch it rebuilds: a rebuilt x_{i+1} is either inverted
// further (it is the source of inverse(i)) or replaced by forward(i) from a
// held exact x_i — a forward step onto a held rebuilt value is that check:
// the executor measures max|x̂ − x| / max|x| and keeps the exact value.
// Nothing else reads a rebuilt value but its backward or cotangent step. A layer whose
// backward step reads a rebuilt input and whose derivative is piecewise
// constant (keeps_branches: LeakyReLU) reads its branch bits instead, kept
// as its residual by the forward step that made its input's successor: a rebuilt
// ±1e-17 where the forward pass had an exact 0 picks the other derivative.
//
// Moonwalk's moves (docs/design.md §1) are four more steps. forward(i) may
// keep layer i's vijp residual r_i (bit masks of a LeakyReLU, σ′ of a smooth
// activation, nothing for a Linear) in place of x_i; then
//
//   cotangent(i) h_i = J_iᵀ h_{i+1} from r_i alone (freed after), no ∂ℓ/∂θ_i,
//                keeping of h_{i+1} what the sweep needs to recover it
//                across layer i: nothing (vijp), its fragment φ_i (the part
//                J_iᵀ erases), or h_{i+1} itself (an anchor). Without a kept
//                r_i it reads a held x_i (rebuilt by inversion, or x_0) and
//                derives r_i from it; a held x_i is freed after (i ≥ 1), and
//                must be read so or be the source of a held rebuilt x_{i−1};
//   tangents(i)  h_i = ∂ℓ/∂x_i by forward mode, from a held x_i (freed
//                after, i ≥ 1) and the loss's h_L: for each feature k of x_i
//                the unit tangent e_k (in every column) is carried through
//                layers i … L−1 by jvps, their inputs recomputed alongside,
//                and h_i[k, b] = ⟨h_L[:, b], t_L[:, b]⟩ (n_i passes of the
//                tail). It may jump the cotangent down from any h_c, c > i;
//                the layers i … c−1 it passes are crossed by the sweep by
//                vijp. A cotangent step right before it makes no h (the
//                tangents replace it): it only keeps its fragment or anchor.
//                Pure-forward Moonwalk's plans (pure_moonwalk_plan) are made
//                of these, with no reverse pass;
//   sweep(i)     once the cotangents are down to h_i: h_{i+1} = vijp(x_i, h_i)
//                (with φ_i, or the anchor, which checks the swept h_i against
//                J_iᵀ h_{i+1}), then g_i += J_{θ,i}ᵀ h_{i+1}; from x_i (held;
//                freed after unless temporary: then the forward step from it
//                frees it). With the cotangent at
//                h_{i+1} already (the reverse stopped there), only g_i.
//
// The sweep walks up, forward(i) making x_{i+1} for sweep(i+1), to the top
// of the Moonwalk layers: x_L, where a second loss step checks the swept
// h_L against ∂ℓ/∂x_L, or the lowest layer reversed by backward steps, whose
// h is the anchor of the sweep's last step. So one plan may reverse its top
// layers by backward steps and its bottom ones by Moonwalk (moonwalk_plan).
// A residual is kept only for a step that reads it: cotangent(i), or
// backward(i) from a rebuilt x_i. A rebuilt value that a cotangent step
// reads needs no check of its own: its drift changes h_i, which the sweep,
// recomputing x_i exactly, checks at the next anchor or at x_L.
//
// Which values are held when is the whole difference between backprop (every
// input kept), checkpointing (some kept, the rest recomputed from them),
// Moonwalk (residuals kept, inputs recomputed by the sweep) and the plans the
// planner finds (plan/planner.hpp); one executor runs them all
// (plan/executor.hpp). x_0 is the caller's and never freed.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <limits>
#include <sstream>
#include <string>
#include <vector>

#include "moonwalk/core/types.hpp"

namespace moonwalk {

/// Why a value is held (the saved-residual report lists checkpoints and
/// activations; every held value counts in the working set).
enum class ValueRole : std::uint8_t {
  temporary,   ///< freed by the forward step that reads it
  operand,     ///< read next by its own layer's backward step (the last layer's: after the forward to x_L)
  activation,  ///< kept for its layer's backward step after one forward step from it
  checkpoint,  ///< forward steps recompute other values from it more than once
  rebuilt,  ///< made by inverse(i) from x_{i+1}, read by backward(i) or cotangent(i) (and inverse(i−1) or a
            ///< check)
};

[[nodiscard]] inline const char* to_string(ValueRole r) {
  switch (r) {
    case ValueRole::temporary:
      return "temporary";
    case ValueRole::operand:
      return "operand";
    case ValueRole::activation:
      return "activation";
    case ValueRole::checkpoint:
      return "checkpoint";
    case ValueRole::rebuilt:
      return "rebuilt";
  }
  return "?";
}

enum class PlanOp : std::uint8_t { forward, loss, backward, inverse, cotangent, tangents, sweep };

/// What cotangent(i) keeps of h_{i+1} for sweep(i) to recover it across layer i.
enum class CotangentKeep : std::uint8_t {
  none,      ///< nothing: h_{i+1} = vijp(x_i, h_i) (layer i submersive)
  fragment,  ///< φ_i, the part of h_{i+1} that J_iᵀ erases (layer i fragmental)
  anchor,    ///< h_{i+1} itself (any layer)
};

[[nodiscard]] inline const char* to_string(CotangentKeep k) {
  switch (k) {
    case CotangentKeep::none:
      return "vijp";
    case CotangentKeep::fragment:
      return "fragment";
    case CotangentKeep::anchor:
      return "anchor";
  }
  return "?";
}

/// One step of a plan. `layer` is i of forward(i) / backward(i) /
/// inverse(i) / cotangent(i) / sweep(i) (L for the loss); `output` is the
/// role of x_{i+1} after forward(i) (of x_i after inverse(i): rebuilt);
/// `residual`: forward(i) also keeps layer i's vijp residual r_i, read by
/// cotangent(i), or by backward(i) from a rebuilt x_i (its branch bits);
/// `keep`: what cotangent(i) keeps of h_{i+1}.
struct PlanStep {
  PlanOp op = PlanOp::forward;
  std::size_t layer = 0;
  ValueRole output = ValueRole::temporary;
  bool residual = false;
  CotangentKeep keep = CotangentKeep::none;
  bool operator==(const PlanStep&) const = default;
};

/// The steps of one gradient, for a chain of `layers` layers.
struct Plan {
  std::size_t layers = 0;
  ValueRole input_role = ValueRole::activation;  ///< x_0's role (the report's)
  std::vector<PlanStep> steps;
  std::string origin;  ///< what made it: "backprop", "every-k", "binomial", "revbackprop", "moonwalk",
                       ///< "pure", "planner"

  [[nodiscard]] std::size_t forward_steps() const { return count(PlanOp::forward); }
  /// Layers reversed by Moonwalk (cotangent steps) and swept.
  [[nodiscard]] std::size_t swept_layers() const { return count(PlanOp::sweep); }
  [[nodiscard]] std::size_t inverse_steps() const { return count(PlanOp::inverse); }
  [[nodiscard]] std::size_t count(PlanOp op) const {
    return static_cast<std::size_t>(
        std::count_if(steps.begin(), steps.end(), [op](const PlanStep& s) { return s.op == op; }));
  }
};

/// Drifts of rebuilt stretches measured on the chain's values (costs.hpp,
/// stretch_drifts): at(a, k) = max|x̂_{a+1} − x_{a+1}| / max|x_{a+1}|, with
/// x̂_{a+1} rebuilt from x_k by the inverses of layers k−1 … a+1 — what the
/// check after that stretch measures; +∞ where nothing was measured (the
/// stretch crosses a layer without inverse, or continues one that already
/// drifted over the measurement's limit). `unit`: the unit roundoff of the
/// scalar type measured in.
struct StretchDrifts {
  /// Entries of top k: drift[first[k] … first[k + 1]) for a = k−2, k−3, …
  std::vector<std::size_t> first;
  std::vector<float> drift;
  double unit = 0;

  [[nodiscard]] bool empty() const { return first.empty(); }
  [[nodiscard]] double at(std::size_t a, std::size_t k) const {
    if (k + 1 >= first.size() || k < a + 2) return std::numeric_limits<double>::infinity();
    const std::size_t i = first[k] + (k - 2 - a);
    return i < first[k + 1] ? static_cast<double>(drift[i]) : std::numeric_limits<double>::infinity();
  }
};

/// What a plan's steps cost on one chain at one batch size: x_i's bytes
/// (L + 1 values), the seconds of each layer's forward, backward and inverse
/// step (L each; an inverse of +∞: the layer has none; an empty list: no
/// layer has one) and of the loss, and the bytes of each layer's branch bits
/// (L entries, 0 where the layer keeps none; empty: none does).
///
/// A rebuilt stretch, layers a+1 … k−1 inverted from x_k down, is predicted
/// to drift by c · u · D with the error model of fidelity/policy.hpp:
///
///   D(a, k) = Σ_{t=a+1..k−1} Π_{l=a+1..t} γ_l
///
/// (inverse(t)'s rounding, stretched by each inverse below it), γ_l the
/// typical amplification of layer l (core/amplification.hpp; `inverse_gamma`,
/// empty: 1 each) — or, where the stretch's drift d was measured
/// (`measured`), D(a, k) = max(d / u, k − a − 1): at least one rounding per
/// inverse. The planner rebuilds only stretches with D ≤ drift_budget
/// (= tolerance / (c · u): Planned sets it; +∞: no limit).
struct ChainCosts {
  std::vector<std::size_t> value_bytes;
  std::vector<double> forward;
  std::vector<double> backward;
  double loss = 0;
  std::vector<double> inverse;
  std::vector<std::size_t> branch_bytes;
  std::vector<double> inverse_gamma{};
  StretchDrifts measured{};
  double drift_budget = std::numeric_limits<double>::infinity();
  /// Moonwalk's moves, per layer (each list empty: 0 bytes, 0 seconds,
  /// every crossing allowed): the bytes of its vijp residual r_i (0 for a
  /// Linear; empty: the branch bits') and of its fragment φ_i, how the sweep
  /// can cross it (`none`: by vijp, or by a fragment or an anchor;
  /// `fragment`: by a fragment or an anchor; `anchor`: by an anchor only),
  /// and the seconds of its cotangent and sweep steps (the sweep's forward
  /// step is forward(i)'s).
  std::vector<std::size_t> residual_bytes{};
  std::vector<std::size_t> fragment_bytes{};
  std::vector<CotangentKeep> crossing{};
  std::vector<double> cotangent{};
  std::vector<double> sweep{};
  /// The typical amplification γ_i of the sweep across layer i
  /// (core/amplification.hpp; empty: 1 each), for the anchors the planner
  /// places where the error model (P) would pass its budget (plan_within).
  std::vector<double> sweep_gamma{};

  /// γ of layer i's inverse step (1 where none is given; NaN or < 0: +∞).
  [[nodiscard]] double gamma(std::size_t i) const {
    if (i >= inverse_gamma.size()) return 1;
    const double g = inverse_gamma[i];
    return g >= 0 ? g : std::numeric_limits<double>::infinity();
  }

  /// D(a, k) of the stretch a+1 … k−1: measured where `measured` holds
  /// drifts, else Σ_{t=a+1..k−1} Π_{l=a+1..t} γ_l (the planner's sums,
  /// planner.hpp).
  [[nodiscard]] double drift(std::size_t a, std::size_t k) const {
    if (!measured.empty()) return std::max(measured.at(a, k) / measured.unit, static_cast<double>(k - a - 1));
    double gammas = 1, d = 0;
    for (std::size_t t = a + 1; t < k; ++t) {
      gammas *= gamma(t);
      d += gammas;
    }
    return d;
  }

  [[nodiscard]] std::size_t layers() const { return forward.size(); }
  [[nodiscard]] bool invertible(std::size_t i) const {
    return i < inverse.size() && inverse[i] < std::numeric_limits<double>::infinity();
  }
  [[nodiscard]] std::size_t branches(std::size_t i) const {
    return i < branch_bytes.size() ? branch_bytes[i] : 0;
  }
  /// Bytes of layer i's residual r_i (its branch bits where residual_bytes is empty).
  [[nodiscard]] std::size_t residual(std::size_t i) const {
    return residual_bytes.empty() ? branches(i) : i < residual_bytes.size() ? residual_bytes[i] : 0;
  }
  [[nodiscard]] std::size_t fragment(std::size_t i) const {
    return i < fragment_bytes.size() ? fragment_bytes[i] : 0;
  }
  /// Whether sweep(i) can recover h_{i+1} from what `keep` says cotangent(i) kept.
  [[nodiscard]] bool can_cross(std::size_t i, CotangentKeep keep) const {
    const CotangentKeep how = i < crossing.size() ? crossing[i] : CotangentKeep::none;
    return keep == CotangentKeep::anchor || how == CotangentKeep::none || how == keep;
  }
  /// Throws ScheduleError unless the sizes agree and every time is ≥ 0 (and
  /// finite, but for an inverse's +∞).
  void check() const {
    const std::size_t n = layers();
    if (n == 0) throw ScheduleError("chain costs: no layers");
    if (backward.size() != n || value_bytes.size() != n + 1)
      throw ScheduleError(detail::cat("chain costs: ", n, " forward times, ", backward.size(),
                                      " backward times and ", value_bytes.size(),
                                      " value sizes (need L, L and L + 1)"));
    if (!inverse.empty() && inverse.size() != n)
      throw ScheduleError(detail::cat("chain costs: ", inverse.size(), " inverse times for ", n, " layers"));
    if (!inverse_gamma.empty() && inverse_gamma.size() != n)
      throw ScheduleError(
          detail::cat("chain costs: ", inverse_gamma.size(), " inverse amplifications for ", n, " layers"));
    if (!measured.empty() &&
        (measured.first.size() != n + 2 || measured.first.back() != measured.drift.size() ||
         !std::is_sorted(measured.first.begin(), measured.first.end()) || !(measured.unit > 0)))
      throw ScheduleError(detail::cat("chain costs: measured drifts for ", measured.first.size(),
                                      " - 2 layers (need ", n, "), or no unit roundoff"));
    if (!branch_bytes.empty() && branch_bytes.size() != n)
      throw ScheduleError(
          detail::cat("chain costs: ", branch_bytes.size(), " branch-bit sizes for ", n, " layers"));
    const auto sized = [n](std::size_t k, const char* what) {
      if (k != 0 && k != n)
        throw ScheduleError(detail::cat("chain costs: ", k, " ", what, " for ", n, " layers"));
    };
    sized(residual_bytes.size(), "residual sizes");
    sized(fragment_bytes.size(), "fragment sizes");
    sized(crossing.size(), "crossings");
    sized(cotangent.size(), "cotangent times");
    sized(sweep.size(), "sweep times");
    sized(sweep_gamma.size(), "sweep amplifications");
    auto ok = [](double t) { return std::isfinite(t) && t >= 0; };
    auto ok_at = [&](const std::vector<double>& t, std::size_t i) { return i >= t.size() || ok(t[i]); };
    for (std::size_t i = 0; i < n; ++i)
      if (!ok(forward[i]) || !ok(backward[i]) || (i < inverse.size() && !(inverse[i] >= 0)) ||
          !ok_at(cotangent, i) || !ok_at(sweep, i))
        throw ScheduleError(detail::cat("chain costs: layer ", i, ": time not finite and >= 0"));
    if (!ok(loss)) throw ScheduleError("chain costs: loss time not finite and >= 0");
  }
};

/// What a plan costs on a chain (ChainCosts): the peak of the bytes held at
/// once (x_0 excluded: the caller's; branch bits and a check's second copy
/// included) and of the accounted roles (checkpoints, activations and branch
/// bits, x_0 included), the forward and inverse steps, the checks, and the
/// time.
struct PlanFigures {
  std::size_t peak_held_bytes = 0;
  std::size_t peak_value_bytes = 0;  ///< of the values x_i alone (what the executor's arena holds)
  std::size_t peak_kept_bytes = 0;
  std::size_t peak_checkpoints = 0;  ///< values held as checkpoints at once, x_0 included
  std::size_t forward_steps = 0;     ///< checks included
  std::size_t inverse_steps = 0;
  std::size_t checks = 0;  ///< forward steps onto a rebuilt value
  std::size_t cotangent_steps = 0;
  std::size_t tangent_steps = 0;  ///< h_i by forward mode (tangents(i))
  std::size_t sweep_steps = 0;
  std::size_t anchors = 0;  ///< cotangent steps that keep h_{i+1} itself
  double seconds = 0;
};

/// What a plan does with a layer's input x_i, as the report names it.
enum class InputFate : std::uint8_t {
  kept,        ///< computed once and held until the layer's backward step
  checkpoint,  ///< held as a checkpoint that later values are recomputed from
  recomputed,  ///< computed more than once (from a checkpoint) before its backward step
  rebuilt,     ///< rebuilt by inversion from x_{i+1}
  swept,       ///< reduced to the layer's residual, recomputed by the sweep
};

[[nodiscard]] inline const char* to_string(InputFate f) {
  switch (f) {
    case InputFate::kept:
      return "kept";
    case InputFate::checkpoint:
      return "checkpoint";
    case InputFate::recomputed:
      return "recomputed";
    case InputFate::rebuilt:
      return "rebuilt";
    case InputFate::swept:
      return "swept";
  }
  return "?";
}

/// One layer's row of a plan's report (plan_rows): what happens to its
/// input x_i, its steps, and their predicted cost on a ChainCosts.
struct LayerPlan {
  std::size_t layer = 0;
  InputFate input = InputFate::kept;
  std::size_t forwards = 0;  ///< forward(i) steps, checks of x_{i+1} included
  std::size_t inverses = 0;  ///< inverse(i) steps: x_i rebuilt
  bool checked = false;      ///< a forward step checked a rebuilt x_i (layer 0: inverse(0) checked at x_0)
  bool residual = false;     ///< a forward step kept layer i's residual r_i
  bool crossed = false;      ///< a cotangent step crossed layer i (and a sweep step again)
  /// How the sweep crosses layer i (with `crossed`).
  CotangentKeep keep = CotangentKeep::none;
  /// Bytes of x_i while it waits as an activation or checkpoint (0 for an
  /// operand or a rebuilt value, which wait for nothing), plus its residual
  /// and what its cotangent step keeps.
  std::size_t kept_bytes = 0;
  /// Bytes held when its gradient is read (backward(i) or sweep(i); the
  /// plan's accounting: x_0 excluded).
  std::size_t working_bytes = 0;
  /// forwards · forward_i + inverses · inverse_i + backward_i, or with the
  /// sweep: + cotangent_i + sweep_i in place of backward_i.
  double seconds = 0;
};

namespace detail {
inline PlanFigures walk_plan(const Plan& p, const ChainCosts& c, std::vector<LayerPlan>* rows);
[[noreturn]] inline void bad_plan(const Plan& p, std::size_t k, const std::string& why) {
  throw ScheduleError(detail::cat("plan (", p.origin.empty() ? std::string("?") : p.origin, ", ", p.layers,
                                  " layers): step ", k, ": ", why));
}
inline bool accounted(ValueRole r) { return r == ValueRole::activation || r == ValueRole::checkpoint; }
}  // namespace detail

/// Checks that `p` is a gradient of its chain — every forward step reads a
/// held value that is not rebuilt and writes one not held (or checks a
/// rebuilt one), every inverse step runs right before the backward or
/// cotangent step (or loss) that frees its source, of a layer with an
/// inverse (inverse(0): a check at x_0), the loss comes once from a held
/// x_L before any backward step, the backward and cotangent steps run L−1,
/// …, down from h_L (a tangents step may jump down, from a held exact x_i),
/// a backward step from a held input, a rebuilt input only where the
/// stretch it belongs to is checked below it (by a forward step, or
/// inverse(0) at x_0) and, for a layer with branch bits, with its bits
/// kept, a cotangent step from its layer's residual or a held x_i (rebuilt:
/// with its branch bits, as backward steps) keeping what `c` says the
/// sweep can cross it by; the sweep steps run up from the bottom of the
/// cotangent steps, each from a held input, and end checked (a second loss
/// at x_L, or an anchor at their last layer); every layer's gradient is
/// read exactly once, every residual kept is read, and nothing but x_0 is
/// held at the end — and returns its figures on `c`, whose lists may be
/// empty (no bytes, no time, every layer invertible, no branch bits, every
/// crossing allowed). Throws ScheduleError naming the first wrong step.
inline PlanFigures check_plan(const Plan& p, const ChainCosts& c) { return detail::walk_plan(p, c, nullptr); }

/// check_plan, and one row per layer (LayerPlan) in `rows`.
inline PlanFigures plan_rows(const Plan& p, const ChainCosts& c, std::vector<LayerPlan>& rows) {
  return detail::walk_plan(p, c, &rows);
}

namespace detail {
inline PlanFigures walk_plan(const Plan& p, const ChainCosts& c, std::vector<LayerPlan>* rows) {
  const std::size_t n = p.layers;
  if (n == 0) detail::bad_plan(p, 0, "a chain of no layers has no gradient");
  if (!c.value_bytes.empty() && c.value_bytes.size() != n + 1)
    detail::bad_plan(p, 0, detail::cat(c.value_bytes.size(), " value sizes for ", n + 1, " values"));
  auto bytes = [&](std::size_t i) { return c.value_bytes.empty() ? std::size_t{0} : c.value_bytes[i]; };
  auto seconds = [](const std::vector<double>& t, std::size_t i) { return i < t.size() ? t[i] : 0.0; };
  // held[i]: x_i is held; res[i]: layer i's residual; keep[i]: what
  // cotangent(i) kept of h_{i+1} (crossed[i]: it ran; kept[i]: not yet
  // swept); read[i]: ∂ℓ/∂θ_i.
  std::vector<char> held(n + 1, 0), res(n, 0), crossed(n, 0), swept_over(n, 0), read(n, 0);
  std::vector<CotangentKeep> keep(n, CotangentKeep::none);
  std::vector<std::size_t> keep_bytes(n, 0);
  std::vector<ValueRole> role(n + 1, ValueRole::temporary);
  held[0] = 1;
  role[0] = p.input_role;
  std::size_t now = 0, values = 0, kept = detail::accounted(p.input_role) ? bytes(0) : 0;
  std::size_t checkpoints = p.input_role == ValueRole::checkpoint ? 1 : 0;
  PlanFigures f;
  f.peak_kept_bytes = kept;
  f.peak_checkpoints = checkpoints;
  std::size_t cotangent = n + 1;  // h_c is the current cotangent; n + 1: none yet
  bool sweeping = false, checked_end = false, x0_checked = false;
  bool last_anchor = false, any_cross = false;  // the last crossing was by an anchor; any crossing
  std::vector<std::size_t> made(n + 1, 0);      // forward steps that made x_i (checks excluded)
  std::vector<char> was_checkpoint(n + 1, 0), was_accounted(n + 1, 0);
  was_checkpoint[0] = p.input_role == ValueRole::checkpoint;
  was_accounted[0] = detail::accounted(p.input_role);
  if (rows) {
    rows->assign(n, LayerPlan{});
    for (std::size_t i = 0; i < n; ++i) (*rows)[i].layer = i;
  }
  auto peaks = [&](std::size_t extra = 0) {
    f.peak_held_bytes = std::max(f.peak_held_bytes, now + extra);
    f.peak_value_bytes = std::max(f.peak_value_bytes, values + extra);
    f.peak_kept_bytes = std::max(f.peak_kept_bytes, kept);
  };
  auto free_value = [&](std::size_t i) {
    held[i] = 0;
    if (role[i] == ValueRole::checkpoint) --checkpoints;
    if (i == 0) return;
    now -= bytes(i);
    values -= bytes(i);
    if (detail::accounted(role[i])) kept -= bytes(i);
  };
  // A residual is freed by the step that reads it (`used`), or by a
  // forward step keeping it anew, or by backward(i) reading x_i itself: then
  // it was kept for nothing.
  auto free_residual = [&](std::size_t k, std::size_t i, bool used) {
    if (!res[i]) return;
    if (!used)
      detail::bad_plan(
          p, k,
          detail::cat("layer ", i, "'s residual, kept by a forward step, is read by no step (only ",
                      "cotangent(", i, ") and backward(", i, ") from a rebuilt x_", i, " read it)"));
    res[i] = 0;
    now -= c.residual(i);
    kept -= c.residual(i);
  };
  auto free_keep = [&](std::size_t i) {
    swept_over[i] = 1;
    now -= keep_bytes[i];
    kept -= keep_bytes[i];
    keep_bytes[i] = 0;
  };
  // The row of layer i once its gradient is read.
  auto row_read = [&](std::size_t i) {
    if (!rows) return;
    LayerPlan& r = (*rows)[i];
    r.working_bytes = now;
    r.input = r.inverses > 0      ? InputFate::rebuilt
              : crossed[i]        ? (was_checkpoint[i] ? InputFate::checkpoint : InputFate::swept)
              : was_checkpoint[i] ? InputFate::checkpoint
              : made[i] > 1       ? InputFate::recomputed
                                  : InputFate::kept;
    if (i == 0 && r.input == InputFate::swept) r.input = InputFate::kept;  // (x_0: the caller's)
    r.kept_bytes += (was_accounted[i] ? bytes(i) : 0) + (r.residual ? c.residual(i) : 0);
  };
  for (std::size_t k = 0; k < p.steps.size(); ++k) {
    const PlanStep& s = p.steps[k];
    const std::size_t i = s.layer;
    if (checked_end) detail::bad_plan(p, k, "a step after the sweep's check at x_L");
    switch (s.op) {
      case PlanOp::forward: {
        if (i >= n) detail::bad_plan(p, k, detail::cat("forward(", i, ") past the last layer"));
        if (!held[i])
          detail::bad_plan(p, k, detail::cat("forward(", i, ") reads x_", i, ", which is not held"));
        if (role[i] == ValueRole::rebuilt)
          detail::bad_plan(p, k,
                           detail::cat("forward(", i, ") reads x_", i,
                                       ", rebuilt by inversion (only its backward or cotangent step, "
                                       "inverses and checks read it)"));
        const bool check = held[i + 1] && role[i + 1] == ValueRole::rebuilt;
        if (held[i + 1] && !check)
          detail::bad_plan(p, k, detail::cat("forward(", i, ") writes x_", i + 1, ", which is held"));
        if (sweeping) {  // (the sweep's advance: x_{i+1} for sweep(i + 1), or x_L for its check)
          if (cotangent != i + 1 || (i + 1 < n && read[i + 1]))
            detail::bad_plan(
                p, k,
                detail::cat("forward(", i, ") in the sweep writes x_", i + 1,
                            ", which no sweep step reads next (the cotangent is h_", cotangent, ")"));
          if (s.residual)
            detail::bad_plan(p, k, detail::cat("forward(", i, ") in the sweep keeps a residual"));
        } else if (i + 1 >= cotangent) {
          detail::bad_plan(p, k,
                           detail::cat("forward(", i, ") writes x_", i + 1, ", which is no longer needed (h_",
                                       cotangent, " is reached)"));
        }
        if (i + 1 == n && detail::accounted(s.output))
          detail::bad_plan(
              p, k, detail::cat("x_", n, " is read by the loss alone: its role is operand or temporary"));
        if (s.output == ValueRole::rebuilt)
          detail::bad_plan(p, k, detail::cat("forward(", i, ") makes x_", i + 1, " exact, not rebuilt"));
        if (check) {
          if (s.output != ValueRole::operand)
            detail::bad_plan(p, k,
                             detail::cat("forward(", i, ") checks the rebuilt x_", i + 1,
                                         ": its output is the operand of backward(", i + 1, ")"));
          peaks(bytes(i + 1));  // (the exact value next to the rebuilt one)
          role[i + 1] = ValueRole::operand;
          ++f.checks;
          if (rows && i + 1 < n) (*rows)[i + 1].checked = true;
        } else {
          held[i + 1] = 1;
          role[i + 1] = s.output;
          ++made[i + 1];
          was_checkpoint[i + 1] |= s.output == ValueRole::checkpoint;
          was_accounted[i + 1] |= detail::accounted(s.output);
          now += bytes(i + 1);
          values += bytes(i + 1);
          if (detail::accounted(s.output)) kept += bytes(i + 1);
          if (s.output == ValueRole::checkpoint)
            f.peak_checkpoints = std::max(f.peak_checkpoints, ++checkpoints);
        }
        if (s.residual) {
          free_residual(k, i, false);
          res[i] = 1;
          now += c.residual(i);
          kept += c.residual(i);
          if (rows) (*rows)[i].residual = true;
        }
        peaks();
        ++f.forward_steps;
        f.seconds += seconds(c.forward, i);
        if (rows) {
          ++(*rows)[i].forwards;
          (*rows)[i].seconds += seconds(c.forward, i);
        }
        if (i > 0 && role[i] == ValueRole::temporary) free_value(i);
        break;
      }
      case PlanOp::inverse: {
        if (i >= n) detail::bad_plan(p, k, detail::cat("inverse(", i, ") past the last layer"));
        if (sweeping) detail::bad_plan(p, k, detail::cat("inverse(", i, ") after the sweep began"));
        if (!c.inverse.empty() && !c.invertible(i))
          detail::bad_plan(p, k, detail::cat("inverse(", i, "): layer ", i, " has no inverse"));
        if (!held[i + 1])
          detail::bad_plan(p, k, detail::cat("inverse(", i, ") reads x_", i + 1, ", which is not held"));
        if (held[i] && i > 0)
          detail::bad_plan(p, k, detail::cat("inverse(", i, ") writes x_", i, ", which is held"));
        const bool next = i + 1 == n ? cotangent == n + 1 : cotangent == i + 2;
        if (!next)
          detail::bad_plan(
              p, k,
              detail::cat("inverse(", i, ") runs right before ",
                          i + 1 == n ? std::string("the loss")
                                     : detail::cat("backward(", i + 1, ") or cotangent(", i + 1, ")"),
                          ", which frees its source x_", i + 1));
        ++f.inverse_steps;
        f.seconds += seconds(c.inverse, i);
        if (rows) (*rows)[i].seconds += seconds(c.inverse, i);
        if (i == 0) {  // the check at x_0: x̂_0 beside the caller's x_0, dropped at once
          x0_checked = true;
          peaks(bytes(0));
          ++f.checks;
          if (rows) (*rows)[0].checked = true;
          break;
        }
        held[i] = 1;
        role[i] = ValueRole::rebuilt;
        now += bytes(i);
        values += bytes(i);
        peaks();
        if (rows) ++(*rows)[i].inverses;
        break;
      }
      case PlanOp::loss:
        if (!sweeping && cotangent != n + 1) detail::bad_plan(p, k, "a second loss");
        if (!held[n]) detail::bad_plan(p, k, detail::cat("the loss reads x_", n, ", which is not held"));
        if (sweeping) {  // the sweep's check: h_L against ∂ℓ/∂x_L
          if (cotangent != n)
            detail::bad_plan(p, k, detail::cat("the sweep's check at x_", n, " before h_", n));
          checked_end = true;
        } else {
          cotangent = n;
        }
        f.seconds += c.loss;
        free_value(n);
        break;
      case PlanOp::backward:
        if (cotangent == n + 1) detail::bad_plan(p, k, detail::cat("backward(", i, ") before the loss"));
        if (sweeping) detail::bad_plan(p, k, detail::cat("backward(", i, ") after the sweep began"));
        if (i + 1 != cotangent)
          detail::bad_plan(
              p, k, detail::cat("backward(", i, ") needs h_", i + 1, "; the cotangent is h_", cotangent));
        if (!held[i])
          detail::bad_plan(p, k, detail::cat("backward(", i, ") reads x_", i, ", which is not held"));
        if (role[i] == ValueRole::rebuilt) {
          if (!(i == 1 && x0_checked) && (i == 0 || !held[i - 1] || role[i - 1] != ValueRole::rebuilt))
            detail::bad_plan(p, k,
                             detail::cat("backward(", i, ") reads x_", i,
                                         ", rebuilt by inversion, and no inverse below it leads to a check"));
          if (c.branches(i) > 0 && !res[i])
            detail::bad_plan(p, k,
                             detail::cat("backward(", i, ") reads x_", i,
                                         ", rebuilt by inversion, without layer ", i, "'s branch bits"));
        }
        f.seconds += seconds(c.backward, i);
        read[i] = 1;
        if (rows) (*rows)[i].seconds += seconds(c.backward, i);
        row_read(i);
        free_residual(k, i, role[i] == ValueRole::rebuilt);
        if (i > 0) free_value(i);
        cotangent = i;
        break;
      case PlanOp::cotangent: {
        if (i >= n) detail::bad_plan(p, k, detail::cat("cotangent(", i, ") past the last layer"));
        if (cotangent == n + 1) detail::bad_plan(p, k, detail::cat("cotangent(", i, ") before the loss"));
        if (sweeping) detail::bad_plan(p, k, detail::cat("cotangent(", i, ") after the sweep began"));
        if (i + 1 != cotangent)
          detail::bad_plan(
              p, k, detail::cat("cotangent(", i, ") needs h_", i + 1, "; the cotangent is h_", cotangent));
        if (!res[i] && !held[i])
          detail::bad_plan(p, k,
                           detail::cat("cotangent(", i, ") reads layer ", i, "'s residual or x_", i,
                                       ", and neither is held"));
        if (!res[i] && role[i] == ValueRole::rebuilt && c.branches(i) > 0)
          detail::bad_plan(p, k,
                           detail::cat("cotangent(", i, ") reads x_", i,
                                       ", rebuilt by inversion, without layer ", i, "'s branch bits"));
        if (!c.can_cross(i, s.keep))
          detail::bad_plan(
              p, k,
              detail::cat("cotangent(", i, ") keeps ", to_string(s.keep), " for the sweep, but layer ", i,
                          " is crossed by ", to_string(c.crossing[i]),
                          s.keep == CotangentKeep::none ? " (no vijp)" : ""));
        if (held[i] && i > 0 && res[i] && !(held[i - 1] && role[i - 1] == ValueRole::rebuilt) &&
            !(i == 1 && x0_checked))
          detail::bad_plan(p, k,
                           detail::cat("cotangent(", i, ") while x_", i,
                                       " is held for nothing (the residual is kept, and no rebuilt x_", i - 1,
                                       " was made from it, nor x_0 checked)"));
        keep[i] = s.keep;
        keep_bytes[i] = s.keep == CotangentKeep::anchor     ? bytes(i + 1)
                        : s.keep == CotangentKeep::fragment ? c.fragment(i)
                                                            : 0;
        now += keep_bytes[i];
        kept += keep_bytes[i];
        crossed[i] = 1;
        f.anchors += s.keep == CotangentKeep::anchor;
        peaks(res[i] ? 0
                     : c.residual(i));  // (r_i is read while h_{i+1} is kept; derived from x_i: made here)
        free_residual(k, i, true);
        if (held[i] && i > 0) free_value(i);
        ++f.cotangent_steps;
        f.seconds += seconds(c.cotangent, i);
        if (rows) {
          (*rows)[i].keep = s.keep;
          (*rows)[i].crossed = true;
          (*rows)[i].kept_bytes += keep_bytes[i];
          (*rows)[i].seconds += seconds(c.cotangent, i);
        }
        cotangent = i;
        break;
      }
      case PlanOp::tangents: {
        if (i >= n) detail::bad_plan(p, k, detail::cat("tangents(", i, ") past the last layer"));
        if (cotangent == n + 1) detail::bad_plan(p, k, detail::cat("tangents(", i, ") before the loss"));
        if (sweeping) detail::bad_plan(p, k, detail::cat("tangents(", i, ") after the sweep began"));
        if (i >= cotangent)
          detail::bad_plan(p, k,
                           detail::cat("tangents(", i, ") makes h_", i, ", but the cotangent is h_",
                                       cotangent, " already"));
        if (!held[i])
          detail::bad_plan(p, k, detail::cat("tangents(", i, ") reads x_", i, ", which is not held"));
        if (role[i] == ValueRole::rebuilt)
          detail::bad_plan(p, k, detail::cat("tangents(", i, ") reads x_", i, ", rebuilt by inversion"));
        for (std::size_t l = i; l < cotangent && l < n; ++l) {  // (left to the sweep's vijp)
          if (!c.can_cross(l, CotangentKeep::none))
            detail::bad_plan(
                p, k,
                detail::cat("tangents(", i, ") leaves layer ", l,
                            " to the sweep's vijp, but it is crossed by ", to_string(c.crossing[l])));
          keep[l] = CotangentKeep::none;
          crossed[l] = 1;
          if (rows) (*rows)[l].crossed = true;
        }
        if (held[i] && i > 0) free_value(i);
        ++f.tangent_steps;
        cotangent = i;
        break;
      }
      case PlanOp::sweep: {
        if (i >= n) detail::bad_plan(p, k, detail::cat("sweep(", i, ") past the last layer"));
        if (cotangent == n + 1) detail::bad_plan(p, k, detail::cat("sweep(", i, ") before the loss"));
        if (read[i])
          detail::bad_plan(p, k, detail::cat("sweep(", i, "): layer ", i, "'s gradient is read already"));
        const bool cross = cotangent == i;
        if (!cross && cotangent != i + 1)
          detail::bad_plan(
              p, k,
              detail::cat("sweep(", i, ") needs h_", i, " or h_", i + 1, "; the cotangent is h_", cotangent));
        if (cross && !crossed[i])
          detail::bad_plan(
              p, k, detail::cat("sweep(", i, ") crosses layer ", i, ", which no cotangent step crossed"));
        if (!held[i])
          detail::bad_plan(p, k, detail::cat("sweep(", i, ") reads x_", i, ", which is not held"));
        if (role[i] == ValueRole::rebuilt)
          detail::bad_plan(p, k, detail::cat("sweep(", i, ") reads x_", i, ", rebuilt by inversion"));
        if (!sweeping && cross) {  // (the reverse pass must be down to the bottom of the Moonwalk layers)
          for (std::size_t j = 0; j < i; ++j)
            if (!read[j])
              detail::bad_plan(p, k, detail::cat("sweep(", i, ") before layer ", j, "'s cotangent"));
        }
        sweeping = true;
        read[i] = 1;
        f.seconds += seconds(c.sweep, i);
        ++f.sweep_steps;
        if (rows) (*rows)[i].seconds += seconds(c.sweep, i);
        row_read(i);
        if (cross) {
          any_cross = true;
          last_anchor = keep[i] == CotangentKeep::anchor;
          free_keep(i);
        }
        if (i > 0 && role[i] != ValueRole::temporary) free_value(i);
        cotangent = i + 1;
        break;
      }
    }
  }
  if (sweeping) {
    if (any_cross && !checked_end && !last_anchor)
      detail::bad_plan(
          p, p.steps.size(),
          detail::cat("the sweep ends at h_", cotangent, " unchecked (no anchor at its last layer",
                      cotangent == n ? ", no check at x_L)" : ")"));
  } else if (cotangent != 0) {
    detail::bad_plan(p, p.steps.size(), detail::cat("ends at h_", cotangent, ", not h_0"));
  }
  for (std::size_t i = 0; i < n; ++i) {
    if (!read[i]) detail::bad_plan(p, p.steps.size(), detail::cat("layer ", i, "'s gradient is never read"));
    if (crossed[i] && !swept_over[i])
      detail::bad_plan(p, p.steps.size(), detail::cat("layer ", i, " is crossed by no sweep step"));
  }
  for (std::size_t i = 1; i <= n; ++i)
    if (held[i]) detail::bad_plan(p, p.steps.size(), detail::cat("x_", i, " is still held at the end"));
  for (std::size_t i = 0; i < n; ++i) free_residual(p.steps.size(), i, false);
  return f;
}
}  // namespace detail

/// check_plan on value sizes and times given one by one (each list may be empty).
inline PlanFigures check_plan(const Plan& p, const std::vector<std::size_t>& value_bytes = {},
                              const std::vector<double>& forward_s = {},
                              const std::vector<double>& backward_s = {}, double loss_s = 0) {
  return check_plan(p, ChainCosts{.value_bytes = value_bytes,
                                  .forward = forward_s,
                                  .backward = backward_s,
                                  .loss = loss_s,
                                  .inverse = {},
                                  .branch_bytes = {}});
}

/// Backprop: every input kept, each value computed once.
inline Plan backprop_plan(std::size_t layers) {
  if (layers == 0) throw ScheduleError("backprop plan: a chain of no layers");
  Plan p{.layers = layers, .input_role = ValueRole::activation, .steps = {}, .origin = "backprop"};
  p.steps.reserve(2 * layers + 1);
  for (std::size_t i = 0; i < layers; ++i)
    p.steps.push_back({PlanOp::forward, i, i + 1 < layers ? ValueRole::activation : ValueRole::operand});
  p.steps.push_back({PlanOp::loss, layers});
  for (std::size_t i = layers; i-- > 0;) p.steps.push_back({PlanOp::backward, i});
  return p;
}

/// Every-k checkpointing: the forward pass keeps x_s for s = 0, k, 2k, …;
/// then segment by segment from the last, the segment's other inputs are
/// recomputed from its checkpoint and kept, and its layers reversed.
/// Peak: ⌈L/k⌉ checkpoints + k − 1 recomputed inputs.
inline Plan every_k_plan(std::size_t layers, std::size_t k) {
  if (layers == 0) throw ScheduleError("every-k plan: a chain of no layers");
  k = std::clamp<std::size_t>(k, 1, std::max<std::size_t>(layers, 1));
  Plan p{.layers = layers, .input_role = ValueRole::checkpoint, .steps = {}, .origin = "every-k"};
  for (std::size_t i = 0; i < layers; ++i)
    p.steps.push_back({PlanOp::forward, i,
                       (i + 1) % k == 0 && i + 1 < layers ? ValueRole::checkpoint : ValueRole::temporary});
  p.steps.push_back({PlanOp::loss, layers});
  for (std::size_t s = (layers - 1) / k * k;; s -= k) {
    const std::size_t e = std::min(layers, s + k);
    for (std::size_t i = s; i + 1 < e; ++i) p.steps.push_back({PlanOp::forward, i, ValueRole::activation});
    for (std::size_t j = e; j-- > s;) p.steps.push_back({PlanOp::backward, j});
    if (s == 0) break;
  }
  return p;
}

namespace detail {

/// β(c, r) = C(c + r, c): the most steps c checkpoints reverse with r
/// repetitions (Griewank's binomial bound); 0 for r < 0, saturating at the
/// largest std::size_t.
inline std::size_t revolve_beta(std::size_t c, std::ptrdiff_t r) {
  if (r < 0) return 0;
  constexpr std::size_t top = std::numeric_limits<std::size_t>::max();
  std::size_t b = 1;  // C(c + i, i), exact at every i
  for (std::size_t i = 1; i <= static_cast<std::size_t>(r); ++i) {
    if (b > top / (c + i)) return top;
    b = b * (c + i) / i;
  }
  return b;
}

/// The least r with β(c, r) ≥ n: how often the worst step is evaluated.
inline std::ptrdiff_t revolve_repetitions(std::size_t n, std::size_t c) {
  std::ptrdiff_t r = 0;
  while (revolve_beta(c, r) < n) ++r;
  return r;
}

/// Griewank's minimal number of forward steps (advances) that reverse n steps
/// holding at most c states, the start included: t(n, c) = r·n − β(c + 1, r − 1),
/// β(c, r − 1) < n ≤ β(c, r). (Treeverse, Griewank 1992; Revolve, Griewank &
/// Walther 2000.)
inline std::size_t revolve_forward_steps(std::size_t n, std::size_t c) {
  const std::ptrdiff_t r = revolve_repetitions(n, c);
  return static_cast<std::size_t>(r) * n - revolve_beta(c + 1, r - 1);
}

/// Where to place the next checkpoint, as an offset 1..n−1 from the held state,
/// when n ≥ 2 steps are to be reversed with c ≥ 2 states (the held one
/// included): the left part (m steps, c states) then takes ≤ r − 1 repetitions
/// and the right part (n − m steps, c − 1 states) ≤ r, which attains t(n, c).
inline std::size_t revolve_split(std::size_t n, std::size_t c) {
  const std::ptrdiff_t r = revolve_repetitions(n, c);
  const std::size_t right = revolve_beta(c - 1, r);
  const std::size_t lo = n > right ? n - right : 0;
  const std::size_t m = std::max(lo, revolve_beta(c, r - 2));
  return std::clamp<std::size_t>(m, 1, n - 1);
}

}  // namespace detail

/// Binomial checkpointing (Griewank's treeverse): at most `slots` ≥ 1 layer
/// inputs held at once as checkpoints, x_0 included, placed by the split
/// from binomial numbers, so the forward steps are the minimum t(L, c) + 1
/// (the + 1: x_L for the loss; detail::revolve_forward_steps). The input a
/// backward step reads is computed right before it (an operand).
inline Plan binomial_plan(std::size_t layers, std::size_t slots) {
  if (slots == 0) throw ScheduleError("binomial plan: slots must be >= 1");
  if (layers == 0) throw ScheduleError("binomial plan: a chain of no layers");
  Plan p{.layers = layers, .input_role = ValueRole::checkpoint, .steps = {}, .origin = "binomial"};
  bool have_h = false;
  auto advance = [&](std::size_t a, std::size_t j, ValueRole last) {
    for (std::size_t i = a; i < j; ++i)
      p.steps.push_back({PlanOp::forward, i, i + 1 == j ? last : ValueRole::temporary});
  };
  auto turn = [&](std::size_t j) {
    if (!have_h) {
      p.steps.push_back({PlanOp::forward, j, ValueRole::operand});
      p.steps.push_back({PlanOp::loss, layers});
      have_h = true;
    }
    p.steps.push_back({PlanOp::backward, j});
  };
  // Reverses layers a … b−1 holding x_a and `free` more slots: split,
  // reverse the right part with one slot fewer, continue on the left part.
  auto treeverse = [&](auto& self, std::size_t a, std::size_t b, std::size_t free) -> void {
    while (b - a > 1 && free > 0) {
      const std::size_t m = a + detail::revolve_split(b - a, free + 1);
      advance(a, m, ValueRole::checkpoint);
      self(self, m, b, free - 1);
      b = m;
    }
    for (std::size_t j = b; j-- > a;) {
      advance(a, j, ValueRole::operand);
      turn(j);
    }
  };
  treeverse(treeverse, 0, layers, slots - 1);
  return p;
}

/// RevBackprop (reversible backprop): the forward pass keeps only the input
/// of each layer that has no inverse (`invertible[i]` false: an activation);
/// then, walking down, x_{j−1} = f_{j−1}⁻¹(x_j) right before backward(j)
/// (or the loss) wherever layer j−1 ≥ 1 is invertible. Every rebuilt stretch
/// ends above a kept input x_k (or x_0) and is checked there: forward(k)
/// recomputes x_{k+1} exactly before backward(k+1) reads it, measuring the
/// stretch's drift. A layer whose rebuilt input is read unchecked and that
/// keeps branch bits (`branches[i]`) keeps them in the forward pass.
/// All layers without inverses: backprop's plan.
inline Plan revbackprop_plan(const std::vector<bool>& invertible, const std::vector<bool>& branches) {
  const std::size_t n = invertible.size();
  if (n == 0) throw ScheduleError("revbackprop plan: a chain of no layers");
  if (branches.size() != n)
    throw ScheduleError(
        detail::cat("revbackprop plan: ", branches.size(), " branch flags for ", n, " layers"));
  // x_i is rebuilt by inverse(i) for 1 ≤ i < n where layer i is invertible;
  // a rebuilt x_i is checked when x_{i−1} is not rebuilt (kept, or x_0).
  auto rebuilt = [&](std::size_t i) { return i >= 1 && i < n && invertible[i]; };
  auto checked = [&](std::size_t i) { return rebuilt(i) && !rebuilt(i - 1); };
  Plan p{.layers = n, .input_role = ValueRole::temporary, .steps = {}, .origin = "revbackprop"};
  for (std::size_t i = 0; i < n; ++i) {
    const ValueRole out = i + 1 == n       ? ValueRole::operand
                          : rebuilt(i + 1) ? ValueRole::temporary
                                           : ValueRole::activation;
    p.steps.push_back(
        {PlanOp::forward, i, out, rebuilt(i) && !checked(i) && branches[i], CotangentKeep::none});
  }
  // Before the loss (j = n) or backward(j): rebuild x_{j−1} from x_j, or check x_j from x_{j−1}.
  for (std::size_t j = n;; --j) {
    if (j >= 1 && rebuilt(j - 1)) p.steps.push_back({PlanOp::inverse, j - 1, ValueRole::rebuilt});
    if (j < n && checked(j)) p.steps.push_back({PlanOp::forward, j - 1, ValueRole::operand});
    p.steps.push_back(j == n ? PlanStep{PlanOp::loss, n} : PlanStep{PlanOp::backward, j});
    if (j == 0) break;
  }
  return p;
}

/// Moonwalk below a backprop top: layers `top` … L−1 keep their inputs and
/// are reversed by backward steps (backprop's plan; `top` = L: none), layers
/// 0 … top−1 keep only their residuals, are reversed by cotangent steps down
/// to h_0 (`input_gradient`) or h_1 (layer 0 then keeps nothing and is only
/// read by the sweep), and swept back up. `keep[i]` is what layer i's
/// cotangent step keeps for the sweep (how the sweep crosses it: none (vijp),
/// fragment or anchor; the caller's choice of anchors); the sweep's last
/// layer top−1 is anchored when top < L (the anchor checks the sweep against
/// the backward steps' h_top), and at top = L the sweep ends with the check
/// at x_L.
inline Plan moonwalk_plan(const std::vector<CotangentKeep>& keep, std::size_t top, bool input_gradient,
                          const std::vector<bool>& rebuilt, const std::vector<bool>& branches);
inline Plan moonwalk_plan(const std::vector<CotangentKeep>& keep, std::size_t top, bool input_gradient) {
  return moonwalk_plan(keep, top, input_gradient, {}, {});
}

/// moonwalk_plan with inputs rebuilt by inversion: a Moonwalk layer i with
/// `rebuilt[i]` keeps no residual in the forward pass, unless
/// `branches[i]` (its branch bits: a piecewise-linear layer's derivative is
/// read from them, not from a rebuilt input); its input x_i is rebuilt,
/// x_i = f_i⁻¹(x_{i+1}), where a step reads it: its own cotangent step
/// (no residual kept) or the inverse below it. A stretch of rebuilt inputs
/// is inverted down from the value above it, kept from the forward pass (a
/// checkpoint; x_top or x_L where the stretch reaches them); with
/// `rebuilt[0]`, inverse(0) ends the lowest stretch with a check at x_0 (the
/// drift of the whole stretch). Empty lists: nothing rebuilt.
inline Plan moonwalk_plan(const std::vector<CotangentKeep>& keep, std::size_t top, bool input_gradient,
                          const std::vector<bool>& rebuilt, const std::vector<bool>& branches) {
  const std::size_t n = keep.size();
  if (n == 0) throw ScheduleError("moonwalk plan: a chain of no layers");
  if (top > n) throw ScheduleError(detail::cat("moonwalk plan: top layer ", top, " of ", n, " layers"));
  if ((!rebuilt.empty() && rebuilt.size() != n) || (!branches.empty() && branches.size() != n))
    throw ScheduleError(detail::cat("moonwalk plan: ", rebuilt.size(), " rebuilt and ", branches.size(),
                                    " branch flags for ", n, " layers"));
  if (top == 0) {
    Plan p = backprop_plan(n);
    p.origin = "moonwalk";
    return p;
  }
  Plan p{.layers = n, .input_role = ValueRole::temporary, .steps = {}, .origin = "moonwalk"};
  const std::size_t s = input_gradient ? 0 : 1;  // the reverse pass ends at h_s
  auto rebuild = [&](std::size_t i) { return i < top && !rebuilt.empty() && rebuilt[i]; };
  // residual(i): forward(i) keeps r_i; needed(i): x_i is rebuilt (read by
  // cotangent(i), or the source of inverse(i − 1), or checked at x_0).
  auto residual = [&](std::size_t i) {
    return i < top && i >= s && (!rebuild(i) || (!branches.empty() && branches[i]));
  };
  std::vector<char> needed(n, 0);
  for (std::size_t i = 0; i < top; ++i)
    needed[i] = rebuild(i) && (i == 0 || (i >= s && !residual(i)) || needed[i - 1]);
  for (std::size_t i = 0; i < n; ++i) {
    const ValueRole out = i + 1 == n                    ? ValueRole::operand
                          : i + 1 >= top                ? ValueRole::activation
                          : needed[i] && !needed[i + 1] ? ValueRole::checkpoint  // (a stretch's top)
                                                        : ValueRole::temporary;
    p.steps.push_back({PlanOp::forward, i, out, residual(i), CotangentKeep::none});
  }
  // inverse(j − 1) right before the step that frees x_j.
  auto inverse_below = [&](std::size_t j) {
    if (j >= 1 && j - 1 < top && needed[j - 1])
      p.steps.push_back({PlanOp::inverse, j - 1, ValueRole::rebuilt});
  };
  if (top == n) inverse_below(n);
  p.steps.push_back({PlanOp::loss, n});
  for (std::size_t j = n; j-- > top;) {
    if (j == top) inverse_below(top);
    p.steps.push_back({PlanOp::backward, j});
  }
  for (std::size_t j = top; j-- > s;) {
    inverse_below(j);
    p.steps.push_back({PlanOp::cotangent, j, ValueRole::temporary, false,
                       j + 1 == top && top < n ? CotangentKeep::anchor : keep[j]});
  }
  for (std::size_t i = 0; i < top; ++i) {
    p.steps.push_back({PlanOp::sweep, i});
    if (i + 1 < top || top == n)
      p.steps.push_back({PlanOp::forward, i,
                         i + 1 == n                ? ValueRole::operand
                         : i + 2 == top && top < n ? ValueRole::operand
                                                   : ValueRole::temporary});
  }
  if (top == n) p.steps.push_back({PlanOp::loss, n});
  return p;
}

/// Pure-forward Moonwalk: no reverse pass. The forward pass gives the loss
/// and h_L, keeping nothing; h_0 comes from tangents(0) (n_0 forward-mode
/// passes), and the sweep walks up from it, recomputing the inputs. A layer j
/// whose sweep step needs more than its vijp (`keep[j]`: a fragment, or an
/// anchor) has it kept by cotangent(j) from h_{j+1}, which tangents(j+1)
/// makes from x_{j+1}, recomputed from x_0 with r_j kept on the way — or,
/// when layer j+1's cotangent step has just made h_{j+1}, from x_j,
/// recomputed (or x_0), with r_j derived from it. These layers are taken from
/// the top down, each one's tangents jumping the cotangent below the last.
inline Plan pure_moonwalk_plan(const std::vector<CotangentKeep>& keep) {
  const std::size_t n = keep.size();
  if (n == 0) throw ScheduleError("pure moonwalk plan: a chain of no layers");
  Plan p{.layers = n, .input_role = ValueRole::temporary, .steps = {}, .origin = "pure"};
  auto advance = [&](std::size_t to, ValueRole last, bool residual_of_last) {  // x_0 → x_to
    for (std::size_t i = 0; i < to; ++i)
      p.steps.push_back({PlanOp::forward, i, i + 1 == to ? last : ValueRole::temporary,
                         residual_of_last && i + 1 == to, CotangentKeep::none});
  };
  advance(n, ValueRole::operand, false);
  p.steps.push_back({PlanOp::loss, n});
  std::size_t c = n;  // the cotangent is h_c
  for (std::size_t j = n; j-- > 0;) {
    if (keep[j] == CotangentKeep::none) continue;
    if (j + 1 < c) {  // h_{j+1} by tangents from x_{j+1}, r_j kept on the way
      advance(j + 1, ValueRole::operand, true);
      p.steps.push_back({PlanOp::tangents, j + 1});
    } else {  // h_{j+1} made by cotangent(j + 1): r_j from x_j
      advance(j, ValueRole::operand, false);
    }
    p.steps.push_back({PlanOp::cotangent, j, ValueRole::temporary, false, keep[j]});
    c = j;
  }
  if (c > 0) p.steps.push_back({PlanOp::tangents, 0});
  for (std::size_t i = 0; i < n; ++i) {
    p.steps.push_back({PlanOp::sweep, i});
    p.steps.push_back({PlanOp::forward, i, i + 1 == n ? ValueRole::operand : ValueRole::temporary});
  }
  p.steps.push_back({PlanOp::loss, n});
  return p;
}

/// The plan as text, one step per line ("forward 3 -> x_4 checkpoint",
/// "inverse 2 -> x_2 rebuilt", "loss", "backward 3"), for reports and failing tests.
inline std::string plan_text(const Plan& p) {
  std::ostringstream s;
  s << "plan (" << p.origin << ", " << p.layers << " layers, " << p.steps.size() << " steps; x_0 "
    << to_string(p.input_role) << ")\n";
  for (const PlanStep& st : p.steps) {
    switch (st.op) {
      case PlanOp::forward:
        s << "  forward " << st.layer << " -> x_" << st.layer + 1 << ' ' << to_string(st.output)
          << (st.residual ? " +residual" : "") << '\n';
        break;
      case PlanOp::cotangent:
        s << "  cotangent " << st.layer << " -> h_" << st.layer << " keeping " << to_string(st.keep) << '\n';
        break;
      case PlanOp::tangents:
        s << "  tangents " << st.layer << " -> h_" << st.layer << '\n';
        break;
      case PlanOp::sweep:
        s << "  sweep " << st.layer << '\n';
        break;
      case PlanOp::inverse:
        s << "  inverse " << st.layer << " -> x_" << st.layer << " rebuilt\n";
        break;
      case PlanOp::loss:
        s << "  loss\n";
        break;
      case PlanOp::backward:
        s << "  backward " << st.layer << '\n';
        break;
    }
  }
  return s.str();
}

}  // namespace moonwalk
