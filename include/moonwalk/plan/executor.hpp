// Moonwalk — the executor: runs any plan (plan/plan.hpp) on a network.
//
// Size, then bind, then run: a plan bound to a chain's shapes (PlanRun::bind)
// knows, before the step, where in one arena each forward step writes. In
// the plans the generators and the planner make, the values kept past the
// next step (checkpoints, activations, operands) are freed in the reverse
// order of their making — a stack — and the others live for one step; so
// the kept values are stacked from the arena's bottom and an advance's
// values alternate between the free space's two ends, its last value landing
// on the stack: the arena is exactly the plan's peak of held values. A plan
// that breaks the stack order is laid out first-fit instead (an arena that
// may exceed its peak). A warm step on the same shapes allocates nothing:
// the arena, the two cotangent buffers and the store's lists are reused
// (an inverse step of a layer without inverse_into makes one temporary).
//
// Inverse steps rebuild values in the arena like forward steps; a check (a
// forward step onto a rebuilt value) writes the exact value beside the
// rebuilt one, records their relative difference max|x̂ − x| / max|x| as
// the stretch's drift (Stats::error_estimate: the largest), and keeps the
// exact one. Residuals (branch bits, Moonwalk's vijp residuals) and
// anchors are kept outside the arena, each in its own buffer bound once; a
// fragment (a few numbers per channel) is made by its cotangent step, and
// its sweep step makes h_{i+1} in a temporary: plans with fragments
// allocate on every step, a few small blocks and one cotangent. What
// a layer derives for its inverse or vijp (a Linear's factorisation) lives
// only through the step that uses it, unless the run keeps it
// (keep_across_runs: where parameters outweigh activations, the casts and
// factorisations stay for the next step, refreshed in place). Without
// keep_across_runs the arena is also given back while no value lives in it
// (Moonwalk's reverse pass, whose anchors are then the step's peak) and
// taken again by the next forward step, and each residual once its
// cotangent step has read it.
//
// Moonwalk's steps (plan/plan.hpp) carry the cotangents in the network's
// precision or, for a float network, in double (run<double>: each layer cast
// for the steps that read it, its residual, anchors and fragments in
// double), with the anchors and fragments the plan names; the sweep's checks
// (each anchor, and h_L against ∂ℓ/∂x_L) enter Stats::error_estimate. A
// cotangent step whose layer kept no residual derives it from the held x_i
// (rebuilt by inversion); inverse(0) beside the caller's x_0 measures the
// rebuilt stretch's drift (input_drift()).
//
// A tangents step (pure-forward Moonwalk's h_i) carries its tangents and
// recomputed inputs in two buffers each of the widest tail value (given
// back after the plan's last tangents step, but with keep_across_runs, as
// is the arena while no value lives in it); each layer's jvp makes one
// temporary.
//
// The fidelity policy's anchors (fidelity/policy.hpp) are placed at run
// time: with RunFidelity::budget, each cotangent step measures its layer's
// typical amplification γ_i and anchors h_{i+1} where the error model (P)
// would pass the budget, in a buffer from a pool that keeps as many buffers
// as the step held at once (a warm step that anchors no more layers than the
// last one allocates nothing). The run says how it ended (AttemptOutcome):
// with RunFidelity::may_give_up_for_double, the reverse pass stops as soon
// as the anchors in C would cost more than 1/8 of backprop's kept inputs and
// twice what double cotangents would keep.
#pragma once

#include <algorithm>
#include <cstddef>
#include <limits>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/dense.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/fidelity/policy.hpp"
#include "moonwalk/fidelity/retry.hpp"
#include "moonwalk/nets/parameters.hpp"
#include "moonwalk/plan/plan.hpp"
#include "moonwalk/schedules/detail/sweep.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// A plan bound to the shapes of one chain at one batch size, with its buffers.
/// The drift one check measured: forward(layer) onto the rebuilt x_{layer+1},
/// which the stretch of inverses from x_top down rebuilt (ChainCosts::drift(layer, top)
/// is its prediction).
struct CheckedDrift {
  std::size_t layer = 0, top = 0;
  double drift = 0;  ///< max|x̂ − x| / max|x|
};

/// What the fidelity policy asks of one run of a plan (the top of this file).
struct RunFidelity {
  /// The relative error the policy's anchors keep the prediction (P) under
  /// (Fidelity: margin · tolerance); 0: no anchors but the plan's.
  double budget = 0;
  /// The error model's constant c (Fidelity::calibration times the retry's anchor_scale).
  double calibration = 4;
  /// Stop the reverse pass when double cotangents would anchor for clearly less.
  bool may_give_up_for_double = false;
};

template <class S>
class PlanRun {
 public:
  static constexpr std::size_t none = std::numeric_limits<std::size_t>::max();

