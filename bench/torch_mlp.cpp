// moonwalk-bench-torch — the LibTorch autograd counterpart of moonwalk-memory
// (docs/design.md §6, issue 8 item 5): the same MLP shapes trained for N steps with
// plain backprop (forward, backward, one SGD update per step) on a fixed
// seeded batch, then one JSON line with moonwalk-memory's keys where they mean
// something for autograd.
//
//   moonwalk-bench-torch [--depth D --width W | --fashion] [--batch B] [--steps N]
//                        [--threads T] [--seed S]
//
//   --depth/--width   equal-width LeakyReLU(0.1) MLP (default 8 × 256), exactly
//                     moonwalk-memory's default network: in:W, then
//                     D × (linear:W, leaky_relu:0.1), then linear:10
//   --fashion         784-256-128-100-10 with LeakyReLU(0.1) after each hidden Linear
//   --batch B         samples per step (default 128); inputs N(0, 1), labels
//                     uniform over the 10 outputs, seeded
//   --steps N         gradient steps (default 10), each followed by an SGD update
//   --threads T       at::set_num_threads(T) and, when the loaded BLAS is OpenBLAS,
//                     openblas_set_num_threads(T) (0: LibTorch's default)
//
// Float32, softmax cross-entropy (mean over the batch), SGD with rate 1e-4 and
// no momentum. A step's time is optimizer.zero_grad(), forward, backward and
// optimizer.step() together.
//
// Output (stdout, one line):
//   {"schedule":"libtorch", "net" (moonwalk-memory's spec string for the same network),
//    "batch", "params", "steps", "seconds_per_step" (median over steps), "seconds_min",
//    "peak_rss_bytes" (getrusage ru_maxrss), "baseline_rss_bytes" (current RSS once
//    parameters, their gradient buffers, the optimizer, inputs and labels exist, before
//    the first step), "residual_bytes":null (autograd does not account it),
//    "error_estimate":0, "within_tolerance":true, "fallbacks":0 (exact autograd),
//    "dtype":"float", "threads", "loss":"xent", "seed", "blas" (BLAS libraries mapped
//    into the process), "blas_config" (openblas_get_config() or null), "torch_version",
//    "glibc_tunables" (the GLIBC_TUNABLES environment variable or null)}
//
// Unlike moonwalk-memory this program does not call mallopt: the allocator
// setting comes from GLIBC_TUNABLES only, so a run without it shows glibc's
// default behaviour.
//
// Exit status: 0 ran; 1 run-time error; 2 bad command line.
#include <dlfcn.h>
#include <sys/resource.h>
#include <torch/torch.h>
#include <torch/version.h>
#include <unistd.h>

#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <set>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::int64_t depth = 8, width = 256;
  bool fashion = false;
  std::int64_t batch = 128;
  int steps = 10;
  int threads = 0;  // 0: LibTorch's default
  std::uint64_t seed = 1;
};

const char* kUsage =
    "usage: moonwalk-bench-torch [--depth D --width W | --fashion] [--batch B] [--steps N]\n"
    "                            [--threads T] [--seed S]\n"
    "\n"
    "  --depth D         equal-width LeakyReLU(0.1) MLP: in:W, D x (linear:W, leaky_relu:0.1),\n"
    "  --width W         linear:10 (defaults 8 and 256)\n"
    "  --fashion         784-256-128-100-10, LeakyReLU(0.1) after each hidden Linear\n"
    "  --batch B         samples per step (default 128)\n"
    "  --steps N         gradient steps, each followed by an SGD update (default 10)\n"
    "  --threads T       intra-op and OpenBLAS threads (default: LibTorch's); --seed S (default 1)\n"
    "\n"
    "Prints one JSON line on stdout. Exit: 0 ran, 1 run-time error, 2 bad command line.\n";

/// `v` parsed as a whole T, or a UsageError naming `opt`.
template <class T>
T parse_number(const std::string& opt, const std::string& v) {
  std::istringstream s(v);
  T x{};
  if (!(s >> x) || !s.eof()) throw UsageError(opt + ": not a number: '" + v + "'");
  return x;
}

