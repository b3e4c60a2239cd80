// Moonwalk schedules against reference backprop: property tests over seeded
// random architectures, memory, anchors, fallback anchors, misuse.
#include <catch2/catch.hpp>
#include <moonwalk/fidelity/tolerance.hpp>
#include <moonwalk/moonwalk.hpp>

#include "support/check_util.hpp"
#include "support/random_net.hpp"
#include "support/user_layers.hpp"

using namespace moonwalk;
using moonwalk_test::max_rel_err_per_tensor;
using moonwalk_test::RandomArch;

namespace {

struct Outcome {
  double err = 0, estimate = 0;
};

/// Runs `schedule` on the arch in scalar S and compares with double backprop
/// on a twin with identical parameter values (the truth).
template <class S, class Sch>
Outcome run_against_truth(const RandomArch& a, const Sch& schedule, std::string& desc) {
  auto net = a.build<S>(&desc);
  auto truth_net = a.build<double>();
  set_parameters(truth_net, get_parameters(net).template cast<double>());
  const Matrix<double> x = moonwalk_test::random_batch<double>(a.in, a.batch, a.seed + 7);
  const Matrix<S> xs = x.cast<S>();
  const auto offsets = parameter_offsets(net);
  GradientResult<S> r;
  GradientResult<double> ref;
  if (a.xent) {
    const auto t = moonwalk_test::random_labels(a.out, a.batch, a.seed + 11);
    r = gradient(schedule, net, xs, SoftmaxCrossEntropy<S>{}, t);
    ref = gradient(Backprop{.input_gradient = true}, truth_net, x, SoftmaxCrossEntropy<double>{}, t);
  } else {
    const Matrix<double> t = moonwalk_test::random_batch<double>(a.out, a.batch, a.seed + 13);
    r = gradient(schedule, net, xs, MSE<S>{}, Matrix<S>(t.cast<S>()));
    ref = gradient(Backprop{.input_gradient = true}, truth_net, x, MSE<double>{}, t);
  }
  // h_0 exactly when asked for (schedules without the option always return it).
  bool asked = true;
  if constexpr (requires { schedule.input_gradient; }) asked = schedule.input_gradient;
  CHECK(r.h0.size() == (asked ? ref.h0.size() : 0));
  Outcome o;
  o.err = max_rel_err_per_tensor(r.gradient, ref.gradient, offsets);
  if (asked) o.err = std::max(o.err, detail::rel_max_err(r.h0.template cast<double>(), ref.h0));
  o.estimate = r.stats.error_estimate;
  return o;
}

template <class S>
void property_sweep(std::uint64_t first_seed, std::uint64_t count) {
  for (std::uint64_t seed = first_seed; seed < first_seed + count; ++seed) {
    const RandomArch a(seed);
    std::string desc;
    // Every other seed without h_0: the sweep then starts from h_1.
    const bool with_h0 = seed % 2 == 0;
    const Outcome mixed = run_against_truth<S>(a, MixedMoonwalk{.input_gradient = with_h0}, desc);
    const Outcome anchored =
        run_against_truth<S>(a, MixedMoonwalk{.anchors = {.every = 2}, .input_gradient = !with_h0}, desc);
    const Outcome pure = run_against_truth<S>(a, PureMoonwalk{}, desc);
    const Outcome bp = run_against_truth<S>(a, Backprop{.input_gradient = with_h0}, desc);
    const std::size_t L = a.build<S>().size();
    INFO(desc << " [" << (sizeof(S) == 4 ? "float" : "double") << "] backprop err " << bp.err
              << "; mixed err " << mixed.err << " est " << mixed.estimate << "; anchored err " << anchored.err
              << " est " << anchored.estimate << "; pure err " << pure.err << " est " << pure.estimate);
    // The documented rule (fidelity/tolerance.hpp): the estimate is under the
    // default target and the true error is within 10× of it (or at the
    // rounding floor of a backprop of this depth).
    CHECK(within_error_model<S>(mixed.err, mixed.estimate, L));
    CHECK(within_error_model<S>(anchored.err, anchored.estimate, L));
    CHECK(within_error_model<S>(pure.err, pure.estimate, L));
    // Backprop in S itself sits at that floor, so the floor is honest.
    CHECK(within_error_model<S>(bp.err, 0.0, L));
  }
}

}  // namespace

