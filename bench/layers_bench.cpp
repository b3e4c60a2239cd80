// Per-layer operator costs at realistic sizes, float and double: forward, jvp,
// vjp (input cotangent), vijp (Moonwalk's vector-inverse-Jacobian product)
// and, for Linear, the parameter-gradient product vjp_params — so the price
// of vijp against the vjp it replaces is visible.
//
//   Linear 1024→1024 and 1024→512 at batch 256, 256→256 at batch 512 and
//   1024 (Args: in, out, batch).
//     vijp_warm  the right-inverse cache is valid (same weight version): one
//                GEMM with the cached out × in right inverse of Wᵀ.
//     vijp_cold  the weights are written through a freshly fetched parameter
//                view every iteration, as an optimizer step does: the
//                mutable access bumps Linear's weight version, so the vijp
//                redoes the column-pivoted QR of Wᵀ (and the right inverse and
//                the condition estimate) before its GEMM. Training pays this
//                once per layer per step.
//   LeakyReLU(0.1) and Tanh on 4096 features × 256 samples (1M elements):
//     forward, jvp, vjp, vjp_residual (what the reverse pass of a schedule
//     runs: from the saved mask bits / saved σ′), vijp.
//
// Counters: items = samples (Linear) or elements (elementwise) per second;
// bytes = the matrices each operator reads and writes; Linear also flop/s
// (2 · batch · in · out multiply-adds, as flops; vijp_cold excludes the
// factorisation from the count). Single-threaded (no OpenMP); allocator as
// moonwalk-train (main).
//
//   moonwalk-bench-layers [--benchmark_filter=...] [--benchmark_min_time=...]
#include <benchmark/benchmark.h>
#include <malloc.h>

#include <cstdio>
#include <moonwalk/core/init.hpp>
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/linear.hpp>

namespace {

using moonwalk::Index;
template <class S>
using Mat = moonwalk::Matrix<S>;
template <class S>
using Vec = moonwalk::Vector<S>;

constexpr Index kBatch = 256;
constexpr Index kFeatures = 4096;  // elementwise layers: kFeatures × kBatch = 1M elements

// ---- Linear

template <class S>
struct LinearSetup {
  Index in, out, batch;
  moonwalk::Linear<S> layer;
  Mat<S> x, dx, h, hx;
  explicit LinearSetup(const benchmark::State& state)
      : in(state.range(0)),
        out(state.range(1)),
        batch(state.range(2)),
        layer(in, out, {.seed = 1}),
        x(moonwalk::gaussian<S>(in, batch, 2)),
        dx(moonwalk::gaussian<S>(in, batch, 3)),
        h(moonwalk::gaussian<S>(out, batch, 4)),
        hx(moonwalk::gaussian<S>(in, batch, 5)) {
    layer.b().setConstant(S(0.1));
  }
  [[nodiscard]] double gemm_flops() const {
    return 2.0 * static_cast<double>(batch) * static_cast<double>(in) * static_cast<double>(out);
  }
};

/// items = samples; bytes = `matrix_elems` scalars per iteration; flop/s.
template <class S>
void report_linear(benchmark::State& state, const LinearSetup<S>& st, Index matrix_elems) {
  state.SetItemsProcessed(state.iterations() * st.batch);
  state.SetBytesProcessed(state.iterations() * matrix_elems * static_cast<Index>(sizeof(S)));
  state.counters["flop/s"] = benchmark::Counter(
      st.gemm_flops(), benchmark::Counter::kIsIterationInvariantRate, benchmark::Counter::kIs1000);
}

template <class S>
void BM_linear_forward(benchmark::State& state) {
  LinearSetup<S> st(state);
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.forward(st.x));
  report_linear(state, st, st.in * st.out + st.out + (st.in + st.out) * st.batch);
}
template <class S>
void BM_linear_jvp(benchmark::State& state) {
  LinearSetup<S> st(state);
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.jvp(st.x, st.dx));
  report_linear(state, st, st.in * st.out + (st.in + st.out) * st.batch);
}
template <class S>
void BM_linear_vjp(benchmark::State& state) {
  LinearSetup<S> st(state);
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.vjp(st.x, st.h));
  report_linear(state, st, st.in * st.out + (st.in + st.out) * st.batch);
}
template <class S>
void BM_linear_vjp_params(benchmark::State& state) {
  LinearSetup<S> st(state);
  Vec<S> g = Vec<S>::Zero(st.layer.num_params());
  for (auto _ : state) {
    g.setZero();
    st.layer.vjp_params(st.x, st.h, g);
    benchmark::DoNotOptimize(g.data());
    benchmark::ClobberMemory();
  }
  report_linear(state, st, 2 * (st.in * st.out + st.out) + (st.in + st.out) * st.batch);
}
template <class S>
void BM_linear_vijp_warm(benchmark::State& state) {
  LinearSetup<S> st(state);
  const moonwalk::Linear<S>& layer = st.layer;        // const: no weight-version bump
  benchmark::DoNotOptimize(layer.vijp(st.x, st.hx));  // factorise once, outside the timing
  for (auto _ : state) benchmark::DoNotOptimize(layer.vijp(st.x, st.hx));
  report_linear(state, st, st.in * st.out + (st.in + st.out) * st.batch);
}
template <class S>
void BM_linear_vijp_cold(benchmark::State& state) {
  LinearSetup<S> st(state);
  S sign = S(1);
  for (auto _ : state) {
    // What an optimizer step does: fetch a mutable view (new weight version)
    // and write through it. A tiny change keeps W well conditioned.
    auto p = st.layer.parameters();
    p[0] += sign * S(1e-3);
    sign = -sign;
    benchmark::DoNotOptimize(st.layer.vijp(st.x, st.hx));
  }
  report_linear(state, st, st.in * st.out + (st.in + st.out) * st.batch);
}

