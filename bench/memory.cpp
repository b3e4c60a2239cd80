// moonwalk-memory — what one schedule costs on one network, in memory and
// time: N gradient steps on a fixed seeded batch, each followed by a plain
// SGD update (so weight versions change as in training and every factorisation
// cache is rebuilt as it would be), then one JSON line.
//
//   moonwalk-memory [--net SPEC | --depth D --width W] [--batch B] [--schedule NAME] [--steps N]
//                   [--dtype float|double] [--threads T] [--seed S] [--loss xent|mse]
//                   [--rebuild-inputs] [--budget BYTES] [--slots K | --every K]
//
//   --net SPEC        any network in moonwalk-gradcheck's grammar (nets/spec.hpp)
//   --depth/--width   an equal-width LeakyReLU(0.1) MLP instead (the default, 8 × 256):
//                     in:W, then D × (linear:W, leaky_relu:0.1), then linear:10
//   --batch B         samples per step (default 128); inputs N(0, 1), seeded
//   --schedule NAME   any of schedule_names() (default mixed), or moonwalk-plan: every layer
//                     reversed by Moonwalk through the plan executor (moonwalk_plan, top = L;
//                     anchors where a layer has neither vijp nor fragment and, with --every K,
//                     at every K-th layer), in the network's precision and without a fidelity
//                     policy (error_estimate: the sweep's checks; within_tolerance not judged)
//   --steps N         gradient steps (default 10)
//   --slots K         binomial only: layer inputs held at once, K >= 1 (default max(1, round(√L)),
//                     L = the network's layers)
//   --every K         checkpoint: segment length, K >= 1 (default round(√L); more than L
//                     is one segment); moonwalk-plan: an anchor every K layers (default none)
//   --loss            xent (default: labels uniform over the outputs) or mse
//                     (targets N(0, 1))
//   --budget BYTES    enforce a memory budget for the steps (suffix K, M or G: binary units).
//                     Once parameters, optimizer state, inputs and targets exist (where
//                     baseline_rss_bytes is read), RLIMIT_AS is set to the current virtual
//                     size + BYTES, so every byte the steps map (heap, stack growth, threads)
//                     counts. glibc is held to one arena (M_ARENA_MAX 1: a per-thread arena
//                     reserves 64 MiB of address space); OpenMP's thread pool is started and
//                     the stack grown by 1 MiB before the limit is set.
//                     An allocation that fails under the limit ends the run: the JSON line is
//                     still printed (over the steps completed) and the exit status is 3.
//                     For planned it is also the planner's budget. (SGD reads ∂ℓ/∂θ from the
//                     layers' storage, part of the baseline: the schedules that fill a result
//                     in place make no flat copy, GradientResult::flat_gradient; pure, forward
//                     and projforward still make one and drop it.)
//   --plan-budget BYTES  planned only: the planner's working-set budget, not enforced
//                     (overrides what --budget gives it)
//   --no-invert       planned only: plans keep to storing and recomputing (Planned::invert)
//   --no-moonwalk     planned only: plans reverse no layer by Moonwalk (Planned::moonwalk)
//   --plan-report     planned only: after the JSON line, the plan's report on stderr (per
//                     layer: its input kept, checkpoint, recomputed or rebuilt, bytes kept,
//                     bytes held at its backward step, predicted time; plan/report.hpp)
//
// Output (stdout, one line):
//   {"schedule", "net", "batch", "params", "steps", "seconds_per_step" (median over steps),
//    "seconds_min", "peak_rss_bytes" (getrusage ru_maxrss), "baseline_rss_bytes" (current RSS
//    once parameters, optimizer state, inputs and targets exist, before the first step),
//    "peak_live_bytes" (the most heap bytes live at once during the steps, above those live at
//    the baseline: malloc_usable_size of every block, bench/alloc_count.hpp; peak RSS minus this
//    is what the allocator's holes, the kernels' mmapped scratch and the stack add),
//    "residual_bytes" (max over steps of the schedule's accounted bytes kept between passes),
//    "working_bytes" (max over steps of the engine-accounted working set, Stats::working_bytes;
//    0 for schedules that do not account it),
//    "error_estimate" (max over steps), "within_tolerance" (every step), "fallbacks" (sum),
//    "dtype", "threads", "loss", "seed", "rebuild_inputs", "allocations_per_step" (heap
//    allocations, gradient and update, mean over the steps after the first: bench/alloc_count.hpp),
//    "allocated_bytes_per_step" (the bytes they asked for), "scratch_bytes" (what the dense
//    kernels' per-thread scratch holds after the run, moonwalk::thread_scratch_bytes(): part of
//    the peak, not of the baseline), "slots" (binomial: the held inputs it ran with, --slots or
//    its default; null for other schedules), "every" (checkpoint: the segment length it ran with,
//    --every or its default, at most L; null for other schedules), "predicted_working_bytes"
//    (planned: its plan's working set, which --budget also bounds; null for other schedules),
//    "moonwalk_layers" (planned: the layers its plan's Moonwalk sweep reads; null for others)},
//    and with --budget also
//    "budget_bytes", "out_of_memory" (true: a step ran out of the budget) and
//    "steps_completed" (steps that finished; the figures above are over those)
// A step's time is the gradient and the SGD update together (the update is
// the same for every schedule, and its new weight version is what makes the
// next step refactorise).
//
// One configuration per process: peak RSS is a high-water mark, so running a
// second configuration in the same process would report the larger of both.
//
// Exit status: 0 ran; 1 the schedule cannot run the network (or another
// run-time error); 2 bad command line (including a malformed --net); 3 out of
// memory under --budget (std::bad_alloc, or an error whose cause is ENOMEM),
// after printing the JSON line with "out_of_memory":true.
#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <limits>
#include <moonwalk/moonwalk.hpp>
#include <numeric>
#include <random>
#include <sstream>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "alloc_count.hpp"