TEST_CASE("Moonwalk schedules match backprop on 60 random architectures (double)", "[schedules][property]") {
  property_sweep<double>(1, 60);
}

TEST_CASE("Moonwalk schedules match backprop on 60 random architectures (float)", "[schedules][property]") {
  property_sweep<float>(1001, 60);
}

TEST_CASE("Static Sequential and runtime Network give the same Moonwalk gradient", "[schedules]") {
  using S = double;
  Sequential st(Linear<S>(10, 8, {.seed = 1}), LeakyReLU<S>(8, 0.2), Linear<S>(8, 12, {.seed = 2}),
                ReLU<S>(12), Linear<S>(12, 4, {.seed = 3}), Tanh<S>(4));
  Network<S> rt;
  rt.add(Linear<S>(10, 8, {.seed = 1}))
      .add(LeakyReLU<S>(8, 0.2))
      .add(Linear<S>(8, 12, {.seed = 2}))
      .add(ReLU<S>(12))
      .add(Linear<S>(12, 4, {.seed = 3}))
      .add(Tanh<S>(4));
  const Matrix<S> x = gaussian<S>(10, 9, 5), t = gaussian<S>(4, 9, 6);
  const auto ref = gradient(Backprop{.input_gradient = true}, st, x, MSE<S>{}, t);
  for (const auto& g :
       {gradient(MixedMoonwalk{.input_gradient = true}, st, x, MSE<S>{}, t),
        gradient(MixedMoonwalk{.input_gradient = true}, rt, x, MSE<S>{}, t),
        gradient(PureMoonwalk{}, st, x, MSE<S>{}, t), gradient(PureMoonwalk{}, rt, x, MSE<S>{}, t)}) {
    INFO(g.stats.schedule);
    CHECK(detail::rel_max_err(g.gradient, ref.gradient) < 1e-12);
    CHECK(detail::rel_max_err(g.h0, ref.h0) < 1e-12);
    CHECK(g.loss == Approx(ref.loss).epsilon(1e-14));
    CHECK(g.stats.error_estimate < 1e-12);
    // Both saved the same fragments: ReLU's zero set and the expanding Linear's null-space part.
    CHECK(g.stats.fragment_bytes() > 0);
  }
}

TEST_CASE("Mixed Moonwalk keeps at most 1/16 of backprop's bytes on a contracting LeakyReLU MLP",
          "[schedules]") {
  // Unguarded (Fidelity::none()): masks only. The default policy may add
  // anchors where its (conservative) error model asks for them; it still
  // keeps at most a quarter, and holds the tolerance.
  using S = float;
  Sequential net(Linear<S>(256, 192, {.seed = 1}), LeakyReLU<S>(192, 0.1f), Linear<S>(192, 128, {.seed = 2}),
                 LeakyReLU<S>(128, 0.1f), Linear<S>(128, 64, {.seed = 3}), LeakyReLU<S>(64, 0.1f),
                 Linear<S>(64, 10, {.seed = 4}));
  const Matrix<S> x = gaussian<S>(256, 64, 9);
  const auto t = moonwalk_test::random_labels(10, 64, 3);
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, SoftmaxCrossEntropy<S>{}, t);
  const auto mw = gradient(MixedMoonwalk{.fidelity = Fidelity::none()}, net, x, SoftmaxCrossEntropy<S>{}, t);
  const auto held = gradient(MixedMoonwalk{.input_gradient = true}, net, x, SoftmaxCrossEntropy<S>{}, t);
  INFO("backprop " << bp.stats.residual_bytes << " bytes, mixed " << mw.stats.residual_bytes
                   << " bytes unguarded, " << held.stats.residual_bytes << " under the default policy");
  CHECK(mw.stats.residual_bytes * 16 <= bp.stats.residual_bytes);
  CHECK(held.stats.residual_bytes * 4 <= bp.stats.residual_bytes);
  CHECK(held.stats.within_tolerance);
  CHECK(detail::rel_max_err(held.gradient, bp.gradient) < 1e-4);
  // Backprop keeps every input: (256 + 2·192 + 2·128 + 2·64) floats per sample.
  CHECK(bp.stats.residual_bytes == sizeof(S) * 64 * (256 + 2 * 192 + 2 * 128 + 2 * 64));
  // Mixed keeps nothing for Linear layers and one bit per LeakyReLU element.
  for (const auto& e : mw.stats.saved) {
    INFO(e.layer_name << " " << e.kind << " " << e.bytes);
    if (e.layer_name.rfind("linear", 0) == 0) CHECK(e.bytes == 0);
    if (e.kind == "mask") CHECK(e.bytes <= (e.layer == 1 ? 192u : e.layer == 3 ? 128u : 64u) * 64 / 8 + 8);
  }
  CHECK(mw.stats.bytes_of("activation") == 0);
  CHECK(detail::rel_max_err(mw.gradient, bp.gradient) < 1e-4);
}