/// The options given on the command line (UsageError on a malformed one).
Options parse_options(int argc, char** argv) {
  Options o;
  bool shape_given = false;
  for (int i = 1; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--help" || a == "-h") {
      std::cout << kUsage;
      std::exit(0);
    }
    if (a == "--fashion") {
      o.fashion = true;
      continue;
    }
    static const std::vector<std::string> valued{"--depth", "--width",   "--batch",
                                                 "--steps", "--threads", "--seed"};
    if (std::find(valued.begin(), valued.end(), a) == valued.end())
      throw UsageError("unknown option '" + a + "'");
    if (i + 1 >= argc) throw UsageError(a + ": missing value");
    const std::string v = argv[++i];
    if (a == "--depth") {
      o.depth = parse_number<std::int64_t>(a, v);
      if (o.depth < 0) throw UsageError("--depth: must be >= 0");
      shape_given = true;
    } else if (a == "--width") {
      o.width = parse_number<std::int64_t>(a, v);
      if (o.width < 1) throw UsageError("--width: must be >= 1");
      shape_given = true;
    } else if (a == "--batch") {
      o.batch = parse_number<std::int64_t>(a, v);
      if (o.batch < 1) throw UsageError("--batch: must be >= 1");
    } else if (a == "--steps") {
      o.steps = parse_number<int>(a, v);
      if (o.steps < 1) throw UsageError("--steps: must be >= 1");
    } else if (a == "--threads") {
      o.threads = parse_number<int>(a, v);
      if (o.threads < 0) throw UsageError("--threads: must be >= 0");
    } else if (a == "--seed") {
      o.seed = parse_number<std::uint64_t>(a, v);
    }
  }
  if (o.fashion && shape_given)
    throw UsageError("--fashion: give either --fashion or --depth/--width, not both");
  return o;
}

/// The layer widths: input first, the 10 outputs last.
std::vector<std::int64_t> widths(const Options& o) {
  if (o.fashion) return {784, 256, 128, 100, 10};
  std::vector<std::int64_t> w(static_cast<std::size_t>(o.depth) + 1, o.width);
  w.push_back(10);
  return w;
}

/// moonwalk-memory's spec string for the network with these widths
/// (in:W0, then linear:Wi, leaky_relu:0.1 for each hidden layer, linear:10).
std::string spec(const std::vector<std::int64_t>& w) {
  std::string s = "in:" + std::to_string(w.front());
  for (std::size_t i = 1; i < w.size(); ++i) {
    s += ",linear:" + std::to_string(w[i]);
    if (i + 1 < w.size()) s += ",leaky_relu:0.1";
  }
  return s;
}

/// The MLP with these widths: Linear, then LeakyReLU(0.1) after every Linear
/// but the last.
torch::nn::Sequential mlp(const std::vector<std::int64_t>& w) {
  torch::nn::Sequential net;
  for (std::size_t i = 1; i < w.size(); ++i) {
    net->push_back(torch::nn::Linear(w[i - 1], w[i]));
    if (i + 1 < w.size())
      net->push_back(torch::nn::LeakyReLU(torch::nn::LeakyReLUOptions().negative_slope(0.1)));
  }
  return net;
}

// ---- memory and environment ------------------------------------------------------------

/// Resident set now: /proc/self/statm's second field (pages) × the page size.
std::size_t current_rss_bytes() {
  std::ifstream statm("/proc/self/statm");
  std::size_t size = 0, resident = 0;
  if (!(statm >> size >> resident)) return 0;
  return resident * static_cast<std::size_t>(sysconf(_SC_PAGESIZE));
}

/// Peak resident set: getrusage's ru_maxrss (KiB on Linux) in bytes.
std::size_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<std::size_t>(u.ru_maxrss) * 1024;
}

/// The resolved paths of the BLAS libraries mapped into this process (every
/// mapped file whose name contains "blas"), joined with ';'.
std::string mapped_blas() {
  std::ifstream maps("/proc/self/maps");
  std::set<std::string> paths;
  for (std::string line; std::getline(maps, line);) {
    const auto slash = line.find('/');
    if (slash == std::string::npos) continue;
    const std::string path = line.substr(slash);
    const std::string name = path.substr(path.rfind('/') + 1);
    if (name.find("blas") != std::string::npos) paths.insert(path);
  }
  std::string s;
  for (const auto& p : paths) s += (s.empty() ? "" : ";") + p;
  return s;
}