#ifdef _OPENMP
#include <omp.h>
#endif

namespace {

using moonwalk::Index;
using moonwalk::Matrix;
using moonwalk::Network;
using moonwalk::detail::cat;
using moonwalk::detail::json_escape;
using moonwalk::detail::json_number;

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string spec;  // from --depth/--width unless --net
  Index depth = 8, width = 256;
  Index batch = 128;
  std::string schedule = "mixed";
  int steps = 10;
  std::string dtype = "float";
  int threads = 0;  // 0: Eigen's default
  std::uint64_t seed = 1;
  std::string loss = "xent";
  bool rebuild_inputs = false;
  bool invert = true;           // planned: plans may rebuild by inversion
  bool moonwalk = true;         // planned: plans may reverse the bottom layers by Moonwalk
  bool plan_report = false;     // planned: print the plan's report after the run
  std::size_t budget = 0;       // bytes; 0: no budget
  std::size_t plan_budget = 0;  // planned: bytes of its working set; 0: from --budget
  std::size_t slots = 0;        // binomial's held inputs; 0: its default
  std::size_t every = 0;        // checkpoint's segment length; 0: its default
};

const char* kUsage =
    "usage: moonwalk-memory [--net SPEC | --depth D --width W] [--batch B] [--schedule NAME] [--steps N]\n"
    "                       [--dtype float|double] [--threads T] [--seed S] [--loss xent|mse]\n"
    "                       [--rebuild-inputs] [--budget BYTES] [--slots K | --every K]\n"
    "\n"
    "  --net SPEC        a network in moonwalk-gradcheck's grammar\n"
    "  --depth D         equal-width LeakyReLU(0.1) MLP: in:W, D x (linear:W, leaky_relu:0.1),\n"
    "  --width W         linear:10 (defaults 8 and 256)\n"
    "  --batch B         samples per step (default 128)\n"
    "  --schedule NAME   backprop, mixed (default), pure, checkpoint, binomial, revbackprop, planned,\n"
    "                    forward, projforward\n"
    "  --steps N         gradient steps, each followed by an SGD update (default 10)\n"
    "  --dtype           float (default) or double; --threads T Eigen threads; --seed S (default 1)\n"
    "  --loss            xent (default) or mse; --rebuild-inputs: mixed rebuilds invertible inputs\n"
    "  --budget BYTES    address space the steps may add (suffix K, M, G: binary), enforced with\n"
    "                    RLIMIT_AS once the parameters, optimizer state and batch exist\n"
    "  --plan-budget BYTES  planned: the working set the planner may plan for (not enforced;\n"
    "                    default: --budget less the gradient's bytes, else unlimited)\n"
    "  --no-invert       planned: plans store and recompute, never rebuild by inversion\n"
    "  --no-moonwalk     planned: plans reverse no layer by Moonwalk\n"
    "  --plan-report     planned: the plan's per-layer report on stderr after the run\n"
    "  --slots K         binomial: layer inputs held at once, K >= 1 (default round(sqrt(L)))\n"
    "  --every K         checkpoint: segment length in layers, K >= 1 (default round(sqrt(L)))\n"
    "\n"
    "Prints one JSON line on stdout. Exit: 0 ran, 1 run-time error (the schedule cannot run the\n"
    "network), 2 bad command line, 3 out of memory under --budget.\n";

