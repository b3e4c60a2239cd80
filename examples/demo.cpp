// Moonwalk quick-start demo (the README's main command): the gradient of a
// small submersive network by reference backprop, then by mixed and
// pure-forward Moonwalk, side by side: agreement, error estimate and the
// bytes each schedule kept between its passes.
#include <cstdio>
#include <iostream>
#include <moonwalk/moonwalk.hpp>

int main() {
  using namespace moonwalk;
  using S = float;
  // Every layer contracts (or keeps) the width: the whole network is submersive.
  Sequential net(Linear<S>(64, 48, {.seed = 1}), LeakyReLU<S>(48, 0.2f), Linear<S>(48, 32, {.seed = 2}),
                 LeakyReLU<S>(32, 0.2f), Linear<S>(32, 10, {.seed = 3}));
  const Index batch = 128;
  const Matrix<S> x = gaussian<S>(64, batch, 42);
  std::vector<Index> labels(static_cast<std::size_t>(batch));
  for (Index b = 0; b < batch; ++b) labels[static_cast<std::size_t>(b)] = b % 10;
  const SoftmaxCrossEntropy<S> loss;

  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, loss, labels);
  std::printf("network: linear 64->48, leaky_relu(0.2), linear 48->32, leaky_relu(0.2), linear 32->10\n");
  std::printf("batch %lld, %lld parameters, softmax cross-entropy loss %.6f\n", static_cast<long long>(batch),
              static_cast<long long>(num_parameters(net)), static_cast<double>(bp.loss));
  std::printf("reference backprop: |grad| = %.6e, |h0| = %.6e, kept %zu bytes between passes\n",
              static_cast<double>(bp.gradient.norm()), static_cast<double>(bp.h0.norm()),
              bp.stats.residual_bytes);

  for (const auto& r : {gradient(MixedMoonwalk{.input_gradient = true}, net, x, loss, labels),
                        gradient(PureMoonwalk{}, net, x, loss, labels)}) {
    std::printf(
        "%-8s Moonwalk: rel. error vs backprop %.2e, error estimate %.2e, kept %zu bytes (%.1f%% of "
        "backprop)\n",
        r.stats.schedule.c_str(), detail::rel_max_err(r.gradient, bp.gradient), r.stats.error_estimate,
        r.stats.residual_bytes,
        100.0 * static_cast<double>(r.stats.residual_bytes) / static_cast<double>(bp.stats.residual_bytes));
  }
  std::cout << "\nWhat mixed Moonwalk keeps between its passes:\n"
            << report_text(gradient(MixedMoonwalk{.input_gradient = true}, net, x, loss, labels).stats);
  return 0;
}