TEST_CASE("Cotangent anchors: every-k policy stores h_i and checks the sweep against it",
          "[schedules][anchors]") {
  using S = double;
  Network<S> net;
  Index w = 12;
  for (int i = 0; i < 6; ++i) {
    net.add(Linear<S>(w, 12, {.seed = static_cast<std::uint64_t>(i + 1)}));
    net.add(LeakyReLU<S>(12, 0.3));
  }
  net.add(Linear<S>(12, 3, {.seed = 99}));
  const Matrix<S> x = gaussian<S>(12, 7, 1), t = gaussian<S>(3, 7, 2);
  const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  const auto plain = gradient(MixedMoonwalk{.fidelity = Fidelity::none()}, net, x, MSE<S>{}, t);
  const auto anch =
      gradient(MixedMoonwalk{.anchors = {.every = 4}, .fidelity = Fidelity::none()}, net, x, MSE<S>{}, t);
  CHECK(plain.stats.anchor_bytes() == 0);
  // Layers 3, 7, 11 (13 layers; the last is never anchored): h_i is 12×7 doubles each.
  CHECK(anch.stats.figures.at("anchors") == 3);
  CHECK(anch.stats.anchor_bytes() == 3 * 12 * 7 * sizeof(S));
  CHECK(anch.stats.residual_bytes > plain.stats.residual_bytes);
  CHECK(detail::rel_max_err(anch.gradient, ref.gradient) < 1e-12);
  CHECK(anch.stats.error_estimate < 1e-12);

  const auto expl =
      gradient(MixedMoonwalk{.anchors = {.at = {0, 5}}, .fidelity = Fidelity::none(), .input_gradient = true},
               net, x, MSE<S>{}, t);
  CHECK(expl.stats.figures.at("anchors") == 2);
  CHECK(detail::rel_max_err(expl.gradient, ref.gradient) < 1e-12);
  // Without h_0 the sweep starts from h_1, the reverse pass's own value: an
  // anchor at layer 0 would hold nothing new.
  const auto lean =
      gradient(MixedMoonwalk{.anchors = {.at = {0, 5}}, .fidelity = Fidelity::none()}, net, x, MSE<S>{}, t);
  CHECK(lean.stats.figures.at("anchors") == 1);
  CHECK(lean.stats.anchor_layers == std::vector<std::size_t>{5});
  CHECK(detail::rel_max_err(lean.gradient, ref.gradient) < 1e-12);
  CHECK_THROWS_AS(gradient(MixedMoonwalk{.anchors = {.at = {13}}}, net, x, MSE<S>{}, t), ScheduleError);
}

