// Reference backprop against central finite differences in double: parameter
// gradient, input cotangent h0, loss value and the bytes it keeps.
#include <cmath>
#include <moonwalk/moonwalk.hpp>
#include <string>
#include <vector>

#include "support/check_util.hpp"

using moonwalk::Index;
using mwtest::Mat;
using mwtest::Vec;

namespace {

using D = double;

struct Widths {
  const char* kind;
  Index w0, w1, w2, w3;  // linear w0->w1, w1->w2, w2->w3
};

const std::vector<Widths> kWidths{
    {"contracting", 8, 6, 5, 3},
    {"square", 5, 5, 5, 5},
    {"expanding", 3, 4, 6, 8},
};

/// linear, tanh, linear, leaky_relu(0.1), linear: static types.
auto make_static(const Widths& w, std::uint64_t seed) {
  using namespace moonwalk;
  return Sequential(Linear<D>(w.w0, w.w1, {.seed = seed}), Tanh<D>(w.w1),
                    Linear<D>(w.w1, w.w2, {.seed = seed + 1}), LeakyReLU<D>(w.w2, 0.1),
                    Linear<D>(w.w2, w.w3, {.seed = seed + 2}));
}

/// linear, relu, linear, softplus, linear, elu: chosen at run time.
moonwalk::Network<D> make_runtime(const Widths& w, std::uint64_t seed) {
  using namespace moonwalk;
  Network<D> n;
  n.add(Linear<D>(w.w0, w.w1, {.seed = seed}))
      .add(ReLU<D>(w.w1))
      .add(Linear<D>(w.w1, w.w2, {.seed = seed + 1}))
      .add(Softplus<D>(w.w2))
      .add(Linear<D>(w.w2, w.w3, {.seed = seed + 2}))
      .add(ELU<D>(w.w3));
  return n;
}

/// Smallest |input| of a layer with a kink at 0 ((leaky) ReLU, ELU): central
/// differences with step h are exact only if no input is within ~h of a kink.
template <class N>
double kink_distance(const N& net, const Mat<D>& x0) {
  double d = std::numeric_limits<double>::infinity();
  Mat<D> x = x0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      const std::string n = l.name();
      if (n.rfind("relu", 0) == 0 || n.rfind("leaky_relu", 0) == 0 || n.rfind("elu", 0) == 0)
        d = std::min(d, x.cwiseAbs().minCoeff());
      x = l.forward(x);
    });
  return d;
}

template <class N, class Loss>
void check_against_fd(N& net, const Loss& loss, const typename Loss::target_type& target, Index batch,
                      std::uint64_t seed) {
  const Index P = moonwalk::num_parameters(net), n0 = net.in_features();
  // random parameters everywhere (biases included), kept O(1)
  const Vec<D> theta = moonwalk::get_parameters(net) + 0.5 * mwtest::randn(P, 1, seed * 7 + 1);
  moonwalk::set_parameters(net, theta);
  const auto offsets = moonwalk::parameter_offsets(net);
  for (std::size_t i = 0; i < net.size();
       ++i)  // every Linear's bias (the last out entries of its block) is non-zero
    net.visit(i, [&](const auto& l) {
      if (l.num_params() > 0)
        CHECK(theta.segment(offsets[i + 1] - l.out_features(), l.out_features()).cwiseAbs().minCoeff() > 0);
    });
  const Mat<D> x = mwtest::randn(n0, batch, seed * 7 + 2);
  const double h = 1e-5;
  // Precondition for exact central differences: one coordinate step h moves a
  // pre-activation by h times one O(1) input or weight entry (|.| < 10 here), so
  // no kink may lie within 100 h.
  REQUIRE(kink_distance(net, x) > 100 * h);

  const auto r = moonwalk::gradient(moonwalk::Backprop{.input_gradient = true}, net, x, loss, target);

  // loss value
  CHECK(r.loss == loss.value(net.forward(x), target));

  // parameter gradient, coordinate by coordinate
  Vec<D> g_fd(P);
  for (Index k = 0; k < P; ++k) {
    Vec<D> tp = theta, tm = theta;
    tp(k) += h;
    tm(k) -= h;
    moonwalk::set_parameters(net, tp);
    const double lp = loss.value(net.forward(x), target);
    moonwalk::set_parameters(net, tm);
    const double lm = loss.value(net.forward(x), target);
    g_fd(k) = (lp - lm) / (2 * h);
  }
  moonwalk::set_parameters(net, theta);
  REQUIRE(r.gradient.size() == P);
  CHECK(mwtest::rel_err(r.gradient, g_fd) <= 1e-7);
  CHECK((r.gradient - g_fd).cwiseAbs().maxCoeff() <= 1e-7 * g_fd.cwiseAbs().maxCoeff());
  CHECK(moonwalk::get_gradients(net) == r.gradient);  // also left in the layers' storage

  // h0 = ∂ℓ/∂x0, entry by entry
  Mat<D> h0_fd(n0, batch);
  for (Index j = 0; j < batch; ++j)
    for (Index i = 0; i < n0; ++i) {
      Mat<D> xp = x, xm = x;
      xp(i, j) += h;
      xm(i, j) -= h;
      h0_fd(i, j) = (loss.value(net.forward(xp), target) - loss.value(net.forward(xm), target)) / (2 * h);
    }
  REQUIRE(r.h0.rows() == n0);
  REQUIRE(r.h0.cols() == batch);
  CHECK(mwtest::rel_err(r.h0, h0_fd) <= 1e-7);

  // backprop keeps every layer's input: Σ in_features · batch · sizeof(double)
  std::size_t bytes = 0;
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i,
              [&](const auto& l) { bytes += static_cast<std::size_t>(l.in_features() * batch) * sizeof(D); });
  CHECK(r.stats.residual_bytes == bytes);
  CHECK(r.stats.saved.size() == net.size());
  CHECK(r.stats.bytes_of("activation") == bytes);
}

template <class Make>
void run_all(Make make) {
  for (const std::uint64_t seed : {1u, 2u, 3u})
    for (const auto& w : kWidths)
      for (const Index batch : {1, 4}) {
        INFO("seed " << seed << ", " << w.kind << " widths " << w.w0 << "-" << w.w1 << "-" << w.w2 << "-"
                     << w.w3 << ", batch " << batch);
        {
          INFO("mse");
          auto net = make(w, seed);
          const Mat<D> t = mwtest::randn(w.w3, batch, seed * 7 + 3);
          check_against_fd(net, moonwalk::MSE<D>{}, t, batch, seed);
        }
        {
          INFO("xent");
          auto net = make(w, seed);
          std::vector<Index> labels;
          for (Index b = 0; b < batch; ++b)
            labels.push_back(static_cast<Index>((seed + 3 * static_cast<std::uint64_t>(b)) %
                                                static_cast<std::uint64_t>(w.w3)));
          check_against_fd(net, moonwalk::SoftmaxCrossEntropy<D>{}, labels, batch, seed + 100);
        }
      }
}

}  // namespace

TEST_CASE("reference backprop matches finite differences: static Sequential", "[reference][backprop]") {
  run_all([](const Widths& w, std::uint64_t seed) { return make_static(w, seed); });
}

TEST_CASE("reference backprop matches finite differences: runtime Network", "[reference][backprop]") {
  run_all([](const Widths& w, std::uint64_t seed) { return make_runtime(w, seed); });
}
