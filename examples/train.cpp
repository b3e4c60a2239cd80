// moonwalk-train — trains a Fashion-MNIST classifier with any gradient
// schedule: the MLP 784-256-128-100-10 (LeakyReLU, every layer contracting,
// so the whole network is submersive), a convolutional RevNet (additive
// conv coupling blocks, invertible downsampling, global average pooling,
// linear head) or a small convolutional ResNet (BatchNorm, residual conv
// blocks x + F(x), average pooling, global average pooling, linear head).
//
//   moonwalk-train [--model mlp|revnet|resnet] [--net SPEC] [--schedule NAME] [--epochs N] [--batch B]
//                  [--optimizer adam|sgd] [--lr LR] [--momentum M] [--weight-decay WD]
//                  [--lr-schedule cosine|step|constant] [--seed S] [--threads T] [--dtype float|double]
//                  [--data DIR] [--train-limit N] [--test-limit N] [--rebuild-inputs]
//                  [--save PATH] [--resume PATH] [--log FILE.csv] [--step-log FILE.csv] [--quiet]
//                  [--budget BYTES]   (planned: the working set a step may use; K, M, G suffixes)
//                  [--deterministic] [--bucket BYTES]   (under mpirun)
//
// Under `mpirun -np N` (built with MOONWALK_MPI) it trains data-parallel:
// each rank computes the gradient of its N-th of every global batch (--batch
// is the global batch and must divide by N), the gradients are all-reduced
// in buckets while the step runs (distributed/mpi.hpp), and every rank takes
// the same optimizer step. The data order is a single process's for the same
// seed; rank 0 alone prints, logs and writes checkpoints, which resume under
// any N. A rank that fails ends the whole job with a message naming it.
//
// While it runs, a progress bar on stderr (epoch, batch, loss, samples/s,
// bytes kept between passes by the schedule, the step's gradient error
// estimate); at the end one JSON line on stdout:
//   {"model", "schedule", "epochs", "test_accuracy", "train_loss", "seconds", "peak_rss_bytes",
//    "residual_bytes", "working_bytes", "max_error_estimate", "fallbacks", …}
// Moonwalk schedules run with the default fidelity policy, so every step's
// gradient is held under its tolerance (or recomputed): `untrusted_steps`
// counts the steps whose estimate stayed above it anyway (or was NaN), under
// any schedule that reports one.
//
// A step whose loss or gradient is not finite, or whose update leaves a
// parameter non-finite, stops the run (exit 1) naming the epoch and step; so
// does a non-finite test loss. Every output (the step log, the epoch log, the
// checkpoint, the JSON line) is checked as it is written: a failed write (a
// full disk) is an error naming the file. The --save and --log paths are
// checked for writability before any training.
//
// Exit status: 0 trained; 1 a run-time error (data, checkpoint, schedule,
// divergence, a failed write); 2 bad command line.
#include <malloc.h>
#include <sys/resource.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <moonwalk/data/idx.hpp>
#include <moonwalk/io/checkpoint.hpp>
#include <moonwalk/moonwalk.hpp>
#if MOONWALK_TRAIN_MPI
#include <moonwalk/distributed/mpi.hpp>
#endif
#include <optional>
#include <span>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

