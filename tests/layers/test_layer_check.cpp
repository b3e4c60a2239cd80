// The layer checker itself: a correct layer passes, and each deliberately
// broken variant ("mutant") is caught by the check meant for it. Without
// this, a checker whose comparisons were vacuous would pass every layer.
// (The mutants wrap a small hand-written layer and ReLU rather than Linear:
// Linear's QR machinery is costly to compile, and a user-style layer without
// the residual protocol is worth checking too.)
#include <moonwalk/layers/activations.hpp>
#include <moonwalk/layers/linear_in_x.hpp>

#include "support/layer_check.hpp"

namespace {

using moonwalk::CRef;
using moonwalk::CVecRef;
using moonwalk::Index;
using moonwalk::Matrix;
using moonwalk::VecRef;

enum class Bug {
  none,
  jvp_scaled,             // J dx off by 0.1 %
  jvp_params_scaled,      // J_θ dθ off by 0.1 %
  vjp_scaled,             // Jᵀ h off by 0.1 %
  vjp_params_overwrites,  // g = J_θᵀ h instead of g += J_θᵀ h
  residual_wrong,         // vjp_residual disagrees with vjp
  vijp_wrong,             // vijp off by 0.1 %
  vijp_no_refusal,        // vijp of a non-submersive layer returns zeros instead of throwing
  fragment_dropped,       // save_fragment loses the fragment
  fragment_whole,         // the "fragment" is the whole cotangent
  inverse_wrong,          // inverse off by 0.1 %
  shape_unnamed,          // forward's ShapeError does not name the layer
  shape_input_unchecked,  // jvp and vjp silently accept an input with extra rows
};

/// y = a ⊙ x + c (one scale and one shift per feature), θ = [a, c]: a
/// user-style layer without the residual protocol; submersive and
/// invertible while every a_i ≠ 0.
template <class S>
struct Diag {
  using scalar_type = S;
  moonwalk::Vector<S> theta, grad;
  explicit Diag(Index n) : theta(2 * n), grad(moonwalk::Vector<S>::Zero(2 * n)) {
    theta << moonwalk::Vector<S>::LinSpaced(n, S(0.5), S(1.5)),
        moonwalk::Vector<S>::LinSpaced(n, S(-0.3), S(0.4));
  }
  [[nodiscard]] Index n() const { return theta.size() / 2; }
  [[nodiscard]] auto a() const { return theta.head(n()); }
  [[nodiscard]] auto c() const { return theta.tail(n()); }
  [[nodiscard]] Index in_features() const { return n(); }
  [[nodiscard]] Index out_features() const { return n(); }
  [[nodiscard]] std::string name() const { return "diag(" + std::to_string(n()) + ")"; }
  [[nodiscard]] Index num_params() const { return theta.size(); }
  std::span<S> parameters() { return {theta.data(), static_cast<std::size_t>(theta.size())}; }
  [[nodiscard]] std::span<const S> parameters() const {
    return {theta.data(), static_cast<std::size_t>(theta.size())};
  }
  std::span<S> gradients() { return {grad.data(), static_cast<std::size_t>(grad.size())}; }
  [[nodiscard]] std::span<const S> gradients() const {
    return {grad.data(), static_cast<std::size_t>(grad.size())};
  }

  void check(const CRef<S>& m, const char* what) const { moonwalk::detail::check_rows(*this, what, m, n()); }
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    check(x, "input");
    return (a().asDiagonal() * x).colwise() + c();
  }
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    check(x, "input");
    check(dx, "tangent");
    return a().asDiagonal() * dx;
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dt) const {
    check(x, "input");
    return (dt.head(n()).asDiagonal() * x).colwise() + dt.tail(n());
  }
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    check(x, "input");
    check(h, "cotangent");
    return a().asDiagonal() * h;
  }
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    g.head(n()) += x.cwiseProduct(h).rowwise().sum();
    g.tail(n()) += h.rowwise().sum();
  }
  [[nodiscard]] Matrix<S> vijp(const CRef<S>&, const CRef<S>& hx) const {
    return a().cwiseInverse().asDiagonal() * hx;
  }
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    return a().cwiseInverse().asDiagonal() * (y.colwise() - c());
  }
};

/// Any layer with one injected bug; everything else forwards to `inner`.
template <class Inner>
struct Mutant {
  using scalar_type = typename Inner::scalar_type;
  using S = scalar_type;
  using residual_type = moonwalk::residual_t<Inner>;
  using fragment_type = moonwalk::Fragment<S>;

  Inner inner;
  Bug bug = Bug::none;

  [[nodiscard]] S factor(Bug b) const { return bug == b ? S(1.001) : S(1); }
  [[nodiscard]] Matrix<S> input(const CRef<S>& x) const {
    if (bug == Bug::shape_input_unchecked && x.rows() > inner.in_features())
      return x.topRows(inner.in_features());
    return x;
  }

