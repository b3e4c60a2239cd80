// Seeded random RevNets and the kink network, for the tests of schedules and
// plans that rebuild inputs by inversion.
#pragma once

#include <random>
#include <sstream>
#include <string>
#include <vector>

namespace moonwalk_test {

/// in:n0, pad:w, then 1..5 random coupling blocks (additive or affine, hidden
/// width 2..12, branch scale in [0.3, 1], branch activation one of `acts`)
/// with tanh, leaky_relu:0.5 or nothing between them, then linear:out — from
/// the spec grammar, seeded. Zero padding and zero biases put the padded rows
/// after an additive block at exactly 0: a LeakyReLU there sits on its kink,
/// and the schedules that rebuild its input must take its branch from the
/// forward pass (keeps_branches), not from a rebuilt ±1e-17. Keep the branch
/// activations smooth: a coupling block re-derives its branches' kinks from
/// its rebuilt input (their pre-activations are exactly 0 there too).
inline std::string random_revnet_spec(std::uint64_t seed, const std::vector<std::string>& acts = {"tanh"}) {
  std::mt19937_64 rng(seed);
  auto pick = [&](int lo, int hi) { return std::uniform_int_distribution<int>(lo, hi)(rng); };
  const int n0 = pick(2, 8), w = 2 * pick(n0 / 2 + 1, 8), blocks = pick(1, 5);
  std::ostringstream s;
  s << "in:" << n0 << ",pad:" << w;
  for (int b = 0; b < blocks; ++b) {
    // (<< sequences its operands left to right: kind, width, activation, scale.)
    s << ",coupling:" << (pick(0, 1) ? "additive" : "affine") << ":" << pick(2, 12) << ":"
      << (acts.size() == 1 ? acts[0]
                           : acts[static_cast<std::size_t>(pick(0, static_cast<int>(acts.size()) - 1))])
      << ":" << 0.1 * pick(3, 10);
    const int between = pick(0, 2);
    if (between == 1) s << ",tanh";
    if (between == 2) s << ",leaky_relu:0.5";
  }
  s << ",linear:" << pick(2, 5);
  return s.str();
}

/// The kink network (issue 24): built with seed 9, zero padding and zero
/// biases put the LeakyReLU's (layer 3's) pre-activations of the padded rows
/// at exactly 0; rebuilt by inverting the block above, they are ±1e-17 and
/// would pick the other one-sided derivative (17.5% off backprop with an
/// estimate of 1.1e-16, before branch bits).
inline const std::string kink_revnet_spec =
    "in:10,pad:24,coupling:additive:17:tanh,coupling:affine:9,leaky_relu:0.5,coupling:additive:31,linear:4";
inline constexpr std::uint64_t kink_revnet_seed = 9;

}  // namespace moonwalk_test