TEST_CASE("Without input_gradient no schedule crosses the first layer to h_0, and the gradient is the same",
          "[schedules][input-gradient]") {
  // Fashion-like: the first Linear is the widest, so skipping its input-vjp
  // and (Moonwalk) its vijp is most of the saving; float, default policy.
  using S = float;
  Network<S> net;
  net.add(Linear<S>(40, 24, {.seed = 1}))
      .add(LeakyReLU<S>(24, 0.1f))
      .add(Linear<S>(24, 16, {.seed = 2}))
      .add(LeakyReLU<S>(16, 0.1f))
      .add(Linear<S>(16, 5, {.seed = 3}));
  const Matrix<S> x = gaussian<S>(40, 12, 7);
  const auto t = moonwalk_test::random_labels(5, 12, 8);
  const SoftmaxCrossEntropy<S> loss;
  const auto bp_h0 = gradient(Backprop{.input_gradient = true}, net, x, loss, t);
  const auto bp = gradient(Backprop{}, net, x, loss, t);
  CHECK(bp.h0.size() == 0);
  CHECK(bp.gradient == bp_h0.gradient);  // the same arithmetic, one input-vjp fewer
  CHECK(bp.stats.counts.vjp + 1 == bp_h0.stats.counts.vjp);
  CHECK(bp_h0.h0.rows() == 40);

  const auto mw_h0 = gradient(MixedMoonwalk{.input_gradient = true}, net, x, loss, t);
  const auto mw = gradient(MixedMoonwalk{}, net, x, loss, t);
  INFO("mixed err " << detail::rel_max_err(mw.gradient, bp.gradient) << " est " << mw.stats.error_estimate
                    << "; with h0 err " << detail::rel_max_err(mw_h0.gradient, bp.gradient));
  CHECK(mw.h0.size() == 0);
  CHECK(mw.stats.within_tolerance);
  CHECK(mw.stats.counts.vjp + 1 == mw_h0.stats.counts.vjp);
  CHECK(mw.stats.counts.vijp + 1 == mw_h0.stats.counts.vijp);
  CHECK(detail::rel_max_err(mw.gradient, bp.gradient) < 1e-4);
  CHECK(mw_h0.h0.rows() == 40);
  CHECK(detail::rel_max_err(mw_h0.h0, bp_h0.h0) < 1e-5);
  // The first layer's residual is not kept (a Linear keeps none; its
  // amplification is not asked for).
  REQUIRE(mw.stats.amplification.size() == net.size());
  CHECK_FALSE(mw.stats.amplification[0].known);

  for (const std::size_t slots : {std::size_t{0}, std::size_t{2}}) {
    const auto ck = gradient(Checkpointing{.slots = slots}, net, x, loss, t);
    CHECK(ck.h0.size() == 0);
    CHECK(ck.gradient == bp.gradient);
  }
  // The by-name choice passes the option on.
  for (const std::string name : {"backprop", "mixed", "checkpoint", "binomial"}) {
    INFO(name);
    for (const bool want : {false, true}) {
      const ScheduleChoice c{.name = name, .input_gradient = want};
      const auto r =
          with_schedule(c, net.size(), [&](const auto& s) { return gradient(s, net, x, loss, t); });
      CHECK(r.h0.size() == (want ? bp_h0.h0.size() : 0));
    }
  }
}

