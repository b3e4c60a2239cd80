// Moonwalk — the forward sweep shared by the Moonwalk schedules.
#pragma once

#include <algorithm>
#include <any>
#include <cstdint>
#include <sstream>
#include <type_traits>
#include <vector>

#include "moonwalk/core/amplification.hpp"
#include "moonwalk/core/dense.hpp"
#include "moonwalk/core/ops.hpp"
#include "moonwalk/schedules/detail/workspace.hpp"
#include "moonwalk/schedules/gradient.hpp"

namespace moonwalk {

/// Which layers keep their output cotangent h_i as an anchor in the reverse
/// pass: every k-th layer and/or an explicit list (0-based layer indices).
/// Layers that are neither submersive nor fragmental are anchored whatever
/// this says. The tolerance-driven policy builds on this mechanism.
struct Anchors {
  std::size_t every = 0;          ///< 0: none; k: layers k−1, 2k−1, … (not the last)
  std::vector<std::size_t> at{};  ///< explicit layer indices

  [[nodiscard]] std::vector<bool> mask(std::size_t layers) const {
    std::vector<bool> m;
    mask_into(layers, m);
    return m;
  }
  /// mask(), written into m (no allocation when m has held `layers` entries).
  void mask_into(std::size_t layers, std::vector<bool>& m) const {
    m.assign(layers, false);
    if (every > 0)
      for (std::size_t i = every - 1; i + 1 < layers; i += every) m[i] = true;
    for (std::size_t i : at) {
      if (i >= layers) {
        std::ostringstream s;
        s << "Anchors: layer " << i << " does not exist (network has " << layers << " layers)";
        throw ScheduleError(s.str());
      }
      m[i] = true;
    }
  }
};

namespace detail {

/// How each layer is crossed by the sweep (vijp, fragment or anchor), written into m.
template <Net N>
void sweep_modes_into(const N& net, std::vector<SweepMode>& m) {
  m.resize(net.size());
  for (std::size_t i = 0; i < net.size(); ++i) net.visit(i, [&](const auto& l) { m[i] = sweep_mode(l); });
}
template <Net N>
std::vector<SweepMode> sweep_modes(const N& net) {
  std::vector<SweepMode> m;
  sweep_modes_into(net, m);
  return m;
}

/// A step's per-layer choices, kept in the workspace: how the sweep crosses
/// each layer, and the layers anchored by the schedule's Anchors.
struct StepPlan {
  std::vector<SweepMode> modes;
  std::vector<bool> anchored;
};

template <class L>
struct castable_double : std::bool_constant<CastableTo<L, double>> {};

/// A float network whose layers can all be cast to double (statically; type-
/// erased layers answer at run time, castable_to_double).
template <Net N>
inline constexpr bool double_possible = [] {
  if constexpr (!std::is_same_v<typename N::scalar_type, float>)
    return false;
  else if constexpr (N::is_static)
    return N::template all_layers<castable_double>;
  else
    return true;
}();

/// Whether every layer of `net` can be carried in double right now.
template <Net N>
bool castable_to_double(N& net) {
  if constexpr (!double_possible<N>) {
    return false;
  } else {
    bool ok = true;
    for (std::size_t i = 0; i < net.size(); ++i)
      net.visit(i, [&](const auto& l) {
        using Lyr = std::remove_cvref_t<decltype(l)>;
        if constexpr (!CastableTo<Lyr, double>)
          ok = false;
        else
          ok = ok && moonwalk::castable_to_double(l);
      });
    return ok;
  }
}

/// `x` in scalar type C: x itself when C is its scalar type, else a converted copy.
template <class C, class S>
decltype(auto) in_scalar(const Matrix<S>& x) {
  if constexpr (std::is_same_v<C, S>)
    return (x);
  else
    return Matrix<C>(x.template cast<C>());
}

/// `x` in scalar type C: a view of x itself when C is its scalar type, else
/// of `buf` holding its conversion.
template <class C, class D>
CRef<C> in_scalar(const Eigen::MatrixBase<D>& x, Buffer<C>& buf) {
  if constexpr (std::is_same_v<C, typename D::Scalar>) {
    return CRef<C>(x);
  } else {
    auto v = buf.view(x.rows(), x.cols());
    v = x.template cast<C>();
    return CRef<C>(v);
  }
}

/// Workspace slots (schedules/detail/workspace.hpp) of the forward sweep
/// (pure-forward Moonwalk's) and of mixed Moonwalk's bookkeeping and bound
/// plan: buffers in the network's S, and buffers in the cotangents' C at
/// `kind + precision_offset<C>` (a float and a double attempt keep separate
/// ones); per-layer residuals from kLayers on.
enum WorkspaceSlot : std::size_t {
  kXEven,       ///< Buffer<S>: the activations alternate between kXEven and kXOdd
  kXOdd,        ///< Buffer<S>
  kLossGrad,    ///< Matrix<S>: ∂ℓ/∂x_L
  kCotangentS,  ///< Buffer<S>: columns of h_i converted for the weight-vjp (C ≠ S)
  kXc,          ///< Buffer<C>: x_i converted (C ≠ S)
  kH,           ///< Buffer<C>: the cotangents alternate between kH and kHNext
  kHNext,       ///< Buffer<C>
  kAnchors,     ///< std::vector<Matrix<C>>: pool of spare anchor buffers
  kSlotsPerScalar = 4,
  kNames = 13,        ///< LayerNames: the names the report lists
  kStore = 14,        ///< SavedStore: the accounts of what is kept between the passes
  kPlan = 15,         ///< StepPlan
  kHeldAnchors = 16,  ///< std::vector<Matrix<C>>: layer i's anchor at [i]; + 1 for C = double
  kBoundPlan = 18,    ///< MixedMoonwalk's bound plan (BoundMoonwalk<S>, schedules/mixed.hpp)
  kLayers = 24        ///< residual of layer i in C: kLayers + 2 i + (C is double)
};
/// Columns of h converted to S at a time for the sweep's weight-vjp.
inline constexpr Index kConvertColumns = 1024;

template <class C>
constexpr std::size_t precision_offset = std::is_same_v<C, double> ? kSlotsPerScalar : 0;
template <class C>
constexpr std::size_t held_anchors_slot = kHeldAnchors + (std::is_same_v<C, double> ? 1 : 0);
template <class C>
constexpr std::size_t residual_slot(std::size_t i) {
  return kLayers + 2 * i + (std::is_same_v<C, double> ? 1 : 0);
}

/// The activations' and the cotangents' alternating buffers in `ws`.
template <class S>
PingPong<S> activation_buffers(Workspace& ws) {
  return {ws.get<Buffer<S>>(kXEven), ws.get<Buffer<S>>(kXOdd)};
}
template <class C>
PingPong<C> cotangent_buffers(Workspace& ws) {
  return {ws.get<Buffer<C>>(kH + precision_offset<C>), ws.get<Buffer<C>>(kHNext + precision_offset<C>)};
}

/// A network's layers carried in scalar type C, each cast once and kept for a
/// whole gradient: the reverse pass, the sweep and every attempt of a schedule
/// use the same copy, so what a cast layer derives from its weights (Linear's
/// QR of the cast W, its condition estimate) is computed once per step rather
/// than once per pass. The network's weights must not change within a step.
///
/// Kept across steps (`restart`, a schedule's workspace), a held cast is
/// refreshed from its layer on its first use in the step, into its own
/// storage (moonwalk::cast_into): it equals a fresh cast, and rebuilding its
/// factorisation for the new weights reuses the previous one's buffers.
template <class C>
class CastLayers {
 public:
  explicit CastLayers(std::size_t layers = 0) : cast_(layers), fresh_(layers, false), bytes_(layers, 0) {}

