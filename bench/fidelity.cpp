// moonwalk-fidelity — how accurate is a Moonwalk gradient, and what does
// holding its error cost in memory? (docs/design.md §5–6; BENCHMARKS.md "Fidelity")
//
//   moonwalk-fidelity [--families mlp,revnet] [--depths 4,16,64,256] [--dtypes float,double]
//                     [--policies none,every:4,every:16,tolerance,double,rebuild,revbackprop,backprop]
//                     [--seeds 0,1,2] [--width 64] [--batch 32] [--inits gaussian,orthogonal]
//                     [--acts leaky_relu:0.1,...] [--scales 0.3,1,2] [--betweens none,tanh]
//                     [--hidden H] [--tolerance T]
//
// Every list flag restricts the grid; the default is the full grid. One CSV
// row per (network, dtype, policy) on stdout, header once:
//
//   family,init,act,scale,between,depth,width,batch,dtype,policy,true_error,error_estimate,
//   predicted_error,residual_bytes,backprop_bytes,anchors,precision,fallbacks,seconds,backprop_seconds
//
// Progress, failures and every seed where policy `tolerance` did not hold its
// tolerance (lines starting "tolerance-miss", with the spec in short form —
// `N x[...]` repeats a block — the error against backprop in the same dtype,
// and the flags that redo that seed alone) go to stderr.
//
// ---- Networks -------------------------------------------------------------------
// Built from spec strings by parse_network<S>(spec, seed, {.init = INIT}):
//   mlp     in:W, then DEPTH × (linear:W, ACT)                      (2·DEPTH layers)
//           ACT = leaky_relu:0.1 | leaky_relu:0.3 | leaky_relu:0.9 | tanh;
//           INIT = gaussian | orthogonal; columns scale, between = "-".
//   revnet  in:W, then DEPTH × coupling:additive:H:tanh:SCALE, with `tanh`
//           between consecutive blocks when between = tanh;
//           SCALE = 0.3 | 1 | 2, H = --hidden (default W); INIT = orthogonal
//           unless --inits says otherwise; column act = "-".
// W = --width (default 64), batch B = --batch (default 32).
//
// ---- Data and reference -----------------------------------------------------------
// Exactly as moonwalk-gradcheck (tools/gradcheck.cpp), so a row can be redone
// there with the same --net/--seed/--init/--batch/--dtype: x ~ N(0, 1)
// (W × B) and the MSE target ~ N(0, 1) are drawn in double from the seed and
// rounded once to the dtype. The reference g_ref is backprop in double on a
// double twin holding exactly the network's parameter values, fed the rounded
// data: the two networks compute the same function, so g_ref is the exact
// gradient up to double rounding.
//
// ---- Columns ----------------------------------------------------------------------
// true_error       per parameter tensor (one layer's block, parameter_offsets)
//                  max|g − g_ref| / max|g_ref| (absolute where g_ref is 0),
//                  maximised over tensors; nan if g holds a NaN, inf if it
//                  holds an infinity (and no NaN).
// error_estimate   stats.error_estimate: Moonwalk's end-of-sweep/anchor
//                  mismatch; RevBackprop's reconstruction drift; 0 for backprop.
// predicted_error  stats.predicted_error (the policy's a-priori model, 0 when
//                  it made no prediction).
// residual_bytes   stats.residual_bytes: peak bytes the schedule kept between
//                  its passes (for `tolerance`: the peak over its attempts).
// backprop_bytes   the same for float/double backprop on the same network.
// anchors, precision, fallbacks   stats.anchor_layers.size(), stats.precision
//                  ("-" when the schedule reports none), stats.fallbacks.
// seconds, backprop_seconds       wall time of one gradient of this policy and
//                  of backprop, on the same network and data, same process
//                  (single runs: a ratio, not a benchmark).
//
// Worst of the seeds: each row is the seed with the largest true_error (a
// failed run or NaN counts as largest), and every other column is that seed's
// — not a maximum per column.
//
// ---- Policies -----------------------------------------------------------------------
//   none         MixedMoonwalk{.fidelity = Fidelity::none()}
//   every:K      same, plus .anchors.every = K
//   tolerance    MixedMoonwalk{} (the default Fidelity{}, --tolerance T if given)
//   double       MixedMoonwalk{.fidelity = Fidelity::double_cotangents()}
//   rebuild      MixedMoonwalk{.rebuild_inputs = true} under the default policy (revnet
//                only: invertible layers' inputs rebuilt by inversion, kept instead
//                when the inversion drifts)
//   revbackprop  RevBackprop{} (revnet only; its estimate is the reconstruction drift)
//   backprop     Backprop{}: the dtype's own rounding, the floor
// A moonwalk::Error from a schedule gives a row of nan with precision "error"
// (message on stderr); the grid goes on.
#include <algorithm>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <iostream>
#include <limits>
#include <moonwalk/fidelity/policy.hpp>
#include <moonwalk/moonwalk.hpp>
#include <moonwalk/nets/parameters.hpp>
#include <moonwalk/nets/spec.hpp>
#include <moonwalk/schedules/revbackprop.hpp>
#include <optional>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

