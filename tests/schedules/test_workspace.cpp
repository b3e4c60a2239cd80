// Buffers kept across steps (schedules/detail/workspace.hpp): backprop and
// mixed Moonwalk reuse their workspace from step to step where activations
// are no larger than the parameters, free it with the step elsewhere, and
// what a step leaves in it never reaches the next step's gradient.
#include <algorithm>
#include <catch2/catch.hpp>
#include <moonwalk/moonwalk.hpp>
#include <utility>

using namespace moonwalk;

namespace {

/// depth × (Linear(w→w), LeakyReLU(slope)) then Linear(w→4), in float.
Network<float> mlp(int depth, Index w, float slope, Init init, std::uint64_t seed) {
  Network<float> net;
  for (int i = 0; i < depth; ++i) {
    net.add(Linear<float>(w, w, {.seed = seed + static_cast<std::uint64_t>(i), .init = init}));
    net.add(LeakyReLU<float>(w, slope));
  }
  net.add(Linear<float>(w, 4, {.seed = seed + 1000, .init = init}));
  return net;
}

template <class Sch>
GradientResult<float> step(const Sch& s, Network<float>& net, Index batch) {
  const Matrix<float> x = gaussian<float>(net.in_features(), batch, 11);
  const Matrix<float> t = gaussian<float>(net.out_features(), batch, 12);
  return gradient(s, net, x, MSE<float>{}, t);
}

void same(const GradientResult<float>& a, const GradientResult<float>& b) {
  CHECK(a.loss == b.loss);
  CHECK(a.gradient == b.gradient);
  CHECK(a.h0 == b.h0);
  CHECK(a.stats.precision == b.stats.precision);
  CHECK(a.stats.anchor_layers == b.stats.anchor_layers);
  CHECK(a.stats.residual_bytes == b.stats.residual_bytes);
  CHECK(a.stats.error_estimate == b.stats.error_estimate);
}

/// The storage of the buffers a schedule's steps write, as seen in its workspace.
std::vector<const void*> storage(const Backprop& s) {
  std::vector<const void*> p;
  auto& ws = s.workspace->buffers;
  for (const auto& m : ws.get<std::vector<Matrix<float>>>(Backprop::outputs_slot)) p.push_back(m.data());
  p.push_back(ws.get<detail::Buffer<float>>(Backprop::cotangent_slot).data());
  p.push_back(ws.get<detail::Buffer<float>>(Backprop::next_cotangent_slot).data());
  return p;
}
/// Mixed Moonwalk's attempts are its plan, run by the bound executor.
template <class C>
std::vector<const void*> storage(const MixedMoonwalk& s) {
  return s.workspace->buffers.get<detail::BoundMoonwalk<float>>(detail::kBoundPlan).run.storage<C>();
}

/// Runs `s` on batch b twice, then b/2, then b again, then b with its
/// workspace taken by someone else: every batch-b step equals the first
/// exactly, the batch-b/2 step equals a fresh schedule's, and the repeated
/// steps wrote into the storage the first one sized.
template <class Sch, class Storage>
void check_reuse(const Sch& s, Network<float>& net, Index b, Storage storage_of) {
  REQUIRE(detail::keep_across_steps(net, b));
  const GradientResult<float> first = step(s, net, b);
  const auto sized = storage_of(s);
  for (const void* p : sized) REQUIRE(p != nullptr);
  same(step(s, net, b), first);
  CHECK(storage_of(s) == sized);  // reused, not reallocated

  Sch fresh = s;
  fresh.workspace = detail::new_workspace();
  same(step(s, net, b / 2), step(fresh, net, b / 2));  // another shape: nothing stale
  same(step(s, net, b), first);

  const Sch copy = s;  // copies share the workspace
  CHECK(copy.workspace == s.workspace);
  const auto before = storage_of(s);
  s.workspace->busy.lock();  // held by another step: this one works in its own
  const GradientResult<float> aside = step(copy, net, b);
  s.workspace->busy.unlock();
  same(aside, first);
  CHECK(storage_of(s) == before);

  Sch none = s;
  none.workspace = nullptr;  // no workspace at all: a fresh one every step
  same(step(none, net, b), first);
}

/// Activations larger than the parameters: the step frees its buffers (the
/// workspace is empty after it), and its gradient is the same step after
/// step and the same as a fresh schedule's.
template <class Sch, class Storage>
void check_released(const Sch& s, Network<float>& net, Index b, Storage storage_of) {
  REQUIRE_FALSE(detail::keep_across_steps(net, b));
  const GradientResult<float> first = step(s, net, b);
  for (const void* p : storage_of(s)) CHECK(p == nullptr);
  same(step(s, net, b), first);
  Sch fresh = s;
  fresh.workspace = detail::new_workspace();
  same(step(fresh, net, b), first);
}

/// L, counting the live objects of its type (a moved-from one is not live)
/// and the most alive at once; its casts are counted the same way. How many
/// casts of a layer a schedule holds at once, seen from outside.
template <class L>
struct LiveCounted : L {
  static inline int live = 0;
  static inline int peak = 0;

