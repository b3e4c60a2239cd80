// Moonwalk — the generic numerical checker for any layer, yours included, in
// the style of dlib's test_layer() and InvertibleNetworks.jl's gradient tests.
// It needs no test framework:
//
//   #include <moonwalk/testing/check_layer.hpp>
//   const auto report = moonwalk::testing::test_layer<float>([](auto tag) {
//     using S = typename decltype(tag)::type;
//     return MyLayer<S>(7, 5);            // built for S and for double
//   });
//   if (!report.failures.empty()) std::cerr << report.str() << "\n";
//
// The checker builds the layer for S and for double (its "double twin",
// given the S layer's parameters exactly), then checks, on random inputs x
// (in × batch) with |x| ≥ kink_margin, random tangents and cotangents:
//
//   [jvp-fd]                jvp vs central finite differences of the double twin
//   [taylor-*]              ‖f(x+εv) − f(x)‖ halves and ‖f(x+εv) − f(x) − εJv‖
//                           quarters as ε halves (double twin); a layer that is
//                           linear on the segment (Linear, (Leaky)ReLU away from
//                           0) must instead have a remainder at rounding level
//   [jvp-params-fd]         jvp_params vs FD over the flat θ (parameters() or
//                           parameter_blocks(), through moonwalk::parameter_blocks)
//   [adjoint-input]         <u, J v> = <Jᵀu, v>        (jvp vs vjp)
//   [adjoint-params]        <u, J_θ dθ> = <J_θᵀu, dθ>  (jvp_params vs vjp_params from 0)
//   [vjp-params-accumulates] vjp_params adds to g, it does not overwrite it
//   [residual]              vjp_residual(save_residual(x), h) = vjp(x, h)
//   [vijp]                  vijp(x, vjp(x, h)) = h          when can_vijp
//   [vijp-refuses]          vijp throws RankError           when it has vijp but !can_vijp
//   [fragment-*]            vijp_with_fragment(x, vjp(x, h), save_fragment(r, h)) = h,
//                           and with the fragment zeroed the result differs from h
//                           but still has the same vjp (the fragment is exactly the
//                           part Jᵀ erases)             when can_fragment && !can_vijp
//   [inverse]               inverse(forward(x)) = x         when can_invert
//   [into]                  the output-argument forms (core/ops.hpp: forward_into,
//                           vjp_into, save_residual_into, vjp_residual_into, vijp_into,
//                           inverse_into)
//                           into NaN-filled buffers (and a block of a wider one)
//                           equal the value forms exactly; a wrong-shaped buffer
//                           throws ShapeError naming the layer
//   [shape]                 forward/jvp/vjp with a wrong row count throw ShapeError
//                           naming the layer, the bad shape and the expected rows
//   [cast]                  when CastableTo<L, double>: cast<double>() has the same name,
//                           shape and θ (exactly), zero gradients (not stored before their
//                           first access, where the layer has stores_gradient()), and a forward equal to
//                           the layer's up to its rounding
//   [cast-into]             cast_into(l, a used cast of other weights) equals a fresh cast:
//                           parameters, forward, vijp and amplification, exactly
//   [cast-roundtrip]        cast<double>().cast<S>() gives θ back exactly
//   [amplification]         when HasAmplification (and known): 0 < typical ≤ bound, 1 ≤ bound on x
//                           (+∞ allowed, bound first)
//   [amplification-bounds]  double only, when the layer can sweep (vijp, or
//                           vijp_with_fragment with the fragment of the unperturbed h_y):
//                           per sample, the measured growth of a random error δ in h_x,
//                           (‖Δh_y‖/‖h_y‖) / (‖δ‖/‖h_x‖) with h_x = vjp(x, u), over a few
//                           random u and δ, stays ≤ 1.01 · bound
//
// Every layer operation is reached through std::function callbacks in double
// (detail::LayerView), so the checks themselves compile once per translation
// unit, not once per layer type.
//
// `test_layer_pair(layer, twin, options, sink)` does the same for a layer and
// a twin built by hand; `sink`, when given, hears every check as it is made
// (the repository's tests turn each into a Catch assertion:
// tests/support/layer_check.hpp, and feed the checker deliberately broken
// layers in tests/layers/test_layer_check.cpp).
#pragma once

#include <algorithm>
#include <any>
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <functional>
#include <iomanip>
#include <limits>
#include <sstream>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/init.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"
#include "moonwalk/testing/numerics.hpp"