  [[nodiscard]] Index in_features() const { return inner.in_features(); }
  [[nodiscard]] Index out_features() const { return inner.out_features(); }
  [[nodiscard]] std::string name() const { return inner.name(); }
  [[nodiscard]] Index num_params() const { return inner.num_params(); }
  std::span<S> parameters() { return inner.parameters(); }
  [[nodiscard]] std::span<const S> parameters() const { return inner.parameters(); }
  std::span<S> gradients() { return inner.gradients(); }
  [[nodiscard]] std::span<const S> gradients() const { return inner.gradients(); }

  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    if (bug != Bug::shape_unnamed) return inner.forward(x);
    try {
      return inner.forward(x);
    } catch (const moonwalk::ShapeError&) {
      throw moonwalk::ShapeError("wrong shape");
    }
  }
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    return factor(Bug::jvp_scaled) * inner.jvp(input(x), dx);
  }
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>& dt) const {
    return factor(Bug::jvp_params_scaled) * inner.jvp_params(x, dt);
  }
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    return factor(Bug::vjp_scaled) * inner.vjp(input(x), h);
  }
  void vjp_params(const CRef<S>& x, const CRef<S>& h, VecRef<S> g) const {
    if (bug == Bug::vjp_params_overwrites) g.setZero();
    inner.vjp_params(x, h, g);
  }
  [[nodiscard]] residual_type save_residual(const CRef<S>& x) const {
    return moonwalk::save_residual(inner, x);
  }
  [[nodiscard]] Matrix<S> vjp_residual(const residual_type& r, const CRef<S>& h) const {
    return (bug == Bug::residual_wrong ? S(0.5) : S(1)) * moonwalk::vjp_residual(inner, r, h);
  }

  [[nodiscard]] bool is_submersive() const { return moonwalk::can_vijp(inner); }
  [[nodiscard]] bool is_fragmental() const { return moonwalk::can_fragment(inner); }
  [[nodiscard]] bool is_invertible() const { return moonwalk::can_invert(inner); }

  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    if (bug == Bug::vijp_no_refusal && !is_submersive()) return Matrix<S>::Zero(out_features(), hx.cols());
    if constexpr (moonwalk::Submersive<Inner>)
      return factor(Bug::vijp_wrong) * inner.vijp(x, hx);
    else
      throw moonwalk::RankError(name() + ": no vijp");
  }
  [[nodiscard]] fragment_type save_fragment(const residual_type& r, const CRef<S>& hy) const {
    if (bug == Bug::fragment_whole) return {Matrix<S>(hy)};
    if constexpr (moonwalk::Fragmental<Inner>) {
      fragment_type f = inner.save_fragment(r, hy);
      if (bug == Bug::fragment_dropped) f.value.setZero();
      return f;
    } else {
      throw moonwalk::RankError(name() + ": no fragment");
    }
  }
  [[nodiscard]] Matrix<S> vijp_with_fragment(const CRef<S>& x, const CRef<S>& hx,
                                             const fragment_type& f) const {
    if (bug == Bug::fragment_whole) return f.value;
    if constexpr (moonwalk::Fragmental<Inner>)
      return inner.vijp_with_fragment(x, hx, f);
    else
      throw moonwalk::RankError(name() + ": no fragment");
  }
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    if constexpr (moonwalk::Invertible<Inner>)
      return factor(Bug::inverse_wrong) * inner.inverse(y);
    else
      throw moonwalk::RankError(name() + ": no inverse");
  }
};

static_assert(moonwalk::check_layer<Mutant<Diag<double>>>());
static_assert(moonwalk::check_layer<Mutant<moonwalk::ReLU<double>>>());

template <class Inner>
mwtest::LayerCheckReport check_mutant(const Inner& inner, Bug bug) {
  const Mutant<Inner> m{inner, bug};
  return mwtest::test_layer_pair(m, m, {}, /*to_catch=*/false);
}

using Dg = Diag<double>;
using Relu = moonwalk::ReLU<double>;