namespace {

using moonwalk::Index;
using moonwalk::Matrix;
using moonwalk::Network;
using moonwalk::detail::cat;
using moonwalk::detail::json_number;

// ---- models ------------------------------------------------------------------------

/// 784-256-128-100-10, LeakyReLU(0.1) between: every Linear contracts.
constexpr const char* kMlpSpec =
    "in:784,linear:256,leaky_relu:0.1,linear:128,leaky_relu:0.1,linear:100,leaky_relu:0.1,linear:10";
/// 1×28×28 → squeeze 4×14×14 → 16 channels (zero padded) → 2 additive conv
/// couplings → squeeze 64×7×7 → 2 couplings → global average pool → 64 → 10.
/// 1×28×28 → conv 16 → BatchNorm, ReLU → residual block → avgpool 16×14×14 →
/// conv 32 → BatchNorm, ReLU → residual block → avgpool 32×7×7 → residual
/// block → BatchNorm → global average pooling → 32 → 10. Each residual block
/// is x + F(x), F = conv 3×3, ReLU, conv 3×3 (gain 1/2).
constexpr const char* kResnetSpec =
    "in:1x28x28,conv:16:3:1:1,batchnorm,relu,residual_conv:16:relu,avgpool,conv:32:3:1:1,batchnorm,relu,"
    "residual_conv:32:relu,avgpool,residual_conv:32:relu,batchnorm,relu,gap,linear:10";
constexpr const char* kRevnetSpec =
    "in:1x28x28,squeeze,pad_channels:16,coupling:additive_conv:32,coupling:additive_conv:32,squeeze,"
    "coupling:additive_conv:64,coupling:additive_conv:64,gap,linear:10";

// ---- command line ----------------------------------------------------------------------

struct UsageError : std::runtime_error {
  using std::runtime_error::runtime_error;
};

struct Options {
  std::string model = "mlp";
  std::string spec;  // from --model unless --net
  std::string schedule = "mixed";
  int epochs = 5;
  Index batch = 128;
  std::string optimizer = "adam";
  double lr = -1;  // -1: the optimizer's default
  double momentum = 0.9;
  double weight_decay = 0;
  std::string lr_schedule = "cosine";
  std::uint64_t seed = 1;
  int threads = 0;  // 0: every core
  std::string dtype = "float";
  std::string data = moonwalk::data::default_fashion_mnist_dir;
  Index train_limit = 0, test_limit = 0;
  bool rebuild_inputs = false;
  std::size_t budget = 0;  // planned: bytes of a step's working set; 0: unlimited
  std::string augment;     // none | flip | shift; empty: the model's default (revnet: flip, others: none)
  std::string save, resume, log, step_log;
  bool quiet = false;
  bool deterministic = false;                       // under mpirun: gradients added in rank order
  std::size_t bucket_bytes = std::size_t{1} << 20;  // under mpirun: all-reduce buckets
};

const char* kUsage =
    "usage: moonwalk-train [--model mlp|revnet|resnet] [--net SPEC] [--schedule NAME] [--epochs N] [--batch "
    "B]\n"
    "                      [--optimizer adam|sgd] [--lr LR] [--momentum M] [--weight-decay WD]\n"
    "                      [--lr-schedule cosine|step|constant] [--seed S] [--threads T] [--dtype "
    "float|double]\n"
    "                      [--data DIR] [--train-limit N] [--test-limit N] [--rebuild-inputs]\n"
    "                      [--augment none|flip|shift] [--budget BYTES]\n"
    "                      [--save PATH] [--resume PATH] [--log FILE.csv] [--step-log FILE.csv] [--quiet]\n"
    "                      [--deterministic] [--bucket BYTES]\n"
    "\n"
    "  --model           mlp (784-256-128-100-10, LeakyReLU), revnet (conv RevNet) or resnet\n"
    "                    (conv ResNet with BatchNorm); default mlp\n"
    "  --net SPEC        any network in moonwalk-gradcheck's grammar instead (784 inputs, 10 outputs)\n"
    "  --schedule NAME   backprop, mixed (default), pure, checkpoint, binomial, revbackprop, planned,\n"
    "                    forward, projforward; Moonwalk schedules hold the default fidelity policy\n"
    "  --rebuild-inputs  mixed: rebuild invertible layers' inputs instead of keeping residuals\n"
    "  --budget BYTES    planned: the working set a step may use (suffix K, M, G: binary); the\n"
    "                    planner picks the fastest plan that fits (default: unlimited)\n"
    "  --epochs N        passes over the training set (default 5); --batch B (default 128; a batch\n"
    "                    larger than the training set is the whole set)\n"
    "  --optimizer       adam (default, lr 1e-3) or sgd (lr 0.05, --momentum 0.9); --weight-decay WD >= 0\n"
    "  --lr-schedule     cosine (default, over all steps), step (x0.1 at 1/2 and 3/4), constant\n"
    "  --threads T       Eigen threads (default: every core; at most 4 per core); --seed S (init and\n"
    "                    shuffling, an unsigned integer)\n"
    "  --data DIR        IDX files (default /usr/share/datasets/fashion-mnist, Debian's\n"
    "                    dataset-fashion-mnist); --train-limit/--test-limit N: the first N samples\n"
    "  --augment         flip: mirror each training image left-right with probability 1/2\n"
    "                    (default for revnet and resnet); shift: flip, then translate by up to 2\n"
    "                    pixels each way (blank pixels fill in); none (default for mlp and --net)\n"
    "  --save PATH       checkpoint after every epoch (atomic); --resume PATH continues one\n"
    "  --log FILE.csv    one row per epoch; --step-log FILE.csv one row per step\n"
    "  --quiet           no progress bar\n"
    "\n"
    "Under mpirun -np N (a build with MOONWALK_MPI): data-parallel, --batch is the global batch (a\n"
    "multiple of N), --threads defaults to the cores per rank on each host; rank 0 prints and writes.\n"
    "  --deterministic   add the ranks' gradients in rank order: bitwise reproducible for a given N\n"
    "  --bucket BYTES    gradient bytes per all-reduce message (default 1M; suffix K, M, G)\n"
    "\n"
    "Prints one JSON line on stdout. Exit: 0 trained, 1 run-time error (data, checkpoint, a loss,\n"
    "gradient or parameter that is not finite, a failed write), 2 bad command line.\n";

template <class T>
T parse_number(const std::string& opt, const std::string& v) {
  std::istringstream s(v);
  T x{};
  if (!(s >> x) || !s.eof()) throw UsageError(cat(opt, ": not a number: '", v, "'"));
  return x;
}

/// A non-negative integer: "-1" is refused (an unsigned read would wrap it to 2^64 − 1).
template <class T>
T parse_unsigned(const std::string& opt, const std::string& v) {
  if (v.find('-') != std::string::npos)
    throw UsageError(cat(opt, ": must be a non-negative integer, got '", v, "'"));
  return parse_number<T>(opt, v);
}

/// The --threads limit: 4 threads per core (1024 when the core count is unknown).
int max_threads() {
  const unsigned cores = std::thread::hardware_concurrency();
  return cores == 0 ? 1024 : static_cast<int>(std::min(4u * cores, 1024u));
}

Options parse_options(int argc, char** argv) {
  Options o;
  bool net_given = false;
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
    if (a == "--quiet") {
      o.quiet = true;
      continue;
    }
    if (a == "--deterministic") {
      o.deterministic = true;
      continue;
    }
    if (i + 1 >= argc) throw UsageError(cat(a, ": missing value (or unknown option)"));
    const std::string v = argv[++i];
    if (a == "--model") {
      if (v != "mlp" && v != "revnet" && v != "resnet")
        throw UsageError(cat("--model: expected mlp, revnet or resnet, got '", v, "'"));
      o.model = v;
    } else if (a == "--net") {
      o.spec = v;
      net_given = true;
    } else if (a == "--schedule") {
      if (!moonwalk::is_schedule_name(v)) {
        std::string known;
        for (const auto& n : moonwalk::schedule_names()) known = known.empty() ? n : cat(known, ", ", n);
        throw UsageError(cat("--schedule: unknown schedule '", v, "' (known: ", known, ")"));
      }
      o.schedule = v;
    } else if (a == "--epochs") {
      o.epochs = parse_number<int>(a, v);
      if (o.epochs < 0) throw UsageError("--epochs: must be >= 0");
    } else if (a == "--batch") {
      o.batch = parse_number<Index>(a, v);
      if (o.batch < 1) throw UsageError("--batch: must be >= 1");
    } else if (a == "--optimizer") {
      if (v != "adam" && v != "sgd")
        throw UsageError(cat("--optimizer: expected adam or sgd, got '", v, "'"));
      o.optimizer = v;
    } else if (a == "--lr") {
      o.lr = parse_number<double>(a, v);
      if (!(o.lr > 0) || !std::isfinite(o.lr)) throw UsageError("--lr: must be finite and > 0");
    } else if (a == "--momentum") {
      o.momentum = parse_number<double>(a, v);
    } else if (a == "--weight-decay") {
      o.weight_decay = parse_number<double>(a, v);
      if (!(o.weight_decay >= 0) || !std::isfinite(o.weight_decay))
        throw UsageError(cat("--weight-decay: must be finite and >= 0, got '", v, "'"));
    } else if (a == "--lr-schedule") {
      if (v != "cosine" && v != "step" && v != "constant")
        throw UsageError(cat("--lr-schedule: expected cosine, step or constant, got '", v, "'"));
      o.lr_schedule = v;
    } else if (a == "--seed") {
      o.seed = parse_unsigned<std::uint64_t>(a, v);
    } else if (a == "--threads") {
      o.threads = parse_number<int>(a, v);
      if (o.threads < 0) throw UsageError("--threads: must be >= 0");
      if (o.threads > max_threads())
        throw UsageError(cat("--threads: ", o.threads, " is more than the limit of ", max_threads(),
                             " (4 per core, ", std::thread::hardware_concurrency(), " cores)"));
    } else if (a == "--dtype") {
      if (v != "float" && v != "double")
        throw UsageError(cat("--dtype: expected float or double, got '", v, "'"));
      o.dtype = v;
    } else if (a == "--data") {
      o.data = v;
    } else if (a == "--train-limit") {
      o.train_limit = parse_number<Index>(a, v);
    } else if (a == "--test-limit") {
      o.test_limit = parse_number<Index>(a, v);
    } else if (a == "--augment") {
      if (v != "none" && v != "flip" && v != "shift")
        throw UsageError(cat("--augment: expected none, flip or shift, got '", v, "'"));
      o.augment = v;
    } else if (a == "--budget") {
      try {
        o.budget = moonwalk::parse_bytes(a, v);
      } catch (const moonwalk::Error& e) {
        throw UsageError(e.what());
      }
    } else if (a == "--bucket") {
      try {
        o.bucket_bytes = moonwalk::parse_bytes(a, v);
      } catch (const moonwalk::Error& e) {
        throw UsageError(e.what());
      }
      if (o.bucket_bytes == 0) throw UsageError("--bucket: must be > 0 bytes");
    } else if (a == "--save") {
      o.save = v;
    } else if (a == "--resume") {
      o.resume = v;
    } else if (a == "--log") {
      o.log = v;
    } else if (a == "--step-log") {
      o.step_log = v;
    } else {
      throw UsageError(cat("unknown option '", a, "'"));
    }
  }
  if (o.budget > 0 && o.schedule != "planned")
    throw UsageError(
        cat("--budget: only the planned schedule takes a budget (the schedule is ", o.schedule, ")"));
  if (!net_given) o.spec = o.model == "mlp" ? kMlpSpec : o.model == "revnet" ? kRevnetSpec : kResnetSpec;
  if (net_given) o.model = "custom";
  if (o.augment.empty()) o.augment = o.model == "revnet" || o.model == "resnet" ? "flip" : "none";
  if (o.lr < 0) o.lr = o.optimizer == "adam" ? 1e-3 : 0.05;
  return o;
}