namespace moonwalk::testing {

/// Tolerances for a layer computing in a scalar type with machine epsilon `eps`.
struct LayerTol {
  /// An identity evaluated in S (adjointness, round trips, accumulation,
  /// inversion) on O(1) data: sums of ≤ ~20 terms and condition numbers ≤ ~10
  /// lose at most ~100 ε_S (double 2.2e-14, float 1.2e-5).
  double identity;
  /// An S operator against central differences of its double twin: the FD
  /// error (step 1e-5: ~1e-10 truncation and rounding) plus S's own rounding.
  double fd;
  /// The same computation through another entry point.
  double same;
  explicit LayerTol(double eps) : identity(100 * eps), fd(std::max(100 * eps, 1e-8)), same(8 * eps) {}
};

struct LayerCheckOptions {
  std::uint64_t seed = 20240601;
  Index batch = 3;
  /// Every input entry has |x| ≥ kink_margin, and no FD or Taylor step moves
  /// an entry by more than that: piecewise-linear layers (kink at 0) are
  /// differentiable along every segment the checker walks.
  double kink_margin = 0.25;
  /// |x| = kink_margin + input_scale · |N(0, 1)|.
  double input_scale = 0.75;
  double fd_step = 1e-5;
  double taylor_step = 1e-2;
  int taylor_halvings = 4;
};

/// What the checker found: one line per failed check, tagged as in the header comment.
struct LayerCheckReport {
  std::string subject;  ///< "layer NAME in S, seed N"
  int checks = 0;
  std::vector<std::string> failures;
  [[nodiscard]] bool failed(const std::string& tag) const {
    for (const auto& f : failures)
      if (f.rfind(tag, 0) == 0) return true;
    return false;
  }
  [[nodiscard]] std::string str() const {
    std::ostringstream s;
    s << subject << ": " << checks << " checks, " << failures.size() << " failed";
    for (const auto& f : failures) s << "\n  " << f;
    return s.str();
  }
};

/// Hears every check as it is made: its tagged line, and whether it held.
using CheckSink = std::function<void(const std::string& line, bool ok)>;

namespace detail {

struct Aborted {};

/// Counts checks and records failures; tells the sink about each.
class Checker {
 public:
  explicit Checker(CheckSink sink) : sink_(std::move(sink)) {}

  void check(const char* tag, bool ok, const std::string& what) {
    ++report.checks;
    const std::string line = std::string(tag) + " " + what;
    if (!ok) report.failures.push_back(line);
    if (sink_) sink_(line, ok);
  }
  /// value ≤ tol (false for NaN).
  void le(const char* tag, double value, double tol, const std::string& what) {
    std::ostringstream s;
    s << what << ": " << std::setprecision(3) << value << " <= " << tol;
    check(tag, value <= tol, s.str());
  }
  /// A precondition of the checks that follow: stops the run when false.
  void require(const char* tag, bool ok, const std::string& what) {
    ++report.checks;
    const std::string line = std::string(tag) + " " + what;
    if (ok) return;
    report.failures.push_back(line);
    if (sink_) sink_(line, false);
    throw Aborted{};
  }

  LayerCheckReport report;

 private:
  CheckSink sink_;
};

using MatD = Mat<double>;
using VecD = Vec<double>;

/// Zeroes a fragment's numbers (a Fragment<S>, or one inside an Erased);
/// false when the fragment type is not one the checker can edit.
template <class S, class F>
bool zero_fragment(F& f) {
  if constexpr (std::is_same_v<F, moonwalk::Erased>) {
    if (auto* p = std::any_cast<moonwalk::Fragment<S>>(&f.value)) {
      p->value.setZero();
      return true;
    }
    return false;
  } else if constexpr (requires { f.value.setZero(); }) {
    f.value.setZero();
    return true;
  } else {
    return false;
  }
}

/// Total entries of a list of blocks (parameter_blocks / gradient_blocks).
template <class Blocks>
Index block_total(const Blocks& blocks) {
  Index t = 0;
  for (const auto& b : blocks) t += static_cast<Index>(b.size());
  return t;
}

/// θ in flat order, in double (flat parameters() or parameter_blocks()).
template <class L>
VecD params_of(const L& l) {
  const auto blocks = moonwalk::parameter_blocks(l);
  VecD v(block_total(blocks));
  Index k = 0;
  for (const auto& b : blocks)
    for (const auto& p : b) v(k++) = static_cast<double>(p);
  return v;
}

/// Writes θ (flat order) into the layer, rounding to its scalar type.
template <class L>
void set_params(L& l, const VecD& v) {
  Index k = 0;
  for (auto b : moonwalk::parameter_blocks(l))
    for (auto& p : b) p = static_cast<typename L::scalar_type>(v(k++));
}

inline std::string fmt_shape(Index r, Index c) { return moonwalk::detail::shape_str(r, c); }

/// What the fragment check needs from a fragmental layer, computed in S.
struct FragmentRun {
  MatD hx;         // vjp(x, h)
  MatD roundtrip;  // vijp_with_fragment(x, hx, save_fragment(save_residual(x), h))
  MatD zeroed;     // the same with the fragment's numbers zeroed (when zeroable)
  std::size_t bytes = 0;
  bool zeroable = false;
};

/// What the cast check needs: the layer cast to double, seen in double.
struct CastRun {
  std::string name;
  Index in = 0, out = 0, params = 0;
  MatD forward;  // cast<double>().forward(x)
  VecD theta;    // θ of cast<double>()
  bool gradients_zero = false;
  bool gradient_unstored = true;  // before its first access, where the layer says (stores_gradient())
  bool has_roundtrip = false;
  VecD theta_back;  // θ of cast<double>().cast<S>()
  // cast_into(l, stale): stale = the cast of other weights, used (its caches
  // filled), then refreshed from the layer in place
  VecD into_theta;
  MatD into_forward;
  bool into_gradients_zero = false;
  double into_vijp_diff = 0;  // |vijp of the refreshed − of the fresh cast|, summed
  double into_amplification_diff = 0;
  double released_vijp_diff = 0;  // the same after release_derived(stale)
  double released_amplification_diff = 0;
};

/// What the output-argument check needs: each *_into result minus its value
/// form (NaN-filled buffers), and the error for a wrong-shaped buffer.
struct IntoRun {
  double forward_diff = 0, vjp_diff = 0, vjp_residual_diff = 0, vijp_diff = 0, inverse_diff = 0;
  Thrown wrong_shape;
};

/// The five wrong-shape calls.
enum class BadCall { forward_x, jvp_x, jvp_dx, vjp_x, vjp_h };

/// A layer computing in S and its double twin, seen through double-valued
/// callbacks, so the checks below compile once, not once per layer type.
/// The checker only passes values representable in S: converting is exact.
struct LayerView {
  std::string name;
  Index in = 0, out = 0, params = 0;
  bool storage_ok = false;  // twin matches; parameter and gradient storage have `params` entries
  double eps = 0;           // of S
  std::size_t scalar_bytes = 0;
  std::function<MatD(const MatD&)> round;  // to S and back