TEST_CASE("Stats::working_bytes: the engine-accounted peak of a step, next to the bytes kept",
          "[schedules][working-bytes]") {
  // Activation-dominated (batch 256 ≫ width 32): backprop's working set is
  // its kept inputs plus a few buffers; mixed Moonwalk's is its bit masks,
  // anchors and a few layer-sized buffers.
  using S = float;
  Network<S> net;
  for (int i = 0; i < 16; ++i) {
    net.add(Linear<S>(32, 32, {.seed = static_cast<std::uint64_t>(i + 1)}));
    net.add(LeakyReLU<S>(32, 0.5f));
  }
  net.add(Linear<S>(32, 4, {.seed = 99}));
  const Index B = 256;
  const Matrix<S> x = gaussian<S>(32, B, 1);
  const auto t = moonwalk_test::random_labels(4, B, 2);
  const SoftmaxCrossEntropy<S> loss;
  // This thread's product scratch is counted too and grows to the largest
  // product seen: one step of each first, so it no longer grows below.
  (void)gradient(Backprop{}, net, x, loss, t);
  (void)gradient(MixedMoonwalk{.fidelity = Fidelity::none()}, net, x, loss, t);
  const std::size_t scratch = thread_scratch_bytes();
  const auto bp = gradient(Backprop{}, net, x, loss, t);
  const auto mw = gradient(MixedMoonwalk{.fidelity = Fidelity::none()}, net, x, loss, t);
  const auto dense =
      gradient(MixedMoonwalk{.anchors = {.every = 1}, .fidelity = Fidelity::none()}, net, x, loss, t);
  INFO("backprop kept " << bp.stats.residual_bytes << " working " << bp.stats.working_bytes << "; mixed kept "
                        << mw.stats.residual_bytes << " working " << mw.stats.working_bytes
                        << "; anchored everywhere kept " << dense.stats.residual_bytes << " working "
                        << dense.stats.working_bytes << "; scratch " << scratch);
  REQUIRE(thread_scratch_bytes() == scratch);
  const std::size_t layer_buffer = 32 * B * sizeof(S);
  // Backprop's working set holds every kept input and two cotangent buffers.
  CHECK(bp.stats.working_bytes >= bp.stats.residual_bytes + 2 * layer_buffer);
  for (const auto* r : {&mw, &dense}) {
    CHECK(r->stats.working_bytes >= r->stats.residual_bytes);
    // ... and a handful of layer-sized buffers beyond them, not one per layer.
    CHECK(r->stats.working_bytes <= r->stats.residual_bytes + 8 * layer_buffer + scratch);
  }
  CHECK(bp.stats.working_bytes >= scratch);
  CHECK(mw.stats.working_bytes >= scratch);
  CHECK((mw.stats.working_bytes - scratch) * 4 < bp.stats.working_bytes - scratch);
  // Anchors are part of the working set.
  CHECK(dense.stats.working_bytes >= mw.stats.working_bytes + 16 * layer_buffer);
  CHECK(report_text(mw.stats).find(std::to_string(mw.stats.working_bytes) + " working bytes") !=
        std::string::npos);
  CHECK(report_json(mw.stats).find("\"working_bytes\":" + std::to_string(mw.stats.working_bytes)) !=
        std::string::npos);
  // Checkpointing runs a plan: its working set is the plan's buffers, the
  // recomputed inputs of one segment and the checkpoints but x_0 (the
  // caller's), below backprop's.
  const auto ck = gradient(Checkpointing{}, net, x, loss, t);
  CHECK(ck.stats.working_bytes + layer_buffer >= ck.stats.residual_bytes + 2 * layer_buffer + scratch);
  CHECK((ck.stats.working_bytes - thread_scratch_bytes()) * 2 < bp.stats.working_bytes - scratch);
  // Pure-forward Moonwalk runs a plan too: nothing is kept, and its working
  // set is a handful of layer-sized buffers (two values, two cotangents, the
  // tangents' and their inputs' two each, ∂ℓ/∂x_L), far below backprop's.
  const auto pure = gradient(PureMoonwalk{}, net, x, loss, t);
  REQUIRE(pure.stats.precision == std::string("float"));
  CHECK(pure.stats.residual_bytes == 0);
  CHECK(pure.stats.working_bytes >= 6 * layer_buffer + scratch);
  CHECK(pure.stats.working_bytes <= 10 * layer_buffer + thread_scratch_bytes());
}

TEST_CASE("Mixed Moonwalk's last resort, backprop, returns h_0 when it was asked for",
          "[schedules][input-gradient]") {
  // A tolerance below float rounding, no anchors, no double: every attempt
  // misses, and the step ends in reference backprop.
  using S = float;
  Network<S> net;
  net.add(Linear<S>(6, 6, {.seed = 1})).add(LeakyReLU<S>(6, 0.1f)).add(Linear<S>(6, 3, {.seed = 2}));
  const Matrix<S> x = gaussian<S>(6, 5, 3), t = gaussian<S>(3, 5, 4);
  Fidelity f;
  f.tolerance = 1e-30;
  f.precision = Precision::working;
  f.tolerance_anchors = false;
  const auto bp = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  for (const bool want : {false, true}) {
    const auto r = gradient(MixedMoonwalk{.fidelity = f, .input_gradient = want}, net, x, MSE<S>{}, t);
    REQUIRE(r.stats.figures.count("backprop_fallback") == 1);
    CHECK(r.gradient == bp.gradient);
    if (want)
      CHECK(r.h0 == bp.h0);
    else
      CHECK(r.h0.size() == 0);
  }
}