template <class T>
T parse_number(const std::string& opt, const std::string& v) {
  std::istringstream s(v);
  T x{};
  if (!(s >> x) || !s.eof()) throw UsageError(cat(opt, ": not a number: '", v, "'"));
  return x;
}

/// "--budget" value: moonwalk::parse_bytes, as a usage error.
std::size_t parse_bytes(const std::string& opt, const std::string& v) {
  try {
    return moonwalk::parse_bytes(opt, v);
  } catch (const moonwalk::Error& e) {
    throw UsageError(e.what());
  }
}

Options parse_options(int argc, char** argv) {
  Options o;
  bool net_given = false, shape_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (a == "--rebuild-inputs") {
      o.rebuild_inputs = true;
      continue;
    }
    if (a == "--plan-report") {
      o.plan_report = true;
      continue;
    }
    if (a == "--no-invert") {
      o.invert = false;
      continue;
    }
    if (a == "--no-moonwalk") {
      o.moonwalk = false;
      continue;
    }
    if (a.rfind("--", 0) != 0) throw UsageError(cat("unexpected argument '", a, "'"));
    static const std::vector<std::string> valued{
        "--net",     "--depth", "--width", "--batch",  "--schedule", "--steps", "--dtype",
        "--threads", "--seed",  "--loss",  "--budget", "--slots",    "--every", "--plan-budget"};
    if (std::find(valued.begin(), valued.end(), a) == valued.end())
      throw UsageError(cat("unknown option '", a, "'"));
    if (i + 1 >= argc) throw UsageError(cat(a, ": missing value"));
    const std::string v = argv[++i];
    if (a == "--net") {
      if (v.empty()) throw UsageError("--net: empty spec");
      o.spec = v;
      net_given = true;
    } else if (a == "--depth") {
      o.depth = parse_number<Index>(a, v);
      if (o.depth < 0) throw UsageError("--depth: must be >= 0");
      shape_given = true;
    } else if (a == "--width") {
      o.width = parse_number<Index>(a, v);
      if (o.width < 1) throw UsageError("--width: must be >= 1");
      shape_given = true;
    } else if (a == "--batch") {
      o.batch = parse_number<Index>(a, v);
      if (o.batch < 1) throw UsageError("--batch: must be >= 1");
    } else if (a == "--schedule") {
      if (v != "moonwalk-plan" && !moonwalk::is_schedule_name(v)) {
        std::string known;
        for (const auto& n : moonwalk::schedule_names()) known = known.empty() ? n : cat(known, ", ", n);
        throw UsageError(cat("--schedule: unknown schedule '", v, "' (known: ", known, ")"));
      }
      o.schedule = v;
    } else if (a == "--steps") {
      o.steps = parse_number<int>(a, v);
      if (o.steps < 1) throw UsageError("--steps: must be >= 1");
    } else if (a == "--dtype") {
      if (v != "float" && v != "double")
        throw UsageError(cat("--dtype: expected float or double, got '", v, "'"));
      o.dtype = v;
    } else if (a == "--threads") {
      o.threads = parse_number<int>(a, v);
      if (o.threads < 0) throw UsageError("--threads: must be >= 0");
    } else if (a == "--seed") {
      o.seed = parse_number<std::uint64_t>(a, v);
    } else if (a == "--loss") {
      if (v != "xent" && v != "mse") throw UsageError(cat("--loss: expected xent or mse, got '", v, "'"));
      o.loss = v;
    } else if (a == "--budget") {
      o.budget = parse_bytes(a, v);
    } else if (a == "--plan-budget") {
      o.plan_budget = parse_bytes(a, v);
    } else if (a == "--slots" || a == "--every") {
      // (Read signed: istream would wrap "-1" into a huge std::size_t.)
      const auto k = parse_number<long long>(a, v);
      if (k < 1) throw UsageError(cat(a, ": must be >= 1, got ", k));
      (a == "--slots" ? o.slots : o.every) = static_cast<std::size_t>(k);
    }
  }
  // Each is read by one schedule only: anywhere else it would be silently ignored.
  if (o.slots > 0 && o.schedule != "binomial")
    throw UsageError(cat("--slots: only --schedule binomial reads it (schedule is '", o.schedule, "')"));
  if (o.every > 0 && o.schedule != "checkpoint" && o.schedule != "moonwalk-plan")
    throw UsageError(cat("--every: only --schedule checkpoint or moonwalk-plan reads it (schedule is '",
                         o.schedule, "')"));
  if (o.plan_report && o.schedule != "planned")
    throw UsageError(
        cat("--plan-report: only --schedule planned has a plan (schedule is '", o.schedule, "')"));
  if (!o.invert && o.schedule != "planned")
    throw UsageError(cat("--no-invert: only --schedule planned reads it (schedule is '", o.schedule, "')"));
  if (!o.moonwalk && o.schedule != "planned")
    throw UsageError(cat("--no-moonwalk: only --schedule planned reads it (schedule is '", o.schedule, "')"));
  if (net_given && shape_given) throw UsageError("--net: give either --net or --depth/--width, not both");
  if (!net_given) {
    o.spec = cat("in:", o.width);
    for (Index d = 0; d < o.depth; ++d) o.spec = cat(o.spec, ",linear:", o.width, ",leaky_relu:0.1");
    o.spec = cat(o.spec, ",linear:10");
  }
  return o;
}