// ---- small utilities -----------------------------------------------------------------

std::size_t peak_rss_bytes() {
  rusage u{};
  getrusage(RUSAGE_SELF, &u);
  return static_cast<std::size_t>(u.ru_maxrss) * 1024;  // Linux: KiB
}

std::string human_bytes(double b) {
  const char* units[] = {"B", "KiB", "MiB", "GiB"};
  int u = 0;
  while (b >= 1024 && u < 3) b /= 1024, ++u;
  char s[32];
  std::snprintf(s, sizeof s, u == 0 ? "%.0f %s" : "%.1f %s", b, units[u]);
  return s;
}

/// Enough digits to round-trip a double (so step logs compare losses exactly).
std::string full_precision(double v) {
  char s[32];
  std::snprintf(s, sizeof s, "%.17g", v);
  return s;
}

/// The larger of two error estimates; NaN when either is (std::max drops a NaN second argument).
double max_or_nan(double a, double b) {
  return std::isnan(a) || std::isnan(b) ? std::numeric_limits<double>::quiet_NaN() : std::max(a, b);
}

/// Refuses, before any training, a path that write_file_atomically could not
/// write: not a regular file (a directory, a device: renaming over it would
/// replace it), or a directory where no temporary file can be created. The
/// probe file is created the way the atomic write names its own, then removed.
void check_writable(const std::string& option, const std::string& path) {
  namespace fs = std::filesystem;
  std::error_code ec;
  const fs::file_status st = fs::status(path, ec);
  if (fs::exists(st) && !fs::is_regular_file(st))
    throw moonwalk::Error(cat(option, " ", path, ": not a regular file (",
                              fs::is_directory(st) ? "a directory" : "a device, pipe or socket", ")"));
  const fs::path target(path);
  const fs::path dir = target.has_parent_path() ? target.parent_path() : fs::path(".");
  std::string name = (dir / (target.filename().string() + ".tmp.XXXXXX")).string();
  const int fd = ::mkstemp(name.data());
  if (fd < 0)
    throw moonwalk::Error(cat(option, " ", path, ": cannot write there (creating a file in ", dir.string(),
                              ": ", std::strerror(errno), ")"));
  ::close(fd);
  ::unlink(name.c_str());
}

/// Throws naming `what` when `out` has failed (a write or flush went wrong, e.g. a full disk).
void check_stream(const std::ostream& out, const std::string& what) {
  if (!out) {
    const int e = errno;
    throw moonwalk::Error(cat(what, ": write failed", e ? cat(" (", std::strerror(e), ")") : std::string()));
  }
}

double seconds_since(std::chrono::steady_clock::time_point t0) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
}

/// A progress bar on stderr, redrawn at most 5 times a second (only on a terminal).
class Progress {
 public:
  explicit Progress(bool enabled) : enabled_(enabled && isatty(fileno(stderr))) {}
  void draw(const std::string& line, bool force = false) {
    if (!enabled_) return;
    const auto now = std::chrono::steady_clock::now();
    if (!force && std::chrono::duration<double>(now - last_).count() < 0.2) return;
    last_ = now;
    std::fprintf(stderr, "\r%s\033[K", line.c_str());
    std::fflush(stderr);
  }
  void finish() {
    if (enabled_) std::fprintf(stderr, "\r\033[K");
  }

 private:
  bool enabled_;
  std::chrono::steady_clock::time_point last_{};
};

std::string bar(Index done, Index total, int width = 24) {
  const int full = total > 0 ? static_cast<int>(width * done / total) : width;
  return cat("[", std::string(static_cast<std::size_t>(full), '#'),
             std::string(static_cast<std::size_t>(width - full), '.'), "]");
}

/// The CSV log: rows kept in memory and the whole file rewritten atomically
/// after each epoch, so an interrupted run leaves a complete file.
class CsvLog {
 public:
  CsvLog(std::string path, std::string header) : path_(std::move(path)), header_(std::move(header)) {}
  /// Keeps the rows of an existing log whose first field (epoch) is ≤ `upto` (for --resume).
  void keep_existing(int upto) {
    std::ifstream in(path_);
    std::string line;
    if (!in || !std::getline(in, line) || line != header_) return;
    while (std::getline(in, line)) {
      const int e = std::atoi(line.c_str());
      if (e >= 1 && e <= upto) rows_.push_back(line);
    }
  }
  void add(const std::string& row) { rows_.push_back(row); }
  void flush() const {
    if (path_.empty()) return;
    std::string s = header_ + "\n";
    for (const auto& r : rows_) s += r + "\n";
    moonwalk::io::write_file_atomically(path_, s);
  }

 private:
  std::string path_, header_;
  std::vector<std::string> rows_;
};

// ---- the ranks of a data-parallel job -------------------------------------------------

/// This process's place in the job: one rank and no MPI unless mpirun started it.
struct Job {
  int rank = 0, ranks = 1;
  [[nodiscard]] bool root() const { return rank == 0; }
  [[nodiscard]] bool parallel() const { return ranks > 1; }
};
Job job;