  /// Binds `plan` (checked by check_plan) to values of rows[i] × batch
  /// (i = 0..L), allocating the buffers it needs; `input_gradient`: the
  /// backward step of layer 0 also gives h_0 (a plan with cotangent steps
  /// gives it when it reaches it: cotangent(0)).
  /// `allocate` false: the layout only (buffers allocated by the first run).
  /// `residual_bytes`: the bytes of each layer's residual, for
  /// working_bytes()'s prediction (empty: a bit per element of its input, a
  /// LeakyReLU's branch bits; a Linear keeps none, a smooth activation its
  /// σ′: give them). The run's Stats::working_bytes is measured.
  void bind(Plan plan, std::vector<Index> rows, Index batch, bool input_gradient, bool allocate = true,
            const std::vector<std::size_t>& residual_bytes = {}) {
    std::vector<std::size_t> bytes(rows.size());
    for (std::size_t i = 0; i < rows.size(); ++i)
      bytes[i] = static_cast<std::size_t>(rows[i] * batch) * sizeof(S);
    check_plan(plan, bytes);
    const bool to_h0 = std::any_of(plan.steps.begin(), plan.steps.end(), [](const PlanStep& st) {
      return (st.op == PlanOp::cotangent || st.op == PlanOp::tangents) && st.layer == 0;
    });
    if (input_gradient && plan.swept_layers() > 0 && !to_h0)
      throw ScheduleError(
          detail::cat("plan (", plan.origin, "): h_0 asked for, but its cotangent steps stop at h_1"));
    plan_ = std::move(plan);
    forward_mode_ = plan_.count(PlanOp::tangents) > 0;
    last_tangents_ = none;
    for (std::size_t k = 0; k < plan_.steps.size(); ++k)
      if (plan_.steps[k].op == PlanOp::tangents) last_tangents_ = k;
    rows_ = std::move(rows);
    batch_ = batch;
    backprop_bytes_ = 0;  // what backprop keeps: every layer's input
    for (std::size_t i = 0; i + 1 < rows_.size(); ++i)
      backprop_bytes_ += static_cast<std::size_t>(rows_[i] * batch_) * sizeof(S);
    input_gradient_ = input_gradient;
    reaches_h0_ = input_gradient || to_h0;
    // Residuals: one slot per layer that keeps one; anchors: one buffer per anchored layer.
    std::vector<char> flagged(plan_.layers, 0);
    bits_bytes_ = 0;
    keep_.assign(plan_.layers, CotangentKeep::none);
    keep_now_.assign(plan_.layers, CotangentKeep::none);
    slot_of_.assign(plan_.layers, none);
    anchored_.assign(plan_.layers, 0);
    for (const PlanStep& st : plan_.steps) {
      if (st.op == PlanOp::forward && st.residual && !flagged[st.layer]) {
        flagged[st.layer] = 1;
        bits_bytes_ += st.layer < residual_bytes.size()
                           ? residual_bytes[st.layer]
                           : static_cast<std::size_t>((rows_[st.layer] * batch_ + 63) / 64) * 8;
      }
      if (st.op == PlanOp::cotangent) {
        keep_[st.layer] = st.keep;
        if (st.keep == CotangentKeep::anchor && !anchored_[st.layer]) {
          anchored_[st.layer] = 1;
          bits_bytes_ += static_cast<std::size_t>(rows_[st.layer + 1] * batch_) * sizeof(S);
        }
      }
    }
    for (std::vector<Matrix<S>>* a : {&same_.anchors}) a->resize(plan_.layers);
    wide_.anchors.resize(plan_.layers);
    for (std::size_t i = 0; i < plan_.layers; ++i)
      if (!anchored_[i]) {
        same_.anchors[i] = Matrix<S>();
        wide_.anchors[i] = Matrix<double>();
      }
    assign();
    if (allocate) this->allocate();
  }

  /// True when bound to these shapes (and input_gradient).
  [[nodiscard]] bool bound_to(const std::vector<Index>& rows, Index batch, bool input_gradient) const {
    return batch_ == batch && rows_ == rows && input_gradient_ == input_gradient;
  }
  [[nodiscard]] const Plan& plan() const { return plan_; }
  /// What the last run's checks measured, one entry per check, in plan order.
  [[nodiscard]] const std::vector<CheckedDrift>& checked_drifts() const { return drifts_; }
  /// What the last run's check at x_0 measured (inverse(0) beside the
  /// caller's x_0: max|x̂_0 − x_0| / max|x_0|), or −1 when it made none. A
  /// diagnostic of the rebuilt stretch above it, not of the gradient (whose
  /// cotangent steps read the rebuilt values, and the sweep checks those):
  /// it is not in Stats::error_estimate, only in AttemptOutcome::drift —
  /// but where backward(1) reads the rebuilt x_1 (no sweep checks that).
  [[nodiscard]] double input_drift() const { return input_drift_; }

  /// Bytes of the values' arena (what the layout needs, allocated or not).
  [[nodiscard]] std::size_t value_bytes() const { return arena_size_ * sizeof(S); }
  /// Bytes of a step's working set: the value buffers, the residuals
  /// (branch bits) and anchors, two cotangent buffers of the widest
  /// cotangent and ∂ℓ/∂x_L (fragments, a few numbers per channel, and a
  /// tangents step's buffers, not counted).
  [[nodiscard]] std::size_t working_bytes() const {
    return value_bytes() + bits_bytes_ + cotangent_bytes(rows_, batch_, reaches_h0_);
  }
  /// Bytes of the two cotangent buffers (the widest cotangent: of x_1 … x_L,
  /// or x_0 … x_L with input_gradient) and of ∂ℓ/∂x_L.
  [[nodiscard]] static std::size_t cotangent_bytes(const std::vector<Index>& rows, Index batch,
                                                   bool input_gradient) {
    return (2 * widest(rows, batch, input_gradient) + static_cast<std::size_t>(rows.back() * batch)) *
           sizeof(S);
  }
  /// Bytes allocated now (workspace accounting: storage_bytes()).
  [[nodiscard]] std::size_t storage_bytes() const {
    return same_.bytes() + wide_.bytes() + casts_.storage_bytes() + h_s_.storage_bytes() +
           tx_[0].storage_bytes() + tx_[1].storage_bytes() +
           static_cast<std::size_t>(g_.size() + arena_.size()) * sizeof(S);
  }
  /// Keep what the layers derive from their weights (their casts to double,
  /// a Linear's factorisation) from run to run, refreshed in place by each,
  /// and the arena throughout (detail::keep_across_steps: where parameters
  /// outweigh activations). False (the default): each derived object is
  /// freed once the step's last user of it is done, and the arena while no
  /// value lives in it.
  void keep_across_runs(bool keep) { keep_across_runs_ = keep; }

  /// Frees the buffers of cotangents carried in C (their anchors and
  /// residuals; for C = double, the layers' casts too): a caller that ends
  /// its steps in the other precision gives them back.
  template <class C>
  void release_carried() {
    carried<C>().clear();
    if constexpr (!std::is_same_v<C, S>) casts_.clear();
  }
  /// The storage of the buffers a run writes (the arena, the cotangents in
  /// C): a warm run on the same shapes writes into the same storage.
  template <class C = S>
  [[nodiscard]] std::vector<const void*> storage() const {
    const Carried<C>& cw = carried<C>();
    return {arena_.data(), cw.h[0].data(), cw.h[1].data()};
  }
  /// The layers cast to double by the last run in double (kept with keep_across_runs).
  [[nodiscard]] const detail::CastLayers<double>& double_casts() const { return casts_; }

