// The baseline schedules against reference backprop: checkpointing (every-k
// and binomial), RevBackprop, naive forward mode and the projected forward
// gradient. Truth is double backprop on a twin with identical parameters.
#include <catch2/catch.hpp>
#include <cmath>
#include <functional>
#include <moonwalk/fidelity/tolerance.hpp>
#include <moonwalk/moonwalk.hpp>
#include <random>
#include <set>

#include "support/random_net.hpp"

using namespace moonwalk;
using moonwalk_test::max_rel_err_per_tensor;
using moonwalk_test::RandomArch;

namespace {

/// A schedule's result in S, the same-precision backprop, and the truth.
template <class S>
struct Compared {
  GradientResult<S> r, bp;
  GradientResult<double> truth;
  double err = 0;  ///< per-tensor max-abs relative error of (∂ℓ/∂θ, h_0) against the truth
  std::size_t layers = 0;
};

/// Runs `schedule` and Backprop on `net` (scalar S) and double Backprop on
/// `twin` (given net's parameters), with input x and an mse or xent target.
template <class S, class Sch, class NetS, class NetD>
Compared<S> against_truth(const Sch& schedule, NetS& net, NetD& twin, const Matrix<double>& x, bool xent,
                          std::uint64_t seed) {
  set_parameters(twin, get_parameters(net).template cast<double>());
  const Matrix<S> xs = x.cast<S>();
  const Index out = twin.forward(x).rows(), B = x.cols();
  Compared<S> c;
  if (xent) {
    const auto t = moonwalk_test::random_labels(out, B, seed + 11);
    c.r = gradient(schedule, net, xs, SoftmaxCrossEntropy<S>{}, t);
    c.bp = gradient(Backprop{.input_gradient = true}, net, xs, SoftmaxCrossEntropy<S>{}, t);
    c.truth = gradient(Backprop{.input_gradient = true}, twin, x, SoftmaxCrossEntropy<double>{}, t);
  } else {
    const Matrix<double> t = moonwalk_test::random_batch<double>(out, B, seed + 13);
    c.r = gradient(schedule, net, xs, MSE<S>{}, Matrix<S>(t.cast<S>()));
    c.bp = gradient(Backprop{.input_gradient = true}, net, xs, MSE<S>{}, Matrix<S>(t.cast<S>()));
    c.truth = gradient(Backprop{.input_gradient = true}, twin, x, MSE<double>{}, t);
  }
  c.err = std::max(max_rel_err_per_tensor(c.r.gradient, c.truth.gradient, parameter_offsets(net)),
                   detail::rel_max_err(c.r.h0.template cast<double>(), c.truth.h0));
  c.layers = net.size();
  return c;
}

template <class S, class Sch>
Compared<S> on_arch(const RandomArch& a, const Sch& schedule) {
  auto net = a.build<S>();
  auto twin = a.build<double>();
  const Matrix<double> x = moonwalk_test::random_batch<double>(a.in, a.batch, a.seed + 7);
  return against_truth<S>(schedule, net, twin, x, a.xent, a.seed);
}

/// Accuracy bound for an exact schedule in S against double truth: double
/// ≤ 1e-10; float the documented rounding floor of fidelity/tolerance.hpp,
/// 8·u·L (u = 2⁻²⁴), which float backprop itself meets.
template <class S>
double exact_bound(std::size_t layers) {
  if constexpr (std::is_same_v<S, double>)
    return 1e-10;
  else
    return error_model_bound<S>(0.0, layers);
}

template <class S>
constexpr const char* sname() {
  return std::is_same_v<S, float> ? "float" : "double";
}

/// Random invertible chain: square Linear(w, w), each followed by
/// LeakyReLU(slope ∈ [0.4, 0.9]), Identity or nothing; 1–8 Linear layers,
/// width 2–12, batch 1–17.
struct InvertibleArch {
  std::uint64_t seed;
  Index width = 0, batch = 0;
  std::vector<int> acts;
  std::vector<double> slopes;

