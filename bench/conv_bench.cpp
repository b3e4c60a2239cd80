// Conv2d (im2col + Eigen GEMM, one sample at a time) against direct loops, at
// a realistic size: 16 → 32 channels, 32 × 32 images, 3 × 3 kernels, pad 1,
// batch 32, float. Also the one-big-GEMM-over-the-batch variant of forward
// (patches of every sample stacked, then one GEMM and a copy back to the
// channel-major layout), to justify the per-sample loop.
//
//   moonwalk-bench-conv [--benchmark_filter=...]
//
// Results: BENCHMARKS.md, "Convolution".
#include <benchmark/benchmark.h>

#include <algorithm>
#include <cstdio>
#include <moonwalk/core/init.hpp>
#include <moonwalk/layers/conv.hpp>

namespace {

using moonwalk::Conv2d;
using moonwalk::ImageShape;
using moonwalk::Index;
using S = float;
using Mat = moonwalk::Matrix<S>;
using Vec = moonwalk::Vector<S>;

constexpr Index kC = 16, kCout = 32, kH = 32, kW = 32, kK = 3, kPad = 1, kBatch = 32;

struct Setup {
  Conv2d<S> layer{ImageShape{kC, kH, kW}, kCout, kK, {.pad = kPad, .seed = 1}};
  Mat x = moonwalk::gaussian<S>(layer.in_features(), kBatch, 2);
  Mat h = moonwalk::gaussian<S>(layer.out_features(), kBatch, 3);
  Setup() {
    auto b = layer.b();
    b.setConstant(S(0.1));
  }
};

/// 2 · batch · C' · H'W' · C k k: the multiply-adds of one operator, as flops.
double flops(const Conv2d<S>& l) {
  return 2.0 * static_cast<double>(kBatch) * static_cast<double>(l.out_features()) *
         static_cast<double>(kC * kK * kK);
}

void report(benchmark::State& state, const Conv2d<S>& l) {
  state.counters["flop/s"] = benchmark::Counter(flops(l), benchmark::Counter::kIsIterationInvariantRate,
                                                benchmark::Counter::kIs1000);
}

// ---- direct loops (stride 1, the setup's padding). "textbook": the 7 loops in
//      the order of the formula, bounds checked per tap; "reordered": the
//      pixel loops innermost, the valid j range computed per tap, so the inner
//      loop is a contiguous axpy the compiler vectorises.

Mat direct_forward_textbook(const Conv2d<S>& l, const Mat& x) {
  const ImageShape in = l.in_shape(), out = l.out_shape();
  const auto W = l.W();
  const auto b = l.b();
  Mat y(out.size(), x.cols());
  for (Index s = 0; s < x.cols(); ++s)
    for (Index o = 0; o < out.c; ++o)
      for (Index i = 0; i < out.h; ++i)
        for (Index j = 0; j < out.w; ++j) {
          S acc = b(o);
          for (Index c = 0; c < in.c; ++c)
            for (Index a = 0; a < kK; ++a)
              for (Index e = 0; e < kK; ++e) {
                const Index ii = i - kPad + a, jj = j - kPad + e;
                if (ii >= 0 && ii < in.h && jj >= 0 && jj < in.w)
                  acc += W(o, (c * kK + a) * kK + e) * x(in.index(c, ii, jj), s);
              }
          y(out.index(o, i, j), s) = acc;
        }
  return y;
}

/// Calls f(c, a, e, i, ii, j0, j1, off) for every tap and output row i whose input row ii is inside;
/// output columns [j0, j1) read input column j + off.
template <class F>
void direct_taps(const ImageShape& in, const ImageShape& out, F&& f) {
  for (Index c = 0; c < in.c; ++c)
    for (Index a = 0; a < kK; ++a)
      for (Index e = 0; e < kK; ++e) {
        const Index off = e - kPad;
        const Index j0 = std::max<Index>(0, -off), j1 = std::min(out.w, in.w - off);
        for (Index i = 0; i < out.h; ++i) {
          const Index ii = i - kPad + a;
          if (ii >= 0 && ii < in.h) f(c, a, e, i, ii, j0, j1, off);
        }
      }
}

Mat direct_forward(const Conv2d<S>& l, const Mat& x) {
  const ImageShape in = l.in_shape(), out = l.out_shape();
  const auto W = l.W();
  const auto b = l.b();
  Mat y(out.size(), x.cols());
  for (Index s = 0; s < x.cols(); ++s) {
    const S* xs = x.col(s).data();
    S* ys = y.col(s).data();
    for (Index o = 0; o < out.c; ++o) {
      S* yo = ys + out.index(o, 0, 0);
      std::fill(yo, yo + out.h * out.w, b(o));
      direct_taps(in, out, [&](Index c, Index a, Index e, Index i, Index ii, Index j0, Index j1, Index off) {
        const S w = W(o, (c * kK + a) * kK + e);
        S* yr = yo + i * out.w;
        const S* xr = xs + in.index(c, ii, 0) + off;
        for (Index j = j0; j < j1; ++j) yr[j] += w * xr[j];
      });
    }
  }
  return y;
}

Mat direct_vjp_textbook(const Conv2d<S>& l, const Mat& h) {
  const ImageShape in = l.in_shape(), out = l.out_shape();
  const auto W = l.W();
  Mat dx = Mat::Zero(in.size(), h.cols());
  for (Index s = 0; s < h.cols(); ++s)
    for (Index o = 0; o < out.c; ++o)
      for (Index i = 0; i < out.h; ++i)
        for (Index j = 0; j < out.w; ++j) {
          const S hv = h(out.index(o, i, j), s);
          for (Index c = 0; c < in.c; ++c)
            for (Index a = 0; a < kK; ++a)
              for (Index e = 0; e < kK; ++e) {
                const Index ii = i - kPad + a, jj = j - kPad + e;
                if (ii >= 0 && ii < in.h && jj >= 0 && jj < in.w)
                  dx(in.index(c, ii, jj), s) += W(o, (c * kK + a) * kK + e) * hv;
              }
        }
  return dx;
}

Mat direct_vjp(const Conv2d<S>& l, const Mat& h) {
  const ImageShape in = l.in_shape(), out = l.out_shape();
  const auto W = l.W();
  Mat dx = Mat::Zero(in.size(), h.cols());
  for (Index s = 0; s < h.cols(); ++s) {
    S* dxs = dx.col(s).data();
    const S* hs = h.col(s).data();
    for (Index o = 0; o < out.c; ++o) {
      const S* ho = hs + out.index(o, 0, 0);
      direct_taps(in, out, [&](Index c, Index a, Index e, Index i, Index ii, Index j0, Index j1, Index off) {
        const S w = W(o, (c * kK + a) * kK + e);
        const S* hr = ho + i * out.w;
        S* dr = dxs + in.index(c, ii, 0) + off;
        for (Index j = j0; j < j1; ++j) dr[j] += w * hr[j];
      });
    }
  }
  return dx;
}

Vec direct_vjp_params(const Conv2d<S>& l, const Mat& x, const Mat& h) {
  const ImageShape in = l.in_shape(), out = l.out_shape();
  const Index KK = kC * kK * kK;
  Vec g = Vec::Zero(l.num_params());
  for (Index s = 0; s < h.cols(); ++s) {
    const S* xs = x.col(s).data();
    const S* hs = h.col(s).data();
    for (Index o = 0; o < out.c; ++o) {
      const S* ho = hs + out.index(o, 0, 0);
      direct_taps(in, out, [&](Index c, Index a, Index e, Index i, Index ii, Index j0, Index j1, Index off) {
        const S* hr = ho + i * out.w;
        const S* xr = xs + in.index(c, ii, 0) + off;
        S acc = 0;
        for (Index j = j0; j < j1; ++j) acc += hr[j] * xr[j];
        g(o + out.c * ((c * kK + a) * kK + e)) += acc;
      });
      for (Index p = 0; p < out.h * out.w; ++p) g(out.c * KK + o) += ho[p];
    }
  }
  return g;
}

/// Forward as one GEMM over the batch: stacked patches (B·P × K), then a copy
/// of each sample's P × C' block into its channel-major column.
Mat batched_gemm_forward(const Conv2d<S>& l, const Mat& x, Mat& stacked, Mat& cols) {
  const Index P = l.out_shape().h * l.out_shape().w, C = l.out_shape().c, B = x.cols();
  stacked.resize(B * P, kC * kK * kK);
  for (Index s = 0; s < B; ++s) {
    l.im2col(x.col(s).data(), cols);
    stacked.middleRows(s * P, P) = cols;
  }
  Mat Y(B * P, C);
  Y.noalias() = stacked * l.W().transpose();
  Mat y(l.out_features(), B);
  for (Index s = 0; s < B; ++s) {
    Eigen::Map<Mat> ys(y.col(s).data(), P, C);
    ys = Y.middleRows(s * P, P).rowwise() + l.b().transpose();
  }
  return y;
}

// ---- benchmarks

void BM_forward_im2col_gemm(benchmark::State& state) {
  Setup st;
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.forward(st.x));
  report(state, st.layer);
}
void BM_forward_batched_gemm(benchmark::State& state) {
  Setup st;
  Mat stacked, cols;
  for (auto _ : state) benchmark::DoNotOptimize(batched_gemm_forward(st.layer, st.x, stacked, cols));
  report(state, st.layer);
}
void BM_forward_direct_reordered(benchmark::State& state) {
  Setup st;
  for (auto _ : state) benchmark::DoNotOptimize(direct_forward(st.layer, st.x));
  report(state, st.layer);
}
void BM_forward_direct_textbook(benchmark::State& state) {
  Setup st;
  for (auto _ : state) benchmark::DoNotOptimize(direct_forward_textbook(st.layer, st.x));
  report(state, st.layer);
}
void BM_vjp_im2col_gemm(benchmark::State& state) {
  Setup st;
  for (auto _ : state) benchmark::DoNotOptimize(st.layer.vjp(st.x, st.h));
  report(state, st.layer);
}
void BM_vjp_direct_reordered(benchmark::State& state) {
  Setup st;
  for (auto _ : state) benchmark::DoNotOptimize(direct_vjp(st.layer, st.h));
  report(state, st.layer);
}
void BM_vjp_direct_textbook(benchmark::State& state) {
  Setup st;
  for (auto _ : state) benchmark::DoNotOptimize(direct_vjp_textbook(st.layer, st.h));
  report(state, st.layer);
}
void BM_vjp_params_im2col_gemm(benchmark::State& state) {
  Setup st;
  Vec g = Vec::Zero(st.layer.num_params());
  for (auto _ : state) {
    g.setZero();
    st.layer.vjp_params(st.x, st.h, g);
    benchmark::DoNotOptimize(g.data());
  }
  report(state, st.layer);
}
void BM_vjp_params_direct_reordered(benchmark::State& state) {
  Setup st;
  for (auto _ : state) benchmark::DoNotOptimize(direct_vjp_params(st.layer, st.x, st.h));
  report(state, st.layer);
}