  explicit LiveCounted(L l) : L(std::move(l)) { add(); }
  LiveCounted(const LiveCounted& o) : L(o) { add(); }
  LiveCounted(LiveCounted&& o) noexcept : L(std::move(o)), counted_(std::exchange(o.counted_, false)) {}
  LiveCounted& operator=(const LiveCounted& o) {
    L::operator=(o);
    if (!counted_) add();
    return *this;
  }
  LiveCounted& operator=(LiveCounted&& o) noexcept {
    L::operator=(std::move(o));
    if (o.counted_) {
      if (counted_) --live;
      counted_ = true;
      o.counted_ = false;
    }
    return *this;
  }
  ~LiveCounted() {
    if (counted_) --live;
  }

  template <class T>
  [[nodiscard]] LiveCounted<cast_t<T, L>> cast() const {
    return LiveCounted<cast_t<T, L>>(L::template cast<T>());
  }

 private:
  void add() {
    counted_ = true;
    peak = std::max(peak, ++live);
  }
  bool counted_ = false;
};

/// A Linear that counts the layers holding what they derived from their
/// weights (its factorisation: made by the first vijp or amplification of a
/// weight version, freed by release_derived), and the most held at once.
struct TrackedLinear : Linear<float> {
  static inline int held = 0;
  static inline int peak = 0;
  using Linear<float>::Linear;
  TrackedLinear(const TrackedLinear& o) : Linear<float>(o) {}
  TrackedLinear& operator=(const TrackedLinear& o) {
    release_derived();
    Linear<float>::operator=(o);
    return *this;
  }
  ~TrackedLinear() { release_derived(); }
  void vijp_into(const CRef<float>& x, const CRef<float>& hx, MatRef<float> hy) const {
    derive();
    Linear<float>::vijp_into(x, hx, hy);
  }
  [[nodiscard]] Amplification amplification(const Empty& e) const {
    derive();
    return Linear<float>::amplification(e);
  }
  void release_derived() const noexcept {
    if (derived_) --held;
    derived_ = false;
    Linear<float>::release_derived();
  }

 private:
  void derive() const {
    if (!derived_) peak = std::max(peak, ++held);
    derived_ = true;
  }
  mutable bool derived_ = false;
};

}  // namespace

TEST_CASE(
    "Workspace: where buffers do not outlive the step, mixed Moonwalk frees each layer's factorisation "
    "once a pass has crossed it",
    "[workspace][schedules]") {
  // Activation-dominated (batch 64 > width 8): not kept across steps.
  Sequential net(
      TrackedLinear(8, 8, {.seed = 1}), LeakyReLU<float>(8, 0.5F), TrackedLinear(8, 8, {.seed = 2}),
      LeakyReLU<float>(8, 0.5F), TrackedLinear(8, 8, {.seed = 3}), LeakyReLU<float>(8, 0.5F),
      TrackedLinear(8, 8, {.seed = 4}), LeakyReLU<float>(8, 0.5F), TrackedLinear(8, 3, {.seed = 5}));
  const Matrix<float> x = gaussian<float>(8, 64, 1), t = gaussian<float>(3, 64, 2);
  REQUIRE_FALSE(detail::keep_across_steps(net, 64));
  TrackedLinear::peak = 0;
  const auto r = gradient(MixedMoonwalk{}, net, x, MSE<float>{}, t);
  REQUIRE(r.stats.precision == "float");
  CHECK(r.stats.within_tolerance);
  CHECK(TrackedLinear::held == 0);
  // One layer's at a time in each pass (the first is never crossed without h_0).
  CHECK(TrackedLinear::peak == 1);
  const auto bp = gradient(Backprop{}, net, x, MSE<float>{}, t);
  CHECK((r.gradient - bp.gradient).cwiseAbs().maxCoeff() <= 1e-4F * bp.gradient.cwiseAbs().maxCoeff());
}