  /// Frees the buffers (the layout stays; the next run allocates them again).
  void release() {
    same_.clear();
    wide_.clear();
    casts_.clear();
    h_s_ = detail::Buffer<S>();
    tx_[0] = detail::Buffer<S>();
    tx_[1] = detail::Buffer<S>();
    arena_ = Vector<S>();
    g_ = Matrix<S>();
  }

  /// Runs the plan: out.loss, ∂ℓ/∂θ accumulated in the layers' storage (the
  /// caller zeroes it first), out.h0 with input_gradient, and the step's
  /// counts, the saved-value accounting (checkpoints, activations,
  /// residuals, fragments and anchors) and working_bytes in out.stats; with
  /// a sweep, Stats::error_estimate also holds its checks: the largest of
  /// max|h_i − J_iᵀ a_i| / max|J_iᵀ a_i| at each anchor a_i = h_{i+1} and
  /// of the swept h_L against ∂ℓ/∂x_L.
  ///
  /// Moonwalk's steps carry the cotangents in C: S, or double for a float
  /// network (each layer then cast for the steps that use it — kept from run
  /// to run with keep_across_runs —, its residual, anchors and fragments in
  /// double, x in S, inverse steps too; ∂ℓ/∂θ read in S). A
  /// plan with backward steps runs in S only.
  ///
  /// `fidelity` (RunFidelity): the policy's anchors, placed at run time,
  /// with Stats::amplification (one row per layer: γ_i and κ_i of the
  /// layers a cotangent step crossed), Stats::anchor_layers (the plan's and
  /// the policy's) and Stats::predicted_error. Returns how the run ended:
  /// the loss finite, the run given up for double (the gradient then
  /// incomplete), the estimate and the largest drift a check measured.
  template <class C = S, Net N, class L>
  AttemptOutcome run(N& net, const CRef<S>& x0, const L& loss, const typename L::target_type& target,
                     GradientResult<S>& out, const RunFidelity& fidelity = {}) {
    static_assert(std::is_same_v<C, S> || std::is_same_v<C, double>, "cotangents in S or in double");
    if constexpr (!std::is_same_v<C, S>)
      if (plan_.count(PlanOp::backward) > 0)
        throw ScheduleError(detail::cat("plan (", plan_.origin, "): backward steps run in ",
                                        detail::scalar_name<S>(), ", not in double"));
    Carried<C>& cw = carried<C>();
    allocate(cw);
    casts_.restart(net.size(), keep_across_runs_);
    // Layer i in C: itself, or its cast (made where a step needs it; released after, but with
    // keep_across_runs).
    auto in_c = [&](std::size_t i, const auto& l) -> decltype(auto) {
      if constexpr (std::is_same_v<C, S>)
        return (l);
      else
        return casts_(i, l);
    };
    Stats& st = out.stats;
    store_.restart(net.size());
    std::fill(at_.begin(), at_.end(), none);
    const std::size_t n = plan_.layers;
    role_[0] = plan_.input_role;
    auto value = [&](std::size_t i) -> CRef<S> {
      if (i == 0) return x0;
      return Eigen::Map<const Matrix<S>>(arena_.data() + at_[i], rows_[i], batch_);
    };
    auto account = [&](std::size_t i, ValueRole r, auto& l) {
      if (i < n && detail::accounted(r))
        store_.hold(i, SavedStore::activation, names_(i, l),
                    static_cast<std::size_t>(rows_[i] * batch_) * sizeof(S), to_string(r));
    };
    auto free_value = [&](std::size_t i) {
      if (i < n && detail::accounted(role_[i])) store_.drop(i, SavedStore::activation);
      if (i > 0) at_[i] = none;
    };
    auto drop_residual = [&](std::size_t i) {
      if (!bits_held_[i]) return;
      store_.drop(i, SavedStore::residual);
      bits_held_[i] = 0;
    };
    if (detail::accounted(role_[0])) net.visit(0, [&](const auto& l) { account(0, role_[0], l); });
    std::fill(bits_held_.begin(), bits_held_.end(), 0);
    double drift = 0, swept = 0;
    drifts_.clear();
    input_drift_ = -1;
    AttemptOutcome outcome;
    // The policy's anchors (fidelity/policy.hpp): the prediction (P) in C and
    // in double, and what the anchors and residuals cost in each.
    const bool policy = fidelity.budget > 0;
    const bool may_give_up = policy && fidelity.may_give_up_for_double && !std::is_same_v<C, double>;
    const double unit = unit_roundoff<C>() * fidelity.calibration;
    detail::AnchorPlanner planner(policy ? fidelity.budget / unit : 0);
    detail::AnchorPlanner in_double(fidelity.budget / (unit_roundoff<double>() * fidelity.calibration));
    std::size_t anchor_bytes = 0, double_anchor_bytes = 0, residual_bytes = 0, double_residual_bytes = 0;
    bool reverse_begun = false;
    std::copy(keep_.begin(), keep_.end(), keep_now_.begin());
    std::fill(slot_of_.begin(), slot_of_.end(), none);
    std::fill(cw.busy.begin(), cw.busy.end(), 0);
    std::size_t slots_held = 0, slots_peak = 0;
    std::size_t held_most = 0;  // storage before a buffer is given back mid-run (without keep_across_runs)
    // Without keep_across_runs: the arena is given back while no value lives in it (until the next forward
    // step).
    auto give_back_arena = [&] {
      if (!keep_across_runs_ && arena_.size() > 0 &&
          std::all_of(at_.begin() + 1, at_.end(), [](std::size_t o) { return o == none; })) {
        held_most = std::max(held_most, storage_bytes() + store_.owned_bytes());
        arena_ = Vector<S>();
      }
    };
    if (policy) {
      st.amplification.resize(n);
      for (std::size_t i = 0; i < n; ++i)
        net.visit(i, [&](const auto& l) {
          LayerFidelity& lf = st.amplification[i];
          lf.layer = i;
          lf.layer_name = names_(i, l);
          lf.bound = lf.typical = 1;
          lf.known = false;
          lf.anchored = false;
        });
    } else {
      st.amplification.clear();
    }
    detail::PingPong<C> h(cw.h[0], cw.h[1]);
    std::size_t hc = n + 1;  // h_hc is the current cotangent
    auto reached = [&](std::size_t c) {
      hc = c;
      if (c == 0 && input_gradient_) {
        if constexpr (std::is_same_v<C, S>)
          out.h0 = h.current();  // (no allocation: out.h0 keeps its size)
        else
          out.h0 = h.current().template cast<S>();
      }
    };
    for (std::size_t k = 0; k < plan_.steps.size(); ++k) {
      const PlanStep& s = plan_.steps[k];
      const std::size_t i = s.layer;
      switch (s.op) {
        case PlanOp::forward: {
          take_arena();
          const std::size_t o = offset_of_[k];
          const bool check = at_[i + 1] != none && role_[i + 1] == ValueRole::rebuilt;
          net.visit(i, [&](const auto& l) {
            if (s.residual) {
              decltype(auto) lc = in_c(i, l);
              auto& r = cw.residuals.template get<residual_t<std::remove_cvref_t<decltype(lc)>>>(i);
              moonwalk::save_residual_into(lc, detail::in_scalar<C>(value(i), cw.xc), r);
              drop_residual(i);
              store_.hold(i, SavedStore::residual, names_(i, l), nbytes(r), residual_kind(r));
              bits_held_[i] = 1;
              casts_.release(i);  // (the residual waits for cotangent(i), not the cast: made again there)
            }
            moonwalk::forward_into(l, value(i),
                                   Eigen::Map<Matrix<S>>(arena_.data() + o, rows_[i + 1], batch_));
          });
          ++st.counts.forward;
          if (check) {  // the exact x_{i+1} against the rebuilt one, which it replaces
            const double d = detail::rel_max_err(
                value(i + 1), Eigen::Map<const Matrix<S>>(arena_.data() + o, rows_[i + 1], batch_));
            drift = std::max(drift, d);
            drifts_.push_back({i, top_[i + 1], d});  // (capacity reserved by bind)
          }
          at_[i + 1] = o;
          role_[i + 1] = s.output;
          if (i + 1 < n) net.visit(i + 1, [&](const auto& l) { account(i + 1, s.output, l); });
          if (i > 0 && role_[i] == ValueRole::temporary) free_value(i);
          break;
        }
        case PlanOp::inverse: {
          take_arena();
          const std::size_t o = offset_of_[k];
          net.visit(i, [&](const auto& l) {
            using Lyr = std::remove_cvref_t<decltype(l)>;
            if constexpr (Invertible<Lyr>) {
              if (can_invert(l)) {
                moonwalk::inverse_into(l, value(i + 1),
                                       Eigen::Map<Matrix<S>>(arena_.data() + o, rows_[i], batch_));
                // What the layer derived from its weights for the inverse (a
                // Linear's QR) is freed at once (but with keep_across_runs): kept until the weights change,
                // every inverted layer's would be live together, outside the
                // plan's working set (64 MiB at depth 64, width 256); no later
                // step of this plan reads it, and the next step's weights are new.
                if (!keep_across_runs_) moonwalk::release_derived(l);
                return;
              }
            }
            throw ScheduleError(detail::cat("plan (", plan_.origin, "): inverse(", i, "): layer ", i, " (",
                                            l.name(), ") has no inverse"));
          });
          ++st.counts.inverse;
          top_[i] = role_[i + 1] == ValueRole::rebuilt ? top_[i + 1] : i + 1;
          if (i == 0) {  // the check at x_0: the rebuilt x̂_0 against the caller's, then dropped
            const double d =
                detail::rel_max_err(Eigen::Map<const Matrix<S>>(arena_.data() + o, rows_[0], batch_), x0);
            input_drift_ = std::max(input_drift_, d);
            // Read by backward(1), the rebuilt x_1 has no sweep to check it: this is its check.
            if (k + 1 < plan_.steps.size() && plan_.steps[k + 1].op == PlanOp::backward)
              drift = std::max(drift, d);
            break;
          }
          at_[i] = o;
          role_[i] = ValueRole::rebuilt;
          break;
        }
        case PlanOp::loss:
          if (hc == n) {  // the sweep's check: the swept h_L against ∂ℓ/∂x_L
            (void)detail::loss_into<L, S>(loss, value(n), target, g_);
            swept = std::max(swept, detail::rel_max_err(h.current(), g_.template cast<C>()));
          } else {
            out.loss = detail::loss_into<L, S>(loss, value(n), target, g_);
            if ((policy || forward_mode_) && !std::isfinite(out.loss)) {
              // No gradient to recover (the caller reports it): NaN residuals
              // would anchor every layer the policy crosses, and tangents
              // steps would spread NaN at n_i passes each.
              outcome.finite = false;
              out.h0.resize(0, 0);
              st.working_bytes = std::max(held_most, storage_bytes()) + thread_scratch_bytes();
              store_.report_to(st);
              return outcome;
            }
            h.assign(g_.template cast<C>());
            hc = n;
          }
          free_value(n);
          break;
        case PlanOp::cotangent: {
          give_back_arena();
          if (!reverse_begun) {  // what is kept now, in C and in double (masks keep their size)
            reverse_begun = true;
            residual_bytes = store_.current_bytes();
            double_residual_bytes =
                residual_bytes + (sizeof(double) / sizeof(C) - 1) *
                                     (store_.bytes_put("derivative") + store_.bytes_put("activation"));
          }
          bool gave_up = false;
          // h_i is not made when a tangents step follows (after forward steps, which leave h alone): it
          // replaces it.
          std::size_t next = k + 1;
          while (next < plan_.steps.size() && plan_.steps[next].op == PlanOp::forward) ++next;
          const bool replaced = next < plan_.steps.size() && plan_.steps[next].op == PlanOp::tangents;
          net.visit(i, [&](const auto& l) {
            decltype(auto) lc = in_c(i, l);
            using Lyr = std::remove_cvref_t<decltype(lc)>;
            auto& r = cw.residuals.template get<residual_t<Lyr>>(i);
            // r_i from the held x_i (rebuilt by inversion, or x_0): made and read
            // here, not kept between the passes (not in the store's accounts).
            if (!bits_held_[i]) moonwalk::save_residual_into(lc, detail::in_scalar<C>(value(i), cw.xc), r);
            CotangentKeep keep = s.keep;
            const auto h_size = static_cast<std::size_t>(rows_[i + 1] * batch_);
            if (policy) {
              LayerFidelity& lf = st.amplification[i];
              const Amplification a = moonwalk::amplification(lc, r);
              lf.bound = a.bound;
              lf.typical = a.typical;
              lf.known = a.known;
              if (keep == CotangentKeep::anchor) {  // the plan's: the segment below starts afresh
                planner.restart();
                in_double.restart();
                double_anchor_bytes += h_size * sizeof(double);
              } else {
                if (planner.place(a.typical)) keep = CotangentKeep::anchor;
                if (may_give_up && in_double.place(a.typical)) double_anchor_bytes += h_size * sizeof(double);
              }
              lf.anchored = keep == CotangentKeep::anchor;
            }
            keep_now_[i] = keep;
            if (keep == CotangentKeep::anchor) {
              anchor_bytes += h_size * sizeof(C);
              if (may_give_up && residual_bytes + anchor_bytes > backprop_bytes_ / 8 &&
                  residual_bytes + anchor_bytes > 2 * (double_residual_bytes + double_anchor_bytes)) {
                gave_up = true;
                return;
              }
              if (anchored_[i]) {
                cw.anchors[i] = h.current();  // (sized by allocate())
              } else {
                take_anchor(cw, i, rows_[i + 1]) = h.current();
                slots_peak = std::max(slots_peak, ++slots_held);
              }
              store_.hold(i, SavedStore::anchor, names_(i, l), h_size * sizeof(C), "anchor");
            } else if (keep == CotangentKeep::fragment) {
              if constexpr (Fragmental<Lyr>)
                store_.put(i, SavedStore::fragment, names_(i, l), lc.save_fragment(r, h.current()));
              else
                throw ScheduleError(detail::cat("plan (", plan_.origin, "): cotangent(", i, "): layer ", i,
                                                " (", l.name(), ") keeps no fragment"));
            }
            if (!replaced) {
              moonwalk::vjp_residual_into(lc, r, h.current(), h.next(l.in_features(), batch_));
              h.flip();
              ++st.counts.vjp;
            }
            if (!keep_across_runs_) moonwalk::release_derived(lc);  // (derived again by the sweep)
          });
          if (gave_up) {  // (the gradient is incomplete: the caller recomputes it in double)
            outcome.gave_up_for_double = true;
            outcome.finite = std::isfinite(out.loss);
            out.h0.resize(0, 0);
            st.working_bytes =
                std::max(held_most, storage_bytes() + store_.owned_bytes()) + thread_scratch_bytes();
            trim_pool(cw, slots_peak);
            store_.report_to(st);
            return outcome;
          }
          drop_residual(i);
          if (i > 0 && at_[i] != none) free_value(i);  // (a rebuilt x_i, or the top of a rebuilt stretch)
          if (!keep_across_runs_) {                    // (r_i's last reader: no dead residual in the sweep)
            held_most = std::max(held_most, storage_bytes() + store_.owned_bytes());
            cw.residuals.release(i);
          }
          casts_.release(i);  // (cast again by the sweep: not held between the passes)
          reached(i);
          break;
        }
        case PlanOp::tangents: {
          // h_i[k, b] = ⟨h_L[:, b], t_L[:, b]⟩, t carried from e_k (every
          // column) through layers i … L−1 by jvps, x recomputed alongside.
          give_back_arena();
          const Index n_i = rows_[i];
          auto hi = h.next(n_i, batch_);
          const CRef<C> gl = detail::in_scalar<C>(g_, cw.gl);
          for (Index f = 0; f < n_i; ++f) {
            detail::PingPong<C> t(cw.t[0], cw.t[1]);
            detail::PingPong<S> x(tx_[0], tx_[1]);
            auto e = t.next(n_i, batch_);
            e.setZero();
            e.row(f).setOnes();
            t.flip();
            for (std::size_t j = i; j < n; ++j)
              net.visit(j, [&](const auto& l) {
                const CRef<S> xj = j == i ? value(i) : CRef<S>(x.current());
                t.next(l.out_features(), batch_) =
                    in_c(j, l).jvp(detail::in_scalar<C>(xj, cw.xc), t.current());
                t.flip();
                ++st.counts.jvp;
                if (j + 1 < n) {
                  moonwalk::forward_into(l, xj, x.next(l.out_features(), batch_));
                  x.flip();
                  ++st.counts.forward;
                }
              });
            hi.row(f) = gl.cwiseProduct(t.current()).colwise().sum();
          }
          h.flip();
          held_most = std::max(held_most, storage_bytes() + store_.owned_bytes());  // (the tail's casts)
          for (std::size_t j = i; j < n; ++j) casts_.release(j);
          if (!keep_across_runs_ && k == last_tangents_) {  // (the sweep needs none of their buffers)
            tx_[0] = detail::Buffer<S>();
            tx_[1] = detail::Buffer<S>();
            cw.t[0] = detail::Buffer<C>();
            cw.t[1] = detail::Buffer<C>();
            cw.gl = detail::Buffer<C>();
          }
          if (i > 0) free_value(i);
          reached(i);
          break;
        }
        case PlanOp::sweep:
          net.visit(i, [&](auto& l) {
            const CRef<S> xi = value(i);
            if (hc == i) {  // h_{i+1} from h_i across layer i (else: only ∂ℓ/∂θ_i, read in S)
              decltype(auto) lc = in_c(i, l);
              using Lyr = std::remove_cvref_t<decltype(lc)>;
              const Index out_rows = l.out_features();
              const CRef<C> xc = detail::in_scalar<C>(xi, cw.xc);
              switch (keep_now_[i]) {
                case CotangentKeep::anchor: {
                  const Eigen::Map<const Matrix<C>> a =
                      anchored_[i]
                          ? Eigen::Map<const Matrix<C>>(cw.anchors[i].data(), out_rows, batch_)
                          : Eigen::Map<const Matrix<C>>(cw.pool[slot_of_[i]].data(), out_rows, batch_);
                  auto ja = h.next(l.in_features(), batch_);
                  moonwalk::vjp_into(lc, xc, a, ja);
                  swept = std::max(swept, detail::rel_max_err(h.current(), ja));
                  ++st.counts.vjp;
                  h.assign(a);
                  store_.drop(i, SavedStore::anchor);
                  if (slot_of_[i] != none) {
                    cw.busy[slot_of_[i]] = 0;
                    slot_of_[i] = none;
                    --slots_held;
                  }
                  break;
                }
                case CotangentKeep::none:
                  if constexpr (Submersive<Lyr>) {
                    moonwalk::vijp_into(lc, xc, h.current(), h.next(out_rows, batch_));
                    h.flip();
                    if (!keep_across_runs_)
                      moonwalk::release_derived(lc);  // (its factorisation: this step's alone)
                  } else {
                    throw ScheduleError(detail::cat("plan (", plan_.origin, "): sweep(", i, "): layer ", i,
                                                    " (", l.name(), ") has no vijp"));
                  }
                  ++st.counts.vijp;
                  break;
                case CotangentKeep::fragment:
                  if constexpr (Fragmental<Lyr>) {
                    const auto f = store_.take<typename Lyr::fragment_type>(i, SavedStore::fragment);
                    h.next(out_rows, batch_) = lc.vijp_with_fragment(xc, h.current(), f);
                    h.flip();
                  } else {
                    throw ScheduleError(detail::cat("plan (", plan_.origin, "): sweep(", i, "): layer ", i,
                                                    " (", l.name(), ") has no fragment"));
                  }
                  ++st.counts.vijp;
                  break;
              }
            }
            if constexpr (std::is_same_v<C, S>) {
              moonwalk::accumulate_vjp_params(l, xi, h.current());
            } else if (l.num_params() > 0) {
              // g += J_θᵀ h, a sum over samples: h converted to S a block of
              // columns at a time, unless the layer's samples interact (BatchNorm
              // in training: its J_θ needs the whole batch).
              const Index block = moonwalk::couples_batch(l) ? batch_ : detail::kConvertColumns;
              for (Index c0 = 0; c0 < batch_; c0 += block) {
                const Index m = std::min(block, batch_ - c0);
                auto hs = h_s_.view(l.out_features(), m);
                hs = h.current().middleCols(c0, m).template cast<S>();
                moonwalk::accumulate_vjp_params(l, xi.middleCols(c0, m), hs);
              }
            }
            ++st.counts.vjp_params;
            detail::gradient_ready(i);
          });
          casts_.release(i);  // (the sweep is its last user)
          hc = i + 1;
          if (i > 0 && role_[i] != ValueRole::temporary) free_value(i);
          break;
        case PlanOp::backward:
          if constexpr (std::is_same_v<C, S>)
            net.visit(i, [&](auto& l) {
              using Lyr = std::remove_cvref_t<decltype(l)>;
              const CRef<S> xi = value(i);
              moonwalk::accumulate_vjp_params(l, xi, h.current());
              ++st.counts.vjp_params;
              detail::gradient_ready(i);
              const bool from_bits = bits_held_[i] && role_[i] == ValueRole::rebuilt;
              if (i > 0 || input_gradient_) {
                if (from_bits)  // (the kept branch pattern, not the rebuilt input's)
                  moonwalk::vjp_residual_into(l, same_.residuals.template get<residual_t<Lyr>>(i),
                                              h.current(), h.next(l.in_features(), batch_));
                else
                  moonwalk::vjp_into(l, xi, h.current(), h.next(l.in_features(), batch_));
                h.flip();
                ++st.counts.vjp;
              }
            });
          drop_residual(i);
          free_value(i);
          reached(i);
          break;
      }
    }
    if (detail::accounted(role_[0])) store_.drop(0, SavedStore::activation);
    trim_pool(cw, slots_peak);  // (the pool: as many buffers as the step held at once)
    st.error_estimate = std::max(drift, swept);
    st.working_bytes = std::max(held_most, storage_bytes()) + thread_scratch_bytes();
    if (!input_gradient_) out.h0.resize(0, 0);
    for (std::size_t i = 0; i < n; ++i)
      if (keep_now_[i] == CotangentKeep::anchor) st.anchor_layers.push_back(i);
    if (policy) st.predicted_error = planner.worst() * unit;
    store_.report_to(st);
    outcome.finite = std::isfinite(out.loss);
    outcome.estimate = st.error_estimate;
    if (!drifts_.empty() || input_drift_ >= 0) outcome.drift = std::max(drift, input_drift_);
    return outcome;
  }