// ---- memory -----------------------------------------------------------------------

/// Resident set now: /proc/self/statm's second field (pages) × the page size.
/// (ru_maxrss is a high-water mark, so it cannot give the baseline.)
std::size_t current_rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t size = 0, resident = 0;
  if (!(statm >> size >> resident)) return 0;
  return resident * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

/// Address space now: /proc/self/statm's first field (pages) × the page size.
std::size_t current_vm_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t size = 0;
  if (!(statm >> size)) return 0;
  return size * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

/// Grows the main thread's stack mapping by ~1 MiB now, so that stack growth
/// during the steps (Eigen puts small temporaries on the stack) is not refused
/// under the address-space limit, which would be a SIGSEGV, not a bad_alloc.
[[gnu::noinline]] void touch_stack() {
  volatile char block[1 << 20];
  for (std::size_t i = 0; i < sizeof block; i += 4096) block[i] = 0;
  block[sizeof block - 1] = 0;
}

/// Makes the budget enforceable before it is set: starts OpenMP's thread
/// pool (each worker's stack is address space) and grows the stack.
void prepare_for_budget() {
#ifdef _OPENMP
  const int n = Eigen::nbThreads();
  if (n > 1) {
#pragma omp parallel num_threads(n)
    { (void)omp_get_thread_num(); }
  }
#endif
  touch_stack();
}

/// Caps the address space at what is mapped now + `budget`. Returns the limit
/// it replaced (to lift the cap again for the report).
rlimit set_budget(std::size_t budget) {
  rlimit old{};
  if (getrlimit(RLIMIT_AS, &old) != 0) throw std::runtime_error("--budget: getrlimit(RLIMIT_AS) failed");
  rlimit cap = old;
  const std::size_t vm = current_vm_bytes();
  if (vm == 0) throw std::runtime_error("--budget: cannot read /proc/self/statm");
  cap.rlim_cur = static_cast<rlim_t>(vm + budget);
  if (old.rlim_max != RLIM_INFINITY && cap.rlim_cur > old.rlim_max)
    throw std::runtime_error(cat("--budget: ", budget, " bytes above the current ", vm,
                                 " exceeds the hard RLIMIT_AS ", old.rlim_max));
  if (setrlimit(RLIMIT_AS, &cap) != 0) throw std::runtime_error("--budget: setrlimit(RLIMIT_AS) failed");
  return old;
}