TEST_CASE("Workspace: backprop reuses its kept inputs and cotangents across steps",
          "[workspace][schedules]") {
  Network<float> net = mlp(4, 24, 0.2F, Init::orthogonal, 5);
  check_reuse(Backprop{.input_gradient = true}, net, 8, [](const Backprop& s) { return storage(s); });
  check_released(Backprop{.input_gradient = true}, net, 64, [](const Backprop& s) { return storage(s); });
}

TEST_CASE("Workspace: mixed Moonwalk reuses its buffers, residuals and anchors across steps",
          "[workspace][schedules]") {
  SECTION("float cotangents") {
    Network<float> net = mlp(2, 32, 0.5F, Init::orthogonal, 3);
    const MixedMoonwalk m{};
    REQUIRE(step(m, net, 8).stats.precision == "float");
    check_reuse(m, net, 8, [](const MixedMoonwalk& s) { return storage<float>(s); });
    check_released(MixedMoonwalk{.input_gradient = true}, net, 64,
                   [](const MixedMoonwalk& s) { return storage<float>(s); });
    // Inputs rebuilt by inversion (square Linears, LeakyReLU): the same bound buffers, step after step.
    MixedMoonwalk rebuild_kept{};
    rebuild_kept.rebuild_inputs = true;
    REQUIRE(step(rebuild_kept, net, 8).stats.counts.inverse > 0);
    check_reuse(rebuild_kept, net, 8, [](const MixedMoonwalk& s) { return storage<float>(s); });
    // Inputs rebuilt by inversion (square Linear and LeakyReLU invert): the
    // bound plan's buffers are given back with the step all the same.
    MixedMoonwalk rebuild{};
    rebuild.rebuild_inputs = true;
    check_released(rebuild, net, 64, [](const MixedMoonwalk& s) { return storage<float>(s); });
    const GradientResult<float> rb = step(rebuild, net, 64),
                                bp = step(Backprop{.input_gradient = true}, net, 64);
    CHECK(rb.stats.within_tolerance);
    CHECK((rb.gradient - bp.gradient).cwiseAbs().maxCoeff() <= 1e-3F * bp.gradient.cwiseAbs().maxCoeff());
  }
  SECTION("double cotangents with anchors (no precision memory: every step takes the same path)") {
    Network<float> net = mlp(12, 24, 0.1F, Init::gaussian, 70);
    MixedMoonwalk m{};
    m.fidelity.memory = nullptr;
    m.fidelity.precision = Precision::double_cotangents;
    const GradientResult<float> r = step(m, net, 8);
    REQUIRE(r.stats.precision == "double");
    INFO("anchors " << r.stats.anchor_layers.size());
    check_reuse(m, net, 8, [](const MixedMoonwalk& s) { return storage<double>(s); });
    MixedMoonwalk big = m;
    big.workspace = detail::new_workspace();
    check_released(big, net, 64, [](const MixedMoonwalk& s) { return storage<double>(s); });
    big.rebuild_inputs = true;  // inverse steps in a double attempt: the inputs rebuilt in float, the
                                // residuals derived in double
    check_released(big, net, 64, [](const MixedMoonwalk& s) { return storage<double>(s); });
  }
  SECTION("explicit anchors: bound with the plan, kept for the next step") {
    Network<float> net = mlp(6, 16, 0.5F, Init::orthogonal, 9);
    MixedMoonwalk m{};
    m.anchors.every = 2;
    const GradientResult<float> r = step(m, net, 8);
    REQUIRE(r.stats.anchor_layers.size() >= 3);
    // The bound plan's cotangent steps keep the anchors `every` asks for.
    const auto& bound = m.workspace->buffers.get<detail::BoundMoonwalk<float>>(detail::kBoundPlan);
    CHECK(check_plan(bound.run.plan(), ChainCosts{}).anchors >= 5);
    CHECK(bound.keep[1] == CotangentKeep::anchor);
    CHECK(bound.keep[2] == CotangentKeep::none);
    check_reuse(m, net, 8, [](const MixedMoonwalk& s) { return storage<float>(s); });
  }
}

