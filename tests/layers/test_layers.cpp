// Every layer through the one generic checker (support/layer_check.hpp), for
// float and double: one line per layer.
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/coupling.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/layers/orthogonal.hpp>
#include <moonwalk/layers/pad.hpp>
#include <moonwalk/nets/any_layer.hpp>
#include <moonwalk/nets/network.hpp>
#include <moonwalk/nets/sequential.hpp>

#include "support/layer_check.hpp"

using moonwalk::AdditiveCoupling;
using moonwalk::AffineCoupling;
using moonwalk::AnyLayer;
using moonwalk::ELU;
using moonwalk::Identity;
using moonwalk::LeakyReLU;
using moonwalk::Linear;
using moonwalk::Network;
using moonwalk::OrthogonalLinear;
using moonwalk::ReLU;
using moonwalk::Sequential;
using moonwalk::Sigmoid;
using moonwalk::Softplus;
using moonwalk::Tanh;
using moonwalk::ZeroPad;
using mwtest::perturbed;

namespace {
// Coupling blocks are spelled with explicit template arguments: deducing them
// through the alias templates AdditiveCoupling/AffineCoupling (CTAD for alias
// templates) needs clang 19, and the fuzz and sanitizer builds use clang 14.
template <class S>
using Branch = Sequential<Linear<S>, Tanh<S>, Linear<S>>;
/// A coupling branch: linear:HIDDEN, tanh, linear:OUT (perturbed so biases are exercised).
template <class S>
Branch<S> branch(moonwalk::Index in, moonwalk::Index hidden, moonwalk::Index out, std::uint64_t seed) {
  return Sequential(perturbed(Linear<S>(in, hidden, {.seed = seed}), seed + 1), Tanh<S>(hidden),
                    perturbed(Linear<S>(hidden, out, {.seed = seed + 2}), seed + 3));
}
template <class S>
Network<S> runtime_chain() {
  Network<S> n;
  n.add(Linear<S>(5, 6, {.seed = 21})).add(ReLU<S>(6)).add(Linear<S>(6, 4, {.seed = 22})).add(Softplus<S>(4));
  return n;
}
}  // namespace

// ---- Linear: submersive (out <= in), invertible (square), fragmental (out > in)
MOONWALK_LAYER_TEST("linear contracting 7->5", (Linear<S>(7, 5, {.seed = 1})))
MOONWALK_LAYER_TEST("linear square 6->6", (Linear<S>(6, 6, {.seed = 2})))
MOONWALK_LAYER_TEST("linear expanding 4->7 (fragmental)", (Linear<S>(4, 7, {.seed = 3})))
// general W (not orthogonal) and non-zero b
MOONWALK_LAYER_TEST("linear contracting 7->5, perturbed W and b",
                    (perturbed(Linear<S>(7, 5, {.seed = 4}), 41)))
MOONWALK_LAYER_TEST("linear square 6->6, perturbed W and b", (perturbed(Linear<S>(6, 6, {.seed = 5}), 51)))
MOONWALK_LAYER_TEST("linear expanding 4->7, perturbed W and b", (perturbed(Linear<S>(4, 7, {.seed = 6}), 61)))
MOONWALK_LAYER_TEST("linear 5->3, gain 2", (Linear<S>(5, 3, {.seed = 7, .gain = S(2)})))

// ---- OrthogonalLinear (Cayley): submersive and invertible; perturbed U and non-zero b
MOONWALK_LAYER_TEST("orthogonal 6", (OrthogonalLinear<S>(6, {.seed = 10})))
MOONWALK_LAYER_TEST("orthogonal 5, perturbed U and b", (perturbed(OrthogonalLinear<S>(5, {.seed = 11}), 111)))
MOONWALK_LAYER_TEST("any_layer(orthogonal 4)", (AnyLayer<S>(OrthogonalLinear<S>(4, {.seed = 12}))))

