// Steady-state allocation: once a shape has been seen, the dense kernels and
// the layers' hot paths make no heap allocation at all.
//
// Its own executable (tests/CMakeLists.txt, 6.): bench/alloc_count.hpp
// interposes malloc and friends for the whole process, counting every call
// (Eigen, the standard library, OpenMP), so the difference of two readings
// around a call is every allocation the call made. Eigen runs on one thread
// here; with more, its parallel GEMM allocates per-thread blocks
// (core/dense.hpp).
#define CATCH_CONFIG_MAIN
#include <alloc_count.hpp>
#include <catch2/catch.hpp>
#include <cstdint>
#include <moonwalk/core/dense.hpp>
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/linear.hpp>
#include <moonwalk/losses/losses.hpp>
#include <moonwalk/nets/network.hpp>
#include <moonwalk/nets/parameters.hpp>
#include <moonwalk/nets/spec.hpp>
#include <moonwalk/optim/optimizers.hpp>
#include <moonwalk/schedules/by_name.hpp>
#include <moonwalk/schedules/planned.hpp>
#include <string>
#include <vector>

#include "support/check_util.hpp"

namespace {

using moonwalk::Index;
using moonwalk::detail::Op;
template <class S>
using Mat = moonwalk::Matrix<S>;

/// Heap allocations made by f().
template <class F>
std::uint64_t allocations_of(F&& f) {
  const std::uint64_t before = moonwalk::bench::allocation_count();
  f();
  return moonwalk::bench::allocation_count() - before;
}

template <class S>
Mat<S> rand(Index rows, Index cols, std::uint64_t seed) {
  return mwtest::randn(rows, cols, seed).cast<S>();
}

}  // namespace

TEST_CASE("the allocation counter sees Eigen's allocations (control)", "[alloc]") {
  Eigen::setNbThreads(1);
  const Mat<double> A = rand<double>(300, 300, 1);
  Mat<double> C(300, 300);
  // Eigen's own product packs its operands on the heap above 128 KiB.
  CHECK(allocations_of([&] { C.noalias() = A * A; }) > 0);
}

TEMPLATE_TEST_CASE("dense kernels allocate nothing once warm", "[alloc]", float, double) {
  using S = TestType;
  Eigen::setNbThreads(1);
  const Mat<S> A = rand<S>(784, 256, 1), B = rand<S>(256, 512, 2);
  Mat<S> C(784, 512), D(256, 512), R = rand<S>(256, 256, 3);
  R.diagonal().array() += S(20);
  moonwalk::detail::BlockedQR<S> qr;
  auto all = [&] {
    moonwalk::detail::gemm<S>(C, A, Op::N, B, Op::N);
    moonwalk::detail::gemm<S>(D, A, Op::T, C, Op::N, S(1), true);
    moonwalk::detail::gemm<S>(R, D, Op::N, B, Op::T, S(1e-3), true);
    moonwalk::detail::trsm_upper<S>(R, Op::N, D);
    moonwalk::detail::trsm_upper<S>(R, Op::T, D);
    qr.compute(A);
    qr.apply_qt(C);
    qr.apply_q(C);
  };
  all();  // warm: storage and scratch sized
  CHECK(allocations_of(all) == 0);
}

TEMPLATE_TEST_CASE("Linear's hot paths allocate nothing once warm, across weight versions", "[alloc]", float,
                   double) {
  using S = TestType;
  Eigen::setNbThreads(1);
  moonwalk::Linear<S> wide(784, 256);  // submersive: vijp by the reflectors or by P
  for (Index batch : {Index(128), Index(8 * 256)}) {
    CAPTURE(batch);
    const Mat<S> x = rand<S>(784, batch, 4), hy0 = rand<S>(256, batch, 5);
    Mat<S> y(256, batch), hx(784, batch), hy(256, batch);
    moonwalk::Vector<S> g = moonwalk::Vector<S>::Zero(wide.num_params());
    auto step = [&] {
      wide.forward_into(x, y);
      wide.vjp_into(x, hy0, hx);
      wide.vjp_params(x, hy0, g);
      wide.vijp_into(x, hx, hy);  // the factorisation of this weight version, then the solve
      wide.W()(0, 0) += S(1e-3);  // a new weight version, as an optimizer step makes
    };
    step();
    step();
    CHECK(allocations_of(step) == 0);
    CHECK((hy - hy0).norm() <= S(1e-2) * hy0.norm());  // it did solve Wᵀ h_y = h_x
  }
}