TEST_CASE("Workspace: schedules made by with_schedule from one choice share its workspace",
          "[workspace][schedules]") {
  const ScheduleChoice choice{.name = "mixed"};
  for (const std::string name : {"mixed", "backprop"}) {
    ScheduleChoice c = choice;
    c.name = name;
    const void* seen = with_schedule(c, 3, [](const auto& s) -> const void* {
      if constexpr (requires { s.workspace; })
        return s.workspace.get();
      else
        return nullptr;
    });
    CHECK(seen == c.workspace.get());
  }
}

TEST_CASE("Workspace: mixed Moonwalk keeps a float network's double casts across steps, refreshed in place",
          "[workspace][schedules]") {
  Network<float> net = mlp(12, 24, 0.1F, Init::gaussian, 70);
  MixedMoonwalk m{};
  m.fidelity.memory = nullptr;
  m.fidelity.precision = Precision::double_cotangents;
  REQUIRE(detail::keep_across_steps(net, 8));
  REQUIRE(step(m, net, 8).stats.precision == "double");
  // (The second Linear: without h_0 the first layer is never crossed, so never cast.)
  auto first_linear = [&] {
    const auto& casts =
        m.workspace->buffers.get<detail::BoundMoonwalk<float>>(detail::kBoundPlan).run.double_casts();
    CHECK(casts.held(0) == nullptr);
    const auto* l = std::any_cast<AnyLayer<double>>(casts.held(2));
    return l ? l->target<Linear<double>>() : nullptr;
  };
  const Linear<double>* held = first_linear();
  REQUIRE(held != nullptr);
  for (int k = 0; k < 3; ++k) {
    // New weights (an SGD step): the kept casts must follow them.
    Sgd<float>{0.05F}.step(net);
    MixedMoonwalk fresh = m;
    fresh.workspace = detail::new_workspace();
    same(step(m, net, 8), step(fresh, net, 8));
    CHECK(first_linear() == held);         // refreshed into the same layer object, not made anew
    CHECK_FALSE(held->stores_gradient());  // the sweep accumulates into the float layer, not the cast
  }
  // Another network of the same shape through the same schedule: its own weights.
  Network<float> other = mlp(12, 24, 0.1F, Init::gaussian, 71);
  MixedMoonwalk fresh = m;
  fresh.workspace = detail::new_workspace();
  same(step(m, other, 8), step(fresh, other, 8));
  // A step that ends in float gives the double casts back.
  MixedMoonwalk f = m;
  f.fidelity.precision = Precision::working;
  REQUIRE(step(f, net, 8).stats.precision == "float");
  CHECK(first_linear() == nullptr);
}

TEST_CASE(
    "Workspace: mixed Moonwalk holds one double cast at a time where its buffers do not outlive the step",
    "[workspace][schedules]") {
  // A double Linear cast is W and its gradient storage in double: held from
  // the reverse pass's forward half to its backward half for every layer,
  // the casts were ~1 MiB per width-256 layer of the peak, which then grew
  // with depth like backprop's.
  using Counted = LiveCounted<Linear<double>>;
  Network<float> net;
  for (int i = 0; i < 12; ++i) {
    const auto seed = static_cast<std::uint64_t>(80 + i);
    net.add(LiveCounted<Linear<float>>(Linear<float>(24, 24, {.seed = seed, .init = Init::gaussian})));
    net.add(LeakyReLU<float>(24, 0.1F));
  }
  net.add(Linear<float>(24, 4, {.seed = 99, .init = Init::gaussian}));
  MixedMoonwalk m{};
  m.fidelity.memory = nullptr;
  m.fidelity.precision = Precision::double_cotangents;
  const Index b = 64;
  REQUIRE_FALSE(detail::keep_across_steps(net, b));
  Counted::peak = 0;
  const GradientResult<float> r = step(m, net, b);
  REQUIRE(r.stats.precision == "double");
  CHECK(Counted::live == 0);  // nothing outlives the step
  CHECK(Counted::peak == 1);  // each layer cast for its use, then released
  const GradientResult<float> bp = step(Backprop{.input_gradient = true}, net, b);
  CHECK((r.gradient - bp.gradient).cwiseAbs().maxCoeff() <= 1e-4F * bp.gradient.cwiseAbs().maxCoeff());
}

