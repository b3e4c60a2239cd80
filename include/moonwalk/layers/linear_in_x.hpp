// Moonwalk — the glue of a layer affine in its input, written once.
//
// For y = A x + b the Jacobian is A whatever x is, so every operation of the
// layer contract (core/concepts.hpp) is one of four maps of A and the offset b:
//
//   forward(x)                      A x + b
//   jvp(x, dx)                      A dx
//   vjp(x, h) = vjp_residual(∅, h)  Aᵀ h        (the reverse pass keeps nothing)
//   vijp(x, h_x)                    h_y with Aᵀ h_y = h_x   (A full row rank)
//   inverse(y)                      x with A x = y − b      (A full column rank)
//
// LinearInX<Layer, S> writes those members, value-returning and output-argument
// forms, with their shape checks, from what the layer supplies:
//
//   in_features(), out_features(), name()
//   apply_into(a, out)              out = A a     (in_features rows → out_features)
//   apply_transpose_into(h, out)    out = Aᵀ h    (out_features rows → in_features)
// and optionally
//   solve_transpose_into(h_x, out)  out = h_y with Aᵀ h_y = h_x   (then Submersive)
//   solve_into(y, out)              out = x with A x = y          (then Invertible)
//   add_offset(y, s)                y += s · b on every column (s = ±1; b = 0
//                                   without it)
//
// `out` has the result's shape and aliases no argument, except that a layer
// with an offset has its solve_into called in place (out and y the same
// matrix, holding y − b); what the layer writes there is all of the result.
// A layer without parameters (derived from NoParameters) also gets
// jvp_params (zero) and vjp_params (nothing); one with parameters declares
// its own. Everything else — amplification, cast, fragments for a map that is
// not submersive, runtime is_submersive()/is_invertible() queries — stays the
// layer's own.
#pragma once

#include <concepts>

#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk {

// Each hook is matched by its exact signature (as the contract's *_into
// hooks, core/concepts.hpp): one that merely accepts the arguments, `out` by
// value say, would write into a copy; a member with a hook's name and another
// signature is a compile error naming the hook.

/// out = A a: `void apply_into(const CRef<S>& a, MatRef<S> out) const`.
template <class L, class S>
concept HasApply = requires {
  static_cast<void (L::*)(const CRef<S>&, MatRef<S>) const>(&L::apply_into);
};

/// out = Aᵀ h: `void apply_transpose_into(const CRef<S>& h, MatRef<S> out) const`.
template <class L, class S>
concept HasApplyTranspose = requires {
  static_cast<void (L::*)(const CRef<S>&, MatRef<S>) const>(&L::apply_transpose_into);
};

/// The layer solves Aᵀ h_y = h_x (LinearInX then offers vijp):
/// `void solve_transpose_into(const CRef<S>& h_x, MatRef<S> out) const`.
template <class L, class S>
concept HasSolveTranspose = requires {
  static_cast<void (L::*)(const CRef<S>&, MatRef<S>) const>(&L::solve_transpose_into);
};

/// The layer solves A x = y (LinearInX then offers inverse):
/// `void solve_into(const CRef<S>& y, MatRef<S> out) const`.
template <class L, class S>
concept HasSolve = requires {
  static_cast<void (L::*)(const CRef<S>&, MatRef<S>) const>(&L::solve_into);
};

/// The layer's map is affine, y = A x + b: `void add_offset(MatRef<S> y, S s) const`
/// adds s · b to every column.
template <class L, class S>
concept HasOffset = requires {
  static_cast<void (L::*)(MatRef<S>, S) const>(&L::add_offset);
};

namespace detail {
/// Compile errors for a LinearInX hook with the right name and another
/// signature (the header comment's list).
template <class L, class S>
consteval bool check_linear_hooks() {
  static_assert(
      HasApply<L, S>,
      "Moonwalk LinearInX: the layer needs `void apply_into(const CRef<S>& a, MatRef<S> out) const`");
  static_assert(HasApplyTranspose<L, S>,
                "Moonwalk LinearInX: the layer needs `void apply_transpose_into("
                "const CRef<S>& h, MatRef<S> out) const`");
  static_assert(
      HasSolveTranspose<L, S> || !requires { &L::solve_transpose_into; },
      "Moonwalk LinearInX: solve_transpose_into must be `void solve_transpose_into(const CRef<S>& h_x, "
      "MatRef<S> out) const`");
  static_assert(
      HasSolve<L, S> || !requires { &L::solve_into; },
      "Moonwalk LinearInX: solve_into must be `void solve_into(const CRef<S>& y, MatRef<S> out) const`");
  static_assert(
      HasOffset<L, S> || !requires { &L::add_offset; },
      "Moonwalk LinearInX: add_offset must be `void add_offset(MatRef<S> y, S s) const`");
  return true;
}
}  // namespace detail

/// y(:, j) += s · b for every column j: the add_offset of a layer whose
/// offset is one vector (column by column, so s · b is never a temporary).
template <class S>
void add_to_columns(MatRef<S> y, const CVecRef<S>& b, S s) {
  for (Index j = 0; j < y.cols(); ++j) y.col(j) += s * b;
}

/// The operations of a layer linear in x, from A's maps (header comment).
template <class Layer, class S>
class LinearInX {
 public:
  using residual_type = Empty;

