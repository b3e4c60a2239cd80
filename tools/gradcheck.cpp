// moonwalk-gradcheck — checks every applicable gradient schedule on a network
// given as a spec string against reference backprop and against central
// finite differences in double. Documentation: docs/gradcheck.md.
//
//   moonwalk-gradcheck --net SPEC [--loss mse|xent] [--batch B] [--seed S]
//                      [--dtype float|double] [--schedules LIST|all] [--anchors K]
//                      [--init orthogonal|gaussian] [--policy none|every:K|tolerance|double]
//                      [--tolerance T] [--fd on|off] [--inject-error LAYER:REL]
//
// Prints ONE JSON object on stdout. Exit status: 0 every schedule within its
// tolerance, 1 at least one is not, 2 bad spec or option (message on stderr
// naming it), 3 run-time error (e.g. out of memory, or the output could not be
// written), 4 none fails but at least one is inconclusive: the finite
// differences are too inaccurate to judge some layer's gradient (below).
//
// ---- Data ------------------------------------------------------------------
// The network is built in the requested dtype from (SPEC, seed) by
// parse_network; a double twin gets exactly the same parameter values. The
// input x ~ N(0, 1) (n_0 × B), the mse target ~ N(0, 1) (n_L × B) and the
// xent labels (uniform in [0, C), C = n_L) come from the seed as well. Data is
// drawn in double and rounded once to the dtype; the twin sees the rounded
// values, so the two networks compute the same function and differ only in
// their arithmetic.
//
// ---- Relative error ----------------------------------------------------------
// Per parameter tensor (one layer's parameter block, from parameter_offsets):
//   max|g − g_ref| / max|g_ref|,
// maximised over tensors; layers without parameters are skipped. A tensor whose
// reference is exactly zero everywhere (e.g. behind a dead ReLU) contributes its
// absolute error max|g| instead, so a spurious non-zero gradient still shows.
// NaN or infinity anywhere makes the error non-finite (printed as null, fails).
// Against finite differences, entries where the loss is not differentiable
// (see below) are left out of both maxima.
//
// ---- Finite differences --------------------------------------------------------
// Central differences on the double twin, one parameter at a time, the loss
// computed by the layers' forward (net.forward from the perturbed layer on; the
// unperturbed prefix is cached) and loss.value. The step is
//   h = ε^{1/3} · max(1, |θ|) ≈ 6.1e-6 · max(1, |θ|),   ε = 2⁻⁵² (double):
// the central difference has truncation error ≈ h²|ℓ'''|/6 and rounding error
// ≈ ε_ℓ/h (ε_ℓ ≈ ε·|ℓ|, the error of evaluating the loss); their sum is
// smallest at h ~ ε^{1/3} (scaled by |θ| so θ ± h stays a relative
// perturbation), leaving an error ~ ε^{2/3} ≈ 4e-11 of the loss scale.
// Kinks (ReLU, LeakyReLU, ELU with α ≠ 1) break the Taylor argument: a
// central difference straddling one is off by up to half the derivative jump.
// So every perturbed forward pass compares the sign pattern of every layer
// input with the unperturbed one (conservative: it knows no layer types, so a
// flip at a smooth layer's input counts too); if any sign flipped, the step
// is divided by 10 and the difference redone (at most 3 times, down to
// ~6e-9·max(1,|θ|)).
// An entry still straddling a kink after that sits on one: some layer input
// is exactly at a kink (e.g. a sample whose ReLU units are all 0 feeds a
// zero-bias Linear, so the next activation's input is exactly 0). The loss is
// not differentiable in that parameter there; left and right derivatives
// differ, the central difference is their average and matches no gradient
// convention, so the entry is no reference: it is excluded from the error
// against finite differences and counted on stderr.
//
// Every entry also gets an error estimate of its own: the central difference
// is taken at step h and at 2h (both must be kink-free, else the step shrinks
// as above); d_2h − d_h ≈ 3·(truncation error of d_h), and where rounding
// dominates it is the size of the noise itself, so
//   err = |d_2h − d_h| + ε·(|ℓ(θ+h)| + |ℓ(θ−h)|)/(2h)
// (the second term: the rounding of the two loss values, a floor when the two
// differences agree by chance). Per tensor, the reference's relative error is
// E = max err / max|d_h| (the normalisation of the relative error above). It
// matters where the gradient is far below what the step can resolve: e.g. the
// early layers of a deep network, whose gradients are ~1e-8 of the loss scale
// while the differences carry ~1e-10 of rounding noise each.
//
// ---- Tolerances ----------------------------------------------------------------
// backprop (and only backprop) is judged against finite differences:
//   pass ⇔ max_rel_err_vs_fd ≤ τ_FD + c_FD · u · L
// tensor by tensor; a tensor that misses it but whose error is within what the
// reference's own error could explain, rel ≤ τ_FD + c_FD·u·L + 4·E, is
// inconclusive instead of failing (the factor 4: E is an estimate, not a
// bound). Any failing tensor fails the schedule; otherwise any inconclusive
// tensor makes it "inconclusive" ("pass": false, "verdict": "inconclusive",
// the tensors' layer indices in "inconclusive_layers", exit status 4).
//   τ_FD = 1e-6: the FD reference's own error. It is ~ε^{2/3} ≈ 4e-11 of the
//          loss scale per entry; dividing by a tensor's largest gradient, which
//          for batch-averaged losses can be 10⁻³–10⁻⁴ of that scale, and allowing
//          the ≤10³ larger rounding term of a step shrunk at a kink, gives
//          ≲ 1e-6 in the worst case (measured: ~1e-9 to 1e-8, docs/gradcheck.md).
//   c_FD · u · L: the rounding error of the gradient itself in the dtype
//          (u = 2⁻²⁴ float, 2⁻⁵³ double; L layers). Each layer's forward,
//          input-vjp and weight-vjp are dot products of length n_in, n_out and
//          B; the worst-case bound of a length-n dot product is n·u (Higham's
//          γ_n), and errors of successive layers add to first order, so
//          c_FD = 1024 covers inner dimensions summing to ~10³ per layer in the
//          worst case (typical errors are √n·u, i.e. widths far beyond that).
//          Float, L = 5: 1e-6 + 1024 · 5.96e-8 · 5 ≈ 3.1e-4; double: ≈ 1e-6.
// Moonwalk schedules (mixed, pure) are judged against backprop in the same
// dtype by the engine's error model (moonwalk/fidelity/tolerance.hpp):
//   pass ⇔ max_rel_err_vs_backprop ≤ max(8 · u · L, 10 · error_estimate)
//        ∧ error_estimate ≤ T   (--tolerance; default 1e-4 float, 1e-10 double)
// and "tolerance" reports max(8·u·L, 10·error_estimate). --policy picks how
// they hold T (fidelity/policy.hpp): `tolerance` (default: anchors from the
// error model, double escalation, verification with fallback), `none` (the
// unguarded sweep), `every:K` (anchors every K layers, nothing else),
// `double` (cotangents in double, no anchors). Their JSON rows add
// "anchors", "precision", "fallbacks", "predicted_error" and
// "within_tolerance". With --fd off (for deep networks, where one finite
// difference per parameter is too slow) nothing is judged against finite
// differences: max_rel_err_vs_fd is null, and the exact schedules are judged
// against backprop by the same rounding allowance instead. Their error against
// finite differences is reported but not judged: it is at most their error
// against backprop plus backprop's (judged) error against finite differences.
#include <algorithm>
#include <cerrno>
#include <charconv>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <exception>
#include <iomanip>
#include <iostream>
#include <limits>
#include <moonwalk/fidelity/tolerance.hpp>
#include <moonwalk/moonwalk.hpp>
#include <moonwalk/nets/spec.hpp>
#include <optional>
#include <random>
#include <sstream>
#include <string>
#include <system_error>
#include <vector>