TEST_CASE("release_thread_scratch gives the scratch back, and the next call takes it again", "[alloc]") {
  Eigen::setNbThreads(1);
  const Mat<double> A = rand<double>(300, 200, 1), B = rand<double>(200, 100, 2);
  Mat<double> C(300, 100);
  moonwalk::release_thread_scratch();  // (what the cases above grew it to)
  CHECK(moonwalk::thread_scratch_bytes() == 0);
  moonwalk::detail::gemm<double>(C, A, Op::N, B, Op::N);
  const std::size_t held = moonwalk::thread_scratch_bytes();
  CHECK(held > 0);
  // Float and double share the roles: a float product of the same shape needs no more.
  const Mat<float> Af = A.cast<float>(), Bf = B.cast<float>();
  Mat<float> Cf(300, 100);
  CHECK(allocations_of([&] { moonwalk::detail::gemm<float>(Cf, Af, Op::N, Bf, Op::N); }) == 0);
  CHECK(moonwalk::thread_scratch_bytes() == held);
  moonwalk::release_thread_scratch();
  CHECK(moonwalk::thread_scratch_bytes() == 0);
  // (Its large blocks are anonymous mappings, which the counter counts too.)
  CHECK(allocations_of([&] { moonwalk::detail::gemm<double>(C, A, Op::N, B, Op::N); }) > 0);
  CHECK(moonwalk::thread_scratch_bytes() == held);
  CHECK(allocations_of([&] { moonwalk::detail::gemm<double>(C, A, Op::N, B, Op::N); }) == 0);
}

TEST_CASE("zero_gradients and an optimizer step on a run-time network allocate nothing once warm",
          "[alloc]") {
  // Each asks every layer for its blocks: a flat layer's one block is held in place (Blocks).
  moonwalk::Network<float> net;
  net.add(moonwalk::Linear<float>(30, 20))
      .add(moonwalk::LeakyReLU<float>(20, 0.1f))
      .add(moonwalk::Linear<float>(20, 5));
  moonwalk::Sgd<float> sgd{.lr = 1e-3, .momentum = 0.9};
  moonwalk::Adam<float> adam{.lr = 1e-3};
  auto step = [&] {
    moonwalk::zero_gradients(net);
    sgd.step(net);
    adam.step(net);
  };
  step();  // the optimizers' state is sized on their first step
  CHECK(allocations_of(step) == 0);
  // A list of more blocks than are held in place still lists them all, in order.
  moonwalk::Blocks<std::span<float>> many;
  std::vector<float> storage(6);
  for (std::size_t i = 0; i < 6; ++i) many.push_back(std::span<float>(storage.data() + i, 1));
  REQUIRE(many.size() == 6);
  for (std::size_t i = 0; i < 6; ++i) CHECK(many[i].data() == storage.data() + i);
  const std::vector<std::span<float>> as_vector = many;
  CHECK(as_vector.size() == 6);
  CHECK(as_vector[5].data() == storage.data() + 5);
}

