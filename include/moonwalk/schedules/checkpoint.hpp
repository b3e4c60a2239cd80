// Moonwalk — checkpointed backprop: every-k (√L) segments, or binomial (Revolve).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <sstream>

#include "moonwalk/core/ops.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

namespace detail {

/// β(c, r) = C(c + r, c): the most steps c checkpoints reverse with r
/// repetitions (Griewank's binomial bound); 0 for r < 0, saturating at the
/// largest std::size_t.
inline std::size_t revolve_beta(std::size_t c, std::ptrdiff_t r) {
  if (r < 0) return 0;
  constexpr std::size_t top = std::numeric_limits<std::size_t>::max();
  std::size_t b = 1;  // C(c + i, i), exact at every i
  for (std::size_t i = 1; i <= static_cast<std::size_t>(r); ++i) {
    if (b > top / (c + i)) return top;
    b = b * (c + i) / i;
  }
  return b;
}

/// The least r with β(c, r) ≥ n: how often the worst step is evaluated.
inline std::ptrdiff_t revolve_repetitions(std::size_t n, std::size_t c) {
  std::ptrdiff_t r = 0;
  while (revolve_beta(c, r) < n) ++r;
  return r;
}

/// Griewank's minimal number of forward steps (advances) that reverse n steps
/// holding at most c states, the start included: t(n, c) = r·n − β(c + 1, r − 1),
/// β(c, r − 1) < n ≤ β(c, r). (Treeverse, Griewank 1992; Revolve, Griewank &
/// Walther 2000.)
inline std::size_t revolve_forward_steps(std::size_t n, std::size_t c) {
  const std::ptrdiff_t r = revolve_repetitions(n, c);
  return static_cast<std::size_t>(r) * n - revolve_beta(c + 1, r - 1);
}

/// Where to place the next checkpoint, as an offset 1..n−1 from the held state,
/// when n ≥ 2 steps are to be reversed with c ≥ 2 states (the held one
/// included): the left part (m steps, c states) then takes ≤ r − 1 repetitions
/// and the right part (n − m steps, c − 1 states) ≤ r, which attains t(n, c).
inline std::size_t revolve_split(std::size_t n, std::size_t c) {
  const std::ptrdiff_t r = revolve_repetitions(n, c);
  const std::size_t right = revolve_beta(c - 1, r);
  const std::size_t lo = n > right ? n - right : 0;
  const std::size_t m = std::max(lo, revolve_beta(c, r - 2));
  return std::clamp<std::size_t>(m, 1, n - 1);
}

}  // namespace detail

/// Backprop that keeps only some layer inputs and recomputes the others.
///
/// every-k (`slots == 0`): the forward pass keeps x_s for every segment start
/// s = 0, k, 2k, … ("checkpoint"); then, segment by segment from the last,
/// recomputes the segment's other inputs from its checkpoint, keeping them
/// ("activation", also accounted), backprops through the segment and frees it.
/// Peak: ⌈L/k⌉ checkpoints + k − 1 recomputed inputs. `every == 0` means
/// k = round(√L) (at least 1).
///
/// binomial (`slots = c > 0`): at most c layer inputs are held at once (x_0
/// included); checkpoints are placed by Griewank's treeverse with the split
/// from binomial numbers, so the number of forward calls is the minimum
/// t(L, c) + 1 (the +1 is x_L for the loss; detail::revolve_forward_steps).
/// `stats.figures["recomputed_forwards"]` is the forward calls beyond L.
struct Checkpointing {
  std::size_t every = 0;  ///< segment length k; 0: round(√L)
  std::size_t slots = 0;  ///< > 0: binomial checkpointing with this many held inputs
  /// Also return h_0 = ∂ℓ/∂x_0 (one more input-vjp, through the first layer).
  bool input_gradient = false;

  [[nodiscard]] static std::string name() { return "checkpoint"; }

  template <Net N, class L>
  GradientResult<typename N::scalar_type> run(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                                              const typename L::target_type& target) const {
    if (every > 0 && slots > 0) {
      std::ostringstream s;
      s << name() << ": choose every (" << every << ") or slots (" << slots << "), not both";
      throw ScheduleError(s.str());
    }
    using S = typename N::scalar_type;
    GradientResult<S> out;
    out.stats.schedule = name();
    SavedStore store(net.size());
    zero_gradients(net);
    if (slots > 0)
      binomial(net, x0, loss, target, store, out);
    else
      segments(net, x0, loss, target, store, out);
    out.stats.figures["recomputed_forwards"] =
        static_cast<double>(out.stats.counts.forward) - static_cast<double>(net.size());
    out.gradient = get_gradients(net);
    store.report_to(out.stats);
    return out;
  }

 private:
  /// g_j += J_{θ,j}ᵀ h, h = J_jᵀ h, from the input x_j of layer j (at the
  /// first layer only with input_gradient).
  template <Net N>
  void back_step(N& net, std::size_t j, const CRef<typename N::scalar_type>& xj,
                 Matrix<typename N::scalar_type>& h, Stats& st) const {
    const bool to_input = j > 0 || input_gradient;
    net.visit(j, [&](auto& l) {
      moonwalk::accumulate_vjp_params(l, xj, h);
      if (to_input) h = l.vjp(xj, h);
    });
    ++st.counts.vjp_params;
    st.counts.vjp += to_input;
  }

