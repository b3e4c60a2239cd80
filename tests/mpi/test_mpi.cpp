// moonwalk::mpi (distributed/mpi.hpp) under mpirun -np N, N ≥ 2: the
// all-reduced gradient is the global batch's gradient; deterministic mode
// gives, on every rank, exactly the rank-order sum of the shards' gradients
// (each rank recomputes every shard to know it); a gradient changed after its
// bucket was sent is reduced again; a rank without samples contributes
// nothing; ranks that disagree get an error, not a hang.
//
// No test framework: a failed expectation is counted and printed, every rank
// goes on through the same collectives (so a failure cannot hang the job),
// and the job fails when any rank counted one.
#include <cmath>
#include <cstdio>
#include <moonwalk/distributed/mpi.hpp>
#include <moonwalk/moonwalk.hpp>
#include <string>
#include <vector>

namespace {

using moonwalk::Index;
using moonwalk::Matrix;
using moonwalk::Vector;
namespace mpi = moonwalk::mpi;

int rank = 0, ranks = 1, failures = 0;

#define EXPECT(cond)                                                                                       \
  do {                                                                                                     \
    if (!(cond)) {                                                                                         \
      ++failures;                                                                                          \
      std::fprintf(stderr, "rank %d: %s:%d: %s: expected %s\n", rank, __FILE__, __LINE__, context.c_str(), \
                   #cond);                                                                                 \
    }                                                                                                      \
  } while (0)

std::string context;

constexpr const char* kSpec =
    "in:12,linear:16,leaky_relu:0.5,linear:16,leaky_relu:0.5,linear:10,leaky_relu:0.5,linear:4";

/// Columns [n·q/N, n·(q+1)/N) of an n-column batch: rank q's shard.
std::pair<Index, Index> shard(Index n, int q) { return {n * q / ranks, n * (q + 1) / ranks}; }

double max_abs(const Vector<double>& v) { return v.size() ? v.cwiseAbs().maxCoeff() : 0.0; }

template <class S>
std::uint64_t hash_of(const Vector<S>& v) {
  return mpi::hash_bytes(v.data(), static_cast<std::size_t>(v.size()) * sizeof(S));
}

/// One data-parallel step of `schedule` on an n-sample batch, against what
/// this rank computes alone: every shard's gradient (the same schedule, the
/// same arithmetic as the rank that owns it) and the whole batch's.
template <class S, class Sch>
void check_step(const std::string& name, const Sch& schedule, mpi::FillOrder order, bool deterministic,
                Index n, std::size_t bucket_bytes) {
  context = moonwalk::detail::cat(name, deterministic ? " deterministic" : "", ", batch ", n, ", ",
                                  sizeof(S) == 4 ? "float" : "double", ", buckets of ", bucket_bytes, " B");
  auto net = moonwalk::parse_network<S>(kSpec, 5);
  const Matrix<S> x = moonwalk::gaussian<S>(12, n, 17);
  const Matrix<S> t = moonwalk::gaussian<S>(4, n, 18);
  const moonwalk::MSE<S> loss;

  // Every shard's gradient and loss, computed here.
  std::vector<Vector<S>> packed(static_cast<std::size_t>(ranks));
  std::vector<double> shard_loss(static_cast<std::size_t>(ranks), 0.0);
  for (int q = 0; q < ranks; ++q) {
    const auto [lo, hi] = shard(n, q);
    const S w = static_cast<S>(static_cast<double>(hi - lo) / static_cast<double>(n));
    if (hi == lo) {
      packed[static_cast<std::size_t>(q)] = Vector<S>::Zero(moonwalk::num_parameters(net));
      continue;
    }
    const auto g =
        moonwalk::gradient(schedule, net, x.middleCols(lo, hi - lo), loss, t.middleCols(lo, hi - lo));
    Vector<S> p(g.gradient.size());
    for (Index k = 0; k < p.size(); ++k) p[k] = w * g.gradient[k];  // (as a bucket is packed)
    packed[static_cast<std::size_t>(q)] = p;
    shard_loss[static_cast<std::size_t>(q)] =
        static_cast<double>(hi - lo) / static_cast<double>(n) * static_cast<double>(g.loss);
  }
  const auto whole = moonwalk::gradient(moonwalk::Backprop{}, net, x, loss, t);

  // The data-parallel step: this rank's shard only.
  mpi::GradientAllreduce<moonwalk::Network<S>> reduce(
      MPI_COMM_WORLD, {.bucket_bytes = bucket_bytes, .deterministic = deterministic, .order = order});
  const auto [lo, hi] = shard(n, rank);
  moonwalk::GradientResult<S> r;
  reduce.begin(net, static_cast<double>(hi - lo) / static_cast<double>(n));
  if (hi > lo) {
    moonwalk::ObserveGradients watch(reduce);
    moonwalk::gradient_into(schedule, net, x.middleCols(lo, hi - lo), loss, t.middleCols(lo, hi - lo), r);
  } else {
    moonwalk::zero_gradients(net);
  }
  reduce.finish(r);
  const Vector<S> g = moonwalk::get_gradients(net);

  // The global batch's gradient and loss, to the schedule's accuracy.
  const double tol = std::is_same_v<S, float> ? 2e-4 : 1e-10;
  const Vector<double> gd = g.template cast<double>(), wd = whole.gradient.template cast<double>();
  EXPECT(max_abs(gd - wd) <= tol * max_abs(wd));
  EXPECT(std::abs(static_cast<double>(r.loss) - static_cast<double>(whole.loss)) <=
         tol * std::abs(static_cast<double>(whole.loss)));
  if (hi > lo) EXPECT(r.gradient == g);  // the flat copy follows the layers
  EXPECT(r.stats.within_tolerance);
  EXPECT(std::isfinite(r.stats.error_estimate));
  // Every rank holds the same gradient.
  EXPECT(mpi::first_rank_differing(MPI_COMM_WORLD, hash_of(g)) == -1);
  if (deterministic) {
    // Exactly the rank-order sum of the shares: Σ_q (w_q g_q), added q = 0, 1, …
    Vector<S> want = packed[0];
    for (int q = 1; q < ranks; ++q) want += packed[static_cast<std::size_t>(q)];
    EXPECT(g == want);
    double l = 0;
    for (int q = 0; q < ranks; ++q) l += shard_loss[static_cast<std::size_t>(q)];
    EXPECT(r.loss == static_cast<S>(l));
  }
  // Buckets of whole layers in fill order, each at most bucket_bytes unless one layer is larger.
  const auto layers = reduce.bucket_layers();
  EXPECT(reduce.figures().buckets == layers.size());
  std::size_t seen = 0;
  for (const auto& b : layers) {
    std::size_t bytes = 0;
    for (std::size_t i : b) {
      net.visit(i, [&](const auto& l) { bytes += static_cast<std::size_t>(l.num_params()) * sizeof(S); });
      EXPECT(order == mpi::FillOrder::first_to_last ? i >= seen : true);
      seen = i;
    }
    EXPECT(b.size() == 1 || bytes <= bucket_bytes);
  }
  EXPECT(reduce.figures().resent == 0);
  // A schedule that announces its layers in the fill order starts every bucket during the step.
  if (hi > lo) EXPECT(reduce.figures().started_early == layers.size());
}

/// A gradient changed after its bucket was sent (as a fallback would) is reduced again.
void check_resend() {
  context = "a gradient changed after it was sent";
  auto net = moonwalk::parse_network<double>(kSpec, 5);
  const Index n = 4 * ranks;
  const Matrix<double> x = moonwalk::gaussian<double>(12, n, 21);
  const Matrix<double> t = moonwalk::gaussian<double>(4, n, 22);
  const moonwalk::MSE<double> loss;
  std::vector<Vector<double>> final_g(static_cast<std::size_t>(ranks));
  auto local = [&](int q, const Matrix<double>& xq) {
    auto g = moonwalk::gradient(moonwalk::Backprop{}, net, xq, loss, t.middleCols(4 * q, 4)).gradient;
    if (q == 1) g *= 3.0;  // rank 1's last word: its gradient tripled after the step, unannounced
    return g;
  };
  for (int q = 0; q < ranks; ++q) final_g[static_cast<std::size_t>(q)] = local(q, x.middleCols(4 * q, 4));
  mpi::GradientAllreduce<moonwalk::Network<double>> reduce(MPI_COMM_WORLD,
                                                           {.bucket_bytes = 600, .deterministic = true});
  moonwalk::GradientResult<double> r;
  reduce.begin(net, 1.0 / ranks);
  {
    moonwalk::ObserveGradients watch(reduce);
    moonwalk::gradient_into(moonwalk::Backprop{}, net, x.middleCols(4 * rank, 4), loss,
                            t.middleCols(4 * rank, 4), r);
  }
  if (rank == 1)
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [](auto& l) {
        for (auto b : moonwalk::gradient_blocks(l))
          for (auto& v : b) v *= 3.0;
      });
  reduce.finish(r);
  Vector<double> want = final_g[0] * (1.0 / ranks);
  for (int q = 1; q < ranks; ++q) want += final_g[static_cast<std::size_t>(q)] * (1.0 / ranks);
  const Vector<double> g = moonwalk::get_gradients(net);
  EXPECT(max_abs(g - want) <= 1e-14 * max_abs(want));
  EXPECT(reduce.figures().resent == reduce.figures().buckets);  // every bucket changed on rank 1
  EXPECT(reduce.figures().started_early == reduce.figures().buckets);
}

/// BatchNorm's running statistics after a data-parallel step: each rank folds
/// its own shard's batch statistics in, then average_buffers leaves Σ_q w_q b_q
/// (w_q the shard's share) on every rank — added in rank order, bit for bit,
/// in deterministic mode.
void check_buffers(bool deterministic, Index n) {
  context = moonwalk::detail::cat("average_buffers", deterministic ? " deterministic" : "", ", batch ", n);
  const char* spec = "in:12,linear:16,batchnorm,leaky_relu:0.5,linear:4";
  const Matrix<double> x = moonwalk::gaussian<double>(12, n, 21), t = moonwalk::gaussian<double>(4, n, 22);
  const moonwalk::MSE<double> loss;
  // Every shard's running statistics after one step on it, computed here.
  std::vector<double> want;
  for (int q = 0; q < ranks; ++q) {
    const auto [lo, hi] = shard(n, q);
    if (hi == lo) continue;
    auto net = moonwalk::parse_network<double>(spec, 5);
    moonwalk::set_step(net, 1);
    (void)moonwalk::gradient(moonwalk::Backprop{}, net, x.middleCols(lo, hi - lo), loss,
                             t.middleCols(lo, hi - lo));
    const Vector<double> b = moonwalk::get_buffers(net);
    const double w = static_cast<double>(hi - lo) / static_cast<double>(n);
    if (want.empty()) want.assign(static_cast<std::size_t>(b.size()), 0.0);
    for (Index k = 0; k < b.size(); ++k) want[static_cast<std::size_t>(k)] += w * b[k];
  }
  auto net = moonwalk::parse_network<double>(spec, 5);
  const Vector<double> initial = moonwalk::get_buffers(net);
  const auto [lo, hi] = shard(n, rank);
  moonwalk::set_step(net, 1);
  if (hi > lo)
    (void)moonwalk::gradient(moonwalk::Backprop{}, net, x.middleCols(lo, hi - lo), loss,
                             t.middleCols(lo, hi - lo));
  mpi::average_buffers(net, MPI_COMM_WORLD, static_cast<double>(hi - lo) / static_cast<double>(n),
                       deterministic);
  const Vector<double> got = moonwalk::get_buffers(net);
  EXPECT(got.size() == static_cast<Index>(want.size()));
  EXPECT(got != initial);
  EXPECT(mpi::first_rank_differing(MPI_COMM_WORLD, hash_of(got)) == -1);
  double err = 0, scale = 0;
  for (Index k = 0; k < got.size() && k < static_cast<Index>(want.size()); ++k) {
    err = std::max(err, std::abs(got[k] - want[static_cast<std::size_t>(k)]));
    scale = std::max(scale, std::abs(want[static_cast<std::size_t>(k)]));
  }
  EXPECT(err <= (deterministic ? 0.0 : 1e-14 * scale));

  context = "average_buffers with different networks";
  auto other = moonwalk::parse_network<double>(rank == 1 ? "in:12,linear:4" : spec, 5);
  int thrown = 0;
  try {
    mpi::average_buffers(other, MPI_COMM_WORLD, 1.0 / ranks);
  } catch (const mpi::Error& e) {
    thrown = std::string(e.what()).find("rank 1") != std::string::npos;
  }
  EXPECT(thrown == 1);
}

/// Ranks that were given different networks are told so, all of them, by name.
void check_disagreement() {
  context = "ranks with different networks";
  auto net = moonwalk::parse_network<float>(rank == 1 ? "in:12,linear:8,linear:4" : "in:12,linear:4", 5);
  int thrown = 0;
  try {
    mpi::broadcast_parameters(net, MPI_COMM_WORLD);
  } catch (const mpi::Error& e) {
    thrown = std::string(e.what()).find("rank 1") != std::string::npos;
  }
  EXPECT(thrown == 1);
  mpi::GradientAllreduce<moonwalk::Network<float>> reduce(MPI_COMM_WORLD);
  thrown = 0;
  try {
    reduce.begin(net, 1.0 / ranks);
  } catch (const mpi::Error& e) {
    thrown = std::string(e.what()).find("rank 1 lays out other gradient buckets") != std::string::npos;
  }
  EXPECT(thrown == 1);

  context = "broadcast_parameters";
  auto same = moonwalk::parse_network<float>(kSpec, 100 + static_cast<std::uint64_t>(rank));
  EXPECT(mpi::first_rank_differing(MPI_COMM_WORLD, hash_of(moonwalk::get_parameters(same))) ==
         (ranks > 1 ? 1 : -1));
  mpi::broadcast_parameters(same, MPI_COMM_WORLD);
  EXPECT(mpi::first_rank_differing(MPI_COMM_WORLD, hash_of(moonwalk::get_parameters(same))) == -1);
  EXPECT(moonwalk::get_parameters(same) ==
         moonwalk::get_parameters(moonwalk::parse_network<float>(kSpec, 100)));

  context = "sum_in_rank_order";
  std::vector<double> v{1.0 + rank, 0.1 * rank};
  mpi::sum_in_rank_order(MPI_COMM_WORLD, v);
  double a = 0, b = 0;
  for (int q = 0; q < ranks; ++q) a += 1.0 + q, b += 0.1 * q;
  EXPECT(v[0] == a && v[1] == b);
}

}  // namespace

