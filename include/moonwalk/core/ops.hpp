// Moonwalk — uniform access to optional layer operations.
//
// Schedules call these instead of the members, so a layer without the
// residual protocol saves its input, and runtime capability queries
// (`is_submersive()`, …) refine the compile-time concepts (a Linear is
// submersive only when out ≤ in; a type-erased layer only knows at run time).
#pragma once

#include <algorithm>
#include <array>
#include <cstddef>
#include <span>
#include <type_traits>
#include <utility>
#include <vector>

#include "moonwalk/core/concepts.hpp"
#include "moonwalk/core/gradient_observer.hpp"
#include "moonwalk/core/step.hpp"

namespace moonwalk {

/// A list of storage blocks (spans), held in place up to kInline of them and
/// on the heap beyond: a flat layer's one block, or a few, costs no
/// allocation (optimizers and get/zero_gradients ask every layer each step).
/// Converts from and to std::vector, the composites' own return type.
template <class Span>
class Blocks {
 public:
  static constexpr std::size_t kInline = 4;
  Blocks() = default;
  Blocks(Span one) : size_(1) { inline_[0] = one; }  // NOLINT: implicit, a single block
  Blocks(std::vector<Span> v) : size_(v.size()) {    // NOLINT: implicit, from a composite's list
    if (size_ <= kInline)
      std::copy(v.begin(), v.end(), inline_.begin());
    else
      heap_ = std::move(v);
  }
  void push_back(Span b) {
    if (size_ < kInline) {
      inline_[size_++] = b;
      return;
    }
    if (size_ == kInline) heap_.assign(inline_.begin(), inline_.end());
    heap_.push_back(b);
    ++size_;
  }
  [[nodiscard]] std::size_t size() const { return size_; }
  [[nodiscard]] bool empty() const { return size_ == 0; }
  [[nodiscard]] const Span* begin() const { return size_ <= kInline ? inline_.data() : heap_.data(); }
  [[nodiscard]] const Span* end() const { return begin() + size_; }
  const Span& operator[](std::size_t i) const { return begin()[i]; }
  operator std::vector<Span>() const { return {begin(), end()}; }  // NOLINT: implicit, as before