  template <Net N, class L>
  void segments(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                const typename L::target_type& target, SavedStore& store,
                GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    Stats& st = out.stats;
    const std::size_t n = net.size();
    const std::size_t root = static_cast<std::size_t>(std::lround(std::sqrt(static_cast<double>(n))));
    const std::size_t len = std::clamp<std::size_t>(every > 0 ? every : root, 1, n);
    std::size_t n_checkpoints = 0;

    // Forward: keep the input of every segment start.
    Matrix<S> x = x0;
    detail::for_each_layer(net, [&](std::size_t i, auto& l) {
      if (i % len == 0) {
        store.put(i, SavedStore::residual, l.name(), Matrix<S>(x), "checkpoint");
        ++n_checkpoints;
      }
      x = l.forward(x);
      ++st.counts.forward;
    });
    auto vg = loss.value_and_gradient(x, target);  // (no structured binding: lambdas capture h)
    out.loss = vg.first;
    Matrix<S> h = std::move(vg.second);
    x.resize(0, 0);

    // Backward, segment by segment from the last.
    for (std::size_t s = (n - 1) / len * len;; s -= len) {
      const std::size_t e = std::min(n, s + len);
      // Recompute x_{s+1} … x_{e−1} from the checkpoint x_s, keeping them.
      for (std::size_t i = s; i + 1 < e; ++i) {
        const Matrix<S>& xi = i == s ? store.get<Matrix<S>>(s, SavedStore::residual)
                                     : store.get<Matrix<S>>(i, SavedStore::activation);
        Matrix<S> y;
        net.visit(i, [&](const auto& l) { y = l.forward(xi); });
        ++st.counts.forward;
        net.visit(i + 1,
                  [&](const auto& l) { store.put(i + 1, SavedStore::activation, l.name(), std::move(y)); });
      }
      for (std::size_t j = e; j-- > s;) {
        const Matrix<S> xj = j == s ? store.take<Matrix<S>>(s, SavedStore::residual)
                                    : store.take<Matrix<S>>(j, SavedStore::activation);
        back_step(net, j, xj, h, st);
      }
      if (s == 0) break;
    }
    if (input_gradient) out.h0 = std::move(h);
    st.figures["every"] = static_cast<double>(len);
    st.figures["checkpoints"] = static_cast<double>(n_checkpoints);
  }

  template <Net N, class L>
  void binomial(N& net, const CRef<typename N::scalar_type>& x0, const L& loss,
                const typename L::target_type& target, SavedStore& store,
                GradientResult<typename N::scalar_type>& out) const {
    using S = typename N::scalar_type;
    Stats& st = out.stats;
    const std::size_t n = net.size();
    Matrix<S> h;
    bool have_h = false;
    std::size_t held = 0, max_held = 0;

    auto hold = [&](std::size_t i, Matrix<S> v) {
      net.visit(i, [&](const auto& l) {
        store.put(i, SavedStore::residual, l.name(), std::move(v), "checkpoint");
      });
      max_held = std::max(max_held, ++held);
    };
    auto release = [&](std::size_t i) {
      store.drop(i, SavedStore::residual);
      --held;
    };
    // x_j from the checkpoint x_a (a ≤ j): j − a forward calls.
    auto advance = [&](std::size_t a, std::size_t j) {
      Matrix<S> v = store.get<Matrix<S>>(a, SavedStore::residual);
      for (std::size_t i = a; i < j; ++i) {
        net.visit(i, [&](const auto& l) { v = l.forward(v); });
        ++st.counts.forward;
      }
      return v;
    };
    // Reverses layer j from its input; the first one (j = L − 1) also runs
    // the last layer forward for the loss.
    auto turn = [&](std::size_t j, const Matrix<S>& xj) {
      if (!have_h) {
        Matrix<S> y;
        net.visit(j, [&](const auto& l) { y = l.forward(xj); });
        ++st.counts.forward;
        auto [value, g] = loss.value_and_gradient(y, target);
        out.loss = value;
        h = std::move(g);
        have_h = true;
      }
      back_step(net, j, xj, h, st);
    };
    // Reverses layers a … b−1 holding the checkpoint x_a and `free` more
    // slots: split, reverse the right part with one slot fewer, release, and
    // continue on the left part (a loop, so the recursion depth is ≤ slots).
    auto treeverse = [&](auto& self, std::size_t a, std::size_t b, std::size_t free) -> void {
      while (b - a > 1 && free > 0) {
        const std::size_t m = a + detail::revolve_split(b - a, free + 1);
        hold(m, advance(a, m));
        self(self, m, b, free - 1);
        release(m);
        b = m;
      }
      for (std::size_t j = b; j-- > a;) turn(j, advance(a, j));
    };

    hold(0, Matrix<S>(x0));
    treeverse(treeverse, 0, n, slots - 1);
    release(0);
    if (input_gradient) out.h0 = std::move(h);
    st.figures["slots"] = static_cast<double>(slots);
    st.figures["checkpoints"] = static_cast<double>(max_held);
    st.figures["predicted_forwards"] = static_cast<double>(detail::revolve_forward_steps(n, slots) + 1);
  }
};

}  // namespace moonwalk
