// Moonwalk — the layer contract, written once.
//
// A layer maps a batch x (in_features × batch, one column per sample) to
// y = f(x; θ) (out_features × batch). With J = ∂f/∂x and J_θ = ∂f/∂θ:
//
//   forward(x)              -> y
//   jvp(x, dx)              -> J dx                      (input tangent)
//   jvp_params(x, dθ)       -> J_θ dθ                    (dθ flat, num_params())
//   vjp(x, h)               -> Jᵀ h                      (input cotangent)
//   vjp_params(x, h, g)     :  g += J_θᵀ h               (g flat, num_params())
//   num_params(), parameters(), gradients(): contiguous storage of θ and of
//   its gradient — or parameter_blocks(), gradient_blocks() for composites
//
// Refinements:
//   Submersive  vijp(x, h_x) -> h_y with Jᵀ h_y = h_x (J full row rank)
//   Invertible  inverse(y)   -> x
//   Fragmental  save_fragment(r, h_y) -> φ  (the part of h_y that Jᵀ erases)
//               vijp_with_fragment(x, h_x, φ) -> h_y, exact given φ
//
// Optional residual protocol (what the input-vjp needs, JAX-style):
//   residual_type, save_residual(x) -> r, vjp_residual(r, h) -> Jᵀ h.
// A layer without it saves its whole input (an "activation").
//
// Optional output-argument forms (core/ops.hpp calls them, checking the shape
// of `out` first, and falls back to the value-returning members for a layer
// without them): each writes its result into `out` (a MatRef<S> that already
// has the result's shape, and aliases no argument), so a schedule can run a
// whole step in buffers it sized once:
//   forward_into(x, out)                 out = f(x)
//   vjp_into(x, h, out)                  out = Jᵀ h
//   vjp_residual_into(r, h, out)         out = Jᵀ h
//   vijp_into(x, h_x, out)               out = h_y
//   inverse_into(y, out)                 out = f⁻¹(y)
//   save_residual_into(x, r)             r = save_residual(x), in r's storage
//
// Optional weight hook (a Lipschitz limit, Residual's `lipschitz`):
//   scale_weight(s) -> bool              J ← s J (weights scaled, bias kept);
//                                        false: the layer has no linear map to scale
#pragma once

#include <concepts>
#include <span>
#include <string>
#include <vector>

#include "moonwalk/core/residuals.hpp"
#include "moonwalk/core/types.hpp"