 private:
  std::array<Span, kInline> inline_{};
  std::vector<Span> heap_;
  std::size_t size_ = 0;
};

/// θ of a layer as blocks of contiguous storage, in flat order.
template <Layer L>
Blocks<std::span<typename L::scalar_type>> parameter_blocks(L& l) {
  if constexpr (HasParameterBlocks<L>)
    return l.parameter_blocks();
  else
    return {l.parameters()};
}
template <Layer L>
Blocks<std::span<const typename L::scalar_type>> parameter_blocks(const L& l) {
  if constexpr (HasParameterBlocks<L>)
    return l.parameter_blocks();
  else
    return {l.parameters()};
}
/// ∂ℓ/∂θ storage of a layer as blocks, in flat order.
template <Layer L>
Blocks<std::span<typename L::scalar_type>> gradient_blocks(L& l) {
  if constexpr (HasParameterBlocks<L>)
    return l.gradient_blocks();
  else
    return {l.gradients()};
}
template <Layer L>
Blocks<std::span<const typename L::scalar_type>> gradient_blocks(const L& l) {
  if constexpr (HasParameterBlocks<L>)
    return l.gradient_blocks();
  else
    return {l.gradients()};
}

/// g += J_θᵀ h into the layer's own gradient storage.
template <Layer L>
void accumulate_vjp_params(L& l, const CRef<typename L::scalar_type>& x,
                           const CRef<typename L::scalar_type>& h) {
  using S = typename L::scalar_type;
  if (l.num_params() == 0) return;
  if constexpr (HasFlatParameters<L>) {
    auto grad = l.gradients();
    Eigen::Map<Vector<S>> g(grad.data(), static_cast<Index>(grad.size()));
    l.vjp_params(x, h, g);
  } else {
    const auto blocks = l.gradient_blocks();
    if (blocks.size() == 1) {  // one contiguous block (e.g. a type-erased Linear): no copy
      Eigen::Map<Vector<S>> g(blocks[0].data(), static_cast<Index>(blocks[0].size()));
      l.vjp_params(x, h, g);
      return;
    }
    Vector<S> g = Vector<S>::Zero(l.num_params());
    l.vjp_params(x, h, g);
    Index o = 0;
    for (auto b : blocks) {
      Eigen::Map<Vector<S>>(b.data(), static_cast<Index>(b.size())) +=
          g.segment(o, static_cast<Index>(b.size()));
      o += static_cast<Index>(b.size());
    }
  }
}

/// What the reverse pass keeps for this layer's input-vjp.
template <Layer L>
residual_t<L> save_residual(const L& l, const CRef<typename L::scalar_type>& x) {
  if constexpr (HasResidual<L>)
    return l.save_residual(x);
  else
    return Matrix<typename L::scalar_type>(x);
}

/// Jᵀ h from a saved residual.
template <Layer L>
Matrix<typename L::scalar_type> vjp_residual(const L& l, const residual_t<L>& r,
                                             const CRef<typename L::scalar_type>& h) {
  if constexpr (HasResidual<L>)
    return l.vjp_residual(r, h);
  else
    return l.vjp(r, h);
}

// ---- output-argument forms (concepts.hpp): `out` must have the result's
//      shape (ShapeError naming the layer otherwise); the layer's `*_into`
//      member writes it when the layer has one, else the value-returning
//      member's result is copied in.

/// Frees what the layer derived from its weights (a factorisation, its
/// amplification figures: `l.release_derived()` where the layer keeps any);
/// the next use rebuilds it, with the same results.
template <Layer L>
void release_derived(const L& l) noexcept {
  static_assert(check_hooks<L>());
  if constexpr (HasReleaseDerived<L>) l.release_derived();
}

/// J ← s J, the bias kept (`l.scale_weight(s)`); false, and l unchanged,
/// for a layer without weights to scale.
template <Layer L>
bool scale_weight(L& l, double s) {
  static_assert(check_hooks<L>());
  if constexpr (HasScaleWeight<L>)
    return l.scale_weight(s);
  else
    return false;
}

/// out = f(x), out_features × batch
template <Layer L>
void forward_into(const L& l, const CRef<typename L::scalar_type>& x, MatRef<typename L::scalar_type> out) {
  static_assert(check_hooks<L>());
  detail::check_rows(l, "forward output buffer", out, l.out_features(), x.cols());
  if constexpr (HasForwardInto<L>)
    l.forward_into(x, out);
  else
    out = l.forward(x);
}

/// out = Jᵀ h at x, in_features × batch
template <Layer L>
void vjp_into(const L& l, const CRef<typename L::scalar_type>& x, const CRef<typename L::scalar_type>& h,
              MatRef<typename L::scalar_type> out) {
  static_assert(check_hooks<L>());
  detail::check_rows(l, "vjp output buffer", out, l.in_features(), h.cols());
  if constexpr (HasVjpInto<L>)
    l.vjp_into(x, h, out);
  else
    out = l.vjp(x, h);
}

/// r = what the reverse pass keeps for this layer's input-vjp, reusing r's
/// storage where the layer allows (a layer without the residual protocol
/// copies x into r).
template <Layer L>
void save_residual_into(const L& l, const CRef<typename L::scalar_type>& x, residual_t<L>& r) {
  static_assert(check_hooks<L>());
  if constexpr (HasSaveResidualInto<L>)
    l.save_residual_into(x, r);
  else if constexpr (HasResidual<L>)
    r = l.save_residual(x);
  else {
    detail::safe_resize(r, x.rows(), x.cols());
    r = x;
  }
}

/// out = Jᵀ h from a saved residual, in_features × batch
template <Layer L>
void vjp_residual_into(const L& l, const residual_t<L>& r, const CRef<typename L::scalar_type>& h,
                       MatRef<typename L::scalar_type> out) {
  detail::check_rows(l, "vjp output buffer", out, l.in_features(), h.cols());
  if constexpr (HasVjpResidualInto<L>)
    l.vjp_residual_into(r, h, out);
  else
    out = moonwalk::vjp_residual(l, r, h);
}

/// x = f⁻¹(y), in_features × batch, into x (a layer without inverse_into:
/// through inverse(y), a temporary of x's size).
template <Invertible L>
void inverse_into(const L& l, const CRef<typename L::scalar_type>& y, MatRef<typename L::scalar_type> x) {
  detail::check_rows(l, "inverse output buffer", x, l.in_features(), y.cols());
  if constexpr (HasInverseInto<L>)
    l.inverse_into(y, x);
  else
    x = l.inverse(y);
}

/// out = h_y with Jᵀ h_y = h_x (a submersive layer), out_features × batch
template <Submersive L>
void vijp_into(const L& l, const CRef<typename L::scalar_type>& x, const CRef<typename L::scalar_type>& hx,
               MatRef<typename L::scalar_type> out) {
  detail::check_rows(l, "vijp output buffer", out, l.out_features(), hx.cols());
  if constexpr (HasVijpInto<L>)
    l.vijp_into(x, hx, out);
  else
    out = l.vijp(x, hx);
}

/// The layer can recover its output cotangent by vijp alone.
template <Layer L>
bool can_vijp(const L& l) {
  if constexpr (!Submersive<L>)
    return false;
  else if constexpr (HasSubmersiveQuery<L>)
    return l.is_submersive();
  else
    return true;
}

/// The layer can recover its output cotangent given a saved fragment.
template <Layer L>
bool can_fragment(const L& l) {
  if constexpr (!Fragmental<L>)
    return false;
  else if constexpr (HasFragmentalQuery<L>)
    return l.is_fragmental();
  else
    return true;
}

/// The layer offers a working inverse.
template <Layer L>
bool can_invert(const L& l) {
  if constexpr (!Invertible<L>)
    return false;
  else if constexpr (HasInvertibleQuery<L>)
    return l.is_invertible();
  else
    return true;
}

/// The layer's residual is the branch pattern of a piecewise-linear map (a
/// BitMask, one bit per element: LeakyReLU, ReLU, …). A schedule that
/// rebuilds the layer's input by inversion keeps these bits from the forward
/// pass instead of re-deriving them: where the forward pass sat exactly on a
/// kink (a zero-padded row under a zero bias), a rebuilt input of ±1e-17
/// picks the other one-sided derivative.
template <Layer L>
bool keeps_branches(const L& l) {
  if constexpr (HasBranchResidualQuery<L>)
    return l.is_branch_residual();
  else
    return std::is_same_v<residual_t<L>, BitMask>;
}

/// How a Moonwalk sweep crosses a layer.
enum class SweepMode {
  vijp,      ///< submersive: h_y = vijp(x, h_x)
  fragment,  ///< fragmental: h_y = vijp_with_fragment(x, h_x, φ), φ saved in the reverse pass
  anchor,    ///< neither: h_y itself is saved in the reverse pass (a cotangent anchor)
};

template <Layer L>
SweepMode sweep_mode(const L& l) {
  if (can_vijp(l)) return SweepMode::vijp;
  if (can_fragment(l)) return SweepMode::fragment;
  return SweepMode::anchor;
}

/// Statically known to cross a sweep without an anchor (for compile-time checks).
template <class L>
concept SweepCapable = Submersive<L> || Fragmental<L>;

}  // namespace moonwalk