  /// Starts a step on a network of `layers` layers: every held cast is stale
  /// until its first use. With `persistent`, release() keeps the casts (the
  /// buffers outlive the step).
  void restart(std::size_t layers, bool persistent) {
    cast_.resize(layers);
    bytes_.resize(layers, 0);
    fresh_.assign(layers, false);
    persistent_ = persistent;
  }

  /// Drops every cast; the list keeps its capacity.
  void clear() {
    cast_.clear();
    fresh_.clear();
    bytes_.clear();
  }

  /// Drops layer i's cast (and what it derived from its weights); the next
  /// use makes it again. Not while the casts are kept across steps.
  void release(std::size_t i) {
    if (!persistent_ && i < cast_.size()) {
      cast_[i].reset();
      bytes_[i] = 0;
    }
  }

  /// Bytes the held casts' parameters and gradients take (their
  /// factorisations not counted: Stats::working_bytes).
  [[nodiscard]] std::size_t storage_bytes() const {
    std::size_t b = 0;
    for (const std::size_t x : bytes_) b += x;
    return b;
  }

  /// Layer i (`l`) in C: `l` itself when C is its scalar type, else its
  /// cast<C>(), made (or refreshed) on first use in the step.
  template <Layer L>
  decltype(auto) operator()(std::size_t i, const L& l) {
    if constexpr (std::is_same_v<C, typename L::scalar_type>) {
      return (l);
    } else {
      using Lc = cast_t<C, L>;
      Lc* held = std::any_cast<Lc>(&cast_.at(i));
      if (!held) {
        held = &cast_[i].template emplace<Lc>(moonwalk::cast<C>(l));
        bytes_[i] = 2 * static_cast<std::size_t>(l.num_params()) * sizeof(C);  // θ and its gradient
      } else if (!fresh_[i]) {
        moonwalk::cast_into<C>(l, *held);
      }
      fresh_[i] = true;
      return std::as_const(*held);
    }
  }