 private:
  [[nodiscard]] static std::size_t widest(const std::vector<Index>& rows, Index batch, bool input_gradient) {
    Index w = 0;
    for (std::size_t i = input_gradient ? 0 : 1; i < rows.size(); ++i) w = std::max(w, rows[i]);
    return static_cast<std::size_t>(w * batch);
  }
  [[nodiscard]] std::size_t widest_cotangent() const { return widest(rows_, batch_, reaches_h0_); }

  /// The layout: the arena offset each forward step writes at (the top of
  /// this file), stacked where the plan allows, else first-fit.
  void assign() {
    if (!stacked()) first_fit();
    bits_held_.assign(plan_.layers, 0);
    at_.assign(plan_.layers + 1, none);
    top_.assign(plan_.layers + 1, none);
    role_.assign(plan_.layers + 1, ValueRole::temporary);
    drifts_.clear();
    drifts_.reserve(
        static_cast<std::size_t>(std::count_if(plan_.steps.begin(), plan_.steps.end(),
                                               [](const PlanStep& st) { return st.op == PlanOp::forward; })));
  }

  /// The values live while the layout is made: offset and size of x_i
  /// (offset none: not in the arena).
  struct Live {
    std::vector<std::size_t> offset, size;
    explicit Live(std::size_t values) : offset(values, none), size(values, 0) {}
    [[nodiscard]] bool overlaps(std::size_t o, std::size_t n) const {
      for (std::size_t i = 0; i < offset.size(); ++i)
        if (offset[i] != none && o < offset[i] + size[i] && offset[i] < o + n) return true;
      return false;
    }
  };