std::size_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<std::size_t>(u.ru_maxrss) * 1024;  // Linux: KiB
}

// ---- the run ---------------------------------------------------------------------------

double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

template <class S, class Loss>
int run(const Options& o, Network<S>& net, const Matrix<S>& x, const Loss& loss,
        const typename Loss::target_type& target) {
  const Index params = moonwalk::num_parameters(net);
  moonwalk::Sgd<S> sgd{.lr = 1e-4};
  // A zero-rate step allocates the optimizer's velocity (θ unchanged), so the
  // baseline holds every long-lived buffer and peak − baseline is the step's
  // working memory.
  sgd.step(net, 0.0);
  if (o.budget > 0) prepare_for_budget();
  const std::size_t baseline = current_rss_bytes();
  const std::int64_t live_baseline = moonwalk::bench::heap_live_bytes();
  moonwalk::bench::reset_live_peak();
  rlimit unlimited{};
  if (o.budget > 0) unlimited = set_budget(o.budget);

  // planned: the enforced budget is also the planner's (the product scratch
  // and the allocator's overhead come on top).
  const std::size_t plan_budget = o.plan_budget > 0 ? o.plan_budget : o.budget;
  const moonwalk::ScheduleChoice choice{.name = o.schedule,
                                        .rebuild_inputs = o.rebuild_inputs,
                                        .every = o.every,
                                        .slots = o.slots,
                                        .seed = o.seed,
                                        .budget = plan_budget,
                                        .invert = o.invert,
                                        .moonwalk = o.moonwalk};
  std::vector<double> seconds;
  std::vector<std::uint64_t> allocations;  // heap allocations per step (gradient and update)
  std::vector<std::uint64_t> alloc_bytes;  // and the bytes they asked for
  std::size_t residual_bytes = 0, working_bytes = 0, fallbacks = 0;
  double error_estimate = 0;
  const double nan = std::numeric_limits<double>::quiet_NaN();
  double slots_used = nan, every_used = nan;  // as the schedule reports them (stats.figures)
  double moonwalk_layers = nan;               // planned: the layers its plan sweeps
  double predicted_working = nan;             // planned: the plan's predicted working bytes
  bool within_tolerance = true;
  bool out_of_memory = false;
  seconds.reserve(static_cast<std::size_t>(o.steps));
  // Filled in place by every step (gradient_into). SGD reads ∂ℓ/∂θ from the
  // layers, so no flat copy is kept (GradientResult::flat_gradient).
  moonwalk::GradientResult<S> r;
  r.flat_gradient = false;
  // moonwalk-plan: Moonwalk's plan, bound once on the first step.
  moonwalk::PlanRun<S> moonwalk_run;
  if (o.schedule == "moonwalk-plan") {
    std::vector<moonwalk::CotangentKeep> keep;
    for (const moonwalk::SweepMode m : moonwalk::detail::sweep_modes(net))
      keep.push_back(m == moonwalk::SweepMode::vijp       ? moonwalk::CotangentKeep::none
                     : m == moonwalk::SweepMode::fragment ? moonwalk::CotangentKeep::fragment
                                                          : moonwalk::CotangentKeep::anchor);
    for (std::size_t i = o.every; o.every > 0 && i < net.size(); i += o.every)
      keep[i - 1] = moonwalk::CotangentKeep::anchor;
    moonwalk_run.bind(moonwalk::moonwalk_plan(keep, net.size(), false), moonwalk::value_rows(net), x.cols(),
                      false, /*allocate=*/false);
  }
  try {
    for (int step = 0; step < o.steps; ++step) {
      const std::uint64_t a0 = moonwalk::bench::allocation_count();
      const std::uint64_t b0 = moonwalk::bench::allocation_bytes();
      const auto t0 = std::chrono::steady_clock::now();
      if (o.schedule == "moonwalk-plan") {
        r.stats.restart();
        moonwalk::zero_gradients(net);
        moonwalk_run.run(net, x, loss, target, r);
      } else {
        moonwalk::with_schedule(choice, net.size(), [&](const auto& schedule) {
          moonwalk::gradient_into(schedule, net, x, loss, target, r);
        });
      }
      sgd.step(net);
      seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
      allocations.push_back(moonwalk::bench::allocation_count() - a0);
      alloc_bytes.push_back(moonwalk::bench::allocation_bytes() - b0);
      residual_bytes = std::max(residual_bytes, r.stats.residual_bytes);
      working_bytes = std::max(working_bytes, r.stats.working_bytes);
      // NaN (a broken estimate) must not be lost by std::max: keep it as +∞.
      const double e = std::isnan(r.stats.error_estimate) ? std::numeric_limits<double>::infinity()
                                                          : r.stats.error_estimate;
      error_estimate = std::max(error_estimate, e);
      within_tolerance = within_tolerance && r.stats.within_tolerance;
      fallbacks += r.stats.fallbacks;
      if (o.schedule == "binomial" && r.stats.figures.contains("slots"))
        slots_used = r.stats.figures["slots"];
      if (o.schedule == "checkpoint" && r.stats.figures.contains("every"))
        every_used = r.stats.figures["every"];
      if (r.stats.figures.contains("predicted_working_bytes"))
        predicted_working = r.stats.figures["predicted_working_bytes"];
      if (o.schedule == "planned")
        moonwalk_layers =
            r.stats.figures.contains("moonwalk_layers") ? r.stats.figures["moonwalk_layers"] : 0;
    }
  } catch (const std::bad_alloc&) {
    if (o.budget == 0) throw;
    out_of_memory = true;
  } catch (const std::system_error& e) {
    if (o.budget == 0 || e.code() != std::errc::not_enough_memory) throw;
    out_of_memory = true;
  }
  // The report allocates a little: lift the cap first (back to the soft limit
  // it replaced, which never exceeds the hard one).
  if (o.budget > 0) setrlimit(RLIMIT_AS, &unlimited);
  const double per_step = seconds.empty() ? nan : median(seconds);
  const double min_step = seconds.empty() ? nan : *std::min_element(seconds.begin(), seconds.end());
  if (seconds.empty()) error_estimate = nan;
  // Steady state: the steps after the first (which may size buffers once).
  auto steady_mean = [nan](const std::vector<std::uint64_t>& v) {
    return v.size() < 2 ? nan
                        : static_cast<double>(std::accumulate(v.begin() + 1, v.end(), std::uint64_t{0})) /
                              static_cast<double>(v.size() - 1);
  };
  const double allocs_per_step = steady_mean(allocations);
  const double alloc_bytes_per_step = steady_mean(alloc_bytes);

  std::cout << "{\"schedule\":\"" << json_escape(o.schedule) << "\",\"net\":\"" << json_escape(o.spec)
            << "\",\"batch\":" << o.batch << ",\"params\":" << params << ",\"steps\":" << o.steps
            << ",\"seconds_per_step\":" << json_number(per_step)
            << ",\"seconds_min\":" << json_number(min_step) << ",\"peak_rss_bytes\":" << peak_rss_bytes()
            << ",\"baseline_rss_bytes\":" << baseline
            << ",\"peak_live_bytes\":" << moonwalk::bench::heap_live_peak() - live_baseline
            << ",\"residual_bytes\":" << residual_bytes << ",\"working_bytes\":" << working_bytes
            << ",\"error_estimate\":" << json_number(error_estimate)
            << ",\"within_tolerance\":" << (within_tolerance ? "true" : "false")
            << ",\"fallbacks\":" << fallbacks << ",\"dtype\":\"" << o.dtype
            << "\",\"threads\":" << Eigen::nbThreads() << ",\"loss\":\"" << o.loss << "\",\"seed\":" << o.seed
            << ",\"rebuild_inputs\":" << (o.rebuild_inputs ? "true" : "false")
            << ",\"invert\":" << (o.invert ? "true" : "false")
            << ",\"moonwalk\":" << (o.moonwalk ? "true" : "false")
            << ",\"allocations_per_step\":" << json_number(allocs_per_step)
            << ",\"allocated_bytes_per_step\":" << json_number(alloc_bytes_per_step)
            << ",\"scratch_bytes\":" << moonwalk::thread_scratch_bytes()
            << ",\"slots\":" << json_number(slots_used) << ",\"every\":" << json_number(every_used)
            << ",\"predicted_working_bytes\":" << json_number(predicted_working)
            << ",\"moonwalk_layers\":" << json_number(moonwalk_layers);
  if (o.budget > 0)
    std::cout << ",\"budget_bytes\":" << o.budget
              << ",\"out_of_memory\":" << (out_of_memory ? "true" : "false")
              << ",\"steps_completed\":" << seconds.size();
  std::cout << "}" << std::endl;
  // (After the figures: making the report times layers and allocates.)
  if (o.plan_report)
    std::cerr << moonwalk::plan_report_text(
        moonwalk::Planned{.budget = plan_budget, .invert = o.invert, .moonwalk = o.moonwalk}.report(net, x));
  return out_of_memory ? 3 : 0;
}