  /// Layer i's cast as held (nullptr before its first use).
  [[nodiscard]] const std::any* held(std::size_t i) const {
    return i < cast_.size() && cast_[i].has_value() ? &cast_[i] : nullptr;
  }

 private:
  std::vector<std::any> cast_;
  std::vector<bool> fresh_;         // cast_[i] was made or refreshed in this step
  std::vector<std::size_t> bytes_;  // storage of cast_[i]
  bool persistent_ = false;
};

/// Frees what every layer of `net` derived from its weights (factorisations:
/// moonwalk::release_derived), for a step whose buffers do not outlive it.
template <Net N>
void release_derived(N& net) {
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [](const auto& l) { moonwalk::release_derived(l); });
}

/// A fingerprint of a network's shape and a batch width (PrecisionMemory's
/// key): FNV-1a over the layer count, every layer's widths, the batch and
/// `variant`. Never 0.
template <Net N>
std::uint64_t shape_key(N& net, Index batch, std::uint64_t variant) {
  std::uint64_t h = 14695981039346656037ull;
  auto mix = [&](std::uint64_t v) {
    for (int b = 0; b < 8; ++b, v >>= 8) h = (h ^ (v & 0xff)) * 1099511628211ull;
  };
  mix(net.size());
  for (std::size_t i = 0; i < net.size(); ++i)
    net.visit(i, [&](const auto& l) {
      mix(static_cast<std::uint64_t>(l.in_features()));
      mix(static_cast<std::uint64_t>(l.out_features()));
    });
  mix(static_cast<std::uint64_t>(batch));
  mix(variant);
  return h == 0 ? 1 : h;
}

/// The step's working set as the engine accounts it (Stats::working_bytes):
/// the workspace's buffers, the values the store owns, casts held outside the
/// workspace (`casts`, when not one of its slots), `extra` bytes of locals and
/// this thread's product scratch. Raises st.working_bytes to it.
template <class C>
void note_working_bytes(Stats& st, const Workspace& ws, const SavedStore& store, const CastLayers<C>* casts,
                        std::size_t extra = 0) {
  const std::size_t b = ws.bytes() + store.owned_bytes() + (casts ? casts->storage_bytes() : 0) + extra +
                        moonwalk::thread_scratch_bytes();
  st.working_bytes = std::max(st.working_bytes, b);
}

/// Name of a scalar type, for the stats.
template <class C>
const char* scalar_name() {
  return std::is_same_v<C, float> ? "float" : "double";
}

/// The forward sweep (docs/design.md §1), with cotangents carried in scalar type C
/// (the network's S, or double for a float network: each layer is then cast,
/// once, by `casts`, while x stays in S). From x_0 and h_0, for i = 1..L
///   x_i = f_i(x_{i−1});
///   h_i = vijp(x_{i−1}, h_{i−1})            (submersive)
///       = vijp_with_fragment(…, φ_i)         (fragmental, φ_i from the store)
///       = anchor a_i                          (anchored: the swept h_{i−1} is
///                                              checked against J_iᵀ a_i, the
///                                              value it should have)
///   g_i += J_{θ,i}ᵀ h_i;  drop x_{i−1}.
/// Ends with the a-posteriori check: h_L against ∂ℓ/∂x_L computed from x_L.
/// Returns the largest relative mismatch seen (the error estimate). `h`
/// holds h_0 on entry (h_1 with `from_h1`: the first layer is then not
/// crossed, only its ∂ℓ/∂θ read) and h_L on return; every buffer is a slot of `ws`.
/// With `keep` false the step's buffers will not outlive it (workspace.hpp):
/// an anchor's buffer is freed as soon as the sweep has read it, and a
/// layer's factorisation as soon as the sweep has crossed it.
template <class C, Net N, class L>
double forward_sweep(N& net, CastLayers<C>& casts, bool casts_in_ws, Workspace& ws, bool keep,
                     const CRef<typename N::scalar_type>& x0, PingPong<C>& h, bool from_h1, SavedStore& store,
                     const std::vector<SweepMode>& modes, const L& loss,
                     const typename L::target_type& target, Stats& st) {
  using S = typename N::scalar_type;
  constexpr std::size_t c = precision_offset<C>;
  const Index batch = x0.cols();
  PingPong<S> x = activation_buffers<S>(ws);
  Buffer<C>& xbuf = ws.get<Buffer<C>>(kXc + c);
  Buffer<S>& h_s = ws.get<Buffer<S>>(kCotangentS);
  double estimate = 0;
  // Layer i's input: x_0 itself for the first layer (no copy), else the last output.
  const auto input = [&](std::size_t i) { return i == 0 ? CRef<S>(x0) : CRef<S>(x.current()); };
  // h_{i+1} from h_i across layer i, whose input is xi.
  const auto cross = [&](std::size_t i, auto& l, const CRef<S>& xi) {
    decltype(auto) lc = casts(i, l);
    using Lc = std::remove_cvref_t<decltype(lc)>;
    const CRef<C> xc = in_scalar<C>(xi, xbuf);
    const Index out = l.out_features();
    if (store.has(i, SavedStore::anchor)) {
      Matrix<C>& a = ws.get<std::vector<Matrix<C>>>(held_anchors_slot<C>).at(i);
      auto ja = h.next(l.in_features(), batch);
      moonwalk::vjp_into(lc, xc, a, ja);
      estimate = std::max(estimate, rel_max_err(h.current(), ja));
      ++st.counts.vjp;
      h.assign(a);
      store.drop(i, SavedStore::anchor);
      if (keep)
        ws.recycle(kAnchors + c, std::move(a));  // (a spare for the next anchor)
      else
        a.resize(0, 0);  // (freed as soon as consumed)
    } else if (modes[i] == SweepMode::vijp) {
      if constexpr (Submersive<Lc>) {
        moonwalk::vijp_into(lc, xc, h.current(), h.next(out, batch));
        h.flip();
      }
      ++st.counts.vijp;
    } else {
      if constexpr (Fragmental<Lc>) {
        auto f = store.take<typename Lc::fragment_type>(i, SavedStore::fragment);
        h.next(out, batch) = lc.vijp_with_fragment(xc, h.current(), f);
        h.flip();
      }
      ++st.counts.vijp;
    }
  };
  for_each_layer(net, [&](std::size_t i, auto& l) {
    const CRef<S> xi = input(i);
    moonwalk::forward_into(l, xi, x.next(l.out_features(), batch));
    ++st.counts.forward;
    const Index out = l.out_features();
    if (i > 0 || !from_h1) cross(i, l, xi);
    if constexpr (std::is_same_v<C, S>) {
      moonwalk::accumulate_vjp_params(l, xi, h.current());
    } else if (l.num_params() > 0) {
      // g += J_θᵀ h, a sum over samples: h converted to S a block of columns
      // at a time (no batch-sized copy), unless the layer's samples interact
      // (BatchNorm in training: its J_θ needs the whole batch).
      const Index block = moonwalk::couples_batch(l) ? batch : kConvertColumns;
      for (Index c0 = 0; c0 < batch; c0 += block) {
        const Index n = std::min(block, batch - c0);
        auto hs = h_s.view(out, n);
        hs = h.current().middleCols(c0, n).template cast<S>();
        moonwalk::accumulate_vjp_params(l, xi.middleCols(c0, n), hs);
      }
    }
    ++st.counts.vjp_params;
    gradient_ready(i);
    note_working_bytes(st, ws, store, casts_in_ws ? nullptr : &casts);
    x.flip();
    casts.release(i);  // the sweep is its last user
    // ... and of what the layer derived from its weights: held to the step's
    // end, a width-256 Linear's factorisation and right inverse are 512 KiB,
    // more than the activation it stands for at batch 512.
    if (!keep) moonwalk::release_derived(l);
  });
  Matrix<S>& gL = ws.get<Matrix<S>>(kLossGrad);
  (void)loss_into<L, S>(loss, x.current(), target, gL);
  estimate = std::max(estimate, rel_max_err(h.current(), gL.template cast<C>()));
  return estimate;
}

}  // namespace detail
}  // namespace moonwalk
