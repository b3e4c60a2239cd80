// Moonwalk — schedules chosen by name at run time (command-line tools,
// trainers): one place that maps "mixed", "checkpoint", … to a configured
// schedule object and hands it to generic code.
//
//   ScheduleChoice c{.name = "mixed"};
//   auto r = with_schedule(c, net.size(), [&](const auto& schedule) {
//     return gradient(schedule, net, x, loss, target);
//   });
//
// Names (schedule_names()):
//   backprop     Backprop{}
//   mixed        MixedMoonwalk{.anchors.every, .fidelity, .rebuild_inputs}
//   pure         PureMoonwalk{.fidelity}
//   checkpoint   Checkpointing{.every} (0: round(√L))
//   binomial     Checkpointing{.slots} (0: max(1, round(√L)))
//   revbackprop  RevBackprop{}
//   planned      Planned{.budget, .calibration} (0: unlimited)
//   forward      NaiveForward{} (one jvp pass per parameter)
//   projforward  ProjForward{.directions, .seed} (an estimate)
#pragma once

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "moonwalk/core/types.hpp"
#include "moonwalk/fidelity/policy.hpp"
#include "moonwalk/schedules/backprop.hpp"
#include "moonwalk/schedules/checkpoint.hpp"
#include "moonwalk/schedules/forward_mode.hpp"
#include "moonwalk/schedules/mixed.hpp"
#include "moonwalk/schedules/planned.hpp"
#include "moonwalk/schedules/projforward.hpp"
#include "moonwalk/schedules/pure.hpp"
#include "moonwalk/schedules/revbackprop.hpp"

namespace moonwalk {

/// A schedule by name plus the options the named schedules take (each
/// schedule reads only its own).
struct ScheduleChoice {
  std::string name = "mixed";
  Fidelity fidelity{};            ///< mixed, pure
  std::size_t anchors_every = 0;  ///< mixed: cotangent anchor every k layers (0: the policy decides)
  bool rebuild_inputs = false;    ///< mixed: rebuild invertible layers' inputs
  std::size_t every = 0;          ///< checkpoint: segment length (0: round(√L))
  std::size_t slots = 0;          ///< binomial: held inputs (0: max(1, round(√L)))
  std::size_t directions = 16;    ///< projforward
  std::uint64_t seed = 0;         ///< projforward
  std::size_t budget = 0;         ///< planned: bytes of a step's working set (0: unlimited)
  Calibration calibration = Calibration::cached;  ///< planned: where layer costs come from
  bool invert = true;    ///< planned: plans may rebuild values by inversion (Planned::invert)
  bool moonwalk = true;  ///< planned: plans may reverse the bottom layers by Moonwalk (Planned::moonwalk)
  /// backprop, mixed, checkpoint, binomial, revbackprop, planned: also return h_0 =
  /// ∂ℓ/∂x_0 (GradientResult::h0; the others always do).
  bool input_gradient = false;
  /// backprop, mixed, checkpoint, binomial, planned: the buffers kept across steps
  /// (schedules/detail/workspace.hpp), shared by every schedule with_schedule makes from this choice.
  std::shared_ptr<detail::SharedWorkspace> workspace = detail::new_workspace();
};

/// Every name with_schedule() accepts, in the order tools list them.
inline const std::vector<std::string>& schedule_names() {
  static const std::vector<std::string> names{"backprop",    "mixed",   "pure",    "checkpoint", "binomial",
                                              "revbackprop", "planned", "forward", "projforward"};
  return names;
}

/// True when `name` is one of schedule_names().
inline bool is_schedule_name(const std::string& name) {
  const auto& n = schedule_names();
  return std::find(n.begin(), n.end(), name) != n.end();
}

/// Calls f(schedule) with the schedule object `c` names, configured from `c`
/// (`layers` = the network's length, for the √L defaults), and returns what f
/// returns (f must return the same type for every schedule, e.g. a generic
/// lambda calling gradient()). Throws ScheduleError for an unknown name,
/// listing the known ones.
template <class F>
decltype(auto) with_schedule(const ScheduleChoice& c, std::size_t layers, F&& f) {
  const auto sqrt_l =
      std::max<std::size_t>(1, static_cast<std::size_t>(std::lround(std::sqrt(double(layers)))));
  // (Designated initialisers: the choice's workspace and fidelity are shared,
  // never a default one made and dropped, so a step allocates none of them.)
  if (c.name == "backprop") {
    Backprop b{.workspace = c.workspace, .input_gradient = c.input_gradient};
    return f(b);
  }
  if (c.name == "mixed") {
    MixedMoonwalk m{.anchors = {.every = c.anchors_every},
                    .fidelity = c.fidelity,
                    .rebuild_inputs = c.rebuild_inputs,
                    .input_gradient = c.input_gradient,
                    .workspace = c.workspace};
    return f(m);
  }
  if (c.name == "pure") {
    PureMoonwalk p;
    p.fidelity = c.fidelity;
    return f(p);
  }
  if (c.name == "checkpoint") {
    Checkpointing k{.every = c.every, .input_gradient = c.input_gradient, .workspace = c.workspace};
    return f(k);
  }
  if (c.name == "binomial") {
    Checkpointing k{.slots = c.slots > 0 ? c.slots : sqrt_l,
                    .input_gradient = c.input_gradient,
                    .workspace = c.workspace};
    return f(k);
  }
  if (c.name == "revbackprop") return f(RevBackprop{.input_gradient = c.input_gradient});
  if (c.name == "planned") {
    Planned p{.budget = c.budget,
              .calibration = c.calibration,
              .input_gradient = c.input_gradient,
              .invert = c.invert,
              .moonwalk = c.moonwalk,
              .workspace = c.workspace};
    return f(p);
  }
  if (c.name == "forward") return f(NaiveForward{});
  if (c.name == "projforward") {
    ProjForward p;
    p.directions = c.directions;
    p.seed = c.seed;
    return f(p);
  }
  std::string known;
  for (const auto& n : schedule_names()) known = known.empty() ? n : detail::cat(known, ", ", n);
  throw ScheduleError(detail::cat("unknown schedule '", c.name, "' (known: ", known, ")"));
}

}  // namespace moonwalk