/// y_i = 2 x_{n−1−i} (A = 2 × the reversal, A⁻¹ = Aᵀ / 4): a user layer
/// written on LinearInX, which supplies only A's four maps.
template <class S>
struct Reversal : moonwalk::NoParameters<S>, moonwalk::LinearInX<Reversal<S>, S> {
  using scalar_type = S;
  Index n;
  [[nodiscard]] Index in_features() const { return n; }
  [[nodiscard]] Index out_features() const { return n; }
  [[nodiscard]] std::string name() const { return "reversal(" + std::to_string(n) + ")"; }
  void apply_into(const CRef<S>& a, moonwalk::MatRef<S> out) const { out = S(2) * a.colwise().reverse(); }
  void apply_transpose_into(const CRef<S>& h, moonwalk::MatRef<S> out) const {
    out = S(2) * h.colwise().reverse();
  }
  void solve_transpose_into(const CRef<S>& h, moonwalk::MatRef<S> out) const {
    out = S(0.5) * h.colwise().reverse();
  }
  void solve_into(const CRef<S>& y, moonwalk::MatRef<S> out) const { out = S(0.5) * y.colwise().reverse(); }
};
/// The same without the solves: neither submersive nor invertible.
template <class S>
struct ReversalNoSolve : moonwalk::NoParameters<S>, moonwalk::LinearInX<ReversalNoSolve<S>, S> {
  using scalar_type = S;
  Index n;
  [[nodiscard]] Index in_features() const { return n; }
  [[nodiscard]] Index out_features() const { return n; }
  [[nodiscard]] std::string name() const { return "reversal(" + std::to_string(n) + ")"; }
  void apply_into(const CRef<S>& a, moonwalk::MatRef<S> out) const { out = a.colwise().reverse(); }
  void apply_transpose_into(const CRef<S>& h, moonwalk::MatRef<S> out) const { out = h.colwise().reverse(); }
};
static_assert(moonwalk::check_layer<Reversal<double>>());
static_assert(moonwalk::Submersive<Reversal<float>> && moonwalk::Invertible<Reversal<float>> &&
              moonwalk::HasVijpInto<Reversal<float>> && moonwalk::HasInverseInto<Reversal<float>> &&
              moonwalk::HasForwardInto<Reversal<float>> && moonwalk::HasVjpResidualInto<Reversal<float>>);
static_assert(moonwalk::Layer<ReversalNoSolve<float>> && !moonwalk::Submersive<ReversalNoSolve<float>> &&
              !moonwalk::Invertible<ReversalNoSolve<float>> &&
              !moonwalk::HasVijpInto<ReversalNoSolve<float>>);

}  // namespace

TEST_CASE("layer checker: correct layers pass, and it really checks", "[layers][layer_check][meta]") {
  for (const auto& r : {check_mutant(Dg(5), Bug::none), check_mutant(Relu(5), Bug::none)}) {
    INFO(r.str());
    CHECK(r.failures.empty());
    CHECK(r.checks >= 25);
  }
}

TEST_CASE("layer checker: every injected bug is caught by its check", "[layers][layer_check][meta]") {
  struct Case {
    const char* what;
    mwtest::LayerCheckReport report;
    std::vector<const char*> tags;  // each must be among the failures
  };
  const Dg diag(5);
  const Relu relu(5);
  const std::vector<Case> cases{
      {"jvp scaled",
       check_mutant(diag, Bug::jvp_scaled),
       {"[jvp-fd]", "[adjoint-input]", "[taylor-second-order]"}},
      {"jvp_params scaled",
       check_mutant(diag, Bug::jvp_params_scaled),
       {"[jvp-params-fd]", "[adjoint-params]"}},
      {"vjp scaled", check_mutant(diag, Bug::vjp_scaled), {"[adjoint-input]", "[residual]", "[vijp]"}},
      {"vjp_params overwrites", check_mutant(diag, Bug::vjp_params_overwrites), {"[vjp-params-accumulates]"}},
      {"residual wrong", check_mutant(diag, Bug::residual_wrong), {"[residual]"}},
      {"vijp wrong", check_mutant(diag, Bug::vijp_wrong), {"[vijp]"}},
      {"vijp of a non-submersive layer returns garbage",
       check_mutant(relu, Bug::vijp_no_refusal),
       {"[vijp-refuses]"}},
      {"fragment dropped", check_mutant(relu, Bug::fragment_dropped), {"[fragment-roundtrip]"}},
      {"fragment is the whole cotangent",
       check_mutant(relu, Bug::fragment_whole),
       {"[fragment-bytes]", "[fragment-cokernel]"}},
      {"inverse wrong", check_mutant(diag, Bug::inverse_wrong), {"[inverse]"}},
      {"shape error without the layer's name", check_mutant(diag, Bug::shape_unnamed), {"[shape]"}},
      {"input rows unchecked (diag)", check_mutant(diag, Bug::shape_input_unchecked), {"[shape]"}},
      {"input rows unchecked (relu)", check_mutant(relu, Bug::shape_input_unchecked), {"[shape]"}},
  };
  for (const auto& c : cases) {
    INFO(c.what << ": " << c.report.str());
    for (const char* tag : c.tags) {
      INFO("expected a failure tagged " << tag);
      CHECK(c.report.failed(tag));
    }
  }
}

TEST_CASE("layer checker: a user layer on LinearInX (A's four maps) passes every check",
          "[layers][layer_check][linear_in_x]") {
  const Reversal<float> f{{}, {}, 6};
  const Reversal<double> d{{}, {}, 6};
  const auto r = mwtest::test_layer_pair(f, d, {}, /*to_catch=*/false);
  INFO(r.str());
  CHECK(r.failures.empty());
  CHECK(r.checks >= 25);
  // The shape checks are LinearInX's, under the layer's name.
  CHECK_THROWS_WITH(d.forward(Matrix<double>::Zero(5, 2)), Catch::Contains("reversal(6)"));
  CHECK_THROWS_WITH(d.vijp(Matrix<double>::Zero(6, 2), Matrix<double>::Zero(6, 3)),
                    Catch::Contains("reversal(6)"));
}