namespace {

using moonwalk::Index;
using moonwalk::Matrix;
using moonwalk::Network;
using moonwalk::Vector;
using moonwalk::detail::cat;

constexpr const char* kUsage =
    "usage: moonwalk-fidelity [--families LIST] [--depths LIST] [--dtypes LIST] [--policies LIST]\n"
    "                         [--seeds LIST] [--width W] [--batch B] [--inits LIST] [--acts LIST]\n"
    "                         [--scales LIST] [--betweens LIST] [--hidden H] [--tolerance T]\n"
    "  --families    mlp,revnet                                   (default both)\n"
    "  --depths      blocks per network                           (default 4,16,64,256)\n"
    "  --dtypes      float,double                                 (default both)\n"
    "  --policies    none,every:K,tolerance,double,rebuild,revbackprop,backprop\n"
    "                (default none,every:4,every:16,tolerance,double,rebuild,revbackprop,backprop)\n"
    "  --seeds       seeds of parameters and data; rows are the worst (default 0,1,2)\n"
    "  --width W     features (default 64); --batch B columns (default 32)\n"
    "  --inits       mlp: gaussian,orthogonal (default both); revnet: orthogonal unless given\n"
    "  --acts        mlp activations (default leaky_relu:0.1,leaky_relu:0.3,leaky_relu:0.9,tanh)\n"
    "  --scales      revnet branch scales (default 0.3,1,2)\n"
    "  --betweens    revnet: none,tanh between blocks (default both)\n"
    "  --hidden H    revnet branch hidden width (default W)\n"
    "  --tolerance T policy `tolerance` target (default 1e-4 float, 1e-10 double)\n"
    "CSV on stdout (header once), progress on stderr.\n";

class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Options {
  std::vector<std::string> families = {"mlp", "revnet"};
  std::vector<std::size_t> depths = {4, 16, 64, 256};
  std::vector<std::string> dtypes = {"float", "double"};
  std::vector<std::string> policies = {"none",   "every:4", "every:16",    "tolerance",
                                       "double", "rebuild", "revbackprop", "backprop"};
  std::vector<std::uint64_t> seeds = {0, 1, 2};
  Index width = 64, batch = 32, hidden = 0;
  std::vector<std::string> inits = {"gaussian", "orthogonal"};
  bool inits_given = false;
  std::vector<std::string> acts = {"leaky_relu:0.1", "leaky_relu:0.3", "leaky_relu:0.9", "tanh"};
  std::vector<std::string> scales = {"0.3", "1", "2"};
  std::vector<std::string> betweens = {"none", "tanh"};
  double tolerance = 0;
};

std::vector<std::string> split(const std::string& v) {
  std::vector<std::string> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = v.find(',', start);
    std::string item = v.substr(start, comma == std::string::npos ? comma : comma - start);
    if (item.empty()) throw UsageError(cat("empty item in list '", v, "'"));
    out.push_back(std::move(item));
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

template <class T>
T parse_integer(const std::string& option, const std::string& value) {
  T v{};
  const char* last = value.data() + value.size();
  const auto [p, ec] = std::from_chars(value.data(), last, v);
  if (value.empty() || ec != std::errc() || p != last)
    throw UsageError(cat(option, ": bad number '", value, "' (expected an integer)"));
  return v;
}

double parse_positive(const std::string& option, const std::string& value) {
  double v = 0;
  const char* last = value.data() + value.size();
  const auto [p, ec] = std::from_chars(value.data(), last, v);
  if (value.empty() || ec != std::errc() || p != last || !(v > 0) || !std::isfinite(v))
    throw UsageError(cat(option, ": expected a positive number, got '", value, "'"));
  return v;
}

void check_known(const std::string& option, const std::vector<std::string>& items,
                 const std::vector<std::string>& known) {
  for (const auto& i : items)
    if (std::find(known.begin(), known.end(), i) == known.end()) {
      std::string k;
      for (const auto& n : known) k += cat(k.empty() ? "" : ", ", n);
      throw UsageError(cat(option, ": unknown value '", i, "' (known: ", k, ")"));
    }
}

std::optional<Options> parse_args(int argc, char** argv) {
  Options o;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") return std::nullopt;
    std::string value;
    if (const auto eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
    } else {
      if (i + 1 >= argc) throw UsageError(cat(arg, ": missing value"));
      value = argv[++i];
    }
    if (arg == "--families") {
      o.families = split(value);
      check_known(arg, o.families, {"mlp", "revnet"});
    } else if (arg == "--depths") {
      o.depths.clear();
      for (const auto& d : split(value)) {
        o.depths.push_back(parse_integer<std::size_t>(arg, d));
        if (o.depths.back() == 0) throw UsageError("--depths: depths must be positive");
      }
    } else if (arg == "--dtypes") {
      o.dtypes = split(value);
      check_known(arg, o.dtypes, {"float", "double"});
    } else if (arg == "--policies") {
      o.policies = split(value);
      for (const auto& p : o.policies) {
        if (p.rfind("every:", 0) == 0) {
          if (parse_integer<std::size_t>(arg, p.substr(6)) == 0)
            throw UsageError(cat("--policies: every:K needs K > 0, got '", p, "'"));
          continue;
        }
        check_known(arg, {p},
                    {"none", "every:K", "tolerance", "double", "rebuild", "revbackprop", "backprop"});
      }
    } else if (arg == "--seeds") {
      o.seeds.clear();
      for (const auto& s : split(value)) o.seeds.push_back(parse_integer<std::uint64_t>(arg, s));
    } else if (arg == "--width" || arg == "--batch" || arg == "--hidden") {
      const Index v = parse_integer<Index>(arg, value);
      if (v <= 0) throw UsageError(cat(arg, ": must be a positive integer, got '", value, "'"));
      (arg == "--width" ? o.width : arg == "--batch" ? o.batch : o.hidden) = v;
    } else if (arg == "--inits") {
      o.inits = split(value);
      o.inits_given = true;
      check_known(arg, o.inits, {"gaussian", "orthogonal"});
    } else if (arg == "--acts") {
      o.acts = split(value);
    } else if (arg == "--scales") {
      o.scales = split(value);
      for (const auto& s : o.scales) parse_positive(arg, s);
    } else if (arg == "--betweens") {
      o.betweens = split(value);
      check_known(arg, o.betweens, {"none", "tanh"});
    } else if (arg == "--tolerance") {
      o.tolerance = parse_positive(arg, value);
    } else {
      throw UsageError(cat("unknown option '", arg, "'"));
    }
  }
  if (o.hidden == 0) o.hidden = o.width;
  return o;
}

// ---- networks and data -------------------------------------------------------------

struct Config {
  std::string family, init, act = "-", scale = "-", between = "-";
  std::size_t depth = 0;
  Index width = 0, batch = 0, hidden = 0;
  std::string dtype;