  explicit InvertibleArch(std::uint64_t s) : seed(s) {
    std::mt19937_64 rng(s);
    auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    width = pick(2, 12);
    batch = pick(1, 17);
    const int depth = pick(1, 8);
    for (int d = 0; d < depth; ++d) {
      acts.push_back(pick(0, 2));
      slopes.push_back(std::uniform_real_distribution<double>(0.4, 0.9)(rng));
    }
  }
  template <class S>
  Network<S> build() const {
    Network<S> net;
    for (std::size_t d = 0; d < acts.size(); ++d) {
      net.add(Linear<S>(width, width, {.seed = seed * 977 + d}));
      if (acts[d] == 0) net.add(LeakyReLU<S>(width, static_cast<S>(slopes[d])));
      if (acts[d] == 1) net.add(Identity<S>(width));
    }
    return net;
  }
};

/// L equal-width layers (w × w Linear and LeakyReLU(0.5) alternating), so every
/// layer input is w × B: one "layer_bytes" each.
template <class S>
Network<S> equal_width_chain(std::size_t L, Index w) {
  Network<S> net;
  for (std::size_t i = 0; i < L; ++i) {
    if (i % 2 == 0)
      net.add(Linear<S>(w, w, {.seed = 500 + i}));
    else
      net.add(LeakyReLU<S>(w, S(0.5)));
  }
  return net;
}

/// Griewank's t(l, c) = r·l − β(c + 1, r − 1) with β(c, r − 1) < l ≤ β(c, r),
/// β(c, r) = C(c + r, c), written independently of the library.
std::size_t griewank_forward_steps(std::size_t l, std::size_t c) {
  auto beta = [](std::size_t cc, long r) -> std::size_t {
    if (r < 0) return 0;
    double b = 1;
    for (long i = 1; i <= r; ++i)
      b = b * static_cast<double>(cc + static_cast<std::size_t>(i)) / static_cast<double>(i);
    return static_cast<std::size_t>(std::llround(b));
  };
  long r = 0;
  while (beta(c, r) < l) ++r;
  return static_cast<std::size_t>(r) * l - beta(c + 1, r - 1);
}

/// The least number of forward steps that reverse n steps with `free` slots
/// beyond the held start state, by exhaustive dynamic programming over every
/// split: T(1, s) = 0, T(n, 0) = n(n−1)/2, T(n, s) = min_m m + T(n−m, s−1) + T(m, s).
std::size_t treeverse_optimum(std::size_t n, std::size_t free) {
  std::vector<std::vector<std::size_t>> T(n + 1, std::vector<std::size_t>(free + 1, 0));
  for (std::size_t k = 1; k <= n; ++k)
    for (std::size_t s = 0; s <= free; ++s) {
      std::size_t best = k * (k - 1) / 2;
      if (s > 0)
        for (std::size_t m = 1; m < k; ++m) best = std::min(best, m + T[k - m][s - 1] + T[m][s]);
      T[k][s] = best;
    }
  return T[n][free];
}

/// (∂ℓ/∂θ, h_0) as one vector in double.
template <class S>
Vector<double> joint(const GradientResult<S>& r) {
  Vector<double> v(r.gradient.size() + r.h0.size());
  v << r.gradient.template cast<double>(), r.h0.template cast<double>().reshaped();
  return v;
}

double cosine(const Vector<double>& a, const Vector<double>& b) { return a.dot(b) / (a.norm() * b.norm()); }

}  // namespace

// ---------------------------------------------------------------- accuracy

TEMPLATE_TEST_CASE("Checkpointing and naive forward mode match backprop on 40 random architectures",
                   "[schedules][baselines][property]", double, float) {
  using S = TestType;
  const std::uint64_t first = std::is_same_v<S, double> ? 1 : 1001;
  for (std::uint64_t seed = first; seed < first + 40; ++seed) {
    const RandomArch a(seed);
    std::string desc;
    (void)a.build<S>(&desc);
    INFO(desc << " [" << sname<S>() << "]");
    for (const Checkpointing& ck :
         {Checkpointing{.input_gradient = true}, Checkpointing{.every = 2, .input_gradient = true},
          Checkpointing{.slots = 1, .input_gradient = true},
          Checkpointing{.slots = 2, .input_gradient = true},
          Checkpointing{.slots = 3, .input_gradient = true}}) {
      const auto c = on_arch<S>(a, ck);
      INFO("checkpoint every " << ck.every << " slots " << ck.slots << ": err " << c.err);
      CHECK(c.err <= exact_bound<S>(c.layers));
      // Recomputation repeats backprop's arithmetic exactly: bit-identical results.
      CHECK(c.r.gradient == c.bp.gradient);
      CHECK(c.r.h0 == c.bp.h0);
      CHECK(c.r.loss == c.bp.loss);
      CHECK(c.r.stats.error_estimate == 0);
    }
    if (num_parameters(a.build<S>()) <= 300) {  // O(P·L): keep the test fast
      const auto c = on_arch<S>(a, NaiveForward{});
      INFO("forward: err " << c.err);
      CHECK(c.err <= exact_bound<S>(c.layers));
      CHECK(c.r.loss == c.bp.loss);
      CHECK(c.r.stats.residual_bytes == 0);
    }
  }
}