#if MOONWALK_TRAIN_MPI
/// A 64-bit hash of bytes (what the ranks compare).
std::uint64_t hash_of(const void* data, std::size_t bytes, std::uint64_t h = moonwalk::mpi::kHashSeed) {
  return moonwalk::mpi::hash_bytes(data, bytes, h);
}
#else
/// One process: nothing to compare with.
std::uint64_t hash_of(const void*, std::size_t, std::uint64_t = 0) { return 0; }
#endif

/// Throws, on every rank, naming the first rank whose `value` is not rank 0's.
/// `mine` says what this rank read, for the message.
void same_on_every_rank([[maybe_unused]] std::uint64_t value, [[maybe_unused]] const std::string& what,
                        [[maybe_unused]] const std::string& mine = {}) {
#if MOONWALK_TRAIN_MPI
  if (!job.parallel()) return;
  if (const int r = moonwalk::mpi::first_rank_differing(MPI_COMM_WORLD, value); r >= 0)
    throw moonwalk::Error(cat("rank ", r, "'s ", what, " differs from rank 0's",
                              mine.empty() ? std::string() : cat(" (rank ", job.rank, " read ", mine, ")")));
#endif
}

/// Rank 0's values on every rank.
void broadcast([[maybe_unused]] moonwalk::Vector<double>& v) {
#if MOONWALK_TRAIN_MPI
  if (job.parallel()) moonwalk::mpi::broadcast(v, MPI_COMM_WORLD);
#endif
}

/// v ← Σ over ranks, added in rank order (the same bits on every rank).
void sum_over_ranks([[maybe_unused]] std::span<double> v) {
#if MOONWALK_TRAIN_MPI
  if (job.parallel()) moonwalk::mpi::sum_in_rank_order(MPI_COMM_WORLD, v);
#endif
}

/// Samples [lo, hi) of n: rank q's share of a batch (or of the test set).
std::pair<Index, Index> share(Index n, int q) { return {n * q / job.ranks, n * (q + 1) / job.ranks}; }

/// A hash of a data set's samples and labels (every rank must read the same).
std::uint64_t hash_of(const moonwalk::data::LabelledImages& set) {
  std::uint64_t h = hash_of(&set.count, sizeof set.count);
  h = hash_of(set.pixels.data(), set.pixels.size() * sizeof(set.pixels[0]), h);
  return hash_of(set.labels.data(), set.labels.size() * sizeof(set.labels[0]), h);
}

/// The options every rank must share (paths excepted: each host may keep its own copy of the data).
std::string shared_options(const Options& o) {
  return cat(o.spec, '|', o.schedule, '|', o.epochs, '|', o.batch, '|', o.optimizer, '|', o.lr, '|',
             o.momentum, '|', o.weight_decay, '|', o.lr_schedule, '|', o.seed, '|', o.dtype, '|',
             o.train_limit, '|', o.test_limit, '|', o.rebuild_inputs, '|', o.budget, '|', o.augment, '|',
             o.deterministic, '|', o.bucket_bytes, '|', o.resume.empty());
}

// ---- training -------------------------------------------------------------------------

/// Under mpirun: what the gradient all-reduce did over the run.
struct CommTotals {
  double seconds = 0;       // in finish(): not hidden behind the steps' computation
  double step_seconds = 0;  // the steps' computation (begin() to finish())
  double window = 0;        // of which after the first bucket started: what communication can hide behind
  std::size_t buckets = 0, started_early = 0, resent = 0, bucket_count = 0;
  std::size_t parameter_resyncs = 0;  // epochs whose ranks' parameters had drifted apart
};

struct EpochTotals {
  double loss_sum = 0;
  Index batches = 0;
  std::size_t residual_bytes = 0, working_bytes = 0;
  double predicted_working_bytes = 0;  // planned: its plan's working set
  double max_error = 0;
  std::size_t fallbacks = 0, untrusted = 0;
};

template <class S>
struct Evaluation {
  double loss = 0, accuracy = 0;
};

/// Test loss and accuracy over the set, in evaluation mode (core/step.hpp);
/// under mpirun each rank evaluates its share of the set and the sums are
/// added over the ranks.
template <class S>
Evaluation<S> evaluate(Network<S>& net, const moonwalk::data::LabelledImages& set,
                       const moonwalk::data::Normalization& norm) {
  const moonwalk::Evaluating<Network<S>> evaluation_mode(net);  // dropout off, BatchNorm's running statistics
  const Index chunk = 1000;
  Matrix<S> x;
  std::vector<Index> y;
  std::vector<Index> idx;
  double loss = 0;
  Index correct = 0;
  const moonwalk::SoftmaxCrossEntropy<S> xent;
  const auto [first, last] = share(set.count, job.rank);
  for (Index start = first; start < last; start += chunk) {
    const Index n = std::min(chunk, last - start);
    idx.resize(static_cast<std::size_t>(n));
    for (Index j = 0; j < n; ++j) idx[static_cast<std::size_t>(j)] = start + j;
    moonwalk::data::gather<S>(set, idx, norm, x, y);
    const Matrix<S> out = net.forward(x);
    loss += static_cast<double>(xent.value(out, y)) * static_cast<double>(n);
    for (Index j = 0; j < n; ++j) {
      Index arg = 0;
      out.col(j).maxCoeff(&arg);
      correct += arg == y[static_cast<std::size_t>(j)];
    }
  }
  double sums[2] = {loss, static_cast<double>(correct)};
  sum_over_ranks(sums);
  const double count = static_cast<double>(std::max<Index>(1, set.count));
  return {sums[0] / count, sums[1] / count};
}

/// Adam or SGD behind one interface (state() / load_state() for checkpoints).
template <class S>
struct AnyOptimizer {
  std::string name;
  moonwalk::Adam<S> adam;
  moonwalk::Sgd<S> sgd;
  double base_lr() const { return name == "adam" ? adam.lr : sgd.lr; }
  std::size_t steps() const { return name == "adam" ? adam.steps() : sgd.steps(); }
  void step(Network<S>& net, double lr) { name == "adam" ? adam.step(net, lr) : sgd.step(net, lr); }
  moonwalk::Vector<double> state() const { return name == "adam" ? adam.state() : sgd.state(); }
  void load_state(Network<S>& net, const moonwalk::Vector<double>& s) {
    name == "adam" ? adam.load_state(net, s) : sgd.load_state(net, s);
    moonwalk::set_step(net, steps());  // a resumed run continues the dropout stream where it stopped
  }
};