// ---- elementwise

struct LeakyRelu {
  template <class S>
  static moonwalk::LeakyReLU<S> make() {
    return moonwalk::LeakyReLU<S>(kFeatures, S(0.1));
  }
};
struct Tanh {
  template <class S>
  static moonwalk::Tanh<S> make() {
    return moonwalk::Tanh<S>(kFeatures);
  }
};

template <class S, class Kind>
struct ActSetup {
  decltype(Kind::template make<S>()) layer = Kind::template make<S>();
  Mat<S> x = moonwalk::gaussian<S>(kFeatures, kBatch, 2);
  Mat<S> dx = moonwalk::gaussian<S>(kFeatures, kBatch, 3);
  Mat<S> h = moonwalk::gaussian<S>(kFeatures, kBatch, 4);
};

/// items = elements; bytes = `reads_writes` full matrices per iteration.
template <class S>
void report_act(benchmark::State& state, Index reads_writes) {
  constexpr Index n = kFeatures * kBatch;
  state.SetItemsProcessed(state.iterations() * n);
  state.SetBytesProcessed(state.iterations() * reads_writes * n * static_cast<Index>(sizeof(S)));
}

template <class S, class Kind>
void BM_act_forward(benchmark::State& state) {
  ActSetup<S, Kind> st;
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.forward(st.x));
  report_act<S>(state, 2);
}
template <class S, class Kind>
void BM_act_jvp(benchmark::State& state) {
  ActSetup<S, Kind> st;
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.jvp(st.x, st.dx));
  report_act<S>(state, 3);
}
template <class S, class Kind>
void BM_act_vjp(benchmark::State& state) {
  ActSetup<S, Kind> st;
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.vjp(st.x, st.h));
  report_act<S>(state, 3);
}
/// Jᵀ h from the residual the reverse pass saved (mask bits or σ′); the bytes
/// counted are h and the result (the residual is 1 bit or one S per element).
template <class S, class Kind>
void BM_act_vjp_residual(benchmark::State& state) {
  ActSetup<S, Kind> st;
  const auto r = st.layer.save_residual(st.x);
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.vjp_residual(r, st.h));
  report_act<S>(state, 2);
}
template <class S, class Kind>
void BM_act_vijp(benchmark::State& state) {
  ActSetup<S, Kind> st;
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.vijp(st.x, st.h));
  report_act<S>(state, 3);
}

