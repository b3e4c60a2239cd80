// Moonwalk — data-parallel training over MPI: every rank runs the same
// network on its shard of each global batch, and the gradients, the loss and
// the error estimate are combined so that every rank holds the global batch's
// figures before its optimizer step.
//
// Not part of <moonwalk/moonwalk.hpp>: include it and link moonwalk::mpi
// (CMake option MOONWALK_MPI), which brings MPI::MPI_CXX.
//
//   moonwalk::mpi::Session mpi(argc, argv);              // MPI_Init_thread … MPI_Finalize
//   moonwalk::mpi::broadcast_parameters(net, MPI_COMM_WORLD);
//   moonwalk::mpi::GradientAllreduce<Network<float>> reduce(MPI_COMM_WORLD, {.bucket_bytes = 1 << 20});
//   for (each global batch of n samples; this rank's shard has n_r of them) {
//     reduce.begin(net, double(n_r) / double(n));
//     {
//       moonwalk::ObserveGradients watch(reduce);         // buckets start as layers finish
//       moonwalk::gradient_into(schedule, net, x_r, loss, y_r, r);
//     }
//     reduce.finish(r);                                  // g ← Σ_r (n_r/n) g_r everywhere
//     optimizer.step(net, lr);
//     mpi::average_buffers(net, MPI_COMM_WORLD, double(n_r) / double(n));  // BatchNorm's statistics
//   }
//
// The loss is a mean over samples, so the global batch's gradient is
// g = Σ_r (n_r/n) g_r, with g_r the gradient of rank r's shard: each rank
// scales its gradient by its share n_r/n (1/N for equal shards) and the
// shares are summed. The flat gradient is cut into buckets of whole layers
// (at most `bucket_bytes` unless one layer is larger), laid out in the order
// the schedule finishes layers (FillOrder: a forward sweep finishes the first
// layers first, backprop the last). A bucket's reduction starts, with
// MPI_Iallreduce, as soon as every layer in it has been announced
// (core/gradient_observer.hpp) and every bucket before it has started, so the
// communication of the first buckets overlaps the computation of the rest;
// finish() starts what is left, waits, and writes the sums back into the
// layers. Buckets start in one fixed order on every rank, as MPI requires of
// collectives, whatever order a rank's layers finish in.
//
// An announcement is a hint: a step that falls back recomputes gradients
// after they were sent. finish() hashes every sent bucket's gradient again
// and reduces, once more, every bucket that changed on any rank, so the
// result is the sum of the gradients the steps returned, whatever the hints.
//
// Deterministic mode (`deterministic = true`) gathers every rank's bucket
// (MPI_Iallgather) and adds them in rank order 0, 1, …, N−1 on every rank:
// the same bits on every rank and from run to run with the same N. The
// default sums with MPI's own reduction, whose order is the MPI library's.
#pragma once

// The C API only: no MPI-2 C++ bindings (deprecated, and noisy under -Wextra).
#ifndef OMPI_SKIP_MPICXX
#define OMPI_SKIP_MPICXX 1
#endif
#ifndef MPICH_SKIP_MPICXX
#define MPICH_SKIP_MPICXX 1
#endif
#include <mpi.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <span>
#include <string>
#include <string_view>
#include <type_traits>
#include <vector>

#include "moonwalk/core/gradient_observer.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/fidelity/tolerance.hpp"
#include "moonwalk/nets/parameters.hpp"
#include "moonwalk/schedules/result.hpp"