TEST_CASE("Workspace: a buffer whose growth fails stays usable (no dangling storage)",
          "[workspace][schedules]") {
  // Eigen frees a matrix's storage before allocating the larger one; were the
  // allocation to throw, the matrix would keep the freed pointer and free it
  // again on destruction. detail::safe_resize empties it first.
  const Index huge = Index(1) << 40;  // 2^40 × 2^20 doubles: never allocatable
  detail::Buffer<double> b;
  b.view(8, 8).setOnes();
  CHECK_THROWS_AS(b.view(huge, Index(1) << 20), std::bad_alloc);
  CHECK(b.data() == nullptr);  // emptied, not left pointing at the freed block
  auto v = b.view(4, 4);
  v.setConstant(2);
  CHECK(v.sum() == 32);

  Matrix<float> m = Matrix<float>::Ones(3, 5);
  CHECK_THROWS_AS(detail::safe_resize(m, huge, Index(1) << 20), std::bad_alloc);
  CHECK(m.size() == 0);  // empty, not dangling
  detail::safe_resize(m, 2, 2);
  m.setZero();
  CHECK(m.rows() == 2);
  Vector<double> w = Vector<double>::Ones(7);
  CHECK_THROWS_AS(detail::safe_resize(w, huge << 20), std::bad_alloc);
  CHECK(w.size() == 0);
}

namespace {

/// Everything two results report: the gradient, the saved-residual report
/// (entries, names, kinds, bytes, fidelity figures), the schedule's figures,
/// operator counts and the amplification list's names.
void same_report(const GradientResult<float>& a, const GradientResult<float>& b) {
  same(a, b);
  // The working set may differ by design: a workspace kept across steps also
  // holds what earlier steps sized (Stats::working_bytes counts held buffers).
  Stats sa = a.stats, sb = b.stats;
  CHECK((sa.working_bytes > 0) == (sb.working_bytes > 0));
  sa.working_bytes = sb.working_bytes = 0;
  CHECK(report_json(sa) == report_json(sb));
  CHECK(a.stats.figures == b.stats.figures);
  CHECK(a.stats.counts.forward + a.stats.counts.vjp + a.stats.counts.vijp ==
        b.stats.counts.forward + b.stats.counts.vjp + b.stats.counts.vijp);
  REQUIRE(a.stats.amplification.size() == b.stats.amplification.size());
  for (std::size_t k = 0; k < a.stats.amplification.size(); ++k)
    CHECK(a.stats.amplification[k].layer_name == b.stats.amplification[k].layer_name);
}

/// One result filled by gradient_into step after step, across networks,
/// widths, layer replacements and batch widths: each equals a fresh
/// gradient() of a fresh schedule, report included.
template <class Sch>
void check_into(const Sch& s) {
  GradientResult<float> r;
  auto into = [&](Network<float>& net, Index b) {
    const Matrix<float> x = gaussian<float>(net.in_features(), b, 11);
    const Matrix<float> t = gaussian<float>(net.out_features(), b, 12);
    gradient_into(s, net, x, MSE<float>{}, t, r);
    Sch fresh = s;
    fresh.workspace = detail::new_workspace();
    same_report(r, gradient(fresh, net, x, MSE<float>{}, t));
  };
  Network<float> a = mlp(3, 24, 0.2F, Init::orthogonal, 5), b = mlp(5, 16, 0.5F, Init::orthogonal, 8);
  into(a, 8);
  into(a, 8);
  into(b, 8);  // more layers, other widths and names
  into(a, 4);  // fewer layers again, another batch
  REQUIRE(r.stats.saved.size() > 0);
  // A layer replaced in place, same widths, another kind: its name follows.
  a[1] = AnyLayer<float>(Tanh<float>(24));
  into(a, 8);
  bool listed = false;
  for (const SavedEntry& e : r.stats.saved) listed = listed || (e.layer == 1 && e.layer_name == "tanh(24)");
  CHECK(listed);
}

}  // namespace