template <class S>
int train(const Options& o) {
  const auto t_start = std::chrono::steady_clock::now();
  if (o.threads > 0) Eigen::setNbThreads(o.threads);
#if MOONWALK_TRAIN_MPI
  // Ranks sharing a host share its cores.
  if (job.parallel()) {
    const int here = moonwalk::mpi::ranks_on_this_host(MPI_COMM_WORLD);  // (collective: every rank asks)
    if (o.threads == 0)
      Eigen::setNbThreads(std::max(1, static_cast<int>(std::thread::hardware_concurrency()) / here));
  }
#endif
  const int threads = Eigen::nbThreads();
  if (o.batch % job.ranks != 0)
    throw UsageError(cat("--batch ", o.batch, " does not divide among ", job.ranks,
                         " ranks: the global batch must be a multiple of the number of ranks"));
  same_on_every_rank(hash_of(shared_options(o).data(), shared_options(o).size()),
                     "command line (options other than paths)");
  // Outputs written only after an epoch: refuse an unwritable path now, not after the training.
  if (job.root() && !o.save.empty()) check_writable("--save", o.save);
  if (job.root() && !o.log.empty()) check_writable("--log", o.log);

  // Data.
  auto data = moonwalk::data::load_fashion_mnist(o.data);
  for (const auto* set : {&data.train, &data.test}) {
    // rows·cols from a file header: multiplied without signed overflow.
    Index pixels = 0;
    if (__builtin_mul_overflow(set->shape.c, set->shape.h, &pixels) ||
        __builtin_mul_overflow(pixels, set->shape.w, &pixels))
      throw moonwalk::data::DataError(cat(set->source, ": images of ", set->shape.h, " x ", set->shape.w,
                                          " pixels: rows x cols overflows (corrupt header?)"));
  }
  if (data.train.count == 0)
    throw moonwalk::data::DataError(cat(data.train.source, ": the training set is empty (0 samples)"));
  if (data.test.count == 0)
    throw moonwalk::data::DataError(
        cat(data.test.source, ": the test set is empty (0 samples): there would be no test accuracy"));
  const moonwalk::data::LabelledImages train_set = moonwalk::data::head(data.train, o.train_limit);
  const moonwalk::data::LabelledImages test_set = moonwalk::data::head(data.test, o.test_limit);
  data = {};
  // Every rank must train on the same samples (a damaged or other copy of the files is refused here).
  same_on_every_rank(hash_of(train_set), "training data", train_set.source);
  same_on_every_rank(hash_of(test_set), "test data", test_set.source);
  const moonwalk::data::Normalization norm = moonwalk::data::normalization_of(train_set);

  // Model.
  Network<S> net = moonwalk::parse_network<S>(o.spec, o.seed);
  const Index features = train_set.shape.c * train_set.shape.h * train_set.shape.w;
  if (net.in_features() != features || net.out_features() != train_set.classes)
    throw moonwalk::ShapeError(cat("network '", o.spec, "' maps ", net.in_features(), " inputs to ",
                                   net.out_features(), " outputs; the data needs ", features, " -> ",
                                   train_set.classes));
  const Index params = moonwalk::num_parameters(net);

  // Optimizer and learning-rate schedule.
  AnyOptimizer<S> opt;
  opt.name = o.optimizer;
  opt.adam.lr = o.lr;
  opt.adam.weight_decay = o.weight_decay;
  opt.sgd.lr = o.lr;
  opt.sgd.momentum = o.momentum;
  opt.sgd.weight_decay = o.weight_decay;
  // A batch larger than the training set is the whole set (so at least one step per epoch).
  const Index batch = std::min(o.batch, train_set.count);
  if (batch < o.batch && job.root())
    std::fprintf(stderr,
                 "moonwalk-train: note: --batch %lld is larger than the training set: batches of %lld\n",
                 static_cast<long long>(o.batch), static_cast<long long>(batch));
  const Index steps_per_epoch = train_set.count / batch + (train_set.count % batch != 0 ? 1 : 0);
  Index all_steps = 0;
  if (__builtin_mul_overflow(steps_per_epoch, static_cast<Index>(o.epochs), &all_steps))
    throw UsageError(cat("--epochs ", o.epochs, " x ", steps_per_epoch, " steps per epoch: too many steps"));
  const std::size_t total_steps = static_cast<std::size_t>(std::max<Index>(1, all_steps));
  auto lr_factor = [&](std::size_t step) {
    if (o.lr_schedule == "cosine") return moonwalk::CosineLR{.total_steps = total_steps}.factor(step);
    if (o.lr_schedule == "step") {
      const double s = static_cast<double>(step) / static_cast<double>(total_steps);
      return s < 0.5 ? 1.0 : s < 0.75 ? 0.1 : 0.01;
    }
    return 1.0;
  };

  // Resume.
  int start_epoch = 0;
  if (!o.resume.empty() && job.root()) {
    const auto ck = moonwalk::io::load_checkpoint(o.resume);
    auto expect = [&](const char* key, const std::string& want) {
      const std::string& have = ck.at(key, o.resume);
      if (have != want)
        throw moonwalk::io::CheckpointError(
            cat(o.resume, ": checkpoint ", key, " is '", have, "' but this run has '", want, "'"));
    };
    expect("spec", o.spec);
    expect("dtype", o.dtype);
    expect("optimizer", o.optimizer);
    expect("augment", o.augment);
    if (ck.parameters.size() != params)
      throw moonwalk::io::CheckpointError(
          cat(o.resume, ": checkpoint has ", ck.parameters.size(), " parameters, the network has ", params));
    moonwalk::set_parameters(net, ck.parameters.template cast<S>());
    if (const auto want = moonwalk::get_buffers(net).size(); ck.buffers.size() != want)
      throw moonwalk::io::CheckpointError(cat(o.resume, ": checkpoint has ", ck.buffers.size(),
                                              " layer buffer values (running statistics), the network has ",
                                              want));
    moonwalk::set_buffers(net, ck.buffers);
    moonwalk::io::load_optimizer_state(o.resume, opt, net, ck.optimizer_state);  // errors name the file
    start_epoch = static_cast<int>(ck.integer("epoch", o.resume, 0, std::numeric_limits<int>::max()));
  }
  // Rank 0's parameters, optimizer state and epoch on every rank (initialised from
  // the same seed, or read from the checkpoint, which rank 0 alone reads).
  if (job.parallel()) {
    moonwalk::Vector<double> theta = moonwalk::get_parameters(net).template cast<double>();
    moonwalk::Vector<double> running = moonwalk::get_buffers(net);
    moonwalk::Vector<double> epoch_and_state = opt.state();
    epoch_and_state.conservativeResize(epoch_and_state.size() + 1);
    epoch_and_state[epoch_and_state.size() - 1] = start_epoch;
    broadcast(theta);
    broadcast(running);
    broadcast(epoch_and_state);
    moonwalk::set_parameters(net, theta.cast<S>());
    moonwalk::set_buffers(net, running);
    start_epoch = static_cast<int>(epoch_and_state[epoch_and_state.size() - 1]);
    if (!o.resume.empty() && !job.root())
      opt.load_state(net, epoch_and_state.head(epoch_and_state.size() - 1));
  }

  moonwalk::ScheduleChoice choice{
      .name = o.schedule, .rebuild_inputs = o.rebuild_inputs, .seed = o.seed, .budget = o.budget};
  const moonwalk::SoftmaxCrossEntropy<S> loss;

  if ((o.schedule == "forward" || o.schedule == "pure") && job.root())
    std::fprintf(
        stderr,
        "moonwalk-train: note: %s costs %lld jvp passes per step (one per %s): expect it to be slow\n",
        o.schedule.c_str(), static_cast<long long>(o.schedule == "forward" ? params : features),
        o.schedule == "forward" ? "parameter" : "input feature");

  // What backprop would keep between its passes on one batch (the yardstick
  // for the schedule's residual_bytes), measured on a copy: a training-mode
  // pass folds BatchNorm's batch statistics into its running ones.
  std::size_t backprop_bytes = 0;
  {
    Network<S> probe = net;
    std::vector<Index> idx(static_cast<std::size_t>(std::max<Index>(1, batch / job.ranks)));
    for (std::size_t j = 0; j < idx.size(); ++j) idx[j] = static_cast<Index>(j);
    Matrix<S> x;
    std::vector<Index> y;
    moonwalk::data::gather<S>(train_set, idx, norm, x, y);
    backprop_bytes = moonwalk::gradient(moonwalk::Backprop{}, probe, x, loss, y).stats.residual_bytes;
  }

  CsvLog log(job.root() ? o.log : std::string(),
             "epoch,schedule,train_loss,test_loss,test_accuracy,seconds,samples_per_second,residual_bytes,"
             "backprop_residual_bytes,peak_rss_bytes,max_error_estimate,fallbacks,untrusted_steps");
  if (!o.resume.empty()) log.keep_existing(start_epoch);
  std::ofstream step_log;
  if (!o.step_log.empty() && job.root()) {
    step_log.open(o.step_log, start_epoch > 0 ? std::ios::app : std::ios::trunc);
    if (!step_log) throw moonwalk::Error(cat(o.step_log, ": cannot open for writing"));
    if (start_epoch == 0) step_log << "step,epoch,schedule,loss,error_estimate,residual_bytes,fallbacks\n";
    check_stream(step_log, o.step_log);
  }

  Progress progress(!o.quiet && job.root());
#if MOONWALK_TRAIN_MPI
  // Under mpirun: the gradients all-reduced in buckets as the step finishes layers.
  std::optional<moonwalk::mpi::GradientAllreduce<Network<S>>> reduce;
  if (job.parallel())
    reduce.emplace(MPI_COMM_WORLD,
                   moonwalk::mpi::AllreduceOptions{.bucket_bytes = o.bucket_bytes,
                                                   .deterministic = o.deterministic,
                                                   .order = moonwalk::mpi::fill_order(o.schedule)});
#endif
  CommTotals comm;
  Matrix<S> x;
  std::vector<Index> y;
  EpochTotals run;           // over the whole run
  double train_seconds = 0;  // the epochs' training loops (no loading, no evaluation)
  Index steps_run = 0;
  double last_train_loss = std::numeric_limits<double>::quiet_NaN();
  Evaluation<S> eval{};
  bool evaluated = false;
  // Filled in place by every step (gradient_into). The optimizer reads ∂ℓ/∂θ
  // from the layers: no flat copy (GradientResult::flat_gradient).
  moonwalk::GradientResult<S> r;
  r.flat_gradient = false;
  for (int epoch = start_epoch; epoch < o.epochs; ++epoch) {
    const auto t_epoch = std::chrono::steady_clock::now();
    const std::vector<Index> order = moonwalk::data::shuffled_indices(
        train_set.count, o.seed * 1000003u + static_cast<std::uint64_t>(epoch));
    EpochTotals ep;
    for (Index b = 0; b < steps_per_epoch; ++b) {
      const Index start = b * batch, n = std::min(batch, train_set.count - start);
      // This rank's share of the global batch: samples [lo, hi) of it.
      const auto [lo, hi] = share(n, job.rank);
      if (hi > lo) {
        moonwalk::data::gather<S>(
            train_set, std::span<const Index>(order.data() + start + lo, static_cast<std::size_t>(hi - lo)),
            norm, x, y);
        const std::uint64_t draw =
            (o.seed * 1000003u + static_cast<std::uint64_t>(epoch)) * 0x9e3779b97f4a7c15ULL +
            static_cast<std::uint64_t>(b);
        if (o.augment == "flip" || o.augment == "shift")
          moonwalk::data::random_flips(x, train_set.shape, draw, lo);
        if (o.augment == "shift")
          moonwalk::data::random_shifts(x, train_set.shape, Index{2},
                                        static_cast<S>(-norm.mean / norm.stddev),
                                        draw ^ 0xa5a5a5a5a5a5a5a5ULL, lo);
      }
      auto local_step = [&] {
        moonwalk::with_schedule(choice, net.size(), [&](const auto& schedule) {
          moonwalk::gradient_into(schedule, net, x, loss, y, r);
        });
      };
#if MOONWALK_TRAIN_MPI
      if (reduce) {
        reduce->begin(net, static_cast<double>(hi - lo) / static_cast<double>(n));
        if (hi > lo) {
          moonwalk::ObserveGradients watch(*reduce);
          local_step();
        } else {  // (a last batch smaller than the number of ranks: nothing to add)
          moonwalk::zero_gradients(net);
          r.loss = 0;
          r.stats = moonwalk::Stats{};
        }
        reduce->finish(r);
        const auto& f = reduce->figures();
        comm.seconds += f.finish_seconds;
        comm.step_seconds += f.step_seconds;
        comm.window += f.started_early > 0 ? f.step_seconds - f.first_start_seconds : 0.0;
        comm.buckets += f.buckets;
        comm.started_early += f.started_early;
        comm.resent += f.resent;
        comm.bucket_count = f.buckets;
      } else
#endif
        local_step();
      // Nothing non-finite reaches the parameters: the run stops at the step that produced it.
      const std::size_t step_number = opt.steps() + 1;
      const auto where = [&] {
        return cat("epoch ", epoch + 1, ", step ", b + 1, " of ", steps_per_epoch, " (optimizer step ",
                   step_number, ")");
      };
      if (!std::isfinite(static_cast<double>(r.loss)))
        throw moonwalk::Error(cat("training diverged: loss is ", r.loss, " at ", where(), " (not finite: ",
                                  moonwalk::to_string(r.stats.non_finite), "; try a smaller --lr)"));
      // (The layers' gradient, not only the verdict: under mpirun it is the
      // all-reduced sum, which judge() saw only this rank's share of.)
      if (r.stats.non_finite != moonwalk::NonFinite::none || !moonwalk::gradients_finite(net))
        throw moonwalk::Error(cat("training diverged: the gradient is not finite at ", where(), " (loss ",
                                  r.loss, "; try a smaller --lr)"));
      const double lr = opt.base_lr() * lr_factor(opt.steps());
      opt.step(net, lr);
      if (!moonwalk::parameters_finite(net))
        throw moonwalk::Error(cat("training diverged: the update at ", where(),
                                  " made a parameter non-finite (learning rate ", lr,
                                  "; try a smaller --lr)"));
#if MOONWALK_TRAIN_MPI
      // BatchNorm's running statistics: each rank folded its own shard's in;
      // every rank keeps their weighted mean (what evaluation and checkpoints use).
      if (reduce)
        moonwalk::mpi::average_buffers(
            net, MPI_COMM_WORLD, static_cast<double>(hi - lo) / static_cast<double>(n), o.deterministic);
#endif

      const auto& st = r.stats;
      ep.loss_sum += static_cast<double>(r.loss);
      ++ep.batches;
      ep.residual_bytes = std::max(ep.residual_bytes, st.residual_bytes);
      ep.working_bytes = std::max(ep.working_bytes, st.working_bytes);
      if (const auto it = st.figures.find("predicted_working_bytes"); it != st.figures.end())
        ep.predicted_working_bytes = std::max(ep.predicted_working_bytes, it->second);
      ep.max_error = max_or_nan(ep.max_error, st.error_estimate);
      ep.fallbacks += st.fallbacks;
      // Untrusted: the schedule says its estimate missed the tolerance, or it has no usable estimate.
      ep.untrusted += !st.within_tolerance || std::isnan(st.error_estimate) ? 1 : 0;
      if (step_log.is_open() && job.root()) {
        step_log << opt.steps() << ',' << epoch + 1 << ',' << o.schedule << ',' << full_precision(r.loss)
                 << ',' << json_number(st.error_estimate) << ',' << st.residual_bytes << ',' << st.fallbacks
                 << '\n';
        check_stream(step_log, o.step_log);
      }
      const double secs = seconds_since(t_epoch);
      progress.draw(cat(
          "epoch ", epoch + 1, "/", o.epochs, " ", bar(b + 1, steps_per_epoch), " ", b + 1, "/",
          steps_per_epoch, "  loss ", json_number(ep.loss_sum / static_cast<double>(ep.batches)), "  ",
          static_cast<long long>(static_cast<double>(start + n) / std::max(secs, 1e-9)), " samples/s  kept ",
          human_bytes(static_cast<double>(st.residual_bytes)), "  err ", json_number(st.error_estimate)));
    }
    const double epoch_seconds = seconds_since(t_epoch);
    train_seconds += epoch_seconds;
    steps_run += steps_per_epoch;
    progress.finish();
    eval = evaluate(net, test_set, norm);
    evaluated = true;
    if (!std::isfinite(eval.loss))
      throw moonwalk::Error(cat("training diverged: the test loss is ", eval.loss, " after epoch ", epoch + 1,
                                " (try a smaller --lr)"));
    last_train_loss = ep.loss_sum / static_cast<double>(std::max<Index>(1, ep.batches));
    run.residual_bytes = std::max(run.residual_bytes, ep.residual_bytes);
    run.working_bytes = std::max(run.working_bytes, ep.working_bytes);
    run.predicted_working_bytes = std::max(run.predicted_working_bytes, ep.predicted_working_bytes);
    run.max_error = max_or_nan(run.max_error, ep.max_error);
    run.fallbacks += ep.fallbacks;
    run.untrusted += ep.untrusted;
    // Every rank must hold the same parameters: an MPI sum whose bits differ
    // between ranks would let them drift apart. Rank 0's win, and it is said.
    if (job.parallel()) {
      const moonwalk::Vector<S> theta = moonwalk::get_parameters(net);
      std::uint64_t h = hash_of(theta.data(), static_cast<std::size_t>(theta.size()) * sizeof(S));
      double differs[1] = {0};
#if MOONWALK_TRAIN_MPI
      differs[0] = moonwalk::mpi::first_rank_differing(MPI_COMM_WORLD, h) >= 0 ? 1 : 0;
#endif
      if (differs[0] != 0) {
        moonwalk::Vector<double> t = theta.template cast<double>();
        broadcast(t);
        moonwalk::set_parameters(net, t.cast<S>());
        ++comm.parameter_resyncs;
        if (job.root())
          std::fprintf(stderr,
                       "moonwalk-train: note: the ranks' parameters differed after epoch %d: rank 0's "
                       "copied to every rank (--deterministic avoids it)\n",
                       epoch + 1);
      }
    }
    if (!o.quiet && job.root())
      std::fprintf(stderr,
                   "epoch %d/%d: train loss %.4f, test loss %.4f, test accuracy %.4f, %.1f s, kept %s "
                   "(backprop %s), working peak %s, max error estimate %s, fallbacks %zu\n",
                   epoch + 1, o.epochs, last_train_loss, eval.loss, eval.accuracy, epoch_seconds,
                   human_bytes(static_cast<double>(ep.residual_bytes)).c_str(),
                   human_bytes(static_cast<double>(backprop_bytes)).c_str(),
                   ep.working_bytes > 0 ? human_bytes(static_cast<double>(ep.working_bytes)).c_str() : "n/a",
                   json_number(ep.max_error).c_str(), ep.fallbacks);
    log.add(cat(epoch + 1, ",", o.schedule, ",", json_number(last_train_loss), ",", json_number(eval.loss),
                ",", json_number(eval.accuracy), ",", json_number(epoch_seconds), ",",
                json_number(static_cast<double>(train_set.count) / epoch_seconds), ",", ep.residual_bytes,
                ",", backprop_bytes, ",", peak_rss_bytes(), ",", json_number(ep.max_error), ",", ep.fallbacks,
                ",", ep.untrusted));
    log.flush();
    if (step_log.is_open()) {
      step_log.flush();
      check_stream(step_log, o.step_log);
    }
    if (!o.save.empty() && job.root()) {
      moonwalk::io::Checkpoint ck;
      ck.meta = {{"model", o.model},
                 {"spec", o.spec},
                 {"dtype", o.dtype},
                 {"optimizer", o.optimizer},
                 {"augment", o.augment},
                 {"schedule", o.schedule},
                 {"epoch", std::to_string(epoch + 1)},
                 {"seed", std::to_string(o.seed)}};
      ck.parameters = moonwalk::get_parameters(net).template cast<double>();
      ck.buffers = moonwalk::get_buffers(net);
      ck.optimizer_state = opt.state();
      moonwalk::io::save_checkpoint(o.save, ck);
    }
  }
  if (!evaluated) eval = evaluate(net, test_set, norm);  // nothing left to train (e.g. resumed at the end)
  if (step_log.is_open()) {
    step_log.close();
    check_stream(step_log, o.step_log);
  }

  const double seconds = seconds_since(t_start);
  if (!job.root()) return 0;
  if (!o.quiet) {
    std::fprintf(stderr, "test accuracy %.4f after %d epoch(s) with %s (%.1f s, %d thread(s)).\n",
                 eval.accuracy, o.epochs, o.schedule.c_str(), seconds, threads);
    if (o.schedule != "backprop" && run.residual_bytes > 0)
      std::fprintf(stderr, "bytes kept between passes per step: %s (%s) vs %s (backprop) = 1/%.0f\n",
                   human_bytes(static_cast<double>(run.residual_bytes)).c_str(), o.schedule.c_str(),
                   human_bytes(static_cast<double>(backprop_bytes)).c_str(),
                   static_cast<double>(backprop_bytes) / static_cast<double>(run.residual_bytes));
    if (run.working_bytes > 0)
      std::fprintf(stderr,
                   "peak working bytes per step (engine-accounted): %s; peak RSS of the process: %s\n",
                   human_bytes(static_cast<double>(run.working_bytes)).c_str(),
                   human_bytes(static_cast<double>(peak_rss_bytes())).c_str());
    if (job.parallel())
      std::fprintf(stderr,
                   "data parallel: %d ranks, %zu all-reduce bucket(s) per step, %.0f%% of them started while "
                   "the step ran, %.2f s of communication not hidden (%s)\n",
                   job.ranks, comm.bucket_count,
                   comm.buckets > 0
                       ? 100.0 * static_cast<double>(comm.started_early) / static_cast<double>(comm.buckets)
                       : 0.0,
                   comm.seconds, o.deterministic ? "deterministic" : "MPI's sum");
    if (run.predicted_working_bytes > 0)
      std::fprintf(stderr,
                   "plan: predicted working bytes %s (measured %s, product scratch included), budget %s\n",
                   human_bytes(run.predicted_working_bytes).c_str(),
                   human_bytes(static_cast<double>(run.working_bytes)).c_str(),
                   o.budget > 0 ? human_bytes(static_cast<double>(o.budget)).c_str() : "unlimited");
  }
  std::cout << "{\"model\":\"" << o.model << "\",\"schedule\":\"" << o.schedule
            << "\",\"epochs\":" << o.epochs << ",\"test_accuracy\":" << json_number(eval.accuracy)
            << ",\"test_loss\":" << json_number(eval.loss)
            << ",\"train_loss\":" << json_number(last_train_loss) << ",\"seconds\":" << json_number(seconds)
            << ",\"peak_rss_bytes\":" << peak_rss_bytes() << ",\"residual_bytes\":" << run.residual_bytes
            << ",\"backprop_residual_bytes\":" << backprop_bytes << ",\"working_bytes\":" << run.working_bytes
            << ",\"predicted_working_bytes\":"
            << (run.predicted_working_bytes > 0 ? json_number(run.predicted_working_bytes)
                                                : std::string("null"))
            << ",\"budget_bytes\":" << o.budget << ",\"max_error_estimate\":" << json_number(run.max_error)
            << ",\"fallbacks\":" << run.fallbacks << ",\"untrusted_steps\":" << run.untrusted
            << ",\"parameters\":" << params << ",\"batch\":" << batch
            << ",\"train_samples\":" << train_set.count << ",\"test_samples\":" << test_set.count
            << ",\"threads\":" << threads << ",\"dtype\":\"" << o.dtype << "\",\"augment\":\"" << o.augment
            << "\",\"ranks\":" << job.ranks << ",\"deterministic\":" << (o.deterministic ? "true" : "false")
            << ",\"bucket_bytes\":" << o.bucket_bytes << ",\"allreduce_buckets\":" << comm.bucket_count
            << ",\"buckets_started_early\":"
            << json_number(comm.buckets > 0
                               ? static_cast<double>(comm.started_early) / static_cast<double>(comm.buckets)
                               : 0.0)
            << ",\"exposed_communication_seconds\":" << json_number(comm.seconds)
            << ",\"step_compute_seconds\":" << json_number(comm.step_seconds)
            << ",\"communication_window_seconds\":" << json_number(comm.window)
            << ",\"parameter_resyncs\":" << comm.parameter_resyncs
            << ",\"train_seconds\":" << json_number(train_seconds) << ",\"steps\":" << steps_run << "}"
            << std::endl;
  check_stream(std::cout, "standard output (the result line)");
  return 0;
}

}  // namespace

