// Every schedule on reversible networks (zero padding, additive and affine
// coupling blocks, LeakyReLU or tanh between blocks, a Linear head) against
// reference backprop, static and runtime, double and float.
#include <catch2/catch.hpp>
#include <map>
#include <moonwalk/moonwalk.hpp>

#include "support/random_net.hpp"
#include "support/revnets.hpp"

using namespace moonwalk;
using moonwalk_test::max_rel_err_per_tensor;

namespace {

/// Random RevNets with smooth branch activations (support/revnets.hpp).
std::string random_revnet_spec(std::uint64_t seed) {
  return moonwalk_test::random_revnet_spec(seed, {"tanh", "sigmoid", "elu", "softplus"});
}

/// schedule -> (runs, runs within the default target)
using Tally = std::map<std::string, std::pair<int, int>>;

template <class S>
void every_schedule_on(const std::string& spec, std::uint64_t seed, Tally& tally) {
  Network<S> net = parse_network<S>(spec, seed);
  Network<double> truth_net = parse_network<double>(spec, seed);
  set_parameters(truth_net, get_parameters(net).template cast<double>());
  const Index B = 1 + static_cast<Index>(seed % 9);
  const Matrix<double> x = gaussian<double>(net.in_features(), B, seed + 1000);
  const auto t = moonwalk_test::random_labels(net.out_features(), B, seed + 2000);
  const SoftmaxCrossEntropy<S> loss;
  const auto truth =
      gradient(Backprop{.input_gradient = true}, truth_net, x, SoftmaxCrossEntropy<double>{}, t);
  const Matrix<S> xs = x.cast<S>();
  const auto offs = parameter_offsets(net);
  const std::size_t L = net.size();
  auto err = [&](const GradientResult<S>& r) {
    return std::max(max_rel_err_per_tensor(r.gradient, truth.gradient, offs),
                    detail::rel_max_err(r.h0.template cast<double>(), truth.h0));
  };
  INFO(spec << " [" << (sizeof(S) == 4 ? "float" : "double") << ", batch " << B << "]");
  // Exact reorganisations of backprop: at backprop's rounding floor.
  for (const auto& r : {gradient(Backprop{.input_gradient = true}, net, xs, loss, t),
                        gradient(Checkpointing{.input_gradient = true}, net, xs, loss, t),
                        gradient(Checkpointing{.slots = 2, .input_gradient = true}, net, xs, loss, t),
                        gradient(NaiveForward{}, net, xs, loss, t)}) {
    INFO(r.stats.schedule << " err " << err(r));
    CHECK(within_error_model<S>(err(r), 0.0, L));
  }
  // Schedules whose error grows (inversion drift, the forward sweep): never
  // silently wrong — the true error is within the error model's bound on
  // their own estimate. (Whether the estimate meets the default target depends
  // on the network: tanh saturated after affine blocks makes the sweep divide
  // by a tiny σ', and the estimate says so; see the tally.)
  std::vector<GradientResult<S>> drifting = {
      gradient(MixedMoonwalk{.input_gradient = true}, net, xs, loss, t),
      gradient(MixedMoonwalk{.rebuild_inputs = true, .input_gradient = true}, net, xs, loss, t),
      gradient(RevBackprop{.input_gradient = true}, net, xs, loss, t)};
  // Pure-forward cannot cross a layer that is neither submersive nor
  // fragmental (a general convolution); it says so, and is skipped there.
  bool sweepable = true;
  for (std::size_t i = 0; i < L; ++i) sweepable = sweepable && sweep_mode(net[i]) != SweepMode::anchor;
  if (sweepable)
    drifting.push_back(gradient(PureMoonwalk{}, net, xs, loss, t));
  else
    CHECK_THROWS_AS(gradient(PureMoonwalk{}, net, xs, loss, t), ScheduleError);
  for (const auto& r : drifting) {
    INFO(r.stats.schedule << " err " << err(r) << " estimate " << r.stats.error_estimate);
    CHECK(err(r) <= error_model_bound<S>(r.stats.error_estimate, L));
    ++tally[r.stats.schedule].first;
    tally[r.stats.schedule].second += within_error_model<S>(err(r), r.stats.error_estimate, L) ? 1 : 0;
  }
}

}  // namespace

TEST_CASE("Every schedule matches backprop on 25 random RevNets (double and float)", "[schedules][revnet]") {
  Tally td, tf;
  for (std::uint64_t seed = 1; seed <= 25; ++seed) {
    const std::string spec = random_revnet_spec(seed);
    every_schedule_on<double>(spec, seed, td);
    every_schedule_on<float>(spec, seed, tf);
  }
  // Most of these small RevNets are within the default target outright.
  for (const auto* t : {&td, &tf})
    for (const auto& [name, c] : *t) {
      INFO(name << ": " << c.second << " of " << c.first << " within the default target");
      CHECK(c.second * 5 >= c.first * 4);
    }
}