TEMPLATE_TEST_CASE("RevBackprop matches backprop on 40 random invertible architectures",
                   "[schedules][baselines][property][revbackprop]", double, float) {
  using S = TestType;
  const std::uint64_t first = std::is_same_v<S, double> ? 1 : 1001;
  for (std::uint64_t seed = first; seed < first + 40; ++seed) {
    const InvertibleArch a(seed);
    auto net = a.build<S>();
    auto twin = a.build<double>();
    const Matrix<double> x = moonwalk_test::random_batch<double>(a.width, a.batch, seed + 7);
    const auto c = against_truth<S>(RevBackprop{.input_gradient = true}, net, twin, x, seed % 2 == 0, seed);
    const double est = c.r.stats.error_estimate;
    INFO(net.name() << " batch " << a.batch << " [" << sname<S>() << "]: err " << c.err << ", estimate "
                    << est);
    CHECK(c.r.stats.figures.at("max_reconstruction_error") == est);
    // Nothing kept but the branch bits (one bit per element) of each
    // LeakyReLU whose rebuilt input is read unchecked: every one but layer
    // 1's (the bottom of the stretch, recomputed from x_0 before use).
    std::size_t mask_bytes = 0;
    for (std::size_t i = 2; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        if (keeps_branches(l))
          mask_bytes +=
              static_cast<std::size_t>((l.in_features() * a.batch + 63) / 64) * sizeof(std::uint64_t);
      });
    CHECK(c.r.stats.residual_bytes == mask_bytes);
    CHECK(c.r.stats.bytes_of("mask") == mask_bytes);
    // x_1 … x_{L−1} rebuilt; x_1 recomputed from x_0 (the check).
    CHECK(c.r.stats.counts.inverse == net.size() - 1);
    CHECK(c.r.stats.counts.forward == net.size() + (net.size() > 1 ? 1 : 0));
    if constexpr (std::is_same_v<S, double>) {
      CHECK(c.err <= 1e-10);
      CHECK(est <= 1e-12);
    } else {
      // Float: the Moonwalk error model of fidelity/tolerance.hpp, with the
      // reconstruction mismatch as the estimate: err ≤ max(8·u·L, 10·estimate)
      // and the estimate under the float target 1e-4 (slopes ≥ 0.4, ≤ 16 layers).
      CHECK(within_error_model<S>(c.err, est, c.layers));
    }
  }
}

TEST_CASE("Baselines on a static Sequential and the same runtime Network agree with backprop",
          "[schedules][baselines]") {
  using S = double;
  Sequential st(Linear<S>(6, 5, {.seed = 1}), Tanh<S>(5), Linear<S>(5, 7, {.seed = 2}), ReLU<S>(7),
                Linear<S>(7, 3, {.seed = 3}), LeakyReLU<S>(3, 0.2));
  Network<S> rt;
  rt.add(Linear<S>(6, 5, {.seed = 1}))
      .add(Tanh<S>(5))
      .add(Linear<S>(5, 7, {.seed = 2}))
      .add(ReLU<S>(7))
      .add(Linear<S>(7, 3, {.seed = 3}))
      .add(LeakyReLU<S>(3, 0.2));
  const Matrix<S> x = gaussian<S>(6, 4, 5), t = gaussian<S>(3, 4, 6);
  const auto ref = gradient(Backprop{.input_gradient = true}, st, x, MSE<S>{}, t);
  auto both = [&](const auto& schedule) {
    const auto a = gradient(schedule, st, x, MSE<S>{}, t);
    const Vector<S> left_in_layers = get_gradients(st);
    const auto b = gradient(schedule, rt, x, MSE<S>{}, t);
    INFO(a.stats.schedule);
    CHECK(a.stats.schedule == schedule.name());
    CHECK(a.gradient == b.gradient);  // same arithmetic behind the type erasure
    CHECK(a.h0 == b.h0);
    CHECK(left_in_layers == a.gradient);  // also left in the layers' gradient storage
    CHECK(get_gradients(rt) == b.gradient);
    CHECK(a.loss == Approx(ref.loss).epsilon(1e-14));
    return a;
  };
  for (const auto& r :
       {both(Checkpointing{.input_gradient = true}), both(Checkpointing{.every = 4, .input_gradient = true}),
        both(Checkpointing{.slots = 2, .input_gradient = true}), both(NaiveForward{})}) {
    INFO(r.stats.schedule);
    CHECK(detail::rel_max_err(r.gradient, ref.gradient) < 1e-12);
    CHECK(detail::rel_max_err(r.h0, ref.h0) < 1e-12);
  }
  const auto p = both(ProjForward{.directions = 8, .seed = 3});
  CHECK(p.stats.is_estimate);

  // Invertible: square Linear + LeakyReLU + Identity.
  Sequential inv(Linear<S>(6, 6, {.seed = 4}), LeakyReLU<S>(6, 0.5), Linear<S>(6, 6, {.seed = 5}),
                 Identity<S>(6), Linear<S>(6, 6, {.seed = 6}));
  Network<S> inv_rt;
  inv_rt.add(Linear<S>(6, 6, {.seed = 4}))
      .add(LeakyReLU<S>(6, 0.5))
      .add(Linear<S>(6, 6, {.seed = 5}))
      .add(Identity<S>(6))
      .add(Linear<S>(6, 6, {.seed = 6}));
  const Matrix<S> t6 = gaussian<S>(6, 4, 7);
  const auto ref_inv = gradient(Backprop{.input_gradient = true}, inv, x, MSE<S>{}, t6);
  for (const auto& r : {gradient(RevBackprop{.input_gradient = true}, inv, x, MSE<S>{}, t6),
                        gradient(RevBackprop{.input_gradient = true}, inv_rt, x, MSE<S>{}, t6)}) {
    CHECK(detail::rel_max_err(r.gradient, ref_inv.gradient) < 1e-12);
    CHECK(detail::rel_max_err(r.h0, ref_inv.h0) < 1e-12);
    CHECK(r.stats.error_estimate < 1e-13);
  }
}