int main(int argc, char** argv) {
  mpi::Session session(argc, argv);
  rank = mpi::rank(MPI_COMM_WORLD);
  ranks = mpi::size(MPI_COMM_WORLD);
  try {
    if (ranks < 2) {
      std::fprintf(stderr, "moonwalk_mpi_tests: run under mpirun -np N with N >= 2 (got %d rank)\n", ranks);
      return 2;
    }
    for (const bool det : {false, true})
      for (const std::size_t bucket : {std::size_t{400}, std::size_t{1} << 20}) {
        using moonwalk::Checkpointing;
        const auto back = mpi::FillOrder::last_to_first, fwd = mpi::FillOrder::first_to_last;
        check_step<double>("backprop", moonwalk::Backprop{}, back, det, 8 * ranks, bucket);
        check_step<float>("backprop", moonwalk::Backprop{}, back, det, 8 * ranks, bucket);
        check_step<float>("binomial", Checkpointing{.slots = 2}, back, det, 8 * ranks, bucket);
        check_step<double>("mixed", moonwalk::MixedMoonwalk{}, fwd, det, 8 * ranks, bucket);
        check_step<float>("mixed", moonwalk::MixedMoonwalk{}, fwd, det, 8 * ranks, bucket);
        check_step<double>("revbackprop", moonwalk::RevBackprop{}, back, det, 8 * ranks, bucket);
        // Unequal shards (7 samples over the ranks), and a rank without any (1 sample).
        check_step<double>("backprop", moonwalk::Backprop{}, back, det, 2 * ranks + 1, bucket);
        check_step<double>("backprop", moonwalk::Backprop{}, back, det, 1, bucket);
      }
    check_resend();
    for (const bool det : {false, true}) {
      check_buffers(det, 8 * ranks);
      check_buffers(det, 2 * ranks + 1);  // unequal shards
    }
    check_disagreement();
  } catch (const std::exception& e) {
    mpi::abort_job(MPI_COMM_WORLD, "moonwalk_mpi_tests", moonwalk::detail::cat(context, ": ", e.what()));
  }
  std::vector<double> f{static_cast<double>(failures)};
  mpi::sum_in_rank_order(MPI_COMM_WORLD, f);
  if (rank == 0)
    std::printf("moonwalk_mpi_tests: %d ranks, %s (%g failed expectations)\n", ranks,
                f[0] == 0 ? "all passed" : "FAILED", f[0]);
  return f[0] == 0 ? 0 : 1;
}