  [[nodiscard]] std::string spec() const {
    std::ostringstream s;
    s << "in:" << width;
    for (std::size_t i = 0; i < depth; ++i) {
      if (family == "mlp") {
        s << ",linear:" << width << "," << act;
      } else {
        if (i > 0 && between == "tanh") s << ",tanh";
        s << ",coupling:additive:" << hidden << ":tanh:" << scale;
      }
    }
    return s.str();
  }
  /// The spec with the repeated block written once: `in:64,256x[linear:64,tanh]`.
  [[nodiscard]] std::string short_spec() const {
    if (family == "mlp") return cat("in:", width, ",", depth, "x[linear:", width, ",", act, "]");
    const std::string block = cat("coupling:additive:", hidden, ":tanh:", scale);
    if (between == "tanh") return cat("in:", width, ",", block, ",", depth - 1, "x[tanh,", block, "]");
    return cat("in:", width, ",", depth, "x[", block, "]");
  }
  /// moonwalk-fidelity flags that redo this configuration for one seed.
  [[nodiscard]] std::string flags(std::uint64_t seed) const {
    std::string f = cat("--families ", family, " --depths ", depth, " --dtypes ", dtype, " --inits ", init,
                        " --width ", width, " --batch ", batch, " --seeds ", seed);
    if (family == "mlp") return cat(f, " --acts ", act);
    return cat(f, " --hidden ", hidden, " --scales ", scale, " --betweens ", between);
  }
  [[nodiscard]] moonwalk::SpecOptions spec_options() const {
    return {.init = init == "gaussian" ? moonwalk::Init::gaussian : moonwalk::Init::orthogonal};
  }
  [[nodiscard]] std::string label() const {
    return cat(family, " init=", init, " act=", act, " scale=", scale, " between=", between, " depth=", depth,
               " ", dtype);
  }
};

/// Independent streams from one seed (as moonwalk-gradcheck: splitmix64).
std::uint64_t stream_seed(std::uint64_t seed, std::uint64_t tag) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (tag + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Per-tensor relative error, maximised over tensors (header comment).
double true_error(const Vector<double>& g, const Vector<double>& ref, const std::vector<Index>& offsets) {
  if (g.hasNaN()) return std::numeric_limits<double>::quiet_NaN();
  if (!g.allFinite()) return std::numeric_limits<double>::infinity();
  double worst = 0;
  for (std::size_t t = 0; t + 1 < offsets.size(); ++t) {
    double den = 0, num = 0;
    for (Index k = offsets[t]; k < offsets[t + 1]; ++k) {
      den = std::max(den, std::abs(ref(k)));
      num = std::max(num, std::abs(g(k) - ref(k)));
    }
    worst = std::max(worst, den > 0 ? num / den : num);
  }
  return worst;
}

// ---- one run -------------------------------------------------------------------------

struct Outcome {
  bool failed = false;
  double true_error = std::numeric_limits<double>::quiet_NaN();
  double estimate = std::numeric_limits<double>::quiet_NaN();
  double predicted = std::numeric_limits<double>::quiet_NaN();
  double seconds = std::numeric_limits<double>::quiet_NaN();
  double backprop_seconds = std::numeric_limits<double>::quiet_NaN();
  std::size_t residual_bytes = 0, backprop_bytes = 0, anchors = 0, fallbacks = 0;
  std::string precision = "-";
  bool within_tolerance = true;
  double tolerance = 0;
  std::uint64_t seed = 0;
  Vector<double> gradient;  ///< kept for the error against backprop in the same dtype

  /// Ordering for "worst of the seeds": failure > NaN > larger error.
  [[nodiscard]] int rank() const { return failed ? 2 : std::isnan(true_error) ? 1 : 0; }
  [[nodiscard]] bool worse_than(const Outcome& o) const {
    if (rank() != o.rank()) return rank() > o.rank();
    return rank() == 0 && true_error > o.true_error;
  }
};

template <class S, class Sch>
moonwalk::GradientResult<S> timed(const Sch& schedule, Network<S>& net, const Matrix<S>& x,
                                  const moonwalk::MSE<S>& loss, const Matrix<S>& target, double& seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  auto r = moonwalk::gradient(schedule, net, x, loss, target);
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

/// Runs one policy on a freshly built network (so no schedule inherits
/// another's cached vijp factorisations) and measures it against g_ref.
template <class S>
Outcome run_policy(const std::string& policy, const Config& c, std::uint64_t seed, const Matrix<S>& x,
                   const Matrix<S>& target, const Vector<double>& g_ref, const std::vector<Index>& offsets,
                   double tolerance) {
  Outcome out;
  out.seed = seed;
  Network<S> net = moonwalk::parse_network<S>(c.spec(), seed, c.spec_options());
  const moonwalk::MSE<S> loss;
  moonwalk::GradientResult<S> g;
  if (policy == "backprop") {
    g = timed(moonwalk::Backprop{}, net, x, loss, target, out.seconds);
  } else if (policy == "revbackprop") {
    g = timed(moonwalk::RevBackprop{}, net, x, loss, target, out.seconds);
  } else {
    moonwalk::MixedMoonwalk mixed;
    if (policy == "none") {
      mixed.fidelity = moonwalk::Fidelity::none();
    } else if (policy.rfind("every:", 0) == 0) {
      mixed.fidelity = moonwalk::Fidelity::none();
      mixed.anchors.every = parse_integer<std::size_t>("--policies", policy.substr(6));
    } else if (policy == "double") {
      mixed.fidelity = moonwalk::Fidelity::double_cotangents();
    } else if (policy == "rebuild") {
      mixed.rebuild_inputs = true;
      mixed.fidelity.tolerance = tolerance;
    } else {  // tolerance
      mixed.fidelity.tolerance = tolerance;
    }
    g = timed(mixed, net, x, loss, target, out.seconds);
  }
  out.gradient = g.gradient.template cast<double>();
  out.true_error = true_error(out.gradient, g_ref, offsets);
  out.estimate = g.stats.error_estimate;
  out.predicted = g.stats.predicted_error;
  out.residual_bytes = g.stats.residual_bytes;
  out.anchors = g.stats.anchor_layers.size();
  out.fallbacks = g.stats.fallbacks;
  if (!g.stats.precision.empty()) out.precision = g.stats.precision;
  out.within_tolerance = g.stats.within_tolerance;
  out.tolerance = g.stats.tolerance;
  return out;
}

// ---- output --------------------------------------------------------------------------

constexpr const char* kHeader =
    "family,init,act,scale,between,depth,width,batch,dtype,policy,true_error,error_estimate,predicted_error,"
    "residual_bytes,backprop_bytes,anchors,precision,fallbacks,seconds,backprop_seconds";

std::string num(double v) {
  if (std::isnan(v)) return "nan";
  if (std::isinf(v)) return v > 0 ? "inf" : "-inf";
  char buf[32];
  std::snprintf(buf, sizeof buf, "%.3e", v);
  return buf;
}

std::string row(const Config& c, const std::string& policy, const Outcome& o) {
  std::ostringstream s;
  s << c.family << "," << c.init << "," << c.act << "," << c.scale << "," << c.between << "," << c.depth
    << "," << c.width << "," << c.batch << "," << c.dtype << "," << policy << "," << num(o.true_error) << ","
    << num(o.estimate) << "," << num(o.predicted) << "," << o.residual_bytes << "," << o.backprop_bytes << ","
    << o.anchors << "," << (o.failed ? "error" : o.precision) << "," << o.fallbacks << "," << num(o.seconds)
    << "," << num(o.backprop_seconds) << "\n";
  return s.str();
}

/// Every policy of one configuration over all seeds; prints the worst seed's row per policy.
template <class S>
void run_config(const Config& c, const Options& o, std::size_t& misses) {
  std::vector<std::string> policies;
  for (const auto& p : o.policies)
    if ((p != "revbackprop" && p != "rebuild") || c.family == "revnet") policies.push_back(p);
  std::vector<std::optional<Outcome>> worst(policies.size());
  const std::string spec = c.spec();

  for (const std::uint64_t seed : o.seeds) {
    // The network in S, its double twin with the same values, data rounded to S.
    const Network<S> net = moonwalk::parse_network<S>(spec, seed, c.spec_options());
    Network<double> twin = moonwalk::parse_network<double>(spec, seed, c.spec_options());
    moonwalk::set_parameters(twin, moonwalk::get_parameters(net).template cast<double>());
    const std::vector<Index> offsets = moonwalk::parameter_offsets(net);
    const Matrix<S> x = moonwalk::gaussian<double>(c.width, c.batch, stream_seed(seed, 1)).template cast<S>();
    const Matrix<S> t =
        moonwalk::gaussian<double>(net.out_features(), c.batch, stream_seed(seed, 2)).template cast<S>();
    const moonwalk::MSE<double> loss_d;
    const Vector<double> g_ref = moonwalk::gradient(moonwalk::Backprop{}, twin, x.template cast<double>(),
                                                    loss_d, t.template cast<double>())
                                     .gradient;

    // Backprop in S: the bytes and time every row is compared with.
    const Outcome bp = run_policy<S>("backprop", c, seed, x, t, g_ref, offsets, o.tolerance);

    for (std::size_t k = 0; k < policies.size(); ++k) {
      Outcome r;
      try {
        r = policies[k] == "backprop"
                ? bp
                : run_policy<S>(policies[k], c, seed, x, t, g_ref, offsets, o.tolerance);
      } catch (const moonwalk::Error& e) {
        r = Outcome{};
        r.failed = true;
        r.seed = seed;
        std::cerr << "moonwalk-fidelity: " << policies[k] << " failed on " << c.label() << " seed " << seed
                  << ": " << e.what() << "\n";
      }
      r.backprop_bytes = bp.residual_bytes;
      r.backprop_seconds = bp.seconds;
      if (policies[k] == "tolerance" && !r.failed) {
        const double tol = o.tolerance > 0 ? o.tolerance : moonwalk::default_target<S>();
        if (!(r.true_error <= tol)) {
          ++misses;
          // vs_backprop: against backprop in the same dtype (what the estimate models);
          // backprop_floor: backprop's own true error.
          std::cerr << "tolerance-miss: " << c.label() << " seed=" << seed
                    << " true_error=" << num(r.true_error)
                    << " vs_backprop=" << num(true_error(r.gradient, bp.gradient, offsets))
                    << " backprop_floor=" << num(bp.true_error) << " estimate=" << num(r.estimate)
                    << " predicted=" << num(r.predicted) << " within_tolerance=" << r.within_tolerance
                    << " precision=" << r.precision << " anchors=" << r.anchors
                    << " fallbacks=" << r.fallbacks << " bytes=" << r.residual_bytes << "/"
                    << bp.residual_bytes << " spec=" << c.short_spec() << " redo: moonwalk-fidelity "
                    << c.flags(seed) << " --policies tolerance,backprop\n";
        }
      }
      if (!worst[k] || r.worse_than(*worst[k])) worst[k] = r;
    }
  }
  std::string out;
  for (std::size_t k = 0; k < policies.size(); ++k) out += row(c, policies[k], *worst[k]);
  std::cout << out << std::flush;
}

std::vector<Config> grid(const Options& o) {
  std::vector<Config> g;
  for (const auto& family : o.families)
    for (const std::size_t depth : o.depths)
      for (const auto& dtype : o.dtypes) {
        Config c;
        c.family = family;
        c.depth = depth;
        c.width = o.width;
        c.batch = o.batch;
        c.hidden = o.hidden;
        c.dtype = dtype;
        if (family == "mlp") {
          for (const auto& init : o.inits)
            for (const auto& act : o.acts) {
              c.init = init;
              c.act = act;
              g.push_back(c);
            }
        } else {
          const std::vector<std::string> inits =
              o.inits_given ? o.inits : std::vector<std::string>{"orthogonal"};
          for (const auto& init : inits)
            for (const auto& scale : o.scales)
              for (const auto& between : o.betweens) {
                c.init = init;
                c.scale = scale;
                c.between = between;
                g.push_back(c);
              }
        }
      }
  // Shallow first, so a partial run still covers every family.
  std::stable_sort(g.begin(), g.end(), [](const Config& a, const Config& b) { return a.depth < b.depth; });
  return g;
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::optional<Options> o = parse_args(argc, argv);
    if (!o) {
      std::cout << kUsage;
      return 0;
    }
    const std::vector<Config> configs = grid(*o);
    for (const auto& c : configs)
      moonwalk::parse_network<float>(c.spec(), 0, c.spec_options());  // bad --acts
    std::cout << kHeader << "\n" << std::flush;
    const auto start = std::chrono::steady_clock::now();
    std::size_t misses = 0;
    for (std::size_t i = 0; i < configs.size(); ++i) {
      const Config& c = configs[i];
      const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      std::cerr << "moonwalk-fidelity: [" << i + 1 << "/" << configs.size() << "] " << c.label() << " ("
                << static_cast<long>(elapsed) << " s)\n";
      if (c.dtype == "float")
        run_config<float>(c, *o, misses);
      else
        run_config<double>(c, *o, misses);
    }
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    std::cerr << "moonwalk-fidelity: " << configs.size() << " configurations in "
              << static_cast<long>(elapsed) << " s; " << misses
              << " seed(s) where policy tolerance missed its tolerance\n";
    return 0;
  } catch (const UsageError& e) {
    std::cerr << "moonwalk-fidelity: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const moonwalk::SpecError& e) {
    std::cerr << "moonwalk-fidelity: " << e.what() << "\n";
    return 2;
  } catch (const std::exception& e) {
    std::cerr << "moonwalk-fidelity: internal error: " << e.what() << "\n";
    return 3;
  }
}