namespace {

using moonwalk::Index;
using moonwalk::Matrix;
using moonwalk::Network;
using moonwalk::Vector;

constexpr const char* kUsage =
    "usage: moonwalk-gradcheck --net SPEC [--loss mse|xent] [--batch B] [--seed S]\n"
    "                          [--dtype float|double] [--schedules LIST|all] [--anchors K]\n"
    "                          [--init orthogonal|gaussian] [--policy none|every:K|tolerance|double]\n"
    "                          [--tolerance T] [--fd on|off]\n"
    "       moonwalk-gradcheck --grammar markdown|list\n"
    "  --net SPEC        network, e.g. in:64,linear:48,leaky_relu:0.1,linear:10 (required)\n"
    "  --loss NAME       mse (target ~ N(0,1)) or xent (labels in [0, last width)); default mse\n"
    "  --batch B         batch size, B > 0; default 8\n"
    "  --seed S          seed of parameters and data, unsigned integer; default 0\n"
    "  --dtype NAME      float or double; default double\n"
    "  --schedules LIST  comma-separated subset of backprop, mixed, pure, checkpoint, binomial,\n"
    "                    revbackprop, planned, forward, projforward, or all; default all (planned\n"
    "                    runs at three budgets: unlimited, halfway, the smallest; the worst is reported)\n"
    "  --anchors K       mixed anchors every K layers (0 = none), on top of the policy; default 0\n"
    "  --init NAME       Linear initialisation: orthogonal or gaussian; default orthogonal\n"
    "  --policy P        Moonwalk fidelity policy: none, every:K, tolerance or double; default tolerance\n"
    "  --tolerance T     target relative error, T > 0; default 1e-4 (float), 1e-10 (double)\n"
    "  --fd on|off       finite-difference reference (off for deep networks); default on\n"
    "  --inject-error LAYER:REL\n"
    "                    test the checker: add REL x max|g| of layer LAYER (0-based, negative counts\n"
    "                    from the end) to that layer's largest backprop gradient entry as reported\n"
    "  --grammar FORMAT  print the spec grammar's layer tokens and exit: markdown (docs/gradcheck.md's\n"
    "                    table) or list (the README's list); --help lists them too\n"
    "Prints one JSON object. Exit: 0 every schedule passes; 1 some schedule fails; 2 bad spec or\n"
    "option; 3 run-time error (out of memory, the output could not be written); 4 none fails but\n"
    "some are inconclusive (finite differences too inaccurate to judge a layer's gradient).\n";

/// A bad command line or spec: exit status 2.
class UsageError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

const std::vector<std::string> kAllSchedules = {"backprop",    "mixed",   "pure",    "checkpoint", "binomial",
                                                "revbackprop", "planned", "forward", "projforward"};

struct Options {
  std::string net;
  std::string loss = "mse";
  Index batch = 8;
  std::uint64_t seed = 0;
  std::string dtype = "double";
  std::vector<std::string> schedules = kAllSchedules;
  std::size_t anchors = 0;
  moonwalk::Init init = moonwalk::Init::orthogonal;
  std::string policy = "tolerance";
  std::size_t policy_every = 0;
  double tolerance = 0;  // 0: the default target of the dtype
  bool fd = true;
  /// --grammar markdown|list: print the grammar table (docs/gradcheck.md's
  /// token table, the README's token list) instead of checking a network.
  std::string grammar;
  /// --inject-error LAYER:REL (checks the checker): backprop's reported gradient
  /// gets REL × the largest |entry| of that layer's tensor added to its largest entry.
  std::optional<long long> inject_layer;
  double inject_rel = 0;
};

/// The Moonwalk fidelity settings of --policy and --tolerance.
moonwalk::Fidelity fidelity_of(const Options& o) {
  moonwalk::Fidelity f;
  if (o.policy == "none" || o.policy == "every")
    f = moonwalk::Fidelity::none();
  else if (o.policy == "double")
    f = moonwalk::Fidelity::double_cotangents();
  f.tolerance = o.tolerance;
  return f;
}

template <class T>
T parse_integer(const std::string& option, const std::string& value) {
  T v{};
  const char* last = value.data() + value.size();
  const auto [p, ec] = std::from_chars(value.data(), last, v);
  if (value.empty() || ec != std::errc() || p != last)
    throw UsageError(option + ": bad number '" + value + "' (expected an integer)");
  return v;
}

std::vector<std::string> parse_schedules(const std::string& value) {
  if (value == "all") return kAllSchedules;
  std::vector<std::string> out;
  std::size_t start = 0;
  while (true) {
    const std::size_t comma = value.find(',', start);
    const std::string name = value.substr(start, comma == std::string::npos ? comma : comma - start);
    if (std::find(kAllSchedules.begin(), kAllSchedules.end(), name) == kAllSchedules.end())
      throw UsageError("--schedules: unknown schedule '" + name +
                       "' (known: backprop, mixed, pure, checkpoint, binomial, revbackprop, planned, "
                       "forward, projforward, "
                       "all)");
    if (std::find(out.begin(), out.end(), name) == out.end()) out.push_back(name);
    if (comma == std::string::npos) break;
    start = comma + 1;
  }
  return out;
}

/// Parses argv; returns nullopt for --help.
std::optional<Options> parse_args(int argc, char** argv) {
  Options o;
  bool have_net = false;
  for (int i = 1; i < argc; ++i) {
    std::string arg = argv[i];
    if (arg == "-h" || arg == "--help") return std::nullopt;
    if (arg.rfind("--", 0) != 0) throw UsageError("unexpected argument '" + arg + "'");
    std::string value;
    bool have_value = false;
    if (const auto eq = arg.find('='); eq != std::string::npos) {
      value = arg.substr(eq + 1);
      arg = arg.substr(0, eq);
      have_value = true;
    }
    const bool known = arg == "--net" || arg == "--loss" || arg == "--batch" || arg == "--seed" ||
                       arg == "--dtype" || arg == "--schedules" || arg == "--anchors" || arg == "--init" ||
                       arg == "--policy" || arg == "--tolerance" || arg == "--fd" ||
                       arg == "--inject-error" || arg == "--grammar";
    if (!known) throw UsageError("unknown option '" + arg + "'");
    if (!have_value) {
      if (i + 1 >= argc) throw UsageError(arg + ": missing value");
      value = argv[++i];
    }
    if (arg == "--net") {
      o.net = value;
      have_net = true;
    } else if (arg == "--grammar") {
      if (value != "markdown" && value != "list")
        throw UsageError("--grammar: unknown format '" + value + "' (known: markdown, list)");
      o.grammar = value;
    } else if (arg == "--loss") {
      if (value != "mse" && value != "xent")
        throw UsageError("--loss: unknown loss '" + value + "' (known: mse, xent)");
      o.loss = value;
    } else if (arg == "--batch") {
      o.batch = parse_integer<Index>(arg, value);
      if (o.batch <= 0) throw UsageError("--batch: must be a positive integer, got '" + value + "'");
    } else if (arg == "--seed") {
      o.seed = parse_integer<std::uint64_t>(arg, value);
    } else if (arg == "--dtype") {
      if (value != "float" && value != "double")
        throw UsageError("--dtype: unknown dtype '" + value + "' (known: float, double)");
      o.dtype = value;
    } else if (arg == "--schedules") {
      o.schedules = parse_schedules(value);
    } else if (arg == "--init") {
      if (value == "orthogonal")
        o.init = moonwalk::Init::orthogonal;
      else if (value == "gaussian")
        o.init = moonwalk::Init::gaussian;
      else
        throw UsageError("--init: unknown initialisation '" + value + "' (known: orthogonal, gaussian)");
    } else if (arg == "--policy") {
      if (value.rfind("every:", 0) == 0) {
        o.policy = "every";
        o.policy_every = parse_integer<std::size_t>(arg, value.substr(6));
        if (o.policy_every == 0) throw UsageError("--policy: every:K needs K > 0, got '" + value + "'");
      } else if (value == "none" || value == "tolerance" || value == "double") {
        o.policy = value;
      } else {
        throw UsageError("--policy: unknown policy '" + value +
                         "' (known: none, every:K, tolerance, double)");
      }
    } else if (arg == "--tolerance") {
      char* end = nullptr;
      o.tolerance = std::strtod(value.c_str(), &end);
      if (value.empty() || end != value.c_str() + value.size() || !(o.tolerance > 0) ||
          !std::isfinite(o.tolerance))
        throw UsageError("--tolerance: expected a positive number, got '" + value + "'");
    } else if (arg == "--fd") {
      if (value != "on" && value != "off") throw UsageError("--fd: expected on or off, got '" + value + "'");
      o.fd = value == "on";
    } else if (arg == "--inject-error") {
      const auto colon = value.find(':');
      if (colon == std::string::npos)
        throw UsageError("--inject-error: expected LAYER:REL (e.g. 2:1e-3), got '" + value + "'");
      o.inject_layer = parse_integer<long long>(arg, value.substr(0, colon));
      const std::string rel = value.substr(colon + 1);
      char* end = nullptr;
      o.inject_rel = std::strtod(rel.c_str(), &end);
      if (rel.empty() || end != rel.c_str() + rel.size() || !std::isfinite(o.inject_rel) || o.inject_rel == 0)
        throw UsageError("--inject-error: REL must be a finite non-zero number, got '" + rel + "'");
    } else {
      o.anchors = parse_integer<std::size_t>(arg, value);
    }
  }
  if (!have_net && o.grammar.empty()) throw UsageError("missing --net SPEC");
  return o;
}

// ---- data ---------------------------------------------------------------------

/// Independent streams from one seed (splitmix64 of seed and a stream tag).
std::uint64_t stream_seed(std::uint64_t seed, std::uint64_t tag) {
  std::uint64_t z = seed + 0x9E3779B97F4A7C15ull * (tag + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

/// Rounds a double matrix once to S and back: the value both networks see.
template <class S>
Matrix<double> rounded(const Matrix<double>& m) {
  return m.template cast<S>().template cast<double>();
}

template <class S>
Matrix<S> to_scalar(const Matrix<double>& m) {
  return m.template cast<S>();
}
template <class S>
const std::vector<Index>& to_scalar(const std::vector<Index>& labels) {
  return labels;
}

// ---- errors --------------------------------------------------------------------

/// Per-tensor relative error, maximised over tensors (see the header comment);
/// only entries k with use[k] count (all when `use` is empty).
double max_rel_err(const Vector<double>& g, const Vector<double>& ref, const std::vector<Index>& offsets,
                   const std::vector<bool>& use = {}) {
  if (!g.allFinite() || !ref.allFinite()) return std::numeric_limits<double>::quiet_NaN();
  double worst = 0;
  for (std::size_t t = 0; t + 1 < offsets.size(); ++t) {
    double den = 0, num = 0;
    for (Index k = offsets[t]; k < offsets[t + 1]; ++k) {
      if (!use.empty() && !use[static_cast<std::size_t>(k)]) continue;
      den = std::max(den, std::abs(ref(k)));
      num = std::max(num, std::abs(g(k) - ref(k)));
    }
    worst = std::max(worst, den > 0 ? num / den : num);
  }
  return worst;
}

// ---- finite differences --------------------------------------------------------

bool same_signs(const Matrix<double>& a, const Matrix<double>& b) {
  return ((a.array() > 0) == (b.array() > 0)).all();
}

struct FdResult {
  Vector<double> gradient;
  /// Per entry: the estimated error of `gradient` (truncation from the step
  /// and twice the step, plus rounding of the two loss values; see the header).
  Vector<double> error;
  /// False where even the smallest step straddled a kink: no reference there.
  std::vector<bool> defined;
  std::size_t undefined = 0;
};

/// Central differences of loss(net.forward(x)) over every parameter of the
/// double twin (step and kink handling: see the header comment).
template <class Loss>
FdResult finite_differences(Network<double>& net, const Matrix<double>& x, const Loss& loss,
                            const typename Loss::target_type& target) {
  constexpr int kMaxShrinks = 3;
  constexpr double eps = std::numeric_limits<double>::epsilon();
  const double base_step = std::cbrt(eps);
  const std::size_t L = net.size();
  std::vector<Matrix<double>> inputs(L + 1);  // inputs[i]: input of layer i at θ
  inputs[0] = x;
  for (std::size_t i = 0; i < L; ++i) inputs[i + 1] = net[i].forward(inputs[i]);

  // ℓ with layer i perturbed; `smooth` is false when a layer input changed sign.
  auto loss_from = [&](std::size_t i, bool& smooth) {
    Matrix<double> h = net[i].forward(inputs[i]);
    smooth = true;
    for (std::size_t j = i + 1; j < L; ++j) {
      smooth = smooth && same_signs(h, inputs[j]);
      h = net[j].forward(h);
    }
    return static_cast<double>(loss.value(h, target));
  };

  FdResult out;
  out.gradient.resize(moonwalk::num_parameters(net));
  out.error.resize(out.gradient.size());
  out.defined.assign(static_cast<std::size_t>(out.gradient.size()), true);
  const auto start = std::chrono::steady_clock::now();
  bool progress = false;
  Index offset = 0;
  for (std::size_t i = 0; i < L; ++i) {
    for (std::span<double> theta : net[i].parameter_blocks()) {
      for (std::size_t k = 0; k < theta.size(); ++k) {
        const double t0 = theta[k];
        double step = base_step * std::max(1.0, std::abs(t0));
        double d = 0, err = 0;
        // The central difference at step s, and its rounding error from the two loss values.
        auto central = [&](double s, bool& smooth, double& rounding) {
          const double tp = t0 + s, tm = t0 - s;
          bool smooth_p = true, smooth_m = true;
          theta[k] = tp;
          const double fp = loss_from(i, smooth_p);
          theta[k] = tm;
          const double fm = loss_from(i, smooth_m);
          theta[k] = t0;
          smooth = smooth && smooth_p && smooth_m;
          rounding = eps * (std::abs(fp) + std::abs(fm)) / (tp - tm);
          return (fp - fm) / (tp - tm);
        };
        for (int attempt = 0;; ++attempt, step /= 10) {
          bool smooth = true;
          double rounding = 0, rounding2 = 0;
          d = central(step, smooth, rounding);
          const double d2 = central(2 * step, smooth, rounding2);
          // d2 − d ≈ 3× the truncation error of d, plus the rounding noise of both.
          err = std::abs(d2 - d) + rounding;
          if (smooth) break;
          if (attempt == kMaxShrinks) {
            out.defined[static_cast<std::size_t>(offset) + k] = false;
            ++out.undefined;
            break;
          }
        }
        out.gradient(offset + static_cast<Index>(k)) = d;
        out.error(offset + static_cast<Index>(k)) = err;
      }
      offset += static_cast<Index>(theta.size());
    }
    const double elapsed = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
    if (elapsed > 2.0 || progress) {
      progress = true;
      std::cerr << "moonwalk-gradcheck: finite differences: layer " << i + 1 << "/" << L << " done ("
                << std::fixed << std::setprecision(1) << elapsed << " s)\n"
                << std::defaultfloat;
    }
  }
  return out;
}

// ---- tolerances (see the header comment) -----------------------------------------

/// τ_FD: the finite-difference reference's own error budget.
constexpr double kFdReferenceError = 1e-6;
/// c_FD: worst-case dot-product rounding allowance per layer, in units of u.
constexpr double kFdRoundingConstant = 1024;

template <class S>
double fd_tolerance(std::size_t layers) {
  return kFdReferenceError + kFdRoundingConstant * moonwalk::unit_roundoff<S>() * static_cast<double>(layers);
}

/// How much of the finite-difference reference's own error estimate may explain
/// a disagreement: the estimate is an order-of-magnitude figure, not a bound.
constexpr double kFdErrorFactor = 4;

enum class Verdict { pass, fail, inconclusive };

const char* verdict_name(Verdict v) {
  return v == Verdict::pass ? "pass" : v == Verdict::fail ? "fail" : "inconclusive";
}

/// The finite-difference reference's own relative error per tensor: its
/// largest per-entry error estimate over the tensor's largest |entry| (the
/// normalisation of max_rel_err), over the defined entries. 0 for a layer
/// without parameters.
std::vector<double> fd_relative_errors(const FdResult& fd, const std::vector<Index>& offsets) {
  std::vector<double> out(offsets.size() - 1, 0.0);
  for (std::size_t t = 0; t + 1 < offsets.size(); ++t) {
    double den = 0, err = 0;
    for (Index k = offsets[t]; k < offsets[t + 1]; ++k) {
      if (!fd.defined[static_cast<std::size_t>(k)]) continue;
      den = std::max(den, std::abs(fd.gradient(k)));
      err = std::max(err, fd.error(k));
    }
    out[t] = den > 0 ? err / den : err;
  }
  return out;
}

struct FdJudgement {
  Verdict verdict = Verdict::pass;
  std::vector<std::size_t> inconclusive_layers;
};

/// Judges g against finite differences tensor by tensor (see the header):
/// a tensor passes when its relative error is within `tolerance`; it is
/// inconclusive when it is not, but the reference's own error could explain
/// it (error ≤ tolerance + kFdErrorFactor · fd_error); it fails otherwise. Any
/// failing tensor fails g; else any inconclusive one makes g inconclusive.
FdJudgement judge_vs_fd(const Vector<double>& g, const FdResult& fd, const std::vector<Index>& offsets,
                        const std::vector<double>& fd_error, double tolerance) {
  FdJudgement out;
  if (!g.allFinite() || !fd.gradient.allFinite()) {
    out.verdict = Verdict::fail;
    return out;
  }
  bool failed = false;
  for (std::size_t t = 0; t + 1 < offsets.size(); ++t) {
    double den = 0, num = 0;
    bool any = false;
    for (Index k = offsets[t]; k < offsets[t + 1]; ++k) {
      if (!fd.defined[static_cast<std::size_t>(k)]) continue;
      any = true;
      den = std::max(den, std::abs(fd.gradient(k)));
      num = std::max(num, std::abs(g(k) - fd.gradient(k)));
    }
    if (!any) continue;
    const double rel = den > 0 ? num / den : num;
    if (rel <= tolerance) continue;
    if (rel <= tolerance + kFdErrorFactor * fd_error[t])
      out.inconclusive_layers.push_back(t);
    else
      failed = true;
  }
  out.verdict = failed                            ? Verdict::fail
                : out.inconclusive_layers.empty() ? Verdict::pass
                                                  : Verdict::inconclusive;
  return out;
}

// ---- output ----------------------------------------------------------------------

struct Result {
  moonwalk::Stats stats;
  std::string schedule;
  double vs_backprop = 0, vs_fd = 0, estimate = 0, seconds = 0, tolerance = 0, cosine = 0;
  std::size_t residual_bytes = 0;
  bool pass = false;
  Verdict verdict = Verdict::fail;
  std::vector<std::size_t> inconclusive_layers;
};

using moonwalk::detail::json_number;

std::string json_string(const std::string& v) {
  std::ostringstream s;
  s << '"';
  for (const char c : v) {
    const auto u = static_cast<unsigned char>(c);
    if (c == '"' || c == '\\')
      s << '\\' << c;
    else if (u < 0x20)
      s << "\\u" << std::hex << std::setw(4) << std::setfill('0') << static_cast<int>(u) << std::dec
        << std::setfill(' ');
    else
      s << c;
  }
  s << '"';
  return s.str();
}

/// The output could not be written (e.g. a full disk): exit status 3.
class OutputError : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

/// Writes `text` to stdout and flushes; OutputError when that failed.
void write_stdout(const std::string& text) {
  errno = 0;
  std::cout << text << std::flush;
  if (!std::cout) {
    const int e = errno;
    throw OutputError(std::string("writing the result to standard output failed") +
                      (e ? std::string(" (") + std::strerror(e) + ")" : std::string()));
  }
}

// ---- the check -------------------------------------------------------------------

template <class S, class Sch, class Loss>
moonwalk::GradientResult<S> timed_gradient(const Sch& schedule, Network<S>& net, const Matrix<S>& x,
                                           const Loss& loss, const typename Loss::target_type& target,
                                           double& seconds) {
  const auto t0 = std::chrono::steady_clock::now();
  auto r = moonwalk::gradient(schedule, net, x, loss, target);
  seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  return r;
}

template <class S, template <class> class LossT, class TargetD>
int check(const Options& o, const Matrix<double>& x_d, const TargetD& target_d) {
  const moonwalk::SpecOptions spec_options{.init = o.init};
  Network<S> net = moonwalk::parse_network<S>(o.net, o.seed, spec_options);
  Network<double> twin = moonwalk::parse_network<double>(o.net, o.seed, spec_options);
  moonwalk::set_parameters(twin, moonwalk::get_parameters(net).template cast<double>());
  const std::vector<Index> offsets = moonwalk::parameter_offsets(net);
  const std::size_t L = net.size();

  const LossT<S> loss;
  const LossT<double> loss_d;
  const Matrix<S> x = to_scalar<S>(x_d);
  const auto& target = to_scalar<S>(target_d);

  FdResult fd;
  if (o.fd) {
    fd = finite_differences(twin, x_d, loss_d, target_d);
  } else {
    fd.gradient =
        Vector<double>::Constant(moonwalk::num_parameters(twin), std::numeric_limits<double>::quiet_NaN());
  }
  const std::vector<double> fd_error =
      o.fd ? fd_relative_errors(fd, offsets) : std::vector<double>(offsets.size() - 1, 0.0);
  const double fd_error_max =
      o.fd ? *std::max_element(fd_error.begin(), fd_error.end()) : std::numeric_limits<double>::quiet_NaN();

  // --inject-error: the layer whose reported backprop gradient is perturbed.
  std::size_t inject_layer = 0;
  if (o.inject_layer) {
    const auto n = static_cast<long long>(L);
    const long long i = *o.inject_layer < 0 ? n + *o.inject_layer : *o.inject_layer;
    if (i < 0 || i >= n || offsets[static_cast<std::size_t>(i)] == offsets[static_cast<std::size_t>(i) + 1])
      throw UsageError("--inject-error: layer " + std::to_string(*o.inject_layer) +
                       " is not a layer with parameters of this " + std::to_string(L) + "-layer network");
    inject_layer = static_cast<std::size_t>(i);
  }

  if (fd.undefined > 0)
    std::cerr << "moonwalk-gradcheck: note: " << fd.undefined
              << " parameter(s) sit on a kink (the loss is not differentiable there at any step down to "
                 "1e-3 of the default): excluded from max_rel_err_vs_fd\n";

  double bp_seconds = 0;
  const auto bp = timed_gradient(moonwalk::Backprop{}, net, x, loss, target, bp_seconds);
  const Vector<double> g_bp = bp.gradient.template cast<double>();

  std::vector<Result> results;
  for (const std::string& name : o.schedules) {
    Result r;
    r.schedule = name;
    try {
      moonwalk::GradientResult<S> g;
      if (name == "backprop") {
        g = bp;
        r.seconds = bp_seconds;
      } else if (name == "mixed") {
        moonwalk::MixedMoonwalk mixed;
        mixed.anchors.every = o.policy == "every" ? o.policy_every : o.anchors;
        if (o.policy == "every" && o.anchors > 0) mixed.anchors.every = std::min(o.anchors, o.policy_every);
        mixed.fidelity = fidelity_of(o);
        g = timed_gradient(mixed, net, x, loss, target, r.seconds);
      } else if (name == "pure") {
        moonwalk::PureMoonwalk pure;
        pure.fidelity = fidelity_of(o);
        g = timed_gradient(pure, net, x, loss, target, r.seconds);
      } else if (name == "checkpoint") {
        g = timed_gradient(moonwalk::Checkpointing{}, net, x, loss, target, r.seconds);
      } else if (name == "binomial") {
        moonwalk::Checkpointing binomial;
        binomial.slots =
            std::max<std::size_t>(1, static_cast<std::size_t>(std::lround(std::sqrt(double(L)))));
        g = timed_gradient(binomial, net, x, loss, target, r.seconds);
      } else if (name == "revbackprop") {
        g = timed_gradient(moonwalk::RevBackprop{}, net, x, loss, target, r.seconds);
      } else if (name == "planned") {
        // Unlimited, halfway, and the smallest budget (the most recomputation);
        // the gradient furthest from backprop's is the one judged.
        moonwalk::Planned planned{.calibration = moonwalk::Calibration::estimate};
        const std::size_t least = planned.smallest_budget(net, x);
        std::size_t full = 0;  // backprop's plan's working set, from the unlimited run
        double worst = -1;
        for (int k = 0; k < 3; ++k) {
          planned.budget = k == 0 ? 0 : k == 1 ? least + (full > least ? (full - least) / 2 : 0) : least;
          double seconds = 0;
          auto candidate = timed_gradient(planned, net, x, loss, target, seconds);
          if (k == 0) full = static_cast<std::size_t>(candidate.stats.figures.at("predicted_working_bytes"));
          const double err = max_rel_err(candidate.gradient.template cast<double>(), g_bp, offsets);
          if (!(err <= worst)) {
            worst = err;
            g = std::move(candidate);
            r.seconds = seconds;
          }
        }
      } else if (name == "forward") {
        g = timed_gradient(moonwalk::NaiveForward{}, net, x, loss, target, r.seconds);
      } else {
        moonwalk::ProjForward proj;
        proj.seed = o.seed;
        g = timed_gradient(proj, net, x, loss, target, r.seconds);
      }
      Vector<double> gd = g.gradient.template cast<double>();
      if (o.inject_layer && name == "backprop") {
        // Into the largest entry with a finite-difference reference (an entry
        // on a kink is left out of the comparison).
        Index at = -1;
        double top = 0;
        for (Index k = offsets[inject_layer]; k < offsets[inject_layer + 1]; ++k)
          if ((!o.fd || fd.defined[static_cast<std::size_t>(k)]) && (at < 0 || std::abs(gd(k)) > top))
            at = k, top = std::abs(gd(k));
        if (at < 0)
          throw UsageError("--inject-error: every entry of layer " + std::to_string(inject_layer) +
                           " sits on a kink: no reference to compare an error with");
        gd(at) += o.inject_rel * (top > 0 ? top : 1.0);
      }
      r.vs_backprop = name == "backprop" ? 0.0 : max_rel_err(gd, g_bp, offsets);
      r.vs_fd =
          o.fd ? max_rel_err(gd, fd.gradient, offsets, fd.defined) : std::numeric_limits<double>::quiet_NaN();
      r.estimate = g.stats.error_estimate;
      r.stats = g.stats;
      r.residual_bytes = g.stats.residual_bytes;
      const double norms = gd.norm() * g_bp.norm();
      r.cosine = norms > 0 ? gd.dot(g_bp) / norms : (gd.norm() == g_bp.norm() ? 1.0 : 0.0);
      if (name == "backprop" || name == "checkpoint" || name == "binomial" || name == "planned" ||
          name == "forward") {
        // Exact schedules: judged against finite differences like backprop.
        r.tolerance = fd_tolerance<S>(L);
        if (o.fd) {
          FdJudgement j = judge_vs_fd(gd, fd, offsets, fd_error, r.tolerance);
          r.verdict = j.verdict;
          r.inconclusive_layers = std::move(j.inconclusive_layers);
          r.pass = r.verdict == Verdict::pass;
        } else {  // no reference but backprop: its rounding allowance
          r.pass = std::isfinite(r.vs_backprop) && r.vs_backprop <= r.tolerance;
        }
      } else if (g.stats.is_estimate) {
        // ProjForward: an unbiased estimate, judged by cosine similarity. For
        // k Gaussian directions in D dimensions cos² ~ Beta(k/2, (D−1)/2),
        // mean k/(k+D−1); half its square root fails with probability
        // P(χ²_k < k/4) (≈ 1e-3 for k = 16).
        const double k = g.stats.figures.count("directions") ? g.stats.figures.at("directions") : 1.0;
        const double D = static_cast<double>(moonwalk::num_parameters(net) + x.size());
        r.tolerance = 0.5 * std::sqrt(k / (k + D - 1));
        r.pass = std::isfinite(r.cosine) && r.cosine >= r.tolerance;
      } else {
        // Moonwalk and RevBackprop: the error model on their own estimate.
        r.tolerance = moonwalk::error_model_bound<S>(r.estimate, L);
        r.pass = moonwalk::within_error_model<S>(r.vs_backprop, r.estimate, L, o.tolerance);
      }
    } catch (const moonwalk::ScheduleError& e) {
      if (name != "pure" && name != "revbackprop") throw;
      // Not applicable: pure needs every layer submersive or fragmental,
      // revbackprop every layer invertible.
      std::cerr << "moonwalk-gradcheck: skipping " << name << " (not applicable): " << e.what() << "\n";
      continue;
    } catch (const moonwalk::Error& e) {
      // The schedule could not produce a gradient on this network (e.g. a
      // vijp met a numerically singular Jacobian): it fails.
      std::cerr << "moonwalk-gradcheck: " << name << " failed: " << e.what() << "\n";
      r.vs_backprop = r.vs_fd = r.estimate = r.tolerance = std::numeric_limits<double>::quiet_NaN();
      r.pass = false;
    }
    if (r.verdict != Verdict::inconclusive) r.verdict = r.pass ? Verdict::pass : Verdict::fail;
    results.push_back(r);
  }

  std::ostringstream s;
  s << "{\"net\":" << json_string(o.net) << ",\"dtype\":" << json_string(o.dtype) << ",\"batch\":" << o.batch
    << ",\"params\":" << moonwalk::num_parameters(net)
    << ",\"fd_error_estimate\":" << json_number(fd_error_max) << ",\"results\":[";
  bool any_fail = false, any_inconclusive = false;
  for (std::size_t i = 0; i < results.size(); ++i) {
    const Result& r = results[i];
    any_fail = any_fail || r.verdict == Verdict::fail;
    any_inconclusive = any_inconclusive || r.verdict == Verdict::inconclusive;
    s << (i ? "," : "") << "{\"schedule\":" << json_string(r.schedule)
      << ",\"max_rel_err_vs_backprop\":" << json_number(r.vs_backprop)
      << ",\"max_rel_err_vs_fd\":" << json_number(r.vs_fd)
      << ",\"error_estimate\":" << json_number(r.estimate) << ",\"residual_bytes\":" << r.residual_bytes
      << ",\"seconds\":" << json_number(r.seconds) << ",\"tolerance\":" << json_number(r.tolerance)
      << ",\"cosine_vs_backprop\":" << json_number(r.cosine)
      << ",\"solver_iterations\":" << r.stats.counts.solver_iterations;
    if (!r.stats.precision.empty())
      s << ",\"anchors\":" << r.stats.anchor_layers.size()
        << ",\"precision\":" << json_string(r.stats.precision) << ",\"fallbacks\":" << r.stats.fallbacks
        << ",\"predicted_error\":" << json_number(r.stats.predicted_error)
        << ",\"within_tolerance\":" << (r.stats.within_tolerance ? "true" : "false");
    s << ",\"verdict\":" << json_string(verdict_name(r.verdict)) << ",\"inconclusive_layers\":[";
    for (std::size_t k = 0; k < r.inconclusive_layers.size(); ++k)
      s << (k ? "," : "") << r.inconclusive_layers[k];
    s << "],\"pass\":" << (r.pass ? "true" : "false") << "}";
  }
  s << "]}\n";
  write_stdout(s.str());
  return any_fail ? 1 : any_inconclusive ? 4 : 0;
}

/// Builds the data from the seed and dispatches on loss.
template <class S>
int run(const Options& o) {
  // Parse once up front so a bad spec is reported before any work.
  const Network<S> probe = moonwalk::parse_network<S>(o.net, o.seed, moonwalk::SpecOptions{.init = o.init});
  const Index n0 = probe.in_features(), nL = probe.out_features();
  const Matrix<double> x = rounded<S>(moonwalk::gaussian<double>(n0, o.batch, stream_seed(o.seed, 1)));
  if (o.loss == "mse") {
    const Matrix<double> t = rounded<S>(moonwalk::gaussian<double>(nL, o.batch, stream_seed(o.seed, 2)));
    return check<S, moonwalk::MSE>(o, x, t);
  }
  std::mt19937_64 gen(stream_seed(o.seed, 3));
  std::vector<Index> labels(static_cast<std::size_t>(o.batch));
  for (auto& l : labels) l = static_cast<Index>(gen() % static_cast<std::uint64_t>(nL));
  return check<S, moonwalk::SoftmaxCrossEntropy>(o, x, labels);
}

}  // namespace

int main(int argc, char** argv) {
  try {
    const std::optional<Options> o = parse_args(argc, argv);
    if (!o) {
      // The layer tokens, from the grammar table (one line each).
      std::string tokens =
          "Layer tokens (after in:N or in:CxHxW; docs/gradcheck.md says what each builds):\n";
      for (const auto& [name, rule] : moonwalk::spec_layers<double>()) tokens += "  " + rule.syntax + "\n";
      write_stdout(kUsage + tokens);
      return 0;
    }
    if (o->grammar == "markdown") {
      write_stdout(moonwalk::spec::grammar_markdown());
      return 0;
    }
    if (o->grammar == "list") {
      write_stdout(moonwalk::spec::grammar_list());
      return 0;
    }
    return o->dtype == "float" ? run<float>(*o) : run<double>(*o);
  } catch (const UsageError& e) {
    std::cerr << "moonwalk-gradcheck: " << e.what() << "\n" << kUsage;
    return 2;
  } catch (const moonwalk::SpecError& e) {
    std::cerr << "moonwalk-gradcheck: --net: " << e.what() << "\n";
    return 2;
  } catch (const OutputError& e) {
    std::cerr << "moonwalk-gradcheck: " << e.what() << "\n";
    return 3;
  } catch (const std::exception& e) {
    std::cerr << "moonwalk-gradcheck: internal error: " << e.what() << "\n";
    return 3;
  }
}