// ---------------------------------------------------------------- checkpointing memory

TEST_CASE("Every-k checkpointing keeps √L checkpoints plus one segment",
          "[schedules][baselines][checkpoint]") {
  using S = double;
  const Index w = 8, B = 4;
  const std::size_t layer_bytes = static_cast<std::size_t>(w * B) * sizeof(S);
  for (const std::size_t L : {16u, 64u}) {
    auto net = equal_width_chain<S>(L, w);
    const Matrix<S> x = gaussian<S>(w, B, 1), t = gaussian<S>(w, B, 2);
    const auto bp = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
    const auto ck = gradient(Checkpointing{.input_gradient = true}, net, x, MSE<S>{}, t);
    const std::size_t k = L == 16 ? 4 : 8;  // √L
    INFO("L = " << L << ": backprop " << bp.stats.residual_bytes << " bytes, checkpoint "
                << ck.stats.residual_bytes);
    CHECK(ck.stats.figures.at("every") == k);
    CHECK(ck.stats.figures.at("checkpoints") == L / k);
    // Backprop keeps L inputs; checkpointing L/k checkpoints + the k − 1 other
    // inputs of one segment, at the last segment's recomputation.
    CHECK(bp.stats.residual_bytes == L * layer_bytes);
    CHECK(ck.stats.residual_bytes == (L / k + k - 1) * layer_bytes);
    CHECK(ck.stats.residual_bytes <= 2 * k * layer_bytes);  // O(√L), far below O(L)
    CHECK(ck.stats.bytes_of("checkpoint") == (L / k) * layer_bytes);
    CHECK(ck.stats.bytes_of("activation") == (L - L / k) * layer_bytes);
    // Every input that is not a checkpoint is recomputed exactly once.
    CHECK(ck.stats.figures.at("recomputed_forwards") == L - L / k);
    CHECK(ck.stats.counts.forward == 2 * L - L / k);
    CHECK(ck.stats.counts.vjp == L);
    CHECK(ck.gradient == bp.gradient);
    CHECK(ck.h0 == bp.h0);
  }
  SECTION("a last segment shorter than k, and k = 1") {
    auto net = equal_width_chain<S>(10, w);
    const Matrix<S> x = gaussian<S>(w, B, 1), t = gaussian<S>(w, B, 2);
    const auto bp = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
    // Segments [0,3) [3,6) [6,9) [9,10): peak at [6,9) with checkpoints 0, 3, 6 and x_7, x_8.
    const auto ck = gradient(Checkpointing{.every = 3, .input_gradient = true}, net, x, MSE<S>{}, t);
    CHECK(ck.stats.figures.at("checkpoints") == 4);
    CHECK(ck.stats.residual_bytes == 5 * layer_bytes);
    CHECK(ck.stats.figures.at("recomputed_forwards") == 6);
    CHECK(ck.gradient == bp.gradient);
    // k = 1: every input is a checkpoint, nothing recomputed, backprop's memory.
    const auto all = gradient(Checkpointing{.every = 1, .input_gradient = true}, net, x, MSE<S>{}, t);
    CHECK(all.stats.residual_bytes == bp.stats.residual_bytes);
    CHECK(all.stats.figures.at("recomputed_forwards") == 0);
    CHECK(all.gradient == bp.gradient);
  }
  SECTION("every and slots together are refused") {
    auto net = equal_width_chain<S>(4, w);
    const Matrix<S> x = gaussian<S>(w, B, 1), t = gaussian<S>(w, B, 2);
    CHECK_THROWS_AS(
        gradient(Checkpointing{.every = 2, .slots = 2, .input_gradient = true}, net, x, MSE<S>{}, t),
        ScheduleError);
  }
}