namespace moonwalk {

namespace detail {
template <class L>
using scalar_of = typename L::scalar_type;
}  // namespace detail

// ---- the operations, one named concept each (so errors name what is missing)

template <class L>
concept HasScalarType = requires {
  typename L::scalar_type;
}
&&(std::same_as<typename L::scalar_type, float> || std::same_as<typename L::scalar_type, double>);

template <class L>
concept HasShape = requires(const L& l) {
  { l.in_features() } -> std::convertible_to<Index>;
  { l.out_features() } -> std::convertible_to<Index>;
  { l.name() } -> std::convertible_to<std::string>;
};

template <class L>
concept HasForward = HasScalarType<L> && requires(const L& l, const Matrix<detail::scalar_of<L>>& x) {
  { l.forward(x) } -> std::convertible_to<Matrix<detail::scalar_of<L>>>;
};

template <class L>
concept HasJvp = HasScalarType<L> &&
    requires(const L& l, const Matrix<detail::scalar_of<L>>& x, const Vector<detail::scalar_of<L>>& dtheta) {
  { l.jvp(x, x) } -> std::convertible_to<Matrix<detail::scalar_of<L>>>;
  { l.jvp_params(x, dtheta) } -> std::convertible_to<Matrix<detail::scalar_of<L>>>;
};

template <class L>
concept HasVjp = HasScalarType<L> &&
    requires(const L& l, const Matrix<detail::scalar_of<L>>& x, Vector<detail::scalar_of<L>>& g) {
  { l.vjp(x, x) } -> std::convertible_to<Matrix<detail::scalar_of<L>>>;
  l.vjp_params(x, x, VecRef<detail::scalar_of<L>>(g));
};

/// Parameters in one contiguous block: parameters(), gradients().
template <class L>
concept HasFlatParameters = HasScalarType<L> && requires(L& l, const L& cl) {
  { l.parameters() } -> std::convertible_to<std::span<detail::scalar_of<L>>>;
  { cl.parameters() } -> std::convertible_to<std::span<const detail::scalar_of<L>>>;
  { l.gradients() } -> std::convertible_to<std::span<detail::scalar_of<L>>>;
  { cl.gradients() } -> std::convertible_to<std::span<const detail::scalar_of<L>>>;
};

/// Parameters in several blocks (composite layers: coupling blocks, chains):
/// parameter_blocks(), gradient_blocks(), in the order of the flat θ.
template <class L>
concept HasParameterBlocks = HasScalarType<L> && requires(L& l, const L& cl) {
  { l.parameter_blocks() } -> std::convertible_to<std::vector<std::span<detail::scalar_of<L>>>>;
  { cl.parameter_blocks() } -> std::convertible_to<std::vector<std::span<const detail::scalar_of<L>>>>;
  { l.gradient_blocks() } -> std::convertible_to<std::vector<std::span<detail::scalar_of<L>>>>;
  { cl.gradient_blocks() } -> std::convertible_to<std::vector<std::span<const detail::scalar_of<L>>>>;
};

/// Parameter and gradient storage, flat or in blocks, with num_params() entries.
template <class L>
concept HasParameters = HasScalarType<L> && requires(const L& cl) {
  { cl.num_params() } -> std::convertible_to<Index>;
} &&(HasFlatParameters<L> || HasParameterBlocks<L>);

/// The base contract every layer satisfies.
template <class L>
concept Layer =
    HasScalarType<L> && HasShape<L> && HasForward<L> && HasJvp<L> && HasVjp<L> && HasParameters<L>;

/// Optional residual protocol (see header comment).
template <class L>
concept HasResidual = Layer<L> && requires(const L& l, const Matrix<detail::scalar_of<L>>& x) {
  typename L::residual_type;
  { l.save_residual(x) } -> std::convertible_to<typename L::residual_type>;
  {
    l.vjp_residual(std::declval<const typename L::residual_type&>(), x)
    } -> std::convertible_to<Matrix<detail::scalar_of<L>>>;
};

namespace detail {
template <class L>
struct residual_of {
  using type = Matrix<scalar_of<L>>;
};
template <HasResidual L>
struct residual_of<L> {
  using type = typename L::residual_type;
};
}  // namespace detail

/// What a layer's reverse pass keeps: its residual_type, or its input.
template <class L>
using residual_t = typename detail::residual_of<L>::type;

/// Full-row-rank Jacobian: the output cotangent is recovered by vijp.
template <class L>
concept Submersive = Layer<L> && requires(const L& l, const Matrix<detail::scalar_of<L>>& x) {
  { l.vijp(x, x) } -> std::convertible_to<Matrix<detail::scalar_of<L>>>;
};

/// Bijective layer.
template <class L>
concept Invertible = Layer<L> && requires(const L& l, const Matrix<detail::scalar_of<L>>& y) {
  { l.inverse(y) } -> std::convertible_to<Matrix<detail::scalar_of<L>>>;
};

/// Non-submersive layer that saves the cokernel part of its output cotangent.
template <class L>
concept Fragmental = Layer<L> &&
    requires(const L& l, const Matrix<detail::scalar_of<L>>& x, const residual_t<L>& r) {
  typename L::fragment_type;
  { l.save_fragment(r, x) } -> std::convertible_to<typename L::fragment_type>;
  {
    l.vijp_with_fragment(x, x, std::declval<const typename L::fragment_type&>())
    } -> std::convertible_to<Matrix<detail::scalar_of<L>>>;
};

// ---- optional hooks, one named concept each. core/ops.hpp calls a hook
//      where the layer has it and falls back otherwise; check_hooks<L>() makes
//      a member with a hook's name and another signature a compile error that
//      names the hook, never a silent fallback.

/// out = f(x) into a caller's buffer: `void forward_into(const CRef<S>& x, MatRef<S> out) const`.
/// (Each *_into hook is matched by its exact signature: one that merely accepts
/// the arguments, e.g. `out` by value, would write into a copy.)
template <class L>
concept HasForwardInto = Layer<L> && requires {
  static_cast<void (L::*)(const CRef<detail::scalar_of<L>>&, MatRef<detail::scalar_of<L>>) const>(
      &L::forward_into);
};
/// out = Jᵀ h: `void vjp_into(const CRef<S>& x, const CRef<S>& h, MatRef<S> out) const`.
template <class L>
concept HasVjpInto = Layer<L> && requires {
  static_cast<void (L::*)(const CRef<detail::scalar_of<L>>&, const CRef<detail::scalar_of<L>>&,
                          MatRef<detail::scalar_of<L>>) const>(&L::vjp_into);
};
/// out = h_y: `void vijp_into(const CRef<S>& x, const CRef<S>& h_x, MatRef<S> out) const`.
template <class L>
concept HasVijpInto = Submersive<L> && requires {
  static_cast<void (L::*)(const CRef<detail::scalar_of<L>>&, const CRef<detail::scalar_of<L>>&,
                          MatRef<detail::scalar_of<L>>) const>(&L::vijp_into);
};
/// out = f⁻¹(y): `void inverse_into(const CRef<S>& y, MatRef<S> out) const`.
template <class L>
concept HasInverseInto = Invertible<L> && requires {
  static_cast<void (L::*)(const CRef<detail::scalar_of<L>>&, MatRef<detail::scalar_of<L>>) const>(
      &L::inverse_into);
};
/// r = save_residual(x) in r's storage: `void save_residual_into(const CRef<S>& x, residual_type& r) const`.
template <class L>
concept HasSaveResidualInto = Layer<L> && requires {
  static_cast<void (L::*)(const CRef<detail::scalar_of<L>>&, residual_t<L>&) const>(&L::save_residual_into);
};
/// out = Jᵀ h from a residual:
/// `void vjp_residual_into(const residual_type& r, const CRef<S>& h, MatRef<S> out) const`.
template <class L>
concept HasVjpResidualInto = Layer<L> && requires {
  static_cast<void (L::*)(const residual_t<L>&, const CRef<detail::scalar_of<L>>&,
                          MatRef<detail::scalar_of<L>>) const>(&L::vjp_residual_into);
};
/// J ← s J, the bias kept: `bool scale_weight(double s)` (false: nothing to scale).
template <class L>
concept HasScaleWeight = requires {
  static_cast<bool (L::*)(double)>(&L::scale_weight);
};
/// Frees what the layer derived from its weights (rebuilt on next use).
template <class L>
concept HasReleaseDerived = requires(const L& l) {
  l.release_derived();
};
/// Run-time refinements of Submersive, Fragmental, Invertible (a Linear
/// layer is submersive only when out ≤ in; a type-erased layer only knows at
/// run time).
template <class L>
concept HasSubmersiveQuery = requires(const L& l) {
  { l.is_submersive() } -> std::same_as<bool>;
};
template <class L>
concept HasFragmentalQuery = requires(const L& l) {
  { l.is_fragmental() } -> std::same_as<bool>;
};
template <class L>
concept HasInvertibleQuery = requires(const L& l) {
  { l.is_invertible() } -> std::same_as<bool>;
};
/// The residual is a piecewise-linear branch pattern (core/ops.hpp, keeps_branches).
template <class L>
concept HasBranchResidualQuery = requires(const L& l) {
  { l.is_branch_residual() } -> std::same_as<bool>;
};
/// Whether cast<double>() works for this value (a type-erased or composite layer).
template <class L>
concept HasDoubleCastQuery = requires(const L& l) {
  { l.castable_to_double() } -> std::same_as<bool>;
};

/// Every optional hook L declares has the contract's signature (a hook named
/// right with another signature would otherwise be silently skipped).
template <class L>
consteval bool check_hooks() {
  using S = detail::scalar_of<L>;
  (void)sizeof(S);
  static_assert(
      HasForwardInto<L> || !requires { &L::forward_into; },
      "Moonwalk layer contract: forward_into must be `void forward_into(const CRef<S>& x, MatRef<S> out) "
      "const`");
  static_assert(
      HasVjpInto<L> || !requires { &L::vjp_into; },
      "Moonwalk layer contract: vjp_into must be `void vjp_into(const CRef<S>& x, const CRef<S>& h, "
      "MatRef<S> out) const`");
  static_assert(
      HasVijpInto<L> || !requires { &L::vijp_into; },
      "Moonwalk layer contract: vijp_into must be `void vijp_into(const CRef<S>& x, const CRef<S>& h_x, "
      "MatRef<S> out) const`, next to vijp(x, h_x)");
  static_assert(
      HasInverseInto<L> || !requires { &L::inverse_into; },
      "Moonwalk layer contract: inverse_into must be `void inverse_into(const CRef<S>& y, MatRef<S> out) "
      "const`, next to inverse(y)");
  static_assert(
      HasSaveResidualInto<L> || !requires { &L::save_residual_into; },
      "Moonwalk layer contract: save_residual_into must be `void save_residual_into(const CRef<S>& x, "
      "residual_type& r) const`");
  static_assert(
      HasVjpResidualInto<L> || !requires { &L::vjp_residual_into; },
      "Moonwalk layer contract: vjp_residual_into must be `void vjp_residual_into(const residual_type& r, "
      "const CRef<S>& h, MatRef<S> out) const`");
  static_assert(
      HasScaleWeight<L> || !requires { &L::scale_weight; },
      "Moonwalk layer contract: scale_weight must be `bool scale_weight(double s)`");
  static_assert(
      HasReleaseDerived<L> || !requires { &L::release_derived; },
      "Moonwalk layer contract: release_derived must be `void release_derived() const noexcept`");
  static_assert(
      HasSubmersiveQuery<L> || !requires { &L::is_submersive; },
      "Moonwalk layer contract: is_submersive must be `bool is_submersive() const`");
  static_assert(
      HasFragmentalQuery<L> || !requires { &L::is_fragmental; },
      "Moonwalk layer contract: is_fragmental must be `bool is_fragmental() const`");
  static_assert(
      HasInvertibleQuery<L> || !requires { &L::is_invertible; },
      "Moonwalk layer contract: is_invertible must be `bool is_invertible() const`");
  static_assert(
      HasBranchResidualQuery<L> || !requires { &L::is_branch_residual; },
      "Moonwalk layer contract: is_branch_residual must be `bool is_branch_residual() const`");
  static_assert(
      HasDoubleCastQuery<L> || !requires { &L::castable_to_double; },
      "Moonwalk layer contract: castable_to_double must be `bool castable_to_double() const`");
  return true;
}

/// Checks a layer type against the contract with one sentence per missing
/// operation: `static_assert(moonwalk::check_layer<MyLayer>());`
template <class L>
consteval bool check_layer() {
  static_assert(HasScalarType<L>, "Moonwalk layer contract: missing `using scalar_type = float|double;`");
  static_assert(HasShape<L>, "Moonwalk layer contract: missing in_features(), out_features() or name()");
  static_assert(HasForward<L>, "Moonwalk layer contract: missing forward(x) -> Matrix");
  static_assert(HasJvp<L>, "Moonwalk layer contract: missing jvp(x, dx) or jvp_params(x, dtheta)");
  static_assert(HasVjp<L>, "Moonwalk layer contract: missing vjp(x, h) or vjp_params(x, h, grad)");
  static_assert(HasParameters<L>,
                "Moonwalk layer contract: missing num_params(), and parameters()/gradients() or "
                "parameter_blocks()/gradient_blocks()");
  static_assert(check_hooks<L>());
  return Layer<L>;
}

/// check_layer plus the vijp a Moonwalk sweep needs.
template <class L>
consteval bool check_submersive() {
  static_assert(check_layer<L>());
  static_assert(Submersive<L>, "Moonwalk layer contract: a Submersive layer is missing vijp(x, h_x) -> h_y");
  return true;
}

/// check_layer plus the fragment pair of a non-submersive layer.
template <class L>
consteval bool check_fragmental() {
  static_assert(check_layer<L>());
  static_assert(Fragmental<L>,
                "Moonwalk layer contract: a Fragmental layer is missing fragment_type, "
                "save_fragment(residual, h_y) or vijp_with_fragment(x, h_x, fragment)");
  return true;
}

/// Storage for layers without parameters.
template <class S>
struct NoParameters {
  static constexpr Index num_params() { return 0; }
  std::span<S> parameters() { return {}; }
  [[nodiscard]] std::span<const S> parameters() const { return {}; }
  std::span<S> gradients() { return {}; }
  [[nodiscard]] std::span<const S> gradients() const { return {}; }
};

}  // namespace moonwalk