// ---- sanity: vijp inverts vjp on the range (checked once, at start-up)

template <class S>
bool linear_agrees(Index in, Index out, double tol) {
  moonwalk::Linear<S> l(in, out, {.seed = 1});
  const Mat<S> x = moonwalk::gaussian<S>(in, 8, 2), h = moonwalk::gaussian<S>(out, 8, 4);
  const Mat<S> back = l.vijp(x, l.vjp(x, h));
  return static_cast<double>((back - h).norm() / h.norm()) < tol;
}
template <class S, class Kind>
bool act_agrees(double tol) {
  const auto l = Kind::template make<S>();
  const Mat<S> x = moonwalk::gaussian<S>(kFeatures, 8, 2), h = moonwalk::gaussian<S>(kFeatures, 8, 4);
  const Mat<S> back = l.vijp(x, l.vjp(x, h));
  return static_cast<double>((back - h).norm() / h.norm()) < tol;
}
bool agree() {
  return linear_agrees<float>(1024, 512, 1e-4) && linear_agrees<double>(1024, 512, 1e-10) &&
         linear_agrees<float>(256, 256, 1e-4) && act_agrees<float, LeakyRelu>(1e-6) &&
         act_agrees<double, Tanh>(1e-10);
}

}  // namespace

// Args: in, out, batch. The 256 × 256 rows at batch 512 and 1024 straddle the
// batch (2 · out) from which Linear forms its explicit right inverse.
#define MOONWALK_LINEAR(fn)            \
  BENCHMARK_TEMPLATE(fn, float)        \
      ->Args({1024, 1024, 256})        \
      ->Args({1024, 512, 256})         \
      ->Args({256, 256, 512})          \
      ->Args({256, 256, 1024})         \
      ->Unit(benchmark::kMicrosecond); \
  BENCHMARK_TEMPLATE(fn, double)       \
      ->Args({1024, 1024, 256})        \
      ->Args({1024, 512, 256})         \
      ->Args({256, 256, 512})          \
      ->Args({256, 256, 1024})         \
      ->Unit(benchmark::kMicrosecond)

MOONWALK_LINEAR(BM_linear_forward);
MOONWALK_LINEAR(BM_linear_jvp);
MOONWALK_LINEAR(BM_linear_vjp);
MOONWALK_LINEAR(BM_linear_vjp_params);
MOONWALK_LINEAR(BM_linear_vijp_warm);
MOONWALK_LINEAR(BM_linear_vijp_cold);

#define MOONWALK_ACT(fn)                                                    \
  BENCHMARK_TEMPLATE(fn, float, LeakyRelu)->Unit(benchmark::kMicrosecond);  \
  BENCHMARK_TEMPLATE(fn, double, LeakyRelu)->Unit(benchmark::kMicrosecond); \
  BENCHMARK_TEMPLATE(fn, float, Tanh)->Unit(benchmark::kMicrosecond);       \
  BENCHMARK_TEMPLATE(fn, double, Tanh)->Unit(benchmark::kMicrosecond)

MOONWALK_ACT(BM_act_forward);
MOONWALK_ACT(BM_act_jvp);
MOONWALK_ACT(BM_act_vjp);
MOONWALK_ACT(BM_act_vjp_residual);
MOONWALK_ACT(BM_act_vijp);

int main(int argc, char** argv) {
  // The allocator setting of moonwalk-train and moonwalk-memory: freed blocks
  // are kept for reuse, so every iteration's result matrix (4–8 MB here) is
  // not a fresh mmap and page faults (glibc mmaps above 128 KiB by default,
  // and its adaptive threshold makes the timings depend on history).
  mallopt(M_MMAP_THRESHOLD, 512 << 20);
  mallopt(M_TRIM_THRESHOLD, 1024 << 20);
  if (!agree()) {
    std::fprintf(stderr, "moonwalk-bench-layers: vijp does not invert vjp on the range\n");
    return 1;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