  /// Walks the plan as check_plan does, asking place(k, size, live) for the
  /// offset of each forward step k's value (none: give up) and freeing
  /// values as the plan frees them. True when every value was placed.
  template <class Place>
  bool walk(Place&& place) {
    const std::size_t n = plan_.layers;
    Live live(n + 1);
    std::vector<ValueRole> role(n + 1, ValueRole::temporary);
    offset_of_.assign(plan_.steps.size(), none);
    auto release = [&](std::size_t i) {
      if (i > 0) live.offset[i] = none;
    };
    for (std::size_t k = 0; k < plan_.steps.size(); ++k) {
      const PlanStep& st = plan_.steps[k];
      if (st.op == PlanOp::forward || st.op == PlanOp::inverse) {
        const std::size_t j = st.op == PlanOp::forward ? st.layer + 1 : st.layer;
        const auto size = static_cast<std::size_t>(rows_[j] * batch_);
        const std::size_t o = place(k, size, live);  // (a check: beside the rebuilt x_j, still live)
        if (o == none) return false;
        offset_of_[k] = o;
        if (st.op == PlanOp::inverse && j == 0) continue;  // (the check at x_0: dropped at once)
        live.offset[j] = o;
        live.size[j] = size;
        role[j] = st.output;
        if (st.op == PlanOp::forward && st.layer > 0 && role[st.layer] == ValueRole::temporary)
          release(st.layer);
      } else if (st.op == PlanOp::sweep) {
        if (role[st.layer] != ValueRole::temporary) release(st.layer);
      } else {  // (loss, backward, and cotangent: which frees a held x_i)
        release(st.layer);
      }
    }
    return true;
  }