  std::function<MatD(const MatD&)> forward;
  std::function<MatD(const MatD&, const MatD&)> jvp, vjp, vjp_residual;
  std::function<MatD(const MatD&, const VecD&)> jvp_params;
  std::function<VecD(const MatD&, const MatD&, const VecD&)> vjp_params;  // g + J_θᵀ h, accumulated in S
  std::function<std::size_t(const MatD&)> residual_bytes;
  bool has_vijp = false, can_vijp = false;
  std::function<MatD(const MatD&, const MatD&)> vijp;
  bool has_fragment = false, can_fragment = false;
  std::function<FragmentRun(const MatD& x, const MatD& hy)> fragment;
  bool has_inverse = false, can_invert = false;
  std::function<MatD(const MatD&)> inverse;
  std::function<Thrown(BadCall, const MatD& x, const MatD& v, const MatD& u)> bad_call;
  std::function<IntoRun(const MatD& x, const MatD& h, const MatD& hx)> into;  // h: output cotangent

  std::function<VecD()> layer_params;  // θ of the S layer, exactly

  // optional protocols (core/amplification.hpp)
  bool has_cast = false;
  std::function<CastRun(const MatD& x)> cast;
  bool has_amplification = false;
  std::function<moonwalk::Amplification(const MatD& x)> amplification;
  bool can_sweep = false;  // can_vijp or can_fragment
  /// h_y from h_x: vijp, or vijp_with_fragment with the fragment saved from `hy`.
  std::function<MatD(const MatD& x, const MatD& hx, const MatD& hy)> sweep;