TEST_CASE("Binomial checkpointing: the treeverse minimum of forward calls within its slots",
          "[schedules][baselines][checkpoint]") {
  using S = double;
  SECTION("forward calls = Griewank's t(L, c) + 1 = the exhaustive optimum, for L ≤ 24, c ≤ 5") {
    for (std::size_t L = 1; L <= 24; ++L)
      for (std::size_t c = 1; c <= 5; ++c) {
        Network<S> net;
        for (std::size_t i = 0; i < L; ++i) net.add(Identity<S>(2));
        const Matrix<S> x = gaussian<S>(2, 1, L), t = gaussian<S>(2, 1, L + 100);
        const auto r = gradient(Checkpointing{.slots = c, .input_gradient = true}, net, x, MSE<S>{}, t);
        INFO("L = " << L << ", slots = " << c);
        // + 1: the last layer's forward for the loss, which reverses the first step.
        CHECK(r.stats.counts.forward == treeverse_optimum(L, c - 1) + 1);
        CHECK(r.stats.counts.forward == griewank_forward_steps(L, c) + 1);
        CHECK(r.stats.figures.at("predicted_forwards") == griewank_forward_steps(L, c) + 1);
        CHECK(r.stats.figures.at("checkpoints") <= static_cast<double>(c));
        CHECK(r.stats.residual_bytes <= c * 2 * sizeof(S));
        CHECK(r.stats.counts.vjp == L);
        CHECK(r.h0 == Matrix<S>(x - t));  // identity chain, mse with batch 1
      }
  }
  SECTION("at the memory of every-k, fewer recomputations (L = 16, 64)") {
    const Index w = 8, B = 4;
    const std::size_t layer_bytes = static_cast<std::size_t>(w * B) * sizeof(S);
    for (const std::size_t L : {16u, 64u}) {
      auto net = equal_width_chain<S>(L, w);
      const Matrix<S> x = gaussian<S>(w, B, 3), t = gaussian<S>(w, B, 4);
      const auto bp = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
      const auto sq = gradient(Checkpointing{.input_gradient = true}, net, x, MSE<S>{}, t);
      const std::size_t c = sq.stats.residual_bytes / layer_bytes;  // 7 and 15 inputs
      const auto bin = gradient(Checkpointing{.slots = c, .input_gradient = true}, net, x, MSE<S>{}, t);
      const double rec_sq = sq.stats.figures.at("recomputed_forwards");
      const double rec_bin = bin.stats.figures.at("recomputed_forwards");
      INFO("L = " << L << ", " << c << " slots: binomial recomputes " << rec_bin << ", every-k " << rec_sq);
      CHECK(bin.gradient == bp.gradient);
      CHECK(bin.h0 == bp.h0);
      CHECK(bin.stats.residual_bytes <= sq.stats.residual_bytes);
      CHECK(bin.stats.bytes_of("activation") == 0);
      CHECK(rec_bin == static_cast<double>(griewank_forward_steps(L, c) + 1 - L));  // 8 and 48
      CHECK(rec_bin < rec_sq);                                                      // every-k: 12 and 56
    }
  }
  SECTION("one slot recomputes quadratically; L slots is backprop") {
    const Index w = 4, B = 2;
    auto net = equal_width_chain<S>(16, w);
    const Matrix<S> x = gaussian<S>(w, B, 5), t = gaussian<S>(w, B, 6);
    const auto bp = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
    const auto one = gradient(Checkpointing{.slots = 1, .input_gradient = true}, net, x, MSE<S>{}, t);
    CHECK(one.stats.counts.forward == 16 * 15 / 2 + 1);
    CHECK(one.stats.residual_bytes == static_cast<std::size_t>(w * B) * sizeof(S));
    CHECK(one.gradient == bp.gradient);
    const auto many = gradient(Checkpointing{.slots = 40, .input_gradient = true}, net, x, MSE<S>{}, t);
    CHECK(many.stats.counts.forward == 16);
    CHECK(many.stats.residual_bytes == bp.stats.residual_bytes);
    CHECK(many.gradient == bp.gradient);
  }
}

// ---------------------------------------------------------------- RevBackprop