  /// The stacked layout in an arena of the plan's peak; false when the plan
  /// breaks the stack order (a value would overlap another or leave the arena).
  bool stacked() {
    std::vector<std::size_t> sizes(rows_.size());
    for (std::size_t i = 0; i < rows_.size(); ++i) sizes[i] = static_cast<std::size_t>(rows_[i] * batch_);
    const std::size_t peak = check_plan(plan_, sizes).peak_value_bytes;  // (in scalars here)
    // ahead[k]: how many forward steps follow step k in its advance, each
    // reading the previous one's temporary output right after it.
    std::vector<std::size_t> ahead(plan_.steps.size(), 0);
    for (std::size_t k = plan_.steps.size(); k-- > 0;) {
      const PlanStep& st = plan_.steps[k];
      if (st.op != PlanOp::forward || st.output != ValueRole::temporary || k + 1 == plan_.steps.size())
        continue;
      const PlanStep& next = plan_.steps[k + 1];
      if (next.op == PlanOp::forward && next.layer == st.layer + 1) ahead[k] = ahead[k + 1] + 1;
    }
    const bool ok = walk([&](std::size_t k, std::size_t size, const Live& live) -> std::size_t {
      if (size > peak) return none;
      // The stack's top: the end of the highest live value at the bottom
      // end (values at the top end leave room for this one below them).
      std::size_t top = 0;
      for (std::size_t i = 0; i < live.offset.size(); ++i)
        if (live.offset[i] != none && live.offset[i] + live.size[i] + size <= peak)
          top = std::max(top, live.offset[i] + live.size[i]);
      const std::size_t o = ahead[k] % 2 == 0 ? top : peak - size;
      return o + size > peak || live.overlaps(o, size) ? none : o;
    });
    if (ok) arena_size_ = peak;
    return ok;
  }