  /// y = A x + b
  [[nodiscard]] Matrix<S> forward(const CRef<S>& x) const {
    Matrix<S> y(self().out_features(), x.cols());
    forward_into(x, y);
    return y;
  }
  void forward_into(const CRef<S>& x, MatRef<S> out) const {
    static_assert(detail::check_linear_hooks<Layer, S>());
    detail::check_rows(self(), "input", x, self().in_features());
    detail::check_rows(self(), "output buffer", out, self().out_features(), x.cols());
    self().apply_into(x, out);
    if constexpr (HasOffset<Layer, S>) self().add_offset(out, S(1));
  }
  /// J dx = A dx
  [[nodiscard]] Matrix<S> jvp(const CRef<S>& x, const CRef<S>& dx) const {
    detail::check_rows(self(), "input", x, self().in_features());
    detail::check_rows(self(), "tangent", dx, self().in_features(), x.cols());
    Matrix<S> y(self().out_features(), dx.cols());
    self().apply_into(dx, y);
    return y;
  }
  /// Jᵀ h = Aᵀ h
  [[nodiscard]] Matrix<S> vjp(const CRef<S>& x, const CRef<S>& h) const {
    Matrix<S> g(self().in_features(), h.cols());
    vjp_into(x, h, g);
    return g;
  }
  void vjp_into(const CRef<S>& x, const CRef<S>& h, MatRef<S> out) const {
    detail::check_rows(self(), "input", x, self().in_features());
    detail::check_batch(self(), "input", x.cols(), "cotangent", h.cols());
    vjp_residual_into(Empty{}, h, out);
  }
  /// Nothing to keep: J does not depend on x.
  [[nodiscard]] Empty save_residual(const CRef<S>& x) const {
    detail::check_rows(self(), "input", x, self().in_features());
    return {};
  }
  [[nodiscard]] Matrix<S> vjp_residual(const Empty& r, const CRef<S>& h) const {
    Matrix<S> g(self().in_features(), h.cols());
    vjp_residual_into(r, h, g);
    return g;
  }
  void vjp_residual_into(const Empty&, const CRef<S>& h, MatRef<S> out) const {
    static_assert(detail::check_linear_hooks<Layer, S>());
    detail::check_rows(self(), "cotangent", h, self().out_features());
    detail::check_rows(self(), "vjp output buffer", out, self().in_features(), h.cols());
    self().apply_transpose_into(h, out);
  }
  /// h_y with Aᵀ h_y = h_x (a template so that the constraint is checked
  /// where it is used, on the complete layer)
  template <class L = Layer>
  requires HasSolveTranspose<L, S>
  [[nodiscard]] Matrix<S> vijp(const CRef<S>& x, const CRef<S>& hx) const {
    Matrix<S> hy(self().out_features(), hx.cols());
    vijp_into(x, hx, hy);
    return hy;
  }
  template <class L = Layer>
  requires HasSolveTranspose<L, S>
  void vijp_into(const CRef<S>& x, const CRef<S>& hx, MatRef<S> out) const {
    detail::check_rows(self(), "input", x, self().in_features());
    detail::check_rows(self(), "input cotangent", hx, self().in_features(), x.cols());
    detail::check_rows(self(), "vijp output buffer", out, self().out_features(), hx.cols());
    self().solve_transpose_into(hx, out);
  }
  /// x with A x = y − b
  template <class L = Layer>
  requires HasSolve<L, S>
  [[nodiscard]] Matrix<S> inverse(const CRef<S>& y) const {
    Matrix<S> x(self().in_features(), y.cols());
    inverse_into(y, x);
    return x;
  }
  template <class L = Layer>
  requires HasSolve<L, S>
  void inverse_into(const CRef<S>& y, MatRef<S> out) const {
    detail::check_rows(self(), "output", y, self().out_features());
    detail::check_rows(self(), "inverse output buffer", out, self().in_features(), y.cols());
    if constexpr (HasOffset<Layer, S>) {
      // y − b, then the layer's solve in place (an affine map it inverts is square)
      if (self().in_features() != self().out_features())
        throw RankError(detail::cat(self().name(), ": inverse needs a square map, got ", self().in_features(),
                                    " inputs and ", self().out_features(), " outputs"));
      out = y;
      self().add_offset(out, S(-1));
      self().solve_into(out, out);
    } else {
      self().solve_into(y, out);
    }
  }
  /// J_θ dθ = 0: a layer without parameters (one with parameters declares
  /// its own, which hides this one).
  [[nodiscard]] Matrix<S> jvp_params(const CRef<S>& x, const CVecRef<S>&) const {
    static_assert(std::derived_from<Layer, NoParameters<S>>,
                  "Moonwalk: a LinearInX layer with parameters declares its own jvp_params and vjp_params");
    return Matrix<S>::Zero(self().out_features(), x.cols());
  }
  void vjp_params(const CRef<S>&, const CRef<S>&, VecRef<S>) const {
    static_assert(std::derived_from<Layer, NoParameters<S>>,
                  "Moonwalk: a LinearInX layer with parameters declares its own jvp_params and vjp_params");
  }

 private:
  [[nodiscard]] const Layer& self() const { return static_cast<const Layer&>(*this); }
};

}  // namespace moonwalk
