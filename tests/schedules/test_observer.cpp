// GradientObserver (core/gradient_observer.hpp): every schedule that computes
// gradients layer by layer announces each layer once its gradient is
// complete, in the order it computes them, and the gradient announced is the
// one the step returns.
#include <catch2/catch.hpp>
#include <moonwalk/moonwalk.hpp>
#include <string>
#include <vector>

using namespace moonwalk;

namespace {

/// Records, per announcement, the layer and a copy of its gradient at that moment.
struct Recorder final : GradientObserver {
  const Network<double>* net = nullptr;
  std::vector<std::size_t> order;
  std::vector<std::vector<double>> seen;
  void layer_ready(std::size_t i) override {
    order.push_back(i);
    std::vector<double> g;
    net->visit(i, [&](const auto& l) {
      for (auto b : gradient_blocks(l)) g.insert(g.end(), b.begin(), b.end());
    });
    seen.push_back(std::move(g));
  }
};

Network<double> mlp(int depth) {
  Network<double> net;
  for (int i = 0; i < depth; ++i) {
    net.add(Linear<double>(8, 8, {.seed = 40 + static_cast<std::uint64_t>(i)}));
    net.add(LeakyReLU<double>(8, 0.5));
  }
  net.add(Linear<double>(8, 3, {.seed = 99}));
  return net;
}

template <class Sch>
Recorder observe(const Sch& schedule, Network<double>& net, GradientResult<double>& r) {
  Recorder rec;
  rec.net = &net;
  const Matrix<double> x = gaussian<double>(8, 5, 1);
  const Matrix<double> t = gaussian<double>(3, 5, 2);
  {
    ObserveGradients watch(rec);
    gradient_into(schedule, net, x, MSE<double>{}, t, r);
  }
  return rec;
}

}  // namespace

TEST_CASE("Schedules announce each layer's finished gradient, in the order they compute it",
          "[schedules][observer]") {
  const int depth = 6;
  const std::size_t L = 2 * depth + 1;
  std::vector<std::size_t> reverse, forward;
  for (std::size_t i = 0; i < L; ++i) forward.push_back(i), reverse.push_back(L - 1 - i);

  auto check = [&](const auto& schedule, const std::vector<std::size_t>& want) {
    auto net = mlp(depth);
    GradientResult<double> r;
    const Recorder rec = observe(schedule, net, r);
    INFO(schedule.name());
    REQUIRE(r.stats.fallbacks == 0);
    CHECK(rec.order == want);
    // What each announcement saw is the gradient the step returned.
    const std::vector<Index> off = parameter_offsets(net);
    for (std::size_t k = 0; k < rec.order.size(); ++k) {
      const std::size_t i = rec.order[k];
      const Vector<double> final_g = r.gradient.segment(off[i], off[i + 1] - off[i]);
      REQUIRE(rec.seen[k].size() == static_cast<std::size_t>(final_g.size()));
      CHECK(Eigen::Map<const Vector<double>>(rec.seen[k].data(), final_g.size()) == final_g);
    }
  };
  check(Backprop{}, reverse);
  check(Checkpointing{.every = 3}, reverse);
  check(Checkpointing{.slots = 2}, reverse);
  check(Planned{.calibration = Calibration::estimate, .invert = false}, reverse);
  check(MixedMoonwalk{}, forward);

  // Without an observer nothing is announced; scopes nest and restore.
  Recorder outer, inner;
  auto net = mlp(2);
  outer.net = inner.net = &net;
  {
    ObserveGradients a(outer);
    {
      ObserveGradients b(inner);
      detail::gradient_ready(1);
    }
    detail::gradient_ready(0);
  }
  detail::gradient_ready(2);
  CHECK(outer.order == std::vector<std::size_t>{0});
  CHECK(inner.order == std::vector<std::size_t>{1});
}

TEST_CASE("RevBackprop announces its layers in reverse order", "[schedules][observer]") {
  auto net = parse_network<double>(
      "in:8,coupling:additive:16,coupling:additive:16,coupling:additive:16,linear:3", 7);
  GradientResult<double> r;
  const Recorder rec = observe(RevBackprop{}, net, r);
  CHECK(rec.order == std::vector<std::size_t>{3, 2, 1, 0});
}
