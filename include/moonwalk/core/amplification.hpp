// Moonwalk — how much a layer's vijp can stretch a cotangent's rounding error,
// and how a layer is carried into another scalar type (for double cotangents).
//
// A forward sweep recovers h_y = J⁻ᵀ h_x. An error δ in h_x becomes J⁻ᵀ δ in
// h_y while the signal h_x itself was J ᵀ h_y, so the relative error of the
// cotangent grows, per layer and per sample, by
//
//   bound    κ = ‖J‖ · ‖J⁺‖                         (the worst direction)
//   typical  γ = (‖J‖_F / √m) · (‖J⁺‖_F / √n)       (an error and a signal in
//                                                    random directions; J is m × n)
//
// For an elementwise layer that is κ = max|σ'| / min|σ'| and
// γ = rms(σ') · rms(1/σ'); for a Linear layer κ is the condition number of W and
// γ = ‖W‖_F ‖W⁺‖_F / min(m, n). Both are maximised over the batch. The
// tolerance-driven anchor policy predicts a sweep's error from γ (calibrated,
// fidelity/policy.hpp); κ is reported next to it as the worst case.
//
// Optional layer protocols (a layer without them still works everywhere):
//   amplification(r) -> Amplification   from the layer's residual (its input
//                                       when it has no residual protocol)
//   cast<T>() -> the same layer in scalar type T with the same parameters
#pragma once

#include <algorithm>
#include <concepts>
#include <limits>
#include <sstream>
#include <type_traits>
#include <utility>

#include "moonwalk/core/concepts.hpp"

namespace moonwalk {

/// Growth factors of a cotangent's relative error across one vijp (header comment).
struct Amplification {
  double bound = 1;    ///< κ = ‖J‖‖J⁺‖, max over the batch (an estimate where exact is costly)
  double typical = 1;  ///< γ = (‖J‖_F/√m)(‖J⁺‖_F/√n), max over the batch
  bool known = true;  ///< false: the layer offers no estimate (taken as 1; the a-posteriori check still runs)

  /// A layer that offers no estimate.
  static Amplification unknown() { return {1, 1, false}; }

  /// Composition: factors multiply (chains, coupling branches).
  Amplification& operator*=(const Amplification& o) {
    bound *= o.bound;
    typical *= o.typical;
    known = known && o.known;
    return *this;
  }
  friend Amplification operator*(Amplification a, const Amplification& b) { return a *= b; }
};

/// The layer estimates its own amplification from its residual.
template <class L>
concept HasAmplification = Layer<L> && requires(const L& l, const residual_t<L>& r) {
  { l.amplification(r) } -> std::convertible_to<Amplification>;
};

/// Amplification of a layer's vijp from what its reverse pass kept.
template <Layer L>
Amplification amplification(const L& l, const residual_t<L>& r) {
  if constexpr (HasAmplification<L>)
    return l.amplification(r);
  else
    return Amplification::unknown();
}

/// The layer can be rebuilt in scalar type T with the same parameters.
template <class L, class T>
concept CastableTo = Layer<L> && requires(const L& l) {
  { l.template cast<T>() } -> Layer;
  requires std::same_as<typename decltype(l.template cast<T>())::scalar_type, T>;
};

/// The same layer in scalar type T: a reference to `l` itself when T is its
/// scalar type, else `l.cast<T>()` (a copy with converted parameters).
template <class T, Layer L>
decltype(auto) cast(const L& l) {
  if constexpr (std::is_same_v<T, typename L::scalar_type>) {
    return (l);
  } else {
    static_assert(CastableTo<L, T>,
                  "Moonwalk: this layer offers no cast<T>(), so it cannot be carried in another "
                  "scalar type (double cotangents need it)");
    return l.template cast<T>();
  }
}

/// Whether `l` can be carried in double now: CastableTo<L, double>, and its
/// own castable_to_double() where it has one (a type-erased layer, or a
/// composite holding one, knows only at run time).
template <Layer L>
bool castable_to_double(const L& l) {
  if constexpr (std::is_same_v<typename L::scalar_type, double>)
    return true;
  else if constexpr (!CastableTo<L, double>)
    return false;
  else if constexpr (HasDoubleCastQuery<L>)
    return l.castable_to_double();
  else
    return true;
}

/// The type `cast<T>(l)` makes (T differs from L's scalar type).
template <class T, class L>
using cast_t = decltype(std::declval<const L&>().template cast<T>());

/// dst = cast<T>(l), into dst's storage where the layer offers
/// `l.cast_into(dst)` (parameters converted in place and a new weight
/// version, so what dst derived from its old weights is rebuilt into the same
/// buffers); otherwise dst is assigned a fresh cast. Either way dst equals
/// cast<T>(l) afterwards.
template <class T, Layer L>
requires CastableTo<L, T>
void cast_into(const L& l, cast_t<T, L>& dst) {
  if constexpr (requires { l.cast_into(dst); })
    l.cast_into(dst);
  else
    dst = l.template cast<T>();
}

}  // namespace moonwalk