TEST_CASE("RevBackprop's reconstruction estimate: tiny in double, larger in float, tracking the error",
          "[schedules][baselines][revbackprop]") {
  // 16 layers: 8 × (orthogonal Linear(32, 32), LeakyReLU(0.1)). Inverting the
  // small slope stretches rounding by 10 per layer (docs/design.md §5).
  auto build = [](auto scalar, std::uint64_t base) {
    using T = decltype(scalar);
    Network<T> net;
    for (int i = 0; i < 8; ++i) {
      net.add(Linear<T>(32, 32, {.seed = base + static_cast<std::uint64_t>(i)}));
      net.add(LeakyReLU<T>(32, T(0.1)));
    }
    return net;
  };
  const Matrix<double> x = gaussian<double>(32, 16, 3);
  // Over several weight seeds: in double the estimate is the error's size
  // (within the error model's 10×); in float it flags the loss of accuracy
  // (≥ 1e-4, ≥ 1e6× double's). The drift is measured where the stretch
  // ends, x_1 recomputed from x_0, and the backward step of layer 1 reads the
  // exact x_1: the errors are O(0.005–0.01) and the estimate is above them
  // on every seed (err / estimate 0.10–0.16). It never calls a lost gradient
  // accurate.
  double worst_ratio = 0;
  for (std::uint64_t base : {10, 20, 30, 40, 50, 60, 70, 80}) {
    auto nd = build(0.0, base);
    auto nf = build(0.0f, base);
    auto twin_d = build(0.0, base), twin_f = build(0.0, base);
    const auto d = against_truth<double>(RevBackprop{.input_gradient = true}, nd, twin_d, x, false, 4);
    const auto f = against_truth<float>(RevBackprop{.input_gradient = true}, nf, twin_f, x, false, 4);
    const double ed = d.r.stats.error_estimate, ef = f.r.stats.error_estimate;
    INFO("seed " << base << ": double: err " << d.err << " est " << ed << "; float: err " << f.err << " est "
                 << ef);
    CHECK(ed < 1e-9);
    CHECK(ef > 1e-4);
    CHECK(ef > 1e6 * ed);
    CHECK(d.err <= 10 * ed);
    CHECK(f.err <= ef);
    worst_ratio = std::max(worst_ratio, f.err / ef);
    CHECK(max_rel_err_per_tensor(f.bp.gradient, f.truth.gradient, parameter_offsets(nf)) < 1e-5);
    if (base == 10) CHECK(f.err > 1e-4);  // float really lost accuracy (backprop in float: ~5e-7)
  }
  // Measured: 0.10–0.16. (Before the stretch's bottom was checked before
  // use — x_0 rebuilt too and compared afterwards — it was 0.8–52.)
  CHECK(worst_ratio < 0.5);
}