  /// First fit: the lowest offset where the value overlaps no live one.
  void first_fit() {
    arena_size_ = 0;
    (void)walk([&](std::size_t, std::size_t size, const Live& live) {
      std::vector<std::pair<std::size_t, std::size_t>> used;
      for (std::size_t i = 0; i < live.offset.size(); ++i)
        if (live.offset[i] != none) used.emplace_back(live.offset[i], live.offset[i] + live.size[i]);
      std::sort(used.begin(), used.end());
      std::size_t o = 0;
      for (const auto& [begin, end] : used) {
        if (begin >= o + size) break;
        o = std::max(o, end);
      }
      arena_size_ = std::max(arena_size_, o + size);
      return o;
    });
  }

  /// What a run keeps in the cotangents' scalar type C.
  template <class C>
  struct Carried {
    detail::Buffer<C> h[2];               ///< the cotangents, alternating
    std::vector<Matrix<C>> anchors;       ///< layer i's anchor h_{i+1}
    detail::Buffer<C> xc;                 ///< x_i converted to C (C ≠ S)
    detail::Buffer<C> t[2];               ///< tangents(i)'s tangent, alternating
    detail::Buffer<C> gl;                 ///< ∂ℓ/∂x_L converted to C (tangents, C ≠ S)
    detail::Workspace residuals;          ///< layer i's residual r_i (of the layer in C) in slot i
    std::vector<detail::Buffer<C>> pool;  ///< the policy's anchors (PlanRun::slot_of_)
    std::vector<char> busy;               ///< per pool buffer: an anchor is in it
    [[nodiscard]] std::size_t bytes() const {
      std::size_t b = h[0].storage_bytes() + h[1].storage_bytes() + xc.storage_bytes() +
                      t[0].storage_bytes() + t[1].storage_bytes() + gl.storage_bytes() + residuals.bytes();
      for (const Matrix<C>& a : anchors) b += static_cast<std::size_t>(a.size()) * sizeof(C);
      for (const detail::Buffer<C>& a : pool) b += a.storage_bytes();
      return b;
    }
    void clear() {
      h[0] = detail::Buffer<C>();
      h[1] = detail::Buffer<C>();
      xc = detail::Buffer<C>();
      t[0] = detail::Buffer<C>();
      t[1] = detail::Buffer<C>();
      gl = detail::Buffer<C>();
      residuals.clear();
      for (Matrix<C>& a : anchors) a = Matrix<C>();
      pool.clear();
      busy.clear();
    }
  };