int main(int argc, char** argv) {
  // Keep freed blocks for reuse instead of returning them to the kernel: the
  // engine allocates the same large matrices every step, and glibc's default
  // (mmap above 128 KiB, trim above 128 KiB) turns each of them into fresh
  // page faults (measured: ~25% of a mixed step on the MLP). Bench programs
  // set the same, so every schedule runs under one allocator setting.
  mallopt(M_MMAP_THRESHOLD, 512 << 20);
  mallopt(M_TRIM_THRESHOLD, 1024 << 20);
#if MOONWALK_TRAIN_MPI
  // Started by mpirun: one rank of a data-parallel job. A rank that fails
  // prints its error and ends the job (MPI_Abort): no rank is left waiting.
  std::optional<moonwalk::mpi::Session> mpi;
  if (moonwalk::mpi::launched()) {
    mpi.emplace(argc, argv);
    job.rank = moonwalk::mpi::rank(MPI_COMM_WORLD);
    job.ranks = moonwalk::mpi::size(MPI_COMM_WORLD);
  }
  // `line` is what a single process prints; a rank of a job names itself.
  const auto fail = [&](const std::string& line, const std::string& message, int code) {
    if (job.parallel()) moonwalk::mpi::abort_job(MPI_COMM_WORLD, "moonwalk-train", message, code);
    std::cerr << line;
    return code;
  };
#else
  const auto fail = [](const std::string& line, const std::string&, int code) {
    std::cerr << line;
    return code;
  };
#endif
  Options o;
  try {
    o = parse_options(argc, argv);
  } catch (const UsageError& e) {
    return fail(cat("moonwalk-train: ", e.what(), "\n\n", kUsage), e.what(), 2);
  }
  try {
    return o.dtype == "float" ? train<float>(o) : train<double>(o);
  } catch (const moonwalk::SpecError& e) {
    return fail(cat("moonwalk-train: bad --net: ", e.what(), "\n"), cat("bad --net: ", e.what()), 2);
  } catch (const UsageError& e) {
    return fail(cat("moonwalk-train: ", e.what(), "\n"), e.what(), 2);
  } catch (const std::exception& e) {
    return fail(cat("\nmoonwalk-train: error: ", e.what(), "\n"), e.what(), 1);
  }
}