namespace moonwalk::mpi {

/// An MPI call failed, or the ranks disagree on what they were given.
class Error : public moonwalk::Error {
 public:
  using moonwalk::Error::Error;
};

/// Throws mpi::Error naming `what` and MPI's own message when rc is not MPI_SUCCESS.
inline void check(int rc, const char* what) {
  if (rc == MPI_SUCCESS) return;
  char msg[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(rc, msg, &len) != MPI_SUCCESS) len = 0;
  throw Error(detail::cat(what, " failed: ", std::string(msg, static_cast<std::size_t>(len))));
}

template <class S>
MPI_Datatype datatype() {
  static_assert(std::is_same_v<S, float> || std::is_same_v<S, double>, "moonwalk::mpi: float or double");
  return std::is_same_v<S, float> ? MPI_FLOAT : MPI_DOUBLE;
}

inline int rank(MPI_Comm comm) {
  int r = 0;
  check(MPI_Comm_rank(comm, &r), "MPI_Comm_rank");
  return r;
}

inline int size(MPI_Comm comm) {
  int n = 0;
  check(MPI_Comm_size(comm, &n), "MPI_Comm_size");
  return n;
}

/// Did an MPI launcher (mpirun, mpiexec, srun) start this process? A program
/// run on its own then skips MPI altogether (no singleton start-up).
inline bool launched() {
  for (const char* v : {"OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "PMI_RANK", "SLURM_PROCID"})
    if (std::getenv(v) != nullptr) return true;
  return false;
}

/// MPI for the lifetime of a program: MPI_Init_thread (the calling thread
/// alone talks to MPI: MPI_THREAD_FUNNELED) with errors returned, not fatal,
/// on MPI_COMM_WORLD so that check() can name them; MPI_Finalize at the end.
class Session {
 public:
  Session(int& argc, char**& argv) {
    int provided = 0;
    check(MPI_Init_thread(&argc, &argv, MPI_THREAD_FUNNELED, &provided), "MPI_Init_thread");
    check(MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN), "MPI_Comm_set_errhandler");
  }
  ~Session() { MPI_Finalize(); }
  Session(const Session&) = delete;
  Session& operator=(const Session&) = delete;
};

/// Prints "<program>: rank R of N: error: <message>" on stderr and ends the
/// whole job (MPI_Abort): a failing rank never leaves the others waiting in
/// a collective.
[[noreturn]] inline void abort_job(MPI_Comm comm, std::string_view program, std::string_view message,
                                   int code = 1) {
  int r = -1, n = 0;
  MPI_Comm_rank(comm, &r);
  MPI_Comm_size(comm, &n);
  std::fprintf(stderr, "\n%.*s: rank %d of %d: error: %.*s\n", static_cast<int>(program.size()),
               program.data(), r, n, static_cast<int>(message.size()), message.data());
  std::fflush(stderr);
  MPI_Abort(comm, code);
  std::abort();  // (MPI_Abort does not return)
}

/// The number of ranks on this rank's host.
inline int ranks_on_this_host(MPI_Comm comm) {
  MPI_Comm local;
  check(MPI_Comm_split_type(comm, MPI_COMM_TYPE_SHARED, 0, MPI_INFO_NULL, &local), "MPI_Comm_split_type");
  int n = 1;
  MPI_Comm_size(local, &n);
  MPI_Comm_free(&local);
  return n;
}

/// Every rank's `values`, gathered: result[r·k + j] = values_j of rank r (k = values.size(), the same on
/// every rank).
inline std::vector<double> gather_all(MPI_Comm comm, std::span<const double> values) {
  std::vector<double> all(values.size() * static_cast<std::size_t>(size(comm)));
  check(MPI_Allgather(values.data(), static_cast<int>(values.size()), MPI_DOUBLE, all.data(),
                      static_cast<int>(values.size()), MPI_DOUBLE, comm),
        "MPI_Allgather");
  return all;
}

/// v ← Σ_r v_r, added in rank order 0, 1, …, N−1 on every rank: the same bits
/// everywhere and from run to run (for a few numbers: a loss, counts).
inline void sum_in_rank_order(MPI_Comm comm, std::span<double> v) {
  const std::vector<double> all = gather_all(comm, v);
  const std::size_t n = all.size() / std::max<std::size_t>(1, v.size());
  for (std::size_t j = 0; j < v.size(); ++j) {
    double s = all[j];
    for (std::size_t r = 1; r < n; ++r) s += all[r * v.size() + j];
    v[j] = s;
  }
}

inline constexpr std::uint64_t kHashSeed = 14695981039346656037ULL;

/// A 64-bit hash of bytes, continued from `h`: FNV-1a over 8-byte words in
/// four interleaved lanes (a change detector for gradients, not a digest).
inline std::uint64_t hash_bytes(const void* data, std::size_t n, std::uint64_t h = kHashSeed) {
  constexpr std::uint64_t prime = 1099511628211ULL;
  const auto* p = static_cast<const unsigned char*>(data);
  std::uint64_t lane[4] = {h, h ^ 0x9e3779b97f4a7c15ULL, h ^ 0xbf58476d1ce4e5b9ULL,
                           h ^ 0x94d049bb133111ebULL};
  std::size_t i = 0;
  for (; i + 32 <= n; i += 32)
    for (std::size_t k = 0; k < 4; ++k) {
      std::uint64_t w = 0;
      std::memcpy(&w, p + i + 8 * k, 8);
      lane[k] = (lane[k] ^ w) * prime;
    }
  h = lane[0];
  for (std::size_t k = 1; k < 4; ++k) h = (h ^ lane[k]) * prime;
  for (; i < n; ++i) h = (h ^ p[i]) * prime;
  return h ^ (h >> 29);
}

/// The first rank whose `value` differs from root's (−1: all agree). Every rank gets the answer.
inline int first_rank_differing(MPI_Comm comm, std::uint64_t value, int root = 0) {
  const int n = size(comm);
  std::vector<std::uint64_t> all(static_cast<std::size_t>(n));
  check(MPI_Allgather(&value, 1, MPI_UINT64_T, all.data(), 1, MPI_UINT64_T, comm), "MPI_Allgather");
  for (int r = 0; r < n; ++r)
    if (all[static_cast<std::size_t>(r)] != all[static_cast<std::size_t>(root)]) return r;
  return -1;
}

/// Root's `v` on every rank (its length first).
inline void broadcast(Vector<double>& v, MPI_Comm comm, int root = 0) {
  long long n = v.size();
  check(MPI_Bcast(&n, 1, MPI_LONG_LONG, root, comm), "MPI_Bcast");
  if (v.size() != n) v.resize(static_cast<Index>(n));
  if (n > 0) check(MPI_Bcast(v.data(), static_cast<int>(n), MPI_DOUBLE, root, comm), "MPI_Bcast");
}

/// Root's θ on every rank. mpi::Error, on every rank, when a rank's network
/// has another number of parameters than root's (naming the first such rank).
template <Net N>
void broadcast_parameters(N& net, MPI_Comm comm, int root = 0) {
  using S = typename N::scalar_type;
  const Index p = num_parameters(net);
  if (const int r = first_rank_differing(comm, static_cast<std::uint64_t>(p), root); r >= 0)
    throw Error(detail::cat("broadcast_parameters: rank ", r,
                            "'s network has another number of parameters than rank ", root,
                            "'s (this rank: ", p, ")"));
  Vector<S> theta = get_parameters(net);
  if (p > 0) check(MPI_Bcast(theta.data(), static_cast<int>(p), datatype<S>(), root, comm), "MPI_Bcast");
  set_parameters(net, theta);
}

/// The layers' buffers (BatchNorm's running statistics, core/step.hpp)
/// averaged over the ranks: b ← Σ_r w_r b_r, w_r = `weight` on rank r (its
/// share n_r/n of the global batch, as GradientAllreduce::begin takes it; a
/// rank without samples gives 0). Train-mode batch statistics stay per shard
/// (no synchronised batch norm); this keeps the running statistics — what
/// evaluation and checkpoints use — the same on every rank, the weighted mean
/// of the ranks' own updates. `deterministic`: added in rank order (the same
/// bits everywhere). mpi::Error, on every rank, when the ranks' buffer counts
/// differ (checked first, so a network without buffers costs one small
/// collective).
template <Net N>
void average_buffers(N& net, MPI_Comm comm, double weight, bool deterministic = false) {
  const std::vector<std::span<double>> bufs = moonwalk::buffers(net);
  std::size_t count = 0;
  for (const auto& b : bufs) count += b.size();
  if (const int r = first_rank_differing(comm, static_cast<std::uint64_t>(count)); r >= 0)
    throw Error(detail::cat(
        "average_buffers: rank ", r,
        "'s network has another number of buffer entries than rank 0's (this rank: ", count, ")"));
  if (count == 0) return;
  std::vector<double> v;
  v.reserve(count);
  for (const auto& b : bufs)
    for (const double e : b) v.push_back(weight * e);
  if (deterministic)
    sum_in_rank_order(comm, v);
  else
    check(MPI_Allreduce(MPI_IN_PLACE, v.data(), static_cast<int>(count), MPI_DOUBLE, MPI_SUM, comm),
          "MPI_Allreduce");
  std::size_t o = 0;
  for (const auto& b : bufs)
    for (double& e : b) e = v[o++];
}

/// The order in which a schedule finishes its layers' gradients.
enum class FillOrder {
  first_to_last,  ///< a forward sweep (Moonwalk)
  last_to_first,  ///< a reverse pass (backprop, checkpointing, RevBackprop, planned)
};

/// The fill order of a schedule named as in the by-name registry: Moonwalk's
/// sweeps (mixed, pure) first to last, every other schedule last to first.
inline FillOrder fill_order(std::string_view schedule) {
  return schedule == "mixed" || schedule == "pure" ? FillOrder::first_to_last : FillOrder::last_to_first;
}

struct AllreduceOptions {
  /// Largest bucket (a layer larger than this is a bucket of its own).
  std::size_t bucket_bytes = std::size_t{1} << 20;
  /// Gather and add in rank order: bitwise the same on every rank and run.
  bool deterministic = false;
  /// The order the step's schedule finishes layers in (fill_order()).
  FillOrder order = FillOrder::last_to_first;
};

/// What the last step's reduction did.
struct AllreduceFigures {
  std::size_t buckets = 0;
  /// Buckets whose reduction started before finish(): overlapped with the step.
  std::size_t started_early = 0;
  /// Buckets reduced again because a rank's gradient changed after it was sent.
  std::size_t resent = 0;
  /// Bytes of gradient this rank contributed.
  std::size_t bytes = 0;
  /// Seconds spent in finish(): the communication the step did not hide.
  double finish_seconds = 0;
  /// Seconds from begin() to finish(): the step's computation (and what it overlapped).
  double step_seconds = 0;
  /// Seconds from begin() to the first bucket's start (the step's length when none started early).
  double first_start_seconds = 0;
};

template <Net N>
class GradientAllreduce final : public GradientObserver {
 public:
  using S = typename N::scalar_type;

  explicit GradientAllreduce(MPI_Comm comm, AllreduceOptions options = {})
      : comm_(comm), options_(options), ranks_(size(comm)) {
    if (options_.bucket_bytes == 0) throw Error("GradientAllreduce: bucket_bytes must be > 0");
  }
  GradientAllreduce(const GradientAllreduce&) = delete;
  GradientAllreduce& operator=(const GradientAllreduce&) = delete;
  ~GradientAllreduce() {
    for (Bucket& b : buckets_)
      if (b.request != MPI_REQUEST_NULL) MPI_Wait(&b.request, MPI_STATUS_IGNORE);
  }

  /// Starts a step of `net` in which this rank's shard is `weight` = n_r / n
  /// of the global batch (0 for a rank without samples). The buckets are laid
  /// out on the first step (and again if the network's storage moved); every
  /// rank must lay out the same buckets, or mpi::Error names the first that did not.
  void begin(N& net, double weight) {
    if (in_step_) throw Error("GradientAllreduce::begin: the last step was not finished");
    net_ = &net;
    weight_ = weight;
    layout(net);
    for (Bucket& b : buckets_) {
      b.pending = b.layers_with_params;
      b.started = false;
    }
    std::fill(ready_.begin(), ready_.end(), false);
    next_ = 0;
    figures_.started_early = figures_.resent = 0;
    begun_ = std::chrono::steady_clock::now();
    figures_.first_start_seconds = -1;
    in_step_ = true;
  }

  /// Layer i's gradient is complete: its bucket starts when full and next in order.
  void layer_ready(std::size_t i) override {
    if (!in_step_ || i >= ready_.size() || ready_[i] || layer_bucket_[i] < 0) return;
    ready_[i] = true;
    --buckets_[static_cast<std::size_t>(layer_bucket_[i])].pending;
    while (next_ < buckets_.size() && buckets_[next_].pending == 0) {
      start(buckets_[next_]);
      ++figures_.started_early;
      ++next_;
    }
    progress();
  }

  /// Ends the step: every layer's gradient becomes Σ_r w_r g_r (as does
  /// r.gradient when it holds the flat gradient), and on every rank
  ///
  ///   r.loss              = Σ_r w_r ℓ_r
  ///   r.stats.error_estimate = Σ_r w_r e_r ‖g_r‖∞ / ‖g‖∞   (e_r bounds ‖δg_r‖∞ / ‖g_r‖∞)
  ///   r.stats.fallbacks   = Σ_r fallbacks_r
  ///   r.stats.within_tolerance = every rank's verdict ∧ the estimate ≤ the tolerance
  ///
  /// r.h0, when asked for, stays this rank's shard's.
  void finish(GradientResult<S>& r) {
    if (!in_step_) throw Error("GradientAllreduce::finish: no step begun");
    in_step_ = false;
    const auto t0 = std::chrono::steady_clock::now();
    figures_.step_seconds = std::chrono::duration<double>(t0 - begun_).count();
    // A bucket sent with a gradient the step later changed is sent again.
    const std::size_t nb = buckets_.size();
    std::vector<double>& small = small_;
    small.assign(kFixed + nb, 0.0);
    double local_max = 0;
    for (Bucket& b : buckets_) {
      std::uint64_t h = kHashSeed;
      for_each_block(b, [&](std::span<S> s) {
        h = hash_bytes(s.data(), s.size_bytes(), h);
        for (S v : s) local_max = std::max(local_max, static_cast<double>(std::abs(v)));
      });
      small[kFixed + static_cast<std::size_t>(&b - buckets_.data())] = b.started && h != b.hash ? 1.0 : 0.0;
    }
    for (; next_ < nb; ++next_) start(buckets_[next_]);
    const Stats& st = r.stats;
    const double e = st.is_estimate ? 0.0 : st.error_estimate;
    small[0] = weight_ * static_cast<double>(r.loss);
    small[1] = weight_ * e * local_max;
    small[2] = st.within_tolerance ? 1.0 : 0.0;
    small[3] = static_cast<double>(st.fallbacks);
    small[4] = weight_;
    const std::vector<double> all = gather_all(comm_, small);
    double loss = 0, err = 0, within = 1, fallbacks = 0, weights = 0;
    std::vector<bool> resend(nb, false);
    for (int q = 0; q < ranks_; ++q) {  // (in rank order: the same sums on every rank)
      const double* v = all.data() + static_cast<std::size_t>(q) * small.size();
      loss += v[0];
      err += v[1];
      within = std::min(within, v[2]);
      fallbacks += v[3];
      weights += v[4];
      for (std::size_t b = 0; b < nb; ++b) resend[b] = resend[b] || v[kFixed + b] != 0.0;
    }
    if (std::abs(weights - 1.0) > 1e-9)
      throw Error(detail::cat("GradientAllreduce: the ranks' shares of the batch add up to ", weights,
                              ", not 1 (this rank's: ", weight_, ")"));
    for (Bucket& b : buckets_) wait(b);
    for (std::size_t k = 0; k < nb; ++k)
      if (resend[k]) {
        start(buckets_[k]);
        wait(buckets_[k]);
        ++figures_.resent;
      }
    double global_max = 0;
    for (Bucket& b : buckets_) {
      Index o = 0;
      for_each_block(b, [&](std::span<S> s) {
        std::copy(b.sum.data() + o, b.sum.data() + o + static_cast<Index>(s.size()), s.begin());
        for (S v : s) global_max = std::max(global_max, static_cast<double>(std::abs(v)));
        o += static_cast<Index>(s.size());
      });
    }
    if (r.gradient.size() == num_parameters(*net_)) gradients_into(*net_, r.gradient);
    r.loss = static_cast<S>(loss);
    Stats& out = r.stats;
    out.fallbacks = static_cast<std::size_t>(fallbacks);
    if (!out.is_estimate)
      out.error_estimate = err == 0         ? 0.0
                           : global_max > 0 ? err / global_max
                                            : std::numeric_limits<double>::infinity();
    const double tol = out.tolerance > 0 ? out.tolerance : default_target<S>();
    const bool finite = std::isfinite(loss) && std::isfinite(global_max);
    out.within_tolerance = within == 1.0 && finite && (out.is_estimate || out.error_estimate <= tol);
    figures_.finish_seconds = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
  }

  [[nodiscard]] const AllreduceFigures& figures() const { return figures_; }
  [[nodiscard]] const AllreduceOptions& options() const { return options_; }
  /// Layers per bucket, in the order the buckets start (for reports and tests).
  [[nodiscard]] std::vector<std::vector<std::size_t>> bucket_layers() const {
    std::vector<std::vector<std::size_t>> v;
    for (const Bucket& b : buckets_) v.push_back(b.layers);
    return v;
  }

 private:
  static constexpr std::size_t kFixed = 5;  // loss, error, verdict, fallbacks, weight

  struct Bucket {
    std::vector<std::size_t> layers;  // in fill order
    std::size_t layers_with_params = 0, pending = 0;
    Index count = 0;         // numbers in the bucket
    Vector<S> sum;           // this rank's w·g, then Σ_r w_r g_r
    Vector<S> gathered;      // deterministic: every rank's w·g, rank after rank
    std::uint64_t hash = 0;  // of this rank's g when sent
    MPI_Request request = MPI_REQUEST_NULL;
    bool started = false;
  };

  template <class F>
  void for_each_block(const Bucket& b, F&& f) {
    for (std::size_t i : b.layers)
      net_->visit(i, [&](auto& l) {
        for (std::span<S> s : gradient_blocks(l)) f(s);
      });
  }

  /// Buckets of whole layers in fill order; kept while the layers' storage is where it was.
  void layout(N& net) {
    std::vector<std::pair<const S*, std::size_t>> where;
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](auto& l) {
        for (std::span<S> s : gradient_blocks(l)) where.emplace_back(s.data(), s.size());
      });
    if (where == storage_ && !buckets_.empty()) return;
    storage_ = std::move(where);
    buckets_.clear();
    layer_bucket_.assign(net.size(), -1);
    ready_.assign(net.size(), false);
    std::vector<std::size_t> order(net.size());
    for (std::size_t k = 0; k < order.size(); ++k)
      order[k] = options_.order == FillOrder::first_to_last ? k : order.size() - 1 - k;
    std::size_t bytes = 0;
    for (std::size_t i : order) {
      Index p = 0;
      net.visit(i, [&](const auto& l) { p = l.num_params(); });
      if (p == 0) continue;
      const std::size_t lb = static_cast<std::size_t>(p) * sizeof(S);
      if (buckets_.empty() || bytes + lb > options_.bucket_bytes) {
        buckets_.emplace_back();
        bytes = 0;
      }
      Bucket& b = buckets_.back();
      b.layers.push_back(i);
      ++b.layers_with_params;
      b.count += p;
      bytes += lb;
      layer_bucket_[i] = static_cast<int>(buckets_.size() - 1);
    }
    figures_.buckets = buckets_.size();
    figures_.bytes = 0;
    for (Bucket& b : buckets_) {
      b.sum.resize(b.count);
      if (options_.deterministic) b.gathered.resize(b.count * ranks_);
      figures_.bytes += static_cast<std::size_t>(b.count) * sizeof(S);
      if (b.count > std::numeric_limits<int>::max())
        throw Error(detail::cat("GradientAllreduce: a layer of ", b.count,
                                " parameters is more than one MPI message can carry"));
    }
    // Every rank must post the same collectives: the same buckets.
    std::uint64_t shape = hash_bytes(&options_.deterministic, sizeof(bool));
    for (const Bucket& b : buckets_) shape = hash_bytes(&b.count, sizeof b.count, shape);
    if (const int q = first_rank_differing(comm_, shape); q >= 0)
      throw Error(detail::cat("GradientAllreduce: rank ", q,
                              " lays out other gradient buckets than rank 0 (another network, bucket size or "
                              "deterministic mode?)"));
  }