  /// A free pool buffer for the policy's anchor of layer i (rows × batch).
  template <class C>
  Eigen::Map<Matrix<C>> take_anchor(Carried<C>& cw, std::size_t i, Index rows) {
    std::size_t k = 0;
    while (k < cw.pool.size() && cw.busy[k]) ++k;
    if (k == cw.pool.size()) {  // (more anchors held at once than in any step since the last trim)
      cw.pool.emplace_back();
      cw.busy.push_back(0);
    }
    cw.busy[k] = 1;
    slot_of_[i] = k;
    return cw.pool[k].view(rows, batch_);
  }
  /// The arena at its size (given back by a reverse pass without keep_across_runs).
  void take_arena() {
    if (static_cast<std::size_t>(arena_.size()) != arena_size_)
      detail::safe_resize(arena_, static_cast<Index>(arena_size_));
  }
  /// Keeps as many pool buffers as the step held at once.
  template <class C>
  static void trim_pool(Carried<C>& cw, std::size_t used) {
    if (cw.pool.size() > used) {
      cw.pool.resize(used);
      cw.busy.resize(used);
    }
  }
  template <class C>
  Carried<C>& carried() {
    if constexpr (std::is_same_v<C, S>)
      return same_;
    else
      return wide_;
  }
  template <class C>
  const Carried<C>& carried() const {
    if constexpr (std::is_same_v<C, S>)
      return same_;
    else
      return wide_;
  }

  /// Gives the arena and the cotangent buffers (in C) their sizes (nothing when they have them).
  void allocate() { allocate(same_); }
  template <class C>
  void allocate(Carried<C>& cw) {
    detail::safe_resize(arena_, static_cast<Index>(arena_size_));
    const auto w = static_cast<Index>(widest_cotangent());
    for (auto& h : cw.h) {
      if (h.storage_bytes() != static_cast<std::size_t>(w) * sizeof(C))
        h = detail::Buffer<C>();  // (exact: it never shrinks)
      h.view(w, 1);
    }
    detail::safe_resize(g_, rows_.back(), batch_);
    for (std::size_t i = 0; i < cw.anchors.size(); ++i)
      if (anchored_[i]) detail::safe_resize(cw.anchors[i], rows_[i + 1], batch_);
  }

  Plan plan_;
  std::vector<Index> rows_;
  Index batch_ = -1;
  bool input_gradient_ = false;
  bool reaches_h0_ = false;             ///< a step computes h_0 (input_gradient_, or the plan's cotangent(0))
  std::vector<std::size_t> offset_of_;  ///< per step: where a forward step writes (scalars into the arena)
  std::size_t arena_size_ = 0;          ///< scalars
  std::size_t bits_bytes_ = 0;          ///< the branch bits' slots
  Vector<S> arena_;
  std::vector<std::size_t> at_;  ///< where x_i is now (none: not held, or x_0)
  std::vector<ValueRole> role_;
  std::vector<std::size_t> top_;      ///< a rebuilt x_i: the x_top its stretch of inverses began from
  std::vector<CheckedDrift> drifts_;  ///< the last run's checks
  double input_drift_ = -1;           ///< input_drift()
  Matrix<S> g_;
  Carried<S> same_;                      ///< cotangents, anchors and residuals in S
  Carried<double> wide_;                 ///< the same in double (a float network's double cotangents)
  detail::CastLayers<double> casts_;     ///< layers cast to double, for a run in double
  detail::Buffer<S> h_s_;                ///< columns of h converted to S for ∂ℓ/∂θ (C ≠ S)
  detail::Buffer<S> tx_[2];              ///< tangents(i)'s recomputed inputs, alternating
  std::vector<char> bits_held_;          ///< per layer: its residual is kept now
  std::vector<CotangentKeep> keep_;      ///< per layer: what its cotangent step keeps
  std::vector<CotangentKeep> keep_now_;  ///< the same in this run (the policy's anchors added)
  std::vector<std::size_t> slot_of_;     ///< per layer: the pool buffer of its policy anchor (none)
  std::size_t backprop_bytes_ = 0;       ///< what backprop keeps: the layers' inputs
  bool keep_across_runs_ = false;        ///< keep_across_runs()
  bool forward_mode_ = false;            ///< the plan has tangents steps
  std::size_t last_tangents_ = none;     ///< the plan's last tangents step
  std::vector<char> anchored_;           ///< per layer: its cotangent step keeps an anchor
  SavedStore store_;
  detail::LayerNames names_;
};

/// The value shapes of a chain, rows of x_0 … x_L, written into `rows`
/// (no allocation once it has held them: what a bound plan compares each step).
template <Net N>
void value_rows_into(N& net, std::vector<Index>& rows) {
  rows.clear();
  rows.reserve(net.size() + 1);
  rows.push_back(net.in_features());
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) { rows.push_back(l.out_features()); });
}

/// The value shapes of a chain: rows of x_0 … x_L.
template <Net N>
std::vector<Index> value_rows(N& net) {
  std::vector<Index> rows;
  value_rows_into(net, rows);
  return rows;
}

}  // namespace moonwalk