TEST_CASE("RevBackprop keeps the input of a layer it cannot invert, and checks the rebuilt stretch there",
          "[schedules][baselines][revbackprop]") {
  using S = double;
  // (Input seeds differ from the layer seeds: x from the same stream as the
  // first Linear's W would make W x exactly triangular, putting LeakyReLU
  // inputs at ±1e-16; the LeakyReLU's branch bits are kept either way.)
  const Matrix<S> x = gaussian<S>(6, 3, 101), t = gaussian<S>(6, 3, 102);
  // ReLU (layer 3) and the non-square Linears cannot be inverted: their inputs
  // are kept (kind "activation"), x_1, x_2 and x_5 are rebuilt. The
  // LeakyReLU's input x_1 is its stretch's bottom, recomputed from x_0 before
  // its backward step reads it: it needs no branch bits.
  Network<S> net;
  net.add(Linear<S>(6, 6, {.seed = 1}))
      .add(LeakyReLU<S>(6, 0.5))
      .add(Linear<S>(6, 6, {.seed = 2}))
      .add(ReLU<S>(6))
      .add(Linear<S>(6, 8, {.seed = 3}))
      .add(Tanh<S>(8))
      .add(Linear<S>(8, 6, {.seed = 4}));
  const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  const auto rb = gradient(RevBackprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  CHECK(detail::rel_max_err(rb.gradient, ref.gradient) < 1e-12);
  CHECK(detail::rel_max_err(rb.h0, ref.h0) < 1e-12);
  std::set<std::size_t> kept;
  for (const auto& e : rb.stats.saved) {
    CHECK(e.kind == "activation");
    kept.insert(e.layer);
  }
  CHECK(kept == std::set<std::size_t>{3, 4, 6});
  CHECK(rb.stats.residual_bytes < ref.stats.residual_bytes);
  // Two rebuilt stretches were checked: x_5 recomputed from x_4, x_1 from x_0.
  CHECK(rb.stats.error_estimate < 1e-13);
  CHECK(rb.stats.counts.inverse == 3);
  CHECK(rb.stats.counts.forward == 7 + 2);
  // Static networks take the same path.
  Sequential st(Linear<S>(6, 4, {.seed = 1}), LeakyReLU<S>(4, 0.5), Linear<S>(4, 6, {.seed = 2}));
  const auto sref = gradient(Backprop{.input_gradient = true}, st, x, MSE<S>{}, t);
  const auto srb = gradient(RevBackprop{.input_gradient = true}, st, x, MSE<S>{}, t);
  CHECK(detail::rel_max_err(srb.gradient, sref.gradient) < 1e-12);
}

// ---------------------------------------------------------------- naive forward mode

TEST_CASE("Naive forward mode: one tangent pass per parameter, O(P·L) jvps",
          "[schedules][baselines][forward]") {
  using S = double;
  // L = 3, P = (5·4 + 4) + (4·3 + 3) = 39, n_0 = 5.
  Sequential net(Linear<S>(5, 4, {.seed = 1}), Tanh<S>(4), Linear<S>(4, 3, {.seed = 2}));
  const Matrix<S> x = gaussian<S>(5, 6, 1), t = gaussian<S>(3, 6, 2);
  const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  const auto r = gradient(NaiveForward{}, net, x, MSE<S>{}, t);
  CHECK(detail::rel_max_err(r.gradient, ref.gradient) < 1e-12);
  CHECK(detail::rel_max_err(r.h0, ref.h0) < 1e-12);
  CHECK(r.stats.counts.jvp_params == 39);
  // Σ_i P_i·(L − 1 − i): 24 tangents cross 2 layers, 15 cross none; + n_0·L for h_0.
  CHECK(r.stats.counts.jvp == 24 * 2 + 15 * 0 + 5 * 3);
  // L for g_L, L − 1 per parameter, L − 1 per input feature.
  CHECK(r.stats.counts.forward == 3 + 39 * 2 + 5 * 2);
  CHECK(r.stats.counts.vjp == 0);
  CHECK(r.stats.residual_bytes == 0);

  // Equal widths: Σ_i P_i·(L − 1 − i) = P·(L − 1)/2, quadratic in depth at fixed width.
  for (const std::size_t L : {4u, 8u}) {
    Network<S> chain;
    for (std::size_t i = 0; i < L; ++i) chain.add(Linear<S>(3, 3, {.seed = 40 + i}));
    const Matrix<S> x3 = gaussian<S>(3, 2, 3), t3 = gaussian<S>(3, 2, 4);
    const auto c = gradient(NaiveForward{}, chain, x3, MSE<S>{}, t3);
    const auto cref = gradient(Backprop{.input_gradient = true}, chain, x3, MSE<S>{}, t3);
    const std::size_t P = 12 * L;
    CHECK(c.stats.counts.jvp == P * (L - 1) / 2 + 3 * L);
    CHECK(c.stats.counts.forward == L + P * (L - 1) + 3 * (L - 1));
    CHECK(detail::rel_max_err(c.gradient, cref.gradient) < 1e-12);
  }
}

// ---------------------------------------------------------------- projected forward gradient

namespace {
struct ProjSetup {
  using S = double;
  // P = (4·5 + 5) + (5·3 + 3) = 43, x_0 is 4 × 2: D = 51 numbers.
  Sequential<Linear<S>, Tanh<S>, Linear<S>> net{Linear<S>(4, 5, {.seed = 1}), Tanh<S>(5),
                                                Linear<S>(5, 3, {.seed = 2})};
  Matrix<S> x = gaussian<S>(4, 2, 1), t = gaussian<S>(3, 2, 2);
  static constexpr std::size_t D = 51;
};
}  // namespace

TEST_CASE("ProjForward with k = 4·D directions points along the gradient",
          "[schedules][baselines][projforward]") {
  // For Gaussian v, ĝ = (1/k) Σ (vᵀg) v. Split each v_j along g/‖g‖ (a_j)
  // and orthogonally (w_j): cos²(ĝ, g) = χ²_k / (χ²_k + χ²_{D−1}) ~
  // Beta(k/2, (D−1)/2). With D = 51, k = 204: mean cos² = 0.803 (cos ≈ 0.896),
  // sd 0.035; cos ≥ 0.75 (cos² ≥ 0.5625) is 6.9 sd below the mean, so it holds
  // by concentration for every seed. And it is no exact gradient: cos ≤ 0.99
  // (cos² ≥ 0.98) would be 5 sd above the mean.
  ProjSetup s;
  const auto truth = gradient(Backprop{.input_gradient = true}, s.net, s.x, MSE<double>{}, s.t);
  const Vector<double> g = joint(truth);
  REQUIRE(static_cast<std::size_t>(g.size()) == ProjSetup::D);
  double sum = 0;
  for (std::uint64_t seed = 0; seed < 10; ++seed) {
    const auto r =
        gradient(ProjForward{.directions = 4 * ProjSetup::D, .seed = seed}, s.net, s.x, MSE<double>{}, s.t);
    const double c = cosine(joint(r), g);
    INFO("seed " << seed << ": cosine " << c);
    CHECK(c >= 0.75);
    CHECK(c <= 0.99);
    sum += c;
  }
  // Mean of 10 cosines: sd ≈ 0.02 / √10; prediction 0.896.
  CHECK(sum / 10 == Approx(0.896).margin(0.03));

  // Float: same bound (the estimate's own noise dwarfs float rounding).
  Sequential nf(Linear<float>(4, 5, {.seed = 1}), Tanh<float>(5), Linear<float>(5, 3, {.seed = 2}));
  set_parameters(nf, get_parameters(s.net).cast<float>());
  const auto rf = gradient(ProjForward{.directions = 4 * ProjSetup::D, .seed = 1}, nf, s.x.cast<float>(),
                           MSE<float>{}, Matrix<float>(s.t.cast<float>()));
  CHECK(cosine(joint(rf), g) >= 0.75);
}

TEST_CASE("ProjForward is unbiased: the mean over seeds converges like 1/√runs",
          "[schedules][baselines][projforward]") {
  // E‖ĝ − g‖² = (D + 1)‖g‖²/k per run; the mean of R independent runs has
  // relative RMS error √((D + 1)/(k R)): 0.64 at R = 16, 0.04 at R = 4096
  // (k = 8). A bias b would stall the error of the mean at ‖b‖/‖g‖: one of
  // 10% fails the second check.
  ProjSetup s;
  const auto truth = gradient(Backprop{.input_gradient = true}, s.net, s.x, MSE<double>{}, s.t);
  const Vector<double> g = joint(truth);
  const std::size_t k = 8;
  auto predicted = [&](double runs) {
    return std::sqrt((ProjSetup::D + 1.0) / (static_cast<double>(k) * runs));
  };
  Vector<double> sum = Vector<double>::Zero(g.size());
  std::vector<double> err;  // after 16, 256, 4096 runs
  for (std::uint64_t run = 1; run <= 4096; ++run) {
    sum += joint(gradient(ProjForward{.directions = k, .seed = 1000 + run}, s.net, s.x, MSE<double>{}, s.t));
    if (run == 16 || run == 256 || run == 4096)
      err.push_back((sum / static_cast<double>(run) - g).norm() / g.norm());
  }
  INFO("relative error of the mean: 16 runs " << err[0] << ", 256 runs " << err[1] << ", 4096 runs " << err[2]
                                              << " (predicted RMS " << predicted(16) << ", " << predicted(256)
                                              << ", " << predicted(4096) << ")");
  CHECK(err[2] < err[1]);
  CHECK(err[1] < err[0]);
  CHECK(err[2] < 2 * predicted(4096));
  // 1/√R scaling, each 16× more runs dividing the error by 4, within a factor 2.
  CHECK(err[1] / err[0] == Approx(0.25).margin(0.125));
  CHECK(err[2] / err[1] == Approx(0.25).margin(0.125));
}

TEST_CASE("ProjForward reports an estimate, its directions and its cost",
          "[schedules][baselines][projforward]") {
  ProjSetup s;
  const auto r = gradient(ProjForward{.directions = 10, .seed = 7}, s.net, s.x, MSE<double>{}, s.t);
  CHECK(r.stats.is_estimate);
  CHECK(r.stats.figures.at("directions") == 10);
  CHECK(r.stats.figures.at("dimension") == ProjSetup::D);
  CHECK(r.stats.error_estimate == Approx(std::sqrt((ProjSetup::D + 1.0) / 10)));
  CHECK(r.stats.residual_bytes == 0);
  CHECK(r.stats.counts.jvp == 10 * 3);
  CHECK(r.stats.counts.jvp_params == 10 * 2);
  CHECK(r.stats.counts.forward == 3 + 10 * 2);
  CHECK(r.stats.counts.vjp == 0);
  CHECK(get_gradients(s.net) == r.gradient);
  // Deterministic per seed, different across seeds.
  const auto again = gradient(ProjForward{.directions = 10, .seed = 7}, s.net, s.x, MSE<double>{}, s.t);
  const auto other = gradient(ProjForward{.directions = 10, .seed = 8}, s.net, s.x, MSE<double>{}, s.t);
  CHECK(again.gradient == r.gradient);
  CHECK(other.gradient != r.gradient);
  CHECK_THROWS_AS(gradient(ProjForward{.directions = 0}, s.net, s.x, MSE<double>{}, s.t), ScheduleError);
  CHECK_FALSE(
      gradient(Checkpointing{.input_gradient = true}, s.net, s.x, MSE<double>{}, s.t).stats.is_estimate);
}
