// BatchNorm, LayerNorm and Dropout: the generic checker (float and double),
// and their step and mode (core/step.hpp). Under every schedule:
// tests/schedules/test_by_name.cpp and test_moonwalk.cpp.
#include <moonwalk/layers/dropout.hpp>
#include <moonwalk/layers/normalization.hpp>
#include <moonwalk/losses/losses.hpp>
#include <moonwalk/nets/any_layer.hpp>
#include <moonwalk/nets/parameters.hpp>
#include <moonwalk/nets/spec.hpp>
#include <moonwalk/optim/optimizers.hpp>
#include <moonwalk/schedules/backprop.hpp>
#include <string>

#include "support/layer_check.hpp"

using moonwalk::AnyLayer;
using moonwalk::BatchNorm;
using moonwalk::Dropout;
using moonwalk::LayerNorm;
using moonwalk::Matrix;
using mwtest::perturbed;

namespace {
/// The layer in evaluation mode, with running statistics away from (0, 1).
template <class S>
BatchNorm<S> evaluating(BatchNorm<S> l) {
  for (moonwalk::Index c = 0; c < l.channels(); ++c) {
    l.running_mean()(c) = 0.3 * static_cast<double>(c) - 0.2;
    l.running_var()(c) = 0.5 + 0.25 * static_cast<double>(c);
  }
  l.set_training(false);
  return l;
}
template <class L>
L evaluation_mode(L l) {
  moonwalk::set_training(l, false);
  return l;
}
}  // namespace

// At eps = 0 the normalisation's Jᵀ erases exactly the mean and x̂ directions,
// the fragment's two numbers per group (layers/normalization.hpp).
MOONWALK_LAYER_TEST("batchnorm 5, training, eps 0 (fragmental)",
                    (perturbed(BatchNorm<S>(5, 1, {.eps = 0}), 71)))
MOONWALK_LAYER_TEST("batchnorm 2 channels of 3, training, eps 0",
                    (perturbed(BatchNorm<S>(2, 3, {.eps = 0}), 72)))
MOONWALK_LAYER_TEST("batchnorm 5, evaluation (submersive)", (evaluating(perturbed(BatchNorm<S>(5), 73))))
MOONWALK_LAYER_TEST("layernorm 6, eps 0 (fragmental)", (perturbed(LayerNorm<S>(6, {.eps = 0}), 74)))
MOONWALK_LAYER_TEST("dropout 6, p 0.3, training (fragmental)", (Dropout<S>(6, 0.3, 7)))
MOONWALK_LAYER_TEST("dropout 6, evaluation (identity)", (evaluation_mode(Dropout<S>(6, 0.3, 7))))
MOONWALK_LAYER_TEST("any_layer(batchnorm)", (AnyLayer<S>(perturbed(BatchNorm<S>(4, 1, {.eps = 0}), 75))))
MOONWALK_LAYER_TEST("any_layer(layernorm)", (AnyLayer<S>(perturbed(LayerNorm<S>(5, {.eps = 0}), 76))))
MOONWALK_LAYER_TEST("any_layer(dropout)", (AnyLayer<S>(Dropout<S>(5, 0.4, 8))))

TEST_CASE("normalisation at the default eps: every check holds but the exact cokernel",
          "[layers][normalization]") {
  // At eps > 0, Jᵀ only shrinks the x̂ direction (by eps/(var + eps)); the
  // fragment keeps that component too, rather than dividing by the shrink.
  auto only_cokernel = [](const mwtest::LayerCheckReport& r) {
    for (const auto& f : r.failures)
      if (f.rfind("[fragment-cokernel]", 0) != 0) return false;
    return true;
  };
  const auto bn = mwtest::test_layer_pair(perturbed(BatchNorm<double>(5), 81),
                                          perturbed(BatchNorm<double>(5), 81), {}, /*to_catch=*/false);
  INFO(bn.str());
  CHECK(bn.checks >= 25);
  CHECK(only_cokernel(bn));
  const auto ln = mwtest::test_layer_pair(perturbed(LayerNorm<double>(6), 82),
                                          perturbed(LayerNorm<double>(6), 82), {}, /*to_catch=*/false);
  INFO(ln.str());
  CHECK(ln.checks >= 25);
  CHECK(only_cokernel(ln));
}