/// The benchmark's direct loops compute what the layer computes (checked once, at start-up).
bool agree() {
  Setup st;
  Mat stacked, cols;
  const Mat y = st.layer.forward(st.x), dx = st.layer.vjp(st.x, st.h);
  Vec g = Vec::Zero(st.layer.num_params());
  st.layer.vjp_params(st.x, st.h, g);
  auto rel = [](const auto& a, const auto& b) { return (a - b).norm() / b.norm(); };
  const float tol = 1e-5f;
  return rel(direct_forward(st.layer, st.x), y) < tol &&
         rel(direct_forward_textbook(st.layer, st.x), y) < tol &&
         rel(batched_gemm_forward(st.layer, st.x, stacked, cols), y) < tol &&
         rel(direct_vjp(st.layer, st.h), dx) < tol && rel(direct_vjp_textbook(st.layer, st.h), dx) < tol &&
         rel(direct_vjp_params(st.layer, st.x, st.h), g) < tol;
}

}  // namespace

BENCHMARK(BM_forward_im2col_gemm)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_forward_batched_gemm)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_forward_direct_reordered)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_forward_direct_textbook)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_vjp_im2col_gemm)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_vjp_direct_reordered)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_vjp_direct_textbook)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_vjp_params_im2col_gemm)->Unit(benchmark::kMillisecond);
BENCHMARK(BM_vjp_params_direct_reordered)->Unit(benchmark::kMillisecond);

int main(int argc, char** argv) {
  if (!agree()) {
    std::fprintf(stderr, "moonwalk-bench-conv: the direct loops disagree with Conv2d\n");
    return 1;
  }
  benchmark::Initialize(&argc, argv);
  if (benchmark::ReportUnrecognizedArguments(argc, argv)) return 1;
  benchmark::RunSpecifiedBenchmarks();
  benchmark::Shutdown();
  return 0;
}