TEST_CASE(
    "a training step through gradient_into allocates nothing once warm: backprop, mixed Moonwalk, plans",
    "[alloc]") {
  // The Fashion-MNIST MLP of BENCHMARKS.md at batch 128, with a result kept
  // across steps: the gradient, h_0, the report's entries, names, maps and
  // the amplification list are all filled in place.
  Eigen::setNbThreads(1);
  auto net = moonwalk::parse_network<float>(
      "in:784,linear:256,leaky_relu:0.1,linear:128,leaky_relu:0.1,linear:100,leaky_relu:0.1,linear:10", 7);
  const Mat<float> x = rand<float>(784, 128, 3);
  std::vector<Index> labels(128);
  for (std::size_t b = 0; b < labels.size(); ++b) labels[b] = static_cast<Index>(b % 10);
  const moonwalk::SoftmaxCrossEntropy<float> loss;
  moonwalk::Sgd<float> sgd{.lr = 1e-3, .momentum = 0.9};
  moonwalk::GradientResult<float> r;
  auto steps = [&](const auto& schedule) {
    auto step = [&] {
      moonwalk::gradient_into(schedule, net, x, loss, labels, r);
      sgd.step(net);
    };
    step();  // sizes the workspace, the result and the optimizer's state
    step();
    CHECK(allocations_of([&] {
            for (int k = 0; k < 3; ++k) step();
          }) == 0);
    CHECK(r.stats.within_tolerance);
    CHECK(r.gradient.size() == moonwalk::num_parameters(net));
    CHECK(r.stats.saved.size() > 0);
  };
  SECTION("by name, as the trainer runs them") {
    for (const char* name : {"backprop", "mixed", "checkpoint", "binomial", "planned"}) {
      INFO(name);
      // (planned: costs estimated, so the test writes no cost file; a budget
      // between backprop's working set and the least, so the plan recomputes.)
      const moonwalk::ScheduleChoice choice{
          .name = name, .budget = 600 * 1024, .calibration = moonwalk::Calibration::estimate};
      auto by_name = [&] {
        moonwalk::with_schedule(choice, net.size(), [&](const auto& schedule) {
          moonwalk::gradient_into(schedule, net, x, loss, labels, r);
        });
        sgd.step(net);
      };
      by_name();
      by_name();
      CHECK(allocations_of([&] {
              for (int k = 0; k < 3; ++k) by_name();
            }) == 0);
      CHECK(r.stats.schedule == (std::string(name) == "binomial" ? "checkpoint" : name));
    }
  }
  SECTION("mixed, anchors every second layer") {
    moonwalk::MixedMoonwalk m{};
    m.anchors.every = 2;
    steps(m);
    CHECK(r.stats.anchor_layers.size() >= 3);
  }
  SECTION("mixed, double cotangents") {
    moonwalk::MixedMoonwalk m{};
    m.fidelity.precision = moonwalk::Precision::double_cotangents;
    steps(m);
    CHECK(r.stats.precision == "double");
  }
}

TEST_CASE("planning a step takes no more memory than the step it plans", "[alloc]") {
  // The planner's table is sized by the budget (Planned::table_entries) and
  // mapped outside the heap. On an 82-layer chain at its tightest budgets
  // (values of 256 KiB; a table of the old fixed size would be 3 MiB, three
  // times the least budget), the first step's heap peak — costs, plan and
  // step — stays within the budget, the product scratch and the plan's
  // bookkeeping (its step list: about L²/2 steps).
  Eigen::setNbThreads(1);
  std::string spec = "in:128";
  for (int i = 0; i < 80; ++i) spec += ",leaky_relu:0.1";
  spec += ",linear:10";
  auto net = moonwalk::parse_network<float>(spec, 3);
  const Index batch = 512;
  const Mat<float> x = rand<float>(128, batch, 5);
  std::vector<Index> labels(batch);
  for (std::size_t b = 0; b < labels.size(); ++b) labels[b] = static_cast<Index>(b % 10);
  const moonwalk::SoftmaxCrossEntropy<float> loss;
  const moonwalk::Planned probe{.calibration = moonwalk::Calibration::estimate, .invert = false};
  const std::size_t least = probe.smallest_budget(net, x);
  const std::size_t value = 128 * batch * sizeof(float);
  for (const std::size_t budget : {least, least + value, least + 4 * value}) {
    INFO("budget " << budget << " (least " << least << ")");
    const moonwalk::Planned planned{
        .budget = budget, .calibration = moonwalk::Calibration::estimate, .invert = false};
    moonwalk::GradientResult<float> r;
    r.flat_gradient = false;
    moonwalk::release_thread_scratch();
    const std::int64_t before = moonwalk::bench::heap_live_bytes();
    moonwalk::bench::reset_live_peak();
    moonwalk::gradient_into(planned, net, x, loss, labels, r);
    const auto peak = static_cast<std::size_t>(moonwalk::bench::heap_live_peak() - before);
    const std::size_t scratch = moonwalk::thread_scratch_bytes();
    CHECK(r.stats.working_bytes <= budget + scratch);
    CHECK(peak <= budget + budget / 4);
    CHECK(planned.table_entries() * moonwalk::kPlannerEntryBytes <= budget);
  }
}