TEST_CASE("Without input_gradient RevBackprop still checks its drift at x_1 (recomputed from x_0)",
          "[schedules][input-gradient]") {
  using S = double;
  Network<S> net;
  net.add(Linear<S>(6, 6, {.seed = 1})).add(LeakyReLU<S>(6, 0.5)).add(Linear<S>(6, 6, {.seed = 2}));
  const Matrix<S> x = gaussian<S>(6, 5, 3), t = gaussian<S>(6, 5, 4);
  const auto bp = gradient(Backprop{}, net, x, MSE<S>{}, t);
  const auto rb = gradient(RevBackprop{}, net, x, MSE<S>{}, t);
  const auto rb_h0 = gradient(RevBackprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  CHECK(rb.h0.size() == 0);
  CHECK(rb.gradient == rb_h0.gradient);
  CHECK(rb.stats.error_estimate == rb_h0.stats.error_estimate);
  CHECK(rb.stats.counts.inverse == 2);  // x_2, x_1 rebuilt
  CHECK(rb.stats.counts.forward == 4);  // and x_1 recomputed from x_0: the check
  CHECK(rb.stats.counts.vjp + 1 == rb_h0.stats.counts.vjp);
  CHECK(detail::rel_max_err(rb.gradient, bp.gradient) < 1e-12);
}

TEST_CASE("Anchors restart the sweep: an anchor bounds the error a bad stretch would carry",
          "[schedules][anchors]") {
  // Deep orthogonal + LeakyReLU(0.1) in float: the plain (unguarded) sweep
  // amplifies rounding (docs/design.md §5); anchoring every layer pins every h_i to the
  // reverse pass, so the error falls to backprop's level and the estimate
  // follows it.
  using S = float;
  Network<S> net;
  for (int i = 0; i < 24; ++i) {
    net.add(Linear<S>(32, 32, {.seed = static_cast<std::uint64_t>(100 + i)}));
    net.add(LeakyReLU<S>(32, 0.1f));
  }
  net.add(Linear<S>(32, 4, {.seed = 7}));
  auto twin = Network<double>{};
  for (int i = 0; i < 24; ++i) {
    twin.add(Linear<double>(32, 32, {.seed = static_cast<std::uint64_t>(100 + i)}));
    twin.add(LeakyReLU<double>(32, 0.1));
  }
  twin.add(Linear<double>(32, 4, {.seed = 7}));
  set_parameters(twin, get_parameters(net).cast<double>());
  const Matrix<double> x = gaussian<double>(32, 16, 3), t = gaussian<double>(4, 16, 4);
  const auto truth = gradient(Backprop{.input_gradient = true}, twin, x, MSE<double>{}, t);
  const auto offs = parameter_offsets(net);
  const auto plain = gradient(MixedMoonwalk{.fidelity = Fidelity::none()}, net, x.cast<S>(), MSE<S>{},
                              Matrix<S>(t.cast<S>()));
  const auto every = gradient(MixedMoonwalk{.anchors = {.every = 1}, .fidelity = Fidelity::none()}, net,
                              x.cast<S>(), MSE<S>{}, Matrix<S>(t.cast<S>()));
  const double e_plain = max_rel_err_per_tensor(plain.gradient, truth.gradient, offs);
  const double e_every = max_rel_err_per_tensor(every.gradient, truth.gradient, offs);
  INFO("plain err " << e_plain << " est " << plain.stats.error_estimate << "; every-layer anchors err "
                    << e_every << " est " << every.stats.error_estimate);
  CHECK(e_every < 1e-4);
  CHECK(e_every < e_plain);
  // The estimate is never far below the truth, with or without anchors.
  CHECK(10 * plain.stats.error_estimate >= e_plain);
  CHECK(every.stats.error_estimate < plain.stats.error_estimate);
}

TEST_CASE("A layer with only vjp becomes an anchor under mixed Moonwalk; pure refuses it",
          "[schedules][fallback]") {
  using S = double;
  Network<S> net;
  net.add(Linear<S>(6, 5, {.seed = 1}))
      .add(moonwalk_test::CubicVjpOnly<S>{5})
      .add(Linear<S>(5, 2, {.seed = 2}));
  const Matrix<S> x = gaussian<S>(6, 4, 1), t = gaussian<S>(2, 4, 2);
  const auto ref = gradient(Backprop{.input_gradient = true}, net, x, MSE<S>{}, t);
  const auto mw = gradient(MixedMoonwalk{.input_gradient = true}, net, x, MSE<S>{}, t);
  CHECK(detail::rel_max_err(mw.gradient, ref.gradient) < 1e-12);
  CHECK(mw.stats.figures.at("fallback_anchors") == 1);
  bool anchored = false, activation = false;
  for (const auto& e : mw.stats.saved) {
    if (e.layer == 1 && e.kind == "anchor") anchored = (e.bytes == 5 * 4 * sizeof(S));
    if (e.layer == 1 && e.kind == "activation") activation = (e.bytes == 5 * 4 * sizeof(S));
  }
  CHECK(anchored);
  CHECK(activation);
  try {
    (void)gradient(PureMoonwalk{}, net, x, MSE<S>{}, t);
    FAIL("pure-forward Moonwalk accepted a layer it cannot cross");
  } catch (const ScheduleError& e) {
    CHECK_THAT(e.what(), Catch::Contains("cubic_vjp_only(5)") && Catch::Contains("layer 1"));
  }
  // Static networks: the same schedule is a compile-time error (compile_fail.pure_needs_sweep).
  Sequential st(Linear<S>(6, 5, {.seed = 1}), moonwalk_test::CubicVjpOnly<S>{5},
                Linear<S>(5, 2, {.seed = 2}));
  const auto ms = gradient(MixedMoonwalk{.input_gradient = true}, st, x, MSE<S>{}, t);
  CHECK(detail::rel_max_err(ms.gradient, ref.gradient) < 1e-12);
}

TEST_CASE("Pure-forward Moonwalk counts one jvp pass per input feature", "[schedules]") {
  using S = double;
  Sequential net(Linear<S>(5, 4, {.seed = 1}), Tanh<S>(4), Linear<S>(4, 3, {.seed = 2}));
  const Matrix<S> x = gaussian<S>(5, 6, 1), t = gaussian<S>(3, 6, 2);
  const auto p = gradient(PureMoonwalk{}, net, x, MSE<S>{}, t);
  CHECK(p.stats.counts.jvp == 5 * 3);
  CHECK(p.stats.counts.vijp == 3);
  CHECK(p.stats.residual_bytes == 0);  // nothing kept: no fragments here
}

TEST_CASE("Saved-residual report lists every kept value as text and JSON", "[schedules][report]") {
  using S = float;
  Sequential net(Linear<S>(8, 6, {.seed = 1}), LeakyReLU<S>(6, 0.1f), Linear<S>(6, 9, {.seed = 2}),
                 ReLU<S>(9), Linear<S>(9, 3, {.seed = 3}), Sigmoid<S>(3));
  const Matrix<S> x = gaussian<S>(8, 5, 1), t = gaussian<S>(3, 5, 2);
  const auto mw = gradient(MixedMoonwalk{.input_gradient = true}, net, x, MSE<S>{}, t);
  const std::string text = report_text(mw.stats), json = report_json(mw.stats);
  for (const char* needle : {"mask", "fragment", "derivative", "linear(6->9)", "relu(9)"}) {
    INFO(needle);
    CHECK_THAT(text, Catch::Contains(needle));
    CHECK_THAT(json, Catch::Contains(needle));
  }
  CHECK_THAT(json, Catch::StartsWith("{\"schedule\":\"mixed\",\"residual_bytes\":" +
                                     std::to_string(mw.stats.residual_bytes)));
  // Fragment of the expanding Linear: (9 − 6) × 5 floats.
  bool lin_frag = false;
  for (const auto& e : mw.stats.saved)
    if (e.layer == 2 && e.kind == "fragment") lin_frag = e.bytes == 3 * 5 * sizeof(S);
  CHECK(lin_frag);
  std::size_t sum = 0;
  for (const auto& [k, b] : mw.stats.bytes_by_kind) sum += b;
  CHECK(sum >= mw.stats.residual_bytes);
}

TEST_CASE("batchnorm under double cotangents sees the whole batch (no column blocks)",
          "[layers][normalization][schedules]") {
  using namespace moonwalk;
  // Batch 1100 > the sweep's 1024-column conversion block.
  auto net = parse_network<float>("in:4,linear:5,batchnorm,tanh,linear:2", 31);
  const Matrix<float> x = gaussian<float>(4, 1100, 32);
  const Matrix<float> t = gaussian<float>(2, 1100, 33);
  const MSE<float> loss;
  const auto bp = gradient(Backprop{}, net, x, loss, t);
  MixedMoonwalk mixed;
  mixed.fidelity.precision = Precision::double_cotangents;
  const auto r = gradient(mixed, net, x, loss, t);
  CHECK(mwtest::rel_err(r.gradient, bp.gradient) < 1e-4);
  CHECK(r.stats.within_tolerance);
}
