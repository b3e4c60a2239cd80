// Seeded random architectures for the schedule property tests.
#pragma once

#include <moonwalk/moonwalk.hpp>
#include <random>
#include <sstream>
#include <string>

namespace moonwalk_test {

/// depth × (Linear(w→w), LeakyReLU(slope)) then Linear(w→4), in S: the deep
/// MLPs of the fidelity policy's tests (docs/design.md §5).
template <class S>
moonwalk::Network<S> leaky_mlp(int depth, moonwalk::Index w, double slope, moonwalk::Init init,
                               std::uint64_t seed) {
  moonwalk::Network<S> net;
  for (int i = 0; i < depth; ++i) {
    net.add(moonwalk::Linear<S>(w, w, {.seed = seed + static_cast<std::uint64_t>(i), .init = init}));
    net.add(moonwalk::LeakyReLU<S>(w, static_cast<S>(slope)));
  }
  net.add(moonwalk::Linear<S>(w, 4, {.seed = seed + 1000, .init = init}));
  return net;
}

/// A random chain: 1–8 Linear layers (contracting, square or expanding,
/// default initialisation), each followed by a random activation (or none),
/// input width 2–16, output 1–5, batch 1–33, loss mse or xent. The same seed
/// gives the same architecture and parameters for every scalar type.
struct RandomArch {
  std::uint64_t seed;
  moonwalk::Index in = 0, out = 0, batch = 0;
  bool xent = false;

  explicit RandomArch(std::uint64_t s) : seed(s) {
    std::mt19937_64 rng(s);
    auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
    in = pick(2, 16);
    out = pick(1, 5);
    batch = pick(1, 33);
    xent = pick(0, 1) == 1 && out >= 2;
    depth_ = pick(1, 8);
    for (int d = 0; d < depth_; ++d) {
      widths_.push_back(d + 1 == depth_ ? out : pick(1, 20));
      activations_.push_back(pick(0, 8));  // 8: none
      slopes_.push_back(std::uniform_real_distribution<double>(0.1, 0.9)(rng));
    }
  }

  template <class S>
  moonwalk::Network<S> build(std::string* description = nullptr) const {
    using namespace moonwalk;
    Network<S> net;
    std::ostringstream d;
    d << "in:" << in;
    Index w = in;
    for (int i = 0; i < depth_; ++i) {
      const Index o = widths_[static_cast<std::size_t>(i)];
      net.add(Linear<S>(w, o, {.seed = seed * 131 + static_cast<std::uint64_t>(i)}));
      d << ",linear:" << o;
      w = o;
      const S slope = static_cast<S>(slopes_[static_cast<std::size_t>(i)]);
      switch (activations_[static_cast<std::size_t>(i)]) {
        case 0:
          net.add(LeakyReLU<S>(w, slope)), d << ",leaky_relu:" << slope;
          break;
        case 1:
          net.add(ReLU<S>(w)), d << ",relu";
          break;
        case 2:
          net.add(Tanh<S>(w)), d << ",tanh";
          break;
        case 3:
          net.add(Sigmoid<S>(w)), d << ",sigmoid";
          break;
        case 4:
          net.add(Softplus<S>(w)), d << ",softplus";
          break;
        case 5:
          net.add(ELU<S>(w)), d << ",elu";
          break;
        case 6:
          net.add(Identity<S>(w)), d << ",identity";
          break;
        case 7:
          net.add(LeakyReLU<S>(w, S(0.5))), d << ",leaky_relu:0.5";
          break;
        default:
          break;
      }
    }
    if (description)
      *description = d.str() + (xent ? " (xent" : " (mse") + ", batch " + std::to_string(batch) + ", seed " +
                     std::to_string(seed) + ")";
    return net;
  }

  [[nodiscard]] std::size_t depth() const { return static_cast<std::size_t>(depth_); }

 private:
  int depth_ = 0;
  std::vector<moonwalk::Index> widths_;
  std::vector<int> activations_;
  std::vector<double> slopes_;
};

/// Seeded N(0, 1) batch.
template <class S>
moonwalk::Matrix<S> random_batch(moonwalk::Index rows, moonwalk::Index cols, std::uint64_t seed) {
  return moonwalk::gaussian<S>(rows, cols, seed);
}

/// Seeded labels in [0, classes).
inline std::vector<moonwalk::Index> random_labels(moonwalk::Index classes, moonwalk::Index n,
                                                  std::uint64_t seed) {
  std::mt19937_64 rng(seed);
  std::vector<moonwalk::Index> t(static_cast<std::size_t>(n));
  for (auto& v : t) v = std::uniform_int_distribution<moonwalk::Index>(0, classes - 1)(rng);
  return t;
}

/// Per parameter tensor (layer block) max|g − ref| / max|ref|, maximised over
/// tensors; blocks whose reference is all zero use the absolute error.
template <class A, class B>
double max_rel_err_per_tensor(const A& g, const B& ref, const std::vector<moonwalk::Index>& offsets) {
  double worst = 0;
  for (std::size_t k = 0; k + 1 < offsets.size(); ++k) {
    const moonwalk::Index o = offsets[k], n = offsets[k + 1] - o;
    if (n == 0) continue;
    const auto gs = g.segment(o, n).template cast<double>();
    const auto rs = ref.segment(o, n).template cast<double>();
    worst = std::max(worst, moonwalk::detail::rel_max_err(gs, rs));
  }
  return worst;
}

}  // namespace moonwalk_test