  std::function<MatD(const MatD&)> twin_forward;
  std::function<MatD(const MatD&, const MatD&)> twin_jvp;
  std::function<VecD()> twin_params;
  std::function<void(const VecD&)> twin_set_params;
};

/// The view of `l` (scalar S) and its twin `d` (double); both must outlive it.
template <class L, class LD>
LayerView make_view(L& l, LD& d) {
  using S = typename L::scalar_type;
  using MS = Mat<S>;
  auto toS = [](const MatD& m) { return MS(m.template cast<S>()); };
  auto toD = [](const MS& m) { return MatD(m.template cast<double>()); };
  LayerView v;
  v.name = l.name();
  v.in = l.in_features();
  v.out = l.out_features();
  v.params = l.num_params();
  v.storage_ok = d.name() == v.name && d.in_features() == v.in && d.out_features() == v.out &&
                 d.num_params() == v.params &&
                 block_total(moonwalk::parameter_blocks(std::as_const(l))) == v.params &&
                 block_total(moonwalk::gradient_blocks(std::as_const(l))) == v.params &&
                 block_total(moonwalk::parameter_blocks(std::as_const(d))) == v.params;
  v.eps = static_cast<double>(std::numeric_limits<S>::epsilon());
  v.scalar_bytes = sizeof(S);
  v.round = [=](const MatD& m) { return toD(toS(m)); };

  v.forward = [&l, toS, toD](const MatD& x) { return toD(l.forward(toS(x))); };
  v.jvp = [&l, toS, toD](const MatD& x, const MatD& dx) { return toD(l.jvp(toS(x), toS(dx))); };
  v.vjp = [&l, toS, toD](const MatD& x, const MatD& h) { return toD(l.vjp(toS(x), toS(h))); };
  v.vjp_residual = [&l, toS, toD](const MatD& x, const MatD& h) {
    const MS xs = toS(x);
    return toD(moonwalk::vjp_residual(l, moonwalk::save_residual(l, xs), toS(h)));
  };
  v.residual_bytes = [&l, toS](const MatD& x) {
    return moonwalk::nbytes(moonwalk::save_residual(l, toS(x)));
  };
  v.jvp_params = [&l, toS, toD](const MatD& x, const VecD& dt) {
    return toD(l.jvp_params(toS(x), Vec<S>(dt.template cast<S>())));
  };
  v.vjp_params = [&l, toS](const MatD& x, const MatD& h, const VecD& g0) {
    Vec<S> g = g0.template cast<S>();
    l.vjp_params(toS(x), toS(h), g);
    return VecD(g.template cast<double>());
  };

  if constexpr (moonwalk::Submersive<L>) {
    v.has_vijp = true;
    v.can_vijp = moonwalk::can_vijp(l);
    v.vijp = [&l, toS, toD](const MatD& x, const MatD& hx) { return toD(l.vijp(toS(x), toS(hx))); };
  }
  if constexpr (moonwalk::Fragmental<L>) {
    v.has_fragment = true;
    v.can_fragment = moonwalk::can_fragment(l);
    v.fragment = [&l, toS, toD](const MatD& x, const MatD& hy) {
      const MS xs = toS(x), hys = toS(hy);
      FragmentRun r;
      const auto f = l.save_fragment(moonwalk::save_residual(l, xs), hys);
      const MS hx = l.vjp(xs, hys);
      r.hx = toD(hx);
      r.roundtrip = toD(l.vijp_with_fragment(xs, hx, f));
      r.bytes = moonwalk::nbytes(f);
      auto fz = f;
      r.zeroable = zero_fragment<S>(fz);
      if (r.zeroable) r.zeroed = toD(l.vijp_with_fragment(xs, hx, fz));
      return r;
    };
  }
  if constexpr (moonwalk::Invertible<L>) {
    v.has_inverse = true;
    v.can_invert = moonwalk::can_invert(l);
    v.inverse = [&l, toS, toD](const MatD& y) { return toD(l.inverse(toS(y))); };
  }
  v.into = [&l, toS](const MatD& x, const MatD& h, const MatD& hx_in) {
    const MS xs = toS(x), hs = toS(h), hxs = toS(hx_in);
    const Index n = l.in_features(), m = l.out_features(), B = x.cols();
    IntoRun r;
    auto diff = [](const MS& a, const MS& b) {
      return a.rows() == b.rows() && a.cols() == b.cols() ? static_cast<double>((a - b).cwiseAbs().sum())
                                                          : std::numeric_limits<double>::infinity();
    };
    // Outputs written into buffers full of NaN: every entry must be written,
    // none read. Through a column block of a wider matrix, too (a MatRef with
    // an outer stride).
    const S nan = std::numeric_limits<S>::quiet_NaN();
    MS y = MS::Constant(m, B, nan), v = MS::Constant(n, B, nan), g = MS::Constant(n, B, nan),
       hy = MS::Constant(m, B, nan), wide = MS::Constant(m + 3, B, nan);
    moonwalk::forward_into(l, xs, y);
    moonwalk::forward_into(l, xs, wide.topRows(m));
    moonwalk::vjp_into(l, xs, hs, v);
    moonwalk::residual_t<L> res;
    moonwalk::save_residual_into(l, xs, res);
    moonwalk::save_residual_into(l, xs, res);  // again, into the residual's own storage
    moonwalk::vjp_residual_into(l, res, hs, g);
    r.forward_diff = std::max(diff(y, l.forward(xs)), diff(wide.topRows(m), l.forward(xs)));
    r.vjp_diff = diff(v, l.vjp(xs, hs));
    r.vjp_residual_diff = diff(g, moonwalk::vjp_residual(l, moonwalk::save_residual(l, xs), hs));
    if constexpr (moonwalk::Submersive<L>) {
      if (moonwalk::can_vijp(l)) {
        moonwalk::vijp_into(l, xs, hxs, hy);
        r.vijp_diff = diff(hy, l.vijp(xs, hxs));
      }
    }
    if constexpr (moonwalk::Invertible<L>) {
      if (moonwalk::can_invert(l)) {
        const MS ys = l.forward(xs);
        MS xi = MS::Constant(n, B, nan);
        moonwalk::inverse_into(l, ys, xi);
        r.inverse_diff = diff(xi, l.inverse(ys));
      }
    }
    // A buffer of the wrong shape is refused, naming the layer.
    MS bad = MS::Zero(m + 1, B);
    r.wrong_shape = catch_as<moonwalk::ShapeError>([&] { moonwalk::forward_into(l, xs, bad); });
    return r;
  };
  v.bad_call = [&l, toS](BadCall c, const MatD& x, const MatD& dx, const MatD& u) {
    const Index n = l.in_features(), m = l.out_features(), B = x.cols();
    const MS xs = toS(x), vs = toS(dx), us = toS(u), xbad = MS::Ones(n + 2, B), ubad = MS::Ones(m + 2, B);
    return catch_as<moonwalk::ShapeError>([&] {
      switch (c) {
        case BadCall::forward_x:
          (void)l.forward(xbad);
          break;
        case BadCall::jvp_x:
          (void)l.jvp(xbad, vs);
          break;
        case BadCall::jvp_dx:
          (void)l.jvp(xs, xbad);
          break;
        case BadCall::vjp_x:
          (void)l.vjp(xbad, us);
          break;
        case BadCall::vjp_h:
          (void)l.vjp(xs, ubad);
          break;
      }
    });
  };

  if constexpr (moonwalk::CastableTo<L, double>) {
    v.has_cast = true;
    v.cast = [&l](const MatD& x) {
      const auto ld = l.template cast<double>();
      CastRun r;
      r.name = ld.name();
      r.in = ld.in_features();
      r.out = ld.out_features();
      r.params = ld.num_params();
      r.forward = ld.forward(x);
      r.theta = params_of(ld);
      if constexpr (requires { ld.stores_gradient(); }) r.gradient_unstored = !ld.stores_gradient();
      r.gradients_zero = true;
      for (const auto& b : moonwalk::gradient_blocks(ld))
        for (const double g : b) r.gradients_zero = r.gradients_zero && g == 0;
      if constexpr (moonwalk::CastableTo<std::remove_cvref_t<decltype(ld)>, S>) {
        r.has_roundtrip = true;
        r.theta_back = params_of(ld.template cast<S>());
      }
      // A cast of other weights, its caches filled, refreshed in place.
      using Lcast = std::remove_cvref_t<decltype(ld)>;
      L other = l;
      const VecD t0 = params_of(other);
      if (t0.size() > 0) set_params(other, VecD(t0 + 0.25 * randn(t0.size(), 1, 977).col(0)));
      Lcast stale = other.template cast<double>();
      const MatD hx = randn(ld.in_features(), x.cols(), 978);
      auto vijp_of = [&](const Lcast& d) -> MatD {
        if constexpr (moonwalk::Submersive<Lcast>) {
          try {
            return d.vijp(x, hx);
          } catch (const moonwalk::Error&) {  // (not submersive at these weights or shapes)
          }
        }
        return MatD();
      };
      auto amplification_of = [&](const Lcast& d) -> MatD {
        if constexpr (moonwalk::HasAmplification<Lcast>) {
          const moonwalk::Amplification a = moonwalk::amplification(d, moonwalk::save_residual(d, x));
          return MatD{{a.bound, a.typical}};
        }
        return MatD();
      };
      (void)stale.forward(x);
      (void)vijp_of(stale);
      (void)amplification_of(stale);
      moonwalk::cast_into<double>(l, stale);
      r.into_theta = params_of(stale);
      r.into_forward = stale.forward(x);
      r.into_gradients_zero = true;
      for (const auto& b : moonwalk::gradient_blocks(stale))
        for (const double g : b) r.into_gradients_zero = r.into_gradients_zero && g == 0;
      const auto diff = [](const MatD& a, const MatD& b) {
        if (a.rows() != b.rows() || a.cols() != b.cols()) return std::numeric_limits<double>::infinity();
        return a.size() == 0 ? 0.0 : static_cast<double>((a - b).cwiseAbs().sum());
      };
      r.into_vijp_diff = diff(vijp_of(stale), vijp_of(ld));
      r.into_amplification_diff = diff(amplification_of(stale), amplification_of(ld));
      // Dropping what it derived from its weights changes nothing either.
      moonwalk::release_derived(stale);
      r.released_vijp_diff = diff(vijp_of(stale), vijp_of(ld));
      r.released_amplification_diff = diff(amplification_of(stale), amplification_of(ld));
      return r;
    };
  }
  if constexpr (moonwalk::HasAmplification<L>) {
    v.has_amplification = true;
    v.amplification = [&l, toS](const MatD& x) {
      const MS xs = toS(x);
      return moonwalk::amplification(l, moonwalk::save_residual(l, xs));
    };
  }
  v.can_sweep = v.can_vijp || (v.has_fragment && v.can_fragment);
  v.sweep = [&l, toS, toD](const MatD& x, const MatD& hx, const MatD& hy) {
    (void)l, (void)toD;  // (unused where L can neither vijp nor fragment)
    const MS xs = toS(x), hxs = toS(hx);
    if constexpr (moonwalk::Submersive<L>)
      if (moonwalk::can_vijp(l)) return toD(l.vijp(xs, hxs));
    if constexpr (moonwalk::Fragmental<L>)
      if (moonwalk::can_fragment(l))
        return toD(l.vijp_with_fragment(xs, hxs, l.save_fragment(moonwalk::save_residual(l, xs), toS(hy))));
    return MatD();
  };

  v.layer_params = [&l] { return params_of(std::as_const(l)); };
  v.twin_forward = [&d](const MatD& x) { return MatD(d.forward(x)); };
  v.twin_jvp = [&d](const MatD& x, const MatD& dx) { return MatD(d.jvp(x, dx)); };
  v.twin_params = [&d] { return params_of(d); };
  v.twin_set_params = [&d](const VecD& th) { set_params(d, th); };
  return v;
}

/// Every check, on a view (see the header comment for the list).
inline void run_layer_checks(const LayerView& L, const LayerCheckOptions& o, Checker& c) {
  const LayerTol T(L.eps);
  const std::string& name = L.name;
  const Index n = L.in, m = L.out, B = o.batch, P = L.params;
  auto seed = [&](std::uint64_t k) { return o.seed * 1000003ULL + k; };

  // ---- the double twin: same shape, same name, exactly the layer's parameters
  c.require("[twin]", L.storage_ok,
            "the double twin has the layer's name, shape and parameter count, and the parameter and "
            "gradient storage have num_params() entries");
  L.twin_set_params(L.layer_params());

  // ---- random data, representable in S; inputs away from 0 (kinks)
  const MatD x = L.round(randn(n, B, seed(1)).unaryExpr([&](double g) {
    return (g < 0 ? -1.0 : 1.0) * (o.kink_margin + o.input_scale * std::abs(g));
  }));
  const MatD v = L.round(randn(n, B, seed(2)));    // input tangent
  const MatD u = L.round(randn(m, B, seed(3)));    // output cotangent (adjointness)
  const VecD dth = L.round(randn(P, 1, seed(4)));  // parameter tangent
  const MatD hy = L.round(randn(m, B, seed(6)));   // output cotangent (round trips)

  // ---- forward
  const MatD y = L.forward(x);
  c.require("[forward]", y.rows() == m && y.cols() == B,
            "forward returns out x batch = " + fmt_shape(m, B) + ", got " + fmt_shape(y.rows(), y.cols()));
  c.check("[forward]", y.allFinite(), "forward is finite");
  const MatD yd = L.twin_forward(x);
  c.le("[forward]", rel_err(y, yd), T.identity, "forward agrees with the double twin");

  // ---- jvp vs central FD in double
  const MatD jv = L.jvp(x, v);
  c.require("[jvp-fd]", jv.rows() == m && jv.cols() == B, "jvp returns out x batch");
  {
    const double h = o.fd_step;
    const MatD fd = (L.twin_forward(x + h * v) - L.twin_forward(x - h * v)) / (2 * h);
    c.le("[jvp-fd]", rel_err(jv, fd), T.fd, "jvp vs central FD of the double twin (relative)");
  }

  // ---- Taylor remainders, double twin
  {
    const MatD jvd = L.twin_jvp(x, v);
    c.require("[taylor]", o.taylor_step * v.cwiseAbs().maxCoeff() < o.kink_margin,
              "precondition: Taylor steps stay inside the kink margin");
    c.require("[taylor]", jvd.norm() > 0, "precondition: J v != 0");
    std::vector<double> r1, r2;
    double e = o.taylor_step;
    for (int k = 0; k <= o.taylor_halvings; ++k, e /= 2) {
      const MatD fe = L.twin_forward(x + e * v);
      r1.push_back((fe - yd).norm());
      r2.push_back((fe - yd - e * jvd).norm());
    }
    // Linear along this segment (Linear, Identity, (Leaky)ReLU away from its kink):
    // the first-order remainder is rounding only, at every step.
    const bool linear = r2[0] <= 1e-9 * r1[0];
    for (std::size_t k = 1; k < r1.size(); ++k) {
      std::ostringstream s1, s2;
      s1 << "zeroth-order remainder halves with the step: ratio " << r1[k - 1] / r1[k] << " in [1.9, 2.1]";
      c.check("[taylor-first-order]", std::abs(r1[k - 1] / r1[k] - 2) <= 0.1, s1.str());
      if (linear) {
        s2 << "linear on the segment: first-order remainder " << r2[k] << " <= 1e-9 * " << r1[k];
        c.check("[taylor-linear]", r2[k] <= 1e-9 * r1[k], s2.str());
      } else {
        s2 << "first-order remainder quarters with the step: ratio " << r2[k - 1] / r2[k] << " in [3.6, 4.4]";
        c.check("[taylor-second-order]", std::abs(r2[k - 1] / r2[k] - 4) <= 0.4, s2.str());
      }
    }
  }

  // ---- jvp_params vs FD over the flat parameters
  const MatD jp = L.jvp_params(x, dth);
  c.require("[jvp-params-fd]", jp.rows() == m && jp.cols() == B, "jvp_params returns out x batch");
  if (P > 0) {
    const double h = o.fd_step;
    const VecD th0 = L.twin_params();
    L.twin_set_params(th0 + h * dth);
    const MatD fp = L.twin_forward(x);
    L.twin_set_params(th0 - h * dth);
    const MatD fm = L.twin_forward(x);
    L.twin_set_params(th0);
    c.le("[jvp-params-fd]", rel_err(jp, MatD((fp - fm) / (2 * h))), T.fd,
         "jvp_params vs central FD over the parameters of the double twin (relative)");
  } else {
    c.check("[jvp-params-fd]", jp.isZero(0), "a layer without parameters has J_theta = 0");
  }

  // ---- adjointness, input
  const MatD vt = L.vjp(x, u);
  c.require("[adjoint-input]", vt.rows() == n && vt.cols() == B, "vjp returns in x batch");
  {
    const double lhs = dot(u, jv), rhs = dot(vt, v);
    const double scale = norm(u) * norm(jv) + norm(vt) * norm(v);
    c.require("[adjoint-input]", scale > 0, "precondition: J != 0 at x");
    c.le("[adjoint-input]", std::abs(lhs - rhs) / scale, T.identity,
         "|<u, J v> - <J^T u, v>| / (|u||Jv| + |J^T u||v|)");
  }

  // ---- adjointness, parameters; vjp_params accumulates
  if (P > 0) {
    const VecD g = L.vjp_params(x, u, VecD::Zero(P));
    const double lhs = dot(u, jp), rhs = dot(g, dth);
    const double scale = norm(u) * norm(jp) + norm(g) * norm(dth);
    c.require("[adjoint-params]", scale > 0, "precondition: J_theta != 0 at x");
    c.le("[adjoint-params]", std::abs(lhs - rhs) / scale, T.identity,
         "|<u, J_theta dtheta> - <J_theta^T u, dtheta>| / scale, gradient accumulated from zeros");
    const VecD g0 = L.round(randn(P, 1, seed(5)));
    const VecD g1 = L.vjp_params(x, u, g0);
    c.le("[vjp-params-accumulates]", rel_err(VecD(g1 - g0), g), T.identity,
         "vjp_params into a non-zero g adds J_theta^T u to it");
  }

  // ---- residual protocol (free functions: layers without it keep their input)
  c.le("[residual]", rel_err(L.vjp_residual(x, u), vt), T.same,
       "vjp_residual(save_residual(x), u) = vjp(x, u)");
  c.check("[residual]", L.residual_bytes(x) <= static_cast<std::size_t>(n * B) * L.scalar_bytes,
          "a residual is never larger than the input it replaces");

  // ---- output-argument forms: the value forms exactly, whatever the buffers held
  {
    const IntoRun r = L.into(x, u, vt);
    c.check("[into]", r.forward_diff == 0, "forward_into(x, y) = forward(x), into a matrix and a block");
    c.check("[into]", r.vjp_diff == 0, "vjp_into(x, u, out) = vjp(x, u)");
    c.check("[into]", r.vjp_residual_diff == 0,
            "vjp_residual_into(save_residual_into(x), u) = vjp_residual(save_residual(x), u)");
    c.check("[into]", r.vijp_diff == 0, "vijp_into(x, h, out) = vijp(x, h)");
    c.check("[into]", r.inverse_diff == 0, "inverse_into(y, out) = inverse(y)");
    c.check("[into]", r.wrong_shape.ok() && r.wrong_shape.contains(name),
            "forward_into a buffer of the wrong shape throws ShapeError naming the layer (got \"" +
                r.wrong_shape.message + "\")");
  }

  // ---- submersive: vijp recovers the output cotangent
  if (L.has_vijp) {
    if (L.can_vijp) {
      c.le("[vijp]", rel_err(L.vijp(x, L.vjp(x, hy)), hy), T.identity, "vijp(x, vjp(x, h)) = h");
    } else {
      const Thrown t = catch_as<moonwalk::RankError>([&] { (void)L.vijp(x, L.vjp(x, hy)); });
      c.check("[vijp-refuses]", t.ok() && t.contains(name),
              "vijp of a layer that cannot vijp throws RankError naming it (got \"" + t.message + "\")");
    }
  }

  // ---- fragmental: the fragment restores exactly what Jᵀ erases
  if (L.has_fragment && L.can_fragment && !L.can_vijp) {
    const FragmentRun f = L.fragment(x, hy);
    c.le("[fragment-roundtrip]", rel_err(f.roundtrip, hy), T.identity,
         "vijp_with_fragment(x, vjp(x, h), save_fragment(save_residual(x), h)) = h");
    c.check("[fragment-bytes]", f.bytes < static_cast<std::size_t>(m * B) * L.scalar_bytes,
            "the fragment is smaller than the cotangent it helps recover");
    if (f.bytes > 0 && f.zeroable) {
      c.check("[fragment-needed]", rel_err(f.zeroed, hy) > 1e-2,
              "with the fragment zeroed the cotangent is not recovered (the fragment carries information "
              "vjp erased)");
      c.le("[fragment-cokernel]", rel_err(L.vjp(x, f.zeroed), f.hx), T.identity,
           "with the fragment zeroed, vjp of the result is still vjp(x, h): the fragment lies in null(J^T)");
    }
  }

  // ---- invertible
  if (L.has_inverse) {
    if (L.can_invert) {
      c.le("[inverse]", rel_err(L.inverse(y), x), T.identity, "inverse(forward(x)) = x");
    } else {
      const Thrown t = catch_as<moonwalk::Error>([&] { (void)L.inverse(y); });
      c.check("[inverse-refuses]", t.ok(),
              "inverse of a non-invertible layer throws (got \"" + t.message + "\")");
    }
  }

  // ---- optional: the same layer in double
  if (L.has_cast) {
    const CastRun r = L.cast(x);
    const VecD theta = L.layer_params();
    c.check("[cast]", r.name == name && r.in == n && r.out == m && r.params == P,
            "cast<double>() keeps the name, shape and num_params (got \"" + r.name + "\", " +
                fmt_shape(r.out, r.in) + ", " + std::to_string(r.params) + " parameters)");
    c.check("[cast]", r.theta.size() == theta.size() && r.theta == theta,
            "cast<double>() carries the parameters exactly");
    c.check("[cast]", r.gradients_zero, "cast<double>() starts with zero gradients");
    c.check("[cast]", r.gradient_unstored,
            "cast<double>() stores no gradient before it is asked for (stores_gradient(): a cast for the "
            "sweep's operators never accumulates)");
    c.le("[cast]", rel_err(r.forward, y), T.identity, "cast<double>().forward(x) agrees with forward(x)");
    c.check("[cast-into]", r.into_theta == r.theta && r.into_gradients_zero && r.into_forward == r.forward,
            "cast_into(l, a used cast of other weights) carries the parameters exactly, zero gradients, "
            "and forward equals the fresh cast's exactly");
    c.check("[cast-into]", r.into_vijp_diff == 0 && r.into_amplification_diff == 0,
            "after cast_into, vijp and amplification equal the fresh cast's exactly (nothing derived "
            "from the old weights survives)");
    c.check("[cast-into]", r.released_vijp_diff == 0 && r.released_amplification_diff == 0,
            "after release_derived, vijp and amplification are rebuilt the same");
    if (r.has_roundtrip)
      c.check("[cast-roundtrip]", r.theta_back.size() == theta.size() && r.theta_back == theta,
              "cast<double>().cast<S>() gives the parameters back exactly");
  }

  // ---- optional: amplification bounds what it claims to
  if (L.has_amplification) {
    const moonwalk::Amplification a = L.amplification(x);
    if (a.known) {
      const double slack = std::max(1e-6, T.identity);
      std::ostringstream s;
      s << "0 < typical " << a.typical << " <= bound " << a.bound << ", 1 <= bound (relative slack " << slack
        << ")";
      c.check("[amplification]",
              a.typical > 0 && a.bound >= 1 - slack &&
                  (a.typical <= a.bound * (1 + slack) || std::isinf(a.bound)),
              s.str());
      if (L.eps < 1e-10 && L.can_sweep && std::isfinite(a.bound)) {
        double worst = 0;
        for (std::uint64_t t = 0; t < 8; ++t) {
          const MatD u0 = randn(m, B, seed(20 + t));
          const MatD hx = L.vjp(x, u0);
          const MatD h0 = L.sweep(x, hx, u0);
          const MatD d =
              1e-3 * (hx.norm() / std::sqrt(static_cast<double>(hx.size()))) * randn(n, B, seed(40 + t));
          const MatD h1 = L.sweep(x, hx + d, u0);
          c.require("[amplification-bounds]", h0.rows() == m && h1.rows() == m && h0.cols() == B,
                    "precondition: the sweep returns out x batch");
          for (Index j = 0; j < B; ++j) {
            const double out_rel = (h1.col(j) - h0.col(j)).norm() / h0.col(j).norm();
            const double in_rel = d.col(j).norm() / hx.col(j).norm();
            worst = std::max(worst, out_rel / in_rel);
          }
        }
        c.le("[amplification-bounds]", worst, 1.01 * a.bound,
             "largest measured growth of a random cotangent error across the sweep, per sample, vs 1.01 * "
             "bound");
      }
    }
  }

  // ---- shape errors: name, bad shape and expected row count in the message
  auto expect = [&](const std::string& call, BadCall which, Index bad_rows, Index expected_rows) {
    const Thrown t = L.bad_call(which, x, v, u);
    const std::string bad = fmt_shape(bad_rows, B), want = std::to_string(expected_rows) + "x";
    c.check("[shape]", t.ok() && t.contains(name) && t.contains(bad) && t.contains(want),
            call + " throws ShapeError naming \"" + name + "\", " + bad + " and " + want + "...; got " +
                (t.kind == Thrown::nothing ? std::string("no exception")
                                           : (t.ok() ? "ShapeError" : "another exception")) +
                " \"" + t.message + "\"");
  };
  expect("forward(x with in+2 rows)", BadCall::forward_x, n + 2, n);
  expect("jvp(x with in+2 rows, dx)", BadCall::jvp_x, n + 2, n);
  expect("jvp(x, dx with in+2 rows)", BadCall::jvp_dx, n + 2, n);
  expect("vjp(x with in+2 rows, h)", BadCall::vjp_x, n + 2, n);
  expect("vjp(x, h with out+2 rows)", BadCall::vjp_h, m + 2, m);
}

}  // namespace detail

/// Runs every check on `layer` (scalar S) against `twin`, the same layer
/// built for double (its parameters are overwritten with the layer's). The
/// report holds every failure; `sink`, when given, hears each check.
template <class L, class LD>
LayerCheckReport test_layer_pair(L layer, LD twin, const LayerCheckOptions& o = {}, CheckSink sink = {}) {
  static_assert(moonwalk::check_layer<L>());
  static_assert(moonwalk::check_layer<LD>());
  static_assert(std::is_same_v<typename LD::scalar_type, double>,
                "the twin is the double version of the layer");
  detail::Checker c(std::move(sink));
  c.report.subject = moonwalk::detail::cat("layer ", layer.name(), " in ",
                                           scalar_name<typename L::scalar_type>(), ", seed ", o.seed);
  try {
    detail::run_layer_checks(detail::make_view(layer, twin), o, c);
  } catch (const detail::Aborted&) {
  }
  return c.report;
}

/// `make(std::type_identity<T>{})` builds the layer for scalar T; the checker
/// builds it for S and for double with the same arguments (and seeds).
template <class S, class Make>
LayerCheckReport test_layer(Make&& make, const LayerCheckOptions& o = {}, CheckSink sink = {}) {
  return test_layer_pair(make(std::type_identity<S>{}), make(std::type_identity<double>{}), o,
                         std::move(sink));
}

/// The layer with θ ← θ + scale·N(0, 1) (seeded, drawn in double): a general,
/// still well-conditioned W next to an orthogonal init, and non-zero biases.
template <class L>
L perturbed(L layer, std::uint64_t seed, double scale = 0.3) {
  const Index p = layer.num_params();
  detail::set_params(layer, Vec<double>(detail::params_of(layer) + scale * randn(p, 1, seed)));
  return layer;
}

}  // namespace moonwalk::testing