TEST_CASE("On a RevNet, RevBackprop and rebuilding mixed Moonwalk keep only the head's input",
          "[schedules][revnet]") {
  using S = double;
  const std::string spec = "in:32,pad:64,coupling:additive:48,leaky_relu:0.2,coupling:additive:48,linear:10";
  Network<S> net = parse_network<S>(spec, 3);
  const Matrix<S> x = gaussian<S>(32, 16, 7);
  const auto t = moonwalk_test::random_labels(10, 16, 8);
  const SoftmaxCrossEntropy<S> loss;
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, loss, t);
  const auto rb = gradient(RevBackprop{.input_gradient = true}, net, x, loss, t);
  const auto mw = gradient(MixedMoonwalk{.rebuild_inputs = true, .input_gradient = true}, net, x, loss, t);
  const auto plain = gradient(MixedMoonwalk{.input_gradient = true}, net, x, loss, t);
  const std::size_t head_input = 64 * 16 * sizeof(S), branch_bits = 64 * 16 / 8;
  // The input of linear(64->10), and the LeakyReLU's branches (one bit each).
  CHECK(rb.stats.residual_bytes == head_input + branch_bits);
  CHECK(rb.stats.bytes_of("mask") == branch_bits);
  // Rebuilding Moonwalk: the head's input (a checkpoint for the layers below), plus the padding's fragment.
  CHECK(mw.stats.bytes_of("checkpoint") == head_input);
  CHECK(mw.stats.fragment_bytes() == (64 - 32) * 16 * sizeof(S));
  CHECK(mw.stats.bytes_of("activation") == 0);
  CHECK(mw.stats.bytes_of("mask") == branch_bits);
  CHECK(plain.stats.bytes_of("activation") == 2 * head_input);  // the coupling blocks' inputs
  CHECK(mw.stats.residual_bytes < plain.stats.residual_bytes);
  CHECK(mw.stats.figures.at("reconstruction_error") < 1e-13);
  for (const auto* r : {&rb, &mw, &plain}) {
    INFO(r->stats.schedule);
    CHECK(detail::rel_max_err(r->gradient, bp.gradient) < 1e-12);
  }
}

TEST_CASE("Every schedule matches backprop on convolutional RevNets (issue 6 example and image plumbing)",
          "[schedules][revnet][conv]") {
  // Channel padding, conv coupling blocks, invertible downsampling, pooling,
  // general and submersive ("valid") convolutions, a linear head.
  const std::vector<std::string> specs = {
      "in:3x8x8,pad_channels:8,coupling:additive_conv:16,squeeze,coupling:additive_conv:32,gap,linear:10",
      "in:2x8x8,pad_channels:4,coupling:additive_conv:6:elu:0.5,tanh,squeeze,avgpool,conv_valid:8:2,gap,"
      "linear:3",
      "in:3x7x5,conv:6:3:2:1,tanh,coupling:additive_conv:4,flatten,linear:4",
      "in:4x6x6,coupling:additive:8,conv_valid:3:3,softplus,avgpool,gap,linear:2",
  };
  Tally td, tf;
  std::uint64_t seed = 40;
  for (const auto& spec : specs) {
    every_schedule_on<double>(spec, ++seed, td);
    every_schedule_on<float>(spec, seed, tf);
  }
  for (const auto* t : {&td, &tf})
    for (const auto& [name, c] : *t) {
      INFO(name << ": " << c.second << " of " << c.first << " within the default target");
      CHECK(c.second == c.first);
    }
}

TEST_CASE("On a conv RevNet, rebuilding mixed Moonwalk keeps a fraction of backprop's bytes",
          "[schedules][revnet][conv]") {
  using S = float;
  const std::string spec =
      "in:3x8x8,pad_channels:8,coupling:additive_conv:16,squeeze,coupling:additive_conv:32,gap,linear:10";
  Network<S> net = parse_network<S>(spec, 5);
  const Matrix<S> x = gaussian<S>(net.in_features(), 16, 7);
  const auto t = moonwalk_test::random_labels(10, 16, 8);
  const SoftmaxCrossEntropy<S> loss;
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, loss, t);
  const auto mw = gradient(MixedMoonwalk{.rebuild_inputs = true, .input_gradient = true}, net, x, loss, t);
  INFO(report_text(mw.stats));
  CHECK(mw.stats.within_tolerance);
  CHECK(mw.stats.residual_bytes * 3 <= bp.stats.residual_bytes);
  CHECK(detail::rel_max_err(mw.gradient, bp.gradient) < 1e-4);
}