TEST_CASE("dropout: the mask is keyed on (seed, step) and replayed in every pass", "[layers][dropout]") {
  Dropout<double> d(50, 0.3, 11);
  const Matrix<double> x = Matrix<double>::Ones(50, 40);
  const Matrix<double> y0 = d.forward(x);
  CHECK(d.forward(x) == y0);                                            // same step: same mask
  CHECK(d.cast<float>().forward(x.cast<float>()) == y0.cast<float>());  // a cast draws the same mask
  const double dropped = static_cast<double>((y0.array() == 0).count()) / 2000.0;
  CHECK(dropped > 0.25);
  CHECK(dropped < 0.35);
  CHECK(((y0.array() == 0) || (y0.array() - 1 / 0.7).abs() < 1e-12).all());
  d.set_step(1);
  const Matrix<double> y1 = d.forward(x);
  CHECK(y1 != y0);
  CHECK(Dropout<double>(50, 0.3, 12).forward(x) != y0);  // another seed, another stream
  d.set_training(false);
  CHECK(d.forward(x) == x);
  CHECK_THROWS_AS(Dropout<double>(4, 1.0), moonwalk::Error);
  CHECK_THROWS_AS(Dropout<double>(4, -0.1), moonwalk::Error);
}

TEST_CASE("set_training and set_step reach layers inside composites", "[layers][normalization]") {
  using namespace moonwalk;
  auto net = parse_network<double>("in:4,dropout:0.5,coupling:additive:3,batchnorm", 41);
  CHECK(couples_batch(net));
  set_training(net, false);
  CHECK_FALSE(couples_batch(net));
  const Matrix<double> x = gaussian<double>(4, 3, 42);
  CHECK(net[0].forward(x) == x);  // dropout off
  set_training(net, true);
  const Matrix<double> y0 = net[0].forward(x);
  set_step(net, 7);
  const Matrix<double> y7 = net[0].forward(x);
  CHECK(y7 != y0);
  // An optimizer step moves the network to its step count (1 after the first).
  Sgd<double> opt{.lr = 0.0};
  (void)gradient(Backprop{}, net, x, MSE<double>{}, gaussian<double>(4, 3, 43));
  opt.step(net);
  const Matrix<double> y_opt = net[0].forward(x);
  CHECK(y_opt != y7);
  set_step(net, 1);
  CHECK(net[0].forward(x) == y_opt);
}

TEST_CASE("running statistics are buffers: read and restored through any network",
          "[layers][normalization]") {
  using namespace moonwalk;
  const std::string spec = "in:4,batchnorm,linear:3,coupling:additive:2,residual:5,batchnorm,linear:2";
  auto net = parse_network<double>(spec, 61);
  REQUIRE(get_buffers(net).size() == 2 * 4 + 2 * 3);  // mean and variance per feature
  const Matrix<double> x = gaussian<double>(4, 9, 62);
  (void)gradient(Backprop{}, net, x, MSE<double>{}, gaussian<double>(2, 9, 63));  // folds batch statistics
  const Vector<double> running = get_buffers(net);
  CHECK(running.head(4) != Vector<double>::Zero(4));  // the first layer's running mean moved
  // A fresh network of the same spec given θ and the buffers evaluates the same.
  auto twin = parse_network<double>(spec, 64);
  set_parameters(twin, get_parameters(net));
  set_buffers(twin, running);
  CHECK(get_buffers(twin) == running);
  set_training(net, false);
  set_training(twin, false);
  CHECK(net.forward(x) == twin.forward(x));
  CHECK_THROWS_WITH(set_buffers(twin, Vector<double>::Zero(3)),
                    Catch::Contains("3 entries") && Catch::Contains("14 buffer values"));
  // A network without stateful layers holds none.
  auto plain = parse_network<double>("in:4,linear:3,tanh", 65);
  CHECK(get_buffers(plain).size() == 0);
}