/// `s` as a JSON string literal (quotes, backslashes and control characters escaped).
std::string json_string(const std::string& s) {
  std::string r = "\"";
  for (const char c : s) {
    if (c == '"' || c == '\\') {
      r += '\\';
      r += c;
    } else if (static_cast<unsigned char>(c) < 0x20) {
      char buf[8];
      std::snprintf(buf, sizeof buf, "\\u%04x", static_cast<unsigned>(c));
      r += buf;
    } else {
      r += c;
    }
  }
  return r + "\"";
}

/// `p` as a JSON string, or null when it is null.
std::string json_string_or_null(const char* p) { return p ? json_string(p) : "null"; }

/// The median of `v`.
double median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  const std::size_t n = v.size();
  return n % 2 ? v[n / 2] : 0.5 * (v[n / 2 - 1] + v[n / 2]);
}

/// `x` with 17 significant digits.
std::string number(double x) {
  std::ostringstream s;
  s.precision(17);
  s << x;
  return s.str();
}

// ---- the run ---------------------------------------------------------------------------

/// Trains the network for o.steps steps, then prints the JSON line. Returns the exit status.
int run(const Options& o) {
  // OpenBLAS is reached through LibTorch, not linked here: its thread-count
  // and config functions are looked up in the process (absent: not OpenBLAS).
  using set_threads_fn = void (*)(int);
  using get_config_fn = char* (*)();
  const auto openblas_set_num_threads =
      reinterpret_cast<set_threads_fn>(dlsym(RTLD_DEFAULT, "openblas_set_num_threads"));
  const auto openblas_get_config =
      reinterpret_cast<get_config_fn>(dlsym(RTLD_DEFAULT, "openblas_get_config"));
  if (o.threads > 0) {
    torch::set_num_threads(o.threads);
    if (openblas_set_num_threads) openblas_set_num_threads(o.threads);
  }

  torch::manual_seed(o.seed);
  const auto w = widths(o);
  auto net = mlp(w);
  std::int64_t params = 0;
  for (const auto& p : net->parameters()) params += p.numel();
  // Gradient buffers exist before the baseline (moonwalk's networks hold
  // theirs too), so peak − baseline is the step's working memory.
  for (auto& p : net->parameters()) p.mutable_grad() = torch::zeros_like(p);
  torch::optim::SGD sgd(net->parameters(), torch::optim::SGDOptions(1e-4));
  const torch::Tensor x = torch::randn({o.batch, w.front()});
  const torch::Tensor labels = torch::randint(0, w.back(), {o.batch}, torch::kLong);
  const std::size_t baseline = current_rss_bytes();

  std::vector<double> seconds;
  for (int step = 0; step < o.steps; ++step) {
    const auto t0 = std::chrono::steady_clock::now();
    sgd.zero_grad();
    const torch::Tensor loss = torch::nn::functional::cross_entropy(net->forward(x), labels);
    loss.backward();
    sgd.step();
    seconds.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count());
  }

  std::cout << "{\"schedule\":\"libtorch\",\"net\":" << json_string(spec(w)) << ",\"batch\":" << o.batch
            << ",\"params\":" << params << ",\"steps\":" << o.steps
            << ",\"seconds_per_step\":" << number(median(seconds))
            << ",\"seconds_min\":" << number(*std::min_element(seconds.begin(), seconds.end()))
            << ",\"peak_rss_bytes\":" << peak_rss_bytes() << ",\"baseline_rss_bytes\":" << baseline
            << ",\"residual_bytes\":null,\"error_estimate\":0,\"within_tolerance\":true,\"fallbacks\":0"
            << ",\"dtype\":\"float\",\"threads\":" << torch::get_num_threads() << ",\"loss\":\"xent\""
            << ",\"seed\":" << o.seed << ",\"blas\":" << json_string(mapped_blas()) << ",\"blas_config\":"
            << json_string_or_null(openblas_get_config ? openblas_get_config() : nullptr)
            << ",\"torch_version\":" << json_string(TORCH_VERSION)
            << ",\"glibc_tunables\":" << json_string_or_null(std::getenv("GLIBC_TUNABLES")) << "}"
            << std::endl;
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  Options o;
  try {
    o = parse_options(argc, argv);
  } catch (const UsageError& e) {
    std::cerr << "moonwalk-bench-torch: " << e.what() << "\n\n" << kUsage;
    return 2;
  }
  try {
    return run(o);
  } catch (const std::exception& e) {
    std::cerr << "moonwalk-bench-torch: error: " << e.what() << "\n";
    return 1;
  }
}