template <class S>
int run(const Options& o) {
  if (o.threads > 0) Eigen::setNbThreads(o.threads);
  Network<S> net = moonwalk::parse_network<S>(o.spec, o.seed);
  const Matrix<S> x = moonwalk::gaussian<S>(net.in_features(), o.batch, o.seed * 1000003u + 1);
  if (o.schedule == "forward" || o.schedule == "pure")
    std::fprintf(
        stderr, "moonwalk-memory: note: %s costs %lld jvp passes per step: expect it to be slow\n",
        o.schedule.c_str(),
        static_cast<long long>(o.schedule == "forward" ? moonwalk::num_parameters(net) : net.in_features()));
  if (o.loss == "mse") {
    const Matrix<S> t = moonwalk::gaussian<S>(net.out_features(), o.batch, o.seed * 1000003u + 2);
    return run(o, net, x, moonwalk::MSE<S>{}, t);
  }
  std::vector<Index> labels(static_cast<std::size_t>(o.batch));
  std::mt19937_64 rng(o.seed * 1000003u + 2);
  for (auto& l : labels) l = static_cast<Index>(rng() % static_cast<std::uint64_t>(net.out_features()));
  return run(o, net, x, moonwalk::SoftmaxCrossEntropy<S>{}, labels);
}

}  // namespace