  void start(Bucket& b) {
    if (figures_.first_start_seconds < 0)
      figures_.first_start_seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - begun_).count();
    Index o = 0;
    std::uint64_t h = kHashSeed;
    const S w = static_cast<S>(weight_);
    for_each_block(b, [&](std::span<S> s) {
      h = hash_bytes(s.data(), s.size_bytes(), h);
      for (std::size_t k = 0; k < s.size(); ++k) b.sum[o + static_cast<Index>(k)] = w * s[k];
      o += static_cast<Index>(s.size());
    });
    b.hash = h;
    b.started = true;
    const int n = static_cast<int>(b.count);
    if (options_.deterministic)
      check(MPI_Iallgather(b.sum.data(), n, datatype<S>(), b.gathered.data(), n, datatype<S>(), comm_,
                           &b.request),
            "MPI_Iallgather");
    else
      check(MPI_Iallreduce(MPI_IN_PLACE, b.sum.data(), n, datatype<S>(), MPI_SUM, comm_, &b.request),
            "MPI_Iallreduce");
  }

  void wait(Bucket& b) {
    if (b.request == MPI_REQUEST_NULL) return;
    check(MPI_Wait(&b.request, MPI_STATUS_IGNORE),
          options_.deterministic ? "MPI_Iallgather" : "MPI_Iallreduce");
    if (options_.deterministic) add_in_rank_order(b);
  }

  /// Deterministic mode, once every rank's w·g has arrived: sum = Σ_r w_r g_r, added r = 0, 1, …
  void add_in_rank_order(Bucket& b) const {
    b.sum = b.gathered.head(b.count);
    for (int q = 1; q < ranks_; ++q) b.sum += b.gathered.segment(static_cast<Index>(q) * b.count, b.count);
  }

  /// Lets MPI move the started reductions along (MPI progresses only inside its calls).
  void progress() {
    for (std::size_t k = 0; k < next_; ++k) {
      Bucket& b = buckets_[k];
      if (b.request == MPI_REQUEST_NULL) continue;
      int done = 0;
      check(MPI_Test(&b.request, &done, MPI_STATUS_IGNORE), "MPI_Test");
      if (done && options_.deterministic) add_in_rank_order(b);
    }
  }

  MPI_Comm comm_;
  AllreduceOptions options_;
  int ranks_;
  N* net_ = nullptr;
  double weight_ = 1;
  bool in_step_ = false;
  std::vector<std::pair<const S*, std::size_t>> storage_;
  std::vector<Bucket> buckets_;
  std::vector<int> layer_bucket_;
  std::vector<bool> ready_;
  std::size_t next_ = 0;
  std::vector<double> small_;
  std::chrono::steady_clock::time_point begun_{};
  AllreduceFigures figures_;
};

}  // namespace moonwalk::mpi
