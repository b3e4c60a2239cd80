// Moonwalk — a plan's report: per layer, what happens to its input (kept,
// checkpoint, recomputed, rebuilt, swept) and to its cotangent (vijp,
// fragment, anchor), the bytes it keeps, the bytes held when its gradient
// is read, and its predicted time; text and JSON.
#pragma once

#include <iomanip>
#include <sstream>
#include <string>
#include <vector>

#include "moonwalk/plan/plan.hpp"
#include "moonwalk/schedules/result.hpp"

namespace moonwalk {

/// A plan with its figures and per-layer rows on one ChainCosts.
struct PlanReport {
  std::string origin;
  std::size_t layers = 0;
  PlanFigures figures;
  double loss_seconds = 0;
  std::vector<LayerPlan> rows;
  /// Layer names (one per layer, or empty).
  std::vector<std::string> names;
};

/// The report of `p` on `c` (check_plan's checks; throws ScheduleError as it does).
[[nodiscard]] inline PlanReport plan_report(const Plan& p, const ChainCosts& c,
                                            std::vector<std::string> names = {}) {
  if (!names.empty() && names.size() != p.layers)
    throw ScheduleError(detail::cat("plan report: ", names.size(), " layer names for ", p.layers, " layers"));
  PlanReport r{.origin = p.origin,
               .layers = p.layers,
               .figures = {},
               .loss_seconds = c.loss,
               .rows = {},
               .names = std::move(names)};
  r.figures = plan_rows(p, c, r.rows);
  return r;
}

/// The report as a text table (times in milliseconds, sizes in bytes).
[[nodiscard]] inline std::string plan_report_text(const PlanReport& r) {
  std::ostringstream s;
  const PlanFigures& f = r.figures;
  s << "plan (" << r.origin << ", " << r.layers << " layers): predicted " << std::fixed
    << std::setprecision(3) << f.seconds * 1e3 << " ms, at most " << f.peak_held_bytes << " bytes held ("
    << f.peak_kept_bytes << " kept), " << f.forward_steps << " forward steps, " << f.inverse_steps
    << " inverses, " << f.checks << " checks";
  if (f.sweep_steps > 0)
    s << ", " << f.cotangent_steps << " cotangent steps, " << f.sweep_steps << " swept layers, " << f.anchors
      << " anchors";
  s << "\n";
  s << std::left << "  " << std::setw(7) << "layer" << std::setw(28) << "name" << std::setw(20) << "input"
    << std::setw(6) << "fwd" << std::setw(6) << "inv" << std::setw(12) << "kept" << std::setw(12) << "working"
    << "ms\n";
  for (const LayerPlan& l : r.rows) {
    std::string fate = to_string(l.input);
    if (l.checked) fate += "+chk";
    if (l.residual) fate += "+res";
    if (l.crossed) fate += std::string("+") + to_string(l.keep);
    s << "  " << std::setw(7) << l.layer << std::setw(28)
      << (r.names.empty() ? std::string() : r.names[l.layer]) << std::setw(20) << fate << std::setw(6)
      << l.forwards << std::setw(6) << l.inverses << std::setw(12) << l.kept_bytes << std::setw(12)
      << l.working_bytes << std::fixed << std::setprecision(3) << l.seconds * 1e3 << "\n";
  }
  s << "  loss " << std::fixed << std::setprecision(3) << r.loss_seconds * 1e3 << " ms\n";
  return s.str();
}

/// The report as one JSON object: {"origin", "layers", "predicted_seconds",
/// "peak_held_bytes", "peak_kept_bytes", "forward_steps", "inverse_steps",
/// "checks", "cotangent_steps", "sweep_steps", "anchors", "loss_seconds", "per_layer": [{"layer", "name",
/// "input", "forwards", "inverses", "checked", "residual", "keep" (how the sweep crosses
/// the layer: "vijp", "fragment", "anchor"; null: not swept), "kept_bytes", "working_bytes",
/// "predicted_seconds"}]}.
[[nodiscard]] inline std::string plan_report_json(const PlanReport& r) {
  std::ostringstream s;
  const PlanFigures& f = r.figures;
  s << "{\"origin\":\"" << detail::json_escape(r.origin) << "\",\"layers\":" << r.layers
    << ",\"predicted_seconds\":" << detail::json_number(f.seconds)
    << ",\"peak_held_bytes\":" << f.peak_held_bytes << ",\"peak_kept_bytes\":" << f.peak_kept_bytes
    << ",\"forward_steps\":" << f.forward_steps << ",\"inverse_steps\":" << f.inverse_steps
    << ",\"checks\":" << f.checks << ",\"cotangent_steps\":" << f.cotangent_steps
    << ",\"sweep_steps\":" << f.sweep_steps << ",\"anchors\":" << f.anchors
    << ",\"loss_seconds\":" << detail::json_number(r.loss_seconds) << ",\"per_layer\":[";
  for (const LayerPlan& l : r.rows) {
    s << (l.layer ? "," : "") << "{\"layer\":" << l.layer << ",\"name\":\""
      << detail::json_escape(r.names.empty() ? std::string() : r.names[l.layer]) << "\",\"input\":\""
      << to_string(l.input) << "\",\"forwards\":" << l.forwards << ",\"inverses\":" << l.inverses
      << ",\"checked\":" << (l.checked ? "true" : "false")
      << ",\"residual\":" << (l.residual ? "true" : "false")
      << ",\"keep\":" << (l.crossed ? detail::cat("\"", to_string(l.keep), "\"") : std::string("null"))
      << ",\"kept_bytes\":" << l.kept_bytes << ",\"working_bytes\":" << l.working_bytes
      << ",\"predicted_seconds\":" << detail::json_number(l.seconds) << "}";
  }
  s << "]}";
  return s.str();
}

}  // namespace moonwalk