int main(int argc, char** argv) {
  // The same allocator setting as moonwalk-train, for every schedule: freed
  // blocks are kept for reuse instead of being returned to the kernel (glibc's
  // default mmaps and trims above 128 KiB, so each step's large matrices
  // would be fresh page faults, which costs the schedules unequally). Peak
  // RSS is then the high-water mark of the heap, not of the mmap churn.
  mallopt(M_MMAP_THRESHOLD, 512 << 20);
  mallopt(M_TRIM_THRESHOLD, 1024 << 20);
  Options o;
  try {
    o = parse_options(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "moonwalk-memory: " << e.what() << "\n\n" << kUsage;
    return 2;
  }
  // Under a budget, one arena: glibc would otherwise reserve 64 MiB of address
  // space for each thread that allocates, which the budget would count.
  if (o.budget > 0) mallopt(M_ARENA_MAX, 1);
  try {
    return o.dtype == "float" ? run<float>(o) : run<double>(o);
  } catch (const moonwalk::SpecError& e) {
    std::cerr << "moonwalk-memory: bad --net: " << e.what() << "\n";
    return 2;
  } catch (const moonwalk::ScheduleError& e) {
    std::cerr << "moonwalk-memory: schedule '" << o.schedule << "' cannot run this network: " << e.what()
              << "\n";
    return 1;
  } catch (const std::exception& e) {
    std::cerr << "moonwalk-memory: error: " << e.what() << "\n";
    return 1;
  }
}