// ---- elementwise activations
MOONWALK_LAYER_TEST("leaky_relu slope 0.1", (LeakyReLU<S>(5, S(0.1))))
MOONWALK_LAYER_TEST("leaky_relu slope 0.5", (LeakyReLU<S>(5, S(0.5))))
MOONWALK_LAYER_TEST("tanh", (Tanh<S>(5)))
MOONWALK_LAYER_TEST("sigmoid", (Sigmoid<S>(5)))
MOONWALK_LAYER_TEST("softplus", (Softplus<S>(5)))
MOONWALK_LAYER_TEST("elu", (ELU<S>(5)))
MOONWALK_LAYER_TEST("relu (fragmental)", (ReLU<S>(5)))
MOONWALK_LAYER_TEST("identity", (Identity<S>(4)))

// ---- the type-erased wrapper passes the same checks as what it wraps
MOONWALK_LAYER_TEST("any_layer(linear contracting 6->4)", (AnyLayer<S>(Linear<S>(6, 4, {.seed = 8}))))
MOONWALK_LAYER_TEST("any_layer(linear expanding 3->5)", (AnyLayer<S>(Linear<S>(3, 5, {.seed = 9}))))
MOONWALK_LAYER_TEST("any_layer(relu)", (AnyLayer<S>(ReLU<S>(5))))
MOONWALK_LAYER_TEST("any_layer(tanh)", (AnyLayer<S>(Tanh<S>(5))))
MOONWALK_LAYER_TEST("any_layer(leaky_relu)", (AnyLayer<S>(LeakyReLU<S>(5, S(0.2)))))

// ---- the registration itself: one expression, built for S and for double
TEST_CASE("layer check: the double twin comes from the same expression", "[layers][layer_check][meta]") {
  auto make = [](auto tag) {
    using S = typename decltype(tag)::type;
    return perturbed(Linear<S>(4, 3, {.seed = 9}), 99);
  };
  const auto f = make(std::type_identity<float>{});
  const auto d = make(std::type_identity<double>{});
  REQUIRE(f.num_params() == d.num_params());
  // same seeds: the double layer is the float one up to float rounding
  CHECK(mwtest::rel_err(f.W(), d.W()) < 1e-6);
  CHECK(mwtest::rel_err(f.b(), d.b()) < 1e-6);
  CHECK(d.b().norm() > 0.1);                                            // perturbed() gives non-zero biases
  CHECK((d.W() - Linear<double>(4, 3, {.seed = 9}).W()).norm() > 0.1);  // and a non-orthogonal W
  const auto report = mwtest::test_layer<float>(make);
  CHECK(report.failures.empty());
  CHECK(report.checks >= 25);
}

// ---- reversible blocks and padding
MOONWALK_LAYER_TEST("additive coupling 3+4",
                    (AdditiveCoupling<Branch<S>, Branch<S>>(branch<S>(4, 6, 3, 31), branch<S>(3, 5, 4, 35))))
MOONWALK_LAYER_TEST("affine coupling 3+3",
                    (AffineCoupling<Branch<S>, Branch<S>>(branch<S>(3, 6, 3, 41), branch<S>(3, 5, 3, 45))))
MOONWALK_LAYER_TEST("zero pad 4->7 (fragmental)", (ZeroPad<S>(4, 7)))
MOONWALK_LAYER_TEST("zero pad 4->4", (ZeroPad<S>(4, 4)))

// ---- chains are layers too (coupling branches)
MOONWALK_LAYER_TEST("sequential chain", (branch<S>(4, 6, 3, 51)))
MOONWALK_LAYER_TEST("runtime network chain", (runtime_chain<S>()))
MOONWALK_LAYER_TEST("any_layer(additive coupling)",
                    (AnyLayer<S>(AdditiveCoupling<Branch<S>, Branch<S>>(branch<S>(3, 4, 3, 61),
                                                                        branch<S>(3, 4, 3, 65)))))