TEST_CASE("gradient_into fills a result kept across steps: the same as a fresh gradient(), report included",
          "[workspace][schedules]") {
  // (No precision memory: the reused and the fresh schedule take the same path.)
  MixedMoonwalk mixed{};
  mixed.fidelity.memory = nullptr;
  SECTION("backprop") { check_into(Backprop{.input_gradient = true}); }
  SECTION("mixed") { check_into(mixed); }
  SECTION("mixed, explicit anchors") {
    MixedMoonwalk m = mixed;
    m.anchors.every = 2;
    check_into(m);
  }
  SECTION("mixed, double cotangents") {
    MixedMoonwalk m = mixed;
    m.fidelity.precision = Precision::double_cotangents;
    check_into(m);
  }
  SECTION("one result for several schedules, in turn") {
    Network<float> net = mlp(3, 20, 0.3F, Init::orthogonal, 4);
    const Matrix<float> x = gaussian<float>(20, 8, 1), t = gaussian<float>(4, 8, 2);
    MixedMoonwalk anchored = mixed;
    anchored.anchors.every = 2;
    GradientResult<float> r;
    auto both = [&](const auto& s) {
      gradient_into(s, net, x, MSE<float>{}, t, r);
      auto fresh = s;
      fresh.workspace = detail::new_workspace();
      same_report(r, gradient(fresh, net, x, MSE<float>{}, t));
    };
    both(mixed);
    both(Backprop{.input_gradient = true});
    CHECK(r.stats.amplification.empty());
    both(anchored);
    both(mixed);
    CHECK(r.stats.anchor_layers.empty());
  }
  SECTION("a schedule without run_into is assigned a fresh result") {
    Network<float> net = mlp(2, 12, 0.3F, Init::orthogonal, 2);
    const Matrix<float> x = gaussian<float>(12, 6, 1), t = gaussian<float>(4, 6, 2);
    GradientResult<float> r;
    gradient_into(Checkpointing{.input_gradient = true}, net, x, MSE<float>{}, t, r);
    same_report(r, gradient(Checkpointing{.input_gradient = true}, net, x, MSE<float>{}, t));
  }
  SECTION("bad input is refused with the schedule named") {
    Network<float> net = mlp(2, 12, 0.3F, Init::orthogonal, 2);
    GradientResult<float> r;
    CHECK_THROWS_WITH(gradient_into(Backprop{.input_gradient = true}, net, gaussian<float>(7, 6, 1),
                                    MSE<float>{}, gaussian<float>(4, 6, 2), r),
                      Catch::Contains("backprop: network input") && Catch::Contains("7x6"));
  }
}

TEST_CASE("FlatMap: a std::map's reading, in key order, whose clear keeps its storage", "[report]") {
  detail::FlatMap<double> m;
  m["zeta"] = 1;
  m["alpha"] = 2;
  m["mid"] += 3;
  m["alpha"] += 1;
  CHECK(m.size() == 3);
  std::vector<std::string> keys;
  for (const auto& [k, v] : m) keys.push_back(k);
  CHECK(keys == std::vector<std::string>{"alpha", "mid", "zeta"});
  CHECK(m.at("alpha") == 3);
  CHECK(m.count("mid") == 1);
  CHECK(m.count("none") == 0);
  CHECK(m.find("none") == m.end());
  CHECK_THROWS_AS(m.at("none"), std::out_of_range);
  m.clear();
  CHECK(m.empty());
  CHECK(m.begin() == m.end());
  m["b_key_longer_than_the_small_string"] = 5;
  m["a"] = 4;
  CHECK(m.size() == 2);
  CHECK(m.begin()->first == "a");
  CHECK(m.at("b_key_longer_than_the_small_string") == 5);
  detail::FlatMap<double> n;
  n["a"] = 4;
  CHECK_FALSE(m == n);
  n["b_key_longer_than_the_small_string"] = 5;
  CHECK(m == n);
}
