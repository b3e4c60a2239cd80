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
//   save_residual_into(x, r)             r = save_residual(x), in r's storage
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
